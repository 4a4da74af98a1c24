//! Forming and tearing down clusters: errors propagate with the rank that
//! caused them, and a rank that finishes early does not break peers that
//! still read its data. (That nothing leaks across `run_local` calls is in
//! `lifecycle_leaks.rs`.)

use rankmesh::testing::{run_local, LocalJob};
use rankmesh::{Config, Error};
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_rank_error_is_returned_and_peers_are_released() {
    let t = Instant::now();
    let err = run_local(3, |comm| async move {
        if comm.rank() == 1 {
            return Err(Error::Config {
                detail: "rank 1 gives up".into(),
            });
        }
        // The others wait for a message rank 1 never sends.
        let mut b = [0u8; 4];
        comm.recv(&mut b, 1, 0).await?;
        Ok(())
    })
    .await
    .unwrap_err();
    assert!(err.to_string().contains("rank 1 gives up"), "{err}");
    assert!(
        t.elapsed() < Duration::from_secs(60),
        "peers were not released"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_waiting_on_a_failed_rank_get_an_error_naming_it() {
    let mut cfg = Config::default();
    cfg.set_op_timeout(Duration::from_secs(60));
    let t = Instant::now();
    let out = LocalJob::quic(2)
        .config(cfg)
        .run(|comm| async move {
            if comm.rank() == 1 {
                // Stop after an error: peers must learn at once.
                comm.shutdown_after_error().await;
                return Ok(String::new());
            }
            let mut b = [0u8; 4];
            let e = comm.recv(&mut b, 1, 0).await.unwrap_err();
            Ok(e.to_string())
        })
        .await
        .unwrap();
    assert!(out[0].contains("peer rank 1"), "{}", out[0]);
    assert!(out[0].contains("recv from rank 1"), "{}", out[0]);
    assert!(
        !out[0].contains("timed out"),
        "learned by timeout, not at once: {}",
        out[0]
    );
    assert!(t.elapsed() < Duration::from_secs(50));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rank_that_finishes_first_does_not_lose_data_in_flight() {
    // Rank 0 sends large messages and finalizes at once; rank 1 reads them
    // only later. Finalize must wait until rank 1 is done with them.
    let out = run_local(2, |comm| async move {
        let n = 3 << 20;
        if comm.rank() == 0 {
            for tag in 0..4u32 {
                comm.send(&vec![tag as u8 + 1; n], 1, tag).await?;
            }
            comm.finalize().await?;
            Ok(true)
        } else {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let mut ok = true;
            for tag in 0..4u32 {
                let mut buf = vec![0u8; n];
                comm.recv(&mut buf, 0, tag).await?;
                ok &= buf.iter().all(|&b| b == tag as u8 + 1);
            }
            Ok(ok)
        }
    })
    .await
    .unwrap();
    assert!(out[1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_after_finalize_are_errors() {
    run_local(2, |comm| async move {
        comm.finalize().await?;
        let e = comm
            .send(&[1u8], (comm.rank() + 1) % 2, 0)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("finalized"), "{e}");
        Ok(())
    })
    .await
    .unwrap();
}

/// A seed that does not answer at first (its port swallows packets, as a
/// busy or wedged seed would): the rank's handshake times out, and it tries
/// again (from a fresh UDP port) until the seed answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rank_retries_an_unanswered_seed_handshake_from_a_new_port() {
    use rankmesh::launch::{JobToken, JoinSpec, Seed, SeedConfig};
    // Reserve the seed's port with a socket that reads and drops everything.
    let sink = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = sink.local_addr().unwrap();
    sink.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let token = JobToken::generate().unwrap();
    let spec = JoinSpec {
        seed: addr,
        token: token.clone(),
        job_id: None,
        rank: Some(0),
        world_size: Some(1),
        host: "localhost".into(),
        late: false,
    };
    let mut cfg = Config::default();
    // Each handshake attempt gives up after one idle timeout.
    cfg.set_idle_timeout(Duration::from_millis(700));
    cfg.set_keep_alive(Duration::from_millis(200));
    cfg.set_formation_timeout(Duration::from_secs(60));
    let rank = tokio::spawn(rankmesh::launch::init_with(spec, cfg));
    // The first attempt's packets arrive and get no answer.
    let swallowed = tokio::task::spawn_blocking(move || {
        let (mut n, mut from) = (0, None);
        let until = Instant::now() + Duration::from_millis(1500);
        let mut buf = [0u8; 2048];
        while Instant::now() < until {
            if let Ok((_, a)) = sink.recv_from(&mut buf) {
                n += 1;
                from = Some(a);
            }
        }
        (n, from)
    })
    .await
    .unwrap();
    assert!(swallowed.0 > 0, "the rank never tried the seed");
    // Now the seed starts on that port and answers.
    let mut scfg = SeedConfig::new(1);
    scfg.set_bind(addr).set_token(token);
    let seed = Seed::start(scfg).unwrap();
    let comm = tokio::time::timeout(Duration::from_secs(60), rank)
        .await
        .expect("the rank did not join after the seed came up")
        .unwrap()
        .unwrap();
    assert_eq!(comm.size(), 1);
    comm.finalize().await.unwrap();
    seed.shutdown().await;
}
