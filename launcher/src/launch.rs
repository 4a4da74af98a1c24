//! Setting a job up: the seed (or the job a `--join` joins), the token
//! handed to local ranks, the processes to start with their launch
//! contract and command lines, and their output sinks.

use crate::cli::{Mode, Plan, TagMode};
use crate::output::{self, Sink};
use crate::place::{self, Placement};
use crate::spawn;
use rankmesh::launch::{Seed, SeedConfig};
use std::ffi::OsString;
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::PathBuf;
use std::time::Duration;
use tokio::signal::unix::{signal, SignalKind};

/// Formation deadline standing for "forever" (`--join-timeout 0`).
pub(crate) const FOREVER: Duration = Duration::from_secs(30 * 24 * 3600);

/// Removes the token directory when the job ends.
pub(crate) struct TokenDir(pub(crate) Option<PathBuf>);

impl TokenDir {
    pub(crate) fn remove(&mut self) {
        if let Some(d) = self.0.take() {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

impl Drop for TokenDir {
    fn drop(&mut self) {
        self.remove();
    }
}

/// Write `secret` to a new file readable only by this user.
pub(crate) fn write_secret(path: &std::path::Path, secret: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(secret.as_bytes())
}

/// The token of the job a `--join` joins: `--token-file`, else
/// RANKMESH_TOKEN.
pub(crate) fn join_token(plan: &Plan) -> Result<String, String> {
    let raw = match &plan.cli.token_file {
        Some(f) => {
            std::fs::read_to_string(f).map_err(|e| format!("--token-file {}: {e}", f.display()))?
        }
        None => std::env::var("RANKMESH_TOKEN").map_err(|_| {
            "give the job's token with --token-file FILE (written by the job's rankrun \
             --token-file) or RANKMESH_TOKEN"
                .to_string()
        })?,
    };
    rankmesh::launch::JobToken::from_hex(raw.trim())
        .map(|t| t.to_hex())
        .map_err(|e| e.to_string())
}

pub(crate) fn write_token_file(job_id: &str, hex: &str) -> std::io::Result<(PathBuf, PathBuf)> {
    use std::io::Write;
    let dir = std::env::temp_dir().join(format!("rankrun-{}-{job_id}", std::process::id()));
    std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
    let file = dir.join("token");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&file)?;
    f.write_all(hex.as_bytes())?;
    Ok((dir, file))
}

pub(crate) fn seed_bind(
    plan: &Plan,
    placements: &[Placement],
) -> Result<(SocketAddr, Option<String>), String> {
    // (bind address, advertised host when the bind address is unspecified)
    let first_remote = placements.iter().find(|p| !p.local).map(|p| p.host.clone());
    let addr = match &plan.cli.seed_addr {
        Some(s) => place::parse_seed_addr(s)?,
        None => match (&plan.mode, first_remote) {
            (Mode::Slurm, _) => SocketAddr::from(([0, 0, 0, 0], 0)),
            (_, None) => SocketAddr::from(([127, 0, 0, 1], 0)),
            (_, Some(h)) => SocketAddr::new(
                place::route_ip_to(&h)
                    .map_err(|e| format!("cannot choose a seed address: {e}; pass --seed-addr"))?,
                0,
            ),
        },
    };
    let adv = addr.ip().is_unspecified().then(place::hostname);
    Ok((addr, adv))
}

/// The job's seed side: its own seed, or the running job a `--join` joins.
pub(crate) struct SeedSide {
    pub(crate) seed: Option<Seed>,
    /// The address ranks are told (`RANKMESH_SEED`).
    pub(crate) addr: String,
    pub(crate) job_id: String,
    pub(crate) token_hex: String,
}

/// Start the seed (or, for `--join`, read the token of the job joined).
pub(crate) fn seed_side(plan: &Plan, placements: &[Placement]) -> Result<SeedSide, String> {
    let (bind, advertise) = seed_bind(plan, placements)?;
    if let Some(addr) = &plan.cli.join {
        let token_hex = join_token(plan).map_err(|e| format!("--join: {e}"))?;
        return Ok(SeedSide {
            seed: None,
            addr: addr.clone(),
            job_id: "(joining)".to_string(),
            token_hex,
        });
    }
    let join_timeout = plan.cli.join_timeout;
    let mut cfg = SeedConfig::new(plan.np);
    cfg.set_bind(bind)
        .set_formation_timeout(if join_timeout.is_zero() {
            FOREVER
        } else {
            join_timeout
        });
    if let Some((min, max)) = plan.cli.elastic {
        cfg.set_elastic(min, max);
    }
    let seed = Seed::start(cfg).map_err(|e| format!("cannot start the seed on {bind}: {e}"))?;
    let seed_addr = seed.addr().map_err(|e| e.to_string())?;
    let addr = match &advertise {
        Some(h) => format!("{h}:{}", seed_addr.port()),
        None => seed_addr.to_string(),
    };
    let (job_id, token_hex) = (seed.job_id().to_string(), seed.token().to_hex());
    if let Some(f) = &plan.cli.token_file {
        write_secret(f, &token_hex).map_err(|e| format!("--token-file {}: {e}", f.display()))?;
    }
    Ok(SeedSide {
        seed: Some(seed),
        addr,
        job_id,
        token_hex,
    })
}

/// The signals rankrun handles, installed before any rank exists.
pub(crate) struct Signals {
    pub(crate) int: tokio::signal::unix::Signal,
    pub(crate) term: tokio::signal::unix::Signal,
    pub(crate) hup: tokio::signal::unix::Signal,
    pub(crate) usr1: tokio::signal::unix::Signal,
}

pub(crate) fn signals() -> Result<Signals, String> {
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
        signal(SignalKind::user_defined1()),
    ) {
        (Ok(int), Ok(term), Ok(hup), Ok(usr1)) => Ok(Signals {
            int,
            term,
            hup,
            usr1,
        }),
        _ => Err("cannot install signal handlers".to_string()),
    }
}

/// One process to start: "rank 2", "joiner 0" or "srun"; its rank, host.
pub(crate) struct Label {
    pub(crate) name: String,
    pub(crate) rank: Option<usize>,
    pub(crate) host: String,
}

pub(crate) fn labels(plan: &Plan, placements: &[Placement]) -> Vec<Label> {
    let label = |p: &Placement, what: &str| Label {
        name: format!("{what} {}", p.rank),
        rank: Some(p.rank),
        host: p.host.clone(),
    };
    match &plan.mode {
        Mode::Hosts(_) if plan.cli.join.is_some() => {
            placements.iter().map(|p| label(p, "joiner")).collect()
        }
        Mode::Hosts(_) => placements.iter().map(|p| label(p, "rank")).collect(),
        Mode::Slurm => vec![Label {
            name: "srun".to_string(),
            rank: None,
            host: place::hostname(),
        }],
    }
}

/// Output sinks, one per process: its line tag and its `--output-dir` file.
pub(crate) fn sinks(plan: &Plan, labels: &[Label]) -> Result<Vec<Sink>, String> {
    let joining = plan.cli.join.is_some();
    let mut sinks = Vec::new();
    for Label { name, rank, host } in labels {
        let tag = match (rank, plan.cli.quiet, plan.cli.tag_output) {
            (None, _, _) | (_, true, _) => String::new(),
            (Some(r), false, TagMode::Rank) if joining => format!("[+{r}] "),
            (Some(r), false, TagMode::Host) if joining => format!("[{host}:+{r}] "),
            (Some(r), false, TagMode::Rank) => format!("[{r}] "),
            (Some(r), false, TagMode::Host) => format!("[{host}:{r}] "),
        };
        let file = match &plan.cli.output_dir {
            Some(d) => Some(
                output::open_file(d, &name.replace(' ', "."))
                    .map_err(|e| format!("--output-dir {}: {e}", d.display()))?,
            ),
            None => None,
        };
        sinks.push(Sink {
            tag: tag.into_bytes(),
            file,
        });
    }
    Ok(sinks)
}

/// The launch contract of process `idx`, after the user's variables (so it
/// wins).
pub(crate) fn contract_env(
    plan: &Plan,
    side: &SeedSide,
    label: &Label,
    placement: Option<&Placement>,
) -> Vec<(String, String)> {
    let np = plan.np;
    let joining = plan.cli.join.is_some();
    let mut env: Vec<(String, String)> = plan.env.clone();
    let mut contract = vec![("RANKMESH_SEED".to_string(), side.addr.clone())];
    if joining {
        contract.push(("RANKMESH_JOIN".to_string(), "1".to_string()));
        if let Some(p) = placement {
            contract.extend([
                ("RANKMESH_LOCAL_RANK".to_string(), p.local_rank.to_string()),
                ("RANKMESH_LOCAL_SIZE".to_string(), p.local_size.to_string()),
            ]);
        }
    } else {
        contract.extend([
            ("RANKMESH_WORLD_SIZE".to_string(), np.to_string()),
            ("RANKMESH_JOB_ID".to_string(), side.job_id.clone()),
            ("WORLD_SIZE".to_string(), np.to_string()),
        ]);
    }
    if let (Some(r), Some(p), false) = (label.rank, placement, joining) {
        contract.extend([
            ("RANKMESH_RANK".to_string(), r.to_string()),
            ("RANKMESH_LOCAL_RANK".to_string(), p.local_rank.to_string()),
            ("RANKMESH_LOCAL_SIZE".to_string(), p.local_size.to_string()),
            ("RANK".to_string(), r.to_string()),
            ("LOCAL_RANK".to_string(), p.local_rank.to_string()),
            ("LOCAL_WORLD_SIZE".to_string(), p.local_size.to_string()),
        ]);
    }
    let user_sets_formation = plan
        .env
        .iter()
        .any(|(k, _)| k == "RANKMESH_FORMATION_TIMEOUT");
    if !user_sets_formation {
        let join_timeout = plan.cli.join_timeout;
        let rank_formation = if join_timeout.is_zero() {
            FOREVER
        } else {
            join_timeout + Duration::from_secs(10)
        };
        contract.push((
            "RANKMESH_FORMATION_TIMEOUT".to_string(),
            format!("{:.1}", rank_formation.as_secs_f64()),
        ));
    }
    env.extend(contract);
    env
}

/// The command that starts one process: srun for the whole allocation, the
/// program itself on this host, or the launch agent for a remote host.
pub(crate) fn command(
    plan: &Plan,
    side: &SeedSide,
    env: &[(String, String)],
    host: &str,
    remote: bool,
    token_file: Option<&std::path::Path>,
) -> Result<tokio::process::Command, String> {
    let np = plan.np;
    let program = plan.command_program();
    let args = plan.command_args();
    Ok(match (&plan.mode, remote) {
        (Mode::Slurm, _) => {
            let mut a: Vec<OsString> = vec![
                format!("--ntasks={np}").into(),
                "--kill-on-bad-exit=1".into(),
                "--label".into(),
                program.clone(),
            ];
            a.extend(args.iter().cloned());
            let mut c = spawn::base_command("srun".as_ref(), &a, false);
            c.envs(env.iter().map(|(k, v)| (k, v)));
            for k in [
                "RANKMESH_RANK",
                "RANKMESH_LOCAL_RANK",
                "RANKMESH_LOCAL_SIZE",
                "RANK",
                "LOCAL_RANK",
                "RANKMESH_TOKEN_FILE",
            ] {
                c.env_remove(k);
            }
            // srun hands its environment to every task; the token stays
            // off every command line.
            c.env("RANKMESH_TOKEN", &side.token_hex);
            c
        }
        (_, false) => {
            let mut c = spawn::base_command(&program, &args, false);
            c.envs(env.iter().map(|(k, v)| (k, v)));
            c.env_remove("RANKMESH_TOKEN");
            if let Some(f) = token_file {
                c.env("RANKMESH_TOKEN_FILE", f);
            }
            c
        }
        (_, true) => {
            let mut command = vec![program.clone()];
            command.extend(args.iter().cloned());
            let cwd = std::env::current_dir().ok().map(|d| d.into_os_string());
            let script = spawn::remote_script(cwd.as_deref(), env, &command, plan.cli.grace);
            let argv = spawn::agent_argv(&plan.cli.launch_agent, host, &script)
                .map_err(|e| format!("error: --launch-agent: {e}"))?;
            let rest: Vec<OsString> = argv[1..].iter().map(OsString::from).collect();
            spawn::base_command(argv[0].as_ref(), &rest, true)
        }
    })
}

/// "job ID: N rank(s), seed at ADDR" and where the ranks run.
pub(crate) fn announce(plan: &Plan, side: &SeedSide, placements: &[Placement]) -> String {
    format!(
        "job {}: {} rank(s), seed at {}{}",
        side.job_id,
        plan.np,
        side.addr,
        match &plan.mode {
            Mode::Slurm => " (placing ranks with srun in the Slurm allocation)".to_string(),
            Mode::Hosts(h) if h.len() > 1 || placements.iter().any(|p| !p.local) => format!(
                " on {}",
                h.iter()
                    .map(|h| h.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            _ => String::new(),
        }
    )
}
