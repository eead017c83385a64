//! A LoRA adapter on the real SmolLM2-135M-Instruct Q4_1 file against llama.cpp (fixture made
//! by tests/reference/lora_reference.py): the same random adapter, rebuilt here bit for bit
//! from its hash recipe, as a GGUF LoRA file and as a PEFT folder, gives llama.cpp's greedy
//! tokens under the near-tie rule, and visibly changes them.

mod common;

use std::collections::HashMap;

use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};
use common::*;
use llama_core::convert::{write_gguf, GgufTensor};
use llama_core::{
    permute_rows_for_gguf, Adapter, GenerateOptions, Model, ModelOptions, Sampler, SessionOptions,
};

fn fixture() -> serde_json::Value {
    let p = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/reference/smollm2_lora.json"
    );
    serde_json::from_str(&std::fs::read_to_string(p).expect("fixture")).expect("valid JSON")
}

/// The fixture's values: splitmix64(seed + k*G + i*M1), top 24 bits, centred, times amp.
fn hashed(seed: u64, k: u64, n: usize, amp: f64) -> Vec<f32> {
    const M1: u64 = 0xBF58476D1CE4E5B9;
    const M2: u64 = 0x94D049BB133111EB;
    const G: u64 = 0x9E3779B97F4A7C15;
    let base = seed.wrapping_add(k.wrapping_mul(G));
    (0..n as u64)
        .map(|i| {
            let mut x = base.wrapping_add(i.wrapping_mul(M1));
            x ^= x >> 30;
            x = x.wrapping_mul(M1);
            x ^= x >> 27;
            x = x.wrapping_mul(M2);
            x ^= x >> 31;
            (((x >> 40) as f64 / (1u64 << 24) as f64 - 0.5) * amp) as f32
        })
        .collect()
}

/// `(layer, HF module, GGUF name, permuted heads, A, B in HF order)`.
type Pair = (usize, String, String, Option<usize>, Vec<f32>, Vec<f32>);

