//! The seed's formation logic as a state machine with no I/O and no clock:
//! time is an argument. The QUIC driver in `seed/` feeds it events.

use crate::wire::control::{KeyPin, PeerInfo};
use std::time::{Duration, Instant};

/// What a joining rank tells the seed (the parts formation cares about).
#[derive(Clone, Debug)]
pub struct JoinInfo {
    /// Job id the rank was told to join.
    pub job_id: Option<String>,
    /// Rank it asks for.
    pub requested_rank: Option<usize>,
    /// World size it expects.
    pub world_size: Option<usize>,
    /// Its peer table entry.
    pub peer: PeerInfo,
}

/// The seed's answer to a join.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Admitted as this rank.
    Admit(usize),
    /// Refused, with a reason for the rank's error message.
    Refuse(String),
}

/// Where formation stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Ranks are still joining.
    Forming,
    /// Every rank joined: the peer table in rank order.
    Formed(Vec<PeerInfo>),
    /// Formation failed; the reason names who is missing.
    Failed(String),
}

/// Formation of one job's world.
pub struct SeedState {
    job_id: String,
    members: Vec<Option<PeerInfo>>,
    ready: Vec<bool>,
    deadline: Instant,
    timeout: Duration,
    phase: Phase,
}

impl SeedState {
    /// Expect `world_size` ranks before `now + timeout`.
    pub fn new(job_id: &str, world_size: usize, now: Instant, timeout: Duration) -> SeedState {
        SeedState {
            job_id: job_id.to_string(),
            members: vec![None; world_size],
            ready: vec![false; world_size],
            deadline: now + timeout,
            timeout,
            phase: Phase::Forming,
        }
    }

    /// Current phase.
    pub fn phase(&self) -> &Phase {
        &self.phase
    }

    /// When [`SeedState::handle_timeout`] must next be called.
    pub fn deadline(&self) -> Option<Instant> {
        matches!(self.phase, Phase::Forming).then_some(self.deadline)
    }

    fn joined(&self) -> usize {
        self.ready.iter().filter(|&&r| r).count()
    }

    fn missing(&self) -> Vec<usize> {
        (0..self.members.len())
            .filter(|&r| !self.ready[r])
            .collect()
    }

    fn free(&self) -> Option<usize> {
        (0..self.members.len()).find(|&r| self.members[r].is_none())
    }

    /// "3/4 ranks joined; waiting for rank(s) \[2\]".
    pub fn progress(&self) -> String {
        let missing = self.missing();
        if missing.is_empty() {
            format!("{}/{} ranks joined", self.joined(), self.members.len())
        } else {
            format!(
                "{}/{} ranks joined; waiting for rank(s) {}",
                self.joined(),
                self.members.len(),
                list(&missing)
            )
        }
    }

    /// A rank asks to join.
    pub fn handle_join(&mut self, j: JoinInfo) -> Decision {
        let n = self.members.len();
        match &self.phase {
            Phase::Forming => {}
            Phase::Formed(_) => {
                return Decision::Refuse(format!(
                    "job {} is already formed with {n} ranks and does not accept joiners",
                    self.job_id
                ))
            }
            Phase::Failed(reason) => return Decision::Refuse(reason.clone()),
        }
        if let Some(job) = &j.job_id {
            if *job != self.job_id {
                return Decision::Refuse(format!(
                    "this seed runs job {}, the rank was started for job {job}",
                    self.job_id
                ));
            }
        }
        if let Some(ws) = j.world_size {
            if ws != n {
                return Decision::Refuse(format!(
                    "the seed forms a world of {n} ranks, the rank was told {ws}"
                ));
            }
        }
        let rank = match j.requested_rank {
            Some(r) if r >= n => {
                return Decision::Refuse(format!(
                    "rank {r} requested, but the world has ranks 0..{}",
                    n.saturating_sub(1)
                ))
            }
            Some(r) => {
                if let Some(p) = &self.members[r] {
                    return Decision::Refuse(format!(
                        "rank {r} is already taken by pid {} on {} ({}); is the same rank started twice?",
                        p.pid, p.host, p.addr
                    ));
                }
                r
            }
            None => match self.free() {
                Some(r) => r,
                None => return Decision::Refuse("no free rank".into()),
            },
        };
        self.members[rank] = Some(j.peer);
        Decision::Admit(rank)
    }

    /// An admitted rank is ready for peer connections, holding the
    /// certificate whose key pin is `key` (the seed issued it on this
    /// connection); the peer table pins that key for the rank. The world is
    /// formed when every rank is ready.
    pub fn handle_ready(&mut self, rank: usize, key: [u8; 32]) {
        if !matches!(self.phase, Phase::Forming) {
            return;
        }
        let Some(Some(member)) = self.members.get_mut(rank) else {
            return;
        };
        member.key = KeyPin::Pinned(key);
        self.ready[rank] = true;
        if self.joined() == self.members.len() {
            let table = self.members.iter().flatten().cloned().collect();
            self.phase = Phase::Formed(table);
        }
    }

