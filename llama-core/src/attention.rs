//! Causal self-attention over the KV cache in one pass per query row, on our thread pool.
//!
//! For each query head and row: scores against the keys the row may see (positions up to its
//! own; the masked half of the square is never computed), softmax, and the weighted sum of the
//! values, written straight into the `(t, heads * head_dim)` layout the output projection
//! reads. Compared with the tensor-op version (two batched matmuls with a full mask, a softmax
//! and three layout copies) it skips the masked work, allocates nothing per layer but the
//! output, and runs on every core.

use candle_core::{CpuStorage, Storage, Tensor};
use half::f16;

use crate::error::{Error, Result};

/// Query rows per work item.
const ROWS: usize = 8;

/// A `(1, heads, len, head_dim)` f32 or f16 tensor's storage, its first element and head
/// stride; rows within a head must be contiguous.
fn head_view(t: &Tensor) -> Result<(impl std::ops::Deref<Target = Storage> + '_, usize, usize)> {
    let (storage, layout) = t.storage_and_layout();
    let stride = layout.stride();
    let dims = layout.dims();
    if dims.len() != 4 || stride[3] != 1 || stride[2] != dims[3] {
        return Err(Error::InvalidArgument(format!(
            "attention: unexpected layout {dims:?} / {stride:?}"
        )));
    }
    let (start, head_stride) = (layout.start_offset(), stride[1]);
    if !matches!(
        &*storage,
        Storage::Cpu(CpuStorage::F32(_)) | Storage::Cpu(CpuStorage::F16(_))
    ) {
        return Err(Error::InvalidArgument(
            "attention: f32 or f16 CPU tensors only".into(),
        ));
    }
    Ok((storage, start, head_stride))
}

/// Keys or values as stored.
#[derive(Clone, Copy)]
enum Rows<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
}

impl<'a> Rows<'a> {
    fn of(s: &'a Storage) -> Rows<'a> {
        match s {
            Storage::Cpu(CpuStorage::F16(v)) => Rows::F16(v),
            Storage::Cpu(CpuStorage::F32(v)) => Rows::F32(v),
            _ => Rows::F32(&[]),
        }
    }

    fn from(self, at: usize) -> Rows<'a> {
        match self {
            Rows::F32(v) => Rows::F32(&v[at..]),
            Rows::F16(v) => Rows::F16(&v[at..]),
        }
    }

    /// `out[j] = (q . key j) * scale` for keys `0..out.len()`.
    fn scores(self, q: &[f32], scale: f32, out: &mut [f32], simd: bool) {
        let d = q.len();
        #[cfg(target_arch = "x86_64")]
        if simd {
            // SAFETY: avx2, fma and f16c were detected at run time; the rows are in bounds
            // (checked by the slicing below before any vector load).
            match self {
                Rows::F32(v) => unsafe { scores_avx2(q, &v[..out.len() * d], scale, out) },
                Rows::F16(v) => unsafe { scores_avx2(q, &v[..out.len() * d], scale, out) },
            }
            return;
        }
        let _ = simd;
        for (j, o) in out.iter_mut().enumerate() {
            *o = match self {
                Rows::F32(v) => dot_scalar(q, &v[j * d..(j + 1) * d]),
                Rows::F16(v) => dot_scalar(q, &v[j * d..(j + 1) * d]),
            } * scale;
        }
    }

    /// `y += sum_j w[j] * value j`, in order of `j`.
    fn weighted_sum(self, w: &[f32], y: &mut [f32], simd: bool) {
        let d = y.len();
        #[cfg(target_arch = "x86_64")]
        if simd {
            // SAFETY: as in `scores`.
            match self {
                Rows::F32(v) => unsafe { weighted_sum_avx2(w, &v[..w.len() * d], y) },
                Rows::F16(v) => unsafe { weighted_sum_avx2(w, &v[..w.len() * d], y) },
            }
            return;
        }
        let _ = simd;
        for (j, &p) in w.iter().enumerate() {
            match self {
                Rows::F32(v) => axpy_scalar(y, p, &v[j * d..(j + 1) * d]),
                Rows::F16(v) => axpy_scalar(y, p, &v[j * d..(j + 1) * d]),
            }
        }
    }

    /// [`Rows::scores`] for several query rows at once (at most 4): `out` holds one segment
    /// of `n` scores per query, keys `0..n`.
    fn scores_multi(self, qs: &[&[f32]], scale: f32, n: usize, out: &mut [f32], simd: bool) {
        #[cfg(target_arch = "x86_64")]
        if simd && qs.len() > 1 {
            let d = qs[0].len();
            macro_rules! go {
                ($v:expr, $q:literal) => {{
                    let q: [&[f32]; $q] = std::array::from_fn(|c| qs[c]);
                    // SAFETY: avx2, fma and f16c were detected at run time; the key rows are in
                    // bounds (sliced below) and `out` holds `Q * n` scores.
                    unsafe { scores_multi_avx2::<_, $q>(q, &$v[..n * d], n, scale, out) }
                }};
            }
            match (self, qs.len()) {
                (Rows::F32(v), 2) => go!(v, 2),
                (Rows::F32(v), 3) => go!(v, 3),
                (Rows::F32(v), _) => go!(v, 4),
                (Rows::F16(v), 2) => go!(v, 2),
                (Rows::F16(v), 3) => go!(v, 3),
                (Rows::F16(v), _) => go!(v, 4),
            }
            return;
        }
        for (c, q) in qs.iter().enumerate() {
            self.scores(q, scale, &mut out[c * n..(c + 1) * n], simd);
        }
    }

