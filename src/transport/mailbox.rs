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
//!
//! What a collective frame means beyond its key (its call was aborted, or
//! this rank finished that call and the frame shows a mismatch) is decided
//! by the layer above, through [`CollCheck`].

use super::failure::{AbortKind, Failure, Refused};
use super::incoming::{Charge, Incoming, HELD_OVERHEAD};
use super::keyhash::HashMap;
use super::spin::Spin;
use crate::wire::{FrameKind, Header};
use slots::CollSlots;
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
mod p2p;
mod slots;

type Reply = oneshot::Sender<Result<Incoming, Failure>>;

enum Slot {
    Ready(Incoming),
    Waiting(Reply),
}

#[derive(Default)]
struct State {
    coll: CollSlots,
    p2p: p2p::P2pQueues,
    gone: HashMap<u32, String>,
    /// The job was aborted: by which world rank, and why.
    job_abort: Option<(u32, String)>,
    /// Bytes of each sender's messages held in memory (see [`Charge`]).
    held: HashMap<u32, Arc<AtomicU64>>,
    /// Reasons peers gave for going, not yet failed (see [`Mailbox::explain`]).
    explained: HashMap<u32, String>,
    /// Communicators this rank dropped: their late frames are not kept.
    forgotten: slots::Forgotten,
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
}

/// What the layer above decides about a collective frame on arrival.
pub enum CollVerdict {
    /// Hand it to its receive.
    Deliver,
    /// Drop it (a frame of a call that was aborted or already finished).
    Drop,
    /// Drop it, and fail with `failure` every collective receive waiting
    /// on its communicator and epoch (on its call alone, with `seq`).
    DropAndFail {
        /// The one call whose receives fail, or all of the communicator's.
        seq: Option<u64>,
        /// What they fail with.
        failure: Failure,
    },
}

/// The layer above's record of collectives (aborts, finished calls),
/// consulted by the mailbox under its lock: it must not call back into the
/// mailbox.
pub trait CollCheck: Send + Sync {
    /// A collective frame arrived.
    fn frame(&self, h: &Header) -> CollVerdict;
    /// A rank's abort of collective `h.seq` arrived.
    fn aborted(&self, h: &Header, kind: AbortKind, reason: String) -> CollVerdict;
    /// Before a collective receive waits: a failure that already decides
    /// it (its call was aborted; its communicator saw a mismatch).
    fn before_wait(&self, key: &CollKey) -> Option<Failure>;
}

