//! The flight recorder: the last operations of a rank with their timing
//! and outcome, for hang reports, dumps (on timeout, on SIGUSR1) and the
//! optional Chrome/Perfetto trace (`RANKMESH_TRACE`).

use crate::config::Config;
use crate::datatype::DType;
use crate::wire::CollDesc;
use std::collections::VecDeque;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Most operations a trace keeps (later ones are counted, not kept).
const TRACE_MAX: usize = 1_000_000;

/// The shape of an operation, kept as data: it is put in words only when
/// a report or trace is written, not on every call.
#[derive(Clone, Debug)]
pub(crate) enum What {
    /// A collective call.
    Coll(CollDesc),
    /// A send (`to`) or receive of `count` elements.
    P2p {
        to: bool,
        peer: usize,
        tag: u32,
        count: usize,
        dtype: DType,
    },
    /// Anything else, in words.
    Text(String),
}

impl std::fmt::Display for What {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            What::Coll(d) => write!(f, "{d}"),
            What::P2p {
                to,
                peer,
                tag,
                count,
                dtype,
            } => write!(
                f,
                "{} rank {peer}, tag {tag}, {count} x {dtype:?}",
                if *to { "to" } else { "from" }
            ),
            What::Text(t) => f.write_str(t),
        }
    }
}

impl From<String> for What {
    fn from(s: String) -> What {
        What::Text(s)
    }
}

impl From<&str> for What {
    fn from(s: &str) -> What {
        What::Text(s.to_string())
    }
}

/// One operation of this rank.
#[derive(Clone, Debug)]
pub(crate) struct Record {
    pub comm: u64,
    pub seq: u64,
    /// e.g. "all_reduce", "send".
    pub op: &'static str,
    /// Shape: "all_reduce with 1024 elements of f32, op Sum" / "to rank 3, tag 7".
    pub what: What,
    pub bytes: u64,
    pub algorithm: &'static str,
    pub peers: usize,
    start: Duration,
    end: Option<Duration>,
    /// `None` while running, then the error (empty when it succeeded).
    outcome: Option<String>,
}

pub(crate) struct Recorder {
    rank: usize,
    job: String,
    cap: usize,
    origin: Instant,
    /// Wall-clock time of `origin`, microseconds since the epoch.
    origin_unix_us: u128,
    dir: PathBuf,
    ring: Mutex<VecDeque<Record>>,
    trace: Option<(PathBuf, Mutex<Trace>)>,
}

#[derive(Default)]
struct Trace {
    done: Vec<Record>,
    dropped: u64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Recorder {
    pub(crate) fn new(rank: usize, job: &str, cfg: &Config) -> Recorder {
        let trace = cfg
            .trace_file()
            .map(|f| (rank_file(f, rank), Mutex::new(Trace::default())));
        Recorder {
            rank,
            job: job.to_string(),
            cap: cfg.flight_records(),
            origin: Instant::now(),
            origin_unix_us: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_micros())
                .unwrap_or(0),
            dir: cfg
                .flight_dir()
                .map(Path::to_path_buf)
                .unwrap_or_else(std::env::temp_dir),
            ring: Mutex::new(VecDeque::new()),
            trace,
        }
    }

    fn enabled(&self) -> bool {
        self.cap > 0 || self.trace.is_some()
    }

