//! Point-to-point messaging over real QUIC loopback, over the same-host
//! channel (the default between ranks of one host), and over the in-process
//! transport: exactness for every size class, ordering, concurrency.

use rankmesh::testing::{run_local, LocalJob};
use rankmesh::{Communicator, Config, Error, PeerPath, Result};

/// Settings that keep every message on QUIC (`same_host: false`) or let
/// ranks of this host use the same-host channel.
fn path(same_host: bool) -> Config {
    let mut c = Config::default();
    c.set_same_host_channel(same_host);
    c
}

/// The path messages to every other rank took, checked after traffic.
fn check_paths(comm: &Communicator, want: PeerPath) {
    for r in (0..comm.size()).filter(|&r| r != comm.rank()) {
        assert_eq!(
            comm.path_to(r).unwrap(),
            want,
            "rank {} to {r}",
            comm.rank()
        );
    }
}

fn pattern(len: usize, seed: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((i * 131 + seed * 7) % 251) as u8)
        .collect()
}

/// Every rank sends `len` bytes to every other rank and checks what it gets.
async fn all_pairs(comm: Communicator, len: usize) -> Result<()> {
    let me = comm.rank();
    let n = comm.size();
    let sends = async {
        for dst in (0..n).filter(|&d| d != me) {
            comm.send(&pattern(len, me * 100 + dst), dst, 9).await?;
        }
        Ok::<_, Error>(())
    };
    let recvs = async {
        for src in (0..n).filter(|&s| s != me) {
            let mut buf = vec![0u8; len];
            comm.recv(&mut buf, src, 9).await?;
            assert!(
                buf == pattern(len, src * 100 + me),
                "rank {me} from {src}: {len} bytes differ"
            );
        }
        Ok::<_, Error>(())
    };
    let (a, b) = tokio::join!(sends, recvs);
    a?;
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exact_for_every_size_on_2_3_5_ranks() {
    for same_host in [false, true] {
        let want = if same_host {
            PeerPath::SameHost
        } else {
            PeerPath::Quic
        };
        for n in [2, 3, 5] {
            // Around the eager limit (64 KiB): small messages share the
            // main connection, larger ones get their own stream/connection.
            for len in [0usize, 1, 7, 4099, 65_536, 65_537, 300_001] {
                LocalJob::quic(n)
                    .config(path(same_host))
                    .run(move |c| async move {
                        all_pairs(c.clone(), len).await?;
                        check_paths(&c, want);
                        Ok(())
                    })
                    .await
                    .unwrap();
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_mib_arrives_exactly() {
    for same_host in [false, true] {
        sixty_four_mib(same_host).await;
    }
}

async fn sixty_four_mib(same_host: bool) {
    let out = LocalJob::quic(2)
        .config(path(same_host))
        .run(|comm| async move {
            let len = 64 << 20;
            if comm.rank() == 0 {
                let data: Vec<u32> = (0..len / 4)
                    .map(|i| (i as u32).wrapping_mul(2_654_435_761))
                    .collect();
                comm.send(&data, 1, 1).await?;
                Ok(true)
            } else {
                let mut buf = vec![0u32; len / 4];
                comm.recv(&mut buf, 0, 1).await?;
                Ok(buf
                    .iter()
                    .enumerate()
                    .all(|(i, &v)| v == (i as u32).wrapping_mul(2_654_435_761)))
            }
        })
        .await
        .unwrap();
    assert!(out[1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_order_tags_do_not_deadlock() {
    run_local(2, |comm| async move {
        if comm.rank() == 0 {
            for tag in 0..8u32 {
                comm.send(&vec![tag as u64; 100_000], 1, tag).await?;
            }
        } else {
            // Receive in reverse tag order: earlier messages wait in the mailbox.
            for tag in (0..8u32).rev() {
                let mut buf = vec![0u64; 100_000];
                comm.recv(&mut buf, 0, tag).await?;
                assert!(buf.iter().all(|&v| v == tag as u64));
            }
        }
        Ok(())
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sends_keep_per_tag_order() {
    run_local(2, |comm| async move {
        let per_tag = 50u32;
        if comm.rank() == 0 {
            // Two tags interleaved from concurrent tasks; sizes vary so that
            // streams finish out of order in transit.
            let a = async {
                for i in 0..per_tag {
                    comm.send(&vec![i; 1 + (i as usize % 5) * 20_000], 1, 1)
                        .await?;
                }
                Ok::<_, Error>(())
            };
            let b = async {
                for i in 0..per_tag {
                    comm.send(&vec![i + 1000; 1 + (i as usize % 3) * 30_000], 1, 2)
                        .await?;
                }
                Ok::<_, Error>(())
            };
            let (x, y) = tokio::join!(a, b);
            x?;
            y?;
        } else {
            for i in 0..per_tag {
                let mut buf = vec![0u32; 1 + (i as usize % 3) * 30_000];
                comm.recv(&mut buf, 0, 2).await?;
                assert!(
                    buf.iter().all(|&v| v == i + 1000),
                    "tag 2 message {i} out of order"
                );
            }
            for i in 0..per_tag {
                let mut buf = vec![0u32; 1 + (i as usize % 5) * 20_000];
                comm.recv(&mut buf, 0, 1).await?;
                assert!(
                    buf.iter().all(|&v| v == i),
                    "tag 1 message {i} out of order"
                );
            }
        }
        Ok(())
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn mem_transport_runs_the_same_program() {
    for n in [1, 2, 3, 5] {
        for len in [0usize, 1, 4099] {
            LocalJob::in_memory(n)
                .run(move |c| all_pairs(c, len))
                .await
                .unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_length_and_type_are_errors_naming_both() {
    let out = run_local(2, |comm| async move {
        if comm.rank() == 0 {
            comm.send(&[1u32; 10], 1, 0).await?;
            comm.send(&[1u32; 10], 1, 1).await?;
            Ok(String::new())
        } else {
            let mut small = [0u32; 4];
            let e1 = comm.recv(&mut small, 0, 0).await.unwrap_err().to_string();
            let mut wrong = [0f32; 10];
            let e2 = comm.recv(&mut wrong, 0, 1).await.unwrap_err().to_string();
            Ok(format!("{e1}\n{e2}"))
        }
    })
    .await
    .unwrap();
    let msg = &out[1];
    assert!(
        msg.contains("40 bytes") && msg.contains("16 bytes"),
        "{msg}"
    );
    assert!(msg.contains("u32") && msg.contains("f32"), "{msg}");
    assert!(msg.contains("rank 1"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_ranks_are_invalid_arguments() {
    run_local(2, |comm| async move {
        let e = comm.send(&[1u8], 2, 0).await.unwrap_err();
        assert!(matches!(e, Error::InvalidArgument { .. }), "{e}");
        assert!(e.to_string().contains("0..1"), "{e}");
        let mut b = [0u8];
        assert!(comm.recv(&mut b, 7, 0).await.is_err());
        Ok(())
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_to_self_works() {
    run_local(1, |comm| async move {
        comm.send(&[5i64, 6], 0, 3).await?;
        let mut b = [0i64; 2];
        comm.recv(&mut b, 0, 3).await?;
        assert_eq!(b, [5, 6]);
        Ok(())
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_over_the_limit_is_refused_by_the_sender() {
    let mut cfg = rankmesh::Config::default();
    cfg.set_max_message_bytes(1000);
    rankmesh::testing::LocalJob::quic(2)
        .config(cfg)
        .run(|comm| async move {
            if comm.rank() == 0 {
                let e = comm.send(&[0u8; 1001], 1, 0).await.unwrap_err();
                assert!(e.to_string().contains("set_max_message_bytes"), "{e}");
                // The connection is intact: a message within the limit works.
                comm.send(&[7u8; 1000], 1, 0).await?;
            } else {
                let mut b = [0u8; 1000];
                comm.recv(&mut b, 0, 0).await?;
                assert_eq!(b, [7u8; 1000]);
            }
            Ok(())
        })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_send_does_not_hold_back_later_messages_of_its_tag() {
    for same_host in [false, true] {
        cancelled_send(same_host).await;
    }
}

async fn cancelled_send(same_host: bool) {
    LocalJob::quic(2)
        .config(path(same_host))
        .run(|comm| async move {
            // A first message: the connection (and its path) is set up.
            let mut first = [0u8; 4];
            if comm.rank() == 0 {
                comm.send(&[1u8; 4], 1, 2).await?;
            } else {
                comm.recv(&mut first, 0, 2).await?;
            }
            if comm.rank() == 0 {
                // 64 MiB cannot leave at once while rank 1 reads nothing (flow
                // control, socket buffers): cancelled mid-way or before it
                // started.
                let big = vec![1u8; 64 << 20];
                let cancelled =
                    tokio::time::timeout(std::time::Duration::ZERO, comm.send(&big, 1, 3)).await;
                assert!(cancelled.is_err(), "the send was not cancelled");
                comm.send(&[9u8; 16], 1, 3).await?;
                comm.send(&[0u8; 1], 1, 4).await?;
            } else {
                let mut go = [0u8; 1];
                comm.recv(&mut go, 0, 4).await?;
                // The cancelled message is skipped, or (if its header got out)
                // received as a broken message; either way the next one arrives.
                let mut b = [0u8; 16];
                let mut got = false;
                let mut errors = Vec::new();
                for _ in 0..2 {
                    match comm.recv(&mut b, 0, 3).await {
                        Ok(()) => {
                            got = true;
                            break;
                        }
                        Err(e) => errors.push(e.to_string()),
                    }
                }
                assert!(
                    got && b == [9u8; 16],
                    "later message lost: {b:?}; errors: {errors:?}"
                );
            }
            Ok(())
        })
        .await
        .unwrap();
}

/// On the same-host channel, each large message the receiver has not taken
/// yet holds a connection there; like QUIC's stream limit, at most
/// `max_streams` of them are outstanding per peer, and a further send waits
/// until one is received. Nothing is lost or reordered meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreceived_large_messages_are_bounded_by_max_streams_on_the_same_host_channel() {
    let mut cfg = path(true);
    cfg.set_max_streams(2);
    // Above the eager limit (64 KiB), well below a socket's buffer.
    let len = 100 << 10;
    LocalJob::quic(2)
        .config(cfg)
        .run(move |comm| async move {
            if comm.rank() == 0 {
                comm.send(&pattern(len, 1), 1, 1).await?;
                comm.send(&pattern(len, 2), 1, 2).await?;
                let data = pattern(len, 3);
                let third = comm.send(&data, 1, 3);
                tokio::pin!(third);
                let early =
                    tokio::time::timeout(std::time::Duration::from_millis(500), &mut third).await;
                assert!(
                    early.is_err(),
                    "a third unreceived large message was accepted with max_streams = 2"
                );
                assert_eq!(comm.path_to(1)?, PeerPath::SameHost);
                comm.send(&[1u8], 1, 9).await?;
                tokio::time::timeout(std::time::Duration::from_secs(60), third)
                    .await
                    .expect("the third send never resumed after a receive")?;
            } else {
                let mut go = [0u8; 1];
                comm.recv(&mut go, 0, 9).await?;
                for tag in 1..=3u32 {
                    let mut buf = vec![0u8; len];
                    comm.recv(&mut buf, 0, tag).await?;
                    assert!(buf == pattern(len, tag as usize), "tag {tag} differs");
                }
            }
            Ok(())
        })
        .await
        .unwrap();
}

/// A peer that pushes more small messages than the receiver may hold
/// unreceived is cut off with an error naming it and the setting, on every
/// path, instead of the receiver's memory growing without bound; messages
/// received as they come never count against the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_pushing_beyond_max_unexpected_bytes_is_cut_off_with_a_clear_error() {
    let piece = 32 << 10;
    let program = move |comm: Communicator| async move {
        // Well past the limit in total, but each is received before the
        // next is sent.
        let mut ack = [0u8; 1];
        for i in 0..24 {
            if comm.rank() == 0 {
                comm.send(&pattern(piece, i), 1, 1).await?;
                comm.recv(&mut ack, 1, 4).await?;
            } else {
                let mut b = vec![0u8; piece];
                comm.recv(&mut b, 0, 1).await?;
                assert!(b == pattern(piece, i));
                comm.send(&ack, 0, 4).await?;
            }
        }
        comm.barrier().await?;
        let mut b = [0u8; 1];
        if comm.rank() == 0 {
            // Nobody receives these: the 9th crosses 256 KiB. Then wait
            // (for a message that never comes) until rank 1 cuts this rank
            // off, so that it does not finalize first.
            for i in 0..64 {
                if let Err(e) = comm.send(&pattern(piece, i), 1, 2).await {
                    return Ok(e.to_string());
                }
            }
            let e = comm.recv(&mut b, 1, 5).await.unwrap_err();
            return Ok(e.to_string());
        }
        let e = comm.recv(&mut b, 0, 3).await.unwrap_err();
        Ok(e.to_string())
    };
    for transport in ["mem", "quic", "same-host"] {
        let mut cfg = path(transport == "same-host");
        cfg.set_max_unexpected_bytes(256 << 10);
        let run = async {
            if transport == "mem" {
                rankmesh::testing::LocalJob::in_memory(2)
                    .config(cfg)
                    .run(program)
                    .await
            } else {
                LocalJob::quic(2).config(cfg).run(program).await
            }
        };
        let out = tokio::time::timeout(std::time::Duration::from_secs(120), run)
            .await
            .unwrap_or_else(|_| panic!("{transport}: nobody was cut off (hung)"))
            .unwrap_or_else(|e| panic!("{transport}: {e}"));
        // The receiver names the sender and the setting; the sender learns
        // why it was cut off.
        assert!(
            out[1].contains("rank 0") && out[1].contains("set_max_unexpected_bytes"),
            "{transport}: {}",
            out[1]
        );
        assert!(
            out[0].contains("set_max_unexpected_bytes"),
            "{transport}: {}",
            out[0]
        );
    }
}
