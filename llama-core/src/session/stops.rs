//! Stop strings matched as the text streams in: one Knuth-Morris-Pratt automaton per string,
//! advanced over each new piece's bytes only. A token costs time in the piece's length times
//! the number of strings, whatever the strings' or the text's length (searching the text
//! again for every string at every token cost time in their lengths, on the thread that
//! decodes every sequence of a batch).

/// One stop string and how much of it the text ends with.
#[derive(Debug, Clone)]
struct Kmp {
    pattern: Box<[u8]>,
    /// `fail[i]`: length of the longest proper prefix of `pattern[..=i]` that is also its
    /// suffix.
    fail: Box<[u32]>,
    /// Length of the longest prefix of `pattern` the text so far ends with.
    state: usize,
}

impl Kmp {
    fn new(pattern: &[u8]) -> Kmp {
        let mut fail = vec![0u32; pattern.len()];
        let mut k = 0usize;
        for i in 1..pattern.len() {
            while k > 0 && pattern[i] != pattern[k] {
                k = fail[k - 1] as usize;
            }
            if pattern[i] == pattern[k] {
                k += 1;
            }
            fail[i] = k as u32;
        }
        Kmp {
            pattern: pattern.into(),
            fail: fail.into(),
            state: 0,
        }
    }

    /// Advances over `b`; true when the whole pattern now ends the text.
    fn push(&mut self, b: u8) -> bool {
        let mut k = self.state;
        while k > 0 && self.pattern[k] != b {
            k = self.fail[k - 1] as usize;
        }
        if self.pattern[k] == b {
            k += 1;
        }
        if k == self.pattern.len() {
            // Go on as if the match were one byte shorter, so that later matches are seen.
            self.state = self.fail[k - 1] as usize;
            true
        } else {
            self.state = k;
            false
        }
    }
}

/// The stop strings of one generation.
#[derive(Debug, Clone, Default)]
pub(crate) struct StopMatcher {
    stops: Vec<Kmp>,
    /// Bytes fed so far.
    len: usize,
}

impl StopMatcher {
    /// A matcher for `stops` (empty strings never match).
    pub(crate) fn new(stops: &[String]) -> StopMatcher {
        StopMatcher {
            stops: stops
                .iter()
                .filter(|s| !s.is_empty())
                .map(|s| Kmp::new(s.as_bytes()))
                .collect(),
            len: 0,
        }
    }

    /// Feeds the next bytes of the text; returns the earliest start (an offset in the whole
    /// text) of a stop string that ends within them.
    pub(crate) fn feed(&mut self, bytes: &[u8]) -> Option<usize> {
        let mut first: Option<usize> = None;
        if !self.stops.is_empty() {
            for (i, &b) in bytes.iter().enumerate() {
                let end = self.len + i + 1;
                for s in &mut self.stops {
                    if s.push(b) {
                        let start = end - s.pattern.len();
                        first = Some(first.map_or(start, |f| f.min(start)));
                    }
                }
            }
        }
        self.len += bytes.len();
        first
    }

    /// Length of the longest end of the text that begins some stop string without completing
    /// it: text that must be held back until the next bytes decide.
    pub(crate) fn pending(&self) -> usize {
        self.stops.iter().map(|s| s.state).max().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The earliest complete occurrence and the longest pending prefix, by brute force.
    fn brute(text: &str, stops: &[String]) -> (Option<usize>, usize) {
        let hit = stops
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| text.find(s.as_str()))
            .min();
        let mut pending = 0;
        for s in stops {
            for k in 1..s.len().min(text.len() + 1) {
                if text.as_bytes().ends_with(&s.as_bytes()[..k]) {
                    pending = pending.max(k);
                }
            }
        }
        (hit, pending)
    }

    #[test]
    fn streams_match_a_search_of_the_whole_text() {
        let mut seed = 12345u64;
        let mut next = move |n: u64| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) % n
        };
        for _ in 0..2000 {
            let alphabet = ["a", "b", "ab", "é", " "];
            let stops: Vec<String> = (0..1 + next(3))
                .map(|_| {
                    (0..1 + next(5))
                        .map(|_| alphabet[next(5) as usize])
                        .collect()
                })
                .collect();
            let mut m = StopMatcher::new(&stops);
            let mut text = String::new();
            for _ in 0..20 {
                let piece: String = (0..next(3)).map(|_| alphabet[next(5) as usize]).collect();
                text.push_str(&piece);
                let got = m.feed(piece.as_bytes());
                // No earlier text held a match (the loop ends at the first one), so every
                // occurrence ends in this piece.
                let (want, pending) = brute(&text, &stops);
                if want.is_some() || got.is_some() {
                    assert_eq!(got, want, "{stops:?} {text:?}");
                    break;
                }
                assert_eq!(m.pending(), pending, "{stops:?} {text:?}");
            }
        }
    }

    #[test]
    fn long_strings_cost_nothing_per_token() {
        // 16 stop strings of 256 KiB each, against text that keeps almost matching them.
        let stops: Vec<String> = (0..16)
            .map(|i| format!("{}{i}", "a".repeat(256 << 10)))
            .collect();
        let mut m = StopMatcher::new(&stops);
        let t0 = std::time::Instant::now();
        for _ in 0..20_000 {
            assert_eq!(m.feed(b"a"), None);
        }
        assert_eq!(m.pending(), 20_000);
        assert!(t0.elapsed().as_secs_f64() < 2.0, "{:?}", t0.elapsed());
    }
}
