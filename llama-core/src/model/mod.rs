//! The Llama model: one implementation over dense (f32/f16/bf16) and quantized (GGUF block)
//! weights, immutable after load and shared by any number of sessions.

mod chat;
pub use chat::ChatOptions;
mod forward;
pub(crate) use forward::BatchSeq;
mod load;
pub(crate) mod rope;
mod stack;

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::exec::{Kernel, Settings};
use crate::kv_cache::KvCache;
use crate::matrix::{self, Linear, Matmul};
use crate::plan::Plan;
use crate::pool::Runtime;
use crate::tokenizer::Tokenizer;
pub use crate::types::QuantType;
use crate::weights::{WeightSource, W};
pub(crate) use rope::Rope;
use stack::Stack;

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

impl<'a> ModelOptions<'a> {
    setters! {
        /// Quantizes dense weights while loading.
        with_quantize(q: QuantType) => quantize = Some(q);
        /// Overrides the output head's type when quantizing (see [`ModelOptions::quantize`]).
        with_quantize_output(q: QuantType) => quantize_output = Some(q);
        /// Overrides an untied embedding's type when quantizing.
        with_quantize_embedding(q: QuantType) => quantize_embedding = Some(q);
        /// Chooses the kernel path (see [`Kernel`]).
        with_kernel(k: Kernel) => kernel = k;
        /// Sets the thread count (`0`: one per physical core).
        with_threads(n: usize) => threads = n;
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

/// One decoder layer's weights, as its [`LayerPlan`] lists them: the two norms and one
/// [`Stack`] per projection group, in the plan's order (`LayerPlan::groups`).
struct Layer {
    attn_norm: Tensor,
    ffn_norm: Tensor,
    stacks: Vec<Stack>,
}

/// What training reads of a model: every frozen weight, as references.
pub(crate) struct TrainView<'a> {
    pub(crate) config: &'a Config,
    pub(crate) embed: &'a Linear,
    pub(crate) lm_head: &'a Linear,
    pub(crate) norm: Vec<f32>,
    pub(crate) rope: &'a Rope,
    pub(crate) layers: Vec<LayerView<'a>>,
}

/// One layer of a [`TrainView`]: norms as f32, projections with their output columns.
pub(crate) struct LayerView<'a> {
    /// What the layer is made of.
    pub(crate) plan: &'a crate::plan::LayerPlan,
    pub(crate) attn_norm: Vec<f32>,
    pub(crate) qkv: Vec<(&'a Linear, usize)>,
    pub(crate) o: &'a Linear,
    pub(crate) ffn_norm: Vec<f32>,
    pub(crate) gate_up: Vec<(&'a Linear, usize)>,
    pub(crate) down: &'a Linear,
}

impl Model {
    pub(crate) fn train_view(&self) -> Result<TrainView<'_>> {
        let m = &*self.inner;
        let f32s = |t: &Tensor| -> Result<Vec<f32>> {
            Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
        };
        Ok(TrainView {
            config: &m.config,
            embed: &m.embed,
            lm_head: &m.lm_head,
            norm: f32s(&m.norm)?,
            rope: &m.rope,
            layers: m
                .layers
                .iter()
                .zip(&m.plan.layers)
                .map(|(l, plan)| {
                    let [qkv, o, gate_up, down] = l.stacks.as_slice() else {
                        return Err(Error::UnsupportedArchitecture(
                            "training runs on Llama layers (attention then SwiGLU) only".into(),
                        ));
                    };
                    Ok(LayerView {
                        plan,
                        attn_norm: f32s(&l.attn_norm)?,
                        qkv: qkv.parts(),
                        o: &o.mats[0],
                        ffn_norm: f32s(&l.ffn_norm)?,
                        gate_up: gate_up.parts(),
                        down: &down.mats[0],
                    })
                })
                .collect::<Result<_>>()?,
        })
    }

    /// The runtime (kernel settings and pool) of the model.
    pub(crate) fn runtime(&self) -> Runtime {
        self.inner.runtime
    }
}

pub(crate) struct Inner {
    pub(crate) config: Config,
    pub(crate) tokenizer: Tokenizer,
    pub(crate) chat_template: Option<String>,
    pub(crate) path: PathBuf,
    pub(crate) format: &'static str,
    pub(crate) weight_type: String,
    pub(crate) fingerprint: u64,
    /// What each layer is made of (every pass reads it).
    pub(crate) plan: Plan,
    embed: Linear,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Linear,
    rope: Rope,
    device: Device,
    /// Adapters loaded for this model (snapshots find theirs here).
    adapters: std::sync::Mutex<Vec<std::sync::Weak<crate::lora::AdapterInner>>>,
    /// The kernel settings the weights were laid out for, and the default pool.
    pub(crate) runtime: Runtime,
    /// llguidance's token table and parser factory, built on the first constraint.
    pub(crate) constraints: std::sync::OnceLock<Result<crate::constrain::Compiler, String>>,
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
        let (m, c) = (&*self.inner, &self.inner.config);
        write!(
            f,
            "Model({}, {} {}, {} layers, hidden {}, heads {}/{}, vocab {})",
            m.path.display(),
            m.format,
            m.weight_type,
            c.num_hidden_layers,
            c.hidden_size,
            c.num_attention_heads,
            c.num_key_value_heads,
            c.vocab_size
        )
    }
}

