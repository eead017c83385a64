//! `llama_batch`: many generations on one model advanced together, one forward pass per step
//! (llama-core's continuous batching). Each sequence generates exactly what it does alone.

use std::ffi::{c_char, c_void};

use llama_core::{Batch, Prompt, SeqId};

use crate::model::messages;
use crate::session::{
    generate_options, generation_info, llama_generate_params, llama_generation_info,
    session_options,
};
use crate::{
    fail, fail_with, give, guard, llama_chat_message, llama_model, llama_sampler,
    llama_session_params, llama_status, require, str_arg, take_back,
};

/// Many generations on one model (opaque). One thread at a time.
pub struct llama_batch {
    inner: Batch,
    model: llama_core::Model,
    finished: std::collections::VecDeque<llama_core::Finished>,
}

/// Called by `llama_batch_step` with each piece of text a sequence produced (UTF-8, not
/// NUL-terminated, `len` may be 0) and its token (LLAMA_TOKEN_NULL for a final flush). Return
/// false to stop that sequence (stop reason callback).
pub type llama_batch_cb = Option<
    unsafe extern "C" fn(
        id: u64,
        piece: *const c_char,
        len: usize,
        token: i32,
        user_data: *mut c_void,
    ) -> bool,
>;

/// Creates an empty batch for `model`. Free with `llama_batch_free`.
#[no_mangle]
pub unsafe extern "C" fn llama_batch_new(
    model: *const llama_model,
    out: *mut *mut llama_batch,
) -> llama_status {
    guard!({
        require!(model, out);
        let m = (*model).inner.clone();
        give(
            out,
            llama_batch {
                inner: Batch::new(&m),
                model: m,
                finished: Default::default(),
            },
        )
    })
}

/// Frees a batch and every sequence still in it. NULL is a no-op.
#[no_mangle]
pub unsafe extern "C" fn llama_batch_free(batch: *mut llama_batch) {
    guard!((), { take_back(batch) })
}

unsafe fn add(
    batch: *mut llama_batch,
    session_params: *const llama_session_params,
    sampler: *const llama_sampler,
    prompt: Prompt<'_>,
    params: *const llama_generate_params,
    id: *mut u64,
) -> Result<llama_status, llama_status> {
    let b = &mut *batch;
    let opts = generate_options(params)?;
    let so = session_options(session_params)?;
    let session = b.model.session(so).map_err(fail)?;
    let smp = (*sampler).inner.clone();
    let sid = b.inner.add(session, prompt, opts, smp).map_err(fail)?;
    *id = sid.0;
    Ok(llama_status::Ok)
}

/// Adds a chat generation: a new session (`session_params`, NULL for defaults) replies to
/// `messages` with a copy of `sampler` (its seed gives what it gives alone) under `params`
/// (NULL for defaults: max_tokens, stop strings, constraint, tools). The conversation is rendered
/// and its constraint compiled now, so bad input fails here; the prompt is read by the next
/// steps. Writes the sequence's id to `id`.
#[no_mangle]
pub unsafe extern "C" fn llama_batch_add_chat(
    batch: *mut llama_batch,
    session_params: *const llama_session_params,
    sampler: *const llama_sampler,
    messages_: *const llama_chat_message,
    n_messages: usize,
    params: *const llama_generate_params,
    id: *mut u64,
) -> llama_status {
    guard!({
        require!(batch, sampler, id);
        let msgs = messages(messages_, n_messages)?;
        add(
            batch,
            session_params,
            sampler,
            Prompt::Chat(&msgs),
            params,
            id,
        )?
    })
}

/// Like `llama_batch_add_chat` with a text prompt (`len` bytes of UTF-8, tokenized as llama.cpp
/// does for prompts).
#[no_mangle]
pub unsafe extern "C" fn llama_batch_add_text(
    batch: *mut llama_batch,
    session_params: *const llama_session_params,
    sampler: *const llama_sampler,
    prompt: *const c_char,
    len: usize,
    params: *const llama_generate_params,
    id: *mut u64,
) -> llama_status {
    guard!({
        require!(batch, sampler, id);
        let text = str_arg(prompt, len, "prompt")?;
        add(
            batch,
            session_params,
            sampler,
            Prompt::Text(text),
            params,
            id,
        )?
    })
}

/// One step: samples the next token of every generating sequence (calling `cb`, which may be
/// NULL, with the text each released), then one forward pass for those tokens and the next
/// prompt chunk of every sequence still reading its prompt. Ended sequences are read with
/// `llama_batch_take_finished`.
#[no_mangle]
pub unsafe extern "C" fn llama_batch_step(
    batch: *mut llama_batch,
    cb: llama_batch_cb,
    user_data: *mut c_void,
) -> llama_status {
    guard!({
        require!(batch);
        let b = &mut *batch;
        let events = b.inner.step().map_err(fail)?;
        if let Some(f) = cb {
            for e in events {
                let tok = if e.piece.token == u32::MAX {
                    -1
                } else {
                    e.piece.token as i32
                };
                let text = &e.piece.text;
                if !f(
                    e.id.0,
                    text.as_ptr() as *const c_char,
                    text.len(),
                    tok,
                    user_data,
                ) {
                    b.inner.stop(e.id);
                }
            }
        }
        b.finished.extend(b.inner.take_finished());
        llama_status::Ok
    })
}

/// Sequences still running (reading their prompt or generating); 0 for NULL.
#[no_mangle]
pub unsafe extern "C" fn llama_batch_n_running(batch: *const llama_batch) -> usize {
    guard!(0, {
        if batch.is_null() {
            0
        } else {
            (*batch).inner.len()
        }
    })
}

/// Cancels sequence `id` (it ends with stop reason cancelled at the next step); may be called
/// between steps. `LLAMA_STATUS_INVALID_ARGUMENT` when it is not running.
#[no_mangle]
pub unsafe extern "C" fn llama_batch_cancel(batch: *mut llama_batch, id: u64) -> llama_status {
    guard!({
        require!(batch);
        match (*batch).inner.cancel_handle(SeqId(id)) {
            Some(h) => {
                h.cancel();
                llama_status::Ok
            }
            None => fail_with(
                llama_status::InvalidArgument,
                format!("sequence {id} is not running"),
            ),
        }
    })
}

/// Takes the next ended sequence: writes its id, the status of its result (OK, or the error
/// that ended it alone: its message is then `llama_last_error_message()`) and, when OK and
/// `info` is not NULL, its summary. Returns false when none has ended.
#[no_mangle]
pub unsafe extern "C" fn llama_batch_take_finished(
    batch: *mut llama_batch,
    id: *mut u64,
    status: *mut llama_status,
    info: *mut llama_generation_info,
) -> bool {
    guard!(false, {
        if batch.is_null() || id.is_null() || status.is_null() {
            crate::set_error("llama_batch_take_finished: a NULL argument");
            return false;
        }
        let Some(f) = (*batch).finished.pop_front() else {
            return false;
        };
        *id = f.id.0;
        match f.result {
            Ok(g) => {
                *status = llama_status::Ok;
                if !info.is_null() {
                    *info = generation_info(&g);
                }
            }
            Err(e) => *status = fail(e),
        }
        true
    })
}
