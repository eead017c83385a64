//! The Llama model: one implementation over dense (f32/f16/bf16) and quantized (GGUF block)
//! weights, immutable after load and shared by any number of sessions.

mod rope;

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::exec::{Kernel, Settings};
use crate::gguf::GgufFile;
use crate::kv_cache::KvCache;
use crate::matrix::{self, Linear, Matmul};
use crate::pool::Runtime;
use crate::tokenizer::Tokenizer;
use crate::weights::{WeightSource, W};
use rope::Rope;

/// Progress of a model load, reported once per tensor.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct LoadProgress {
    /// Tensors loaded so far.
    pub loaded: usize,
    /// Tensors to load in total.
    pub total: usize,
}

impl LoadProgress {
    /// Fraction done, 0.0 to 1.0.
    pub fn fraction(&self) -> f32 {
        if self.total == 0 {
            1.0
        } else {
            self.loaded as f32 / self.total as f32
        }
    }
}

/// Callback for load progress; return `ControlFlow::Break(())` to abort the load.
pub type ProgressFn<'a> = Box<dyn FnMut(&LoadProgress) -> ControlFlow<()> + Send + 'a>;

/// Options for [`Model::load`].
#[derive(Default)]
#[non_exhaustive]
pub struct ModelOptions<'a> {
    /// Called after each tensor is loaded.
    pub progress: Option<ProgressFn<'a>>,
    /// Quantize dense (f32/f16/bf16) weight matrices while loading, with llama.cpp's default
    /// rules: the output head (or a tied embedding) becomes Q6_K, or Q8_0 when its rows are
    /// not a multiple of 256 or the type is Q8_0; an untied embedding gets this type; rows that
    /// do not fit a k-quant's super-block fall back (Q4_K to Q5_0, Q5_K to Q5_1, Q6_K to Q8_0).
    /// Weights already quantized are kept as they are.
    pub quantize: Option<QuantType>,
    /// Overrides the type of the output head (and of a tied embedding) when quantizing.
    pub quantize_output: Option<QuantType>,
    /// Overrides the type of an untied token embedding when quantizing.
    pub quantize_embedding: Option<QuantType>,
    /// Which kernels compute (default: the widest this CPU runs). Weights are laid out for the
    /// path at load, so it is fixed for the model's life.
    pub kernel: Kernel,
    /// Threads for loading (quantize-at-load, regrouping) and for the sessions that do not set
    /// their own (`0`: one per physical core).
    pub threads: usize,
    /// Keep the file's row layout instead of regrouping rows for the SIMD kernels (slower; for
    /// comparing layouts).
    pub keep_file_layout: bool,
}

/// Block types for quantizing at load time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum QuantType {
    /// 8-bit, blocks of 32.
    Q8_0,
    /// 4-bit, blocks of 32, scale only.
    Q4_0,
    /// 4-bit, blocks of 32, scale and minimum.
    Q4_1,
    /// 5-bit, blocks of 32, scale only.
    Q5_0,
    /// 5-bit, blocks of 32, scale and minimum.
    Q5_1,
    /// 4-bit k-quant (super-blocks of 256).
    Q4K,
    /// 5-bit k-quant (super-blocks of 256).
    Q5K,
    /// 6-bit k-quant (super-blocks of 256).
    Q6K,
}

impl QuantType {
    /// Parses `q8_0`, `q4_0`, `q4_1`, `q5_0`, `q5_1`, `q4_k`, `q5_k`, `q6_k` (case-insensitive).
    pub fn parse(s: &str) -> Result<QuantType> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "q8_0" => QuantType::Q8_0,
            "q4_0" => QuantType::Q4_0,
            "q4_1" => QuantType::Q4_1,
            "q5_0" => QuantType::Q5_0,
            "q5_1" => QuantType::Q5_1,
            "q4_k" | "q4k" => QuantType::Q4K,
            "q5_k" | "q5k" => QuantType::Q5K,
            "q6_k" | "q6k" => QuantType::Q6K,
            other => {
                return Err(Error::InvalidArgument(format!(
                    "unknown quantization type `{other}` (q8_0, q4_0, q4_1, q5_0, q5_1, q4_k, q5_k, q6_k)"
                )))
            }
        })
    }

    pub(crate) fn from_ggml(t: candle_core::quantized::GgmlDType) -> QuantType {
        use candle_core::quantized::GgmlDType as G;
        match t {
            G::Q4_0 => QuantType::Q4_0,
            G::Q4_1 => QuantType::Q4_1,
            G::Q5_0 => QuantType::Q5_0,
            G::Q5_1 => QuantType::Q5_1,
            G::Q4K => QuantType::Q4K,
            G::Q5K => QuantType::Q5K,
            G::Q6K => QuantType::Q6K,
            _ => QuantType::Q8_0,
        }
    }

    pub(crate) fn ggml(self) -> candle_core::quantized::GgmlDType {
        use candle_core::quantized::GgmlDType as G;
        match self {
            QuantType::Q8_0 => G::Q8_0,
            QuantType::Q4_0 => G::Q4_0,
            QuantType::Q4_1 => G::Q4_1,
            QuantType::Q5_0 => G::Q5_0,
            QuantType::Q5_1 => G::Q5_1,
            QuantType::Q4K => G::Q4K,
            QuantType::Q5K => G::Q5K,
            QuantType::Q6K => G::Q6K,
        }
    }

    /// The type used when a row length is not a multiple of this type's block size (as
    /// llama.cpp falls back for k-quants).
    pub(crate) fn fallback(self) -> Option<QuantType> {
        match self {
            QuantType::Q4K => Some(QuantType::Q5_0),
            QuantType::Q5K => Some(QuantType::Q5_1),
            QuantType::Q6K => Some(QuantType::Q8_0),
            _ => None,
        }
    }
}

