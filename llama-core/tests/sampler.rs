//! Sampler invariants (property tests) and parameter validation.

use llama_core::{Sampler, SamplerConfig};
use proptest::prelude::*;

fn logits_strategy() -> impl Strategy<Value = Vec<f32>> {
    prop::collection::vec(-20.0f32..20.0, 2..200)
}

fn argmax(l: &[f32]) -> u32 {
    l.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(&a.0)))
        .unwrap()
        .0 as u32
}

proptest! {
    #[test]
    fn probabilities_sum_to_one(logits in logits_strategy(), t in 0.05f32..3.0, k in 0i32..50, p in 0.05f32..=1.0, mp in 0.0f32..0.5) {
        let s = Sampler::new(SamplerConfig::default().temperature(t).top_k(k).top_p(p).min_p(mp).seed(1)).unwrap();
        let d = s.distribution(&logits, &[]);
        let sum: f64 = d.iter().map(|x| x.1 as f64).sum();
        prop_assert!((sum - 1.0).abs() < 1e-4, "sum {}", sum);
        prop_assert!(!d.is_empty());
        prop_assert!(d.windows(2).all(|w| w[0].1 >= w[1].1 - 1e-7), "sorted by probability");
    }

    #[test]
    fn top_k_keeps_at_most_k(logits in logits_strategy(), k in 1i32..20) {
        let s = Sampler::new(SamplerConfig::default().temperature(1.0).top_k(k).top_p(1.0).min_p(0.0)).unwrap();
        let d = s.distribution(&logits, &[]);
        prop_assert_eq!(d.len(), (k as usize).min(logits.len()));
        // And they are the k largest.
        let mut sorted = logits.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let kth = sorted[d.len() - 1];
        for (id, _) in &d {
            prop_assert!(logits[*id as usize] >= kth);
        }
    }

    #[test]
    fn greedy_is_argmax(logits in logits_strategy()) {
        let mut s = Sampler::greedy();
        prop_assert_eq!(s.sample(&logits, &[]).unwrap(), argmax(&logits));
        let mut s0 = Sampler::new(SamplerConfig::default().temperature(0.0)).unwrap();
        prop_assert_eq!(s0.sample(&logits, &[]).unwrap(), argmax(&logits));
    }

    #[test]
    fn min_p_keeps_only_likely_tokens(logits in logits_strategy(), mp in 0.01f32..0.9) {
        let s = Sampler::new(SamplerConfig::default().temperature(1.0).top_k(0).top_p(1.0).min_p(mp)).unwrap();
        let d = s.distribution(&logits, &[]);
        let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        for (id, _) in &d {
            prop_assert!(logits[*id as usize] >= max + mp.ln() - 1e-5);
        }
    }

    #[test]
    fn top_p_keeps_the_smallest_sufficient_set(logits in logits_strategy(), p in 0.1f32..0.99) {
        let s = Sampler::new(SamplerConfig::default().temperature(1.0).top_k(0).top_p(p).min_p(0.0)).unwrap();
        let kept = s.distribution(&logits, &[]).len();
        // Softmax at temperature 1 over all logits, sorted.
        let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let mut probs: Vec<f64> = logits.iter().map(|l| ((l - max) as f64).exp()).collect();
        let z: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= z);
        probs.sort_by(|a, b| b.total_cmp(a));
        let before: f64 = probs[..kept - 1].iter().sum();
        prop_assert!(before < p as f64 + 1e-6, "one fewer token would already reach p");
    }

    #[test]
    fn same_seed_same_draws(logits in logits_strategy(), seed in any::<u64>()) {
        let cfg = SamplerConfig::default().temperature(1.0).seed(seed);
        let mut a = Sampler::new(cfg.clone()).unwrap();
        let mut b = Sampler::new(cfg).unwrap();
        for _ in 0..10 {
            prop_assert_eq!(a.sample(&logits, &[]).unwrap(), b.sample(&logits, &[]).unwrap());
        }
    }
}

