//! Running a job: seed, processes, output, failures, signals, summary.

use crate::cli::{Mode, Plan, TagMode};
use crate::output::{self, Msg, Sink, Tx};
use crate::place::{self, Placement};
use crate::spawn;
use rankmesh::bootstrap::{Seed, SeedConfig};
use std::ffi::OsString;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::process::ChildStdin;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

/// Exit code when `--timeout` or `--join-timeout` ends the job.
const TIMEOUT_CODE: i32 = 124;
/// Exit code when a rank cannot be started.
const SPAWN_CODE: i32 = 127;
/// Exit code for setup errors (like a bad command line).
const SETUP_CODE: i32 = 2;
/// Formation deadline standing for "forever" (`--join-timeout 0`).
const FOREVER: Duration = Duration::from_secs(30 * 24 * 3600);

fn signame(sig: i32) -> String {
    let n = match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGALRM => "SIGALRM",
        libc::SIGTERM => "SIGTERM",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGUSR2 => "SIGUSR2",
        _ => return format!("signal {sig}"),
    };
    n.to_string()
}

/// One process rankrun started: a rank (local, or its launch agent), or
/// `srun` standing for every rank.
struct Proc {
    label: String,
    rank: Option<usize>,
    host: String,
    remote: bool,
    pid: u32,
    stdin: Option<ChildStdin>,
    status: Option<ExitStatus>,
    /// Exited after rankrun began ending the job.
    after_end: bool,
}

impl Proc {
    fn who(&self) -> String {
        if self.remote {
            format!(
                "{} (on {}, launch agent pid {})",
                self.label, self.host, self.pid
            )
        } else {
            format!("{} (pid {} on {})", self.label, self.pid, self.host)
        }
    }

    fn signal(&self, sig: i32) {
        if self.status.is_none() {
            // The pid is our child's and leads its own process group. Once
            // the wait task has reaped it (before this loop heard) the group
            // id stays reserved while any member lives; only a group that
            // emptied in that instant could in theory have its id reused.
            // SAFETY: kill(2) has no memory-safety preconditions.
            unsafe {
                libc::kill(-(self.pid as libc::pid_t), sig);
            }
        }
    }
}

fn code_of(st: &ExitStatus) -> i32 {
    match (st.code(), st.signal()) {
        (Some(c), _) => c,
        (None, Some(s)) => 128 + s,
        _ => 1,
    }
}

fn describe(st: &ExitStatus, remote: bool) -> String {
    match (st.code(), st.signal()) {
        (Some(c), _) if remote && c > 128 && c < 160 => format!(
            "exited with code {c} (the remote shell's code for {})",
            signame(c - 128)
        ),
        (Some(c), _) => format!("exited with code {c}"),
        (None, Some(s)) => format!("was killed by {}", signame(s)),
        _ => format!("ended with status {st}"),
    }
}

/// Removes the token directory when the job ends.
struct TokenDir(Option<PathBuf>);

