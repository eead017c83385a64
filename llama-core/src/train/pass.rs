//! The training pass: a hand-written forward and backward pass of a Llama layer stack in exact
//! f32 over our kernels and pool, walking each layer's plan, with the LoRA matrices as the only
//! trainable parameters (the base's weights get no gradient; the gradient flows through them,
//! quantized included, to the inputs).

use super::*;
use crate::kernels::dense::{self, Heads};
use crate::model::{LayerView, TrainView};
use crate::plan::{Attention, Mlp};

/// One layer's activations kept for the backward pass.
struct Saved {
    x: Vec<f32>,
    hn: Vec<f32>,
    r1: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    /// LoRA `x A^T` per target (Q, K, V, O, Gate, Up, Down).
    u: [Vec<f32>; 7],
    att: Vec<f32>,
    lse: Vec<f32>,
    x2: Vec<f32>,
    hn2: Vec<f32>,
    r2: Vec<f32>,
    gu: Vec<f32>,
    a: Vec<f32>,
}

/// `y[:, col..col + n] += s * u B^T` for `u` `[m, r]`, `B` `[n, r]`.
fn lora_up(
    u: &[f32],
    b: &[f32],
    s: f32,
    m: usize,
    r: usize,
    y: &mut [f32],
    (stride, col, n): (usize, usize, usize),
) {
    // y[:, col..] += s * u[m, r] . B^T (B is [n, r]).
    dense::par_gemm(
        (m, n, r),
        y,
        (stride, col),
        true,
        s,
        (u, 0, r, 1),
        (b, 0, 1, r),
    );
}

/// The backward pass of one LoRA update `y += s (x A^T) B^T` given `gy` (columns
/// `col..col + n` of rows of `stride`): adds to `gx` and to the pair's gradients.
#[allow(clippy::too_many_arguments)]
fn lora_bwd(
    p: &Pair,
    g: &mut Pair,
    s: f32,
    x: &[f32],
    u: &[f32],
    gy: &[f32],
    (stride, col, n): (usize, usize, usize),
    m: usize,
    gx: &mut [f32],
) {
    let k = x.len() / m.max(1);
    let r = p.a.len() / k.max(1);
    // gB[n, r] += s * gy^T[n, m] . u[m, r]
    dense::par_gemm(
        (n, r, m),
        &mut g.b,
        (r, 0),
        true,
        s,
        (gy, col, 1, stride),
        (u, 0, r, 1),
    );
    // gu[m, r] = s * gy[m, n] . B[n, r]
    let mut gu = vec![0f32; m * r];
    dense::par_gemm(
        (m, r, n),
        &mut gu,
        (r, 0),
        false,
        s,
        (gy, col, stride, 1),
        (&p.b, 0, r, 1),
    );
    // gA[r, k] += gu^T[r, m] . x[m, k]
    dense::par_gemm(
        (r, k, m),
        &mut g.a,
        (k, 0),
        true,
        1.0,
        (&gu, 0, 1, r),
        (x, 0, k, 1),
    );
    // gx[m, k] += gu[m, r] . A[r, k]
    dense::par_gemm(
        (m, k, r),
        gx,
        (k, 0),
        true,
        1.0,
        (&gu, 0, r, 1),
        (&p.a, 0, k, 1),
    );
}

/// RoPE tables with one row per token, at its position within its segment.
fn rope_rows(rope: &crate::model::Rope, starts: &[usize], hd: usize) -> (Vec<f32>, Vec<f32>) {
    let t = starts.len();
    let longest = (0..t).map(|i| i - starts[i] + 1).max().unwrap_or(1);
    let (c, s) = rope.tables(0, longest);
    let half = hd / 2;
    let (mut cos, mut sin) = (Vec::with_capacity(t * half), Vec::with_capacity(t * half));
    for (i, &s0) in starts.iter().enumerate() {
        let p = i - s0;
        cos.extend_from_slice(&c[p * half..(p + 1) * half]);
        sin.extend_from_slice(&s[p * half..(p + 1) * half]);
    }
    (cos, sin)
}

