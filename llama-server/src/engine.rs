//! The engine: one thread owns a [`llama_core::Batch`] and advances every admitted request
//! together, one forward pass per step; requests wait in a bounded queue while the batch is
//! full. Each request talks to its HTTP handler through a channel; a handler that goes away
//! (the client disconnected) ends its sequence at the next step.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use llama_core::{
    Batch, Error, GenerateOptions, Generation, Model, Sampler, SamplerConfig, SeqId,
    SessionOptions, TokenLogprob,
};
use tokio::sync::mpsc::UnboundedSender;

use crate::api::{core_error, ApiError};

/// A place in the queue: taken when a request arrives (before its prompt is rendered and
/// tokenized) and given back when the request enters the batch or goes away, so that requests
/// being prepared count against `--max-queue` with those waiting for the batch.
pub struct Ticket {
    metrics: Arc<Metrics>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.metrics.queued.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A generation request for the engine.
pub struct Job {
    /// Its place in the queue (given back when it enters the batch).
    pub ticket: Option<Ticket>,
    /// The request field the prompt came from (`messages` or `prompt`), for errors.
    pub prompt_param: &'static str,
    /// The request field the constraint came from (`response_format` or `tools`), for errors
    /// a grammar meets while generating.
    pub constraint_param: &'static str,
    /// The prompt's tokens (rendered and tokenized by the handler).
    pub tokens: Vec<u32>,
    /// Options, constraint compiled (`max_tokens` is replaced by the limit below).
    pub opts: GenerateOptions,
    /// Most tokens asked for (`None`: until the context is full).
    pub max_tokens: Option<usize>,
    /// Sampler settings.
    pub sampler: SamplerConfig,
    /// Where the request's events go.
    pub events: UnboundedSender<Event>,
}

/// What the engine tells a request's handler.
#[derive(Debug)]
pub enum Event {
    /// The request is in the batch: its prompt is `prompt_tokens` long.
    Started {
        /// Prompt length in tokens.
        prompt_tokens: usize,
        /// Of them, tokens taken from the prefix cache.
        cached_tokens: usize,
    },
    /// A generated token and the text it released.
    Token {
        /// Text (may be empty).
        text: String,
        /// The token's log-probability, when asked for.
        logprob: Option<TokenLogprob>,
    },
    /// The end: the whole generation, or why it failed.
    Done(Result<Generation, ApiError>),
}

/// Limits the engine enforces.
#[derive(Clone)]
pub struct Limits {
    /// Sequences decoded together.
    pub max_sequences: usize,
    /// Requests waiting for a place in the batch; beyond it new requests get 429.
    pub max_queue: usize,
    /// Most tokens one request may ask for.
    pub max_tokens: usize,
    /// Sessions' options (context size, KV cache type).
    pub session: SessionOptions,
    /// LoRA adapters every session applies, with their scales.
    pub adapters: Vec<(llama_core::Adapter, f32)>,
    /// Speculative decoding for every request (`--draft`, `--lookup`; a request's
    /// `prediction` drafts from its text instead), and the most tokens drafted at once.
    pub draft: Option<llama_core::Draft>,
    /// Most tokens drafted per verification.
    pub draft_max: usize,
}

/// Counters read by `/metrics`.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Requests being prepared or waiting for a place in the batch.
    pub queued: AtomicUsize,
    /// Sequences in the batch.
    pub active: AtomicUsize,
    /// Prompt tokens of admitted requests (cached prefixes included).
    pub prompt_tokens: AtomicU64,
    /// Of them, tokens taken from the prefix cache instead of being read.
    pub cached_tokens: AtomicU64,
    /// Tokens generated.
    pub generated_tokens: AtomicU64,
    /// Forward passes run.
    pub steps: AtomicU64,
    /// Requests admitted to the batch.
    pub admitted: AtomicU64,
    /// Requests refused because the queue was full.
    pub rejected: AtomicU64,
    /// Sequences ended because their client went away.
    pub disconnected: AtomicU64,
    /// Generated tokens over the last seconds, for the tokens-per-second gauge.
    recent: Mutex<VecDeque<(Instant, u64)>>,
}

