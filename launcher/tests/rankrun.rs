//! rankrun end to end: real processes, real signals, real network
//! namespaces (root only).
//!
//! Rank programs: the root package's `hello` example when it was built
//! (`cargo test --workspace` builds it), else this package's `probe`
//! example (built by `cargo test` for this package), and `sh -c` scripts.

use std::io::Write as _;
use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Generous: the CI machine may be small and busy.
const LIMIT: Duration = Duration::from_secs(120);

fn rankrun() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_rankrun"));
    c.env_remove("SLURM_JOB_ID");
    c
}

fn examples_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_rankrun"))
        .parent()
        .expect("rankrun has a directory")
        .join("examples")
}

fn probe() -> PathBuf {
    let p = examples_dir().join("probe");
    assert!(
        p.exists(),
        "{} is missing: run the tests with `cargo test` (which builds this package's examples)",
        p.display()
    );
    p
}

/// The root package's hello example, or probe (same ring) when it was not
/// built.
fn hello() -> PathBuf {
    let p = examples_dir().join("hello");
    if p.exists() {
        p
    } else {
        eprintln!(
            "NOTE: {} not built (run `cargo test --workspace`); using the probe example",
            p.display()
        );
        probe()
    }
}

/// Wait for `child`, killing it and failing the test after `limit`.
fn wait_limited(mut child: Child, limit: Duration) -> Output {
    let t0 = Instant::now();
    let mut out = child.stdout.take();
    let mut err = child.stderr.take();
    let ho = std::thread::spawn(move || {
        let mut v = Vec::new();
        if let Some(o) = &mut out {
            let _ = o.read_to_end(&mut v);
        }
        v
    });
    let he = std::thread::spawn(move || {
        let mut v = Vec::new();
        if let Some(e) = &mut err {
            let _ = e.read_to_end(&mut v);
        }
        v
    });
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return Output {
                status,
                stdout: ho.join().unwrap_or_default(),
                stderr: he.join().unwrap_or_default(),
            };
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "rankrun did not finish within {limit:?}; stderr so far:\n{}",
                String::from_utf8_lossy(&he.join().unwrap_or_default())
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn run(cmd: &mut Command) -> (Output, Duration) {
    let t0 = Instant::now();
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start rankrun");
    let out = wait_limited(child, LIMIT);
    (out, t0.elapsed())
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn pids(stdout: &str) -> Vec<i32> {
    stdout
        .lines()
        .filter_map(|l| l.split("pid=").nth(1))
        .filter_map(|p| p.trim().parse().ok())
        .collect()
}

/// Gone: no such process, or a zombie waiting for a reaper (in containers
/// PID 1 may never reap orphans).
fn gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(s) => s
            .rsplit_once(')')
            .map(|(_, rest)| rest.trim_start().starts_with('Z'))
            .unwrap_or(false),
    }
}

