//! collbench as a user runs it: under rankrun with nccl-tests' flags, and
//! as its own launcher with JSON lines; real processes over loopback.

use std::io::Read;
use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Generous: the CI machine may be small and busy.
const LIMIT: Duration = Duration::from_secs(120);

/// Run `cmd` to its end (killing it after `LIMIT`); status and stdout.
fn run(mut cmd: Command) -> (i32, String, String) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start");
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let ereader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if start.elapsed() > LIMIT {
            let _ = child.kill();
            panic!("{cmd:?} did not end within {LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let (out, err) = (reader.join().unwrap(), ereader.join().unwrap());
    (status.code().unwrap_or(-1), out, err)
}

/// The table's data rows, split in columns (rankrun's `[rank] ` prefix
/// removed).
fn rows(out: &str) -> Vec<Vec<String>> {
    out.lines()
        .map(|l| match l.strip_prefix('[') {
            Some(rest) => rest.split_once("] ").map_or(l, |(_, t)| t),
            None => l,
        })
        .filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
        .filter(|l| !l.starts_with("rankrun:"))
        .map(|l| l.split_whitespace().map(String::from).collect())
        .collect()
}

#[test]
fn under_rankrun_with_nccl_tests_flags_it_prints_nccl_tests_table() {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_rankrun"));
    cmd.env_remove("SLURM_JOB_ID").args([
        "-n",
        "3",
        env!("CARGO_BIN_EXE_collbench"),
        "--coll",
        "allreduce,allgather,broadcast,sendrecv,barrier",
        "-b",
        "8",
        "-e",
        "4K",
        "-f",
        "8",
        "-d",
        "bfloat16",
        "-o",
        "max",
        "-r",
        "2",
        "-n",
        "3",
        "-w",
        "1",
        "-c",
        "1",
    ]);
    let (code, out, err) = run(cmd);
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    let rows = rows(&out);
    // 8, 64, 512, 4096 bytes for four collectives, one barrier row.
    assert_eq!(rows.len(), 4 * 4 + 1, "{out}");
    for r in &rows {
        assert_eq!(r.len(), 10, "{r:?}");
        let (bytes, count): (u64, u64) = (r[0].parse().unwrap(), r[1].parse().unwrap());
        let (time, algbw, busbw): (f64, f64, f64) = (
            r[5].parse().unwrap(),
            r[6].parse().unwrap(),
            r[7].parse().unwrap(),
        );
        assert_eq!(r[2], "bfloat16");
        assert_eq!(r[8], "0", "wrong elements: {r:?}");
        let coll = r[9].as_str();
        match coll {
            // Blocks of whole elements per rank: 3 ranks, 2-byte elements.
            "allgather" => assert_eq!(count % 3, 0),
            "barrier" => assert_eq!(bytes, 0),
            _ => assert_eq!(bytes, 2 * count),
        }
        assert_eq!(r[3], if coll == "allreduce" { "max" } else { "none" });
        assert_eq!(r[4], if coll == "broadcast" { "2" } else { "-1" });
        assert!(time > 0.0, "{r:?}");
        // nccl-tests' factors: allreduce 2(n-1)/n, allgather (n-1)/n.
        let factor = match coll {
            "allreduce" => 4.0 / 3.0,
            "allgather" => 2.0 / 3.0,
            _ => 1.0,
        };
        assert!(
            (busbw - algbw * factor).abs() <= 0.0015 + algbw * 1e-3,
            "{r:?}"
        );
    }
    assert!(out.contains("# Out of bounds values : 0 OK"), "{out}");
}

#[test]
fn as_its_own_launcher_it_writes_json_lines() {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_collbench"));
    cmd.env_remove("RANKMESH_SEED").args([
        "--np",
        "2",
        "--coll",
        "reducescatter,alltoall",
        "-b",
        "1K",
        "-e",
        "2K",
        "-d",
        "int8",
        "-n",
        "2",
        "-w",
        "0",
        "--json",
        "-",
    ]);
    let (code, out, err) = run(cmd);
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 4, "only JSON lines, no table:\n{out}");
    for (l, (coll, bytes)) in lines.iter().zip([
        ("reducescatter", 1024),
        ("reducescatter", 2048),
        ("alltoall", 1024),
        ("alltoall", 2048),
    ]) {
        assert!(
            l.starts_with(&format!(
                "{{\"coll\":\"{coll}\",\"ranks\":2,\"bytes\":{bytes},\"count\":{bytes},\"type\":\"int8\""
            )),
            "{l}"
        );
        assert!(l.ends_with("\"wrong\":0}"), "{l}");
    }
}

