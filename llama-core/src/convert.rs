//! Format conversion: the GGUF writer, and GGUF to a Hugging Face folder (GGUF output of
//! every type: [`crate::quantize::quantize_model`]).
//!
//! Files are written to a temporary name beside the destination and renamed when complete, so
//! a failed conversion never leaves a half-written file that looks finished.

use std::collections::HashMap;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Tensor};

use crate::config::{Config, RopeScaling};
use crate::error::{Error, Result};
use crate::gguf::{ggml_dtype_to_u32, GgufFile, Value};
use crate::tokenizer::Tokenizer;
use crate::weights::WeightSource;

/// Dense storage types for conversions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DenseType {
    /// 32-bit float.
    F32,
    /// 16-bit float.
    F16,
}

fn value_type(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn write_str(w: &mut impl Write, s: &str) -> std::io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

fn write_value(w: &mut impl Write, v: &Value) -> std::io::Result<()> {
    match v {
        Value::U8(x) => w.write_all(&[*x]),
        Value::I8(x) => w.write_all(&x.to_le_bytes()),
        Value::U16(x) => w.write_all(&x.to_le_bytes()),
        Value::I16(x) => w.write_all(&x.to_le_bytes()),
        Value::U32(x) => w.write_all(&x.to_le_bytes()),
        Value::I32(x) => w.write_all(&x.to_le_bytes()),
        Value::F32(x) => w.write_all(&x.to_le_bytes()),
        Value::Bool(x) => w.write_all(&[u8::from(*x)]),
        Value::String(s) => write_str(w, s),
        Value::Array(items) => {
            let ty = items.first().map(value_type).unwrap_or(4);
            w.write_all(&ty.to_le_bytes())?;
            w.write_all(&(items.len() as u64).to_le_bytes())?;
            for it in items {
                write_value(w, it)?;
            }
            Ok(())
        }
        Value::U64(x) => w.write_all(&x.to_le_bytes()),
        Value::I64(x) => w.write_all(&x.to_le_bytes()),
        Value::F64(x) => w.write_all(&x.to_le_bytes()),
    }
}

/// One tensor to write: name, candle-order shape, type, raw block bytes.
pub struct GgufTensor {
    /// Tensor name.
    pub name: String,
    /// Shape, outermost first (GGUF stores it reversed).
    pub shape: Vec<usize>,
    /// Storage type.
    pub dtype: GgmlDType,
    /// Raw data in the type's block layout.
    pub data: Vec<u8>,
}

/// Writes a GGUF v3 file atomically (temporary file, then rename).
pub fn write_gguf(path: &Path, metadata: &[(String, Value)], tensors: &[GgufTensor]) -> Result<()> {
    let infos: Vec<GgufTensorInfo> = tensors
        .iter()
        .map(|t| GgufTensorInfo {
            name: t.name.clone(),
            shape: t.shape.clone(),
            dtype: t.dtype,
            bytes: t.data.len(),
        })
        .collect();
    let mut w = GgufWriter::create(path, metadata, &infos)?;
    for (i, t) in tensors.iter().enumerate() {
        w.write_tensor(i, &t.data)?;
    }
    w.finish().map(|_| ())
}

/// A tensor's header entry: its data follows later through [`GgufWriter::write_tensor`].
#[derive(Debug, Clone)]
pub(crate) struct GgufTensorInfo {
    pub(crate) name: String,
    pub(crate) shape: Vec<usize>,
    pub(crate) dtype: GgmlDType,
    pub(crate) bytes: usize,
}

const ALIGN: u64 = 32;

/// Streams a GGUF v3 file: header first (every tensor's size known up front), then each
/// tensor's data in order. Written to a temporary name; [`GgufWriter::finish`] renames it into
/// place, and dropping an unfinished writer removes it.
pub(crate) struct GgufWriter {
    w: Option<BufWriter<std::fs::File>>,
    tmp: PathBuf,
    path: PathBuf,
    sizes: Vec<usize>,
    next: usize,
    written: u64,
}

impl GgufWriter {
    pub(crate) fn create(
        path: &Path,
        metadata: &[(String, Value)],
        tensors: &[GgufTensorInfo],
    ) -> Result<Self> {
        let tmp = tmp_name(path);
        let f = std::fs::File::create(&tmp).map_err(|e| Error::io(path, e))?;
        let mut me = GgufWriter {
            w: Some(BufWriter::new(f)),
            tmp,
            path: path.to_path_buf(),
            sizes: tensors.iter().map(|t| t.bytes).collect(),
            next: 0,
            written: 0,
        };
        let res = (|| -> std::io::Result<u64> {
            let w = me.w.as_mut().expect("open");
            let mut count = CountingWriter { inner: w, n: 0 };
            count.write_all(&0x4655_4747u32.to_le_bytes())?;
            count.write_all(&3u32.to_le_bytes())?;
            count.write_all(&(tensors.len() as u64).to_le_bytes())?;
            count.write_all(&(metadata.len() as u64).to_le_bytes())?;
            for (k, v) in metadata {
                write_str(&mut count, k)?;
                count.write_all(&value_type(v).to_le_bytes())?;
                write_value(&mut count, v)?;
            }
            let mut offset: u64 = 0;
            for t in tensors {
                write_str(&mut count, &t.name)?;
                count.write_all(&(t.shape.len() as u32).to_le_bytes())?;
                for &d in t.shape.iter().rev() {
                    count.write_all(&(d as u64).to_le_bytes())?;
                }
                count.write_all(&ggml_dtype_to_u32(t.dtype).to_le_bytes())?;
                count.write_all(&offset.to_le_bytes())?;
                offset = (offset + t.bytes as u64).div_ceil(ALIGN) * ALIGN;
            }
            let pos = count.n;
            let pad = pos.div_ceil(ALIGN) * ALIGN - pos;
            count.write_all(&vec![0u8; pad as usize])?;
            Ok(count.n)
        })();
        me.written = res.map_err(|e| Error::io(path, e))?;
        Ok(me)
    }

    /// Writes tensor `index`'s data (tensors come in header order).
    pub(crate) fn write_tensor(&mut self, index: usize, data: &[u8]) -> Result<()> {
        if index != self.next || self.sizes.get(index) != Some(&data.len()) {
            return Err(Error::InvalidArgument(format!(
                "GGUF writer: tensor {index} has {} bytes, expected tensor {} with {:?}",
                data.len(),
                self.next,
                self.sizes.get(self.next)
            )));
        }
        let w = self.w.as_mut().expect("open until finish");
        let len = data.len() as u64;
        let pad = len.div_ceil(ALIGN) * ALIGN - len;
        w.write_all(data)
            .and_then(|_| w.write_all(&vec![0u8; pad as usize]))
            .map_err(|e| Error::io(&self.path, e))?;
        self.written += len + pad;
        self.next += 1;
        Ok(())
    }

    /// Flushes, syncs and renames the file into place; returns its size in bytes.
    pub(crate) fn finish(mut self) -> Result<u64> {
        if self.next != self.sizes.len() {
            return Err(Error::InvalidArgument(format!(
                "GGUF writer: {} of {} tensors written",
                self.next,
                self.sizes.len()
            )));
        }
        let w = self.w.take().expect("open until finish");
        let res = w
            .into_inner()
            .map_err(|e| e.into_error())
            .and_then(|f| f.sync_all());
        finish_tmp(res, &self.tmp, &self.path)?;
        Ok(self.written)
    }
}

impl Drop for GgufWriter {
    fn drop(&mut self) {
        if self.w.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

struct CountingWriter<'a, W: Write> {
    inner: &'a mut W,
    n: u64,
}
impl<W: Write> Write for CountingWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.n += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

fn tmp_name(path: &Path) -> PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(format!(".tmp-{}", std::process::id()));
    path.with_file_name(name)
}

fn finish_tmp(res: std::io::Result<()>, tmp: &Path, path: &Path) -> Result<()> {
    match res.and_then(|_| std::fs::rename(tmp, path)) {
        Ok(()) => Ok(()),
        Err(e) => {
            let _ = std::fs::remove_file(tmp);
            Err(Error::io(path, e))
        }
    }
}

/// Writes a Hugging Face folder (config.json, model.safetensors, tokenizer.json,
/// tokenizer_config.json, generation_config.json) with the weights of a GGUF llama file,
/// dequantized to `ty`, Q/K rows in Hugging Face order.
pub fn gguf_to_hf(
    src: &Path,
    dst_dir: &Path,
    ty: DenseType,
    mut progress: impl FnMut(usize, usize),
) -> Result<()> {
    let g = GgufFile::open(src)?;
    let cfg = Config::from_gguf(&g)?;
    cfg.validate(src)?;
    let tok = Tokenizer::from_gguf(&g)?;
    let template = g
        .get("tokenizer.chat_template")
        .and_then(|v| v.as_str())
        .map(str::to_string);
    let rope_freqs = g.tensors.contains_key("rope_freqs.weight");
    let src_w = WeightSource::Gguf(g);
    std::fs::create_dir_all(dst_dir).map_err(|e| Error::io(dst_dir, e))?;
    let c = &cfg;
    let list = crate::weights::llama_tensors(c, !c.tie_word_embeddings);
    let h = c.hidden_size;
    let dtype = match ty {
        DenseType::F32 => DType::F32,
        DenseType::F16 => DType::F16,
    };
    let mut map: HashMap<String, Tensor> = HashMap::new();
    let n = list.len();
    for (i, (w, shape, perm)) in list.into_iter().enumerate() {
        let t = src_w.load_dense_unpermuted(w, &shape, perm)?;
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
        "torch_dtype": match ty { DenseType::F32 => "float32", DenseType::F16 => "float16" },
        "hidden_act": "silu",
    });
    if let Some(b) = c.bos_token_id {
        config["bos_token_id"] = b.into();
    }
    if let Some(&e) = c.eos_token_ids.first() {
        config["eos_token_id"] = e.into();
    }
    match &c.rope_scaling {
        RopeScaling::None => {}
        RopeScaling::Linear { factor } => {
            config["rope_scaling"] = serde_json::json!({"rope_type": "linear", "factor": factor})
        }
        RopeScaling::Dynamic { factor } => {
            config["rope_scaling"] = serde_json::json!({"rope_type": "dynamic", "factor": factor})
        }
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            config["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": factor,
                "low_freq_factor": low_freq_factor, "high_freq_factor": high_freq_factor,
                "original_max_position_embeddings": original_max_position_embeddings})
        }
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
