//! Does a rank's memory stay flat over a long job? Resident memory of this
//! process (2 ranks in it, over the in-process transport, so the figures
//! are the bookkeeping's and not socket buffers') before and after:
//! small allreduces, point-to-point messages on one tag, messages on
//! distinct tags, and split/use/drop cycles.
//!
//! ```text
//! cargo bench --bench footprint -- [--scale 1.0]
//! ```
//!
//! `--scale` multiplies the counts (1.0: 1,000,000 allreduces, 100,000
//! messages on one tag, 100,000 on distinct tags, 1,000 split cycles).

use rankmesh::{Communicator, ReduceOp, Result};
use std::time::Instant;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Exchange `n` 8-byte messages with the other rank, tag chosen by `tag`.
async fn exchange(comm: &Communicator, n: u64, tag: impl Fn(u64) -> u32) -> Result<()> {
    let peer = 1 - comm.rank();
    let mut got = [0u64; 1];
    for i in 0..n {
        if comm.rank() == 0 {
            comm.send(&[i], peer, tag(i)).await?;
            comm.recv(&mut got, peer, tag(i)).await?;
        } else {
            comm.recv(&mut got, peer, tag(i)).await?;
            comm.send(&[i], peer, tag(i)).await?;
        }
    }
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let scale: f64 = args
        .iter()
        .position(|a| a == "--scale")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(1.0);
    let n = |base: f64| (base * scale).max(1.0) as u64;
    let (allreduces, one_tag, tags, splits) = (n(1e6), n(1e5), n(1e5), n(1e3));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let rows = rt
        .block_on(
            rankmesh::testing::LocalJob::in_memory(2).run(move |comm| async move {
                let mut rows = Vec::new();
                let mut step = |what: String, before: u64, t: Instant| {
                    rows.push((what, before, rss_kib(), t.elapsed().as_secs_f64()));
                };
                // Warm-up: the first allocations of every path.
                for _ in 0..1000 {
                    comm.all_reduce(&mut [1u32], ReduceOp::Sum).await?;
                }
                exchange(&comm, 1000, |_| 0).await?;
                comm.barrier().await?;

                let (b, t) = (rss_kib(), Instant::now());
                for _ in 0..allreduces {
                    comm.all_reduce(&mut [1u32], ReduceOp::Sum).await?;
                }
                comm.barrier().await?;
                step(format!("{allreduces} allreduces of 4 B"), b, t);

                let (b, t) = (rss_kib(), Instant::now());
                exchange(&comm, one_tag, |_| 1).await?;
                comm.barrier().await?;
                step(format!("{one_tag} messages on one tag"), b, t);

                let (b, t) = (rss_kib(), Instant::now());
                exchange(&comm, tags, |i| 1000 + i as u32).await?;
                comm.barrier().await?;
                step(format!("{tags} messages on distinct tags"), b, t);

                let (b, t) = (rss_kib(), Instant::now());
                for i in 0..splits {
                    let sub = comm.split(0, comm.rank() as u32).await?;
                    exchange(&sub, 1, |_| i as u32).await?;
                    sub.all_reduce(&mut [1u64; 4], ReduceOp::Sum).await?;
                }
                comm.barrier().await?;
                step(format!("{splits} split/use/drop cycles"), b, t);
                Ok(rows)
            }),
        )
        .expect("run");
    // Both ranks share this process: rank 0's view carries the figures.
    println!("| phase (2 ranks, one process, in-process transport) | RSS before (MiB) | after (MiB) | growth (MiB) | time (s) |");
    println!("|---|---:|---:|---:|---:|");
    for (what, before, after, secs) in &rows[0] {
        println!(
            "| {what} | {:.1} | {:.1} | {:+.1} | {secs:.1} |",
            *before as f64 / 1024.0,
            *after as f64 / 1024.0,
            (*after as f64 - *before as f64) / 1024.0
        );
    }
}
