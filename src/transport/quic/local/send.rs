//! Sending on the same-host channel: opening a peer's main connection after
//! checking who listens, writing frames (a connection of their own for
//! large ones), goodbyes.

use super::*;

/// Why writing a message on the channel failed.
enum SendError {
    /// The socket failed (the peer's reason, if any, arrives over QUIC).
    Io(std::io::Error),
    /// Anything else, already explained.
    Failed(Failure),
}

impl From<std::io::Error> for SendError {
    fn from(e: std::io::Error) -> SendError {
        SendError::Io(e)
    }
}

impl From<Failure> for SendError {
    fn from(f: Failure) -> SendError {
        SendError::Failed(f)
    }
}

/// A small message being written on a main connection. If the send is
/// cancelled half-way, the rest is written in the background so the
/// connection stays in frame.
struct FrameWrite {
    w: Option<OwnedMutexGuard<OwnedWriteHalf>>,
    frame: Bytes,
    off: usize,
}

impl FrameWrite {
    async fn run(&mut self) -> std::io::Result<()> {
        while self.off < self.frame.len() {
            let Some(w) = self.w.as_mut() else { break };
            match w.write(&self.frame[self.off..]).await {
                Ok(0) => {
                    self.w = None;
                    return Err(std::io::ErrorKind::WriteZero.into());
                }
                Ok(n) => self.off += n,
                Err(e) => {
                    self.w = None;
                    return Err(e);
                }
            }
        }
        self.w = None;
        Ok(())
    }
}

impl Drop for FrameWrite {
    fn drop(&mut self) {
        let Some(mut w) = self.w.take() else { return };
        if self.off == 0 {
            return;
        }
        let rest = self.frame.slice(self.off..);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = tokio::time::timeout(FINISH_CANCELLED, w.write_all(&rest)).await;
            });
        }
    }
}

