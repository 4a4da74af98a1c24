//! Collectives on wgpu buffers (Mesa's lavapipe in CI), checked bitwise
//! against the same collectives on host memory, over real QUIC.
//!
//! Run with `cargo test --features wgpu --test gpu_wgpu`. Without an
//! adapter the tests print why and pass, except when `CI=true`, where a
//! missing adapter fails them (CI installs lavapipe).
#![cfg(feature = "wgpu")]

mod gpu_common;

use gpu_common::{data, grid, same, Dev, Elem};
use rankmesh::gpu::BoxFut;
use rankmesh::gpu::{wgpu, DeviceBuffer, Wgpu, WgpuBuffer, WgpuElement, WgpuOptions};
use rankmesh::testing::{run_local, LocalJob};
use rankmesh::{Algorithm, Config, ReduceOp, Result};
use std::io::Write as _;

/// A device with small chunks and a short ring, so that small test
/// buffers go through many chunks and the ring wraps around.
async fn gpu() -> Result<Wgpu> {
    Wgpu::new(WgpuOptions {
        adapter: Some(0),
        chunk_bytes: 1024,
        ring: 2,
    })
    .await
}

/// Whether the tests can run; `CI=true` makes a missing adapter fatal.
async fn have_gpu() -> bool {
    match gpu().await {
        Ok(_) => true,
        Err(e) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("CI=true but no GPU adapter is usable: {e}")
        }
        Err(e) => {
            let _ = writeln!(
                std::io::stderr(),
                "\n*** SKIPPED: the wgpu tests: no usable GPU adapter ({e}); without a GPU \
                 install Mesa's software Vulkan driver: apt-get install mesa-vulkan-drivers \
                 libvulkan1 ***\n"
            );
            false
        }
    }
}

impl<T: Elem + WgpuElement> Dev<T> for Wgpu {
    type Buf = WgpuBuffer<T>;
    fn upload(&self, data: &[T]) -> Result<WgpuBuffer<T>> {
        WgpuBuffer::from_slice(self, data)
    }
    fn zeroed(&self, n: usize) -> Result<WgpuBuffer<T>> {
        WgpuBuffer::zeroed(self, n)
    }
    fn read<'a>(&'a self, b: &'a WgpuBuffer<T>) -> BoxFut<'a, Result<Vec<T>>> {
        Box::pin(b.to_vec())
    }
}

