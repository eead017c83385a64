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

/// Query rows per work item.
const ROWS: usize = 8;

/// A `(1, heads, len, head_dim)` f32 or f16 tensor's storage, its first element and head
/// stride; rows within a head must be contiguous.
fn head_view(t: &Tensor) -> Result<(impl std::ops::Deref<Target = Storage> + '_, usize, usize)> {
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
enum Rows<'a> {
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

    fn dot(self, q: &[f32], j: usize, simd: bool) -> f32 {
        let d = q.len();
        match self {
            Rows::F32(v) => dot(q, &v[j * d..(j + 1) * d], simd),
            Rows::F16(v) => dot_f16(q, &v[j * d..(j + 1) * d], simd),
        }
    }

    fn axpy(self, acc: &mut [f32], w: f32, j: usize, simd: bool) {
        let d = acc.len();
        match self {
            Rows::F32(v) => axpy(acc, w, &v[j * d..(j + 1) * d], simd),
            Rows::F16(v) => axpy_f16(acc, w, &v[j * d..(j + 1) * d], simd),
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let mut i = 0;
    while i + 16 <= n {
        s0 = _mm256_fmadd_ps(
            _mm256_loadu_ps(a.as_ptr().add(i)),
            _mm256_loadu_ps(b.as_ptr().add(i)),
            s0,
        );
        s1 = _mm256_fmadd_ps(
            _mm256_loadu_ps(a.as_ptr().add(i + 8)),
            _mm256_loadu_ps(b.as_ptr().add(i + 8)),
            s1,
        );
        i += 16;
    }
    while i + 8 <= n {
        s0 = _mm256_fmadd_ps(
            _mm256_loadu_ps(a.as_ptr().add(i)),
            _mm256_loadu_ps(b.as_ptr().add(i)),
            s0,
        );
        i += 8;
    }
    let v = _mm256_add_ps(s0, s1);
    let s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    let mut sum = _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps::<1>(s2, s2)));
    while i < n {
        sum += a[i] * b[i];
        i += 1;
    }
    sum
}

/// `acc += w * v`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn axpy_avx2(acc: &mut [f32], w: f32, v: &[f32]) {
    use std::arch::x86_64::*;
    let n = acc.len().min(v.len());
    let wv = _mm256_set1_ps(w);
    let mut i = 0;
    while i + 8 <= n {
        let p = acc.as_mut_ptr().add(i);
        _mm256_storeu_ps(
            p,
            _mm256_fmadd_ps(wv, _mm256_loadu_ps(v.as_ptr().add(i)), _mm256_loadu_ps(p)),
        );
        i += 8;
    }
    while i < n {
        acc[i] += w * v[i];
        i += 1;
    }
}

/// [`dot_avx2`] with `b` stored as f16: the same lanes and order, so an f16 cache gives
/// exactly what an f32 cache holding the same rounded values would.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_f16_avx2(a: &[f32], b: &[f16]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let ld = |i: usize| _mm256_cvtph_ps(_mm_loadu_si128(b.as_ptr().add(i) as *const __m128i));
    let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let mut i = 0;
    while i + 16 <= n {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a.as_ptr().add(i)), ld(i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a.as_ptr().add(i + 8)), ld(i + 8), s1);
        i += 16;
    }
    while i + 8 <= n {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a.as_ptr().add(i)), ld(i), s0);
        i += 8;
    }
    let v = _mm256_add_ps(s0, s1);
    let s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    let mut sum = _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps::<1>(s2, s2)));
    while i < n {
        sum += a[i] * b[i].to_f32();
        i += 1;
    }
    sum
}

/// `acc += w * v` with `v` stored as f16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn axpy_f16_avx2(acc: &mut [f32], w: f32, v: &[f16]) {
    use std::arch::x86_64::*;
    let n = acc.len().min(v.len());
    let wv = _mm256_set1_ps(w);
    let mut i = 0;
    while i + 8 <= n {
        let p = acc.as_mut_ptr().add(i);
        let x = _mm256_cvtph_ps(_mm_loadu_si128(v.as_ptr().add(i) as *const __m128i));
        _mm256_storeu_ps(p, _mm256_fmadd_ps(wv, x, _mm256_loadu_ps(p)));
        i += 8;
    }
    while i < n {
        acc[i] += w * v[i].to_f32();
        i += 1;
    }
}

fn dot_f16(a: &[f32], b: &[f16], simd: bool) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: avx2, fma and f16c were detected at run time.
        return unsafe { dot_f16_avx2(a, b) };
    }
    let _ = simd;
    a.iter().zip(b).map(|(x, y)| x * y.to_f32()).sum()
}

