//! QUIC transport: one endpoint (one UDP socket) per rank, at most one
//! connection per peer pair in use for sending, one unidirectional stream
//! per message, mutual TLS pinned to the job CA.
//!
//! Connections are opened lazily by whichever side sends first. Each side
//! sends all its frames on one registered connection per peer, so frames and
//! the final `Bye` from one sender are seen by one receive loop. The
//! receiving side reads each stream's 64-byte header, checks that the frame's
//! source is the rank named in the connection's certificate, bounds the
//! length, and hands the message to the mailbox: small payloads are read
//! completely first, large ones stay in QUIC's flow-control window until a
//! receive consumes them.

pub mod endpoint;
mod local;
pub(crate) mod places;

use super::{BoxFut, Broken, Failure, Incoming, Mailbox, Payload, Refused, StreamBody, Transport};
use crate::config::Config;
use crate::pki::{self, Credentials};
use crate::wire::control::{KeyPin, PeerInfo};
use crate::wire::{FrameKind, Header, HEADER_LEN};
use crate::{Error, Result};
use bytes::Bytes;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{ConnectionError, VarInt};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::task::JoinSet;

/// Close code: the rank finalized normally.
pub const CODE_BYE: u32 = 0;
/// Close code: the rank stopped after an error.
pub const CODE_ABORT: u32 = 1;
/// Close code: the peer sent something invalid.
pub const CODE_PROTOCOL: u32 = 2;
/// Close code: the peer's certificate is not acceptable.
pub const CODE_AUTH: u32 = 3;
/// Close code: the job was aborted; the reason is `"{world rank}\n{why}"`
/// (built by `job_abort_reason`), so a rank that learns of an abort passes it
/// on to every peer it is connected to.
pub const CODE_JOB_ABORT: u32 = 4;

/// Most bytes of an abort reason carried in a close frame (it must fit in
/// one packet).
const MAX_CLOSE_REASON: usize = 900;

/// The close reason of [`CODE_JOB_ABORT`]: who aborted the job, and why.
fn job_abort_reason(by: usize, why: &str) -> Vec<u8> {
    let mut cut = why.len().min(MAX_CLOSE_REASON);
    while !why.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{by}\n{}", &why[..cut]).into_bytes()
}

/// Parse a [`CODE_JOB_ABORT`] close reason; `None` if it is malformed.
fn parse_job_abort(reason: &[u8]) -> Option<(usize, String)> {
    let text = std::str::from_utf8(reason).ok()?;
    let (by, why) = text.split_once('\n')?;
    Some((by.parse().ok()?, why.to_string()))
}

struct Link {
    conn: Mutex<Option<quinn::Connection>>,
    dial: tokio::sync::Mutex<()>,
    done: tokio::sync::watch::Sender<bool>,
    local: local::LocalLink,
    /// Connections with the peer that ended and whose end is still being
    /// reported (the mailbox is told once the peer's data is all in).
    ending: std::sync::atomic::AtomicUsize,
}

impl Link {
    fn new() -> Link {
        Link {
            conn: Mutex::new(None),
            dial: tokio::sync::Mutex::new(()),
            done: tokio::sync::watch::channel(false).0,
            local: local::LocalLink::new(),
            ending: std::sync::atomic::AtomicUsize::new(0),
        }
    }
}

/// How far beyond this rank's peer table a connecting member's id may be
/// (members admitted at the epoch this rank is still entering).
const MEMBER_ID_SLACK: usize = 4096;

struct Shared {
    rank: usize,
    job_id: String,
    endpoint: quinn::Endpoint,
    client: quinn::ClientConfig,
    /// Peer table by world rank (member id); grows in elastic jobs. Each
    /// entry pins the key a connection claiming that member must have.
    peers: RwLock<Vec<PeerInfo>>,
    /// The table's length, sent with every table adopted: connections from
    /// members this rank has no key for yet wait for it.
    table_len: tokio::sync::watch::Sender<usize>,
    /// Connection state by world rank; grows with the table, and for an
    /// inbound peer this rank has not heard of yet.
    links: RwLock<Vec<Arc<Link>>>,
    mailbox: Mailbox,
    cfg: Config,
    tasks: Mutex<JoinSet<()>>,
    closing: AtomicBool,
    /// Places for incoming connections whose handshake has not completed
    /// (anyone who reaches the port can start one; only a certificate of
    /// the job CA completes it).
    handshakes: places::Places,
}

/// Incoming connections in their handshake at once, at most (and from one
/// address): beyond this a rank refuses new ones, so that clients without
/// a job certificate cannot exhaust its memory. A job's own ranks dial each
/// other once per pair, and a handshake between them takes milliseconds.
const MAX_HANDSHAKES: usize = 256;
const MAX_HANDSHAKES_PER_SOURCE: usize = 64;

/// Beyond this many handshakes at once, a client whose address is not yet
/// validated is first sent a QUIC Retry (which costs the rank no state), so
/// that packets with forged source addresses, or clients that never answer,
/// hold no place. The job's own ranks pay one more round trip then.
const RETRY_ABOVE: usize = 16;

