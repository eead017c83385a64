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
    let (ok, out, err) = llama(&["bench", "--model", &m, "--json", "-r", "1", "-t", "2"]);
    assert!(ok, "{err}");
    let j: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    for k in [
        "pp128_tps",
        "pp512_tps",
        "tg128_tps",
        "ttft_ms",
        "peak_rss_mib",
        "load_s",
    ] {
        let v = j[k]
            .as_f64()
            .unwrap_or_else(|| panic!("{k} missing: {out}"));
        assert!(v > 0.0 && v.is_finite(), "{k} = {v}");
    }
    assert_eq!(j["weights"], "Q4_1");
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
