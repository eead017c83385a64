//! The one storage-type vocabulary of the crate: [`QuantType`] (the block types weights can be
//! quantized to), [`FileType`] (what a converted file's matrices are stored as: f32, f16 or a
//! block type), and the per-tensor type rules shared by quantize-at-load and `quantize_model`.
//! candle's `GgmlDType` is the on-disk name of a tensor's type; the kernels' `BlockFmt` is the
//! subset our block kernels run; C's `LLAMA_QUANTIZE_*` and Python's strings map onto
//! [`QuantType`].
//!
//! Type rules follow llama.cpp's defaults: norms (1-D tensors) stay f32; the output head (or
//! the token embedding when it is tied to the head) becomes Q6_K, or Q8_0 when its rows are not
//! a multiple of 256 or the target is Q8_0; every other matrix gets the requested type, falling
//! back (Q4_K to Q5_0, Q5_K to Q5_1, Q6_K to Q8_0) when its rows do not fit the block size.

use candle_core::quantized::GgmlDType;

use crate::error::{Error, Result};

/// Block types for quantizing at load time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum QuantType {
    /// 8-bit, blocks of 32.
    Q8_0,
    /// 4-bit, blocks of 32, scale only.
    Q4_0,
    /// 4-bit, blocks of 32, scale and minimum.
    Q4_1,
    /// 5-bit, blocks of 32, scale only.
    Q5_0,
    /// 5-bit, blocks of 32, scale and minimum.
    Q5_1,
    /// 4-bit k-quant (super-blocks of 256).
    Q4K,
    /// 5-bit k-quant (super-blocks of 256).
    Q5K,
    /// 6-bit k-quant (super-blocks of 256).
    Q6K,
}

impl QuantType {
    /// Parses `q8_0`, `q4_0`, `q4_1`, `q5_0`, `q5_1`, `q4_k`, `q5_k`, `q6_k` (case-insensitive).
    pub fn parse(s: &str) -> Result<QuantType> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "q8_0" => QuantType::Q8_0,
            "q4_0" => QuantType::Q4_0,
            "q4_1" => QuantType::Q4_1,
            "q5_0" => QuantType::Q5_0,
            "q5_1" => QuantType::Q5_1,
            "q4_k" | "q4k" => QuantType::Q4K,
            "q5_k" | "q5k" => QuantType::Q5K,
            "q6_k" | "q6k" => QuantType::Q6K,
            other => {
                return Err(Error::InvalidArgument(format!(
                    "unknown quantization type `{other}` (q8_0, q4_0, q4_1, q5_0, q5_1, q4_k, q5_k, q6_k)"
                )))
            }
        })
    }

    pub(crate) fn from_ggml(t: candle_core::quantized::GgmlDType) -> QuantType {
        use candle_core::quantized::GgmlDType as G;
        match t {
            G::Q4_0 => QuantType::Q4_0,
            G::Q4_1 => QuantType::Q4_1,
            G::Q5_0 => QuantType::Q5_0,
            G::Q5_1 => QuantType::Q5_1,
            G::Q4K => QuantType::Q4K,
            G::Q5K => QuantType::Q5K,
            G::Q6K => QuantType::Q6K,
            _ => QuantType::Q8_0,
        }
    }

    pub(crate) fn ggml(self) -> candle_core::quantized::GgmlDType {
        use candle_core::quantized::GgmlDType as G;
        match self {
            QuantType::Q8_0 => G::Q8_0,
            QuantType::Q4_0 => G::Q4_0,
            QuantType::Q4_1 => G::Q4_1,
            QuantType::Q5_0 => G::Q5_0,
            QuantType::Q5_1 => G::Q5_1,
            QuantType::Q4K => G::Q4K,
            QuantType::Q5K => G::Q5K,
            QuantType::Q6K => G::Q6K,
        }
    }

    /// The type used when a row length is not a multiple of this type's block size (as
    /// llama.cpp falls back for k-quants).
    pub(crate) fn fallback(self) -> Option<QuantType> {
        match self {
            QuantType::Q4K => Some(QuantType::Q5_0),
            QuantType::Q5K => Some(QuantType::Q5_1),
            QuantType::Q6K => Some(QuantType::Q8_0),
            _ => None,
        }
    }
}

