//! LoRA adapters: low-rank updates `W + scale * B A` of a model's projections, loaded from
//! Hugging Face PEFT folders or llama.cpp GGUF LoRA files, applied at run time on top of any
//! weight storage (`y = W x + scale * B (A x)`, the rank-r product in f32), chosen per session.
//!
//! An [`Adapter`] belongs to the model it was loaded for: it is checked against the model's
//! shapes at load, immutable, and cheap to clone. Its matrices are held in the model's row order
//! (Hugging Face's: a GGUF LoRA's Q/K `lora_b` rows are un-permuted as the base's are).

mod gguf;
mod peft;
pub(crate) mod row;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::kernels::lowrank::{self as kernel, LoraMat};
use crate::kernels::Rider;
use crate::weights::W;

pub use crate::plan::Target;

pub use gguf::write_gguf_lora;
pub use peft::write_peft;
pub(crate) use row::Applied;

/// One low-rank update as a parser reads it: `delta = scale * B A`, `A` `[rank, in]`, `B`
/// `[out, rank]`, row-major f32 in the model's row order.
#[derive(Clone, Debug)]
pub(crate) struct RawPair {
    pub(crate) rank: usize,
    pub(crate) a: Vec<f32>,
    pub(crate) b: Vec<f32>,
    /// The adapter's own factor (PEFT: `alpha / r` or `alpha / sqrt(r)`; GGUF: `alpha / r`, or
    /// 1 without alpha); a session's scale multiplies it.
    pub(crate) scale: f32,
}

impl RawPair {
    /// Checks the pair against the projection's `(out, in)`; `what` names it in errors.
    fn check(&self, (out, inp): (usize, usize), path: &Path, what: &str) -> Result<()> {
        let r = self.rank;
        if r == 0 {
            return Err(Error::weights(path, what, "rank 0"));
        }
        if self.a.len() != r * inp {
            return Err(Error::weights(
                path,
                what,
                format!(
                    "lora_A holds {} values where [{r}, {inp}] (rank x the base's input width) were expected",
                    self.a.len()
                ),
            ));
        }
        if self.b.len() != out * r {
            return Err(Error::weights(
                path,
                what,
                format!(
                    "lora_B holds {} values where [{out}, {r}] (the base's output width x rank) were expected",
                    self.b.len()
                ),
            ));
        }
        if !self.scale.is_finite() {
            return Err(Error::weights(path, what, "the scale is not finite"));
        }
        if self.a.iter().chain(&self.b).any(|v| !v.is_finite()) {
            return Err(Error::weights(path, what, "holds a NaN or infinite value"));
        }
        Ok(())
    }

    /// As stored: `A` and `B^T` in their narrowest exact types.
    fn store(self, out: usize, inp: usize) -> LoraPair {
        let r = self.rank;
        LoraPair {
            rank: r,
            inp,
            out,
            a: LoraMat::a_from(&self.a, r, inp),
            bt: LoraMat::bt_from(&self.b, r, out),
            scale: self.scale,
        }
    }
}

/// One update as an adapter holds it: `A` `[rank, inp]` (in blocks of rank rows,
/// [`kernel::a_index`]) and `B^T` `[rank, out]` (in panels of columns, [`kernel::panel_index`]).
#[derive(Clone, Debug)]
pub(crate) struct LoraPair {
    pub(crate) rank: usize,
    pub(crate) inp: usize,
    pub(crate) out: usize,
    pub(crate) a: LoraMat,
    pub(crate) bt: LoraMat,
    pub(crate) scale: f32,
}

impl LoraPair {
    /// `A` as `[rank, inp]` f32, row-major.
    pub(crate) fn a_f32(&self) -> Vec<f32> {
        let (r, inp) = (self.rank, self.inp);
        let stored = self.a.to_f32();
        let mut a = vec![0f32; r * inp];
        for j in 0..r {
            for i in 0..inp {
                a[j * inp + i] = stored[kernel::a_index(j, i, r, inp)];
            }
        }
        a
    }

