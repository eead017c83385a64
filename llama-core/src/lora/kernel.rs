//! Storage of an adapter's matrices and the run-time update `out += f * B (A x)`.
//!
//! Each matrix is kept in the narrowest type that holds every value exactly (f16, bf16, or
//! f32): an f16 file stays f16 (half the bytes a decode step streams), an f32 file whose values
//! are not all f16 stays f32. Arithmetic is f32. `A` is kept `[rank, in]` (the first product is
//! `rank` dot products over the input), `B` transposed, `[rank, out]`, so the second product is
//! `rank` scaled additions over the output row: both vectorize along contiguous memory.

use half::{bf16, f16};

use crate::error::{Error, Result};
use crate::kernels::simd::Elem;

/// A matrix of an adapter, row-major, in the narrowest exact type.
#[derive(Clone, Debug)]
pub(crate) enum LoraMat {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
}

impl LoraMat {
    /// The values, stored as f16 or bf16 when that is exact for every one of them.
    pub(crate) fn new(v: Vec<f32>) -> LoraMat {
        if v.iter().all(|&x| f16::from_f32(x).to_f32() == x) {
            return LoraMat::F16(v.iter().map(|&x| f16::from_f32(x)).collect());
        }
        if v.iter().all(|&x| bf16::from_f32(x).to_f32() == x) {
            return LoraMat::BF16(v.iter().map(|&x| bf16::from_f32(x)).collect());
        }
        LoraMat::F32(v)
    }

    pub(crate) fn len(&self) -> usize {
        match self {
            LoraMat::F32(v) => v.len(),
            LoraMat::F16(v) => v.len(),
            LoraMat::BF16(v) => v.len(),
        }
    }

    pub(crate) fn bytes(&self) -> usize {
        match self {
            LoraMat::F32(v) => v.len() * 4,
            LoraMat::F16(v) => v.len() * 2,
            LoraMat::BF16(v) => v.len() * 2,
        }
    }

    pub(crate) fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.len()];
        self.widen(0, &mut out);
        out
    }

    /// Values `start..start + out.len()` as f32 into `out`.
    fn widen(&self, start: usize, out: &mut [f32]) {
        let n = out.len();
        match self {
            LoraMat::F32(v) => out.copy_from_slice(&v[start..start + n]),
            LoraMat::F16(v) => {
                for (o, x) in out.iter_mut().zip(&v[start..start + n]) {
                    *o = x.f32();
                }
            }
            LoraMat::BF16(v) => {
                for (o, x) in out.iter_mut().zip(&v[start..start + n]) {
                    *o = x.f32();
                }
            }
        }
    }

    /// `x . self[start..start + x.len()]`.
    #[inline]
    fn dot(&self, start: usize, x: &[f32], simd: bool) -> f32 {
        let n = x.len();
        match self {
            LoraMat::F32(v) => dot(x, &v[start..start + n], simd),
            LoraMat::F16(v) => dot(x, &v[start..start + n], simd),
            LoraMat::BF16(v) => dot(x, &v[start..start + n], simd),
        }
    }

    /// `x . self[start + i * k..][..k]` for the four rows `i` (`k = x.len()`).
    #[inline]
    fn dot4(&self, start: usize, x: &[f32], simd: bool) -> [f32; 4] {
        let k = x.len();
        let span = start..start + 4 * k;
        match self {
            LoraMat::F32(v) => dot4(x, &v[span], simd),
            LoraMat::F16(v) => dot4(x, &v[span], simd),
            LoraMat::BF16(v) => dot4(x, &v[span], simd),
        }
    }

    /// `out[c] += sum_j u[j] * self[start + j * w + c]` (`w = out.len()`, `j < u.len()`): one
    /// panel of `B^T` into one column chunk.
    #[inline]
    fn panel(&self, start: usize, u: &[f32], out: &mut [f32], simd: bool) {
        let span = start..start + u.len() * out.len();
        match self {
            LoraMat::F32(v) => panel(out, u, &v[span], simd),
            LoraMat::F16(v) => panel(out, u, &v[span], simd),
            LoraMat::BF16(v) => panel(out, u, &v[span], simd),
        }
    }

    /// `out += u * self[start..start + out.len()]`.
    #[inline]
    fn axpy(&self, start: usize, u: f32, out: &mut [f32], simd: bool) {
        let n = out.len();
        match self {
            LoraMat::F32(v) => axpy(out, u, &v[start..start + n], simd),
            LoraMat::F16(v) => axpy(out, u, &v[start..start + n], simd),
            LoraMat::BF16(v) => axpy(out, u, &v[start..start + n], simd),
        }
    }

    pub(crate) fn dtype_name(&self) -> &'static str {
        match self {
            LoraMat::F32(_) => "f32",
            LoraMat::F16(_) => "f16",
            LoraMat::BF16(_) => "bf16",
        }
    }
}

