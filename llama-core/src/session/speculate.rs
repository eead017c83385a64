//! Speculative decoding that never changes the output: a cheap guess of the next tokens (a
//! draft model, n-gram lookup in the context, or the caller's predicted output) is verified by
//! the model in one forward pass over the weights ([`Session::eval_verify`]), each position's
//! logits bit for bit what one-at-a-time decode computes there. The generation loop still
//! samples one token per step from those logits with the same sampler, so a drafted token is
//! taken only when it equals what the sampler picks there ([`Session::take_ahead`]): greedy
//! and seeded outputs, stop strings, constraints, adapters, log-probabilities and cancellation
//! are exactly those of plain decoding. The draft length follows the recent acceptance.

use super::Session;
use crate::constrain::ConstraintState;
use crate::error::{Error, Result};
use crate::model::Model;

/// Where drafts come from ([`crate::GenerateOptions::draft`]).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Draft {
    /// Prompt lookup: the tokens that followed the latest earlier occurrence of the last few
    /// tokens (an n-gram of up to [`NGRAM_MAX`]) in the prompt and the text generated so far.
    /// No second model; pays off where the output copies its input (edits, extraction,
    /// summaries quoting the source, code).
    Lookup,
    /// Predicted output (OpenAI's `prediction`): the text the caller expects, mostly; drafts
    /// follow it where the generated text matches it, and the context as [`Draft::Lookup`]
    /// where it does not.
    Prediction(String),
    /// [`Draft::Prediction`] given as token ids.
    PredictedTokens(Vec<u32>),
    /// A draft model with the target's vocabulary (checked token by token when generation
    /// starts), typically the same model in a smaller quantization or a smaller model of the
    /// family; it drafts greedily on its own session.
    Model(Model),
}

/// Longest n-gram prompt lookup matches.
pub const NGRAM_MAX: usize = 3;
/// Shortest n-gram matched in the context (a predicted output is matched down to one token).
const NGRAM_MIN: usize = 2;
/// A draft model stops drafting where its own top probability falls below a threshold (as
/// llama.cpp's `--draft-p-min`, 0.75 there): such a guess is unlikely to be taken. Ours starts
/// here and follows the acceptance: down by a step after a round taken whole (a draft that
/// agrees with the model, such as its own smaller quantization, drafts on through its
/// uncertain tokens: measured on SmolLM2 f16 with its Q4_1 copy, 0.75 gave 0.95-1.04x plain
/// decode and 0.1 1.45x), up by two after a round with a refusal, within the bounds below.
const DRAFT_P_START: f32 = 0.5;
const DRAFT_P_STEP: f32 = 0.1;
const DRAFT_P_BOUNDS: (f32, f32) = (0.1, 0.9);
/// Longest pause, in steps, after drafts kept failing.
const MAX_PAUSE: usize = 64;

impl Draft {
    /// Checks that a draft model can draft for `target`: the same vocabulary, token by token
    /// (the error names the first token that differs).
    pub fn check(&self, target: &Model) -> Result<()> {
        let Draft::Model(draft) = self else {
            return Ok(());
        };
        let (a, b) = (target.tokenizer(), draft.tokenizer());
        if a.vocab_size() != b.vocab_size() {
            return Err(Error::InvalidArgument(format!(
                "the draft model's vocabulary has {} tokens, the model's {}",
                b.vocab_size(),
                a.vocab_size()
            )));
        }
        // Each tokenizer hashes its vocabulary once; the tokens are compared one by one only
        // to name the first that differs.
        if a.vocab_hash() != b.vocab_hash() {
            let (ta, tb) = (a.token_bytes(), b.token_bytes());
            let i = (0..ta.len()).find(|&i| ta[i] != tb[i]).unwrap_or(0);
            return Err(Error::InvalidArgument(format!(
                "the draft model's vocabulary differs from the model's at token {i}: {:?} \
                 where the model has {:?}",
                String::from_utf8_lossy(&tb[i]),
                String::from_utf8_lossy(&ta[i])
            )));
        }
        if draft.config().vocab_size != target.config().vocab_size {
            return Err(Error::InvalidArgument(format!(
                "the draft model's output head has {} rows, the model's {}",
                draft.config().vocab_size,
                target.config().vocab_size
            )));
        }
        Ok(())
    }
}

/// The drafting state of one generation.
pub(crate) struct Speculator {
    source: Source,
    /// Most tokens drafted per verification.
    max: usize,
    /// Tokens drafted at the next verification (adapts to acceptance).
    k: usize,
    /// The current verification: tokens drafted, and taken so far.
    round: (usize, usize),
    /// Verifications in a row of which nothing was taken.
    misses: usize,
    /// Steps left to decode without drafting, and the next pause's length.
    pause: (usize, usize),
    /// A draft model's confidence threshold (see [`DRAFT_P_START`]).
    p_min: f32,
    /// Drafted and accepted tokens of the whole generation.
    pub(crate) drafted: usize,
    pub(crate) accepted: usize,
}

