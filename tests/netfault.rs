//! Real network faults between two "hosts": two network namespaces joined
//! by a veth pair, created and removed by the test (root only; CI runs as
//! root, and `.ci/run` installs iproute2 and nftables). Ranks 0 and 1 (and
//! the seed) live in the first namespace, ranks 2 and 3 in the second; each
//! rank is a thread that entered its namespace before creating its socket.
//! Traffic goes only to the addresses the test assigned.

use rankmesh::launch::{JoinSpec, Seed, SeedConfig};
use rankmesh::{Config, ReduceOp};
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and touches no memory.
    unsafe { libc::geteuid() == 0 }
}

/// Whether this test can run here: root and the system tools it needs
/// (`ip`, `nft`, `tc`, ...). Otherwise it says loudly what is missing and
/// is skipped, except under `CI=true`, where a missing tool fails it (CI
/// installs them: `.ci/run`).
fn can_run(what: &str, tools: &[&str]) -> bool {
    use std::io::Write;
    if !is_root() {
        let _ = writeln!(
            std::io::stderr(),
            "\n*** SKIPPED: needs root ({what}); CI runs as root ***\n"
        );
        return false;
    }
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|t| {
            !Command::new(t)
                .arg("-V")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .collect();
    if missing.is_empty() {
        return true;
    }
    let hint = format!(
        "missing {missing:?}: apt-get install iproute2 nftables (ip, tc: iproute2; nft: nftables)"
    );
    assert!(std::env::var("CI").is_err(), "{hint}");
    // Straight to stderr, past the test harness's capture: a skip is seen.
    let _ = writeln!(std::io::stderr(), "\n*** SKIPPED: {hint} ***\n");
    false
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

type Body<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T>>>;

/// Form a 4-rank job (ranks 0, 1 on host A, 2, 3 on host B) and run `body`
/// on every rank; returns each rank's result.
fn job<T: Send + 'static>(
    h: &Hosts,
    cfg: Config,
    body: impl Fn(rankmesh::Communicator) -> Body<T> + Send + Sync + Clone + 'static,
) -> Vec<T> {
    job_on(h, cfg, None, body)
}

/// [`job`], with host A's and B's ranks bound to `bind` addresses when
/// given (the seed stays on the veth).
fn job_on<T: Send + 'static>(
    h: &Hosts,
    cfg: Config,
    bind: Option<[&str; 2]>,
    body: impl Fn(rankmesh::Communicator) -> Body<T> + Send + Sync + Clone + 'static,
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
                late: false,
            };
            let mut cfg = cfg.clone();
            // CI reruns these tests with RANKMESH_TRANSPORT_THREADS=4; a
            // test that sets the threads itself keeps its number.
            let threads = cfg.transport_threads();
            rankmesh::launch::apply_env_overrides(&mut cfg).expect("RANKMESH_* settings");
            if threads.is_some() {
                cfg.set_transport_threads(threads);
            }
            if let Some(ips) = bind {
                cfg.set_bind_ip(Some(ips[r / 2].parse().expect("bind ip")));
            }
            let body = body.clone();
            h.spawn(r / 2, move || {
                runtime().block_on(async move {
                    let comm = rankmesh::launch::init_with(spec, cfg).await.expect("join");
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
    if !can_run("ip netns, nft", &["ip", "nft"]) {
        return;
    }
    let h = Hosts::new(1);
    // 5% random loss on everything host B receives over UDP.
    nft_input_chain(&h.ns[1]);
    nft(
        &h.ns[1],
        &[
            "add", "rule", "inet", "rmf", "in", "meta", "l4proto", "udp", "numgen", "random",
            "mod", "100", "<", "5", "drop",
        ],
    );
    let mut cfg = Config::default();
    cfg.set_op_timeout(Duration::from_secs(120));
    let out = job(&h, cfg, |comm| {
        Box::pin(async move {
            let wrong = exact_allreduces(&comm, 8, "allreduce under loss").await;
            comm.finalize().await.expect("finalize");
            wrong
        })
    });
    assert_eq!(out, vec![0, 0, 0, 0], "wrong elements per rank");
}

/// Allreduce 1 MiB of f32 whose sum every rank can check (iteration `it`
/// of a 4-rank job); returns the number of wrong elements.
async fn exact_allreduce(comm: &rankmesh::Communicator, it: u32, what: &str) -> usize {
    let r = comm.rank() as u32;
    let n = 256 * 1024;
    let mut v: Vec<f32> = (0..n).map(|i| ((i as u32 + it + r) % 13) as f32).collect();
    comm.all_reduce(&mut v, ReduceOp::Sum).await.expect(what);
    v.iter()
        .enumerate()
        .filter(|(i, x)| {
            let want: u32 = (0..4).map(|q| (*i as u32 + it + q) % 13).sum();
            **x != want as f32
        })
        .count()
}

/// [`exact_allreduce`] `iterations` times; the wrong elements in all.
async fn exact_allreduces(comm: &rankmesh::Communicator, iterations: u32, what: &str) -> usize {
    let mut wrong = 0;
    for it in 0..iterations {
        wrong += exact_allreduce(comm, it, what).await;
    }
    wrong
}

/// `nft` inside namespace `ns`.
fn nft(ns: &str, args: &[&str]) {
    let mut a = vec!["netns", "exec", ns, "nft"];
    a.extend_from_slice(args);
    run("ip", &a);
}

/// A table `rmf` with an input chain in namespace `ns`.
fn nft_input_chain(ns: &str) {
    nft(ns, &["add", "table", "inet", "rmf"]);
    nft(
        ns,
        &[
            "add",
            "chain",
            "inet",
            "rmf",
            "in",
            "{ type filter hook input priority 0 ; }",
        ],
    );
}

/// Allreduce 1 MiB again and again, on every rank the same number of
/// times, until every rank has seen `run_for` pass; returns the number of
/// wrong elements this rank saw and the iterations done.
async fn allreduce_loop(comm: rankmesh::Communicator, run_for: Duration) -> (usize, u32) {
    let t0 = Instant::now();
    let mut wrong = 0usize;
    let mut it = 0u32;
    loop {
        wrong += exact_allreduce(&comm, it, "allreduce under faults").await;
        it += 1;
        let mut go = [u32::from(t0.elapsed() < run_for)];
        comm.all_reduce(&mut go, ReduceOp::Max)
            .await
            .expect("loop vote");
        if go[0] == 0 {
            break;
        }
    }
    comm.finalize().await.expect("finalize");
    (wrong, it)
}

#[test]
fn allreduce_survives_a_2_second_burst_of_30_percent_loss() {
    if !can_run("ip netns, nft", &["ip", "nft"]) {
        return;
    }
    let h = Hosts::new(3);
    nft_input_chain(&h.ns[1]);
    let ns_b = h.ns[1].clone();
    let mut cfg = Config::default();
    cfg.set_op_timeout(Duration::from_secs(120));
    let burst = std::sync::Arc::new(std::sync::Mutex::new(None::<(Instant, Instant)>));
    let b2 = burst.clone();
    let out = job(&h, cfg, move |comm| {
        let (ns_b, burst) = (ns_b.clone(), b2.clone());
        Box::pin(async move {
            if comm.rank() == 0 {
                // The burst starts half a second into the loop and lasts 2 s.
                std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(500));
                    let start = Instant::now();
                    nft(
                        &ns_b,
                        &[
                            "add", "rule", "inet", "rmf", "in", "meta", "l4proto", "udp", "numgen",
                            "random", "mod", "100", "<", "30", "drop",
                        ],
                    );
                    std::thread::sleep(Duration::from_secs(2));
                    nft(&ns_b, &["flush", "chain", "inet", "rmf", "in"]);
                    *burst.lock().unwrap() = Some((start, Instant::now()));
                });
            }
            allreduce_loop(comm, Duration::from_secs(4)).await
        })
    });
    let (start, end) = burst.lock().unwrap().expect("the burst ran");
    assert!(end.duration_since(start) >= Duration::from_secs(2));
    for (r, (wrong, its)) in out.iter().enumerate() {
        assert_eq!(*wrong, 0, "rank {r}: wrong elements");
        assert!(*its >= 2, "rank {r}: only {its} iterations");
    }
}

