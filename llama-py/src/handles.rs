//! The Python classes' Rust structs (their methods are in model.rs, session.rs, sampler.rs):
//! defined here, below every file that uses them, so the files import each other in one
//! direction only (convert.rs and handles.rs at the bottom, model.rs at the top).

use std::sync::Mutex;

use llama_core::{CancelHandle, Generation};
use pyo3::prelude::*;

use crate::errors::invalid;

/// A loaded Llama-family model (GGUF file or Hugging Face folder). Immutable and shareable
/// across threads and sessions.
#[pyclass(module = "llama_core._native", name = "Model", frozen)]
pub struct Model {
    pub(crate) inner: llama_core::Model,
}

/// One sequence being evaluated: KV cache, tokens, logits. Use it from one thread at a time;
/// `cancel()` may be called from any thread. A context manager: leaving the `with` block frees
/// the KV cache.
#[pyclass(module = "llama_core._native", name = "Session", frozen)]
pub struct Session {
    pub(crate) inner: Mutex<Option<llama_core::Session>>,
    pub(crate) cancel: CancelHandle,
    pub(crate) last: Mutex<Option<Generation>>,
    pub(crate) model: Py<Model>,
}

impl Session {
    pub(crate) fn wrap(model: Py<Model>, s: llama_core::Session) -> Session {
        Session {
            cancel: s.cancel_handle(),
            inner: Mutex::new(Some(s)),
            last: Mutex::new(None),
            model,
        }
    }

    pub(crate) fn lock(&self) -> PyResult<std::sync::MutexGuard<'_, Option<llama_core::Session>>> {
        self.inner
            .lock()
            .map_err(|_| invalid("the session was poisoned by an earlier failure"))
    }
}

/// The error of a call on a closed session.
pub(crate) fn closed() -> PyErr {
    invalid("the session is closed")
}

/// Picks the next token: penalties, logit bias, top-k, top-p, min-p, temperature, then greedy
/// (temperature 0) or a seeded random draw. Names and defaults follow llama.cpp.
#[pyclass(module = "llama_core._native", name = "Sampler", frozen)]
pub struct Sampler {
    pub(crate) inner: Mutex<llama_core::Sampler>,
}

impl Sampler {
    pub(crate) fn lock(&self) -> PyResult<std::sync::MutexGuard<'_, llama_core::Sampler>> {
        self.inner
            .lock()
            .map_err(|_| invalid("the sampler was poisoned by an earlier failure"))
    }
}
