//! Accepting connections: bounded places for unfinished handshakes, the
//! peer's certificate checked against the pinned key of the member it
//! names.

use super::*;

/// Incoming connections in their handshake at once, at most (and from one
/// address): beyond this a rank refuses new ones, so that clients without
/// a job certificate cannot exhaust its memory. A job's own ranks dial each
/// other once per pair, and a handshake between them takes milliseconds.
pub(super) const MAX_HANDSHAKES: usize = 256;

pub(super) const MAX_HANDSHAKES_PER_SOURCE: usize = 64;

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

impl Shared {
    pub(super) async fn accept_loop(self: Arc<Self>) {
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
            let Some((incoming, place)) = self.admit(incoming) else {
                continue;
            };
            let sh = self.clone();
            self.spawn(async move { sh.accept_one(incoming, place).await });
        }
    }

    /// Whether an incoming connection (on the main endpoint or a lane's)
    /// may start its handshake, and the place it then holds: refused while
    /// this rank closes or when the places are taken; under load, a client
    /// whose address is not validated is sent a stateless Retry instead (it
    /// comes back with the token and is then counted).
    pub(super) fn admit(
        &self,
        incoming: quinn::Incoming,
    ) -> Option<(quinn::Incoming, places::Place)> {
        if self.closing.load(Ordering::Acquire) {
            incoming.refuse();
            return None;
        }
        if self.handshakes.held() >= RETRY_ABOVE && !incoming.remote_address_validated() {
            let _ = incoming.retry();
            return None;
        }
        match self.handshakes.take(incoming.remote_address().ip()) {
            Some(place) => Some((incoming, place)),
            None => {
                incoming.refuse();
                None
            }
        }
    }

    async fn accept_one(self: Arc<Self>, incoming: quinn::Incoming, place: places::Place) {
        if let Some((rank, conn)) = self.handshake(incoming, place).await {
            self.register(rank, &conn);
            self.serve(rank, conn).await;
        }
    }

    /// Complete an incoming connection's handshake (holding `place` until
    /// then) and check its certificate: the peer's rank and the
    /// connection, or `None` when it was refused.
    pub(super) async fn handshake(
        &self,
        incoming: quinn::Incoming,
        place: places::Place,
    ) -> Option<(usize, quinn::Connection)> {
        let from = incoming.remote_address();
        let limit = HANDSHAKE_DEADLINE.min(self.cfg.formation_timeout());
        let conn = match tokio::time::timeout(limit, incoming).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                tracing::debug!(rank = self.rank, %from, "refused a connection: {e}");
                place.failed(format!("{from}: {e}"));
                return None;
            }
            Err(_) => {
                place.failed(format!("{from}: no handshake within {limit:?}"));
                return None;
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
                return None;
            }
        };
        // Nothing from the connection is read, and its same-host secret is
        // not accepted, until its key is the one the table pins.
        if let Err((e, why)) = self.check_key(rank, &pin).await {
            tracing::warn!(rank = self.rank, %from, "refused a connection claiming rank {rank}: {e}");
            conn.close(VarInt::from_u32(CODE_AUTH), why);
            return None;
        }
        Some((rank, conn))
    }

    /// The peer's leaf certificate (already verified against the job CA).
    pub(super) fn peer_cert(
        conn: &quinn::Connection,
    ) -> Result<rustls::pki_types::CertificateDer<'static>> {
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
    pub(super) async fn check_key(
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
}
