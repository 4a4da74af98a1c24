//! Receiving on the same-host channel: the listener, the hello that proves
//! who connects, the main connection's frames and large messages' own
//! connections.

use super::*;

/// A frame on the same-host channel that breaks the protocol: why.
struct Violation(String);

/// Largest piece read at a time from a same-host connection.
const LOCAL_PIECE: usize = 1 << 20;

/// A large message's payload on the same-host connection that carries it
/// alone; `buf` is reused for its pieces once the previous one was dropped.
struct LocalBody {
    stream: UnixStream,
    buf: bytes::BytesMut,
}

impl StreamBody for LocalBody {
    fn poll_piece(
        &mut self,
        cx: &mut std::task::Context<'_>,
        max: usize,
    ) -> std::task::Poll<std::result::Result<Option<Bytes>, Broken>> {
        use bytes::BufMut;
        use std::future::Future;
        use std::task::Poll;
        let want = max.min(LOCAL_PIECE);
        // Reclaims the previous piece's memory if it was dropped.
        self.buf.reserve(want);
        let got = {
            let mut room = (&mut self.buf).limit(want);
            let read = std::pin::pin!(self.stream.read_buf(&mut room));
            read.poll(cx)
        };
        match got {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(0)) => Poll::Ready(Ok(None)),
            Poll::Ready(Ok(_)) => Poll::Ready(Ok(Some(self.buf.split().freeze()))),
            Poll::Ready(Err(e)) => Poll::Ready(Err(Broken(format!(
                "same-host connection failed mid-message: {e}"
            )))),
        }
    }

    fn poll_fill(
        &mut self,
        cx: &mut std::task::Context<'_>,
        out: &mut [u8],
        filled: &mut usize,
    ) -> Option<std::task::Poll<std::result::Result<(), Broken>>> {
        use std::task::Poll;
        use tokio::io::AsyncRead;
        let ended = |left: usize, why: &str| {
            Broken(format!(
                "same-host connection ended {left} bytes before the message's end{why}"
            ))
        };
        while *filled < out.len() {
            let mut room = tokio::io::ReadBuf::new(&mut out[*filled..]);
            match std::pin::Pin::new(&mut self.stream).poll_read(cx, &mut room) {
                Poll::Pending => return Some(Poll::Pending),
                Poll::Ready(Ok(())) if room.filled().is_empty() => {
                    return Some(Poll::Ready(Err(ended(out.len() - *filled, ""))))
                }
                Poll::Ready(Ok(())) => *filled += room.filled().len(),
                Poll::Ready(Err(e)) => {
                    return Some(Poll::Ready(Err(ended(
                        out.len() - *filled,
                        &format!(": {e}"),
                    ))))
                }
            }
        }
        Some(Poll::Ready(Ok(())))
    }
}

impl Shared {
    /// Listen for same-host connections, if the channel is on and the
    /// address is free.
    pub(in super::super) fn start_local(self: &Arc<Self>) {
        if !self.cfg.same_host_channel() {
            return;
        }
        let listener = tokio::net::UnixListener::bind(socket_path(&self.job_id, self.rank));
        let listener = match listener {
            Ok(l) => l,
            Err(e) => {
                tracing::debug!(
                    rank = self.rank,
                    "no same-host channel (QUIC only): cannot listen: {e}"
                );
                return;
            }
        };
        let sh = self.clone();
        let uid = own_uid();
        let unproven = Arc::new(tokio::sync::Semaphore::new(MAX_UNPROVEN_LOCAL));
        self.spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((s, _)) => {
                        // Only the job's own user may use the channel: any
                        // other is closed at once, before anything is read,
                        // so it cannot hold this rank's descriptors.
                        let cred = s.peer_cred();
                        let foreign = match (&cred, uid) {
                            (Ok(c), Some(u)) => c.uid() != u,
                            (Ok(_), None) => false,
                            (Err(_), _) => true,
                        };
                        if foreign {
                            tracing::warn!(
                                rank = sh.rank,
                                "refused a same-host connection from another user ({:?})",
                                cred.map(|c| (c.uid(), c.pid()))
                            );
                            continue;
                        }
                        // At most this many are read at once; the next
                        // waits for a place (each is done within the hello
                        // deadline) rather than being closed: a burst of
                        // this rank's peers' own large messages must never
                        // lose one.
                        let Ok(permit) = unproven.clone().acquire_owned().await else {
                            return;
                        };
                        // Also while finalizing: a peer's goodbye counts the
                        // message connections it opened.
                        let h = sh.clone();
                        sh.spawn(async move { h.local_incoming(s, permit).await });
                    }
                    Err(e) => {
                        tracing::warn!(rank = sh.rank, "same-host accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
        });
    }

