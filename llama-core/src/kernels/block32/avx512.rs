//! 512-bit block-format kernels over groups of 16 rows (AVX-512 F/BW/VL/VNNI).

use super::*;

/// [`group_vnni`] on 512-bit vectors over groups of 16 rows: one 64-byte load holds the same
/// four elements of 16 rows, one `dpbusd` against a broadcast of four activation bytes sums
/// them for all 16 rows.
#[cfg(target_arch = "x86_64")]
/// # Safety
/// The CPU supports `avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c` (the caller checked at
/// run time). `w` starts a group of `nb` blocks of format `F` and every `x` a row of `nb` blocks.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub(crate) unsafe fn group_avx512<const F: u8, const R: usize, const S: usize>(
    w: *const u8,
    x: [*const XBlock; R],
    nb: usize,
    out: &mut [[f32; G16]; R],
) {
    use std::arch::x86_64::*;
    let fmt = const { fmt_of(F) };
    let gb = fmt.bytes() * G16;
    let qat = group_quants_at(fmt, G16);
    let qh_at = group_qh_at(fmt, G16);
    let mask = _mm512_set1_epi8(0x0F);
    let sixteen = _mm512_set1_epi8(16);
    let flip = _mm512_set1_epi8(-128);
    let spread: [__m512i; 4] = std::array::from_fn(|p| {
        let p = p as u32;
        // Within each 128-bit lane, bytes 4i..4i+4 take byte 4i + p.
        let word = |i: u32| ((4 * i + p) * 0x0101_0101) as i32;
        _mm512_broadcast_i32x4(_mm_setr_epi32(word(0), word(1), word(2), word(3)))
    });
    let bits_lo = _mm512_set1_epi32(0x0804_0201);
    let bits_hi = _mm512_set1_epi32(0x8040_2010u32 as i32);
    let mut acc = [_mm512_setzero_ps(); R];
    let mut corr = [_mm512_setzero_ps(); R];
    for b in 0..nb {
        let p = w.add(b * gb);
        if R == 1 {
            prefetch_ahead(p, gb);
        }
        let dw = _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i));
        let q = p.add(qat);
        let mut wv = [_mm512_setzero_si512(); 8];
        if fmt == BlockFmt::Q8_0 {
            for (j, v) in wv.iter_mut().enumerate() {
                *v = _mm512_xor_si512(_mm512_loadu_si512(q.add(64 * j) as *const _), flip);
            }
        } else {
            let qh = if has_qh(fmt) {
                _mm512_loadu_si512(p.add(qh_at) as *const _)
            } else {
                _mm512_setzero_si512()
            };
            for j in 0..4 {
                let raw = _mm512_loadu_si512(q.add(64 * j) as *const _);
                wv[j] = _mm512_and_si512(raw, mask);
                wv[j + 4] = _mm512_and_si512(_mm512_srli_epi16::<4>(raw), mask);
                if has_qh(fmt) {
                    let h = _mm512_shuffle_epi8(qh, spread[j]);
                    let lo = _mm512_test_epi8_mask(h, bits_lo);
                    let hi = _mm512_test_epi8_mask(h, bits_hi);
                    wv[j] = _mm512_mask_add_epi8(wv[j], lo, wv[j], sixteen);
                    wv[j + 4] = _mm512_mask_add_epi8(wv[j + 4], hi, wv[j + 4], sixteen);
                }
            }
        }
        let mw = if fmt.has_min() {
            _mm512_cvtph_ps(_mm256_loadu_si256(p.add(2 * G16) as *const __m256i))
        } else {
            _mm512_setzero_ps()
        };
        let mut isum = [[_mm512_setzero_si512(); R]; S];
        for (t, v) in wv.iter().enumerate() {
            for r in 0..R {
                let xq = (*x[r].add(b)).qs.as_ptr().add(4 * t) as *const i32;
                let y = _mm512_set1_epi32(xq.read_unaligned());
                isum[t % S][r] = _mm512_dpbusd_epi32(isum[t % S][r], *v, y);
            }
        }
        for r in 0..R {
            let xb = &*x[r].add(b);
            let mut i = isum[0][r];
            for set in isum.iter().skip(1) {
                i = _mm512_add_epi32(i, set[r]);
            }
            let off = match fmt {
                BlockFmt::Q4_0 => 8,
                BlockFmt::Q5_0 => 16,
                BlockFmt::Q8_0 => 128,
                _ => 0,
            };
            if off != 0 {
                i = _mm512_sub_epi32(i, _mm512_set1_epi32(off * xb.sum));
            }
            acc[r] = _mm512_fmadd_ps(
                _mm512_cvtepi32_ps(i),
                _mm512_mul_ps(dw, _mm512_set1_ps(xb.d)),
                acc[r],
            );
            if fmt.has_min() {
                corr[r] = _mm512_fmadd_ps(mw, _mm512_set1_ps(xb.s), corr[r]);
            }
        }
    }
    for r in 0..R {
        _mm512_storeu_ps(out[r].as_mut_ptr(), _mm512_add_ps(acc[r], corr[r]));
    }
}

/// [`group_avx512`] compiled for `fmt`.
///
/// # Safety
/// As [`group_kernel`], with AVX-512 F/BW/VL/VNNI.
#[cfg(target_arch = "x86_64")]
pub(crate) unsafe fn group_kernel16<const R: usize, const S: usize>(
    fmt: BlockFmt,
    w: *const u8,
    x: [*const XBlock; R],
    nb: usize,
    out: &mut [[f32; G16]; R],
) {
    // SAFETY: forwarded from the caller.
    unsafe {
        match fmt {
            BlockFmt::Q4_0 => group_avx512::<F_Q4_0, R, S>(w, x, nb, out),
            BlockFmt::Q4_1 => group_avx512::<F_Q4_1, R, S>(w, x, nb, out),
            BlockFmt::Q5_0 => group_avx512::<F_Q5_0, R, S>(w, x, nb, out),
            BlockFmt::Q5_1 => group_avx512::<F_Q5_1, R, S>(w, x, nb, out),
            BlockFmt::Q8_0 => group_avx512::<F_Q8_0, R, S>(w, x, nb, out),
        }
    }
}
