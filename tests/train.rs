//! The data-parallel training example (`examples/train/`, included here as
//! a module): N ranks train the same model as one rank, every rank ends
//! each step with bitwise-identical parameters, checkpoints resume exactly,
//! and corrupt checkpoints are refused.

#[allow(dead_code)] // the example's `main` and flag parsing are not used here
#[path = "../examples/train/main.rs"]
mod train;

use rankmesh::testing::run_local;
use std::path::PathBuf;
use std::sync::Arc;
use train::{Checkpoint, Data, Outcome, TrainConfig, TrainError};

/// Small and quick: 2 epochs of 20 steps (global batch 64 of 1,279 wines).
fn small() -> TrainConfig {
    TrainConfig {
        epochs: 2,
        batch: 64,
        hidden: 16,
        verify_sync: true,
        verbose: false,
        ..TrainConfig::default()
    }
}

/// Train on `ranks` ranks; every rank's outcome, in rank order.
async fn run(
    ranks: usize,
    data: &Arc<Data>,
    cfg: &TrainConfig,
) -> Vec<Result<Outcome, TrainError>> {
    let (data, cfg) = (data.clone(), cfg.clone());
    run_local(ranks, move |comm| {
        train::train_rank(comm, data.clone(), cfg.clone())
    })
    .await
    .expect("cluster")
}

/// Every rank succeeded with bitwise-identical parameters; rank 0's outcome.
fn agreed(outs: Vec<Result<Outcome, TrainError>>) -> Outcome {
    let outs: Vec<Outcome> = outs.into_iter().map(|o| o.expect("training")).collect();
    for (r, o) in outs.iter().enumerate() {
        let same = o
            .params
            .iter()
            .zip(&outs[0].params)
            .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "rank {r} ended with different parameters than rank 0");
        assert_eq!(o.step, outs[0].step);
    }
    outs.into_iter().next().expect("rank 0")
}

fn scratch_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("rankmesh-train-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// N ranks with the same global batch train the same model as one rank.
///
/// Not bitwise: one rank sums a minibatch's 64 per-sample gradients in one
/// f32 loop, N ranks sum contiguous shards and then add the N partial sums
/// inside the all_reduce, so the roundings differ (each is at most
/// 64 * 2^-24 ~ 4e-6 of the summed magnitudes). Over 40 SGD steps these
/// stay of that order because training is contracting here, so the bound
/// is 1e-5 of the largest parameter magnitude (observed: about 1e-7).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n_ranks_train_the_same_model_as_one_rank() {
    let data = Arc::new(train::load_data());
    let cfg = small();
    let one = agreed(run(1, &data, &cfg).await);
    let scale = one.params.iter().fold(1f32, |m, p| m.max(p.abs()));
    for ranks in [2, 3] {
        let many = agreed(run(ranks, &data, &cfg).await);
        assert_eq!(many.step, one.step);
        let worst = one
            .params
            .iter()
            .zip(&many.params)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        eprintln!("{ranks} ranks vs 1: max |diff| {worst:e}, scale {scale}");
        assert!(
            worst <= 1e-5 * scale,
            "{ranks} ranks differ from 1 rank by {worst:e} (bound {:e})",
            1e-5 * scale
        );
        for (a, b) in one.log.iter().zip(&many.log) {
            assert!((a.train_mse - b.train_mse).abs() <= 1e-5 * a.train_mse);
            assert!((a.test_rmse - b.test_rmse).abs() <= 1e-5 * a.test_rmse);
        }
    }
}

