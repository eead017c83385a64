//! `llama_session`: evaluation, generation with a streaming callback, chat, fork, truncate,
//! save/restore, logits, logprobs, cancellation.

use std::ffi::{c_char, c_void};

use llama_core::{
    CancelHandle, Constraint, Draft, GenerateOptions, KvCacheType, Prompt, Session, SessionOptions,
    StopReason, Tool, ToolChoice,
};

use crate::model::{messages, token_slice};
use crate::{
    fail, fail_with, give, guard, llama_chat_message, llama_model, llama_sampler, llama_status,
    read_params, require, str_arg, take_back, write_array, write_bytes,
};

/// One sequence's state (opaque): KV cache, tokens, logits. Keeps its model alive. One thread
/// at a time.
pub struct llama_session {
    pub(crate) inner: Session,
    /// The last generation's tool calls as a JSON array (`llama_session_tool_calls`).
    tool_calls: std::ffi::CString,
    /// The last generation's drafted and accepted tokens (`llama_session_draft_counts`).
    draft_counts: (usize, usize),
}

/// A handle that cancels a session's work from any thread (opaque).
pub struct llama_cancel_handle {
    inner: CancelHandle,
}

/// Options for `llama_session_new`. Get defaults from `llama_session_params_default()`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct llama_session_params {
    /// `sizeof(llama_session_params)`.
    pub struct_size: usize,
    /// Context size in tokens; 0 = 4096 or the model's trained context if smaller. Default 0.
    pub n_ctx: u32,
    /// Prompt tokens per forward pass. Default 512.
    pub n_batch: u32,
    /// Keep the KV cache in f32 instead of f16. Default false.
    pub kv_f32: bool,
    /// Context shift: when the context is full keep this many first tokens and drop the older
    /// half of the rest; -1 (default) disables it (a full context is LLAMA_STATUS_CONTEXT_OVERFLOW).
    pub context_shift_keep: i32,
    /// Threads for this session's forward passes; 0 (default) = the model's.
    pub n_threads: u32,
    /// How keys are stored: a `llama_kv_type` (LLAMA_KV_TYPE_Q8_0, ...), or -1 (default) for
    /// f16 (f32 with `kv_f32`). An unknown value is LLAMA_STATUS_INVALID_ARGUMENT.
    pub kv_type_k: i32,
    /// How values are stored, as `kv_type_k`.
    pub kv_type_v: i32,
}

/// KV cache storage types for `llama_session_params.kv_type_k` / `kv_type_v`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum llama_kv_type {
    /// Half precision (the default).
    F16 = 0,
    /// Single precision.
    F32 = 1,
    /// llama.cpp's q8_0 blocks, Hadamard-rotated (head size a multiple of 32).
    Q8_0 = 2,
    /// llama.cpp's q4_0 blocks, Hadamard-rotated (head size a multiple of 32).
    Q4_0 = 3,
}

/// Default session parameters.
#[no_mangle]
pub extern "C" fn llama_session_params_default() -> llama_session_params {
    llama_session_params {
        struct_size: std::mem::size_of::<llama_session_params>(),
        n_ctx: 0,
        n_batch: 512,
        kv_f32: false,
        context_shift_keep: -1,
        n_threads: 0,
        kv_type_k: -1,
        kv_type_v: -1,
    }
}

fn boxed(s: Session) -> *mut llama_session {
    Box::into_raw(Box::new(llama_session {
        inner: s,
        tool_calls: c"[]".into(),
        draft_counts: (0, 0),
    }))
}

/// Creates a session on `model` (NULL `params`: defaults). Free with `llama_session_free`.
#[no_mangle]
pub unsafe extern "C" fn llama_session_new(
    model: *const llama_model,
    params: *const llama_session_params,
    out: *mut *mut llama_session,
) -> llama_status {
    guard!({
        require!(model, out);
        let o = session_options(params)?;
        match (*model).inner.session(o) {
            Ok(s) => {
                *out = boxed(s);
                llama_status::Ok
            }
            Err(e) => fail(e),
        }
    })
}