/// Storage type of a converted model file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FileType {
    /// 32-bit float.
    F32,
    /// 16-bit float.
    F16,
    /// A block-quantized type.
    Quant(QuantType),
}

impl std::fmt::Display for FileType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            FileType::F32 => "f32",
            FileType::F16 => "f16",
            FileType::Quant(q) => match q {
                QuantType::Q8_0 => "q8_0",
                QuantType::Q4_0 => "q4_0",
                QuantType::Q4_1 => "q4_1",
                QuantType::Q5_0 => "q5_0",
                QuantType::Q5_1 => "q5_1",
                QuantType::Q4K => "q4_k",
                QuantType::Q5K => "q5_k",
                QuantType::Q6K => "q6_k",
            },
        };
        f.write_str(s)
    }
}

impl FileType {
    /// Parses `f32`, `f16` or a [`QuantType`] name (`q8_0`, `q4_k`, ...).
    pub fn parse(s: &str) -> Result<FileType> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Ok(FileType::F32),
            "f16" => Ok(FileType::F16),
            other => QuantType::parse(other).map(FileType::Quant).map_err(|_| {
                Error::InvalidArgument(format!(
                    "unknown type `{s}` (f32, f16, q8_0, q4_0, q4_1, q5_0, q5_1, q4_k, q5_k, q6_k)"
                ))
            }),
        }
    }

    pub(crate) fn ggml(self) -> GgmlDType {
        match self {
            FileType::F32 => GgmlDType::F32,
            FileType::F16 => GgmlDType::F16,
            FileType::Quant(q) => q.ggml(),
        }
    }

    /// llama.cpp's `general.file_type` code (the `_S` k-quant variants: no tensor promotion).
    pub(crate) fn gguf_file_type(self) -> u32 {
        match self {
            FileType::F32 => 0,
            FileType::F16 => 1,
            FileType::Quant(q) => match q {
                QuantType::Q4_0 => 2,
                QuantType::Q4_1 => 3,
                QuantType::Q8_0 => 7,
                QuantType::Q5_0 => 8,
                QuantType::Q5_1 => 9,
                QuantType::Q4K => 14,
                QuantType::Q5K => 16,
                QuantType::Q6K => 18,
            },
        }
    }

    fn fallback(self) -> Option<FileType> {
        match self {
            FileType::Quant(q) => q.fallback().map(FileType::Quant),
            _ => None,
        }
    }
}

/// What a tensor is, for the type rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// Norm weights, rope factors: always f32.
    Vector,
    /// The token embedding of a model with a separate output head.
    Embedding,
    /// The output head, or the token embedding of a tied model.
    Output,
    /// Any other weight matrix.
    Matrix,
}

/// Per-role type overrides.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct TypeRules {
    pub(crate) base: Option<FileType>,
    pub(crate) output: Option<FileType>,
    pub(crate) embedding: Option<FileType>,
}

/// The type a tensor of `role` with rows of `row_len` gets, and a note when it had to fall back.
pub(crate) fn tensor_type(
    role: Role,
    rules: &TypeRules,
    row_len: usize,
) -> (Option<FileType>, Option<String>) {
    let Some(base) = rules.base else {
        return (None, None);
    };
    let wanted = match role {
        Role::Vector => return (Some(FileType::F32), None),
        Role::Matrix => base,
        Role::Embedding => rules.embedding.unwrap_or(base),
        Role::Output => match rules.output {
            Some(t) => t,
            None => match base {
                FileType::F32 | FileType::F16 => base,
                FileType::Quant(QuantType::Q8_0) => base,
                FileType::Quant(_) if !row_len.is_multiple_of(256) => {
                    FileType::Quant(QuantType::Q8_0)
                }
                FileType::Quant(_) => FileType::Quant(QuantType::Q6K),
            },
        },
    };
    let mut t = wanted;
    while !row_len.is_multiple_of(t.ggml().block_size()) {
        match t.fallback() {
            Some(f) => t = f,
            None => {
                return (
                    Some(FileType::F16),
                    Some(format!(
                        "rows of {row_len} fit no block of {wanted}: f16 instead"
                    )),
                )
            }
        }
    }
    let note = (t != wanted).then(|| {
        format!("rows of {row_len} are not a multiple of {wanted}'s block size: {t} instead")
    });
    (Some(t), note)
}
