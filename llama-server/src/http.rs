//! Routes, handlers and OpenAI's response shapes.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use futures_util::stream::{self, Stream};
use llama_core::{Generation, Model, OwnedPrompt, TokenLogprob};
use serde_json::{json, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use crate::access::HostPolicy;
use crate::api::{self, core_error, finish_reason, ApiError, Params, PromptInput};
use crate::engine::{Engine, Event, Job};

/// What every handler shares.
pub struct AppState {
    /// The model.
    pub model: Model,
    /// The engine.
    pub engine: Engine,
    model_id: String,
    api_key: Option<String>,
    created: u64,
    next_id: AtomicU64,
    /// Every token's bytes (for log-probabilities and the length bound below).
    token_bytes: Vec<Vec<u8>>,
    /// Longest text one token stands for, in bytes: a text longer than the context times
    /// this cannot fit, and is refused before it is tokenized.
    max_token_bytes: usize,
    /// One embeddings computation at a time (they share the compute threads with decode).
    embed: tokio::sync::Semaphore,
    /// Requests rendering, tokenizing or compiling on the blocking threads at once.
    prepare: Arc<tokio::sync::Semaphore>,
    /// Request bodies held at once, read or being parsed, in KiB (see [`BODY_BUDGET`]).
    bodies: Arc<tokio::sync::Semaphore>,
    hosts: HostPolicy,
    cors: Vec<String>,
    max_body: usize,
    body_timeout: std::time::Duration,
    requests: AtomicU64,
    errors: AtomicU64,
}

/// Requests prepared at once (rendering, tokenization and constraint compilation run on
/// blocking threads, off the async workers; more wait their turn, counted in the queue).
pub const PREPARE_AT_ONCE: usize = 2;

/// Bytes of large request bodies held at once, read or being parsed: a request whose body is
/// over [`SMALL_BODY`] (by its `Content-Length`; the body limit when it has none) waits for room
/// before reading it, so that many large bodies arriving together cannot make memory grow with
/// their number. Small bodies (every ordinary request) never wait.
pub const BODY_BUDGET: usize = 128 << 20;
/// Bodies up to this size are read without taking from [`BODY_BUDGET`].
pub const SMALL_BODY: usize = 64 << 10;

impl AppState {
    /// State for `model` served by `engine`.
    ///
    /// Defaults: hosts of a server on 127.0.0.1, no CORS origins, 4 MiB bodies read within 30 s.
    pub fn new(model: Model, engine: Engine, model_id: String, api_key: Option<String>) -> Self {
        let token_bytes = model.tokenizer().token_bytes();
        let max_token_bytes = token_bytes.iter().map(Vec::len).max().unwrap_or(1).max(1);
        AppState {
            model,
            engine,
            model_id,
            api_key,
            created: unix_now(),
            next_id: AtomicU64::new(1),
            token_bytes,
            max_token_bytes,
            embed: tokio::sync::Semaphore::new(1),
            prepare: Arc::new(tokio::sync::Semaphore::new(PREPARE_AT_ONCE)),
            bodies: Arc::new(tokio::sync::Semaphore::new(BODY_BUDGET >> 10)),
            hosts: HostPolicy::new(std::net::Ipv4Addr::LOCALHOST.into(), &[])
                .expect("no names to check"),
            cors: vec![],
            max_body: 4 << 20,
            body_timeout: std::time::Duration::from_secs(30),
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
        }
    }

    /// The hosts and origins the server answers (see [`crate::access`]).
    pub fn with_access(mut self, hosts: HostPolicy, cors: Vec<String>) -> Self {
        self.hosts = hosts;
        self.cors = cors;
        self
    }

    /// Bodies above `max_body` bytes get 413; a body not received within `timeout`, 408.
    pub fn with_body_limits(mut self, max_body: usize, timeout: std::time::Duration) -> Self {
        self.max_body = max_body;
        self.body_timeout = timeout;
        self
    }

    /// Refuses a text that cannot fit the context whatever it tokenizes to (each token stands
    /// for at most `max_token_bytes` bytes), before tokenizing it.
    fn check_length(&self, bytes: usize, param: &str) -> Result<(), ApiError> {
        let n_ctx = self.engine.n_ctx();
        if bytes > n_ctx.saturating_mul(self.max_token_bytes) {
            return Err(ApiError::invalid(
                param,
                format!(
                    "{param} is {bytes} bytes: more than a context of {n_ctx} tokens can hold \
                     (a token of this model stands for at most {} bytes)",
                    self.max_token_bytes
                ),
            )
            .code("context_length_exceeded"));
        }
        Ok(())
    }

    /// Waits for a turn to prepare a request on the blocking threads.
    async fn prepare_turn(&self) -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
        self.prepare
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| ApiError::new(503, "server_error", "the server is shutting down"))
    }

    fn id(&self, prefix: &str) -> String {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        format!("{prefix}-{:x}{n:06x}", self.created)
    }

    fn token_text(&self, id: u32) -> (String, Vec<u8>) {
        let mut b = self
            .token_bytes
            .get(id as usize)
            .cloned()
            .unwrap_or_default();
        // Special tokens are 0xFF followed by their text in the table.
        if b.first() == Some(&0xFF) {
            b.remove(0);
        }
        (String::from_utf8_lossy(&b).into_owned(), b)
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut r = (status, axum::Json(self.body())).into_response();
        if self.status == 429 || self.status == 503 {
            r.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        }
        r
    }
}