    /// A rank's connection ended before formation completed: free its slot.
    pub fn handle_leave(&mut self, rank: usize) {
        if matches!(self.phase, Phase::Forming) {
            if let Some(m) = self.members.get_mut(rank) {
                *m = None;
                self.ready[rank] = false;
            }
        }
    }

    /// Advance the clock; fails formation once the deadline has passed.
    pub fn handle_timeout(&mut self, now: Instant) {
        if matches!(self.phase, Phase::Forming) && now >= self.deadline {
            self.phase = Phase::Failed(format!(
                "formation timed out after {:?}: {}; those processes never reached the \
                 seed (did they start? can they reach it? raise the formation timeout \
                 if they start slowly)",
                self.timeout,
                self.progress()
            ));
        }
    }
}

fn list(v: &[usize]) -> String {
    if v.len() <= 16 {
        format!("{v:?}")
    } else {
        format!("{:?} and {} more", &v[..16], v.len() - 16)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(rank: Option<usize>, port: u16) -> JoinInfo {
        JoinInfo {
            job_id: Some("j1".into()),
            requested_rank: rank,
            world_size: Some(3),
            peer: PeerInfo {
                addr: format!("127.0.0.1:{port}").parse().unwrap(),
                lanes: Vec::new(),
                host: "h".into(),
                pid: port as u32,
                key: KeyPin::Pending,
            },
        }
    }

    #[test]
    fn forms_when_all_ranks_joined_in_rank_order() {
        let t0 = Instant::now();
        let mut s = SeedState::new("j1", 3, t0, Duration::from_secs(5));
        assert_eq!(s.handle_join(info(Some(2), 2)), Decision::Admit(2));
        assert_eq!(s.handle_join(info(None, 0)), Decision::Admit(0));
        s.handle_ready(2, [2; 32]);
        s.handle_ready(0, [0; 32]);
        assert_eq!(s.progress(), "2/3 ranks joined; waiting for rank(s) [1]");
        assert_eq!(s.phase(), &Phase::Forming);
        assert_eq!(s.handle_join(info(Some(1), 1)), Decision::Admit(1));
        assert_eq!(s.phase(), &Phase::Forming, "admitted but not ready");
        s.handle_ready(1, [1; 32]);
        match s.phase() {
            Phase::Formed(t) => {
                assert_eq!(t.iter().map(|p| p.pid).collect::<Vec<_>>(), vec![0, 1, 2]);
                // Each entry pins the key its rank was ready with.
                let keys: Vec<_> = t.iter().map(|p| p.key).collect();
                assert_eq!(
                    keys,
                    vec![
                        KeyPin::Pinned([0; 32]),
                        KeyPin::Pinned([1; 32]),
                        KeyPin::Pinned([2; 32])
                    ]
                );
            }
            p => panic!("{p:?}"),
        }
        assert!(matches!(s.handle_join(info(None, 9)), Decision::Refuse(_)));
        assert_eq!(s.deadline(), None);
    }

    #[test]
    fn refuses_bad_requests_with_reasons() {
        let t0 = Instant::now();
        let mut s = SeedState::new("j1", 3, t0, Duration::from_secs(5));
        assert_eq!(s.handle_join(info(Some(1), 1)), Decision::Admit(1));
        let Decision::Refuse(r) = s.handle_join(info(Some(1), 7)) else {
            panic!()
        };
        assert!(r.contains("already taken by pid 1"), "{r}");
        let Decision::Refuse(r) = s.handle_join(info(Some(3), 7)) else {
            panic!()
        };
        assert!(r.contains("0..2"), "{r}");
        let mut wrong = info(None, 7);
        wrong.world_size = Some(4);
        let Decision::Refuse(r) = s.handle_join(wrong) else {
            panic!()
        };
        assert!(r.contains("3 ranks") && r.contains("told 4"), "{r}");
        let mut wrong = info(None, 7);
        wrong.job_id = Some("other".into());
        assert!(matches!(s.handle_join(wrong), Decision::Refuse(_)));
    }

    #[test]
    fn deadline_names_missing_ranks_and_leavers_free_their_slot() {
        let t0 = Instant::now();
        let mut s = SeedState::new("j1", 3, t0, Duration::from_secs(5));
        s.handle_join(info(Some(0), 0));
        s.handle_join(info(Some(2), 2));
        s.handle_ready(0, [0; 32]);
        s.handle_ready(2, [2; 32]);
        s.handle_leave(2);
        s.handle_timeout(t0 + Duration::from_secs(4));
        assert_eq!(s.phase(), &Phase::Forming);
        s.handle_timeout(t0 + Duration::from_secs(5));
        let Phase::Failed(r) = s.phase() else {
            panic!()
        };
        assert!(
            r.contains("1/3 ranks joined; waiting for rank(s) [1, 2]"),
            "{r}"
        );
        assert!(matches!(
            s.handle_join(info(Some(1), 1)),
            Decision::Refuse(_)
        ));
    }
}
