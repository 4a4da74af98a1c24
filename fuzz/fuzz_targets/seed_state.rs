#![no_main]
//! The seed's formation state machine driven by any sequence of events
//! (joins with any job id, rank and world size, readiness, departures,
//! clock ticks): it never panics, never admits two ranks to one number,
//! never admits a rank outside the world, and once formed or failed it
//! stays so.

use libfuzzer_sys::fuzz_target;
use rankmesh::internals::bootstrap::state::{Decision, JoinInfo, Phase, SeedState};
use rankmesh::internals::wire::control::{KeyPin, PeerInfo};
use std::time::{Duration, Instant};

fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let n = usize::from(n % 9);
    let t0 = Instant::now();
    let mut s = SeedState::new("job", n, t0, Duration::from_secs(10));
    let mut admitted = vec![false; n];
    let mut now = t0;
    let mut ended: Option<Phase> = None;
    for ev in rest.chunks(4) {
        let [kind, a, b, c] = [ev[0], *ev.get(1).unwrap_or(&0), *ev.get(2).unwrap_or(&0), *ev.get(3).unwrap_or(&0)];
        match kind % 5 {
            0 | 1 => {
                let info = JoinInfo {
                    job_id: match a % 3 {
                        0 => None,
                        1 => Some("job".into()),
                        _ => Some("other".into()),
                    },
                    requested_rank: (b != 255).then_some(usize::from(b % 12)),
                    world_size: (c != 255).then_some(usize::from(c % 12)),
                    peer: PeerInfo {
                        addr: ([127, 0, 0, 1], u16::from(a) * 256 + u16::from(b)).into(),
                        host: "h".into(),
                        pid: u32::from(c),
                        key: KeyPin::Pending,
                    },
                };
                if let Decision::Admit(r) = s.handle_join(info) {
                    assert!(r < n, "admitted rank {r} in a world of {n}");
                    assert!(!admitted[r], "rank {r} admitted twice");
                    admitted[r] = true;
                }
            }
            2 => s.handle_ready(usize::from(a), [b; 32]),
            3 => {
                let r = usize::from(a);
                s.handle_leave(r);
                if r < n && matches!(s.phase(), Phase::Forming) {
                    admitted[r] = false;
                }
            }
            _ => {
                now += Duration::from_millis(u64::from(a) * 100);
                s.handle_timeout(now);
            }
        }
        let _ = s.progress();
        let _ = s.deadline();
        match (&ended, s.phase()) {
            (None, Phase::Forming) => {}
            (None, p) => ended = Some(p.clone()),
            (Some(e), p) => assert_eq!(e, p, "phase changed after it ended"),
        }
        if let Phase::Formed(peers) = s.phase() {
            assert_eq!(peers.len(), n);
            assert!(
                peers.iter().all(|p| matches!(p.key, KeyPin::Pinned(_))),
                "a member without a key pin"
            );
        }
    }
});
