//! Projections of the same input computed as one stacked matrix where the parts are stored
//! alike.

use super::*;

/// A product into a column block ([`matrix::matmul_cols`] or its as-alone form).
type ColsProduct<'r> = &'r dyn Fn(
    &dyn crate::kernels::WeightMatrix,
    &[f32],
    usize,
    &mut [f32],
    (usize, usize, usize),
) -> Result<()>;

/// Projections of the same input (Q, K, V; gate, up) with their outputs side by side: one
/// stacked matrix where the parts are stored alike ([`Matmul::stack`]: one pass over the
/// activations, one pool call), else one matrix per part.
pub(crate) struct Stack {
    pub(crate) mats: Vec<Linear>,
    /// Output width of each part.
    widths: Vec<usize>,
}

impl Stack {
    pub(crate) fn new(parts: Vec<Matmul>, widths: Vec<usize>) -> Result<Stack> {
        let mats = Matmul::stack(parts)?
            .into_iter()
            .map(matrix::build)
            .collect::<Result<Vec<_>>>()?;
        Ok(Stack { mats, widths })
    }

    /// Each matrix with its first output column (one stacked matrix, or one per part).
    pub(crate) fn parts(&self) -> Vec<(&Linear, usize)> {
        if let [one] = self.mats.as_slice() {
            return vec![(one, 0)];
        }
        let mut col = 0;
        self.mats
            .iter()
            .zip(&self.widths)
            .map(|(m, &n)| {
                let c = col;
                col += n;
                (m, c)
            })
            .collect()
    }

    /// All the parts' outputs side by side.
    pub(crate) fn width(&self) -> usize {
        self.widths.iter().sum()
    }

    /// Whether every part computes each row alike whatever rows come with it.
    pub(crate) fn batch_invariant(&self) -> bool {
        self.mats.iter().all(|m| m.batch_invariant())
    }

    /// The parts' outputs for `m` rows of `xs`, side by side in `out` (`[m, width]`).
    pub(crate) fn matmul_into(&self, xs: &[f32], m: usize, out: &mut [f32]) -> Result<()> {
        self.product(xs, m, out, &matrix::matmul_cols)
    }

    /// [`Stack::matmul_into`] with `rider` riding along the products' pool calls.
    pub(crate) fn matmul_into_riding(
        &self,
        xs: &[f32],
        m: usize,
        out: &mut [f32],
        rider: Option<&dyn crate::kernels::Rider>,
    ) -> Result<()> {
        self.product(xs, m, out, &|w, xs, m, out, cols| {
            matrix::matmul_cols_riding(w, xs, m, out, cols, rider)
        })
    }

    /// [`Stack::matmul_into`] with each row computed exactly as it is alone.
    pub(crate) fn matmul_into_as_alone(&self, xs: &[f32], m: usize, out: &mut [f32]) -> Result<()> {
        self.product(xs, m, out, &matrix::matmul_cols_as_alone)
    }

    fn product(&self, xs: &[f32], m: usize, out: &mut [f32], each: ColsProduct<'_>) -> Result<()> {
        let stride = self.width();
        if let [one] = self.mats.as_slice() {
            return each(&**one, xs, m, out, (stride, 0, stride));
        }
        let mut col = 0;
        for (mat, &n) in self.mats.iter().zip(&self.widths) {
            each(&**mat, xs, m, out, (stride, col, n))?;
            col += n;
        }
        Ok(())
    }

