//! Perplexity with llama.cpp's method: consecutive windows of `n_ctx` tokens, each evaluated
//! from an empty cache (first token replaced by BOS when the model adds one), scoring the
//! predictions of the second half of each window.

use std::ops::ControlFlow;

use crate::error::{Error, Result};
use crate::model::Model;
use crate::sampler::log_softmax;
use crate::session::{KvCacheType, SessionOptions};

/// Result of [`Model::perplexity`].
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

impl Model {
    /// Log-likelihood of each token of `tokens[1..]` given the ones before it, evaluated in one
    /// fresh session (so `tokens.len()` must fit in `n_ctx`).
    pub fn token_logprobs(&self, tokens: &[u32]) -> Result<Vec<f32>> {
        if tokens.len() < 2 {
            return Ok(vec![]);
        }
        let mut s = self.session(
            SessionOptions::default()
                .n_ctx(tokens.len())
                .kv_type(KvCacheType::F16),
        )?;
        let logits = s.eval_all_logits(tokens)?;
        Ok((0..tokens.len() - 1)
            .map(|j| log_softmax(&logits[j])[tokens[j + 1] as usize])
            .collect())
    }

    /// Perplexity of `text` over windows of `n_ctx` tokens (at most `max_chunks` windows when
    /// given). `progress(done, total)` is called after each window; `Break` cancels.
    pub fn perplexity(
        &self,
        text: &str,
        n_ctx: usize,
        max_chunks: Option<usize>,
        progress: impl FnMut(usize, usize) -> ControlFlow<()>,
    ) -> Result<Perplexity> {
        self.perplexity_with_adapters(text, n_ctx, max_chunks, &[], progress)
    }

    /// [`Model::perplexity`] with LoRA adapters applied (see [`crate::Session::set_adapters`]).
    pub fn perplexity_with_adapters(
        &self,
        text: &str,
        n_ctx: usize,
        max_chunks: Option<usize>,
        adapters: &[(crate::Adapter, f32)],
        mut progress: impl FnMut(usize, usize) -> ControlFlow<()>,
    ) -> Result<Perplexity> {
        if n_ctx < 8 {
            return Err(Error::InvalidArgument(format!(
                "n_ctx {n_ctx} is too small for perplexity"
            )));
        }
        let tok = self.tokenizer();
        let tokens = self.tokenize(text, true, false)?;
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
            let mut s = self.session(SessionOptions::default().n_ctx(n_ctx))?;
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
