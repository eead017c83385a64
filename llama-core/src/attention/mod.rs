//! Causal self-attention over the KV cache in one pass per query row, on our thread pool.
//!
//! For each query head and row: scores against the keys the row may see (positions up to its
//! own; the masked half of the square is never computed), softmax, and the weighted sum of the
//! values, written straight into the `(t, heads * head_dim)` layout the output projection
//! reads. Compared with the tensor-op version (two batched matmuls with a full mask, a softmax
//! and three layout copies) it skips the masked work, allocates nothing per layer but the
//! output, and runs on every core.

use candle_core::{CpuStorage, Storage, Tensor};
use half::f16;

use crate::error::{Error, Result};
#[cfg(target_arch = "x86_64")]
use crate::kernels::simd::hsum4;
use crate::kernels::simd::Elem;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(test)]
mod tests;

#[cfg(target_arch = "x86_64")]
use avx2::*;
#[cfg(target_arch = "x86_64")]
use avx512::*;

/// Query rows per work item.
pub(crate) const ROWS: usize = 8;

/// A `(1, heads, len, head_dim)` f32 or f16 tensor's storage, its first element and head
/// stride; rows within a head must be contiguous.
pub(crate) fn head_view(
    t: &Tensor,
) -> Result<(impl std::ops::Deref<Target = Storage> + '_, usize, usize)> {
    let (storage, layout) = t.storage_and_layout();
    let stride = layout.stride();
    let dims = layout.dims();
    if dims.len() != 4 || stride[3] != 1 || stride[2] != dims[3] {
        return Err(Error::InvalidArgument(format!(
            "attention: unexpected layout {dims:?} / {stride:?}"
        )));
    }
    let (start, head_stride) = (layout.start_offset(), stride[1]);
    if !matches!(
        &*storage,
        Storage::Cpu(CpuStorage::F32(_)) | Storage::Cpu(CpuStorage::F16(_))
    ) {
        return Err(Error::InvalidArgument(
            "attention: f32 or f16 CPU tensors only".into(),
        ));
    }
    Ok((storage, start, head_stride))
}

/// Keys or values as stored.
#[derive(Clone, Copy)]
pub(crate) enum Rows<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
}

impl<'a> Rows<'a> {
    fn of(s: &'a Storage) -> Rows<'a> {
        match s {
            Storage::Cpu(CpuStorage::F16(v)) => Rows::F16(v),
            Storage::Cpu(CpuStorage::F32(v)) => Rows::F32(v),
            _ => Rows::F32(&[]),
        }
    }

    fn from(self, at: usize) -> Rows<'a> {
        match self {
            Rows::F32(v) => Rows::F32(&v[at..]),
            Rows::F16(v) => Rows::F16(&v[at..]),
        }
    }

    /// `out[j] = (q . key j) * scale` for keys `0..out.len()`.
    fn scores(self, q: &[f32], scale: f32, out: &mut [f32], simd: bool) {
        let d = q.len();
        #[cfg(target_arch = "x86_64")]
        if simd {
            // SAFETY: avx2, fma and f16c were detected at run time; the rows are in bounds
            // (checked by the slicing below before any vector load).
            match self {
                Rows::F32(v) => unsafe { scores_avx2(q, &v[..out.len() * d], scale, out) },
                Rows::F16(v) => unsafe { scores_avx2(q, &v[..out.len() * d], scale, out) },
            }
            return;
        }
        let _ = simd;
        for (j, o) in out.iter_mut().enumerate() {
            *o = match self {
                Rows::F32(v) => dot_scalar(q, &v[j * d..(j + 1) * d]),
                Rows::F16(v) => dot_scalar(q, &v[j * d..(j + 1) * d]),
            } * scale;
        }
    }

    /// `y += sum_j w[j] * value j`, in order of `j`.
    fn weighted_sum(self, w: &[f32], y: &mut [f32], simd: bool) {
        let d = y.len();
        #[cfg(target_arch = "x86_64")]
        if simd {
            // SAFETY: as in `scores`.
            match self {
                Rows::F32(v) => unsafe { weighted_sum_avx2(w, &v[..w.len() * d], y) },
                Rows::F16(v) => unsafe { weighted_sum_avx2(w, &v[..w.len() * d], y) },
            }
            return;
        }
        let _ = simd;
        for (j, &p) in w.iter().enumerate() {
            match self {
                Rows::F32(v) => axpy_scalar(y, p, &v[j * d..(j + 1) * d]),
                Rows::F16(v) => axpy_scalar(y, p, &v[j * d..(j + 1) * d]),
            }
        }
    }

