//! Joining a job and building the world communicator.

use super::elastic::{enter_admitted, Membership, Rebuilt};
use super::{Communicator, World};
use crate::bootstrap;
use crate::config::Config;
use crate::env::{self, JoinSpec};
use crate::transport::quic::{endpoint, Lanes, QuicTransport};
use crate::Result;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::sync::Arc;

/// Join the job described by the environment (set by `rankrun`, or by
/// Slurm plus `RANKMESH_SEED` and `RANKMESH_TOKEN`) and return the world
/// communicator once every rank has joined. The same as
/// [`init_with_config`] with the default settings.
pub async fn init() -> Result<Communicator> {
    init_with_config(Config::default()).await
}

/// [`init`] with settings of the program's choosing. Precedence: a
/// `RANKMESH_*` variable (`RANKMESH_OP_TIMEOUT`, ...) overrides the same
/// setting in `cfg`, as it overrides the defaults in [`init`], so that an
/// operator can tune a job without rebuilding it; settings no variable
/// names keep `cfg`'s value.
pub async fn init_with_config(mut cfg: Config) -> Result<Communicator> {
    let spec = JoinSpec::from_env()?;
    if spec.late {
        return Err(crate::Error::config(
            "this process was started to join a running elastic job (RANKMESH_JOIN=1, rankrun \
             --join); call rankmesh::init_elastic, which also returns the job's state",
        ));
    }
    env::apply_overrides(&mut cfg)?;
    init_with(spec, cfg).await
}

/// Join an elastic job: for the job's first ranks the same as [`init`]
/// (no state; `membership.epoch` 1); for a process started to join a
/// running job (`rankrun --join`, `RANKMESH_JOIN=1`) it returns once the job
/// has admitted it at a checkpoint, with the state the job's rank 0 passed.
pub async fn init_elastic() -> Result<Rebuilt> {
    init_elastic_with_config(Config::default()).await
}

/// [`init_elastic`] with settings of the program's choosing, with the
/// precedence of [`init_with_config`].
pub async fn init_elastic_with_config(mut cfg: Config) -> Result<Rebuilt> {
    let spec = JoinSpec::from_env()?;
    env::apply_overrides(&mut cfg)?;
    init_elastic_with(spec, cfg).await
}

/// [`init_elastic`] for the job `spec` describes (`spec.late`: join a
/// running job), with exactly the settings in `cfg`, as [`init_with`].
pub async fn init_elastic_with(spec: JoinSpec, cfg: Config) -> Result<Rebuilt> {
    cfg.validate()?;
    if !spec.late {
        let comm = init_with(spec, cfg).await?;
        let membership = Membership {
            epoch: comm.inner.epoch,
            rank: comm.rank(),
            size: comm.size(),
            previous_rank: Some(comm.rank()),
            joined: Vec::new(),
            left: Vec::new(),
        };
        return Ok(Rebuilt {
            comm,
            state: Vec::new(),
            membership,
        });
    }
    let (world, _, admitted) = join_world(spec, cfg).await?;
    let Some(info) = admitted else {
        return Err(crate::Error::protocol(
            "the seed admitted this late joiner without an epoch",
        ));
    };
    enter_admitted(world, info).await
}

/// Join through the seed and start this process's transport and world;
/// also returns a late joiner's admission.
async fn join_world(
    spec: JoinSpec,
    cfg: Config,
) -> Result<(Arc<World>, u32, Option<crate::wire::control::EpochInfo>)> {
    // Take over SIGUSR1 before joining: its default action would end the
    // process if it arrived while the job forms.
    let usr1 = sigusr1();
    let ip = cfg.bind_ip().unwrap_or_else(|| route_ip(spec.seed));
    let ep = endpoint::bind(SocketAddr::new(ip, 0), &cfg)?;
    let threads = cfg
        .transport_threads()
        .unwrap_or_else(env::default_transport_threads);
    let lanes = Lanes::start(ip, &cfg, threads)?;
    let joined = bootstrap::join_with_lanes(&ep, &lanes.ports()?, &spec, &cfg, |creds| {
        QuicTransport::accept_peers(&ep, &lanes, creds, &cfg)
    })
    .await?;
    let job_id = joined.creds.job_id.clone();
    let epoch = joined.epoch;
    let transport = QuicTransport::start(ep, lanes, &joined.creds, joined.peers, &cfg)?;
    let world = Arc::new(World::new(
        Arc::new(transport),
        cfg,
        job_id,
        Some(joined.seed),
    ));
    dump_on_sigusr1(&world, epoch, usr1);
    Ok((world, epoch, joined.admitted))
}

/// The IP of the interface that routes to `seed` (no packet is sent).
fn route_ip(seed: SocketAddr) -> IpAddr {
    let unspecified: IpAddr = if seed.is_ipv4() {
        Ipv4Addr::UNSPECIFIED.into()
    } else {
        Ipv6Addr::UNSPECIFIED.into()
    };
    UdpSocket::bind(SocketAddr::new(unspecified, 0))
        .and_then(|s| s.connect(seed).and_then(|_| s.local_addr()))
        .map(|a| a.ip())
        .unwrap_or(if seed.ip().is_loopback() {
            seed.ip()
        } else {
            unspecified
        })
}

/// Join the job `spec` describes, with exactly the settings in `cfg`: the
/// environment is read for neither (no `RANKMESH_*` override applies). For
/// programs that start their own seed; a job started by `rankrun` calls
/// [`init`] or [`init_with_config`].
pub async fn init_with(spec: JoinSpec, cfg: Config) -> Result<Communicator> {
    cfg.validate()?;
    let (world, epoch, _) = join_world(spec, cfg).await?;
    Ok(Communicator::world(world, epoch))
}

/// On SIGUSR1 (which `rankrun` forwards to every rank), write the flight
/// recorder and the trace, while the job goes on.
#[cfg(unix)]
fn dump_on_sigusr1(world: &Arc<World>, epoch: u32, sig: Option<Usr1>) {
    let Some(mut sig) = sig else {
        return;
    };
    let weak = Arc::downgrade(world);
    let task = tokio::spawn(async move {
        while sig.recv().await.is_some() {
            let Some(w) = weak.upgrade() else { break };
            let rank = w.transport.rank();
            let mut seen = String::from(
                "last collective each rank sent this rank a message for \
                                         (world communicator):\n",
            );
            for (src, seq) in w.ledger.last_seen(0, epoch) {
                seen.push_str(&format!("  rank {src}: #{seq}\n"));
            }
            match w.recorder.dump("SIGUSR1", &seen) {
                Ok(p) => eprintln!(
                    "rankmesh: rank {rank}: flight recorder written to {}",
                    p.display()
                ),
                Err(e) => eprintln!("rankmesh: rank {rank}: cannot write the flight recorder: {e}"),
            }
        }
    });
    world.adopt(task);
}

#[cfg(unix)]
type Usr1 = tokio::signal::unix::Signal;

/// A listener for SIGUSR1 (installing it replaces the signal's default
/// action, ending the process).
#[cfg(unix)]
fn sigusr1() -> Option<Usr1> {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::user_defined1()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!("cannot listen for SIGUSR1 (no flight-recorder dumps): {e}");
            None
        }
    }
}

#[cfg(not(unix))]
type Usr1 = ();

#[cfg(not(unix))]
fn sigusr1() -> Option<Usr1> {
    None
}

#[cfg(not(unix))]
fn dump_on_sigusr1(_: &Arc<World>, _: u32, _: Option<Usr1>) {}
