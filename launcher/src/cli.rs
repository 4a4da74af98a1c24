//! The command line, and turning it into a checked [`Plan`].

use crate::place::{self, HostSpec};
use clap::{Parser, ValueEnum};
use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

/// How output lines are tagged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum TagMode {
    /// `[r] line`
    Rank,
    /// `[host:r] line`
    Host,
}

/// rankrun: start N processes of PROGRAM as one rankmesh job.
#[derive(Parser, Debug)]
#[command(
    name = "rankrun",
    version,
    about = "Launch a rankmesh job: N processes of PROGRAM, one per rank",
    after_help = "See docs/launcher.md for examples (ssh hosts, Slurm, Kubernetes)."
)]
pub struct Cli {
    /// Number of ranks (default: the number of slots of --host/--hostfile,
    /// or SLURM_NTASKS inside a Slurm allocation)
    #[arg(short = 'n', long = "np", value_name = "N")]
    pub np: Option<usize>,

    /// Hosts and their slots, filled in order: `a:2,b:2` (a host without
    /// `:N` has one slot); may be repeated
    #[arg(long = "host", value_name = "HOST[:SLOTS],...")]
    pub host: Vec<String>,

    /// File of hosts, one per line: `host slots=N` (`#` starts a comment)
    #[arg(long, value_name = "FILE")]
    pub hostfile: Option<PathBuf>,

    /// Start more ranks than slots (wrapping around the hosts) instead of
    /// refusing
    #[arg(long)]
    pub oversubscribe: bool,

    /// Command that runs a command line on a remote host: `{host}` and
    /// `{command}` are replaced; without them the host and then the command
    /// line are appended as two arguments
    #[arg(long, value_name = "TEMPLATE", default_value = "ssh")]
    pub launch_agent: String,

    /// Address (IP or name, optional :PORT) the seed listens on and ranks
    /// connect to (default: loopback when every rank is local, else the
    /// address of the interface that routes to the first remote host)
    #[arg(long, value_name = "ADDR[:PORT]")]
    pub seed_addr: Option<String>,

    /// Tag output lines with the rank (`[r]`) or host and rank (`[host:r]`)
    #[arg(long, value_enum, value_name = "MODE", default_value = "rank")]
    pub tag_output: TagMode,

    /// No output tags, no progress or summary lines (failures are still
    /// reported)
    #[arg(short, long)]
    pub quiet: bool,

    /// Also write each rank's output (untagged) to DIR/rank.N.log
    #[arg(long, value_name = "DIR")]
    pub output_dir: Option<PathBuf>,

    /// Pass VAR (from rankrun's environment) or VAR=VALUE to every rank;
    /// may be repeated
    #[arg(short = 'x', value_name = "VAR[=VALUE]")]
    pub export: Vec<String>,

    /// Pass the variables in FILE (`VAR=VALUE` lines) to every rank; may be
    /// repeated
    #[arg(long, value_name = "FILE")]
    pub env_file: Vec<PathBuf>,

    /// Seconds between SIGTERM and SIGKILL when ending a job
    #[arg(long, value_name = "SECS", default_value = "5", value_parser = parse_secs)]
    pub grace: Duration,

    /// End the job if it runs longer than SECS (exit code 124)
    #[arg(long, value_name = "SECS", value_parser = parse_secs)]
    pub timeout: Option<Duration>,

    /// End the job if not every rank joined within SECS, naming the missing
    /// ranks and their hosts (exit code 124); 0 waits forever
    #[arg(long, value_name = "SECS", default_value = "60", value_parser = parse_secs0)]
    pub join_timeout: Duration,

    /// Ignore a Slurm allocation (SLURM_JOB_ID) and place ranks as without it
    #[arg(long)]
    pub no_slurm: bool,

    /// An elastic job: processes may join at checkpoints (`rankrun --join`)
    /// up to MAX ranks, and the job goes on without lost ranks down to MIN;
    /// a rank that fails does not end the others
    #[arg(long, value_name = "MIN:MAX", value_parser = parse_elastic)]
    pub elastic: Option<(usize, usize)>,

    /// Start -n processes that join the running elastic job whose seed is
    /// at ADDR (shown by that job's rankrun); the token comes from
    /// --token-file or RANKMESH_TOKEN
    #[arg(long, value_name = "SEED_ADDR", conflicts_with_all = ["elastic", "hostfile"])]
    pub join: Option<String>,

