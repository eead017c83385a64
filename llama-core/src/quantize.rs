//! Quantization: the per-tensor type rules shared by quantize-at-load and `quantize_model`
//! (which writes a GGUF file from a GGUF file or a Hugging Face folder), multi-threaded row
//! quantization, and the GGUF tokenizer metadata synthesised from a Hugging Face tokenizer.
//!
//! Type rules follow llama.cpp's defaults: norms (1-D tensors) stay f32; the output head (or
//! the token embedding when it is tied to the head) becomes Q6_K, or Q8_0 when its rows are not
//! a multiple of 256 or the target is Q8_0; every other matrix gets the requested type, falling
//! back (Q4_K to Q5_0, Q5_K to Q5_1, Q6_K to Q8_0) when its rows do not fit the block size.

use std::path::Path;

use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType};
use candle_core::{DType, Device};

use crate::config::{Config, Llama3Band, RopeScaling};
use crate::error::{Error, Result};
use crate::gguf::{GgufFile, Value};
use crate::gguf::{GgufTensorInfo, GgufWriter};
use crate::tokenizer::Tokenizer;
use crate::weights::{permute_rows_for_gguf, W};

pub use crate::types::FileType;
pub(crate) use crate::types::{tensor_type, Role, TypeRules};

pub use crate::codec::{dequantize, quantize_rows};
pub(crate) use crate::codec::{par_map, pool_of, tensor_bytes};

/// Options for [`quantize_model`].
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct QuantizeOptions {
    /// Type of the weight matrices.
    pub ty: FileType,
    /// Type of the output head (and of a tied embedding); default as llama.cpp.
    pub output_type: Option<FileType>,
    /// Type of an untied token embedding; default: `ty`.
    pub embedding_type: Option<FileType>,
    /// Worker threads (0: one per physical core).
    pub threads: usize,
}

impl QuantizeOptions {
    /// Options for `ty` with llama.cpp's default rules.
    pub fn new(ty: FileType) -> Self {
        QuantizeOptions {
            ty,
            output_type: None,
            embedding_type: None,
            threads: 0,
        }
    }
}

/// What [`quantize_model`] did.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct QuantizeReport {
    /// Tensors written.
    pub tensors: usize,
    /// Bytes of the file written.
    pub bytes: u64,
    /// Type fallbacks (rows that do not fit the requested block size): each distinct note and
    /// how many tensors it applies to.
    pub fallbacks: Vec<(String, usize)>,
    /// Tensors per storage type, as `(type, count)`.
    pub types: Vec<(String, usize)>,
}

struct Job {
    name: String,
    shape: Vec<usize>,
    role: Role,
    /// Source: a GGUF tensor name, or a weight of a Hugging Face folder (with its Q/K
    /// permutation head count), or rope factors computed here.
    from: JobSource,
}

enum JobSource {
    Gguf,
    Hf(W, Option<usize>),
    Values(Vec<f32>),
}

/// Writes a GGUF file of the model at `src` (a GGUF file or a Hugging Face folder) with its
/// weights converted to `opts.ty`. From a Hugging Face folder the file gets llama.cpp's
/// metadata: hyper-parameters, tokenizer (vocabulary, merges or scores, token types, special
/// ids, pre-tokenizer name), chat template, and Q/K rows in llama.cpp's order.
///
/// Tensors are converted a few at a time on `opts.threads` threads and streamed to a temporary
/// file renamed into place at the end; the whole model is never held in memory.
pub fn quantize_model(
    src: &Path,
    dst: &Path,
    opts: &QuantizeOptions,
    progress: impl FnMut(usize, usize),
) -> Result<QuantizeReport> {
    merge_model(src, dst, opts, &[], progress)
}

