//! The dense f32 operations of training, forward and backward, on the pool: products with a
//! frozen weight of any storage in both directions (its rows dequantized tile by tile, so the
//! arithmetic is exact f32 on the stored values, the same in both directions), RMS norm,
//! causal attention, SwiGLU and the small LoRA products.

use crate::exec::Isa;
use crate::kernels::lowrank::dot;
pub(crate) use crate::kernels::sgemm::Operand;
use crate::kernels::sgemm::{Lhs, Rhs, Scratch};
use crate::kernels::WeightMatrix;
use crate::pool::{for_each_chunk_mut, pool, SharedMut};

/// Weight rows dequantized per tile.
const TILE: usize = 64;

fn simd() -> Isa {
    crate::kernels::isa()
}

/// `y[t, col..col + n] = x[t] . W^T` for the `m` rows of `x` (`[m, k]`), `y` `[m, stride]`.
pub(crate) fn fwd(
    w: &dyn WeightMatrix,
    x: &[f32],
    m: usize,
    y: &mut [f32],
    (stride, col): (usize, usize),
) {
    let (n, k) = w.shape();
    let tiles = n.div_ceil(TILE);
    assert!(
        x.len() >= m * k && (m == 0 || y.len() >= (m - 1) * stride + col + n),
        "fwd: shapes"
    );
    // x is packed once for all the tiles.
    let lhs = Lhs::new_par((x, 0, k, 1), m, k);
    let out = SharedMut::new(y);
    pool().run(tiles, &|items| {
        for tile in items {
            let o0 = tile * TILE;
            let rows = TILE.min(n - o0);
            // y[m, col + o0..][m, rows] = x[m, k] . W[o0..o0 + rows, k]^T
            // SAFETY: tiles write disjoint column ranges of each row.
            unsafe {
                lhs.times_shared(
                    Rhs::WeightT(w, o0),
                    rows,
                    out,
                    (col + o0, stride),
                    false,
                    1.0,
                )
            };
        }
    });
}

/// `gx[t] += gy[t, col..col + n] . W` (the gradient through `x W^T` to `x`), `gx` `[m, k]`.
/// Items are shares of the weight tiles (tile `i` in share `i % shares`), so each weight row is
/// dequantized once per call, not once per thread; share 0 adds into `gx`, the others into
/// buffers of their own, added to `gx` in share order at the end (a fixed order: the same
/// result for the same thread count).
pub(crate) fn bwd(
    w: &dyn WeightMatrix,
    gy: &[f32],
    (stride, col): (usize, usize),
    m: usize,
    gx: &mut [f32],
) {
    let (n, k) = w.shape();
    assert!(
        gy.len() >= m.saturating_sub(1) * stride + col + n && gx.len() >= m * k,
        "bwd: shapes"
    );
    let tiles = n.div_ceil(TILE);
    let shares = pool().threads().min(tiles).max(1);
    let mk = m * k;
    let mut partial = vec![0f32; (shares - 1) * mk];
    {
        let gx_out = SharedMut::new(&mut gx[..mk]);
        let part_out = SharedMut::new(&mut partial);
        pool().run(shares, &|items| {
            let mut buf = Scratch::new(TILE * k);
            for share in items {
                // SAFETY: share 0 alone writes gx, share s > 0 alone its own buffer.
                let dst = unsafe {
                    if share == 0 {
                        gx_out.slice(0, mk)
                    } else {
                        part_out.slice((share - 1) * mk, mk)
                    }
                };
                let mut tile = share;
                while tile < tiles {
                    let o0 = tile * TILE;
                    let rows = TILE.min(n - o0);
                    w.rows_into(o0, &mut buf[..rows * k])
                        .expect("weight rows within the matrix");
                    // dst[m, k] += gy[.., col + o0..][m, rows] . buf[rows, k]
                    Lhs::new((gy, col + o0, stride, 1), m, rows).times(
                        (&buf[..rows * k], 0, k, 1),
                        k,
                        dst,
                        (0, k),
                        true,
                        1.0,
                    );
                    tile += shares;
                }
            }
        });
    }
    if shares > 1 {
        let per = mk.div_ceil(pool().threads() * 4).max(1024);
        for_each_chunk_mut(&mut gx[..mk], per, &|c, chunk| {
            let at = c * per;
            for s in 1..shares {
                let p = &partial[(s - 1) * mk + at..][..chunk.len()];
                for (g, v) in chunk.iter_mut().zip(p) {
                    *g += v;
                }
            }
        });
    }
}

