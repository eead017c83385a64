//! The k-quants (Q2_K to Q6_K): our own Q4_K and Q6_K layouts and kernels ([`q4k`], [`q6k`]),
//! and candle's block dot products on our pool for the others.

pub(crate) mod q4k;
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
        let mut data: Vec<T> = Vec::with_capacity(blocks);
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
        let work = |item: usize| {
            let (cg, rt) = (item / row_tiles, item % row_tiles);
            for c in cg * K_COLS..n.min((cg + 1) * K_COLS) {
                let w = self.row(c);
                for r in rt * K_ROWS..m.min((rt + 1) * K_ROWS) {
                    put.put(r, c, &[T::vec_dot(k, w, &xq[r * nbx..(r + 1) * nbx])]);
                }
            }
        };
        run_items(row_tiles * n.div_ceil(K_COLS), &work);
        Ok(())
    }

    fn row_into(&self, i: usize, out: &mut [f32]) -> Result<()> {
        T::to_float(self.row(i), out);
        Ok(())
    }
}
