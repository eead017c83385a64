//! A mutation fuzzer on stable Rust for every parser of untrusted bytes: the GGUF reader and
//! model load, config.json, safetensors headers (an HF folder load), tokenizer.json, chat
//! templates, session snapshots, LoRA adapters (PEFT config and safetensors, GGUF LoRA),
//! training data (JSONL), training checkpoints and constraints (JSON schemas, Lark, GBNF,
//! regexes, choices). Seeds are a tiny model's own files (built here) and the
//! hostile snippets below; each input must give `Ok` or a clean `Err`, never a panic, and
//! finish in bounded time. By default each target runs a fixed number of inputs (the same ones
//! on every run: about half a minute for all of them); `LLAMA_FUZZ_SECS` runs each for that
//! many seconds instead, exploring further (`make fuzz`). A failing input is written to
//! `target/fuzz-failures/` and the test fails: fix it, then keep the input as a regression
//! test (`tests/fuzz-regressions/`, `bad_input.rs`).

mod common;

use std::path::Path;
use std::time::Duration;

use common::fuzzer::fuzz;
use common::tiny::{build, Spec, Tiny};
use llama_core::{
    Constraint, GenerateOptions, Message, Model, ModelOptions, Sampler, Session, SessionOptions,
};

fn tiny() -> Tiny {
    build(Spec {
        seed: 5,
        ..Default::default()
    })
}

#[test]
fn fuzz_gguf_reader_and_model_load() {
    let t = tiny();
    let seed = std::fs::read(&t.gguf).unwrap();
    let p = t.dir.path().join("fuzz.gguf");
    fuzz("gguf", &[seed], Duration::from_secs(5), 2000, |input| {
        std::fs::write(&p, input).unwrap();
        if llama_core::gguf::GgufFile::open(&p).is_ok() {
            if let Ok(m) = Model::load(&p, ModelOptions::default()) {
                let mut s = m.session(SessionOptions::default().n_ctx(16)).unwrap();
                let _ = s.eval(&[1, 2, 3]);
            }
        }
    });
}

#[test]
fn fuzz_hf_folder_config_and_safetensors() {
    let t = tiny();
    let config = std::fs::read(t.hf.join("config.json")).unwrap();
    let st = std::fs::read(t.hf.join("model.safetensors")).unwrap();
    // The safetensors header (an 8-byte length and JSON) is what a lying file lies in.
    let header_len = 8 + u64::from_le_bytes(st[..8].try_into().unwrap()) as usize;
    let (head, body) = st.split_at(header_len.min(st.len()));
    let dir = t.hf.clone();
    let seeds = vec![config.clone(), head.to_vec()];
    fuzz("hf-folder", &seeds, Duration::from_secs(5), 4000, |input| {
        // Either the config or the safetensors header is mutated, the other kept.
        if input.first() == Some(&b'{') {
            std::fs::write(dir.join("config.json"), input).unwrap();
            std::fs::write(dir.join("model.safetensors"), &st).unwrap();
        } else {
            std::fs::write(dir.join("config.json"), &config).unwrap();
            let mut file = input.to_vec();
            file.extend_from_slice(body);
            std::fs::write(dir.join("model.safetensors"), file).unwrap();
        }
        let _ = Model::load(&dir, ModelOptions::default());
    });
}

#[test]
fn fuzz_tokenizer_json() {
    let t = tiny();
    let tok = std::fs::read(t.hf.join("tokenizer.json")).unwrap();
    let p = t.dir.path().join("fuzz-tokenizer.json");
    fuzz(
        "tokenizer-json",
        &[tok],
        Duration::from_secs(5),
        15000,
        |input| {
            std::fs::write(&p, input).unwrap();
            if let Ok(tk) = llama_core::Tokenizer::from_hf_files(&p, None) {
                let _ = tk.encode("hello world <s> 123", true, true);
            }
        },
    );
}

