//! The k-quants (Q2_K to Q6_K): our own Q4_K, Q5_K and Q6_K layouts and kernels ([`q4k`],
//! [`q6k`]), and candle's block dot products on our pool for the others (and for rows that do
//! not fit the group layouts).

pub(crate) mod q4k;

/// Whether our grouped k-quant layout (groups of `g` rows, super-blocks of 256) serves a
/// `[n, k]` matrix on the running path.
fn grouped_layout_fits(n: usize, k: usize, g: usize) -> bool {
    n.is_multiple_of(g) && k.is_multiple_of(q4k::QK_K) && isa() != Isa::Scalar && repack()
}

/// Checks that GGUF bytes hold a `[n, k]` k-quant matrix in groups of `g` rows
/// (`block_bytes` per super-block); returns the super-blocks per row.
fn check_gguf_bytes(
    name: &str,
    bytes: &[u8],
    (n, k): (usize, usize),
    g: usize,
    block_bytes: usize,
) -> Result<usize> {
    let nb = k / q4k::QK_K;
    if !k.is_multiple_of(q4k::QK_K) || !n.is_multiple_of(g) || bytes.len() != n * nb * block_bytes {
        return Err(Error::InvalidArgument(format!(
            "{name} matrix [{n}, {k}] cannot hold {} bytes",
            bytes.len()
        )));
    }
    Ok(nb)
}
pub(crate) mod q6k;

use super::*;

/// A k-quant weight matrix `[n, k]` (Q2_K to Q6_K) on our thread pool, with candle's block
/// dot products (`GgmlType::vec_dot`, AVX2 when the CPU has it) and activations quantized to
/// q8_K blocks as candle and ggml do. Running them on our pool rather than candle's keeps one
/// set of threads busy: with two pools, each one's idle workers spin while the other works.
pub(crate) struct KMatrix<T> {
    n: usize,
    k: usize,
    data: Vec<T>,
}

impl<T> std::fmt::Debug for KMatrix<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KMatrix")
            .field("n", &self.n)
            .field("k", &self.k)
            .finish()
    }
}

/// Builds the k-quant matrix for GGUF bytes of type `t`, if `t` is a k-quant.
pub(crate) fn k_matrix(
    t: GgmlDType,
    bytes: &[u8],
    n: usize,
    k: usize,
) -> Option<Result<std::sync::Arc<dyn WeightMatrix>>> {
    use candle_core::quantized::k_quants::{BlockQ2K, BlockQ3K, BlockQ4K, BlockQ5K, BlockQ6K};
    fn make<T: KBlock>(b: &[u8], n: usize, k: usize) -> Result<std::sync::Arc<dyn WeightMatrix>> {
        Ok(std::sync::Arc::new(KMatrix::<T>::new(b, n, k)?))
    }
    Some(match t {
        GgmlDType::Q4K if q4k::Q4KMatrix::fits(n, k) => q4k::Q4KMatrix::new(bytes, n, k)
            .map(|m| std::sync::Arc::new(m) as std::sync::Arc<dyn WeightMatrix>),
        GgmlDType::Q5K if q4k::Q5KMatrix::fits(n, k) => q4k::Q5KMatrix::new(bytes, n, k)
            .map(|m| std::sync::Arc::new(m) as std::sync::Arc<dyn WeightMatrix>),
        GgmlDType::Q6K if q6k::Q6KMatrix::fits(n, k) => q6k::Q6KMatrix::new(bytes, n, k)
            .map(|m| std::sync::Arc::new(m) as std::sync::Arc<dyn WeightMatrix>),
        GgmlDType::Q2K => make::<BlockQ2K>(bytes, n, k),
        GgmlDType::Q3K => make::<BlockQ3K>(bytes, n, k),
        GgmlDType::Q4K => make::<BlockQ4K>(bytes, n, k),
        GgmlDType::Q5K => make::<BlockQ5K>(bytes, n, k),
        GgmlDType::Q6K => make::<BlockQ6K>(bytes, n, k),
        _ => return None,
    })
}

/// The candle block types we run: dot products against q8_K activations.
pub(crate) trait KBlock:
    candle_core::quantized::k_quants::GgmlType<
        VecDotType = candle_core::quantized::k_quants::BlockQ8K,
    > + 'static
{
}
impl<T> KBlock for T where
    T: candle_core::quantized::k_quants::GgmlType<
            VecDotType = candle_core::quantized::k_quants::BlockQ8K,
        > + 'static
{
}

/// Weight rows per work item for k-quant matrices, and activation rows.
pub(crate) const K_COLS: usize = 4;
pub(crate) const K_ROWS: usize = 4;

impl<T: KBlock> KMatrix<T> {
    fn new(bytes: &[u8], n: usize, k: usize) -> Result<Self> {
        let size = std::mem::size_of::<T>();
        if !k.is_multiple_of(T::BLCK_SIZE) || bytes.len() != n * (k / T::BLCK_SIZE) * size {
            return Err(Error::InvalidArgument(format!(
                "{:?} matrix [{n}, {k}] cannot hold {} bytes",
                T::DTYPE,
                bytes.len()
            )));
        }
        let blocks = n * (k / T::BLCK_SIZE);
        let mut data: Vec<T> = weight_buffer(blocks);
        // SAFETY: candle's block types are `repr(C)` plain data (f16 and byte arrays) whose
        // layout is GGUF's, and the byte count was checked above.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                data.as_mut_ptr() as *mut u8,
                bytes.len(),
            );
            data.set_len(blocks);
        }
        Ok(KMatrix { n, k, data })
    }

    fn row(&self, j: usize) -> &[T] {
        let nb = self.k / T::BLCK_SIZE;
        &self.data[j * nb..(j + 1) * nb]
    }
}

