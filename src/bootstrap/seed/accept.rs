//! The seed's door: bounded places for clients that have not proven the
//! job token yet, the proof, refusals, and a proven client's request
//! (formation, an elastic joiner, a member's notices).

use super::members::{depart, issue, late_join, relay};
use super::*;

/// Connections that have not yet proved the job token, at most: beyond
/// this the seed refuses new ones (a joiner tries again until its
/// formation deadline), so that unauthenticated clients cannot exhaust the
/// seed's memory.
pub(super) const MAX_UNPROVEN: usize = 256;

/// Of those, at most this many from one IP address, so that an attacker on
/// one host cannot take every place from the job's other hosts.
pub(super) const MAX_UNPROVEN_PER_SOURCE: usize = 64;

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

pub(super) async fn accept_loop(
    inner: Arc<Inner>,
    endpoint: quinn::Endpoint,
    tasks: Arc<Mutex<JoinSet<()>>>,
) {
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
            lanes: req.lanes.clone(),
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

impl Inner {
    /// Refuse a join with `reason`, carrying the seed's proof (so the joiner
    /// can tell the refusal from one made up by a server that is not the
    /// job's seed), and close the connection once the joiner has read it.
    pub(super) async fn reject(
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
