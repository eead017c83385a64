//! Rotary position embeddings with every `rope_scaling` kind Llama uses.

use candle_core::{Device, Tensor};

use crate::config::{Config, Llama3Band, RopeScaling};
use crate::error::Result;

/// Inverse frequencies and the scaling rule; cos/sin tables are made per forward call for the
/// positions it covers (cheap: positions x head_dim/2).
#[derive(Debug, Clone)]
pub(crate) struct Rope {
    inv_freq: Vec<f64>,
    /// Per-dimension divisors from GGUF `rope_freqs.weight`.
    freq_factors: Option<Vec<f32>>,
    head_dim: usize,
    theta: f64,
    scaling: RopeScaling,
    max_pos: usize,
}

impl Rope {
    /// `freq_factors`: per-dimension divisors (GGUF `rope_freqs.weight`, Llama 3.1+).
    pub(crate) fn new(cfg: &Config, freq_factors: Option<&[f32]>) -> Self {
        let d = cfg.head_dim;
        let base = |theta: f64| -> Vec<f64> {
            (0..d / 2)
                .map(|i| 1.0 / theta.powf((2 * i) as f64 / d as f64))
                .collect()
        };
        let mut inv_freq = base(cfg.rope_theta);
        match cfg.rope_scaling {
            RopeScaling::Linear { factor } => inv_freq.iter_mut().for_each(|f| *f /= factor),
            RopeScaling::Llama3 { .. } => {
                for f in inv_freq.iter_mut() {
                    match cfg.rope_scaling.llama3_band(*f) {
                        Some(Llama3Band::Divide(factor)) => *f /= factor,
                        Some(Llama3Band::Blend { factor, s }) => {
                            *f = (1.0 - s) * *f / factor + s * *f
                        }
                        Some(Llama3Band::Keep) | None => {}
                    }
                }
            }
            RopeScaling::None | RopeScaling::Dynamic { .. } => {}
        }
        if let Some(ff) = freq_factors {
            for (f, &div) in inv_freq.iter_mut().zip(ff) {
                *f /= div as f64;
            }
        }
        Rope {
            inv_freq,
            freq_factors: freq_factors.map(|f| f.to_vec()),
            head_dim: d,
            theta: cfg.rope_theta,
            scaling: cfg.rope_scaling.clone(),
            max_pos: cfg.max_position_embeddings,
        }
    }

    fn freqs_for(&self, seq_len: usize) -> std::borrow::Cow<'_, [f64]> {
        match self.scaling {
            RopeScaling::Dynamic { factor } if seq_len > self.max_pos => {
                let d = self.head_dim as f64;
                let base = self.theta
                    * ((factor * seq_len as f64 / self.max_pos as f64) - (factor - 1.0))
                        .powf(d / (d - 2.0));
                (0..self.head_dim / 2)
                    .map(|i| 1.0 / base.powf((2 * i) as f64 / d))
                    .collect::<Vec<_>>()
                    .into()
            }
            _ => (&self.inv_freq[..]).into(),
        }
    }

    /// cos and sin tables, each `(len, head_dim / 2)`, for positions `start..start + len`.
    pub(crate) fn cos_sin(
        &self,
        start: usize,
        len: usize,
        dev: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let half = self.head_dim / 2;
        let (cos, sin) = self.tables(start, len);
        Ok((
            Tensor::from_vec(cos, (len, half), dev)?,
            Tensor::from_vec(sin, (len, half), dev)?,
        ))
    }

    /// The cos and sin tables of [`Rope::cos_sin`] as `len x head_dim / 2` values.
    pub(crate) fn tables(&self, start: usize, len: usize) -> (Vec<f32>, Vec<f32>) {
        let half = self.head_dim / 2;
        let mut cos = Vec::with_capacity(len * half);
        let mut sin = Vec::with_capacity(len * half);
        match self.scaling {
            // Plain and linear RoPE: angles computed as ggml does (f32, the per-pair scale
            // applied by repeated multiplication), so GGUF models see llama.cpp's exact angles.
            RopeScaling::None | RopeScaling::Linear { .. } => {
                let theta_scale = (self.theta as f32).powf(-2.0 / self.head_dim as f32);
                let freq_scale = match self.scaling {
                    RopeScaling::Linear { factor } => (1.0 / factor) as f32,
                    _ => 1.0,
                };
                for p in start..start + len {
                    let mut theta = p as f32;
                    for i in 0..half {
                        let ff = self.freq_factors.as_ref().map_or(1.0, |f| f[i]);
                        let a = freq_scale * (theta / ff);
                        cos.push(a.cos());
                        sin.push(a.sin());
                        theta *= theta_scale;
                    }
                }
            }
            _ => {
                let freqs = self.freqs_for(start + len);
                for p in start..start + len {
                    for &f in freqs.iter() {
                        let a = p as f64 * f;
                        cos.push(a.cos() as f32);
                        sin.push(a.sin() as f32);
                    }
                }
            }
        }
        (cos, sin)
    }

    /// The transpose of [`Rope::apply`] (a rotation by the opposite angles): the gradient of
    /// the rotated values back to the inputs.
    pub(crate) fn apply_transposed(
        &self,
        x: &mut [f32],
        rows: usize,
        heads: usize,
        row_stride: usize,
        (cos, sin): (&[f32], &[f32]),
    ) {
        let neg: Vec<f32> = sin.iter().map(|s| -s).collect();
        self.apply(x, rows, heads, row_stride, (cos, &neg));
    }

    /// Rotates `rows` rows of `heads` heads (`x[i * row_stride + h * head_dim..]`) in place
    /// with the tables of [`Rope::tables`] (row `i` uses table row `i`): the pairs
    /// `(x[j], x[j + head_dim / 2])`, as candle's `rope` and llama.cpp's NeoX-ordered rope on
    /// the un-permuted weights (the same products and differences, so the same values).
    pub(crate) fn apply(
        &self,
        x: &mut [f32],
        rows: usize,
        heads: usize,
        row_stride: usize,
        (cos, sin): (&[f32], &[f32]),
    ) {
        let d = self.head_dim;
        let half = d / 2;
        for i in 0..rows {
            let (c, s) = (
                &cos[i * half..(i + 1) * half],
                &sin[i * half..(i + 1) * half],
            );
            for h in 0..heads {
                let v = &mut x[i * row_stride + h * d..][..d];
                let (a, b) = v.split_at_mut(half);
                for j in 0..half {
                    let (x1, x2) = (a[j], b[j]);
                    a[j] = x1 * c[j] - x2 * s[j];
                    b[j] = x1 * s[j] + x2 * c[j];
                }
            }
        }
    }
}
