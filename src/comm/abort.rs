//! A failed collective: the error it returns (naming the rank that caused
//! it where one did), and the abort notices that tell the other members.

use super::ledger::LateMismatch;
use super::Communicator;
use crate::coll::exec::ExecError;
use crate::transport::{Abort, AbortKind, Failure, Payload};
use crate::wire::{FrameKind, Header};
use crate::Error;
use bytes::Bytes;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// Longest explanation an Abort frame carries.
const ABORT_TEXT_MAX: usize = 4096;

/// How long a failing rank spends telling the others.
const ABORT_NOTICE: Duration = Duration::from_secs(2);

/// How long a rank whose collective timed out waits for the rank it was
/// waiting on to explain its own timeout.
const TIMEOUT_GRACE: Duration = Duration::from_secs(1);

/// How long a rank that lost a peer mid-collective waits for that peer's
/// explanation (it may have refused the call just before it left).
const LOST_GRACE: Duration = Duration::from_millis(300);

impl Communicator {
    /// The error of a failed collective (`None`: it timed out), after
    /// telling the other members why when they need to know.
    pub(super) async fn failed(
        &self,
        seq: u64,
        op: String,
        failure: Option<ExecError>,
        waiting: &AtomicUsize,
        limit: Duration,
    ) -> Error {
        let me = self.rank();
        let (err, notice) = match failure {
            None => {
                let w = waiting.load(Ordering::Relaxed);
                let waiting_on = if w == usize::MAX { Vec::new() } else { vec![w] };
                let e = Error::Timeout {
                    rank: me,
                    op: op.clone(),
                    waiting_on,
                    after: limit,
                    hint: format!(
                        "a rank did not make the matching call (or is stuck); check that \
                         every rank calls the same collectives in the same order, or raise \
                         Config::set_op_timeout (RANKMESH_OP_TIMEOUT); this rank's recent \
                         operations: {}",
                        self.inner.world.recorder.flight_path().display()
                    ),
                };
                // Tell the others first, then give the rank this one waits
                // on a moment to explain itself: in a chain of waiting
                // ranks, every one times out at about the same time, and
                // only the last one knows the culprit.
                self.send_abort(seq, AbortKind::Failed, &e.to_string())
                    .await;
                let e = match self.abort_from(seq, w, TIMEOUT_GRACE).await {
                    Some(a) => Error::Aborted {
                        by_rank: w,
                        reason: format!("{op}: {}", a.reason),
                    },
                    None => e,
                };
                self.record_abort(seq, AbortKind::Failed, &e.to_string());
                (e, None)
            }
            Some(ExecError::Mismatch { detail, .. }) => {
                let n = Some((AbortKind::Mismatch, detail.clone()));
                (
                    Error::Mismatch {
                        rank: me,
                        op: op.clone(),
                        detail,
                    },
                    n,
                )
            }
            Some(ExecError::Device { detail }) => {
                let e = Error::Gpu {
                    detail: format!("rank {me}: {op}: {detail}"),
                };
                let n = Some((AbortKind::Failed, e.to_string()));
                (e, n)
            }
            Some(ExecError::Broken { peer, detail }) => {
                let e = Error::Transport {
                    rank: Some(me),
                    detail: format!("{op}: the message from rank {peer} broke off: {detail}"),
                };
                let n = Some((AbortKind::Failed, e.to_string()));
                (e, n)
            }
            Some(ExecError::Peer {
                failure: failure @ Failure::JobAborted { .. },
            }) => {
                // The whole job was aborted: every rank heard it already.
                (self.lost(&op, failure), None)
            }
            Some(ExecError::Peer {
                failure: Failure::CollAborted(a),
            }) => {
                let by = self.comm_rank_of(a.by).unwrap_or(a.by);
                let why = a.reason;
                // Pass the notice on: a peer waiting on this rank must not
                // mistake its exit for the cause.
                let (e, text) = if a.kind == AbortKind::Mismatch {
                    let detail = format!("reported by rank {by}: {why}");
                    let e = Error::Mismatch {
                        rank: me,
                        op: op.clone(),
                        detail: detail.clone(),
                    };
                    (e, detail)
                } else {
                    // If this rank was itself still waiting on another one,
                    // say so: the rank that gave up first may only have been
                    // waiting on this one, and the culprit is further down.
                    let w = waiting.load(Ordering::Relaxed);
                    let also = if w != usize::MAX && w != by {
                        format!("; rank {me} was itself still waiting on rank {w}")
                    } else {
                        String::new()
                    };
                    let e = Error::Aborted {
                        by_rank: by,
                        reason: format!("{op}: {why}{also}"),
                    };
                    let t = e.to_string();
                    (e, t)
                };
                (e, Some((a.kind, text)))
            }
            Some(ExecError::Peer { failure, .. }) => {
                // A rank that refused this call tells the others and then
                // may leave at once: its notice can arrive after its
                // departure was seen. The notice names the cause.
                let explained = match self.comm_rank_of(failure.rank()) {
                    Some(by) => self.abort_from(seq, by, LOST_GRACE).await.map(|a| (by, a)),
                    None => None,
                };
                let e = match explained {
                    Some((by, a)) if a.kind == AbortKind::Mismatch => Error::Mismatch {
                        rank: me,
                        op: op.clone(),
                        detail: format!("reported by rank {by}: {}", a.reason),
                    },
                    Some((by, a)) => Error::Aborted {
                        by_rank: by,
                        reason: format!("{op}: {}", a.reason),
                    },
                    None => self.lost(&op, failure),
                };
                let n = Some((AbortKind::Failed, e.to_string()));
                (e, n)
            }
        };
        if let Some((kind, text)) = notice {
            self.abort_collective(seq, kind, &text).await;
        }
        err
    }

