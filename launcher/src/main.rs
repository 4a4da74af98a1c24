//! `rankrun`: start N processes of a program as one rankmesh job.
//!
//! See docs/launcher.md. Exit codes: the first failing rank's code (128 +
//! signal for a rank killed by a signal), 124 when `--timeout` or
//! `--join-timeout` ended the job, 128 + signal when rankrun itself was
//! interrupted, 127 when a rank could not be started, 2 for a bad command
//! line or setup error.

mod cli;
mod job;
mod launch;
mod output;
mod place;
mod spawn;

use clap::error::ErrorKind;
use clap::Parser;

fn main() {
    let cli = match cli::Cli::try_parse() {
        Ok(c) => c,
        Err(e) => match e.kind() {
            ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
                let _ = e.print();
                std::process::exit(0);
            }
            _ => {
                let text = e.to_string();
                // clap's message spans lines; keep the part before the usage
                // and tips, on one line.
                let parts: Vec<&str> = text
                    .lines()
                    .map(str::trim)
                    .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more"))
                    .filter(|l| !l.is_empty() && !l.starts_with("tip:"))
                    .collect();
                let line = parts.join(" ");
                let line = line.strip_prefix("error: ").unwrap_or(&line);
                let line = if line.is_empty() {
                    "invalid command line"
                } else {
                    line
                };
                eprintln!("rankrun: error: {line} (see rankrun --help)");
                std::process::exit(2);
            }
        },
    };
    let plan = match cli.plan() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("rankrun: error: {e}");
            std::process::exit(2);
        }
    };
    // One thread runs everything: PR_SET_PDEATHSIG of every child is tied
    // to the thread that forked it, which must live as long as rankrun.
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("rankrun: error: cannot start the runtime: {e}");
            std::process::exit(2);
        }
    };
    let code = rt.block_on(job::run(plan));
    drop(rt);
    std::process::exit(code);
}
