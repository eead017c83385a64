//! LoRA adapters on tiny random models: PEFT folders and GGUF LoRA files, on Hugging Face and
//! GGUF bases, give the logits of an independent f64 reference run on the merged weights
//! `W + scale * B A`; sessions are independent; snapshots record adapters; conversion between
//! the formats keeps the logits; bad adapters give clear errors.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};
use common::tiny::{build, reference_logits, reference_logits_with, Rng, Spec, Tiny};
use common::{max_diff, max_diff32, rel_err};
use llama_core::convert::{write_gguf, GgufTensor};
use llama_core::{permute_rows_for_gguf, Adapter, KvCacheType, Model, SessionOptions, Target};

const TOKENS: [u32; 12] = [5, 40, 77, 100, 3, 250, 17, 64, 9, 120, 33, 200];

/// One projection's update: `(module, rank, scale, A [r, in], B [out, r])`, HF order.
type Pair = (String, usize, f64, Vec<f32>, Vec<f32>);

/// One adapter's matrices by HF module name.
#[derive(Clone, Default)]
struct Lora {
    pairs: Vec<Pair>,
}

/// `(module, out, in, GGUF name, permuted heads)` of each projection of layer `l`.
fn modules(s: &Spec, l: usize) -> Vec<(String, usize, usize, String, Option<usize>)> {
    let (h, hd, nh, nkv, ff) = (s.hidden, s.head_dim, s.heads, s.kv_heads, s.ff);
    [
        ("self_attn.q_proj", nh * hd, h, "attn_q", Some(nh)),
        ("self_attn.k_proj", nkv * hd, h, "attn_k", Some(nkv)),
        ("self_attn.v_proj", nkv * hd, h, "attn_v", None),
        ("self_attn.o_proj", h, nh * hd, "attn_output", None),
        ("mlp.gate_proj", ff, h, "ffn_gate", None),
        ("mlp.up_proj", ff, h, "ffn_up", None),
        ("mlp.down_proj", h, ff, "ffn_down", None),
    ]
    .into_iter()
    .map(|(m, o, i, g, p)| {
        (
            format!("model.layers.{l}.{m}"),
            o,
            i,
            format!("blk.{l}.{g}.weight"),
            p,
        )
    })
    .collect()
}

/// A random adapter on the modules `pick` accepts, `rank_scale(module)` giving each one's rank
/// and factor.
fn random_lora(
    s: &Spec,
    seed: u64,
    pick: impl Fn(&str) -> bool,
    rank_scale: impl Fn(&str) -> (usize, f64),
) -> Lora {
    let mut rng = Rng(seed);
    let mut lora = Lora::default();
    for l in 0..s.layers {
        for (m, out, inp, _, _) in modules(s, l) {
            if !pick(&m) {
                continue;
            }
            let (r, scale) = rank_scale(&m);
            let a = rng.vec(r * inp, 0.4, 0.0);
            let b = rng.vec(out * r, 0.4, 0.0);
            lora.pairs.push((m, r, scale, a, b));
        }
    }
    lora
}

/// The base weights plus `sum scale * B A` (f64 products, then f32 like the base).
fn merged(t: &Tiny, adapters: &[(&Lora, f64)]) -> HashMap<String, (Vec<usize>, Vec<f32>)> {
    let mut w = t.weights.clone();
    for (lora, user) in adapters {
        for (m, r, scale, a, b) in &lora.pairs {
            let (shape, vals) = w.get_mut(&format!("{m}.weight")).unwrap();
            let (out, inp) = (shape[0], shape[1]);
            for o in 0..out {
                for i in 0..inp {
                    let d: f64 = (0..*r)
                        .map(|j| b[o * r + j] as f64 * a[j * inp + i] as f64)
                        .sum();
                    let v = vals[o * inp + i] as f64 + user * scale * d;
                    vals[o * inp + i] = v as f32;
                }
            }
        }
    }
    w
}