fn check_inputs(model: &Model, params: &LoraParams, tokens: &[u32], score: &[bool]) -> Result<()> {
    let c = model.config();
    if tokens.len() < 2 {
        return Err(Error::InvalidArgument(
            "a training sequence needs at least 2 tokens".into(),
        ));
    }
    if score.len() != tokens.len() - 1 {
        return Err(Error::InvalidArgument(format!(
            "{} loss flags for {} tokens (expected one per predicted token: {})",
            score.len(),
            tokens.len(),
            tokens.len() - 1
        )));
    }
    if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
        return Err(Error::InvalidArgument(format!(
            "token id {bad} is outside the vocabulary"
        )));
    }
    if params.layers.len() != c.num_hidden_layers
        || Target::ALL.iter().any(|&t| params.shape(t) != t.shape(c))
    {
        return Err(Error::InvalidArgument(
            "the LoRA parameters were made for another model".into(),
        ));
    }
    Ok(())
}

/// What training reads of a layer's plan: the exact-f32 pass knows the Llama layer (causal
/// attention, SwiGLU), so a new layer kind is a compile error here until it is handled.
struct Dims<'p> {
    h: usize,
    nh: usize,
    nkv: usize,
    hd: usize,
    ff: usize,
    eps: f32,
    qkv: &'p crate::plan::Group,
    gate_up: &'p crate::plan::Group,
}

fn dims(lp: &crate::plan::LayerPlan) -> Dims<'_> {
    let (
        Attention::Causal {
            heads,
            kv_heads,
            head_dim,
            qkv,
            ..
        },
        Mlp::SwiGlu { ffn, gate_up, .. },
    ) = (&lp.attention, &lp.mlp);
    Dims {
        h: lp.hidden,
        nh: *heads,
        nkv: *kv_heads,
        hd: *head_dim,
        ff: *ffn,
        eps: lp.eps,
        qkv,
        gate_up,
    }
}

