//! Parity with llama.cpp on the real SmolLM2-135M-Instruct Q4_1 file (fixtures made by
//! tests/reference/make_reference.py).

mod common;

use std::sync::OnceLock;

use base64::Engine as _;
use common::*;
use llama_core::convert::{gguf_to_hf, DenseType};
use llama_core::gguf::GgufFile;
use llama_core::quantize::{quantize_model, FileType, QuantizeOptions};
use llama_core::{
    GenerateOptions, KvCacheType, Message, Model, ModelOptions, Sampler, SessionOptions,
};

fn model() -> &'static Model {
    static M: OnceLock<Model> = OnceLock::new();
    M.get_or_init(|| Model::load(real_model_path(), ModelOptions::default()).expect("load model"))
}

#[test]
fn fixture_matches_the_fetched_file() {
    let r = reference();
    assert_eq!(r["model"], "SmolLM2-135M-Instruct.Q4_1.gguf");
    let m = model();
    let c = m.config();
    assert_eq!(
        (
            c.num_hidden_layers,
            c.hidden_size,
            c.num_attention_heads,
            c.num_key_value_heads
        ),
        (30, 576, 9, 3)
    );
    assert!(c.tie_word_embeddings);
    assert_eq!(m.weight_type(), "Q4_1");
}

#[test]
fn tokenization_matches_llama_cpp() {
    let r = reference();
    let m = model();
    let mut bad = vec![];
    let cases = r["tokenize"].as_array().unwrap();
    assert!(cases.len() >= 60);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let special = case["parse_special"].as_bool().unwrap();
        let want = ids(&case["ids"]);
        let got = m
            .tokenize(text, case["add_special"].as_bool().unwrap(), special)
            .unwrap();
        if got != want {
            bad.push(format!(
                "{text:?} special={special}: ours {got:?} llama.cpp {want:?}"
            ));
        }
    }
    println!(
        "tokenization: {}/{} identical",
        cases.len() - bad.len(),
        cases.len()
    );
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

#[test]
fn eog_ids_match_llama_cpp() {
    let r = reference();
    assert_eq!(model().tokenizer().eog_ids(), &ids(&r["eog_ids"])[..]);
}

#[test]
fn detokenize_roundtrips_plain_text() {
    let m = model();
    for t in [
        "Hello world",
        " leading",
        "emoji 😀🎉",
        "日本語",
        "a\n\tb",
        "x = [1, 2]",
    ] {
        let ids = m.tokenize(t, false, false).unwrap();
        assert_eq!(m.detokenize(&ids, false).unwrap(), t);
    }
}

fn greedy(m: &Model, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut s = m.session(SessionOptions::default()).unwrap();
    let mut smp = Sampler::greedy();
    let g = s
        .generate(
            prompt,
            &mut smp,
            GenerateOptions::default().max_tokens(n),
            |_| std::ops::ControlFlow::Continue(()),
        )
        .unwrap();
    g.tokens
}

