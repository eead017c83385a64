//! Concurrency: 8 threads share one model, each mixing generate, fork, save/restore, truncate
//! and cancel, round after round; every thread's tokens equal a serial run's.

mod common;

use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use common::tiny::{build, Spec};
use llama_core::{
    GenerateOptions, Model, Sampler, SamplerConfig, Session, SessionOptions, StopReason,
};

fn sampler(seed: u64) -> Sampler {
    Sampler::new(SamplerConfig::default().temperature(0.9).seed(seed)).unwrap()
}

use common::gen as generate;

/// One thread's work; returns every token it generated (the cancelled run aside).
fn script(m: &Model, i: u32) -> Vec<Vec<u32>> {
    let prompt = [5 + i, 40, 77, 100 + i, 3];
    let mut out = vec![];
    let mut s = m.session(SessionOptions::default().n_ctx(128)).unwrap();
    let mut smp = sampler(i as u64);
    out.push(generate(&mut s, &prompt, &mut smp, 12));
    // A fork continues on its own.
    let mut f = s.fork().unwrap();
    out.push(generate(&mut f, &[], &mut sampler(100 + i as u64), 8));
    // Saved and restored, the session and its sampler continue as the original does.
    let blob = s.save_state(Some(&smp)).unwrap();
    let (mut r, rs) = Session::restore(m, &blob).unwrap();
    let mut rs = rs.unwrap();
    out.push(generate(&mut r, &[], &mut rs, 8));
    out.push(generate(&mut s, &[], &mut smp, 8));
    // Rolled back and continued.
    s.truncate(s.len() - 5);
    out.push(generate(&mut s, &[9, 10], &mut sampler(200 + i as u64), 6));
    // Cancelled from another thread mid-generation (only the cancel can end it), then usable.
    let mut c = m
        .session(SessionOptions::default().n_ctx(48).context_shift(4))
        .unwrap();
    let mut cfg = SamplerConfig::default().temperature(0.0);
    cfg.logit_bias = (0..m.config().vocab_size as u32)
        .filter(|&t| m.tokenizer().is_eog(t))
        .map(|t| (t, f32::NEG_INFINITY))
        .collect();
    c.eval(&prompt).unwrap();
    let h = c.cancel_handle();
    let canceller = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(2));
        h.cancel();
    });
    let g = c
        .generate(
            llama_core::Prompt::Tokens(&[]),
            &mut Sampler::new(cfg).unwrap(),
            GenerateOptions::default().max_tokens(10_000_000),
            |_| ControlFlow::Continue(()),
        )
        .unwrap();
    canceller.join().unwrap();
    assert_eq!(g.stop_reason, StopReason::Cancelled);
    // The cancel may land with the context full: roll back before continuing.
    c.truncate(8);
    out.push(generate(&mut c, &[7], &mut sampler(300 + i as u64), 4));
    out
}

#[test]
fn eight_threads_mixing_every_operation_give_the_serial_tokens() {
    let t = build(Spec {
        seed: 77,
        ..Default::default()
    });
    let m = Model::load(&t.gguf, llama_core::ModelOptions::default()).unwrap();
    let serial: Vec<Vec<Vec<u32>>> = (0..8).map(|i| script(&m, i)).collect();
    // The cancelled session's continuation depends on where the cancel landed: compare the
    // rest.
    let strip = |mut v: Vec<Vec<u32>>| {
        v.pop();
        v
    };
    let serial: Vec<_> = serial.into_iter().map(strip).collect();
    // Rounds for at least ~5 s (a few hundred operations per thread), at most 200 rounds.
    let t0 = Instant::now();
    let mut rounds = 0;
    while rounds < 200 && (rounds < 3 || t0.elapsed() < Duration::from_secs(5)) {
        std::thread::scope(|sc| {
            let handles: Vec<_> = (0..8u32)
                .map(|i| {
                    let m = &m;
                    sc.spawn(move || strip(script(m, i)))
                })
                .collect();
            for (i, h) in handles.into_iter().enumerate() {
                assert_eq!(h.join().unwrap(), serial[i], "thread {i}, round {rounds}");
            }
        });
        rounds += 1;
    }
    println!(
        "{rounds} rounds of 8 threads in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}