/// RMS norm of each row: `y = x * r * g`, `r = 1 / sqrt(mean(x^2) + eps)`; returns the `r`s.
pub(crate) fn rms_norm(x: &[f32], g: &[f32], eps: f32, y: &mut [f32]) -> Vec<f32> {
    let h = g.len();
    let mut rs = Vec::with_capacity(x.len() / h);
    for (xr, yr) in x.chunks_exact(h).zip(y.chunks_exact_mut(h)) {
        let ms = xr.iter().map(|v| (*v as f64) * (*v as f64)).sum::<f64>() / h as f64;
        let r = (1.0 / (ms + eps as f64).sqrt()) as f32;
        for ((o, &v), &gi) in yr.iter_mut().zip(xr).zip(g) {
            *o = v * r * gi;
        }
        rs.push(r);
    }
    rs
}

/// `gx += d/dx` of [`rms_norm`] given `gy`: `r (g gy) - x r^3 mean(x g gy)`.
pub(crate) fn rms_norm_bwd(x: &[f32], g: &[f32], rs: &[f32], gy: &[f32], gx: &mut [f32]) {
    let h = g.len();
    for (((xr, gyr), gxr), &r) in x
        .chunks_exact(h)
        .zip(gy.chunks_exact(h))
        .zip(gx.chunks_exact_mut(h))
        .zip(rs)
    {
        let dot: f64 = xr
            .iter()
            .zip(gyr)
            .zip(g)
            .map(|((&xv, &gv), &gi)| xv as f64 * gv as f64 * gi as f64)
            .sum();
        let c = (r as f64).powi(3) * dot / h as f64;
        for (((o, &xv), &gv), &gi) in gxr.iter_mut().zip(xr).zip(gyr).zip(g) {
            *o += r * gi * gv - (xv as f64 * c) as f32;
        }
    }
}

/// Shapes of one attention call: `t` rows, `nh` query heads and `nkv` key/value heads of
/// `hd`, rows of `q` `[t, q_stride]` (heads side by side from 0), `k`/`v` `[t, kv_stride]`.
#[derive(Clone, Copy)]
pub(crate) struct Heads<'a> {
    pub(crate) t: usize,
    pub(crate) nh: usize,
    pub(crate) nkv: usize,
    pub(crate) hd: usize,
    /// For each row, the first row of its sequence (0 everywhere for one sequence; packed
    /// sequences attend within their own span).
    pub(crate) starts: &'a [usize],
}

/// Query rows per block of the attention products: a block's scores are `QB x` the keys it
/// sees, so the memory an item takes grows with the sequence, not with its square.
const QB: usize = 128;

/// `out[rb, i1] = beta * a . K^T` for `a` (`rb` rows of `hd`) and the first `i1` rows of one
/// head's keys (or values) `K` (`(values, offset of row 0, row stride)`).
fn times_keys(
    a: Operand<'_>,
    (rb, hd): (usize, usize),
    (keys, k0, kw): (&[f32], usize, usize),
    i1: usize,
    beta: f32,
    out: &mut [f32],
) {
    Lhs::new(a, rb, hd).times((keys, k0, 1, kw), i1, out, (0, i1), false, beta);
}

/// The sequences of a packed row set: `(first, end)` of each run of rows sharing a start.
fn segments(starts: &[usize]) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = vec![];
    for (i, &s0) in starts.iter().enumerate() {
        match out.last_mut() {
            Some(last) if last.0 == s0 => last.1 = i + 1,
            _ => out.push((s0, i + 1)),
        }
    }
    out
}