    /// [`Rows::weighted_sum`] for several weight rows at once (at most 4; `w` holds one
    /// segment of `n` weights per output row).
    fn weighted_multi(self, w: &[f32], n: usize, ys: &mut [&mut [f32]], simd: bool) {
        #[cfg(target_arch = "x86_64")]
        if simd && ys.len() > 1 {
            let d = ys[0].len();
            macro_rules! go {
                ($v:expr, $q:literal, $n:literal) => {{
                    let mut it = ys.iter_mut();
                    let y: [&mut [f32]; $q] =
                        std::array::from_fn(|_| &mut **it.next().expect("Q rows"));
                    // SAFETY: avx2, fma and f16c were detected at run time; the value rows are
                    // in bounds (sliced below) and `w` holds `Q * n` weights.
                    unsafe { weighted_multi_avx2::<_, $q, $n>(w, n, &$v[..n * d], y) }
                }};
            }
            match (self, ys.len()) {
                (Rows::F32(v), 2) => go!(v, 2, 4),
                (Rows::F32(v), 3) => go!(v, 3, 2),
                (Rows::F32(v), _) => go!(v, 4, 2),
                (Rows::F16(v), 2) => go!(v, 2, 4),
                (Rows::F16(v), 3) => go!(v, 3, 2),
                (Rows::F16(v), _) => go!(v, 4, 2),
            }
            return;
        }
        for (c, y) in ys.iter_mut().enumerate() {
            self.weighted_sum(&w[c * n..(c + 1) * n], y, simd);
        }
    }
}

/// A stored key or value element: f32, or f16 read through F16C. Both give the same lanes and
/// summation order, so an f16 cache gives exactly what an f32 cache holding the same rounded
/// values would.
trait Elem: Copy {
    fn f32(self) -> f32;
    /// Eight elements from `p` as f32 lanes.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
}

impl Elem for f32 {
    #[inline(always)]
    fn f32(self) -> f32 {
        self
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const f32) -> std::arch::x86_64::__m256 {
        // SAFETY: the caller's pointer covers eight elements; only called from AVX2 code.
        unsafe { std::arch::x86_64::_mm256_loadu_ps(p) }
    }
}

impl Elem for f16 {
    #[inline(always)]
    fn f32(self) -> f32 {
        self.to_f32()
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const f16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: the caller's pointer covers eight elements; only called from F16C code.
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)) }
    }
}

fn dot_scalar<T: Elem>(a: &[f32], b: &[T]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y.f32()).sum()
}

fn axpy_scalar<T: Elem>(acc: &mut [f32], w: f32, v: &[T]) {
    for (a, x) in acc.iter_mut().zip(v) {
        *a += w * x.f32();
    }
}

/// The horizontal sums of four 8-lane vectors together, with the pairings of a one-vector
/// sum (lanes `i + (i+4)`, then `0+2` and `1+3`, then those two), so each equals what
/// summing its vector alone gives.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn hsum4(v: [std::arch::x86_64::__m256; 4]) -> [f32; 4] {
    use std::arch::x86_64::*;
    // Lanes i + i+4: vectors 0 and 1 (low and high half), vectors 2 and 3.
    let ab = _mm256_add_ps(
        _mm256_permute2f128_ps::<0x20>(v[0], v[1]),
        _mm256_permute2f128_ps::<0x31>(v[0], v[1]),
    );
    let cd = _mm256_add_ps(
        _mm256_permute2f128_ps::<0x20>(v[2], v[3]),
        _mm256_permute2f128_ps::<0x31>(v[2], v[3]),
    );
    // 0+2 and 1+3: [v0, v0, v2, v2 | v1, v1, v3, v3].
    let x = _mm256_add_ps(
        _mm256_shuffle_ps::<0x44>(ab, cd),
        _mm256_shuffle_ps::<0xEE>(ab, cd),
    );
    let x = _mm256_add_ps(x, _mm256_shuffle_ps::<0xB1>(x, x));
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), x);
    [lanes[0], lanes[4], lanes[2], lanes[6]]
}

/// Key scores four keys at a time: per key two 8-lane FMA chains over the head dimension
/// (16-wide steps, then one 8-wide step into the first), reduced for the four keys together by
/// a transposing add tree with the same pairings as a one-key horizontal sum (lanes i + i+4,
/// then 0+2 and 1+3, then those two), then the scalar tail. `k` holds `out.len()` rows of
/// `q.len()` elements.
#[cfg(target_arch = "x86_64")]
/// # Safety
/// The CPU supports `avx2,fma,f16c` (the caller checked at run time). `k` holds `out.len()` rows
/// of `q.len()` elements.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn scores_avx2<T: Elem>(q: &[f32], k: &[T], scale: f32, out: &mut [f32]) {
    use std::arch::x86_64::*;
    let (d, n) = (q.len(), out.len());
    debug_assert!(k.len() >= n * d);
    let (qp, kp) = (q.as_ptr(), k.as_ptr());
    let tail = |j: usize, from: usize| -> f32 {
        (from..d).map(|i| q[i] * k[j * d + i].f32()).sum::<f32>()
    };
    let mut j = 0;
    while j + 4 <= n {
        let mut s0 = [_mm256_setzero_ps(); 4];
        let mut s1 = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 16 <= d {
            let (qa, qb) = (_mm256_loadu_ps(qp.add(i)), _mm256_loadu_ps(qp.add(i + 8)));
            for c in 0..4 {
                let row = kp.add((j + c) * d + i);
                s0[c] = _mm256_fmadd_ps(qa, T::load8(row), s0[c]);
                s1[c] = _mm256_fmadd_ps(qb, T::load8(row.add(8)), s1[c]);
            }
            i += 16;
        }
        if i + 8 <= d {
            let qa = _mm256_loadu_ps(qp.add(i));
            for (c, s) in s0.iter_mut().enumerate() {
                *s = _mm256_fmadd_ps(qa, T::load8(kp.add((j + c) * d + i)), *s);
            }
            i += 8;
        }
        let sums = hsum4(std::array::from_fn(|c| _mm256_add_ps(s0[c], s1[c])));
        for (c, &sum) in sums.iter().enumerate() {
            let mut s = sum;
            if i < d {
                s += tail(j + c, i);
            }
            out[j + c] = s * scale;
        }
        j += 4;
    }
    while j < n {
        let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut i = 0;
        while i + 16 <= d {
            let row = kp.add(j * d + i);
            s0 = _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(i)), T::load8(row), s0);
            s1 = _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(i + 8)), T::load8(row.add(8)), s1);
            i += 16;
        }
        if i + 8 <= d {
            s0 = _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(i)), T::load8(kp.add(j * d + i)), s0);
            i += 8;
        }
        let v = _mm256_add_ps(s0, s1);
        let s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        let mut s = _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps::<1>(s2, s2)));
        if i < d {
            s += tail(j, i);
        }
        out[j] = s * scale;
        j += 1;
    }
}

