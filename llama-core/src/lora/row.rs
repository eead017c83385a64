//! The one-row (decode) update `out[col..col + n] += sum f * B (A x)` riding along the base
//! matmul's pool call ([`crate::kernels::Rider`]), and the state a session keeps for it.
//!
//! What a call does is fixed once a session's adapters are: the parts (each projection's
//! columns and the pairs that update them) and the `pre` items (a few rank rows of `A x`
//! each) form a [`RowPlan`], built once per matmul of each layer and kept ([`Applied`]).
//! What the items of one call share (the `A x` values, per-thread counts and marks) is a
//! [`RowShared`] reused call after call: nothing is allocated or zeroed per call, and each
//! count lives on a cache line only its thread writes. A call tells its own marks from an
//! earlier call's by its epoch, and its counts by their values when it began.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use super::{Adapter, LoraPair, Target};
use crate::error::{Error, Result};
use crate::exec::Isa;
use crate::kernels::lowrank::RB;

/// Places of `u` per `pre` item: a cache line of f32, so that items on different threads
/// write different lines.
const U_LINE: usize = 16;

/// Columns per mark: a piece finishes the whole groups it covers and leaves the columns of its
/// partly covered ones (a narrow or misaligned piece) to [`RowUpdate::complete`].
const GROUP: usize = 8;

/// One projection's output window in a row and the pairs that add to it, with their factors.
pub(crate) struct Part {
    pub(crate) col: usize,
    pub(crate) n: usize,
    pub(crate) ups: Vec<(Arc<LoraPair>, f32)>,
}

/// A `pre` item: rank rows `j0..j0 + rows` of update `up` of part `part`, into `u[off..]`.
#[derive(Clone, Copy)]
struct PreItem {
    part: usize,
    up: usize,
    j0: usize,
    rows: usize,
    off: usize,
}

/// The fixed half of a one-row update: parts, `pre` items, sizes (shapes checked).
pub(crate) struct RowPlan {
    parts: Vec<Part>,
    pre: Vec<PreItem>,
    /// Each part's first `pre` item.
    starts: Vec<usize>,
    /// Places of `u` the items write.
    n_u: usize,
    /// The input's length.
    inp: usize,
    /// The output row's.
    width: usize,
}

impl RowPlan {
    /// Checks the shapes: inputs of `inp` values, an output row of `width`.
    pub(crate) fn new(parts: Vec<Part>, inp: usize, width: usize) -> Result<RowPlan> {
        let mut pre = vec![];
        let mut starts = Vec::with_capacity(parts.len());
        for (pi, p) in parts.iter().enumerate() {
            starts.push(pre.len());
            if p.col + p.n > width {
                return Err(Error::InvalidArgument(format!(
                    "LoRA update into columns {}..{} of a row of {width}",
                    p.col,
                    p.col + p.n,
                )));
            }
            for (qi, (up, _)) in p.ups.iter().enumerate() {
                if up.inp != inp || up.out != p.n {
                    return Err(Error::InvalidArgument(format!(
                        "LoRA update [{}, {}] x [{}, {}] for a {inp}-wide input into {} columns",
                        up.out, up.rank, up.rank, up.inp, p.n
                    )));
                }
                let mut j0 = 0;
                while j0 < up.rank {
                    let rows = RB.min(up.rank - j0);
                    pre.push(PreItem {
                        part: pi,
                        up: qi,
                        j0,
                        rows,
                        off: pre.len() * U_LINE,
                    });
                    j0 += rows;
                }
            }
        }
        let n_u = pre.len() * U_LINE;
        Ok(RowPlan {
            parts,
            pre,
            starts,
            n_u,
            inp,
            width,
        })
    }
}

/// A value on a cache line of its own (written by one thread; nothing else there to bounce
/// along with it).
#[repr(align(128))]
struct Padded<T>(T);

/// A thread slot's counts, monotonic over calls (a call counts from their values when it
/// began): `pre` items done, columns finished.
struct Counts {
    done: AtomicUsize,
    columns: AtomicUsize,
}

/// What the pieces of one thread finished: its counts and, per [`GROUP`] of columns, the
/// epoch of the last call that finished it.
struct Slot {
    counts: Padded<Counts>,
    marks: Vec<AtomicU64>,
}

