//! The collective ledger of a rank: which collectives were aborted (by
//! whom, why), the calls this rank finished recently on each communicator
//! (to catch a frame of a call that did not match, found after this rank
//! was done with it) and the last collective each peer sent a frame for.
//!
//! The mailbox asks it about every collective and abort frame on arrival
//! ([`CollCheck`]), under the mailbox's lock; the ledger's own lock is
//! always taken after the mailbox's, never before.

use crate::transport::keyhash::HashMap;
use crate::transport::{Abort, AbortKind, CollCheck, CollKey, CollVerdict, Failure};
use crate::wire::{CollDesc, Header};
use std::collections::BTreeMap;
use std::sync::Mutex;

/// A collective call that did not match another rank's call with the same
/// sequence number, found after this rank had finished its part.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct LateMismatch {
    /// Sequence number of the call.
    pub seq: u64,
    /// World rank that made the other call.
    pub src: u32,
    /// Its call.
    pub theirs: CollDesc,
    /// This rank's call.
    pub mine: CollDesc,
}

impl LateMismatch {
    /// As a failure of the receives of later calls.
    fn failure(&self) -> Failure {
        Failure::CollAborted(Abort {
            by: self.src as usize,
            kind: AbortKind::Mismatch,
            reason: format!(
                "collective #{} did not match: world rank {} called {}, this rank called {}",
                self.seq, self.src, self.theirs, self.mine
            ),
        })
    }
}

/// Recent collective calls of one communicator, to catch frames that do not
/// match a call this rank already finished (e.g. two ranks that both think
/// they are the root of a broadcast only send, so neither receives the
/// other's frame in the call itself).
#[derive(Default)]
struct Calls {
    recent: BTreeMap<u64, CollDesc>,
    late: Option<LateMismatch>,
    /// Highest sequence number a frame arrived for, per sender.
    seen: HashMap<u32, u64>,
    /// Calls a rank aborted: who and why (the latest [`RECENT_CALLS`]).
    aborted: BTreeMap<u64, Abort>,
}

/// How many finished (and how many aborted) calls per communicator are
/// remembered: the ledger is bounded by this window and by the
/// communicators alive, not by the job's length.
const RECENT_CALLS: usize = 64;

#[derive(Default)]
struct State {
    /// Calls per (comm_id, epoch), while the communicator lives.
    calls: HashMap<(u64, u32), Calls>,
}

impl State {
    fn aborted(&self, comm_id: u64, epoch: u32, seq: u64) -> Option<&Abort> {
        self.calls.get(&(comm_id, epoch))?.aborted.get(&seq)
    }
}

/// The ledger of one rank's world (all its communicators).
#[derive(Default)]
pub(crate) struct Ledger {
    state: Mutex<State>,
}

impl Ledger {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Every update is a single insert/remove: poisoning is ignored.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A collective call is starting: the mismatch found late in an
    /// earlier call of this communicator, if any (the caller reports it).
    pub(crate) fn begin_coll(&self, comm_id: u64, epoch: u32) -> Option<LateMismatch> {
        self.lock()
            .calls
            .get(&(comm_id, epoch))
            .and_then(|c| c.late.clone())
    }

    /// This rank finished its part of call `seq`, described by `mine`:
    /// from now on its frames are checked on arrival. (Frames of it that
    /// arrived before are checked by [`Ledger::check_stray`].)
    pub(crate) fn finished(&self, comm_id: u64, epoch: u32, seq: u64, mine: CollDesc) {
        let mut st = self.lock();
        let calls = st.calls.entry((comm_id, epoch)).or_default();
        calls.recent.insert(seq, mine);
        while calls.recent.len() > RECENT_CALLS {
            calls.recent.pop_first();
        }
    }

