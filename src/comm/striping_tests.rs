//! Striped QUIC messages end to end: two ranks in this process with
//! transports built by hand (so a test can stop a transport thread), over
//! loopback with mutual TLS and the same-host channel off.

use super::{Communicator, World};
use crate::config::Config;
use crate::pki::{self, Credentials, JobCa, RankKey};
use crate::transport::quic::{endpoint, Lanes, QuicTransport};
use crate::wire::control::{KeyPin, PeerInfo};
use crate::ReduceOp;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

const JOB: &str = "stripes";

/// Fields drop in this order: the lanes' threads stop before the
/// transports wait for them.
struct Pair {
    /// Per rank, per lane: dropping one stops that lane's thread.
    stops: Vec<Vec<tokio::sync::oneshot::Sender<()>>>,
    comms: Vec<Communicator>,
    transports: Vec<Arc<QuicTransport>>,
}

async fn pair(threads: usize, cfg: &Config) -> Pair {
    let ca = JobCa::new(JOB, Duration::from_secs(600)).unwrap();
    let creds: Vec<Credentials> = (0..2)
        .map(|r| {
            let key = RankKey::generate().unwrap();
            let cert = ca.sign_rank(&key.csr_der().unwrap(), r).unwrap();
            Credentials::new(JOB, r, ca.cert_der(), cert, &key).unwrap()
        })
        .collect();
    let lo: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let mut eps = Vec::new();
    let mut lanes = Vec::new();
    let mut stops = Vec::new();
    let mut peers = Vec::new();
    for c in &creds {
        let ep = endpoint::bind(lo, cfg).unwrap();
        let mut l = Lanes::start(lo.ip(), cfg, threads).unwrap();
        QuicTransport::accept_peers(&ep, &l, c, cfg).unwrap();
        stops.push(l.take_stops());
        peers.push(PeerInfo {
            addr: ep.local_addr().unwrap(),
            lanes: l.ports().unwrap(),
            host: "localhost".into(),
            pid: std::process::id(),
            key: KeyPin::Pinned(pki::key_pin(&c.cert).unwrap()),
        });
        eps.push(ep);
        lanes.push(l);
    }
    let mut comms = Vec::new();
    let mut transports = Vec::new();
    for ((ep, l), c) in eps.into_iter().zip(lanes).zip(&creds) {
        let t = Arc::new(QuicTransport::start(ep, l, c, peers.clone(), cfg).unwrap());
        let world = Arc::new(World::new(t.clone(), cfg.clone(), JOB.into(), None));
        comms.push(Communicator::world(world, 1));
        transports.push(t);
    }
    Pair {
        stops,
        comms,
        transports,
    }
}

fn config() -> Config {
    let mut cfg = Config::default();
    cfg.set_same_host_channel(false);
    // Small parts: messages of a few KiB are striped.
    cfg.set_eager_limit(1024);
    cfg.set_op_timeout(Duration::from_secs(60));
    cfg
}

fn pattern(len: usize, seed: u32) -> Vec<u8> {
    (0..len)
        .map(|i| {
            (i as u32)
                .wrapping_mul(2_654_435_761)
                .wrapping_add(seed)
                .to_le_bytes()[1]
        })
        .collect()
}

