//! Weight sources: a GGUF file or a Hugging Face safetensors folder, behind one interface that
//! validates every tensor's shape before it is used.
//!
//! GGUF `llama` files store the Q and K projections with their rows permuted for interleaved
//! RoPE (llama.cpp's converter). We undo that permutation while loading so that one model,
//! using rotate-half RoPE, runs both formats.

use std::path::{Path, PathBuf};

use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType, QMatMul, QTensor};

use crate::model::QuantType;
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::gguf::GgufFile;

/// Where a tensor is read from.
pub(crate) enum WeightSource {
    Gguf(GgufFile),
    SafeTensors { st: MmapedSafetensors, dir: PathBuf },
}

enum Loaded {
    Q(QTensor),
    Dense(Tensor),
}

/// Which kind of weight: decides the HF and GGUF names.
#[derive(Debug, Clone, Copy)]
pub(crate) enum W {
    Embed,
    OutputNorm,
    Output,
    AttnNorm(usize),
    Q(usize),
    K(usize),
    V(usize),
    O(usize),
    FfnNorm(usize),
    Gate(usize),
    Up(usize),
    Down(usize),
    RopeFreqs,
}

impl W {
    fn gguf_name(self) -> String {
        match self {
            W::Embed => "token_embd.weight".into(),
            W::OutputNorm => "output_norm.weight".into(),
            W::Output => "output.weight".into(),
            W::AttnNorm(l) => format!("blk.{l}.attn_norm.weight"),
            W::Q(l) => format!("blk.{l}.attn_q.weight"),
            W::K(l) => format!("blk.{l}.attn_k.weight"),
            W::V(l) => format!("blk.{l}.attn_v.weight"),
            W::O(l) => format!("blk.{l}.attn_output.weight"),
            W::FfnNorm(l) => format!("blk.{l}.ffn_norm.weight"),
            W::Gate(l) => format!("blk.{l}.ffn_gate.weight"),
            W::Up(l) => format!("blk.{l}.ffn_up.weight"),
            W::Down(l) => format!("blk.{l}.ffn_down.weight"),
            W::RopeFreqs => "rope_freqs.weight".into(),
        }
    }
    pub(crate) fn hf_name(self) -> String {
        match self {
            W::Embed => "model.embed_tokens.weight".into(),
            W::OutputNorm => "model.norm.weight".into(),
            W::Output => "lm_head.weight".into(),
            W::AttnNorm(l) => format!("model.layers.{l}.input_layernorm.weight"),
            W::Q(l) => format!("model.layers.{l}.self_attn.q_proj.weight"),
            W::K(l) => format!("model.layers.{l}.self_attn.k_proj.weight"),
            W::V(l) => format!("model.layers.{l}.self_attn.v_proj.weight"),
            W::O(l) => format!("model.layers.{l}.self_attn.o_proj.weight"),
            W::FfnNorm(l) => format!("model.layers.{l}.post_attention_layernorm.weight"),
            W::Gate(l) => format!("model.layers.{l}.mlp.gate_proj.weight"),
            W::Up(l) => format!("model.layers.{l}.mlp.up_proj.weight"),
            W::Down(l) => format!("model.layers.{l}.mlp.down_proj.weight"),
            W::RopeFreqs => "rope_freqs.weight".into(),
        }
    }
}

/// Rows of a head-major projection, permuted from GGUF's interleaved order back to HF's
/// rotate-half order: HF row `h*d + j*d/2 + i` is GGUF row `h*d + 2*i + j`.
pub(crate) fn unpermute_rows(data: &[u8], rows: usize, n_heads: usize) -> Vec<u8> {
    let row_bytes = data.len() / rows;
    let d = rows / n_heads;
    let mut out = vec![0u8; data.len()];
    for h in 0..n_heads {
        for j in 0..2 {
            for i in 0..d / 2 {
                let dst = h * d + j * (d / 2) + i;
                let src = h * d + 2 * i + j;
                out[dst * row_bytes..(dst + 1) * row_bytes]
                    .copy_from_slice(&data[src * row_bytes..(src + 1) * row_bytes]);
            }
        }
    }
    out
}

