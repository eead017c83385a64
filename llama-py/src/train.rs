//! `finetune`: LoRA training (and distillation) from Python.

use std::path::PathBuf;

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyModule};

use crate::errors::{invalid, IntoPy};
use crate::handles::Model;

/// Trains a LoRA adapter on `model` with JSONL `data` (`{"text"}`, `{"prompt", "completion"}`
/// or `{"messages"}` lines; the loss on completion / assistant tokens only) and returns it,
/// ready for `Session.set_adapters`. With `out`, also writes `out/adapter_config.json` +
/// `out/adapter_model.safetensors` (PEFT), `out/adapter.gguf` (llama.cpp) and
/// `out/checkpoint/` (what `llama finetune --resume` continues from). With `teacher`,
/// distills: the adapter learns the teacher's top-`top_k` next-token distribution.
/// `progress`: True shows a tqdm bar when tqdm is installed; a callable receives a dict per
/// step (step, total_steps, loss, lr, grad_norm, tokens, eval_loss) and may return False to
/// stop early. Ctrl-C raises KeyboardInterrupt after the running step, once what was trained
/// is written to `out`. The recipe (evaluation every `eval_every` steps and after the last,
/// packing) is the core's, the same as the CLI's and C's.
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
    use llama_core::train::{FinetuneEvent, FinetuneOptions, LoraConfig, TrainOptions};
    use std::ops::ControlFlow;
    let m = model.inner.clone();
    let targets = match targets {
        None => llama_core::Target::ALL.to_vec(),
        Some(t) => t
            .iter()
            .map(|s| llama_core::Target::parse(s))
            .collect::<Result<Vec<_>, _>>()
            .py_err()?,
    };
    let to = TrainOptions::default()
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
        .seed(seed);
    let mut opts = FinetuneOptions::new(data)
        .with_max_len(max_len)
        .with_pack(pack)
        .with_eval_every(eval_every)
        .with_train(to);
    opts.eval = eval;
    opts.out = out;
    if let Some(t) = teacher {
        opts = opts.with_teacher(t.inner.clone(), top_k);
    }
    // A callable, or a tqdm bar (progress=None or True, when tqdm is installed).
    if progress
        .as_ref()
        .is_some_and(|p| !p.is_callable() && p.extract::<bool>().is_err())
    {
        return Err(invalid("progress must be a bool or a callable"));
    }
    let callback: Option<Py<PyAny>> = progress
        .as_ref()
        .filter(|p| p.is_callable())
        .map(|p| p.clone().unbind());
    let want_bar = match &progress {
        None => true,
        Some(p) => p.extract::<bool>().unwrap_or(false),
    };
    let tqdm: Option<Py<PyAny>> = if callback.is_none() && want_bar {
        PyModule::import(py, "tqdm.auto")
            .and_then(|tq| tq.getattr("tqdm"))
            .ok()
            .map(Bound::unbind)
    } else {
        None
    };
    let mut bar: Option<Py<PyAny>> = None;
    let mut failure: Option<PyErr> = None;
    // The run holds no GIL; each event takes it for the callback, the bar and Ctrl-C.
    let result = py.detach(|| {
        llama_core::train::finetune(&m, &opts, &mut |event| {
            Python::attach(|py| -> PyResult<ControlFlow<()>> {
                match event {
                    FinetuneEvent::Started(t) => {
                        if let Some(tq) = &tqdm {
                            let kw = PyDict::new(py);
                            kw.set_item("total", t.total_steps())?;
                            kw.set_item("desc", "finetune")?;
                            kw.set_item("unit", "step")?;
                            bar = Some(tq.bind(py).call((), Some(&kw))?.unbind());
                        }
                    }
                    FinetuneEvent::Step(r, ev) => {
                        if let Some(b) = &bar {
                            let b = b.bind(py);
                            b.call_method1("update", (1,))?;
                            let pf = PyDict::new(py);
                            pf.set_item("loss", format!("{:.4}", r.loss))?;
                            b.call_method("set_postfix", (), Some(&pf))?;
                        }
                        if let Some(cb) = &callback {
                            let d = PyDict::new(py);
                            d.set_item("step", r.step)?;
                            d.set_item("total_steps", r.total_steps)?;
                            d.set_item("epoch", r.epoch)?;
                            d.set_item("loss", r.loss)?;
                            d.set_item("lr", r.lr)?;
                            d.set_item("grad_norm", r.grad_norm)?;
                            d.set_item("tokens", r.tokens)?;
                            if let Some(e) = ev {
                                d.set_item("eval_loss", e.loss)?;
                                d.set_item("eval_perplexity", e.perplexity)?;
                            }
                            let keep = cb.bind(py).call1((d,))?;
                            if keep.extract::<bool>().ok() == Some(false) {
                                return Ok(ControlFlow::Break(()));
                            }
                        }
                    }
                    _ => {}
                }
                py.check_signals()?;
                Ok(ControlFlow::Continue(()))
            })
            .unwrap_or_else(|e| {
                // A Python error (Ctrl-C among them): the run stops and saves what it has,
                // then the error is raised.
                failure = Some(e);
                ControlFlow::Break(())
            })
        })
    });
    if let Some(b) = &bar {
        b.bind(py).call_method0("close")?;
    }
    let result = result.py_err()?;
    if let Some(e) = failure {
        return Err(e);
    }
    Ok(crate::adapter::Adapter {
        inner: result.adapter,
    })
}
