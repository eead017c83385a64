//! Scores against q8_0 and q4_0 keys in integers, as llama.cpp computes them: each query row
//! is quantized to q8_0 blocks (its `vec_dot_type` for both key types), each block's dot
//! product is an exact integer, and the score is
//! `((dk_0 dq_0) I_0 + (dk_1 dq_1) I_1 + ...) * scale` in block order, each term rounded once
//! (`dk dq` is exact: two f16 values), the sums left to right from zero. The integers are exact
//! whatever adds them, so every path (512-bit VNNI, 256-bit, scalar; a tile of prompt rows or
//! one decoded row) gives the same bits with one float formula.

use crate::kv_cache::{Q4Block, Q8Block, QB};
use half::f16;

/// A key block whose values are small integers times its scale.
pub(crate) trait IntBlock: Copy {
    /// The values are the block's unsigned bytes ([`IntBlock::bytes32`]) minus this.
    const OFFSET: i32;
    /// The scale.
    fn d(&self) -> f16;
    /// A block of zeros (scale and values).
    fn default_block() -> Self;
    /// The exact dot product of the block's integers with a query block's.
    fn dot(&self, q: &Q8Block, simd: bool) -> i32;
    /// The 32 values plus [`IntBlock::OFFSET`], as unsigned bytes in order.
    ///
    /// # Safety
    /// AVX2 is available.
    #[cfg(target_arch = "x86_64")]
    unsafe fn bytes32(&self) -> std::arch::x86_64::__m256i;
    /// What [`IntBlock::dot8`]'s lanes add to the dot product per unit of the query's sum.
    const DOT8_OFFSET: i32;
    /// Eight 32-bit lanes whose sum is the dot product with the query bytes `q` plus
    /// [`IntBlock::DOT8_OFFSET`] times their sum (256-bit, no saturation).
    ///
    /// # Safety
    /// AVX2 is available.
    #[cfg(target_arch = "x86_64")]
    unsafe fn dot8(&self, q: std::arch::x86_64::__m256i) -> std::arch::x86_64::__m256i;
}

impl IntBlock for Q8Block {
    const OFFSET: i32 = 128;
    const DOT8_OFFSET: i32 = 0;
    fn default_block() -> Self {
        Q8Block::default()
    }
    /// `|k| * (q with k's signs)` in 16-bit pairs (at most 2 * 127 * 127), then 32-bit sums.
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn dot8(&self, q: std::arch::x86_64::__m256i) -> std::arch::x86_64::__m256i {
        use std::arch::x86_64::*;
        let k = _mm256_loadu_si256(self.qs.as_ptr() as *const __m256i);
        let p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(k, k), _mm256_sign_epi8(q, k));
        _mm256_madd_epi16(p16, _mm256_set1_epi16(1))
    }
    fn d(&self) -> f16 {
        self.d
    }
    #[inline]
    fn dot(&self, q: &Q8Block, simd: bool) -> i32 {
        block_dot(self, q, simd)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn bytes32(&self) -> std::arch::x86_64::__m256i {
        use std::arch::x86_64::*;
        _mm256_xor_si256(
            _mm256_loadu_si256(self.qs.as_ptr() as *const __m256i),
            _mm256_set1_epi8(-128),
        )
    }
}

impl IntBlock for Q4Block {
    const OFFSET: i32 = 8;
    const DOT8_OFFSET: i32 = 8;
    fn default_block() -> Self {
        Q4Block::default()
    }
    /// The nibbles (unsigned, at most 15) against the query's bytes in 16-bit pairs.
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn dot8(&self, q: std::arch::x86_64::__m256i) -> std::arch::x86_64::__m256i {
        use std::arch::x86_64::*;
        _mm256_madd_epi16(
            _mm256_maddubs_epi16(self.bytes32(), q),
            _mm256_set1_epi16(1),
        )
    }
    fn d(&self) -> f16 {
        self.d
    }
    #[inline]
    fn dot(&self, q: &Q8Block, simd: bool) -> i32 {
        #[cfg(target_arch = "x86_64")]
        if simd {
            // SAFETY: avx2 was detected at run time (the SIMD paths need it).
            return unsafe { q4_dot_avx2(self, q) };
        }
        let _ = simd;
        let mut s = 0i32;
        for j in 0..QB / 2 {
            s += ((self.qs[j] & 15) as i32 - 8) * q.qs[j] as i32;
            s += ((self.qs[j] >> 4) as i32 - 8) * q.qs[j + QB / 2] as i32;
        }
        s
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn bytes32(&self) -> std::arch::x86_64::__m256i {
        use std::arch::x86_64::*;
        let b = _mm_loadu_si128(self.qs.as_ptr() as *const __m128i);
        let m = _mm_set1_epi8(15);
        _mm256_set_m128i(
            _mm_and_si128(_mm_srli_epi16::<4>(b), m),
            _mm_and_si128(b, m),
        )
    }
}

/// A q4_0 block's dot product on 256-bit vectors: the nibbles (unsigned, at most 15) against
/// the query's bytes in 16-bit pairs (no saturation), minus 8 times the query's sum.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn q4_dot_avx2(k: &Q4Block, q: &Q8Block) -> i32 {
    use std::arch::x86_64::*;
    let u = k.bytes32();
    let qv = _mm256_loadu_si256(q.qs.as_ptr() as *const __m256i);
    let ones = _mm256_set1_epi16(1);
    let p32 = _mm256_madd_epi16(_mm256_maddubs_epi16(u, qv), ones);
    let qs = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_set1_epi8(1), qv), ones);
    hsum_i32(_mm256_sub_epi32(p32, _mm256_slli_epi32::<3>(qs)))
}

