//! Per-sequence key/value cache, grown in chunks (never concatenated per token), stored as f32,
//! f16 or llama.cpp's q8_0 / q4_0 blocks, the type chosen separately for keys and values.
//!
//! Each layer keeps its keys and values as `(kv_heads, capacity, head_dim)` rows of the type's
//! storage (a quantized row is `head_dim / 32` blocks). A quantized plane holds its rows rotated
//! by an orthonormal Hadamard transform per head (as llama.cpp does by default since its PR
//! 21038): the rotation spreads an outlier of a row over the whole block so that the block's one
//! scale loses less; attention rotates the queries the same way for the keys (dot products are
//! unchanged by it) and rotates its output back for the values.

use candle_core::{DType, Device, Tensor};
use half::f16;

use crate::error::{Error, Result};
use crate::session::KvCacheType;

/// Positions added at a time when the cache grows.
const GROW_CHUNK: usize = 256;

/// Values per quantized block (q8_0 and q4_0).
pub(crate) const QB: usize = 32;

/// llama.cpp's `block_q8_0`: a scale and 32 signed 8-bit values (34 bytes).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
#[repr(C)]
pub(crate) struct Q8Block {
    pub d: f16,
    pub qs: [i8; QB],
}

/// llama.cpp's `block_q4_0`: a scale and 32 4-bit values, byte `j` holding value `j` in its
/// low nibble and value `j + 16` in its high nibble (18 bytes).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
#[repr(C)]
pub(crate) struct Q4Block {
    pub d: f16,
    pub qs: [u8; QB / 2],
}

impl Q8Block {
    /// llama.cpp's x86 `quantize_row_q8_0` (its CPU `from_float`, which writes its KV cache):
    /// `d = amax / 127` stored as f16, values `x * (127 / amax)` rounded to nearest even.
    pub(crate) fn quantize(x: &[f32]) -> Q8Block {
        let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        let mut b = Q8Block {
            d: f16::from_f32(amax / 127.0),
            qs: [0; QB],
        };
        for (q, v) in b.qs.iter_mut().zip(x) {
            *q = (v * id).round_ties_even() as i8;
        }
        b
    }
    pub(crate) fn dequantize(&self, out: &mut [f32]) {
        let d = self.d.to_f32();
        for (o, &q) in out.iter_mut().zip(&self.qs) {
            *o = q as f32 * d;
        }
    }
}

impl Q4Block {
    /// llama.cpp's `quantize_row_q4_0` (reference and CPU alike): the value of largest
    /// magnitude maps to -8, `d = max / -8`, values `min(15, trunc(x / d + 8.5))`.
    pub(crate) fn quantize(x: &[f32]) -> Q4Block {
        let (mut amax, mut max) = (0f32, 0f32);
        for &v in x {
            if amax < v.abs() {
                amax = v.abs();
                max = v;
            }
        }
        let d = max / -8.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut b = Q4Block {
            d: f16::from_f32(d),
            qs: [0; QB / 2],
        };
        let q = |v: f32| ((v * id + 8.5) as i8).min(15) as u8;
        for j in 0..QB / 2 {
            b.qs[j] = q(x[j]) | (q(x[j + QB / 2]) << 4);
        }
        b
    }
    pub(crate) fn dequantize(&self, out: &mut [f32]) {
        let d = self.d.to_f32();
        for j in 0..QB / 2 {
            out[j] = ((self.qs[j] & 15) as i32 - 8) as f32 * d;
            out[j + QB / 2] = ((self.qs[j] >> 4) as i32 - 8) as f32 * d;
        }
    }
}

/// The Hadamard block size for a rotated row of `head_dim` values, as llama.cpp picks it: for
/// keys the largest power of two that divides the head size, for values 64; `None` when the
/// head size is not a multiple of 64 (no rotation).
pub(crate) fn rotation_block(head_dim: usize, keys: bool) -> Option<usize> {
    if head_dim == 0 || !head_dim.is_multiple_of(64) {
        return None;
    }
    Some(if keys {
        1 << head_dim.trailing_zeros()
    } else {
        64
    })
}

