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
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn attend_tile_avx512<K: Chunks, V: Chunks, const S: usize>(
    qm: &[f32],
    seen: &[usize],
    keys: &mut K,
    vals: &mut V,
    hd: usize,
    scale: f32,
    round_p: bool,
    ys: &mut [&mut [f32]],
) {
    use std::arch::x86_64::*;
    let nq = seen.len();
    let n = seen.iter().copied().max().unwrap_or(0);
    let width = n.div_ceil(16) * 16;
    debug_assert!(hd.is_multiple_of(16));
    let mut sc = vec![0f32; nq * width];
    // S > 0: the head size is 16 S, known at compile time (loops unrolled).
    let hd = if S > 0 { 16 * S } else { hd };
    let steps = hd / 16;
    let mut kv = [_mm512_setzero_ps(); 16];
    let kc = keys.chunk().max(1);
    for j0 in (0..n).step_by(kc) {
        let cn = (n - j0).min(kc);
        let base = keys.rows(j0, cn);
        for jj in 0..cn {
            let j = j0 + jj;
            let row = base.add(jj * hd);
            for (m, v) in kv.iter_mut().enumerate().take(steps) {
                *v = _mm512_insertf32x8::<1>(
                    _mm512_castps256_ps512(K::T::load8(row.add(16 * m))),
                    K::T::load8(row.add(16 * m + 8)),
                );
            }
            for q0 in (0..nq).step_by(4) {
                // Lanes 0..8 of a query's sum are the first chain of the row-at-a-time dot (the
                // low half of each 16-wide step), lanes 8..16 the second: the halves added and
                // the four queries reduced together give exactly its sums.
                let v: [__m256; 4] = std::array::from_fn(|c| {
                    if q0 + c >= nq {
                        return _mm256_setzero_ps();
                    }
                    let qp = qm.as_ptr().add((q0 + c) * hd);
                    let mut a = _mm512_setzero_ps();
                    for (m, k) in kv.iter().enumerate().take(steps) {
                        a = _mm512_fmadd_ps(_mm512_loadu_ps(qp.add(16 * m)), *k, a);
                    }
                    _mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps::<1>(a))
                });
                for (c, &sum) in hsum4(v).iter().enumerate() {
                    if q0 + c < nq {
                        sc[(q0 + c) * width + j] = sum * scale;
                    }
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
    let vc = vals.chunk().max(1);
    for j0 in (0..n).step_by(vc) {
        let cn = (n - j0).min(vc);
        let base = vals.rows(j0, cn);
        for d0 in (0..hd).step_by(64) {
            let lanes = (hd - d0).min(64) / 16;
            for q0 in (0..nq).step_by(4) {
                let qn = (nq - q0).min(4);
                let mut acc = [[_mm512_setzero_ps(); 4]; 4];
                if j0 > 0 {
                    for (c, a) in acc.iter_mut().enumerate().take(qn) {
                        let y = ys[q0 + c].as_ptr().add(d0);
                        for (l, v) in a.iter_mut().enumerate().take(lanes) {
                            *v = _mm512_loadu_ps(y.add(16 * l));
                        }
                    }
                }
                for jj in 0..cn {
                    let row = base.add(jj * hd + d0);
                    let mut vv = [_mm512_setzero_ps(); 4];
                    for (l, v) in vv.iter_mut().enumerate().take(lanes) {
                        *v = _mm512_insertf32x8::<1>(
                            _mm512_castps256_ps512(V::T::load8(row.add(16 * l))),
                            V::T::load8(row.add(16 * l + 8)),
                        );
                    }
                    for (c, a) in acc.iter_mut().enumerate().take(qn) {
                        let p = _mm512_set1_ps(*sc.get_unchecked((q0 + c) * width + j0 + jj));
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
    }
    if n == 0 {
        for y in ys.iter_mut() {
            y.fill(0.0);
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