/// [`quantize_model`] with LoRA adapters merged into the weights first: each projection an
/// adapter updates becomes `W + sum scale * B A` (the update computed in f64 from the f32 base
/// values, then converted to `opts.ty`). The adapters must fit the model at `src`.
pub fn merge_model(
    src: &Path,
    dst: &Path,
    opts: &QuantizeOptions,
    adapters: &[(crate::Adapter, f32)],
    mut progress: impl FnMut(usize, usize),
) -> Result<QuantizeReport> {
    let threads = crate::pool::thread_count(opts.threads)?;
    let rules = TypeRules {
        base: Some(opts.ty),
        output: opts.output_type,
        embedding: opts.embedding_type,
    };
    let meta_dir = std::fs::metadata(src).map_err(|e| Error::io(src, e))?;
    let (meta, jobs, source) = if meta_dir.is_dir() {
        let parts = crate::weights::open_hf(src)?;
        let meta = hf_metadata(
            src,
            &parts.config,
            &parts.tokenizer,
            &parts.tokenizer_json,
            parts.chat_template.as_deref(),
            opts.ty,
        )?;
        let jobs = hf_jobs(&parts.config, parts.src.has(W::Output));
        (meta, jobs, Source::Hf(parts.src))
    } else {
        let g = GgufFile::open(src)?;
        let cfg = Config::from_gguf(&g)?;
        cfg.validate(src)?;
        let mut meta: Vec<(String, Value)> = g
            .metadata
            .iter()
            .filter(|(k, _)| k.as_str() != "general.alignment")
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        meta.sort_by(|a, b| a.0.cmp(&b.0));
        meta.retain(|(k, _)| k != "general.file_type" && k != "general.quantization_version");
        meta.push((
            "general.file_type".into(),
            Value::U32(opts.ty.gguf_file_type()),
        ));
        if matches!(opts.ty, FileType::Quant(_)) {
            meta.push(("general.quantization_version".into(), Value::U32(2)));
        }
        let tied = !g.tensors.contains_key("output.weight");
        let jobs = g
            .tensor_order
            .iter()
            .map(|name| {
                let shape = g.tensors[name].shape.clone();
                let role = if shape.len() < 2 {
                    Role::Vector
                } else if name == "output.weight" || (name == "token_embd.weight" && tied) {
                    Role::Output
                } else if name == "token_embd.weight" {
                    Role::Embedding
                } else {
                    Role::Matrix
                };
                Job {
                    name: name.clone(),
                    shape,
                    role,
                    from: JobSource::Gguf,
                }
            })
            .collect();
        (meta, jobs, Source::Gguf(g))
    };
    // Types first: the header needs every tensor's size.
    let mut report = QuantizeReport::default();
    let mut infos = Vec::with_capacity(jobs.len());
    let mut types = Vec::with_capacity(jobs.len());
    for j in &jobs {
        let row = *j.shape.last().unwrap_or(&1);
        let (t, note) = tensor_type(j.role, &rules, row);
        let t = t.unwrap_or(FileType::F32);
        if let Some(n) = note {
            tracing::debug!(tensor = %j.name, "{n}");
            match report.fallbacks.iter_mut().find(|(k, _)| *k == n) {
                Some((_, c)) => *c += 1,
                None => report.fallbacks.push((n, 1)),
            }
        }
        let elems: usize = j.shape.iter().product();
        infos.push(GgufTensorInfo {
            name: j.name.clone(),
            shape: j.shape.clone(),
            dtype: t.ggml(),
            bytes: tensor_bytes(t.ggml(), elems),
        });
        types.push(t);
        let key = format!("{:?}", t.ggml());
        match report.types.iter_mut().find(|(k, _)| *k == key) {
            Some((_, n)) => *n += 1,
            None => report.types.push((key, 1)),
        }
    }
    if let Source::Gguf(g) = &source {
        if let Some(q) = g
            .tensors
            .values()
            .find(|t| !matches!(t.dtype, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16))
        {
            tracing::warn!(
                "the input is already quantized ({:?}): converting again adds the new type's error to the old",
                q.dtype
            );
        }
    }
    let cfg_for_lora = match &source {
        Source::Gguf(g) => Config::from_gguf(g)?,
        Source::Hf(_) => crate::weights::open_hf(src)?.config,
    };
    let lora = Lora {
        adapters,
        config: &cfg_for_lora,
    };
    let mut w = GgufWriter::create(dst, &meta, &infos)?;
    let n = jobs.len();
    // Whole tensors in parallel when they are small; rows in parallel within large ones.
    let mut i = 0;
    while i < n {
        let batch = (i..n).take(threads).collect::<Vec<_>>();
        let outer = batch.len();
        let inner = (threads / outer).max(1);
        let results = par_map(&batch, pool_of(threads)?, |&k| {
            convert_one(&source, &jobs[k], types[k], inner, &lora)
        })?;
        for (k, r) in batch.iter().zip(results) {
            let bytes = r?;
            w.write_tensor(*k, &bytes)?;
            progress(k + 1, n);
        }
        i += outer;
    }
    report.tensors = n;
    report.bytes = w.finish()?;
    Ok(report)
}

