//! Batched evaluation: several sessions in one forward pass get, bit for bit, the logits they
//! get alone, whatever else is in the batch (prompts of other lengths, other sessions decoding,
//! other adapters), on the real model's every weight format and on tiny models with LoRA.

mod common;

use common::tiny::{build, Spec};
use common::*;
use llama_core::{Model, ModelOptions, Session, SessionOptions};

/// Greedy next token.
fn argmax(l: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in l.iter().enumerate() {
        if v > l[best] {
            best = i;
        }
    }
    best as u32
}

fn bits(l: &[f32]) -> Vec<u32> {
    l.iter().map(|v| v.to_bits()).collect()
}

/// The logits (as bits) after the prompt and after each of `n` greedy decode steps, alone.
fn alone(s: &mut Session, prompt: &[u32], n: usize) -> Vec<Vec<u32>> {
    s.eval(prompt).unwrap();
    let mut out = vec![bits(s.logits().unwrap())];
    for _ in 0..n {
        let next = argmax(s.logits().unwrap());
        s.eval(&[next]).unwrap();
        out.push(bits(s.logits().unwrap()));
    }
    out
}

/// The same, all sessions together; session `i` joins at step `join[i]` (its prompt then goes
/// in while the others decode).
fn together(
    sessions: &mut [Session],
    prompts: &[Vec<u32>],
    join: &[usize],
    n: usize,
) -> Vec<Vec<Vec<u32>>> {
    let mut out: Vec<Vec<Vec<u32>>> = vec![vec![]; sessions.len()];
    let last = join.iter().max().copied().unwrap_or(0) + n;
    for step in 0..=last {
        let mut toks: Vec<Vec<u32>> = vec![];
        for (i, s) in sessions.iter().enumerate() {
            let t = if step == join[i] {
                prompts[i].clone()
            } else if step > join[i] && out[i].len() <= n {
                vec![argmax(s.logits().unwrap())]
            } else {
                vec![]
            };
            toks.push(t);
        }
        let mut batch: Vec<(&mut Session, &[u32])> = sessions
            .iter_mut()
            .zip(&toks)
            .map(|(s, t)| (s, t.as_slice()))
            .collect();
        Session::eval_batch(&mut batch).unwrap();
        for (i, s) in sessions.iter().enumerate() {
            if !toks[i].is_empty() {
                out[i].push(bits(s.logits().unwrap()));
            }
        }
    }
    out
}

fn prompts(m: &Model) -> Vec<Vec<u32>> {
    [
        "The capital of France is",
        "1, 2, 3, 4, 5, 6, 7,",
        "Once upon a time, in a small village by the sea, there lived an old fisherman who",
        "def fibonacci(n):",
    ]
    .iter()
    .map(|p| m.tokenize(p, true, false).unwrap())
    .collect()
}

fn check_model(name: &str, m: &Model, n: usize) {
    let ps = prompts(m);
    let solo: Vec<Vec<Vec<u32>>> = ps
        .iter()
        .map(|p| {
            alone(
                &mut m.session(SessionOptions::default().n_ctx(256)).unwrap(),
                p,
                n,
            )
        })
        .collect();
    for join in [vec![0, 0, 0, 0], vec![0, 2, 3, 5]] {
        let mut ss: Vec<Session> = (0..ps.len())
            .map(|_| m.session(SessionOptions::default().n_ctx(256)).unwrap())
            .collect();
        let got = together(&mut ss, &ps, &join, n);
        for i in 0..ps.len() {
            assert_eq!(got[i].len(), solo[i].len(), "{name} seq {i}");
            for (step, (a, b)) in got[i].iter().zip(&solo[i]).enumerate() {
                assert!(
                    a == b,
                    "{name}: sequence {i} (joining at {:?}) differs from alone at step {step}",
                    join
                );
            }
        }
    }
}

#[test]
fn real_model_batches_are_bit_identical_to_alone() {
    let path = real_model_path();
    let m = Model::load(&path, options()).unwrap();
    check_model("Q4_1", &m, 6);
    // The other kernel families, written from it here (so the check never depends on files
    // lying around): f16 (one product per sequence inside the pass), a block format, a k-quant.
    use llama_core::quantize::{quantize_model, FileType, QuantizeOptions};
    use llama_core::QuantType;
    let dir = tempfile::tempdir().unwrap();
    for (name, ft) in [
        ("f16", FileType::F16),
        ("q8_0", FileType::Quant(QuantType::Q8_0)),
        ("q4_k", FileType::Quant(QuantType::Q4K)),
    ] {
        let p = dir.path().join(format!("{name}.gguf"));
        quantize_model(&path, &p, &QuantizeOptions::new(ft), |_, _| {}).unwrap();
        let m = Model::load(&p, options()).unwrap();
        check_model(name, &m, 3);
    }
}