    /// `B` as `[out, rank]` f32.
    pub(crate) fn b_f32(&self) -> Vec<f32> {
        let (r, out) = (self.rank, self.out);
        let bt = self.bt.to_f32();
        let mut b = vec![0f32; out * r];
        for j in 0..r {
            for o in 0..out {
                b[o * r + j] = bt[kernel::panel_index(j, o, r, out)];
            }
        }
        b
    }

    pub(crate) fn update(&self) -> kernel::Update<'_> {
        kernel::Update {
            rank: self.rank,
            inp: self.inp,
            out: self.out,
            a: &self.a,
            bt: &self.bt,
        }
    }
}

/// Where an adapter came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdapterFormat {
    /// A Hugging Face PEFT folder.
    Peft,
    /// A llama.cpp GGUF LoRA file.
    Gguf,
}

impl AdapterFormat {
    /// `"peft"` or `"gguf"`.
    pub fn as_str(self) -> &'static str {
        match self {
            AdapterFormat::Peft => "peft",
            AdapterFormat::Gguf => "gguf",
        }
    }
}

/// What an adapter file holds, before it is tied to a model.
pub(crate) struct Parsed {
    pub(crate) format: AdapterFormat,
    /// `(layer, target, pair)`.
    pub(crate) pairs: Vec<(usize, Target, RawPair)>,
    /// The file's alpha where one global value describes it (GGUF's `adapter.lora.alpha`,
    /// PEFT's `lora_alpha`).
    pub(crate) alpha: Option<f32>,
}

pub(crate) struct AdapterInner {
    path: PathBuf,
    format: AdapterFormat,
    model_fingerprint: u64,
    fingerprint: u64,
    /// `layers[l][target]`.
    /// Each pair behind its own pointer, shared with the sessions' decode plans.
    layers: Vec<[Option<Arc<LoraPair>>; 7]>,
    alpha: Option<f32>,
}

/// A LoRA adapter loaded for one model: immutable, shared, cheap to clone. Apply it to a
/// session with [`crate::Session::set_adapters`].
#[derive(Clone)]
pub struct Adapter {
    pub(crate) inner: Arc<AdapterInner>,
}

impl Adapter {
    /// Whether `self` and `other` are the same loaded adapter (clones of one load).
    pub(crate) fn same(&self, other: &Adapter) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }
}

impl std::fmt::Debug for Adapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Adapter")
            .field("path", &self.inner.path)
            .field("format", &self.inner.format)
            .field("targets", &self.targets())
            .field("max_rank", &self.max_rank())
            .finish()
    }
}

fn fnv(h: &mut u64, bytes: &[u8]) {
    for &b in bytes {
        *h ^= b as u64;
        *h = h.wrapping_mul(0x100_0000_01b3);
    }
}

impl Adapter {
    /// Loads a PEFT folder (`adapter_config.json` + `adapter_model.safetensors`) or a GGUF LoRA
    /// file for the model of configuration `config` and fingerprint `model_fingerprint`,
    /// checking every matrix against the shapes of its layer plan
    /// ([`crate::Model::load_adapter`] passes its own).
    pub fn load(
        config: &Config,
        model_fingerprint: u64,
        path: impl AsRef<Path>,
    ) -> Result<Adapter> {
        let path = path.as_ref();
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        let parsed = if meta.is_dir() {
            peft::load(path, config)?
        } else {
            gguf::load(path, config)?
        };
        let a = Self::from_parsed(config, model_fingerprint, path, parsed)?;
        tracing::info!(
            path = %path.display(),
            format = a.format().as_str(),
            matrices = a.n_matrices(),
            max_rank = a.max_rank(),
            "adapter loaded"
        );
        Ok(a)
    }

