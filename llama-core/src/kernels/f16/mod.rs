//! Dense f16 weight matrices ([`F16Matrix`]): 16-row groups, the scalar path and the dispatch
//! to the [`avx2`] and [`avx512`] tiles.

use super::*;
use half::f16;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "x86_64")]
pub(crate) use {avx2::*, avx512::*};

/// A dense f16 weight matrix `[n, k]`, kept at f16 (half the bytes of f32) and multiplied in
/// f32 (F16C conversion and FMA on x86-64 when present).
///
/// When `n` is a multiple of 16 the rows are stored in interleaved groups of 16: for each
/// position `i` of `k`, the 16 rows' values side by side. A tile of activation rows and one
/// group is then a register-blocked GEMM: per position, the group's 16 values (one 512-bit or
/// two 256-bit vectors) and one broadcast activation per row. Prompts on AVX-512 convert pairs
/// of groups to f32 once per thread (`forward_pairs`). Other shapes keep plain rows and a dot
/// product per row.
#[derive(Debug)]
pub(crate) struct F16Matrix {
    n: usize,
    k: usize,
    grouped: bool,
    data: Vec<f16>,
}

/// Rows per f16 group, and activation rows per f16 tile.
pub(crate) const FG: usize = 16;
pub(crate) const F16_R: usize = 12;
/// Position sets of a one-row product (four overlapping FMA chains); the products of
/// [`F16Matrix::compute_as_alone`] use the same, so each row gets the bits it gets alone.
pub(crate) const ONE_ROW_SETS: usize = 4;

pub(crate) fn dot_f16_scalar(w: &[f16], x: &[f32]) -> f32 {
    w.iter().zip(x).map(|(a, b)| a.to_f32() * b).sum()
}

impl F16Matrix {
    /// Takes `n` rows of `k` values.
    #[cfg(test)]
    pub(crate) fn from_rows(data: Vec<f16>, n: usize, k: usize) -> Self {
        Self::from_pieces(vec![data], n, k)
    }

    /// Takes `n` rows of `k` values held in pieces of whole rows, one after another (a stacked
    /// matrix's parts), and joins and groups them in one pass, groups spread over the pool.
    pub(crate) fn from_pieces(mut pieces: Vec<Vec<f16>>, n: usize, k: usize) -> Self {
        let total: usize = pieces.iter().map(|p| p.len()).sum();
        assert!(
            total == n * k && pieces.iter().all(|p| p.len().is_multiple_of(k.max(1))),
            "f16 matrix [{n}, {k}]"
        );
        if !n.is_multiple_of(FG) || !repack() {
            let data = if pieces.len() == 1 {
                pieces.pop().unwrap_or_default()
            } else {
                pieces.concat()
            };
            return F16Matrix {
                n,
                k,
                grouped: false,
                data,
            };
        }
        // Where each row starts: (piece, offset).
        let mut rows = Vec::with_capacity(n);
        for (pi, p) in pieces.iter().enumerate() {
            rows.extend((0..p.len() / k).map(|r| (pi, r * k)));
        }
        let mut data: Vec<f16> = crate::kernels::zeroed_weights(n * k);
        // Group g holds its 16 rows position by position: value p of row i at p * 16 + i.
        if k > 0 {
            for_each_chunk_mut(&mut data, FG * k, &|g, out| {
                for i in 0..FG {
                    let (pi, at) = rows[g * FG + i];
                    for (p, &v) in pieces[pi][at..at + k].iter().enumerate() {
                        out[p * FG + i] = v;
                    }
                }
            });
        }
        F16Matrix {
            n,
            k,
            grouped: true,
            data,
        }
    }

    fn at(&self, c: usize, p: usize) -> f16 {
        if self.grouped {
            self.data[(c / FG * self.k + p) * FG + c % FG]
        } else {
            self.data[c * self.k + p]
        }
    }

