//! Configuration of a rank: timeouts, transport tuning, buffering limits.
//!
//! Every knob is a documented field here first; `env.rs` may override some of
//! them from `RANKMESH_*` variables. This module must not read the
//! environment or touch the network.

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

/// Settings of one rank. `Config::default()` suits training jobs on one host
/// or a LAN; every setter documents its unit, default and memory cost.
#[derive(Clone, Debug)]
pub struct Config {
    op_timeout: Duration,
    hang_warning: Duration,
    formation_timeout: Duration,
    idle_timeout: Duration,
    keep_alive: Duration,
    linger: Duration,
    eager_limit: usize,
    same_host_channel: bool,
    max_message_bytes: u64,
    socket_buffer_bytes: usize,
    mtu_upper_bound: u16,
    stream_receive_window: u32,
    send_window: u64,
    max_streams: u32,
    transport_threads: Option<usize>,
    max_unexpected_bytes: u64,
    spin_wait: Duration,
    bind_ip: Option<IpAddr>,
    algorithm: Option<Algorithm>,
    flight_records: usize,
    flight_dir: Option<PathBuf>,
    trace_file: Option<PathBuf>,
}

/// The most [`Config::set_transport_threads`] accepted.
pub const MAX_TRANSPORT_THREADS: usize = 16;

/// The longest [`Config::set_spin_wait`] accepted.
const MAX_SPIN_WAIT: Duration = Duration::from_secs(1);

impl Default for Config {
    fn default() -> Self {
        Config {
            op_timeout: Duration::from_secs(600),
            hang_warning: Duration::from_secs(30),
            formation_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(5),
            keep_alive: Duration::from_millis(1000),
            linger: Duration::from_secs(10),
            eager_limit: 64 * 1024,
            same_host_channel: true,
            max_message_bytes: 1 << 36,
            socket_buffer_bytes: 4 << 20,
            mtu_upper_bound: 8952,
            stream_receive_window: 2 << 20,
            send_window: 16 << 20,
            max_streams: 1024,
            transport_threads: None,
            max_unexpected_bytes: 1 << 30,
            spin_wait: Duration::from_micros(50),
            bind_ip: None,
            algorithm: None,
            flight_records: 256,
            flight_dir: None,
            trace_file: None,
        }
    }
}

impl Config {
    /// Upper bound on any single wait inside an operation (a receive, a
    /// collective step). Default 600 s: long enough for a slow rank to finish
    /// a checkpoint write, short enough that a stuck job ends with an error
    /// naming the ranks it waited on.
    pub fn set_op_timeout(&mut self, t: Duration) -> &mut Self {
        self.op_timeout = t;
        self
    }
    /// See [`Config::set_op_timeout`].
    pub fn op_timeout(&self) -> Duration {
        self.op_timeout
    }

    /// A collective still waiting after this long logs a warning (tracing
    /// WARN) naming the operation, its sequence number and the rank it
    /// waits on, and again every interval until it completes or times out.
    /// Default 30 s.
    pub fn set_hang_warning(&mut self, t: Duration) -> &mut Self {
        self.hang_warning = t;
        self
    }
    /// See [`Config::set_hang_warning`].
    pub fn hang_warning(&self) -> Duration {
        self.hang_warning
    }

    /// Deadline for forming the cluster (all ranks joining the seed) and for
    /// a single join handshake. Default 60 s.
    pub fn set_formation_timeout(&mut self, t: Duration) -> &mut Self {
        self.formation_timeout = t;
        self
    }
    /// See [`Config::set_formation_timeout`].
    pub fn formation_timeout(&self) -> Duration {
        self.formation_timeout
    }

    /// A connection that receives nothing (not even keep-alives) for this
    /// long is declared lost. Default 5 s. Must exceed the keep-alive interval.
    pub fn set_idle_timeout(&mut self, t: Duration) -> &mut Self {
        self.idle_timeout = t;
        self
    }
    /// See [`Config::set_idle_timeout`].
    pub fn idle_timeout(&self) -> Duration {
        self.idle_timeout
    }

