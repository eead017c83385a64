//! Structured output: generation constrained to a JSON schema, a grammar (Lark or llama.cpp's
//! GBNF), a regular expression or a list of choices, on llguidance.
//!
//! llguidance's token table is built from this library's own token bytes
//! ([`Tokenizer::token_bytes`]), once per model on first use. A [`Constraint`] is compiled
//! into a [`Grammar`] before any token is generated (so a bad schema is an error up front);
//! each generation then runs a fresh matcher over it: the mask of allowed tokens is applied to
//! the logits before every other sampling stage, and generation ends when the grammar is
//! complete.

pub mod gbnf;
pub mod tools;

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use llguidance::api::TopLevelGrammar;
use llguidance::{Matcher, ParserFactory, TokenParser};
use toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};

use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;

/// What generated text must match.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Constraint {
    /// JSON that validates against this JSON Schema (the subset llguidance supports; an
    /// unsupported keyword is an error, not silently ignored).
    JsonSchema(serde_json::Value),
    /// Any JSON object (OpenAI's `response_format: {"type": "json_object"}`).
    JsonObject,
    /// A grammar in llguidance's Lark syntax (`start: ...`).
    Lark(String),
    /// A grammar in llama.cpp's GBNF (`root ::= ...`).
    Gbnf(String),
    /// A regular expression (Rust `regex` syntax) the whole output must match.
    Regex(String),
    /// Exactly one of these strings.
    Choices(Vec<String>),
}

impl Constraint {
    /// The constraint in OpenAI's `response_format`: `{"type": "json_schema", "json_schema":
    /// {"schema": {...}, ...}}` (a bare schema under `json_schema` is accepted too),
    /// `{"type": "json_object"}`, or `{"type": "text"}` (no constraint: `None`).
    pub fn from_response_format(v: &serde_json::Value) -> Result<Option<Constraint>> {
        let bad = |m: String| Error::InvalidArgument(m);
        let ty = v.get("type").and_then(|t| t.as_str()).ok_or_else(|| {
            bad("response_format needs a 'type' ('json_schema', 'json_object' or 'text')".into())
        })?;
        match ty {
            "text" => Ok(None),
            "json_object" => Ok(Some(Constraint::JsonObject)),
            "json_schema" => {
                let js = v.get("json_schema").ok_or_else(|| {
                    bad("response_format of type 'json_schema' needs 'json_schema'".into())
                })?;
                let schema = js.get("schema").unwrap_or(js);
                if !schema.is_object() && !schema.is_boolean() {
                    return Err(bad(
                        "response_format's json_schema.schema must be a JSON schema object".into(),
                    ));
                }
                Ok(Some(Constraint::JsonSchema(schema.clone())))
            }
            other => Err(bad(format!(
                "response_format type {other:?} is not 'json_schema', 'json_object' or 'text'"
            ))),
        }
    }

    /// A JSON schema given as text.
    pub fn json_schema_str(text: &str) -> Result<Constraint> {
        serde_json::from_str(text)
            .map(Constraint::JsonSchema)
            .map_err(|e| Error::Grammar(format!("the JSON schema is not valid JSON: {e}")))
    }

    /// A grammar whose syntax is told by its content: GBNF when its first rule is written
    /// `name ::= ...`, Lark otherwise.
    pub fn grammar(text: impl Into<String>) -> Constraint {
        let text = text.into();
        if gbnf::looks_like_gbnf(&text) {
            Constraint::Gbnf(text)
        } else {
            Constraint::Lark(text)
        }
    }