impl std::fmt::Debug for Speculator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Speculator")
            .field("k", &self.k)
            .field("drafted", &self.drafted)
            .field("accepted", &self.accepted)
            .finish()
    }
}

enum Source {
    /// n-gram lookup in the context and, for a predicted output, in its tokens (with the
    /// position its last match ended at, where the next match is looked for first).
    Lookup { predicted: Vec<u32>, cursor: usize },
    /// A draft model on its own session.
    Model(Box<Session>),
}

impl Speculator {
    /// The drafting state for `draft` on `session`'s model (`max` tokens per verification at
    /// most; `None` where `max` is 0).
    pub(crate) fn new(draft: &Draft, max: usize, session: &Session) -> Result<Option<Self>> {
        if max == 0 {
            return Ok(None);
        }
        draft.check(session.model())?;
        let source = match draft {
            Draft::Lookup => Source::Lookup {
                predicted: vec![],
                cursor: 0,
            },
            Draft::Prediction(text) => Source::Lookup {
                predicted: session.model().tokenize(text, false, false)?,
                cursor: 0,
            },
            Draft::PredictedTokens(ids) => {
                session.model().tokenizer().check_ids(ids)?;
                Source::Lookup {
                    predicted: ids.clone(),
                    cursor: 0,
                }
            }
            Draft::Model(m) => {
                let opts = crate::SessionOptions {
                    n_ctx: session.n_ctx(),
                    threads: session.threads(),
                    ..Default::default()
                };
                Source::Model(Box::new(m.session(opts)?))
            }
        };
        Ok(Some(Speculator {
            source,
            max,
            k: max,
            round: (0, 0),
            misses: 0,
            pause: (0, 1),
            p_min: DRAFT_P_START,
            drafted: 0,
            accepted: 0,
        }))
    }

    /// After sampling `id` (not yet evaluated): takes it from the verified drafts if it is the
    /// next one (`None`: nothing to evaluate), else the tokens to evaluate, `id` and a new
    /// draft after it (empty where nothing is drafted: decode `id` alone). `drafting` false
    /// (a busy batch) evaluates `id` alone. Under a constraint (its state past `id`) the draft
    /// ends where the grammar forbids a token: the sampler could never pick it there.
    pub(crate) fn advance(
        &mut self,
        session: &mut Session,
        id: u32,
        drafting: bool,
        constraint: Option<&mut ConstraintState>,
    ) -> Result<Option<Vec<u32>>> {
        // A mismatch drops the drafts still ahead.
        if session.ahead_len() > 0 && session.take_ahead(id) {
            self.accepted += 1;
            self.round.1 += 1;
            if session.ahead_len() == 0 {
                self.settle();
            }
            return Ok(None);
        }
        if self.round.0 > 0 {
            self.settle();
        }
        let draft = if drafting && self.pause.0 == 0 {
            let mut d = self.propose(session, id)?;
            if let Some(c) = constraint {
                d.truncate(c.valid_prefix(&d));
            }
            d
        } else {
            self.pause.0 = self.pause.0.saturating_sub(1);
            vec![]
        };
        self.drafted += draft.len();
        self.round = (draft.len(), 0);
        let mut out = Vec::with_capacity(draft.len() + 1);
        out.push(id);
        out.extend(draft);
        Ok(Some(out))
    }

    /// A verification ended (its drafts all taken, or one refused): the next draft length
    /// follows how much of it was taken; after several that gave nothing, drafting pauses
    /// for a while (longer each time).
    fn settle(&mut self) {
        let (drafted, taken) = std::mem::take(&mut self.round);
        if drafted == 0 {
            return;
        }
        let (lo, hi) = DRAFT_P_BOUNDS;
        if taken == drafted {
            self.k = (self.k * 2).min(self.max);
            self.p_min = (self.p_min - DRAFT_P_STEP).max(lo);
        } else {
            self.k = (taken + 1).clamp(1, self.max);
            self.p_min = (self.p_min + 2.0 * DRAFT_P_STEP).min(hi);
        }
        if taken == 0 {
            self.misses += 1;
            if self.misses >= 3 {
                self.pause.0 = self.pause.1;
                self.pause.1 = (self.pause.1 * 2).min(MAX_PAUSE);
                self.misses = 0;
            }
        } else {
            self.misses = 0;
            self.pause.1 = 1;
        }
    }

    /// Up to `k` tokens guessed to follow the session's tokens and `next`.
    fn propose(&mut self, session: &Session, next: u32) -> Result<Vec<u32>> {
        let room = session
            .n_ctx()
            .saturating_sub(session.len() + 1)
            .min(self.k);
        if room == 0 {
            return Ok(vec![]);
        }
        // The context the draft continues: the session's tokens and `next`.
        let mut ctx = Vec::with_capacity(session.len() + 1);
        ctx.extend_from_slice(session.tokens());
        ctx.push(next);
        match &mut self.source {
            Source::Lookup { predicted, cursor } => {
                if let Some((end, found)) = lookup_predicted(predicted, &ctx, *cursor, room) {
                    *cursor = end;
                    return Ok(found);
                }
                Ok(lookup_context(&ctx, room))
            }
            Source::Model(draft) => draft_greedy(draft, &ctx, room, self.p_min),
        }
    }
}

