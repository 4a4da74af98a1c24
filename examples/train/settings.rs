//! The training settings and the command line.

use super::*;

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