enum Source {
    Gguf(GgufFile),
    Hf(crate::weights::WeightSource),
}

/// The adapters a merge adds, and the model's configuration (for the Q/K row order).
struct Lora<'a> {
    adapters: &'a [(crate::Adapter, f32)],
    config: &'a Config,
}

impl Lora<'_> {
    /// The update of GGUF tensor `name` (GGUF row order), if an adapter changes it.
    fn delta(&self, name: &str, shape: &[usize]) -> Result<Option<Vec<f32>>> {
        if self.adapters.is_empty() {
            return Ok(None);
        }
        let Some((l, t)) = crate::lora::target_of_gguf_name(name) else {
            return Ok(None);
        };
        let (out, inp) = t.shape(self.config);
        if shape != [out, inp] {
            return Err(Error::InvalidArgument(format!(
                "{name}: the model's tensor is {shape:?}, the adapter's update [{out}, {inp}]"
            )));
        }
        let Some(d) = crate::Adapter::delta(self.adapters, l, t, (out, inp)) else {
            return Ok(None);
        };
        Ok(Some(match t.permuted_heads(self.config) {
            Some(heads) => {
                let bytes: Vec<u8> = d.iter().flat_map(|x| x.to_le_bytes()).collect();
                permute_rows_for_gguf(&bytes, out, heads)
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect()
            }
            None => d,
        }))
    }
}

fn convert_one(
    source: &Source,
    job: &Job,
    ty: FileType,
    threads: usize,
    lora: &Lora<'_>,
) -> Result<Vec<u8>> {
    let row = *job.shape.last().unwrap_or(&1);
    let delta = lora.delta(&job.name, &job.shape)?;
    let mut values = convert_values(source, job, ty, delta.is_some())?;
    let Some(d) = delta else {
        return match values {
            Converted::Bytes(b) => Ok(b),
            Converted::Values(v) => quantize_rows(&v, row, ty, threads),
        };
    };
    let Converted::Values(v) = &mut values else {
        return Err(Error::InvalidArgument(
            "merge: tensor copied as stored".into(),
        ));
    };
    for (x, d) in v.iter_mut().zip(&d) {
        *x += d;
    }
    quantize_rows(v, row, ty, threads)
}

enum Converted {
    /// Already in the output type.
    Bytes(Vec<u8>),
    Values(Vec<f32>),
}

/// A tensor's f32 values (GGUF row order), or its bytes when they are already of type `ty`
/// and `need_values` is false.
fn convert_values(
    source: &Source,
    job: &Job,
    ty: FileType,
    need_values: bool,
) -> Result<Converted> {
    let values: Vec<f32> = match (&job.from, source) {
        (JobSource::Values(v), _) => v.clone(),
        (JobSource::Gguf, Source::Gguf(g)) => {
            let (info, data) = g
                .tensor_data(&job.name)
                .ok_or_else(|| Error::weights(g.path(), &job.name, "tensor is missing"))?;
            if info.dtype == ty.ggml() && !need_values {
                let v = data.to_vec();
                g.release(&job.name);
                return Ok(Converted::Bytes(v));
            }
            if matches!(
                info.dtype,
                GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16
            ) {
                let v = crate::weights::gguf_dense_values(data, info.dtype);
                g.release(&job.name);
                return Ok(Converted::Values(v));
            }
            let store = crate::matrix::aligned(data);
            let q = qtensor_from_ggml(
                info.dtype,
                crate::matrix::as_bytes(&store, data.len()),
                info.shape.clone(),
                &Device::Cpu,
            )
            .map_err(|e| Error::weights(g.path(), &job.name, e.to_string()))?;
            drop(store);
            let v = q
                .dequantize(&Device::Cpu)?
                .flatten_all()?
                .to_dtype(DType::F32)?
                .to_vec1()?;
            g.release(&job.name);
            v
        }
        (JobSource::Hf(w, perm), Source::Hf(src)) => {
            let v = src.load_values(*w, &job.shape)?;
            match perm {
                Some(heads) => {
                    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                    permute_rows_for_gguf(&bytes, job.shape[0], *heads)
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect()
                }
                None => v,
            }
        }
        _ => return Err(Error::InvalidArgument("tensor source mismatch".into())),
    };
    Ok(Converted::Values(values))
}

