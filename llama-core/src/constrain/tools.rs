//! Tool (function) calls: tools passed to chat templates as Hugging Face's
//! `apply_chat_template(tools=...)` does, the reply constrained to a call of one of them with
//! that tool's JSON-schema parameters, and the call parsed back.
//!
//! Two call formats: Llama 3.1+'s JSON tool calling (`{"name": ..., "parameters": {...}}`, after
//! an optional `<|python_tag|>`), used when the template is a Llama 3.1-style one, and a plain
//! JSON format (`{"name": ..., "arguments": {...}}`) for every other template; a template that
//! does not read `tools` gets the tool list and the format in its system message instead.

use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::Constraint;
use crate::error::{Error, Result};

/// A tool the model may call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tool {
    /// Function name.
    pub name: String,
    /// What it does (shown to the model).
    pub description: String,
    /// JSON Schema of its arguments (an object schema).
    pub parameters: Value,
}

impl Tool {
    /// A tool from its parts.
    pub fn new(name: impl Into<String>, description: impl Into<String>, parameters: Value) -> Tool {
        Tool {
            name: name.into(),
            description: description.into(),
            parameters,
        }
    }

    /// A list of tools as OpenAI's API gives them (`tools`: a JSON list of
    /// `{"type": "function", "function": {...}}`), each read by [`Tool::from_json`].
    pub fn list_from_json(v: &Value) -> Result<Vec<Tool>> {
        v.as_array()
            .ok_or_else(|| {
                Error::InvalidArgument(format!("tools must be a JSON list, not {}", compact(v)))
            })?
            .iter()
            .map(Tool::from_json)
            .collect()
    }

    /// [`Tool::list_from_json`] of JSON text (a tools file, a C string).
    pub fn list_from_str(text: &str) -> Result<Vec<Tool>> {
        let v: Value = serde_json::from_str(text)
            .map_err(|e| Error::InvalidArgument(format!("tools are not JSON: {e}")))?;
        Tool::list_from_json(&v)
    }

    /// A tool in OpenAI's shape (`{"type": "function", "function": {"name", "description",
    /// "parameters"}}`) or just the inner function object.
    pub fn from_json(v: &Value) -> Result<Tool> {
        let bad = |m: &str| Error::InvalidArgument(format!("tool {}: {m}", compact(v)));
        let f = match v.get("type").and_then(Value::as_str) {
            Some("function") => v
                .get("function")
                .ok_or_else(|| bad("no `function` field"))?,
            Some(other) => return Err(bad(&format!("type {other:?} is not \"function\""))),
            None => v,
        };
        let name = f
            .get("name")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| bad("no `name` string"))?;
        let description = f.get("description").and_then(Value::as_str).unwrap_or("");
        let parameters = f
            .get("parameters")
            .cloned()
            .unwrap_or_else(|| json!({"type": "object", "properties": {}}));
        if !parameters.is_object() {
            return Err(bad("`parameters` must be a JSON schema object"));
        }
        Ok(Tool::new(name, description, parameters))
    }

    /// OpenAI's shape, which chat templates receive.
    pub fn to_json(&self) -> Value {
        json!({
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.parameters,
            }
        })
    }
}

fn compact(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 80 {
        let mut end = 80;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}...", &s[..end])
    } else {
        s
    }
}

/// Whether and which tool the model must call.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ToolChoice {
    /// The model answers in text or calls one tool (its choice).
    #[default]
    Auto,
    /// The model must call one of the tools.
    Required,
    /// The model must call this tool.
    Function(String),
    /// No call: tools are shown but the reply is free text.
    None,
}

impl ToolChoice {
    /// OpenAI's `tool_choice`: `"auto"`, `"required"`, `"none"` or
    /// `{"type": "function", "function": {"name": ...}}`.
    pub fn from_json(v: &Value) -> Result<ToolChoice> {
        match v {
            Value::String(s) => ToolChoice::parse(s),
            Value::Object(_) => v
                .pointer("/function/name")
                .and_then(Value::as_str)
                .map(|n| ToolChoice::Function(n.to_string()))
                .ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "tool_choice {} has no function.name",
                        compact(v)
                    ))
                }),
            _ => Err(Error::InvalidArgument(format!(
                "tool_choice must be a string or an object, not {}",
                compact(v)
            ))),
        }
    }

    /// `auto`, `required`, `none`, or a tool's name.
    pub fn parse(s: &str) -> Result<ToolChoice> {
        Ok(match s {
            "auto" => ToolChoice::Auto,
            "required" | "any" => ToolChoice::Required,
            "none" => ToolChoice::None,
            "" => return Err(Error::InvalidArgument("tool_choice is empty".into())),
            name => ToolChoice::Function(name.to_string()),
        })
    }
}

