//! The only reader of environment variables.
//!
//! The launcher contract (set by `rankrun`, or by Slurm plus two variables):
//!
//! | variable | meaning |
//! |---|---|
//! | `RANKMESH_SEED` | `host:port` of the seed (required) |
//! | `RANKMESH_TOKEN` or `RANKMESH_TOKEN_FILE` | the job token, 64 hex digits, or a file holding it (required) |
//! | `RANKMESH_WORLD_SIZE` (else `SLURM_NTASKS`) | number of ranks |
//! | `RANKMESH_RANK` (else `SLURM_PROCID`) | the rank to request |
//! | `RANKMESH_JOB_ID` | the job id (checked against the seed's) |
//! | `RANKMESH_LOCAL_RANK` (else `SLURM_LOCALID`), `RANKMESH_LOCAL_SIZE` | placement on this host |
//! | `RANKMESH_JOIN` | `1`: join a running elastic job at its next checkpoint (`rankrun --join`) |
//!
//! Optional overrides of [`Config`] fields: `RANKMESH_OP_TIMEOUT`,
//! `RANKMESH_FORMATION_TIMEOUT`, `RANKMESH_IDLE_TIMEOUT` (seconds, decimals
//! allowed), `RANKMESH_SPIN_US` (whole microseconds a receive polls before
//! sleeping; `0`: never), `RANKMESH_MTU` (bytes: the largest UDP payload
//! path-MTU discovery may try), `RANKMESH_BIND` (IP address to bind) and
//! `RANKMESH_SAME_HOST` (`0`: QUIC even between ranks on one host),
//! `RANKMESH_TRANSPORT_THREADS` (`1` to `16`, or `auto`).
//! `RANKMESH_ALGORITHM` forces a collective algorithm. `RANKMESH_GPU_DEVICE`
//! picks the GPU of a process (default: its local rank). `RANKMESH_TRACE`
//! (a file: Chrome/Perfetto trace per rank) and `RANKMESH_FLIGHT_DIR` (where
//! flight-recorder dumps go).

use crate::config::Config;
use crate::pki::JobToken;
use crate::{Error, Result};
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::time::Duration;

/// Where and how a process joins a job: the launch contract. `rankrun`
/// (or Slurm plus two variables) sets it in the environment
/// ([`JoinSpec::from_env`]); a program that starts its own seed fills it in
/// (see `rankmesh::launch`).
#[derive(Clone, Debug)]
pub struct JoinSpec {
    /// The seed's address.
    pub seed: SocketAddr,
    /// The job token.
    pub token: JobToken,
    /// The job id the rank was started for (checked by the seed when set).
    pub job_id: Option<String>,
    /// The rank to ask for (`None`: any free rank).
    pub rank: Option<usize>,
    /// The world size the rank expects (checked by the seed when set).
    pub world_size: Option<usize>,
    /// This host's name, for messages that name the rank.
    pub host: String,
    /// Join an elastic job that is already running: the seed admits the
    /// process at the job's next membership point (`rank` and `world_size`
    /// are then ignored). `RANKMESH_JOIN=1`, set by `rankrun --join`.
    pub late: bool,
}

type Lookup<'a> = &'a dyn Fn(&str) -> Option<String>;

fn process_env(k: &str) -> Option<String> {
    std::env::var(k).ok().filter(|v| !v.is_empty())
}

fn parse_usize(get: Lookup<'_>, keys: &[&str]) -> Result<Option<usize>> {
    for k in keys {
        if let Some(v) = get(k) {
            return v
                .trim()
                .parse()
                .map(Some)
                .map_err(|_| Error::config(format!("{k}={v:?} is not a non-negative integer")));
        }
    }
    Ok(None)
}

fn parse_secs(get: Lookup<'_>, key: &str) -> Result<Option<Duration>> {
    match get(key) {
        None => Ok(None),
        Some(v) => match v.trim().parse::<f64>() {
            Ok(s) if s.is_finite() && s > 0.0 && s < 1e9 => Ok(Some(Duration::from_secs_f64(s))),
            _ => Err(Error::config(format!(
                "{key}={v:?} is not a positive number of seconds"
            ))),
        },
    }
}

