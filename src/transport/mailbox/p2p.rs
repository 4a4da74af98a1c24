//! Point-to-point messages of a mailbox. Each sender numbers its messages
//! to this rank once per communicator, across tags; arrivals are put back in
//! that order (so messages of one tag keep their send order, as MPI's
//! non-overtaking rule asks), then queued per tag until received. A tag's
//! queue goes as soon as it is idle, so a job that uses many distinct tags
//! keeps nothing per tag: what stays is one message number per sender and
//! communicator.

use super::{P2pKey, Reply};
use crate::transport::keyhash::{remove_where, HashMap};
use crate::transport::Incoming;
use std::collections::{BTreeMap, VecDeque};

/// One sender on one communicator: the unit of message numbering.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Peer {
    src: u32,
    comm_id: u64,
    epoch: u32,
}

/// A sender's message order.
#[derive(Default)]
struct Order {
    /// Next message number expected.
    next: u64,
    /// Messages that overtook an earlier one in transit (`None`: the sender
    /// cancelled that number; it is skipped).
    early: BTreeMap<u64, Option<Incoming>>,
}

/// Messages of one (sender, communicator, tag) in order, and the receives
/// waiting for them.
#[derive(Default)]
pub(super) struct Queue {
    ready: VecDeque<Incoming>,
    waiters: VecDeque<Reply>,
}

impl Queue {
    /// Hand ready messages to waiting receives, in order.
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

    fn idle(&self) -> bool {
        self.ready.is_empty() && self.waiters.is_empty()
    }
}

/// What was dropped with a communicator (dropped outside the mailbox's
/// lock: a message may own a stream).
pub(super) type Dropped = (Vec<Queue>, Vec<BTreeMap<u64, Option<Incoming>>>);

/// The point-to-point side of a mailbox.
#[derive(Default)]
pub(super) struct P2pQueues {
    order: HashMap<Peer, Order>,
    queues: HashMap<P2pKey, Queue>,
}

/// Queue `m` on its tag and hand it out if a receive waits.
fn enqueue(queues: &mut HashMap<P2pKey, Queue>, m: Incoming) {
    let h = m.header();
    let key = P2pKey {
        src: h.src,
        comm_id: h.comm_id,
        epoch: h.epoch,
        tag: h.seq,
    };
    let q = queues.entry(key).or_default();
    q.ready.push_back(m);
    q.dispatch();
    if q.idle() {
        queues.remove(&key);
    }
}

impl P2pQueues {
    /// Message number `n` of sender `src` on (`comm_id`, `epoch`) arrived:
    /// `Some` a message, `None` a skipped number. `false` if that number
    /// was seen already (the arrival is dropped).
    pub(super) fn arrive(
        &mut self,
        src: u32,
        comm_id: u64,
        epoch: u32,
        n: u64,
        m: Option<Incoming>,
    ) -> bool {
        let peer = Peer {
            src,
            comm_id,
            epoch,
        };
        let o = self.order.entry(peer).or_default();
        if n < o.next || o.early.contains_key(&n) {
            return false;
        }
        if n != o.next {
            o.early.insert(n, m);
            return true;
        }
        o.next += 1;
        if let Some(m) = m {
            enqueue(&mut self.queues, m);
        }
        while let Some(m) = o.early.remove(&o.next) {
            o.next += 1;
            if let Some(m) = m {
                enqueue(&mut self.queues, m);
            }
        }
        true
    }

    /// The next message of `key` if one is here and no receive is waiting
    /// before this one.
    pub(super) fn take(&mut self, key: &P2pKey) -> Option<Incoming> {
        let q = self.queues.get_mut(key)?;
        if !q.waiters.is_empty() {
            return None;
        }
        let m = q.ready.pop_front();
        if q.idle() {
            self.queues.remove(key);
        }
        m
    }

    /// A receive waits for the next message of `key`.
    pub(super) fn wait(&mut self, key: P2pKey, w: Reply) {
        let q = self.queues.entry(key).or_default();
        q.waiters.push_back(w);
        q.dispatch();
        if q.idle() {
            self.queues.remove(&key);
        }
    }

    /// A waiting receive of `key` was cancelled; `got` is a message it was
    /// handed before it noticed, which goes back to the front.
    pub(super) fn cancelled(&mut self, key: P2pKey, got: Option<Incoming>) {
        if got.is_none() && !self.queues.contains_key(&key) {
            return;
        }
        let q = self.queues.entry(key).or_default();
        if let Some(m) = got {
            q.ready.push_front(m);
        }
        q.waiters.retain(|w| !w.is_closed());
        q.dispatch();
        if q.idle() {
            self.queues.remove(&key);
        }
    }

    /// Every receive waiting on a queue `which` selects, after the
    /// messages already here were handed out; idle queues go.
    pub(super) fn take_waiting(&mut self, which: impl Fn(&P2pKey) -> bool) -> Vec<Reply> {
        let mut out = Vec::new();
        self.queues.retain(|k, q| {
            if which(k) {
                q.dispatch();
                out.extend(q.waiters.drain(..));
            }
            !q.idle()
        });
        out
    }

    /// Remove everything kept for communicator `comm_id` at `epoch`.
    pub(super) fn forget_comm(&mut self, comm_id: u64, epoch: u32) -> Dropped {
        (
            remove_where(&mut self.queues, |k| {
                k.comm_id == comm_id && k.epoch == epoch
            }),
            remove_where(&mut self.order, |p| {
                p.comm_id == comm_id && p.epoch == epoch
            })
            .into_iter()
            .map(|o| o.early)
            .collect(),
        )
    }

    /// Map entries: tag queues and senders' message orders.
    pub(super) fn len(&self) -> usize {
        self.queues.len() + self.order.len()
    }

    /// Messages and waiting receives held.
    pub(super) fn held(&self) -> usize {
        let queued: usize = self
            .queues
            .values()
            .map(|q| q.ready.len() + q.waiters.len())
            .sum();
        queued + self.order.values().map(|o| o.early.len()).sum::<usize>()
    }
}
