//! `llama bench`: prompt-processing and decode speed, time to first token, load time and peak
//! memory, measured the way llama.cpp's llama-bench does (fixed synthetic token ids, fresh
//! context per run, median of several repetitions).

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use llama_core::{
    Constraint, GenerateOptions, Message, Model, ModelOptions, Sampler, SamplerConfig,
    SessionOptions,
};
use serde_json::json;

#[derive(Args)]
pub struct BenchArgs {
    /// A .gguf file or a Hugging Face folder; default: SmolLM2-135M-Instruct.
    #[arg(short, long)]
    model: Option<PathBuf>,
    /// Repetitions of each test (the median is reported).
    #[arg(short, long, default_value_t = 3)]
    repetitions: usize,
    /// Quantize dense weights while loading (q8_0, q4_0, q4_1, q5_0, q5_1, q4_k, q5_k, q6_k).
    #[arg(long)]
    quantize: Option<String>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// A LoRA adapter applied to every run, PATH or PATH:SCALE (repeatable).
    #[arg(long = "lora", value_name = "PATH[:SCALE]")]
    lora: Vec<String>,
    /// Also measure greedy chat decode under this JSON schema (a file or the schema itself)
    /// against the same decode unconstrained, and the schema's compile time.
    #[arg(long, value_name = "FILE_OR_JSON")]
    json_schema: Option<String>,
    /// Also measure aggregate decode speed with this many sequences decoding together
    /// (comma-separated counts, e.g. 1,4,8,16): one forward pass per step for all of them.
    #[arg(long, value_name = "N,N,...", value_delimiter = ',')]
    batch: Vec<usize>,
    /// Also measure LoRA training (rank 16 on all seven projections, one sequence of this many
    /// tokens per step, every position scored) against the f32 FMA peak measured in the same
    /// run on the same threads.
    #[arg(long, value_name = "TOKENS", num_args = 0..=1, default_missing_value = "256")]
    train: Option<usize>,
    /// Also measure speculative decoding with prompt lookup and with predicted outputs on
    /// copy-heavy chat tasks (rewrite a paragraph with one change, document a function)
    /// against plain decode, outputs checked identical; and the verification pass's cost.
    #[arg(long)]
    lookup: bool,
    /// Also measure speculative decoding with this draft model on the same tasks.
    #[arg(long, value_name = "PATH")]
    draft: Option<PathBuf>,
    /// Most tokens drafted per verification in those measurements.
    #[arg(long, value_name = "N", default_value_t = 8)]
    draft_max: usize,
    /// Also measure the memory's streaming read bandwidth on the same threads, and decode's
    /// share of it (the bytes a decode step reads times tokens per second).
    #[arg(long)]
    bandwidth: bool,
    /// Also measure decode at these context depths (comma-separated positions, e.g.
    /// 0,4096,16384,32768): for each, a prompt of that many tokens (its speed reported too),
    /// then 32 decoded tokens, and the KV cache's memory there.
    #[arg(long, value_name = "N,N,...", value_delimiter = ',')]
    depth: Vec<usize>,
    #[command(flatten)]
    kv: crate::KvArgs,
    /// The user message of the constrained test.
    #[arg(
        long,
        default_value = "List twenty people with their names, ages and cities as JSON."
    )]
    schema_prompt: String,
}

/// The synthetic prompt: the same ids for every engine and run (llama-bench uses random ids;
/// the cost of a forward pass does not depend on which ids they are).
pub fn bench_tokens(n: usize, vocab: usize) -> Vec<u32> {
    let span = (vocab.saturating_sub(200)).max(1) as u64;
    (0..n as u64)
        .map(|i| (100 + (i * 2_654_435_761) % span) as u32)
        .collect()
}

/// Peak resident set size of this process in MiB (Linux `VmHWM`; 0 elsewhere).
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn argmax(l: &[f32]) -> u32 {
    l.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(i, _)| i as u32)
        .unwrap_or(0)
}