/// The layer-by-layer backward pass (which lets the output layer's bucket
/// be all-reduced while the hidden layer's gradient is computed) gives the
/// same bits as the one-pass gradient.
#[test]
fn layer_wise_backward_matches_the_one_pass_gradient_bitwise() {
    let data = train::load_data();
    let model = train::Mlp { hidden: 16 };
    let p = model.init(&mut train::Rng::new(3, 0));
    let (xs, ys) = (&data.train_x[..64 * 11], &data.train_y[..64]);
    let mut one = vec![0f32; model.n_params()];
    let loss1 = model.grad_sum(&p, xs, ys, &mut one);
    let mut two = vec![0f32; model.n_params()];
    let (acts, ds) = (&mut Vec::new(), &mut Vec::new());
    let (ghid, gout) = two.split_at_mut(model.split());
    let loss2 = model.backward_output(&p, xs, ys, acts, ds, gout);
    model.backward_hidden(&p, xs, acts, ds, ghid);
    assert_eq!(loss1.to_bits(), loss2.to_bits());
    assert!(one
        .iter()
        .zip(&two)
        .all(|(a, b)| a.to_bits() == b.to_bits()));
}

/// DDP-style buckets (two, overlapping the hidden layer's backward pass)
/// train the same model as one fused all_reduce: bitwise on 2 ranks (every
/// algorithm adds the same two values), within rounding on 3 (the bucket
/// sizes pick different algorithms, which associate the sums differently).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ddp_buckets_train_the_same_model_as_one_fused_buffer() {
    let data = Arc::new(train::load_data());
    for ranks in [2, 3] {
        let fused = agreed(run(ranks, &data, &small()).await);
        let bucketed = TrainConfig {
            bucket_bytes: 1024,
            ..small()
        };
        let split = agreed(run(ranks, &data, &bucketed).await);
        let worst = fused
            .params
            .iter()
            .zip(&split.params)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        if ranks == 2 {
            assert_eq!(worst, 0.0, "2 ranks: bucketed differs by {worst:e}");
        } else {
            let scale = fused.params.iter().fold(1f32, |m, p| m.max(p.abs()));
            assert!(
                worst <= 1e-5 * scale,
                "3 ranks: bucketed differs by {worst:e}"
            );
        }
    }
}

/// `--plot` draws the loss curve.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plot_draws_the_loss_curve_as_svg() {
    let data = Arc::new(train::load_data());
    let dir = scratch_dir("plot");
    std::fs::create_dir_all(&dir).unwrap();
    let svg = dir.join("loss.svg");
    let cfg = TrainConfig {
        plot: Some(svg.clone()),
        ..small()
    };
    agreed(run(2, &data, &cfg).await);
    let text = std::fs::read_to_string(&svg).expect("the plot was written");
    assert!(text.starts_with("<svg"), "{}", &text[..80.min(text.len())]);
    assert!(text.contains("training MSE") && text.contains("held-out RMSE"));
    assert!(text.contains("<polyline"), "no curve drawn");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Elastic training: a 2-rank job admits two waiting processes at its first
