//! The seed's QUIC driver: accepts joining ranks, checks their token proof,
//! signs their certificates, feeds the formation state machine and tells
//! every rank the outcome.

use super::elastic::{self, Elastic, MAX_MEMBERS};
use super::state::{Decision as Admission, JoinInfo, Phase, SeedState};
use super::token::{random_job_id, Direction, SessionProof};
use super::{close, read_msg, read_msg_max, write_msg};
use crate::config::Config;
use crate::pki::JobToken;
use crate::pki::{self, JobCa};
use crate::transport::quic::endpoint;
use crate::transport::quic::places::{Place, Places};
use crate::wire::control::{
    Formation, JoinReply, JoinRequest, KeyPin, Notice, PeerInfo, Ready, RejectKind,
};
use crate::{Error, Result};
use quinn::crypto::rustls::QuicServerConfig;
use quinn::VarInt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// Settings of a seed.
#[derive(Clone, Debug)]
pub struct SeedConfig {
    world_size: usize,
    bind: SocketAddr,
    job_id: Option<String>,
    token: Option<JobToken>,
    formation_timeout: Duration,
    cert_lifetime: Duration,
    elastic: Option<(usize, usize)>,
}

impl SeedConfig {
    /// A seed for `world_size` ranks on 127.0.0.1 (any port), fresh token
    /// and job id, 60 s formation deadline, certificates valid 30 days.
    pub fn new(world_size: usize) -> SeedConfig {
        SeedConfig {
            world_size,
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            job_id: None,
            token: None,
            formation_timeout: Duration::from_secs(60),
            cert_lifetime: Duration::from_secs(30 * 24 * 3600),
            elastic: None,
        }
    }

    /// Make the job elastic: after formation, processes may join (they are
    /// admitted at the next membership point, up to `max` ranks in all), and
    /// the job may continue without lost ranks down to `min`.
    pub fn set_elastic(&mut self, min: usize, max: usize) -> &mut Self {
        self.elastic = Some((min, max));
        self
    }

    /// Address (and port, 0 = any) to listen on.
    pub fn set_bind(&mut self, addr: SocketAddr) -> &mut Self {
        self.bind = addr;
        self
    }

    /// Job id (default: 16 random hex digits).
    pub fn set_job_id(&mut self, id: impl Into<String>) -> &mut Self {
        self.job_id = Some(id.into());
        self
    }

    /// Job token (default: freshly generated).
    pub fn set_token(&mut self, token: JobToken) -> &mut Self {
        self.token = Some(token);
        self
    }

    /// How long ranks have to join before formation fails, naming who is missing.
    pub fn set_formation_timeout(&mut self, t: Duration) -> &mut Self {
        self.formation_timeout = t;
        self
    }

    /// Validity of the job CA and every certificate it signs: the upper
    /// bound on the job's duration. Default 30 days.
    pub fn set_cert_lifetime(&mut self, t: Duration) -> &mut Self {
        self.cert_lifetime = t;
        self
    }
}

