//! The error type of rankmesh.
//!
//! Every error is a value that carries the facts a person needs to act on it:
//! which rank saw it, which operation (and sequence number) was running,
//! which peer is to blame, and what to do next. This module owns only the
//! type; it must not depend on any other module of the crate.

use std::fmt;
use std::time::Duration;

/// Result alias used throughout rankmesh.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong in rankmesh.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Error {
    /// A network or transport-level failure that is not attributable to a lost peer.
    Transport {
        /// Rank that observed the failure (`None` before a rank is assigned).
        rank: Option<usize>,
        /// What failed, with the underlying cause.
        detail: String,
    },
    /// A peer is gone: its process exited, its connection was closed or reset,
    /// or it stopped answering within the idle timeout.
    PeerLost {
        /// Rank that observed the loss.
        observer: usize,
        /// The lost rank.
        rank: usize,
        /// Where the lost rank ran (its address), when known.
        host: String,
        /// The operation that needed the lost rank.
        op: String,
        /// Why the peer is considered lost.
        reason: String,
    },
    /// A wait exceeded its bound.
    Timeout {
        /// Rank whose operation timed out.
        rank: usize,
        /// The operation (with its sequence number where it has one).
        op: String,
        /// The ranks it was still waiting on.
        waiting_on: Vec<usize>,
        /// How long it waited.
        after: Duration,
        /// What to change if the wait was legitimately long.
        hint: String,
    },
    /// Ranks disagree about a call: different lengths, types, ops or roots,
    /// or a different operation at the same sequence number.
    Mismatch {
        /// Rank that detected the mismatch.
        rank: usize,
        /// The operation on this rank.
        op: String,
        /// What differs, naming the ranks and both values.
        detail: String,
    },
    /// A caller passed arguments that cannot work (wrong lengths, rank out of range).
    InvalidArgument {
        /// Rank of the caller.
        rank: usize,
        /// The operation.
        op: String,
        /// What is wrong and what is expected.
        detail: String,
    },
    /// Authentication failed: wrong job token, foreign certificate, impersonation.
    Auth {
        /// What was rejected, and by whom.
        detail: String,
    },
    /// The peer speaks another protocol version or sent malformed data.
    Protocol {
        /// What was malformed or which versions differ.
        detail: String,
    },
    /// Cluster formation or a membership change failed.
    Membership {
        /// What failed (e.g. which ranks never joined).
        detail: String,
    },
    /// The job was aborted by a rank.
    Aborted {
        /// Rank that called abort.
        by_rank: usize,
        /// The reason it gave.
        reason: String,
    },
    /// A GPU backend failed.
    Gpu {
        /// What failed.
        detail: String,
    },
    /// A configuration value or environment variable is missing or invalid.
    Config {
        /// Which setting and what is expected.
        detail: String,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Transport { rank, detail } => match rank {
                Some(r) => write!(f, "rank {r}: transport error: {detail}"),
                None => write!(f, "transport error: {detail}"),
            },
            Error::PeerLost {
                observer,
                rank,
                host,
                op,
                reason,
            } => write!(
                f,
                "rank {observer}: {op}: peer rank {rank} ({host}) is lost: {reason}; \
                 check that process's output and exit status, then restart the job \
                 (or recover, for elastic jobs)"
            ),
            Error::Timeout {
                rank,
                op,
                waiting_on,
                after,
                hint,
            } => {
                let who = match waiting_on.as_slice() {
                    [] => "its peers".to_string(),
                    [r] => format!("rank {r}"),
                    many => format!("ranks {many:?}"),
                };
                write!(
                    f,
                    "rank {rank}: {op} timed out after {after:.1?} waiting on {who}; {hint}"
                )
            }
            Error::Mismatch { rank, op, detail } => {
                write!(
                    f,
                    "rank {rank}: {op}: ranks disagree: {detail}; every rank must make the \
                     same collective calls in the same order with matching arguments"
                )
            }
            Error::InvalidArgument { rank, op, detail } => {
                write!(f, "rank {rank}: {op}: invalid argument: {detail}")
            }
            Error::Auth { detail } => write!(f, "authentication failed: {detail}"),
            Error::Protocol { detail } => write!(f, "protocol error: {detail}"),
            Error::Membership { detail } => write!(f, "membership error: {detail}"),
            Error::Aborted { by_rank, reason } => {
                write!(f, "job aborted by rank {by_rank}: {reason}")
            }
            Error::Gpu { detail } => write!(f, "GPU error: {detail}"),
            Error::Config { detail } => write!(f, "configuration error: {detail}"),
        }
    }
}

impl std::error::Error for Error {}

impl Error {
    /// The rank that is to blame for this error, when one is known
    /// (the lost peer, or the rank that aborted).
    pub fn culprit(&self) -> Option<usize> {
        match self {
            Error::PeerLost { rank, .. } => Some(*rank),
            Error::Aborted { by_rank, .. } => Some(*by_rank),
            _ => None,
        }
    }

    pub(crate) fn config(detail: impl Into<String>) -> Self {
        Error::Config {
            detail: detail.into(),
        }
    }

    pub(crate) fn protocol(detail: impl Into<String>) -> Self {
        Error::Protocol {
            detail: detail.into(),
        }
    }

    pub(crate) fn auth(detail: impl Into<String>) -> Self {
        Error::Auth {
            detail: detail.into(),
        }
    }

    pub(crate) fn transport(rank: Option<usize>, detail: impl Into<String>) -> Self {
        Error::Transport {
            rank,
            detail: detail.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_rank_operation_and_remedy() {
        let e = Error::PeerLost {
            observer: 0,
            rank: 3,
            host: "10.0.0.4:4000".into(),
            op: "all_reduce seq 41".into(),
            reason: "connection reset".into(),
        };
        let s = e.to_string();
        assert!(s.contains("rank 0"), "{s}");
        assert!(s.contains("peer rank 3"), "{s}");
        assert!(s.contains("all_reduce seq 41"), "{s}");
        assert_eq!(e.culprit(), Some(3));

        let t = Error::Timeout {
            rank: 1,
            op: "recv".into(),
            waiting_on: vec![2],
            after: Duration::from_secs(3),
            hint: "raise Config::set_op_timeout".into(),
        };
        let s = t.to_string();
        assert!(
            s.contains("waiting on rank 2") && s.contains("set_op_timeout"),
            "{s}"
        );
    }

    #[test]
    fn error_is_send_sync_static() {
        fn check<E: std::error::Error + Send + Sync + 'static>() {}
        check::<Error>();
    }
}