impl TokenDir {
    fn remove(&mut self) {
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
fn write_secret(path: &std::path::Path, secret: &str) -> std::io::Result<()> {
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
fn join_token(plan: &Plan) -> Result<String, String> {
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
    rankmesh::bootstrap::JobToken::from_hex(raw.trim())
        .map(|t| t.to_hex())
        .map_err(|e| e.to_string())
}

fn write_token_file(job_id: &str, hex: &str) -> std::io::Result<(PathBuf, PathBuf)> {
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

enum State {
    Running,
    Ending { kill_at: Instant, killed: bool },
}

struct Job {
    procs: Vec<Proc>,
    placements: Vec<Placement>,
    tx: Tx,
    state: State,
    code: Option<i32>,
    first_failure: Option<String>,
    grace: Duration,
    /// An elastic job (or joiners of one): a rank that is lost (killed by
    /// a signal) after formation does not end the others, which recover
    /// without it.
    elastic: bool,
    /// The job has formed (always, for joiners: there is nothing to form).
    formed: bool,
}

impl Job {
    async fn note(&self, s: impl Into<String>) {
        let _ = self.tx.send(Msg::Note(s.into())).await;
    }

    fn running(&self) -> usize {
        self.procs.iter().filter(|p| p.status.is_none()).count()
    }

    /// Begin ending the job: `sig` to every running process, SIGKILL after
    /// the grace period.
    async fn end(&mut self, sig: i32, why: &str) {
        if let State::Ending { .. } = self.state {
            return;
        }
        let n = self.running();
        if n > 0 {
            self.note(format!(
                "{why}; sending {} to {n} remaining process(es), SIGKILL after {:?}",
                signame(sig),
                self.grace
            ))
            .await;
        }
        for p in &self.procs {
            p.signal(sig);
        }
        self.state = State::Ending {
            kill_at: Instant::now() + self.grace,
            killed: false,
        };
    }

    fn kill_all(&mut self) {
        for p in &self.procs {
            p.signal(libc::SIGKILL);
        }
        if let State::Ending { killed, .. } = &mut self.state {
            *killed = true;
        }
    }

    async fn exited(&mut self, idx: usize, st: std::io::Result<ExitStatus>) {
        let ending = matches!(self.state, State::Ending { .. });
        let Some(p) = self.procs.get_mut(idx) else {
            return;
        };
        let st = match st {
            Ok(s) => s,
            Err(_) => ExitStatus::from_raw(libc::SIGKILL),
        };
        p.status = Some(st);
        p.after_end = ending;
        p.stdin = None;
        // Whatever the rank left behind in its process group goes with it.
        // SAFETY: kill(2) has no memory-safety preconditions; the group id
        // was our child's pid, reaped just now, and stays reserved while
        // any member of the group is alive.
        unsafe {
            libc::kill(-(p.pid as libc::pid_t), libc::SIGKILL);
        }
        if st.success() || ending {
            return;
        }
        let line = format!("{} {}", p.who(), describe(&st, p.remote));
        let code = code_of(&st);
        // A lost rank (killed, or its remote shell reporting a signal); a
        // rank that exits with an error is a failure of the job.
        let lost = st.signal().is_some() || (p.remote && (129..160).contains(&code));
        if self.elastic && self.formed && lost {
            // The survivors go on without it (Communicator::recover); the
            // job fails only if no process succeeds.
            if self.first_failure.is_none() {
                self.first_failure = Some(line.clone());
            }
            self.note(format!(
                "{line}; elastic job: the other ranks continue without it"
            ))
            .await;
            return;
        }
        self.first_failure = Some(line.clone());
        self.code = Some(code);
        self.note(line).await;
        self.end(libc::SIGTERM, "ending the job").await;
    }

    /// "[2, 3] on b" for the ranks not in `joined` (grouped by host, with
    /// the exit status of those that already ended).
    fn missing(&self, joined: &[usize]) -> String {
        let mut groups: Vec<(String, Vec<String>)> = Vec::new();
        let mut shown = 0;
        let mut more = 0;
        for p in self
            .placements
            .iter()
            .filter(|p| joined.binary_search(&p.rank).is_err())
        {
            if shown == 16 {
                more += 1;
                continue;
            }
            shown += 1;
            let mut s = p.rank.to_string();
            if let Some(st) = self
                .procs
                .iter()
                .find(|q| q.rank == Some(p.rank))
                .and_then(|q| q.status)
            {
                s.push_str(&format!(" ({})", describe(&st, false)));
            }
            match groups.last_mut() {
                Some((h, v)) if *h == p.host => v.push(s),
                _ => groups.push((p.host.clone(), vec![s])),
            }
        }
        let mut out: Vec<String> = groups
            .into_iter()
            .map(|(h, v)| format!("[{}] on {h}", v.join(", ")))
            .collect();
        if more > 0 {
            out.push(format!("and {more} more"));
        }
        out.join(", ")
    }

    fn progress(&self, joined: &[usize]) -> String {
        let n = self.placements.len();
        if joined.len() >= n || self.placements.is_empty() {
            format!("{}/{n} ranks joined", joined.len())
        } else {
            format!(
                "{}/{n} ranks joined; waiting for rank(s) {}",
                joined.len(),
                self.missing(joined)
            )
        }
    }
}

fn seed_bind(
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

/// Run the job; returns rankrun's exit code.
pub async fn run(plan: Plan) -> i32 {
    let t0 = Instant::now();
    let np = plan.np;
    let quiet = plan.cli.quiet;
    let placements = match &plan.mode {
        Mode::Hosts(h) => place::place(h, np),
        Mode::Slurm => Vec::new(),
    };
    let (bind, advertise) = match seed_bind(&plan, &placements) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("rankrun: error: {e}");
            return SETUP_CODE;
        }
    };
    let join_timeout = plan.cli.join_timeout;
    // Joining a running elastic job: no seed of our own.
    let joining = plan.cli.join.clone();
    let elastic = plan.cli.elastic.is_some() || joining.is_some();
    let (seed, seed_str, job_id, token_hex) = match &joining {
        Some(addr) => match join_token(&plan) {
            Ok(t) => (None, addr.clone(), "(joining)".to_string(), t),
            Err(e) => {
                eprintln!("rankrun: error: --join: {e}");
                return SETUP_CODE;
            }
        },
        None => {
            let mut cfg = SeedConfig::new(np);
            cfg.set_bind(bind)
                .set_formation_timeout(if join_timeout.is_zero() {
                    FOREVER
                } else {
                    join_timeout
                });
            if let Some((min, max)) = plan.cli.elastic {
                cfg.set_elastic(min, max);
            }
            let seed = match Seed::start(cfg) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("rankrun: error: cannot start the seed on {bind}: {e}");
                    return SETUP_CODE;
                }
            };
            let seed_addr = match seed.addr() {
                Ok(a) => a,
                Err(e) => {
                    eprintln!("rankrun: error: {e}");
                    return SETUP_CODE;
                }
            };
            let seed_str = match &advertise {
                Some(h) => format!("{h}:{}", seed_addr.port()),
                None => seed_addr.to_string(),
            };
            let (job_id, token_hex) = (seed.job_id().to_string(), seed.token().to_hex());
            if let Some(f) = &plan.cli.token_file {
                if let Err(e) = write_secret(f, &token_hex) {
                    eprintln!("rankrun: error: --token-file {}: {e}", f.display());
                    return SETUP_CODE;
                }
            }
            (Some(seed), seed_str, job_id, token_hex)
        }
    };
    let any_local = matches!(plan.mode, Mode::Hosts(_)) && placements.iter().any(|p| p.local);
    let mut token_dir = TokenDir(None);
    let token_file = if any_local {
        match write_token_file(&job_id.replace(['(', ')'], ""), &token_hex) {
            Ok((d, f)) => {
                token_dir.0 = Some(d);
                Some(f)
            }
            Err(e) => {
                eprintln!("rankrun: error: cannot write the job token file: {e}");
                return SETUP_CODE;
            }
        }
    } else {
        None
    };

    // Install signal handlers before any rank exists.
    let (mut sigint, mut sigterm, mut sighup, mut sigusr1) = match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
        signal(SignalKind::user_defined1()),
    ) {
        (Ok(a), Ok(b), Ok(c), Ok(d)) => (a, b, c, d),
        _ => {
            eprintln!("rankrun: error: cannot install signal handlers");
            return SETUP_CODE;
        }
    };