/// `x . w` in f32.
#[inline]
pub(crate) fn dot<T: Elem>(x: &[f32], w: &[T], simd: bool) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: `simd` is set only where the CPU has AVX2, FMA and F16C.
        return unsafe { dot_avx2(x, w) };
    }
    let _ = simd;
    x.iter().zip(w).map(|(a, b)| a * b.f32()).sum()
}

/// `out += u * w` in f32.
#[inline]
fn axpy<T: Elem>(out: &mut [f32], u: f32, w: &[T], simd: bool) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: as in `dot`.
        return unsafe { axpy_avx2(out, u, w) };
    }
    let _ = simd;
    for (o, b) in out.iter_mut().zip(w) {
        *o += u * b.f32();
    }
}

/// Four rows of `w` (`[4, x.len()]`) dotted with `x`.
#[inline]
pub(crate) fn dot4<T: Elem>(x: &[f32], w: &[T], simd: bool) -> [f32; 4] {
    let k = x.len();
    #[cfg(target_arch = "x86_64")]
    if simd && w.len() >= 4 * k {
        // SAFETY: as in `dot`; `w` holds four rows of `k`.
        return unsafe { dot4_avx2(x, w) };
    }
    std::array::from_fn(|i| dot(x, &w[i * k..(i + 1) * k], simd))
}

/// `out[c] += sum_j u[j] * p[j * w + c]`, `w = out.len()`.
#[inline]
pub(crate) fn panel<T: Elem>(out: &mut [f32], u: &[f32], p: &[T], simd: bool) {
    let w = out.len();
    #[cfg(target_arch = "x86_64")]
    if simd && p.len() >= u.len() * w {
        // SAFETY: as in `dot`; `p` holds `u.len()` rows of `w`.
        return unsafe { panel_avx2(out, u, p) };
    }
    for (j, &uj) in u.iter().enumerate() {
        axpy(out, uj, &p[j * w..(j + 1) * w], simd);
    }
}

/// # Safety
/// The CPU supports AVX2, FMA and F16C; `w` holds four rows of `x.len()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot4_avx2<T: Elem>(x: &[f32], w: &[T]) -> [f32; 4] {
    use std::arch::x86_64::*;
    let k = x.len();
    let (xp, wp) = (x.as_ptr(), w.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 8 <= k {
        let xv = _mm256_loadu_ps(xp.add(i));
        for (r, a) in acc.iter_mut().enumerate() {
            *a = _mm256_fmadd_ps(xv, T::load8(wp.add(r * k + i)), *a);
        }
        i += 8;
    }
    let mut s = crate::kernels::simd::hsum4(acc);
    while i < k {
        for (r, sr) in s.iter_mut().enumerate() {
            *sr += x[i] * w[r * k + i].f32();
        }
        i += 1;
    }
    s
}

