//! Structured-output arguments as Python spells them (OpenAI's `response_format`, `tools`,
//! `tool_choice`; `grammar=`, `regex=`, `choices=`) turned into the core's options.

use llama_core::{Constraint, Draft, GenerateOptions, Tool, ToolCall, ToolChoice};
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

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

/// The keyword arguments that shape what is generated (`**options` of `generate`, `stream`,
/// `chat`, `chat_stream`, `Batch.add` and `Model.generate_batch`): at most one constraint
/// (`response_format`, `grammar`, `regex`, `choices`) and, for conversations, `tools`,
/// `tool_choice` and `parse_special_in_content`; speculative decoding (`draft`: a `Model` or
/// `"lookup"`, `prediction`: the expected text, `draft_max`). Read from one place so that every
/// call spells and checks them alike.
#[derive(Default)]
pub(crate) struct Structured {
    pub constraint: Option<Constraint>,
    pub tools: Vec<Tool>,
    pub tool_choice: ToolChoice,
    pub parse_special_in_content: bool,
    pub draft: Option<Draft>,
    pub draft_max: Option<usize>,
}

/// The keywords every call takes, then those only conversations take.
const CONSTRAINT_KEYS: [&str; 7] = [
    "response_format",
    "grammar",
    "regex",
    "choices",
    "draft",
    "prediction",
    "draft_max",
];
const CHAT_KEYS: [&str; 3] = ["tools", "tool_choice", "parse_special_in_content"];

impl Structured {
    /// Reads `**options` of the call `func` (`chat`: whether the conversation keywords are
    /// allowed). A keyword the call does not take is a `TypeError`, as Python's own; a value of
    /// the wrong type is a `TypeError` naming the keyword.
    pub(crate) fn from_kwargs(
        func: &str,
        options: Option<&Bound<'_, PyDict>>,
        chat: bool,
    ) -> PyResult<Structured> {
        let mut st = Structured::default();
        let Some(options) = options else {
            return Ok(st);
        };
        let mut given: Vec<Constraint> = vec![];
        for (key, value) in options.iter() {
            let key: String = key.extract()?;
            let known = CONSTRAINT_KEYS.contains(&key.as_str())
                || (chat && CHAT_KEYS.contains(&key.as_str()));
            if !known {
                return Err(PyTypeError::new_err(format!(
                    "{func}() got an unexpected keyword argument '{key}'"
                )));
            }
            if value.is_none() {
                continue;
            }
            let typed = |e: PyErr| PyTypeError::new_err(format!("{func}(): {key}: {e}"));
            match key.as_str() {
                "response_format" => given.extend(
                    Constraint::from_response_format(&to_json(&value, "response_format")?)
                        .py_err()?,
                ),
                "grammar" => given.push(Constraint::grammar(
                    value.extract::<String>().map_err(typed)?,
                )),
                "regex" => given.push(Constraint::Regex(value.extract().map_err(typed)?)),
                "choices" => given.push(Constraint::Choices(value.extract().map_err(typed)?)),
                "tools" => st.tools = Tool::list_from_json(&to_json(&value, "tools")?).py_err()?,
                "tool_choice" => {
                    st.tool_choice =
                        ToolChoice::from_json(&to_json(&value, "tool_choice")?).py_err()?
                }
                "draft" | "prediction" => {
                    if st.draft.is_some() {
                        return Err(invalid("give at most one of draft and prediction"));
                    }
                    st.draft = Some(draft(func, &key, &value)?);
                }
                "draft_max" => st.draft_max = Some(value.extract().map_err(typed)?),
                _ => st.parse_special_in_content = value.extract().map_err(typed)?,
            }
        }
        if given.len() > 1 {
            return Err(invalid(
                "give at most one of response_format, grammar, regex and choices",
            ));
        }
        st.constraint = given.pop();
        Ok(st)
    }

    pub(crate) fn apply(self, mut o: GenerateOptions) -> GenerateOptions {
        o.draft = self.draft;
        if let Some(n) = self.draft_max {
            o.draft_max = n;
        }
        o.constraint = self.constraint;
        o.tools = self.tools;
        o.tool_choice = self.tool_choice;
        o.parse_special_in_content(self.parse_special_in_content)
    }
}

/// The draft source of `draft=` (a `Model`, or `"lookup"`) or `prediction=` (a string).
fn draft(func: &str, key: &str, value: &Bound<'_, PyAny>) -> PyResult<Draft> {
    if key == "prediction" {
        return match value.extract::<String>() {
            Ok(text) => Ok(Draft::Prediction(text)),
            Err(_) => Err(PyTypeError::new_err(format!(
                "{func}(): prediction must be a str (the expected output), not {}",
                value.get_type().name()?
            ))),
        };
    }
    if let Ok(m) = value.cast::<crate::handles::Model>() {
        return Ok(Draft::Model(m.get().inner.clone()));
    }
    match value.extract::<String>() {
        Ok(s) if s == "lookup" => Ok(Draft::Lookup),
        Ok(s) => Err(invalid(format!(
            "{func}(): draft must be a Model or \"lookup\", not {s:?}"
        ))),
        Err(_) => Err(PyTypeError::new_err(format!(
            "{func}(): draft must be a Model or \"lookup\", not {}",
            value.get_type().name()?
        ))),
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
