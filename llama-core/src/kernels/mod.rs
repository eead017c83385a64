//! Our CPU matmul kernels, by family: the 32-value block formats (`block32`: Q4_0, Q4_1,
//! Q5_0, Q5_1, Q8_0), dense f16 (`f16`) and the k-quants (`kquant`), each with its scalar
//! path and its x86-64 SIMD paths in per-ISA files; the [`WeightMatrix`] trait every storage
//! implements (candle's tensors too, in matrix.rs); the output writer (`dst`), the
//! element-wise operations of the forward pass (`elementwise`) and the SIMD helpers shared
//! with attention ([`simd`]).
//!
//! The x86-64 paths are picked at run time with `is_x86_feature_detected!`, so a portable
//! build still uses them: AVX-512 (F/BW/VL/VNNI) runs 512-bit kernels over groups of 16 weight
//! rows (and 512-bit f16 tiles); AVX-512 VNNI alone runs the 256-bit VNNI kernels over groups of
//! 8 rows; AVX2/FMA/F16C the `maddubs` versions; other machines the scalar path, which computes
//! the same integers. Work items are tiles of activation rows x weight rows, spread over our
//! thread pool (`crate::pool`). [`crate::Kernel`] (`ModelOptions::kernel`) forces a path, or
//! candle's kernels everywhere.

use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};

pub(crate) use crate::error::{Error, Result};
pub(crate) use crate::pool::for_each_chunk_mut;

