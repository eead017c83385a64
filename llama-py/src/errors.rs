//! One mapping from `llama_core::Error` to the Python exception hierarchy defined in
//! `llama_core/_errors.py`.

use pyo3::exceptions::{PyFileNotFoundError, PyRuntimeError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyModule;

static ERRORS: PyOnceLock<Py<PyModule>> = PyOnceLock::new();

fn class<'py>(py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyAny>> {
    let m = ERRORS.get_or_try_init(py, || {
        PyModule::import(py, "llama_core._errors").map(|m| m.unbind())
    })?;
    m.bind(py).getattr(name)
}

/// Builds the Python exception for a core error.
pub fn to_py(e: llama_core::Error) -> PyErr {
    use llama_core::Error as E;
    let name = match &e {
        E::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            return PyFileNotFoundError::new_err(e.to_string());
        }
        E::Io { .. }
        | E::Config { .. }
        | E::Weights { .. }
        | E::UnsupportedDType(_)
        | E::UnsupportedArchitecture(_) => "ModelLoadError",
        E::Tokenizer(_) => "TokenizerError",
        E::ChatTemplate(_) => "ChatTemplateError",
        E::ContextOverflow { .. } => "ContextOverflowError",
        E::InvalidArgument(_) => "InvalidArgumentError",
        E::Cancelled => "GenerationCancelled",
        E::State(_) => "SessionStateError",
        E::Grammar(_) => "ConstraintError",
        _ => "LlamaError",
    };
    let msg = e.to_string();
    Python::attach(
        |py| match class(py, name).map(|c| c.cast_into::<pyo3::types::PyType>()) {
            Ok(Ok(cls)) => PyErr::from_type(cls, msg),
            _ => {
                PyRuntimeError::new_err(format!("{msg} (llama_core._errors.{name} is unavailable)"))
            }
        },
    )
}

/// An `InvalidArgumentError` (also a `ValueError`) with a message.
pub fn invalid(msg: impl Into<String>) -> PyErr {
    to_py(llama_core::Error::InvalidArgument(msg.into()))
}

pub trait IntoPy<T> {
    fn py_err(self) -> PyResult<T>;
}

impl<T> IntoPy<T> for llama_core::Result<T> {
    fn py_err(self) -> PyResult<T> {
        self.map_err(to_py)
    }
}
