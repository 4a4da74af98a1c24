//! collbench: nccl-tests-style timing of rankmesh collectives, one process
//! per rank over loopback QUIC.
//!
//! ```text
//! cargo bench --bench collbench -- -n 4 --ops allreduce,bcast,barrier,pingpong \
//!     --sizes 4,65536,1048576,16777216,67108864
//! ```
//!
//! Started without `RANKMESH_SEED`, it is its own launcher: it starts a seed
//! and `-n` copies of itself with the environment contract (so it needs no
//! `rankrun` build); under `rankrun` it runs as one rank. Per size: warm-up,
//! then batches of iterations; a batch's time per iteration is the maximum
//! over ranks, the reported time the median over batches; the result is
//! checked in the same run (`#wrong`). busbw factors as nccl-tests.
//!
//! Each rank runs on a current-thread tokio runtime; `--multi-thread` uses
//! tokio's multi-threaded runtime instead, with the rank's code on the
//! thread that blocks on it (as in the body of `#[tokio::main]`), and
//! `--spawn` moves the rank's code into a task on the runtime's workers.
//!
//! `--device wgpu` (built with `--features wgpu`) or `--device cuda`
//! (`--features cuda`) runs allreduce and bcast on device buffers instead
//! of host memory:
//!
//! ```text
//! cargo bench --features wgpu --bench collbench -- -n 2 --ops allreduce \
//!     --sizes 1048576,16777216,67108864 --device wgpu [--chunk BYTES] [--ring N]
//! ```

use rankmesh::bootstrap::{Seed, SeedConfig};
use rankmesh::{Communicator, ReduceOp, Result};
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
struct Args {
    np: usize,
    ops: Vec<String>,
    sizes: Vec<usize>,
    batches: usize,
    multi_thread: bool,
    spawn: bool,
    device: String,
    /// Staging chunk and ring depth for device memory (0: the default).
    chunk: usize,
    ring: usize,
}

fn parse() -> std::result::Result<Args, String> {
    let mut a = Args {
        np: 4,
        ops: ["allreduce", "bcast", "barrier", "pingpong"]
            .map(String::from)
            .to_vec(),
        sizes: vec![4, 65536, 1 << 20, 16 << 20, 64 << 20],
        batches: 7,
        multi_thread: false,
        spawn: false,
        device: "host".into(),
        chunk: 0,
        ring: 0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "-n" => a.np = val("-n")?.parse().map_err(|e| format!("-n: {e}"))?,
            "--ops" => a.ops = val("--ops")?.split(',').map(String::from).collect(),
            "--sizes" => {
                a.sizes = val("--sizes")?
                    .split(',')
                    .map(|s| s.parse().map_err(|e| format!("--sizes {s}: {e}")))
                    .collect::<std::result::Result<_, _>>()?
            }
            "--batches" => {
                a.batches = val("--batches")?
                    .parse()
                    .map_err(|e| format!("--batches: {e}"))?
            }
            "--multi-thread" => a.multi_thread = true,
            "--spawn" => a.spawn = true,
            "--device" => a.device = val("--device")?,
            "--chunk" => {
                a.chunk = val("--chunk")?
                    .parse()
                    .map_err(|e| format!("--chunk: {e}"))?
            }
            "--ring" => a.ring = val("--ring")?.parse().map_err(|e| format!("--ring: {e}"))?,
            // cargo bench passes --bench; ignore it.
            "--bench" => {}
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if !matches!(a.device.as_str(), "host" | "wgpu" | "cuda") {
        return Err(format!(
            "--device {}: expected host, wgpu or cuda",
            a.device
        ));
    }
    if a.np == 0 {
        return Err("-n must be at least 1".into());
    }
    Ok(a)
}

fn main() {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("collbench: {e}");
            std::process::exit(2);
        }
    };
    let mut rt = if args.multi_thread {
        tokio::runtime::Builder::new_multi_thread()
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    let rt = match rt.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("collbench: cannot start a runtime: {e}");
            std::process::exit(1);
        }
    };
    let res = if std::env::var_os("RANKMESH_SEED").is_some() {
        if args.spawn {
            rt.block_on(async {
                tokio::spawn(rank_main(args)).await.unwrap_or_else(|e| {
                    Err(rankmesh::Error::Config {
                        detail: format!("the rank's task failed: {e}"),
                    })
                })
            })
        } else {
            rt.block_on(rank_main(args))
        }
    } else {
        rt.block_on(launch(args))
    };
    if let Err(e) = res {
        eprintln!("collbench: {e}");
        std::process::exit(1);
    }
}