/// The inverse of [`unpermute_rows`]: HF order to GGUF order (used when writing GGUF).
pub fn permute_rows_for_gguf(data: &[u8], rows: usize, n_heads: usize) -> Vec<u8> {
    let row_bytes = data.len() / rows;
    let d = rows / n_heads;
    let mut out = vec![0u8; data.len()];
    for h in 0..n_heads {
        for j in 0..2 {
            for i in 0..d / 2 {
                let hf = h * d + j * (d / 2) + i;
                let gg = h * d + 2 * i + j;
                out[gg * row_bytes..(gg + 1) * row_bytes]
                    .copy_from_slice(&data[hf * row_bytes..(hf + 1) * row_bytes]);
            }
        }
    }
    out
}

/// Copies bytes into 8-byte aligned storage (quantized blocks hold f16/f32 fields).
pub(crate) fn aligned(bytes: &[u8]) -> Vec<u64> {
    let mut v = vec![0u64; bytes.len().div_ceil(8)];
    // SAFETY: u64 storage viewed as bytes; length within the allocation.
    let dst = unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u8, bytes.len()) };
    dst.copy_from_slice(bytes);
    v
}

pub(crate) fn as_bytes(v: &[u64], len: usize) -> &[u8] {
    // SAFETY: viewing initialized u64 storage as bytes.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, len) }
}

impl WeightSource {
    pub(crate) fn path(&self) -> &Path {
        match self {
            WeightSource::Gguf(g) => g.path(),
            WeightSource::SafeTensors { dir, .. } => dir,
        }
    }

    pub(crate) fn has(&self, w: W) -> bool {
        match self {
            WeightSource::Gguf(g) => g.tensors.contains_key(&w.gguf_name()),
            WeightSource::SafeTensors { st, .. } => st.get(&w.hf_name()).is_ok(),
        }
    }

    /// Up to `n` bytes of a tensor's stored data (empty when it is missing); for fingerprints.
    pub(crate) fn raw_prefix(&self, w: W, n: usize) -> Vec<u8> {
        match self {
            WeightSource::Gguf(g) => g
                .tensor_data(&w.gguf_name())
                .map(|(_, d)| d[..n.min(d.len())].to_vec())
                .unwrap_or_default(),
            WeightSource::SafeTensors { st, .. } => st
                .get(&w.hf_name())
                .map(|v| v.data()[..n.min(v.data().len())].to_vec())
                .unwrap_or_default(),
        }
    }

    /// The storage type of a tensor, as a short string (for reporting).
    pub(crate) fn dtype_name(&self, w: W) -> Option<String> {
        match self {
            WeightSource::Gguf(g) => g
                .tensors
                .get(&w.gguf_name())
                .map(|t| format!("{:?}", t.dtype)),
            WeightSource::SafeTensors { st, .. } => st
                .get(&w.hf_name())
                .ok()
                .map(|v| format!("{:?}", v.dtype())),
        }
    }

