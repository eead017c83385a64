//! Constrained generation on the real SmolLM2-135M-Instruct model: every kind of constraint
//! gives output that matches it, a cut-off generation says so, bad constraints fail before
//! anything is generated, and a tool call makes a round trip through the chat template.
//! (The 20-schema validation with Python's `jsonschema` over all three faces is in
//! llama-py/tests/test_structured.py.)

mod common;

use std::ops::ControlFlow;

use common::*;
use llama_core::{
    Constraint, Error, GenerateOptions, Message, Model, Sampler, SamplerConfig, SessionOptions,
    StopReason, Tool, ToolChoice,
};
use serde_json::{json, Value};

fn model() -> Model {
    Model::load(real_model_path(), options()).expect("model")
}

fn chat(
    m: &Model,
    prompt: &str,
    opts: GenerateOptions,
    sampler: &mut Sampler,
) -> llama_core::Generation {
    let mut s = m.session(SessionOptions::default()).unwrap();
    s.generate(&[Message::user(prompt)], sampler, opts, |_| {
        ControlFlow::Continue(())
    })
    .unwrap()
}

#[test]
fn json_schema_output_parses_and_follows_the_schema() {
    let m = model();
    let schema = json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 3}
        },
        "required": ["name", "age", "tags"],
        "additionalProperties": false
    });
    let g = m
        .compile_constraint(&Constraint::JsonSchema(schema))
        .unwrap();
    assert_eq!(g.kind(), "json_schema");
    for seed in 0..4u64 {
        let mut sampler = if seed == 0 {
            Sampler::greedy()
        } else {
            Sampler::new(SamplerConfig::default().temperature(1.0).seed(seed)).unwrap()
        };
        let out = chat(
            &m,
            "Describe a person as JSON.",
            GenerateOptions::default()
                .grammar(g.clone())
                .max_tokens(120),
            &mut sampler,
        );
        assert_eq!(
            out.stop_reason,
            StopReason::GrammarComplete,
            "{:?}",
            out.text
        );
        let v: Value =
            serde_json::from_str(&out.text).unwrap_or_else(|e| panic!("{e}: {:?}", out.text));
        let o = v.as_object().unwrap();
        assert_eq!(o.len(), 3, "{v}");
        assert!(o["name"].as_str().unwrap().chars().count() <= 20);
        let age = o["age"].as_i64().unwrap();
        assert!((0..=120).contains(&age), "{v}");
        let tags = o["tags"].as_array().unwrap();
        assert!((1..=3).contains(&tags.len()), "{v}");
        assert!(tags
            .iter()
            .all(|t| ["a", "b", "c"].contains(&t.as_str().unwrap())));
    }
}

#[test]
fn choices_regex_and_lark_constrain_the_text() {
    let m = model();
    let choices = ["positive", "negative", "neutral"];
    for (i, text) in ["I love this movie!", "This is terrible.", "It is a chair."]
        .iter()
        .enumerate()
    {
        let mut sampler = Sampler::new(SamplerConfig::default().seed(i as u64)).unwrap();
        let c = Constraint::Choices(choices.iter().map(|s| s.to_string()).collect());
        let out = chat(
            &m,
            &format!("Sentiment of: {text}"),
            GenerateOptions::default().constrain(c),
            &mut sampler,
        );
        assert!(choices.contains(&out.text.as_str()), "{:?}", out.text);
        assert_eq!(out.stop_reason, StopReason::GrammarComplete);
    }
    let rx = r"[0-9]{3}-[0-9]{4}";
    let out = chat(
        &m,
        "Give me a phone number.",
        GenerateOptions::default().constrain(Constraint::Regex(rx.into())),
        &mut Sampler::greedy(),
    );
    assert!(
        regex::Regex::new(&format!("^{rx}$"))
            .unwrap()
            .is_match(&out.text),
        "{:?}",
        out.text
    );
    let lark = "start: \"The answer is \" NUM \".\"\nNUM: /[0-9]+/\n";
    let out = chat(
        &m,
        "What is 2+2?",
        GenerateOptions::default()
            .constrain(Constraint::grammar(lark))
            .max_tokens(20),
        &mut Sampler::greedy(),
    );
    assert!(
        out.text.starts_with("The answer is ") && out.text.ends_with('.'),
        "{:?}",
        out.text
    );
}