/// Start a seed and `np` copies of this program as ranks; wait for them.
async fn launch(args: Args) -> Result<()> {
    let seed = Seed::start(SeedConfig::new(args.np))?;
    let addr = seed.addr()?;
    let exe = std::env::current_exe().map_err(|e| rankmesh::Error::Config {
        detail: format!("cannot find this program: {e}"),
    })?;
    let mut children = Vec::new();
    for r in 0..args.np {
        let child = tokio::process::Command::new(&exe)
            .args(std::env::args().skip(1))
            .env("RANKMESH_SEED", addr.to_string())
            .env("RANKMESH_TOKEN", seed.token().to_hex())
            .env("RANKMESH_WORLD_SIZE", args.np.to_string())
            .env("RANKMESH_RANK", r.to_string())
            .env("RANKMESH_JOB_ID", seed.job_id())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| rankmesh::Error::Config {
                detail: format!("cannot start rank {r}: {e}"),
            })?;
        children.push(child);
    }
    let mut failed = None;
    for (r, mut c) in children.into_iter().enumerate() {
        match c.wait().await {
            Ok(s) if s.success() => {}
            other => failed = failed.or(Some(format!("rank {r} ended with {other:?}"))),
        }
    }
    seed.shutdown().await;
    match failed {
        Some(f) => Err(rankmesh::Error::Config { detail: f }),
        None => Ok(()),
    }
}

async fn rank_main(args: Args) -> Result<()> {
    let comm = rankmesh::init().await?;
    let device = Device::open(&args).await?;
    if comm.rank() == 0 {
        println!(
            "# collbench: {} ranks, f32, {} batches, {} runtime, {} memory",
            comm.size(),
            args.batches,
            if args.multi_thread {
                "multi-thread"
            } else {
                "current-thread"
            },
            device.name()
        );
        println!(
            "# {:>11} {:>10} {:>5} {:>5} {:>4} | {:>10} {:>8} {:>8} {:>6}",
            "size", "count", "type", "redop", "root", "time(us)", "algbw", "busbw", "#wrong"
        );
    }
    let mut bus = Vec::new();
    for op in &args.ops {
        let sizes: Vec<usize> = if op == "barrier" {
            vec![0]
        } else {
            args.sizes.clone()
        };
        for &size in &sizes {
            let (t, wrong) = run_one(&comm, &device, op, size, args.batches).await?;
            let p = comm.size() as f64;
            let factor = match op.as_str() {
                "allreduce" => 2.0 * (p - 1.0) / p,
                _ => 1.0,
            };
            let algbw = size as f64 / t / 1e9;
            if comm.rank() == 0 {
                let (redop, root) = match op.as_str() {
                    "allreduce" => ("sum", "-1"),
                    "bcast" => ("none", "0"),
                    _ => ("none", "-1"),
                };
                println!(
                    "{:>13} {:>10} {:>5} {:>5} {:>4} | {:>10.1} {:>8.3} {:>8.3} {:>6}   {op}",
                    size,
                    size / 4,
                    "float",
                    redop,
                    root,
                    t * 1e6,
                    algbw,
                    algbw * factor,
                    wrong
                );
            }
            if size > 0 {
                bus.push(algbw * factor);
            }
        }
    }
    if comm.rank() == 0 && !bus.is_empty() {
        println!(
            "# Avg bus bandwidth    : {:.3}",
            bus.iter().sum::<f64>() / bus.len() as f64
        );
    }
    comm.finalize().await
}