/// Multiplies each `n`-block of `x` by the orthonormal Sylvester Hadamard matrix (entries
/// `±1/sqrt(n)`; it is its own inverse): a fast Walsh-Hadamard transform.
pub(crate) fn hadamard(x: &mut [f32], n: usize) {
    debug_assert!(n.is_power_of_two() && x.len().is_multiple_of(n));
    let scale = 1.0 / (n as f32).sqrt();
    for blk in x.chunks_exact_mut(n) {
        let mut len = 1;
        while len < n {
            for i in (0..n).step_by(2 * len) {
                for j in i..i + len {
                    let (a, b) = (blk[j], blk[j + len]);
                    blk[j] = a + b;
                    blk[j + len] = a - b;
                }
            }
            len *= 2;
        }
        for v in blk.iter_mut() {
            *v *= scale;
        }
    }
}

/// One layer's keys or values: `(kv_heads, capacity, head_dim)` rows.
#[derive(Debug, Clone)]
pub(crate) enum Plane {
    F32(Vec<f32>),
    F16(Vec<f16>),
    Q8(Vec<Q8Block>),
    Q4(Vec<Q4Block>),
}

/// Rows of a plane as stored, from some row on (the attention kernels' input): for the block
/// types, a row is `head_dim / 32` blocks.
#[derive(Clone, Copy)]
pub(crate) enum KvRows<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    Q8(&'a [Q8Block]),
    Q4(&'a [Q4Block]),
}

impl<'a> KvRows<'a> {
    /// The rows from row `r` on (rows of `d` values).
    pub(crate) fn skip_rows(self, r: usize, d: usize) -> KvRows<'a> {
        match self {
            KvRows::F32(v) => KvRows::F32(&v[r * d..]),
            KvRows::F16(v) => KvRows::F16(&v[r * d..]),
            KvRows::Q8(v) => KvRows::Q8(&v[r * d / QB..]),
            KvRows::Q4(v) => KvRows::Q4(&v[r * d / QB..]),
        }
    }

    /// Whether the rows are blocks (dequantized into f32 before use).
    pub(crate) fn quantized(self) -> bool {
        matches!(self, KvRows::Q8(_) | KvRows::Q4(_))
    }

    /// Rows `j0..j0 + out.len() / d` as f32 (exact: a block value is its scale times a small
    /// integer, which f32 holds exactly).
    pub(crate) fn dequantize(self, j0: usize, d: usize, out: &mut [f32]) {
        let n = out.len() / d;
        match self {
            KvRows::F32(v) => out.copy_from_slice(&v[j0 * d..(j0 + n) * d]),
            KvRows::F16(v) => {
                for (o, x) in out.iter_mut().zip(&v[j0 * d..(j0 + n) * d]) {
                    *o = x.to_f32();
                }
            }
            KvRows::Q8(v) => {
                for (b, o) in v[j0 * d / QB..(j0 + n) * d / QB]
                    .iter()
                    .zip(out.chunks_exact_mut(QB))
                {
                    b.dequantize(o);
                }
            }
            KvRows::Q4(v) => {
                for (b, o) in v[j0 * d / QB..(j0 + n) * d / QB]
                    .iter()
                    .zip(out.chunks_exact_mut(QB))
                {
                    b.dequantize(o);
                }
            }
        }
    }
}

impl Plane {
    fn new(t: KvCacheType, values: usize) -> Plane {
        match t {
            KvCacheType::F32 => Plane::F32(vec![0.0; values]),
            KvCacheType::F16 => Plane::F16(vec![f16::ZERO; values]),
            KvCacheType::Q8_0 => Plane::Q8(vec![Q8Block::default(); values / QB]),
            KvCacheType::Q4_0 => Plane::Q4(vec![Q4Block::default(); values / QB]),
        }
    }