pub fn run(
    a: BenchArgs,
    opts: ModelOptions<'_>,
    default_model: impl FnOnce() -> Result<PathBuf, Box<dyn std::error::Error>>,
) -> Result<(), Box<dyn std::error::Error>> {
    let path = match a.model {
        Some(p) => p,
        None => default_model()?,
    };
    let reps = a.repetitions.max(1);
    let t0 = Instant::now();
    let mut opts = opts;
    if let Some(q) = &a.quantize {
        opts = opts.with_quantize(llama_core::QuantType::parse(q)?);
    }
    let model = Model::load(&path, opts)?;
    let load_s = t0.elapsed().as_secs_f64();
    let adapters = crate::lora::load_all(&model, &a.lora)?;
    let load_rss = peak_rss_mib();
    let vocab = model.config().vocab_size;
    let tokens = bench_tokens(512, vocab);
    let kv = a.kv.clone();
    let session = || -> Result<llama_core::Session, Box<dyn std::error::Error>> {
        let mut s = model.session(kv.apply(SessionOptions::default().n_ctx(1024)))?;
        s.set_adapters(&adapters)?;
        Ok(s)
    };
    // Warm-up: first touches of the weights and of the thread pool.
    {
        let mut s = session()?;
        s.eval(&tokens[..16])?;
    }
    let pp = |n: usize| -> Result<(f64, f64), Box<dyn std::error::Error>> {
        let mut secs = vec![];
        let mut ttft = vec![];
        for _ in 0..reps {
            let mut s = session()?;
            let t = Instant::now();
            s.eval(&tokens[..n])?;
            let _first = argmax(s.logits().ok_or("no logits")?);
            let e = t.elapsed().as_secs_f64();
            secs.push(e);
            ttft.push(e * 1000.0);
        }
        Ok((n as f64 / median(secs), median(ttft)))
    };
    let (pp128, ttft_ms) = pp(128)?;
    let (pp512, _) = pp(512)?;
    let n_gen = 128;
    let mut tg = vec![];
    for _ in 0..reps {
        let mut s = session()?;
        s.eval(&tokens[..8])?;
        let mut next = argmax(s.logits().ok_or("no logits")?);
        let t = Instant::now();
        for _ in 0..n_gen {
            s.eval(&[next])?;
            next = argmax(s.logits().ok_or("no logits")?);
        }
        tg.push(n_gen as f64 / t.elapsed().as_secs_f64());
    }
    let tg128 = median(tg);
    let versus = if adapters.is_empty() {
        None
    } else {
        Some(adapters_versus_base(&model, &adapters, &tokens, reps)?)
    };
    let constrained = match &a.json_schema {
        Some(schema) => Some(constrained_decode(
            &model,
            &adapters,
            schema,
            &a.schema_prompt,
            reps,
        )?),
        None => None,
    };
    let batched: Vec<serde_json::Value> = a
        .batch
        .iter()
        .map(|&n| batched_decode(&model, &adapters, n, reps))
        .collect::<Result<_, _>>()?;
    let speculative = if a.lookup || a.draft.is_some() {
        let draft = match &a.draft {
            Some(p) => Some(Model::load(p, ModelOptions::default())?),
            None => None,
        };
        Some(speculative(
            &model,
            &adapters,
            a.lookup,
            draft,
            a.draft_max,
            reps,
        )?)
    } else {
        None
    };
    let depths: Vec<serde_json::Value> = a
        .depth
        .iter()
        .map(|&d| depth_decode(&model, &adapters, &a.kv, d))
        .collect::<Result<_, _>>()?;
    let training = match a.train {
        Some(len) => Some(train_speed(&model, len, reps)?),
        None => None,
    };
    let rss = peak_rss_mib();
    let threads = model.threads();
    // After the RSS reading: the measurement's buffer is not the model's memory.
    let decode_gbps = model.decode_bytes() as f64 * tg128 / 1e9;
    let read_gbps = a.bandwidth.then(|| read_bandwidth_gbps(threads));
    if a.json {
        println!(
            "{}",
            json!({
                "engine": "llama-core",
                "model": path.display().to_string(),
                "weights": model.weight_type(),
                "threads": threads,
                "kernel": model.kernel().as_str(),
                "repetitions": reps,
                "pp128_tps": pp128,
                "pp512_tps": pp512,
                "tg128_tps": tg128,
                "decode_bytes": model.decode_bytes(),
                "decode_gbps": decode_gbps,
                "read_gbps": read_gbps,
                "ttft_ms": ttft_ms,
                "peak_rss_mib": rss,
                "load_s": load_s,
                "load_peak_rss_mib": load_rss,
                "lora": a.lora,
                "lora_vs_base": versus,
                "constrained": constrained,
                "batched": batched,
                "kv_type_k": a.kv.types().0.as_str(),
                "kv_type_v": a.kv.types().1.as_str(),
                "depths": depths,
                "training": training,
                "speculative": speculative,
            })
        );
    } else {
        println!("model   {} ({})", path.display(), model.weight_type());
        println!("load    {load_s:.2} s (peak {load_rss:.0} MiB RSS)");
        println!("pp128   {pp128:.1} tok/s");
        println!("pp512   {pp512:.1} tok/s");
        println!(
            "tg128   {tg128:.1} tok/s ({:.1} MB of weights a token: {decode_gbps:.1} GB/s)",
            model.decode_bytes() as f64 / 1e6
        );
        if let Some(bw) = read_gbps {
            println!(
                "memory  {bw:.1} GB/s streaming read on {threads} threads: decode at {:.0}% of it",
                100.0 * decode_gbps / bw
            );
        }
        println!("ttft    {ttft_ms:.1} ms (128-token prompt)");
        println!("peak    {rss:.0} MiB RSS");
        for b in &batched {
            println!(
                "batch   {:>2} sequences: {:.1} tok/s aggregate ({:.1} per sequence)",
                b["sequences"],
                b["aggregate_tps"].as_f64().unwrap_or(0.0),
                b["per_sequence_tps"].as_f64().unwrap_or(0.0),
            );
        }
        let (kt, vt) = a.kv.types();
        for d in &depths {
            let pp = d["prompt_tps"]
                .as_f64()
                .map(|v| format!("prompt {v:.1} tok/s, "))
                .unwrap_or_default();
            println!(
                "depth   {:>6} positions ({kt}/{vt} cache, {:.1} MiB): {pp}decode {:.1} tok/s",
                d["depth"],
                d["kv_bytes"].as_f64().unwrap_or(0.0) / (1 << 20) as f64,
                d["decode_tps"].as_f64().unwrap_or(0.0),
            );
        }
        if let Some(v) = &versus {
            println!(
                "lora    decode {:.1} tok/s with the adapters vs {:.1} without, interleaved: {:.3}x; prompt 512 {:.1} vs {:.1} tok/s: {:.3}x",
                v["decode_tps"].as_f64().unwrap_or(0.0),
                v["base_decode_tps"].as_f64().unwrap_or(0.0),
                v["decode_ratio"].as_f64().unwrap_or(0.0),
                v["prompt_tps"].as_f64().unwrap_or(0.0),
                v["base_prompt_tps"].as_f64().unwrap_or(0.0),
                v["prompt_ratio"].as_f64().unwrap_or(0.0),
            );
        }
        if let Some(sp) = &speculative {
            let v = &sp["verify"];
            println!(
                "verify  {} positions in one pass: {:.2} ms vs one decode step {:.2} ms: {:.2}x",
                v["positions"],
                v["verify_ms"].as_f64().unwrap_or(0.0),
                v["decode_ms"].as_f64().unwrap_or(0.0),
                v["ratio"].as_f64().unwrap_or(0.0),
            );
            for r in sp["runs"].as_array().into_iter().flatten() {
                println!(
                    "spec    {:<9} {:<8} {:.1} tok/s vs plain {:.1}: {:.2}x ({} drafted, {} accepted, output {})",
                    r["task"].as_str().unwrap_or(""),
                    r["draft"].as_str().unwrap_or(""),
                    r["tps"].as_f64().unwrap_or(0.0),
                    r["plain_tps"].as_f64().unwrap_or(0.0),
                    r["speedup"].as_f64().unwrap_or(0.0),
                    r["drafted"],
                    r["accepted"],
                    if r["identical"].as_bool() == Some(true) { "identical" } else { "DIFFERS" },
                );
            }
        }
        if let Some(t) = &training {
            println!(
                "train   {:.1} tok/s (LoRA rank 16, {}-token sequences): {:.1} GFLOP/s = {:.1}% of the f32 FMA peak measured here ({:.1} GFLOP/s on {} threads)",
                t["tokens_per_s"].as_f64().unwrap_or(0.0),
                t["sequence_tokens"],
                t["gflops"].as_f64().unwrap_or(0.0),
                100.0 * t["of_fma_peak"].as_f64().unwrap_or(0.0),
                t["fma_peak_gflops"].as_f64().unwrap_or(0.0),
                t["threads"],
            );
        }
        if let Some(c) = &constrained {
            println!(
                "schema  compile {:.2} ms; decode {:.1} tok/s constrained vs {:.1} free over {} tokens: {:.3}x; masks {:.3} ms/token",
                c["compile_ms"].as_f64().unwrap_or(0.0),
                c["constrained_tps"].as_f64().unwrap_or(0.0),
                c["free_tps"].as_f64().unwrap_or(0.0),
                c["tokens"],
                c["ratio"].as_f64().unwrap_or(0.0),
                c["mask_ms_per_token"].as_f64().unwrap_or(0.0),
            );
        }
    }
    Ok(())
}

