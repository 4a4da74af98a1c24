//! Rabenseifner's allreduce: reduce-scatter by recursive halving, then
//! allgather by recursive doubling, on the power-of-two group left after
//! folding (see [`super::doubling::Fold`]). Sends about 2x the buffer per
//! rank like the ring, in 2 log2(p) steps instead of 2(p-1): the choice for
//! mid-sized buffers and many ranks.

use super::doubling::Fold;
use super::{blocks, Phase, Recv, Schedule};

/// Rabenseifner allreduce of `len` elements.
pub(crate) fn allreduce(rank: usize, p: usize, len: usize) -> Schedule {
    let f = Fold::new(rank, p);
    let mut s = Schedule::default();
    s.push(f.fold_in(rank, len));
    let k = f.p2.trailing_zeros() as u64;
    if let Some(nr) = f.new_rank {
        let blk = |lo: usize, hi: usize| blocks(len, f.p2, lo, hi);
        // Reduce-scatter by recursive halving: the window of blocks this
        // rank is responsible for halves at every step.
        let (mut lo, mut hi) = (0, f.p2);
        let mut mask = f.p2 / 2;
        let mut sub = 1;
        while mask >= 1 {
            let partner = f.real(nr ^ mask);
            let mid = lo + (hi - lo) / 2;
            let (keep, give) = if nr & mask == 0 {
                ((lo, mid), (mid, hi))
            } else {
                ((mid, hi), (lo, mid))
            };
            s.push(
                Phase::new(sub, Recv::Reduce)
                    .send(partner, blk(give.0, give.1))
                    .recv(partner, blk(keep.0, keep.1)),
            );
            (lo, hi) = keep;
            mask /= 2;
            sub += 1;
        }
        // Allgather by recursive doubling: the window doubles at every step.
        let mut mask = 1;
        while mask < f.p2 {
            let partner = f.real(nr ^ mask);
            let theirs = (lo ^ mask, (lo ^ mask) + (hi - lo));
            s.push(
                Phase::new(sub, Recv::Copy)
                    .send(partner, blk(lo, hi))
                    .recv(partner, blk(theirs.0, theirs.1)),
            );
            (lo, hi) = (lo.min(theirs.0), hi.max(theirs.1));
            mask *= 2;
            sub += 1;
        }
    }
    s.push(f.fold_out(rank, len, 1 + 2 * k));
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