    /// A connection arrived on this rank's same-host socket.
    async fn local_incoming(
        self: Arc<Self>,
        mut s: UnixStream,
        unproven: tokio::sync::OwnedSemaphorePermit,
    ) {
        let mut hello = [0u8; HELLO_LEN];
        // A peer rank sends its whole hello at once, once its QUIC
        // connection with this rank is up: a connection that has not
        // proved itself within a second is closed, whoever opened it, and
        // counts against the unproven until then.
        let until = tokio::time::Instant::now() + HELLO_DEADLINE;
        if !matches!(
            tokio::time::timeout_at(until, s.read_exact(&mut hello)).await,
            Ok(Ok(_))
        ) {
            return;
        }
        let (kind, rank, secret) = match Hello::decode(&hello) {
            Ok(h) => (h.kind, h.rank as usize, h.secret),
            Err(e) => {
                tracing::warn!(rank = self.rank, "refused a same-host connection: {e}");
                return;
            }
        };
        if rank == self.rank || rank >= self.n_peers() + super::super::MEMBER_ID_SLACK {
            tracing::warn!(
                rank = self.rank,
                "refused a same-host connection claiming to be rank {rank}"
            );
            return;
        }
        let link = self.link(rank);
        // The sender derived the secret from its QUIC connection with this
        // rank, which this side may be finishing (or checking) just now.
        let mut known = link.local.secrets.subscribe();
        let proven = tokio::time::timeout_at(
            until,
            known.wait_for(|v| v.iter().any(|k| same(k, &secret))),
        )
        .await
        .is_ok_and(|r| r.is_ok());
        drop(unproven);
        if !proven {
            tracing::warn!(
                rank = self.rank,
                "refused a same-host connection claiming to be rank {rank}: its secret \
                 belongs to no QUIC connection with that rank"
            );
            if kind == HelloKind::Main {
                let _ = s.write_all(&[0]).await;
            }
            return;
        }
        match kind {
            HelloKind::Main => {
                if s.write_all(&[1]).await.is_ok() {
                    self.local_main(rank, s).await;
                }
            }
            HelloKind::Message => {
                self.local_message(rank, s).await;
                link.local.handled.send_modify(|n| *n += 1);
            }
        }
    }

    /// Check a frame header that arrived from `rank` on the channel.
    fn local_header(&self, rank: usize, hb: &[u8; HEADER_LEN]) -> Result<Header, Violation> {
        let h = Header::decode(hb).map_err(|e| Violation(e.to_string()))?;
        if h.src as usize != rank {
            return Err(Violation(format!(
                "frame claims to come from rank {} but the channel was opened by rank {rank}",
                h.src
            )));
        }
        if h.len > self.cfg.max_message_bytes() {
            return Err(Violation(format!(
                "frame announces {} payload bytes, more than the limit of {} \
                 (Config::set_max_message_bytes)",
                h.len,
                self.cfg.max_message_bytes()
            )));
        }
        Ok(h)
    }

    fn local_violation(&self, rank: usize, reason: &str) {
        self.cut_off(
            rank,
            &format!("it sent an invalid frame: {reason}"),
            reason,
            None,
        );
    }

