//! The forward pass: one pass over the layer plan for any number of sequences (one sequence
//! is a batch of one) on our kernels, over row buffers allocated once per call; candle's tensor
//! operations on [`crate::Kernel::Candle`] (the reference the tests compare with); and the
//! output head.

use super::*;
use crate::lora::{self, Active, Target};
use crate::plan::{Attention, LayerPlan, Mlp};

/// One sequence of a forward pass: its new tokens, its cache and its adapters.
pub(crate) struct BatchSeq<'c, 'a> {
    pub(crate) tokens: &'a [u32],
    pub(crate) cache: &'c mut KvCache,
    pub(crate) lora: Active<'a>,
    /// Each row computed exactly as decoding its token alone computes it (speculative
    /// verification: several drafted positions of one sequence in one pass, each with the bits
    /// one-at-a-time decode gives it); every row's hidden state is returned.
    pub(crate) alone: bool,
}

/// Which final hidden states a pass returns for each sequence.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Keep {
    /// The last row (what generation needs).
    Last,
    /// Every row (embeddings, perplexity, a session's `eval`).
    All,
}

/// The rows of a pass: each sequence's first row in the stacked buffers, and the rows
/// computed as decoding alone computes them (one-token sequences, every row of a sequence
/// marked [`BatchSeq::alone`]).
struct Rows {
    offs: Vec<usize>,
    singles: Vec<usize>,
    /// Per sequence: whether its rows are among `singles`.
    single: Vec<bool>,
}

impl Rows {
    fn new(seqs: &[BatchSeq<'_, '_>]) -> Rows {
        let mut offs = Vec::with_capacity(seqs.len() + 1);
        offs.push(0usize);
        for s in seqs {
            offs.push(offs[offs.len() - 1] + s.tokens.len());
        }
        let single: Vec<bool> = seqs
            .iter()
            .map(|s| s.alone || s.tokens.len() == 1)
            .collect();
        let singles = offs
            .windows(2)
            .zip(&single)
            .filter(|(_, &one)| one)
            .flat_map(|(w, _)| w[0]..w[1])
            .collect();
        Rows {
            offs,
            singles,
            single,
        }
    }

    /// Rows in all.
    fn t(&self) -> usize {
        self.offs[self.offs.len() - 1]
    }

    /// Sequence `i`'s rows.
    fn of(&self, i: usize) -> std::ops::Range<usize> {
        self.offs[i]..self.offs[i + 1]
    }
}

/// The state of one pass: the residual stream and scratch buffers every layer reuses.
struct Pass {
    rows: Rows,
    /// Where each sequence's new rows start in its cache.
    starts: Vec<usize>,
    /// Each sequence's RoPE tables.
    tables: Vec<(Vec<f32>, Vec<f32>)>,
    x: Vec<f32>,
    hn: Vec<f32>,
    /// A projection group's outputs (Q, K, V side by side; gate and up).
    wide: Vec<f32>,
    /// The input of the next projection (attention's heads; the SwiGLU product).
    mid: Vec<f32>,
    /// A residual branch's output.
    branch: Vec<f32>,
}