/// [`WeightMatrix`] for one of our matrix types: fields `n`, `k` and `data`, an inherent
/// `compute(xs, m, put)` (the matmul) and `dequantize_row(i, out)`.
macro_rules! our_weight_matrix {
    ($t:ty, $dtype:expr) => {
        our_weight_matrix!($t, $dtype, false);
    };
    ($t:ty, $dtype:expr, $invariant:expr) => {
        our_weight_matrix!($t, $dtype, $invariant, |me: &$t,
                                                    xs: &[f32],
                                                    m: usize,
                                                    put: $crate::kernels::DstWriter<
            '_,
        >| {
            if $invariant {
                me.compute(xs, m, put);
            }
            $invariant
        });
    };
    ($t:ty, $dtype:expr, $invariant:expr, $as_alone:expr) => {
        impl $crate::kernels::WeightMatrix for $t {
            fn batch_invariant(&self) -> bool {
                $invariant
            }
            fn matmul_as_alone(
                &self,
                xs: &[f32],
                m: usize,
                put: $crate::kernels::DstWriter<'_>,
            ) -> $crate::error::Result<bool> {
                let as_alone: fn(&Self, &[f32], usize, $crate::kernels::DstWriter<'_>) -> bool =
                    $as_alone;
                Ok(as_alone(self, xs, m, put))
            }
            fn dtype(&self) -> candle_core::quantized::GgmlDType {
                let dtype: fn(&Self) -> candle_core::quantized::GgmlDType = $dtype;
                dtype(self)
            }
            fn shape(&self) -> (usize, usize) {
                (self.n, self.k)
            }
            fn bytes(&self) -> usize {
                std::mem::size_of_val(&self.data[..])
            }
            fn matmul(
                &self,
                xs: &[f32],
                m: usize,
                put: $crate::kernels::DstWriter<'_>,
            ) -> $crate::error::Result<()> {
                self.compute(xs, m, put);
                Ok(())
            }
            fn row_into(&self, i: usize, out: &mut [f32]) -> $crate::error::Result<()> {
                self.dequantize_row(i, out);
                Ok(())
            }
            fn rows_into(&self, start: usize, out: &mut [f32]) -> $crate::error::Result<()> {
                $crate::kernels::check_rows(start, out, (self.n, self.k))?;
                self.dequantize_rows(start, out);
                Ok(())
            }
            fn panels(&self) -> bool {
                self.has_panels()
            }
            fn panel_into(
                &self,
                rows: std::ops::Range<usize>,
                cols: std::ops::Range<usize>,
                out: &mut [f32],
            ) {
                $crate::kernels::check_panel(&rows, &cols, out, (self.n, self.k), self.panels());
                self.panel_t(rows, cols, out)
            }
        }
    };
}

/// Panics unless `rows` (16 or 32 of them from a multiple of 16) and positions `cols` lie
/// within an `[n, k]` matrix that has panels, and `out` holds the panel.
pub(crate) fn check_panel(
    rows: &std::ops::Range<usize>,
    cols: &std::ops::Range<usize>,
    out: &[f32],
    (n, k): (usize, usize),
    panels: bool,
) {
    assert!(
        panels
            && rows.start.is_multiple_of(16)
            && (rows.len() == 16 || rows.len() == 32)
            && rows.end <= n
            && cols.start <= cols.end
            && cols.end <= k
            && out.len() >= cols.len() * PANEL,
        "weight panel rows {rows:?} positions {cols:?} of [{n}, {k}]"
    );
}

/// An empty buffer with room for `len` weight values, its pages backed by transparent huge
/// pages where the system gives them on request (Linux with THP in `madvise` mode, the usual
/// default): decode streams every weight once per token, and with 4 KiB pages the stream
/// walks the page tables every 4 KiB. Fill it before reading (the pages are made at first
/// write, after the advice).
pub(crate) fn weight_buffer<T>(len: usize) -> Vec<T> {
    let v = Vec::with_capacity(len);
    advise_huge_pages(v.as_ptr() as usize, len * std::mem::size_of::<T>());
    v
}

/// [`weight_buffer`] filled with `len` default (zero) values.
pub(crate) fn zeroed_weights<T: Clone + Default>(len: usize) -> Vec<T> {
    let mut v = weight_buffer(len);
    v.resize(len, T::default());
    v
}

/// `madvise(MADV_HUGEPAGE)` on the whole 2 MiB pages inside `[start, start + bytes)`.
fn advise_huge_pages(start: usize, bytes: usize) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let (a, b) = (start.next_multiple_of(HUGE), (start + bytes) / HUGE * HUGE);
        if bytes >= 4 * HUGE && b > a {
            // SAFETY: the range lies inside one live allocation of ours; the advice changes no
            // contents and no mapping, only how the kernel backs its pages (a failure, such as
            // THP disabled, leaves ordinary pages).
            unsafe {
                libc::madvise(a as *mut libc::c_void, b - a, libc::MADV_HUGEPAGE);
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (start, bytes);
}

/// Values per position of a training panel ([`WeightMatrix::panel_into`]).
pub(crate) const PANEL: usize = 32;

mod block32;
pub(crate) mod dense;
mod dst;
mod elementwise;
mod f16;
mod kquant;
pub(crate) mod lowrank;
pub(crate) mod sgemm;
pub(crate) mod simd;
#[cfg(test)]
mod tests;

pub(crate) use block32::*;
pub(crate) use dst::*;
pub(crate) use elementwise::*;
pub(crate) use f16::*;
pub(crate) use kquant::*;
#[cfg(target_arch = "x86_64")]
pub(crate) use simd::{prefetch_ahead, prefetch_distance};

pub(crate) use crate::exec::Isa;

/// Whether our kernels run in the current call (not candle's: [`crate::Kernel::Candle`]).
pub(crate) fn enabled() -> bool {
    crate::exec::current().ours()
}

/// The SIMD level of the current call.
pub(crate) fn isa() -> Isa {
    crate::exec::current().isa
}

/// Whether weights are regrouped into the SIMD kernels' row groups at load.
pub(crate) fn repack() -> bool {
    crate::exec::current().repack
}

/// Whether the 512-bit AVX-512 paths run.
pub(crate) fn wide() -> bool {
    #[cfg(target_arch = "x86_64")]
    return isa() == Isa::Avx512;
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether the x86-64 SIMD paths (AVX2, FMA, F16C at least) run.
pub(crate) fn simd() -> bool {
    isa() != Isa::Scalar
}

/// A matmul input's values: borrowed from the tensor's storage when it is a contiguous f32
/// CPU tensor (no copy), else copied out.
pub(crate) enum Input<'a> {
    Borrowed(candle_core::StorageRef<'a>, usize, usize),
    Owned(Vec<f32>),
}

impl std::ops::Deref for Input<'_> {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        match self {
            Input::Borrowed(s, a, b) => match &**s {
                candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)) => &v[*a..*b],
                _ => &[],
            },
            Input::Owned(v) => v,
        }
    }
}