impl Shared {
    /// The same-host channel to `dst` (connected at the first call), or
    /// `None` when messages to `dst` take QUIC.
    pub(in super::super) async fn local_tx(
        self: &Arc<Self>,
        dst: usize,
        conn: &quinn::Connection,
    ) -> Option<Arc<LocalTx>> {
        if !self.cfg.same_host_channel() {
            return None;
        }
        let link = self.link(dst);
        if let Some(v) = link.local.decided() {
            return v;
        }
        let _deciding = link.local.deciding.lock().await;
        if let Some(v) = link.local.decided() {
            return v;
        }
        let tx = self.open_local(dst, conn).await;
        tracing::debug!(
            rank = self.rank,
            peer = dst,
            "messages to the peer take {}",
            if tx.is_some() {
                "the same-host channel"
            } else {
                "QUIC"
            }
        );
        *link.local.out.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx.clone());
        tx
    }

    async fn open_local(&self, dst: usize, conn: &quinn::Connection) -> Option<Arc<LocalTx>> {
        let path = socket_path(&self.job_id, dst);
        let pid = self.peer_pid(dst)?;
        let secret = secret_of(conn)?;
        // Refused or absent: the peer is on another host or in another
        // network namespace. Held by another process: never send it the
        // secret.
        let s = match connect(&path, pid, self.cfg.socket_buffer_bytes()).await {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                tracing::warn!(
                    rank = self.rank,
                    peer = dst,
                    "not using the same-host channel to the peer: {e}"
                );
                return None;
            }
            Err(_) => return None,
        };
        let (mut rd, mut wr) = s.into_split();
        wr.write_all(&hello(HelloKind::Main, self.rank, &secret))
            .await
            .ok()?;
        let mut verdict = [0u8; 1];
        let answer =
            tokio::time::timeout(self.cfg.formation_timeout(), rd.read_exact(&mut verdict)).await;
        if !matches!(answer, Ok(Ok(_))) || verdict[0] != 1 {
            tracing::warn!(
                rank = self.rank,
                peer = dst,
                "the peer did not accept this rank's same-host channel; using QUIC"
            );
            return None;
        }
        Some(Arc::new(LocalTx {
            path,
            pid,
            message_hello: hello(HelloKind::Message, self.rank, &secret),
            main: Arc::new(Mutex::new(wr)),
            acks: Mutex::new(rd),
            opened: AtomicU64::new(0),
            large: Arc::new(tokio::sync::Semaphore::new(self.cfg.max_streams() as usize)),
        }))
    }

    /// Send one message over the same-host channel.
    pub(in super::super) async fn send_local(
        &self,
        dst: usize,
        tx: &LocalTx,
        header: Header,
        payload: Payload<'_>,
        stamp: Stamp<'_>,
    ) -> std::result::Result<(), Failure> {
        match self.write_local(dst, tx, header, payload, stamp).await {
            Ok(()) => Ok(()),
            Err(SendError::Failed(f)) => Err(f),
            Err(SendError::Io(e)) => {
                // A peer that cuts this channel (it stopped, or refused what
                // this rank sent) says why on its QUIC connection at the
                // same time: report that reason rather than "broken pipe".
                self.wait_gone_reason(dst, EOF_GRACE).await;
                Err(self.send_failure(dst, format!("send over the same-host channel failed: {e}")))
            }
        }
    }

    /// Wait (at most `limit`) until `rank` is known to be gone, or this
    /// rank is closing; true if it is gone.
    pub(super) async fn wait_gone_reason(&self, rank: usize, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if self.mailbox.gone_reason(rank).is_some() {
                return true;
            }
            if self.closing.load(Ordering::Acquire) || tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn write_local(
        &self,
        dst: usize,
        tx: &LocalTx,
        mut header: Header,
        payload: Payload<'_>,
        stamp: Stamp<'_>,
    ) -> std::result::Result<(), SendError> {
        let len = payload.len();
        if len <= self.cfg.eager_limit() {
            let mut frame = Vec::with_capacity(HEADER_LEN + len);
            frame.extend_from_slice(&header.encode());
            match payload {
                Payload::Borrowed(d) => frame.extend_from_slice(d),
                other => {
                    let Some(v) = other.collect().await else {
                        return Err(self
                            .failure(
                                self.rank,
                                "this rank's payload producer stopped early".into(),
                            )
                            .into());
                    };
                    for b in v {
                        frame.extend_from_slice(&b);
                    }
                }
            }
            let w = tx.main.clone().lock_owned().await;
            // Numbered once this rank holds the channel: the frame then goes
            // out whole, in number order with the others on it.
            if let Some(s) = stamp {
                header.sub = s();
                frame[..HEADER_LEN].copy_from_slice(&header.encode());
            }
            let mut fw = FrameWrite {
                w: Some(w),
                frame: Bytes::from(frame),
                off: 0,
            };
            return Ok(fw.run().await?);
        }
        // A large message: a connection of its own. Dropping it half-way
        // (a cancelled send) ends it early, which the receive reports.
        // Wait while the peer holds as many unreceived ones as it may.
        let permit = tx.large.clone().acquire_owned().await.map_err(|_| {
            self.failure(
                dst,
                "this rank's same-host channel to the peer closed".into(),
            )
        })?;
        let mut s = connect(&tx.path, tx.pid, self.cfg.socket_buffer_bytes())
            .await
            .map_err(|e| {
                self.failure(
                    dst,
                    format!("cannot open a same-host connection for a large message: {e}"),
                )
            })?;
        tx.opened.fetch_add(1, Ordering::AcqRel);
        if let Some(s) = stamp {
            header.sub = s();
        }
        let mut head = [0u8; HELLO_LEN + HEADER_LEN];
        head[..HELLO_LEN].copy_from_slice(&tx.message_hello);
        head[HELLO_LEN..].copy_from_slice(&header.encode());
        s.write_all(&head).await?;
        match payload {
            Payload::Owned(v) => {
                for b in v {
                    s.write_all(&b).await?;
                }
            }
            Payload::Borrowed(d) => s.write_all(d).await?,
            Payload::Stream { len, mut chunks } => {
                let mut sent = 0;
                while let Some(b) = chunks.recv().await {
                    sent += b.len();
                    if sent > len {
                        break;
                    }
                    s.write_all(&b).await?;
                }
                if sent != len {
                    return Err(self
                        .failure(
                            self.rank,
                            format!("this rank's payload producer delivered {sent} of {len} bytes"),
                        )
                        .into());
                }
            }
        }
        s.shutdown().await?;
        // The permit returns when the peer has received the message (its
        // receive drops the connection: end of stream here) or is gone.
        self.spawn(async move {
            let _permit = permit;
            let mut b = [0u8; 1];
            let _ = s.read(&mut b).await;
        });
        Ok(())
    }

    /// Say goodbye on the main connection to a peer: the frame carries how
    /// many large-message connections were opened.
    pub(in super::super) async fn local_bye(&self, tx: &LocalTx) -> bool {
        let mut bye = Header::new(FrameKind::Bye, self.rank as u32, 0, 0);
        bye.seq = tx.opened.load(Ordering::Acquire);
        let w = tx.main.clone().lock_owned().await;
        let mut fw = FrameWrite {
            w: Some(w),
            frame: Bytes::copy_from_slice(&bye.encode()),
            off: 0,
        };
        fw.run().await.is_ok()
    }

    /// Wait until the peer acknowledged the goodbye.
    pub(in super::super) async fn local_bye_acked(&self, tx: &LocalTx) {
        let mut ack = [0u8; 1];
        let _ = tx.acks.lock().await.read_exact(&mut ack).await;
    }

    /// After the QUIC endpoint closed: end this rank's main connections, so
    /// peers see them end at once.
    pub(in super::super) fn close_local(&self) {
        let links: Vec<_> = self.links.read().unwrap_or_else(|p| p.into_inner()).clone();
        for l in links {
            if let Some(tx) = l.local.tx() {
                if let Ok(mut w) = tx.main.clone().try_lock_owned() {
                    tokio::spawn(async move {
                        let _ = w.shutdown().await;
                    });
                }
            }
        }
    }
}
