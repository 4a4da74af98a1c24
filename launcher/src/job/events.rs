//! The running job's event loop: process exits, formation progress,
//! signals and the clock, each with its handler on [`Run`].

use super::*;

/// The running job and what its event loop watches besides the processes.
pub(super) struct Run {
    pub(super) job: Job,
    pub(super) np: usize,
    pub(super) quiet: bool,
    pub(super) t0: Instant,
    pub(super) join_timeout: Duration,
    pub(super) timeout: Option<Duration>,
    /// Formation is still being watched.
    pub(super) forming: bool,
    /// When the last progress line was written (no progress bar).
    pub(super) last_progress: Option<Instant>,
    /// The progress bar, on a terminal.
    pub(super) bar: Option<indicatif::ProgressBar>,
    pub(super) token_dir: TokenDir,
    /// Ending signals received so far.
    pub(super) signals: u32,
}

impl Run {
    /// Until every process ended: exits, formation, signals, the clock.
    pub(super) async fn event_loop(
        &mut self,
        side: &SeedSide,
        mut sigs: Signals,
        mut exits: mpsc::UnboundedReceiver<(usize, std::io::Result<ExitStatus>)>,
    ) {
        let mut joined_rx = match &side.seed {
            Some(s) => s.joined_ranks(),
            None => tokio::sync::watch::channel(Vec::new()).1,
        };
        let formed = async {
            match &side.seed {
                Some(s) => s.wait_formed().await.is_ok(),
                None => std::future::pending().await,
            }
        };
        tokio::pin!(formed);
        // On a terminal, formation progress is a bar; otherwise plain lines.
        self.bar = (self.forming && !self.quiet && std::io::stderr().is_terminal())
            .then(|| progress_bar(self.np));
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        while self.job.running() > 0 {
            tokio::select! {
                ev = exits.recv() => match ev {
                    Some((idx, st)) => self.job.exited(idx, st).await,
                    None => break,
                },
                ok = &mut formed, if self.forming => {
                    let joined = joined_rx.borrow().clone();
                    self.handle_formed(ok, &joined, side).await;
                }
                ch = joined_rx.changed(), if self.forming => {
                    if ch.is_err() {
                        self.forming = false;
                    } else {
                        self.handle_joined(&mut joined_rx).await;
                    }
                }
                _ = sigs.int.recv() => self.handle_signal(libc::SIGINT).await,
                _ = sigs.term.recv() => self.handle_signal(libc::SIGTERM).await,
                _ = sigs.hup.recv() => self.handle_signal(libc::SIGHUP).await,
                _ = sigs.usr1.recv() => self.handle_usr1().await,
                _ = tick.tick() => self.handle_tick(&joined_rx).await,
            }
        }
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }

    async fn handle_formed(&mut self, ok: bool, joined: &[usize], side: &SeedSide) {
        self.forming = false;
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
        if ok {
            self.job.formed = true;
            self.token_dir.remove();
            if !self.quiet {
                self.job
                    .note(format!(
                        "all {} ranks joined; job {} formed in {:.1}s",
                        self.np,
                        side.job_id,
                        self.t0.elapsed().as_secs_f64()
                    ))
                    .await;
            }
        } else if matches!(self.job.state, State::Running) {
            let why = format!(
                "formation failed after --join-timeout {:?}: {}; those ranks never reached the \
                 seed at {} (did they start? can they reach it? does PROGRAM call \
                 rankmesh::init?)",
                self.join_timeout,
                self.job.progress(joined),
                side.addr
            );
            self.job.first_failure = Some(why.clone());
            self.job.code = Some(TIMEOUT_CODE);
            self.job.note(why).await;
            self.job.end(libc::SIGTERM, "ending the job").await;
        }
    }

    async fn handle_joined(&mut self, rx: &mut tokio::sync::watch::Receiver<Vec<usize>>) {
        if let Some(b) = &self.bar {
            let joined = rx.borrow_and_update().clone();
            b.set_position(joined.len() as u64);
            if joined.len() < self.np {
                b.set_message(format!("waiting for rank(s) {}", self.job.missing(&joined)));
            }
        } else if !self.quiet
            && self.t0.elapsed() >= Duration::from_secs(1)
            && matches!(self.job.state, State::Running)
        {
            let joined = rx.borrow_and_update().clone();
            if joined.len() < self.np {
                self.last_progress = Some(Instant::now());
                self.job.note(self.job.progress(&joined)).await;
            }
        }
    }

    async fn handle_signal(&mut self, sig: i32) {
        self.signals = on_signal(&mut self.job, sig, self.signals).await;
    }

    /// SIGUSR1 is not an ending: every rank writes its flight recorder.
    /// Only once the job formed: a rank that has not reached
    /// rankmesh::init yet would die of it.
    async fn handle_usr1(&self) {
        if !self.job.formed {
            self.job
                .note("SIGUSR1 not forwarded: the job has not formed yet")
                .await;
            return;
        }
        for p in &self.job.procs {
            p.signal(libc::SIGUSR1);
        }
        self.job
            .note(
                "SIGUSR1 forwarded to every rank: each writes its flight recorder \
                 (RANKMESH_FLIGHT_DIR, default the temporary directory)",
            )
            .await;
    }

    /// Progress lines while forming, `--timeout`, and SIGKILL after the
    /// grace period.
    async fn handle_tick(&mut self, joined: &tokio::sync::watch::Receiver<Vec<usize>>) {
        let now = Instant::now();
        if self.forming
            && !self.quiet
            && self.bar.is_none()
            && matches!(self.job.state, State::Running)
        {
            let due = match self.last_progress {
                None => self.t0.elapsed() >= Duration::from_secs(1),
                Some(t) => now - t >= Duration::from_secs(10),
            };
            if due {
                self.last_progress = Some(now);
                // The list is read only when a line is due (not every tick).
                let line = self.job.progress(&joined.borrow());
                self.job.note(line).await;
            }
        }
        if let (Some(t), State::Running) = (self.timeout, &self.job.state) {
            if self.t0.elapsed() >= t {
                let why = format!("the job ran longer than --timeout {t:?}");
                self.job.first_failure = Some(why.clone());
                self.job.code = Some(TIMEOUT_CODE);
                self.job.end(libc::SIGTERM, &why).await;
            }
        }
        if let State::Ending {
            kill_at,
            killed: false,
        } = self.job.state
        {
            if now >= kill_at {
                let n = self.job.running();
                self.job
                    .note(format!(
                        "{n} process(es) still running after the {:?} grace period; sending \
                         SIGKILL",
                        self.job.grace
                    ))
                    .await;
                self.job.kill_all();
            }
        }
    }
}

fn progress_bar(np: usize) -> indicatif::ProgressBar {
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
