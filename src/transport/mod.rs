//! Moving frames between ranks.
//!
//! A [`Transport`] sends one message (a [`Header`] plus payload chunks) to a
//! peer; received messages land in the rank's [`Mailbox`], where operations
//! pick them up by key. Two implementations: [`mem`] (in-process, for fast
//! deterministic tests) and [`quic`] (real QUIC with mutual TLS).
//!
//! This layer knows frames and peers, not collectives or communicators'
//! semantics; `coll` and `comm` use it only through the trait and the
//! mailbox.

pub mod failure;
pub mod incoming;
pub(crate) mod keyhash;
pub mod mailbox;
pub mod mem;
pub mod quic;
mod spin;

pub use failure::{Abort, AbortKind, Broken, Failure, Refused};
pub use incoming::{Incoming, StreamBody};
pub use mailbox::{CollCheck, CollKey, CollVerdict, Mailbox, P2pKey};

use crate::wire::Header;
use bytes::Bytes;

/// A boxed, sendable future (keeps [`Transport`] object safe).
pub use crate::boxfut::BoxFut;

/// The payload of one message.
#[derive(Debug)]
pub enum Payload<'a> {
    /// Buffers the transport may keep.
    Owned(Vec<Bytes>),
    /// The caller's data, borrowed until the send completes. The transport
    /// copies it as it sends (piece by piece over QUIC, so copying overlaps
    /// transmission).
    Borrowed(&'a [u8]),
    /// Buffers produced while the message is sent (staged from device
    /// memory, say): `len` bytes in all, arriving on `chunks`. If the
    /// producer stops short, the send fails and the message is discarded.
    Stream {
        /// Total bytes the producer will deliver.
        len: usize,
        /// The buffers, in order.
        chunks: tokio::sync::mpsc::Receiver<Bytes>,
    },
}

impl Payload<'_> {
    /// Total bytes.
    pub fn len(&self) -> usize {
        match self {
            Payload::Owned(v) => v.iter().map(|b| b.len()).sum(),
            Payload::Borrowed(s) => s.len(),
            Payload::Stream { len, .. } => *len,
        }
    }

    /// Whether there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Owned buffers (copies borrowed data, waits for a stream's), or
    /// `None` when a stream ended short of its length.
    pub async fn collect(self) -> Option<Vec<Bytes>> {
        match self {
            Payload::Owned(v) => Some(v),
            Payload::Borrowed([]) => Some(Vec::new()),
            Payload::Borrowed(s) => Some(vec![Bytes::copy_from_slice(s)]),
            Payload::Stream { len, mut chunks } => {
                let mut v = Vec::new();
                let mut got = 0;
                while let Some(b) = chunks.recv().await {
                    got += b.len();
                    v.push(b);
                }
                (got == len).then_some(v)
            }
        }
    }
}

/// How this rank's messages reach a peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerPath {
    /// Nothing was sent to the peer yet (the path is chosen at the first
    /// send), or the connection with it ended.
    NotConnected,
    /// QUIC with mutual TLS.
    Quic,
    /// The same-host channel (Unix domain sockets; see
    /// [`crate::Config::set_same_host_channel`]).
    SameHost,
    /// The in-process transport of tests.
    InProcess,
}

/// Numbers a point-to-point message when the transport commits its header
/// to the wire, after any wait for a stream or a same-host slot: a send
/// held back by flow control then holds no number that later messages to
/// the same rank, on other tags, would wait behind at the receiver (which
/// restores each sender's numbering order; `mailbox/p2p.rs`).
pub type Stamp<'a> = Option<&'a (dyn Fn() -> u64 + Send + Sync)>;

/// Moves messages between the ranks of one job.
pub trait Transport: Send + Sync + 'static {
    /// This rank's world rank.
    fn rank(&self) -> usize;

    /// Number of ranks in the world.
    fn size(&self) -> usize;

    /// Send one message to world rank `dst`. Completes once the payload is
    /// owned by the transport (it may not have been received yet).
    /// `header.len` must equal the total payload length. With a `stamp`,
    /// `header.sub` is set to what it returns at the moment the header is
    /// committed to the wire (see [`Stamp`]).
    fn send<'a>(
        &'a self,
        dst: usize,
        header: Header,
        payload: Payload<'a>,
        stamp: Stamp<'a>,
    ) -> BoxFut<'a, Result<(), Failure>>;

    /// Where received messages wait to be matched.
    fn mailbox(&self) -> &Mailbox;

    /// Whether this rank has a live connection with `rank` (messages and the
    /// end of that connection then arrive in order over it).
    fn connected(&self, rank: usize) -> bool;

    /// A human-readable location of `rank` (address, host) for messages.
    fn peer_location(&self, rank: usize) -> String;

    /// How messages to `rank` travel.
    fn path(&self, rank: usize) -> PeerPath;

    /// Extend the peer table with new members of an elastic job (`table`
    /// indexed by world rank; entries this rank already has are kept).
    fn add_peers(&self, table: &[crate::wire::control::PeerInfo]) -> crate::Result<()> {
        let _ = table;
        Err(crate::Error::Membership {
            detail: format!(
                "rank {}: this transport cannot add ranks to a running job; elastic jobs need \
                 the QUIC transport (rankmesh::init_elastic under rankrun --elastic)",
                self.rank()
            ),
        })
    }

    /// Stop. `graceful`: tell connected peers this rank is done and wait
    /// (bounded) until they are done too, so no data in flight is lost.
    /// Otherwise close at once so peers learn of the failure immediately.
    fn shutdown(&self, graceful: bool) -> BoxFut<'_, ()>;
}

#[cfg(test)]
mod tests {
    #[test]
    fn transport_is_object_safe() {
        fn take(_: &dyn super::Transport) {}
        let _ = take;
    }
}
