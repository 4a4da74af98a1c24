//! The same-host channel: messages between ranks on one host (and in one
//! network namespace) travel over Unix domain sockets instead of encrypted
//! QUIC packets.
//!
//! Every rank listens on an abstract-namespace socket named after its job
//! and rank. The first time a rank sends to a peer, once the QUIC connection
//! of the pair is up, it tries to connect there; when that works (the peer
//! runs on this host, in this network namespace), every later message to
//! that peer takes this channel, otherwise QUIC. Per direction, one
//! long-lived *main* connection carries the messages up to the eager limit
//! and the goodbye; every larger message gets a connection of its own,
//! read by its receive once that is posted (as a QUIC stream is), so a large
//! message never holds up another.
//!
//! Abstract sockets have no file permissions: any local process can bind a
//! free name or connect to a bound one. So a sender first checks that the
//! process listening on the peer's name is the peer (its pid, from the
//! kernel's `SO_PEERCRED`, must be the pid the peer joined with, which the
//! seed passed on); only then does it open with a hello that proves who
//! connects: the sender's rank and a 32-byte secret exported (RFC 8446
//! section 7.5) from the pair's mutual-TLS QUIC connection, which only those
//! two ranks can compute. The QUIC connection stays up: it carries liveness
//! (keep-alives, the idle timeout) and the reasons a peer closes with.

use super::Shared;
use crate::transport::{Broken, Failure, Incoming, Payload, Refused, StreamBody};
use crate::wire::hello::{Hello, HelloKind, HELLO_LEN};
use crate::wire::{FrameKind, Header, HEADER_LEN};
use bytes::Bytes;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::{Mutex, OwnedMutexGuard};

/// TLS exporter label of the secret.
const LABEL: &[u8] = b"EXPORTER-rankmesh-same-host-channel";
/// After a main connection ended without a goodbye, or a write on the
/// channel failed, how long to wait for the QUIC connection to say why
/// before reporting the bare socket error.
const EOF_GRACE: Duration = Duration::from_millis(500);
/// How long a send that was cancelled half-way through a small message may
/// take to finish writing it (the main connection must stay in frame).
const FINISH_CANCELLED: Duration = Duration::from_secs(60);

/// The secret of one QUIC connection.
pub(super) type Secret = [u8; 32];

/// The secret both ends of `conn` derive for the same-host channel.
pub(super) fn secret_of(conn: &quinn::Connection) -> Option<Secret> {
    let mut out = [0u8; 32];
    conn.export_keying_material(&mut out, LABEL, b"").ok()?;
    Some(out)
}

fn same(a: &Secret, b: &Secret) -> bool {
    // Constant time: the comparison must not tell how much of a guess was right.
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The name of `rank`'s socket in job `job_id`, for binding and connecting:
/// a leading NUL byte puts it in Linux's abstract namespace (elsewhere it
/// is an invalid path, so there is no channel).
fn socket_path(job_id: &str, rank: usize) -> std::path::PathBuf {
    use std::os::unix::ffi::OsStrExt;
    let name = format!("\0rankmesh/{job_id}/{rank}");
    std::path::PathBuf::from(std::ffi::OsStr::from_bytes(name.as_bytes()))
}

/// How long a connect waits for room in a busy listener's backlog.
const BACKLOG_WAIT: Duration = Duration::from_secs(5);

/// Connect to `path` and check that the listening process is `pid`. Never
/// blocks the thread: a full backlog is waited out asynchronously.
async fn connect(path: &std::path::Path, pid: u32, buffer: usize) -> std::io::Result<UnixStream> {
    let until = tokio::time::Instant::now() + BACKLOG_WAIT;
    let s = loop {
        match UnixStream::connect(path).await {
            Ok(s) => break s,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    && tokio::time::Instant::now() < until =>
            {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            Err(e) => return Err(e),
        }
    };
    let _ = socket2::SockRef::from(&s).set_send_buffer_size(buffer);
    let listener = s.peer_cred()?.pid();
    if listener != Some(pid as i32) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "the process listening there is pid {listener:?}, not the peer's pid {pid}; \
                 another process holds the name"
            ),
        ));
    }
    Ok(s)
}

/// Time a same-host connection has to prove itself: to send its whole
/// hello, with the secret of a QUIC connection this rank has checked.
const HELLO_DEADLINE: Duration = Duration::from_secs(1);

/// Same-host connections that have not yet proved themselves, at most (the
/// next one is accepted once one of them is done).
const MAX_UNPROVEN_LOCAL: usize = 64;

