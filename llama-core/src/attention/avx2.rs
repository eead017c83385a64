//! 256-bit attention kernels: scores, weighted sums (one query row or several sharing a KV
//! head) and the vectorized softmax exponent.

use super::*;
#[cfg(target_arch = "x86_64")]
use crate::kernels::simd::exp8;

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
pub(crate) unsafe fn scores_avx2<T: Elem>(q: &[f32], k: &[T], scale: f32, out: &mut [f32]) {
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
pub(crate) unsafe fn weighted_sum_avx2<T: Elem>(w: &[f32], v: &[T], y: &mut [f32]) {
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
pub(crate) unsafe fn weighted_chunk<T: Elem, const N: usize>(
    w: &[f32],
    v: &[T],
    y: &mut [f32],
    c0: usize,
) {
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
pub(crate) unsafe fn scores_multi_avx2<T: Elem, const Q: usize>(
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
pub(crate) unsafe fn weighted_multi_avx2<T: Elem, const Q: usize, const N: usize>(
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

#[cfg(target_arch = "x86_64")]
/// # Safety
/// The CPU supports `avx2,fma` (the caller checked at run time).
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn exp_shifted_avx2(scores: &mut [f32], max: f32) -> f32 {
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
