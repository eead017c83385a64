//! Tokenization: a `tokenizers::Tokenizer` loaded from `tokenizer.json`, or built from GGUF
//! metadata (`gpt2` byte-level BPE with the file's pre-tokenizer, or `llama` SentencePiece).
//!
//! Semantics follow llama.cpp's `llama_tokenize(text, add_special, parse_special)`:
//! `add_special` adds BOS when the model asks for it, `parse_special` turns special-token text
//! such as `<|im_start|>` into its single id (otherwise it is tokenized as plain text).

use std::collections::HashMap;
use std::path::Path;

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::prepend::Prepend;
use tokenizers::normalizers::replace::Replace;
use tokenizers::normalizers::utils::Sequence as NormalizerSequence;
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer as HfTokenizer};

use crate::error::{Error, Result};
use crate::gguf::GgufFile;

pub(crate) const GPT2_REGEX: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const LLAMA3_REGEX: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_REGEX: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Texts of control tokens that end a turn in the chat formats we know (llama.cpp treats them
/// as end-of-generation too).
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end_of_text|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<|end|>",
    "<end_of_turn>",
    "<EOT>",
    // Fill-in-the-middle repository/padding markers (llama.cpp ends generation on them too).
    "<reponame>",
    "<|repo_name|>",
    "<|fim_repo|>",
    "<fim-repo>",
    "<|fim_pad|>",
    "<fim-pad>",
];

/// Pre-tokenizer regexes (applied one after another, each match isolated) for a GGUF
/// `tokenizer.ggml.pre` name, plus whether merges are ignored for whole-word vocabulary hits.
fn pre_tokenizer_regexes(pre: &str) -> Option<(Vec<&'static str>, bool)> {
    Some(match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "pixtral" => (vec![LLAMA3_REGEX], true),
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" => {
            (vec![r"\p{N}", GPT2_REGEX], false)
        }
        "gpt-2" | "gpt2" | "phi-2" | "mpt" | "olmo" | "jais" | "trillion" => {
            (vec![GPT2_REGEX], false)
        }
        "qwen2" | "stablelm2" => (vec![QWEN2_REGEX], false),
        "default" => (
            vec![
                r"[\p{P}\$\+<=>\^~\|]+",
                GPT2_REGEX,
                r"\p{N}+",
                r"[0-9][0-9][0-9]",
            ],
            false,
        ),
        _ => return None,
    })
}

/// The llama.cpp pre-tokenizer name whose regexes are `regexes` (as written in a
/// tokenizer.json, `(?i:...)` contractions accepted).
pub(crate) fn pre_name_for_regexes(regexes: &[String]) -> Option<&'static str> {
    let norm: Vec<String> = regexes
        .iter()
        .map(|r| {
            r.replace(
                "(?i:'s|'t|'re|'ve|'m|'ll|'d)",
                "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])",
            )
        })
        .collect();
    ["llama-bpe", "smollm", "gpt-2", "qwen2"]
        .into_iter()
        .find(|name| {
            pre_tokenizer_regexes(name).is_some_and(|(rs, _)| {
                rs.len() == norm.len() && rs.iter().zip(&norm).all(|(a, b)| a == b)
            })
        })
}

/// A tokenizer for one model.
#[derive(Clone)]
pub struct Tokenizer {
    /// Encodes with special-token text parsed into special ids.
    special: HfTokenizer,
    /// Encodes special-token text as ordinary text.
    /// Built on first use (a second copy of the vocabulary and merges, ~14 MiB for a 49k
    /// vocabulary, that most programs never need).
    plain: std::sync::OnceLock<HfTokenizer>,
    /// True when BOS/EOS are added by us rather than by the tokenizer's post-processor.
    manual_specials: bool,
    bos: Option<u32>,
    eos: Option<u32>,
    add_bos: bool,
    add_eos: bool,
    eog: Vec<u32>,
    vocab_size: usize,
    /// The special tokens' texts and ids, and a matcher for them (built on first use).
    specials: std::sync::OnceLock<Specials>,
    /// A hash of [`Tokenizer::token_bytes`] (computed on first use).
    vocab_hash: std::sync::OnceLock<u64>,
}

/// Special-token texts, matched leftmost-longest as the tokenizers crate splits them.
#[derive(Clone)]
struct Specials {
    ids: Vec<u32>,
    matcher: Option<aho_corasick::AhoCorasick>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size)
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("add_bos", &self.add_bos)
            .finish()
    }
}

fn tok_err(e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(e.to_string())
}