/// Messages of many sizes, striped into up to four parts, arrive exact and
/// in the order sent; collectives over them are exact too.
#[tokio::test(flavor = "current_thread")]
async fn striped_messages_arrive_exact_and_in_order() {
    let p = pair(4, &config()).await;
    let sizes = [2048usize, 2049, 3071, 4096, 4099, 65_537, 300_001, 1 << 20];
    let (a, b) = (p.comms[0].clone(), p.comms[1].clone());
    let sender = async {
        for (i, &n) in sizes.iter().enumerate() {
            a.send(&pattern(n, i as u32), 1, 7).await.unwrap();
        }
        // The other way too, while rank 1 sends its own.
        let mut back = vec![0u8; 500_000];
        a.recv(&mut back, 1, 8).await.unwrap();
        assert!(
            back == pattern(500_000, 99),
            "rank 1's message to rank 0 differs"
        );
    };
    let receiver = async {
        b.send(&pattern(500_000, 99), 0, 8).await.unwrap();
        for (i, &n) in sizes.iter().enumerate() {
            let mut got = vec![0u8; n];
            b.recv(&mut got, 0, 7).await.unwrap();
            assert!(
                got == pattern(n, i as u32),
                "message {i} of {n} bytes differs"
            );
        }
    };
    tokio::join!(sender, receiver);
    // Both used their three lanes to the other.
    assert_eq!(p.transports[0].lane_connections(1), 3);
    assert_eq!(p.transports[1].lane_connections(0), 3);
    // Collectives, whose steps are striped, on odd sizes.
    for n in [1000usize, 40_001] {
        let run = |c: Communicator| async move {
            let mut v: Vec<f32> = (0..n).map(|i| (i % 97) as f32 + c.rank() as f32).collect();
            c.all_reduce(&mut v, ReduceOp::Sum).await.unwrap();
            v.iter()
                .enumerate()
                .filter(|(i, x)| **x != 2.0 * (*i % 97) as f32 + 1.0)
                .count()
        };
        let (x, y) = tokio::join!(run(a.clone()), run(b.clone()));
        assert_eq!((x, y), (0, 0), "wrong elements in an allreduce of {n}");
    }
    let (x, y) = tokio::join!(a.finalize(), b.finalize());
    x.unwrap();
    y.unwrap();
}

/// One transport thread stops (its packets stop): the peer's lane
/// connection to it times out while the main connection lives, and the
/// peer cuts the rank off; both sides' waiting receives fail naming the
/// other rank instead of waiting for their timeout.
#[tokio::test(flavor = "current_thread")]
async fn a_lost_lane_connection_cuts_the_peer_off() {
    let mut cfg = config();
    cfg.set_idle_timeout(Duration::from_secs(2));
    cfg.set_keep_alive(Duration::from_millis(300));
    let mut p = pair(2, &cfg).await;
    let (a, b) = (p.comms[0].clone(), p.comms[1].clone());
    let data = pattern(10_000, 1);
    let mut got = vec![0u8; 10_000];
    let (s, r) = tokio::join!(a.send(&data, 1, 1), b.recv(&mut got, 0, 1));
    s.unwrap();
    r.unwrap();
    assert_eq!(p.transports[0].lane_connections(1), 1);
    // Rank 1's lane thread ends: nothing of that lane answers any more.
    p.stops[1].clear();
    let started = std::time::Instant::now();
    let mut x = vec![0u8; 10];
    let mut y = vec![0u8; 10];
    let (ea, eb) = tokio::join!(a.recv(&mut x, 1, 2), b.recv(&mut y, 0, 2));
    let (ea, eb) = (ea.unwrap_err().to_string(), eb.unwrap_err().to_string());
    eprintln!("rank 0: {ea}\nrank 1: {eb}\nafter {:?}", started.elapsed());
    assert!(
        ea.contains("rank 1") && ea.contains("transport thread"),
        "rank 0: {ea}"
    );
    assert!(eb.contains("rank 0"), "rank 1: {eb}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "noticed only after {:?}",
        started.elapsed()
    );
}

/// One transport thread: nothing is striped and no lane is dialled.
#[tokio::test(flavor = "current_thread")]
async fn one_thread_stripes_nothing() {
    let p = pair(1, &config()).await;
    let (a, b) = (p.comms[0].clone(), p.comms[1].clone());
    let data = pattern(100_000, 3);
    let mut got = vec![0u8; 100_000];
    let (s, r) = tokio::join!(a.send(&data, 1, 1), b.recv(&mut got, 0, 1));
    s.unwrap();
    r.unwrap();
    assert!(got == data);
    assert_eq!(p.transports[0].lane_connections(1), 0);
    let (x, y) = tokio::join!(a.finalize(), b.finalize());
    x.unwrap();
    y.unwrap();
}
