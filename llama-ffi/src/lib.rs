//! C ABI over llama-core. Every exported function runs inside [`guard!`], which turns a Rust
//! panic into `LLAMA_STATUS_PANIC`; NULL arguments, wrong `struct_size` and invalid UTF-8 are
//! reported as statuses with a message from `llama_last_error_message()`.
#![allow(non_camel_case_types)]
#![allow(clippy::missing_safety_doc)]

use std::cell::RefCell;
use std::ffi::{c_char, CString};

mod adapter;
mod batch;
mod model;
mod sampler;
mod session;

pub use adapter::*;
pub use batch::*;
pub use model::*;
pub use sampler::*;
pub use session::*;

/// Status of a fallible call. `LLAMA_STATUS_OK` is 0; the others name the failure class and
/// `llama_last_error_message()` has the details.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum llama_status {
    /// Success.
    Ok = 0,
    /// A required pointer argument was NULL.
    NullArgument = 1,
    /// An argument was out of range, or a params struct had a wrong `struct_size`.
    InvalidArgument = 2,
    /// A string argument was not valid UTF-8.
    InvalidUtf8 = 3,
    /// A file could not be opened or read.
    Io = 4,
    /// The model files are invalid (configuration, weights, truncated or malformed file).
    ModelLoad = 5,
    /// The model uses an architecture or data type this library cannot run.
    Unsupported = 6,
    /// Tokenization failed.
    Tokenizer = 7,
    /// The chat template failed.
    ChatTemplate = 8,
    /// The tokens do not fit in the session's context.
    ContextOverflow = 9,
    /// The operation was cancelled (load progress callback, or a cancel handle).
    Cancelled = 10,
    /// A saved session state is invalid or belongs to another model.
    State = 11,
    /// The output buffer is too small; the size needed was written to the size out-pointer.
    BufferTooSmall = 12,
    /// A tensor backend error.
    Backend = 13,
    /// A constraint (JSON schema, grammar, regular expression, choices, tools) is invalid.
    Constraint = 14,
    /// An internal error (a caught panic). Please report it.
    Panic = 99,
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

pub(crate) fn set_error(msg: impl Into<String>) {
    let mut s: String = msg.into();
    s.retain(|c| c != '\0');
    let c = CString::new(s).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

pub(crate) fn fail_with(status: llama_status, msg: impl Into<String>) -> llama_status {
    set_error(msg);
    status
}

pub(crate) fn fail(e: llama_core::Error) -> llama_status {
    use llama_core::Error as E;
    let status = match &e {
        E::Io { .. } => llama_status::Io,
        E::Config { .. } | E::Weights { .. } => llama_status::ModelLoad,
        E::UnsupportedDType(_) | E::UnsupportedArchitecture(_) => llama_status::Unsupported,
        E::Tokenizer(_) => llama_status::Tokenizer,
        E::ChatTemplate(_) => llama_status::ChatTemplate,
        E::ContextOverflow { .. } => llama_status::ContextOverflow,
        E::InvalidArgument(_) => llama_status::InvalidArgument,
        E::Cancelled => llama_status::Cancelled,
        E::State(_) => llama_status::State,
        E::Grammar(_) => llama_status::Constraint,
        _ => llama_status::Backend,
    };
    fail_with(status, e.to_string())
}

fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".into()
    }
}

pub(crate) fn catch(f: impl FnOnce() -> llama_status) -> llama_status {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(s) => s,
        Err(p) => fail_with(
            llama_status::Panic,
            format!("internal error (panic): {}", panic_message(&p)),
        ),
    }
}

pub(crate) fn catch_or<T>(default: T, f: impl FnOnce() -> T) -> T {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|p| {
        set_error(format!("internal error (panic): {}", panic_message(&p)));
        default
    })
}

/// The panic boundary around every export (rustls-ffi's `ffi_panic_boundary!`). For a fallible
/// export the body is a block whose value is the status to return, in which argument checks and core
/// calls fail with `?` (their error is a `llama_status` whose message is already set) or
/// `return Err(status)`; a panic becomes `LLAMA_STATUS_PANIC` with its message.
macro_rules! guard {
    // An infallible export: on a panic it returns `$default` (the message is still set).
    ($default:expr, $body:block) => {
        $crate::catch_or($default, || $body)
    };
    ($body:block) => {
        $crate::catch(|| {
            let run = || -> ::std::result::Result<$crate::llama_status, $crate::llama_status> {
                Ok($body)
            };
            run().unwrap_or_else(|s| s)
        })
    };
}
pub(crate) use guard;

/// Returns `NullArgument` from the enclosing [`guard!`] body when a pointer is NULL.
macro_rules! require {
    ($($p:ident),+) => {
        $(
            if $p.is_null() {
                return Err($crate::fail_with($crate::llama_status::NullArgument, concat!("argument `", stringify!($p), "` is NULL")));
            }
        )+
    };
}
pub(crate) use require;