struct Inner {
    job_id: String,
    token: JobToken,
    ca: JobCa,
    world_size: usize,
    state: Mutex<SeedState>,
    phase: watch::Sender<Phase>,
    /// Ranks that joined and are ready (formation progress for launchers).
    joined: watch::Sender<Vec<usize>>,
    /// Notices for every rank after formation (a rank left, the job was
    /// aborted).
    notices: tokio::sync::broadcast::Sender<Notice>,
    /// Membership of an elastic job after formation.
    elastic: Option<Mutex<Elastic>>,
    /// The latest epoch decided (late joiners wait on it).
    epochs: watch::Sender<u32>,
    /// Places of connections that have not yet proved the token.
    unproven: Places,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Inner {
    /// Let the elastic membership decide, if every live member asked, and
    /// tell the members (under the lock: decisions go out in order).
    fn try_decide(&self) {
        let Some(el) = &self.elastic else { return };
        let mut el = lock(el);
        match el.decide() {
            None => {}
            Some(elastic::Decision::Failed { epoch, reason }) => {
                tracing::error!("seed: epoch {epoch}: {reason}");
                let _ = self.notices.send(Notice::RebuildFailed { epoch, reason });
            }
            Some(elastic::Decision::Epoch(info)) => {
                tracing::info!(
                    "seed: epoch {}: {} rank(s), {} joined, {} left",
                    info.epoch,
                    info.members.len(),
                    info.joined.len(),
                    info.left.len()
                );
                let epoch = info.epoch;
                let _ = self.notices.send(Notice::Epoch(info));
                self.epochs.send_replace(epoch);
            }
        }
    }
}

/// A running seed: the job's certificate authority and formation point.
pub struct Seed {
    inner: Arc<Inner>,
    endpoint: quinn::Endpoint,
    tasks: Arc<Mutex<JoinSet<()>>>,
}

fn spawn(tasks: &Mutex<JoinSet<()>>, fut: impl std::future::Future<Output = ()> + Send + 'static) {
    let mut t = tasks.lock().unwrap_or_else(|p| p.into_inner());
    while t.try_join_next().is_some() {}
    t.spawn(fut);
}

impl Seed {
    /// Start a seed (inside a tokio runtime).
    pub fn start(cfg: SeedConfig) -> Result<Seed> {
        if cfg.world_size == 0 {
            return Err(Error::config("world size must be at least 1"));
        }
        if let Some((min, max)) = cfg.elastic {
            if min == 0 || min > cfg.world_size || max < cfg.world_size {
                return Err(Error::config(format!(
                    "elastic bounds {min}:{max} must satisfy 1 <= MIN <= world size ({}) <= MAX",
                    cfg.world_size
                )));
            }
        }
        let job_id = match cfg.job_id {
            Some(j) => j,
            None => random_job_id()?,
        };
        let token = match cfg.token {
            Some(t) => t,
            None => JobToken::generate()?,
        };
        let ca = JobCa::new(&job_id, cfg.cert_lifetime)?;
        let (chain, key) = ca.seed_identity()?;
        let tls = QuicServerConfig::try_from(pki::seed_server_config(chain, key)?)
            .map_err(|e| Error::transport(None, format!("seed TLS: {e}")))?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(tls));
        server.transport_config(endpoint::seed_transport_config(&Config::default())?);
        let endpoint = endpoint::bind(cfg.bind, &Config::default())?;
        endpoint.set_server_config(Some(server));
        let now = Instant::now();
        let state = SeedState::new(&job_id, cfg.world_size, now, cfg.formation_timeout);
        let inner = Arc::new(Inner {
            job_id,
            token,
            ca,
            world_size: cfg.world_size,
            state: Mutex::new(state),
            phase: watch::channel(Phase::Forming).0,
            joined: watch::channel(Vec::new()).0,
            notices: tokio::sync::broadcast::channel(256).0,
            elastic: cfg
                .elastic
                .map(|(min, max)| Mutex::new(Elastic::new(min, max))),
            epochs: watch::channel(1).0,
            unproven: Places::new(MAX_UNPROVEN, MAX_UNPROVEN_PER_SOURCE),
        });
        let tasks = Arc::new(Mutex::new(JoinSet::new()));
        let (i, ep, t) = (inner.clone(), endpoint.clone(), tasks.clone());
        spawn(&tasks, async move { accept_loop(i, ep, t).await });
        let i = inner.clone();
        let deadline = tokio::time::Instant::from_std(now + cfg.formation_timeout);
        spawn(&tasks, async move {
            tokio::time::sleep_until(deadline).await;
            let phase = {
                let mut st = i.state.lock().unwrap_or_else(|p| p.into_inner());
                st.handle_timeout(Instant::now());
                st.phase().clone()
            };
            if let Phase::Failed(reason) = &phase {
                tracing::error!("seed: {reason}");
                i.phase.send_replace(phase);
            }
        });
        tracing::info!(
            "seed: job {} listening on {:?} for {} ranks",
            inner.job_id,
            endpoint.local_addr().ok(),
            inner.world_size
        );
        Ok(Seed {
            inner,
            endpoint,
            tasks,
        })
    }

