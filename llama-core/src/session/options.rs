//! Generation options: what a generation follows (limits, stops, log-probabilities, the
//! constraint or tools, cancellation), and the constraint they resolve to for a model.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

pub use super::speculate::Draft;
use crate::constrain::tools::{tool_constraint, Tool, ToolChoice, ToolFormat};
use crate::constrain::{Constraint, Grammar};
use crate::error::Result;

/// A handle that cancels a session's work from another thread.
#[derive(Debug, Clone, Default)]
pub struct CancelHandle(Arc<AtomicBool>);

impl CancelHandle {
    /// Asks the session to stop at the next check (between prompt chunks and between tokens).
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    /// Whether cancellation was asked for.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
    pub(crate) fn take(&self) -> bool {
        self.0.swap(false, Ordering::SeqCst)
    }
}

/// Options for one generation.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct GenerateOptions {
    /// Most tokens to generate. Default 256.
    pub max_tokens: usize,
    /// Stop when any of these strings appears in the output (it is not emitted).
    pub stop: Vec<String>,
    /// Record per-token log-probabilities with this many alternatives (`None`: off).
    pub logprobs: Option<usize>,
    /// Render special tokens in the streamed text.
    pub special: bool,
    /// What the output must match (compiled when generation starts; see
    /// [`GenerateOptions::grammar`] to reuse a compiled one). `None`: free text.
    pub constraint: Option<Constraint>,
    /// A constraint compiled with [`crate::Model::compile_constraint`]; used instead of
    /// `constraint` when set.
    pub grammar: Option<Grammar>,
    /// Tools the model may call: a chat prompt shows them to the model (through its template),
    /// and unless `constraint` or `grammar` is set the reply is constrained by `tool_choice`;
    /// the calls come back parsed in [`Generation::tool_calls`].
    pub tools: Vec<Tool>,
    /// Whether and which tool must be called (default: the model chooses).
    pub tool_choice: ToolChoice,
    /// For chat prompts of messages the caller trusts: special-token text inside message
    /// content is parsed into control tokens and any role is passed to the template. Off by
    /// default: content is text whatever it contains (as OpenAI's API treats it; a user who
    /// writes `<|im_end|>` cannot forge a turn) and roles must be among
    /// [`crate::chat::KNOWN_ROLES`].
    pub parse_special_in_content: bool,
    /// Speculative decoding: where drafts come from (`None`: off). The output is exactly
    /// that of plain decoding with the same sampler and seed; see [`Draft`].
    pub draft: Option<Draft>,
    /// Most tokens drafted per verification (the length adapts below it). Default 8.
    pub draft_max: usize,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_tokens: 256,
            stop: vec![],
            logprobs: None,
            special: false,
            constraint: None,
            grammar: None,
            tools: vec![],
            tool_choice: ToolChoice::Auto,
            parse_special_in_content: false,
            draft: None,
            draft_max: 8,
        }
    }
}

impl GenerateOptions {
    /// These options with their constraint (or their tools' call constraint) compiled for
    /// `model` into [`GenerateOptions::grammar`] and a predicted output tokenized, so that
    /// starting the generation compiles and tokenizes nothing (a server prepares requests off
    /// its decode thread).
    pub fn prepared(mut self, model: &crate::Model) -> Result<Self> {
        self.grammar = resolve_grammar(model, &self)?;
        match &self.draft {
            Some(Draft::Prediction(text)) => {
                self.draft = Some(Draft::PredictedTokens(model.tokenize(text, false, false)?));
            }
            // Checked here too, so that a draft model's first check (hashing both
            // vocabularies) runs off a server's decode thread.
            Some(d) => d.check(model)?,
            None => {}
        }
        Ok(self)
    }

    /// Sets the token limit.
    pub fn max_tokens(mut self, n: usize) -> Self {
        self.max_tokens = n;
        self
    }
    /// Adds a stop string.
    pub fn stop(mut self, s: impl Into<String>) -> Self {
        self.stop.push(s.into());
        self
    }
    /// Records log-probabilities with `top` alternatives per token.
    pub fn logprobs(mut self, top: usize) -> Self {
        self.logprobs = Some(top);
        self
    }
    /// Constrains the output (JSON schema, grammar, regex, choices).
    pub fn constrain(mut self, c: Constraint) -> Self {
        self.constraint = Some(c);
        self
    }
    /// Constrains the output with an already compiled constraint.
    pub fn grammar(mut self, g: Grammar) -> Self {
        self.grammar = Some(g);
        self
    }
    /// Offers tools to the model with `choice`.
    pub fn tools(mut self, tools: Vec<Tool>, choice: ToolChoice) -> Self {
        self.tools = tools;
        self.tool_choice = choice;
        self
    }
    /// Speculative decoding from `draft` (see [`GenerateOptions::draft`]).
    pub fn draft(mut self, draft: Draft) -> Self {
        self.draft = Some(draft);
        self
    }
    /// Most tokens drafted per verification.
    pub fn draft_max(mut self, n: usize) -> Self {
        self.draft_max = n;
        self
    }
    /// Trusts chat messages: see [`GenerateOptions::parse_special_in_content`].
    pub fn parse_special_in_content(mut self, on: bool) -> Self {
        self.parse_special_in_content = on;
        self
    }
}

/// The compiled constraint a generation with `opts` follows: `grammar`, else `constraint`
/// compiled, else the tools' call constraint (per `tool_choice` and the template's format).
pub(crate) fn resolve_grammar(
    model: &crate::Model,
    opts: &GenerateOptions,
) -> Result<Option<Grammar>> {
    if let Some(g) = &opts.grammar {
        return Ok(Some(g.clone()));
    }
    let tools = if opts.constraint.is_none() {
        let format = ToolFormat::of_template(model.chat_template());
        tool_constraint(&opts.tools, &opts.tool_choice, format)?
    } else {
        None
    };
    match opts.constraint.as_ref().or(tools.as_ref()) {
        Some(c) => Ok(Some(model.compile_constraint(c)?)),
        None => Ok(None),
    }
}
