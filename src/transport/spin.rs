//! Polling a receive for a short time before its task sleeps
//! ([`crate::Config::set_spin_wait`]), with a back-off that protects a
//! loaded machine.

use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// A yield that returns after longer than this means the core was taken
/// by other work for a whole scheduler time slice, not by a peer rank that
/// soon waits again.
pub(crate) const SPIN_LONG_YIELD: Duration = Duration::from_micros(500);
/// Polling stops for this long after a first long yield ...
pub(crate) const SPIN_BACKOFF_MIN_NS: u64 = 2_000_000;
/// ... doubling while long yields recur, up to this.
pub(crate) const SPIN_BACKOFF_MAX_NS: u64 = 1_000_000_000;
/// The back-off halves after this many polling receives in a row without a
/// long yield.
pub(crate) const SPIN_CLEAN_STREAK: u64 = 256;

/// Whether polling can spare a wake-up for a receive awaited here. On a
/// worker thread of a multi-threaded runtime it cannot (the message is
/// read on whichever worker holds the socket, and polling only keeps this
/// worker and the others busy: 4 ranks, 4-byte allreduce 127-144 us with
/// polling against 72-78 us without). A current-thread runtime, or a
/// thread that blocks on a future outside the runtime's tasks (the body of
/// `#[tokio::main]`, `rankmesh::blocking`), gains from it.
pub(crate) fn polling_helps_here() -> bool {
    match tokio::runtime::Handle::try_current() {
        Ok(h) => {
            h.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread
                || tokio::task::try_id().is_none()
        }
        Err(_) => true,
    }
}

/// Polls a receive for a short time before its task sleeps
/// ([`crate::Config::set_spin_wait`]).
///
/// Waking a sleeping process costs tens of microseconds on virtual
/// machines, more than a small message takes to arrive, so a receive first
/// checks for its message in a loop: give the core to any other runnable
/// process (`sched_yield`), then let the runtime run its other tasks and,
/// on a current-thread runtime, read its sockets (`yield_now`), then check
/// again. A yield that takes longer than
/// [`SPIN_LONG_YIELD`] shows that something other than a peer rank holds
/// the core; polling would then cost a whole time slice per message, so
/// receives stop polling for a while (doubling while it recurs; halving
/// back after long runs of polling receives without one). The back-off
/// state is shared by all receives of the process and updated without a
/// lock: a concurrent update may be lost, which only shifts the heuristic.
pub(crate) struct Spin {
    pub(crate) window: Duration,
    /// A yield longer than this turns polling off ([`SPIN_LONG_YIELD`]).
    pub(crate) long_yield: Duration,
    base: Instant,
    /// Nanoseconds after `base` until which receives do not poll.
    off_until: AtomicU64,
    /// How long polling stops after the next long yield, in nanoseconds.
    pub(crate) backoff: AtomicU64,
    /// Polling receives since the last long yield.
    clean: AtomicU64,
    /// Receives that found their message by polling.
    pub(crate) hits: AtomicU64,
}

impl Spin {
    pub(crate) fn new(window: Duration) -> Spin {
        Spin {
            window,
            long_yield: SPIN_LONG_YIELD,
            base: Instant::now(),
            off_until: AtomicU64::new(0),
            backoff: AtomicU64::new(SPIN_BACKOFF_MIN_NS),
            clean: AtomicU64::new(0),
            hits: AtomicU64::new(0),
        }
    }

