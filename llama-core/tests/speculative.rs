//! Speculative decoding never changes the output: with drafts from a predicted output, from
//! prompt lookup or from a draft model, greedy and seeded sampled generations are token for
//! token those of plain decoding, and the session ends in the same state (tokens, logits bit
//! for bit), on tiny random models of every weight format and kernel path, with LoRA, and on
//! the real model with stop strings, a JSON-schema constraint and log-probabilities.

mod common;

use std::ops::ControlFlow;

use common::tiny::{build, write_quantized_pair, Spec};
use common::*;
use llama_core::{
    Draft, GenerateOptions, Generation, Kernel, KvCacheType, Model, ModelOptions, Sampler,
    SamplerConfig, Session, SessionOptions,
};

fn bits(l: &[f32]) -> Vec<u32> {
    l.iter().map(|v| v.to_bits()).collect()
}

/// A generation after `prompt` in a fresh session, with the session's final tokens and logits.
fn run(
    m: &Model,
    prompt: &[u32],
    sampler: &SamplerConfig,
    opts: GenerateOptions,
    setup: &dyn Fn(&mut Session),
) -> (Generation, Vec<u32>, Vec<u32>) {
    let mut s = m.session(SessionOptions::default().n_ctx(256)).unwrap();
    setup(&mut s);
    let mut smp = Sampler::new(sampler.clone()).unwrap();
    let g = s
        .generate(prompt, &mut smp, opts, |_| ControlFlow::Continue(()))
        .unwrap();
    let logits = s.logits().map(bits).unwrap_or_default();
    (g, s.tokens().to_vec(), logits)
}

/// Every draft source against plain decoding on `m`: same tokens, text, stop reason, final
/// tokens and logits. Returns the tokens taken from drafts in all.
fn check_sources(
    name: &str,
    m: &Model,
    prompt: &[u32],
    n: usize,
    setup: &dyn Fn(&mut Session),
) -> usize {
    let samplers = [
        SamplerConfig::greedy(),
        SamplerConfig::default().temperature(0.9).top_k(20).seed(11),
    ];
    let mut taken = 0;
    for cfg in &samplers {
        let base = GenerateOptions::default().max_tokens(n);
        let plain = run(m, prompt, cfg, base.clone(), setup);
        assert_eq!(plain.0.timings.drafted_tokens, 0);
        let out = &plain.0.tokens;
        // The exact output predicted, a prediction with every fifth token wrong, prompt lookup.
        let mut wrong = out.clone();
        for (i, t) in wrong.iter_mut().enumerate() {
            if i % 5 == 3 {
                *t = (*t + 1) % 32;
            }
        }
        for (what, draft) in [
            ("exact prediction", Draft::PredictedTokens(out.clone())),
            ("wrong prediction", Draft::PredictedTokens(wrong)),
            ("lookup", Draft::Lookup),
        ] {
            for max in [1, 4, 16] {
                let opts = base.clone().draft(draft.clone()).draft_max(max);
                let got = run(m, prompt, cfg, opts, setup);
                let ctx = format!(
                    "{name}, {what}, draft_max {max}, temperature {}",
                    cfg.temperature
                );
                assert_eq!(got.0.tokens, plain.0.tokens, "{ctx}: tokens");
                assert_eq!(got.0.text, plain.0.text, "{ctx}: text");
                assert_eq!(got.0.stop_reason, plain.0.stop_reason, "{ctx}");
                assert_eq!(got.1, plain.1, "{ctx}: session tokens");
                assert!(got.2 == plain.2, "{ctx}: the session's last logits differ");
                let t = got.0.timings;
                assert!(t.accepted_tokens <= t.drafted_tokens, "{ctx}");
                if what == "exact prediction" && out.len() > 2 {
                    assert!(
                        t.accepted_tokens > 0,
                        "{ctx}: nothing taken from an exact prediction"
                    );
                }
                taken += t.accepted_tokens;
            }
        }
    }
    taken
}

