//! 256-bit block-format kernels: activation quantization, the `maddubs` and VNNI tiles over
//! GGUF rows, and the 8-row group kernels (and the dispatch to the 16-row AVX-512 ones).

use super::*;

/// The same as [`quantize_row_scalar`] for one block, eight lanes at a time (the rounding,
/// nearest with ties to even, is the one ggml's x86 code uses too).
#[cfg(target_arch = "x86_64")]
/// # Safety
/// The CPU supports `avx2,fma,f16c` (the caller checked at run time). `xb` holds 32 values.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn quantize_block_avx2(xb: &[f32], ob: &mut XBlock) {
    use std::arch::x86_64::*;
    let p = xb.as_ptr();
    let v = [
        _mm256_loadu_ps(p),
        _mm256_loadu_ps(p.add(8)),
        _mm256_loadu_ps(p.add(16)),
        _mm256_loadu_ps(p.add(24)),
    ];
    let sign = _mm256_set1_ps(-0.0);
    let mut mx = _mm256_andnot_ps(sign, v[0]);
    for x in &v[1..] {
        mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, *x));
    }
    let m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps::<1>(mx));
    let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    let amax = _mm_cvtss_f32(_mm_max_ss(m2, _mm_shuffle_ps::<1>(m2, m2)));
    let id = _mm256_set1_ps(if amax != 0.0 { 127.0 / amax } else { 0.0 });
    let q: [__m256i; 4] = std::array::from_fn(|i| {
        _mm256_cvtps_epi32(_mm256_round_ps::<
            { _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC },
        >(_mm256_mul_ps(v[i], id)))
    });
    let s = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
    let s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256::<1>(s));
    let s2 = _mm_add_epi32(s4, _mm_shuffle_epi32::<0b01_00_11_10>(s4));
    let sum = _mm_cvtsi128_si32(_mm_add_epi32(s2, _mm_shuffle_epi32::<0b00_00_00_01>(s2)));
    // i32 -> i8 with the lane order restored after the in-lane packs.
    let p16a = _mm256_packs_epi32(q[0], q[1]);
    let p16b = _mm256_packs_epi32(q[2], q[3]);
    let p8 = _mm256_packs_epi16(p16a, p16b);
    let fixed = _mm256_permutevar8x32_epi32(p8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(ob.qs.as_mut_ptr() as *mut __m256i, fixed);
    let d = amax / 127.0;
    ob.d = f16::from_f32(d).to_f32();
    ob.s = f16::from_f32(d * sum as f32).to_f32();
    ob.sum = sum;
}

