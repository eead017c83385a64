//! Every GGUF block type candle supports, and f16/bf16 safetensors, load and run.

mod common;

use std::collections::HashMap;

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use common::rel_err;
use common::tiny::{build, Spec};
use llama_core::gguf::GgufFile;
use llama_core::{KvCacheType, Model, SessionOptions};

const TOKENS: [u32; 8] = [5, 40, 77, 100, 3, 250, 17, 64];

fn logits(m: &Model) -> Vec<f32> {
    let mut s = m
        .session(SessionOptions::default().kv_type(KvCacheType::F32))
        .unwrap();
    s.eval_all_logits(&TOKENS).unwrap().concat()
}

#[test]
fn every_gguf_block_type_loads_and_runs() {
    let t = build(Spec::kquant_sized(256, 17));
    let g = GgufFile::open(&t.gguf).unwrap();
    // Each quantized file is compared with an F32 file holding its own dequantized weights: what
    // remains is the 8-bit rounding of activations (a few percent on this random model), while a
    // wrong block layout or row order gives a relative error above 1.
    let cases = common::tiny::GGUF_TYPES;
    for dtype in cases {
        let (p, pd) = common::tiny::write_quantized_pair(&g, dtype, t.dir.path());
        let m = Model::load(&p, common::options()).unwrap();
        assert_eq!(m.weight_type(), format!("{dtype:?}"));
        let dense = Model::load(&pd, common::options()).unwrap();
        // Kept smaller than its f32 dequantization (BF16 alone is widened to f32 at load).
        let widened = dtype == GgmlDType::BF16;
        assert!(
            m.weight_bytes() > 0
                && if widened {
                    m.weight_bytes() == dense.weight_bytes()
                } else {
                    m.weight_bytes() * 3 / 2 < dense.weight_bytes()
                },
            "{dtype:?}: {} bytes vs f32 {}",
            m.weight_bytes(),
            dense.weight_bytes()
        );
        let want = logits(&dense);
        let e = rel_err(&logits(&m), &want);
        println!("{dtype:?}: relative error vs its dequantized weights {e:.4}");
        assert!(e < 0.15, "{dtype:?}: relative error {e}");
    }
}

#[test]
fn f16_and_bf16_safetensors() {
    let t = build(Spec {
        seed: 23,
        ..Default::default()
    });
    let base = Model::load(&t.hf, common::options()).unwrap();
    let want = logits(&base);
    let all = candle_core::safetensors::load(t.hf.join("model.safetensors"), &Device::Cpu).unwrap();
    for (dt, bound) in [(DType::F16, 0.01), (DType::BF16, 0.05)] {
        let conv: HashMap<String, Tensor> = all
            .iter()
            .map(|(k, v)| (k.clone(), v.to_dtype(dt).unwrap()))
            .collect();
        candle_core::safetensors::save(&conv, t.hf.join("model.safetensors")).unwrap();
        let m = Model::load(&t.hf, common::options()).unwrap();
        let e = rel_err(&logits(&m), &want);
        println!("{dt:?} safetensors: relative error {e:.4}");
        assert!(e < bound, "{dt:?}: {e}");
    }
}

#[test]
fn generation_config_eos_ids_are_unioned() {
    let t = build(Spec::default());
    std::fs::write(
        t.hf.join("generation_config.json"),
        r#"{"eos_token_id": [2, 1]}"#,
    )
    .unwrap();
    let m = Model::load(&t.hf, common::options()).unwrap();
    assert!(m.config().eos_token_ids.contains(&2) && m.config().eos_token_ids.contains(&1));
    assert!(m.tokenizer().is_eog(1) && m.tokenizer().is_eog(2));
}

