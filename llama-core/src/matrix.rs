//! Weight matrices as the model holds them: one [`WeightMatrix`] trait over every storage, the
//! one place that decides which storage a loaded weight becomes ([`family`], [`build`]), candle's
//! tensors as the fallback storage, and the stacking of matrices that read the same input.

use std::sync::Arc;

use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType, QMatMul};
use candle_core::{DType, Device, Module, Tensor};

use crate::error::{Error, Result};
pub(crate) use crate::kernels::WeightMatrix;
use crate::kernels::{BlockFmt, BlockMatrix, DstWriter, F16Matrix};

/// A weight matrix of any storage, shared (a tied embedding and output head are one).
pub(crate) type Linear = Arc<dyn WeightMatrix>;

/// The kernel family that serves a matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Family {
    /// Our block-format kernels (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0).
    Blocks(BlockFmt),
    /// Our f16 kernels.
    F16,
    /// Our k-quant kernels (Q4_K, Q6_K) or candle's k-quant dot products on our pool.
    KQuant,
    /// candle's own matmul (dense f32, and everything on [`crate::Kernel::Candle`]).
    Candle,
}

/// Which family serves a `rank`-dimensional weight stored as `dtype`, on the running call's
/// kernel path. Loading asks this before reading a tensor (a block matrix is built straight from
/// the mapped file), and [`build`] after.
pub(crate) fn family(dtype: GgmlDType, rank: usize) -> Family {
    use GgmlDType as G;
    if rank != 2 || !crate::kernels::enabled() {
        return Family::Candle;
    }
    if let Some(fmt) = BlockFmt::from_ggml(dtype) {
        return Family::Blocks(fmt);
    }
    match dtype {
        G::F16 => Family::F16,
        G::Q2K | G::Q3K | G::Q4K | G::Q5K | G::Q6K => Family::KQuant,
        _ => Family::Candle,
    }
}

/// A matmul weight as loaded, before [`build`] makes it a [`WeightMatrix`]: candle's
/// representation, f16 rows handed over as they are, or a block matrix built from the file.
pub(crate) enum Matmul {
    Candle(QMatMul),
    /// `n` rows of `k` f16 values, held in pieces of whole rows, one after another (one piece
    /// as loaded; several once stacked, joined when the matrix is built).
    F16 {
        pieces: Vec<Vec<half::f16>>,
        n: usize,
        k: usize,
    },
    Blocks(BlockMatrix),
}

/// Builds the matrix a loaded weight becomes, per [`family`].
pub(crate) fn build(m: Matmul) -> Result<Linear> {
    let m = match m {
        Matmul::Blocks(m) => return Ok(Arc::new(m)),
        Matmul::F16 { pieces, n, k } if family(GgmlDType::F16, 2) == Family::F16 => {
            return Ok(Arc::new(F16Matrix::from_pieces(pieces, n, k)));
        }
        Matmul::F16 { pieces, n, k } => {
            let data: Vec<half::f16> = pieces.concat();
            QMatMul::TensorF16(Tensor::from_vec(data, (n, k), &Device::Cpu)?)
        }
        Matmul::Candle(m) => m,
    };
    if let QMatMul::QTensor(q) = &m {
        if q.shape().rank() == 2 {
            let (n, k) = q.shape().dims2()?;
            match family(q.dtype(), 2) {
                Family::KQuant => {
                    if let Some(mat) = crate::kernels::k_matrix(q.dtype(), &q.data()?, n, k) {
                        return mat;
                    }
                }
                Family::Blocks(fmt) => {
                    return Ok(Arc::new(BlockMatrix::new(fmt, &q.data()?, n, k)?));
                }
                Family::F16 | Family::Candle => {}
            }
        }
    }
    Ok(Arc::new(CandleMatrix::new(m)?))
}

/// `xs @ W^T` for `m` rows of `k` values into columns `col0..col0 + n` of `out` (`[m, stride]`;
/// every value of those columns overwritten).
pub(crate) fn matmul_cols(
    w: &dyn WeightMatrix,
    xs: &[f32],
    m: usize,
    out: &mut [f32],
    cols: (usize, usize, usize),
) -> Result<()> {
    matmul_cols_riding(w, xs, m, out, cols, None)
}

/// [`matmul_cols`] with `rider` riding along the product's pool calls (a one-row product; see
/// [`crate::kernels::Rider`]).
pub(crate) fn matmul_cols_riding(
    w: &dyn WeightMatrix,
    xs: &[f32],
    m: usize,
    out: &mut [f32],
    cols: (usize, usize, usize),
    rider: Option<&dyn crate::kernels::Rider>,
) -> Result<()> {
    check_cols(w, xs, m, out, cols)?;
    let (stride, col0, n) = cols;
    let put = DstWriter::columns(out, m, stride, col0, n);
    w.matmul(xs, m, rider.map_or(put, |r| put.riding(r)))
}