impl Tokenizer {
    fn finish(
        special: HfTokenizer,
        manual_specials: bool,
        bos: Option<u32>,
        eos: Option<u32>,
        add_bos: bool,
        add_eos: bool,
        extra_eog: &[u32],
    ) -> Self {
        let plain = std::sync::OnceLock::new();
        let vocab_size = special.get_vocab_size(true);
        let mut eog: Vec<u32> = eos.into_iter().collect();
        for &id in extra_eog {
            if !eog.contains(&id) {
                eog.push(id);
            }
        }
        for t in special.get_added_tokens_decoder().values() {
            if t.special && EOG_TEXTS.contains(&t.content.as_str()) {
                if let Some(id) = special.token_to_id(&t.content) {
                    if !eog.contains(&id) {
                        eog.push(id);
                    }
                }
            }
        }
        eog.sort_unstable();
        Tokenizer {
            special,
            plain,
            manual_specials,
            bos,
            eos,
            add_bos,
            add_eos,
            eog,
            vocab_size,
            specials: std::sync::OnceLock::new(),
            vocab_hash: std::sync::OnceLock::new(),
        }
    }

    fn specials(&self) -> &Specials {
        self.specials.get_or_init(|| {
            let mut texts = vec![];
            let mut ids = vec![];
            for (&id, t) in self.special.get_added_tokens_decoder().iter() {
                if t.special && !t.content.is_empty() {
                    texts.push(t.content.clone());
                    ids.push(id);
                }
            }
            let matcher = aho_corasick::AhoCorasick::builder()
                .match_kind(aho_corasick::MatchKind::LeftmostLongest)
                .build(&texts)
                .ok();
            Specials { ids, matcher }
        })
    }

    /// Whether `text` holds the text of a special token (which `encode(.., true)` would parse).
    pub fn contains_special_text(&self, text: &str) -> bool {
        self.specials()
            .matcher
            .as_ref()
            .is_some_and(|m| m.is_match(text))
    }

    /// Encodes text whose `plain` byte ranges (sorted, disjoint: message content in a rendered
    /// conversation) are text whatever they contain: special-token text is parsed into special
    /// ids only outside them, as Hugging Face's `split_special_tokens=True` and llama.cpp's
    /// `parse_special=false` treat untrusted text. When no special-token text touches a plain
    /// range this is exactly `encode(text, add_special, true)`; otherwise the text is split at
    /// the special tokens outside the ranges and each piece between them encoded as text.
    pub fn encode_with_plain_ranges(
        &self,
        text: &str,
        add_special: bool,
        plain: &[std::ops::Range<usize>],
    ) -> Result<Vec<u32>> {
        let sp = self.specials();
        let Some(matcher) = &sp.matcher else {
            return self.encode(text, add_special, true);
        };
        let overlaps = |s: usize, e: usize| plain.iter().any(|r| s < r.end && r.start < e);
        if !matcher
            .find_iter(text)
            .any(|m| overlaps(m.start(), m.end()))
        {
            return self.encode(text, add_special, true);
        }
        // Special tokens are matched in the template's text only: between the plain ranges.
        let mut kept: Vec<(usize, usize, u32)> = vec![];
        let mut from = 0;
        let bounds = plain
            .iter()
            .map(|r| (r.start, r.end))
            .chain(std::iter::once((text.len(), text.len())));
        for (s, e) in bounds {
            if s > from {
                for m in matcher.find_iter(&text[from..s]) {
                    kept.push((
                        from + m.start(),
                        from + m.end(),
                        sp.ids[m.pattern().as_usize()],
                    ));
                }
            }
            from = from.max(e);
        }
        let mut ids = vec![];
        if add_special && self.add_bos {
            ids.extend(self.bos);
        }
        let mut at = 0;
        for (s, e, id) in kept {
            if s > at {
                ids.extend(self.encode(&text[at..s], false, false)?);
            }
            ids.push(id);
            at = e;
        }
        if at < text.len() {
            ids.extend(self.encode(&text[at..], false, false)?);
        }
        if add_special && self.add_eos {
            ids.extend(self.eos);
        }
        Ok(ids)
    }

