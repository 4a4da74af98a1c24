//! Data-parallel training of a small MLP on the Wine Quality (red) data set
//! (1,599 wines, 11 physico-chemical features, quality score 3..8; shipped
//! inside the `linfa-datasets` crate, nothing is downloaded).
//!
//! Under the launcher:
//!
//! ```text
//! cargo build --workspace --examples
//! target/debug/rankrun -n 4 target/debug/examples/train --epochs 10
//! ```
//!
//! Alone (`cargo run --example train -- --ranks 2`): forms a cluster in this
//! process with `rankmesh::testing::run_local`.
//!
//! How it works (the pattern of PyTorch DDP, written out by hand):
//! - every rank starts from rank 0's initial parameters (`broadcast`);
//! - every global minibatch is cut into one contiguous shard per rank; each
//!   rank sums the gradient of the loss over its shard;
//! - the gradient (plus the loss) lives in one flat buffer, all-reduced
//!   (`Sum`) in buckets like PyTorch DDP: the backward pass runs last layer
//!   first, and once a bucket is complete its all_reduce starts while the
//!   earlier layers' gradients are still being computed (`--bucket-kb`,
//!   default 25 MiB: this small model fits in one bucket, reduced after the
//!   backward pass). The sums add the shards up; every rank divides by the global batch
//!   size and applies the same SGD-with-momentum update, so every rank holds
//!   bitwise-identical parameters and N ranks train the same model as one
//!   rank with the same global batch (up to the order of the float sums);
//! - the data order is a shuffle from `--seed` and the epoch number,
//!   identical on every rank;
//! - rank 0 alone writes checkpoints (`--checkpoint-dir`), atomically and
//!   with a checksum; `--resume` continues exactly where it stopped.
//!
//! Flags: `--epochs N` (default 10), `--batch N` (global batch, default 64),
//! `--lr F` (0.01), `--momentum F` (0.9), `--hidden N` (64), `--seed N` (1),
//! `--checkpoint-dir DIR`, `--checkpoint-every K` (steps; default: every
//! epoch; the last step is always saved), `--resume` (continue from the
//! checkpoint in DIR, or start fresh if there is none), `--bucket-kb N`
//! (largest gradient bucket), `--plot FILE.svg` (draw the loss curves),
//! `--elastic` (under `rankrun --elastic MIN:MAX`: processes started with
//! `rankrun --join` are admitted at checkpoints and lost ranks are dropped,
//! see [`train_elastic`]; `--die RANK@STEP` makes that rank SIGKILL itself,
//! to watch the others recover), `--ranks N` (without a launcher only;
//! default 4).
//!
//! `tests/train.rs` includes this file as a module and calls [`train`].

use rankmesh::{Communicator, ReduceOp};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Number of input features of the data set.
pub const FEATURES: usize = 11;
/// Share of the data set held out for the test RMSE.
const TEST_FRACTION: f64 = 0.2;
/// The train/test split is fixed (independent of `--seed`), so runs with
/// different seeds are evaluated on the same wines.
const SPLIT_SEED: u64 = 0x005E_ED0F_5A1E;

// ---------------------------------------------------------------- settings

/// Everything that defines a training run.
#[derive(Clone, Debug)]
pub struct TrainConfig {
    /// Number of passes over the training split.
    pub epochs: u64,
    /// Global minibatch size (summed over all ranks).
    pub batch: usize,
    /// Learning rate.
    pub lr: f32,
    /// SGD momentum (0 for plain SGD).
    pub momentum: f32,
    /// Hidden units of the MLP.
    pub hidden: usize,
    /// Seed of the initial parameters and of the data order.
    pub seed: u64,
    /// Where rank 0 writes checkpoints (none: no checkpoints).
    pub checkpoint_dir: Option<PathBuf>,
    /// Write a checkpoint every this many steps (0: at the end of every
    /// epoch), and after the last step.
    pub checkpoint_every: u64,
    /// Continue from the checkpoint in `checkpoint_dir`, if there is one.
    pub resume: bool,
    /// Check after every step that all ranks hold identical parameters
    /// (one extra small all_gather per step).
    pub verify_sync: bool,
    /// Stop after this many global steps (to simulate an interruption).
    pub stop_after_step: Option<u64>,
    /// Print the per-epoch lines on rank 0.
    pub verbose: bool,
    /// Largest gradient bucket in bytes (PyTorch DDP's `bucket_cap_mb`):
    /// layers are grouped, last layer first, into buckets of at most this
    /// size, and each bucket's all_reduce starts as soon as the backward
    /// pass has produced it, overlapping the rest of the backward pass.
    pub bucket_bytes: usize,
    /// Draw the loss curve per epoch into this SVG file (rank 0).
    pub plot: Option<PathBuf>,
    /// Elastic training (`rankrun --elastic`): processes may join at
    /// checkpoints and lost ranks are dropped; the data is re-sharded over
    /// the ranks there are.
    pub elastic: bool,
    /// Fault injection for demonstrations and tests: this rank (of the
    /// starting job) kills itself with SIGKILL after this many steps.
    pub die: Option<(usize, u64)>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            epochs: 10,
            batch: 64,
            lr: 0.01,
            momentum: 0.9,
            hidden: 64,
            seed: 1,
            checkpoint_dir: None,
            checkpoint_every: 0,
            resume: false,
            verify_sync: false,
            stop_after_step: None,
            verbose: true,
            bucket_bytes: 25 << 20,
            plot: None,
            elastic: false,
            die: None,
        }
    }
}

