//! Recursive doubling allreduce (latency-optimal for small buffers): ranks
//! exchange their whole buffer with partners at distance 1, 2, 4, ... and
//! reduce. A world size that is not a power of two is folded first: of the
//! first `2 * rem` ranks, each even rank hands its data to the odd rank
//! above it and gets the result back at the end.
//!
//! At every step both partners combine the same two values, and every op is
//! commutative, so all ranks end bitwise identical.

use super::{pow2_floor, Phase, Recv, Schedule};

/// Where a rank stands in the folded power-of-two group.
pub(crate) struct Fold {
    /// Size of the power-of-two group.
    pub p2: usize,
    /// Ranks folded away (`p - p2`).
    pub rem: usize,
    /// This rank's index in the group, `None` if it was folded away.
    pub new_rank: Option<usize>,
}

impl Fold {
    pub(crate) fn new(rank: usize, p: usize) -> Fold {
        let p2 = pow2_floor(p);
        let rem = p - p2;
        let new_rank = if rank < 2 * rem {
            (rank % 2 == 1).then_some(rank / 2)
        } else {
            Some(rank - rem)
        };
        Fold { p2, rem, new_rank }
    }

    /// Communicator rank of group member `nr`.
    pub(crate) fn real(&self, nr: usize) -> usize {
        if nr < self.rem {
            2 * nr + 1
        } else {
            nr + self.rem
        }
    }

    /// Phase folding the whole buffer into the group (sub 0).
    pub(crate) fn fold_in(&self, rank: usize, len: usize) -> Phase {
        let ph = Phase::new(0, Recv::Reduce);
        if rank >= 2 * self.rem {
            ph
        } else if rank.is_multiple_of(2) {
            ph.send(rank + 1, 0..len)
        } else {
            ph.recv(rank - 1, 0..len)
        }
    }

    /// Phase handing the result back to folded ranks (sub `sub`).
    pub(crate) fn fold_out(&self, rank: usize, len: usize, sub: u64) -> Phase {
        let ph = Phase::new(sub, Recv::Copy);
        if rank >= 2 * self.rem {
            ph
        } else if rank.is_multiple_of(2) {
            ph.recv(rank + 1, 0..len)
        } else {
            ph.send(rank - 1, 0..len)
        }
    }
}

/// Recursive doubling allreduce of `len` elements.
pub(crate) fn allreduce(rank: usize, p: usize, len: usize) -> Schedule {
    let f = Fold::new(rank, p);
    let mut s = Schedule::default();
    s.push(f.fold_in(rank, len));
    let steps = f.p2.trailing_zeros() as u64;
    if let Some(nr) = f.new_rank {
        let mut mask = 1;
        let mut sub = 1;
        while mask < f.p2 {
            let partner = f.real(nr ^ mask);
            s.push(
                Phase::new(sub, Recv::Reduce)
                    .send(partner, 0..len)
                    .recv(partner, 0..len),
            );
            mask <<= 1;
            sub += 1;
        }
    }
    s.push(f.fold_out(rank, len, 1 + steps));
    s
}

#[cfg(test)]
mod tests {
    use super::super::sim;
    use super::*;

    #[test]
    fn allreduce_sums_every_rank_exactly_once() {
        sim::check_allreduce(allreduce);
    }
}