/// Decode at a context depth: a fresh session reads a `depth`-token prompt (timed: prompt
/// speed at that length), then decodes 32 tokens greedily (timed); the KV cache's bytes are
/// read after the last one.
fn depth_decode(
    model: &Model,
    adapters: &[(llama_core::Adapter, f32)],
    kv: &crate::KvArgs,
    depth: usize,
) -> Result<serde_json::Value, Box<dyn std::error::Error>> {
    const STEPS: usize = 32;
    let vocab = model.config().vocab_size;
    let mut s = model.session(
        kv.apply(
            SessionOptions::default()
                .n_ctx(depth + STEPS + 8)
                .n_batch(512),
        ),
    )?;
    s.set_adapters(adapters)?;
    let prompt = bench_tokens(depth.max(1), vocab);
    let t = Instant::now();
    s.eval(&prompt)?;
    let prompt_s = t.elapsed().as_secs_f64();
    let mut next = argmax(s.logits().ok_or("no logits")?);
    let t = Instant::now();
    for _ in 0..STEPS {
        s.eval(&[next])?;
        next = argmax(s.logits().ok_or("no logits")?);
    }
    let decode_tps = STEPS as f64 / t.elapsed().as_secs_f64();
    Ok(json!({
        "depth": depth,
        "prompt_tps": (depth > 1).then(|| depth as f64 / prompt_s),
        "decode_tps": decode_tps,
        "kv_bytes": s.kv_cache_bytes(),
    }))
}

