//! The receive side of a connection: one task per connection reads its
//! streams' frames, checks them and hands them to the mailbox, and reports
//! how the connection ended.

use super::*;

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

enum Frame {
    Delivered,
    Bye,
    Dropped,
    Violation(String),
    /// The peer pushed more than this rank holds for it unreceived.
    Overrun(String),
}

/// How long a closed connection's end waits for the peer's same-host
/// channel to be read to its end.
const LOCAL_DRAIN: Duration = Duration::from_secs(2);

impl Shared {
    /// Receive loop of one connection.
    pub(super) async fn serve(self: Arc<Self>, rank: usize, conn: quinn::Connection) {
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
        self.rdv.forget(rank);
        self.drop_lanes(rank, CODE_ABORT, b"the peer is gone");
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
        if h.stripes != 0 {
            // Striped across no more threads than this rank has. (The
            // sender decides by its own eager limit; a striped message is
            // read as a stream whatever its size.)
            if usize::from(h.stripes) > self.lanes.len() + 1 {
                let _ = s.stop(VarInt::from_u32(CODE_PROTOCOL));
                return Frame::Violation(format!(
                    "a message striped into {} parts, but this rank has {} transport threads",
                    h.stripes,
                    self.lanes.len() + 1,
                ));
            }
            let body = match parts::StripedBody::new(self.rdv.clone(), rank, &h, s) {
                Ok(b) => b,
                Err(why) => return Frame::Violation(why),
            };
            return match self.mailbox.deliver(Incoming::streamed(h, Box::new(body))) {
                Ok(()) => Frame::Delivered,
                Err(Refused(reason)) => Frame::Overrun(reason),
            };
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
    pub(super) fn cut_off(
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
        self.drop_lanes(rank, CODE_PROTOCOL, close_reason.as_bytes());
    }
}