fn write_peft_dir(dir: &Path, lora: &Lora, config: serde_json::Value) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("adapter_config.json"), config.to_string()).unwrap();
    let mut map = HashMap::new();
    for (m, r, _, a, b) in &lora.pairs {
        let inp = a.len() / r;
        let out = b.len() / r;
        map.insert(
            format!("base_model.model.{m}.lora_A.weight"),
            Tensor::from_vec(a.clone(), (*r, inp), &Device::Cpu).unwrap(),
        );
        map.insert(
            format!("base_model.model.{m}.lora_B.weight"),
            Tensor::from_vec(b.clone(), (out, *r), &Device::Cpu).unwrap(),
        );
    }
    candle_core::safetensors::save(&map, dir.join("adapter_model.safetensors")).unwrap();
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Writes `lora` as llama.cpp's converter would: Q/K `lora_b` rows permuted, `alpha` (0: none).
fn write_gguf_lora_file(path: &Path, s: &Spec, lora: &Lora, alpha: f32, dtype: GgmlDType) {
    let meta = common::adapter_gguf_meta(alpha);
    let mut tensors = vec![];
    for l in 0..s.layers {
        for (m, out, inp, gname, perm) in modules(s, l) {
            let Some((_, r, _, a, b)) = lora.pairs.iter().find(|p| p.0 == m) else {
                continue;
            };
            let mut bb = f32_bytes(b);
            if let Some(h) = perm {
                bb = permute_rows_for_gguf(&bb, out, h);
            }
            let enc = |bytes: Vec<u8>, shape: Vec<usize>| -> (Vec<u8>, GgmlDType) {
                if dtype == GgmlDType::F32 {
                    return (bytes, dtype);
                }
                // llama.cpp's converter keeps a matrix whose rows are not whole blocks in f16.
                let dtype = if shape[1].is_multiple_of(dtype.block_size()) {
                    dtype
                } else {
                    GgmlDType::F16
                };
                let vals: Vec<f32> = bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect();
                let t = Tensor::from_vec(vals, shape, &Device::Cpu).unwrap();
                let q = candle_core::quantized::QTensor::quantize(&t, dtype).unwrap();
                (q.data().unwrap().to_vec(), dtype)
            };
            let (ad, at) = enc(f32_bytes(a), vec![*r, inp]);
            let (bd, bt) = enc(bb, vec![out, *r]);
            tensors.push(GgufTensor {
                name: format!("{gname}.lora_a"),
                shape: vec![*r, inp],
                dtype: at,
                data: ad,
            });
            tensors.push(GgufTensor {
                name: format!("{gname}.lora_b"),
                shape: vec![out, *r],
                dtype: bt,
                data: bd,
            });
        }
    }
    write_gguf(path, &meta, &tensors).unwrap();
}

fn logits_with(m: &Model, adapters: &[(Adapter, f32)]) -> Vec<Vec<f32>> {
    let mut s = m
        .session(
            SessionOptions::default()
                .kv_type(KvCacheType::F32)
                .n_ctx(64),
        )
        .unwrap();
    s.set_adapters(adapters).unwrap();
    s.eval_all_logits(&TOKENS).unwrap()
}

/// Checks the adapters (already loaded on `m`) against the f64 reference of the merged weights,
/// and that they change the output.
fn check(name: &str, t: &Tiny, m: &Model, loaded: &[(Adapter, f32)], loras: &[(&Lora, f64)]) {
    let reference = reference_logits_with(&t.spec, &merged(t, loras), &TOKENS);
    let ours = logits_with(m, loaded);
    let d = max_diff(&ours, &reference);
    let base = reference_logits(t, &TOKENS);
    let changed = reference
        .iter()
        .flatten()
        .zip(base.iter().flatten())
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    println!("{name}: max |ours - f64 merged| {d:.2e}, adapter moved logits by up to {changed:.2}");
    assert!(d < 1e-4, "{name}: {d}");
    assert!(
        changed > 0.1,
        "{name}: the adapter barely changes the logits ({changed})"
    );
}

fn cfg(extra: serde_json::Value) -> serde_json::Value {
    let mut c = serde_json::json!({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4,
        "lora_alpha": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "bias": "none", "use_rslora": false});
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    c
}

