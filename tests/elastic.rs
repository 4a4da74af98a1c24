//! Elastic membership over real QUIC with an elastic seed: ranks join at
//! checkpoints, lost ranks are dropped by `recover`, refusals are clear,
//! and repeated grow/shrink cycles leak nothing. (The same with real
//! processes through `rankrun --elastic` / `--join` is in the launcher's
//! tests.)

use rankmesh::bootstrap::{JoinSpec, Seed, SeedConfig};
use rankmesh::{Communicator, Config, Error, Rebuilt, ReduceOp};
use std::time::Duration;

fn cfg() -> Config {
    let mut c = Config::default();
    c.set_op_timeout(Duration::from_secs(60));
    c.set_formation_timeout(Duration::from_secs(30));
    c
}

fn spec(seed: &Seed, rank: Option<usize>, n: Option<usize>) -> JoinSpec {
    JoinSpec {
        seed: seed.addr().unwrap(),
        token: seed.token().clone(),
        job_id: Some(seed.job_id().to_string()),
        rank,
        world_size: n,
        host: "localhost".into(),
        late: rank.is_none(),
    }
}

fn elastic_seed(n: usize, min: usize, max: usize) -> Seed {
    let mut c = SeedConfig::new(n);
    c.set_elastic(min, max);
    Seed::start(c).unwrap()
}

/// Start the job's first `n` ranks.
async fn first_ranks(seed: &Seed, n: usize) -> Vec<Communicator> {
    let joins: Vec<_> = (0..n)
        .map(|r| {
            tokio::spawn(rankmesh::init_elastic_with(
                spec(seed, Some(r), Some(n)),
                cfg(),
            ))
        })
        .collect();
    let mut out = Vec::new();
    for j in joins {
        let r = j.await.unwrap().unwrap();
        assert_eq!(r.membership.epoch, 1);
        out.push(r.comm);
    }
    out
}

/// Every rank of `comms` (one communicator per rank) checks an allreduce.
async fn allreduce_ok(comms: &[Communicator]) {
    let p = comms.len() as u64;
    let jobs: Vec<_> = comms
        .iter()
        .cloned()
        .map(|c| {
            tokio::spawn(async move {
                assert_eq!(c.size() as u64, p);
                let mut v = vec![c.rank() as u64 + 1; 1000];
                c.all_reduce(&mut v, ReduceOp::Sum).await.unwrap();
                v
            })
        })
        .collect();
    for j in jobs {
        let v = j.await.unwrap();
        assert!(v.iter().all(|&x| x == p * (p + 1) / 2), "{:?}", &v[..4]);
    }
}

/// Every rank in `comms` calls checkpoint with `state` (rank 0's counts);
/// returns the results in new-rank order.
async fn checkpoint_all(comms: Vec<Communicator>, state: &[u8]) -> Vec<Rebuilt> {
    let jobs: Vec<_> = comms
        .into_iter()
        .map(|c| {
            let s = state.to_vec();
            tokio::spawn(async move { c.checkpoint(&s).await })
        })
        .collect();
    let mut out = Vec::new();
    for j in jobs {
        out.push(j.await.unwrap().unwrap());
    }
    out
}

/// Start `k` joiners; they wait until admitted.
fn joiners(seed: &Seed, k: usize) -> Vec<tokio::task::JoinHandle<rankmesh::Result<Rebuilt>>> {
    (0..k)
        .map(|_| tokio::spawn(rankmesh::init_elastic_with(spec(seed, None, None), cfg())))
        .collect()
}

