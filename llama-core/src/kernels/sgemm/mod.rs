//! The f32 matrix products of training, `C (+)= beta * A B` over strided operands.
//!
//! On AVX-512 a packed product of our own: the left operand is copied into panels of [`MR`]
//! rows (position by position, zero past the last row), the right one block by block into
//! panels of [`NR`] columns, and a 12 x 32 register tile ([`MR`] broadcasts and two 512-bit
//! loads per position, 24 FMA chains) runs over [`KC`] positions at a time. Each output
//! value's sum runs over the positions in the same order whatever the split of the rows or
//! columns between calls and threads, so a result does not depend on the thread count.
//! Elsewhere the `gemm` crate's kernels (picked for the CPU at run time).
//!
//! The left operand is a [`Lhs`], packed once and used for any number of right operands (the
//! forward pass multiplies one activation by every weight tile).

#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "x86_64")]
use avx512::*;

use crate::exec::Isa;
use crate::kernels::{WeightMatrix, PANEL};
use crate::pool::{pool, SharedMut};

/// A strided matrix operand: `(values, offset of element (0, 0), row stride, column stride)`.
pub(crate) type Operand<'a> = (&'a [f32], usize, usize, usize);

/// The right operand `B` (`[k, n]`) of a product.
#[derive(Clone, Copy)]
pub(crate) enum Rhs<'a> {
    /// A strided matrix.
    Matrix(Operand<'a>),
    /// Rows `start..start + n` of a weight, transposed: `B[p, j]` = row `start + j` at
    /// position `p` (packed straight from the weight's panels where it has them).
    WeightT(&'a dyn WeightMatrix, usize),
}

const _: () = assert!(NR == PANEL, "a weight panel is one column panel");

thread_local! {
    /// Each thread's spare buffers ([`Scratch`]).
    static SPARE: std::cell::RefCell<Vec<Vec<f32>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A buffer of at least `len` values (stale ones from an earlier use: every reader writes what
/// it reads first), taken from this thread's spares and given back to them when dropped, so
/// the products and tiles of a step do not allocate and zero fresh pages each time.
pub(crate) struct Scratch(Vec<f32>);

impl Scratch {
    pub(crate) fn new(len: usize) -> Scratch {
        let mut v = SPARE
            .try_with(|s| s.borrow_mut().pop())
            .ok()
            .flatten()
            .unwrap_or_default();
        if v.len() < len {
            v.resize(len, 0.0);
        }
        Scratch(v)
    }
}

impl std::ops::Deref for Scratch {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.0
    }
}

impl std::ops::DerefMut for Scratch {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.0
    }
}

/// The largest buffer kept as a spare (values), and spares kept per thread: what a step of a
/// small model reuses, without holding on to a long sequence's buffers after it.
const SPARE_MAX: usize = 1 << 20;
const SPARES: usize = 8;

impl Drop for Scratch {
    fn drop(&mut self) {
        let v = std::mem::take(&mut self.0);
        if v.capacity() > SPARE_MAX {
            return;
        }
        let _ = SPARE.try_with(|s| {
            let mut s = s.borrow_mut();
            if s.len() < SPARES {
                s.push(v);
            }
        });
    }
}

/// Rows of the register tile.
pub(crate) const MR: usize = 12;
/// Columns of the register tile (two 512-bit vectors).
pub(crate) const NR: usize = 32;
/// Positions per packed block.
pub(crate) const KC: usize = 256;
/// Columns of the right operand packed at a time.
const NC: usize = 1024;

/// Panics unless every element of the `rows x cols` operand lies within its values.
fn check_operand((v, off, rs, cs): Operand<'_>, rows: usize, cols: usize, what: &str) {
    assert!(
        rows * cols == 0 || off + (rows - 1) * rs + (cols - 1) * cs < v.len(),
        "{what} operand out of bounds"
    );
}

/// The left operand `A` (`[m, k]`) of a product, packed for the running kernels.
pub(crate) struct Lhs<'a> {
    m: usize,
    k: usize,
    form: Form<'a>,
}