impl JoinSpec {
    /// Read the launch contract from the process environment (the table in
    /// this module's documentation); the host name is this machine's.
    pub fn from_env() -> Result<JoinSpec> {
        Self::from_lookup(&process_env)
    }

    /// Read the contract through `get` (tests pass a map).
    pub(crate) fn from_lookup(get: Lookup<'_>) -> Result<JoinSpec> {
        let seed_s = get("RANKMESH_SEED").ok_or_else(|| {
            Error::config(
                "RANKMESH_SEED is not set: start this program with `rankrun -n N PROGRAM`, \
                 or set RANKMESH_SEED=host:port and RANKMESH_TOKEN from a running job",
            )
        })?;
        let seed = seed_s
            .to_socket_addrs()
            .map_err(|e| Error::config(format!("RANKMESH_SEED={seed_s:?} does not resolve: {e}")))?
            .next()
            .ok_or_else(|| Error::config(format!("RANKMESH_SEED={seed_s:?} has no address")))?;
        let token = match (get("RANKMESH_TOKEN"), get("RANKMESH_TOKEN_FILE")) {
            (Some(t), _) => JobToken::from_hex(&t)?,
            (None, Some(path)) => {
                let t = std::fs::read_to_string(&path).map_err(|e| {
                    Error::config(format!("RANKMESH_TOKEN_FILE={path:?} cannot be read: {e}"))
                })?;
                JobToken::from_hex(&t)?
            }
            (None, None) => {
                return Err(Error::config(
                    "neither RANKMESH_TOKEN nor RANKMESH_TOKEN_FILE is set: the job token \
                     comes from the launcher that started the seed",
                ))
            }
        };
        let world_size = parse_usize(get, &["RANKMESH_WORLD_SIZE", "SLURM_NTASKS"])?;
        let rank = parse_usize(get, &["RANKMESH_RANK", "SLURM_PROCID"])?;
        if let (Some(r), Some(n)) = (rank, world_size) {
            if r >= n {
                return Err(Error::config(format!(
                    "requested rank {r} is not below the world size {n}"
                )));
            }
        }
        // Placement on this host is read where it is used (the GPU index);
        // checked here so that a malformed value stops the join, not a
        // later device open.
        parse_usize(get, &["RANKMESH_LOCAL_RANK", "SLURM_LOCALID"])?;
        parse_usize(get, &["RANKMESH_LOCAL_SIZE"])?;
        Ok(JoinSpec {
            seed,
            token,
            world_size,
            rank,
            job_id: get("RANKMESH_JOB_ID"),
            host: hostname(),
            late: match get("RANKMESH_JOIN").as_deref().map(str::trim) {
                None | Some("0") | Some("false") => false,
                Some("1") | Some("true") => true,
                Some(v) => {
                    return Err(Error::config(format!(
                        "RANKMESH_JOIN={v:?}: expected 1 or 0"
                    )))
                }
            },
        })
    }
}

/// Most transport threads chosen when the configuration leaves it open.
const AUTO_TRANSPORT_THREADS: usize = 4;

/// The transport threads of a rank whose [`Config::transport_threads`] is
/// open: the cores available to the process divided by the ranks on its
/// host (`RANKMESH_LOCAL_SIZE`), from 1 to 4; 1 when the ranks on the host
/// are not known (a program that starts its own ranks may run them all
/// here, and extra threads on busy cores only cost).
pub(crate) fn default_transport_threads() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let local = std::env::var("RANKMESH_LOCAL_SIZE")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok());
    threads_for(cores, local)
}

/// Apply the data-path overrides only (`RANKMESH_TRANSPORT_THREADS`,
/// `RANKMESH_SAME_HOST`) from the process environment: a test harness that
/// otherwise runs exactly the configuration it is given can so be rerun on
/// another path.
pub(crate) fn apply_data_path_overrides(cfg: &mut Config) -> Result<()> {
    apply_overrides_from(cfg, &|k| {
        matches!(k, "RANKMESH_TRANSPORT_THREADS" | "RANKMESH_SAME_HOST")
            .then(|| process_env(k))
            .flatten()
    })
}