/// A `llama_session_params` (NULL: defaults) as the core's options.
pub(crate) unsafe fn session_options(
    params: *const llama_session_params,
) -> Result<SessionOptions, llama_status> {
    let p = read_params(
        params,
        llama_session_params_default(),
        // Headers before `n_threads` was added pass the struct without it.
        std::mem::offset_of!(llama_session_params, n_threads),
    )?;
    let base = if p.kv_f32 {
        KvCacheType::F32
    } else {
        KvCacheType::F16
    };
    let kv = |t: i32, what: &str| kv_type(t, what, base);
    let mut o = SessionOptions::default()
        .threads(p.n_threads as usize)
        .n_ctx(p.n_ctx as usize)
        .n_batch(p.n_batch as usize)
        .kv_type_k(kv(p.kv_type_k, "kv_type_k")?)
        .kv_type_v(kv(p.kv_type_v, "kv_type_v")?);
    if p.context_shift_keep >= 0 {
        o = o.context_shift(p.context_shift_keep as usize);
    }
    Ok(o)
}

/// Frees a session. NULL is a no-op.
#[no_mangle]
pub unsafe extern "C" fn llama_session_free(session: *mut llama_session) {
    guard!((), { take_back(session) })
}

/// Number of tokens in the session (0 for NULL).
#[no_mangle]
pub unsafe extern "C" fn llama_session_n_tokens(session: *const llama_session) -> usize {
    guard!(0, { session.as_ref().map_or(0, |s| s.inner.len()) })
}

/// Bytes the session's KV cache holds now (it grows in chunks as the context fills; 0 for
/// NULL).
#[no_mangle]
pub unsafe extern "C" fn llama_session_kv_cache_bytes(session: *const llama_session) -> usize {
    guard!(0, {
        session.as_ref().map_or(0, |s| s.inner.kv_cache_bytes())
    })
}

/// Context size of the session (0 for NULL).
#[no_mangle]
pub unsafe extern "C" fn llama_session_n_ctx(session: *const llama_session) -> usize {
    guard!(0, { session.as_ref().map_or(0, |s| s.inner.n_ctx()) })
}

/// Evaluates tokens after the current ones (in chunks of n_batch); keeps the last logits.
#[no_mangle]
pub unsafe extern "C" fn llama_session_eval(
    session: *mut llama_session,
    tokens: *const i32,
    n: usize,
) -> llama_status {
    guard!({
        require!(session);
        let ids = token_slice(tokens, n)?;
        match (*session).inner.eval(&ids) {
            Ok(()) => llama_status::Ok,
            Err(e) => fail(e),
        }
    })
}

/// Copies the logits of the last evaluated position (`llama_model_n_vocab` floats); two-call
/// rule on `out` / `*n_out`.
#[no_mangle]
pub unsafe extern "C" fn llama_session_logits(
    session: *const llama_session,
    out: *mut f32,
    capacity: usize,
    n_out: *mut usize,
) -> llama_status {
    guard!({
        require!(session, n_out);
        match (*session).inner.last_logits() {
            Ok(l) => write_array(l, out, capacity, n_out),
            Err(e) => fail(e),
        }
    })
}

/// The `k` most likely next tokens with their log-probabilities, best first (`k` entries in
/// each array, fewer if the vocabulary is smaller; `*n_out` receives the count).
#[no_mangle]
pub unsafe extern "C" fn llama_session_top_logprobs(
    session: *const llama_session,
    k: usize,
    tokens: *mut i32,
    logprobs: *mut f32,
    n_out: *mut usize,
) -> llama_status {
    guard!({
        require!(session, tokens, logprobs, n_out);
        let top = (*session).inner.top_logprobs(k).map_err(fail)?;
        for (i, &(id, lp)) in top.iter().enumerate() {
            *tokens.add(i) = id as i32;
            *logprobs.add(i) = lp;
        }
        *n_out = top.len();
        llama_status::Ok
    })
}

/// The session's tokens (every evaluated id, in order); two-call rule on `out` / `*n_out`.
#[no_mangle]
pub unsafe extern "C" fn llama_session_tokens(
    session: *const llama_session,
    out: *mut i32,
    capacity: usize,
    n_out: *mut usize,
) -> llama_status {
    guard!({
        require!(session, n_out);
        let ids: Vec<i32> = (*session)
            .inner
            .tokens()
            .iter()
            .map(|&t| t as i32)
            .collect();
        write_array(&ids, out, capacity, n_out)
    })
}

