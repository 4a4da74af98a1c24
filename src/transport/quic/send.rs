//! The send side: one registered connection per peer (dialled on first
//! use), one unidirectional stream per message.

use super::*;

/// Bytes of borrowed payload copied per write.
const COPY_PIECE: usize = 1 << 20;

/// Resets a stream whose message was not completely written (the sending
/// operation was cancelled), so the receiver sees an error, not a short message.
pub(super) struct ResetOnDrop(pub(super) Option<quinn::SendStream>);

impl Drop for ResetOnDrop {
    fn drop(&mut self) {
        if let Some(s) = self.0.as_mut() {
            let _ = s.reset(VarInt::from_u32(CODE_ABORT));
        }
    }
}

impl Shared {
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
        let conn = self.dial(&self.endpoint, dst, addr, "it").await?;
        let used = self.register(dst, &conn);
        let sh = self.clone();
        self.spawn(async move { sh.serve(dst, conn).await });
        Ok(used)
    }

    /// Connect from `endpoint` to `dst` at `addr` (`what`: how messages
    /// name the far end) and check that the server holds the key the seed
    /// admitted for `dst`. A failure fails the peer.
    pub(super) async fn dial(
        &self,
        endpoint: &quinn::Endpoint,
        dst: usize,
        addr: std::net::SocketAddr,
        what: &str,
    ) -> std::result::Result<quinn::Connection, Failure> {
        let name = pki::rank_dns_name(&self.job_id, dst);
        let fail = |e: String| {
            let reason = format!("cannot connect to {what} at {addr}: {e}");
            self.mailbox.fail_peer(dst, &reason);
            self.failure(dst, reason)
        };
        let connecting = endpoint
            .connect_with(self.client.clone(), addr, &name)
            .map_err(|e| fail(e.to_string()))?;
        let limit = self.cfg.formation_timeout();
        let conn = match tokio::time::timeout(limit, connecting).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(fail(e.to_string())),
            Err(_) => return Err(fail(format!("no answer within {limit:?}"))),
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
        Ok(conn)
    }

    pub(super) async fn send(
        self: &Arc<Self>,
        dst: usize,
        mut header: Header,
        payload: Payload<'_>,
        stamp: Stamp<'_>,
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
            if let Some(s) = stamp {
                header.sub = s();
            }
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
            return self.send_local(dst, &tx, header, payload, stamp).await;
        }
        let conn = self.connection(dst).await?;
        if let Some(tx) = self.local_tx(dst, &conn).await {
            return self.send_local(dst, &tx, header, payload, stamp).await;
        }
        if !matches!(payload, Payload::Stream { .. }) {
            if let Some(plan) = self.stripe_plan(dst, payload.len()) {
                return self
                    .send_striped(dst, &conn, header, payload, stamp, plan)
                    .await;
            }
        }
        let lost = |e: &dyn std::fmt::Display| self.send_failure(dst, format!("send failed: {e}"));
        let s = conn.open_uni().await.map_err(|e| lost(&e))?;
        if let Some(s) = stamp {
            header.sub = s();
        }
        let piece = match payload {
            Payload::Owned(v) => Piece::Owned(v),
            Payload::Borrowed(data) => Piece::Borrowed(data),
            Payload::Stream { len, chunks } => {
                return self.send_streamed(dst, s, &header, len, chunks).await;
            }
        };
        let written = write_part(s, &header.encode(), piece).await;
        written.and_then(finish).map_err(|e| lost(&e))
    }

    /// Send a payload produced while it is sent: `len` bytes arriving on
    /// `chunks`, behind `header` on `s`.
    async fn send_streamed(
        &self,
        dst: usize,
        s: quinn::SendStream,
        header: &Header,
        len: usize,
        mut chunks: tokio::sync::mpsc::Receiver<Bytes>,
    ) -> std::result::Result<(), Failure> {
        let lost = |e: &dyn std::fmt::Display| self.send_failure(dst, format!("send failed: {e}"));
        let mut guard = ResetOnDrop(Some(s));
        if let Some(s) = guard.0.as_mut() {
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
                // Dropping the guard resets the stream: the peer discards
                // the partial message.
                return Err(self.failure(
                    self.rank,
                    format!("this rank's payload producer delivered {sent} of {len} bytes"),
                ));
            }
        }
        finish(guard).map_err(|e| lost(&e))
    }
}

/// One part's bytes.
pub(super) enum Piece<'a> {
    Borrowed(&'a [u8]),
    Owned(Vec<Bytes>),
}

impl Piece<'_> {
    pub(super) fn len(&self) -> usize {
        match self {
            Piece::Borrowed(d) => d.len(),
            Piece::Owned(v) => v.iter().map(|b| b.len()).sum(),
        }
    }
}

/// The bytes `a..b` of the concatenation of `v`, without copying.
pub(super) fn slice_owned(v: &[Bytes], a: usize, b: usize) -> Vec<Bytes> {
    let mut out = Vec::new();
    let mut at = 0;
    for c in v {
        let (start, end) = (at, at + c.len());
        at = end;
        if end <= a || start >= b {
            continue;
        }
        out.push(c.slice(a.max(start) - start..b.min(end) - start));
    }
    out
}

/// Write `head` and `piece` on `s`, not finished yet ([`finish`]); a
/// failure, or dropping the result, resets it.
pub(super) async fn write_part(
    s: quinn::SendStream,
    head: &[u8],
    piece: Piece<'_>,
) -> std::result::Result<ResetOnDrop, quinn::WriteError> {
    let mut guard = ResetOnDrop(Some(s));
    let Some(s) = guard.0.as_mut() else {
        return Ok(guard);
    };
    match piece {
        Piece::Owned(v) => {
            let mut bufs = Vec::with_capacity(v.len() + 1);
            bufs.push(Bytes::copy_from_slice(head));
            bufs.extend(v);
            s.write_all_chunks(&mut bufs).await?;
        }
        Piece::Borrowed(data) => {
            // Copy a piece at a time: the copy of one piece overlaps the
            // transmission of the previous ones, and small messages go out
            // with their header in one write.
            let first = data.len().min(COPY_PIECE.saturating_sub(head.len()));
            let mut b = Vec::with_capacity(head.len() + first);
            b.extend_from_slice(head);
            b.extend_from_slice(&data[..first]);
            s.write_chunk(Bytes::from(b)).await?;
            for p in data[first..].chunks(COPY_PIECE) {
                s.write_chunk(Bytes::copy_from_slice(p)).await?;
            }
        }
    }
    Ok(guard)
}

/// End a stream [`write_part`] wrote. A stream already reset by the peer
/// fails here: the message is lost.
pub(super) fn finish(mut guard: ResetOnDrop) -> std::result::Result<(), quinn::WriteError> {
    if let Some(s) = guard.0.as_mut() {
        s.finish().map_err(|_| quinn::WriteError::ClosedStream)?;
    }
    guard.0 = None;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owned_payloads_are_sliced_without_gaps() {
        let v: Vec<Bytes> = [&b"abc"[..], b"", b"defgh", b"i"]
            .iter()
            .map(|s| Bytes::copy_from_slice(s))
            .collect();
        let all: Vec<u8> = v.iter().flat_map(|b| b.iter().copied()).collect();
        for a in 0..=all.len() {
            for b in a..=all.len() {
                let got: Vec<u8> = slice_owned(&v, a, b)
                    .iter()
                    .flat_map(|b| b.iter().copied())
                    .collect();
                assert_eq!(got, &all[a..b], "{a}..{b}");
            }
        }
    }
}
