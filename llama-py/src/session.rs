//! `Session` and `TokenStream`.

use std::sync::Mutex;

use llama_core::{GenerateOptions, Generation, Generator, OwnedPrompt};
use numpy::PyArray1;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyTuple};

use crate::constrain::Structured;
use crate::convert::{generation_dict, messages, prompt as prompt_arg};
use crate::errors::{invalid, to_py, IntoPy};
use crate::handles::{closed, Model, Sampler, Session};
use crate::signals::{guarded, Signals};

fn gen_opts(
    max_tokens: usize,
    stop: Option<Vec<String>>,
    logprobs: Option<usize>,
) -> GenerateOptions {
    let mut o = GenerateOptions::default().max_tokens(max_tokens);
    o.stop = stop.unwrap_or_default();
    o.logprobs = logprobs;
    o
}

fn default_sampler(py: Python<'_>, sampler: Option<Py<Sampler>>) -> PyResult<Py<Sampler>> {
    match sampler {
        Some(s) => Ok(s),
        None => Py::new(
            py,
            Sampler {
                inner: Mutex::new(
                    llama_core::Sampler::new(llama_core::SamplerConfig::default()).py_err()?,
                ),
            },
        ),
    }
}

impl Session {
    /// Runs `f` on the session with the GIL released (the lock is taken without the GIL, so a
    /// thread waiting for the session never blocks Python).
    fn with<T: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&mut llama_core::Session) -> PyResult<T> + Send,
    ) -> PyResult<T> {
        py.detach(|| {
            let mut g = self.lock()?;
            let s = g.as_mut().ok_or_else(closed)?;
            f(s)
        })
    }

    /// [`Session::with`] for work that evaluates tokens: Ctrl-C stops it.
    fn with_signals<T: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&mut llama_core::Session) -> PyResult<T> + Send,
    ) -> PyResult<T> {
        let sig = Signals::new(py);
        let r = py.detach(|| {
            let mut g = self.lock()?;
            let s = g.as_mut().ok_or_else(closed)?;
            guarded(s, &sig, f)
        });
        sig.result(r)
    }

    fn run_to_end(
        &self,
        py: Python<'_>,
        prompt: OwnedPrompt,
        sampler: &Py<Sampler>,
        opts: GenerateOptions,
    ) -> PyResult<String> {
        let smp = sampler.bind(py).get();
        let sig = Signals::new(py);
        let g = py.detach(|| -> PyResult<Generation> {
            let mut guard = self.lock()?;
            let s = guard.as_mut().ok_or_else(closed)?;
            let mut sm = smp.lock()?;
            guarded(s, &sig, |s| {
                let mut gen = s.start(prompt.as_prompt(), opts).py_err()?;
                while !sig.check() && gen.step(s, &mut sm).py_err()?.is_some() {}
                gen.stop();
                Ok(gen.into_generation())
            })
        });
        // Ctrl-C: what was generated is kept (the session holds it), then KeyboardInterrupt.
        let g = match (sig.take(), g) {
            (Some(e), Ok(g)) => {
                *self.last.lock().map_err(|_| invalid("poisoned"))? = Some(g);
                return Err(e);
            }
            (Some(e), Err(_)) => return Err(e),
            (None, g) => g?,
        };
        let text = g.text.clone();
        *self.last.lock().map_err(|_| invalid("poisoned"))? = Some(g);
        Ok(text)
    }
}

#[pymethods]
impl Session {
    /// Evaluates token ids after the current context (prompt processing in chunks).
    fn eval(&self, py: Python<'_>, tokens: Vec<u32>) -> PyResult<()> {
        self.with_signals(py, |s| s.eval(&tokens).py_err())
    }

    /// Logits of the last evaluated position as a float32 array, or None before any eval.
    fn logits<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyArray1<f32>>>> {
        let v = self.with(py, |s| Ok(s.logits().map(|l| l.to_vec())))?;
        Ok(v.map(|v| PyArray1::from_vec(py, v)))
    }

