//! A Hugging Face model folder: config.json (with generation_config.json's EOS ids),
//! tokenizer.json and tokenizer_config.json, the chat template, and the safetensors weights
//! (sharded or not), parsed and checked.

use std::path::{Path, PathBuf};

use super::WeightSource;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;

/// The pieces of a Hugging Face model folder, parsed and checked, weights still mapped.
pub(crate) struct HfParts {
    pub(crate) config: Config,
    pub(crate) tokenizer: Tokenizer,
    pub(crate) chat_template: Option<String>,
    pub(crate) src: WeightSource,
    /// The raw tokenizer.json.
    pub(crate) tokenizer_json: serde_json::Value,
}

impl From<HfParts> for super::Parts {
    fn from(p: HfParts) -> super::Parts {
        super::Parts {
            src: p.src,
            config: p.config,
            tokenizer: p.tokenizer,
            chat_template: p.chat_template,
            format: "safetensors",
        }
    }
}

pub(crate) fn open_hf(dir: &Path) -> Result<HfParts> {
    let cfg_path = dir.join("config.json");
    if !cfg_path.is_file() {
        return Err(Error::config(
                dir,
                "not a model folder: config.json is missing (expected a Hugging Face folder or a .gguf file)",
            ));
    }
    let mut config = Config::from_hf_json(&cfg_path)?;
    config.validate(&cfg_path)?;
    let read_json = |name: &str| -> Result<Option<serde_json::Value>> {
        let p = dir.join(name);
        if !p.is_file() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| Error::config(&p, format!("not valid JSON: {e}")))
    };
    // EOS ids: config.json, generation_config.json and the tokenizer's own, unioned.
    if let Some(gen) = read_json("generation_config.json")? {
        let mut add = |v: &serde_json::Value| {
            if let Some(id) = v.as_u64() {
                if !config.eos_token_ids.contains(&(id as u32)) {
                    config.eos_token_ids.push(id as u32);
                }
            }
        };
        match gen.get("eos_token_id") {
            Some(serde_json::Value::Array(a)) => a.iter().for_each(&mut add),
            Some(v) => add(v),
            None => {}
        }
    }
    let tok_cfg = read_json("tokenizer_config.json")?;
    let tok_path = dir.join("tokenizer.json");
    if !tok_path.is_file() {
        return Err(Error::Tokenizer(format!(
            "{} is missing (the model folder needs a fast tokenizer file)",
            tok_path.display()
        )));
    }
    let mut tokenizer = Tokenizer::from_hf_files(&tok_path, tok_cfg.as_ref())?;
    tokenizer.add_eog(&config.eos_token_ids);
    let mut chat_template = tok_cfg
        .as_ref()
        .and_then(|c| c.get("chat_template"))
        .and_then(|v| v.as_str())
        .map(str::to_string);
    let jinja = dir.join("chat_template.jinja");
    if jinja.is_file() {
        chat_template = Some(std::fs::read_to_string(&jinja).map_err(|e| Error::io(&jinja, e))?);
    }
    // Weight files: the sharded index, model.safetensors, or every *.safetensors.
    let index = dir.join("model.safetensors.index.json");
    let files: Vec<PathBuf> = if index.is_file() {
        let idx = read_json("model.safetensors.index.json")?.unwrap_or_default();
        let map = idx
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::config(&index, "missing weight_map"))?;
        let mut files: Vec<PathBuf> = vec![];
        for v in map.values() {
            let f = v
                .as_str()
                .filter(|f| !f.contains("..") && !f.starts_with('/'))
                .ok_or_else(|| Error::config(&index, "invalid file name in weight_map"))?;
            let p = dir.join(f);
            if !files.contains(&p) {
                files.push(p);
            }
        }
        files
    } else if dir.join("model.safetensors").is_file() {
        vec![dir.join("model.safetensors")]
    } else {
        let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| Error::io(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        v.sort();
        v
    };
    if files.is_empty() {
        return Err(Error::weights(
            dir,
            "",
            "no .safetensors weight files found",
        ));
    }
    for f in &files {
        if !f.is_file() {
            return Err(Error::io(
                f,
                std::io::Error::new(std::io::ErrorKind::NotFound, "weight shard is missing"),
            ));
        }
    }
    let st = super::StFiles::open(&files)?;
    let src = WeightSource::SafeTensors {
        st,
        dir: dir.to_path_buf(),
    };
    let tokenizer_json: serde_json::Value = std::fs::read_to_string(&tok_path)
        .map_err(|e| Error::io(&tok_path, e))
        .and_then(|t| {
            serde_json::from_str(&t)
                .map_err(|e| Error::Tokenizer(format!("{}: {e}", tok_path.display())))
        })?;
    Ok(HfParts {
        config,
        tokenizer,
        chat_template,
        src,
        tokenizer_json,
    })
}
