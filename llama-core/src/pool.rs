//! The thread pool our kernels run on.
//!
//! A matmul is split into items; the calling thread and the workers grab chunks of items from a
//! shared cursor. A call returns as soon as every item is done: it never waits for a worker that
//! has not started yet. That matters on a busy machine. candle's barrier pool (like a plain
//! fork-join barrier) waits for every worker to check in on every call, so when another process
//! holds a core, each of the ~200 matmuls of a decode step waits for a scheduler slice and decode
//! fell from ~100 to ~5 tokens/s here; with claim-based completion the calling thread simply
//! does the work itself and the step runs at the speed of the cores actually available.
//!
//! Workers spin briefly after a call (the next matmul usually follows within microseconds), then
//! yield, then park. A pool has a fixed number of threads; one pool per thread count is made
//! on first use and kept for the process ([`Pool::with_threads`]). Which pool (and which kernel
//! settings) a call into the core runs on is set by a [`Runtime`] for the duration of the call:
//! the model's options at load, the session's for its forward passes. A call carries its
//! settings to the workers that help with it.
//!
//! Completion protocol. `gen` is odd while a call is live. A worker that sees a new odd `gen`
//! registers in `active` and then re-reads `gen`; the caller, once every item is done, makes
//! `gen` even and waits until `active` is zero. Both sides use sequentially consistent
//! operations, so either the caller sees the worker registered (and waits for it) or the worker
//! sees the call is over (and leaves without touching it).

use std::cell::UnsafeCell;
use std::hint::spin_loop;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::thread::Thread;

use crate::error::{Error, Result};
use crate::exec::{with_settings, Settings};

/// Spins of an idle worker before it starts yielding, then yields before it parks.
const SPINS: u32 = 20_000;
const YIELDS: u32 = 50;

type Work<'a> = dyn Fn(std::ops::Range<usize>) + Sync + 'a;

struct Job {
    work: *const Work<'static>,
    items: usize,
    chunk: usize,
    /// The caller's kernel settings, installed on the workers while they help.
    settings: Settings,
}

struct Shared {
    gen: AtomicUsize,
    job: UnsafeCell<Job>,
    cursor: AtomicUsize,
    done: AtomicUsize,
    active: AtomicUsize,
    panicked: AtomicBool,
    stop: AtomicBool,
}

// SAFETY: `job` is written only by the caller holding the pool's lock while no worker reads it
// (gen even and active zero), and read by workers only inside a live call.
unsafe impl Sync for Shared {}
unsafe impl Send for Shared {}

pub(crate) struct Pool {
    shared: &'static Shared,
    workers: Vec<Thread>,
    lock: Mutex<()>,
    /// Threads asked for (the caller included).
    size: usize,
}

thread_local! {
    static IN_POOL: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// This thread's place among the threads of its pool's calls: 0 for a caller (one per
    /// call), `1..threads` for the workers.
    static SLOT: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    static CURRENT: std::cell::Cell<Option<&'static Pool>> = const { std::cell::Cell::new(None) };
}

/// This thread's slot in the calls of its pool: 0 for the calling thread, `1..threads` for
/// the workers (see [`Pool::threads`]); items of one call on different threads see different
/// slots.
pub(crate) fn slot() -> usize {
    SLOT.with(|s| s.get())
}

/// The most threads a pool may have.
pub(crate) const MAX_THREADS: usize = 1024;
/// The most pools (distinct thread counts) a process keeps: pools live to the end of the
/// process, so without a cap a caller cycling through thread counts would pile up threads.
pub(crate) const MAX_POOLS: usize = 16;

/// Threads when none are asked for: one per physical core.
pub(crate) fn default_threads() -> usize {
    num_cpus::get_physical().max(1)
}

/// `0` (one per physical core) or a count, checked.
pub(crate) fn thread_count(threads: usize) -> Result<usize> {
    match threads {
        0 => Ok(default_threads()),
        n if n > MAX_THREADS => Err(Error::InvalidArgument(format!(
            "threads: {n} is more than {MAX_THREADS}"
        ))),
        n => Ok(n),
    }
}

/// Grabs and runs chunks until the cursor passes the end, counting each in `done`.
fn drain(shared: &Shared, job: &Job) {
    loop {
        let start = shared.cursor.fetch_add(job.chunk, Ordering::Relaxed);
        if start >= job.items {
            return;
        }
        let end = job.items.min(start + job.chunk);
        // SAFETY: the call is live (the caller waits for `done` before returning), so the
        // closure it points to is alive.
        let work = unsafe { &*job.work };
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(start..end))).is_err() {
            shared.panicked.store(true, Ordering::Relaxed);
        }
        shared.done.fetch_add(end - start, Ordering::Release);
    }
}