fn hf_jobs(c: &Config, has_output: bool) -> Vec<Job> {
    let mut jobs: Vec<Job> = crate::plan::Plan::new(c)
        .tensors(has_output)
        .into_iter()
        .map(|(w, shape, perm)| {
            let role = match w {
                _ if shape.len() == 1 => Role::Vector,
                W::Embed if has_output => Role::Embedding,
                W::Embed | W::Output => Role::Output,
                _ => Role::Matrix,
            };
            Job {
                name: w.gguf_name(),
                shape,
                role,
                from: JobSource::Hf(w, perm),
            }
        })
        .collect();
    if matches!(c.rope_scaling, RopeScaling::Llama3 { .. }) {
        // The llama3 rescaling as per-dimension divisors of the inverse frequencies, as
        // llama.cpp's converter stores it.
        let d = c.head_dim;
        let factors = (0..d / 2)
            .map(|i| {
                let f = 1.0 / c.rope_theta.powf((2 * i) as f64 / d as f64);
                match c.rope_scaling.llama3_band(f) {
                    Some(Llama3Band::Divide(factor)) => factor as f32,
                    Some(Llama3Band::Blend { factor, s }) => {
                        (1.0 / ((1.0 - s) / factor + s)) as f32
                    }
                    Some(Llama3Band::Keep) | None => 1.0,
                }
            })
            .collect();
        jobs.push(Job {
            name: "rope_freqs.weight".into(),
            shape: vec![d / 2],
            role: Role::Vector,
            from: JobSource::Values(factors),
        });
    }
    jobs
}

/// llama.cpp metadata for a Hugging Face model: hyper-parameters and tokenizer.
fn hf_metadata(
    dir: &Path,
    c: &Config,
    tok: &Tokenizer,
    tok_json: &serde_json::Value,
    chat_template: Option<&str>,
    ty: FileType,
) -> Result<Vec<(String, Value)>> {
    let s = |x: &str| Value::String(x.to_string());
    let u = |x: usize| Value::U32(x as u32);
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    let mut m: Vec<(String, Value)> = vec![
        ("general.architecture".into(), s("llama")),
        ("general.name".into(), s(&name)),
        ("general.file_type".into(), Value::U32(ty.gguf_file_type())),
        ("llama.vocab_size".into(), u(c.vocab_size)),
        ("llama.context_length".into(), u(c.max_position_embeddings)),
        ("llama.embedding_length".into(), u(c.hidden_size)),
        ("llama.block_count".into(), u(c.num_hidden_layers)),
        ("llama.feed_forward_length".into(), u(c.intermediate_size)),
        (
            "llama.attention.head_count".into(),
            u(c.num_attention_heads),
        ),
        (
            "llama.attention.head_count_kv".into(),
            u(c.num_key_value_heads),
        ),
        (
            "llama.rope.freq_base".into(),
            Value::F32(c.rope_theta as f32),
        ),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            Value::F32(c.rms_norm_eps as f32),
        ),
        ("llama.rope.dimension_count".into(), u(c.head_dim)),
    ];
    if matches!(ty, FileType::Quant(_)) {
        m.push(("general.quantization_version".into(), Value::U32(2)));
    }
    if c.head_dim * c.num_attention_heads != c.hidden_size {
        m.push(("llama.attention.key_length".into(), u(c.head_dim)));
        m.push(("llama.attention.value_length".into(), u(c.head_dim)));
    }
    match c.rope_scaling {
        RopeScaling::Linear { factor } => {
            m.push(("llama.rope.scaling.type".into(), s("linear")));
            m.push((
                "llama.rope.scaling.factor".into(),
                Value::F32(factor as f32),
            ));
        }
        RopeScaling::Dynamic { .. } => {
            return Err(Error::InvalidArgument(format!(
                "{}: rope_scaling `dynamic` has no GGUF representation that llama.cpp reads",
                dir.display()
            )))
        }
        // Llama 3: written as the rope_freqs.weight tensor.
        RopeScaling::Llama3 { .. } | RopeScaling::None => {}
    }
    m.extend(tokenizer_metadata(c, tok, tok_json)?);
    if let Some(t) = chat_template {
        m.push(("tokenizer.chat_template".into(), s(t)));
    }
    Ok(m)
}

/// Every normalizer / pre-tokenizer component, flattening `Sequence`s.
fn find_components<'a>(v: &'a serde_json::Value, out: &mut Vec<&'a serde_json::Value>) {
    let inner = v
        .get("normalizers")
        .or_else(|| v.get("pretokenizers"))
        .and_then(|x| x.as_array());
    match inner {
        Some(items) => items.iter().for_each(|x| find_components(x, out)),
        None => out.push(v),
    }
}

