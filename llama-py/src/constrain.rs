//! Structured-output arguments as Python spells them (OpenAI's `response_format`, `tools`,
//! `tool_choice`; `grammar=`, `regex=`, `choices=`) turned into the core's options.

use llama_core::{Constraint, GenerateOptions, Tool, ToolCall, ToolChoice};
use pyo3::prelude::*;

use crate::errors::{invalid, IntoPy};

/// A JSON-serializable Python object as JSON (through the `json` module: dicts, lists, str,
/// numbers, bool, None).
pub(crate) fn to_json(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<serde_json::Value> {
    let text: String = obj
        .py()
        .import("json")?
        .call_method1("dumps", (obj,))
        .map_err(|e| invalid(format!("{what} is not JSON-serializable: {e}")))?
        .extract()?;
    serde_json::from_str(&text).map_err(|e| invalid(format!("{what}: {e}")))
}

/// JSON back to a Python object.
pub(crate) fn from_json<'py>(
    py: Python<'py>,
    v: &serde_json::Value,
) -> PyResult<Bound<'py, PyAny>> {
    py.import("json")?.call_method1("loads", (v.to_string(),))
}

/// The structured-output keyword arguments of `generate`, `chat` and their stream forms.
#[derive(Default)]
pub(crate) struct Structured {
    pub constraint: Option<Constraint>,
    pub tools: Vec<Tool>,
    pub tool_choice: ToolChoice,
}

impl Structured {
    pub(crate) fn parse(
        response_format: Option<&Bound<'_, PyAny>>,
        grammar: Option<String>,
        regex: Option<String>,
        choices: Option<Vec<String>>,
        tools: Option<&Bound<'_, PyAny>>,
        tool_choice: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Structured> {
        let mut given: Vec<Constraint> = vec![];
        if let Some(rf) = response_format.filter(|o| !o.is_none()) {
            given.extend(
                Constraint::from_response_format(&to_json(rf, "response_format")?).py_err()?,
            );
        }
        given.extend(grammar.map(Constraint::grammar));
        given.extend(regex.map(Constraint::Regex));
        given.extend(choices.map(Constraint::Choices));
        if given.len() > 1 {
            return Err(invalid(
                "give at most one of response_format, grammar, regex and choices",
            ));
        }
        let tools = match tools.filter(|o| !o.is_none()) {
            None => vec![],
            Some(t) => Tool::list_from_json(&to_json(t, "tools")?).py_err()?,
        };
        let tool_choice = match tool_choice.filter(|o| !o.is_none()) {
            None => ToolChoice::Auto,
            Some(c) => ToolChoice::from_json(&to_json(c, "tool_choice")?).py_err()?,
        };
        Ok(Structured {
            constraint: given.pop(),
            tools,
            tool_choice,
        })
    }

    pub(crate) fn apply(self, mut o: GenerateOptions) -> GenerateOptions {
        o.constraint = self.constraint;
        o.tools = self.tools;
        o.tool_choice = self.tool_choice;
        o
    }
}

/// Calls as Python dicts: `{"name": str, "arguments": dict}`.
pub(crate) fn calls_to_py<'py>(
    py: Python<'py>,
    calls: &[ToolCall],
) -> PyResult<Vec<Bound<'py, PyAny>>> {
    calls
        .iter()
        .map(|c| {
            from_json(
                py,
                &serde_json::json!({"name": c.name, "arguments": c.arguments}),
            )
        })
        .collect()
}