impl<'a> ModelOptions<'a> {
    /// Quantizes dense weights while loading.
    pub fn with_quantize(mut self, q: QuantType) -> Self {
        self.quantize = Some(q);
        self
    }

    /// Overrides the output head's type when quantizing (see [`ModelOptions::quantize`]).
    pub fn with_quantize_output(mut self, q: QuantType) -> Self {
        self.quantize_output = Some(q);
        self
    }

    /// Overrides an untied embedding's type when quantizing.
    pub fn with_quantize_embedding(mut self, q: QuantType) -> Self {
        self.quantize_embedding = Some(q);
        self
    }

    /// Chooses the kernel path (see [`Kernel`]).
    pub fn with_kernel(mut self, k: Kernel) -> Self {
        self.kernel = k;
        self
    }

    /// Sets the thread count (`0`: one per physical core).
    pub fn with_threads(mut self, n: usize) -> Self {
        self.threads = n;
        self
    }

    /// Sets a progress callback.
    pub fn with_progress(
        mut self,
        f: impl FnMut(&LoadProgress) -> ControlFlow<()> + Send + 'a,
    ) -> Self {
        self.progress = Some(Box::new(f));
        self
    }
}

impl std::fmt::Debug for ModelOptions<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelOptions")
            .field("progress", &self.progress.is_some())
            .field("quantize", &self.quantize)
            .field("quantize_output", &self.quantize_output)
            .field("quantize_embedding", &self.quantize_embedding)
            .field("kernel", &self.kernel)
            .field("threads", &self.threads)
            .field("keep_file_layout", &self.keep_file_layout)
            .finish()
    }
}

/// Projections of the same input (Q, K, V; gate, up) with their outputs side by side: one
/// stacked matrix where the parts are stored alike ([`Matmul::stack`]: one pass over the
/// activations, one pool call), else one matrix per part.
struct Stack {
    mats: Vec<Linear>,
    /// Output width of each part.
    widths: Vec<usize>,
}

impl Stack {
    fn new(parts: Vec<Matmul>, widths: Vec<usize>) -> Result<Stack> {
        let mats = Matmul::stack(parts)?
            .into_iter()
            .map(matrix::build)
            .collect::<Result<Vec<_>>>()?;
        Ok(Stack { mats, widths })
    }

    /// All the parts' outputs side by side.
    fn width(&self) -> usize {
        self.widths.iter().sum()
    }

    /// The parts' outputs for `m` rows of `xs`, side by side in `out` (`[m, width]`).
    fn matmul_into(&self, xs: &[f32], m: usize, out: &mut [f32]) -> Result<()> {
        let stride = self.width();
        if let [one] = self.mats.as_slice() {
            return matrix::matmul_cols(&**one, xs, m, out, (stride, 0, stride));
        }
        let mut col = 0;
        for (mat, &n) in self.mats.iter().zip(&self.widths) {
            matrix::matmul_cols(&**mat, xs, m, out, (stride, col, n))?;
            col += n;
        }
        Ok(())
    }

    /// The `N` parts' outputs as tensors (candle's tensor path).
    fn forward<const N: usize>(&self, x: &Tensor) -> Result<[Tensor; N]> {
        let out = if let [one] = self.mats.as_slice() {
            let y = one.forward(x)?;
            let last = y.rank() - 1;
            let mut col = 0;
            let mut out = Vec::with_capacity(self.widths.len());
            for &n in &self.widths {
                out.push(y.narrow(last, col, n)?);
                col += n;
            }
            out
        } else {
            self.mats
                .iter()
                .map(|m| m.forward(x))
                .collect::<Result<Vec<_>>>()?
        };
        out.try_into().map_err(|v: Vec<Tensor>| {
            Error::InvalidArgument(format!("{} projections where {N} were expected", v.len()))
        })
    }
}

struct Layer {
    attn_norm: Tensor,
    /// Q, K and V.
    qkv: Stack,
    o: Linear,
    ffn_norm: Tensor,
    /// Gate and up.
    gate_up: Stack,
    down: Linear,
}

pub(crate) struct Inner {
    pub(crate) config: Config,
    pub(crate) tokenizer: Tokenizer,
    pub(crate) chat_template: Option<String>,
    pub(crate) path: PathBuf,
    pub(crate) format: &'static str,
    pub(crate) weight_type: String,
    pub(crate) fingerprint: u64,
    embed: Linear,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Linear,
    rope: Rope,
    device: Device,
    /// The kernel settings the weights were laid out for, and the default pool.
    pub(crate) runtime: Runtime,
}

/// What a model is built from: its weights (still mapped), configuration, tokenizer and template.
struct Parts {
    src: WeightSource,
    config: Config,
    tokenizer: Tokenizer,
    chat_template: Option<String>,
    format: &'static str,
}

/// Sentence embeddings from [`Model::embed`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Embeddings {
    /// Mean of the final hidden states over all tokens (`hidden_size` values).
    pub mean: Vec<f32>,
    /// Final hidden state of the last token.
    pub last: Vec<f32>,
    /// Tokens embedded.
    pub n_tokens: usize,
}

/// How [`Model::embed_pooled`] pools the final hidden states of a text's tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Pooling {
    /// The mean over every token.
    #[default]
    Mean,
    /// The last token's.
    Last,
}

