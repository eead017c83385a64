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

/// Every weight of a llama model with its shape (candle order) and, for Q and K, the head
/// count of llama.cpp's row permutation: the order llama.cpp's converter writes them.
pub(crate) fn llama_tensors(
    c: &crate::config::Config,
    has_output: bool,
) -> Vec<(W, Vec<usize>, Option<usize>)> {
    let (h, hd, nh, nkv, ff) = c.dims();
    let mut list = vec![(W::Embed, vec![c.vocab_size, h], None)];
    for l in 0..c.num_hidden_layers {
        list.push((W::AttnNorm(l), vec![h], None));
        list.push((W::Q(l), vec![nh * hd, h], Some(nh)));
        list.push((W::K(l), vec![nkv * hd, h], Some(nkv)));
        list.push((W::V(l), vec![nkv * hd, h], None));
        list.push((W::O(l), vec![h, nh * hd], None));
        list.push((W::FfnNorm(l), vec![h], None));
        list.push((W::Gate(l), vec![ff, h], None));
        list.push((W::Up(l), vec![ff, h], None));
        list.push((W::Down(l), vec![h, ff], None));
    }
    list.push((W::OutputNorm, vec![h], None));
    if has_output {
        list.push((W::Output, vec![c.vocab_size, h], None));
    }
    list
}

impl W {
    pub(crate) fn gguf_name(self) -> String {
        match self {
            W::Embed => "token_embd.weight".into(),
            W::OutputNorm => "output_norm.weight".into(),
            W::Output => "output.weight".into(),
            W::AttnNorm(l) => format!("blk.{l}.attn_norm.weight"),
            W::Q(l) => format!("blk.{l}.attn_q.weight"),
            W::K(l) => format!("blk.{l}.attn_k.weight"),
            W::V(l) => format!("blk.{l}.attn_v.weight"),
            W::O(l) => format!("blk.{l}.attn_output.weight"),
            W::FfnNorm(l) => format!("blk.{l}.ffn_norm.weight"),
            W::Gate(l) => format!("blk.{l}.ffn_gate.weight"),
            W::Up(l) => format!("blk.{l}.ffn_up.weight"),
            W::Down(l) => format!("blk.{l}.ffn_down.weight"),
            W::RopeFreqs => "rope_freqs.weight".into(),
        }
    }
    pub(crate) fn hf_name(self) -> String {
        match self {
            W::Embed => "model.embed_tokens.weight".into(),
            W::OutputNorm => "model.norm.weight".into(),
            W::Output => "lm_head.weight".into(),
            W::AttnNorm(l) => format!("model.layers.{l}.input_layernorm.weight"),
            W::Q(l) => format!("model.layers.{l}.self_attn.q_proj.weight"),
            W::K(l) => format!("model.layers.{l}.self_attn.k_proj.weight"),
            W::V(l) => format!("model.layers.{l}.self_attn.v_proj.weight"),
            W::O(l) => format!("model.layers.{l}.self_attn.o_proj.weight"),
            W::FfnNorm(l) => format!("model.layers.{l}.post_attention_layernorm.weight"),
            W::Gate(l) => format!("model.layers.{l}.mlp.gate_proj.weight"),
            W::Up(l) => format!("model.layers.{l}.mlp.up_proj.weight"),
            W::Down(l) => format!("model.layers.{l}.mlp.down_proj.weight"),
            W::RopeFreqs => "rope_freqs.weight".into(),
        }
    }
}

/// Rows of a head-major projection, permuted from GGUF's interleaved order back to HF's
/// rotate-half order: HF row `h*d + j*d/2 + i` is GGUF row `h*d + 2*i + j`.
pub(crate) fn unpermute_rows(data: &[u8], rows: usize, n_heads: usize) -> Vec<u8> {
    let row_bytes = data.len() / rows;
    let d = rows / n_heads;
    let mut out = vec![0u8; data.len()];
    for h in 0..n_heads {
        for j in 0..2 {
            for i in 0..d / 2 {
                let dst = h * d + j * (d / 2) + i;
                let src = h * d + 2 * i + j;
                out[dst * row_bytes..(dst + 1) * row_bytes]
                    .copy_from_slice(&data[src * row_bytes..(src + 1) * row_bytes]);
            }
        }
    }
    out
}

/// The inverse of [`unpermute_rows`]: HF order to GGUF order (used when writing GGUF).
pub fn permute_rows_for_gguf(data: &[u8], rows: usize, n_heads: usize) -> Vec<u8> {
    let row_bytes = data.len() / rows;
    let d = rows / n_heads;
    let mut out = vec![0u8; data.len()];
    for h in 0..n_heads {
        for j in 0..2 {
            for i in 0..d / 2 {
                let hf = h * d + j * (d / 2) + i;
                let gg = h * d + 2 * i + j;
                out[gg * row_bytes..(gg + 1) * row_bytes]
                    .copy_from_slice(&data[hf * row_bytes..(hf + 1) * row_bytes]);
            }
        }
    }
    out
}