/// Parse the command line (no argument parser dependency). Returns the
/// settings and `--ranks` (used only without a launcher).
pub fn parse_args(args: &[String]) -> Result<(TrainConfig, usize), TrainError> {
    fn value<T: std::str::FromStr>(flag: &str, v: Option<&String>) -> Result<T, TrainError> {
        let v = v.ok_or_else(|| TrainError::Usage(format!("{flag} needs a value")))?;
        v.parse()
            .map_err(|_| TrainError::Usage(format!("{flag}: cannot parse {v:?}")))
    }
    let mut cfg = TrainConfig::default();
    let mut ranks = 4;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--epochs" => cfg.epochs = value(a, it.next())?,
            "--batch" => cfg.batch = value(a, it.next())?,
            "--lr" => cfg.lr = value(a, it.next())?,
            "--momentum" => cfg.momentum = value(a, it.next())?,
            "--hidden" => cfg.hidden = value(a, it.next())?,
            "--seed" => cfg.seed = value(a, it.next())?,
            "--checkpoint-dir" => cfg.checkpoint_dir = Some(value::<String>(a, it.next())?.into()),
            "--checkpoint-every" => cfg.checkpoint_every = value(a, it.next())?,
            "--resume" => cfg.resume = true,
            "--verify-sync" => cfg.verify_sync = true,
            "--bucket-kb" => cfg.bucket_bytes = value::<usize>(a, it.next())?.saturating_mul(1024),
            "--plot" => cfg.plot = Some(value::<String>(a, it.next())?.into()),
            "--elastic" => cfg.elastic = true,
            "--die" => {
                let v: String = value(a, it.next())?;
                let (r, st) = v
                    .split_once('@')
                    .ok_or_else(|| TrainError::Usage(format!("--die {v}: expected RANK@STEP")))?;
                cfg.die = Some((
                    value("--die", Some(&r.to_string()))?,
                    value("--die", Some(&st.to_string()))?,
                ));
            }
            "--ranks" => ranks = value(a, it.next())?,
            "-h" | "--help" => return Err(TrainError::Usage(USAGE.into())),
            other => {
                return Err(TrainError::Usage(format!(
                    "unknown flag {other:?}\n{USAGE}"
                )))
            }
        }
    }
    if cfg.batch == 0 || cfg.hidden == 0 || ranks == 0 {
        return Err(TrainError::Usage(
            "--batch, --hidden and --ranks must be at least 1".into(),
        ));
    }
    if cfg.resume && cfg.checkpoint_dir.is_none() {
        return Err(TrainError::Usage("--resume needs --checkpoint-dir".into()));
    }
    Ok((cfg, ranks))
}

const USAGE: &str = "usage: train [--epochs N] [--batch N] [--lr F] [--momentum F] [--hidden N] \
[--seed N] [--checkpoint-dir DIR [--checkpoint-every K] [--resume]] [--bucket-kb N] [--plot FILE.svg] \
[--elastic [--die RANK@STEP]] [--verify-sync] [--ranks N]";

// ------------------------------------------------------------------ errors

/// Why training stopped.
#[derive(Debug)]
pub enum TrainError {
    /// A rankmesh operation failed.
    Comm(rankmesh::Error),
    /// A checkpoint could not be read, is corrupt, or does not fit this run.
    Checkpoint(String),
    /// Bad command line.
    Usage(String),
    /// Ranks ended a step with different parameters (`verify_sync`).
    Diverged(String),
}

