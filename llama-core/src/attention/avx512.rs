//! The 512-bit attention tile: all the query heads of a KV head for a block of rows.

use super::*;

/// A block of queries (rows x heads sharing one KV head) against the keys and values on
/// 512-bit vectors: each key is converted once for every query, each query's dot runs as one
/// 16-lane FMA chain whose halves are the two 8-lane chains of [`scores_avx2`], reduced four
/// queries at a time with its pairings; the values are then accumulated with each value row
/// loaded once for 4 queries, per lane in key order as in [`weighted_sum_avx2`]. So the
/// results equal the row-at-a-time path's bit for bit (decode uses that path: a conversation
/// read in pieces gives what it gives read at once). Query `c` (`qm[c * hd..]`, already
/// rounded when `round_f16`) sees keys `0..seen[c]` and writes `ys[c]` (zeroed by the caller).
/// `hd` is a multiple of 16, at most 256.
use crate::kv_cache::{Q4Block, Q8Block, QB};
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Rows the 512-bit tile reads sixteen values at a time as f32 (exact conversions).
#[cfg(target_arch = "x86_64")]
pub(crate) trait Lanes16 {
    /// Values `16 m..16 m + 16` of row `j`.
    ///
    /// # Safety
    /// AVX-512F is available; row `j` exists and `16 m + 16 <=` the row length.
    unsafe fn load16(&self, j: usize, m: usize) -> __m512;

    /// Asks for the cache lines [`prefetch_distance`](crate::kernels::simd::prefetch_distance)
    /// past row `j` (the rows a tile streams are contiguous: the lines asked for run on).
    fn prefetch(&self, j: usize);

    /// Scores against these rows as integer dot products ([`super::q8`]) into `sc`, when
    /// they are block rows: `qq` the quantized queries; false for other rows.
    ///
    /// # Safety
    /// As [`super::q8::scores_avx512`].
    #[allow(clippy::too_many_arguments)]
    unsafe fn int_scores(
        &self,
        _qq: &[Q8Block],
        _nq: usize,
        _n: usize,
        _scale: f32,
        _sc: &mut [f32],
        _width: usize,
        _stream: bool,
    ) -> bool {
        false
    }
}

/// f32 or f16 rows of `d` values.
pub(crate) struct Plain<'a, T> {
    pub data: &'a [T],
    pub d: usize,
}

#[cfg(target_arch = "x86_64")]
impl<T: Elem> Lanes16 for Plain<'_, T> {
    #[inline(always)]
    unsafe fn load16(&self, j: usize, m: usize) -> __m512 {
        T::load16(self.data.as_ptr().add(j * self.d + 16 * m))
    }

    #[inline(always)]
    fn prefetch(&self, j: usize) {
        let row = self.data.as_ptr().wrapping_add(j * self.d) as *const u8;
        crate::kernels::simd::prefetch_ahead(row, self.d * std::mem::size_of::<T>());
    }
}

/// q8_0 rows: `d / 32` blocks each.
pub(crate) struct Q8Rows<'a> {
    pub blocks: &'a [Q8Block],
    pub d: usize,
}

#[cfg(target_arch = "x86_64")]
impl Lanes16 for Q8Rows<'_> {
    #[inline(always)]
    unsafe fn load16(&self, j: usize, m: usize) -> __m512 {
        let b = &*self.blocks.as_ptr().add(j * (self.d / QB) + m / 2);
        let q = _mm_loadu_si128(b.qs.as_ptr().add(16 * (m % 2)) as *const __m128i);
        _mm512_mul_ps(
            _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)),
            _mm512_set1_ps(b.d.to_f32()),
        )
    }

    #[inline(always)]
    fn prefetch(&self, j: usize) {
        let row = self.blocks.as_ptr().wrapping_add(j * (self.d / QB)) as *const u8;
        crate::kernels::simd::prefetch_ahead(row, self.d / QB * std::mem::size_of::<Q8Block>());
    }

    #[allow(clippy::too_many_arguments)]
    unsafe fn int_scores(
        &self,
        qq: &[Q8Block],
        nq: usize,
        n: usize,
        scale: f32,
        sc: &mut [f32],
        width: usize,
        stream: bool,
    ) -> bool {
        let nb = self.d / QB;
        super::q8::scores_avx512(self.blocks, nb, qq, nq, n, scale, sc, width, stream);
        true
    }
}

/// q4_0 rows: `d / 32` blocks each (values `0..16` of a block in the low nibbles).
pub(crate) struct Q4Rows<'a> {
    pub blocks: &'a [Q4Block],
    pub d: usize,
}