/// The server's routes over `state` (its body limits are `state`'s; `max_body` also bounds
/// any body an extractor reads).
pub fn router(state: Arc<AppState>, max_body: usize) -> Router {
    let api = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model_by_id))
        .route("/metrics", get(metrics))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .route("/", get(page))
        .route("/health", get(health))
        .merge(api)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::extract::DefaultBodyLimit::max(max_body))
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        .layer(middleware::from_fn_with_state(state.clone(), log_requests))
        .with_state(state)
}

async fn log_requests(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let t0 = Instant::now();
    let r = next.run(req).await;
    st.requests.fetch_add(1, Ordering::Relaxed);
    let status = r.status().as_u16();
    if status >= 400 {
        st.errors.fetch_add(1, Ordering::Relaxed);
    }
    tracing::info!(
        %method,
        path,
        status,
        ms = t0.elapsed().as_secs_f64() * 1e3,
        "request"
    );
    r
}

/// DNS rebinding and cross-site requests: the `Host` and `Origin` must be allowed, and a POST
/// must say `Content-Type: application/json` (a form or `text/plain` post, which a web page
/// can send anywhere without asking, is refused).
async fn guard(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let h = req.headers();
    if let Some(host) = h.get(header::HOST) {
        let host = host.to_str().unwrap_or("");
        if !st.hosts.allows_host(host) {
            let shown: String = host.chars().take(100).collect();
            return ApiError::new(
                403,
                "invalid_request_error",
                format!(
                    "the Host {shown:?} is not one this server answers (a guard against DNS \
                     rebinding); start it with --allow-host NAME to answer that name"
                ),
            )
            .code("host_not_allowed")
            .into_response();
        }
    }
    if let Some(origin) = h.get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("");
        if !st.hosts.allows_origin(origin, &st.cors) {
            let shown: String = origin.chars().take(100).collect();
            return ApiError::new(
                403,
                "invalid_request_error",
                format!(
                    "requests from web pages of {shown:?} are not allowed; start the server \
                     with --cors ORIGIN to allow them"
                ),
            )
            .code("origin_not_allowed")
            .into_response();
        }
    }
    if req.method() == axum::http::Method::POST {
        let json = h
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"));
        if !json {
            return ApiError::new(
                415,
                "invalid_request_error",
                "the request body must be JSON, sent with 'Content-Type: application/json'",
            )
            .code("unsupported_media_type")
            .into_response();
        }
    }
    next.run(req).await
}

/// Compares without stopping at the first differing byte.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn auth(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if let Some(key) = &st.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        match given {
            Some(g) if same_secret(g.as_bytes(), key.as_bytes()) => {}
            Some(_) => {
                return ApiError::new(401, "invalid_request_error", "Incorrect API key provided.")
                    .code("invalid_api_key")
                    .into_response()
            }
            None => {
                return ApiError::new(
                    401,
                    "invalid_request_error",
                    "This server needs an API key: send 'Authorization: Bearer <key>'.",
                )
                .code("invalid_api_key")
                .into_response()
            }
        }
    }
    next.run(req).await
}

async fn not_found(req: Request) -> ApiError {
    ApiError::new(
        404,
        "invalid_request_error",
        format!("no route {} {}", req.method(), req.uri().path()),
    )
    .code("not_found")
}