#[test]
fn peft_adapters_match_the_merged_reference_on_both_bases() {
    let t = build(Spec::default());
    let s = t.spec.clone();
    let dir = tempfile::tempdir().unwrap();
    // Every target, r 4, alpha 8.
    let all = random_lora(&s, 1, |_| true, |_| (4, 2.0));
    let all_dir = dir.path().join("all");
    write_peft_dir(&all_dir, &all, cfg(serde_json::json!({})));
    // Q and K only (the rows GGUF permutes), as a list of names.
    let qk = random_lora(
        &s,
        2,
        |m| m.ends_with("q_proj") || m.ends_with("k_proj"),
        |_| (3, 5.0 / 3.0),
    );
    let qk_dir = dir.path().join("qk");
    write_peft_dir(
        &qk_dir,
        &qk,
        cfg(serde_json::json!({"r": 3, "lora_alpha": 5, "target_modules": ["q_proj", "k_proj"]})),
    );
    // rsLoRA with a regex target: alpha / sqrt(r).
    let rs = random_lora(
        &s,
        3,
        |m| m.ends_with("q_proj") || m.ends_with("v_proj") || m.ends_with("down_proj"),
        |_| (8, 6.0 / 8f64.sqrt()),
    );
    let rs_dir = dir.path().join("rslora");
    write_peft_dir(
        &rs_dir,
        &rs,
        cfg(
            serde_json::json!({"r": 8, "lora_alpha": 6, "use_rslora": true,
            "target_modules": ".*\\.(q_proj|v_proj|down_proj)"}),
        ),
    );
    // rank_pattern and alpha_pattern (PEFT's suffix matching, first key wins), all-linear,
    // one layer only.
    let rank_of = |m: &str| -> (usize, f64) {
        let r = if m.ends_with("k_proj") {
            2
        } else if m == "model.layers.1.mlp.up_proj" {
            6
        } else {
            4
        };
        let alpha = if m.ends_with("v_proj") { 3.0 } else { 8.0 };
        (r, alpha / r as f64)
    };
    let pat = random_lora(&s, 4, |m| m.starts_with("model.layers.1."), rank_of);
    let pat_dir = dir.path().join("patterns");
    write_peft_dir(
        &pat_dir,
        &pat,
        cfg(
            serde_json::json!({"target_modules": "all-linear", "layers_to_transform": [1],
            "rank_pattern": {"k_proj": 2, "model.layers.1.mlp.up_proj": 6},
            "alpha_pattern": {"v_proj": 3}}),
        ),
    );
    for (base, path) in [("hf", &t.hf), ("gguf", &t.gguf)] {
        let m = Model::load(path, common::options()).unwrap();
        let a_all = m.load_adapter(&all_dir).unwrap();
        assert_eq!(a_all.targets(), Target::ALL.to_vec());
        assert_eq!(a_all.max_rank(), 4);
        check(
            &format!("{base} all"),
            &t,
            &m,
            &[(a_all.clone(), 1.0)],
            &[(&all, 1.0)],
        );
        let a_qk = m.load_adapter(&qk_dir).unwrap();
        assert_eq!(a_qk.targets(), vec![Target::Q, Target::K]);
        check(
            &format!("{base} q,k"),
            &t,
            &m,
            &[(a_qk, 1.0)],
            &[(&qk, 1.0)],
        );
        let a_rs = m.load_adapter(&rs_dir).unwrap();
        check(
            &format!("{base} rslora"),
            &t,
            &m,
            &[(a_rs.clone(), 0.5)],
            &[(&rs, 0.5)],
        );
        let a_pat = m.load_adapter(&pat_dir).unwrap();
        assert_eq!(a_pat.n_matrices(), 7);
        check(
            &format!("{base} patterns"),
            &t,
            &m,
            &[(a_pat, 1.0)],
            &[(&pat, 1.0)],
        );
        // Two adapters at once, each with its scale.
        check(
            &format!("{base} two at once"),
            &t,
            &m,
            &[(a_all.clone(), 0.7), (a_rs.clone(), -1.5)],
            &[(&all, 0.7), (&rs, -1.5)],
        );
        // Scale 0 is exactly the base model.
        let plain = logits_with(&m, &[]);
        assert_eq!(logits_with(&m, &[(a_all.clone(), 0.0)]), plain);
    }
}