    /// A peer that aborted this collective explains every other failure of
    /// it (a send to a rank that left after aborting fails too, but the
    /// abort names the cause).
    pub(super) fn root_cause(&self, seq: u64, e: ExecError) -> ExecError {
        let (comm_id, epoch) = (self.inner.comm_id, self.inner.epoch);
        match self.inner.world.ledger.coll_abort(comm_id, epoch, seq) {
            Some(a) if !matches!(e, ExecError::Mismatch { .. }) => ExecError::Peer {
                failure: Failure::CollAborted(a),
            },
            _ => e,
        }
    }

    pub(super) fn late_mismatch(&self, op: &str, late: LateMismatch) -> Error {
        let src = self
            .comm_rank_of(late.src as usize)
            .unwrap_or(late.src as usize);
        Error::Mismatch {
            rank: self.rank(),
            op: op.to_string(),
            detail: format!(
                "collective #{} did not match: rank {src} called {}, rank {} called {}",
                late.seq,
                late.theirs,
                self.rank(),
                late.mine
            ),
        }
    }

    /// Record that this rank abandoned collective `seq` and tell every other
    /// member, so that none of them waits for it.
    pub(super) async fn abort_collective(&self, seq: u64, kind: AbortKind, text: &str) {
        self.record_abort(seq, kind, text);
        self.send_abort(seq, kind, text).await;
    }

    pub(super) fn record_abort(&self, seq: u64, kind: AbortKind, text: &str) {
        let abort = Abort {
            by: self.world_rank(self.rank()),
            kind,
            reason: text.to_string(),
        };
        let (comm_id, epoch) = (self.inner.comm_id, self.inner.epoch);
        if self
            .inner
            .world
            .ledger
            .abort(comm_id, epoch, seq, abort.clone())
        {
            let failure = Failure::CollAborted(abort);
            self.transport()
                .mailbox()
                .fail_coll(comm_id, epoch, seq, &failure);
        }
    }

    pub(super) async fn send_abort(&self, seq: u64, kind: AbortKind, text: &str) {
        // Far below the eager limit, so that receivers read it in one piece.
        let mut cut = text.len().min(ABORT_TEXT_MAX);
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        let text = &text[..cut];
        let t = self.transport();
        let me = self.world_rank(self.rank());
        let mut payload = Vec::with_capacity(text.len() + 1);
        payload.push(kind.to_wire());
        payload.extend_from_slice(text.as_bytes());
        let payload = Bytes::from(payload);
        let mut h = Header::new(
            FrameKind::Abort,
            me as u32,
            self.inner.comm_id,
            self.inner.epoch,
        );
        h.seq = seq;
        h.len = payload.len() as u64;
        let sends: Vec<_> = self
            .inner
            .members
            .iter()
            .filter(|&&w| w != me)
            .map(|&w| t.send(w, h, Payload::Owned(vec![payload.clone()]), None))
            .collect();
        let all = async {
            for s in sends {
                let _ = s.await;
            }
        };
        let _ = tokio::time::timeout(ABORT_NOTICE, all).await;
    }

    /// Wait up to `grace` for communicator rank `peer` to abort collective
    /// `seq`; its abort if it did.
    pub(super) async fn abort_from(&self, seq: u64, peer: usize, grace: Duration) -> Option<Abort> {
        let world = *self.inner.members.get(peer)?;
        let ledger = &self.inner.world.ledger;
        let until = tokio::time::Instant::now() + grace;
        loop {
            match ledger.coll_abort(self.inner.comm_id, self.inner.epoch, seq) {
                Some(a) if a.by == world => return Some(a),
                Some(_) => return None,
                None if tokio::time::Instant::now() >= until => return None,
                None => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }
}