impl fmt::Display for TrainError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TrainError::Comm(e) => write!(f, "{e}"),
            TrainError::Checkpoint(s) => write!(f, "checkpoint: {s}"),
            TrainError::Usage(s) => write!(f, "{s}"),
            TrainError::Diverged(s) => write!(f, "ranks diverged: {s}"),
        }
    }
}

impl std::error::Error for TrainError {}

impl From<rankmesh::Error> for TrainError {
    fn from(e: rankmesh::Error) -> Self {
        TrainError::Comm(e)
    }
}

// -------------------------------------------------------------------- data

/// A deterministic generator (SplitMix64): the same numbers on every rank.
pub struct Rng(u64);

impl Rng {
    /// A generator for stream `stream` of `seed`.
    pub fn new(seed: u64, stream: u64) -> Rng {
        let mut r = Rng(seed ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03));
        r.next_u64();
        r
    }
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `[-1, 1)`.
    pub fn symmetric(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    /// A uniformly random permutation of `0..n` (Fisher-Yates).
    pub fn permutation(&mut self, n: usize) -> Vec<usize> {
        let mut p: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            let j = (self.next_u64() % (i as u64 + 1)) as usize;
            p.swap(i, j);
        }
        p
    }
}

/// The data set, split and standardised (features to zero mean and unit
/// variance, target centred; statistics from the training split only).
pub struct Data {
    /// Training features, row-major, `FEATURES` per sample.
    pub train_x: Vec<f32>,
    /// Training targets (quality minus `y_mean`).
    pub train_y: Vec<f32>,
    /// Held-out features.
    pub test_x: Vec<f32>,
    /// Held-out targets (quality minus `y_mean`).
    pub test_y: Vec<f32>,
    /// Mean quality of the training split.
    pub y_mean: f32,
}

impl Data {
    /// Number of training samples.
    pub fn n_train(&self) -> usize {
        self.train_y.len()
    }
}

/// Load Wine Quality (red) from `linfa-datasets`, split it and standardise it.
pub fn load_data() -> Data {
    let ds = linfa_datasets::winequality();
    let n = ds.targets.len();
    let x: Vec<f64> = ds.records.iter().copied().collect();
    let y: Vec<f64> = ds.targets.iter().map(|&q| q as f64).collect();
    let order = Rng::new(SPLIT_SEED, 0).permutation(n);
    let n_test = (n as f64 * TEST_FRACTION).round() as usize;
    let (test_idx, train_idx) = order.split_at(n_test);

    let mut mean = [0f64; FEATURES];
    let mut var = [0f64; FEATURES];
    for &i in train_idx {
        for f in 0..FEATURES {
            mean[f] += x[i * FEATURES + f];
        }
    }
    mean.iter_mut().for_each(|m| *m /= train_idx.len() as f64);
    for &i in train_idx {
        for f in 0..FEATURES {
            var[f] += (x[i * FEATURES + f] - mean[f]).powi(2);
        }
    }
    let std: Vec<f64> = var
        .iter()
        .map(|v| (v / train_idx.len() as f64).sqrt().max(1e-12))
        .collect();
    let y_mean = train_idx.iter().map(|&i| y[i]).sum::<f64>() / train_idx.len() as f64;

    let (x, std) = (&x, &std);
    let take = |idx: &[usize]| {
        let xs = idx
            .iter()
            .flat_map(|&i| {
                (0..FEATURES).map(move |f| ((x[i * FEATURES + f] - mean[f]) / std[f]) as f32)
            })
            .collect();
        let ys = idx.iter().map(|&i| (y[i] - y_mean) as f32).collect();
        (xs, ys)
    };
    let (train_x, train_y) = take(train_idx);
    let (test_x, test_y) = take(test_idx);
    Data {
        train_x,
        train_y,
        test_x,
        test_y,
        y_mean: y_mean as f32,
    }
}

// ------------------------------------------------------------------- model

/// A two-layer MLP `FEATURES -> hidden (ReLU) -> 1` in one flat `Vec<f32>`:
/// `w1` (hidden x FEATURES, row-major), `b1` (hidden), `w2` (hidden), `b2`.
pub struct Mlp {
    /// Hidden units.
    pub hidden: usize,
}