impl Model {
    /// The model's hyper-parameters.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }
    /// The model's tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.inner.tokenizer
    }

    /// Compiles a constraint for generation on this model ([`crate::GenerateOptions::constraint`]
    /// compiles its own; compile once here to reuse it, or to check a schema up front). The
    /// first call builds the model's token table (~50 ms for a 49k vocabulary).
    pub fn compile_constraint(
        &self,
        c: &crate::constrain::Constraint,
    ) -> Result<crate::constrain::Grammar> {
        crate::constrain::compiler(&self.inner.constraints, &self.inner.tokenizer)?
            .compile(c, &self.inner.tokenizer)
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
        let plan = &self.inner.plan;
        let layers: usize = plan.layers.iter().map(|l| l.n_params()).sum();
        let head = if c.tie_word_embeddings {
            0
        } else {
            plan.vocab * plan.hidden
        };
        plan.vocab * plan.hidden + layers + plan.hidden + head
    }

    /// Bytes the weight matrices occupy in memory (embedding, every layer's projections and
    /// the output head; a tied head counted once).
    pub fn weight_bytes(&self) -> usize {
        let m = &*self.inner;
        let head = if Arc::ptr_eq(&m.embed, &m.lm_head) {
            0
        } else {
            m.lm_head.bytes()
        };
        m.embed.bytes() + self.layer_bytes() + head
    }

    /// Bytes of every layer's projection matrices.
    fn layer_bytes(&self) -> usize {
        self.inner
            .layers
            .iter()
            .flat_map(|l| &l.stacks)
            .flat_map(|s| &s.mats)
            .map(|w| w.bytes())
            .sum()
    }

    /// Bytes of weight matrices one decode step reads: every layer's projections and the output
    /// head, as stored in memory (the embedding gives one row, unless it is the tied head).
    /// Divided into a measured bandwidth, the fastest decode the memory allows.
    pub fn decode_bytes(&self) -> usize {
        self.layer_bytes() + self.inner.lm_head.bytes()
    }

    /// A hash of the configuration and weights, used to check saved session state.
    pub fn fingerprint(&self) -> u64 {
        self.inner.fingerprint
    }

    /// Loads a LoRA adapter (a PEFT folder or a GGUF LoRA file) for this model: see
    /// [`crate::Adapter::load`].
    pub fn load_adapter(&self, path: impl AsRef<Path>) -> Result<crate::Adapter> {
        let a = crate::Adapter::load(self.config(), self.fingerprint(), path)?;
        self.register_adapter(&a);
        Ok(a)
    }

    /// Keeps a weak reference to `a`: restored snapshots find the adapters they name here.
    pub(crate) fn register_adapter(&self, a: &crate::Adapter) {
        if let Ok(mut list) = self.inner.adapters.lock() {
            list.retain(|w| w.strong_count() > 0);
            list.push(a.downgrade());
        }
    }

    /// A live adapter of this model with `fingerprint`, if one is loaded.
    pub(crate) fn find_adapter(&self, fingerprint: u64) -> Option<crate::Adapter> {
        let list = self.inner.adapters.lock().ok()?;
        list.iter()
            .filter_map(crate::Adapter::from_weak)
            .find(|a| a.fingerprint() == fingerprint)
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

    /// An empty cache for `n_ctx` positions with keys and values stored as `k` and `v`.
    pub(crate) fn new_cache(
        &self,
        n_ctx: usize,
        k: crate::KvCacheType,
        v: crate::KvCacheType,
    ) -> Result<KvCache> {
        let c = &self.inner.config;
        KvCache::new(
            c.num_hidden_layers,
            c.num_key_value_heads,
            c.head_dim,
            n_ctx,
            k,
            v,
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
        self.embed_pooled_with(text, pooling, &mut || false)
    }

    /// [`Model::embed_pooled`] asking `stop` between chunks and layers; `true` ends the call
    /// with [`Error::Cancelled`] (bindings honour their language's interrupts with it).
    pub fn embed_pooled_with(
        &self,
        text: &str,
        pooling: Pooling,
        stop: &mut dyn FnMut() -> bool,
    ) -> Result<Vec<f32>> {
        let ids = self.tokenize(text, true, false)?;
        let e = self.embed_tokens_with(&ids, stop)?;
        Ok(match pooling {
            Pooling::Mean => e.mean,
            Pooling::Last => e.last,
        })
    }

    /// Embeddings of a token sequence (see [`Model::embed`]).
    pub fn embed_tokens(&self, tokens: &[u32]) -> Result<Embeddings> {
        self.embed_tokens_with(tokens, &mut || false)
    }

    /// [`Model::embed_tokens`] asking `stop` between chunks and layers (see
    /// [`Model::embed_pooled_with`]).
    pub fn embed_tokens_with(
        &self,
        tokens: &[u32],
        stop: &mut dyn FnMut() -> bool,
    ) -> Result<Embeddings> {
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
        let mut cache = self.new_cache(
            tokens.len(),
            crate::KvCacheType::F32,
            crate::KvCacheType::F32,
        )?;
        let mut rows: Vec<Vec<f32>> = vec![];
        self.inner.runtime.run(|| -> Result<()> {
            for chunk in tokens.chunks(512) {
                if stop() {
                    return Err(Error::Cancelled);
                }
                let h = self.forward_hidden(
                    chunk,
                    &mut cache,
                    crate::lora::Applied::none(),
                    &mut *stop,
                )?;
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
}

#[allow(dead_code)]
fn _assert_send_sync() {
    fn is<T: Send + Sync>() {}
    is::<Model>();
}
