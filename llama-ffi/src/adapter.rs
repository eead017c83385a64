//! `llama_adapter`: LoRA adapters (PEFT folders, GGUF LoRA files) loaded for a model and applied
//! per session.

use llama_core::Adapter;

use crate::{
    cstr_arg, fail, fail_with, give, guard, llama_model, llama_session, llama_status, require,
    take_back,
};

/// A LoRA adapter loaded for one model (opaque, immutable). Share it across threads and
/// sessions; it keeps what it needs alive, so it may outlive `llama_model_free`.
pub struct llama_adapter {
    pub(crate) inner: Adapter,
}

/// Loads a LoRA adapter for `model`: a Hugging Face PEFT folder (`adapter_config.json` +
/// `adapter_model.safetensors`) or a llama.cpp GGUF LoRA file (NUL-terminated UTF-8 path).
/// Every matrix is checked against the model's shapes. On success `*out` owns the adapter:
/// free it with `llama_adapter_free`.
#[no_mangle]
pub unsafe extern "C" fn llama_adapter_load(
    model: *const llama_model,
    path: *const std::ffi::c_char,
    out: *mut *mut llama_adapter,
) -> llama_status {
    guard!({
        require!(model, out);
        let path = cstr_arg(path, "path")?;
        let inner = (*model).inner.load_adapter(path).map_err(fail)?;
        give(out, llama_adapter { inner })
    })
}

/// Frees an adapter. Sessions it is applied to keep using it. NULL is a no-op.
#[no_mangle]
pub unsafe extern "C" fn llama_adapter_free(adapter: *mut llama_adapter) {
    guard!((), { take_back(adapter) })
}

/// How many projections the adapter updates over all layers (0 for NULL).
#[no_mangle]
pub unsafe extern "C" fn llama_adapter_n_matrices(adapter: *const llama_adapter) -> usize {
    guard!(0, { adapter.as_ref().map_or(0, |a| a.inner.n_matrices()) })
}

/// The largest rank of the adapter's matrices (0 for NULL).
#[no_mangle]
pub unsafe extern "C" fn llama_adapter_max_rank(adapter: *const llama_adapter) -> usize {
    guard!(0, { adapter.as_ref().map_or(0, |a| a.inner.max_rank()) })
}

/// Applies `n` adapters with their `scales` to `session` from its next evaluation on,
/// replacing the previous set (`n` = 0: the base model; `adapters` and `scales` may then be
/// NULL). Other sessions are untouched; a scale of 0 is exactly the base model. Every adapter
/// must have been loaded for this session's model and every scale must be finite.
#[no_mangle]
pub unsafe extern "C" fn llama_session_set_adapters(
    session: *mut llama_session,
    adapters: *const *const llama_adapter,
    scales: *const f32,
    n: usize,
) -> llama_status {
    guard!({
        require!(session);
        let mut set = Vec::with_capacity(n.min(1024));
        if n > 0 {
            require!(adapters, scales);
            if n > 1 << 16 {
                return Err(fail_with(
                    llama_status::InvalidArgument,
                    format!("{n} adapters at once"),
                ));
            }
            let list = std::slice::from_raw_parts(adapters, n);
            let sc = std::slice::from_raw_parts(scales, n);
            for (i, (&a, &s)) in list.iter().zip(sc).enumerate() {
                let Some(a) = a.as_ref() else {
                    return Err(fail_with(
                        llama_status::NullArgument,
                        format!("adapters[{i}] is NULL"),
                    ));
                };
                set.push((a.inner.clone(), s));
            }
        }
        (*session).inner.set_adapters(&set).map_err(fail)?;
        llama_status::Ok
    })
}