fn assert_all_gone(pids: &[i32]) {
    let t0 = Instant::now();
    for &p in pids {
        while !gone(p) {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "process {p} survived the job"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

#[test]
fn four_ranks_ring_tagged_lines() {
    let (out, _) = run(rankrun().arg("-n").arg("4").arg(hello()));
    let (so, se) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "stdout:\n{so}\nstderr:\n{se}");
    for r in 0..4 {
        let tag = format!("[{r}] ");
        let lines: Vec<&str> = so
            .lines()
            .filter(|l| l.starts_with(&tag) && l.contains("token"))
            .collect();
        assert_eq!(lines.len(), 1, "rank {r}: {so}");
        assert!(lines[0].contains(&format!("rank {r}/4")), "{so}");
        // The ring passes a token through all four ranks.
        if r == 0 {
            assert!(lines[0].ends_with("token 4"), "{so}");
        }
        // hello also allreduces rank+1 over four ranks (probe does not print it).
        if lines[0].contains("allreduce") {
            assert!(lines[0].contains("allreduce 10,"), "{so}");
        }
    }
    assert!(
        so.lines().all(|l| l.starts_with('[')),
        "untagged line: {so}"
    );
    assert!(se.contains("all 4 process(es) exited with code 0"), "{se}");
}

#[test]
fn a_rank_exiting_7_ends_the_job_with_7() {
    let script =
        r#"echo pid=$$; if [ "$RANKMESH_RANK" = 2 ]; then sleep 1; exit 7; fi; exec sleep 1000"#;
    let (out, took) = run(rankrun()
        .args(["-n", "4", "--grace", "3", "sh", "-c"])
        .arg(script));
    let (so, se) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(7), "stdout:\n{so}\nstderr:\n{se}");
    assert!(took < Duration::from_secs(60), "took {took:?}");
    let ps = pids(&so);
    assert_eq!(ps.len(), 4, "{so}");
    let victim = so
        .lines()
        .find(|l| l.starts_with("[2] pid="))
        .and_then(|l| l.split("pid=").nth(1))
        .expect("rank 2's pid")
        .to_string();
    assert!(
        se.contains(&format!(
            "rank 2 (pid {victim} on localhost) exited with code 7"
        )),
        "{se}"
    );
    assert!(se.contains("first failure: rank 2"), "{se}");
    assert_all_gone(&ps);
}

#[test]
fn a_rank_killed_mid_loop_ends_the_job_with_137() {
    let (out, took) = run(rankrun()
        .args(["-n", "3", "--grace", "3"])
        .args(["-x", "PROBE=loop", "-x", "PROBE_VICTIM=1"])
        .arg(probe()));
    let (so, se) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(137), "stdout:\n{so}\nstderr:\n{se}");
    assert!(took < Duration::from_secs(60), "took {took:?}");
    assert!(so.contains("[1] rank 1: killing myself mid-loop"), "{so}");
    assert!(se.contains("was killed by SIGKILL"), "{se}");
    assert!(se.contains("first failure: rank 1 (pid"), "{se}");
    let ps = pids(&so);
    assert_eq!(ps.len(), 3, "{so}");
    assert_all_gone(&ps);
}

