//! A session: one sequence's KV cache, position and token history over a shared [`Model`].

use crate::error::{Error, Result};
mod detok;
pub(crate) mod generate;
mod options;
mod outcome;
mod prompt;
pub(crate) mod speculate;
pub(crate) mod state;
mod stops;

use crate::kv_cache::KvCache;
use crate::model::Model;
use crate::pool::Runtime;
pub use generate::CancelHandle;

/// How keys or values are stored in the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum KvCacheType {
    /// Half precision, as llama.cpp's default f16 cache (half the memory of f32).
    #[default]
    F16,
    /// Full single precision.
    F32,
    /// llama.cpp's q8_0 blocks (32 values, an f16 scale and 8-bit integers: 8.5 bits a value),
    /// rotated by a Hadamard transform per head as llama.cpp does. Needs a head size that is a
    /// multiple of 32.
    Q8_0,
    /// llama.cpp's q4_0 blocks (4.5 bits a value), rotated likewise.
    Q4_0,
}

impl KvCacheType {
    /// Every type, in the order of their names in [`KvCacheType::parse`]'s message.
    pub const ALL: [KvCacheType; 4] = [
        KvCacheType::F16,
        KvCacheType::F32,
        KvCacheType::Q8_0,
        KvCacheType::Q4_0,
    ];

    /// Parses `f16`, `f32`, `q8_0` or `q4_0` (any case).
    pub fn parse(s: &str) -> Result<KvCacheType> {
        let l = s.to_ascii_lowercase();
        KvCacheType::ALL
            .into_iter()
            .find(|t| t.as_str() == l)
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "KV cache type must be one of f16, f32, q8_0, q4_0, not {s:?}"
                ))
            })
    }
    /// The name [`KvCacheType::parse`] takes.
    pub fn as_str(self) -> &'static str {
        match self {
            KvCacheType::F16 => "f16",
            KvCacheType::F32 => "f32",
            KvCacheType::Q8_0 => "q8_0",
            KvCacheType::Q4_0 => "q4_0",
        }
    }
    /// Whether the type stores blocks of integers.
    pub fn quantized(self) -> bool {
        matches!(self, KvCacheType::Q8_0 | KvCacheType::Q4_0)
    }
    /// The number snapshots store for the type.
    pub(crate) fn code(self) -> u8 {
        match self {
            KvCacheType::F16 => 0,
            KvCacheType::F32 => 1,
            KvCacheType::Q8_0 => 2,
            KvCacheType::Q4_0 => 3,
        }
    }
    pub(crate) fn from_code(c: u8) -> Option<KvCacheType> {
        KvCacheType::ALL.into_iter().find(|t| t.code() == c)
    }
}

impl std::fmt::Display for KvCacheType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for KvCacheType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        KvCacheType::parse(s)
    }
}

/// Options for [`Model::session`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SessionOptions {
    /// Context size in tokens; 0 means 4096, or the model's range if smaller
    /// ([`Config::scaled_context`](crate::Config::scaled_context): the trained context, times
    /// the factor of linear or dynamic rope scaling).
    pub n_ctx: usize,
    /// Tokens evaluated per forward pass during prompt processing.
    pub n_batch: usize,
    /// How keys are stored in the cache.
    pub kv_type_k: KvCacheType,
    /// How values are stored in the cache.
    pub kv_type_v: KvCacheType,
    /// Opt-in context shift: when generation fills the context, keep the first `n_keep`
    /// tokens, drop the older half of the rest, and re-evaluate. `None` (default) makes a full
    /// context a [`Error::ContextOverflow`].
    pub context_shift: Option<usize>,
    /// Threads for this session's forward passes (`0`: the model's, see
    /// [`ModelOptions::threads`](crate::ModelOptions::threads)).
    pub threads: usize,
}

impl Default for SessionOptions {
    fn default() -> Self {
        SessionOptions {
            n_ctx: 0,
            n_batch: 512,
            kv_type_k: KvCacheType::F16,
            kv_type_v: KvCacheType::F16,
            context_shift: None,
            threads: 0,
        }
    }
}