#[test]
fn every_kv_cache_type_generates_the_same_with_speculation() {
    // Head size 64 (block caches need a multiple of 32); q8_0 weights give each row the same
    // bits whatever rows share the pass, so verification equals one-at-a-time decode.
    let t = build(Spec {
        hidden: 128,
        heads: 4,
        kv_heads: 2,
        head_dim: 64,
        ..Default::default()
    });
    let m = Model::load(
        &t.gguf,
        common::options().with_quantize(llama_core::QuantType::Q8_0),
    )
    .unwrap();
    let prompt = [1u32, 5, 9, 14, 5, 9, 3];
    use KvCacheType::{F16, Q4_0, Q8_0};
    for (k, v) in [(Q8_0, Q8_0), (Q4_0, Q4_0), (Q8_0, F16)] {
        let setup = |s: &mut Session| {
            let o = SessionOptions::default()
                .n_ctx(256)
                .kv_type_k(k)
                .kv_type_v(v);
            *s = m.session(o).unwrap();
        };
        let taken = check_sources(&format!("{k}/{v} cache"), &m, &prompt, 24, &setup);
        assert!(taken > 0, "{k}/{v}: no drafted token accepted");
    }
}

#[test]
fn every_format_and_kernel_path_generates_the_same_with_speculation() {
    use candle_core::quantized::GgmlDType;
    let t = build(Spec::kquant_sized(256, 31));
    let g = llama_core::gguf::GgufFile::open(&t.gguf).unwrap();
    let prompt = [1u32, 5, 9, 14, 5, 9, 3];
    for dtype in common::tiny::GGUF_TYPES {
        let (p, _) = write_quantized_pair(&g, dtype, t.dir.path());
        let kernels: &[Kernel] =
            if matches!(dtype, GgmlDType::Q4_1 | GgmlDType::Q4K | GgmlDType::F16) {
                &[Kernel::Auto, Kernel::Avx2, Kernel::Scalar]
            } else {
                &[Kernel::Auto]
            };
        for &k in kernels {
            let m = Model::load(&p, ModelOptions::default().with_kernel(k)).unwrap();
            let taken = check_sources(
                &format!("{dtype:?} {}", k.as_str()),
                &m,
                &prompt,
                24,
                &|_| {},
            );
            assert!(taken > 0, "{dtype:?}: no drafted token was ever taken");
        }
    }
}

/// A tiny random model (seed `seed`) and a LoRA adapter for it (seed `adapter_seed`); the
/// first holds their files.
fn tiny_with_adapter(
    seed: u64,
    adapter_seed: u32,
) -> (common::tiny::Tiny, Model, llama_core::Adapter) {
    let t = build(Spec {
        seed,
        ..Default::default()
    });
    let m = Model::load(&t.gguf, ModelOptions::default()).unwrap();
    let dir = t.dir.path().join("adapter");
    common::tiny::peft_adapter(&t, &dir, adapter_seed);
    let a = m.load_adapter(&dir).unwrap();
    (t, m, a)
}

#[test]
fn with_lora_adapters_generation_is_the_same() {
    let (_t, m, a) = tiny_with_adapter(41, 3);
    let set = move |s: &mut Session| s.set_adapters(&[(a.clone(), 0.8)]).unwrap();
    let taken = check_sources("lora", &m, &[2, 3, 4, 2, 3], 20, &set);
    assert!(taken > 0);
}

#[test]
fn a_draft_with_another_vocabulary_is_refused_naming_the_token() {
    let a = build(Spec::default());
    let b = build(Spec {
        vocab: common::tiny::Vocab::Spm,
        ..Default::default()
    });
    let (ma, mb) = (
        Model::load(&a.gguf, ModelOptions::default()).unwrap(),
        Model::load(&b.gguf, ModelOptions::default()).unwrap(),
    );
    let mut s = ma.session(SessionOptions::default().n_ctx(64)).unwrap();
    let opts = GenerateOptions::default().draft(Draft::Model(mb));
    let err = s.start(&[1u32, 2][..], opts).unwrap_err().to_string();
    assert!(err.contains("draft model"), "{err}");
    // The same model drafts for itself.
    let opts = GenerateOptions::default().draft(Draft::Model(ma.clone()));
    s.start(&[1u32, 2][..], opts).unwrap();
}

