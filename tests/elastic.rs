//! Elastic membership over real QUIC with an elastic seed: ranks join at
//! checkpoints, lost ranks are dropped by `recover`, and refusals are
//! clear. Repeated grow/shrink cycles are in `elastic_cycles.rs`; the same
//! with real processes through `rankrun --elastic` / `--join` is in the
//! launcher's tests.

mod elastic_common;
use elastic_common::*;
use rankmesh::{Communicator, Error, ReduceOp};

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
    bad.token = rankmesh::launch::JobToken::generate().unwrap();
    let e = rankmesh::launch::init_elastic_with(bad, cfg())
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Auth { .. }), "{e}");
    // One joiner fits (maximum 3); a second does not.
    let ok = joiners(&seed, 1);
    queued(&seed, 1).await;
    let e = rankmesh::launch::init_elastic_with(spec(&seed, None, None), cfg())
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