impl Slot {
    fn new(groups: usize) -> Slot {
        Slot {
            counts: Padded(Counts {
                done: AtomicUsize::new(0),
                columns: AtomicUsize::new(0),
            }),
            marks: (0..groups).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

/// The mutable half of a one-row update, reused by one call after another (never two at once:
/// [`RowShared::begin`] takes it mutably).
pub(crate) struct RowShared {
    /// The scaled `A x` values, written by the `pre` items (disjoint places), read once the
    /// counts say they are all written.
    u: Vec<UnsafeCell<f32>>,
    /// Per thread slot ([`crate::pool::slot`]).
    slots: Vec<Slot>,
    /// The epoch of the last call whose `pre` items a pool call claimed.
    claimed: AtomicU64,
    epoch: u64,
}

// SAFETY: `u`'s places are written by the `pre` items at disjoint indices and published
// through the release/acquire counts before any reader looks (see `RowUpdate::run_pre` and
// `RowUpdate::add`); everything else is atomic.
unsafe impl Sync for RowShared {}

impl Default for RowShared {
    fn default() -> RowShared {
        RowShared::new()
    }
}

impl RowShared {
    pub(crate) const fn new() -> RowShared {
        RowShared {
            u: Vec::new(),
            slots: Vec::new(),
            claimed: AtomicU64::new(0),
            epoch: 0,
        }
    }

    /// Starts a call of `plan` on input `x`: grows what is too small for it (the first calls
    /// only) and takes a new epoch.
    pub(crate) fn begin<'a>(
        &'a mut self,
        plan: &'a RowPlan,
        x: &'a [f32],
    ) -> Result<RowUpdate<'a>> {
        if x.len() != plan.inp {
            return Err(Error::InvalidArgument(format!(
                "LoRA update of a {}-wide input given {} values",
                plan.inp,
                x.len()
            )));
        }
        if self.u.len() < plan.n_u {
            self.u = (0..plan.n_u).map(|_| UnsafeCell::new(0f32)).collect();
        }
        let threads = crate::pool::pool().threads().max(1);
        let groups = plan.width.div_ceil(GROUP);
        if self.slots.len() != threads || self.slots[0].marks.len() < groups {
            let groups = groups.max(self.slots.first().map_or(0, |s| s.marks.len()));
            self.slots = (0..threads).map(|_| Slot::new(groups)).collect();
        }
        self.epoch += 1;
        let shared = &*self;
        // No item of an earlier call runs any more (its pool call returned): the counts are
        // still.
        let (done0, columns0) = shared.counts();
        Ok(RowUpdate {
            plan,
            shared,
            x,
            simd: crate::kernels::isa(),
            epoch: shared.epoch,
            done0,
            columns0,
        })
    }

    /// The sums of the slots' counts: `pre` items done, columns finished.
    fn counts(&self) -> (usize, usize) {
        self.slots.iter().fold((0, 0), |(d, c), s| {
            (
                d + s.counts.0.done.load(Ordering::Acquire),
                c + s.counts.0.columns.load(Ordering::Relaxed),
            )
        })
    }

    /// # Safety
    /// No other thread reads or writes place `i` meanwhile.
    unsafe fn set(&self, i: usize, v: f32) {
        // SAFETY: the caller's guarantee.
        unsafe { *self.u[i].get() = v };
    }

    /// # Safety
    /// No thread writes any place while the slice lives.
    unsafe fn u(&self) -> &[f32] {
        // SAFETY: `UnsafeCell<f32>` has the layout of `f32`; no writer (the caller's guarantee).
        unsafe { std::slice::from_raw_parts(self.u.as_ptr() as *const f32, self.u.len()) }
    }
}

/// One call's update of one row (decode), riding along the base matmul's pool call: `pre`
/// items, claimed before the matmul's own, compute the `A x` products; then each piece of the
/// output row the matmul's items write gets its columns' `B` update on the way
/// ([`crate::kernels::Rider::finish`], waiting until every `pre` item is done), so the update
/// costs no pass of its own over the row. [`RowUpdate::complete`] does what no item did (a
/// matrix without our pool, pieces too narrow to be worth it).
pub(crate) struct RowUpdate<'a> {
    plan: &'a RowPlan,
    shared: &'a RowShared,
    x: &'a [f32],
    simd: Isa,
    epoch: u64,
    /// The counts when the call began.
    done0: usize,
    columns0: usize,
}

