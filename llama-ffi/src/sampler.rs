//! `llama_sampler`: the sampling chain with every parameter of the Rust sampler.

use llama_core::{Sampler, SamplerConfig};

use crate::{
    fail, fail_with, give, guard, llama_session, llama_status, read_params, require, take_back,
};

/// A configured sampler with its random state (opaque). One thread at a time.
pub struct llama_sampler {
    pub(crate) inner: Sampler,
}

/// Sampling parameters; names and defaults as llama.cpp (see docs/parameters.md). Get
/// defaults from `llama_sampler_params_default()`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct llama_sampler_params {
    /// `sizeof(llama_sampler_params)`.
    pub struct_size: usize,
    /// Temperature; 0 = greedy. Default 0.8.
    pub temperature: f32,
    /// Keep the k most likely tokens; <= 0 disables. Default 40.
    pub top_k: i32,
    /// Nucleus probability; 1 disables. Default 0.95.
    pub top_p: f32,
    /// Minimum probability relative to the most likely token; 0 disables. Default 0.05.
    pub min_p: f32,
    /// Repetition penalty; 1 disables. Default 1.0.
    pub repeat_penalty: f32,
    /// Tokens the penalties look back; 0 disables, -1 = whole context. Default 64.
    pub repeat_last_n: i32,
    /// Frequency penalty. Default 0.
    pub frequency_penalty: f32,
    /// Presence penalty. Default 0.
    pub presence_penalty: f32,
    /// Whether `seed` is used (otherwise a seed is taken from the clock). Default false.
    pub has_seed: bool,
    /// Random seed. Default 0.
    pub seed: u64,
    /// Token ids of the logit biases (`n_logit_bias` entries), or NULL. Default NULL.
    pub logit_bias_tokens: *const i32,
    /// Bias values (`n_logit_bias` entries; -INFINITY bans a token), or NULL. Default NULL.
    pub logit_bias_values: *const f32,
    /// Number of logit biases. Default 0.
    pub n_logit_bias: usize,
}

/// Default sampler parameters (llama.cpp's).
#[no_mangle]
pub extern "C" fn llama_sampler_params_default() -> llama_sampler_params {
    let d = SamplerConfig::default();
    llama_sampler_params {
        struct_size: std::mem::size_of::<llama_sampler_params>(),
        temperature: d.temperature,
        top_k: d.top_k,
        top_p: d.top_p,
        min_p: d.min_p,
        repeat_penalty: d.repeat_penalty,
        repeat_last_n: d.repeat_last_n,
        frequency_penalty: d.frequency_penalty,
        presence_penalty: d.presence_penalty,
        has_seed: false,
        seed: 0,
        logit_bias_tokens: std::ptr::null(),
        logit_bias_values: std::ptr::null(),
        n_logit_bias: 0,
    }
}

/// Creates a sampler (NULL `params`: defaults). Invalid values (negative temperature, top_p
/// outside (0, 1], ...) give `LLAMA_STATUS_INVALID_ARGUMENT`. Free with `llama_sampler_free`.
#[no_mangle]
pub unsafe extern "C" fn llama_sampler_new(
    params: *const llama_sampler_params,
    out: *mut *mut llama_sampler,
) -> llama_status {
    guard!({
        require!(out);
        let p = read_params(
            params,
            llama_sampler_params_default(),
            std::mem::size_of::<llama_sampler_params>(),
        )?;
        let mut cfg = SamplerConfig::default()
            .temperature(p.temperature)
            .top_k(p.top_k)
            .top_p(p.top_p)
            .min_p(p.min_p)
            .repeat_penalty(p.repeat_penalty)
            .repeat_last_n(p.repeat_last_n)
            .frequency_penalty(p.frequency_penalty)
            .presence_penalty(p.presence_penalty)
            .seed_opt(p.has_seed.then_some(p.seed));
        if p.n_logit_bias > 0 {
            if p.logit_bias_tokens.is_null() || p.logit_bias_values.is_null() {
                return Err(fail_with(
                    llama_status::NullArgument,
                    "logit bias arrays are NULL",
                ));
            }
            let ids = std::slice::from_raw_parts(p.logit_bias_tokens, p.n_logit_bias);
            let vals = std::slice::from_raw_parts(p.logit_bias_values, p.n_logit_bias);
            if let Some(bad) = ids.iter().find(|&&t| t < 0) {
                return Err(fail_with(
                    llama_status::InvalidArgument,
                    format!("logit bias token {bad} is negative"),
                ));
            }
            cfg = cfg.logit_bias(ids.iter().zip(vals).map(|(&t, &v)| (t as u32, v)));
        }
        let inner = Sampler::new(cfg).map_err(fail)?;
        give(out, llama_sampler { inner })
    })
}

/// Frees a sampler. NULL is a no-op.
#[no_mangle]
pub unsafe extern "C" fn llama_sampler_free(sampler: *mut llama_sampler) {
    guard!((), { take_back(sampler) })
}

/// Samples the next token from the session's last logits (its tokens feed the penalties).
#[no_mangle]
pub unsafe extern "C" fn llama_sampler_sample(
    sampler: *mut llama_sampler,
    session: *const llama_session,
    out_token: *mut i32,
) -> llama_status {
    guard!({
        require!(sampler, session, out_token);
        match (*session).inner.sample(&mut (*sampler).inner) {
            Ok(t) => {
                *out_token = t as i32;
                llama_status::Ok
            }
            Err(e) => fail(e),
        }
    })
}