    /// Interval of QUIC keep-alive probes on idle connections. Default 1 s.
    pub fn set_keep_alive(&mut self, t: Duration) -> &mut Self {
        self.keep_alive = t;
        self
    }
    /// See [`Config::set_keep_alive`].
    pub fn keep_alive(&self) -> Duration {
        self.keep_alive
    }

    /// How long `finalize` waits for connected peers to finalize too before
    /// closing connections anyway. Default 10 s.
    pub fn set_linger(&mut self, t: Duration) -> &mut Self {
        self.linger = t;
        self
    }
    /// See [`Config::set_linger`].
    pub fn linger(&self) -> Duration {
        self.linger
    }

    /// Messages up to this many bytes are read completely as they arrive,
    /// even before a matching receive is posted; larger ones wait in the
    /// transport's flow-control window (bounded by
    /// [`Config::set_stream_receive_window`] per message). Default 64 KiB.
    pub fn set_eager_limit(&mut self, bytes: usize) -> &mut Self {
        self.eager_limit = bytes;
        self
    }
    /// See [`Config::set_eager_limit`].
    pub fn eager_limit(&self) -> usize {
        self.eager_limit
    }

    /// Whether ranks on the same host (and in the same network namespace)
    /// move messages over the same-host channel: Unix domain sockets,
    /// authenticated per connection with a secret exported from the pair's
    /// mutual-TLS QUIC connection, and not encrypted (the kernel copies the
    /// bytes from one process to the other). QUIC still carries the
    /// connection's liveness and the close reasons. Off: every message
    /// travels over QUIC. Default on; `RANKMESH_SAME_HOST=0` turns it off.
    /// See docs/security.md and docs/performance.md.
    pub fn set_same_host_channel(&mut self, on: bool) -> &mut Self {
        self.same_host_channel = on;
        self
    }
    /// See [`Config::set_same_host_channel`].
    pub fn same_host_channel(&self) -> bool {
        self.same_host_channel
    }

    /// Largest single message accepted from a peer, in bytes. A frame that
    /// announces more is refused before anything is allocated. Default 64 GiB.
    pub fn set_max_message_bytes(&mut self, bytes: u64) -> &mut Self {
        self.max_message_bytes = bytes;
        self
    }
    /// See [`Config::set_max_message_bytes`].
    pub fn max_message_bytes(&self) -> u64 {
        self.max_message_bytes
    }

    /// UDP socket send and receive buffer size in bytes. Default 4 MiB (the
    /// kernel may clamp it to `net.core.rmem_max`). Costs this much kernel
    /// memory per rank and direction.
    pub fn set_socket_buffer_bytes(&mut self, bytes: usize) -> &mut Self {
        self.socket_buffer_bytes = bytes;
        self
    }
    /// See [`Config::set_socket_buffer_bytes`].
    pub fn socket_buffer_bytes(&self) -> usize {
        self.socket_buffer_bytes
    }

    /// Upper bound for QUIC path-MTU discovery in bytes (the UDP payload;
    /// `RANKMESH_MTU`). Default 8952: a 9000-byte jumbo frame less IPv6 and
    /// UDP headers, so jumbo-frame links get jumbo packets; discovery
    /// settles lower on smaller paths (1452 on 1500-byte Ethernet). Larger
    /// packets cost less per byte (each is built, encrypted, sent and
    /// acknowledged as one): 8952 gave 20-30% more bulk bandwidth than 4000
    /// on loopback. A connection's first congestion window is ten packets
    /// of this size.
    pub fn set_mtu_upper_bound(&mut self, bytes: u16) -> &mut Self {
        self.mtu_upper_bound = bytes;
        self
    }
    /// See [`Config::set_mtu_upper_bound`].
    pub fn mtu_upper_bound(&self) -> u16 {
        self.mtu_upper_bound
    }

    /// Per-stream QUIC receive window in bytes. Default 2 MiB. This much may
    /// be buffered per message in flight from a peer.
    pub fn set_stream_receive_window(&mut self, bytes: u32) -> &mut Self {
        self.stream_receive_window = bytes;
        self
    }
    /// See [`Config::set_stream_receive_window`].
    pub fn stream_receive_window(&self) -> u32 {
        self.stream_receive_window
    }