/// `y += sum_j w[j] * v_j` with the accumulators for up to 64 lanes of `y` in registers while
/// the values stream past (per lane the same FMAs in the same order as one axpy per value).
#[cfg(target_arch = "x86_64")]
/// # Safety
/// The CPU supports `avx2,fma,f16c` (the caller checked at run time). `v` holds `w.len()` rows of
/// `y.len()` elements.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn weighted_sum_avx2<T: Elem>(w: &[f32], v: &[T], y: &mut [f32]) {
    let d = y.len();
    debug_assert!(v.len() >= w.len() * d);
    let mut c0 = 0;
    while c0 + 8 <= d {
        let chunks = ((d - c0) / 8).min(8);
        match chunks {
            8 => weighted_chunk::<T, 8>(w, v, y, c0),
            7 => weighted_chunk::<T, 7>(w, v, y, c0),
            6 => weighted_chunk::<T, 6>(w, v, y, c0),
            5 => weighted_chunk::<T, 5>(w, v, y, c0),
            4 => weighted_chunk::<T, 4>(w, v, y, c0),
            3 => weighted_chunk::<T, 3>(w, v, y, c0),
            2 => weighted_chunk::<T, 2>(w, v, y, c0),
            _ => weighted_chunk::<T, 1>(w, v, y, c0),
        }
        c0 += 8 * chunks;
    }
    if c0 < d {
        for (j, &p) in w.iter().enumerate() {
            axpy_scalar(&mut y[c0..], p, &v[j * d + c0..(j + 1) * d]);
        }
    }
}

/// Lanes `c0..c0 + 8 * N` of [`weighted_sum_avx2`].
#[cfg(target_arch = "x86_64")]
/// # Safety
/// The CPU supports `avx2,fma,f16c` (the caller checked at run time). `v` holds `w.len()` rows of
/// `y.len()` elements and `c0 + 8 * N <= y.len()`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn weighted_chunk<T: Elem, const N: usize>(w: &[f32], v: &[T], y: &mut [f32], c0: usize) {
    use std::arch::x86_64::*;
    let d = y.len();
    let yp = y.as_mut_ptr().add(c0);
    let mut acc: [__m256; N] = std::array::from_fn(|c| _mm256_loadu_ps(yp.add(8 * c)));
    let vp = v.as_ptr().add(c0);
    for (j, &p) in w.iter().enumerate() {
        let wv = _mm256_set1_ps(p);
        let row = vp.add(j * d);
        for (c, a) in acc.iter_mut().enumerate() {
            *a = _mm256_fmadd_ps(wv, T::load8(row.add(8 * c)), *a);
        }
    }
    for (c, a) in acc.iter().enumerate() {
        _mm256_storeu_ps(yp.add(8 * c), *a);
    }
}

/// Scores of `Q` query rows against the same keys, one key at a time: the key's two 8-lane
/// loads serve every query, and each (query, key) dot runs the same two FMA chains and the
/// same reduction pairings as [`scores_avx2`], so results are identical. `out` holds `Q`
/// segments of `n` scores; `k` holds `n` rows of `d = q[0].len()` elements.
#[cfg(target_arch = "x86_64")]
/// # Safety
/// The CPU supports `avx2,fma,f16c` (the caller checked at run time). `k` holds `n` rows of
/// `q[0].len()` elements and `out` `Q` segments of `n`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn scores_multi_avx2<T: Elem, const Q: usize>(
    q: [&[f32]; Q],
    k: &[T],
    n: usize,
    scale: f32,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let d = q[0].len();
    debug_assert!(k.len() >= n * d && out.len() >= Q * n && Q <= 4);
    let kp = k.as_ptr();
    for j in 0..n {
        let row = kp.add(j * d);
        let mut s0 = [_mm256_setzero_ps(); Q];
        let mut s1 = [_mm256_setzero_ps(); Q];
        let mut i = 0;
        while i + 16 <= d {
            let (kl, kh) = (T::load8(row.add(i)), T::load8(row.add(i + 8)));
            for c in 0..Q {
                let qp = q[c].as_ptr().add(i);
                s0[c] = _mm256_fmadd_ps(_mm256_loadu_ps(qp), kl, s0[c]);
                s1[c] = _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(8)), kh, s1[c]);
            }
            i += 16;
        }
        if i + 8 <= d {
            let kl = T::load8(row.add(i));
            for c in 0..Q {
                s0[c] = _mm256_fmadd_ps(_mm256_loadu_ps(q[c].as_ptr().add(i)), kl, s0[c]);
            }
            i += 8;
        }
        let v: [__m256; 4] = std::array::from_fn(|c| {
            if c < Q {
                _mm256_add_ps(s0[c], s1[c])
            } else {
                _mm256_setzero_ps()
            }
        });
        let sums = hsum4(v);
        for (c, &sum) in sums.iter().enumerate().take(Q) {
            let mut s = sum;
            if i < d {
                s += (i..d).map(|e| q[c][e] * k[j * d + e].f32()).sum::<f32>();
            }
            out[c * n + j] = s * scale;
        }
    }
}

