//! Arguments from Python to the core and results back: messages, prompts, generations.

use llama_core::{Generation, Message, OwnedPrompt};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use crate::errors::{invalid, IntoPy};

pub(crate) fn messages(items: &Bound<'_, PyAny>) -> PyResult<Vec<Message>> {
    let mut out = vec![];
    for item in items.try_iter()? {
        let item = item?;
        let d = item
            .cast::<PyDict>()
            .map_err(|_| invalid("each message must be a dict with 'role' and 'content'"))?;
        let get = |k: &str| -> PyResult<String> {
            d.get_item(k)?
                .ok_or_else(|| invalid(format!("message without '{k}'")))?
                .extract::<String>()
                .map_err(|_| invalid(format!("message '{k}' must be a str")))
        };
        // An assistant turn with tool calls (OpenAI's shape) may have no content.
        let calls = match d.get_item("tool_calls")?.filter(|c| !c.is_none()) {
            None => vec![],
            Some(c) => {
                let v = crate::constrain::to_json(&c, "tool_calls")?;
                let list = v
                    .as_array()
                    .ok_or_else(|| invalid("message 'tool_calls' must be a list"))?;
                list.iter()
                    .map(llama_core::ToolCall::from_json)
                    .collect::<llama_core::Result<Vec<_>>>()
                    .py_err()?
            }
        };
        let content = match d.get_item("content")? {
            Some(c) if c.is_none() && !calls.is_empty() => String::new(),
            None if !calls.is_empty() => String::new(),
            _ => get("content")?,
        };
        let mut m = Message::new(get("role")?, content);
        m.tool_calls = calls;
        out.push(m);
    }
    Ok(out)
}

/// A prompt argument: a str, a list of token ids, or (where `chat` allows) a conversation (a
/// list of message dicts).
pub(crate) fn prompt(p: &Bound<'_, PyAny>, chat: bool) -> PyResult<OwnedPrompt> {
    if let Ok(s) = p.extract::<String>() {
        return Ok(OwnedPrompt::Text(s));
    }
    if let Ok(ids) = p.extract::<Vec<u32>>() {
        return Ok(OwnedPrompt::Tokens(ids));
    }
    if chat
        && p.cast::<PyList>()
            .is_ok_and(|l| l.len() > 0 && l.get_item(0).is_ok_and(|m| m.cast::<PyDict>().is_ok()))
    {
        return Ok(OwnedPrompt::Chat(messages(p)?));
    }
    Err(invalid(if chat {
        "each prompt must be a str, a list of token ids, or a list of {'role', 'content'} messages"
    } else {
        "prompt must be a str or a list of token ids (non-negative ints)"
    }))
}

/// A generation as Python sees it: 'tokens', 'text', 'stop_reason', 'prompt_tokens',
/// 'prompt_ms', 'generated_tokens', 'generation_ms', 'logprobs' and 'tool_calls'
/// (`Session.last_generation`, `Batch.finished`).
pub(crate) fn generation_dict<'py>(
    py: Python<'py>,
    g: &Generation,
) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("tokens", g.tokens.clone())?;
    d.set_item("text", g.text.clone())?;
    d.set_item("stop_reason", g.stop_reason.as_str())?;
    d.set_item("prompt_tokens", g.timings.prompt_tokens)?;
    d.set_item("prompt_ms", g.timings.prompt.as_secs_f64() * 1e3)?;
    d.set_item("generated_tokens", g.timings.generated_tokens)?;
    d.set_item("generation_ms", g.timings.generation.as_secs_f64() * 1e3)?;
    d.set_item("drafted_tokens", g.timings.drafted_tokens)?;
    d.set_item("accepted_tokens", g.timings.accepted_tokens)?;
    let lps: Vec<LogprobEntry> = g
        .logprobs
        .iter()
        .map(|l| (l.id, l.logprob, l.top.clone()))
        .collect();
    d.set_item("logprobs", lps)?;
    d.set_item(
        "tool_calls",
        crate::constrain::calls_to_py(py, &g.tool_calls)?,
    )?;
    Ok(d)
}

/// (token, logprob, top alternatives) as returned to Python.
type LogprobEntry = (u32, f32, Vec<(u32, f32)>);