    /// The `k` most likely next tokens as (id, log-probability) pairs, best first.
    #[pyo3(signature = (k=5))]
    fn top_logprobs(&self, py: Python<'_>, k: usize) -> PyResult<Vec<(u32, f32)>> {
        self.with(py, |s| s.top_logprobs(k).py_err())
    }

    /// Token ids in the session.
    #[getter]
    fn tokens(&self, py: Python<'_>) -> PyResult<Vec<u32>> {
        self.with(py, |s| Ok(s.tokens().to_vec()))
    }

    /// Context size in tokens.
    #[getter]
    fn n_ctx(&self, py: Python<'_>) -> PyResult<usize> {
        self.with(py, |s| Ok(s.n_ctx()))
    }

    /// The model this session runs.
    #[getter]
    fn model(&self, py: Python<'_>) -> Py<Model> {
        self.model.clone_ref(py)
    }

    /// Bytes the KV cache holds now (it grows in chunks as the context fills).
    #[getter]
    fn kv_cache_bytes(&self, py: Python<'_>) -> PyResult<usize> {
        self.with(py, |s| Ok(s.kv_cache_bytes()))
    }

    fn __len__(&self, py: Python<'_>) -> PyResult<usize> {
        self.with(py, |s| Ok(s.len()))
    }

