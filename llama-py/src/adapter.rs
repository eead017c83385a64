//! `Adapter`.

use pyo3::prelude::*;

/// A LoRA adapter loaded for one model (`Model.load_adapter`): immutable, shareable across
/// sessions and threads. Apply it with `Session.set_adapters([(adapter, scale)])`.
#[pyclass(module = "llama_core._native", name = "Adapter", frozen)]
pub struct Adapter {
    pub(crate) inner: llama_core::Adapter,
}

#[pymethods]
impl Adapter {
    /// The folder or file it was loaded from.
    #[getter]
    fn path(&self) -> String {
        self.inner.path().to_string_lossy().into_owned()
    }
    /// "peft" or "gguf".
    #[getter]
    fn format(&self) -> &'static str {
        self.inner.format().as_str()
    }
    /// The projections it updates in at least one layer ("q", "k", "v", "o", "gate", "up",
    /// "down").
    #[getter]
    fn targets(&self) -> Vec<&'static str> {
        self.inner
            .targets()
            .into_iter()
            .map(|t| t.as_str())
            .collect()
    }
    /// How many projections it updates over all layers.
    #[getter]
    fn n_matrices(&self) -> usize {
        self.inner.n_matrices()
    }
    /// The largest rank of its matrices.
    #[getter]
    fn max_rank(&self) -> usize {
        self.inner.max_rank()
    }
    /// The file's global alpha, or None (rsLoRA, per-module alphas, or a GGUF file without one).
    #[getter]
    fn alpha(&self) -> Option<f32> {
        self.inner.alpha()
    }
    fn __repr__(&self) -> String {
        format!(
            "Adapter(path={:?}, format={:?}, matrices={}, max_rank={})",
            self.inner.path().display().to_string(),
            self.inner.format().as_str(),
            self.inner.n_matrices(),
            self.inner.max_rank()
        )
    }
}
