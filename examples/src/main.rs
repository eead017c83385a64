//! `llama`: command-line front end of llama-core.

mod bench;
mod default_model;
mod finetune;
mod lora;
mod serve;

use std::io::{BufRead, Read, Write};
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::Instant;

use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use llama_core::convert::{gguf_to_hf, DenseType};
use llama_core::quantize::{quantize_model, FileType, QuantizeOptions};
use llama_core::{
    Constraint, GenerateOptions, Generation, KvCacheType, Message, Model, ModelOptions, Sampler,
    SamplerConfig, Session, SessionOptions, Tool, ToolChoice,
};
use serde_json::json;

#[derive(Parser)]
#[command(
    name = "llama",
    version,
    about = "Run Llama-family models locally (GGUF or Hugging Face folders)"
)]
struct Cli {
    /// Compute threads (0: one per physical core). Also sizes candle's own threading
    /// (RAYON_NUM_THREADS) for dense f32 weights and --kernel candle.
    #[arg(short = 't', long, global = true, env = "LLAMA_THREADS")]
    threads: Option<usize>,
    /// Kernel path: auto, scalar, avx2, vnni256, avx512, or candle (candle's kernels and
    /// tensor operations throughout, for comparison).
    #[arg(long, global = true, env = "LLAMA_CORE_KERNEL", default_value = "auto")]
    kernel: String,
    /// Keep the file's row layout instead of regrouping weight rows for the SIMD kernels
    /// (slower; for comparing layouts).
    #[arg(long, global = true, env = "LLAMA_CORE_NO_REPACK", value_parser = clap::builder::FalseyValueParser::new())]
    keep_file_layout: bool,
    /// Log details to stderr (-v debug, -vv trace). LLAMA_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Continue a prompt (special tokens in the prompt are parsed).
    Generate(GenerateArgs),
    /// Chat with the model's own template (interactive, or one turn with --prompt).
    Chat(ChatArgs),
    /// Print the token ids of a text.
    Tokenize(TokenizeArgs),
    /// Write a GGUF file (quantized, f16 or f32) from a GGUF file or a Hugging Face folder.
    Quantize(QuantizeArgs),
    /// Write a Hugging Face folder (safetensors + config + tokenizer) from a GGUF file.
    ExportHf(ExportArgs),
    /// Perplexity of a text file (llama.cpp's method: windows of n_ctx, second half scored).
    Perplexity(PerplexityArgs),
    /// Measure prompt and decode speed, time to first token, load time and peak memory.
    Bench(bench::BenchArgs),
    /// Train a LoRA adapter (QLoRA on quantized bases) on JSONL data.
    Finetune(finetune::FinetuneArgs),
    /// Train a LoRA adapter on a student model to match a teacher's next-token distribution.
    Distill(finetune::DistillArgs),
    /// LoRA adapters: merge them into a model, or convert between PEFT and GGUF LoRA.
    #[command(subcommand)]
    Lora(lora::LoraCmd),
    /// Serve the model over HTTP: an OpenAI-compatible API (chat, completions, embeddings)
    /// with batched decode, and a chat page at /.
    Serve(serve::ServeArgs),
    /// Print the path of the default model, fetching it if needed.
    FetchModel,
}

#[derive(Args, Clone)]
struct ModelArg {
    /// A .gguf file or a Hugging Face folder; default: SmolLM2-135M-Instruct (fetched once).
    #[arg(short, long)]
    model: Option<PathBuf>,
    /// Context size (0: 4096 or the model's if smaller).
    #[arg(long, default_value_t = 0)]
    n_ctx: usize,
    /// Quantize dense weights while loading (q8_0, q4_0, q4_1, q5_0, q5_1, q4_k, q5_k, q6_k).
    #[arg(long)]
    quantize: Option<String>,
    /// A LoRA adapter (PEFT folder or GGUF LoRA file), optionally with a scale (default 1):
    /// PATH or PATH:SCALE. Repeatable: the adapters apply together.
    #[arg(long = "lora", value_name = "PATH[:SCALE]")]
    lora: Vec<String>,
    #[command(flatten)]
    kv: KvArgs,
}

