//! Generation: the decode loop ([`Generator`]) with stop conditions, UTF-8-safe streaming,
//! stop strings, log-probabilities, cancellation and timings; [`Session::start`] and the
//! callback and iterator forms ([`TokenStream`]).

use std::ops::ControlFlow;
use std::time::{Duration, Instant};

pub use super::detok::Detokenizer;
pub(crate) use super::options::resolve_grammar;
pub use super::options::{CancelHandle, Draft, GenerateOptions};
pub use super::outcome::{Generation, Piece, StopReason, Timings, TokenLogprob};
pub use super::prompt::{OwnedPrompt, Prompt};
use super::speculate::Speculator;
use super::Session;
use crate::constrain::tools::{parse_tool_calls, ToolChoice};
use crate::constrain::ConstraintState;
use crate::error::{Error, Result};
use crate::model::ChatOptions;
use crate::sampler::{log_softmax, Sampler};

/// The generation state machine, owned and independent of any borrow: drive it with
/// [`Generator::step`] (language bindings keep it between calls; [`TokenStream`] wraps it).
#[derive(Debug)]
pub struct Generator {
    opts: GenerateOptions,
    detok: Detokenizer,
    text: String,
    emitted: usize,
    stops: super::stops::StopMatcher,
    result: Generation,
    done: bool,
    started: Instant,
    constraint: Option<ConstraintState>,
    spec: Option<Speculator>,
}

impl Generator {
    /// Evaluates `prompt` after the session's current context and prepares generation.
    pub fn new(session: &mut Session, prompt: &[u32], opts: GenerateOptions) -> Result<Self> {
        let t0 = Instant::now();
        // A bad constraint is an error before anything is evaluated or generated.
        let constraint = resolve_grammar(session.model(), &opts)?.map(|g| g.matcher());
        let spec = match &opts.draft {
            Some(d) => Speculator::new(d, opts.draft_max, session)?,
            None => None,
        };
        let n_prompt = prompt.len();
        if !prompt.is_empty() {
            session.eval(prompt)?;
        } else if session.logits().is_none() {
            return Err(Error::no_logits());
        }
        let prompt_time = t0.elapsed();
        let detok = Detokenizer::new(session.tokens(), opts.special);
        let stops = super::stops::StopMatcher::new(&opts.stop);
        Ok(Generator {
            opts,
            detok,
            text: String::new(),
            emitted: 0,
            stops,
            result: Generation {
                tokens: vec![],
                text: String::new(),
                stop_reason: StopReason::MaxTokens,
                logprobs: vec![],
                tool_calls: vec![],
                timings: Timings {
                    prompt_tokens: n_prompt,
                    prompt: prompt_time,
                    ..Default::default()
                },
            },
            done: false,
            started: Instant::now(),
            constraint,
            spec,
        })
    }

    /// Records the prompt's size and time (a batch evaluates prompts before the generator
    /// starts).
    pub(crate) fn set_prompt_timing(&mut self, tokens: usize, time: Duration) {
        self.result.timings.prompt_tokens = tokens;
        self.result.timings.prompt = time;
    }

    /// Generation so far (complete once `step` returned `None`).
    pub fn generation(&self) -> &Generation {
        &self.result
    }

    /// Whether generation has ended.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Ends generation early (stop reason `callback`) unless it already ended.
    pub fn stop(&mut self) {
        if !self.done {
            self.end(StopReason::Callback);
        }
    }

    /// Consumes the generator, returning the result.
    pub fn into_generation(self) -> Generation {
        self.result
    }

    fn end(&mut self, reason: StopReason) -> Option<String> {
        self.done = true;
        self.result.stop_reason = reason;
        self.result.timings.generation = self.started.elapsed();
        self.result.timings.generated_tokens = self.result.tokens.len();
        if let Some(c) = &self.constraint {
            self.result.timings.constraint = c.mask_time;
        }
        if let Some(sp) = &self.spec {
            self.result.timings.drafted_tokens = sp.drafted;
            self.result.timings.accepted_tokens = sp.accepted;
        }
        if reason == StopReason::StopString {
            self.parse_calls();
            return None;
        }
        let rest = self.text[self.emitted..].to_string();
        self.emitted = self.text.len();
        self.result.text = self.text.clone();
        self.parse_calls();
        (!rest.is_empty()).then_some(rest)
    }

    fn parse_calls(&mut self) {
        if !self.opts.tools.is_empty() && self.opts.tool_choice != ToolChoice::None {
            self.result.tool_calls = parse_tool_calls(&self.result.text, &self.opts.tools);
        }
    }

    /// Runs one decode step: samples a token, evaluates it, and returns the text it releases;
    /// `None` once generation has ended.
    pub fn step(&mut self, session: &mut Session, sampler: &mut Sampler) -> Result<Option<Piece>> {
        match self.sample_step(session, sampler)? {
            None => Ok(None),
            Some((piece, None)) => Ok(Some(piece)),
            Some((piece, Some(id))) => {
                match self.tokens_to_eval(session, id, true)? {
                    None => {}
                    Some(t) if t.len() == 1 => session.eval_uncancellable(&t)?,
                    Some(t) => session.eval_verify(t[0], &t[1..])?,
                }
                Ok(Some(piece))
            }
        }
    }