#[test]
fn gguf_lora_files_match_the_merged_reference() {
    let t = build(Spec::default());
    let s = t.spec.clone();
    let dir = tempfile::tempdir().unwrap();
    let lora = random_lora(&s, 9, |_| true, |_| (3, 2.0));
    // alpha 6, rank 3: factor 2 (llama.cpp's alpha / rank).
    let with_alpha = dir.path().join("alpha.gguf");
    write_gguf_lora_file(&with_alpha, &s, &lora, 6.0, GgmlDType::F32);
    // No alpha: the factor is the user's scale alone.
    let lora1 = random_lora(&s, 10, |m| !m.contains("mlp"), |_| (2, 1.0));
    let no_alpha = dir.path().join("noalpha.gguf");
    write_gguf_lora_file(&no_alpha, &s, &lora1, 0.0, GgmlDType::F32);
    // f16 matrices (llama.cpp's converter default).
    let half = dir.path().join("f16.gguf");
    write_gguf_lora_file(&half, &s, &lora, 6.0, GgmlDType::F16);
    let mut lora_h = lora.clone();
    for p in &mut lora_h.pairs {
        for v in p.3.iter_mut().chain(p.4.iter_mut()) {
            *v = half::f16::from_f32(*v).to_f32();
        }
    }
    // Q8_0 matrices (the converter's `--outtype q8_0`): rank 32 (`lora_b` rows of whole
    // blocks too) on attention, rank 16 on the MLP (`lora_b` stays f16).
    let lora_q = random_lora(
        &s,
        11,
        |_| true,
        |m| {
            if m.contains("mlp") {
                (16, 1.0)
            } else {
                (32, 1.0)
            }
        },
    );
    let q8 = dir.path().join("q8_0.gguf");
    write_gguf_lora_file(&q8, &s, &lora_q, 0.0, GgmlDType::Q8_0);
    let mut lora_q8 = lora_q.clone();
    for p in &mut lora_q8.pairs {
        let (r, a, b) = (p.1, &mut p.3, &mut p.4);
        let inp = a.len() / r;
        for (v, cols) in [(a, inp), (b, r)] {
            let t = Tensor::from_vec(v.clone(), (v.len() / cols, cols), &Device::Cpu).unwrap();
            *v = if cols.is_multiple_of(32) {
                let q = candle_core::quantized::QTensor::quantize(&t, GgmlDType::Q8_0).unwrap();
                q.dequantize(&Device::Cpu)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap()
            } else {
                v.iter().map(|x| half::f16::from_f32(*x).to_f32()).collect()
            };
        }
    }
    for (base, path) in [("hf", &t.hf), ("gguf", &t.gguf)] {
        let m = Model::load(path, common::options()).unwrap();
        // 8-bit storage: exactly the file's values, at 1.125 bytes each for the Q8_0 matrices.
        let q = m.load_adapter(&q8).unwrap();
        assert_eq!(q.dtype(), "mixed");
        let f16_bytes: usize = lora_q8
            .pairs
            .iter()
            .map(|p| 2 * (p.3.len() + p.4.len()))
            .sum();
        assert!(
            q.n_bytes() < f16_bytes * 3 / 4,
            "{} bytes, f16 would take {f16_bytes}",
            q.n_bytes()
        );
        check(
            &format!("{base} q8_0 gguf lora"),
            &t,
            &m,
            &[(q, 1.0)],
            &[(&lora_q8, 1.0)],
        );
        let a = m.load_adapter(&with_alpha).unwrap();
        assert_eq!(a.alpha(), Some(6.0));
        check(
            &format!("{base} gguf lora"),
            &t,
            &m,
            &[(a.clone(), 1.0)],
            &[(&lora, 1.0)],
        );
        let b = m.load_adapter(&no_alpha).unwrap();
        check(
            &format!("{base} gguf lora, no alpha"),
            &t,
            &m,
            &[(b.clone(), 0.8)],
            &[(&lora1, 0.8)],
        );
        check(
            &format!("{base} gguf two"),
            &t,
            &m,
            &[(a.clone(), 0.5), (b, 0.8)],
            &[(&lora, 0.5), (&lora1, 0.8)],
        );
        // f16 storage: exactly the f32 file's values rounded to f16.
        let h = m.load_adapter(&half).unwrap();
        check(
            &format!("{base} f16 gguf lora"),
            &t,
            &m,
            &[(h, 1.0)],
            &[(&lora_h, 1.0)],
        );
    }
}

