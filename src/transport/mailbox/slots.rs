//! Collective slots grouped by call, so that a call's frames and receives
//! are found, and dropped, together: finishing or failing a call costs its
//! own frames, not a scan of every call held.

use super::{CollKey, Reply, Slot};
use crate::transport::keyhash::{remove_where, HashMap};

/// One collective call: (communicator, epoch, sequence number).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Call {
    comm_id: u64,
    epoch: u32,
    seq: u64,
}

impl Call {
    fn of(k: &CollKey) -> Call {
        Call {
            comm_id: k.comm_id,
            epoch: k.epoch,
            seq: k.seq,
        }
    }
}

/// A call's slots by (sender, step).
type CallSlots = HashMap<(u32, u64), Slot>;

/// The collective slots of a mailbox: a message that arrived first, or a
/// receive that was posted first, per [`CollKey`].
#[derive(Default)]
pub(super) struct CollSlots {
    calls: HashMap<Call, CallSlots>,
}

impl CollSlots {
    pub(super) fn insert(&mut self, k: CollKey, slot: Slot) {
        self.calls
            .entry(Call::of(&k))
            .or_default()
            .insert((k.src, k.sub), slot);
    }

    pub(super) fn remove(&mut self, k: &CollKey) -> Option<Slot> {
        let call = Call::of(k);
        let slots = self.calls.get_mut(&call)?;
        let slot = slots.remove(&(k.src, k.sub));
        if slots.is_empty() {
            self.calls.remove(&call);
        }
        slot
    }

    pub(super) fn is_ready(&self, k: &CollKey) -> bool {
        matches!(self.get(k), Some(Slot::Ready(_)))
    }

    pub(super) fn is_waiting(&self, k: &CollKey) -> bool {
        matches!(self.get(k), Some(Slot::Waiting(_)))
    }

    fn get(&self, k: &CollKey) -> Option<&Slot> {
        self.calls.get(&Call::of(k))?.get(&(k.src, k.sub))
    }

    /// Remove everything held for call `seq`: each slot with its sender.
    pub(super) fn take_call(&mut self, comm_id: u64, epoch: u32, seq: u64) -> Vec<(u32, Slot)> {
        let call = Call {
            comm_id,
            epoch,
            seq,
        };
        match self.calls.remove(&call) {
            Some(slots) => slots.into_iter().map(|((src, _), s)| (src, s)).collect(),
            None => Vec::new(),
        }
    }

    /// Remove the receives waiting that `pick` selects (by communicator,
    /// epoch and sender); their frames already here stay.
    pub(super) fn take_waiting(
        &mut self,
        mut pick: impl FnMut(u64, u32, u32) -> bool,
    ) -> Vec<Reply> {
        let mut out = Vec::new();
        self.calls.retain(|call, slots| {
            let hit: Vec<(u32, u64)> = slots
                .iter()
                .filter(|(&(src, _), slot)| {
                    matches!(slot, Slot::Waiting(_)) && pick(call.comm_id, call.epoch, src)
                })
                .map(|(k, _)| *k)
                .collect();
            for k in hit {
                if let Some(Slot::Waiting(w)) = slots.remove(&k) {
                    out.push(w);
                }
            }
            !slots.is_empty()
        });
        out
    }

    /// Remove everything held for communicator `comm_id` at `epoch`.
    pub(super) fn forget_comm(&mut self, comm_id: u64, epoch: u32) -> Vec<CallSlots> {
        remove_where(&mut self.calls, |c| {
            c.comm_id == comm_id && c.epoch == epoch
        })
    }

    /// Slots held (messages and waiting receives).
    pub(super) fn len(&self) -> usize {
        self.calls.values().map(|s| s.len()).sum()
    }
}

/// How many dropped communicators a mailbox remembers, to drop their
/// late frames instead of keeping them for a receive that cannot come.
const FORGOTTEN: usize = 4096;

/// The communicators (id, epoch) this rank dropped most recently: the
/// latest [`FORGOTTEN`], so that the record is bounded by a window, not by
/// the job's length. Communicator ids are not reused (a split's id mixes
/// its parent's id and call number), so a remembered one never comes back.
#[derive(Default)]
pub(super) struct Forgotten {
    set: std::collections::HashSet<
        (u64, u32),
        std::hash::BuildHasherDefault<crate::transport::keyhash::KeyHasher>,
    >,
    order: std::collections::VecDeque<(u64, u32)>,
}

impl Forgotten {
    pub(super) fn add(&mut self, comm_id: u64, epoch: u32) {
        if self.set.insert((comm_id, epoch)) {
            self.order.push_back((comm_id, epoch));
        }
        while self.order.len() > FORGOTTEN {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
    }

    pub(super) fn contains(&self, comm_id: u64, epoch: u32) -> bool {
        self.set.contains(&(comm_id, epoch))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::Incoming;
    use crate::wire::{FrameKind, Header};

    fn key(src: u32, comm_id: u64, seq: u64, sub: u64) -> CollKey {
        CollKey {
            src,
            comm_id,
            epoch: 1,
            seq,
            sub,
        }
    }

    fn ready(k: &CollKey) -> Slot {
        let mut h = Header::new(FrameKind::Coll, k.src, k.comm_id, k.epoch);
        h.seq = k.seq;
        h.sub = k.sub;
        Slot::Ready(Incoming::from_chunks(h, Vec::new()))
    }

    #[test]
    fn calls_are_taken_and_forgotten_without_touching_others() {
        let mut s = CollSlots::default();
        for (src, comm, seq, sub) in [(1, 7, 1, 0), (2, 7, 1, 3), (1, 7, 2, 0), (1, 8, 1, 0)] {
            let k = key(src, comm, seq, sub);
            s.insert(k, ready(&k));
        }
        let (tx, _rx) = tokio::sync::oneshot::channel();
        s.insert(key(3, 7, 2, 0), Slot::Waiting(tx));
        assert_eq!(s.len(), 5);
        assert!(s.is_ready(&key(2, 7, 1, 3)) && s.is_waiting(&key(3, 7, 2, 0)));

        let mut got: Vec<u32> = s.take_call(7, 1, 1).into_iter().map(|(r, _)| r).collect();
        got.sort();
        assert_eq!(got, vec![1, 2]);
        assert_eq!(s.len(), 3);
        assert!(s.take_call(7, 1, 1).is_empty());

        // Waiting receives only, and only those picked.
        assert!(s.take_waiting(|_, _, src| src == 1).is_empty());
        assert_eq!(s.take_waiting(|c, _, _| c == 7).len(), 1);
        assert_eq!(s.len(), 2);
        assert!(s.is_ready(&key(1, 7, 2, 0)));

        assert_eq!(s.forget_comm(7, 1).len(), 1);
        let mut f = Forgotten::default();
        for c in 0..FORGOTTEN as u64 + 10 {
            f.add(c, 0);
        }
        assert!(!f.contains(0, 0) && f.contains(10, 0) && !f.contains(10, 1));
        assert_eq!(f.set.len(), FORGOTTEN, "bounded by the window");
        assert_eq!(s.len(), 1);
        assert!(s.remove(&key(1, 8, 1, 0)).is_some());
        assert_eq!(s.len(), 0);
        assert!(s.calls.is_empty(), "an emptied call keeps no map");
    }
}