/// checkpoint (step 5), re-shards the data over 4 ranks and trains on; all
/// ranks end with identical parameters, close to an uninterrupted run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn elastic_training_grows_and_matches_an_uninterrupted_run() {
    use rankmesh::launch::{JoinSpec, Seed, SeedConfig};
    let data = Arc::new(train::load_data());
    let cfg = TrainConfig {
        elastic: true,
        checkpoint_every: 5,
        ..small()
    };
    let plain = agreed(run(2, &data, &small()).await);
    let mut sc = SeedConfig::new(2);
    sc.set_elastic(2, 4);
    let seed = Seed::start(sc).unwrap();
    let spec = |rank: Option<usize>| JoinSpec {
        seed: seed.addr().unwrap(),
        token: seed.token().clone(),
        job_id: Some(seed.job_id().to_string()),
        rank,
        world_size: rank.map(|_| 2),
        host: "localhost".into(),
        late: rank.is_none(),
    };
    // The first ranks form the job, then wait until both joiners are queued,
    // so the first checkpoint (step 5) admits both.
    let (go, gate) = tokio::sync::watch::channel(false);
    let start = |rank: Option<usize>| {
        let (data, cfg, spec, mut gate) = (data.clone(), cfg.clone(), spec(rank), gate.clone());
        tokio::spawn(async move {
            let s = rankmesh::launch::init_elastic_with(spec, rankmesh::Config::default())
                .await
                .expect("join");
            gate.wait_for(|g| *g).await.expect("gate");
            let out = train::train_elastic(s.comm, s.state, &data, &cfg)
                .await
                .expect("elastic training");
            out.comm.finalize().await.expect("finalize");
            (out.outcome, out.changes)
        })
    };
    let tasks = vec![start(Some(0)), start(Some(1)), start(None), start(None)];
    for _ in 0..1500 {
        if seed.waiting_joiners() == 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(
        seed.waiting_joiners(),
        2,
        "the joiners never reached the seed"
    );
    go.send_replace(true);
    let mut outs = Vec::new();
    for t in tasks {
        outs.push(t.await.unwrap());
    }
    let (first, first_changes) = &outs[0];
    assert_eq!(
        first_changes,
        &vec![(5, 4)],
        "the job did not grow at step 5"
    );
    for (o, _) in &outs {
        assert_eq!(o.step, first.step);
        assert!(o
            .params
            .iter()
            .zip(&first.params)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
    }
    let scale = plain.params.iter().fold(1f32, |m, p| m.max(p.abs()));
    let worst = plain
        .params
        .iter()
        .zip(&first.params)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst <= 1e-5 * scale, "elastic run differs by {worst:e}");
    // The loss curve continues without a jump.
    for (a, b) in plain.log.iter().zip(&first.log) {
        assert!(
            (a.train_mse - b.train_mse).abs() <= 1e-4 * a.train_mse,
            "{a:?} vs {b:?}"
        );
    }
}

