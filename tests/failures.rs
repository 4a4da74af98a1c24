//! Failure semantics: a job-wide abort reaches every rank with its reason,
//! and a rank that leaves mid-job is named by every survivor quickly, also
//! by ranks it never exchanged a message with (the seed tells them).

use rankmesh::testing::LocalJob;
use rankmesh::{Config, Error, ReduceOp};
use std::time::{Duration, Instant};

fn patient() -> Config {
    // Long enough that only the failure path, not a timeout, can end the
    // waits below.
    let mut cfg = Config::default();
    cfg.set_op_timeout(Duration::from_secs(120));
    cfg
}

/// Rank 2 aborts with `reason` (after `delay`). Rank 1 waits in a
/// point-to-point receive from rank 0, which never sends; ranks 0 and 3
/// wait in an allreduce rank 2 never joins. Each returns its error's text.
async fn abort_program(
    comm: rankmesh::Communicator,
    reason: &'static str,
    delay: Duration,
) -> rankmesh::Result<String> {
    match comm.rank() {
        2 => {
            tokio::time::sleep(delay).await;
            comm.abort(reason).await;
            Ok(String::new())
        }
        1 => {
            let mut b = [0u8; 4];
            Ok(comm.recv(&mut b, 0, 9).await.unwrap_err().to_string())
        }
        _ => {
            let mut v = [1.0f32; 16];
            let e = comm.all_reduce(&mut v, ReduceOp::Sum).await.unwrap_err();
            assert!(matches!(e, Error::Aborted { by_rank: 2, .. }), "{e}");
            Ok(e.to_string())
        }
    }
}