pub(crate) fn input_f32(x: &Tensor) -> Result<Input<'_>> {
    let (storage, layout) = x.storage_and_layout();
    if let (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(_)), Some((a, b))) =
        (&*storage, layout.contiguous_offsets())
    {
        return Ok(Input::Borrowed(storage, a, b));
    }
    drop(storage);
    Ok(Input::Owned(x.flatten_all()?.to_vec1::<f32>()?))
}

fn matmul_shape(x: &Tensor, k_w: usize, n: usize) -> Result<(usize, usize, Vec<usize>)> {
    let mut dims = x.dims().to_vec();
    let k = *dims.last().unwrap_or(&0);
    if k != k_w || k == 0 {
        return Err(Error::InvalidArgument(format!(
            "matmul: input width {k} != {k_w}"
        )));
    }
    let m = x.elem_count() / k;
    *dims.last_mut().expect("non-empty") = n;
    Ok((m, k, dims))
}

pub(crate) fn check_ids(ids: &[u32], rows: usize) -> Result<()> {
    match ids.iter().find(|&&id| id as usize >= rows) {
        Some(id) => Err(Error::InvalidArgument(format!(
            "token id {id} is outside the embedding of {rows} rows"
        ))),
        None => Ok(()),
    }
}

/// `x @ W^T` as a new tensor through `matmul`, which writes every element of the `[m, n]`
/// output (the contract of every matrix type's `matmul`).
fn forward_via(
    x: &Tensor,
    k: usize,
    n: usize,
    matmul: impl FnOnce(&[f32], usize, DstWriter<'_>) -> Result<()>,
) -> Result<Tensor> {
    let (m, _, out_dims) = matmul_shape(x, k, n)?;
    let xs = input_f32(x)?;
    let mut dst = Dst::new(m, n);
    matmul(&xs, m, dst.writer())?;
    drop(xs);
    // SAFETY: `matmul` wrote every element.
    let dst = unsafe { dst.finish() };
    Ok(Tensor::from_vec(dst, out_dims, &Device::Cpu)?)
}

/// Runs `work` for items `0..items` on our thread pool (`crate::pool`), each item handed the
/// writer to put its outputs through. When `put` carries a [`Rider`] ([`DstWriter::riding`]),
/// the rider's `pre` items (the first pool call under it claims them) run before these in the
/// same pool call, and each one-row piece the items write passes through [`Rider::finish`]
/// (consecutive pieces of one thread's run of items joined: [`Pending`]).
fn run_items(items: usize, put: DstWriter<'_>, work: &(dyn Fn(usize, &DstWriter<'_>) + Sync)) {
    let Some(rider) = put.rider() else {
        crate::pool::pool().run(items, &|range| range.for_each(|i| work(i, &put)));
        return;
    };
    let pre = rider.claim_pre();
    crate::pool::pool().run(pre + items, &|range| {
        let pending = Pending::new(rider);
        let local = put.pending(&pending);
        for i in range {
            if i < pre {
                rider.run_pre(i)
            } else {
                work(i - pre, &local)
            }
        }
        pending.flush();
    });
}

/// A matmul's work item: computes item `i` and puts its outputs through the writer.
type Item<'w> = dyn Fn(usize, &DstWriter<'_>) + Sync + 'w;