/// Rolls back to the first `n` tokens.
#[no_mangle]
pub unsafe extern "C" fn llama_session_truncate(
    session: *mut llama_session,
    n: usize,
) -> llama_status {
    guard!({
        require!(session);
        (*session).inner.truncate(n);
        llama_status::Ok
    })
}

/// An independent copy of the session (same tokens and cache). Free with `llama_session_free`.
#[no_mangle]
pub unsafe extern "C" fn llama_session_fork(
    session: *const llama_session,
    out: *mut *mut llama_session,
) -> llama_status {
    guard!({
        require!(session, out);
        match (*session).inner.fork() {
            Ok(s) => {
                *out = boxed(s);
                llama_status::Ok
            }
            Err(e) => fail(e),
        }
    })
}

/// Serializes the session (and `sampler`'s state, if not NULL). Two-call rule on `buf`.
#[no_mangle]
pub unsafe extern "C" fn llama_session_save_state(
    session: *const llama_session,
    sampler: *const llama_sampler,
    buf: *mut u8,
    capacity: usize,
    n_bytes: *mut usize,
) -> llama_status {
    guard!({
        require!(session, n_bytes);
        match (*session)
            .inner
            .save_state(sampler.as_ref().map(|s| &s.inner))
        {
            Ok(b) => write_bytes(&b, buf, capacity, n_bytes, false),
            Err(e) => fail(e),
        }
    })
}

/// A `llama_kv_type` value, or `default` for -1.
fn kv_type(t: i32, what: &str, default: KvCacheType) -> Result<KvCacheType, llama_status> {
    match t {
        -1 => Ok(default),
        t if t == llama_kv_type::F16 as i32 => Ok(KvCacheType::F16),
        t if t == llama_kv_type::F32 as i32 => Ok(KvCacheType::F32),
        t if t == llama_kv_type::Q8_0 as i32 => Ok(KvCacheType::Q8_0),
        t if t == llama_kv_type::Q4_0 as i32 => Ok(KvCacheType::Q4_0),
        other => Err(fail_with(
            llama_status::InvalidArgument,
            format!(
                "{what} {other} is not a llama_kv_type (0 f16, 1 f32, 2 q8_0, 3 q4_0; -1 default)"
            ),
        )),
    }
}

/// Restores a session saved by `llama_session_save_state` onto `model`. If the state holds a
/// sampler and `out_sampler` is not NULL, `*out_sampler` receives it (else NULL). Another
/// model's or corrupted state gives `LLAMA_STATUS_STATE`.
#[no_mangle]
pub unsafe extern "C" fn llama_session_restore(
    model: *const llama_model,
    buf: *const u8,
    len: usize,
    out: *mut *mut llama_session,
    out_sampler: *mut *mut llama_sampler,
) -> llama_status {
    // The recorded types, bit for bit.
    llama_session_restore_as(model, buf, len, -1, -1, out, out_sampler)
}

/// `llama_session_restore` into a KV cache of other types: `kv_type_k` / `kv_type_v` are
/// `llama_kv_type` values, or -1 to keep the type the state records. The stored keys and
/// values are converted (a block type rounds them, so the session continues close to, not bit
/// for bit like, the saved one). A type the model cannot use (a block type needs a head size
/// that is a multiple of 32) or an unknown value gives `LLAMA_STATUS_INVALID_ARGUMENT`.
#[no_mangle]
pub unsafe extern "C" fn llama_session_restore_as(
    model: *const llama_model,
    buf: *const u8,
    len: usize,
    kv_type_k: i32,
    kv_type_v: i32,
    out: *mut *mut llama_session,
    out_sampler: *mut *mut llama_sampler,
) -> llama_status {
    guard!({
        require!(model, buf, out);
        let bytes = std::slice::from_raw_parts(buf, len);
        // -1 keeps the type the state records.
        let kv = |t: i32, what: &str| match t {
            -1 => Ok(None),
            t => kv_type(t, what, KvCacheType::F16).map(Some),
        };
        let (k, v) = (kv(kv_type_k, "kv_type_k")?, kv(kv_type_v, "kv_type_v")?);
        match Session::restore_as(&(*model).inner, bytes, k, v) {
            Ok((s, smp)) => {
                *out = boxed(s);
                if !out_sampler.is_null() {
                    *out_sampler = match smp {
                        Some(x) => Box::into_raw(Box::new(llama_sampler { inner: x })),
                        None => std::ptr::null_mut(),
                    };
                }
                llama_status::Ok
            }
            Err(e) => fail(e),
        }
    })
}

