//! The generation endpoints (`/v1/chat/completions`, `/v1/completions`) and embeddings
//! (`/v1/embeddings`): a request prepared off the decode thread, queued into the engine, and
//! answered as one JSON body or a server-sent event stream.

use crate::api::{self, core_error, finish_reason, ApiError, Params, PromptInput};
use crate::engine::{Event, Job};
use crate::http::*;
use axum::extract::{Request, State};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, Stream};
use llama_core::{Generation, OwnedPrompt, TokenLogprob};
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

/// Chat or completion: what differs in their responses.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Completion,
}

/// One generation request on its way through the engine.
struct Call {
    st: Arc<AppState>,
    kind: Kind,
    id: String,
    created: u64,
    params: Params,
    has_tools: bool,
    prompt_tokens: usize,
    cached_tokens: usize,
    rx: UnboundedReceiver<Event>,
    t0: Instant,
}

impl Call {
    /// Renders and tokenizes the prompt and compiles its constraint (on a blocking thread, not
    /// the decode thread), queues the job and waits until the engine admits it (or refuses
    /// it: the error is the response, sent before any stream starts).
    async fn start(
        st: Arc<AppState>,
        kind: Kind,
        prompt: OwnedPrompt,
        params: Params,
        opts: llama_core::GenerateOptions,
    ) -> Result<Call, ApiError> {
        let prompt_param = prompt.field();
        // Everything that can be checked without work first.
        let cap = st.engine.limits().max_tokens;
        if let Some(n) = params.max_tokens.filter(|&n| n > cap) {
            return Err(ApiError::invalid(
                "max_tokens",
                format!("max_tokens is {n}, above this server's limit of {cap}"),
            ));
        }
        let n_vocab = st.model.config().vocab_size;
        if let Some((id, _)) = params
            .sampler
            .logit_bias
            .iter()
            .find(|(id, _)| *id as usize >= n_vocab)
        {
            return Err(ApiError::invalid(
                "logit_bias",
                format!("logit_bias names token {id}, outside the vocabulary of {n_vocab}"),
            ));
        }
        match &prompt {
            OwnedPrompt::Chat(m) => {
                let bytes: usize = m
                    .iter()
                    .map(|m| {
                        m.content.len()
                            + m.tool_calls
                                .iter()
                                .map(|c| c.name.len() + c.arguments.to_string().len())
                                .sum::<usize>()
                    })
                    .sum();
                // Tools are written into the prompt too.
                let tools: usize = opts
                    .tools
                    .iter()
                    .map(|t| t.to_json().to_string().len())
                    .sum();
                st.check_length(bytes + tools, prompt_param)?;
            }
            OwnedPrompt::Text(t) => st.check_length(t.len(), prompt_param)?,
            OwnedPrompt::Tokens(t) => {
                if t.len() >= st.engine.n_ctx() {
                    return Err(core_error(&llama_core::Error::ContextOverflow {
                        needed: t.len() + 1,
                        max: st.engine.n_ctx(),
                    })
                    .at(prompt_param));
                }
            }
        }
        if let Some(llama_core::Draft::Prediction(p)) = &opts.draft {
            st.check_length(p.len(), "prediction")?;
        }
        // A place in the queue, then a turn on the blocking threads: at most
        // PREPARE_AT_ONCE requests render and tokenize at a time, and at most `max_queue`
        // wait for that or for the batch.
        let ticket = st.engine.reserve()?;
        let turn = st.prepare_turn().await?;
        let has_constraint = opts.constraint.is_some() || opts.grammar.is_some();
        let model = st.model.clone();
        let prepared = tokio::task::spawn_blocking(move || {
            // The turn ends with the work, even when the client has gone.
            let _turn = turn;
            let tokens = match prompt {
                OwnedPrompt::Chat(m) => {
                    model.chat_tokens(&m, llama_core::ChatOptions::with_tools(&opts.tools))
                }
                OwnedPrompt::Text(t) => model.tokenize(&t, true, true),
                OwnedPrompt::Tokens(t) => Ok(t),
            }
            .map_err(|e| core_error(&e).param_if_unset(prompt_param))?;
            let opts = opts.prepared(&model).map_err(|e| {
                core_error(&e).param_if_unset(if has_constraint {
                    "response_format"
                } else {
                    "tools"
                })
            })?;
            Ok::<_, ApiError>((tokens, opts))
        })
        .await
        .map_err(|e| {
            ApiError::new(
                500,
                "server_error",
                format!("preparing the request failed: {e}"),
            )
        })?;
        let (tokens, opts) = prepared?;
        let (tx, mut rx) = unbounded_channel();
        let has_tools = !opts.tools.is_empty();
        st.engine.submit(Job {
            ticket: Some(ticket),
            prompt_param,
            constraint_param: if has_constraint {
                "response_format"
            } else {
                "tools"
            },
            tokens,
            opts,
            max_tokens: params.max_tokens,
            sampler: params.sampler.clone(),
            events: tx,
        })?;
        let t0 = Instant::now();
        let (prompt_tokens, cached_tokens) = match rx.recv().await {
            Some(Event::Started {
                prompt_tokens,
                cached_tokens,
            }) => (prompt_tokens, cached_tokens),
            Some(Event::Done(Err(e))) => return Err(e),
            _ => {
                return Err(ApiError::new(
                    500,
                    "server_error",
                    "the engine ended the request before starting it",
                ))
            }
        };
        let id = st.id(if kind == Kind::Chat {
            "chatcmpl"
        } else {
            "cmpl"
        });
        Ok(Call {
            created: unix_now(),
            st,
            kind,
            id,
            params,
            has_tools,
            prompt_tokens,
            cached_tokens,
            rx,
            t0,
        })
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Completion, _) => "text_completion",
        }
    }

    fn usage(&self, g: &Generation) -> Value {
        let completion = g.tokens.len();
        let t = &g.timings;
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
            // Drafted tokens the reply took, and those it refused (speculative decoding, from
            // `prediction` or the server's draft source; zeros without).
            "completion_tokens_details": {
                "accepted_prediction_tokens": t.accepted_tokens,
                "rejected_prediction_tokens": t.drafted_tokens - t.accepted_tokens,
            },
        })
    }

    /// Chat's `logprobs.content` entries.
    fn chat_logprobs(&self, lps: &[TokenLogprob]) -> Value {
        let entry = |id: u32, lp: f32| {
            let (token, bytes) = self.st.token_text(id);
            json!({"token": token, "logprob": lp, "bytes": bytes})
        };
        let content: Vec<Value> = lps
            .iter()
            .map(|l| {
                let mut e = entry(l.id, l.logprob);
                e["top_logprobs"] = l.top.iter().map(|&(t, p)| entry(t, p)).collect();
                e
            })
            .collect();
        json!({ "content": content })
    }

    /// Completions' `logprobs`: parallel lists, `text_offset` counted from `start`.
    fn completion_logprobs(&self, lps: &[TokenLogprob], start: usize) -> Value {
        let mut offset = start;
        let mut tokens = vec![];
        let mut offsets = vec![];
        for l in lps {
            let (t, _) = self.st.token_text(l.id);
            offsets.push(offset);
            offset += t.len();
            tokens.push(t);
        }
        json!({
            "tokens": tokens,
            "token_logprobs": lps.iter().map(|l| l.logprob).collect::<Vec<_>>(),
            "top_logprobs": lps.iter().map(|l| {
                l.top.iter().map(|&(t, p)| (self.st.token_text(t).0, json!(p))).collect::<serde_json::Map<_, _>>()
            }).collect::<Vec<_>>(),
            "text_offset": offsets,
        })
    }

    fn tool_calls(&self, g: &Generation) -> Vec<Value> {
        g.tool_calls
            .iter()
            .enumerate()
            .map(|(i, c)| {
                json!({
                    "index": i,
                    "id": format!("call_{}_{i}", self.id),
                    "type": "function",
                    "function": {"name": c.name, "arguments": c.arguments.to_string()},
                })
            })
            .collect()
    }

    fn log_end(&self, g: &Generation) {
        tracing::info!(
            id = %self.id,
            prompt_tokens = self.prompt_tokens,
            completion_tokens = g.tokens.len(),
            stop = g.stop_reason.as_str(),
            tokens_per_s = g.timings.generation_tps(),
            ms = self.t0.elapsed().as_secs_f64() * 1e3,
            "generation"
        );
    }

    /// Waits for the end and answers with one JSON object.
    async fn whole(mut self) -> Response {
        let g = loop {
            match self.rx.recv().await {
                Some(Event::Token { .. }) | Some(Event::Started { .. }) => {}
                Some(Event::Done(Ok(g))) => break g,
                Some(Event::Done(Err(e))) => return e.into_response(),
                None => {
                    return ApiError::new(500, "server_error", "the engine stopped").into_response()
                }
            }
        };
        self.log_end(&g);
        let made_calls = !g.tool_calls.is_empty();
        let finish = finish_reason(g.stop_reason, made_calls);
        let logprobs = self.params.logprobs.map(|_| match self.kind {
            Kind::Chat => self.chat_logprobs(&g.logprobs),
            Kind::Completion => self.completion_logprobs(&g.logprobs, 0),
        });
        let choice = match self.kind {
            Kind::Chat => {
                let mut message = json!({"role": "assistant", "content": g.text});
                if made_calls {
                    message["content"] = Value::Null;
                    message["tool_calls"] = Value::Array(self.tool_calls(&g));
                }
                json!({"index": 0, "message": message, "logprobs": logprobs, "finish_reason": finish})
            }
            Kind::Completion => {
                json!({"index": 0, "text": g.text, "logprobs": logprobs, "finish_reason": finish})
            }
        };
        axum::Json(json!({
            "id": self.id,
            "object": self.object(false),
            "created": self.created,
            "model": self.st.model_id,
            "choices": [choice],
            "usage": self.usage(&g),
        }))
        .into_response()
    }

    fn chunk(&self, choice: Value) -> SseEvent {
        let v = json!({
            "id": self.id,
            "object": self.object(true),
            "created": self.created,
            "model": self.st.model_id,
            "choices": [choice],
        });
        SseEvent::default().data(v.to_string())
    }

    fn delta(&self, text: &str, logprobs: &[TokenLogprob], offset: usize) -> SseEvent {
        let lp = self.params.logprobs.map(|_| match self.kind {
            Kind::Chat => self.chat_logprobs(logprobs),
            Kind::Completion => self.completion_logprobs(logprobs, offset),
        });
        match self.kind {
            Kind::Chat => self.chunk(json!({
                "index": 0, "delta": {"content": text}, "logprobs": lp, "finish_reason": null
            })),
            Kind::Completion => self.chunk(json!({
                "index": 0, "text": text, "logprobs": lp, "finish_reason": null
            })),
        }
    }

    /// The closing events of a stream: a reply held back for tools, the finish reason, usage.
    fn last(&self, g: &Generation, held: &str) -> Vec<SseEvent> {
        let mut out = vec![];
        let made_calls = !g.tool_calls.is_empty();
        if self.kind == Kind::Chat && made_calls {
            out.push(self.chunk(json!({
                "index": 0, "delta": {"tool_calls": self.tool_calls(g)}, "logprobs": null,
                "finish_reason": null
            })));
        } else if !held.is_empty() {
            // Everything was held back: the generation's log-probabilities are the held text's.
            out.push(self.delta(held, &g.logprobs, 0));
        }
        let finish = finish_reason(g.stop_reason, made_calls);
        out.push(match self.kind {
            Kind::Chat => self.chunk(json!({
                "index": 0, "delta": {}, "logprobs": null, "finish_reason": finish
            })),
            Kind::Completion => self.chunk(json!({
                "index": 0, "text": "", "logprobs": null, "finish_reason": finish
            })),
        });
        if self.params.include_usage {
            let v = json!({
                "id": self.id,
                "object": self.object(true),
                "created": self.created,
                "model": self.st.model_id,
                "choices": [],
                "usage": self.usage(g),
            });
            out.push(SseEvent::default().data(v.to_string()));
        }
        out.push(SseEvent::default().data("[DONE]"));
        out
    }

    /// Streams `chat.completion.chunk`s (or completion chunks) ending in `data: [DONE]`. With
    /// tools, the reply is held back until its end, when it is known to be calls or text.
    fn stream(self) -> Response {
        struct S {
            call: Call,
            queue: std::collections::VecDeque<SseEvent>,
            held: String,
            offset: usize,
            done: bool,
        }
        let mut first = std::collections::VecDeque::new();
        if self.kind == Kind::Chat {
            first.push_back(self.chunk(json!({
                "index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null,
                "finish_reason": null
            })));
        }
        let s = S {
            call: self,
            queue: first,
            held: String::new(),
            offset: 0,
            done: false,
        };
        let events = stream::unfold(s, |mut s| async move {
            loop {
                if let Some(e) = s.queue.pop_front() {
                    return Some((Ok::<_, Infallible>(e), s));
                }
                if s.done {
                    return None;
                }
                // Tokens that arrived together go out in one chunk.
                let mut text = String::new();
                let mut lps = vec![];
                let mut end = None;
                match s.call.rx.recv().await {
                    None => {
                        end = Some(Err(ApiError::new(
                            500,
                            "server_error",
                            "the engine stopped",
                        )))
                    }
                    Some(ev) => {
                        let mut ev = Some(ev);
                        while let Some(e) = ev.take() {
                            match e {
                                Event::Token { text: t, logprob } => {
                                    text.push_str(&t);
                                    lps.extend(logprob);
                                }
                                Event::Started { .. } => {}
                                Event::Done(r) => {
                                    end = Some(r);
                                    break;
                                }
                            }
                            ev = s.call.rx.try_recv().ok();
                        }
                    }
                }
                if s.call.has_tools && s.call.kind == Kind::Chat {
                    s.held.push_str(&text);
                } else if !text.is_empty() || !lps.is_empty() {
                    let e = s.call.delta(&text, &lps, s.offset);
                    s.offset += text.len();
                    s.queue.push_back(e);
                }
                match end {
                    Some(Ok(g)) => {
                        s.call.log_end(&g);
                        let held = std::mem::take(&mut s.held);
                        s.queue.extend(s.call.last(&g, &held));
                        s.done = true;
                    }
                    Some(Err(e)) => {
                        s.queue
                            .push_back(SseEvent::default().data(e.body().to_string()));
                        s.done = true;
                    }
                    None => {}
                }
            }
        });
        sse(events)
    }
}