#[test]
fn greedy_continuations_match_llama_cpp() {
    let r = reference();
    let m = model();
    let n = r["n_greedy"].as_u64().unwrap() as usize;
    let mut report = vec![];
    let mut failures = vec![];
    let threshold = near_tie_threshold(&r);
    println!("near-tie threshold: {threshold:.3}");
    for case in r["greedy"].as_array().unwrap() {
        let prompt = case["prompt"].as_str().unwrap();
        let prompt_ids = ids(&case["prompt_ids"]);
        assert_eq!(
            m.tokenize(prompt, true, true).unwrap(),
            prompt_ids,
            "prompt tokens for {prompt:?}"
        );
        let ours = greedy(m, &prompt_ids, n);
        match check_greedy(
            &ours,
            &ids(&case["ids"]),
            &f32s(&case["margins"]),
            threshold,
        ) {
            Ok(None) => report.push(format!("identical  {prompt:.30?}")),
            Ok(Some((i, mg))) => report.push(format!(
                "near-tie   {prompt:.30?} at step {i} (margin {mg:.3})"
            )),
            Err(e) => failures.push(format!("{prompt:.30?}: {e}")),
        }
    }
    println!("{}", report.join("\n"));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn last_prompt_logits_match_llama_cpp() {
    let r = reference();
    let m = model();
    let mut worst = 0f32;
    for case in r["greedy"].as_array().unwrap() {
        let prompt_ids = ids(&case["prompt_ids"]);
        let mut s = m.session(SessionOptions::default()).unwrap();
        s.eval(&prompt_ids).unwrap();
        let logits = s.logits().unwrap();
        let top10 = case["top10"].as_array().unwrap();
        let want_top1 = top10[0][0].as_u64().unwrap() as usize;
        let our_top1 = logits
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .unwrap()
            .0;
        // A different top-1 is only noise where llama.cpp itself was at a near-tie: our pick
        // must be among its top-10 with a logit within the near-tie threshold of its top-1.
        if our_top1 != want_top1 {
            let gap = top10
                .iter()
                .find(|e| e[0].as_u64().unwrap() as usize == our_top1)
                .map(|e| top10[0][1].as_f64().unwrap() - e[1].as_f64().unwrap())
                .unwrap_or(f64::INFINITY) as f32;
            assert!(
                gap < near_tie_threshold(&r),
                "top-1 for {:?}: ours {our_top1}, llama.cpp {want_top1} (llama.cpp's gap {gap})",
                case["prompt"]
            );
            println!("near-tie top-1 for {:?} (gap {gap:.3})", case["prompt"]);
        }
        for e in top10 {
            let (id, l) = (
                e[0].as_u64().unwrap() as usize,
                e[1].as_f64().unwrap() as f32,
            );
            worst = worst.max((logits[id] - l).abs());
        }
    }
    println!("max |ours - llama.cpp| over llama.cpp's top-10 logits: {worst:.4}");
    assert!(worst < 1.0, "max abs difference {worst}");
}

#[test]
fn chat_template_and_reply_match_references() {
    let r = reference();
    let m = model();
    let mut report = vec![];
    for case in r["chat"].as_array().unwrap() {
        let messages: Vec<Message> = serde_json::from_value(case["messages"].clone()).unwrap();
        let rendered = m.apply_chat_template(&messages, true).unwrap();
        assert_eq!(
            rendered,
            case["rendered"].as_str().unwrap(),
            "rendered template differs from jinja2"
        );
        let prompt_ids = m.chat_tokens(&messages, Default::default()).unwrap();
        assert_eq!(prompt_ids, ids(&case["prompt_ids"]));
        let mut s = m.session(SessionOptions::default()).unwrap();
        let g = s
            .generate(
                &messages,
                &mut Sampler::greedy(),
                GenerateOptions::default().max_tokens(48),
                |_| std::ops::ControlFlow::Continue(()),
            )
            .unwrap();
        match check_greedy(
            &g.tokens,
            &ids(&case["ids"]),
            &f32s(&case["margins"]),
            near_tie_threshold(&r),
        ) {
            Ok(None) => report.push("identical".to_string()),
            Ok(Some((i, mg))) => report.push(format!("near-tie at {i} ({mg:.3})")),
            Err(e) => panic!("chat {:?}: {e}", messages),
        }
    }
    println!("chat replies: {report:?}");
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// The same weights dequantized to f32, as an F32 GGUF and as a safetensors folder, against
/// llama.cpp on that F32 GGUF with an F32 KV cache: the real measure of the model code.
#[test]
fn dense_path_matches_float_reference() {
    let r = reference();
    let src = real_model_path();
    let dir = tempfile::tempdir().unwrap();
    let f32_gguf = dir.path().join("f32.gguf");
    let hf_dir = dir.path().join("hf");
    let hf_gguf = dir.path().join("hf-f32.gguf");
    quantize_model(
        &src,
        &f32_gguf,
        &QuantizeOptions::new(FileType::F32),
        |_, _| {},
    )
    .unwrap();
    gguf_to_hf(&src, &hf_dir, DenseType::F32, |_, _| {}).unwrap();
    // And back: a GGUF written from the Hugging Face folder, with tokenizer metadata
    // synthesised from tokenizer.json.
    quantize_model(
        &hf_dir,
        &hf_gguf,
        &QuantizeOptions::new(FileType::F32),
        |_, _| {},
    )
    .unwrap();
    let dense = Model::load(&f32_gguf, ModelOptions::default()).unwrap();
    let hf = Model::load(&hf_dir, ModelOptions::default()).unwrap();
    let back = Model::load(&hf_gguf, ModelOptions::default()).unwrap();
    assert_eq!(hf.format(), "safetensors");
    // The synthesised tokenizer metadata is llama.cpp's own, key for key.
    let (a, b) = (
        GgufFile::open(&src).unwrap(),
        GgufFile::open(&hf_gguf).unwrap(),
    );
    for key in [
        "tokenizer.ggml.model",
        "tokenizer.ggml.pre",
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.token_type",
        "tokenizer.ggml.merges",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.chat_template",
        "llama.block_count",
        "llama.embedding_length",
        "llama.feed_forward_length",
        "llama.attention.head_count",
        "llama.attention.head_count_kv",
        "llama.rope.freq_base",
        "llama.attention.layer_norm_rms_epsilon",
        "llama.context_length",
    ] {
        assert_eq!(a.get(key), b.get(key), "{key}");
    }
    for case in r["dense"].as_array().unwrap() {
        let prompt_ids = ids(&case["prompt_ids"]);
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(case["logits_f32_b64"].as_str().unwrap())
            .unwrap();
        let want: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        for (name, m) in [
            ("f32 gguf", &dense),
            ("hf safetensors", &hf),
            ("gguf from hf", &back),
        ] {
            assert_eq!(
                m.tokenize(case["prompt"].as_str().unwrap(), true, true)
                    .unwrap(),
                prompt_ids,
                "{name} tokens"
            );
            let mut s = m
                .session(SessionOptions::default().kv_type(KvCacheType::F32))
                .unwrap();
            s.eval(&prompt_ids).unwrap();
            let d = max_abs_diff(s.logits().unwrap(), &want);
            println!(
                "{name}: max |ours - llama.cpp f32| over all {} logits = {d:.2e}",
                want.len()
            );
            assert!(d < 1e-2, "{name}: {d}");
        }
    }
}

#[test]
fn perplexity_matches_llama_cpp_within_one_percent() {
    let r = reference();
    let p = &r["perplexity"];
    let text = std::fs::read_to_string(p["file"].as_str().unwrap()).unwrap();
    let n_ctx = p["n_ctx"].as_u64().unwrap() as usize;
    let chunks = p["chunks"].as_u64().unwrap() as usize;
    let opts = llama_core::PerplexityOptions::default()
        .n_ctx(n_ctx)
        .max_chunks(chunks);
    let ours = llama_core::Perplexity::measure(model(), &text, &opts, |_, _| {
        std::ops::ControlFlow::Continue(())
    })
    .unwrap();
    let theirs = p["perplexity"].as_f64().unwrap();
    let rel = (ours.perplexity - theirs).abs() / theirs;
    println!(
        "perplexity over {chunks} windows of {n_ctx}: ours {:.4}, llama.cpp {theirs:.4} ({:.2}%)",
        ours.perplexity,
        rel * 100.0
    );
    assert_eq!(ours.n_chunks, chunks);
    assert_eq!(ours.n_scored, chunks * (n_ctx - 1 - n_ctx / 2));
    assert!(rel < 0.01, "relative difference {rel}");
}

#[test]
fn token_logprobs_agree_with_eval() {
    let m = model();
    let ids = m
        .tokenize("The quick brown fox jumps over the lazy dog.", true, false)
        .unwrap();
    let lps = llama_core::Perplexity::token_logprobs(m, &ids).unwrap();
    assert_eq!(lps.len(), ids.len() - 1);
    let mut s = m.session(SessionOptions::default()).unwrap();
    let all = s.eval_all_logits(&ids).unwrap();
    for j in 0..ids.len() - 1 {
        let lp = llama_core::sampler::log_softmax(&all[j]);
        assert!((lp[ids[j + 1] as usize] - lps[j]).abs() < 1e-6);
    }
    assert!(lps.iter().all(|&x| x <= 0.0));
    // Logits from a later position on equal the tail of all-position logits.
    let mut s2 = m.session(SessionOptions::default()).unwrap();
    let tail = s2.eval_logits_from(&ids, 4).unwrap();
    assert_eq!(tail.len(), ids.len() - 4);
    assert_eq!(tail[0], all[4]);
    assert_eq!(s2.logits().unwrap(), &all[ids.len() - 1][..]);
}

fn sha256_hex(path: &std::path::Path) -> String {
    use sha2::Digest;
    let bytes = std::fs::read(path).unwrap();
    sha2::Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Files written by `llama quantize` (from the GGUF, and from a Hugging Face export of it):
/// llama.cpp loads each (reference script) and its greedy tokens and tokenization on that
/// file are what this library produces on the same file.
#[test]
fn quantized_files_round_trip_through_llama_cpp() {
    let r = reference();
    let src = real_model_path();
    let cases = r["roundtrip"].as_array().expect("roundtrip section");
    assert!(cases.len() >= 3);
    let mut report = vec![];
    let mut failures = vec![];
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let threshold = file_near_tie_threshold(&r, case);
        report.push(format!("{name}: near-tie threshold {threshold:.3}"));
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join(format!("{name}.gguf"));
        for step in case["steps"].as_array().unwrap() {
            let args: Vec<String> = step
                .as_array()
                .unwrap()
                .iter()
                .map(|a| {
                    a.as_str()
                        .unwrap()
                        .replace("{model}", src.to_str().unwrap())
                        .replace("{tmp}", tmp.path().to_str().unwrap())
                        .replace("{out}", out.to_str().unwrap())
                })
                .collect();
            let ty = &args[args.iter().position(|a| a == "--type").unwrap() + 1];
            let (input, output) = (
                std::path::Path::new(&args[1]),
                std::path::Path::new(&args[2]),
            );
            match args[0].as_str() {
                "quantize" => {
                    let opts = QuantizeOptions::new(FileType::parse(ty).unwrap());
                    quantize_model(input, output, &opts, |_, _| {}).unwrap();
                }
                "export-hf" => {
                    let t = if ty == "f16" {
                        DenseType::F16
                    } else {
                        DenseType::F32
                    };
                    gguf_to_hf(input, output, t, |_, _| {}).unwrap();
                }
                other => panic!("unknown step {other}"),
            }
        }
        assert_eq!(
            sha256_hex(&out),
            case["sha256"].as_str().unwrap(),
            "{name}: the file differs from the one llama.cpp was run on"
        );
        let m = Model::load(&out, ModelOptions::default()).unwrap();
        for t in case["tokenize"].as_array().unwrap() {
            let text = t["text"].as_str().unwrap();
            assert_eq!(
                m.tokenize(text, true, true).unwrap(),
                ids(&t["ids"]),
                "{name}: {text:?}"
            );
        }
        for g in case["greedy"].as_array().unwrap() {
            let prompt_ids = ids(&g["prompt_ids"]);
            let want = ids(&g["ids"]);
            let ours = greedy(&m, &prompt_ids, want.len());
            match check_greedy(&ours, &want, &f32s(&g["margins"]), threshold) {
                Ok(None) => report.push(format!("{name}: identical")),
                Ok(Some((i, mg))) => report.push(format!("{name}: near-tie at {i} ({mg:.3})")),
                Err(e) => failures.push(format!("{name} {:?}: {e}", g["prompt"])),
            }
        }
    }
    println!("{}", report.join("\n"));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn perplexity_per_kv_cache_type_on_a_long_text() {
    use llama_core::KvCacheType::{F16, F32, Q4_0, Q8_0};
    let r = reference();
    let text = std::fs::read_to_string(r["perplexity"]["file"].as_str().unwrap()).unwrap();
    // Two windows of 2048 tokens (the second halves scored).
    let ppl = |k, v| {
        let opts = llama_core::PerplexityOptions::default()
            .n_ctx(2048)
            .max_chunks(2)
            .kv_type_k(k)
            .kv_type_v(v);
        llama_core::Perplexity::measure(model(), &text, &opts, |_, _| {
            std::ops::ControlFlow::Continue(())
        })
        .unwrap()
        .perplexity
    };
    let base = ppl(F16, F16);
    let rel = |x: f64| (x - base) / base;
    let (f32_, q8, q4, q4k) = (
        ppl(F32, F32),
        ppl(Q8_0, Q8_0),
        ppl(Q4_0, Q4_0),
        ppl(Q4_0, F16),
    );
    println!(
        "perplexity, 2 windows of 2048: f16 {base:.4}, f32 {:+.3}%, q8_0 {:+.3}%, q4_0 {:+.3}%, q4_0 keys {:+.3}%",
        rel(f32_) * 100.0,
        rel(q8) * 100.0,
        rel(q4) * 100.0,
        rel(q4k) * 100.0
    );
    // llama.cpp's increases on this model (docs/performance.md, 8 windows): q8_0 +0.08%, q4_0
    // +7.41%; ours measured there -0.05%/+0.07% and +6.62%.
    // f16 follows llama.cpp's f16 arithmetic (queries and weights rounded), f32 is exact.
    assert!(rel(f32_).abs() < 0.01, "f32 {}", rel(f32_));
    assert!(rel(q8).abs() < 0.003, "q8_0 {}", rel(q8));
    assert!(rel(q4) > 0.0 && rel(q4) < 0.09, "q4_0 {}", rel(q4));
    assert!(
        rel(q4k) > 0.0 && rel(q4k) < rel(q4) + 0.01,
        "q4_0 keys {}",
        rel(q4k)
    );
}
