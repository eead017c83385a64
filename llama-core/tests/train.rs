//! LoRA training: every gradient of the training pass against central finite differences of an
//! independent f64 forward pass of the loss, on tiny models in both formats and on a quantized
//! base (its dequantized weights in the reference).

mod common;

use std::collections::HashMap;

use candle_core::quantized::GgmlDType;
use candle_core::Device;
use common::tiny::{build, reference_logits_lora, Lora64, Spec, Tiny};
use llama_core::train::{teacher_top_k, LoraConfig, LoraParams, LossInput};
use llama_core::{Kernel, Model, ModelOptions, Target};

type Weights = HashMap<String, (Vec<usize>, Vec<f32>)>;

fn to64(p: &LoraParams) -> Lora64 {
    p.layers
        .iter()
        .map(|l| {
            l.iter()
                .map(|p| {
                    p.as_ref().map(|p| {
                        (
                            p.a.iter().map(|&v| v as f64).collect(),
                            p.b.iter().map(|&v| v as f64).collect(),
                        )
                    })
                })
                .collect()
        })
        .collect()
}

/// The summed next-token loss over the scored positions, in f64, with LoRA.
fn loss64(
    spec: &Spec,
    w: &Weights,
    lora: &Lora64,
    s: f64,
    r: usize,
    tokens: &[u32],
    score: &[bool],
) -> f64 {
    loss64_with(spec, w, lora, s, r, tokens, score, None)
}

/// [`loss64`], or with teacher distributions per scored position: `-sum p log q`.
#[allow(clippy::too_many_arguments)]
fn loss64_with(
    spec: &Spec,
    w: &Weights,
    lora: &Lora64,
    s: f64,
    _r: usize,
    tokens: &[u32],
    score: &[bool],
    teacher: Option<&[Vec<(u32, f32)>]>,
) -> f64 {
    let rows = reference_logits_lora(spec, w, Some((lora, s)), tokens);
    let mut loss = 0.0;
    let mut n = 0;
    for (i, logits) in rows.iter().enumerate().take(tokens.len() - 1) {
        if !score[i] {
            continue;
        }
        let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = logits.iter().map(|v| (v - m).exp()).sum();
        let lse = m + z.ln();
        loss += match teacher {
            None => lse - logits[tokens[i + 1] as usize],
            Some(d) => d[n]
                .iter()
                .map(|&(id, p)| p as f64 * (lse - logits[id as usize]))
                .sum(),
        };
        n += 1;
    }
    loss
}