/// Evaluates what the arithmetic grammar accepts (checks the output parses as that grammar).
fn eval_arith(s: &str) -> Option<i64> {
    /// One precedence level: `operand (op operand)*` with the operators of `ops`
    /// (`+ -` over terms, `* /` over factors; a division by zero gives 0).
    fn level(b: &[u8], i: &mut usize, ops: [u8; 2]) -> Option<i64> {
        let operand = |b: &[u8], i: &mut usize| match ops[0] {
            b'+' => level(b, i, [b'*', b'/']),
            _ => factor(b, i),
        };
        let mut v = operand(b, i)?;
        while let Some(&op) = b.get(*i).filter(|c| ops.contains(c)) {
            *i += 1;
            let r = operand(b, i)?;
            v = match op {
                b'+' => v.checked_add(r)?,
                b'-' => v.checked_sub(r)?,
                b'*' => v.checked_mul(r)?,
                _ => v.checked_div(r).unwrap_or(0),
            };
        }
        Some(v)
    }
    fn expr(b: &[u8], i: &mut usize) -> Option<i64> {
        level(b, i, [b'+', b'-'])
    }
    fn factor(b: &[u8], i: &mut usize) -> Option<i64> {
        if b.get(*i) == Some(&b'(') {
            *i += 1;
            let v = expr(b, i)?;
            (b.get(*i) == Some(&b')')).then(|| *i += 1)?;
            return Some(v);
        }
        let start = *i;
        while b.get(*i).is_some_and(|c| c.is_ascii_digit()) {
            *i += 1;
        }
        (*i > start).then(|| {
            std::str::from_utf8(&b[start..*i])
                .unwrap()
                .parse()
                .unwrap_or(0)
        })
    }
    let b = s.as_bytes();
    let mut i = 0;
    let v = expr(b, &mut i)?;
    (i == b.len()).then_some(v)
}

#[test]
fn gbnf_arithmetic_outputs_parse() {
    let m = model();
    let gbnf = r#"# llama.cpp-style arithmetic
root   ::= expr
expr   ::= term (("+" | "-") term)*
term   ::= factor (("*" | "/") factor)*
factor ::= number | "(" expr ")"
number ::= [0-9]{1,4}
"#;
    let c = Constraint::grammar(gbnf);
    assert_eq!(c.kind(), "gbnf");
    let g = m.compile_constraint(&c).unwrap();
    for seed in 0..5u64 {
        let mut sampler =
            Sampler::new(SamplerConfig::default().temperature(1.0).seed(seed)).unwrap();
        let out = chat(
            &m,
            "Write an arithmetic expression.",
            GenerateOptions::default().grammar(g.clone()).max_tokens(40),
            &mut sampler,
        );
        match out.stop_reason {
            // Ended, or cut off where the text is already a complete expression.
            StopReason::GrammarComplete | StopReason::EndOfGeneration | StopReason::MaxTokens => {
                assert!(eval_arith(&out.text).is_some(), "{:?}", out.text)
            }
            // Cut off: a prefix of an expression.
            StopReason::GrammarIncomplete => assert_eq!(out.tokens.len(), 40),
            other => panic!("{other:?}: {:?}", out.text),
        }
    }
    assert_eq!(eval_arith("(1+2)*3"), Some(9));
    assert_eq!(eval_arith("1+"), None);
}

#[test]
fn cut_off_generation_says_so() {
    let m = model();
    let c = Constraint::JsonSchema(
        json!({"type": "object", "properties": {"story": {"type": "string"}}, "required": ["story"]}),
    );
    let out = chat(
        &m,
        "Tell a long story as JSON.",
        GenerateOptions::default()
            .constrain(c.clone())
            .max_tokens(5),
        &mut Sampler::greedy(),
    );
    assert_eq!(
        out.stop_reason,
        StopReason::GrammarIncomplete,
        "{:?}",
        out.text
    );
    assert_eq!(out.stop_reason.as_str(), "grammar_incomplete");
    assert!(out.text.starts_with("{\"story\": "), "{:?}", out.text);
    let out = chat(
        &m,
        "Tell a long story as JSON.",
        GenerateOptions::default().constrain(c).stop("e"),
        &mut Sampler::greedy(),
    );
    assert_eq!(
        out.stop_reason,
        StopReason::GrammarIncomplete,
        "{:?}",
        out.text
    );
}