    // Output sinks, one per process.
    let labels: Vec<(String, Option<usize>, String)> = match &plan.mode {
        Mode::Hosts(_) if joining.is_some() => placements
            .iter()
            .map(|p| (format!("joiner {}", p.rank), Some(p.rank), p.host.clone()))
            .collect(),
        Mode::Hosts(_) => placements
            .iter()
            .map(|p| (format!("rank {}", p.rank), Some(p.rank), p.host.clone()))
            .collect(),
        Mode::Slurm => vec![("srun".to_string(), None, place::hostname())],
    };
    let mut sinks = Vec::new();
    for (label, rank, host) in &labels {
        let tag = match (rank, quiet, plan.cli.tag_output) {
            (None, _, _) | (_, true, _) => String::new(),
            (Some(r), false, TagMode::Rank) if joining.is_some() => format!("[+{r}] "),
            (Some(r), false, TagMode::Host) if joining.is_some() => format!("[{host}:+{r}] "),
            (Some(r), false, TagMode::Rank) => format!("[{r}] "),
            (Some(r), false, TagMode::Host) => format!("[{host}:{r}] "),
        };
        let file = match &plan.cli.output_dir {
            Some(d) => {
                let name = label.replace(' ', ".");
                match output::open_file(d, &name) {
                    Ok(f) => Some(f),
                    Err(e) => {
                        eprintln!("rankrun: error: --output-dir {}: {e}", d.display());
                        return SETUP_CODE;
                    }
                }
            }
            None => None,
        };
        sinks.push(Sink {
            tag: tag.into_bytes(),
            file,
        });
    }
    let (tx, writer) = output::start(sinks);