/// Random LoRA values (B non-zero, or every gradient of A would be zero).
fn random_params(m: &Model, rank: usize, seed: u64) -> LoraParams {
    let cfg = LoraConfig {
        rank,
        alpha: 3.0,
        targets: Target::ALL.to_vec(),
        rslora: false,
    };
    let mut p = LoraParams::new(m, cfg, seed).unwrap();
    let mut st = seed.wrapping_mul(6364136223846793005) | 1;
    p.for_each_mut(|v| {
        for x in v.iter_mut() {
            st = st
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            *x = ((st >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.6;
        }
    });
    p
}

/// Checks every gradient of the training pass on `m` against central differences of the f64
/// loss over weights `w` (HF names and order).
fn check(name: &str, t: &Tiny, m: &Model, w: &Weights) {
    let tokens: Vec<u32> = vec![5, 40, 77, 100, 3, 250, 17, 64, 9, 120];
    // The loss on the second half only, as a completion mask would.
    let score: Vec<bool> = (0..tokens.len() - 1).map(|i| i >= 3).collect();
    let p = random_params(m, 2, 11);
    let (s, r) = (p.config.scale() as f64, p.config.rank);
    let g = p
        .loss_and_grads(m, &LossInput::new(&tokens, &score))
        .unwrap();
    let base = to64(&p);
    let l0 = loss64(&t.spec, w, &base, s, r, &tokens, &score);
    println!("{name}: loss {} vs f64 {l0}", g.loss_sum);
    assert!(
        ((g.loss_sum - l0) / l0).abs() < 1e-5,
        "{name}: loss {} vs f64 {l0}",
        g.loss_sum
    );
    assert_eq!(g.n_scored, 6);
    // Small enough that the third-order term of the central difference stays far below the
    // tolerance (the loss is f64, so rounding is ~1e-13 of it).
    let eps = 1e-4;
    let (mut worst, mut n) = (0f64, 0usize);
    let mut analytic = vec![];
    g.grads
        .for_each(|v| analytic.extend(v.iter().map(|&x| x as f64)));
    let mut fds = vec![];
    for l in 0..base.len() {
        for ti in 0..7 {
            for which in 0..2 {
                let len =
                    base[l][ti]
                        .as_ref()
                        .map_or(0, |(a, b)| if which == 0 { a.len() } else { b.len() });
                for i in 0..len {
                    let mut plus = base.clone();
                    let mut minus = base.clone();
                    {
                        let (a, b) = plus[l][ti].as_mut().unwrap();
                        if which == 0 {
                            a[i] += eps
                        } else {
                            b[i] += eps
                        }
                        let (a, b) = minus[l][ti].as_mut().unwrap();
                        if which == 0 {
                            a[i] -= eps
                        } else {
                            b[i] -= eps
                        }
                    }
                    let fd = (loss64(&t.spec, w, &plus, s, r, &tokens, &score)
                        - loss64(&t.spec, w, &minus, s, r, &tokens, &score))
                        / (2.0 * eps);
                    fds.push(fd);
                }
            }
        }
    }
    assert_eq!(fds.len(), analytic.len());
    let big = fds.iter().fold(0f64, |m, v| m.max(v.abs()));
    let mut worst_at = (0usize, 0f64, 0f64);
    for (i, (a, fd)) in analytic.iter().zip(&fds).enumerate() {
        // Relative to the difference itself, or for the smallest gradients (where f32 rounding
        // of large cancelling terms dominates) to 1% of the largest.
        let e = (a - fd).abs() / fd.abs().max(1e-2 * big);
        if e > worst {
            worst_at = (i, *a, *fd);
        }
        worst = worst.max(e);
        n += 1;
    }
    println!(
        "{name}: {n} gradients, largest relative error {worst:.2e} at #{} (analytic {:.6}, central difference {:.6}; largest gradient {big:.3})",
        worst_at.0, worst_at.1, worst_at.2
    );
    assert!(worst < 1e-3, "{name}: relative error {worst}");
}

fn weights_from_hf(dir: &std::path::Path) -> Weights {
    let map = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    map.into_iter()
        .map(|(k, v)| {
            let shape = v.dims().to_vec();
            let vals = v
                .to_dtype(candle_core::DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            (k, (shape, vals))
        })
        .collect()
}

#[test]
fn lora_gradients_match_finite_differences() {
    let t = build(Spec::default());
    let hf = Model::load(&t.hf, common::options()).unwrap();
    check("hf f32", &t, &hf, &t.weights);
    let gg = Model::load(&t.gguf, common::options()).unwrap();
    check("gguf f32", &t, &gg, &t.weights);
}

#[test]
fn lora_gradients_through_a_quantized_base() {
    // Inner widths of 64 fit the 32-value blocks; the reference runs the dequantized weights.
    let t = build(Spec::default());
    let g = llama_core::gguf::GgufFile::open(&t.gguf).unwrap();
    let meta = common::tiny::metadata(&g);
    for dtype in [GgmlDType::Q8_0, GgmlDType::Q4_0] {
        let tensors: Vec<_> = g
            .tensor_order
            .iter()
            .map(|name| common::tiny::stored_as(&g, name, dtype).0)
            .collect();
        let p = t.dir.path().join(format!("{dtype:?}.gguf"));
        llama_core::convert::write_gguf(&p, &meta, &tensors).unwrap();
        let out = t.dir.path().join(format!("{dtype:?}-hf"));
        llama_core::convert::gguf_to_hf(&p, &out, llama_core::convert::DenseType::F32, |_, _| {})
            .unwrap();
        let w = weights_from_hf(&out);
        let m = Model::load(&p, common::options()).unwrap();
        assert_eq!(m.weight_type(), format!("{dtype:?}"));
        check(&format!("{dtype:?}"), &t, &m, &w);
        // On AVX-512 the products above ran on the packed kernels; AVX2 takes the `gemm`
        // crate's and the weights' rows dequantized whole.
        if m.kernel() == Kernel::Avx512 && Kernel::Avx2.is_supported() {
            let m2 = Model::load(&p, ModelOptions::default().with_kernel(Kernel::Avx2)).unwrap();
            check(&format!("{dtype:?} avx2"), &t, &m2, &w);
        }
    }
}

fn write(dir: &std::path::Path, name: &str, lines: &[String]) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, lines.join("\n")).unwrap();
    p
}

fn tiny_data(n: usize) -> Vec<String> {
    // The tiny vocabulary knows bytes and a few words: a fixed completion per prompt.
    (0..n)
        .map(|i| {
            serde_json::json!({"prompt": format!("hello {i}"), "completion": format!(" world {}", i % 3)})
                .to_string()
        })
        .collect()
}

#[test]
fn training_lowers_the_loss_and_resumes_exactly() {
    use llama_core::train::{load_jsonl, TrainOptions, Trainer};
    let t = build(Spec::default());
    let m = Model::load(&t.gguf, common::options()).unwrap();
    let data = write(t.dir.path(), "train.jsonl", &tiny_data(12));
    let train = load_jsonl(&m, &data, 64).unwrap();
    assert_eq!(train.len(), 12);
    // The prompt is not scored, the completion and EOS are.
    let ex = &train[0];
    assert!(!ex.score[0] && *ex.score.last().unwrap());
    let opts = TrainOptions::default()
        .lr(5e-3)
        .epochs(3)
        .batch(2)
        .grad_accum(2)
        .warmup(2)
        .seed(7);
    let mut full = Trainer::new(&m, train.clone(), opts.clone()).unwrap();
    assert_eq!(full.total_steps(), 9);
    let before = full.evaluate(&train).unwrap().loss;
    let mut reports = vec![];
    while let Some(r) = full.step().unwrap() {
        reports.push(r);
    }
    let after = full.evaluate(&train).unwrap().loss;
    println!("tiny training: loss {before:.4} -> {after:.4}");
    assert!(after < 0.7 * before, "{before} -> {after}");
    assert!(reports[0].lr < reports[1].lr, "warmup");
    assert!(reports.last().unwrap().lr < reports[2].lr, "cosine decay");
    // Interrupted after 4 steps, checkpointed, resumed in a new trainer: the same matrices.
    let mut a = Trainer::new(&m, train.clone(), opts.clone()).unwrap();
    for _ in 0..4 {
        a.step().unwrap();
    }
    let ck = t.dir.path().join("ckpt");
    a.save_checkpoint(&ck).unwrap();
    drop(a);
    let mut b = Trainer::resume(&m, train.clone(), &ck).unwrap();
    assert_eq!(b.step_count(), 4);
    while b.step().unwrap().is_some() {}
    assert_eq!(
        b.params(),
        full.params(),
        "resume equals the uninterrupted run"
    );
    // The same seed gives the same run; another seed another one.
    let mut c = Trainer::new(&m, train.clone(), opts.clone().seed(8)).unwrap();
    while c.step().unwrap().is_some() {}
    assert_ne!(c.params(), full.params());
    // A checkpoint of another model or another data size is refused.
    let other = build(Spec {
        layers: 3,
        ..Spec::default()
    });
    let mo = Model::load(&other.gguf, common::options()).unwrap();
    let e = Trainer::resume(&mo, load_jsonl(&mo, &data, 64).unwrap(), &ck)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("another model"), "{e}");
    let e = Trainer::resume(&m, train[..5].to_vec(), &ck)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("training set"), "{e}");
    // Cancellation stops a step and leaves the trainer as it was.
    let mut d = Trainer::new(&m, train.clone(), opts.clone()).unwrap();
    d.cancel_flag()
        .store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(matches!(d.step(), Err(llama_core::Error::Cancelled)));
    assert_eq!(d.step_count(), 0);
    assert!(d.step().unwrap().is_some());
    // The trained adapter runs in a session and changes the output.
    let a = full.params().to_adapter(&m, "trained").unwrap();
    let mut s = m.session(llama_core::SessionOptions::default()).unwrap();
    s.eval(&ex.tokens).unwrap();
    let base = s.logits().unwrap().to_vec();
    let mut s2 = m.session(llama_core::SessionOptions::default()).unwrap();
    s2.set_adapters(&[(a, 1.0)]).unwrap();
    s2.eval(&ex.tokens).unwrap();
    assert_ne!(s2.logits().unwrap(), &base[..]);
}

