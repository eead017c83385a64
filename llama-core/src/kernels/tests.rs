//! Tests of the matmul kernels: every path against the scalar one and f64 references.

use super::*;
use crate::test_util::values;
use crate::test_util::Flat;

/// The block formats our block kernels run.
const BLOCK_TYPES: [GgmlDType; 5] = [
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q5_0,
    GgmlDType::Q5_1,
    GgmlDType::Q8_0,
];

/// The k-quants: ours (Q4_K, Q5_K, Q6_K) and candle's (Q2_K, Q3_K).
const K_TYPES: [GgmlDType; 5] = [
    GgmlDType::Q2K,
    GgmlDType::Q3K,
    GgmlDType::Q4K,
    GgmlDType::Q5K,
    GgmlDType::Q6K,
];
use candle_core::quantized::QTensor;
use half::f16;

/// The 32-element block formats and candle's name of each.
const BLOCK32_TYPES: [(BlockFmt, GgmlDType); 5] = [
    (BlockFmt::Q4_0, GgmlDType::Q4_0),
    (BlockFmt::Q4_1, GgmlDType::Q4_1),
    (BlockFmt::Q5_0, GgmlDType::Q5_0),
    (BlockFmt::Q5_1, GgmlDType::Q5_1),
    (BlockFmt::Q8_0, GgmlDType::Q8_0),
];

/// Every path available on this CPU gives the scalar path's products (up to float
/// summation order), and the scalar path matches an f64 product of the dequantized weights
/// with the quantized activations; odd shapes exercise partial tiles.
#[test]
fn block_matmul_matches_scalar_and_reference() {
    for (fmt, dt) in BLOCK32_TYPES {
        for (n, k, m) in [
            (37, 96, 5),
            (8, 64, 1),
            (13, 32, 9),
            (16, 64, 6),
            (24, 96, 4),
        ] {
            let w = values(n * k, 7 + n as u32);
            let q =
                QTensor::quantize(&Tensor::from_vec(w, (n, k), &Device::Cpu).unwrap(), dt).unwrap();
            let wd: Vec<f32> = q.dequantize(&Device::Cpu).flat();
            let mat = BlockMatrix::new(fmt, &q.data().unwrap(), n, k).unwrap();
            let x = values(m * k, 11 + m as u32);
            let y: Vec<f32> = mat
                .forward(&Tensor::from_vec(x.clone(), (m, k), &Device::Cpu).unwrap())
                .flat();
            let nb = k / QK;
            for r in 0..m {
                let mut xq = vec![ZERO_X; nb];
                quantize_row(&x[r * k..(r + 1) * k], &mut xq);
                for c in 0..n {
                    let s = dot_scalar(fmt, &mat.gguf_row(c), &xq);
                    let got = y[r * n + c];
                    assert!(
                        (got - s).abs() < 1e-4 * (1.0 + s.abs()),
                        "{fmt:?} {n}x{k}x{m}: simd {got} vs scalar {s} at {r},{c}"
                    );
                    let mut want = 0f64;
                    for (b, xb) in xq.iter().enumerate() {
                        for i in 0..QK {
                            want += wd[c * k + b * QK + i] as f64 * (xb.d * xb.qs[i] as f32) as f64;
                        }
                    }
                    // Q4_1's s_x is rounded through f16, as in ggml.
                    assert!(
                        (s as f64 - want).abs() < 2e-2,
                        "{fmt:?} {r},{c}: {s} vs {want}"
                    );
                }
            }
        }
    }
}

