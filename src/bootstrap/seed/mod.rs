//! The seed's QUIC driver: accepts joining ranks, checks their token proof,
//! signs their certificates, feeds the formation state machine and tells
//! every rank the outcome.

mod accept;
mod members;

use accept::{accept_loop, MAX_UNPROVEN, MAX_UNPROVEN_PER_SOURCE};

use super::elastic::{self, Elastic, MAX_MEMBERS};
use super::state::{Decision as Admission, JoinInfo, Phase, SeedState};
use super::token::{random_job_id, Direction, SessionProof};
use super::{close, read_msg, read_msg_max, write_msg};
use crate::config::Config;
use crate::pki::JobToken;
use crate::pki::{self, JobCa};
use crate::transport::quic::endpoint;
use crate::transport::quic::places::{Place, Places};
use crate::wire::control::{
    Formation, JoinReply, JoinRequest, KeyPin, Notice, PeerInfo, Ready, RejectKind,
};
use crate::{Error, Result};
use quinn::crypto::rustls::QuicServerConfig;
use quinn::VarInt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// Settings of a seed.
#[derive(Clone, Debug)]
pub struct SeedConfig {
    world_size: usize,
    bind: SocketAddr,
    job_id: Option<String>,
    token: Option<JobToken>,
    formation_timeout: Duration,
    cert_lifetime: Duration,
    elastic: Option<(usize, usize)>,
}

impl SeedConfig {
    /// A seed for `world_size` ranks on 127.0.0.1 (any port), fresh token
    /// and job id, 60 s formation deadline, certificates valid 30 days.
    pub fn new(world_size: usize) -> SeedConfig {
        SeedConfig {
            world_size,
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            job_id: None,
            token: None,
            formation_timeout: Duration::from_secs(60),
            cert_lifetime: Duration::from_secs(30 * 24 * 3600),
            elastic: None,
        }
    }

    /// Make the job elastic: after formation, processes may join (they are
    /// admitted at the next membership point, up to `max` ranks in all), and
    /// the job may continue without lost ranks down to `min`.
    pub fn set_elastic(&mut self, min: usize, max: usize) -> &mut Self {
        self.elastic = Some((min, max));
        self
    }

    /// Address (and port, 0 = any) to listen on.
    pub fn set_bind(&mut self, addr: SocketAddr) -> &mut Self {
        self.bind = addr;
        self
    }

    /// Job id (default: 16 random hex digits).
    pub fn set_job_id(&mut self, id: impl Into<String>) -> &mut Self {
        self.job_id = Some(id.into());
        self
    }

    /// Job token (default: freshly generated).
    pub fn set_token(&mut self, token: JobToken) -> &mut Self {
        self.token = Some(token);
        self
    }

    /// How long ranks have to join before formation fails, naming who is missing.
    pub fn set_formation_timeout(&mut self, t: Duration) -> &mut Self {
        self.formation_timeout = t;
        self
    }

    /// Validity of the job CA and every certificate it signs: the upper
    /// bound on the job's duration. Default 30 days.
    pub fn set_cert_lifetime(&mut self, t: Duration) -> &mut Self {
        self.cert_lifetime = t;
        self
    }
}

