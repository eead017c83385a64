//! The training loop: AdamW on the LoRA matrices, linear warmup then cosine decay, gradient
//! accumulation, global-norm clipping, a seeded data order per epoch, evaluation, checkpoints
//! that resume to exactly the uninterrupted run, and cancellation.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::data::Example;
use super::{LoraConfig, LoraParams, Rng};
use crate::error::{Error, Result};
use crate::lora::Target;
use crate::model::Model;

/// Options of a training run.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct TrainOptions {
    /// The adapter to train.
    pub lora: LoraConfig,
    /// Passes over the training data.
    pub epochs: usize,
    /// Peak learning rate.
    pub lr: f32,
    /// Sequences per micro-batch.
    pub batch: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Linear warmup steps (0: none).
    pub warmup: usize,
    /// AdamW's decoupled weight decay.
    pub weight_decay: f32,
    /// AdamW's betas and epsilon.
    pub betas: (f32, f32),
    /// AdamW's epsilon.
    pub adam_eps: f32,
    /// Clip the global gradient norm to this (0: no clipping).
    pub clip: f32,
    /// Seed of the initialization and of the data order.
    pub seed: u64,
    /// Pack each step's examples into sequences of at most this many tokens (0: one sequence
    /// per example). Each example still attends only to itself, from position 0, so the
    /// gradient is the same; it only runs faster for short examples.
    pub pack: usize,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            lora: LoraConfig::default(),
            epochs: 1,
            lr: 2e-4,
            batch: 1,
            grad_accum: 1,
            warmup: 0,
            weight_decay: 0.0,
            betas: (0.9, 0.999),
            adam_eps: 1e-8,
            clip: 1.0,
            seed: 0,
            pack: 0,
        }
    }
}

impl TrainOptions {
    setters! {
        /// Sets the adapter configuration.
        lora(c: LoraConfig) => lora = c;
        /// Sets the number of epochs.
        epochs(n: usize) => epochs = n;
        /// Sets the peak learning rate.
        lr(v: f32) => lr = v;
        /// Sets the micro-batch size.
        batch(n: usize) => batch = n;
        /// Sets the gradient accumulation.
        grad_accum(n: usize) => grad_accum = n;
        /// Sets the warmup steps.
        warmup(n: usize) => warmup = n;
        /// Sets the weight decay.
        weight_decay(v: f32) => weight_decay = v;
        /// Sets the gradient clipping norm.
        clip(v: f32) => clip = v;
        /// Sets the seed.
        seed(s: u64) => seed = s;
        /// Packs examples into sequences of at most `n` tokens (0: off).
        pack(n: usize) => pack = n;
    }

    fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidArgument(m));
        if self.epochs == 0 || self.batch == 0 || self.grad_accum == 0 {
            return bad("epochs, batch and grad_accum must be positive".into());
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad(format!("learning rate {} must be positive", self.lr));
        }
        if !(self.clip.is_finite() && self.clip >= 0.0 && self.weight_decay.is_finite()) {
            return bad("clip and weight_decay must be finite".into());
        }
        Ok(())
    }
}

/// What one optimizer step did.
#[derive(Debug, Clone, PartialEq)]
pub struct StepReport {
    /// Steps done (1 after the first).
    pub step: usize,
    /// Of this many.
    pub total_steps: usize,
    /// The epoch the step's data came from (0-based).
    pub epoch: usize,
    /// Mean loss per scored token over the step's sequences.
    pub loss: f64,
    /// The learning rate used.
    pub lr: f32,
    /// The gradient's global norm before clipping.
    pub grad_norm: f64,
    /// Tokens processed (scored or not).
    pub tokens: usize,
    /// Scored tokens.
    pub scored: usize,
}

/// Loss over an evaluation set.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalReport {
    /// Mean loss per scored token.
    pub loss: f64,
    /// `exp(loss)`.
    pub perplexity: f64,
    /// Scored tokens.
    pub scored: usize,
}

/// A LoRA training run on one model.
pub struct Trainer {
    model: Model,
    opts: TrainOptions,
    train: Vec<Example>,
    params: LoraParams,
    m: LoraParams,
    v: LoraParams,
    step: usize,
    /// Position in the current epoch's order.
    pos: usize,
    epoch: usize,
    order: Vec<usize>,
    cancel: Arc<AtomicBool>,
    /// Distillation: the teacher and its top-k.
    teacher: Option<(Model, usize)>,
}