    /// An operation started.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn begin(
        &self,
        comm: u64,
        seq: u64,
        op: &'static str,
        what: impl Into<What>,
        bytes: u64,
        algorithm: &'static str,
        peers: usize,
    ) {
        if !self.enabled() {
            return;
        }
        let r = Record {
            comm,
            seq,
            op,
            what: what.into(),
            bytes,
            algorithm,
            peers,
            start: self.origin.elapsed(),
            end: None,
            outcome: None,
        };
        let mut ring = lock(&self.ring);
        ring.push_back(r);
        // Keep running operations even beyond the cap (they are what a hang
        // report is about), up to twice the cap.
        while ring.len() > self.cap.max(1) {
            match ring.iter().position(|r| r.end.is_some()) {
                Some(i) => {
                    ring.remove(i);
                }
                None if ring.len() > 2 * self.cap.max(64) => {
                    ring.pop_front();
                }
                None => break,
            }
        }
    }

    /// Record an operation until the guard is finished (or dropped: a
    /// cancelled operation).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn start(
        &self,
        comm: u64,
        seq: u64,
        op: &'static str,
        what: What,
        bytes: u64,
        algorithm: &'static str,
        peers: usize,
    ) -> OpGuard<'_> {
        if self.enabled() {
            self.begin(comm, seq, op, what, bytes, algorithm, peers);
        }
        OpGuard {
            rec: self,
            comm,
            seq,
            op,
            open: true,
        }
    }

    /// Operation (`comm`, `seq`, `op`) ended; `error` is why it failed.
    pub(crate) fn end(&self, comm: u64, seq: u64, op: &'static str, error: Option<String>) {
        if !self.enabled() {
            return;
        }
        let now = self.origin.elapsed();
        let mut ring = lock(&self.ring);
        let Some(r) = ring
            .iter_mut()
            .rev()
            .find(|r| r.comm == comm && r.seq == seq && r.op == op && r.end.is_none())
        else {
            return;
        };
        r.end = Some(now);
        r.outcome = Some(error.unwrap_or_default());
        let done = self.trace.as_ref().map(|_| r.clone());
        if self.cap == 0 {
            ring.retain(|r| r.end.is_none());
        }
        drop(ring);
        if let (Some((_, t)), Some(done)) = (&self.trace, done) {
            let mut t = lock(t);
            if t.done.len() < TRACE_MAX {
                t.done.push(done);
            } else {
                t.dropped += 1;
            }
        }
    }

    /// The recent operations, oldest first, one line each.
    pub(crate) fn report(&self) -> String {
        let now = self.origin.elapsed();
        let ring = lock(&self.ring);
        let mut s = String::new();
        for r in ring.iter() {
            let _ = write!(
                s,
                "  comm {:#x} #{:<6} {:<14} {:<40} {:>12} B  {:<18}",
                r.comm,
                r.seq,
                r.op,
                r.what.to_string(),
                r.bytes,
                r.algorithm
            );
            let ago = now.saturating_sub(r.start);
            match (&r.end, &r.outcome) {
                (Some(end), Some(e)) if e.is_empty() => {
                    let _ = write!(s, " done in {:?}", end.saturating_sub(r.start));
                }
                (Some(end), Some(e)) => {
                    let _ = write!(s, " FAILED after {:?}: {e}", end.saturating_sub(r.start));
                }
                _ => {
                    let _ = write!(s, " RUNNING for {ago:?}");
                }
            }
            let _ = writeln!(s, " (started {ago:?} ago)");
        }
        s
    }

    /// Where [`Recorder::dump`] writes.
    pub(crate) fn flight_path(&self) -> PathBuf {
        self.dir.join(format!(
            "rankmesh-flight-{}-rank{}.txt",
            self.job, self.rank
        ))
    }

    /// Write the recent operations (and the trace, when enabled) to a file
    /// per rank; returns the flight file's path.
    pub(crate) fn dump(&self, why: &str, extra: &str) -> std::io::Result<PathBuf> {
        let path = self.flight_path();
        let mut s = format!(
            "rankmesh flight recorder: job {} rank {} pid {}\nreason: {why}\n",
            self.job,
            self.rank,
            std::process::id()
        );
        if !extra.is_empty() {
            s.push_str(extra);
            if !extra.ends_with('\n') {
                s.push('\n');
            }
        }
        s.push_str("recent operations, oldest first:\n");
        s.push_str(&self.report());
        write_atomically(&path, s.as_bytes())?;
        self.write_trace()?;
        Ok(path)
    }

    /// Write the trace file, if a trace is kept. Completed operations, plus
    /// running ones up to now (marked as running).
    pub(crate) fn write_trace(&self) -> std::io::Result<()> {
        let Some((path, t)) = &self.trace else {
            return Ok(());
        };
        let now = self.origin.elapsed();
        let running: Vec<Record> = lock(&self.ring)
            .iter()
            .filter(|r| r.end.is_none())
            .cloned()
            .collect();
        let t = lock(t);
        let mut s = String::with_capacity(200 * (t.done.len() + running.len()) + 256);
        s.push_str("{\"displayTimeUnit\":\"ms\",\"traceEvents\":[\n");
        let _ = write!(
            s,
            "{{\"name\":\"process_name\",\"ph\":\"M\",\"pid\":{r},\"tid\":0,\
             \"args\":{{\"name\":\"rank {r}\"}}}}",
            r = self.rank
        );
        for r in t.done.iter().chain(&running) {
            s.push_str(",\n");
            self.event(&mut s, r, now);
        }
        let _ = write!(
            s,
            "\n],\"otherData\":{{\"job\":\"{}\",\"rank\":{},\"origin_unix_us\":{},\
             \"dropped\":{}}}}}\n",
            json_escape(&self.job),
            self.rank,
            self.origin_unix_us,
            t.dropped
        );
        drop(t);
        write_atomically(path, s.as_bytes())
    }

    fn event(&self, s: &mut String, r: &Record, now: Duration) {
        let end = r.end.unwrap_or(now);
        let state = match &r.outcome {
            None => "running".to_string(),
            Some(e) if e.is_empty() => "done".to_string(),
            Some(e) => format!("failed: {e}"),
        };
        let _ = write!(
            s,
            "{{\"name\":\"{op} #{seq}\",\"cat\":\"{cat}\",\"ph\":\"X\",\"ts\":{ts:.3},\
             \"dur\":{dur:.3},\"pid\":{pid},\"tid\":{tid},\"args\":{{\"comm\":\"{comm:#x}\",\
             \"seq\":{seq},\"what\":\"{what}\",\"bytes\":{bytes},\"algorithm\":\"{alg}\",\
             \"peers\":{peers},\"state\":\"{state}\"}}}}",
            op = r.op,
            seq = r.seq,
            cat = if r.algorithm == "p2p" {
                "p2p"
            } else {
                "collective"
            },
            ts = r.start.as_secs_f64() * 1e6,
            dur = end.saturating_sub(r.start).as_secs_f64() * 1e6,
            pid = self.rank,
            // One row per communicator (Perfetto groups by thread id).
            tid = r.comm % 1_000_000_007,
            comm = r.comm,
            what = json_escape(&r.what.to_string()),
            bytes = r.bytes,
            alg = r.algorithm,
            peers = r.peers,
            state = json_escape(&state),
        );
    }
}