/// Time an incoming connection has to complete its handshake.
const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);

/// How often a rank reports incoming connections that failed before a
/// verified certificate.
const REPORT_EVERY: Duration = Duration::from_secs(10);

/// The QUIC transport of one rank.
pub struct QuicTransport {
    sh: Arc<Shared>,
}

/// A large message's payload, still arriving on its QUIC stream.
struct QuicBody(quinn::RecvStream);

impl StreamBody for QuicBody {
    fn poll_piece(
        &mut self,
        cx: &mut std::task::Context<'_>,
        max: usize,
    ) -> std::task::Poll<std::result::Result<Option<Bytes>, Broken>> {
        let read = std::pin::pin!(self.0.read_chunk(max, true));
        read.poll(cx).map(|r| match r {
            Ok(c) => Ok(c.map(|c| c.bytes)),
            Err(e) => Err(Broken(format!("stream failed mid-message: {e}"))),
        })
    }
}

fn quic_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::transport(None, format!("{what}: {e}"))
}

impl QuicTransport {
    /// Let `endpoint` accept peer connections with the rank's certificate.
    /// Connections that arrive before [`QuicTransport::start`] wait in the
    /// endpoint's queue.
    pub fn accept_peers(
        endpoint: &quinn::Endpoint,
        creds: &Credentials,
        cfg: &Config,
    ) -> Result<()> {
        let server_tls = QuicServerConfig::try_from(pki::peer_server_config(creds)?)
            .map_err(|e| quic_err("QUIC server TLS", e))?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(server_tls));
        server.transport_config(endpoint::transport_config(cfg)?);
        endpoint.set_server_config(Some(server));
        Ok(())
    }

    /// Start serving peers on `endpoint` (already bound, already used to
    /// join the seed, and accepting peers) with the rank's credentials and
    /// the peer table.
    pub fn start(
        endpoint: quinn::Endpoint,
        creds: &Credentials,
        peers: Vec<PeerInfo>,
        cfg: &Config,
    ) -> Result<QuicTransport> {
        let tcfg = endpoint::transport_config(cfg)?;
        let client_tls = QuicClientConfig::try_from(pki::peer_client_config(creds)?)
            .map_err(|e| quic_err("QUIC client TLS", e))?;
        let mut client = quinn::ClientConfig::new(Arc::new(client_tls));
        client.transport_config(tcfg);
        let links = peers.iter().map(|_| Arc::new(Link::new())).collect();
        let sh = Arc::new(Shared {
            rank: creds.rank,
            job_id: creds.job_id.clone(),
            endpoint,
            client,
            table_len: tokio::sync::watch::channel(peers.len()).0,
            peers: RwLock::new(peers),
            links: RwLock::new(links),
            mailbox: Mailbox::with_unexpected_limit(cfg.max_unexpected_bytes())
                .with_spin_wait(cfg.spin_wait()),
            cfg: cfg.clone(),
            tasks: Mutex::new(JoinSet::new()),
            closing: AtomicBool::new(false),
            handshakes: places::Places::new(MAX_HANDSHAKES, MAX_HANDSHAKES_PER_SOURCE),
        });
        let acc = sh.clone();
        sh.spawn(async move { acc.accept_loop().await });
        sh.start_local();
        Ok(QuicTransport { sh })
    }

    /// The local address of this rank's endpoint.
    pub fn local_addr(&self) -> Option<std::net::SocketAddr> {
        self.sh.endpoint.local_addr().ok()
    }
}

impl Drop for QuicTransport {
    fn drop(&mut self) {
        // Without an explicit shutdown, close at once so no task or socket outlives us.
        if !self.sh.closing.swap(true, Ordering::AcqRel) {
            self.sh
                .endpoint
                .close(VarInt::from_u32(CODE_BYE), b"rank dropped its transport");
        }
        self.sh.abort_tasks();
    }
}

enum Frame {
    Delivered,
    Bye,
    Dropped,
    Violation(String),
    /// The peer pushed more than this rank holds for it unreceived.
    Overrun(String),
}

impl Shared {
    fn spawn(&self, fut: impl Future<Output = ()> + Send + 'static) {
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        while tasks.try_join_next().is_some() {}
        tasks.spawn(fut);
    }

    fn abort_tasks(&self) {
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        tasks.abort_all();
        while tasks.try_join_next().is_some() {}
    }

