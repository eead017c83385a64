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

/// Options for `llama_finetune`. Get defaults from `llama_finetune_params_default()`; set
/// `data` (required).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct llama_finetune_params {
    /// `sizeof(llama_finetune_params)`.
    pub struct_size: usize,
    /// Training data: a JSONL file of `{"text"}`, `{"prompt", "completion"}` or `{"messages"}`
    /// lines (NUL-terminated UTF-8 path). Required.
    pub data: *const std::ffi::c_char,
    /// A folder to write the adapter to (PEFT files and `adapter.gguf`), or NULL.
    pub out_dir: *const std::ffi::c_char,
    /// Comma-separated targets (`q,k,v,o,gate,up,down`), or NULL for all seven.
    pub targets: *const std::ffi::c_char,
    /// LoRA rank. Default 8.
    pub rank: u32,
    /// LoRA alpha (the update is scaled by alpha / rank). Default 16.
    pub alpha: f32,
    /// Passes over the data. Default 1.
    pub epochs: u32,
    /// Peak learning rate (linear warmup, then cosine decay). Default 2e-4.
    pub lr: f32,
    /// Sequences per micro-batch. Default 1.
    pub batch: u32,
    /// Micro-batches per optimizer step. Default 1.
    pub grad_accum: u32,
    /// Longest example in tokens. Default 512.
    pub max_len: u32,
    /// Warmup steps. Default 0.
    pub warmup: u32,
    /// AdamW weight decay. Default 0.
    pub weight_decay: f32,
    /// Gradient norm clipping (0: off). Default 1.
    pub clip: f32,
    /// Seed of the initialization and data order. Default 0.
    pub seed: u64,
    /// A teacher to distill from (same vocabulary), or NULL.
    pub teacher: *const llama_model,
    /// The teacher's top-k per position. Default 32.
    pub top_k: u32,
    /// Evaluation data (same format as `data`), or NULL: evaluated every `eval_every` steps
    /// and after the last, reported in `llama_finetune_progress.eval_loss`.
    pub eval: *const std::ffi::c_char,
    /// Steps between evaluations. Default 50.
    pub eval_every: u32,
    /// Pack short examples into sequences of `max_len` tokens (the same gradient, faster).
    /// Default false.
    pub pack: bool,
    /// Rank-stabilized LoRA: the update is scaled by alpha / sqrt(rank). Default false.
    pub rslora: bool,
}

/// Default fine-tuning parameters (`data` NULL: set it).
#[no_mangle]
pub extern "C" fn llama_finetune_params_default() -> llama_finetune_params {
    llama_finetune_params {
        struct_size: std::mem::size_of::<llama_finetune_params>(),
        data: std::ptr::null(),
        out_dir: std::ptr::null(),
        targets: std::ptr::null(),
        rank: 8,
        alpha: 16.0,
        epochs: 1,
        lr: 2e-4,
        batch: 1,
        grad_accum: 1,
        max_len: 512,
        warmup: 0,
        weight_decay: 0.0,
        clip: 1.0,
        seed: 0,
        teacher: std::ptr::null(),
        top_k: 32,
        eval: std::ptr::null(),
        eval_every: 50,
        pack: false,
        rslora: false,
    }
}

/// One optimizer step's report, passed to the `llama_finetune` callback.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct llama_finetune_progress {
    /// Steps done (1 after the first).
    pub step: u32,
    /// Steps in the run.
    pub total_steps: u32,
    /// Mean loss per scored token of this step.
    pub loss: f32,
    /// The learning rate used.
    pub lr: f32,
    /// Mean loss per scored token on the evaluation data after this step, or NaN when none
    /// was made (no `eval` data, or not due).
    pub eval_loss: f32,
}

/// Called after each step on the calling thread; return false to stop early (the adapter
/// trained so far is returned).
pub type llama_finetune_cb = Option<
    unsafe extern "C" fn(
        progress: *const llama_finetune_progress,
        user_data: *mut std::ffi::c_void,
    ) -> bool,
>;

/// Trains a LoRA adapter on `model` (QLoRA on a quantized base) and returns it in `*out`
/// (free with `llama_adapter_free`; apply with `llama_session_set_adapters`). Bad data is
/// `LLAMA_STATUS_INVALID_ARGUMENT` with the file and line in `llama_last_error_message()`.
#[no_mangle]
pub unsafe extern "C" fn llama_finetune(
    model: *const llama_model,
    params: *const llama_finetune_params,
    progress: llama_finetune_cb,
    user_data: *mut std::ffi::c_void,
    out: *mut *mut llama_adapter,
) -> llama_status {
    use llama_core::train::{FinetuneEvent, FinetuneOptions, LoraConfig, TrainOptions};
    use std::ops::ControlFlow;
    guard!({
        require!(model, params, out);
        let p = crate::read_params(
            params,
            llama_finetune_params_default(),
            std::mem::size_of::<llama_finetune_params>(),
        )?;
        let m = &(*model).inner;
        let data = cstr_arg(p.data, "params.data")?;
        let opt_str =
            |ptr: *const std::ffi::c_char, what: &str| -> Result<Option<&str>, llama_status> {
                if ptr.is_null() {
                    Ok(None)
                } else {
                    cstr_arg(ptr, what).map(Some)
                }
            };
        let out_dir = opt_str(p.out_dir, "params.out_dir")?;
        let eval = opt_str(p.eval, "params.eval")?;
        let targets = match opt_str(p.targets, "params.targets")? {
            None => llama_core::Target::ALL.to_vec(),
            Some(s) => s
                .split(',')
                .map(llama_core::Target::parse)
                .collect::<Result<Vec<_>, _>>()
                .map_err(fail)?,
        };
        let to = TrainOptions::default()
            .lora(LoraConfig {
                rank: p.rank as usize,
                alpha: p.alpha,
                targets,
                rslora: p.rslora,
            })
            .epochs(p.epochs as usize)
            .lr(p.lr)
            .batch(p.batch as usize)
            .grad_accum(p.grad_accum as usize)
            .warmup(p.warmup as usize)
            .weight_decay(p.weight_decay)
            .clip(p.clip)
            .seed(p.seed);
        let mut opts = FinetuneOptions::new(data)
            .with_max_len(p.max_len as usize)
            .with_pack(p.pack)
            .with_eval_every(p.eval_every as usize)
            .with_train(to);
        opts.eval = eval.map(Into::into);
        opts.out = out_dir.map(Into::into);
        if let Some(teacher) = p.teacher.as_ref() {
            opts = opts.with_teacher(teacher.inner.clone(), p.top_k as usize);
        }
        let r = llama_core::train::finetune(m, &opts, &mut |event| {
            let (FinetuneEvent::Step(r, ev), Some(cb)) = (event, progress) else {
                return ControlFlow::Continue(());
            };
            let rep = llama_finetune_progress {
                step: r.step as u32,
                total_steps: r.total_steps as u32,
                loss: r.loss as f32,
                lr: r.lr,
                eval_loss: ev.map_or(f32::NAN, |e| e.loss as f32),
            };
            if cb(&rep, user_data) {
                ControlFlow::Continue(())
            } else {
                ControlFlow::Break(())
            }
        })
        .map_err(fail)?;
        let a = r.adapter;
        give(out, llama_adapter { inner: a })
    })
}