/// An operation being recorded.
pub(crate) struct OpGuard<'a> {
    rec: &'a Recorder,
    comm: u64,
    seq: u64,
    op: &'static str,
    open: bool,
}

impl OpGuard<'_> {
    /// The operation ended with `res`.
    pub(crate) fn finish<T>(mut self, res: &crate::Result<T>) {
        self.open = false;
        let err = res.as_ref().err().map(|e| e.to_string());
        self.rec.end(self.comm, self.seq, self.op, err);
    }
}

impl Drop for OpGuard<'_> {
    fn drop(&mut self) {
        if self.open {
            self.rec
                .end(self.comm, self.seq, self.op, Some("cancelled".into()));
        }
    }
}

/// `f` with the rank in it: `{rank}` replaced, else `.rankR` before the
/// extension.
fn rank_file(f: &Path, rank: usize) -> PathBuf {
    let s = f.to_string_lossy();
    if s.contains("{rank}") {
        return PathBuf::from(s.replace("{rank}", &rank.to_string()));
    }
    let stem = f
        .file_stem()
        .map(|x| x.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name = match f.extension() {
        Some(e) => format!("{stem}.rank{rank}.{}", e.to_string_lossy()),
        None => format!("{stem}.rank{rank}"),
    };
    f.with_file_name(name)
}

fn write_atomically(path: &Path, data: &[u8]) -> std::io::Result<()> {
    // A temporary name unique to this write (ranks of one process, and two
    // dumps of one rank, must not share it).
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".tmp.{}.{n}", std::process::id()));
    let tmp = PathBuf::from(name);
    std::fs::write(&tmp, data)?;
    std::fs::rename(&tmp, path)
}

fn json_escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            '\n' => o.push_str("\\n"),
            c if (c as u32) < 0x20 => {
                let _ = write!(o, "\\u{:04x}", c as u32);
            }
            c => o.push(c),
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(n: usize, trace: Option<PathBuf>, dir: &Path) -> Config {
        let mut c = Config::default();
        c.set_flight_records(n)
            .set_trace_file(trace)
            .set_flight_dir(Some(dir.to_path_buf()));
        c
    }

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("rankmesh-rec-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn keeps_the_last_operations_and_every_running_one() {
        let d = tmp("ring");
        let r = Recorder::new(2, "job", &cfg(3, None, &d));
        r.begin(0, 0, "barrier", String::new(), 0, "dissemination", 4);
        for seq in 1..10 {
            r.begin(0, seq, "all_reduce", "4 x f32", 16, "ring", 4);
            r.end(0, seq, "all_reduce", None);
        }
        r.begin(0, 10, "broadcast", String::new(), 8, "binomial", 4);
        r.end(0, 9, "all_reduce", Some("late".into()));
        let rep = r.report();
        assert!(rep.contains("#0") && rep.contains("RUNNING"), "{rep}");
        assert!(rep.contains("#10"), "{rep}");
        assert!(!rep.contains("#5 "), "{rep}");
        let path = r.dump("test", "waiting on rank 3").unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(path.ends_with("rankmesh-flight-job-rank2.txt"));
        assert!(text.contains("reason: test") && text.contains("waiting on rank 3"));
        assert!(text.contains("broadcast") && text.contains("RUNNING"));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn trace_is_chrome_json_per_rank() {
        let d = tmp("trace");
        let r = Recorder::new(1, "j\"b", &cfg(8, Some(d.join("t.json")), &d));
        r.begin(7, 0, "all_reduce", "2 x \"f32\"", 8, "ring", 2);
        r.end(7, 0, "all_reduce", None);
        r.begin(7, 1, "send", "to rank 0, tag 3", 8, "p2p", 1);
        r.write_trace().unwrap();
        let text = std::fs::read_to_string(d.join("t.rank1.json")).unwrap();
        assert!(text.starts_with("{\"displayTimeUnit\""), "{text}");
        assert!(text.contains("\"name\":\"all_reduce #0\""), "{text}");
        assert!(text.contains("\"state\":\"running\""), "{text}");
        assert!(text.contains("2 x \\\"f32\\\""), "{text}");
        assert!(text.contains("\"ph\":\"X\"") && text.trim_end().ends_with('}'));
        // Balanced braces and brackets (a cheap well-formedness check).
        let opens = text.matches('{').count() + text.matches('[').count();
        let closes = text.matches('}').count() + text.matches(']').count();
        assert_eq!(opens, closes);
        assert_eq!(
            rank_file(Path::new("/x/run-{rank}.json"), 3),
            PathBuf::from("/x/run-3.json")
        );
        assert_eq!(
            rank_file(Path::new("/x/trace"), 0),
            PathBuf::from("/x/trace.rank0")
        );
        let _ = std::fs::remove_dir_all(&d);
    }
}
