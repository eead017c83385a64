//! Per-sequence key/value cache, grown in chunks (never concatenated per token).

use candle_core::{DType, Device, Tensor};

use crate::error::Result;

/// Positions added at a time when the cache grows.
const GROW_CHUNK: usize = 256;

/// Keys and values of every layer for one sequence: `(1, n_kv_heads, capacity, head_dim)`,
/// stored as f16 (values rounded on the way in, as llama.cpp's default cache) or f32.
#[derive(Debug, Clone)]
pub(crate) struct KvCache {
    dtype: DType,
    k: Vec<Option<Tensor>>,
    v: Vec<Option<Tensor>>,
    len: usize,
    capacity: usize,
    max: usize,
    n_kv_heads: usize,
    head_dim: usize,
}

impl KvCache {
    pub(crate) fn new(
        n_layers: usize,
        n_kv_heads: usize,
        head_dim: usize,
        max: usize,
        dtype: DType,
    ) -> Self {
        KvCache {
            dtype,
            k: vec![None; n_layers],
            v: vec![None; n_layers],
            len: 0,
            capacity: 0,
            max,
            n_kv_heads,
            head_dim,
        }
    }

    /// The storage type.
    pub(crate) fn dtype(&self) -> DType {
        self.dtype
    }

    /// Tokens stored.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Maximum tokens.
    pub(crate) fn max(&self) -> usize {
        self.max
    }

    /// Makes room for `extra` more positions (all layers), growing by whole chunks.
    pub(crate) fn reserve(&mut self, extra: usize, dev: &Device) -> Result<()> {
        let needed = self.len + extra;
        if needed <= self.capacity {
            return Ok(());
        }
        // Whole chunks, no doubling: memory follows the context actually used (a copy per
        // chunk is cheap next to the forward passes that fill it).
        let new_cap = needed
            .div_ceil(GROW_CHUNK)
            .saturating_mul(GROW_CHUNK)
            .min(self.max)
            .max(needed);
        for slot in self.k.iter_mut().chain(self.v.iter_mut()) {
            let fresh = Tensor::zeros(
                (1, self.n_kv_heads, new_cap, self.head_dim),
                self.dtype,
                dev,
            )?;
            if let Some(old) = slot.as_ref() {
                if self.len > 0 {
                    fresh.slice_set(&old.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
                }
            }
            *slot = Some(fresh);
        }
        self.capacity = new_cap;
        Ok(())
    }

    /// Writes `k`, `v` (each `(1, n_kv, t, d)`, any float type: converted to the cache's) for
    /// `layer` at the current length and returns views of all keys and values so far, in the
    /// cache's type. Call [`KvCache::advance`] after the last layer.
    pub(crate) fn append(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let t = k.dim(2)?;
        let total = self.len + t;
        let (kc, vc) = match (&self.k[layer], &self.v[layer]) {
            (Some(kc), Some(vc)) => (kc, vc),
            _ => return Err(candle_core::Error::Msg("kv cache not reserved".into()).into()),
        };
        kc.slice_set(&k.to_dtype(self.dtype)?.contiguous()?, 2, self.len)?;
        vc.slice_set(&v.to_dtype(self.dtype)?.contiguous()?, 2, self.len)?;
        Ok((kc.narrow(2, 0, total)?, vc.narrow(2, 0, total)?))
    }

    pub(crate) fn advance(&mut self, t: usize) {
        self.len += t;
    }

    /// Forgets everything from position `n` on.
    pub(crate) fn truncate(&mut self, n: usize) {
        self.len = self.len.min(n);
    }

    /// Copies of the stored keys and values as f32, `(layers, [k, v])`, each `(1, n_kv, len, d)`.
    pub(crate) fn export(&self) -> Result<Vec<(Tensor, Tensor)>> {
        let mut out = Vec::with_capacity(self.k.len());
        for (k, v) in self.k.iter().zip(&self.v) {
            match (k, v) {
                (Some(k), Some(v)) if self.len > 0 => out.push((
                    k.narrow(2, 0, self.len)?
                        .to_dtype(DType::F32)?
                        .contiguous()?,
                    v.narrow(2, 0, self.len)?
                        .to_dtype(DType::F32)?
                        .contiguous()?,
                )),
                _ => {
                    let e = Tensor::zeros(
                        (1, self.n_kv_heads, 0, self.head_dim),
                        DType::F32,
                        &Device::Cpu,
                    )?;
                    out.push((e.clone(), e))
                }
            }
        }
        Ok(out)
    }

    /// A deep copy (for fork): the copy grows independently.
    pub(crate) fn deep_clone(&self) -> Result<Self> {
        let mut c = KvCache::new(
            self.k.len(),
            self.n_kv_heads,
            self.head_dim,
            self.max,
            self.dtype,
        );
        if self.len > 0 {
            let dev = match &self.k[0] {
                Some(t) => t.device().clone(),
                None => Device::Cpu,
            };
            c.reserve(self.len, &dev)?;
            for (l, (k, v)) in self.export()?.into_iter().enumerate() {
                c.append(l, &k, &v)?;
            }
            c.advance(self.len);
        }
        Ok(c)
    }
}
