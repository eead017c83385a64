//! Training data: JSONL files in the common shapes, tokenized with the loss on the completion
//! (or assistant) tokens only.
//!
//! - `{"text": "..."}`: every token is scored (BOS first when the model adds one, EOS last).
//! - `{"prompt": "...", "completion": "..."}`: the completion and the final EOS are scored.
//! - `{"messages": [{"role": ..., "content": ...}, ...]}`: rendered with the model's chat
//!   template; the tokens of each assistant message (as the template renders it, its end-of-turn
//!   marker included) are scored.

use std::path::Path;

use crate::chat::Message;
use crate::error::{Error, Result};
use crate::model::Model;

/// One training sequence: its tokens and, for each position but the last, whether the next
/// token counts in the loss.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// Token ids.
    pub tokens: Vec<u32>,
    /// `score[i]`: predicting `tokens[i + 1]` counts (`tokens.len() - 1` entries).
    pub score: Vec<bool>,
}

impl Example {
    /// Scored positions.
    pub fn n_scored(&self) -> usize {
        self.score.iter().filter(|&&s| s).count()
    }
}

/// The largest JSONL file read (bytes).
const MAX_FILE: u64 = 4 << 30;

fn err(path: &Path, line: usize, msg: impl std::fmt::Display) -> Error {
    Error::InvalidArgument(format!("{}:{line}: {msg}", path.display()))
}

fn field<'a>(
    o: &'a serde_json::Map<String, serde_json::Value>,
    k: &str,
    path: &Path,
    line: usize,
) -> Result<&'a str> {
    o.get(k)
        .and_then(|v| v.as_str())
        .ok_or_else(|| err(path, line, format!("`{k}` must be a string")))
}

/// Tokens of `parts` (text, scored) one after the other: BOS first when the model adds one
/// (`bos`), special-token text not parsed (data is data).
fn sequence(model: &Model, parts: &[(&str, bool)], eos: bool) -> Result<Example> {
    let tok = model.tokenizer();
    let mut tokens: Vec<u32> = vec![];
    let mut scored: Vec<bool> = vec![];
    if tok.adds_bos() {
        if let Some(b) = tok.bos_id() {
            tokens.push(b);
            scored.push(false);
        }
    }
    for (text, s) in parts {
        let ids = model.tokenize(text, false, false)?;
        scored.extend(std::iter::repeat_n(*s, ids.len()));
        tokens.extend(ids);
    }
    if eos {
        if let Some(e) = tok.eos_id() {
            tokens.push(e);
            scored.push(parts.last().is_some_and(|p| p.1));
        }
    }
    // score[i] is about tokens[i + 1].
    let score = scored.into_iter().skip(1).collect();
    Ok(Example { tokens, score })
}

/// A conversation with its assistant turns scored.
fn conversation(model: &Model, messages: &[Message]) -> Result<Example> {
    let full = model.apply_chat_template(messages, false)?;
    let tok = model.tokenizer();
    let encode = |text: &str| -> Result<Vec<u32>> {
        let mut ids = tok.encode(text, false, true)?;
        if tok.adds_bos() {
            if let Some(b) = tok.bos_id() {
                if ids.first() != Some(&b) {
                    ids.insert(0, b);
                }
            }
        }
        Ok(ids)
    };
    let tokens = encode(&full)?;
    let mut scored = vec![false; tokens.len()];
    for (i, m) in messages.iter().enumerate() {
        if m.role != "assistant" {
            continue;
        }
        let before = encode(&model.apply_chat_template(&messages[..i], true)?)?;
        let through = encode(&model.apply_chat_template(&messages[..=i], false)?)?;
        if !tokens.starts_with(&through) || !through.starts_with(&before) {
            return Err(Error::ChatTemplate(
                "the chat template does not render a conversation as a prefix of its continuation, so assistant turns cannot be located".into(),
            ));
        }
        for s in &mut scored[before.len()..through.len()] {
            *s = true;
        }
    }
    Ok(Example {
        score: scored.into_iter().skip(1).collect(),
        tokens,
    })
}

/// Reads a JSONL file of examples for `model`; each must fit `max_len` tokens and score at
/// least one. Errors name the file and line.
pub fn load_jsonl(model: &Model, path: &Path, max_len: usize) -> Result<Vec<Example>> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.len() > MAX_FILE {
        return Err(Error::InvalidArgument(format!(
            "{} is larger than 4 GiB",
            path.display()
        )));
    }
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let text = std::str::from_utf8(&bytes).map_err(|e| {
        let line = bytes[..e.valid_up_to()]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1;
        err(path, line, "not valid UTF-8")
    })?;
    let mut out = vec![];
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| err(path, n, format!("not valid JSON: {e}")))?;
        let Some(o) = v.as_object() else {
            return Err(err(path, n, "each line must be a JSON object"));
        };
        let ex = if let Some(msgs) = o.get("messages") {
            let arr = msgs
                .as_array()
                .ok_or_else(|| err(path, n, "`messages` must be a list"))?;
            let messages = arr
                .iter()
                .map(|m| {
                    let role = m.get("role").and_then(|r| r.as_str());
                    let content = m.get("content").and_then(|c| c.as_str());
                    match (role, content) {
                        (Some(r), Some(c)) => Ok(Message::new(r, c)),
                        _ => Err(err(
                            path,
                            n,
                            "each message needs string `role` and `content`",
                        )),
                    }
                })
                .collect::<Result<Vec<_>>>()?;
            if !messages.iter().any(|m| m.role == "assistant") {
                return Err(err(
                    path,
                    n,
                    "a conversation needs an assistant message to learn from",
                ));
            }
            conversation(model, &messages).map_err(|e| err(path, n, e))?
        } else if o.contains_key("prompt") || o.contains_key("completion") {
            let p = field(o, "prompt", path, n)?;
            let c = field(o, "completion", path, n)?;
            sequence(model, &[(p, false), (c, true)], true).map_err(|e| err(path, n, e))?
        } else if o.contains_key("text") {
            let t = field(o, "text", path, n)?;
            sequence(model, &[(t, true)], true).map_err(|e| err(path, n, e))?
        } else {
            return Err(err(
                path,
                n,
                "expected {\"text\"}, {\"prompt\", \"completion\"} or {\"messages\"}",
            ));
        };
        if ex.tokens.len() > max_len {
            return Err(err(
                path,
                n,
                format!(
                    "{} tokens, longer than max_len {max_len} (raise --max-len or shorten the example)",
                    ex.tokens.len()
                ),
            ));
        }
        if ex.n_scored() == 0 {
            return Err(err(path, n, "no token to learn (empty completion?)"));
        }
        out.push(ex);
    }
    if out.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "{} holds no examples",
            path.display()
        )));
    }
    Ok(out)
}
