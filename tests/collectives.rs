//! Collectives against references computed locally: the full grid (every
//! collective, element type and op, 1..=9 ranks) on the in-memory
//! transport, and a smaller grid plus the failure cases over real QUIC and
//! over the same-host channel.

use half::{bf16, f16};
use rankmesh::testing::{run_local, LocalJob};
use rankmesh::{Algorithm, Communicator, Config, Element, Error, ReduceOp, Result};
use std::fmt::Debug;
use std::time::{Duration, Instant};

const OPS: [ReduceOp; 4] = [ReduceOp::Sum, ReduceOp::Prod, ReduceOp::Min, ReduceOp::Max];

trait TestElem: Element + PartialEq + Debug {
    const SIGNED: bool;
    fn from_i(v: i64) -> Self;
}

macro_rules! test_elem {
    ($($t:ty: $signed:expr, |$v:ident| $conv:expr;)*) => {$(
        impl TestElem for $t {
            const SIGNED: bool = $signed;
            fn from_i($v: i64) -> Self { $conv }
        }
    )*};
}

test_elem! {
    f32: true, |v| v as f32;
    f64: true, |v| v as f64;
    f16: true, |v| f16::from_f32(v as f32);
    bf16: true, |v| bf16::from_f32(v as f32);
    i8: true, |v| v as i8;
    u8: false, |v| v as u8;
    i32: true, |v| v as i32;
    u32: false, |v| v as u32;
    i64: true, |v| v;
    u64: false, |v| v as u64;
}

/// Rank r's value at index i: small integers, so every order of reduction
/// gives the same exact result in every type.
fn value<T: TestElem>(r: usize, i: usize) -> i64 {
    let v = ((r * 7 + i * 3) % 5) as i64;
    if T::SIGNED {
        v - 2
    } else {
        v
    }
}

fn data<T: TestElem>(r: usize, len: usize) -> Vec<T> {
    (0..len).map(|i| T::from_i(value::<T>(r, i))).collect()
}

fn reference<T: TestElem>(p: usize, len: usize, op: ReduceOp) -> Vec<T> {
    (0..len)
        .map(|i| {
            let vals = (0..p).map(|r| value::<T>(r, i));
            T::from_i(match op {
                ReduceOp::Sum => vals.sum(),
                ReduceOp::Prod => vals.product(),
                ReduceOp::Min => vals.min().unwrap_or(0),
                ReduceOp::Max => vals.max().unwrap_or(0),
            })
        })
        .collect()
}

