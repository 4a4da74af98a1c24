//! Lane connections: each rank's lane `k` dials the peer's lane `k` when
//! it first stripes a message to it, accepts the peer's (the same mutual
//! TLS, key pin, handshake places and Retry as the main endpoint), reads
//! the parts that arrive on them, and reports how they end. A lane
//! connection that ends while its peer lives cuts the peer off: its large
//! messages cannot arrive whole.

use super::lanes::Lane;
use super::*;
use crate::wire::stripe::{StripeHeader, STRIPE_HEADER_LEN};

impl Shared {
    /// The connection of lane `k` to `dst` (dialled on first use, from this
    /// rank's lane `k` to the peer's).
    pub(super) async fn lane_connection(
        self: &Arc<Self>,
        dst: usize,
        k: usize,
    ) -> std::result::Result<quinn::Connection, Failure> {
        let link = self.link(dst);
        let get = || {
            let g = link.lanes_out.lock().unwrap_or_else(|p| p.into_inner());
            g.get(&k).cloned()
        };
        if let Some(c) = get() {
            return Ok(c);
        }
        let _dialing = link.lane_dial.lock().await;
        if let Some(c) = get() {
            return Ok(c);
        }
        let lane = self
            .lanes
            .get(k - 1)
            .ok_or_else(|| self.failure(dst, format!("internal: no transport thread {k}")))?;
        let addr = {
            let g = self.peers.read().unwrap_or_else(|p| p.into_inner());
            g.get(dst)
                .and_then(|p| Some(std::net::SocketAddr::new(p.addr.ip(), *p.lanes.get(k - 1)?)))
        };
        let Some(addr) = addr else {
            return Err(self.failure(
                dst,
                format!("no address known for its transport thread {k}"),
            ));
        };
        let conn = self
            .dial(
                &lane.endpoint,
                dst,
                addr,
                &format!("its transport thread {k}"),
            )
            .await?;
        link.lanes_out
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(k, conn.clone());
        // Its end is watched where it is driven.
        let sh = self.clone();
        let watched = conn.clone();
        self.spawn_on_lane(lane, async move {
            let end = watched.closed().await;
            sh.lane_ended(dst, k, &end).await;
        });
        Ok(conn)
    }

    pub(super) fn spawn_on_lane(
        &self,
        lane: &Lane,
        fut: impl Future<Output = ()> + Send + 'static,
    ) {
        let mut tasks = self.lane_tasks.lock().unwrap_or_else(|p| p.into_inner());
        while tasks.try_join_next().is_some() {}
        tasks.spawn_on(fut, &lane.runtime);
    }

    /// Close and forget this rank's lane connections to `rank` (it is
    /// gone or cut off).
    pub(super) fn drop_lanes(&self, rank: usize, code: u32, why: &[u8]) {
        let link = self.link(rank);
        let conns: Vec<quinn::Connection> = {
            let mut g = link.lanes_out.lock().unwrap_or_else(|p| p.into_inner());
            g.drain().map(|(_, c)| c).collect()
        };
        for c in conns {
            c.close(VarInt::from_u32(code), why);
        }
    }

    /// Accept loop of lane `k` (runs on its thread).
    pub(super) async fn lane_accept_loop(self: Arc<Self>, k: usize) {
        let Some(lane) = self.lanes.get(k - 1).cloned() else {
            return;
        };
        while let Some(incoming) = lane.endpoint.accept().await {
            let Some((incoming, place)) = self.admit(incoming) else {
                continue;
            };
            let sh = self.clone();
            self.spawn_on_lane(&lane, async move {
                if let Some((rank, conn)) = sh.handshake(incoming, place).await {
                    let end = sh.serve_lane(rank, &conn).await;
                    sh.lane_ended(rank, k, &end).await;
                }
            });
        }
    }

    /// Read the parts a peer sends on a lane connection until it ends.
    async fn serve_lane(
        self: &Arc<Self>,
        rank: usize,
        conn: &quinn::Connection,
    ) -> ConnectionError {
        let mut parts: JoinSet<std::result::Result<(), String>> = JoinSet::new();
        loop {
            tokio::select! {
                s = conn.accept_uni() => match s {
                    Ok(mut s) => {
                        let rdv = self.rdv.clone();
                        parts.spawn(async move {
                            let mut hb = [0u8; STRIPE_HEADER_LEN];
                            if s.read_exact(&mut hb).await.is_err() {
                                // Reset by the sender: the message was not sent.
                                return Ok(());
                            }
                            let h = StripeHeader::decode(&hb).map_err(|e| e.to_string())?;
                            rdv.part_arrived(rank, &h, s)
                        });
                    }
                    Err(e) => return e,
                },
                Some(Ok(Err(why))) = parts.join_next() => {
                    self.cut_off(
                        rank,
                        &format!("it sent an invalid part of a striped message: {why}"),
                        &why,
                        Some(conn),
                    );
                }
            }
        }
    }

    /// A lane connection with `rank` ended. The peer's own close (it
    /// finalized or failed: every connection of its endpoints says so, the
    /// main one with the reason) is reported by the main connection; any
    /// other end while the peer lives loses its large messages, so the
    /// peer is cut off.
    async fn lane_ended(self: &Arc<Self>, rank: usize, k: usize, end: &ConnectionError) {
        if self.closing.load(Ordering::Acquire) {
            return;
        }
        // The peer's own close (it finalized, failed or was aborted: its
        // endpoints all close, the main connection with the reason) is
        // reported by the main connection, as is this rank's.
        if matches!(
            end,
            ConnectionError::LocallyClosed | ConnectionError::ApplicationClosed(_)
        ) {
            return;
        }
        // When the whole peer is gone (its host, its process), its main
        // connection times out or is reset too, within a keep-alive
        // interval or so, and says so better: wait for it that long.
        let wait = self.cfg.idle_timeout() + self.cfg.keep_alive() + LANE_END_GRACE;
        if let Some(main) = self.registered(rank) {
            let _ = tokio::time::timeout(wait, main.closed()).await;
        }
        let main_ended = self
            .registered(rank)
            .is_none_or(|c| c.close_reason().is_some());
        if self.closing.load(Ordering::Acquire) || main_ended {
            return;
        }
        if self.mailbox.gone_reason(rank).is_none()
            && self.link(rank).ending.load(Ordering::Acquire) == 0
        {
            let why = format!(
                "its connection for transport thread {k} ended ({end}) while the rank was \
                 alive; its large messages can no longer arrive whole"
            );
            self.cut_off(rank, &why, "transport thread connection lost", None);
        }
        self.rdv.forget(rank);
    }
}

/// Beyond the main connection's own time to notice, how long a lane that
/// ended waits for it to report the peer's end first.
const LANE_END_GRACE: Duration = Duration::from_millis(500);