/// `row[..len] = exp(row - sub)` (zero past `len`), returning the sum of the exponentials.
fn exp_row(row: &mut [f32], len: usize, sub: f32) -> f64 {
    let (live, dead) = row.split_at_mut(len);
    let z = crate::attention::exp_shifted(live, sub, crate::attention::simd());
    dead.fill(0.0);
    z as f64
}

/// Causal attention: `att[i, h]` = softmax over `starts[i] <= j <= i` of `q_i . k_j * scale` times `v`;
/// returns each (row, head)'s log-sum-exp (for the backward pass). Items are (sequence, query
/// head) pairs, each two products on the packed kernels: the scores `Q K^T` of its sequence
/// (the causal half used), then the probabilities times `V`.
pub(crate) fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    s: Heads<'_>,
    scale: f32,
    att: &mut [f32],
) -> Vec<f32> {
    let Heads {
        t,
        nh,
        nkv,
        hd,
        starts,
    } = s;
    let (qw, kw) = (nh * hd, nkv * hd);
    let group = nh / nkv;
    assert!(
        q.len() >= t * qw && k.len() >= t * kw && v.len() >= t * kw && att.len() >= t * qw,
        "attention operands"
    );
    let segs = segments(&starts[..t]);
    let mut lse = vec![0f32; nh * t];
    let out = SharedMut::new(att);
    let lse_out = SharedMut::new(&mut lse);
    pool().run(segs.len() * nh, &|items| {
        for item in items {
            let ((s0, s1), h) = (segs[item / nh], item % nh);
            let (l, g) = (s1 - s0, h / group);
            let mut sc = Scratch::new(QB * l);
            // Blocks of query rows i0..i1, each against the keys 0..i1 it can see.
            for i0 in (0..l).step_by(QB) {
                let (i1, rb) = (l.min(i0 + QB), l.min(i0 + QB) - i0);
                let p = &mut sc[..rb * i1];
                // p[rb, i1] = scale * Q_h K_g^T
                times_keys(
                    (q, (s0 + i0) * qw + h * hd, qw, 1),
                    (rb, hd),
                    (k, s0 * kw + g * hd, kw),
                    i1,
                    scale,
                    p,
                );
                for r in 0..rb {
                    let i = i0 + r;
                    let row = &mut p[r * i1..(r + 1) * i1];
                    let mx = row[..=i].iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                    let z = exp_row(row, i + 1, mx);
                    let inv = (1.0 / z) as f32;
                    for e in &mut row[..=i] {
                        *e *= inv;
                    }
                    // SAFETY: each (sequence, head) item writes its own lse slots.
                    unsafe { lse_out.write(h * t + s0 + i, &[mx + (z as f32).ln()]) };
                }
                // att[rows, head h] = P V_g
                // SAFETY: each item writes its own rows of its head's columns.
                unsafe {
                    Lhs::new((p, 0, i1, 1), rb, i1).times_shared(
                        Rhs::Matrix((v, s0 * kw + g * hd, kw, 1)),
                        hd,
                        out,
                        ((s0 + i0) * qw + h * hd, qw),
                        false,
                        1.0,
                    )
                };
            }
        }
    });
    lse
}