    /// Number of entries in the peer table.
    fn n_peers(&self) -> usize {
        self.peers.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// The address of `rank`, if the table has it.
    fn peer_addr(&self, rank: usize) -> Option<std::net::SocketAddr> {
        let g = self.peers.read().unwrap_or_else(|p| p.into_inner());
        g.get(rank).map(|p| p.addr)
    }

    /// The process id `rank` reported when it joined (attested by the seed).
    fn peer_pid(&self, rank: usize) -> Option<u32> {
        let g = self.peers.read().unwrap_or_else(|p| p.into_inner());
        g.get(rank).map(|p| p.pid)
    }

    /// The connection state of `rank` (created on demand).
    fn link(&self, rank: usize) -> Arc<Link> {
        if let Some(l) = self
            .links
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(rank)
        {
            return l.clone();
        }
        let mut g = self.links.write().unwrap_or_else(|p| p.into_inner());
        while g.len() <= rank {
            g.push(Arc::new(Link::new()));
        }
        g[rank].clone()
    }

    /// Adopt the seed's latest peer table (an elastic job's): new members
    /// are added, and an entry whose member was admitted since this rank
    /// last heard of it gains its key. The table never shrinks.
    fn add_peers(&self, table: &[PeerInfo]) {
        let len = {
            let mut g = self.peers.write().unwrap_or_else(|p| p.into_inner());
            for (i, p) in table.iter().enumerate() {
                match g.get_mut(i) {
                    Some(old) => *old = p.clone(),
                    None => g.push(p.clone()),
                }
            }
            g.len()
        };
        if let Some(last) = len.checked_sub(1) {
            self.link(last);
        }
        self.table_len.send_replace(len);
    }

    fn registered(&self, rank: usize) -> Option<quinn::Connection> {
        let l = self.link(rank);
        let g = l.conn.lock().unwrap_or_else(|p| p.into_inner());
        g.clone()
    }

    /// Use `conn` for sending to `rank` unless a connection is already registered.
    fn register(&self, rank: usize, conn: &quinn::Connection) -> quinn::Connection {
        let l = self.link(rank);
        let mut g = l.conn.lock().unwrap_or_else(|p| p.into_inner());
        g.get_or_insert_with(|| conn.clone()).clone()
    }

    fn failure(&self, rank: usize, reason: String) -> Failure {
        Failure::lost(rank, reason)
    }

    /// A send to `dst` failed: the reason `dst` is known to be gone, if it
    /// is, else `what`.
    fn send_failure(&self, dst: usize, what: String) -> Failure {
        let reason = self.mailbox.gone_reason(dst).unwrap_or(what);
        self.failure(dst, reason)
    }

    async fn accept_loop(self: Arc<Self>) {
        let mut report = tokio::time::interval(REPORT_EVERY);
        loop {
            let incoming = tokio::select! {
                i = self.endpoint.accept() => match i {
                    Some(i) => i,
                    None => break,
                },
                _ = report.tick() => {
                    let (refused, failed, last) = self.handshakes.take_counts();
                    if refused + failed > 0 {
                        tracing::warn!(
                            rank = self.rank,
                            "in the last {REPORT_EVERY:?}, {failed} incoming connections ended \
                             without a certificate of this job (the latest: {}) and {refused} \
                             were refused because {MAX_HANDSHAKES} handshakes (or \
                             {MAX_HANDSHAKES_PER_SOURCE} from one address) were in progress: \
                             something that is not a rank of this job is connecting to this \
                             rank's port",
                            last.as_deref().unwrap_or("none")
                        );
                    }
                    continue;
                }
            };
            if self.closing.load(Ordering::Acquire) {
                incoming.refuse();
                continue;
            }
            if self.handshakes.held() >= RETRY_ABOVE && !incoming.remote_address_validated() {
                // Stateless: a client at a real address comes back with
                // the token and is then counted.
                let _ = incoming.retry();
                continue;
            }
            let Some(place) = self.handshakes.take(incoming.remote_address().ip()) else {
                incoming.refuse();
                continue;
            };
            let sh = self.clone();
            self.spawn(async move { sh.accept_one(incoming, place).await });
        }
    }

    async fn accept_one(self: Arc<Self>, incoming: quinn::Incoming, place: places::Place) {
        let from = incoming.remote_address();
        let limit = HANDSHAKE_DEADLINE.min(self.cfg.formation_timeout());
        let conn = match tokio::time::timeout(limit, incoming).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                tracing::debug!(rank = self.rank, %from, "refused a connection: {e}");
                place.failed(format!("{from}: {e}"));
                return;
            }
            Err(_) => {
                place.failed(format!("{from}: no handshake within {limit:?}"));
                return;
            }
        };
        drop(place);
        let (rank, pin) = match self.identify(&conn) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(rank = self.rank, %from, "refused a peer: {e}");
                conn.close(
                    VarInt::from_u32(CODE_AUTH),
                    b"certificate names no peer rank",
                );
                return;
            }
        };
        // Nothing from the connection is read, and its same-host secret is
        // not accepted, until its key is the one the table pins.
        if let Err((e, why)) = self.check_key(rank, &pin).await {
            tracing::warn!(rank = self.rank, %from, "refused a connection claiming rank {rank}: {e}");
            conn.close(VarInt::from_u32(CODE_AUTH), why);
            return;
        }
        self.register(rank, &conn);
        self.serve(rank, conn).await;
    }

    /// The peer's leaf certificate (already verified against the job CA).
    fn peer_cert(conn: &quinn::Connection) -> Result<rustls::pki_types::CertificateDer<'static>> {
        let certs = conn
            .peer_identity()
            .and_then(|id| {
                id.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                    .ok()
            })
            .ok_or_else(|| Error::auth("peer presented no certificate"))?;
        certs
            .first()
            .cloned()
            .ok_or_else(|| Error::auth("peer presented an empty certificate chain"))
    }

    /// Check that the key of a connection claiming member `rank` is the one
    /// the peer table pins for it. A member this rank has no key for yet
    /// (an elastic job's newcomer that dialed before this rank entered the
    /// new epoch) is waited for, at most the formation timeout. On refusal:
    /// the error, and the close reason for the peer.
    async fn check_key(
        &self,
        rank: usize,
        pin: &[u8; 32],
    ) -> std::result::Result<(), (Error, &'static [u8])> {
        let limit = self.cfg.formation_timeout();
        let until = tokio::time::Instant::now() + limit;
        // Subscribed before the table is read: no later table is missed.
        let mut tables = self.table_len.subscribe();
        loop {
            let want = {
                let g = self.peers.read().unwrap_or_else(|p| p.into_inner());
                g.get(rank).map(|p| p.key)
            };
            match want {
                Some(KeyPin::Pinned(k)) if k == *pin => return Ok(()),
                Some(KeyPin::Pinned(_)) => {
                    return Err((
                        Error::auth(format!(
                            "its certificate names rank {rank} but carries another key than \
                             the one the seed admitted for rank {rank} (a certificate from a \
                             join that was abandoned after the seed issued it)"
                        )),
                        b"certificate key is not the one the seed admitted for that rank",
                    ))
                }
                Some(KeyPin::Revoked) => {
                    return Err((
                        Error::auth(format!(
                            "member {rank} was never admitted to the job (its join was \
                             abandoned), so no key is accepted for it"
                        )),
                        b"no admitted key for that member",
                    ))
                }
                None | Some(KeyPin::Pending) => {}
            }
            let next = tokio::time::timeout_at(until, tables.changed()).await;
            if !matches!(next, Ok(Ok(()))) {
                return Err((
                    Error::auth(format!(
                        "member {rank} had no key in this rank's peer table within {limit:?}; \
                         it was not admitted to the job"
                    )),
                    b"no admitted key for that member",
                ));
            }
        }
    }

    /// The rank named by the peer's certificate (already verified against
    /// the job CA), and the certificate's key pin.
    fn identify(&self, conn: &quinn::Connection) -> Result<(usize, [u8; 32])> {
        let leaf = Self::peer_cert(conn)?;
        let rank = pki::rank_from_cert(&leaf, &self.job_id)?;
        // Any other member of this job (its certificate is the job CA's):
        // in an elastic job a new member may dial before this rank has
        // added it to its table, but not far beyond it.
        if rank == self.rank || rank >= self.n_peers() + MEMBER_ID_SLACK {
            return Err(Error::auth(format!(
                "peer certificate names rank {rank}, not a peer of rank {} ({} known members)",
                self.rank,
                self.n_peers()
            )));
        }
        Ok((rank, pki::key_pin(&leaf)?))
    }

    /// Receive loop of one connection.
    async fn serve(self: Arc<Self>, rank: usize, conn: quinn::Connection) {
        let secret = local::secret_of(&conn);
        if let Some(k) = secret {
            self.link(rank).local.add_secret(k);
        }
        self.serve_conn(rank, &conn).await;
        let link = self.link(rank);
        if let Some(k) = &secret {
            link.local.remove_secret(k);
        }
        if self.registered(rank).is_none() {
            link.local.forget();
        }
    }

    async fn serve_conn(self: &Arc<Self>, rank: usize, conn: &quinn::Connection) {
        let mut frames: JoinSet<Frame> = JoinSet::new();
        let end = loop {
            tokio::select! {
                s = conn.accept_uni() => match s {
                    Ok(s) => {
                        let sh = self.clone();
                        frames.spawn(async move { sh.read_frame(rank, s).await });
                    }
                    Err(e) => break e,
                },
                Some(done) = frames.join_next() => match done {
                    Ok(Frame::Bye) => {
                        // Every stream the peer opened before its Bye was
                        // accepted already; let them reach the mailbox first.
                        while frames.join_next().await.is_some() {}
                        self.mailbox.fail_peer(
                            rank,
                            "the rank finalized (it called finalize or ended) without sending this message",
                        );
                        self.link(rank).done.send_replace(true);
                    }
                    Ok(Frame::Violation(reason)) => self.cut_off(
                        rank,
                        &format!("it sent an invalid frame: {reason}"),
                        &reason,
                        Some(conn),
                    ),
                    Ok(Frame::Overrun(reason)) => self.cut_off(rank, &reason, &reason, Some(conn)),
                    Ok(Frame::Delivered) | Ok(Frame::Dropped) | Err(_) => {}
                },
            }
        };
        frames.abort_all();
        let link = self.link(rank);
        // Until the mailbox is told below, this rank still counts as
        // connected to the peer, so the seed's notice of its departure does
        // not overtake the peer's last data.
        link.ending.fetch_add(1, Ordering::AcqRel);
        self.report_end(rank, conn, &end).await;
        link.ending.fetch_sub(1, Ordering::AcqRel);
    }

    async fn report_end(
        self: &Arc<Self>,
        rank: usize,
        conn: &quinn::Connection,
        end: &ConnectionError,
    ) {
        let link = self.link(rank);
        link.done.send_replace(true);
        {
            // Forget the ended connection (and the buffers its state
            // holds); a later send dials again or reports the peer gone.
            let mut g = link.conn.lock().unwrap_or_else(|p| p.into_inner());
            if g.as_ref()
                .is_some_and(|c| c.stable_id() == conn.stable_id())
            {
                *g = None;
            }
        }
        if self.closing.load(Ordering::Acquire) {
            return;
        }
        let reason = match end {
            ConnectionError::ApplicationClosed(c) if c.error_code == VarInt::from_u32(CODE_BYE) => {
                "the rank finalized and closed its connections".to_string()
            }
            ConnectionError::ApplicationClosed(c)
                if c.error_code == VarInt::from_u32(CODE_JOB_ABORT) =>
            {
                match parse_job_abort(&c.reason) {
                    Some((by, why)) => {
                        // Before the peer is failed: waiters see the abort.
                        self.mailbox.abort_job(by, &why);
                        format!("the job was aborted by rank {by}: {why}")
                    }
                    None => {
                        "the rank closed its connection with a malformed abort notice".to_string()
                    }
                }
            }
            ConnectionError::ApplicationClosed(c) => {
                let reason = format!(
                    "the rank closed its connection: {}",
                    String::from_utf8_lossy(&c.reason)
                );
                // The peer's own explanation: it names the cause better
                // than whichever other path (its leaving, the seed's
                // notice) reports the peer gone while its data drains.
                self.mailbox.explain(rank, &reason);
                reason
            }
            ConnectionError::TimedOut => format!(
                "no packets for {:?} (idle timeout): its host is down, its process is \
                 frozen or held its runtime's only thread that long (long compute \
                 without an await on a current-thread runtime: move it to \
                 spawn_blocking, or raise Config::set_idle_timeout), or the network \
                 is cut",
                self.cfg.idle_timeout()
            ),
            ConnectionError::Reset => {
                "connection reset: its process exited or its endpoint vanished".to_string()
            }
            ConnectionError::LocallyClosed => return,
            other => format!("connection lost: {other}"),
        };
        tracing::debug!(rank = self.rank, peer = rank, "peer gone: {reason}");
        // What a peer that closed sent over the same-host channel before is
        // still in this rank's socket buffers: let it reach the mailbox
        // first. (A silent peer's channel has nothing more to give.)
        if !matches!(end, ConnectionError::TimedOut) {
            self.link(rank).local.inbound_drained(LOCAL_DRAIN).await;
        }
        self.mailbox.fail_peer(rank, &reason);
    }

    async fn read_frame(&self, rank: usize, mut s: quinn::RecvStream) -> Frame {
        let mut hb = [0u8; HEADER_LEN];
        if let Err(e) = s.read_exact(&mut hb).await {
            tracing::debug!(
                rank = self.rank,
                peer = rank,
                "stream ended before its header: {e}"
            );
            return Frame::Dropped;
        }
        let h = match Header::decode(&hb) {
            Ok(h) => h,
            Err(e) => return Frame::Violation(e.to_string()),
        };
        if h.src as usize != rank {
            return Frame::Violation(format!(
                "frame claims to come from rank {} but the connection's certificate is rank {rank}",
                h.src
            ));
        }
        if h.kind == FrameKind::Bye {
            return Frame::Bye;
        }
        if h.len > self.cfg.max_message_bytes() {
            let _ = s.stop(VarInt::from_u32(CODE_PROTOCOL));
            return Frame::Violation(format!(
                "frame announces {} payload bytes, more than the limit of {} \
                 (Config::set_max_message_bytes)",
                h.len,
                self.cfg.max_message_bytes()
            ));
        }
        if h.len as usize > self.cfg.eager_limit() {
            return match self
                .mailbox
                .deliver(Incoming::streamed(h, Box::new(QuicBody(s))))
            {
                Ok(()) => Frame::Delivered,
                Err(Refused(reason)) => Frame::Overrun(reason),
            };
        }
        let mut chunks = Vec::new();
        let mut left = h.len as usize;
        while left > 0 {
            match s.read_chunk(left, true).await {
                Ok(Some(c)) => {
                    left -= c.bytes.len();
                    chunks.push(c.bytes);
                }
                Ok(None) => {
                    return Frame::Violation(format!(
                        "message ended {left} bytes before its announced length {}",
                        h.len
                    ))
                }
                Err(e) => {
                    tracing::debug!(rank = self.rank, peer = rank, "message abandoned: {e}");
                    return Frame::Dropped;
                }
            }
        }
        match self.mailbox.deliver(Incoming::from_chunks(h, chunks)) {
            Ok(()) => Frame::Delivered,
            Err(Refused(reason)) => Frame::Overrun(reason),
        }
    }

    /// Cut `rank` off: every operation waiting on it fails with `why`, and
    /// its connections (`conn`, the one the offence came on, and the one
    /// this rank sends on) close as a protocol violation carrying
    /// `close_reason`, so it learns why too, before anything else this rank
    /// does. For a peer that broke the protocol, or pushed more unreceived
    /// messages than this rank holds for it (rather than lose a message or
    /// run out of memory).
    fn cut_off(
        &self,
        rank: usize,
        why: &str,
        close_reason: &str,
        conn: Option<&quinn::Connection>,
    ) {
        tracing::warn!(
            rank = self.rank,
            peer = rank,
            "closing the connection: {close_reason}"
        );
        self.mailbox.fail_peer(rank, why);
        for c in conn.cloned().into_iter().chain(self.registered(rank)) {
            c.close(VarInt::from_u32(CODE_PROTOCOL), close_reason.as_bytes());
        }
    }

    async fn connection(
        self: &Arc<Self>,
        dst: usize,
    ) -> std::result::Result<quinn::Connection, Failure> {
        if let Some(c) = self.registered(dst) {
            return Ok(c);
        }
        let link = self.link(dst);
        let _dialing = link.dial.lock().await;
        if let Some(c) = self.registered(dst) {
            return Ok(c);
        }
        let Some(addr) = self.peer_addr(dst) else {
            return Err(self.failure(dst, format!("no address known for rank {dst}")));
        };
        let name = pki::rank_dns_name(&self.job_id, dst);
        let fail = |e: String| {
            let reason = format!("cannot connect to it at {addr}: {e}");
            self.mailbox.fail_peer(dst, &reason);
            self.failure(dst, reason)
        };
        let connecting = self
            .endpoint
            .connect_with(self.client.clone(), addr, &name)
            .map_err(|e| fail(e.to_string()))?;
        let conn = match tokio::time::timeout(self.cfg.formation_timeout(), connecting).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(fail(e.to_string())),
            Err(_) => {
                return Err(fail(format!(
                    "no answer within {:?}",
                    self.cfg.formation_timeout()
                )))
            }
        };
        // The server proved it holds a certificate naming `dst`; it must
        // also be the key the seed admitted for `dst`.
        let checked = match Self::peer_cert(&conn).and_then(|c| pki::key_pin(&c)) {
            Ok(pin) => self.check_key(dst, &pin).await,
            Err(e) => Err((e, &b"unreadable certificate"[..])),
        };
        if let Err((e, why)) = checked {
            conn.close(VarInt::from_u32(CODE_AUTH), why);
            return Err(fail(e.to_string()));
        }
        let used = self.register(dst, &conn);
        let sh = self.clone();
        self.spawn(async move { sh.serve(dst, conn).await });
        Ok(used)
    }

    async fn send(
        self: &Arc<Self>,
        dst: usize,
        header: Header,
        payload: Payload<'_>,
    ) -> std::result::Result<(), Failure> {
        if dst >= self.n_peers() {
            return Err(self.failure(
                dst,
                format!("no rank {dst} in a world of {}", self.n_peers()),
            ));
        }
        if dst == self.rank {
            let Some(chunks) = payload.collect().await else {
                return Err(self.failure(dst, "this rank's payload producer stopped early".into()));
            };
            return self
                .mailbox
                .deliver(Incoming::from_chunks(header, chunks))
                .map_err(|why| self.failure(dst, format!("this rank refused it: {why}")));
        }
        if self.closing.load(Ordering::Acquire) {
            return Err(self.failure(dst, "this rank's transport is shut down".into()));
        }
        if let Some(reason) = self.mailbox.gone_reason(dst) {
            return Err(self.failure(dst, reason));
        }
        // Fast path: the same-host channel to `dst` is up (it is forgotten
        // with the QUIC connection, so a later send decides again).
        if let Some(tx) = self.link(dst).local.tx() {
            return self.send_local(dst, &tx, header, payload).await;
        }
        let conn = self.connection(dst).await?;
        if let Some(tx) = self.local_tx(dst, &conn).await {
            return self.send_local(dst, &tx, header, payload).await;
        }
        let lost = |e: &dyn std::fmt::Display| self.send_failure(dst, format!("send failed: {e}"));
        let s = conn.open_uni().await.map_err(|e| lost(&e))?;
        let mut guard = ResetOnDrop(Some(s));
        if let Some(s) = guard.0.as_mut() {
            match payload {
                Payload::Owned(v) => {
                    let mut bufs = Vec::with_capacity(v.len() + 1);
                    bufs.push(Bytes::copy_from_slice(&header.encode()));
                    bufs.extend(v);
                    s.write_all_chunks(&mut bufs).await.map_err(|e| lost(&e))?;
                }
                Payload::Borrowed(data) => {
                    // Copy a piece at a time: the copy of one piece overlaps
                    // the transmission of the previous ones, and small
                    // messages go out with their header in one write.
                    let first = data.len().min(COPY_PIECE - HEADER_LEN);
                    let mut head = Vec::with_capacity(HEADER_LEN + first);
                    head.extend_from_slice(&header.encode());
                    head.extend_from_slice(&data[..first]);
                    s.write_chunk(Bytes::from(head))
                        .await
                        .map_err(|e| lost(&e))?;
                    for piece in data[first..].chunks(COPY_PIECE) {
                        s.write_chunk(Bytes::copy_from_slice(piece))
                            .await
                            .map_err(|e| lost(&e))?;
                    }
                }
                Payload::Stream { len, mut chunks } => {
                    s.write_chunk(Bytes::copy_from_slice(&header.encode()))
                        .await
                        .map_err(|e| lost(&e))?;
                    let mut sent = 0;
                    while let Some(b) = chunks.recv().await {
                        sent += b.len();
                        if sent > len {
                            break;
                        }
                        s.write_chunk(b).await.map_err(|e| lost(&e))?;
                    }
                    if sent != len {
                        // Dropping the guard resets the stream: the peer
                        // discards the partial message.
                        return Err(self.failure(
                            self.rank,
                            format!("this rank's payload producer delivered {sent} of {len} bytes"),
                        ));
                    }
                }
            }
            s.finish().map_err(|e| lost(&e))?;
        }
        guard.0 = None;
        Ok(())
    }

    async fn shutdown(self: &Arc<Self>, graceful: bool) {
        if self.closing.swap(true, Ordering::AcqRel) {
            return;
        }
        // After a job abort nothing is waited for: the close passes the
        // abort on to every connected peer (the aborting rank also reaches
        // the peers it never talked to, below).
        let job_abort = self.mailbox.job_abort();
        if graceful && job_abort.is_none() {
            let deadline = tokio::time::Instant::now() + self.cfg.linger();
            let live: Vec<(usize, quinn::Connection)> = (0..self.n_peers())
                .filter_map(|r| self.registered(r).map(|c| (r, c)))
                .filter(|(_, c)| c.close_reason().is_none())
                .collect();
            let mut byes = Vec::with_capacity(live.len());
            let mut local_byes = Vec::new();
            for (r, c) in &live {
                if let Some(tx) = self.link(*r).local.tx() {
                    // Messages to this peer took the same-host channel: so
                    // does the goodbye, behind them.
                    let said = tokio::time::timeout_at(deadline, self.local_bye(&tx)).await;
                    if matches!(said, Ok(true)) {
                        local_byes.push(tx);
                    }
                    continue;
                }
                let bye = Header::new(FrameKind::Bye, self.rank as u32, 0, 0);
                // Bounded: a live peer that gives no stream credit must not
                // hold finalize forever.
                let opened = tokio::time::timeout_at(deadline, async {
                    let mut s = c.open_uni().await.ok()?;
                    s.write_all(&bye.encode()).await.ok()?;
                    Some(s)
                });
                if let Ok(Some(mut s)) = opened.await {
                    let _ = s.finish();
                    byes.push(s);
                } else {
                    tracing::debug!(rank = self.rank, peer = r, "could not send Bye");
                }
            }
            // Wait until every connected peer is done with us too, so data it
            // has not read yet is not lost when the connections close.
            for (r, c) in &live {
                let mut done = self.link(*r).done.subscribe();
                let wait = async {
                    tokio::select! {
                        _ = done.wait_for(|d| *d) => {}
                        _ = c.closed() => {}
                    }
                };
                if tokio::time::timeout_at(deadline, wait).await.is_err() {
                    tracing::warn!(
                        rank = self.rank,
                        "finalize: peers did not finalize within {:?}; closing anyway",
                        self.cfg.linger()
                    );
                    break;
                }
            }
            // Our Byes must have arrived before the connections close: a
            // peer that misses both the Bye and the close (packets lost just
            // before this process exits) would otherwise wait out its idle
            // timeout. `stopped` resolves once the peer acknowledged them.
            let deadline = tokio::time::Instant::now() + BYE_ACK_WAIT;
            for s in &byes {
                let _ = tokio::time::timeout_at(deadline, s.stopped()).await;
            }
            for tx in &local_byes {
                let _ = tokio::time::timeout_at(deadline, self.local_bye_acked(tx)).await;
            }
        }
        let mut notified = Vec::new();
        if !graceful {
            notified = self.reach_unconnected_peers().await;
        }
        tracing::debug!(rank = self.rank, "shutdown: peers done");
        let (code, why): (u32, Vec<u8>) = match &job_abort {
            Some((by, why)) => (CODE_JOB_ABORT, job_abort_reason(*by, why)),
            None if graceful => (CODE_BYE, b"finalized".to_vec()),
            None => (CODE_ABORT, b"rank stopped after an error".to_vec()),
        };
        self.endpoint.close(VarInt::from_u32(code), &why);
        self.close_local();
        let _ = tokio::time::timeout(Duration::from_millis(100), self.endpoint.wait_idle()).await;
        tracing::debug!(rank = self.rank, "shutdown: endpoint idle");
        drop(notified);
        self.abort_tasks();
        for r in 0..self.n_peers() {
            if r != self.rank {
                self.mailbox
                    .fail_peer(r, "this rank's transport was shut down");
            }
        }
    }
}

