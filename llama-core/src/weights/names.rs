//! The one table of a Llama model's tensors: each weight's GGUF and Hugging Face names and shape,
//! and GGUF's Q/K row permutation.

/// Which kind of weight: decides the HF and GGUF names.
#[derive(Debug, Clone, Copy)]
pub(crate) enum W {
    Embed,
    OutputNorm,
    Output,
    AttnNorm(usize),
    Q(usize),
    K(usize),
    V(usize),
    O(usize),
    FfnNorm(usize),
    Gate(usize),
    Up(usize),
    Down(usize),
    RopeFreqs,
}

impl W {
    /// The weight's names in both formats: `(GGUF, Hugging Face)`; `{l}` is the layer.
    fn names(self) -> (&'static str, &'static str) {
        match self {
            W::Embed => ("token_embd.weight", "model.embed_tokens.weight"),
            W::OutputNorm => ("output_norm.weight", "model.norm.weight"),
            W::Output => ("output.weight", "lm_head.weight"),
            W::AttnNorm(_) => ("attn_norm", "input_layernorm"),
            W::Q(_) => ("attn_q", "self_attn.q_proj"),
            W::K(_) => ("attn_k", "self_attn.k_proj"),
            W::V(_) => ("attn_v", "self_attn.v_proj"),
            W::O(_) => ("attn_output", "self_attn.o_proj"),
            W::FfnNorm(_) => ("ffn_norm", "post_attention_layernorm"),
            W::Gate(_) => ("ffn_gate", "mlp.gate_proj"),
            W::Up(_) => ("ffn_up", "mlp.up_proj"),
            W::Down(_) => ("ffn_down", "mlp.down_proj"),
            W::RopeFreqs => ("rope_freqs.weight", "rope_freqs.weight"),
        }
    }

    /// The layer of a per-layer weight.
    fn layer(self) -> Option<usize> {
        match self {
            W::AttnNorm(l)
            | W::Q(l)
            | W::K(l)
            | W::V(l)
            | W::O(l)
            | W::FfnNorm(l)
            | W::Gate(l)
            | W::Up(l)
            | W::Down(l) => Some(l),
            W::Embed | W::OutputNorm | W::Output | W::RopeFreqs => None,
        }
    }

    pub(crate) fn gguf_name(self) -> String {
        self.name(false)
    }

    pub(crate) fn hf_name(self) -> String {
        self.name(true)
    }

    /// The full tensor name in a Hugging Face folder (`hf`) or a GGUF file.
    fn name(self, hf: bool) -> String {
        let (g, h) = self.names();
        match (self.layer(), hf) {
            (Some(l), false) => format!("blk.{l}.{g}.weight"),
            (Some(l), true) => format!("model.layers.{l}.{h}.weight"),
            (None, false) => g.to_string(),
            (None, true) => h.to_string(),
        }
    }
}

/// Moves whole rows of a head-major projection between GGUF's interleaved order and HF's
/// rotate-half order: HF row `h*d + j*d/2 + i` is GGUF row `h*d + 2*i + j`.
fn move_rows(data: &[u8], rows: usize, n_heads: usize, to_hf: bool) -> Vec<u8> {
    let row_bytes = data.len() / rows;
    let d = rows / n_heads;
    let mut out = vec![0u8; data.len()];
    for h in 0..n_heads {
        for j in 0..2 {
            for i in 0..d / 2 {
                let (hf, gg) = (h * d + j * (d / 2) + i, h * d + 2 * i + j);
                let (dst, src) = if to_hf { (hf, gg) } else { (gg, hf) };
                out[dst * row_bytes..(dst + 1) * row_bytes]
                    .copy_from_slice(&data[src * row_bytes..(src + 1) * row_bytes]);
            }
        }
    }
    out
}

/// Rows of a head-major projection, permuted from GGUF's interleaved order back to HF's
/// rotate-half order.
pub(crate) fn unpermute_rows(data: &[u8], rows: usize, n_heads: usize) -> Vec<u8> {
    move_rows(data, rows, n_heads, true)
}

/// The inverse of [`unpermute_rows`]: HF order to GGUF order (used when writing GGUF).
pub fn permute_rows_for_gguf(data: &[u8], rows: usize, n_heads: usize) -> Vec<u8> {
    move_rows(data, rows, n_heads, false)
}
