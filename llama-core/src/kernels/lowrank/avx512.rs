//! The low-rank update's 512-bit kernels (AVX-512F): panels of `B^T` columns and blocks of
//! `A` rows.

use super::*;

/// Whole panels (`out.len() / P` of them, `u.len()` rows of [`P`] each, one after another):
/// `out[l] = fma(p[j * P + l], u[j], out[l])` for `j` ascending, four panels at a time (four
/// independent chains).
///
/// # Safety
/// The CPU supports AVX-512F, AVX2, FMA and F16C; `p` holds `out.len() / P` panels of
/// `u.len()` rows of [`P`].
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub(super) unsafe fn panels_avx512<S: Src>(p: S, u: &[f32], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let (r, q) = (u.len(), out.len() / P);
    let (span, sspan) = (r * P, r / QG * P);
    let op = out.as_mut_ptr();
    let mut i = 0;
    while i + 4 <= q {
        let (e0, s0) = (i * span, i * sspan);
        let mut acc: [__m512; 4] = std::array::from_fn(|v| _mm512_loadu_ps(op.add((i + v) * P)));
        for (j, &uj) in u.iter().enumerate() {
            let b = _mm512_set1_ps(uj);
            let (e, s) = (e0 + j * P, s0 + j / QG * P);
            for (v, a) in acc.iter_mut().enumerate() {
                *a = _mm512_fmadd_ps(p.col16(e + v * span, s + v * sspan), b, *a);
            }
        }
        for (v, a) in acc.iter().enumerate() {
            _mm512_storeu_ps(op.add((i + v) * P), *a);
        }
        i += 4;
    }
    while i < q {
        let (e0, s0) = (i * span, i * sspan);
        let mut a = _mm512_loadu_ps(op.add(i * P));
        for (j, &uj) in u.iter().enumerate() {
            let x = p.col16(e0 + j * P, s0 + j / QG * P);
            a = _mm512_fmadd_ps(x, _mm512_set1_ps(uj), a);
        }
        _mm512_storeu_ps(op.add(i * P), a);
        i += 1;
    }
}

/// [`block_dots`] on 512-bit vectors: one stream through the block, its cache lines asked for
/// ahead (not past the matrix's end).
///
/// # Safety
/// The CPU supports AVX-512F, AVX2, FMA and F16C; `w` starts with a block of `rb <= RB` rows
/// of `x.len()`.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub(super) unsafe fn block_dots_avx512<S: Src>(w: S, rb: usize, x: &[f32], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let k = x.len();
    let k16 = k / LANES * LANES;
    let xp = x.as_ptr();
    let (wp, end) = (w.base(), w.base().wrapping_add(w.elems() * S::SIZE));
    w.prefetch_scales(0, rb * k / QG);
    let mut acc = [_mm512_setzero_ps(); RB];
    for c in 0..k16 / LANES {
        let xv = _mm512_loadu_ps(xp.add(c * LANES));
        let (e, s) = (c * rb * LANES, c * LANES / QG * rb);
        prefetch_within(wp.wrapping_add(e * S::SIZE), rb * LANES * S::SIZE, end);
        for (r, a) in acc.iter_mut().enumerate().take(rb) {
            *a = _mm512_fmadd_ps(w.row16(e + r * LANES, s + r), xv, *a);
        }
    }
    let tail = k - k16;
    for (r, a) in acc.iter().enumerate().take(rb) {
        let mut s = _mm512_reduce_add_ps(*a);
        for i in 0..tail {
            s += x[k16 + i] * w.val(k16 * rb + r * tail + i, 0);
        }
        out[r] = s;
    }
}