    /// What to evaluate after `id` was sampled: `id` alone, `id` and the drafted tokens to
    /// verify after it (speculative decoding; `drafting` false evaluates `id` alone), or
    /// nothing where `id` is the next verified draft (taken).
    pub(crate) fn tokens_to_eval(
        &mut self,
        session: &mut Session,
        id: u32,
        drafting: bool,
    ) -> Result<Option<Vec<u32>>> {
        match &mut self.spec {
            Some(sp) => sp.advance(session, id, drafting, self.constraint.as_mut()),
            None => Ok(Some(vec![id])),
        }
    }

    /// [`Generator::step`] up to the evaluation: samples and returns the piece, and the token
    /// to evaluate before the next step (`None` when generation ended with this piece). A
    /// batch evaluates the tokens of all its sequences in one forward pass.
    pub(crate) fn sample_step(
        &mut self,
        session: &mut Session,
        sampler: &mut Sampler,
    ) -> Result<Option<(Piece, Option<u32>)>> {
        if self.done {
            return Ok(None);
        }
        if session.cancel.take() {
            let rest = self.end(StopReason::Cancelled);
            return Ok(rest.map(|text| {
                (
                    Piece {
                        token: u32::MAX,
                        text,
                    },
                    None,
                )
            }));
        }
        let complete = self.constraint.as_ref().is_some_and(|c| c.is_stopped());
        if complete || self.result.tokens.len() >= self.opts.max_tokens {
            let accepting = self.constraint.as_mut().map(|c| c.is_accepting());
            let reason = match accepting {
                Some(_) if complete => StopReason::GrammarComplete,
                Some(false) => StopReason::GrammarIncomplete,
                _ => StopReason::MaxTokens,
            };
            let rest = self.end(reason);
            return Ok(rest.map(|text| {
                (
                    Piece {
                        token: u32::MAX,
                        text,
                    },
                    None,
                )
            }));
        }
        let raw = session.logits().ok_or_else(Error::no_logits)?;
        let mut logits = raw.to_vec();
        if let Some(c) = &mut self.constraint {
            c.apply(&mut logits)?;
        }
        let id = sampler.sample(&logits, session.tokens())?;
        if let Some(c) = &mut self.constraint {
            // An end-of-generation token is allowed only where the output is complete; the
            // matcher has nothing to advance past then.
            if !session.model().tokenizer().is_eog(id) {
                c.consume(id)?;
            }
        }
        if let Some(top) = self.opts.logprobs {
            // The model's own probabilities, before the constraint's mask.
            let lp = log_softmax(session.logits().ok_or_else(Error::no_logits)?);
            self.result.logprobs.push(TokenLogprob {
                id,
                logprob: lp[id as usize],
                top: crate::sampler::top_k_of(&lp, top),
            });
        }
        self.result.tokens.push(id);
        let model = session.model().clone();
        let tok = model.tokenizer();
        if tok.is_eog(id) {
            let rest = self.end(StopReason::EndOfGeneration);
            return Ok(Some((
                Piece {
                    token: id,
                    text: rest.unwrap_or_default(),
                },
                None,
            )));
        }
        let hit = match self.detok.step(tok, id)? {
            Some(piece) => {
                self.text.push_str(&piece);
                self.stops.feed(piece.as_bytes())
            }
            None => None,
        };
        if let Some(pos) = hit {
            // A match starts in the held-back text or later (the held text is the longest
            // end of the text that begins a stop string).
            let pos = pos.max(self.emitted);
            let out = self.text[self.emitted..pos].to_string();
            self.text.truncate(pos);
            self.emitted = self.text.len();
            self.result.text.push_str(&out);
            self.end(if self.constraint.is_some() {
                StopReason::GrammarIncomplete
            } else {
                StopReason::StopString
            });
            return Ok(Some((
                Piece {
                    token: id,
                    text: out,
                },
                None,
            )));
        }
        let hold = self.stops.pending().min(self.text.len() - self.emitted);
        let upto = self.text.len() - hold;
        let out = self.text[self.emitted..upto].to_string();
        self.emitted = upto;
        // The result's text is the emitted text: appended, not copied again at every token.
        self.result.text.push_str(&out);
        // Make room for the token the next step evaluates.
        if session.len() + 1 > session.n_ctx() {
            session.shift_context()?;
        }
        Ok(Some((
            Piece {
                token: id,
                text: out,
            },
            Some(id),
        )))
    }
}

/// The decode loop as an iterator of [`Piece`]s; see [`Session::stream`].
pub struct TokenStream<'s> {
    session: &'s mut Session,
    sampler: &'s mut Sampler,
    gen: Generator,
}

