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

mod receive;
mod send;

use super::Shared;
use crate::transport::{Broken, Failure, Incoming, Payload, Refused, Stamp, StreamBody};
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
