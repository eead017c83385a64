//! `finetune`: LoRA training (and distillation) from Python.

use std::path::PathBuf;

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyModule};

use crate::errors::{invalid, IntoPy};
use crate::handles::Model;

/// Trains a LoRA adapter on `model` with JSONL `data` (`{"text"}`, `{"prompt", "completion"}`
/// or `{"messages"}` lines; the loss on completion / assistant tokens only) and returns it,
/// ready for `Session.set_adapters`. With `out`, also writes `out/adapter_config.json` +
/// `out/adapter_model.safetensors` (PEFT) and `out/adapter.gguf` (llama.cpp). With `teacher`,
/// distills: the adapter learns the teacher's top-`top_k` next-token distribution.
/// `progress`: True shows a tqdm bar when tqdm is installed; a callable receives a dict per
/// step (step, total_steps, loss, lr, grad_norm, tokens, eval_loss) and may return False to
/// stop early. Ctrl-C raises KeyboardInterrupt after the running step.
#[pyfunction]
#[pyo3(signature = (model, data, *, out=None, eval=None, rank=8, alpha=16.0, targets=None,
    rslora=false, epochs=1, lr=2e-4, batch=1, grad_accum=1, max_len=512, warmup=0,
    weight_decay=0.0, clip=1.0, seed=0, eval_every=50, teacher=None, top_k=32, pack=false,
    progress=None))]
#[allow(clippy::too_many_arguments)]
pub(crate) fn finetune(
    py: Python<'_>,
    model: &Model,
    data: PathBuf,
    out: Option<PathBuf>,
    eval: Option<PathBuf>,
    rank: usize,
    alpha: f32,
    targets: Option<Vec<String>>,
    rslora: bool,
    epochs: usize,
    lr: f32,
    batch: usize,
    grad_accum: usize,
    max_len: usize,
    warmup: usize,
    weight_decay: f32,
    clip: f32,
    seed: u64,
    eval_every: usize,
    teacher: Option<PyRef<'_, Model>>,
    top_k: usize,
    pack: bool,
    progress: Option<Bound<'_, PyAny>>,
) -> PyResult<crate::adapter::Adapter> {
    use llama_core::train::{load_jsonl, LoraConfig, TrainOptions, Trainer};
    let m = model.inner.clone();
    let targets = match targets {
        None => llama_core::Target::ALL.to_vec(),
        Some(t) => t
            .iter()
            .map(|s| llama_core::Target::parse(s))
            .collect::<Result<Vec<_>, _>>()
            .py_err()?,
    };
    let teacher = teacher.map(|t| t.inner.clone());
    let (train, ev) = py
        .detach(|| -> llama_core::Result<_> {
            let train = load_jsonl(&m, &data, max_len)?;
            let ev = eval
                .as_ref()
                .map(|p| load_jsonl(&m, p, max_len))
                .transpose()?;
            Ok((train, ev))
        })
        .py_err()?;
    let opts = TrainOptions::default()
        .lora(LoraConfig {
            rank,
            alpha,
            targets,
            rslora,
        })
        .epochs(epochs)
        .lr(lr)
        .batch(batch)
        .grad_accum(grad_accum)
        .warmup(warmup)
        .weight_decay(weight_decay)
        .clip(clip)
        .seed(seed)
        .pack(if pack { max_len } else { 0 });
    let mut t = Trainer::new(&m, train, opts).py_err()?;
    if let Some(tm) = &teacher {
        t = t.with_teacher(tm, top_k).py_err()?;
    }
    // A callable, or a tqdm bar (progress=None or True, when tqdm is installed).
    let callback = progress.as_ref().filter(|p| p.is_callable()).cloned();
    let want_bar = match &progress {
        None => true,
        Some(p) => p.extract::<bool>().unwrap_or(false),
    };
    let bar: Option<Bound<'_, PyAny>> = if callback.is_none() && want_bar {
        match PyModule::import(py, "tqdm.auto") {
            Ok(tq) => {
                let kw = PyDict::new(py);
                kw.set_item("total", t.total_steps())?;
                kw.set_item("desc", "finetune")?;
                kw.set_item("unit", "step")?;
                Some(tq.getattr("tqdm")?.call((), Some(&kw))?)
            }
            Err(_) => None,
        }
    } else {
        None
    };
    if progress
        .as_ref()
        .is_some_and(|p| !p.is_callable() && p.extract::<bool>().is_err())
    {
        return Err(invalid("progress must be a bool or a callable"));
    }
    loop {
        let r = py.detach(|| t.step()).py_err()?;
        let Some(r) = r else { break };
        let d = PyDict::new(py);
        d.set_item("step", r.step)?;
        d.set_item("total_steps", r.total_steps)?;
        d.set_item("epoch", r.epoch)?;
        d.set_item("loss", r.loss)?;
        d.set_item("lr", r.lr)?;
        d.set_item("grad_norm", r.grad_norm)?;
        d.set_item("tokens", r.tokens)?;
        if let Some(ev) = &ev {
            if r.step % eval_every.max(1) == 0 || t.done() {
                let e = py.detach(|| t.evaluate(ev)).py_err()?;
                d.set_item("eval_loss", e.loss)?;
                d.set_item("eval_perplexity", e.perplexity)?;
            }
        }
        if let Some(b) = &bar {
            b.call_method1("update", (1,))?;
            let pf = PyDict::new(py);
            pf.set_item("loss", format!("{:.4}", r.loss))?;
            b.call_method("set_postfix", (), Some(&pf))?;
        }
        if let Some(cb) = &callback {
            let keep = cb.call1((d,))?;
            if keep.extract::<bool>().ok() == Some(false) {
                break;
            }
        }
        py.check_signals()?;
    }
    if let Some(b) = &bar {
        b.call_method0("close")?;
    }
    let name = out
        .as_ref()
        .map_or("trained".to_string(), |p| p.display().to_string());
    let a = t.params().to_adapter(&m, &name).py_err()?;
    if let Some(dir) = &out {
        let base = m.path().display().to_string();
        py.detach(|| -> llama_core::Result<()> {
            llama_core::lora::write_peft(dir, &a, &base)?;
            llama_core::lora::write_gguf_lora(&dir.join("adapter.gguf"), &a, m.config())
        })
        .py_err()?;
    }
    Ok(crate::adapter::Adapter { inner: a })
}