#[test]
fn a_bad_command_line_is_one_clear_error() {
    for (args, want) in [
        (vec!["--np", "2", "-b", "2M", "-e", "1M"], "-b"),
        (vec!["--np", "2", "--coll", "broadcast", "-r", "2"], "-r 2"),
        (vec!["--np", "2", "-d", "float17"], "float17"),
        (vec!["-b", "1K"], "rankrun -n N collbench"),
    ] {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_collbench"));
        cmd.env_remove("RANKMESH_SEED").args(&args);
        let (code, out, err) = run(cmd);
        assert_eq!(code, 2, "{args:?}: {out} {err}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
}

/// A scratch directory of this test process.
fn scratch(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("collbench-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).expect("scratch dir");
    d
}

#[test]
fn the_plot_has_axis_titles_with_units_a_legend_entry_per_collective_and_renders() {
    let dir = scratch("plot");
    let svg = dir.join("busbw.svg");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_collbench"));
    cmd.env_remove("RANKMESH_SEED")
        .args([
            "--np",
            "2",
            "--coll",
            "allreduce,allgather,barrier",
            "-b",
            "64",
            "-e",
            "4K",
            "-f",
            "4",
            "-n",
            "2",
            "-w",
            "0",
            "--plot",
        ])
        .arg(&svg);
    let (code, out, err) = run(cmd);
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    let s = std::fs::read_to_string(&svg).expect("the plot was written");
    assert!(
        s.contains("message size (bytes"),
        "x axis title with its unit"
    );
    assert!(
        s.contains("bus bandwidth (GB/s"),
        "y axis title with its unit"
    );
    assert_eq!(s.matches(r#"class="legend""#).count(), 3, "{s}");
    for c in ["allreduce", "allgather", "barrier"] {
        assert!(
            s.contains(&format!(">{c}</text>")),
            "no legend entry for {c}"
        );
    }
    assert_eq!(
        s.matches("<polyline").count(),
        2,
        "a line per sized collective"
    );
    let px: Vec<f64> = s
        .split("font-size=\"")
        .skip(1)
        .map(|t| {
            t.split('"')
                .next()
                .unwrap_or("")
                .parse()
                .expect("font size")
        })
        .collect();
    assert!(px.iter().all(|&p| p >= 10.0), "text under 10 px: {px:?}");

    // Render it as a person would look at it.
    let render = Command::new("rsvg-convert")
        .arg("-o")
        .arg(dir.join("busbw.png"))
        .arg(&svg)
        .output();
    match render {
        Err(e) if std::env::var("CI").as_deref() != Ok("true") => {
            let _ = writeln!(
                std::io::stderr(),
                "\n*** SKIPPED the render check: cannot run rsvg-convert ({e}); install it \
                 with `apt-get install librsvg2-bin` ***\n"
            );
        }
        Err(e) => panic!("CI=true but rsvg-convert cannot run: {e}"),
        Ok(o) => {
            assert!(o.status.success(), "rsvg-convert: {o:?}");
            let png = std::fs::read(dir.join("busbw.png")).expect("png");
            assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
            // IHDR: width and height, big-endian, at bytes 16..24.
            let w = u32::from_be_bytes(png[16..20].try_into().unwrap());
            let h = u32::from_be_bytes(png[20..24].try_into().unwrap());
            assert!(w >= 800 && h >= 500, "{w}x{h}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn device_flags_name_what_is_missing() {
    for (args, want) in [
        (vec!["--np", "2", "--plot", "busbw.png"], "FILE.svg"),
        (vec!["--np", "2", "--device", "gpu"], "gpu"),
        (vec!["--np", "2", "--spawn"], "--multi-thread"),
    ] {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_collbench"));
        cmd.env_remove("RANKMESH_SEED").args(&args);
        let (code, out, err) = run(cmd);
        assert_eq!(code, 2, "{args:?}: {out} {err}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
    for (dev, built) in [
        ("wgpu", cfg!(feature = "wgpu")),
        ("cuda", cfg!(feature = "cuda")),
    ] {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_collbench"));
        cmd.env_remove("RANKMESH_SEED")
            .args(["--np", "2", "--device", dev, "--coll", "alltoall"]);
        let (code, _, err) = run(cmd);
        assert_eq!(code, 2, "{err}");
        let want = if built {
            "no collective of that kind on device buffers".to_string()
        } else {
            format!("--features {dev}")
        };
        assert!(err.contains(&want), "--device {dev}: {err}");
    }
}

/// Collectives on wgpu buffers (Mesa's lavapipe in CI), checked exactly.
#[cfg(feature = "wgpu")]
#[test]
fn on_wgpu_buffers_every_device_collective_is_exact() {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_collbench"));
    cmd.env_remove("RANKMESH_SEED").args([
        "--np",
        "2",
        "--device",
        "wgpu",
        "--coll",
        "allreduce,broadcast,reduce,allgather,reducescatter,barrier",
        "-b",
        "4",
        "-e",
        "16K",
        "-f",
        "64",
        "-r",
        "1",
        "-n",
        "2",
        "-w",
        "1",
    ]);
    let (code, out, err) = run(cmd);
    if code != 0 && err.contains("GPU error") && std::env::var("CI").as_deref() != Ok("true") {
        let _ = writeln!(
            std::io::stderr(),
            "\n*** SKIPPED the collbench wgpu test: no usable adapter ({err}); without a GPU \
             install apt-get install mesa-vulkan-drivers libvulkan1 ***\n"
        );
        return;
    }
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("wgpu ("), "the header names the device: {out}");
    let rows = rows(&out);
    assert_eq!(rows.len(), 5 * 3 + 1, "{out}");
    assert!(rows.iter().all(|r| r[8] == "0"), "{out}");
}

#[cfg(feature = "cuda")]
#[test]
fn on_cuda_without_a_driver_it_says_so() {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_collbench"));
    cmd.env_remove("RANKMESH_SEED")
        .args(["--np", "2", "--device", "cuda", "-b", "8", "-e", "8"]);
    let (code, out, err) = run(cmd);
    if err.contains("no CUDA driver") {
        assert_eq!(code, 1, "{out} {err}");
    } else {
        // A machine with a GPU: the run itself must be right.
        assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
        assert!(rows(&out).iter().all(|r| r[8] == "0"), "{out}");
    }
}

/// Whether `cmd` (or Debian's `cmd.openmpi`) is on PATH.
fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args([
            "-c",
            &format!("command -v {cmd}.openmpi || command -v {cmd}"),
        ])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Whether a test that needs `what` can run (`ok`). If not, it may skip
/// only outside CI, saying so loudly with the packages to install.
fn runnable(ok: bool, test: &str, what: &str, packages: &str) -> bool {
    if !ok {
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "CI=true but {test} cannot run: it needs {what}"
        );
        let _ = writeln!(
            std::io::stderr(),
            "\n*** SKIPPED {test}: it needs {what} (`apt-get install {packages}`) ***\n"
        );
    }
    ok
}

/// The arguments of a small run of either comparison script: one round,
/// 64 B and 4 KiB, 3 iterations.
const SMALL_RUN: [&str; 14] = [
    "--rounds",
    "1",
    "-b",
    "64",
    "-e",
    "4K",
    "-f",
    "64",
    "-n",
    "3",
    "-w",
    "1",
    "--batches",
    "1",
];

/// scripts/compare-mpi.sh: both systems, one table of ratios. Needs Open
/// MPI (`.ci/run` installs it; elsewhere the test says what to install).
#[test]
fn the_open_mpi_comparison_prints_one_row_of_ratios_per_size() {
    if !runnable(
        have("mpicc") && have("mpirun"),
        "the Open MPI comparison test",
        "Open MPI",
        "openmpi-bin libopenmpi-dev",
    ) {
        return;
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/compare-mpi.sh");
    let tmp = scratch("mpi");
    let mut cmd = Command::new("bash");
    cmd.env_remove("RANKMESH_SEED")
        .env("COLLBENCH", env!("CARGO_BIN_EXE_collbench"))
        .env("TMPDIR", &tmp)
        .args([script, "--np", "2", "--coll", "allreduce,alltoall,barrier"])
        .args(SMALL_RUN);
    let (code, out, err) = run(cmd);
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    let rows = rows(&out);
    // 64 B and 4 KiB for two collectives, one barrier row.
    assert_eq!(rows.len(), 5, "{out}");
    for r in &rows {
        assert_eq!(r.len(), 7, "{r:?}");
        let nums: Vec<f64> = r[1..].iter().map(|v| v.parse().expect("number")).collect();
        assert!(nums[1] > 0.0 && nums[2] > 0.0, "both times: {r:?}");
        // speed is the ratio of the two times.
        assert!(
            (nums[5] - nums[2] / nums[1]).abs() <= 0.01 + nums[5] * 0.02,
            "{r:?}"
        );
    }
    assert!(
        out.contains("speed = Open MPI's time / rankmesh's"),
        "{out}"
    );
    let _ = std::fs::remove_dir_all(&tmp);
}

/// scripts/veth-bench.sh: each rank in a network namespace of its own,
/// both systems, one table; the namespaces are gone afterwards. Needs root,
/// iproute2 and Open MPI (`.ci/run` runs as root and installs them).
#[test]
fn the_veth_comparison_runs_both_systems_across_namespaces_and_cleans_up() {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !runnable(
        root && have("ip") && have("mpicc") && have("mpirun"),
        "the veth comparison test",
        "root, iproute2 and Open MPI",
        "iproute2 openmpi-bin libopenmpi-dev",
    ) {
        return;
    }
    let namespaces = || {
        let out = Command::new("ip").args(["netns", "list"]).output();
        out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    };
    let before = namespaces();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/veth-bench.sh");
    let mut cmd = Command::new("bash");
    cmd.env_remove("RANKMESH_SEED")
        .env("COLLBENCH", env!("CARGO_BIN_EXE_collbench"))
        .env("RANKRUN", env!("CARGO_BIN_EXE_rankrun"))
        .args([
            script,
            "--np",
            "2",
            "--mtu",
            "9000",
            "--coll",
            "allreduce,barrier",
        ])
        .args(SMALL_RUN);
    let (code, out, err) = run(cmd);
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    assert!(
        out.contains("one network namespace each, veth at MTU 9000"),
        "{out}"
    );
    let rows = rows(&out);
    // 64 B and 4 KiB allreduce, one barrier row; both systems' times.
    assert_eq!(rows.len(), 3, "{out}");
    for r in &rows {
        assert_eq!(r.len(), 7, "{r:?}");
        let t: Vec<f64> = r[2..4].iter().map(|v| v.parse().expect("time")).collect();
        assert!(t[0] > 0.0 && t[1] > 0.0, "both times: {r:?}");
    }
    // Only namespaces this run made count (an earlier run killed with
    // SIGKILL may have left its own).
    let after = namespaces();
    let new: Vec<&str> = after
        .lines()
        .filter(|l| l.starts_with("rmvb") && !before.lines().any(|b| b == *l))
        .collect();
    assert!(new.is_empty(), "namespaces left behind: {new:?}");
}