    /// One large message: deliver it with its connection, to be read by
    /// its receive.
    async fn local_message(&self, rank: usize, mut s: UnixStream) {
        let mut hb = [0u8; HEADER_LEN];
        let got = tokio::time::timeout(self.cfg.formation_timeout(), s.read_exact(&mut hb)).await;
        if !matches!(got, Ok(Ok(_))) {
            // The send was cancelled before its header.
            return;
        }
        match self.local_header(rank, &hb) {
            Ok(h) if h.kind != FrameKind::Bye => {
                // A large message is never held in memory: never refused.
                let body = Box::new(LocalBody {
                    stream: s,
                    buf: bytes::BytesMut::new(),
                });
                if let Err(Refused(reason)) = self.mailbox.deliver(Incoming::streamed(h, body)) {
                    self.cut_off(rank, &reason, &reason, None);
                }
            }
            Ok(_) => self.local_violation(rank, "a goodbye on a message connection"),
            Err(Violation(e)) => self.local_violation(rank, &e),
        }
    }

    /// The main connection from `rank`: small messages and the goodbye.
    async fn local_main(&self, rank: usize, s: UnixStream) {
        let link = self.link(rank);
        link.local.inbound.send_modify(|n| *n += 1);
        let said_bye = self.read_main(rank, s).await;
        link.local.inbound.send_modify(|n| *n = n.saturating_sub(1));
        if said_bye || self.closing.load(Ordering::Acquire) {
            return;
        }
        // Ended without a goodbye. A rank that stops after an error or an
        // abort closes its QUIC connection with the reason at the same
        // time; give that a moment to arrive (the QUIC side reports it once
        // this channel is drained).
        if self.wait_gone_reason(rank, EOF_GRACE).await || self.closing.load(Ordering::Acquire) {
            return;
        }
        self.mailbox.fail_peer(
            rank,
            "its same-host channel closed without a goodbye: its process exited or was killed",
        );
    }

    /// Read a main connection to its end; true if the peer said goodbye,
    /// broke the protocol (which already failed it), or sent nothing at all
    /// (its first send was cancelled while the channel was set up: the
    /// peer is not gone, its next send opens another channel).
    async fn read_main(&self, rank: usize, s: UnixStream) -> bool {
        let (rd, mut wr) = s.into_split();
        // One read takes whatever frames have arrived (a small frame whole,
        // header and body, in one system call).
        let mut rd = tokio::io::BufReader::with_capacity(HEADER_LEN + self.cfg.eager_limit(), rd);
        let link = self.link(rank);
        let mut said_bye = false;
        let mut frames = 0u64;
        loop {
            let mut hb = [0u8; HEADER_LEN];
            if rd.read_exact(&mut hb).await.is_err() {
                if frames == 0 {
                    return true;
                }
                break;
            }
            frames += 1;
            let h = match self.local_header(rank, &hb) {
                Ok(h) => h,
                Err(Violation(e)) => {
                    self.local_violation(rank, &e);
                    return true;
                }
            };
            if h.kind == FrameKind::Bye {
                // Every large message the peer sent before must have
                // reached the mailbox first.
                let mut handled = link.local.handled.subscribe();
                let all = h.seq;
                let _ = tokio::time::timeout(self.cfg.linger(), handled.wait_for(|n| *n >= all))
                    .await
                    .is_ok();
                self.mailbox.fail_peer(
                    rank,
                    "the rank finalized (it called finalize or ended) without sending this message",
                );
                link.done.send_replace(true);
                let _ = wr.write_all(&[1]).await;
                said_bye = true;
                continue;
            }
            if h.len > self.cfg.eager_limit() as u64 {
                self.local_violation(
                    rank,
                    &format!(
                        "a {}-byte message on the main connection (the eager limit is {})",
                        h.len,
                        self.cfg.eager_limit()
                    ),
                );
                return true;
            }
            let mut body = vec![0u8; h.len as usize];
            if rd.read_exact(&mut body).await.is_err() {
                break;
            }
            let chunks = if body.is_empty() {
                Vec::new()
            } else {
                vec![Bytes::from(body)]
            };
            if let Err(Refused(reason)) = self.mailbox.deliver(Incoming::from_chunks(h, chunks)) {
                self.cut_off(rank, &reason, &reason, None);
                return true;
            }
        }
        said_bye
    }
}
