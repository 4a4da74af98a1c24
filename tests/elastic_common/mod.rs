//! Helpers shared by the elastic tests (`elastic.rs`, `elastic_cycles.rs`):
//! an elastic seed, its first ranks, joiners and checkpoints, all in this
//! process over real QUIC.
#![allow(dead_code)]

use rankmesh::launch::{JoinSpec, Seed, SeedConfig};
use rankmesh::{Communicator, Config, Rebuilt, ReduceOp};
use std::time::Duration;

pub fn cfg() -> Config {
    let mut c = Config::default();
    c.set_op_timeout(Duration::from_secs(60));
    c.set_formation_timeout(Duration::from_secs(30));
    c
}

pub fn spec(seed: &Seed, rank: Option<usize>, n: Option<usize>) -> JoinSpec {
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

pub fn elastic_seed(n: usize, min: usize, max: usize) -> Seed {
    let mut c = SeedConfig::new(n);
    c.set_elastic(min, max);
    Seed::start(c).unwrap()
}

/// Start the job's first `n` ranks.
pub async fn first_ranks(seed: &Seed, n: usize) -> Vec<Communicator> {
    let joins: Vec<_> = (0..n)
        .map(|r| {
            tokio::spawn(rankmesh::launch::init_elastic_with(
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
pub async fn allreduce_ok(comms: &[Communicator]) {
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
pub async fn checkpoint_all(comms: Vec<Communicator>, state: &[u8]) -> Vec<Rebuilt> {
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
pub fn joiners(seed: &Seed, k: usize) -> Vec<tokio::task::JoinHandle<rankmesh::Result<Rebuilt>>> {
    (0..k)
        .map(|_| {
            tokio::spawn(rankmesh::launch::init_elastic_with(
                spec(seed, None, None),
                cfg(),
            ))
        })
        .collect()
}

/// Wait until the seed has `k` joiners queued: checkpoints admit only
/// those that arrived before them. (Polls the seed's own count.)
pub async fn queued(seed: &Seed, k: usize) {
    for _ in 0..600 {
        if seed.waiting_joiners() >= k {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("joiners never reached the seed");
}

pub fn sorted(mut v: Vec<Rebuilt>) -> Vec<Rebuilt> {
    v.sort_by_key(|r| r.membership.rank);
    v
}