    /// A short name of the kind: `json_schema`, `json_object`, `lark`, `gbnf`, `regex`,
    /// `choices`.
    pub fn kind(&self) -> &'static str {
        match self {
            Constraint::JsonSchema(_) => "json_schema",
            Constraint::JsonObject => "json_object",
            Constraint::Lark(_) => "lark",
            Constraint::Gbnf(_) => "gbnf",
            Constraint::Regex(_) => "regex",
            Constraint::Choices(_) => "choices",
        }
    }

    /// A constraint from a kind name (as [`Constraint::kind`] writes it, or `grammar` for
    /// either grammar syntax) and its text.
    pub fn from_kind(kind: &str, text: &str) -> Result<Constraint> {
        Ok(match kind {
            "json_schema" => Constraint::json_schema_str(text)?,
            "json_object" => Constraint::JsonObject,
            "lark" => Constraint::Lark(text.into()),
            "gbnf" => Constraint::Gbnf(text.into()),
            "grammar" => Constraint::grammar(text),
            "regex" => Constraint::Regex(text.into()),
            // One choice per line.
            "choices" => Constraint::Choices(text.lines().map(String::from).collect()),
            other => {
                return Err(Error::InvalidArgument(format!(
                    "unknown constraint kind {other:?} (json_schema, json_object, lark, gbnf, \
                     grammar, regex, choices)"
                )))
            }
        })
    }

    /// The Lark text or schema llguidance compiles.
    pub(crate) fn to_llguidance(&self, tok: &Tokenizer) -> Result<TopLevelGrammar> {
        Ok(match self {
            Constraint::JsonSchema(schema) => {
                if !schema.is_object() && !schema.is_boolean() {
                    return Err(Error::Grammar(
                        "a JSON schema must be an object (or true/false)".into(),
                    ));
                }
                TopLevelGrammar::from_json_schema(with_default_layout(schema.clone()))
            }
            Constraint::JsonObject => TopLevelGrammar::from_json_schema(with_default_layout(
                serde_json::json!({"type": "object"}),
            )),
            Constraint::Lark(text) => TopLevelGrammar::from_lark(text.clone()),
            Constraint::Gbnf(text) => {
                TopLevelGrammar::from_lark(gbnf::gbnf_to_lark(text, &|t| tok.token_to_id(t))?)
            }
            Constraint::Regex(rx) => {
                // llguidance's own check gives a less direct message; the regex crate names
                // the problem and its position.
                regex::Regex::new(rx)
                    .map_err(|e| Error::Grammar(format!("invalid regular expression: {e}")))?;
                TopLevelGrammar::from_regex(rx)
            }
            Constraint::Choices(items) => {
                if items.is_empty() {
                    return Err(Error::Grammar("a list of choices must not be empty".into()));
                }
                let alts: Vec<String> = items
                    .iter()
                    .map(|s| serde_json::to_string(s).expect("a string serializes"))
                    .collect();
                TopLevelGrammar::from_lark(format!("start: {}", alts.join(" | ")))
            }
        })
    }
}

/// JSON written compactly with `", "` and `": "` separators unless the schema says otherwise
/// (`x-guidance`): llguidance's default lets whitespace run on, which small models do.
fn with_default_layout(mut schema: serde_json::Value) -> serde_json::Value {
    if let Some(obj) = schema.as_object_mut() {
        obj.entry("x-guidance").or_insert_with(|| {
            serde_json::json!({
                "whitespace_flexible": false,
                "item_separator": ", ",
                "key_separator": ": ",
            })
        });
    }
    schema
}

/// llguidance's view of a model's vocabulary.
struct TokenTable {
    trie: TokTrie,
    tokenizer: Tokenizer,
}

impl TokenizerEnv for TokenTable {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }
    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        // Text through the model's own tokenizer; bytes that are not UTF-8 greedily by the
        // table (llguidance uses this for forced text, never for the mask).
        // The tokenizer's ids are used only when they spell exactly these bytes (SentencePiece
        // prepends a space; llguidance forces the first of these tokens).
        if let Ok(text) = std::str::from_utf8(s) {
            if let Ok(ids) = self.tokenizer.encode(text, false, false) {
                let spelled = ids
                    .iter()
                    .try_fold(Vec::with_capacity(s.len()), |mut v, &id| {
                        ((id as usize) < self.trie.vocab_size()).then(|| {
                            v.extend_from_slice(self.trie.token(id));
                            v
                        })
                    });
                if spelled.as_deref() == Some(s) {
                    return ids;
                }
            }
        }
        self.trie.greedy_tokenize(s)
    }
}

/// The compiler of constraints for one model (its token table), built on first use.
#[derive(Clone)]
pub(crate) struct Compiler {
    factory: Arc<ParserFactory>,
    vocab: usize,
}

impl Compiler {
    pub(crate) fn new(tok: &Tokenizer) -> Result<Compiler> {
        let words = tok.token_bytes();
        let eos = tok
            .eos_id()
            .or_else(|| tok.eog_ids().first().copied())
            .unwrap_or(0);
        let info = TokRxInfo::new(words.len() as u32, eos);
        let eog: Vec<u32> = tok.eog_ids().to_vec();
        let trie = TokTrie::from(&info, &words);
        let trie = if eog.is_empty() {
            trie
        } else {
            trie.with_eos_tokens(&eog)
        };
        let env: TokEnv = Arc::new(TokenTable {
            trie,
            tokenizer: tok.clone(),
        });
        let mut factory = ParserFactory::new_simple(&env)
            .map_err(|e| Error::Grammar(format!("building the token table: {e}")))?;
        factory.quiet();
        Ok(Compiler {
            factory: Arc::new(factory),
            vocab: words.len(),
        })
    }