    fn rows(&self) -> KvRows<'_> {
        match self {
            Plane::F32(v) => KvRows::F32(v),
            Plane::F16(v) => KvRows::F16(v),
            Plane::Q8(v) => KvRows::Q8(v),
            Plane::Q4(v) => KvRows::Q4(v),
        }
    }

    /// Copies `n` rows of `d` values at `src_at` of `src` to `dst_at` of `self` (same type).
    fn copy_rows(&mut self, dst_at: usize, src: &Plane, src_at: usize, n: usize, d: usize) {
        fn cp<T: Copy>(dst: &mut [T], a: usize, src: &[T], b: usize, len: usize) {
            dst[a..a + len].copy_from_slice(&src[b..b + len]);
        }
        match (self, src) {
            (Plane::F32(a), Plane::F32(b)) => cp(a, dst_at * d, b, src_at * d, n * d),
            (Plane::F16(a), Plane::F16(b)) => cp(a, dst_at * d, b, src_at * d, n * d),
            (Plane::Q8(a), Plane::Q8(b)) => cp(a, dst_at * d / QB, b, src_at * d / QB, n * d / QB),
            (Plane::Q4(a), Plane::Q4(b)) => cp(a, dst_at * d / QB, b, src_at * d / QB, n * d / QB),
            _ => unreachable!("planes of one cache have one type"),
        }
    }

    /// Stores one row of `d` values at row `at`.
    fn store(&mut self, at: usize, x: &[f32]) {
        let d = x.len();
        match self {
            Plane::F32(v) => v[at * d..(at + 1) * d].copy_from_slice(x),
            Plane::F16(v) => {
                for (o, &x) in v[at * d..(at + 1) * d].iter_mut().zip(x) {
                    *o = f16::from_f32(x);
                }
            }
            Plane::Q8(v) => {
                for (o, x) in v[at * d / QB..(at + 1) * d / QB]
                    .iter_mut()
                    .zip(x.chunks_exact(QB))
                {
                    *o = Q8Block::quantize(x);
                }
            }
            Plane::Q4(v) => {
                for (o, x) in v[at * d / QB..(at + 1) * d / QB]
                    .iter_mut()
                    .zip(x.chunks_exact(QB))
                {
                    *o = Q4Block::quantize(x);
                }
            }
        }
    }

    /// Bytes of a row of `d` values stored as `t` (as in memory and in snapshots).
    fn row_bytes(t: KvCacheType, d: usize) -> usize {
        match t {
            KvCacheType::F32 => d * 4,
            KvCacheType::F16 => d * 2,
            KvCacheType::Q8_0 => d / QB * std::mem::size_of::<Q8Block>(),
            KvCacheType::Q4_0 => d / QB * std::mem::size_of::<Q4Block>(),
        }
    }
}

/// A layer's stored keys and values for attention: rows `0..len` of each KV head `h` start at
/// `k.skip_rows(h * capacity)`; `rot_k` / `rot_v` say the rows were rotated in blocks of that
/// size (the queries must be rotated alike, the output rotated back).
pub(crate) struct LayerView<'a> {
    pub k: KvRows<'a>,
    pub v: KvRows<'a>,
    pub capacity: usize,
    pub rot_k: Option<usize>,
    pub rot_v: Option<usize>,
}

/// Keys and values of every layer for one sequence.
#[derive(Debug, Clone)]
pub(crate) struct KvCache {
    k_type: KvCacheType,
    v_type: KvCacheType,
    k: Vec<Option<Plane>>,
    v: Vec<Option<Plane>>,
    len: usize,
    capacity: usize,
    max: usize,
    n_kv_heads: usize,
    head_dim: usize,
}

impl KvCache {
    /// An empty cache. A quantized type needs a head size that is a multiple of 32 (the
    /// blocks run along it, as in llama.cpp).
    pub(crate) fn new(
        n_layers: usize,
        n_kv_heads: usize,
        head_dim: usize,
        max: usize,
        k_type: KvCacheType,
        v_type: KvCacheType,
    ) -> Result<Self> {
        for t in [k_type, v_type] {
            if t.quantized() && !head_dim.is_multiple_of(QB) {
                return Err(Error::InvalidArgument(format!(
                    "a {} KV cache needs a head size that is a multiple of {QB}; this model's is {head_dim}",
                    t.as_str()
                )));
            }
        }
        Ok(KvCache {
            k_type,
            v_type,
            k: vec![None; n_layers],
            v: vec![None; n_layers],
            len: 0,
            capacity: 0,
            max,
            n_kv_heads,
            head_dim,
        })
    }

    /// Tokens stored.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Maximum tokens.
    pub(crate) fn max(&self) -> usize {
        self.max
    }

