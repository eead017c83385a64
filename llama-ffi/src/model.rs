//! `llama_model`: load, free, tokenize, detokenize, chat template, embeddings, metadata.

use std::ffi::{c_char, c_void};
use std::ops::ControlFlow;

use llama_core::{Kernel, Message, Model, ModelOptions, Pooling, QuantType};

use crate::{
    cstr_arg, fail, fail_with, give, guard, llama_status, read_params, require, str_arg, take_back,
    write_array, write_bytes,
};

/// A loaded model (opaque). Immutable; share it across threads freely.
pub struct llama_model {
    pub(crate) inner: Model,
}

/// Load progress callback: `progress` in [0, 1]; return false to abort the load
/// (`llama_model_load` then returns `LLAMA_STATUS_CANCELLED`). Called on the loading thread.
pub type llama_progress_cb =
    Option<unsafe extern "C" fn(progress: f32, user_data: *mut c_void) -> bool>;

/// Options for `llama_model_load`. Get defaults from `llama_model_params_default()`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct llama_model_params {
    /// `sizeof(llama_model_params)`; set by `llama_model_params_default()`.
    pub struct_size: usize,
    /// Progress callback, or NULL. Default NULL.
    pub progress: llama_progress_cb,
    /// Passed to `progress`. Default NULL.
    pub progress_user_data: *mut c_void,
    /// Quantize dense weights while loading: one of the `LLAMA_QUANTIZE_*` values. Default
    /// `LLAMA_QUANTIZE_NONE`.
    pub quantize: i32,
    /// Threads for loading and for the sessions that do not set their own; 0 (default) = one
    /// per physical core.
    pub n_threads: u32,
    /// Kernel path: one of the `LLAMA_KERNEL_*` values. Default `LLAMA_KERNEL_AUTO`.
    pub kernel: i32,
}

/// `llama_model_params.kernel`: the widest path this CPU runs.
pub const LLAMA_KERNEL_AUTO: i32 = 0;
/// Portable scalar code.
pub const LLAMA_KERNEL_SCALAR: i32 = 1;
/// x86-64 AVX2 + FMA + F16C.
pub const LLAMA_KERNEL_AVX2: i32 = 2;
/// AVX2 plus 256-bit AVX-512 VNNI.
pub const LLAMA_KERNEL_VNNI256: i32 = 3;
/// AVX-512 (F, BW, VL, VNNI).
pub const LLAMA_KERNEL_AVX512: i32 = 4;
/// candle's kernels and tensor operations throughout (the reference path).
pub const LLAMA_KERNEL_CANDLE: i32 = 5;

pub(crate) fn kernel_from_c(k: i32) -> Result<Kernel, llama_status> {
    Ok(match k {
        LLAMA_KERNEL_AUTO => Kernel::Auto,
        LLAMA_KERNEL_SCALAR => Kernel::Scalar,
        LLAMA_KERNEL_AVX2 => Kernel::Avx2,
        LLAMA_KERNEL_VNNI256 => Kernel::Vnni256,
        LLAMA_KERNEL_AVX512 => Kernel::Avx512,
        LLAMA_KERNEL_CANDLE => Kernel::Candle,
        other => {
            return Err(fail_with(
                llama_status::InvalidArgument,
                format!("kernel {other} is not a LLAMA_KERNEL_* value"),
            ))
        }
    })
}