/// # Safety
/// The CPU supports AVX2, FMA and F16C; `p` holds `u.len()` rows of `out.len()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn panel_avx2<T: Elem>(out: &mut [f32], u: &[f32], p: &[T]) {
    use std::arch::x86_64::*;
    let w = out.len();
    let (op, pp) = (out.as_mut_ptr(), p.as_ptr());
    // Eight vectors of outputs stay in registers over every rank row.
    let mut c = 0;
    while c + 64 <= w {
        let mut acc: [__m256; 8] = std::array::from_fn(|v| _mm256_loadu_ps(op.add(c + 8 * v)));
        for (j, &uj) in u.iter().enumerate() {
            let b = _mm256_set1_ps(uj);
            let row = pp.add(j * w + c);
            for (v, a) in acc.iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(T::load8(row.add(8 * v)), b, *a);
            }
        }
        for (v, a) in acc.iter().enumerate() {
            _mm256_storeu_ps(op.add(c + 8 * v), *a);
        }
        c += 64;
    }
    while c + 8 <= w {
        let mut a = _mm256_loadu_ps(op.add(c));
        for (j, &uj) in u.iter().enumerate() {
            a = _mm256_fmadd_ps(T::load8(pp.add(j * w + c)), _mm256_set1_ps(uj), a);
        }
        _mm256_storeu_ps(op.add(c), a);
        c += 8;
    }
    while c < w {
        for (j, &uj) in u.iter().enumerate() {
            out[c] += uj * p[j * w + c].f32();
        }
        c += 1;
    }
}

/// # Safety
/// The CPU supports AVX2, FMA and F16C; `w` is at least as long as `x`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_avx2<T: Elem>(x: &[f32], w: &[T]) -> f32 {
    use std::arch::x86_64::*;
    let n = x.len().min(w.len());
    let (xp, wp) = (x.as_ptr(), w.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 32 <= n {
        for (j, a) in acc.iter_mut().enumerate() {
            let o = i + 8 * j;
            *a = _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(o)), T::load8(wp.add(o)), *a);
        }
        i += 32;
    }
    while i + 8 <= n {
        acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(i)), T::load8(wp.add(i)), acc[0]);
        i += 8;
    }
    let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    let h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps::<1>(s));
    let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    let h = _mm_add_ss(h, _mm_shuffle_ps::<1>(h, h));
    let mut total = _mm_cvtss_f32(h);
    while i < n {
        total += x[i] * w[i].f32();
        i += 1;
    }
    total
}

/// # Safety
/// The CPU supports AVX2, FMA and F16C; `w` is at least as long as `out`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn axpy_avx2<T: Elem>(out: &mut [f32], u: f32, w: &[T]) {
    use std::arch::x86_64::*;
    let n = out.len().min(w.len());
    let (op, wp) = (out.as_mut_ptr(), w.as_ptr());
    let uv = _mm256_set1_ps(u);
    let mut i = 0;
    while i + 8 <= n {
        let o = op.add(i);
        _mm256_storeu_ps(
            o,
            _mm256_fmadd_ps(T::load8(wp.add(i)), uv, _mm256_loadu_ps(o)),
        );
        i += 8;
    }
    while i < n {
        out[i] += u * w[i].f32();
        i += 1;
    }
}

/// One stored update: `A` `[rank, inp]`, `B^T` `[rank, out]`.
#[derive(Clone, Debug)]
pub(crate) struct Update<'a> {
    pub(crate) rank: usize,
    pub(crate) inp: usize,
    pub(crate) out: usize,
    pub(crate) a: &'a LoraMat,
    pub(crate) bt: &'a LoraMat,
}

/// Output columns per item of the pool when one row is updated (decode).
const COLS: usize = 128;
/// Below this many multiply-adds a product runs on the calling thread alone.
const SERIAL: usize = 1 << 12;

