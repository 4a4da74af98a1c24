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
    let tls = rankmesh::internals::pki::seed_client_config().expect("seed client TLS");
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

/// A UDP socket that sends but never receives: a client behind it starts
/// handshakes and never answers, as packets with forged source addresses do.
#[derive(Debug)]
struct DeafSocket(Arc<dyn quinn::AsyncUdpSocket>);

impl quinn::AsyncUdpSocket for DeafSocket {
    fn create_io_poller(self: Arc<Self>) -> std::pin::Pin<Box<dyn quinn::UdpPoller>> {
        self.0.clone().create_io_poller()
    }

    fn try_send(&self, t: &quinn::udp::Transmit) -> std::io::Result<()> {
        self.0.try_send(t)
    }

    fn poll_recv(
        &self,
        _cx: &mut std::task::Context,
        _bufs: &mut [std::io::IoSliceMut<'_>],
        _meta: &mut [quinn::udp::RecvMeta],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::task::Poll::Pending
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.0.local_addr()
    }
}

/// Handshakes started from a deaf socket, kept going until dropped.
#[allow(dead_code)] // used by the security test, not by the benchmark
pub struct Deaf {
    _pending: Vec<quinn::Connecting>,
    _ep: quinn::Endpoint,
}

#[allow(dead_code)]
impl Deaf {
    /// Start `conns` handshakes with the server at `addr`, offering the
    /// application protocol `alpn` (a server refuses any other at once).
    pub fn connect(addr: SocketAddr, alpn: &[u8], conns: usize) -> Deaf {
        let mut tls = rankmesh::internals::pki::seed_client_config().expect("client TLS");
        tls.alpn_protocols = vec![alpn.to_vec()];
        let client = quinn::ClientConfig::new(Arc::new(
            quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("QUIC client TLS"),
        ));
        use quinn::Runtime;
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let sock = quinn::TokioRuntime.wrap_udp_socket(udp).expect("wrap");
        let ep = quinn::Endpoint::new_with_abstract_socket(
            quinn::EndpointConfig::default(),
            None,
            Arc::new(DeafSocket(sock)),
            Arc::new(quinn::TokioRuntime),
        )
        .expect("endpoint");
        let pending = (0..conns)
            .filter_map(|_| ep.connect_with(client.clone(), addr, "rank").ok())
            .collect();
        Deaf {
            _pending: pending,
            _ep: ep,
        }
    }
}

/// Set in a child process that is to run a seed: the file it writes
/// "address token job" to.
pub const SEED_OUT: &str = "RANKMESH_FLOOD_SEED_OUT";

/// The body of a seed child (this binary started again with [`SEED_OUT`]
/// set): a seed for 2 ranks on a runtime of one worker; writes its line,
/// then runs until its parent kills it (`secs` at most).
pub fn seed_child_main(out: std::ffi::OsString, secs: u64) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let seed =
            rankmesh::launch::Seed::start(rankmesh::launch::SeedConfig::new(2)).expect("seed");
        let line = format!(
            "{} {} {}",
            seed.addr().expect("address"),
            seed.token().to_hex(),
            seed.job_id()
        );
        std::fs::write(&out, line).expect("write the seed's line");
        tokio::time::sleep(Duration::from_secs(secs)).await;
    });
}

/// A seed in a child process, so that its memory is measured alone; killed
/// when dropped.
pub struct SeedChild {
    proc: std::process::Child,
    out: std::path::PathBuf,
    /// Its address.
    pub addr: SocketAddr,
    /// The job token.
    pub token: rankmesh::launch::JobToken,
    /// The job id.
    pub job: String,
}

impl SeedChild {
    /// Start this binary again with `args` and [`SEED_OUT`] set (its
    /// `main`, or the test `args` select, calls [`seed_child_main`]); wait
    /// up to 60 s for its line.
    pub async fn start(args: &[&str]) -> SeedChild {
        static N: AtomicUsize = AtomicUsize::new(0);
        let out = std::env::temp_dir().join(format!(
            "rankmesh-seed-child-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_file(&out);
        let mut proc = std::process::Command::new(std::env::current_exe().expect("exe"))
            .args(args)
            .env(SEED_OUT, &out)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("start the seed child");
        let until = std::time::Instant::now() + Duration::from_secs(60);
        let line = loop {
            match std::fs::read_to_string(&out) {
                Ok(l) if l.split(' ').count() == 3 => break l,
                _ if std::time::Instant::now() > until => {
                    let _ = proc.kill();
                    panic!("the seed child wrote no address within 60 s");
                }
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        let mut p = line.split(' ');
        SeedChild {
            addr: p.next().and_then(|a| a.parse().ok()).expect("address"),
            token: rankmesh::launch::JobToken::from_hex(p.next().expect("token")).expect("token"),
            job: p.next().expect("job").to_string(),
            proc,
            out,
        }
    }

    /// The child's pid.
    pub fn pid(&self) -> u32 {
        self.proc.id()
    }
}

impl Drop for SeedChild {
    fn drop(&mut self) {
        let _ = self.proc.kill();
        let _ = self.proc.wait();
        let _ = std::fs::remove_file(&self.out);
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
