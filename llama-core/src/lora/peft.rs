//! Hugging Face PEFT LoRA folders: `adapter_config.json` and `adapter_model.safetensors`
//! (`base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight` `[r, in]`, `lora_B`
//! `[out, r]`). The config's rules are PEFT's: `target_modules` a list (a module matches by
//! name or dotted suffix), a regex (full match) or `"all-linear"`; `exclude_modules` alike;
//! `layers_to_transform`; `rank_pattern` / `alpha_pattern` keys matched as PEFT does
//! (`(.*\.)?(key)$`, first key in file order wins); scale `alpha / r`, or `alpha / sqrt(r)` with
//! `use_rslora`.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{Device, Tensor};
use serde_json::Value as J;

use super::{Adapter, AdapterFormat, LoraPair, Parsed, RawPair, Target};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::weights::StFiles;

/// The largest adapter_config.json read (a real one is a few KiB).
const MAX_CONFIG_BYTES: u64 = 1 << 20;

enum Modules {
    List(Vec<String>),
    Regex(regex::Regex),
    AllLinear,
}

impl Modules {
    fn parse(v: &J, field: &str, path: &Path) -> Result<Option<Modules>> {
        Ok(match v {
            J::Null => None,
            J::String(s) if s == "all-linear" => Some(Modules::AllLinear),
            J::String(s) => Some(Modules::Regex(full_regex(s, field, path)?)),
            J::Array(items) => Some(Modules::List(
                items
                    .iter()
                    .map(|i| {
                        i.as_str().map(str::to_string).ok_or_else(|| {
                            Error::config(path, format!("{field} must list strings"))
                        })
                    })
                    .collect::<Result<_>>()?,
            )),
            _ => {
                return Err(Error::config(
                    path,
                    format!("{field} must be a list of names, a regex or \"all-linear\""),
                ))
            }
        })
    }

    /// Whether module `key` (`model.layers.3.self_attn.q_proj`) matches.
    fn matches(&self, key: &str) -> bool {
        match self {
            Modules::AllLinear => true,
            Modules::Regex(r) => r.is_match(key),
            Modules::List(names) => names
                .iter()
                .any(|n| key == n || key.ends_with(&format!(".{n}"))),
        }
    }
}

fn full_regex(s: &str, field: &str, path: &Path) -> Result<regex::Regex> {
    regex::RegexBuilder::new(&format!("^(?:{s})$"))
        .size_limit(1 << 20)
        .build()
        .map_err(|e| Error::config(path, format!("{field}: invalid regex {s:?}: {e}")))
}

/// `rank_pattern` / `alpha_pattern`: `(regex of (.*\.)?(key)$, value)` in file order.
fn patterns(v: &J, field: &str, path: &Path) -> Result<Vec<(regex::Regex, f64)>> {
    match v {
        J::Null => Ok(vec![]),
        J::Object(m) => m
            .iter()
            .map(|(k, v)| {
                let x = v
                    .as_f64()
                    .filter(|x| x.is_finite() && *x > 0.0)
                    .ok_or_else(|| {
                        Error::config(path, format!("{field}[{k:?}] must be a positive number"))
                    })?;
                let r = regex::RegexBuilder::new(&format!("^(?:.*\\.)?(?:{k})$"))
                    .size_limit(1 << 20)
                    .build()
                    .map_err(|e| Error::config(path, format!("{field}: invalid key {k:?}: {e}")))?;
                Ok((r, x))
            })
            .collect(),
        _ => Err(Error::config(path, format!("{field} must be an object"))),
    }
}

fn pattern_value(p: &[(regex::Regex, f64)], key: &str) -> Option<f64> {
    p.iter().find(|(r, _)| r.is_match(key)).map(|(_, v)| *v)
}

struct PeftConfig {
    r: usize,
    alpha: f64,
    rslora: bool,
    rank_pattern: Vec<(regex::Regex, f64)>,
    alpha_pattern: Vec<(regex::Regex, f64)>,
    targets: Modules,
    exclude: Option<Modules>,
    layers: Option<Vec<usize>>,
}

fn truthy(cfg: &serde_json::Map<String, J>, key: &str) -> bool {
    match cfg.get(key) {
        None | Some(J::Null) | Some(J::Bool(false)) => false,
        Some(J::Array(a)) => !a.is_empty(),
        Some(J::Object(o)) => !o.is_empty(),
        Some(J::String(s)) => !s.is_empty(),
        Some(_) => true,
    }
}