impl Shared {
    /// Before an abort: connect (briefly, all at once) to every peer this
    /// rank never talked to, so closing the endpoint tells them too, instead
    /// of leaving them waiting until their operation timeout.
    async fn reach_unconnected_peers(&self) -> Vec<quinn::Connection> {
        let mut dials = tokio::task::JoinSet::new();
        for r in 0..self.n_peers() {
            let live = self
                .registered(r)
                .is_some_and(|c| c.close_reason().is_none());
            if r == self.rank || live || self.mailbox.gone_reason(r).is_some() {
                continue;
            }
            let name = pki::rank_dns_name(&self.job_id, r);
            let Some(addr) = self.peer_addr(r) else {
                continue;
            };
            if let Ok(connecting) = self.endpoint.connect_with(self.client.clone(), addr, &name) {
                dials.spawn(
                    async move { tokio::time::timeout(ABORT_NOTICE_WAIT, connecting).await },
                );
            }
        }
        let mut conns = Vec::new();
        while let Some(done) = dials.join_next().await {
            if let Ok(Ok(Ok(c))) = done {
                conns.push(c);
            }
        }
        conns
    }
}

/// Bytes of borrowed payload copied per write.
const COPY_PIECE: usize = 1 << 20;

/// How long a closed connection's end waits for the peer's same-host
/// channel to be read to its end.
const LOCAL_DRAIN: Duration = Duration::from_secs(2);

