//! `--lora PATH[:SCALE]` and `llama lora merge|convert`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::{Args, Subcommand, ValueEnum};
use llama_core::quantize::{merge_model, FileType, QuantizeOptions};
use llama_core::{Adapter, Model};

use crate::{bar, model_options, progress, AnyResult};

/// `PATH` or `PATH:SCALE` (a suffix that is not a number belongs to the path).
pub fn parse_spec(spec: &str) -> AnyResult<(PathBuf, f32)> {
    if let Some((p, s)) = spec.rsplit_once(':') {
        if let Ok(scale) = s.parse::<f32>() {
            if !scale.is_finite() {
                return Err(format!("--lora {spec}: the scale must be a finite number").into());
            }
            if p.is_empty() {
                return Err(format!("--lora {spec}: no path").into());
            }
            return Ok((PathBuf::from(p), scale));
        }
    }
    Ok((PathBuf::from(spec), 1.0))
}

/// Loads every `--lora` for `model`.
pub fn load_all(model: &Model, specs: &[String]) -> AnyResult<Vec<(Adapter, f32)>> {
    specs
        .iter()
        .map(|s| {
            let (path, scale) = parse_spec(s)?;
            let a = model
                .load_adapter(&path)
                .map_err(|e| format!("--lora {}: {e}", path.display()))?;
            eprintln!(
                "adapter {} ({}, {} matrices, rank up to {}, {} {:.1} MB, scale {scale})",
                path.display(),
                a.format().as_str(),
                a.n_matrices(),
                a.max_rank(),
                a.dtype(),
                a.n_bytes() as f64 / 1e6
            );
            Ok((a, scale))
        })
        .collect()
}

#[derive(Subcommand)]
pub enum LoraCmd {
    /// Write base + adapters as one model: a GGUF file of any `llama quantize` type, or a
    /// Hugging Face folder (--hf).
    Merge(MergeArgs),
    /// Convert a PEFT folder into a GGUF LoRA file llama.cpp loads, or a GGUF LoRA file into a
    /// PEFT folder (the direction follows the input).
    Convert(ConvertArgs),
}

#[derive(Clone, Copy, ValueEnum)]
pub enum HfType {
    F32,
    F16,
}

#[derive(Args)]
pub struct MergeArgs {
    /// The base model (a .gguf file or a Hugging Face folder).
    #[arg(short, long)]
    model: PathBuf,
    /// An adapter, PATH or PATH:SCALE (repeatable).
    #[arg(long = "lora", value_name = "PATH[:SCALE]", required = true)]
    lora: Vec<String>,
    /// The GGUF file (or, with --hf, the folder) to write.
    #[arg(short, long)]
    out: PathBuf,
    /// GGUF type: f32, f16, q8_0, q6_k, q5_k, q5_1, q5_0, q4_k, q4_1 or q4_0.
    #[arg(long = "type", default_value = "f16")]
    ty: String,
    /// Write a Hugging Face folder instead, with weights of this type.
    #[arg(long, value_enum)]
    hf: Option<HfType>,
}

#[derive(Args)]
pub struct ConvertArgs {
    /// The base model the adapter belongs to (for shapes and the Q/K row order).
    #[arg(short, long)]
    model: PathBuf,
    /// A PEFT folder or a GGUF LoRA file.
    input: PathBuf,
    /// A .gguf file (from PEFT) or a folder (from GGUF).
    output: PathBuf,
}

fn load_model(path: &Path) -> AnyResult<Model> {
    let b = bar("loading");
    let m = Model::load(
        path,
        model_options().with_progress(|p| {
            progress(&b, p.loaded, p.total);
            std::ops::ControlFlow::Continue(())
        }),
    )?;
    b.finish_and_clear();
    Ok(m)
}

pub fn run(cmd: LoraCmd, threads: Option<usize>) -> AnyResult<()> {
    match cmd {
        LoraCmd::Merge(a) => {
            let model = load_model(&a.model)?;
            let adapters = load_all(&model, &a.lora)?;
            let t0 = Instant::now();
            let b = bar("merging");
            match a.hf {
                Some(t) => {
                    let ty = match t {
                        HfType::F32 => FileType::F32,
                        HfType::F16 => FileType::F16,
                    };
                    let r =
                        llama_core::convert::export_hf(&a.model, &a.out, ty, &adapters, |i, n| {
                            progress(&b, i, n)
                        });
                    b.finish_and_clear();
                    r?;
                }
                None => {
                    let mut opts = QuantizeOptions::new(FileType::parse(&a.ty)?);
                    opts.threads = threads.unwrap_or(0);
                    let r = merge_model(&a.model, &a.out, &opts, &adapters, |i, n| {
                        progress(&b, i, n)
                    });
                    b.finish_and_clear();
                    r?;
                }
            }
            eprintln!(
                "wrote {} in {:.1}s",
                a.out.display(),
                t0.elapsed().as_secs_f64()
            );
            Ok(())
        }
        LoraCmd::Convert(a) => {
            let model = load_model(&a.model)?;
            let adapter = model
                .load_adapter(&a.input)
                .map_err(|e| format!("{}: {e}", a.input.display()))?;
            match adapter.format() {
                llama_core::AdapterFormat::Peft => {
                    llama_core::lora::write_gguf_lora(&a.output, &adapter, model.config())?;
                }
                llama_core::AdapterFormat::Gguf => {
                    let base = a.model.display().to_string();
                    llama_core::lora::write_peft(&a.output, &adapter, &base)?;
                }
            }
            eprintln!(
                "wrote {} ({} matrices)",
                a.output.display(),
                adapter.n_matrices()
            );
            Ok(())
        }
    }
}
