//! The stored layouts of an adapter's matrices and the decode update's kernels: every vector
//! width gives the same bits, a row split into any pieces gives the same bits as whole, and
//! the update riding a matmul equals the update run on its own.

use super::row::*;
use super::*;
use crate::exec::Isa;
use crate::kernels::lowrank::*;
use crate::test_util::values;

/// The vector widths this CPU runs.
fn widths() -> Vec<Isa> {
    #[allow(unused_mut)]
    let mut v = vec![Isa::Scalar];
    #[cfg(target_arch = "x86_64")]
    {
        let f = |s: &str| match s {
            "avx2" => is_x86_feature_detected!("avx2"),
            "fma" => is_x86_feature_detected!("fma"),
            "f16c" => is_x86_feature_detected!("f16c"),
            _ => is_x86_feature_detected!("avx512f"),
        };
        if f("avx2") && f("fma") && f("f16c") {
            v.push(Isa::Avx2);
            if f("avx512f") {
                v.push(Isa::Avx512);
            }
        }
    }
    v
}

/// `rows` rows of `cols` values that are `scale * code` in groups of [`QG`] along each row (a
/// code of 127 or -127 in each group, as Q8_0 quantization leaves them); plain values where
/// `cols` is not a multiple of [`QG`].
fn q8_values(rows: usize, cols: usize, seed: u32) -> Vec<f32> {
    let v = values(rows * cols, seed);
    if !cols.is_multiple_of(QG) {
        return v;
    }
    let scales = values(rows * cols / QG, seed + 7);
    v.chunks(QG)
        .zip(scales)
        .flat_map(|(g, sc)| {
            let s = half::f16::from_f32(0.002 + 0.01 * sc.abs()).to_f32();
            g.iter().enumerate().map(move |(i, &x)| {
                let q = if i == 5 {
                    127f32.copysign(x)
                } else {
                    (x * 127.0).round()
                };
                // A code of 0 reads back as +0 (a code has no sign of its own).
                (q as i8) as f32 * s
            })
        })
        .collect()
}

/// A pair with values exact in `dtype` and not in a narrower type (bf16: values below f16's
/// normal range; f32: full 24-bit values; q8: 8-bit codes with scales, see [`q8_values`]).
fn pair(rank: usize, inp: usize, out: usize, seed: u32, dtype: &str) -> (RawPair, LoraPair) {
    let round = |v: Vec<f32>| -> Vec<f32> {
        v.into_iter()
            .map(|x| match dtype {
                "f16" => half::f16::from_f32(x).to_f32(),
                "bf16" => half::bf16::from_f32(x * 1e-6).to_f32(),
                _ => x,
            })
            .collect()
    };
    let raw = if dtype == "q8" {
        RawPair {
            rank,
            a: q8_values(rank, inp, seed),
            b: q8_values(out, rank, seed + 1),
            scale: 0.75,
        }
    } else {
        RawPair {
            rank,
            a: round(values(rank * inp, seed)),
            b: round(values(out * rank, seed + 1)),
            scale: 0.75,
        }
    };
    let stored = raw.clone().store(out, inp);
    assert_eq!(stored.a.dtype_name(), dtype);
    if dtype == "q8" {
        assert_eq!(stored.bt.dtype_name() == "q8", rank.is_multiple_of(QG));
        let bytes = rank * inp + rank * inp / QG * 4;
        assert_eq!(stored.a.bytes(), bytes, "1.125 bytes a value");
    }
    (raw, stored)
}

/// The same values stored as f32 (or f16/bf16): a storage whose products must be the same bits.
fn plain(m: &LoraMat) -> LoraMat {
    let p = LoraMat::new(m.to_f32());
    assert_ne!(p.dtype_name(), "q8");
    p
}

#[test]
fn stored_layouts_give_back_the_matrices() {
    for rank in [1, 3, 4, 5, 16, 17] {
        for inp in [16, 20, 96] {
            for out in [8, 17, 48] {
                let (raw, p) = pair(rank, inp, out, 3, "f16");
                assert_eq!(p.a_f32(), raw.a, "A rank {rank} in {inp}");
                assert_eq!(p.b_f32(), raw.b, "B rank {rank} out {out}");
            }
        }
    }
    for rank in [1, 4, 5, 32, 64] {
        for inp in [32, 96] {
            for out in [8, 17, 48] {
                let (raw, p) = pair(rank, inp, out, 5, "q8");
                assert_eq!(p.a_f32(), raw.a, "q8 A rank {rank} in {inp}");
                assert_eq!(p.b_f32(), raw.b, "q8 B rank {rank} out {out}");
            }
        }
    }
    // Values that are not codes times one scale per group (a group without its largest code,
    // a negative zero, an input width off the groups) are not stored as 8-bit.
    let mut a = q8_values(4, 64, 9);
    a[5] *= 0.5;
    assert_ne!(LoraMat::a_from(&a, 4, 64).dtype_name(), "q8");
    let mut a = q8_values(4, 64, 9);
    a[40] = -0.0;
    assert_ne!(LoraMat::a_from(&a, 4, 64).dtype_name(), "q8");
    assert_eq!(
        LoraMat::a_from(&q8_values(4, 64, 9), 4, 64).dtype_name(),
        "q8"
    );
    assert_ne!(
        LoraMat::a_from(&q8_values(2, 48, 9), 2, 48).dtype_name(),
        "q8"
    );
    // All zeros (a PEFT adapter's `B` before training) is 8-bit with scale 0.
    let z = LoraMat::bt_from(&[0.0; 32 * 20], 32, 20);
    assert_eq!((z.dtype_name(), z.to_f32()), ("q8", vec![0.0; 640]));
}