    /// Per-connection QUIC send window in bytes (unacknowledged data in
    /// flight). Default 16 MiB.
    pub fn set_send_window(&mut self, bytes: u64) -> &mut Self {
        self.send_window = bytes;
        self
    }
    /// See [`Config::set_send_window`].
    pub fn send_window(&self) -> u64 {
        self.send_window
    }

    /// Messages that may be in flight from one peer at once (QUIC concurrent
    /// streams; on the same-host channel, large messages the receiver has
    /// not received yet). Default 1024.
    pub fn set_max_streams(&mut self, n: u32) -> &mut Self {
        self.max_streams = n;
        self
    }
    /// See [`Config::set_max_streams`].
    pub fn max_streams(&self) -> u32 {
        self.max_streams
    }

    /// Threads that carry this rank's QUIC traffic: each of the `n - 1`
    /// beyond the caller's own drives an endpoint of its own (a UDP socket
    /// and one connection to each peer it sends large messages to), and a
    /// message of at least two eager limits to a peer across hosts is
    /// striped into up to `n` parts sent and received at once, so that
    /// several cores encrypt and decrypt it. Small messages, and all
    /// traffic on the same-host channel, stay on the caller's thread (no
    /// hand-off between threads). `1`: everything on the caller's thread.
    /// `None` (the default): the cores available to this process divided
    /// by the ranks on its host (`RANKMESH_LOCAL_SIZE`, which rankrun
    /// sets), from 1 to 4, and 1 when that is not set. At
    /// most 16. Each extra thread holds a UDP socket with
    /// [`Config::set_socket_buffer_bytes`] of buffers and one more QUIC
    /// connection per peer. `RANKMESH_TRANSPORT_THREADS` overrides it.
    pub fn set_transport_threads(&mut self, n: Option<usize>) -> &mut Self {
        self.transport_threads = n;
        self
    }
    /// See [`Config::set_transport_threads`]; `None`: chosen at start.
    pub fn transport_threads(&self) -> Option<usize> {
        self.transport_threads
    }

    /// Most bytes of one peer's messages (those up to the eager limit, which
    /// are read as they arrive; each counts its payload plus 256 bytes) held
    /// in memory before this rank receives them. A peer that pushes more is
    /// cut off with an error naming it, instead of this rank running out of
    /// memory. Default 1 GiB; at least the eager limit.
    pub fn set_max_unexpected_bytes(&mut self, bytes: u64) -> &mut Self {
        self.max_unexpected_bytes = bytes;
        self
    }
    /// See [`Config::set_max_unexpected_bytes`].
    pub fn max_unexpected_bytes(&self) -> u64 {
        self.max_unexpected_bytes
    }

    /// How long a receive whose message has not arrived keeps polling for
    /// it (giving the core to other runnable processes between polls)
    /// before its task sleeps. Default 50 us; zero never polls; at most 1 s.
    ///
    /// On a current-thread runtime polling spares the wake-up of a sleeping
    /// process, which dominates small-message latency (tens of microseconds
    /// on virtual machines), at the price of about this much CPU per
    /// receive that waits (plus the last yield). In a task on a
    /// multi-threaded runtime's workers polling would only keep the
    /// workers busy (the message is read on whichever worker holds the
    /// socket), so receives there never poll; on the thread that blocks on
    /// the runtime (the body of `#[tokio::main]`, `rankmesh::blocking`)
    /// they do, with a smaller gain. When a poll finds the core taken
    /// by other work for long (a yield that returns after more than 500 us:
    /// compute threads, other jobs), the rank stops polling for a while,
    /// doubling that while it recurs, up to 1 s, so a loaded host does not
    /// pay whole scheduler time slices per message.
    pub fn set_spin_wait(&mut self, t: Duration) -> &mut Self {
        self.spin_wait = t;
        self
    }
    /// See [`Config::set_spin_wait`].
    pub fn spin_wait(&self) -> Duration {
        self.spin_wait
    }