/// Every collective on `comm` for element type `T`, checked against the
/// local reference. Lengths: odd, not divisible by the world size.
async fn check_type<T: TestElem>(comm: &Communicator, len: usize) -> Result<()> {
    let (r, p) = (comm.rank(), comm.size());
    let ty = std::any::type_name::<T>();
    for op in OPS {
        let mut buf = data::<T>(r, len);
        comm.all_reduce(&mut buf, op).await?;
        assert_eq!(
            buf,
            reference::<T>(p, len, op),
            "all_reduce {op:?} {ty} p={p}"
        );

        let root = (len + 1) % p;
        let mut buf = data::<T>(r, len);
        comm.reduce(&mut buf, op, root).await?;
        if r == root {
            assert_eq!(buf, reference::<T>(p, len, op), "reduce {op:?} {ty} p={p}");
        } else {
            assert_eq!(buf, data::<T>(r, len), "reduce changed a non-root buffer");
        }

        let m = len / 2 + 1;
        let send = data::<T>(r, p * m);
        let mut recv = vec![T::from_i(0); m];
        comm.reduce_scatter(&send, &mut recv, op).await?;
        let full = reference::<T>(p, p * m, op);
        assert_eq!(
            recv[..],
            full[r * m..(r + 1) * m],
            "reduce_scatter {op:?} {ty} p={p}"
        );
    }
    let root = p / 2;
    let mut buf = if r == root {
        data::<T>(r, len)
    } else {
        vec![T::from_i(0); len]
    };
    comm.broadcast(&mut buf, root).await?;
    assert_eq!(buf, data::<T>(root, len), "broadcast {ty} p={p}");

    let mine = data::<T>(r, len);
    let mut all = vec![T::from_i(0); p * len];
    comm.all_gather(&mine, &mut all).await?;
    let want: Vec<T> = (0..p).flat_map(|q| data::<T>(q, len)).collect();
    assert_eq!(all, want, "all_gather {ty} p={p}");

    let mut at_root = vec![T::from_i(0); if r == root { p * len } else { 0 }];
    comm.gather(&mine, &mut at_root, root).await?;
    if r == root {
        assert_eq!(at_root, want, "gather {ty} p={p}");
    }

    let mut part = vec![T::from_i(0); len];
    let src = if r == root {
        data::<T>(99, p * len)
    } else {
        Vec::new()
    };
    comm.scatter(&src, &mut part, root).await?;
    assert_eq!(
        part[..],
        data::<T>(99, p * len)[r * len..(r + 1) * len],
        "scatter {ty}"
    );

    let send = data::<T>(r, p * len);
    let mut recv = vec![T::from_i(0); p * len];
    comm.all_to_all(&send, &mut recv).await?;
    for j in 0..p {
        assert_eq!(
            recv[j * len..(j + 1) * len],
            data::<T>(j, p * len)[r * len..(r + 1) * len],
            "all_to_all {ty}"
        );
    }
    comm.barrier().await
}