fn sse<S>(events: S) -> Response
where
    S: Stream<Item = Result<SseEvent, Infallible>> + Send + 'static,
{
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}

pub(crate) async fn chat_completions(State(st): State<Arc<AppState>>, req: Request) -> Response {
    let r = match read_json(&st, req, api::parse_chat).await {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let mut opts = options(&st, &r.params, r.constraint);
    opts.tools = r.tools;
    opts.tool_choice = r.tool_choice;
    answer(
        st,
        Kind::Chat,
        OwnedPrompt::Chat(r.messages),
        r.params,
        opts,
    )
    .await
}

pub(crate) async fn completions(State(st): State<Arc<AppState>>, req: Request) -> Response {
    let r = match read_json(&st, req, api::parse_completion).await {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let opts = options(&st, &r.params, r.constraint);
    let prompt = match r.prompt {
        PromptInput::Text(t) => OwnedPrompt::Text(t),
        PromptInput::Tokens(t) => OwnedPrompt::Tokens(t),
    };
    answer(st, Kind::Completion, prompt, r.params, opts).await
}

/// The generation options of a request's parameters and constraint (and the server's
/// speculative decoding, or the request's predicted output).
fn options(
    st: &AppState,
    params: &Params,
    constraint: Option<llama_core::Constraint>,
) -> llama_core::GenerateOptions {
    let mut opts = llama_core::GenerateOptions::default();
    opts.stop = params.stop.clone();
    opts.logprobs = params.logprobs;
    opts.constraint = constraint;
    let limits = st.engine.limits();
    opts.draft = match &params.prediction {
        Some(text) => Some(llama_core::Draft::Prediction(text.clone())),
        None => limits.draft.clone(),
    };
    opts.draft_max = limits.draft_max;
    opts
}

/// Runs a generation request and answers it: a stream of events or one JSON body.
async fn answer(
    st: Arc<AppState>,
    kind: Kind,
    prompt: OwnedPrompt,
    params: Params,
    opts: llama_core::GenerateOptions,
) -> Response {
    let stream = params.stream;
    match Call::start(st, kind, prompt, params, opts).await {
        Ok(c) if stream => c.stream(),
        Ok(c) => c.whole().await,
        Err(e) => e.into_response(),
    }
}

/// Sets a flag when dropped: a handler's future dropped by a client that went away stops its
/// blocking work.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

pub(crate) async fn embeddings(State(st): State<Arc<AppState>>, req: Request) -> Response {
    let r = match read_json(&st, req, api::parse_embeddings).await {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    match embed(&st, r).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn embed(st: &Arc<AppState>, r: api::EmbeddingRequest) -> Result<Response, ApiError> {
    let n_ctx = st.engine.n_ctx();
    let n_vocab = st.model.config().vocab_size;
    for (i, input) in r.inputs.iter().enumerate() {
        match input {
            PromptInput::Text(t) => st.check_length(t.len(), "input").map_err(|e| ApiError {
                message: format!("input {i}: {}", e.message),
                ..e
            })?,
            PromptInput::Tokens(t) => {
                if let Some(bad) = t.iter().find(|&&id| id as usize >= n_vocab) {
                    return Err(ApiError::invalid(
                        "input",
                        format!("input {i} holds token {bad}, outside the vocabulary of {n_vocab}"),
                    ));
                }
            }
        }
    }
    // A place in the queue while the inputs are tokenized and wait for the model.
    let ticket = st.engine.reserve()?;
    let turn = st.prepare_turn().await?;
    let model = st.model.clone();
    let inputs = r.inputs;
    let ids = tokio::task::spawn_blocking(move || {
        let _turn = turn;
        let mut ids = Vec::with_capacity(inputs.len());
        for (i, input) in inputs.into_iter().enumerate() {
            let t = match input {
                PromptInput::Text(t) => model
                    .tokenize(&t, true, false)
                    .map_err(|e| core_error(&e).param_if_unset("input"))?,
                PromptInput::Tokens(t) => t,
            };
            if t.len() > n_ctx {
                return Err(ApiError::invalid(
                    "input",
                    format!(
                        "input {i} is {} tokens, above the context of {n_ctx}",
                        t.len()
                    ),
                )
                .code("context_length_exceeded"));
            }
            ids.push(t);
        }
        Ok(ids)
    })
    .await
    .map_err(|e| ApiError::new(500, "server_error", format!("tokenizing failed: {e}")))??;
    // Embeddings wait for one another (they share the compute threads with decode).
    let _permit = st
        .embed
        .acquire()
        .await
        .map_err(|_| ApiError::new(503, "server_error", "the server is shutting down"))?;
    drop(ticket);
    let model = st.model.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let guard = CancelOnDrop(stop.clone());
    let work = tokio::task::spawn_blocking(move || {
        ids.iter()
            .map(|t| {
                let e = model.embed_tokens_with(t, &mut || stop.load(Ordering::SeqCst))?;
                let mut v = e.mean;
                let norm = v
                    .iter()
                    .map(|x| (*x as f64) * (*x as f64))
                    .sum::<f64>()
                    .sqrt();
                if norm > 0.0 {
                    v.iter_mut().for_each(|x| *x = (*x as f64 / norm) as f32);
                }
                Ok((v, t.len()))
            })
            .collect::<llama_core::Result<Vec<_>>>()
    });
    let out = match work.await {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => return Err(core_error(&e).param_if_unset("input")),
        Err(e) => {
            return Err(ApiError::new(
                500,
                "server_error",
                format!("embedding failed: {e}"),
            ))
        }
    };
    drop(guard);
    let tokens: usize = out.iter().map(|(_, n)| n).sum();
    let data: Vec<Value> = out
        .into_iter()
        .enumerate()
        .map(|(i, (v, _))| {
            let embedding = if r.base64 {
                use base64::Engine as _;
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    Ok(axum::Json(json!({
        "object": "list",
        "data": data,
        "model": st.model_id,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }))
    .into_response())
}