/// The SIMD tile kernels: `R` activation rows times `C` weight rows over `nb` blocks.
#[cfg(target_arch = "x86_64")]
macro_rules! simd_tile {
    ($name:ident, $features:literal, $vnni:expr) => {
        /// # Safety
        /// The CPU supports the features this instance is compiled for (the caller checked at run
        /// time). `w` points at `C` rows of `nb` blocks of `fmt` and every `x` at a row of `nb`
        /// activation blocks.
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn $name<const R: usize, const C: usize>(
            fmt: BlockFmt,
            w: [*const u8; C],
            x: [*const XBlock; R],
            nb: usize,
            out: &mut [[f32; C]; R],
        ) {
            use std::arch::x86_64::*;
            let bytes = fmt.bytes();
            let mask = _mm_set1_epi8(0x0F);
            let ones = _mm256_set1_epi16(1);
            let flip = _mm256_set1_epi8(-128);
            let eight = _mm256_set1_epi8(8);
            let sixteen = _mm256_set1_epi8(16);
            // Byte i of the result takes byte i / 8 of the 32-bit mask; `bit_select` has every
            // bit but bit i % 8 set, so a byte is all ones exactly when its bit was set.
            let bit_spread = _mm256_set_epi64x(
                0x0303030303030303,
                0x0202020202020202,
                0x0101010101010101,
                0x0000000000000000,
            );
            let bit_select = _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe);
            let mut acc = [[_mm256_setzero_ps(); C]; R];
            let mut corr = [[0f32; C]; R];
            for b in 0..nb {
                let mut wq = [_mm256_setzero_si256(); C];
                let mut dw = [0f32; C];
                let mut mw = [0f32; C];
                for c in 0..C {
                    let p = w[c].add(b * bytes);
                    match fmt {
                        BlockFmt::Q4_1 => {
                            let dm =
                                _mm_cvtph_ps(_mm_cvtsi32_si128((p as *const i32).read_unaligned()));
                            dw[c] = _mm_cvtss_f32(dm);
                            mw[c] = _mm_cvtss_f32(_mm_shuffle_ps::<1>(dm, dm));
                            let q = _mm_loadu_si128(p.add(4) as *const __m128i);
                            let lo = _mm_and_si128(q, mask);
                            let hi = _mm_and_si128(_mm_srli_epi16::<4>(q), mask);
                            wq[c] = _mm256_set_m128i(hi, lo);
                        }
                        BlockFmt::Q4_0 => {
                            dw[c] = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(
                                (p as *const u16).read_unaligned() as i32,
                            )));
                            let q = _mm_loadu_si128(p.add(2) as *const __m128i);
                            let lo = _mm_and_si128(q, mask);
                            let hi = _mm_and_si128(_mm_srli_epi16::<4>(q), mask);
                            let u = _mm256_set_m128i(hi, lo);
                            // VNNI: unsigned nibbles, offset removed exactly below; AVX2:
                            // signed values for the sign trick.
                            wq[c] = if $vnni { u } else { _mm256_sub_epi8(u, eight) };
                        }
                        BlockFmt::Q8_0 => {
                            dw[c] = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(
                                (p as *const u16).read_unaligned() as i32,
                            )));
                            let q = _mm256_loadu_si256(p.add(2) as *const __m256i);
                            wq[c] = if $vnni { _mm256_xor_si256(q, flip) } else { q };
                        }
                        BlockFmt::Q5_0 | BlockFmt::Q5_1 => {
                            let (qh_at, qs_at) = if fmt == BlockFmt::Q5_0 {
                                (2, 6)
                            } else {
                                (4, 8)
                            };
                            let dm =
                                _mm_cvtph_ps(_mm_cvtsi32_si128((p as *const i32).read_unaligned()));
                            dw[c] = _mm_cvtss_f32(dm);
                            mw[c] = _mm_cvtss_f32(_mm_shuffle_ps::<1>(dm, dm));
                            let q = _mm_loadu_si128(p.add(qs_at) as *const __m128i);
                            let lo = _mm_and_si128(q, mask);
                            let hi = _mm_and_si128(_mm_srli_epi16::<4>(q), mask);
                            // The fifth bits: bit j of qh becomes 0x10 in byte j.
                            let qh = (p.add(qh_at) as *const i32).read_unaligned();
                            let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(qh), bit_spread);
                            let set = _mm256_cmpeq_epi8(
                                _mm256_or_si256(bytes, bit_select),
                                _mm256_set1_epi64x(-1),
                            );
                            let u = _mm256_or_si256(
                                _mm256_set_m128i(hi, lo),
                                _mm256_and_si256(set, sixteen),
                            );
                            wq[c] = if $vnni || fmt == BlockFmt::Q5_1 {
                                u
                            } else {
                                _mm256_sub_epi8(u, sixteen)
                            };
                        }
                    }
                }
                for r in 0..R {
                    let xb = &*x[r].add(b);
                    let y = _mm256_loadu_si256(xb.qs.as_ptr() as *const __m256i);
                    // Exact integer offset terms (VNNI): sum(8 * y) for Q4_0, sum(128 * y) for Q8_0.
                    let yoff = match fmt {
                        BlockFmt::Q4_0 if $vnni => {
                            _mm256_dpbusd_epi32(_mm256_setzero_si256(), eight, y)
                        }
                        BlockFmt::Q8_0 if $vnni => {
                            _mm256_dpbusd_epi32(_mm256_setzero_si256(), flip, y)
                        }
                        BlockFmt::Q5_0 if $vnni => {
                            _mm256_dpbusd_epi32(_mm256_setzero_si256(), sixteen, y)
                        }
                        _ => _mm256_setzero_si256(),
                    };
                    for c in 0..C {
                        let p32 = if $vnni {
                            _mm256_sub_epi32(
                                _mm256_dpbusd_epi32(_mm256_setzero_si256(), wq[c], y),
                                yoff,
                            )
                        } else if !fmt.has_min() {
                            let aw = _mm256_sign_epi8(wq[c], wq[c]);
                            let sy = _mm256_sign_epi8(y, wq[c]);
                            _mm256_madd_epi16(_mm256_maddubs_epi16(aw, sy), ones)
                        } else {
                            _mm256_madd_epi16(_mm256_maddubs_epi16(wq[c], y), ones)
                        };
                        acc[r][c] = _mm256_fmadd_ps(
                            _mm256_set1_ps(dw[c] * xb.d),
                            _mm256_cvtepi32_ps(p32),
                            acc[r][c],
                        );
                        if fmt.has_min() {
                            corr[r][c] += mw[c] * xb.s;
                        }
                    }
                }
            }
            for r in 0..R {
                for c in 0..C {
                    let v = acc[r][c];
                    let s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
                    let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
                    let s1 = _mm_add_ss(s2, _mm_shuffle_ps::<1>(s2, s2));
                    out[r][c] = _mm_cvtss_f32(s1) + corr[r][c];
                }
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
simd_tile!(tile_avx2, "avx2,fma,f16c", false);
#[cfg(target_arch = "x86_64")]
simd_tile!(tile_vnni, "avx2,fma,f16c,avx512vnni,avx512vl", true);

/// The SIMD kernels over interleaved groups: `R` activation rows times the 8 rows of the group
/// starting at `w`, over `nb` blocks. Each row's integer sums run in `S` independent chains
/// (pieces `t % S`), so the `dpbusd` latency does not bound a small tile.
#[cfg(target_arch = "x86_64")]
macro_rules! simd_group {
    ($name:ident, $features:literal, $vnni:expr) => {
        /// # Safety
        /// The CPU supports the features this instance is compiled for (the caller checked at run
        /// time). `w` starts a group of `nb` blocks of format `F` and every `x` a row of `nb`
        /// blocks.
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn $name<const F: u8, const R: usize, const S: usize>(
            w: *const u8,
            x: [*const XBlock; R],
            nb: usize,
            out: &mut [[f32; G]; R],
            stream: bool,
        ) {
            use std::arch::x86_64::*;
            let fmt = const { fmt_of(F) };
            let gb = fmt.bytes() * G;
            let qat = group_quants_at(fmt, G);
            let qh_at = group_qh_at(fmt, G);
            let mask = _mm256_set1_epi8(0x0F);
            let eight = _mm256_set1_epi8(8);
            let sixteen = _mm256_set1_epi8(16);
            let flip = _mm256_set1_epi8(-128);
            let ones = _mm256_set1_epi16(1);
            // Fifth bits: byte p of each lane's word spread over the lane's four bytes, then
            // bit i (low nibbles) or bit 4 + i (high nibbles) of byte i tested.
            let spread: [__m256i; 4] = std::array::from_fn(|p| {
                let p = p as i8;
                let l = |o: i8| o + p;
                _mm256_setr_epi8(
                    l(0),
                    l(0),
                    l(0),
                    l(0),
                    l(4),
                    l(4),
                    l(4),
                    l(4),
                    l(8),
                    l(8),
                    l(8),
                    l(8),
                    l(12),
                    l(12),
                    l(12),
                    l(12),
                    l(0),
                    l(0),
                    l(0),
                    l(0),
                    l(4),
                    l(4),
                    l(4),
                    l(4),
                    l(8),
                    l(8),
                    l(8),
                    l(8),
                    l(12),
                    l(12),
                    l(12),
                    l(12),
                )
            });
            let bits_lo = _mm256_set1_epi32(0x0804_0201);
            let bits_hi = _mm256_set1_epi32(0x8040_2010u32 as i32);
            let mut acc = [_mm256_setzero_ps(); R];
            let mut corr = [_mm256_setzero_ps(); R];
            for b in 0..nb {
                let p = w.add(b * gb);
                if stream {
                    prefetch_ahead(p, gb);
                }
                let dw = _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i));
                let q = p.add(qat);
                let mut wv = [_mm256_setzero_si256(); 8];
                if fmt == BlockFmt::Q8_0 {
                    for (j, v) in wv.iter_mut().enumerate() {
                        let raw = _mm256_loadu_si256(q.add(32 * j) as *const __m256i);
                        // VNNI: unsigned `w + 128`, offset removed below; AVX2: signed.
                        *v = if $vnni {
                            _mm256_xor_si256(raw, flip)
                        } else {
                            raw
                        };
                    }
                } else {
                    let qh = if has_qh(fmt) {
                        _mm256_loadu_si256(p.add(qh_at) as *const __m256i)
                    } else {
                        _mm256_setzero_si256()
                    };
                    for j in 0..4 {
                        let raw = _mm256_loadu_si256(q.add(32 * j) as *const __m256i);
                        wv[j] = _mm256_and_si256(raw, mask);
                        wv[j + 4] = _mm256_and_si256(_mm256_srli_epi16::<4>(raw), mask);
                        if has_qh(fmt) {
                            let h = _mm256_shuffle_epi8(qh, spread[j]);
                            let lo = _mm256_cmpeq_epi8(_mm256_and_si256(h, bits_lo), bits_lo);
                            let hi = _mm256_cmpeq_epi8(_mm256_and_si256(h, bits_hi), bits_hi);
                            wv[j] = _mm256_or_si256(wv[j], _mm256_and_si256(lo, sixteen));
                            wv[j + 4] = _mm256_or_si256(wv[j + 4], _mm256_and_si256(hi, sixteen));
                        }
                    }
                    if !$vnni && !fmt.has_min() {
                        let off = if has_qh(fmt) { sixteen } else { eight };
                        for v in wv.iter_mut() {
                            *v = _mm256_sub_epi8(*v, off);
                        }
                    }
                }
                // Activation pieces: elements 4t..4t+4 pair with wv[t] (Q4/Q5: the low
                // nibbles of pieces 0..4 are elements 0..16, the high ones 16..32).
                let mut isum = [[_mm256_setzero_si256(); R]; S];
                for (t, v) in wv.iter().enumerate() {
                    for r in 0..R {
                        let xq = (*x[r].add(b)).qs.as_ptr().add(4 * t) as *const i32;
                        let y = _mm256_set1_epi32(xq.read_unaligned());
                        let a = isum[t % S][r];
                        isum[t % S][r] = if $vnni {
                            _mm256_dpbusd_epi32(a, *v, y)
                        } else if fmt.has_min() {
                            _mm256_add_epi32(
                                a,
                                _mm256_madd_epi16(_mm256_maddubs_epi16(*v, y), ones),
                            )
                        } else {
                            let aw = _mm256_sign_epi8(*v, *v);
                            let sy = _mm256_sign_epi8(y, *v);
                            _mm256_add_epi32(
                                a,
                                _mm256_madd_epi16(_mm256_maddubs_epi16(aw, sy), ones),
                            )
                        };
                    }
                }
                for r in 0..R {
                    let xb = &*x[r].add(b);
                    let mut i = isum[0][r];
                    for set in isum.iter().skip(1) {
                        i = _mm256_add_epi32(i, set[r]);
                    }
                    if $vnni {
                        let off = match fmt {
                            BlockFmt::Q4_0 => 8,
                            BlockFmt::Q5_0 => 16,
                            BlockFmt::Q8_0 => 128,
                            _ => 0,
                        };
                        if off != 0 {
                            i = _mm256_sub_epi32(i, _mm256_set1_epi32(off * xb.sum));
                        }
                    }
                    acc[r] = _mm256_fmadd_ps(
                        _mm256_cvtepi32_ps(i),
                        _mm256_mul_ps(dw, _mm256_set1_ps(xb.d)),
                        acc[r],
                    );
                    if fmt.has_min() {
                        let mw = _mm256_cvtph_ps(_mm_loadu_si128(p.add(2 * G) as *const __m128i));
                        corr[r] = _mm256_fmadd_ps(mw, _mm256_set1_ps(xb.s), corr[r]);
                    }
                }
            }
            for r in 0..R {
                _mm256_storeu_ps(out[r].as_mut_ptr(), _mm256_add_ps(acc[r], corr[r]));
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
simd_group!(group_avx2, "avx2,fma,f16c", false);
#[cfg(target_arch = "x86_64")]
simd_group!(group_vnni, "avx2,fma,f16c,avx512vnni,avx512vl", true);

/// One group tile through the kernel compiled for `fmt` and the ISA.
///
/// # Safety
/// The CPU has the ISA's features; `w` starts a group of `nb` blocks and every `x` a row of
/// `nb` blocks.
#[cfg(target_arch = "x86_64")]
pub(crate) unsafe fn group_kernel<const R: usize, const S: usize>(
    fmt: BlockFmt,
    vnni: bool,
    w: *const u8,
    x: [*const XBlock; R],
    nb: usize,
    out: &mut [[f32; G]; R],
    stream: bool,
) {
    macro_rules! go {
        ($f:expr) => {
            if vnni {
                group_vnni::<{ $f }, R, S>(w, x, nb, out, stream)
            } else {
                group_avx2::<{ $f }, R, S>(w, x, nb, out, stream)
            }
        };
    }
    // SAFETY: forwarded from the caller.
    unsafe {
        match fmt {
            BlockFmt::Q4_0 => go!(F_Q4_0),
            BlockFmt::Q4_1 => go!(F_Q4_1),
            BlockFmt::Q5_0 => go!(F_Q5_0),
            BlockFmt::Q5_1 => go!(F_Q5_1),
            BlockFmt::Q8_0 => go!(F_Q8_0),
        }
    }
}