/// A handle that cancels this session's work from any thread. Free with
/// `llama_cancel_handle_free`.
#[no_mangle]
pub unsafe extern "C" fn llama_session_cancel_handle(
    session: *const llama_session,
    out: *mut *mut llama_cancel_handle,
) -> llama_status {
    guard!({
        require!(session, out);
        let inner = (*session).inner.cancel_handle();
        give(out, llama_cancel_handle { inner })
    })
}

/// Asks the session to stop at its next check (between prompt chunks and between generated
/// tokens). Safe from any thread. NULL is a no-op.
#[no_mangle]
pub unsafe extern "C" fn llama_cancel_handle_cancel(handle: *const llama_cancel_handle) {
    guard!((), {
        if let Some(h) = handle.as_ref() {
            h.inner.cancel()
        }
    })
}

/// Frees a cancel handle. NULL is a no-op.
#[no_mangle]
pub unsafe extern "C" fn llama_cancel_handle_free(handle: *mut llama_cancel_handle) {
    guard!((), { take_back(handle) })
}

/// Called with each piece of generated text (UTF-8, not NUL-terminated; `len` may be 0 while
/// a character or a possible stop string is incomplete) and the token that produced it
/// (LLAMA_TOKEN_NULL for a final flush). Return false to stop. Called on the generating thread.
pub type llama_token_cb = Option<
    unsafe extern "C" fn(
        piece: *const c_char,
        len: usize,
        token: i32,
        user_data: *mut c_void,
    ) -> bool,
>;

/// Options for generation. Get defaults from `llama_generate_params_default()`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct llama_generate_params {
    /// `sizeof(llama_generate_params)`.
    pub struct_size: usize,
    /// Most tokens to generate. Default 256.
    pub max_tokens: u32,
    /// Stop strings (NUL-terminated UTF-8), or NULL. Default NULL.
    pub stop: *const *const c_char,
    /// Number of stop strings. Default 0.
    pub n_stop: usize,
    /// What `constraint` holds: one of the `LLAMA_CONSTRAINT_KIND_*` values. Default
    /// `LLAMA_CONSTRAINT_KIND_NONE`.
    pub constraint_kind: i32,
    /// The constraint's text (NUL-terminated UTF-8): a JSON schema, a Lark or GBNF grammar, a
    /// regular expression, or the choices one per line. NULL for NONE and JSON_OBJECT.
    pub constraint: *const c_char,
    /// Tools the model may call: a JSON list in OpenAI's shape (`[{"type": "function",
    /// "function": {"name", "description", "parameters"}}]`), or NULL. A chat shows them to
    /// the model; the calls are read back with `llama_session_tool_calls`.
    pub tools: *const c_char,
    /// With `tools`: "auto" (NULL means auto), "required", "none", or a tool's name.
    pub tool_choice: *const c_char,
    /// Chat only, for messages the caller trusts: parse special-token text inside message
    /// content (such as `<|im_end|>`) into control tokens and pass any role to the template.
    /// Default false: content is plain text whatever it holds, and roles must be system,
    /// user, assistant, tool or ipython (else `LLAMA_STATUS_INVALID_ARGUMENT`).
    pub parse_special_in_content: bool,
    /// Speculative decoding, which never changes the output: drafts from this model (same
    /// vocabulary as the session's model, token by token, else
    /// `LLAMA_STATUS_INVALID_ARGUMENT`; typically a smaller quantization of it), or NULL.
    /// Only read during the call. Default NULL.
    pub draft_model: *const llama_model,
    /// Speculative decoding with prompt lookup (drafts copied from where the last tokens
    /// occurred in the prompt or the output). Default false.
    pub draft_lookup: bool,
    /// Speculative decoding from a predicted output: the text expected (NUL-terminated UTF-8),
    /// or NULL. Default NULL. At most one of `draft_model`, `draft_lookup` and `prediction`.
    pub prediction: *const c_char,
    /// Most tokens drafted per verification (0 turns speculation off). Default 8.
    pub draft_max: u32,
}