/// `v` as `n` values (grown as needed; every value is overwritten by its user).
fn sized(v: &mut Vec<f32>, n: usize) -> &mut [f32] {
    if v.len() < n {
        v.resize(n, 0.0);
    }
    &mut v[..n]
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
        if !crate::kernels::enabled() {
            return self.forward_tensors(tokens, cache, lora, stop);
        }
        let t = tokens.len();
        let mut seqs = [BatchSeq {
            tokens,
            cache,
            lora,
            alone: false,
        }];
        let mut out = self.forward(&mut seqs, Keep::All, stop)?;
        let rows = out.pop().unwrap_or_default();
        Ok(Tensor::from_vec(
            rows,
            (t, self.inner.config.hidden_size),
            &self.inner.device,
        )?)
    }

    /// Several sequences in one forward pass: every sequence's rows go through each weight
    /// matrix together (one pass over the weights for all of them), while RoPE, the KV cache,
    /// attention and LoRA updates stay per sequence. Each row's result is what the sequence's
    /// own [`Model::forward_hidden`] gives it (for a sequence marked [`BatchSeq::alone`], what
    /// decoding each of its tokens one at a time gives it). Returns each sequence's last row
    /// after the output norm (every row of an `alone` sequence). The caller checks capacity
    /// and ids.
    pub(crate) fn forward_batch(&self, seqs: &mut [BatchSeq<'_, '_>]) -> Result<Vec<Vec<f32>>> {
        self.forward(seqs, Keep::Last, &mut || false)
    }

    /// The pass on our kernels: the embedding, each layer of the plan ([`Model::layer`]), the
    /// output norm of the rows `keep` asks for. The caches advance only when every layer ran
    /// (a `stop` between layers leaves them as they were).
    fn forward(
        &self,
        seqs: &mut [BatchSeq<'_, '_>],
        keep: Keep,
        stop: &mut dyn FnMut() -> bool,
    ) -> Result<Vec<Vec<f32>>> {
        use crate::kernels::{input_f32, rms_norm_rows};
        let m = &*self.inner;
        let hidden = m.plan.hidden;
        let dev = &m.device;
        let rows = Rows::new(seqs);
        let starts: Vec<usize> = seqs.iter().map(|s| s.cache.len()).collect();
        for s in seqs.iter_mut() {
            s.cache.reserve(s.tokens.len(), dev)?;
        }
        let all: Vec<u32> = seqs.iter().flat_map(|s| s.tokens.iter().copied()).collect();
        let tables = seqs
            .iter()
            .zip(&starts)
            .map(|(s, &st)| m.rope.tables(st, s.tokens.len()))
            .collect();
        let mut pass = Pass {
            rows,
            starts,
            tables,
            x: m.embed.rows(&all)?.flatten_all()?.to_vec1()?,
            hn: Vec::new(),
            wide: Vec::new(),
            mid: Vec::new(),
            branch: Vec::new(),
        };
        for (li, (lp, l)) in m.plan.layers.iter().zip(&m.layers).enumerate() {
            // Asked to stop (a cancel, Ctrl-C in Python): the caches keep their length, so the
            // caller's sessions are as before this call.
            if stop() {
                return Err(Error::Cancelled);
            }
            self.layer(li, lp, l, seqs, &mut pass)?;
        }
        let norm = input_f32(&m.norm)?;
        let eps = m.config.rms_norm_eps as f32;
        let mut out = Vec::with_capacity(seqs.len());
        for (i, s) in seqs.iter_mut().enumerate() {
            s.cache.advance(s.tokens.len());
            let r = pass.rows.of(i);
            let r = if keep == Keep::Last && !s.alone {
                r.end - 1..r.end
            } else {
                r
            };
            let mut h = vec![0f32; r.len() * hidden];
            rms_norm_rows(
                &pass.x[r.start * hidden..r.end * hidden],
                &norm,
                eps,
                &mut h,
            );
            out.push(h);
        }
        Ok(out)
    }

    /// One decoder layer of the plan over every sequence's rows: the attention kind, then the
    /// MLP kind, each a residual branch of a normed input. A new layer kind is a new arm here.
    fn layer(
        &self,
        li: usize,
        lp: &LayerPlan,
        l: &Layer,
        seqs: &mut [BatchSeq<'_, '_>],
        p: &mut Pass,
    ) -> Result<()> {
        use crate::kernels::{add_in_place, input_f32, rms_norm_rows, swiglu_rows};
        let t = p.rows.t();
        let (hidden, eps) = (lp.hidden, lp.eps);
        let mut stacks = l.stacks.iter();
        let mut next = || {
            stacks.next().ok_or_else(|| {
                Error::UnsupportedArchitecture("a layer's weights do not follow its plan".into())
            })
        };
        match &lp.attention {
            Attention::Causal {
                heads,
                kv_heads,
                head_dim,
                qkv,
                o,
            } => {
                let (nh, nkv, hd) = (*heads, *kv_heads, *head_dim);
                let (qw, kw) = (nh * hd, nkv * hd);
                let hn = sized(&mut p.hn, t * hidden);
                rms_norm_rows(&p.x, &input_f32(&l.attn_norm)?, eps, hn);
                let qkv_w = qkv.width();
                let rows = sized(&mut p.wide, t * qkv_w);
                project(&p.rows, seqs, li, next()?, &qkv.cols(), hn, rows)?;
                let att = sized(&mut p.mid, t * qw);
                let scale = (1.0 / (hd as f64).sqrt()) as f32;
                for (i, s) in seqs.iter_mut().enumerate() {
                    let r = p.rows.of(i);
                    let ti = r.len();
                    let rows = &mut rows[r.start * qkv_w..r.end * qkv_w];
                    let (cos, sin) = &p.tables[i];
                    self.inner.rope.apply(rows, ti, nh, qkv_w, (cos, sin));
                    self.inner
                        .rope
                        .apply(&mut rows[qw..], ti, nkv, qkv_w, (cos, sin));
                    // The cache rounds, quantizes (and rotates) keys and values as it stores
                    // them, reading them from the projections' rows.
                    s.cache
                        .append_rows(li, (&rows[qw..], &rows[qw + kw..]), qkv_w, ti)?;
                    let queries = crate::attention::Queries {
                        data: rows,
                        heads: nh,
                        rows: ti,
                        head_dim: hd,
                        head_stride: hd,
                        row_stride: qkv_w,
                    };
                    let view = s.cache.view(li)?;
                    let kv = crate::attention::Kv::of(&view, nkv, p.starts[i] + ti);
                    crate::attention::causal_into(
                        &queries,
                        &kv,
                        p.starts[i],
                        scale,
                        &mut att[r.start * qw..r.end * qw],
                    )?;
                }
                let out = sized(&mut p.branch, t * hidden);
                project(&p.rows, seqs, li, next()?, &o.cols(), att, out)?;
                add_in_place(&mut p.x, out);
            }
        }
        match &lp.mlp {
            Mlp::SwiGlu { ffn, gate_up, down } => {
                let hn = sized(&mut p.hn, t * hidden);
                rms_norm_rows(&p.x, &input_f32(&l.ffn_norm)?, eps, hn);
                let gu = sized(&mut p.wide, t * 2 * ffn);
                project(&p.rows, seqs, li, next()?, &gate_up.cols(), hn, gu)?;
                let a = sized(&mut p.mid, t * ffn);
                swiglu_rows(gu, *ffn, a);
                let out = sized(&mut p.branch, t * hidden);
                project(&p.rows, seqs, li, next()?, &down.cols(), a, out)?;
                add_in_place(&mut p.x, out);
            }
        }
        Ok(())
    }

    /// [`Model::forward_hidden`] with candle's tensor ops (`Kernel::Candle`): the reference
    /// pass over the same plan, one sequence at a time.
    fn forward_tensors(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        lora: Active<'_>,
        stop: &mut dyn FnMut() -> bool,
    ) -> Result<Tensor> {
        let m = &*self.inner;
        let t = tokens.len();
        let start = cache.len();
        let dev = &m.device;
        cache.reserve(t, dev)?;
        let mut x = m.embed.rows(tokens)?.reshape((1, t, m.plan.hidden))?;
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
        for (li, (lp, l)) in m.plan.layers.iter().zip(&m.layers).enumerate() {
            // Asked to stop (a cancel, Ctrl-C in Python): the cache keeps its length, so the
            // caller's session is as before this call.
            if stop() {
                return Err(Error::Cancelled);
            }
            let eps = lp.eps;
            let [qkv_w, o_w, gate_up_w, down_w] = l.stacks.as_slice() else {
                return Err(Error::UnsupportedArchitecture(
                    "a layer's weights do not follow its plan".into(),
                ));
            };
            match &lp.attention {
                Attention::Causal {
                    heads,
                    kv_heads,
                    head_dim,
                    ..
                } => {
                    let (nh, nkv, hd) = (*heads, *kv_heads, *head_dim);
                    let group = nh / nkv;
                    let scale = 1.0 / (hd as f64).sqrt();
                    let hn = candle_nn::ops::rms_norm(&x, &l.attn_norm, eps)?;
                    let [q, k, v] = qkv_w.forward(&hn)?;
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
                    let k_all = k_all.squeeze(0)?.to_dtype(DType::F32)?;
                    let v_all = v_all.squeeze(0)?.to_dtype(DType::F32)?;
                    // Each KV head serves `group` query heads: fold the group into the rows so
                    // keys and values are read once per KV head, with no repeated copies.
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
                    let y = att
                        .matmul(&v_all.contiguous()?)?
                        .reshape((nh, t, hd))?
                        .transpose(0, 1)?
                        .reshape((1, t, nh * hd))?;
                    let [o] = o_w.forward(&y)?;
                    x = (x + lora_tensor(lora, li, Target::O, &y, o)?)?;
                }
            }
            match &lp.mlp {
                Mlp::SwiGlu { .. } => {
                    let hn = candle_nn::ops::rms_norm(&x, &l.ffn_norm, eps)?;
                    let [g, u] = gate_up_w.forward(&hn)?;
                    let g = lora_tensor(lora, li, Target::Gate, &hn, g)?;
                    let u = lora_tensor(lora, li, Target::Up, &hn, u)?;
                    let a = (candle_nn::ops::silu(&g)? * u)?;
                    let [d] = down_w.forward(&a)?;
                    x = (x + lora_tensor(lora, li, Target::Down, &a, d)?)?;
                }
            }
        }
        cache.advance(t);
        let x = candle_nn::ops::rms_norm(&x, &m.norm, m.config.rms_norm_eps as f32)?;
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

    /// The logits of `m` rows of `hidden` (`[m, hidden_size]`, after the output norm), each
    /// row's bits what it gets alone: one product over all rows where the head computes each
    /// row alike whatever comes with it, the rows-as-alone product where the head has one, a
    /// product per row otherwise.
    pub(crate) fn logits_rows(&self, hidden: &[f32], m: usize) -> Result<Vec<Vec<f32>>> {
        let width = self.inner.config.hidden_size;
        let cpu = &candle_core::Device::Cpu;
        if self.head_batch_invariant() {
            let h = Tensor::from_slice(hidden, (m, width), cpu)?;
            return Ok(self.logits(&h)?.to_vec2::<f32>()?);
        }
        if let Some(l) = self.logits_as_alone(hidden, m)? {
            return Ok(l);
        }
        hidden
            .chunks_exact(width)
            .map(|row| self.last_logits(&Tensor::from_slice(row, (1, width), cpu)?))
            .collect()
    }

    /// Last-row logits as a vector.
    pub(crate) fn last_logits(&self, hidden: &Tensor) -> Result<Vec<f32>> {
        let n = hidden.dim(0)?;
        let last = hidden.narrow(0, n - 1, 1)?;
        Ok(self.logits(&last)?.squeeze(0)?.to_vec1::<f32>()?)
    }
}