fn worker(shared: &'static Shared) {
    IN_POOL.with(|f| f.set(true));
    let mut seen = 0usize;
    loop {
        // Wait for a new live call.
        let mut idle = 0u32;
        let gen = loop {
            if shared.stop.load(Ordering::Relaxed) {
                return;
            }
            let g = shared.gen.load(Ordering::Acquire);
            if g != seen && g % 2 == 1 {
                break g;
            }
            idle += 1;
            if idle < SPINS {
                spin_loop();
            } else if idle < SPINS + YIELDS {
                std::thread::yield_now();
            } else {
                std::thread::park();
                idle = 0;
            }
        };
        seen = gen;
        shared.active.fetch_add(1, Ordering::SeqCst);
        if shared.gen.load(Ordering::SeqCst) == gen {
            // SAFETY: registered in `active` while the call is live: the caller will not
            // replace the job until this worker leaves.
            let job = unsafe { &*shared.job.get() };
            with_settings(job.settings, || drain(shared, job));
        }
        shared.active.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Pool {
    fn new(threads: usize) -> Pool {
        let shared: &'static Shared = Box::leak(Box::new(Shared {
            gen: AtomicUsize::new(0),
            job: UnsafeCell::new(Job {
                work: (&|_: std::ops::Range<usize>| {}) as &Work<'static> as *const Work<'static>,
                items: 0,
                chunk: 1,
                settings: crate::exec::current(),
            }),
            cursor: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            stop: AtomicBool::new(false),
        }));
        let workers = (1..threads)
            .filter_map(|i| {
                std::thread::Builder::new()
                    .name(format!("llama-core-{i}"))
                    .spawn(move || {
                        SLOT.with(|s| s.set(i));
                        worker(shared)
                    })
                    .ok()
                    .map(|h| h.thread().clone())
            })
            .collect();
        Pool {
            shared,
            workers,
            lock: Mutex::new(()),
            size: threads,
        }
    }

    /// Threads that run a call, the caller included.
    pub(crate) fn threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// Runs `work` over `0..items` in chunks, on every thread of the pool, and returns when all
    /// items are done. Runs inline for a single chunk, on a one-thread pool, or when called from
    /// inside the pool. A panic in `work` is re-raised here after the call has finished.
    pub(crate) fn run(&self, items: usize, work: &Work<'_>) {
        if items == 0 {
            return;
        }
        // About eight grabs per thread: small enough to even out, large enough to keep the
        // cursor cold.
        let chunk = items.div_ceil(self.threads() * 8).max(1);
        if self.workers.is_empty() || chunk >= items || IN_POOL.with(|f| f.get()) {
            work(0..items);
            return;
        }
        let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let s = self.shared;
        // No worker is registered (the previous call waited for them), so the job can change.
        // SAFETY: see above; workers read it only after seeing the odd `gen` stored below.
        unsafe {
            *s.job.get() = Job {
                // The lifetime is erased: this call does not return while a worker can use it.
                work: std::mem::transmute::<&Work<'_>, &Work<'static>>(work)
                    as *const Work<'static>,
                items,
                chunk,
                settings: crate::exec::current(),
            };
        }
        s.cursor.store(0, Ordering::Relaxed);
        s.done.store(0, Ordering::Relaxed);
        s.panicked.store(false, Ordering::Relaxed);
        let gen = s.gen.load(Ordering::Relaxed) + 1;
        s.gen.store(gen, Ordering::SeqCst);
        for t in &self.workers {
            t.unpark();
        }
        // SAFETY: the job was written above by this thread.
        drain(s, unsafe { &*s.job.get() });
        // Items grabbed by workers that are still running them.
        let mut waits = 0u32;
        while s.done.load(Ordering::Acquire) < items {
            waits += 1;
            if waits < SPINS {
                spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        s.gen.store(gen + 1, Ordering::SeqCst);
        while s.active.load(Ordering::SeqCst) != 0 {
            spin_loop();
        }
        if s.panicked.load(Ordering::Relaxed) {
            panic!("a llama-core kernel panicked on a worker thread");
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        for t in &self.workers {
            t.unpark();
        }
    }
}

impl Pool {
    /// The process's pool of `threads` threads (`0`: one per physical core), made on first use.
    pub(crate) fn with_threads(threads: usize) -> Result<&'static Pool> {
        static POOLS: Mutex<Vec<&'static Pool>> = Mutex::new(Vec::new());
        let threads = thread_count(threads)?;
        let mut pools = POOLS.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = pools.iter().find(|p| p.size == threads) {
            return Ok(p);
        }
        if pools.len() >= MAX_POOLS {
            return Err(Error::InvalidArgument(format!(
                "threads: {threads} would be a {}th distinct thread count (pools are kept for \
                 the process; at most {MAX_POOLS}: {:?})",
                pools.len() + 1,
                pools.iter().map(|p| p.size).collect::<Vec<_>>()
            )));
        }
        let p: &'static Pool = Box::leak(Box::new(Pool::new(threads)));
        pools.push(p);
        Ok(p)
    }
}

/// The pool of the running call (a [`Runtime`]'s), else the default one.
pub(crate) fn pool() -> &'static Pool {
    CURRENT.with(|c| c.get()).unwrap_or_else(|| {
        static DEFAULT: OnceLock<&'static Pool> = OnceLock::new();
        DEFAULT.get_or_init(|| {
            Pool::with_threads(0).unwrap_or_else(|_| Box::leak(Box::new(Pool::new(1))))
        })
    })
}

