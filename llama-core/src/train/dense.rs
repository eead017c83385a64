//! The dense f32 operations of training, forward and backward, on the pool: products with a
//! frozen weight of any storage in both directions (its rows dequantized tile by tile, so the
//! arithmetic is exact f32 on the stored values, the same in both directions), RMS norm,
//! causal attention, SwiGLU and the small LoRA products.

use crate::kernels::WeightMatrix;
use crate::lora::kernel::{dot, dot4, panel};
use crate::pool::{for_each_chunk_mut, pool, SharedMut};

/// Weight rows dequantized per tile.
const TILE: usize = 16;

fn simd() -> bool {
    crate::exec::current().isa != crate::exec::Isa::Scalar
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
    let simd = simd();
    let tiles = n.div_ceil(TILE);
    let out = SharedMut::new(y);
    pool().run(tiles, &|items| {
        let mut buf = vec![0f32; TILE * k];
        for tile in items {
            let o0 = tile * TILE;
            let rows = TILE.min(n - o0);
            for r in 0..rows {
                let _ = w.row_into(o0 + r, &mut buf[r * k..(r + 1) * k]);
            }
            let mut vals = [0f32; TILE];
            for t in 0..m {
                let xt = &x[t * k..(t + 1) * k];
                let mut r = 0;
                while r + 4 <= rows {
                    vals[r..r + 4].copy_from_slice(&dot4(xt, &buf[r * k..(r + 4) * k], simd));
                    r += 4;
                }
                while r < rows {
                    vals[r] = dot(xt, &buf[r * k..(r + 1) * k], simd);
                    r += 1;
                }
                // SAFETY: tiles write disjoint column ranges of each row.
                unsafe { out.write(t * stride + col + o0, &vals[..rows]) };
            }
        }
    });
}

/// `gx[t] += gy[t, col..col + n] . W` (the gradient through `x W^T` to `x`), `gx` `[m, k]`.
/// Items are blocks of rows of `gx`; each walks every weight tile.
pub(crate) fn bwd(
    w: &dyn WeightMatrix,
    gy: &[f32],
    (stride, col): (usize, usize),
    m: usize,
    gx: &mut [f32],
) {
    let (n, k) = w.shape();
    let simd = simd();
    let rows_per = m.div_ceil(pool().threads() * 2).max(8);
    for_each_chunk_mut(gx, rows_per * k, &|c, chunk| {
        let t0 = c * rows_per;
        let mut buf = vec![0f32; TILE * k];
        let mut g = [0f32; TILE];
        let mut o0 = 0;
        while o0 < n {
            let rows = TILE.min(n - o0);
            for r in 0..rows {
                let _ = w.row_into(o0 + r, &mut buf[r * k..(r + 1) * k]);
            }
            for (i, gxt) in chunk.chunks_exact_mut(k).enumerate() {
                let t = t0 + i;
                g[..rows].copy_from_slice(&gy[t * stride + col + o0..][..rows]);
                if g[..rows].iter().any(|&v| v != 0.0) {
                    panel(gxt, &g[..rows], &buf[..rows * k], simd);
                }
            }
            o0 += rows;
        }
    });
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
pub(crate) struct Heads {
    pub(crate) t: usize,
    pub(crate) nh: usize,
    pub(crate) nkv: usize,
    pub(crate) hd: usize,
}

/// Causal attention: `att[i, h]` = softmax over `j <= i` of `q_i . k_j * scale` times `v`;
/// returns each (row, head)'s log-sum-exp (for the backward pass).
pub(crate) fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    s: Heads,
    scale: f32,
    att: &mut [f32],
) -> Vec<f32> {
    let Heads { t, nh, nkv, hd } = s;
    let (qw, kw) = (nh * hd, nkv * hd);
    let group = nh / nkv;
    let mut lse = vec![0f32; nh * t];
    let simd = simd();
    let out = SharedMut::new(att);
    let lse_out = SharedMut::new(&mut lse);
    pool().run(nh, &|heads| {
        let mut p = vec![0f32; t];
        for h in heads {
            let g = h / group;
            for i in 0..t {
                let qi = &q[i * qw + h * hd..][..hd];
                let mut mx = f32::NEG_INFINITY;
                for (j, pj) in p[..=i].iter_mut().enumerate() {
                    *pj = dot(qi, &k[j * kw + g * hd..][..hd], simd) * scale;
                    mx = mx.max(*pj);
                }
                let mut z = 0f64;
                for pj in &mut p[..=i] {
                    *pj = (*pj - mx).exp();
                    z += *pj as f64;
                }
                let inv = (1.0 / z) as f32;
                let mut o = vec![0f32; hd];
                for (j, &pj) in p[..=i].iter().enumerate() {
                    let w = pj * inv;
                    for (od, &vd) in o.iter_mut().zip(&v[j * kw + g * hd..][..hd]) {
                        *od += w * vd;
                    }
                }
                // SAFETY: each head writes its own columns of each row, and its own lse slots.
                unsafe {
                    out.write(i * qw + h * hd, &o);
                    lse_out.write(h * t + i, &[mx + (z as f32).ln()]);
                }
            }
        }
    });
    lse
}

