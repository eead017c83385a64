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
    stream: bool,
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
        if stream {
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
    stream: bool,
) {
    // SAFETY: forwarded from the caller.
    unsafe {
        match fmt {
            BlockFmt::Q4_0 => group_avx512::<F_Q4_0, R, S>(w, x, nb, out, stream),
            BlockFmt::Q4_1 => group_avx512::<F_Q4_1, R, S>(w, x, nb, out, stream),
            BlockFmt::Q5_0 => group_avx512::<F_Q5_0, R, S>(w, x, nb, out, stream),
            BlockFmt::Q5_1 => group_avx512::<F_Q5_1, R, S>(w, x, nb, out, stream),
            BlockFmt::Q8_0 => group_avx512::<F_Q8_0, R, S>(w, x, nb, out, stream),
        }
    }
}

/// [`BlockMatrix::dequantize_grouped_row`] on 512-bit vectors (Q4_0, Q4_1, Q8_0), the same
/// arithmetic (`q * d + m`, a product then a sum): row `i` of a group of `gs` rows, `nb`
/// blocks, into `dst`. A block's quants of one row are its `bytes / 4` pieces of four bytes,
/// `gs * 4` bytes apart, gathered into one 128-bit vector per 16 quant bytes.
///
/// # Safety
/// The CPU supports `avx512f` (the caller checked at run time). `group` holds the group's `nb`
/// blocks of `gs` rows, `i < gs`, `dst` holds `nb * 32` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2")]
pub(crate) unsafe fn grouped_row_avx512(
    fmt: BlockFmt,
    group: &[u8],
    gs: usize,
    i: usize,
    dst: &mut [f32],
) {
    use std::arch::x86_64::*;
    let bytes = fmt.bytes();
    let nb = dst.len() / QK;
    assert!(
        i < gs && group.len() >= nb * gs * bytes && !has_qh(fmt),
        "grouped row bounds"
    );
    let qat = group_quants_at(fmt, gs);
    let has_min = fmt.has_min();
    let g = group.as_ptr();
    let o = dst.as_mut_ptr();
    // SAFETY: every read lies within block b of `group` (checked above: the block's quants end
    // at `gs * bytes`), every write within `dst`'s nb * 32 values.
    unsafe {
        let word = |at: *const u8| (at as *const i32).read_unaligned();
        // Four pieces of row i from `q` on (pieces `gs * 4` bytes apart).
        let four = |q: *const u8| {
            _mm_setr_epi32(
                word(q),
                word(q.add(gs * 4)),
                word(q.add(2 * gs * 4)),
                word(q.add(3 * gs * 4)),
            )
        };
        let low = _mm_set1_epi8(0x0F);
        let zero = _mm512_setzero_ps();
        let eight = _mm512_set1_epi32(8);
        for b in 0..nb {
            let gb = g.add(b * gs * bytes);
            let d = _mm512_set1_ps(f16_at(std::slice::from_raw_parts(gb.add(2 * i), 2), 0));
            let m = if has_min {
                _mm512_set1_ps(f16_at(
                    std::slice::from_raw_parts(gb.add(2 * gs + 2 * i), 2),
                    0,
                ))
            } else {
                zero
            };
            let q = gb.add(qat + i * 4);
            let out = o.add(b * QK);
            let put = |at: *mut f32, v: __m512i| {
                _mm512_storeu_ps(
                    at,
                    _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(v), d), m),
                )
            };
            match fmt {
                BlockFmt::Q8_0 => {
                    put(out, _mm512_cvtepi8_epi32(four(q)));
                    put(out.add(16), _mm512_cvtepi8_epi32(four(q.add(4 * gs * 4))));
                }
                _ => {
                    let v = four(q);
                    let mut lo = _mm512_cvtepu8_epi32(_mm_and_si128(v, low));
                    let mut hi = _mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(v, 4), low));
                    if fmt == BlockFmt::Q4_0 {
                        lo = _mm512_sub_epi32(lo, eight);
                        hi = _mm512_sub_epi32(hi, eight);
                    }
                    put(out, lo);
                    put(out.add(16), hi);
                }
            }
        }
    }
}

/// [`BlockMatrix::panel_t`] for one group of 16 rows: `blocks` (whole blocks of the group)
/// into `out[p * PANEL..][..16]`, one vector of the 16 rows per position, with the scalar
/// arithmetic (`q * d + m`, a product then a sum).
///
/// # Safety
/// The CPU supports `avx512f`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,f16c")]
pub(crate) unsafe fn group_panel_avx512(fmt: BlockFmt, blocks: &[u8], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let bytes = fmt.bytes();
    let gb = G16 * bytes;
    let nb = blocks.len() / gb;
    assert!(
        !has_qh(fmt)
            && blocks.len() == nb * gb
            && (nb == 0 || out.len() >= (nb * QK - 1) * PANEL + G16),
        "group panel bounds"
    );
    let qat = group_quants_at(fmt, G16);
    let (src, o) = (blocks.as_ptr(), out.as_mut_ptr());
    // SAFETY: every read lies within `blocks` (block b's bytes end at (b + 1) * gb), every
    // write within `out` (position < nb * 32, checked above).
    unsafe {
        let low = _mm512_set1_epi32(0x0F);
        let eight = _mm512_set1_epi32(8);
        let zero = _mm512_setzero_ps();
        for b in 0..nb {
            let p = src.add(b * gb);
            let d = _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i));
            let m = if fmt.has_min() {
                _mm512_cvtph_ps(_mm256_loadu_si256(p.add(2 * G16) as *const __m256i))
            } else {
                zero
            };
            let put = |pos: usize, q: __m512i| {
                let v = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(q), d), m);
                _mm512_storeu_ps(o.add((b * QK + pos) * PANEL), v);
            };
            let pieces = (bytes - head_bytes(fmt)) / 4;
            for j in 0..pieces {
                // Lane i: the piece's four quant bytes of row i.
                let v = _mm512_loadu_si512(p.add(qat + j * G16 * 4) as *const _);
                match fmt {
                    BlockFmt::Q8_0 => {
                        put(4 * j, _mm512_srai_epi32::<24>(_mm512_slli_epi32::<24>(v)));
                        put(
                            4 * j + 1,
                            _mm512_srai_epi32::<24>(_mm512_slli_epi32::<16>(v)),
                        );
                        put(
                            4 * j + 2,
                            _mm512_srai_epi32::<24>(_mm512_slli_epi32::<8>(v)),
                        );
                        put(4 * j + 3, _mm512_srai_epi32::<24>(v));
                    }
                    _ => {
                        let off = if fmt == BlockFmt::Q4_0 {
                            eight
                        } else {
                            _mm512_setzero_si512()
                        };
                        let nib = |q: __m512i| _mm512_sub_epi32(_mm512_and_si512(q, low), off);
                        put(4 * j, nib(v));
                        put(QK / 2 + 4 * j, nib(_mm512_srli_epi32::<4>(v)));
                        put(4 * j + 1, nib(_mm512_srli_epi32::<8>(v)));
                        put(QK / 2 + 4 * j + 1, nib(_mm512_srli_epi32::<12>(v)));
                        put(4 * j + 2, nib(_mm512_srli_epi32::<16>(v)));
                        put(QK / 2 + 4 * j + 2, nib(_mm512_srli_epi32::<20>(v)));
                        put(4 * j + 3, nib(_mm512_srli_epi32::<24>(v)));
                        put(QK / 2 + 4 * j + 3, nib(_mm512_srli_epi32::<28>(v)));
                    }
                }
            }
        }
    }
}
