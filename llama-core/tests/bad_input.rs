//! Bad input gives a clear error naming the file and tensor, never a panic or a huge
//! allocation.

mod common;

use std::path::Path;

use common::tiny::{build, Spec};
use llama_core::{Error, Model, ModelOptions, SessionOptions};

fn load(p: &Path) -> Result<Model, Error> {
    Model::load(p, ModelOptions::default())
}

#[test]
fn missing_path_is_io_error() {
    let e = load(Path::new("/nonexistent/model.gguf")).unwrap_err();
    assert!(matches!(e, Error::Io { .. }), "{e}");
    assert!(e.to_string().contains("/nonexistent/model.gguf"));
}

#[test]
fn not_a_gguf_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.gguf");
    std::fs::write(&p, b"this is not a model").unwrap();
    let e = load(&p).unwrap_err();
    assert!(matches!(e, Error::Weights { .. }), "{e}");
    assert!(e.to_string().contains("magic"), "{e}");
    std::fs::write(&p, b"").unwrap();
    assert!(matches!(load(&p).unwrap_err(), Error::Weights { .. }));
}

#[test]
fn truncated_gguf_names_file_and_tensor() {
    let t = build(Spec::default());
    let bytes = std::fs::read(&t.gguf).unwrap();
    let p = t.dir.path().join("cut.gguf");
    // Cut inside the tensor data: the directory is intact, a tensor's data is not.
    std::fs::write(&p, &bytes[..bytes.len() - 1000]).unwrap();
    let e = load(&p).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, Error::Weights { .. }), "{msg}");
    assert!(
        msg.contains("cut.gguf") && msg.contains("truncated"),
        "{msg}"
    );
    // Cut inside the header, at many points: always an error, never a panic.
    for cut in (0..6000.min(bytes.len())).step_by(97) {
        std::fs::write(&p, &bytes[..cut]).unwrap();
        assert!(load(&p).is_err(), "cut at {cut}");
    }
}

fn patch_u64_after(bytes: &mut [u8], offset: usize, v: u64) {
    bytes[offset..offset + 8].copy_from_slice(&v.to_le_bytes());
}

#[test]
fn lying_header_counts_are_rejected_without_huge_allocation() {
    let t = build(Spec::default());
    let good = std::fs::read(&t.gguf).unwrap();
    let p = t.dir.path().join("lie.gguf");
    // Tensor count (offset 8) and metadata count (offset 16) set to absurd values.
    for off in [8usize, 16] {
        let mut b = good.clone();
        patch_u64_after(&mut b, off, u64::MAX / 3);
        std::fs::write(&p, &b).unwrap();
        let e = load(&p).unwrap_err();
        assert!(matches!(e, Error::Weights { .. }), "{e}");
    }
    // First key's string length set to 2^60.
    let mut b = good.clone();
    patch_u64_after(&mut b, 24, 1 << 60);
    std::fs::write(&p, &b).unwrap();
    let e = load(&p).unwrap_err();
    assert!(e.to_string().contains("exceeds the file size"), "{e}");
}

#[test]
fn random_corruption_never_panics() {
    let t = build(Spec::default());
    let good = std::fs::read(&t.gguf).unwrap();
    let p = t.dir.path().join("fuzz.gguf");
    let mut s = 0x1234_5678u64;
    for _ in 0..300 {
        let mut b = good.clone();
        for _ in 0..4 {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            // Mostly the header and metadata region, where structure lives.
            let i = (s >> 33) as usize % 4096.min(b.len());
            b[i] = (s >> 13) as u8;
        }
        std::fs::write(&p, &b).unwrap();
        let r = std::panic::catch_unwind(|| load(&p).map(|_| ()));
        assert!(r.is_ok(), "load panicked on a corrupted file");
    }
}

#[test]
fn missing_tensor_is_named() {
    let t = build(Spec::default());
    let g = llama_core::gguf::GgufFile::open(&t.gguf).unwrap();
    let meta = common::tiny::metadata(&g);
    let tensors: Vec<_> = g
        .tensor_order
        .iter()
        .filter(|n| n.as_str() != "blk.1.ffn_up.weight")
        .map(|n| {
            let (info, data) = g.tensor_data(n).unwrap();
            llama_core::convert::GgufTensor {
                name: n.clone(),
                shape: info.shape.clone(),
                dtype: info.dtype,
                data: data.to_vec(),
            }
        })
        .collect();
    let p = t.dir.path().join("missing.gguf");
    llama_core::convert::write_gguf(&p, &meta, &tensors).unwrap();
    let e = load(&p).unwrap_err();
    assert!(
        e.to_string().contains("blk.1.ffn_up.weight") && e.to_string().contains("missing"),
        "{e}"
    );
}

#[test]
fn wrong_shape_in_hf_folder_is_named() {
    let t = build(Spec::default());
    // The config claims a wider MLP than the weights have.
    let cfg_path = t.hf.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["intermediate_size"] = 128.into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let e = load(&t.hf).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, Error::Weights { .. }), "{msg}");
    assert!(
        msg.contains("mlp.gate_proj.weight") && msg.contains("shape"),
        "{msg}"
    );
}