impl RowUpdate<'_> {
    fn wait_pre(&self) {
        let need = self.done0 + self.plan.pre.len();
        let mut spins = 0u32;
        while self.shared.counts().0 < need {
            spins += 1;
            if spins < 1 << 12 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }

    /// This thread's slot (the last one, shared, for a thread of another pool).
    fn slot(&self) -> (&Slot, bool) {
        let slots = &self.shared.slots;
        let si = crate::pool::slot();
        match slots.get(si) {
            Some(s) => (s, true),
            None => (&slots[slots.len() - 1], false),
        }
    }

    /// Adds the update of columns `col..col + vals.len()` of the row to `vals` (every `pre`
    /// item done).
    fn add(&self, col: usize, vals: &mut [f32]) {
        let end = col + vals.len();
        // SAFETY: every `pre` item is done (the caller waited on the counts, which they
        // release), and nothing writes `u` after them in this call.
        let u = unsafe { self.shared.u() };
        for (pi, p) in self.plan.parts.iter().enumerate() {
            let (lo, hi) = (col.max(p.col), end.min(p.col + p.n));
            if p.ups.is_empty() || lo >= hi {
                continue;
            }
            let dst = &mut vals[lo - col..hi - col];
            let mut item = self.plan.starts[pi];
            let mut local = [0f32; 64];
            for (up, _) in &p.ups {
                let r = up.rank;
                // The update's values, one line per `pre` item.
                let gather = |j: usize| u[(item + j / RB) * U_LINE + j % RB];
                if r <= local.len() {
                    for (j, v) in local[..r].iter_mut().enumerate() {
                        *v = gather(j);
                    }
                    up.bt.add_cols(p.n, &local[..r], lo - p.col, dst, self.simd);
                } else {
                    let big: Vec<f32> = (0..r).map(gather).collect();
                    up.bt.add_cols(p.n, &big, lo - p.col, dst, self.simd);
                }
                item += r.div_ceil(RB);
            }
        }
    }

    /// After the call the rider rode (or none): the `A x` products if no pool call claimed
    /// them, then the update of every column no piece finished, into `out` (the row).
    pub(crate) fn complete(&self, out: &mut [f32]) -> Result<()> {
        use crate::kernels::Rider;
        let width = self.plan.width;
        if out.len() != width {
            return Err(Error::InvalidArgument(format!(
                "LoRA update of a row of {width} into {}",
                out.len()
            )));
        }
        let pre = self.claim_pre();
        if pre > 0 {
            crate::pool::pool().run(pre, &|range| range.for_each(|i| self.run_pre(i)));
        }
        self.wait_pre();
        // The pool call (or calls) ended: what every thread wrote is visible here.
        if self.shared.counts().1 - self.columns0 == width {
            // Every column went through a piece.
            return Ok(());
        }
        let groups = width.div_ceil(GROUP);
        let marked = |g: usize| {
            self.shared
                .slots
                .iter()
                .any(|s| s.marks[g].load(Ordering::Relaxed) == self.epoch)
        };
        let mut g = 0;
        while g < groups {
            if marked(g) {
                g += 1;
                continue;
            }
            let start = g;
            while g < groups && !marked(g) {
                g += 1;
            }
            let (a, b) = (start * GROUP, (g * GROUP).min(width));
            self.add(a, &mut out[a..b]);
        }
        Ok(())
    }
}

impl crate::kernels::Rider for RowUpdate<'_> {
    fn claim_pre(&self) -> usize {
        if self.shared.claimed.swap(self.epoch, Ordering::AcqRel) == self.epoch {
            0
        } else {
            self.plan.pre.len()
        }
    }
    fn run_pre(&self, i: usize) {
        let it = self.plan.pre[i];
        let (up, f) = &self.plan.parts[it.part].ups[it.up];
        let mut v = [0f32; RB];
        up.a.block_dots(it.j0, it.rows, self.x, &mut v[..it.rows], self.simd);
        for (j, v) in v[..it.rows].iter().enumerate() {
            // SAFETY: item `i` alone writes these places, before it releases its count.
            unsafe { self.shared.set(it.off + j, f * v) };
        }
        let (slot, own) = self.slot();
        let d = &slot.counts.0.done;
        if own {
            // Only this thread writes its slot.
            d.store(d.load(Ordering::Relaxed) + 1, Ordering::Release);
        } else {
            d.fetch_add(1, Ordering::Release);
        }
    }
    fn prefetch(&self, col: usize, len: usize) {
        #[cfg(target_arch = "x86_64")]
        if self.simd != Isa::Scalar {
            let end = col + len;
            for p in &self.plan.parts {
                let (lo, hi) = (col.max(p.col), end.min(p.col + p.n));
                if lo >= hi {
                    continue;
                }
                for (up, _) in &p.ups {
                    up.bt.prefetch_cols(up.rank, p.n, lo - p.col, hi - p.col);
                }
            }
        }
        let _ = (col, len);
    }
    fn finish(&self, col: usize, vals: &mut [f32]) {
        let width = self.plan.width;
        let end = col + vals.len();
        if end > width {
            return;
        }
        // The whole groups inside the piece (the row's last group counts whole at its end).
        let g0 = col.div_ceil(GROUP);
        let (g1, full_end) = if end == width {
            (width.div_ceil(GROUP), width)
        } else {
            (end / GROUP, end / GROUP * GROUP)
        };
        if g0 >= g1 {
            return;
        }
        self.wait_pre();
        let a = g0 * GROUP;
        self.add(a, &mut vals[a - col..full_end - col]);
        let (slot, own) = self.slot();
        for m in &slot.marks[g0..g1] {
            m.store(self.epoch, Ordering::Relaxed);
        }
        let c = &slot.counts.0.columns;
        if own {
            c.store(
                c.load(Ordering::Relaxed) + (full_end - a),
                Ordering::Relaxed,
            );
        } else {
            c.fetch_add(full_end - a, Ordering::Relaxed);
        }
    }
}