    /// Local IP address the rank's endpoint binds to. Default: the address
    /// of the interface that routes to the seed.
    pub fn set_bind_ip(&mut self, ip: Option<IpAddr>) -> &mut Self {
        self.bind_ip = ip;
        self
    }
    /// See [`Config::set_bind_ip`].
    pub fn bind_ip(&self) -> Option<IpAddr> {
        self.bind_ip
    }

    /// Force one collective algorithm wherever it applies (for
    /// benchmarking); `None` (default) lets the cost model choose.
    /// Environment: `RANKMESH_ALGORITHM=ring` (see [`Algorithm`] for names).
    pub fn set_algorithm(&mut self, a: Option<Algorithm>) -> &mut Self {
        self.algorithm = a;
        self
    }

    /// See [`Config::set_algorithm`].
    pub fn algorithm(&self) -> Option<Algorithm> {
        self.algorithm
    }

    /// How many recent operations the flight recorder keeps per rank (with
    /// their timing and outcome), for hang reports, dumps on timeout and on
    /// SIGUSR1. Default 256; memory about 200 bytes each. 0 turns it off.
    pub fn set_flight_records(&mut self, n: usize) -> &mut Self {
        self.flight_records = n;
        self
    }

    /// See [`Config::set_flight_records`].
    pub fn flight_records(&self) -> usize {
        self.flight_records
    }

    /// Directory for flight-recorder dumps (`rankmesh-flight-JOB-rankR.txt`);
    /// default: the system's temporary directory. Env `RANKMESH_FLIGHT_DIR`.
    pub fn set_flight_dir(&mut self, dir: Option<PathBuf>) -> &mut Self {
        self.flight_dir = dir;
        self
    }

    /// See [`Config::set_flight_dir`].
    pub fn flight_dir(&self) -> Option<&Path> {
        self.flight_dir.as_deref()
    }

    /// Write a Chrome/Perfetto trace (JSON) of every operation of this rank
    /// to this file when the rank finishes, on timeouts and on SIGUSR1.
    /// `{rank}` in the name is replaced by the world rank; otherwise
    /// `.rankR` is inserted before the extension. Memory: about 200 bytes per
    /// operation, at most a million operations (later ones are counted, not
    /// kept). Env `RANKMESH_TRACE`.
    pub fn set_trace_file(&mut self, file: Option<PathBuf>) -> &mut Self {
        self.trace_file = file;
        self
    }

    /// See [`Config::set_trace_file`].
    pub fn trace_file(&self) -> Option<&Path> {
        self.trace_file.as_deref()
    }

    /// Check that the settings are consistent.
    pub fn validate(&self) -> crate::Result<()> {
        if self.idle_timeout <= self.keep_alive {
            return Err(crate::Error::config(format!(
                "idle timeout ({:?}) must exceed the keep-alive interval ({:?})",
                self.idle_timeout, self.keep_alive
            )));
        }
        if self.spin_wait > MAX_SPIN_WAIT {
            return Err(crate::Error::config(format!(
                "spin wait {:?} is above {MAX_SPIN_WAIT:?}: every waiting receive would \
                 hold a core that long; use a few tens of microseconds, or zero",
                self.spin_wait
            )));
        }
        if self.op_timeout.is_zero() || self.formation_timeout.is_zero() {
            return Err(crate::Error::config(
                "op and formation timeouts must be greater than zero",
            ));
        }
        // Bounds that keep deadline arithmetic (now + timeout) far from
        // overflow, and flow control able to move data at all.
        const LONGEST: Duration = Duration::from_secs(365 * 24 * 3600);
        let timeouts = [
            ("op timeout", self.op_timeout),
            ("formation timeout", self.formation_timeout),
            ("idle timeout", self.idle_timeout),
            ("linger", self.linger),
            ("hang warning", self.hang_warning),
        ];
        for (name, t) in timeouts {
            if t > LONGEST {
                return Err(crate::Error::config(format!(
                    "{name} {t:?} is longer than a year; use a finite value"
                )));
            }
        }
        if self.max_streams == 0 || self.stream_receive_window == 0 || self.send_window == 0 {
            return Err(crate::Error::config(
                "max_streams, stream_receive_window and send_window must be greater than zero",
            ));
        }
        if let Some(n) = self.transport_threads {
            if !(1..=MAX_TRANSPORT_THREADS).contains(&n) {
                return Err(crate::Error::config(format!(
                    "transport_threads {n}: expected 1 to {MAX_TRANSPORT_THREADS} \
                     (1: all traffic on the caller's thread)"
                )));
            }
        }
        if self.max_unexpected_bytes < self.eager_limit as u64 {
            return Err(crate::Error::config(format!(
                "max_unexpected_bytes {} is below the eager limit {}: no small message \
                 could wait for its receive",
                self.max_unexpected_bytes, self.eager_limit
            )));
        }
        if self.mtu_upper_bound < 1200 {
            return Err(crate::Error::config(format!(
                "MTU upper bound {} is below QUIC's minimum of 1200 bytes",
                self.mtu_upper_bound
            )));
        }
        Ok(())
    }
}