/// Decode and 512-token prompts with the adapters against the same without them, measured in
/// alternation in one process (16-token rounds of greedy decode on two sessions, 8 rounds per
/// context; whole prompts one after the other), so that a machine's drift and neighbours
/// weigh on both alike: the ratio is the issue's measure of what the adapters cost.
fn adapters_versus_base(
    model: &Model,
    adapters: &[(llama_core::Adapter, f32)],
    tokens: &[u32],
    reps: usize,
) -> Result<serde_json::Value, Box<dyn std::error::Error>> {
    let new = |with: bool| -> Result<llama_core::Session, Box<dyn std::error::Error>> {
        let mut s = model.session(SessionOptions::default().n_ctx(1024))?;
        if with {
            s.set_adapters(adapters)?;
        }
        Ok(s)
    };
    let mut sessions = [new(false)?, new(true)?];
    let (rounds, per) = (8 * reps.max(1), 16);
    let mut secs = [0f64; 2];
    for round in 0..rounds {
        for (s, t) in sessions.iter_mut().zip(secs.iter_mut()) {
            if round % 8 == 0 {
                s.truncate(0);
                s.eval(&tokens[..8])?;
            }
            let mut next = argmax(s.logits().ok_or("no logits")?);
            let start = Instant::now();
            for _ in 0..per {
                s.eval(&[next])?;
                next = argmax(s.logits().ok_or("no logits")?);
            }
            *t += start.elapsed().as_secs_f64();
        }
    }
    let n = (rounds * per) as f64;
    let mut psecs = [0f64; 2];
    for _ in 0..reps.max(1) {
        for (with, t) in [false, true].into_iter().zip(psecs.iter_mut()) {
            let mut s = new(with)?;
            let start = Instant::now();
            s.eval(&tokens[..512])?;
            *t += start.elapsed().as_secs_f64();
        }
    }
    let np = (512 * reps.max(1)) as f64;
    Ok(json!({
        "decode_tps": n / secs[1],
        "base_decode_tps": n / secs[0],
        "decode_ratio": secs[0] / secs[1],
        "prompt_tps": np / psecs[1],
        "base_prompt_tps": np / psecs[0],
        "prompt_ratio": psecs[0] / psecs[1],
        "decode_tokens": rounds * per,
    }))
}