/// One pre-tokenizer step of a tokenizer.json, as a regex.
fn pre_regexes(p: &serde_json::Value, out: &mut Vec<String>) -> std::result::Result<(), String> {
    let ty = p.get("type").and_then(|t| t.as_str()).unwrap_or("");
    match ty {
        "Sequence" => {
            for q in p
                .get("pretokenizers")
                .and_then(|v| v.as_array())
                .into_iter()
                .flatten()
            {
                pre_regexes(q, out)?;
            }
        }
        "Split" => {
            let pat = p.get("pattern");
            if let Some(r) = pat.and_then(|x| x.get("Regex")).and_then(|x| x.as_str()) {
                out.push(r.to_string());
            } else {
                return Err(format!("Split pre-tokenizer with pattern {pat:?}"));
            }
        }
        "Digits" => {
            let single = p
                .get("individual_digits")
                .and_then(|v| v.as_bool())
                .unwrap_or(false);
            out.push(if single { r"\p{N}" } else { r"\p{N}+" }.into());
        }
        "ByteLevel" => {
            if p.get("use_regex").and_then(|v| v.as_bool()).unwrap_or(true) {
                out.push(crate::tokenizer::GPT2_REGEX.into());
            }
        }
        other => return Err(format!("pre-tokenizer `{other}`")),
    }
    Ok(())
}

