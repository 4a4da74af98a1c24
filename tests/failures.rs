//! Failure semantics: a job-wide abort reaches every rank with its reason,
//! and a rank that leaves mid-job is named by every survivor quickly, also
//! by ranks it never exchanged a message with (the seed tells them).

use rankmesh::testing::run_local_with;
use rankmesh::{Config, Error, ReduceOp};
use std::time::{Duration, Instant};

fn patient() -> Config {
    // Long enough that only the failure path, not a timeout, can end the
    // waits below.
    let mut cfg = Config::default();
    cfg.set_op_timeout(Duration::from_secs(120));
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_ends_the_job_for_every_rank_with_its_reason() {
    let t = Instant::now();
    let out = run_local_with(4, patient(), |comm| async move {
        match comm.rank() {
            2 => {
                tokio::time::sleep(Duration::from_millis(300)).await;
                comm.abort("loss became NaN at step 17").await;
                Ok(String::new())
            }
            // Rank 1 waits in a point-to-point receive from rank 0, which
            // never sends; ranks 0 and 3 wait in an allreduce rank 2 never
            // joins.
            1 => {
                let mut b = [0u8; 4];
                Ok(comm.recv(&mut b, 0, 9).await.unwrap_err().to_string())
            }
            _ => {
                let mut v = [1.0f32; 16];
                let e = comm.all_reduce(&mut v, ReduceOp::Sum).await.unwrap_err();
                assert!(matches!(e, Error::Aborted { by_rank: 2, .. }), "{e}");
                Ok(e.to_string())
            }
        }
    })
    .await
    .unwrap();
    for r in [0, 1, 3] {
        assert!(
            out[r].contains("loss became NaN at step 17"),
            "rank {r}: {}",
            out[r]
        );
        assert!(out[r].contains("rank 2"), "rank {r}: {}", out[r]);
    }
    assert!(t.elapsed() < Duration::from_secs(60));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rank_that_leaves_mid_job_is_named_by_survivors_it_never_talked_to() {
    let t = Instant::now();
    let out = run_local_with(4, patient(), |comm| async move {
        if comm.rank() == 3 {
            // Leaves without taking part (drops its communicator).
            return Ok(String::new());
        }
        let mut v = vec![1u32; 64];
        let e = comm.all_reduce(&mut v, ReduceOp::Sum).await.unwrap_err();
        Ok(e.to_string())
    })
    .await
    .unwrap();
    for (r, e) in out[..3].iter().enumerate() {
        assert!(e.contains("rank 3"), "rank {r}: {e}");
    }
    // Well within the 120 s operation timeout: the seed told the ranks.
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "took {:?}",
        t.elapsed()
    );
}