impl Mlp {
    /// Number of parameters.
    pub fn n_params(&self) -> usize {
        self.hidden * FEATURES + 2 * self.hidden + 1
    }

    /// Random initial parameters (He-uniform for the ReLU layer).
    pub fn init(&self, rng: &mut Rng) -> Vec<f32> {
        let h = self.hidden;
        let mut p = vec![0f32; self.n_params()];
        let a1 = (6.0 / FEATURES as f32).sqrt();
        let a2 = (3.0 / h as f32).sqrt();
        p[..h * FEATURES]
            .iter_mut()
            .for_each(|w| *w = a1 * rng.symmetric());
        p[h * FEATURES + h..h * FEATURES + 2 * h]
            .iter_mut()
            .for_each(|w| *w = a2 * rng.symmetric());
        p
    }

    /// The prediction for one sample; `act` receives the hidden
    /// pre-activations.
    fn forward(&self, p: &[f32], x: &[f32], act: &mut [f32]) -> f32 {
        let h = self.hidden;
        let (w1, rest) = p.split_at(h * FEATURES);
        let (b1, rest) = rest.split_at(h);
        let (w2, b2) = rest.split_at(h);
        let mut out = b2[0];
        for j in 0..h {
            let row = &w1[j * FEATURES..(j + 1) * FEATURES];
            let z = b1[j] + row.iter().zip(x).map(|(w, v)| w * v).sum::<f32>();
            act[j] = z;
            out += w2[j] * z.max(0.0);
        }
        out
    }

    /// Where the hidden layer's parameters end and the output layer's
    /// begin in the flat vector: `[w1 | b1]` then `[w2 | b2]`.
    pub fn split(&self) -> usize {
        self.hidden * FEATURES + self.hidden
    }

    /// Backward pass, output layer: forward every sample (keeping the
    /// hidden pre-activations in `acts` and the output gradients in `ds`),
    /// add the output layer's gradient (`[w2 | b2]`) to `gout`, and return
    /// the summed squared error. Sums run in sample order, as in
    /// [`Mlp::grad_sum`], so both give the same bits.
    pub fn backward_output(
        &self,
        p: &[f32],
        xs: &[f32],
        ys: &[f32],
        acts: &mut Vec<f32>,
        ds: &mut Vec<f32>,
        gout: &mut [f32],
    ) -> f32 {
        let h = self.hidden;
        acts.resize(ys.len() * h, 0.0);
        ds.clear();
        let mut loss = 0f32;
        let (gw2, gb2) = gout.split_at_mut(h);
        for ((x, &y), act) in xs
            .chunks_exact(FEATURES)
            .zip(ys)
            .zip(acts.chunks_exact_mut(h))
        {
            let err = self.forward(p, x, act) - y;
            loss += err * err;
            let d = 2.0 * err;
            ds.push(d);
            gb2[0] += d;
            for (g, z) in gw2.iter_mut().zip(act.iter()) {
                *g += d * z.max(0.0);
            }
        }
        loss
    }

    /// Backward pass, hidden layer: add its gradient (`[w1 | b1]`) to
    /// `ghid`, from what [`Mlp::backward_output`] kept.
    pub fn backward_hidden(
        &self,
        p: &[f32],
        xs: &[f32],
        acts: &[f32],
        ds: &[f32],
        ghid: &mut [f32],
    ) {
        let h = self.hidden;
        let w2 = &p[h * FEATURES + h..h * FEATURES + 2 * h];
        let (gw1, gb1) = ghid.split_at_mut(h * FEATURES);
        for ((x, act), &d) in xs.chunks_exact(FEATURES).zip(acts.chunks_exact(h)).zip(ds) {
            for j in 0..h {
                if act[j] > 0.0 {
                    let dz = d * w2[j];
                    gb1[j] += dz;
                    for (g, v) in gw1[j * FEATURES..(j + 1) * FEATURES].iter_mut().zip(x) {
                        *g += dz * v;
                    }
                }
            }
        }
    }

