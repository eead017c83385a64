//! The mutation fuzzer's driver, shared by llama-core's `tests/fuzz.rs` and the server's
//! request fuzzing (llama-server/tests/fuzz.rs includes this file).
#![allow(dead_code)]

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::time::{Duration, Instant};

/// xorshift64*: the same inputs for the same seed.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Values that find length and offset bugs.
const INTERESTING: [u64; 9] = [
    0,
    1,
    0x7f,
    0xff,
    0xffff,
    0x7fff_ffff,
    0xffff_ffff,
    1 << 40,
    u64::MAX,
];

/// One mutation of `seed`: byte flips, interesting integers written over, truncation,
/// duplication of a slice, or insertion of random bytes.
pub fn mutate(seed: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(v.len().max(1));
        match rng.below(6) {
            0 if !v.is_empty() => v[at] ^= 1 << rng.below(8),
            1 if !v.is_empty() => v[at] = rng.next() as u8,
            2 => {
                let x = INTERESTING[rng.below(INTERESTING.len())].to_le_bytes();
                let w = [1, 2, 4, 8][rng.below(4)];
                for (i, b) in x[..w].iter().enumerate() {
                    if let Some(d) = v.get_mut(at + i) {
                        *d = *b;
                    }
                }
            }
            3 => v.truncate(at),
            4 if !v.is_empty() => {
                let len = rng.below(64.min(v.len() - at) + 1);
                let piece = v[at..at + len].to_vec();
                let to = rng.below(v.len());
                v.splice(to..to, piece);
            }
            _ => {
                let extra: Vec<u8> = (0..1 + rng.below(16)).map(|_| rng.next() as u8).collect();
                v.splice(at..at, extra);
            }
        }
    }
    v
}

/// `LLAMA_FUZZ_SECS`, when set.
fn secs() -> Option<Duration> {
    std::env::var("LLAMA_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .map(Duration::from_secs_f64)
}

/// Runs `target` on mutations of the seeds: `budget` inputs, or for [`secs`] when set; a
/// panic, or one input taking longer than `slow`, fails with the input saved.
pub fn fuzz(name: &str, seeds: &[Vec<u8>], slow: Duration, budget: u64, target: impl Fn(&[u8])) {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ name.len() as u64);
    let (t0, mut runs) = (Instant::now(), 0u64);
    let more = |runs: u64| match secs() {
        Some(d) => t0.elapsed() < d,
        None => runs < budget,
    };
    while more(runs) {
        let seed = &seeds[rng.below(seeds.len())];
        let input = if runs < seeds.len() as u64 {
            seed.clone()
        } else {
            mutate(seed, &mut rng)
        };
        let t = Instant::now();
        let r = catch_unwind(AssertUnwindSafe(|| target(&input)));
        let took = t.elapsed();
        if r.is_err() || took > slow {
            let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/fuzz-failures");
            std::fs::create_dir_all(&dir).unwrap();
            let p = dir.join(format!("{name}-{runs}"));
            std::fs::write(&p, &input).unwrap();
            panic!(
                "{name}: {} after {runs} inputs (input saved to {})",
                if r.is_err() { "a panic" } else { "too slow" },
                p.display()
            );
        }
        runs += 1;
    }
    println!(
        "{name}: {runs} inputs in {:.1} s, no failure",
        t0.elapsed().as_secs_f64()
    );
}
