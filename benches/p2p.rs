//! Point-to-point on one host: 8-byte round-trip latency and 64 MiB one-way
//! bandwidth between two ranks, each on its own thread with its own
//! single-threaded tokio runtime, over QUIC loopback and over the same-host
//! channel, against raw quinn with the same endpoint settings and
//! certificates in the same run.
//!
//! ```text
//! cargo bench --bench p2p
//! ```
//!
//! Raw quinn is measured two ways: a fresh unidirectional stream per
//! message (what rankmesh does) and one long-lived bidirectional stream
//! (quinn's floor). Raw UDP is the floor below both: 8-byte datagrams
//! between two threads, each either sleeping in `recv` (a wake-up per
//! message, as an idle quinn endpoint waits in `epoll_wait`) or polling a
//! non-blocking socket (no wake-up, as Open MPI's TCP transport polls).

use bytes::Bytes;
use rankmesh::internals::pki::{self, Credentials, JobCa, RankKey};
use rankmesh::internals::transport::quic::endpoint;
use rankmesh::launch::{JoinSpec, Seed, SeedConfig};
use rankmesh::{Config, Result};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

const PINGS: usize = 2000;
const BATCHES: usize = 5;
const BIG: usize = 64 << 20;
const BIG_REPS: usize = 5;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// (one-way latency in us, bandwidth in GB/s)
fn bench_rankmesh(same_host: bool) -> (f64, f64) {
    let seed_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let seed = seed_rt
        .block_on(async { Seed::start(SeedConfig::new(2)) })
        .expect("seed");
    let addr = seed.addr().expect("seed address");
    let ranks: Vec<_> = (0..2)
        .map(|r| {
            let spec = JoinSpec {
                seed: addr,
                token: seed.token().clone(),
                job_id: Some(seed.job_id().to_string()),
                rank: Some(r),
                world_size: Some(2),
                host: "localhost".into(),
                late: false,
            };
            std::thread::spawn(move || rt().block_on(rank(spec, same_host)).expect("rank"))
        })
        .collect();
    let out: Vec<(f64, f64)> = ranks
        .into_iter()
        .map(|h| h.join().expect("rank thread"))
        .collect();
    seed_rt.block_on(seed.shutdown());
    out[0]
}

async fn rank(spec: JoinSpec, same_host: bool) -> Result<(f64, f64)> {
    let mut cfg = Config::default();
    // RANKMESH_SPIN_US and the other documented overrides apply here too.
    rankmesh::launch::apply_env_overrides(&mut cfg)?;
    cfg.set_same_host_channel(same_host);
    if std::env::var_os("P2P_NO_RECORDER").is_some() {
        cfg.set_flight_records(0);
    }
    let comm = rankmesh::launch::init_with(spec, cfg).await?;
    let r = comm.rank();
    let mut small = [0u8; 8];
    let mut lat = Vec::new();
    for batch in 0..=BATCHES {
        let t = Instant::now();
        for _ in 0..PINGS {
            if r == 0 {
                comm.send(&small, 1, 0).await?;
                comm.recv(&mut small, 1, 0).await?;
            } else {
                comm.recv(&mut small, 0, 0).await?;
                comm.send(&small, 0, 0).await?;
            }
        }
        if batch > 0 {
            lat.push(t.elapsed().as_secs_f64() / PINGS as f64 / 2.0 * 1e6);
        }
    }
    let mut big = vec![1u8; BIG];
    let mut bw = Vec::new();
    for rep in 0..=BIG_REPS {
        let t = Instant::now();
        if r == 0 {
            comm.send(&big, 1, 1).await?;
            comm.recv(&mut small, 1, 2).await?;
        } else {
            comm.recv(&mut big, 0, 1).await?;
            comm.send(&small, 0, 2).await?;
        }
        if rep > 0 {
            bw.push(BIG as f64 / t.elapsed().as_secs_f64() / 1e9);
        }
    }
    comm.finalize().await?;
    Ok((median(lat), median(bw)))
}

