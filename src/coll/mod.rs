//! Collective algorithms as schedules, and the executor that runs them.
//!
//! Every algorithm is a pure function `plan(rank, size, ...) -> Schedule`
//! over communicator ranks and element ranges of one working buffer; no I/O,
//! so plans are unit-tested exhaustively (every element produced exactly
//! once, every send matched by a receive) by the simulator in this module's
//! tests. [`exec`] runs any schedule over any [`Transport`]; [`select`]
//! picks an algorithm with an alpha-beta-gamma cost model.
//!
//! Sees only the `Transport` trait and the mailbox, never quinn, and never
//! `comm` or `bootstrap`.
//!
//! [`Transport`]: crate::transport::Transport

pub(crate) mod barrier;
pub(crate) mod binomial;
pub(crate) mod device;
pub(crate) mod doubling;
pub(crate) mod exec;
pub(crate) mod halving;
pub(crate) mod linear;
pub(crate) mod ring;
pub mod select;

pub use crate::wire::CollKind;
use std::ops::Range;

/// One message of a phase: to or from communicator rank `peer`, covering
/// the elements `range` of the working buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Xfer {
    pub peer: usize,
    pub range: Range<usize>,
}

/// What a phase does with what it receives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Recv {
    /// Overwrite the range.
    Copy,
    /// Reduce into the range (`buf = buf op received`).
    Reduce,
}

/// A set of messages issued together. All sends of a phase read the buffer
/// as it was when the phase began; its receives are applied as they arrive.
/// A phase ends when all its messages are done. `sub` keys its messages: a
/// sender's phase and the receiver's phase for one message use the same
/// `sub`, and a rank sends at most one message per (peer, sub).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Phase {
    pub sub: u64,
    pub sends: Vec<Xfer>,
    pub recvs: Vec<Xfer>,
    pub mode: Recv,
}

impl Phase {
    pub(crate) fn new(sub: u64, mode: Recv) -> Phase {
        Phase {
            sub,
            sends: Vec::new(),
            recvs: Vec::new(),
            mode,
        }
    }

    pub(crate) fn send(mut self, peer: usize, range: Range<usize>) -> Phase {
        self.sends.push(Xfer { peer, range });
        self
    }

    pub(crate) fn recv(mut self, peer: usize, range: Range<usize>) -> Phase {
        self.recvs.push(Xfer { peer, range });
        self
    }
}

/// The phases one rank runs, in order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Schedule {
    pub phases: Vec<Phase>,
}

impl Schedule {
    pub(crate) fn push(&mut self, p: Phase) {
        if !p.sends.is_empty() || !p.recvs.is_empty() {
            self.phases.push(p);
        }
    }

    pub(crate) fn extend(&mut self, other: Schedule) {
        self.phases.extend(other.phases);
    }
}

/// Balanced partition of `len` elements into `parts` blocks: the first
/// `len % parts` blocks get one element more. Returns block `i`'s start.
pub(crate) fn block_start(len: usize, parts: usize, i: usize) -> usize {
    let base = len / parts;
    let rem = len % parts;
    i * base + i.min(rem)
}

/// Elements of blocks `lo..hi` of the balanced partition.
pub(crate) fn blocks(len: usize, parts: usize, lo: usize, hi: usize) -> Range<usize> {
    block_start(len, parts, lo)..block_start(len, parts, hi)
}

/// Largest power of two not above `n` (n >= 1).
pub(crate) fn pow2_floor(n: usize) -> usize {
    1 << (usize::BITS - 1 - n.leading_zeros())
}

#[cfg(test)]
pub(crate) mod sim {
    //! Runs the schedules of all ranks against each other on symbolic data:
    //! every element is a vector of per-rank contribution counts, so the
    //! result shows exactly which ranks' data reached which element, and how
    //! often. Fails on a send without a receive (or the reverse), on
    //! mismatched ranges, and on deadlock.

    use super::*;
    use std::collections::HashMap;

    /// Per element: how many times each rank's contribution is in it.
    pub type Sym = Vec<Vec<u32>>;

