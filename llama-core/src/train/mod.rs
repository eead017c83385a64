//! LoRA training on a frozen base of any weight type: a hand-written forward and backward pass
//! of the Llama model in f32 over our own kernels and pool, with the LoRA matrices as the only
//! trainable parameters (the base's weights get no gradient; the gradient flows through them,
//! quantized included, to the inputs).
//!
//! The forward pass here is exact f32 arithmetic on the stored weight values in both directions
//! (rows dequantized tile by tile), not the inference kernels' 8-bit activations, so a gradient
//! is the gradient of the loss this pass computes (checked against central finite differences
//! of an f64 forward pass in `tests/train.rs`).

pub mod data;
mod pass;
mod recipe;
mod trainer;

pub use data::{load_jsonl, Example};
pub use recipe::{finetune, write_adapter, FinetuneEvent, FinetuneOptions, FinetuneResult};
pub use trainer::{EvalReport, StepReport, TrainOptions, Trainer};

use crate::error::{Error, Result};
use crate::lora::{Adapter, AdapterFormat, Parsed, RawPair, Target};
use crate::model::Model;
use pass::seq_grad;

/// Which projections get LoRA matrices, their rank and alpha.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    /// Rank `r`.
    pub rank: usize,
    /// `alpha`: the update is scaled by `alpha / r` (`alpha / sqrt(r)` with `rslora`).
    pub alpha: f32,
    /// Targets (default: all seven).
    pub targets: Vec<Target>,
    /// rsLoRA scaling.
    pub rslora: bool,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            rank: 8,
            alpha: 16.0,
            targets: Target::ALL.to_vec(),
            rslora: false,
        }
    }
}

impl LoraConfig {
    /// The factor of the update.
    pub fn scale(&self) -> f32 {
        if self.rslora {
            self.alpha / (self.rank as f32).sqrt()
        } else {
            self.alpha / self.rank as f32
        }
    }
}

/// One projection's trainable pair: `A` `[rank, inp]`, `B` `[out, rank]`, row-major f32.
#[derive(Debug, Clone, PartialEq)]
pub struct Pair {
    /// `[rank, inp]`.
    pub a: Vec<f32>,
    /// `[out, rank]`.
    pub b: Vec<f32>,
}

/// The trainable LoRA matrices of a model (or their gradients: the same shapes).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraParams {
    /// The configuration.
    pub config: LoraConfig,
    /// `layers[l][target as usize]`.
    pub layers: Vec<[Option<Pair>; 7]>,
    /// `(out, inp)` of each target.
    shapes: [(usize, usize); 7],
}

/// A small deterministic generator (xorshift64*), for initialization.
pub(crate) struct Rng(pub(crate) u64);
impl Rng {
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform in [-1, 1).
    pub(crate) fn uniform(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

impl LoraParams {
    /// Fresh matrices as PEFT initializes them: `A` uniform in `±1/sqrt(in)` (Kaiming-uniform
    /// with `a = sqrt(5)`), `B` zero, so the adapter starts as the base model.
    pub fn new(model: &Model, config: LoraConfig, seed: u64) -> Result<LoraParams> {
        if config.rank == 0 || config.rank > 4096 {
            return Err(Error::InvalidArgument(format!(
                "LoRA rank {} (expected 1 to 4096)",
                config.rank
            )));
        }
        if !config.alpha.is_finite() {
            return Err(Error::InvalidArgument("alpha must be finite".into()));
        }
        if config.targets.is_empty() {
            return Err(Error::InvalidArgument("no LoRA targets".into()));
        }
        let c = model.config();
        let shapes = Target::ALL.map(|t| t.shape(c));
        let mut rng = Rng(seed ^ 0x9e37_79b9_7f4a_7c15);
        let r = config.rank;
        let layers = (0..c.num_hidden_layers)
            .map(|_| {
                Target::ALL.map(|t| {
                    config.targets.contains(&t).then(|| {
                        let (out, inp) = shapes[t as usize];
                        let bound = 1.0 / (inp as f32).sqrt();
                        Pair {
                            a: (0..r * inp).map(|_| rng.uniform() * bound).collect(),
                            b: vec![0.0; out * r],
                        }
                    })
                })
            })
            .collect();
        Ok(LoraParams {
            config,
            layers,
            shapes,
        })
    }

    /// The same shapes, all zero (gradients, optimizer moments).
    pub fn zeros_like(&self) -> LoraParams {
        let mut z = self.clone();
        z.for_each_mut(|v| v.iter_mut().for_each(|x| *x = 0.0));
        z
    }

    /// Every matrix, `A` then `B` of each pair in layer and target order.
    pub fn for_each_mut(&mut self, mut f: impl FnMut(&mut [f32])) {
        for l in &mut self.layers {
            for p in l.iter_mut().flatten() {
                f(&mut p.a);
                f(&mut p.b);
            }
        }
    }

    /// Every matrix, as [`LoraParams::for_each_mut`].
    pub fn for_each(&self, mut f: impl FnMut(&[f32])) {
        for l in &self.layers {
            for p in l.iter().flatten() {
                f(&p.a);
                f(&p.b);
            }
        }
    }

    /// Every matrix with the other's matching one (same shapes).
    pub fn zip_mut(&mut self, other: &LoraParams, mut f: impl FnMut(&mut [f32], &[f32])) {
        for (l, o) in self.layers.iter_mut().zip(&other.layers) {
            for (p, q) in l.iter_mut().zip(o) {
                if let (Some(p), Some(q)) = (p, q) {
                    f(&mut p.a, &q.a);
                    f(&mut p.b, &q.b);
                }
            }
        }
    }

    /// Trainable values.
    pub fn n_params(&self) -> usize {
        let mut n = 0;
        self.for_each(|v| n += v.len());
        n
    }

    /// `(out, inp)` of target `t`.
    pub fn shape(&self, t: Target) -> (usize, usize) {
        self.shapes[t as usize]
    }

    /// An [`Adapter`] of `model` with these matrices (for `Session::set_adapters` and the
    /// PEFT and GGUF writers); `name` is what it reports as its path.
    pub fn to_adapter(&self, model: &Model, name: &str) -> Result<Adapter> {
        let scale = self.config.scale();
        let mut pairs = vec![];
        for (l, layer) in self.layers.iter().enumerate() {
            for t in Target::ALL {
                if let Some(p) = &layer[t as usize] {
                    pairs.push((
                        l,
                        t,
                        RawPair {
                            rank: self.config.rank,
                            a: p.a.clone(),
                            b: p.b.clone(),
                            scale,
                        },
                    ));
                }
            }
        }
        let parsed = Parsed {
            format: AdapterFormat::Peft,
            pairs,
            alpha: (!self.config.rslora).then_some(self.config.alpha),
        };
        let a = Adapter::from_parsed(
            model.config(),
            model.fingerprint(),
            std::path::Path::new(name),
            parsed,
        )?;
        model.register_adapter(&a);
        Ok(a)
    }
}

/// What one sequence contributes: the summed loss over its scored positions, how many, and
/// the gradient of the sum.
#[derive(Debug, Clone)]
pub struct SeqGrad {
    /// Sum of `-log p(target)` over the scored positions.
    pub loss_sum: f64,
    /// Scored positions.
    pub n_scored: usize,
    /// d(loss_sum)/d(params).
    pub grads: LoraParams,
}

/// What a loss is taken over ([`LoraParams::loss_and_grads`]): one sequence, or several packed
/// into one, scored against the next tokens or against a teacher's distributions.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct LossInput<'a> {
    /// The tokens.
    pub tokens: &'a [u32],
    /// `score[i]`: whether predicting `tokens[i + 1]` from the tokens up to `i` counts
    /// (`len - 1` entries).
    pub score: &'a [bool],
    /// The first index of each packed sequence (starting with 0, increasing; `[0]`: one
    /// sequence). Each attends only within itself and its positions start at 0, so the result
    /// is the sum over the sequences alone (set `score` false at each boundary: the last token
    /// of one does not predict the next one's).
    pub segments: &'a [usize],
    /// Distillation: `(id, probability)` pairs for each scored position (a teacher's top-k,
    /// renormalized, from [`teacher_top_k`]) instead of the next tokens. The loss is then the
    /// cross-entropy `-sum p log q`: the KL divergence from the teacher up to the teacher's
    /// entropy (a constant), so the same gradient.
    pub teacher: Option<&'a [Vec<(u32, f32)>]>,
}

impl<'a> LossInput<'a> {
    /// One sequence against its next tokens.
    pub fn new(tokens: &'a [u32], score: &'a [bool]) -> LossInput<'a> {
        LossInput {
            tokens,
            score,
            segments: &[0],
            teacher: None,
        }
    }

