//! `llama finetune`: trains a LoRA adapter and writes it as a PEFT folder and a GGUF LoRA, with
//! a progress bar, a loss log (JSONL) and a loss plot (SVG). Ctrl-C saves a checkpoint to resume.

use std::io::Write;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Instant;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use llama_core::train::{self, FinetuneEvent, FinetuneOptions, LoraConfig, TrainOptions};
use llama_core::{Model, Target};

use crate::AnyResult;

#[derive(Args)]
pub struct FinetuneArgs {
    /// The base model (a .gguf file of any type, quantized included, or a Hugging Face folder).
    #[arg(short, long)]
    model: PathBuf,
    #[command(flatten)]
    train: TrainArgs,
}

#[derive(Args)]
pub struct DistillArgs {
    /// The teacher model (same vocabulary as the student).
    #[arg(long)]
    teacher: PathBuf,
    /// The student model the LoRA adapter is trained on.
    #[arg(long)]
    student: PathBuf,
    /// How many of the teacher's most likely tokens each position matches.
    #[arg(long, default_value_t = 32)]
    top_k: usize,
    #[command(flatten)]
    train: TrainArgs,
}

#[derive(Args)]
pub struct TrainArgs {
    /// Training data: JSONL of {"text"}, {"prompt", "completion"} or {"messages"}.
    #[arg(long)]
    data: PathBuf,
    /// Evaluation data (same shapes): loss and perplexity every --eval-every steps.
    #[arg(long)]
    eval: Option<PathBuf>,
    /// Output folder: adapter_config.json + adapter_model.safetensors (PEFT), adapter.gguf
    /// (llama.cpp), loss.jsonl, loss.svg, checkpoint/.
    #[arg(short, long)]
    out: PathBuf,
    #[arg(long, default_value_t = 8)]
    rank: usize,
    #[arg(long, default_value_t = 16.0)]
    alpha: f32,
    /// rsLoRA scaling (alpha / sqrt(rank)).
    #[arg(long)]
    rslora: bool,
    /// Comma-separated targets: q,k,v,o,gate,up,down.
    #[arg(long, default_value = "q,k,v,o,gate,up,down")]
    targets: String,
    #[arg(long, default_value_t = 1)]
    epochs: usize,
    #[arg(long, default_value_t = 2e-4)]
    lr: f32,
    #[arg(long, default_value_t = 1)]
    batch: usize,
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    /// Longest example in tokens (a longer one is an error naming its line).
    #[arg(long, default_value_t = 512)]
    max_len: usize,
    /// Pack each step's examples into sequences of up to --max-len tokens (each still attends
    /// only to itself; faster for short examples).
    #[arg(long)]
    pack: bool,
    /// Warmup steps (linear), then cosine decay.
    #[arg(long, default_value_t = 0)]
    warmup: usize,
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f32,
    /// Clip the gradient's global norm (0: off).
    #[arg(long, default_value_t = 1.0)]
    clip: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 50)]
    eval_every: usize,
    /// Checkpoint every this many steps (0: only at the end and on Ctrl-C).
    #[arg(long, default_value_t = 0)]
    save_every: usize,
    /// Resume from a checkpoint folder (OUT/checkpoint of an earlier run).
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Stop after this many steps (the run can be resumed).
    #[arg(long)]
    max_steps: Option<usize>,
}