    /// Compiles `c`; every error (syntax, unsupported schema keyword, a grammar that allows
    /// nothing) comes out here, before generation.
    pub(crate) fn compile(&self, c: &Constraint, tok: &Tokenizer) -> Result<Grammar> {
        let t0 = Instant::now();
        let top = c.to_llguidance(tok)?;
        let parser = self
            .factory
            .create_parser(top)
            .map_err(|e| Error::Grammar(format!("{} constraint: {e}", c.kind())))?;
        let grammar = Grammar {
            parser,
            vocab: self.vocab,
            kind: c.kind(),
            compile_time: Duration::ZERO,
        };
        // The first mask finds what only shows once the lexer runs (a regex that can match
        // nothing, a grammar whose start is empty).
        let mut m = grammar.matcher();
        m.first_mask()?;
        Ok(Grammar {
            compile_time: t0.elapsed(),
            ..grammar
        })
    }
}

/// A compiled constraint: immutable, cheap to clone; each generation starts its own matcher.
#[derive(Clone)]
pub struct Grammar {
    parser: TokenParser,
    vocab: usize,
    kind: &'static str,
    compile_time: Duration,
}

impl std::fmt::Debug for Grammar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grammar")
            .field("kind", &self.kind)
            .field("compile_time", &self.compile_time)
            .finish()
    }
}

impl Grammar {
    /// The constraint's kind ([`Constraint::kind`]).
    pub fn kind(&self) -> &'static str {
        self.kind
    }
    /// How long compiling it took (the token table, built once per model, not included).
    pub fn compile_time(&self) -> Duration {
        self.compile_time
    }
    pub(crate) fn matcher(&self) -> ConstraintState {
        ConstraintState {
            m: Matcher::new(Ok(self.parser.clone())),
            vocab: self.vocab,
            mask_time: Duration::ZERO,
        }
    }
}

/// One generation's position in a grammar.
pub(crate) struct ConstraintState {
    m: Matcher,
    vocab: usize,
    pub(crate) mask_time: Duration,
}

impl std::fmt::Debug for ConstraintState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConstraintState")
            .field("stopped", &self.m.is_stopped())
            .finish()
    }
}

/// A matcher's error: its first line (llguidance appends its parser's internal state, which
/// is no use to the person who wrote the constraint).
fn llg_err(e: impl std::fmt::Display) -> Error {
    let e = e.to_string();
    let first = e
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim();
    Error::Grammar(format!("constraint: {first}"))
}

impl ConstraintState {
    fn first_mask(&mut self) -> Result<()> {
        let mask = self.m.compute_mask().map_err(llg_err)?;
        if mask.is_zero() && !self.m.is_stopped() {
            return Err(Error::Grammar(
                "the constraint allows no output at all".into(),
            ));
        }
        Ok(())
    }

    /// Whether the grammar is complete and allows nothing more.
    pub(crate) fn is_stopped(&self) -> bool {
        self.m.is_stopped()
    }

    /// Whether what was generated so far is a complete match.
    pub(crate) fn is_accepting(&mut self) -> bool {
        self.m.is_accepting().unwrap_or(false)
    }

    /// Sets the logits of every token the grammar does not allow next to -inf.
    pub(crate) fn apply(&mut self, logits: &mut [f32]) -> Result<()> {
        let t0 = Instant::now();
        let mask = self.m.compute_mask().map_err(llg_err)?;
        if mask.is_zero() {
            return Err(Error::Grammar(
                "the constraint allows no next token (the vocabulary cannot spell what it needs)"
                    .into(),
            ));
        }
        let n = self.vocab.min(logits.len());
        mask.iter_unset_entries(|i| {
            if i < n {
                logits[i] = f32::NEG_INFINITY;
            }
        });
        for l in logits.iter_mut().skip(n) {
            *l = f32::NEG_INFINITY;
        }
        self.mask_time += t0.elapsed();
        Ok(())
    }

    /// How many of `tokens`, from the first, the grammar allows after what it has consumed
    /// (the state is unchanged): a draft is cut where it leaves the grammar.
    pub(crate) fn valid_prefix(&mut self, tokens: &[u32]) -> usize {
        let t0 = Instant::now();
        let n = self.m.validate_tokens(tokens).unwrap_or(0);
        self.mask_time += t0.elapsed();
        n.min(tokens.len())
    }

    /// Advances past a sampled token (one the mask allowed).
    pub(crate) fn consume(&mut self, id: u32) -> Result<()> {
        let t0 = Instant::now();
        let r = self.m.consume_token(id).map_err(llg_err);
        self.mask_time += t0.elapsed();
        r
    }
}

/// The per-model compiler, built once.
pub(crate) fn compiler<'a>(
    cell: &'a OnceLock<Result<Compiler, String>>,
    tok: &Tokenizer,
) -> Result<&'a Compiler> {
    cell.get_or_init(|| Compiler::new(tok).map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|e| Error::Grammar(e.clone()))
}
