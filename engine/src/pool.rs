//! A persistent thread pool for the forward pass.
//!
//! Every op of a forward pass (a matmul, an attention block) is split across the same threads;
//! a decode step has hundreds of ops, so spawning threads or parking on a condvar per op would
//! cost more than the op. Workers spin on a generation counter for a short while after each op
//! and only then park, so back-to-back ops start within a microsecond or so, while an idle pool
//! costs no CPU (and the caller only pays for a wake-up when a worker is parked).
//!
//! An op is a set of tasks claimed from a shared counter by whichever threads are running, the
//! caller's included: a worker that the OS has descheduled (the machine is shared) or that
//! runs slower does fewer tasks instead of stalling the op, and an op never waits for a worker
//! that has not started on it. When the machine has a core per thread, each thread is pinned to its own core
//! (the OS would otherwise migrate a spinning worker and lose its caches).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

/// The job workers run: `f(thread_index, n_threads)`.
type Job<'a> = &'a (dyn Fn(usize, usize) + Sync);

/// Spins before a worker parks (about 50-100 µs on current CPUs).
const SPIN_ITERS: u32 = 20_000;

struct Shared {
    n_threads: usize,
    generation: AtomicU64,
    /// Points at a `Job` on the stack of the thread inside [`ThreadPool::run_tasks`]; null
    /// between jobs.
    job: AtomicPtr<Job<'static>>,
    /// Tasks of the current job, the next one to claim, and how many have finished.
    n_tasks: AtomicUsize,
    next: AtomicUsize,
    finished: AtomicUsize,
    /// Workers between announcing themselves and leaving a job: `run_tasks` does not return
    /// (so the job stays alive) while this is non-zero.
    active: AtomicUsize,
    /// Workers parked (or about to park) on `wake`.
    sleepers: AtomicUsize,
    panicked: AtomicBool,
    shutdown: AtomicBool,
    sleep_lock: Mutex<()>,
    wake: Condvar,
}

pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// `run` is not re-entrant: one job at a time.
    busy: Mutex<()>,
}

impl std::fmt::Debug for ThreadPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThreadPool")
            .field("n_threads", &self.shared.n_threads)
            .finish()
    }
}

impl ThreadPool {
    /// A pool running jobs on `n_threads` threads: the caller's and `n_threads - 1` workers,
    /// pinned to cores 1.. when there are at least `n_threads` cores (see [`Self::with_pinning`]).
    pub fn new(n_threads: usize) -> std::io::Result<Self> {
        Self::with_pinning(n_threads, true)
    }

    /// As [`Self::new`]; `pin` says whether workers are pinned to cores. Worker `i` goes to
    /// core `i` (the calling thread keeps core 0's share, unpinned: it belongs to the caller).
    pub fn with_pinning(n_threads: usize, pin: bool) -> std::io::Result<Self> {
        let n_threads = n_threads.max(1);
        let cores = if pin {
            core_affinity::get_core_ids().unwrap_or_default()
        } else {
            Vec::new()
        };
        let pin_to = |idx: usize| (cores.len() >= n_threads).then(|| cores[idx]);
        let shared = Arc::new(Shared {
            n_threads,
            generation: AtomicU64::new(0),
            job: AtomicPtr::new(std::ptr::null_mut()),
            n_tasks: AtomicUsize::new(0),
            next: AtomicUsize::new(0),
            finished: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
            sleepers: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            shutdown: AtomicBool::new(false),
            sleep_lock: Mutex::new(()),
            wake: Condvar::new(),
        });
        let mut workers = Vec::with_capacity(n_threads - 1);
        for idx in 1..n_threads {
            let shared = Arc::clone(&shared);
            let core = pin_to(idx);
            let handle = std::thread::Builder::new()
                .name(format!("llmsd-engine-{idx}"))
                .spawn(move || {
                    if let Some(core) = core {
                        if !core_affinity::set_for_current(core) {
                            tracing::debug!(idx, "could not pin engine thread");
                        }
                    }
                    worker_loop(&shared)
                })?;
            workers.push(handle);
        }
        Ok(ThreadPool {
            shared,
            workers,
            busy: Mutex::new(()),
        })
    }

    pub fn n_threads(&self) -> usize {
        self.shared.n_threads
    }

    /// Runs `f(i, n_threads)` once for every `i < n_threads` and returns when all have
    /// finished. Panics (after all finished) if `f` panicked anywhere. Each call is a task of
    /// [`Self::run_tasks`]: normally every thread of the pool takes one, but a thread that is
    /// late (descheduled by the OS, still waking up) leaves its task to the others.
    pub fn run(&self, f: &(dyn Fn(usize, usize) + Sync)) {
        self.run_tasks(self.shared.n_threads, f);
    }

