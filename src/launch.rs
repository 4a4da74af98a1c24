//! Running the seed yourself: what a launcher, a test harness or a program
//! that forms its own job needs. `rankrun` is built on this module.
//!
//! A job is a [`Seed`] (the rendezvous and the job's certificate authority,
//! started with [`Seed::start`]) and one process per rank that joins it
//! with a [`JoinSpec`]: the seed's address, the job token and, optionally,
//! the rank and world size it expects. A process started by `rankrun` reads
//! its `JoinSpec` from the environment (`rankmesh::init` does that); one
//! started any other way passes it to [`init_with`].
//!
//! ```no_run
//! # async fn demo() -> rankmesh::Result<()> {
//! use rankmesh::launch::{self, JoinSpec, Seed, SeedConfig};
//! let seed = Seed::start(SeedConfig::new(2))?;
//! let spec = |rank| JoinSpec {
//!     seed: seed.addr().unwrap(),
//!     token: seed.token().clone(),
//!     job_id: Some(seed.job_id().to_string()),
//!     rank: Some(rank),
//!     world_size: Some(2),
//!     host: launch::hostname(),
//!     late: false,
//! };
//! let cfg = rankmesh::Config::default();
//! let (a, b) = tokio::join!(
//!     launch::init_with(spec(0), cfg.clone()),
//!     launch::init_with(spec(1), cfg)
//! );
//! let (a, b) = (a?, b?);
//! a.barrier().await?;
//! # drop(b); Ok(()) }
//! ```

pub use crate::bootstrap::{random_job_id, Seed, SeedConfig};
pub use crate::comm::{init_elastic_with, init_with};
pub use crate::env::{hostname, JoinSpec};
pub use crate::pki::JobToken;

use crate::{Config, Result};

/// Apply the `RANKMESH_*` setting overrides of the environment (the ones
/// `rankmesh::init_with_config` applies: `RANKMESH_OP_TIMEOUT`,
/// `RANKMESH_SAME_HOST`, ...) to `cfg`, for a program that joins with
/// [`init_with`] and still wants an operator's overrides.
pub fn apply_env_overrides(cfg: &mut Config) -> Result<()> {
    crate::env::apply_overrides(cfg)
}