fn adapter_values(m: &Model, a: &serde_json::Value) -> Vec<Pair> {
    let c = m.config();
    let (h, hd, nh, nkv, ff) = (
        c.hidden_size,
        c.head_dim,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.intermediate_size,
    );
    let rank = a["rank"].as_u64().unwrap() as usize;
    let seed = a["seed"].as_u64().unwrap();
    let (amp_a, amp_b) = (a["amp_a"].as_f64().unwrap(), a["amp_b"].as_f64().unwrap());
    let targets = [
        ("self_attn.q_proj", "attn_q", nh * hd, h, Some(nh)),
        ("self_attn.k_proj", "attn_k", nkv * hd, h, Some(nkv)),
        ("self_attn.v_proj", "attn_v", nkv * hd, h, None),
        ("self_attn.o_proj", "attn_output", h, nh * hd, None),
        ("mlp.gate_proj", "ffn_gate", ff, h, None),
        ("mlp.up_proj", "ffn_up", ff, h, None),
        ("mlp.down_proj", "ffn_down", h, ff, None),
    ];
    let mut out = vec![];
    for l in 0..c.num_hidden_layers {
        for (ti, (module, g, o, i, heads)) in targets.iter().enumerate() {
            let k = ((l * 7 + ti) * 2) as u64;
            out.push((
                l,
                format!("model.layers.{l}.{module}"),
                format!("blk.{l}.{g}.weight"),
                *heads,
                hashed(seed, k, rank * i, amp_a),
                hashed(seed, k + 1, o * rank, amp_b),
            ));
        }
    }
    out
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn greedy(m: &Model, adapters: &[(Adapter, f32)], prompt: &[u32], n: usize) -> Vec<u32> {
    let mut s = m.session(SessionOptions::default()).unwrap();
    s.set_adapters(adapters).unwrap();
    let g = s
        .generate(
            prompt,
            &mut Sampler::greedy(),
            GenerateOptions::default().max_tokens(n),
            |_| std::ops::ControlFlow::Continue(()),
        )
        .unwrap();
    g.tokens
}

#[test]
fn a_random_lora_matches_llama_cpp_on_the_real_model() {
    let r = reference();
    let f = fixture();
    let threshold = near_tie_threshold(&r);
    let m = Model::load(real_model_path(), ModelOptions::default()).unwrap();
    let a = &f["adapter"];
    let pairs = adapter_values(&m, a);
    // The recipe gives the fixture's values.
    let sum = |sel: fn(&Pair) -> &Vec<f32>| -> f64 {
        pairs
            .iter()
            .map(|p| sel(p).iter().map(|&v| v as f64).sum::<f64>())
            .sum()
    };
    assert_eq!(sum(|p| &p.4), a["sum_a"].as_f64().unwrap());
    assert_eq!(sum(|p| &p.5), a["sum_b"].as_f64().unwrap());
    let rank = a["rank"].as_u64().unwrap() as usize;
    let alpha = a["alpha"].as_f64().unwrap() as f32;
    let dir = tempfile::tempdir().unwrap();
    // As llama.cpp's converter lays it out: Q/K lora_b rows permuted.
    let mut tensors = vec![];
    for (_, _, g, heads, av, bv) in &pairs {
        let out = bv.len() / rank;
        let mut b = f32_bytes(bv);
        if let Some(h) = heads {
            b = permute_rows_for_gguf(&b, out, *h);
        }
        tensors.push(GgufTensor {
            name: format!("{g}.lora_a"),
            shape: vec![rank, av.len() / rank],
            dtype: GgmlDType::F32,
            data: f32_bytes(av),
        });
        tensors.push(GgufTensor {
            name: format!("{g}.lora_b"),
            shape: vec![out, rank],
            dtype: GgmlDType::F32,
            data: b,
        });
    }
    let meta = common::adapter_gguf_meta(alpha);
    let gg = dir.path().join("lora.gguf");
    write_gguf(&gg, &meta, &tensors).unwrap();
    // The same adapter as a PEFT folder (HF row order).
    let peft = dir.path().join("peft");
    std::fs::create_dir_all(&peft).unwrap();
    let cfg = serde_json::json!({"peft_type": "LORA", "r": rank, "lora_alpha": alpha,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]});
    std::fs::write(peft.join("adapter_config.json"), cfg.to_string()).unwrap();
    let mut map = HashMap::new();
    for (_, module, _, _, av, bv) in &pairs {
        let dev = &Device::Cpu;
        map.insert(
            format!("base_model.model.{module}.lora_A.weight"),
            Tensor::from_vec(av.clone(), (rank, av.len() / rank), dev).unwrap(),
        );
        map.insert(
            format!("base_model.model.{module}.lora_B.weight"),
            Tensor::from_vec(bv.clone(), (bv.len() / rank, rank), dev).unwrap(),
        );
    }
    candle_core::safetensors::save(&map, peft.join("adapter_model.safetensors")).unwrap();

    let from_gguf = m.load_adapter(&gg).unwrap();
    let from_peft = m.load_adapter(&peft).unwrap();
    assert_eq!(from_gguf.n_matrices(), 7 * m.config().num_hidden_layers);
    let n = f["n"].as_u64().unwrap() as usize;
    let (mut failures, mut changed) = (vec![], 0);
    for ((base, lora), conv) in f["base"]
        .as_array()
        .unwrap()
        .iter()
        .zip(f["lora"].as_array().unwrap())
        .zip(f["converted"].as_array().unwrap())
    {
        let prompt = ids(&base["prompt_ids"]);
        let want = ids(&lora["ids"]);
        let margins = f32s(&lora["margins"]);
        if ids(&base["ids"]) != want {
            changed += 1;
        }
        for (name, a) in [("gguf", &from_gguf), ("peft", &from_peft)] {
            let ours = greedy(&m, &[(a.clone(), 1.0)], &prompt, n);
            match check_greedy(&ours, &want, &margins, threshold) {
                Ok(r) => println!("{name} {:.30?}: {r:?}", lora["prompt"]),
                Err(e) => failures.push(format!("{name} {:.30?}: {e}", lora["prompt"])),
            }
        }
        // llama.cpp ran the file `llama lora convert` made from the PEFT folder.
        if let Err(e) = check_greedy(&ids(&conv["ids"]), &want, &margins, threshold) {
            failures.push(format!("llama.cpp on the converted file: {e}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(
        changed >= 3,
        "the adapter changed only {changed} continuations"
    );
    // Our converter writes what llama.cpp read.
    let conv = dir.path().join("converted.gguf");
    llama_core::lora::write_gguf_lora(&conv, &from_peft, m.config()).unwrap();
    let again = m.load_adapter(&conv).unwrap();
    let p = ids(&f["lora"][0]["prompt_ids"]);
    assert_eq!(
        greedy(&m, &[(again, 1.0)], &p, n),
        greedy(&m, &[(from_gguf, 1.0)], &p, n)
    );
}