#[test]
fn sessions_are_independent_and_snapshots_record_adapters() {
    let t = build(Spec::default());
    let s = t.spec.clone();
    let dir = tempfile::tempdir().unwrap();
    let l1 = random_lora(&s, 11, |_| true, |_| (4, 2.0));
    let l2 = random_lora(&s, 12, |m| m.contains("mlp"), |_| (4, 2.0));
    write_peft_dir(&dir.path().join("a"), &l1, cfg(serde_json::json!({})));
    write_peft_dir(&dir.path().join("b"), &l2, cfg(serde_json::json!({})));
    let m = Model::load(&t.gguf, common::options()).unwrap();
    let a = m.load_adapter(dir.path().join("a")).unwrap();
    let b = m.load_adapter(dir.path().join("b")).unwrap();
    let greedy = |adapters: Vec<(Adapter, f32)>| {
        let mut s = m
            .session(
                SessionOptions::default()
                    .kv_type(KvCacheType::F32)
                    .n_ctx(128),
            )
            .unwrap();
        s.set_adapters(&adapters).unwrap();
        s.eval(&TOKENS).unwrap();
        let mut out = vec![];
        for _ in 0..24 {
            let l = s.logits().unwrap();
            let next = (0..l.len()).max_by(|&i, &j| l[i].total_cmp(&l[j])).unwrap() as u32;
            out.push(next);
            s.eval(&[next]).unwrap();
        }
        out
    };
    let alone_a = greedy(vec![(a.clone(), 1.0)]);
    let alone_b = greedy(vec![(b.clone(), 1.0)]);
    let base = greedy(vec![]);
    assert_ne!(alone_a, base);
    assert_ne!(alone_b, base);
    // Two threads at once, each with its own adapter.
    let (ta, tb) = std::thread::scope(|sc| {
        let ha = sc.spawn(|| greedy(vec![(a.clone(), 1.0)]));
        let hb = sc.spawn(|| greedy(vec![(b.clone(), 1.0)]));
        (ha.join().unwrap(), hb.join().unwrap())
    });
    assert_eq!(ta, alone_a);
    assert_eq!(tb, alone_b);
    assert_eq!(greedy(vec![]), base, "the model itself is untouched");

    // Switching between evaluations changes only what comes next.
    let mut s1 = m
        .session(
            SessionOptions::default()
                .kv_type(KvCacheType::F32)
                .n_ctx(64),
        )
        .unwrap();
    s1.set_adapters(&[(a.clone(), 1.0)]).unwrap();
    s1.eval(&TOKENS[..6]).unwrap();
    s1.set_adapters(&[(b.clone(), 0.5)]).unwrap();
    s1.eval(&TOKENS[6..]).unwrap();
    let logits = s1.logits().unwrap().to_vec();
    // Snapshot: records the adapters, and restoring brings them back.
    let snap = s1.save_state(None).unwrap();
    let (mut r, _) = llama_core::Session::restore(&m, &snap).unwrap();
    assert_eq!(r.adapters().len(), 1);
    assert_eq!(r.adapters()[0].0.fingerprint(), b.fingerprint());
    assert_eq!(r.adapters()[0].1, 0.5);
    assert_eq!(r.logits().unwrap(), &logits[..]);
    let mut f = s1.fork().unwrap();
    s1.eval(&[7]).unwrap();
    r.eval(&[7]).unwrap();
    f.eval(&[7]).unwrap();
    assert_eq!(r.logits(), s1.logits());
    assert_eq!(f.logits(), s1.logits());
    // The same model file loaded again has no adapters loaded: restore refuses.
    let m2 = Model::load(&t.gguf, common::options()).unwrap();
    let e = llama_core::Session::restore(&m2, &snap)
        .unwrap_err()
        .to_string();
    assert!(e.contains("not loaded"), "{e}");
    let _b2 = m2.load_adapter(dir.path().join("b")).unwrap();
    assert!(llama_core::Session::restore(&m2, &snap).is_ok());
    // An adapter of another model is refused.
    let other = build(Spec {
        layers: 3,
        ..Spec::default()
    });
    let mo = Model::load(&other.gguf, common::options()).unwrap();
    let mut so = mo.session(SessionOptions::default()).unwrap();
    let e = so
        .set_adapters(&[(a.clone(), 1.0)])
        .unwrap_err()
        .to_string();
    assert!(e.contains("another model"), "{e}");
    let e = s1.set_adapters(&[(a, f32::NAN)]).unwrap_err().to_string();
    assert!(e.contains("not finite"), "{e}");
}