#[test]
fn sessions_with_different_adapters_batch_exactly() {
    let t = build(Spec {
        seed: 77,
        ..Default::default()
    });
    let m = Model::load(&t.gguf, ModelOptions::default()).unwrap();
    let (da, db) = (t.dir.path().join("a"), t.dir.path().join("b"));
    common::tiny::peft_adapter(&t, &da, 1);
    common::tiny::peft_adapter(&t, &db, 2);
    let a = m.load_adapter(&da).unwrap();
    let b = m.load_adapter(&db).unwrap();
    let sets = [
        vec![],
        vec![(a.clone(), 1.0)],
        vec![(b.clone(), 0.5)],
        vec![(a, 0.7), (b, 1.3)],
    ];
    let ps: Vec<Vec<u32>> = vec![
        vec![1, 5, 9, 14],
        vec![2, 3],
        vec![7, 8, 9, 10, 11, 12, 13],
        vec![4],
    ];
    let n = 5;
    let solo: Vec<Vec<Vec<u32>>> = ps
        .iter()
        .zip(&sets)
        .map(|(p, set)| {
            let mut s = m.session(SessionOptions::default().n_ctx(64)).unwrap();
            s.set_adapters(set).unwrap();
            alone(&mut s, p, n)
        })
        .collect();
    for join in [vec![0, 0, 0, 0], vec![3, 0, 1, 2]] {
        let mut ss: Vec<Session> = sets
            .iter()
            .map(|set| {
                let mut s = m
                    .session(SessionOptions::default().n_ctx(64).n_batch(3))
                    .unwrap();
                s.set_adapters(set).unwrap();
                s
            })
            .collect();
        // n_batch 3 here: prompts go in chunks, as alone with the same n_batch.
        let solo_chunked: Vec<Vec<Vec<u32>>> = ps
            .iter()
            .zip(&sets)
            .map(|(p, set)| {
                let mut s = m
                    .session(SessionOptions::default().n_ctx(64).n_batch(3))
                    .unwrap();
                s.set_adapters(set).unwrap();
                alone(&mut s, p, n)
            })
            .collect();
        let got = together(&mut ss, &ps, &join, n);
        for i in 0..ps.len() {
            assert_eq!(got[i], solo_chunked[i], "sequence {i}, join {join:?}");
            // The adapters matter (the base differs) except for the base set.
            if i > 0 {
                assert_ne!(got[i], solo[0], "sequence {i}");
            }
        }
    }
}

#[test]
fn batch_errors_leave_sessions_as_they_were() {
    let t = build(Spec {
        seed: 78,
        ..Default::default()
    });
    let m = Model::load(&t.gguf, ModelOptions::default()).unwrap();
    let other = Model::load(&t.hf, ModelOptions::default()).unwrap();
    let mut a = m.session(SessionOptions::default().n_ctx(8)).unwrap();
    let mut b = m.session(SessionOptions::default().n_ctx(8)).unwrap();
    let mut c = other.session(SessionOptions::default().n_ctx(8)).unwrap();
    a.eval(&[1, 2]).unwrap();
    let before = a.logits().unwrap().to_vec();
    // Another model's session.
    let r = Session::eval_batch(&mut [(&mut a, &[3][..]), (&mut c, &[3][..])]);
    assert!(r.is_err());
    // A token outside the vocabulary, and a context overflow.
    assert!(Session::eval_batch(&mut [(&mut a, &[3][..]), (&mut b, &[1_000_000][..])]).is_err());
    assert!(Session::eval_batch(&mut [(&mut a, &[3][..]), (&mut b, &[1; 9][..])]).is_err());
    assert_eq!(a.tokens(), &[1, 2]);
    assert_eq!(a.logits().unwrap(), &before[..]);
    assert!(b.is_empty());
    assert!(Session::eval_batch(&mut []).is_ok());
}

