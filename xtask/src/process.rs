//! Child processes: running commands (and showing them), finding programs, and
//! watching and signalling processes by PID.

use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// How often to re-check a process or port we are waiting on.
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// How many trailing log lines to quote in an error.
const LOG_TAIL_LINES: usize = 30;

/// Renders `cmd` as a shell-like line, quoting arguments that need it.
pub fn display(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(quote)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Quotes one word for display with single quotes if it is not plainly safe.
fn quote(word: &OsStr) -> String {
    let word = word.to_string_lossy();
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,@+%".contains(c));
    if plain {
        word.into_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// Prints `cmd` on stderr the way a shell trace would.
pub fn echo(cmd: &Command) {
    eprintln!("$ {}", display(cmd));
}

/// Shows and runs `cmd` with inherited stdio and returns its exit status.
///
/// Fails only if the command could not be started; a non-zero exit is for the
/// caller to judge.
pub fn run(cmd: &mut Command) -> Result<ExitStatus> {
    echo(cmd);
    cmd.status()
        .with_context(|| format!("failed to start `{}`", display(cmd)))
}

/// Shows and runs `cmd` with its stdout and stderr appended to `log`.
///
/// Fails if the command cannot start or exits unsuccessfully; the error quotes
/// the end of `log`.
pub fn run_logged(cmd: &mut Command, log: &Path) -> Result<()> {
    let out = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("failed to open log file {}", log.display()))?;
    let err = out
        .try_clone()
        .with_context(|| format!("failed to duplicate log file handle {}", log.display()))?;
    echo(cmd);
    let status = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .status()
        .with_context(|| format!("failed to start `{}`", display(cmd)))?;
    if !status.success() {
        bail!(
            "`{}` exited with {status}; see {}\n{}",
            display(cmd),
            log.display(),
            tail(log)
        );
    }
    Ok(())
}

/// Runs `cmd` quietly and returns its trimmed stdout; fails if it exits
/// unsuccessfully. For probes such as `id -u`, not for actions.
pub fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("failed to start `{}`", display(cmd)))?;
    if !out.status.success() {
        bail!(
            "`{}` exited with {}: {}",
            display(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Runs `cmd` quietly and reports only whether it exited successfully.
pub fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// Returns the last lines of the file at `path`, indented, for error messages.
pub fn tail(path: &Path) -> String {
    match fs::read_to_string(path) {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            let start = lines.len().saturating_sub(LOG_TAIL_LINES);
            let mut out = format!("--- last lines of {} ---", path.display());
            for line in &lines[start..] {
                out.push_str("\n  ");
                out.push_str(line);
            }
            out
        }
        Err(err) => format!("(could not read {}: {err})", path.display()),
    }
}

/// Opens (truncating) a log file for a child's stdout and stderr.
pub fn log_stdio(log: &Path) -> Result<(Stdio, Stdio)> {
    let out = File::create(log)
        .with_context(|| format!("failed to create log file {}", log.display()))?;
    let err = out
        .try_clone()
        .with_context(|| format!("failed to duplicate log file handle {}", log.display()))?;
    Ok((out.into(), err.into()))
}

/// Finds `name` in a directory of `$PATH`, like `command -v`.
pub fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// Whether the current user is root (`id -u` is 0).
pub fn is_root() -> Result<bool> {
    let uid = output(Command::new("id").arg("-u")).context("failed to query the current uid")?;
    Ok(uid == "0")
}

/// Whether `pid` is a live (not zombie) process whose command line mentions
/// `name`.
///
/// Checking the name keeps us from signalling an unrelated process that reused
/// a recorded PID. Uses `/proc` where it exists and falls back to `kill -0`.
pub fn is_alive(pid: u32, name: &str) -> bool {
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    if !Path::new("/proc/self").exists() {
        return succeeds(Command::new("kill").args(["-0", &pid.to_string()]));
    }
    let Ok(stat) = fs::read_to_string(proc_dir.join("stat")) else {
        return false;
    };
    // The state letter follows the parenthesised command name, which may itself
    // contain spaces or parentheses.
    let state = stat
        .rfind(')')
        .and_then(|end| stat[end + 1..].split_whitespace().next());
    if matches!(state, None | Some("Z" | "X")) {
        return false;
    }
    fs::read(proc_dir.join("cmdline"))
        .is_ok_and(|cmdline| String::from_utf8_lossy(&cmdline).contains(name))
}

/// Sends `signal` (a name such as `INT`) to `pid` with `kill(1)`.
pub fn signal(pid: u32, signal: &str) -> Result<()> {
    let mut cmd = Command::new("kill");
    cmd.args(["-s", signal, &pid.to_string()]);
    echo(&cmd);
    output(&mut cmd).with_context(|| format!("failed to send SIG{signal} to pid {pid}"))?;
    Ok(())
}

/// Waits up to `timeout` for process `pid` (named `name`) to exit.
fn wait_for_exit(pid: u32, name: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while is_alive(pid, name) {
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(POLL_INTERVAL);
    }
    true
}

/// Stops process `pid` (named `name`): sends `first_signal`, waits up to
/// `grace` for it to exit, then sends SIGKILL.
///
/// Does nothing if the process is already gone (or the PID now belongs to a
/// process not named `name`).
pub fn stop(pid: u32, name: &str, first_signal: &str, grace: Duration) -> Result<()> {
    if !is_alive(pid, name) {
        eprintln!("{name} (pid {pid}) is not running");
        return Ok(());
    }
    signal(pid, first_signal)?;
    if wait_for_exit(pid, name, grace) {
        return Ok(());
    }
    eprintln!(
        "{name} (pid {pid}) still running {}s after SIG{first_signal}; killing it",
        grace.as_secs()
    );
    signal(pid, "KILL")?;
    if !wait_for_exit(pid, name, Duration::from_secs(5)) {
        bail!("{name} (pid {pid}) survived SIGKILL");
    }
    Ok(())
}