/// Work that rides along a matmul's pool calls (in a decode step the calls themselves cost as
/// much as a small update's work): `pre` items run first in the first call (a piece written by
/// the matmul's items may wait for them: they are claimed earlier, so running), then each
/// one-row piece of output the items write passes through `finish` before it is stored. The
/// matmul's writer carries it ([`DstWriter::riding`]); a writer without one pays one branch.
pub(crate) trait Rider: Sync {
    /// The number of `pre` items the first caller runs; 0 for every later caller.
    fn claim_pre(&self) -> usize;
    fn run_pre(&self, i: usize);
    /// Adjusts columns `col..col + vals.len()` of the output row before they are stored.
    fn finish(&self, col: usize, vals: &mut [f32]);
    /// Columns `col..col + len` will be finished soon ([`DstWriter::hint`]).
    fn prefetch(&self, _col: usize, _len: usize) {}
}

/// The longest run of columns a rider is handed at once.
const PENDING: usize = 256;

/// One thread's run of items under a rider: the piece of the output row written but not yet
/// finished (consecutive pieces are joined, so the rider works on whole runs of columns, not on
/// each item's few). Lives on the stack of the pool call's closure and is used by that thread
/// alone (relaxed atomics: plain loads and stores, and the type stays `Sync` as writers must).
pub(crate) struct Pending<'r> {
    rider: &'r dyn Rider,
    ptr: std::sync::atomic::AtomicPtr<f32>,
    col: std::sync::atomic::AtomicUsize,
    len: std::sync::atomic::AtomicUsize,
}

impl<'r> Pending<'r> {
    fn new(rider: &'r dyn Rider) -> Pending<'r> {
        Pending {
            rider,
            ptr: std::sync::atomic::AtomicPtr::new(std::ptr::null_mut()),
            col: 0.into(),
            len: 0.into(),
        }
    }

    pub(crate) fn rider(&self) -> &'r dyn Rider {
        self.rider
    }

    /// An item wrote columns `col..col + len` of the one-row output at `ptr`: the piece joins
    /// the pending run (finished when the run breaks or grows long, or at the end of the run of
    /// items).
    pub(crate) fn written(&self, col: usize, ptr: *mut f32, len: usize) {
        use std::sync::atomic::Ordering::Relaxed;
        let (p, c, l) = (
            self.ptr.load(Relaxed),
            self.col.load(Relaxed),
            self.len.load(Relaxed),
        );
        if l > 0 && col == c + l && ptr == p.wrapping_add(l) && l + len <= PENDING {
            self.len.store(l + len, Relaxed);
        } else {
            self.flush();
            self.ptr.store(ptr, Relaxed);
            self.col.store(col, Relaxed);
            self.len.store(len, Relaxed);
        }
    }

    /// Hands the pending piece to the rider.
    fn flush(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        let l = self.len.swap(0, Relaxed);
        if l == 0 {
            return;
        }
        let (p, c) = (self.ptr.load(Relaxed), self.col.load(Relaxed));
        // SAFETY: `p` points at `l` values of the output row this thread's items wrote in the
        // running pool call (their buffer outlives it; no other item touches them).
        let vals = unsafe { std::slice::from_raw_parts_mut(p, l) };
        self.rider.finish(c, vals);
    }
}

/// Checks that `out` holds whole rows `start..` of an `[n, k]` matrix ([`WeightMatrix::rows_into`]).
pub(crate) fn check_rows(start: usize, out: &[f32], (n, k): (usize, usize)) -> Result<()> {
    let kk = k.max(1);
    if !out.len().is_multiple_of(kk) || start + out.len() / kk > n {
        return Err(Error::InvalidArgument(format!(
            "rows {start}.. ({} values) of a [{n}, {k}] matrix",
            out.len()
        )));
    }
    Ok(())
}

/// Rows `start..` into `out` (`k` values each) one at a time through `row`.
pub(crate) fn rows_one_by_one(
    k: usize,
    start: usize,
    out: &mut [f32],
    mut row: impl FnMut(usize, &mut [f32]),
) {
    for (r, dst) in out.chunks_exact_mut(k.max(1)).enumerate() {
        row(start + r, dst);
    }
}