    /// Loads a tensor, checking its shape: GGUF tensors stay in their block format, safetensors
    /// become dense f32. `unpermute_heads`: undo GGUF's Q/K row permutation for this many heads.
    fn load(&self, w: W, shape: &[usize], unpermute_heads: Option<usize>) -> Result<Loaded> {
        match self {
            WeightSource::Gguf(g) => {
                let name = w.gguf_name();
                let (info, data) = g
                    .tensor_data(&name)
                    .ok_or_else(|| Error::weights(g.path(), &name, "tensor is missing"))?;
                if info.shape != shape {
                    return Err(Error::weights(
                        g.path(),
                        &name,
                        format!(
                            "shape {:?} does not match the configuration's {:?}",
                            info.shape, shape
                        ),
                    ));
                }
                let store;
                let bytes: &[u8] = match unpermute_heads {
                    Some(h) => {
                        let p = unpermute_rows(data, shape[0], h);
                        store = aligned(&p);
                        as_bytes(&store, p.len())
                    }
                    None if (data.as_ptr() as usize) % 8 != 0 => {
                        store = aligned(data);
                        as_bytes(&store, data.len())
                    }
                    None => data,
                };
                qtensor_from_ggml(info.dtype, bytes, info.shape.clone(), &Device::Cpu)
                    .map(Loaded::Q)
                    .map_err(|e| Error::weights(g.path(), &name, e.to_string()))
            }
            WeightSource::SafeTensors { st, dir } => {
                let name = w.hf_name();
                let view = st
                    .get(&name)
                    .map_err(|_| Error::weights(dir, &name, "tensor is missing"))?;
                if view.shape() != shape {
                    return Err(Error::weights(
                        dir,
                        &name,
                        format!(
                            "shape {:?} does not match the configuration's {:?}",
                            view.shape(),
                            shape
                        ),
                    ));
                }
                match view.dtype() {
                    safetensors::Dtype::F32
                    | safetensors::Dtype::F16
                    | safetensors::Dtype::BF16 => {}
                    other => {
                        return Err(Error::UnsupportedDType(format!(
                            "{other:?} for tensor `{name}` in {}",
                            dir.display()
                        )))
                    }
                }
                st.load(&name, &Device::Cpu)
                    .and_then(|t| t.to_dtype(DType::F32))
                    .map(Loaded::Dense)
                    .map_err(|e| Error::weights(dir, &name, e.to_string()))
            }
        }
    }

    /// Loads a tensor as a dense f32 tensor.
    pub(crate) fn load_dense(&self, w: W, shape: &[usize]) -> Result<Tensor> {
        match self.load(w, shape, None)? {
            Loaded::Dense(t) => Ok(t),
            Loaded::Q(q) => q
                .dequantize(&Device::Cpu)
                .map_err(|e| Error::weights(self.path(), format!("{w:?}"), e.to_string())),
        }
    }

    /// Loads a tensor as dense f32 with optional Q/K un-permutation (for export).
    pub(crate) fn load_dense_unpermuted(
        &self,
        w: W,
        shape: &[usize],
        unpermute_heads: Option<usize>,
    ) -> Result<Tensor> {
        match self.load(w, shape, unpermute_heads)? {
            Loaded::Dense(t) => Ok(t),
            Loaded::Q(q) => q
                .dequantize(&Device::Cpu)
                .map_err(|e| Error::weights(self.path(), format!("{w:?}"), e.to_string())),
        }
    }

    /// Loads a matrix for a matmul, quantizing dense weights per `rules` (the same rules the
    /// GGUF writer applies, so quantize-at-load and quantize-then-load give identical tensors).
    pub(crate) fn load_matmul(
        &self,
        w: W,
        shape: &[usize],
        unpermute_heads: Option<usize>,
        role: crate::quantize::Role,
        rules: &crate::quantize::TypeRules,
    ) -> Result<QMatMul> {
        use crate::quantize::{quantize_rows, tensor_type, FileType};
        let err =
            |e: candle_core::Error| Error::weights(self.path(), format!("{w:?}"), e.to_string());
        let loaded = self.load(w, shape, unpermute_heads)?;
        let dense = match loaded {
            Loaded::Dense(t) => t,
            Loaded::Q(q)
                if matches!(q.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16) =>
            {
                q.dequantize(&Device::Cpu).map_err(err)?
            }
            Loaded::Q(q) => return QMatMul::from_qtensor(q).map_err(err),
        };
        let k = shape[shape.len() - 1];
        let (target, note) = tensor_type(role, rules, k);
        if let Some(n) = note {
            tracing::debug!(tensor = ?w, "{n}");
        }
        let ty = match target {
            Some(FileType::Quant(q)) => q.ggml(),
            _ => return Ok(QMatMul::Tensor(dense)),
        };
        let values: Vec<f32> = dense.flatten_all()?.to_vec1()?;
        let bytes = quantize_rows(
            &values,
            k,
            FileType::Quant(QuantType::from_ggml(ty)),
            crate::quantize::default_threads(),
        )?;
        drop(values);
        let store = aligned(&bytes);
        let q = qtensor_from_ggml(
            ty,
            as_bytes(&store, bytes.len()),
            shape.to_vec(),
            &Device::Cpu,
        )
        .map_err(err)?;
        QMatMul::from_qtensor(q).map_err(err)
    }
}
