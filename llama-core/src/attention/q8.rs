//! Scores against q8_0 keys in integers, as llama.cpp computes them: each query row is
//! quantized to q8_0 blocks (its `vec_dot_type` for q8_0 keys), each block's dot product is an
//! exact integer, and the score is
//! `((dk_0 dq_0) I_0 + (dk_1 dq_1) I_1 + ...) * scale` in block order, each term rounded once
//! (`dk dq` is exact: two f16 values), the sums left to right from zero. The integers are exact
//! whatever adds them, so every path (512-bit VNNI, 256-bit, scalar; a tile of prompt rows or
//! one decoded row) gives the same bits with one float formula.

use crate::kv_cache::{Q8Block, QB};

/// Query rows quantized into `out` (`hd / 32` blocks per row, rows in order).
pub(crate) fn quantize_queries(qm: &[f32], out: &mut Vec<Q8Block>) {
    out.clear();
    out.extend(qm.chunks_exact(QB).map(Q8Block::quantize));
}

/// The exact dot product of two blocks' integers.
#[inline]
pub(crate) fn block_dot(k: &Q8Block, q: &Q8Block, simd: bool) -> i32 {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: avx2 was detected at run time (the SIMD paths need it).
        return unsafe { block_dot_avx2(k, q) };
    }
    let _ = simd;
    k.qs.iter()
        .zip(&q.qs)
        .map(|(&a, &b)| a as i32 * b as i32)
        .sum()
}

/// [`block_dot`] on 256-bit vectors: `|k| * (q with k's signs)` in pairs of 16-bit sums (at
/// most 2 * 127 * 127, no saturation), then 32-bit sums.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn block_dot_avx2(k: &Q8Block, q: &Q8Block) -> i32 {
    use std::arch::x86_64::*;
    let kv = _mm256_loadu_si256(k.qs.as_ptr() as *const __m256i);
    let qv = _mm256_loadu_si256(q.qs.as_ptr() as *const __m256i);
    let p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(kv, kv), _mm256_sign_epi8(qv, kv));
    let p32 = _mm256_madd_epi16(p16, _mm256_set1_epi16(1));
    let s4 = _mm_add_epi32(
        _mm256_castsi256_si128(p32),
        _mm256_extracti128_si256::<1>(p32),
    );
    let s2 = _mm_add_epi32(s4, _mm_shuffle_epi32::<0b01_00_11_10>(s4));
    let s1 = _mm_add_epi32(s2, _mm_shuffle_epi32::<0b10_11_00_01>(s2));
    _mm_cvtsi128_si32(s1)
}

/// One key row's score for one quantized query row (the formula of the module's note).
#[inline]
pub(crate) fn score(k: &[Q8Block], q: &[Q8Block], scale: f32, simd: bool) -> f32 {
    let mut s = 0f32;
    for (kb, qb) in k.iter().zip(q) {
        s += (kb.d.to_f32() * qb.d.to_f32()) * block_dot(kb, qb, simd) as f32;
    }
    s * scale
}

/// Scores of `nq` quantized query rows (`qq`, `nb` blocks each) against q8_0 key rows `0..n`
/// (`kb`, `nb` blocks each), query `c`'s into `sc[c * width..][..n]` (`stream`: prefetch the keys,
/// read once, as decode does): four queries and four keys at a time, each key's bytes (made
/// unsigned by adding 128, taken back out with the query block's sum) against each query in
/// one VNNI instruction per pair of blocks, the sixteen products' lanes summed by one
/// transposing tree (integers: any order is exact).
///
/// # Safety
/// AVX-512F/BW/VNNI are available; `kb` holds `n * nb` blocks, `qq` `nq * nb`, `sc` `nq *
/// width` with `width >= n`; `nb <= 8`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn scores_avx512(
    kb: &[Q8Block],
    nb: usize,
    qq: &[Q8Block],
    nq: usize,
    n: usize,
    scale: f32,
    sc: &mut [f32],
    width: usize,
    stream: bool,
) {
    debug_assert!(kb.len() >= n * nb && qq.len() >= nq * nb && sc.len() >= nq * width);
    match nb.div_ceil(2) {
        1 => scores_pairs::<1>(kb, nb, qq, nq, n, scale, sc, width, stream),
        2 => scores_pairs::<2>(kb, nb, qq, nq, n, scale, sc, width, stream),
        3 => scores_pairs::<3>(kb, nb, qq, nq, n, scale, sc, width, stream),
        _ => scores_pairs::<4>(kb, nb, qq, nq, n, scale, sc, width, stream),
    }
}

/// The 64 bytes of blocks `2 p` and `2 p + 1` of a row (zero past the row's `nb` blocks).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2")]
#[inline]
unsafe fn pair_bytes(row: *const Q8Block, nb: usize, p: usize) -> std::arch::x86_64::__m512i {
    use std::arch::x86_64::*;
    let lo = _mm256_loadu_si256((*row.add(2 * p)).qs.as_ptr() as *const __m256i);
    let hi = if 2 * p + 1 < nb {
        _mm256_loadu_si256((*row.add(2 * p + 1)).qs.as_ptr() as *const __m256i)
    } else {
        _mm256_setzero_si256()
    };
    _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi)
}

