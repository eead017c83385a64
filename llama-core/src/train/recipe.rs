//! The fine-tuning recipe every face runs (`llama finetune`/`distill`, C's `llama_finetune`,
//! Python's `finetune`): one options value ([`FinetuneOptions`]) in, data loaded, the run
//! started or resumed, evaluation every few steps, checkpoints, cancellation, and the adapter
//! written out. The faces keep only their presentation (a progress bar, a loss log, a callback).

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use super::data::load_jsonl;
use super::trainer::{EvalReport, StepReport, TrainOptions, Trainer};
use crate::error::{Error, Result};
use crate::lora::Adapter;
use crate::model::Model;

/// Everything a fine-tuning (or distillation) run is configured by.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct FinetuneOptions {
    /// Training data: JSONL of `{"text"}`, `{"prompt", "completion"}` or `{"messages"}` lines.
    pub data: PathBuf,
    /// Evaluation data (same format), evaluated every `eval_every` steps and after the last.
    pub eval: Option<PathBuf>,
    /// Where the adapter goes: PEFT files (`adapter_config.json`,
    /// `adapter_model.safetensors`), `adapter.gguf`, and `checkpoint/` (resumable). `None`:
    /// nothing is written.
    pub out: Option<PathBuf>,
    /// Longest example in tokens (longer ones are cut).
    pub max_len: usize,
    /// Pack short examples into sequences of `max_len` tokens (the same gradient, faster).
    pub pack: bool,
    /// Steps between evaluations (0 or 1: every step).
    pub eval_every: usize,
    /// Steps between checkpoints into `out/checkpoint` (0: only at the end).
    pub save_every: usize,
    /// Stop after this many steps in this call (the checkpoint resumes from there).
    pub max_steps: Option<usize>,
    /// Resume from a checkpoint folder (its options replace `train`).
    pub resume: Option<PathBuf>,
    /// The optimizer, schedule and adapter ([`TrainOptions`]; `pack` is set from `pack` and
    /// `max_len`).
    pub train: TrainOptions,
    /// Distill from this teacher's top-k distribution per position.
    pub teacher: Option<(Model, usize)>,
}

impl FinetuneOptions {
    /// Defaults for training on `data`: 512 tokens per example, evaluation every 50 steps,
    /// [`TrainOptions::default`].
    pub fn new(data: impl Into<PathBuf>) -> FinetuneOptions {
        FinetuneOptions {
            data: data.into(),
            eval: None,
            out: None,
            max_len: 512,
            pack: false,
            eval_every: 50,
            save_every: 0,
            max_steps: None,
            resume: None,
            train: TrainOptions::default(),
            teacher: None,
        }
    }

    setters! {
        /// Sets the evaluation data.
        with_eval(p: PathBuf) => eval = Some(p);
        /// Sets the output folder.
        with_out(p: PathBuf) => out = Some(p);
        /// Sets the longest example.
        with_max_len(n: usize) => max_len = n;
        /// Packs examples.
        with_pack(b: bool) => pack = b;
        /// Sets the steps between evaluations.
        with_eval_every(n: usize) => eval_every = n;
        /// Sets the steps between checkpoints.
        with_save_every(n: usize) => save_every = n;
        /// Sets the training options.
        with_train(t: TrainOptions) => train = t;
    }

    /// Distills from `teacher` (its top `k` tokens per position).
    pub fn with_teacher(mut self, teacher: Model, k: usize) -> Self {
        self.teacher = Some((teacher, k));
        self
    }
}

/// What a fine-tuning run reports to its face.
#[non_exhaustive]
pub enum FinetuneEvent<'a> {
    /// The run is set up: the trainer (its size, step count, options), before the first step.
    Started(&'a Trainer),
    /// A step finished, with the evaluation made after it if one was due.
    Step(&'a StepReport, Option<&'a EvalReport>),
}