impl TokenStream<'_> {
    /// Generation so far (complete once the iterator returned `None`).
    pub fn generation(&self) -> &Generation {
        self.gen.generation()
    }

    /// Runs to the end and returns the result.
    pub fn finish(mut self) -> Result<Generation> {
        for p in self.by_ref() {
            p?;
        }
        Ok(self.gen.into_generation())
    }

    /// Stops early (as if the callback asked to) and returns the result so far.
    pub fn stop(mut self) -> Generation {
        self.gen.stop();
        self.gen.into_generation()
    }
}

impl Iterator for TokenStream<'_> {
    type Item = Result<Piece>;
    fn next(&mut self) -> Option<Self::Item> {
        match self.gen.step(self.session, self.sampler) {
            Ok(Some(p)) => Some(Ok(p)),
            Ok(None) => None,
            Err(e) => {
                self.gen.done = true;
                Some(Err(e))
            }
        }
    }
}

impl Session {
    /// The tokens still to evaluate for `prompt` (see [`Prompt`]); for a chat the session is
    /// truncated to the prefix it shares with the conversation, rendered with `chat`.
    pub fn prompt_tokens(&mut self, prompt: Prompt<'_>, chat: ChatOptions<'_>) -> Result<Vec<u32>> {
        match prompt {
            Prompt::Text(t) => self.model().tokenize(t, self.is_empty(), true),
            Prompt::Tokens(ids) => Ok(ids.to_vec()),
            Prompt::Chat(messages) => {
                let ids = self.model().chat_tokens(messages, chat)?;
                Ok(self.reuse_prefix(&ids))
            }
        }
    }

    /// The one generation driver: evaluates `prompt` and returns the [`Generator`] to step
    /// ([`Session::stream`], [`Session::generate`], the batch, C and Python all start here).
    pub fn start<'p>(
        &mut self,
        prompt: impl Into<Prompt<'p>>,
        opts: GenerateOptions,
    ) -> Result<Generator> {
        let ids = self.prompt_tokens(prompt.into(), (&opts).into())?;
        Generator::new(self, &ids, opts)
    }

    /// The `k` most likely next tokens as `(id, log-probability)`, best first, equal values in
    /// id order (the order of [`GenerateOptions::logprobs`] too).
    pub fn top_logprobs(&self, k: usize) -> Result<Vec<(u32, f32)>> {
        Ok(crate::sampler::top_k_of(
            &log_softmax(self.last_logits()?),
            k,
        ))
    }

    /// The logits of the last evaluated position, or the "no logits yet" error.
    pub fn last_logits(&self) -> Result<&[f32]> {
        self.logits().ok_or_else(Error::no_logits)
    }

    /// Draws the next token from the last logits with `sampler` (the session's tokens feed its
    /// penalties).
    pub fn sample(&self, sampler: &mut Sampler) -> Result<u32> {
        sampler.sample(self.last_logits()?, self.tokens())
    }

    /// A handle that cancels this session's work from another thread.
    pub fn cancel_handle(&self) -> CancelHandle {
        self.cancel.clone()
    }

    /// Evaluates `prompt` (any [`Prompt`]: text, token ids, or a conversation whose cached
    /// prefix is reused) after the current context, then streams generated pieces: an
    /// iterator over [`Piece`]s.
    pub fn stream<'s, 'p>(
        &'s mut self,
        prompt: impl Into<Prompt<'p>>,
        sampler: &'s mut Sampler,
        opts: GenerateOptions,
    ) -> Result<TokenStream<'s>> {
        let gen = self.start(prompt, opts)?;
        Ok(TokenStream {
            session: self,
            sampler,
            gen,
        })
    }

    /// Evaluates `prompt` (as [`Session::stream`]) after the current context and generates,
    /// calling `on_piece` with each piece of text as it becomes final; return
    /// `ControlFlow::Break(())` to stop. Pieces whose text is empty (a token whose text is held
    /// back: part of a character or of a possible stop string) are not passed to `on_piece`.
    /// A conversation ([`Prompt::Chat`], or `&[Message]`) is rendered with the model's chat
    /// template and the reply generated: this is the chat call.
    pub fn generate<'p>(
        &mut self,
        prompt: impl Into<Prompt<'p>>,
        sampler: &mut Sampler,
        opts: GenerateOptions,
        mut on_piece: impl FnMut(&str) -> ControlFlow<()>,
    ) -> Result<Generation> {
        let mut stream = self.stream(prompt, sampler, opts)?;
        while let Some(p) = stream.next() {
            let p = p?;
            if !p.text.is_empty() && on_piece(&p.text).is_break() {
                return Ok(stream.stop());
            }
        }
        Ok(stream.gen.into_generation())
    }

    /// Keeps the longest cached prefix shared with `ids` and returns the tokens still to
    /// evaluate (at least one, so that logits are fresh).
    pub fn reuse_prefix(&mut self, ids: &[u32]) -> Vec<u32> {
        let common = self
            .tokens()
            .iter()
            .zip(ids)
            .take_while(|(a, b)| a == b)
            .count();
        let keep = if common == ids.len() {
            common.saturating_sub(1)
        } else {
            common
        };
        self.truncate(keep);
        ids[keep..].to_vec()
    }
}