    /// Loads `tokenizer.json`, with `tokenizer_config.json` beside it when present.
    pub fn from_hf_files(
        tokenizer_json: &Path,
        config: Option<&serde_json::Value>,
    ) -> Result<Self> {
        // The tokenizers crate panics on some malformed files (found by tests/fuzz.rs: a
        // decoder section cut short): that is an error of the file, not a crash of the host.
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            Self::from_hf_files_unchecked(tokenizer_json, config)
        }))
        .unwrap_or_else(|_| {
            Err(Error::Tokenizer(format!(
                "cannot load {}: the file is malformed (the tokenizers library failed on it)",
                tokenizer_json.display()
            )))
        })
    }

    fn from_hf_files_unchecked(
        tokenizer_json: &Path,
        config: Option<&serde_json::Value>,
    ) -> Result<Self> {
        let tok = HfTokenizer::from_file(tokenizer_json).map_err(|e| {
            Error::Tokenizer(format!("cannot load {}: {e}", tokenizer_json.display()))
        })?;
        let token_str = |key: &str| -> Option<String> {
            let v = config?.get(key)?;
            v.as_str().map(str::to_string).or_else(|| {
                v.get("content")
                    .and_then(|c| c.as_str())
                    .map(str::to_string)
            })
        };
        let bos = token_str("bos_token").and_then(|t| tok.token_to_id(&t));
        let eos = token_str("eos_token").and_then(|t| tok.token_to_id(&t));
        // Does the post-processor add BOS? Compare encodings with and without specials.
        let with = tok.encode("a", true).map_err(tok_err)?;
        let without = tok.encode("a", false).map_err(tok_err)?;
        let post_adds_bos = with.get_ids().len() > without.get_ids().len()
            && bos.is_some_and(|b| with.get_ids().first() == Some(&b));
        let cfg_bool = |key: &str| config.and_then(|c| c.get(key)).and_then(|v| v.as_bool());
        let add_bos = cfg_bool("add_bos_token").unwrap_or(post_adds_bos);
        let add_eos = cfg_bool("add_eos_token").unwrap_or(false);
        // If the post-processor's behaviour matches the config we let it work; otherwise we add
        // specials ourselves.
        let post_adds_eos = with.get_ids().last() != without.get_ids().last()
            && eos.is_some_and(|e| with.get_ids().last() == Some(&e));
        let manual = post_adds_bos != add_bos || post_adds_eos != add_eos;
        Ok(Self::finish(tok, manual, bos, eos, add_bos, add_eos, &[]))
    }

    /// Builds the tokenizer described by GGUF `tokenizer.ggml.*` metadata.
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let path = g.path().display().to_string();
        let err = |m: String| Error::Tokenizer(format!("{m} (in {path})"));
        let model = g
            .get("tokenizer.ggml.model")
            .and_then(|v| v.as_str())
            .ok_or_else(|| err("missing tokenizer.ggml.model".into()))?;
        let tokens: Vec<String> = g
            .get("tokenizer.ggml.tokens")
            .and_then(|v| v.as_array())
            .ok_or_else(|| err("missing tokenizer.ggml.tokens".into()))?
            .iter()
            .map(|v| v.as_str().map(str::to_string))
            .collect::<Option<_>>()
            .ok_or_else(|| err("tokenizer.ggml.tokens must be strings".into()))?;
        let n = tokens.len();
        if n == 0 {
            return Err(err("empty vocabulary".into()));
        }
        let types: Vec<i64> = match g
            .get("tokenizer.ggml.token_type")
            .and_then(|v| v.as_array())
        {
            Some(a) if a.len() == n => a.iter().map(|v| v.as_i64().unwrap_or(1)).collect(),
            Some(_) => return Err(err("tokenizer.ggml.token_type has the wrong length".into())),
            None => vec![1; n],
        };
        let id_key = |k: &str| -> Result<Option<u32>> {
            match g.get(k).and_then(|v| v.as_u64()) {
                None => Ok(None),
                Some(id) if (id as usize) < n => Ok(Some(id as u32)),
                Some(id) => Err(err(format!("{k} = {id} is outside the vocabulary of {n}"))),
            }
        };
        let bos = id_key("tokenizer.ggml.bos_token_id")?;
        let eos = id_key("tokenizer.ggml.eos_token_id")?;
        let unk = id_key("tokenizer.ggml.unknown_token_id")?;
        let mut extra_eog = vec![];
        for k in ["tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"] {
            if let Some(id) = id_key(k)? {
                extra_eog.push(id);
            }
        }
        let flag = |k: &str| g.get(k).and_then(|v| v.as_bool());
        let mut vocab: HashMap<String, u32> = HashMap::with_capacity(n);
        for (i, t) in tokens.iter().enumerate() {
            // Duplicate texts keep their first id, as llama.cpp does.
            vocab.entry(t.clone()).or_insert(i as u32);
        }
        let (mut tok, add_bos_default) = match model {
            "gpt2" => {
                let merges: Vec<(String, String)> = match g
                    .get("tokenizer.ggml.merges")
                    .and_then(|v| v.as_array())
                {
                    Some(a) => a
                        .iter()
                        .map(|m| {
                            let s = m.as_str()?;
                            let (l, r) = s.split_once(' ')?;
                            Some((l.to_string(), r.to_string()))
                        })
                        .collect::<Option<_>>()
                        .ok_or_else(|| err("malformed tokenizer.ggml.merges".into()))?,
                    None => return Err(err("BPE vocabulary without tokenizer.ggml.merges".into())),
                };
                let pre = g
                    .get("tokenizer.ggml.pre")
                    .and_then(|v| v.as_str())
                    .unwrap_or("default");
                let (regexes, ignore_merges) = pre_tokenizer_regexes(pre)
                    .ok_or_else(|| err(format!("unsupported pre-tokenizer `{pre}`")))?;
                let bpe = BPE::builder()
                    .vocab_and_merges(to_ahash(&vocab), merges)
                    .ignore_merges(ignore_merges)
                    .build()
                    .map_err(|e| err(format!("invalid BPE vocabulary: {e}")))?;
                let mut pres: Vec<PreTokenizerWrapper> = vec![];
                for r in regexes {
                    let split = Split::new(
                        SplitPattern::Regex(r.to_string()),
                        SplitDelimiterBehavior::Isolated,
                        false,
                    )
                    .map_err(tok_err)?;
                    pres.push(split.into());
                }
                pres.push(ByteLevel::new(false, true, false).into());
                let mut t = HfTokenizer::new(bpe);
                t.with_pre_tokenizer(Some(PreSequence::new(pres)));
                t.with_decoder(Some(ByteLevelDecoder::default()));
                (t, pre.starts_with("llama") || pre == "falcon3")
            }
            "llama" => {
                let scores: Vec<f32> =
                    match g.get("tokenizer.ggml.scores").and_then(|v| v.as_array()) {
                        Some(a) if a.len() == n => {
                            a.iter().map(|v| v.as_f64().unwrap_or(0.0) as f32).collect()
                        }
                        _ => {
                            return Err(err(
                                "SentencePiece vocabulary needs tokenizer.ggml.scores".into()
                            ))
                        }
                    };
                let merges = spm_merges(&tokens, &types, &scores, &vocab);
                let unk_text = unk.map(|u| tokens[u as usize].clone());
                let mut b = BPE::builder()
                    .vocab_and_merges(to_ahash(&vocab), merges)
                    .byte_fallback(true)
                    .fuse_unk(true);
                if let Some(u) = unk_text {
                    b = b.unk_token(u);
                }
                let bpe = b
                    .build()
                    .map_err(|e| err(format!("invalid SentencePiece vocabulary: {e}")))?;
                let mut t = HfTokenizer::new(bpe);
                let prefix = flag("tokenizer.ggml.add_space_prefix").unwrap_or(true);
                // As llama.cpp: a space is prepended to the text (and after each special token),
                // then spaces become `▁`.
                let mut norms: Vec<NormalizerWrapper> = vec![];
                if prefix {
                    norms.push(Prepend::new("▁".into()).into());
                }
                norms.push(Replace::new(" ", "▁").map_err(tok_err)?.into());
                t.with_normalizer(Some(NormalizerSequence::new(norms)));
                let mut decs: Vec<DecoderWrapper> = vec![
                    Replace::new("▁", " ").map_err(tok_err)?.into(),
                    ByteFallback::new().into(),
                    Fuse::new().into(),
                ];
                if prefix {
                    decs.push(Strip::new(' ', 1, 0).into());
                }
                t.with_decoder(Some(DecoderSequence::new(decs)));
                (t, true)
            }
            other => return Err(err(format!("unsupported tokenizer model `{other}`"))),
        };
        // Control (3) and unknown (2) tokens are special: parsed only on request. User-defined
        // (4) tokens are always matched as a whole, as llama.cpp does.
        let mut specials = vec![];
        let mut user = vec![];
        for (i, t) in tokens.iter().enumerate() {
            match types[i] {
                2 | 3 => specials.push(AddedToken::from(t.clone(), true)),
                4 => user.push(AddedToken::from(t.clone(), false)),
                _ => {}
            }
        }
        tok.add_special_tokens(&specials);
        tok.add_tokens(&user);
        let add_bos = flag("tokenizer.ggml.add_bos_token").unwrap_or(add_bos_default);
        let add_eos = flag("tokenizer.ggml.add_eos_token").unwrap_or(false);
        Ok(Self::finish(
            tok, true, bos, eos, add_bos, add_eos, &extra_eog,
        ))
    }

    /// Encodes text. `add_special` adds BOS (and EOS) where the model asks for them;
    /// `parse_special` maps special-token text to special ids.
    pub fn encode(&self, text: &str, add_special: bool, parse_special: bool) -> Result<Vec<u32>> {
        let tok = if parse_special {
            &self.special
        } else {
            self.plain.get_or_init(|| {
                let mut t = self.special.clone();
                t.set_encode_special_tokens(true);
                t
            })
        };
        let post = add_special && !self.manual_specials;
        let enc = tok.encode_fast(text, post).map_err(tok_err)?;
        let mut ids = enc.get_ids().to_vec();
        if add_special && self.manual_specials {
            if self.add_bos {
                if let Some(b) = self.bos {
                    ids.insert(0, b);
                }
            }
            if self.add_eos {
                if let Some(e) = self.eos {
                    ids.push(e);
                }
            }
        }
        Ok(ids)
    }

    /// Decodes ids to text; special tokens are rendered only when `special` is true.
    pub fn decode(&self, ids: &[u32], special: bool) -> Result<String> {
        self.check_ids(ids)?;
        self.special.decode(ids, !special).map_err(tok_err)
    }

    /// Text of one token as stored in the vocabulary (byte-level or `▁` forms included).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.special.id_to_token(id)
    }

    /// Id of a token text in the vocabulary.
    pub fn token_to_id(&self, text: &str) -> Option<u32> {
        self.special.token_to_id(text)
    }

    /// Checks that every id is inside the vocabulary.
    pub fn check_ids(&self, ids: &[u32]) -> Result<()> {
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= self.vocab_size) {
            return Err(Error::InvalidArgument(format!(
                "token id {bad} is outside the vocabulary of {}",
                self.vocab_size
            )));
        }
        Ok(())
    }

    /// Number of ids, special tokens included.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }
    /// Beginning-of-sequence id.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }
    /// End-of-sequence id.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos
    }
    /// Whether `encode(.., add_special = true, ..)` appends EOS.
    pub fn adds_eos(&self) -> bool {
        self.add_eos
    }

    /// Whether `encode(.., add_special = true, ..)` prepends BOS.
    pub fn adds_bos(&self) -> bool {
        self.add_bos
    }
    /// Every id that ends generation (EOS, end-of-turn, end-of-message).
    pub fn eog_ids(&self) -> &[u32] {
        &self.eog
    }
    /// Whether `id` ends generation.
    pub fn is_eog(&self, id: u32) -> bool {
        self.eog.binary_search(&id).is_ok()
    }
    pub(crate) fn add_eog(&mut self, ids: &[u32]) {
        for &id in ids {
            if (id as usize) < self.vocab_size && !self.eog.contains(&id) {
                self.eog.push(id);
            }
        }
        self.eog.sort_unstable();
    }
    /// The underlying `tokenizers` tokenizer (special tokens parsed).
    pub fn hf(&self) -> &HfTokenizer {
        &self.special
    }

    /// A hash of every token's bytes ([`Tokenizer::token_bytes`]), computed once: two
    /// tokenizers with the same hash and size spell every id alike (a draft model's check,
    /// made at each generation, costs nothing after the first).
    pub fn vocab_hash(&self) -> u64 {
        *self.vocab_hash.get_or_init(|| {
            // FNV-1a over each token's length and bytes.
            let mut h = 0xcbf2_9ce4_8422_2325u64;
            for t in self.token_bytes() {
                for b in (t.len() as u64).to_le_bytes().iter().chain(&t) {
                    h ^= *b as u64;
                    h = h.wrapping_mul(0x100_0000_01b3);
                }
            }
            h
        })
    }

    /// The bytes every token stands for, by id, as they appear in decoded text: byte-level
    /// vocabularies mapped back through GPT-2's byte table, SentencePiece `▁` as a space and
    /// `<0xNN>` pieces as their byte. Special tokens are `0xFF` followed by their text (the
    /// marker llguidance's token tables use); ids the vocabulary leaves empty have no bytes.
    pub fn token_bytes(&self) -> Vec<Vec<u8>> {
        let mode = ByteMode::of(&self.special);
        let added = self.special.get_added_tokens_decoder();
        let unicode_to_byte: HashMap<char, u8> = gpt2_byte_table()
            .iter()
            .enumerate()
            .map(|(b, &c)| (c, b as u8))
            .collect();
        (0..self.vocab_size as u32)
            .map(|id| {
                if let Some(t) = added.get(&id) {
                    let mut v = Vec::with_capacity(t.content.len() + 1);
                    if t.special {
                        v.push(0xFF);
                    }
                    v.extend_from_slice(t.content.as_bytes());
                    return v;
                }
                let Some(text) = self.special.id_to_token(id) else {
                    return vec![];
                };
                match mode {
                    ByteMode::ByteLevel => {
                        let mut v = Vec::with_capacity(text.len());
                        for c in text.chars() {
                            match unicode_to_byte.get(&c) {
                                Some(&b) => v.push(b),
                                None => {
                                    let mut buf = [0u8; 4];
                                    v.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                                }
                            }
                        }
                        v
                    }
                    ByteMode::SentencePiece => {
                        if let Some(b) = text
                            .strip_prefix("<0x")
                            .and_then(|h| h.strip_suffix('>'))
                            .filter(|h| h.len() == 2)
                            .and_then(|h| u8::from_str_radix(h, 16).ok())
                        {
                            return vec![b];
                        }
                        text.replace('\u{2581}', " ").into_bytes()
                    }
                    ByteMode::Plain => text.into_bytes(),
                }
            })
            .collect()
    }
}

