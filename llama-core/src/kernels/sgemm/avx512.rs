//! The GEMM's 512-bit kernels (AVX-512F): the register tile and the panel transpose.

use super::*;

/// `out[p * ostride + j] = src[j * sstride + p]` for `j < rows <= 16`, `p < len`, zero for
/// `rows <= j < width` (`width <= 16` values written per position): 16 x 16 blocks transposed
/// in registers ([`crate::kernels::simd::transpose16`]).
///
/// # Safety
/// AVX-512F is present; `src` holds `rows` rows of `len` values `sstride` apart; `out` is
/// writable for `len` positions of `width` values `ostride` apart.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn transpose_avx512(
    src: *const f32,
    (sstride, rows): (usize, usize),
    len: usize,
    out: *mut f32,
    (ostride, width): (usize, usize),
) {
    use std::arch::x86_64::*;
    let wmask = ((1u32 << width) - 1) as __mmask16;
    let mut p = 0;
    // SAFETY: the caller's contract; loads past `len` and stores past `width` are masked.
    unsafe {
        while p < len {
            let n = 16.min(len - p);
            let lm = ((1u32 << n) - 1) as __mmask16;
            let r: [__m512; 16] = std::array::from_fn(|j| {
                if j < rows {
                    _mm512_maskz_loadu_ps(lm, src.add(j * sstride + p))
                } else {
                    _mm512_setzero_ps()
                }
            });
            for (q, col) in crate::kernels::simd::transpose16(r)
                .iter()
                .enumerate()
                .take(n)
            {
                _mm512_mask_storeu_ps(out.add((p + q) * ostride), wmask, *col);
            }
            p += 16;
        }
    }
}

/// One register tile: `c[i * rs_c + j] = (load ? c : 0) + beta * sum_p a[p * MR + i] b[p * NR
/// + j]` for `i < rows`, `j < cols` (masked loads and stores past them).
///
/// # Safety
/// AVX-512F and FMA are present; `a` holds `kb * MR` values, `b` `kb * NR`; the `rows x cols`
/// values of `c` at `i * rs_c + j` are valid for reads and writes.
#[target_feature(enable = "avx512f,fma")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn tile_avx512(
    kb: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    rs_c: usize,
    (rows, cols): (usize, usize),
    load: bool,
    beta: f32,
) {
    use std::arch::x86_64::*;
    // SAFETY: the caller's contract.
    unsafe {
        let mut acc = [_mm512_setzero_ps(); 2 * MR];
        for p in 0..kb {
            let b0 = _mm512_loadu_ps(b.add(p * NR));
            let b1 = _mm512_loadu_ps(b.add(p * NR + 16));
            let ap = a.add(p * MR);
            for i in 0..MR {
                let ai = _mm512_set1_ps(*ap.add(i));
                acc[2 * i] = _mm512_fmadd_ps(ai, b0, acc[2 * i]);
                acc[2 * i + 1] = _mm512_fmadd_ps(ai, b1, acc[2 * i + 1]);
            }
        }
        let bv = _mm512_set1_ps(beta);
        let lanes = |n: usize| -> __mmask16 { ((1u32 << n.min(16)) - 1) as __mmask16 };
        let masks = [lanes(cols), lanes(cols.saturating_sub(16))];
        for i in 0..MR {
            if i < rows {
                let row = c.add(i * rs_c);
                for h in 0..2 {
                    let at = row.wrapping_add(16 * h);
                    let v = if load {
                        _mm512_fmadd_ps(acc[2 * i + h], bv, _mm512_maskz_loadu_ps(masks[h], at))
                    } else {
                        _mm512_mul_ps(acc[2 * i + h], bv)
                    };
                    _mm512_mask_storeu_ps(at, masks[h], v);
                }
            }
        }
    }
}