fn parse_config(path: &Path) -> Result<PeftConfig> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.len() > MAX_CONFIG_BYTES {
        return Err(Error::config(
            path,
            "adapter_config.json is larger than 1 MiB",
        ));
    }
    let text = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let v: J = serde_json::from_slice(&text)
        .map_err(|e| Error::config(path, format!("not valid JSON: {e}")))?;
    let J::Object(cfg) = v else {
        return Err(Error::config(
            path,
            "adapter_config.json must hold an object",
        ));
    };
    if let Some(t) = cfg.get("peft_type").and_then(|v| v.as_str()) {
        if !t.eq_ignore_ascii_case("lora") {
            return Err(Error::config(
                path,
                format!("peft_type is {t:?}: only LORA adapters are supported"),
            ));
        }
    }
    for (key, what) in [
        ("use_dora", "DoRA (use_dora)"),
        (
            "modules_to_save",
            "modules_to_save (full copies of modules)",
        ),
        ("lora_bias", "LoRA bias (lora_bias)"),
        (
            "alora_invocation_tokens",
            "activated LoRA (alora_invocation_tokens)",
        ),
        ("target_parameters", "target_parameters"),
        ("trainable_token_indices", "trainable_token_indices"),
    ] {
        if truthy(&cfg, key) {
            return Err(Error::config(path, format!("{what} is not supported")));
        }
    }
    match cfg.get("bias") {
        None | Some(J::Null) => {}
        Some(J::String(s)) if s == "none" => {}
        Some(b) => {
            return Err(Error::config(
                path,
                format!("bias is {b}: LoRA bias is not supported (only \"none\")"),
            ))
        }
    }
    if let Some(p) = cfg.get("layers_pattern") {
        let ok = match p {
            J::Null => true,
            J::String(s) => s == "layers",
            J::Array(a) => a.iter().all(|x| x.as_str() == Some("layers")),
            _ => false,
        };
        if !ok {
            return Err(Error::config(
                path,
                format!("layers_pattern {p} does not name a Llama model's `layers`"),
            ));
        }
    }
    let r = match cfg.get("r") {
        None | Some(J::Null) => 8,
        Some(v) => v
            .as_u64()
            .filter(|&r| r > 0 && r <= 1 << 16)
            .ok_or_else(|| Error::config(path, format!("r must be a positive integer, not {v}")))?
            as usize,
    };
    let alpha = match cfg.get("lora_alpha") {
        None | Some(J::Null) => 8.0,
        Some(v) => v
            .as_f64()
            .filter(|a| a.is_finite())
            .ok_or_else(|| Error::config(path, format!("lora_alpha must be a number, not {v}")))?,
    };
    let rslora = match cfg.get("use_rslora") {
        None | Some(J::Null) => false,
        Some(J::Bool(b)) => *b,
        Some(v) => {
            return Err(Error::config(
                path,
                format!("use_rslora must be a boolean, not {v}"),
            ))
        }
    };
    if cfg.get("fan_in_fan_out").and_then(|v| v.as_bool()) == Some(true) {
        // PEFT itself turns it off for nn.Linear (every Llama projection) with a warning.
        tracing::warn!(path = %path.display(), "fan_in_fan_out is set for Linear layers; ignored, as PEFT does");
    }
    let targets = Modules::parse(
        cfg.get("target_modules").unwrap_or(&J::Null),
        "target_modules",
        path,
    )?
    // PEFT's default for Llama.
    .unwrap_or_else(|| Modules::List(vec!["q_proj".into(), "v_proj".into()]));
    let exclude = Modules::parse(
        cfg.get("exclude_modules").unwrap_or(&J::Null),
        "exclude_modules",
        path,
    )?;
    let layers = match cfg.get("layers_to_transform") {
        None | Some(J::Null) => None,
        Some(J::Number(n)) => Some(vec![n
            .as_u64()
            .ok_or_else(|| Error::config(path, "layers_to_transform must hold layer indices"))?
            as usize]),
        Some(J::Array(a)) => Some(
            a.iter()
                .map(|x| {
                    x.as_u64().map(|x| x as usize).ok_or_else(|| {
                        Error::config(path, "layers_to_transform must hold layer indices")
                    })
                })
                .collect::<Result<_>>()?,
        ),
        Some(v) => {
            return Err(Error::config(
                path,
                format!("layers_to_transform must be an index or a list, not {v}"),
            ))
        }
    };
    Ok(PeftConfig {
        r,
        alpha,
        rslora,
        rank_pattern: patterns(
            cfg.get("rank_pattern").unwrap_or(&J::Null),
            "rank_pattern",
            path,
        )?,
        alpha_pattern: patterns(
            cfg.get("alpha_pattern").unwrap_or(&J::Null),
            "alpha_pattern",
            path,
        )?,
        targets,
        exclude,
        layers,
    })
}

