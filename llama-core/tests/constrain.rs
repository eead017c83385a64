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

/// Whether a text matches what its constraint asked for, checked independently.
type Check = Box<dyn Fn(&str) -> bool>;

#[test]
fn random_models_follow_every_constraint() {
    let schema = serde_json::json!({"type": "object", "properties": {
        "n": {"type": "integer", "minimum": -5, "maximum": 5},
        "s": {"type": "string", "pattern": "^[a-c]{1,4}$"}},
        "required": ["n", "s"], "additionalProperties": false});
    let dashed = regex::Regex::new("^[0-9]{2}-[xyz]+$").unwrap();
    let tuple = regex::Regex::new(r"^\([0-9]+(,[0-9]+)*\)$").unwrap();
    let short = regex::Regex::new("^[a-c]{1,4}$").unwrap();
    for (name, m) in models() {
        let g = m
            .compile_constraint(&Constraint::JsonSchema(schema.clone()))
            .unwrap();
        let choices = ["alpha", "beta", "gamma delta"];
        let (dashed, tuple) = (dashed.clone(), tuple.clone());
        let cases: Vec<(Constraint, Check)> = vec![
            (
                Constraint::Regex("[0-9]{2}-[xyz]+".into()),
                Box::new(move |t: &str| dashed.is_match(t)),
            ),
            (
                Constraint::Choices(choices.iter().map(|s| s.to_string()).collect()),
                Box::new(move |t: &str| choices.contains(&t)),
            ),
            (
                Constraint::grammar("root ::= \"(\" [0-9]+ (\",\" [0-9]+)* \")\""),
                Box::new(move |t: &str| tuple.is_match(t)),
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
            // Generates after the same three tokens on a fresh session.
            let mut run = |opts: GenerateOptions| {
                let mut s = m.session(SessionOptions::default().n_ctx(256)).unwrap();
                s.generate(&[1, 2, 3], &mut smp, opts, |_| ControlFlow::Continue(()))
                    .unwrap()
            };
            let out = run(GenerateOptions::default()
                .grammar(g.clone())
                .max_tokens(120));
            if out.stop_reason == StopReason::GrammarComplete {
                let v: serde_json::Value = serde_json::from_str(&out.text)
                    .unwrap_or_else(|e| panic!("{name}: {e} {:?}", out.text));
                // An integer (`-0` is one: JSON has no integer type of its own).
                let n = v["n"].as_f64().unwrap_or_else(|| panic!("{name}: {v}"));
                assert_eq!(n.fract(), 0.0, "{name}: {v}");
                assert!((-5.0..=5.0).contains(&n), "{name}: {v}");
                assert!(short.is_match(v["s"].as_str().unwrap()), "{name}: {v}");
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
                let out = run(GenerateOptions::default()
                    .constrain(c.clone())
                    .max_tokens(40));
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

/// A Llama 3.1-style template (tools in a system turn, calls as `{"name", "parameters"}`,
/// results as `ipython` turns), as a tiny HF folder's tokenizer_config.json carries it.
const LLAMA31_TOOLS_TEMPLATE: &str = r#"{{- bos_token }}{%- if tools is not none %}<|start_header_id|>system<|end_header_id|>

You have these tools. To call one write {"name": function name, "parameters": arguments}.
{%- for t in tools %}
{{ t | tojson }}
{%- endfor %}<|eot_id|>{%- endif %}
{%- for message in messages %}
{%- if message.tool_calls is defined and message.tool_calls %}{%- set tool_call = message.tool_calls[0].function %}<|start_header_id|>assistant<|end_header_id|>

{{- '{"name": "' + tool_call.name + '", "parameters": ' + (tool_call.arguments | tojson) + '}' }}<|eot_id|>
{%- elif message.role == "tool" %}<|start_header_id|>ipython<|end_header_id|>

{{ message.content }}<|eot_id|>
{%- else %}<|start_header_id|>{{ message.role }}<|end_header_id|>

{{ message.content }}<|eot_id|>{%- endif %}
{%- endfor %}{%- if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>

{% endif %}"#;

#[test]
fn llama3_tool_calls_through_a_template_that_reads_tools() {
    use llama_core::{Message, Tool, ToolChoice, ToolFormat};
    let t = build(Spec {
        seed: 43,
        ..Default::default()
    });
    let cfg_path = t.hf.join("tokenizer_config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["chat_template"] = LLAMA31_TOOLS_TEMPLATE.into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let m = Model::load(&t.hf, ModelOptions::default()).unwrap();
    assert_eq!(
        ToolFormat::of_template(m.chat_template()),
        ToolFormat::Llama3
    );
    let tools = vec![Tool::from_json(&serde_json::json!({"type": "function", "function": {
        "name": "lookup", "description": "Looks a word up",
        "parameters": {"type": "object", "properties": {"word": {"type": "string", "pattern": "^[a-z]{1,6}$"}},
                       "required": ["word"], "additionalProperties": false}}}))
    .unwrap()];
    let mut msgs = vec![Message::user("define cat")];
    let rendered = m
        .apply_chat_template_with_tools(&msgs, &tools, true)
        .unwrap();
    assert!(
        rendered.contains("You have these tools") && rendered.contains("\"name\":\"lookup\""),
        "{rendered}"
    );
    // Without tools the template's tools block is absent (`tools` is none).
    let plain = m.apply_chat_template(&msgs, true).unwrap();
    assert!(!plain.contains("You have these tools"), "{plain}");
    let word = regex::Regex::new("^[a-z]{1,6}$").unwrap();
    let mut complete = 0;
    for seed in 0..3u64 {
        let mut smp = Sampler::new(SamplerConfig::default().temperature(1.0).seed(seed)).unwrap();
        let mut s = m.session(SessionOptions::default().n_ctx(1024)).unwrap();
        let out = s
            .generate(
                &msgs,
                &mut smp,
                GenerateOptions::default()
                    .tools(tools.clone(), ToolChoice::Required)
                    .max_tokens(200),
                |_| ControlFlow::Continue(()),
            )
            .unwrap();
        if out.stop_reason == StopReason::GrammarComplete {
            assert!(
                out.text
                    .starts_with("{\"name\": \"lookup\", \"parameters\": "),
                "{:?}",
                out.text
            );
            assert_eq!(out.tool_calls.len(), 1, "{:?}", out.text);
            let w = out.tool_calls[0].arguments["word"].as_str().unwrap();
            assert!(word.is_match(w), "{w}");
            complete += 1;
        } else {
            assert_eq!(
                out.stop_reason,
                StopReason::GrammarIncomplete,
                "{:?}",
                out.text
            );
            assert!(out.tool_calls.is_empty());
        }
    }
    assert!(complete > 0, "no call completed in 200 tokens");
    // The call goes back through the template in its own format.
    msgs.push(Message::tool_calls(vec![llama_core::ToolCall {
        name: "lookup".into(),
        arguments: serde_json::json!({"word": "cat"}),
    }]));
    msgs.push(Message::tool("a small feline"));
    let r = m
        .apply_chat_template_with_tools(&msgs, &tools, true)
        .unwrap();
    assert!(
        r.contains("{\"name\": \"lookup\", \"parameters\": {\"word\":\"cat\"}}"),
        "{r}"
    );
    assert!(
        r.contains("ipython<|end_header_id|>\n\na small feline"),
        "{r}"
    );
}