/// Wait until the seed has `k` joiners queued: checkpoints admit only
/// those that arrived before them. (Polls the seed's own count.)
async fn queued(seed: &Seed, k: usize) {
    for _ in 0..600 {
        if seed.waiting_joiners() >= k {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("joiners never reached the seed");
}

fn sorted(mut v: Vec<Rebuilt>) -> Vec<Rebuilt> {
    v.sort_by_key(|r| r.membership.rank);
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_rank_job_grows_to_four_at_a_checkpoint() {
    let seed = elastic_seed(2, 2, 4);
    let first = first_ranks(&seed, 2).await;
    allreduce_ok(&first).await;
    let newcomers = joiners(&seed, 2);
    queued(&seed, 2).await;
    let old = checkpoint_all(first, b"step 7").await;
    let mut all = old;
    for j in newcomers {
        let r = j.await.unwrap().unwrap();
        // The newcomer got the state, and knows it is new.
        assert_eq!(r.state, b"step 7");
        assert_eq!(r.membership.previous_rank, None);
        all.push(r);
    }
    let all = sorted(all);
    for (i, r) in all.iter().enumerate() {
        assert_eq!(r.membership.rank, i);
        assert_eq!(r.membership.size, 4);
        assert_eq!(r.membership.epoch, 2);
        assert_eq!(r.membership.joined, vec![2, 3]);
        assert!(r.membership.left.is_empty());
        assert_eq!(r.state, b"step 7");
    }
    // The original ranks kept their ranks.
    assert_eq!(all[0].membership.previous_rank, Some(0));
    assert_eq!(all[1].membership.previous_rank, Some(1));
    let comms: Vec<Communicator> = all.into_iter().map(|r| r.comm).collect();
    allreduce_ok(&comms).await;
    // A checkpoint with nothing waiting changes nothing.
    let again = sorted(checkpoint_all(comms, b"step 8").await);
    assert!(again
        .iter()
        .all(|r| !r.membership.changed() && r.membership.size == 4));
    let comms: Vec<Communicator> = again.into_iter().map(|r| r.comm).collect();
    allreduce_ok(&comms).await;
    for c in comms {
        c.finalize().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survivors_of_a_lost_rank_recover_and_continue() {
    let seed = elastic_seed(4, 3, 4);
    let comms = first_ranks(&seed, 4).await;
    allreduce_ok(&comms).await;
    let mut jobs = Vec::new();
    for c in comms {
        jobs.push(tokio::spawn(async move {
            if c.rank() == 2 {
                // This rank dies.
                c.shutdown_after_error().await;
                return None;
            }
            let mut v = vec![1u32; 100];
            let e = c.all_reduce(&mut v, ReduceOp::Sum).await.unwrap_err();
            assert!(
                matches!(e, Error::PeerLost { rank: 2, .. }) || e.to_string().contains("rank 2"),
                "{e}"
            );
            Some(c.recover(b"last good").await.unwrap())
        }));
    }
    let mut survivors = Vec::new();
    for j in jobs {
        if let Some(r) = j.await.unwrap() {
            survivors.push(r);
        }
    }
    let survivors = sorted(survivors);
    assert_eq!(survivors.len(), 3);
    for (i, r) in survivors.iter().enumerate() {
        assert_eq!(r.membership.size, 3);
        assert_eq!(r.membership.rank, i);
        assert_eq!(r.membership.left, vec![2]);
        assert_eq!(r.state, b"last good");
    }
    // Old ranks 0, 1, 3 are now 0, 1, 2.
    let prev: Vec<_> = survivors
        .iter()
        .map(|r| r.membership.previous_rank)
        .collect();
    assert_eq!(prev, vec![Some(0), Some(1), Some(3)]);
    let comms: Vec<Communicator> = survivors.into_iter().map(|r| r.comm).collect();
    allreduce_ok(&comms).await;
    for c in comms {
        c.finalize().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn below_the_minimum_recovery_fails_clearly() {
    let seed = elastic_seed(3, 3, 3);
    let comms = first_ranks(&seed, 3).await;
    let mut jobs = Vec::new();
    for c in comms {
        jobs.push(tokio::spawn(async move {
            if c.rank() == 0 {
                c.shutdown_after_error().await;
                return String::new();
            }
            let mut v = [0u8; 4];
            let _ = c.all_reduce(&mut v, ReduceOp::Sum).await;
            c.recover(b"x").await.unwrap_err().to_string()
        }));
    }
    for j in jobs {
        let e = j.await.unwrap();
        if !e.is_empty() {
            assert!(e.contains("minimum of 3"), "{e}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_token_and_joiners_beyond_the_maximum_are_refused() {
    let seed = elastic_seed(2, 2, 3);
    let first = first_ranks(&seed, 2).await;
    // A wrong token.
    let mut bad = spec(&seed, None, None);
    bad.token = rankmesh::bootstrap::JobToken::generate().unwrap();
    let e = rankmesh::init_elastic_with(bad, cfg()).await.unwrap_err();
    assert!(matches!(e, Error::Auth { .. }), "{e}");
    // One joiner fits (maximum 3); a second does not.
    let ok = joiners(&seed, 1);
    queued(&seed, 1).await;
    let e = rankmesh::init_elastic_with(spec(&seed, None, None), cfg())
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("maximum of 3"), "{e}");
    // The job is unaffected and admits the one that fits.
    allreduce_ok(&first).await;
    let mut all = checkpoint_all(first, b"s").await;
    all.push(ok.into_iter().next().unwrap().await.unwrap().unwrap());
    let comms: Vec<Communicator> = sorted(all).into_iter().map(|r| r.comm).collect();
    assert_eq!(comms.len(), 3);
    allreduce_ok(&comms).await;
    for c in comms {
        c.finalize().await.unwrap();
    }
}

/// Resident memory, after returning freed heap pages to the system (so the
/// figure follows live allocations, not the allocator's caches).
fn rss_kib() -> u64 {
    // SAFETY: malloc_trim only releases free memory of glibc's heap.
    unsafe {
        libc::malloc_trim(0);
    }
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    pages * 4
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Ten times: a process joins (3 ranks), then leaves again (2 ranks). The
/// two original ranks are never restarted, and neither file descriptors
/// nor tasks accumulate.
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
        tokio::time::sleep(Duration::from_millis(200)).await;
        if cycle == 1 {
            before = Some((open_fds(), tasks(), rss_kib()));
        }
    }
    let (fds, t, rss) = before.unwrap();
    // Connections to departed members drain (or reach the idle timeout)
    // before their tasks end.
    tokio::time::sleep(Duration::from_secs(7)).await;
    let (fds2, t2, rss2) = (open_fds(), tasks(), rss_kib());
    eprintln!(
        "after cycle 2: {fds} fds, {t} tasks, {rss} KiB resident; after cycle 10: {fds2} fds, \
         {t2} tasks, {rss2} KiB"
    );
    assert!(
        rss2 <= rss + 16 * 1024,
        "resident memory grew: {rss} -> {rss2} KiB"
    );
    assert!(fds2 <= fds + 2, "file descriptors grew: {fds} -> {fds2}");
    assert!(t2 <= t + 2, "tasks grew: {t} -> {t2}");
    for c in comms {
        c.finalize().await.unwrap();
    }
}