/// Received messages of one rank, waiting to be matched.
pub struct Mailbox {
    state: Mutex<State>,
    /// Most bytes of one sender's messages held before their receive.
    unexpected_limit: u64,
    /// Polling of receives before they sleep.
    spin: Spin,
    /// The layer above's record of collectives, once it has one.
    check: std::sync::OnceLock<Arc<dyn CollCheck>>,
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
                    if st.coll.is_waiting(k) {
                        st.coll.remove(k);
                    }
                }
            },
            Key::P2p(k) => st.p2p.cancelled(*k, got),
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
            check: std::sync::OnceLock::new(),
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
        let of_comm = matches!(
            h.kind,
            FrameKind::Coll | FrameKind::P2p | FrameKind::Skip | FrameKind::Abort
        );
        if of_comm && st.forgotten.contains(h.comm_id, h.epoch) {
            // Nothing can receive it: this rank dropped the communicator.
            tracing::debug!(
                src = h.src,
                comm = h.comm_id,
                "frame of a dropped communicator"
            );
            return Ok(());
        }
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
                if let Some(check) = self.check.get() {
                    let verdict = check.aborted(&h, kind, reason);
                    Self::apply(&mut st, &h, verdict);
                }
            }
            FrameKind::Coll if !self.coll_wanted(&mut st, &h) => {}
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
                // `sub` numbers the sender's messages to this rank on the
                // communicator, across tags.
                let m = (h.kind == FrameKind::P2p).then_some(m);
                if !st.p2p.arrive(h.src, h.comm_id, h.epoch, h.sub, m) {
                    tracing::warn!(
                        src = h.src,
                        tag = h.seq,
                        n = h.sub,
                        "duplicate p2p frame dropped"
                    );
                }
            }
            FrameKind::Bye => {}
        }
        Ok(())
    }

    /// Let the layer above check a collective frame: whether to keep it.
    fn coll_wanted(&self, st: &mut State, h: &Header) -> bool {
        let Some(check) = self.check.get() else {
            return true;
        };
        let verdict = check.frame(h);
        let keep = matches!(verdict, CollVerdict::Deliver);
        Self::apply(st, h, verdict);
        keep
    }

    fn apply(st: &mut State, h: &Header, verdict: CollVerdict) {
        if let CollVerdict::DropAndFail { seq, failure } = verdict {
            Self::fail_waiting(st, h.comm_id, h.epoch, seq, &failure);
        }
    }

    /// Fail every collective receive waiting on (`comm_id`, `epoch`), or
    /// on its call `seq` alone; an aborted call's frames already here go
    /// too (nothing will receive them).
    fn fail_waiting(st: &mut State, comm_id: u64, epoch: u32, seq: Option<u64>, f: &Failure) {
        let waiting = match seq {
            Some(seq) => st
                .coll
                .take_call(comm_id, epoch, seq)
                .into_iter()
                .filter_map(|(_, slot)| match slot {
                    Slot::Waiting(w) => Some(w),
                    Slot::Ready(_) => None,
                })
                .collect(),
            None => st.coll.take_waiting(|c, e, _| c == comm_id && e == epoch),
        };
        for w in waiting {
            let _ = w.send(Err(f.clone()));
        }
    }

    /// Use `check` for every collective frame from now on; `false` if the
    /// mailbox already had one (it keeps the first).
    pub fn set_coll_check(&self, check: Arc<dyn CollCheck>) -> bool {
        self.check.set(check).is_ok()
    }

    /// This rank gave up collective `seq`: its receives still waiting
    /// fail with `failure`.
    pub fn fail_coll(&self, comm_id: u64, epoch: u32, seq: u64, failure: &Failure) {
        let mut st = self.lock();
        Self::fail_waiting(&mut st, comm_id, epoch, Some(seq), failure);
    }

    /// Remove what is held for collective `seq` (this rank finished it):
    /// the sender and header of each frame that was never received.
    pub fn take_coll(&self, comm_id: u64, epoch: u32, seq: u64) -> Vec<(u32, Header)> {
        let held = self.lock().coll.take_call(comm_id, epoch, seq);
        held.into_iter()
            .filter_map(|(src, slot)| match slot {
                Slot::Ready(m) => Some((src, *m.header())),
                Slot::Waiting(_) => None,
            })
            .collect()
    }

    /// Wait for the collective message `key`.
    pub async fn recv_coll(&self, key: CollKey) -> Result<Incoming, Failure> {
        let rx = {
            let mut st = self.lock();
            if st.coll.is_ready(&key) {
                if let Some(Slot::Ready(m)) = st.coll.remove(&key) {
                    return Ok(m);
                }
            }
            if let Some(f) = st.job_failure() {
                return Err(f);
            }
            if let Some(f) = self.check.get().and_then(|c| c.before_wait(&key)) {
                return Err(f);
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
            if let Some(m) = st.p2p.take(&key) {
                return Ok(m);
            }
            if let Some(f) = st.job_failure() {
                return Err(f);
            }
            if let Some(reason) = st.gone.get(&key.src) {
                return Err(Failure::lost(key.src as usize, reason.clone()));
            }
            let (tx, rx) = oneshot::channel();
            st.p2p.wait(key, tx);
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
        for w in st.coll.take_waiting(|_, _, s| s == src) {
            fail(w);
        }
        for w in st.p2p.take_waiting(|k| k.src == src) {
            fail(w);
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
        for w in st.coll.take_waiting(|_, _, _| true) {
            let _ = w.send(Err(f.clone()));
        }
        for w in st.p2p.take_waiting(|_| true) {
            let _ = w.send(Err(f.clone()));
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

    /// Forget everything kept for communicator `comm_id` at `epoch` (it
    /// was dropped): its queues, messages held for it, receives waiting.
    pub fn forget_comm(&self, comm_id: u64, epoch: u32) {
        let (coll, p2p) = {
            let mut st = self.lock();
            let coll = st.coll.forget_comm(comm_id, epoch);
            st.forgotten.add(comm_id, epoch);
            (coll, st.p2p.forget_comm(comm_id, epoch))
        };
        // Dropped outside the lock (a message may own a stream).
        drop((coll, p2p));
    }

    /// Entries of the matching maps: collective slots, point-to-point
    /// queues and senders' message orders (for leak tests).
    pub fn entries(&self) -> usize {
        let st = self.lock();
        st.coll.len() + st.p2p.len()
    }

    /// Number of messages and waiting receives held (for leak tests).
    pub fn held(&self) -> usize {
        let st = self.lock();
        st.coll.len() + st.p2p.held()
    }
}

#[cfg(test)]
mod tests;