/// The tokens after the first occurrence in `predicted` (at or past `cursor`, else the last
/// one before it) of the longest suffix of `ctx` (at most [`NGRAM_MAX`] tokens) found there;
/// with the position the match ends at.
fn lookup_predicted(
    predicted: &[u32],
    ctx: &[u32],
    cursor: usize,
    k: usize,
) -> Option<(usize, Vec<u32>)> {
    for n in (1..=NGRAM_MAX.min(ctx.len())).rev() {
        let pat = &ctx[ctx.len() - n..];
        let ends = predicted
            .windows(n)
            .enumerate()
            .filter(|(_, w)| *w == pat)
            .map(|(i, _)| i + n)
            .filter(|&end| end < predicted.len());
        let mut best = None;
        for end in ends {
            if end >= cursor {
                best = Some(end);
                break;
            }
            best = Some(end);
        }
        if let Some(end) = best {
            let stop = (end + k).min(predicted.len());
            return Some((end, predicted[end..stop].to_vec()));
        }
    }
    None
}

/// The tokens after the latest earlier occurrence in `ctx` of its longest suffix of
/// [`NGRAM_MIN`]..=[`NGRAM_MAX`] tokens that has one.
fn lookup_context(ctx: &[u32], k: usize) -> Vec<u32> {
    let len = ctx.len();
    for n in (NGRAM_MIN..=NGRAM_MAX.min(len.saturating_sub(1))).rev() {
        let pat = &ctx[len - n..];
        // Occurrences that end before the suffix itself, the latest first.
        if let Some(start) = (0..len - n).rev().find(|&i| &ctx[i..i + n] == pat) {
            let end = start + n;
            return ctx[end..(end + k).min(len)].to_vec();
        }
    }
    vec![]
}

/// Up to `k` greedy tokens of the draft model after `ctx` (its session keeps the prefix it
/// shares with it between calls). Stops at an end-of-generation token or where the draft's
/// own confidence drops below `p_min`.
fn draft_greedy(draft: &mut Session, ctx: &[u32], k: usize, p_min: f32) -> Result<Vec<u32>> {
    let todo = draft.reuse_prefix(ctx);
    if draft.len() + todo.len() + k > draft.n_ctx() {
        return Ok(vec![]);
    }
    draft.eval_uncancellable(&todo)?;
    let mut out = Vec::with_capacity(k);
    for i in 0..k {
        let logits = draft.last_logits()?;
        let (best, p) = top_probability(logits);
        if p < p_min || draft.model().tokenizer().is_eog(best) {
            break;
        }
        out.push(best);
        if i + 1 < k {
            draft.eval_uncancellable(&[best])?;
        }
    }
    Ok(out)
}

/// The most likely token (the lowest id among equals) and its probability.
fn top_probability(logits: &[f32]) -> (u32, f32) {
    let mut best = 0usize;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    let max = logits[best];
    let sum: f32 = logits.iter().map(|&l| (l - max).exp()).sum();
    (best as u32, 1.0 / sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_lookup_takes_the_latest_longest_match() {
        // ... 1 2 3 9 ... 1 2 3 7 8 ... 2 3 -> after the latest "2 3": 7 8
        let ctx = [1, 2, 3, 9, 5, 1, 2, 3, 7, 8, 4, 2, 3];
        assert_eq!(lookup_context(&ctx, 2), vec![7, 8]);
        assert_eq!(lookup_context(&ctx, 9), vec![7, 8, 4, 2, 3]);
        // The longest suffix wins: "4 2 3" nowhere, "2 3" found.
        assert_eq!(lookup_context(&[5, 6, 7], 4), Vec::<u32>::new());
        assert_eq!(lookup_context(&[5, 6, 5, 6], 4), vec![5, 6]);
    }

    #[test]
    fn predicted_lookup_follows_its_cursor() {
        let pred = [10, 11, 12, 10, 11, 13, 14];
        // "10 11" occurs twice: the one at or past the cursor is taken.
        assert_eq!(
            lookup_predicted(&pred, &[1, 10, 11], 0, 3),
            Some((2, vec![12, 10, 11]))
        );
        assert_eq!(
            lookup_predicted(&pred, &[1, 10, 11], 3, 3),
            Some((5, vec![13, 14]))
        );
        // Past the last occurrence, the last one before the cursor.
        assert_eq!(
            lookup_predicted(&pred, &[1, 10, 11], 6, 1),
            Some((5, vec![13]))
        );
        // One token matches where nothing longer does; the end of the prediction drafts nothing.
        assert_eq!(
            lookup_predicted(&pred, &[99, 13], 0, 2),
            Some((6, vec![14]))
        );
        assert_eq!(lookup_predicted(&pred, &[99, 14], 0, 2), None);
    }

    #[test]
    fn top_probability_of_a_peaked_row() {
        let (t, p) = top_probability(&[0.0, 10.0, 0.0]);
        assert_eq!(t, 1);
        assert!(p > 0.99 && p < 1.0);
    }
}