/// A point-to-point "wire" between two namespaces made of two TUN devices
/// and a userspace relay that delays every packet by `delay`, holds
/// `reorder_pct` percent of them back by a further `late` (so later packets
/// overtake them) and drops `loss_pct` percent, with a seeded RNG. (This
/// kernel has no `tc netem`.) Stops on drop.
struct Wire {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    relay: Option<std::thread::JoinHandle<Relayed>>,
}

/// What a [`Wire`] relayed.
#[derive(Default)]
struct Relayed {
    seen: u64,
    dropped: u64,
    held: u64,
    /// UDP packets by (side they came from, source port).
    by_port: std::collections::HashMap<(usize, u16), u64>,
}

/// The source port of an IPv4 UDP packet.
fn udp_source_port(pkt: &[u8]) -> Option<u16> {
    let ihl = usize::from(*pkt.first()? & 0x0f) * 4;
    if pkt.first()? >> 4 != 4 || *pkt.get(9)? != 17 {
        return None;
    }
    Some(u16::from_be_bytes([*pkt.get(ihl)?, *pkt.get(ihl + 1)?]))
}

/// `ifreq` as TUNSETIFF reads it: name, flags, and the rest of the union.
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: i16,
    _rest: [u8; 22],
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TUN: i16 = 0x0001;
const IFF_NO_PI: i16 = 0x1000;

