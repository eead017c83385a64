//! Token ids to text, whole UTF-8 characters at a time.

use crate::error::Result;
use crate::tokenizer::Tokenizer;

/// Incremental detokenizer for hand-written decode loops: emits text only once it forms whole
/// UTF-8 characters, and keeps leading spaces that depend on the previous tokens.
#[derive(Debug, Clone)]
pub struct Detokenizer {
    ids: Vec<u32>,
    prefix: usize,
    read: usize,
    special: bool,
}

impl Detokenizer {
    /// Starts after `context` (the last few tokens already shown, or empty); `special` renders
    /// special tokens.
    pub fn new(context: &[u32], special: bool) -> Self {
        let ctx = &context[context.len().saturating_sub(4)..];
        Detokenizer {
            ids: ctx.to_vec(),
            prefix: 0,
            read: ctx.len(),
            special,
        }
    }
    /// Adds one token; returns the text it completes, if any.
    pub fn step(&mut self, tok: &Tokenizer, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let before = tok.decode(&self.ids[self.prefix..self.read], self.special)?;
        let after = tok.decode(&self.ids[self.prefix..], self.special)?;
        if after.len() > before.len() && !after.ends_with('\u{FFFD}') {
            let piece = match after.get(before.len()..) {
                Some(p) if after.starts_with(&before) => p.to_string(),
                // The window's leading text changed with the new token: emit the difference
                // by characters rather than by bytes.
                _ => after.chars().skip(before.chars().count()).collect(),
            };
            self.prefix = self.read;
            self.read = self.ids.len();
            Ok(Some(piece))
        } else {
            Ok(None)
        }
    }
}