/// The real model: a copy-heavy prompt with prompt lookup, a predicted output, and the model
/// drafting for itself; with a stop string, a JSON-schema constraint and log-probabilities.
#[test]
fn real_model_speculation_keeps_the_output() {
    let m = Model::load(real_model_path(), options()).unwrap();
    let text = "The quick brown fox jumps over the lazy dog. A journey of a thousand miles \
                begins with a single step. Knowledge is power, and time is money.";
    let prompt = vec![llama_core::Message::user(format!(
        "Repeat this text exactly, changing nothing:\n\n{text}"
    ))];
    let sampler = SamplerConfig::greedy();
    let plain_opts = GenerateOptions::default().max_tokens(48).logprobs(2);
    let gen = |opts: GenerateOptions| {
        let mut s = m.session(SessionOptions::default().n_ctx(512)).unwrap();
        let mut smp = Sampler::new(sampler.clone()).unwrap();
        let g = s
            .generate(&prompt, &mut smp, opts, |_| ControlFlow::Continue(()))
            .unwrap();
        (g, s.tokens().to_vec(), s.logits().map(bits))
    };
    for extra in [
        Box::new(|o: GenerateOptions| o) as Box<dyn Fn(GenerateOptions) -> GenerateOptions>,
        Box::new(|o: GenerateOptions| o.stop("thousand")),
        Box::new(|o: GenerateOptions| {
            o.constrain(llama_core::Constraint::JsonSchema(serde_json::json!({
                "type": "object",
                "properties": {"text": {"type": "string"}},
                "required": ["text"]
            })))
        }),
    ] {
        let plain = gen(extra(plain_opts.clone()));
        for draft in [
            Draft::Lookup,
            Draft::Prediction(text.to_string()),
            Draft::Model(m.clone()),
        ] {
            let what = format!("{draft:?}");
            let got = gen(extra(plain_opts.clone().draft(draft)));
            assert_eq!(got.0.tokens, plain.0.tokens, "{what}");
            assert_eq!(got.0.text, plain.0.text, "{what}");
            assert_eq!(got.0.stop_reason, plain.0.stop_reason, "{what}");
            assert_eq!(got.0.logprobs, plain.0.logprobs, "{what}");
            assert_eq!(got.1, plain.1, "{what}: session tokens");
            assert!(got.2 == plain.2, "{what}: last logits");
            assert!(got.0.timings.accepted_tokens > 0, "{what}: nothing taken");
        }
    }
}

/// One sequence's request in a batch.
struct Request {
    prompt: Vec<u32>,
    opts: GenerateOptions,
    sampler: SamplerConfig,
    adapter: Option<llama_core::Adapter>,
    /// Drafts from its own output alone, predicted exactly (`opts.draft` is replaced).
    predict_own: bool,
}

fn request(prompt: &[u32], opts: GenerateOptions, sampler: &SamplerConfig) -> Request {
    Request {
        prompt: prompt.to_vec(),
        opts,
        sampler: sampler.clone(),
        adapter: None,
        predict_own: false,
    }
}

/// Runs `reqs` in one [`llama_core::Batch`], adding the sequence `late` after a few steps (it
/// joins while the others decode), and checks each generation against the same request alone
/// without speculation. Returns the drafted tokens each sequence had taken.
fn batch_matches_alone(m: &Model, mut reqs: Vec<Request>, late: usize) -> Vec<usize> {
    let session = |a: &Option<llama_core::Adapter>| {
        let mut s = m.session(SessionOptions::default().n_ctx(512)).unwrap();
        if let Some(a) = a {
            s.set_adapters(&[(a.clone(), 0.7)]).unwrap();
        }
        s
    };
    // Each request alone without speculation.
    let alone: Vec<(Generation, Session)> = reqs
        .iter()
        .map(|r| {
            let mut plain = r.opts.clone();
            plain.draft = None;
            let mut s = session(&r.adapter);
            let mut smp = Sampler::new(r.sampler.clone()).unwrap();
            let g = s
                .generate(r.prompt.as_slice(), &mut smp, plain, |_| {
                    ControlFlow::Continue(())
                })
                .unwrap();
            (g, s)
        })
        .collect();
    for (r, (g, _)) in reqs.iter_mut().zip(&alone) {
        if r.predict_own {
            r.opts.draft = Some(Draft::PredictedTokens(g.tokens.clone()));
        }
    }
    let mut batch = llama_core::Batch::new(m);
    let mut ids = vec![None; reqs.len()];
    let mut steps = 0;
    loop {
        for (i, r) in reqs.iter().enumerate() {
            if ids[i].is_none() && (i != late || steps == 3) {
                let smp = Sampler::new(r.sampler.clone()).unwrap();
                let s = session(&r.adapter);
                let id = batch.add(s, r.prompt.as_slice().into(), r.opts.clone(), smp);
                ids[i] = Some(id.unwrap());
            }
        }
        if batch.is_empty() {
            break;
        }
        batch.step().unwrap();
        steps += 1;
    }
    let done = batch.take_finished();
    let mut taken = vec![];
    for (i, (want, s)) in alone.iter().enumerate() {
        let f = done.iter().find(|f| Some(f.id) == ids[i]).unwrap();
        let got = f.result.as_ref().unwrap();
        assert_eq!(got.tokens, want.tokens, "sequence {i}: tokens");
        assert_eq!(got.text, want.text, "sequence {i}: text");
        assert_eq!(got.stop_reason, want.stop_reason, "sequence {i}");
        assert_eq!(got.logprobs, want.logprobs, "sequence {i}: logprobs");
        assert_eq!(f.session.tokens(), s.tokens(), "sequence {i}: session");
        assert!(f.session.logits().map(bits) == s.logits().map(bits));
        taken.push(got.timings.accepted_tokens);
    }
    taken
}