fn check_cols(
    w: &dyn WeightMatrix,
    xs: &[f32],
    m: usize,
    out: &[f32],
    (stride, col0, n): (usize, usize, usize),
) -> Result<()> {
    let (wn, k) = w.shape();
    if out.len() != m * stride || col0 + n > stride || n != wn || xs.len() != m * k {
        return Err(Error::InvalidArgument(format!(
            "matmul: [{m}, {}] x [{wn}, {k}]^T into columns {col0}..{} of a [{m}, {stride}] buffer of {}",
            xs.len() / m.max(1),
            col0 + n,
            out.len()
        )));
    }
    Ok(())
}

/// [`matmul_cols`] with each of the `m` rows computed exactly as it is alone: one product
/// where the matrix has one ([`WeightMatrix::matmul_as_alone`]), one product per row
/// otherwise.
pub(crate) fn matmul_cols_as_alone(
    w: &dyn WeightMatrix,
    xs: &[f32],
    m: usize,
    out: &mut [f32],
    cols: (usize, usize, usize),
) -> Result<()> {
    check_cols(w, xs, m, out, cols)?;
    let (stride, col0, n) = cols;
    if m == 0 || w.matmul_as_alone(xs, m, DstWriter::columns(out, m, stride, col0, n))? {
        return Ok(());
    }
    let k = w.shape().1;
    for r in 0..m {
        let o = &mut out[r * stride..(r + 1) * stride];
        w.matmul(
            &xs[r * k..(r + 1) * k],
            1,
            DstWriter::columns(o, 1, stride, col0, n),
        )?;
    }
    Ok(())
}

/// `xs @ W^T` for `m` rows into `out` (`[m, n]`, every value overwritten; tests).
#[cfg(test)]
pub(crate) fn matmul_into(
    w: &dyn WeightMatrix,
    xs: &[f32],
    m: usize,
    out: &mut [f32],
) -> Result<()> {
    matmul_cols(w, xs, m, out, (w.shape().0, 0, w.shape().0))
}

/// [`matmul_into`] with each row computed exactly as it is alone ([`matmul_cols_as_alone`]).
#[cfg(test)]
pub(crate) fn matmul_into_as_alone(
    w: &dyn WeightMatrix,
    xs: &[f32],
    m: usize,
    out: &mut [f32],
) -> Result<()> {
    matmul_cols_as_alone(w, xs, m, out, (w.shape().0, 0, w.shape().0))
}

/// Copies bytes into 8-byte aligned storage (quantized blocks hold f16/f32 fields).
pub(crate) fn aligned(bytes: &[u8]) -> Vec<u64> {
    let mut v = vec![0u64; bytes.len().div_ceil(8)];
    // SAFETY: u64 storage viewed as bytes; length within the allocation.
    let dst = unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u8, bytes.len()) };
    dst.copy_from_slice(bytes);
    v
}

/// The first `len` bytes of [`aligned`] storage.
pub(crate) fn as_bytes(v: &[u64], len: usize) -> &[u8] {
    assert!(
        len <= v.len() * 8,
        "as_bytes: {len} bytes of {}",
        v.len() * 8
    );
    // SAFETY: viewing initialized u64 storage as bytes, within its length (asserted).
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, len) }
}

/// candle's representation of a weight (dense f32 or f16 tensors, quantized tensors on
/// [`crate::Kernel::Candle`]) as a [`WeightMatrix`].
struct CandleMatrix {
    m: QMatMul,
    dtype: GgmlDType,
    n: usize,
    k: usize,
}

impl CandleMatrix {
    fn new(m: QMatMul) -> Result<CandleMatrix> {
        let (dtype, dims) = match &m {
            QMatMul::QTensor(q) => (q.dtype(), q.shape().dims().to_vec()),
            QMatMul::Tensor(t) => (GgmlDType::F32, t.dims().to_vec()),
            QMatMul::TensorF16(t) => (GgmlDType::F16, t.dims().to_vec()),
        };
        match dims[..] {
            [n, k] => Ok(CandleMatrix { m, dtype, n, k }),
            _ => Err(Error::InvalidArgument(format!(
                "a weight matrix has two dimensions, not {dims:?}"
            ))),
        }
    }
}

