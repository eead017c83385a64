//! One configuration for every Llama variant, read from a Hugging Face `config.json` or from
//! GGUF metadata.

use std::path::Path;

use serde_json::Value as Json;

use crate::error::{Error, Result};
use crate::gguf::GgufFile;

/// How rotary position embeddings are rescaled for long contexts (`rope_scaling`).
#[derive(Debug, Clone, PartialEq, Default)]
#[non_exhaustive]
pub enum RopeScaling {
    /// Plain RoPE.
    #[default]
    None,
    /// Positions divided by `factor` (Llama 2 long-context fine-tunes).
    Linear {
        /// Position interpolation factor.
        factor: f64,
    },
    /// NTK-aware: the base is rescaled once the sequence exceeds `max_position_embeddings`
    /// (Hugging Face `dynamic`).
    Dynamic {
        /// Scaling factor.
        factor: f64,
    },
    /// Llama 3.1+ wavelength-banded rescaling of the inverse frequencies.
    Llama3 {
        /// Factor for low-frequency dimensions.
        factor: f64,
        /// Low-frequency band edge factor.
        low_freq_factor: f64,
        /// High-frequency band edge factor.
        high_freq_factor: f64,
        /// Context length the model was pre-trained with.
        original_max_position_embeddings: f64,
    },
}

/// Model hyper-parameters.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Config {
    /// Architecture name (always `llama` today).
    pub architecture: String,
    /// Vocabulary size (rows of the embedding).
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// MLP inner width.
    pub intermediate_size: usize,
    /// Number of transformer blocks.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (equal to `num_attention_heads` without GQA).
    pub num_key_value_heads: usize,
    /// Width of one attention head.
    pub head_dim: usize,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE scaling.
    pub rope_scaling: RopeScaling,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Context length the model was trained for.
    pub max_position_embeddings: usize,
    /// Whether the output head shares the token embedding.
    pub tie_word_embeddings: bool,
    /// Beginning-of-sequence token id.
    pub bos_token_id: Option<u32>,
    /// Every end-of-sequence id named by the model files.
    pub eos_token_ids: Vec<u32>,
}

/// Where a rotary frequency falls under the llama3 rule ([`RopeScaling::llama3_band`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Llama3Band {
    /// Short wavelength: kept.
    Keep,
    /// Long wavelength: divided by `factor`.
    Divide(f64),
    /// In between: `(1 - s) * f / factor + s * f`.
    Blend {
        /// The scaling factor.
        factor: f64,
        /// The blend weight of the unscaled frequency.
        s: f64,
    },
}

impl RopeScaling {
    /// The `rope_scaling` object of a Hugging Face config.json (`None` when unscaled), as
    /// [`Config::from_hf_json`] reads it.
    pub(crate) fn to_hf_json(&self) -> Option<serde_json::Value> {
        Some(match *self {
            RopeScaling::None => return None,
            RopeScaling::Linear { factor } => {
                serde_json::json!({"rope_type": "linear", "factor": factor})
            }
            RopeScaling::Dynamic { factor } => {
                serde_json::json!({"rope_type": "dynamic", "factor": factor})
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => serde_json::json!({"rope_type": "llama3", "factor": factor,
                "low_freq_factor": low_freq_factor, "high_freq_factor": high_freq_factor,
                "original_max_position_embeddings": original_max_position_embeddings}),
        })
    }

    /// The llama3 rule (Llama 3.1+): how the inverse frequency `inv_freq` is rescaled, by its
    /// wavelength against the original context's bands. `None` for the other scalings. The one
    /// place the rule is written: RoPE applies it, and the GGUF writer stores it as llama.cpp's
    /// per-dimension divisors.
    pub(crate) fn llama3_band(&self, inv_freq: f64) -> Option<Llama3Band> {
        let RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings: orig,
        } = *self
        else {
            return None;
        };
        let wl = 2.0 * std::f64::consts::PI / inv_freq;
        Some(if wl < orig / high_freq_factor {
            Llama3Band::Keep
        } else if wl > orig / low_freq_factor {
            Llama3Band::Divide(factor)
        } else {
            Llama3Band::Blend {
                factor,
                s: (orig / wl - low_freq_factor) / (high_freq_factor - low_freq_factor),
            }
        })
    }
}

