//! Training: the data-parallel loop, gradient buckets, elastic recovery.

use super::*;

/// One line of the training log.
#[derive(Clone, Debug, PartialEq)]
pub struct EpochStats {
    /// Epoch number, from 1.
    pub epoch: u64,
    /// Mean squared error over the epoch's training samples (quality units).
    pub train_mse: f64,
    /// Root mean squared error on the held-out split after the epoch.
    pub test_rmse: f64,
    /// Training samples per second (all ranks together).
    pub samples_per_s: f64,
    /// Time this rank spent in the gradient all_reduce.
    pub comm: Duration,
    /// Time this rank spent computing (forward, backward, update).
    pub compute: Duration,
}

/// What a rank ends with.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// Final parameters (bitwise identical on every rank).
    pub params: Vec<f32>,
    /// Final momentum buffer.
    pub velocity: Vec<f32>,
    /// Global steps done in total (including those before a resume).
    pub step: u64,
    /// One entry per epoch finished in this run.
    pub log: Vec<EpochStats>,
}

/// 64-bit FNV-1a of `bytes` (checkpoint checksum, parameter fingerprint).
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xCBF2_9CE4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01B3)
    })
}

fn params_fingerprint(p: &[f32]) -> u64 {
    let bytes: Vec<u8> = p.iter().flat_map(|v| v.to_le_bytes()).collect();
    fnv1a64(&bytes)
}