/// The window of the tokens-per-second gauge.
const RATE_WINDOW: Duration = Duration::from_secs(10);

impl Metrics {
    fn record(&self, tokens: u64) {
        self.generated_tokens.fetch_add(tokens, Ordering::Relaxed);
        let now = Instant::now();
        if let Ok(mut r) = self.recent.lock() {
            r.push_back((now, tokens));
            while r.front().is_some_and(|(t, _)| now - *t > RATE_WINDOW) {
                r.pop_front();
            }
        }
    }

    /// Generated tokens per second over the last 10 seconds.
    pub fn tokens_per_second(&self) -> f64 {
        let now = Instant::now();
        let Ok(r) = self.recent.lock() else {
            return 0.0;
        };
        let n: u64 = r
            .iter()
            .filter(|(t, _)| now - *t <= RATE_WINDOW)
            .map(|(_, n)| n)
            .sum();
        n as f64 / RATE_WINDOW.as_secs_f64()
    }
}

/// The engine's handle: submits jobs, reads metrics, stops it.
pub struct Engine {
    submit: Mutex<Option<mpsc::Sender<Job>>>,
    /// Counters.
    pub metrics: Arc<Metrics>,
    limits: Limits,
    n_ctx: usize,
    cancel_all: Arc<AtomicBool>,
    closing: AtomicBool,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Engine {
    /// Starts the engine thread for `model`.
    pub fn start(model: &Model, limits: Limits) -> Result<Engine, Error> {
        // The context size sessions get (0 resolves to the model's default).
        let n_ctx = model.session(limits.session.clone())?.n_ctx();
        let (tx, rx) = mpsc::channel::<Job>();
        let metrics = Arc::new(Metrics::default());
        let cancel_all = Arc::new(AtomicBool::new(false));
        let worker = Worker {
            model: model.clone(),
            limits: limits.clone(),
            n_ctx,
            metrics: metrics.clone(),
            cancel_all: cancel_all.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("llama-engine".into())
            .spawn(move || worker.run(rx))
            .map_err(|e| Error::InvalidArgument(format!("cannot start the engine thread: {e}")))?;
        Ok(Engine {
            submit: Mutex::new(Some(tx)),
            metrics,
            limits,
            n_ctx,
            cancel_all,
            closing: AtomicBool::new(false),
            thread: Mutex::new(Some(thread)),
        })
    }

    /// The sessions' context size.
    pub fn n_ctx(&self) -> usize {
        self.n_ctx
    }

    /// The limits.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Whether the server is shutting down.
    pub fn is_closing(&self) -> bool {
        self.closing.load(Ordering::SeqCst)
    }

    /// Whether the engine thread still runs.
    pub fn is_alive(&self) -> bool {
        self.thread
            .lock()
            .ok()
            .is_some_and(|t| t.as_ref().is_some_and(|t| !t.is_finished()))
    }

    /// Takes a place in the queue for a new request: 503 while shutting down, 429 when
    /// `max_queue` requests are already being prepared or waiting.
    pub fn reserve(&self) -> Result<Ticket, ApiError> {
        if self.is_closing() {
            return Err(shutting_down());
        }
        let m = &self.metrics;
        if m.queued.fetch_add(1, Ordering::SeqCst) >= self.limits.max_queue {
            m.queued.fetch_sub(1, Ordering::SeqCst);
            m.rejected.fetch_add(1, Ordering::Relaxed);
            return Err(ApiError::new(
                429,
                "rate_limit_error",
                format!(
                    "the server is busy: {} requests are waiting; retry later",
                    self.limits.max_queue
                ),
            )
            .code("queue_full"));
        }
        Ok(Ticket { metrics: m.clone() })
    }

    /// Queues a job (its ticket already holds its place): 503 while shutting down, 400 when it
    /// asks for more tokens than the server allows.
    pub fn submit(&self, job: Job) -> Result<(), ApiError> {
        if self.is_closing() {
            return Err(shutting_down());
        }
        if let Some(n) = job.max_tokens {
            if n > self.limits.max_tokens {
                return Err(ApiError::invalid(
                    "max_tokens",
                    format!(
                        "max_tokens is {n}, above this server's limit of {}",
                        self.limits.max_tokens
                    ),
                ));
            }
        }
        let sent = self
            .submit
            .lock()
            .ok()
            .and_then(|s| s.as_ref().map(|s| s.send(job).is_ok()))
            .unwrap_or(false);
        if !sent {
            return Err(ApiError::new(503, "server_error", "the engine has stopped"));
        }
        Ok(())
    }

    /// Refuses new requests from now on (503).
    pub fn close(&self) {
        self.closing.store(true, Ordering::SeqCst);
    }

    /// Ends every running and waiting request now (running ones finish with what they have).
    pub fn cancel_all(&self) {
        self.cancel_all.store(true, Ordering::SeqCst);
    }

    /// Stops the engine thread once it has nothing left, and waits for it.
    pub fn join(&self) {
        self.close();
        if let Ok(mut s) = self.submit.lock() {
            s.take();
        }
        if let Some(t) = self.thread.lock().ok().and_then(|mut t| t.take()) {
            let _ = t.join();
        }
    }
}

fn shutting_down() -> ApiError {
    ApiError::new(503, "server_error", "the server is shutting down").code("shutting_down")
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.cancel_all();
        self.join();
    }
}

struct Worker {
    model: Model,
    limits: Limits,
    n_ctx: usize,
    metrics: Arc<Metrics>,
    cancel_all: Arc<AtomicBool>,
}

impl Worker {
    fn run(self, rx: mpsc::Receiver<Job>) {
        let mut batch = Batch::new(&self.model);
        let mut waiting: VecDeque<Job> = VecDeque::new();
        // Each running request's channel and the field its constraint came from.
        let mut running: HashMap<SeqId, (UnboundedSender<Event>, &'static str)> = HashMap::new();
        // Sequences cut off by shutdown: they end with an error, not a finish reason.
        let mut cut: std::collections::HashSet<SeqId> = Default::default();
        let mut open = true;
        loop {
            if batch.is_empty() && waiting.is_empty() {
                if !open {
                    break;
                }
                match rx.recv_timeout(Duration::from_millis(100)) {
                    Ok(j) => waiting.push_back(j),
                    Err(RecvTimeoutError::Timeout) => {
                        self.cancel_all.store(false, Ordering::SeqCst);
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            }
            loop {
                match rx.try_recv() {
                    Ok(j) => waiting.push_back(j),
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            }
            if self.cancel_all.load(Ordering::SeqCst) {
                for j in waiting.drain(..) {
                    let _ = j.events.send(Event::Done(Err(shutting_down())));
                }
                let ids: Vec<SeqId> = running.keys().copied().collect();
                for id in ids {
                    if batch.stop(id) {
                        cut.insert(id);
                    }
                }
            }
            // Waiting requests whose client went away give their place back now, not when
            // their turn comes.
            let before = waiting.len();
            waiting.retain(|j| !j.events.is_closed());
            let left = before - waiting.len();
            if left > 0 {
                self.metrics
                    .disconnected
                    .fetch_add(left as u64, Ordering::Relaxed);
            }
            while batch.len() < self.limits.max_sequences {
                let Some(mut job) = waiting.pop_front() else {
                    break;
                };
                job.ticket.take();
                match self.admit(&mut batch, &job) {
                    Ok((id, prompt_tokens)) => {
                        let cached_tokens = batch.cached_tokens(id).unwrap_or(0);
                        self.metrics.admitted.fetch_add(1, Ordering::Relaxed);
                        self.metrics
                            .prompt_tokens
                            .fetch_add(prompt_tokens as u64, Ordering::Relaxed);
                        self.metrics
                            .cached_tokens
                            .fetch_add(cached_tokens as u64, Ordering::Relaxed);
                        let _ = job.events.send(Event::Started {
                            prompt_tokens,
                            cached_tokens,
                        });
                        running.insert(id, (job.events, job.constraint_param));
                    }
                    Err(e) => {
                        let _ = job
                            .events
                            .send(Event::Done(Err(e.param_if_unset(job.prompt_param))));
                    }
                }
            }
            // Clients that went away.
            let gone: Vec<SeqId> = running
                .iter()
                .filter(|(_, (tx, _))| tx.is_closed())
                .map(|(id, _)| *id)
                .collect();
            for id in gone {
                batch.stop(id);
                self.metrics.disconnected.fetch_add(1, Ordering::Relaxed);
            }
            if !batch.is_empty() {
                let step = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| batch.step()));
                let Ok(step) = step else {
                    // A bug in a step must not take the server down with it: every running
                    // request ends with a 500 and the engine goes on with an empty batch.
                    tracing::error!("a batch step panicked: its requests end with an error");
                    for (_, (tx, _)) in running.drain() {
                        let _ = tx.send(Event::Done(Err(ApiError::new(
                            500,
                            "server_error",
                            "internal error while generating (logged by the server)",
                        ))));
                    }
                    batch = Batch::new(&self.model);
                    self.metrics.active.store(0, Ordering::Relaxed);
                    continue;
                };
                match step {
                    Ok(events) => {
                        self.metrics.steps.fetch_add(1, Ordering::Relaxed);
                        let mut tokens = 0;
                        for ev in events {
                            if ev.piece.token != u32::MAX {
                                tokens += 1;
                            }
                            if let Some((tx, _)) = running.get(&ev.id) {
                                let _ = tx.send(Event::Token {
                                    text: ev.piece.text,
                                    logprob: ev.logprob,
                                });
                            }
                        }
                        self.metrics.record(tokens);
                    }
                    Err(e) => {
                        // The pass itself failed: every running request ends with the error.
                        tracing::error!(error = %e, "forward pass failed");
                        let err = core_error(&e);
                        let ids: Vec<SeqId> = running.keys().copied().collect();
                        for id in ids {
                            batch.stop(id);
                            batch.take_finished();
                            if let Some((tx, _)) = running.remove(&id) {
                                let _ = tx.send(Event::Done(Err(err.clone())));
                            }
                        }
                    }
                }
            }
            for f in batch.take_finished() {
                if let Some((tx, constraint_param)) = running.remove(&f.id) {
                    let result = if cut.remove(&f.id) {
                        Err(ApiError::new(
                            503,
                            "server_error",
                            "the server shut down before this reply was complete",
                        )
                        .code("shutting_down"))
                    } else {
                        f.result.map_err(|e| match e {
                            Error::Grammar(_) => core_error(&e).param_if_unset(constraint_param),
                            e => core_error(&e),
                        })
                    };
                    let _ = tx.send(Event::Done(result));
                }
            }
            self.metrics.active.store(batch.len(), Ordering::Relaxed);
        }
    }

    /// Bounds the generation by the context and adds it to the batch.
    fn admit(&self, batch: &mut Batch, job: &Job) -> Result<(SeqId, usize), ApiError> {
        let e = |e: Error| core_error(&e);
        let ids = &job.tokens;
        if ids.is_empty() {
            return Err(ApiError::invalid("prompt", "the prompt is empty"));
        }
        if ids.len() >= self.n_ctx {
            return Err(core_error(&Error::ContextOverflow {
                needed: ids.len() + 1,
                max: self.n_ctx,
            }));
        }
        let room = self.n_ctx - ids.len();
        let mut opts = job.opts.clone();
        opts.max_tokens = job
            .max_tokens
            .unwrap_or(self.limits.max_tokens)
            .min(self.limits.max_tokens)
            .min(room);
        let sampler = Sampler::new(job.sampler.clone()).map_err(e)?;
        let mut session = self.model.session(self.limits.session.clone()).map_err(e)?;
        if !self.limits.adapters.is_empty() {
            session.set_adapters(&self.limits.adapters).map_err(e)?;
        }
        let id = batch
            .add(session, llama_core::Prompt::Tokens(ids), opts, sampler)
            .map_err(e)?;
        Ok((id, ids.len()))
    }
}