impl<T: KBlock> WeightMatrix for KMatrix<T> {
    /// Each output is one block dot product of its weight row and its activation row's q8_K
    /// blocks, whatever rows come with it.
    fn batch_invariant(&self) -> bool {
        true
    }

    fn dtype(&self) -> GgmlDType {
        T::DTYPE
    }

    fn shape(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    fn bytes(&self) -> usize {
        self.data.len() * std::mem::size_of::<T>()
    }

    fn matmul(&self, xs: &[f32], m: usize, put: DstWriter<'_>) -> Result<()> {
        use candle_core::quantized::k_quants::{BlockQ8K, GgmlType};
        let k = self.k;
        let nbx = k / BlockQ8K::BLCK_SIZE;
        let mut xq = vec![BlockQ8K::zeros(); m * nbx];
        if nbx > 0 {
            for_each_chunk_mut(&mut xq, nbx, &|r, out| {
                BlockQ8K::from_float(&xs[r * k..(r + 1) * k], out)
            });
        }
        let n = self.n;
        let row_tiles = m.div_ceil(K_ROWS);
        let work = |item: usize, put: &DstWriter<'_>| {
            let (cg, rt) = (item / row_tiles, item % row_tiles);
            for c in cg * K_COLS..n.min((cg + 1) * K_COLS) {
                let w = self.row(c);
                for r in rt * K_ROWS..m.min((rt + 1) * K_ROWS) {
                    put.put(r, c, &[T::vec_dot(k, w, &xq[r * nbx..(r + 1) * nbx])]);
                }
            }
        };
        run_items(row_tiles * n.div_ceil(K_COLS), put, &work);
        Ok(())
    }

    fn row_into(&self, i: usize, out: &mut [f32]) -> Result<()> {
        T::to_float(self.row(i), out);
        Ok(())
    }
}

/// For the k-quant tests: rows equal candle's dequantization; products equal the scalar path
/// (`tile(mat, group, activation rows, out)` over groups of `gs(mat)` rows, the same q8_K
/// integers) and agree with candle's matmul of the same type (which also quantizes activations
/// to q8_K).
#[cfg(test)]
pub(crate) fn check_kquant<M: WeightMatrix, const W: usize>(
    dtype: GgmlDType,
    seed: u32,
    make: impl Fn(&[u8], usize, usize) -> M,
    gs: impl Fn(&M) -> usize,
    tile: impl Fn(&M, usize, &[&[q4k::XK]], &mut [[f32; W]]),
) {
    use candle_core::quantized::QTensor;
    let vec = |t: Tensor| -> Vec<f32> { t.flatten_all().unwrap().to_vec1().unwrap() };
    for (n, k, m) in [(16, 512, 1), (8, 256, 5), (24, 768, 9)] {
        let w = crate::test_util::values(n * k, seed + n as u32);
        let t = Tensor::from_vec(w, (n, k), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&t, dtype).unwrap();
        let mat = make(&q.data().unwrap(), n, k);
        let ids: Vec<u32> = (0..n as u32).collect();
        let full = vec(q.dequantize(&Device::Cpu).unwrap());
        assert_eq!(vec(mat.rows(&ids).unwrap()), full, "{dtype:?} rows");
        let x = crate::test_util::values(m * k, seed + 14 + m as u32);
        let xt = Tensor::from_vec(x.clone(), (m, k), &Device::Cpu).unwrap();
        let got = vec(mat.forward(&xt).unwrap());
        let nb = k / q4k::QK_K;
        let mut xq = vec![q4k::ZERO_XK; m * nb];
        for r in 0..m {
            q4k::quantize_q8k(&x[r * k..(r + 1) * k], &mut xq[r * nb..(r + 1) * nb]);
        }
        let qm = candle_core::quantized::QMatMul::from_qtensor(q).unwrap();
        let theirs = vec(candle_core::Module::forward(&qm, &xt).unwrap());
        let gs = gs(&mat);
        let mut want = vec![0f32; m * n];
        let xr: Vec<&[q4k::XK]> = (0..m).map(|r| &xq[r * nb..(r + 1) * nb]).collect();
        for g in 0..n / gs {
            let mut out = vec![[0f32; W]; m];
            tile(&mat, g, &xr, &mut out);
            for (r, o) in out.iter().enumerate() {
                want[r * n + g * gs..][..gs].copy_from_slice(&o[..gs]);
            }
        }
        for ((&a, &s), &c) in got.iter().zip(&want).zip(&theirs) {
            assert!(
                (a - s).abs() < 1e-4 * (1.0 + s.abs()),
                "{dtype:?}: {a} vs scalar {s}"
            );
            assert!(
                (a - c).abs() < 2e-3 * (1.0 + c.abs()),
                "{dtype:?}: {a} vs candle {c}"
            );
        }
    }
}
