//! Format conversion: GGUF to a Hugging Face folder (GGUF output of every type:
//! [`crate::quantize::quantize_model`]; the GGUF writer: [`crate::gguf`]).
//!
//! Files are written to a temporary name beside the destination and renamed when complete, so
//! a failed conversion never leaves a half-written file that looks finished.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};
use crate::gguf::{finish_tmp, tmp_name};
pub use crate::gguf::{write_gguf, GgufTensor};

/// Dense storage types for conversions: [`FileType::F32`] or [`FileType::F16`] (a block type is
/// an error where a dense one is needed).
pub type DenseType = crate::types::FileType;

/// Writes a Hugging Face folder (config.json, model.safetensors, tokenizer.json,
/// tokenizer_config.json, generation_config.json) with the weights of a GGUF llama file,
/// dequantized to `ty`, Q/K rows in Hugging Face order.
pub fn gguf_to_hf(
    src: &Path,
    dst_dir: &Path,
    ty: DenseType,
    progress: impl FnMut(usize, usize),
) -> Result<()> {
    export_hf(src, dst_dir, ty, &[], progress)
}

/// [`gguf_to_hf`] from a GGUF file or a Hugging Face folder, with LoRA adapters merged into
/// the weights (`W + sum scale * B A`, computed in f64 from the f32 base values).
pub fn export_hf(
    src: &Path,
    dst_dir: &Path,
    ty: DenseType,
    adapters: &[(crate::Adapter, f32)],
    mut progress: impl FnMut(usize, usize),
) -> Result<()> {
    let is_dir = std::fs::metadata(src)
        .map_err(|e| Error::io(src, e))?
        .is_dir();
    if is_dir && same_dir(src, dst_dir) {
        return Err(Error::InvalidArgument(format!(
            "{} is the source folder: write the merged model elsewhere",
            dst_dir.display()
        )));
    }
    let crate::weights::Parts {
        src: src_w,
        config: cfg,
        tokenizer: tok,
        chat_template: template,
        ..
    } = if is_dir {
        crate::weights::open_hf(src)?.into()
    } else {
        crate::weights::open_gguf(src)?
    };
    let rope_freqs = src_w.has(crate::weights::W::RopeFreqs);
    let dtype = match ty {
        DenseType::F32 => DType::F32,
        DenseType::F16 => DType::F16,
        other => {
            return Err(Error::InvalidArgument(format!(
                "a Hugging Face folder is written as f32 or f16, not {other}"
            )))
        }
    };
    std::fs::create_dir_all(dst_dir).map_err(|e| Error::io(dst_dir, e))?;
    let c = &cfg;
    let list = crate::plan::Plan::new(c).tensors(!c.tie_word_embeddings);
    let h = c.hidden_size;
    let mut map: HashMap<String, Tensor> = HashMap::new();
    let n = list.len();
    for (i, (w, shape, perm)) in list.into_iter().enumerate() {
        let t = src_w.load_dense_unpermuted(w, &shape, perm.filter(|_| !is_dir))?;
        let t = match crate::lora::target_of_weight(w) {
            Some((l, target)) if !adapters.is_empty() => {
                match crate::Adapter::delta(adapters, l, target, (shape[0], shape[1])) {
                    Some(d) => {
                        let mut v: Vec<f32> = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
                        for (x, d) in v.iter_mut().zip(&d) {
                            *x += d;
                        }
                        Tensor::from_vec(v, shape.clone(), t.device())?
                    }
                    None => t,
                }
            }
            _ => t,
        };
        let t = if shape.len() == 1 {
            t
        } else {
            t.to_dtype(dtype)?
        };
        map.insert(w.hf_name(), t);
        progress(i + 1, n);
    }
    let st_path = dst_dir.join("model.safetensors");
    let tmp = tmp_name(&st_path);
    candle_core::safetensors::save(&map, &tmp)
        .map_err(|e| Error::weights(&st_path, "", e.to_string()))?;
    std::fs::rename(&tmp, &st_path).map_err(|e| Error::io(&st_path, e))?;

    let mut config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": c.vocab_size,
        "hidden_size": h,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "rope_theta": c.rope_theta,
        "rms_norm_eps": c.rms_norm_eps,
        "max_position_embeddings": c.max_position_embeddings,
        "tie_word_embeddings": c.tie_word_embeddings,
        "torch_dtype": if dtype == DType::F16 { "float16" } else { "float32" },
        "hidden_act": "silu",
    });
    if let Some(b) = c.bos_token_id {
        config["bos_token_id"] = b.into();
    }
    if let Some(&e) = c.eos_token_ids.first() {
        config["eos_token_id"] = e.into();
    }
    if let Some(j) = c.rope_scaling.to_hf_json() {
        config["rope_scaling"] = j;
    }
    if rope_freqs {
        tracing::warn!("rope_freqs.weight is not representable in config.json; the exported folder runs without it");
    }
    write_text(
        &dst_dir.join("config.json"),
        &serde_json::to_string_pretty(&config).unwrap_or_default(),
    )?;
    let gen = serde_json::json!({"eos_token_id": c.eos_token_ids, "bos_token_id": c.bos_token_id});
    write_text(
        &dst_dir.join("generation_config.json"),
        &serde_json::to_string_pretty(&gen).unwrap_or_default(),
    )?;
    let tok_json = tok
        .hf()
        .to_string(true)
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
    write_text(&dst_dir.join("tokenizer.json"), &tok_json)?;
    let name = |id: Option<u32>| id.and_then(|i| tok.id_to_token(i));
    let mut tc = serde_json::json!({
        "add_bos_token": tok.adds_bos(),
        "add_eos_token": false,
        "bos_token": name(tok.bos_id()),
        "eos_token": name(tok.eos_id()),
    });
    if let Some(t) = template {
        tc["chat_template"] = t.into();
    }
    write_text(
        &dst_dir.join("tokenizer_config.json"),
        &serde_json::to_string_pretty(&tc).unwrap_or_default(),
    )?;
    Ok(())
}

fn write_text(path: &Path, text: &str) -> Result<()> {
    let tmp = tmp_name(path);
    let res = std::fs::write(&tmp, text);
    finish_tmp(res, &tmp, path)
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}
