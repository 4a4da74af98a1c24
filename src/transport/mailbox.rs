//! Matching received messages with the operations that wait for them.
//!
//! Collective messages are matched by an exact key (source, communicator,
//! epoch, sequence number, step). Point-to-point messages are matched per
//! (source, communicator, epoch, tag) in the order the sender numbered them,
//! so messages of one tag never overtake each other even though each travels
//! on its own stream. Messages that arrive before their receive is posted
//! wait here; receives that are posted first wait for their message.
//!
//! A peer that is lost (or has finalized) fails every receive that still
//! needs it; messages it delivered before that are still handed out.

use super::failure::{Abort, AbortKind, Failure, Refused};
use super::incoming::{Charge, Incoming, HELD_OVERHEAD};
use super::keyhash::HashMap;
use super::spin::Spin;
use crate::wire::{CollDesc, FrameKind, Header};
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::oneshot;

/// Key of a collective message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CollKey {
    /// Sender's world rank.
    pub src: u32,
    /// Communicator id.
    pub comm_id: u64,
    /// Epoch.
    pub epoch: u32,
    /// Sequence number of the collective on that communicator.
    pub seq: u64,
    /// Step/chunk within the collective.
    pub sub: u64,
}

/// A collective call that did not match another rank's call with the same
/// sequence number, found after this rank had finished its part.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LateMismatch {
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
}

/// How many finished calls per communicator are remembered.
const RECENT_CALLS: usize = 64;

/// Key of a point-to-point stream of messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct P2pKey {
    /// Sender's world rank.
    pub src: u32,
    /// Communicator id.
    pub comm_id: u64,
    /// Epoch.
    pub epoch: u32,
    /// User tag.
    pub tag: u64,
}
type Reply = oneshot::Sender<Result<Incoming, Failure>>;

enum Slot {
    Ready(Incoming),
    Waiting(Reply),
}

#[derive(Default)]
struct P2pQueue {
    /// Next message number expected from the sender.
    next: u64,
    /// Messages in order, ready to hand out.
    ready: VecDeque<Incoming>,
    /// Messages that overtook an earlier one in transit (`None`: the sender
    /// cancelled that message number; it is skipped).
    early: BTreeMap<u64, Option<Incoming>>,
    /// Receives waiting, in the order they were posted.
    waiters: VecDeque<Reply>,
}

impl P2pQueue {
    fn dispatch(&mut self) {
        while !self.ready.is_empty() {
            let Some(w) = self.waiters.pop_front() else {
                return;
            };
            if w.is_closed() {
                continue;
            }
            if let Some(m) = self.ready.pop_front() {
                if let Err(Ok(m)) = w.send(Ok(m)) {
                    self.ready.push_front(m);
                }
            }
        }
    }
}

#[derive(Default)]
struct State {
    coll: HashMap<CollKey, Slot>,
    p2p: HashMap<P2pKey, P2pQueue>,
    gone: HashMap<u32, String>,
    /// Collectives (comm_id, epoch, seq) a rank aborted: who and why.
    aborted: HashMap<(u64, u32, u64), Abort>,
    /// Calls per (comm_id, epoch).
    calls: HashMap<(u64, u32), Calls>,
    /// The job was aborted: by which world rank, and why.
    job_abort: Option<(u32, String)>,
    /// Bytes of each sender's messages held in memory (see [`Charge`]).
    held: HashMap<u32, Arc<AtomicU64>>,
    /// Reasons peers gave for going, not yet failed (see [`Mailbox::explain`]).
    explained: HashMap<u32, String>,
}

impl State {
    fn job_failure(&self) -> Option<Failure> {
        self.job_abort
            .as_ref()
            .map(|(by, why)| Failure::JobAborted {
                by: *by as usize,
                reason: why.clone(),
            })
    }

    fn aborted_failure(&self, k: &CollKey) -> Option<Failure> {
        self.aborted
            .get(&(k.comm_id, k.epoch, k.seq))
            .map(|a| Failure::CollAborted(a.clone()))
    }
}

/// Received messages of one rank, waiting to be matched.
pub struct Mailbox {
    state: Mutex<State>,
    /// Most bytes of one sender's messages held before their receive.
    unexpected_limit: u64,
    /// Polling of receives before they sleep.
    spin: Spin,
}

impl Default for Mailbox {
    fn default() -> Mailbox {
        Mailbox::with_unexpected_limit(u64::MAX)
    }
}

