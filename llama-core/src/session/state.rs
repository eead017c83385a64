//! Session snapshots: a versioned binary format holding the token history, the KV cache, the
//! last logits and, optionally, a sampler's configuration and random state.
//!
//! Layout (little-endian): magic `LLSS`, format version (u32), model fingerprint (u64), the
//! LoRA adapters applied (version 2: count, then fingerprint, scale and path of each), then
//! the session and cache fields, then an FNV-1a checksum (u64) of everything before it.
//! Version 3 records the key and value storage types separately and the cache as stored (f32,
//! f16 or blocks, bit for bit); versions 1 and 2 (one type, the cache as f32 values) are read
//! too.
//! Restoring checks magic, version, fingerprint, every length and the checksum before building
//! anything, so another model's snapshot or a corrupted blob is an error, never garbage.

use candle_core::{Device, Tensor};

use super::{KvCacheType, Session, SessionOptions};
use crate::error::{Error, Result};
use crate::model::Model;
use crate::sampler::{Rng, Sampler, SamplerConfig};

const MAGIC: &[u8; 4] = b"LLSS";
/// Version of the snapshot format written by this library.
pub const STATE_FORMAT_VERSION: u32 = 3;

fn fnv(bytes: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

struct W(Vec<u8>);
impl W {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn f32(&mut self, v: f32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn f32s(&mut self, v: &[f32]) {
        self.u64(v.len() as u64);
        for &x in v {
            self.f32(x);
        }
    }
}

struct R<'a> {
    b: &'a [u8],
    pos: usize,
}
impl<'a> R<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or_else(|| Error::State("snapshot is truncated".into()))?;
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().unwrap_or_default(),
        ))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().unwrap_or_default(),
        ))
    }
    fn f32(&mut self) -> Result<f32> {
        Ok(f32::from_le_bytes(
            self.take(4)?.try_into().unwrap_or_default(),
        ))
    }
    fn len(&mut self, elem: usize) -> Result<usize> {
        let n = self.u64()?;
        usize::try_from(n)
            .ok()
            .filter(|&n| {
                n.checked_mul(elem)
                    .is_some_and(|b| b <= self.b.len() - self.pos)
            })
            .ok_or_else(|| Error::State(format!("length {n} exceeds the snapshot")))
    }
    fn f32s(&mut self) -> Result<Vec<f32>> {
        let n = self.len(4)?;
        (0..n).map(|_| self.f32()).collect()
    }
}

impl Session {
    /// Serializes the session (and, if given, a sampler's configuration and random state).
    pub fn save_state(&self, sampler: Option<&Sampler>) -> Result<Vec<u8>> {
        self.save_state_version(sampler, STATE_FORMAT_VERSION)
    }

    /// The snapshot in format `version` (1 to [`STATE_FORMAT_VERSION`]; older ones exist for
    /// the tests of reading them: version 1 has no adapters, versions 1 and 2 one cache type
    /// and f32 values).
    #[doc(hidden)]
    pub fn save_state_version(&self, sampler: Option<&Sampler>, version: u32) -> Result<Vec<u8>> {
        if !(1..=STATE_FORMAT_VERSION).contains(&version) {
            return Err(Error::InvalidArgument(format!(
                "snapshot format version {version} does not exist"
            )));
        }
        let model = self.model();
        let c = model.config();
        let mut w = W(Vec::new());
        w.0.extend_from_slice(MAGIC);
        w.u32(version);
        w.u64(model.fingerprint());
        if version >= 2 {
            w.u32(self.adapters().len() as u32);
            for (a, s) in self.adapters() {
                w.u64(a.fingerprint());
                w.f32(*s);
                let p = a.path().to_string_lossy();
                w.u64(p.len() as u64);
                w.0.extend_from_slice(p.as_bytes());
            }
        }
        let o = self.options();
        w.u64(self.n_ctx() as u64);
        w.u64(o.n_batch as u64);
        w.u8(o.kv_type_k.code());
        if version >= 3 {
            w.u8(o.kv_type_v.code());
        }
        match o.context_shift {
            Some(k) => {
                w.u8(1);
                w.u64(k as u64)
            }
            None => {
                w.u8(0);
                w.u64(0)
            }
        }
        w.u64(self.tokens().len() as u64);
        for &t in self.tokens() {
            w.u32(t);
        }
        match self.logits() {
            Some(l) => {
                w.u8(1);
                w.f32s(l)
            }
            None => w.u8(0),
        }
        w.u32(c.num_hidden_layers as u32);
        w.u32(c.num_key_value_heads as u32);
        w.u32(c.head_dim as u32);
        if version >= 3 {
            let raw = self.cache.raw();
            w.u64(raw.len() as u64);
            w.0.extend_from_slice(&raw);
        } else {
            for (k, v) in self.cache.export()? {
                for t in [k, v] {
                    w.f32s(&t.flatten_all()?.to_vec1::<f32>()?);
                }
            }
        }
        match sampler {
            None => w.u8(0),
            Some(s) => {
                w.u8(1);
                let c = s.config();
                w.f32(c.temperature);
                w.u32(c.top_k as u32);
                w.f32(c.top_p);
                w.f32(c.min_p);
                w.f32(c.repeat_penalty);
                w.u32(c.repeat_last_n as u32);
                w.f32(c.frequency_penalty);
                w.f32(c.presence_penalty);
                w.u64(c.logit_bias.len() as u64);
                for &(id, b) in &c.logit_bias {
                    w.u32(id);
                    w.f32(b);
                }
                match c.seed {
                    Some(seed) => {
                        w.u8(1);
                        w.u64(seed)
                    }
                    None => {
                        w.u8(0);
                        w.u64(0)
                    }
                }
                for x in s.rng.state() {
                    w.u64(x);
                }
            }
        }
        let sum = fnv(&w.0);
        w.u64(sum);
        Ok(w.0)
    }