/// Runs `plan` on `x` into `out` (one row), through `shared` when it is free (else through
/// state of its own): `run` runs the rider (alone, or riding a matmul that writes `out`).
pub(crate) fn run_plan(
    plan: &RowPlan,
    shared: &Mutex<RowShared>,
    x: &[f32],
    out: &mut [f32],
    run: impl FnOnce(&RowUpdate<'_>, &mut [f32]) -> Result<()>,
) -> Result<()> {
    let mut own;
    // A poisoned state is as good as any: every call re-bases its counts and epoch.
    let mut guard = match shared.try_lock() {
        Ok(g) => Some(g),
        Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
        Err(std::sync::TryLockError::WouldBlock) => None,
    };
    let state: &mut RowShared = match guard.as_deref_mut() {
        Some(s) => s,
        None => {
            own = RowShared::new();
            &mut own
        }
    };
    let rider = state.begin(plan, x)?;
    run(&rider, out)?;
    rider.complete(out)
}

/// A matmul's update plan in a session's cache, for the parts it was built for.
struct Cached {
    targets: Vec<(Target, usize, usize)>,
    /// `None`: no active pair updates these parts (a scale of 0, targets the adapters skip).
    plan: Option<RowPlan>,
}

/// A session's adapters, each with its scale, and the one-row update plans built for them
/// (per layer, per matmul, on first use).
pub(crate) struct Applied {
    list: Vec<(Adapter, f32)>,
    /// `plans[layer][first target of the matmul's parts]`.
    plans: Vec<[OnceLock<Cached>; 7]>,
    shared: Mutex<RowShared>,
}

impl Applied {
    /// `layers`: the model's.
    pub(crate) fn new(list: Vec<(Adapter, f32)>, layers: usize) -> Applied {
        let plans = if list.is_empty() {
            vec![]
        } else {
            (0..layers).map(|_| Default::default()).collect()
        };
        Applied {
            list,
            plans,
            shared: Mutex::new(RowShared::new()),
        }
    }

    /// No adapters.
    pub(crate) fn none() -> &'static Applied {
        static NONE: Applied = Applied {
            list: Vec::new(),
            plans: Vec::new(),
            shared: Mutex::new(RowShared::new()),
        };
        &NONE
    }

    /// The parts of projections `targets` (`(target, col, n)` in the output row) of `layer`:
    /// each with the active pairs and their factors (zero factors left out).
    pub(crate) fn parts(&self, layer: usize, targets: &[(Target, usize, usize)]) -> Vec<Part> {
        targets
            .iter()
            .map(|&(t, col, n)| Part {
                col,
                n,
                ups: self
                    .list
                    .iter()
                    .filter_map(|(a, s)| {
                        let p = a.pair_arc(layer, t)?;
                        let f = s * p.scale;
                        (f != 0.0).then(|| (p.clone(), f))
                    })
                    .collect(),
            })
            .collect()
    }

    /// The kept plan of these parts of `layer` for inputs of `inp` values into rows of
    /// `width`, built on first use: `Some(None)` when nothing updates them, `None` when it
    /// cannot be kept (another layout under the same key, a layer past the model's).
    pub(crate) fn plan(
        &self,
        layer: usize,
        targets: &[(Target, usize, usize)],
        inp: usize,
        width: usize,
    ) -> Option<Option<&RowPlan>> {
        let first = targets.first()?;
        let cell = &self.plans.get(layer)?[first.0.index()];
        let cached = match cell.get() {
            Some(c) => c,
            None => {
                let parts = self.parts(layer, targets);
                let plan = if parts.iter().all(|p| p.ups.is_empty()) {
                    None
                } else {
                    Some(RowPlan::new(parts, inp, width).ok()?)
                };
                let _ = cell.set(Cached {
                    targets: targets.to_vec(),
                    plan,
                });
                cell.get()?
            }
        };
        if cached.targets != targets {
            return None;
        }
        match &cached.plan {
            Some(p) if p.inp != inp || p.width != width => None,
            p => Some(p.as_ref()),
        }
    }

    pub(crate) fn shared(&self) -> &Mutex<RowShared> {
        &self.shared
    }
}

impl Clone for Applied {
    fn clone(&self) -> Applied {
        Applied::new(self.list.clone(), self.plans.len())
    }
}

impl std::ops::Deref for Applied {
    type Target = [(Adapter, f32)];
    fn deref(&self) -> &[(Adapter, f32)] {
        &self.list
    }
}
