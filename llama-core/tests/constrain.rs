//! Constraints on tiny random models of both vocabulary kinds (byte-level BPE, SentencePiece
//! with byte fallback), from GGUF files and HF folders: the token table spells text exactly as
//! the tokenizer does, and a random model's sampled output still matches every constraint.

mod common;

use std::ops::ControlFlow;

use common::tiny::{build, Spec, Vocab};
use llama_core::{
    Constraint, GenerateOptions, Model, ModelOptions, Sampler, SamplerConfig, SessionOptions,
    StopReason,
};

const TEXTS: [&str; 4] = [
    "Hello world, 12345!",
    "  two  spaces\nand a newline\ttab",
    "héllo wörld — ünïcode 日本語 🦙",
    "{\"json\": [1, 2.5, true, null]}",
];

fn models() -> Vec<(String, Model)> {
    let mut out = vec![];
    for (vocab, seed) in [(Vocab::Bpe, 41), (Vocab::Spm, 42)] {
        let t = build(Spec {
            vocab,
            seed,
            ..Default::default()
        });
        for (kind, path) in [("gguf", t.gguf.clone()), ("hf", t.hf.clone())] {
            let m = Model::load(&path, ModelOptions::default()).unwrap();
            out.push((format!("{vocab:?} {kind}"), m));
        }
        // Keep the files alive for the models' mmaps.
        std::mem::forget(t);
    }
    out
}

#[test]
fn token_bytes_spell_the_tokenized_text() {
    for (name, m) in models() {
        let tok = m.tokenizer();
        let bytes = tok.token_bytes();
        assert_eq!(bytes.len(), tok.vocab_size(), "{name}");
        for text in TEXTS {
            let ids = tok.encode(text, false, false).unwrap();
            let spelled: Vec<u8> = ids
                .iter()
                .flat_map(|&i| bytes[i as usize].clone())
                .collect();
            let decoded = tok.decode(&ids, false).unwrap();
            // SentencePiece adds a leading space that decoding strips again.
            let spelled = String::from_utf8(spelled).unwrap();
            assert!(
                spelled == text || spelled.strip_prefix(' ') == Some(text),
                "{name}: {text:?} spelled {spelled:?}"
            );
            assert_eq!(decoded, text, "{name}");
        }
        // Special tokens carry the 0xFF marker.
        if let Some(eos) = tok.eos_id() {
            assert_eq!(bytes[eos as usize][0], 0xFF, "{name}");
        }
    }
}

#[test]
fn random_models_follow_every_constraint() {
    let schema = serde_json::json!({"type": "object", "properties": {
        "n": {"type": "integer", "minimum": -5, "maximum": 5},
        "s": {"type": "string", "pattern": "^[a-c]{1,4}$"}},
        "required": ["n", "s"], "additionalProperties": false});
    for (name, m) in models() {
        let g = m
            .compile_constraint(&Constraint::JsonSchema(schema.clone()))
            .unwrap();
        let choices = ["alpha", "beta", "gamma delta"];
        let cases: Vec<(Constraint, Box<dyn Fn(&str) -> bool>)> = vec![
            (
                Constraint::Regex("[0-9]{2}-[xyz]+".into()),
                Box::new(|t: &str| regex::Regex::new("^[0-9]{2}-[xyz]+$").unwrap().is_match(t)),
            ),
            (
                Constraint::Choices(choices.iter().map(|s| s.to_string()).collect()),
                Box::new(move |t: &str| choices.contains(&t)),
            ),
            (
                Constraint::grammar("root ::= \"(\" [0-9]+ (\",\" [0-9]+)* \")\""),
                Box::new(|t: &str| {
                    regex::Regex::new(r"^\([0-9]+(,[0-9]+)*\)$")
                        .unwrap()
                        .is_match(t)
                }),
            ),
        ];
        for seed in 0..4u64 {
            let mut smp = Sampler::new(
                SamplerConfig::default()
                    .temperature(1.5)
                    .top_k(0)
                    .top_p(1.0)
                    .min_p(0.0)
                    .seed(seed),
            )
            .unwrap();
            let mut s = m.session(SessionOptions::default().n_ctx(256)).unwrap();
            let out = s
                .generate(
                    &[1, 2, 3],
                    &mut smp,
                    GenerateOptions::default()
                        .grammar(g.clone())
                        .max_tokens(120),
                    |_| ControlFlow::Continue(()),
                )
                .unwrap();
            if out.stop_reason == StopReason::GrammarComplete {
                let v: serde_json::Value = serde_json::from_str(&out.text)
                    .unwrap_or_else(|e| panic!("{name}: {e} {:?}", out.text));
                // An integer (`-0` is one: JSON has no integer type of its own).
                let n = v["n"].as_f64().unwrap_or_else(|| panic!("{name}: {v}"));
                assert_eq!(n.fract(), 0.0, "{name}: {v}");
                assert!((-5.0..=5.0).contains(&n), "{name}: {v}");
                assert!(
                    regex::Regex::new("^[a-c]{1,4}$")
                        .unwrap()
                        .is_match(v["s"].as_str().unwrap()),
                    "{name}: {v}"
                );
            } else {
                assert_eq!(
                    out.stop_reason,
                    StopReason::GrammarIncomplete,
                    "{name}: {:?}",
                    out.text
                );
                assert_eq!(out.tokens.len(), 120);
            }
            for (c, ok) in &cases {
                let mut s = m.session(SessionOptions::default().n_ctx(256)).unwrap();
                let out = s
                    .generate(
                        &[1, 2, 3],
                        &mut smp,
                        GenerateOptions::default()
                            .constrain(c.clone())
                            .max_tokens(40),
                        |_| ControlFlow::Continue(()),
                    )
                    .unwrap();
                match out.stop_reason {
                    StopReason::GrammarComplete
                    | StopReason::EndOfGeneration
                    | StopReason::MaxTokens => {
                        assert!(
                            ok(&out.text),
                            "{name} {c:?}: {:?} ({:?})",
                            out.text,
                            out.stop_reason
                        )
                    }
                    StopReason::GrammarIncomplete => assert_eq!(out.tokens.len(), 40),
                    other => panic!("{name} {c:?}: {other:?}"),
                }
            }
        }
    }
}