    /// Bytes held for stored and reserved positions (every layer, keys and values).
    pub(crate) fn bytes(&self) -> usize {
        self.bytes_for(self.capacity)
    }

    /// Bytes `n` positions cost (every layer, keys and values), in memory and in snapshots.
    pub(crate) fn bytes_for(&self, n: usize) -> usize {
        let d = self.head_dim;
        self.k.len()
            * self.n_kv_heads
            * n
            * (Plane::row_bytes(self.k_type, d) + Plane::row_bytes(self.v_type, d))
    }

    fn rot(&self) -> (Option<usize>, Option<usize>) {
        (
            self.k_type
                .quantized()
                .then(|| rotation_block(self.head_dim, true))
                .flatten(),
            self.v_type
                .quantized()
                .then(|| rotation_block(self.head_dim, false))
                .flatten(),
        )
    }

    /// Makes room for `extra` more positions (all layers), growing by whole chunks.
    pub(crate) fn reserve(&mut self, extra: usize, _dev: &Device) -> Result<()> {
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
        let (nkv, d, old_cap, len) = (self.n_kv_heads, self.head_dim, self.capacity, self.len);
        let values = nkv
            .checked_mul(new_cap)
            .and_then(|v| v.checked_mul(d))
            .ok_or_else(|| Error::InvalidArgument("KV cache size overflows".into()))?;
        for (slot, t) in self
            .k
            .iter_mut()
            .map(|s| (s, self.k_type))
            .chain(self.v.iter_mut().map(|s| (s, self.v_type)))
        {
            let mut fresh = Plane::new(t, values);
            if let Some(old) = slot.as_ref() {
                for h in 0..nkv {
                    fresh.copy_rows(h * new_cap, old, h * old_cap, len, d);
                }
            }
            *slot = Some(fresh);
        }
        self.capacity = new_cap;
        Ok(())
    }

    /// Writes `t` positions of keys and values for `layer` at the current length: position
    /// `i`'s keys are `k[i * stride..][..kv_heads * head_dim]`, its values likewise in `v` (the
    /// projections' rows read where they are); a quantized plane rotates its rows before storing
    /// them. Call [`KvCache::advance`] after the last layer.
    pub(crate) fn append_rows(
        &mut self,
        layer: usize,
        (k, v): (&[f32], &[f32]),
        stride: usize,
        t: usize,
    ) -> Result<()> {
        let (nkv, d) = (self.n_kv_heads, self.head_dim);
        let width = nkv * d;
        let fits = |x: &[f32]| t == 0 || (stride >= width && x.len() >= (t - 1) * stride + width);
        if !fits(k) || !fits(v) || self.len + t > self.capacity {
            return Err(Error::InvalidArgument(format!(
                "kv cache: {t} rows of {width} values do not fit (len {}, capacity {})",
                self.len, self.capacity
            )));
        }
        let (rot_k, rot_v) = self.rot();
        let (cap, len) = (self.capacity, self.len);
        let (Some(kp), Some(vp)) = (self.k[layer].as_mut(), self.v[layer].as_mut()) else {
            return Err(Error::InvalidArgument("kv cache not reserved".into()));
        };
        let mut row = vec![0f32; d];
        for (plane, src, rot) in [(kp, k, rot_k), (vp, v, rot_v)] {
            for i in 0..t {
                for h in 0..nkv {
                    let x = &src[i * stride + h * d..][..d];
                    match rot {
                        Some(n) => {
                            row.copy_from_slice(x);
                            hadamard(&mut row, n);
                            plane.store(h * cap + len + i, &row);
                        }
                        None => plane.store(h * cap + len + i, x),
                    }
                }
            }
        }
        Ok(())
    }

