//! The native module `llama_core._native`: Python bindings of llama-core. The GIL is released
//! during load, prompt processing and every decode step.

mod adapter;
mod batch;
mod constrain;
mod convert;
mod errors;
mod handles;
mod model;
mod sampler;
mod session;
mod signals;
mod train;

use pyo3::prelude::*;

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // The library's log records go to Python's `logging` (logger "llama_core" and children).
    // Levels are looked up on every record (no caching), so `logging` configuration made at
    // any time applies; the library logs rarely.
    let _ = pyo3_log::Logger::new(m.py(), pyo3_log::Caching::Nothing).and_then(|l| {
        l.install()
            .map_err(|e| pyo3::exceptions::PyRuntimeError::new_err(e.to_string()))
    });
    m.add_class::<handles::Model>()?;
    m.add_class::<adapter::Adapter>()?;
    m.add_class::<handles::Session>()?;
    m.add_class::<session::TokenStream>()?;
    m.add_class::<handles::Sampler>()?;
    m.add_class::<batch::Batch>()?;
    m.add_function(wrap_pyfunction!(session::_restore_session, m)?)?;
    m.add_function(wrap_pyfunction!(train::finetune, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