/// Free text (`constraint_kind`).
pub const LLAMA_CONSTRAINT_KIND_NONE: i32 = 0;
/// JSON valid under the JSON schema in `constraint`.
pub const LLAMA_CONSTRAINT_KIND_JSON_SCHEMA: i32 = 1;
/// Any JSON object (`constraint` unused).
pub const LLAMA_CONSTRAINT_KIND_JSON_OBJECT: i32 = 2;
/// A grammar in llguidance's Lark syntax.
pub const LLAMA_CONSTRAINT_KIND_LARK: i32 = 3;
/// A grammar in llama.cpp's GBNF.
pub const LLAMA_CONSTRAINT_KIND_GBNF: i32 = 4;
/// A regular expression the whole output matches.
pub const LLAMA_CONSTRAINT_KIND_REGEX: i32 = 5;
/// One of the choices, one per line.
pub const LLAMA_CONSTRAINT_KIND_CHOICES: i32 = 6;
/// A grammar, GBNF or Lark as its content tells.
pub const LLAMA_CONSTRAINT_KIND_GRAMMAR: i32 = 7;

/// Default generation parameters.
#[no_mangle]
pub extern "C" fn llama_generate_params_default() -> llama_generate_params {
    llama_generate_params {
        struct_size: std::mem::size_of::<llama_generate_params>(),
        max_tokens: 256,
        stop: std::ptr::null(),
        n_stop: 0,
        constraint_kind: LLAMA_CONSTRAINT_KIND_NONE,
        constraint: std::ptr::null(),
        tools: std::ptr::null(),
        tool_choice: std::ptr::null(),
        parse_special_in_content: false,
        draft_model: std::ptr::null(),
        draft_lookup: false,
        prediction: std::ptr::null(),
        draft_max: 8,
    }
}

/// Why generation ended.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum llama_stop_reason {
    /// max_tokens reached.
    MaxTokens = 0,
    /// An end-of-generation token.
    Eog = 1,
    /// A stop string.
    StopString = 2,
    /// The callback returned false.
    Callback = 3,
    /// Cancelled through a cancel handle.
    Cancelled = 4,
    /// The constraint is complete.
    GrammarComplete = 5,
    /// max_tokens or a stop string cut a constrained output before it matched.
    GrammarIncomplete = 6,
}

/// Summary of a generation, written on success when the out-pointer is not NULL.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct llama_generation_info {
    /// Why it ended.
    pub stop_reason: llama_stop_reason,
    /// Prompt tokens evaluated.
    pub n_prompt_tokens: usize,
    /// Tokens generated (an end-of-generation token included).
    pub n_generated: usize,
    /// Milliseconds spent on the prompt.
    pub prompt_ms: f64,
    /// Milliseconds spent generating.
    pub generation_ms: f64,
}

/// The C summary of a generation.
pub(crate) fn generation_info(g: &llama_core::Generation) -> llama_generation_info {
    llama_generation_info {
        stop_reason: match g.stop_reason {
            StopReason::MaxTokens => llama_stop_reason::MaxTokens,
            StopReason::EndOfGeneration => llama_stop_reason::Eog,
            StopReason::StopString => llama_stop_reason::StopString,
            StopReason::Cancelled => llama_stop_reason::Cancelled,
            StopReason::GrammarComplete => llama_stop_reason::GrammarComplete,
            StopReason::GrammarIncomplete => llama_stop_reason::GrammarIncomplete,
            _ => llama_stop_reason::Callback,
        },
        n_prompt_tokens: g.timings.prompt_tokens,
        n_generated: g.tokens.len(),
        prompt_ms: g.timings.prompt.as_secs_f64() * 1e3,
        generation_ms: g.timings.generation.as_secs_f64() * 1e3,
    }
}