/// A weight matrix `[n, k]` (`n` outputs of `k` inputs), whatever its storage: the block
/// formats, f16, the k-quants, candle's tensors (in matrix.rs). The model holds these, one
/// stack per projection group of its layer plan; a session's LoRA update of a one-row
/// product rides along it on the product's writer ([`DstWriter::riding`]).
pub(crate) trait WeightMatrix: Send + Sync {
    /// The storage type.
    fn dtype(&self) -> GgmlDType;
    /// `[n, k]`.
    fn shape(&self) -> (usize, usize);
    /// Bytes the weights occupy in memory.
    fn bytes(&self) -> usize;
    /// `xs @ W^T` for `m` rows of `k` values, every output written through `put`.
    fn matmul(&self, xs: &[f32], m: usize, put: DstWriter<'_>) -> Result<()>;
    /// Row `i < n` dequantized into `out` (`k` values).
    fn row_into(&self, i: usize, out: &mut [f32]) -> Result<()>;
    /// Rows `start..start + out.len() / k` dequantized into `out`, one after another (a
    /// training tile: layouts that interleave rows dequantize whole groups at once).
    fn rows_into(&self, start: usize, out: &mut [f32]) -> Result<()> {
        check_rows(start, out, self.shape())?;
        let mut res = Ok(());
        rows_one_by_one(self.shape().1, start, out, |i, dst| {
            if res.is_ok() {
                res = self.row_into(i, dst);
            }
        });
        res
    }
    /// Whether [`WeightMatrix::panel_into`] runs (its layout keeps rows in groups of 16).
    fn panels(&self) -> bool {
        false
    }
    /// Rows `rows` (16 or 32 of them, from a multiple of 16) at positions `cols`, transposed
    /// into a training panel: `out[p * PANEL + j]` = row `rows.start + j` at `cols.start + p`,
    /// the values [`WeightMatrix::row_into`] gives. Only where [`WeightMatrix::panels`];
    /// panics on a range outside the matrix.
    fn panel_into(
        &self,
        rows: std::ops::Range<usize>,
        cols: std::ops::Range<usize>,
        out: &mut [f32],
    ) {
        check_panel(&rows, &cols, out, self.shape(), self.panels());
    }
    /// Rows `ids` dequantized, `[ids.len(), k]` (embedding lookup).
    fn rows(&self, ids: &[u32]) -> Result<Tensor> {
        let (n, k) = self.shape();
        check_ids(ids, n)?;
        let mut out = vec![0f32; ids.len() * k];
        for (&id, dst) in ids.iter().zip(out.chunks_exact_mut(k.max(1))) {
            self.row_into(id as usize, dst)?;
        }
        Ok(Tensor::from_vec(out, (ids.len(), k), &Device::Cpu)?)
    }
    /// Whether each row's product is the same bits whatever rows are computed with it (`m`,
    /// the row's place in the tiles): then a batched forward pass can put several sequences'
    /// rows through one product and still give each what it gets alone.
    fn batch_invariant(&self) -> bool {
        false
    }
    /// `xs @ W^T` for `m` rows, each computed exactly as a product of that row alone (`m == 1`)
    /// computes it, in one product (a batch's one-token sequences share one pass over the
    /// weights). `false`, nothing written, where the matrix has no such product: the caller
    /// then runs each row alone. A batch-invariant matrix's is its usual product.
    fn matmul_as_alone(&self, xs: &[f32], m: usize, put: DstWriter<'_>) -> Result<bool> {
        if self.batch_invariant() {
            self.matmul(xs, m, put)?;
            return Ok(true);
        }
        Ok(false)
    }
    /// `x @ W^T` for `x` of shape `[..., k]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (n, k) = self.shape();
        forward_via(x, k, n, |xs, m, put| self.matmul(xs, m, put))
    }
}
