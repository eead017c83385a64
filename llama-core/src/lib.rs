//! # llama-core
//!
//! Run Llama-family language models (Llama 1/2/3/3.1/3.2/3.3, SmolLM2, TinyLlama, ...) from a
//! GGUF file or a Hugging Face folder, on the CPU, with results that match llama.cpp.
//!
//! ```no_run
//! use llama_core::{Model, ModelOptions, SessionOptions};
//! # fn main() -> llama_core::Result<()> {
//! let model = Model::load("SmolLM2-135M-Instruct.Q4_1.gguf", ModelOptions::default())?;
//! let mut session = model.session(SessionOptions::default())?;
//! let prompt = model.tokenize("The capital of France is", true, false)?;
//! session.eval(&prompt)?;
//! let logits = session.logits().expect("logits after eval");
//! let next = logits
//!     .iter()
//!     .enumerate()
//!     .max_by(|a, b| a.1.total_cmp(b.1))
//!     .map(|(i, _)| i as u32)
//!     .unwrap();
//! println!("{}", model.detokenize(&[next], false)?);
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

/// Builder setters of an options struct: each `name(arg: Type) => field = value;` becomes
/// `pub fn name(mut self, arg: Type) -> Self` setting `self.field = value`.
macro_rules! setters {
    ($($(#[$doc:meta])* $name:ident($arg:ident: $ty:ty) => $field:ident = $val:expr;)*) => {
        $(
            $(#[$doc])*
            pub fn $name(mut self, $arg: $ty) -> Self {
                self.$field = $val;
                self
            }
        )*
    };
}

mod attention;
pub mod batch;
pub mod chat;
mod codec;
pub mod config;
pub mod constrain;
pub mod convert;
pub mod error;
mod exec;
pub mod gguf;
mod kernels;
mod kv_cache;
pub mod lora;
mod matrix;
mod model;
mod perplexity;
mod plan;
mod pool;
pub mod quantize;
pub mod sampler;
mod session;
#[cfg(test)]
mod test_util;
pub mod tokenizer;
pub mod train;
mod types;
mod weights;

pub use batch::{Batch, BatchEvent, Finished, SeqId};
pub use chat::Message;
pub use config::{Config, RopeScaling};
pub use constrain::tools::{Tool, ToolCall, ToolChoice, ToolFormat};
pub use constrain::{Constraint, Grammar};
pub use error::{Error, Result};
pub use exec::Kernel;
pub use lora::{Adapter, AdapterFormat};
pub use model::{
    ChatOptions, Embeddings, LoadProgress, Model, ModelOptions, Pooling, ProgressFn, QuantType,
};
pub use perplexity::{Perplexity, PerplexityOptions};
pub use plan::Target;
pub use sampler::{Sampler, SamplerConfig};
pub use session::generate::{
    CancelHandle, Detokenizer, Draft, GenerateOptions, Generation, Generator, OwnedPrompt, Piece,
    Prompt, StopReason, Timings, TokenLogprob, TokenStream,
};
pub use session::state::STATE_FORMAT_VERSION;
pub use session::{Interrupt, KvCacheType, Session, SessionOptions, DEFAULT_N_CTX};
pub use tokenizer::Tokenizer;
pub use weights::permute_rows_for_gguf;