/// Create TUN device `name` in the namespace of the calling thread.
fn open_tun(name: &str) -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd;
    let path = b"/dev/net/tun\0";
    // SAFETY: a NUL-terminated path; the returned fd is checked.
    let fd = unsafe {
        libc::open(
            path.as_ptr().cast(),
            libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    assert!(
        fd >= 0,
        "open /dev/net/tun: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: fd is a fresh descriptor this function owns.
    let owned = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    let mut req = IfReq {
        name: [0; 16],
        flags: IFF_TUN | IFF_NO_PI,
        _rest: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads an ifreq-sized struct, which `req` is.
    let rc = unsafe { libc::ioctl(fd, TUNSETIFF as _, &mut req as *mut IfReq) };
    assert_eq!(
        rc,
        0,
        "TUNSETIFF {name}: {}",
        std::io::Error::last_os_error()
    );
    owned
}

impl Wire {
    /// Wire namespaces `h.ns[0]` (address `ips[0]`) and `h.ns[1]`
    /// (`ips[1]`).
    fn new(
        h: &Hosts,
        ips: [&str; 2],
        delay: Duration,
        late: Duration,
        reorder_pct: u64,
        loss_pct: u64,
    ) -> Wire {
        use std::os::fd::AsRawFd;
        // Unique per wire: tests of this file run at once.
        static WIRES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let id = std::process::id() % 10_000;
        let w = WIRES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let names = [format!("tA{id}x{w}"), format!("tB{id}x{w}")];
        let fds: Vec<std::os::fd::OwnedFd> = (0..2)
            .map(|i| {
                let n = names[i].clone();
                h.spawn(i, move || open_tun(&n)).join().expect("tun thread")
            })
            .collect();
        for i in 0..2 {
            let cidr = format!("{}/32", ips[i]);
            run(
                "ip",
                &[
                    "-n",
                    &h.ns[i],
                    "addr",
                    "add",
                    &cidr,
                    "peer",
                    ips[1 - i],
                    "dev",
                    &names[i],
                ],
            );
            run("ip", &["-n", &h.ns[i], "link", "set", &names[i], "up"]);
        }
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let halt = stop.clone();
        let relay = std::thread::spawn(move || {
            use std::cmp::Reverse;
            use std::collections::BinaryHeap;
            let raw = [fds[0].as_raw_fd(), fds[1].as_raw_fd()];
            // xorshift64*, seeded: the same faults every run.
            let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
            let mut rnd = move || {
                x ^= x >> 12;
                x ^= x << 25;
                x ^= x >> 27;
                x.wrapping_mul(0x2545_f491_4f6c_dd1d)
            };
            // (release time, arrival number, destination, packet)
            type Held = Reverse<(Instant, u64, usize, Vec<u8>)>;
            let mut queue: BinaryHeap<Held> = BinaryHeap::new();
            let (mut n, mut dropped, mut held) = (0u64, 0u64, 0u64);
            let mut by_port = std::collections::HashMap::new();
            let mut buf = vec![0u8; 65536];
            while !halt.load(std::sync::atomic::Ordering::Relaxed) {
                let now = Instant::now();
                while queue.peek().is_some_and(|Reverse(p)| p.0 <= now) {
                    let Some(Reverse((_, _, to, pkt))) = queue.pop() else {
                        break;
                    };
                    // SAFETY: writes `pkt` to a TUN fd this thread owns.
                    unsafe { libc::write(raw[to], pkt.as_ptr().cast(), pkt.len()) };
                }
                let wait = queue
                    .peek()
                    .map(|Reverse(p)| p.0.saturating_duration_since(now))
                    .unwrap_or(Duration::from_millis(20))
                    .min(Duration::from_millis(20));
                let mut pfd = [
                    libc::pollfd {
                        fd: raw[0],
                        events: libc::POLLIN,
                        revents: 0,
                    },
                    libc::pollfd {
                        fd: raw[1],
                        events: libc::POLLIN,
                        revents: 0,
                    },
                ];
                let ms = wait.as_millis().max(1) as libc::c_int;
                // SAFETY: two valid pollfd entries.
                unsafe { libc::poll(pfd.as_mut_ptr(), 2, ms) };
                for (from, &fd) in raw.iter().enumerate() {
                    loop {
                        // SAFETY: reads into `buf`, which has room for it.
                        let got = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
                        if got <= 0 {
                            break;
                        }
                        n += 1;
                        if let Some(port) = udp_source_port(&buf[..got as usize]) {
                            *by_port.entry((from, port)).or_insert(0u64) += 1;
                        }
                        if rnd() % 100 < loss_pct {
                            dropped += 1;
                            continue;
                        }
                        let mut at = Instant::now() + delay;
                        if rnd() % 100 < reorder_pct {
                            held += 1;
                            at += late;
                        }
                        queue.push(Reverse((at, n, 1 - from, buf[..got as usize].to_vec())));
                    }
                }
            }
            Relayed {
                seen: n,
                dropped,
                held,
                by_port,
            }
        });
        Wire {
            stop,
            relay: Some(relay),
        }
    }

    /// Stop relaying: what was relayed.
    fn finish(mut self) -> Relayed {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.relay
            .take()
            .map(|t| t.join().expect("relay"))
            .unwrap_or_default()
    }
}

impl Drop for Wire {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.relay.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn allreduce_is_exact_with_20ms_delay_1_percent_reordering_and_1_percent_loss() {
    if !can_run("ip netns, /dev/net/tun", &["ip"]) {
        return;
    }
    let h = Hosts::new(4);
    // Ranks talk over the relayed wire; the seed stays on the veth.
    let ips = ["10.215.4.1", "10.215.4.2"];
    let wire = Wire::new(
        &h,
        ips,
        Duration::from_millis(20),
        Duration::from_millis(5),
        1,
        1,
    );
    let mut cfg = Config::default();
    cfg.set_op_timeout(Duration::from_secs(120));
    let out = job_on(&h, cfg, Some(ips), |comm| {
        Box::pin(async move {
            let wrong =
                exact_allreduces(&comm, 50, "allreduce over a slow, lossy, reordering link").await;
            comm.finalize().await.expect("finalize");
            wrong
        })
    });
    let Relayed {
        seen,
        dropped,
        held,
        ..
    } = wire.finish();
    assert_eq!(out, vec![0, 0, 0, 0], "wrong elements per rank");
    // The faults really happened on the ranks' traffic.
    assert!(
        seen > 1000 && dropped > 0 && held > 0,
        "relay saw {seen} packets, dropped {dropped}, reordered {held}"
    );
    eprintln!("relay: {seen} packets, {dropped} dropped, {held} reordered");
}

fn pattern(len: usize, seed: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) as u8)
        .collect()
}

/// With four transport threads per rank, large messages between the
/// hosts are striped across four connections each, over a link that delays
/// every packet, holds 5% back so later ones overtake them and drops 2%:
/// a sequence of point-to-point messages arrives exact and in order, the
/// allreduces are exact, and the relay saw the striping (each rank of host
/// A sent from its main endpoint and its three lanes).
#[test]
fn striped_messages_arrive_exact_and_in_order_over_a_lossy_reordering_link() {
    if !can_run("ip netns, /dev/net/tun", &["ip"]) {
        return;
    }
    let h = Hosts::new(6);
    let ips = ["10.215.6.1", "10.215.6.2"];
    let wire = Wire::new(
        &h,
        ips,
        Duration::from_millis(2),
        Duration::from_millis(3),
        5,
        2,
    );
    let mut cfg = Config::default();
    cfg.set_op_timeout(Duration::from_secs(120));
    cfg.set_transport_threads(Some(4));
    let out = job_on(&h, cfg, Some(ips), |comm| {
        Box::pin(async move {
            let r = comm.rank();
            let sizes = [200_000usize, 262_145, 1 << 20, 777_777];
            let mut wrong = 0;
            // Ranks 0 and 1 (host A) send to 2 and 3 (host B), in order on
            // one tag (a message out of order would not fit its receive).
            for (i, &n) in sizes.iter().enumerate() {
                if r < 2 {
                    let data = pattern(n, i + 10 * r);
                    comm.send(&data, r + 2, 5).await.expect("send");
                } else {
                    let mut got = vec![0u8; n];
                    comm.recv(&mut got, r - 2, 5).await.expect("recv");
                    wrong += usize::from(got != pattern(n, i + 10 * (r - 2)));
                }
            }
            wrong += exact_allreduces(&comm, 5, "allreduce over striped QUIC").await;
            comm.finalize().await.expect("finalize");
            wrong
        })
    });
    let relayed = wire.finish();
    eprintln!(
        "relayed UDP packets by (side, source port): {:?}",
        relayed.by_port
    );
    assert_eq!(
        out,
        vec![0, 0, 0, 0],
        "wrong messages and elements per rank"
    );
    assert!(
        relayed.dropped > 0 && relayed.held > 0,
        "relay saw {} packets, dropped {}, reordered {}",
        relayed.seen,
        relayed.dropped,
        relayed.held
    );
    let busy = relayed
        .by_port
        .iter()
        .filter(|((side, _), n)| *side == 0 && **n >= 500)
        .count();
    assert!(
        busy >= 8,
        "host A sent from {busy} busy UDP ports, not 2 ranks x 4 endpoints: {:?}",
        relayed.by_port
    );
}

#[test]
fn allreduce_is_exact_under_a_bandwidth_cap() {
    if !can_run("ip netns, tc", &["ip", "tc"]) {
        return;
    }
    let h = Hosts::new(5);
    // Host B sends at most 40 Mbit/s (token bucket filter on its link).
    run(
        "ip",
        &[
            "netns", "exec", &h.ns[1], "tc", "qdisc", "add", "dev", &h.dev[1], "root", "tbf",
            "rate", "40mbit", "burst", "32kbit", "latency", "400ms",
        ],
    );
    let mut cfg = Config::default();
    cfg.set_op_timeout(Duration::from_secs(120));
    let out = job(&h, cfg, |comm| {
        Box::pin(async move {
            let wrong = exact_allreduces(&comm, 4, "allreduce under a bandwidth cap").await;
            comm.finalize().await.expect("finalize");
            wrong
        })
    });
    assert_eq!(out, vec![0, 0, 0, 0], "wrong elements per rank");
    // The cap was in the way: the filter held packets back.
    let stats = Command::new("ip")
        .args([
            "netns", "exec", &h.ns[1], "tc", "-s", "qdisc", "show", "dev", &h.dev[1],
        ])
        .output()
        .expect("tc -s");
    let stats = String::from_utf8_lossy(&stats.stdout).to_string();
    let overlimits: u64 = stats
        .split("overlimits ")
        .nth(1)
        .and_then(|t| t.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    assert!(stats.contains("tbf") && overlimits > 0, "{stats}");
}

#[test]
fn a_partitioned_host_is_named_by_the_survivors_within_the_idle_timeout() {
    if !can_run("ip netns", &["ip"]) {
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