    /// With --elastic: write the job token to FILE (mode 0600, must not
    /// exist) for `rankrun --join`; with --join: read the token from FILE
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,

    /// The program to run and its arguments (use `--` before a program
    /// whose name starts with `-`)
    #[arg(
        value_name = "PROGRAM",
        required = true,
        num_args = 1..,
        trailing_var_arg = true
    )]
    pub command: Vec<OsString>,
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v < 1e9 => Ok(Duration::from_secs_f64(v)),
        _ => Err(format!("{s:?} is not a positive number of seconds")),
    }
}

fn parse_elastic(s: &str) -> Result<(usize, usize), String> {
    let (a, b) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?}: expected MIN:MAX, e.g. 2:8"))?;
    let min: usize = a
        .trim()
        .parse()
        .map_err(|_| format!("{s:?}: MIN is not a number"))?;
    let max: usize = b
        .trim()
        .parse()
        .map_err(|_| format!("{s:?}: MAX is not a number"))?;
    if min == 0 || min > max {
        return Err(format!("{s:?}: need 1 <= MIN <= MAX"));
    }
    Ok((min, max))
}

fn parse_secs0(s: &str) -> Result<Duration, String> {
    if s.trim().parse::<f64>() == Ok(0.0) {
        Ok(Duration::ZERO)
    } else {
        parse_secs(s)
    }
}

/// Where ranks run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// Ranks started by rankrun, locally or through the launch agent.
    Hosts(Vec<HostSpec>),
    /// One `srun` starts every rank inside the Slurm allocation.
    Slurm,
}

/// A checked command line.
#[derive(Debug)]
pub struct Plan {
    pub cli: Cli,
    pub np: usize,
    pub mode: Mode,
    /// Variables for every rank, in order (later ones win).
    pub env: Vec<(String, String)>,
}

impl Plan {
    /// PROGRAM.
    pub fn command_program(&self) -> OsString {
        self.cli.command.first().cloned().unwrap_or_default()
    }

    /// ARGS.
    pub fn command_args(&self) -> Vec<OsString> {
        self.cli.command.iter().skip(1).cloned().collect()
    }
}

/// Check a variable name: `[A-Za-z_][A-Za-z0-9_]*`.
pub fn valid_name(k: &str) -> bool {
    let mut c = k.chars();
    matches!(c.next(), Some(f) if f == '_' || f.is_ascii_alphabetic())
        && c.all(|x| x == '_' || x.is_ascii_alphanumeric())
}

fn lookup(k: &str, what: &str) -> Result<String, String> {
    std::env::var(k).map_err(|_| {
        format!("{what}: {k} is not set in rankrun's environment (give a value: {k}=VALUE)")
    })
}

/// Parse one `VAR` or `VAR=VALUE` item.
fn env_item(item: &str, what: &str) -> Result<(String, String), String> {
    let (k, v) = match item.split_once('=') {
        Some((k, v)) => (k.trim().to_string(), Some(v.to_string())),
        None => (item.trim().to_string(), None),
    };
    if !valid_name(&k) {
        return Err(format!("{what}: {k:?} is not a valid variable name"));
    }
    let v = match v {
        Some(v) => v,
        None => lookup(&k, what)?,
    };
    Ok((k, v))
}

/// Parse an env file: `VAR=VALUE` lines, optional `export `, `#` comments,
/// values optionally in matching single or double quotes (taken literally).
pub fn parse_env_file(text: &str, name: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let l = line.trim();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        let l = l.strip_prefix("export ").map(str::trim_start).unwrap_or(l);
        let what = format!("{name} line {}", i + 1);
        let (k, mut v) = env_item(l, &what)?;
        let b = v.as_bytes();
        if b.len() >= 2 && (b[0] == b'"' || b[0] == b'\'') && b[b.len() - 1] == b[0] {
            v = v[1..v.len() - 1].to_string();
        }
        out.push((k, v));
    }
    Ok(out)
}