/// A parsed call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCall {
    /// The tool's name.
    pub name: String,
    /// Its arguments (a JSON object that validates against the tool's parameters).
    pub arguments: Value,
}

/// Serialized as Hugging Face templates read assistant messages' `tool_calls`:
/// `{"type": "function", "function": {"name": ..., "arguments": {...}}}`.
impl Serialize for ToolCall {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(2))?;
        m.serialize_entry("type", "function")?;
        m.serialize_entry(
            "function",
            &json!({"name": self.name, "arguments": self.arguments}),
        )?;
        m.end()
    }
}

/// Read back from either shape: Hugging Face's / OpenAI's (`{"type": "function", "function":
/// {"name", "arguments"}}`, arguments as an object or as JSON text) or `{"name", "arguments"}`.
impl<'de> Deserialize<'de> for ToolCall {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let v = Value::deserialize(d)?;
        ToolCall::from_json(&v).map_err(serde::de::Error::custom)
    }
}

impl ToolCall {
    /// A call in OpenAI's shape or as `{"name", "arguments"}` (`parameters` accepted too).
    pub fn from_json(v: &Value) -> Result<ToolCall> {
        let f = v.get("function").unwrap_or(v);
        let name = f.get("name").and_then(Value::as_str).ok_or_else(|| {
            Error::InvalidArgument(format!("tool call {} has no name", compact(v)))
        })?;
        let args = f.get("arguments").or_else(|| f.get("parameters"));
        let arguments = match args {
            None => json!({}),
            Some(Value::String(s)) => serde_json::from_str(s).map_err(|e| {
                Error::InvalidArgument(format!("tool call {name:?}: arguments are not JSON: {e}"))
            })?,
            Some(a) => a.clone(),
        };
        Ok(ToolCall {
            name: name.to_string(),
            arguments,
        })
    }
}

/// How a template's model writes a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ToolFormat {
    /// `{"name": ..., "parameters": {...}}` (Llama 3.1, 3.2, 3.3).
    Llama3,
    /// `{"name": ..., "arguments": {...}}`.
    Json,
}

impl ToolFormat {
    /// The format a chat template's model was trained on: Llama 3's when the template writes
    /// `<|python_tag|>` or a `"parameters"` call, else plain JSON.
    pub fn of_template(template: Option<&str>) -> ToolFormat {
        match template {
            Some(t) if t.contains("<|python_tag|>") || t.contains("\"parameters\": ") => {
                ToolFormat::Llama3
            }
            _ => ToolFormat::Json,
        }
    }

    fn args_key(self) -> &'static str {
        match self {
            ToolFormat::Llama3 => "parameters",
            ToolFormat::Json => "arguments",
        }
    }

    /// The JSON text of a call in this format.
    pub fn write_call(self, call: &ToolCall) -> String {
        let mut m = serde_json::Map::new();
        m.insert("name".into(), Value::String(call.name.clone()));
        m.insert(self.args_key().into(), call.arguments.clone());
        Value::Object(m).to_string()
    }
}

/// Whether a chat template reads the `tools` variable.
pub fn template_takes_tools(template: &str) -> bool {
    template.contains("tools")
}

/// The schema of a call of `tool` in `format`.
fn call_schema(tool: &Tool, format: ToolFormat) -> Value {
    let mut props = serde_json::Map::new();
    props.insert("name".into(), json!({"const": tool.name}));
    props.insert(format.args_key().into(), tool.parameters.clone());
    json!({
        "type": "object",
        "properties": props,
        "required": ["name", format.args_key()],
        "additionalProperties": false,
    })
}

/// The constraint for a reply with `tools` under `choice` (`None`: the reply is free).
pub fn tool_constraint(
    tools: &[Tool],
    choice: &ToolChoice,
    format: ToolFormat,
) -> Result<Option<Constraint>> {
    if tools.is_empty() {
        return match choice {
            ToolChoice::Required | ToolChoice::Function(_) => Err(Error::InvalidArgument(
                "tool_choice asks for a call but no tools were given".into(),
            )),
            _ => Ok(None),
        };
    }
    for (i, t) in tools.iter().enumerate() {
        if tools[..i].iter().any(|u| u.name == t.name) {
            return Err(Error::InvalidArgument(format!(
                "two tools are named {:?}",
                t.name
            )));
        }
    }
    let any_call = || {
        let calls: Vec<Value> = tools.iter().map(|t| call_schema(t, format)).collect();
        if calls.len() == 1 {
            calls.into_iter().next().expect("one")
        } else {
            json!({"anyOf": calls})
        }
    };
    Ok(match choice {
        ToolChoice::None => None,
        ToolChoice::Required => Some(Constraint::JsonSchema(any_call())),
        ToolChoice::Function(name) => {
            let t = tools.iter().find(|t| &t.name == name).ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "tool_choice names {name:?}, which is not a given tool"
                ))
            })?;
            Some(Constraint::JsonSchema(call_schema(t, format)))
        }
        ToolChoice::Auto => {
            // Text that does not start with `{`, or one call.
            let mut schema = any_call();
            schema["x-guidance"] = json!({
                "whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "
            });
            let python_tag = if format == ToolFormat::Llama3 {
                "\"<|python_tag|>\"? "
            } else {
                ""
            };
            Some(Constraint::Lark(format!(
                "start: TEXT | {python_tag}call\nTEXT: /[^{{<](.|\\n)*/\ncall: %json {schema}\n"
            )))
        }
    })
}

