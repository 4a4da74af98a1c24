//! Building the processes: local ranks, remote ranks through the launch
//! agent, and `srun` under Slurm.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::process::Stdio;
use std::time::Duration;
use tokio::process::Command;

/// Quote one word for a POSIX shell: `'...'` with `'` written as `'\''`.
pub fn sh_quote(s: &[u8]) -> String {
    let s = String::from_utf8_lossy(s);
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-./=:,@%+".contains(&b))
    {
        return s.into_owned();
    }
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// Split a template like a shell would split words (quotes and backslashes;
/// no expansions).
pub fn split_words(s: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(x) => cur.push(x),
                        None => return Err(format!("unterminated ' in {s:?}")),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(x) => cur.push(x),
                            None => return Err(format!("trailing \\ in {s:?}")),
                        },
                        Some(x) => cur.push(x),
                        None => return Err(format!("unterminated \" in {s:?}")),
                    }
                }
            }
            '\\' => {
                in_word = true;
                match chars.next() {
                    Some(x) => cur.push(x),
                    None => return Err(format!("trailing \\ in {s:?}")),
                }
            }
            c if c.is_whitespace() => {
                if in_word {
                    out.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                in_word = true;
                cur.push(c);
            }
        }
    }
    if in_word {
        out.push(cur);
    }
    Ok(out)
}

/// The agent's argv for running `command_line` on `host`: `{host}` and
/// `{command}` in the template are replaced; missing ones are appended.
pub fn agent_argv(template: &str, host: &str, command_line: &str) -> Result<Vec<String>, String> {
    let mut words = split_words(template)?;
    if words.is_empty() {
        return Err("--launch-agent is empty".into());
    }
    let has_host = words.iter().any(|w| w.contains("{host}"));
    let has_cmd = words.iter().any(|w| w.contains("{command}"));
    if !has_host {
        words.push("{host}".into());
    }
    if !has_cmd {
        words.push("{command}".into());
    }
    Ok(words
        .into_iter()
        .map(|w| {
            if w == "{command}" {
                command_line.to_string()
            } else {
                w.replace("{host}", host)
            }
        })
        .collect())
}

/// The shell command line a remote rank runs. The job token arrives as the
/// first line of standard input (never on a command line); the rest of
/// standard input stays open for the rank's lifetime, and when it closes
/// (the agent and so rankrun went away) the rank gets SIGTERM, then SIGKILL
/// after `grace`.
pub fn remote_script(
    cwd: Option<&OsStr>,
    env: &[(String, String)],
    command: &[OsString],
    grace: Duration,
) -> String {
    let mut s = String::from("IFS= read -r RANKMESH_TOKEN || exit 126; export RANKMESH_TOKEN; ");
    if let Some(d) = cwd {
        s.push_str(&format!("cd {} 2>/dev/null; ", sh_quote(d.as_bytes())));
    }
    for (k, v) in env {
        s.push_str(&format!("export {k}={}; ", sh_quote(v.as_bytes())));
    }
    let argv: Vec<String> = command.iter().map(|a| sh_quote(a.as_bytes())).collect();
    s.push_str("exec 3<&0; ");
    s.push_str(&format!("{} </dev/null 3<&- & rr_p=$!; ", argv.join(" ")));
    s.push_str(&format!(
        "{{ cat >/dev/null; kill -TERM $rr_p; sleep {}; kill -KILL $rr_p; }} <&3 >/dev/null 2>&1 & rr_w=$!; ",
        grace.as_secs().max(1)
    ));
    s.push_str("exec 3<&-; wait $rr_p; rr_s=$?; kill $rr_w 2>/dev/null; exit $rr_s");
    s
}

/// Make a command its own process group leader that dies with rankrun.
pub fn detach_and_tie(cmd: &mut Command) {
    cmd.process_group(0);
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs in the child between fork and exec and only
    // calls async-signal-safe functions (prctl, getppid, no allocation).
    // PR_SET_PDEATHSIG makes the kernel send SIGKILL to the child when the
    // thread that forked it (rankrun's main thread, which runs the whole
    // current-thread runtime) ends; the getppid check closes the race where
    // rankrun died before prctl ran.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                return Err(std::io::Error::other("rankrun exited"));
            }
            Ok(())
        });
    }
}

/// A command with piped output, its own process group, tied to rankrun.
pub fn base_command(program: &OsStr, args: &[OsString], stdin_piped: bool) -> Command {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(if stdin_piped {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .kill_on_drop(false);
    detach_and_tie(&mut cmd);
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(sh_quote(b"abc"), "abc");
        assert_eq!(sh_quote(b""), "''");
        assert_eq!(sh_quote(b"a b"), "'a b'");
        assert_eq!(sh_quote(b"it's"), "'it'\\''s'");
        assert_eq!(sh_quote(b"$HOME"), "'$HOME'");
    }

    #[test]
    fn templates() {
        assert_eq!(
            agent_argv("ssh -p 2222", "h", "echo hi").unwrap(),
            vec!["ssh", "-p", "2222", "h", "echo hi"]
        );
        assert_eq!(
            agent_argv("ip netns exec {host} sh -c", "ns1", "x y").unwrap(),
            vec!["ip", "netns", "exec", "ns1", "sh", "-c", "x y"]
        );
        assert_eq!(
            agent_argv("ssh user@{host} {command}", "h", "c").unwrap(),
            vec!["ssh", "user@h", "c"]
        );
        assert_eq!(
            split_words(r#"a "b c" 'd e' f\ g"#).unwrap(),
            vec!["a", "b c", "d e", "f g"]
        );
        assert!(split_words("'x").is_err());
    }

    #[test]
    fn script_runs_under_sh() {
        let script = remote_script(
            None,
            &[("V".into(), "a 'quoted' $value".into())],
            &[
                "sh".into(),
                "-c".into(),
                "echo \"$V|$RANKMESH_TOKEN\"".into(),
            ],
            Duration::from_secs(1),
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let out = rt.block_on(async {
            use tokio::io::AsyncWriteExt;
            let mut c = Command::new("sh")
                .arg("-c")
                .arg(&script)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            let mut i = c.stdin.take().unwrap();
            i.write_all(b"secret\n").await.unwrap();
            // Standard input stays open while the rank runs (closing it
            // means "rankrun is gone" and ends the rank).
            let out = c.wait_with_output().await.unwrap();
            drop(i);
            out
        });
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "a 'quoted' $value|secret\n"
        );
        assert!(out.status.success());
    }
}
