//! `collbench`: nccl-tests for rankmesh. Times collectives over a range of
//! sizes and prints nccl-tests' table (size, count, type, redop, root, time,
//! algbw, busbw, #wrong), with its flags and bus bandwidth factors.
//!
//! ```text
//! rankrun -n 4 collbench --coll allreduce,allgather -b 8 -e 128M -f 2
//! collbench --np 4 --coll allreduce -b 1K -e 1M -d bfloat16 -o max --json -
//! collbench --np 2 --device wgpu --coll allreduce,broadcast -b 1M -e 64M --plot busbw.svg
//! ```
//!
//! A row's time is the mean over `-n` iterations on each rank, the maximum
//! over ranks (a collective is done when its slowest rank is), the median
//! over `--batches`. Exit status: 0, 1 when a run failed or `#wrong` was not
//! zero, 2 for a bad command line.

mod args;
mod bench;
mod device;
mod plot;
mod report;

use args::{Args, Coll, Dtype};
use clap::Parser;
use device::Device;
use rankmesh::launch::{Seed, SeedConfig};
use rankmesh::{Communicator, Error, Result};
use std::io::Write;

fn main() {
    let args = Args::parse();
    if let Err(e) = args.validate() {
        eprintln!("collbench: error: {e} (see collbench --help)");
        std::process::exit(2);
    }
    let mut rt = if args.multi_thread {
        tokio::runtime::Builder::new_multi_thread()
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    let rt = match rt.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("collbench: error: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    let under_launcher = std::env::var_os("RANKMESH_SEED").is_some();
    let code = match (under_launcher, args.np) {
        (true, _) => match rt.block_on(rank(args.clone())) {
            Ok(0) => 0,
            Ok(wrong) => {
                eprintln!("collbench: {wrong} wrong elements (see the #wrong column)");
                1
            }
            Err(e) => {
                eprintln!("collbench: {e}");
                1
            }
        },
        (false, Some(np)) => match rt.block_on(launch(np)) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("collbench: {e}");
                1
            }
        },
        (false, None) => {
            eprintln!(
                "collbench: error: not started as a rank (no RANKMESH_SEED): run it as \
                 `rankrun -n N collbench ...`, or give --np N to start N ranks on this host"
            );
            2
        }
    };
    drop(rt);
    std::process::exit(code);
}

/// Start a seed and `np` copies of this program as its ranks; the exit
/// status of the first rank that failed, else 0.
async fn launch(np: usize) -> Result<i32> {
    let seed = Seed::start(SeedConfig::new(np))?;
    let addr = seed.addr()?;
    let exe = std::env::current_exe().map_err(|e| Error::Config {
        detail: format!("cannot find this program to start its ranks: {e}"),
    })?;
    let mut children = Vec::new();
    for r in 0..np {
        let child = tokio::process::Command::new(&exe)
            .args(std::env::args_os().skip(1))
            .env("RANKMESH_SEED", addr.to_string())
            .env("RANKMESH_TOKEN", seed.token().to_hex())
            .env("RANKMESH_WORLD_SIZE", np.to_string())
            .env("RANKMESH_RANK", r.to_string())
            .env("RANKMESH_JOB_ID", seed.job_id())
            // The ranks share this host's cores (the default transport
            // threads are the cores per local rank). The local rank is not
            // set: it would also pick each rank's GPU.
            .env("RANKMESH_LOCAL_SIZE", np.to_string())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| Error::Config {
                detail: format!("cannot start rank {r} ({}): {e}", exe.display()),
            })?;
        children.push(child);
    }
    let mut code = 0;
    for (r, mut c) in children.into_iter().enumerate() {
        match c.wait().await {
            Ok(s) if s.success() => {}
            Ok(s) => {
                if code == 0 {
                    eprintln!("collbench: rank {r} ended with {s}");
                    code = s.code().unwrap_or(1);
                }
            }
            Err(e) => {
                if code == 0 {
                    eprintln!("collbench: cannot wait for rank {r}: {e}");
                    code = 1;
                }
            }
        }
    }
    seed.shutdown().await;
    Ok(code)
}

/// One rank's run, on this thread or (`--spawn`) in a task on the
/// runtime's workers.
async fn rank(args: Args) -> Result<u64> {
    if !args.spawn {
        return rank_main(&args).await;
    }
    tokio::spawn(async move { rank_main(&args).await })
        .await
        .unwrap_or_else(|e| {
            Err(Error::Config {
                detail: format!("the rank's task failed: {e}"),
            })
        })
}