/// What a generation request is: its prompt and options, its sampler.
fn request(
    i: usize,
) -> (
    Vec<llama_core::Message>,
    llama_core::GenerateOptions,
    llama_core::SamplerConfig,
) {
    use llama_core::{Constraint, GenerateOptions, Message, SamplerConfig};
    let questions = [
        "Name three rivers in Europe.",
        "What is 12 times 7?",
        "Write a haiku about the sea.",
        "Describe a cat as JSON.",
        "Is the sky blue? Answer yes or no.",
        "Tell me a joke.",
    ];
    let q = questions[i % questions.len()];
    let mut opts = GenerateOptions::default().max_tokens(12 + 7 * i);
    if i % 3 == 1 {
        opts = opts.stop(".");
    }
    if q.contains("JSON") {
        opts = opts.constrain(Constraint::JsonSchema(serde_json::json!({"type": "object",
            "properties": {"name": {"type": "string", "maxLength": 10}, "age": {"type": "integer"}},
            "required": ["name", "age"]})));
    }
    if q.contains("yes or no") {
        opts = opts.constrain(Constraint::Choices(vec!["yes".into(), "no".into()]));
    }
    let cfg = if i.is_multiple_of(2) {
        SamplerConfig::greedy()
    } else {
        SamplerConfig::default()
            .temperature(0.9)
            .seed(100 + i as u64)
    };
    (vec![Message::user(q)], opts, cfg)
}

#[test]
fn continuous_batches_generate_what_each_generates_alone() {
    use llama_core::{Batch, Prompt, Sampler};
    let m = Model::load(real_model_path(), options()).unwrap();
    let n = 6;
    let alone: Vec<llama_core::Generation> = (0..n)
        .map(|i| {
            let (msgs, opts, cfg) = request(i);
            let mut s = m.session(SessionOptions::default().n_ctx(512)).unwrap();
            s.generate(&msgs, &mut Sampler::new(cfg).unwrap(), opts, |_| {
                std::ops::ControlFlow::Continue(())
            })
            .unwrap()
        })
        .collect();
    // Three join at once, the others one step apart while the first decode; one more is
    // cancelled halfway.
    let mut b = Batch::new(&m);
    let mut ids = vec![];
    let mut streamed: std::collections::HashMap<llama_core::SeqId, String> = Default::default();
    let add = |b: &mut Batch, i: usize| {
        let (msgs, opts, cfg) = request(i);
        let s = m.session(SessionOptions::default().n_ctx(512)).unwrap();
        b.add(s, Prompt::Chat(&msgs), opts, Sampler::new(cfg).unwrap())
            .unwrap()
    };
    for i in 0..3 {
        ids.push(add(&mut b, i));
    }
    let victim = add(&mut b, 0);
    let handle = b.cancel_handle(victim).unwrap();
    let mut step = 0;
    let mut finished = vec![];
    while !b.is_empty() {
        if (3..n).contains(&(step + 2)) {
            ids.push(add(&mut b, step + 2));
        }
        if step == 4 {
            handle.cancel();
        }
        for e in b.step().unwrap() {
            streamed.entry(e.id).or_default().push_str(&e.piece.text);
        }
        finished.extend(b.take_finished());
        step += 1;
    }
    assert_eq!(ids.len(), n);
    for (i, id) in ids.iter().enumerate() {
        let f = finished.iter().find(|f| f.id == *id).unwrap();
        let g = f.result.as_ref().unwrap();
        assert_eq!(
            g.tokens, alone[i].tokens,
            "request {i}: {:?} vs alone {:?}",
            g.text, alone[i].text
        );
        assert_eq!(g.text, alone[i].text, "request {i}");
        assert_eq!(g.stop_reason, alone[i].stop_reason, "request {i}");
        assert_eq!(streamed[id], g.text, "request {i}: streamed text");
        // The session holds the conversation for a next turn.
        assert!(!f.session.is_empty());
    }
    let v = finished.iter().find(|f| f.id == victim).unwrap();
    assert_eq!(
        v.result.as_ref().unwrap().stop_reason,
        llama_core::StopReason::Cancelled
    );
}