    pub(crate) fn now_ns(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Whether a receive starting at `now_ns` should poll.
    pub(crate) fn active(&self, now_ns: u64) -> bool {
        !self.window.is_zero() && now_ns >= self.off_until.load(AtomicOrdering::Relaxed)
    }

    /// A poll's yield took `took`, ending at `now_ns`: whether to go on
    /// polling (a long yield turns polling off for the back-off period).
    pub(crate) fn yielded(&self, took: Duration, now_ns: u64) -> bool {
        if took <= self.long_yield {
            return true;
        }
        self.clean.store(0, AtomicOrdering::Relaxed);
        let b = self.backoff.load(AtomicOrdering::Relaxed);
        self.off_until
            .store(now_ns.saturating_add(b), AtomicOrdering::Relaxed);
        self.backoff.store(
            b.saturating_mul(2).min(SPIN_BACKOFF_MAX_NS),
            AtomicOrdering::Relaxed,
        );
        false
    }

    /// A receive polled without a long yield: after a long run of those,
    /// halve the next back-off.
    pub(crate) fn settled(&self) {
        let n = self.clean.fetch_add(1, AtomicOrdering::Relaxed) + 1;
        if n.is_multiple_of(SPIN_CLEAN_STREAK) {
            let b = self.backoff.load(AtomicOrdering::Relaxed);
            self.backoff
                .store((b / 2).max(SPIN_BACKOFF_MIN_NS), AtomicOrdering::Relaxed);
        }
    }

    /// Poll `rx` for up to the window. `None`: not here yet, sleep on `rx`;
    /// `Some(None)`: its sender is gone; `Some(Some(r))`: the outcome.
    pub(crate) async fn poll<T>(&self, rx: &mut oneshot::Receiver<T>) -> Option<Option<T>> {
        if !self.active(self.now_ns()) || !polling_helps_here() {
            return None;
        }
        let start = Instant::now();
        loop {
            match rx.try_recv() {
                Ok(r) => {
                    self.settled();
                    self.hits.fetch_add(1, AtomicOrdering::Relaxed);
                    return Some(Some(r));
                }
                Err(oneshot::error::TryRecvError::Closed) => return Some(None),
                Err(oneshot::error::TryRecvError::Empty) => {}
            }
            let before = Instant::now();
            if before.duration_since(start) >= self.window {
                self.settled();
                return None;
            }
            std::thread::yield_now();
            if !self.yielded(before.elapsed(), self.now_ns()) {
                return None;
            }
            tokio::task::yield_now().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A long yield turns polling off for the back-off period, which
    /// doubles while long yields recur and halves back after each long run
    /// of polling receives without one.
    #[test]
    fn polling_backs_off_after_long_yields() {
        assert!(!Spin::new(Duration::ZERO).active(0));
        let s = Spin::new(Duration::from_micros(50));
        assert!(s.active(0));
        assert!(s.yielded(Duration::from_micros(20), 10));
        assert!(s.active(10));
        let t = 1_000_000;
        assert!(!s.yielded(Duration::from_millis(3), t));
        assert!(!s.active(t + SPIN_BACKOFF_MIN_NS - 1));
        assert!(s.active(t + SPIN_BACKOFF_MIN_NS));
        // Recurring: twice as long, then four times.
        let t = t + SPIN_BACKOFF_MIN_NS;
        assert!(!s.yielded(Duration::from_millis(3), t));
        assert!(!s.active(t + 2 * SPIN_BACKOFF_MIN_NS - 1));
        assert!(s.active(t + 2 * SPIN_BACKOFF_MIN_NS));
        assert_eq!(
            s.backoff.load(AtomicOrdering::Relaxed),
            4 * SPIN_BACKOFF_MIN_NS
        );
        // A short run of good polls does not shorten it; a long one does.
        for _ in 0..SPIN_CLEAN_STREAK - 1 {
            s.settled();
        }
        assert_eq!(
            s.backoff.load(AtomicOrdering::Relaxed),
            4 * SPIN_BACKOFF_MIN_NS
        );
        s.settled();
        assert_eq!(
            s.backoff.load(AtomicOrdering::Relaxed),
            2 * SPIN_BACKOFF_MIN_NS
        );
        // A long yield restarts the run.
        for _ in 0..SPIN_CLEAN_STREAK - 1 {
            s.settled();
        }
        assert!(!s.yielded(Duration::from_millis(3), t));
        assert_eq!(
            s.backoff.load(AtomicOrdering::Relaxed),
            4 * SPIN_BACKOFF_MIN_NS
        );
        for _ in 0..3 * SPIN_CLEAN_STREAK {
            s.settled();
        }
        assert_eq!(s.backoff.load(AtomicOrdering::Relaxed), SPIN_BACKOFF_MIN_NS);
        // Never beyond the maximum.
        for i in 0..64 {
            s.yielded(Duration::from_millis(3), i);
        }
        assert_eq!(s.backoff.load(AtomicOrdering::Relaxed), SPIN_BACKOFF_MAX_NS);
    }
}
