//! Unit tests of the mailbox.

use super::*;
use crate::datatype::DType;
use crate::transport::incoming::HELD_OVERHEAD;
use crate::transport::spin::{polling_helps_here, SPIN_BACKOFF_MAX_NS};
use bytes::Bytes;
use std::sync::atomic::Ordering as AtomicOrdering;

fn p2p(src: u32, tag: u64, n: u64, byte: u8) -> Incoming {
    let mut h = Header::new(FrameKind::P2p, src, 0, 0);
    h.seq = tag;
    h.sub = n;
    h.len = 1;
    h.dtype = DType::U8;
    Incoming::from_chunks(h, vec![Bytes::from(vec![byte])])
}

fn key(src: u32, tag: u64) -> P2pKey {
    P2pKey {
        src,
        comm_id: 0,
        epoch: 0,
        tag,
    }
}

async fn byte(mut m: Incoming) -> u8 {
    let mut b = [0u8];
    m.read_into(&mut b).await.unwrap();
    b[0]
}

/// A mailbox whose receives poll for up to 30 s and never back off, so
/// that tests of polling do not depend on the machine's load.
fn polling_mailbox() -> Arc<Mailbox> {
    let mut mb = Mailbox::new().with_spin_wait(Duration::from_secs(30));
    mb.spin.long_yield = Duration::MAX;
    Arc::new(mb)
}

fn current_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A polling receive lets the runtime's other tasks run (here, the one
/// that delivers its message) and finds the message without sleeping;
/// a receive that does not poll, or that polls while polling is backed
/// off, still gets its message by sleeping.
#[test]
fn a_polling_receive_finds_a_message_delivered_by_another_task() {
    let rt = current_thread();
    // Polling off for the longest back-off (1 s), as after long yields.
    let backed_off = Arc::new(Mailbox::new().with_spin_wait(Duration::from_secs(30)));
    let spin = &backed_off.spin;
    spin.backoff
        .store(SPIN_BACKOFF_MAX_NS, AtomicOrdering::Relaxed);
    assert!(!spin.yielded(Duration::from_secs(1), spin.now_ns()));
    let cases = [
        (polling_mailbox(), 20),
        (Arc::new(Mailbox::new()), 0),
        (backed_off, 0),
    ];
    for (mb, polled) in cases {
        for i in 0..20 {
            let got = rt.block_on(async {
                let m2 = mb.clone();
                let t = tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    m2.deliver(p2p(3, 9, i, i as u8)).unwrap();
                });
                let m = mb.recv_p2p(key(3, 9)).await.unwrap();
                t.await.unwrap();
                byte(m).await
            });
            assert_eq!(got, i as u8);
        }
        assert_eq!(mb.polled_receives(), polled, "window {:?}", mb.spin_wait());
    }
    // A message that is already here is not counted as polled for.
    let mb = polling_mailbox();
    mb.deliver(p2p(3, 9, 0, 7)).unwrap();
    assert_eq!(
        rt.block_on(async { byte(mb.recv_p2p(key(3, 9)).await.unwrap()).await }),
        7
    );
    assert_eq!(mb.polled_receives(), 0);
}

/// Receives poll on a current-thread runtime and on a thread that
/// blocks on a future, not in a task on a multi-threaded runtime's
/// workers.
#[test]
fn polling_is_used_where_it_spares_a_wake_up() {
    assert!(polling_helps_here(), "outside any runtime");
    let ct = current_thread();
    assert!(ct.block_on(async { polling_helps_here() }));
    assert!(ct.block_on(async { tokio::spawn(async { polling_helps_here() }).await.unwrap() }));
    let mt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    assert!(mt.block_on(async { polling_helps_here() }));
    assert!(!mt.block_on(async { tokio::spawn(async { polling_helps_here() }).await.unwrap() }));
    // And a receive in such a task does not poll.
    let mb = polling_mailbox();
    let m2 = mb.clone();
    let got = mt.block_on(async move {
        let t = tokio::spawn(async move { m2.recv_p2p(key(3, 9)).await.unwrap() });
        tokio::time::sleep(Duration::from_millis(2)).await;
        mb.deliver(p2p(3, 9, 0, 8)).unwrap();
        let m = t.await.unwrap();
        (byte(m).await, mb.polled_receives())
    });
    assert_eq!(got, (8, 0));
}

/// A receive cancelled while it polls loses no message, and a peer
/// that fails while a receive polls fails that receive.
#[test]
fn polling_receive_cancelled_or_failed_loses_nothing() {
    let rt = current_thread();
    let mb = polling_mailbox();
    rt.block_on(async {
        let r = tokio::time::timeout(Duration::from_millis(5), mb.recv_p2p(key(3, 9))).await;
        assert!(r.is_err(), "nothing was sent yet");
        // Delivered during a poll, then the poll is cancelled.
        let m2 = mb.clone();
        let t = tokio::spawn(async move { m2.deliver(p2p(3, 9, 0, 5)).unwrap() });
        let r = tokio::time::timeout(Duration::from_millis(5), async {
            let m = mb.recv_p2p(key(3, 9)).await;
            t.await.unwrap();
            m
        });
        let got = match r.await {
            Ok(m) => m.unwrap(),
            // Cancelled: the message waits for the next receive.
            Err(_) => mb.recv_p2p(key(3, 9)).await.unwrap(),
        };
        assert_eq!(byte(got).await, 5);
        let m2 = mb.clone();
        let t = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(2)).await;
            m2.fail_peer(3, "its process exited");
        });
        let e = mb.recv_p2p(key(3, 9)).await.unwrap_err();
        t.await.unwrap();
        assert!(format!("{e:?}").contains("its process exited"), "{e:?}");
    });
}