pub(super) fn seq_grad(
    model: &Model,
    params: &LoraParams,
    tokens: &[u32],
    score: &[bool],
    teacher: Option<&[Vec<(u32, f32)>]>,
    segments: &[usize],
) -> Result<SeqGrad> {
    check_inputs(model, params, tokens, score)?;
    if segments.first() != Some(&0)
        || segments.windows(2).any(|w| w[0] >= w[1])
        || segments.last().is_some_and(|&l| l >= tokens.len())
    {
        return Err(Error::InvalidArgument(
            "segments must start at 0 and increase within the sequence".into(),
        ));
    }
    // Each row's segment start.
    let mut starts = vec![0usize; tokens.len()];
    for (si, &s0) in segments.iter().enumerate() {
        let end = segments.get(si + 1).copied().unwrap_or(tokens.len());
        starts[s0..end].iter_mut().for_each(|x| *x = s0);
    }
    let view = model.train_view()?;
    let c = view.config;
    let t = tokens.len();
    let h = c.hidden_size;
    let eps = c.rms_norm_eps as f32;
    let s = params.config.scale();
    let (cos, sin) = rope_rows(view.rope, &starts, c.head_dim);
    let mut x: Vec<f32> = view.embed.rows(tokens)?.flatten_all()?.to_vec1()?;
    let mut saved: Vec<Saved> = Vec::with_capacity(c.num_hidden_layers);
    for (li, l) in view.layers.iter().enumerate() {
        let Dims {
            nh,
            nkv,
            hd,
            ff,
            eps,
            qkv: qkv_g,
            gate_up: gate_up_g,
            ..
        } = dims(l.plan);
        let (qw, kw) = (nh * hd, nkv * hd);
        let qkv_w = qkv_g.width();
        let heads = Heads {
            t,
            nh,
            nkv,
            hd,
            starts: &starts,
        };
        let scale = (1.0 / (hd as f64).sqrt()) as f32;
        let ps = &params.layers[li];
        let mut hn = vec![0f32; t * h];
        let r1 = dense::rms_norm(&x, &l.attn_norm, eps, &mut hn);
        let mut qkv = vec![0f32; t * qkv_w];
        for &(m, col) in &l.qkv {
            dense::fwd(&**m, &hn, t, &mut qkv, (qkv_w, col));
        }
        let mut u: [Vec<f32>; 7] = Default::default();
        for (tg, col, n) in qkv_g.cols() {
            if let Some(p) = &ps[tg as usize] {
                let r = params.config.rank;
                u[tg as usize] = dense::lora_down(&hn, &p.a, t, r, h);
                lora_up(&u[tg as usize], &p.b, s, t, r, &mut qkv, (qkv_w, col, n));
            }
        }
        view.rope.apply(&mut qkv, t, nh, qkv_w, (&cos, &sin));
        view.rope.apply(&mut qkv[qw..], t, nkv, qkv_w, (&cos, &sin));
        let (mut q, mut k, mut v) = (vec![0f32; t * qw], vec![0f32; t * kw], vec![0f32; t * kw]);
        for i in 0..t {
            let row = &qkv[i * qkv_w..(i + 1) * qkv_w];
            q[i * qw..(i + 1) * qw].copy_from_slice(&row[..qw]);
            k[i * kw..(i + 1) * kw].copy_from_slice(&row[qw..qw + kw]);
            v[i * kw..(i + 1) * kw].copy_from_slice(&row[qw + kw..]);
        }
        drop(qkv);
        let mut att = vec![0f32; t * qw];
        let lse = dense::attention(&q, &k, &v, heads, scale, &mut att);
        let mut o = vec![0f32; t * h];
        dense::fwd(&**l.o, &att, t, &mut o, (h, 0));
        if let Some(p) = &ps[Target::O as usize] {
            let r = params.config.rank;
            u[Target::O as usize] = dense::lora_down(&att, &p.a, t, r, qw);
            lora_up(&u[Target::O as usize], &p.b, s, t, r, &mut o, (h, 0, h));
        }
        let x2: Vec<f32> = x.iter().zip(&o).map(|(a, b)| a + b).collect();
        let mut hn2 = vec![0f32; t * h];
        let r2 = dense::rms_norm(&x2, &l.ffn_norm, eps, &mut hn2);
        let mut gu = vec![0f32; t * 2 * ff];
        for &(m, col) in &l.gate_up {
            dense::fwd(&**m, &hn2, t, &mut gu, (2 * ff, col));
        }
        for (tg, col, n) in gate_up_g.cols() {
            if let Some(p) = &ps[tg as usize] {
                let r = params.config.rank;
                u[tg as usize] = dense::lora_down(&hn2, &p.a, t, r, h);
                lora_up(&u[tg as usize], &p.b, s, t, r, &mut gu, (2 * ff, col, n));
            }
        }
        let mut a = vec![0f32; t * ff];
        crate::kernels::swiglu_rows(&gu, ff, &mut a);
        let mut d = vec![0f32; t * h];
        dense::fwd(&**l.down, &a, t, &mut d, (h, 0));
        if let Some(p) = &ps[Target::Down as usize] {
            let r = params.config.rank;
            u[Target::Down as usize] = dense::lora_down(&a, &p.a, t, r, ff);
            lora_up(&u[Target::Down as usize], &p.b, s, t, r, &mut d, (h, 0, h));
        }
        let x3: Vec<f32> = x2.iter().zip(&d).map(|(a, b)| a + b).collect();
        saved.push(Saved {
            x,
            hn,
            r1,
            q,
            k,
            v,
            u,
            att,
            lse,
            x2,
            hn2,
            r2,
            gu,
            a,
        });
        x = x3;
    }
    // Output norm, head and loss, over the scored positions only, in blocks of rows.
    let mut hf = vec![0f32; t * h];
    let rf = dense::rms_norm(&x, &view.norm, eps, &mut hf);
    let vocab = c.vocab_size;
    let rows: Vec<usize> = (0..t - 1).filter(|&i| score[i]).collect();
    let mut g_hf = vec![0f32; t * h];
    let mut loss_sum = 0f64;
    // Rows per block: as many as a block's logits fit in LOGITS_BYTES (each block
    // dequantizes the whole head once forward and once backward), at least 32, in blocks of
    // even size.
    const LOGITS_BYTES: usize = 32 << 20;
    let cap = (LOGITS_BYTES / (4 * vocab.max(1))).max(32);
    let block = rows.len().div_ceil(rows.len().div_ceil(cap).max(1)).max(1);
    for (bn, blk) in rows.chunks(block).enumerate() {
        let m = blk.len();
        let mut xb = vec![0f32; m * h];
        for (bi, &i) in blk.iter().enumerate() {
            xb[bi * h..(bi + 1) * h].copy_from_slice(&hf[i * h..(i + 1) * h]);
        }
        let mut logits = vec![0f32; m * vocab];
        dense::fwd(&**view.lm_head, &xb, m, &mut logits, (vocab, 0));
        // Each row's loss, then its gradient in place, rows on the pool; the losses summed
        // in row order.
        let mut losses = vec![0f64; m];
        {
            let lo = crate::pool::SharedMut::new(&mut losses);
            crate::pool::for_each_chunk_mut(&mut logits, vocab, &|bi, row| {
                let i = blk[bi];
                let mx = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let target = tokens[i + 1] as usize;
                let picked: Vec<(usize, f32)> = match teacher {
                    None => vec![(target, 1.0)],
                    Some(dists) => dists[bn * block + bi]
                        .iter()
                        .map(|&(id, p)| (id as usize, p))
                        .collect(),
                };
                // -sum p log softmax = sum p (lse - logit).
                let before: Vec<f32> = picked.iter().map(|&(id, _)| row[id]).collect();
                // exp(logit - max); its f32 sum is not used: the vocabulary's terms are summed in f64.
                crate::attention::exp_shifted(row, mx, crate::attention::simd());
                let z: f64 = row.iter().map(|&e| e as f64).sum();
                let lse = mx as f64 + z.ln();
                let loss: f64 = picked
                    .iter()
                    .zip(&before)
                    .map(|(&(_, p), &l)| p as f64 * (lse - l as f64))
                    .sum();
                // d/d logits = mass * softmax - p (one-hot for a target).
                let mass: f32 = picked.iter().map(|d| d.1).sum();
                let f = (mass as f64 / z) as f32;
                for v in row.iter_mut() {
                    *v *= f;
                }
                for &(id, p) in &picked {
                    row[id] -= p;
                }
                // SAFETY: each row's item writes its own loss.
                unsafe { lo.write(bi, &[loss]) };
            });
        }
        loss_sum += losses.iter().sum::<f64>();
        let mut gb = vec![0f32; m * h];
        dense::bwd(&**view.lm_head, &logits, (vocab, 0), m, &mut gb);
        for (bi, &i) in blk.iter().enumerate() {
            g_hf[i * h..(i + 1) * h].copy_from_slice(&gb[bi * h..(bi + 1) * h]);
        }
    }
    let mut gx = vec![0f32; t * h];
    dense::rms_norm_bwd(&x, &view.norm, &rf, &g_hf, &mut gx);
    let mut grads = params.zeros_like();
    for li in (0..c.num_hidden_layers).rev() {
        let sv = &saved[li];
        let l: &LayerView<'_> = &view.layers[li];
        gx = layer_bwd(
            &view,
            l,
            sv,
            params,
            &mut grads,
            li,
            gx,
            (&cos, &sin),
            &starts,
        )?;
    }
    Ok(SeqGrad {
        loss_sum,
        n_scored: rows.len(),
        grads,
    })
}

