//! The one error type of the library.

use std::path::PathBuf;

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong, grouped by failure class.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file could not be opened or read.
    #[error("I/O error on {path}: {source}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The model configuration (config.json or GGUF metadata) is missing or invalid.
    #[error("invalid model configuration in {path}: {message}")]
    Config {
        /// The file the configuration came from.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A weight file is malformed, truncated, or a tensor is missing or of the wrong shape.
    #[error("invalid weights in {path} (tensor `{tensor}`): {message}")]
    Weights {
        /// The weight file.
        path: PathBuf,
        /// The tensor name ("" when the problem is in the file header).
        tensor: String,
        /// What is wrong.
        message: String,
    },
    /// A data type or quantization the library cannot run.
    #[error("unsupported data type: {0}")]
    UnsupportedDType(String),
    /// A model architecture the library cannot run.
    #[error("unsupported model architecture: {0}")]
    UnsupportedArchitecture(String),
    /// Tokenizer construction, encoding or decoding failed.
    #[error("tokenizer error: {0}")]
    Tokenizer(String),
    /// The chat template failed to parse or render.
    #[error("chat template error: {0}")]
    ChatTemplate(String),
    /// The sequence would not fit in the session's context window.
    #[error("context overflow: {needed} tokens needed but the context holds {max}")]
    ContextOverflow {
        /// Tokens the operation needs in total.
        needed: usize,
        /// The context size of the session.
        max: usize,
    },
    /// An argument was out of range or otherwise invalid.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A constraint (JSON schema, grammar, regular expression, choices) is invalid or cannot
    /// be followed.
    #[error("invalid constraint: {0}")]
    Grammar(String),
    /// The operation was cancelled through a [`crate::CancelHandle`].
    #[error("operation cancelled")]
    Cancelled,
    /// A saved session state could not be restored.
    #[error("invalid session state: {0}")]
    State(String),
    /// An error from the tensor backend (candle).
    #[error("backend error: {0}")]
    Backend(#[from] candle_core::Error),
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
    pub(crate) fn config(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Config {
            path: path.into(),
            message: message.into(),
        }
    }
    /// The one error for asking a session's logits (or log-probabilities, or a generation
    /// without a prompt) before anything was evaluated.
    pub(crate) fn no_logits() -> Self {
        Error::InvalidArgument("the session has no logits yet: evaluate tokens first".into())
    }
    pub(crate) fn weights(
        path: impl Into<PathBuf>,
        tensor: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Error::Weights {
            path: path.into(),
            tensor: tensor.into(),
            message: message.into(),
        }
    }
}