/// How the KV cache stores keys and values.
#[derive(Args, Clone, Default)]
pub(crate) struct KvArgs {
    /// KV cache type for keys and values: f16, f32, q8_0 or q4_0 (llama.cpp's blocks,
    /// Hadamard-rotated: 53% and 28% of f16's memory).
    #[arg(long, value_name = "TYPE", default_value = "f16")]
    kv_type: KvCacheType,
    /// KV cache type for keys only (overrides --kv-type).
    #[arg(long, value_name = "TYPE")]
    kv_type_k: Option<KvCacheType>,
    /// KV cache type for values only (overrides --kv-type).
    #[arg(long, value_name = "TYPE")]
    kv_type_v: Option<KvCacheType>,
}

impl KvArgs {
    /// The key and value types.
    pub(crate) fn types(&self) -> (KvCacheType, KvCacheType) {
        (
            self.kv_type_k.unwrap_or(self.kv_type),
            self.kv_type_v.unwrap_or(self.kv_type),
        )
    }
    /// `o` with these types.
    pub(crate) fn apply(&self, o: SessionOptions) -> SessionOptions {
        let (k, v) = self.types();
        o.kv_type_k(k).kv_type_v(v)
    }
}

#[derive(Args, Clone)]
struct SamplingArgs {
    /// Most tokens to generate.
    #[arg(short = 'n', long, default_value_t = 256)]
    max_tokens: usize,
    /// Temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    #[arg(long, default_value_t = 40)]
    top_k: i32,
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    #[arg(long, default_value_t = 0.05)]
    min_p: f32,
    #[arg(long, default_value_t = 1.0)]
    repeat_penalty: f32,
    #[arg(long, default_value_t = 64)]
    repeat_last_n: i32,
    /// Random seed (default: from the clock).
    #[arg(long)]
    seed: Option<u64>,
    /// Stop when this string appears (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    json: bool,
    /// Constrain the output to JSON valid under this JSON Schema (a file, or the schema itself).
    #[arg(long, value_name = "FILE_OR_JSON", group = "constraint")]
    json_schema: Option<String>,
    /// Constrain the output to a grammar file: llama.cpp GBNF (.gbnf, or `root ::=` inside) or
    /// llguidance Lark (.lark, or anything else).
    #[arg(long, value_name = "FILE", group = "constraint")]
    grammar: Option<PathBuf>,
    /// Constrain the output to match this regular expression.
    #[arg(long, value_name = "RE", group = "constraint")]
    regex: Option<String>,
    /// Constrain the output to one of these comma-separated choices.
    #[arg(
        long,
        value_name = "A,B,C",
        group = "constraint",
        value_delimiter = ','
    )]
    choice: Option<Vec<String>>,
    #[command(flatten)]
    speculation: SpeculationArgs,
}

/// Speculative decoding: the output is exactly that of plain decoding with the same seed.
#[derive(Args, Clone)]
pub struct SpeculationArgs {
    /// Speculative decoding with this draft model (a .gguf file or a Hugging Face folder with
    /// the model's vocabulary, e.g. a smaller quantization of it).
    #[arg(long, value_name = "PATH", group = "speculation")]
    pub draft: Option<PathBuf>,
    /// Speculative decoding with prompt lookup: drafts copied from where the last tokens
    /// occurred before in the prompt or the output.
    #[arg(long, group = "speculation")]
    pub lookup: bool,
    /// Speculative decoding from this predicted output (the text you expect, mostly).
    #[arg(long, value_name = "TEXT", group = "speculation")]
    pub prediction: Option<String>,
    /// Most tokens drafted per verification.
    #[arg(long, value_name = "N", default_value_t = 8)]
    pub draft_max: usize,
}