    /// Generates after `prompt` (a str, tokenized with special tokens parsed and BOS on an
    /// empty session, or a list of ids) and returns the text. `sampler=None` uses llama.cpp's
    /// default sampling; pass `Sampler.greedy()` for greedy decoding. At most one constraint:
    /// `response_format` (OpenAI's: `{"type": "json_schema", "json_schema": {"schema": ...}}`
    /// or `{"type": "json_object"}`), `grammar` (GBNF or Lark text), `regex`, `choices`.
    /// Speculative decoding, which never changes the output: `draft=` a `Model` with this
    /// model's vocabulary (a smaller quantization of it) or `"lookup"` (drafts copied from the
    /// context), or `prediction=` the text you expect; `draft_max=` tokens per verification
    /// (default 8). `last_generation` counts `drafted_tokens` and `accepted_tokens`.
    #[pyo3(signature = (prompt, max_tokens=256, sampler=None, stop=None, logprobs=None, **options))]
    #[allow(clippy::too_many_arguments)]
    fn generate(
        &self,
        py: Python<'_>,
        prompt: &Bound<'_, PyAny>,
        max_tokens: usize,
        sampler: Option<Py<Sampler>>,
        stop: Option<Vec<String>>,
        logprobs: Option<usize>,
        options: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<String> {
        let p = prompt_arg(prompt, false)?;
        let st = Structured::from_kwargs("generate", options, false)?;
        let smp = default_sampler(py, sampler)?;
        self.run_to_end(py, p, &smp, st.apply(gen_opts(max_tokens, stop, logprobs)))
    }

    /// Like `generate` but returns an iterator of text pieces as they are produced.
    #[pyo3(signature = (prompt, max_tokens=256, sampler=None, stop=None, **options))]
    fn stream(
        slf: &Bound<'_, Self>,
        prompt: &Bound<'_, PyAny>,
        max_tokens: usize,
        sampler: Option<Py<Sampler>>,
        stop: Option<Vec<String>>,
        options: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<TokenStream> {
        let p = prompt_arg(prompt, false)?;
        let st = Structured::from_kwargs("stream", options, false)?;
        start_stream(slf, p, sampler, st.apply(gen_opts(max_tokens, stop, None)))
    }

    /// Replies to a conversation (list of {'role', 'content'} dicts; assistant turns may carry
    /// 'tool_calls', tool results use role 'tool') using the model's chat template; the cached
    /// prefix of earlier turns is reused. Message content is plain text whatever it holds
    /// (`<|im_end|>` in it is not a control token) and roles must be system, user, assistant,
    /// tool or ipython, unless `parse_special_in_content=True` (for messages you trust). Returns the reply text. Constraints as in `generate`;
    /// `tools` (OpenAI's list of `{"type": "function", "function": {...}}`) are shown to the
    /// model and `tool_choice` ("auto", "required", "none", a name, or OpenAI's dict) decides
    /// whether it must call one: the parsed calls are in `last_generation["tool_calls"]`.
    #[pyo3(signature = (messages, max_tokens=256, sampler=None, stop=None, **options))]
    fn chat(
        &self,
        py: Python<'_>,
        messages: &Bound<'_, PyAny>,
        max_tokens: usize,
        sampler: Option<Py<Sampler>>,
        stop: Option<Vec<String>>,
        options: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<String> {
        let msgs = self::messages(messages)?;
        let st = Structured::from_kwargs("chat", options, true)?;
        let smp = default_sampler(py, sampler)?;
        let opts = st.apply(gen_opts(max_tokens, stop, None));
        self.run_to_end(py, OwnedPrompt::Chat(msgs), &smp, opts)
    }

    /// Like `chat` but returns an iterator of text pieces as they are produced.
    #[pyo3(signature = (messages, max_tokens=256, sampler=None, stop=None, **options))]
    fn chat_stream(
        slf: &Bound<'_, Self>,
        messages: &Bound<'_, PyAny>,
        max_tokens: usize,
        sampler: Option<Py<Sampler>>,
        stop: Option<Vec<String>>,
        options: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<TokenStream> {
        let msgs = self::messages(messages)?;
        let st = Structured::from_kwargs("chat_stream", options, true)?;
        let opts = st.apply(gen_opts(max_tokens, stop, None));
        start_stream(slf, OwnedPrompt::Chat(msgs), sampler, opts)
    }

    /// Details of the last `generate`/`chat`/finished `stream`: a dict with 'tokens', 'text',
    /// 'stop_reason', 'prompt_tokens', 'prompt_ms', 'generated_tokens', 'generation_ms' and
    /// 'logprobs' (list of (id, logprob, [(id, logprob), ...])) and 'tool_calls' (list of
    /// {'name', 'arguments'} dicts). None before any generation.
    #[getter]
    fn last_generation<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        let g = self.last.lock().map_err(|_| invalid("poisoned"))?.clone();
        let Some(g) = g else { return Ok(None) };
        Ok(Some(generation_dict(py, &g)?))
    }

    /// An independent copy sharing the evaluated prefix.
    fn fork(&self, py: Python<'_>) -> PyResult<Session> {
        let f = self.with(py, |s| s.fork().py_err())?;
        Ok(Session::wrap(self.model.clone_ref(py), f))
    }

    /// Applies LoRA adapters, `[(adapter, scale), ...]`, to this session's evaluations from
    /// now on, replacing the previous set (`[]`: the base model). Other sessions are untouched;
    /// a scale of 0 is exactly the base model.
    fn set_adapters(
        &self,
        py: Python<'_>,
        adapters: Vec<(Py<crate::adapter::Adapter>, f32)>,
    ) -> PyResult<()> {
        let set: Vec<(llama_core::Adapter, f32)> = adapters
            .iter()
            .map(|(a, s)| (a.bind(py).get().inner.clone(), *s))
            .collect();
        self.with(py, |s| s.set_adapters(&set).py_err())
    }

    /// The adapters applied, `[(adapter, scale), ...]`.
    #[getter]
    fn adapters(&self, py: Python<'_>) -> PyResult<Vec<(crate::adapter::Adapter, f32)>> {
        self.with(py, |s| {
            Ok(s.adapters()
                .iter()
                .map(|(a, sc)| (crate::adapter::Adapter { inner: a.clone() }, *sc))
                .collect())
        })
    }

    /// Rolls back to the first `n` tokens.
    fn truncate(&self, py: Python<'_>, n: usize) -> PyResult<()> {
        self.with(py, |s| {
            s.truncate(n);
            Ok(())
        })
    }

    /// Stops the generation or prompt evaluation running on this session (from any thread).
    fn cancel(&self) {
        self.cancel.cancel();
    }

    /// Serializes the session (and `sampler`'s state, if given) to bytes.
    #[pyo3(signature = (sampler=None))]
    fn save_state<'py>(
        &self,
        py: Python<'py>,
        sampler: Option<Py<Sampler>>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let smp = sampler.as_ref().map(|s| s.bind(py).get());
        let bytes = py.detach(|| -> PyResult<Vec<u8>> {
            let g = self.lock()?;
            let s = g.as_ref().ok_or_else(closed)?;
            match smp {
                Some(sm) => {
                    let lock = sm.lock()?;
                    s.save_state(Some(&lock)).py_err()
                }
                None => s.save_state(None).py_err(),
            }
        })?;
        Ok(PyBytes::new(py, &bytes))
    }

    /// Restores a session saved by `save_state` onto `model`: returns (session, sampler or
    /// None). Raises SessionStateError for another model's or corrupted data. The KV cache
    /// keeps the types the data records, bit for bit; `kv_type` (both) or `kv_type_k` /
    /// `kv_type_v` convert it to other types (a block type rounds: the session continues
    /// close to the saved one); a type the model cannot use raises ValueError.
    #[staticmethod]
    #[pyo3(signature = (model, data, kv_type=None, kv_type_k=None, kv_type_v=None))]
    fn restore(
        py: Python<'_>,
        model: Py<Model>,
        data: &[u8],
        kv_type: Option<&str>,
        kv_type_k: Option<&str>,
        kv_type_v: Option<&str>,
    ) -> PyResult<(Session, Option<Sampler>)> {
        let m = &model.bind(py).get().inner;
        let parse = |t: Option<&str>| {
            t.or(kv_type)
                .map(llama_core::KvCacheType::parse)
                .transpose()
                .py_err()
        };
        let (k, v) = (parse(kv_type_k)?, parse(kv_type_v)?);
        let data = data.to_vec();
        let (s, smp) = py
            .detach(|| llama_core::Session::restore_as(m, &data, k, v))
            .py_err()?;
        Ok((
            Session::wrap(model.clone_ref(py), s),
            smp.map(|x| Sampler {
                inner: Mutex::new(x),
            }),
        ))
    }

    /// Frees the KV cache now; the session cannot be used afterwards.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        self.cancel.cancel();
        py.detach(|| {
            let mut g = self.lock()?;
            *g = None;
            Ok(())
        })
    }

    /// Whether `close()` was called.
    #[getter]
    fn closed(&self, py: Python<'_>) -> PyResult<bool> {
        py.detach(|| Ok(self.lock()?.is_none()))
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __exit__(
        &self,
        py: Python<'_>,
        _exc_type: Option<Bound<'_, PyAny>>,
        _exc: Option<Bound<'_, PyAny>>,
        _tb: Option<Bound<'_, PyAny>>,
    ) -> PyResult<bool> {
        self.close(py)?;
        Ok(false)
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        Ok(py.detach(|| match self.lock() {
            Ok(g) => match g.as_ref() {
                Some(s) => format!(
                    "Session(n_tokens={}, n_ctx={}, kv_type_k='{}', kv_type_v='{}')",
                    s.len(),
                    s.n_ctx(),
                    s.options().kv_type_k,
                    s.options().kv_type_v
                ),
                None => "Session(closed)".to_string(),
            },
            Err(_) => "Session(poisoned)".to_string(),
        }))
    }

    /// Pickling stores the session state (the model is pickled as its path).
    fn __reduce__<'py>(
        slf: &Bound<'py, Self>,
    ) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyTuple>)> {
        let py = slf.py();
        let state = slf.get().save_state(py, None)?;
        let restore = PyModule::import(py, "llama_core._native")?.getattr("_restore_session")?;
        let args = PyTuple::new(
            py,
            [
                slf.get().model.clone_ref(py).into_any(),
                state.into_any().unbind(),
            ],
        )?;
        Ok((restore, args))
    }
}