    /// Run `plans[r]` (one per rank) on `bufs[r]`; each rank may have a
    /// separate send source (`srcs[r]`), as in all_to_all.
    pub fn run(plans: &[Schedule], bufs: &mut [Sym], srcs: Option<&[Sym]>) {
        let p = plans.len();
        let mut pc = vec![0usize; p];
        // In flight: (src, dst, sub) -> data.
        let mut wire: HashMap<(usize, usize, u64), Vec<Vec<u32>>> = HashMap::new();
        let mut sent = vec![false; p];
        loop {
            let mut progressed = false;
            for r in 0..p {
                let Some(ph) = plans[r].phases.get(pc[r]) else {
                    continue;
                };
                if !sent[r] {
                    for s in &ph.sends {
                        assert!(s.peer < p && s.peer != r, "rank {r} sends to {}", s.peer);
                        let from = match srcs {
                            Some(srcs) => &srcs[r],
                            None => &bufs[r],
                        };
                        let data = from[s.range.clone()].to_vec();
                        let k = (r, s.peer, ph.sub);
                        assert!(wire.insert(k, data).is_none(), "two messages keyed {k:?}");
                    }
                    sent[r] = true;
                    progressed = true;
                }
                let ready = ph
                    .recvs
                    .iter()
                    .all(|x| wire.contains_key(&(x.peer, r, ph.sub)));
                if ready {
                    for x in &ph.recvs {
                        let data = wire.remove(&(x.peer, r, ph.sub)).unwrap();
                        assert_eq!(
                            data.len(),
                            x.range.len(),
                            "rank {r} sub {} from {}",
                            ph.sub,
                            x.peer
                        );
                        for (d, s) in bufs[r][x.range.clone()].iter_mut().zip(data) {
                            match ph.mode {
                                Recv::Copy => *d = s,
                                Recv::Reduce => d.iter_mut().zip(s).for_each(|(a, b)| *a += b),
                            }
                        }
                    }
                    pc[r] += 1;
                    sent[r] = false;
                    progressed = true;
                }
            }
            if !progressed {
                break;
            }
        }
        for r in 0..p {
            assert_eq!(pc[r], plans[r].phases.len(), "rank {r} stuck (deadlock)");
        }
        assert!(
            wire.is_empty(),
            "messages never received: {:?}",
            wire.keys().collect::<Vec<_>>()
        );
    }

    /// A buffer of `len` elements all holding only rank `r`'s contribution.
    pub fn own(p: usize, r: usize, len: usize) -> Vec<Vec<u32>> {
        let mut e = vec![0; p];
        e[r] = 1;
        vec![e; len]
    }

    pub fn empty(p: usize, len: usize) -> Vec<Vec<u32>> {
        vec![vec![0; p]; len]
    }

    pub const LENS: [usize; 6] = [0, 1, 2, 7, 37, 1000];

    /// Check an allreduce plan for world sizes 1..=17 and every length in
    /// [`LENS`]: every rank ends with every rank's contribution exactly once.
    pub fn check_allreduce(plan: fn(usize, usize, usize) -> Schedule) {
        for p in 1..=17 {
            for len in LENS {
                let plans: Vec<_> = (0..p).map(|r| plan(r, p, len)).collect();
                let mut bufs: Vec<_> = (0..p).map(|r| own(p, r, len)).collect();
                run(&plans, &mut bufs, None);
                for b in &bufs {
                    assert!(
                        b.iter().all(|e| e.iter().all(|&c| c == 1)),
                        "p={p} len={len}"
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn balanced_blocks_cover_everything_once() {
        for len in [0, 1, 5, 16, 17, 1001] {
            for parts in 1..=9 {
                assert_eq!(block_start(len, parts, 0), 0);
                assert_eq!(block_start(len, parts, parts), len);
                for i in 0..parts {
                    let b = blocks(len, parts, i, i + 1);
                    assert!(b.len() == len / parts || b.len() == len / parts + 1);
                }
            }
        }
        assert_eq!(pow2_floor(1), 1);
        assert_eq!(pow2_floor(7), 4);
        assert_eq!(pow2_floor(8), 8);
    }
}