    /// The address ranks join (`RANKMESH_SEED`).
    pub fn addr(&self) -> Result<SocketAddr> {
        self.endpoint
            .local_addr()
            .map_err(|e| Error::transport(None, format!("seed address: {e}")))
    }

    /// The job id.
    pub fn job_id(&self) -> &str {
        &self.inner.job_id
    }

    /// The job token ranks must prove (`RANKMESH_TOKEN`); a secret.
    pub fn token(&self) -> &JobToken {
        &self.inner.token
    }

    /// Wait until every rank joined (the peer table) or formation failed
    /// (an error naming the missing ranks).
    pub async fn wait_formed(&self) -> Result<Vec<PeerInfo>> {
        let mut rx = self.inner.phase.subscribe();
        let phase = rx
            .wait_for(|p| !matches!(p, Phase::Forming))
            .await
            .map_err(|_| Error::Membership {
                detail: "the seed stopped before formation completed".into(),
            })?
            .clone();
        match phase {
            Phase::Formed(t) => Ok(t),
            Phase::Failed(reason) => Err(Error::Membership { detail: reason }),
            Phase::Forming => Err(Error::Membership {
                detail: "formation did not complete".into(),
            }),
        }
    }

    /// Formation progress: the ranks that have joined so far, in rank
    /// order. The receiver changes whenever a rank joins or leaves before
    /// formation completed (for launchers that show progress).
    pub fn joined_ranks(&self) -> watch::Receiver<Vec<usize>> {
        self.inner.joined.subscribe()
    }

    /// Connections that have not yet proved the job token (at most 256; a
    /// number near that for long means someone without the token keeps
    /// connecting to the seed).
    pub fn unproven_connections(&self) -> usize {
        self.inner.unproven.held()
    }

    /// The peer table by member id as the seed knows it now: every member
    /// the job has had once it formed (an elastic job's grows as processes
    /// join), empty before, each with its [`KeyPin`].
    pub fn members(&self) -> Vec<PeerInfo> {
        if let Some(el) = &self.inner.elastic {
            let el = lock(el);
            if !el.table().is_empty() {
                return el.table().to_vec();
            }
        }
        match &*self.inner.phase.borrow() {
            Phase::Formed(t) => t.clone(),
            _ => Vec::new(),
        }
    }

    /// Processes waiting to join an elastic job at its next checkpoint.
    pub fn waiting_joiners(&self) -> usize {
        self.inner
            .elastic
            .as_ref()
            .map_or(0, |el| lock(el).pending())
    }

    /// Stop the seed and every task it runs.
    pub async fn shutdown(&self) {
        self.endpoint
            .close(VarInt::from_u32(close::BYE), b"seed shut down");
        let _ = tokio::time::timeout(Duration::from_millis(100), self.endpoint.wait_idle()).await;
        let mut t = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        t.abort_all();
        while t.try_join_next().is_some() {}
    }
}

impl Drop for Seed {
    fn drop(&mut self) {
        self.endpoint
            .close(VarInt::from_u32(close::BYE), b"seed dropped");
        let mut t = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        t.abort_all();
    }
}

/// Connections that have not yet proved the job token, at most: beyond
/// this the seed refuses new ones (a joiner tries again until its
/// formation deadline), so that unauthenticated clients cannot exhaust the
/// seed's memory.
const MAX_UNPROVEN: usize = 256;

/// Of those, at most this many from one IP address, so that an attacker on
/// one host cannot take every place from the job's other hosts.
const MAX_UNPROVEN_PER_SOURCE: usize = 64;

/// Beyond this many unproven connections, a client whose address is not
/// yet validated is first sent a QUIC Retry (one more round trip for a
/// joiner, no state at the seed).
const RETRY_ABOVE: usize = 16;

/// How often the seed reports connections it refused or dropped before
/// they proved the token.
const REPORT_EVERY: Duration = Duration::from_secs(10);

/// Time a connection has to complete its handshake and send a join request
/// with a valid proof.
const PROOF_DEADLINE: Duration = Duration::from_secs(5);