struct Inner {
    job_id: String,
    token: JobToken,
    ca: JobCa,
    world_size: usize,
    state: Mutex<SeedState>,
    phase: watch::Sender<Phase>,
    /// Ranks that joined and are ready (formation progress for launchers).
    joined: watch::Sender<Vec<usize>>,
    /// Notices for every rank after formation (a rank left, the job was
    /// aborted).
    notices: tokio::sync::broadcast::Sender<Notice>,
    /// Membership of an elastic job after formation.
    elastic: Option<Mutex<Elastic>>,
    /// The latest epoch decided (late joiners wait on it).
    epochs: watch::Sender<u32>,
    /// Places of connections that have not yet proved the token.
    unproven: Places,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Inner {
    /// Let the elastic membership decide, if every live member asked, and
    /// tell the members (under the lock: decisions go out in order).
    fn try_decide(&self) {
        let Some(el) = &self.elastic else { return };
        let mut el = lock(el);
        match el.decide() {
            None => {}
            Some(elastic::Decision::Failed { epoch, reason }) => {
                tracing::error!("seed: epoch {epoch}: {reason}");
                let _ = self.notices.send(Notice::RebuildFailed { epoch, reason });
            }
            Some(elastic::Decision::Epoch(info)) => {
                tracing::info!(
                    "seed: epoch {}: {} rank(s), {} joined, {} left",
                    info.epoch,
                    info.members.len(),
                    info.joined.len(),
                    info.left.len()
                );
                let epoch = info.epoch;
                let _ = self.notices.send(Notice::Epoch(info));
                self.epochs.send_replace(epoch);
            }
        }
    }
}

/// A running seed: the job's certificate authority and formation point.
pub struct Seed {
    inner: Arc<Inner>,
    endpoint: quinn::Endpoint,
    tasks: Arc<Mutex<JoinSet<()>>>,
}

fn spawn(tasks: &Mutex<JoinSet<()>>, fut: impl std::future::Future<Output = ()> + Send + 'static) {
    let mut t = tasks.lock().unwrap_or_else(|p| p.into_inner());
    while t.try_join_next().is_some() {}
    t.spawn(fut);
}

impl Seed {
    /// Start a seed (inside a tokio runtime).
    pub fn start(cfg: SeedConfig) -> Result<Seed> {
        if cfg.world_size == 0 {
            return Err(Error::config("world size must be at least 1"));
        }
        if let Some((min, max)) = cfg.elastic {
            if min == 0 || min > cfg.world_size || max < cfg.world_size {
                return Err(Error::config(format!(
                    "elastic bounds {min}:{max} must satisfy 1 <= MIN <= world size ({}) <= MAX",
                    cfg.world_size
                )));
            }
        }
        let job_id = match cfg.job_id {
            Some(j) => j,
            None => random_job_id()?,
        };
        let token = match cfg.token {
            Some(t) => t,
            None => JobToken::generate()?,
        };
        let ca = JobCa::new(&job_id, cfg.cert_lifetime)?;
        let (chain, key) = ca.seed_identity()?;
        let tls = QuicServerConfig::try_from(pki::seed_server_config(chain, key)?)
            .map_err(|e| Error::transport(None, format!("seed TLS: {e}")))?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(tls));
        server.transport_config(endpoint::seed_transport_config(&Config::default())?);
        let endpoint = endpoint::bind(cfg.bind, &Config::default())?;
        endpoint.set_server_config(Some(server));
        let now = Instant::now();
        let state = SeedState::new(&job_id, cfg.world_size, now, cfg.formation_timeout);
        let inner = Arc::new(Inner {
            job_id,
            token,
            ca,
            world_size: cfg.world_size,
            state: Mutex::new(state),
            phase: watch::channel(Phase::Forming).0,
            joined: watch::channel(Vec::new()).0,
            notices: tokio::sync::broadcast::channel(256).0,
            elastic: cfg
                .elastic
                .map(|(min, max)| Mutex::new(Elastic::new(min, max))),
            epochs: watch::channel(1).0,
            unproven: Places::new(MAX_UNPROVEN, MAX_UNPROVEN_PER_SOURCE),
        });
        let tasks = Arc::new(Mutex::new(JoinSet::new()));
        let (i, ep, t) = (inner.clone(), endpoint.clone(), tasks.clone());
        spawn(&tasks, async move { accept_loop(i, ep, t).await });
        let i = inner.clone();
        let deadline = tokio::time::Instant::from_std(now + cfg.formation_timeout);
        spawn(&tasks, async move {
            tokio::time::sleep_until(deadline).await;
            let phase = {
                let mut st = i.state.lock().unwrap_or_else(|p| p.into_inner());
                st.handle_timeout(Instant::now());
                st.phase().clone()
            };
            if let Phase::Failed(reason) = &phase {
                tracing::error!("seed: {reason}");
                i.phase.send_replace(phase);
            }
        });
        tracing::info!(
            "seed: job {} listening on {:?} for {} ranks",
            inner.job_id,
            endpoint.local_addr().ok(),
            inner.world_size
        );
        Ok(Seed {
            inner,
            endpoint,
            tasks,
        })
    }

    /// The address ranks join (`RANKMESH_SEED`).
    pub fn addr(&self) -> Result<SocketAddr> {
        self.endpoint
            .local_addr()
            .map_err(|e| Error::transport(None, format!("seed address: {e}")))
    }

    /// The job id.
    pub fn job_id(&self) -> &str {
        &self.inner.job_id
    }

    /// The job token ranks must prove (`RANKMESH_TOKEN`); a secret.
    pub fn token(&self) -> &JobToken {
        &self.inner.token
    }

    /// Wait until every rank joined (the peer table) or formation failed
    /// (an error naming the missing ranks).
    pub async fn wait_formed(&self) -> Result<Vec<PeerInfo>> {
        let mut rx = self.inner.phase.subscribe();
        let phase = rx
            .wait_for(|p| !matches!(p, Phase::Forming))
            .await
            .map_err(|_| Error::Membership {
                detail: "the seed stopped before formation completed".into(),
            })?
            .clone();
        match phase {
            Phase::Formed(t) => Ok(t),
            Phase::Failed(reason) => Err(Error::Membership { detail: reason }),
            Phase::Forming => Err(Error::Membership {
                detail: "formation did not complete".into(),
            }),
        }
    }

    /// Formation progress: the ranks that have joined so far, in rank
    /// order. The receiver changes whenever a rank joins or leaves before
    /// formation completed (for launchers that show progress).
    pub fn joined_ranks(&self) -> watch::Receiver<Vec<usize>> {
        self.inner.joined.subscribe()
    }

    /// Connections that have not yet proved the job token (at most 256; a
    /// number near that for long means someone without the token keeps
    /// connecting to the seed).
    pub fn unproven_connections(&self) -> usize {
        self.inner.unproven.held()
    }

    /// The peer table by member id as the seed knows it now: every member
    /// the job has had once it formed (an elastic job's grows as processes
    /// join), empty before, each with its [`KeyPin`].
    pub fn members(&self) -> Vec<PeerInfo> {
        if let Some(el) = &self.inner.elastic {
            let el = lock(el);
            if !el.table().is_empty() {
                return el.table().to_vec();
            }
        }
        match &*self.inner.phase.borrow() {
            Phase::Formed(t) => t.clone(),
            _ => Vec::new(),
        }
    }

    /// Processes waiting to join an elastic job at its next checkpoint.
    pub fn waiting_joiners(&self) -> usize {
        self.inner
            .elastic
            .as_ref()
            .map_or(0, |el| lock(el).pending())
    }

    /// Stop the seed and every task it runs.
    pub async fn shutdown(&self) {
        self.endpoint
            .close(VarInt::from_u32(close::BYE), b"seed shut down");
        let _ = tokio::time::timeout(Duration::from_millis(100), self.endpoint.wait_idle()).await;
        let mut t = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        t.abort_all();
        while t.try_join_next().is_some() {}
    }
}

impl Drop for Seed {
    fn drop(&mut self) {
        self.endpoint
            .close(VarInt::from_u32(close::BYE), b"seed dropped");
        let mut t = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        t.abort_all();
    }
}