/// Iterations per batch so that a batch takes roughly 0.2-0.5 s.
fn iters_for(size: usize) -> usize {
    match size {
        0..=4096 => 500,
        4097..=1_048_576 => 50,
        1_048_577..=16_777_216 => 6,
        _ => 2,
    }
}

/// Median over batches of the per-iteration time (max over ranks), and the
/// number of wrong elements seen.
async fn run_one(
    comm: &Communicator,
    device: &Device,
    op: &str,
    size: usize,
    batches: usize,
) -> Result<(f64, u64)> {
    let n = size / 4;
    let (r, p) = (comm.rank(), comm.size());
    let input: Vec<f32> = (0..n).map(|i| ((r + i) % 7) as f32).collect();
    let expect: Vec<f32> = (0..n)
        .map(|i| (0..p).map(|q| ((q + i) % 7) as f32).sum())
        .collect();
    let mut buf = input.clone();
    let mut work = device.buffer(&input)?;
    let iters = iters_for(size);
    let mut wrong = 0u64;
    let mut times = Vec::new();
    for batch in 0..=batches {
        let mut spent = Duration::ZERO;
        for _ in 0..iters {
            match op {
                "allreduce" => {
                    work.reset(&mut buf, &input).await?;
                    let t = Instant::now();
                    work.all_reduce(comm, &mut buf).await?;
                    spent += t.elapsed();
                }
                "bcast" => {
                    let t = Instant::now();
                    work.broadcast(comm, &mut buf).await?;
                    spent += t.elapsed();
                }
                "barrier" => {
                    let t = Instant::now();
                    comm.barrier().await?;
                    spent += t.elapsed();
                }
                "pingpong" => {
                    // Ranks 0 and 1: a round trip; one-way time is half.
                    let t = Instant::now();
                    if r == 0 {
                        comm.send(&buf, 1, 1).await?;
                        comm.recv(&mut buf, 1, 2).await?;
                    } else if r == 1 {
                        comm.recv(&mut buf, 0, 1).await?;
                        comm.send(&buf, 0, 2).await?;
                    }
                    spent += t.elapsed() / 2;
                }
                other => {
                    return Err(rankmesh::Error::Config {
                        detail: format!("unknown op {other}"),
                    })
                }
            }
        }
        work.fetch(&mut buf).await?;
        if op == "allreduce" {
            wrong += buf.iter().zip(&expect).filter(|(a, b)| a != b).count() as u64;
        }
        if op == "bcast" && r != 0 {
            // Rank 0's input arrived everywhere.
            let want: Vec<f32> = (0..n).map(|i| (i % 7) as f32).collect();
            wrong += buf.iter().zip(&want).filter(|(a, b)| a != b).count() as u64;
        }
        let mut per = [spent.as_secs_f64() / iters as f64];
        comm.all_reduce(&mut per, ReduceOp::Max).await?;
        if batch > 0 {
            // Batch 0 is the warm-up.
            times.push(per[0]);
        }
    }
    let mut w = [wrong];
    comm.all_reduce(&mut w, ReduceOp::Sum).await?;
    times.sort_by(|a, b| a.total_cmp(b));
    Ok((times[times.len() / 2], w[0]))
}

/// Where the collectives' buffers live.
enum Device {
    Host,
    #[cfg(feature = "wgpu")]
    Wgpu(rankmesh::gpu::Wgpu),
    #[cfg(feature = "cuda")]
    Cuda(rankmesh::gpu::Cuda),
}

/// The device copy of a benchmark buffer.
enum Work {
    Host,
    #[cfg(feature = "wgpu")]
    Wgpu(rankmesh::gpu::Wgpu, rankmesh::gpu::WgpuBuffer<f32>),
    #[cfg(feature = "cuda")]
    Cuda(rankmesh::gpu::Cuda, rankmesh::gpu::CudaBuffer<f32>),
}

