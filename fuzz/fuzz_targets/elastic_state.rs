#![no_main]
//! The seed's elastic membership state machine driven by any sequence of
//! events (joins that reserve, get an id and are ready or abandon,
//! departures, checkpoint requests for any epoch, waiting joiners that
//! leave): it never panics, epochs only increase, an epoch's members are
//! distinct ids with a pinned key, and no epoch has more members than the
//! job's maximum.

use libfuzzer_sys::fuzz_target;
use rankmesh::internals::bootstrap::elastic::{Decision, Elastic};
use rankmesh::internals::wire::control::{KeyPin, PeerInfo};
use std::collections::BTreeSet;

fn peer(i: usize) -> PeerInfo {
    PeerInfo {
        addr: ([127, 0, 0, 1], (i % 60000) as u16 + 1).into(),
        host: "h".into(),
        pid: i as u32,
        key: KeyPin::Pinned([1; 32]),
    }
}

fuzz_target!(|data: &[u8]| {
    let [a, b, c, rest @ ..] = data else {
        return;
    };
    let (min, max) = (1 + usize::from(a % 4), 1 + usize::from(b % 8));
    if min > max {
        return;
    }
    let n = (1 + usize::from(c % 8)).clamp(min, max);
    let mut e = Elastic::new(min, max);
    e.formed(&(0..n).map(peer).collect::<Vec<_>>());
    let mut last_epoch = e.epoch();
    let mut waiting: Vec<usize> = Vec::new();
    for ev in rest.chunks(2) {
        let (kind, x) = (ev[0], usize::from(*ev.get(1).unwrap_or(&0)));
        match kind % 5 {
            0 => {
                if e.reserve().is_ok() {
                    match e.issue(peer(e.table().len())) {
                        Some(id) if x % 4 != 0 => {
                            e.ready(id, Some([2; 32]));
                            waiting.push(id);
                        }
                        Some(id) => e.ready(id, None),
                        None => {}
                    }
                }
            }
            1 => e.gone(x % e.table().len().max(1)),
            2 => {
                let m = x % e.table().len().max(1);
                if !waiting.contains(&m) {
                    let epoch = if x % 7 == 0 { e.epoch() + 1 } else { e.epoch() };
                    let _ = e.request(m, epoch);
                }
            }
            3 if !waiting.is_empty() => {
                let w = waiting.swap_remove(x % waiting.len());
                if e.left_waiting(w) {
                    e.gone(w);
                }
            }
            _ => {}
        }
        if let Some(Decision::Epoch(info)) = e.decide() {
            waiting.retain(|w| e.admitted(*w).is_none());
            assert!(info.epoch > last_epoch, "epoch went back");
            last_epoch = info.epoch;
            let distinct: BTreeSet<u32> = info.members.iter().copied().collect();
            assert_eq!(distinct.len(), info.members.len(), "a member twice");
            assert!(info.members.len() <= max, "more members than the maximum");
            for m in &info.members {
                assert!(
                    matches!(info.table[*m as usize].key, KeyPin::Pinned(_)),
                    "a member without a pinned key"
                );
            }
        }
    }
});
