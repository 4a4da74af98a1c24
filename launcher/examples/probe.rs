//! A rank program for rankrun's tests (not for users).
//!
//! Prints `pid=<pid>`, joins the job, then passes a token around the ring
//! and allreduces:
//! once (`PROBE=ring`, the default) or forever (`PROBE=loop`). With
//! `PROBE_VICTIM=r`, rank r kills itself with SIGKILL in the middle of the
//! loop. `PROBE=hang`: after 3 rounds rank 0 enters an allreduce that no
//! other rank joins (they sleep for a minute), to inspect a hung job.

use rankmesh::Result;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    println!("pid={}", std::process::id());
    let mode = std::env::var("PROBE").unwrap_or_else(|_| "ring".into());
    if mode == "elastic" {
        return elastic().await;
    }
    if mode == "cycles" {
        return cycles().await;
    }
    let victim: Option<usize> = std::env::var("PROBE_VICTIM")
        .ok()
        .and_then(|v| v.parse().ok());
    let comm = rankmesh::init().await?;
    let (rank, size) = (comm.rank(), comm.size());
    let right = (rank + 1) % size;
    let left = (rank + size - 1) % size;
    let mut round: u64 = 0;
    loop {
        let mut token = [0u64];
        if rank == 0 {
            token[0] = 1;
            comm.send(&token, right, 7).await?;
            comm.recv(&mut token, left, 7).await?;
        } else {
            comm.recv(&mut token, left, 7).await?;
            token[0] += 1;
            comm.send(&token, right, 7).await?;
        }
        // A collective every round, so that a victim dies mid-collective.
        let mut v = vec![rank as u64 + 1; 1024];
        comm.all_reduce(&mut v, rankmesh::ReduceOp::Sum).await?;
        let want = (size * (size + 1) / 2) as u64;
        if v.iter().any(|&x| x != want) {
            eprintln!("rank {rank}: allreduce gave a wrong result");
            std::process::exit(3);
        }
        round += 1;
        if mode == "hang" && round == 3 {
            if rank == 0 {
                println!("rank 0: waiting in an allreduce nobody else joins");
                let mut v = [1u32];
                comm.all_reduce(&mut v, rankmesh::ReduceOp::Sum).await?;
            } else {
                tokio::time::sleep(std::time::Duration::from_secs(60)).await;
            }
            return Ok(());
        }
        if mode != "loop" && mode != "hang" {
            println!("rank {rank}/{size}: token {}", token[0]);
            break;
        }
        if round == 20 && Some(rank) == victim {
            println!("rank {rank}: killing myself mid-loop");
            // SAFETY: kill(2) on our own pid; no memory is involved.
            unsafe {
                libc::kill(libc::getpid(), libc::SIGKILL);
            }
        }
    }
    comm.finalize().await?;
    Ok(())
}