/// `n` sequences (different 32-token prompts) decoding 64 greedy tokens together, one batched
/// forward pass per step; the median of `reps` runs.
fn batched_decode(
    model: &Model,
    adapters: &[(llama_core::Adapter, f32)],
    n: usize,
    reps: usize,
) -> Result<serde_json::Value, Box<dyn std::error::Error>> {
    let vocab = model.config().vocab_size;
    let steps = 64;
    let mut rates = vec![];
    for _ in 0..reps {
        let mut sessions = vec![];
        for i in 0..n.max(1) {
            let mut s = model.session(SessionOptions::default().n_ctx(256))?;
            s.set_adapters(adapters)?;
            let toks = bench_tokens(32 + i, vocab);
            s.eval(&toks[i..])?;
            sessions.push(s);
        }
        let t = Instant::now();
        for _ in 0..steps {
            let next: Vec<[u32; 1]> = sessions
                .iter()
                .map(|s| s.logits().map(|l| [argmax(l)]).ok_or("no logits"))
                .collect::<Result<_, _>>()?;
            let mut batch: Vec<(&mut llama_core::Session, &[u32])> = sessions
                .iter_mut()
                .zip(&next)
                .map(|(s, t)| (s, &t[..]))
                .collect();
            llama_core::Session::eval_batch(&mut batch)?;
        }
        rates.push((n.max(1) * steps) as f64 / t.elapsed().as_secs_f64());
    }
    let agg = median(rates);
    Ok(json!({
        "sequences": n.max(1),
        "steps": steps,
        "aggregate_tps": agg,
        "per_sequence_tps": agg / n.max(1) as f64,
    }))
}

/// Greedy chat decode under a JSON schema and without it, the same number of tokens, medians of
/// `reps` alternating runs (the first compile builds the token table and is timed apart).
fn constrained_decode(
    model: &Model,
    adapters: &[(llama_core::Adapter, f32)],
    schema: &str,
    prompt: &str,
    reps: usize,
) -> Result<serde_json::Value, Box<dyn std::error::Error>> {
    let text = if schema.trim_start().starts_with('{') {
        schema.to_string()
    } else {
        std::fs::read_to_string(schema)?
    };
    let c = Constraint::json_schema_str(&text)?;
    let t = Instant::now();
    let _ = model.compile_constraint(&Constraint::JsonObject)?;
    let table_ms = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    let g = model.compile_constraint(&c)?;
    let compile_ms = t.elapsed().as_secs_f64() * 1e3;
    let ids = model.chat_tokens(&[Message::user(prompt)], Default::default())?;
    // End-of-generation tokens banned in both runs, so the free one runs as long as the
    // constrained one (where the grammar never allows them before it completes) through the
    // same sampler path.
    let mut cfg = SamplerConfig::greedy();
    cfg.logit_bias = model
        .tokenizer()
        .eog_ids()
        .iter()
        .map(|&id| (id, f32::NEG_INFINITY))
        .collect();
    let run =
        |opts: GenerateOptions| -> Result<llama_core::Generation, Box<dyn std::error::Error>> {
            let mut s = model.session(SessionOptions::default().n_ctx(2048))?;
            s.set_adapters(adapters)?;
            let mut smp = Sampler::new(cfg.clone())?;
            Ok(s.generate(&ids, &mut smp, opts, |_| ControlFlow::Continue(()))?)
        };
    let first = run(GenerateOptions::default()
        .grammar(g.clone())
        .max_tokens(512))?;
    let n = first.tokens.len();
    let (mut ct, mut ft, mut mask) = (vec![], vec![], vec![]);
    for _ in 0..reps {
        let gc = run(GenerateOptions::default().grammar(g.clone()).max_tokens(n))?;
        ct.push(gc.timings.generation_tps());
        mask.push(gc.timings.constraint.as_secs_f64() * 1e3 / gc.tokens.len().max(1) as f64);
        let gf = run(GenerateOptions::default().max_tokens(n))?;
        if gf.tokens.len() != n {
            return Err(format!("the free run made {} tokens, not {n}", gf.tokens.len()).into());
        }
        ft.push(gf.timings.generation_tps());
    }
    let (c_tps, f_tps) = (median(ct), median(ft));
    Ok(json!({
        "tokens": n,
        "token_table_ms": table_ms,
        "compile_ms": compile_ms,
        "constrained_tps": c_tps,
        "free_tps": f_tps,
        "ratio": c_tps / f_tps,
        "mask_ms_per_token": median(mask),
        "stop_reason": first.stop_reason.as_str(),
    }))
}

