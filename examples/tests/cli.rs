//! End-to-end tests of the `llama` program on the real model.

use std::io::Write;
use std::process::{Command, Stdio};

fn model() -> String {
    let cache = std::env::var("LLAMA_CORE_CACHE").unwrap_or_else(|_| {
        let base = std::env::var("XDG_CACHE_HOME")
            .unwrap_or_else(|_| format!("{}/.cache", std::env::var("HOME").unwrap()));
        format!("{base}/llama-core")
    });
    let p = format!("{cache}/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        std::path::Path::new(&p).is_file(),
        "run scripts/fetch-model.sh first ({p} missing)"
    );
    p
}

fn llama(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_llama"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn reference() -> serde_json::Value {
    serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/reference/smollm2.json"
        ))
        .unwrap(),
    )
    .unwrap()
}

#[test]
fn generate_json_is_greedy_at_temperature_zero() {
    let m = model();
    let (ok, out, err) = llama(&[
        "generate",
        "--model",
        &m,
        "--prompt",
        "1, 2, 3, 4, 5,",
        "--temperature",
        "0",
        "--max-tokens",
        "12",
        "--json",
    ]);
    assert!(ok, "{err}");
    let j: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let r = reference();
    let case = r["greedy"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["prompt"] == "1, 2, 3, 4, 5,")
        .unwrap();
    assert_eq!(j["prompt_ids"], case["prompt_ids"]);
    let want: Vec<u64> = case["ids"]
        .as_array()
        .unwrap()
        .iter()
        .take(12)
        .map(|v| v.as_u64().unwrap())
        .collect();
    let got: Vec<u64> = j["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(got, want);
    assert_eq!(j["stop_reason"], "max_tokens");
    assert!(j["text"].as_str().unwrap().starts_with(" 6, 7"));
    assert!(j["timings"]["generation_tps"].as_f64().unwrap() > 0.0);
    assert!(err.contains("tok/s"), "summary on stderr: {err}");
}

#[test]
fn chat_json_prompt_ids_are_the_rendered_template() {
    let m = model();
    let r = reference();
    let case = &r["chat"][0];
    let question = case["messages"][0]["content"].as_str().unwrap();
    let (ok, out, err) = llama(&[
        "chat",
        "--model",
        &m,
        "--prompt",
        question,
        "--temperature",
        "0",
        "--max-tokens",
        "8",
        "--json",
    ]);
    assert!(ok, "{err}");
    let j: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(j["prompt_ids"], case["prompt_ids"]);
}

#[test]
fn tokenize_json_and_stdin() {
    let m = model();
    let (ok, out, _) = llama(&[
        "tokenize",
        "--model",
        &m,
        "--json",
        "--special",
        "<|im_start|>user",
    ]);
    assert!(ok);
    let j: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(j["ids"][0], 1);
    let mut child = Command::new(env!("CARGO_BIN_EXE_llama"))
        .args(["tokenize", "--model", &m, "--json", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all("Hello world".as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["ids"], serde_json::json!([19556, 905]));
}

#[test]
fn errors_are_reported_not_panics() {
    let (ok, _, err) = llama(&[
        "generate",
        "--model",
        "/no/such/model.gguf",
        "--prompt",
        "x",
    ]);
    assert!(!ok);
    assert!(
        err.starts_with("error:") && err.contains("/no/such/model.gguf"),
        "{err}"
    );
    assert!(!err.contains("panicked"));
    let m = model();
    let (ok, _, err) = llama(&["generate", "--model", &m, "--prompt", "x", "--top-p", "2"]);
    assert!(!ok);
    assert!(err.contains("top_p"), "{err}");
    // An empty API key is refused before anything is loaded, from the flag or the environment.
    let (ok, _, err) = llama(&["serve", "--model", &m, "--port", "0", "--api-key", ""]);
    assert!(
        !ok && err.contains("API key") && err.contains("empty"),
        "{err}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_llama"))
        .args(["serve", "--model", &m, "--port", "0"])
        .env("LLAMA_API_KEY", "")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("empty"), "{err}");
    let (ok, _, err) = llama(&["serve", "--model", &m, "--allow-host", "a b"]);
    assert!(!ok && err.contains("allow-host"), "{err}");
}

#[test]
fn interactive_chat_two_turns() {
    let m = model();
    let mut child = Command::new(env!("CARGO_BIN_EXE_llama"))
        .args([
            "chat",
            "--model",
            &m,
            "--temperature",
            "0",
            "--max-tokens",
            "6",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"Hi\nName a color.\n\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        err.matches("stop: ").count(),
        2,
        "two turns answered: {err}"
    );
}

#[test]
fn quantize_writes_a_gguf_and_reports_fallbacks() {
    let m = model();
    let dir = std::env::temp_dir().join(format!("llama-cli-q-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("q4k.gguf");
    let (ok, _, err) = llama(&["quantize", &m, out.to_str().unwrap(), "--type", "q4_k"]);
    assert!(ok, "{err}");
    // SmolLM2's rows of 576 do not fit q4_k's super-blocks: the fallback is reported.
    assert!(
        err.contains("q5_0 instead") && err.contains("wrote"),
        "{err}"
    );
    let (ok, out_json, err) = llama(&[
        "generate",
        "--model",
        out.to_str().unwrap(),
        "--prompt",
        "1, 2, 3,",
        "--temperature",
        "0",
        "--max-tokens",
        "4",
        "--json",
    ]);
    assert!(ok, "{err}");
    let j: serde_json::Value = serde_json::from_str(out_json.trim()).unwrap();
    assert_eq!(j["ids"].as_array().unwrap().len(), 4);
    // Bad input: an unknown type and an unwritable destination; no file is left behind.
    let (ok, _, err) = llama(&[
        "quantize",
        &m,
        dir.join("x.gguf").to_str().unwrap(),
        "--type",
        "q3_x",
    ]);
    assert!(!ok && err.contains("unknown type"), "{err}");
    let (ok, _, err) = llama(&["quantize", &m, "/no/such/dir/x.gguf", "--type", "q8_0"]);
    assert!(
        !ok && err.contains("error: I/O error on /no/such/dir/x.gguf") && !err.contains("panicked"),
        "{err}"
    );
    assert!(!dir.join("x.gguf").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bench_json_has_every_field() {
    let m = model();
    let (ok, out, err) = llama(&[
        "bench",
        "--model",
        &m,
        "--json",
        "-r",
        "1",
        "-t",
        "2",
        "--bandwidth",
    ]);
    assert!(ok, "{err}");
    let j: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    for k in [
        "pp128_tps",
        "pp512_tps",
        "tg128_tps",
        "ttft_ms",
        "peak_rss_mib",
        "load_s",
        "decode_bytes",
        "decode_gbps",
        "read_gbps",
    ] {
        let v = j[k]
            .as_f64()
            .unwrap_or_else(|| panic!("{k} missing: {out}"));
        assert!(v > 0.0 && v.is_finite(), "{k} = {v}");
    }
    assert_eq!(j["weights"], "Q4_1");
    // The bytes a decode step reads: every layer's matrices and the tied head (SmolLM2's
    // embedding, 49152 x 576), less than the whole file.
    let bytes = j["decode_bytes"].as_f64().unwrap();
    assert!(bytes > 49152.0 * 576.0 * 0.5 && bytes < 120e6, "{bytes}");
    let gbps = bytes * j["tg128_tps"].as_f64().unwrap() / 1e9;
    assert!((j["decode_gbps"].as_f64().unwrap() - gbps).abs() < 1e-6 * gbps);
}

/// The kernel path and thread count are CLI options (and their environment variables); every
/// path gives the same greedy tokens here, and a bad name is an error line, not a panic.
#[test]
fn kernel_and_threads_are_options() {
    let m = model();
    let ids = |extra: &[&str], env: Option<(&str, &str)>| -> Result<serde_json::Value, String> {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_llama"));
        cmd.args(["generate", "--model", &m, "--prompt", "1, 2, 3,"])
            .args(["--temperature", "0", "--max-tokens", "6", "--json"])
            .args(extra);
        if let Some((k, v)) = env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        Ok(j["ids"].clone())
    };
    let auto = ids(&[], None).unwrap();
    assert_eq!(auto.as_array().map(|a| a.len()), Some(6));
    assert_eq!(ids(&["--kernel", "scalar", "-t", "1"], None).unwrap(), auto);
    assert_eq!(
        ids(&[], Some(("LLAMA_CORE_KERNEL", "candle"))).unwrap(),
        auto
    );
    assert_eq!(ids(&[], Some(("LLAMA_THREADS", "1"))).unwrap(), auto);
    let err = ids(&["--kernel", "avx1024"], None).unwrap_err();
    assert!(
        err.contains("unknown kernel") && !err.contains("panicked"),
        "{err}"
    );
    let err = ids(&["-t", "100000"], None).unwrap_err();
    assert!(
        err.contains("threads") && !err.contains("panicked"),
        "{err}"
    );
}

/// Greedy ids of `llama generate --json` with extra arguments.
fn greedy_ids(m: &str, prompt: &str, extra: &[&str]) -> Vec<u64> {
    let mut args = vec![
        "generate",
        "--model",
        m,
        "--prompt",
        prompt,
        "--temperature",
        "0",
        "--max-tokens",
        "16",
        "--json",
    ];
    args.extend_from_slice(extra);
    let (ok, out, err) = llama(&args);
    assert!(ok, "{args:?}: {err}");
    let j: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    j["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect()
}

#[test]
fn lora_flags_merge_and_convert() {
    use llama_core::gguf::{write_gguf, GgufTensor, Value};
    let m = model();
    let model = llama_core::Model::load(&m, llama_core::ModelOptions::default()).unwrap();
    let c = model.config().clone();
    let dir = std::env::temp_dir().join(format!("llama-cli-lora-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // A GGUF LoRA on Q and V of every layer, rank 4, values from a small formula.
    let (h, q, kv, r) = (
        c.hidden_size,
        c.num_attention_heads * c.head_dim,
        c.num_key_value_heads * c.head_dim,
        4,
    );
    let vals = |n: usize, s: usize| -> Vec<u8> {
        (0..n)
            .flat_map(|i| (((i * 2654435761 + s) % 2001) as f32 / 4000.0 - 0.25).to_le_bytes())
            .collect()
    };
    let mut tensors = vec![];
    for l in 0..c.num_hidden_layers {
        for (name, out) in [("attn_q", q), ("attn_v", kv)] {
            tensors.push(GgufTensor {
                name: format!("blk.{l}.{name}.weight.lora_a"),
                shape: vec![r, h],
                dtype: candle_core::quantized::GgmlDType::F32,
                data: vals(r * h, l),
            });
            tensors.push(GgufTensor {
                name: format!("blk.{l}.{name}.weight.lora_b"),
                shape: vec![out, r],
                dtype: candle_core::quantized::GgmlDType::F32,
                data: vals(out * r, l + 7),
            });
        }
    }
    let meta = vec![
        (
            "general.architecture".to_string(),
            Value::String("llama".into()),
        ),
        ("general.type".to_string(), Value::String("adapter".into())),
        ("adapter.type".to_string(), Value::String("lora".into())),
        ("adapter.lora.alpha".to_string(), Value::F32(8.0)),
    ];
    let lora = dir.join("lora.gguf");
    write_gguf(&lora, &meta, &tensors).unwrap();
    let lora_s = lora.to_str().unwrap();
    let prompt = "The capital of France is";
    let base = greedy_ids(&m, prompt, &[]);
    let with = greedy_ids(&m, prompt, &["--lora", lora_s]);
    assert_ne!(base, with, "the adapter changes the continuation");
    // The library gives the same tokens with the same adapter.
    let a = model.load_adapter(&lora).unwrap();
    let mut s = model
        .session(llama_core::SessionOptions::default())
        .unwrap();
    s.set_adapters(&[(a, 1.0)]).unwrap();
    let ids = model.tokenize(prompt, true, true).unwrap();
    let g = s
        .generate(
            &ids,
            &mut llama_core::Sampler::greedy(),
            llama_core::GenerateOptions::default().max_tokens(16),
            |_| std::ops::ControlFlow::Continue(()),
        )
        .unwrap();
    assert_eq!(with, g.tokens.iter().map(|&t| t as u64).collect::<Vec<_>>());
    // Scale 0 is the base model.
    assert_eq!(
        greedy_ids(&m, prompt, &["--lora", &format!("{lora_s}:0")]),
        base
    );
    // To PEFT and back through the CLI: the same tokens.
    let peft = dir.join("peft");
    let (ok, _, err) = llama(&["lora", "convert", "-m", &m, lora_s, peft.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(peft.join("adapter_config.json").is_file());
    assert_eq!(
        greedy_ids(&m, prompt, &["--lora", peft.to_str().unwrap()]),
        with
    );
    let back = dir.join("back.gguf");
    let (ok, _, err) = llama(&[
        "lora",
        "convert",
        "-m",
        &m,
        peft.to_str().unwrap(),
        back.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert_eq!(
        greedy_ids(&m, prompt, &["--lora", back.to_str().unwrap()]),
        with
    );
    // Merged into a GGUF file and into a Hugging Face folder: both load and run.
    let merge = |out: &std::path::Path, format: &[&str]| {
        let out = out.to_str().unwrap();
        let args = [
            &["lora", "merge", "-m", &m, "--lora", lora_s, "-o", out],
            format,
        ]
        .concat();
        let (ok, _, err) = llama(&args);
        assert!(ok, "{err}");
    };
    let merged = dir.join("merged.gguf");
    merge(&merged, &["--type", "q8_0"]);
    assert_eq!(greedy_ids(merged.to_str().unwrap(), prompt, &[]).len(), 16);
    let hf = dir.join("merged-hf");
    merge(&hf, &["--hf", "f16"]);
    assert!(hf.join("model.safetensors").is_file() && hf.join("config.json").is_file());
    // bench and perplexity take --lora.
    let (ok, out, err) = llama(&["bench", "-m", &m, "-r", "1", "--json", "--lora", lora_s]);
    assert!(ok, "{err}");
    let j: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(j["lora"][0], lora_s);
    // A missing adapter is an error naming it, not a panic.
    let (ok, _, err) = llama(&[
        "generate",
        "-m",
        &m,
        "-p",
        "x",
        "--lora",
        "/no/such/adapter",
    ]);
    assert!(
        !ok && err.contains("/no/such/adapter") && !err.contains("panicked"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
