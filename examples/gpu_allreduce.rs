//! Allreduce of "gradients" held in GPU memory, with wgpu.
//!
//! ```sh
//! cargo build --features wgpu --bins --examples
//! target/debug/rankrun -n 2 target/debug/examples/gpu_allreduce
//! ```
//!
//! Each rank opens the GPU chosen by its local rank (Mesa's lavapipe on a
//! machine without one), fills a buffer on it, and sums it over all ranks
//! on the device; the result is checked on the host.

use rankmesh::gpu::{Wgpu, WgpuBuffer, WgpuOptions};
use rankmesh::{ReduceOp, Result};
use std::time::Instant;

const N: usize = 4 << 20; // 16 MiB of f32

#[tokio::main]
async fn main() -> Result<()> {
    let comm = rankmesh::init().await?;
    let gpu = Wgpu::new(WgpuOptions::default()).await?;
    let (r, p) = (comm.rank(), comm.size());

    // In a training job these would be the gradients a backward pass left
    // in a wgpu buffer; WgpuBuffer::from_buffer wraps such a buffer.
    let grads: Vec<f32> = (0..N).map(|i| ((r + i) % 5) as f32).collect();
    let mut buf = WgpuBuffer::from_slice(&gpu, &grads)?;

    let t = Instant::now();
    comm.all_reduce_device(&mut buf, ReduceOp::Sum).await?;
    let took = t.elapsed();

    let sum = buf.to_vec().await?;
    let wrong = (0..N)
        .filter(|&i| sum[i] != (0..p).map(|q| ((q + i) % 5) as f32).sum::<f32>())
        .count();
    println!(
        "rank {r}/{p} on {}: allreduce of {} MiB in {:.1} ms, {wrong} wrong elements",
        gpu.name(),
        (N * 4) >> 20,
        took.as_secs_f64() * 1e3
    );
    comm.finalize().await?;
    if wrong > 0 {
        std::process::exit(1);
    }
    Ok(())
}