/// Hands `v` to C through `*out`, boxed (the matching `_free` takes it back).
pub(crate) unsafe fn give<T>(out: *mut *mut T, v: T) -> llama_status {
    *out = Box::into_raw(Box::new(v));
    llama_status::Ok
}

/// Frees what [`give`] handed out; NULL is a no-op.
pub(crate) unsafe fn take_back<T>(p: *mut T) {
    if !p.is_null() {
        drop(Box::from_raw(p));
    }
}

/// Reads a versioned params struct: NULL means defaults; a `struct_size` of 0 or larger than this
/// library's struct is an error; a smaller one (an older header) keeps defaults for the rest.
pub(crate) unsafe fn read_params<T: Copy>(
    p: *const T,
    default: T,
    size_of_first: usize,
) -> Result<T, llama_status> {
    if p.is_null() {
        return Ok(default);
    }
    let given = *(p as *const usize);
    let full = std::mem::size_of::<T>();
    if given < size_of_first || given > full {
        return Err(fail_with(
            llama_status::InvalidArgument,
            format!("params struct_size {given} is invalid (this library's struct has {full} bytes; set it with the *_default() function)"),
        ));
    }
    let mut out = default;
    std::ptr::copy_nonoverlapping(p as *const u8, &mut out as *mut T as *mut u8, given);
    Ok(out)
}

/// A `(pointer, length)` string argument as UTF-8.
pub(crate) unsafe fn str_arg<'a>(
    ptr: *const c_char,
    len: usize,
    what: &str,
) -> Result<&'a str, llama_status> {
    if ptr.is_null() {
        if len == 0 {
            return Ok("");
        }
        return Err(fail_with(
            llama_status::NullArgument,
            format!("argument `{what}` is NULL"),
        ));
    }
    let bytes = std::slice::from_raw_parts(ptr as *const u8, len);
    std::str::from_utf8(bytes).map_err(|e| {
        fail_with(
            llama_status::InvalidUtf8,
            format!("`{what}` is not valid UTF-8: {e}"),
        )
    })
}

/// A NUL-terminated string argument as UTF-8.
pub(crate) unsafe fn cstr_arg<'a>(ptr: *const c_char, what: &str) -> Result<&'a str, llama_status> {
    if ptr.is_null() {
        return Err(fail_with(
            llama_status::NullArgument,
            format!("argument `{what}` is NULL"),
        ));
    }
    std::ffi::CStr::from_ptr(ptr).to_str().map_err(|e| {
        fail_with(
            llama_status::InvalidUtf8,
            format!("`{what}` is not valid UTF-8: {e}"),
        )
    })
}

/// Two-call buffer rule: writes the needed size to `n_out`; copies into `buf` only when
/// `cap` is large enough (then also a terminating NUL if `nul` and there is room).
pub(crate) unsafe fn write_bytes(
    src: &[u8],
    buf: *mut u8,
    cap: usize,
    n_out: *mut usize,
    nul: bool,
) -> llama_status {
    if !n_out.is_null() {
        *n_out = src.len();
    }
    if cap < src.len() || (buf.is_null() && !src.is_empty()) {
        return fail_with(
            llama_status::BufferTooSmall,
            format!("buffer of {cap} bytes is too small: {} needed", src.len()),
        );
    }
    if !buf.is_null() {
        std::ptr::copy_nonoverlapping(src.as_ptr(), buf, src.len());
        if nul && cap > src.len() {
            *buf.add(src.len()) = 0;
        }
    }
    llama_status::Ok
}

/// Same rule for arrays of `T`.
pub(crate) unsafe fn write_array<T: Copy>(
    src: &[T],
    buf: *mut T,
    cap: usize,
    n_out: *mut usize,
) -> llama_status {
    if !n_out.is_null() {
        *n_out = src.len();
    }
    if cap < src.len() || (buf.is_null() && !src.is_empty()) {
        return fail_with(
            llama_status::BufferTooSmall,
            format!(
                "buffer of {cap} elements is too small: {} needed",
                src.len()
            ),
        );
    }
    if !buf.is_null() {
        std::ptr::copy_nonoverlapping(src.as_ptr(), buf, src.len());
    }
    llama_status::Ok
}

impl llama_status {
    /// Every status, for [`llama_status_str`].
    const ALL: [llama_status; 16] = [
        llama_status::Ok,
        llama_status::NullArgument,
        llama_status::InvalidArgument,
        llama_status::InvalidUtf8,
        llama_status::Io,
        llama_status::ModelLoad,
        llama_status::Unsupported,
        llama_status::Tokenizer,
        llama_status::ChatTemplate,
        llama_status::ContextOverflow,
        llama_status::Cancelled,
        llama_status::State,
        llama_status::BufferTooSmall,
        llama_status::Backend,
        llama_status::Constraint,
        llama_status::Panic,
    ];

