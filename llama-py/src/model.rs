//! `Model`.

use std::ops::ControlFlow;
use std::path::PathBuf;

use llama_core::{ModelOptions, SessionOptions};
use numpy::PyArray1;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

use crate::convert::messages;
use crate::errors::IntoPy;
use crate::handles::{Model, Session};

#[pymethods]
impl Model {
    /// Loads a model. `path`: a .gguf file or a Hugging Face folder. `progress=True` shows a
    /// tqdm bar when tqdm is installed. `quantize` ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1",
    /// "q4_k", "q5_k", "q6_k") quantizes dense weights while loading. `threads` (0: one per
    /// physical core) computes the load and the sessions that set none; `kernel` ("auto",
    /// "scalar", "avx2", "vnni256", "avx512", "candle") picks the kernel path. Raises
    /// FileNotFoundError, ModelLoadError, ValueError.
    #[staticmethod]
    #[pyo3(signature = (path, *, progress=false, quantize=None, threads=0, kernel="auto"))]
    fn load(
        py: Python<'_>,
        path: PathBuf,
        progress: bool,
        quantize: Option<&str>,
        threads: usize,
        kernel: &str,
    ) -> PyResult<Model> {
        let quantize = quantize
            .map(llama_core::QuantType::parse)
            .transpose()
            .py_err()?;
        let kernel = llama_core::Kernel::parse(kernel).py_err()?;
        let bar: Option<Py<PyAny>> = if progress {
            match PyModule::import(py, "tqdm.auto") {
                Ok(m) => {
                    let kwargs = PyDict::new(py);
                    kwargs.set_item("total", 100)?;
                    kwargs.set_item("desc", "loading")?;
                    kwargs.set_item("unit", "%")?;
                    Some(m.getattr("tqdm")?.call((), Some(&kwargs))?.unbind())
                }
                Err(_) => None,
            }
        } else {
            None
        };
        let mut last = 0i64;
        let sig = crate::signals::Signals::new(py);
        let res = py.detach(|| {
            let mut opts = ModelOptions::default()
                .with_kernel(kernel)
                .with_threads(threads);
            if let Some(q) = quantize {
                opts = opts.with_quantize(q);
            }
            // Every tensor: the bar moves, and Ctrl-C stops the load.
            opts = opts.with_progress(|p| {
                if let Some(b) = &bar {
                    let now = (p.fraction() * 100.0) as i64;
                    if now > last {
                        let step = now - last;
                        last = now;
                        Python::attach(|py| {
                            let _ = b.bind(py).call_method1("update", (step,));
                        });
                    }
                }
                if sig.check() {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            });
            llama_core::Model::load(&path, opts)
        });
        if let Some(b) = &bar {
            let _ = b.bind(py).call_method0("close");
        }
        let res = sig.result(res.py_err());
        Ok(Model { inner: res? })
    }

    /// Starts a session. `n_ctx=0` means 4096 or the model's trained context if smaller;
    /// `kv_type` ("f16", "f32", "q8_0" or "q4_0") stores keys and values, `kv_type_k` /
    /// `kv_type_v` override it for one of them; `context_shift=n_keep` enables context shift;
    /// `threads` (0: the model's) computes this session's forward passes.
    #[pyo3(signature = (n_ctx=0, n_batch=512, kv_type="f16", context_shift=None, threads=0, kv_type_k=None, kv_type_v=None))]
    #[allow(clippy::too_many_arguments)]
    fn session(
        slf: &Bound<'_, Self>,
        n_ctx: usize,
        n_batch: usize,
        kv_type: &str,
        context_shift: Option<usize>,
        threads: usize,
        kv_type_k: Option<&str>,
        kv_type_v: Option<&str>,
    ) -> PyResult<Session> {
        let kv = llama_core::KvCacheType::parse(kv_type).py_err()?;
        let one = |t: Option<&str>| -> PyResult<llama_core::KvCacheType> {
            match t {
                Some(t) => llama_core::KvCacheType::parse(t).py_err(),
                None => Ok(kv),
            }
        };
        let mut o = SessionOptions::default()
            .n_ctx(n_ctx)
            .n_batch(n_batch)
            .kv_type_k(one(kv_type_k)?)
            .kv_type_v(one(kv_type_v)?)
            .threads(threads);
        o.context_shift = context_shift;
        let s = slf.get().inner.session(o).py_err()?;
        Ok(Session::wrap(slf.clone().unbind(), s))
    }

    /// Generates after every prompt at once (one forward pass per step for all of them) and
    /// returns the texts in prompt order. Each prompt: a str, token ids, or a conversation (a
    /// list of message dicts, rendered with the chat template). Every sequence gets a copy of
    /// `sampler` (default: llama.cpp's sampling) and the other options as in `Session.chat`;
    /// each gives exactly what it gives alone. Ctrl-C interrupts it.
    #[pyo3(signature = (prompts, max_tokens=256, sampler=None, stop=None, **options))]
    fn generate_batch(
        slf: &Bound<'_, Self>,
        prompts: &Bound<'_, PyAny>,
        max_tokens: usize,
        sampler: Option<Py<crate::handles::Sampler>>,
        stop: Option<Vec<String>>,
        options: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Vec<String>> {
        let st = crate::constrain::Structured::from_kwargs("generate_batch", options, true)?;
        crate::batch::generate_batch(slf.py(), slf, prompts, max_tokens, sampler, stop, st)
    }

    /// Token ids of `text` (llama.cpp semantics: `add_special` adds BOS when the model asks for
    /// it, `parse_special` maps special-token text to its id).
    #[pyo3(signature = (text, add_special=true, parse_special=false))]
    fn tokenize(
        &self,
        py: Python<'_>,
        text: &str,
        add_special: bool,
        parse_special: bool,
    ) -> PyResult<Vec<u32>> {
        let text = text.to_string();
        py.detach(|| self.inner.tokenize(&text, add_special, parse_special))
            .py_err()
    }

    /// Text of token ids (special tokens rendered when `special`).
    #[pyo3(signature = (ids, special=false))]
    fn detokenize(&self, ids: Vec<u32>, special: bool) -> PyResult<String> {
        self.inner.detokenize(&ids, special).py_err()
    }

    /// Renders messages (dicts with 'role' and 'content') with the model's chat template.
    #[pyo3(signature = (messages, add_generation_prompt=true))]
    fn apply_chat_template(
        &self,
        messages: &Bound<'_, PyAny>,
        add_generation_prompt: bool,
    ) -> PyResult<String> {
        let msgs = self::messages(messages)?;
        self.inner
            .apply_chat_template(&msgs, add_generation_prompt)
            .py_err()
    }

    /// Embedding of `text` as a float32 array of `n_embd` values: the final hidden states
    /// (after the output norm), mean-pooled (`pooling="mean"`) or of the last token ("last").
    #[pyo3(signature = (text, pooling="mean"))]
    fn embed<'py>(
        &self,
        py: Python<'py>,
        text: &str,
        pooling: &str,
    ) -> PyResult<Bound<'py, PyArray1<f32>>> {
        let pooling = llama_core::Pooling::parse(pooling).py_err()?;
        let text = text.to_string();
        let sig = crate::signals::Signals::new(py);
        let v = py.detach(|| {
            self.inner
                .embed_pooled_with(&text, pooling, &mut || sig.check())
        });
        let v = sig.result(v.py_err())?;
        Ok(PyArray1::from_vec(py, v))
    }

