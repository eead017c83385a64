//! `llama serve`: an OpenAI-compatible HTTP server over llama-core's batched decode.
//!
//! Every chat and completion request becomes a sequence of one [`llama_core::Batch`], owned by
//! the engine thread ([`engine`]): all of them advance together, one forward pass per step,
//! each with its own sampler, stop strings, constraint and cache, and each gives exactly the
//! tokens it gives alone. Endpoints: `/v1/chat/completions`, `/v1/completions` (both stream as
//! server-sent events), `/v1/embeddings`, `/v1/models`, `/health`, `/metrics` (Prometheus
//! text) and a chat page at `/`. Request parsing lives in [`api`] (fuzzed by the crate's
//! tests).

pub mod access;
pub mod api;
mod completion;
pub mod conn;
pub mod engine;
mod http;
mod routes;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

pub use access::HostPolicy;
pub use api::ApiError;
pub use conn::ConnLimits;
pub use engine::{Engine, Limits, Metrics};
pub use http::AppState;
pub use routes::router;

/// The request-body limits the handlers apply.
pub mod http_limits {
    pub use crate::http::{BODY_BUDGET, PREPARE_AT_ONCE, SMALL_BODY};
}

/// How to run the server.
#[derive(Clone)]
pub struct ServerConfig {
    /// Address to listen on (default 127.0.0.1:8080).
    pub addr: SocketAddr,
    /// The id `/v1/models` gives the model.
    pub model_id: String,
    /// When set, `/v1/*` and `/metrics` need `Authorization: Bearer <key>` (an empty key is
    /// refused: it would turn the check off without saying so).
    pub api_key: Option<String>,
    /// Largest request body in bytes.
    pub max_body: usize,
    /// A request body must arrive within this (else 408).
    pub body_timeout: Duration,
    /// Connections: how many, and their header-read and idle timeouts.
    pub connections: ConnLimits,
    /// Host names answered besides localhost and the bound address (`--allow-host`; `*`: any).
    pub allow_hosts: Vec<String>,
    /// The engine's limits.
    pub limits: Limits,
    /// After SIGTERM or Ctrl-C, how long running requests may go on before they are cut off.
    pub shutdown_grace: Duration,
    /// Origins whose web pages may call the API (CORS; `*`: any). Empty: same origin only.
    pub cors: Vec<String>,
}

/// `app` answering cross-origin requests (and their preflight `OPTIONS`) from `origins` (`*`:
/// any); unchanged when `origins` is empty.
pub fn with_cors(app: axum::Router, origins: &[String]) -> Result<axum::Router, String> {
    use axum::http::{header, HeaderValue, Method};
    use tower_http::cors::{AllowOrigin, CorsLayer};
    if origins.is_empty() {
        return Ok(app);
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        let list = origins
            .iter()
            .map(|o| HeaderValue::from_str(o).map_err(|_| format!("bad CORS origin {o:?}")))
            .collect::<Result<Vec<_>, _>>()?;
        AllowOrigin::list(list)
    };
    Ok(app.layer(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST])
            .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE]),
    ))
}

impl ServerConfig {
    /// The defaults for `model_id` on `addr`: no key, 4 MiB bodies read within 30 s, 512
    /// connections, no extra hosts or CORS origins, 30 s of shutdown grace.
    pub fn new(addr: SocketAddr, model_id: impl Into<String>, limits: Limits) -> ServerConfig {
        ServerConfig {
            addr,
            model_id: model_id.into(),
            api_key: None,
            max_body: 4 << 20,
            body_timeout: Duration::from_secs(30),
            connections: ConnLimits::default(),
            allow_hosts: vec![],
            limits,
            shutdown_grace: Duration::from_secs(30),
            cors: vec![],
        }
    }
}

/// Loads nothing: serves `model` until SIGTERM or Ctrl-C, then stops taking requests, lets the
/// running ones finish (cutting off those still running after the grace period) and returns.
/// `ready` is called with the bound address once the server listens.
pub fn run(
    model: &llama_core::Model,
    config: ServerConfig,
    ready: impl FnOnce(SocketAddr),
) -> Result<(), Box<dyn std::error::Error>> {
    run_until(model, config, ready, wait_for_signal())
}

/// [`run`], shutting down when `shutdown` resolves instead of on a signal.
pub fn run_until(
    model: &llama_core::Model,
    config: ServerConfig,
    ready: impl FnOnce(SocketAddr),
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), Box<dyn std::error::Error>> {
    if config
        .api_key
        .as_deref()
        .is_some_and(|k| k.trim().is_empty())
    {
        return Err("the API key is empty: give a real key, or none to serve without one".into());
    }
    let hosts = HostPolicy::new(config.addr.ip(), &config.allow_hosts)?;
    let mut connections = config.connections.clone();
    if let Some(files) = conn::raise_file_limit() {
        // Room for the model file, the engine and the listener besides the connections.
        let room = files.saturating_sub(64).max(1) as usize;
        if connections.max_connections > room {
            tracing::warn!(
                max_connections = connections.max_connections,
                file_limit = files,
                "fewer connections than asked for: the process may open {files} files"
            );
            connections.max_connections = room;
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("llama-http")
        .build()?;
    let engine = Engine::start(model, config.limits.clone())?;
    let state = Arc::new(
        AppState::new(
            model.clone(),
            engine,
            config.model_id.clone(),
            config.api_key.clone(),
        )
        .with_access(hosts, config.cors.clone())
        .with_body_limits(config.max_body, config.body_timeout),
    );
    let app = with_cors(router(state.clone(), config.max_body), &config.cors)?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(config.addr)
            .await
            .map_err(|e| format!("cannot listen on {}: {e}", config.addr))?;
        let addr = listener.local_addr()?;
        tracing::info!(%addr, model = %config.model_id, "listening");
        ready(addr);
        let st = state.clone();
        let grace = config.shutdown_grace;
        let shutdown = async move {
            shutdown.await;
            tracing::info!(
                running = st
                    .engine
                    .metrics
                    .active
                    .load(std::sync::atomic::Ordering::Relaxed),
                grace_s = grace.as_secs_f64(),
                "shutting down: finishing running requests"
            );
            st.engine.close();
            let st2 = st.clone();
            tokio::spawn(async move {
                tokio::time::sleep(grace).await;
                tracing::warn!("grace period over: cutting off running requests");
                st2.engine.cancel_all();
            });
        };
        // Connections get the grace period and a little more to deliver their last events.
        conn::serve(
            listener,
            app,
            connections,
            shutdown,
            grace + Duration::from_secs(5),
        )
        .await;
        Ok::<_, Box<dyn std::error::Error>>(())
    })?;
    state.engine.cancel_all();
    state.engine.join();
    rt.shutdown_timeout(Duration::from_secs(1));
    tracing::info!("stopped");
    Ok(())
}

async fn wait_for_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