/// Train on `comm`'s ranks. Every rank must call this with the same
/// `data` and `cfg`; rank 0 prints the log when `cfg.verbose`.
pub async fn train(
    comm: &Communicator,
    data: &Data,
    cfg: &TrainConfig,
) -> Result<Outcome, TrainError> {
    let (rank, size) = (comm.rank(), comm.size());
    let model = Mlp { hidden: cfg.hidden };
    let n = model.n_params();
    let n_train = data.n_train();
    let steps_per_epoch = n_train.div_ceil(cfg.batch) as u64;

    // Initial state: rank 0's (fresh or from its checkpoint), on every rank.
    let mut start = Start {
        seed: cfg.seed,
        step: 0,
        loss_sum: 0.0,
        loss_count: 0,
    };
    let mut params = vec![0f32; n];
    let mut velocity = vec![0f32; n];
    let mut resumed = false;
    if cfg.resume {
        let dir = cfg
            .checkpoint_dir
            .as_deref()
            .ok_or_else(|| TrainError::Usage("--resume needs --checkpoint-dir".into()))?;
        // Rank 0 reads; the outcome (and the state) goes to every rank, so a
        // bad checkpoint stops every rank instead of leaving them waiting.
        let mut header = [0u64; 6];
        let mut failure = None;
        if rank == 0 {
            match Checkpoint::load_from_dir(dir).and_then(|c| Checkpoint::check_fits(c, cfg, n)) {
                Ok(Some(c)) => {
                    header = [1, c.seed, c.step, c.loss_sum.to_bits(), c.loss_count, 0];
                    params = c.params;
                    velocity = c.velocity;
                }
                Ok(None) => header[0] = 2,
                Err(e) => failure = Some(e),
            }
        }
        comm.broadcast(&mut header, 0).await?;
        match header[0] {
            1 => {
                start = Start {
                    seed: header[1],
                    step: header[2],
                    loss_sum: f64::from_bits(header[3]),
                    loss_count: header[4],
                };
                let mut state = [params, velocity].concat();
                comm.broadcast(&mut state, 0).await?;
                velocity = state.split_off(n);
                params = state;
                resumed = true;
                if rank == 0 && cfg.verbose {
                    println!(
                        "resumed from {} at step {} (epoch {}, seed {})",
                        Checkpoint::path_in(dir).display(),
                        start.step,
                        start.step / steps_per_epoch + 1,
                        start.seed
                    );
                }
            }
            2 => {
                if rank == 0 && cfg.verbose {
                    println!("no checkpoint in {}; starting from scratch", dir.display());
                }
            }
            _ => {
                return Err(failure.unwrap_or_else(|| {
                    TrainError::Checkpoint(
                        "rank 0 could not load the checkpoint (see its error)".into(),
                    )
                }))
            }
        }
    }
    if !resumed {
        if rank == 0 {
            params = model.init(&mut Rng::new(cfg.seed, u64::MAX));
        }
        comm.broadcast(&mut params, 0).await?;
    }

    // One fused buffer: the gradient and, in its last element, the loss,
    // in two buckets (the hidden layer; the output layer and the loss)
    // unless both fit in one.
    let mut buf = vec![0f32; n + 1];
    let split = model.split();
    let one_bucket = (n + 1) * 4 <= cfg.bucket_bytes;
    let (mut acts, mut ds) = (Vec::new(), Vec::new());
    let mut log = Vec::new();
    let mut step = start.step;
    let first_epoch = step / steps_per_epoch;
    let (mut loss_sum, mut loss_count) = (start.loss_sum, start.loss_count);
    let stop_at = cfg.stop_after_step.unwrap_or(u64::MAX);
    for epoch in first_epoch..cfg.epochs {
        let order = Rng::new(start.seed, epoch).permutation(n_train);
        let t_epoch = Instant::now();
        let (mut comm_t, mut compute_t) = (Duration::ZERO, Duration::ZERO);
        let mut samples = 0usize;
        let mut xs = Vec::new();
        let mut ys = Vec::new();
        for b in step % steps_per_epoch..steps_per_epoch {
            if step >= stop_at {
                return Ok(Outcome {
                    params,
                    velocity,
                    step,
                    log,
                });
            }
            let t0 = Instant::now();
            let lo = b as usize * cfg.batch;
            let global = &order[lo..(lo + cfg.batch).min(n_train)];
            take_shard(data, global, rank, size, &mut xs, &mut ys);
            buf.iter_mut().for_each(|g| *g = 0.0);
            // Backward, last layer first, with DDP-style buckets: the
            // output layer's gradient (and the loss, in the buffer's last
            // element) is all-reduced while the hidden layer's is computed.
            let (ghid, gout) = buf.split_at_mut(split);
            let loss = model.backward_output(&params, &xs, &ys, &mut acts, &mut ds, gout);
            gout[gout.len() - 1] = loss;
            let mut busy = t0.elapsed();
            if one_bucket {
                model.backward_hidden(&params, &xs, &acts, &ds, ghid);
                busy = t0.elapsed();
                comm.all_reduce(&mut buf, ReduceOp::Sum).await?;
            } else {
                let (a, b) = tokio::join!(comm.all_reduce(gout, ReduceOp::Sum), async {
                    let t = Instant::now();
                    model.backward_hidden(&params, &xs, &acts, &ds, ghid);
                    busy += t.elapsed();
                    comm.all_reduce(ghid, ReduceOp::Sum).await
                });
                a?;
                b?;
            }
            let t1 = t0 + busy;
            let t2 = Instant::now();
            let scale = 1.0 / global.len() as f32;
            for ((p, v), g) in params.iter_mut().zip(&mut velocity).zip(&buf[..n]) {
                *v = cfg.momentum * *v + g * scale;
                *p -= cfg.lr * *v;
            }
            loss_sum += buf[n] as f64;
            loss_count += global.len() as u64;
            samples += global.len();
            step += 1;
            comm_t += t2 - t1;
            compute_t += (t1 - t0) + t2.elapsed();
            if cfg.verify_sync {
                let mine = [params_fingerprint(&params)];
                let mut all = vec![0u64; size];
                comm.all_gather(&mine, &mut all).await?;
                if let Some(r) = all.iter().position(|&f| f != all[0]) {
                    return Err(TrainError::Diverged(format!(
                        "after step {step} rank {r} holds different parameters than rank 0"
                    )));
                }
            }
            let end_of_epoch = step.is_multiple_of(steps_per_epoch);
            if let (0, Some(dir)) = (rank, &cfg.checkpoint_dir) {
                let last = step == cfg.epochs * steps_per_epoch;
                let due = last
                    || if cfg.checkpoint_every == 0 {
                        end_of_epoch
                    } else {
                        step.is_multiple_of(cfg.checkpoint_every)
                    };
                if due {
                    let (ls, lc) = if end_of_epoch {
                        (0.0, 0)
                    } else {
                        (loss_sum, loss_count)
                    };
                    Checkpoint {
                        hidden: cfg.hidden as u64,
                        batch: cfg.batch as u64,
                        seed: start.seed,
                        step,
                        loss_sum: ls,
                        loss_count: lc,
                        params: params.clone(),
                        velocity: velocity.clone(),
                    }
                    .save_to_dir(dir)?;
                }
            }
        }
        let wall = t_epoch.elapsed();

        // Held-out RMSE: each rank scores its share, one small all_reduce.
        let (s, e) = shard(data.test_y.len(), rank, size);
        let mut score = [
            model.sse(
                &params,
                &data.test_x[s * FEATURES..e * FEATURES],
                &data.test_y[s..e],
            ),
            (e - s) as f64,
        ];
        comm.all_reduce(&mut score, ReduceOp::Sum).await?;
        let stats = EpochStats {
            epoch: epoch + 1,
            train_mse: loss_sum / loss_count.max(1) as f64,
            test_rmse: (score[0] / score[1].max(1.0)).sqrt(),
            samples_per_s: samples as f64 / wall.as_secs_f64().max(1e-9),
            comm: comm_t,
            compute: compute_t,
        };
        if rank == 0 && cfg.verbose {
            println!("{}", format_stats(&stats, size));
        }
        log.push(stats);
        (loss_sum, loss_count) = (0.0, 0);
    }
    if let (0, Some(path)) = (rank, &cfg.plot) {
        plot_losses(path, &log, size)?;
        if cfg.verbose {
            println!("loss curve written to {}", path.display());
        }
    }
    Ok(Outcome {
        params,
        velocity,
        step,
        log,
    })
}