impl Device {
    async fn open(args: &Args) -> Result<Device> {
        match args.device.as_str() {
            #[cfg(feature = "wgpu")]
            "wgpu" => {
                let mut o = rankmesh::gpu::WgpuOptions::default();
                if args.chunk > 0 {
                    o.chunk_bytes = args.chunk;
                }
                if args.ring > 0 {
                    o.ring = args.ring;
                }
                Ok(Device::Wgpu(rankmesh::gpu::Wgpu::new(o).await?))
            }
            #[cfg(feature = "cuda")]
            "cuda" => {
                let mut o = rankmesh::gpu::CudaOptions::default();
                if args.chunk > 0 {
                    o.chunk_bytes = args.chunk;
                }
                if args.ring > 0 {
                    o.ring = args.ring;
                }
                Ok(Device::Cuda(rankmesh::gpu::Cuda::new(o)?))
            }
            "host" => Ok(Device::Host),
            other => Err(rankmesh::Error::Config {
                detail: format!(
                    "--device {other}: this build lacks it (cargo bench --features {other})"
                ),
            }),
        }
    }

    fn name(&self) -> String {
        match self {
            Device::Host => "host".into(),
            #[cfg(feature = "wgpu")]
            Device::Wgpu(g) => format!("{g:?}"),
            #[cfg(feature = "cuda")]
            Device::Cuda(g) => format!("{g:?}"),
        }
    }

    fn buffer(&self, input: &[f32]) -> Result<Work> {
        let _ = input;
        Ok(match self {
            Device::Host => Work::Host,
            #[cfg(feature = "wgpu")]
            Device::Wgpu(g) => {
                Work::Wgpu(g.clone(), rankmesh::gpu::WgpuBuffer::from_slice(g, input)?)
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(g) => {
                Work::Cuda(g.clone(), rankmesh::gpu::CudaBuffer::from_slice(g, input)?)
            }
        })
    }
}

impl Work {
    /// Restore the input (outside the timed region: the device copy is
    /// waited for).
    async fn reset(&mut self, host: &mut [f32], input: &[f32]) -> Result<()> {
        match self {
            Work::Host => {
                host.copy_from_slice(input);
                Ok(())
            }
            #[cfg(feature = "wgpu")]
            Work::Wgpu(g, d) => {
                d.write(0, input)?;
                g.synchronize().await
            }
            #[cfg(feature = "cuda")]
            Work::Cuda(g, d) => {
                d.write(0, input)?;
                g.synchronize().await
            }
        }
    }

    async fn all_reduce(&mut self, comm: &Communicator, host: &mut [f32]) -> Result<()> {
        match self {
            Work::Host => comm.all_reduce(host, ReduceOp::Sum).await,
            #[cfg(feature = "wgpu")]
            Work::Wgpu(_, d) => comm.all_reduce_device(d, ReduceOp::Sum).await,
            #[cfg(feature = "cuda")]
            Work::Cuda(_, d) => comm.all_reduce_device(d, ReduceOp::Sum).await,
        }
    }

    async fn broadcast(&mut self, comm: &Communicator, host: &mut [f32]) -> Result<()> {
        match self {
            Work::Host => comm.broadcast(host, 0).await,
            #[cfg(feature = "wgpu")]
            Work::Wgpu(_, d) => comm.broadcast_device(d, 0).await,
            #[cfg(feature = "cuda")]
            Work::Cuda(_, d) => comm.broadcast_device(d, 0).await,
        }
    }

    /// Copy the device result into `host` for checking.
    async fn fetch(&mut self, host: &mut [f32]) -> Result<()> {
        match self {
            Work::Host => {
                let _ = host; // already there
                Ok(())
            }
            #[cfg(feature = "wgpu")]
            Work::Wgpu(_, d) => {
                host.copy_from_slice(&d.to_vec().await?);
                Ok(())
            }
            #[cfg(feature = "cuda")]
            Work::Cuda(_, d) => {
                host.copy_from_slice(&d.to_vec().await?);
                Ok(())
            }
        }
    }
}
