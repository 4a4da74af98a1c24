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
//! The modules are one concern each (settings, errors, data, model,
//! training, plot, checkpoint); `tests/train.rs` includes this file as a
//! module and calls [`train`].

mod checkpoint;
mod data;
mod errors;
mod model;
mod plot;
mod settings;
mod training;

pub use checkpoint::*;
pub use data::*;
pub use errors::*;
pub use model::*;
pub use plot::*;
use rankmesh::{Communicator, ReduceOp};
pub use settings::*;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
pub use training::*;

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