/// The outcome of elastic training, with the communicator it ended on.
pub struct ElasticOutcome {
    /// Parameters, step, loss curve.
    pub outcome: Outcome,
    /// The last communicator (to finalize).
    pub comm: Communicator,
    /// Membership changes seen: (step, ranks after it).
    pub changes: Vec<(u64, usize)>,
}

/// Whether `e` means a rank was lost (this rank can recover without it).
fn lost_rank(e: &TrainError) -> bool {
    matches!(
        e,
        TrainError::Comm(rankmesh::Error::PeerLost { .. } | rankmesh::Error::Aborted { .. })
    )
}

/// Elastic data-parallel training. The same model, data order and update
/// as [`train`]; every `--checkpoint-every` steps (default: every epoch)
/// the ranks commit their state and call `Communicator::checkpoint`, which
/// admits waiting processes; when a rank is lost, the survivors call
/// `recover` and continue from the last committed state. Each step shards
/// the global batch over the ranks there are, so N ranks keep training the
/// same model. `state` is the job's state for a process that just joined.
pub async fn train_elastic(
    mut comm: Communicator,
    state: Vec<u8>,
    data: &Data,
    cfg: &TrainConfig,
) -> Result<ElasticOutcome, TrainError> {
    let model = Mlp { hidden: cfg.hidden };
    let n = model.n_params();
    let n_train = data.n_train();
    let spe = n_train.div_ceil(cfg.batch) as u64;
    let total = cfg.epochs * spe;
    let every = if cfg.checkpoint_every == 0 {
        spe
    } else {
        cfg.checkpoint_every
    };
    let mut st = if state.is_empty() {
        let mut params = vec![0f32; n];
        if comm.rank() == 0 {
            params = model.init(&mut Rng::new(cfg.seed, u64::MAX));
        }
        comm.broadcast(&mut params, 0).await?;
        Checkpoint {
            hidden: cfg.hidden as u64,
            batch: cfg.batch as u64,
            seed: cfg.seed,
            step: 0,
            loss_sum: 0.0,
            loss_count: 0,
            params,
            velocity: vec![0f32; n],
        }
    } else {
        Checkpoint::from_bytes(&state, Path::new("(the job's state)"))?
    };
    let mut committed = st.to_bytes();
    let mut log: Vec<EpochStats> = Vec::new();
    let mut changes = Vec::new();
    let mut buf = vec![0f32; n + 1];
    let (mut xs, mut ys) = (Vec::new(), Vec::new());
    let mut t_epoch = Instant::now();
    let first_rank = comm.rank();
    while st.step < total {
        let result: Result<(), TrainError> = async {
            let (rank, size) = (comm.rank(), comm.size());
            let epoch = st.step / spe;
            let b = (st.step % spe) as usize;
            let order = Rng::new(st.seed, epoch).permutation(n_train);
            let lo = b * cfg.batch;
            let global = &order[lo..(lo + cfg.batch).min(n_train)];
            take_shard(data, global, rank, size, &mut xs, &mut ys);
            buf.iter_mut().for_each(|g| *g = 0.0);
            buf[n] = model.grad_sum(&st.params, &xs, &ys, &mut buf[..n]);
            comm.all_reduce(&mut buf, ReduceOp::Sum).await?;
            let scale = 1.0 / global.len() as f32;
            for ((p, v), g) in st.params.iter_mut().zip(&mut st.velocity).zip(&buf[..n]) {
                *v = cfg.momentum * *v + g * scale;
                *p -= cfg.lr * *v;
            }
            st.loss_sum += buf[n] as f64;
            st.loss_count += global.len() as u64;
            st.step += 1;
            if let Some((victim, at)) = cfg.die {
                if first_rank == victim && st.step == at {
                    println!("rank {rank}: killing itself after step {at} (--die)");
                    // SAFETY: kill(2) on this process; no memory is involved.
                    unsafe {
                        libc::kill(libc::getpid(), libc::SIGKILL);
                    }
                }
            }
            if st.step.is_multiple_of(spe) {
                let (s, e) = shard(data.test_y.len(), rank, size);
                let mut score = [
                    model.sse(
                        &st.params,
                        &data.test_x[s * FEATURES..e * FEATURES],
                        &data.test_y[s..e],
                    ),
                    (e - s) as f64,
                ];
                comm.all_reduce(&mut score, ReduceOp::Sum).await?;
                let stats = EpochStats {
                    epoch: st.step / spe,
                    train_mse: st.loss_sum / st.loss_count.max(1) as f64,
                    test_rmse: (score[0] / score[1].max(1.0)).sqrt(),
                    samples_per_s: n_train as f64 / t_epoch.elapsed().as_secs_f64().max(1e-9),
                    comm: Duration::ZERO,
                    compute: Duration::ZERO,
                };
                if rank == 0 && cfg.verbose {
                    println!(
                        "epoch {:3}  train_mse {:.4}  test_rmse {:.4}  on {size} rank(s)",
                        stats.epoch, stats.train_mse, stats.test_rmse
                    );
                }
                log.push(stats);
                st.loss_sum = 0.0;
                st.loss_count = 0;
                t_epoch = Instant::now();
            }
            Ok(())
        }
        .await;
        match result {
            Ok(()) => {}
            Err(e) if lost_rank(&e) => {
                // Back to the last committed state, without the lost rank.
                let r = comm.recover(&committed).await?;
                st = Checkpoint::from_bytes(&r.state, Path::new("(the job's state)"))?;
                log.retain(|s| s.epoch <= st.step / spe);
                if r.membership.rank == 0 && cfg.verbose {
                    println!(
                        "lost rank(s) {:?}: continuing on {} rank(s) from step {}",
                        r.membership.left, r.membership.size, st.step
                    );
                }
                changes.push((st.step, r.membership.size));
                comm = r.comm;
                continue;
            }
            Err(e) => return Err(e),
        }
        if st.step.is_multiple_of(every) || st.step == total {
            committed = st.to_bytes();
            let r = comm.checkpoint(&committed).await?;
            if r.membership.changed() {
                if r.membership.rank == 0 && cfg.verbose {
                    println!(
                        "step {}: {} rank(s) now (joined at ranks {:?}, left {:?}); data re-sharded",
                        st.step, r.membership.size, r.membership.joined, r.membership.left
                    );
                }
                changes.push((st.step, r.membership.size));
            }
            comm = r.comm;
        }
    }
    if let (0, Some(path)) = (comm.rank(), &cfg.plot) {
        plot_losses(path, &log, comm.size())?;
    }
    Ok(ElasticOutcome {
        outcome: Outcome {
            params: st.params,
            velocity: st.velocity,
            step: st.step,
            log,
        },
        comm,
        changes,
    })
}

/// Where training starts: fresh, or from a checkpoint.
struct Start {
    seed: u64,
    step: u64,
    loss_sum: f64,
    loss_count: u64,
}

/// Rank 0's line for one epoch.
pub fn format_stats(s: &EpochStats, ranks: usize) -> String {
    let busy = (s.comm + s.compute).as_secs_f64().max(1e-12);
    format!(
        "epoch {:>3}  train_mse {:.4}  test_rmse {:.4}  {:>8.0} samples/s on {} rank{}  \
         comm {:>6.1} ms ({:>2.0}%)  compute {:>6.1} ms",
        s.epoch,
        s.train_mse,
        s.test_rmse,
        s.samples_per_s,
        ranks,
        if ranks == 1 { "" } else { "s" },
        s.comm.as_secs_f64() * 1e3,
        100.0 * s.comm.as_secs_f64() / busy,
        s.compute.as_secs_f64() * 1e3,
    )
}
