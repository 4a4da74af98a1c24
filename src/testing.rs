//! Run a whole job inside one process: a real seed and real ranks, each with
//! its own QUIC endpoint on 127.0.0.1 and mutual TLS, as tasks of the
//! current tokio runtime. For tests, examples and benchmarks.
//!
//! [`LocalJob`] picks the transport ([`LocalJob::quic`], or
//! [`LocalJob::in_memory`] for fast deterministic tests of everything above
//! the network) and the settings; [`run_local`] is its QUIC shorthand.

use crate::bootstrap::{JoinSpec, Seed, SeedConfig};
use crate::comm::{init_with, Communicator, World};
use crate::config::Config;
use crate::transport::mem::MemTransport;
use crate::{Error, Result};
use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use tokio::task::JoinSet;

/// Form a fresh `world_size`-rank cluster on loopback, run `f` on every rank,
/// and return the outputs in rank order. The first rank error (in time)
/// becomes the error; the other ranks are then stopped. Everything (tasks,
/// sockets, memory) is torn down before this returns.
///
/// Shorthand for `LocalJob::quic(world_size).run(f)`; [`LocalJob`] also
/// takes a [`Config`] and runs over the in-process transport.
pub async fn run_local<F, Fut, T>(world_size: usize, f: F) -> Result<Vec<T>>
where
    F: Fn(Communicator) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<T>> + Send + 'static,
    T: Send + 'static,
{
    LocalJob::quic(world_size).run(f).await
}

/// How a [`LocalJob`]'s ranks reach each other.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fabric {
    /// A real seed, QUIC endpoints on 127.0.0.1, mutual TLS (and the
    /// same-host channel unless the config turns it off).
    Quic,
    /// The in-process transport: no seed, no sockets.
    InMemory,
}

/// A whole job inside one process, as tasks of the current tokio runtime:
/// pick the transport, optionally the settings every rank uses, then
/// [`run`](LocalJob::run) the rank program.
///
/// ```no_run
/// # async fn demo() -> rankmesh::Result<()> {
/// use rankmesh::{testing::LocalJob, Config, ReduceOp};
/// let mut cfg = Config::default();
/// cfg.set_op_timeout(std::time::Duration::from_secs(5));
/// let sums = LocalJob::in_memory(4)
///     .config(cfg)
///     .run(|comm| async move {
///         let mut v = [comm.rank() as u64];
///         comm.all_reduce(&mut v, ReduceOp::Sum).await?;
///         Ok(v[0])
///     })
///     .await?;
/// assert_eq!(sums, vec![6; 4]);
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct LocalJob {
    world_size: usize,
    fabric: Fabric,
    config: Config,
}

impl LocalJob {
    /// `world_size` ranks joined through a real seed over QUIC on loopback,
    /// with mutual TLS: what [`run_local`] runs. The configuration is used
    /// as given, except that `RANKMESH_TRANSPORT_THREADS` and
    /// `RANKMESH_SAME_HOST` in the environment override it (so a test suite
    /// can be rerun on striped QUIC), and transport threads left open are
    /// the process's cores divided by `world_size`.
    pub fn quic(world_size: usize) -> LocalJob {
        LocalJob {
            world_size,
            fabric: Fabric::Quic,
            config: Config::default(),
        }
    }

    /// `world_size` ranks connected by the in-process transport: everything
    /// above the network, fast and deterministic (no seed, no sockets).
    pub fn in_memory(world_size: usize) -> LocalJob {
        LocalJob {
            world_size,
            fabric: Fabric::InMemory,
            config: Config::default(),
        }
    }

    /// The settings every rank uses (default: `Config::default()`; the
    /// environment's overrides are not read).
    pub fn config(mut self, config: Config) -> LocalJob {
        self.config = config;
        self
    }

    /// Run `f` on every rank and return the outputs in rank order; errors
    /// and teardown as [`run_local`].
    pub async fn run<F, Fut, T>(self, f: F) -> Result<Vec<T>>
    where
        F: Fn(Communicator) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<T>> + Send + 'static,
        T: Send + 'static,
    {
        match self.fabric {
            Fabric::Quic => run_quic(self.world_size, self.config, f).await,
            Fabric::InMemory => run_in_memory(self.world_size, self.config, f).await,
        }
    }
}