async fn every_collective_on(p: usize) {
    if !have_gpu().await {
        return;
    }
    run_local(p, |comm| async move {
        let gpu = gpu().await?;
        grid::<f32, _>(&comm, &gpu, true).await?;
        grid::<i32, _>(&comm, &gpu, true).await?;
        grid::<u32, _>(&comm, &gpu, true).await?;
        // bf16 everywhere (emulated with u32 words).
        grid::<half::bf16, _>(&comm, &gpu, true).await?;
        if gpu.supports_f16() {
            grid::<half::f16, _>(&comm, &gpu, true).await?;
        } else if comm.rank() == 0 {
            eprintln!("{}: no shader-f16, f16 not tested", gpu.name());
        }
        comm.finalize().await
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_collective_matches_the_host_path_on_1_rank() {
    every_collective_on(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_collective_matches_the_host_path_on_2_ranks() {
    every_collective_on(2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_collective_matches_the_host_path_on_3_ranks() {
    every_collective_on(3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_collective_matches_the_host_path_on_4_ranks() {
    every_collective_on(4).await;
}

/// Each forced algorithm streams differently (ring and Rabenseifner stream
/// disjoint ranges, recursive doubling stages its sends first, the van de
/// Geijn broadcast scatters then gathers).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_algorithm_matches_the_host_path() {
    if !have_gpu().await {
        return;
    }
    for alg in [
        Algorithm::Ring,
        Algorithm::RecursiveDoubling,
        Algorithm::Rabenseifner,
        Algorithm::ScatterAllgather,
    ] {
        for p in [3, 4] {
            let mut cfg = Config::default();
            cfg.set_algorithm(Some(alg));
            LocalJob::quic(p)
                .config(cfg)
                .run(|comm| async move {
                    let gpu = gpu().await?;
                    grid::<f32, _>(&comm, &gpu, false).await?;
                    comm.finalize().await
                })
                .await
                .unwrap_or_else(|e| panic!("{alg:?} on {p} ranks: {e}"));
        }
    }
}

/// A device call matches a host call of the same shape on another rank,
/// and a length mismatch is reported, not hung on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_and_host_calls_interoperate_and_mismatches_are_named() {
    if !have_gpu().await {
        return;
    }
    let out = run_local(2, |comm| async move {
        let gpu = gpu().await?;
        let mut v = data::<f32>(comm.rank(), 600);
        let want = {
            let mut a = data::<f32>(0, 600);
            for (x, y) in a.iter_mut().zip(data::<f32>(1, 600)) {
                *x += y;
            }
            a
        };
        if comm.rank() == 0 {
            comm.all_reduce(&mut v, ReduceOp::Sum).await?;
            same("host side", &v, &want)?;
        } else {
            let mut d = WgpuBuffer::from_slice(&gpu, &v)?;
            comm.all_reduce_device(&mut d, ReduceOp::Sum).await?;
            same("device side", &d.to_vec().await?, &want)?;
        }
        let n = if comm.rank() == 0 { 5 } else { 6 };
        let mut d = WgpuBuffer::<u32>::zeroed(&gpu, n)?;
        let e = comm.all_reduce_device(&mut d, ReduceOp::Sum).await;
        Ok(e.err().map(|e| e.to_string()))
    })
    .await
    .unwrap();
    for (r, e) in out.iter().enumerate() {
        let e = e.as_deref().unwrap_or_else(|| panic!("rank {r}: no error"));
        assert!(e.contains("disagree"), "rank {r}: {e}");
        assert!(e.contains('5') && e.contains('6'), "rank {r}: {e}");
    }
}

/// Buffers from the application's own device work, with checks on what
/// collectives need.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn application_buffers_are_wrapped_and_checked() {
    if !have_gpu().await {
        return;
    }
    let gpu = gpu().await.unwrap();
    let dev = gpu.device().clone();
    let own = dev.create_buffer(&wgpu::BufferDescriptor {
        label: Some("app"),
        size: 64,
        usage: wgpu::BufferUsages::STORAGE
            | wgpu::BufferUsages::COPY_SRC
            | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let b = WgpuBuffer::<f32>::from_buffer(&gpu, own.clone(), 16).unwrap();
    b.write(0, &[2.5; 16]).unwrap();
    assert_eq!(b.to_vec().await.unwrap(), vec![2.5f32; 16]);
    assert_eq!(b.len(), 16);
    let e = WgpuBuffer::<f32>::from_buffer(&gpu, own, 17).unwrap_err();
    assert!(e.to_string().contains("17 elements"), "{e}");
    let bad = dev.create_buffer(&wgpu::BufferDescriptor {
        label: Some("app"),
        size: 64,
        usage: wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let e = WgpuBuffer::<f32>::from_buffer(&gpu, bad, 16).unwrap_err();
    assert!(e.to_string().contains("STORAGE"), "{e}");
    let e = b.write(10, &[1.0; 7]).unwrap_err();
    assert!(e.to_string().contains("outside"), "{e}");
    if gpu.supports_f16() {
        // 2-byte elements: whole words only, except at the end.
        let h = WgpuBuffer::<half::f16>::from_slice(&gpu, &[half::f16::ONE; 5]).unwrap();
        assert!(h.write(1, &[half::f16::ZERO; 2]).is_err());
        h.write(2, &[half::f16::ZERO; 3]).unwrap();
        let want = [1.0f32, 1.0, 0.0, 0.0, 0.0].map(half::f16::from_f32);
        assert_eq!(h.to_vec().await.unwrap(), want);
    }
}

/// What every backend's buffer checks before it moves data: copies between
/// buffers of another element type, another device or outside either
/// buffer are refused with what went wrong; duplicates and copies move
/// exactly the range asked for; a device collective refuses two buffers of
/// different element types on every rank.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffer_copies_are_checked_and_exact() {
    if !have_gpu().await {
        return;
    }
    let dev = gpu().await.unwrap();
    let a = WgpuBuffer::<u32>::from_slice(&dev, &[1, 2, 3, 4, 5, 6]).unwrap();
    let b = WgpuBuffer::<u32>::zeroed(&dev, 4).unwrap();
    b.copy_from(&a, 2..5, 1).unwrap();
    assert_eq!(b.to_vec().await.unwrap(), vec![0, 3, 4, 5]);
    let d = a.duplicate(1..4).unwrap();
    assert_eq!((d.len(), d.dtype()), (3, a.dtype()));
    b.copy_from(&*d, 0..3, 0).unwrap();
    assert_eq!(b.to_vec().await.unwrap(), vec![2, 3, 4, 5]);
    b.copy_from(&a, 6..6, 4).unwrap();

    let e = b.copy_from(&a, 4..7, 0).unwrap_err().to_string();
    assert!(e.contains("copy source") && e.contains("4..7"), "{e}");
    let e = b.copy_from(&a, 0..3, 2).unwrap_err().to_string();
    assert!(e.contains("copy destination") && e.contains("2..5"), "{e}");
    let e = a
        .duplicate(5..8)
        .err()
        .expect("duplicate out of range")
        .to_string();
    assert!(e.contains("duplicate") && e.contains("5..8"), "{e}");
    let f = WgpuBuffer::<f32>::zeroed(&dev, 6).unwrap();
    let e = b.copy_from(&f, 0..2, 0).unwrap_err().to_string();
    assert!(
        e.contains("F32") && e.contains("U32") && e.contains("one backend"),
        "{e}"
    );
    let other = Wgpu::new(WgpuOptions::default()).await.unwrap();
    let c = WgpuBuffer::<u32>::zeroed(&other, 6).unwrap();
    let e = c.copy_from(&a, 0..2, 0).unwrap_err().to_string();
    assert!(e.contains("two different wgpu devices"), "{e}");

    let out = run_local(2, |comm| async move {
        let gpu = gpu().await?;
        let send = WgpuBuffer::<u32>::zeroed(&gpu, 3)?;
        let mut recv = WgpuBuffer::<f32>::zeroed(&gpu, 6)?;
        let e = comm.all_gather_device(&send, &mut recv).await;
        // The refusal told the peer: the communicator still works.
        let mut v = [1u32];
        comm.all_reduce(&mut v, ReduceOp::Sum).await?;
        Ok((e.err().map(|e| e.to_string()), v[0]))
    })
    .await
    .unwrap();
    for (r, (e, sum)) in out.into_iter().enumerate() {
        let e = e.unwrap_or_else(|| panic!("rank {r}: no error"));
        assert!(
            e.contains("U32") && e.contains("F32") && e.contains("one type"),
            "rank {r}: {e}"
        );
        assert_eq!(sum, 2, "rank {r}");
    }
}

/// Devices are created, used and dropped many times in one process, and
/// two are held at once (elastic rebuilds and libraries embedding rankmesh
/// do this). On NVIDIA's Vulkan driver this once killed the process with
/// SIGSEGV after the first drop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_are_created_used_and_dropped_repeatedly() {
    if !have_gpu().await {
        return;
    }
    let data: Vec<f32> = (0..3000).map(|i| i as f32).collect();
    for round in 0..20 {
        let dev = gpu().await.unwrap();
        let b = WgpuBuffer::from_slice(&dev, &data).unwrap();
        let copy = b.duplicate(10..2010).unwrap();
        drop(copy);
        assert_eq!(b.to_vec().await.unwrap(), data, "round {round}");
        if round % 5 == 0 {
            // A second device alongside the first, both in use.
            let other = gpu().await.unwrap();
            let c = WgpuBuffer::from_slice(&other, &data[..100]).unwrap();
            assert_eq!(c.to_vec().await.unwrap(), &data[..100], "round {round}");
            assert_eq!(b.to_vec().await.unwrap(), data, "round {round}");
            drop(dev);
            assert_eq!(c.to_vec().await.unwrap(), &data[..100], "round {round}");
        }
    }
    // And a collective after all that, on a fresh device.
    run_local(2, |comm| async move {
        let gpu = gpu().await?;
        let mut b = WgpuBuffer::from_slice(&gpu, &[comm.rank() as f32 + 1.0; 257])?;
        comm.all_reduce_device(&mut b, ReduceOp::Sum).await?;
        same("after 20 devices", &b.to_vec().await?, &[3.0f32; 257])?;
        comm.finalize().await
    })
    .await
    .unwrap();
}