/// The epoch's data order: a Fisher-Yates shuffle seeded by the run's seed and the epoch.
fn order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut o: Vec<usize> = (0..n).collect();
    let mut rng = Rng(seed.wrapping_mul(0x100_0000_01b3)
        ^ (epoch as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)
        | 1);
    for i in (1..n).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        o.swap(i, j);
    }
    o
}

impl Trainer {
    /// A run on `train` (see [`super::data::load_jsonl`]).
    pub fn new(model: &Model, train: Vec<Example>, opts: TrainOptions) -> Result<Trainer> {
        opts.validate()?;
        if train.is_empty() {
            return Err(Error::InvalidArgument("no training examples".into()));
        }
        let params = LoraParams::new(model, opts.lora.clone(), opts.seed)?;
        let (m, v) = (params.zeros_like(), params.zeros_like());
        Ok(Trainer {
            model: model.clone(),
            order: order(train.len(), opts.seed, 0),
            train,
            params,
            m,
            v,
            step: 0,
            pos: 0,
            epoch: 0,
            opts,
            cancel: Arc::new(AtomicBool::new(false)),
            teacher: None,
        })
    }

    /// Distillation: train to match `teacher`'s next-token distribution (its top-`k`
    /// log-probabilities, computed on the fly) instead of the data's next tokens. The teacher
    /// must share the student's vocabulary (a smaller model of the same family, or an
    /// unquantized copy of a quantized student).
    pub fn with_teacher(mut self, teacher: &Model, k: usize) -> Result<Trainer> {
        if k == 0 || k > 4096 {
            return Err(Error::InvalidArgument(format!(
                "teacher top-k {k} (expected 1 to 4096)"
            )));
        }
        let (a, b) = (teacher.tokenizer(), self.model.tokenizer());
        let (va, vb) = (teacher.config().vocab_size, self.model.config().vocab_size);
        if va != vb || a.vocab_size() != b.vocab_size() {
            return Err(Error::InvalidArgument(format!(
                "the teacher's vocabulary ({va} ids) is not the student's ({vb}): distillation needs the same tokenizer"
            )));
        }
        if let Some(id) = (0..a.vocab_size() as u32).find(|&i| a.id_to_token(i) != b.id_to_token(i))
        {
            return Err(Error::InvalidArgument(format!(
                "the teacher's token {id} is {:?}, the student's {:?}: distillation needs the same tokenizer",
                a.id_to_token(id),
                b.id_to_token(id)
            )));
        }
        self.teacher = Some((teacher.clone(), k));
        Ok(self)
    }

    /// The examples `idx` in sequences: one each, or packed up to `opts.pack` tokens.
    fn groups(&self, idx: &[usize]) -> Vec<Vec<usize>> {
        if self.opts.pack == 0 {
            return idx.iter().map(|&i| vec![i]).collect();
        }
        let mut out: Vec<Vec<usize>> = vec![];
        let mut len = 0;
        for &i in idx {
            let n = self.train[i].tokens.len();
            match out.last_mut() {
                Some(g) if len + n <= self.opts.pack => {
                    g.push(i);
                    len += n;
                }
                _ => {
                    out.push(vec![i]);
                    len = n;
                }
            }
        }
        out
    }

    /// The loss and gradient of one sequence of examples (packed when several).
    fn run_group(&self, group: &[usize]) -> Result<super::SeqGrad> {
        if let [one] = group {
            return self.seq(&self.train[*one]);
        }
        let (mut tokens, mut score, mut segments) = (vec![], vec![], vec![]);
        let mut dists = vec![];
        for (n, &i) in group.iter().enumerate() {
            let ex = &self.train[i];
            if n > 0 {
                // The previous example's last token does not predict this one's first.
                score.push(false);
            }
            segments.push(tokens.len());
            tokens.extend_from_slice(&ex.tokens);
            score.extend_from_slice(&ex.score);
            if let Some((t, k)) = &self.teacher {
                dists.extend(super::teacher_top_k(t, &ex.tokens, &ex.score, *k)?);
            }
        }
        let mut input = super::LossInput::new(&tokens, &score).packed(&segments);
        if self.teacher.is_some() {
            input = input.distilled(&dists);
        }
        self.params.loss_and_grads(&self.model, &input)
    }