/// Against candle's own quantized matmul on model-sized shapes (both quantize the
/// activations to 8 bits, so they agree to that rounding).
#[test]
fn block_matmul_agrees_with_candle() {
    use candle_core::quantized::QMatMul;
    use candle_core::Module;
    for dt in BLOCK_TYPES {
        for (n, k, m) in [(64, 1536, 1), (72, 576, 7)] {
            let w = values(n * k, 3);
            let q =
                QTensor::quantize(&Tensor::from_vec(w, (n, k), &Device::Cpu).unwrap(), dt).unwrap();
            let ours = BlockMatrix::new(BlockFmt::from_ggml(dt).unwrap(), &q.data().unwrap(), n, k)
                .unwrap();
            let theirs = QMatMul::from_qtensor(q).unwrap();
            let x = Tensor::from_vec(values(m * k, 5), (1, m, k), &Device::Cpu).unwrap();
            let a: Vec<f32> = ours.forward(&x).flat();
            let b: Vec<f32> = theirs.forward(&x).flat();
            let scale = b.iter().fold(0f32, |mx, v| mx.max(v.abs()));
            let d = a
                .iter()
                .zip(&b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            assert!(
                d < 0.02 * scale,
                "{dt:?} {n}x{k}x{m}: max diff {d} (scale {scale})"
            );
        }
    }
}

/// k-quant matrices on our pool give candle's own results (same block dot products and
/// activation quantization), and their rows are candle's dequantization.
#[test]
fn k_quant_matrices_equal_candles() {
    use candle_core::quantized::QMatMul;
    use candle_core::Module;
    for dt in K_TYPES {
        let (n, k) = (10, 512);
        let q = QTensor::quantize(
            &Tensor::from_vec(values(n * k, 13), (n, k), &Device::Cpu).unwrap(),
            dt,
        )
        .unwrap();
        let ours = k_matrix(dt, &q.data().unwrap(), n, k).unwrap().unwrap();
        let full: Vec<f32> = q.dequantize(&Device::Cpu).flat();
        let theirs = QMatMul::from_qtensor(q).unwrap();
        for m in [1usize, 6] {
            let x = Tensor::from_vec(values(m * k, 17), (1, m, k), &Device::Cpu).unwrap();
            let a: Vec<f32> = ours.forward(&x).flat();
            let b: Vec<f32> = theirs.forward(&x).flat();
            for (p, q) in a.iter().zip(&b) {
                assert!(
                    (p - q).abs() <= 1e-5 * (1.0 + q.abs()),
                    "{dt:?} m={m}: {p} vs {q}"
                );
            }
        }
        let rows: Vec<f32> = ours.rows(&[7, 2]).flat();
        assert_eq!(&rows[..k], &full[7 * k..8 * k], "{dt:?}");
        assert_eq!(&rows[k..], &full[2 * k..3 * k], "{dt:?}");
        assert!(ours.rows(&[10]).is_err());
        assert_eq!(ours.dtype(), dt);
        assert!(k_matrix(dt, &[0u8; 7], n, k).unwrap().is_err());
    }
}

#[test]
fn rows_equal_candles_dequantization() {
    // 9 rows keep the GGUF layout, 16 are stored as interleaved groups.
    for (n, k) in [(9, 64), (16, 96)] {
        for dt in BLOCK_TYPES {
            let q = QTensor::quantize(
                &Tensor::from_vec(values(n * k, 9), (n, k), &Device::Cpu).unwrap(),
                dt,
            )
            .unwrap();
            let full: Vec<f32> = q.dequantize(&Device::Cpu).flat();
            let bytes = q.data().unwrap();
            let mat = BlockMatrix::new(BlockFmt::from_ggml(dt).unwrap(), &bytes, n, k).unwrap();
            let repack = repack();
            assert_eq!(mat.group > 0, repack && n % G == 0);
            let row_bytes = bytes.len() / n;
            for c in 0..n {
                assert_eq!(mat.gguf_row(c), &bytes[c * row_bytes..(c + 1) * row_bytes]);
            }
            let ids = [3usize, 0, 8, n - 1];
            let got: Vec<f32> = mat.rows(&ids.map(|i| i as u32)).flat();
            for (i, &id) in ids.iter().enumerate() {
                assert_eq!(
                    &got[i * k..(i + 1) * k],
                    &full[id * k..(id + 1) * k],
                    "{dt:?}"
                );
            }
            assert!(mat.rows(&[n as u32]).is_err());
        }
    }
}

#[test]
fn f16_matmul_matches_f64_for_decode_and_prompt_shapes() {
    for (n, k) in [(21, 100), (32, 100), (48, 7)] {
        f16_case(n, k);
    }
}

fn f16_case(n: usize, k: usize) {
    let w: Vec<f32> = values(n * k, 4)
        .iter()
        .map(|v| f16::from_f32(*v).to_f32())
        .collect();
    let mat = F16Matrix::from_rows(w.iter().map(|v| f16::from_f32(*v)).collect(), n, k);
    for m in [1usize, 3, 6, 7, 12, 13, 25, 61] {
        let x = values(m * k, 8 + m as u32);
        let y: Vec<f32> = mat
            .forward(&Tensor::from_vec(x.clone(), (1, m, k), &Device::Cpu).unwrap())
            .flat();
        for r in 0..m {
            for c in 0..n {
                let want: f64 = (0..k)
                    .map(|i| w[c * k + i] as f64 * x[r * k + i] as f64)
                    .sum();
                assert!((y[r * n + c] as f64 - want).abs() < 1e-4, "m={m} {r},{c}");
            }
        }
    }
    let rows: Vec<f32> = mat.rows(&[2, n as u32 - 1]).flat();
    assert_eq!(&rows[..k], &w[2 * k..3 * k]);
    assert_eq!(&rows[k..], &w[(n - 1) * k..n * k]);
}

/// The 512-bit f16 tiles (one group, two groups) give bit for bit what the 256-bit one
/// gives.
#[cfg(target_arch = "x86_64")]
#[test]
fn f16_wide_tile_equals_narrow_tile() {
    if !(is_x86_feature_detected!("avx512f") && simd()) {
        return;
    }
    let k = 77;
    let w: Vec<f16> = values(FG * k, 31)
        .iter()
        .map(|v| f16::from_f32(*v))
        .collect();
    let x = values(4 * k, 32);
    let xp: [*const f32; 4] = std::array::from_fn(|r| x[r * k..].as_ptr());
    let (mut a, mut b) = ([[0f32; FG]; 4], [[0f32; FG]; 4]);
    let (mut a1, mut b1) = ([[0f32; FG]; 1], [[0f32; FG]; 1]);
    // SAFETY: the features were detected above; `w` holds k positions of 16 values and
    // every row of `x` k values.
    unsafe {
        f16_group_avx512::<4, 1>(w.as_ptr(), xp, k, &mut a);
        f16_group_avx2::<4, 1>(w.as_ptr(), xp, k, &mut b);
        f16_group_avx512::<1, 4>(w.as_ptr(), [xp[0]], k, &mut a1);
        f16_group_avx2::<1, 4>(w.as_ptr(), [xp[0]], k, &mut b1);
    }
    assert_eq!(a, b);
    assert_eq!(a1, b1);
    // Two groups at once.
    let w2: Vec<f16> = values(2 * FG * k, 33)
        .iter()
        .map(|v| f16::from_f32(*v))
        .collect();
    let mut w2f = vec![0f32; w2.len()];
    let mut pair = [[0f32; 2 * FG]; 4];
    let (mut g0, mut g1) = ([[0f32; FG]; 4], [[0f32; FG]; 4]);
    // SAFETY: as above; `w2` holds two groups.
    unsafe {
        f16_to_f32_avx512(w2.as_ptr(), w2f.as_mut_ptr(), w2.len());
        f32_group2_avx512::<4>(w2f.as_ptr(), xp, k, &mut pair);
        f16_group_avx2::<4, 1>(w2.as_ptr(), xp, k, &mut g0);
        f16_group_avx2::<4, 1>(w2[FG * k..].as_ptr(), xp, k, &mut g1);
    }
    for r in 0..4 {
        assert_eq!(pair[r][..FG], g0[r]);
        assert_eq!(pair[r][FG..], g1[r]);
    }
}

#[test]
fn swiglu_matches_candles_silu_times_up() {
    // Rows that do not divide the pool's chunks: chunks start and end inside rows.
    let (rows, width) = (5, 2 * 4096 + 13);
    let n = rows * width;
    let mut g = values(n, 41);
    for v in g.iter_mut() {
        *v *= 12.0;
    }
    g[0] = 100.0;
    g[1] = -100.0;
    g[2] = 0.0;
    let u = values(n, 42);
    let (gt, ut) = (
        Tensor::from_vec(g, (rows, width), &Device::Cpu).unwrap(),
        Tensor::from_vec(u, (rows, width), &Device::Cpu).unwrap(),
    );
    let got: Vec<f32> = swiglu(&gt, &ut).flat();
    let want: Vec<f32> = (candle_nn::ops::silu(&gt).unwrap() * &ut).flat();
    for (i, (a, b)) in got.iter().zip(&want).enumerate() {
        assert!((a - b).abs() <= 1e-6 * (1.0 + b.abs()), "{i}: {a} vs {b}");
    }
    assert!(swiglu(&gt, &gt.narrow(1, 0, 5).unwrap()).is_err());
}

#[test]
fn simd_activation_quantization_equals_scalar() {
    let mut x = values(QK * 40, 21);
    // Exact ties after scaling, and an all-zero block.
    x[5] = 0.5;
    x[6] = 1.0;
    for v in &mut x[64..96] {
        *v = 0.0;
    }
    let mut a = vec![ZERO_X; 40];
    let mut b = vec![ZERO_X; 40];
    quantize_row(&x, &mut a);
    quantize_row_scalar(&x, &mut b);
    for (p, q) in a.iter().zip(&b) {
        assert_eq!(p.qs, q.qs);
        assert_eq!((p.d, p.s, p.sum), (q.d, q.s, q.sum));
    }
}

#[test]
fn quantized_activations_follow_ggml() {
    let mut out = [ZERO_X; 1];
    let mut x = [0f32; QK];
    x[0] = 1.0;
    x[1] = -0.5;
    x[2] = 0.25 / 127.0 * 127.0 * 0.5 / 127.0 * 127.0; // 0.125 -> 15.875 -> 16
    quantize_row(&x, &mut out);
    assert_eq!(out[0].qs[0], 127);
    assert_eq!(out[0].qs[1], -64); // -63.5 rounds to even
    assert_eq!(out[0].qs[2], 16);
    assert_eq!(out[0].d, f16::from_f32(1.0 / 127.0).to_f32());
    let zero = [0f32; QK];
    quantize_row(&zero, &mut out);
    assert!(out[0].qs.iter().all(|&q| q == 0) && out[0].d == 0.0);
}

/// Which of our matrices compute each row alike whatever rows come with it, checked: every
/// row of a 13-row product against that row alone and inside other sub-batches. Those that
/// claim it (`batch_invariant`) must hold it bit for bit; the rest are reported.
#[test]
fn batch_invariant_matrices_give_each_row_the_same_bits() {
    // 64 rows: interleaved groups; 70: the file's row layout, with partial tiles.
    for n in [64, 70] {
        batch_invariance_case(n, 512);
    }
}

fn batch_invariance_case(n: usize, k: usize) {
    let w = values(n * k, 91);
    let wt = Tensor::from_vec(w.clone(), (n, k), &Device::Cpu).unwrap();
    let mut mats: Vec<(String, std::sync::Arc<dyn WeightMatrix>)> = vec![];
    for (fmt, dt) in BLOCK32_TYPES {
        let q = QTensor::quantize(&wt, dt).unwrap();
        mats.push((
            format!("{dt:?}"),
            std::sync::Arc::new(BlockMatrix::new(fmt, &q.data().unwrap(), n, k).unwrap()),
        ));
    }
    for dt in K_TYPES {
        let q = QTensor::quantize(&wt, dt).unwrap();
        mats.push((
            format!("{dt:?}"),
            k_matrix(dt, &q.data().unwrap(), n, k).unwrap().unwrap(),
        ));
    }
    mats.push((
        "F16".into(),
        std::sync::Arc::new(F16Matrix::from_rows(
            w.iter().map(|v| f16::from_f32(*v)).collect(),
            n,
            k,
        )),
    ));
    let m = 13;
    let x = values(m * k, 92);
    let product = |mat: &dyn WeightMatrix, rows: std::ops::Range<usize>| -> Vec<u32> {
        let r = rows.len();
        let mut out = vec![0f32; r * n];
        crate::matrix::matmul_into(mat, &x[rows.start * k..rows.end * k], r, &mut out).unwrap();
        out.iter().map(|v| v.to_bits()).collect()
    };
    for (name, mat) in &mats {
        let all = product(&**mat, 0..m);
        let mut same = true;
        for r in 0..m {
            same &= product(&**mat, r..r + 1) == all[r * n..(r + 1) * n];
        }
        // Every tile height of every kernel (1 to 8 rows, and more than one tile).
        for (a, b) in [
            (0, 2),
            (0, 3),
            (2, 6),
            (3, 8),
            (6, 12),
            (4, 11),
            (5, 13),
            (1, 12),
        ] {
            same &= product(&**mat, a..b) == all[a * n..b * n];
        }
        if mat.batch_invariant() {
            assert!(
                same,
                "{name} claims batch invariance but a row changed with its batch"
            );
        }
        // Rows computed as each alone, in one product where the matrix has one.
        let mut out = vec![0f32; m * n];
        crate::matrix::matmul_into_as_alone(&**mat, &x, m, &mut out).unwrap();
        for r in 0..m {
            let alone: Vec<u32> = out[r * n..(r + 1) * n]
                .iter()
                .map(|v| v.to_bits())
                .collect();
            assert_eq!(alone, product(&**mat, r..r + 1), "{name}: row {r} as alone");
        }
        println!(
            "{name} [{n}, {k}]: rows {} with their batch",
            if same { "never change" } else { "change" }
        );
    }
}

/// `rows_into` (a training tile) gives what `row_into` gives row by row, for every layout:
/// f16 interleaved groups (whole groups and the rows around them) and plain rows, the block
/// formats in groups and in the file's layout, the k-quants; out-of-range rows are refused.
#[test]
fn row_ranges_equal_rows_one_by_one() {
    let mut mats: Vec<(String, std::sync::Arc<dyn WeightMatrix>)> = vec![];
    for (n, k) in [(48, 40), (20, 32), (32, 512)] {
        let w: Vec<f16> = values(n * k, 3).iter().map(|v| f16::from_f32(*v)).collect();
        mats.push((
            format!("f16 {n}x{k}"),
            std::sync::Arc::new(F16Matrix::from_rows(w, n, k)),
        ));
        if k % 32 == 0 {
            for dt in BLOCK_TYPES {
                let q = QTensor::quantize(
                    &Tensor::from_vec(values(n * k, 5), (n, k), &Device::Cpu).unwrap(),
                    dt,
                )
                .unwrap();
                let fmt = BlockFmt::from_ggml(dt).unwrap();
                let m = BlockMatrix::new(fmt, &q.data().unwrap(), n, k).unwrap();
                mats.push((format!("{dt:?} {n}x{k}"), std::sync::Arc::new(m)));
            }
        }
        if k % 256 == 0 {
            for dt in [GgmlDType::Q4K, GgmlDType::Q6K] {
                let q = QTensor::quantize(
                    &Tensor::from_vec(values(n * k, 7), (n, k), &Device::Cpu).unwrap(),
                    dt,
                )
                .unwrap();
                let m = k_matrix(dt, &q.data().unwrap(), n, k).unwrap().unwrap();
                mats.push((format!("{dt:?} {n}x{k}"), m));
            }
        }
    }
    for (name, m) in &mats {
        let (n, k) = m.shape();
        for (start, count) in [(0, n), (16, n - 16), (3, 17), (n - 1, 1), (5, 0)] {
            let mut got = vec![f32::NAN; count * k];
            m.rows_into(start, &mut got).unwrap();
            let mut want = vec![0f32; count * k];
            for r in 0..count {
                m.row_into(start + r, &mut want[r * k..(r + 1) * k])
                    .unwrap();
            }
            assert_eq!(got, want, "{name} rows {start}..{}", start + count);
        }
        assert!(
            m.rows_into(n - 1, &mut vec![0f32; 2 * k]).is_err(),
            "{name}"
        );
        assert!(m.rows_into(0, &mut vec![0f32; k + 1]).is_err(), "{name}");
        // Training panels: the same values transposed, for 16 and 32 rows, whole blocks and
        // ranges inside them.
        if m.panels() {
            let mut rows = vec![0f32; n * k];
            m.rows_into(0, &mut rows).unwrap();
            for (r0, count) in [(0, 16), (0, 32), (16, 16), (n - 16, 16)] {
                if r0 + count > n {
                    continue;
                }
                for cols in [0..k, 0..k / 2, k / 4..k, 3..k - 5] {
                    let mut panel = vec![f32::NAN; cols.len() * PANEL];
                    m.panel_into(r0..r0 + count, cols.clone(), &mut panel);
                    for p in 0..cols.len() {
                        for j in 0..count {
                            assert_eq!(
                                panel[p * PANEL + j].to_bits(),
                                rows[(r0 + j) * k + cols.start + p].to_bits(),
                                "{name} panel rows {r0}+{count} cols {cols:?} [{p}, {j}]"
                            );
                        }
                    }
                }
            }
            let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                m.panel_into(n..n + 16, 0..k, &mut vec![0f32; k * PANEL])
            }));
            assert!(res.is_err(), "{name}: rows past the matrix");
        }
    }
    // The layouts with panels: f16 and the block formats without fifth bits, in groups.
    let with_panels: Vec<&str> = mats
        .iter()
        .filter(|(_, m)| m.panels())
        .map(|(n, _)| n.as_str())
        .collect();
    if repack() {
        assert!(with_panels.iter().any(|n| n.starts_with("f16 48x40")));
        assert!(with_panels.iter().any(|n| n.starts_with("Q4_1 32x512")));
        assert!(with_panels.iter().any(|n| n.starts_with("Q8_0 32x512")));
    }
}
