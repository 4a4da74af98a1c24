//! The rank's side of the join protocol.

use super::token::{Direction, SessionProof};
use super::{read_msg, write_msg};
use crate::config::Config;
use crate::env::JoinSpec;
use crate::pki::{self, Credentials, RankKey};
use crate::transport::quic::endpoint;
use crate::wire::control::{
    EpochInfo, Formation, JoinReply, JoinRequest, KeyPin, Notice, PeerInfo, Ready, RejectKind,
};
use crate::{Error, Result};
use quinn::crypto::rustls::QuicClientConfig;
use rustls::pki_types::CertificateDer;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// The connection to the seed, held for the job's lifetime: the seed tells
/// the rank when another rank leaves, and relays a rank's abort to all.
pub struct SeedLink {
    conn: quinn::Connection,
    send: tokio::sync::Mutex<quinn::SendStream>,
    recv: std::sync::Mutex<Option<quinn::RecvStream>>,
}

/// The notices the seed sends to a rank after formation.
pub struct Notices {
    recv: quinn::RecvStream,
}

impl Notices {
    /// The next notice; `None` once the link to the seed ended.
    pub async fn next(&mut self) -> Option<Notice> {
        read_msg(&mut self.recv, "the seed").await.ok()
    }
}

impl SeedLink {
    /// Close the link: `graceful` when the rank finalized, otherwise it
    /// stopped after an error (`why` tells the seed, which tells the others).
    pub fn close(&self, graceful: bool, why: &str) {
        let code = if graceful {
            super::close::BYE
        } else {
            super::close::FAILED
        };
        self.conn
            .close(quinn::VarInt::from_u32(code), why.as_bytes());
    }

    /// The stream of notices (once; `None` afterwards).
    pub fn notices(&self) -> Option<Notices> {
        let mut g = self.recv.lock().unwrap_or_else(|p| p.into_inner());
        g.take().map(|recv| Notices { recv })
    }

    /// Tell the seed this member reached a membership point of `epoch`
    /// (elastic jobs); the seed answers on the notice stream.
    pub async fn request_rebuild(&self, rank: usize, epoch: u32) -> Result<()> {
        let mut send = self.send.lock().await;
        let n = Notice::Rebuild {
            rank: rank as u32,
            epoch,
        };
        write_msg(&mut send, &n).await
    }

    /// Ask the seed to end the job for every rank.
    pub async fn request_abort(&self, rank: usize, reason: &str) -> Result<()> {
        let mut send = self.send.lock().await;
        let n = Notice::Abort {
            rank: rank as u32,
            reason: reason.to_string(),
        };
        write_msg(&mut send, &n).await
    }
}

/// What a rank knows once the world is formed.
pub struct Joined {
    /// Its certificate, key and the job CA.
    pub creds: Credentials,
    /// Number of ranks.
    pub world_size: usize,
    /// Membership epoch.
    pub epoch: u32,
    /// Peer table in rank order.
    pub peers: Vec<PeerInfo>,
    /// For a late joiner of an elastic job: the epoch it was admitted with
    /// (its members, in rank order, by member id).
    pub admitted: Option<EpochInfo>,
    /// The open connection to the seed.
    pub seed: SeedLink,
}

fn membership(detail: String) -> Error {
    Error::Membership { detail }
}

/// Join the job through `endpoint` (the rank's own, already bound) and wait
/// until the world is formed. `admitted` runs once the rank holds its
/// credentials and must make the endpoint accept peer connections; the seed
/// completes formation only when every rank has done so.
pub async fn join(
    endpoint: &quinn::Endpoint,
    spec: &JoinSpec,
    cfg: &Config,
    admitted: impl FnOnce(&Credentials) -> Result<()>,
) -> Result<Joined> {
    join_with_lanes(endpoint, &[], spec, cfg, admitted).await
}

