//! `Sampler`.

use std::sync::Mutex;

use llama_core::SamplerConfig;
use pyo3::prelude::*;

use crate::errors::IntoPy;
use crate::handles::Sampler;

#[pymethods]
impl Sampler {
    #[new]
    #[pyo3(signature = (temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.0, repeat_last_n=64, frequency_penalty=0.0, presence_penalty=0.0, logit_bias=None, seed=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        temperature: f32,
        top_k: i32,
        top_p: f32,
        min_p: f32,
        repeat_penalty: f32,
        repeat_last_n: i32,
        frequency_penalty: f32,
        presence_penalty: f32,
        logit_bias: Option<std::collections::HashMap<u32, f32>>,
        seed: Option<u64>,
    ) -> PyResult<Self> {
        let cfg = SamplerConfig::default()
            .temperature(temperature)
            .top_k(top_k)
            .top_p(top_p)
            .min_p(min_p)
            .repeat_penalty(repeat_penalty)
            .repeat_last_n(repeat_last_n)
            .frequency_penalty(frequency_penalty)
            .presence_penalty(presence_penalty)
            .seed_opt(seed)
            .logit_bias(logit_bias.unwrap_or_default());
        Ok(Sampler {
            inner: Mutex::new(llama_core::Sampler::new(cfg).py_err()?),
        })
    }

    /// A sampler that always picks the most likely token.
    #[staticmethod]
    fn greedy() -> Self {
        Sampler {
            inner: Mutex::new(llama_core::Sampler::greedy()),
        }
    }

    /// Picks the next token from the session's last logits.
    fn sample(&self, py: Python<'_>, session: &crate::handles::Session) -> PyResult<u32> {
        py.detach(|| {
            let mut smp = self.lock()?;
            let guard = session.lock()?;
            let s = guard.as_ref().ok_or_else(crate::handles::closed)?;
            s.sample(&mut smp).py_err()
        })
    }

    fn __repr__(&self) -> PyResult<String> {
        let s = self.lock()?;
        let c = s.config();
        Ok(format!(
            "Sampler(temperature={}, top_k={}, top_p={}, min_p={}, repeat_penalty={}, repeat_last_n={}, seed={})",
            c.temperature,
            c.top_k,
            c.top_p,
            c.min_p,
            c.repeat_penalty,
            c.repeat_last_n,
            c.seed.map_or("None".to_string(), |s| s.to_string())
        ))
    }
}