#[test]
fn hf_folder_problems() {
    let t = build(Spec::default());
    // Invalid JSON.
    let cfg_path = t.hf.join("config.json");
    let orig = std::fs::read_to_string(&cfg_path).unwrap();
    std::fs::write(&cfg_path, "{ not json").unwrap();
    assert!(matches!(load(&t.hf).unwrap_err(), Error::Config { .. }));
    // Unsupported architecture.
    let mut cfg: serde_json::Value = serde_json::from_str(&orig).unwrap();
    cfg["model_type"] = "mamba".into();
    cfg["architectures"] = serde_json::json!(["MambaForCausalLM"]);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    assert!(matches!(
        load(&t.hf).unwrap_err(),
        Error::UnsupportedArchitecture(_)
    ));
    // Heads that do not divide.
    let mut cfg: serde_json::Value = serde_json::from_str(&orig).unwrap();
    cfg["num_key_value_heads"] = 3.into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    assert!(matches!(load(&t.hf).unwrap_err(), Error::Config { .. }));
    std::fs::write(&cfg_path, &orig).unwrap();
    // Truncated safetensors.
    let st = t.hf.join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() / 2]).unwrap();
    let e = load(&t.hf).unwrap_err();
    assert!(matches!(e, Error::Weights { .. }), "{e}");
    // A folder that is not a model.
    let empty = tempfile::tempdir().unwrap();
    assert!(matches!(
        load(empty.path()).unwrap_err(),
        Error::Config { .. }
    ));
}

#[test]
fn sharded_safetensors_load() {
    let t = build(Spec::default());
    // Split the weights into two shards with an index.
    let all =
        candle_core::safetensors::load(t.hf.join("model.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    let mut a = std::collections::HashMap::new();
    let mut b = std::collections::HashMap::new();
    let mut map = serde_json::Map::new();
    for (i, (k, v)) in all.into_iter().enumerate() {
        if i % 2 == 0 {
            map.insert(k.clone(), "model-00001-of-00002.safetensors".into());
            a.insert(k, v);
        } else {
            map.insert(k.clone(), "model-00002-of-00002.safetensors".into());
            b.insert(k, v);
        }
    }
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(t.hf.join(f), dir.path().join(f)).unwrap();
    }
    candle_core::safetensors::save(&a, dir.path().join("model-00001-of-00002.safetensors"))
        .unwrap();
    candle_core::safetensors::save(&b, dir.path().join("model-00002-of-00002.safetensors"))
        .unwrap();
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        serde_json::json!({"weight_map": map}).to_string(),
    )
    .unwrap();
    let sharded = load(dir.path()).unwrap();
    let single = load(&t.hf).unwrap();
    let toks = [5u32, 6, 7, 8];
    let mut s1 = sharded.session(SessionOptions::default()).unwrap();
    let mut s2 = single.session(SessionOptions::default()).unwrap();
    s1.eval(&toks).unwrap();
    s2.eval(&toks).unwrap();
    assert_eq!(s1.logits().unwrap(), s2.logits().unwrap());
    // A missing shard is an I/O error naming it.
    std::fs::remove_file(dir.path().join("model-00002-of-00002.safetensors")).unwrap();
    let e = load(dir.path()).unwrap_err();
    assert!(e.to_string().contains("model-00002-of-00002"), "{e}");
}

#[test]
fn bad_tokens_and_overflow() {
    let t = build(Spec::default());
    let m = load(&t.gguf).unwrap();
    let mut s = m.session(SessionOptions::default().n_ctx(8)).unwrap();
    let e = s.eval(&[1, 2, 100_000]).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
    assert_eq!(s.len(), 0, "a rejected call leaves the session unchanged");
    let e = s.eval(&[1; 9]).unwrap_err();
    assert!(
        matches!(e, Error::ContextOverflow { needed: 9, max: 8 }),
        "{e}"
    );
    s.eval(&[1; 8]).unwrap();
    assert!(matches!(
        s.eval(&[1]).unwrap_err(),
        Error::ContextOverflow { .. }
    ));
    assert!(m.detokenize(&[100_000], false).is_err());
    assert!(m.session(SessionOptions::default().n_batch(0)).is_err());
}

/// Inputs the fuzzer (tests/fuzz.rs) found, kept as regression tests.
#[test]
fn fuzz_regressions_are_clean_errors() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz-regressions");
    // A tokenizer.json cut short inside its added tokens: the tokenizers crate panicked on it.
    let tok = dir.join("tokenizer-decoder-cut.json");
    let r = std::panic::catch_unwind(|| llama_core::Tokenizer::from_hf_files(&tok, None));
    assert!(
        matches!(r, Ok(Err(Error::Tokenizer(_)))),
        "a malformed tokenizer.json must be a Tokenizer error"
    );
    // A GBNF escape whose character is multi-byte (`\` then U+FFFD): the error's position
    // was computed inside the character and panicked.
    let g = String::from_utf8_lossy(
        &std::fs::read(dir.join("constraint-gbnf-escape-mid-char")).unwrap(),
    )
    .to_string();
    let r = llama_core::constrain::gbnf::gbnf_to_lark(&g, &|_| None);
    assert!(matches!(r, Err(Error::Grammar(m)) if m.contains("unknown escape")));
}

/// Every test of this file again in a child process whose address space is limited to 1 GiB:
/// lying headers (2^40-element tensors, huge counts and string lengths), corrupted files and
/// the fuzz regressions give errors without a large allocation (an allocation past the limit
/// would abort the child).
#[test]
fn the_bad_inputs_again_under_an_address_space_limit() {
    if std::env::var_os("LLAMA_UNDER_LIMIT").is_some() {
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new("bash")
        .arg("-c")
        .arg("ulimit -v 1048576 && exec \"$0\" --test-threads 1")
        .arg(&exe)
        .env("LLAMA_UNDER_LIMIT", "1")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "under a 1 GiB address-space limit: {}\n{}",
        text,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("test result: ok"), "{text}");
}
