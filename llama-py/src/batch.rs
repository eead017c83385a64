//! `Model.generate_batch` and `Batch`: many generations advanced together, one forward pass per
//! step (llama-core's continuous batching).

use std::collections::HashMap;
use std::sync::Mutex;

use llama_core::{GenerateOptions, Generation, SeqId, SessionOptions};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::constrain::Structured;
use crate::convert::{generation_dict, prompt as prompt_arg};
use crate::errors::{invalid, IntoPy};
use crate::handles::{Model, Sampler};
use crate::signals::Signals;

fn sampler_for(py: Python<'_>, s: Option<&Py<Sampler>>) -> PyResult<llama_core::Sampler> {
    match s {
        // Each sequence draws from its own copy (the same seed gives what it gives alone).
        Some(s) => Ok(s
            .bind(py)
            .get()
            .inner
            .lock()
            .map_err(|_| invalid("poisoned"))?
            .clone()),
        None => llama_core::Sampler::new(llama_core::SamplerConfig::default()).py_err(),
    }
}

/// Many generations on one model, advanced together: `add` requests, then `step` (or iterate)
/// until empty; each step runs one forward pass for every sequence. Each sequence generates
/// exactly what it would alone with the same sampler and options.
#[pyclass(module = "llama_core._native", name = "Batch")]
pub struct Batch {
    inner: Mutex<llama_core::Batch>,
    model: llama_core::Model,
    done: Mutex<HashMap<u64, Generation>>,
}

#[pymethods]
impl Batch {
    /// An empty batch for `model`.
    #[new]
    fn new(model: &Bound<'_, Model>) -> Batch {
        let m = model.get().inner.clone();
        Batch {
            inner: Mutex::new(llama_core::Batch::new(&m)),
            model: m,
            done: Mutex::new(HashMap::new()),
        }
    }

    /// Adds a generation and returns its id. `prompt`: a str, token ids, or a conversation
    /// (rendered with the chat template). Options as `Session.generate` / `Session.chat`; the
    /// sampler is copied (its seed gives what it gives alone). `n_ctx` sizes its session.
    #[pyo3(signature = (prompt, max_tokens=256, sampler=None, stop=None, *, n_ctx=0, **options))]
    #[allow(clippy::too_many_arguments)]
    fn add(
        &self,
        py: Python<'_>,
        prompt: &Bound<'_, PyAny>,
        max_tokens: usize,
        sampler: Option<Py<Sampler>>,
        stop: Option<Vec<String>>,
        n_ctx: usize,
        options: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<u64> {
        let p = prompt_arg(prompt, true)?;
        let st = Structured::from_kwargs("add", options, true)?;
        let mut opts = GenerateOptions::default().max_tokens(max_tokens);
        opts.stop = stop.unwrap_or_default();
        let opts = st.apply(opts);
        let smp = sampler_for(py, sampler.as_ref())?;
        let model = self.model.clone();
        let inner = &self.inner;
        py.detach(move || {
            let s = model
                .session(SessionOptions::default().n_ctx(n_ctx))
                .py_err()?;
            let mut b = inner.lock().map_err(|_| invalid("poisoned"))?;
            b.add(s, p.as_prompt(), opts, smp).py_err().map(|id| id.0)
        })
    }

    /// One step (one forward pass for every sequence): a list of `(id, text)` pieces released
    /// by it (text may be empty). Finished sequences move to `finished()`.
    fn step(&self, py: Python<'_>) -> PyResult<Vec<(u64, String)>> {
        let (events, finished) = py.detach(|| -> PyResult<_> {
            let mut b = self.inner.lock().map_err(|_| invalid("poisoned"))?;
            let ev = b.step().py_err()?;
            Ok((ev, b.take_finished()))
        })?;
        let mut done = self.done.lock().map_err(|_| invalid("poisoned"))?;
        let mut first_error = None;
        for f in finished {
            match f.result {
                Ok(g) => {
                    done.insert(f.id.0, g);
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_error {
            return Err(crate::errors::to_py(e));
        }
        Ok(events.into_iter().map(|e| (e.id.0, e.piece.text)).collect())
    }

    /// The sequences that ended since the last call: `{id: generation dict}` (the keys of
    /// `Session.last_generation`).
    fn finished<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let mut done = self.done.lock().map_err(|_| invalid("poisoned"))?;
        let d = PyDict::new(py);
        for (id, g) in done.drain() {
            d.set_item(id, generation_dict(py, &g)?)?;
        }
        Ok(d)
    }

    /// Cancels sequence `id` (it ends with stop reason 'cancelled' at the next step); False
    /// when it is not running.
    fn cancel(&self, id: u64) -> PyResult<bool> {
        let b = self.inner.lock().map_err(|_| invalid("poisoned"))?;
        Ok(b.cancel_handle(SeqId(id)).map(|h| h.cancel()).is_some())
    }

    fn __len__(&self) -> PyResult<usize> {
        Ok(self.inner.lock().map_err(|_| invalid("poisoned"))?.len())
    }
}

/// `Model.generate_batch`: every prompt generated together; the texts in prompt order.
pub(crate) fn generate_batch(
    py: Python<'_>,
    model: &Bound<'_, Model>,
    prompts: &Bound<'_, PyAny>,
    max_tokens: usize,
    sampler: Option<Py<Sampler>>,
    stop: Option<Vec<String>>,
    st: Structured,
) -> PyResult<Vec<String>> {
    if prompts.extract::<String>().is_ok() {
        return Err(invalid("prompts must be a list of prompts, not one str"));
    }
    let items: Vec<llama_core::OwnedPrompt> = prompts
        .try_iter()
        .map_err(|_| invalid("prompts must be a list"))?
        .map(|p| p.and_then(|p| prompt_arg(&p, true)))
        .collect::<PyResult<_>>()?;
    let m = model.get().inner.clone();
    let mut opts = GenerateOptions::default().max_tokens(max_tokens);
    opts.stop = stop.unwrap_or_default();
    let opts = st.apply(opts);
    let samplers: Vec<llama_core::Sampler> = items
        .iter()
        .map(|_| sampler_for(py, sampler.as_ref()))
        .collect::<PyResult<_>>()?;
    let sig = Signals::new(py);
    let r = py.detach(|| -> PyResult<Vec<String>> {
        let mut b = llama_core::Batch::new(&m);
        for (p, smp) in items.iter().zip(samplers) {
            let s = m.session(SessionOptions::default()).py_err()?;
            b.add(s, p.as_prompt(), opts.clone(), smp).py_err()?;
        }
        let mut out = vec![];
        while !b.is_empty() {
            if sig.check() {
                return Err(invalid("interrupted"));
            }
            b.step().py_err()?;
            out.extend(b.take_finished());
        }
        out.sort_by_key(|f| f.id);
        out.into_iter()
            .map(|f| f.result.map(|g| g.text).py_err())
            .collect()
    });
    sig.result(r)
}
