//! Binomial trees rooted at any rank (MPICH's decreasing-mask form, so that
//! every subtree is a contiguous range of relative ranks): broadcast for
//! small buffers, reduce, and the scatter half of van de Geijn's large
//! broadcast (scatter, then ring allgather).

use super::ring::ring_phases;
use super::{blocks, Phase, Recv, Schedule};

/// Relative rank of `rank` for a tree rooted at `root`.
fn rel(rank: usize, root: usize, p: usize) -> usize {
    (rank + p - root) % p
}

/// Number of tree levels: the smallest k with 2^k >= p.
fn levels(p: usize) -> u32 {
    p.next_power_of_two().trailing_zeros()
}

/// The mask at which relative rank `vr` receives from its parent
/// (`vr - mask`); for the root, 2^levels.
fn parent_mask(vr: usize, p: usize) -> usize {
    if vr == 0 {
        1 << levels(p)
    } else {
        1 << vr.trailing_zeros()
    }
}

/// Binomial broadcast of `len` elements from `root`.
pub(crate) fn broadcast(rank: usize, p: usize, len: usize, root: usize) -> Schedule {
    let vr = rel(rank, root, p);
    let real = |v: usize| (v + root) % p;
    let mut s = Schedule::default();
    let top = parent_mask(vr, p);
    if vr != 0 {
        let ph = Phase::new(top.trailing_zeros() as u64, Recv::Copy);
        s.push(ph.recv(real(vr - top), 0..len));
    }
    let mut m = top / 2;
    while m >= 1 {
        if vr + m < p {
            s.push(Phase::new(m.trailing_zeros() as u64, Recv::Copy).send(real(vr + m), 0..len));
        }
        m /= 2;
    }
    s
}

/// Binomial reduce of `len` elements to `root` (the buffer accumulates the
/// subtree's contributions, then goes to the parent).
pub(crate) fn reduce(rank: usize, p: usize, len: usize, root: usize) -> Schedule {
    let vr = rel(rank, root, p);
    let real = |v: usize| (v + root) % p;
    let mut s = Schedule::default();
    let top = parent_mask(vr, p);
    let mut m = 1;
    while m < top {
        if vr + m < p {
            s.push(Phase::new(m.trailing_zeros() as u64, Recv::Reduce).recv(real(vr + m), 0..len));
        }
        m *= 2;
    }
    if vr != 0 {
        let ph = Phase::new(top.trailing_zeros() as u64, Recv::Reduce);
        s.push(ph.send(real(vr - top), 0..len));
    }
    s
}

/// Van de Geijn broadcast: binomial scatter of `p` balanced blocks
/// (relative rank v ends with block v), then ring allgather.
pub(crate) fn scatter_allgather(rank: usize, p: usize, len: usize, root: usize) -> Schedule {
    let vr = rel(rank, root, p);
    let real = |v: usize| (v + root) % p;
    let blk = |lo: usize, hi: usize| blocks(len, p, lo, hi.min(p));
    let mut s = Schedule::default();
    let top = parent_mask(vr, p);
    if vr != 0 {
        let ph = Phase::new(top.trailing_zeros() as u64, Recv::Copy);
        s.push(ph.recv(real(vr - top), blk(vr, vr + top)));
    }
    let mut m = top / 2;
    while m >= 1 {
        if vr + m < p {
            let ph = Phase::new(m.trailing_zeros() as u64, Recv::Copy);
            s.push(ph.send(real(vr + m), blk(vr + m, vr + 2 * m)));
        }
        m /= 2;
    }
    let sub0 = levels(p) as u64 + 1;
    s.extend(ring_phases(vr, p, 0, Recv::Copy, sub0, &real, &|i| {
        blk(i, i + 1)
    }));
    s
}

#[cfg(test)]
mod tests {
    use super::super::sim::{self, LENS};
    use super::*;

    #[test]
    fn broadcasts_deliver_the_roots_data_everywhere() {
        for p in 1..=17 {
            for root in [0, p / 2, p - 1] {
                for len in LENS {
                    for plan in [broadcast, scatter_allgather] {
                        let plans: Vec<_> = (0..p).map(|r| plan(r, p, len, root)).collect();
                        let mut bufs: Vec<_> = (0..p)
                            .map(|r| {
                                if r == root {
                                    sim::own(p, r, len)
                                } else {
                                    sim::empty(p, len)
                                }
                            })
                            .collect();
                        sim::run(&plans, &mut bufs, None);
                        let want = sim::own(p, root, len);
                        assert!(
                            bufs.iter().all(|b| *b == want),
                            "p={p} root={root} len={len}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn reduce_collects_every_rank_once_at_the_root() {
        for p in 1..=17 {
            for root in [0, p / 2, p - 1] {
                for len in LENS {
                    let plans: Vec<_> = (0..p).map(|r| reduce(r, p, len, root)).collect();
                    let mut bufs: Vec<_> = (0..p).map(|r| sim::own(p, r, len)).collect();
                    sim::run(&plans, &mut bufs, None);
                    assert!(bufs[root].iter().all(|e| e.iter().all(|&c| c == 1)));
                }
            }
        }
    }
}