impl Pooling {
    /// Parses `mean` or `last`.
    pub fn parse(s: &str) -> Result<Pooling> {
        match s {
            "mean" => Ok(Pooling::Mean),
            "last" => Ok(Pooling::Last),
            other => Err(Error::InvalidArgument(format!(
                "pooling must be 'mean' or 'last', not {other:?}"
            ))),
        }
    }
    /// The name [`Pooling::parse`] takes.
    pub fn as_str(self) -> &'static str {
        match self {
            Pooling::Mean => "mean",
            Pooling::Last => "last",
        }
    }
}

impl Embeddings {
    /// The embedding pooled as `p`.
    pub fn pooled(&self, p: Pooling) -> &[f32] {
        match p {
            Pooling::Mean => &self.mean,
            Pooling::Last => &self.last,
        }
    }
}

/// A loaded model: immutable, cheap to clone (shared), `Send + Sync`.
#[derive(Clone)]
pub struct Model {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let c = &self.inner.config;
        f.debug_struct("Model")
            .field("path", &self.inner.path)
            .field("format", &self.inner.format)
            .field("weights", &self.inner.weight_type)
            .field("layers", &c.num_hidden_layers)
            .field("hidden_size", &c.hidden_size)
            .field("heads", &c.num_attention_heads)
            .field("kv_heads", &c.num_key_value_heads)
            .field("vocab_size", &c.vocab_size)
            .finish()
    }
}

fn fnv1a(h: &mut u64, bytes: &[u8]) {
    for &b in bytes {
        *h ^= b as u64;
        *h = h.wrapping_mul(0x100_0000_01b3);
    }
}

impl Model {
    /// Loads a model from a GGUF file or a Hugging Face folder (config.json, safetensors,
    /// tokenizer.json).
    pub fn load(path: impl AsRef<Path>, mut options: ModelOptions<'_>) -> Result<Model> {
        let path = path.as_ref();
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        let q = |t: Option<QuantType>| t.map(crate::quantize::FileType::Quant);
        let quantize = crate::quantize::TypeRules {
            base: q(options.quantize),
            output: q(options.quantize_output),
            embedding: q(options.quantize_embedding),
        };
        let settings = Settings::new(options.kernel, !options.keep_file_layout)?;
        let runtime = Runtime::new(settings, options.threads)?;
        let progress = options.progress.as_mut();
        let t0 = std::time::Instant::now();
        let model = runtime.run(|| {
            if meta.is_dir() {
                Self::load_hf(path, progress, quantize, runtime)
            } else {
                Self::load_gguf(path, progress, quantize, runtime)
            }
        })?;
        tracing::info!(
            path = %path.display(),
            format = model.format(),
            weights = model.weight_type(),
            kernel = settings.kernel.as_str(),
            threads = runtime.threads(),
            secs = t0.elapsed().as_secs_f64(),
            "model loaded"
        );
        Ok(model)
    }

    fn load_gguf(
        path: &Path,
        progress: Option<&mut ProgressFn<'_>>,
        quantize: crate::quantize::TypeRules,
        runtime: Runtime,
    ) -> Result<Model> {
        let mut g = GgufFile::open(path)?;
        let config = Config::from_gguf(&g)?;
        config.validate(path)?;
        let tokenizer = Tokenizer::from_gguf(&g)?;
        let chat_template = g
            .get("tokenizer.chat_template")
            .and_then(|v| v.as_str())
            .map(str::to_string);
        // The vocabulary arrays (~10 MiB of strings for a 49k vocabulary) now live in the
        // tokenizer; freeing them before the weights load lowers the load's peak memory.
        for key in [
            "tokenizer.ggml.tokens",
            "tokenizer.ggml.merges",
            "tokenizer.ggml.scores",
            "tokenizer.ggml.token_type",
        ] {
            g.metadata.remove(key);
        }
        let src = WeightSource::Gguf(g);
        let parts = Parts {
            src,
            config,
            tokenizer,
            chat_template,
            format: "gguf",
        };
        Self::build(parts, progress, quantize, runtime)
    }

    fn load_hf(
        dir: &Path,
        progress: Option<&mut ProgressFn<'_>>,
        quantize: crate::quantize::TypeRules,
        runtime: Runtime,
    ) -> Result<Model> {
        let parts = open_hf(dir)?;
        let parts = Parts {
            src: parts.src,
            config: parts.config,
            tokenizer: parts.tokenizer,
            chat_template: parts.chat_template,
            format: "safetensors",
        };
        Self::build(parts, progress, quantize, runtime)
    }

