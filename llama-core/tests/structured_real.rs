//! Constrained generation on the real SmolLM2 model.

mod common;

use common::*;
use llama_core::{
    Constraint, GenerateOptions, Message, Model, Sampler, SessionOptions, StopReason,
};

fn model() -> Model {
    Model::load(real_model_path(), options()).expect("model")
}

#[test]
fn explore() {
    let m = model();
    let t0 = std::time::Instant::now();
    let g = m
        .compile_constraint(&Constraint::json_schema_str(
            r#"{"type":"object","properties":{"name":{"type":"string","maxLength":20},"age":{"type":"integer","minimum":0,"maximum":120}},"required":["name","age"]}"#,
        ).unwrap())
        .unwrap();
    eprintln!(
        "first compile {:?} (grammar {:?})",
        t0.elapsed(),
        g.compile_time()
    );
    let mut s = m.session(SessionOptions::default()).unwrap();
    let msgs = [Message::user("Describe a person as JSON.")];
    let out = s
        .chat(
            &msgs,
            &mut Sampler::greedy(),
            GenerateOptions::default().grammar(g).max_tokens(80),
            |_| std::ops::ControlFlow::Continue(()),
        )
        .unwrap();
    eprintln!("{:?} {:?} {:?}", out.text, out.stop_reason, out.timings);
    assert_eq!(out.stop_reason, StopReason::GrammarComplete);
}