impl std::fmt::Debug for FinetuneEvent<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FinetuneEvent::Started(t) => f
                .debug_struct("Started")
                .field("total_steps", &t.total_steps())
                .finish(),
            FinetuneEvent::Step(r, e) => f.debug_tuple("Step").field(r).field(e).finish(),
        }
    }
}

/// How a run ended.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct FinetuneResult {
    /// The adapter trained so far.
    pub adapter: Adapter,
    /// Steps done in all (with those of a resumed run).
    pub steps: usize,
    /// Steps of the whole run.
    pub total_steps: usize,
    /// Whether every step ran (not stopped, cancelled or cut by `max_steps`).
    pub finished: bool,
    /// The checkpoint written at the end (under `out`), from which the run resumes.
    pub checkpoint: Option<PathBuf>,
}

/// Runs the recipe on `model`: `on_event` sees the start and every step (return
/// [`ControlFlow::Break`] to stop; the adapter trained so far is returned and written). A
/// cancel through [`Trainer::cancel_flag`] (Ctrl-C) ends it the same way.
pub fn finetune(
    model: &Model,
    opts: &FinetuneOptions,
    on_event: &mut dyn FnMut(FinetuneEvent<'_>) -> ControlFlow<()>,
) -> Result<FinetuneResult> {
    let train = load_jsonl(model, &opts.data, opts.max_len)?;
    let eval = opts
        .eval
        .as_ref()
        .map(|p| load_jsonl(model, p, opts.max_len))
        .transpose()?;
    let mut t = match &opts.resume {
        Some(dir) => Trainer::resume(model, train, dir)?,
        None => {
            let mut to = opts.train.clone();
            to.pack = if opts.pack { opts.max_len } else { 0 };
            Trainer::new(model, train, to)?
        }
    };
    if let Some((teacher, k)) = &opts.teacher {
        t = t.with_teacher(teacher, *k)?;
    }
    let ckpt = opts.out.as_ref().map(|o| o.join("checkpoint"));
    if let Some(out) = &opts.out {
        std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    }
    let mut stopped = on_event(FinetuneEvent::Started(&t)).is_break();
    let mut here = 0usize;
    while !stopped && opts.max_steps.is_none_or(|m| here < m) {
        let r = match t.step() {
            Ok(Some(r)) => r,
            Ok(None) => break,
            Err(Error::Cancelled) => break,
            Err(e) => return Err(e),
        };
        here += 1;
        let due = r.step.is_multiple_of(opts.eval_every.max(1)) || t.done();
        let ev = match (&eval, due) {
            (Some(data), true) => match t.evaluate(data) {
                Ok(e) => Some(e),
                Err(Error::Cancelled) => None,
                Err(e) => return Err(e),
            },
            _ => None,
        };
        stopped = on_event(FinetuneEvent::Step(&r, ev.as_ref())).is_break();
        if let (Some(dir), true) = (&ckpt, opts.save_every > 0) {
            if r.step.is_multiple_of(opts.save_every) {
                t.save_checkpoint(dir)?;
            }
        }
    }
    let name = opts
        .out
        .as_ref()
        .map_or("trained".to_string(), |p| p.display().to_string());
    let adapter = t.params().to_adapter(model, &name)?;
    if let Some(out) = &opts.out {
        if let Some(dir) = &ckpt {
            t.save_checkpoint(dir)?;
        }
        write_adapter(model, &adapter, out)?;
    }
    Ok(FinetuneResult {
        adapter,
        steps: t.step_count(),
        total_steps: t.total_steps(),
        finished: t.done(),
        checkpoint: ckpt,
    })
}

/// Writes a trained adapter into `out`: the PEFT files and `adapter.gguf` (llama.cpp's LoRA).
pub fn write_adapter(model: &Model, adapter: &Adapter, out: &Path) -> Result<()> {
    crate::lora::write_peft(out, adapter, &model.path().display().to_string())?;
    crate::lora::write_gguf_lora(&out.join("adapter.gguf"), adapter, model.config())
}
