//! Ctrl-C while native code runs with the GIL released: Python runs signal handlers only when
//! the main thread executes Python code, so long native calls on the main thread check for
//! pending signals themselves, every decoded token and between prompt chunks and layers
//! (`llama_core::Session::set_interrupt`), at most every few milliseconds. The first error a
//! handler raises (`KeyboardInterrupt`) is kept and raised when the call has unwound, the
//! session left as it was before the interrupted step.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pyo3::prelude::*;

/// How often native code takes the GIL to look for signals.
const EVERY: Duration = Duration::from_millis(10);

struct State {
    raised: Option<PyErr>,
    last: Instant,
}

/// The signal checks of one native call.
#[derive(Clone)]
pub(crate) struct Signals {
    /// `None` off the main thread (signals are only handled there).
    state: Option<Arc<Mutex<State>>>,
}

impl Signals {
    /// Checks for the calling thread (taken with the GIL held).
    pub(crate) fn new(py: Python<'_>) -> Signals {
        let main = (|| -> PyResult<bool> {
            let threading = py.import("threading")?;
            let main = threading.call_method0("main_thread")?.getattr("ident")?;
            let me = threading.call_method0("get_ident")?;
            main.eq(me)
        })()
        .unwrap_or(false);
        Signals {
            state: main.then(|| {
                Arc::new(Mutex::new(State {
                    raised: None,
                    last: Instant::now(),
                }))
            }),
        }
    }

    /// Whether to stop: a signal handler raised (now or earlier in this call). Takes the GIL
    /// at most every [`EVERY`].
    pub(crate) fn check(&self) -> bool {
        let Some(state) = &self.state else {
            return false;
        };
        let Ok(mut st) = state.lock() else {
            return true;
        };
        if st.raised.is_some() {
            return true;
        }
        if st.last.elapsed() < EVERY {
            return false;
        }
        st.last = Instant::now();
        if let Err(e) = Python::attach(|py| py.check_signals()) {
            st.raised = Some(e);
            return true;
        }
        false
    }

    /// The check as a session interrupt.
    pub(crate) fn interrupt(&self) -> llama_core::Interrupt {
        let s = self.clone();
        Box::new(move || s.check())
    }

    /// The error a signal handler raised, if one did.
    pub(crate) fn take(&self) -> Option<PyErr> {
        self.state
            .as_ref()
            .and_then(|s| s.lock().ok().and_then(|mut st| st.raised.take()))
    }

    /// `r`, or the signal handler's error when one was raised during the call (the core then
    /// reports `Cancelled`).
    pub(crate) fn result<T>(&self, r: PyResult<T>) -> PyResult<T> {
        match self.take() {
            Some(e) => Err(e),
            None => r,
        }
    }
}

/// Runs `f` on `s` with `sig` installed as its interrupt (removed afterwards).
pub(crate) fn guarded<T>(
    s: &mut llama_core::Session,
    sig: &Signals,
    f: impl FnOnce(&mut llama_core::Session) -> PyResult<T>,
) -> PyResult<T> {
    s.set_interrupt(Some(sig.interrupt()));
    let r = f(s);
    s.set_interrupt(None);
    r
}