/// `out[i, col..col + n] += f * B (A xs[i])` for the `m` rows of `xs` (`[m, inp]`), `out`
/// `[m, stride]`.
pub(crate) fn apply(
    up: &Update<'_>,
    f: f32,
    xs: &[f32],
    m: usize,
    out: &mut [f32],
    (stride, col, n): (usize, usize, usize),
) -> Result<()> {
    let (r, k) = (up.rank, up.inp);
    let simd = crate::exec::current().isa != crate::exec::Isa::Scalar;
    if xs.len() != m * k || up.out != n || out.len() != m * stride || col + n > stride {
        return Err(Error::InvalidArgument(format!(
            "LoRA update [{n}, {r}] x [{r}, {k}] on a [{m}, {}] input into columns {col}..{} of [{m}, {stride}]",
            xs.len() / m.max(1),
            col + n
        )));
    }
    // A x first (rank values per row), scaled once.
    let mut u = vec![0f32; m * r];
    let a_work = m * r * k;
    let fill_u = |i: usize, uj: &mut f32| {
        let (row, j) = (i / r, i % r);
        *uj = f * up.a.dot(j * k, &xs[row * k..(row + 1) * k], simd);
    };
    if a_work < SERIAL {
        for (i, uj) in u.iter_mut().enumerate() {
            fill_u(i, uj);
        }
    } else {
        let per = (m * r).div_ceil(crate::pool::pool().threads() * 2).max(1);
        crate::pool::for_each_chunk_mut(&mut u, per, &|c, chunk| {
            for (o, uj) in chunk.iter_mut().enumerate() {
                fill_u(c * per + o, uj);
            }
        });
    }
    // Then B: rank scaled additions of B^T's panel rows into each output row.
    let add_chunk = |urow: &[f32], ochunk: &mut [f32], c0: usize| {
        let w = ochunk.len();
        for (j, &uj) in urow.iter().enumerate() {
            if uj != 0.0 {
                up.bt.axpy(c0 * r + j * w, uj, ochunk, simd);
            }
        }
    };
    let add_row = |urow: &[f32], orow: &mut [f32]| {
        for (c, chunk) in orow.chunks_mut(COLS).enumerate() {
            add_chunk(urow, chunk, c * COLS);
        }
    };
    if m == 1 {
        let orow = &mut out[col..col + n];
        if n * r < SERIAL {
            add_row(&u, orow);
        } else {
            crate::pool::for_each_chunk_mut(orow, COLS, &|c, chunk| add_chunk(&u, chunk, c * COLS));
        }
    } else {
        crate::pool::for_each_chunk_mut(out, stride, &|i, row| {
            add_row(&u[i * r..(i + 1) * r], &mut row[col..col + n])
        });
    }
    Ok(())
}

/// Where `B[o, j]` lies in the stored `B^T`: panels of [`COLS`] output columns (the last one
/// narrower), each `[rank, width]` row-major, so one column chunk's update reads one
/// contiguous block.
pub(crate) fn panel_index(j: usize, o: usize, rank: usize, out: usize) -> usize {
    let c0 = o / COLS * COLS;
    let w = COLS.min(out - c0);
    c0 * rank + j * w + (o - c0)
}

/// One projection's output window in a row and the updates that add to it.
pub(crate) struct Part<'a> {
    pub(crate) col: usize,
    pub(crate) n: usize,
    /// `(update, factor)`.
    pub(crate) ups: Vec<(Update<'a>, f32)>,
}

/// The update of one row (decode), `out[col..col + n] += sum f * B (A x)` for every part, as
/// work riding along the base matmul's pool call ([`crate::kernels::Rider`]): `pre` items
/// compute the `A x` products (a few rank rows each), `post` items add `B^T`'s rows into
/// column chunks of `delta` (the base matmul writes `out` meanwhile), each waiting until every
/// `pre` item is done; [`RowUpdate::finish`] adds `delta` to `out` after the call.
pub(crate) struct RowUpdate<'a> {
    parts: &'a [Part<'a>],
    x: &'a [f32],
    simd: bool,
    /// `(part, update, first rank row, rows, where they go in u)`
    pre: Vec<(usize, usize, usize, usize, usize)>,
    /// `(part, first column within the part, width)`
    post: Vec<(usize, usize, usize)>,
    /// Start of each part's updates in `u`.
    starts: Vec<usize>,
    u: Vec<std::sync::atomic::AtomicU32>,
    done: std::sync::atomic::AtomicUsize,
    delta: crate::pool::SharedMut<'a, f32>,
}

/// Rank rows per `pre` item.
const RANK_ROWS: usize = 4;