    /// Several sequences packed into `tokens`, starting at `segments`.
    pub fn packed(mut self, segments: &'a [usize]) -> LossInput<'a> {
        self.segments = segments;
        self
    }

    /// Against a teacher's distributions.
    pub fn distilled(mut self, teacher: &'a [Vec<(u32, f32)>]) -> LossInput<'a> {
        self.teacher = Some(teacher);
        self
    }
}

impl LoraParams {
    /// The summed loss of `input` over its scored positions on `model` with this adapter, and
    /// its gradient with respect to the adapter. Exact f32 on the stored weights; the base
    /// gets no gradient.
    pub fn loss_and_grads(&self, model: &Model, input: &LossInput<'_>) -> Result<SeqGrad> {
        if let Some(teacher) = input.teacher {
            let n = input.score.iter().filter(|&&s| s).count();
            if teacher.len() != n {
                return Err(Error::InvalidArgument(format!(
                    "{} teacher distributions for {n} scored positions",
                    teacher.len()
                )));
            }
            let vocab = model.config().vocab_size;
            if teacher
                .iter()
                .flatten()
                .any(|&(id, p)| id as usize >= vocab || !p.is_finite() || p < 0.0)
            {
                return Err(Error::InvalidArgument(
                    "a teacher distribution holds a bad id or probability".into(),
                ));
            }
        }
        model.runtime().run(|| {
            seq_grad(
                model,
                self,
                input.tokens,
                input.score,
                input.teacher,
                input.segments,
            )
        })
    }
}

/// The top-`k` next-token distribution of `teacher` at every position of `tokens` whose `score`
/// is set, renormalized over the `k` ids (the input of [`LossInput::distilled`]).
pub fn teacher_top_k(
    teacher: &Model,
    tokens: &[u32],
    score: &[bool],
    k: usize,
) -> Result<Vec<Vec<(u32, f32)>>> {
    if k == 0 {
        return Err(Error::InvalidArgument("top-k must be positive".into()));
    }
    let mut s = teacher.session(
        crate::SessionOptions::default()
            .n_ctx(tokens.len().max(1))
            .kv_type(crate::KvCacheType::F32),
    )?;
    let rows = s.eval_all_logits(&tokens[..tokens.len().saturating_sub(1)])?;
    let mut out = vec![];
    for (row, _) in rows.iter().zip(score).filter(|(_, &s)| s) {
        let top = crate::sampler::top_k_of(row, k);
        let mx = top.first().map_or(0.0, |t| t.1);
        let z: f64 = top.iter().map(|t| ((t.1 - mx) as f64).exp()).sum();
        out.push(
            top.iter()
                .map(|t| (t.0, (((t.1 - mx) as f64).exp() / z) as f32))
                .collect(),
        );
    }
    Ok(out)
}
