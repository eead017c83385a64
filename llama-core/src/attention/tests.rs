//! Tests of the attention kernels: every path against the tensor formulation, bit for bit where
//! claimed.

use super::*;
use crate::test_util::Flat;
use candle_core::{Device, D};

/// Test data in `[-2, 2]`.
fn values(n: usize, seed: u32) -> Vec<f32> {
    crate::test_util::values(n, seed)
        .into_iter()
        .map(|v| 2.0 * v)
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
            let got: Vec<f32> = causal(&q, &k, &v, start, scale as f32, round).flat();
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
    // 72: the row-at-a-time path; 64: the 512-bit tile where the CPU has it.
    for hd in [72, 64] {
        f16_storage_case(hd);
    }
}

/// Keys or values `[1, nkv, len, hd]` of seeded test data, stored as f16.
fn f16_kv(nkv: usize, len: usize, hd: usize, seed: u32) -> Tensor {
    Tensor::from_vec(
        values(nkv * len * hd, seed),
        (1, nkv, len, hd),
        &Device::Cpu,
    )
    .unwrap()
    .to_dtype(candle_core::DType::F16)
    .unwrap()
}

fn f16_storage_case(hd: usize) {
    use candle_core::DType;
    let dev = Device::Cpu;
    let (nh, nkv, t, start) = (6, 2, 9, 4);
    let q = Tensor::from_vec(values(nh * t * hd, 3), (1, nh, t, hd), &dev).unwrap();
    let (k16, v16) = (f16_kv(nkv, start + t, hd, 5), f16_kv(nkv, start + t, hd, 7));
    let (k32, v32) = (
        k16.to_dtype(DType::F32).unwrap(),
        v16.to_dtype(DType::F32).unwrap(),
    );
    for round in [false, true] {
        let a: Vec<f32> = causal(&q, &k16, &v16, start, 0.1, round).flat();
        let b: Vec<f32> = causal(&q, &k32, &v32, start, 0.1, round).flat();
        assert_eq!(a, b);
    }
}

#[test]
fn vector_exp_is_within_two_ulp() {
    let mut xs: Vec<f32> = (0..200_000).map(|i| -90.0 + i as f32 * 4.6e-4).collect();
    xs.extend([0.0, -0.0, -1e-30, -87.29, -87.31, -100.0, f32::NEG_INFINITY]);
    let mut got = xs.clone();
    let sum = exp_shifted(&mut got, 0.0, simd());
    let mut want_sum = 0f64;
    for (&x, &g) in xs.iter().zip(&got) {
        let want = (x as f64).exp();
        want_sum += want;
        if x < -87.3 {
            assert!(
                g == 0.0 || (g as f64 - want).abs() < 1e-37,
                "exp({x}) = {g}"
            );
            continue;
        }
        let ulp = f32::EPSILON as f64 * want;
        assert!(
            (g as f64 - want).abs() <= 2.0 * ulp,
            "exp({x}) = {g}, want {want}"
        );
    }
    assert!(((sum as f64) - want_sum).abs() < 1e-5 * want_sum);
}