#[test]
fn sigint_to_rankrun_ends_every_rank() {
    let mut child = rankrun()
        .args([
            "-n",
            "3",
            "--grace",
            "3",
            "sh",
            "-c",
            "echo pid=$$; exec sleep 1000",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start rankrun");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut ps = Vec::new();
    while ps.len() < 3 {
        let l = lines
            .next()
            .expect("rankrun ended before every rank started")
            .expect("read");
        ps.extend(pids(&l));
    }
    // SAFETY: kill(2) on our own child's pid.
    let rc = unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    assert_eq!(rc, 0);
    std::thread::spawn(move || for _ in lines {});
    let out = wait_limited(child, LIMIT);
    let se = text(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{se}");
    assert!(se.contains("received SIGINT; forwarding it to 3"), "{se}");
    assert_all_gone(&ps);
}

#[test]
fn sigusr1_makes_every_rank_write_its_flight_recorder() {
    let dir = std::env::temp_dir().join(format!("rankrun-flight-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("tmp dir");
    let mut child = rankrun()
        .args(["-n", "2", "--grace", "2", "-x", "PROBE=hang", "-x"])
        .arg(format!("RANKMESH_FLIGHT_DIR={}", dir.display()))
        .arg(probe())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start rankrun");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    loop {
        let l = lines
            .next()
            .expect("rankrun ended before rank 0 hung")
            .expect("read");
        if l.contains("waiting in an allreduce") {
            break;
        }
    }
    std::thread::spawn(move || for _ in lines {});
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGUSR1) }, 0);
    let t0 = Instant::now();
    let files: Vec<PathBuf> = loop {
        let found: Vec<PathBuf> = std::fs::read_dir(&dir)
            .expect("read dir")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "txt"))
            .collect();
        if found.len() == 2 || t0.elapsed() > LIMIT {
            break found;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    // SAFETY: as above.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = wait_limited(child, LIMIT);
    let se = text(&out.stderr);
    assert_eq!(files.len(), 2, "{files:?}\n{se}");
    assert!(se.contains("SIGUSR1 forwarded to every rank"), "{se}");
    assert!(se.contains("flight recorder written to"), "{se}");
    let rank0 = files
        .iter()
        .find(|p| p.to_string_lossy().ends_with("-rank0.txt"))
        .expect("rank 0's file");
    let t = std::fs::read_to_string(rank0).expect("read");
    assert!(t.contains("reason: SIGUSR1"), "{t}");
    // Rank 0 is stuck in its 4th allreduce (#3); rank 1 last sent for #2.
    assert!(
        t.contains("all_reduce") && t.contains("#3") && t.contains("RUNNING"),
        "{t}"
    );
    assert!(t.contains("rank 1: #2"), "{t}");
    assert!(t.contains("send") && t.contains("done in"), "{t}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// On a terminal (here a pseudo-terminal from `script`), formation
/// progress is a bar that names the ranks still missing.
#[test]
fn formation_progress_is_a_bar_on_a_terminal() {
    let cmd = format!(
        "'{}' -n 2 sh -c 'sleep $((RANKMESH_RANK * 2)); exec \"$0\"' '{}'",
        env!("CARGO_BIN_EXE_rankrun"),
        probe().display()
    );
    let child = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .env_remove("SLURM_JOB_ID")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start script(1) (util-linux)");
    let out = wait_limited(child, LIMIT);
    let all = text(&out.stdout) + &text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{all}");
    assert!(all.contains("1/2 ranks joined; waiting for rank"), "{all}");
    assert!(
        all.contains("=>") || all.contains("=="),
        "no bar drawn: {all}"
    );
    assert!(all.contains("all 2 ranks joined"), "{all}");
}

/// Start an elastic job's rankrun; returns it, its seed's address (from its
/// first line) and a thread collecting the rest of its stderr.
fn start_elastic(cmd: &mut Command) -> (Child, String, std::thread::JoinHandle<String>) {
    let mut job = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start rankrun");
    let mut err = BufReader::new(job.stderr.take().expect("stderr")).lines();
    let first = err.next().expect("rankrun said nothing").expect("read");
    let addr = first
        .split("seed at ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap_or_else(|| panic!("no seed address in {first:?}"))
        .to_string();
    let errs = std::thread::spawn(move || err.map_while(|l| l.ok()).collect::<Vec<_>>().join("\n"));
    (job, addr, errs)
}

/// The pids in lines `pid N: ...` of `text`, per line prefix.
fn elastic_pids(text: &str, what: &str) -> Vec<u32> {
    let mut v: Vec<u32> = text
        .lines()
        .filter(|l| l.contains(what))
        .filter_map(|l| {
            l.split("pid ")
                .nth(1)?
                .split(':')
                .next()?
                .trim()
                .parse()
                .ok()
        })
        .collect();
    v.sort_unstable();
    v
}

#[test]
fn an_elastic_job_grows_from_2_to_4_ranks_without_restarting_anyone() {
    let dir = std::env::temp_dir().join(format!("rankrun-elastic-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("tmp dir");
    let tok = dir.join("token");
    let (job, addr, errs) = start_elastic(
        rankrun()
            .args(["--elastic", "2:4", "-n", "2", "--token-file"])
            .arg(&tok)
            .args(["-x", "PROBE=elastic", "-x", "PROBE_TARGET=4"])
            .arg(probe()),
    );
    // While the job waits for more ranks, a joiner with a wrong token is
    // refused; the job is not affected.
    std::fs::write(dir.join("bad"), "00".repeat(32)).expect("bad token");
    let (bad, _) = run(rankrun()
        .args(["--join", &addr, "-n", "1", "--token-file"])
        .arg(dir.join("bad"))
        .args(["-x", "PROBE=elastic"])
        .arg(probe()));
    assert_ne!(bad.status.code(), Some(0));
    let be = text(&bad.stdout) + &text(&bad.stderr);
    assert!(be.contains("token"), "{be}");
    let (joiners, _) = run(rankrun()
        .args(["--join", &addr, "-n", "2", "--token-file"])
        .arg(&tok)
        .args(["-x", "PROBE=elastic", "-x", "PROBE_TARGET=4"])
        .arg(probe()));
    let out = wait_limited(job, LIMIT);
    let (so, je) = (text(&out.stdout), text(&joiners.stdout));
    let se = errs.join().unwrap_or_default();
    assert_eq!(out.status.code(), Some(0), "{so}\n{se}");
    assert_eq!(
        joiners.status.code(),
        Some(0),
        "{je}\n{}",
        text(&joiners.stderr)
    );
    // The two original processes started, grew and finished as the same
    // processes (same pids), now ranks 0 and 1 of 4.
    let started = elastic_pids(&so, "start as rank");
    assert_eq!(started.len(), 2, "{so}");
    assert_eq!(elastic_pids(&so, "/4 (was Some("), started, "{so}");
    assert_eq!(elastic_pids(&so, "done as rank"), started, "{so}");
    assert!(
        so.contains("done as rank 0/4") && so.contains("done as rank 1/4"),
        "{so}"
    );
    // The joiners got the state and became ranks 2 and 3.
    assert!(
        je.contains("start as rank 2/4") && je.contains("start as rank 3/4"),
        "{je}"
    );
    assert!(je.contains("(state \"epoch 1\")"), "{je}");
    assert!(
        je.contains("done as rank 2/4") && je.contains("done as rank 3/4"),
        "{je}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_elastic_job_goes_on_without_a_sigkilled_rank() {
    let t0 = Instant::now();
    let (out, _) = run(rankrun()
        .args(["--elastic", "3:4", "-n", "4"])
        .args([
            "-x",
            "PROBE=elastic",
            "-x",
            "PROBE_TARGET=4",
            "-x",
            "PROBE_VICTIM=3",
        ])
        .args(["-x", "RANKMESH_IDLE_TIMEOUT=2"])
        .arg(probe()));
    let (so, se) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{so}\n{se}");
    assert!(
        se.contains("was killed by SIGKILL; elastic job: the other ranks continue"),
        "{se}"
    );
    // The ranks share this host: the killed rank's same-host channel ends
    // at once, long before the 2 s idle timeout.
    assert!(
        so.contains("its same-host channel closed without a goodbye"),
        "{so}"
    );
    for r in 0..3 {
        assert!(
            so.contains(&format!("recovered as rank {r}/3 in epoch 2 (left [3])")),
            "{so}"
        );
        assert!(so.contains(&format!("done as rank {r}/3")), "{so}");
    }
    assert!(t0.elapsed() < LIMIT);
}

/// The loss curve lines (`train_mse X  test_rmse Y`) of rank 0's output.
fn loss_curve(text: &str) -> Vec<(f64, f64)> {
    text.lines()
        .filter(|l| l.contains("train_mse") && l.starts_with("[0]"))
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            let at = |k: &str| {
                w.iter()
                    .position(|x| *x == k)
                    .and_then(|i| w.get(i + 1)?.parse().ok())
            };
            Some((at("train_mse")?, at("test_rmse")?))
        })
        .collect()
}

/// The training example, elastic, on 4 ranks; rank 3 SIGKILLs itself after
/// step 12: the three survivors go back to the checkpoint of step 10,
/// re-shard the data and finish, with the loss curve of an uninterrupted
/// 4-rank run (to the 4 printed decimals).
#[test]
fn elastic_training_survives_a_sigkilled_rank_with_an_unchanged_loss_curve() {
    let train = examples_dir().join("train");
    assert!(
        train.exists(),
        "{} is missing: run `cargo test --workspace` (it builds the examples)",
        train.display()
    );
    let flags = ["--epochs", "3", "--checkpoint-every", "5", "--hidden", "16"];
    let (plain, _) = run(rankrun().args(["-n", "4"]).arg(&train).args(flags));
    assert_eq!(plain.status.code(), Some(0), "{}", text(&plain.stderr));
    let (el, _) = run(rankrun()
        .args([
            "--elastic",
            "3:4",
            "-n",
            "4",
            "-x",
            "RANKMESH_IDLE_TIMEOUT=2",
        ])
        .arg(&train)
        .args(flags)
        .args(["--elastic", "--die", "3@12"]));
    let (so, se) = (text(&el.stdout), text(&el.stderr));
    assert_eq!(el.status.code(), Some(0), "{so}\n{se}");
    assert!(se.contains("rank 3") && se.contains("SIGKILL"), "{se}");
    assert!(so.contains("continuing on 3 rank(s) from step 10"), "{so}");
    let (a, b) = (loss_curve(&text(&plain.stdout)), loss_curve(&so));
    assert_eq!(a.len(), 3, "{}", text(&plain.stdout));
    assert_eq!(b.len(), 3, "{so}");
    for ((m1, r1), (m2, r2)) in a.iter().zip(&b) {
        assert!(
            (m1 - m2).abs() <= 2e-4 && (r1 - r2).abs() <= 2e-4,
            "{a:?} vs {b:?}"
        );
    }
}

/// Ten times, a process joins a 2-rank elastic job (3 ranks) and leaves
/// again (2 ranks); the original processes neither restart nor grow.
#[test]
fn ten_grow_and_shrink_cycles_with_real_processes_leak_nothing() {
    let dir = std::env::temp_dir().join(format!("rankrun-cycles-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("tmp dir");
    let tok = dir.join("token");
    let (job, addr, errs) = start_elastic(
        rankrun()
            .args(["--elastic", "2:3", "-n", "2", "--token-file"])
            .arg(&tok)
            .args([
                "-x",
                "PROBE=cycles",
                "-x",
                "PROBE_CYCLES=10",
                "-x",
                "RANKMESH_IDLE_TIMEOUT=2",
            ])
            .arg(probe()),
    );
    for i in 0..10 {
        // Each joiner starts shortly after the previous one left: the seed
        // must have seen that departure, else the job is still full (at
        // most 3 ranks) and refuses the newcomer.
        std::thread::sleep(Duration::from_millis(500));
        let (j, _) = run(rankrun()
            .args(["--join", &addr, "-n", "1", "--token-file"])
            .arg(&tok)
            .args(["-x", "PROBE=cycles"])
            .arg(probe()));
        let jt = text(&j.stdout);
        if j.status.code() != Some(0) || !jt.contains("allreduce ok as rank 2/3") {
            // Show what the job itself said.
            let mut job = job;
            let _ = job.kill();
            let out = wait_limited(job, LIMIT);
            panic!(
                "joiner {i} failed: {jt}\n{}\n--- the job's stdout:\n{}\n--- its stderr:\n{}",
                text(&j.stderr),
                text(&out.stdout),
                errs.join().unwrap_or_default()
            );
        }
    }
    let out = wait_limited(job, LIMIT);
    let so = text(&out.stdout);
    let se = errs.join().unwrap_or_default();
    assert_eq!(out.status.code(), Some(0), "{so}\n{se}");
    // (fds, KiB, pid) of rank 0 after cycles 1 and 9.
    let at = |c: usize| -> (usize, u64, u32) {
        let l = so
            .lines()
            .find(|l| l.contains(&format!("cycle {c}: ")))
            .unwrap_or_else(|| panic!("no cycle {c} line in {so}"));
        let w: Vec<&str> = l.split_whitespace().collect();
        let num = |k: &str| -> u64 {
            w.iter()
                .position(|x| x.trim_end_matches(',') == k)
                .and_then(|i| w.get(i - 1)?.parse().ok())
                .unwrap_or_else(|| panic!("no {k} in {l:?}"))
        };
        let pid = w.last().and_then(|p| p.parse().ok()).expect("pid");
        (num("fds") as usize, num("KiB"), pid)
    };
    let (fds1, rss1, pid1) = at(1);
    let (fds9, rss9, pid9) = at(9);
    eprintln!(
        "rank 0 after cycle 1: {fds1} fds, {rss1} KiB; after cycle 9: {fds9} fds, {rss9} KiB"
    );
    assert_eq!(pid1, pid9, "rank 0 was restarted");
    assert!(fds9 <= fds1 + 2, "file descriptors grew: {fds1} -> {fds9}");
    assert!(
        rss9 <= rss1 + 8 * 1024,
        "resident memory grew: {rss1} -> {rss9} KiB"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn join_timeout_names_the_missing_rank_and_host() {
    let script = format!(
        r#"if [ "$RANKMESH_RANK" = 2 ]; then exec sleep 1000; else exec '{}'; fi"#,
        hello().display()
    );
    let (out, _) = run(rankrun()
        .args(["-n", "3", "--join-timeout", "4", "--grace", "2", "sh", "-c"])
        .arg(script));
    let se = text(&out.stderr);
    assert_eq!(out.status.code(), Some(124), "{se}");
    assert!(
        se.contains("formation failed after --join-timeout 4s")
            && se.contains("waiting for rank(s) [2] on localhost"),
        "{se}"
    );
}

#[test]
fn environment_quoting_env_files_output_dir_and_quiet() {
    let dir = std::env::temp_dir().join(format!("rankrun-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("tmp dir");
    let envf = dir.join("env");
    std::fs::write(&envf, "# comment\nexport FROM_FILE=\"file value\"\n").expect("env file");
    let outdir = dir.join("out");
    let (out, _) = run(rankrun()
        .args(["-n", "2", "-q", "-x", "V=it's \"quoted\" $HOME"])
        .arg("--env-file")
        .arg(&envf)
        .arg("--output-dir")
        .arg(&outdir)
        .args([
            "sh",
            "-c",
            r#"printf '%s|%s|%s|%s\n' "$V" "$FROM_FILE" "$RANK" "$LOCAL_RANK"; [ -z "$RANKMESH_TOKEN" ] && [ -r "$RANKMESH_TOKEN_FILE" ] && echo token-in-file; printf partial"#,
        ]));
    let (so, se) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{so}\n{se}");
    assert!(
        so.contains("it's \"quoted\" $HOME|file value|0|0\n"),
        "{so}"
    );
    assert!(
        so.contains("it's \"quoted\" $HOME|file value|1|1\n"),
        "{so}"
    );
    assert_eq!(so.matches("token-in-file\n").count(), 2, "{so}");
    // Partial last lines come out whole, untagged under --quiet.
    assert_eq!(so.matches("partial\n").count(), 2, "{so}");
    assert!(!so.contains('['), "{so}");
    assert!(se.is_empty(), "--quiet: {se}");
    let f = std::fs::read_to_string(outdir.join("rank.1.log")).expect("rank.1.log");
    assert!(f.starts_with("it's"), "{f}");
    assert!(f.ends_with("partial\n"), "{f}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_command_lines_exit_2_with_one_line() {
    let dir = std::env::temp_dir();
    let cases: Vec<Vec<String>> = vec![
        vec!["--no-such-flag".into(), "true".into()],
        vec!["-n".into(), "0".into(), "true".into()],
        vec!["-n".into(), "2".into()],
        vec![],
        vec![
            "--hostfile".into(),
            dir.join("rankrun-no-such-hostfile").display().to_string(),
            "true".into(),
        ],
        vec!["-n".into(), "x".into(), "true".into()],
        vec![
            "-n".into(),
            "3".into(),
            "--host".into(),
            "a:1".into(),
            "true".into(),
        ],
        vec![
            "-x".into(),
            "NOT_SET_ANYWHERE_4711".into(),
            "-n".into(),
            "1".into(),
            "true".into(),
        ],
        vec![
            "--grace".into(),
            "-1".into(),
            "-n".into(),
            "1".into(),
            "true".into(),
        ],
    ];
    for args in cases {
        let (out, _) = run(rankrun().args(&args).env_remove("NOT_SET_ANYWHERE_4711"));
        let se = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {se}");
        assert_eq!(se.lines().count(), 1, "{args:?}: {se}");
        assert!(se.starts_with("rankrun: error: "), "{args:?}: {se}");
        assert!(!se.contains("panicked"), "{args:?}: {se}");
    }
    let (out, _) = run(rankrun().arg("--help"));
    assert_eq!(out.status.code(), Some(0));
    assert!(text(&out.stdout).contains("--launch-agent"));
}

/// Two network namespaces joined by a veth pair; rankrun runs in the first
/// and reaches both through `ip netns exec` as its launch agent.
struct Netns {
    names: [String; 2],
}

impl Netns {
    fn ip(args: &[&str]) {
        let out = Command::new("ip").args(args).output().expect("run ip");
        assert!(
            out.status.success(),
            "ip {}: {}",
            args.join(" "),
            text(&out.stderr)
        );
    }

    fn new() -> Netns {
        let id = std::process::id() % 100_000;
        let a = format!("rmA{id}");
        let b = format!("rmB{id}");
        let n = Netns {
            names: [a.clone(), b.clone()],
        };
        let (va, vb) = (format!("vA{id}"), format!("vB{id}"));
        Self::ip(&["netns", "add", &a]);
        Self::ip(&["netns", "add", &b]);
        Self::ip(&["link", "add", &va, "type", "veth", "peer", "name", &vb]);
        Self::ip(&["link", "set", &va, "netns", &a]);
        Self::ip(&["link", "set", &vb, "netns", &b]);
        Self::ip(&["-n", &a, "addr", "add", "10.213.7.1/24", "dev", &va]);
        Self::ip(&["-n", &b, "addr", "add", "10.213.7.2/24", "dev", &vb]);
        for (ns, v) in [(&a, &va), (&b, &vb)] {
            Self::ip(&["-n", ns, "link", "set", "lo", "up"]);
            Self::ip(&["-n", ns, "link", "set", v, "up"]);
        }
        n
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = Command::new("ip").args(["netns", "del", n]).output();
        }
    }
}

#[test]
fn four_ranks_across_two_network_namespaces() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        let _ = writeln!(
            std::io::stderr(),
            "\n\n*** SKIPPED four_ranks_across_two_network_namespaces: needs root \
             (ip netns); CI runs it as root ***\n"
        );
        return;
    }
    let ns = Netns::new();
    let hosts = format!("{}:2,{}:2", ns.names[0], ns.names[1]);
    let (out, _) = run(Command::new("ip")
        .args(["netns", "exec", &ns.names[0]])
        .arg(env!("CARGO_BIN_EXE_rankrun"))
        .args(["--host", &hosts, "--tag-output=host"])
        .args(["--launch-agent", "ip netns exec {host} sh -c"])
        .args(["--seed-addr", "10.213.7.1", "--join-timeout", "60"])
        .arg(hello()));
    let (so, se) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "stdout:\n{so}\nstderr:\n{se}");
    for (r, host) in [(0, 0), (1, 0), (2, 1), (3, 1)] {
        let tag = format!("[{}:{r}] ", ns.names[host]);
        assert!(
            so.lines()
                .any(|l| l.starts_with(&tag) && l.contains(&format!("rank {r}/4"))),
            "{tag}: {so}"
        );
    }
    assert!(so.contains("token 4"), "{so}");
    assert!(se.contains("all 4 process(es) exited with code 0"), "{se}");
}
