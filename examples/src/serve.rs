//! `llama serve`: the OpenAI-compatible server (llama-server crate) on a loaded model.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use clap::Args;
use llama_core::{KvCacheType, SessionOptions};
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
    /// Require `Authorization: Bearer KEY` on /v1/* and /metrics.
    #[arg(long, env = "LLAMA_API_KEY")]
    api_key: Option<String>,
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
    /// KV cache precision: f16 or f32.
    #[arg(long, default_value = "f16")]
    kv_type: String,
    /// The model id /v1/models gives (default: the file's name).
    #[arg(long)]
    alias: Option<String>,
    /// After SIGTERM or Ctrl-C, seconds running requests may go on before they are cut off.
    #[arg(long, default_value_t = 30.0)]
    shutdown_grace: f64,
    /// Let web pages of this origin call the API (CORS; repeatable; `*` for any origin).
    #[arg(long = "cors", value_name = "ORIGIN")]
    cors: Vec<String>,
    /// Log one JSON object per line instead of text.
    #[arg(long)]
    pub(crate) log_json: bool,
}

pub(crate) fn run(a: ServeArgs) -> AnyResult<()> {
    if a.max_sequences == 0 || a.max_tokens == 0 {
        return Err("--max-sequences and --max-tokens must be at least 1".into());
    }
    if !(a.shutdown_grace >= 0.0 && a.shutdown_grace.is_finite()) {
        return Err("--shutdown-grace must be a number of seconds".into());
    }
    let model = load(&a.model)?;
    let adapters = lora::load_all(&model, &a.model.lora)?;
    let id = a.alias.clone().unwrap_or_else(|| {
        let p = a.model.model.clone().unwrap_or_default();
        p.file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "SmolLM2-135M-Instruct".into())
    });
    let mut session = SessionOptions::default();
    session.n_ctx = a.model.n_ctx;
    session.kv_type = KvCacheType::parse(&a.kv_type)?;
    let config = ServerConfig {
        addr: SocketAddr::new(a.host, a.port),
        model_id: id,
        api_key: a.api_key.filter(|k| !k.is_empty()),
        max_body: a.max_body,
        limits: Limits {
            max_sequences: a.max_sequences,
            max_queue: a.max_queue,
            max_tokens: a.max_tokens,
            session,
            adapters,
        },
        shutdown_grace: Duration::from_secs_f64(a.shutdown_grace),
        cors: a.cors,
    };
    llama_server::run(&model, config, |addr| {
        // On stdout, for scripts that start the server on port 0.
        println!("listening on http://{addr}");
    })
}