/// How vocabulary strings map to text bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ByteMode {
    ByteLevel,
    SentencePiece,
    Plain,
}

impl ByteMode {
    fn of(t: &HfTokenizer) -> ByteMode {
        let Some(dec) = t.get_decoder().and_then(|d| serde_json::to_value(d).ok()) else {
            return ByteMode::Plain;
        };
        fn has(v: &serde_json::Value, pred: &dyn Fn(&serde_json::Value) -> bool) -> bool {
            pred(v)
                || v.get("decoders")
                    .and_then(|d| d.as_array())
                    .is_some_and(|a| a.iter().any(|d| has(d, pred)))
        }
        let ty = |v: &serde_json::Value, name: &str| {
            v.get("type").and_then(|t| t.as_str()) == Some(name)
        };
        if has(&dec, &|v| ty(v, "ByteLevel")) {
            ByteMode::ByteLevel
        } else if has(&dec, &|v| {
            ty(v, "Metaspace")
                || ty(v, "ByteFallback")
                || (ty(v, "Replace") && v.to_string().contains('\u{2581}'))
        }) {
            ByteMode::SentencePiece
        } else {
            ByteMode::Plain
        }
    }
}

/// GPT-2's byte-to-character table: byte `b` is written as character `table[b]`.
fn gpt2_byte_table() -> [char; 256] {
    let mut table = ['\0'; 256];
    let printable = |b: u32| {
        (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b)
    };
    let mut n = 0u32;
    for b in 0..256u32 {
        table[b as usize] = if printable(b) {
            char::from_u32(b).expect("latin-1 is valid")
        } else {
            n += 1;
            char::from_u32(255 + n).expect("below the surrogates")
        };
    }
    table
}