    fn seq(&self, ex: &Example) -> Result<super::SeqGrad> {
        let input = super::LossInput::new(&ex.tokens, &ex.score);
        match &self.teacher {
            None => self.params.loss_and_grads(&self.model, &input),
            Some((t, k)) => {
                let dists = super::teacher_top_k(t, &ex.tokens, &ex.score, *k)?;
                self.params
                    .loss_and_grads(&self.model, &input.distilled(&dists))
            }
        }
    }

    /// Optimizer steps in the whole run.
    pub fn total_steps(&self) -> usize {
        self.steps_per_epoch() * self.opts.epochs
    }

    fn steps_per_epoch(&self) -> usize {
        self.train
            .len()
            .div_ceil(self.opts.batch * self.opts.grad_accum)
    }

    /// Steps done.
    pub fn step_count(&self) -> usize {
        self.step
    }

    /// Whether every step has run.
    pub fn done(&self) -> bool {
        self.step >= self.total_steps()
    }

    /// The trained matrices.
    pub fn params(&self) -> &LoraParams {
        &self.params
    }

    /// The options.
    pub fn options(&self) -> &TrainOptions {
        &self.opts
    }

    /// A flag that stops the running step (from any thread): the step returns
    /// [`Error::Cancelled`] and leaves the trainer as before it.
    pub fn cancel_flag(&self) -> Arc<AtomicBool> {
        self.cancel.clone()
    }

    /// The learning rate of step `s` (0-based): linear warmup, then cosine decay to zero.
    pub fn lr_at(&self, s: usize) -> f32 {
        let (lr, w, total) = (self.opts.lr, self.opts.warmup, self.total_steps().max(1));
        if s < w {
            return lr * (s + 1) as f32 / w as f32;
        }
        let span = (total - w.min(total)).max(1) as f32;
        let p = ((s - w) as f32 / span).min(1.0);
        lr * 0.5 * (1.0 + (std::f32::consts::PI * p).cos())
    }

