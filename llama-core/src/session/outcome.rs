//! What a generation gives back: the result ([`Generation`]), its stop reason, timings and
//! log-probabilities, and the text pieces a stream releases.

use std::time::Duration;

use crate::constrain::tools::ToolCall;

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StopReason {
    /// `max_tokens` reached.
    MaxTokens,
    /// The model produced an end-of-generation token.
    EndOfGeneration,
    /// A stop string appeared.
    StopString,
    /// The callback asked to stop.
    Callback,
    /// Cancelled through the [`CancelHandle`].
    Cancelled,
    /// The constraint is complete and allows nothing more.
    GrammarComplete,
    /// `max_tokens` or a stop string ended a constrained generation before its output matched
    /// the constraint: the text is a prefix of a match, not a match.
    GrammarIncomplete,
}

impl StopReason {
    /// A short name: `max_tokens`, `eog`, `stop_string`, `callback`, `cancelled`, `grammar`
    /// (complete), `grammar_incomplete`.
    pub fn as_str(&self) -> &'static str {
        match self {
            StopReason::MaxTokens => "max_tokens",
            StopReason::EndOfGeneration => "eog",
            StopReason::StopString => "stop_string",
            StopReason::Callback => "callback",
            StopReason::Cancelled => "cancelled",
            StopReason::GrammarComplete => "grammar",
            StopReason::GrammarIncomplete => "grammar_incomplete",
        }
    }
}

/// Log-probability of one generated token under the model, with the top alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    /// The generated token.
    pub id: u32,
    /// Its log-probability.
    pub logprob: f32,
    /// The most likely tokens at that position, best first.
    pub top: Vec<(u32, f32)>,
}

/// Timing of one generation.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Timings {
    /// Prompt tokens evaluated.
    pub prompt_tokens: usize,
    /// Time spent on the prompt.
    pub prompt: Duration,
    /// Tokens generated.
    pub generated_tokens: usize,
    /// Time spent generating.
    pub generation: Duration,
    /// Of `generation`, the time spent computing the constraint's masks.
    pub constraint: Duration,
    /// Speculative decoding: tokens drafted and verified.
    pub drafted_tokens: usize,
    /// Of `drafted_tokens`, those taken (each one the generation produced without a decode
    /// step of its own).
    pub accepted_tokens: usize,
}

impl Timings {
    /// Prompt tokens per second.
    pub fn prompt_tps(&self) -> f64 {
        rate(self.prompt_tokens, self.prompt)
    }
    /// Generated tokens per second.
    pub fn generation_tps(&self) -> f64 {
        rate(self.generated_tokens, self.generation)
    }
}

fn rate(n: usize, d: Duration) -> f64 {
    let s = d.as_secs_f64();
    if s > 0.0 {
        n as f64 / s
    } else {
        0.0
    }
}

/// The result of a generation.
#[derive(Debug, Clone)]
pub struct Generation {
    /// Generated ids (an end-of-generation token included when it ended the generation).
    pub tokens: Vec<u32>,
    /// Generated text (stop string and what follows it removed).
    pub text: String,
    /// Why it ended.
    pub stop_reason: StopReason,
    /// Log-probabilities, when asked for.
    pub logprobs: Vec<TokenLogprob>,
    /// The tool calls the reply made (with [`GenerateOptions::tools`]; empty for a text reply).
    pub tool_calls: Vec<ToolCall>,
    /// Timings.
    pub timings: Timings,
}

/// One step of the generator's output.
#[derive(Debug, Clone, PartialEq)]
pub struct Piece {
    /// The sampled token.
    pub token: u32,
    /// Text released by this token (may be empty while a character or a possible stop string
    /// is incomplete).
    pub text: String,
}