/// Evaluates `prompt` (the core's rules: BOS, chat prefix reuse) and returns the stream of the
/// generation that follows.
fn start_stream(
    slf: &Bound<'_, Session>,
    prompt: OwnedPrompt,
    sampler: Option<Py<Sampler>>,
    opts: GenerateOptions,
) -> PyResult<TokenStream> {
    let py = slf.py();
    let smp = default_sampler(py, sampler)?;
    let gen = slf
        .get()
        .with_signals(py, move |s| s.start(prompt.as_prompt(), opts).py_err())?;
    Ok(TokenStream {
        session: slf.clone().unbind(),
        sampler: smp,
        gen: Mutex::new(Some(gen)),
    })
}

/// Unpickling helper for `Session`.
#[pyfunction]
pub fn _restore_session(py: Python<'_>, model: Py<Model>, data: &[u8]) -> PyResult<Session> {
    Ok(Session::restore(py, model, data, None, None, None)?.0)
}

/// Iterator of generated text pieces (whole UTF-8 characters; stop strings held back).
/// `close()` ends it early.
#[pyclass(module = "llama_core._native", name = "TokenStream", frozen)]
pub struct TokenStream {
    session: Py<Session>,
    sampler: Py<Sampler>,
    gen: Mutex<Option<Generator>>,
}

