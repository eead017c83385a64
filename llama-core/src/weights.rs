//! Weight sources: a GGUF file or a Hugging Face safetensors folder, behind one interface that
//! validates every tensor's shape before it is used.
//!
//! GGUF `llama` files store the Q and K projections with their rows permuted for interleaved
//! RoPE (llama.cpp's converter). We undo that permutation while loading so that one model,
//! using rotate-half RoPE, runs both formats.

use std::path::{Path, PathBuf};

use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType, QMatMul, QTensor};

use crate::model::QuantType;
use candle_core::{Device, Tensor};
use std::collections::HashMap;

use crate::error::{Error, Result};
use crate::gguf::GgufFile;
use crate::matrix::{aligned, as_bytes, family, Family, Matmul};

/// Where a tensor is read from.
pub(crate) enum WeightSource {
    Gguf(GgufFile),
    SafeTensors { st: StFiles, dir: PathBuf },
}

/// Memory-mapped safetensors files (one model, possibly sharded) with a tensor index.
pub(crate) struct StFiles {
    maps: Vec<memmap2::Mmap>,
    index: HashMap<String, StEntry>,
}

struct StEntry {
    file: usize,
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    /// Absolute byte range in the file.
    start: usize,
    end: usize,
}

impl StFiles {
    /// Maps and indexes the files; the first file naming a tensor wins.
    pub(crate) fn open(files: &[PathBuf]) -> Result<Self> {
        let mut maps = Vec::with_capacity(files.len());
        let mut index = HashMap::new();
        for (i, path) in files.iter().enumerate() {
            let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
            // SAFETY: a read-only map of a file we do not modify.
            let map = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| Error::io(path, e))?;
            let (n, meta) = safetensors::SafeTensors::read_metadata(&map)
                .map_err(|e| Error::weights(path, "", format!("invalid safetensors file: {e}")))?;
            let base = 8 + n;
            for (name, info) in meta.tensors() {
                let (a, b) = info.data_offsets;
                if base + b > map.len() || a > b {
                    return Err(Error::weights(path, &name, "data lies outside the file"));
                }
                index.entry(name).or_insert(StEntry {
                    file: i,
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    start: base + a,
                    end: base + b,
                });
            }
            maps.push(map);
        }
        Ok(StFiles { maps, index })
    }

    fn get(&self, name: &str) -> Option<&StEntry> {
        self.index.get(name)
    }

    fn data(&self, e: &StEntry) -> &[u8] {
        &self.maps[e.file][e.start..e.end]
    }

    fn release(&self, e: &StEntry) {
        release_pages(&self.maps[e.file], e.start, e.end - e.start);
    }
}

/// Drops the resident pages of a mapped file range once its tensor has been copied out, so
/// loading (and quantizing) a large model never keeps the whole file resident. The map is a
/// read-only private file mapping: a later read of the range re-reads the file.
pub(crate) fn release_pages(map: &memmap2::Mmap, start: usize, len: usize) {
    #[cfg(unix)]
    if len > 0 && start + len <= map.len() {
        // SAFETY: DONTNEED on a read-only file-backed mapping only drops cached pages; their
        // content is unchanged when next read. No reference into the range is held across this.
        let _ =
            unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, len) };
    }
    #[cfg(not(unix))]
    let _ = (map, start, len);
}

fn st_to_f32(bytes: &[u8], dtype: safetensors::Dtype) -> Vec<f32> {
    match dtype {
        safetensors::Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        safetensors::Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        _ => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    }
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

/// Every weight of a llama model with its shape (candle order) and, for Q and K, the head
/// count of llama.cpp's row permutation: the order llama.cpp's converter writes them.
pub(crate) fn llama_tensors(
    c: &crate::config::Config,
    has_output: bool,
) -> Vec<(W, Vec<usize>, Option<usize>)> {
    let (h, hd, nh, nkv, ff) = (
        c.hidden_size,
        c.head_dim,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.intermediate_size,
    );
    let mut list = vec![(W::Embed, vec![c.vocab_size, h], None)];
    for l in 0..c.num_hidden_layers {
        list.push((W::AttnNorm(l), vec![h], None));
        list.push((W::Q(l), vec![nh * hd, h], Some(nh)));
        list.push((W::K(l), vec![nkv * hd, h], Some(nkv)));
        list.push((W::V(l), vec![nkv * hd, h], None));
        list.push((W::O(l), vec![h, nh * hd], None));
        list.push((W::FfnNorm(l), vec![h], None));
        list.push((W::Gate(l), vec![ff, h], None));
        list.push((W::Up(l), vec![ff, h], None));
        list.push((W::Down(l), vec![h, ff], None));
    }
    list.push((W::OutputNorm, vec![h], None));
    if has_output {
        list.push((W::Output, vec![c.vocab_size, h], None));
    }
    list
}

impl W {
    pub(crate) fn gguf_name(self) -> String {
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
        match self.load(w, shape, None)?.into_f32() {
            Ok(v) => Ok(Tensor::from_vec(v, shape, &Device::Cpu)?),
            Err(q) => q
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
        role: crate::quantize::Role,
        rules: &crate::quantize::TypeRules,
    ) -> Result<Matmul> {
        use crate::quantize::{quantize_rows, tensor_type, FileType};
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