/// Longest a refused connection stays open for its verdict to be
/// acknowledged.
const REFUSAL_LINGER: Duration = Duration::from_secs(1);

/// Largest join request the seed reads (it is read before the proof is
/// checked; a real one is well under a kilobyte).
const MAX_JOIN_REQUEST: usize = 16 << 10;

async fn accept_loop(inner: Arc<Inner>, endpoint: quinn::Endpoint, tasks: Arc<Mutex<JoinSet<()>>>) {
    let unproven = inner.unproven.clone();
    let mut report = tokio::time::interval(REPORT_EVERY);
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => match i {
                Some(i) => i,
                None => break,
            },
            _ = report.tick() => {
                report_unproven(&unproven);
                continue;
            }
        };
        if unproven.held() >= RETRY_ABOVE && !incoming.remote_address_validated() {
            // Stateless: a client at a real address comes back with the
            // token and is then counted; forged addresses hold nothing.
            let _ = incoming.retry();
            continue;
        }
        let Some(place) = unproven.take(incoming.remote_address().ip()) else {
            incoming.refuse();
            continue;
        };
        let i = inner.clone();
        spawn(&tasks, async move {
            let from = incoming.remote_address();
            if let Err(e) = handle(i, incoming, place).await {
                tracing::warn!("seed: join from {from} failed: {e}");
            }
        });
    }
}

/// One warning for the connections refused or dropped before they proved
/// the token since the last.
fn report_unproven(places: &Places) {
    let (refused, failed, last) = places.take_counts();
    if refused + failed > 0 {
        tracing::warn!(
            "seed: in the last {REPORT_EVERY:?}, {failed} connections ended without proving the \
             job token (a wrong RANKMESH_TOKEN, a client that is not a rank, or a timeout; the \
             latest: {}) and {refused} were refused because {MAX_UNPROVEN} (or \
             {MAX_UNPROVEN_PER_SOURCE} from one address) had not yet proved it; ranks keep \
             trying until their formation timeout",
            last.as_deref().unwrap_or("none")
        );
    }
}

/// Resolves once formation has failed.
async fn wait_failed(inner: &Inner) {
    let mut rx = inner.phase.subscribe();
    let _ = rx.wait_for(|p| matches!(p, Phase::Failed(_))).await;
}

impl Inner {
    /// Refuse a join with `reason`, carrying the seed's proof (so the joiner
    /// can tell the refusal from one made up by a server that is not the
    /// job's seed), and close the connection once the joiner has read it.
    async fn reject(
        &self,
        conn: &quinn::Connection,
        send: &mut quinn::SendStream,
        kind: RejectKind,
        reason: String,
    ) -> Result<()> {
        let proof = self.token.proof(conn, Direction::SeedToRank)?;
        self.reject_with(conn, send, kind, reason, proof).await
    }

    /// [`Inner::reject`] with an explicit proof: 32 zero bytes for a
    /// refusal before the joiner proved the token (a client without the
    /// token must not get the token's MAC over keying material it knows;
    /// the joiner then reports that the seed could not prove the token).
    async fn reject_with(
        &self,
        conn: &quinn::Connection,
        send: &mut quinn::SendStream,
        kind: RejectKind,
        reason: String,
        proof: [u8; 32],
    ) -> Result<()> {
        let _ = write_msg(
            send,
            &JoinReply::Rejected {
                kind,
                reason,
                proof,
            },
        )
        .await;
        let _ = send.finish();
        // Close once the rank's side has acknowledged the verdict (it can
        // read it after the close); a client that never acknowledges holds
        // the connection, and for an unproven one its place, one second at
        // most.
        let _ = tokio::time::timeout(REFUSAL_LINGER, send.stopped()).await;
        conn.close(VarInt::from_u32(close::FAILED), b"join rejected");
        Ok(())
    }
}

