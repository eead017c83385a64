//! Tiny random-weight Llama models written by the tests themselves, in both formats: a Hugging
//! Face folder (HF row order) and a GGUF file with the same weights (Q/K permuted as llama.cpp's
//! converter does), plus an independent f64 reference forward pass.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};
use llama_core::convert::{write_gguf, GgufTensor};
use llama_core::gguf::Value;
use llama_core::permute_rows_for_gguf;

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Vocab {
    Bpe,
    Spm,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Scaling {
    None,
    Linear(f64),
    Dynamic(f64),
    Llama3 {
        factor: f64,
        low: f64,
        high: f64,
        orig: f64,
    },
}

#[derive(Clone, Debug)]
pub struct Spec {
    pub vocab: Vocab,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub ff: usize,
    pub theta: f64,
    pub scaling: Scaling,
    pub tie: bool,
    pub max_pos: usize,
    pub eps: f64,
    pub seed: u64,
}

impl Default for Spec {
    fn default() -> Self {
        Spec {
            vocab: Vocab::Bpe,
            hidden: 64,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            head_dim: 16,
            ff: 96,
            theta: 10000.0,
            scaling: Scaling::None,
            tie: false,
            max_pos: 256,
            eps: 1e-5,
            seed: 7,
        }
    }
}

impl Spec {
    /// A spec whose inner dimensions are 256 (the hidden size, and the FFN width `ff`, a
    /// multiple of 256), so the k-quants' 256-element super-blocks fit; GQA with 64-wide heads.
    #[allow(dead_code)]
    pub fn kquant_sized(ff: usize, seed: u64) -> Spec {
        Spec {
            hidden: 256,
            ff,
            heads: 4,
            kv_heads: 2,
            head_dim: 64,
            seed,
            ..Default::default()
        }
    }
}

pub struct Tiny {
    pub dir: tempfile::TempDir,
    pub hf: PathBuf,
    pub gguf: PathBuf,
    pub spec: Spec,
    pub vocab_size: usize,
    /// HF names, HF row order, row-major.
    pub weights: HashMap<String, (Vec<usize>, Vec<f32>)>,
}

fn bytes_to_unicode() -> Vec<char> {
    let mut bs: Vec<u32> = (33..=126).chain(161..=172).chain(174..=255).collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut map = vec![' '; 256];
    for (b, c) in bs.iter().zip(cs) {
        map[*b as usize] = char::from_u32(c).unwrap();
    }
    map
}

/// (tokens, token types, scores, merges)
fn vocab(kind: Vocab) -> (Vec<String>, Vec<i32>, Vec<f32>, Vec<String>) {
    match kind {
        Vocab::Bpe => {
            let mut tokens: Vec<String> = vec![
                "<|endoftext|>".into(),
                "<|im_start|>".into(),
                "<|im_end|>".into(),
            ];
            let mut types = vec![3, 3, 3];
            for c in bytes_to_unicode() {
                tokens.push(c.to_string());
                types.push(1);
            }
            let merges: Vec<String> = [
                "Ġ t", "h e", "Ġt he", "l l", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld", "e ll",
                "h ell", "hell o",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            for m in &merges {
                tokens.push(m.replace(' ', ""));
                types.push(1);
            }
            let n = tokens.len();
            (tokens, types, vec![0.0; n], merges)
        }
        Vocab::Spm => {
            let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
            let mut types = vec![2, 3, 3];
            let mut scores = vec![0.0, 0.0, 0.0];
            for b in 0..256 {
                tokens.push(format!("<0x{b:02X}>"));
                types.push(6);
                scores.push(0.0);
            }
            let pieces = [
                "▁", "t", "h", "e", "l", "o", "w", "r", "d", "a", "n", "▁t", "he", "▁the", "ll",
                "▁w", "or", "▁wor", "ld", "▁world", "▁h", "▁he", "▁hell", "▁hello", "▁a", "▁an",
                "an", "nd", "▁and", "ell", "hell", "hello", "el",
            ];
            for (i, p) in pieces.iter().enumerate() {
                tokens.push(p.to_string());
                types.push(1);
                scores.push(-(i as f32));
            }
            (tokens, types, scores, vec![])
        }
    }
}

/// A small deterministic generator of values in [-1, 1).
pub struct Rng(pub u64);
#[allow(dead_code)]
impl Rng {
    pub fn next(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    pub fn vec(&mut self, n: usize, scale: f32, offset: f32) -> Vec<f32> {
        (0..n).map(|_| offset + scale * self.next()).collect()
    }
}

pub const CHAT_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// inv_freq for a spec, computed directly from the formulas (f64).
pub fn inv_freq(spec: &Spec, seq_len: usize) -> Vec<f64> {
    let d = spec.head_dim as f64;
    let base = match spec.scaling {
        Scaling::Dynamic(f) if seq_len > spec.max_pos => {
            spec.theta
                * ((f * seq_len as f64 / spec.max_pos as f64) - (f - 1.0)).powf(d / (d - 2.0))
        }
        _ => spec.theta,
    };
    (0..spec.head_dim / 2)
        .map(|i| {
            let f = 1.0 / base.powf(2.0 * i as f64 / d);
            match spec.scaling {
                Scaling::Linear(k) => f / k,
                Scaling::Llama3 {
                    factor,
                    low,
                    high,
                    orig,
                } => {
                    let wl = 2.0 * std::f64::consts::PI / f;
                    if wl < orig / high {
                        f
                    } else if wl > orig / low {
                        f / factor
                    } else {
                        let s = (orig / wl - low) / (high - low);
                        (1.0 - s) * f / factor + s * f
                    }
                }
                _ => f,
            }
        })
        .collect()
}

pub fn build(spec: Spec) -> Tiny {
    let dir = tempfile::tempdir().unwrap();
    let (tokens, types, scores, merges) = vocab(spec.vocab);
    let vs = tokens.len();
    let (h, hd, nh, nkv, ff) = (
        spec.hidden,
        spec.head_dim,
        spec.heads,
        spec.kv_heads,
        spec.ff,
    );
    let mut rng = Rng(spec.seed);
    let mut w: HashMap<String, (Vec<usize>, Vec<f32>)> = HashMap::new();
    let mut put = |name: String, shape: Vec<usize>, scale: f32, offset: f32, rng: &mut Rng| {
        let n = shape.iter().product();
        w.insert(name, (shape, rng.vec(n, scale, offset)));
    };
    put(
        "model.embed_tokens.weight".into(),
        vec![vs, h],
        1.0,
        0.0,
        &mut rng,
    );
    for l in 0..spec.layers {
        let p = format!("model.layers.{l}");
        put(
            format!("{p}.input_layernorm.weight"),
            vec![h],
            0.2,
            1.0,
            &mut rng,
        );
        put(
            format!("{p}.self_attn.q_proj.weight"),
            vec![nh * hd, h],
            0.3,
            0.0,
            &mut rng,
        );
        put(
            format!("{p}.self_attn.k_proj.weight"),
            vec![nkv * hd, h],
            0.3,
            0.0,
            &mut rng,
        );
        put(
            format!("{p}.self_attn.v_proj.weight"),
            vec![nkv * hd, h],
            0.3,
            0.0,
            &mut rng,
        );
        put(
            format!("{p}.self_attn.o_proj.weight"),
            vec![h, nh * hd],
            0.3,
            0.0,
            &mut rng,
        );
        put(
            format!("{p}.post_attention_layernorm.weight"),
            vec![h],
            0.2,
            1.0,
            &mut rng,
        );
        put(
            format!("{p}.mlp.gate_proj.weight"),
            vec![ff, h],
            0.3,
            0.0,
            &mut rng,
        );
        put(
            format!("{p}.mlp.up_proj.weight"),
            vec![ff, h],
            0.3,
            0.0,
            &mut rng,
        );
        put(
            format!("{p}.mlp.down_proj.weight"),
            vec![h, ff],
            0.3,
            0.0,
            &mut rng,
        );
    }
    put("model.norm.weight".into(), vec![h], 0.2, 1.0, &mut rng);
    if !spec.tie {
        put("lm_head.weight".into(), vec![vs, h], 0.5, 0.0, &mut rng);
    }

    // GGUF
    let (bos, eos, add_bos) = match spec.vocab {
        Vocab::Bpe => (0u32, 2u32, false),
        Vocab::Spm => (1, 2, true),
    };
    let mut meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String("llama".into())),
        ("general.name".into(), Value::String("tiny".into())),
        ("llama.block_count".into(), Value::U32(spec.layers as u32)),
        (
            "llama.context_length".into(),
            Value::U32(spec.max_pos as u32),
        ),
        ("llama.embedding_length".into(), Value::U32(h as u32)),
        ("llama.feed_forward_length".into(), Value::U32(ff as u32)),
        ("llama.attention.head_count".into(), Value::U32(nh as u32)),
        (
            "llama.attention.head_count_kv".into(),
            Value::U32(nkv as u32),
        ),
        ("llama.attention.key_length".into(), Value::U32(hd as u32)),
        ("llama.attention.value_length".into(), Value::U32(hd as u32)),
        ("llama.rope.dimension_count".into(), Value::U32(hd as u32)),
        ("llama.rope.freq_base".into(), Value::F32(spec.theta as f32)),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            Value::F32(spec.eps as f32),
        ),
        ("llama.vocab_size".into(), Value::U32(vs as u32)),
        (
            "tokenizer.ggml.model".into(),
            Value::String(
                match spec.vocab {
                    Vocab::Bpe => "gpt2",
                    Vocab::Spm => "llama",
                }
                .into(),
            ),
        ),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(tokens.iter().map(|t| Value::String(t.clone())).collect()),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(types.iter().map(|&t| Value::I32(t)).collect()),
        ),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(bos)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(eos)),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(add_bos)),
        (
            "tokenizer.chat_template".into(),
            Value::String(CHAT_TEMPLATE.into()),
        ),
    ];
    match spec.vocab {
        Vocab::Bpe => {
            meta.push(("tokenizer.ggml.pre".into(), Value::String("smollm".into())));
            meta.push((
                "tokenizer.ggml.merges".into(),
                Value::Array(merges.iter().map(|m| Value::String(m.clone())).collect()),
            ));
        }
        Vocab::Spm => {
            meta.push((
                "tokenizer.ggml.scores".into(),
                Value::Array(scores.iter().map(|&s| Value::F32(s)).collect()),
            ));
            meta.push(("tokenizer.ggml.unknown_token_id".into(), Value::U32(0)));
        }
    }
    if let Scaling::Linear(f) = spec.scaling {
        meta.push((
            "llama.rope.scaling.type".into(),
            Value::String("linear".into()),
        ));
        meta.push(("llama.rope.scaling.factor".into(), Value::F32(f as f32)));
    }
    let f32_bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let mut tensors = vec![];
    let mut gg = |name: &str, hf: &str, perm: Option<usize>| {
        let (shape, data) = &w[hf];
        let mut bytes = f32_bytes(data);
        if let Some(heads) = perm {
            bytes = permute_rows_for_gguf(&bytes, shape[0], heads);
        }
        tensors.push(GgufTensor {
            name: name.into(),
            shape: shape.clone(),
            dtype: GgmlDType::F32,
            data: bytes,
        });
    };
    gg("token_embd.weight", "model.embed_tokens.weight", None);
    for l in 0..spec.layers {
        let p = format!("model.layers.{l}");
        gg(
            &format!("blk.{l}.attn_norm.weight"),
            &format!("{p}.input_layernorm.weight"),
            None,
        );
        gg(
            &format!("blk.{l}.attn_q.weight"),
            &format!("{p}.self_attn.q_proj.weight"),
            Some(nh),
        );
        gg(
            &format!("blk.{l}.attn_k.weight"),
            &format!("{p}.self_attn.k_proj.weight"),
            Some(nkv),
        );
        gg(
            &format!("blk.{l}.attn_v.weight"),
            &format!("{p}.self_attn.v_proj.weight"),
            None,
        );
        gg(
            &format!("blk.{l}.attn_output.weight"),
            &format!("{p}.self_attn.o_proj.weight"),
            None,
        );
        gg(
            &format!("blk.{l}.ffn_norm.weight"),
            &format!("{p}.post_attention_layernorm.weight"),
            None,
        );
        gg(
            &format!("blk.{l}.ffn_gate.weight"),
            &format!("{p}.mlp.gate_proj.weight"),
            None,
        );
        gg(
            &format!("blk.{l}.ffn_up.weight"),
            &format!("{p}.mlp.up_proj.weight"),
            None,
        );
        gg(
            &format!("blk.{l}.ffn_down.weight"),
            &format!("{p}.mlp.down_proj.weight"),
            None,
        );
    }
    gg("output_norm.weight", "model.norm.weight", None);
    if !spec.tie {
        gg("output.weight", "lm_head.weight", None);
    }
    if let Scaling::Llama3 { .. } = spec.scaling {
        // As llama.cpp's converter: per-dimension divisors base_freq / scaled_freq.
        let plain = inv_freq(
            &Spec {
                scaling: Scaling::None,
                ..spec.clone()
            },
            0,
        );
        let scaled = inv_freq(&spec, 0);
        let factors: Vec<f32> = plain
            .iter()
            .zip(&scaled)
            .map(|(p, s)| (p / s) as f32)
            .collect();
        tensors.push(GgufTensor {
            name: "rope_freqs.weight".into(),
            shape: vec![hd / 2],
            dtype: GgmlDType::F32,
            data: f32_bytes(&factors),
        });
    }
    let gguf = dir.path().join("tiny.gguf");
    write_gguf(&gguf, &meta, &tensors).unwrap();

    // HF folder
    let hf = dir.path().join("hf");
    std::fs::create_dir_all(&hf).unwrap();
    let map: HashMap<String, Tensor> = w
        .iter()
        .map(|(k, (shape, data))| {
            (
                k.clone(),
                Tensor::from_vec(data.clone(), shape.clone(), &Device::Cpu).unwrap(),
            )
        })
        .collect();
    candle_core::safetensors::save(&map, hf.join("model.safetensors")).unwrap();
    let mut cfg = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vs, "hidden_size": h,
        "intermediate_size": ff, "num_hidden_layers": spec.layers, "num_attention_heads": nh,
        "num_key_value_heads": nkv, "head_dim": hd, "rope_theta": spec.theta, "rms_norm_eps": spec.eps,
        "max_position_embeddings": spec.max_pos, "tie_word_embeddings": spec.tie, "bos_token_id": bos, "eos_token_id": eos,
    });
    cfg["rope_scaling"] = match spec.scaling {
        Scaling::None => serde_json::Value::Null,
        Scaling::Linear(f) => serde_json::json!({"type": "linear", "factor": f}),
        Scaling::Dynamic(f) => serde_json::json!({"type": "dynamic", "factor": f}),
        Scaling::Llama3 {
            factor,
            low,
            high,
            orig,
        } => serde_json::json!({"rope_type": "llama3", "factor": factor,
            "low_freq_factor": low, "high_freq_factor": high, "original_max_position_embeddings": orig}),
    };
    std::fs::write(hf.join("config.json"), cfg.to_string()).unwrap();
    // tokenizer.json: the tokenizer the GGUF metadata describes, serialized by `tokenizers`.
    let g = llama_core::gguf::GgufFile::open(&gguf).unwrap();
    let tok = llama_core::Tokenizer::from_gguf(&g).unwrap();
    std::fs::write(
        hf.join("tokenizer.json"),
        tok.hf().to_string(false).unwrap(),
    )
    .unwrap();
    let tc = serde_json::json!({"add_bos_token": add_bos, "bos_token": tokens[bos as usize], "eos_token": tokens[eos as usize], "chat_template": CHAT_TEMPLATE});
    std::fs::write(hf.join("tokenizer_config.json"), tc.to_string()).unwrap();
    Tiny {
        dir,
        hf,
        gguf,
        spec,
        vocab_size: vs,
        weights: w,
    }
}