/// LoRA training speed: one warm-up step, then `reps` steps of one `len`-token sequence each
/// (median tokens/s), rank 16 on all seven projections; the FLOP of a token taken as 4 x the
/// base's matrix parameters (forward plus the gradient to the inputs), against the f32 FMA peak
/// measured right after on as many threads.
fn train_speed(
    model: &Model,
    len: usize,
    reps: usize,
) -> Result<serde_json::Value, Box<dyn std::error::Error>> {
    use llama_core::train::{Example, LoraConfig, TrainOptions, Trainer};
    let len = len.max(2);
    let c = model.config();
    let steps = reps + 1;
    let ids = bench_tokens(len * steps, c.vocab_size);
    let data: Vec<Example> = ids
        .chunks_exact(len)
        .map(|t| Example {
            tokens: t.to_vec(),
            score: vec![true; len - 1],
        })
        .collect();
    let opts = TrainOptions::default()
        .lora(LoraConfig {
            rank: 16,
            alpha: 32.0,
            targets: llama_core::Target::ALL.to_vec(),
            rslora: false,
        })
        .epochs(1)
        .batch(1)
        .seed(1);
    let mut trainer = Trainer::new(model, data, opts)?;
    let mut rates = vec![];
    for i in 0..steps {
        let t = Instant::now();
        let r = trainer.step()?.ok_or("training ended early")?;
        if i > 0 {
            rates.push(r.tokens as f64 / t.elapsed().as_secs_f64());
        }
    }
    let tps = median(rates);
    let (h, ff, hd) = (c.hidden_size, c.intermediate_size, c.head_dim);
    let (qw, kw) = (c.num_attention_heads * hd, c.num_key_value_heads * hd);
    let params = c.num_hidden_layers * (h * (qw + 2 * kw) + qw * h + 3 * h * ff) + c.vocab_size * h;
    let gflops = tps * 4.0 * params as f64 / 1e9;
    let threads = model.threads();
    let peak = fma_peak_gflops(threads);
    Ok(json!({
        "sequence_tokens": len,
        "steps": reps,
        "tokens_per_s": tps,
        "flop_per_token": 4 * params,
        "gflops": gflops,
        "threads": threads,
        "fma_peak_gflops": peak,
        "of_fma_peak": if peak > 0.0 { gflops / peak } else { 0.0 },
    }))
}

/// The f32 FMA throughput of `threads` threads running at once (GFLOP/s): each runs 24
/// independent chains of fused multiply-adds on the widest vectors this CPU has (512-bit with
/// AVX-512F, else 256-bit with FMA, else scalar `mul_add`) for about 0.3 s.
fn fma_peak_gflops(threads: usize) -> f64 {
    let run = || -> (f64, f64) {
        let iters: u64 = 20_000_000;
        let start = Instant::now();
        let flop = fma_chains(iters);
        (flop, start.elapsed().as_secs_f64())
    };
    let results: Vec<(f64, f64)> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads.max(1)).map(|_| s.spawn(run)).collect();
        hs.into_iter().filter_map(|h| h.join().ok()).collect()
    });
    results.iter().map(|(f, t)| f / t / 1e9).sum()
}

