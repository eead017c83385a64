//! The layer plan: what a Llama decoder layer is made of (its norms, its projections grouped by
//! the input they read, its attention kind and its MLP kind), built from [`Config`] in one
//! place. The tensor list and shapes ([`Plan::tensors`]: loading, quantization, conversion),
//! the LoRA targets and their shapes ([`Target::shape`]), the model's layers (model/load.rs),
//! the inference pass (model/forward.rs, `Model::layer`), the candle reference pass and
//! training read it.
//!
//! A new layer kind (Llama 3.2 Vision's cross-attention, say) is a new [`Attention`] (or
//! [`Mlp`]) variant here with its tensors in [`LayerPlan::tensors`], and its computation in the
//! `match` of `Model::layer` (model/forward.rs); loading follows the tensor list.

use crate::config::Config;
use crate::error::{Error, Result};
use crate::weights::W;

/// A projection of a decoder layer (what a LoRA adapter can update).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    /// Attention query (`q_proj`, `attn_q`).
    Q,
    /// Attention key (`k_proj`, `attn_k`).
    K,
    /// Attention value (`v_proj`, `attn_v`).
    V,
    /// Attention output (`o_proj`, `attn_output`).
    O,
    /// Feed-forward gate (`gate_proj`, `ffn_gate`).
    Gate,
    /// Feed-forward up (`up_proj`, `ffn_up`).
    Up,
    /// Feed-forward down (`down_proj`, `ffn_down`).
    Down,
}

impl Target {
    /// Every target, in the order a layer computes them.
    pub const ALL: [Target; 7] = [
        Target::Q,
        Target::K,
        Target::V,
        Target::O,
        Target::Gate,
        Target::Up,
        Target::Down,
    ];

    /// The short name (`q`, `k`, `v`, `o`, `gate`, `up`, `down`).
    pub fn as_str(self) -> &'static str {
        match self {
            Target::Q => "q",
            Target::K => "k",
            Target::V => "v",
            Target::O => "o",
            Target::Gate => "gate",
            Target::Up => "up",
            Target::Down => "down",
        }
    }

    /// Parses a short name, a Hugging Face module name (`q_proj`) or a GGUF one (`attn_q`).
    pub fn parse(s: &str) -> Result<Target> {
        let t = match s.trim() {
            "q" | "q_proj" | "attn_q" => Target::Q,
            "k" | "k_proj" | "attn_k" => Target::K,
            "v" | "v_proj" | "attn_v" => Target::V,
            "o" | "o_proj" | "attn_output" => Target::O,
            "gate" | "gate_proj" | "ffn_gate" => Target::Gate,
            "up" | "up_proj" | "ffn_up" => Target::Up,
            "down" | "down_proj" | "ffn_down" => Target::Down,
            other => {
                return Err(Error::InvalidArgument(format!(
                    "unknown LoRA target `{other}` (expected q, k, v, o, gate, up or down)"
                )))
            }
        };
        Ok(t)
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }

    /// The model weight this target updates in layer `l`.
    pub(crate) fn weight(self, l: usize) -> W {
        match self {
            Target::Q => W::Q(l),
            Target::K => W::K(l),
            Target::V => W::V(l),
            Target::O => W::O(l),
            Target::Gate => W::Gate(l),
            Target::Up => W::Up(l),
            Target::Down => W::Down(l),
        }
    }

    /// The Hugging Face module path in layer `l` (`model.layers.3.self_attn.q_proj`).
    pub(crate) fn hf_module(self, l: usize) -> String {
        let w = self.weight(l).hf_name();
        w.strip_suffix(".weight").unwrap_or(&w).to_string()
    }

    /// `(out, in)` of the projection in a layer of `c` (the layer plan's).
    pub(crate) fn shape(self, c: &Config) -> (usize, usize) {
        let p = LayerPlan::new(c).proj(self);
        (p.n, p.k)
    }

    /// The head count of GGUF's row permutation (Q and K).
    pub(crate) fn permuted_heads(self, c: &Config) -> Option<usize> {
        LayerPlan::new(c).proj(self).rope_heads
    }
}

