//! llama.cpp's GGUF LoRA files: `general.type = adapter`, `adapter.type = lora`,
//! `adapter.lora.alpha`, tensors `<base tensor>.lora_a` (`[rank, in]`) and `.lora_b`
//! (`[out, rank]`), Q/K `lora_b` rows in GGUF's permuted order. Scale rule (llama.cpp's):
//! `alpha / rank` when alpha is set, else 1 (times the session's scale).

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::quantized::GgmlDType;

use super::{Adapter, AdapterFormat, Parsed, RawPair, Target};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::gguf::{GgufFile, GgufTensor, Value};
use crate::types::{FileType, QuantType};
use crate::weights::{gguf_dense_values, permute_rows_for_gguf, unpermute_rows};

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn from_f32_bytes(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// `(layer, target, is_b)` of a tensor name `blk.N.attn_q.weight.lora_a`.
fn parse_name(name: &str) -> Option<(usize, Target, bool)> {
    let (base, ab) = name.rsplit_once(".lora_")?;
    let is_b = match ab {
        "a" => false,
        "b" => true,
        _ => return None,
    };
    let (l, t) = super::target_of_gguf_name(base)?;
    Some((l, t, is_b))
}

/// The values of a LoRA tensor as f32, with its candle-order shape.
fn values(g: &GgufFile, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
    let path = g.path();
    let (info, data) = g
        .tensor_data(name)
        .ok_or_else(|| Error::weights(path, name, "missing"))?;
    if info.shape.len() != 2 {
        return Err(Error::weights(
            path,
            name,
            format!("a LoRA matrix must be 2-D, not {:?}", info.shape),
        ));
    }
    let elems: usize = info.shape.iter().product();
    let v = match info.dtype {
        GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => gguf_dense_values(data, info.dtype),
        dt if QuantType::from_ggml(dt).ggml() == dt => {
            crate::codec::dequantize(data, FileType::Quant(QuantType::from_ggml(dt)), elems)
                .map_err(|e| Error::weights(path, name, e.to_string()))?
        }
        dt => {
            return Err(Error::weights(
                path,
                name,
                format!("LoRA matrices of type {dt:?} are not supported"),
            ))
        }
    };
    if v.len() != elems {
        return Err(Error::weights(
            path,
            name,
            "data size does not match the shape",
        ));
    }
    Ok((info.shape.clone(), v))
}

pub(crate) fn load(path: &Path, c: &Config) -> Result<Parsed> {
    let g = GgufFile::open(path)?;
    let meta_str = |k: &str| g.get(k).and_then(|v| v.as_str().map(str::to_string));
    match meta_str("general.type").as_deref() {
        Some("adapter") => {}
        other => {
            return Err(Error::weights(
                path,
                "",
                format!(
                    "not a LoRA adapter: general.type is {} (expected \"adapter\"; a model file is not an adapter)",
                    other.map_or("missing".to_string(), |s| format!("{s:?}"))
                ),
            ))
        }
    }
    match meta_str("adapter.type").as_deref() {
        Some("lora") => {}
        other => {
            return Err(Error::weights(
                path,
                "",
                format!(
                    "adapter.type is {} : only LoRA adapters are supported",
                    other.map_or("missing".to_string(), |s| format!("{s:?}"))
                ),
            ))
        }
    }
    if let Some(arch) = meta_str("general.architecture") {
        if arch != "llama" {
            return Err(Error::weights(
                path,
                "",
                format!("the adapter is for architecture {arch:?}, not llama"),
            ));
        }
    }
    if g.get("adapter.alora.invocation_tokens").is_some() {
        return Err(Error::weights(
            path,
            "",
            "activated LoRA (adapter.alora.invocation_tokens) is not supported",
        ));
    }
    let alpha = match g.get("adapter.lora.alpha") {
        None => 0.0,
        Some(v) => v
            .as_f64()
            .filter(|a| a.is_finite() && *a >= 0.0)
            .ok_or_else(|| {
                Error::weights(path, "", "adapter.lora.alpha must be a non-negative number")
            })? as f32,
    };
    // (layer, target) -> (a, b)
    type Half = Option<(Vec<usize>, Vec<f32>)>;
    let mut found: BTreeMap<(usize, Target), (Half, Half)> = BTreeMap::new();
    for name in &g.tensor_order {
        if name.ends_with("_norm.weight") {
            // llama.cpp skips norm tensors in adapters too.
            continue;
        }
        let Some((l, t, is_b)) = parse_name(name) else {
            let why = if name.starts_with("token_embd") || name.starts_with("output.") {
                "embedding and output-head adapters are not supported"
            } else {
                "not a LoRA tensor of a Llama projection (expected blk.N.<attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down>.weight.lora_a/lora_b)"
            };
            return Err(Error::weights(path, name, why));
        };
        if l >= c.num_hidden_layers {
            return Err(Error::weights(
                path,
                name,
                format!(
                    "layer {l} is past the model's {} layers",
                    c.num_hidden_layers
                ),
            ));
        }
        let v = values(&g, name)?;
        let slot = found.entry((l, t)).or_default();
        if is_b {
            slot.1 = Some(v);
        } else {
            slot.0 = Some(v);
        }
    }
    let mut pairs = vec![];
    for ((l, t), (a, b)) in found {
        let name = t.weight(l).gguf_name();
        let (Some((ash, a)), Some((bsh, b))) = (a, b) else {
            return Err(Error::weights(
                path,
                format!("{name}.lora_a/lora_b"),
                "one of the pair is missing",
            ));
        };
        let (out, inp) = t.shape(c);
        let rank = ash[0];
        if ash[1] != inp || bsh[0] != out || bsh[1] != rank {
            return Err(Error::weights(
                path,
                format!("{name}.lora_a/lora_b"),
                format!(
                    "lora_a is {ash:?} and lora_b {bsh:?}: expected [rank, {inp}] and [{out}, rank] for this model"
                ),
            ));
        }
        if rank == 0 {
            return Err(Error::weights(path, &name, "rank 0"));
        }
        let b = match t.permuted_heads(c) {
            Some(heads) => from_f32_bytes(&unpermute_rows(&f32_bytes(&b), out, heads)),
            None => b,
        };
        let scale = if alpha != 0.0 {
            alpha / rank as f32
        } else {
            1.0
        };
        pairs.push((l, t, RawPair { rank, a, b, scale }));
    }
    Ok(Parsed {
        format: AdapterFormat::Gguf,
        pairs,
        alpha: (alpha != 0.0).then_some(alpha),
    })
}

/// One alpha that gives every pair its factor as `alpha / rank`, if there is one.
fn common_alpha(a: &Adapter) -> Option<f32> {
    let mut alpha: Option<f32> = None;
    for (_, _, p) in a.pairs() {
        let this = p.scale * p.rank as f32;
        match alpha {
            None => alpha = Some(this),
            Some(x) if ((x - this) / x.abs().max(1e-30)).abs() <= 1e-6 => {}
            Some(_) => return None,
        }
    }
    alpha.filter(|x| x.is_finite() && *x > 0.0)
}

/// Writes `adapter` as a llama.cpp GGUF LoRA (f32 matrices; Q/K `lora_b` rows in GGUF's
/// order). When one `adapter.lora.alpha` gives every matrix its factor, it is written;
/// otherwise (rsLoRA, per-module alphas) each factor is folded into its `lora_b` and alpha is
/// 0, so llama.cpp's scale is the user's alone.
pub fn write_gguf_lora(path: &Path, adapter: &Adapter, c: &Config) -> Result<()> {
    let alpha = common_alpha(adapter);
    let mut meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String("llama".into())),
        ("general.type".into(), Value::String("adapter".into())),
        ("adapter.type".into(), Value::String("lora".into())),
        (
            "adapter.lora.alpha".into(),
            Value::F32(alpha.unwrap_or(0.0)),
        ),
    ];
    if let Some(name) = adapter.path().file_name().and_then(|n| n.to_str()) {
        meta.push(("general.name".into(), Value::String(name.to_string())));
    }
    let mut tensors = vec![];
    for (l, t, p) in adapter.pairs() {
        let name = t.weight(l).gguf_name();
        let (out, inp) = t.shape(c);
        let mut b = p.b_f32();
        if alpha.is_none() {
            for v in &mut b {
                *v *= p.scale;
            }
        }
        let mut b = f32_bytes(&b);
        if let Some(heads) = t.permuted_heads(c) {
            b = permute_rows_for_gguf(&b, out, heads);
        }
        tensors.push(GgufTensor {
            name: format!("{name}.lora_a"),
            shape: vec![p.rank, inp],
            dtype: GgmlDType::F32,
            data: f32_bytes(&p.a_f32()),
        });
        tensors.push(GgufTensor {
            name: format!("{name}.lora_b"),
            shape: vec![out, p.rank],
            dtype: GgmlDType::F32,
            data: b,
        });
    }
    crate::gguf::write_gguf(path, &meta, &tensors)
}
