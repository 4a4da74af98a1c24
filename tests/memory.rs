//! Many small collectives must not grow memory: nothing per call may be
//! kept (mailbox entries, stream state, sequence bookkeeping).

use rankmesh::testing::run_local;
use rankmesh::ReduceOp;

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_thousand_small_allreduces_keep_memory_flat() {
    let out = run_local(2, |comm| async move {
        let mut v = [1.0f32];
        for _ in 0..5_000 {
            comm.all_reduce(&mut v, ReduceOp::Max).await?;
        }
        comm.barrier().await?;
        let before = rss_bytes();
        for _ in 0..50_000 {
            comm.all_reduce(&mut v, ReduceOp::Max).await?;
        }
        comm.barrier().await?;
        Ok((before, rss_bytes(), v[0]))
    })
    .await
    .unwrap();
    // Both ranks live in this process; compare the process's RSS.
    let (before, after, v) = out[0];
    assert_eq!(v, 1.0);
    let grew = after.saturating_sub(before);
    assert!(
        grew < 5 << 20,
        "RSS grew by {} KiB over 50,000 allreduces",
        grew >> 10
    );
}