    /// Add the gradient of the squared error summed over `rows` to `grad`
    /// (length `n_params`) and return the summed squared error.
    pub fn grad_sum(&self, p: &[f32], xs: &[f32], ys: &[f32], grad: &mut [f32]) -> f32 {
        let h = self.hidden;
        let mut act = vec![0f32; h];
        let mut loss = 0f32;
        let w2 = &p[h * FEATURES + h..h * FEATURES + 2 * h];
        for (x, &y) in xs.chunks_exact(FEATURES).zip(ys) {
            let err = self.forward(p, x, &mut act) - y;
            loss += err * err;
            let d = 2.0 * err;
            let (gw1, rest) = grad.split_at_mut(h * FEATURES);
            let (gb1, rest) = rest.split_at_mut(h);
            let (gw2, gb2) = rest.split_at_mut(h);
            gb2[0] += d;
            for j in 0..h {
                let z = act[j];
                gw2[j] += d * z.max(0.0);
                if z > 0.0 {
                    let dz = d * w2[j];
                    gb1[j] += dz;
                    for (g, v) in gw1[j * FEATURES..(j + 1) * FEATURES].iter_mut().zip(x) {
                        *g += dz * v;
                    }
                }
            }
        }
        loss
    }

    /// Summed squared error over `xs`/`ys`.
    pub fn sse(&self, p: &[f32], xs: &[f32], ys: &[f32]) -> f64 {
        let mut act = vec![0f32; self.hidden];
        xs.chunks_exact(FEATURES)
            .zip(ys)
            .map(|(x, &y)| ((self.forward(p, x, &mut act) - y) as f64).powi(2))
            .sum()
    }
}

/// This rank's contiguous share of the minibatch `global` (sample indices),
/// gathered into `xs` (features) and `ys` (targets).
pub fn take_shard(
    data: &Data,
    global: &[usize],
    rank: usize,
    size: usize,
    xs: &mut Vec<f32>,
    ys: &mut Vec<f32>,
) {
    let (s, e) = shard(global.len(), rank, size);
    xs.clear();
    ys.clear();
    for &i in &global[s..e] {
        xs.extend_from_slice(&data.train_x[i * FEATURES..(i + 1) * FEATURES]);
        ys.push(data.train_y[i]);
    }
}

/// `[start, end)` of this rank's contiguous share of `len` items.
pub fn shard(len: usize, rank: usize, size: usize) -> (usize, usize) {
    (len * rank / size, len * (rank + 1) / size)
}

// ---------------------------------------------------------------- training

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

// ---------------------------------------------------------------- plotting

/// Draw training MSE and held-out RMSE per epoch into an SVG file.
pub fn plot_losses(path: &Path, log: &[EpochStats], ranks: usize) -> Result<(), TrainError> {
    use plotters::prelude::*;
    let fail =
        |e: &dyn std::fmt::Display| TrainError::Usage(format!("--plot {}: {e}", path.display()));
    let (Some(first), Some(last)) = (log.first(), log.last()) else {
        return Ok(());
    };
    let top = log
        .iter()
        .flat_map(|s| [s.train_mse, s.test_rmse])
        .fold(0.0f64, f64::max)
        * 1.1;
    let root = SVGBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fail(&e))?;
    let x0 = first.epoch as f64 - 0.5;
    let x1 = last.epoch as f64 + 0.5;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("Wine Quality MLP, data-parallel on {ranks} rank(s)"),
            ("sans-serif", 22),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(56)
        .build_cartesian_2d(x0..x1, 0.0..top.max(1e-6))
        .map_err(|e| fail(&e))?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .y_desc("loss")
        .draw()
        .map_err(|e| fail(&e))?;
    type Series = (&'static str, RGBColor, fn(&EpochStats) -> f64);
    let series: [Series; 2] = [
        ("training MSE", BLUE, |s| s.train_mse),
        ("held-out RMSE", RED, |s| s.test_rmse),
    ];
    for (name, color, f) in series {
        chart
            .draw_series(LineSeries::new(
                log.iter().map(|s| (s.epoch as f64, f(s))),
                color.stroke_width(2),
            ))
            .map_err(|e| fail(&e))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| fail(&e))?;
    root.present().map_err(|e| fail(&e))
}

// ------------------------------------------------------------- checkpoints

/// Training state on disk. Format (little-endian): magic `RMTRAIN1`,
/// hidden, batch, seed, step, loss_count (u64), loss_sum (f64), n (u64),
/// n params (f32), n velocities (f32), then FNV-1a-64 of all of the above.
#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    /// Hidden units of the model.
    pub hidden: u64,
    /// Global batch size.
    pub batch: u64,
    /// Seed of the data order.
    pub seed: u64,
    /// Global steps done.
    pub step: u64,
    /// Loss summed over the current epoch's steps done so far.
    pub loss_sum: f64,
    /// Samples in `loss_sum`.
    pub loss_count: u64,
    /// Model parameters.
    pub params: Vec<f32>,
    /// Momentum buffer.
    pub velocity: Vec<f32>,
}

