//! Linear (flat) gather, scatter and all-to-all: the root, or every rank,
//! talks to every other directly, all messages in one phase. Blocks of `m`
//! elements are placed in rank order.

use super::{Phase, Recv, Schedule};

/// Gather: each rank sends its `m` elements; the root places rank i's at
/// block i (its own block is copied locally by the caller).
pub(crate) fn gather(rank: usize, p: usize, m: usize, root: usize) -> Schedule {
    let mut ph = Phase::new(0, Recv::Copy);
    if rank == root {
        for i in (0..p).filter(|&i| i != root) {
            ph = ph.recv(i, i * m..(i + 1) * m);
        }
    } else {
        ph = ph.send(root, 0..m);
    }
    let mut s = Schedule::default();
    s.push(ph);
    s
}

/// Scatter: the root sends block i to rank i, which receives `m` elements.
pub(crate) fn scatter(rank: usize, p: usize, m: usize, root: usize) -> Schedule {
    let mut ph = Phase::new(0, Recv::Copy);
    if rank == root {
        for i in (0..p).filter(|&i| i != root) {
            ph = ph.send(i, i * m..(i + 1) * m);
        }
    } else {
        ph = ph.recv(root, 0..m);
    }
    let mut s = Schedule::default();
    s.push(ph);
    s
}

/// All-to-all: block j of the send buffer goes to rank j, which places it
/// at block `rank` of its receive buffer. Ranks start with the partner
/// after them so that not everyone sends to rank 0 first.
pub(crate) fn all_to_all(rank: usize, p: usize, m: usize) -> Schedule {
    let mut ph = Phase::new(0, Recv::Copy);
    for k in 1..p {
        let to = (rank + k) % p;
        let from = (rank + p - k) % p;
        ph = ph
            .send(to, to * m..(to + 1) * m)
            .recv(from, from * m..(from + 1) * m);
    }
    let mut s = Schedule::default();
    s.push(ph);
    s
}

#[cfg(test)]
mod tests {
    use super::super::sim;
    use super::*;

    #[test]
    fn gather_scatter_all_to_all_place_blocks() {
        for p in 1..=17 {
            for m in [0, 1, 5] {
                for root in [0, p - 1] {
                    let plans: Vec<_> = (0..p).map(|r| gather(r, p, m, root)).collect();
                    let mut bufs: Vec<_> = (0..p)
                        .map(|r| {
                            if r == root {
                                sim::empty(p, p * m)
                            } else {
                                sim::own(p, r, m)
                            }
                        })
                        .collect();
                    sim::run(&plans, &mut bufs, None);
                    for i in (0..p).filter(|&i| i != root) {
                        assert_eq!(bufs[root][i * m..(i + 1) * m], sim::own(p, i, m)[..]);
                    }
                    let plans: Vec<_> = (0..p).map(|r| scatter(r, p, m, root)).collect();
                    let mut bufs: Vec<_> = (0..p)
                        .map(|r| {
                            if r == root {
                                sim::own(p, r, p * m)
                            } else {
                                sim::empty(p, m)
                            }
                        })
                        .collect();
                    sim::run(&plans, &mut bufs, None);
                    for (r, b) in bufs.iter().enumerate().filter(|(r, _)| *r != root) {
                        assert_eq!(b[..], sim::own(p, root, m)[..], "rank {r}");
                    }
                }
                let plans: Vec<_> = (0..p).map(|r| all_to_all(r, p, m)).collect();
                let srcs: Vec<_> = (0..p).map(|r| sim::own(p, r, p * m)).collect();
                let mut bufs: Vec<_> = (0..p).map(|_| sim::empty(p, p * m)).collect();
                sim::run(&plans, &mut bufs, Some(&srcs));
                for (r, b) in bufs.iter().enumerate() {
                    for j in (0..p).filter(|&j| j != r) {
                        assert_eq!(b[j * m..(j + 1) * m], sim::own(p, j, m)[..]);
                    }
                }
            }
        }
    }
}
