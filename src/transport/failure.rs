//! Why an operation that involves a peer cannot complete, as the transport
//! reports it to the layers above: typed, so that no layer decodes another
//! layer's words.

use crate::wire::{ABORT_FAILED, ABORT_MISMATCH};

/// How a rank abandoned a collective (the first byte of an abort frame's
/// payload on the wire).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AbortKind {
    /// The ranks' calls did not match.
    Mismatch,
    /// The rank failed or gave up (a timeout, a lost peer, a device error).
    Failed,
}

impl AbortKind {
    /// The kind's byte on the wire.
    pub fn to_wire(self) -> u8 {
        match self {
            AbortKind::Mismatch => ABORT_MISMATCH,
            AbortKind::Failed => ABORT_FAILED,
        }
    }

    /// Split an abort frame's payload into its kind (any byte but the
    /// mismatch one, or none, reads as a failure) and its text.
    pub fn parse(payload: &[u8]) -> (AbortKind, String) {
        match payload.split_first() {
            Some((&ABORT_MISMATCH, text)) => (
                AbortKind::Mismatch,
                String::from_utf8_lossy(text).into_owned(),
            ),
            Some((_, text)) => (
                AbortKind::Failed,
                String::from_utf8_lossy(text).into_owned(),
            ),
            None => (AbortKind::Failed, String::new()),
        }
    }
}

/// One rank's abort of one collective.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Abort {
    /// The world rank that aborted it (this rank, for its own).
    pub by: usize,
    /// Why, in kind.
    pub kind: AbortKind,
    /// Why, in words.
    pub reason: String,
}

/// A receive or send that cannot complete because of a peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Failure {
    /// World rank `rank` is gone (lost, finalized, or it refused what this
    /// rank sent), for `reason`.
    Lost {
        /// The peer's world rank.
        rank: usize,
        /// Why, in words.
        reason: String,
    },
    /// A rank aborted the collective this operation belongs to (it found
    /// the ranks' calls disagree, or it failed).
    CollAborted(Abort),
    /// World rank `by` ended the job for every rank.
    JobAborted {
        /// The aborting rank.
        by: usize,
        /// Its reason.
        reason: String,
    },
}

impl Failure {
    /// `rank` is gone for `reason`.
    pub fn lost(rank: usize, reason: impl Into<String>) -> Failure {
        Failure::Lost {
            rank,
            reason: reason.into(),
        }
    }

    /// The world rank the failure names: the lost peer, or the aborting
    /// rank.
    pub fn rank(&self) -> usize {
        match self {
            Failure::Lost { rank, .. } => *rank,
            Failure::CollAborted(a) => a.by,
            Failure::JobAborted { by, .. } => *by,
        }
    }

    /// The failure's reason, in words.
    pub fn reason(&self) -> &str {
        match self {
            Failure::Lost { reason, .. } | Failure::JobAborted { reason, .. } => reason,
            Failure::CollAborted(a) => &a.reason,
        }
    }
}

/// A message whose payload broke off before its announced end (its stream
/// or connection failed, or it ended early).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Broken(pub String);

impl std::fmt::Display for Broken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A message the mailbox refused to hold: its sender is beyond its
/// allowance of messages not yet received. The transport then cuts the
/// sender off (nothing it sends later may be delivered).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused(pub String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abort_payloads_round_trip_and_unknown_kinds_read_as_failures() {
        for kind in [AbortKind::Mismatch, AbortKind::Failed] {
            let mut p = vec![kind.to_wire()];
            p.extend_from_slice("rank 3 called broadcast".as_bytes());
            assert_eq!(
                AbortKind::parse(&p),
                (kind, "rank 3 called broadcast".to_string())
            );
        }
        assert_eq!(AbortKind::parse(b"Zwhy"), (AbortKind::Failed, "why".into()));
        assert_eq!(AbortKind::parse(b""), (AbortKind::Failed, String::new()));
    }
}