/// `(layer, target, is_b)` of a PEFT tensor name, or why it cannot be used.
fn parse_name(name: &str) -> std::result::Result<(usize, Target, bool), &'static str> {
    let n = name.strip_prefix("base_model.model.").unwrap_or(name);
    if n.contains("lora_magnitude_vector") {
        return Err("DoRA (lora_magnitude_vector) is not supported");
    }
    if n.contains("lora_embedding") || n.contains("embed_tokens") || n.contains("lm_head") {
        return Err("embedding and lm_head adapters are not supported");
    }
    let (module, ab) = if let Some(m) = n.strip_suffix(".lora_A.weight") {
        (m, false)
    } else if let Some(m) = n.strip_suffix(".lora_B.weight") {
        (m, true)
    } else if n.ends_with(".lora_B.bias") || n.ends_with(".lora_A.bias") {
        return Err("LoRA bias is not supported");
    } else {
        return Err("not a LoRA matrix (expected ...lora_A.weight / ...lora_B.weight)");
    };
    // An adapter name PEFT may have left in (`q_proj.default`).
    let module = module.strip_suffix(".default").unwrap_or(module);
    let rest = module
        .strip_prefix("model.layers.")
        .ok_or("not a module of model.layers")?;
    let (l, m) = rest.split_once('.').ok_or("not a module of model.layers")?;
    let l: usize = l.parse().map_err(|_| "bad layer index")?;
    let t = match m {
        "self_attn.q_proj" => Target::Q,
        "self_attn.k_proj" => Target::K,
        "self_attn.v_proj" => Target::V,
        "self_attn.o_proj" => Target::O,
        "mlp.gate_proj" => Target::Gate,
        "mlp.up_proj" => Target::Up,
        "mlp.down_proj" => Target::Down,
        _ => return Err("not one of a Llama layer's seven projections"),
    };
    Ok((l, t, ab))
}

pub(crate) fn load(dir: &Path, c: &Config) -> Result<Parsed> {
    let cfg_path = dir.join("adapter_config.json");
    if !cfg_path.is_file() {
        return Err(Error::config(
            &cfg_path,
            "missing: a PEFT adapter folder holds adapter_config.json and adapter_model.safetensors",
        ));
    }
    let cfg = parse_config(&cfg_path)?;
    let st_path = dir.join("adapter_model.safetensors");
    if !st_path.is_file() {
        let why = if dir.join("adapter_model.bin").is_file() {
            "missing (adapter_model.bin is a pickle file, which is not read: save the adapter with safetensors)"
        } else {
            "missing"
        };
        return Err(Error::weights(&st_path, "", why));
    }
    let st = StFiles::open(std::slice::from_ref(&st_path))?;
    type Half = Option<(Vec<usize>, Vec<f32>)>;
    let mut found: BTreeMap<(usize, Target), (Half, Half)> = BTreeMap::new();
    for name in st.names() {
        let (l, t, is_b) = parse_name(name).map_err(|why| Error::weights(&st_path, name, why))?;
        let e = st
            .get(name)
            .ok_or_else(|| Error::weights(&st_path, name, "missing"))?;
        use safetensors::Dtype as D;
        if !matches!(e.dtype, D::F32 | D::F16 | D::BF16) {
            return Err(Error::weights(
                &st_path,
                name,
                format!("type {:?} is not supported (f32, f16 or bf16)", e.dtype),
            ));
        }
        if e.shape.len() != 2 {
            return Err(Error::weights(
                &st_path,
                name,
                format!("a LoRA matrix must be 2-D, not {:?}", e.shape),
            ));
        }
        let v = crate::weights::st_to_f32(st.data(e), e.dtype);
        if v.len() != e.shape.iter().product::<usize>() {
            return Err(Error::weights(
                &st_path,
                name,
                "data size does not match the shape",
            ));
        }
        let slot = found.entry((l, t)).or_default();
        let half = if is_b { &mut slot.1 } else { &mut slot.0 };
        if half.is_some() {
            return Err(Error::weights(&st_path, name, "given twice"));
        }
        *half = Some((e.shape.clone(), v));
    }
    let mut pairs = vec![];
    for ((l, t), (a, b)) in found {
        let module = t.hf_module(l);
        let what = format!("base_model.model.{module}.lora_A/lora_B");
        let (Some((ash, a)), Some((bsh, b))) = (a, b) else {
            return Err(Error::weights(
                &st_path,
                &what,
                "one of the pair is missing",
            ));
        };
        if l >= c.num_hidden_layers {
            return Err(Error::weights(
                &st_path,
                &what,
                format!(
                    "layer {l} is past the model's {} layers",
                    c.num_hidden_layers
                ),
            ));
        }
        let targeted = cfg.targets.matches(&module)
            && !cfg.exclude.as_ref().is_some_and(|e| e.matches(&module))
            && cfg.layers.as_ref().is_none_or(|ls| ls.contains(&l));
        if !targeted {
            return Err(Error::weights(
                &st_path,
                &what,
                format!("module {module} is not targeted by adapter_config.json (target_modules, exclude_modules, layers_to_transform)"),
            ));
        }
        let (out, inp) = t.shape(c);
        let rank = ash[0];
        if ash[1] != inp || bsh[0] != out || bsh[1] != rank {
            return Err(Error::weights(
                &st_path,
                &what,
                format!("lora_A is {ash:?} and lora_B {bsh:?}: expected [r, {inp}] and [{out}, r] for this model"),
            ));
        }
        let want = pattern_value(&cfg.rank_pattern, &module).map_or(cfg.r, |v| v as usize);
        if rank != want {
            return Err(Error::weights(
                &st_path,
                &what,
                format!("rank {rank}, but adapter_config.json (r / rank_pattern) gives {want}"),
            ));
        }
        let alpha = pattern_value(&cfg.alpha_pattern, &module).unwrap_or(cfg.alpha);
        let scale = if cfg.rslora {
            alpha / (rank as f64).sqrt()
        } else {
            alpha / rank as f64
        } as f32;
        pairs.push((l, t, RawPair { rank, a, b, scale }));
    }
    let one_alpha = !cfg.rslora && cfg.alpha_pattern.is_empty();
    Ok(Parsed {
        format: AdapterFormat::Peft,
        pairs,
        alpha: one_alpha.then_some(cfg.alpha as f32),
    })
}