/// Gradients of [`attention`]: `gq`, `gk`, `gv` (`+=`) given `go` (`[t, q_stride]`), the
/// forward's `att` and log-sum-exps. Items are (sequence, query head) pairs (balanced over the
/// threads even when there are fewer key/value heads than threads), each on the packed
/// kernels: the probabilities again from `Q K^T` and the log-sum-exps, `dP = dO V^T`, `dS = P
/// (dP - rowsum(dO att)) scale`, then `gq += dS K`, and the head's own key and value gradients
/// `dS^T Q` and `P^T dO`, summed into `gk`/`gv` per key/value head afterwards in head order (a
/// fixed order: the same result whatever the threads).
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention_bwd(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    att: &[f32],
    lse: &[f32],
    go: &[f32],
    s: Heads<'_>,
    scale: f32,
    (gq, gk, gv): (&mut [f32], &mut [f32], &mut [f32]),
) {
    let Heads {
        t,
        nh,
        nkv,
        hd,
        starts,
    } = s;
    let (qw, kw) = (nh * hd, nkv * hd);
    let group = nh / nkv;
    assert!(
        q.len() >= t * qw
            && k.len() >= t * kw
            && v.len() >= t * kw
            && att.len() >= t * qw
            && go.len() >= t * qw
            && lse.len() >= nh * t
            && gq.len() >= t * qw
            && gk.len() >= t * kw
            && gv.len() >= t * kw,
        "attention_bwd operands"
    );
    let simd = simd();
    let segs = segments(&starts[..t]);
    let th = t * hd;
    // Per query head: its key and value gradients, [t, hd] each (every row written by the
    // item of its sequence).
    let mut pk = Scratch::new(nh * th);
    let mut pv = Scratch::new(nh * th);
    {
        let gq = SharedMut::new(gq);
        let (pks, pvs) = (
            SharedMut::new(&mut pk[..nh * th]),
            SharedMut::new(&mut pv[..nh * th]),
        );
        pool().run(segs.len() * nh, &|items| {
            for item in items {
                let ((s0, s1), h) = (segs[item / nh], item % nh);
                let (l, g) = (s1 - s0, h / group);
                // SAFETY: each item alone writes its sequence's rows of head h's buffers.
                let (hk, hv) = unsafe {
                    (
                        pks.slice(h * th + s0 * hd, l * hd),
                        pvs.slice(h * th + s0 * hd, l * hd),
                    )
                };
                hk.fill(0.0);
                hv.fill(0.0);
                let (mut pb, mut db) = (Scratch::new(QB * l), Scratch::new(QB * l));
                // Blocks of query rows i0..i1, each against the keys 0..i1 it can see.
                for i0 in (0..l).step_by(QB) {
                    let (i1, rb) = (l.min(i0 + QB), l.min(i0 + QB) - i0);
                    let (p, ds) = (&mut pb[..rb * i1], &mut db[..rb * i1]);
                    let q_h = (q, (s0 + i0) * qw + h * hd, qw, 1);
                    let go_h = (go, (s0 + i0) * qw + h * hd, qw, 1);
                    // P again: exp(scale Q K^T - lse) on the causal part.
                    times_keys(q_h, (rb, hd), (k, s0 * kw + g * hd, kw), i1, scale, p);
                    for r in 0..rb {
                        let i = i0 + r;
                        exp_row(&mut p[r * i1..(r + 1) * i1], i + 1, lse[h * t + s0 + i]);
                    }
                    // dP = dO V^T, then dS in place.
                    times_keys(go_h, (rb, hd), (v, s0 * kw + g * hd, kw), i1, 1.0, ds);
                    for r in 0..rb {
                        let i = i0 + r;
                        let at = (s0 + i) * qw + h * hd;
                        let di = dot(&go[at..at + hd], &att[at..at + hd], simd);
                        let (pr, dr) = (&p[r * i1..(r + 1) * i1], &mut ds[r * i1..(r + 1) * i1]);
                        for (d, &pij) in dr[..=i].iter_mut().zip(&pr[..=i]) {
                            *d = pij * (*d - di) * scale;
                        }
                        dr[i + 1..].fill(0.0);
                    }
                    // gq[rows, head h] += dS K_g
                    // SAFETY: each item writes its own rows of its head's columns.
                    unsafe {
                        Lhs::new((ds, 0, i1, 1), rb, i1).times_shared(
                            Rhs::Matrix((k, s0 * kw + g * hd, kw, 1)),
                            hd,
                            gq,
                            ((s0 + i0) * qw + h * hd, qw),
                            true,
                            1.0,
                        )
                    };
                    // The head's key gradient += dS^T Q_h, value gradient += P^T dO_h, for
                    // the keys 0..i1.
                    Lhs::new((ds, 0, 1, i1), i1, rb).times(q_h, hd, hk, (0, hd), true, 1.0);
                    Lhs::new((p, 0, 1, i1), i1, rb).times(go_h, hd, hv, (0, hd), true, 1.0);
                }
            }
        });
    }
    // gk/gv rows: each adds its key/value heads' query heads in order.
    let (gk, gv) = (SharedMut::new(gk), SharedMut::new(gv));
    pool().run(t, &|rows| {
        for j in rows {
            for g in 0..nkv {
                // SAFETY: each row is one item's.
                let (gkj, gvj) =
                    unsafe { (gk.slice(j * kw + g * hd, hd), gv.slice(j * kw + g * hd, hd)) };
                for h in g * group..(g + 1) * group {
                    let at = h * th + j * hd;
                    for (d, s) in gkj.iter_mut().zip(&pk[at..at + hd]) {
                        *d += s;
                    }
                    for (d, s) in gvj.iter_mut().zip(&pv[at..at + hd]) {
                        *d += s;
                    }
                }
            }
        }
    });
}