    let program = plan.command_program();
    let args = plan.command_args();
    let cwd = std::env::current_dir().ok().map(|d| d.into_os_string());
    let rank_formation = if join_timeout.is_zero() {
        FOREVER
    } else {
        join_timeout + Duration::from_secs(10)
    };
    let user_sets_formation = plan
        .env
        .iter()
        .any(|(k, _)| k == "RANKMESH_FORMATION_TIMEOUT");

    let mut job = Job {
        procs: Vec::new(),
        placements: placements.clone(),
        tx: tx.clone(),
        state: State::Running,
        code: None,
        first_failure: None,
        grace: plan.cli.grace,
        elastic,
        formed: joining.is_some(),
    };
    if !quiet {
        job.note(format!(
            "job {job_id}: {np} rank(s), seed at {seed_str}{}",
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
        ))
        .await;
    }

    let (exit_tx, mut exit_rx) = mpsc::unbounded_channel::<(usize, std::io::Result<ExitStatus>)>();
    let mut pumps = Vec::new();
    for (idx, (label, rank, host)) in labels.iter().enumerate() {
        // The contract, after the user's variables so it wins.
        let mut env: Vec<(String, String)> = plan.env.clone();
        let mut contract = vec![("RANKMESH_SEED".to_string(), seed_str.clone())];
        if joining.is_some() {
            contract.push(("RANKMESH_JOIN".to_string(), "1".to_string()));
            if let Some(p) = placements.get(idx) {
                contract.extend([
                    ("RANKMESH_LOCAL_RANK".to_string(), p.local_rank.to_string()),
                    ("RANKMESH_LOCAL_SIZE".to_string(), p.local_size.to_string()),
                ]);
            }
        } else {
            contract.extend([
                ("RANKMESH_WORLD_SIZE".to_string(), np.to_string()),
                ("RANKMESH_JOB_ID".to_string(), job_id.clone()),
                ("WORLD_SIZE".to_string(), np.to_string()),
            ]);
        }
        if let (Some(r), Some(p), None) = (rank, placements.get(idx), &joining) {
            contract.extend([
                ("RANKMESH_RANK".to_string(), r.to_string()),
                ("RANKMESH_LOCAL_RANK".to_string(), p.local_rank.to_string()),
                ("RANKMESH_LOCAL_SIZE".to_string(), p.local_size.to_string()),
                ("RANK".to_string(), r.to_string()),
                ("LOCAL_RANK".to_string(), p.local_rank.to_string()),
                ("LOCAL_WORLD_SIZE".to_string(), p.local_size.to_string()),
            ]);
        }
        if !user_sets_formation {
            contract.push((
                "RANKMESH_FORMATION_TIMEOUT".to_string(),
                format!("{:.1}", rank_formation.as_secs_f64()),
            ));
        }
        env.extend(contract);
        let remote = placements.get(idx).is_some_and(|p| !p.local);
        let mut cmd = match (&plan.mode, remote) {
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
                c.env("RANKMESH_TOKEN", &token_hex);
                c
            }
            (_, false) => {
                let mut c = spawn::base_command(&program, &args, false);
                c.envs(env.iter().map(|(k, v)| (k, v)));
                c.env_remove("RANKMESH_TOKEN");
                if let Some(f) = &token_file {
                    c.env("RANKMESH_TOKEN_FILE", f);
                }
                c
            }
            (_, true) => {
                let mut command = vec![program.clone()];
                command.extend(args.iter().cloned());
                let script = spawn::remote_script(cwd.as_deref(), &env, &command, plan.cli.grace);
                let argv = match spawn::agent_argv(&plan.cli.launch_agent, host, &script) {
                    Ok(a) => a,
                    Err(e) => {
                        job.note(format!("error: --launch-agent: {e}")).await;
                        job.code = Some(SETUP_CODE);
                        break;
                    }
                };
                let rest: Vec<OsString> = argv[1..].iter().map(OsString::from).collect();
                spawn::base_command(argv[0].as_ref(), &rest, true)
            }
        };
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                let what = if remote {
                    format!(
                        "cannot start the launch agent for {label} on {host} ({}): {e}",
                        plan.cli.launch_agent
                    )
                } else {
                    format!("cannot start {label} on {host} ({program:?}): {e}")
                };
                job.first_failure = Some(what.clone());
                job.code = Some(SPAWN_CODE);
                job.note(what).await;
                break;
            }
        };
        let pid = child.id().unwrap_or(0);
        let mut stdin = child.stdin.take();
        if let Some(i) = &mut stdin {
            // The token travels over the agent's stdin, never argv.
            let _ = i.write_all(format!("{token_hex}\n").as_bytes()).await;
            let _ = i.flush().await;
        }
        if let Some(o) = child.stdout.take() {
            pumps.push(tokio::spawn(output::pump(o, idx, false, tx.clone())));
        }
        if let Some(e) = child.stderr.take() {
            pumps.push(tokio::spawn(output::pump(e, idx, true, tx.clone())));
        }
        let etx = exit_tx.clone();
        tokio::spawn(async move {
            let st = child.wait().await;
            let _ = etx.send((idx, st));
        });
        job.procs.push(Proc {
            label: label.clone(),
            rank: *rank,
            host: host.clone(),
            remote,
            pid,
            stdin,
            status: None,
            after_end: false,
        });
    }
    drop(exit_tx);
    if job.code.is_some() {
        job.end(libc::SIGTERM, "not every rank could be started")
            .await;
    }

    // The event loop.
    let mut joined_rx = match &seed {
        Some(s) => s.joined_ranks(),
        None => tokio::sync::watch::channel(Vec::new()).1,
    };
    let formed = async {
        match &seed {
            Some(s) => s.wait_formed().await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(formed);
    // Joiners have no formation to watch: the job admits them later.
    let mut forming = job.code.is_none() && seed.is_some();
    let mut last_progress: Option<Instant> = None;
    // On a terminal, formation progress is a bar; otherwise plain lines.
    let bar = (forming && !quiet && std::io::stderr().is_terminal()).then(|| {
        let b = indicatif::ProgressBar::with_draw_target(
            Some(np as u64),
            indicatif::ProgressDrawTarget::stderr(),
        );
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "rankrun: {spinner} [{bar:30}] {pos}/{len} ranks joined; {wide_msg}",
        ) {
            b.set_style(style.progress_chars("=> "));
        }
        b.enable_steady_tick(Duration::from_millis(120));
        b
    });
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let timeout = plan.cli.timeout;
    let mut signals = 0;
    while job.running() > 0 {
        tokio::select! {
            ev = exit_rx.recv() => match ev {
                Some((idx, st)) => job.exited(idx, st).await,
                None => break,
            },
            r = &mut formed, if forming => {
                forming = false;
                if let Some(b) = &bar {
                    b.finish_and_clear();
                }
                match r {
                    Ok(_) => {
                        job.formed = true;
                        token_dir.remove();
                        if !quiet {
                            job.note(format!(
                                "all {np} ranks joined; job {job_id} formed in {:.1}s",
                                t0.elapsed().as_secs_f64()
                            )).await;
                        }
                    }
                    Err(_) if matches!(job.state, State::Running) => {
                        let joined = joined_rx.borrow().clone();
                        let why = format!(
                            "formation failed after --join-timeout {:?}: {}; those ranks never \
                             reached the seed at {seed_str} (did they start? can they reach it? \
                             does PROGRAM call rankmesh::init?)",
                            join_timeout,
                            job.progress(&joined)
                        );
                        job.first_failure = Some(why.clone());
                        job.code = Some(TIMEOUT_CODE);
                        job.note(why).await;
                        job.end(libc::SIGTERM, "ending the job").await;
                    }
                    Err(_) => {}
                }
            },
            ch = joined_rx.changed(), if forming => {
                if ch.is_err() {
                    forming = false;
                } else if let Some(b) = &bar {
                    let joined = joined_rx.borrow_and_update().clone();
                    b.set_position(joined.len() as u64);
                    if joined.len() < np {
                        b.set_message(format!("waiting for rank(s) {}", job.missing(&joined)));
                    }
                } else if !quiet && t0.elapsed() >= Duration::from_secs(1)
                    && matches!(job.state, State::Running)
                {
                    let joined = joined_rx.borrow_and_update().clone();
                    if joined.len() < np {
                        last_progress = Some(Instant::now());
                        job.note(job.progress(&joined)).await;
                    }
                }
            },
            _ = sigint.recv() => signals = on_signal(&mut job, libc::SIGINT, signals).await,
            _ = sigterm.recv() => signals = on_signal(&mut job, libc::SIGTERM, signals).await,
            _ = sighup.recv() => signals = on_signal(&mut job, libc::SIGHUP, signals).await,
            _ = sigusr1.recv() => {
                // Not an ending: every rank writes its flight recorder. Only
                // once the job formed: a rank that has not reached
                // rankmesh::init yet would die of it.
                if !job.formed {
                    job.note("SIGUSR1 not forwarded: the job has not formed yet").await;
                    continue;
                }
                for p in &job.procs {
                    p.signal(libc::SIGUSR1);
                }
                job.note("SIGUSR1 forwarded to every rank: each writes its flight recorder \
                          (RANKMESH_FLIGHT_DIR, default the temporary directory)").await;
            },
            _ = tick.tick() => {
                let now = Instant::now();
                if forming && !quiet && bar.is_none() && matches!(job.state, State::Running) {
                    let due = match last_progress {
                        None => t0.elapsed() >= Duration::from_secs(1),
                        Some(t) => now - t >= Duration::from_secs(10),
                    };
                    if due {
                        last_progress = Some(now);
                        let joined = joined_rx.borrow().clone();
                        job.note(job.progress(&joined)).await;
                    }
                }
                if let (Some(t), State::Running) = (timeout, &job.state) {
                    if t0.elapsed() >= t {
                        let why = format!("the job ran longer than --timeout {t:?}");
                        job.first_failure = Some(why.clone());
                        job.code = Some(TIMEOUT_CODE);
                        job.end(libc::SIGTERM, &why).await;
                    }
                }
                if let State::Ending { kill_at, killed: false } = job.state {
                    if now >= kill_at {
                        let n = job.running();
                        job.note(format!(
                            "{n} process(es) still running after the {:?} grace period; sending SIGKILL",
                            job.grace
                        )).await;
                        job.kill_all();
                    }
                }
            },
        }
    }
    if let Some(b) = &bar {
        b.finish_and_clear();
    }

    // Let the output drain; processes that left the rank's process group
    // may hold its pipes open, so do not wait for them forever.
    let drain = async {
        for p in pumps {
            let _ = p.await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(3), drain).await;

    let code = job.code.unwrap_or_else(|| {
        // An elastic job whose lost ranks were tolerated succeeded if some
        // process finished; if every process was lost, the first loss's
        // code. (A rank that exits with an error sets `job.code`.)
        let ok = job
            .procs
            .iter()
            .any(|p| p.status.is_some_and(|s| s.success()));
        match job
            .procs
            .iter()
            .find_map(|p| p.status.filter(|s| !s.success()))
        {
            Some(st) if !ok => code_of(&st),
            _ => 0,
        }
    });
    let wall = t0.elapsed().as_secs_f64();
    if !quiet || code != 0 {
        summary(&job, &job_id, wall, code).await;
    }
    drop(job);
    drop(tx);
    let _ = tokio::task::spawn_blocking(move || writer.join()).await;
    if let Some(s) = &seed {
        s.shutdown().await;
    }
    token_dir.remove();
    code
}

async fn on_signal(job: &mut Job, sig: i32, count: u32) -> u32 {
    if count == 0 {
        if job.code.is_none() {
            job.code = Some(128 + sig);
            job.first_failure = Some(format!("rankrun received {}", signame(sig)));
        }
        let n = job.running();
        job.note(format!(
            "received {}; forwarding it to {n} process(es) (again to kill them now)",
            signame(sig)
        ))
        .await;
        for p in &job.procs {
            p.signal(sig);
        }
        job.state = State::Ending {
            kill_at: Instant::now() + job.grace,
            killed: false,
        };
    } else {
        job.note(format!("received {} again; sending SIGKILL", signame(sig)))
            .await;
        job.kill_all();
    }
    count + 1
}

async fn summary(job: &Job, job_id: &str, wall: f64, code: i32) {
    let n = job.procs.len();
    let all_ok = code == 0
        && job
            .procs
            .iter()
            .all(|p| p.status.is_some_and(|s| s.success()));
    if all_ok {
        job.note(format!(
            "job {job_id}: all {n} process(es) exited with code 0 in {wall:.1}s"
        ))
        .await;
        return;
    }
    job.note(format!(
        "job {job_id} ended after {wall:.1}s with exit code {code}; first failure: {}",
        job.first_failure.as_deref().unwrap_or("none")
    ))
    .await;
    for p in job.procs.iter().take(64) {
        let st = match p.status {
            None => "did not exit".to_string(),
            Some(s) if p.after_end && !s.success() => {
                format!("{} (ended by rankrun)", describe(&s, p.remote))
            }
            Some(s) => describe(&s, p.remote),
        };
        job.note(format!("  {}: {st}", p.who())).await;
    }
    if n > 64 {
        job.note(format!("  ... and {} more", n - 64)).await;
    }
}