impl Config {
    /// The positions the model's rotary encoding serves: `max_position_embeddings`, times the
    /// factor of linear or dynamic (NTK) scaling when above 1, the range that scaling exists to
    /// reach (llama3 configurations already state their extended length).
    pub fn scaled_context(&self) -> usize {
        let factor = match self.rope_scaling {
            RopeScaling::Linear { factor } | RopeScaling::Dynamic { factor } => factor.max(1.0),
            RopeScaling::None | RopeScaling::Llama3 { .. } => 1.0,
        };
        let n = self.max_position_embeddings as f64 * factor;
        if n >= (1u64 << 40) as f64 {
            1 << 40
        } else {
            n as usize
        }
    }

    /// `(hidden_size, head_dim, num_attention_heads, num_key_value_heads, intermediate_size)`.
    pub(crate) fn dims(&self) -> (usize, usize, usize, usize, usize) {
        (
            self.hidden_size,
            self.head_dim,
            self.num_attention_heads,
            self.num_key_value_heads,
            self.intermediate_size,
        )
    }

    /// Checks internal consistency (positive sizes, head counts dividing evenly, ...).
    pub fn validate(&self, path: &Path) -> Result<()> {
        let bad = |m: String| Err(Error::config(path, m));
        if self.architecture != "llama" {
            return Err(Error::UnsupportedArchitecture(format!(
                "{} (in {})",
                self.architecture,
                path.display()
            )));
        }
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if v == 0 {
                return bad(format!("{name} must be positive"));
            }
            if v > 1 << 24 {
                return bad(format!("{name} = {v} is implausibly large"));
            }
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return bad(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(format!("head_dim {} must be even for RoPE", self.head_dim));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 1.0) {
            return bad(format!("rope_theta {} is invalid", self.rope_theta));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return bad(format!("rms_norm_eps {} is invalid", self.rms_norm_eps));
        }
        let factor_ok = |f: f64| f.is_finite() && f > 0.0;
        match &self.rope_scaling {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } | RopeScaling::Dynamic { factor } => {
                if !factor_ok(*factor) {
                    return bad(format!("rope_scaling factor {factor} is invalid"));
                }
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                if !(factor_ok(*factor)
                    && factor_ok(*low_freq_factor)
                    && factor_ok(*high_freq_factor)
                    && factor_ok(*original_max_position_embeddings)
                    && high_freq_factor > low_freq_factor)
                {
                    return bad("llama3 rope_scaling parameters are invalid".into());
                }
            }
        }
        Ok(())
    }

    /// Reads a Hugging Face `config.json`.
    pub fn from_hf_json(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let j: Json = serde_json::from_str(&text)
            .map_err(|e| Error::config(path, format!("not valid JSON: {e}")))?;
        Self::from_hf_value(&j, path)
    }

    /// Builds the config from parsed `config.json` contents.
    pub fn from_hf_value(j: &Json, path: &Path) -> Result<Self> {
        let err = |m: String| Error::config(path, m);
        let get_usize = |key: &str| -> Result<Option<usize>> {
            match j.get(key) {
                None | Some(Json::Null) => Ok(None),
                Some(v) => v
                    .as_u64()
                    .map(|v| Some(v as usize))
                    .ok_or_else(|| err(format!("`{key}` must be a non-negative integer"))),
            }
        };
        let req = |key: &str| -> Result<usize> {
            get_usize(key)?.ok_or_else(|| err(format!("missing `{key}`")))
        };
        let get_f64 = |key: &str| -> Result<Option<f64>> {
            match j.get(key) {
                None | Some(Json::Null) => Ok(None),
                Some(v) => v
                    .as_f64()
                    .map(Some)
                    .ok_or_else(|| err(format!("`{key}` must be a number"))),
            }
        };
        let model_type = j.get("model_type").and_then(|v| v.as_str());
        let archs = j.get("architectures").and_then(|v| v.as_array());
        let is_llama = model_type == Some("llama")
            || archs.is_some_and(|a| a.iter().any(|x| x.as_str() == Some("LlamaForCausalLM")));
        if !is_llama {
            return Err(Error::UnsupportedArchitecture(format!(
                "{} (model_type {:?} in {})",
                archs
                    .and_then(|a| a.first())
                    .and_then(|v| v.as_str())
                    .unwrap_or("unknown"),
                model_type,
                path.display()
            )));
        }
        let hidden_size = req("hidden_size")?;
        let num_attention_heads = req("num_attention_heads")?;
        if num_attention_heads == 0 {
            return Err(err("num_attention_heads must be positive".into()));
        }
        let num_key_value_heads = get_usize("num_key_value_heads")?.unwrap_or(num_attention_heads);
        let head_dim = get_usize("head_dim")?.unwrap_or(hidden_size / num_attention_heads);
        let max_position_embeddings = get_usize("max_position_embeddings")?.unwrap_or(2048);
        // Newer configs nest rope settings under `rope_parameters`.
        let rope_params = j.get("rope_parameters").filter(|v| v.is_object());
        let rope_theta = get_f64("rope_theta")?
            .or_else(|| {
                rope_params
                    .and_then(|p| p.get("rope_theta"))
                    .and_then(|v| v.as_f64())
            })
            .unwrap_or(10000.0);
        let scaling = j
            .get("rope_scaling")
            .filter(|v| v.is_object())
            .or(rope_params);
        let rope_scaling = match scaling {
            None => RopeScaling::None,
            Some(s) => parse_hf_rope_scaling(s, max_position_embeddings).map_err(err)?,
        };
        let ids = |key: &str| -> Vec<u32> {
            match j.get(key) {
                Some(Json::Number(n)) => n.as_u64().map(|v| vec![v as u32]).unwrap_or_default(),
                Some(Json::Array(a)) => a
                    .iter()
                    .filter_map(|v| v.as_u64().map(|v| v as u32))
                    .collect(),
                _ => vec![],
            }
        };
        Ok(Config {
            architecture: "llama".into(),
            vocab_size: req("vocab_size")?,
            hidden_size,
            intermediate_size: req("intermediate_size")?,
            num_hidden_layers: req("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rope_theta,
            rope_scaling,
            rms_norm_eps: get_f64("rms_norm_eps")?.unwrap_or(1e-6),
            max_position_embeddings,
            tie_word_embeddings: j
                .get("tie_word_embeddings")
                .and_then(|v| v.as_bool())
                .unwrap_or(false),
            bos_token_id: ids("bos_token_id").first().copied(),
            eos_token_ids: ids("eos_token_id"),
        })
    }

    /// Reads the configuration from GGUF metadata (`llama.*` keys).
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let path = g.path();
        let err = |m: String| Error::config(path, m);
        let arch = g
            .get("general.architecture")
            .and_then(|v| v.as_str())
            .ok_or_else(|| err("missing general.architecture".into()))?
            .to_string();
        if arch != "llama" {
            return Err(Error::UnsupportedArchitecture(format!(
                "{arch} (in {})",
                path.display()
            )));
        }
        let key = |k: &str| format!("{arch}.{k}");
        let get_u = |k: &str| -> Result<Option<usize>> {
            match g.get(&key(k)) {
                None => Ok(None),
                Some(v) => v
                    .as_u64()
                    .map(|v| Some(v as usize))
                    .ok_or_else(|| err(format!("{} must be a non-negative integer", key(k)))),
            }
        };
        let req = |k: &str| -> Result<usize> {
            get_u(k)?.ok_or_else(|| err(format!("missing {}", key(k))))
        };
        let get_f = |k: &str| g.get(&key(k)).and_then(|v| v.as_f64());
        let hidden_size = req("embedding_length")?;
        let num_attention_heads = req("attention.head_count")?;
        if num_attention_heads == 0 {
            return Err(err("attention.head_count must be positive".into()));
        }
        let num_key_value_heads = get_u("attention.head_count_kv")?.unwrap_or(num_attention_heads);
        let head_dim = get_u("attention.key_length")?
            .or(get_u("rope.dimension_count")?)
            .unwrap_or(hidden_size / num_attention_heads);
        let n_tokens = g
            .get("tokenizer.ggml.tokens")
            .and_then(|v| v.as_array())
            .map(|a| a.len());
        let vocab_size = match (get_u("vocab_size")?, n_tokens) {
            (Some(v), _) => v,
            (None, Some(n)) => n,
            (None, None) => g
                .tensors
                .get("token_embd.weight")
                .map(|t| t.shape[0])
                .ok_or_else(|| err("cannot determine the vocabulary size".into()))?,
        };
        let max_position_embeddings = get_u("context_length")?.unwrap_or(2048);
        let scaling_type = g
            .get(&key("rope.scaling.type"))
            .and_then(|v| v.as_str())
            .unwrap_or("none");
        let factor = get_f("rope.scaling.factor").unwrap_or(1.0);
        let rope_scaling = match scaling_type {
            // Llama 3.1+ files carry the llama3 rescaling baked into `rope_freqs.weight`; the
            // model applies that tensor directly.
            "none" | "" => RopeScaling::None,
            "linear" if factor > 0.0 && factor != 1.0 => RopeScaling::Linear { factor },
            "linear" => RopeScaling::None,
            other => {
                return Err(Error::UnsupportedArchitecture(format!(
                    "rope scaling type `{other}` in {}",
                    path.display()
                )))
            }
        };
        let tok_u32 = |k: &str| {
            g.get(k)
                .and_then(|v| v.as_u64())
                .and_then(|v| u32::try_from(v).ok())
        };
        let mut eos_token_ids = vec![];
        for k in [
            "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.eot_token_id",
            "tokenizer.ggml.eom_token_id",
        ] {
            if let Some(id) = tok_u32(k) {
                if !eos_token_ids.contains(&id) {
                    eos_token_ids.push(id);
                }
            }
        }
        Ok(Config {
            architecture: arch.clone(),
            vocab_size,
            hidden_size,
            intermediate_size: req("feed_forward_length")?,
            num_hidden_layers: req("block_count")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rope_theta: get_f("rope.freq_base").unwrap_or(10000.0),
            rope_scaling,
            rms_norm_eps: get_f("attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
            max_position_embeddings,
            tie_word_embeddings: !g.tensors.contains_key("output.weight"),
            bos_token_id: tok_u32("tokenizer.ggml.bos_token_id"),
            eos_token_ids,
        })
    }
}

fn parse_hf_rope_scaling(s: &Json, max_pos: usize) -> std::result::Result<RopeScaling, String> {
    let ty = s
        .get("rope_type")
        .or_else(|| s.get("type"))
        .and_then(|v| v.as_str())
        .unwrap_or("default");
    let f = |k: &str| s.get(k).and_then(|v| v.as_f64());
    let factor = || f("factor").ok_or_else(|| format!("rope_scaling `{ty}` needs `factor`"));
    Ok(match ty {
        "default" | "none" => RopeScaling::None,
        "linear" => RopeScaling::Linear { factor: factor()? },
        "dynamic" => RopeScaling::Dynamic { factor: factor()? },
        "llama3" => RopeScaling::Llama3 {
            factor: factor()?,
            low_freq_factor: f("low_freq_factor").unwrap_or(1.0),
            high_freq_factor: f("high_freq_factor").unwrap_or(4.0),
            original_max_position_embeddings: f("original_max_position_embeddings")
                .unwrap_or(max_pos as f64),
        },
        other => return Err(format!("unsupported rope_scaling type `{other}`")),
    })
}