    pub(crate) fn from_parsed(
        c: &Config,
        model_fingerprint: u64,
        path: &Path,
        parsed: Parsed,
    ) -> Result<Adapter> {
        let mut layers: Vec<[Option<Arc<LoraPair>>; 7]> = (0..c.num_hidden_layers)
            .map(|_| Default::default())
            .collect();
        if parsed.pairs.is_empty() {
            return Err(Error::weights(
                path,
                "",
                "the adapter holds no LoRA matrices",
            ));
        }
        let mut fp = 0xcbf2_9ce4_8422_2325u64;
        for (l, t, pair) in parsed.pairs {
            let what = t.weight(l).gguf_name();
            let slot = layers.get_mut(l).ok_or_else(|| {
                Error::weights(
                    path,
                    &what,
                    format!(
                        "layer {l} is past the model's {} layers",
                        c.num_hidden_layers
                    ),
                )
            })?;
            let (out, inp) = t.shape(c);
            pair.check((out, inp), path, &what)?;
            if slot[t.index()].is_some() {
                return Err(Error::weights(path, &what, "given twice"));
            }
            fnv(
                &mut fp,
                format!("{l} {t:?} {} {}", pair.rank, pair.scale).as_bytes(),
            );
            for v in pair.a.iter().chain(&pair.b) {
                fnv(&mut fp, &v.to_le_bytes());
            }
            slot[t.index()] = Some(Arc::new(pair.store(out, inp)));
        }
        Ok(Adapter {
            inner: Arc::new(AdapterInner {
                path: path.to_path_buf(),
                format: parsed.format,
                model_fingerprint,
                fingerprint: fp,
                layers,
                alpha: parsed.alpha,
            }),
        })
    }

    /// The file or folder it was loaded from.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }
    /// The file format.
    pub fn format(&self) -> AdapterFormat {
        self.inner.format
    }
    /// A hash of the adapter's matrices and factors (snapshots record it).
    pub fn fingerprint(&self) -> u64 {
        self.inner.fingerprint
    }
    /// The fingerprint of the model it was loaded for.
    pub fn model_fingerprint(&self) -> u64 {
        self.inner.model_fingerprint
    }
    /// The file's global alpha, where it has one.
    pub fn alpha(&self) -> Option<f32> {
        self.inner.alpha
    }
    /// The targets updated in at least one layer.
    pub fn targets(&self) -> Vec<Target> {
        Target::ALL
            .into_iter()
            .filter(|t| self.inner.layers.iter().any(|l| l[t.index()].is_some()))
            .collect()
    }
    /// The largest rank of its matrices.
    pub fn max_rank(&self) -> usize {
        self.pairs().map(|(_, _, p)| p.rank).max().unwrap_or(0)
    }
    /// How many projections it updates (over all layers).
    pub fn n_matrices(&self) -> usize {
        self.pairs().count()
    }
    /// Parameters (values of A and B).
    pub fn n_params(&self) -> usize {
        self.pairs().map(|(_, _, p)| p.a.len() + p.bt.len()).sum()
    }

    /// Bytes its matrices take in memory.
    pub fn n_bytes(&self) -> usize {
        self.pairs()
            .map(|(_, _, p)| p.a.bytes() + p.bt.bytes())
            .sum()
    }