/// `llama_model_params.quantize`: keep weights as stored.
pub const LLAMA_QUANTIZE_NONE: i32 = 0;
/// Quantize dense weights to Q8_0.
pub const LLAMA_QUANTIZE_Q8_0: i32 = 1;
/// Quantize dense weights to Q4_0.
pub const LLAMA_QUANTIZE_Q4_0: i32 = 2;
/// Quantize dense weights to Q4_1.
pub const LLAMA_QUANTIZE_Q4_1: i32 = 3;
/// Quantize dense weights to Q5_0.
pub const LLAMA_QUANTIZE_Q5_0: i32 = 4;
/// Quantize dense weights to Q5_1.
pub const LLAMA_QUANTIZE_Q5_1: i32 = 5;
/// Quantize dense weights to Q4_K (Q5_0 where rows do not fit 256-blocks).
pub const LLAMA_QUANTIZE_Q4_K: i32 = 6;
/// Quantize dense weights to Q5_K (Q5_1 where rows do not fit 256-blocks).
pub const LLAMA_QUANTIZE_Q5_K: i32 = 7;
/// Quantize dense weights to Q6_K (Q8_0 where rows do not fit 256-blocks).
pub const LLAMA_QUANTIZE_Q6_K: i32 = 8;

/// Default model parameters.
#[no_mangle]
pub extern "C" fn llama_model_params_default() -> llama_model_params {
    llama_model_params {
        struct_size: std::mem::size_of::<llama_model_params>(),
        progress: None,
        progress_user_data: std::ptr::null_mut(),
        quantize: LLAMA_QUANTIZE_NONE,
        n_threads: 0,
        kernel: LLAMA_KERNEL_AUTO,
    }
}

struct SendPtr(*mut c_void);
unsafe impl Send for SendPtr {}

/// Loads a model from a GGUF file or a Hugging Face folder (NUL-terminated UTF-8 path).
/// `params` may be NULL for defaults. On success `*out` owns the model: free it with
/// `llama_model_free`.
#[no_mangle]
pub unsafe extern "C" fn llama_model_load(
    path: *const c_char,
    params: *const llama_model_params,
    out: *mut *mut llama_model,
) -> llama_status {
    guard!({
        require!(out);
        let path = cstr_arg(path, "path")?;
        let p = read_params(
            params,
            llama_model_params_default(),
            2 * std::mem::size_of::<usize>(),
        )?;
        let kernel = kernel_from_c(p.kernel)?;
        let mut opts = ModelOptions::default()
            .with_kernel(kernel)
            .with_threads(p.n_threads as usize);
        let q = match p.quantize {
            LLAMA_QUANTIZE_NONE => None,
            LLAMA_QUANTIZE_Q8_0 => Some(QuantType::Q8_0),
            LLAMA_QUANTIZE_Q4_0 => Some(QuantType::Q4_0),
            LLAMA_QUANTIZE_Q4_1 => Some(QuantType::Q4_1),
            LLAMA_QUANTIZE_Q5_0 => Some(QuantType::Q5_0),
            LLAMA_QUANTIZE_Q5_1 => Some(QuantType::Q5_1),
            LLAMA_QUANTIZE_Q4_K => Some(QuantType::Q4K),
            LLAMA_QUANTIZE_Q5_K => Some(QuantType::Q5K),
            LLAMA_QUANTIZE_Q6_K => Some(QuantType::Q6K),
            other => {
                return Err(fail_with(
                    llama_status::InvalidArgument,
                    format!("quantize {other} is not a LLAMA_QUANTIZE_* value"),
                ))
            }
        };
        if let Some(q) = q {
            opts = opts.with_quantize(q);
        }
        if let Some(cb) = p.progress {
            let ud = SendPtr(p.progress_user_data);
            opts = opts.with_progress(move |lp| {
                let ud = &ud;
                if cb(lp.fraction(), ud.0) {
                    ControlFlow::Continue(())
                } else {
                    ControlFlow::Break(())
                }
            });
        }
        let inner = Model::load(path, opts).map_err(fail)?;
        give(out, llama_model { inner })
    })
}

/// Frees a model. Sessions made from it stay valid (they keep the weights alive). NULL is a
/// no-op.
#[no_mangle]
pub unsafe extern "C" fn llama_model_free(model: *mut llama_model) {
    guard!((), { take_back(model) })
}

/// Vocabulary size (rows of the embedding), or 0 if `model` is NULL.
#[no_mangle]
pub unsafe extern "C" fn llama_model_n_vocab(model: *const llama_model) -> usize {
    guard!(0, {
        model.as_ref().map_or(0, |m| m.inner.config().vocab_size)
    })
}