pub(crate) fn threads_for(cores: usize, local_size: Option<usize>) -> usize {
    match local_size.filter(|&n| n > 0) {
        Some(local) => (cores / local).clamp(1, AUTO_TRANSPORT_THREADS),
        None => 1,
    }
}

/// Apply `RANKMESH_*` overrides from the process environment to `cfg`.
pub fn apply_overrides(cfg: &mut Config) -> Result<()> {
    apply_overrides_from(cfg, &process_env)
}

fn apply_overrides_from(cfg: &mut Config, get: Lookup<'_>) -> Result<()> {
    if let Some(t) = parse_secs(get, "RANKMESH_OP_TIMEOUT")? {
        cfg.set_op_timeout(t);
    }
    if let Some(t) = parse_secs(get, "RANKMESH_FORMATION_TIMEOUT")? {
        cfg.set_formation_timeout(t);
    }
    if let Some(t) = parse_secs(get, "RANKMESH_IDLE_TIMEOUT")? {
        cfg.set_idle_timeout(t);
        if cfg.keep_alive() >= t {
            cfg.set_keep_alive(t / 3);
        }
    }
    if let Some(v) = get("RANKMESH_SPIN_US") {
        let us: u64 = v.trim().parse().map_err(|_| {
            Error::config(format!(
                "RANKMESH_SPIN_US={v:?}: expected whole microseconds (0: never poll a receive before sleeping)"
            ))
        })?;
        cfg.set_spin_wait(Duration::from_micros(us));
    }
    if let Some(v) = get("RANKMESH_MTU") {
        let bytes = v
            .trim()
            .parse::<u16>()
            .ok()
            .filter(|b| (1200..=65_000).contains(b))
            .ok_or_else(|| {
                Error::config(format!(
                    "RANKMESH_MTU={v:?}: expected the largest UDP payload path-MTU discovery may \
                     try, 1200 to 65000 bytes (8952 for 9000-byte jumbo frames)"
                ))
            })?;
        cfg.set_mtu_upper_bound(bytes);
    }
    if let Some(ip) = get("RANKMESH_BIND") {
        let ip: IpAddr = ip
            .trim()
            .parse()
            .map_err(|_| Error::config(format!("RANKMESH_BIND={ip:?} is not an IP address")))?;
        cfg.set_bind_ip(Some(ip));
    }
    if let Some(f) = get("RANKMESH_TRACE") {
        cfg.set_trace_file(Some(f.into()));
    }
    if let Some(d) = get("RANKMESH_FLIGHT_DIR") {
        cfg.set_flight_dir(Some(d.into()));
    }
    if let Some(v) = get("RANKMESH_TRANSPORT_THREADS") {
        let n = match v.trim() {
            "auto" => None,
            t => Some(
                t.parse::<usize>()
                    .ok()
                    .filter(|n| (1..=crate::config::MAX_TRANSPORT_THREADS).contains(n))
                    .ok_or_else(|| {
                        Error::config(format!(
                            "RANKMESH_TRANSPORT_THREADS={v:?}: expected 1 to {} (threads carrying \
                             this rank's QUIC traffic; 1: the caller's only) or auto",
                            crate::config::MAX_TRANSPORT_THREADS
                        ))
                    })?,
            ),
        };
        cfg.set_transport_threads(n);
    }
    if let Some(v) = get("RANKMESH_SAME_HOST") {
        let on = match v.trim() {
            "1" => true,
            "0" => false,
            other => {
                return Err(Error::config(format!(
                    "RANKMESH_SAME_HOST={other:?}: expected 1 (use the same-host channel) or 0 (QUIC only)"
                )))
            }
        };
        cfg.set_same_host_channel(on);
    }
    if let Some(a) = get("RANKMESH_ALGORITHM") {
        let a = a
            .trim()
            .parse()
            .map_err(|e| Error::config(format!("RANKMESH_ALGORITHM: {e}")))?;
        cfg.set_algorithm(Some(a));
    }
    cfg.validate()
}

/// Which GPU this process should use: `RANKMESH_GPU_DEVICE` when set,
/// else its rank on this host (`RANKMESH_LOCAL_RANK`, else
/// `SLURM_LOCALID`), else 0. Backends take it modulo their device count.
#[cfg_attr(not(any(feature = "wgpu", feature = "cuda")), allow(dead_code))]
pub fn gpu_device_index() -> Result<usize> {
    gpu_device_index_from(&process_env)
}

