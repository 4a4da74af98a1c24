//! rankrun under a real Slurm: a one-node cluster (munged, slurmctld,
//! slurmd) that the test configures in a temporary directory, starts, and
//! shuts down again, also when it fails. Root only (CI runs as root and
//! `.ci/run` installs slurm-wlm); without Slurm installed the test fails
//! when `CI=true` and skips otherwise.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and touches no memory.
    unsafe { libc::geteuid() == 0 }
}

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A one-node Slurm cluster; shut down on drop.
struct Cluster {
    dir: PathBuf,
    conf: PathBuf,
    munged: bool,
}

impl Cluster {
    fn start() -> Cluster {
        let dir = std::env::temp_dir().join(format!("rankmesh-slurm-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for d in ["state", "spool", "log"] {
            std::fs::create_dir_all(dir.join(d)).expect("slurm dirs");
        }
        let node = Command::new("slurmd")
            .arg("-C")
            .output()
            .expect("slurmd -C");
        let node = String::from_utf8_lossy(&node.stdout)
            .lines()
            .next()
            .unwrap_or_default()
            .to_string();
        assert!(node.starts_with("NodeName="), "slurmd -C: {node}");
        let name = node
            .split_whitespace()
            .next()
            .and_then(|t| t.strip_prefix("NodeName="))
            .unwrap_or("localhost")
            .to_string();
        let port = 40_000 + (std::process::id() % 10_000) as u16 * 2 % 10_000;
        let d = dir.display();
        let conf = dir.join("slurm.conf");
        std::fs::write(
            &conf,
            format!(
                "ClusterName=rankmesh\nSlurmctldHost={name}(127.0.0.1)\nSlurmUser=root\nSlurmdUser=root\n\
                 AuthType=auth/munge\nCredType=cred/munge\nMpiDefault=none\n\
                 ProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\n\
                 JobAcctGatherType=jobacct_gather/none\nAccountingStorageType=accounting_storage/none\n\
                 SchedulerType=sched/builtin\nSelectType=select/cons_tres\nSelectTypeParameters=CR_CPU\n\
                 ReturnToService=2\nSlurmctldPort={}\nSlurmdPort={}\n\
                 StateSaveLocation={d}/state\nSlurmdSpoolDir={d}/spool\n\
                 SlurmctldPidFile={d}/ctld.pid\nSlurmdPidFile={d}/d.pid\n\
                 SlurmctldLogFile={d}/log/ctld.log\nSlurmdLogFile={d}/log/d.log\n\
                 {node} NodeAddr=127.0.0.1 State=UNKNOWN\n\
                 PartitionName=debug Nodes={name} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES\n",
                port,
                port + 1
            ),
        )
        .expect("slurm.conf");
        let munged = !Command::new("pgrep")
            .arg("-x")
            .arg("munged")
            .output()
            .is_ok_and(|o| o.status.success());
        if munged {
            let _ = std::fs::create_dir_all("/run/munge");
            let out = Command::new("munged")
                .arg("--force")
                .output()
                .expect("munged");
            assert!(out.status.success(), "munged: {}", text(&out));
        }
        let c = Cluster { dir, conf, munged };
        for daemon in ["slurmctld", "slurmd"] {
            let out = c.cmd(daemon).arg("-f").arg(&c.conf).output().expect(daemon);
            assert!(out.status.success(), "{daemon}: {}", text(&out));
        }
        let t0 = Instant::now();
        loop {
            let out = c
                .cmd("sinfo")
                .args(["-h", "-o", "%t"])
                .output()
                .expect("sinfo");
            if String::from_utf8_lossy(&out.stdout).trim() == "idle" {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "the Slurm node never became idle: {}\n{}",
                text(&out),
                std::fs::read_to_string(c.dir.join("log/ctld.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        c
    }

    /// A Slurm command using this cluster's configuration.
    fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.env("SLURM_CONF", &self.conf)
            .env_remove("SLURM_JOB_ID")
            .stdin(Stdio::null());
        c
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.cmd("scontrol").arg("shutdown").output();
        std::thread::sleep(Duration::from_millis(500));
        for pidfile in ["ctld.pid", "d.pid"] {
            if let Ok(p) = std::fs::read_to_string(self.dir.join(pidfile)) {
                if let Ok(pid) = p.trim().parse::<i32>() {
                    // SAFETY: kill(2) on a daemon this test started.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        if self.munged {
            let _ = Command::new("pkill").args(["-x", "munged"]).output();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn probe() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_BIN_EXE_rankrun"))
        .parent()
        .expect("rankrun has a directory")
        .join("examples/probe");
    assert!(p.exists(), "{} is missing: run `cargo test`", p.display());
    p
}

fn limited(mut c: Command) -> Output {
    let child = c
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let pid = child.id() as i32;
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let d = done.clone();
    std::thread::spawn(move || {
        let t0 = Instant::now();
        while !d.load(std::sync::atomic::Ordering::Relaxed) {
            if t0.elapsed() > Duration::from_secs(120) {
                // SAFETY: kill(2) on our own child.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    let out = child.wait_with_output().expect("wait");
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    out
}

fn check_ring(out: &Output, n: usize) {
    let t = text(out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    for r in 0..n {
        // srun labels each task's lines `r: `; the token went once around
        // the ring (rank r saw r + 1, rank 0 the full circle).
        let token = if r == 0 { n } else { r + 1 };
        assert!(
            t.contains(&format!("{r}: rank {r}/{n}: token {token}")),
            "rank {r}'s line is missing:\n{t}"
        );
    }
}

#[test]
fn rankrun_places_ranks_with_srun_and_srun_alone_can_start_ranks() {
    if !is_root() {
        let _ = writeln!(
            std::io::stderr(),
            "\n*** SKIPPED: needs root (runs slurmctld/slurmd); CI runs as root ***\n"
        );
        return;
    }
    if !have("slurmctld") || !have("srun") || !have("munged") {
        assert!(
            std::env::var("CI").is_err(),
            "Slurm is not installed; .ci/run installs slurm-wlm"
        );
        let _ = writeln!(
            std::io::stderr(),
            "\n*** SKIPPED: Slurm is not installed (apt-get install slurm-wlm) ***\n"
        );
        return;
    }
    let cluster = Cluster::start();

    // 1. rankrun inside an allocation: ranks placed with srun, N from the
    //    allocation.
    let mut c = cluster.cmd("salloc");
    c.args(["-n", "3", "-O"])
        .arg(env!("CARGO_BIN_EXE_rankrun"))
        .arg(probe());
    let out = limited(c);
    check_ring(&out, 3);
    assert!(
        text(&out).contains("placing ranks with srun in the Slurm allocation"),
        "{}",
        text(&out)
    );

    // 2. No rankrun: a seed of our own, and srun starts the ranks, which
    //    take rank and world size from SLURM_PROCID / SLURM_NTASKS.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let seed = rt
        .block_on(async {
            let mut cfg = rankmesh::launch::SeedConfig::new(2);
            cfg.set_bind("0.0.0.0:0".parse().expect("addr"));
            rankmesh::launch::Seed::start(cfg)
        })
        .expect("seed");
    let port = seed.addr().expect("seed addr").port();
    let token_file = cluster.dir.join("token");
    write_secret(&token_file, &seed.token().to_hex());
    let mut c = cluster.cmd("srun");
    c.args(["-n", "2", "-O", "--label", "--kill-on-bad-exit=1"])
        .env("RANKMESH_SEED", format!("127.0.0.1:{port}"))
        .env("RANKMESH_TOKEN_FILE", &token_file)
        .arg(probe());
    let out = limited(c);
    check_ring(&out, 2);
    rt.block_on(seed.shutdown());
    drop(cluster);
}

fn write_secret(path: &Path, s: &str) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .expect("token file");
    f.write_all(s.as_bytes()).expect("write token");
}