/// Quantizing at load gives exactly the tensors of writing a quantized GGUF (from the GGUF or
/// from the Hugging Face folder) and loading it; the writer's files, from either source, hold
/// identical tensors (quantization is per row, so the Q/K row permutation commutes with it).
#[test]
fn quantize_at_load_equals_quantize_then_load() {
    use common::tiny::Vocab;
    use llama_core::quantize::{quantize_model, FileType, QuantizeOptions};
    use llama_core::QuantType;
    for (vocab, tie, seed) in [(Vocab::Bpe, false, 29), (Vocab::Spm, true, 30)] {
        let t = build(Spec {
            vocab,
            tie,
            ..Spec::kquant_sized(512, seed)
        });
        for qt in [
            QuantType::Q8_0,
            QuantType::Q4_0,
            QuantType::Q4_1,
            QuantType::Q5_0,
            QuantType::Q5_1,
            QuantType::Q4K,
            QuantType::Q5K,
            QuantType::Q6K,
        ] {
            let opts = QuantizeOptions::new(FileType::Quant(qt));
            let from_gguf = t.dir.path().join(format!("g-{qt:?}.gguf"));
            let from_hf = t.dir.path().join(format!("h-{qt:?}.gguf"));
            quantize_model(&t.gguf, &from_gguf, &opts, |_, _| {}).unwrap();
            quantize_model(&t.hf, &from_hf, &opts, |_, _| {}).unwrap();
            let (a, b) = (
                GgufFile::open(&from_gguf).unwrap(),
                GgufFile::open(&from_hf).unwrap(),
            );
            assert_eq!(a.tensors.len(), b.tensors.len());
            for name in &a.tensor_order {
                let (ia, da) = a.tensor_data(name).unwrap();
                let (ib, db) = b.tensor_data(name).unwrap();
                assert_eq!((ia.dtype, &ia.shape), (ib.dtype, &ib.shape), "{name}");
                assert!(da == db, "{qt:?} {name}: tensor bytes differ");
            }
            // The head follows llama.cpp: Q6_K (rows of 256), or Q8_0 for Q8_0 files.
            let head = if tie {
                "token_embd.weight"
            } else {
                "output.weight"
            };
            let want_head = if qt == QuantType::Q8_0 {
                GgmlDType::Q8_0
            } else {
                GgmlDType::Q6K
            };
            assert_eq!(a.tensors[head].dtype, want_head, "{qt:?} head");
            let pre = logits(&Model::load(&from_gguf, common::options()).unwrap());
            let pre_hf_model = Model::load(&from_hf, common::options()).unwrap();
            assert_eq!(
                logits(&pre_hf_model),
                pre,
                "{qt:?}: files from GGUF and HF differ"
            );
            for src in [&t.hf, &t.gguf] {
                let at_load = Model::load(src, common::options().with_quantize(qt)).unwrap();
                assert_eq!(at_load.weight_type(), format!("{:?}", qt_ggml(qt)));
                assert_eq!(logits(&at_load), pre, "{qt:?} from {}", src.display());
            }
            // The tokenizer written from tokenizer.json tokenizes as the original.
            let orig = Model::load(&t.gguf, common::options()).unwrap();
            for text in [
                "hello world",
                " the cat sat",
                "abc 123 <s>x</s>",
                "",
                "  two  spaces\n",
            ] {
                for special in [false, true] {
                    assert_eq!(
                        pre_hf_model.tokenize(text, true, special).unwrap(),
                        orig.tokenize(text, true, special).unwrap(),
                        "{vocab:?} {text:?}"
                    );
                }
            }
        }
    }
    // A row length that fits no k-quant super-block falls back (576 % 256 != 0).
    let odd = build(Spec {
        hidden: 96,
        ff: 160,
        heads: 2,
        kv_heads: 1,
        head_dim: 48,
        seed: 31,
        ..Default::default()
    });
    let m = Model::load(&odd.hf, common::options().with_quantize(QuantType::Q6K)).unwrap();
    assert_eq!(m.weight_type(), "Q8_0");
    assert!(QuantType::parse("q4_k").is_ok() && QuantType::parse("q3_x").is_err());
}

fn qt_ggml(q: llama_core::QuantType) -> GgmlDType {
    use llama_core::QuantType as Q;
    match q {
        Q::Q8_0 => GgmlDType::Q8_0,
        Q::Q4_0 => GgmlDType::Q4_0,
        Q::Q4_1 => GgmlDType::Q4_1,
        Q::Q5_0 => GgmlDType::Q5_0,
        Q::Q5_1 => GgmlDType::Q5_1,
        Q::Q4K => GgmlDType::Q4K,
        Q::Q5K => GgmlDType::Q5K,
        Q::Q6K => GgmlDType::Q6K,
        _ => unreachable!(),
    }
}