/// Messages held for a sender count against its allowance until they
/// are received; one beyond it is refused; receiving returns the bytes.
#[tokio::test]
async fn a_sender_beyond_its_allowance_is_refused_until_receives_drain_it() {
    // Room for two one-byte messages.
    let mb = Mailbox::with_unexpected_limit(2 * (1 + HELD_OVERHEAD));
    mb.deliver(p2p(1, 5, 0, 10)).unwrap();
    mb.deliver(p2p(1, 5, 1, 11)).unwrap();
    // Another sender has its own allowance.
    mb.deliver(p2p(2, 5, 0, 20)).unwrap();
    let refused = mb.deliver(p2p(1, 5, 2, 12)).unwrap_err();
    assert!(refused.0.contains("set_max_unexpected_bytes"), "{refused}");
    // A received (and dropped) message returns its byte.
    assert_eq!(byte(mb.recv_p2p(key(1, 5)).await.unwrap()).await, 10);
    mb.deliver(p2p(1, 5, 2, 12)).unwrap();
    assert_eq!(byte(mb.recv_p2p(key(1, 5)).await.unwrap()).await, 11);
    assert_eq!(byte(mb.recv_p2p(key(1, 5)).await.unwrap()).await, 12);
    // Empty messages count too (a flood of them is bounded), and so
    // are returned when received.
    // (Messages are numbered per sender across tags: 0-2 went on tag 5.)
    let mut h = Header::new(FrameKind::P2p, 1, 0, 0);
    h.seq = 6;
    for n in 3..5 {
        h.sub = n;
        mb.deliver(Incoming::from_chunks(h, Vec::new())).unwrap();
    }
    h.sub = 5;
    assert!(mb.deliver(Incoming::from_chunks(h, Vec::new())).is_err());
    let _ = mb.recv_p2p(key(1, 6)).await.unwrap();
    mb.deliver(Incoming::from_chunks(h, Vec::new())).unwrap();
}

#[tokio::test]
async fn p2p_messages_are_handed_out_in_sender_order() {
    let mb = Mailbox::new();
    // Message 1 overtakes message 0 in transit.
    mb.deliver(p2p(1, 5, 1, 11)).unwrap();
    mb.deliver(p2p(1, 5, 2, 12)).unwrap();
    mb.deliver(p2p(1, 5, 0, 10)).unwrap();
    for want in [10, 11, 12] {
        assert_eq!(byte(mb.recv_p2p(key(1, 5)).await.unwrap()).await, want);
    }
    assert_eq!(mb.held(), 0);
}

#[tokio::test]
async fn receive_posted_first_gets_the_message() {
    let mb = std::sync::Arc::new(Mailbox::new());
    let mb2 = mb.clone();
    let t = tokio::spawn(async move { byte(mb2.recv_p2p(key(2, 0)).await.unwrap()).await });
    tokio::task::yield_now().await;
    mb.deliver(p2p(2, 0, 0, 42)).unwrap();
    assert_eq!(t.await.unwrap(), 42);
}

#[tokio::test]
async fn cancelled_receive_loses_no_message() {
    let mb = Mailbox::new();
    {
        let f = mb.recv_p2p(key(1, 0));
        let r = tokio::time::timeout(std::time::Duration::from_millis(5), f).await;
        assert!(r.is_err());
    }
    mb.deliver(p2p(1, 0, 0, 7)).unwrap();
    assert_eq!(byte(mb.recv_p2p(key(1, 0)).await.unwrap()).await, 7);
    let ck = CollKey {
        src: 3,
        comm_id: 0,
        epoch: 0,
        seq: 1,
        sub: 0,
    };
    let r = tokio::time::timeout(std::time::Duration::from_millis(5), mb.recv_coll(ck)).await;
    assert!(r.is_err());
    assert_eq!(mb.held(), 0, "cancelled receive left a slot behind");
}

#[tokio::test]
async fn lost_peer_fails_waiters_but_delivered_data_survives() {
    let mb = std::sync::Arc::new(Mailbox::new());
    mb.deliver(p2p(4, 0, 0, 1)).unwrap();
    let mb2 = mb.clone();
    let ck = CollKey {
        src: 4,
        comm_id: 0,
        epoch: 0,
        seq: 9,
        sub: 0,
    };
    let t = tokio::spawn(async move { mb2.recv_coll(ck).await });
    tokio::task::yield_now().await;
    mb.fail_peer(4, "connection reset");
    let e = t.await.unwrap().unwrap_err();
    assert_eq!(e.rank(), 4);
    assert!(e.reason().contains("reset"));
    // The message that arrived before the failure is still delivered.
    assert_eq!(byte(mb.recv_p2p(key(4, 0)).await.unwrap()).await, 1);
    assert!(mb.recv_p2p(key(4, 0)).await.is_err());
    assert!(mb.recv_coll(ck).await.is_err());
}

