//! Unauthenticated clients flooding a seed: shared by the security test and
//! the `seedflood` benchmark (`#[path]`-included by the latter).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A running flood: `conns` connections to the seed, none of which ever
/// sends a valid join request; each pushes junk on one bidirectional and up
/// to 16 unidirectional streams for as long as the seed keeps it.
pub struct Flood {
    stop: Arc<AtomicBool>,
    tasks: tokio::task::JoinSet<()>,
    ep: quinn::Endpoint,
    /// Handshakes that completed.
    pub connected: Arc<AtomicUsize>,
}

fn client() -> quinn::ClientConfig {
    let tls = rankmesh::pki::seed_client_config().expect("seed client TLS");
    quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("QUIC client TLS"),
    ))
}

/// What each attacking connection does once its handshake completed.
#[derive(Clone, Copy)]
#[allow(dead_code)] // the benchmark uses one mode, the security test others
pub enum Mode {
    /// Push junk on every stream it may open, until the seed drops it.
    Push,
    /// As `Push`, and open a new connection whenever the seed drops or
    /// refuses one (a sustained attack).
    PushAgain,
    /// Send nothing: hold its place at the seed until the seed's proof
    /// deadline drops it.
    Idle,
}

/// One attacking connection, counted in `connected` once its handshake
/// completed; `true` if it did.
async fn attack(
    ep: &quinn::Endpoint,
    addr: SocketAddr,
    stop: &AtomicBool,
    connected: &AtomicUsize,
    mode: Mode,
) -> bool {
    let Ok(connecting) = ep.connect_with(client(), addr, "seed") else {
        return false;
    };
    let Ok(Ok(conn)) = tokio::time::timeout(Duration::from_secs(10), connecting).await else {
        return false;
    };
    connected.fetch_add(1, Ordering::Relaxed);
    if let Mode::Idle = mode {
        while !stop.load(Ordering::Relaxed) && conn.close_reason().is_none() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        return true;
    }
    let mut streams = Vec::new();
    if let Ok(Ok((s, _))) = tokio::time::timeout(Duration::from_millis(200), conn.open_bi()).await {
        streams.push(s);
    }
    for _ in 0..16 {
        match tokio::time::timeout(Duration::from_millis(50), conn.open_uni()).await {
            Ok(Ok(s)) => streams.push(s),
            _ => break,
        }
    }
    let junk = vec![0x5au8; 64 << 10];
    let mut writers = tokio::task::JoinSet::new();
    for mut s in streams {
        let junk = junk.clone();
        writers.spawn(async move {
            loop {
                let w = tokio::time::timeout(Duration::from_millis(200), s.write_all(&junk));
                if let Ok(Err(_)) = w.await {
                    return;
                }
            }
        });
    }
    tokio::select! {
        _ = async { while writers.join_next().await.is_some() {} } => {}
        _ = async { while !stop.load(Ordering::Relaxed) { tokio::time::sleep(Duration::from_millis(50)).await } } => {}
    }
    writers.abort_all();
    conn.close(0u32.into(), b"");
    true
}

impl Flood {
    /// Start `conns` attacking connections to the seed at `addr` from the
    /// source address `from` (another loopback address than the ranks'
    /// plays an attacker on another host).
    pub fn start_from(addr: SocketAddr, from: std::net::IpAddr, conns: usize, mode: Mode) -> Flood {
        let reconnect = matches!(mode, Mode::PushAgain);
        let stop = Arc::new(AtomicBool::new(false));
        let connected = Arc::new(AtomicUsize::new(0));
        let ep = quinn::Endpoint::client(SocketAddr::new(from, 0)).expect("client endpoint");
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..conns {
            let (ep, stop, connected) = (ep.clone(), stop.clone(), connected.clone());
            tasks.spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    if !attack(&ep, addr, &stop, &connected, mode).await {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    if !reconnect {
                        return;
                    }
                }
            });
        }
        Flood {
            stop,
            tasks,
            ep,
            connected,
        }
    }

    /// Stop every attacking connection.
    pub async fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        while self.tasks.join_next().await.is_some() {}
        self.ep.close(0u32.into(), b"");
    }
}

/// Resident memory of a process, in bytes.
pub fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}