/// This process's user (the owner of `/proc/self`), to refuse same-host
/// connections from other users; `None` without `/proc`.
fn own_uid() -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").ok().map(|m| m.uid())
}

fn hello(kind: HelloKind, rank: usize, secret: &Secret) -> [u8; HELLO_LEN] {
    Hello {
        kind,
        rank: rank as u32,
        secret: *secret,
    }
    .encode()
}

/// This rank's side of its channel to one peer.
pub(super) struct LocalTx {
    path: std::path::PathBuf,
    /// The peer's process id, which its listener must have.
    pid: u32,
    message_hello: [u8; HELLO_LEN],
    main: Arc<Mutex<OwnedWriteHalf>>,
    /// The peer acknowledges the goodbye on the main connection's way back.
    acks: Mutex<OwnedReadHalf>,
    /// Large-message connections opened so far (the goodbye carries the
    /// count, so the peer knows when it has seen them all).
    opened: AtomicU64,
    /// One permit per large message the peer has not received yet (each
    /// holds a connection at the peer): at most `Config::max_streams`, as
    /// QUIC bounds the streams a peer may hold open.
    large: Arc<tokio::sync::Semaphore>,
}

/// The per-peer state of the channel (part of a QUIC link).
pub(super) struct LocalLink {
    /// The channel this rank sends on: decided at its first send to the
    /// peer (`Some(None)`: QUIC), forgotten with the QUIC connection.
    out: std::sync::Mutex<Option<Option<Arc<LocalTx>>>>,
    deciding: Mutex<()>,
    /// Secrets of the live QUIC connections with the peer.
    secrets: tokio::sync::watch::Sender<Vec<Secret>>,
    /// Large-message connections from the peer handled so far.
    handled: tokio::sync::watch::Sender<u64>,
    /// Main connections from the peer still being read.
    inbound: tokio::sync::watch::Sender<usize>,
}

impl LocalLink {
    pub(super) fn new() -> LocalLink {
        LocalLink {
            out: std::sync::Mutex::new(None),
            deciding: Mutex::new(()),
            secrets: tokio::sync::watch::channel(Vec::new()).0,
            handled: tokio::sync::watch::channel(0).0,
            inbound: tokio::sync::watch::channel(0).0,
        }
    }

    /// Wait (at most `limit`) until no main connection from the peer is
    /// being read any more.
    pub(super) async fn inbound_drained(&self, limit: Duration) {
        let mut rx = self.inbound.subscribe();
        let _ = tokio::time::timeout(limit, rx.wait_for(|n| *n == 0))
            .await
            .is_ok();
    }

    pub(super) fn decided(&self) -> Option<Option<Arc<LocalTx>>> {
        self.out.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The channel this rank sends on, if it decided on one.
    pub(super) fn tx(&self) -> Option<Arc<LocalTx>> {
        self.decided().flatten()
    }

    /// The QUIC connection with the peer ended: close the channel (a later
    /// send decides again, or finds the peer gone).
    pub(super) fn forget(&self) {
        self.out.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    /// A QUIC connection with the peer is up: accept hellos with its secret.
    pub(super) fn add_secret(&self, s: Secret) {
        self.secrets.send_modify(|v| v.push(s));
    }

    /// That connection ended.
    pub(super) fn remove_secret(&self, s: &Secret) {
        self.secrets.send_modify(|v| v.retain(|k| !same(k, s)));
    }
}

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
    /// Listen for same-host connections, if the channel is on and the
    /// address is free.
    pub(super) fn start_local(self: &Arc<Self>) {
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

    /// The same-host channel to `dst` (connected at the first call), or
    /// `None` when messages to `dst` take QUIC.
    pub(super) async fn local_tx(
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
    pub(super) async fn send_local(
        &self,
        dst: usize,
        tx: &LocalTx,
        header: Header,
        payload: Payload<'_>,
    ) -> std::result::Result<(), Failure> {
        match self.write_local(dst, tx, header, payload).await {
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
    async fn wait_gone_reason(&self, rank: usize, limit: Duration) -> bool {
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
        header: Header,
        payload: Payload<'_>,
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
    pub(super) async fn local_bye(&self, tx: &LocalTx) -> bool {
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
    pub(super) async fn local_bye_acked(&self, tx: &LocalTx) {
        let mut ack = [0u8; 1];
        let _ = tx.acks.lock().await.read_exact(&mut ack).await;
    }

    /// After the QUIC endpoint closed: end this rank's main connections, so
    /// peers see them end at once.
    pub(super) fn close_local(&self) {
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
        if rank == self.rank || rank >= self.n_peers() + super::MEMBER_ID_SLACK {
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
