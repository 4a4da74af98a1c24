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