/// One projection group's product for every sequence's rows, `out` (`[t, width]`) from `xs`
/// (`[t, k]`), plus each sequence's LoRA update of the group's `cols`. One sequence: its
/// product and update together ([`lora::View::matmul_and_update`]: in decode the update rides the
/// product's pool call). Several: one product over all rows where the matrix computes each row
/// alike whatever comes with it; otherwise the one-token sequences (decode) share one product
/// computed as each row alone and each longer chunk gets its own: the same bits as alone
/// either way. Then each sequence's update.
fn project(
    rows: &Rows,
    seqs: &[BatchSeq<'_, '_>],
    li: usize,
    w: &Stack,
    cols: &[(Target, usize, usize)],
    xs: &[f32],
    out: &mut [f32],
) -> Result<()> {
    let t = rows.t();
    if t == 0 {
        return Ok(());
    }
    let (xw, ow) = (xs.len() / t, out.len() / t);
    let view = |active| lora::View {
        active,
        layer: li,
        cols,
    };
    if let [s] = seqs {
        if !s.alone || t == 1 {
            return view(s.lora).matmul_and_update(xs, t, out, |out, rider| {
                w.matmul_into_riding(xs, t, out, rider)
            });
        }
    }
    if w.batch_invariant() {
        w.matmul_into(xs, t, out)?;
    } else {
        let together = rows.singles.len() > 1;
        if together {
            let mut xb = Vec::with_capacity(rows.singles.len() * xw);
            for &r in &rows.singles {
                xb.extend_from_slice(&xs[r * xw..(r + 1) * xw]);
            }
            let mut ob = vec![0f32; rows.singles.len() * ow];
            w.matmul_into_as_alone(&xb, rows.singles.len(), &mut ob)?;
            for (j, &r) in rows.singles.iter().enumerate() {
                out[r * ow..(r + 1) * ow].copy_from_slice(&ob[j * ow..(j + 1) * ow]);
            }
        }
        for i in 0..seqs.len() {
            let r = rows.of(i);
            if together && rows.single[i] {
                continue;
            }
            let (x, o) = (
                &xs[r.start * xw..r.end * xw],
                &mut out[r.start * ow..r.end * ow],
            );
            w.matmul_into(x, r.len(), o)?;
        }
    }
    for (i, s) in seqs.iter().enumerate() {
        let r = rows.of(i);
        let (x, o) = (
            &xs[r.start * xw..r.end * xw],
            &mut out[r.start * ow..r.end * ow],
        );
        if s.alone {
            // Each row's update as decode computes it (the one-row update).
            for (x, o) in x.chunks_exact(xw).zip(o.chunks_exact_mut(ow)) {
                view(s.lora).update_rows(x, 1, o)?;
            }
        } else {
            view(s.lora).update_rows(x, r.len(), o)?;
        }
    }
    Ok(())
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