/// GGUF `tokenizer.*` metadata for a Hugging Face tokenizer, as llama.cpp's converter writes it.
fn tokenizer_metadata(
    c: &Config,
    tok: &Tokenizer,
    j: &serde_json::Value,
) -> Result<Vec<(String, Value)>> {
    let err = |m: String| Error::Tokenizer(format!("cannot describe this tokenizer in GGUF: {m}"));
    let model = j.get("model").ok_or_else(|| err("no `model`".into()))?;
    if model.get("type").and_then(|t| t.as_str()) != Some("BPE") {
        return Err(err(format!(
            "tokenizer model {:?} (only BPE and SentencePiece-BPE are supported)",
            model.get("type")
        )));
    }
    let byte_fallback = model
        .get("byte_fallback")
        .and_then(|v| v.as_bool())
        .unwrap_or(false);
    let n = c.vocab_size;
    let mut tokens: Vec<Option<String>> = vec![None; n];
    let mut types = vec![1i32; n];
    let vocab = model
        .get("vocab")
        .and_then(|v| v.as_object())
        .ok_or_else(|| err("no vocabulary".into()))?;
    let mut put = |id: u64, text: &str| -> Result<()> {
        let slot = tokens.get_mut(id as usize).ok_or_else(|| {
            err(format!(
                "token id {id} ({text:?}) is outside the embedding of {n} rows"
            ))
        })?;
        *slot = Some(text.to_string());
        Ok(())
    };
    for (text, id) in vocab {
        put(
            id.as_u64().ok_or_else(|| err("non-integer id".into()))?,
            text,
        )?;
    }
    for a in j
        .get("added_tokens")
        .and_then(|v| v.as_array())
        .into_iter()
        .flatten()
    {
        let (Some(id), Some(text)) = (
            a.get("id").and_then(|v| v.as_u64()),
            a.get("content").and_then(|v| v.as_str()),
        ) else {
            continue;
        };
        put(id, text)?;
        let special = a.get("special").and_then(|v| v.as_bool()).unwrap_or(false);
        types[id as usize] = if special { 3 } else { 4 };
    }
    let unk_text = model.get("unk_token").and_then(|v| v.as_str());
    let tokens: Vec<String> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            t.unwrap_or_else(|| {
                types[i] = 5;
                format!("[PAD{i}]")
            })
        })
        .collect();
    let merges: Vec<String> = model
        .get("merges")
        .and_then(|v| v.as_array())
        .into_iter()
        .flatten()
        .map(|m| match m {
            serde_json::Value::String(s) => Ok(s.clone()),
            serde_json::Value::Array(p) if p.len() == 2 => Ok(format!(
                "{} {}",
                p[0].as_str().unwrap_or_default(),
                p[1].as_str().unwrap_or_default()
            )),
            _ => Err(err("malformed merge".into())),
        })
        .collect::<Result<_>>()?;
    let mut m: Vec<(String, Value)> = vec![];
    if byte_fallback {
        // SentencePiece vocabulary (Llama 1/2, TinyLlama): llama.cpp merges by token score. A
        // token made by the merge of rank r scores -r, so llama.cpp merges in the same order.
        for (i, t) in tokens.iter().enumerate() {
            if Some(t.as_str()) == unk_text {
                types[i] = 2;
            } else if t.len() == 6 && t.starts_with("<0x") && t.ends_with('>') && types[i] == 1 {
                types[i] = 6;
            }
        }
        let index: std::collections::HashMap<&str, usize> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.as_str(), i))
            .collect();
        let mut scores = vec![f32::NAN; n];
        for (rank, mg) in merges.iter().enumerate() {
            let joined: String = mg.split(' ').collect();
            if let Some(&id) = index.get(joined.as_str()) {
                if scores[id].is_nan() {
                    scores[id] = -(rank as f32);
                }
            }
        }
        let floor = -(merges.len() as f32);
        for (i, s) in scores.iter_mut().enumerate() {
            if s.is_nan() {
                *s = if types[i] == 1 { floor - i as f32 } else { 0.0 };
            }
        }
        // A leading `▁` is added to the text when the normalizer prepends it or a Metaspace
        // pre-tokenizer does.
        let mut found = vec![];
        for part in [j.get("normalizer"), j.get("pre_tokenizer")]
            .into_iter()
            .flatten()
        {
            find_components(part, &mut found);
        }
        let prefix = found
            .iter()
            .any(|c| match c.get("type").and_then(|t| t.as_str()) {
                Some("Prepend") => c.get("prepend").and_then(|p| p.as_str()) == Some("\u{2581}"),
                Some("Metaspace") => {
                    c.get("prepend_scheme").and_then(|p| p.as_str()) != Some("never")
                        && c.get("add_prefix_space").and_then(|p| p.as_bool()) != Some(false)
                }
                _ => false,
            });
        m.push(("tokenizer.ggml.model".into(), Value::String("llama".into())));
        m.push((
            "tokenizer.ggml.scores".into(),
            Value::Array(scores.into_iter().map(Value::F32).collect()),
        ));
        m.push((
            "tokenizer.ggml.add_space_prefix".into(),
            Value::Bool(prefix),
        ));
        if let Some(u) = unk_text.and_then(|t| index.get(t)) {
            m.push((
                "tokenizer.ggml.unknown_token_id".into(),
                Value::U32(*u as u32),
            ));
        }
    } else {
        let mut regexes = vec![];
        if let Some(p) = j.get("pre_tokenizer").filter(|p| !p.is_null()) {
            pre_regexes(p, &mut regexes).map_err(err)?;
        }
        let pre = crate::tokenizer::pre_name_for_regexes(&regexes).ok_or_else(|| {
            err(format!(
                "no llama.cpp pre-tokenizer matches the regexes {regexes:?}"
            ))
        })?;
        m.push(("tokenizer.ggml.model".into(), Value::String("gpt2".into())));
        m.push(("tokenizer.ggml.pre".into(), Value::String(pre.into())));
        m.push((
            "tokenizer.ggml.merges".into(),
            Value::Array(merges.into_iter().map(Value::String).collect()),
        ));
    }
    m.push((
        "tokenizer.ggml.tokens".into(),
        Value::Array(tokens.into_iter().map(Value::String).collect()),
    ));
    m.push((
        "tokenizer.ggml.token_type".into(),
        Value::Array(types.into_iter().map(Value::I32).collect()),
    ));
    if let Some(b) = tok.bos_id() {
        m.push(("tokenizer.ggml.bos_token_id".into(), Value::U32(b)));
    }
    let eos = tok.eos_id().or(c.eos_token_ids.first().copied());
    if let Some(e) = eos {
        m.push(("tokenizer.ggml.eos_token_id".into(), Value::U32(e)));
    }
    // Further end ids from config.json / generation_config.json.
    let extra: Vec<u32> = c
        .eos_token_ids
        .iter()
        .copied()
        .filter(|id| Some(*id) != eos)
        .collect();
    for (key, id) in ["tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"]
        .iter()
        .zip(extra)
    {
        m.push((key.to_string(), Value::U32(id)));
    }
    m.push((
        "tokenizer.ggml.add_bos_token".into(),
        Value::Bool(tok.adds_bos()),
    ));
    m.push((
        "tokenizer.ggml.add_eos_token".into(),
        Value::Bool(tok.adds_eos()),
    ));
    Ok(m)
}