/// Everything a joiner does before it has proved the token, under one
/// short deadline: the handshake, the join stream and a join request with
/// a valid proof. On failure, says why (after sending any refusal).
async fn prove(inner: &Inner, incoming: quinn::Incoming) -> Result<Proven> {
    let until = tokio::time::Instant::now() + PROOF_DEADLINE;
    let conn = tokio::time::timeout_at(until, incoming)
        .await
        .map_err(|_| Error::transport(None, "handshake timed out"))?
        .map_err(|e| Error::transport(None, format!("handshake: {e}")))?;
    let (mut send, mut recv) = tokio::time::timeout_at(until, conn.accept_bi())
        .await
        .map_err(|_| Error::transport(None, "no join request in time"))?
        .map_err(|e| Error::transport(None, format!("join stream: {e}")))?;
    let read = read_msg_max(&mut recv, "rank", MAX_JOIN_REQUEST);
    let req: JoinRequest = match tokio::time::timeout_at(until, read).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            let _ = inner
                .reject_with(
                    &conn,
                    &mut send,
                    RejectKind::Protocol,
                    e.to_string(),
                    [0; 32],
                )
                .await;
            return Err(e);
        }
        Err(_) => return Err(Error::transport(None, "join request timed out")),
    };
    match inner.token.verify(&conn, Direction::RankToSeed, &req.proof) {
        Ok(true) => Ok(Proven {
            conn,
            send,
            recv,
            req,
        }),
        Ok(false) => {
            let reason = "the seed refused this rank: its job token does not match the job's \
                          (check RANKMESH_TOKEN; it must come from the rankrun that started the \
                          job)";
            let _ = inner
                .reject_with(&conn, &mut send, RejectKind::Auth, reason.into(), [0; 32])
                .await;
            Err(Error::auth(format!(
                "wrong job token (pid {} on {})",
                req.pid, req.host
            )))
        }
        Err(e) => Err(e),
    }
}

/// A joiner that proved the token, with its join stream and request.
struct Proven {
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    req: JoinRequest,
}