async fn check_all_types(comm: Communicator, len: usize) -> Result<()> {
    check_type::<f32>(&comm, len).await?;
    check_type::<f64>(&comm, len).await?;
    check_type::<f16>(&comm, len).await?;
    check_type::<bf16>(&comm, len).await?;
    check_type::<i8>(&comm, len).await?;
    check_type::<u8>(&comm, len).await?;
    check_type::<i32>(&comm, len).await?;
    check_type::<u32>(&comm, len).await?;
    check_type::<i64>(&comm, len).await?;
    check_type::<u64>(&comm, len).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_collective_type_and_op_on_1_to_9_ranks_in_memory() {
    for p in 1..=9 {
        for len in [0, 1, 37] {
            LocalJob::in_memory(p)
                .run(move |comm| check_all_types(comm, len))
                .await
                .unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_algorithm_forced_on_the_memory_transport() {
    for algo in [
        Algorithm::Ring,
        Algorithm::RecursiveDoubling,
        Algorithm::Rabenseifner,
        Algorithm::Binomial,
        Algorithm::ScatterAllgather,
    ] {
        for p in [1, 2, 3, 5, 6, 8] {
            let mut cfg = Config::default();
            cfg.set_algorithm(Some(algo));
            rankmesh::testing::LocalJob::in_memory(p)
                .config(cfg)
                .run(|comm| async move {
                    check_type::<f32>(&comm, 101).await?;
                    check_type::<i64>(&comm, 3).await
                })
                .await
                .unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collectives_over_quic_on_3_5_7_ranks() {
    for same_host in [false, true] {
        for p in [3, 5, 7] {
            let mut cfg = Config::default();
            cfg.set_same_host_channel(same_host);
            LocalJob::quic(p)
                .config(cfg)
                .run(|comm| async move {
                    check_type::<f32>(&comm, 1001).await?;
                    check_type::<u8>(&comm, 5).await?;
                    check_type::<bf16>(&comm, 33).await
                })
                .await
                .unwrap();
        }
    }
}

/// Non-integer data: every rank must hold exactly the same bits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allreduce_is_bitwise_identical_across_ranks_and_large_odd_lengths_are_exact() {
    // 16 MiB + 8 bytes of f32: not divisible by 2 or 4 ranks' block sizes.
    let len = (16 << 20) / 4 + 2;
    for p in [2, 4] {
        for algo in [
            Algorithm::Ring,
            Algorithm::Rabenseifner,
            Algorithm::RecursiveDoubling,
        ] {
            let mut cfg = Config::default();
            cfg.set_algorithm(Some(algo));
            // 2 ranks over QUIC, 4 over the same-host channel.
            cfg.set_same_host_channel(p == 4);
            let n = if algo == Algorithm::Ring { len } else { 4099 };
            let out = LocalJob::quic(p)
                .config(cfg)
                .run(move |comm| async move {
                    let r = comm.rank();
                    let mut buf: Vec<f32> = (0..n)
                        .map(|i| ((i * 31 + r * 17) % 1000) as f32 * 0.1 + 1e-3)
                        .collect();
                    comm.all_reduce(&mut buf, ReduceOp::Sum).await?;
                    Ok(buf)
                })
                .await
                .unwrap();
            for b in &out[1..] {
                assert!(
                    b.iter()
                        .zip(&out[0])
                        .all(|(x, y)| x.to_bits() == y.to_bits()),
                    "{algo} on {p} ranks: results differ between ranks"
                );
            }
            // Every element is close to the exact sum (and, at the block
            // boundaries, not garbage).
            for (i, v) in out[0].iter().enumerate() {
                let exact: f64 = (0..p)
                    .map(|r| ((i * 31 + r * 17) % 1000) as f32 as f64 * 0.1 + 1e-3)
                    .sum();
                assert!(
                    (*v as f64 - exact).abs() < 1e-2,
                    "{algo} p={p} element {i}: {v} vs {exact}"
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_collectives_and_p2p_do_not_mix() {
    run_local(3, |comm| async move {
        let r = comm.rank();
        let mut a = vec![r as u32 + 1; 1000];
        let mut b = vec![(r as f64) * 2.0; 77];
        let mut c = if r == 1 {
            vec![9i64; 5000]
        } else {
            vec![0; 5000]
        };
        let right = (r + 1) % 3;
        let left = (r + 2) % 3;
        let mut got = [0u8; 3];
        let mine = [r as u8; 3];
        let (x, y, z, s, q) = tokio::join!(
            comm.all_reduce(&mut a, ReduceOp::Sum),
            comm.all_reduce(&mut b, ReduceOp::Max),
            comm.broadcast(&mut c, 1),
            comm.send(&mine, right, 5),
            comm.recv(&mut got, left, 5),
        );
        x?;
        y?;
        z?;
        s?;
        q?;
        assert!(a.iter().all(|&v| v == 6));
        assert!(b.iter().all(|&v| v == 4.0));
        assert!(c.iter().all(|&v| v == 9));
        assert_eq!(got, [left as u8; 3]);
        Ok(())
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_then_collectives_on_the_sub_communicators() {
    let out = run_local(5, |comm| async move {
        let r = comm.rank();
        // Evens and odds; keys reverse the order.
        let sub = comm.split((r % 2) as u32, (10 - r) as u32).await?;
        let mut v = [r as u64];
        sub.all_reduce(&mut v, ReduceOp::Sum).await?;
        let mut ranks = vec![0u64; sub.size()];
        sub.all_gather(&[r as u64], &mut ranks).await?;
        // The parent still works afterwards.
        let mut w = [1u32];
        comm.all_reduce(&mut w, ReduceOp::Sum).await?;
        Ok((sub.rank(), sub.size(), v[0], ranks, w[0]))
    })
    .await
    .unwrap();
    assert_eq!(out[0], (2, 3, 6, vec![4, 2, 0], 5));
    assert_eq!(out[1], (1, 2, 4, vec![3, 1], 5));
    assert_eq!(out[4], (0, 3, 6, vec![4, 2, 0], 5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mismatched_calls_fail_on_every_rank_naming_both_sides() {
    let t = Instant::now();
    let out = run_local(3, |comm| async move {
        // Rank 2 passes a longer buffer.
        let len = if comm.rank() == 2 { 12 } else { 10 };
        let mut buf = vec![1.0f32; len];
        let e = comm.all_reduce(&mut buf, ReduceOp::Sum).await.unwrap_err();
        Ok(e)
    })
    .await
    .unwrap();
    for (r, e) in out.iter().enumerate() {
        assert!(matches!(e, Error::Mismatch { .. }), "rank {r}: {e}");
        let s = e.to_string();
        assert!(
            s.contains("12 elements") && s.contains("10 elements"),
            "rank {r}: {s}"
        );
    }
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "mismatch was not detected promptly"
    );

    // Different ops and different roots are caught the same way.
    let out = run_local(2, |comm| async move {
        let op = if comm.rank() == 0 {
            ReduceOp::Sum
        } else {
            ReduceOp::Max
        };
        let mut buf = [1i32; 4];
        let e1 = comm.all_reduce(&mut buf, op).await.unwrap_err();
        // Both ranks think they are the root, so both only send: the
        // mismatch is found when the other's frame arrives, by the
        // broadcast itself or by one of the next calls.
        let mut buf = [1i32; 4];
        let mut e2 = comm.broadcast(&mut buf, comm.rank()).await.err();
        for _ in 0..20 {
            if e2.is_some() {
                break;
            }
            e2 = comm.barrier().await.err();
        }
        let e2 = e2.expect("the root mismatch was never reported");
        Ok((e1.to_string(), e2.to_string()))
    })
    .await
    .unwrap();
    for (e1, e2) in &out {
        assert!(e1.contains("Sum") && e1.contains("Max"), "{e1}");
        assert!(e2.contains("root 0") && e2.contains("root 1"), "{e2}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_arguments_are_refused_before_anything_is_sent() {
    LocalJob::in_memory(2)
        .run(|comm| async move {
            let mut small = [0u8; 3];
            let e = comm.all_gather(&[1u8, 2], &mut small).await.unwrap_err();
            assert!(e.to_string().contains("size * send.len() = 4"), "{e}");
            let e = comm.broadcast(&mut small, 7).await.unwrap_err();
            assert!(e.to_string().contains("root 7 is out of range"), "{e}");
            // Both ranks made the same (refused) calls, so the next call still works.
            let mut v = [comm.rank() as u8];
            comm.all_reduce(&mut v, ReduceOp::Sum).await?;
            assert_eq!(v, [1]);
            Ok(())
        })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rank_that_never_calls_is_named_and_nobody_hangs() {
    let mut cfg = Config::default();
    cfg.set_op_timeout(Duration::from_secs(3));
    let out = LocalJob::quic(3)
        .config(cfg)
        .run(|comm| async move {
            if comm.rank() == 2 {
                // Never joins the allreduce.
                tokio::time::sleep(Duration::from_secs(5)).await;
                return Ok(String::new());
            }
            let mut buf = [1.0f32; 8];
            let e = comm.all_reduce(&mut buf, ReduceOp::Sum).await.unwrap_err();
            Ok(e.to_string())
        })
        .await
        .unwrap();
    for e in &out[..2] {
        assert!(e.contains("rank 2"), "the culprit is not named: {e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rank_that_fails_mid_collective_is_named_at_once() {
    let mut cfg = Config::default();
    cfg.set_op_timeout(Duration::from_secs(120));
    let t = Instant::now();
    let out = LocalJob::quic(4)
        .config(cfg)
        .run(|comm| async move {
            if comm.rank() == 3 {
                comm.shutdown_after_error().await;
                return Ok(String::new());
            }
            let mut buf = vec![1u64; 100_000];
            let e = comm.all_reduce(&mut buf, ReduceOp::Sum).await.unwrap_err();
            Ok(e.to_string())
        })
        .await
        .unwrap();
    for e in &out[..3] {
        assert!(e.contains("rank 3"), "the failed rank is not named: {e}");
    }
    assert!(t.elapsed() < Duration::from_secs(60));
}