/// The streaming read bandwidth of `threads` threads reading at once (GB/s): each sums its
/// share of a 512 MiB buffer (far past the caches) with wide loads; the best of 7 passes.
fn read_bandwidth_gbps(threads: usize) -> f64 {
    let words: usize = 64 << 20;
    let buf: Vec<u64> = (0..words as u64).collect();
    let threads = threads.max(1);
    let share = words.div_ceil(threads);
    let sum = |part: &[u64]| -> u64 {
        let mut acc = [0u64; 8];
        for c in part.chunks_exact(8) {
            for (a, &v) in acc.iter_mut().zip(c) {
                *a = a.wrapping_add(v);
            }
        }
        acc.iter().fold(0, |x, &y| x.wrapping_add(y))
    };
    let mut best = 0f64;
    for _ in 0..7 {
        let barrier = std::sync::Barrier::new(threads + 1);
        let secs = std::thread::scope(|s| {
            for part in buf.chunks(share) {
                let (barrier, sum) = (&barrier, &sum);
                s.spawn(move || {
                    barrier.wait();
                    std::hint::black_box(sum(part));
                });
            }
            barrier.wait();
            let t = Instant::now();
            // The scope joins every reader before it returns.
            t
        })
        .elapsed()
        .as_secs_f64();
        best = best.max((words * 8) as f64 / secs / 1e9);
    }
    best
}