    /// Whether `token` ends generation.
    fn is_eog(&self, token: u32) -> bool {
        self.inner.tokenizer().is_eog(token)
    }

    /// Vocabulary size.
    #[getter]
    fn n_vocab(&self) -> usize {
        self.inner.config().vocab_size
    }
    /// Hidden size (embedding width).
    #[getter]
    fn n_embd(&self) -> usize {
        self.inner.config().hidden_size
    }
    /// Context length the model was trained for.
    #[getter]
    fn n_ctx_train(&self) -> usize {
        self.inner.config().max_position_embeddings
    }
    /// Number of transformer layers.
    #[getter]
    fn n_layers(&self) -> usize {
        self.inner.config().num_hidden_layers
    }
    /// Storage type of the weights (e.g. "Q4_1", "F32").
    #[getter]
    fn weight_type(&self) -> String {
        self.inner.weight_type().to_string()
    }
    /// The kernel path the model computes on ("scalar", "avx2", "vnni256", "avx512", "candle").
    #[getter]
    fn kernel(&self) -> &'static str {
        self.inner.kernel().as_str()
    }
    /// Threads of the model's pool (sessions that set none use it).
    #[getter]
    fn threads(&self) -> usize {
        self.inner.threads()
    }
    /// Loads a LoRA adapter for this model: a Hugging Face PEFT folder (adapter_config.json +
    /// adapter_model.safetensors) or a llama.cpp GGUF LoRA file.
    fn load_adapter(&self, py: Python<'_>, path: PathBuf) -> PyResult<crate::adapter::Adapter> {
        let inner = py.detach(|| self.inner.load_adapter(&path)).py_err()?;
        Ok(crate::adapter::Adapter { inner })
    }
    /// "gguf" or "safetensors".
    #[getter]
    fn format(&self) -> String {
        self.inner.format().to_string()
    }
    /// The file or folder the model came from.
    #[getter]
    fn path(&self) -> PathBuf {
        self.inner.path().to_path_buf()
    }
    /// The model's chat template, or None.
    #[getter]
    fn chat_template(&self) -> Option<String> {
        self.inner.chat_template().map(str::to_string)
    }
    /// End-of-generation token ids.
    #[getter]
    fn eog_ids(&self) -> Vec<u32> {
        self.inner.tokenizer().eog_ids().to_vec()
    }

    fn __repr__(&self) -> String {
        let c = self.inner.config();
        let params = self.inner.n_params();
        format!(
            "Model(architecture='{}', params={:.1}M, layers={}, hidden={}, heads={}/{}, weights='{}', format='{}', n_ctx_train={}, path='{}')",
            c.architecture,
            params as f64 / 1e6,
            c.num_hidden_layers,
            c.hidden_size,
            c.num_attention_heads,
            c.num_key_value_heads,
            self.inner.weight_type(),
            self.inner.format(),
            c.max_position_embeddings,
            self.inner.path().display()
        )
    }

    /// Pickling reloads the model from its path.
    fn __reduce__<'py>(
        slf: &Bound<'py, Self>,
    ) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyTuple>)> {
        let py = slf.py();
        let load = py.get_type::<Model>().getattr("load")?;
        let args = PyTuple::new(py, [slf.get().inner.path().to_path_buf()])?;
        Ok((load, args))
    }
}