    /// The `N` parts' outputs as tensors (candle's tensor path).
    pub(crate) fn forward<const N: usize>(&self, x: &Tensor) -> Result<[Tensor; N]> {
        let out = if let [one] = self.mats.as_slice() {
            let y = one.forward(x)?;
            let last = y.rank() - 1;
            let mut col = 0;
            let mut out = Vec::with_capacity(self.widths.len());
            for &n in &self.widths {
                out.push(y.narrow(last, col, n)?);
                col += n;
            }
            out
        } else {
            self.mats
                .iter()
                .map(|m| m.forward(x))
                .collect::<Result<Vec<_>>>()?
        };
        out.try_into().map_err(|v: Vec<Tensor>| {
            Error::InvalidArgument(format!("{} projections where {N} were expected", v.len()))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::quantize_rows;
    use crate::test_util::values;
    use crate::types::FileType;
    use candle_core::quantized::QMatMul;

    /// A `[n, k]` matrix of seeded values stored as `ty` (F32: dense values).
    fn part(ty: FileType, n: usize, k: usize, seed: u32) -> Matmul {
        let vals = values(n * k, seed);
        match ty {
            FileType::F16 => Matmul::F16 {
                pieces: vec![vals.iter().map(|&v| half::f16::from_f32(v)).collect()],
                n,
                k,
            },
            FileType::F32 => Matmul::Candle(QMatMul::Tensor(
                Tensor::from_vec(vals, (n, k), &Device::Cpu).unwrap(),
            )),
            FileType::Quant(q) => {
                let bytes = quantize_rows(&vals, k, ty, 1).unwrap();
                match crate::kernels::BlockFmt::from_ggml(q.ggml()) {
                    Some(fmt) if crate::kernels::enabled() => {
                        Matmul::Blocks(crate::kernels::BlockMatrix::new(fmt, &bytes, n, k).unwrap())
                    }
                    _ => {
                        let store = crate::matrix::aligned(&bytes);
                        let q = candle_core::quantized::ggml_file::qtensor_from_ggml(
                            q.ggml(),
                            crate::matrix::as_bytes(&store, bytes.len()),
                            vec![n, k],
                            &Device::Cpu,
                        )
                        .unwrap();
                        Matmul::Candle(QMatMul::from_qtensor(q).unwrap())
                    }
                }
            }
        }
    }

    #[test]
    fn stacked_projections_equal_the_separate_matrices() {
        use FileType::{Quant, F16, F32};
        use QuantType::*;
        // (part types, widths, k, matrices expected once stacked where the types allow). The
        // outputs are bit-identical to the separate matrices' wherever the stacked matrix keeps
        // the parts' layout.
        let cases: Vec<(Vec<FileType>, Vec<usize>, usize, usize)> = vec![
            (vec![F16; 3], vec![64, 32, 32], 96, 1),
            // 24 and 8 rows are too few for 16-row groups (a dot product per row), 32 stacked
            // rows are grouped, a group taking rows from both parts: the same values summed in
            // another order.
            (vec![F16; 2], vec![24, 8], 32, 1),
            (vec![Quant(Q8_0); 3], vec![64, 32, 32], 96, 1),
            (vec![Quant(Q5_1); 2], vec![48, 48], 64, 1),
            (vec![Quant(Q4K); 3], vec![32, 16, 16], 256, 1),
            (vec![F32; 2], vec![24, 40], 32, 1),
            // Stored differently: one matrix each.
            (vec![Quant(Q8_0), Quant(Q4_0), F16], vec![64, 32, 32], 64, 3),
            (
                vec![Quant(Q4K), Quant(Q6K), Quant(Q4K)],
                vec![32, 16, 16],
                256,
                3,
            ),
        ];
        for (types, widths, k, expect) in cases {
            let parts = || -> Vec<Matmul> {
                types
                    .iter()
                    .zip(&widths)
                    .enumerate()
                    .map(|(i, (&ty, &n))| part(ty, n, k, 7 + i as u32))
                    .collect()
            };
            let stack = Stack::new(parts(), widths.clone()).unwrap();
            let single: Vec<Linear> = parts()
                .into_iter()
                .map(|p| matrix::build(p).unwrap())
                .collect();
            if crate::kernels::enabled() {
                assert_eq!(stack.mats.len(), expect, "{types:?}");
            }
            let total = stack.width();
            let regrouped =
                widths.iter().any(|w| !w.is_multiple_of(16)) && total.is_multiple_of(16);
            let same = |got: &[f32], want: &[f32], what: &str| {
                if regrouped && crate::kernels::enabled() {
                    for (a, b) in got.iter().zip(want) {
                        assert!(
                            (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                            "{what}: {a} vs {b}"
                        );
                    }
                } else {
                    assert_eq!(got, want, "{what}");
                }
            };
            for m in [1usize, 3, 13] {
                let xs = values(m * k, 99);
                let mut got = vec![f32::NAN; m * total];
                stack.matmul_into(&xs, m, &mut got).unwrap();
                let mut col = 0;
                for (lin, &n) in single.iter().zip(&widths) {
                    let mut want = vec![0f32; m * n];
                    matrix::matmul_into(&**lin, &xs, m, &mut want).unwrap();
                    for r in 0..m {
                        same(
                            &got[r * total + col..][..n],
                            &want[r * n..][..n],
                            &format!("{types:?} m={m} row {r}, columns from {col}"),
                        );
                    }
                    col += n;
                }
                // candle's tensor path splits the same outputs.
                let x = Tensor::from_vec(xs.clone(), (1, m, k), &Device::Cpu).unwrap();
                let outs: [Tensor; 3] = match widths.len() {
                    3 => stack.forward(&x).unwrap(),
                    _ => {
                        let [a, b] = stack.forward(&x).unwrap();
                        [a, b.clone(), b]
                    }
                };
                for (o, (lin, &n)) in outs.iter().zip(single.iter().zip(&widths)) {
                    assert_eq!(o.dims(), &[1, m, n]);
                    let want = lin.forward(&x).unwrap().flatten_all().unwrap();
                    let got = o.flatten_all().unwrap();
                    same(
                        &got.to_vec1::<f32>().unwrap(),
                        &want.to_vec1::<f32>().unwrap(),
                        &format!("{types:?} m={m} tensor path"),
                    );
                }
            }
            // A wrong number of parts is an error, not a panic.
            if widths.len() == 3 {
                let x = Tensor::zeros((1, 1, k), DType::F32, &Device::Cpu).unwrap();
                assert!(stack.forward::<2>(&x).is_err());
            }
        }
    }
}