/// Gradients of SwiGLU `a = silu(g) * up` (rows of `gu`: `ff` gate values then `ff` up
/// values) given `ga` (`[t, ff]`) into `ggu` (`[t, 2 ff]`), rows on the pool:
/// `d/dg = ga up s (1 + g (1 - s))`, `d/dup = ga g s`, `s = sigmoid(g)`.
pub(crate) fn swiglu_bwd(gu: &[f32], ga: &[f32], ff: usize, ggu: &mut [f32]) {
    assert!(
        ff > 0 && gu.len() == ggu.len() && ga.len() * 2 == gu.len(),
        "swiglu_bwd operands"
    );
    for_each_chunk_mut(ggu, 2 * ff, &|i, out| {
        let row = &gu[i * 2 * ff..(i + 1) * 2 * ff];
        let gar = &ga[i * ff..(i + 1) * ff];
        let (og, ou) = out.split_at_mut(ff);
        // og <- exp(-g) first.
        for (o, &g) in og.iter_mut().zip(&row[..ff]) {
            *o = -g;
        }
        crate::attention::exp_shifted(og, 0.0, crate::attention::simd());
        for j in 0..ff {
            let (g, up) = (row[j], row[ff + j]);
            let sg = 1.0 / (1.0 + og[j]);
            og[j] = gar[j] * up * sg * (1.0 + g * (1.0 - sg));
            ou[j] = gar[j] * g * sg;
        }
    });
}

/// `u = x A^T` (`[m, r]`) for `A` `[r, k]`.
pub(crate) fn lora_down(x: &[f32], a: &[f32], m: usize, r: usize, k: usize) -> Vec<f32> {
    let mut u = vec![0f32; m * r];
    // u[m, r] = x[m, k] . A^T (A is [r, k]).
    par_gemm(
        (m, r, k),
        &mut u,
        (r, 0),
        false,
        1.0,
        (x, 0, k, 1),
        (a, 0, 1, k),
    );
    u
}