/// A `llama_generate_params` (NULL: defaults) as the core's options.
pub(crate) unsafe fn generate_options(
    params: *const llama_generate_params,
) -> Result<GenerateOptions, llama_status> {
    // A struct from a header without `parse_special_in_content` keeps its default (false).
    let p = read_params(
        params,
        llama_generate_params_default(),
        std::mem::offset_of!(llama_generate_params, parse_special_in_content),
    )?;
    let mut opts = GenerateOptions::default()
        .max_tokens(p.max_tokens as usize)
        .parse_special_in_content(p.parse_special_in_content);
    if p.n_stop > 0 {
        if p.stop.is_null() {
            return Err(fail_with(
                llama_status::NullArgument,
                "`stop` is NULL but n_stop > 0",
            ));
        }
        for &s in std::slice::from_raw_parts(p.stop, p.n_stop) {
            opts = opts.stop(crate::cstr_arg(s, "stop")?);
        }
    }
    let text = || crate::cstr_arg(p.constraint, "constraint");
    let k = p.constraint_kind;
    opts.constraint = if k == LLAMA_CONSTRAINT_KIND_NONE {
        None
    } else if k == LLAMA_CONSTRAINT_KIND_JSON_OBJECT {
        Some(Constraint::JsonObject)
    } else if k == LLAMA_CONSTRAINT_KIND_JSON_SCHEMA {
        Some(Constraint::json_schema_str(text()?).map_err(fail)?)
    } else if k == LLAMA_CONSTRAINT_KIND_LARK {
        Some(Constraint::Lark(text()?.into()))
    } else if k == LLAMA_CONSTRAINT_KIND_GBNF {
        Some(Constraint::Gbnf(text()?.into()))
    } else if k == LLAMA_CONSTRAINT_KIND_GRAMMAR {
        Some(Constraint::grammar(text()?))
    } else if k == LLAMA_CONSTRAINT_KIND_REGEX {
        Some(Constraint::Regex(text()?.into()))
    } else if k == LLAMA_CONSTRAINT_KIND_CHOICES {
        Some(Constraint::from_kind("choices", text()?).map_err(fail)?)
    } else {
        return Err(fail_with(
            llama_status::InvalidArgument,
            format!("constraint_kind {k} is not one of the LLAMA_CONSTRAINT_KIND_* values"),
        ));
    };
    if !p.tools.is_null() {
        opts.tools = Tool::list_from_str(crate::cstr_arg(p.tools, "tools")?).map_err(fail)?;
    }
    if !p.tool_choice.is_null() {
        opts.tool_choice =
            ToolChoice::parse(crate::cstr_arg(p.tool_choice, "tool_choice")?).map_err(fail)?;
    }
    let given = [
        !p.draft_model.is_null(),
        p.draft_lookup,
        !p.prediction.is_null(),
    ];
    if given.iter().filter(|&&g| g).count() > 1 {
        return Err(fail_with(
            llama_status::InvalidArgument,
            "give at most one of draft_model, draft_lookup and prediction",
        ));
    }
    opts.draft = if !p.draft_model.is_null() {
        Some(Draft::Model((*p.draft_model).inner.clone()))
    } else if p.draft_lookup {
        Some(Draft::Lookup)
    } else if !p.prediction.is_null() {
        Some(Draft::Prediction(
            crate::cstr_arg(p.prediction, "prediction")?.into(),
        ))
    } else {
        None
    };
    opts.draft_max = p.draft_max as usize;
    Ok(opts)
}

unsafe fn run_generation(
    session: *mut llama_session,
    sampler: *mut llama_sampler,
    prompt: Prompt<'_>,
    params: *const llama_generate_params,
    cb: llama_token_cb,
    user_data: *mut c_void,
    info: *mut llama_generation_info,
) -> Result<llama_status, llama_status> {
    let opts = generate_options(params)?;
    (*session).tool_calls = c"[]".into();
    (*session).draft_counts = (0, 0);
    let calls_out = &mut (*session).tool_calls as *mut std::ffi::CString;
    let counts_out = &mut (*session).draft_counts as *mut (usize, usize);
    let session = &mut (*session).inner;
    let sampler = &mut (*sampler).inner;
    let mut stream = session.stream(prompt, sampler, opts).map_err(fail)?;
    let mut stopped = false;
    for piece in stream.by_ref() {
        let piece = piece.map_err(fail)?;
        if let Some(f) = cb {
            let tok = if piece.token == u32::MAX {
                -1
            } else {
                piece.token as i32
            };
            if !f(
                piece.text.as_ptr() as *const c_char,
                piece.text.len(),
                tok,
                user_data,
            ) {
                stopped = true;
                break;
            }
        }
    }
    let g = if stopped {
        stream.stop()
    } else {
        stream.generation().clone()
    };
    let calls: Vec<serde_json::Value> = g
        .tool_calls
        .iter()
        .map(|c| serde_json::json!({"name": c.name, "arguments": c.arguments}))
        .collect();
    let text = serde_json::Value::Array(calls)
        .to_string()
        .replace('\0', "");
    *calls_out = std::ffi::CString::new(text).unwrap_or_default();
    *counts_out = (g.timings.drafted_tokens, g.timings.accepted_tokens);
    if !info.is_null() {
        *info = generation_info(&g);
    }
    Ok(llama_status::Ok)
}

