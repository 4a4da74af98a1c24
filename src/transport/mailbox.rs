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

use super::failure::{Abort, AbortKind, Broken, Failure, Refused};
use crate::wire::{CollDesc, FrameKind, Header};
use bytes::Bytes;
use std::collections::{BTreeMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};
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

/// Hasher for the mailbox's keys (ranks, communicator ids, sequence
/// numbers): a multiply-xorshift mix, several times cheaper than the
/// default SipHash on every frame. Keys come only from authenticated members
/// of the job, so deliberate collisions are not a concern here.
#[derive(Default, Clone, Copy)]
struct KeyHasher(u64);

const MIX: u64 = 0x9e37_79b9_7f4a_7c15;

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        let x = self.0 ^ (self.0 >> 31);
        x.wrapping_mul(MIX) ^ (x >> 29)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u8(&mut self, n: u8) {
        self.write_u64(u64::from(n));
    }

    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(23) ^ n).wrapping_mul(MIX);
    }

    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }
}

type HashMap<K, V> = std::collections::HashMap<K, V, BuildHasherDefault<KeyHasher>>;

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

enum Body {
    Chunks(VecDeque<Bytes>),
    Stream(quinn::RecvStream),
    /// A same-host connection carrying this message alone; `buf` is reused
    /// for its pieces once the previous one was dropped.
    Local(tokio::net::UnixStream, bytes::BytesMut),
}

/// Largest piece read at a time from a same-host connection.
const LOCAL_PIECE: usize = 1 << 20;

/// A received message: its header and a payload that is either already in
/// memory or still arriving on its stream.
pub struct Incoming {
    header: Header,
    body: Body,
    remaining: u64,
    /// The bytes this message holds against its sender's allowance.
    _charge: Option<Charge>,
}

/// What holding one message costs besides its payload (the message, its
/// slot in the maps), as counted against its sender's allowance.
const HELD_OVERHEAD: u64 = 256;

/// Bytes of one sender's messages held in memory until they are received:
/// returned when the message is dropped (received or discarded).
struct Charge {
    held: Arc<AtomicU64>,
    bytes: u64,
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.held.fetch_sub(self.bytes, AtomicOrdering::Relaxed);
    }
}

impl std::fmt::Debug for Incoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Incoming")
            .field("header", &self.header)
            .field("remaining", &self.remaining)
            .finish()
    }
}

impl Incoming {
    /// A message whose payload is already in memory.
    pub fn from_chunks(header: Header, chunks: Vec<Bytes>) -> Incoming {
        Incoming {
            header,
            remaining: header.len,
            body: Body::Chunks(chunks.into()),
            _charge: None,
        }
    }

    pub(crate) fn from_stream(header: Header, stream: quinn::RecvStream) -> Incoming {
        Incoming {
            header,
            remaining: header.len,
            body: Body::Stream(stream),
            _charge: None,
        }
    }

    pub(crate) fn from_local(header: Header, stream: tokio::net::UnixStream) -> Incoming {
        Incoming {
            header,
            remaining: header.len,
            body: Body::Local(stream, bytes::BytesMut::new()),
            _charge: None,
        }
    }

    /// The frame header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Next piece of the payload, `None` once all `header.len` bytes were
    /// returned. Never returns more than `header.len` bytes in total.
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>, Broken> {
        if self.remaining == 0 {
            return Ok(None);
        }
        let chunk = match &mut self.body {
            Body::Chunks(q) => q.pop_front(),
            Body::Stream(s) => match s.read_chunk(usize::MAX, true).await {
                Ok(c) => c.map(|c| c.bytes),
                Err(e) => return Err(Broken(format!("stream failed mid-message: {e}"))),
            },
            Body::Local(s, buf) => {
                use bytes::BufMut;
                use tokio::io::AsyncReadExt;
                let want = (self.remaining as usize).min(LOCAL_PIECE);
                // Reclaims the previous piece's memory if it was dropped.
                buf.reserve(want);
                match s.read_buf(&mut buf.limit(want)).await {
                    Ok(0) => None,
                    Ok(_) => Some(buf.split().freeze()),
                    Err(e) => {
                        return Err(Broken(format!(
                            "same-host connection failed mid-message: {e}"
                        )))
                    }
                }
            }
        };
        let mut chunk = match chunk {
            Some(c) => c,
            None => {
                return Err(Broken(format!(
                    "message ended {} bytes early (announced {})",
                    self.remaining, self.header.len
                )))
            }
        };
        if chunk.len() as u64 > self.remaining {
            chunk.truncate(self.remaining as usize);
        }
        self.remaining -= chunk.len() as u64;
        Ok(Some(chunk))
    }

