//! collbench as a user runs it: under rankrun with nccl-tests' flags, and
//! as its own launcher with JSON lines; real processes over loopback.

use std::io::Read;
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
