//! Every architecture variant on tiny random models: the GGUF file and the Hugging Face folder
//! with the same weights give the same logits, and both match an independent f64 reference.

mod common;

use common::tiny::{build, reference_logits, Scaling, Spec, Tiny, Vocab};
use common::{max_diff, max_diff32};
use llama_core::{KvCacheType, Model, SessionOptions};

const TOKENS: [u32; 12] = [5, 40, 77, 100, 3, 250, 17, 64, 9, 120, 33, 200];

fn all_logits(m: &Model, tokens: &[u32], n_batch: usize) -> Vec<Vec<f32>> {
    let mut s = m
        .session(
            SessionOptions::default()
                .kv_type(KvCacheType::F32)
                .n_batch(n_batch)
                .n_ctx(1024),
        )
        .unwrap();
    s.eval_all_logits(tokens).unwrap()
}

fn check(name: &str, spec: Spec, with_gguf: bool) -> Tiny {
    let t = build(spec);
    let reference = reference_logits(&t, &TOKENS);
    let scale = reference.iter().flatten().fold(0f64, |m, v| m.max(v.abs()));
    let hf = Model::load(&t.hf, common::options()).unwrap();
    let ours_hf = all_logits(&hf, &TOKENS, 512);
    let d_hf = max_diff(&ours_hf, &reference);
    println!("{name}: hf vs f64 reference max abs diff {d_hf:.2e} (logit scale {scale:.1})");
    assert!(d_hf < 1e-3 * scale.max(1.0), "{name}: hf {d_hf}");
    // Chunked prompt processing gives the same result (not for dynamic NTK, whose frequencies
    // depend on the length seen so far, in Hugging Face's implementation as in ours).
    if !matches!(t.spec.scaling, Scaling::Dynamic(_)) {
        let chunked = all_logits(&hf, &TOKENS, 5);
        assert!(
            max_diff32(&chunked, &ours_hf) < 1e-4,
            "{name}: chunked prefill differs"
        );
    }
    if with_gguf {
        let gg = Model::load(&t.gguf, common::options()).unwrap();
        assert_eq!(gg.config().head_dim, hf.config().head_dim);
        let ours_gg = all_logits(&gg, &TOKENS, 512);
        let d_fmt = max_diff32(&ours_gg, &ours_hf);
        println!("{name}: gguf vs hf max abs diff {d_fmt:.2e}");
        assert!(
            d_fmt < 1e-3 * scale.max(1.0) as f32,
            "{name}: gguf vs hf {d_fmt}"
        );
        // Decoding one token at a time matches batched evaluation.
        let mut s = gg
            .session(SessionOptions::default().kv_type(KvCacheType::F32))
            .unwrap();
        let mut steps = vec![];
        for &tok in &TOKENS {
            s.eval(&[tok]).unwrap();
            steps.push(s.logits().unwrap().to_vec());
        }
        assert!(
            max_diff32(&steps, &ours_gg) < 1e-4,
            "{name}: token-by-token differs"
        );
    }
    t
}

#[test]
fn mha_bpe_untied() {
    check(
        "mha",
        Spec {
            heads: 4,
            kv_heads: 4,
            ..Default::default()
        },
        true,
    );
}

#[test]
fn gqa_explicit_head_dim_tied_spm() {
    let spec = Spec {
        vocab: Vocab::Spm,
        heads: 4,
        kv_heads: 2,
        head_dim: 32,
        tie: true,
        seed: 11,
        ..Default::default()
    };
    check("gqa+head_dim+tied+spm", spec, true);
}

#[test]
fn gqa_single_kv_head_linear_rope() {
    let spec = Spec {
        heads: 4,
        kv_heads: 1,
        scaling: Scaling::Linear(2.0),
        seed: 3,
        ..Default::default()
    };
    check("gqa 4:1 + linear", spec, true);
}

#[test]
fn llama3_rope_scaling() {
    let spec = Spec {
        theta: 500000.0,
        scaling: Scaling::Llama3 {
            factor: 8.0,
            low: 1.0,
            high: 4.0,
            orig: 16.0,
        },
        max_pos: 128,
        head_dim: 32,
        seed: 5,
        ..Default::default()
    };
    let t = check("llama3", spec, true);
    // The scaling must matter, or this test proves nothing.
    let plain = build(Spec {
        scaling: Scaling::None,
        ..t.spec.clone()
    });
    let a = reference_logits(&t, &TOKENS);
    let b = reference_logits(&plain, &TOKENS);
    let d = a
        .iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max);
    assert!(d > 1e-3, "llama3 scaling had no effect ({d})");
}