    /// Copy the whole payload into `out`, whose length must equal `header.len`.
    pub async fn read_into(&mut self, out: &mut [u8]) -> Result<(), Broken> {
        if out.len() as u64 != self.header.len {
            return Err(Broken(format!(
                "message has {} bytes, buffer has {}",
                self.header.len,
                out.len()
            )));
        }
        let mut at = (self.header.len - self.remaining) as usize;
        if let Body::Local(s, _) = &mut self.body {
            // Straight from the socket into the destination.
            use tokio::io::AsyncReadExt;
            return match s.read_exact(&mut out[at..]).await {
                Ok(_) => {
                    self.remaining = 0;
                    Ok(())
                }
                Err(e) => Err(Broken(format!(
                    "same-host connection ended {} bytes before the message's end: {e}",
                    self.remaining
                ))),
            };
        }
        while let Some(c) = self.next_chunk().await? {
            out[at..at + c.len()].copy_from_slice(&c);
            at += c.len();
        }
        Ok(())
    }
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
        if let (FrameKind::Coll | FrameKind::P2p, Body::Chunks(q)) = (h.kind, &m.body) {
            // Payload plus what keeping any message costs (so that a flood
            // of empty messages is bounded too).
            let bytes = q.iter().map(|c| c.len() as u64).sum::<u64>() + HELD_OVERHEAD;
            let held = st.held.entry(h.src).or_default().clone();
            let now = held.fetch_add(bytes, AtomicOrdering::Relaxed) + bytes;
            // Dropped with the refused message, or kept with the message.
            let charge = Charge { held, bytes };
            if now > self.unexpected_limit {
                return Err(Refused(format!(
                    "rank {} sent more than {} bytes of messages that their destination has \
                     not received yet (Config::set_max_unexpected_bytes); post the receives \
                     sooner, or raise the limit on every rank",
                    h.src, self.unexpected_limit
                )));
            }
            m._charge = Some(charge);
        }
        match h.kind {
            FrameKind::Abort => {
                let why = match &m.body {
                    Body::Chunks(q) => q.iter().flat_map(|c| c.iter().copied()).collect(),
                    Body::Stream(_) | Body::Local(..) => Vec::new(),
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
        self.spin.hits.load(AtomicOrdering::Relaxed)
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

/// A yield that returns after longer than this means the core was taken
/// by other work for a whole scheduler time slice, not by a peer rank that
/// soon waits again.
const SPIN_LONG_YIELD: Duration = Duration::from_micros(500);
/// Polling stops for this long after a first long yield ...
const SPIN_BACKOFF_MIN_NS: u64 = 2_000_000;
/// ... doubling while long yields recur, up to this.
const SPIN_BACKOFF_MAX_NS: u64 = 1_000_000_000;
/// The back-off halves after this many polling receives in a row without a
/// long yield.
const SPIN_CLEAN_STREAK: u64 = 256;

/// Whether polling can spare a wake-up for a receive awaited here. On a
/// worker thread of a multi-threaded runtime it cannot (the message is
/// read on whichever worker holds the socket, and polling only keeps this
/// worker and the others busy: 4 ranks, 4-byte allreduce 127-144 us with
/// polling against 72-78 us without). A current-thread runtime, or a
/// thread that blocks on a future outside the runtime's tasks (the body of
/// `#[tokio::main]`, `rankmesh::blocking`), gains from it.
fn polling_helps_here() -> bool {
    match tokio::runtime::Handle::try_current() {
        Ok(h) => {
            h.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread
                || tokio::task::try_id().is_none()
        }
        Err(_) => true,
    }
}

/// Polls a receive for a short time before its task sleeps
/// ([`crate::Config::set_spin_wait`]).
///
/// Waking a sleeping process costs tens of microseconds on virtual
/// machines, more than a small message takes to arrive, so a receive first
/// checks for its message in a loop: give the core to any other runnable
/// process (`sched_yield`), then let the runtime run its other tasks and,
/// on a current-thread runtime, read its sockets (`yield_now`), then check
/// again. A yield that takes longer than
/// [`SPIN_LONG_YIELD`] shows that something other than a peer rank holds
/// the core; polling would then cost a whole time slice per message, so
/// receives stop polling for a while (doubling while it recurs; halving
/// back after long runs of polling receives without one). The back-off
/// state is shared by all receives of the process and updated without a
/// lock: a concurrent update may be lost, which only shifts the heuristic.
struct Spin {
    window: Duration,
    /// A yield longer than this turns polling off ([`SPIN_LONG_YIELD`]).
    long_yield: Duration,
    base: Instant,
    /// Nanoseconds after `base` until which receives do not poll.
    off_until: AtomicU64,
    /// How long polling stops after the next long yield, in nanoseconds.
    backoff: AtomicU64,
    /// Polling receives since the last long yield.
    clean: AtomicU64,
    /// Receives that found their message by polling.
    hits: AtomicU64,
}

impl Spin {
    fn new(window: Duration) -> Spin {
        Spin {
            window,
            long_yield: SPIN_LONG_YIELD,
            base: Instant::now(),
            off_until: AtomicU64::new(0),
            backoff: AtomicU64::new(SPIN_BACKOFF_MIN_NS),
            clean: AtomicU64::new(0),
            hits: AtomicU64::new(0),
        }
    }

    fn now_ns(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Whether a receive starting at `now_ns` should poll.
    fn active(&self, now_ns: u64) -> bool {
        !self.window.is_zero() && now_ns >= self.off_until.load(AtomicOrdering::Relaxed)
    }

    /// A poll's yield took `took`, ending at `now_ns`: whether to go on
    /// polling (a long yield turns polling off for the back-off period).
    fn yielded(&self, took: Duration, now_ns: u64) -> bool {
        if took <= self.long_yield {
            return true;
        }
        self.clean.store(0, AtomicOrdering::Relaxed);
        let b = self.backoff.load(AtomicOrdering::Relaxed);
        self.off_until
            .store(now_ns.saturating_add(b), AtomicOrdering::Relaxed);
        self.backoff.store(
            b.saturating_mul(2).min(SPIN_BACKOFF_MAX_NS),
            AtomicOrdering::Relaxed,
        );
        false
    }

    /// A receive polled without a long yield: after a long run of those,
    /// halve the next back-off.
    fn settled(&self) {
        let n = self.clean.fetch_add(1, AtomicOrdering::Relaxed) + 1;
        if n.is_multiple_of(SPIN_CLEAN_STREAK) {
            let b = self.backoff.load(AtomicOrdering::Relaxed);
            self.backoff
                .store((b / 2).max(SPIN_BACKOFF_MIN_NS), AtomicOrdering::Relaxed);
        }
    }

    /// Poll `rx` for up to the window. `None`: not here yet, sleep on `rx`;
    /// `Some(None)`: its sender is gone; `Some(Some(r))`: the outcome.
    async fn poll(
        &self,
        rx: &mut oneshot::Receiver<Result<Incoming, Failure>>,
    ) -> Option<Option<Result<Incoming, Failure>>> {
        if !self.active(self.now_ns()) || !polling_helps_here() {
            return None;
        }
        let start = Instant::now();
        loop {
            match rx.try_recv() {
                Ok(r) => {
                    self.settled();
                    self.hits.fetch_add(1, AtomicOrdering::Relaxed);
                    return Some(Some(r));
                }
                Err(oneshot::error::TryRecvError::Closed) => return Some(None),
                Err(oneshot::error::TryRecvError::Empty) => {}
            }
            let before = Instant::now();
            if before.duration_since(start) >= self.window {
                self.settled();
                return None;
            }
            std::thread::yield_now();
            if !self.yielded(before.elapsed(), self.now_ns()) {
                return None;
            }
            tokio::task::yield_now().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datatype::DType;

    fn p2p(src: u32, tag: u64, n: u64, byte: u8) -> Incoming {
        let mut h = Header::new(FrameKind::P2p, src, 0, 0);
        h.seq = tag;
        h.sub = n;
        h.len = 1;
        h.dtype = DType::U8;
        Incoming::from_chunks(h, vec![Bytes::from(vec![byte])])
    }

    fn key(src: u32, tag: u64) -> P2pKey {
        P2pKey {
            src,
            comm_id: 0,
            epoch: 0,
            tag,
        }
    }

    async fn byte(mut m: Incoming) -> u8 {
        let mut b = [0u8];
        m.read_into(&mut b).await.unwrap();
        b[0]
    }

    /// A long yield turns polling off for the back-off period, which
    /// doubles while long yields recur and halves back after each long run
    /// of polling receives without one.
    #[test]
    fn polling_backs_off_after_long_yields() {
        assert!(!Spin::new(Duration::ZERO).active(0));
        let s = Spin::new(Duration::from_micros(50));
        assert!(s.active(0));
        assert!(s.yielded(Duration::from_micros(20), 10));
        assert!(s.active(10));
        let t = 1_000_000;
        assert!(!s.yielded(Duration::from_millis(3), t));
        assert!(!s.active(t + SPIN_BACKOFF_MIN_NS - 1));
        assert!(s.active(t + SPIN_BACKOFF_MIN_NS));
        // Recurring: twice as long, then four times.
        let t = t + SPIN_BACKOFF_MIN_NS;
        assert!(!s.yielded(Duration::from_millis(3), t));
        assert!(!s.active(t + 2 * SPIN_BACKOFF_MIN_NS - 1));
        assert!(s.active(t + 2 * SPIN_BACKOFF_MIN_NS));
        assert_eq!(
            s.backoff.load(AtomicOrdering::Relaxed),
            4 * SPIN_BACKOFF_MIN_NS
        );
        // A short run of good polls does not shorten it; a long one does.
        for _ in 0..SPIN_CLEAN_STREAK - 1 {
            s.settled();
        }
        assert_eq!(
            s.backoff.load(AtomicOrdering::Relaxed),
            4 * SPIN_BACKOFF_MIN_NS
        );
        s.settled();
        assert_eq!(
            s.backoff.load(AtomicOrdering::Relaxed),
            2 * SPIN_BACKOFF_MIN_NS
        );
        // A long yield restarts the run.
        for _ in 0..SPIN_CLEAN_STREAK - 1 {
            s.settled();
        }
        assert!(!s.yielded(Duration::from_millis(3), t));
        assert_eq!(
            s.backoff.load(AtomicOrdering::Relaxed),
            4 * SPIN_BACKOFF_MIN_NS
        );
        for _ in 0..3 * SPIN_CLEAN_STREAK {
            s.settled();
        }
        assert_eq!(s.backoff.load(AtomicOrdering::Relaxed), SPIN_BACKOFF_MIN_NS);
        // Never beyond the maximum.
        for i in 0..64 {
            s.yielded(Duration::from_millis(3), i);
        }
        assert_eq!(s.backoff.load(AtomicOrdering::Relaxed), SPIN_BACKOFF_MAX_NS);
    }

    /// A mailbox whose receives poll for up to 30 s and never back off, so
    /// that tests of polling do not depend on the machine's load.
    fn polling_mailbox() -> Arc<Mailbox> {
        let mut mb = Mailbox::new().with_spin_wait(Duration::from_secs(30));
        mb.spin.long_yield = Duration::MAX;
        Arc::new(mb)
    }

    fn current_thread() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// A polling receive lets the runtime's other tasks run (here, the one
    /// that delivers its message) and finds the message without sleeping;
    /// a receive that does not poll, or that polls while polling is backed
    /// off, still gets its message by sleeping.
    #[test]
    fn a_polling_receive_finds_a_message_delivered_by_another_task() {
        let rt = current_thread();
        // Polling off for the longest back-off (1 s), as after long yields.
        let backed_off = Arc::new(Mailbox::new().with_spin_wait(Duration::from_secs(30)));
        let spin = &backed_off.spin;
        spin.backoff
            .store(SPIN_BACKOFF_MAX_NS, AtomicOrdering::Relaxed);
        assert!(!spin.yielded(Duration::from_secs(1), spin.now_ns()));
        let cases = [
            (polling_mailbox(), 20),
            (Arc::new(Mailbox::new()), 0),
            (backed_off, 0),
        ];
        for (mb, polled) in cases {
            for i in 0..20 {
                let got = rt.block_on(async {
                    let m2 = mb.clone();
                    let t = tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_millis(2)).await;
                        m2.deliver(p2p(3, 9, i, i as u8)).unwrap();
                    });
                    let m = mb.recv_p2p(key(3, 9)).await.unwrap();
                    t.await.unwrap();
                    byte(m).await
                });
                assert_eq!(got, i as u8);
            }
            assert_eq!(mb.polled_receives(), polled, "window {:?}", mb.spin_wait());
        }
        // A message that is already here is not counted as polled for.
        let mb = polling_mailbox();
        mb.deliver(p2p(3, 9, 0, 7)).unwrap();
        assert_eq!(
            rt.block_on(async { byte(mb.recv_p2p(key(3, 9)).await.unwrap()).await }),
            7
        );
        assert_eq!(mb.polled_receives(), 0);
    }

    /// Receives poll on a current-thread runtime and on a thread that
    /// blocks on a future, not in a task on a multi-threaded runtime's
    /// workers.
    #[test]
    fn polling_is_used_where_it_spares_a_wake_up() {
        assert!(polling_helps_here(), "outside any runtime");
        let ct = current_thread();
        assert!(ct.block_on(async { polling_helps_here() }));
        assert!(ct.block_on(async { tokio::spawn(async { polling_helps_here() }).await.unwrap() }));
        let mt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        assert!(mt.block_on(async { polling_helps_here() }));
        assert!(!mt.block_on(async { tokio::spawn(async { polling_helps_here() }).await.unwrap() }));
        // And a receive in such a task does not poll.
        let mb = polling_mailbox();
        let m2 = mb.clone();
        let got = mt.block_on(async move {
            let t = tokio::spawn(async move { m2.recv_p2p(key(3, 9)).await.unwrap() });
            tokio::time::sleep(Duration::from_millis(2)).await;
            mb.deliver(p2p(3, 9, 0, 8)).unwrap();
            let m = t.await.unwrap();
            (byte(m).await, mb.polled_receives())
        });
        assert_eq!(got, (8, 0));
    }

    /// A receive cancelled while it polls loses no message, and a peer
    /// that fails while a receive polls fails that receive.
    #[test]
    fn polling_receive_cancelled_or_failed_loses_nothing() {
        let rt = current_thread();
        let mb = polling_mailbox();
        rt.block_on(async {
            let r = tokio::time::timeout(Duration::from_millis(5), mb.recv_p2p(key(3, 9))).await;
            assert!(r.is_err(), "nothing was sent yet");
            // Delivered during a poll, then the poll is cancelled.
            let m2 = mb.clone();
            let t = tokio::spawn(async move { m2.deliver(p2p(3, 9, 0, 5)).unwrap() });
            let r = tokio::time::timeout(Duration::from_millis(5), async {
                let m = mb.recv_p2p(key(3, 9)).await;
                t.await.unwrap();
                m
            });
            let got = match r.await {
                Ok(m) => m.unwrap(),
                // Cancelled: the message waits for the next receive.
                Err(_) => mb.recv_p2p(key(3, 9)).await.unwrap(),
            };
            assert_eq!(byte(got).await, 5);
            let m2 = mb.clone();
            let t = tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(2)).await;
                m2.fail_peer(3, "its process exited");
            });
            let e = mb.recv_p2p(key(3, 9)).await.unwrap_err();
            t.await.unwrap();
            assert!(format!("{e:?}").contains("its process exited"), "{e:?}");
        });
    }

    /// Messages held for a sender count against its allowance until they
    /// are received; one beyond it is refused; receiving returns the bytes.
    #[tokio::test]
    async fn a_sender_beyond_its_allowance_is_refused_until_receives_drain_it() {
        // Room for two one-byte messages.
        let mb = Mailbox::with_unexpected_limit(2 * (1 + HELD_OVERHEAD));
        mb.deliver(p2p(1, 5, 0, 10)).unwrap();
        mb.deliver(p2p(1, 5, 1, 11)).unwrap();
        // Another sender has its own allowance.
        mb.deliver(p2p(2, 5, 0, 20)).unwrap();
        let refused = mb.deliver(p2p(1, 5, 2, 12)).unwrap_err();
        assert!(refused.0.contains("set_max_unexpected_bytes"), "{refused}");
        // A received (and dropped) message returns its byte.
        assert_eq!(byte(mb.recv_p2p(key(1, 5)).await.unwrap()).await, 10);
        mb.deliver(p2p(1, 5, 2, 12)).unwrap();
        assert_eq!(byte(mb.recv_p2p(key(1, 5)).await.unwrap()).await, 11);
        assert_eq!(byte(mb.recv_p2p(key(1, 5)).await.unwrap()).await, 12);
        // Empty messages count too (a flood of them is bounded), and so
        // are returned when received.
        let mut h = Header::new(FrameKind::P2p, 1, 0, 0);
        h.seq = 6;
        for n in 0..2 {
            h.sub = n;
            mb.deliver(Incoming::from_chunks(h, Vec::new())).unwrap();
        }
        h.sub = 2;
        assert!(mb.deliver(Incoming::from_chunks(h, Vec::new())).is_err());
        let _ = mb.recv_p2p(key(1, 6)).await.unwrap();
        mb.deliver(Incoming::from_chunks(h, Vec::new())).unwrap();
    }

    #[tokio::test]
    async fn p2p_messages_are_handed_out_in_sender_order() {
        let mb = Mailbox::new();
        // Message 1 overtakes message 0 in transit.
        mb.deliver(p2p(1, 5, 1, 11)).unwrap();
        mb.deliver(p2p(1, 5, 2, 12)).unwrap();
        mb.deliver(p2p(1, 5, 0, 10)).unwrap();
        for want in [10, 11, 12] {
            assert_eq!(byte(mb.recv_p2p(key(1, 5)).await.unwrap()).await, want);
        }
        assert_eq!(mb.held(), 0);
    }

    #[tokio::test]
    async fn receive_posted_first_gets_the_message() {
        let mb = std::sync::Arc::new(Mailbox::new());
        let mb2 = mb.clone();
        let t = tokio::spawn(async move { byte(mb2.recv_p2p(key(2, 0)).await.unwrap()).await });
        tokio::task::yield_now().await;
        mb.deliver(p2p(2, 0, 0, 42)).unwrap();
        assert_eq!(t.await.unwrap(), 42);
    }

    #[tokio::test]
    async fn cancelled_receive_loses_no_message() {
        let mb = Mailbox::new();
        {
            let f = mb.recv_p2p(key(1, 0));
            let r = tokio::time::timeout(std::time::Duration::from_millis(5), f).await;
            assert!(r.is_err());
        }
        mb.deliver(p2p(1, 0, 0, 7)).unwrap();
        assert_eq!(byte(mb.recv_p2p(key(1, 0)).await.unwrap()).await, 7);
        let ck = CollKey {
            src: 3,
            comm_id: 0,
            epoch: 0,
            seq: 1,
            sub: 0,
        };
        let r = tokio::time::timeout(std::time::Duration::from_millis(5), mb.recv_coll(ck)).await;
        assert!(r.is_err());
        assert_eq!(mb.held(), 0, "cancelled receive left a slot behind");
    }

    #[tokio::test]
    async fn lost_peer_fails_waiters_but_delivered_data_survives() {
        let mb = std::sync::Arc::new(Mailbox::new());
        mb.deliver(p2p(4, 0, 0, 1)).unwrap();
        let mb2 = mb.clone();
        let ck = CollKey {
            src: 4,
            comm_id: 0,
            epoch: 0,
            seq: 9,
            sub: 0,
        };
        let t = tokio::spawn(async move { mb2.recv_coll(ck).await });
        tokio::task::yield_now().await;
        mb.fail_peer(4, "connection reset");
        let e = t.await.unwrap().unwrap_err();
        assert_eq!(e.rank(), 4);
        assert!(e.reason().contains("reset"));
        // The message that arrived before the failure is still delivered.
        assert_eq!(byte(mb.recv_p2p(key(4, 0)).await.unwrap()).await, 1);
        assert!(mb.recv_p2p(key(4, 0)).await.is_err());
        assert!(mb.recv_coll(ck).await.is_err());
    }

    #[tokio::test]
    async fn short_message_is_an_error_not_a_hang() {
        let mut h = Header::new(FrameKind::P2p, 0, 0, 0);
        h.len = 10;
        let mut m = Incoming::from_chunks(h, vec![Bytes::from_static(b"abc")]);
        let mut out = [0u8; 10];
        assert!(m.read_into(&mut out).await.unwrap_err().0.contains("early"));
        let mut m = Incoming::from_chunks(h, vec![]);
        let mut small = [0u8; 3];
        assert!(m.read_into(&mut small).await.is_err());
    }
}