impl SpeculationArgs {
    /// The draft source the flags ask for (a draft model is loaded here).
    pub fn draft(&self) -> AnyResult<Option<llama_core::Draft>> {
        use llama_core::Draft;
        if let Some(p) = &self.draft {
            let m = Model::load(p, llama_core::ModelOptions::default())
                .map_err(|e| format!("cannot load the draft model {}: {e}", p.display()))?;
            return Ok(Some(Draft::Model(m)));
        }
        if self.lookup {
            return Ok(Some(Draft::Lookup));
        }
        Ok(self.prediction.clone().map(Draft::Prediction))
    }
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArg,
    /// The prompt.
    #[arg(short, long)]
    prompt: String,
    #[command(flatten)]
    sampling: SamplingArgs,
}

#[derive(Args)]
struct ChatArgs {
    #[command(flatten)]
    model: ModelArg,
    /// System message.
    #[arg(long)]
    system: Option<String>,
    /// One user turn (non-interactive).
    #[arg(short, long)]
    prompt: Option<String>,
    /// Tools the model may call: a JSON file with a list in OpenAI's shape
    /// (`[{"type": "function", "function": {"name", "description", "parameters"}}]`).
    #[arg(long, value_name = "FILE")]
    tools: Option<PathBuf>,
    /// With --tools: auto (default), required, none, or a tool's name.
    #[arg(long, value_name = "CHOICE")]
    tool_choice: Option<String>,
    /// Parse special-token text typed into messages (`<|im_end|>` ...) as control tokens;
    /// by default message text is plain text whatever it holds.
    #[arg(long)]
    parse_special_in_content: bool,
    #[command(flatten)]
    sampling: SamplingArgs,
}

#[derive(Args)]
struct TokenizeArgs {
    #[command(flatten)]
    model: ModelArg,
    /// Parse special-token text into special ids.
    #[arg(long)]
    special: bool,
    /// Do not add BOS even if the model asks for it.
    #[arg(long)]
    no_bos: bool,
    /// Print {"ids": [...]}.
    #[arg(long)]
    json: bool,
    /// The text; `-` reads standard input.
    text: String,
}

#[derive(Args)]
struct PerplexityArgs {
    /// A .gguf file or a Hugging Face folder; default: SmolLM2-135M-Instruct.
    #[arg(short, long)]
    model: Option<PathBuf>,
    /// The text file.
    #[arg(short, long)]
    file: PathBuf,
    /// Window size in tokens.
    #[arg(long, default_value_t = 512)]
    n_ctx: usize,
    /// Evaluate at most this many windows.
    #[arg(long)]
    chunks: Option<usize>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// A LoRA adapter, PATH or PATH:SCALE (repeatable).
    #[arg(long = "lora", value_name = "PATH[:SCALE]")]
    lora: Vec<String>,
    #[command(flatten)]
    kv: KvArgs,
}

#[derive(Clone, Copy, ValueEnum)]
enum OutType {
    F32,
    F16,
}

#[derive(Args)]
struct QuantizeArgs {
    /// A .gguf file or a Hugging Face folder.
    input: PathBuf,
    /// The GGUF file to write.
    output: PathBuf,
    /// f32, f16, q8_0, q6_k, q5_k, q5_1, q5_0, q4_k, q4_1 or q4_0.
    #[arg(long = "type")]
    ty: String,
    /// Type of the output head (default: q6_k, or q8_0 when rows are not a multiple of 256).
    #[arg(long)]
    output_type: Option<String>,
    /// Type of an untied token embedding (default: --type).
    #[arg(long)]
    embedding_type: Option<String>,
}

#[derive(Args)]
struct ExportArgs {
    input: PathBuf,
    output: PathBuf,
    #[arg(long = "type", value_enum, default_value = "f32")]
    ty: OutType,
}

