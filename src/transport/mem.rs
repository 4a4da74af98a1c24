//! In-process transport: every rank's mailbox is reachable directly.
//!
//! Deterministic and fast, for tests of everything above the transport. It
//! moves the same frames as the QUIC transport, so the code under test is the
//! same; only the wire is missing.

use super::{BoxFut, Failure, Incoming, Mailbox, Payload, Stamp, Transport};
use crate::wire::Header;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

struct Fabric {
    mailboxes: Vec<Mailbox>,
    down: Vec<AtomicBool>,
}

/// One rank's end of an in-process fabric.
pub struct MemTransport {
    rank: usize,
    fabric: Arc<Fabric>,
}

impl MemTransport {
    /// Create `n` connected ranks.
    pub fn fabric(n: usize) -> Vec<MemTransport> {
        MemTransport::fabric_with_limit(n, u64::MAX)
    }

    /// Create `n` connected ranks whose mailboxes hold at most
    /// `unexpected_limit` bytes of one sender's unreceived messages.
    pub fn fabric_with_limit(n: usize, unexpected_limit: u64) -> Vec<MemTransport> {
        let fabric = Arc::new(Fabric {
            mailboxes: (0..n)
                .map(|_| Mailbox::with_unexpected_limit(unexpected_limit))
                .collect(),
            down: (0..n).map(|_| AtomicBool::new(false)).collect(),
        });
        (0..n)
            .map(|rank| MemTransport {
                rank,
                fabric: fabric.clone(),
            })
            .collect()
    }
}

impl Transport for MemTransport {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.fabric.mailboxes.len()
    }

    fn send<'a>(
        &'a self,
        dst: usize,
        mut header: Header,
        payload: Payload<'a>,
        stamp: Stamp<'a>,
    ) -> BoxFut<'a, Result<(), Failure>> {
        Box::pin(async move {
            let Some(mb) = self.fabric.mailboxes.get(dst) else {
                return Err(Failure::lost(
                    dst,
                    format!("no rank {dst} in a world of {}", self.size()),
                ));
            };
            if self.fabric.down[dst].load(Ordering::Acquire) {
                return Err(Failure::lost(dst, "rank has shut down"));
            }
            let Some(chunks) = payload.collect().await else {
                return Err(Failure::lost(
                    self.rank,
                    "this rank's payload producer stopped early",
                ));
            };
            if let Some(s) = stamp {
                header.sub = s();
            }
            // The receiver refuses what exceeds its allowance for this
            // sender: the sender learns it as a failure of this send.
            mb.deliver(Incoming::from_chunks(header, chunks))
                .map_err(|why| {
                    mb.fail_peer(self.rank, &why.0);
                    Failure::lost(dst, format!("rank {dst} refused it: {why}"))
                })
        })
    }

    fn connected(&self, rank: usize) -> bool {
        rank < self.size()
    }

    fn mailbox(&self) -> &Mailbox {
        &self.fabric.mailboxes[self.rank]
    }

    fn peer_location(&self, rank: usize) -> String {
        format!("in-process rank {rank}")
    }

    fn path(&self, _rank: usize) -> super::PeerPath {
        super::PeerPath::InProcess
    }

    fn shutdown(&self, graceful: bool) -> BoxFut<'_, ()> {
        Box::pin(async move {
            if self.fabric.down[self.rank].swap(true, Ordering::AcqRel) {
                return;
            }
            let reason = if graceful {
                "the rank finalized before sending this message"
            } else {
                "the rank stopped after an error"
            };
            // A rank that ends after a job abort passes the abort on, as the
            // QUIC transport does with its close code.
            let abort = self.mailbox().job_abort();
            for (r, mb) in self.fabric.mailboxes.iter().enumerate() {
                if r != self.rank {
                    if let Some((by, why)) = &abort {
                        mb.abort_job(*by, why);
                    }
                    mb.fail_peer(self.rank, reason);
                }
            }
        })
    }
}