    /// The status's name, NUL-terminated (an exhaustive match: a new status needs a name).
    fn name(self) -> &'static std::ffi::CStr {
        match self {
            llama_status::Ok => c"ok",
            llama_status::NullArgument => c"null argument",
            llama_status::InvalidArgument => c"invalid argument",
            llama_status::InvalidUtf8 => c"invalid UTF-8",
            llama_status::Io => c"I/O error",
            llama_status::ModelLoad => c"invalid model",
            llama_status::Unsupported => c"unsupported model",
            llama_status::Tokenizer => c"tokenizer error",
            llama_status::ChatTemplate => c"chat template error",
            llama_status::ContextOverflow => c"context overflow",
            llama_status::Cancelled => c"cancelled",
            llama_status::State => c"invalid session state",
            llama_status::BufferTooSmall => c"buffer too small",
            llama_status::Backend => c"backend error",
            llama_status::Constraint => c"invalid constraint",
            llama_status::Panic => c"internal error (panic)",
        }
    }
}

/// A static, NUL-terminated name for a status code ("unknown status" for other values).
#[no_mangle]
pub extern "C" fn llama_status_str(status: i32) -> *const c_char {
    guard!(c"unknown status".as_ptr(), {
        llama_status::ALL
            .iter()
            .find(|s| **s as i32 == status)
            .map_or(c"unknown status", |s| s.name())
            .as_ptr()
    })
}

/// The message of the last failed call on this thread (empty if none). The string belongs to
/// the library and stays valid until the next failing call on this thread.
#[no_mangle]
pub extern "C" fn llama_last_error_message() -> *const c_char {
    guard!(c"".as_ptr(), { LAST_ERROR.with(|e| e.borrow().as_ptr()) })
}

/// The library version as a static string, e.g. "0.1.0".
#[no_mangle]
pub extern "C" fn llama_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr() as *const c_char
}

/// The library version as MAJOR * 1000000 + MINOR * 1000 + PATCH (compare with
/// LLAMA_VERSION_NUMBER from the header).
#[no_mangle]
pub extern "C" fn llama_version_number() -> u32 {
    let p = |s: &str| s.parse::<u32>().unwrap_or(0);
    p(env!("CARGO_PKG_VERSION_MAJOR")) * 1_000_000
        + p(env!("CARGO_PKG_VERSION_MINOR")) * 1000
        + p(env!("CARGO_PKG_VERSION_PATCH"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panics_become_a_status_with_a_message() {
        let s = catch(|| panic!("boom"));
        assert_eq!(s, llama_status::Panic);
        let msg = unsafe { std::ffi::CStr::from_ptr(llama_last_error_message()) }
            .to_str()
            .unwrap()
            .to_string();
        assert!(msg.contains("boom"), "{msg}");
        assert_eq!(catch_or(7, || panic!("x")), 7);
    }

    #[test]
    fn status_strings_are_static_and_named() {
        let mut seen = std::collections::BTreeSet::new();
        for s in llama_status::ALL {
            let name = unsafe { std::ffi::CStr::from_ptr(llama_status_str(s as i32)) };
            assert_eq!(name, s.name());
            assert!(
                seen.insert(name.to_str().unwrap()),
                "{s:?}: name used twice"
            );
            assert_ne!(name.to_bytes(), b"unknown status");
        }
        for code in [-1, 15, 98, 100, 1000] {
            let s = unsafe { std::ffi::CStr::from_ptr(llama_status_str(code)) };
            assert_eq!(s.to_bytes(), b"unknown status");
        }
        // Every value of the header's enum is in `ALL` (0..=14 and 99).
        let codes: Vec<i32> = llama_status::ALL.iter().map(|s| *s as i32).collect();
        assert_eq!(codes, (0..=14).chain([99]).collect::<Vec<_>>());
    }

    #[test]
    fn the_guard_turns_errors_and_panics_into_statuses() {
        unsafe fn checked(p: *const u8, fail: bool) -> llama_status {
            guard!({
                require!(p);
                if fail {
                    return Err(fail_with(llama_status::InvalidArgument, "asked to fail"));
                }
                let n: usize = "12".parse().map_err(|_| llama_status::InvalidArgument)?;
                if n != 12 {
                    panic!("unreachable parse result");
                }
                llama_status::Ok
            })
        }
        unsafe {
            assert_eq!(checked(std::ptr::null(), false), llama_status::NullArgument);
            assert_eq!(checked(b"x".as_ptr(), true), llama_status::InvalidArgument);
            assert_eq!(checked(b"x".as_ptr(), false), llama_status::Ok);
        }
        let boom = |fail: bool| -> llama_status {
            guard!({
                if fail {
                    panic!("inside the guard");
                }
                llama_status::Ok
            })
        };
        assert_eq!(boom(true), llama_status::Panic);
        assert_eq!(boom(false), llama_status::Ok);
        assert_eq!(guard!(5usize, { "x".parse::<usize>().unwrap_or(5) }), 5);
    }

    #[test]
    fn version_number_matches_cargo() {
        let v: Vec<u32> = env!("CARGO_PKG_VERSION")
            .split('.')
            .map(|x| x.parse().unwrap())
            .collect();
        assert_eq!(
            llama_version_number(),
            v[0] * 1_000_000 + v[1] * 1000 + v[2]
        );
    }
}