/// Every rank but the aborting one names rank 2 and its reason.
fn check_aborted(out: &[String], reason: &str) {
    for r in [0, 1, 3] {
        assert!(out[r].contains(reason), "rank {r}: {}", out[r]);
        assert!(out[r].contains("rank 2"), "rank {r}: {}", out[r]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_ends_the_job_for_every_rank_with_its_reason() {
    let t = Instant::now();
    let reason = "loss became NaN at step 17";
    let out = LocalJob::quic(4)
        .config(patient())
        .run(move |comm| abort_program(comm, reason, Duration::from_millis(300)))
        .await
        .unwrap();
    check_aborted(&out, reason);
    assert!(t.elapsed() < Duration::from_secs(60));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abort_is_passed_on_by_ranks_that_end_after_it() {
    // The in-process transport has no seed: the abort reaches ranks 1 and 3
    // only because the ranks that end after it pass it on.
    let reason = "out of memory on the loader";
    let out = LocalJob::in_memory(4)
        .config(patient())
        .run(move |comm| abort_program(comm, reason, Duration::ZERO))
        .await
        .unwrap();
    check_aborted(&out, reason);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rank_that_leaves_mid_job_is_named_by_survivors_it_never_talked_to() {
    let t = Instant::now();
    let out = LocalJob::quic(4)
        .config(patient())
        .run(|comm| async move {
            if comm.rank() == 3 {
                // Leaves without taking part (drops its communicator).
                return Ok(String::new());
            }
            let mut v = vec![1u32; 64];
            let e = comm.all_reduce(&mut v, ReduceOp::Sum).await.unwrap_err();
            Ok(e.to_string())
        })
        .await
        .unwrap();
    for (r, e) in out[..3].iter().enumerate() {
        assert!(e.contains("rank 3"), "rank {r}: {e}");
    }
    // Well within the 120 s operation timeout: the seed told the ranks.
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "took {:?}",
        t.elapsed()
    );
}

/// Log lines, captured for the hang-warning test.
static LOG: std::sync::Mutex<Vec<u8>> = std::sync::Mutex::new(Vec::new());

struct Capture;

impl std::io::Write for Capture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        LOG.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_collective_warns_naming_the_rank_it_waits_on() {
    let _ = tracing_subscriber::fmt()
        .with_writer(|| Capture)
        .with_ansi(false)
        .with_max_level(tracing::Level::WARN)
        .try_init();
    let dir = std::env::temp_dir().join(format!("rankmesh-flight-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut cfg = Config::default();
    cfg.set_hang_warning(Duration::from_millis(200));
    cfg.set_op_timeout(Duration::from_secs(3));
    cfg.set_flight_dir(Some(dir.clone()));
    let out = LocalJob::quic(2)
        .config(cfg)
        .run(|comm| async move {
            if comm.rank() == 1 {
                tokio::time::sleep(Duration::from_secs(4)).await;
                return Ok(String::new());
            }
            let mut v = [0u8; 4];
            Ok(comm
                .all_reduce(&mut v, ReduceOp::Max)
                .await
                .unwrap_err()
                .to_string())
        })
        .await
        .unwrap();
    let log = String::from_utf8_lossy(&LOG.lock().unwrap()).to_string();
    assert!(
        log.contains("has waited") && log.contains("on rank 1"),
        "{log}"
    );
    // The warning says how far each peer got.
    assert!(log.contains("rank 1: none yet"), "{log}");
    // The timeout wrote the flight recorder and says where.
    let e = &out[0];
    let file = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.to_string_lossy().ends_with("-rank0.txt"))
        .unwrap_or_else(|| panic!("no flight recorder file; error: {e}"));
    assert!(e.contains(&*file.to_string_lossy()), "{e}");
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.contains("reason: timeout"), "{text}");
    assert!(
        text.contains("FAILED") && text.contains("all_reduce"),
        "{text}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `Config::set_trace_file` (RANKMESH_TRACE) writes a Chrome/Perfetto
/// trace per rank with every operation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trace_file_per_rank_records_every_operation() {
    let dir = std::env::temp_dir().join(format!("rankmesh-trace-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut cfg = Config::default();
    cfg.set_trace_file(Some(dir.join("trace.json")));
    LocalJob::quic(3)
        .config(cfg)
        .run(|comm| async move {
            let mut v = vec![1.0f32; 1000];
            for _ in 0..3 {
                comm.all_reduce(&mut v, ReduceOp::Sum).await?;
            }
            comm.broadcast(&mut v, 2).await?;
            if comm.rank() == 0 {
                comm.send(&v[..4], 1, 9).await?;
            } else if comm.rank() == 1 {
                comm.recv(&mut v[..4], 0, 9).await?;
            }
            comm.finalize().await
        })
        .await
        .unwrap();
    for r in 0..3 {
        let t = std::fs::read_to_string(dir.join(format!("trace.rank{r}.json")))
            .unwrap_or_else(|e| panic!("rank {r}'s trace: {e}"));
        assert!(t.contains("\"traceEvents\""), "{t}");
        for seq in 0..3 {
            assert!(
                t.contains(&format!("\"name\":\"all_reduce #{seq}\"")),
                "{t}"
            );
        }
        assert!(t.contains("\"name\":\"broadcast #3\""), "{t}");
        assert!(
            t.contains("\"bytes\":4000") && t.contains("\"state\":\"done\""),
            "{t}"
        );
        if r < 2 {
            assert!(
                t.contains(if r == 0 {
                    "\"name\":\"send"
                } else {
                    "\"name\":\"recv"
                }),
                "{t}"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A rank whose process stops responding (its runtime blocked, so no
/// packets and no keep-alives) is declared lost after the idle timeout,
/// long before the operation timeout.
#[test]
fn a_silent_rank_is_detected_within_the_idle_timeout() {
    use rankmesh::launch::{JoinSpec, Seed, SeedConfig};
    let rt = |threads: usize| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
            .unwrap()
    };
    let seed_rt = rt(1);
    let seed = seed_rt
        .block_on(async { Seed::start(SeedConfig::new(2)) })
        .unwrap();
    let mut cfg = patient();
    cfg.set_idle_timeout(Duration::from_secs(2));
    cfg.set_keep_alive(Duration::from_millis(500));
    let spec = |r: usize| JoinSpec {
        seed: seed.addr().unwrap(),
        token: seed.token().clone(),
        job_id: Some(seed.job_id().to_string()),
        rank: Some(r),
        world_size: Some(2),
        host: "localhost".into(),
        late: false,
    };
    let (s0, s1, c0, c1) = (spec(0), spec(1), cfg.clone(), cfg);
    let silent = std::thread::spawn(move || {
        // One thread runs everything of this rank (its QUIC drivers too),
        // so blocking it silences the rank completely.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let comm = rankmesh::launch::init_with(s1, c1).await.unwrap();
            comm.send(&[1u8], 0, 0).await.unwrap();
            // Let the message go out, then freeze this rank's only thread.
            tokio::time::sleep(Duration::from_millis(500)).await;
            std::thread::sleep(Duration::from_secs(5));
            drop(comm);
        });
    });
    let t = Instant::now();
    let err = rt(1)
        .block_on(async move {
            let comm = rankmesh::launch::init_with(s0, c0).await.unwrap();
            let mut b = [0u8; 1];
            comm.recv(&mut b, 1, 0).await.unwrap();
            let e = comm.recv(&mut b, 1, 0).await.unwrap_err();
            comm.shutdown_after_error().await;
            e
        })
        .to_string();
    let took = t.elapsed();
    assert!(err.contains("rank 1"), "{err}");
    assert!(err.contains("idle timeout"), "{err}");
    assert!(took < Duration::from_secs(30), "took {took:?}");
    silent.join().unwrap();
    seed_rt.block_on(seed.shutdown());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rank_that_refuses_its_arguments_releases_the_others_at_once() {
    let t = Instant::now();
    let out = LocalJob::quic(2)
        .config(patient())
        .run(|comm| async move {
            let mine = [comm.rank() as u32; 3];
            // Rank 1 passes a receive buffer of the wrong length: refused
            // locally, and rank 0, already waiting for rank 1's block, is told.
            let mut all = vec![0u32; if comm.rank() == 1 { 5 } else { 6 }];
            Ok(comm
                .all_gather(&mine, &mut all)
                .await
                .unwrap_err()
                .to_string())
        })
        .await
        .unwrap();
    assert!(out[1].contains("size * send.len() = 6"), "{}", out[1]);
    assert!(out[0].contains("rank 1"), "{}", out[0]);
    assert!(out[0].contains("size * send.len() = 6"), "{}", out[0]);
    assert!(
        t.elapsed() < Duration::from_secs(60),
        "rank 0 waited for its timeout"
    );
}