#[test]
fn conversion_between_formats_keeps_the_logits() {
    let t = build(Spec::default());
    let s = t.spec.clone();
    let dir = tempfile::tempdir().unwrap();
    let m = Model::load(&t.gguf, common::options()).unwrap();
    let cfgd = m.config().clone();
    // rsLoRA with an alpha pattern: no single GGUF alpha expresses it, so factors are folded.
    let lora = random_lora(&s, 21, |_| true, |_| (4, 1.0));
    let src = dir.path().join("peft");
    write_peft_dir(
        &src,
        &lora,
        cfg(serde_json::json!({"use_rslora": true, "alpha_pattern": {"q_proj": 2}})),
    );
    let a = m.load_adapter(&src).unwrap();
    let want = logits_with(&m, &[(a.clone(), 0.9)]);
    let gg = dir.path().join("conv.gguf");
    llama_core::lora::write_gguf_lora(&gg, &a, &cfgd).unwrap();
    let g = llama_core::gguf::GgufFile::open(&gg).unwrap();
    assert_eq!(g.get("adapter.lora.alpha").unwrap().as_f64(), Some(0.0));
    let back = m.load_adapter(&gg).unwrap();
    assert!(max_diff32(&logits_with(&m, &[(back.clone(), 0.9)]), &want) < 1e-5);
    // And to PEFT again (rank and alpha patterns reproduce every factor).
    let peft2 = dir.path().join("peft2");
    llama_core::lora::write_peft(&peft2, &back, "tiny").unwrap();
    let again = m.load_adapter(&peft2).unwrap();
    assert!(max_diff32(&logits_with(&m, &[(again, 0.9)]), &want) < 1e-5);
    // A plain adapter keeps one alpha in GGUF.
    let plain = random_lora(
        &s,
        22,
        |_| true,
        |m| {
            (
                if m.ends_with("k_proj") { 2 } else { 4 },
                8.0 / if m.ends_with("k_proj") { 2.0 } else { 4.0 },
            )
        },
    );
    let src2 = dir.path().join("plain");
    write_peft_dir(
        &src2,
        &plain,
        cfg(serde_json::json!({"rank_pattern": {"k_proj": 2}})),
    );
    let p = m.load_adapter(&src2).unwrap();
    let gg2 = dir.path().join("plain.gguf");
    llama_core::lora::write_gguf_lora(&gg2, &p, &cfgd).unwrap();
    let g2 = llama_core::gguf::GgufFile::open(&gg2).unwrap();
    assert_eq!(g2.get("adapter.lora.alpha").unwrap().as_f64(), Some(8.0));
    let p2 = m.load_adapter(&gg2).unwrap();
    assert!(
        max_diff32(
            &logits_with(&m, &[(p2, 1.0)]),
            &logits_with(&m, &[(p, 1.0)])
        ) < 1e-5
    );
}