/// Width of the hidden states (the embedding size), or 0 if `model` is NULL.
#[no_mangle]
pub unsafe extern "C" fn llama_model_n_embd(model: *const llama_model) -> usize {
    guard!(0, {
        model.as_ref().map_or(0, |m| m.inner.config().hidden_size)
    })
}

/// Context length the model was trained for, or 0 if `model` is NULL.
#[no_mangle]
pub unsafe extern "C" fn llama_model_n_ctx_train(model: *const llama_model) -> usize {
    guard!(0, {
        model
            .as_ref()
            .map_or(0, |m| m.inner.config().max_position_embeddings)
    })
}

/// Threads of the model's pool, or 0 if `model` is NULL.
#[no_mangle]
pub unsafe extern "C" fn llama_model_n_threads(model: *const llama_model) -> u32 {
    guard!(0, {
        model.as_ref().map_or(0, |m| m.inner.threads() as u32)
    })
}

/// The kernel path the model computes on (a `LLAMA_KERNEL_*` value, never
/// `LLAMA_KERNEL_AUTO`), or -1 if `model` is NULL.
#[no_mangle]
pub unsafe extern "C" fn llama_model_kernel(model: *const llama_model) -> i32 {
    guard!(-1, {
        model.as_ref().map_or(-1, |m| match m.inner.kernel() {
            Kernel::Scalar => LLAMA_KERNEL_SCALAR,
            Kernel::Avx2 => LLAMA_KERNEL_AVX2,
            Kernel::Vnni256 => LLAMA_KERNEL_VNNI256,
            Kernel::Avx512 => LLAMA_KERNEL_AVX512,
            Kernel::Candle => LLAMA_KERNEL_CANDLE,
            _ => LLAMA_KERNEL_AUTO,
        })
    })
}

/// Whether `token` ends generation (EOS, end of turn, ...). False for NULL or out-of-range.
#[no_mangle]
pub unsafe extern "C" fn llama_model_token_is_eog(model: *const llama_model, token: i32) -> bool {
    guard!(false, {
        model
            .as_ref()
            .is_some_and(|m| token >= 0 && m.inner.tokenizer().is_eog(token as u32))
    })
}

/// Tokenizes `text` (`len` bytes of UTF-8). `add_special` adds BOS when the model asks for it;
/// `parse_special` maps special-token text to its id. Two-call rule: `*n_tokens` receives the
/// count; the ids are written only if `capacity` suffices, else `LLAMA_STATUS_BUFFER_TOO_SMALL`.
#[no_mangle]
pub unsafe extern "C" fn llama_model_tokenize(
    model: *const llama_model,
    text: *const c_char,
    len: usize,
    add_special: bool,
    parse_special: bool,
    tokens: *mut i32,
    capacity: usize,
    n_tokens: *mut usize,
) -> llama_status {
    guard!({
        require!(model, n_tokens);
        let text = str_arg(text, len, "text")?;
        match (*model).inner.tokenize(text, add_special, parse_special) {
            Ok(ids) => {
                let ids: Vec<i32> = ids.iter().map(|&i| i as i32).collect();
                write_array(&ids, tokens, capacity, n_tokens)
            }
            Err(e) => fail(e),
        }
    })
}

pub(crate) unsafe fn token_slice(tokens: *const i32, n: usize) -> Result<Vec<u32>, llama_status> {
    if n == 0 {
        return Ok(vec![]);
    }
    if tokens.is_null() {
        return Err(fail_with(
            llama_status::NullArgument,
            "argument `tokens` is NULL",
        ));
    }
    let s = std::slice::from_raw_parts(tokens, n);
    if let Some(bad) = s.iter().find(|&&t| t < 0) {
        return Err(fail_with(
            llama_status::InvalidArgument,
            format!("token id {bad} is negative"),
        ));
    }
    Ok(s.iter().map(|&t| t as u32).collect())
}