#[cfg(target_arch = "x86_64")]
impl Lanes16 for Q4Rows<'_> {
    #[inline(always)]
    unsafe fn load16(&self, j: usize, m: usize) -> __m512 {
        let b = &*self.blocks.as_ptr().add(j * (self.d / QB) + m / 2);
        let bytes = _mm_loadu_si128(b.qs.as_ptr() as *const __m128i);
        let bytes = if m.is_multiple_of(2) {
            bytes
        } else {
            _mm_srli_epi16::<4>(bytes)
        };
        let q = _mm512_cvtepu8_epi32(_mm_and_si128(bytes, _mm_set1_epi8(15)));
        _mm512_mul_ps(
            _mm512_cvtepi32_ps(_mm512_sub_epi32(q, _mm512_set1_epi32(8))),
            _mm512_set1_ps(b.d.to_f32()),
        )
    }

    #[inline(always)]
    fn prefetch(&self, j: usize) {
        let row = self.blocks.as_ptr().wrapping_add(j * (self.d / QB)) as *const u8;
        crate::kernels::simd::prefetch_ahead(row, self.d / QB * std::mem::size_of::<Q4Block>());
    }

    #[allow(clippy::too_many_arguments)]
    unsafe fn int_scores(
        &self,
        qq: &[Q8Block],
        nq: usize,
        n: usize,
        scale: f32,
        sc: &mut [f32],
        width: usize,
        stream: bool,
    ) -> bool {
        let nb = self.d / QB;
        super::q8::scores_avx512(self.blocks, nb, qq, nq, n, scale, sc, width, stream);
        true
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn attend_tile_avx512<K: Lanes16, V: Lanes16, const S: usize>(
    qm: &[f32],
    qq: &[Q8Block],
    seen: &[usize],
    keys: &K,
    vals: &V,
    hd: usize,
    scale: f32,
    round_p: bool,
    ys: &mut [&mut [f32]],
) {
    let nq = seen.len();
    let n = seen.iter().copied().max().unwrap_or(0);
    let width = n.div_ceil(16) * 16;
    debug_assert!(hd.is_multiple_of(16));
    let mut sc = vec![0f32; nq * width];
    // S > 0: the head size is 16 S, known at compile time (loops unrolled).
    let hd = if S > 0 { 16 * S } else { hd };
    let steps = hd / 16;
    let mut kv = [_mm512_setzero_ps(); 16];
    let int_keys =
        qq.len() == nq * hd / QB && keys.int_scores(qq, nq, n, scale, &mut sc, width, nq <= 4);
    if !int_keys && S == 4 && nq <= 4 {
        // Decode (one row of a GQA group): the queries stay in registers while the keys
        // stream past; the same FMAs and reductions as below.
        let qv: [[__m512; 4]; 4] = std::array::from_fn(|c| {
            std::array::from_fn(|m| {
                if c < nq {
                    _mm512_loadu_ps(qm.as_ptr().add(c * hd + 16 * m))
                } else {
                    _mm512_setzero_ps()
                }
            })
        });
        // Four keys at a time: the sixteen (query, key) sums reduced together by a transposing
        // tree with the pairings of the one-pair reduction (lanes l + l+8, then i + i+4, then
        // 0+2 and 1+3, then those two), which leaves query c's four scores in 128-bit chunk c.
        let quads = n / 4;
        // (Plain loops and macros, no closures: a closure here is compiled out of line, and
        // then the queries are read from memory for every key.)
        macro_rules! l1 {
            ($x:expr, $y:expr) => {
                _mm512_add_ps(
                    _mm512_shuffle_f32x4::<0x44>($x, $y),
                    _mm512_shuffle_f32x4::<0xEE>($x, $y),
                )
            };
        }
        macro_rules! l3 {
            ($x:expr, $y:expr) => {
                _mm512_add_ps(
                    _mm512_shuffle_ps::<0x44>($x, $y),
                    _mm512_shuffle_ps::<0xEE>($x, $y),
                )
            };
        }
        for j4 in 0..quads {
            let mut r = [_mm512_setzero_ps(); 4];
            for (kk, rk) in r.iter_mut().enumerate() {
                let j = 4 * j4 + kk;
                keys.prefetch(j);
                let mut k = [_mm512_setzero_ps(); 4];
                for (m, km) in k.iter_mut().enumerate() {
                    *km = keys.load16(j, m);
                }
                let mut a = [_mm512_setzero_ps(); 4];
                for (c, ac) in a.iter_mut().enumerate() {
                    for m in 0..4 {
                        *ac = _mm512_fmadd_ps(qv[c][m], k[m], *ac);
                    }
                }
                let (v1, v2) = (l1!(a[0], a[1]), l1!(a[2], a[3]));
                *rk = _mm512_add_ps(
                    _mm512_shuffle_f32x4::<0x88>(v1, v2),
                    _mm512_shuffle_f32x4::<0xDD>(v1, v2),
                );
            }
            let (q1, q2) = (l3!(r[0], r[1]), l3!(r[2], r[3]));
            let s4 = _mm512_mul_ps(
                _mm512_add_ps(
                    _mm512_shuffle_ps::<0x88>(q1, q2),
                    _mm512_shuffle_ps::<0xDD>(q1, q2),
                ),
                _mm512_set1_ps(scale),
            );
            let mut lanes = [0f32; 16];
            _mm512_storeu_ps(lanes.as_mut_ptr(), s4);
            for c in 0..nq {
                sc.get_unchecked_mut(c * width + 4 * j4..c * width + 4 * j4 + 4)
                    .copy_from_slice(&lanes[4 * c..4 * c + 4]);
            }
        }
        for j in 4 * quads..n {
            let mut k = [_mm512_setzero_ps(); 4];
            for (m, km) in k.iter_mut().enumerate() {
                *km = keys.load16(j, m);
            }
            let mut v = [_mm256_setzero_ps(); 4];
            for (c, vc) in v.iter_mut().enumerate() {
                let mut a = _mm512_setzero_ps();
                for m in 0..4 {
                    a = _mm512_fmadd_ps(qv[c][m], k[m], a);
                }
                *vc = _mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps::<1>(a));
            }
            for (c, &sum) in hsum4(v).iter().enumerate().take(nq) {
                *sc.get_unchecked_mut(c * width + j) = sum * scale;
            }
        }
    }
    let scored = int_keys || (S == 4 && nq <= 4);
    for j in 0..if scored { 0 } else { n } {
        for (m, v) in kv.iter_mut().enumerate().take(steps) {
            *v = keys.load16(j, m);
        }
        for q0 in (0..nq).step_by(4) {
            // Lanes 0..8 of a query's sum are the first chain of the row-at-a-time dot (the
            // low half of each 16-wide step), lanes 8..16 the second: the halves added and the
            // four queries reduced together give exactly its sums.
            let mut v = [_mm256_setzero_ps(); 4];
            for (c, vc) in v.iter_mut().enumerate().take(nq - q0) {
                let qp = qm.as_ptr().add((q0 + c) * hd);
                let mut a = _mm512_setzero_ps();
                for (m, k) in kv.iter().enumerate().take(steps) {
                    a = _mm512_fmadd_ps(_mm512_loadu_ps(qp.add(16 * m)), *k, a);
                }
                *vc = _mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps::<1>(a));
            }
            for (c, &sum) in hsum4(v).iter().enumerate() {
                if q0 + c < nq {
                    sc[(q0 + c) * width + j] = sum * scale;
                }
            }
        }
    }
    let mut sums = vec![0f32; nq];
    for (c, sum) in sums.iter_mut().enumerate() {
        let row = &mut sc[c * width..(c + 1) * width];
        let (live, dead) = row.split_at_mut(seen[c]);
        let max = live.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        *sum = exp_shifted_avx2(live, max);
        if round_p {
            let inv = 1.0 / *sum;
            for p in live.iter_mut() {
                *p = f16::from_f32(*p * inv).to_f32();
            }
        }
        dead.fill(0.0);
    }
    for d0 in (0..hd).step_by(64) {
        let lanes = (hd - d0).min(64) / 16;
        for q0 in (0..nq).step_by(4) {
            let qn = (nq - q0).min(4);
            let mut acc = [[_mm512_setzero_ps(); 4]; 4];
            for j in 0..n {
                // Decode streams the values once; a prompt tile re-reads what its row blocks
                // share (in L2).
                if d0 == 0 && nq <= 4 {
                    vals.prefetch(j);
                }
                let mut vv = [_mm512_setzero_ps(); 4];
                for (l, v) in vv.iter_mut().enumerate().take(lanes) {
                    *v = vals.load16(j, d0 / 16 + l);
                }
                for (c, a) in acc.iter_mut().enumerate().take(qn) {
                    let p = _mm512_set1_ps(*sc.get_unchecked((q0 + c) * width + j));
                    for l in 0..lanes {
                        a[l] = _mm512_fmadd_ps(p, vv[l], a[l]);
                    }
                }
            }
            for (c, a) in acc.iter().enumerate().take(qn) {
                let y = &mut ys[q0 + c];
                for (l, v) in a.iter().enumerate().take(lanes) {
                    _mm512_storeu_ps(y.as_mut_ptr().add(d0 + 16 * l), *v);
                }
            }
        }
    }
    if !round_p {
        for (y, sum) in ys.iter_mut().zip(&sums) {
            let inv = 1.0 / sum;
            for o in y.iter_mut() {
                *o *= inv;
            }
        }
    }
}