    /// Rows `start..` into `out`, one after another: whole groups of the interleaved layout
    /// converted at once (each group's values are contiguous, `[k][FG]`) and transposed in
    /// blocks of `FG` positions; other rows one by one.
    fn dequantize_rows(&self, start: usize, out: &mut [f32]) {
        use half::slice::HalfFloatSliceExt;
        let k = self.k.max(1);
        let rows = out.len() / k;
        let mut r = 0;
        let mut scratch = vec![];
        while r < rows {
            let c = start + r;
            if self.grouped && c.is_multiple_of(FG) && r + FG <= rows {
                let g = c / FG;
                #[cfg(target_arch = "x86_64")]
                if isa() == Isa::Avx512 {
                    let dst = &mut out[r * k..(r + FG) * k];
                    let src = &self.data[g * FG * self.k..(g + 1) * FG * self.k];
                    // SAFETY: AVX-512 is the running ISA (checked at run time); `src` holds the
                    // group's k * FG values, `dst` FG rows of k.
                    unsafe { group_rows_avx512(src.as_ptr(), self.k, dst.as_mut_ptr(), k) };
                    r += FG;
                    continue;
                }
                scratch.resize(FG * self.k, 0f32);
                self.data[g * FG * self.k..(g + 1) * FG * self.k]
                    .convert_to_f32_slice(&mut scratch);
                let dst = &mut out[r * k..(r + FG) * k];
                // Position by position: one contiguous read of the group's FG values, one
                // write into each of the FG rows (FG sequential write streams).
                let (mut rows_out, _) = dst.split_at_mut(FG * k);
                let mut heads: [&mut [f32]; FG] = std::array::from_fn(|_| {
                    let (h, t) = std::mem::take(&mut rows_out).split_at_mut(k);
                    rows_out = t;
                    h
                });
                for (p, vals) in scratch.chunks_exact(FG).enumerate() {
                    for (h, &v) in heads.iter_mut().zip(vals) {
                        h[p] = v;
                    }
                }
                r += FG;
            } else {
                self.dequantize_row(c, &mut out[r * k..(r + 1) * k]);
                r += 1;
            }
        }
    }

    fn has_panels(&self) -> bool {
        self.grouped
    }

    /// [`WeightMatrix::panel_into`]: each position of a group is its 16 rows side by side,
    /// so a panel is a conversion (the bounds were checked).
    fn panel_t(&self, rows: std::ops::Range<usize>, cols: std::ops::Range<usize>, out: &mut [f32]) {
        let k = self.k;
        for h in 0..rows.len() / FG {
            let g = rows.start / FG + h;
            let src = &self.data[(g * k + cols.start) * FG..(g * k + cols.end) * FG];
            #[cfg(target_arch = "x86_64")]
            if isa() == Isa::Avx512 {
                // SAFETY: AVX-512 is the running ISA; `src` holds cols.len() positions of FG
                // values, `out` as many of PANEL (checked).
                unsafe { panel_avx512(src, &mut out[FG * h..], cols.len()) };
                continue;
            }
            for (p, vals) in src.chunks_exact(FG).enumerate() {
                for (o, v) in out[p * PANEL + FG * h..][..FG].iter_mut().zip(vals) {
                    *o = v.to_f32();
                }
            }
        }
    }

    /// Row `id` as f32 into `dst` (`k` values).
    fn dequantize_row(&self, id: usize, dst: &mut [f32]) {
        for (p, o) in dst.iter_mut().enumerate() {
            *o = self.at(id, p).to_f32();
        }
    }