impl Cli {
    /// Check the command line against the environment and files it names.
    pub fn plan(self) -> Result<Plan, String> {
        if let Some(0) = self.np {
            return Err("-n must be at least 1".into());
        }
        if self.command.first().is_none_or(|p| p.is_empty()) {
            return Err("no PROGRAM given (usage: rankrun -n N PROGRAM [ARGS]...)".into());
        }
        let mut env = Vec::new();
        for f in &self.env_file {
            let text = std::fs::read_to_string(f)
                .map_err(|e| format!("--env-file {}: {e}", f.display()))?;
            env.extend(parse_env_file(&text, &f.display().to_string())?);
        }
        for x in &self.export {
            env.push(env_item(x, &format!("-x {x}"))?);
        }
        let mut hosts = Vec::new();
        for h in &self.host {
            hosts.extend(place::parse_host_list(h).map_err(|e| format!("--host {h}: {e}"))?);
        }
        if let Some(f) = &self.hostfile {
            let text = std::fs::read_to_string(f)
                .map_err(|e| format!("--hostfile {}: {e}", f.display()))?;
            let hs = place::parse_hostfile(&text)
                .map_err(|e| format!("--hostfile {}: {e}", f.display()))?;
            if hs.is_empty() {
                return Err(format!("--hostfile {}: no hosts in the file", f.display()));
            }
            hosts.extend(hs);
        }
        let slurm = !self.no_slurm
            && hosts.is_empty()
            && std::env::var_os("SLURM_JOB_ID").is_some_and(|v| !v.is_empty());
        let (np, mode) = if slurm {
            let np = match self.np {
                Some(n) => n,
                None => std::env::var("SLURM_NTASKS")
                    .ok()
                    .and_then(|v| v.trim().parse::<usize>().ok())
                    .filter(|&n| n > 0)
                    .ok_or("-n is required (SLURM_NTASKS is not set in this allocation)")?,
            };
            (np, Mode::Slurm)
        } else {
            if hosts.is_empty() {
                let np = self.np.ok_or("-n N is required (the number of ranks)")?;
                hosts.push(HostSpec {
                    name: "localhost".into(),
                    slots: np,
                });
            }
            let total: usize = hosts.iter().map(|h| h.slots).sum();
            let np = self.np.unwrap_or(total);
            if np > total && !self.oversubscribe {
                return Err(format!(
                    "not enough slots: {np} ranks requested, the hosts have {total} slot(s) \
                     ({}); add hosts or slots, or pass --oversubscribe",
                    hosts
                        .iter()
                        .map(|h| format!("{}:{}", h.name, h.slots))
                        .collect::<Vec<_>>()
                        .join(",")
                ));
            }
            (np, Mode::Hosts(hosts))
        };
        if let Some(d) = &self.output_dir {
            std::fs::create_dir_all(d).map_err(|e| format!("--output-dir {}: {e}", d.display()))?;
        }
        if let Some((min, max)) = self.elastic {
            if np < min || np > max {
                return Err(format!(
                    "--elastic {min}:{max}: the job starts with -n {np} ranks, outside MIN:MAX"
                ));
            }
            if matches!(mode, Mode::Slurm) {
                return Err("--elastic is not supported under Slurm yet (pass --no-slurm)".into());
            }
        }
        if self.join.is_some() && matches!(mode, Mode::Slurm) {
            return Err("--join is not supported under Slurm yet (pass --no-slurm)".into());
        }
        if self.token_file.is_some() && self.elastic.is_none() && self.join.is_none() {
            return Err("--token-file is for --elastic (write) or --join (read)".into());
        }
        Ok(Plan {
            cli: self,
            np,
            mode,
            env,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_file_lines() {
        let v = parse_env_file(
            "# c\n\nA=1\nexport B=\"two words\"\nC='it''s'\nD=x=y\n",
            "f",
        )
        .unwrap();
        assert_eq!(
            v,
            vec![
                ("A".into(), "1".into()),
                ("B".into(), "two words".into()),
                ("C".into(), "it''s".into()),
                ("D".into(), "x=y".into()),
            ]
        );
        assert!(parse_env_file("1A=2", "f").is_err());
    }

    #[test]
    fn names() {
        assert!(valid_name("_A1"));
        assert!(!valid_name("1A"));
        assert!(!valid_name("A-B"));
        assert!(!valid_name(""));
    }

    #[test]
    fn secs() {
        assert_eq!(parse_secs("1.5").unwrap(), Duration::from_millis(1500));
        assert!(parse_secs("0").is_err());
        assert!(parse_secs("x").is_err());
        assert_eq!(parse_secs0("0").unwrap(), Duration::ZERO);
    }
}
