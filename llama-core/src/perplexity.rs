//! Perplexity with llama.cpp's method: consecutive windows of `n_ctx` tokens, each evaluated
//! from an empty cache (first token replaced by BOS when the model adds one), scoring the
//! predictions of the second half of each window.

use std::ops::ControlFlow;

use crate::error::{Error, Result};
use crate::model::Model;
use crate::sampler::log_softmax;
use crate::session::{KvCacheType, SessionOptions};

/// Result of [`Perplexity::measure`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Perplexity {
    /// exp(mean negative log-likelihood).
    pub perplexity: f64,
    /// Mean negative log-likelihood (nats per token).
    pub mean_nll: f64,
    /// Tokens scored.
    pub n_scored: usize,
    /// Windows evaluated.
    pub n_chunks: usize,
    /// Running perplexity after each window (llama.cpp prints these as `[1]x,[2]y,...`).
    pub per_chunk: Vec<f64>,
}

/// How [`Perplexity::measure`] runs.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct PerplexityOptions {
    /// Tokens per window (llama.cpp's `-c`). Default 512.
    pub n_ctx: usize,
    /// At most this many windows (`None`: every whole window of the text).
    pub max_chunks: Option<usize>,
    /// LoRA adapters applied, each with its scale (see [`crate::Session::set_adapters`]).
    pub adapters: Vec<(crate::Adapter, f32)>,
    /// How the KV cache stores keys. Default f16.
    pub kv_type_k: KvCacheType,
    /// How the KV cache stores values. Default f16.
    pub kv_type_v: KvCacheType,
}

impl Default for PerplexityOptions {
    fn default() -> Self {
        PerplexityOptions {
            n_ctx: 512,
            max_chunks: None,
            adapters: vec![],
            kv_type_k: KvCacheType::F16,
            kv_type_v: KvCacheType::F16,
        }
    }
}

impl PerplexityOptions {
    setters! {
        /// Sets the window.
        n_ctx(n: usize) => n_ctx = n;
        /// Limits the windows.
        max_chunks(n: usize) => max_chunks = Some(n);
        /// Applies adapters.
        adapters(a: Vec<(crate::Adapter, f32)>) => adapters = a;
        /// Sets how the KV cache stores keys.
        kv_type_k(t: KvCacheType) => kv_type_k = t;
        /// Sets how the KV cache stores values.
        kv_type_v(t: KvCacheType) => kv_type_v = t;
    }
}

impl Perplexity {
    /// Log-likelihood of each token of `tokens[1..]` given the ones before it on `model`,
    /// evaluated in one fresh session (so `tokens.len()` must fit in its context).
    pub fn token_logprobs(model: &Model, tokens: &[u32]) -> Result<Vec<f32>> {
        if tokens.len() < 2 {
            return Ok(vec![]);
        }
        let mut s = model.session(
            SessionOptions::default()
                .n_ctx(tokens.len())
                .kv_type(KvCacheType::F16),
        )?;
        let logits = s.eval_all_logits(tokens)?;
        Ok((0..tokens.len() - 1)
            .map(|j| log_softmax(&logits[j])[tokens[j + 1] as usize])
            .collect())
    }

    /// Perplexity of `text` on `model` over windows of `opts.n_ctx` tokens.
    /// `progress(done, total)` is called after each window; `Break` cancels.
    pub fn measure(
        model: &Model,
        text: &str,
        opts: &PerplexityOptions,
        mut progress: impl FnMut(usize, usize) -> ControlFlow<()>,
    ) -> Result<Perplexity> {
        let (n_ctx, max_chunks, adapters) = (opts.n_ctx, opts.max_chunks, &opts.adapters[..]);
        if n_ctx < 8 {
            return Err(Error::InvalidArgument(format!(
                "n_ctx {n_ctx} is too small for perplexity"
            )));
        }
        let tok = model.tokenizer();
        let tokens = model.tokenize(text, true, false)?;
        if tokens.len() < 2 * n_ctx {
            return Err(Error::InvalidArgument(format!(
                "the text has {} tokens; perplexity with n_ctx {n_ctx} needs at least {}",
                tokens.len(),
                2 * n_ctx
            )));
        }
        let mut n_chunks = tokens.len() / n_ctx;
        if let Some(m) = max_chunks {
            n_chunks = n_chunks.min(m.max(1));
        }
        let first = n_ctx / 2;
        let bos = tok.bos_id().filter(|_| tok.adds_bos());
        let mut nll = 0f64;
        let mut count = 0usize;
        let mut per_chunk = Vec::with_capacity(n_chunks);
        for i in 0..n_chunks {
            let start = i * n_ctx;
            let mut window = tokens[start..start + n_ctx].to_vec();
            if let Some(b) = bos {
                window[0] = b;
            }
            let mut s = model.session(
                SessionOptions::default()
                    .n_ctx(n_ctx)
                    .kv_type_k(opts.kv_type_k)
                    .kv_type_v(opts.kv_type_v),
            )?;
            s.set_adapters(adapters)?;
            let logits = s.eval_logits_from(&window, first)?;
            for j in first..n_ctx - 1 {
                let lp = log_softmax(&logits[j - first]);
                nll -= lp[tokens[start + j + 1] as usize] as f64;
                count += 1;
            }
            per_chunk.push((nll / count as f64).exp());
            if progress(i + 1, n_chunks).is_break() {
                return Err(Error::Cancelled);
            }
        }
        let mean_nll = nll / count as f64;
        Ok(Perplexity {
            perplexity: mean_nll.exp(),
            mean_nll,
            n_scored: count,
            n_chunks,
            per_chunk,
        })
    }
}