impl WeightMatrix for CandleMatrix {
    fn dtype(&self) -> GgmlDType {
        self.dtype
    }
    fn shape(&self) -> (usize, usize) {
        (self.n, self.k)
    }
    fn bytes(&self) -> usize {
        match &self.m {
            QMatMul::QTensor(q) => q.storage_size_in_bytes(),
            QMatMul::Tensor(t) | QMatMul::TensorF16(t) => {
                t.elem_count() * t.dtype().size_in_bytes()
            }
        }
    }
    fn matmul(&self, xs: &[f32], m: usize, dst: DstWriter<'_>) -> Result<()> {
        let x = Tensor::from_slice(xs, (m, self.k), &Device::Cpu)?;
        let y = self.m.forward(&x)?.to_dtype(DType::F32)?.flatten_all()?;
        let y = y.to_vec1::<f32>()?;
        if y.len() != m * self.n {
            return Err(Error::InvalidArgument(format!(
                "matmul: {} outputs for {m} x {}",
                y.len(),
                self.n
            )));
        }
        for (r, row) in y.chunks_exact(self.n.max(1)).enumerate() {
            dst.put(r, 0, row);
        }
        Ok(())
    }
    fn row_into(&self, i: usize, out: &mut [f32]) -> Result<()> {
        let row = self.rows(&[i as u32])?.flatten_all()?.to_vec1::<f32>()?;
        out.copy_from_slice(&row);
        Ok(())
    }
    fn rows(&self, ids: &[u32]) -> Result<Tensor> {
        crate::kernels::check_ids(ids, self.n)?;
        let t = Tensor::new(ids, &Device::Cpu)?;
        // f32 whatever the storage (an f16 table gives f16 rows).
        Ok(self.m.embedding(&t)?.to_dtype(DType::F32)?)
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.m.forward(x)?)
    }
}

impl Matmul {
    /// Matrices that read the same input (Q, K and V; gate and up) as one `[sum of n, k]`
    /// matrix, their rows one after another, when they are stored alike: one pass over the
    /// activations and one pool call instead of one each. Parts stored differently (a Q4_K_M
    /// file's Q6_K value matrices next to Q4_K keys, say) come back as they were.
    pub(crate) fn stack(parts: Vec<Matmul>) -> Result<Vec<Matmul>> {
        /// `f` of every part, if it gives one for each.
        fn each<'a, T>(parts: &'a [Matmul], f: impl Fn(&'a Matmul) -> Option<T>) -> Option<Vec<T>> {
            parts.iter().map(f).collect()
        }
        let width = |dims: &[usize]| (dims.len() == 2).then(|| dims[1]);
        let same = |ks: &[Option<usize>]| {
            ks.first()
                .copied()
                .flatten()
                .filter(|k| ks.iter().all(|x| *x == Some(*k)))
        };
        if parts.len() < 2 {
            return Ok(parts);
        }
        let f16_widths = each(&parts, |p| match p {
            Matmul::F16 { k, .. } => Some(Some(*k)),
            _ => None,
        });
        if let Some(k) = f16_widths.as_deref().and_then(same) {
            // The pieces are joined (and grouped) in one pass when the matrix is built.
            let (mut pieces, mut rows) = (Vec::new(), 0);
            for p in parts {
                if let Matmul::F16 { pieces: ps, n, .. } = p {
                    pieces.extend(ps);
                    rows += n;
                }
            }
            return Ok(vec![Matmul::F16 { pieces, n: rows, k }]);
        }
        let stacked = if f16_widths.is_some() {
            None
        } else if let Some(blocks) = each(&parts, |p| match p {
            Matmul::Blocks(m) => Some(m),
            _ => None,
        }) {
            BlockMatrix::stack(&blocks).map(Matmul::Blocks)
        } else if let Some(qs) = each(&parts, |p| match p {
            Matmul::Candle(QMatMul::QTensor(q)) => Some(&**q),
            _ => None,
        }) {
            let ks: Vec<_> = qs.iter().map(|q| width(q.shape().dims())).collect();
            let dtype = qs[0].dtype();
            match same(&ks) {
                Some(k) if qs.iter().all(|q| q.dtype() == dtype) => {
                    let mut bytes = Vec::new();
                    for q in &qs {
                        bytes.extend_from_slice(&q.data()?);
                    }
                    let rows = qs.iter().map(|q| q.shape().dims()[0]).sum();
                    let store = aligned(&bytes);
                    let q = qtensor_from_ggml(
                        dtype,
                        as_bytes(&store, bytes.len()),
                        vec![rows, k],
                        &Device::Cpu,
                    )?;
                    Some(Matmul::Candle(QMatMul::from_qtensor(q)?))
                }
                _ => None,
            }
        } else if let Some(ts) = each(&parts, |p| match p {
            Matmul::Candle(QMatMul::Tensor(t)) => Some(t),
            _ => None,
        }) {
            let ks: Vec<_> = ts.iter().map(|t| width(t.dims())).collect();
            match same(&ks) {
                Some(_) => Some(Matmul::Candle(QMatMul::Tensor(Tensor::cat(&ts, 0)?))),
                None => None,
            }
        } else {
            None
        };
        Ok(match stacked {
            Some(m) => vec![m],
            None => parts,
        })
    }
}
