//! Ten grow/shrink cycles of an elastic job leak neither memory, file
//! descriptors nor tasks. In its own test binary: resident memory and open
//! descriptors are per process, so other tests running beside it in one
//! process would be counted as its growth.

mod elastic_common;
use elastic_common::*;
use rankmesh::Communicator;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// Counts the bytes the heap holds for live allocations: unlike resident
/// memory it does not move with the allocator's caches or fragmentation,
/// so growth across cycles is growth of what rankmesh keeps.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator; the
// counter is only bookkeeping beside it.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            LIVE.fetch_add(new_size, Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn live_kib() -> usize {
    LIVE.load(Ordering::Relaxed) / 1024
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Open descriptors, live tasks and heap once connections to departed
/// members have drained (or reached the idle timeout) and their tasks ended.
async fn settled(tasks: &impl Fn() -> usize) -> (usize, usize, usize) {
    tokio::time::sleep(Duration::from_secs(7)).await;
    (open_fds(), tasks(), live_kib())
}

/// Ten times: a process joins (3 ranks), then leaves again (2 ranks). The
/// two original ranks are never restarted, and neither heap memory, file
/// descriptors nor tasks accumulate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_grow_and_shrink_cycles_leak_nothing() {
    let seed = elastic_seed(2, 2, 3);
    let mut comms = first_ranks(&seed, 2).await;
    let tasks = || {
        tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks()
    };
    let mut before = None;
    for cycle in 0..10 {
        let j = joiners(&seed, 1);
        queued(&seed, 1).await;
        let mut all = checkpoint_all(comms, format!("cycle {cycle}").as_bytes()).await;
        let newcomer = j.into_iter().next().unwrap().await.unwrap().unwrap();
        assert_eq!(newcomer.state, format!("cycle {cycle}").as_bytes());
        all.push(newcomer);
        let three: Vec<Communicator> = sorted(all).into_iter().map(|r| r.comm).collect();
        allreduce_ok(&three).await;
        // The newcomer leaves (its process ends); the others shrink back at
        // a checkpoint.
        let mut it = three.into_iter();
        let (a, b, c) = (it.next().unwrap(), it.next().unwrap(), it.next().unwrap());
        c.shutdown_after_error().await;
        drop(c);
        let two = sorted(checkpoint_all(vec![a, b], b"back").await);
        assert!(two
            .iter()
            .all(|r| r.membership.size == 2 && r.membership.left == vec![2]));
        comms = two.into_iter().map(|r| r.comm).collect();
        allreduce_ok(&comms).await;
        if cycle == 1 {
            before = Some(settled(&tasks).await);
        }
    }
    let (fds, t, live) = before.unwrap();
    let (fds2, t2, live2) = settled(&tasks).await;
    eprintln!(
        "after cycle 2: {fds} fds, {t} tasks, {live} KiB on the heap; after cycle 10: {fds2} \
         fds, {t2} tasks, {live2} KiB"
    );
    assert!(live2 <= live + 4 * 1024, "heap grew: {live} -> {live2} KiB");
    assert!(fds2 <= fds + 2, "file descriptors grew: {fds} -> {fds2}");
    assert!(t2 <= t + 2, "tasks grew: {t} -> {t2}");
    for c in comms {
        c.finalize().await.unwrap();
    }
}