/// One projection of a layer: `[n, k]` (`n` outputs of `k` inputs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Proj {
    pub(crate) target: Target,
    pub(crate) n: usize,
    pub(crate) k: usize,
    /// The head count of GGUF's row permutation for interleaved RoPE (Q and K).
    pub(crate) rope_heads: Option<usize>,
}

/// Projections of the same input, their outputs side by side in one row buffer (computed as
/// one stacked matrix where stored alike: `model::Stack`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Group {
    pub(crate) parts: Vec<Proj>,
}

impl Group {
    fn new(parts: Vec<Proj>) -> Group {
        Group { parts }
    }

    /// All outputs side by side.
    pub(crate) fn width(&self) -> usize {
        self.parts.iter().map(|p| p.n).sum()
    }

    /// Each part's `(target, first column, width)` in the group's output rows.
    pub(crate) fn cols(&self) -> Vec<(Target, usize, usize)> {
        let mut col = 0;
        self.parts
            .iter()
            .map(|p| {
                col += p.n;
                (p.target, col - p.n, p.n)
            })
            .collect()
    }
}

/// How a layer mixes positions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Attention {
    /// Causal self-attention over the sequence's KV cache with rotary positions, grouped-query
    /// (`kv_heads` key/value heads shared by `heads / kv_heads` query heads each): Q, K, V from
    /// the normed input (`qkv`), the heads' outputs through `o`.
    Causal {
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        qkv: Group,
        o: Group,
    },
}

/// The feed-forward part of a layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Mlp {
    /// `down(silu(gate(x)) * up(x))`.
    SwiGlu {
        ffn: usize,
        gate_up: Group,
        down: Group,
    },
}

/// One decoder layer: `x += attention(norm(x)); x += mlp(norm(x))` (pre-norm, RMS norms).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct LayerPlan {
    pub(crate) hidden: usize,
    pub(crate) eps: f32,
    pub(crate) attention: Attention,
    pub(crate) mlp: Mlp,
}

impl LayerPlan {
    /// The layer every Llama-architecture model of `c` has.
    pub(crate) fn new(c: &Config) -> LayerPlan {
        let (h, hd, nh, nkv, ff) = c.dims();
        let p = |target, n, k, rope_heads| Proj {
            target,
            n,
            k,
            rope_heads,
        };
        LayerPlan {
            hidden: h,
            eps: c.rms_norm_eps as f32,
            attention: Attention::Causal {
                heads: nh,
                kv_heads: nkv,
                head_dim: hd,
                qkv: Group::new(vec![
                    p(Target::Q, nh * hd, h, Some(nh)),
                    p(Target::K, nkv * hd, h, Some(nkv)),
                    p(Target::V, nkv * hd, h, None),
                ]),
                o: Group::new(vec![p(Target::O, h, nh * hd, None)]),
            },
            mlp: Mlp::SwiGlu {
                ffn: ff,
                gate_up: Group::new(vec![
                    p(Target::Gate, ff, h, None),
                    p(Target::Up, ff, h, None),
                ]),
                down: Group::new(vec![p(Target::Down, h, ff, None)]),
            },
        }
    }

    /// The projection groups in the order the layer computes them.
    pub(crate) fn groups(&self) -> Vec<&Group> {
        let mut out = vec![];
        match &self.attention {
            Attention::Causal { qkv, o, .. } => out.extend([qkv, o]),
        }
        match &self.mlp {
            Mlp::SwiGlu { gate_up, down, .. } => out.extend([gate_up, down]),
        }
        out
    }

    /// Every projection of the layer, in the order it computes them.
    pub(crate) fn projections(&self) -> impl Iterator<Item = &Proj> {
        self.groups().into_iter().flat_map(|g| g.parts.iter())
    }

    /// Projection `t` (every Llama layer has each target).
    pub(crate) fn proj(&self, t: Target) -> Proj {
        *self
            .projections()
            .find(|p| p.target == t)
            .expect("every Llama layer has every target")
    }

