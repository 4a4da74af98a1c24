//! Membership of an elastic job after formation, as a state machine with
//! no I/O (the seed's QUIC driver feeds it events and sends what it
//! decides): who is a member of which epoch, who waits to join, who left,
//! and when the members' requests at a checkpoint decide the next epoch.
//!
//! Invariants (checked by the unit tests and the `elastic_state` fuzz
//! target): a member id is never issued twice and never to two processes;
//! epochs only increase; the members of an epoch are distinct ids that
//! were admitted and ready; no joiner is admitted past the maximum.

use crate::wire::control::{EpochInfo, KeyPin, PeerInfo};
use std::collections::BTreeSet;

/// Most member ids an elastic job issues (ids are never reused).
pub const MAX_MEMBERS: usize = 1 << 16;

/// What a membership point decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// The next epoch.
    Epoch(EpochInfo),
    /// Too few ranks remain: epoch `epoch` cannot be left.
    Failed {
        /// The epoch the members are in.
        epoch: u32,
        /// Why, for the members.
        reason: String,
    },
}

/// Membership of an elastic job.
#[derive(Debug)]
pub struct Elastic {
    min: usize,
    max: usize,
    epoch: u32,
    /// Every member ever admitted, by member id.
    table: Vec<PeerInfo>,
    /// The current epoch's members, in rank order.
    members: Vec<usize>,
    /// Members whose link to the seed is open.
    live: BTreeSet<usize>,
    /// Admitted joiners waiting for the next epoch.
    pending: Vec<usize>,
    /// Joiners being admitted (counted against the maximum).
    reserved: usize,
    /// Members that reached the current epoch's membership point.
    requests: BTreeSet<usize>,
    /// The latest decision.
    last: Option<EpochInfo>,
}

/// Why the membership refused a request (sent to the process as text).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// A member asked about an epoch the job is not at.
    OtherEpoch {
        /// The member.
        id: usize,
        /// The epoch it asked about.
        asked: u32,
        /// The job's epoch.
        current: u32,
    },
    /// A process asked as a member of an epoch it is not a member of.
    NotMember {
        /// The process's member id.
        id: usize,
        /// The epoch.
        epoch: u32,
    },
    /// The job holds its maximum of ranks already.
    Full {
        /// Live members.
        live: usize,
        /// Processes admitted and waiting for the next epoch.
        waiting: usize,
        /// The job's maximum (`rankrun --elastic MIN:MAX`).
        max: usize,
    },
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::OtherEpoch { id, asked, current } => write!(
                f,
                "member {id} asked to leave epoch {asked}, but the job is at epoch {current}"
            ),
            Refusal::NotMember { id, epoch } => write!(
                f,
                "member {id} asked to leave epoch {epoch}, but it is not a member of that \
                 epoch (it was admitted later or has left); it cannot take part in this \
                 checkpoint"
            ),
            Refusal::Full { live, waiting, max } => write!(
                f,
                "the job already has {live} rank(s) and {waiting} waiting to join, its maximum \
                 of {max} (rankrun --elastic MIN:MAX); this process was not admitted"
            ),
        }
    }
}

impl Elastic {
    /// An elastic job of `min..=max` ranks, not formed yet (epoch 1).
    pub fn new(min: usize, max: usize) -> Elastic {
        Elastic {
            min,
            max,
            epoch: 1,
            table: Vec::new(),
            members: Vec::new(),
            live: BTreeSet::new(),
            pending: Vec::new(),
            reserved: 0,
            requests: BTreeSet::new(),
            last: None,
        }
    }

    /// The job formed with `peers` (member ids 0..n): epoch 1's members.
    pub fn formed(&mut self, peers: &[PeerInfo]) {
        self.table = peers.to_vec();
        self.members = (0..peers.len()).collect();
        self.live = self.members.iter().copied().collect();
    }

    /// The current epoch.
    pub fn epoch(&self) -> u32 {
        self.epoch
    }

    /// Every member ever admitted, by member id (empty before formation).
    pub fn table(&self) -> &[PeerInfo] {
        &self.table
    }

    /// Admitted joiners waiting for the next epoch.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// The latest decision, if any.
    pub fn last(&self) -> Option<&EpochInfo> {
        self.last.as_ref()
    }

    /// Member `id` left (its link to the seed ended): it holds no place and
    /// is not waited for at membership points. Then call
    /// [`Elastic::decide`].
    pub fn gone(&mut self, id: usize) {
        self.live.remove(&id);
        self.requests.remove(&id);
        self.pending.retain(|&p| p != id);
    }

