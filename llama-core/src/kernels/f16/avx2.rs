//! 256-bit f16 kernels (F16C conversion, FMA).

use super::*;

#[cfg(target_arch = "x86_64")]
/// # Safety
/// The CPU supports `avx2,fma,f16c` (the caller checked at run time). `w` holds at least
/// `x.len()` values.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot_f16_avx2(w: &[f16], x: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let k = x.len();
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 32 <= k {
        for (j, a) in acc.iter_mut().enumerate() {
            let wv = _mm256_cvtph_ps(_mm_loadu_si128(w.as_ptr().add(i + 8 * j) as *const __m128i));
            let xv = _mm256_loadu_ps(x.as_ptr().add(i + 8 * j));
            *a = _mm256_fmadd_ps(wv, xv, *a);
        }
        i += 32;
    }
    while i + 8 <= k {
        let wv = _mm256_cvtph_ps(_mm_loadu_si128(w.as_ptr().add(i) as *const __m128i));
        acc[0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x.as_ptr().add(i)), acc[0]);
        i += 8;
    }
    let v = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    let s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    let mut sum = _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps::<1>(s2, s2)));
    while i < k {
        sum += w[i].to_f32() * x[i];
        i += 1;
    }
    sum
}

/// `R` activation rows times one 16-row group (`w`: `k` positions of 16 values).
#[cfg(target_arch = "x86_64")]
/// # Safety
/// The CPU supports `avx2,fma,f16c` (the caller checked at run time). `w` holds `k` positions of
/// 16 values and every `x` a row of `k` values.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn f16_group_avx2<const R: usize, const SETS: usize>(
    w: *const f16,
    x: [*const f32; R],
    k: usize,
    out: &mut [[f32; FG]; R],
) {
    use std::arch::x86_64::*;
    // Positions go round `SETS` sets of accumulators (set `u` takes positions `i + u` of each
    // step; the tail goes to set 0), summed in set order at the end. One row alone has two
    // dependent FMA chains per position, so it runs [`ONE_ROW_SETS`] sets for the chains to
    // overlap; several rows overlap by themselves and run one set.
    let sets = SETS;
    let mut acc = [[[_mm256_setzero_ps(); 2]; R]; SETS];
    let mut i = 0;
    while i + sets <= k {
        if SETS > 1 {
            prefetch_ahead(w.add(i * FG) as *const u8, sets * FG * 2);
        }
        for (u, a) in acc.iter_mut().enumerate().take(sets) {
            let p = w.add((i + u) * FG);
            let w0 = _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i));
            let w1 = _mm256_cvtph_ps(_mm_loadu_si128(p.add(8) as *const __m128i));
            for r in 0..R {
                let xv = _mm256_set1_ps(*x[r].add(i + u));
                a[r][0] = _mm256_fmadd_ps(xv, w0, a[r][0]);
                a[r][1] = _mm256_fmadd_ps(xv, w1, a[r][1]);
            }
        }
        i += sets;
    }
    while i < k {
        let p = w.add(i * FG);
        let w0 = _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i));
        let w1 = _mm256_cvtph_ps(_mm_loadu_si128(p.add(8) as *const __m128i));
        for r in 0..R {
            let xv = _mm256_set1_ps(*x[r].add(i));
            acc[0][r][0] = _mm256_fmadd_ps(xv, w0, acc[0][r][0]);
            acc[0][r][1] = _mm256_fmadd_ps(xv, w1, acc[0][r][1]);
        }
        i += 1;
    }
    for r in 0..R {
        let mut lo = acc[0][r][0];
        let mut hi = acc[0][r][1];
        for a in acc.iter().take(sets).skip(1) {
            lo = _mm256_add_ps(lo, a[r][0]);
            hi = _mm256_add_ps(hi, a[r][1]);
        }
        _mm256_storeu_ps(out[r].as_mut_ptr(), lo);
        _mm256_storeu_ps(out[r].as_mut_ptr().add(8), hi);
    }
}
