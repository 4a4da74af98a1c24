//! Nothing leaks across `run_local` calls. In its own test binary: open
//! descriptors are per process, so sockets of other tests running beside it
//! would be counted as its leak.

use rankmesh::testing::run_local;
use std::time::Duration;

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_clusters_leak_no_tasks_or_sockets() {
    let round = || async {
        run_local(3, |comm| async move {
            let right = (comm.rank() + 1) % comm.size();
            let left = (comm.rank() + comm.size() - 1) % comm.size();
            let mine = vec![comm.rank() as u32; 1000];
            let (a, b) = tokio::join!(comm.send(&mine, right, 0), async {
                let mut got = vec![0u32; 1000];
                comm.recv(&mut got, left, 0).await.map(|_| got[0])
            });
            a?;
            Ok(b? as usize == left)
        })
        .await
        .unwrap()
    };
    // Warm up lazily created runtime resources first.
    assert!(round().await.iter().all(|&ok| ok));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let fds = open_fds();
    let tasks = tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks();
    for _ in 0..10 {
        assert!(round().await.iter().all(|&ok| ok));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        open_fds() <= fds,
        "sockets leaked: {} -> {}",
        fds,
        open_fds()
    );
    let after = tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks();
    assert!(after <= tasks, "tasks leaked: {tasks} -> {after}");
}