/// Rows evaluated together (prompt) give exactly what they give one at a time (decode),
/// so a conversation read in pieces gives what it gives read at once.
#[test]
fn a_block_of_rows_equals_the_rows_one_at_a_time() {
    let dev = Device::Cpu;
    // Past 512 positions a decoded row takes the tile on AVX-512 (with as many KV heads
    // as threads): the same values as a block of rows still.
    for (hd, t, start) in [
        (64, 11, 3),
        (72, 11, 3),
        (96, 11, 3),
        (128, 11, 3),
        (64, 3, 600),
    ] {
        let nh = 6;
        let nkv = 2;
        let q = Tensor::from_vec(values(nh * t * hd, 13), (1, nh, t, hd), &dev).unwrap();
        let (k, v) = (
            f16_kv(nkv, start + t, hd, 15),
            f16_kv(nkv, start + t, hd, 17),
        );
        let all: Vec<f32> = causal(&q, &k, &v, start, 0.125, true).flat();
        for i in 0..t {
            let qi = q.narrow(2, i, 1).unwrap().contiguous().unwrap();
            let n = start + i + 1;
            let (ki, vi) = (k.narrow(2, 0, n).unwrap(), v.narrow(2, 0, n).unwrap());
            let one: Vec<f32> = causal(&qi, &ki, &vi, start + i, 0.125, true).flat();
            assert_eq!(
                &all[i * nh * hd..(i + 1) * nh * hd],
                &one[..],
                "hd {hd} row {i}"
            );
        }
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

/// Attention over a cache of types `kt`/`vt` for `t` query rows at `start` (rows `0..start + t`
/// of seeded keys and values stored through the cache), on every kernel path this CPU has.
fn cache_case(
    kt: crate::KvCacheType,
    vt: crate::KvCacheType,
    (nh, nkv, hd): (usize, usize, usize),
    t: usize,
    start: usize,
) -> (Vec<f32>, crate::kv_cache::KvCache, Vec<f32>) {
    use crate::kv_cache::KvCache;
    let total = start + t;
    let mut cache = KvCache::new(1, nkv, hd, total + 300, kt, vt).unwrap();
    cache.reserve(total, &Device::Cpu).unwrap();
    let (k, v) = (values(total * nkv * hd, 21), values(total * nkv * hd, 23));
    cache.append_rows(0, (&k, &v), nkv * hd, total).unwrap();
    cache.advance(total);
    let q = values(nh * t * hd, 25);
    (q, cache, [k, v].concat())
}

fn run(q: &[f32], kv: &Kv<'_>, (nh, hd): (usize, usize), t: usize, start: usize) -> Vec<f32> {
    let queries = Queries {
        data: q,
        heads: nh,
        rows: t,
        head_dim: hd,
        head_stride: t * hd,
        row_stride: hd,
    };
    let mut out = vec![0f32; t * nh * hd];
    causal_into(&queries, kv, start, 0.125, &mut out).unwrap();
    out
}

fn kernels() -> Vec<crate::exec::Settings> {
    use crate::exec::{Kernel, Settings};
    [Kernel::Avx512, Kernel::Avx2, Kernel::Scalar]
        .into_iter()
        .filter(|k| k.is_supported())
        .map(|k| Settings::new(k, true).unwrap())
        .collect()
}

/// A block cache gives exactly what an f32 cache holding its dequantized (rotated) values
/// gives, close to exact attention over the values before quantization, and a block of rows
/// exactly what the rows give one at a time; on every kernel path.
#[test]
fn block_caches_read_in_place() {
    use crate::kv_cache::KvRows;
    use crate::KvCacheType::{F16, F32, Q4_0, Q8_0};
    // Block keys score in integers (queries quantized per block): every SIMD kernel gives the
    // same bits (the scalar path's exponent is another), the first one's kept here by case.
    let mut first: std::collections::HashMap<String, Vec<f32>> = Default::default();
    for settings in kernels() {
        crate::exec::with_settings(settings, || {
            for (kt, vt) in [(Q8_0, Q8_0), (Q4_0, Q4_0), (Q8_0, F16), (F32, Q4_0)] {
                for (shape, t, start) in [
                    ((6, 2, 64), 9, 4),
                    ((8, 2, 128), 3, 70),
                    ((4, 4, 96), 5, 2),
                    ((6, 2, 64), 2, 600),
                ] {
                    let (nh, nkv, hd) = shape;
                    let what = format!("{kt:?}/{vt:?} {shape:?} t {t} start {start} {settings:?}");
                    let (q, cache, kv_src) = cache_case(kt, vt, shape, t, start);
                    let total = start + t;
                    let view = cache.view(0).unwrap();
                    let kv = Kv::of(&view, nkv, total);
                    let got = run(&q, &kv, (nh, hd), t, start);
                    // The same values as f32 rows.
                    let deq = |r: KvRows<'_>| -> Vec<f32> {
                        let mut x = vec![0f32; nkv * view.capacity * hd];
                        r.dequantize(0, hd, &mut x);
                        x
                    };
                    let (k32, v32) = (deq(view.k), deq(view.v));
                    let f32_kv = Kv {
                        k: KvRows::F32(&k32),
                        v: KvRows::F32(&v32),
                        ..Kv::of(&view, nkv, total)
                    };
                    if kt.quantized() {
                        let scalar = settings.isa == crate::exec::Isa::Scalar;
                        let case = format!("{kt:?}/{vt:?} {shape:?} t {t} start {start} {scalar}");
                        let want = first.entry(case).or_insert_with(|| got.clone());
                        assert_eq!(&got, want, "{what}: against the first kernel");
                    } else {
                        assert_eq!(got, run(&q, &f32_kv, (nh, hd), t, start), "{what}");
                    }
                    // Rows one at a time.
                    for i in 0..t {
                        let qi: Vec<f32> = (0..nh)
                            .flat_map(|h| q[(h * t + i) * hd..(h * t + i + 1) * hd].to_vec())
                            .collect();
                        let kv_i = Kv {
                            total: start + i + 1,
                            ..Kv::of(&view, nkv, total)
                        };
                        let one = run(&qi, &kv_i, (nh, hd), 1, start + i);
                        assert_eq!(
                            &got[i * nh * hd..(i + 1) * nh * hd],
                            &one[..],
                            "{what} row {i}"
                        );
                    }
                    // Close to exact attention over the values as given (rotations undone).
                    let (k, v) = kv_src.split_at(kv_src.len() / 2);
                    let heads = |x: &[f32]| {
                        Tensor::from_slice(x, (1, total, nkv, hd), &Device::Cpu)
                            .unwrap()
                            .transpose(1, 2)
                            .unwrap()
                            .contiguous()
                            .unwrap()
                    };
                    let qt = Tensor::from_slice(&q[..], (1, nh, t, hd), &Device::Cpu).unwrap();
                    let want: Vec<f32> = reference(&qt, &heads(k), &heads(v), start, 0.125, false)
                        .flatten_all()
                        .unwrap()
                        .to_vec1()
                        .unwrap();
                    // (Values in [-2, 2]: a q4_0 step is up to 0.25, a q8_0 step 0.016.)
                    let (max_tol, mean_tol) = if kt == Q4_0 || vt == Q4_0 {
                        (0.6, 0.08)
                    } else {
                        (0.06, 0.01)
                    };
                    let diffs: Vec<f32> =
                        got.iter().zip(&want).map(|(a, b)| (a - b).abs()).collect();
                    let max = diffs.iter().fold(0f32, |m, &d| m.max(d));
                    let mean = diffs.iter().sum::<f32>() / diffs.len() as f32;
                    assert!(
                        max < max_tol && mean < mean_tol,
                        "{what}: max diff {max}, mean {mean}"
                    );
                }
            }
        });
    }
}
