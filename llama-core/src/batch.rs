//! Continuous batching: many generations advance together, one forward pass per step.
//!
//! A [`Batch`] holds sequences, each a [`Session`] with its own sampler, options (stop
//! strings, constraints, tools), adapters and KV cache. Every [`Batch::step`] samples the next
//! token of each decoding sequence, then runs one forward pass ([`Session::eval_batch`]) over
//! those tokens together with the next prompt chunk of each sequence still reading its prompt,
//! so new conversations join while others decode. A sequence's tokens are exactly those it
//! generates alone (same sampler seed, same options): the batched pass gives each row the
//! logits it gets alone, and sampling is per sequence. A sequence that asks for speculative
//! decoding ([`GenerateOptions::draft`]) verifies its drafts in the same pass while few
//! sequences decode (its rows computed as decoded one at a time), and decodes plainly when the
//! batch is busy: its output is the same either way.

use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::sampler::Sampler;
use crate::session::generate::{
    resolve_grammar, Generation, Generator, Piece, Prompt, StopReason, TokenLogprob,
};
use crate::session::{CancelHandle, Session};
use crate::GenerateOptions;

/// Identifies a sequence of a [`Batch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeqId(pub u64);

/// Text a step released for one sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchEvent {
    /// The sequence.
    pub id: SeqId,
    /// The token and the text it released (text may be empty; `token` is `u32::MAX` for a
    /// final flush).
    pub piece: Piece,
    /// The token's log-probability and alternatives, when the options ask for them.
    pub logprob: Option<TokenLogprob>,
}

/// A sequence that ended: its generation (or the error that ended it) and its session, which
/// holds the conversation's cache for a next turn.
#[derive(Debug)]
pub struct Finished {
    /// The sequence.
    pub id: SeqId,
    /// What it generated, or why it failed.
    pub result: Result<Generation>,
    /// Its session.
    pub session: Session,
}

struct Seq {
    id: SeqId,
    session: Session,
    sampler: Sampler,
    /// Prompt tokens not evaluated yet, and the options to start the generator with.
    pending: Vec<u32>,
    done_prompt: usize,
    opts: Option<GenerateOptions>,
    gen: Option<Generator>,
    cancel: CancelHandle,
    prompt_time: Duration,
    /// Prompt tokens taken from the prefix cache when the sequence was added.
    cached: usize,
}

/// Many generations on one model, advanced together ([`Batch::step`]).
pub struct Batch {
    model: crate::Model,
    seqs: Vec<Seq>,
    finished: Vec<Finished>,
    next: u64,
    /// Sessions that just read a prompt, kept so that a new request starting with the same
    /// tokens (a shared system prompt) starts from a copy instead of reading them again;
    /// newest last.
    prefixes: Vec<Session>,
    prefix_slots: usize,
}

/// Most decoding sequences of a step at which their generations still speculate (those that
/// ask for it, [`GenerateOptions::draft`]).
const SPECULATE_UP_TO: usize = 2;

/// The shortest shared prefix worth copying a cache for.
const MIN_SHARED_PREFIX: usize = 16;

impl std::fmt::Debug for Batch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batch")
            .field("sequences", &self.seqs.len())
            .field("finished", &self.finished.len())
            .finish()
    }
}

impl Batch {
    /// An empty batch for sessions of `model`.
    pub fn new(model: &crate::Model) -> Batch {
        Batch {
            model: model.clone(),
            seqs: vec![],
            finished: vec![],
            next: 0,
            prefixes: vec![],
            prefix_slots: 4,
        }
    }

    /// Keeps the caches of the last `slots` prompts read (default 4; 0 turns the prefix cache
    /// off): a new request on an empty session whose tokens start with at least 16 of one of
    /// them (a shared system prompt, an earlier turn) starts from a copy of that cache and reads
    /// only the rest. The copy holds exactly what reading those tokens computes.
    pub fn with_prefix_cache(mut self, slots: usize) -> Batch {
        self.prefix_slots = slots;
        self.prefixes.truncate(slots);
        self
    }

    /// A copy of the cached prompt sharing the longest prefix with `prompt` (at least
    /// [`MIN_SHARED_PREFIX`] tokens), for an empty `session` with the same options and adapters.
    fn reuse(
        &self,
        session: &Session,
        prompt: &Prompt<'_>,
        opts: &GenerateOptions,
    ) -> Result<Option<(Session, Vec<u32>)>> {
        if !session.is_empty() || self.prefixes.is_empty() {
            return Ok(None);
        }
        let ids = match prompt {
            Prompt::Chat(m) => self.model.chat_tokens(m, opts.into())?,
            Prompt::Text(t) => self.model.tokenize(t, true, true)?,
            Prompt::Tokens(t) => t.to_vec(),
        };
        let same_adapters = |a: &Session| {
            a.adapters().len() == session.adapters().len()
                && a.adapters()
                    .iter()
                    .zip(session.adapters())
                    .all(|((x, s), (y, t))| x.same(y) && s == t)
        };
        let best = self
            .prefixes
            .iter()
            .filter(|p| p.options() == session.options() && same_adapters(p))
            .map(|p| {
                let common = p
                    .tokens()
                    .iter()
                    .zip(&ids)
                    .take_while(|(a, b)| a == b)
                    .count();
                (common, p)
            })
            .max_by_key(|(c, _)| *c);
        match best {
            Some((common, p)) if common >= MIN_SHARED_PREFIX => Ok(Some((p.fork()?, ids))),
            _ => Ok(None),
        }
    }