/// The last generation's tool calls (with `tools` in its params) as a JSON array of
/// `{"name", "arguments"}` objects, `[]` when it made none. Owned by the session, valid until
/// its next generation or its free. NULL only for a NULL session.
#[no_mangle]
pub unsafe extern "C" fn llama_session_tool_calls(session: *const llama_session) -> *const c_char {
    if session.is_null() {
        return std::ptr::null();
    }
    (*session).tool_calls.as_ptr()
}

/// The last generation's speculative decoding: tokens drafted and tokens of those taken
/// (written where the pointers are not NULL; zeros without speculation).
#[no_mangle]
pub unsafe extern "C" fn llama_session_draft_counts(
    session: *const llama_session,
    drafted: *mut usize,
    accepted: *mut usize,
) -> llama_status {
    guard!({
        require!(session);
        let (d, a) = (*session).draft_counts;
        if !drafted.is_null() {
            *drafted = d;
        }
        if !accepted.is_null() {
            *accepted = a;
        }
        llama_status::Ok
    })
}

/// Evaluates `prompt` tokens after the current context (may be empty to continue), then
/// generates with `sampler`, calling `cb` for each piece. `params`, `cb` and `info` may be NULL.
#[no_mangle]
pub unsafe extern "C" fn llama_session_generate(
    session: *mut llama_session,
    sampler: *mut llama_sampler,
    prompt: *const i32,
    n_prompt: usize,
    params: *const llama_generate_params,
    cb: llama_token_cb,
    user_data: *mut c_void,
    info: *mut llama_generation_info,
) -> llama_status {
    guard!({
        require!(session, sampler);
        let ids = token_slice(prompt, n_prompt)?;
        run_generation(
            session,
            sampler,
            Prompt::Tokens(&ids),
            params,
            cb,
            user_data,
            info,
        )?
    })
}

/// Like `llama_session_generate` with a text prompt (`len` bytes of UTF-8), tokenized as
/// llama.cpp does for prompts (BOS as the model asks, special tokens parsed).
#[no_mangle]
pub unsafe extern "C" fn llama_session_generate_text(
    session: *mut llama_session,
    sampler: *mut llama_sampler,
    prompt: *const c_char,
    len: usize,
    params: *const llama_generate_params,
    cb: llama_token_cb,
    user_data: *mut c_void,
    info: *mut llama_generation_info,
) -> llama_status {
    guard!({
        require!(session, sampler);
        let text = str_arg(prompt, len, "prompt")?;
        run_generation(
            session,
            sampler,
            Prompt::Text(text),
            params,
            cb,
            user_data,
            info,
        )?
    })
}

/// Renders the conversation with the model's chat template, reuses the cached prefix of earlier
/// turns, and generates the assistant's reply through `cb`.
#[no_mangle]
pub unsafe extern "C" fn llama_session_chat(
    session: *mut llama_session,
    sampler: *mut llama_sampler,
    messages_: *const llama_chat_message,
    n_messages: usize,
    params: *const llama_generate_params,
    cb: llama_token_cb,
    user_data: *mut c_void,
    info: *mut llama_generation_info,
) -> llama_status {
    guard!({
        require!(session, sampler);
        let msgs = messages(messages_, n_messages)?;
        run_generation(
            session,
            sampler,
            Prompt::Chat(&msgs),
            params,
            cb,
            user_data,
            info,
        )?
    })
}