    /// The storage type of its matrices (`q8`: 8-bit codes with a scale per 32 values, as in a
    /// Q8_0 GGUF LoRA; `f16`, `bf16`, `f32`, or `mixed`).
    pub fn dtype(&self) -> &'static str {
        let mut names = self
            .pairs()
            .flat_map(|(_, _, p)| [p.a.dtype_name(), p.bt.dtype_name()]);
        let first = names.next().unwrap_or("f32");
        if names.all(|n| n == first) {
            first
        } else {
            "mixed"
        }
    }

    /// Every `(layer, target, pair)`.
    pub(crate) fn pairs(&self) -> impl Iterator<Item = (usize, Target, &LoraPair)> {
        self.inner.layers.iter().enumerate().flat_map(|(l, slots)| {
            Target::ALL
                .into_iter()
                .filter_map(move |t| slots[t.index()].as_deref().map(|p| (l, t, p)))
        })
    }

    pub(crate) fn pair(&self, layer: usize, t: Target) -> Option<&LoraPair> {
        self.inner.layers.get(layer)?[t.index()].as_deref()
    }

    pub(crate) fn pair_arc(&self, layer: usize, t: Target) -> Option<&Arc<LoraPair>> {
        self.inner.layers.get(layer)?[t.index()].as_ref()
    }

    pub(crate) fn downgrade(&self) -> Weak<AdapterInner> {
        Arc::downgrade(&self.inner)
    }

    pub(crate) fn from_weak(w: &Weak<AdapterInner>) -> Option<Adapter> {
        w.upgrade().map(|inner| Adapter { inner })
    }

    /// The dense update `sum scale * B A` of one projection (`[out, in]` row-major, f64
    /// accumulation), for merging.
    pub(crate) fn delta(
        adapters: &[(Adapter, f32)],
        layer: usize,
        t: Target,
        (out, inp): (usize, usize),
    ) -> Option<Vec<f32>> {
        let mut d: Option<Vec<f64>> = None;
        for (a, s) in adapters {
            let Some(p) = a.pair(layer, t) else { continue };
            let f = (*s as f64) * p.scale as f64;
            if f == 0.0 {
                continue;
            }
            let acc = d.get_or_insert_with(|| vec![0f64; out * inp]);
            let (pa, pb) = (p.a_f32(), p.b_f32());
            for o in 0..out {
                let brow = &pb[o * p.rank..(o + 1) * p.rank];
                let row = &mut acc[o * inp..(o + 1) * inp];
                for (j, &bv) in brow.iter().enumerate() {
                    let arow = &pa[j * inp..(j + 1) * inp];
                    let bf = bv as f64 * f;
                    for (r, &av) in row.iter_mut().zip(arow) {
                        *r += bf * av as f64;
                    }
                }
            }
        }
        d.map(|v| v.into_iter().map(|x| x as f32).collect())
    }
}

/// `(layer, target)` of a projection weight.
pub(crate) fn target_of_weight(w: W) -> Option<(usize, Target)> {
    Some(match w {
        W::Q(l) => (l, Target::Q),
        W::K(l) => (l, Target::K),
        W::V(l) => (l, Target::V),
        W::O(l) => (l, Target::O),
        W::Gate(l) => (l, Target::Gate),
        W::Up(l) => (l, Target::Up),
        W::Down(l) => (l, Target::Down),
        _ => return None,
    })
}

/// `(layer, target)` of a GGUF projection name (`blk.3.attn_q.weight`).
pub(crate) fn target_of_gguf_name(name: &str) -> Option<(usize, Target)> {
    let rest = name.strip_prefix("blk.")?.strip_suffix(".weight")?;
    let (l, module) = rest.split_once('.')?;
    let t = match module {
        "attn_q" | "attn_k" | "attn_v" | "attn_output" | "ffn_gate" | "ffn_up" | "ffn_down" => {
            Target::parse(module).ok()?
        }
        _ => return None,
    };
    Some((l.parse().ok()?, t))
}

/// The adapters a forward pass applies, each with its session scale (and the decode plans
/// kept for them).
pub(crate) type Active<'a> = &'a Applied;

/// Adds every active adapter's `scale * B (A x)` for projection `t` of layer `layer` to
/// columns `col..col + n` of `out` (`[m, stride]`), for `m` rows of `xs` (`[m, k]`). A scale of
/// 0 adds nothing (exactly the base model).
pub(crate) fn add_delta(
    active: Active<'_>,
    layer: usize,
    t: Target,
    xs: &[f32],
    m: usize,
    out: &mut [f32],
    cols: (usize, usize, usize),
) -> Result<()> {
    for (adapter, s) in active.iter() {
        let Some(p) = adapter.pair(layer, t) else {
            continue;
        };
        let f = s * p.scale;
        if f != 0.0 {
            kernel::apply(&p.update(), f, xs, m, out, cols)?;
        }
    }
    Ok(())
}

