//! 512-bit f16 kernels: one vector per position of a 16-row group, and the f32 group pairs.

use super::*;

/// [`f16_group_avx2`] on 512-bit vectors: one vector holds a position of all 16 rows of the
/// group, so a tile of `R` activation rows needs `R` accumulators per position set (`SETS`).
/// Per output lane the same FMAs in the same order for the same `SETS`, so both give identical
/// results.
#[cfg(target_arch = "x86_64")]
/// # Safety
/// The CPU supports `avx512f,avx2,fma,f16c` (the caller checked at run time). `w` holds `k`
/// positions of 16 values and every `x` a row of `k` values.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub(crate) unsafe fn f16_group_avx512<const R: usize, const SETS: usize>(
    w: *const f16,
    x: [*const f32; R],
    k: usize,
    out: &mut [[f32; FG]; R],
) {
    use std::arch::x86_64::*;
    let sets = SETS;
    let mut acc = [[_mm512_setzero_ps(); R]; SETS];
    let mut i = 0;
    while i + sets <= k {
        if SETS > 1 {
            prefetch_ahead(w.add(i * FG) as *const u8, sets * FG * 2);
        }
        for (u, a) in acc.iter_mut().enumerate().take(sets) {
            let wv = _mm512_cvtph_ps(_mm256_loadu_si256(w.add((i + u) * FG) as *const __m256i));
            for r in 0..R {
                a[r] = _mm512_fmadd_ps(_mm512_set1_ps(*x[r].add(i + u)), wv, a[r]);
            }
        }
        i += sets;
    }
    while i < k {
        let wv = _mm512_cvtph_ps(_mm256_loadu_si256(w.add(i * FG) as *const __m256i));
        for r in 0..R {
            acc[0][r] = _mm512_fmadd_ps(_mm512_set1_ps(*x[r].add(i)), wv, acc[0][r]);
        }
        i += 1;
    }
    for r in 0..R {
        let mut v = acc[0][r];
        for a in acc.iter().take(sets).skip(1) {
            v = _mm512_add_ps(v, a[r]);
        }
        _mm512_storeu_ps(out[r].as_mut_ptr(), v);
    }
}

/// `len` (a multiple of 16) f16 values from `src` as f32 into `dst`.
#[cfg(target_arch = "x86_64")]
/// # Safety
/// The CPU supports `avx512f,f16c` (the caller checked at run time). `src` is readable and `dst`
/// writable for `len` values.
#[target_feature(enable = "avx512f,f16c")]
pub(crate) unsafe fn f16_to_f32_avx512(src: *const f16, dst: *mut f32, len: usize) {
    use std::arch::x86_64::*;
    for i in (0..len).step_by(FG) {
        _mm512_storeu_ps(
            dst.add(i),
            _mm512_cvtph_ps(_mm256_loadu_si256(src.add(i) as *const __m256i)),
        );
    }
}

/// Two adjacent 16-row groups of f32 weights (`w` and `w + 16 k`, converted from f16 once
/// per tile of rows) times `R` activation rows. Per output lane the same FMAs in the same order
/// as the f16 tiles, so the same results.
#[cfg(target_arch = "x86_64")]
/// # Safety
/// The CPU supports `avx512f,fma` (the caller checked at run time). the pointers hold the
/// positions of the two groups and every activation row the caller passes.
#[target_feature(enable = "avx512f,fma")]
pub(crate) unsafe fn f32_group2_avx512<const R: usize>(
    w: *const f32,
    x: [*const f32; R],
    k: usize,
    out: &mut [[f32; 2 * FG]; R],
) {
    use std::arch::x86_64::*;
    let w1 = w.add(FG * k);
    let mut a0 = [_mm512_setzero_ps(); R];
    let mut a1 = [_mm512_setzero_ps(); R];
    for i in 0..k {
        let v0 = _mm512_loadu_ps(w.add(i * FG));
        let v1 = _mm512_loadu_ps(w1.add(i * FG));
        for r in 0..R {
            let xv = _mm512_set1_ps(*x[r].add(i));
            a0[r] = _mm512_fmadd_ps(xv, v0, a0[r]);
            a1[r] = _mm512_fmadd_ps(xv, v1, a1[r]);
        }
    }
    for r in 0..R {
        _mm512_storeu_ps(out[r].as_mut_ptr(), a0[r]);
        _mm512_storeu_ps(out[r].as_mut_ptr().add(FG), a1[r]);
    }
}

thread_local! {
    /// Per-thread f32 copy of the weight groups a prompt tile works on.
    pub(crate) static F32_SCRATCH: std::cell::RefCell<((usize, usize), Vec<f32>)> = const { std::cell::RefCell::new(((0, 0), Vec::new())) };
}

/// One interleaved group (`k` positions of [`FG`] rows' values, `[k][FG]`) as `FG` rows of f32,
/// row `i` at `dst + i * stride`: 16 positions at a time converted and transposed in registers
/// ([`crate::kernels::simd::transpose16`]), the last `k % 16` positions one by one.
#[cfg(target_arch = "x86_64")]
/// # Safety
/// The CPU supports `avx512f,f16c` (the caller checked at run time). `src` holds `k * FG`
/// values; `dst` is writable for `FG` rows of `k` values `stride` apart.
#[target_feature(enable = "avx512f,avx2,f16c")]
pub(crate) unsafe fn group_rows_avx512(src: *const f16, k: usize, dst: *mut f32, stride: usize) {
    use std::arch::x86_64::*;
    let mut p0 = 0;
    while p0 + 16 <= k {
        // v[j]: the 16 rows' values at position p0 + j.
        let v: [__m512; 16] = std::array::from_fn(|j| {
            _mm512_cvtph_ps(_mm256_loadu_si256(src.add((p0 + j) * FG) as *const __m256i))
        });
        // Row i: positions p0..p0 + 16.
        for (i, row) in crate::kernels::simd::transpose16(v).iter().enumerate() {
            _mm512_storeu_ps(dst.add(i * stride + p0), *row);
        }
        p0 += 16;
    }
    while p0 < k {
        for i in 0..FG {
            *dst.add(i * stride + p0) = (*src.add(p0 * FG + i)).to_f32();
        }
        p0 += 1;
    }
}

/// [`F16Matrix::panel_t`] for one group: `len` positions of 16 values from `src` converted to
/// `out[p * PANEL..][..16]`.
///
/// # Safety
/// The CPU supports `avx512f,f16c`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,f16c")]
pub(crate) unsafe fn panel_avx512(src: &[f16], out: &mut [f32], len: usize) {
    use std::arch::x86_64::*;
    assert!(src.len() >= len * FG && (len == 0 || out.len() >= (len - 1) * PANEL + FG));
    let (s, o) = (src.as_ptr(), out.as_mut_ptr());
    for p in 0..len {
        // SAFETY: within both slices (checked above).
        unsafe {
            let v = _mm512_cvtph_ps(_mm256_loadu_si256(s.add(p * FG) as *const __m256i));
            _mm512_storeu_ps(o.add(p * PANEL), v);
        }
    }
}