const MAGIC: &[u8; 8] = b"RMTRAIN1";
const HEADER: usize = 8 + 7 * 8;

impl Checkpoint {
    /// The checkpoint file in `dir`.
    pub fn path_in(dir: &Path) -> PathBuf {
        dir.join("checkpoint.bin")
    }

    /// Serialise, checksum included.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(HEADER + 8 * self.params.len() + 8);
        b.extend_from_slice(MAGIC);
        for v in [
            self.hidden,
            self.batch,
            self.seed,
            self.step,
            self.loss_count,
        ] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(&self.loss_sum.to_le_bytes());
        b.extend_from_slice(&(self.params.len() as u64).to_le_bytes());
        for v in self.params.iter().chain(&self.velocity) {
            b.extend_from_slice(&v.to_le_bytes());
        }
        let sum = fnv1a64(&b);
        b.extend_from_slice(&sum.to_le_bytes());
        b
    }

    /// Parse and verify `bytes` (read from `path`, named in errors).
    pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<Checkpoint, TrainError> {
        let bad = |why: String| {
            TrainError::Checkpoint(format!(
                "{} is not a usable checkpoint: {why}; delete it (or restore a copy) to start over",
                path.display()
            ))
        };
        if bytes.len() < HEADER + 8 {
            return Err(bad(format!(
                "truncated: {} bytes, a header needs {}",
                bytes.len(),
                HEADER + 8
            )));
        }
        if &bytes[..8] != MAGIC {
            return Err(bad("wrong magic (not written by examples/train)".into()));
        }
        let u = |i: usize| {
            u64::from_le_bytes(bytes[8 + 8 * i..16 + 8 * i].try_into().unwrap_or_default())
        };
        let n = u(6);
        let want = (n as u128) * 8 + HEADER as u128 + 8;
        if (bytes.len() as u128) < want {
            return Err(bad(format!(
                "truncated: {} bytes, expected {want}",
                bytes.len()
            )));
        }
        if (bytes.len() as u128) > want {
            return Err(bad(format!(
                "{} bytes, expected {want} (trailing data)",
                bytes.len()
            )));
        }
        let body = &bytes[..bytes.len() - 8];
        let stored = u64::from_le_bytes(bytes[bytes.len() - 8..].try_into().unwrap_or_default());
        let actual = fnv1a64(body);
        if stored != actual {
            return Err(bad(format!(
                "checksum mismatch (stored {stored:016x}, computed {actual:016x}): the file is corrupt"
            )));
        }
        let floats: Vec<f32> = body[HEADER..]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap_or_default()))
            .collect();
        let (params, velocity) = floats.split_at(n as usize);
        Ok(Checkpoint {
            hidden: u(0),
            batch: u(1),
            seed: u(2),
            step: u(3),
            loss_count: u(4),
            loss_sum: f64::from_bits(u(5)),
            params: params.to_vec(),
            velocity: velocity.to_vec(),
        })
    }

    /// Write atomically into `dir`: a temporary file, flushed to disk, then
    /// renamed over the previous checkpoint (which stays intact until then).
    pub fn save_to_dir(&self, dir: &Path) -> Result<(), TrainError> {
        let io = |what: &str, p: &Path, e: std::io::Error| {
            TrainError::Checkpoint(format!("{what} {}: {e}", p.display()))
        };
        std::fs::create_dir_all(dir).map_err(|e| io("cannot create", dir, e))?;
        let path = Self::path_in(dir);
        let tmp = dir.join("checkpoint.bin.tmp");
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp).map_err(|e| io("cannot create", &tmp, e))?;
            f.write_all(&self.to_bytes())
                .map_err(|e| io("cannot write", &tmp, e))?;
            f.sync_all().map_err(|e| io("cannot flush", &tmp, e))?;
        }
        std::fs::rename(&tmp, &path).map_err(|e| io("cannot rename onto", &path, e))?;
        // Make the rename itself durable (best effort; not possible everywhere).
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    /// The checkpoint in `dir`: `None` if there is none; an error if it
    /// cannot be read or is corrupt.
    pub fn load_from_dir(dir: &Path) -> Result<Option<Checkpoint>, TrainError> {
        let path = Self::path_in(dir);
        match std::fs::read(&path) {
            Ok(bytes) => Self::from_bytes(&bytes, &path).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(TrainError::Checkpoint(format!(
                "cannot read {}: {e}",
                path.display()
            ))),
        }
    }

    /// Refuse a checkpoint of a different model or batch size.
    fn check_fits(
        c: Option<Self>,
        cfg: &TrainConfig,
        n: usize,
    ) -> Result<Option<Self>, TrainError> {
        let Some(c) = c else { return Ok(None) };
        if c.hidden != cfg.hidden as u64 || c.batch != cfg.batch as u64 || c.params.len() != n {
            return Err(TrainError::Checkpoint(format!(
                "the checkpoint is for --hidden {} --batch {}, this run has --hidden {} --batch {}; \
                 resume with the same settings",
                c.hidden, c.batch, cfg.hidden, cfg.batch
            )));
        }
        Ok(Some(c))
    }
}