/// Stopping after a checkpoint and resuming gives exactly (bitwise) the
/// parameters and loss curve of an uninterrupted run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_continues_exactly() {
    let data = Arc::new(train::load_data());
    let dir = scratch_dir("resume");
    let full = TrainConfig {
        epochs: 3,
        ..small()
    };
    let whole = agreed(run(2, &data, &full).await);

    // Checkpoint every 7 steps (20 per epoch) and stop at step 27: the last
    // checkpoint is at step 21, in the middle of epoch 2.
    let first = TrainConfig {
        checkpoint_dir: Some(dir.clone()),
        checkpoint_every: 7,
        stop_after_step: Some(27),
        ..full.clone()
    };
    let part = agreed(run(2, &data, &first).await);
    assert_eq!(part.step, 27);
    assert_eq!(
        Checkpoint::load_from_dir(&dir)
            .expect("load")
            .expect("a checkpoint")
            .step,
        21
    );
    // A write interrupted before its rename leaves a stray temporary file;
    // it must not matter.
    std::fs::write(dir.join("checkpoint.bin.tmp"), b"half a checkpoint").expect("write");

    let second = TrainConfig {
        resume: true,
        checkpoint_dir: Some(dir.clone()),
        checkpoint_every: 7,
        ..full.clone()
    };
    let rest = agreed(run(2, &data, &second).await);
    assert_eq!(rest.step, whole.step);
    assert!(
        rest.params
            .iter()
            .zip(&whole.params)
            .all(|(a, b)| a.to_bits() == b.to_bits()),
        "resumed parameters differ from the uninterrupted run"
    );
    assert_eq!(rest.velocity, whole.velocity);
    // The loss curve continues: epochs 2 and 3 as in the uninterrupted run.
    assert_eq!(rest.log.len(), 2);
    for (a, b) in rest.log.iter().zip(&whole.log[1..]) {
        assert_eq!(
            (a.epoch, a.train_mse, a.test_rmse),
            (b.epoch, b.train_mse, b.test_rmse)
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn sample_checkpoint() -> Checkpoint {
    Checkpoint {
        hidden: 16,
        batch: 64,
        seed: 1,
        step: 21,
        loss_sum: 12.5,
        loss_count: 64,
        params: (0..225).map(|i| i as f32 * 0.01).collect(),
        velocity: (0..225).map(|i| -(i as f32)).collect(),
    }
}

#[test]
fn checkpoint_round_trips_and_refuses_corruption() {
    let dir = scratch_dir("corrupt-unit");
    let c = sample_checkpoint();
    c.save_to_dir(&dir).expect("save");
    let path = Checkpoint::path_in(&dir);
    assert_eq!(
        Checkpoint::load_from_dir(&dir).expect("load"),
        Some(c.clone())
    );
    let good = std::fs::read(&path).expect("read");

    let mut flipped = good.clone();
    flipped[100] ^= 0x10;
    let e = Checkpoint::from_bytes(&flipped, &path).expect_err("bad checksum accepted");
    assert!(e.to_string().contains("checksum mismatch"), "{e}");

    for len in [good.len() - 1, good.len() / 2, 10, 0] {
        let e = Checkpoint::from_bytes(&good[..len], &path).expect_err("truncated accepted");
        assert!(e.to_string().contains("truncated"), "{len} bytes: {e}");
        assert!(e.to_string().contains("checkpoint.bin"), "{e}");
    }
    let mut longer = good.clone();
    longer.push(0);
    assert!(Checkpoint::from_bytes(&longer, &path).is_err());

    // No checkpoint at all is not an error (a fresh start).
    assert_eq!(
        Checkpoint::load_from_dir(&dir.join("none")).expect("load"),
        None
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Resuming from a corrupt checkpoint stops every rank (none hangs) with a
/// clear error on rank 0, and leaves the file as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_checkpoint_is_refused_by_every_rank() {
    let data = Arc::new(train::load_data());
    let dir = scratch_dir("corrupt-run");
    let c = sample_checkpoint();
    c.save_to_dir(&dir).expect("save");
    let path = Checkpoint::path_in(&dir);
    let mut bytes = std::fs::read(&path).expect("read");
    let last = bytes.len() - 20;
    bytes[last] ^= 1;
    std::fs::write(&path, &bytes).expect("corrupt");

    let cfg = TrainConfig {
        resume: true,
        checkpoint_dir: Some(dir.clone()),
        ..small()
    };
    let outs = run(2, &data, &cfg).await;
    for (r, o) in outs.iter().enumerate() {
        match o {
            Err(TrainError::Checkpoint(msg)) => {
                if r == 0 {
                    assert!(msg.contains("checksum mismatch"), "{msg}");
                }
            }
            other => panic!("rank {r}: expected a checkpoint error, got {other:?}"),
        }
    }
    assert_eq!(
        std::fs::read(&path).expect("read"),
        bytes,
        "file was changed"
    );

    // A checkpoint of another model is refused too, naming the settings.
    sample_checkpoint().save_to_dir(&dir).expect("save");
    let other = TrainConfig { hidden: 8, ..cfg };
    let outs = run(1, &data, &other).await;
    match &outs[0] {
        Err(TrainError::Checkpoint(msg)) => assert!(msg.contains("--hidden 16"), "{msg}"),
        o => panic!("expected a checkpoint error, got {o:?}"),
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn flags_parse() {
    let args: Vec<String> = "--epochs 3 --batch 32 --lr 0.05 --seed 9 --checkpoint-dir d --checkpoint-every 5 --resume --ranks 2 --bucket-kb 4 --plot c.svg"
        .split(' ')
        .map(String::from)
        .collect();
    let (cfg, ranks) = train::parse_args(&args).expect("parse");
    assert_eq!(
        (cfg.epochs, cfg.batch, cfg.seed, cfg.checkpoint_every, ranks),
        (3, 32, 9, 5, 2)
    );
    assert!(cfg.resume && cfg.checkpoint_dir.is_some() && (cfg.lr - 0.05).abs() < 1e-9);
    assert_eq!(cfg.bucket_bytes, 4096);
    assert_eq!(cfg.plot.as_deref(), Some(std::path::Path::new("c.svg")));
    assert!(train::parse_args(&["--resume".to_string()]).is_err());
    assert!(train::parse_args(&["--epochs".to_string()]).is_err());
    assert!(train::parse_args(&["--bogus".to_string()]).is_err());
}