async fn method_not_allowed(req: Request) -> ApiError {
    ApiError::new(
        405,
        "invalid_request_error",
        format!("{} is not allowed on {}", req.method(), req.uri().path()),
    )
    .code("method_not_allowed")
}

/// Reads a request body: 413 above the limit, 408 when it is not all there within the body
/// timeout. An over-long body is read to its end and dropped (up to [`DRAIN_LIMIT`] bytes,
/// within the timeout) before the 413, so that a client still sending it can read the answer
/// instead of meeting a reset connection.
async fn read_body(
    st: &AppState,
    req: Request,
    deadline: tokio::time::Instant,
) -> Result<Bytes, ApiError> {
    use http_body_util::BodyExt;
    let too_large = || {
        ApiError::new(
            413,
            "invalid_request_error",
            format!("the request body is larger than {} bytes", st.max_body),
        )
        .code("request_too_large")
    };
    let timed_out = || {
        ApiError::new(
            408,
            "invalid_request_error",
            format!(
                "the request body did not arrive within {} s",
                st.body_timeout.as_secs_f64()
            ),
        )
        .code("request_timeout")
    };
    let mut body = req.into_body();
    let mut buf = bytes_buf(st.max_body);
    let mut over = false;
    let mut seen: usize = 0;
    loop {
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) if over => return Err(too_large()),
            Err(_) => return Err(timed_out()),
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                return Err(ApiError::invalid(
                    "",
                    format!("the request body could not be read: {e}"),
                ))
            }
            Ok(Some(Ok(f))) => f,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        seen = seen.saturating_add(data.len());
        if seen > st.max_body {
            over = true;
            buf = Vec::new();
            if seen > DRAIN_LIMIT {
                return Err(too_large());
            }
        } else {
            buf.extend_from_slice(&data);
        }
    }
    if over {
        return Err(too_large());
    }
    Ok(Bytes::from(buf))
}

/// Reads a JSON body within the body budget and timeout and parses it; the budget is given
/// back once it is parsed.
async fn read_json<T>(
    st: &AppState,
    req: Request,
    parse: fn(&[u8]) -> Result<T, ApiError>,
) -> Result<T, ApiError> {
    let deadline = tokio::time::Instant::now() + st.body_timeout;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    let size = declared.unwrap_or(st.max_body).min(st.max_body);
    let mut budget = None;
    if size > SMALL_BODY {
        let kib = size.div_ceil(1024).min(BODY_BUDGET >> 10) as u32;
        let permit = tokio::time::timeout_at(deadline, st.bodies.clone().acquire_many_owned(kib))
            .await
            .ok()
            .and_then(Result::ok)
            .ok_or_else(|| {
                ApiError::new(
                    503,
                    "server_error",
                    "the server is busy reading other large requests; retry later",
                )
                .code("server_busy")
            })?;
        budget = Some(permit);
    }
    let bytes = read_body(st, req, deadline).await?;
    // Parsed here: ~10 ms at the 4 MiB limit, and the budget bounds how many at once. (On a
    // blocking thread, every new pool thread's malloc arena kept its share of the large bodies:
    // +110 MiB of RSS in the soak.)
    let parsed = parse(&bytes);
    drop(budget);
    parsed
}

/// The most bytes of an over-long body read (and dropped) before answering 413.
const DRAIN_LIMIT: usize = 64 << 20;

/// A buffer for a body of at most `max` bytes (grown as data comes, never sized by a header).
fn bytes_buf(max: usize) -> Vec<u8> {
    Vec::with_capacity(max.min(64 << 10))
}

async fn page() -> Html<&'static str> {
    Html(include_str!("page.html"))
}

async fn health(State(st): State<Arc<AppState>>) -> Response {
    if st.engine.is_closing() {
        ApiError::new(503, "server_error", "shutting down")
            .code("shutting_down")
            .into_response()
    } else if !st.engine.is_alive() {
        ApiError::new(503, "server_error", "the engine has stopped").into_response()
    } else {
        axum::Json(json!({"status": "ok"})).into_response()
    }
}

fn model_object(st: &AppState) -> Value {
    json!({
        "id": st.model_id,
        "object": "model",
        "created": st.created,
        "owned_by": "llama-core",
        "meta": {
            "n_ctx": st.engine.n_ctx(),
            "n_vocab": st.model.config().vocab_size,
            "n_embd": st.model.config().hidden_size,
        },
    })
}