    /// [`Rows::scores`] for several query rows at once (at most 4): `out` holds one segment
    /// of `n` scores per query, keys `0..n`.
    fn scores_multi(self, qs: &[&[f32]], scale: f32, n: usize, out: &mut [f32], simd: bool) {
        #[cfg(target_arch = "x86_64")]
        if simd && qs.len() > 1 {
            let d = qs[0].len();
            macro_rules! go {
                ($v:expr, $q:literal) => {{
                    let q: [&[f32]; $q] = std::array::from_fn(|c| qs[c]);
                    // SAFETY: avx2, fma and f16c were detected at run time; the key rows are in
                    // bounds (sliced below) and `out` holds `Q * n` scores.
                    unsafe { scores_multi_avx2::<_, $q>(q, &$v[..n * d], n, scale, out) }
                }};
            }
            match (self, qs.len()) {
                (Rows::F32(v), 2) => go!(v, 2),
                (Rows::F32(v), 3) => go!(v, 3),
                (Rows::F32(v), _) => go!(v, 4),
                (Rows::F16(v), 2) => go!(v, 2),
                (Rows::F16(v), 3) => go!(v, 3),
                (Rows::F16(v), _) => go!(v, 4),
            }
            return;
        }
        for (c, q) in qs.iter().enumerate() {
            self.scores(q, scale, &mut out[c * n..(c + 1) * n], simd);
        }
    }

    /// [`Rows::weighted_sum`] for several weight rows at once (at most 4; `w` holds one
    /// segment of `n` weights per output row).
    fn weighted_multi(self, w: &[f32], n: usize, ys: &mut [&mut [f32]], simd: bool) {
        #[cfg(target_arch = "x86_64")]
        if simd && ys.len() > 1 {
            let d = ys[0].len();
            macro_rules! go {
                ($v:expr, $q:literal, $n:literal) => {{
                    let mut it = ys.iter_mut();
                    let y: [&mut [f32]; $q] =
                        std::array::from_fn(|_| &mut **it.next().expect("Q rows"));
                    // SAFETY: avx2, fma and f16c were detected at run time; the value rows are
                    // in bounds (sliced below) and `w` holds `Q * n` weights.
                    unsafe { weighted_multi_avx2::<_, $q, $n>(w, n, &$v[..n * d], y) }
                }};
            }
            match (self, ys.len()) {
                (Rows::F32(v), 2) => go!(v, 2, 4),
                (Rows::F32(v), 3) => go!(v, 3, 2),
                (Rows::F32(v), _) => go!(v, 4, 2),
                (Rows::F16(v), 2) => go!(v, 2, 4),
                (Rows::F16(v), 3) => go!(v, 3, 2),
                (Rows::F16(v), _) => go!(v, 4, 2),
            }
            return;
        }
        for (c, y) in ys.iter_mut().enumerate() {
            self.weighted_sum(&w[c * n..(c + 1) * n], y, simd);
        }
    }
}

pub(crate) fn dot_scalar<T: Elem>(a: &[f32], b: &[T]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y.f32()).sum()
}

pub(crate) fn axpy_scalar<T: Elem>(acc: &mut [f32], w: f32, v: &[T]) {
    for (a, x) in acc.iter_mut().zip(v) {
        *a += w * x.f32();
    }
}

/// `s = exp(s - max)` for every score; returns their sum.
pub(crate) fn exp_shifted(scores: &mut [f32], max: f32, simd: bool) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: avx2 and fma were detected at run time.
        return unsafe { exp_shifted_avx2(scores, max) };
    }
    let _ = simd;
    let mut sum = 0f32;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    sum
}

/// The AVX2/FMA/F16C paths, exactly when the matmul kernels use theirs (the same detection
/// and the same `Kernel::Scalar` override).
pub(crate) fn simd() -> bool {
    crate::kernels::simd()
}