#[allow(clippy::too_many_arguments)]
fn layer_bwd(
    view: &TrainView<'_>,
    l: &LayerView<'_>,
    sv: &Saved,
    params: &LoraParams,
    grads: &mut LoraParams,
    li: usize,
    g3: Vec<f32>,
    (cos, sin): (&[f32], &[f32]),
    starts: &[usize],
) -> Result<Vec<f32>> {
    let Dims {
        h,
        nh,
        nkv,
        hd,
        ff,
        qkv: qkv_g,
        gate_up: gate_up_g,
        ..
    } = dims(l.plan);
    let (qw, kw) = (nh * hd, nkv * hd);
    let qkv_w = qkv_g.width();
    let t = sv.x.len() / h;
    let s = params.config.scale();
    let ps = &params.layers[li];
    let gs = &mut grads.layers[li];
    // Down projection: d = a Wd^T (+ LoRA).
    let mut ga = vec![0f32; t * ff];
    dense::bwd(&**l.down, &g3, (h, 0), t, &mut ga);
    if let (Some(p), Some(g)) = (&ps[Target::Down as usize], &mut gs[Target::Down as usize]) {
        lora_bwd(
            p,
            g,
            s,
            &sv.a,
            &sv.u[Target::Down as usize],
            &g3,
            (h, 0, h),
            t,
            &mut ga,
        );
    }
    // SwiGLU: a = silu(gate) * up.
    let mut ggu = vec![0f32; t * 2 * ff];
    dense::swiglu_bwd(&sv.gu, &ga, ff, &mut ggu);
    drop(ga);
    let mut ghn2 = vec![0f32; t * h];
    for &(m, col) in &l.gate_up {
        dense::bwd(&**m, &ggu, (2 * ff, col), t, &mut ghn2);
    }
    for (tg, col, n) in gate_up_g.cols() {
        if let (Some(p), Some(g)) = (&ps[tg as usize], &mut gs[tg as usize]) {
            lora_bwd(
                p,
                g,
                s,
                &sv.hn2,
                &sv.u[tg as usize],
                &ggu,
                (2 * ff, col, n),
                t,
                &mut ghn2,
            );
        }
    }
    drop(ggu);
    let mut g2 = g3;
    dense::rms_norm_bwd(&sv.x2, &l.ffn_norm, &sv.r2, &ghn2, &mut g2);
    // Output projection: o = att Wo^T (+ LoRA).
    let mut gatt = vec![0f32; t * qw];
    dense::bwd(&**l.o, &g2, (h, 0), t, &mut gatt);
    if let (Some(p), Some(g)) = (&ps[Target::O as usize], &mut gs[Target::O as usize]) {
        lora_bwd(
            p,
            g,
            s,
            &sv.att,
            &sv.u[Target::O as usize],
            &g2,
            (h, 0, h),
            t,
            &mut gatt,
        );
    }
    // Attention, then RoPE (a rotation: its transpose).
    let (mut gq, mut gk, mut gv) = (vec![0f32; t * qw], vec![0f32; t * kw], vec![0f32; t * kw]);
    let heads = Heads {
        t,
        nh,
        nkv,
        hd,
        starts,
    };
    let scale = (1.0 / (hd as f64).sqrt()) as f32;
    dense::attention_bwd(
        &sv.q,
        &sv.k,
        &sv.v,
        &sv.att,
        &sv.lse,
        &gatt,
        heads,
        scale,
        (&mut gq, &mut gk, &mut gv),
    );
    view.rope.apply_transposed(&mut gq, t, nh, qw, (cos, sin));
    view.rope.apply_transposed(&mut gk, t, nkv, kw, (cos, sin));
    let mut gqkv = vec![0f32; t * qkv_w];
    for i in 0..t {
        let row = &mut gqkv[i * qkv_w..(i + 1) * qkv_w];
        row[..qw].copy_from_slice(&gq[i * qw..(i + 1) * qw]);
        row[qw..qw + kw].copy_from_slice(&gk[i * kw..(i + 1) * kw]);
        row[qw + kw..].copy_from_slice(&gv[i * kw..(i + 1) * kw]);
    }
    let mut ghn = vec![0f32; t * h];
    for &(m, col) in &l.qkv {
        dense::bwd(&**m, &gqkv, (qkv_w, col), t, &mut ghn);
    }
    for (tg, col, n) in qkv_g.cols() {
        if let (Some(p), Some(g)) = (&ps[tg as usize], &mut gs[tg as usize]) {
            lora_bwd(
                p,
                g,
                s,
                &sv.hn,
                &sv.u[tg as usize],
                &gqkv,
                (qkv_w, col, n),
                t,
                &mut ghn,
            );
        }
    }
    let mut g1 = g2;
    dense::rms_norm_bwd(&sv.x, &l.attn_norm, &sv.r1, &ghn, &mut g1);
    Ok(g1)
}
