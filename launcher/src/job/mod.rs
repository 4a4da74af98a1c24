//! Running a job: seed, processes, output, failures, signals, summary.

mod events;

use events::Run;

use crate::cli::{Mode, Plan};
use crate::launch::{
    announce, command, contract_env, labels, seed_side, signals, sinks, write_token_file, Label,
    SeedSide, Signals, TokenDir,
};
use crate::output::{self, Msg, Tx};
use crate::place::{self, Placement};
use std::io::IsTerminal;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::process::ChildStdin;
use tokio::sync::mpsc;

/// Exit code when `--timeout` or `--join-timeout` ends the job.
const TIMEOUT_CODE: i32 = 124;
/// Exit code when a rank cannot be started.
const SPAWN_CODE: i32 = 127;
/// Exit code for setup errors (like a bad command line).
pub(crate) const SETUP_CODE: i32 = 2;

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

type Exits = mpsc::UnboundedSender<(usize, std::io::Result<ExitStatus>)>;

/// Start every process (stopping at the first that cannot be started, with
/// the job's code set); returns the tasks pumping their output.
async fn start_all(
    job: &mut Job,
    plan: &Plan,
    side: &SeedSide,
    labels: &[Label],
    token_file: Option<&std::path::Path>,
    exits: &Exits,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut pumps = Vec::new();
    for (idx, label) in labels.iter().enumerate() {
        let placement = job.placements.get(idx).cloned();
        let env = contract_env(plan, side, label, placement.as_ref());
        let remote = placement.as_ref().is_some_and(|p| !p.local);
        let mut cmd = match command(plan, side, &env, &label.host, remote, token_file) {
            Ok(c) => c,
            Err(e) => {
                job.note(e).await;
                job.code = Some(SETUP_CODE);
                break;
            }
        };
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                let (name, host) = (&label.name, &label.host);
                let what = if remote {
                    format!(
                        "cannot start the launch agent for {name} on {host} ({}): {e}",
                        plan.cli.launch_agent
                    )
                } else {
                    format!(
                        "cannot start {name} on {host} ({:?}): {e}",
                        plan.command_program()
                    )
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
            let _ = i
                .write_all(format!("{}\n", side.token_hex).as_bytes())
                .await;
            let _ = i.flush().await;
        }
        if let Some(o) = child.stdout.take() {
            pumps.push(tokio::spawn(output::pump(o, idx, false, job.tx.clone())));
        }
        if let Some(e) = child.stderr.take() {
            pumps.push(tokio::spawn(output::pump(e, idx, true, job.tx.clone())));
        }
        let etx = exits.clone();
        tokio::spawn(async move {
            let st = child.wait().await;
            let _ = etx.send((idx, st));
        });
        job.procs.push(Proc {
            label: label.name.clone(),
            rank: label.rank,
            host: label.host.clone(),
            remote,
            pid,
            stdin,
            status: None,
            after_end: false,
        });
    }
    pumps
}

/// Run the job; returns rankrun's exit code.
pub async fn run(plan: Plan) -> i32 {
    let t0 = Instant::now();
    let placements = match &plan.mode {
        Mode::Hosts(h) => place::place(h, plan.np),
        Mode::Slurm => Vec::new(),
    };
    let side = match seed_side(&plan, &placements) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("rankrun: error: {e}");
            return SETUP_CODE;
        }
    };
    let any_local = matches!(plan.mode, Mode::Hosts(_)) && placements.iter().any(|p| p.local);
    let mut token_dir = TokenDir(None);
    let token_file = if any_local {
        match write_token_file(&side.job_id.replace(['(', ')'], ""), &side.token_hex) {
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
    let labels = labels(&plan, &placements);
    let (sigs, sinks) = match signals().and_then(|s| Ok((s, sinks(&plan, &labels)?))) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("rankrun: error: {e}");
            return SETUP_CODE;
        }
    };
    let (tx, writer) = output::start(sinks);
    let mut job = Job {
        procs: Vec::new(),
        placements: placements.clone(),
        tx: tx.clone(),
        state: State::Running,
        code: None,
        first_failure: None,
        grace: plan.cli.grace,
        elastic: plan.cli.elastic.is_some() || plan.cli.join.is_some(),
        formed: plan.cli.join.is_some(),
    };
    if !plan.cli.quiet {
        job.note(announce(&plan, &side, &placements)).await;
    }
    let (exit_tx, exit_rx) = mpsc::unbounded_channel();
    let pumps = start_all(
        &mut job,
        &plan,
        &side,
        &labels,
        token_file.as_deref(),
        &exit_tx,
    )
    .await;
    drop(exit_tx);
    if job.code.is_some() {
        job.end(libc::SIGTERM, "not every rank could be started")
            .await;
    }
    let mut run = Run {
        forming: job.code.is_none() && side.seed.is_some(),
        job,
        np: plan.np,
        quiet: plan.cli.quiet,
        t0,
        join_timeout: plan.cli.join_timeout,
        timeout: plan.cli.timeout,
        last_progress: None,
        bar: None,
        token_dir,
        signals: 0,
    };
    run.event_loop(&side, sigs, exit_rx).await;

    // Let the output drain; processes that left the rank's process group
    // may hold its pipes open, so do not wait for them forever.
    let drain = async {
        for p in pumps {
            let _ = p.await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(3), drain).await;
    let Run {
        job, mut token_dir, ..
    } = run;
    let code = exit_code(&job);
    let wall = t0.elapsed().as_secs_f64();
    if !plan.cli.quiet || code != 0 {
        summary(&job, &side.job_id, wall, code).await;
    }
    drop(job);
    drop(tx);
    let _ = tokio::task::spawn_blocking(move || writer.join()).await;
    if let Some(s) = &side.seed {
        s.shutdown().await;
    }
    token_dir.remove();
    code
}

/// rankrun's exit code once every process ended.
fn exit_code(job: &Job) -> i32 {
    job.code.unwrap_or_else(|| {
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
    })
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