/// [`join`], telling the seed the ports of the rank's transport-thread
/// endpoints (`lanes`, on the IP of `endpoint`), which the peer table
/// passes on.
pub async fn join_with_lanes(
    endpoint: &quinn::Endpoint,
    lanes: &[u16],
    spec: &JoinSpec,
    cfg: &Config,
    admitted: impl FnOnce(&Credentials) -> Result<()>,
) -> Result<Joined> {
    let seed = spec.seed;
    let deadline = cfg.formation_timeout();
    let unreachable = |e: String| {
        membership(format!(
            "cannot reach the seed at {seed}: {e}; is the launcher (rankrun) still running, \
             and can this host reach that address?"
        ))
    };
    let tls = QuicClientConfig::try_from(pki::seed_client_config()?)
        .map_err(|e| Error::transport(None, format!("seed client TLS: {e}")))?;
    let mut client = quinn::ClientConfig::new(Arc::new(tls));
    client.transport_config(endpoint::transport_config(cfg)?);
    // A handshake that times out is tried again until the deadline (a
    // seed that was briefly busy, or a lost first flight, is not fatal).
    let until = tokio::time::Instant::now() + deadline;
    let conn = loop {
        let connecting = endpoint
            .connect_with(client.clone(), seed, "seed.rankmesh")
            .map_err(|e| unreachable(e.to_string()))?;
        match tokio::time::timeout_at(until, connecting).await {
            Err(_) => return Err(unreachable(format!("no answer within {deadline:?}"))),
            Ok(Ok(c)) => break c,
            Ok(Err(quinn::ConnectionError::TimedOut))
                if tokio::time::Instant::now() + Duration::from_secs(1) < until =>
            {
                // Try again from a fresh UDP port: whatever state the seed's
                // side holds for the old address does not apply to the new
                // one. (Nothing has this rank's address yet.)
                tracing::warn!(
                    "the seed at {seed} did not answer the handshake; trying again from a new port"
                );
                if let Ok(local) = endpoint.local_addr() {
                    endpoint::rebind(endpoint, SocketAddr::new(local.ip(), 0), cfg)?;
                }
            }
            // The seed refuses connections while too many others have not
            // proved the token (it may be under attack): try again shortly.
            Ok(Err(quinn::ConnectionError::ConnectionClosed(c)))
                if c.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED
                    && tokio::time::Instant::now() + Duration::from_secs(1) < until =>
            {
                tracing::warn!("the seed at {seed} is busy (connection refused); trying again");
                let jitter = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.subsec_nanos() % 200)
                    .unwrap_or(0);
                tokio::time::sleep(Duration::from_millis(100 + u64::from(jitter))).await;
            }
            Ok(Err(e)) => return Err(unreachable(e.to_string())),
        }
    };
    let result = exchange(
        &conn,
        endpoint,
        lanes,
        spec,
        deadline,
        cfg.op_timeout(),
        admitted,
    )
    .await;
    if result.is_err() {
        conn.close(
            quinn::VarInt::from_u32(super::close::FAILED),
            b"join failed",
        );
    }
    result
}

