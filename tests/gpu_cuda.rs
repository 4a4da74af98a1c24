//! Collectives on CUDA buffers, checked bitwise against the same
//! collectives on host memory, over real QUIC.
//!
//! Run with `cargo test --features cuda --test gpu_cuda`. Without a CUDA
//! driver (CI has none) every test prints why it skips and passes; on a
//! GPU host the same tests run unchanged.
#![cfg(feature = "cuda")]

mod gpu_common;

use gpu_common::{data, grid, same, Dev, Elem};
use rankmesh::gpu::BoxFut;
use rankmesh::gpu::{Cuda, CudaBuffer, CudaElement, CudaOptions};
use rankmesh::testing::{run_local, LocalJob};
use rankmesh::{Algorithm, Config, ReduceOp, Result};
use std::io::Write as _;

/// Small chunks and a short ring, so small test buffers go through many
/// chunks and the ring wraps around.
fn gpu() -> Result<Cuda> {
    Cuda::new(CudaOptions {
        device: Some(0),
        chunk_bytes: 1024,
        ring: 2,
    })
}

fn have_gpu() -> bool {
    match gpu() {
        Ok(_) => true,
        Err(e) => {
            let _ = writeln!(
                std::io::stderr(),
                "\n*** SKIPPED: the CUDA tests: {e} (they run on a machine with an NVIDIA GPU: \
                 scripts/gpu-check.sh) ***\n"
            );
            false
        }
    }
}

impl<T: Elem + CudaElement> Dev<T> for Cuda {
    type Buf = CudaBuffer<T>;
    fn upload(&self, data: &[T]) -> Result<CudaBuffer<T>> {
        CudaBuffer::from_slice(self, data)
    }
    fn zeroed(&self, n: usize) -> Result<CudaBuffer<T>> {
        CudaBuffer::zeroed(self, n)
    }
    fn read<'a>(&'a self, b: &'a CudaBuffer<T>) -> BoxFut<'a, Result<Vec<T>>> {
        Box::pin(b.to_vec())
    }
}

async fn every_collective_on(p: usize) {
    if !have_gpu() {
        return;
    }
    run_local(p, |comm| async move {
        let gpu = gpu()?;
        grid::<f32, _>(&comm, &gpu, true).await?;
        grid::<f64, _>(&comm, &gpu, true).await?;
        grid::<i32, _>(&comm, &gpu, true).await?;
        grid::<u32, _>(&comm, &gpu, true).await?;
        grid::<i64, _>(&comm, &gpu, true).await?;
        grid::<u64, _>(&comm, &gpu, true).await?;
        grid::<half::f16, _>(&comm, &gpu, true).await?;
        grid::<half::bf16, _>(&comm, &gpu, true).await?;
        comm.finalize().await
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_collective_matches_the_host_path_on_1_to_4_ranks() {
    for p in 1..=4 {
        every_collective_on(p).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_algorithm_matches_the_host_path() {
    if !have_gpu() {
        return;
    }
    for alg in [
        Algorithm::Ring,
        Algorithm::RecursiveDoubling,
        Algorithm::Rabenseifner,
        Algorithm::ScatterAllgather,
    ] {
        let mut cfg = Config::default();
        cfg.set_algorithm(Some(alg));
        LocalJob::quic(3)
            .config(cfg)
            .run(|comm| async move {
                let gpu = gpu()?;
                grid::<f32, _>(&comm, &gpu, false).await?;
                comm.finalize().await
            })
            .await
            .unwrap_or_else(|e| panic!("{alg:?}: {e}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_and_host_calls_interoperate() {
    if !have_gpu() {
        return;
    }
    run_local(2, |comm| async move {
        let gpu = gpu()?;
        let mut v = data::<f64>(comm.rank(), 3000);
        let mut want = data::<f64>(0, 3000);
        for (x, y) in want.iter_mut().zip(data::<f64>(1, 3000)) {
            *x += y;
        }
        if comm.rank() == 0 {
            comm.all_reduce(&mut v, ReduceOp::Sum).await?;
            same("host side", &v, &want)?;
        } else {
            let mut d = CudaBuffer::from_slice(&gpu, &v)?;
            comm.all_reduce_device(&mut d, ReduceOp::Sum).await?;
            same("device side", &d.to_vec().await?, &want)?;
        }
        comm.finalize().await
    })
    .await
    .unwrap();
}

#[test]
fn without_a_driver_creation_is_a_clear_error() {
    match gpu() {
        Ok(g) => println!("a CUDA device is present: {}", g.name()),
        Err(e) => {
            let e = e.to_string();
            assert!(e.contains("CUDA") || e.contains("NVRTC"), "{e}");
            assert!(e.contains("driver") || e.contains("nvrtc"), "{e}");
        }
    }
}
