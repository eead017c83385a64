//! Helpers shared by the unit tests.

/// `n` pseudo-random values in `[-1, 1]` (xorshift32 from `seed`): the same data on every run.
pub(crate) fn values(n: usize, seed: u32) -> Vec<f32> {
    let mut s = seed | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s as f32 / u32::MAX as f32) * 2.0 - 1.0
        })
        .collect()
}

/// A candle result's values, flattened (test shorthand).
pub(crate) trait Flat {
    fn flat(self) -> Vec<f32>;
}

impl Flat for candle_core::Result<candle_core::Tensor> {
    fn flat(self) -> Vec<f32> {
        self.unwrap().flatten_all().unwrap().to_vec1().unwrap()
    }
}

impl Flat for crate::error::Result<candle_core::Tensor> {
    fn flat(self) -> Vec<f32> {
        self.unwrap().flatten_all().unwrap().to_vec1().unwrap()
    }
}

/// A small Llama configuration (2 layers, 4/2 heads of 8, ffn 48, vocab 64).
pub(crate) fn tiny_config() -> crate::config::Config {
    let j = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 64,
        "max_position_embeddings": 128,
        "rms_norm_eps": 1e-5,
    });
    crate::config::Config::from_hf_value(&j, std::path::Path::new("tiny/config.json"))
        .expect("a valid configuration")
}