fn svg(points: &[(usize, f64)], eval: &[(usize, f64)]) -> String {
    let (w, h, m) = (640.0, 360.0, 40.0);
    let all: Vec<f64> = points.iter().chain(eval).map(|p| p.1).collect();
    let (lo, hi) = all
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| {
            (a.min(v), b.max(v))
        });
    let (lo, hi) = if hi > lo {
        (lo, hi)
    } else {
        (lo - 1.0, hi + 1.0)
    };
    let n = points
        .iter()
        .chain(eval)
        .map(|p| p.0)
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let xy = |s: usize, v: f64| {
        (
            m + (w - 2.0 * m) * s as f64 / n,
            h - m - (h - 2.0 * m) * (v - lo) / (hi - lo),
        )
    };
    let line = |pts: &[(usize, f64)]| -> String {
        pts.iter()
            .map(|&(s, v)| {
                let (x, y) = xy(s, v);
                format!("{x:.1},{y:.1}")
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<line x1="{m}" y1="{b}" x2="{r}" y2="{b}" stroke="black"/><line x1="{m}" y1="{m}" x2="{m}" y2="{b}" stroke="black"/>
<text x="{m}" y="{t}">loss {hi:.3}</text><text x="{m}" y="{bl}">{lo:.3}</text><text x="{r}" y="{bl}" text-anchor="end">step {n}</text>
<polyline fill="none" stroke="steelblue" stroke-width="1.5" points="{train}"/>
<polyline fill="none" stroke="darkorange" stroke-width="2" points="{ev}"/>
<text x="{r}" y="{t}" text-anchor="end"><tspan fill="steelblue">train</tspan> <tspan fill="darkorange">eval</tspan></text>
</svg>
"##,
        b = h - m,
        r = w - m,
        t = m - 10.0,
        bl = h - m + 16.0,
        train = line(points),
        ev = line(eval),
    )
}

pub fn finetune(a: FinetuneArgs) -> AnyResult<()> {
    run(&a.model, None, a.train)
}

pub fn distill(a: DistillArgs) -> AnyResult<()> {
    run(&a.student, Some((&a.teacher, a.top_k)), a.train)
}

fn run(model_path: &Path, teacher: Option<(&Path, usize)>, a: TrainArgs) -> AnyResult<()> {
    let model = Model::load(model_path, crate::model_options())?;
    let targets = a
        .targets
        .split(',')
        .map(Target::parse)
        .collect::<Result<Vec<_>, _>>()?;
    let to = TrainOptions::default()
        .lora(LoraConfig {
            rank: a.rank,
            alpha: a.alpha,
            targets,
            rslora: a.rslora,
        })
        .epochs(a.epochs)
        .lr(a.lr)
        .batch(a.batch)
        .grad_accum(a.grad_accum)
        .warmup(a.warmup)
        .weight_decay(a.weight_decay)
        .clip(a.clip)
        .seed(a.seed);
    let mut opts = FinetuneOptions::new(&a.data)
        .with_out(a.out.clone())
        .with_max_len(a.max_len)
        .with_pack(a.pack)
        .with_eval_every(a.eval_every)
        .with_save_every(a.save_every)
        .with_train(to);
    opts.eval = a.eval.clone();
    opts.resume = a.resume.clone();
    opts.max_steps = a.max_steps;
    if let Some((p, k)) = teacher {
        let tm = Model::load(p, crate::model_options())?;
        eprintln!("distilling from {} (top {k})", tm.path().display());
        opts = opts.with_teacher(tm, k);
    }
    std::fs::create_dir_all(&a.out)?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} steps {msg} [{elapsed_precise} < {eta_precise}]",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(a.resume.is_some())
        .write(true)
        .truncate(a.resume.is_none())
        .open(a.out.join("loss.jsonl"))?;
    let (mut points, mut evals) = (vec![], vec![]);
    let t0 = Instant::now();
    let mut tokens = 0usize;
    let mut failure: Option<std::io::Error> = None;
    let result = train::finetune(&model, &opts, &mut |event| {
        match event {
            FinetuneEvent::Started(t) => {
                // Ctrl-C: the step running finishes, then the checkpoint and adapter are saved.
                let (flag, stop) = (t.cancel_flag(), stop.clone());
                if let Err(e) = ctrlc::set_handler(move || {
                    stop.store(true, Ordering::Relaxed);
                    flag.store(true, Ordering::Relaxed);
                }) {
                    failure = Some(std::io::Error::other(e));
                    return ControlFlow::Break(());
                }
                eprintln!(
                    "training {} LoRA parameters (rank {}, {} steps) on {}",
                    t.params().n_params(),
                    t.options().lora.rank,
                    t.total_steps(),
                    model.path().display()
                );
                bar.set_length(t.total_steps() as u64);
                bar.set_position(t.step_count() as u64);
            }
            FinetuneEvent::Step(r, ev) => {
                tokens += r.tokens;
                let tps = tokens as f64 / t0.elapsed().as_secs_f64();
                bar.set_position(r.step as u64);
                bar.set_message(format!(
                    "loss {:.4} lr {:.2e} {:.0} tok/s",
                    r.loss, r.lr, tps
                ));
                points.push((r.step, r.loss));
                let mut rec = serde_json::json!({"step": r.step, "epoch": r.epoch, "loss": r.loss,
                    "lr": r.lr, "grad_norm": r.grad_norm, "tokens": r.tokens, "scored": r.scored,
                    "tokens_per_s": tps});
                if let Some(e) = ev {
                    rec["eval_loss"] = e.loss.into();
                    rec["eval_ppl"] = e.perplexity.into();
                    evals.push((r.step, e.loss));
                    bar.println(format!(
                        "step {}: eval loss {:.4}, perplexity {:.2}",
                        r.step, e.loss, e.perplexity
                    ));
                }
                if let Err(e) = writeln!(log, "{rec}") {
                    failure = Some(e);
                    return ControlFlow::Break(());
                }
            }
            _ => {}
        }
        if stop.load(Ordering::Relaxed) {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    })?;
    bar.finish_and_clear();
    if let Some(e) = failure {
        return Err(e.into());
    }
    std::fs::write(a.out.join("loss.svg"), svg(&points, &evals))?;
    if !result.finished {
        eprintln!(
            "stopped at step {}/{}; resume with --resume {}",
            result.steps,
            result.total_steps,
            a.out.join("checkpoint").display()
        );
    }
    eprintln!(
        "wrote {} (adapter_config.json, adapter_model.safetensors, adapter.gguf, loss.jsonl, loss.svg) in {:.1}s",
        a.out.display(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}