#[cfg_attr(not(any(feature = "wgpu", feature = "cuda")), allow(dead_code))]
fn gpu_device_index_from(get: Lookup<'_>) -> Result<usize> {
    Ok(parse_usize(
        get,
        &[
            "RANKMESH_GPU_DEVICE",
            "RANKMESH_LOCAL_RANK",
            "SLURM_LOCALID",
        ],
    )?
    .unwrap_or(0))
}

/// This host's name (for messages that name a rank's location).
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn gpu_device_follows_the_local_rank_unless_set() {
        let e = env(&[("RANKMESH_LOCAL_RANK", "3")]);
        assert_eq!(gpu_device_index_from(&|k| e.get(k).cloned()).unwrap(), 3);
        let e = env(&[("RANKMESH_LOCAL_RANK", "3"), ("RANKMESH_GPU_DEVICE", "1")]);
        assert_eq!(gpu_device_index_from(&|k| e.get(k).cloned()).unwrap(), 1);
        let e = env(&[]);
        assert_eq!(gpu_device_index_from(&|k| e.get(k).cloned()).unwrap(), 0);
        let e = env(&[("RANKMESH_GPU_DEVICE", "x")]);
        assert!(gpu_device_index_from(&|k| e.get(k).cloned()).is_err());
    }

    #[test]
    fn reads_the_launcher_contract() {
        let tok = JobToken::generate().unwrap();
        let m = env(&[
            ("RANKMESH_SEED", "127.0.0.1:5000"),
            ("RANKMESH_TOKEN", &tok.to_hex()),
            ("RANKMESH_WORLD_SIZE", "4"),
            ("RANKMESH_RANK", "2"),
            ("RANKMESH_JOB_ID", "abc"),
        ]);
        let e = JoinSpec::from_lookup(&|k| m.get(k).cloned()).unwrap();
        assert_eq!(e.seed, "127.0.0.1:5000".parse().unwrap());
        assert_eq!(e.token, tok);
        assert_eq!((e.world_size, e.rank), (Some(4), Some(2)));
        assert_eq!(e.job_id.as_deref(), Some("abc"));
    }

    #[test]
    fn slurm_variables_fill_in() {
        let tok = JobToken::generate().unwrap();
        let m = env(&[
            ("RANKMESH_SEED", "127.0.0.1:5000"),
            ("RANKMESH_TOKEN", &tok.to_hex()),
            ("SLURM_NTASKS", "8"),
            ("SLURM_PROCID", "5"),
            ("SLURM_LOCALID", "1"),
        ]);
        let e = JoinSpec::from_lookup(&|k| m.get(k).cloned()).unwrap();
        assert_eq!((e.world_size, e.rank), (Some(8), Some(5)));
        assert_eq!(gpu_device_index_from(&|k| m.get(k).cloned()).unwrap(), 1);
    }

    #[test]
    fn missing_or_bad_values_say_what_to_do() {
        let m = env(&[]);
        let e = JoinSpec::from_lookup(&|k| m.get(k).cloned()).unwrap_err();
        assert!(e.to_string().contains("rankrun"), "{e}");
        let m = env(&[("RANKMESH_SEED", "127.0.0.1:1")]);
        let e = JoinSpec::from_lookup(&|k| m.get(k).cloned()).unwrap_err();
        assert!(e.to_string().contains("RANKMESH_TOKEN"), "{e}");
        let tok = JobToken::generate().unwrap().to_hex();
        let m = env(&[
            ("RANKMESH_SEED", "127.0.0.1:1"),
            ("RANKMESH_TOKEN", &tok),
            ("RANKMESH_RANK", "x"),
        ]);
        let e = JoinSpec::from_lookup(&|k| m.get(k).cloned()).unwrap_err();
        assert!(e.to_string().contains("RANKMESH_RANK"), "{e}");
        let m = env(&[
            ("RANKMESH_SEED", "127.0.0.1:1"),
            ("RANKMESH_TOKEN", &tok),
            ("RANKMESH_RANK", "4"),
            ("RANKMESH_WORLD_SIZE", "4"),
        ]);
        assert!(JoinSpec::from_lookup(&|k| m.get(k).cloned()).is_err());
    }

    #[test]
    fn config_overrides() {
        let m = env(&[
            ("RANKMESH_OP_TIMEOUT", "2.5"),
            ("RANKMESH_IDLE_TIMEOUT", "0.9"),
            ("RANKMESH_BIND", "127.0.0.1"),
            ("RANKMESH_SAME_HOST", "0"),
            ("RANKMESH_SPIN_US", " 0 "),
        ]);
        let mut c = Config::default();
        assert!(c.same_host_channel());
        assert!(!c.spin_wait().is_zero());
        apply_overrides_from(&mut c, &|k| m.get(k).cloned()).unwrap();
        assert!(!c.same_host_channel());
        assert!(c.spin_wait().is_zero());
        assert_eq!(c.op_timeout(), Duration::from_millis(2500));
        assert_eq!(c.idle_timeout(), Duration::from_millis(900));
        assert!(c.keep_alive() < c.idle_timeout());
        let m = env(&[("RANKMESH_OP_TIMEOUT", "-1")]);
        assert!(apply_overrides_from(&mut c, &|k| m.get(k).cloned()).is_err());
        let m = env(&[("RANKMESH_SAME_HOST", "yes")]);
        let e = apply_overrides_from(&mut c, &|k| m.get(k).cloned()).unwrap_err();
        assert!(e.to_string().contains("RANKMESH_SAME_HOST"), "{e}");
        let m = env(&[("RANKMESH_SPIN_US", "20us")]);
        let e = apply_overrides_from(&mut c, &|k| m.get(k).cloned()).unwrap_err();
        assert!(e.to_string().contains("RANKMESH_SPIN_US"), "{e}");
        let m = env(&[("RANKMESH_SPIN_US", "120")]);
        apply_overrides_from(&mut c, &|k| m.get(k).cloned()).unwrap();
        assert_eq!(c.spin_wait(), Duration::from_micros(120));
        let m = env(&[("RANKMESH_MTU", "8952")]);
        apply_overrides_from(&mut c, &|k| m.get(k).cloned()).unwrap();
        assert_eq!(c.mtu_upper_bound(), 8952);
        for bad in ["900", "70000", "9k"] {
            let m = env(&[("RANKMESH_MTU", bad)]);
            let e = apply_overrides_from(&mut c, &|k| m.get(k).cloned()).unwrap_err();
            assert!(e.to_string().contains("RANKMESH_MTU"), "{e}");
        }
        assert_eq!(c.mtu_upper_bound(), 8952);
        let m = env(&[("RANKMESH_TRANSPORT_THREADS", "4")]);
        apply_overrides_from(&mut c, &|k| m.get(k).cloned()).unwrap();
        assert_eq!(c.transport_threads(), Some(4));
        for bad in ["0", "17", "many"] {
            let m = env(&[("RANKMESH_TRANSPORT_THREADS", bad)]);
            let e = apply_overrides_from(&mut c, &|k| m.get(k).cloned()).unwrap_err();
            assert!(e.to_string().contains("RANKMESH_TRANSPORT_THREADS"), "{e}");
        }
        assert_eq!(c.transport_threads(), Some(4));
        let m = env(&[("RANKMESH_TRANSPORT_THREADS", "auto")]);
        apply_overrides_from(&mut c, &|k| m.get(k).cloned()).unwrap();
        assert_eq!(c.transport_threads(), None);
    }

    #[test]
    fn transport_threads_default_to_the_cores_per_local_rank() {
        assert_eq!(threads_for(16, None), 1);
        assert_eq!(threads_for(16, Some(1)), 4);
        assert_eq!(threads_for(16, Some(8)), 2);
        assert_eq!(threads_for(16, Some(16)), 1);
        assert_eq!(threads_for(2, Some(4)), 1);
        assert_eq!(threads_for(2, Some(0)), 1);
        assert_eq!(threads_for(2, Some(1)), 2);
        assert_eq!(threads_for(12, Some(4)), 3);
    }
}