/// `dst[i, dcol + j] (+)= beta * sum_p lhs[i, p] rhs[p, j]` for `i < m`, `j < n`, `p < k`, over
/// the pool by blocks of `dst` rows (`dst` `[m, dst_rs]` row-major, each block a separate
/// product). Every operand's extent is checked.
#[allow(clippy::too_many_arguments)]
pub(crate) fn par_gemm(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    (dst_rs, dcol): (usize, usize),
    accumulate: bool,
    beta: f32,
    lhs: Operand<'_>,
    rhs: Operand<'_>,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        dst.len() >= m * dst_rs && dcol + n <= dst_rs,
        "gemm destination out of bounds"
    );
    let rows_per = m.div_ceil(pool().threads()).max(1);
    for_each_chunk_mut(&mut dst[..m * dst_rs], rows_per * dst_rs, &|c, block| {
        let i0 = c * rows_per;
        let mb = block.len() / dst_rs;
        let (lv, loff, lrs, lcs) = lhs;
        Lhs::new((lv, loff + i0 * lrs, lrs, lcs), mb, k).times(
            rhs,
            n,
            block,
            (dcol, dst_rs),
            accumulate,
            beta,
        );
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Attention and its gradients over packed sequences longer than a query block (several
    /// blocks per sequence, two sequences) against f64 sums of the same formulas.
    #[test]
    fn attention_matches_f64_over_blocks_and_sequences() {
        let (t, nh, nkv, hd) = (300, 4, 2, 16);
        let (qw, kw, group) = (nh * hd, nkv * hd, nh / nkv);
        let mut r = crate::train::Rng(3);
        let mut vals = |n: usize| (0..n).map(|_| r.uniform()).collect::<Vec<f32>>();
        let (q, k, v, go) = (vals(t * qw), vals(t * kw), vals(t * kw), vals(t * qw));
        let starts: Vec<usize> = (0..t).map(|i| if i < 170 { 0 } else { 170 }).collect();
        let heads = Heads {
            t,
            nh,
            nkv,
            hd,
            starts: &starts,
        };
        let scale = 0.25f32;
        let mut att = vec![0f32; t * qw];
        let lse = attention(&q, &k, &v, heads, scale, &mut att);
        let (mut gq, mut gk, mut gv) = (vec![0f32; t * qw], vec![0f32; t * kw], vec![0f32; t * kw]);
        attention_bwd(
            &q,
            &k,
            &v,
            &att,
            &lse,
            &go,
            heads,
            scale,
            (&mut gq, &mut gk, &mut gv),
        );
        let (mut wq, mut wk, mut wv) = (vec![0f64; t * qw], vec![0f64; t * kw], vec![0f64; t * kw]);
        let dot64 = |a: &[f32], b: &[f32]| {
            a.iter()
                .zip(b)
                .map(|(x, y)| *x as f64 * *y as f64)
                .sum::<f64>()
        };
        for h in 0..nh {
            let g = h / group;
            for i in 0..t {
                let qi = &q[i * qw + h * hd..][..hd];
                let goi = &go[i * qw + h * hd..][..hd];
                let js: Vec<usize> = (starts[i]..=i).collect();
                let s: Vec<f64> = js
                    .iter()
                    .map(|&j| dot64(qi, &k[j * kw + g * hd..][..hd]) * scale as f64)
                    .collect();
                let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = s.iter().map(|x| (x - mx).exp()).sum();
                let p: Vec<f64> = s.iter().map(|x| (x - mx).exp() / z).collect();
                assert!(((mx + z.ln()) - lse[h * t + i] as f64).abs() < 1e-5);
                let mut o = vec![0f64; hd];
                for (&j, &pj) in js.iter().zip(&p) {
                    for (d, od) in o.iter_mut().enumerate() {
                        *od += pj * v[j * kw + g * hd + d] as f64;
                    }
                }
                for (d, od) in o.iter().enumerate() {
                    let got = att[i * qw + h * hd + d] as f64;
                    assert!(
                        (got - od).abs() < 1e-5,
                        "att [{i}, {h}, {d}]: {got} vs {od}"
                    );
                }
                let dp: Vec<f64> = js
                    .iter()
                    .map(|&j| dot64(goi, &v[j * kw + g * hd..][..hd]))
                    .collect();
                let di: f64 = p.iter().zip(&dp).map(|(a, b)| a * b).sum();
                for ((&j, &pj), &dpj) in js.iter().zip(&p).zip(&dp) {
                    let ds = pj * (dpj - di) * scale as f64;
                    for d in 0..hd {
                        wq[i * qw + h * hd + d] += ds * k[j * kw + g * hd + d] as f64;
                        wk[j * kw + g * hd + d] += ds * qi[d] as f64;
                        wv[j * kw + g * hd + d] += pj * goi[d] as f64;
                    }
                }
            }
        }
        for (name, got, want) in [("gq", &gq, &wq), ("gk", &gk, &wk), ("gv", &gv, &wv)] {
            for (i, (&a, &b)) in got.iter().zip(want.iter()).enumerate() {
                assert!(
                    (a as f64 - b).abs() < 1e-4 * (1.0 + b.abs()),
                    "{name}[{i}]: {a} vs {b}"
                );
            }
        }
    }
}