    fn build(
        parts: Parts,
        mut progress: Option<&mut ProgressFn<'_>>,
        quantize: crate::quantize::TypeRules,
        runtime: Runtime,
    ) -> Result<Model> {
        let Parts {
            src,
            config,
            tokenizer,
            chat_template,
            format,
        } = parts;
        let c = &config;
        let (h, hd, nh, nkv) = (
            c.hidden_size,
            c.head_dim,
            c.num_attention_heads,
            c.num_key_value_heads,
        );
        let tied = !src.has(W::Output);
        let total = 3 + 9 * c.num_hidden_layers + usize::from(!tied);
        let mut loaded = 0usize;
        let mut tick = |n: usize| -> Result<()> {
            loaded += n;
            if let Some(p) = progress.as_mut() {
                if p(&LoadProgress { loaded, total }).is_break() {
                    return Err(Error::Cancelled);
                }
            }
            Ok(())
        };
        if tokenizer.vocab_size() > c.vocab_size {
            tracing::debug!(
                tokenizer = tokenizer.vocab_size(),
                model = c.vocab_size,
                "tokenizer has more ids than the embedding"
            );
        }
        let is_gguf = matches!(src, WeightSource::Gguf(_));
        let perm_q = is_gguf.then_some(nh);
        let perm_k = is_gguf.then_some(nkv);
        use crate::quantize::Role;
        let embed_role = if tied { Role::Output } else { Role::Embedding };
        let rules = &quantize;
        let embed = matrix::build(src.load_matmul(
            W::Embed,
            &[c.vocab_size, h],
            None,
            embed_role,
            rules,
        )?)?;
        tick(1)?;
        let load = |w: W, shape: &[usize], perm: Option<usize>| {
            src.load_matmul(w, shape, perm, Role::Matrix, rules)
        };
        let mat =
            |w: W, shape: &[usize]| -> Result<Linear> { matrix::build(load(w, shape, None)?) };
        let ff = c.intermediate_size;
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for l in 0..c.num_hidden_layers {
            let qkv = vec![
                load(W::Q(l), &[nh * hd, h], perm_q)?,
                load(W::K(l), &[nkv * hd, h], perm_k)?,
                load(W::V(l), &[nkv * hd, h], None)?,
            ];
            let gate_up = vec![
                load(W::Gate(l), &[ff, h], None)?,
                load(W::Up(l), &[ff, h], None)?,
            ];
            let layer = Layer {
                attn_norm: src.load_dense(W::AttnNorm(l), &[h])?,
                qkv: Stack::new(qkv, vec![nh * hd, nkv * hd, nkv * hd])?,
                o: mat(W::O(l), &[h, nh * hd])?,
                ffn_norm: src.load_dense(W::FfnNorm(l), &[h])?,
                gate_up: Stack::new(gate_up, vec![ff, ff])?,
                down: mat(W::Down(l), &[h, ff])?,
            };
            layers.push(layer);
            tick(9)?;
        }
        let norm = src.load_dense(W::OutputNorm, &[h])?;
        tick(1)?;
        let lm_head = if tied {
            embed.clone()
        } else {
            let m = src.load_matmul(W::Output, &[c.vocab_size, h], None, Role::Output, rules)?;
            tick(1)?;
            matrix::build(m)?
        };
        let freq_factors = if is_gguf && src.has(W::RopeFreqs) {
            let t = src.load_dense(W::RopeFreqs, &[hd / 2])?;
            Some(t.to_vec1::<f32>()?)
        } else {
            None
        };
        tick(1)?;
        let rope = Rope::new(c, freq_factors.as_deref());
        // A dense f32 matrix reports the file's type (BF16 weights compute as f32).
        let weight_type = match layers.first().and_then(|l| l.qkv.mats.first()) {
            Some(m) if m.dtype() != candle_core::quantized::GgmlDType::F32 => {
                format!("{:?}", m.dtype())
            }
            _ => src.dtype_name(W::Q(0)).unwrap_or_default(),
        };
        let path = src.path().to_path_buf();
        // Fingerprint: configuration, load-time quantization and the first bytes of every
        // weight as stored (no dequantization at load).
        let mut fp = 0xcbf2_9ce4_8422_2325u64;
        fnv1a(&mut fp, format!("{c:?} {quantize:?}").as_bytes());
        for l in 0..c.num_hidden_layers {
            for w in [
                W::Q(l),
                W::K(l),
                W::V(l),
                W::O(l),
                W::Gate(l),
                W::Up(l),
                W::Down(l),
            ] {
                fnv1a(&mut fp, &src.raw_prefix(w, 256));
            }
        }
        fnv1a(&mut fp, &src.raw_prefix(W::Embed, 256));
        fnv1a(&mut fp, &src.raw_prefix(W::Output, 256));
        drop(src);
        Ok(Model {
            inner: Arc::new(Inner {
                config,
                tokenizer,
                chat_template,
                path,
                format,
                weight_type,
                fingerprint: fp,
                embed,
                layers,
                norm,
                lm_head,
                rope,
                device: Device::Cpu,
                runtime,
            }),
        })
    }