impl SessionOptions {
    /// Sets how keys and values are stored.
    pub fn kv_type(self, t: KvCacheType) -> Self {
        self.kv_type_k(t).kv_type_v(t)
    }

    setters! {
        /// Sets the context size.
        n_ctx(n: usize) => n_ctx = n;
        /// Sets the prompt batch size.
        n_batch(n: usize) => n_batch = n;
        /// Enables context shift keeping the first `n_keep` tokens.
        context_shift(n_keep: usize) => context_shift = Some(n_keep);
        /// Sets how keys are stored.
        kv_type_k(t: KvCacheType) => kv_type_k = t;
        /// Sets how values are stored.
        kv_type_v(t: KvCacheType) => kv_type_v = t;
        /// Sets the thread count (`0`: the model's).
        threads(n: usize) => threads = n;
    }
}

/// A check for [`Session::set_interrupt`].
pub type Interrupt = Box<dyn FnMut() -> bool + Send>;

/// Default context size when none is asked for.
pub const DEFAULT_N_CTX: usize = 4096;

/// One sequence being evaluated. `Send`, used by one thread at a time.
pub struct Session {
    model: Model,
    cache: KvCache,
    tokens: Vec<u32>,
    logits: Option<Vec<f32>>,
    opts: SessionOptions,
    /// The model's kernel settings on this session's pool.
    runtime: Runtime,
    /// Asked between prompt chunks and layers whether to stop (see [`Session::set_interrupt`]).
    interrupt: Option<Interrupt>,
    /// LoRA adapters applied to this session's forward passes, with their scales (and the
    /// decode update plans kept for them).
    adapters: crate::lora::Applied,
    pub(crate) cancel: CancelHandle,
    /// Drafted tokens verified past the last evaluated one, each with the logits after it
    /// (speculative decoding): their keys and values sit in the cache's rows past its length,
    /// so accepting one ([`Session::take_ahead`]) costs no compute. Anything else that touches
    /// the cache drops them.
    ahead: std::collections::VecDeque<(u32, Vec<f32>)>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("n_ctx", &self.cache.max())
            .field("n_tokens", &self.tokens.len())
            .finish()
    }
}

impl Model {
    /// Starts a new session (empty context) on this model.
    pub fn session(&self, opts: SessionOptions) -> Result<Session> {
        // The default: 4096, or less when the model's (rope-scaled) range is shorter.
        let max = self.config().scaled_context();
        let n_ctx = if opts.n_ctx == 0 {
            DEFAULT_N_CTX.min(max)
        } else {
            opts.n_ctx
        };
        if n_ctx > 1 << 22 {
            return Err(Error::InvalidArgument(format!(
                "n_ctx {n_ctx} is too large"
            )));
        }
        if opts.n_batch == 0 {
            return Err(Error::InvalidArgument("n_batch must be positive".into()));
        }
        let runtime = self.inner.runtime.with_threads(opts.threads)?;
        let opts = SessionOptions { n_ctx, ..opts };
        Ok(Session {
            runtime,
            interrupt: None,
            adapters: crate::lora::Applied::new(vec![], 0),
            model: self.clone(),
            cache: self.new_cache(n_ctx, opts.kv_type_k, opts.kv_type_v)?,
            tokens: vec![],
            logits: None,
            opts,
            cancel: CancelHandle::default(),
            ahead: Default::default(),
        })
    }
}