/// The most frequent of `xs` (ties: the smallest).
fn mode(xs: impl Iterator<Item = u64>) -> Option<u64> {
    let mut n: BTreeMap<u64, usize> = BTreeMap::new();
    for x in xs {
        *n.entry(x).or_default() += 1;
    }
    n.iter()
        .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0)))
        .map(|(x, _)| *x)
}

/// Writes `adapter` as a PEFT folder: `adapter_config.json` (`r` and `lora_alpha` the most
/// common, `rank_pattern` / `alpha_pattern` for the other modules, so every factor is exactly
/// `alpha / r`) and `adapter_model.safetensors` (f32, Hugging Face row order).
pub fn write_peft(dir: &Path, adapter: &Adapter, base: &str) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let pairs: Vec<_> = adapter.pairs().collect();
    let r = mode(pairs.iter().map(|(_, _, p)| p.rank as u64)).unwrap_or(8) as usize;
    // alpha_m = scale_m * r_m, compared by bits of the f32.
    let alpha_of = |p: &LoraPair| (p.scale as f64 * p.rank as f64) as f32;
    let alpha = f32::from_bits(
        mode(pairs.iter().map(|(_, _, p)| alpha_of(p).to_bits() as u64)).unwrap_or(0) as u32,
    );
    let mut rank_pattern = serde_json::Map::new();
    let mut alpha_pattern = serde_json::Map::new();
    let mut targets: Vec<&str> = vec![];
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for (l, t, p) in &pairs {
        let module = t.hf_module(*l);
        let short: &'static str = match t {
            Target::Q => "q_proj",
            Target::K => "k_proj",
            Target::V => "v_proj",
            Target::O => "o_proj",
            Target::Gate => "gate_proj",
            Target::Up => "up_proj",
            Target::Down => "down_proj",
        };
        if !targets.contains(&short) {
            targets.push(short);
        }
        let key = module.replace('.', "\\.");
        if p.rank != r {
            rank_pattern.insert(key.clone(), p.rank.into());
        }
        if alpha_of(p) != alpha {
            alpha_pattern.insert(key, serde_json::json!(alpha_of(p)));
        }
        let (out, inp) = (p.out, p.inp);
        let dev = &Device::Cpu;
        tensors.insert(
            format!("base_model.model.{module}.lora_A.weight"),
            Tensor::from_vec(p.a_f32(), (p.rank, inp), dev)?,
        );
        tensors.insert(
            format!("base_model.model.{module}.lora_B.weight"),
            Tensor::from_vec(p.b_f32(), (out, p.rank), dev)?,
        );
    }
    let cfg = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": r,
        "lora_alpha": alpha,
        "use_rslora": false,
        "target_modules": targets,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "use_dora": false,
    });
    let cfg_path = dir.join("adapter_config.json");
    let text = serde_json::to_string_pretty(&cfg)
        .map_err(|e| Error::InvalidArgument(format!("adapter config: {e}")))?;
    write_atomic(&cfg_path, text.as_bytes())?;
    let st_path = dir.join("adapter_model.safetensors");
    let tmp = dir.join(".adapter_model.safetensors.tmp");
    candle_core::safetensors::save(&tensors, &tmp)?;
    std::fs::rename(&tmp, &st_path).map_err(|e| Error::io(&st_path, e))?;
    Ok(())
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}
