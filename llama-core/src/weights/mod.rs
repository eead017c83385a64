//! Weight sources: a GGUF file or a Hugging Face safetensors folder, behind one interface that
//! validates every tensor's shape before it is used.
//!
//! GGUF `llama` files store the Q and K projections with their rows permuted for interleaved
//! RoPE (llama.cpp's converter). We undo that permutation while loading so that one model,
//! using rotate-half RoPE, runs both formats.

use std::path::{Path, PathBuf};

use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType, QMatMul, QTensor};

use crate::types::QuantType;
use candle_core::{Device, Tensor};

use crate::error::{Error, Result};

pub(crate) mod hf;
mod names;
mod st;

use crate::gguf::GgufFile;
use crate::matrix::{aligned, as_bytes, family, Family, Matmul};
pub(crate) use hf::open_hf;

/// What a model is built from: its weights (still mapped), configuration, tokenizer and chat
/// template, parsed and checked.
pub(crate) struct Parts {
    pub(crate) src: WeightSource,
    pub(crate) config: crate::config::Config,
    pub(crate) tokenizer: crate::tokenizer::Tokenizer,
    pub(crate) chat_template: Option<String>,
    /// `"gguf"` or `"safetensors"`.
    pub(crate) format: &'static str,
}

/// A GGUF file's parts (its configuration validated).
pub(crate) fn open_gguf(path: &Path) -> Result<Parts> {
    let g = GgufFile::open(path)?;
    let config = crate::config::Config::from_gguf(&g)?;
    config.validate(path)?;
    let tokenizer = crate::tokenizer::Tokenizer::from_gguf(&g)?;
    let chat_template = g
        .get("tokenizer.chat_template")
        .and_then(|v| v.as_str())
        .map(str::to_string);
    Ok(Parts {
        src: WeightSource::Gguf(g),
        config,
        tokenizer,
        chat_template,
        format: "gguf",
    })
}
pub use names::permute_rows_for_gguf;
pub(crate) use names::{unpermute_rows, W};
pub(crate) use st::st_to_f32;
pub(crate) use st::StFiles;

/// Where a tensor is read from.
pub(crate) enum WeightSource {
    Gguf(GgufFile),
    SafeTensors { st: StFiles, dir: PathBuf },
}

enum Loaded {
    Q(QTensor),
    /// A matrix in one of our kernels' block formats, built straight from the file.
    Blocks(crate::kernels::BlockMatrix),
    /// Dense values (row-major, f32) of f32 and bf16 storage.
    Dense(Vec<f32>),
    /// f16 storage, kept at f16 (a matmul weight stays f16 without an f32 copy).
    F16(Vec<half::f16>),
}

impl Loaded {
    /// Dense f32 values, or the quantized tensor.
    fn into_f32(self) -> std::result::Result<Vec<f32>, QTensor> {
        match self {
            Loaded::Dense(v) => Ok(v),
            Loaded::F16(h) => Ok(h.iter().map(|v| v.to_f32()).collect()),
            Loaded::Q(q) => Err(q),
            Loaded::Blocks(m) => {
                use crate::matrix::WeightMatrix;
                let (n, k) = m.shape();
                let mut v = vec![0f32; n * k];
                for (i, row) in v.chunks_exact_mut(k.max(1)).enumerate() {
                    // A block matrix dequantizes any of its rows (it cannot fail).
                    if m.row_into(i, row).is_err() {
                        row.fill(f32::NAN);
                    }
                }
                Ok(v)
            }
        }
    }
}

fn f16_values(bytes: &[u8]) -> Vec<half::f16> {
    f16_values_releasing(bytes, &|_, _| {})
}

