//! GGUF files: a bounds-checked reader over a memory map (here) and the writer ([`write`]:
//! streaming, atomic rename).
//!
//! Every length and offset in the header is checked against the file size before it is used, so
//! a truncated or lying file yields an [`Error::Weights`] instead of a panic or a huge allocation.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::GgmlDType;
use memmap2::Mmap;

use crate::error::{Error, Result};

mod write;
pub(crate) use write::{finish_tmp, tmp_name, GgufTensorInfo, GgufWriter};
pub use write::{write_gguf, GgufTensor};

const GGUF_MAGIC: u32 = 0x4655_4747; // "GGUF" little-endian
const DEFAULT_ALIGNMENT: u64 = 32;
/// Deepest nesting of arrays we accept (the format allows arrays of arrays).
const MAX_ARRAY_DEPTH: usize = 4;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
#[allow(missing_docs)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    /// The value as an unsigned integer, if it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) if v >= 0 => Some(v as u64),
            Value::I16(v) if v >= 0 => Some(v as u64),
            Value::I32(v) if v >= 0 => Some(v as u64),
            Value::I64(v) if v >= 0 => Some(v as u64),
            _ => None,
        }
    }
    /// The value as a signed integer.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::I8(v) => Some(v as i64),
            Value::I16(v) => Some(v as i64),
            Value::I32(v) => Some(v as i64),
            Value::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }
    /// The value as a float, if it is any numeric type.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }
    /// The value as a string slice.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }
    /// The value as a bool.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }
    /// The value as an array.
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// Where one tensor lives in the file.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    /// Shape in candle order (outermost first): a GGUF `[ne0, ne1]` weight is `[ne1, ne0]`.
    pub shape: Vec<usize>,
    /// Storage type.
    pub dtype: GgmlDType,
    /// Absolute byte offset of the data in the file.
    pub offset: usize,
    /// Size of the data in bytes.
    pub size: usize,
}

/// An open GGUF file: parsed metadata and tensor directory over a memory map.
pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    /// Format version (2 or 3).
    pub version: u32,
    /// All metadata key/value pairs.
    pub metadata: HashMap<String, Value>,
    /// Tensor directory, by name.
    pub tensors: HashMap<String, TensorInfo>,
    /// Tensor names in file order.
    pub tensor_order: Vec<String>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

/// Maps a GGUF type code to candle's type, or names it in an error.
pub fn ggml_dtype_from_u32(code: u32) -> std::result::Result<GgmlDType, String> {
    Ok(match code {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        9 => GgmlDType::Q8_1,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        15 => GgmlDType::Q8K,
        30 => GgmlDType::BF16,
        16..=23 => return Err(format!("IQ quantization type {code} is not supported")),
        other => return Err(format!("GGML type {other} is not supported")),
    })
}

/// The GGUF type code of a candle type.
pub fn ggml_dtype_to_u32(dtype: GgmlDType) -> u32 {
    match dtype {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q5_0 => 6,
        GgmlDType::Q5_1 => 7,
        GgmlDType::Q8_0 => 8,
        GgmlDType::Q8_1 => 9,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 11,
        GgmlDType::Q4K => 12,
        GgmlDType::Q5K => 13,
        GgmlDType::Q6K => 14,
        GgmlDType::Q8K => 15,
        GgmlDType::BF16 => 30,
    }
}

struct Cursor<'a> {
    data: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn err(&self, what: &str) -> Error {
        Error::weights(
            self.path,
            "",
            format!("malformed GGUF header at byte {}: {what}", self.pos),
        )
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or_else(|| self.err("unexpected end of file (truncated header?)"))?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let s = self.take(N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.array::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    fn remaining(&self) -> usize {
        self.data.len() - self.pos
    }
    fn len_u64(&mut self, what: &str) -> Result<usize> {
        let n = self.u64()?;
        usize::try_from(n)
            .ok()
            .filter(|&n| n <= self.remaining())
            .ok_or_else(|| self.err(&format!("{what} length {n} exceeds the file size")))
    }
    fn string(&mut self) -> Result<String> {
        let n = self.len_u64("string")?;
        let bytes = self.take(n)?;
        Ok(String::from_utf8_lossy(bytes).into_owned())
    }
    fn value(&mut self, ty: u32, depth: usize) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(self.u8()?),
            1 => Value::I8(self.u8()? as i8),
            2 => Value::U16(self.u16()?),
            3 => Value::I16(self.u16()? as i16),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(self.u32()? as i32),
            6 => Value::F32(f32::from_le_bytes(self.array()?)),
            7 => Value::Bool(self.u8()? != 0),
            8 => Value::String(self.string()?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(self.err("arrays nested too deeply"));
                }
                let elem_ty = self.u32()?;
                // Each element takes at least one byte, so the count is bounded by the file.
                let n = self.len_u64("array")?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(elem_ty, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(self.u64()? as i64),
            12 => Value::F64(f64::from_le_bytes(self.array()?)),
            other => return Err(self.err(&format!("unknown metadata value type {other}"))),
        })
    }
}