/// Gradients of [`attention`]: `gq`, `gk`, `gv` (`+=`) given `go` (`[t, q_stride]`), the
/// forward's `att` and log-sum-exps. Items are key/value heads (each owns its `gk`/`gv`
/// columns and its query heads' `gq` columns).
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention_bwd(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    att: &[f32],
    lse: &[f32],
    go: &[f32],
    s: Heads,
    scale: f32,
    (gq, gk, gv): (&mut [f32], &mut [f32], &mut [f32]),
) {
    let Heads { t, nh, nkv, hd } = s;
    let (qw, kw) = (nh * hd, nkv * hd);
    let group = nh / nkv;
    let simd = simd();
    let (gq, gk, gv) = (SharedMut::new(gq), SharedMut::new(gk), SharedMut::new(gv));
    pool().run(nkv, &|groups| {
        let mut p = vec![0f32; t];
        for g in groups {
            for h in g * group..(g + 1) * group {
                for i in 0..t {
                    let qi = &q[i * qw + h * hd..][..hd];
                    let goi = &go[i * qw + h * hd..][..hd];
                    let di = dot(goi, &att[i * qw + h * hd..][..hd], simd);
                    let l = lse[h * t + i];
                    // SAFETY: this item owns head h's gq columns and group g's gk/gv columns.
                    let gqi = unsafe { gq.slice(i * qw + h * hd, hd) };
                    for (j, pj) in p[..=i].iter_mut().enumerate() {
                        let kj = &k[j * kw + g * hd..][..hd];
                        *pj = (dot(qi, kj, simd) * scale - l).exp();
                    }
                    for (j, &pj) in p[..=i].iter().enumerate() {
                        let vj = &v[j * kw + g * hd..][..hd];
                        let gp = dot(goi, vj, simd);
                        let gs = pj * (gp - di) * scale;
                        let kj = &k[j * kw + g * hd..][..hd];
                        // SAFETY: as above.
                        let (gkj, gvj) = unsafe {
                            (gk.slice(j * kw + g * hd, hd), gv.slice(j * kw + g * hd, hd))
                        };
                        for d in 0..hd {
                            gqi[d] += gs * kj[d];
                            gkj[d] += gs * qi[d];
                            gvj[d] += pj * goi[d];
                        }
                    }
                }
            }
        }
    });
}

/// `1 / (1 + e^-x)`.
#[inline]
pub(crate) fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// `u = x A^T` (`[m, r]`) for `A` `[r, k]`.
pub(crate) fn lora_down(x: &[f32], a: &[f32], m: usize, r: usize, k: usize) -> Vec<f32> {
    let simd = simd();
    let mut u = vec![0f32; m * r];
    for_each_chunk_mut(&mut u, r, &|t, ut| {
        let xt = &x[t * k..(t + 1) * k];
        for (j, uj) in ut.iter_mut().enumerate() {
            *uj = dot(xt, &a[j * k..(j + 1) * k], simd);
        }
    });
    u
}
