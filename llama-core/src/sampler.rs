//! Sampling: a fixed chain in llama.cpp's order over the logits of one position.
//!
//! penalties (repeat / frequency / presence over the last `repeat_last_n` tokens) → logit bias →
//! top-k → top-p → min-p → temperature → greedy (temperature 0) or a seeded random draw.

use crate::error::{Error, Result};

/// Sampling parameters. Names and defaults follow llama.cpp's `common_params_sampling`.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct SamplerConfig {
    /// Softmax temperature; 0 picks the most likely token (greedy). Default 0.8.
    pub temperature: f32,
    /// Keep the k most likely tokens; 0 or less disables. Default 40.
    pub top_k: i32,
    /// Keep the smallest set whose probability reaches p; 1.0 disables. Default 0.95.
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` times the most likely one; 0 disables. Default 0.05.
    pub min_p: f32,
    /// Divide positive (multiply negative) logits of recent tokens; 1.0 disables. Default 1.0.
    pub repeat_penalty: f32,
    /// How many recent tokens the penalties look at; 0 disables, -1 means the whole context.
    /// Default 64.
    pub repeat_last_n: i32,
    /// Subtract `count * frequency_penalty` from recent tokens' logits. Default 0.
    pub frequency_penalty: f32,
    /// Subtract `presence_penalty` from every recent token's logit. Default 0.
    pub presence_penalty: f32,
    /// Added to the logits of the given token ids (use `f32::NEG_INFINITY` to ban a token).
    pub logit_bias: Vec<(u32, f32)>,
    /// Seed for the random draw; `None` picks one from the clock.
    pub seed: Option<u64>,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        SamplerConfig {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            logit_bias: vec![],
            seed: None,
        }
    }
}

impl SamplerConfig {
    /// Greedy decoding: always the most likely token.
    pub fn greedy() -> Self {
        SamplerConfig {
            temperature: 0.0,
            ..Default::default()
        }
    }
    setters! {
        /// Sets the temperature.
        temperature(t: f32) => temperature = t;
        /// Sets top-k.
        top_k(k: i32) => top_k = k;
        /// Sets top-p.
        top_p(p: f32) => top_p = p;
        /// Sets min-p.
        min_p(p: f32) => min_p = p;
        /// Sets the repeat penalty.
        repeat_penalty(r: f32) => repeat_penalty = r;
        /// Sets the penalty window.
        repeat_last_n(n: i32) => repeat_last_n = n;
        /// Sets the seed.
        seed(s: u64) => seed = Some(s);
        /// Sets the seed, or none (one from the clock).
        seed_opt(s: Option<u64>) => seed = s;
        /// Sets the frequency penalty.
        frequency_penalty(p: f32) => frequency_penalty = p;
        /// Sets the presence penalty.
        presence_penalty(p: f32) => presence_penalty = p;
    }

    /// Sets the logit bias: `(token id, bias)` pairs in any order, kept sorted by id (a
    /// repeated id keeps its last bias).
    pub fn logit_bias(mut self, pairs: impl IntoIterator<Item = (u32, f32)>) -> Self {
        let mut v: Vec<(u32, f32)> = pairs.into_iter().collect();
        // Stable: equal ids keep their order, so the last one given is last.
        v.sort_by_key(|p| p.0);
        let mut out: Vec<(u32, f32)> = Vec::with_capacity(v.len());
        for p in v {
            match out.last_mut() {
                Some(last) if last.0 == p.0 => *last = p,
                _ => out.push(p),
            }
        }
        self.logit_bias = out;
        self
    }

    /// Checks every value's range.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidArgument(m));
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return bad(format!(
                "temperature must be >= 0, got {}",
                self.temperature
            ));
        }
        if !(self.top_p.is_finite() && self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(self.min_p.is_finite() && (0.0..=1.0).contains(&self.min_p)) {
            return bad(format!("min_p must be in [0, 1], got {}", self.min_p));
        }
        if !(self.repeat_penalty.is_finite() && self.repeat_penalty > 0.0) {
            return bad(format!(
                "repeat_penalty must be > 0, got {}",
                self.repeat_penalty
            ));
        }
        if self.repeat_last_n < -1 {
            return bad(format!(
                "repeat_last_n must be >= -1, got {}",
                self.repeat_last_n
            ));
        }
        if !self.frequency_penalty.is_finite() || !self.presence_penalty.is_finite() {
            return bad("frequency_penalty and presence_penalty must be finite".into());
        }
        if let Some((id, b)) = self
            .logit_bias
            .iter()
            .find(|(_, b)| b.is_nan() || *b == f32::INFINITY)
        {
            return bad(format!("logit bias {b} for token {id} is invalid"));
        }
        Ok(())
    }
}

/// xoshiro256** seeded by splitmix64: small, fast, and its state can be saved and restored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Rng {
    s: [u64; 4],
}

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        let mut x = seed;
        let mut next = || {
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        Rng {
            s: [next(), next(), next(), next()],
        }
    }
    fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }
    /// Uniform in [0, 1).
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
    pub(crate) fn state(&self) -> [u64; 4] {
        self.s
    }
    pub(crate) fn from_state(s: [u64; 4]) -> Self {
        Rng { s }
    }
}

/// A token candidate: id and (transformed) logit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    /// Token id.
    pub id: u32,
    /// Logit after the stages applied so far.
    pub logit: f32,
}

/// A configured sampler with its random state.
#[derive(Debug, Clone)]
pub struct Sampler {
    cfg: SamplerConfig,
    pub(crate) rng: Rng,
}

impl Sampler {
    /// Validates the configuration and seeds the generator.
    pub fn new(cfg: SamplerConfig) -> Result<Self> {
        cfg.validate()?;
        let seed = cfg.seed.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0x5eed)
        });
        Ok(Sampler {
            rng: Rng::new(seed),
            cfg,
        })
    }

    /// A greedy sampler.
    pub fn greedy() -> Self {
        Sampler {
            cfg: SamplerConfig::greedy(),
            rng: Rng::new(0),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &SamplerConfig {
        &self.cfg
    }

    /// How many of the latest tokens of `history` the penalties apply to (0: none apply).
    fn penalty_window(&self, history: &[u32]) -> usize {
        let c = &self.cfg;
        if c.repeat_penalty == 1.0 && c.frequency_penalty == 0.0 && c.presence_penalty == 0.0 {
            return 0;
        }
        match c.repeat_last_n {
            -1 => history.len(),
            n => (n.max(0) as usize).min(history.len()),
        }
    }

    /// Applies penalties and logit bias to a copy of `logits` (what every later stage sees).
    pub fn apply_penalties(&self, logits: &[f32], history: &[u32]) -> Vec<Candidate> {
        let c = &self.cfg;
        let mut cand: Vec<Candidate> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| Candidate {
                id: i as u32,
                logit: l,
            })
            .collect();
        let window = self.penalty_window(history);
        if window > 0 {
            let mut counts: std::collections::HashMap<u32, u32> = Default::default();
            for &t in &history[history.len() - window..] {
                *counts.entry(t).or_default() += 1;
            }
            for (&t, &n) in &counts {
                if let Some(cd) = cand.get_mut(t as usize) {
                    if cd.logit <= 0.0 {
                        cd.logit *= c.repeat_penalty;
                    } else {
                        cd.logit /= c.repeat_penalty;
                    }
                    cd.logit -= n as f32 * c.frequency_penalty + c.presence_penalty;
                }
            }
        }
        for &(id, b) in &c.logit_bias {
            if let Some(cd) = cand.get_mut(id as usize) {
                cd.logit += b;
            }
        }
        cand
    }

    /// The candidates left after top-k, top-p and min-p, sorted by logit (highest first),
    /// with their probabilities at the configured temperature (all 1.0 mass on the argmax for
    /// greedy).
    pub fn distribution(&self, logits: &[f32], history: &[u32]) -> Vec<(u32, f32)> {
        let c = &self.cfg;
        if c.temperature == 0.0 && c.logit_bias.is_empty() && self.penalty_window(history) == 0 {
            // Greedy with nothing to adjust: the argmax (the lowest id among equals, NaN
            // skipped) without a copy of the logits.
            let mut best: Option<(u32, f32)> = None;
            for (i, &l) in logits.iter().enumerate() {
                if !l.is_nan() && best.is_none_or(|(_, b)| l.total_cmp(&b).is_gt()) {
                    best = Some((i as u32, l));
                }
            }
            return best.map(|(id, _)| vec![(id, 1.0)]).unwrap_or_default();
        }
        let mut cand = self.apply_penalties(logits, history);
        cand.retain(|x| !x.logit.is_nan());
        if cand.is_empty() {
            return vec![];
        }
        let order =
            |a: &Candidate, b: &Candidate| b.logit.total_cmp(&a.logit).then(a.id.cmp(&b.id));
        if c.temperature == 0.0 {
            let best = cand
                .iter()
                .copied()
                .min_by(order)
                .map(|x| x.id)
                .unwrap_or(0);
            return vec![(best, 1.0)];
        }
        // top-k (partial selection first, so only k candidates are sorted)
        if c.top_k > 0 && (c.top_k as usize) < cand.len() {
            let k = c.top_k as usize;
            cand.select_nth_unstable_by(k - 1, order);
            cand.truncate(k);
        }
        cand.sort_by(order);
        // top-p (probabilities at temperature 1, as llama.cpp)
        if c.top_p < 1.0 {
            let p = softmax(&cand);
            let mut cum = 0.0f64;
            let mut keep = cand.len();
            for (i, &pi) in p.iter().enumerate() {
                cum += pi as f64;
                if cum >= c.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
            cand.truncate(keep.max(1));
        }
        // min-p
        if c.min_p > 0.0 {
            let max = cand[0].logit;
            let thresh = max + c.min_p.ln();
            let keep = cand.iter().take_while(|x| x.logit >= thresh).count();
            cand.truncate(keep.max(1));
        }
        // temperature
        for x in cand.iter_mut() {
            x.logit /= c.temperature;
        }
        let p = softmax(&cand);
        cand.iter().zip(p).map(|(x, p)| (x.id, p)).collect()
    }

    /// Picks the next token given the logits of the last position and the tokens so far.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> Result<u32> {
        let dist = self.distribution(logits, history);
        if dist.is_empty() {
            return Err(Error::InvalidArgument(
                "no token can be sampled (empty or all-NaN logits)".into(),
            ));
        }
        if dist.len() == 1 || self.cfg.temperature == 0.0 {
            return Ok(dist[0].0);
        }
        let r = self.rng.next_f64();
        let mut cum = 0.0f64;
        for &(id, p) in &dist {
            cum += p as f64;
            if r < cum {
                return Ok(id);
            }
        }
        Ok(dist[dist.len() - 1].0)
    }
}

fn softmax(c: &[Candidate]) -> Vec<f32> {
    let max = c.iter().map(|x| x.logit).fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        let n = c.len() as f32;
        return vec![1.0 / n; c.len()];
    }
    let e: Vec<f64> = c.iter().map(|x| ((x.logit - max) as f64).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|v| (v / s) as f32).collect()
}

/// The `k` most likely tokens of log-probabilities `lp`, best first; equal values in id order.
/// The one tie order of the library (generation logprobs, `Session::top_logprobs`, C, Python).
pub fn top_k_of(lp: &[f32], k: usize) -> Vec<(u32, f32)> {
    let order = |a: &u32, b: &u32| lp[*b as usize].total_cmp(&lp[*a as usize]).then(a.cmp(b));
    let mut idx: Vec<u32> = (0..lp.len() as u32).collect();
    let k = k.min(idx.len());
    if k == 0 {
        return vec![];
    }
    if k < idx.len() {
        idx.select_nth_unstable_by(k - 1, order);
        idx.truncate(k);
    }
    idx.sort_unstable_by(order);
    idx.into_iter().map(|i| (i, lp[i as usize])).collect()
}

/// Numerically stable log-softmax of a logit vector.
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let s: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
    let lse = max as f64 + s.ln();
    logits.iter().map(|&l| (l as f64 - lse) as f32).collect()
}