/// How long a finalizing rank waits for its Byes to be acknowledged.
const BYE_ACK_WAIT: Duration = Duration::from_secs(2);

/// How long an aborting rank tries to reach peers it never talked to.
const ABORT_NOTICE_WAIT: Duration = Duration::from_secs(2);

/// Resets a stream whose message was not completely written (the sending
/// operation was cancelled), so the receiver sees an error, not a short message.
struct ResetOnDrop(Option<quinn::SendStream>);

impl Drop for ResetOnDrop {
    fn drop(&mut self) {
        if let Some(s) = self.0.as_mut() {
            let _ = s.reset(VarInt::from_u32(CODE_ABORT));
        }
    }
}

impl Transport for QuicTransport {
    fn rank(&self) -> usize {
        self.sh.rank
    }

    fn size(&self) -> usize {
        self.sh.n_peers()
    }

    fn send<'a>(
        &'a self,
        dst: usize,
        header: Header,
        payload: Payload<'a>,
    ) -> BoxFut<'a, std::result::Result<(), Failure>> {
        Box::pin(self.sh.send(dst, header, payload))
    }

    fn mailbox(&self) -> &Mailbox {
        &self.sh.mailbox
    }

    fn connected(&self, rank: usize) -> bool {
        // A registered connection counts until its end has been reported
        // (its serve task clears it): one the peer just closed will say
        // why, in order with the peer's data.
        rank < self.sh.n_peers()
            && (self.sh.registered(rank).is_some()
                || self.sh.link(rank).ending.load(Ordering::Acquire) > 0)
    }

    fn path(&self, rank: usize) -> crate::transport::PeerPath {
        use crate::transport::PeerPath;
        if rank >= self.sh.n_peers() {
            return PeerPath::NotConnected;
        }
        let link = self.sh.link(rank);
        match link.local.decided() {
            Some(Some(_)) => PeerPath::SameHost,
            Some(None) => PeerPath::Quic,
            None if self.connected(rank) => PeerPath::Quic,
            None => PeerPath::NotConnected,
        }
    }

    fn add_peers(&self, table: &[PeerInfo]) -> Result<()> {
        self.sh.add_peers(table);
        Ok(())
    }

    fn peer_location(&self, rank: usize) -> String {
        let g = self.sh.peers.read().unwrap_or_else(|p| p.into_inner());
        match g.get(rank) {
            Some(p) => format!("{} on {} pid {}", p.addr, p.host, p.pid),
            None => "unknown".into(),
        }
    }

    fn shutdown(&self, graceful: bool) -> BoxFut<'_, ()> {
        Box::pin(self.sh.shutdown(graceful))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_abort_reasons_round_trip_and_are_bounded() {
        let r = job_abort_reason(7, "loss became NaN at step 17");
        assert_eq!(
            parse_job_abort(&r),
            Some((7, "loss became NaN at step 17".to_string()))
        );
        // A long reason with multi-byte characters is cut on a character
        // boundary and still parses.
        let long = "é".repeat(2000);
        let r = job_abort_reason(3, &long);
        assert!(r.len() <= MAX_CLOSE_REASON + 4);
        let (by, why) = parse_job_abort(&r).unwrap();
        assert_eq!(by, 3);
        assert!(long.starts_with(&why) && !why.is_empty());
        for bad in [&b"x\nwhy"[..], b"no newline", b"\xff\n"] {
            assert_eq!(parse_job_abort(bad), None);
        }
    }
}