/// Two credentials of a throwaway job, for raw quinn.
fn creds() -> (Credentials, Credentials) {
    let ca = JobCa::new("bench", Duration::from_secs(3600)).expect("ca");
    let make = |r: usize| {
        let key = RankKey::generate().expect("key");
        let cert = ca.sign_rank(&key.csr_der().expect("csr"), r).expect("sign");
        Credentials::new("bench", r, ca.cert_der(), cert, &key).expect("creds")
    };
    (make(0), make(1))
}

fn endpoints(cfg: &Config) -> (quinn::Endpoint, quinn::Endpoint, quinn::ClientConfig) {
    let (c0, c1) = creds();
    let tc = endpoint::transport_config(cfg).expect("transport config");
    let server_tls = pki::peer_server_config(&c1).expect("server tls");
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(
        quinn::crypto::rustls::QuicServerConfig::try_from(server_tls).expect("quic server"),
    ));
    server.transport_config(tc.clone());
    let client_tls = pki::peer_client_config(&c0).expect("client tls");
    let mut client = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(client_tls).expect("quic client"),
    ));
    client.transport_config(tc);
    let lo: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    let a = endpoint::bind(lo, cfg).expect("bind");
    let b = endpoint::bind(lo, cfg).expect("bind");
    b.set_server_config(Some(server));
    (a, b, client)
}

/// Raw quinn: (uni-per-message latency, long-lived-stream latency, bandwidth).
fn bench_quinn() -> (f64, f64, f64) {
    let (tx, rx) = std::sync::mpsc::channel::<(SocketAddr, quinn::ClientConfig)>();
    let server = std::thread::spawn(move || {
        rt().block_on(async move {
            let (_a, b, client) = endpoints(&Config::default());
            tx.send((b.local_addr().expect("addr"), client))
                .expect("send addr");
            let conn = b.accept().await.expect("incoming").await.expect("accept");
            // Uni-per-message echo.
            for _ in 0..(BATCHES + 1) * PINGS {
                let mut s = conn.accept_uni().await.expect("uni");
                let m = s.read_to_end(64).await.expect("read");
                let mut o = conn.open_uni().await.expect("open");
                o.write_all(&m).await.expect("write");
                o.finish().expect("finish");
            }
            // Long-lived stream echo.
            let (mut o, mut i) = conn.accept_bi().await.expect("bi");
            let mut m = [0u8; 8];
            for _ in 0..(BATCHES + 1) * PINGS {
                i.read_exact(&mut m).await.expect("read");
                o.write_all(&m).await.expect("write");
            }
            // Bandwidth: read 64 MiB, ack one byte.
            for _ in 0..=BIG_REPS {
                let mut s = conn.accept_uni().await.expect("uni");
                let mut got = 0;
                while let Some(c) = s.read_chunk(usize::MAX, true).await.expect("chunk") {
                    got += c.bytes.len();
                }
                assert_eq!(got, BIG);
                o.write_all(&[1]).await.expect("ack");
            }
            conn.closed().await;
        })
    });
    let (addr, client) = rx.recv().expect("server address");
    let res = rt().block_on(async move {
        let lo: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        let a = endpoint::bind(lo, &Config::default()).expect("bind");
        let conn = a
            .connect_with(client, addr, &pki::rank_dns_name("bench", 1))
            .expect("connect")
            .await
            .expect("handshake");
        let mut uni = Vec::new();
        for batch in 0..=BATCHES {
            let t = Instant::now();
            for _ in 0..PINGS {
                let mut o = conn.open_uni().await.expect("open");
                o.write_all(&[0u8; 8]).await.expect("write");
                o.finish().expect("finish");
                let mut s = conn.accept_uni().await.expect("uni");
                s.read_to_end(64).await.expect("read");
            }
            if batch > 0 {
                uni.push(t.elapsed().as_secs_f64() / PINGS as f64 / 2.0 * 1e6);
            }
        }
        let (mut o, mut i) = conn.open_bi().await.expect("bi");
        let mut m = [0u8; 8];
        let mut bi = Vec::new();
        for batch in 0..=BATCHES {
            let t = Instant::now();
            for _ in 0..PINGS {
                o.write_all(&m).await.expect("write");
                i.read_exact(&mut m).await.expect("read");
            }
            if batch > 0 {
                bi.push(t.elapsed().as_secs_f64() / PINGS as f64 / 2.0 * 1e6);
            }
        }
        let payload = Bytes::from(vec![1u8; BIG]);
        let mut bw = Vec::new();
        for rep in 0..=BIG_REPS {
            let t = Instant::now();
            let mut s = conn.open_uni().await.expect("open");
            s.write_chunk(payload.clone()).await.expect("write");
            s.finish().expect("finish");
            let mut ack = [0u8; 1];
            i.read_exact(&mut ack).await.expect("ack");
            if rep > 0 {
                bw.push(BIG as f64 / t.elapsed().as_secs_f64() / 1e9);
            }
        }
        conn.close(0u32.into(), b"done");
        a.wait_idle().await;
        (median(uni), median(bi), median(bw))
    });
    server.join().expect("server thread");
    res
}