async fn models(State(st): State<Arc<AppState>>) -> axum::Json<Value> {
    axum::Json(json!({"object": "list", "data": [model_object(&st)]}))
}

async fn model_by_id(
    State(st): State<Arc<AppState>>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Response {
    if id == st.model_id {
        axum::Json(model_object(&st)).into_response()
    } else {
        ApiError::new(
            404,
            "invalid_request_error",
            format!(
                "The model '{id}' does not exist (this server serves '{}').",
                st.model_id
            ),
        )
        .code("model_not_found")
        .into_response()
    }
}

async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    let m = &st.engine.metrics;
    let r = |a: &AtomicU64| a.load(Ordering::Relaxed).to_string();
    let g = |a: &std::sync::atomic::AtomicUsize| a.load(Ordering::Relaxed).to_string();
    const C: &str = "counter";
    const G: &str = "gauge";
    let rows: [(&str, &str, &str, String); 13] = [
        (
            "prompt_tokens_total",
            C,
            "Prompt tokens of admitted requests.",
            r(&m.prompt_tokens),
        ),
        (
            "prompt_tokens_cached_total",
            C,
            "Prompt tokens taken from the prefix cache instead of being read.",
            r(&m.cached_tokens),
        ),
        (
            "generated_tokens_total",
            C,
            "Tokens generated.",
            r(&m.generated_tokens),
        ),
        (
            "tokens_per_second",
            G,
            "Tokens generated per second over the last 10 seconds.",
            format!("{:.3}", m.tokens_per_second()),
        ),
        (
            "active_sequences",
            G,
            "Sequences in the batch.",
            g(&m.active),
        ),
        (
            "queue_length",
            G,
            "Requests waiting for a place in the batch.",
            g(&m.queued),
        ),
        (
            "max_sequences",
            G,
            "Sequences decoded together at most.",
            st.engine.limits().max_sequences.to_string(),
        ),
        (
            "forward_passes_total",
            C,
            "Batched forward passes run.",
            r(&m.steps),
        ),
        (
            "requests_admitted_total",
            C,
            "Generation requests admitted to the batch.",
            r(&m.admitted),
        ),
        (
            "requests_rejected_total",
            C,
            "Generation requests refused because the queue was full.",
            r(&m.rejected),
        ),
        (
            "requests_disconnected_total",
            C,
            "Sequences ended because their client went away.",
            r(&m.disconnected),
        ),
        (
            "http_requests_total",
            C,
            "HTTP requests answered.",
            r(&st.requests),
        ),
        (
            "http_errors_total",
            C,
            "HTTP requests answered with a status of 400 or more.",
            r(&st.errors),
        ),
    ];
    let mut out = String::new();
    for (name, kind, help, value) in rows {
        out.push_str(&format!(
            "# HELP llama_{name} {help}\n# TYPE llama_{name} {kind}\nllama_{name} {value}\n"
        ));
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out,
    )
        .into_response()
}

/// Chat or completion: what differs in their responses.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Completion,
}

/// One generation request on its way through the engine.
struct Call {
    st: Arc<AppState>,
    kind: Kind,
    id: String,
    created: u64,
    params: Params,
    has_tools: bool,
    prompt_tokens: usize,
    cached_tokens: usize,
    rx: UnboundedReceiver<Event>,
    t0: Instant,
}