#[test]
fn block_products_are_the_same_bits_at_every_width_and_near_exact() {
    for dtype in ["f32", "f16", "bf16", "q8"] {
        for rank in [1, 3, 4, 6, 16] {
            for k in [16usize, 23, 64, 100, 32, 96] {
                if dtype == "q8" && !k.is_multiple_of(QG) {
                    continue;
                }
                let (raw, p) = pair(rank, k, 8, 11, dtype);
                let same = plain(&p.a);
                let x = values(k, 5);
                let mut first: Option<Vec<f32>> = None;
                for simd in widths() {
                    let mut got = vec![0f32; rank];
                    let mut other = vec![0f32; rank];
                    for j0 in (0..rank).step_by(RB) {
                        let rb = RB.min(rank - j0);
                        p.a.block_dots(j0, rb, &x, &mut got[j0..j0 + rb], simd);
                        same.block_dots(j0, rb, &x, &mut other[j0..j0 + rb], simd);
                    }
                    assert_eq!(got, other, "{dtype} rank {rank} k {k} {simd:?} storage");
                    for (j, g) in got.iter().enumerate() {
                        let exact: f64 =
                            (0..k).map(|i| raw.a[j * k + i] as f64 * x[i] as f64).sum();
                        assert!(
                            (*g as f64 - exact).abs() <= 1e-5 * (1.0 + exact.abs()),
                            "{dtype} rank {rank} k {k} {simd:?} row {j}: {g} vs {exact}"
                        );
                    }
                    match &first {
                        None => first = Some(got),
                        Some(f) => assert_eq!(f, &got, "{dtype} rank {rank} k {k} {simd:?}"),
                    }
                }
            }
        }
    }
}

#[test]
fn column_updates_are_the_same_bits_however_the_row_is_split() {
    for dtype in ["f32", "f16", "bf16", "q8"] {
        for (rank, n) in [
            (1usize, 16),
            (5, 40),
            (16, 100),
            (3, 576),
            (32, 100),
            (64, 40),
        ] {
            if dtype == "q8" && !rank.is_multiple_of(QG) {
                continue;
            }
            let (raw, p) = pair(rank, 32, n, 21, dtype);
            let same = plain(&p.bt);
            let u = values(rank, 9);
            let base = values(n, 13);
            let mut whole: Option<Vec<f32>> = None;
            for simd in widths() {
                let mut w = base.clone();
                p.bt.add_cols(n, &u, 0, &mut w, simd);
                let mut other = base.clone();
                same.add_cols(n, &u, 0, &mut other, simd);
                assert_eq!(w, other, "{dtype} rank {rank} n {n} {simd:?} storage");
                for (o, v) in w.iter().enumerate() {
                    let exact = base[o] as f64
                        + (0..rank)
                            .map(|j| u[j] as f64 * raw.b[o * rank + j] as f64)
                            .sum::<f64>();
                    assert!(
                        (*v as f64 - exact).abs() <= 1e-5 * (1.0 + exact.abs()),
                        "{dtype} {simd:?} column {o}"
                    );
                }
                // Pieces of every size from 1 to 37 columns, from every start.
                for step in [1, 3, 7, 8, 16, 37] {
                    let mut got = base.clone();
                    let mut c = 0;
                    while c < n {
                        let e = (c + step).min(n);
                        p.bt.add_cols(n, &u, c, &mut got[c..e], simd);
                        c = e;
                    }
                    assert_eq!(
                        got, w,
                        "{dtype} rank {rank} n {n} {simd:?} pieces of {step}"
                    );
                }
                match &whole {
                    None => whole = Some(w),
                    Some(f) => assert_eq!(f, &w, "{dtype} rank {rank} n {n} {simd:?}"),
                }
            }
        }
    }
}