    /// The stored rows of `layer` for attention.
    pub(crate) fn view(&self, layer: usize) -> Result<LayerView<'_>> {
        let (Some(k), Some(v)) = (self.k[layer].as_ref(), self.v[layer].as_ref()) else {
            return Err(Error::InvalidArgument("kv cache not reserved".into()));
        };
        let (rot_k, rot_v) = self.rot();
        Ok(LayerView {
            k: k.rows(),
            v: v.rows(),
            capacity: self.capacity,
            rot_k,
            rot_v,
        })
    }

    /// Rows `0..n` of `layer` as f32 `(1, kv_heads, n, head_dim)` tensors in the model's basis
    /// (quantized planes dequantized and rotated back).
    fn tensors(&self, layer: usize, n: usize) -> Result<(Tensor, Tensor)> {
        let view = self.view(layer)?;
        let (nkv, d) = (self.n_kv_heads, self.head_dim);
        let mut out = Vec::with_capacity(2);
        for (rows, rot) in [(view.k, view.rot_k), (view.v, view.rot_v)] {
            let mut x = vec![0f32; nkv * n * d];
            for h in 0..nkv {
                rows.skip_rows(h * self.capacity, d).dequantize(
                    0,
                    d,
                    &mut x[h * n * d..(h + 1) * n * d],
                );
            }
            if let Some(b) = rot {
                hadamard(&mut x, b);
            }
            out.push(Tensor::from_vec(x, (1, nkv, n, d), &Device::Cpu)?);
        }
        let v = out.pop().expect("two planes");
        let k = out.pop().expect("two planes");
        Ok((k, v))
    }

    /// [`KvCache::append_rows`] from `(1, n_kv, t, d)` tensors of any float type, returning all
    /// keys and values so far as f32 tensors in the model's basis (the tensor-op reference
    /// pass reads these: an f16 cache gives its rounded values, a quantized one its dequantized
    /// values).
    pub(crate) fn append(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let t = k.dim(2)?;
        let rows = |x: &Tensor| -> Result<Vec<f32>> {
            Ok(x.to_dtype(DType::F32)?
                .transpose(1, 2)?
                .contiguous()?
                .flatten_all()?
                .to_vec1::<f32>()?)
        };
        let width = self.n_kv_heads * self.head_dim;
        self.append_rows(layer, (&rows(k)?, &rows(v)?), width, t)?;
        self.tensors(layer, self.len + t)
    }

    pub(crate) fn advance(&mut self, t: usize) {
        self.len += t;
    }

    /// Forgets everything from position `n` on.
    pub(crate) fn truncate(&mut self, n: usize) {
        self.len = self.len.min(n);
    }

    /// Copies of the stored keys and values as f32 in the model's basis, `(layers, [k, v])`,
    /// each `(1, n_kv, len, d)`.
    pub(crate) fn export(&self) -> Result<Vec<(Tensor, Tensor)>> {
        let mut out = Vec::with_capacity(self.k.len());
        for l in 0..self.k.len() {
            if self.len > 0 && self.k[l].is_some() {
                out.push(self.tensors(l, self.len)?);
            } else {
                let e = Tensor::zeros(
                    (1, self.n_kv_heads, 0, self.head_dim),
                    DType::F32,
                    &Device::Cpu,
                )?;
                out.push((e.clone(), e))
            }
        }
        Ok(out)
    }

    /// The stored rows `0..len` of every layer as raw bytes: per layer keys then values, each
    /// head's rows in order (the snapshot format; f16 and block scales little-endian).
    pub(crate) fn raw(&self) -> Vec<u8> {
        let (nkv, d, len, cap) = (self.n_kv_heads, self.head_dim, self.len, self.capacity);
        let mut out = Vec::with_capacity(self.bytes_for(len));
        for plane in self.k.iter().zip(&self.v).flat_map(|(k, v)| [k, v]) {
            let Some(p) = plane else { continue };
            for h in 0..nkv {
                let r = h * cap..h * cap + len;
                match p {
                    Plane::F32(v) => v[r.start * d..r.end * d]
                        .iter()
                        .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
                    Plane::F16(v) => v[r.start * d..r.end * d]
                        .iter()
                        .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
                    Plane::Q8(v) => v[r.start * d / QB..r.end * d / QB].iter().for_each(|b| {
                        out.extend_from_slice(&b.d.to_le_bytes());
                        out.extend(b.qs.iter().map(|&q| q as u8));
                    }),
                    Plane::Q4(v) => v[r.start * d / QB..r.end * d / QB].iter().for_each(|b| {
                        out.extend_from_slice(&b.d.to_le_bytes());
                        out.extend_from_slice(&b.qs);
                    }),
                }
            }
        }
        out
    }

    /// Replaces the contents with `n` positions read from [`KvCache::raw`]'s bytes (of a cache
    /// of the same types and shape; the caller checked the length).
    pub(crate) fn load_raw(&mut self, n: usize, bytes: &[u8]) -> Result<()> {
        if bytes.len() != self.bytes_for(n) {
            return Err(Error::State("KV cache has the wrong size".into()));
        }
        self.len = 0;
        self.reserve(n, &Device::Cpu)?;
        let (nkv, d, cap) = (self.n_kv_heads, self.head_dim, self.capacity);
        let mut at = 0;
        let mut take = |len: usize| {
            let s = &bytes[at..at + len];
            at += len;
            s
        };
        let layers = self.k.len();
        for l in 0..layers {
            for plane in [&mut self.k[l], &mut self.v[l]] {
                let Some(p) = plane.as_mut() else { continue };
                for h in 0..nkv {
                    let r = h * cap..h * cap + n;
                    match p {
                        Plane::F32(v) => {
                            for (o, b) in v[r.start * d..r.end * d]
                                .iter_mut()
                                .zip(take(n * d * 4).chunks_exact(4))
                            {
                                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                            }
                        }
                        Plane::F16(v) => {
                            for (o, b) in v[r.start * d..r.end * d]
                                .iter_mut()
                                .zip(take(n * d * 2).chunks_exact(2))
                            {
                                *o = f16::from_le_bytes([b[0], b[1]]);
                            }
                        }
                        Plane::Q8(v) => {
                            for (o, b) in v[r.start * d / QB..r.end * d / QB]
                                .iter_mut()
                                .zip(take(n * d / QB * 34).chunks_exact(34))
                            {
                                o.d = f16::from_le_bytes([b[0], b[1]]);
                                for (q, &x) in o.qs.iter_mut().zip(&b[2..]) {
                                    *q = x as i8;
                                }
                            }
                        }
                        Plane::Q4(v) => {
                            for (o, b) in v[r.start * d / QB..r.end * d / QB]
                                .iter_mut()
                                .zip(take(n * d / QB * 18).chunks_exact(18))
                            {
                                o.d = f16::from_le_bytes([b[0], b[1]]);
                                o.qs.copy_from_slice(&b[2..]);
                            }
                        }
                    }
                }
            }
        }
        self.len = n;
        Ok(())
    }

    /// A deep copy (for fork): the copy grows independently. Only the stored positions are
    /// copied (bit for bit, whatever the type).
    pub(crate) fn deep_clone(&self) -> Result<Self> {
        let mut c = KvCache::new(
            self.k.len(),
            self.n_kv_heads,
            self.head_dim,
            self.max,
            self.k_type,
            self.v_type,
        )?;
        if self.len > 0 {
            c.reserve(self.len, &Device::Cpu)?;
            let (nkv, d) = (self.n_kv_heads, self.head_dim);
            for (dst, src) in
                c.k.iter_mut()
                    .zip(&self.k)
                    .chain(c.v.iter_mut().zip(&self.v))
            {
                if let (Some(dst), Some(src)) = (dst.as_mut(), src.as_ref()) {
                    for h in 0..nkv {
                        dst.copy_rows(h * c.capacity, src, h * self.capacity, self.len, d);
                    }
                }
            }
            c.len = self.len;
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q8_and_q4_blocks_round_trip_within_their_step() {
        let x: Vec<f32> = (0..32)
            .map(|i| ((i * 37 % 19) as f32 - 9.0) * 0.173)
            .collect();
        let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        let mut y = [0f32; 32];
        Q8Block::quantize(&x).dequantize(&mut y);
        for (a, b) in x.iter().zip(&y) {
            assert!((a - b).abs() <= amax / 127.0 * 0.51, "{a} {b}");
        }
        Q4Block::quantize(&x).dequantize(&mut y);
        for (a, b) in x.iter().zip(&y) {
            // Half a step, or a whole one where the extreme of the other sign is clipped to 7.
            let step = amax / 8.0;
            let tol = if *a > 7.0 * step { 1.01 } else { 0.51 };
            assert!((a - b).abs() <= step * tol + 1e-6, "{a} {b}");
        }
        // Quantizing dequantized values gives the same blocks back.
        let q8 = Q8Block::quantize(&x);
        q8.dequantize(&mut y);
        assert_eq!(Q8Block::quantize(&y), q8);
        let q4 = Q4Block::quantize(&x);
        q4.dequantize(&mut y);
        assert_eq!(Q4Block::quantize(&y), q4);
        // All zeros.
        assert!(Q8Block::quantize(&[0.0; 32]).qs.iter().all(|&q| q == 0));
        Q4Block::quantize(&[0.0; 32]).dequantize(&mut y);
        assert!(y.iter().all(|&v| v == 0.0));
    }

    #[test]
    fn q4_packing_matches_llama_cpp() {
        // Value j in the low nibble of byte j, value j + 16 in its high nibble; the largest
        // magnitude maps to 0 (-8).
        let mut x = [0f32; 32];
        x[0] = -8.0;
        x[16] = 7.0;
        x[1] = 1.0;
        let b = Q4Block::quantize(&x);
        assert_eq!(b.d.to_f32(), 1.0);
        assert_eq!(b.qs[0], 15 << 4);
        assert_eq!(b.qs[1] & 15, 9);
        assert_eq!(b.qs[2], 8 | (8 << 4));
    }

    #[test]
    fn hadamard_is_orthonormal_and_its_own_inverse() {
        let x: Vec<f32> = (0..128).map(|i| (i as f32 * 0.37).sin()).collect();
        let mut y = x.clone();
        hadamard(&mut y, 64);
        let n0: f32 = x.iter().map(|v| v * v).sum();
        let n1: f32 = y.iter().map(|v| v * v).sum();
        assert!((n0 - n1).abs() < 1e-4 * n0);
        hadamard(&mut y, 64);
        for (a, b) in x.iter().zip(&y) {
            assert!((a - b).abs() < 1e-5);
        }
        assert_eq!(rotation_block(64, true), Some(64));
        assert_eq!(rotation_block(128, true), Some(128));
        assert_eq!(rotation_block(192, true), Some(64));
        assert_eq!(rotation_block(128, false), Some(64));
        assert_eq!(rotation_block(96, true), None);
    }

    #[test]
    fn every_type_grows_forks_and_round_trips_raw_bytes() {
        let (layers, nkv, d) = (2, 2, 64);
        for t in [
            KvCacheType::F32,
            KvCacheType::F16,
            KvCacheType::Q8_0,
            KvCacheType::Q4_0,
        ] {
            let mut c = KvCache::new(layers, nkv, d, 1000, t, KvCacheType::F16).unwrap();
            let mut all = vec![];
            for step in 0..3 {
                let n = [200, 100, 3][step];
                c.reserve(n, &Device::Cpu).unwrap();
                let k: Vec<f32> = (0..n * nkv * d)
                    .map(|i| ((i + step) as f32).sin())
                    .collect();
                for l in 0..layers {
                    c.append_rows(l, (&k, &k), nkv * d, n).unwrap();
                }
                c.advance(n);
                all.extend(k);
            }
            assert_eq!(c.len(), 303);
            let token_major = |x: &Tensor| -> Vec<f32> {
                x.transpose(1, 2)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap()
            };
            let (k, v) = &c.export().unwrap()[1];
            let (k, v) = (token_major(k), token_major(v));
            let tol = match t {
                KvCacheType::F32 => 1e-6,
                KvCacheType::F16 => 1e-3,
                KvCacheType::Q8_0 => 0.05,
                _ => 0.5,
            };
            for ((a, b), c) in all.iter().zip(&k).zip(&v) {
                assert!((a - b).abs() < tol, "{t:?}: {a} vs {b}");
                assert!((a - c).abs() < 1e-2, "{a} vs {c}");
            }
            let f = c.deep_clone().unwrap();
            assert_eq!(f.raw(), c.raw());
            let mut g = KvCache::new(layers, nkv, d, 1000, t, KvCacheType::F16).unwrap();
            g.load_raw(303, &c.raw()).unwrap();
            assert_eq!(g.raw(), c.raw());
            assert_eq!(c.raw().len(), c.bytes_for(303));
            assert!(g.load_raw(302, &c.raw()).is_err());
        }
        assert!(KvCache::new(1, 1, 48, 10, KvCacheType::Q8_0, KvCacheType::F16).is_err());
    }
}