#[test]
fn bad_constraints_fail_before_generation() {
    let m = model();
    let bad = [
        Constraint::Lark("start: foo".into()),
        Constraint::Gbnf("root ::= [a".into()),
        Constraint::Regex("(unclosed".into()),
        Constraint::Choices(vec![]),
        Constraint::JsonSchema(json!({"type": "object", "properties": {"a": {"type": "strin"}}})),
        Constraint::JsonSchema(json!(42)),
    ];
    for c in bad {
        let mut s = m.session(SessionOptions::default()).unwrap();
        let r = s.generate(
            &[Message::user("hi")],
            &mut Sampler::greedy(),
            GenerateOptions::default().constrain(c.clone()),
            |_| ControlFlow::Continue(()),
        );
        match r {
            Err(Error::Grammar(msg)) => assert!(!msg.is_empty()),
            other => panic!("{c:?}: {other:?}"),
        }
        assert_eq!(s.len(), 0, "nothing was evaluated for {c:?}");
    }
    assert!(matches!(
        Constraint::json_schema_str("{nope"),
        Err(Error::Grammar(_))
    ));
}

#[test]
fn tool_call_round_trip_through_the_template() {
    let m = model();
    let tools = vec![
        Tool::from_json(&json!({"type": "function", "function": {
            "name": "get_weather", "description": "Current weather in a city",
            "parameters": {"type": "object", "properties": {
                "city": {"type": "string", "maxLength": 30},
                "unit": {"enum": ["celsius", "fahrenheit"]}},
                "required": ["city", "unit"]}}})).unwrap(),
        Tool::from_json(&json!({"name": "add", "description": "Adds two numbers",
            "parameters": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
                           "required": ["a", "b"]}})).unwrap(),
    ];
    let mut s = m.session(SessionOptions::default()).unwrap();
    let mut msgs = vec![Message::user("What is the weather in Paris?")];
    let opts = GenerateOptions::default()
        .tools(tools.clone(), ToolChoice::Required)
        .max_tokens(80);
    let out = s
        .generate(&msgs, &mut Sampler::greedy(), opts, |_| {
            ControlFlow::Continue(())
        })
        .unwrap();
    assert_eq!(out.tool_calls.len(), 1, "{:?}", out.text);
    let call = &out.tool_calls[0];
    assert!(
        ["get_weather", "add"].contains(&call.name.as_str()),
        "{call:?}"
    );
    assert!(call.arguments.is_object());
    if call.name == "get_weather" {
        assert!(["celsius", "fahrenheit"].contains(&call.arguments["unit"].as_str().unwrap()));
    }
    // Forcing one tool.
    let mut s2 = m.session(SessionOptions::default()).unwrap();
    let forced = GenerateOptions::default()
        .tools(tools.clone(), ToolChoice::Function("add".into()))
        .max_tokens(60);
    let o2 = s2
        .generate(
            &[Message::user("What is 2 plus 3?")],
            &mut Sampler::greedy(),
            forced,
            |_| ControlFlow::Continue(()),
        )
        .unwrap();
    assert_eq!(o2.tool_calls.len(), 1, "{:?}", o2.text);
    assert_eq!(o2.tool_calls[0].name, "add");
    assert!(o2.tool_calls[0].arguments["a"].is_number());
    // The call and its result go back through the template; the reply is free text.
    msgs.push(Message::tool_calls(out.tool_calls.clone()));
    msgs.push(Message::tool("{\"temperature\": 18, \"sky\": \"clear\"}"));
    let rendered = m
        .apply_chat_template_with_tools(&msgs, &tools, true)
        .unwrap();
    assert!(
        rendered.contains(&call.name) && rendered.contains("\"temperature\": 18"),
        "{rendered}"
    );
    let opts = GenerateOptions::default()
        .tools(tools, ToolChoice::None)
        .max_tokens(40);
    let reply = s
        .generate(&msgs, &mut Sampler::greedy(), opts, |_| {
            ControlFlow::Continue(())
        })
        .unwrap();
    assert!(reply.tool_calls.is_empty());
    assert!(!reply.text.trim().is_empty());
}

#[test]
fn compile_time_is_small() {
    let m = model();
    let _ = m.compile_constraint(&Constraint::JsonObject).unwrap();
    let g = m
        .compile_constraint(&Constraint::JsonSchema(json!({"type": "object", "properties": {
            "a": {"type": "array", "items": {"type": "object", "properties": {"x": {"type": "number"}}}}}})))
        .unwrap();
    eprintln!("schema compile time {:?}", g.compile_time());
    assert!(g.compile_time().as_secs_f64() < 5.0);
}
