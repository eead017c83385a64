//! Learning on the real SmolLM2-135M-Instruct Q4_1 (QLoRA: the base stays 4-bit): a made-up
//! date notation the base model cannot produce goes from 0% to at least 90% exact match on
//! held-out prompts after about a minute of training on 2 cores.

mod common;

use llama_core::train::{load_jsonl, LoraConfig, TrainOptions, Trainer};
use llama_core::{GenerateOptions, Model, ModelOptions, Sampler, SessionOptions};

struct Lcg(u64);
impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

/// `(prompt, completion)`: `YYYY-MM-DD` rewritten as `DD*MM*YYYY*`.
fn example(r: &mut Lcg) -> (String, String) {
    let (y, m, d) = (1950 + r.below(100), 1 + r.below(12), 1 + r.below(28));
    (
        format!("Rewrite the date {y:04}-{m:02}-{d:02} in star notation:"),
        format!(" {d:02}*{m:02}*{y:04}*"),
    )
}

fn exact_matches(
    m: &Model,
    adapter: Option<&llama_core::Adapter>,
    cases: &[(String, String)],
) -> usize {
    cases
        .iter()
        .filter(|(p, want)| {
            let mut s = m.session(SessionOptions::default().n_ctx(128)).unwrap();
            if let Some(a) = adapter {
                s.set_adapters(&[(a.clone(), 1.0)]).unwrap();
            }
            let ids = m.tokenize(p, true, false).unwrap();
            let g = s
                .generate(
                    &ids,
                    &mut Sampler::greedy(),
                    GenerateOptions::default().max_tokens(14),
                    |_| std::ops::ControlFlow::Continue(()),
                )
                .unwrap();
            g.text.starts_with(want.as_str())
        })
        .count()
}

#[test]
fn a_lora_learns_a_made_up_notation_on_the_real_model() {
    let m = Model::load(common::real_model_path(), ModelOptions::default()).unwrap();
    let mut r = Lcg(2026);
    let dir = tempfile::tempdir().unwrap();
    let train: Vec<String> = (0..80)
        .map(|_| {
            let (p, c) = example(&mut r);
            serde_json::json!({"prompt": p, "completion": c}).to_string()
        })
        .collect();
    let held: Vec<(String, String)> = (0..20).map(|_| example(&mut r)).collect();
    let path = dir.path().join("train.jsonl");
    std::fs::write(&path, train.join("\n")).unwrap();
    let data = load_jsonl(&m, &path, 64).unwrap();
    let before = exact_matches(&m, None, &held);
    let opts = TrainOptions::default()
        .lora(LoraConfig {
            rank: 8,
            alpha: 16.0,
            ..LoraConfig::default()
        })
        .lr(1e-3)
        .epochs(1)
        .warmup(5)
        .seed(1);
    let mut t = Trainer::new(&m, data, opts).unwrap();
    let t0 = std::time::Instant::now();
    let mut last = 0.0;
    while let Some(s) = t.step().unwrap() {
        last = s.loss;
    }
    let secs = t0.elapsed().as_secs_f64();
    let a = t.params().to_adapter(&m, "dates").unwrap();
    let after = exact_matches(&m, Some(&a), &held);
    println!(
        "held-out exact match {before}/20 -> {after}/20 after {} steps in {secs:.0} s (last loss {last:.4})",
        t.step_count()
    );
    assert!(
        before * 10 < held.len(),
        "the base model already knows the notation ({before}/20)"
    );
    assert!(after * 10 >= held.len() * 9, "{after}/20 after training");
}