    /// Member `id` reached the membership point of `epoch`: refused with
    /// the reason if the job is elsewhere or `id` is not a member. Then
    /// call [`Elastic::decide`].
    pub fn request(&mut self, id: usize, epoch: u32) -> Result<(), Refusal> {
        if self.epoch != epoch {
            return Err(Refusal::OtherEpoch {
                id,
                asked: epoch,
                current: self.epoch,
            });
        }
        if !self.members.contains(&id) {
            return Err(Refusal::NotMember { id, epoch });
        }
        self.requests.insert(id);
        Ok(())
    }

    /// Once every live member of the current epoch asked, decide the next
    /// epoch: the live members in their order, then the waiting joiners.
    pub fn decide(&mut self) -> Option<Decision> {
        if self.requests.is_empty() {
            return None;
        }
        let survivors: Vec<usize> = self
            .members
            .iter()
            .copied()
            .filter(|m| self.live.contains(m))
            .collect();
        if !survivors.iter().all(|m| self.requests.contains(m)) {
            return None;
        }
        let epoch = self.epoch;
        self.requests.clear();
        let left: Vec<u32> = self
            .members
            .iter()
            .filter(|m| !self.live.contains(m))
            .map(|&m| m as u32)
            .collect();
        let joined = std::mem::take(&mut self.pending);
        let mut members = survivors;
        members.extend(&joined);
        if members.len() < self.min {
            let reason = format!(
                "only {} rank(s) remain, fewer than the job's minimum of {} (rankrun --elastic \
                 MIN:MAX); the job cannot continue",
                members.len(),
                self.min
            );
            self.pending = joined;
            return Some(Decision::Failed { epoch, reason });
        }
        self.epoch += 1;
        self.live.extend(&joined);
        self.members = members;
        let info = EpochInfo {
            epoch: self.epoch,
            table: self.table.clone(),
            members: self.members.iter().map(|&m| m as u32).collect(),
            joined: joined.iter().map(|&m| m as u32).collect(),
            left,
        };
        self.last = Some(info.clone());
        Some(Decision::Epoch(info))
    }

    /// A process asks to join: a place is reserved for it, or the reason
    /// it is refused (the job is at its maximum).
    pub fn reserve(&mut self) -> Result<(), Refusal> {
        // Members known to be gone leave at the next epoch: they hold no place.
        let live = self
            .members
            .iter()
            .filter(|m| self.live.contains(m))
            .count();
        let taken = live + self.pending.len() + self.reserved;
        if taken >= self.max {
            return Err(Refusal::Full {
                live,
                waiting: self.pending.len() + self.reserved,
                max: self.max,
            });
        }
        self.reserved += 1;
        Ok(())
    }

    /// A member id for a process holding a reservation (its key pending),
    /// or `None` (and the reservation given back) once the job issued
    /// [`MAX_MEMBERS`].
    pub fn issue(&mut self, peer: PeerInfo) -> Option<usize> {
        if self.table.len() >= MAX_MEMBERS {
            self.reserved -= 1;
            return None;
        }
        self.table.push(peer);
        Some(self.table.len() - 1)
    }

    /// Give back a reservation whose join failed before an id was ready.
    pub fn release(&mut self) {
        self.reserved -= 1;
    }

    /// The reservation of `id` ends: `Some(key)` when the process is ready
    /// with the certificate whose key is `key` (it waits for the next
    /// epoch), `None` when it abandoned its join (its id is revoked).
    pub fn ready(&mut self, id: usize, key: Option<[u8; 32]>) {
        self.reserved -= 1;
        let pin = match key {
            Some(k) => {
                self.pending.push(id);
                KeyPin::Pinned(k)
            }
            None => KeyPin::Revoked,
        };
        if let Some(m) = self.table.get_mut(id) {
            m.key = pin;
        }
    }

    /// The epoch that admitted waiting member `id`, once there is one.
    pub fn admitted(&self, id: usize) -> Option<EpochInfo> {
        self.last
            .clone()
            .filter(|i| i.joined.contains(&(id as u32)) && self.members.contains(&id))
    }