/// f16 values, calling `release(start, len)` for each MiB of `bytes` once it is copied.
fn f16_values_releasing(bytes: &[u8], release: &dyn Fn(usize, usize)) -> Vec<half::f16> {
    const CHUNK: usize = 1 << 20;
    let n = bytes.len() / 2;
    let mut out: Vec<half::f16> = Vec::with_capacity(n);
    let dst = out.as_mut_ptr() as *mut u8;
    for (i, c) in bytes[..2 * n].chunks(CHUNK).enumerate() {
        #[cfg(target_endian = "little")]
        // SAFETY: `out` has room for `n` values (`2 n` bytes) and chunk `i` lands at byte
        // `i * CHUNK` of them; an f16 in memory is its little-endian bytes on this target.
        unsafe {
            std::ptr::copy_nonoverlapping(c.as_ptr(), dst.add(i * CHUNK), c.len())
        };
        #[cfg(not(target_endian = "little"))]
        out.extend(
            c.chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]])),
        );
        release(i * CHUNK, c.len());
    }
    #[cfg(target_endian = "little")]
    // SAFETY: every one of the `n` values was written above (any bit pattern is an f16).
    unsafe {
        out.set_len(n)
    };
    out
}

/// f32 values of a dense GGUF tensor (F32/F16/BF16), one copy out of the map.
pub(crate) fn gguf_dense_values(bytes: &[u8], dtype: GgmlDType) -> Vec<f32> {
    match dtype {
        GgmlDType::F16 => st_to_f32(bytes, safetensors::Dtype::F16),
        GgmlDType::BF16 => st_to_f32(bytes, safetensors::Dtype::BF16),
        _ => st_to_f32(bytes, safetensors::Dtype::F32),
    }
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
            WeightSource::SafeTensors { st, .. } => st.get(&w.hf_name()).is_some(),
        }
    }

    /// Up to `n` bytes of a tensor's stored data (empty when it is missing); for fingerprints.
    /// The pages the read brought in (the kernel maps and reads ahead well beyond `n`) are
    /// released again.
    pub(crate) fn raw_prefix(&self, w: W, n: usize) -> Vec<u8> {
        match self {
            WeightSource::Gguf(g) => {
                let name = w.gguf_name();
                let out = g
                    .tensor_data(&name)
                    .map(|(_, d)| d[..n.min(d.len())].to_vec())
                    .unwrap_or_default();
                g.release(&name);
                out
            }
            WeightSource::SafeTensors { st, .. } => st
                .get(&w.hf_name())
                .map(|e| {
                    let d = st.data(e);
                    let out = d[..n.min(d.len())].to_vec();
                    st.release(e);
                    out
                })
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
            WeightSource::SafeTensors { st, .. } => {
                st.get(&w.hf_name()).map(|e| format!("{:?}", e.dtype))
            }
        }
    }

    /// Loads a tensor, checking its shape: GGUF tensors stay in their block format, safetensors
    /// become dense f32. `unpermute_heads`: undo GGUF's Q/K row permutation for this many heads.
    fn load(&self, w: W, shape: &[usize], unpermute_heads: Option<usize>) -> Result<Loaded> {
        self.load_as(w, shape, unpermute_heads, false)
    }

    /// [`WeightSource::load`]; with `blocks`, a GGUF matrix in one of our kernels' block
    /// formats is built straight from the map (no intermediate copy), releasing the mapped
    /// pages as it goes.
    fn load_as(
        &self,
        w: W,
        shape: &[usize],
        unpermute_heads: Option<usize>,
        blocks: bool,
    ) -> Result<Loaded> {
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
                    None if !(data.as_ptr() as usize).is_multiple_of(8) => {
                        store = aligned(data);
                        as_bytes(&store, data.len())
                    }
                    None => data,
                };
                let release = |start: usize, len: usize| g.release_part(&name, start, len);
                let fmt = match family(info.dtype, shape.len()) {
                    Family::Blocks(fmt) if blocks => Some(fmt),
                    _ => None,
                };
                let out = if let Some(fmt) = fmt {
                    crate::kernels::BlockMatrix::new_releasing(
                        fmt, bytes, shape[0], shape[1], &release,
                    )
                    .map(Loaded::Blocks)
                } else if info.dtype == GgmlDType::F16 {
                    Ok(Loaded::F16(f16_values_releasing(bytes, &release)))
                } else if matches!(info.dtype, GgmlDType::F32 | GgmlDType::BF16) {
                    Ok(Loaded::Dense(gguf_dense_values(bytes, info.dtype)))
                } else {
                    qtensor_from_ggml(info.dtype, bytes, info.shape.clone(), &Device::Cpu)
                        .map(Loaded::Q)
                        .map_err(|e| Error::weights(g.path(), &name, e.to_string()))
                };
                g.release(&name);
                out
            }
            WeightSource::SafeTensors { st, dir } => {
                let name = w.hf_name();
                let e = st
                    .get(&name)
                    .ok_or_else(|| Error::weights(dir, &name, "tensor is missing"))?;
                if e.shape != shape {
                    return Err(Error::weights(
                        dir,
                        &name,
                        format!(
                            "shape {:?} does not match the configuration's {:?}",
                            e.shape, shape
                        ),
                    ));
                }
                let width = match e.dtype {
                    safetensors::Dtype::F32 => 4,
                    safetensors::Dtype::F16 | safetensors::Dtype::BF16 => 2,
                    other => {
                        return Err(Error::UnsupportedDType(format!(
                            "{other:?} for tensor `{name}` in {}",
                            dir.display()
                        )))
                    }
                };
                let bytes = st.data(e);
                let elems: usize = shape.iter().product();
                if bytes.len() != elems * width {
                    return Err(Error::weights(
                        dir,
                        &name,
                        "data size does not match its shape",
                    ));
                }
                let out = if e.dtype == safetensors::Dtype::F16 {
                    Loaded::F16(f16_values(bytes))
                } else {
                    Loaded::Dense(st_to_f32(bytes, e.dtype))
                };
                st.release(e);
                Ok(out)
            }
        }
    }

    /// A tensor's values as f32 (dequantized when stored quantized).
    pub(crate) fn load_values(&self, w: W, shape: &[usize]) -> Result<Vec<f32>> {
        match self.load(w, shape, None)?.into_f32() {
            Ok(v) => Ok(v),
            Err(q) => Ok(q.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1()?),
        }
    }

    /// Loads a tensor as a dense f32 tensor.
    pub(crate) fn load_dense(&self, w: W, shape: &[usize]) -> Result<Tensor> {
        self.load_dense_unpermuted(w, shape, None)
    }

    /// Loads a tensor as dense f32 with optional Q/K un-permutation (for export).
    pub(crate) fn load_dense_unpermuted(
        &self,
        w: W,
        shape: &[usize],
        unpermute_heads: Option<usize>,
    ) -> Result<Tensor> {
        match self.load(w, shape, unpermute_heads)?.into_f32() {
            Ok(v) => Ok(Tensor::from_vec(v, shape, &Device::Cpu)?),
            Err(q) => q
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
        role: crate::types::Role,
        rules: &crate::types::TypeRules,
    ) -> Result<Matmul> {
        use crate::codec::quantize_rows;
        use crate::types::{tensor_type, FileType};
        let err =
            |e: candle_core::Error| Error::weights(self.path(), format!("{w:?}"), e.to_string());
        let loaded = self.load_as(w, shape, unpermute_heads, true)?;
        let k = shape[shape.len() - 1];
        let (target, note) = tensor_type(role, rules, k);
        if let Some(n) = note {
            tracing::debug!(tensor = ?w, "{n}");
        }
        let (ty, values) = match (target, loaded) {
            (_, Loaded::Q(q)) => return QMatMul::from_qtensor(q).map(Matmul::Candle).map_err(err),
            (_, Loaded::Blocks(m)) => return Ok(Matmul::Blocks(m)),
            (Some(FileType::Quant(q)), loaded) => (q.ggml(), loaded.into_f32().unwrap_or_default()),
            // f16 weights stay f16 (half the memory and bandwidth of f32).
            (_, Loaded::F16(data)) if shape.len() == 2 => {
                return Ok(Matmul::F16 {
                    pieces: vec![data],
                    n: shape[0],
                    k: shape[1],
                });
            }
            (_, loaded) => {
                let values = loaded.into_f32().unwrap_or_default();
                return Ok(Matmul::Candle(QMatMul::Tensor(Tensor::from_vec(
                    values,
                    shape,
                    &Device::Cpu,
                )?)));
            }
        };
        let bytes = quantize_rows(&values, k, FileType::Quant(QuantType::from_ggml(ty)), 0)?;
        drop(values);
        let store = aligned(&bytes);
        let q = qtensor_from_ggml(
            ty,
            as_bytes(&store, bytes.len()),
            shape.to_vec(),
            &Device::Cpu,
        )
        .map_err(err)?;
        QMatMul::from_qtensor(q).map(Matmul::Candle).map_err(err)
    }
}