    /// The model's hyper-parameters.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }
    /// The model's tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.inner.tokenizer
    }
    /// The chat template shipped with the model, if any.
    pub fn chat_template(&self) -> Option<&str> {
        self.inner.chat_template.as_deref()
    }
    /// The file or folder the model was loaded from.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }
    /// `"gguf"` or `"safetensors"`.
    pub fn format(&self) -> &str {
        self.inner.format
    }
    /// The kernel path the model computes on (never [`Kernel::Auto`]).
    pub fn kernel(&self) -> Kernel {
        self.inner.runtime.settings.kernel
    }
    /// Threads of the model's pool (sessions that do not set their own use it).
    pub fn threads(&self) -> usize {
        self.inner.runtime.threads()
    }
    /// Storage type of the attention weights (e.g. `Q4_1`, `F32`).
    pub fn weight_type(&self) -> &str {
        &self.inner.weight_type
    }
    /// Number of parameters (weights of every layer, embedding, norms and output head).
    pub fn n_params(&self) -> usize {
        let c = &self.inner.config;
        let (h, hd, nh, nkv, ff) = (
            c.hidden_size,
            c.head_dim,
            c.num_attention_heads,
            c.num_key_value_heads,
            c.intermediate_size,
        );
        let layer = h * nh * hd * 2 + h * nkv * hd * 2 + 3 * h * ff + 2 * h;
        let head = if c.tie_word_embeddings {
            0
        } else {
            c.vocab_size * h
        };
        c.vocab_size * h + c.num_hidden_layers * layer + h + head
    }

    /// Bytes the weight matrices occupy in memory (embedding, every layer's projections and
    /// the output head; a tied head counted once).
    pub fn weight_bytes(&self) -> usize {
        let m = &*self.inner;
        let layers: usize = m
            .layers
            .iter()
            .map(|l| {
                let stacks: usize = l
                    .qkv
                    .mats
                    .iter()
                    .chain(&l.gate_up.mats)
                    .map(|w| w.bytes())
                    .sum();
                stacks + l.o.bytes() + l.down.bytes()
            })
            .sum();
        let head = if Arc::ptr_eq(&m.embed, &m.lm_head) {
            0
        } else {
            m.lm_head.bytes()
        };
        m.embed.bytes() + layers + head
    }

    /// A hash of the configuration and weights, used to check saved session state.
    pub fn fingerprint(&self) -> u64 {
        self.inner.fingerprint
    }
    /// Tokenizes with llama.cpp semantics (see [`Tokenizer::encode`]).
    pub fn tokenize(&self, text: &str, add_special: bool, parse_special: bool) -> Result<Vec<u32>> {
        self.inner
            .tokenizer
            .encode(text, add_special, parse_special)
    }
    /// Decodes ids to text (special tokens rendered when `special`).
    pub fn detokenize(&self, ids: &[u32], special: bool) -> Result<String> {
        self.inner.tokenizer.decode(ids, special)
    }

    /// An empty cache for `n_ctx` positions, f16 (`half`) or f32.
    pub(crate) fn new_cache(&self, n_ctx: usize, half: bool) -> KvCache {
        let c = &self.inner.config;
        KvCache::new(
            c.num_hidden_layers,
            c.num_key_value_heads,
            c.head_dim,
            n_ctx,
            if half { DType::F16 } else { DType::F32 },
        )
    }

    /// Embeddings of a text: the final hidden states (after the output RMSNorm), mean-pooled
    /// over the tokens and of the last token. The text is tokenized with BOS as the model asks
    /// and without special-token parsing.
    pub fn embed(&self, text: &str) -> Result<Embeddings> {
        let ids = self.tokenize(text, true, false)?;
        self.embed_tokens(&ids)
    }

    /// The embedding of `text` pooled as `pooling` (`hidden_size` values).
    pub fn embed_pooled(&self, text: &str, pooling: Pooling) -> Result<Vec<f32>> {
        let e = self.embed(text)?;
        Ok(match pooling {
            Pooling::Mean => e.mean,
            Pooling::Last => e.last,
        })
    }

    /// Embeddings of a token sequence (see [`Model::embed`]).
    pub fn embed_tokens(&self, tokens: &[u32]) -> Result<Embeddings> {
        if tokens.is_empty() {
            return Err(Error::InvalidArgument(
                "cannot embed an empty sequence".into(),
            ));
        }
        self.inner.tokenizer.check_ids(tokens)?;
        if let Some(&bad) = tokens
            .iter()
            .find(|&&t| t as usize >= self.inner.config.vocab_size)
        {
            return Err(Error::InvalidArgument(format!(
                "token id {bad} is outside the model's vocabulary"
            )));
        }
        let mut cache = self.new_cache(tokens.len(), false);
        let mut rows: Vec<Vec<f32>> = vec![];
        self.inner.runtime.run(|| -> Result<()> {
            for chunk in tokens.chunks(512) {
                let h = self.forward_hidden(chunk, &mut cache)?;
                rows.extend(h.to_vec2::<f32>()?);
            }
            Ok(())
        })?;
        let dim = self.inner.config.hidden_size;
        let mut mean = vec![0f32; dim];
        for r in &rows {
            for (m, v) in mean.iter_mut().zip(r) {
                *m += v / rows.len() as f32;
            }
        }
        Ok(Embeddings {
            mean,
            last: rows.last().cloned().unwrap_or_default(),
            n_tokens: rows.len(),
        })
    }

    /// Runs `tokens` at the cache's next positions and returns the final hidden states
    /// `(len, hidden)` after the output norm. The caller checks capacity and ids.
    pub(crate) fn forward_hidden(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Tensor> {
        if crate::kernels::enabled() {
            return self.forward_rows(tokens, cache);
        }
        self.forward_tensors(tokens, cache)
    }

    /// [`Model::forward_hidden`] on our kernels over plain row-major buffers allocated once per
    /// call and reused by every layer (no per-op tensors, transposes or page faults).
    fn forward_rows(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Tensor> {
        use crate::kernels::{add_in_place, input_f32, rms_norm_rows, swiglu_rows};
        let m = &*self.inner;
        let half_cache = cache.dtype() == DType::F16;
        let c = &m.config;
        let t = tokens.len();
        let start = cache.len();
        let (nh, nkv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let (hidden, ffn) = (c.hidden_size, c.intermediate_size);
        let (qw, kw) = (nh * hd, nkv * hd);
        let dev = &m.device;
        cache.reserve(t, dev)?;
        let mut x: Vec<f32> = m.embed.rows(tokens)?.flatten_all()?.to_vec1()?;
        let (cos, sin) = m.rope.tables(start, t);
        let mut hn = vec![0f32; t * hidden];
        // Q, K and V side by side in each row, then gate and up.
        let qkv_w = qw + 2 * kw;
        let (mut qkv, mut att) = (vec![0f32; t * qkv_w], vec![0f32; t * qw]);
        let (mut k, mut v) = (vec![0f32; t * kw], vec![0f32; t * kw]);
        let mut o = vec![0f32; t * hidden];
        let (mut gu, mut a) = (vec![0f32; t * 2 * ffn], vec![0f32; t * ffn]);
        let scale = (1.0 / (hd as f64).sqrt()) as f32;
        let eps = c.rms_norm_eps as f32;
        for (li, l) in m.layers.iter().enumerate() {
            rms_norm_rows(&x, &input_f32(&l.attn_norm)?, eps, &mut hn);
            l.qkv.matmul_into(&hn, t, &mut qkv)?;
            m.rope.apply(&mut qkv, t, nh, qkv_w, (&cos, &sin));
            m.rope.apply(&mut qkv[qw..], t, nkv, qkv_w, (&cos, &sin));
            for (row, (kr, vr)) in qkv
                .chunks_exact(qkv_w)
                .zip(k.chunks_exact_mut(kw).zip(v.chunks_exact_mut(kw)))
            {
                kr.copy_from_slice(&row[qw..qw + kw]);
                vr.copy_from_slice(&row[qw + kw..]);
            }
            // An f16 cache rounds keys and values as it stores them.
            let kt = Tensor::from_slice(&k, (1, t, nkv, hd), dev)?.transpose(1, 2)?;
            let vt = Tensor::from_slice(&v, (1, t, nkv, hd), dev)?.transpose(1, 2)?;
            let (k_all, v_all) = cache.append(li, &kt, &vt)?;
            let queries = crate::attention::Queries {
                data: &qkv,
                heads: nh,
                rows: t,
                head_dim: hd,
                head_stride: hd,
                row_stride: qkv_w,
            };
            crate::attention::causal_into(
                &queries, &k_all, &v_all, start, scale, half_cache, &mut att,
            )?;
            matrix::matmul_into(&*l.o, &att, t, &mut o)?;
            add_in_place(&mut x, &o);
            rms_norm_rows(&x, &input_f32(&l.ffn_norm)?, eps, &mut hn);
            l.gate_up.matmul_into(&hn, t, &mut gu)?;
            swiglu_rows(&gu, ffn, &mut a);
            matrix::matmul_into(&*l.down, &a, t, &mut o)?;
            add_in_place(&mut x, &o);
        }
        cache.advance(t);
        rms_norm_rows(&x, &input_f32(&m.norm)?, eps, &mut hn);
        Ok(Tensor::from_vec(hn, (t, hidden), dev)?)
    }

    /// [`Model::forward_hidden`] with candle's tensor ops (`Kernel::Candle`).
    fn forward_tensors(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Tensor> {
        let m = &*self.inner;
        let c = &m.config;
        let t = tokens.len();
        let start = cache.len();
        let (nh, nkv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let group = nh / nkv;
        let dev = &m.device;
        cache.reserve(t, dev)?;
        let mut x = m.embed.rows(tokens)?.reshape((1, t, c.hidden_size))?;
        let (cos, sin) = m.rope.cos_sin(start, t, dev)?;
        let total = start + t;
        // The additive causal mask.
        let mask = if t > 1 {
            let mut v = vec![0f32; t * total];
            for i in 0..t {
                for j in (start + i + 1)..total {
                    v[i * total + j] = f32::NEG_INFINITY;
                }
            }
            Some(Tensor::from_vec(v, (t, total), dev)?)
        } else {
            None
        };
        let scale = 1.0 / (hd as f64).sqrt();
        let eps = c.rms_norm_eps as f32;
        for (li, l) in m.layers.iter().enumerate() {
            let hn = candle_nn::ops::rms_norm(&x, &l.attn_norm, eps)?;
            let [q, k, v] = l.qkv.forward(&hn)?;
            let q = q.reshape((1, t, nh, hd))?.transpose(1, 2)?.contiguous()?;
            let k = k.reshape((1, t, nkv, hd))?.transpose(1, 2)?.contiguous()?;
            let v = v.reshape((1, t, nkv, hd))?.transpose(1, 2)?.contiguous()?;
            let q = candle_nn::rotary_emb::rope(&q, &cos, &sin)?;
            let k = candle_nn::rotary_emb::rope(&k, &cos, &sin)?;
            // An f16 cache rounds keys and values as it stores them.
            let (k_all, v_all) = cache.append(li, &k, &v)?;
            let y = {
                // candle's tensor ops (for comparison: `Kernel::Candle`).
                let k_all = k_all.squeeze(0)?.to_dtype(DType::F32)?;
                let v_all = v_all.squeeze(0)?.to_dtype(DType::F32)?;
                // Each KV head serves `group` query heads: fold the group into the rows so keys
                // and values are read once per KV head, with no repeated copies.
                let q = q.reshape((nkv, group * t, hd))?;
                let att = (q.matmul(&k_all.t()?)? * scale)?;
                let att = match &mask {
                    Some(mk) => att
                        .reshape((nkv, group, t, total))?
                        .broadcast_add(mk)?
                        .reshape((nkv, group * t, total))?,
                    None => att,
                };
                let att = candle_nn::ops::softmax_last_dim(&att)?;
                att.matmul(&v_all.contiguous()?)?
                    .reshape((nh, t, hd))?
                    .transpose(0, 1)?
                    .reshape((1, t, nh * hd))?
            };
            let y = l.o.forward(&y)?;
            x = (x + y)?;
            let hn = candle_nn::ops::rms_norm(&x, &l.ffn_norm, eps)?;
            let [g, u] = l.gate_up.forward(&hn)?;
            let a = (candle_nn::ops::silu(&g)? * u)?;
            let y = l.down.forward(&a)?;
            x = (x + y)?;
        }
        cache.advance(t);
        let x = candle_nn::ops::rms_norm(&x, &m.norm, eps)?;
        Ok(x.squeeze(0)?)
    }

    /// Output-head logits `(rows, vocab)` for hidden states `(rows, hidden)`.
    pub(crate) fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let h = hidden.unsqueeze(0)?.contiguous()?;
        Ok(self
            .inner
            .lm_head
            .forward(&h)?
            .squeeze(0)?
            .to_dtype(DType::F32)?)
    }

    /// Last-row logits as a vector.
    pub(crate) fn last_logits(&self, hidden: &Tensor) -> Result<Vec<f32>> {
        let n = hidden.dim(0)?;
        let last = hidden.narrow(0, n - 1, 1)?;
        Ok(self.logits(&last)?.squeeze(0)?.to_vec1::<f32>()?)
    }
}

#[allow(dead_code)]
fn _assert_send_sync() {
    fn is<T: Send + Sync>() {}
    is::<Model>();
}

/// The pieces of a Hugging Face model folder, parsed and checked, weights still mapped.
pub(crate) struct HfParts {
    pub(crate) config: Config,
    pub(crate) tokenizer: Tokenizer,
    pub(crate) chat_template: Option<String>,
    pub(crate) src: WeightSource,
    /// The raw tokenizer.json.
    pub(crate) tokenizer_json: serde_json::Value,
}

pub(crate) fn open_hf(dir: &Path) -> Result<HfParts> {
    let cfg_path = dir.join("config.json");
    if !cfg_path.is_file() {
        return Err(Error::config(
                dir,
                "not a model folder: config.json is missing (expected a Hugging Face folder or a .gguf file)",
            ));
    }
    let mut config = Config::from_hf_json(&cfg_path)?;
    config.validate(&cfg_path)?;
    let read_json = |name: &str| -> Result<Option<serde_json::Value>> {
        let p = dir.join(name);
        if !p.is_file() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| Error::config(&p, format!("not valid JSON: {e}")))
    };
    // EOS ids: config.json, generation_config.json and the tokenizer's own, unioned.
    if let Some(gen) = read_json("generation_config.json")? {
        let mut add = |v: &serde_json::Value| {
            if let Some(id) = v.as_u64() {
                if !config.eos_token_ids.contains(&(id as u32)) {
                    config.eos_token_ids.push(id as u32);
                }
            }
        };
        match gen.get("eos_token_id") {
            Some(serde_json::Value::Array(a)) => a.iter().for_each(&mut add),
            Some(v) => add(v),
            None => {}
        }
    }
    let tok_cfg = read_json("tokenizer_config.json")?;
    let tok_path = dir.join("tokenizer.json");
    if !tok_path.is_file() {
        return Err(Error::Tokenizer(format!(
            "{} is missing (the model folder needs a fast tokenizer file)",
            tok_path.display()
        )));
    }
    let mut tokenizer = Tokenizer::from_hf_files(&tok_path, tok_cfg.as_ref())?;
    tokenizer.add_eog(&config.eos_token_ids);
    let mut chat_template = tok_cfg
        .as_ref()
        .and_then(|c| c.get("chat_template"))
        .and_then(|v| v.as_str())
        .map(str::to_string);
    let jinja = dir.join("chat_template.jinja");
    if jinja.is_file() {
        chat_template = Some(std::fs::read_to_string(&jinja).map_err(|e| Error::io(&jinja, e))?);
    }
    // Weight files: the sharded index, model.safetensors, or every *.safetensors.
    let index = dir.join("model.safetensors.index.json");
    let files: Vec<PathBuf> = if index.is_file() {
        let idx = read_json("model.safetensors.index.json")?.unwrap_or_default();
        let map = idx
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::config(&index, "missing weight_map"))?;
        let mut files: Vec<PathBuf> = vec![];
        for v in map.values() {
            let f = v
                .as_str()
                .filter(|f| !f.contains("..") && !f.starts_with('/'))
                .ok_or_else(|| Error::config(&index, "invalid file name in weight_map"))?;
            let p = dir.join(f);
            if !files.contains(&p) {
                files.push(p);
            }
        }
        files
    } else if dir.join("model.safetensors").is_file() {
        vec![dir.join("model.safetensors")]
    } else {
        let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| Error::io(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        v.sort();
        v
    };
    if files.is_empty() {
        return Err(Error::weights(
            dir,
            "",
            "no .safetensors weight files found",
        ));
    }
    for f in &files {
        if !f.is_file() {
            return Err(Error::io(
                f,
                std::io::Error::new(std::io::ErrorKind::NotFound, "weight shard is missing"),
            ));
        }
    }
    let st = crate::weights::StFiles::open(&files)?;
    let src = WeightSource::SafeTensors {
        st,
        dir: dir.to_path_buf(),
    };
    let tokenizer_json: serde_json::Value = std::fs::read_to_string(&tok_path)
        .map_err(|e| Error::io(&tok_path, e))
        .and_then(|t| {
            serde_json::from_str(&t)
                .map_err(|e| Error::Tokenizer(format!("{}: {e}", tok_path.display())))
        })?;
    Ok(HfParts {
        config,
        tokenizer,
        chat_template,
        src,
        tokenizer_json,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quantize::{quantize_rows, FileType};
    use crate::test_util::values;
    use candle_core::quantized::QMatMul;

    /// A `[n, k]` matrix of seeded values stored as `ty` (F32: dense values).
    fn part(ty: FileType, n: usize, k: usize, seed: u32) -> Matmul {
        let vals = values(n * k, seed);
        match ty {
            FileType::F16 => Matmul::F16 {
                pieces: vec![vals.iter().map(|&v| half::f16::from_f32(v)).collect()],
                n,
                k,
            },
            FileType::F32 => Matmul::Candle(QMatMul::Tensor(
                Tensor::from_vec(vals, (n, k), &Device::Cpu).unwrap(),
            )),
            FileType::Quant(q) => {
                let bytes = quantize_rows(&vals, k, ty, 1).unwrap();
                match crate::kernels::BlockFmt::from_ggml(q.ggml()) {
                    Some(fmt) if crate::kernels::enabled() => {
                        Matmul::Blocks(crate::kernels::BlockMatrix::new(fmt, &bytes, n, k).unwrap())
                    }
                    _ => {
                        let store = crate::matrix::aligned(&bytes);
                        let q = candle_core::quantized::ggml_file::qtensor_from_ggml(
                            q.ggml(),
                            crate::matrix::as_bytes(&store, bytes.len()),
                            vec![n, k],
                            &Device::Cpu,
                        )
                        .unwrap();
                        Matmul::Candle(QMatMul::from_qtensor(q).unwrap())
                    }
                }
            }
        }
    }

    #[test]
    fn stacked_projections_equal_the_separate_matrices() {
        use FileType::{Quant, F16, F32};
        use QuantType::*;
        // (part types, widths, k, matrices expected once stacked where the types allow). The
        // outputs are bit-identical to the separate matrices' wherever the stacked matrix keeps
        // the parts' layout.
        let cases: Vec<(Vec<FileType>, Vec<usize>, usize, usize)> = vec![
            (vec![F16; 3], vec![64, 32, 32], 96, 1),
            // 24 and 8 rows are too few for 16-row groups (a dot product per row), 32 stacked
            // rows are grouped, a group taking rows from both parts: the same values summed in
            // another order.
            (vec![F16; 2], vec![24, 8], 32, 1),
            (vec![Quant(Q8_0); 3], vec![64, 32, 32], 96, 1),
            (vec![Quant(Q5_1); 2], vec![48, 48], 64, 1),
            (vec![Quant(Q4K); 3], vec![32, 16, 16], 256, 1),
            (vec![F32; 2], vec![24, 40], 32, 1),
            // Stored differently: one matrix each.
            (vec![Quant(Q8_0), Quant(Q4_0), F16], vec![64, 32, 32], 64, 3),
            (
                vec![Quant(Q4K), Quant(Q6K), Quant(Q4K)],
                vec![32, 16, 16],
                256,
                3,
            ),
        ];
        for (types, widths, k, expect) in cases {
            let parts = || -> Vec<Matmul> {
                types
                    .iter()
                    .zip(&widths)
                    .enumerate()
                    .map(|(i, (&ty, &n))| part(ty, n, k, 7 + i as u32))
                    .collect()
            };
            let stack = Stack::new(parts(), widths.clone()).unwrap();
            let single: Vec<Linear> = parts()
                .into_iter()
                .map(|p| matrix::build(p).unwrap())
                .collect();
            if crate::kernels::enabled() {
                assert_eq!(stack.mats.len(), expect, "{types:?}");
            }
            let total = stack.width();
            let regrouped =
                widths.iter().any(|w| !w.is_multiple_of(16)) && total.is_multiple_of(16);
            let same = |got: &[f32], want: &[f32], what: &str| {
                if regrouped && crate::kernels::enabled() {
                    for (a, b) in got.iter().zip(want) {
                        assert!(
                            (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                            "{what}: {a} vs {b}"
                        );
                    }
                } else {
                    assert_eq!(got, want, "{what}");
                }
            };
            for m in [1usize, 3, 13] {
                let xs = values(m * k, 99);
                let mut got = vec![f32::NAN; m * total];
                stack.matmul_into(&xs, m, &mut got).unwrap();
                let mut col = 0;
                for (lin, &n) in single.iter().zip(&widths) {
                    let mut want = vec![0f32; m * n];
                    matrix::matmul_into(&**lin, &xs, m, &mut want).unwrap();
                    for r in 0..m {
                        same(
                            &got[r * total + col..][..n],
                            &want[r * n..][..n],
                            &format!("{types:?} m={m} row {r}, columns from {col}"),
                        );
                    }
                    col += n;
                }
                // candle's tensor path splits the same outputs.
                let x = Tensor::from_vec(xs.clone(), (1, m, k), &Device::Cpu).unwrap();
                let outs: [Tensor; 3] = match widths.len() {
                    3 => stack.forward(&x).unwrap(),
                    _ => {
                        let [a, b] = stack.forward(&x).unwrap();
                        [a, b.clone(), b]
                    }
                };
                for (o, (lin, &n)) in outs.iter().zip(single.iter().zip(&widths)) {
                    assert_eq!(o.dims(), &[1, m, n]);
                    let want = lin.forward(&x).unwrap().flatten_all().unwrap();
                    let got = o.flatten_all().unwrap();
                    same(
                        &got.to_vec1::<f32>().unwrap(),
                        &want.to_vec1::<f32>().unwrap(),
                        &format!("{types:?} m={m} tensor path"),
                    );
                }
            }
            // A wrong number of parts is an error, not a panic.
            if widths.len() == 3 {
                let x = Tensor::zeros((1, 1, k), DType::F32, &Device::Cpu).unwrap();
                assert!(stack.forward::<2>(&x).is_err());
            }
        }
    }
}
