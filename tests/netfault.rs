//! Real network faults between two "hosts": two network namespaces joined
//! by a veth pair, created and removed by the test (root only; CI runs as
//! root, and `.ci/run` installs iproute2 and nftables). Ranks 0 and 1 (and
//! the seed) live in the first namespace, ranks 2 and 3 in the second; each
//! rank is a thread that entered its namespace before creating its socket.
//! Traffic goes only to the addresses the test assigned.

use rankmesh::bootstrap::{JoinSpec, Seed, SeedConfig};
use rankmesh::{Config, ReduceOp};
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and touches no memory.
    unsafe { libc::geteuid() == 0 }
}

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().expect("run command");
    assert!(
        out.status.success(),
        "{cmd} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Two namespaces on 10.214.N.1 and 10.214.N.2; removed on drop, also when
/// the test fails.
struct Hosts {
    ns: [String; 2],
    dev: [String; 2],
    ip: [String; 2],
}

impl Hosts {
    fn new(tag: u32) -> Hosts {
        let id = std::process::id() % 10_000;
        let ns = [format!("rmfA{id}x{tag}"), format!("rmfB{id}x{tag}")];
        let dev = [format!("fA{id}x{tag}"), format!("fB{id}x{tag}")];
        let net = 10 + tag;
        let ip = [format!("10.214.{net}.1"), format!("10.214.{net}.2")];
        let h = Hosts { ns, dev, ip };
        for n in &h.ns {
            run("ip", &["netns", "add", n]);
        }
        run(
            "ip",
            &[
                "link", "add", &h.dev[0], "type", "veth", "peer", "name", &h.dev[1],
            ],
        );
        for i in 0..2 {
            run("ip", &["link", "set", &h.dev[i], "netns", &h.ns[i]]);
            let cidr = format!("{}/24", h.ip[i]);
            run(
                "ip",
                &["-n", &h.ns[i], "addr", "add", &cidr, "dev", &h.dev[i]],
            );
            run("ip", &["-n", &h.ns[i], "link", "set", "lo", "up"]);
            run("ip", &["-n", &h.ns[i], "link", "set", &h.dev[i], "up"]);
        }
        h
    }

    /// Run `f` on a new thread inside namespace `i`, with its own runtime.
    fn spawn<T: Send + 'static>(
        &self,
        i: usize,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = format!("/var/run/netns/{}", self.ns[i]);
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).expect("open netns");
            use std::os::fd::AsRawFd;
            // SAFETY: setns on a valid namespace fd affects only this thread.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}");
            f()
        })
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for n in &self.ns {
            let _ = Command::new("ip").args(["netns", "del", n]).output();
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// Form a 4-rank job (ranks 0, 1 on host A, 2, 3 on host B) and run `body`
/// on every rank; returns each rank's result.
fn job<T: Send + 'static>(
    h: &Hosts,
    cfg: Config,
    body: impl Fn(rankmesh::Communicator) -> std::pin::Pin<Box<dyn std::future::Future<Output = T>>>
        + Send
        + Sync
        + Clone
        + 'static,
) -> Vec<T> {
    // The seed runs in host A on its own thread and runtime.
    let seed_ip = h.ip[0].clone();
    let (tx, rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let seed_thread = h.spawn(0, move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let seed = rt
            .block_on(async {
                let mut c = SeedConfig::new(4);
                c.set_bind(SocketAddr::new(seed_ip.parse().expect("ip"), 0));
                Seed::start(c)
            })
            .expect("seed");
        tx.send((
            seed.addr().expect("addr"),
            seed.token().clone(),
            seed.job_id().to_string(),
        ))
        .expect("send");
        let _ = stop_rx.recv();
        rt.block_on(seed.shutdown());
    });
    let (addr, token, job_id) = rx.recv().expect("seed started");
    let ranks: Vec<_> = (0..4)
        .map(|r| {
            let spec = JoinSpec {
                seed: addr,
                token: token.clone(),
                job_id: Some(job_id.clone()),
                rank: Some(r),
                world_size: Some(4),
                host: format!("host{}", r / 2),
            };
            let cfg = cfg.clone();
            let body = body.clone();
            h.spawn(r / 2, move || {
                runtime().block_on(async move {
                    let comm = rankmesh::init_with(spec, cfg).await.expect("join");
                    body(comm).await
                })
            })
        })
        .collect();
    let out = ranks
        .into_iter()
        .map(|t| t.join().expect("rank thread"))
        .collect();
    let _ = stop_tx.send(());
    seed_thread.join().expect("seed thread");
    out
}