/// The sum of eight 32-bit lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn hsum_i32(v: std::arch::x86_64::__m256i) -> i32 {
    use std::arch::x86_64::*;
    let s4 = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    let s2 = _mm_add_epi32(s4, _mm_shuffle_epi32::<0b01_00_11_10>(s4));
    let s1 = _mm_add_epi32(s2, _mm_shuffle_epi32::<0b10_11_00_01>(s2));
    _mm_cvtsi128_si32(s1)
}

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
    hsum_i32(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)))
}

/// One key row's score for one quantized query row (the formula of the module's note).
#[inline]
pub(crate) fn score<K: IntBlock>(k: &[K], q: &[Q8Block], scale: f32, simd: bool) -> f32 {
    let mut s = 0f32;
    for (kb, qb) in k.iter().zip(q) {
        s += (kb.d().to_f32() * qb.d.to_f32()) * kb.dot(qb, simd) as f32;
    }
    s * scale
}

/// Scores of `nq` quantized query rows (`qq`, `nb` blocks each) against key rows `0..n`
/// (`kb`, `nb` blocks each), query `c`'s into `sc[c * width..][..n]` (`stream`: prefetch the keys,
/// read once, as decode does): four queries and four keys at a time, each key's bytes (made
/// unsigned, [`IntBlock::OFFSET`] taken back out with the query block's sum) against each query in
/// one VNNI instruction per pair of blocks, the sixteen products' lanes summed by one
/// transposing tree (integers: any order is exact).
///
/// # Safety
/// AVX-512F/BW/VNNI are available; `kb` holds `n * nb` blocks, `qq` `nq * nb`, `sc` `nq *
/// width` with `width >= n`; `nb <= 8`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn scores_avx512<K: IntBlock>(
    kb: &[K],
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
        1 => scores_pairs::<K, 1>(kb, nb, qq, nq, n, scale, sc, width, stream),
        2 => scores_pairs::<K, 2>(kb, nb, qq, nq, n, scale, sc, width, stream),
        3 => scores_pairs::<K, 3>(kb, nb, qq, nq, n, scale, sc, width, stream),
        _ => scores_pairs::<K, 4>(kb, nb, qq, nq, n, scale, sc, width, stream),
    }
}

/// The 64 bytes of blocks `2 p` and `2 p + 1` of a row (zero past the row's `nb` blocks):
/// the queries' signed bytes, or keys' unsigned ones.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2")]
#[inline]
unsafe fn pair_bytes<B>(
    row: *const B,
    nb: usize,
    p: usize,
    load: impl Fn(&B) -> std::arch::x86_64::__m256i,
) -> std::arch::x86_64::__m512i {
    use std::arch::x86_64::*;
    let lo = load(&*row.add(2 * p));
    let hi = if 2 * p + 1 < nb {
        load(&*row.add(2 * p + 1))
    } else {
        _mm256_setzero_si256()
    };
    _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi)
}