async fn run_quic<F, Fut, T>(world_size: usize, config: Config, f: F) -> Result<Vec<T>>
where
    F: Fn(Communicator) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<T>> + Send + 'static,
    T: Send + 'static,
{
    let mut scfg = SeedConfig::new(world_size);
    scfg.set_formation_timeout(config.formation_timeout());
    let seed = Seed::start(scfg)?;
    let spec = JoinSpec {
        seed: seed.addr()?,
        token: seed.token().clone(),
        job_id: Some(seed.job_id().to_string()),
        rank: None,
        world_size: Some(world_size),
        host: "localhost".into(),
        late: false,
    };
    let mut cfg = config;
    cfg.set_bind_ip(Some(IpAddr::V4(Ipv4Addr::LOCALHOST)));
    crate::env::apply_data_path_overrides(&mut cfg)?;
    if cfg.transport_threads().is_none() {
        // The ranks share this process's cores.
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        cfg.set_transport_threads(Some(crate::env::threads_for(cores, Some(world_size))));
    }
    let f = Arc::new(f);
    let result = drive(world_size, move |rank| {
        let mut spec = spec.clone();
        spec.rank = Some(rank);
        let cfg = cfg.clone();
        let f = f.clone();
        async move {
            let comm = init_with(spec, cfg).await?;
            Ok((comm.world_handle(), f(comm)))
        }
    })
    .await;
    seed.shutdown().await;
    result
}

async fn run_in_memory<F, Fut, T>(world_size: usize, config: Config, f: F) -> Result<Vec<T>>
where
    F: Fn(Communicator) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<T>> + Send + 'static,
    T: Send + 'static,
{
    config.validate()?;
    let transports: Vec<Option<MemTransport>> =
        MemTransport::fabric_with_limit(world_size, config.max_unexpected_bytes())
            .into_iter()
            .map(Some)
            .collect();
    let transports = Arc::new(std::sync::Mutex::new(transports));
    let f = Arc::new(f);
    drive(world_size, move |rank| {
        let t = transports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(rank)
            .and_then(|t| t.take());
        let cfg = config.clone();
        let f = f.clone();
        async move {
            let t = t.ok_or_else(|| Error::config("internal: transport taken twice"))?;
            let world = Arc::new(World::new(Arc::new(t), cfg, "mem".into(), None));
            let comm = Communicator::world(world.clone(), 1);
            Ok((world, f(comm)))
        }
    })
    .await
}

/// Start every rank with `start`, run its program, finish its world, and
/// collect outputs in rank order.
async fn drive<S, SFut, Fut, T>(world_size: usize, start: S) -> Result<Vec<T>>
where
    S: Fn(usize) -> SFut,
    SFut: Future<Output = Result<(Arc<World>, Fut)>> + Send + 'static,
    Fut: Future<Output = Result<T>> + Send + 'static,
    T: Send + 'static,
{
    if world_size == 0 {
        return Err(Error::config("world size must be at least 1"));
    }
    let mut set = JoinSet::new();
    let mut ids = HashMap::new();
    // The first program error in time, recorded before that rank's world is
    // finished: finishing closes its connections, so a peer's consequent
    // `PeerLost` can reach the join loop before the rank's own task does.
    let first_failure: Arc<std::sync::Mutex<Option<Error>>> = Arc::default();
    for rank in 0..world_size {
        let started = start(rank);
        let first = first_failure.clone();
        let h = set.spawn(async move {
            let (world, program) = started.await?;
            let out = program.await;
            if let Err(e) = &out {
                first
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get_or_insert_with(|| e.clone());
            }
            world.finish(out.is_ok()).await;
            out
        });
        ids.insert(h.id(), rank);
    }
    let mut outs: Vec<Option<T>> = (0..world_size).map(|_| None).collect();
    let mut first_err = None;
    while let Some(done) = set.join_next_with_id().await {
        let (rank, res) = match done {
            Ok((id, r)) => (ids[&id], r),
            Err(e) => {
                let rank = ids.get(&e.id()).copied().unwrap_or(usize::MAX);
                let detail = if e.is_panic() {
                    format!("rank {rank} panicked")
                } else {
                    format!("rank {rank} was cancelled")
                };
                (rank, Err(Error::transport(Some(rank), detail)))
            }
        };
        match res {
            Ok(v) => outs[rank] = Some(v),
            Err(e) => {
                if first_err.is_none() {
                    first_err = Some(e);
                    set.abort_all();
                }
            }
        }
    }
    let recorded = first_failure
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take();
    if let Some(e) = recorded.or(first_err) {
        return Err(e);
    }
    outs.into_iter()
        .enumerate()
        .map(|(r, o)| o.ok_or_else(|| Error::transport(Some(r), "rank produced no output")))
        .collect()
}
