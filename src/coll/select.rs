//! Choosing an algorithm with an alpha-beta-gamma cost model:
//! `alpha` seconds per message, `beta` seconds per byte moved, `gamma`
//! seconds per byte reduced. The defaults were measured on loopback QUIC on
//! a 2-core machine (docs/performance.md); an algorithm can be forced for
//! benchmarking with [`crate::Config::set_algorithm`] or the
//! `RANKMESH_ALGORITHM` environment variable.

pub use crate::config::Algorithm;

/// Cost model parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CostModel {
    /// Seconds per message (latency).
    pub alpha: f64,
    /// Seconds per byte transferred.
    pub beta: f64,
    /// Seconds per byte reduced.
    pub gamma: f64,
}

impl Default for CostModel {
    fn default() -> CostModel {
        CostModel {
            alpha: 60e-6,
            beta: 1.0 / 1.2e9,
            gamma: 1.0 / 6e9,
        }
    }
}

impl CostModel {
    /// Estimated seconds for an allreduce of `n` bytes on `p` ranks.
    pub fn allreduce(&self, a: Algorithm, p: usize, n: usize) -> f64 {
        let (pf, nf) = (p as f64, n as f64);
        let p2 = super::pow2_floor(p.max(1)) as f64;
        let lg = p2.log2();
        let fold = if p2 < pf {
            2.0 * (self.alpha + nf * self.beta) + nf * self.gamma
        } else {
            0.0
        };
        match a {
            Algorithm::Ring => {
                2.0 * (pf - 1.0) * self.alpha
                    + 2.0 * (pf - 1.0) / pf * nf * self.beta
                    + (pf - 1.0) / pf * nf * self.gamma
            }
            Algorithm::Rabenseifner => {
                fold + 2.0 * lg * self.alpha
                    + 2.0 * (p2 - 1.0) / p2 * nf * self.beta
                    + (p2 - 1.0) / p2 * nf * self.gamma
            }
            _ => fold + lg * (self.alpha + nf * (self.beta + self.gamma)),
        }
    }

    /// Estimated seconds for a broadcast of `n` bytes on `p` ranks.
    pub fn broadcast(&self, a: Algorithm, p: usize, n: usize) -> f64 {
        let (pf, nf) = (p as f64, n as f64);
        let lg = pf.log2().ceil();
        match a {
            Algorithm::ScatterAllgather => {
                (lg + pf - 1.0) * self.alpha + 2.0 * (pf - 1.0) / pf * nf * self.beta
            }
            _ => lg * (self.alpha + nf * self.beta),
        }
    }

    /// The allreduce algorithm to use (`forced` wins when it is one).
    pub fn pick_allreduce(&self, forced: Option<Algorithm>, p: usize, n: usize) -> Algorithm {
        const CHOICES: [Algorithm; 3] = [
            Algorithm::RecursiveDoubling,
            Algorithm::Rabenseifner,
            Algorithm::Ring,
        ];
        if let Some(f) = forced.filter(|f| CHOICES.contains(f)) {
            return f;
        }
        cheapest(&CHOICES, |a| self.allreduce(a, p, n))
    }

    /// The broadcast algorithm to use (`forced` wins when it is one).
    pub fn pick_broadcast(&self, forced: Option<Algorithm>, p: usize, n: usize) -> Algorithm {
        const CHOICES: [Algorithm; 2] = [Algorithm::Binomial, Algorithm::ScatterAllgather];
        if let Some(f) = forced.filter(|f| CHOICES.contains(f)) {
            return f;
        }
        cheapest(&CHOICES, |a| self.broadcast(a, p, n))
    }
}

fn cheapest(choices: &[Algorithm], cost: impl Fn(Algorithm) -> f64) -> Algorithm {
    let mut best = choices[0];
    for &a in &choices[1..] {
        if cost(a) < cost(best) {
            best = a;
        }
    }
    best
}

/// The schedules of the collectives: the one place that chooses an
/// algorithm for a call and plans it (callers in `comm` name no algorithm
/// module).
pub(crate) mod plan {
    use super::{Algorithm, CostModel};
    use crate::coll::Schedule;
    use crate::coll::{barrier as dissemination, binomial, doubling, halving, linear, ring};