/// Decodes tokens to UTF-8 text (special tokens rendered when `special`). Two-call rule:
/// `*n_bytes` receives the length without the NUL; a NUL is appended when there is room.
#[no_mangle]
pub unsafe extern "C" fn llama_model_detokenize(
    model: *const llama_model,
    tokens: *const i32,
    n: usize,
    special: bool,
    buf: *mut c_char,
    capacity: usize,
    n_bytes: *mut usize,
) -> llama_status {
    guard!({
        require!(model, n_bytes);
        let ids = token_slice(tokens, n)?;
        match (*model).inner.detokenize(&ids, special) {
            Ok(t) => write_bytes(t.as_bytes(), buf as *mut u8, capacity, n_bytes, true),
            Err(e) => fail(e),
        }
    })
}

/// One chat message: NUL-terminated UTF-8 role ("system", "user", "assistant", ...) and content.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct llama_chat_message {
    /// Role.
    pub role: *const c_char,
    /// Text.
    pub content: *const c_char,
}

pub(crate) unsafe fn messages(
    msgs: *const llama_chat_message,
    n: usize,
) -> Result<Vec<Message>, llama_status> {
    if n == 0 {
        return Ok(vec![]);
    }
    if msgs.is_null() {
        return Err(fail_with(
            llama_status::NullArgument,
            "argument `messages` is NULL",
        ));
    }
    std::slice::from_raw_parts(msgs, n)
        .iter()
        .map(|m| {
            Ok(Message::new(
                cstr_arg(m.role, "role")?,
                cstr_arg(m.content, "content")?,
            ))
        })
        .collect()
}

/// Renders messages with the model's own chat template. Two-call rule on `buf` as
/// `llama_model_detokenize`.
#[no_mangle]
pub unsafe extern "C" fn llama_model_apply_chat_template(
    model: *const llama_model,
    messages_: *const llama_chat_message,
    n_messages: usize,
    add_generation_prompt: bool,
    buf: *mut c_char,
    capacity: usize,
    n_bytes: *mut usize,
) -> llama_status {
    guard!({
        require!(model, n_bytes);
        let msgs = messages(messages_, n_messages)?;
        match (*model)
            .inner
            .apply_chat_template(&msgs, add_generation_prompt)
        {
            Ok(t) => write_bytes(t.as_bytes(), buf as *mut u8, capacity, n_bytes, true),
            Err(e) => fail(e),
        }
    })
}

/// `llama_model_embed` pooling: mean over all tokens.
pub const LLAMA_POOLING_MEAN: i32 = 0;
/// `llama_model_embed` pooling: the last token.
pub const LLAMA_POOLING_LAST: i32 = 1;

/// Embeds `text`: final hidden states (after the output norm), pooled by `pooling`
/// (`LLAMA_POOLING_MEAN` or `LLAMA_POOLING_LAST`). Writes
/// `llama_model_n_embd(model)` floats; two-call rule on `out` / `*n_out`.
#[no_mangle]
pub unsafe extern "C" fn llama_model_embed(
    model: *const llama_model,
    text: *const c_char,
    len: usize,
    pooling: i32,
    out: *mut f32,
    capacity: usize,
    n_out: *mut usize,
) -> llama_status {
    guard!({
        require!(model, n_out);
        let text = str_arg(text, len, "text")?;
        let pooling = match pooling {
            LLAMA_POOLING_MEAN => Pooling::Mean,
            LLAMA_POOLING_LAST => Pooling::Last,
            other => {
                return Err(fail_with(
                    llama_status::InvalidArgument,
                    format!("pooling {other} is not a LLAMA_POOLING_* value"),
                ))
            }
        };
        match (*model).inner.embed_pooled(text, pooling) {
            Ok(v) => write_array(&v, out, capacity, n_out),
            Err(e) => fail(e),
        }
    })
}
