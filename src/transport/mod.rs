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

pub mod mailbox;
pub mod mem;
pub mod quic;

pub use mailbox::{CollKey, Incoming, LateMismatch, Mailbox, P2pKey, PeerFailure};

use crate::wire::Header;
use bytes::Bytes;
use std::future::Future;
use std::pin::Pin;

/// A boxed, sendable future (keeps [`Transport`] object safe).
pub type BoxFut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Moves messages between the ranks of one job.
pub trait Transport: Send + Sync + 'static {
    /// This rank's world rank.
    fn rank(&self) -> usize;

    /// Number of ranks in the world.
    fn size(&self) -> usize;

    /// Send one message to world rank `dst`. Completes once the payload is
    /// owned by the transport (it may not have been received yet).
    /// `header.len` must equal the total payload length.
    fn send(
        &self,
        dst: usize,
        header: Header,
        payload: Vec<Bytes>,
    ) -> BoxFut<'_, Result<(), PeerFailure>>;

    /// Where received messages wait to be matched.
    fn mailbox(&self) -> &Mailbox;

    /// A human-readable location of `rank` (address, host) for messages.
    fn peer_location(&self, rank: usize) -> String;

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