/// A collective algorithm that can be forced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algorithm {
    /// Ring (allreduce; allgather and reduce-scatter always use it).
    Ring,
    /// Recursive doubling (allreduce).
    RecursiveDoubling,
    /// Recursive halving + doubling, Rabenseifner (allreduce).
    Rabenseifner,
    /// Binomial tree (broadcast).
    Binomial,
    /// Scatter + ring allgather, van de Geijn (broadcast).
    ScatterAllgather,
}

impl Algorithm {
    /// Every algorithm.
    pub const ALL: [Algorithm; 5] = [
        Algorithm::Ring,
        Algorithm::RecursiveDoubling,
        Algorithm::Rabenseifner,
        Algorithm::Binomial,
        Algorithm::ScatterAllgather,
    ];

    /// The name used in configuration.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Ring => "ring",
            Algorithm::RecursiveDoubling => "recursive-doubling",
            Algorithm::Rabenseifner => "rabenseifner",
            Algorithm::Binomial => "binomial",
            Algorithm::ScatterAllgather => "scatter-allgather",
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A name that is not one of [`Algorithm`]'s (from `str::parse`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnknownAlgorithm {
    /// What was given.
    pub given: String,
}

impl fmt::Display for UnknownAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<_> = Algorithm::ALL.iter().map(|a| a.name()).collect();
        write!(
            f,
            "unknown algorithm {:?}; expected one of {}",
            self.given,
            names.join(", ")
        )
    }
}

impl std::error::Error for UnknownAlgorithm {}

impl FromStr for Algorithm {
    type Err = UnknownAlgorithm;
    fn from_str(s: &str) -> Result<Algorithm, UnknownAlgorithm> {
        Algorithm::ALL
            .into_iter()
            .find(|a| a.name() == s)
            .ok_or_else(|| UnknownAlgorithm {
                given: s.to_string(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_bad_values_are_refused() {
        let mut c = Config::default();
        c.validate().unwrap();
        c.set_idle_timeout(Duration::from_millis(500));
        assert!(c.validate().unwrap_err().to_string().contains("keep-alive"));
        let mut c = Config::default();
        c.set_mtu_upper_bound(1000);
        assert!(c.validate().is_err());
        let mut c = Config::default();
        c.set_max_unexpected_bytes(1000);
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("eager limit"));
        // Deadlines are computed as now + timeout: "forever" is refused
        // instead of overflowing later.
        let mut c = Config::default();
        c.set_linger(Duration::MAX);
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("longer than a year"));
        let mut c = Config::default();
        c.set_max_streams(0);
        assert!(c.validate().is_err());
        let mut c = Config::default();
        c.set_spin_wait(Duration::from_secs(2));
        assert!(c.validate().unwrap_err().to_string().contains("spin wait"));
        c.set_spin_wait(MAX_SPIN_WAIT);
        c.validate().unwrap();
    }
}
