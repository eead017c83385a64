//! The numerics do not move: a hash of the logits (prompt and decode, f32 and f16 caches) for
//! every weight format and the Hugging Face path, on every kernel path this machine can run,
//! equals the hash recorded before the core was reshaped (tests/fixtures/logit_hashes.txt; its
//! header says which lines were re-recorded since, and why).
//!
//! `LLAMA_RECORD_LOGIT_HASHES=1 cargo test -p llama-core --test logit_hashes -- --nocapture`
//! prints the lines for the fixture instead of checking them.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::GgmlDType;
use common::tiny::{build, Spec, Tiny};
use llama_core::convert::{write_gguf, GgufTensor};
use llama_core::gguf::GgufFile;
use llama_core::{Kernel, KvCacheType, Model, ModelOptions, QuantType, SessionOptions};

const PROMPT: [u32; 7] = [5, 40, 77, 100, 3, 250, 17];
const DECODE: [u32; 4] = [64, 9, 130, 2];

fn fnv1a(h: &mut u64, bytes: &[u8]) {
    for &b in bytes {
        *h ^= b as u64;
        *h = h.wrapping_mul(0x100_0000_01b3);
    }
}

/// Hash of every logit of the prompt and of each decoded token, bit for bit.
fn logits_hash(m: &Model, kv: KvCacheType) -> u64 {
    let mut s = m
        .session(SessionOptions::default().kv_type(kv).n_ctx(64))
        .unwrap();
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for row in s.eval_all_logits(&PROMPT).unwrap() {
        for v in row {
            fnv1a(&mut h, &v.to_bits().to_le_bytes());
        }
    }
    for t in DECODE {
        s.eval(&[t]).unwrap();
        for v in s.logits().unwrap() {
            fnv1a(&mut h, &v.to_bits().to_le_bytes());
        }
    }
    h
}

/// The tiny GGUF with every matrix stored as `dtype`.
fn gguf_as(t: &Tiny, dtype: GgmlDType) -> PathBuf {
    let g = GgufFile::open(&t.gguf).unwrap();
    let meta = common::tiny::metadata(&g);
    let tensors: Vec<GgufTensor> = g
        .tensor_order
        .iter()
        .map(|name| common::tiny::stored_as(&g, name, dtype).0)
        .collect();
    let p = t.dir.path().join(format!("{dtype:?}.gguf"));
    write_gguf(&p, &meta, &tensors).unwrap();
    p
}

/// (name, path, load-time quantization) for every weight format.
fn models(t: &Tiny) -> Vec<(String, PathBuf, Option<QuantType>)> {
    let mut v = vec![];
    for dtype in std::iter::once(GgmlDType::F32).chain(common::tiny::GGUF_TYPES) {
        v.push((format!("gguf-{dtype:?}"), gguf_as(t, dtype), None));
    }
    v.push(("hf-f32".to_string(), t.hf.clone(), None));
    for q in [QuantType::Q8_0, QuantType::Q4_1, QuantType::Q4K] {
        v.push((format!("hf-at-load-{q:?}"), t.hf.clone(), Some(q)));
    }
    v
}

/// The tiny model both tests run (inner dimensions of 256 so the k-quants fit).
fn tiny() -> Tiny {
    build(Spec::kquant_sized(512, 41))
}

/// candle chooses its quantized x86 kernels when it runs (candle-core's `repack_x86::level`,
/// overridable by its `MISTRALRS_FORCE_AVX2` / `MISTRALRS_FORCE_AVXVNNI` variables): VNNI
/// tiles with 512-bit or 256-bit sums, or its AVX2 dot products. A tier's sums may differ from
/// another's in the last bits, so a `candle@TIER/...` line overrides `candle/...` on that tier.
fn candle_tier() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        let forced = |v: &str| std::env::var(v).as_deref() == Ok("1");
        let (avx2, vnni) = (
            forced("MISTRALRS_FORCE_AVX2"),
            forced("MISTRALRS_FORCE_AVXVNNI"),
        );
        if !avx2
            && !vnni
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512vnni")
        {
            return "avx512vnni";
        }
        if !avx2
            && (vnni || is_x86_feature_detected!("avxvnni"))
            && is_x86_feature_detected!("avx2")
        {
            return "avxvnni";
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            return "avx2";
        }
    }
    "portable"
}

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/logit_hashes.txt")
}

#[test]
fn logits_are_bit_identical_to_the_recorded_hashes() {
    let t = tiny();
    let recording = std::env::var_os("LLAMA_RECORD_LOGIT_HASHES").is_some();
    let text = std::fs::read_to_string(fixture()).unwrap_or_default();
    let want: BTreeMap<&str, &str> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split_once(' '))
        .collect();
    let kernels = Kernel::available();
    assert!(kernels.contains(&Kernel::Scalar) && kernels.contains(&Kernel::Candle));
    let tier = candle_tier();
    let mut checked = 0;
    let mut moved = vec![];
    for (name, path, quantize) in models(&t) {
        for &kernel in &kernels {
            let mut opts = ModelOptions::default().with_kernel(kernel);
            if let Some(q) = quantize {
                opts = opts.with_quantize(q);
            }
            let m = Model::load(&path, opts).unwrap();
            for kv in [KvCacheType::F32, KvCacheType::F16] {
                let key = format!("{}/{name}/{kv:?}", kernel.as_str());
                let tiered = format!("{}@{tier}/{name}/{kv:?}", kernel.as_str());
                let got = format!("{:016x}", logits_hash(&m, kv));
                let w = match kernel {
                    Kernel::Candle => want.get(tiered.as_str()).or(want.get(key.as_str())),
                    _ => want.get(key.as_str()),
                };
                if recording {
                    // candle's lines: tier-free unless the tier-free line records other bits.
                    match (kernel, want.get(key.as_str())) {
                        (Kernel::Candle, Some(&plain)) if plain != got => {
                            println!("{tiered} {got}")
                        }
                        _ => println!("{key} {got}"),
                    }
                    continue;
                }
                let w = w.unwrap_or_else(|| panic!("{key}: no hash recorded in {:?}", fixture()));
                if got != *w {
                    moved.push(format!("{key} (candle tier {tier}): {got}, recorded {w}"));
                }
                checked += 1;
            }
        }
    }
    assert!(moved.is_empty(), "the logits moved:\n{}", moved.join("\n"));
    if !recording {
        assert!(checked >= 17 * 2 * 2, "only {checked} hashes checked");
    }
}

/// The thread count (the model's, or a session's own) does not change a bit of the logits.
#[test]
fn threads_do_not_change_the_logits() {
    let t = tiny();
    let path = gguf_as(&t, GgmlDType::Q4_0);
    let one = Model::load(&path, ModelOptions::default().with_threads(1)).unwrap();
    assert_eq!(one.threads(), 1);
    let three = Model::load(&path, ModelOptions::default().with_threads(3)).unwrap();
    assert_eq!(three.threads(), 3);
    assert_ne!(one.kernel(), Kernel::Auto);
    let want = logits_hash(&one, KvCacheType::F16);
    assert_eq!(logits_hash(&three, KvCacheType::F16), want);
    let s = one.session(SessionOptions::default().threads(4)).unwrap();
    assert_eq!(s.threads(), 4);
    assert_eq!(one.session(SessionOptions::default()).unwrap().threads(), 1);
    let bad = Model::load(&path, ModelOptions::default().with_threads(1 << 20));
    assert!(matches!(bad, Err(llama_core::Error::InvalidArgument(_))));
}