    /// One optimizer step over the next `batch * grad_accum` sequences (fewer at the end of an
    /// epoch). `None` once the run is done.
    pub fn step(&mut self) -> Result<Option<StepReport>> {
        if self.done() {
            return Ok(None);
        }
        let want = self.opts.batch * self.opts.grad_accum;
        let take = want.min(self.train.len() - self.pos);
        let mut grads = self.params.zeros_like();
        let (mut loss, mut scored, mut tokens) = (0f64, 0usize, 0usize);
        let idx: Vec<usize> = (0..take).map(|k| self.order[self.pos + k]).collect();
        for group in self.groups(&idx) {
            if self.cancel.swap(false, Ordering::Relaxed) {
                return Err(Error::Cancelled);
            }
            let g = self.run_group(&group)?;
            loss += g.loss_sum;
            scored += g.n_scored;
            tokens += group
                .iter()
                .map(|&i| self.train[i].tokens.len())
                .sum::<usize>();
            grads.zip_mut(&g.grads, |a, b| {
                for (x, y) in a.iter_mut().zip(b) {
                    *x += y;
                }
            });
        }
        // Mean over the step's scored tokens.
        let inv = 1.0 / scored.max(1) as f32;
        grads.for_each_mut(|v| v.iter_mut().for_each(|x| *x *= inv));
        let mut sq = 0f64;
        grads.for_each(|v| sq += v.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>());
        let norm = sq.sqrt();
        if !norm.is_finite() {
            return Err(Error::InvalidArgument(format!(
                "the gradient is not finite at step {} (learning rate too high?)",
                self.step + 1
            )));
        }
        if self.opts.clip > 0.0 && norm > self.opts.clip as f64 {
            let c = (self.opts.clip as f64 / norm) as f32;
            grads.for_each_mut(|v| v.iter_mut().for_each(|x| *x *= c));
        }
        let lr = self.lr_at(self.step);
        let t = (self.step + 1) as i32;
        let (b1, b2) = self.opts.betas;
        let (bc1, bc2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
        let (eps, wd) = (self.opts.adam_eps, self.opts.weight_decay);
        self.m.zip_mut(&grads, |m, g| {
            for (m, g) in m.iter_mut().zip(g) {
                *m = b1 * *m + (1.0 - b1) * g;
            }
        });
        self.v.zip_mut(&grads, |v, g| {
            for (v, g) in v.iter_mut().zip(g) {
                *v = b2 * *v + (1.0 - b2) * g * g;
            }
        });
        // p -= lr * (m_hat / (sqrt(v_hat) + eps) + wd * p), matrix by matrix.
        for ((pl, ml), vl) in self
            .params
            .layers
            .iter_mut()
            .zip(&self.m.layers)
            .zip(&self.v.layers)
        {
            for ((p, m), v) in pl.iter_mut().zip(ml).zip(vl) {
                if let (Some(p), Some(m), Some(v)) = (p, m, v) {
                    for (p, (m, v)) in [(&mut p.a, (&m.a, &v.a)), (&mut p.b, (&m.b, &v.b))] {
                        for ((p, m), v) in p.iter_mut().zip(m).zip(v) {
                            let update = (m / bc1) / ((v / bc2).sqrt() + eps);
                            *p -= lr * (update + wd * *p);
                        }
                    }
                }
            }
        }
        self.pos += take;
        self.step += 1;
        let epoch = self.epoch;
        if self.pos >= self.train.len() && !self.done() {
            self.epoch += 1;
            self.pos = 0;
            self.order = order(self.train.len(), self.opts.seed, self.epoch);
        }
        Ok(Some(StepReport {
            step: self.step,
            total_steps: self.total_steps(),
            epoch,
            loss: loss / scored.max(1) as f64,
            lr,
            grad_norm: norm,
            tokens,
            scored,
        }))
    }

    /// Mean loss and perplexity of the current adapter on `data`.
    pub fn evaluate(&self, data: &[Example]) -> Result<EvalReport> {
        let (mut loss, mut scored) = (0f64, 0usize);
        for ex in data {
            if self.cancel.swap(false, Ordering::Relaxed) {
                return Err(Error::Cancelled);
            }
            let g = self.seq(ex)?;
            loss += g.loss_sum;
            scored += g.n_scored;
        }
        let mean = loss / scored.max(1) as f64;
        Ok(EvalReport {
            loss: mean,
            perplexity: mean.exp(),
            scored,
        })
    }

    /// Writes a checkpoint into `dir`: the matrices, AdamW's moments, the step, the epoch, the
    /// data position and the options (`trainer_state.json` and `trainer_state.safetensors`),
    /// each written to a temporary name and renamed.
    pub fn save_checkpoint(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let mut tensors = std::collections::HashMap::new();
        for (name, p) in [("param", &self.params), ("m", &self.m), ("v", &self.v)] {
            let mut i = 0;
            p.for_each(|x| {
                if let Ok(t) =
                    candle_core::Tensor::from_slice(x, x.len(), &candle_core::Device::Cpu)
                {
                    tensors.insert(format!("{name}.{i}"), t);
                }
                i += 1;
            });
        }
        let st = dir.join("trainer_state.safetensors");
        let tmp = dir.join(".trainer_state.safetensors.tmp");
        candle_core::safetensors::save(&tensors, &tmp)?;
        std::fs::rename(&tmp, &st).map_err(|e| Error::io(&st, e))?;
        let o = &self.opts;
        let state = serde_json::json!({
            "format": 1,
            "model_fingerprint": format!("{:016x}", self.model.fingerprint()),
            "n_train": self.train.len(),
            "step": self.step, "epoch": self.epoch, "pos": self.pos,
            "rank": o.lora.rank, "alpha": o.lora.alpha, "rslora": o.lora.rslora,
            "targets": o.lora.targets.iter().map(|t| t.as_str()).collect::<Vec<_>>(),
            "epochs": o.epochs, "lr": o.lr, "batch": o.batch, "grad_accum": o.grad_accum,
            "warmup": o.warmup, "weight_decay": o.weight_decay, "betas": [o.betas.0, o.betas.1],
            "adam_eps": o.adam_eps, "clip": o.clip, "seed": o.seed, "pack": o.pack,
        });
        let js = dir.join("trainer_state.json");
        let tmp = dir.join(".trainer_state.json.tmp");
        std::fs::write(
            &tmp,
            serde_json::to_string_pretty(&state).unwrap_or_default(),
        )
        .map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, &js).map_err(|e| Error::io(&js, e))
    }