/// `y_c += sum_j w_c[j] * v_j` for `Q` weight rows over the same values (`w` holds `Q`
/// segments of `n`): each value load serves every row; per lane the same FMAs in the same
/// order as [`weighted_sum_avx2`].
#[cfg(target_arch = "x86_64")]
/// # Safety
/// The CPU supports `avx2,fma,f16c` (the caller checked at run time). `v` holds `n` rows of the
/// output rows' length, and the weights `Q` segments of `n`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn weighted_multi_avx2<T: Elem, const Q: usize, const N: usize>(
    w: &[f32],
    n: usize,
    v: &[T],
    y: [&mut [f32]; Q],
) {
    use std::arch::x86_64::*;
    let d = y[0].len();
    debug_assert!(v.len() >= n * d && w.len() >= Q * n);
    let yp: [*mut f32; Q] = std::array::from_fn(|c| y[c].as_ptr() as *mut f32);
    let vp = v.as_ptr();
    let mut c0 = 0;
    while c0 + 8 <= d {
        let chunks = ((d - c0) / 8).min(N);
        if chunks == N {
            let mut acc: [[__m256; N]; Q] = std::array::from_fn(|c| {
                std::array::from_fn(|l| _mm256_loadu_ps(yp[c].add(c0 + 8 * l)))
            });
            for j in 0..n {
                let row = vp.add(j * d + c0);
                let vv: [__m256; N] = std::array::from_fn(|l| T::load8(row.add(8 * l)));
                for (c, a) in acc.iter_mut().enumerate() {
                    let wv = _mm256_set1_ps(*w.get_unchecked(c * n + j));
                    for l in 0..N {
                        a[l] = _mm256_fmadd_ps(wv, vv[l], a[l]);
                    }
                }
            }
            for (c, a) in acc.iter().enumerate() {
                for (l, x) in a.iter().enumerate() {
                    _mm256_storeu_ps(yp[c].add(c0 + 8 * l), *x);
                }
            }
        } else {
            for c in 0..Q {
                let yc = std::slice::from_raw_parts_mut(yp[c], d);
                weighted_chunk::<T, 1>(&w[c * n..(c + 1) * n], v, yc, c0);
            }
            c0 += 8;
            continue;
        }
        c0 += 8 * N;
    }
    if c0 < d {
        for c in 0..Q {
            let yc = std::slice::from_raw_parts_mut(yp[c], d);
            for j in 0..n {
                axpy_scalar(&mut yc[c0..], w[c * n + j], &v[j * d + c0..(j + 1) * d]);
            }
        }
    }
}

/// A block of queries (rows x heads sharing one KV head) against the keys and values on
/// 512-bit vectors: each key is converted once for every query, each query's dot runs as one
/// 16-lane FMA chain whose halves are the two 8-lane chains of [`scores_avx2`], reduced four
/// queries at a time with its pairings; the values are then accumulated with each value row
/// loaded once for 4 queries, per lane in key order as in [`weighted_sum_avx2`]. So the
/// results equal the row-at-a-time path's bit for bit (decode uses that path: a conversation
/// read in pieces gives what it gives read at once). Query `c` (`qm[c * hd..]`, already
/// rounded when `round_f16`) sees keys `0..seen[c]` and writes `ys[c]` (zeroed by the caller).
/// `hd` is a multiple of 16, at most 256.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn attend_tile_avx512<T: Elem, const S: usize>(
    qm: &[f32],
    seen: &[usize],
    keys: &[T],
    vals: &[T],
    hd: usize,
    scale: f32,
    round_f16: bool,
    ys: &mut [&mut [f32]],
) {
    use std::arch::x86_64::*;
    let nq = seen.len();
    let n = seen.iter().copied().max().unwrap_or(0);
    let width = n.div_ceil(16) * 16;
    debug_assert!(keys.len() >= n * hd && vals.len() >= n * hd && hd.is_multiple_of(16));
    let mut sc = vec![0f32; nq * width];
    // S > 0: the head size is 16 S, known at compile time (loops unrolled).
    let hd = if S > 0 { 16 * S } else { hd };
    let steps = hd / 16;
    let mut kv = [_mm512_setzero_ps(); 16];
    for j in 0..n {
        let row = keys.as_ptr().add(j * hd);
        for (m, v) in kv.iter_mut().enumerate().take(steps) {
            *v = _mm512_insertf32x8::<1>(
                _mm512_castps256_ps512(T::load8(row.add(16 * m))),
                T::load8(row.add(16 * m + 8)),
            );
        }
        for q0 in (0..nq).step_by(4) {
            // Lanes 0..8 of a query's sum are the first chain of the row-at-a-time dot (the
            // low half of each 16-wide step), lanes 8..16 the second: the halves added and the
            // four queries reduced together give exactly its sums.
            let v: [__m256; 4] = std::array::from_fn(|c| {
                if q0 + c >= nq {
                    return _mm256_setzero_ps();
                }
                let qp = qm.as_ptr().add((q0 + c) * hd);
                let mut a = _mm512_setzero_ps();
                for (m, k) in kv.iter().enumerate().take(steps) {
                    a = _mm512_fmadd_ps(_mm512_loadu_ps(qp.add(16 * m)), *k, a);
                }
                _mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps::<1>(a))
            });
            for (c, &sum) in hsum4(v).iter().enumerate() {
                if q0 + c < nq {
                    sc[(q0 + c) * width + j] = sum * scale;
                }
            }
        }
    }
    let mut sums = vec![0f32; nq];
    for (c, sum) in sums.iter_mut().enumerate() {
        let row = &mut sc[c * width..(c + 1) * width];
        let (live, dead) = row.split_at_mut(seen[c]);
        let max = live.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        *sum = exp_shifted_avx2(live, max);
        if round_f16 {
            let inv = 1.0 / *sum;
            for p in live.iter_mut() {
                *p = f16::from_f32(*p * inv).to_f32();
            }
        }
        dead.fill(0.0);
    }
    for d0 in (0..hd).step_by(64) {
        let lanes = (hd - d0).min(64) / 16;
        for q0 in (0..nq).step_by(4) {
            let qn = (nq - q0).min(4);
            let mut acc = [[_mm512_setzero_ps(); 4]; 4];
            for j in 0..n {
                let row = vals.as_ptr().add(j * hd + d0);
                let mut vv = [_mm512_setzero_ps(); 4];
                for (l, v) in vv.iter_mut().enumerate().take(lanes) {
                    *v = _mm512_insertf32x8::<1>(
                        _mm512_castps256_ps512(T::load8(row.add(16 * l))),
                        T::load8(row.add(16 * l + 8)),
                    );
                }
                for (c, a) in acc.iter_mut().enumerate().take(qn) {
                    let p = _mm512_set1_ps(*sc.get_unchecked((q0 + c) * width + j));
                    for l in 0..lanes {
                        a[l] = _mm512_fmadd_ps(p, vv[l], a[l]);
                    }
                }
            }
            for (c, a) in acc.iter().enumerate().take(qn) {
                let y = &mut ys[q0 + c];
                for (l, v) in a.iter().enumerate().take(lanes) {
                    _mm512_storeu_ps(y.as_mut_ptr().add(d0 + 16 * l), *v);
                }
            }
        }
    }
    if !round_f16 {
        for (y, sum) in ys.iter_mut().zip(&sums) {
            let inv = 1.0 / sum;
            for o in y.iter_mut() {
                *o *= inv;
            }
        }
    }
}

