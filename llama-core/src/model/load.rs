//! Loading: a GGUF file or a Hugging Face folder becomes a [`Model`] under the options' kernel
//! settings and pool (quantize-at-load included), with progress and cancellation.

use super::*;
use crate::weights::{open_gguf, open_hf, Parts};

fn fnv1a(h: &mut u64, bytes: &[u8]) {
    for &b in bytes {
        *h ^= b as u64;
        *h = h.wrapping_mul(0x100_0000_01b3);
    }
}

impl Model {
    /// Loads a model from a GGUF file or a Hugging Face folder (config.json, safetensors,
    /// tokenizer.json).
    pub fn load(path: impl AsRef<Path>, mut options: ModelOptions<'_>) -> Result<Model> {
        let path = path.as_ref();
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        let q = |t: Option<QuantType>| t.map(crate::types::FileType::Quant);
        let quantize = crate::types::TypeRules {
            base: q(options.quantize),
            output: q(options.quantize_output),
            embedding: q(options.quantize_embedding),
        };
        let settings = Settings::new(options.kernel, !options.keep_file_layout)?;
        let runtime = Runtime::new(settings, options.threads)?;
        let progress = options.progress.as_mut();
        let t0 = std::time::Instant::now();
        let model = runtime.run(|| {
            let parts = if meta.is_dir() {
                open_hf(path)?.into()
            } else {
                open_gguf_for_loading(path)?
            };
            Self::build(parts, progress, quantize, runtime)
        })?;
        tracing::info!(
            path = %path.display(),
            format = model.format(),
            weights = model.weight_type(),
            kernel = settings.kernel.as_str(),
            threads = runtime.threads(),
            secs = t0.elapsed().as_secs_f64(),
            "model loaded"
        );
        Ok(model)
    }

    fn build(
        parts: Parts,
        mut progress: Option<&mut ProgressFn<'_>>,
        quantize: crate::types::TypeRules,
        runtime: Runtime,
    ) -> Result<Model> {
        let Parts {
            src,
            config,
            tokenizer,
            chat_template,
            format,
        } = parts;
        let c = &config;
        let (h, hd) = (c.hidden_size, c.head_dim);
        let tied = !src.has(W::Output);
        let plan = crate::plan::Plan::new(c);
        // Every tensor of the plan, then the RoPE frequencies (present or not).
        let total = plan.tensors(!tied).len() + 1;
        let mut loaded = 0usize;
        let mut tick = |n: usize| -> Result<()> {
            loaded += n;
            if let Some(p) = progress.as_mut() {
                if p(&LoadProgress { loaded, total }).is_break() {
                    return Err(Error::Cancelled);
                }
            }
            Ok(())
        };
        if tokenizer.vocab_size() > c.vocab_size {
            tracing::debug!(
                tokenizer = tokenizer.vocab_size(),
                model = c.vocab_size,
                "tokenizer has more ids than the embedding"
            );
        }
        let is_gguf = matches!(src, WeightSource::Gguf(_));
        use crate::types::Role;
        let embed_role = if tied { Role::Output } else { Role::Embedding };
        let rules = &quantize;
        let embed = matrix::build(src.load_matmul(
            W::Embed,
            &[c.vocab_size, h],
            None,
            embed_role,
            rules,
        )?)?;
        tick(1)?;
        let mut layers = Vec::with_capacity(plan.layers.len());
        for (l, lp) in plan.layers.iter().enumerate() {
            // One stack per projection group; GGUF's Q/K rows un-permuted as they load.
            let mut stacks = Vec::new();
            for group in lp.groups() {
                let parts = group
                    .parts
                    .iter()
                    .map(|p| {
                        let perm = if is_gguf { p.rope_heads } else { None };
                        let w = p.target.weight(l);
                        src.load_matmul(w, &[p.n, p.k], perm, Role::Matrix, rules)
                    })
                    .collect::<Result<Vec<_>>>()?;
                stacks.push(Stack::new(
                    parts,
                    group.parts.iter().map(|p| p.n).collect(),
                )?);
            }
            layers.push(Layer {
                attn_norm: src.load_dense(W::AttnNorm(l), &[lp.hidden])?,
                ffn_norm: src.load_dense(W::FfnNorm(l), &[lp.hidden])?,
                stacks,
            });
            tick(lp.tensors(l).len())?;
        }
        let norm = src.load_dense(W::OutputNorm, &[h])?;
        tick(1)?;
        let lm_head = if tied {
            embed.clone()
        } else {
            let m = src.load_matmul(W::Output, &[c.vocab_size, h], None, Role::Output, rules)?;
            tick(1)?;
            matrix::build(m)?
        };
        let freq_factors = if is_gguf && src.has(W::RopeFreqs) {
            let t = src.load_dense(W::RopeFreqs, &[hd / 2])?;
            Some(t.to_vec1::<f32>()?)
        } else {
            None
        };
        tick(1)?;
        let rope = Rope::new(c, freq_factors.as_deref());
        // A dense f32 matrix reports the file's type (BF16 weights compute as f32).
        let weight_type = match layers
            .first()
            .and_then(|l| l.stacks.first())
            .and_then(|s| s.mats.first())
        {
            Some(m) if m.dtype() != candle_core::quantized::GgmlDType::F32 => {
                format!("{:?}", m.dtype())
            }
            _ => src.dtype_name(W::Q(0)).unwrap_or_default(),
        };
        let path = src.path().to_path_buf();
        // Fingerprint: configuration, load-time quantization and the first bytes of every
        // weight as stored (no dequantization at load).
        let mut fp = 0xcbf2_9ce4_8422_2325u64;
        fnv1a(&mut fp, format!("{c:?} {quantize:?}").as_bytes());
        for (l, lp) in plan.layers.iter().enumerate() {
            for p in lp.projections() {
                fnv1a(&mut fp, &src.raw_prefix(p.target.weight(l), 256));
            }
        }
        fnv1a(&mut fp, &src.raw_prefix(W::Embed, 256));
        fnv1a(&mut fp, &src.raw_prefix(W::Output, 256));
        drop(src);
        Ok(Model {
            inner: Arc::new(Inner {
                config,
                tokenizer,
                chat_template,
                path,
                format,
                weight_type,
                fingerprint: fp,
                plan,
                embed,
                layers,
                norm,
                lm_head,
                rope,
                device: Device::Cpu,
                adapters: Default::default(),
                constraints: Default::default(),
                runtime,
            }),
        })
    }
}

/// [`open_gguf`], with the vocabulary arrays (~10 MiB of strings for a 49k vocabulary, now in
/// the tokenizer) freed before the weights load, which lowers the load's peak memory.
fn open_gguf_for_loading(path: &Path) -> Result<Parts> {
    let mut parts = open_gguf(path)?;
    if let WeightSource::Gguf(g) = &mut parts.src {
        for key in [
            "tokenizer.ggml.tokens",
            "tokenizer.ggml.merges",
            "tokenizer.ggml.scores",
            "tokenizer.ggml.token_type",
        ] {
            g.metadata.remove(key);
        }
    }
    Ok(parts)
}
