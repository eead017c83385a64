//! Every KV cache type (f16, f32, q8_0, q4_0, and keys and values of different types) on tiny
//! random models of every attention shape (MHA, GQA, one KV head; head sizes 32 to 128): a
//! prompt read at once, in chunks or one token at a time gives the same bits; the logits stay
//! close to the f64 reference; snapshots, fork and context shift keep working.

mod common;

use std::ops::ControlFlow;

use common::tiny::{build, reference_logits, Spec, Tiny};
use llama_core::{GenerateOptions, KvCacheType, Model, Sampler, Session, SessionOptions};

use KvCacheType::{F16, F32, Q4_0, Q8_0};

const TOKENS: [u32; 14] = [5, 40, 77, 100, 3, 250, 17, 64, 9, 120, 33, 200, 8, 90];

const TYPES: [(KvCacheType, KvCacheType); 6] = [
    (F16, F16),
    (F32, F32),
    (Q8_0, Q8_0),
    (Q4_0, Q4_0),
    (Q8_0, F16),
    (F16, Q4_0),
];

fn shapes() -> Vec<(&'static str, Spec)> {
    let spec = |heads, kv_heads, head_dim| Spec {
        hidden: 128,
        heads,
        kv_heads,
        head_dim,
        ..Default::default()
    };
    vec![
        ("mha, head 32", spec(4, 4, 32)),
        ("gqa, head 64", spec(4, 2, 64)),
        ("one kv head, head 128", spec(2, 1, 128)),
        ("gqa, head 96", spec(3, 1, 96)),
    ]
}

fn session(m: &Model, (k, v): (KvCacheType, KvCacheType), n_batch: usize) -> Session {
    m.session(
        SessionOptions::default()
            .kv_type_k(k)
            .kv_type_v(v)
            .n_batch(n_batch)
            .n_ctx(256),
    )
    .unwrap()
}

/// The largest and the mean absolute difference, over the largest and the mean magnitude of
/// the reference.
fn rel_diffs(a: &[Vec<f32>], b: &[Vec<f64>]) -> (f64, f64) {
    let n = b.iter().flatten().count() as f64;
    let scale = b.iter().flatten().fold(1f64, |m, v| m.max(v.abs()));
    let mean_mag = b.iter().flatten().map(|v| v.abs()).sum::<f64>() / n;
    let d: Vec<f64> = a
        .iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (*x as f64 - y).abs())
        .collect();
    (
        d.iter().fold(0f64, |m, &v| m.max(v)) / scale,
        d.iter().sum::<f64>() / n / mean_mag,
    )
}

fn check(name: &str, t: &Tiny, types: (KvCacheType, KvCacheType)) {
    let what = format!("{name}, {}/{}", types.0, types.1);
    // Close to exact arithmetic with f32 weights (the tiny models' logits are O(1); a q4_0
    // cache moves them most).
    let exact = Model::load(&t.gguf, common::options()).unwrap();
    let got = session(&exact, types, 512)
        .eval_all_logits(&TOKENS)
        .unwrap();
    let reference = reference_logits(t, &TOKENS);
    let (max, mean) = rel_diffs(&got, &reference);
    // (Random tiny models amplify a cache's rounding: a q4_0 step is an eighth of a block's
    // largest value, and the values are uniform, not the outlier-heavy rows the rotation is
    // for. Unrelated logits would differ by about 1.1 of the mean: these bounds tell a working
    // cache from a broken one; the quality of each type is measured on the real model.)
    let (max_tol, mean_tol) = match types {
        (F32, F32) => (1e-4, 1e-5),
        (F16, F16) => (5e-3, 1e-3),
        (Q4_0, _) | (_, Q4_0) => (1.5, 0.5),
        // q8_0 keys score against the queries quantized to q8_0 too, as llama.cpp does.
        _ => (0.1, 0.05),
    };
    println!(
        "{what}: difference from the f64 reference: max {max:.2e} of the largest logit, mean {mean:.2e} of the mean"
    );
    assert!(max < max_tol && mean < mean_tol, "{what}: {max} {mean}");
    // Bit for bit below: q8_0 weights, whose products give each row the same bits whatever
    // rows come with it (f32 weights' tiles do not promise that), so what is checked is the
    // attention over each cache type.
    let m = Model::load(
        &t.gguf,
        common::options().with_quantize(llama_core::QuantType::Q8_0),
    )
    .unwrap();
    let at_once = session(&m, types, 512).eval_all_logits(&TOKENS).unwrap();
    // In chunks, and one token at a time: the same bits.
    let chunked = session(&m, types, 5).eval_all_logits(&TOKENS).unwrap();
    assert_eq!(chunked, at_once, "{what}: chunked prefill");
    let mut s = session(&m, types, 512);
    for (i, &tok) in TOKENS.iter().enumerate() {
        s.eval(&[tok]).unwrap();
        assert_eq!(s.logits().unwrap(), &at_once[i][..], "{what}: token {i}");
    }
    // A snapshot restores the cache bit for bit (the continuation is the same).
    let mut s = session(&m, types, 512);
    s.eval(&TOKENS[..8]).unwrap();
    let snap = s.save_state(None).unwrap();
    let (mut r, _) = Session::restore(&m, &snap).unwrap();
    assert_eq!(r.options().kv_type_k, types.0);
    assert_eq!(r.options().kv_type_v, types.1);
    let mut f = s.fork().unwrap();
    for x in [&mut s, &mut r, &mut f] {
        x.eval(&TOKENS[8..]).unwrap();
    }
    assert_eq!(s.logits(), r.logits(), "{what}: restored");
    assert_eq!(s.logits(), f.logits(), "{what}: forked");
    assert_eq!(s.logits().unwrap(), &at_once[TOKENS.len() - 1][..]);
    // Truncating and re-reading gives the same bits.
    s.truncate(5);
    s.eval(&TOKENS[5..]).unwrap();
    assert_eq!(
        s.logits().unwrap(),
        &at_once[TOKENS.len() - 1][..],
        "{what}: truncated"
    );
}

