//! Output: one writer thread owns stdout, stderr and the per-rank files, so
//! lines are only ever written whole, one at a time.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::mpsc;

/// Something to write.
pub enum Msg {
    /// A whole line (ending in `\n`) from process `idx`.
    Line {
        idx: usize,
        err: bool,
        data: Vec<u8>,
    },
    /// A line from rankrun itself (stderr).
    Note(String),
}

/// The handle tasks send lines through.
pub type Tx = mpsc::Sender<Msg>;

/// Per-process tag and optional file.
pub struct Sink {
    pub tag: Vec<u8>,
    pub file: Option<File>,
}

/// Start the writer thread.
pub fn start(mut sinks: Vec<Sink>) -> (Tx, std::thread::JoinHandle<()>) {
    let (tx, mut rx) = mpsc::channel::<Msg>(1024);
    let h = std::thread::spawn(move || {
        let stdout = std::io::stdout();
        let stderr = std::io::stderr();
        let mut buf = Vec::with_capacity(256);
        while let Some(m) = rx.blocking_recv() {
            match m {
                Msg::Line { idx, err, data } => {
                    let Some(s) = sinks.get_mut(idx) else {
                        continue;
                    };
                    buf.clear();
                    buf.extend_from_slice(&s.tag);
                    buf.extend_from_slice(&data);
                    // Write errors (a closed pipe) must not stop the job.
                    if err {
                        let _ = stderr.lock().write_all(&buf);
                    } else {
                        let mut o = stdout.lock();
                        let _ = o.write_all(&buf);
                        let _ = o.flush();
                    }
                    if let Some(f) = &mut s.file {
                        let _ = f.write_all(&data);
                    }
                }
                Msg::Note(s) => {
                    let _ = stdout.lock().flush();
                    let _ = writeln!(stderr.lock(), "rankrun: {s}");
                }
            }
        }
        let _ = stdout.lock().flush();
    });
    (tx, h)
}

/// Open `DIR/rank.N.log`.
pub fn open_file(dir: &Path, label: &str) -> std::io::Result<File> {
    File::create(dir.join(format!("{label}.log")))
}

/// Forward `r` line by line; a last line without `\n` gets one at EOF.
pub async fn pump<R: AsyncRead + Unpin>(r: R, idx: usize, err: bool, tx: Tx) {
    let mut br = BufReader::with_capacity(64 * 1024, r);
    loop {
        let mut data = Vec::new();
        match br.read_until(b'\n', &mut data).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                if !data.ends_with(b"\n") {
                    data.push(b'\n');
                }
                if tx.send(Msg::Line { idx, err, data }).await.is_err() {
                    break;
                }
            }
        }
    }
}