#[test]
fn dynamic_ntk_rope_scaling() {
    // 12 tokens past a trained context of 8: the NTK base rescale applies.
    let spec = Spec {
        scaling: Scaling::Dynamic(2.0),
        max_pos: 8,
        seed: 9,
        ..Default::default()
    };
    let t = check("dynamic", spec, false);
    // With default options the session holds the scaled range (8 x 2 = 16 positions): a
    // 12-token prompt, past the trained 8, runs and matches the reference.
    let m = Model::load(&t.hf, common::options()).unwrap();
    assert_eq!(m.config().scaled_context(), 16);
    let opts = SessionOptions::default().kv_type(KvCacheType::F32);
    let mut s = m.session(opts).unwrap();
    assert_eq!(s.n_ctx(), 16);
    let got = s.eval_all_logits(&TOKENS).unwrap();
    let reference = reference_logits(&t, &TOKENS);
    let scale = reference.iter().flatten().fold(0f64, |m, v| m.max(v.abs()));
    let d = max_diff(&got, &reference);
    assert!(
        d < 1e-3 * scale.max(1.0),
        "dynamic NTK with default options: {d}"
    );
    assert!(
        s.eval(&[1, 2, 3, 4, 5]).is_err(),
        "past the scaled range is an overflow"
    );
}

#[test]
fn long_prefill_crosses_cache_growth() {
    let t = build(Spec {
        seed: 21,
        ..Default::default()
    });
    let m = Model::load(&t.gguf, common::options()).unwrap();
    let toks: Vec<u32> = (0..300u32)
        .map(|i| (i * 37 + 11) % t.vocab_size as u32)
        .collect();
    let whole = all_logits(&m, &toks, 512);
    let pieces = all_logits(&m, &toks, 100);
    assert!(max_diff32(&whole, &pieces) < 1e-4);
}

#[test]
fn bpe_tokenizer_from_gguf_and_json_agree() {
    let t = build(Spec::default());
    let gg = Model::load(&t.gguf, common::options()).unwrap();
    let hf = Model::load(&t.hf, common::options()).unwrap();
    for (text, special) in [
        ("hello world", false),
        ("the 123 world", false),
        ("<|im_start|>hi<|im_end|>", true),
        ("<|im_start|>", false),
        ("", false),
    ] {
        let a = gg.tokenize(text, true, special).unwrap();
        let b = hf.tokenize(text, true, special).unwrap();
        assert_eq!(a, b, "{text:?}");
        assert_eq!(gg.detokenize(&a, special).unwrap(), text);
    }
    let tok = gg.tokenizer();
    // smollm pre-tokenizer: digits one by one; merges applied within words.
    let ids = gg.tokenize("hello world 42", false, false).unwrap();
    let pieces: Vec<String> = ids.iter().map(|&i| tok.id_to_token(i).unwrap()).collect();
    // Merges apply in rank order: "h e" and "l l" come before "e ll", so "hello" stays split.
    assert_eq!(pieces, ["he", "ll", "o", "Ġworld", "Ġ", "4", "2"]);
    assert_eq!(gg.tokenize("<|im_start|>", false, true).unwrap(), vec![1]);
    assert!(gg.tokenize("<|im_start|>", false, false).unwrap().len() > 1);
    assert!(!tok.adds_bos());
}

#[test]
fn spm_tokenizer_from_gguf() {
    let t = build(Spec {
        vocab: Vocab::Spm,
        ..Default::default()
    });
    let gg = Model::load(&t.gguf, common::options()).unwrap();
    let hf = Model::load(&t.hf, common::options()).unwrap();
    let tok = gg.tokenizer();
    let ids = gg.tokenize("hello world and the", true, false).unwrap();
    let pieces: Vec<String> = ids.iter().map(|&i| tok.id_to_token(i).unwrap()).collect();
    assert_eq!(pieces, ["<s>", "▁hello", "▁world", "▁and", "▁the"]);
    // Byte fallback for characters outside the vocabulary.
    let ids = gg.tokenize("é", false, false).unwrap();
    let pieces: Vec<String> = ids.iter().map(|&i| tok.id_to_token(i).unwrap()).collect();
    assert_eq!(pieces, ["▁", "<0xC3>", "<0xA9>"]);
    for text in ["hello world", "é and ü", " leading space", "tab\there"] {
        let a = gg.tokenize(text, true, false).unwrap();
        assert_eq!(a, hf.tokenize(text, true, false).unwrap(), "{text:?}");
        assert_eq!(gg.detokenize(&a, false).unwrap(), text, "{text:?}");
    }
    assert!(tok.adds_bos());
    assert!(hf.tokenizer().adds_bos());
    // Special-token text is only parsed when asked.
    assert_eq!(gg.tokenize("</s>", false, true).unwrap(), vec![2]);
    assert_ne!(gg.tokenize("</s>", false, false).unwrap(), vec![2]);
}