/// [`scores_avx512`] for `P` pairs of blocks per row.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn scores_pairs<const P: usize>(
    kb: &[Q8Block],
    nb: usize,
    qq: &[Q8Block],
    nq: usize,
    n: usize,
    scale: f32,
    sc: &mut [f32],
    width: usize,
    stream: bool,
) {
    use std::arch::x86_64::*;
    let zero = Q8Block::default();
    let flip = _mm512_set1_epi8(-128);
    let quads = n / 4;
    let kp = kb.as_ptr();
    for q0 in (0..nq).step_by(4) {
        let qn = (nq - q0).min(4);
        // Per pair of blocks: the four queries' bytes (zero past `qn`), 128 times their block
        // sums and their scales with lane 4 c + kk holding query c's (for the first and the
        // second block of the pair).
        let mut qv = [[_mm512_setzero_si512(); 4]; P];
        let mut corr = [[_mm512_setzero_si512(); 2]; P];
        let mut qd = [[_mm512_setzero_ps(); 2]; P];
        for p in 0..P {
            let mut sums = [[0i32; 16]; 2];
            let mut ds = [[0f32; 16]; 2];
            for c in 0..qn {
                let r = &qq[(q0 + c) * nb..(q0 + c + 1) * nb];
                if 2 * p < nb {
                    qv[p][c] = pair_bytes(r.as_ptr(), nb, p);
                }
                for h in 0..2 {
                    let b = r.get(2 * p + h).unwrap_or(&zero);
                    let s: i32 = b.qs.iter().map(|&x| x as i32).sum();
                    sums[h][4 * c..4 * c + 4].fill(128 * s);
                    ds[h][4 * c..4 * c + 4].fill(b.d.to_f32());
                }
            }
            for h in 0..2 {
                corr[p][h] = _mm512_loadu_si512(sums[h].as_ptr() as *const _);
                qd[p][h] = _mm512_loadu_ps(ds[h].as_ptr());
            }
        }
        for j4 in 0..quads {
            let rows: [*const Q8Block; 4] = [
                kp.add(4 * j4 * nb),
                kp.add((4 * j4 + 1) * nb),
                kp.add((4 * j4 + 2) * nb),
                kp.add((4 * j4 + 3) * nb),
            ];
            if stream {
                // Decode streams the keys once.
                for r in rows {
                    crate::kernels::simd::prefetch_ahead(r as *const u8, nb * 34);
                }
            }
            let mut s = _mm512_setzero_ps();
            for p in 0..P {
                // v[c][kk]: query c against key kk, 16 lanes (8 per block).
                let mut v = [[_mm512_setzero_si512(); 4]; 4];
                for kk in 0..4 {
                    let k = _mm512_xor_si512(pair_bytes(rows[kk], nb, p), flip);
                    for c in 0..4 {
                        v[c][kk] = _mm512_dpbusd_epi32(_mm512_setzero_si512(), k, qv[p][c]);
                    }
                }
                // Keys 0+1 and 2+3 interleaved, then all four: per 128-bit chunk, the four
                // keys' sums of that chunk.
                let mut u = [_mm512_setzero_si512(); 4];
                for c in 0..4 {
                    let t01 = _mm512_add_epi32(
                        _mm512_unpacklo_epi32(v[c][0], v[c][1]),
                        _mm512_unpackhi_epi32(v[c][0], v[c][1]),
                    );
                    let t23 = _mm512_add_epi32(
                        _mm512_unpacklo_epi32(v[c][2], v[c][3]),
                        _mm512_unpackhi_epi32(v[c][2], v[c][3]),
                    );
                    u[c] = _mm512_add_epi32(
                        _mm512_unpacklo_epi64(t01, t23),
                        _mm512_unpackhi_epi64(t01, t23),
                    );
                }
                // Chunks 0 + 1 are the first block, 2 + 3 the second: [c blk0, c blk1, c'
                // blk0, c' blk1] for queries (0, 1) and (2, 3), then one vector per block with
                // lane 4 c + kk.
                let w01 = _mm512_add_epi32(
                    _mm512_shuffle_i32x4::<0b10_00_10_00>(u[0], u[1]),
                    _mm512_shuffle_i32x4::<0b11_01_11_01>(u[0], u[1]),
                );
                let w23 = _mm512_add_epi32(
                    _mm512_shuffle_i32x4::<0b10_00_10_00>(u[2], u[3]),
                    _mm512_shuffle_i32x4::<0b11_01_11_01>(u[2], u[3]),
                );
                let blk = [
                    _mm512_shuffle_i32x4::<0b10_00_10_00>(w01, w23),
                    _mm512_shuffle_i32x4::<0b11_01_11_01>(w01, w23),
                ];
                for (h, b) in blk.iter().enumerate() {
                    if 2 * p + h >= nb {
                        break;
                    }
                    // The four keys' scales, lane 4 c + kk holding key kk's.
                    let bits = |kk: usize| (*rows[kk].add(2 * p + h)).d.to_bits() as i16;
                    let kd = _mm512_broadcast_f32x4(_mm_cvtph_ps(_mm_set_epi16(
                        0,
                        0,
                        0,
                        0,
                        bits(3),
                        bits(2),
                        bits(1),
                        bits(0),
                    )));
                    let i = _mm512_cvtepi32_ps(_mm512_sub_epi32(*b, corr[p][h]));
                    s = _mm512_add_ps(s, _mm512_mul_ps(_mm512_mul_ps(kd, qd[p][h]), i));
                }
            }
            let mut lanes = [0f32; 16];
            _mm512_storeu_ps(lanes.as_mut_ptr(), _mm512_mul_ps(s, _mm512_set1_ps(scale)));
            for c in 0..qn {
                sc[(q0 + c) * width + 4 * j4..][..4].copy_from_slice(&lanes[4 * c..4 * c + 4]);
            }
        }
        for j in 4 * quads..n {
            let row = &kb[j * nb..(j + 1) * nb];
            for c in 0..qn {
                let qc = &qq[(q0 + c) * nb..(q0 + c + 1) * nb];
                sc[(q0 + c) * width + j] = score(row, qc, scale, true);
            }
        }
    }
}
