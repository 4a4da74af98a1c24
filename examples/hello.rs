//! Pass a token around a ring of ranks, then allreduce.
//!
//! Under the launcher: `rankrun -n 4 target/debug/examples/hello`.
//! Alone (`cargo run --example hello`): forms a 4-rank cluster in this
//! process with `rankmesh::testing::run_local`.

use rankmesh::{Communicator, Result};

async fn ring(comm: Communicator) -> Result<String> {
    let (rank, size) = (comm.rank(), comm.size());
    let right = (rank + 1) % size;
    let left = (rank + size - 1) % size;
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
    // And an allreduce: the sum of 1..=size on every rank.
    let mut sum = [rank as u64 + 1];
    comm.all_reduce(&mut sum, rankmesh::ReduceOp::Sum).await?;
    Ok(format!(
        "rank {rank}/{size} of job {}: allreduce {}, token {}",
        comm.job_id(),
        sum[0],
        token[0]
    ))
}

#[tokio::main]
async fn main() -> Result<()> {
    if std::env::var_os("RANKMESH_SEED").is_some() {
        let comm = rankmesh::init().await?;
        let line = ring(comm.clone()).await?;
        println!("{line}");
        comm.finalize().await?;
    } else {
        for line in rankmesh::testing::run_local(4, ring).await? {
            println!("{line}");
        }
    }
    Ok(())
}