impl Session {
    /// The model this session runs.
    pub fn model(&self) -> &Model {
        &self.model
    }
    /// Bytes the KV cache holds now (it grows in chunks of 256 positions as the context
    /// fills, up to [`Session::n_ctx`]).
    pub fn kv_cache_bytes(&self) -> usize {
        self.cache.bytes()
    }
    /// Context size in tokens.
    pub fn n_ctx(&self) -> usize {
        self.cache.max()
    }
    /// Tokens evaluated so far.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }
    /// Number of tokens evaluated so far (the next position).
    pub fn len(&self) -> usize {
        self.tokens.len()
    }
    /// Whether nothing has been evaluated.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
    /// The options the session was made with.
    pub fn options(&self) -> &SessionOptions {
        &self.opts
    }
    /// Installs a check asked between prompt chunks and between layers of a forward pass
    /// (true: stop with [`Error::Cancelled`], the session as before the call). Bindings use it
    /// to honour their language's interrupts (Python's Ctrl-C); `None` removes it.
    pub fn set_interrupt(&mut self, check: Option<Interrupt>) {
        self.interrupt = check;
    }

    /// Threads of this session's forward passes.
    pub fn threads(&self) -> usize {
        self.runtime.threads()
    }

    fn check(&self, tokens: &[u32]) -> Result<()> {
        let vocab = self.model.config().vocab_size;
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(Error::InvalidArgument(format!(
                "token id {bad} is outside the model's vocabulary of {vocab}"
            )));
        }
        let needed = self.tokens.len() + tokens.len();
        if needed > self.n_ctx() {
            return Err(Error::ContextOverflow {
                needed,
                max: self.n_ctx(),
            });
        }
        Ok(())
    }

    /// Evaluates `tokens` after the current ones (prompt processing in chunks of `n_batch`),
    /// keeping the logits of the last position.
    pub fn eval(&mut self, tokens: &[u32]) -> Result<()> {
        self.eval_inner(tokens, None, true).map(|_| ())
    }

    /// Like [`Session::eval_all_logits`] but computes logits only for the positions of `tokens`
    /// from index `from` on (the output head is the costliest matmul of a long prompt).
    pub fn eval_logits_from(&mut self, tokens: &[u32], from: usize) -> Result<Vec<Vec<f32>>> {
        self.eval_inner(tokens, Some(from), true)
    }

    /// `eval` without the cancellation check (decode steps and context shifts, which the
    /// generation loop checks itself).
    pub(crate) fn eval_uncancellable(&mut self, tokens: &[u32]) -> Result<()> {
        self.eval_inner(tokens, None, false).map(|_| ())
    }

    /// Like [`Session::eval`] but returns the logits of every position of `tokens`.
    pub fn eval_all_logits(&mut self, tokens: &[u32]) -> Result<Vec<Vec<f32>>> {
        self.eval_inner(tokens, Some(0), true)
    }

    /// Evaluates `next` and verifies the drafted tokens after it in one forward pass (reading
    /// the weights once): each position's logits are bit for bit what decoding the tokens one
    /// at a time computes there. The session then holds `next` (its logits current, as after
    /// `eval(&[next])`) and keeps the drafted tokens ahead, to be taken by
    /// [`Session::take_ahead`] as long as they match what is generated. Drafts that do not fit
    /// the context (or one prompt chunk, `n_batch`) are cut.
    pub fn eval_verify(&mut self, next: u32, draft: &[u32]) -> Result<()> {
        let mut tokens = Vec::with_capacity(draft.len() + 1);
        tokens.push(next);
        tokens.extend_from_slice(draft);
        Self::eval_many(&mut [(self, &tokens, true)])
    }

    /// Takes the next drafted token kept by a verification if it is `id` (its keys and values
    /// already in the cache, its logits current: as if `eval(&[id])` had run) and returns
    /// true; otherwise drops every drafted token and returns false.
    pub fn take_ahead(&mut self, id: u32) -> bool {
        match self.ahead.front() {
            Some(&(t, _)) if t == id && self.tokens.len() < self.n_ctx() => {
                let (_, logits) = self.ahead.pop_front().expect("checked");
                self.cache.advance(1);
                self.tokens.push(id);
                self.logits = Some(logits);
                true
            }
            _ => {
                self.ahead.clear();
                false
            }
        }
    }

    /// Drafted tokens still kept ahead.
    pub fn ahead_len(&self) -> usize {
        self.ahead.len()
    }

    /// `all_from`: `Some(i)` returns the logits of positions `i..` of `tokens`; `None` keeps
    /// only the last position's.
    fn eval_inner(
        &mut self,
        tokens: &[u32],
        all_from: Option<usize>,
        cancellable: bool,
    ) -> Result<Vec<Vec<f32>>> {
        if tokens.is_empty() {
            return Ok(vec![]);
        }
        self.check(tokens)?;
        self.ahead.clear();
        let runtime = self.runtime;
        runtime.run(|| self.eval_chunks(tokens, all_from, cancellable))
    }

    fn eval_chunks(
        &mut self,
        tokens: &[u32],
        all_from: Option<usize>,
        cancellable: bool,
    ) -> Result<Vec<Vec<f32>>> {
        let mut out = vec![];
        let mut offset = 0usize;
        for chunk in tokens.chunks(self.opts.n_batch) {
            let chunk_start = offset;
            offset += chunk.len();
            let start_len = self.cache.len();
            let (cancel, interrupt) = (&self.cancel, &mut self.interrupt);
            // Checked between chunks and between layers: a cancel handle, or the interrupt
            // check a binding installed (Python's signals).
            let mut stop =
                || cancellable && (cancel.take() || interrupt.as_mut().is_some_and(|f| f()));
            if stop() {
                return Err(Error::Cancelled);
            }
            let res = self
                .model
                .forward_hidden(chunk, &mut self.cache, &self.adapters, &mut stop);
            let hidden = match res {
                Ok(h) => h,
                Err(e) => {
                    self.cache.truncate(start_len);
                    return Err(e);
                }
            };
            self.tokens.extend_from_slice(chunk);
            if let Some(from) = all_from {
                let skip = from.saturating_sub(chunk_start).min(chunk.len());
                if skip < chunk.len() {
                    let rows = hidden.narrow(0, skip, chunk.len() - skip)?;
                    let l = self.model.logits(&rows)?;
                    for row in l.to_vec2::<f32>()? {
                        out.push(row);
                    }
                }
                if offset == tokens.len() {
                    self.logits = match out.last() {
                        Some(l) => Some(l.clone()),
                        None => Some(self.model.last_logits(&hidden)?),
                    };
                }
            } else if offset == tokens.len() {
                self.logits = Some(self.model.last_logits(&hidden)?);
            }
        }
        Ok(out)
    }

    /// Evaluates each session's tokens after its own context, all sessions in one forward pass
    /// (one pass over the weights for every sequence: decode steps of several conversations cost
    /// little more than one). Sessions must share one model; each keeps its own KV cache,
    /// adapters and logits, and gets exactly the logits it would get evaluating its tokens
    /// alone (`eval`), whatever else is in the batch. Prompts go in chunks of each session's
    /// `n_batch`, as `eval` does. An empty token list leaves its session as it is. On an error
    /// every session is left as before the call. Not cancellable (a batch step is short; drop a
    /// sequence between steps instead).
    pub fn eval_batch(batch: &mut [(&mut Session, &[u32])]) -> Result<()> {
        let mut all: Vec<(&mut Session, &[u32], bool)> = batch
            .iter_mut()
            .map(|(s, t)| (&mut **s, *t, false))
            .collect();
        Self::eval_many(&mut all)
    }

    /// [`Session::eval_batch`] where an entry marked `true` is a verification: its first token
    /// is evaluated and the rest (a draft) verified in the same pass, as
    /// [`Session::eval_verify`] does alone.
    pub(crate) fn eval_many(batch: &mut [(&mut Session, &[u32], bool)]) -> Result<()> {
        let Some(first) = batch.first() else {
            return Ok(());
        };
        let model = first.0.model.clone();
        let runtime = first.0.runtime;
        for (s, toks, verify) in batch.iter_mut() {
            if !std::sync::Arc::ptr_eq(&s.model.inner, &model.inner) {
                return Err(Error::InvalidArgument(
                    "every session of a batch must belong to the same model".into(),
                ));
            }
            if *verify {
                // A draft is cut to the context's room and one chunk; nothing to verify
                // leaves a plain decode step.
                let room = s.n_ctx().saturating_sub(s.tokens.len());
                let mut n = toks.len().min(room.max(1)).min(s.opts.n_batch.max(1));
                if !crate::kernels::enabled() {
                    n = n.min(1);
                }
                *toks = &toks[..n];
                *verify = n > 1;
            }
            s.check(toks)?;
        }
        for (s, _, _) in batch.iter_mut() {
            s.ahead.clear();
        }
        if !crate::kernels::enabled() {
            // candle's tensor path has no batched pass: one session after another.
            for (s, toks, _) in batch.iter_mut() {
                s.eval_uncancellable(toks)?;
            }
            return Ok(());
        }
        let before: Vec<usize> = batch.iter().map(|(s, _, _)| s.tokens.len()).collect();
        let r = runtime.run(|| Self::eval_batch_chunks(&model, batch));
        if r.is_err() {
            for ((s, _, _), &n) in batch.iter_mut().zip(&before) {
                s.truncate(n);
            }
        }
        r
    }

    fn eval_batch_chunks(model: &Model, batch: &mut [(&mut Session, &[u32], bool)]) -> Result<()> {
        let mut done: Vec<usize> = vec![0; batch.len()];
        loop {
            // This round: the next chunk of each session that has tokens left (a verification's
            // tokens all at once, computed as decoded one at a time).
            let mut idx = vec![];
            let mut seqs = vec![];
            for (i, (s, toks, verify)) in batch.iter_mut().enumerate() {
                if done[i] >= toks.len() {
                    continue;
                }
                let n = s.opts.n_batch.min(toks.len() - done[i]);
                let chunk = &toks[done[i]..done[i] + n];
                done[i] += n;
                idx.push((i, chunk));
                let Session {
                    cache, adapters, ..
                } = &mut **s;
                seqs.push(crate::model::BatchSeq {
                    tokens: chunk,
                    cache,
                    lora: adapters,
                    alone: *verify,
                });
            }
            if seqs.is_empty() {
                return Ok(());
            }
            let lens: Vec<usize> = seqs.iter().map(|q| q.cache.len()).collect();
            let hidden = match model.forward_batch(&mut seqs) {
                Ok(h) => h,
                Err(e) => {
                    drop(seqs);
                    for (&(i, _), &n) in idx.iter().zip(&lens) {
                        batch[i].0.cache.truncate(n);
                    }
                    return Err(e);
                }
            };
            drop(seqs);
            // Rows per sequence: its last, or every row of a verification.
            let counts: Vec<usize> = hidden
                .iter()
                .map(|h| h.len() / model.config().hidden_size)
                .collect();
            let mut logits = model
                .logits_rows(&hidden.concat(), counts.iter().sum())?
                .into_iter();
            for ((i, chunk), (n, len)) in idx.into_iter().zip(counts.into_iter().zip(lens)) {
                let (s, _, verify) = &mut batch[i];
                if *verify {
                    // The cache keeps the first token; the drafted rows stay written past its
                    // length, their logits ahead.
                    s.cache.truncate(len + 1);
                    s.tokens.push(chunk[0]);
                    s.logits = logits.next();
                    s.ahead = chunk[1..]
                        .iter()
                        .copied()
                        .zip(logits.by_ref().take(n - 1))
                        .collect();
                } else {
                    s.tokens.extend_from_slice(chunk);
                    s.logits = logits.next();
                }
            }
        }
    }

    /// Logits of the last evaluated position.
    pub fn logits(&self) -> Option<&[f32]> {
        self.logits.as_deref()
    }

    /// Applies these LoRA adapters, each with its scale, to this session's evaluations from now
    /// on (replacing the previous set; `&[]` is the base model). Other sessions and the model are
    /// untouched; tokens already evaluated keep the cache they were computed with. A scale of 0
    /// is exactly the base model. Every adapter must have been loaded for this session's model.
    pub fn set_adapters(&mut self, adapters: &[(crate::Adapter, f32)]) -> Result<()> {
        for (a, s) in adapters {
            if a.model_fingerprint() != self.model.fingerprint() {
                return Err(Error::InvalidArgument(format!(
                    "adapter {} was loaded for another model",
                    a.path().display()
                )));
            }
            if !s.is_finite() {
                return Err(Error::InvalidArgument(format!(
                    "adapter scale {s} is not finite"
                )));
            }
        }
        self.ahead.clear();
        self.adapters =
            crate::lora::Applied::new(adapters.to_vec(), self.model.config().num_hidden_layers);
        Ok(())
    }

    /// The adapters applied, with their scales.
    pub fn adapters(&self) -> &[(crate::Adapter, f32)] {
        &self.adapters
    }

    /// Rolls back to the first `n` tokens. The logits are cleared unless nothing was removed.
    pub fn truncate(&mut self, n: usize) {
        self.ahead.clear();
        if n < self.tokens.len() {
            self.tokens.truncate(n);
            self.cache.truncate(n);
            self.logits = None;
        }
    }

    /// Forgets everything.
    pub fn reset(&mut self) {
        self.truncate(0);
    }

    /// An independent copy of this session (shared prefix reused, future diverges).
    pub fn fork(&self) -> Result<Session> {
        Ok(Session {
            model: self.model.clone(),
            cache: self.cache.deep_clone()?,
            tokens: self.tokens.clone(),
            logits: self.logits.clone(),
            opts: self.opts.clone(),
            runtime: self.runtime,
            interrupt: None,
            adapters: self.adapters.clone(),
            cancel: CancelHandle::default(),
            ahead: Default::default(),
        })
    }
}