enum Key {
    Coll(CollKey),
    P2p(P2pKey),
}

/// Removes a cancelled receive from the mailbox, returning a message it may
/// already have been handed so that nothing is lost.
struct Pending<'a> {
    mb: &'a Mailbox,
    key: Key,
    rx: Option<oneshot::Receiver<Result<Incoming, Failure>>>,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        let Some(mut rx) = self.rx.take() else { return };
        rx.close();
        let got = rx.try_recv().ok().and_then(|r| r.ok());
        let mut st = self.mb.lock();
        match &self.key {
            Key::Coll(k) => match got {
                Some(m) => {
                    st.coll.insert(*k, Slot::Ready(m));
                }
                None => {
                    if matches!(st.coll.get(k), Some(Slot::Waiting(_))) {
                        st.coll.remove(k);
                    }
                }
            },
            Key::P2p(k) => {
                if let Some(q) = st.p2p.get_mut(k) {
                    if let Some(m) = got {
                        q.ready.push_front(m);
                    }
                    q.waiters.retain(|w| !w.is_closed());
                    q.dispatch();
                }
            }
        }
    }
}

impl Mailbox {
    /// An empty mailbox.
    pub fn new() -> Mailbox {
        Mailbox::default()
    }

    /// An empty mailbox that holds at most `limit` bytes of one sender's
    /// in-memory messages before they are received
    /// ([`crate::Config::set_max_unexpected_bytes`]).
    pub fn with_unexpected_limit(limit: u64) -> Mailbox {
        Mailbox {
            state: Mutex::new(State::default()),
            unexpected_limit: limit,
            spin: Spin::new(Duration::ZERO),
        }
    }

