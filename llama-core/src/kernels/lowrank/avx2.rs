//! The low-rank update's 256-bit kernels (AVX2, FMA, F16C): panels of `B^T` columns, blocks
//! of `A` rows, and the f32 dot product training borrows.

use super::*;

/// [`panels_avx512`] on 256-bit vectors (each panel two halves), with the same arithmetic per
/// lane.
///
/// # Safety
/// The CPU supports AVX2, FMA and F16C; `p` holds `out.len() / P` panels of `u.len()` rows of
/// [`P`].
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn panels_avx2<S: Src>(p: S, u: &[f32], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let (r, q) = (u.len(), out.len() / P);
    let (span, sspan) = (r * P, r / QG * P);
    let op = out.as_mut_ptr();
    let mut i = 0;
    while i + 2 <= q {
        let (e0, s0) = (i * span, i * sspan);
        // Lanes of panel i (halves 0, 1) and panel i + 1 (halves 0, 1).
        let at = |v: usize| ((v / 2) * span + (v % 2) * 8, (v / 2) * sspan + (v % 2) * 8);
        let mut acc: [__m256; 4] =
            std::array::from_fn(|v| _mm256_loadu_ps(op.add(i * P + (v / 2) * P + (v % 2) * 8)));
        for (j, &uj) in u.iter().enumerate() {
            let b = _mm256_set1_ps(uj);
            let (e, s) = (e0 + j * P, s0 + j / QG * P);
            for (v, a) in acc.iter_mut().enumerate() {
                let (de, ds) = at(v);
                *a = _mm256_fmadd_ps(p.col8(e + de, s + ds), b, *a);
            }
        }
        for (v, a) in acc.iter().enumerate() {
            _mm256_storeu_ps(op.add(i * P + (v / 2) * P + (v % 2) * 8), *a);
        }
        i += 2;
    }
    if i < q {
        let (e0, s0) = (i * span, i * sspan);
        let mut acc = [
            _mm256_loadu_ps(op.add(i * P)),
            _mm256_loadu_ps(op.add(i * P + 8)),
        ];
        for (j, &uj) in u.iter().enumerate() {
            let b = _mm256_set1_ps(uj);
            let (e, s) = (e0 + j * P, s0 + j / QG * P);
            for (h, a) in acc.iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(p.col8(e + h * 8, s + h * 8), b, *a);
            }
        }
        _mm256_storeu_ps(op.add(i * P), acc[0]);
        _mm256_storeu_ps(op.add(i * P + 8), acc[1]);
    }
}

/// Half a panel, lanes `at..at + 8`, with the arithmetic of [`panels_avx512`].
///
/// # Safety
/// The CPU supports AVX2, FMA and F16C; `p` holds `u.len()` rows of [`P`], `at + 8 <= P`, `out`
/// 8 values.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn panel8_avx2<S: Src>(p: S, u: &[f32], at: usize, out: &mut [f32]) {
    use std::arch::x86_64::*;
    let mut acc = _mm256_loadu_ps(out.as_ptr());
    for (j, &uj) in u.iter().enumerate() {
        let x = p.col8(at + j * P, j / QG * P + at);
        acc = _mm256_fmadd_ps(x, _mm256_set1_ps(uj), acc);
    }
    _mm256_storeu_ps(out.as_mut_ptr(), acc);
}

/// [`block_dots_avx512`] on 256-bit vectors (each chunk two halves, summed as the 512-bit
/// reduction does), with the same results.
///
/// # Safety
/// The CPU supports AVX2, FMA and F16C; `w` starts with a block of `rb <= RB` rows of
/// `x.len()`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn block_dots_avx2<S: Src>(w: S, rb: usize, x: &[f32], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let k = x.len();
    let k16 = k / LANES * LANES;
    let xp = x.as_ptr();
    let (wp, end) = (w.base(), w.base().wrapping_add(w.elems() * S::SIZE));
    w.prefetch_scales(0, rb * k / QG);
    let mut acc = [[_mm256_setzero_ps(); 2]; RB];
    for c in 0..k16 / LANES {
        let xv = [
            _mm256_loadu_ps(xp.add(c * LANES)),
            _mm256_loadu_ps(xp.add(c * LANES + 8)),
        ];
        let (e, s) = (c * rb * LANES, c * LANES / QG * rb);
        prefetch_within(wp.wrapping_add(e * S::SIZE), rb * LANES * S::SIZE, end);
        for (r, a) in acc.iter_mut().enumerate().take(rb) {
            for h in 0..2 {
                a[h] = _mm256_fmadd_ps(w.row8(e + r * LANES + 8 * h, s + r), xv[h], a[h]);
            }
        }
    }
    let tail = k - k16;
    for (r, a) in acc.iter().enumerate().take(rb) {
        // Lanes l + l+8, then l + l+4, then l + l+2, then 0 + 1: `_mm512_reduce_add_ps`.
        let v = _mm256_add_ps(a[0], a[1]);
        let v = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let v = _mm_add_ps(v, _mm_shuffle_ps::<0b01_00_11_10>(v, v));
        let mut s = _mm_cvtss_f32(v) + _mm_cvtss_f32(_mm_shuffle_ps::<1>(v, v));
        for i in 0..tail {
            s += x[k16 + i] * w.val(k16 * rb + r * tail + i, 0);
        }
        out[r] = s;
    }
}

/// # Safety
/// The CPU supports AVX2, FMA and F16C; `w` is at least as long as `x`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dot_avx2<T: Elem>(x: &[f32], w: &[T]) -> f32 {
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