/// Merges for a SentencePiece BPE vocabulary: every split of a token into two vocabulary
/// pieces, ranked by the score of the merged token (highest first), as llama.cpp merges.
fn spm_merges(
    tokens: &[String],
    types: &[i64],
    scores: &[f32],
    vocab: &HashMap<String, u32>,
) -> Vec<(String, String)> {
    let mut ranked: Vec<(f32, u32, String, String)> = vec![];
    for (id, t) in tokens.iter().enumerate() {
        if types[id] != 1 {
            continue;
        }
        let bounds: Vec<usize> = t.char_indices().map(|(i, _)| i).skip(1).collect();
        for &b in &bounds {
            let (l, r) = t.split_at(b);
            if let (Some(&li), Some(&ri)) = (vocab.get(l), vocab.get(r)) {
                let piece = |t: u32| matches!(types[t as usize], 1 | 6);
                if piece(li) && piece(ri) {
                    ranked.push((scores[id], id as u32, l.to_string(), r.to_string()));
                }
            }
        }
    }
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    ranked.into_iter().map(|(_, _, l, r)| (l, r)).collect()
}

fn to_ahash(v: &HashMap<String, u32>) -> tokenizers::models::bpe::Vocab {
    v.iter().map(|(k, v)| (k.clone(), *v)).collect()
}
