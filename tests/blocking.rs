//! The synchronous facade: ranks on plain threads, no async in sight.

use rankmesh::launch::{JoinSpec, Seed, SeedConfig};
use rankmesh::{blocking, Config, ReduceOp, Result};
use std::net::{IpAddr, Ipv4Addr};

/// Start a seed for `n` ranks and run `f` on `n` threads, each joining
/// through `blocking::init_with`; outputs in rank order.
fn run_threads<T: Send + 'static>(
    n: usize,
    f: fn(blocking::BlockingCommunicator) -> Result<T>,
) -> Vec<T> {
    let seed_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let seed = seed_rt
        .block_on(async { Seed::start(SeedConfig::new(n)) })
        .expect("seed");
    let addr = seed.addr().expect("seed address");
    let threads: Vec<_> = (0..n)
        .map(|r| {
            let spec = JoinSpec {
                seed: addr,
                token: seed.token().clone(),
                job_id: Some(seed.job_id().to_string()),
                rank: Some(r),
                world_size: Some(n),
                host: "localhost".into(),
                late: false,
            };
            std::thread::spawn(move || {
                let mut cfg = Config::default();
                cfg.set_bind_ip(Some(IpAddr::V4(Ipv4Addr::LOCALHOST)));
                let comm = blocking::init_with(spec, cfg)?;
                let out = f(comm.clone())?;
                comm.finalize()?;
                Ok::<T, rankmesh::Error>(out)
            })
        })
        .collect();
    let outs = threads
        .into_iter()
        .map(|t| t.join().expect("rank thread").expect("rank"))
        .collect();
    seed_rt.block_on(seed.shutdown());
    outs
}

#[test]
fn blocking_facade_runs_a_data_parallel_step() {
    let outs = run_threads(3, |comm| {
        let (rank, size) = (comm.rank(), comm.size());
        // Point-to-point around a ring (sends complete before the receive).
        comm.send(&[rank as u32], (rank + 1) % size, 5)?;
        let mut left = [0u32];
        comm.recv(&mut left, (rank + size - 1) % size, 5)?;
        comm.barrier()?;
        // Rank 0's parameters everywhere, then a summed gradient.
        let mut params = vec![rank as f32; 4];
        if rank == 0 {
            params = vec![1.0, 2.0, 3.0, 4.0];
        }
        comm.broadcast(&mut params, 0)?;
        let mut grad = vec![rank as f32 + 1.0; 4];
        comm.all_reduce(&mut grad, ReduceOp::Sum)?;
        let mut ranks = vec![0u64; size];
        comm.all_gather(&[rank as u64], &mut ranks)?;
        // A sub-communicator shares the runtime.
        let half = comm.split((rank % 2) as u32, 0)?;
        let mut one = [1u32];
        half.all_reduce(&mut one, ReduceOp::Sum)?;
        Ok((left[0], params, grad, ranks, one[0]))
    });
    for (r, (left, params, grad, ranks, half)) in outs.into_iter().enumerate() {
        assert_eq!(left as usize, (r + 2) % 3);
        assert_eq!(params, [1.0, 2.0, 3.0, 4.0]);
        assert_eq!(grad, [6.0; 4]);
        assert_eq!(ranks, [0, 1, 2]);
        assert_eq!(half, if r % 2 == 0 { 2 } else { 1 });
    }
}

#[tokio::test]
async fn blocking_facade_refuses_an_async_context() {
    let e = blocking::init().expect_err("init inside a runtime");
    assert!(e.to_string().contains("async"), "{e}");
}