/// A row's update riding a matmul (the pieces finished as the items write them) gives the
/// same bits as the update run after the product on its own (the batched pass), and both the
/// base product plus `f B (A x)` within rounding, on our block and f16 matrices and on
/// candle's (which make no pool call: the update is all done afterwards).
#[test]
fn a_riding_update_equals_the_update_alone() {
    use crate::kernels::{BlockFmt, BlockMatrix};
    use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
    use candle_core::{Device, Tensor};
    let k = 96;
    for widths in [vec![48usize, 16, 32], vec![50, 20, 30]] {
        let n: usize = widths.iter().sum();
        let w = values(n * k, 17);
        let t = Tensor::from_vec(w.clone(), (n, k), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&t, GgmlDType::Q4_1).unwrap();
        let mats: Vec<(&str, crate::matrix::Linear)> = vec![
            (
                "q4_1",
                std::sync::Arc::new(
                    BlockMatrix::new(BlockFmt::Q4_1, &q.data().unwrap(), n, k).unwrap(),
                ),
            ),
            (
                "f16",
                crate::matrix::build(crate::matrix::Matmul::F16 {
                    pieces: vec![w.iter().map(|&v| half::f16::from_f32(v)).collect()],
                    n,
                    k,
                })
                .unwrap(),
            ),
            (
                "candle f32",
                crate::matrix::build(crate::matrix::Matmul::Candle(
                    QMatMul::from_qtensor(QTensor::quantize(&t, GgmlDType::F32).unwrap()).unwrap(),
                ))
                .unwrap(),
            ),
        ];
        // Part 0: two updates; part 1: none; part 2: one.
        let (r0, p0) = pair(3, k, widths[0], 31, "f16");
        let (r0b, p0b) = pair(5, k, widths[0], 41, "f32");
        let (r2, p2) = pair(6, k, widths[2], 51, "bf16");
        let (r2q, p2q) = pair(32, k, widths[2], 61, "q8");
        let (p0, p0b, p2, p2q) = (Arc::new(p0), Arc::new(p0b), Arc::new(p2), Arc::new(p2q));
        // One state for every call below (as a session keeps it), also across the two plans.
        let mut state = row::RowShared::new();
        let x = values(k, 7);
        for (name, mat) in &mats {
            let parts = vec![
                Part {
                    col: 0,
                    n: widths[0],
                    ups: vec![(p0.clone(), 0.5), (p0b.clone(), -1.25)],
                },
                Part {
                    col: widths[0],
                    n: widths[1],
                    ups: vec![],
                },
                Part {
                    col: widths[0] + widths[1],
                    n: widths[2],
                    ups: vec![(p2.clone(), 2.0), (p2q.clone(), 0.25)],
                },
            ];
            let mut base = vec![0f32; n];
            crate::matrix::matmul_into(&**mat, &x, 1, &mut base).unwrap();
            let plan = row::RowPlan::new(parts, k, n).unwrap();
            let ride = |state: &mut row::RowShared| {
                let mut riding = vec![0f32; n];
                let rider = state.begin(&plan, &x).unwrap();
                crate::matrix::matmul_cols_riding(
                    &**mat,
                    &x,
                    1,
                    &mut riding,
                    (n, 0, n),
                    Some(&rider),
                )
                .unwrap();
                rider.complete(&mut riding).unwrap();
                riding
            };
            let riding = ride(&mut state);
            let mut alone = base.clone();
            let rider = state.begin(&plan, &x).unwrap();
            rider.complete(&mut alone).unwrap();
            assert_eq!(riding, alone, "{name} {widths:?}");
            // Again through the same state (a later call's epoch and counts).
            assert_eq!(ride(&mut state), riding, "{name} {widths:?} again");
            let mut fresh = row::RowShared::new();
            assert_eq!(ride(&mut fresh), riding, "{name} {widths:?} fresh state");
            let delta = |raw: &RawPair, f: f64, out: usize, o: usize| -> f64 {
                let r = raw.rank;
                (0..r)
                    .map(|j| {
                        let ax: f64 = (0..k).map(|i| raw.a[j * k + i] as f64 * x[i] as f64).sum();
                        f * raw.b[o * r + j] as f64 * ax
                    })
                    .sum::<f64>()
                    * if out == 0 { 0.0 } else { 1.0 }
            };
            for o in 0..n {
                let exact = base[o] as f64
                    + if o < widths[0] {
                        delta(&r0, 0.5, widths[0], o) + delta(&r0b, -1.25, widths[0], o)
                    } else if o >= widths[0] + widths[1] {
                        let o2 = o - widths[0] - widths[1];
                        delta(&r2, 2.0, widths[2], o2) + delta(&r2q, 0.25, widths[2], o2)
                    } else {
                        0.0
                    };
                assert!(
                    (riding[o] as f64 - exact).abs() <= 1e-4 * (1.0 + exact.abs()),
                    "{name} {widths:?} column {o}: {} vs {exact}",
                    riding[o]
                );
            }
        }
    }
}