#[tokio::test]
async fn short_message_is_an_error_not_a_hang() {
    let mut h = Header::new(FrameKind::P2p, 0, 0, 0);
    h.len = 10;
    let mut m = Incoming::from_chunks(h, vec![Bytes::from_static(b"abc")]);
    let mut out = [0u8; 10];
    assert!(m.read_into(&mut out).await.unwrap_err().0.contains("early"));
    let mut m = Incoming::from_chunks(h, vec![]);
    let mut small = [0u8; 3];
    assert!(m.read_into(&mut small).await.is_err());
}

/// A collective this rank gave up takes the frames already held for it
/// with it (they count against their sender's allowance and nothing will
/// receive them), and fails its waiting receives.
#[tokio::test]
async fn an_aborted_collectives_held_frames_go_with_it() {
    let mb = Arc::new(Mailbox::new());
    let mut h = Header::new(FrameKind::Coll, 2, 0, 0);
    h.seq = 3;
    h.sub = 0;
    h.len = 1;
    h.dtype = DType::U8;
    mb.deliver(Incoming::from_chunks(h, vec![Bytes::from(vec![1u8])]))
        .unwrap();
    let waiting = CollKey {
        src: 1,
        comm_id: 0,
        epoch: 0,
        seq: 3,
        sub: 0,
    };
    let m2 = mb.clone();
    let t = tokio::spawn(async move { m2.recv_coll(waiting).await });
    while mb.held() < 2 {
        tokio::task::yield_now().await;
    }
    mb.fail_coll(0, 0, 3, &Failure::lost(1, "gave up"));
    assert!(
        t.await.unwrap().is_err(),
        "the waiting receive was not failed"
    );
    assert_eq!(mb.held(), 0, "the aborted call's frame was kept");
}

#[tokio::test]
async fn frames_of_a_dropped_communicator_are_not_kept() {
    let mb = Arc::new(Mailbox::new());
    mb.forget_comm(9, 2);
    // A peer's late point-to-point message and collective frame for it.
    let frame = |kind, seq| {
        let mut h = Header::new(kind, 1, 9, 2);
        h.seq = seq;
        h.len = 1;
        h.dtype = DType::U8;
        Incoming::from_chunks(h, vec![Bytes::from(vec![5u8])])
    };
    mb.deliver(frame(FrameKind::P2p, 0)).unwrap();
    mb.deliver(frame(FrameKind::Coll, 4)).unwrap();
    assert_eq!(mb.entries(), 0, "a dropped communicator's frames were kept");
    // The same communicator id at another epoch, and others, are not affected.
    let mut h = Header::new(FrameKind::P2p, 1, 9, 3);
    h.len = 1;
    h.dtype = DType::U8;
    mb.deliver(Incoming::from_chunks(h, vec![Bytes::from(vec![5u8])]))
        .unwrap();
    mb.deliver(p2p(1, 0, 0, 7)).unwrap();
    // Each: the sender's message order and the tag's queue.
    assert_eq!(mb.entries(), 4);
}

/// Messages are numbered per sender across tags: one waits only for the
/// sender's earlier numbers, a skipped number releases those behind it,
/// and a tag's queue goes once it is drained.
#[tokio::test]
async fn one_numbering_across_tags_orders_and_skips() {
    let mb = Mailbox::new();
    // Numbers 1 (tag 7) and 2 (tag 5) overtake number 0.
    mb.deliver(p2p(1, 7, 1, 71)).unwrap();
    mb.deliver(p2p(1, 5, 2, 52)).unwrap();
    assert_eq!(mb.held(), 2);
    {
        let mut st = mb.lock();
        assert!(
            st.p2p.take(&key(1, 7)).is_none(),
            "delivered ahead of number 0"
        );
    }
    // Number 0 was cancelled by the sender: the others are released.
    let mut skip = Header::new(FrameKind::Skip, 1, 0, 0);
    skip.seq = 5;
    skip.sub = 0;
    mb.deliver(Incoming::from_chunks(skip, Vec::new())).unwrap();
    assert_eq!(byte(mb.recv_p2p(key(1, 7)).await.unwrap()).await, 71);
    assert_eq!(byte(mb.recv_p2p(key(1, 5)).await.unwrap()).await, 52);
    // A number seen already is a duplicate, whatever its tag.
    mb.deliver(p2p(1, 9, 1, 99)).unwrap();
    assert_eq!(mb.held(), 0, "a duplicate number was kept");
    // Nothing per tag is left: only the sender's order.
    assert_eq!(mb.entries(), 1);
}
