//! A formed job's members: certificates issued, departures, the relay of
//! each member's notices, and elastic joiners admitted at membership
//! points.

use super::*;

/// Sign a joiner's CSR as member `id`: the key pin and the certificate.
pub(super) fn issue(
    ca: &JobCa,
    csr_der: &[u8],
    id: usize,
) -> Result<([u8; 32], rustls::pki_types::CertificateDer<'static>)> {
    let cert = ca.sign_rank(csr_der, id)?;
    Ok((pki::key_pin(&cert)?, cert))
}

/// A member of the formed job is gone: tell every rank, and (elastic jobs)
/// stop waiting for it at membership points.
pub(super) fn depart(inner: &Inner, rank: usize, reason: String) {
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
pub(super) async fn relay(
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
                        Some(el) => lock(el).request(rank, epoch).err().map(|r| r.to_string()),
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
pub(super) async fn late_join(
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
        lanes: req.lanes.clone(),
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
    let full = lock(el).reserve().err().map(|r| r.to_string());
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