#[test]
fn fuzz_chat_templates() {
    let seeds: Vec<Vec<u8>> = [
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
        "{{ bos_token }}{% for m in messages %}{% if m.role == 'user' %}[INST] {{ m.content | trim }} [/INST]{% else %}{{ m.content }}{{ eos_token }}{% endif %}{% endfor %}",
        "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
        "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
        "{{ raise_exception('no') }}{{ strftime_now('%Y-%m-%d') }}",
        "{% set x = messages[0].content.split(' ') %}{{ x | join('-') | upper }}{{ x[99] }}",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    let msgs = [
        Message::system("be brief"),
        Message::user("hello there"),
        Message::assistant("hi"),
    ];
    fuzz(
        "chat-template",
        &seeds,
        Duration::from_secs(2),
        15000,
        |input| {
            let t = String::from_utf8_lossy(input);
            let _ = llama_core::chat::render_template(&t, &msgs, true, "<s>", "</s>");
        },
    );
}

/// A PEFT adapter folder for the tiny model: q_proj and down_proj of every layer, rank 2.
fn peft_adapter(t: &Tiny, dir: &Path) {
    use candle_core::{Device, Tensor};
    std::fs::create_dir_all(dir).unwrap();
    let s = &t.spec;
    let cfg = serde_json::json!({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
        "target_modules": ["q_proj", "down_proj"], "rank_pattern": {"down_proj": 2},
        "alpha_pattern": {"q_proj": 3}, "use_rslora": false, "bias": "none"});
    std::fs::write(dir.join("adapter_config.json"), cfg.to_string()).unwrap();
    let mut map = std::collections::HashMap::new();
    for l in 0..s.layers {
        for (m, out, inp) in [
            ("self_attn.q_proj", s.heads * s.head_dim, s.hidden),
            ("mlp.down_proj", s.hidden, s.ff),
        ] {
            let vals = |n: usize| {
                (0..n)
                    .map(|i| ((i % 7) as f32 - 3.0) / 10.0)
                    .collect::<Vec<_>>()
            };
            let p = format!("base_model.model.model.layers.{l}.{m}");
            map.insert(
                format!("{p}.lora_A.weight"),
                Tensor::from_vec(vals(2 * inp), (2, inp), &Device::Cpu).unwrap(),
            );
            map.insert(
                format!("{p}.lora_B.weight"),
                Tensor::from_vec(vals(out * 2), (out, 2), &Device::Cpu).unwrap(),
            );
        }
    }
    candle_core::safetensors::save(&map, dir.join("adapter_model.safetensors")).unwrap();
}

#[test]
fn fuzz_lora_adapters() {
    let t = tiny();
    let m = Model::load(&t.gguf, ModelOptions::default()).unwrap();
    let src = t.dir.path().join("peft-seed");
    peft_adapter(&t, &src);
    let a = m.load_adapter(&src).unwrap();
    let gg = t.dir.path().join("seed-lora.gguf");
    llama_core::lora::write_gguf_lora(&gg, &a, m.config()).unwrap();
    let config = std::fs::read(src.join("adapter_config.json")).unwrap();
    let st = std::fs::read(src.join("adapter_model.safetensors")).unwrap();
    let header_len = 8 + u64::from_le_bytes(st[..8].try_into().unwrap()) as usize;
    let (head, body) = st.split_at(header_len.min(st.len()));
    let seeds = vec![config.clone(), head.to_vec(), std::fs::read(&gg).unwrap()];
    let dir = t.dir.path().join("peft-fuzz");
    std::fs::create_dir_all(&dir).unwrap();
    let file = t.dir.path().join("fuzz-lora.gguf");
    fuzz("lora", &seeds, Duration::from_secs(5), 6000, |input| {
        // A GGUF LoRA file, or one of the PEFT folder's two files mutated, the other kept.
        let loaded = if input.starts_with(b"GGUF") {
            std::fs::write(&file, input).unwrap();
            m.load_adapter(&file)
        } else {
            if input.first() == Some(&b'{') {
                std::fs::write(dir.join("adapter_config.json"), input).unwrap();
                std::fs::write(dir.join("adapter_model.safetensors"), &st).unwrap();
            } else {
                std::fs::write(dir.join("adapter_config.json"), &config).unwrap();
                let mut f = input.to_vec();
                f.extend_from_slice(body);
                std::fs::write(dir.join("adapter_model.safetensors"), f).unwrap();
            }
            m.load_adapter(&dir)
        };
        if let Ok(a) = loaded {
            let mut s = m.session(SessionOptions::default().n_ctx(16)).unwrap();
            s.set_adapters(&[(a, 1.0)]).unwrap();
            let _ = s.eval(&[1, 2, 3]);
        }
    });
}

#[test]
fn fuzz_session_snapshots() {
    let t = tiny();
    let m = Model::load(&t.gguf, ModelOptions::default()).unwrap();
    let mut s = m.session(SessionOptions::default().n_ctx(32)).unwrap();
    s.eval(&[1, 2, 3, 4, 5]).unwrap();
    let seed = s.save_state(None).unwrap();
    // A snapshot that records an adapter.
    let src = t.dir.path().join("peft-snap");
    peft_adapter(&t, &src);
    let a = m.load_adapter(&src).unwrap();
    let mut s2 = m.session(SessionOptions::default().n_ctx(32)).unwrap();
    s2.set_adapters(&[(a, 0.5)]).unwrap();
    s2.eval(&[1, 2, 3]).unwrap();
    let seed2 = s2.save_state(None).unwrap();
    fuzz(
        "session-state",
        &[seed, seed2],
        Duration::from_secs(2),
        200000,
        |input| {
            if let Ok((mut r, _)) = Session::restore(&m, input) {
                let _ = r.eval(&[6]);
            }
        },
    );
}

#[test]
fn fuzz_training_data_and_checkpoints() {
    use llama_core::train::{load_jsonl, TrainOptions, Trainer};
    let t = tiny();
    let m = Model::load(&t.gguf, ModelOptions::default()).unwrap();
    let data = [
        r#"{"text": "hello world"}"#,
        r#"{"prompt": "hello", "completion": " world"}"#,
        r#"{"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]}"#,
    ]
    .join("\n");
    let p = t.dir.path().join("train.jsonl");
    std::fs::write(&p, &data).unwrap();
    let train = load_jsonl(&m, &p, 64).unwrap();
    let mut tr = Trainer::new(&m, train.clone(), TrainOptions::default().seed(1)).unwrap();
    tr.step().unwrap();
    let ck = t.dir.path().join("ckpt");
    tr.save_checkpoint(&ck).unwrap();
    let state = std::fs::read(ck.join("trainer_state.json")).unwrap();
    let tensors = std::fs::read(ck.join("trainer_state.safetensors")).unwrap();
    let header_len = 8 + u64::from_le_bytes(tensors[..8].try_into().unwrap()) as usize;
    let (head, body) = tensors.split_at(header_len.min(tensors.len()));
    let fz = t.dir.path().join("fuzz-ckpt");
    std::fs::create_dir_all(&fz).unwrap();
    let fp = t.dir.path().join("fuzz.jsonl");
    let seeds = vec![data.as_bytes().to_vec(), state.clone(), head.to_vec()];
    fuzz(
        "train-data",
        &seeds,
        Duration::from_secs(5),
        3000,
        |input| {
            // Training data (a JSONL file), the checkpoint's JSON state, or its tensor header.
            if input.starts_with(br#"{""#) && !input.starts_with(b"{\n") {
                std::fs::write(&fp, input).unwrap();
                let _ = load_jsonl(&m, &fp, 64);
            } else if input.first() == Some(&b'{') {
                std::fs::write(fz.join("trainer_state.json"), input).unwrap();
                std::fs::write(fz.join("trainer_state.safetensors"), &tensors).unwrap();
                if let Ok(mut r) = Trainer::resume(&m, train.clone(), &fz) {
                    let _ = r.step();
                }
            } else {
                std::fs::write(fz.join("trainer_state.json"), &state).unwrap();
                let mut f = input.to_vec();
                f.extend_from_slice(body);
                std::fs::write(fz.join("trainer_state.safetensors"), f).unwrap();
                if let Ok(mut r) = Trainer::resume(&m, train.clone(), &fz) {
                    let _ = r.step();
                }
            }
        },
    );
}

#[test]
fn fuzz_constraints() {
    // Grammar text is untrusted: JSON schemas, Lark and GBNF grammars, regexes, each compiled
    // for the tiny model and followed for a few greedy tokens.
    let seeds: Vec<Vec<u8>> = [
        r##"{"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}, "b": {"type": "array", "items": {"enum": ["x", "y"]}, "maxItems": 3}}, "required": ["a"]}"##,
        r##"{"anyOf": [{"type": "string", "pattern": "^[a-z]{2,5}$"}, {"type": "number", "multipleOf": 0.5}], "$defs": {"n": {"$ref": "#/$defs/n"}}}"##,
        r##"{"oneOf": [{"const": 1}, {"type": "object", "properties": {"r": {"$ref": "#"}}}], "format": "date-time"}"##,
        "start: expr\nexpr: term ((\"+\" | \"-\") term)*\nterm: NUMBER | \"(\" expr \")\"\nNUMBER: /[0-9]+/\n",
        "start: \"a\"{2,4} b?\nb: %json {\"type\": \"boolean\"}\n",
        "root ::= expr\nexpr ::= term ((\"+\" | \"-\") term)*\nterm ::= [0-9]+ | \"(\" expr \")\"\n",
        "root ::= [^\\x00-\\x1f\"]{1,10} | \"\\u00e9\"+ (root)? # comment\n",
        "(a|b)*c{1,3}[x-z]+\\d?",
        "((((a*)*)*)*)*b",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    let t = tiny();
    let m = Model::load(&t.gguf, ModelOptions::default()).unwrap();
    let s = std::cell::RefCell::new(m.session(SessionOptions::default().n_ctx(64)).unwrap());
    fuzz(
        "constraint",
        &seeds,
        Duration::from_secs(5),
        1500,
        |input| {
            let text = String::from_utf8_lossy(input);
            let mut cs = vec![
                Constraint::Lark(text.to_string()),
                Constraint::Gbnf(text.to_string()),
                Constraint::Regex(text.to_string()),
                Constraint::Choices(text.split('|').map(String::from).collect()),
            ];
            if let Ok(c) = Constraint::json_schema_str(&text) {
                cs.push(c);
            }
            for c in cs {
                if let Ok(g) = m.compile_constraint(&c) {
                    let mut s = s.borrow_mut();
                    s.truncate(0);
                    let opts = GenerateOptions::default().grammar(g).max_tokens(6);
                    let _ = s.generate(&[1, 2], &mut Sampler::greedy(), opts, |_| {
                        std::ops::ControlFlow::Continue(())
                    });
                }
            }
        },
    );
}