/// Inside a batch, beside plain sequences and while others join, speculating sequences (each
/// draft source) generate what they generate alone; with few sequences decoding they verify
/// drafts in the batch's pass.
#[test]
fn real_model_speculation_in_a_batch_keeps_every_output() {
    let m = Model::load(real_model_path(), options()).unwrap();
    let text = "Knowledge is power, and time is money. The early bird catches the worm, \
                but the second mouse gets the cheese.";
    let chat = |q: String| {
        m.chat_tokens(&[llama_core::Message::user(q)], Default::default())
            .unwrap()
    };
    let copy = chat(format!("Repeat this text exactly:\n\n{text}"));
    let rivers = chat("Name three rivers in Europe and one fact about each.".into());
    let greedy = SamplerConfig::greedy();
    let seeded = SamplerConfig::default().temperature(0.8).seed(5);
    // Different lengths: the batch is busy (speculation backs off) until the shorter ones end;
    // the longest predicts its own output, so that it takes drafts once it verifies them.
    let base = |n: usize| GenerateOptions::default().max_tokens(n).logprobs(1);
    let mut own = request(&rivers, base(64), &seeded);
    own.predict_own = true;
    let taken = batch_matches_alone(
        &m,
        vec![
            own,
            request(&copy, base(24).draft(Draft::Lookup), &greedy),
            request(&rivers, base(8), &seeded),
            request(
                &copy,
                base(16).stop("mouse").draft(Draft::Prediction(text.into())),
                &seeded,
            ),
            request(&copy, base(20).draft(Draft::Model(m.clone())), &greedy),
        ],
        3,
    );
    assert!(
        taken[0] > 16,
        "the predicted sequence took few drafts: {taken:?}"
    );
}

/// The same on a tiny model with a different LoRA adapter per sequence.
#[test]
fn speculation_in_a_batch_with_adapters_keeps_every_output() {
    let (_t, m, a) = tiny_with_adapter(43, 5);
    let prompt = [2u32, 3, 4, 2, 3, 4, 2];
    let greedy = SamplerConfig::greedy();
    let base = |n: usize| GenerateOptions::default().max_tokens(n);
    let mut own = request(&prompt, base(32), &SamplerConfig::default().seed(8));
    own.adapter = Some(a.clone());
    own.predict_own = true;
    let mut late = request(&[7, 8, 9], base(6), &SamplerConfig::default().seed(3));
    late.adapter = Some(a);
    let taken = batch_matches_alone(
        &m,
        vec![
            own,
            request(&prompt, base(12).draft(Draft::Lookup), &greedy),
            late,
        ],
        2,
    );
    assert!(taken[0] > 8, "{taken:?}");
}

/// Under a constraint a draft ends where the grammar forbids a token: a prediction that
/// leaves the only allowed text is drafted up to there, and each drafted token is taken.
#[test]
fn a_draft_ends_where_the_grammar_forbids_it() {
    let m = Model::load(real_model_path(), options()).unwrap();
    let prompt = vec![llama_core::Message::user("What is the capital of France?")];
    let only = "Paris is the capital of France, and a large city.";
    let opts = GenerateOptions::default()
        .max_tokens(32)
        .constrain(llama_core::Constraint::Choices(vec![only.into()]));
    let gen = |opts: GenerateOptions| {
        let mut s = m.session(SessionOptions::default().n_ctx(256)).unwrap();
        let mut smp = Sampler::greedy();
        s.generate(&prompt, &mut smp, opts, |_| ControlFlow::Continue(()))
            .unwrap()
    };
    let plain = gen(opts.clone());
    assert_eq!(plain.text, only);
    let predicted = "Paris is the capital of Germany, and a large city.";
    let got = gen(opts.draft(Draft::Prediction(predicted.into())));
    assert_eq!(got.tokens, plain.tokens);
    let t = got.timings;
    assert!(t.drafted_tokens > 0, "nothing drafted");
    assert_eq!(
        t.accepted_tokens, t.drafted_tokens,
        "a drafted token the grammar forbids was verified"
    );
}