    /// Adds a generation: `session` (of this batch's model) continues from `prompt` with
    /// `opts` and `sampler`. The prompt is rendered and tokenized now (a chat reuses the
    /// session's cached prefix) and its constraint compiled now, so bad input is an error here;
    /// the prompt is evaluated by the following steps, a chunk of the session's `n_batch` at a
    /// time, alongside the other sequences.
    pub fn add(
        &mut self,
        mut session: Session,
        prompt: Prompt<'_>,
        mut opts: GenerateOptions,
        sampler: Sampler,
    ) -> Result<SeqId> {
        if !std::sync::Arc::ptr_eq(&session.model().inner, &self.model.inner) {
            return Err(Error::InvalidArgument(
                "the session belongs to another model than the batch".into(),
            ));
        }
        opts.grammar = resolve_grammar(&self.model, &opts)?;
        let reuse = self.reuse(&session, &prompt, &opts)?;
        let reused = reuse.is_some();
        let pending = match reuse {
            Some((copy, ids)) => {
                session = copy;
                session.reuse_prefix(&ids)
            }
            None => session.prompt_tokens(prompt, (&opts).into())?,
        };
        if pending.is_empty() && session.logits().is_none() {
            return Err(Error::no_logits());
        }
        self.model.tokenizer().check_ids(&pending)?;
        let needed = session.len() + pending.len();
        if needed > session.n_ctx() {
            return Err(Error::ContextOverflow {
                needed,
                max: session.n_ctx(),
            });
        }
        let id = SeqId(self.next);
        self.next += 1;
        let cancel = session.cancel_handle();
        let cached = if reused { session.len() } else { 0 };
        self.seqs.push(Seq {
            id,
            session,
            sampler,
            pending,
            done_prompt: 0,
            opts: Some(opts),
            gen: None,
            cancel,
            prompt_time: Duration::ZERO,
            cached,
        });
        Ok(id)
    }

    /// How many of sequence `id`'s prompt tokens came from the prefix cache (a copy of an
    /// earlier prompt's cache) instead of being read; `None` when it is not running.
    pub fn cached_tokens(&self, id: SeqId) -> Option<usize> {
        self.seqs.iter().find(|s| s.id == id).map(|s| s.cached)
    }

    /// Sequences still running (reading their prompt or generating).
    pub fn len(&self) -> usize {
        self.seqs.len()
    }

