//! The forward pass: our kernels over row buffers allocated once per call, or candle's tensor
//! operations on [`crate::Kernel::Candle`]; and the output head.

use super::*;
use crate::lora::{self, Active, Target};

/// A product of `m` rows into an output buffer (one matrix of the batched pass).
type RowsProduct<'a> = dyn FnMut(&[f32], usize, &mut [f32]) -> Result<()> + 'a;

/// One sequence of [`Model::forward_batch`]: its new tokens, its cache and its adapters.
pub(crate) struct BatchSeq<'c, 'a> {
    pub(crate) tokens: &'a [u32],
    pub(crate) cache: &'c mut KvCache,
    pub(crate) lora: Active<'a>,
}

impl Model {
    /// Runs `tokens` at the cache's next positions and returns the final hidden states
    /// `(len, hidden)` after the output norm. The caller checks capacity and ids.
    pub(crate) fn forward_hidden(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        lora: Active<'_>,
        stop: &mut dyn FnMut() -> bool,
    ) -> Result<Tensor> {
        if crate::kernels::enabled() {
            return self.forward_rows(tokens, cache, lora, stop);
        }
        self.forward_tensors(tokens, cache, lora, stop)
    }

    /// [`Model::forward_hidden`] on our kernels over plain row-major buffers allocated once per
    /// call and reused by every layer (no per-op tensors, transposes or page faults).
    fn forward_rows(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        lora: Active<'_>,
        stop: &mut dyn FnMut() -> bool,
    ) -> Result<Tensor> {
        use crate::kernels::{add_in_place, input_f32, rms_norm_rows, swiglu_rows};
        let m = &*self.inner;
        let half_cache = cache.dtype() == DType::F16;
        let c = &m.config;
        let t = tokens.len();
        let start = cache.len();
        let (nh, nkv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let (hidden, ffn) = (c.hidden_size, c.intermediate_size);
        let (qw, kw) = (nh * hd, nkv * hd);
        let dev = &m.device;
        cache.reserve(t, dev)?;
        let mut x: Vec<f32> = m.embed.rows(tokens)?.flatten_all()?.to_vec1()?;
        let (cos, sin) = m.rope.tables(start, t);
        let mut hn = vec![0f32; t * hidden];
        // Q, K and V side by side in each row, then gate and up.
        let qkv_w = qw + 2 * kw;
        let (mut qkv, mut att) = (vec![0f32; t * qkv_w], vec![0f32; t * qw]);
        let (mut k, mut v) = (vec![0f32; t * kw], vec![0f32; t * kw]);
        let mut o = vec![0f32; t * hidden];
        let (mut gu, mut a) = (vec![0f32; t * 2 * ffn], vec![0f32; t * ffn]);
        let scale = (1.0 / (hd as f64).sqrt()) as f32;
        let eps = c.rms_norm_eps as f32;
        for (li, l) in m.layers.iter().enumerate() {
            // Asked to stop (a cancel, Ctrl-C in Python): the cache keeps its length, so the
            // caller's session is as before this call.
            if stop() {
                return Err(Error::Cancelled);
            }
            rms_norm_rows(&x, &input_f32(&l.attn_norm)?, eps, &mut hn);
            let qkv_parts = [
                (Target::Q, 0, qw),
                (Target::K, qw, kw),
                (Target::V, qw + kw, kw),
            ];
            lora::matmul_and_update(lora, li, &qkv_parts, &hn, t, &mut qkv, qkv_w, |out| {
                l.qkv.matmul_into(&hn, t, out)
            })?;
            m.rope.apply(&mut qkv, t, nh, qkv_w, (&cos, &sin));
            m.rope.apply(&mut qkv[qw..], t, nkv, qkv_w, (&cos, &sin));
            for (row, (kr, vr)) in qkv
                .chunks_exact(qkv_w)
                .zip(k.chunks_exact_mut(kw).zip(v.chunks_exact_mut(kw)))
            {
                kr.copy_from_slice(&row[qw..qw + kw]);
                vr.copy_from_slice(&row[qw + kw..]);
            }
            // An f16 cache rounds keys and values as it stores them.
            let kt = Tensor::from_slice(&k, (1, t, nkv, hd), dev)?.transpose(1, 2)?;
            let vt = Tensor::from_slice(&v, (1, t, nkv, hd), dev)?.transpose(1, 2)?;
            let (k_all, v_all) = cache.append(li, &kt, &vt)?;
            let queries = crate::attention::Queries {
                data: &qkv,
                heads: nh,
                rows: t,
                head_dim: hd,
                head_stride: hd,
                row_stride: qkv_w,
            };
            crate::attention::causal_into(
                &queries, &k_all, &v_all, start, scale, half_cache, &mut att,
            )?;
            let o_part = [(Target::O, 0, hidden)];
            lora::matmul_and_update(lora, li, &o_part, &att, t, &mut o, hidden, |out| {
                matrix::matmul_into(&*l.o, &att, t, out)
            })?;
            add_in_place(&mut x, &o);
            rms_norm_rows(&x, &input_f32(&l.ffn_norm)?, eps, &mut hn);
            let gu_parts = [(Target::Gate, 0, ffn), (Target::Up, ffn, ffn)];
            lora::matmul_and_update(lora, li, &gu_parts, &hn, t, &mut gu, 2 * ffn, |out| {
                l.gate_up.matmul_into(&hn, t, out)
            })?;
            swiglu_rows(&gu, ffn, &mut a);
            let down_part = [(Target::Down, 0, hidden)];
            lora::matmul_and_update(lora, li, &down_part, &a, t, &mut o, hidden, |out| {
                matrix::matmul_into(&*l.down, &a, t, out)
            })?;
            add_in_place(&mut x, &o);
        }
        cache.advance(t);
        rms_norm_rows(&x, &input_f32(&m.norm)?, eps, &mut hn);
        Ok(Tensor::from_vec(hn, (t, hidden), dev)?)
    }

    /// Several sequences in one forward pass on our kernels: every sequence's rows go through
    /// each weight matrix together (one pass over the weights for all of them), while RoPE,
    /// the KV cache, attention and LoRA updates stay per sequence. Each row's result is what
    /// the sequence's own [`Model::forward_hidden`] gives it (the kernels compute every row
    /// alike whatever the rows around it). Returns each sequence's last row after the output
    /// norm. The caller checks capacity and ids.
    pub(crate) fn forward_batch(&self, seqs: &mut [BatchSeq<'_, '_>]) -> Result<Vec<Vec<f32>>> {
        use crate::kernels::{add_in_place, input_f32, rms_norm_rows, swiglu_rows};
        let m = &*self.inner;
        let c = &m.config;
        let (nh, nkv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let (hidden, ffn) = (c.hidden_size, c.intermediate_size);
        let (qw, kw) = (nh * hd, nkv * hd);
        let dev = &m.device;
        // Row offsets of each sequence.
        let mut offs = Vec::with_capacity(seqs.len() + 1);
        offs.push(0usize);
        for s in seqs.iter() {
            offs.push(offs.last().copied().unwrap_or(0) + s.tokens.len());
        }
        let t = *offs.last().unwrap_or(&0);
        let starts: Vec<usize> = seqs.iter().map(|s| s.cache.len()).collect();
        for s in seqs.iter_mut() {
            s.cache.reserve(s.tokens.len(), dev)?;
        }
        let all: Vec<u32> = seqs.iter().flat_map(|s| s.tokens.iter().copied()).collect();
        let mut x: Vec<f32> = m.embed.rows(&all)?.flatten_all()?.to_vec1()?;
        let tables: Vec<(Vec<f32>, Vec<f32>)> = seqs
            .iter()
            .zip(&starts)
            .map(|(s, &st)| m.rope.tables(st, s.tokens.len()))
            .collect();
        let qkv_w = qw + 2 * kw;
        let mut hn = vec![0f32; t * hidden];
        let (mut qkv, mut att) = (vec![0f32; t * qkv_w], vec![0f32; t * qw]);
        let mut o = vec![0f32; t * hidden];
        let (mut gu, mut a) = (vec![0f32; t * 2 * ffn], vec![0f32; t * ffn]);
        let scale = (1.0 / (hd as f64).sqrt()) as f32;
        let eps = c.rms_norm_eps as f32;
        let qkv_parts = [
            (Target::Q, 0, qw),
            (Target::K, qw, kw),
            (Target::V, qw + kw, kw),
        ];
        let o_part = [(Target::O, 0, hidden)];
        let gu_parts = [(Target::Gate, 0, ffn), (Target::Up, ffn, ffn)];
        let down_part = [(Target::Down, 0, hidden)];
        // The LoRA update of each sequence's rows, after the shared base product.
        let update = |seqs: &[BatchSeq<'_, '_>],
                      li: usize,
                      parts: &[(Target, usize, usize)],
                      xs: &[f32],
                      xw: usize,
                      out: &mut [f32],
                      ow: usize|
         -> Result<()> {
            for (i, s) in seqs.iter().enumerate() {
                let (r0, r1) = (offs[i], offs[i + 1]);
                lora::update_rows(
                    s.lora,
                    li,
                    parts,
                    &xs[r0 * xw..r1 * xw],
                    r1 - r0,
                    &mut out[r0 * ow..r1 * ow],
                    ow,
                )?;
            }
            Ok(())
        };
        // One product over every sequence's rows where the matrix computes each row alike
        // whatever comes with it. Otherwise the one-token sequences (decode) share one product
        // computed as each row alone (`alone`), and each longer chunk gets its own product:
        // the same bits as alone either way.
        let singles: Vec<usize> = offs
            .windows(2)
            .filter(|w| w[1] - w[0] == 1)
            .map(|w| w[0])
            .collect();
        let shared = |invariant: bool,
                      xs: &[f32],
                      xw: usize,
                      out: &mut [f32],
                      ow: usize,
                      f: &mut RowsProduct<'_>,
                      alone: &mut RowsProduct<'_>|
         -> Result<()> {
            if invariant {
                return f(xs, t, out);
            }
            let together = singles.len() > 1;
            if together {
                let mut xb = Vec::with_capacity(singles.len() * xw);
                for &r in &singles {
                    xb.extend_from_slice(&xs[r * xw..(r + 1) * xw]);
                }
                let mut ob = vec![0f32; singles.len() * ow];
                alone(&xb, singles.len(), &mut ob)?;
                for (j, &r) in singles.iter().enumerate() {
                    out[r * ow..(r + 1) * ow].copy_from_slice(&ob[j * ow..(j + 1) * ow]);
                }
            }
            for w in offs.windows(2) {
                let (r0, r1) = (w[0], w[1]);
                if together && r1 - r0 == 1 {
                    continue;
                }
                f(&xs[r0 * xw..r1 * xw], r1 - r0, &mut out[r0 * ow..r1 * ow])?;
            }
            Ok(())
        };
        for (li, l) in m.layers.iter().enumerate() {
            rms_norm_rows(&x, &input_f32(&l.attn_norm)?, eps, &mut hn);
            shared(
                l.qkv.batch_invariant(),
                &hn,
                hidden,
                &mut qkv,
                qkv_w,
                &mut |x, r, o| l.qkv.matmul_into(x, r, o),
                &mut |x, r, o| l.qkv.matmul_into_as_alone(x, r, o),
            )?;
            update(seqs, li, &qkv_parts, &hn, hidden, &mut qkv, qkv_w)?;
            for (i, s) in seqs.iter_mut().enumerate() {
                let (r0, r1) = (offs[i], offs[i + 1]);
                let ti = r1 - r0;
                let rows = &mut qkv[r0 * qkv_w..r1 * qkv_w];
                let (cos, sin) = &tables[i];
                m.rope.apply(rows, ti, nh, qkv_w, (cos, sin));
                m.rope.apply(&mut rows[qw..], ti, nkv, qkv_w, (cos, sin));
                let (mut k, mut v) = (vec![0f32; ti * kw], vec![0f32; ti * kw]);
                for (row, (kr, vr)) in rows
                    .chunks_exact(qkv_w)
                    .zip(k.chunks_exact_mut(kw).zip(v.chunks_exact_mut(kw)))
                {
                    kr.copy_from_slice(&row[qw..qw + kw]);
                    vr.copy_from_slice(&row[qw + kw..]);
                }
                let kt = Tensor::from_slice(&k, (1, ti, nkv, hd), dev)?.transpose(1, 2)?;
                let vt = Tensor::from_slice(&v, (1, ti, nkv, hd), dev)?.transpose(1, 2)?;
                let (k_all, v_all) = s.cache.append(li, &kt, &vt)?;
                let queries = crate::attention::Queries {
                    data: rows,
                    heads: nh,
                    rows: ti,
                    head_dim: hd,
                    head_stride: hd,
                    row_stride: qkv_w,
                };
                let half_cache = s.cache.dtype() == DType::F16;
                crate::attention::causal_into(
                    &queries,
                    &k_all,
                    &v_all,
                    starts[i],
                    scale,
                    half_cache,
                    &mut att[r0 * qw..r1 * qw],
                )?;
            }
            shared(
                l.o.batch_invariant(),
                &att,
                qw,
                &mut o,
                hidden,
                &mut |x, r, out| matrix::matmul_into(&*l.o, x, r, out),
                &mut |x, r, out| matrix::matmul_into_as_alone(&*l.o, x, r, out),
            )?;
            update(seqs, li, &o_part, &att, qw, &mut o, hidden)?;
            add_in_place(&mut x, &o);
            rms_norm_rows(&x, &input_f32(&l.ffn_norm)?, eps, &mut hn);
            shared(
                l.gate_up.batch_invariant(),
                &hn,
                hidden,
                &mut gu,
                2 * ffn,
                &mut |x, r, o| l.gate_up.matmul_into(x, r, o),
                &mut |x, r, o| l.gate_up.matmul_into_as_alone(x, r, o),
            )?;
            update(seqs, li, &gu_parts, &hn, hidden, &mut gu, 2 * ffn)?;
            swiglu_rows(&gu, ffn, &mut a);
            shared(
                l.down.batch_invariant(),
                &a,
                ffn,
                &mut o,
                hidden,
                &mut |x, r, out| matrix::matmul_into(&*l.down, x, r, out),
                &mut |x, r, out| matrix::matmul_into_as_alone(&*l.down, x, r, out),
            )?;
            update(seqs, li, &down_part, &a, ffn, &mut o, hidden)?;
            add_in_place(&mut x, &o);
        }
        let norm = input_f32(&m.norm)?;
        let mut out = Vec::with_capacity(seqs.len());
        for (i, s) in seqs.iter_mut().enumerate() {
            s.cache.advance(s.tokens.len());
            let last = offs[i + 1] - 1;
            let mut h = vec![0f32; hidden];
            rms_norm_rows(&x[last * hidden..(last + 1) * hidden], &norm, eps, &mut h);
            out.push(h);
        }
        Ok(out)
    }

    /// [`Model::forward_hidden`] with candle's tensor ops (`Kernel::Candle`).
    fn forward_tensors(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        lora: Active<'_>,
        stop: &mut dyn FnMut() -> bool,
    ) -> Result<Tensor> {
        let m = &*self.inner;
        let c = &m.config;
        let t = tokens.len();
        let start = cache.len();
        let (nh, nkv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let group = nh / nkv;
        let dev = &m.device;
        cache.reserve(t, dev)?;
        let mut x = m.embed.rows(tokens)?.reshape((1, t, c.hidden_size))?;
        let (cos, sin) = m.rope.cos_sin(start, t, dev)?;
        let total = start + t;
        // The additive causal mask.
        let mask = if t > 1 {
            let mut v = vec![0f32; t * total];
            for i in 0..t {
                for j in (start + i + 1)..total {
                    v[i * total + j] = f32::NEG_INFINITY;
                }
            }
            Some(Tensor::from_vec(v, (t, total), dev)?)
        } else {
            None
        };
        let scale = 1.0 / (hd as f64).sqrt();
        let eps = c.rms_norm_eps as f32;
        for (li, l) in m.layers.iter().enumerate() {
            // Asked to stop (a cancel, Ctrl-C in Python): the cache keeps its length, so the
            // caller's session is as before this call.
            if stop() {
                return Err(Error::Cancelled);
            }
            let hn = candle_nn::ops::rms_norm(&x, &l.attn_norm, eps)?;
            let [q, k, v] = l.qkv.forward(&hn)?;
            let q = lora_tensor(lora, li, Target::Q, &hn, q)?;
            let k = lora_tensor(lora, li, Target::K, &hn, k)?;
            let v = lora_tensor(lora, li, Target::V, &hn, v)?;
            let q = q.reshape((1, t, nh, hd))?.transpose(1, 2)?.contiguous()?;
            let k = k.reshape((1, t, nkv, hd))?.transpose(1, 2)?.contiguous()?;
            let v = v.reshape((1, t, nkv, hd))?.transpose(1, 2)?.contiguous()?;
            let q = candle_nn::rotary_emb::rope(&q, &cos, &sin)?;
            let k = candle_nn::rotary_emb::rope(&k, &cos, &sin)?;
            // An f16 cache rounds keys and values as it stores them.
            let (k_all, v_all) = cache.append(li, &k, &v)?;
            let y = {
                // candle's tensor ops (for comparison: `Kernel::Candle`).
                let k_all = k_all.squeeze(0)?.to_dtype(DType::F32)?;
                let v_all = v_all.squeeze(0)?.to_dtype(DType::F32)?;
                // Each KV head serves `group` query heads: fold the group into the rows so keys
                // and values are read once per KV head, with no repeated copies.
                let q = q.reshape((nkv, group * t, hd))?;
                let att = (q.matmul(&k_all.t()?)? * scale)?;
                let att = match &mask {
                    Some(mk) => att
                        .reshape((nkv, group, t, total))?
                        .broadcast_add(mk)?
                        .reshape((nkv, group * t, total))?,
                    None => att,
                };
                let att = candle_nn::ops::softmax_last_dim(&att)?;
                att.matmul(&v_all.contiguous()?)?
                    .reshape((nh, t, hd))?
                    .transpose(0, 1)?
                    .reshape((1, t, nh * hd))?
            };
            let y = lora_tensor(lora, li, Target::O, &y, l.o.forward(&y)?)?;
            x = (x + y)?;
            let hn = candle_nn::ops::rms_norm(&x, &l.ffn_norm, eps)?;
            let [g, u] = l.gate_up.forward(&hn)?;
            let g = lora_tensor(lora, li, Target::Gate, &hn, g)?;
            let u = lora_tensor(lora, li, Target::Up, &hn, u)?;
            let a = (candle_nn::ops::silu(&g)? * u)?;
            let y = lora_tensor(lora, li, Target::Down, &a, l.down.forward(&a)?)?;
            x = (x + y)?;
        }
        cache.advance(t);
        let x = candle_nn::ops::rms_norm(&x, &m.norm, eps)?;
        Ok(x.squeeze(0)?)
    }

    /// Output-head logits `(rows, vocab)` for hidden states `(rows, hidden)`.
    pub(crate) fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let h = hidden.unsqueeze(0)?.contiguous()?;
        Ok(self
            .inner
            .lm_head
            .forward(&h)?
            .squeeze(0)?
            .to_dtype(DType::F32)?)
    }

    /// Whether the output head computes each row alike whatever rows come with it.
    pub(crate) fn head_batch_invariant(&self) -> bool {
        self.inner.lm_head.batch_invariant()
    }

    /// The logits of `m` rows of `hidden` (`[m, hidden_size]`), each exactly as
    /// [`Model::last_logits`] computes it for that row alone, in one product where the head has
    /// one; `None` where it has not.
    pub(crate) fn logits_as_alone(
        &self,
        hidden: &[f32],
        m: usize,
    ) -> Result<Option<Vec<Vec<f32>>>> {
        let head = &*self.inner.lm_head;
        let n = head.shape().0;
        let mut out = vec![0f32; m * n];
        let done = head.matmul_as_alone(
            hidden,
            m,
            crate::kernels::DstWriter::columns(&mut out, m, n, 0, n),
        )?;
        Ok(done.then(|| out.chunks_exact(n.max(1)).map(<[f32]>::to_vec).collect()))
    }

    /// Last-row logits as a vector.
    pub(crate) fn last_logits(&self, hidden: &Tensor) -> Result<Vec<f32>> {
        let n = hidden.dim(0)?;
        let last = hidden.narrow(0, n - 1, 1)?;
        Ok(self.logits(&last)?.squeeze(0)?.to_vec1::<f32>()?)
    }
}

/// `y` plus the active adapters' update of projection `t` for input `x` (candle's tensor path).
fn lora_tensor(lora: Active<'_>, li: usize, t: Target, x: &Tensor, y: Tensor) -> Result<Tensor> {
    if !lora::touches(lora, li, t) {
        return Ok(y);
    }
    let shape = y.shape().clone();
    let n = *shape.dims().last().unwrap_or(&0);
    let xs: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let mut ys: Vec<f32> = y.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let m = ys.len() / n.max(1);
    lora::add_delta(lora, li, t, &xs, m, &mut ys, (n, 0, n))?;
    Ok(Tensor::from_vec(ys, shape, x.device())?.to_dtype(y.dtype())?)
}
