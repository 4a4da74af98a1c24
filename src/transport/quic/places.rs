//! Places for incoming connections that have not yet authenticated: a bound
//! on how many such connections an endpoint holds at once, in all and per
//! source address, and the count of those it turned away or dropped (for a
//! periodic summary rather than a log line per client, since whoever can
//! reach the port could otherwise fill the log).
//!
//! Used by the seed (until a joiner proves the job token) and by ranks
//! (until a peer's handshake with a certificate of the job CA completes).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// The table of places; cheap to share.
#[derive(Clone)]
pub struct Places {
    inner: Arc<Inner>,
}

struct Inner {
    total: usize,
    per_source: usize,
    by_source: Mutex<HashMap<IpAddr, usize>>,
    refused: AtomicUsize,
    failed: AtomicUsize,
    /// Why the latest of them failed, and from where.
    last: Mutex<Option<String>>,
}

/// One connection's place; given back when dropped.
pub struct Place {
    inner: Arc<Inner>,
    source: IpAddr,
}

impl Places {
    /// At most `total` places, at most `per_source` of them for one address.
    pub fn new(total: usize, per_source: usize) -> Places {
        Places {
            inner: Arc::new(Inner {
                total,
                per_source,
                by_source: Mutex::new(HashMap::new()),
                refused: AtomicUsize::new(0),
                failed: AtomicUsize::new(0),
                last: Mutex::new(None),
            }),
        }
    }

    /// A place for a connection from `source`; `None` (counted as refused)
    /// when all places, or all of that address's, are taken.
    pub fn take(&self, source: IpAddr) -> Option<Place> {
        let mut m = self
            .inner
            .by_source
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let held: usize = m.values().sum();
        let mine = m.entry(source).or_insert(0);
        if held >= self.inner.total || *mine >= self.inner.per_source {
            if *mine == 0 {
                m.remove(&source);
            }
            self.inner.refused.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *mine += 1;
        Some(Place {
            inner: self.inner.clone(),
            source,
        })
    }

    /// Places taken now.
    pub fn held(&self) -> usize {
        let m = self
            .inner
            .by_source
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        m.values().sum()
    }

    /// Connections refused for want of a place and connections that gave
    /// up their place without authenticating since the last call, and what
    /// the latest of those said (to name a misconfigured host).
    pub fn take_counts(&self) -> (usize, usize, Option<String>) {
        let last = self
            .inner
            .last
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        (
            self.inner.refused.swap(0, Ordering::Relaxed),
            self.inner.failed.swap(0, Ordering::Relaxed),
            last,
        )
    }
}

impl Place {
    /// The connection ended without authenticating, for `why` (where from,
    /// what was wrong): counted for the next summary, and the place given
    /// back.
    pub fn failed(self, why: String) {
        self.inner.failed.fetch_add(1, Ordering::Relaxed);
        *self.inner.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut m = self
            .inner
            .by_source
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.source) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.source);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_are_bounded_in_all_and_per_address_and_given_back() {
        let p = Places::new(3, 2);
        let a: IpAddr = [10, 0, 0, 1].into();
        let b: IpAddr = [10, 0, 0, 2].into();
        let a1 = p.take(a).unwrap();
        let _a2 = p.take(a).unwrap();
        assert!(p.take(a).is_none(), "a third place for one address");
        let _b1 = p.take(b).unwrap();
        assert!(p.take(b).is_none(), "a fourth place in all");
        assert_eq!(p.held(), 3);
        a1.failed("wrong token".into());
        assert_eq!(p.held(), 2);
        assert!(p.take(b).is_some());
        assert_eq!(p.take_counts(), (2, 1, Some("wrong token".into())));
        assert_eq!(p.take_counts(), (0, 0, None));
    }
}