impl Call {
    /// Renders and tokenizes the prompt and compiles its constraint (on a blocking thread, not
    /// the decode thread), queues the job and waits until the engine admits it (or refuses
    /// it: the error is the response, sent before any stream starts).
    async fn start(
        st: Arc<AppState>,
        kind: Kind,
        prompt: OwnedPrompt,
        params: Params,
        opts: llama_core::GenerateOptions,
    ) -> Result<Call, ApiError> {
        let prompt_param = prompt.field();
        // Everything that can be checked without work first.
        let cap = st.engine.limits().max_tokens;
        if let Some(n) = params.max_tokens.filter(|&n| n > cap) {
            return Err(ApiError::invalid(
                "max_tokens",
                format!("max_tokens is {n}, above this server's limit of {cap}"),
            ));
        }
        let n_vocab = st.model.config().vocab_size;
        if let Some((id, _)) = params
            .sampler
            .logit_bias
            .iter()
            .find(|(id, _)| *id as usize >= n_vocab)
        {
            return Err(ApiError::invalid(
                "logit_bias",
                format!("logit_bias names token {id}, outside the vocabulary of {n_vocab}"),
            ));
        }
        match &prompt {
            OwnedPrompt::Chat(m) => {
                let bytes: usize = m
                    .iter()
                    .map(|m| {
                        m.content.len()
                            + m.tool_calls
                                .iter()
                                .map(|c| c.name.len() + c.arguments.to_string().len())
                                .sum::<usize>()
                    })
                    .sum();
                // Tools are written into the prompt too.
                let tools: usize = opts
                    .tools
                    .iter()
                    .map(|t| t.to_json().to_string().len())
                    .sum();
                st.check_length(bytes + tools, prompt_param)?;
            }
            OwnedPrompt::Text(t) => st.check_length(t.len(), prompt_param)?,
            OwnedPrompt::Tokens(t) => {
                if t.len() >= st.engine.n_ctx() {
                    return Err(core_error(&llama_core::Error::ContextOverflow {
                        needed: t.len() + 1,
                        max: st.engine.n_ctx(),
                    })
                    .at(prompt_param));
                }
            }
        }
        // A place in the queue, then a turn on the blocking threads: at most
        // PREPARE_AT_ONCE requests render and tokenize at a time, and at most `max_queue`
        // wait for that or for the batch.
        let ticket = st.engine.reserve()?;
        let turn = st.prepare_turn().await?;
        let has_constraint = opts.constraint.is_some() || opts.grammar.is_some();
        let model = st.model.clone();
        let prepared = tokio::task::spawn_blocking(move || {
            // The turn ends with the work, even when the client has gone.
            let _turn = turn;
            let tokens = match prompt {
                OwnedPrompt::Chat(m) => model.chat_tokens_with_tools(&m, &opts.tools),
                OwnedPrompt::Text(t) => model.tokenize(&t, true, true),
                OwnedPrompt::Tokens(t) => Ok(t),
            }
            .map_err(|e| core_error(&e).param_if_unset(prompt_param))?;
            let opts = opts.prepared(&model).map_err(|e| {
                core_error(&e).param_if_unset(if has_constraint {
                    "response_format"
                } else {
                    "tools"
                })
            })?;
            Ok::<_, ApiError>((tokens, opts))
        })
        .await
        .map_err(|e| {
            ApiError::new(
                500,
                "server_error",
                format!("preparing the request failed: {e}"),
            )
        })?;
        let (tokens, opts) = prepared?;
        let (tx, mut rx) = unbounded_channel();
        let has_tools = !opts.tools.is_empty();
        st.engine.submit(Job {
            ticket: Some(ticket),
            prompt_param,
            constraint_param: if has_constraint {
                "response_format"
            } else {
                "tools"
            },
            tokens,
            opts,
            max_tokens: params.max_tokens,
            sampler: params.sampler.clone(),
            events: tx,
        })?;
        let t0 = Instant::now();
        let (prompt_tokens, cached_tokens) = match rx.recv().await {
            Some(Event::Started {
                prompt_tokens,
                cached_tokens,
            }) => (prompt_tokens, cached_tokens),
            Some(Event::Done(Err(e))) => return Err(e),
            _ => {
                return Err(ApiError::new(
                    500,
                    "server_error",
                    "the engine ended the request before starting it",
                ))
            }
        };
        let id = st.id(if kind == Kind::Chat {
            "chatcmpl"
        } else {
            "cmpl"
        });
        Ok(Call {
            created: unix_now(),
            st,
            kind,
            id,
            params,
            has_tools,
            prompt_tokens,
            cached_tokens,
            rx,
            t0,
        })
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Completion, _) => "text_completion",
        }
    }

    fn usage(&self, g: &Generation) -> Value {
        let completion = g.tokens.len();
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        })
    }

    /// Chat's `logprobs.content` entries.
    fn chat_logprobs(&self, lps: &[TokenLogprob]) -> Value {
        let entry = |id: u32, lp: f32| {
            let (token, bytes) = self.st.token_text(id);
            json!({"token": token, "logprob": lp, "bytes": bytes})
        };
        let content: Vec<Value> = lps
            .iter()
            .map(|l| {
                let mut e = entry(l.id, l.logprob);
                e["top_logprobs"] = l.top.iter().map(|&(t, p)| entry(t, p)).collect();
                e
            })
            .collect();
        json!({ "content": content })
    }

    /// Completions' `logprobs`: parallel lists, `text_offset` counted from `start`.
    fn completion_logprobs(&self, lps: &[TokenLogprob], start: usize) -> Value {
        let mut offset = start;
        let mut tokens = vec![];
        let mut offsets = vec![];
        for l in lps {
            let (t, _) = self.st.token_text(l.id);
            offsets.push(offset);
            offset += t.len();
            tokens.push(t);
        }
        json!({
            "tokens": tokens,
            "token_logprobs": lps.iter().map(|l| l.logprob).collect::<Vec<_>>(),
            "top_logprobs": lps.iter().map(|l| {
                l.top.iter().map(|&(t, p)| (self.st.token_text(t).0, json!(p))).collect::<serde_json::Map<_, _>>()
            }).collect::<Vec<_>>(),
            "text_offset": offsets,
        })
    }

    fn tool_calls(&self, g: &Generation) -> Vec<Value> {
        g.tool_calls
            .iter()
            .enumerate()
            .map(|(i, c)| {
                json!({
                    "index": i,
                    "id": format!("call_{}_{i}", self.id),
                    "type": "function",
                    "function": {"name": c.name, "arguments": c.arguments.to_string()},
                })
            })
            .collect()
    }

    fn log_end(&self, g: &Generation) {
        tracing::info!(
            id = %self.id,
            prompt_tokens = self.prompt_tokens,
            completion_tokens = g.tokens.len(),
            stop = g.stop_reason.as_str(),
            tokens_per_s = g.timings.generation_tps(),
            ms = self.t0.elapsed().as_secs_f64() * 1e3,
            "generation"
        );
    }

    /// Waits for the end and answers with one JSON object.
    async fn whole(mut self) -> Response {
        let g = loop {
            match self.rx.recv().await {
                Some(Event::Token { .. }) | Some(Event::Started { .. }) => {}
                Some(Event::Done(Ok(g))) => break g,
                Some(Event::Done(Err(e))) => return e.into_response(),
                None => {
                    return ApiError::new(500, "server_error", "the engine stopped").into_response()
                }
            }
        };
        self.log_end(&g);
        let made_calls = !g.tool_calls.is_empty();
        let finish = finish_reason(g.stop_reason, made_calls);
        let logprobs = self.params.logprobs.map(|_| match self.kind {
            Kind::Chat => self.chat_logprobs(&g.logprobs),
            Kind::Completion => self.completion_logprobs(&g.logprobs, 0),
        });
        let choice = match self.kind {
            Kind::Chat => {
                let mut message = json!({"role": "assistant", "content": g.text});
                if made_calls {
                    message["content"] = Value::Null;
                    message["tool_calls"] = Value::Array(self.tool_calls(&g));
                }
                json!({"index": 0, "message": message, "logprobs": logprobs, "finish_reason": finish})
            }
            Kind::Completion => {
                json!({"index": 0, "text": g.text, "logprobs": logprobs, "finish_reason": finish})
            }
        };
        axum::Json(json!({
            "id": self.id,
            "object": self.object(false),
            "created": self.created,
            "model": self.st.model_id,
            "choices": [choice],
            "usage": self.usage(&g),
        }))
        .into_response()
    }

    fn chunk(&self, choice: Value) -> SseEvent {
        let v = json!({
            "id": self.id,
            "object": self.object(true),
            "created": self.created,
            "model": self.st.model_id,
            "choices": [choice],
        });
        SseEvent::default().data(v.to_string())
    }

    fn delta(&self, text: &str, logprobs: &[TokenLogprob], offset: usize) -> SseEvent {
        let lp = self.params.logprobs.map(|_| match self.kind {
            Kind::Chat => self.chat_logprobs(logprobs),
            Kind::Completion => self.completion_logprobs(logprobs, offset),
        });
        match self.kind {
            Kind::Chat => self.chunk(json!({
                "index": 0, "delta": {"content": text}, "logprobs": lp, "finish_reason": null
            })),
            Kind::Completion => self.chunk(json!({
                "index": 0, "text": text, "logprobs": lp, "finish_reason": null
            })),
        }
    }

    /// The closing events of a stream: a reply held back for tools, the finish reason, usage.
    fn last(&self, g: &Generation, held: &str) -> Vec<SseEvent> {
        let mut out = vec![];
        let made_calls = !g.tool_calls.is_empty();
        if self.kind == Kind::Chat && made_calls {
            out.push(self.chunk(json!({
                "index": 0, "delta": {"tool_calls": self.tool_calls(g)}, "logprobs": null,
                "finish_reason": null
            })));
        } else if !held.is_empty() {
            // Everything was held back: the generation's log-probabilities are the held text's.
            out.push(self.delta(held, &g.logprobs, 0));
        }
        let finish = finish_reason(g.stop_reason, made_calls);
        out.push(match self.kind {
            Kind::Chat => self.chunk(json!({
                "index": 0, "delta": {}, "logprobs": null, "finish_reason": finish
            })),
            Kind::Completion => self.chunk(json!({
                "index": 0, "text": "", "logprobs": null, "finish_reason": finish
            })),
        });
        if self.params.include_usage {
            let v = json!({
                "id": self.id,
                "object": self.object(true),
                "created": self.created,
                "model": self.st.model_id,
                "choices": [],
                "usage": self.usage(g),
            });
            out.push(SseEvent::default().data(v.to_string()));
        }
        out.push(SseEvent::default().data("[DONE]"));
        out
    }

    /// Streams `chat.completion.chunk`s (or completion chunks) ending in `data: [DONE]`. With
    /// tools, the reply is held back until its end, when it is known to be calls or text.
    fn stream(self) -> Response {
        struct S {
            call: Call,
            queue: std::collections::VecDeque<SseEvent>,
            held: String,
            offset: usize,
            done: bool,
        }
        let mut first = std::collections::VecDeque::new();
        if self.kind == Kind::Chat {
            first.push_back(self.chunk(json!({
                "index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null,
                "finish_reason": null
            })));
        }
        let s = S {
            call: self,
            queue: first,
            held: String::new(),
            offset: 0,
            done: false,
        };
        let events = stream::unfold(s, |mut s| async move {
            loop {
                if let Some(e) = s.queue.pop_front() {
                    return Some((Ok::<_, Infallible>(e), s));
                }
                if s.done {
                    return None;
                }
                // Tokens that arrived together go out in one chunk.
                let mut text = String::new();
                let mut lps = vec![];
                let mut end = None;
                match s.call.rx.recv().await {
                    None => {
                        end = Some(Err(ApiError::new(
                            500,
                            "server_error",
                            "the engine stopped",
                        )))
                    }
                    Some(ev) => {
                        let mut ev = Some(ev);
                        while let Some(e) = ev.take() {
                            match e {
                                Event::Token { text: t, logprob } => {
                                    text.push_str(&t);
                                    lps.extend(logprob);
                                }
                                Event::Started { .. } => {}
                                Event::Done(r) => {
                                    end = Some(r);
                                    break;
                                }
                            }
                            ev = s.call.rx.try_recv().ok();
                        }
                    }
                }
                if s.call.has_tools && s.call.kind == Kind::Chat {
                    s.held.push_str(&text);
                } else if !text.is_empty() || !lps.is_empty() {
                    let e = s.call.delta(&text, &lps, s.offset);
                    s.offset += text.len();
                    s.queue.push_back(e);
                }
                match end {
                    Some(Ok(g)) => {
                        s.call.log_end(&g);
                        let held = std::mem::take(&mut s.held);
                        s.queue.extend(s.call.last(&g, &held));
                        s.done = true;
                    }
                    Some(Err(e)) => {
                        s.queue
                            .push_back(SseEvent::default().data(e.body().to_string()));
                        s.done = true;
                    }
                    None => {}
                }
            }
        });
        sse(events)
    }
}