#[test]
fn bad_training_data_names_the_line() {
    use llama_core::train::load_jsonl;
    let t = build(Spec::default());
    let m = Model::load(&t.gguf, common::options()).unwrap();
    let d = t.dir.path();
    let ok = tiny_data(1)[0].clone();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec![ok.clone(), "{not json".into()], ":2: not valid JSON"),
        (
            vec![ok.clone(), "[1, 2]".into()],
            ":2: each line must be a JSON object",
        ),
        (
            vec![r#"{"prompt": "a"}"#.into()],
            ":1: `completion` must be a string",
        ),
        (vec![r#"{"foo": "a"}"#.into()], ":1: expected"),
        (
            vec![
                ok.clone(),
                "".into(),
                format!(r#"{{"text": "{}"}}"#, "hello ".repeat(40)),
            ],
            ":3:",
        ),
        (
            vec![r#"{"messages": [{"role": "user", "content": "hi"}]}"#.into()],
            "assistant",
        ),
        (
            vec![r#"{"messages": [{"role": "user"}]}"#.into()],
            "`role` and `content`",
        ),
        (vec!["".into(), "   ".into()], "holds no examples"),
    ];
    for (i, (lines, want)) in cases.iter().enumerate() {
        let p = write(d, &format!("bad{i}.jsonl"), lines);
        let e = load_jsonl(&m, &p, 32).unwrap_err().to_string();
        assert!(e.contains(want), "case {i}: {e}");
    }
    // An empty completion still teaches the end of the answer (EOS is scored).
    let p = write(
        d,
        "empty.jsonl",
        &[r#"{"prompt": "a", "completion": ""}"#.into()],
    );
    assert_eq!(load_jsonl(&m, &p, 32).unwrap()[0].n_scored(), 1);
    std::fs::write(d.join("utf8.jsonl"), b"{\"text\": \"ok\"}\n\xff\xfe\n").unwrap();
    let e = load_jsonl(&m, &d.join("utf8.jsonl"), 32)
        .unwrap_err()
        .to_string();
    assert!(e.contains(":2: not valid UTF-8"), "{e}");
    assert!(load_jsonl(&m, &d.join("missing.jsonl"), 32).is_err());
    // A conversation: only the assistant turns are scored.
    let conv = r#"{"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]}"#;
    let p = write(d, "conv.jsonl", &[conv.into()]);
    let ex = &load_jsonl(&m, &p, 64).unwrap()[0];
    let n = ex.n_scored();
    assert!(n > 0 && n < ex.score.len(), "{n} of {}", ex.score.len());
    assert!(!ex.score[0]);
}

#[test]
fn distillation_gradients_and_learning() {
    use llama_core::train::{load_jsonl, TrainOptions, Trainer};
    let t = build(Spec::default());
    let m = Model::load(&t.gguf, common::options()).unwrap();
    // A teacher with other weights and the same vocabulary.
    let tt = build(Spec {
        seed: 99,
        ..Spec::default()
    });
    let teacher = Model::load(&tt.gguf, common::options()).unwrap();
    let tokens: Vec<u32> = vec![5, 40, 77, 100, 3, 250, 17, 64, 9, 120];
    let score: Vec<bool> = (0..tokens.len() - 1).map(|i| i >= 3).collect();
    let dists = teacher_top_k(&teacher, &tokens, &score, 8).unwrap();
    assert_eq!(dists.len(), 6);
    assert!(dists
        .iter()
        .all(|d| d.len() == 8 && (d.iter().map(|x| x.1).sum::<f32>() - 1.0).abs() < 1e-5));
    // Gradients against central differences of the f64 distillation loss (every 7th value).
    let p = random_params(&m, 2, 5);
    let (s, r) = (p.config.scale() as f64, p.config.rank);
    let g = p
        .loss_and_grads(&m, &LossInput::new(&tokens, &score).distilled(&dists))
        .unwrap();
    let base = to64(&p);
    let f = |q: &Lora64| loss64_with(&t.spec, &t.weights, q, s, r, &tokens, &score, Some(&dists));
    let l0 = f(&base);
    assert!(
        ((g.loss_sum - l0) / l0).abs() < 1e-5,
        "{} vs {l0}",
        g.loss_sum
    );
    let mut analytic = vec![];
    g.grads
        .for_each(|v| analytic.extend(v.iter().map(|&x| x as f64)));
    let eps = 1e-4;
    let (mut at, mut pairs) = (0usize, vec![]);
    for l in 0..base.len() {
        for ti in 0..7 {
            let Some((a, b)) = &base[l][ti] else { continue };
            for (which, len) in [(0, a.len()), (1, b.len())] {
                for i in (0..len).step_by(7) {
                    let (mut plus, mut minus) = (base.clone(), base.clone());
                    let bump = |q: &mut Lora64, d: f64| {
                        let (a, b) = q[l][ti].as_mut().unwrap();
                        if which == 0 {
                            a[i] += d
                        } else {
                            b[i] += d
                        }
                    };
                    bump(&mut plus, eps);
                    bump(&mut minus, -eps);
                    pairs.push((analytic[at + i], (f(&plus) - f(&minus)) / (2.0 * eps)));
                }
                at += len;
            }
        }
    }
    let big = pairs.iter().fold(0f64, |m, p| m.max(p.1.abs()));
    let worst = pairs
        .iter()
        .map(|&(a, fd)| (a - fd).abs() / fd.abs().max(1e-2 * big))
        .fold(0f64, f64::max);
    println!(
        "distillation: {} gradients checked, largest relative error {worst:.2e}",
        pairs.len()
    );
    assert!(worst < 1e-3, "{worst}");
    // Training towards the teacher lowers the loss against it.
    let data = write(t.dir.path(), "d.jsonl", &tiny_data(8));
    let train = load_jsonl(&m, &data, 64).unwrap();
    let mut tr = Trainer::new(
        &m,
        train.clone(),
        TrainOptions::default().lr(5e-3).epochs(4).seed(3),
    )
    .unwrap()
    .with_teacher(&teacher, 16)
    .unwrap();
    let before = tr.evaluate(&train).unwrap().loss;
    while tr.step().unwrap().is_some() {}
    let after = tr.evaluate(&train).unwrap().loss;
    println!("distillation: loss against the teacher {before:.4} -> {after:.4}");
    assert!(after < 0.9 * before, "{before} -> {after}");
    // Another vocabulary is refused.
    let spm = build(Spec {
        vocab: common::tiny::Vocab::Spm,
        ..Spec::default()
    });
    let other = Model::load(&spm.gguf, common::options()).unwrap();
    let e = Trainer::new(&m, train, TrainOptions::default())
        .unwrap()
        .with_teacher(&other, 8)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("vocabulary") || e.contains("tokenizer"), "{e}");
}

#[test]
fn packed_sequences_equal_separate_ones() {
    use llama_core::train::{load_jsonl, TrainOptions, Trainer};
    let t = build(Spec::default());
    let m = Model::load(&t.gguf, common::options()).unwrap();
    let p = random_params(&m, 2, 21);
    let a: Vec<u32> = vec![5, 40, 77, 100, 3, 250];
    let b: Vec<u32> = vec![17, 64, 9, 120, 33];
    let (sa, sb) = (vec![true; a.len() - 1], vec![false, true, true, true]);
    let ga = p.loss_and_grads(&m, &LossInput::new(&a, &sa)).unwrap();
    let gb = p.loss_and_grads(&m, &LossInput::new(&b, &sb)).unwrap();
    let tokens: Vec<u32> = a.iter().chain(&b).copied().collect();
    let score: Vec<bool> = sa
        .iter()
        .copied()
        .chain([false])
        .chain(sb.iter().copied())
        .collect();
    let g = p
        .loss_and_grads(&m, &LossInput::new(&tokens, &score).packed(&[0, a.len()]))
        .unwrap();
    assert_eq!(g.n_scored, ga.n_scored + gb.n_scored);
    assert!((g.loss_sum - ga.loss_sum - gb.loss_sum).abs() < 1e-4 * g.loss_sum);
    let (mut sum, mut packed) = (vec![], vec![]);
    let mut both = ga.grads.clone();
    both.zip_mut(&gb.grads, |x, y| {
        x.iter_mut().zip(y).for_each(|(x, y)| *x += y)
    });
    both.for_each(|v| sum.extend_from_slice(v));
    g.grads.for_each(|v| packed.extend_from_slice(v));
    let big = sum.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = sum
        .iter()
        .zip(&packed)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(
        d < 1e-4 * big,
        "packed gradient differs by {d} (largest {big})"
    );
    assert!(p
        .loss_and_grads(&m, &LossInput::new(&tokens, &score).packed(&[1]))
        .is_err());
    assert!(p
        .loss_and_grads(&m, &LossInput::new(&tokens, &score).packed(&[0, 20]))
        .is_err());
    // A run with packing trains the same adapter as one without (up to summation order).
    let data = write(t.dir.path(), "p.jsonl", &tiny_data(8));
    let train = load_jsonl(&m, &data, 64).unwrap();
    let opts = TrainOptions::default().lr(5e-3).batch(4).epochs(2).seed(2);
    let mut x = Trainer::new(&m, train.clone(), opts.clone()).unwrap();
    let mut y = Trainer::new(&m, train, opts.pack(64)).unwrap();
    while x.step().unwrap().is_some() {}
    while y.step().unwrap().is_some() {}
    let (mut px, mut py) = (vec![], vec![]);
    x.params().for_each(|v| px.extend_from_slice(v));
    y.params().for_each(|v| py.extend_from_slice(v));
    let d = px
        .iter()
        .zip(&py)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(d < 1e-3, "packed and unpacked runs differ by {d}");
}