impl Session {
    pub(crate) fn kv_import(
        &mut self,
        tokens: Vec<u32>,
        kv: Vec<(candle_core::Tensor, candle_core::Tensor)>,
        logits: Option<Vec<f32>>,
    ) -> Result<()> {
        let n = tokens.len();
        self.ahead.clear();
        self.cache.truncate(0);
        if n > 0 {
            self.cache.reserve(n, &candle_core::Device::Cpu)?;
            for (l, (k, v)) in kv.iter().enumerate() {
                self.cache.append(l, k, v)?;
            }
            self.cache.advance(n);
        }
        self.tokens = tokens;
        self.logits = logits;
        Ok(())
    }

    /// Restores the cache from [`KvCache::raw`] bytes of a cache of this session's types.
    pub(crate) fn kv_load_raw(
        &mut self,
        tokens: Vec<u32>,
        bytes: &[u8],
        logits: Option<Vec<f32>>,
    ) -> Result<()> {
        self.ahead.clear();
        self.cache.truncate(0);
        self.cache.load_raw(tokens.len(), bytes)?;
        self.tokens = tokens;
        self.logits = logits;
        Ok(())
    }

    /// Frees room when the context is full: with context shift enabled, keeps the first
    /// `n_keep` tokens and the newer half of the rest, re-evaluating them; otherwise
    /// [`Error::ContextOverflow`].
    pub fn shift_context(&mut self) -> Result<()> {
        let n = self.tokens.len();
        let Some(n_keep) = self.opts.context_shift else {
            return Err(Error::ContextOverflow {
                needed: n + 1,
                max: self.n_ctx(),
            });
        };
        let n_keep = n_keep.min(n);
        let n_discard = (n - n_keep) / 2;
        if n_discard == 0 {
            return Err(Error::ContextOverflow {
                needed: n + 1,
                max: self.n_ctx(),
            });
        }
        let mut kept = self.tokens[..n_keep].to_vec();
        kept.extend_from_slice(&self.tokens[n_keep + n_discard..]);
        tracing::debug!(n_keep, n_discard, "context shift");
        self.reset();
        self.eval_uncancellable(&kept)
    }
}