/// [`scores_avx512`] for `P` pairs of blocks per row.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn scores_pairs<K: IntBlock, const P: usize>(
    kb: &[K],
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
    let quads = n / 4;
    let q_bytes = |b: &Q8Block| _mm256_loadu_si256(b.qs.as_ptr() as *const __m256i);
    let k_bytes = |b: &K| b.bytes32();
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
                    qv[p][c] = pair_bytes(r.as_ptr(), nb, p, q_bytes);
                }
                for h in 0..2 {
                    let b = r.get(2 * p + h).unwrap_or(&zero);
                    let s: i32 = b.qs.iter().map(|&x| x as i32).sum();
                    sums[h][4 * c..4 * c + 4].fill(K::OFFSET * s);
                    ds[h][4 * c..4 * c + 4].fill(b.d.to_f32());
                }
            }
            for h in 0..2 {
                corr[p][h] = _mm512_loadu_si512(sums[h].as_ptr() as *const _);
                qd[p][h] = _mm512_loadu_ps(ds[h].as_ptr());
            }
        }
        for j4 in 0..quads {
            let rows: [*const K; 4] = [
                kp.add(4 * j4 * nb),
                kp.add((4 * j4 + 1) * nb),
                kp.add((4 * j4 + 2) * nb),
                kp.add((4 * j4 + 3) * nb),
            ];
            if stream {
                // Decode streams the keys once.
                for r in rows {
                    crate::kernels::simd::prefetch_ahead(
                        r as *const u8,
                        nb * std::mem::size_of::<K>(),
                    );
                }
            }
            let mut s = _mm512_setzero_ps();
            for p in 0..P {
                // v[c][kk]: query c against key kk, 16 lanes (8 per block).
                let mut v = [[_mm512_setzero_si512(); 4]; 4];
                for kk in 0..4 {
                    let k = pair_bytes(rows[kk], nb, p, k_bytes);
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
                    let bits = |kk: usize| (*rows[kk].add(2 * p + h)).d().to_bits() as i16;
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

/// Scores of up to four quantized query rows (`qq`, `nb` blocks each) against key rows
/// `0..n` (`kb`), query `c`'s into `out[c * n..][..n]`, on 256-bit vectors: per key, every
/// (query, block) pair's eight lanes, reduced together by one tree of horizontal adds, then the
/// float formula of the module's note on the four queries at once (the same bits as
/// [`score`]).
///
/// # Safety
/// AVX2 is available; `kb` holds `n * nb` blocks, `qq` `nq * nb` with `nq <= 4`, `out` `nq *
/// n`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn scores_multi_avx2<K: IntBlock>(
    kb: &[K],
    nb: usize,
    qq: &[Q8Block],
    nq: usize,
    n: usize,
    scale: f32,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    debug_assert!(nq <= 4 && kb.len() >= n * nb && qq.len() >= nq * nb && out.len() >= nq * n);
    let pairs = nb.div_ceil(2);
    // Per pair of blocks: each query's two blocks' bytes, DOT8_OFFSET times their sums and
    // their scales, lane 2 c + h for query c's block 2 p + h.
    let zero = Q8Block::default();
    let mut qb = vec![[[_mm256_setzero_si256(); 2]; 4]; pairs];
    let mut corr = vec![_mm256_setzero_si256(); pairs];
    let mut qd = vec![_mm256_setzero_ps(); pairs];
    for p in 0..pairs {
        let mut sums = [0i32; 8];
        let mut ds = [0f32; 8];
        for c in 0..nq {
            for h in 0..2 {
                let b = qq[c * nb..(c + 1) * nb].get(2 * p + h).unwrap_or(&zero);
                qb[p][c][h] = _mm256_loadu_si256(b.qs.as_ptr() as *const __m256i);
                sums[2 * c + h] = K::DOT8_OFFSET * b.qs.iter().map(|&x| x as i32).sum::<i32>();
                ds[2 * c + h] = b.d.to_f32();
            }
        }
        corr[p] = _mm256_loadu_si256(sums.as_ptr() as *const __m256i);
        qd[p] = _mm256_loadu_ps(ds.as_ptr());
    }
    // Even lanes (first blocks) to the low half, odd lanes to the high half.
    let split = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
    let kzero = K::default_block();
    for j in 0..n {
        let row = &kb[j * nb..(j + 1) * nb];
        let mut s = _mm_setzero_ps();
        for p in 0..pairs {
            let k0 = &row[2 * p];
            let k1 = row.get(2 * p + 1).unwrap_or(&kzero);
            let mut v = [_mm256_setzero_si256(); 8];
            for c in 0..nq {
                v[2 * c] = k0.dot8(qb[p][c][0]);
                v[2 * c + 1] = k1.dot8(qb[p][c][1]);
            }
            // Lane 2 c + h: the sum of v[2 c + h]'s eight lanes.
            let h01 = _mm256_hadd_epi32(v[0], v[1]);
            let h23 = _mm256_hadd_epi32(v[2], v[3]);
            let h45 = _mm256_hadd_epi32(v[4], v[5]);
            let h67 = _mm256_hadd_epi32(v[6], v[7]);
            let g0 = _mm256_hadd_epi32(h01, h23);
            let g1 = _mm256_hadd_epi32(h45, h67);
            let sums = _mm256_add_epi32(
                _mm256_permute2x128_si256::<0x20>(g0, g1),
                _mm256_permute2x128_si256::<0x31>(g0, g1),
            );
            let i = _mm256_cvtepi32_ps(_mm256_sub_epi32(sums, corr[p]));
            let kd = _mm256_cvtph_ps(_mm_set1_epi32(
                (k0.d().to_bits() as u32 | (k1.d().to_bits() as u32) << 16) as i32,
            ));
            let t = _mm256_permutevar8x32_ps(_mm256_mul_ps(_mm256_mul_ps(kd, qd[p]), i), split);
            s = _mm_add_ps(s, _mm256_castps256_ps128(t));
            if 2 * p + 1 < nb {
                s = _mm_add_ps(s, _mm256_extractf128_ps::<1>(t));
            }
        }
        let mut lanes = [0f32; 4];
        _mm_storeu_ps(lanes.as_mut_ptr(), _mm_mul_ps(s, _mm_set1_ps(scale)));
        for (c, &x) in lanes.iter().enumerate().take(nq) {
            out[c * n + j] = x;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::values;

    fn blocks<B>(n: usize, seed: u32, f: impl Fn(&[f32]) -> B) -> Vec<B> {
        values(n * QB, seed).chunks_exact(QB).map(f).collect()
    }

    /// The integer dot products agree on every path, and the 512-bit scores equal the
    /// one-row formula bit for bit (tails of keys and queries, odd block counts included).
    #[test]
    fn integer_scores_agree_on_every_path() {
        let q = blocks(64, 7, Q8Block::quantize);
        let k8 = blocks(64, 9, Q8Block::quantize);
        let k4 = blocks(64, 11, Q4Block::quantize);
        for (a, b) in k8.iter().zip(&q) {
            let want: i32 =
                a.qs.iter()
                    .zip(&b.qs)
                    .map(|(&x, &y)| x as i32 * y as i32)
                    .sum();
            assert_eq!(a.dot(b, false), want);
            if crate::kernels::simd() {
                assert_eq!(a.dot(b, true), want);
            }
        }
        for (a, b) in k4.iter().zip(&q) {
            let mut x = [0f32; QB];
            a.dequantize(&mut x);
            let d = a.d.to_f32();
            let want: i32 = x
                .iter()
                .zip(&b.qs)
                .map(|(&v, &y)| {
                    if d == 0.0 {
                        0
                    } else {
                        (v / d).round() as i32 * y as i32
                    }
                })
                .sum();
            assert_eq!(a.dot(b, false), want);
            if crate::kernels::simd() {
                assert_eq!(a.dot(b, true), want);
            }
        }
        #[cfg(target_arch = "x86_64")]
        if crate::exec::Kernel::Avx512.is_supported() {
            fn check<K: IntBlock>(kb: &[K], q: &[Q8Block]) {
                for nb in [1, 2, 3, 4, 6] {
                    let (n, nq) = (kb.len() / nb, (q.len() / nb).min(7));
                    let width = n + 3;
                    let mut sc = vec![0f32; nq * width];
                    // SAFETY: AVX-512 (with BW and VNNI) was detected; the sizes are as
                    // required.
                    unsafe { scores_avx512(kb, nb, q, nq, n, 0.125, &mut sc, width, nq <= 4) };
                    for c in 0..nq {
                        for j in 0..n {
                            let want = score(&kb[j * nb..][..nb], &q[c * nb..][..nb], 0.125, true);
                            assert_eq!(sc[c * width + j].to_bits(), want.to_bits(), "{nb} {c} {j}");
                        }
                    }
                }
            }
            check(&k8[..61], &q);
            check(&k4[..61], &q);
        }
        #[cfg(target_arch = "x86_64")]
        if crate::kernels::simd() {
            fn check256<K: IntBlock>(kb: &[K], q: &[Q8Block]) {
                for nb in [1, 2, 3, 4, 5] {
                    for nq in 1..=4 {
                        let n = kb.len() / nb;
                        let mut out = vec![0f32; nq * n];
                        // SAFETY: AVX2, FMA and F16C were detected; the sizes are as required.
                        unsafe { scores_multi_avx2(kb, nb, q, nq, n, 0.125, &mut out) };
                        for c in 0..nq {
                            for j in 0..n {
                                let want =
                                    score(&kb[j * nb..][..nb], &q[c * nb..][..nb], 0.125, false);
                                assert_eq!(
                                    out[c * n + j].to_bits(),
                                    want.to_bits(),
                                    "{nb} {c} {j}"
                                );
                            }
                        }
                    }
                }
            }
            check256(&k8[..60], &q);
            check256(&k4[..60], &q);
        }
    }
}