fn matvec(w: &(Vec<usize>, Vec<f32>), x: &[f64]) -> Vec<f64> {
    let (rows, cols) = (w.0[0], w.0[1]);
    (0..rows)
        .map(|r| (0..cols).map(|c| w.1[r * cols + c] as f64 * x[c]).sum())
        .collect()
}

fn rmsnorm(x: &[f64], w: &(Vec<usize>, Vec<f32>), eps: f64) -> Vec<f64> {
    let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let s = 1.0 / (ms + eps).sqrt();
    x.iter().zip(&w.1).map(|(v, g)| v * s * *g as f64).collect()
}

/// Independent f64 forward pass over all positions (HF conventions: rotate-half RoPE).
pub fn reference_logits(t: &Tiny, tokens: &[u32]) -> Vec<Vec<f64>> {
    reference_logits_with(&t.spec, &t.weights, tokens)
}

/// [`reference_logits`] with other weights (HF names and row order), e.g. merged adapters.
pub fn reference_logits_with(
    s: &Spec,
    w: &HashMap<String, (Vec<usize>, Vec<f32>)>,
    tokens: &[u32],
) -> Vec<Vec<f64>> {
    reference_logits_lora(s, w, None, tokens)
}

/// LoRA values in f64: `[layer][target (Q, K, V, O, Gate, Up, Down)] -> (A [r, in], B [out, r])`.
pub type Lora64 = Vec<Vec<Option<(Vec<f64>, Vec<f64>)>>>;