    /// Waiting member `id` left before an epoch admitted it: it never
    /// becomes a member and its id is revoked. Returns whether it had been
    /// admitted already (then it is gone like any member).
    pub fn left_waiting(&mut self, id: usize) -> bool {
        if self.admitted(id).is_some() {
            return true;
        }
        self.pending.retain(|&p| p != id);
        if let Some(m) = self.table.get_mut(id) {
            m.key = KeyPin::Revoked;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(i: usize) -> PeerInfo {
        PeerInfo {
            addr: ([127, 0, 0, 1], 1000 + i as u16).into(),
            lanes: Vec::new(),
            host: "h".into(),
            pid: i as u32,
            key: KeyPin::Pinned([i as u8; 32]),
        }
    }

    fn formed(n: usize, min: usize, max: usize) -> Elastic {
        let mut e = Elastic::new(min, max);
        e.formed(&(0..n).map(peer).collect::<Vec<_>>());
        e
    }

    #[test]
    fn a_membership_point_admits_joiners_and_drops_the_gone() {
        let mut e = formed(3, 2, 4);
        e.reserve().unwrap();
        let id = e.issue(peer(3)).unwrap();
        e.ready(id, Some([9; 32]));
        e.gone(1);
        e.request(0, 1).unwrap();
        assert_eq!(e.decide(), None, "member 2 has not asked yet");
        e.request(2, 1).unwrap();
        let Some(Decision::Epoch(info)) = e.decide() else {
            panic!("no epoch decided");
        };
        assert_eq!(info.epoch, 2);
        assert_eq!(info.members, [0, 2, 3]);
        assert_eq!((info.joined, info.left), (vec![3], vec![1]));
        assert_eq!(e.admitted(id).map(|i| i.epoch), Some(2));
        assert!(e.request(0, 1).is_err(), "a request for a past epoch");
    }

    #[test]
    fn joiners_past_the_maximum_and_epochs_below_the_minimum_are_refused() {
        let mut e = formed(2, 2, 3);
        e.reserve().unwrap();
        assert!(e
            .reserve()
            .unwrap_err()
            .to_string()
            .contains("maximum of 3"));
        e.release();
        e.gone(1);
        e.request(0, 1).unwrap();
        match e.decide() {
            Some(Decision::Failed { epoch: 1, reason }) => {
                assert!(reason.contains("minimum of 2"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(e.epoch(), 1);
    }

    #[test]
    fn an_abandoned_or_departed_joiner_is_revoked() {
        let mut e = formed(2, 1, 4);
        e.reserve().unwrap();
        let a = e.issue(peer(2)).unwrap();
        e.ready(a, None);
        assert_eq!(e.table()[a].key, KeyPin::Revoked);
        e.reserve().unwrap();
        let b = e.issue(peer(3)).unwrap();
        e.ready(b, Some([3; 32]));
        assert!(!e.left_waiting(b));
        assert_eq!(e.table()[b].key, KeyPin::Revoked);
        assert_eq!(e.pending(), 0);
    }

    /// Random events against the invariants (a small model of the fuzz
    /// target, run in every test pass).
    #[test]
    fn random_event_sequences_keep_the_invariants() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move |n: usize| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % n as u64) as usize
        };
        let mut decided = 0;
        for _ in 0..200 {
            let (min, max) = (1 + next(3), 4 + next(4));
            let mut e = formed(1 + next(max), min, max);
            let mut last_epoch = e.epoch();
            let mut waiting: Vec<usize> = Vec::new();
            for _ in 0..100 {
                match next(6) {
                    0 if e.reserve().is_ok() => {
                        let id = e.issue(peer(e.table().len())).unwrap();
                        let ok = next(4) > 0;
                        e.ready(id, ok.then_some([1; 32]));
                        if ok {
                            waiting.push(id);
                        }
                    }
                    1 => e.gone(next(e.table().len().max(1))),
                    2 => {
                        let m = next(e.table().len().max(1));
                        if !waiting.contains(&m) {
                            let _ = e.request(m, e.epoch());
                        }
                    }
                    3 if !waiting.is_empty() => {
                        let w = waiting.swap_remove(next(waiting.len()));
                        if e.left_waiting(w) {
                            e.gone(w);
                        }
                    }
                    _ => {}
                }
                if let Some(Decision::Epoch(info)) = e.decide() {
                    // The joiners it admitted are told now (and only then
                    // can they reach a membership point).
                    waiting.retain(|w| e.admitted(*w).is_none());
                    decided += 1;
                    assert!(info.epoch > last_epoch);
                    last_epoch = info.epoch;
                    let set: BTreeSet<u32> = info.members.iter().copied().collect();
                    assert_eq!(set.len(), info.members.len(), "a member twice");
                    assert!(info.members.len() <= max, "{} members", info.members.len());
                    for m in &info.members {
                        assert!(
                            matches!(info.table[*m as usize].key, KeyPin::Pinned(_)),
                            "member {m} has no pinned key"
                        );
                    }
                }
                let live = e.members.iter().filter(|m| e.live.contains(m)).count();
                assert!(live + e.pending.len() + e.reserved <= max);
            }
        }
        assert!(decided > 100, "only {decided} epochs decided");
    }
}