    /// Frames of finished call `seq` that were never expected (taken from
    /// the mailbox): the first that describes a different call than
    /// `mine`, if any.
    pub(crate) fn check_stray(
        &self,
        seq: u64,
        mine: CollDesc,
        stray: &[(u32, Header)],
    ) -> Option<LateMismatch> {
        stray.iter().find_map(|(src, h)| {
            let theirs = CollDesc::of(h);
            (theirs != mine).then_some(LateMismatch {
                seq,
                src: *src,
                theirs,
                mine,
            })
        })
    }

    /// Record `abort` of collective `seq` (a peer's, or this rank's own);
    /// `false` if one was recorded already.
    pub(crate) fn abort(&self, comm_id: u64, epoch: u32, seq: u64, abort: Abort) -> bool {
        let mut st = self.lock();
        let aborted = &mut st.calls.entry((comm_id, epoch)).or_default().aborted;
        if aborted.contains_key(&seq) {
            return false;
        }
        aborted.insert(seq, abort);
        while aborted.len() > RECENT_CALLS {
            aborted.pop_first();
        }
        true
    }

    /// The abort recorded for collective `seq`, if any.
    pub(crate) fn coll_abort(&self, comm_id: u64, epoch: u32, seq: u64) -> Option<Abort> {
        self.lock().aborted(comm_id, epoch, seq).cloned()
    }

    /// Forget communicator `comm_id` at `epoch` (it was dropped).
    pub(crate) fn forget_comm(&self, comm_id: u64, epoch: u32) {
        let gone = self.lock().calls.remove(&(comm_id, epoch));
        drop(gone);
    }

    /// Communicators with records (for leak tests).
    #[cfg(test)]
    pub(crate) fn comms(&self) -> usize {
        self.lock().calls.len()
    }

    /// The highest collective sequence number each sender sent a frame for
    /// on (`comm_id`, `epoch`), by world rank.
    pub(crate) fn last_seen(&self, comm_id: u64, epoch: u32) -> Vec<(u32, u64)> {
        let st = self.lock();
        let mut v: Vec<(u32, u64)> = st
            .calls
            .get(&(comm_id, epoch))
            .map(|c| c.seen.iter().map(|(&k, &v)| (k, v)).collect())
            .unwrap_or_default();
        v.sort_unstable();
        v
    }
}

impl CollCheck for Ledger {
    fn frame(&self, h: &Header) -> CollVerdict {
        let mut st = self.lock();
        let st = &mut *st;
        let calls = st.calls.entry((h.comm_id, h.epoch)).or_default();
        let seen = calls.seen.entry(h.src).or_insert(h.seq);
        *seen = (*seen).max(h.seq);
        // A frame for a call this rank finished is checked even if that
        // call was aborted since: it may be the evidence of a mismatch.
        if let Some(mine) = calls.recent.get(&h.seq).copied() {
            let theirs = CollDesc::of(h);
            if theirs != mine && calls.late.is_none() {
                let late = LateMismatch {
                    seq: h.seq,
                    src: h.src,
                    theirs,
                    mine,
                };
                let failure = late.failure();
                calls.late = Some(late);
                // This and every later collective of the communicator fail.
                return CollVerdict::DropAndFail { seq: None, failure };
            }
            return CollVerdict::Drop;
        }
        if calls.aborted.contains_key(&h.seq) {
            return CollVerdict::Drop;
        }
        CollVerdict::Deliver
    }

    fn aborted(&self, h: &Header, kind: AbortKind, reason: String) -> CollVerdict {
        let abort = Abort {
            by: h.src as usize,
            kind,
            reason,
        };
        if !self.abort(h.comm_id, h.epoch, h.seq, abort.clone()) {
            return CollVerdict::Drop;
        }
        CollVerdict::DropAndFail {
            seq: Some(h.seq),
            failure: Failure::CollAborted(abort),
        }
    }

    fn before_wait(&self, key: &CollKey) -> Option<Failure> {
        let st = self.lock();
        let calls = st.calls.get(&(key.comm_id, key.epoch))?;
        match calls.aborted.get(&key.seq) {
            Some(a) => Some(Failure::CollAborted(a.clone())),
            None => calls.late.as_ref().map(LateMismatch::failure),
        }
    }
}