/// One-way latency in us of 8-byte UDP datagrams between two threads on
/// loopback; `poll`: non-blocking receives in a loop instead of sleeping.
fn bench_udp(poll: bool) -> f64 {
    let a = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp bind");
    let b = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp bind");
    a.connect(b.local_addr().expect("addr")).expect("connect");
    b.connect(a.local_addr().expect("addr")).expect("connect");
    for s in [&a, &b] {
        s.set_nonblocking(poll).expect("nonblocking");
    }
    fn recv(s: &std::net::UdpSocket, buf: &mut [u8]) {
        loop {
            match s.recv(buf) {
                Ok(_) => return,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::hint::spin_loop(),
                Err(e) => panic!("udp recv: {e}"),
            }
        }
    }
    let echo = std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        for _ in 0..PINGS * BATCHES {
            recv(&b, &mut buf);
            b.send(&buf[..8]).expect("udp send");
        }
    });
    let mut buf = [0u8; 64];
    let mut per_batch = Vec::new();
    for _ in 0..BATCHES {
        let t = Instant::now();
        for _ in 0..PINGS {
            a.send(&[7u8; 8]).expect("udp send");
            recv(&a, &mut buf);
        }
        per_batch.push(t.elapsed().as_secs_f64() * 1e6 / (2 * PINGS) as f64);
    }
    echo.join().expect("echo thread");
    median(per_batch)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    println!("# p2p on one host, 2 ranks on 2 threads, current-thread runtimes");
    println!("# {PINGS} round trips x {BATCHES} batches; {BIG_REPS} x 64 MiB; medians");
    // Interleave the two so that machine noise hits both.
    for round in 0..2 {
        let (q_uni, q_bi, q_bw) = bench_quinn();
        let (r_lat, r_bw) = bench_rankmesh(false);
        let (s_lat, s_bw) = bench_rankmesh(true);
        let (u_sleep, u_poll) = (bench_udp(false), bench_udp(true));
        println!(
            "round {round}: 8 B one-way latency: raw UDP {u_sleep:.1} us sleeping in recv, \
             {u_poll:.1} us polling | ratio rankmesh QUIC/UDP sleeping {:.2}, polling {:.2}",
            r_lat / u_sleep,
            r_lat / u_poll
        );
        println!(
            "round {round}: 8 B one-way latency: rankmesh QUIC {r_lat:.1} us, same-host channel {s_lat:.1} us \
             | raw quinn uni-stream {q_uni:.1} us, long-lived stream {q_bi:.1} us \
             | ratio rankmesh QUIC/quinn-uni {:.2}",
            r_lat / q_uni
        );
        println!(
            "round {round}: 64 MiB one-way bandwidth: rankmesh QUIC {r_bw:.2} GB/s, same-host channel \
             {s_bw:.2} GB/s | raw quinn {q_bw:.2} GB/s | ratio rankmesh QUIC/quinn {:.2}",
            r_bw / q_bw
        );
    }
}