/// One rank's run: every collective at every size; rank 0 reports. The
/// number of wrong elements seen.
async fn rank_main(args: &Args) -> Result<u64> {
    let comm = rankmesh::init().await?;
    let device = match Device::open(args).await {
        Ok(d) => d,
        Err(e) => {
            comm.abort(&format!("collbench: {e}")).await;
            return Err(e);
        }
    };
    let p = comm.size();
    if args.root >= p && args.colls.iter().any(|c| c.rooted()) {
        let _ = comm.finalize().await;
        return Err(Error::Config {
            detail: format!("-r {}: the job has ranks 0 to {}", args.root, p - 1),
        });
    }
    if p < 2 && args.colls.contains(&Coll::Pingpong) {
        let _ = comm.finalize().await;
        return Err(Error::Config {
            detail: "--coll pingpong: needs ranks 0 and 1 (run at least 2 ranks)".into(),
        });
    }
    let lead = comm.rank() == 0;
    let mut out = Output::open(args, lead)?;
    if lead {
        out.table(&format!(
            "# collbench: {p} ranks, {}, {}, {} runtime, -n {} -w {} --batches {}, check {}\n{}",
            args.dtype.name(),
            device.name(),
            if args.spawn {
                "multi-thread (spawned)"
            } else if args.multi_thread {
                "multi-thread"
            } else {
                "current-thread"
            },
            if args.iters == 0 {
                "by size".to_string()
            } else {
                args.iters.to_string()
            },
            args.warmup,
            args.batches,
            args.check,
            report::header()
        ))?;
    }
    let mut wrong = 0;
    let mut bus = Vec::new();
    let mut series = Vec::new();
    for &coll in &args.colls {
        let (mut points, mut note) = (Vec::new(), None);
        let sizes = if coll == Coll::Barrier {
            vec![0]
        } else {
            args.sizes()
        };
        for bytes in sizes {
            let esz = args.dtype.size() as u64;
            let mut count = bytes / esz;
            if coll.blocked() {
                count -= count % p as u64;
            }
            let m = measure(&comm, &device, args, coll, count as usize).await?;
            let algbw = (count * esz) as f64 / m.secs / 1e9;
            let row = report::Row {
                coll: coll.name(),
                bytes: count * esz,
                count,
                dtype: args.dtype.name(),
                redop: if coll.reduces() {
                    args.op.name()
                } else {
                    "none"
                },
                root: if coll.rooted() { args.root as i64 } else { -1 },
                time_us: m.secs * 1e6,
                algbw,
                busbw: algbw * coll.bus_factor(p),
                wrong: (args.check == 1).then_some(m.wrong),
            };
            wrong += m.wrong;
            if row.bytes > 0 {
                bus.push(row.busbw);
            }
            points.push((row.bytes, row.busbw));
            if coll == Coll::Barrier {
                note = Some(format!("{:.1} us (no size)", row.time_us));
            }
            if lead {
                out.row(&row, p)?;
            }
        }
        series.push(plot::Series {
            coll: coll.name(),
            points,
            note,
        });
    }
    if let (true, Some(path)) = (lead, &args.plot) {
        let title = format!(
            "collbench: {p} ranks, {}, {}",
            args.dtype.name(),
            device.name()
        );
        std::fs::write(path, plot::svg(&title, &series)).map_err(|e| Error::Config {
            detail: format!("--plot {path}: cannot write the file: {e}"),
        })?;
    }
    if lead && !bus.is_empty() {
        out.table(&format!(
            "# Out of bounds values : {wrong} {}\n# Avg bus bandwidth    : {:.3}",
            if wrong == 0 { "OK" } else { "FAILED" },
            bus.iter().sum::<f64>() / bus.len() as f64
        ))?;
    }
    comm.finalize().await?;
    Ok(wrong)
}

async fn measure(
    comm: &Communicator,
    device: &Device,
    a: &Args,
    coll: Coll,
    count: usize,
) -> Result<bench::Measured> {
    let bytes = (count * a.dtype.size()) as u64;
    let runs = (a.warmup, a.iters_for(bytes), a.batches);
    let check = a.check == 1;
    macro_rules! go {
        ($t:ty) => {
            bench::measure::<$t>(comm, device, coll, count, a.op, a.root, runs, check).await
        };
    }
    match a.dtype {
        Dtype::Int8 => go!(i8),
        Dtype::Uint8 => go!(u8),
        Dtype::Int32 => go!(i32),
        Dtype::Uint32 => go!(u32),
        Dtype::Int64 => go!(i64),
        Dtype::Uint64 => go!(u64),
        Dtype::Half => go!(half::f16),
        Dtype::Float => go!(f32),
        Dtype::Double => go!(f64),
        Dtype::Bfloat16 => go!(half::bf16),
    }
}

/// Where rank 0 writes: the table on standard output, JSON lines to a
/// file or (with `--json -`) to standard output instead of the table.
struct Output {
    table: bool,
    json: Option<Box<dyn Write + Send>>,
}

impl Output {
    fn open(a: &Args, lead: bool) -> Result<Output> {
        let json: Option<Box<dyn Write + Send>> = match a.json.as_deref() {
            _ if !lead => None,
            None => None,
            Some("-") => Some(Box::new(std::io::stdout())),
            Some(path) => {
                let f = std::fs::File::create(path).map_err(|e| Error::Config {
                    detail: format!("--json {path}: cannot create the file: {e}"),
                })?;
                Some(Box::new(std::io::BufWriter::new(f)))
            }
        };
        Ok(Output {
            table: a.json.as_deref() != Some("-"),
            json,
        })
    }

    fn table(&mut self, text: &str) -> Result<()> {
        if self.table {
            println!("{text}");
        }
        Ok(())
    }

    fn row(&mut self, r: &report::Row, ranks: usize) -> Result<()> {
        if self.table {
            println!("{}", report::line(r));
        }
        if let Some(j) = self.json.as_mut() {
            writeln!(j, "{}", report::json(r, ranks))
                .and_then(|()| j.flush())
                .map_err(|e| Error::Config {
                    detail: format!("--json: cannot write: {e}"),
                })?;
        }
        Ok(())
    }
}