    /// Rows `rows` of `xs` times group `g`, into `out`.
    fn group_tile(
        &self,
        simd: bool,
        xs: &[f32],
        rows: std::ops::Range<usize>,
        g: usize,
        out: &mut [[f32; FG]; F16_R],
    ) {
        let k = self.k;
        let w = &self.data[g * FG * k..(g + 1) * FG * k];
        #[cfg(target_arch = "x86_64")]
        if simd {
            // A partial tile repeats its last row; the extra results are not used.
            let x: [*const f32; F16_R] = std::array::from_fn(|r| {
                let row = (rows.start + r).min(rows.end - 1);
                xs[row * k..(row + 1) * k].as_ptr()
            });
            let w = w.as_ptr();
            let wide = isa() == Isa::Avx512;
            // SAFETY: the features were detected at run time; `w` holds `k` positions of 16
            // values and every `x` a row of `k` values.
            unsafe {
                fn part<'a, const R: usize>(
                    x: &[*const f32],
                    out: &'a mut [[f32; FG]],
                ) -> ([*const f32; R], &'a mut [[f32; FG]; R]) {
                    (
                        std::array::from_fn(|r| x[r]),
                        (&mut out[..R]).try_into().expect("R rows"),
                    )
                }
                match (wide, rows.len()) {
                    (_, 1) => {
                        let (x, o) = part::<1>(&x, out);
                        if wide {
                            f16_group_avx512::<1, ONE_ROW_SETS>(w, x, k, o)
                        } else {
                            f16_group_avx2::<1, ONE_ROW_SETS>(w, x, k, o)
                        }
                    }
                    (true, 2..=4) => {
                        let (x, o) = part::<4>(&x, out);
                        f16_group_avx512::<4, 1>(w, x, k, o)
                    }
                    (true, 5..=8) => {
                        let (x, o) = part::<8>(&x, out);
                        f16_group_avx512::<8, 1>(w, x, k, o)
                    }
                    (true, _) => f16_group_avx512::<F16_R, 1>(w, x, k, out),
                    (false, n) => {
                        for half in 0..n.div_ceil(F16_R / 2) {
                            let at = half * (F16_R / 2);
                            let (x, o) = part::<{ F16_R / 2 }>(&x[at..], &mut out[at..]);
                            f16_group_avx2::<{ F16_R / 2 }, 1>(w, x, k, o)
                        }
                    }
                }
            }
            return;
        }
        let _ = simd;
        for (r, row) in rows.enumerate() {
            let xr = &xs[row * k..(row + 1) * k];
            for (i, o) in out[r].iter_mut().enumerate() {
                *o = xr
                    .iter()
                    .enumerate()
                    .map(|(p, v)| w[p * FG + i].to_f32() * v)
                    .sum();
            }
        }
    }

    /// `xs @ W^T` for `m` rows of `k` values, every output written through `put`.
    fn compute(&self, xs: &[f32], m: usize, put: DstWriter<'_>) {
        let n = self.n;
        let simd = isa() != Isa::Scalar;
        // Prompts on AVX-512 over pairs of groups.
        #[cfg(target_arch = "x86_64")]
        let done = self.grouped && m > 1 && n.is_multiple_of(2 * FG) && isa() == Isa::Avx512 && {
            self.forward_pairs(xs, m, put);
            true
        };
        #[cfg(not(target_arch = "x86_64"))]
        let done = false;
        if done {
        } else if self.grouped {
            let row_tiles = m.div_ceil(F16_R);
            let work = |item: usize, put: &DstWriter<'_>| {
                let (g, rt) = (item / row_tiles, item % row_tiles);
                let rows = rt * F16_R..m.min((rt + 1) * F16_R);
                let mut out = [[0f32; FG]; F16_R];
                self.group_tile(simd, xs, rows.clone(), g, &mut out);
                for (r, row) in rows.enumerate() {
                    put.put(row, g * FG, &out[r]);
                }
            };
            run_items(row_tiles * (n / FG), put, &work);
        } else {
            self.forward_rows(xs, m, simd, put);
        }
    }

    /// Plain rows (a row count that is not a multiple of 16): a dot product per output.
    /// `m` rows, each with a one-row product's order ([`ONE_ROW_SETS`] position sets per lane):
    /// every row gets the bits it gets alone, in one pass over the weights (a batch's
    /// one-token sequences). Without SIMD tiles every row's product is already computed alike
    /// whatever comes with it.
    fn compute_as_alone(&self, xs: &[f32], m: usize, put: DstWriter<'_>) {
        #[cfg(target_arch = "x86_64")]
        if self.grouped && isa() != Isa::Scalar && m > 1 {
            const T: usize = 4;
            let wide = isa() == Isa::Avx512;
            let k = self.k;
            let row_tiles = m.div_ceil(T);
            let work = |item: usize, put: &DstWriter<'_>| {
                let (g, rt) = (item / row_tiles, item % row_tiles);
                let rows = rt * T..m.min((rt + 1) * T);
                let w = self.data[g * FG * k..(g + 1) * FG * k].as_ptr();
                let x: [*const f32; T] = std::array::from_fn(|r| {
                    let row = (rows.start + r).min(rows.end - 1);
                    xs[row * k..(row + 1) * k].as_ptr()
                });
                let mut out = [[0f32; FG]; T];
                // SAFETY: the ISA was detected; `w` is one group of `k` positions and every
                // `x` a row of `k` values.
                unsafe {
                    if wide {
                        f16_group_avx512::<T, ONE_ROW_SETS>(w, x, k, &mut out);
                    } else {
                        for half in 0..2 {
                            let o: &mut [[f32; FG]; 2] = (&mut out[2 * half..2 * half + 2])
                                .try_into()
                                .expect("two rows");
                            f16_group_avx2::<2, ONE_ROW_SETS>(
                                w,
                                [x[2 * half], x[2 * half + 1]],
                                k,
                                o,
                            );
                        }
                    }
                }
                for (r, row) in rows.enumerate() {
                    put.put(row, g * FG, &out[r]);
                }
            };
            run_items(row_tiles * (self.n / FG), put, &work);
            return;
        }
        self.compute(xs, m, put)
    }

    fn forward_rows(&self, xs: &[f32], m: usize, simd: bool, put: DstWriter<'_>) {
        let (n, k) = (self.n, self.k);
        let group = 8;
        let work = |g: usize, put: &DstWriter<'_>| {
            for c in g * group..n.min((g + 1) * group) {
                let w = &self.data[c * k..(c + 1) * k];
                for r in 0..m {
                    let xr = &xs[r * k..(r + 1) * k];
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: avx2/fma/f16c were detected at run time when `simd` is set.
                    let v = if simd {
                        unsafe { dot_f16_avx2(w, xr) }
                    } else {
                        dot_f16_scalar(w, xr)
                    };
                    #[cfg(not(target_arch = "x86_64"))]
                    let v = dot_f16_scalar(w, xr);
                    put.put(r, c, &[v]);
                }
            }
        };
        run_items(n.div_ceil(group), put, &work);
    }

    /// Prompts on AVX-512, `n` a multiple of 32: each work item takes a pair of groups and a
    /// run of row tiles; the pair is converted to f32 once into a per-thread buffer (kept while
    /// the thread's next items use the same pair), so the inner loop is loads and FMAs only.
    #[cfg(target_arch = "x86_64")]
    fn forward_pairs(&self, xs: &[f32], m: usize, put: DstWriter<'_>) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        /// Activation rows per tile, and tiles per work item.
        const R: usize = 12;
        const TILES: usize = 4;
        static CALLS: AtomicUsize = AtomicUsize::new(1);
        let (n, k) = (self.n, self.k);
        let row_tiles = m.div_ceil(R);
        let runs = row_tiles.div_ceil(TILES);
        // Tells this call's conversions from any earlier call's.
        let call = CALLS.fetch_add(1, Ordering::Relaxed);
        let work = |item: usize, put: &DstWriter<'_>| {
            let (g2, run) = (item / runs, item % runs);
            let w = &self.data[2 * g2 * FG * k..(2 * g2 + 2) * FG * k];
            F32_SCRATCH.with(|cell| {
                let (key, buf) = &mut *cell.borrow_mut();
                if buf.len() < w.len() {
                    buf.resize(w.len(), 0.0);
                }
                if *key != (call, g2) {
                    // SAFETY: AVX-512 was detected at run time (the caller checked);
                    // `buf` holds at least `w.len()` values, a multiple of 16.
                    unsafe { f16_to_f32_avx512(w.as_ptr(), buf.as_mut_ptr(), w.len()) };
                    *key = (call, g2);
                }
                for rt in run * TILES..row_tiles.min((run + 1) * TILES) {
                    let rows = rt * R..m.min((rt + 1) * R);
                    // A partial tile repeats its last row; the extra results are not used.
                    let x: [*const f32; R] = std::array::from_fn(|r| {
                        let row = (rows.start + r).min(rows.end - 1);
                        xs[row * k..(row + 1) * k].as_ptr()
                    });
                    let mut out = [[0f32; 2 * FG]; R];
                    // SAFETY: as above; `buf` holds two groups of `k` positions and every
                    // `x` a row of `k` values.
                    unsafe { f32_group2_avx512::<R>(buf.as_ptr(), x, k, &mut out) };
                    for (r, row) in rows.enumerate() {
                        put.put(row, 2 * g2 * FG, &out[r]);
                    }
                }
            });
        };
        run_items(runs * (n / (2 * FG)), put, &work);
    }
}

our_weight_matrix!(F16Matrix, |_| GgmlDType::F16, false, |me: &F16Matrix,
                                                          xs: &[f32],
                                                          m: usize,
                                                          put: DstWriter<
    '_,
>| {
    me.compute_as_alone(xs, m, put);
    true
});