async fn exchange(
    conn: &quinn::Connection,
    endpoint: &quinn::Endpoint,
    lanes: &[u16],
    spec: &JoinSpec,
    deadline: Duration,
    cfg_admission: Duration,
    admitted: impl FnOnce(&Credentials) -> Result<()>,
) -> Result<Joined> {
    let seed = spec.seed;
    let key = RankKey::generate()?;
    let listen = endpoint
        .local_addr()
        .map_err(|e| Error::transport(None, format!("endpoint address: {e}")))?;
    let req = JoinRequest {
        proof: spec.token.proof(conn, Direction::RankToSeed)?,
        job_id: spec.job_id.clone(),
        requested_rank: spec.rank.filter(|_| !spec.late).map(|r| r as u32),
        world_size: spec.world_size.filter(|_| !spec.late).map(|w| w as u32),
        listen,
        lanes: lanes.to_vec(),
        host: spec.host.clone(),
        pid: std::process::id(),
        csr_der: key.csr_der()?,
    };
    let timed = |what: &'static str| {
        move |_| {
            membership(format!(
                "the seed at {seed} did not {what} within {deadline:?}"
            ))
        }
    };
    let (mut send, mut recv) = tokio::time::timeout(deadline, conn.open_bi())
        .await
        .map_err(timed("open the join stream"))?
        .map_err(|e| membership(format!("join stream to the seed at {seed}: {e}")))?;
    write_msg(&mut send, &req).await?;
    let seed_name = format!("the seed at {seed}");
    let reply: JoinReply = tokio::time::timeout(deadline, read_msg(&mut recv, &seed_name))
        .await
        .map_err(timed("answer the join request"))??;
    let (proof, rank, world_size, job_id, ca_der, cert_der) = match reply {
        JoinReply::Accepted {
            proof,
            rank,
            world_size,
            job_id,
            ca_der,
            cert_der,
        } => (
            proof,
            rank as usize,
            world_size as usize,
            job_id,
            ca_der,
            cert_der,
        ),
        JoinReply::Rejected {
            kind,
            reason,
            proof,
        } => {
            // A refusal counts only from the job's seed: anything else at
            // that address could make the rank give up with a message of
            // its choosing.
            if !spec.token.verify(conn, Direction::SeedToRank, &proof)? {
                return Err(Error::auth(format!(
                    "the server at {seed} refused this rank but could not prove it holds the \
                     job token: either this rank's token is wrong (check RANKMESH_TOKEN or \
                     RANKMESH_TOKEN_FILE: it must come from the rankrun that started the job) \
                     or that server is not this job's seed (check RANKMESH_SEED)"
                )));
            }
            return Err(match kind {
                RejectKind::Auth => Error::auth(reason),
                RejectKind::Membership => membership(reason),
                RejectKind::Protocol => Error::protocol(reason),
            });
        }
    };
    if !spec.token.verify(conn, Direction::SeedToRank, &proof)? {
        return Err(Error::auth(format!(
            "the server at {seed} could not prove it holds the job token: it is not this \
             job's seed (check RANKMESH_SEED and RANKMESH_TOKEN)"
        )));
    }
    let asked = !spec.late
        && (spec.rank.is_some_and(|r| r != rank)
            || spec.world_size.is_some_and(|w| w != world_size));
    if world_size == 0 || rank >= world_size || asked {
        return Err(Error::protocol(format!(
            "the seed at {seed} assigned rank {rank} of {world_size}, but this rank asked \
             for rank {:?} of {:?}; check RANKMESH_RANK and RANKMESH_WORLD_SIZE",
            spec.rank, spec.world_size
        )));
    }
    pki::validate_job_id(&job_id)?;
    let creds = Credentials::new(
        &job_id,
        rank,
        CertificateDer::from(ca_der),
        CertificateDer::from(cert_der),
        &key,
    )?;
    let pin = pki::key_pin(&creds.cert)?;
    admitted(&creds)?;
    write_msg(&mut send, &Ready { rank: rank as u32 }).await?;
    tracing::debug!(
        rank,
        world_size,
        "admitted by the seed; waiting for formation"
    );
    // A late joiner waits for the job's next membership point.
    let wait = if spec.late {
        cfg_admission
    } else {
        deadline + Duration::from_secs(5)
    };
    let formation: Formation = tokio::time::timeout(wait, read_msg(&mut recv, &seed_name))
        .await
        .map_err(timed("complete formation"))??;
    let link = |send, recv| SeedLink {
        conn: conn.clone(),
        send: tokio::sync::Mutex::new(send),
        recv: std::sync::Mutex::new(Some(recv)),
    };
    // The table must pin this rank's own key: peers accept it by that key.
    let pinned = |table: &[PeerInfo]| {
        if table.get(rank).map(|p| p.key) == Some(KeyPin::Pinned(pin)) {
            Ok(())
        } else {
            Err(Error::protocol(format!(
                "the seed at {seed} sent a peer table that does not pin the key of the \
                 certificate it issued to rank {rank}; peers would refuse this rank"
            )))
        }
    };
    match formation {
        Formation::Admitted(info) => {
            let valid = info.members.contains(&(rank as u32))
                && info
                    .members
                    .iter()
                    .all(|&m| (m as usize) < info.table.len());
            if !spec.late || !valid {
                return Err(Error::protocol(format!(
                    "the seed at {seed} sent an invalid admission (epoch {}, {} members)",
                    info.epoch,
                    info.members.len()
                )));
            }
            pinned(&info.table)?;
            Ok(Joined {
                creds,
                world_size: info.members.len(),
                epoch: info.epoch,
                peers: info.table.clone(),
                admitted: Some(info),
                seed: link(send, recv),
            })
        }
        Formation::Welcome { epoch, peers } => {
            if peers.len() != world_size {
                return Err(Error::protocol(format!(
                    "the seed announced {world_size} ranks but sent {} peer addresses",
                    peers.len()
                )));
            }
            pinned(&peers)?;
            Ok(Joined {
                creds,
                world_size,
                epoch,
                peers,
                admitted: None,
                seed: link(send, recv),
            })
        }
        Formation::Failed { reason } => Err(membership(reason)),
    }
}