    /// The layer's tensors in the order llama.cpp's converter writes them, each with its
    /// shape (candle order) and the head count of GGUF's Q/K row permutation.
    pub(crate) fn tensors(&self, l: usize) -> Vec<(W, Vec<usize>, Option<usize>)> {
        let h = self.hidden;
        let proj = |p: &Proj| (p.target.weight(l), vec![p.n, p.k], p.rope_heads);
        let mut list = vec![(W::AttnNorm(l), vec![h], None)];
        match &self.attention {
            Attention::Causal { qkv, o, .. } => {
                list.extend(qkv.parts.iter().chain(&o.parts).map(proj));
            }
        }
        list.push((W::FfnNorm(l), vec![h], None));
        match &self.mlp {
            Mlp::SwiGlu { gate_up, down, .. } => {
                list.extend(gate_up.parts.iter().chain(&down.parts).map(proj));
            }
        }
        list
    }

    /// Parameters of the layer (projections and norms).
    pub(crate) fn n_params(&self) -> usize {
        self.tensors(0)
            .iter()
            .map(|(_, s, _)| s.iter().product::<usize>())
            .sum()
    }
}

/// The whole model: embedding, the layers, the output norm and head.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Plan {
    pub(crate) vocab: usize,
    pub(crate) hidden: usize,
    pub(crate) layers: Vec<LayerPlan>,
}

impl Plan {
    pub(crate) fn new(c: &Config) -> Plan {
        Plan {
            vocab: c.vocab_size,
            hidden: c.hidden_size,
            layers: (0..c.num_hidden_layers)
                .map(|_| LayerPlan::new(c))
                .collect(),
        }
    }

    /// Every weight of the model with its shape (candle order) and, for Q and K, the head
    /// count of llama.cpp's row permutation: the order llama.cpp's converter writes them. The
    /// output head only where the model has its own (`has_output`: not tied to the embedding).
    pub(crate) fn tensors(&self, has_output: bool) -> Vec<(W, Vec<usize>, Option<usize>)> {
        let (v, h) = (self.vocab, self.hidden);
        let mut list = vec![(W::Embed, vec![v, h], None)];
        for (l, layer) in self.layers.iter().enumerate() {
            list.extend(layer.tensors(l));
        }
        list.push((W::OutputNorm, vec![h], None));
        if has_output {
            list.push((W::Output, vec![v, h], None));
        }
        list
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_lists_every_llama_tensor_once_with_its_shape() {
        let c = crate::test_util::tiny_config();
        let plan = Plan::new(&c);
        let list = plan.tensors(true);
        assert_eq!(list.len(), 3 + 9 * c.num_hidden_layers);
        let (h, hd, nh, nkv, ff) = c.dims();
        let shape = |w: W| {
            list.iter()
                .find(|(x, _, _)| x.gguf_name() == w.gguf_name())
                .map(|(_, s, p)| (s.clone(), *p))
        };
        assert_eq!(shape(W::Q(1)), Some((vec![nh * hd, h], Some(nh))));
        assert_eq!(shape(W::K(0)), Some((vec![nkv * hd, h], Some(nkv))));
        assert_eq!(shape(W::Down(1)), Some((vec![h, ff], None)));
        assert_eq!(shape(W::Output), Some((vec![c.vocab_size, h], None)));
        assert!(plan
            .tensors(false)
            .iter()
            .all(|(w, _, _)| !matches!(w, W::Output)));
        for t in Target::ALL {
            let p = plan.layers[0].proj(t);
            assert_eq!((p.n, p.k), t.shape(&c));
        }
        let cols = plan.layers[0].groups()[0].cols();
        assert_eq!(
            cols,
            vec![
                (Target::Q, 0, nh * hd),
                (Target::K, nh * hd, nkv * hd),
                (Target::V, nh * hd + nkv * hd, nkv * hd)
            ]
        );
        assert_eq!(
            plan.layers[0].n_params(),
            nh * hd * h * 2 + nkv * hd * h * 2 + 3 * h * ff + 2 * h
        );
    }
}