    /// Rebuilds a session saved by [`Session::save_state`] on `model`, with the sampler when one
    /// was saved, and the KV cache types the snapshot records. Fails on another model's
    /// snapshot, a newer format or corrupted bytes.
    pub fn restore(model: &Model, bytes: &[u8]) -> Result<(Session, Option<Sampler>)> {
        Self::restore_inner(model, bytes, None)
    }

    /// [`Session::restore`] into a cache of other types (`None` keeps the type the snapshot
    /// records): the stored keys and values are converted (read back to f32 in the model's
    /// basis, then stored as a session of the new types stores them). Converting to a block type
    /// rounds, so the restored session continues close to, not bit for bit like, the saved
    /// one; restoring into the recorded types is [`Session::restore`], bit for bit. A type the
    /// model cannot use (a block type with a head size that is not a multiple of 32) is an
    /// [`Error::InvalidArgument`].
    pub fn restore_as(
        model: &Model,
        bytes: &[u8],
        kv_type_k: Option<KvCacheType>,
        kv_type_v: Option<KvCacheType>,
    ) -> Result<(Session, Option<Sampler>)> {
        Self::restore_inner(model, bytes, Some((kv_type_k, kv_type_v)))
    }

    fn restore_inner(
        model: &Model,
        bytes: &[u8],
        convert_to: Option<(Option<KvCacheType>, Option<KvCacheType>)>,
    ) -> Result<(Session, Option<Sampler>)> {
        if bytes.len() < 24 || &bytes[..4] != MAGIC {
            return Err(Error::State("not a session snapshot (bad magic)".into()));
        }
        let (body, tail) = bytes.split_at(bytes.len() - 8);
        let sum = u64::from_le_bytes(tail.try_into().unwrap_or_default());
        let mut r = R { b: body, pos: 4 };
        let version = r.u32()?;
        if !(1..=STATE_FORMAT_VERSION).contains(&version) {
            return Err(Error::State(format!(
                "snapshot format version {version} is not supported (this library reads {STATE_FORMAT_VERSION})"
            )));
        }
        if fnv(body) != sum {
            return Err(Error::State(
                "snapshot checksum mismatch (corrupted data)".into(),
            ));
        }
        if r.u64()? != model.fingerprint() {
            return Err(Error::State(
                "snapshot was saved from a different model".into(),
            ));
        }
        let mut adapters = vec![];
        if version >= 2 {
            let n = r.u32()? as usize;
            for _ in 0..n {
                let fp = r.u64()?;
                let scale = r.f32()?;
                let len = r.len(1)?;
                let path = String::from_utf8_lossy(r.take(len)?).into_owned();
                let a = model.find_adapter(fp).ok_or_else(|| {
                    Error::State(format!(
                        "the snapshot was taken with LoRA adapter {path} (fingerprint {fp:016x}), which is not loaded for this model: load it first"
                    ))
                })?;
                adapters.push((a, scale));
            }
        }
        let c = model.config();
        let n_ctx = r.u64()? as usize;
        let n_batch = r.u64()? as usize;
        let mut kv_type = || -> Result<KvCacheType> {
            let x = r.u8()?;
            KvCacheType::from_code(x).ok_or_else(|| Error::State(format!("unknown KV type {x}")))
        };
        let kv_type_k = kv_type()?;
        let kv_type_v = if version >= 3 { kv_type()? } else { kv_type_k };
        let shift_flag = r.u8()?;
        let shift_n = r.u64()? as usize;
        let n_tokens = r.len(4)?;
        let tokens: Vec<u32> = (0..n_tokens).map(|_| r.u32()).collect::<Result<_>>()?;
        if n_tokens > n_ctx {
            return Err(Error::State("more tokens than the context holds".into()));
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
            return Err(Error::State(format!("token {bad} outside the vocabulary")));
        }
        let logits = match r.u8()? {
            0 => None,
            _ => {
                let l = r.f32s()?;
                if l.len() != c.vocab_size {
                    return Err(Error::State("logits have the wrong size".into()));
                }
                Some(l)
            }
        };
        let (nl, nkv, hd) = (r.u32()? as usize, r.u32()? as usize, r.u32()? as usize);
        if (nl, nkv, hd) != (c.num_hidden_layers, c.num_key_value_heads, c.head_dim) {
            return Err(Error::State(
                "KV cache dimensions do not match the model".into(),
            ));
        }
        let want = nkv * n_tokens * hd;
        // Version 3: the cache as stored; before: every layer's keys and values as f32.
        enum Cache<'b> {
            Raw(&'b [u8]),
            Values(Vec<(Tensor, Tensor)>),
        }
        let cache = if version >= 3 {
            let n = r.len(1)?;
            Cache::Raw(r.take(n)?)
        } else {
            let mut kv = Vec::with_capacity(nl);
            for _ in 0..nl {
                let k = r.f32s()?;
                let v = r.f32s()?;
                if k.len() != want || v.len() != want {
                    return Err(Error::State("KV cache has the wrong size".into()));
                }
                kv.push((
                    Tensor::from_vec(k, (1, nkv, n_tokens, hd), &Device::Cpu)?,
                    Tensor::from_vec(v, (1, nkv, n_tokens, hd), &Device::Cpu)?,
                ));
            }
            Cache::Values(kv)
        };
        let sampler = match r.u8()? {
            0 => None,
            _ => {
                let mut cfg = SamplerConfig {
                    temperature: r.f32()?,
                    top_k: r.u32()? as i32,
                    top_p: r.f32()?,
                    min_p: r.f32()?,
                    repeat_penalty: r.f32()?,
                    repeat_last_n: r.u32()? as i32,
                    frequency_penalty: r.f32()?,
                    presence_penalty: r.f32()?,
                    ..SamplerConfig::default()
                };
                let n = r.len(8)?;
                cfg.logit_bias = (0..n)
                    .map(|_| Ok((r.u32()?, r.f32()?)))
                    .collect::<Result<_>>()?;
                let has_seed = r.u8()?;
                let seed = r.u64()?;
                cfg.seed = (has_seed == 1).then_some(seed);
                let mut s = Sampler::new(cfg).map_err(|e| Error::State(format!("sampler: {e}")))?;
                s.rng = Rng::from_state([r.u64()?, r.u64()?, r.u64()?, r.u64()?]);
                Some(s)
            }
        };
        if r.pos != body.len() {
            return Err(Error::State("trailing bytes in snapshot".into()));
        }
        let mut opts = SessionOptions::default()
            .n_ctx(n_ctx)
            .n_batch(n_batch.max(1))
            .kv_type_k(kv_type_k)
            .kv_type_v(kv_type_v);
        opts.context_shift = (shift_flag == 1).then_some(shift_n);
        // Another type: the target session is made first, so that a type the model cannot use
        // fails before any work.
        let target = match convert_to {
            Some((k, v)) => {
                let (k, v) = (k.unwrap_or(kv_type_k), v.unwrap_or(kv_type_v));
                let other = (k, v) != (kv_type_k, kv_type_v);
                other
                    .then(|| model.session(opts.clone().kv_type_k(k).kv_type_v(v)))
                    .transpose()?
            }
            None => None,
        };
        let mut s = model.session(opts)?;
        s.set_adapters(&adapters)
            .map_err(|e| Error::State(format!("adapters: {e}")))?;
        match cache {
            Cache::Raw(bytes) => s.kv_load_raw(tokens, bytes, logits)?,
            Cache::Values(kv) => s.kv_import(tokens, kv, logits)?,
        }
        if let Some(mut t) = target {
            t.set_adapters(&adapters)
                .map_err(|e| Error::State(format!("adapters: {e}")))?;
            let kv = s.cache.export()?;
            t.kv_import(std::mem::take(&mut s.tokens), kv, s.logits.take())?;
            s = t;
        }
        Ok((s, sampler))
    }
}