fn main() {
    let cli = Cli::parse();
    // The server logs its requests (info) by default; other commands only warnings.
    let (quiet, json) = match &cli.cmd {
        Cmd::Serve(a) => ("info", a.log_json),
        _ => ("warn", false),
    };
    let filter = std::env::var("LLAMA_LOG").unwrap_or_else(|_| {
        match cli.verbose {
            0 => quiet,
            1 => "debug",
            _ => "trace",
        }
        .to_string()
    });
    let logs = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if json {
        logs.json().flatten_event(true).init();
    } else {
        logs.init();
    }
    if let Some(n) = cli.threads.filter(|&n| n > 0) {
        // Read by candle's own thread pool when it starts (before any model work); llama-core
        // takes the count through its options.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    let compute = llama_core::Kernel::parse(&cli.kernel).map(|kernel| Compute {
        threads: cli.threads.unwrap_or(0),
        kernel,
        keep_file_layout: cli.keep_file_layout,
    });
    if let Err(e) = compute
        .map_err(Into::into)
        .and_then(|c| {
            COMPUTE
                .set(c)
                .map_err(|_| "compute options set twice".into())
        })
        .and_then(|()| run(cli))
    {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

pub(crate) type AnyResult<T> = Result<T, Box<dyn std::error::Error>>;

/// The global compute options (`--threads`, `--kernel`, `--keep-file-layout`).
#[derive(Clone, Copy)]
struct Compute {
    threads: usize,
    kernel: llama_core::Kernel,
    keep_file_layout: bool,
}

static COMPUTE: std::sync::OnceLock<Compute> = std::sync::OnceLock::new();

/// Model options with the global compute options applied.
pub(crate) fn model_options<'a>() -> ModelOptions<'a> {
    let c = COMPUTE.get().copied().unwrap_or(Compute {
        threads: 0,
        kernel: llama_core::Kernel::Auto,
        keep_file_layout: false,
    });
    let mut o = ModelOptions::default()
        .with_kernel(c.kernel)
        .with_threads(c.threads);
    o.keep_file_layout = c.keep_file_layout;
    o
}

fn run(cli: Cli) -> AnyResult<()> {
    match cli.cmd {
        Cmd::Generate(a) => generate(a),
        Cmd::Chat(a) => chat(a),
        Cmd::Tokenize(a) => tokenize(a),
        Cmd::Quantize(a) => quantize(a, cli.threads),
        Cmd::ExportHf(a) => {
            let bar = bar("exporting");
            gguf_to_hf(&a.input, &a.output, dense(a.ty), |i, n| {
                progress(&bar, i, n)
            })?;
            bar.finish_and_clear();
            eprintln!("wrote {}", a.output.display());
            Ok(())
        }
        Cmd::Perplexity(a) => perplexity(a),
        Cmd::Bench(a) => bench::run(a, model_options(), default_model::path),
        Cmd::Lora(c) => lora::run(c, cli.threads),
        Cmd::Finetune(a) => finetune::finetune(a),
        Cmd::Distill(a) => finetune::distill(a),
        Cmd::Serve(a) => serve::run(a),
        Cmd::FetchModel => {
            println!("{}", default_model::path()?.display());
            Ok(())
        }
    }
}

fn quantize(a: QuantizeArgs, threads: Option<usize>) -> AnyResult<()> {
    let mut opts = QuantizeOptions::new(FileType::parse(&a.ty)?);
    opts.output_type = a.output_type.as_deref().map(FileType::parse).transpose()?;
    opts.embedding_type = a
        .embedding_type
        .as_deref()
        .map(FileType::parse)
        .transpose()?;
    opts.threads = threads.unwrap_or(0);
    let t0 = Instant::now();
    let bar = bar("quantizing");
    let report = quantize_model(&a.input, &a.output, &opts, |i, n| progress(&bar, i, n));
    bar.finish_and_clear();
    let report = report?;
    for (note, n) in &report.fallbacks {
        eprintln!("note: {n} tensors: {note}");
    }
    let types: Vec<String> = report
        .types
        .iter()
        .map(|(t, n)| format!("{n} {t}"))
        .collect();
    eprintln!(
        "wrote {} ({:.1} MiB, {} tensors: {}) in {:.1}s",
        a.output.display(),
        report.bytes as f64 / (1024.0 * 1024.0),
        report.tensors,
        types.join(", "),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

fn dense(t: OutType) -> DenseType {
    match t {
        OutType::F32 => DenseType::F32,
        OutType::F16 => DenseType::F16,
    }
}

pub(crate) fn bar(msg: &'static str) -> ProgressBar {
    let b = ProgressBar::new(0);
    b.set_style(
        ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} tensors")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    b.set_message(msg);
    b
}

pub(crate) fn progress(b: &ProgressBar, i: usize, n: usize) {
    b.set_length(n as u64);
    b.set_position(i as u64);
}

fn load(m: &ModelArg) -> AnyResult<Model> {
    let path = match &m.model {
        Some(p) => p.clone(),
        None => default_model::path()?,
    };
    let b = bar("loading");
    let t0 = Instant::now();
    let mut opts = model_options().with_progress(|p| {
        progress(&b, p.loaded, p.total);
        ControlFlow::Continue(())
    });
    if let Some(q) = &m.quantize {
        opts = opts.with_quantize(llama_core::QuantType::parse(q)?);
    }
    let model = Model::load(&path, opts)?;
    b.finish_and_clear();
    tracing::info!(?model, secs = t0.elapsed().as_secs_f64(), "model loaded");
    Ok(model)
}

fn sampler(s: &SamplingArgs) -> AnyResult<Sampler> {
    let cfg = SamplerConfig::default()
        .temperature(s.temperature)
        .top_k(s.top_k)
        .top_p(s.top_p)
        .min_p(s.min_p)
        .repeat_penalty(s.repeat_penalty)
        .repeat_last_n(s.repeat_last_n)
        .seed_opt(s.seed);
    Ok(Sampler::new(cfg)?)
}

fn gen_opts(s: &SamplingArgs) -> AnyResult<GenerateOptions> {
    let mut o = GenerateOptions::default().max_tokens(s.max_tokens);
    o.stop = s.stop.clone();
    o.constraint = constraint(s)?;
    o.draft = s.speculation.draft()?;
    o.draft_max = s.speculation.draft_max;
    Ok(o)
}

/// The constraint the flags ask for (clap allows one at most).
fn constraint(s: &SamplingArgs) -> AnyResult<Option<Constraint>> {
    if let Some(schema) = &s.json_schema {
        let text = if schema.trim_start().starts_with('{') || schema.trim() == "true" {
            schema.clone()
        } else {
            std::fs::read_to_string(schema)
                .map_err(|e| format!("cannot read the JSON schema file {schema}: {e}"))?
        };
        return Ok(Some(Constraint::json_schema_str(&text)?));
    }
    if let Some(path) = &s.grammar {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read the grammar file {}: {e}", path.display()))?;
        return Ok(Some(match path.extension().and_then(|e| e.to_str()) {
            Some("gbnf") => Constraint::Gbnf(text),
            Some("lark") => Constraint::Lark(text),
            _ => Constraint::grammar(text),
        }));
    }
    if let Some(rx) = &s.regex {
        return Ok(Some(Constraint::Regex(rx.clone())));
    }
    if let Some(items) = &s.choice {
        return Ok(Some(Constraint::Choices(items.clone())));
    }
    Ok(None)
}

/// Tools from a JSON file (a list in OpenAI's shape) and the choice flag.
fn tools(a: &ChatArgs) -> AnyResult<(Vec<Tool>, ToolChoice)> {
    let Some(path) = &a.tools else {
        if a.tool_choice.is_some() {
            return Err("--tool-choice needs --tools".into());
        }
        return Ok((vec![], ToolChoice::Auto));
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the tools file {}: {e}", path.display()))?;
    let tools = Tool::list_from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let choice = match &a.tool_choice {
        Some(c) => ToolChoice::parse(c)?,
        None => ToolChoice::Auto,
    };
    Ok((tools, choice))
}

fn session(model: &Model, m: &ModelArg) -> AnyResult<Session> {
    let mut s = model.session(m.kv.apply(SessionOptions::default().n_ctx(m.n_ctx)))?;
    s.set_adapters(&lora::load_all(model, &m.lora)?)?;
    Ok(s)
}

fn stream_to_stdout(piece: &str) -> ControlFlow<()> {
    let mut out = std::io::stdout().lock();
    if out
        .write_all(piece.as_bytes())
        .and_then(|_| out.flush())
        .is_err()
    {
        return ControlFlow::Break(());
    }
    ControlFlow::Continue(())
}

fn summary(g: &Generation) {
    let t = &g.timings;
    let spec = if t.drafted_tokens > 0 {
        format!(
            " | drafted: {}, accepted: {}",
            t.drafted_tokens, t.accepted_tokens
        )
    } else {
        String::new()
    };
    eprintln!(
        "\n[prompt: {} tokens, {:.1} tok/s | generated: {} tokens, {:.1} tok/s{spec} | stop: {}]",
        t.prompt_tokens,
        t.prompt_tps(),
        t.generated_tokens,
        t.generation_tps(),
        g.stop_reason.as_str()
    );
}

fn json_result(prompt_ids: &[u32], g: &Generation) -> serde_json::Value {
    json!({
        "prompt_ids": prompt_ids,
        "ids": g.tokens,
        "text": g.text,
        "stop_reason": g.stop_reason.as_str(),
        "tool_calls": g.tool_calls.iter().map(|c| json!({"name": c.name, "arguments": c.arguments})).collect::<Vec<_>>(),
        "timings": {
            "prompt_tokens": g.timings.prompt_tokens,
            "prompt_ms": g.timings.prompt.as_secs_f64() * 1e3,
            "prompt_tps": g.timings.prompt_tps(),
            "generated_tokens": g.timings.generated_tokens,
            "generation_ms": g.timings.generation.as_secs_f64() * 1e3,
            "generation_tps": g.timings.generation_tps(),
            "drafted_tokens": g.timings.drafted_tokens,
            "accepted_tokens": g.timings.accepted_tokens,
        }
    })
}

fn generate(a: GenerateArgs) -> AnyResult<()> {
    let model = load(&a.model)?;
    let ids = model.tokenize(&a.prompt, true, true)?;
    one_turn(&model, &a.model, &a.sampling, &ids, gen_opts(&a.sampling)?)
}

/// Generates after `ids` on a fresh session: streams the text, or prints one JSON object.
fn one_turn(
    model: &Model,
    m: &ModelArg,
    sampling: &SamplingArgs,
    ids: &[u32],
    opts: GenerateOptions,
) -> AnyResult<()> {
    let mut s = session(model, m)?;
    let mut smp = sampler(sampling)?;
    let json = sampling.json;
    let g = s.generate(ids, &mut smp, opts, |p| {
        if json {
            ControlFlow::Continue(())
        } else {
            stream_to_stdout(p)
        }
    })?;
    if json {
        println!("{}", json_result(ids, &g));
    } else {
        println!();
        for c in &g.tool_calls {
            eprintln!("[tool call: {} {}]", c.name, c.arguments);
        }
    }
    summary(&g);
    Ok(())
}

fn chat(a: ChatArgs) -> AnyResult<()> {
    let model = load(&a.model)?;
    let (tools, choice) = tools(&a)?;
    let opts = gen_opts(&a.sampling)?
        .tools(tools, choice)
        .parse_special_in_content(a.parse_special_in_content);
    let mut messages = vec![];
    if let Some(sys) = &a.system {
        messages.push(Message::system(sys.clone()));
    }
    if let Some(p) = &a.prompt {
        // One turn on an empty session: the rendered conversation is the whole prompt.
        messages.push(Message::user(p.clone()));
        let ids = model.chat_tokens(&messages, (&opts).into())?;
        return one_turn(&model, &a.model, &a.sampling, &ids, opts);
    }
    let mut s = session(&model, &a.model)?;
    let mut smp = sampler(&a.sampling)?;
    eprintln!(
        "Chatting with {}. Empty line or Ctrl-D to quit.",
        model.path().display()
    );
    let stdin = std::io::stdin();
    loop {
        eprint!("> ");
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
        messages.push(Message::user(line.trim_end().to_string()));
        let g = s.generate(&messages, &mut smp, opts.clone(), stream_to_stdout)?;
        println!();
        summary(&g);
        if g.tool_calls.is_empty() {
            messages.push(Message::assistant(g.text.clone()));
        } else {
            for c in &g.tool_calls {
                eprintln!("[tool call: {} {}]", c.name, c.arguments);
            }
            messages.push(Message::tool_calls(g.tool_calls.clone()));
            eprint!("tool result> ");
            let mut result = String::new();
            stdin.lock().read_line(&mut result)?;
            messages.push(Message::tool(result.trim_end().to_string()));
        }
    }
    Ok(())
}

fn tokenize(a: TokenizeArgs) -> AnyResult<()> {
    let model = load(&a.model)?;
    let text = if a.text == "-" {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s)?;
        s
    } else {
        a.text.clone()
    };
    let ids = model.tokenize(&text, !a.no_bos, a.special)?;
    if a.json {
        println!("{}", json!({ "ids": ids }));
    } else {
        let tok = model.tokenizer();
        for id in &ids {
            println!("{id:>7} {:?}", tok.decode(&[*id], true).unwrap_or_default());
        }
    }
    Ok(())
}

fn perplexity(a: PerplexityArgs) -> AnyResult<()> {
    let model = load(&ModelArg {
        model: a.model.clone(),
        n_ctx: 0,
        quantize: None,
        lora: vec![],
        kv: KvArgs::default(),
    })?;
    let adapters = lora::load_all(&model, &a.lora)?;
    let text = std::fs::read_to_string(&a.file)
        .map_err(|e| format!("cannot read {}: {e}", a.file.display()))?;
    let b = ProgressBar::new(0);
    b.set_style(
        ProgressStyle::with_template("perplexity [{bar:40}] {pos}/{len} windows {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let t0 = Instant::now();
    let mut last = Vec::new();
    let (kv_k, kv_v) = a.kv.types();
    let mut opts = llama_core::PerplexityOptions::default()
        .n_ctx(a.n_ctx)
        .adapters(adapters)
        .kv_type_k(kv_k)
        .kv_type_v(kv_v);
    opts.max_chunks = a.chunks;
    let r = llama_core::Perplexity::measure(&model, &text, &opts, |done, total| {
        b.set_length(total as u64);
        b.set_position(done as u64);
        last.push(done);
        ControlFlow::Continue(())
    })?;
    b.finish_and_clear();
    if a.json {
        println!(
            "{}",
            json!({
                "perplexity": r.perplexity,
                "mean_nll": r.mean_nll,
                "n_scored": r.n_scored,
                "n_chunks": r.n_chunks,
                "n_ctx": a.n_ctx,
                "per_chunk": r.per_chunk,
                "seconds": t0.elapsed().as_secs_f64(),
            })
        );
    } else {
        let chunks: Vec<String> = r
            .per_chunk
            .iter()
            .enumerate()
            .map(|(i, p)| format!("[{}]{p:.4}", i + 1))
            .collect();
        println!("{}", chunks.join(","));
        println!(
            "perplexity: {:.4} ({} tokens scored in {} windows of {})",
            r.perplexity, r.n_scored, r.n_chunks, a.n_ctx
        );
    }
    Ok(())
}
