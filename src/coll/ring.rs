//! Ring algorithms: reduce-scatter and allgather around the ring
//! 0 -> 1 -> ... -> p-1 -> 0, and allreduce as the two in sequence
//! (bandwidth-optimal: each rank sends 2(p-1)/p of the buffer).
//!
//! Every reduced block is computed by exactly one rank and then copied, so
//! all ranks end with bitwise-identical results.

use super::{blocks, Phase, Recv, Schedule};
use std::ops::Range;

/// `p - 1` ring steps: at step `s` the rank at ring position `pos` sends
/// block `pos + first - s` to its right and receives block
/// `pos + first - s - 1` from its left (`mode`: reduce or copy). Ring
/// positions map to communicator ranks by `at`, blocks to elements by `blk`.
///
/// Reduce-scatter (`Recv::Reduce`, `first` = f) leaves position `pos`
/// holding block `pos + f + 1` reduced over all ranks; allgather
/// (`Recv::Copy`) spreads the block each position starts with
/// (`pos + first`) to all.
pub(crate) fn ring_phases(
    pos: usize,
    p: usize,
    first: usize,
    mode: Recv,
    sub0: u64,
    at: &dyn Fn(usize) -> usize,
    blk: &dyn Fn(usize) -> Range<usize>,
) -> Schedule {
    let mut s = Schedule::default();
    let (right, left) = (at((pos + 1) % p), at((pos + p - 1) % p));
    for step in 0..p.saturating_sub(1) {
        let send = blk((pos + 2 * p + first - step) % p);
        let recv = blk((pos + 2 * p + first - step - 1) % p);
        let mut ph = Phase::new(sub0 + step as u64, mode);
        if !send.is_empty() {
            ph = ph.send(right, send);
        }
        if !recv.is_empty() {
            ph = ph.recv(left, recv);
        }
        s.push(ph);
    }
    s
}

/// Ring allreduce of `len` elements.
pub(crate) fn allreduce(rank: usize, p: usize, len: usize) -> Schedule {
    let id = |r: usize| r;
    let blk = |i: usize| blocks(len, p, i, i + 1);
    let mut s = ring_phases(rank, p, 0, Recv::Reduce, 0, &id, &blk);
    s.extend(ring_phases(rank, p, 1, Recv::Copy, p as u64, &id, &blk));
    s
}

/// Ring reduce-scatter: the buffer holds `p` blocks of `m` elements; rank
/// `r` ends with block `r` reduced.
pub(crate) fn reduce_scatter(rank: usize, p: usize, m: usize) -> Schedule {
    let blk = |i: usize| i * m..(i + 1) * m;
    ring_phases(rank, p, p - 1, Recv::Reduce, 0, &|r| r, &blk)
}

/// Ring allgather: the buffer holds `p` blocks of `m` elements; rank `r`
/// starts with block `r` and ends with all of them.
pub(crate) fn allgather(rank: usize, p: usize, m: usize) -> Schedule {
    let blk = |i: usize| i * m..(i + 1) * m;
    ring_phases(rank, p, 0, Recv::Copy, 0, &|r| r, &blk)
}

#[cfg(test)]
mod tests {
    use super::super::sim;
    use super::*;

    #[test]
    fn allreduce_sums_every_rank_exactly_once() {
        sim::check_allreduce(allreduce);
    }

    #[test]
    fn reduce_scatter_and_allgather_place_blocks() {
        for p in 1..=17 {
            for m in [0, 1, 3, 64] {
                let plans: Vec<_> = (0..p).map(|r| reduce_scatter(r, p, m)).collect();
                let mut bufs: Vec<_> = (0..p).map(|r| sim::own(p, r, p * m)).collect();
                sim::run(&plans, &mut bufs, None);
                for (r, b) in bufs.iter().enumerate() {
                    assert!(b[r * m..(r + 1) * m]
                        .iter()
                        .all(|e| e.iter().all(|&c| c == 1)));
                }
                let plans: Vec<_> = (0..p).map(|r| allgather(r, p, m)).collect();
                let mut bufs: Vec<_> = (0..p)
                    .map(|r| {
                        let mut b = sim::empty(p, p * m);
                        b[r * m..(r + 1) * m].clone_from_slice(&sim::own(p, r, m));
                        b
                    })
                    .collect();
                sim::run(&plans, &mut bufs, None);
                for b in &bufs {
                    for (i, e) in b.iter().enumerate() {
                        let mut want = vec![0; p];
                        want[i / m.max(1)] = 1;
                        assert_eq!(e, &want);
                    }
                }
            }
        }
    }
}