async fn handle(inner: Arc<Inner>, incoming: quinn::Incoming, unproven: Place) -> Result<()> {
    let from = incoming.remote_address();
    let Proven {
        conn,
        mut send,
        mut recv,
        req,
    } = match prove(&inner, incoming).await {
        Ok(p) => p,
        Err(why) => {
            tracing::debug!("seed: dropped {from} before it proved the job token: {why}");
            unproven.failed(format!("{from}: {why}"));
            return Ok(());
        }
    };
    // Proven: no longer counted against the unauthenticated.
    drop(unproven);
    // A late joiner of an elastic job (it asks for no rank and no world
    // size), or anyone once the job formed, waits for a checkpoint.
    let formed = matches!(*inner.phase.borrow(), Phase::Formed(_));
    let late = formed || (req.requested_rank.is_none() && req.world_size.is_none());
    if late && inner.elastic.is_some() {
        return late_join(inner, conn, send, recv, req).await;
    }
    let info = JoinInfo {
        job_id: req.job_id.clone(),
        requested_rank: req.requested_rank.map(|r| r as usize),
        world_size: req.world_size.map(|w| w as usize),
        peer: PeerInfo {
            addr: req.listen,
            host: req.host.clone(),
            pid: req.pid,
            // Pinned once the rank is ready with the certificate issued below.
            key: KeyPin::Pending,
        },
    };
    let decision = inner
        .state
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .handle_join(info);
    let rank = match decision {
        Admission::Admit(r) => r,
        Admission::Refuse(reason) => {
            tracing::warn!("seed: refused {from}: {reason}");
            return inner
                .reject(&conn, &mut send, RejectKind::Membership, reason)
                .await;
        }
    };
    let leave = |why: &str| {
        let left = {
            let mut st = inner.state.lock().unwrap_or_else(|p| p.into_inner());
            st.handle_leave(rank);
            if matches!(st.phase(), Phase::Forming) {
                inner.joined.send_modify(|j| j.retain(|&r| r != rank));
            }
            st.progress()
        };
        tracing::warn!("seed: rank {rank} left before formation completed ({why}); {left}");
    };
    let issued = issue(&inner.ca, &req.csr_der, rank);
    let (pin, cert_der) = match issued {
        Ok(c) => c,
        Err(e) => {
            leave("its certificate request was invalid");
            return inner
                .reject(&conn, &mut send, RejectKind::Protocol, e.to_string())
                .await;
        }
    };
    let reply = JoinReply::Accepted {
        proof: inner.token.proof(&conn, Direction::SeedToRank)?,
        rank: rank as u32,
        world_size: inner.world_size as u32,
        job_id: inner.job_id.clone(),
        ca_der: inner.ca.cert_der().to_vec(),
        cert_der: cert_der.to_vec(),
    };
    if let Err(e) = write_msg(&mut send, &reply).await {
        leave("connection lost");
        return Err(e);
    }
    let ready = tokio::select! {
        r = read_msg::<Ready>(&mut recv, "rank") => r,
        _ = wait_failed(&inner) => Err(Error::Membership { detail: "formation failed".into() }),
    };
    match ready {
        Ok(r) if r.rank as usize == rank => {}
        Ok(r) => {
            leave("it announced the wrong rank");
            let why = format!("rank {rank} announced itself ready as rank {}", r.rank);
            return inner
                .reject(&conn, &mut send, RejectKind::Protocol, why)
                .await;
        }
        Err(e) => {
            leave(&e.to_string());
            return Ok(());
        }
    }
    let (progress, phase) = {
        let mut st = inner.state.lock().unwrap_or_else(|p| p.into_inner());
        st.handle_ready(rank, pin);
        (st.progress(), st.phase().clone())
    };
    inner.joined.send_modify(|j| {
        if let Err(i) = j.binary_search(&rank) {
            j.insert(i, rank);
        }
    });
    tracing::info!(
        "seed: rank {rank} joined from {} ({}); {progress}",
        req.host,
        req.listen
    );
    if let Phase::Formed(peers) = &phase {
        if let Some(el) = &inner.elastic {
            lock(el).formed(peers);
        }
        tracing::info!(
            "seed: all {} ranks joined; job {} formed",
            inner.world_size,
            inner.job_id
        );
        inner.phase.send_replace(phase);
    }
    // Subscribed before the job can form, so no notice for this rank is
    // missed between formation and its relay.
    let notices = inner.notices.subscribe();
    let mut rx = inner.phase.subscribe();
    let outcome = tokio::select! {
        p = rx.wait_for(|p| !matches!(p, Phase::Forming)) => p.map(|p| p.clone()).ok(),
        _ = conn.closed() => None,
    };
    match outcome {
        Some(Phase::Formed(peers)) => {
            if let Err(e) = write_msg(&mut send, &Formation::Welcome { epoch: 1, peers }).await {
                depart(&inner, rank, format!("its link to the seed ended: {e}"));
                return Err(e);
            }
        }
        Some(Phase::Failed(reason)) => {
            let _ = write_msg(&mut send, &Formation::Failed { reason }).await;
            let _ = send.finish();
            // Let the rank read the verdict before the connection goes away.
            let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
            return Ok(());
        }
        _ => {
            if matches!(*inner.phase.borrow(), Phase::Formed(_)) {
                depart(&inner, rank, "its link to the seed ended".into());
            } else {
                leave("connection closed");
            }
            return Ok(());
        }
    }
    relay(&inner, rank, &conn, &mut send, &mut recv, notices).await;
    Ok(())
}

/// Sign a joiner's CSR as member `id`: the key pin and the certificate.
fn issue(
    ca: &JobCa,
    csr_der: &[u8],
    id: usize,
) -> Result<([u8; 32], rustls::pki_types::CertificateDer<'static>)> {
    let cert = ca.sign_rank(csr_der, id)?;
    Ok((pki::key_pin(&cert)?, cert))
}

/// A member of the formed job is gone: tell every rank, and (elastic jobs)
/// stop waiting for it at membership points.
fn depart(inner: &Inner, rank: usize, reason: String) {
    tracing::debug!("seed: rank {rank} left: {reason}");
    let _ = inner.notices.send(Notice::RankGone {
        rank: rank as u32,
        reason,
    });
    if let Some(el) = &inner.elastic {
        lock(el).gone(rank);
        inner.try_decide();
    }
}

