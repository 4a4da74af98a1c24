//! Dissemination barrier: in round k every rank signals rank + 2^k and
//! waits for rank - 2^k (zero-byte messages); after ceil(log2 p) rounds
//! every rank has transitively heard from every other.

use super::{Phase, Recv, Schedule};

pub(crate) fn plan(rank: usize, p: usize) -> Schedule {
    let mut s = Schedule::default();
    let mut d = 1;
    let mut sub = 0;
    while d < p {
        s.push(
            Phase::new(sub, Recv::Copy)
                .send((rank + d) % p, 0..0)
                .recv((rank + p - d) % p, 0..0),
        );
        d *= 2;
        sub += 1;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::super::sim;
    use super::*;

    #[test]
    fn every_rank_hears_from_every_other() {
        for p in 1..=17 {
            let plans: Vec<_> = (0..p).map(|r| plan(r, p)).collect();
            // Run with one symbolic element per rank so that "heard from"
            // is visible: each message carries the sender's knowledge.
            let mut bufs: Vec<_> = (0..p).map(|_| sim::empty(p, 0)).collect();
            sim::run(&plans, &mut bufs, None);
            // Knowledge propagation: simulate on sets.
            let mut know: Vec<u64> = (0..p).map(|r| 1 << r).collect();
            for round in 0..plans.first().map_or(0, |s| s.phases.len()) {
                let before = know.clone();
                for r in 0..p {
                    let x = &plans[r].phases[round].recvs[0];
                    know[r] |= before[x.peer];
                }
            }
            assert!(know.iter().all(|&k| k == (1u64 << p) - 1), "p={p}");
        }
    }
}