    /// The same mailbox, with receives that poll for up to `window` before
    /// sleeping ([`crate::Config::set_spin_wait`]).
    pub fn with_spin_wait(mut self, window: Duration) -> Mailbox {
        self.spin = Spin::new(window);
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the maps inconsistent
        // (every update is a single insert/remove), so poisoning is ignored.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hand a received message to its receive (or keep it until one is posted).
    ///
    /// A message held in memory counts against its sender's allowance until
    /// it is received or dropped; a message beyond it is refused with the
    /// reason (the transport then cuts the sender off: nothing it sends
    /// after a refused message may be delivered).
    pub fn deliver(&self, mut m: Incoming) -> Result<(), Refused> {
        let h = *m.header();
        let mut st = self.lock();
        let in_memory = m
            .in_memory()
            .map(|q| q.iter().map(|c| c.len() as u64).sum::<u64>());
        if let (FrameKind::Coll | FrameKind::P2p, Some(payload)) = (h.kind, in_memory) {
            // Payload plus what keeping any message costs (so that a flood
            // of empty messages is bounded too).
            let bytes = payload + HELD_OVERHEAD;
            let held = st.held.entry(h.src).or_default().clone();
            // Dropped with the refused message, or kept with the message.
            let (charge, now) = Charge::take(held, bytes);
            if now > self.unexpected_limit {
                return Err(Refused(format!(
                    "rank {} sent more than {} bytes of messages that their destination has \
                     not received yet (Config::set_max_unexpected_bytes); post the receives \
                     sooner, or raise the limit on every rank",
                    h.src, self.unexpected_limit
                )));
            }
            m.hold(charge);
        }
        match h.kind {
            FrameKind::Abort => {
                let why: Vec<u8> = match m.in_memory() {
                    Some(q) => q.iter().flat_map(|c| c.iter().copied()).collect(),
                    None => Vec::new(),
                };
                let (kind, reason) = AbortKind::parse(&why);
                let abort = Abort {
                    by: h.src as usize,
                    kind,
                    reason,
                };
                self.abort_locked(&mut st, h.comm_id, h.epoch, h.seq, abort);
            }
            // A frame for a call this rank finished is checked even if that
            // call was aborted since: it may be the evidence of a mismatch.
            FrameKind::Coll if Self::saw(&mut st, &h) && Self::late_frame(&mut st, &h) => {}
            FrameKind::Coll if st.aborted.contains_key(&(h.comm_id, h.epoch, h.seq)) => {}
            FrameKind::Coll => {
                let key = CollKey {
                    src: h.src,
                    comm_id: h.comm_id,
                    epoch: h.epoch,
                    seq: h.seq,
                    sub: h.sub,
                };
                match st.coll.remove(&key) {
                    Some(Slot::Waiting(w)) => {
                        if let Err(Ok(m)) = w.send(Ok(m)) {
                            st.coll.insert(key, Slot::Ready(m));
                        }
                    }
                    Some(Slot::Ready(old)) => {
                        // A duplicate key means a confused or hostile sender;
                        // keep the first message, drop the second.
                        tracing::warn!(
                            src = h.src,
                            seq = h.seq,
                            sub = h.sub,
                            "duplicate collective frame dropped"
                        );
                        st.coll.insert(key, Slot::Ready(old));
                    }
                    None => {
                        st.coll.insert(key, Slot::Ready(m));
                    }
                }
            }
            FrameKind::P2p | FrameKind::Skip => {
                let key = P2pKey {
                    src: h.src,
                    comm_id: h.comm_id,
                    epoch: h.epoch,
                    tag: h.seq,
                };
                let q = st.p2p.entry(key).or_default();
                if h.sub < q.next || q.early.contains_key(&h.sub) {
                    tracing::warn!(
                        src = h.src,
                        tag = h.seq,
                        n = h.sub,
                        "duplicate p2p frame dropped"
                    );
                    return Ok(());
                }
                let m = (h.kind == FrameKind::P2p).then_some(m);
                if h.sub == q.next {
                    q.ready.extend(m);
                    q.next += 1;
                    while let Some(m) = q.early.remove(&q.next) {
                        q.ready.extend(m);
                        q.next += 1;
                    }
                } else {
                    q.early.insert(h.sub, m);
                }
                q.dispatch();
            }
            FrameKind::Bye => {}
        }
        Ok(())
    }

    /// A frame for a call this rank already finished: remember the
    /// mismatch (which poisons the communicator: this and every later
    /// collective on it fail) and drop the frame.
    /// Note the sequence number of a collective frame from its sender
    /// (always true, to chain in a match guard).
    fn saw(st: &mut State, h: &Header) -> bool {
        let seen = st
            .calls
            .entry((h.comm_id, h.epoch))
            .or_default()
            .seen
            .entry(h.src)
            .or_insert(h.seq);
        *seen = (*seen).max(h.seq);
        true
    }

    /// The highest collective sequence number each sender sent a frame for
    /// on (`comm_id`, `epoch`).
    pub fn last_seen(&self, comm_id: u64, epoch: u32) -> Vec<(u32, u64)> {
        let st = self.lock();
        let mut v: Vec<(u32, u64)> = st
            .calls
            .get(&(comm_id, epoch))
            .map(|c| c.seen.iter().map(|(&k, &v)| (k, v)).collect())
            .unwrap_or_default();
        v.sort_unstable();
        v
    }

    fn late_frame(st: &mut State, h: &Header) -> bool {
        let Some(calls) = st.calls.get_mut(&(h.comm_id, h.epoch)) else {
            return false;
        };
        let Some(mine) = calls.recent.get(&h.seq).copied() else {
            return false;
        };
        let theirs = CollDesc::of(h);
        if theirs != mine && calls.late.is_none() {
            calls.late = Some(LateMismatch {
                seq: h.seq,
                src: h.src,
                theirs,
                mine,
            });
            let failure = calls.late.as_ref().map(LateMismatch::failure);
            let waiting: Vec<CollKey> = st
                .coll
                .iter()
                .filter(|(k, s)| {
                    k.comm_id == h.comm_id && k.epoch == h.epoch && matches!(s, Slot::Waiting(_))
                })
                .map(|(k, _)| *k)
                .collect();
            for k in waiting {
                if let (Some(Slot::Waiting(w)), Some(f)) = (st.coll.remove(&k), failure.clone()) {
                    let _ = w.send(Err(f));
                }
            }
        }
        true
    }

    /// A collective call is starting: returns the mismatch found late in an
    /// earlier call of this communicator, if any (the caller reports it).
    pub fn begin_coll(&self, comm_id: u64, epoch: u32) -> Option<LateMismatch> {
        let st = self.lock();
        st.calls.get(&(comm_id, epoch)).and_then(|c| c.late.clone())
    }

    /// This rank finished its part of call `seq` described by `mine`. Frames
    /// of it still held were never expected: if one describes a different
    /// call, that is returned; later frames are checked on arrival.
    pub fn end_coll(
        &self,
        comm_id: u64,
        epoch: u32,
        seq: u64,
        mine: CollDesc,
    ) -> Option<LateMismatch> {
        let mut st = self.lock();
        let stray: Vec<CollKey> = st
            .coll
            .keys()
            .filter(|k| k.comm_id == comm_id && k.epoch == epoch && k.seq == seq)
            .copied()
            .collect();
        let mut found = None;
        for k in stray {
            if let Some(Slot::Ready(m)) = st.coll.remove(&k) {
                let theirs = CollDesc::of(m.header());
                if theirs != mine && found.is_none() {
                    found = Some(LateMismatch {
                        seq,
                        src: k.src,
                        theirs,
                        mine,
                    });
                }
            }
        }
        let calls = st.calls.entry((comm_id, epoch)).or_default();
        calls.recent.insert(seq, mine);
        while calls.recent.len() > RECENT_CALLS {
            calls.recent.pop_first();
        }
        found
    }

    /// Record that a rank aborted collective `seq` (this rank, for its own
    /// abort): every receive waiting on it fails with the abort, and frames
    /// of it still held or still arriving are dropped.
    pub fn abort_coll(&self, comm_id: u64, epoch: u32, seq: u64, abort: Abort) {
        let mut st = self.lock();
        self.abort_locked(&mut st, comm_id, epoch, seq, abort);
    }

    fn abort_locked(&self, st: &mut State, comm_id: u64, epoch: u32, seq: u64, abort: Abort) {
        if st.aborted.contains_key(&(comm_id, epoch, seq)) {
            return;
        }
        st.aborted.insert((comm_id, epoch, seq), abort);
        let hit: Vec<CollKey> = st
            .coll
            .keys()
            .filter(|k| k.comm_id == comm_id && k.epoch == epoch && k.seq == seq)
            .copied()
            .collect();
        for k in hit {
            if let Some(Slot::Waiting(w)) = st.coll.remove(&k) {
                if let Some(f) = st.aborted_failure(&k) {
                    let _ = w.send(Err(f));
                }
            }
        }
    }

    /// The abort recorded for collective `seq`, if any.
    pub fn coll_abort(&self, comm_id: u64, epoch: u32, seq: u64) -> Option<Abort> {
        self.lock().aborted.get(&(comm_id, epoch, seq)).cloned()
    }

    /// Wait for the collective message `key`.
    pub async fn recv_coll(&self, key: CollKey) -> Result<Incoming, Failure> {
        let rx = {
            let mut st = self.lock();
            if let Some(Slot::Ready(_)) = st.coll.get(&key) {
                if let Some(Slot::Ready(m)) = st.coll.remove(&key) {
                    return Ok(m);
                }
            }
            if let Some(f) = st.job_failure().or_else(|| st.aborted_failure(&key)) {
                return Err(f);
            }
            let late = st
                .calls
                .get(&(key.comm_id, key.epoch))
                .and_then(|c| c.late.as_ref());
            if let Some(late) = late {
                return Err(late.failure());
            }
            if let Some(reason) = st.gone.get(&key.src) {
                return Err(Failure::lost(key.src as usize, reason.clone()));
            }
            let (tx, rx) = oneshot::channel();
            st.coll.insert(key, Slot::Waiting(tx));
            rx
        };
        self.wait(Key::Coll(key), key.src, rx).await
    }

    /// Wait for the next point-to-point message of `key`.
    pub async fn recv_p2p(&self, key: P2pKey) -> Result<Incoming, Failure> {
        let rx = {
            let mut st = self.lock();
            let gone = st.gone.get(&key.src).cloned();
            let q = st.p2p.entry(key).or_default();
            if q.waiters.is_empty() {
                if let Some(m) = q.ready.pop_front() {
                    return Ok(m);
                }
            }
            if let Some(f) = st.job_failure() {
                return Err(f);
            }
            let q = st.p2p.entry(key).or_default();
            if let Some(reason) = gone {
                return Err(Failure::lost(key.src as usize, reason));
            }
            let (tx, rx) = oneshot::channel();
            q.waiters.push_back(tx);
            q.dispatch();
            rx
        };
        self.wait(Key::P2p(key), key.src, rx).await
    }

    async fn wait(
        &self,
        key: Key,
        src: u32,
        rx: oneshot::Receiver<Result<Incoming, Failure>>,
    ) -> Result<Incoming, Failure> {
        let mut pending = Pending {
            mb: self,
            key,
            rx: Some(rx),
        };
        let closed = || Failure::lost(src as usize, "this rank's transport shut down");
        let Some(rx) = pending.rx.as_mut() else {
            return Err(closed());
        };
        let res = match self.spin.poll(rx).await {
            Some(got) => got,
            None => rx.await.ok(),
        };
        pending.rx = None;
        res.unwrap_or_else(|| Err(closed()))
    }

    /// How many receives found their message by polling, not sleeping
    /// ([`crate::Config::set_spin_wait`]).
    #[cfg(test)]
    pub(crate) fn polled_receives(&self) -> u64 {
        self.spin.hits.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// How long a receive polls before it sleeps.
    #[cfg(test)]
    pub(crate) fn spin_wait(&self) -> Duration {
        self.spin.window
    }

    /// Declare `rank` gone: every receive waiting for it fails with `reason`,
    /// and so does every later receive that finds no message already here.
    pub fn fail_peer(&self, rank: usize, reason: &str) {
        let mut st = self.lock();
        let src = rank as u32;
        let explained = st.explained.remove(&src);
        st.gone
            .entry(src)
            .or_insert_with(|| explained.unwrap_or_else(|| reason.to_string()));
        let reason = st.gone.get(&src).cloned().unwrap_or_default();
        let fail = |w: Reply| {
            let _ = w.send(Err(Failure::lost(rank, reason.clone())));
        };
        let waiting: Vec<CollKey> = st
            .coll
            .iter()
            .filter(|(k, s)| k.src == src && matches!(s, Slot::Waiting(_)))
            .map(|(k, _)| *k)
            .collect();
        for k in waiting {
            if let Some(Slot::Waiting(w)) = st.coll.remove(&k) {
                fail(w);
            }
        }
        for (k, q) in st.p2p.iter_mut() {
            if k.src == src {
                q.dispatch();
                while let Some(w) = q.waiters.pop_front() {
                    fail(w);
                }
            }
        }
    }

    /// World rank `by` ended the job for everyone: every receive waiting
    /// fails with `reason`, and so does every later one.
    pub fn abort_job(&self, by: usize, reason: &str) {
        let mut st = self.lock();
        if st.job_abort.is_some() {
            return;
        }
        st.job_abort = Some((by as u32, reason.to_string()));
        let Some(f) = st.job_failure() else { return };
        let waiting: Vec<CollKey> = st
            .coll
            .iter()
            .filter(|(_, s)| matches!(s, Slot::Waiting(_)))
            .map(|(k, _)| *k)
            .collect();
        for k in waiting {
            if let Some(Slot::Waiting(w)) = st.coll.remove(&k) {
                let _ = w.send(Err(f.clone()));
            }
        }
        for q in st.p2p.values_mut() {
            while let Some(w) = q.waiters.pop_front() {
                let _ = w.send(Err(f.clone()));
            }
        }
    }

    /// The job abort this rank knows of: the aborting world rank and why.
    pub fn job_abort(&self) -> Option<(usize, String)> {
        self.lock()
            .job_abort
            .as_ref()
            .map(|(by, why)| (*by as usize, why.clone()))
    }

    /// `rank` said why it is going (e.g. in its connection's close) before
    /// it is failed: whatever fails it first reports this reason.
    pub fn explain(&self, rank: usize, reason: &str) {
        let mut st = self.lock();
        if !st.gone.contains_key(&(rank as u32)) {
            st.explained.insert(rank as u32, reason.to_string());
        }
    }

    /// Whether `rank` was declared gone, and why.
    pub fn gone_reason(&self, rank: usize) -> Option<String> {
        self.lock().gone.get(&(rank as u32)).cloned()
    }

    /// Drop everything kept for a finished collective (stale frames of a
    /// failed operation).
    pub fn forget_coll(&self, comm_id: u64, epoch: u32, seq: u64) {
        self.lock()
            .coll
            .retain(|k, _| !(k.comm_id == comm_id && k.epoch == epoch && k.seq == seq));
    }

    /// Number of messages and waiting receives held (for leak tests).
    pub fn held(&self) -> usize {
        let st = self.lock();
        st.coll.len()
            + st.p2p
                .values()
                .map(|q| q.ready.len() + q.early.len() + q.waiters.len())
                .sum::<usize>()
    }
}

#[cfg(test)]
mod tests;
