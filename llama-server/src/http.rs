//! Routes, handlers and OpenAI's response shapes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Response};
use llama_core::Model;
use serde_json::{json, Value};

use crate::access::HostPolicy;
use crate::api::ApiError;
use crate::engine::Engine;

/// What every handler shares.
pub struct AppState {
    /// The model.
    pub model: Model,
    /// The engine.
    pub engine: Engine,
    pub(crate) model_id: String,
    api_key: Option<String>,
    created: u64,
    next_id: AtomicU64,
    /// Every token's bytes (for log-probabilities and the length bound below).
    token_bytes: Vec<Vec<u8>>,
    /// Longest text one token stands for, in bytes: a text longer than the context times
    /// this cannot fit, and is refused before it is tokenized.
    max_token_bytes: usize,
    /// One embeddings computation at a time (they share the compute threads with decode).
    pub(crate) embed: tokio::sync::Semaphore,
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
    pub(crate) fn check_length(&self, bytes: usize, param: &str) -> Result<(), ApiError> {
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
    pub(crate) async fn prepare_turn(&self) -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
        self.prepare
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| ApiError::new(503, "server_error", "the server is shutting down"))
    }

    pub(crate) fn id(&self, prefix: &str) -> String {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        format!("{prefix}-{:x}{n:06x}", self.created)
    }

    pub(crate) fn token_text(&self, id: u32) -> (String, Vec<u8>) {
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

pub(crate) fn unix_now() -> u64 {
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

pub(crate) async fn log_requests(
    State(st): State<Arc<AppState>>,
    req: Request,
    next: Next,
) -> Response {
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
pub(crate) async fn guard(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
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

pub(crate) async fn auth(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
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

pub(crate) async fn not_found(req: Request) -> ApiError {
    ApiError::new(
        404,
        "invalid_request_error",
        format!("no route {} {}", req.method(), req.uri().path()),
    )
    .code("not_found")
}

pub(crate) async fn method_not_allowed(req: Request) -> ApiError {
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
pub(crate) async fn read_json<T>(
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

pub(crate) async fn page() -> Html<&'static str> {
    Html(include_str!("page.html"))
}

pub(crate) async fn health(State(st): State<Arc<AppState>>) -> Response {
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

pub(crate) async fn models(State(st): State<Arc<AppState>>) -> axum::Json<Value> {
    axum::Json(json!({"object": "list", "data": [model_object(&st)]}))
}

pub(crate) async fn model_by_id(
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

pub(crate) async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    let m = &st.engine.metrics;
    let r = |a: &AtomicU64| a.load(Ordering::Relaxed).to_string();
    let g = |a: &std::sync::atomic::AtomicUsize| a.load(Ordering::Relaxed).to_string();
    const C: &str = "counter";
    const G: &str = "gauge";
    #[rustfmt::skip]
    let rows: [(&str, &str, &str, String); 13] = [
        ("prompt_tokens_total", C, "Prompt tokens of admitted requests.", r(&m.prompt_tokens)),
        ("prompt_tokens_cached_total", C, "Prompt tokens taken from the prefix cache instead of being read.", r(&m.cached_tokens)),
        ("generated_tokens_total", C, "Tokens generated.", r(&m.generated_tokens)),
        ("tokens_per_second", G, "Tokens generated per second over the last 10 seconds.", format!("{:.3}", m.tokens_per_second())),
        ("active_sequences", G, "Sequences in the batch.", g(&m.active)),
        ("queue_length", G, "Requests waiting for a place in the batch.", g(&m.queued)),
        ("max_sequences", G, "Sequences decoded together at most.", st.engine.limits().max_sequences.to_string()),
        ("forward_passes_total", C, "Batched forward passes run.", r(&m.steps)),
        ("requests_admitted_total", C, "Generation requests admitted to the batch.", r(&m.admitted)),
        ("requests_rejected_total", C, "Generation requests refused because the queue was full.", r(&m.rejected)),
        ("requests_disconnected_total", C, "Sequences ended because their client went away.", r(&m.disconnected)),
        ("http_requests_total", C, "HTTP requests answered.", r(&st.requests)),
        ("http_errors_total", C, "HTTP requests answered with a status of 400 or more.", r(&st.errors)),
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