/// FLOP done by `iters` rounds of 24 FMA chains.
fn fma_chains(iters: u64) -> f64 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512F was detected at run time.
            return unsafe { fma_chains_avx512(iters) };
        }
        if std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: FMA and AVX were detected at run time.
            return unsafe { fma_chains_avx2(iters / 2) };
        }
    }
    let mut acc = [1.0f32; 24];
    let (a, b) = (
        std::hint::black_box(0.999_99f32),
        std::hint::black_box(1e-7f32),
    );
    let n = iters / 16;
    for _ in 0..n {
        for x in &mut acc {
            *x = x.mul_add(a, b);
        }
    }
    std::hint::black_box(acc);
    n as f64 * 24.0 * 2.0
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn fma_chains_avx512(iters: u64) -> f64 {
    use std::arch::x86_64::*;
    let a = _mm512_set1_ps(std::hint::black_box(0.999_99));
    let b = _mm512_set1_ps(std::hint::black_box(1e-7));
    let mut acc = [_mm512_set1_ps(1.0); 24];
    for _ in 0..iters {
        for x in &mut acc {
            *x = _mm512_fmadd_ps(*x, a, b);
        }
    }
    std::hint::black_box(acc);
    iters as f64 * 24.0 * 16.0 * 2.0
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fma_chains_avx2(iters: u64) -> f64 {
    use std::arch::x86_64::*;
    let a = _mm256_set1_ps(std::hint::black_box(0.999_99));
    let b = _mm256_set1_ps(std::hint::black_box(1e-7));
    let mut acc = [_mm256_set1_ps(1.0); 24];
    for _ in 0..iters {
        for x in &mut acc {
            *x = _mm256_fmadd_ps(*x, a, b);
        }
    }
    std::hint::black_box(acc);
    iters as f64 * 24.0 * 8.0 * 2.0
}

/// The copy-heavy tasks of the speculative measurement: (name, user message, predicted output).
fn copy_tasks() -> Vec<(&'static str, String, String)> {
    let paragraph = "The meeting of the river council is planned for Tuesday morning at the old \
        mill. Every member should bring the notes from the last session, the survey of the \
        eastern bank, and a list of the repairs that are still waiting. After the meeting, \
        lunch will be served in the garden, weather permitting, and the afternoon is free for \
        a walk along the new path to the bridge.";
    let code = "def moving_average(values, window):\n    if window <= 0:\n        raise ValueError(\"window must be positive\")\n    out = []\n    total = 0.0\n    for i, v in enumerate(values):\n        total += v\n        if i >= window:\n            total -= values[i - window]\n        if i >= window - 1:\n            out.append(total / window)\n    return out\n";
    vec![
        (
            "rewrite",
            format!("Rewrite this paragraph exactly, changing only Tuesday to Friday:\n\n{paragraph}"),
            paragraph.replace("Tuesday", "Friday"),
        ),
        (
            "code-edit",
            format!("Rename the function to rolling_mean and return the code only:\n\n```python\n{code}```"),
            format!("```python\n{}```", code.replace("moving_average", "rolling_mean")),
        ),
    ]
}

/// Speculative decoding against plain decode (greedy, the same session settings), alternating
/// runs, medians of `reps`; every speculative output is checked against the plain one. Then the
/// verification pass: 4 positions in one pass against one decode step, alternating.
fn speculative(
    model: &Model,
    adapters: &[(llama_core::Adapter, f32)],
    lookup: bool,
    draft: Option<Model>,
    draft_max: usize,
    reps: usize,
) -> Result<serde_json::Value, Box<dyn std::error::Error>> {
    use llama_core::Draft;
    let run = |ids: &[u32],
               d: Option<Draft>|
     -> Result<llama_core::Generation, Box<dyn std::error::Error>> {
        let mut s = model.session(SessionOptions::default().n_ctx(2048))?;
        s.set_adapters(adapters)?;
        let mut smp = Sampler::greedy();
        let mut opts = GenerateOptions::default().max_tokens(256);
        opts.draft = d;
        opts.draft_max = draft_max;
        Ok(s.generate(ids, &mut smp, opts, |_| ControlFlow::Continue(()))?)
    };
    let mut runs = vec![];
    for (task, user, predicted) in copy_tasks() {
        let ids = model.chat_tokens(&[Message::user(user)], Default::default())?;
        let mut sources: Vec<(&str, Draft)> = vec![];
        if lookup {
            sources.push(("lookup", Draft::Lookup));
            sources.push(("predict", Draft::Prediction(predicted.clone())));
        }
        if let Some(m) = &draft {
            sources.push(("draft", Draft::Model(m.clone())));
        }
        for (name, d) in sources {
            let (mut plain, mut spec) = (vec![], vec![]);
            let (mut identical, mut drafted, mut accepted) = (true, 0, 0);
            for _ in 0..reps {
                let p = run(&ids, None)?;
                let g = run(&ids, Some(d.clone()))?;
                identical &= p.tokens == g.tokens;
                drafted = g.timings.drafted_tokens;
                accepted = g.timings.accepted_tokens;
                plain.push(p.timings.generation_tps());
                spec.push(g.timings.generation_tps());
            }
            let (p, g) = (median(plain), median(spec));
            runs.push(json!({
                "task": task, "draft": name, "tps": g, "plain_tps": p, "speedup": g / p,
                "drafted": drafted, "accepted": accepted, "identical": identical,
            }));
        }
    }
    // The verification pass: the next token and 3 drafted ones against one decode step, at the
    // same position of two sessions with the same 64-token context.
    let vocab = model.config().vocab_size;
    let ctx = bench_tokens(64, vocab);
    let new = || -> Result<llama_core::Session, Box<dyn std::error::Error>> {
        let mut s = model.session(SessionOptions::default().n_ctx(256))?;
        s.set_adapters(adapters)?;
        s.eval(&ctx)?;
        Ok(s)
    };
    let (mut one, mut four) = (new()?, new()?);
    let (mut t1, mut t4) = (vec![], vec![]);
    let next = bench_tokens(4, vocab);
    for _ in 0..16 * reps {
        let t = Instant::now();
        one.eval(&next[..1])?;
        t1.push(t.elapsed().as_secs_f64());
        one.truncate(ctx.len());
        let t = Instant::now();
        four.eval_verify(next[0], &next[1..])?;
        t4.push(t.elapsed().as_secs_f64());
        four.truncate(ctx.len());
    }
    let (d, v) = (median(t1), median(t4));
    Ok(json!({
        "runs": runs,
        "verify": {"positions": 4, "verify_ms": v * 1e3, "decode_ms": d * 1e3, "ratio": v / d},
    }))
}