impl GgufFile {
    /// Opens and validates a GGUF file (header, metadata, tensor directory and data bounds).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the map is read-only; like every mmap-based loader we assume the file is not
        // truncated by another process while it is mapped.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        Self::parse(path.to_path_buf(), mmap)
    }

    fn parse(path: PathBuf, mmap: Mmap) -> Result<Self> {
        let (version, metadata, tensors, tensor_order) = {
            let mut c = Cursor {
                data: &mmap[..],
                pos: 0,
                path: &path,
            };
            let magic = c
                .u32()
                .map_err(|_| Error::weights(&path, "", "file too small to be GGUF"))?;
            if magic != GGUF_MAGIC {
                return Err(Error::weights(
                    &path,
                    "",
                    "not a GGUF file (bad magic number)",
                ));
            }
            let version = c.u32()?;
            if !(2..=3).contains(&version) {
                return Err(Error::weights(
                    &path,
                    "",
                    format!("unsupported GGUF version {version} (2 and 3 are supported)"),
                ));
            }
            let n_tensors = c.u64()?;
            let n_kv = c.u64()?;
            // A tensor entry takes at least 24 bytes, a kv entry at least 12.
            if n_tensors > (c.remaining() / 24) as u64 || n_kv > (c.remaining() / 12) as u64 {
                return Err(c.err(&format!(
                    "{n_tensors} tensors / {n_kv} metadata entries cannot fit in the file"
                )));
            }
            let mut metadata = HashMap::with_capacity(n_kv as usize);
            for _ in 0..n_kv {
                let key = c.string()?;
                let ty = c.u32()?;
                let value = c.value(ty, 0)?;
                metadata.insert(key, value);
            }
            let mut infos = Vec::with_capacity(n_tensors as usize);
            for _ in 0..n_tensors {
                let name = c.string()?;
                let n_dims = c.u32()? as usize;
                if n_dims == 0 || n_dims > 4 {
                    return Err(Error::weights(
                        &path,
                        &name,
                        format!("{n_dims} dimensions (1 to 4 are valid)"),
                    ));
                }
                let mut dims = Vec::with_capacity(n_dims);
                for _ in 0..n_dims {
                    dims.push(c.u64()?);
                }
                let ty = c.u32()?;
                let offset = c.u64()?;
                infos.push((name, dims, ty, offset));
            }
            let alignment = match metadata.get("general.alignment") {
                None => DEFAULT_ALIGNMENT,
                Some(v) => v
                    .as_u64()
                    .filter(|a| *a > 0 && a.is_power_of_two() && *a <= 1 << 20)
                    .ok_or_else(|| Error::weights(&path, "", "invalid general.alignment"))?,
            };
            let data_start = (c.pos as u64).div_ceil(alignment) * alignment;
            let file_len = mmap.len() as u64;
            let mut tensors = HashMap::with_capacity(infos.len());
            let mut order = Vec::with_capacity(infos.len());
            for (name, dims, ty, offset) in infos {
                let dtype =
                    ggml_dtype_from_u32(ty).map_err(|m| Error::weights(&path, &name, m.clone()))?;
                let mut elems: u64 = 1;
                for &d in &dims {
                    elems = elems
                        .checked_mul(d)
                        .filter(|_| d > 0)
                        .ok_or_else(|| Error::weights(&path, &name, "invalid dimensions"))?;
                }
                let block = dtype.block_size() as u64;
                if dims[0] % block != 0 {
                    return Err(Error::weights(
                        &path,
                        &name,
                        format!(
                            "row length {} is not a multiple of the {dtype:?} block size {block}",
                            dims[0]
                        ),
                    ));
                }
                let size = (elems / block)
                    .checked_mul(dtype.type_size() as u64)
                    .ok_or_else(|| Error::weights(&path, &name, "tensor too large"))?;
                let start = data_start
                    .checked_add(offset)
                    .ok_or_else(|| Error::weights(&path, &name, "offset overflows"))?;
                let end = start
                    .checked_add(size)
                    .ok_or_else(|| Error::weights(&path, &name, "size overflows"))?;
                if end > file_len {
                    return Err(Error::weights(
                        &path,
                        &name,
                        format!(
                            "data [{start}, {end}) lies past the end of the file ({file_len} bytes): \
                             the file is truncated or its header is wrong"
                        ),
                    ));
                }
                if start % 4 != 0 {
                    return Err(Error::weights(&path, &name, "tensor data is misaligned"));
                }
                let mut shape: Vec<usize> = dims.iter().map(|&d| d as usize).collect();
                shape.reverse();
                order.push(name.clone());
                tensors.insert(
                    name,
                    TensorInfo {
                        shape,
                        dtype,
                        offset: start as usize,
                        size: size as usize,
                    },
                );
            }
            (version, metadata, tensors, order)
        };
        Ok(GgufFile {
            path,
            mmap,
            version,
            metadata,
            tensors,
            tensor_order,
        })
    }

    /// The file this was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A metadata value.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    /// Drops the resident pages of a tensor's data once it has been copied out (they are
    /// re-read from the file if used again).
    pub(crate) fn release(&self, name: &str) {
        if let Some(info) = self.tensors.get(name) {
            release_pages(&self.mmap, info.offset, info.size);
        }
    }

    /// [`Gguf::release`] for bytes `start..start + len` of a tensor's data.
    pub(crate) fn release_part(&self, name: &str, start: usize, len: usize) {
        if let Some(info) = self.tensors.get(name) {
            if start + len <= info.size {
                release_pages(&self.mmap, info.offset + start, len);
            }
        }
    }

    /// The raw bytes of a tensor (bounds were checked at open).
    pub fn tensor_data(&self, name: &str) -> Option<(&TensorInfo, &[u8])> {
        let info = self.tensors.get(name)?;
        Some((info, &self.mmap[info.offset..info.offset + info.size]))
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