/// `s = exp(s - max)` for every score; returns their sum.
fn exp_shifted(scores: &mut [f32], max: f32, simd: bool) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: avx2 and fma were detected at run time.
        return unsafe { exp_shifted_avx2(scores, max) };
    }
    let _ = simd;
    let mut sum = 0f32;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    sum
}

/// `exp(x)` on eight lanes, within 2 ulp of the exact value: `x = n ln2 + r` with `|r| <=
/// ln2/2` (ln2 split in two so that `r` is exact), a degree-7 polynomial for `exp(r)` and
/// `2^n` from the exponent bits. Below -87.3 (where the result would leave the normal range)
/// the result is 0; above 88 it is `exp(88)` (finite).
#[cfg(target_arch = "x86_64")]
/// # Safety
/// The CPU supports `avx2,fma` (the caller checked at run time).
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn exp8(x: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let live = _mm256_cmp_ps::<_CMP_GE_OQ>(x, _mm256_set1_ps(-87.3));
    let x = _mm256_min_ps(
        _mm256_max_ps(x, _mm256_set1_ps(-87.3)),
        _mm256_set1_ps(88.0),
    );
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        x,
        _mm256_set1_ps(std::f32::consts::LOG2_E),
    ));
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
    // Taylor coefficients 1/7! .. 1/2!, then r^2 p + r + 1.
    let mut p = _mm256_set1_ps(1.0 / 5040.0);
    for c in [1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    }
    let p = _mm256_fmadd_ps(
        p,
        _mm256_mul_ps(r, r),
        _mm256_add_ps(r, _mm256_set1_ps(1.0)),
    );
    let scale = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
        _mm256_cvtps_epi32(n),
        _mm256_set1_epi32(127),
    )));
    _mm256_and_ps(_mm256_mul_ps(p, scale), live)
}

#[cfg(target_arch = "x86_64")]
/// # Safety
/// The CPU supports `avx2,fma` (the caller checked at run time).
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_shifted_avx2(scores: &mut [f32], max: f32) -> f32 {
    use std::arch::x86_64::*;
    let m = _mm256_set1_ps(max);
    let mut acc = _mm256_setzero_ps();
    let mut chunks = scores.chunks_exact_mut(8);
    for c in &mut chunks {
        let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(c.as_ptr()), m));
        _mm256_storeu_ps(c.as_mut_ptr(), e);
        acc = _mm256_add_ps(acc, e);
    }
    let rest = chunks.into_remainder();
    if !rest.is_empty() {
        let mut buf = [f32::NEG_INFINITY; 8];
        buf[..rest.len()].copy_from_slice(rest);
        let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(buf.as_ptr()), m));
        _mm256_storeu_ps(buf.as_mut_ptr(), e);
        rest.copy_from_slice(&buf[..rest.len()]);
        acc = _mm256_add_ps(acc, e);
    }
    let s4 = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps::<1>(acc));
    let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps::<1>(s2, s2)))
}

/// The AVX2/FMA/F16C paths, exactly when the matmul kernels use theirs (the same detection
/// and the same `Kernel::Scalar` override).
fn simd() -> bool {
    crate::kernels::simd()
}

/// Causal attention of `q` `(1, heads, t, head_dim)` (rows at positions `start..start + t`)
/// over `k`, `v` `(1, kv_heads, start + t, head_dim)`; query head `h` reads KV head
/// `h / (heads / kv_heads)`. Returns `(1, t, heads * head_dim)`.
///
/// `round_f16` follows llama.cpp's arithmetic over an f16 cache: its matrix products with f16
/// keys and values convert the other operand to f16, so the query row is rounded to f16 before
/// its dot products with the keys, and the normalized attention weights are rounded to f16
/// before they weight the values. With keys and values rounded too (the caller does that),
/// greedy outputs stay with llama.cpp's where its margins are clear.
#[cfg(test)]
pub(crate) fn causal(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    start: usize,
    scale: f32,
    round_f16: bool,
) -> Result<Tensor> {
    let (_, nh, t, hd) = q.dims4()?;
    let (qs, q0, q_head) = head_view(q)?;
    let qs = match &*qs {
        Storage::Cpu(CpuStorage::F32(v)) => &v[q0..],
        _ => return Err(Error::InvalidArgument("attention: f32 queries only".into())),
    };
    let queries = Queries {
        data: qs,
        heads: nh,
        rows: t,
        head_dim: hd,
        head_stride: q_head,
        row_stride: hd,
    };
    let mut out = vec![0f32; t * nh * hd];
    causal_into(&queries, k, v, start, scale, round_f16, &mut out)?;
    Ok(Tensor::from_vec(out, (1, t, nh * hd), q.device())?)
}