/// Causal attention of `q` `(1, heads, t, head_dim)` (rows at positions `start..start + t`)
/// over `k`, `v` `(1, kv_heads, start + t, head_dim)`; query head `h` reads KV head
/// `h / (heads / kv_heads)`. Returns `(1, t, heads * head_dim)`.
///
/// `round_f16` follows llama.cpp's arithmetic over an f16 cache: its matrix products with f16
/// keys and values convert the other operand to f16, so the query row is rounded to f16 before
/// its dot products with the keys, and the normalized attention weights are rounded to f16
/// before they weight the values. With keys and values rounded too (the caller does that),
/// greedy outputs stay with llama.cpp's where its margins are clear.
#[cfg(test)]
pub(crate) fn causal(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    start: usize,
    scale: f32,
    round_f16: bool,
) -> Result<Tensor> {
    let (_, nh, t, hd) = q.dims4()?;
    let (qs, q0, q_head) = head_view(q)?;
    let qs = match &*qs {
        Storage::Cpu(CpuStorage::F32(v)) => &v[q0..],
        _ => return Err(Error::InvalidArgument("attention: f32 queries only".into())),
    };
    let queries = Queries {
        data: qs,
        heads: nh,
        rows: t,
        head_dim: hd,
        head_stride: q_head,
        row_stride: hd,
    };
    let mut out = vec![0f32; t * nh * hd];
    causal_into(&queries, k, v, start, scale, round_f16, &mut out)?;
    Ok(Tensor::from_vec(out, (1, t, nh * hd), q.device())?)
}

/// Query rows for [`causal_into`]: head `h` of row `i` is
/// `data[h * head_stride + i * row_stride..][..head_dim]`.
pub(crate) struct Queries<'a> {
    pub data: &'a [f32],
    pub heads: usize,
    pub rows: usize,
    pub head_dim: usize,
    pub head_stride: usize,
    pub row_stride: usize,
}

impl Queries<'_> {
    fn at(&self, h: usize, i: usize) -> &[f32] {
        &self.data[h * self.head_stride + i * self.row_stride..][..self.head_dim]
    }
}