/// A session's view of one projection group of one layer (the projections `cols`, each
/// `(target, first column, width)` in the group's output rows, all of the same input): the
/// base product plus the session's active adapters' updates. A model without adapters passes
/// straight through to the base product.
#[derive(Clone, Copy)]
pub(crate) struct View<'a> {
    pub(crate) active: Active<'a>,
    pub(crate) layer: usize,
    pub(crate) cols: &'a [(Target, usize, usize)],
}

impl View<'_> {
    /// `matmul` (which writes `out`, `[m, width]`) followed by the updates. One row (decode):
    /// `matmul` is handed the update as a [`Rider`] to put on its product's writer, so the
    /// update runs inside the product's own pool call.
    pub(crate) fn matmul_and_update(
        &self,
        xs: &[f32],
        m: usize,
        out: &mut [f32],
        matmul: impl FnOnce(&mut [f32], Option<&dyn Rider>) -> Result<()>,
    ) -> Result<()> {
        if self.active.is_empty() {
            return matmul(out, None);
        }
        if m == 1 {
            // One row: the update rides the matmul's own pool call.
            let mut matmul = Some(matmul);
            let updated = self.one_row(xs, out, |rider, out| {
                let mm = matmul.take().expect("one call");
                mm(out, Some(rider))
            })?;
            return match matmul {
                Some(mm) if !updated => mm(out, None),
                _ => Ok(()),
            };
        }
        matmul(out, None)?;
        self.update_rows(xs, m, out)
    }

    /// The updates alone, added to `out` (the base product already there), with the
    /// arithmetic [`View::matmul_and_update`] uses for the same rows: `add_delta` for several
    /// rows, the one-row update (run on its own instead of riding a matmul) for one. A batched
    /// forward pass computes the base product of every sequence's rows at once, then each
    /// sequence's update.
    pub(crate) fn update_rows(&self, xs: &[f32], m: usize, out: &mut [f32]) -> Result<()> {
        if self.active.is_empty() || !self.touched() {
            return Ok(());
        }
        if m == 1 {
            self.one_row(xs, out, |_, _| Ok(()))?;
            return Ok(());
        }
        let stride = out.len() / m.max(1);
        for &(t, col, n) in self.cols {
            add_delta(self.active, self.layer, t, xs, m, out, (stride, col, n))?;
        }
        Ok(())
    }

    /// Whether an active adapter updates any of the group's projections.
    fn touched(&self) -> bool {
        self.cols
            .iter()
            .any(|&(t, _, _)| touches(self.active, self.layer, t))
    }

    /// The one-row update of `out` (one row): the parts' `A x` and `B` panels computed by `run`
    /// (which may run the rider alone or with a matmul of `out`), then added. Through the
    /// session's kept plan and state where it has them. `false` (and `run` not called) where
    /// nothing updates these parts.
    fn one_row(
        &self,
        xs: &[f32],
        out: &mut [f32],
        run: impl FnOnce(&row::RowUpdate<'_>, &mut [f32]) -> Result<()>,
    ) -> Result<bool> {
        let (active, layer, targets) = (self.active, self.layer, self.cols);
        let width = out.len();
        let fresh;
        let plan = match active.plan(layer, targets, xs.len(), width) {
            Some(Some(plan)) => plan,
            Some(None) => return Ok(false),
            None => {
                if !self.touched() {
                    return Ok(false);
                }
                fresh = row::RowPlan::new(active.parts(layer, targets), xs.len(), width)?;
                &fresh
            }
        };
        row::run_plan(plan, active.shared(), xs, out, run)?;
        Ok(true)
    }
}

/// Whether any active adapter updates `t` in `layer` with a non-zero factor.
pub(crate) fn touches(active: Active<'_>, layer: usize, t: Target) -> bool {
    active
        .iter()
        .any(|(a, s)| a.pair(layer, t).is_some_and(|p| s * p.scale != 0.0))
}