    /// Continues a run from a checkpoint of [`Trainer::save_checkpoint`] on the same model and
    /// data: the result equals the uninterrupted run. The options come from the checkpoint.
    pub fn resume(model: &Model, train: Vec<Example>, dir: &Path) -> Result<Trainer> {
        let js = dir.join("trainer_state.json");
        let text = std::fs::read_to_string(&js).map_err(|e| Error::io(&js, e))?;
        let bad = |m: &str| Error::State(format!("{}: {m}", js.display()));
        let s: serde_json::Value =
            serde_json::from_str(&text).map_err(|_| bad("not valid JSON"))?;
        let u = |k: &str| {
            s[k].as_u64()
                .map(|v| v as usize)
                .ok_or_else(|| bad(&format!("`{k}` is missing")))
        };
        let f = |k: &str| {
            s[k].as_f64()
                .map(|v| v as f32)
                .ok_or_else(|| bad(&format!("`{k}` is missing")))
        };
        if s["format"].as_u64() != Some(1) {
            return Err(bad("unknown checkpoint format"));
        }
        if s["model_fingerprint"].as_str() != Some(&format!("{:016x}", model.fingerprint())) {
            return Err(bad("the checkpoint was made with another model"));
        }
        if u("n_train")? != train.len() {
            return Err(bad(
                "the checkpoint was made with another training set (its size differs)",
            ));
        }
        let targets = s["targets"]
            .as_array()
            .ok_or_else(|| bad("`targets` is missing"))?
            .iter()
            .map(|t| {
                t.as_str()
                    .ok_or_else(|| bad("bad target"))
                    .and_then(|t| Target::parse(t).map_err(|_| bad("bad target")))
            })
            .collect::<Result<Vec<_>>>()?;
        let betas = s["betas"]
            .as_array()
            .ok_or_else(|| bad("`betas` is missing"))?;
        let opts = TrainOptions {
            lora: LoraConfig {
                rank: u("rank")?,
                alpha: f("alpha")?,
                targets,
                rslora: s["rslora"].as_bool().unwrap_or(false),
            },
            epochs: u("epochs")?,
            lr: f("lr")?,
            batch: u("batch")?,
            grad_accum: u("grad_accum")?,
            warmup: u("warmup")?,
            weight_decay: f("weight_decay")?,
            betas: (
                betas
                    .first()
                    .and_then(|v| v.as_f64())
                    .ok_or_else(|| bad("bad betas"))? as f32,
                betas
                    .get(1)
                    .and_then(|v| v.as_f64())
                    .ok_or_else(|| bad("bad betas"))? as f32,
            ),
            adam_eps: f("adam_eps")?,
            clip: f("clip")?,
            seed: s["seed"].as_u64().ok_or_else(|| bad("`seed` is missing"))?,
            pack: s["pack"].as_u64().unwrap_or(0) as usize,
        };
        let mut t = Trainer::new(model, train, opts)?;
        let st = dir.join("trainer_state.safetensors");
        let tensors = candle_core::safetensors::load(&st, &candle_core::Device::Cpu)
            .map_err(|e| Error::State(format!("{}: {e}", st.display())))?;
        for (name, p) in [("param", &mut t.params), ("m", &mut t.m), ("v", &mut t.v)] {
            let mut i = 0;
            let mut fail = None;
            p.for_each_mut(|x| {
                match tensors
                    .get(&format!("{name}.{i}"))
                    .map(|t| t.to_vec1::<f32>())
                {
                    Some(Ok(v)) if v.len() == x.len() => x.copy_from_slice(&v),
                    _ => fail = Some(format!("{name}.{i} is missing or of another shape")),
                }
                i += 1;
            });
            if let Some(m) = fail {
                return Err(Error::State(format!(
                    "{}: {m} (another adapter shape?)",
                    st.display()
                )));
            }
        }
        t.step = u("step")?;
        t.epoch = u("epoch")?;
        t.pos = u("pos")?;
        if t.step > t.total_steps() || t.pos > t.train.len() || t.epoch > t.opts.epochs.max(1) {
            return Err(bad("step, epoch or position out of range"));
        }
        t.order = order(t.train.len(), t.opts.seed, t.epoch);
        Ok(t)
    }
}