#[test]
fn allreduce_is_exact_over_a_link_that_drops_5_percent_of_packets() {
    if !is_root() {
        eprintln!("\n*** SKIPPED: needs root (ip netns, nft); CI runs as root ***\n");
        return;
    }
    let h = Hosts::new(1);
    // 5% random loss on everything host B receives over UDP.
    run(
        "ip",
        &[
            "netns", "exec", &h.ns[1], "nft", "add", "table", "inet", "rmf",
        ],
    );
    run(
        "ip",
        &[
            "netns",
            "exec",
            &h.ns[1],
            "nft",
            "add",
            "chain",
            "inet",
            "rmf",
            "in",
            "{ type filter hook input priority 0 ; }",
        ],
    );
    run(
        "ip",
        &[
            "netns", "exec", &h.ns[1], "nft", "add", "rule", "inet", "rmf", "in", "meta",
            "l4proto", "udp", "numgen", "random", "mod", "100", "<", "5", "drop",
        ],
    );
    let mut cfg = Config::default();
    cfg.set_op_timeout(Duration::from_secs(120));
    let out = job(&h, cfg, |comm| {
        Box::pin(async move {
            let r = comm.rank();
            let n = 256 * 1024; // 1 MiB of f32
            let mut wrong = 0usize;
            for it in 0..8u32 {
                let mut v: Vec<f32> = (0..n)
                    .map(|i| ((i as u32 + it + r as u32) % 13) as f32)
                    .collect();
                comm.all_reduce(&mut v, ReduceOp::Sum)
                    .await
                    .expect("allreduce under loss");
                wrong += v
                    .iter()
                    .enumerate()
                    .filter(|(i, x)| {
                        let want: u32 = (0..4).map(|q| (*i as u32 + it + q) % 13).sum();
                        **x != want as f32
                    })
                    .count();
            }
            comm.finalize().await.expect("finalize");
            wrong
        })
    });
    assert_eq!(out, vec![0, 0, 0, 0], "wrong elements per rank");
}

#[test]
fn a_partitioned_host_is_named_by_the_survivors_within_the_idle_timeout() {
    if !is_root() {
        eprintln!("\n*** SKIPPED: needs root (ip netns); CI runs as root ***\n");
        return;
    }
    let h = Hosts::new(2);
    let mut cfg = Config::default();
    cfg.set_op_timeout(Duration::from_secs(120));
    cfg.set_idle_timeout(Duration::from_secs(3));
    cfg.set_keep_alive(Duration::from_millis(500));
    let dev_b = h.dev[1].clone();
    let ns_b = h.ns[1].clone();
    let started = Instant::now();
    let out = job(&h, cfg, move |comm| {
        let (dev_b, ns_b) = (dev_b.clone(), ns_b.clone());
        Box::pin(async move {
            let r = comm.rank();
            // Everyone talks to everyone once, so connections exist.
            let mut v = [1u64; 4];
            comm.all_reduce(&mut v, ReduceOp::Sum)
                .await
                .expect("first allreduce");
            comm.barrier().await.expect("barrier");
            if r == 2 {
                // Let the barrier's last messages arrive, then cut host B
                // off: its link goes down.
                tokio::time::sleep(Duration::from_secs(1)).await;
                run("ip", &["-n", &ns_b, "link", "set", &dev_b, "down"]);
            }
            if r >= 2 {
                // Host B's ranks wait out the partition and leave.
                tokio::time::sleep(Duration::from_secs(8)).await;
                comm.shutdown_after_error().await;
                return String::new();
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
            let t = Instant::now();
            let mut v = [1u64; 4];
            let e = comm.all_reduce(&mut v, ReduceOp::Sum).await.unwrap_err();
            format!("{e} [after {:?}]", t.elapsed())
        })
    });
    for (r, e) in out[..2].iter().enumerate() {
        assert!(
            e.contains("rank 2") || e.contains("rank 3"),
            "rank {r}: {e}"
        );
        assert!(
            !e.contains("timed out after 120"),
            "rank {r} only timed out: {e}"
        );
    }
    assert!(started.elapsed() < Duration::from_secs(60));
}
