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

mod accept;
pub mod endpoint;
mod lane_links;
mod lanes;
mod local;
mod parts;
pub(crate) mod places;
mod receive;
mod send;
mod stripe;

pub use lanes::Lanes;

use super::{
    BoxFut, Broken, Failure, Incoming, Mailbox, Payload, Refused, Stamp, StreamBody, Transport,
};
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
    /// This rank's lane connections to the peer, by lane (1 or more).
    lanes_out: Mutex<std::collections::HashMap<usize, quinn::Connection>>,
    lane_dial: tokio::sync::Mutex<()>,
    /// The number of the next message striped to the peer.
    next_stripe: std::sync::atomic::AtomicU32,
}

impl Link {
    fn new() -> Link {
        Link {
            conn: Mutex::new(None),
            dial: tokio::sync::Mutex::new(()),
            done: tokio::sync::watch::channel(false).0,
            local: local::LocalLink::new(),
            ending: std::sync::atomic::AtomicUsize::new(0),
            lanes_out: Mutex::new(std::collections::HashMap::new()),
            lane_dial: tokio::sync::Mutex::new(()),
            next_stripe: std::sync::atomic::AtomicU32::new(0),
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
    /// This rank's transport threads beyond the caller's (see `lanes`).
    lanes: Vec<lanes::Lane>,
    /// Tasks on the lanes' threads.
    lane_tasks: Mutex<JoinSet<()>>,
    /// Where parts of striped messages meet their headers.
    rdv: Arc<parts::Rendezvous>,
}

/// The QUIC transport of one rank.
pub struct QuicTransport {
    sh: Arc<Shared>,
    /// Stops the lanes' threads when the transport is dropped.
    _lanes: Lanes,
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
        lanes: &Lanes,
        creds: &Credentials,
        cfg: &Config,
    ) -> Result<()> {
        let server_tls = QuicServerConfig::try_from(pki::peer_server_config(creds)?)
            .map_err(|e| quic_err("QUIC server TLS", e))?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(server_tls));
        server.transport_config(endpoint::transport_config(cfg)?);
        for l in lanes.lanes() {
            l.endpoint.set_server_config(Some(server.clone()));
        }
        endpoint.set_server_config(Some(server));
        Ok(())
    }

    /// Start serving peers on `endpoint` (already bound, already used to
    /// join the seed, and accepting peers) with the rank's credentials and
    /// the peer table.
    pub fn start(
        endpoint: quinn::Endpoint,
        lanes: Lanes,
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
            handshakes: places::Places::new(
                accept::MAX_HANDSHAKES,
                accept::MAX_HANDSHAKES_PER_SOURCE,
            ),
            lanes: lanes.lanes().to_vec(),
            lane_tasks: Mutex::new(JoinSet::new()),
            // Twice the longest wait: a part whose header is merely late
            // is never dropped.
            rdv: Arc::new(parts::Rendezvous::new(cfg.op_timeout().saturating_mul(2))),
        });
        let acc = sh.clone();
        sh.spawn(async move { acc.accept_loop().await });
        for (i, lane) in sh.lanes.iter().enumerate() {
            let acc = sh.clone();
            sh.spawn_on_lane(lane, async move { acc.lane_accept_loop(i + 1).await });
        }
        sh.start_local();
        Ok(QuicTransport { sh, _lanes: lanes })
    }

    /// Lane connections this rank dialled to `rank` (0 before it striped
    /// a message to it).
    pub fn lane_connections(&self, rank: usize) -> usize {
        let link = self.sh.link(rank);
        let g = link.lanes_out.lock().unwrap_or_else(|p| p.into_inner());
        g.len()
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
                .close_endpoints(VarInt::from_u32(CODE_BYE), b"rank dropped its transport");
        }
        self.sh.abort_tasks();
    }
}

impl Shared {
    fn spawn(&self, fut: impl Future<Output = ()> + Send + 'static) {
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        while tasks.try_join_next().is_some() {}
        tasks.spawn(fut);
    }

    fn abort_tasks(&self) {
        for set in [&self.tasks, &self.lane_tasks] {
            let mut tasks = set.lock().unwrap_or_else(|p| p.into_inner());
            tasks.abort_all();
            while tasks.try_join_next().is_some() {}
        }
    }

    /// Close the main endpoint and the lanes' with `code` and `why`.
    fn close_endpoints(&self, code: VarInt, why: &[u8]) {
        // The main connection first: it carries the reason peers report.
        self.endpoint.close(code, why);
        for l in &self.lanes {
            l.endpoint.close(code, why);
        }
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
        self.close_endpoints(VarInt::from_u32(code), &why);
        self.close_local();
        let _ = tokio::time::timeout(Duration::from_millis(100), async {
            self.endpoint.wait_idle().await;
            for l in &self.lanes {
                l.endpoint.wait_idle().await;
            }
        })
        .await;
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

/// How long a finalizing rank waits for its Byes to be acknowledged.
const BYE_ACK_WAIT: Duration = Duration::from_secs(2);

/// How long an aborting rank tries to reach peers it never talked to.
const ABORT_NOTICE_WAIT: Duration = Duration::from_secs(2);

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
        stamp: Stamp<'a>,
    ) -> BoxFut<'a, std::result::Result<(), Failure>> {
        Box::pin(self.sh.send(dst, header, payload, stamp))
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