fn sse<S>(events: S) -> Response
where
    S: Stream<Item = Result<SseEvent, Infallible>> + Send + 'static,
{
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}

async fn chat_completions(State(st): State<Arc<AppState>>, req: Request) -> Response {
    let r = match read_json(&st, req, api::parse_chat).await {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let mut opts = llama_core::GenerateOptions::default();
    opts.stop = r.params.stop.clone();
    opts.logprobs = r.params.logprobs;
    opts.constraint = r.constraint;
    opts.tools = r.tools;
    opts.tool_choice = r.tool_choice;
    let stream = r.params.stream;
    match Call::start(
        st,
        Kind::Chat,
        OwnedPrompt::Chat(r.messages),
        r.params,
        opts,
    )
    .await
    {
        Ok(c) if stream => c.stream(),
        Ok(c) => c.whole().await,
        Err(e) => e.into_response(),
    }
}

async fn completions(State(st): State<Arc<AppState>>, req: Request) -> Response {
    let r = match read_json(&st, req, api::parse_completion).await {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let mut opts = llama_core::GenerateOptions::default();
    opts.stop = r.params.stop.clone();
    opts.logprobs = r.params.logprobs;
    opts.constraint = r.constraint;
    let prompt = match r.prompt {
        PromptInput::Text(t) => OwnedPrompt::Text(t),
        PromptInput::Tokens(t) => OwnedPrompt::Tokens(t),
    };
    let stream = r.params.stream;
    match Call::start(st, Kind::Completion, prompt, r.params, opts).await {
        Ok(c) if stream => c.stream(),
        Ok(c) => c.whole().await,
        Err(e) => e.into_response(),
    }
}

/// Sets a flag when dropped: a handler's future dropped by a client that went away stops its
/// blocking work.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

async fn embeddings(State(st): State<Arc<AppState>>, req: Request) -> Response {
    let r = match read_json(&st, req, api::parse_embeddings).await {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    match embed(&st, r).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn embed(st: &Arc<AppState>, r: api::EmbeddingRequest) -> Result<Response, ApiError> {
    let n_ctx = st.engine.n_ctx();
    let n_vocab = st.model.config().vocab_size;
    for (i, input) in r.inputs.iter().enumerate() {
        match input {
            PromptInput::Text(t) => st.check_length(t.len(), "input").map_err(|e| ApiError {
                message: format!("input {i}: {}", e.message),
                ..e
            })?,
            PromptInput::Tokens(t) => {
                if let Some(bad) = t.iter().find(|&&id| id as usize >= n_vocab) {
                    return Err(ApiError::invalid(
                        "input",
                        format!("input {i} holds token {bad}, outside the vocabulary of {n_vocab}"),
                    ));
                }
            }
        }
    }
    // A place in the queue while the inputs are tokenized and wait for the model.
    let ticket = st.engine.reserve()?;
    let turn = st.prepare_turn().await?;
    let model = st.model.clone();
    let inputs = r.inputs;
    let ids = tokio::task::spawn_blocking(move || {
        let _turn = turn;
        let mut ids = Vec::with_capacity(inputs.len());
        for (i, input) in inputs.into_iter().enumerate() {
            let t = match input {
                PromptInput::Text(t) => model
                    .tokenize(&t, true, false)
                    .map_err(|e| core_error(&e).param_if_unset("input"))?,
                PromptInput::Tokens(t) => t,
            };
            if t.len() > n_ctx {
                return Err(ApiError::invalid(
                    "input",
                    format!(
                        "input {i} is {} tokens, above the context of {n_ctx}",
                        t.len()
                    ),
                )
                .code("context_length_exceeded"));
            }
            ids.push(t);
        }
        Ok(ids)
    })
    .await
    .map_err(|e| ApiError::new(500, "server_error", format!("tokenizing failed: {e}")))??;
    // Embeddings wait for one another (they share the compute threads with decode).
    let _permit = st
        .embed
        .acquire()
        .await
        .map_err(|_| ApiError::new(503, "server_error", "the server is shutting down"))?;
    drop(ticket);
    let model = st.model.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let guard = CancelOnDrop(stop.clone());
    let work = tokio::task::spawn_blocking(move || {
        ids.iter()
            .map(|t| {
                let e = model.embed_tokens_with(t, &mut || stop.load(Ordering::SeqCst))?;
                let mut v = e.mean;
                let norm = v
                    .iter()
                    .map(|x| (*x as f64) * (*x as f64))
                    .sum::<f64>()
                    .sqrt();
                if norm > 0.0 {
                    v.iter_mut().for_each(|x| *x = (*x as f64 / norm) as f32);
                }
                Ok((v, t.len()))
            })
            .collect::<llama_core::Result<Vec<_>>>()
    });
    let out = match work.await {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => return Err(core_error(&e).param_if_unset("input")),
        Err(e) => {
            return Err(ApiError::new(
                500,
                "server_error",
                format!("embedding failed: {e}"),
            ))
        }
    };
    drop(guard);
    let tokens: usize = out.iter().map(|(_, n)| n).sum();
    let data: Vec<Value> = out
        .into_iter()
        .enumerate()
        .map(|(i, (v, _))| {
            let embedding = if r.base64 {
                use base64::Engine as _;
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    Ok(axum::Json(json!({
        "object": "list",
        "data": data,
        "model": st.model_id,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }))
    .into_response())
}