enum Form<'a> {
    /// `k` in blocks of [`KC`] positions (the last shorter), each block `mp = ceil(m / MR) *
    /// MR` rows as panels of [`MR`]: block at `p0 * mp`, panel `i` of a block of `kb` positions
    /// at `i * MR * kb`, value `(row, p)` of a panel at `p * MR + row`.
    Panels { data: Scratch, mp: usize },
    /// As given (the `gemm` crate packs for itself).
    Strided(Operand<'a>),
}

/// Whether the packed kernels run in the current call.
fn packed() -> bool {
    crate::kernels::isa() == Isa::Avx512
}

impl<'a> Lhs<'a> {
    /// `A` `[m, k]`, packed on this thread.
    pub(crate) fn new(a: Operand<'a>, m: usize, k: usize) -> Lhs<'a> {
        Self::build(a, m, k, false)
    }

    /// `A` `[m, k]`, its panels packed over the pool.
    pub(crate) fn new_par(a: Operand<'a>, m: usize, k: usize) -> Lhs<'a> {
        Self::build(a, m, k, true)
    }

    fn build(a: Operand<'a>, m: usize, k: usize, par: bool) -> Lhs<'a> {
        check_operand(a, m, k, "left");
        if !packed() {
            return Lhs {
                m,
                k,
                form: Form::Strided(a),
            };
        }
        let panels = m.div_ceil(MR);
        let mp = panels * MR;
        let blocks = k.div_ceil(KC);
        let mut data = Scratch::new(mp * k);
        let out = SharedMut::new(&mut data[..mp * k]);
        let (v, off, rs, cs) = a;
        let pack = |item: usize| {
            let (b, i) = (item / panels, item % panels);
            let p0 = b * KC;
            let kb = KC.min(k - p0);
            // SAFETY: each (block, panel) item writes its own MR * kb values.
            let dst = unsafe { out.slice(p0 * mp + i * MR * kb, MR * kb) };
            let rows = MR.min(m - i * MR);
            let first = off + i * MR * rs + p0 * cs;
            if rs == 1 {
                // Each position's rows are contiguous.
                for (p, d) in dst.chunks_exact_mut(MR).enumerate() {
                    d[..rows].copy_from_slice(&v[first + p * cs..][..rows]);
                    d[rows..].fill(0.0);
                }
                return;
            }
            #[cfg(target_arch = "x86_64")]
            if cs == 1 {
                // The last row's last position lies within `v` (checked above).
                assert!(first + (rows - 1) * rs + kb <= v.len());
                // SAFETY: AVX-512 runs (`packed`); `rows` rows of `kb` values `rs` apart from
                // `first` lie within `v`, `dst` holds kb positions of MR.
                unsafe {
                    transpose_avx512(
                        v.as_ptr().add(first),
                        (rs, rows),
                        kb,
                        dst.as_mut_ptr(),
                        (MR, MR),
                    )
                };
                return;
            }
            for r in 0..MR {
                let row = first + r * rs;
                for p in 0..kb {
                    dst[p * MR + r] = if r < rows { v[row + p * cs] } else { 0.0 };
                }
            }
        };
        if par {
            pool().run(blocks * panels, &|items| items.for_each(pack));
        } else {
            (0..blocks * panels).for_each(pack);
        }
        Lhs {
            m,
            k,
            form: Form::Panels { data, mp },
        }
    }

    /// `c[c0 + i * rs_c + j] (+)= beta * sum_p A[i, p] B[p, j]` for `i < m`, `j < n` (`+=`
    /// when `accumulate`, else `=`), `B` `[k, n]`.
    pub(crate) fn times(
        &self,
        b: Operand<'_>,
        n: usize,
        c: &mut [f32],
        at: (usize, usize),
        accumulate: bool,
        beta: f32,
    ) {
        // SAFETY: `c` is borrowed exclusively.
        unsafe { self.times_shared(Rhs::Matrix(b), n, SharedMut::new(c), at, accumulate, beta) }
    }

    /// [`Lhs::times`] into a buffer the pool's items share.
    ///
    /// # Safety
    /// No other reference to the `m x n` values written (`c0 + i * rs_c + j`) is used while
    /// this runs.
    pub(crate) unsafe fn times_shared(
        &self,
        b: Rhs<'_>,
        n: usize,
        c: SharedMut<'_, f32>,
        (c0, rs_c): (usize, usize),
        accumulate: bool,
        beta: f32,
    ) {
        let (m, k) = (self.m, self.k);
        if m == 0 || n == 0 {
            return;
        }
        let b = match b {
            Rhs::Matrix(op) => {
                check_operand(op, k, n, "right");
                Rhs::Matrix(op)
            }
            Rhs::WeightT(w, start) => {
                let (wn, wk) = w.shape();
                assert!(wk == k && start + n <= wn, "weight rows out of bounds");
                let direct = matches!(self.form, Form::Panels { .. })
                    && w.panels()
                    && start.is_multiple_of(16)
                    && n.is_multiple_of(16);
                if !direct {
                    // The rows dequantized, as their transpose.
                    let mut rows = Scratch::new(n * k);
                    w.rows_into(start, &mut rows[..n * k])
                        .expect("weight rows within the matrix (checked)");
                    let op = (&rows[..n * k], 0, 1, k);
                    // SAFETY: the caller's contract.
                    return unsafe {
                        self.times_shared(Rhs::Matrix(op), n, c, (c0, rs_c), accumulate, beta)
                    };
                }
                Rhs::WeightT(w, start)
            }
        };
        assert!(m == 1 || rs_c >= n, "product destination rows overlap");
        // Bounds-checked: the destination's extent lies within the buffer.
        let c = c.ptr_at(c0, (m - 1) * rs_c + n);
        match &self.form {
            Form::Strided((av, aoff, ars, acs)) => {
                let Rhs::Matrix((bv, boff, brs, bcs)) = b else {
                    unreachable!("weights are dequantized for gemm above")
                };
                // SAFETY: every extent was checked above (and `A`'s when it was made); the
                // destination is this call's alone (the caller's contract), rows `rs_c >= n`
                // apart.
                unsafe {
                    gemm_scaled(
                        (m, n, k),
                        c,
                        (rs_c, 1),
                        accumulate,
                        beta,
                        av.as_ptr().add(*aoff),
                        (*ars, *acs),
                        bv.as_ptr().add(boff),
                        (brs, bcs),
                    )
                }
            }
            Form::Panels { data, mp } => {
                if k == 0 {
                    if !accumulate {
                        for i in 0..m {
                            // SAFETY: within the checked extent; this call's alone.
                            unsafe { std::slice::from_raw_parts_mut(c.add(i * rs_c), n) }.fill(0.0);
                        }
                    }
                    return;
                }
                PACKED_B.with(|cell| {
                    let mut bp = cell.take();
                    for j0 in (0..n).step_by(NC) {
                        let nb = NC.min(n - j0);
                        let np = nb.div_ceil(NR);
                        for p0 in (0..k).step_by(KC) {
                            let kb = KC.min(k - p0);
                            if bp.len() < np * NR * kb {
                                bp.resize(np * NR * kb, 0.0);
                            }
                            let bp = &mut bp[..np * NR * kb];
                            match b {
                                Rhs::Matrix(op) => pack_b(op, (p0, kb), (j0, nb), bp),
                                Rhs::WeightT(w, start) => {
                                    for (jp, panel) in bp.chunks_exact_mut(NR * kb).enumerate() {
                                        let r0 = start + j0 + jp * NR;
                                        let w_rows = NR.min(nb - jp * NR);
                                        if w_rows < NR {
                                            panel.fill(0.0);
                                        }
                                        w.panel_into(r0..r0 + w_rows, p0..p0 + kb, panel);
                                    }
                                }
                            }
                            let load = accumulate || p0 > 0;
                            let block = &data[p0 * mp..][..kb * mp];
                            for jp in 0..np {
                                let cols = NR.min(nb - jp * NR);
                                let bpan = &bp[jp * NR * kb..][..NR * kb];
                                for ip in 0..m.div_ceil(MR) {
                                    let rows = MR.min(m - ip * MR);
                                    let apan = &block[ip * MR * kb..][..MR * kb];
                                    let at = ip * MR * rs_c + j0 + jp * NR;
                                    // SAFETY: AVX-512 runs (checked when `self` was packed);
                                    // the panels hold kb positions; the tile's `rows` rows
                                    // of `cols` values from `at` lie within the checked
                                    // extent (row ip * MR + r < m, column j0 + jp * NR +
                                    // cols <= n) and are this call's alone.
                                    #[cfg(target_arch = "x86_64")]
                                    unsafe {
                                        tile_avx512(
                                            kb,
                                            apan.as_ptr(),
                                            bpan.as_ptr(),
                                            c.add(at),
                                            rs_c,
                                            (rows, cols),
                                            load,
                                            beta,
                                        )
                                    };
                                    #[cfg(not(target_arch = "x86_64"))]
                                    let _ = (apan, bpan, at, rows, cols, load);
                                }
                            }
                        }
                    }
                    cell.replace(bp);
                });
            }
        }
    }
}

thread_local! {
    /// Each thread's packed block of the right operand, reused between products.
    static PACKED_B: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Positions `p0..p0 + kb`, columns `j0..j0 + nb` of `b` into panels of [`NR`] columns
/// (`out[(panel * kb + p) * NR + j]`, zero past the last column).
fn pack_b(
    (v, off, rs, cs): Operand<'_>,
    (p0, kb): (usize, usize),
    (j0, nb): (usize, usize),
    out: &mut [f32],
) {
    for (jp, panel) in out.chunks_exact_mut(NR * kb).enumerate() {
        let c0 = j0 + jp * NR;
        let w = NR.min(j0 + nb - c0);
        if w < NR {
            panel.fill(0.0);
        }
        if cs == 1 {
            for (p, dst) in panel.chunks_exact_mut(NR).enumerate() {
                let at = off + (p0 + p) * rs + c0;
                dst[..w].copy_from_slice(&v[at..at + w]);
            }
        } else if rs == 1 {
            #[cfg(target_arch = "x86_64")]
            if packed() {
                for h in 0..w.div_ceil(16) {
                    let rows = 16.min(w - 16 * h);
                    let at = off + (c0 + 16 * h) * cs + p0;
                    assert!(at + (rows - 1) * cs + kb <= v.len());
                    // SAFETY: AVX-512 runs; the `rows` columns of `kb` positions lie within
                    // `v` (checked), the panel holds kb positions of NR from lane 16 h.
                    unsafe {
                        transpose_avx512(
                            v.as_ptr().add(at),
                            (cs, rows),
                            kb,
                            panel.as_mut_ptr().add(16 * h),
                            (NR, 16),
                        )
                    };
                }
                continue;
            }
            for j in 0..w {
                let at = off + (c0 + j) * cs + p0;
                for (p, &x) in v[at..at + kb].iter().enumerate() {
                    panel[p * NR + j] = x;
                }
            }
        } else {
            for (p, dst) in panel.chunks_exact_mut(NR).enumerate() {
                for (j, d) in dst[..w].iter_mut().enumerate() {
                    *d = v[off + (p0 + p) * rs + (c0 + j) * cs];
                }
            }
        }
    }
}

/// `dst (+)= beta * lhs . rhs` on one thread (the `gemm` crate's kernels, picked for this CPU
/// at run time), strides in elements: `dst` `[m, n]`, `lhs` `[m, k]`, `rhs` `[k, n]`.
///
/// # Safety
/// The pointers cover the strided extents; `dst` does not overlap the inputs.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_scaled(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    (dst_rs, dst_cs): (usize, usize),
    accumulate: bool,
    beta: f32,
    lhs: *const f32,
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: *const f32,
    (rhs_rs, rhs_cs): (usize, usize),
) {
    // SAFETY: the caller's contract; `gemm` reads and writes only within these extents.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            dst_cs as isize,
            dst_rs as isize,
            accumulate,
            lhs,
            lhs_cs as isize,
            lhs_rs as isize,
            rhs,
            rhs_cs as isize,
            rhs_rs as isize,
            if accumulate { 1.0 } else { 0.0 },
            beta,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::{with_settings, Kernel, Settings};

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut r = crate::train::Rng(seed);
        (0..n).map(|_| r.uniform()).collect()
    }

    /// Every shape edge (rows and columns past whole tiles, positions past whole blocks,
    /// transposed and strided operands, `=` and `+=` with a factor) against f64 sums, on the
    /// packed kernels and on `gemm`'s.
    #[test]
    fn products_match_f64_sums() {
        let shapes = [
            (1, 1, 1),
            (5, 7, 3),
            (12, 32, 16),
            (13, 33, 257),
            (25, 70, 300),
            (204, 64, 576),
            (3, 1100, 40),
        ];
        for kernel in [Kernel::Avx512, Kernel::Avx2, Kernel::Scalar] {
            if !kernel.is_supported() {
                continue;
            }
            let settings = Settings::new(kernel, true).expect("supported");
            with_settings(settings, || {
                for (si, &(m, n, k)) in shapes.iter().enumerate() {
                    for (trans_a, trans_b, accumulate) in [
                        (false, false, false),
                        (true, false, true),
                        (false, true, true),
                    ] {
                        let a = values(m * k + 3, si as u64 * 7 + 1);
                        let b = values(k * n + 5, si as u64 * 7 + 2);
                        // Row-major [m, k] from offset 3, or its transpose.
                        let ao: Operand = if trans_a {
                            (&a, 3, 1, m)
                        } else {
                            (&a, 3, k, 1)
                        };
                        let bo: Operand = if trans_b {
                            (&b, 5, 1, k)
                        } else {
                            (&b, 5, n, 1)
                        };
                        let at = |i: usize, p: usize| a[3 + i * ao.2 + p * ao.3] as f64;
                        let bt = |p: usize, j: usize| b[5 + p * bo.2 + j * bo.3] as f64;
                        let rs_c = n + 2;
                        let init = values(m * rs_c + 1, 99);
                        let mut c = init.clone();
                        let beta = if accumulate { 0.5 } else { 1.0 };
                        Lhs::new(ao, m, k).times(bo, n, &mut c, (1, rs_c), accumulate, beta);
                        for i in 0..m {
                            for j in 0..rs_c {
                                let got = c[1 + i * rs_c + j];
                                let before = init[1 + i * rs_c + j];
                                if j >= n {
                                    assert_eq!(got, before, "column {j} past n changed");
                                    continue;
                                }
                                let s: f64 = (0..k).map(|p| at(i, p) * bt(p, j)).sum();
                                let want =
                                    beta as f64 * s + if accumulate { before as f64 } else { 0.0 };
                                assert!(
                                    (got as f64 - want).abs() <= 1e-5 * (1.0 + k as f64),
                                    "{kernel:?} {m}x{n}x{k} ({trans_a}, {trans_b}) [{i}, {j}]: \
                                     {got} vs {want}"
                                );
                            }
                        }
                        assert_eq!(c[0], init[0]);
                    }
                }
            });
        }
    }

    /// On the packed kernels a row's values are the same bits whatever rows and columns it is
    /// computed with (`gemm`'s blocking depends on the shape: there, the same values within
    /// rounding).
    #[test]
    fn splits_give_the_same_bits() {
        let (m, n, k) = (30, 75, 600);
        let a = values(m * k, 5);
        let b = values(k * n, 6);
        let mut whole = vec![0f32; m * n];
        Lhs::new((&a, 0, k, 1), m, k).times((&b, 0, n, 1), n, &mut whole, (0, n), false, 1.0);
        let mut parts = vec![0f32; m * n];
        for (i0, i1) in [(0, 7), (7, 19), (19, 30)] {
            let lhs = Lhs::new((&a, i0 * k, k, 1), i1 - i0, k);
            for (j0, j1) in [(0, 33), (33, 75)] {
                lhs.times(
                    (&b, j0, n, 1),
                    j1 - j0,
                    &mut parts,
                    (i0 * n + j0, n),
                    false,
                    1.0,
                );
            }
        }
        let par = Lhs::new_par((&a, 0, k, 1), m, k);
        let mut again = vec![0f32; m * n];
        par.times((&b, 0, n, 1), n, &mut again, (0, n), false, 1.0);
        if packed() {
            assert_eq!(whole, parts);
            assert_eq!(whole, again);
        } else {
            for other in [&parts, &again] {
                for (x, y) in whole.iter().zip(other) {
                    assert!((x - y).abs() <= 1e-4, "{x} vs {y}");
                }
            }
        }
    }
}