    /// Whether no sequence is running.
    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }

    /// A handle that cancels sequence `id` from any thread (it ends with stop reason
    /// `cancelled` at the next step).
    pub fn cancel_handle(&self, id: SeqId) -> Option<CancelHandle> {
        self.seqs
            .iter()
            .find(|s| s.id == id)
            .map(|s| s.cancel.clone())
    }

    /// Ends sequence `id` now (stop reason `callback`); false when it is not running.
    pub fn stop(&mut self, id: SeqId) -> bool {
        let Some(i) = self.seqs.iter().position(|s| s.id == id) else {
            return false;
        };
        let mut s = self.seqs.remove(i);
        let result = match s.gen.take() {
            Some(mut g) => {
                g.stop();
                Ok(g.into_generation())
            }
            None => Ok(empty_generation(StopReason::Callback, &s)),
        };
        self.finished.push(Finished {
            id,
            result,
            session: s.session,
        });
        true
    }

    /// Sequences that ended since the last call.
    pub fn take_finished(&mut self) -> Vec<Finished> {
        std::mem::take(&mut self.finished)
    }

    /// One step: samples the next token of every generating sequence (returning the text it
    /// releases), then evaluates those tokens and the next prompt chunk of every sequence still
    /// reading its prompt in one forward pass. A sequence that ends (its stop condition, a
    /// cancel, or an error of its own) moves to [`Batch::take_finished`]. An error of the pass
    /// itself is returned, every session left as before the step's evaluation.
    pub fn step(&mut self) -> Result<Vec<BatchEvent>> {
        let mut events = vec![];
        // Each sequence's tokens to evaluate, and whether they are a verification (a sampled
        // token and the draft after it).
        let mut to_eval: Vec<(usize, Vec<u32>, bool)> = vec![];
        let mut ended: Vec<(usize, Result<Generation>)> = vec![];
        // Speculation only while the batch is not busy: with several sequences decoding, one
        // pass already checks several tokens per read of the weights, and drafts would add
        // rows that are mostly refused.
        let decoding = self.seqs.iter().filter(|s| s.gen.is_some()).count();
        let drafting = decoding <= SPECULATE_UP_TO;
        for (i, s) in self.seqs.iter_mut().enumerate() {
            if let Some(g) = s.gen.as_mut() {
                match g.sample_step(&mut s.session, &mut s.sampler) {
                    Ok(Some((piece, next))) => {
                        let logprob = match g.generation().logprobs.last() {
                            Some(l) if piece.token != u32::MAX && l.id == piece.token => {
                                Some(l.clone())
                            }
                            _ => None,
                        };
                        events.push(BatchEvent {
                            id: s.id,
                            piece,
                            logprob,
                        });
                        match next {
                            Some(t) => match g.tokens_to_eval(&mut s.session, t, drafting) {
                                Ok(Some(toks)) => {
                                    let verify = toks.len() > 1;
                                    to_eval.push((i, toks, verify));
                                }
                                // A verified draft taken: nothing to evaluate.
                                Ok(None) => {}
                                Err(e) => ended.push((i, Err(e))),
                            },
                            None => {
                                let g = s.gen.take().expect("generating");
                                ended.push((i, Ok(g.into_generation())));
                            }
                        }
                    }
                    Ok(None) => {
                        let g = s.gen.take().expect("generating");
                        ended.push((i, Ok(g.into_generation())));
                    }
                    Err(e) => ended.push((i, Err(e))),
                }
            } else if s.cancel.is_cancelled() {
                s.cancel.take();
                ended.push((i, Ok(empty_generation(StopReason::Cancelled, s))));
            } else {
                let n = s.session.options().n_batch;
                let end = (s.done_prompt + n).min(s.pending.len());
                to_eval.push((i, s.pending[s.done_prompt..end].to_vec(), false));
            }
        }
        let t0 = Instant::now();
        {
            let mut refs: Vec<(&mut Session, &[u32], bool)> = vec![];
            let mut want = to_eval.iter().peekable();
            for (i, s) in self.seqs.iter_mut().enumerate() {
                if let Some((_, toks, verify)) = want.next_if(|(j, _, _)| *j == i) {
                    refs.push((&mut s.session, toks.as_slice(), *verify));
                }
            }
            Session::eval_many(&mut refs)?;
        }
        let pass = t0.elapsed();
        // Sequences whose prompt is now read start generating at the next step.
        for (i, toks, _) in &to_eval {
            let s = &mut self.seqs[*i];
            if s.gen.is_some() {
                continue;
            }
            s.done_prompt += toks.len();
            s.prompt_time += pass;
            if s.done_prompt == s.pending.len() {
                if self.prefix_slots > 0 && s.session.len() >= MIN_SHARED_PREFIX {
                    if let Ok(copy) = s.session.fork() {
                        if self.prefixes.len() >= self.prefix_slots {
                            self.prefixes.remove(0);
                        }
                        self.prefixes.push(copy);
                    }
                }
                let opts = s.opts.take().expect("options until the generator starts");
                match Generator::new(&mut s.session, &[], opts) {
                    Ok(mut g) => {
                        g.set_prompt_timing(s.pending.len(), s.prompt_time);
                        s.gen = Some(g);
                    }
                    Err(e) => ended.push((*i, Err(e))),
                }
            }
        }
        // A sequence with nothing to read (its prompt was its cached prefix) starts too.
        for (i, s) in self.seqs.iter_mut().enumerate() {
            if s.gen.is_none() && s.pending.is_empty() && s.opts.is_some() {
                let opts = s.opts.take().expect("checked");
                match Generator::new(&mut s.session, &[], opts) {
                    Ok(g) => s.gen = Some(g),
                    Err(e) => ended.push((i, Err(e))),
                }
            }
        }
        ended.sort_by_key(|(i, _)| std::cmp::Reverse(*i));
        ended.dedup_by_key(|(i, _)| *i);
        for (i, result) in ended {
            let s = self.seqs.remove(i);
            self.finished.push(Finished {
                id: s.id,
                result,
                session: s.session,
            });
        }
        Ok(events)
    }

    /// Runs steps until every sequence has ended; returns them all, in the order they were
    /// added.
    pub fn run_to_end(&mut self) -> Result<Vec<Finished>> {
        while !self.is_empty() {
            self.step()?;
        }
        let mut all = self.take_finished();
        all.sort_by_key(|f| f.id);
        Ok(all)
    }
}

/// The generation of a sequence that ended before generating.
fn empty_generation(reason: StopReason, s: &Seq) -> Generation {
    Generation {
        tokens: vec![],
        text: String::new(),
        stop_reason: reason,
        logprobs: vec![],
        tool_calls: vec![],
        timings: crate::Timings {
            prompt_tokens: s.done_prompt,
            prompt: s.prompt_time,
            ..Default::default()
        },
    }
}