    /// Runs `f(i, n_tasks)` once for every task `i < n_tasks`, on whichever threads of the pool
    /// claim them (the caller's included, in increasing order of `i`), and returns when all
    /// have finished. Panics (after all finished) if `f` panicked anywhere.
    ///
    /// Tasks are claimed one at a time from a shared counter, so a thread that runs slower
    /// (another process on its core, a slower core) simply ends up with fewer of them: split
    /// work into a few tasks per thread to balance it.
    pub fn run_tasks(&self, n_tasks: usize, f: &(dyn Fn(usize, usize) + Sync)) {
        if n_tasks == 0 {
            return;
        }
        let sh = &*self.shared;
        if sh.n_threads == 1 || n_tasks == 1 {
            for i in 0..n_tasks {
                f(i, n_tasks);
            }
            return;
        }
        let _guard = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        let job: Job<'_> = f;
        // SAFETY: the pointer is only dereferenced by workers that incremented `active` before
        // loading it, and this function clears it and then waits for `active` to reach zero
        // before returning (even if `f` panics here, see the catch_unwind); so `job` and what it
        // borrows outlive every use. The 'static is a lie told only to the atomic.
        let ptr = &job as *const Job<'_> as *mut Job<'static>;
        sh.n_tasks.store(n_tasks, Ordering::SeqCst);
        sh.next.store(0, Ordering::SeqCst);
        sh.finished.store(0, Ordering::SeqCst);
        sh.job.store(ptr, Ordering::SeqCst);
        sh.generation.fetch_add(1, Ordering::SeqCst);
        if sh.sleepers.load(Ordering::SeqCst) > 0 {
            // Taking the lock orders this notify after a worker's check-then-wait.
            let _l = sh.sleep_lock.lock().unwrap_or_else(|e| e.into_inner());
            sh.wake.notify_all();
        }
        let mine = catch_unwind(AssertUnwindSafe(|| run_claimed(sh, job)));
        let mut spins = 0u32;
        while sh.finished.load(Ordering::Acquire) < n_tasks {
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(1024) {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        sh.job.store(std::ptr::null_mut(), Ordering::SeqCst);
        while sh.active.load(Ordering::SeqCst) > 0 {
            std::hint::spin_loop();
        }
        let worker_panicked = sh.panicked.swap(false, Ordering::AcqRel);
        if let Err(p) = mine {
            std::panic::resume_unwind(p);
        }
        if worker_panicked {
            panic!("a thread-pool job panicked on a worker thread");
        }
    }

    /// Splits `0..n_items` into one contiguous range per thread and runs `f(range)` on each.
    pub fn for_ranges(&self, n_items: usize, f: &(dyn Fn(std::ops::Range<usize>) + Sync)) {
        if n_items == 0 {
            return;
        }
        let n = self.shared.n_threads.min(n_items);
        if n == 1 {
            f(0..n_items);
            return;
        }
        self.run_tasks(n, &|idx, _| f(split_range(n_items, n, idx)));
    }
}

/// Claims and runs tasks of `job` until none are left. A panicking task still counts as
/// finished (the panic is re-raised by the caller of `run_tasks` on its own thread, or
/// reported through `panicked` from a worker).
fn run_claimed(sh: &Shared, job: Job<'_>) {
    let n = sh.n_tasks.load(Ordering::SeqCst);
    let mut first_panic = None;
    loop {
        let i = sh.next.fetch_add(1, Ordering::AcqRel);
        if i >= n {
            break;
        }
        if let Err(p) = catch_unwind(AssertUnwindSafe(|| job(i, n))) {
            first_panic.get_or_insert(p);
        }
        sh.finished.fetch_add(1, Ordering::AcqRel);
    }
    if let Some(p) = first_panic {
        std::panic::resume_unwind(p);
    }
}

/// The `idx`-th of `parts` near-equal contiguous pieces of `0..n`.
pub fn split_range(n: usize, parts: usize, idx: usize) -> std::ops::Range<usize> {
    let base = n / parts;
    let extra = n % parts;
    let start = idx * base + idx.min(extra);
    let len = base + usize::from(idx < extra);
    start..start + len
}

fn worker_loop(shared: &Shared) {
    let mut seen = 0u64;
    loop {
        let mut spins = 0u32;
        let gen = loop {
            if shared.shutdown.load(Ordering::Acquire) {
                return;
            }
            let g = shared.generation.load(Ordering::SeqCst);
            if g != seen {
                break g;
            }
            if spins < SPIN_ITERS {
                spins += 1;
                std::hint::spin_loop();
            } else {
                let l = shared.sleep_lock.lock().unwrap_or_else(|e| e.into_inner());
                shared.sleepers.fetch_add(1, Ordering::SeqCst);
                if shared.generation.load(Ordering::SeqCst) == seen
                    && !shared.shutdown.load(Ordering::Acquire)
                {
                    drop(shared.wake.wait(l).unwrap_or_else(|e| e.into_inner()));
                }
                shared.sleepers.fetch_sub(1, Ordering::SeqCst);
            }
        };
        seen = gen;
        shared.active.fetch_add(1, Ordering::SeqCst);
        let ptr = shared.job.load(Ordering::SeqCst);
        if !ptr.is_null() {
            // SAFETY: see `ThreadPool::run_tasks`: we announced ourselves in `active` before
            // loading the pointer, so the job stays alive until we leave below.
            let job: Job<'_> = unsafe { *ptr };
            if catch_unwind(AssertUnwindSafe(|| run_claimed(shared, job))).is_err() {
                shared.panicked.store(true, Ordering::Release);
            }
        }
        shared.active.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::Release);
        {
            let _l = self
                .shared
                .sleep_lock
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// A slice that pool threads write to at disjoint indices.
///
/// Matmul outputs are laid out token-major while threads split weight rows, so each thread's
/// share is strided and cannot be expressed as `split_at_mut` pieces.
pub struct DisjointSlice<'a, T> {
    ptr: *mut T,
    len: usize,
    _marker: std::marker::PhantomData<&'a mut [T]>,
}

// SAFETY: access goes through `write`, whose contract requires that no two threads touch the
// same index, so sharing the pointer across threads is sound for `T: Send`.
unsafe impl<T: Send> Sync for DisjointSlice<'_, T> {}
// SAFETY: as above.
unsafe impl<T: Send> Send for DisjointSlice<'_, T> {}

impl<'a, T> DisjointSlice<'a, T> {
    pub fn new(slice: &'a mut [T]) -> Self {
        DisjointSlice {
            ptr: slice.as_mut_ptr(),
            len: slice.len(),
            _marker: std::marker::PhantomData,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Writes `value` at `index`.
    ///
    /// # Safety
    /// No other thread may read or write `index` while this `DisjointSlice` is alive.
    #[inline(always)]
    pub unsafe fn write(&self, index: usize, value: T) {
        assert!(index < self.len, "DisjointSlice index out of bounds");
        // SAFETY: in bounds (checked above); exclusive per the caller's contract.
        unsafe { self.ptr.add(index).write(value) }
    }

    /// The sub-slice `range`, mutably.
    ///
    /// # Safety
    /// No other thread may touch any index of `range` while the returned slice is alive.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice_mut(&self, range: std::ops::Range<usize>) -> &mut [T] {
        assert!(range.start <= range.end && range.end <= self.len);
        // SAFETY: in bounds (checked above); exclusive per the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(range.start), range.len()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_every_thread_once_per_job() {
        let pool = ThreadPool::new(3).unwrap();
        for _ in 0..1000 {
            let hits = [
                AtomicUsize::new(0),
                AtomicUsize::new(0),
                AtomicUsize::new(0),
            ];
            pool.run(&|i, n| {
                assert_eq!(n, 3);
                hits[i].fetch_add(1, Ordering::Relaxed);
            });
            for h in &hits {
                assert_eq!(h.load(Ordering::Relaxed), 1);
            }
        }
    }

    #[test]
    fn every_task_runs_once() {
        let pool = ThreadPool::new(3).unwrap();
        for n_tasks in [0, 1, 2, 3, 7, 100] {
            for _ in 0..200 {
                let hits: Vec<AtomicUsize> = (0..n_tasks).map(|_| AtomicUsize::new(0)).collect();
                pool.run_tasks(n_tasks, &|i, n| {
                    assert_eq!(n, n_tasks);
                    hits[i].fetch_add(1, Ordering::Relaxed);
                });
                assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
            }
        }
    }

    /// Many tiny tasks: the caller usually claims most of them before the worker wakes; all
    /// are run once and the job completes.
    #[test]
    fn caller_takes_tasks_of_a_late_worker() {
        let pool = ThreadPool::new(2).unwrap();
        let count = AtomicUsize::new(0);
        pool.run_tasks(1000, &|_, _| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(count.load(Ordering::Relaxed), 1000);
    }

    #[test]
    fn ranges_cover_everything_once() {
        for n in 0..50 {
            for parts in 1..5 {
                let mut covered = vec![0; n];
                for idx in 0..parts {
                    for i in split_range(n, parts, idx) {
                        covered[i] += 1;
                    }
                }
                assert!(covered.iter().all(|&c| c == 1));
            }
        }
    }

    #[test]
    fn disjoint_writes_land() {
        let pool = ThreadPool::new(2).unwrap();
        let mut out = vec![0usize; 1001];
        let shared = DisjointSlice::new(&mut out);
        pool.for_ranges(1001, &|r| {
            for i in r {
                // SAFETY: ranges from for_ranges are disjoint.
                unsafe { shared.write(i, i * 2) };
            }
        });
        assert!(out.iter().enumerate().all(|(i, &v)| v == i * 2));
    }

    #[test]
    fn worker_panic_is_reported_and_pool_survives() {
        let pool = ThreadPool::new(2).unwrap();
        let r = catch_unwind(AssertUnwindSafe(|| {
            pool.run(&|i, _| {
                if i == 1 {
                    panic!("boom");
                }
            })
        }));
        assert!(r.is_err());
        let count = AtomicUsize::new(0);
        pool.run(&|_, _| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(count.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn unpinned_pool_works() {
        let pool = ThreadPool::with_pinning(3, false).unwrap();
        let count = AtomicUsize::new(0);
        pool.run(&|_, _| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(count.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn parked_workers_wake_up() {
        let pool = ThreadPool::new(2).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        let count = AtomicUsize::new(0);
        pool.run(&|_, _| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(count.load(Ordering::Relaxed), 2);
    }
}