#[test]
fn every_cache_type_on_every_shape() {
    for (name, spec) in shapes() {
        let t = build(spec);
        for types in TYPES {
            check(name, &t, types);
        }
    }
}

#[test]
fn context_shift_and_memory_on_every_type() {
    let t = build(shapes()[1].1.clone());
    let m = Model::load(&t.gguf, common::options()).unwrap();
    let mut bytes = vec![];
    for types in TYPES {
        let mut s = m
            .session(
                SessionOptions::default()
                    .kv_type_k(types.0)
                    .kv_type_v(types.1)
                    .n_ctx(24)
                    .context_shift(3),
            )
            .unwrap();
        let g = s
            .generate(
                llama_core::Prompt::Tokens(&TOKENS),
                &mut Sampler::greedy(),
                GenerateOptions::default().max_tokens(40),
                |_| ControlFlow::Continue(()),
            )
            .unwrap();
        assert!(g.tokens.len() <= 40);
        assert!(s.len() <= 24);
        assert_eq!(&s.tokens()[..3], &TOKENS[..3]);
        bytes.push(s.kv_cache_bytes());
    }
    // 24 positions of 2 layers x 2 KV heads x 64 values, keys and values: f16 12 KiB, f32 twice
    // that, q8_0 34/64 and q4_0 18/64 of f16.
    let per = 24 * 2 * 2 * 64;
    assert_eq!(bytes[0], per * 2 * 2);
    assert_eq!(bytes[1], per * 4 * 2);
    assert_eq!(bytes[2], per * 34 / 32 * 2);
    assert_eq!(bytes[3], per * 18 / 32 * 2);
    assert_eq!(bytes[4], per * 34 / 32 + per * 2);
}

#[test]
fn block_caches_need_a_head_size_that_blocks_divide() {
    // Head size 16: no 32-value blocks fit.
    let t = build(Spec::default());
    let m = Model::load(&t.gguf, common::options()).unwrap();
    let e = m
        .session(SessionOptions::default().kv_type_v(Q4_0))
        .unwrap_err()
        .to_string();
    assert!(e.contains("q4_0") && e.contains("multiple of 32"), "{e}");
    assert!(m.session(SessionOptions::default().kv_type(F32)).is_ok());
    assert!(KvCacheType::parse("q5_0").is_err());
    assert_eq!(KvCacheType::parse("Q8_0").unwrap(), Q8_0);
}