#[test]
fn bad_adapters_give_clear_errors() {
    let t = build(Spec::default());
    let s = t.spec.clone();
    let m = Model::load(&t.hf, common::options()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let lora = random_lora(&s, 5, |m| m.ends_with("q_proj"), |_| (4, 2.0));
    let err = |name: &str, config: serde_json::Value, lora: &Lora| -> String {
        let d = dir.path().join(name);
        write_peft_dir(&d, lora, config);
        m.load_adapter(&d).unwrap_err().to_string()
    };
    let cases: Vec<(&str, serde_json::Value, &str)> = vec![
        ("dora", serde_json::json!({"use_dora": true}), "DoRA"),
        (
            "mts",
            serde_json::json!({"modules_to_save": ["lm_head"]}),
            "modules_to_save",
        ),
        ("bias", serde_json::json!({"bias": "all"}), "bias"),
        (
            "ptype",
            serde_json::json!({"peft_type": "IA3"}),
            "peft_type",
        ),
        ("rank", serde_json::json!({"r": 8}), "rank 4"),
        (
            "untargeted",
            serde_json::json!({"target_modules": ["v_proj"]}),
            "not targeted",
        ),
        (
            "regex",
            serde_json::json!({"target_modules": "(unclosed"}),
            "invalid regex",
        ),
        (
            "alpha",
            serde_json::json!({"lora_alpha": "big"}),
            "lora_alpha",
        ),
    ];
    for (name, extra, want) in cases {
        let e = err(name, cfg(extra), &lora);
        assert!(e.contains(want), "{name}: {e}");
    }
    // Shapes that do not fit the base, named by tensor.
    let mut bad = lora.clone();
    bad.pairs[0].3.truncate(4 * 10);
    let e = err("shape", cfg(serde_json::json!({})), &bad);
    assert!(e.contains("q_proj") && e.contains("expected"), "{e}");
    // lm_head, DoRA magnitude and bias tensors.
    for (tensor, want) in [
        ("base_model.model.lm_head.lora_A.weight", "lm_head"),
        (
            "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector",
            "DoRA",
        ),
        (
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias",
            "bias",
        ),
    ] {
        let d = dir.path().join(tensor.replace('.', "_"));
        write_peft_dir(&d, &lora, cfg(serde_json::json!({})));
        let mut map: HashMap<String, Tensor> =
            candle_core::safetensors::load(d.join("adapter_model.safetensors"), &Device::Cpu)
                .unwrap();
        map.insert(
            tensor.into(),
            Tensor::zeros((4, 64), candle_core::DType::F32, &Device::Cpu).unwrap(),
        );
        candle_core::safetensors::save(&map, d.join("adapter_model.safetensors")).unwrap();
        let e = m.load_adapter(&d).unwrap_err().to_string();
        assert!(e.contains(want), "{tensor}: {e}");
    }
    // A lone lora_A.
    let d = dir.path().join("lone");
    write_peft_dir(&d, &lora, cfg(serde_json::json!({})));
    let mut map: HashMap<String, Tensor> =
        candle_core::safetensors::load(d.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    map.remove("base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight");
    candle_core::safetensors::save(&map, d.join("adapter_model.safetensors")).unwrap();
    let e = m.load_adapter(&d).unwrap_err().to_string();
    assert!(e.contains("missing"), "{e}");
    // Not a folder with the files; pickle only.
    let d = dir.path().join("pickle");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(
        d.join("adapter_config.json"),
        cfg(serde_json::json!({})).to_string(),
    )
    .unwrap();
    std::fs::write(d.join("adapter_model.bin"), b"pickle").unwrap();
    let e = m.load_adapter(&d).unwrap_err().to_string();
    assert!(e.contains("pickle"), "{e}");
    let e = m
        .load_adapter(dir.path().join("nothing-here"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("nothing-here"), "{e}");
    // A model file is not an adapter; an adapter of another shape is refused.
    let e = m.load_adapter(&t.gguf).unwrap_err().to_string();
    assert!(e.contains("not a LoRA adapter"), "{e}");
    let other = build(Spec {
        hidden: 32,
        ff: 48,
        ..Spec::default()
    });
    let other_lora = random_lora(&other.spec, 6, |_| true, |_| (2, 1.0));
    let p = dir.path().join("other.gguf");
    write_gguf_lora_file(&p, &other.spec, &other_lora, 0.0, GgmlDType::F32);
    let e = m.load_adapter(&p).unwrap_err().to_string();
    assert!(e.contains("expected") && e.contains("attn_q"), "{e}");
}

fn flat(v: Vec<Vec<f32>>) -> Vec<f32> {
    v.concat()
}

#[test]
fn adapters_apply_on_quantized_bases() {
    let t = build(Spec::kquant_sized(256, 17));
    let s = t.spec.clone();
    let g = llama_core::gguf::GgufFile::open(&t.gguf).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let lora = random_lora(&s, 31, |_| true, |_| (8, 0.25));
    let ad = dir.path().join("peft");
    write_peft_dir(
        &ad,
        &lora,
        cfg(serde_json::json!({"r": 8, "lora_alpha": 2})),
    );
    for dtype in [
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q8_0,
        GgmlDType::Q4K,
        GgmlDType::Q6K,
        GgmlDType::Q5K,
        GgmlDType::F16,
        GgmlDType::BF16,
    ] {
        let (p, pd) = common::tiny::write_quantized_pair(&g, dtype, dir.path());
        let q = Model::load(&p, common::options()).unwrap();
        let d = Model::load(&pd, common::options()).unwrap();
        let (qa, da) = (q.load_adapter(&ad).unwrap(), d.load_adapter(&ad).unwrap());
        let (q0, d0) = (flat(logits_with(&q, &[])), flat(logits_with(&d, &[])));
        let (q1, d1) = (
            flat(logits_with(&q, &[(qa, 1.0)])),
            flat(logits_with(&d, &[(da, 1.0)])),
        );
        // What the adapter changes on the quantized base is what it changes on the same
        // weights dequantized (up to the 8-bit rounding of activations the kernels do).
        let dq: Vec<f32> = q1.iter().zip(&q0).map(|(a, b)| a - b).collect();
        let dd: Vec<f32> = d1.iter().zip(&d0).map(|(a, b)| a - b).collect();
        let moved = rel_err(&d1, &d0);
        let e = rel_err(&dq, &dd);
        println!("{dtype:?}: the adapter moves logits by {moved:.3} (relative); quantized vs dequantized change {e:.4}");
        assert!(moved > 0.1, "{dtype:?}: {moved}");
        assert!(e < 0.15, "{dtype:?}: {e}");
    }
}

#[test]
fn merged_models_equal_run_time_adapters() {
    use llama_core::quantize::{merge_model, FileType, QuantizeOptions};
    let t = build(Spec::default());
    let s = t.spec.clone();
    let dir = tempfile::tempdir().unwrap();
    let l1 = random_lora(&s, 41, |_| true, |_| (4, 2.0));
    let l2 = random_lora(&s, 42, |m| m.contains("self_attn"), |_| (2, 1.0));
    write_peft_dir(&dir.path().join("a"), &l1, cfg(serde_json::json!({})));
    let p2 = dir.path().join("b.gguf");
    write_gguf_lora_file(&p2, &s, &l2, 0.0, GgmlDType::F32);
    for (base, path) in [("hf", &t.hf), ("gguf", &t.gguf)] {
        let m = Model::load(path, common::options()).unwrap();
        let set = vec![
            (m.load_adapter(dir.path().join("a")).unwrap(), 0.8f32),
            (m.load_adapter(&p2).unwrap(), -0.6),
        ];
        let want = logits_with(&m, &set);
        let out = dir.path().join(format!("{base}-merged.gguf"));
        merge_model(
            path,
            &out,
            &QuantizeOptions::new(FileType::F32),
            &set,
            |_, _| {},
        )
        .unwrap();
        let merged = Model::load(&out, common::options()).unwrap();
        let d = max_diff32(&logits_with(&merged, &[]), &want);
        println!("{base}: merged GGUF vs run-time adapters {d:.2e}");
        assert!(d < 1e-4, "{base}: merged gguf {d}");
        let hf_out = dir.path().join(format!("{base}-merged-hf"));
        llama_core::convert::export_hf(path, &hf_out, FileType::F32, &set, |_, _| {}).unwrap();
        let merged = Model::load(&hf_out, common::options()).unwrap();
        let d = max_diff32(&logits_with(&merged, &[]), &want);
        println!("{base}: merged HF folder vs run-time adapters {d:.2e}");
        assert!(d < 1e-4, "{base}: merged hf {d}");
        // Quantized output: runs, and stays near the merged f32 logits.
        let q = dir.path().join(format!("{base}-merged-q8.gguf"));
        let qt = FileType::parse("q8_0").unwrap();
        merge_model(path, &q, &QuantizeOptions::new(qt), &set, |_, _| {}).unwrap();
        let mq = Model::load(&q, common::options()).unwrap();
        let e = rel_err(&flat(logits_with(&mq, &[])), &flat(want.clone()));
        assert!(e < 0.1, "{base}: q8_0 merge relative error {e}");
    }
}

#[test]
fn adapters_apply_on_every_kv_cache_type() {
    // Head size 64: block caches need a multiple of 32. q8_0 weights: each row gets the same
    // bits whatever rows share the pass (so one token at a time equals the prompt at once).
    let t = build(Spec {
        hidden: 128,
        heads: 4,
        kv_heads: 2,
        head_dim: 64,
        ..Default::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let lora = random_lora(&t.spec, 51, |_| true, |_| (4, 0.5));
    let ad = dir.path().join("peft");
    write_peft_dir(
        &ad,
        &lora,
        cfg(serde_json::json!({"r": 4, "lora_alpha": 2})),
    );
    let m = Model::load(
        &t.gguf,
        common::options().with_quantize(llama_core::QuantType::Q8_0),
    )
    .unwrap();
    let a = m.load_adapter(&ad).unwrap();
    let run = |kv: KvCacheType, adapters: &[(Adapter, f32)], n_batch: usize| {
        let mut s = m
            .session(
                SessionOptions::default()
                    .kv_type(kv)
                    .n_ctx(64)
                    .n_batch(n_batch),
            )
            .unwrap();
        s.set_adapters(adapters).unwrap();
        flat(s.eval_all_logits(&TOKENS).unwrap())
    };
    let exact = run(KvCacheType::F32, &[(a.clone(), 1.0)], 512);
    // The adapter moves the logits by about 1 (relative): a cache that dropped it would be
    // that far from the f32 cache's; the caches' own rounding is far below (random tiny models
    // amplify it: uniform values, not the outlier-heavy rows the rotation is for).
    for (kv, tol) in [
        (KvCacheType::F16, 0.05),
        (KvCacheType::Q8_0, 0.1),
        (KvCacheType::Q4_0, 0.6),
    ] {
        let with = run(kv, &[(a.clone(), 1.0)], 512);
        let without = run(kv, &[], 512);
        let moved = rel_err(&with, &without);
        let e = rel_err(&with, &exact);
        println!("{kv}: the adapter moves logits by {moved:.3}; {e:.4} from an f32 cache");
        assert!(moved > 0.1, "{kv}: {moved}");
        assert!(e < tol, "{kv}: {e}");
        assert_eq!(
            run(kv, &[(a.clone(), 1.0)], 1),
            with,
            "{kv}: one token at a time"
        );
    }
}
