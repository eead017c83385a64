//! The GGUF writer (`quantize_model`) and row quantization: error bounds per type, thread
//! independence, conversion of every rope-scaling kind, and bad input.

mod common;

use common::tiny::{build, Scaling, Spec};
use llama_core::gguf::GgufFile;
use llama_core::quantize::{dequantize, quantize_model, quantize_rows, FileType, QuantizeOptions};
use llama_core::{Error, KvCacheType, Model, ModelOptions, QuantType, SessionOptions};

fn values(n: usize, seed: u64) -> Vec<f32> {
    // Gaussian-like (sum of uniforms) with a few outliers, as real weights have.
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut u = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 11) as f32 / (1u64 << 53) as f32
    };
    (0..n)
        .map(|i| {
            let g = (0..4).map(|_| u()).sum::<f32>() - 2.0;
            if i % 97 == 0 {
                g * 6.0
            } else {
                g
            }
        })
        .collect()
}

/// dequantize(quantize(x)) stays within each type's bound: for the 32-value block types the
/// worst error of a block is at most one quantization step of that block; for the k-quants
/// (per-super-block scales quantized too) the relative RMS error is bounded (limits: 1.25x
/// the values measured on this data, which has outliers as real weights do).
#[test]
fn quantization_error_is_within_each_types_bound() {
    let row = 512;
    let x = values(row * 16, 3);
    let rms = |e: &[f32]| (e.iter().map(|v| v * v).sum::<f32>() / e.len() as f32).sqrt();
    let x_rms = rms(&x);
    for (q, rel_rms_bound) in [
        (QuantType::Q8_0, 0.009),
        (QuantType::Q5_1, 0.054),
        (QuantType::Q5_0, 0.074),
        (QuantType::Q4_1, 0.11),
        (QuantType::Q4_0, 0.145),
        (QuantType::Q6K, 0.03),
        (QuantType::Q5K, 0.053),
        (QuantType::Q4K, 0.105),
    ] {
        let ty = FileType::Quant(q);
        let bytes = quantize_rows(&x, row, ty, 1).unwrap();
        let y = dequantize(&bytes, ty, x.len()).unwrap();
        let err: Vec<f32> = x.iter().zip(&y).map(|(a, b)| a - b).collect();
        let rel = rms(&err) / x_rms;
        println!("{ty}: relative RMS error {rel:.4}");
        assert!(rel < rel_rms_bound, "{ty}: {rel}");
        // Per-block worst case for the simple block types.
        for (b, (xb, eb)) in x.chunks(32).zip(err.chunks(32)).enumerate() {
            let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
            let (lo, hi) = xb
                .iter()
                .fold((f32::MAX, f32::MIN), |(l, h), &v| (l.min(v), h.max(v)));
            let step = match q {
                QuantType::Q8_0 => amax / 127.0 / 2.0,
                QuantType::Q4_0 => amax / 8.0,
                QuantType::Q5_0 => amax / 16.0,
                QuantType::Q4_1 => (hi - lo) / 15.0 / 2.0,
                QuantType::Q5_1 => (hi - lo) / 31.0 / 2.0,
                _ => f32::INFINITY,
            };
            // f16 scales add a relative 1e-3 of the block's range.
            let bound = step * 1.01 + (hi - lo).max(amax) * 1e-3;
            let worst = eb.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!(worst <= bound, "{ty} block {b}: {worst} > {bound}");
        }
    }
}

#[test]
fn row_quantization_is_independent_of_thread_count() {
    let row = 256;
    let x = values(row * 37, 5);
    for q in [QuantType::Q4K, QuantType::Q8_0, QuantType::Q5_1] {
        let ty = FileType::Quant(q);
        let one = quantize_rows(&x, row, ty, 1).unwrap();
        for t in [2, 3, 8] {
            assert!(
                quantize_rows(&x, row, ty, t).unwrap() == one,
                "{ty} with {t} threads"
            );
        }
    }
    // Rows that do not fit the block: an error, not a panic.
    assert!(matches!(
        quantize_rows(&x[..100], 100, FileType::Quant(QuantType::Q4_0), 1),
        Err(Error::InvalidArgument(_))
    ));
    assert!(dequantize(&[0u8; 7], FileType::Quant(QuantType::Q8_0), 32).is_err());
}

fn logits(m: &Model, tokens: &[u32]) -> Vec<f32> {
    let mut s = m
        .session(SessionOptions::default().kv_type(KvCacheType::F32))
        .unwrap();
    s.eval_all_logits(tokens).unwrap().concat()
}