/// A buffer whose disjoint parts the work items of one pool call write: the one way a mutable
/// buffer crosses into the pool's threads (no pointer smuggled through a `usize`). It borrows
/// the buffer (or, from [`SharedMut::spare`], a vector's reserved capacity) for `'a`; every
/// access is bounds-checked; the caller promises only that items take disjoint ranges.
pub(crate) struct SharedMut<'a, T> {
    ptr: *mut T,
    len: usize,
    _buf: std::marker::PhantomData<&'a mut [T]>,
}

impl<T> Clone for SharedMut<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for SharedMut<'_, T> {}

// SAFETY: a `SharedMut` only hands out disjoint parts of a `[T]` (the callers' contract), so
// sharing it between threads is sharing `&mut` to distinct elements, sound for `T: Send`.
unsafe impl<T: Send> Sync for SharedMut<'_, T> {}
// SAFETY: as above.
unsafe impl<T: Send> Send for SharedMut<'_, T> {}

impl<'a, T> SharedMut<'a, T> {
    /// Over `buf`.
    pub(crate) fn new(buf: &'a mut [T]) -> Self {
        SharedMut {
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
            _buf: std::marker::PhantomData,
        }
    }

    /// Over the reserved capacity of `v` (not yet initialized: write it with
    /// [`SharedMut::write`] only).
    pub(crate) fn spare(v: &'a mut Vec<T>) -> Self {
        v.clear();
        SharedMut {
            ptr: v.as_mut_ptr(),
            len: v.capacity(),
            _buf: std::marker::PhantomData,
        }
    }

    /// Elements `start..start + len` (bounds-checked).
    ///
    /// # Safety
    /// The range is initialized and no other reference to any of its elements is alive while
    /// the returned one is (work items take disjoint ranges).
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn slice(&self, start: usize, len: usize) -> &'a mut [T] {
        assert!(
            start <= self.len && len <= self.len - start,
            "shared buffer bounds"
        );
        // SAFETY: in bounds (checked); exclusivity per the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(start), len) }
    }

    /// A pointer to elements `start..start + len` (bounds-checked), for a work item to come
    /// back to them later in the same pool call.
    pub(crate) fn ptr_at(&self, start: usize, len: usize) -> *mut T {
        assert!(
            start <= self.len && len <= self.len - start,
            "shared buffer bounds"
        );
        self.ptr.wrapping_add(start)
    }

    /// Copies `vals` to elements `start..` (bounds-checked).
    ///
    /// # Safety
    /// No other work item reads or writes those elements meanwhile.
    pub(crate) unsafe fn write(&self, start: usize, vals: &[T])
    where
        T: Copy,
    {
        assert!(
            start <= self.len && vals.len() <= self.len - start,
            "shared buffer bounds"
        );
        // SAFETY: in bounds (checked); exclusivity per the caller's contract.
        unsafe { std::ptr::copy_nonoverlapping(vals.as_ptr(), self.ptr.add(start), vals.len()) }
    }
}

/// Runs `f(i, chunk)` for each of the disjoint chunks of `chunk` elements of `data` (chunk `i`
/// starts at `i * chunk`; the last may be shorter), on the running call's pool.
pub(crate) fn for_each_chunk_mut<T: Send>(
    data: &mut [T],
    chunk: usize,
    f: &(dyn Fn(usize, &mut [T]) + Sync),
) {
    let (n, chunk) = (data.len(), chunk.max(1));
    let shared = SharedMut::new(data);
    pool().run(n.div_ceil(chunk), &|items| {
        for i in items {
            let start = i * chunk;
            // SAFETY: chunks of distinct `i` do not overlap and each `i` runs once.
            f(i, unsafe { shared.slice(start, chunk.min(n - start)) });
        }
    });
}