impl<'a> RowUpdate<'a> {
    /// Checks the shapes; `delta` is a zeroed buffer as long as an output row.
    pub(crate) fn new(
        parts: &'a [Part<'a>],
        x: &'a [f32],
        delta: &'a mut [f32],
    ) -> Result<RowUpdate<'a>> {
        let mut pre = vec![];
        let mut starts = Vec::with_capacity(parts.len());
        let mut n_u = 0;
        for (pi, p) in parts.iter().enumerate() {
            starts.push(n_u);
            if p.col + p.n > delta.len() {
                return Err(Error::InvalidArgument(format!(
                    "LoRA update into columns {}..{} of a row of {}",
                    p.col,
                    p.col + p.n,
                    delta.len()
                )));
            }
            for (qi, (up, _)) in p.ups.iter().enumerate() {
                if up.inp != x.len() || up.out != p.n {
                    return Err(Error::InvalidArgument(format!(
                        "LoRA update [{}, {}] x [{}, {}] for a {}-wide input into {} columns",
                        up.out,
                        up.rank,
                        up.rank,
                        up.inp,
                        x.len(),
                        p.n
                    )));
                }
                let mut j = 0;
                while j < up.rank {
                    let rows = RANK_ROWS.min(up.rank - j);
                    pre.push((pi, qi, j, rows, n_u + j));
                    j += rows;
                }
                n_u += up.rank;
            }
        }
        let mut post = vec![];
        for (pi, p) in parts.iter().enumerate() {
            if p.ups.is_empty() {
                continue;
            }
            let mut c = 0;
            while c < p.n {
                let w = COLS.min(p.n - c);
                post.push((pi, c, w));
                c += w;
            }
        }
        Ok(RowUpdate {
            parts,
            x,
            simd: crate::exec::current().isa != crate::exec::Isa::Scalar,
            pre,
            post,
            starts,
            u: (0..n_u)
                .map(|_| std::sync::atomic::AtomicU32::new(0))
                .collect(),
            done: std::sync::atomic::AtomicUsize::new(0),
            delta: crate::pool::SharedMut::new(delta),
        })
    }
}

/// Adds the parts' columns of `delta` (a [`RowUpdate`]'s, once its call is over) to `out`.
pub(crate) fn add_parts(parts: &[Part<'_>], delta: &[f32], out: &mut [f32]) {
    for p in parts.iter().filter(|p| !p.ups.is_empty()) {
        for (o, d) in out[p.col..p.col + p.n]
            .iter_mut()
            .zip(&delta[p.col..p.col + p.n])
        {
            *o += d;
        }
    }
}

impl crate::kernels::Rider for RowUpdate<'_> {
    fn pre(&self) -> usize {
        self.pre.len()
    }
    fn post(&self) -> usize {
        self.post.len()
    }
    fn run_pre(&self, i: usize) {
        use std::sync::atomic::Ordering;
        let (pi, qi, j0, rows, off) = self.pre[i];
        let (up, f) = &self.parts[pi].ups[qi];
        if rows == 4 {
            let v = up.a.dot4(j0 * up.inp, self.x, self.simd);
            for (i, v) in v.iter().enumerate() {
                self.u[off + i].store((f * v).to_bits(), Ordering::Relaxed);
            }
        } else {
            for j in j0..j0 + rows {
                let v = f * up.a.dot(j * up.inp, self.x, self.simd);
                self.u[off + (j - j0)].store(v.to_bits(), Ordering::Relaxed);
            }
        }
        self.done.fetch_add(1, Ordering::Release);
    }
    fn run_post(&self, i: usize) {
        use std::sync::atomic::Ordering;
        let mut spins = 0u32;
        while self.done.load(Ordering::Acquire) < self.pre.len() {
            spins += 1;
            if spins < 1 << 12 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        let (pi, c0, w) = self.post[i];
        let p = &self.parts[pi];
        // SAFETY: the post items are disjoint column ranges of the row (parts do not overlap,
        // and the chunks of one part do not), and nothing else touches `delta` during the call.
        let orow = unsafe { self.delta.slice(p.col + c0, w) };
        let mut off = self.starts[pi];
        let mut u = [0f32; 64];
        for (up, _) in &p.ups {
            // The panel of this chunk: rank rows of `w` columns from `c0 * rank`.
            for base in (0..up.rank).step_by(u.len()) {
                let n = (up.rank - base).min(u.len());
                for (j, uj) in u[..n].iter_mut().enumerate() {
                    *uj = f32::from_bits(self.u[off + base + j].load(Ordering::Relaxed));
                }
                up.bt
                    .panel(c0 * up.rank + base * w, &u[..n], orow, self.simd);
            }
            off += up.rank;
        }
    }
}
