//! Causal self-attention over the KV cache in one pass per query row, on our thread pool.
//!
//! For each query head and row: scores against the keys the row may see (positions up to its
//! own; the masked half of the square is never computed), softmax, and the weighted sum of the
//! values, written straight into the `(t, heads * head_dim)` layout the output projection
//! reads. Compared with the tensor-op version (two batched matmuls with a full mask, a softmax
//! and three layout copies) it skips the masked work, allocates nothing per layer but the
//! output, and runs on every core.

#[cfg(test)]
use candle_core::{CpuStorage, Storage, Tensor};
use half::f16;

use crate::error::{Error, Result};
#[cfg(target_arch = "x86_64")]
use crate::kernels::simd::hsum4;
use crate::kernels::simd::Elem;
use crate::kv_cache::{hadamard, KvRows};

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod q8;
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
#[cfg(test)]
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
    /// f32 or f16 cache rows (the caller checked the type).
    fn of_kv(r: KvRows<'a>) -> Rows<'a> {
        match r {
            KvRows::F16(v) => Rows::F16(v),
            KvRows::F32(v) => Rows::F32(v),
            _ => Rows::F32(&[]),
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

/// A layer's keys and values for [`causal_into`]: KV head `h`'s rows `0..total` start at row
/// `h * head_rows` of `k` and `v`.
pub(crate) struct Kv<'a> {
    pub k: KvRows<'a>,
    pub v: KvRows<'a>,
    pub kv_heads: usize,
    pub head_rows: usize,
    pub total: usize,
    /// The keys were rotated in blocks of this size (the queries are rotated alike).
    pub rot_k: Option<usize>,
    /// The values were rotated in blocks of this size (the output is rotated back).
    pub rot_v: Option<usize>,
    /// llama.cpp's arithmetic over f16 keys: the query row is rounded to f16 before its dot
    /// products with them.
    pub round_q: bool,
    /// llama.cpp's arithmetic over f16 values: the normalized attention weights are rounded to
    /// f16 before they weight the values.
    pub round_p: bool,
}

impl<'a> Kv<'a> {
    /// The stored rows of a cache layer, `total` of them in use, with llama.cpp's f16
    /// roundings where a plane is f16.
    pub(crate) fn of(view: &crate::kv_cache::LayerView<'a>, kv_heads: usize, total: usize) -> Self {
        Kv {
            k: view.k,
            v: view.v,
            kv_heads,
            head_rows: view.capacity,
            total,
            rot_k: view.rot_k,
            rot_v: view.rot_v,
            round_q: matches!(view.k, KvRows::F16(_)),
            round_p: matches!(view.v, KvRows::F16(_)),
        }
    }
}

/// Scores of `nq` quantized query rows against block key rows `0..n`, query `c`'s into
/// `out[c * n..][..n]` (`out` holds `nq * n`).
fn int_scores<K: q8::IntBlock>(
    kb: &[K],
    nb: usize,
    qq: &[crate::kv_cache::Q8Block],
    nq: usize,
    scale: f32,
    simd: bool,
    out: &mut [f32],
) {
    let n = out.len() / nq;
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: avx2, fma and f16c were detected at run time; the rows are in bounds (sliced
        // here) and `out` holds `nq * n` scores.
        unsafe { q8::scores_multi_avx2(&kb[..n * nb], nb, &qq[..nq * nb], nq, n, scale, out) };
        return;
    }
    for c in 0..nq {
        let q = &qq[c * nb..(c + 1) * nb];
        for (j, o) in out[c * n..(c + 1) * n].iter_mut().enumerate() {
            *o = q8::score(&kb[j * nb..(j + 1) * nb], q, scale, simd);
        }
    }
}

/// Rows per dequantized chunk on the row-at-a-time path (a chunk of keys and one of values
/// stay in L1).
const DQ_CHUNK: usize = 64;

/// Copies query row `src` into `dst` as the keys need it: rounded to f16 (llama.cpp's
/// arithmetic over f16 keys) or rotated like rotated keys.
fn load_query(src: &[f32], dst: &mut [f32], kv: &Kv<'_>) {
    if kv.round_q {
        for (d, v) in dst.iter_mut().zip(src) {
            *d = half::f16::from_f32(*v).to_f32();
        }
    } else {
        dst.copy_from_slice(src);
    }
    if let Some(n) = kv.rot_k {
        hadamard(dst, n);
    }
}

/// Causal attention of `q` `(1, heads, t, head_dim)` (rows at positions `start..start + t`)
/// over f32 or f16 `k`, `v` `(1, kv_heads, start + t, head_dim)`; query head `h` reads KV head
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
    let (_, nkv, total, hd_k) = k.dims4()?;
    if hd_k != hd || v.dims4()? != (1, nkv, total, hd) {
        return Err(Error::InvalidArgument(format!(
            "attention: q {:?}, k {:?}, v {:?}",
            q.dims(),
            k.dims(),
            v.dims()
        )));
    }
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
    let (ks, k0, k_head) = head_view(k)?;
    let (vs, v0, v_head) = head_view(v)?;
    fn rows(s: &Storage, at: usize) -> KvRows<'_> {
        match s {
            Storage::Cpu(CpuStorage::F16(x)) => KvRows::F16(&x[at..]),
            Storage::Cpu(CpuStorage::F32(x)) => KvRows::F32(&x[at..]),
            _ => KvRows::F32(&[]),
        }
    }
    if k_head != v_head || k_head % hd != 0 {
        return Err(Error::InvalidArgument(
            "attention: unexpected K/V layout".into(),
        ));
    }
    let kv = Kv {
        k: rows(&ks, k0),
        v: rows(&vs, v0),
        kv_heads: nkv,
        head_rows: k_head / hd,
        total,
        rot_k: None,
        rot_v: None,
        round_q: round_f16,
        round_p: round_f16,
    };
    let mut out = vec![0f32; t * nh * hd];
    causal_into(&queries, &kv, start, scale, &mut out)?;
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

/// Causal attention of the query rows (at positions `start..start + rows`) over the keys and
/// values `kv` (`start + rows` of them), into `out` (`rows x heads * head_dim`, row-major).
///
/// Keys and values of every storage type run the same f32 arithmetic: f32 and f16 rows are read
/// where they are stored, block rows (q8_0, q4_0) are converted to f32 a chunk at a time
/// (exactly). A block of rows (a prompt) gives each row exactly what it gets alone (decode).
pub(crate) fn causal_into<'k>(
    q: &Queries<'_>,
    kv: &Kv<'k>,
    start: usize,
    scale: f32,
    out: &mut [f32],
) -> Result<()> {
    let (nh, t, hd) = (q.heads, q.rows, q.head_dim);
    let (nkv, total) = (kv.kv_heads, kv.total);
    let need = |r: KvRows<'_>| {
        let (have, unit) = match r {
            KvRows::F32(x) => (x.len(), 1),
            KvRows::F16(x) => (x.len(), 1),
            KvRows::Q8(x) => (x.len(), crate::kv_cache::QB),
            KvRows::Q4(x) => (x.len(), crate::kv_cache::QB),
        };
        let rows_needed = nkv.saturating_sub(1) * kv.head_rows + total;
        (r.quantized() && !hd.is_multiple_of(unit)) || have * unit < rows_needed * hd
    };
    if total != start + t
        || nkv == 0
        || nh % nkv != 0
        || out.len() != t * nh * hd
        || kv.head_rows < total
        || need(kv.k)
        || need(kv.v)
    {
        return Err(Error::InvalidArgument(format!(
            "attention: {nh} query heads x {t} rows x {hd}, {nkv} KV heads of {total} rows ({} apart), start {start}",
            kv.head_rows
        )));
    }
    let group = nh / nkv;
    let width = nh * hd;
    let out = crate::pool::SharedMut::new(out);
    let simd = simd();
    let row_blocks = t.div_ceil(ROWS);
    let head_rows = kv.head_rows;
    let head = move |r: KvRows<'k>, h: usize| -> KvRows<'k> { r.skip_rows(h * head_rows, hd) };
    // f32 or f16 keys and values of one type are read in place; anything else (blocks, or
    // mixed types) is converted to f32 a chunk at a time.
    let direct = matches!(
        (kv.k, kv.v),
        (KvRows::F16(_), KvRows::F16(_)) | (KvRows::F32(_), KvRows::F32(_))
    );
    // Prompt rows: the query heads that share a KV head (up to 4) run together, so each key
    // and value loaded serves all of them. Decode (one row) that does not take the tile below
    // keeps one head per item so that the heads spread over the threads, unless keys and values
    // must be converted (then each conversion serves the group).
    let per = if t > 1 || !direct { group.min(4) } else { 1 };
    let chunks = group.div_ceil(per);
    // The tile serves decode too once the context is long and there are at least as many KV
    // heads as threads to spread them over (each key converted once for the whole group of
    // query heads: +25-30% decode at 3000 positions on SmolLM2). With a short context the
    // heads spread one per item below (the same results either way, bit for bit).
    const LONG: usize = 512;
    let tile_rows = t > 1 || (total >= LONG && nkv >= crate::pool::pool().threads());
    #[cfg(target_arch = "x86_64")]
    if tile_rows && hd.is_multiple_of(16) && hd <= 256 && simd && crate::kernels::wide() {
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
                    load_query(q.at(h, i), &mut qm[c * hd..(c + 1) * hd], kv);
                    seen.push(start + i + 1);
                    // SAFETY: row i, columns of head h, are written by this item only.
                    ys.push(unsafe { out.slice(i * width + h * hd, hd) });
                }
            }
            // Block keys score in integers against the queries quantized to q8_0.
            let mut qq = Vec::new();
            if kv.k.quantized() {
                q8::quantize_queries(&qm, &mut qq);
            }
            let (kr, vr) = (head(kv.k, kvh), head(kv.v, kvh));
            // SAFETY: AVX-512 was detected at run time; the sources hold rows `0..n` (checked
            // above) and `hd % 16 == 0`.
            unsafe {
                macro_rules! tile {
                    ($k:expr, $v:expr) => {{
                        let (k, v) = (&$k, &$v);
                        match hd {
                            64 => attend_tile_avx512::<_, _, 4>(
                                &qm, &qq, &seen, k, v, hd, scale, kv.round_p, &mut ys,
                            ),
                            128 => attend_tile_avx512::<_, _, 8>(
                                &qm, &qq, &seen, k, v, hd, scale, kv.round_p, &mut ys,
                            ),
                            _ => attend_tile_avx512::<_, _, 0>(
                                &qm, &qq, &seen, k, v, hd, scale, kv.round_p, &mut ys,
                            ),
                        }
                    }};
                }
                macro_rules! with_v {
                    ($k:expr) => {{
                        match vr {
                            KvRows::F16(v) => tile!($k, Plain { data: v, d: hd }),
                            KvRows::F32(v) => tile!($k, Plain { data: v, d: hd }),
                            KvRows::Q8(v) => tile!($k, Q8Rows { blocks: v, d: hd }),
                            KvRows::Q4(v) => tile!($k, Q4Rows { blocks: v, d: hd }),
                        }
                    }};
                }
                match kr {
                    KvRows::F16(k) => with_v!(Plain { data: k, d: hd }),
                    KvRows::F32(k) => with_v!(Plain { data: k, d: hd }),
                    KvRows::Q8(k) => with_v!(Q8Rows { blocks: k, d: hd }),
                    KvRows::Q4(k) => with_v!(Q4Rows { blocks: k, d: hd }),
                }
            }
            if let Some(b) = kv.rot_v {
                for y in ys.iter_mut() {
                    hadamard(y, b);
                }
            }
        };
        crate::pool::pool().run(nkv * row_blocks, &|r| r.for_each(tile));
        return Ok(());
    }
    let _ = tile_rows;
    let work = |item: usize| {
        let (hc, rb) = (item / row_blocks, item % row_blocks);
        let (kvh, c) = (hc / chunks, hc % chunks);
        let heads = kvh * group + c * per..kvh * group + ((c + 1) * per).min(group);
        let nq = heads.len();
        let (keys, vals) = (head(kv.k, kvh), head(kv.v, kvh));
        let mut scores = vec![0f32; nq * total];
        let mut qbuf = vec![0f32; nq * hd];
        let mut qq = Vec::new();
        let (mut kbuf, mut vbuf) = if direct {
            (Vec::new(), Vec::new())
        } else {
            (vec![0f32; DQ_CHUNK * hd], vec![0f32; DQ_CHUNK * hd])
        };
        let mut part = if direct {
            Vec::new()
        } else {
            vec![0f32; 4 * DQ_CHUNK]
        };
        for i in rb * ROWS..t.min((rb + 1) * ROWS) {
            for (c, h) in heads.clone().enumerate() {
                load_query(q.at(h, i), &mut qbuf[c * hd..(c + 1) * hd], kv);
            }
            let seen = start + i + 1;
            // No allocation per row (this runs for every head of every decoded token).
            let qrows: [&[f32]; 4] = std::array::from_fn(|c| &qbuf[c.min(nq - 1) * hd..][..hd]);
            if direct {
                Rows::of_kv(keys).scores_multi(&qrows[..nq], scale, seen, &mut scores, simd);
            } else if keys.quantized() {
                let nb = hd / crate::kv_cache::QB;
                q8::quantize_queries(&qbuf[..nq * hd], &mut qq);
                let out = &mut scores[..nq * seen];
                match keys {
                    KvRows::Q8(kb) => int_scores(kb, nb, &qq, nq, scale, simd, out),
                    KvRows::Q4(kb) => int_scores(kb, nb, &qq, nq, scale, simd, out),
                    _ => unreachable!("block keys"),
                }
            } else {
                for j0 in (0..seen).step_by(DQ_CHUNK) {
                    let cn = (seen - j0).min(DQ_CHUNK);
                    keys.dequantize(j0, hd, &mut kbuf[..cn * hd]);
                    let part = &mut part[..nq * cn];
                    Rows::F32(&kbuf).scores_multi(&qrows[..nq], scale, cn, part, simd);
                    for c in 0..nq {
                        scores[c * seen + j0..c * seen + j0 + cn]
                            .copy_from_slice(&part[c * cn..(c + 1) * cn]);
                    }
                }
            }
            let mut sums = [0f32; 4];
            for (c, sum) in sums.iter_mut().enumerate().take(nq) {
                let sc = &mut scores[c * seen..(c + 1) * seen];
                let max = sc.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
                *sum = exp_shifted(sc, max, simd);
                if kv.round_p {
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
            if direct {
                Rows::of_kv(vals).weighted_multi(&scores[..nq * seen], seen, &mut ys[..nq], simd);
            } else {
                for j0 in (0..seen).step_by(DQ_CHUNK) {
                    let cn = (seen - j0).min(DQ_CHUNK);
                    vals.dequantize(j0, hd, &mut vbuf[..cn * hd]);
                    for (c, y) in ys.iter_mut().enumerate().take(nq) {
                        let w = &scores[c * seen + j0..c * seen + j0 + cn];
                        Rows::F32(&vbuf).weighted_sum(w, y, simd);
                    }
                }
            }
            for (y, sum) in ys.iter_mut().zip(sums).take(nq) {
                if !kv.round_p {
                    let inv = 1.0 / sum;
                    for o in y.iter_mut() {
                        *o *= inv;
                    }
                }
                if let Some(b) = kv.rot_v {
                    hadamard(y, b);
                }
            }
        }
    };
    crate::pool::pool().run(nkv * chunks * row_blocks, &|r| r.for_each(work));
    Ok(())
}
