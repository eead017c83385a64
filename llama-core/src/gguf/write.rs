//! The GGUF writer: [`write_gguf`] for whole files in memory, and [`GgufWriter`], which streams
//! tensors to a temporary file renamed into place when complete (a failed write never leaves a
//! half-written file that looks finished).

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use candle_core::quantized::GgmlDType;

use super::{ggml_dtype_to_u32, Value};
use crate::error::{Error, Result};

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
#[derive(Debug, Clone)]
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

pub(crate) fn tmp_name(path: &Path) -> PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(format!(".tmp-{}", std::process::id()));
    path.with_file_name(name)
}

pub(crate) fn finish_tmp(res: std::io::Result<()>, tmp: &Path, path: &Path) -> Result<()> {
    match res.and_then(|_| std::fs::rename(tmp, path)) {
        Ok(()) => Ok(()),
        Err(e) => {
            let _ = std::fs::remove_file(tmp);
            Err(Error::io(path, e))
        }
    }
}