/// `W x`, plus `scale * B (A x)` when the projection has LoRA values.
fn proj(
    w: &(Vec<usize>, Vec<f32>),
    lora: Option<&(Vec<f64>, Vec<f64>)>,
    scale: f64,
    x: &[f64],
) -> Vec<f64> {
    let mut y = matvec(w, x);
    if let Some((a, b)) = lora {
        let k = x.len();
        let r = a.len() / k;
        let u: Vec<f64> = (0..r)
            .map(|j| (0..k).map(|i| a[j * k + i] * x[i]).sum())
            .collect();
        for (o, yo) in y.iter_mut().enumerate() {
            *yo += scale * (0..r).map(|j| b[o * r + j] * u[j]).sum::<f64>();
        }
    }
    y
}

/// [`reference_logits_with`] with LoRA applied as `W x + scale * B (A x)` (f64 throughout).
pub fn reference_logits_lora(
    s: &Spec,
    w: &HashMap<String, (Vec<usize>, Vec<f32>)>,
    lora: Option<(&Lora64, f64)>,
    tokens: &[u32],
) -> Vec<Vec<f64>> {
    let lp = |l: usize, t: usize, x: &[f64], name: &str| -> Vec<f64> {
        let (ad, sc) = match lora {
            Some((lo, sc)) => (lo[l][t].as_ref(), sc),
            None => (None, 0.0),
        };
        proj(&w[&format!("model.layers.{l}.{name}.weight")], ad, sc, x)
    };
    let (h, hd, nh, nkv) = (s.hidden, s.head_dim, s.heads, s.kv_heads);
    let inv = inv_freq(s, tokens.len());
    let emb = &w["model.embed_tokens.weight"];
    let mut xs: Vec<Vec<f64>> = tokens
        .iter()
        .map(|&id| {
            emb.1[id as usize * h..(id as usize + 1) * h]
                .iter()
                .map(|&v| v as f64)
                .collect()
        })
        .collect();
    let rope = |v: &mut [f64], pos: usize| {
        for i in 0..hd / 2 {
            let a = pos as f64 * inv[i];
            let (c, sn) = (a.cos(), a.sin());
            let (x0, x1) = (v[i], v[i + hd / 2]);
            v[i] = x0 * c - x1 * sn;
            v[i + hd / 2] = x1 * c + x0 * sn;
        }
    };
    for l in 0..s.layers {
        let p = format!("model.layers.{l}");
        let mut qs = vec![];
        let mut ks = vec![];
        let mut vs = vec![];
        for (pos, x) in xs.iter().enumerate() {
            let n = rmsnorm(x, &w[&format!("{p}.input_layernorm.weight")], s.eps);
            let mut q = lp(l, 0, &n, "self_attn.q_proj");
            let mut k = lp(l, 1, &n, "self_attn.k_proj");
            for hh in 0..nh {
                rope(&mut q[hh * hd..(hh + 1) * hd], pos);
            }
            for hh in 0..nkv {
                rope(&mut k[hh * hd..(hh + 1) * hd], pos);
            }
            qs.push(q);
            ks.push(k);
            vs.push(lp(l, 2, &n, "self_attn.v_proj"));
        }
        for i in 0..xs.len() {
            let mut att_out = vec![0f64; nh * hd];
            for hh in 0..nh {
                let kvh = hh / (nh / nkv);
                let q = &qs[i][hh * hd..(hh + 1) * hd];
                let scores: Vec<f64> = (0..=i)
                    .map(|j| {
                        q.iter()
                            .zip(&ks[j][kvh * hd..(kvh + 1) * hd])
                            .map(|(a, b)| a * b)
                            .sum::<f64>()
                            / (hd as f64).sqrt()
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|v| (v - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for (j, ej) in e.iter().enumerate() {
                    for d in 0..hd {
                        att_out[hh * hd + d] += ej / z * vs[j][kvh * hd + d];
                    }
                }
            }
            let o = lp(l, 3, &att_out, "self_attn.o_proj");
            for (a, b) in xs[i].iter_mut().zip(o) {
                *a += b;
            }
            let n = rmsnorm(
                &xs[i],
                &w[&format!("{p}.post_attention_layernorm.weight")],
                s.eps,
            );
            let g = lp(l, 4, &n, "mlp.gate_proj");
            let u = lp(l, 5, &n, "mlp.up_proj");
            let act: Vec<f64> = g
                .iter()
                .zip(&u)
                .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                .collect();
            let d = lp(l, 6, &act, "mlp.down_proj");
            for (a, b) in xs[i].iter_mut().zip(d) {
                *a += b;
            }
        }
    }
    let head = if s.tie {
        &w["model.embed_tokens.weight"]
    } else {
        &w["lm_head.weight"]
    };
    xs.iter()
        .map(|x| matvec(head, &rmsnorm(x, &w["model.norm.weight"], s.eps)))
        .collect()
}

/// Tensor `name` of `g` stored as `dtype`, with the values the stored tensor holds (as F32
/// bytes); 1-D tensors and `F32` are kept as they are (`None`).
pub fn stored_as(
    g: &llama_core::gguf::GgufFile,
    name: &str,
    dtype: GgmlDType,
) -> (GgufTensor, Option<GgufTensor>) {
    let (info, data) = g.tensor_data(name).unwrap();
    if info.shape.len() == 1 || dtype == GgmlDType::F32 {
        let t = GgufTensor {
            name: name.to_string(),
            shape: info.shape.clone(),
            dtype: info.dtype,
            data: data.to_vec(),
        };
        return (t, None);
    }
    let vals: Vec<f32> = data
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let tensor = Tensor::from_vec(vals, info.shape.clone(), &Device::Cpu).unwrap();
    let q = candle_core::quantized::QTensor::quantize(&tensor, dtype).unwrap();
    let back: Vec<u8> = q
        .dequantize(&Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    let stored = GgufTensor {
        name: name.to_string(),
        shape: info.shape.clone(),
        dtype,
        data: q.data().unwrap().to_vec(),
    };
    let values = GgufTensor {
        name: name.to_string(),
        shape: info.shape.clone(),
        dtype: GgmlDType::F32,
        data: back,
    };
    (stored, Some(values))
}

/// Writes `g` with its matrices stored as `dtype` to `DIR/{dtype:?}.gguf`, and the values those
/// stored matrices hold, as F32, to `DIR/{dtype:?}-dequantized.gguf`: the two files differ
/// only in storage. Returns their paths.
#[allow(dead_code)]
pub fn write_quantized_pair(
    g: &llama_core::gguf::GgufFile,
    dtype: GgmlDType,
    dir: &std::path::Path,
) -> (PathBuf, PathBuf) {
    let mut dequantized = vec![];
    let tensors: Vec<GgufTensor> = g
        .tensor_order
        .iter()
        .map(|name| {
            let (stored, values) = stored_as(g, name, dtype);
            dequantized.push(values.unwrap_or_else(|| stored.clone()));
            stored
        })
        .collect();
    let meta = metadata(g);
    let p = dir.join(format!("{dtype:?}.gguf"));
    write_gguf(&p, &meta, &tensors).unwrap();
    let pd = dir.join(format!("{dtype:?}-dequantized.gguf"));
    write_gguf(&pd, &meta, &dequantized).unwrap();
    (p, pd)
}

/// Every GGUF block type candle writes, besides F32: the formats tests and the logit hashes
/// run each.
pub const GGUF_TYPES: [GgmlDType; 12] = [
    GgmlDType::F16,
    GgmlDType::BF16,
    GgmlDType::Q8_0,
    GgmlDType::Q5_0,
    GgmlDType::Q5_1,
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q6K,
    GgmlDType::Q5K,
    GgmlDType::Q4K,
    GgmlDType::Q3K,
    GgmlDType::Q2K,
];

/// A GGUF file's metadata as `write_gguf` takes it.
pub fn metadata(g: &llama_core::gguf::GgufFile) -> Vec<(String, Value)> {
    g.metadata
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// A PEFT adapter on q, v and down of every layer, rank 2, with values from `seed`.
#[allow(dead_code)]
pub fn peft_adapter(t: &Tiny, dir: &std::path::Path, seed: u32) {
    use candle_core::{Device, Tensor};
    std::fs::create_dir_all(dir).unwrap();
    let s = &t.spec;
    let cfg = serde_json::json!({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
        "target_modules": ["q_proj", "v_proj", "down_proj"]});
    std::fs::write(dir.join("adapter_config.json"), cfg.to_string()).unwrap();
    let mut map = std::collections::HashMap::new();
    for l in 0..s.layers {
        for (m, out, inp) in [
            ("self_attn.q_proj", s.heads * s.head_dim, s.hidden),
            ("self_attn.v_proj", s.kv_heads * s.head_dim, s.hidden),
            ("mlp.down_proj", s.hidden, s.ff),
        ] {
            let vals = |n: usize, k: u32| {
                (0..n as u32)
                    .map(|i| (((i * 7 + k * 13 + seed * 29) % 11) as f32 - 5.0) / 20.0)
                    .collect::<Vec<_>>()
            };
            let p = format!("base_model.model.model.layers.{l}.{m}");
            map.insert(
                format!("{p}.lora_A.weight"),
                Tensor::from_vec(vals(2 * inp, 1), (2, inp), &Device::Cpu).unwrap(),
            );
            map.insert(
                format!("{p}.lora_B.weight"),
                Tensor::from_vec(vals(out * 2, 2), (out, 2), &Device::Cpu).unwrap(),
            );
        }
    }
    candle_core::safetensors::save(&map, dir.join("adapter_model.safetensors")).unwrap();
}