#[test]
fn batch_add_rejects_bad_requests_up_front() {
    use llama_core::{Batch, Constraint, GenerateOptions, Prompt, Sampler};
    let t = build(Spec {
        seed: 79,
        ..Default::default()
    });
    let m = Model::load(&t.gguf, ModelOptions::default()).unwrap();
    let other = Model::load(&t.hf, ModelOptions::default()).unwrap();
    let mut b = Batch::new(&m);
    let s = || m.session(SessionOptions::default().n_ctx(16)).unwrap();
    assert!(b
        .add(
            other.session(SessionOptions::default()).unwrap(),
            Prompt::Tokens(&[1]),
            GenerateOptions::default(),
            Sampler::greedy()
        )
        .is_err());
    assert!(b
        .add(
            s(),
            Prompt::Tokens(&[1; 17]),
            GenerateOptions::default(),
            Sampler::greedy()
        )
        .is_err());
    assert!(b
        .add(
            s(),
            Prompt::Tokens(&[1_000_000]),
            GenerateOptions::default(),
            Sampler::greedy()
        )
        .is_err());
    assert!(b
        .add(
            s(),
            Prompt::Tokens(&[]),
            GenerateOptions::default(),
            Sampler::greedy()
        )
        .is_err());
    let bad = GenerateOptions::default().constrain(Constraint::Regex("(".into()));
    assert!(matches!(
        b.add(s(), Prompt::Tokens(&[1]), bad, Sampler::greedy()),
        Err(llama_core::Error::Grammar(_))
    ));
    assert!(b.is_empty());
    // A stopped sequence ends at once with its session.
    let id = b
        .add(
            s(),
            Prompt::Tokens(&[1, 2]),
            GenerateOptions::default().max_tokens(3),
            Sampler::greedy(),
        )
        .unwrap();
    assert!(b.stop(id));
    assert!(!b.stop(id));
    let f = b.take_finished();
    assert_eq!(f.len(), 1);
    assert_eq!(
        f[0].result.as_ref().unwrap().stop_reason,
        llama_core::StopReason::Callback
    );
    let all = b.run_to_end().unwrap();
    assert!(all.is_empty());
}

#[test]
fn a_shared_system_prompt_is_read_once_and_changes_nothing() {
    use llama_core::{Batch, GenerateOptions, Message, Prompt, Sampler};
    let m = Model::load(real_model_path(), options()).unwrap();
    let system = Message::system(
        "You are a terse assistant for a hardware store. Answer in one short sentence, name \
         the aisle when you can, and never recommend a competitor.",
    );
    let convs: Vec<Vec<Message>> = [
        "Where are the hammers?",
        "Do you sell paint?",
        "Where are the screws?",
    ]
    .iter()
    .map(|q| vec![system.clone(), Message::user(*q)])
    .collect();
    let opts = || GenerateOptions::default().max_tokens(20);
    let alone: Vec<llama_core::Generation> = convs
        .iter()
        .map(|c| {
            let mut s = m.session(SessionOptions::default().n_ctx(512)).unwrap();
            s.generate(c, &mut Sampler::greedy(), opts(), |_| {
                std::ops::ControlFlow::Continue(())
            })
            .unwrap()
        })
        .collect();
    // The first conversation is read in the first step; the others join after it.
    let run = |mut b: Batch, convs: &[Vec<Message>]| {
        let add = |b: &mut Batch, c| {
            let s = m.session(SessionOptions::default().n_ctx(512)).unwrap();
            b.add(s, Prompt::Chat(c), opts(), Sampler::greedy())
                .unwrap();
        };
        add(&mut b, &convs[0]);
        b.step().unwrap();
        for c in &convs[1..] {
            add(&mut b, c);
        }
        b.run_to_end().unwrap()
    };
    let done = run(Batch::new(&m), &convs);
    assert_eq!(done.len(), 3);
    for (i, f) in done.iter().enumerate() {
        let g = f.result.as_ref().unwrap();
        assert_eq!(g.tokens, alone[i].tokens, "conversation {i}");
        if i > 0 {
            // Only the part after the shared prefix was read.
            assert!(
                g.timings.prompt_tokens < alone[i].timings.prompt_tokens / 2,
                "conversation {i}: read {} of {} prompt tokens",
                g.timings.prompt_tokens,
                alone[i].timings.prompt_tokens
            );
        }
    }
    // Off: every prompt read whole.
    let done = run(Batch::new(&m).with_prefix_cache(0), &convs[..2]);
    assert_eq!(
        done[1].result.as_ref().unwrap().timings.prompt_tokens,
        alone[1].timings.prompt_tokens
    );
}