fn axpy_f16(acc: &mut [f32], w: f32, v: &[f16], simd: bool) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: avx2, fma and f16c were detected at run time.
        return unsafe { axpy_f16_avx2(acc, w, v) };
    }
    let _ = simd;
    for (a, x) in acc.iter_mut().zip(v) {
        *a += w * x.to_f32();
    }
}

/// The AVX2/FMA/F16C paths, exactly when the matmul kernels use theirs (the same detection
/// and the same `LLAMA_CORE_KERNEL=scalar` override).
fn simd() -> bool {
    crate::kernels::simd()
}

fn dot(a: &[f32], b: &[f32], simd: bool) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: avx2 and fma were detected at run time.
        return unsafe { dot_avx2(a, b) };
    }
    let _ = simd;
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn axpy(acc: &mut [f32], w: f32, v: &[f32], simd: bool) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: avx2 and fma were detected at run time.
        return unsafe { axpy_avx2(acc, w, v) };
    }
    let _ = simd;
    for (a, x) in acc.iter_mut().zip(v) {
        *a += w * x;
    }
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
    if hd_k != hd || v.dims4()? != (1, nkv, total, hd) || total != start + t || nh % nkv != 0 {
        return Err(Error::InvalidArgument(format!(
            "attention: q {:?}, k {:?}, v {:?}, start {start}",
            q.dims(),
            k.dims(),
            v.dims()
        )));
    }
    let group = nh / nkv;
    let (qs, q0, q_head) = head_view(q)?;
    let (ks, k0, k_head) = head_view(k)?;
    let (vs, v0, v_head) = head_view(v)?;
    let qs = match &*qs {
        Storage::Cpu(CpuStorage::F32(v)) => &v[..],
        _ => return Err(Error::InvalidArgument("attention: f32 queries only".into())),
    };
    let (ks, vs) = (Rows::of(&ks), Rows::of(&vs));
    let width = nh * hd;
    let mut out = vec![0f32; t * width];
    let out_ptr = out.as_mut_ptr() as usize;
    let simd = simd();
    let row_blocks = t.div_ceil(ROWS);
    let work = |item: usize| {
        let (h, rb) = (item / row_blocks, item % row_blocks);
        let kvh = h / group;
        let keys = ks.from(k0 + kvh * k_head);
        let vals = vs.from(v0 + kvh * v_head);
        let mut scores = Vec::with_capacity(total);
        let mut q16 = Vec::with_capacity(if round_f16 { hd } else { 0 });
        for i in rb * ROWS..t.min((rb + 1) * ROWS) {
            let qrow = &qs[q0 + h * q_head + i * hd..][..hd];
            let qrow = if round_f16 {
                q16.clear();
                q16.extend(qrow.iter().map(|v| half::f16::from_f32(*v).to_f32()));
                &q16[..]
            } else {
                qrow
            };
            let seen = start + i + 1;
            scores.clear();
            let mut max = f32::NEG_INFINITY;
            for j in 0..seen {
                let s = keys.dot(qrow, j, simd) * scale;
                max = max.max(s);
                scores.push(s);
            }
            let mut sum = 0f32;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            // SAFETY: row i, columns of head h, are written by this item only.
            let y = unsafe {
                std::slice::from_raw_parts_mut((out_ptr as *mut f32).add(i * width + h * hd), hd)
            };
            if round_f16 {
                let inv = 1.0 / sum;
                for (j, &p) in scores.iter().enumerate() {
                    let p = half::f16::from_f32(p * inv).to_f32();
                    vals.axpy(y, p, j, simd);
                }
            } else {
                for (j, &p) in scores.iter().enumerate() {
                    vals.axpy(y, p, j, simd);
                }
                let inv = 1.0 / sum;
                for o in y.iter_mut() {
                    *o *= inv;
                }
            }
        }
    };
    crate::pool::pool().run(nh * row_blocks, &|r| r.for_each(work));
    Ok(Tensor::from_vec(out, (1, t, width), q.device())?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, D};

    fn values(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s as f32 / u32::MAX as f32) * 4.0 - 2.0
            })
            .collect()
    }

    /// The tensor-op formulation: full scores, additive mask, softmax, matmul.
    fn reference(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        start: usize,
        scale: f64,
        round_f16: bool,
    ) -> Tensor {
        let f16 = |t: Tensor| {
            if round_f16 {
                t.to_dtype(candle_core::DType::F16)
                    .unwrap()
                    .to_dtype(candle_core::DType::F32)
                    .unwrap()
            } else {
                t
            }
        };
        let (_, nh, t, hd) = q.dims4().unwrap();
        let nkv = k.dim(1).unwrap();
        let total = start + t;
        let k = k.squeeze(0).unwrap().repeat_interleave_heads(nh / nkv);
        let v = v.squeeze(0).unwrap().repeat_interleave_heads(nh / nkv);
        let q = f16(q.squeeze(0).unwrap());
        let att = (q.matmul(&k.t().unwrap()).unwrap() * scale).unwrap();
        let mut mask = vec![0f32; t * total];
        for i in 0..t {
            for j in start + i + 1..total {
                mask[i * total + j] = f32::NEG_INFINITY;
            }
        }
        let mask = Tensor::from_vec(mask, (t, total), &Device::Cpu).unwrap();
        let att = att.broadcast_add(&mask).unwrap();
        let att = f16(candle_nn::ops::softmax(&att, D::Minus1).unwrap());
        att.matmul(&v)
            .unwrap()
            .transpose(0, 1)
            .unwrap()
            .reshape((1, t, nh * hd))
            .unwrap()
    }

    trait Heads {
        fn repeat_interleave_heads(&self, n: usize) -> Tensor;
    }
    impl Heads for Tensor {
        fn repeat_interleave_heads(&self, n: usize) -> Tensor {
            let (h, l, d) = self.dims3().unwrap();
            self.unsqueeze(1)
                .unwrap()
                .broadcast_as((h, n, l, d))
                .unwrap()
                .reshape((h * n, l, d))
                .unwrap()
                .contiguous()
                .unwrap()
        }
    }

    #[test]
    fn matches_the_tensor_formulation() {
        for (nh, nkv, hd, t, start) in [(6, 2, 16, 5, 0), (4, 4, 12, 1, 9), (9, 3, 64, 20, 7)] {
            let dev = Device::Cpu;
            let q = Tensor::from_vec(values(nh * t * hd, 3), (1, nh, t, hd), &dev).unwrap();
            // K/V as the cache holds them: a longer buffer, narrowed to the positions in use.
            let cap = start + t + 5;
            let k = Tensor::from_vec(values(nkv * cap * hd, 5), (1, nkv, cap, hd), &dev)
                .unwrap()
                .narrow(2, 0, start + t)
                .unwrap();
            let v = Tensor::from_vec(values(nkv * cap * hd, 7), (1, nkv, cap, hd), &dev)
                .unwrap()
                .narrow(2, 0, start + t)
                .unwrap();
            let scale = 1.0 / (hd as f64).sqrt();
            // Plain f32, and with llama.cpp's f16 roundings of the queries and the weights.
            for round in [false, true] {
                let got: Vec<f32> = causal(&q, &k, &v, start, scale as f32, round)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let want: Vec<f32> = reference(
                    &q,
                    &k.contiguous().unwrap(),
                    &v.contiguous().unwrap(),
                    start,
                    scale,
                    round,
                )
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
                let d = got
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(
                    d < 1e-5,
                    "{nh}/{nkv} heads, t {t}, start {start}, f16 {round}: max diff {d}"
                );
            }
        }
    }

    /// An f16 cache gives exactly what an f32 cache holding the same rounded values gives.
    #[test]
    fn f16_storage_equals_rounded_f32_storage() {
        use candle_core::DType;
        let dev = Device::Cpu;
        let (nh, nkv, hd, t, start) = (6, 2, 72, 9, 4);
        let q = Tensor::from_vec(values(nh * t * hd, 3), (1, nh, t, hd), &dev).unwrap();
        let kv = |seed| {
            Tensor::from_vec(
                values(nkv * (start + t) * hd, seed),
                (1, nkv, start + t, hd),
                &dev,
            )
            .unwrap()
            .to_dtype(DType::F16)
            .unwrap()
        };
        let (k16, v16) = (kv(5), kv(7));
        let (k32, v32) = (
            k16.to_dtype(DType::F32).unwrap(),
            v16.to_dtype(DType::F32).unwrap(),
        );
        for round in [false, true] {
            let a: Vec<f32> = causal(&q, &k16, &v16, start, 0.1, round)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let b: Vec<f32> = causal(&q, &k32, &v32, start, 0.1, round)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert_eq!(a, b);
        }
    }

    #[test]
    fn rejects_mismatched_shapes() {
        let dev = Device::Cpu;
        let q = Tensor::zeros((1, 4, 2, 8), candle_core::DType::F32, &dev).unwrap();
        let k = Tensor::zeros((1, 3, 2, 8), candle_core::DType::F32, &dev).unwrap();
        assert!(causal(&q, &k, &k, 0, 1.0, false).is_err());
        let k = Tensor::zeros((1, 2, 3, 8), candle_core::DType::F32, &dev).unwrap();
        assert!(causal(&q, &k, &k, 0, 1.0, false).is_err());
    }
}