/// The calls in a reply: one JSON call of a given tool (after an optional `<|python_tag|>`),
/// or none when the reply is text.
pub fn parse_tool_calls(text: &str, tools: &[Tool]) -> Vec<ToolCall> {
    let t = text.trim();
    let t = t.strip_prefix("<|python_tag|>").unwrap_or(t).trim();
    let Ok(v) = serde_json::from_str::<Value>(t) else {
        return vec![];
    };
    let one = |v: &Value| -> Option<ToolCall> {
        let name = v.get("name")?.as_str()?;
        tools.iter().find(|tool| tool.name == name)?;
        let args = v.get("parameters").or_else(|| v.get("arguments"))?;
        args.is_object().then(|| ToolCall {
            name: name.to_string(),
            arguments: args.clone(),
        })
    };
    match &v {
        Value::Array(items) => items.iter().map_while(one).collect(),
        _ => one(&v).into_iter().collect(),
    }
}

/// The system-message text that shows `tools` to a model whose template does not read them.
pub fn tools_prompt(tools: &[Tool], format: ToolFormat) -> String {
    let list: Vec<String> = tools.iter().map(|t| t.to_json().to_string()).collect();
    format!(
        "You can call these tools (JSON schemas of their arguments):\n{}\n\
         To call one, reply with only a JSON object: {{\"name\": <tool name>, \"{}\": <arguments>}}.",
        list.join("\n"),
        format.args_key()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weather() -> Tool {
        Tool::from_json(&json!({"type": "function", "function": {
            "name": "get_weather", "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                           "required": ["city"]}}}))
        .unwrap()
    }

    #[test]
    fn tools_and_choices_parse_and_reject() {
        let t = weather();
        assert_eq!(t.name, "get_weather");
        assert_eq!(Tool::from_json(&t.to_json()).unwrap(), t);
        assert!(Tool::from_json(&json!({"type": "retrieval"})).is_err());
        assert!(Tool::from_json(&json!({"description": "x"})).is_err());
        assert!(Tool::from_json(&json!({"name": "f", "parameters": 3})).is_err());
        assert_eq!(
            ToolChoice::from_json(&json!("required")).unwrap(),
            ToolChoice::Required
        );
        assert_eq!(
            ToolChoice::from_json(&json!({"type": "function", "function": {"name": "f"}})).unwrap(),
            ToolChoice::Function("f".into())
        );
        assert!(ToolChoice::from_json(&json!(3)).is_err());
        assert!(tool_constraint(&[], &ToolChoice::Required, ToolFormat::Json).is_err());
        assert!(
            tool_constraint(&[t.clone(), t.clone()], &ToolChoice::Auto, ToolFormat::Json).is_err()
        );
        assert!(tool_constraint(
            std::slice::from_ref(&t),
            &ToolChoice::Function("x".into()),
            ToolFormat::Json
        )
        .is_err());
        assert_eq!(
            tool_constraint(&[t], &ToolChoice::None, ToolFormat::Json).unwrap(),
            None
        );
    }

    #[test]
    fn calls_parse_in_both_formats() {
        let tools = [weather()];
        let call = ToolCall {
            name: "get_weather".into(),
            arguments: json!({"city": "Oslo"}),
        };
        for f in [ToolFormat::Llama3, ToolFormat::Json] {
            let text = f.write_call(&call);
            assert_eq!(
                parse_tool_calls(&text, &tools),
                vec![call.clone()],
                "{text}"
            );
            let tagged = format!("<|python_tag|>{text}");
            assert_eq!(parse_tool_calls(&tagged, &tools), vec![call.clone()]);
        }
        assert!(parse_tool_calls("It is sunny.", &tools).is_empty());
        assert!(parse_tool_calls(r#"{"name": "other", "arguments": {}}"#, &tools).is_empty());
        let hf = serde_json::to_value(&call).unwrap();
        assert_eq!(hf["function"]["arguments"]["city"], "Oslo");
        assert_eq!(
            ToolFormat::of_template(Some("{{- '<|python_tag|>' }}")),
            ToolFormat::Llama3
        );
        assert_eq!(ToolFormat::of_template(None), ToolFormat::Json);
    }
}