// -------------------------------------------------------------------- main

/// Run `train` on a communicator; a failure other than a communication
/// error is returned as the rank's output so that `run_local` reports it
/// as such (every rank fails the same way, so nobody waits).
pub async fn train_rank(
    comm: Communicator,
    data: Arc<Data>,
    cfg: TrainConfig,
) -> rankmesh::Result<Result<Outcome, TrainError>> {
    match train(&comm, &data, &cfg).await {
        Err(TrainError::Comm(e)) => Err(e),
        other => Ok(other),
    }
}

// One thread per rank, as in MPI: with tokio's multi-threaded runtime every
// message also wakes idle worker threads, and on a host whose cores are
// shared by several ranks that costs more than the message
// (docs/performance.md, "Which tokio runtime"). Each step awaits often
// (well within the 5 s idle timeout), so the transport keeps running.
#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (cfg, ranks) = match parse_args(&args) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("{e}");
            return std::process::ExitCode::from(2);
        }
    };
    let data = Arc::new(load_data());
    let result = if std::env::var_os("RANKMESH_SEED").is_some() {
        run_launched(data, cfg).await
    } else {
        println!("{}", banner(&data, &cfg, ranks));
        let outs = rankmesh::testing::run_local(ranks, move |comm| {
            train_rank(comm, data.clone(), cfg.clone())
        })
        .await;
        // Rank 0's error first: the others only point at it.
        outs.map_err(TrainError::from)
            .and_then(|outs| outs.into_iter().try_for_each(|o| o.map(drop)))
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("train: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// One rank of a job started by `rankrun`.
async fn run_launched(data: Arc<Data>, cfg: TrainConfig) -> Result<(), TrainError> {
    if cfg.elastic {
        let start = rankmesh::init_elastic().await?;
        if start.comm.rank() == 0 && start.state.is_empty() {
            println!("{} (elastic)", banner(&data, &cfg, start.comm.size()));
        }
        let out = train_elastic(start.comm, start.state, &data, &cfg).await?;
        return Ok(out.comm.finalize().await?);
    }
    let comm = rankmesh::init().await?;
    if comm.rank() == 0 {
        println!("{}", banner(&data, &cfg, comm.size()));
    }
    match train(&comm, &data, &cfg).await {
        Ok(_) => Ok(comm.finalize().await?),
        Err(TrainError::Comm(e)) => {
            comm.shutdown_after_error().await;
            Err(TrainError::Comm(e))
        }
        Err(e) => {
            // A refused checkpoint stops every rank together: rank 0 says
            // why, the others leave after it has (so the launcher does not
            // end rank 0 before its message is out), without a message.
            if comm.rank() == 0 {
                eprintln!("train: {e}");
            }
            let _ = comm.barrier().await;
            comm.shutdown_after_error().await;
            std::process::exit(1);
        }
    }
}

fn banner(data: &Data, cfg: &TrainConfig, ranks: usize) -> String {
    format!(
        "wine quality (red): {} train / {} test samples; MLP {FEATURES}-{}-1 ({} params); \
         {ranks} rank{}, global batch {}, lr {}, momentum {}, seed {}",
        data.n_train(),
        data.test_y.len(),
        cfg.hidden,
        Mlp { hidden: cfg.hidden }.n_params(),
        if ranks == 1 { "" } else { "s" },
        cfg.batch,
        cfg.lr,
        cfg.momentum,
        cfg.seed
    )
}