#[pymethods]
impl TokenStream {
    fn __iter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<String>> {
        let session = self.session.bind(py).get();
        let sampler = self.sampler.bind(py).get();
        let sig = Signals::new(py);
        let r = py.detach(|| -> PyResult<(Option<String>, Option<Generation>)> {
            let mut gg = self.gen.lock().map_err(|_| invalid("poisoned"))?;
            let Some(gen) = gg.as_mut() else {
                return Ok((None, None));
            };
            let mut sg = session.lock()?;
            let s = sg.as_mut().ok_or_else(closed)?;
            let mut sm = sampler.lock()?;
            loop {
                if sig.check() {
                    // Ctrl-C: the stream ends here; the session keeps what was generated.
                    let g = gg.take().map(|mut g| {
                        g.stop();
                        g.into_generation()
                    });
                    return Ok((None, g));
                }
                match gen.step(s, &mut sm) {
                    Ok(Some(p)) if !p.text.is_empty() => return Ok((Some(p.text), None)),
                    Ok(Some(_)) => continue,
                    Ok(None) => {
                        let g = gg.take().map(|g| g.into_generation());
                        return Ok((None, g));
                    }
                    Err(e) => {
                        gg.take();
                        return Err(to_py(e));
                    }
                }
            }
        });
        let (piece, finished) = match (sig.take(), r) {
            (Some(e), Ok((_, g))) => {
                if let Some(g) = g {
                    *session.last.lock().map_err(|_| invalid("poisoned"))? = Some(g);
                }
                return Err(e);
            }
            (Some(e), Err(_)) => return Err(e),
            (None, r) => r?,
        };
        if let Some(g) = finished {
            *session.last.lock().map_err(|_| invalid("poisoned"))? = Some(g);
        }
        Ok(piece)
    }

    /// Ends the stream early; the session keeps what was generated so far.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let session = self.session.bind(py).get();
        let g = py.detach(|| -> PyResult<Option<Generation>> {
            let mut gg = self.gen.lock().map_err(|_| invalid("poisoned"))?;
            Ok(gg.take().map(|mut g| {
                g.stop();
                g.into_generation()
            }))
        })?;
        if let Some(g) = g {
            *session.last.lock().map_err(|_| invalid("poisoned"))? = Some(g);
        }
        Ok(())
    }
}
