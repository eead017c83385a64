//! `llama serve`: the OpenAI-compatible server (llama-server crate) on a loaded model.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use clap::Args;
use llama_core::SessionOptions;
use llama_server::{Limits, ServerConfig};

use crate::{load, lora, AnyResult, ModelArg};

#[derive(Args)]
pub(crate) struct ServeArgs {
    #[command(flatten)]
    model: ModelArg,
    /// Address to bind (127.0.0.1: this machine only).
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// Port (0: any free port; the address is printed).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Require `Authorization: Bearer KEY` on /v1/* and /metrics (an empty key is an error).
    #[arg(long, env = "LLAMA_API_KEY")]
    api_key: Option<String>,
    /// Also answer requests whose Host is this name (repeatable; `.example.com` for a domain
    /// and its subdomains; `*` for any). localhost and the bound address are always answered.
    #[arg(long = "allow-host", value_name = "NAME")]
    allow_host: Vec<String>,
    /// Most connections open at once (bounded by the process's file limit).
    #[arg(long, default_value_t = 512)]
    max_connections: usize,
    /// Seconds a client has to send a request's headers (and a kept-alive connection its next
    /// request).
    #[arg(long, default_value_t = 10.0)]
    header_timeout: f64,
    /// Seconds a client has to send a request's body.
    #[arg(long, default_value_t = 30.0)]
    body_timeout: f64,
    /// Seconds a connection may sit with no request running and no bytes moving.
    #[arg(long, default_value_t = 60.0)]
    idle_timeout: f64,
    /// Sequences decoded together in one forward pass.
    #[arg(long, default_value_t = 16)]
    max_sequences: usize,
    /// Requests waiting for a place in the batch; more get 429.
    #[arg(long, default_value_t = 64)]
    max_queue: usize,
    /// Most tokens one request may ask for (a request is also bounded by the context).
    #[arg(long, default_value_t = 4096)]
    max_tokens: usize,
    /// Largest request body, in bytes.
    #[arg(long, default_value_t = 4 << 20)]
    max_body: usize,
    /// The model id /v1/models gives (default: the file's name).
    #[arg(long)]
    alias: Option<String>,
    /// After SIGTERM or Ctrl-C, seconds running requests may go on before they are cut off.
    #[arg(long, default_value_t = 30.0)]
    shutdown_grace: f64,
    /// Let web pages of this origin call the API (CORS; repeatable; `*` for any origin).
    #[arg(long = "cors", value_name = "ORIGIN")]
    cors: Vec<String>,
    /// Speculative decoding for every request (a request's `prediction` drafts from its own
    /// text); replies are the same as without it.
    #[command(flatten)]
    speculation: crate::SpeculationArgs,
    /// Log one JSON object per line instead of text.
    #[arg(long)]
    pub(crate) log_json: bool,
}

pub(crate) fn run(a: ServeArgs) -> AnyResult<()> {
    if a.max_sequences == 0 || a.max_tokens == 0 {
        return Err("--max-sequences and --max-tokens must be at least 1".into());
    }
    let secs = |v: f64, name: &str| -> AnyResult<Duration> {
        if (0.0..1e9).contains(&v) {
            Ok(Duration::from_secs_f64(v))
        } else {
            Err(format!("{name} must be a number of seconds").into())
        }
    };
    let grace = secs(a.shutdown_grace, "--shutdown-grace")?;
    let header = secs(a.header_timeout, "--header-timeout")?;
    let body = secs(a.body_timeout, "--body-timeout")?;
    let idle = secs(a.idle_timeout, "--idle-timeout")?;
    if header.is_zero() || body.is_zero() || idle.is_zero() || a.max_connections == 0 {
        return Err(
            "--header-timeout, --body-timeout, --idle-timeout and --max-connections must be above 0"
                .into(),
        );
    }
    if a.api_key.as_deref().is_some_and(|k| k.trim().is_empty()) {
        return Err("the API key (--api-key or LLAMA_API_KEY) is empty: give a real key, or unset it to serve without one".into());
    }
    llama_server::HostPolicy::new(a.host, &a.allow_host)?;
    let model = load(&a.model)?;
    let adapters = lora::load_all(&model, &a.model.lora)?;
    let id = a.alias.clone().unwrap_or_else(|| {
        let p = a.model.model.clone().unwrap_or_default();
        p.file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "SmolLM2-135M-Instruct".into())
    });
    let mut session = a.model.kv.apply(SessionOptions::default());
    session.n_ctx = a.model.n_ctx;
    let config = ServerConfig {
        api_key: a.api_key,
        max_body: a.max_body,
        body_timeout: body,
        connections: llama_server::ConnLimits {
            max_connections: a.max_connections,
            header_timeout: header,
            idle_timeout: idle,
        },
        allow_hosts: a.allow_host,
        shutdown_grace: grace,
        cors: a.cors,
        ..ServerConfig::new(
            SocketAddr::new(a.host, a.port),
            id,
            Limits {
                max_sequences: a.max_sequences,
                max_queue: a.max_queue,
                max_tokens: a.max_tokens,
                session,
                adapters,
                draft: a.speculation.draft()?,
                draft_max: a.speculation.draft_max,
            },
        )
    };
    llama_server::run(&model, config, |addr| {
        // On stdout, for scripts that start the server on port 0.
        println!("listening on http://{addr}");
    })
}
