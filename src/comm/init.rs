//! Joining a job and building the world communicator.

use super::{Communicator, World};
use crate::bootstrap::{self, JoinSpec};
use crate::config::Config;
use crate::env::{self, LaunchEnv};
use crate::transport::quic::{endpoint, QuicTransport};
use crate::Result;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::sync::Arc;

/// Join the job described by the environment (set by `rankrun`, or by
/// Slurm plus `RANKMESH_SEED` and `RANKMESH_TOKEN`) and return the world
/// communicator once every rank has joined.
pub async fn init() -> Result<Communicator> {
    let launch = LaunchEnv::from_process()?;
    let mut cfg = Config::default();
    env::apply_overrides(&mut cfg)?;
    init_with(launch.join_spec(), cfg).await
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

/// Join the job described by `spec` with explicit settings.
pub async fn init_with(spec: JoinSpec, cfg: Config) -> Result<Communicator> {
    cfg.validate()?;
    let ip = cfg.bind_ip().unwrap_or_else(|| route_ip(spec.seed));
    let ep = endpoint::bind(SocketAddr::new(ip, 0), &cfg)?;
    let joined = bootstrap::join(&ep, &spec, &cfg, |creds| {
        QuicTransport::accept_peers(&ep, creds, &cfg)
    })
    .await?;
    let job_id = joined.creds.job_id.clone();
    let transport = QuicTransport::start(ep, &joined.creds, joined.peers, &cfg)?;
    let world = World::new(Arc::new(transport), cfg, job_id, Some(joined.seed));
    Ok(Communicator::world(Arc::new(world), joined.epoch))
}