    /// `barrier`: dissemination.
    pub(crate) fn barrier(r: usize, p: usize) -> Schedule {
        dissemination::plan(r, p)
    }

    /// `broadcast` of `n` elements of `elem` bytes from `root`: the
    /// algorithm the cost model (or `forced`) picks, and its schedule.
    pub(crate) fn broadcast(
        model: &CostModel,
        forced: Option<Algorithm>,
        (r, p): (usize, usize),
        n: usize,
        elem: usize,
        root: usize,
    ) -> (Algorithm, Schedule) {
        let a = model.pick_broadcast(forced, p, n * elem);
        let plan = match a {
            Algorithm::ScatterAllgather => binomial::scatter_allgather(r, p, n, root),
            _ => binomial::broadcast(r, p, n, root),
        };
        (a, plan)
    }

    /// `all_reduce` of `n` elements of `elem` bytes: the algorithm the cost
    /// model (or `forced`) picks, and its schedule.
    pub(crate) fn allreduce(
        model: &CostModel,
        forced: Option<Algorithm>,
        (r, p): (usize, usize),
        n: usize,
        elem: usize,
    ) -> (Algorithm, Schedule) {
        let a = model.pick_allreduce(forced, p, n * elem);
        let plan = match a {
            Algorithm::Ring => ring::allreduce(r, p, n),
            Algorithm::Rabenseifner => halving::allreduce(r, p, n),
            _ => doubling::allreduce(r, p, n),
        };
        (a, plan)
    }

    /// `reduce` of `n` elements to `root`: binomial tree.
    pub(crate) fn reduce(r: usize, p: usize, n: usize, root: usize) -> Schedule {
        binomial::reduce(r, p, n, root)
    }

    /// `all_gather` of `m` elements per rank: ring.
    pub(crate) fn allgather(r: usize, p: usize, m: usize) -> Schedule {
        ring::allgather(r, p, m)
    }

    /// `reduce_scatter` of `m` elements per rank: ring.
    pub(crate) fn reduce_scatter(r: usize, p: usize, m: usize) -> Schedule {
        ring::reduce_scatter(r, p, m)
    }

    /// `gather` of `m` elements per rank to `root`: linear.
    pub(crate) fn gather(r: usize, p: usize, m: usize, root: usize) -> Schedule {
        linear::gather(r, p, m, root)
    }

    /// `scatter` of `m` elements per rank from `root`: linear.
    pub(crate) fn scatter(r: usize, p: usize, m: usize, root: usize) -> Schedule {
        linear::scatter(r, p, m, root)
    }

    /// `all_to_all` of `m` elements per pair: linear.
    pub(crate) fn all_to_all(r: usize, p: usize, m: usize) -> Schedule {
        linear::all_to_all(r, p, m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_buffers_use_latency_algorithms_and_large_ones_bandwidth_algorithms() {
        let m = CostModel::default();
        assert_eq!(m.pick_allreduce(None, 4, 4), Algorithm::RecursiveDoubling);
        assert_eq!(
            m.pick_allreduce(None, 16, 64 << 20),
            Algorithm::Rabenseifner
        );
        assert_eq!(m.pick_allreduce(None, 3, 64 << 20), Algorithm::Ring);
        assert_eq!(m.pick_broadcast(None, 8, 8), Algorithm::Binomial);
        assert_eq!(
            m.pick_broadcast(None, 8, 64 << 20),
            Algorithm::ScatterAllgather
        );
        // Forcing works where the algorithm applies, and only there.
        assert_eq!(
            m.pick_allreduce(Some(Algorithm::Ring), 4, 4),
            Algorithm::Ring
        );
        assert_eq!(
            m.pick_broadcast(Some(Algorithm::Ring), 8, 8),
            Algorithm::Binomial
        );
    }

    #[test]
    fn names_parse_back() {
        for a in Algorithm::ALL {
            assert_eq!(a.name().parse::<Algorithm>(), Ok(a));
        }
        let e = "tree".parse::<Algorithm>().unwrap_err();
        assert_eq!(e.given, "tree");
        assert!(e.to_string().contains("ring"), "{e}");
    }
}