/// For the job's lifetime: pass notices to this rank, take its abort
/// requests, and tell every other rank when this one leaves.
async fn relay(
    inner: &Inner,
    rank: usize,
    conn: &quinn::Connection,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    mut notices: tokio::sync::broadcast::Receiver<Notice>,
) {
    // Reading and writing run side by side, each resuming where it was:
    // a message half read when a notice goes out must not be lost (a
    // `read_msg` future dropped mid-message would desynchronise the stream).
    let (reply_tx, mut reply_rx) = tokio::sync::mpsc::unbounded_channel::<Notice>();
    let reader = async {
        loop {
            match read_msg::<Notice>(recv, "rank").await {
                Ok(Notice::Abort { reason, .. }) => {
                    tracing::warn!("seed: rank {rank} aborted the job: {reason}");
                    let _ = inner.notices.send(Notice::Abort {
                        rank: rank as u32,
                        reason,
                    });
                }
                Ok(Notice::Rebuild { epoch, .. }) => {
                    let refused = match &inner.elastic {
                        None => Some(
                            "this job is not elastic (start it with rankrun --elastic MIN:MAX)"
                                .to_string(),
                        ),
                        Some(el) => lock(el).request(rank, epoch).err(),
                    };
                    match refused {
                        Some(reason) => {
                            let _ = reply_tx.send(Notice::RebuildFailed { epoch, reason });
                        }
                        None => inner.try_decide(),
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    // A rank that can no longer talk to the seed cannot
                    // reach a membership point: it is gone.
                    conn.close(VarInt::from_u32(close::BAD_MESSAGE), b"bad control message");
                    tracing::warn!("seed: rank {rank}: {e}");
                    return;
                }
            }
        }
    };
    let writer = async {
        loop {
            let n = tokio::select! {
                n = notices.recv() => match n {
                    Ok(n) => {
                        let from = match &n {
                            Notice::RankGone { rank, .. } | Notice::Abort { rank, .. } => {
                                *rank as usize
                            }
                            // Only the seed sends these; a member's own
                            // request is never relayed.
                            Notice::Epoch(_) | Notice::RebuildFailed { .. } => usize::MAX,
                            Notice::Rebuild { .. } => continue,
                        };
                        if from == rank {
                            continue;
                        }
                        n
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        // Notices were lost for this rank; the one it cannot
                        // do without is the latest epoch decision.
                        let last = inner
                            .elastic
                            .as_ref()
                            .and_then(|el| lock(el).last().cloned());
                        match last {
                            Some(info) => Notice::Epoch(info),
                            None => continue,
                        }
                    }
                    Err(_) => return,
                },
                Some(n) = reply_rx.recv() => n,
            };
            if write_msg(send, &n).await.is_err() {
                return;
            }
        }
    };
    let why = tokio::select! {
        why = conn.closed() => why,
        _ = reader => conn.closed().await,
        _ = writer => conn.closed().await,
    };
    let reason = match &why {
        quinn::ConnectionError::ApplicationClosed(c)
            if c.error_code == VarInt::from_u32(close::BYE) =>
        {
            "the rank finalized".to_string()
        }
        quinn::ConnectionError::ApplicationClosed(c) => {
            format!("the rank stopped: {}", String::from_utf8_lossy(&c.reason))
        }
        quinn::ConnectionError::TimedOut => {
            "the seed lost contact with it (idle timeout): its process was killed, its host \
             is down, or the network is cut"
                .to_string()
        }
        other => format!("its link to the seed ended: {other}"),
    };
    depart(inner, rank, reason);
}

/// A process joining an elastic job after formation: admitted now as a
/// member id, it waits for the next epoch that includes it.
async fn late_join(
    inner: Arc<Inner>,
    conn: quinn::Connection,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    req: JoinRequest,
) -> Result<()> {
    let Some(el) = &inner.elastic else {
        return Ok(());
    };
    // Membership starts with the formed job.
    let mut phase = inner.phase.subscribe();
    let outcome = tokio::select! {
        p = phase.wait_for(|p| !matches!(p, Phase::Forming)) => p.map(|p| p.clone()).ok(),
        _ = conn.closed() => return Ok(()),
    };
    if !matches!(outcome, Some(Phase::Formed(_))) {
        let reason = "the job this process tried to join failed to form".to_string();
        return inner
            .reject(&conn, &mut send, RejectKind::Membership, reason)
            .await;
    }
    let peer = PeerInfo {
        addr: req.listen,
        host: req.host.clone(),
        pid: req.pid,
        // Pinned once the joiner is ready with the certificate issued below:
        // an id whose join is abandoned never gets a key.
        key: KeyPin::Pending,
    };
    if req.job_id.as_deref().is_some_and(|j| j != inner.job_id) {
        let reason = format!(
            "this process was started for job {:?}, but the seed runs job {}",
            req.job_id, inner.job_id
        );
        return inner
            .reject(&conn, &mut send, RejectKind::Membership, reason)
            .await;
    }
    let full = lock(el).reserve().err();
    if let Some(reason) = full {
        tracing::warn!(
            "seed: refused a joiner (pid {} on {}): {reason}",
            req.pid,
            req.host
        );
        return inner
            .reject(&conn, &mut send, RejectKind::Membership, reason)
            .await;
    }
    let id = lock(el).issue(peer);
    let Some(id) = id else {
        let reason = format!(
            "the job has issued {MAX_MEMBERS} member ids, the most it can; start a new job"
        );
        return inner
            .reject(&conn, &mut send, RejectKind::Membership, reason)
            .await;
    };
    let release = || lock(el).release();
    let issued = issue(&inner.ca, &req.csr_der, id);
    let (pin, cert_der) = match issued {
        Ok(c) => c,
        Err(e) => {
            release();
            return inner
                .reject(&conn, &mut send, RejectKind::Protocol, e.to_string())
                .await;
        }
    };
    let proof = match inner.token.proof(&conn, Direction::SeedToRank) {
        Ok(p) => p,
        Err(e) => {
            release();
            return Err(e);
        }
    };
    let reply = JoinReply::Accepted {
        proof,
        rank: id as u32,
        world_size: id as u32 + 1,
        job_id: inner.job_id.clone(),
        ca_der: inner.ca.cert_der().to_vec(),
        cert_der: cert_der.to_vec(),
    };
    let ready = match write_msg(&mut send, &reply).await {
        Ok(()) => read_msg::<Ready>(&mut recv, "joiner").await,
        Err(e) => Err(e),
    };
    // Subscribed before this process can be admitted, so neither its
    // admission nor a notice after it is missed.
    let mut epochs = inner.epochs.subscribe();
    let notices = inner.notices.subscribe();
    let is_ready = matches!(&ready, Ok(r) if r.rank as usize == id);
    // Abandoned after its certificate was issued: the id is refused by
    // everyone.
    lock(el).ready(id, is_ready.then_some(pin));
    if !is_ready {
        return Ok(());
    }
    tracing::info!(
        "seed: member {id} ({} on {}) waits to join at the next checkpoint",
        req.listen,
        req.host
    );
    let info = loop {
        tokio::select! {
            ch = epochs.changed() => {
                if ch.is_err() {
                    return Ok(());
                }
                let found = lock(el).admitted(id);
                if let Some(info) = found {
                    break info;
                }
            }
            _ = conn.closed() => {
                // Decided under one lock: an epoch decided in between
                // would otherwise admit a member whose key was just dropped.
                let was_admitted = lock(el).left_waiting(id);
                if was_admitted {
                    depart(&inner, id, "it left right after it was admitted".into());
                } else {
                    tracing::info!("seed: member {id} left before it was admitted");
                }
                return Ok(());
            }
        }
    };
    if let Err(e) = write_msg(&mut send, &Formation::Admitted(info)).await {
        depart(&inner, id, format!("its link to the seed ended: {e}"));
        return Err(e);
    }
    relay(&inner, id, &conn, &mut send, &mut recv, notices).await;
    Ok(())
}
