//! A local S3-compatible server for tests: `moto_server` on 127.0.0.1.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::net;
use crate::process;
use crate::services::Layout;

/// The program name, looked up on `$PATH`; also matched against a PID's
/// command line before signalling it.
const PROGRAM: &str = "moto_server";

/// How long moto (a Python program) may take to start answering HTTP.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);

/// How long moto may take to exit after SIGTERM before it is killed.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// A moto server started by `services up`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Moto {
    /// PID of the `moto_server` process.
    pub pid: u32,
    /// HTTP port on 127.0.0.1.
    pub port: u16,
}

impl Moto {
    /// The S3 endpoint URL tests use.
    pub fn endpoint(&self) -> String {
        format!("http://{}:{}", net::HOST, self.port)
    }

    /// Whether the process is alive and answering HTTP.
    pub fn is_healthy(&self) -> bool {
        process::is_alive(self.pid, PROGRAM) && net::http_answers(self.port)
    }

    /// SIGTERM, then SIGKILL if it is still running after the grace period.
    pub fn stop(&self) -> Result<()> {
        process::stop(self.pid, PROGRAM, "TERM", SHUTDOWN_GRACE)
            .with_context(|| format!("failed to stop moto_server (pid {})", self.pid))
    }
}

/// Finds `moto_server` on `$PATH`.
pub fn find_program() -> Result<PathBuf> {
    process::find_on_path(PROGRAM).with_context(|| {
        format!("{PROGRAM} is not on PATH; install it with `python3 -m pip install 'moto[server]'`")
    })
}

/// Starts `program` (see [`find_program`]) on 127.0.0.1:`port`, detached in
/// its own process group so it outlives xtask, and returns once it answers
/// HTTP.
pub fn start(layout: &Layout, program: &Path, port: u16) -> Result<Moto> {
    let log = layout.moto_log();
    let (stdout, stderr) = process::log_stdio(&log)?;
    let mut cmd = Command::new(program);
    cmd.args(["-H", &net::HOST.to_string(), "-p", &port.to_string()])
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .current_dir(&layout.state_dir)
        // Its own process group: a Ctrl-C aimed at xtask does not reach it.
        .process_group(0);
    process::echo(&cmd);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("failed to start {PROGRAM}; see {}", log.display()))?;
    let moto = Moto {
        pid: child.id(),
        port,
    };

    let ready = net::wait_until(
        &format!("{PROGRAM} to answer HTTP on 127.0.0.1:{port}"),
        STARTUP_TIMEOUT,
        || {
            if let Some(status) = child
                .try_wait()
                .with_context(|| format!("failed to check on {PROGRAM} (pid {})", moto.pid))?
            {
                bail!("{PROGRAM} exited with {status}");
            }
            Ok(net::accepts(port) && net::http_answers(port))
        },
    );
    if let Err(err) = ready {
        // Best effort: do not leave a half-started server behind.
        if let Err(stop_err) = moto.stop() {
            eprintln!("warning: {stop_err:#}");
        }
        return Err(err.context(format!(
            "{PROGRAM} did not come up; see {}\n{}",
            log.display(),
            process::tail(&log)
        )));
    }
    // Dropping `child` neither kills nor waits for it: the server keeps running.
    Ok(moto)
}