/// [`causal`] with the queries in any row/head layout, into `out` (`rows x heads * head_dim`,
/// row-major).
pub(crate) fn causal_into(
    q: &Queries<'_>,
    k: &Tensor,
    v: &Tensor,
    start: usize,
    scale: f32,
    round_f16: bool,
    out: &mut [f32],
) -> Result<()> {
    let (nh, t, hd) = (q.heads, q.rows, q.head_dim);
    let (_, nkv, total, hd_k) = k.dims4()?;
    if hd_k != hd
        || v.dims4()? != (1, nkv, total, hd)
        || total != start + t
        || nkv == 0
        || nh % nkv != 0
        || out.len() != t * nh * hd
    {
        return Err(Error::InvalidArgument(format!(
            "attention: {nh} query heads x {t} rows x {hd}, k {:?}, v {:?}, start {start}",
            k.dims(),
            v.dims()
        )));
    }
    let group = nh / nkv;
    let (ks, k0, k_head) = head_view(k)?;
    let (vs, v0, v_head) = head_view(v)?;
    let (ks, vs) = (Rows::of(&ks), Rows::of(&vs));
    let width = nh * hd;
    let out = crate::pool::SharedMut::new(out);
    let simd = simd();
    let row_blocks = t.div_ceil(ROWS);
    // Prompt rows: the query heads that share a KV head (up to 4) run together, so each key
    // and value loaded serves all of them. Decode (one row) that does not take the tile below
    // keeps one head per item so that the heads spread over the threads.
    let per = if t > 1 { group.min(4) } else { 1 };
    let chunks = group.div_ceil(per);
    #[cfg(target_arch = "x86_64")]
    let same_storage = matches!(
        (ks, vs),
        (Rows::F16(_), Rows::F16(_)) | (Rows::F32(_), Rows::F32(_))
    );
    // The tile serves decode too once the context is long and there are at least as many KV
    // heads as threads to spread them over (each key converted once for the whole group of
    // query heads: +25-30% decode at 3000 positions on SmolLM2). With a short context the
    // heads spread one per item below (the same results either way, bit for bit).
    const LONG: usize = 512;
    let tile_rows = t > 1 || (total >= LONG && nkv >= crate::pool::pool().threads());
    if tile_rows
        && hd.is_multiple_of(16)
        && hd <= 256
        && simd
        && same_storage
        && crate::kernels::wide()
    {
        // All the query heads of a KV head, for a block of rows, as one tile.
        let tile = |item: usize| {
            let (kvh, rb) = (item / row_blocks, item % row_blocks);
            let heads = kvh * group..(kvh + 1) * group;
            let rows = rb * ROWS..t.min((rb + 1) * ROWS);
            let nq = rows.len() * group;
            let mut qm = vec![0f32; nq * hd];
            let mut seen = Vec::with_capacity(nq);
            let mut ys: Vec<&mut [f32]> = Vec::with_capacity(nq);
            for i in rows.clone() {
                for h in heads.clone() {
                    let c = seen.len();
                    let src = q.at(h, i);
                    let dst = &mut qm[c * hd..(c + 1) * hd];
                    if round_f16 {
                        for (d, v) in dst.iter_mut().zip(src) {
                            *d = half::f16::from_f32(*v).to_f32();
                        }
                    } else {
                        dst.copy_from_slice(src);
                    }
                    seen.push(start + i + 1);
                    // SAFETY: row i, columns of head h, are written by this item only.
                    ys.push(unsafe { out.slice(i * width + h * hd, hd) });
                }
            }
            let n = start + rows.end;
            // SAFETY: AVX-512 was detected at run time; the key and value rows `0..n` are in
            // bounds (sliced here) and `hd % 16 == 0`.
            unsafe {
                macro_rules! tile {
                    ($k:expr, $v:expr) => {{
                        let (k, v) = (&$k[..n * hd], &$v[..n * hd]);
                        match hd {
                            64 => attend_tile_avx512::<_, 4>(
                                &qm, &seen, k, v, hd, scale, round_f16, &mut ys,
                            ),
                            128 => attend_tile_avx512::<_, 8>(
                                &qm, &seen, k, v, hd, scale, round_f16, &mut ys,
                            ),
                            _ => attend_tile_avx512::<_, 0>(
                                &qm, &seen, k, v, hd, scale, round_f16, &mut ys,
                            ),
                        }
                    }};
                }
                match (ks.from(k0 + kvh * k_head), vs.from(v0 + kvh * v_head)) {
                    (Rows::F16(k), Rows::F16(v)) => tile!(k, v),
                    (Rows::F32(k), Rows::F32(v)) => tile!(k, v),
                    _ => {}
                }
            }
        };
        crate::pool::pool().run(nkv * row_blocks, &|r| r.for_each(tile));
        return Ok(());
    }
    let work = |item: usize| {
        let (hc, rb) = (item / row_blocks, item % row_blocks);
        let (kvh, c) = (hc / chunks, hc % chunks);
        let heads = kvh * group + c * per..kvh * group + ((c + 1) * per).min(group);
        let nq = heads.len();
        let keys = ks.from(k0 + kvh * k_head);
        let vals = vs.from(v0 + kvh * v_head);
        let mut scores = vec![0f32; nq * total];
        let mut qbuf = vec![0f32; nq * hd];
        for i in rb * ROWS..t.min((rb + 1) * ROWS) {
            for (c, h) in heads.clone().enumerate() {
                let src = q.at(h, i);
                let dst = &mut qbuf[c * hd..(c + 1) * hd];
                if round_f16 {
                    for (d, v) in dst.iter_mut().zip(src) {
                        *d = half::f16::from_f32(*v).to_f32();
                    }
                } else {
                    dst.copy_from_slice(src);
                }
            }
            let seen = start + i + 1;
            // No allocation per row (this runs for every head of every decoded token).
            let qrows: [&[f32]; 4] = std::array::from_fn(|c| &qbuf[c.min(nq - 1) * hd..][..hd]);
            keys.scores_multi(&qrows[..nq], scale, seen, &mut scores, simd);
            let mut sums = [0f32; 4];
            for (c, sum) in sums.iter_mut().enumerate().take(nq) {
                let sc = &mut scores[c * seen..(c + 1) * seen];
                let max = sc.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
                *sum = exp_shifted(sc, max, simd);
                if round_f16 {
                    let inv = 1.0 / *sum;
                    for p in sc.iter_mut() {
                        *p = half::f16::from_f32(*p * inv).to_f32();
                    }
                }
            }
            // SAFETY: row i, columns of these heads, are written by this item only (slots
            // past `nq` are empty).
            let mut ys: [&mut [f32]; 4] = std::array::from_fn(|c| unsafe {
                let len = if c < nq { hd } else { 0 };
                out.slice(i * width + (heads.start + c.min(nq - 1)) * hd, len)
            });
            // The weighted sums accumulate into the output (which may hold old values).
            for y in ys.iter_mut().take(nq) {
                y.fill(0.0);
            }
            vals.weighted_multi(&scores[..nq * seen], seen, &mut ys[..nq], simd);
            if !round_f16 {
                for (y, sum) in ys.iter_mut().zip(sums).take(nq) {
                    let inv = 1.0 / sum;
                    for o in y.iter_mut() {
                        *o *= inv;
                    }
                }
            }
        }
    };
    crate::pool::pool().run(nkv * chunks * row_blocks, &|r| r.for_each(work));
    Ok(())
}