/// Query rows for [`causal_into`]: head `h` of row `i` is
/// `data[h * head_stride + i * row_stride..][..head_dim]`.
pub(crate) struct Queries<'a> {
    pub data: &'a [f32],
    pub heads: usize,
    pub rows: usize,
    pub head_dim: usize,
    pub head_stride: usize,
    pub row_stride: usize,
}

impl Queries<'_> {
    fn at(&self, h: usize, i: usize) -> &[f32] {
        &self.data[h * self.head_stride + i * self.row_stride..][..self.head_dim]
    }
}

/// [`causal`] with the queries in any row/head layout, into `out` (`rows x heads * head_dim`,
/// row-major).
pub(crate) fn causal_into(
    q: &Queries<'_>,
    k: &Tensor,
    v: &Tensor,
    start: usize,
    scale: f32,
    round_f16: bool,
    out: &mut [f32],
) -> Result<()> {
    let (nh, t, hd) = (q.heads, q.rows, q.head_dim);
    let (_, nkv, total, hd_k) = k.dims4()?;
    if hd_k != hd
        || v.dims4()? != (1, nkv, total, hd)
        || total != start + t
        || nkv == 0
        || nh % nkv != 0
        || out.len() != t * nh * hd
    {
        return Err(Error::InvalidArgument(format!(
            "attention: {nh} query heads x {t} rows x {hd}, k {:?}, v {:?}, start {start}",
            k.dims(),
            v.dims()
        )));
    }
    let group = nh / nkv;
    let (ks, k0, k_head) = head_view(k)?;
    let (vs, v0, v_head) = head_view(v)?;
    let (ks, vs) = (Rows::of(&ks), Rows::of(&vs));
    let width = nh * hd;
    let out_ptr = out.as_mut_ptr() as usize;
    let simd = simd();
    let row_blocks = t.div_ceil(ROWS);
    // Prompt rows: the query heads that share a KV head (up to 4) run together, so each key
    // and value loaded serves all of them. Decode (one row) that does not take the tile below
    // keeps one head per item so that the heads spread over the threads.
    let per = if t > 1 { group.min(4) } else { 1 };
    let chunks = group.div_ceil(per);
    #[cfg(target_arch = "x86_64")]
    let same_storage = matches!(
        (ks, vs),
        (Rows::F16(_), Rows::F16(_)) | (Rows::F32(_), Rows::F32(_))
    );
    // The tile serves decode too once the context is long and there are at least as many KV
    // heads as threads to spread them over (each key converted once for the whole group of
    // query heads: +25-30% decode at 3000 positions on SmolLM2). With a short context the
    // heads spread one per item below (the same results either way, bit for bit).
    const LONG: usize = 512;
    let tile_rows = t > 1 || (total >= LONG && nkv >= crate::pool::pool().threads());
    if tile_rows
        && hd.is_multiple_of(16)
        && hd <= 256
        && simd
        && same_storage
        && crate::kernels::wide()
    {
        // All the query heads of a KV head, for a block of rows, as one tile.
        let tile = |item: usize| {
            let (kvh, rb) = (item / row_blocks, item % row_blocks);
            let heads = kvh * group..(kvh + 1) * group;
            let rows = rb * ROWS..t.min((rb + 1) * ROWS);
            let nq = rows.len() * group;
            let mut qm = vec![0f32; nq * hd];
            let mut seen = Vec::with_capacity(nq);
            let mut ys: Vec<&mut [f32]> = Vec::with_capacity(nq);
            for i in rows.clone() {
                for h in heads.clone() {
                    let c = seen.len();
                    let src = q.at(h, i);
                    let dst = &mut qm[c * hd..(c + 1) * hd];
                    if round_f16 {
                        for (d, v) in dst.iter_mut().zip(src) {
                            *d = half::f16::from_f32(*v).to_f32();
                        }
                    } else {
                        dst.copy_from_slice(src);
                    }
                    seen.push(start + i + 1);
                    // SAFETY: row i, columns of head h, are written by this item only.
                    ys.push(unsafe {
                        std::slice::from_raw_parts_mut(
                            (out_ptr as *mut f32).add(i * width + h * hd),
                            hd,
                        )
                    });
                }
            }
            let n = start + rows.end;
            // SAFETY: AVX-512 was detected at run time; the key and value rows `0..n` are in
            // bounds (sliced here) and `hd % 16 == 0`.
            unsafe {
                macro_rules! tile {
                    ($k:expr, $v:expr) => {{
                        let (k, v) = (&$k[..n * hd], &$v[..n * hd]);
                        match hd {
                            64 => attend_tile_avx512::<_, 4>(
                                &qm, &seen, k, v, hd, scale, round_f16, &mut ys,
                            ),
                            128 => attend_tile_avx512::<_, 8>(
                                &qm, &seen, k, v, hd, scale, round_f16, &mut ys,
                            ),
                            _ => attend_tile_avx512::<_, 0>(
                                &qm, &seen, k, v, hd, scale, round_f16, &mut ys,
                            ),
                        }
                    }};
                }
                match (ks.from(k0 + kvh * k_head), vs.from(v0 + kvh * v_head)) {
                    (Rows::F16(k), Rows::F16(v)) => tile!(k, v),
                    (Rows::F32(k), Rows::F32(v)) => tile!(k, v),
                    _ => {}
                }
            }
        };
        crate::pool::pool().run(nkv * row_blocks, &|r| r.for_each(tile));
        return Ok(());
    }
    let work = |item: usize| {
        let (hc, rb) = (item / row_blocks, item % row_blocks);
        let (kvh, c) = (hc / chunks, hc % chunks);
        let heads = kvh * group + c * per..kvh * group + ((c + 1) * per).min(group);
        let nq = heads.len();
        let keys = ks.from(k0 + kvh * k_head);
        let vals = vs.from(v0 + kvh * v_head);
        let mut scores = vec![0f32; nq * total];
        let mut qbuf = vec![0f32; nq * hd];
        for i in rb * ROWS..t.min((rb + 1) * ROWS) {
            for (c, h) in heads.clone().enumerate() {
                let src = q.at(h, i);
                let dst = &mut qbuf[c * hd..(c + 1) * hd];
                if round_f16 {
                    for (d, v) in dst.iter_mut().zip(src) {
                        *d = half::f16::from_f32(*v).to_f32();
                    }
                } else {
                    dst.copy_from_slice(src);
                }
            }
            let seen = start + i + 1;
            // No allocation per row (this runs for every head of every decoded token).
            let qrows: [&[f32]; 4] = std::array::from_fn(|c| &qbuf[c.min(nq - 1) * hd..][..hd]);
            keys.scores_multi(&qrows[..nq], scale, seen, &mut scores, simd);
            let mut sums = [0f32; 4];
            for (c, sum) in sums.iter_mut().enumerate().take(nq) {
                let sc = &mut scores[c * seen..(c + 1) * seen];
                let max = sc.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
                *sum = exp_shifted(sc, max, simd);
                if round_f16 {
                    let inv = 1.0 / *sum;
                    for p in sc.iter_mut() {
                        *p = half::f16::from_f32(*p * inv).to_f32();
                    }
                }
            }
            // SAFETY: row i, columns of these heads, are written by this item only (slots
            // past `nq` are empty).
            let mut ys: [&mut [f32]; 4] = std::array::from_fn(|c| unsafe {
                let len = if c < nq { hd } else { 0 };
                std::slice::from_raw_parts_mut(
                    (out_ptr as *mut f32).add(i * width + (heads.start + c.min(nq - 1)) * hd),
                    len,
                )
            });
            // The weighted sums accumulate into the output (which may hold old values).
            for y in ys.iter_mut().take(nq) {
                y.fill(0.0);
            }
            vals.weighted_multi(&scores[..nq * seen], seen, &mut ys[..nq], simd);
            if !round_f16 {
                for (y, sum) in ys.iter_mut().zip(sums).take(nq) {
                    let inv = 1.0 / sum;
                    for o in y.iter_mut() {
                        *o *= inv;
                    }
                }
            }
        }
    };
    crate::pool::pool().run(nkv * chunks * row_blocks, &|r| r.for_each(work));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, D};

    /// Test data in `[-2, 2]`.
    fn values(n: usize, seed: u32) -> Vec<f32> {
        crate::test_util::values(n, seed)
            .into_iter()
            .map(|v| 2.0 * v)
            .collect()
    }

    /// The tensor-op formulation: full scores, additive mask, softmax, matmul.
    fn reference(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        start: usize,
        scale: f64,
        round_f16: bool,
    ) -> Tensor {
        let f16 = |t: Tensor| {
            if round_f16 {
                t.to_dtype(candle_core::DType::F16)
                    .unwrap()
                    .to_dtype(candle_core::DType::F32)
                    .unwrap()
            } else {
                t
            }
        };
        let (_, nh, t, hd) = q.dims4().unwrap();
        let nkv = k.dim(1).unwrap();
        let total = start + t;
        let k = k.squeeze(0).unwrap().repeat_interleave_heads(nh / nkv);
        let v = v.squeeze(0).unwrap().repeat_interleave_heads(nh / nkv);
        let q = f16(q.squeeze(0).unwrap());
        let att = (q.matmul(&k.t().unwrap()).unwrap() * scale).unwrap();
        let mut mask = vec![0f32; t * total];
        for i in 0..t {
            for j in start + i + 1..total {
                mask[i * total + j] = f32::NEG_INFINITY;
            }
        }
        let mask = Tensor::from_vec(mask, (t, total), &Device::Cpu).unwrap();
        let att = att.broadcast_add(&mask).unwrap();
        let att = f16(candle_nn::ops::softmax(&att, D::Minus1).unwrap());
        att.matmul(&v)
            .unwrap()
            .transpose(0, 1)
            .unwrap()
            .reshape((1, t, nh * hd))
            .unwrap()
    }

    trait Heads {
        fn repeat_interleave_heads(&self, n: usize) -> Tensor;
    }
    impl Heads for Tensor {
        fn repeat_interleave_heads(&self, n: usize) -> Tensor {
            let (h, l, d) = self.dims3().unwrap();
            self.unsqueeze(1)
                .unwrap()
                .broadcast_as((h, n, l, d))
                .unwrap()
                .reshape((h * n, l, d))
                .unwrap()
                .contiguous()
                .unwrap()
        }
    }

    #[test]
    fn matches_the_tensor_formulation() {
        for (nh, nkv, hd, t, start) in [(6, 2, 16, 5, 0), (4, 4, 12, 1, 9), (9, 3, 64, 20, 7)] {
            let dev = Device::Cpu;
            let q = Tensor::from_vec(values(nh * t * hd, 3), (1, nh, t, hd), &dev).unwrap();
            // K/V as the cache holds them: a longer buffer, narrowed to the positions in use.
            let cap = start + t + 5;
            let k = Tensor::from_vec(values(nkv * cap * hd, 5), (1, nkv, cap, hd), &dev)
                .unwrap()
                .narrow(2, 0, start + t)
                .unwrap();
            let v = Tensor::from_vec(values(nkv * cap * hd, 7), (1, nkv, cap, hd), &dev)
                .unwrap()
                .narrow(2, 0, start + t)
                .unwrap();
            let scale = 1.0 / (hd as f64).sqrt();
            // Plain f32, and with llama.cpp's f16 roundings of the queries and the weights.
            for round in [false, true] {
                let got: Vec<f32> = causal(&q, &k, &v, start, scale as f32, round)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let want: Vec<f32> = reference(
                    &q,
                    &k.contiguous().unwrap(),
                    &v.contiguous().unwrap(),
                    start,
                    scale,
                    round,
                )
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
                let d = got
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(
                    d < 1e-5,
                    "{nh}/{nkv} heads, t {t}, start {start}, f16 {round}: max diff {d}"
                );
            }
        }
    }

    /// An f16 cache gives exactly what an f32 cache holding the same rounded values gives.
    #[test]
    fn f16_storage_equals_rounded_f32_storage() {
        // 72: the row-at-a-time path; 64: the 512-bit tile where the CPU has it.
        for hd in [72, 64] {
            f16_storage_case(hd);
        }
    }

    fn f16_storage_case(hd: usize) {
        use candle_core::DType;
        let dev = Device::Cpu;
        let (nh, nkv, t, start) = (6, 2, 9, 4);
        let q = Tensor::from_vec(values(nh * t * hd, 3), (1, nh, t, hd), &dev).unwrap();
        let kv = |seed| {
            Tensor::from_vec(
                values(nkv * (start + t) * hd, seed),
                (1, nkv, start + t, hd),
                &dev,
            )
            .unwrap()
            .to_dtype(DType::F16)
            .unwrap()
        };
        let (k16, v16) = (kv(5), kv(7));
        let (k32, v32) = (
            k16.to_dtype(DType::F32).unwrap(),
            v16.to_dtype(DType::F32).unwrap(),
        );
        for round in [false, true] {
            let a: Vec<f32> = causal(&q, &k16, &v16, start, 0.1, round)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let b: Vec<f32> = causal(&q, &k32, &v32, start, 0.1, round)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert_eq!(a, b);
        }
    }

    #[test]
    fn vector_exp_is_within_two_ulp() {
        let mut xs: Vec<f32> = (0..200_000).map(|i| -90.0 + i as f32 * 4.6e-4).collect();
        xs.extend([0.0, -0.0, -1e-30, -87.29, -87.31, -100.0, f32::NEG_INFINITY]);
        let mut got = xs.clone();
        let sum = exp_shifted(&mut got, 0.0, simd());
        let mut want_sum = 0f64;
        for (&x, &g) in xs.iter().zip(&got) {
            let want = (x as f64).exp();
            want_sum += want;
            if x < -87.3 {
                assert!(
                    g == 0.0 || (g as f64 - want).abs() < 1e-37,
                    "exp({x}) = {g}"
                );
                continue;
            }
            let ulp = f32::EPSILON as f64 * want;
            assert!(
                (g as f64 - want).abs() <= 2.0 * ulp,
                "exp({x}) = {g}, want {want}"
            );
        }
        assert!(((sum as f64) - want_sum).abs() < 1e-5 * want_sum);
    }

    /// Rows evaluated together (prompt) give exactly what they give one at a time (decode),
    /// so a conversation read in pieces gives what it gives read at once.
    #[test]
    fn a_block_of_rows_equals_the_rows_one_at_a_time() {
        use candle_core::DType;
        let dev = Device::Cpu;
        // Past 512 positions a decoded row takes the tile on AVX-512 (with as many KV heads
        // as threads): the same values as a block of rows still.
        for (hd, t, start) in [
            (64, 11, 3),
            (72, 11, 3),
            (96, 11, 3),
            (128, 11, 3),
            (64, 3, 600),
        ] {
            let nh = 6;
            let nkv = 2;
            let q = Tensor::from_vec(values(nh * t * hd, 13), (1, nh, t, hd), &dev).unwrap();
            let kv = |seed| {
                Tensor::from_vec(
                    values(nkv * (start + t) * hd, seed),
                    (1, nkv, start + t, hd),
                    &dev,
                )
                .unwrap()
                .to_dtype(DType::F16)
                .unwrap()
            };
            let (k, v) = (kv(15), kv(17));
            let all: Vec<f32> = causal(&q, &k, &v, start, 0.125, true)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            for i in 0..t {
                let qi = q.narrow(2, i, 1).unwrap().contiguous().unwrap();
                let n = start + i + 1;
                let (ki, vi) = (k.narrow(2, 0, n).unwrap(), v.narrow(2, 0, n).unwrap());
                let one: Vec<f32> = causal(&qi, &ki, &vi, start + i, 0.125, true)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                assert_eq!(
                    &all[i * nh * hd..(i + 1) * nh * hd],
                    &one[..],
                    "hd {hd} row {i}"
                );
            }
        }
    }

    #[test]
    fn rejects_mismatched_shapes() {
        let dev = Device::Cpu;
        let q = Tensor::zeros((1, 4, 2, 8), candle_core::DType::F32, &dev).unwrap();
        let k = Tensor::zeros((1, 3, 2, 8), candle_core::DType::F32, &dev).unwrap();
        assert!(causal(&q, &k, &k, 0, 1.0, false).is_err());
        let k = Tensor::zeros((1, 2, 3, 8), candle_core::DType::F32, &dev).unwrap();
        assert!(causal(&q, &k, &k, 0, 1.0, false).is_err());
    }
}