/// A Hugging Face folder with each rope scaling becomes a GGUF that runs the same model
/// (linear: metadata; llama3: the rope_freqs.weight tensor llama.cpp reads); `dynamic` has no
/// GGUF form and is refused.
#[test]
fn hf_to_gguf_keeps_rope_scaling() {
    let tokens = [5u32, 40, 77, 100, 3, 250, 17, 64, 9, 12, 200, 31];
    for (scaling, tie) in [
        (Scaling::None, true),
        (Scaling::Linear(4.0), false),
        (
            Scaling::Llama3 {
                factor: 8.0,
                low: 1.0,
                high: 4.0,
                orig: 64.0,
            },
            true,
        ),
    ] {
        let t = build(Spec {
            scaling: scaling.clone(),
            tie,
            seed: 41,
            ..Default::default()
        });
        let out = t.dir.path().join("from-hf.gguf");
        quantize_model(&t.hf, &out, &QuantizeOptions::new(FileType::F32), |_, _| {}).unwrap();
        let g = GgufFile::open(&out).unwrap();
        assert_eq!(
            g.tensors.contains_key("rope_freqs.weight"),
            matches!(scaling, Scaling::Llama3 { .. })
        );
        let a = logits(
            &Model::load(&t.hf, ModelOptions::default()).unwrap(),
            &tokens,
        );
        let b = logits(
            &Model::load(&out, ModelOptions::default()).unwrap(),
            &tokens,
        );
        let d = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(d < 1e-3, "{scaling:?}: {d}");
    }
    let t = build(Spec {
        scaling: Scaling::Dynamic(2.0),
        ..Default::default()
    });
    let out = t.dir.path().join("dyn.gguf");
    let e = quantize_model(&t.hf, &out, &QuantizeOptions::new(FileType::F16), |_, _| {});
    assert!(matches!(e, Err(Error::InvalidArgument(_))), "{e:?}");
    assert!(!out.exists());
}

/// Overrides of the head and embedding types are honoured; rows that fit no k-quant fall back
/// and the report says so.
#[test]
fn type_overrides_and_fallbacks_are_reported() {
    let t = build(Spec {
        hidden: 96,
        ff: 256,
        heads: 2,
        kv_heads: 1,
        head_dim: 48,
        tie: false,
        ..Default::default()
    });
    let out = t.dir.path().join("q4k.gguf");
    let mut opts = QuantizeOptions::new(FileType::Quant(QuantType::Q4K));
    opts.output_type = Some(FileType::F16);
    opts.embedding_type = Some(FileType::Quant(QuantType::Q8_0));
    let report = quantize_model(&t.gguf, &out, &opts, |_, _| {}).unwrap();
    let g = GgufFile::open(&out).unwrap();
    use candle_core::quantized::GgmlDType as G;
    assert_eq!(g.tensors["output.weight"].dtype, G::F16);
    assert_eq!(g.tensors["token_embd.weight"].dtype, G::Q8_0);
    // Rows of 96 (q, k, v, gate, up): q5_0; rows of 256 (down): q4_k; o has rows of 96 too.
    assert_eq!(g.tensors["blk.0.attn_q.weight"].dtype, G::Q5_0);
    assert_eq!(g.tensors["blk.0.ffn_down.weight"].dtype, G::Q4K);
    assert_eq!(g.tensors["blk.0.attn_norm.weight"].dtype, G::F32);
    assert!(report
        .fallbacks
        .iter()
        .any(|(note, n)| note.contains("q5_0") && *n == 2 * 6));
    assert_eq!(
        g.get("general.file_type").and_then(|v| v.as_u64()),
        Some(14)
    );
    Model::load(&out, ModelOptions::default()).unwrap();
}

/// Bad input: unknown types, an unwritable destination, a truncated source. Each is an error
/// and no file (finished or temporary) is left behind.
#[test]
fn bad_input_leaves_no_file() {
    assert!(matches!(
        FileType::parse("q3_x"),
        Err(Error::InvalidArgument(_))
    ));
    assert_eq!(
        FileType::parse("Q4_K").unwrap(),
        FileType::Quant(QuantType::Q4K)
    );
    assert_eq!(FileType::parse("f16").unwrap(), FileType::F16);
    let t = build(Spec::default());
    let opts = QuantizeOptions::new(FileType::Quant(QuantType::Q8_0));
    // Destination folder does not exist.
    let missing = t.dir.path().join("no-such-dir").join("out.gguf");
    let e = quantize_model(&t.gguf, &missing, &opts, |_, _| {});
    assert!(matches!(e, Err(Error::Io { .. })), "{e:?}");
    // Truncated source: the error comes before or during the write; nothing is left.
    let bytes = std::fs::read(&t.gguf).unwrap();
    let cut = t.dir.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() * 2 / 3]).unwrap();
    let outdir = tempfile::tempdir().unwrap();
    let dst = outdir.path().join("out.gguf");
    assert!(quantize_model(&cut, &dst, &opts, |_, _| {}).is_err());
    assert_eq!(std::fs::read_dir(outdir.path()).unwrap().count(), 0);
    // A missing source path.
    let e = quantize_model(&t.dir.path().join("nope"), &dst, &opts, |_, _| {});
    assert!(matches!(e, Err(Error::Io { .. })), "{e:?}");
}