/// `PROBE=elastic`: an elastic job's rank (or a joiner). Checkpoints until
/// the job has `PROBE_TARGET` ranks, then allreduces a few rounds. With
/// `PROBE_VICTIM=r`, rank r kills itself in the first round; the others
/// recover without it and finish.
async fn elastic() -> Result<()> {
    let env_num = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<usize>().ok());
    let target = env_num("PROBE_TARGET").unwrap_or(2);
    let victim = env_num("PROBE_VICTIM");
    let pid = std::process::id();
    let start = rankmesh::init_elastic().await?;
    let mut comm = start.comm;
    let m = &start.membership;
    println!(
        "pid {pid}: start as rank {}/{} in epoch {} (state {:?})",
        m.rank,
        m.size,
        m.epoch,
        String::from_utf8_lossy(&start.state)
    );
    while comm.size() < target {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let r = comm
            .checkpoint(format!("epoch {}", m.epoch).as_bytes())
            .await?;
        if r.membership.changed() {
            println!(
                "pid {pid}: epoch {}: rank {}/{} (was {:?}, joined {:?})",
                r.membership.epoch,
                r.membership.rank,
                r.membership.size,
                r.membership.previous_rank,
                r.membership.joined
            );
        }
        comm = r.comm;
    }
    let mut round = 0;
    while round < 5 {
        if round == 1 && Some(comm.rank()) == victim && comm.size() == target {
            println!("pid {pid}: rank {} killing itself", comm.rank());
            // SAFETY: kill(2) on our own pid; no memory is involved.
            unsafe {
                libc::kill(libc::getpid(), libc::SIGKILL);
            }
        }
        let mut v = vec![comm.rank() as u64 + 1; 256];
        match comm.all_reduce(&mut v, rankmesh::ReduceOp::Sum).await {
            Ok(()) => {
                let n = comm.size() as u64;
                if v.iter().any(|&x| x != n * (n + 1) / 2) {
                    eprintln!("pid {pid}: wrong allreduce result");
                    std::process::exit(3);
                }
                round += 1;
            }
            Err(e) => {
                println!("pid {pid}: rank {} lost a peer: {e}", comm.rank());
                // Roll back to the committed progress: the new rank 0's round
                // (a survivor may have finished a round the others did not).
                let r = comm.recover(round.to_string().as_bytes()).await?;
                round = String::from_utf8_lossy(&r.state).parse().unwrap_or(round);
                println!(
                    "pid {pid}: recovered as rank {}/{} in epoch {} (left {:?}) at round {round}",
                    r.membership.rank, r.membership.size, r.membership.epoch, r.membership.left
                );
                comm = r.comm;
            }
        }
    }
    println!("pid {pid}: done as rank {}/{}", comm.rank(), comm.size());
    comm.finalize().await
}

/// The process's open file descriptors and resident memory (KiB, after
/// returning free heap pages to the system).
fn footprint() -> (usize, u64) {
    // SAFETY: malloc_trim only releases free memory of glibc's heap.
    unsafe {
        libc::malloc_trim(0);
    }
    let fds = std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0);
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    (fds, pages * 4)
}

/// `PROBE=cycles`: the job's 2 first ranks, `PROBE_CYCLES` times: wait at
/// checkpoints for a joiner (3 ranks), allreduce, then shrink back to 2
/// once it has left, allreduce; rank 0 prints its footprint. A joiner
/// (`rankrun --join`) allreduces once with them and leaves.
async fn cycles() -> Result<()> {
    let n: usize = std::env::var("PROBE_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let start = rankmesh::init_elastic().await?;
    let mut comm = start.comm;
    let check = |comm: &rankmesh::Communicator, v: &[u64]| {
        let k = comm.size() as u64;
        if v.iter().any(|&x| x != k * (k + 1) / 2) {
            eprintln!("wrong allreduce result on {k} ranks");
            std::process::exit(3);
        }
    };
    if start.membership.previous_rank.is_none() {
        // A joiner: one allreduce with the job, then leave.
        let mut v = vec![comm.rank() as u64 + 1; 64];
        comm.all_reduce(&mut v, rankmesh::ReduceOp::Sum).await?;
        check(&comm, &v);
        println!(
            "joiner: allreduce ok as rank {}/{}",
            comm.rank(),
            comm.size()
        );
        comm.shutdown_after_error().await;
        return Ok(());
    }
    for cycle in 0..n {
        for want in [3, 2] {
            while comm.size() != want {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                comm = comm.checkpoint(b"cycles").await?.comm;
            }
            let mut v = vec![comm.rank() as u64 + 1; 64];
            comm.all_reduce(&mut v, rankmesh::ReduceOp::Sum).await?;
            check(&comm, &v);
        }
        if comm.rank() == 0 {
            let (fds, rss) = footprint();
            println!(
                "cycle {cycle}: {fds} fds, {rss} KiB resident, pid {}",
                std::process::id()
            );
        }
    }
    comm.finalize().await
}