#[test]
fn snapshots_restore_into_other_types_and_older_formats() {
    let t = build(shapes()[1].1.clone());
    let m = Model::load(
        &t.gguf,
        common::options().with_quantize(llama_core::QuantType::Q8_0),
    )
    .unwrap();
    let all = |types| session(&m, types, 512).eval_all_logits(&TOKENS).unwrap();
    for src in TYPES {
        let mut s = session(&m, src, 512);
        s.eval(&TOKENS[..8]).unwrap();
        let snap = s.save_state(None).unwrap();
        s.eval(&TOKENS[8..]).unwrap();
        for dst in TYPES {
            let what = format!("{}/{} restored as {}/{}", src.0, src.1, dst.0, dst.1);
            let (mut r, _) = Session::restore_as(&m, &snap, Some(dst.0), Some(dst.1)).unwrap();
            assert_eq!(
                (r.options().kv_type_k, r.options().kv_type_v),
                dst,
                "{what}"
            );
            assert_eq!(r.tokens(), &TOKENS[..8], "{what}");
            assert_eq!(r.kv_cache_bytes(), {
                let mut f = session(&m, dst, 512);
                f.eval(&TOKENS[..8]).unwrap();
                f.kv_cache_bytes()
            });
            r.eval(&TOKENS[8..]).unwrap();
            let got = r.logits().unwrap();
            if dst == src {
                // The recorded types: bit for bit.
                assert_eq!(got, s.logits().unwrap(), "{what}");
                continue;
            }
            // Converted: the continuation stays as close to a session of the new types as the
            // saved session's own logits are (the first 8 positions were computed over the old
            // cache).
            let fresh = &all(dst)[TOKENS.len() - 1];
            let d = common::rel_err(got, fresh);
            let own = common::rel_err(s.logits().unwrap(), fresh);
            println!(
                "{what}: {d:.3e} from a {}/{} session ({own:.3e} for the saved one)",
                dst.0, dst.1
            );
            assert!(d <= own * 1.5 + 0.02, "{what}: {d} vs {own}");
        }
    }
    // Older formats (one type for keys and values, f32 values) are read; `restore_as` converts
    // them too.
    for types in [(F16, F16), (Q8_0, Q8_0)] {
        let mut s = session(&m, types, 512);
        s.eval(&TOKENS[..8]).unwrap();
        let cur = s.save_state(None).unwrap();
        let (mut want, _) = Session::restore(&m, &cur).unwrap();
        want.eval(&TOKENS[8..]).unwrap();
        for version in [1, 2] {
            let old = s.save_state_version(None, version).unwrap();
            assert_ne!(old, cur);
            let (mut r, _) = Session::restore(&m, &old).unwrap();
            assert_eq!(r.options().kv_type_k, types.0);
            r.eval(&TOKENS[8..]).unwrap();
            // f16 values are exact in f32; q8_0 blocks go back through the rotation in f32.
            if types.0 == F16 {
                assert_eq!(r.logits(), want.logits(), "version {version}");
            } else {
                assert!(common::rel_err(r.logits().unwrap(), want.logits().unwrap()) < 1e-2);
            }
        }
    }
    let s = m.session(SessionOptions::default()).unwrap();
    assert!(s.save_state_version(None, 0).is_err() && s.save_state_version(None, 4).is_err());
    // A type the model cannot use is refused before any work.
    let t16 = build(Spec::default());
    let m16 = Model::load(&t16.gguf, common::options()).unwrap();
    let mut s = m16.session(SessionOptions::default()).unwrap();
    s.eval(&TOKENS[..4]).unwrap();
    let snap = s.save_state(None).unwrap();
    let Err(e) = Session::restore_as(&m16, &snap, Some(Q8_0), None) else {
        panic!("head size 16 has no q8_0 blocks");
    };
    let e = e.to_string();
    assert!(e.contains("multiple of 32"), "{e}");
    assert!(Session::restore_as(&m16, &snap, Some(F32), None).is_ok());
}

#[test]
fn batched_sequences_match_alone_on_every_type() {
    let t = build(shapes()[1].1.clone());
    let m = Model::load(
        &t.gguf,
        common::options().with_quantize(llama_core::QuantType::Q8_0),
    )
    .unwrap();
    let prompts: [&[u32]; 3] = [&TOKENS[..5], &TOKENS[3..12], &TOKENS[..]];
    let opts = GenerateOptions::default().max_tokens(10);
    for types in TYPES {
        let alone: Vec<(Vec<u32>, Vec<f32>)> = prompts
            .iter()
            .map(|p| {
                let mut s = session(&m, types, 512);
                let g = s
                    .generate(
                        llama_core::Prompt::Tokens(p),
                        &mut Sampler::greedy(),
                        opts.clone(),
                        |_| ControlFlow::Continue(()),
                    )
                    .unwrap();
                (g.tokens, s.logits().unwrap().to_vec())
            })
            .collect();
        let mut b = llama_core::Batch::new(&m);
        let ids: Vec<_> = prompts
            .iter()
            .map(|p| {
                let s = session(&m, types, 512);
                b.add(
                    s,
                    llama_core::Prompt::Tokens(p),
                    opts.clone(),
                    Sampler::greedy(),
                )
                .unwrap()
            })
            .collect();
        let finished = b.run_to_end().unwrap();
        assert_eq!(finished.len(), prompts.len());
        for f in &finished {
            let i = ids.iter().position(|&id| id == f.id).unwrap();
            let what = format!("{}/{} sequence {i}", types.0, types.1);
            assert_eq!(f.result.as_ref().unwrap().tokens, alone[i].0, "{what}");
            // The same bits as alone: each row's attention over its own cache.
            assert_eq!(f.session.logits().unwrap(), &alone[i].1[..], "{what}");
        }
    }
}