#[test]
fn repeat_penalty_lowers_recent_tokens() {
    let logits = vec![2.0f32, 1.9, -1.0, 0.5];
    let s = Sampler::new(
        SamplerConfig::default()
            .temperature(0.0)
            .repeat_penalty(2.0)
            .repeat_last_n(2),
    )
    .unwrap();
    let c = s.apply_penalties(&logits, &[3, 0, 2]);
    assert_eq!(c[0].logit, 1.0, "positive logit divided");
    assert_eq!(c[2].logit, -2.0, "negative logit multiplied");
    assert_eq!(c[3].logit, 0.5, "outside the window");
    let mut g = s.clone();
    assert_eq!(g.sample(&logits, &[3, 0, 2]).unwrap(), 1);
}

#[test]
fn logit_bias_and_ban() {
    let logits = vec![3.0f32, 1.0, 0.0];
    let mut cfg = SamplerConfig::greedy();
    cfg.logit_bias = vec![(0, f32::NEG_INFINITY), (2, 2.5)];
    let mut s = Sampler::new(cfg).unwrap();
    assert_eq!(s.sample(&logits, &[]).unwrap(), 2);
}

#[test]
fn invalid_parameters_are_errors() {
    for cfg in [
        SamplerConfig::default().temperature(-0.1),
        SamplerConfig::default().temperature(f32::NAN),
        SamplerConfig::default().top_p(1.5),
        SamplerConfig::default().top_p(0.0),
        SamplerConfig::default().min_p(-0.1),
        SamplerConfig::default().repeat_penalty(0.0),
        SamplerConfig::default().repeat_last_n(-2),
    ] {
        assert!(Sampler::new(cfg.clone()).is_err(), "{cfg:?} accepted");
    }
    assert!(Sampler::greedy().sample(&[], &[]).is_err());
}

#[test]
fn greedy_takes_the_lowest_id_among_equals_and_skips_nan() {
    let mut g = Sampler::greedy();
    let l = [1.0, f32::NAN, 3.0, 3.0, f32::NEG_INFINITY];
    assert_eq!(g.sample(&l, &[]).unwrap(), 2);
    assert_eq!(g.distribution(&l, &[]), vec![(2, 1.0)]);
    assert_eq!(g.sample(&[f32::NAN, f32::NEG_INFINITY], &[]).unwrap(), 1);
    assert!(g.sample(&[f32::NAN, f32::NAN], &[]).is_err());
    assert!(g.sample(&[], &[]).is_err());
    // With a penalty or a bias in play, greedy takes the adjusted logits' argmax.
    let mut p = Sampler::new(
        SamplerConfig::default()
            .temperature(0.0)
            .repeat_penalty(2.0),
    )
    .unwrap();
    assert_eq!(p.sample(&[1.0, 1.5, 0.5], &[1]).unwrap(), 0);
    assert_eq!(p.sample(&[1.0, 1.5, 0.5], &[]).unwrap(), 1);
    let mut cfg = SamplerConfig::greedy();
    cfg.logit_bias = vec![(2, 5.0)];
    let mut b = Sampler::new(cfg).unwrap();
    assert_eq!(b.sample(&[1.0, 1.5, 0.5], &[]).unwrap(), 2);
}

/// The logit-bias setter every face uses keeps pairs sorted by id, the last bias of a repeated
/// id winning; the other setters set their fields.
#[test]
fn sampler_config_setters_normalize_the_logit_bias() {
    let c = llama_core::SamplerConfig::default()
        .logit_bias([(5, 1.0), (2, 0.5), (5, -1.0), (9, f32::NEG_INFINITY)])
        .frequency_penalty(0.25)
        .presence_penalty(-0.5)
        .seed_opt(Some(3));
    assert_eq!(
        c.logit_bias,
        vec![(2, 0.5), (5, -1.0), (9, f32::NEG_INFINITY)]
    );
    assert_eq!(
        (c.frequency_penalty, c.presence_penalty, c.seed),
        (0.25, -0.5, Some(3))
    );
    assert_eq!(c.clone().seed_opt(None).seed, None);
    c.validate().unwrap();
}