/// Where and how a call into the core computes: its kernel settings and its thread pool.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Runtime {
    pub(crate) settings: Settings,
    pub(crate) pool: &'static Pool,
}

impl Runtime {
    pub(crate) fn new(settings: Settings, threads: usize) -> Result<Runtime> {
        Ok(Runtime {
            settings,
            pool: Pool::with_threads(threads)?,
        })
    }

    /// The same settings on a pool of `threads` threads (`0`: this runtime's pool).
    pub(crate) fn with_threads(self, threads: usize) -> Result<Runtime> {
        if threads == 0 {
            return Ok(self);
        }
        Runtime::new(self.settings, threads)
    }

    /// Threads that run a call.
    pub(crate) fn threads(&self) -> usize {
        self.pool.threads()
    }

    /// Runs `f` with these settings and this pool (restored afterwards, also on a panic).
    pub(crate) fn run<R>(&self, f: impl FnOnce() -> R) -> R {
        struct Restore(Option<&'static Pool>);
        impl Drop for Restore {
            fn drop(&mut self) {
                CURRENT.with(|c| c.set(self.0));
            }
        }
        let _restore = Restore(CURRENT.with(|c| c.replace(Some(self.pool))));
        with_settings(self.settings, f)
    }
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pool({} threads)", self.threads())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_item_runs_once() {
        let pool = Pool::new(3);
        for items in [0usize, 1, 7, 8, 100, 1000] {
            let hits: Vec<AtomicUsize> = (0..items).map(|_| AtomicUsize::new(0)).collect();
            pool.run(items, &|r| {
                for i in r {
                    hits[i].fetch_add(1, Ordering::Relaxed);
                }
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
        }
    }

    #[test]
    fn many_short_calls_from_several_threads() {
        let pool = Pool::new(3);
        std::thread::scope(|sc| {
            for _ in 0..3 {
                sc.spawn(|| {
                    for n in 0..300usize {
                        let sum = AtomicUsize::new(0);
                        pool.run(n, &|r| {
                            sum.fetch_add(r.sum::<usize>(), Ordering::Relaxed);
                        });
                        assert_eq!(sum.load(Ordering::Relaxed), n * n.saturating_sub(1) / 2);
                    }
                });
            }
        });
    }

    #[test]
    fn a_runtime_carries_its_settings_and_pool_to_the_workers() {
        use crate::exec::{current, Kernel};
        let settings = Settings::new(Kernel::Scalar, false).unwrap();
        let rt = Runtime::new(settings, 3).unwrap();
        assert_eq!(rt.threads(), 3);
        assert!(std::ptr::eq(rt.pool, Pool::with_threads(3).unwrap()));
        let seen = Mutex::new(vec![]);
        rt.run(|| {
            assert!(std::ptr::eq(pool(), rt.pool));
            pool().run(256, &|r| {
                std::thread::sleep(std::time::Duration::from_micros(50));
                seen.lock().unwrap().push((r.len(), current()));
            });
        });
        let seen = seen.into_inner().unwrap();
        assert_eq!(seen.iter().map(|s| s.0).sum::<usize>(), 256);
        assert!(seen.iter().all(|s| s.1 == settings));
        assert_ne!(current(), settings);
        assert!(Pool::with_threads(MAX_THREADS + 1).is_err());
        assert_eq!(rt.with_threads(0).unwrap().threads(), 3);
        assert_eq!(rt.with_threads(2).unwrap().threads(), 2);
    }

    #[test]
    fn chunks_are_disjoint_and_cover_the_buffer() {
        for (n, chunk) in [(0usize, 4usize), (1, 4), (10, 3), (64, 8), (100, 1), (7, 0)] {
            let mut v = vec![usize::MAX; n];
            for_each_chunk_mut(&mut v, chunk, &|i, c| {
                for (j, x) in c.iter_mut().enumerate() {
                    assert_eq!(*x, usize::MAX, "written twice");
                    *x = i * chunk.max(1) + j;
                }
            });
            assert_eq!(v, (0..n).collect::<Vec<_>>());
        }
    }

    #[test]
    fn a_panic_reaches_the_caller_and_the_pool_survives() {
        let pool = Pool::new(2);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            pool.run(64, &|r| {
                if r.contains(&40) {
                    panic!("boom");
                }
            })
        }));
        assert!(r.is_err());
        let count = AtomicUsize::new(0);
        pool.run(64, &|r| {
            count.fetch_add(r.len(), Ordering::Relaxed);
        });
        assert_eq!(count.load(Ordering::Relaxed), 64);
    }
}
