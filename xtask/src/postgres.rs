//! A throwaway PostgreSQL server for tests: `initdb` a fresh cluster and start
//! it with `pg_ctl`, listening on 127.0.0.1 only.
//!
//! PostgreSQL refuses to run as root, so when xtask runs as root every
//! PostgreSQL command runs as the `postgres` user via `runuser`, on directories
//! that user owns.

use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::net;
use crate::process;
use crate::services::Layout;

/// The OS user (and database superuser) PostgreSQL runs as.
const PG_USER: &str = "postgres";

/// Where Debian-style packages install the server binaries, one dir per version.
const PACKAGED_BIN_DIRS: &str = "/usr/lib/postgresql";

/// How long a fast shutdown may take before the postmaster is killed.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// How long to wait for startup (pg_ctl's own wait, then the TCP check).
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);

/// Name matched against a PID's command line before signalling it.
const PROCESS_NAME: &str = "postgres";

/// A PostgreSQL server started by `services up`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Postgres {
    /// PID of the postmaster (first line of `postmaster.pid`).
    pub pid: u32,
    /// TCP port on 127.0.0.1.
    pub port: u16,
}

impl Postgres {
    /// The connection URL tests use (trust auth, superuser `postgres`).
    pub fn url(&self) -> String {
        format!("postgres://{PG_USER}@{}:{}/postgres", net::HOST, self.port)
    }

    /// Whether the postmaster is alive and accepting TCP connections.
    pub fn is_healthy(&self) -> bool {
        process::is_alive(self.pid, PROCESS_NAME) && net::accepts(self.port)
    }

    /// Fast shutdown: SIGINT to the postmaster, SIGKILL if it is still running
    /// after the grace period.
    pub fn stop(&self) -> Result<()> {
        process::stop(self.pid, PROCESS_NAME, "INT", SHUTDOWN_GRACE)
            .with_context(|| format!("failed to stop PostgreSQL (pid {})", self.pid))
    }
}

/// Initializes a fresh cluster under `layout.postgres_dir()` and starts it on
/// 127.0.0.1:`port`, returning once it accepts connections.
///
/// Any previous cluster directory is removed first; call
/// [`stop_unrecorded`] before if a server might still be running on it.
pub fn start(layout: &Layout, port: u16) -> Result<Postgres> {
    let bin_dir = find_bin_dir()?;
    let run_as = RunAs::detect()?;
    let pg_dir = layout.postgres_dir();
    let data_dir = layout.postgres_data_dir();
    let socket_dir = pg_dir.join("socket");
    let server_log = pg_dir.join("postgres.log");
    let setup_log = layout.postgres_setup_log();

    if pg_dir.exists() {
        fs::remove_dir_all(&pg_dir)
            .with_context(|| format!("failed to remove old {}", pg_dir.display()))?;
    }
    fs::create_dir_all(&socket_dir)
        .with_context(|| format!("failed to create {}", socket_dir.display()))?;
    fs::set_permissions(&pg_dir, fs::Permissions::from_mode(0o755))
        .with_context(|| format!("failed to chmod {}", pg_dir.display()))?;
    run_as.give(&pg_dir)?;

    let mut initdb = run_as.command(bin_dir.join("initdb"));
    initdb
        .arg("-D")
        .arg(&data_dir)
        .args(["--auth=trust", "-U", PG_USER, "-E", "UTF8", "--locale=C"])
        // Nothing to lose: the cluster is thrown away with the services.
        .arg("--no-sync")
        .current_dir(&pg_dir);
    process::run_logged(&mut initdb, &setup_log)
        .with_context(|| format!("initdb failed; see {}", setup_log.display()))?;

    // max_connections: room for test suites that each open a connection pool.
    let server_options = format!(
        "-h {} -p {port} -k {} -c fsync=on -c max_connections=200",
        net::HOST,
        socket_dir.display()
    );
    let mut pg_ctl = run_as.command(bin_dir.join("pg_ctl"));
    pg_ctl
        .arg("-D")
        .arg(&data_dir)
        .arg("-l")
        .arg(&server_log)
        .args(["-w", "-t", &STARTUP_TIMEOUT.as_secs().to_string()])
        .args(["-o", &server_options, "start"])
        .current_dir(&pg_dir);
    process::run_logged(&mut pg_ctl, &setup_log).with_context(|| {
        format!(
            "pg_ctl start failed; see {} and {}\n{}",
            setup_log.display(),
            server_log.display(),
            process::tail(&server_log)
        )
    })?;

    let pid = read_postmaster_pid(&data_dir)?.with_context(|| {
        format!(
            "PostgreSQL started but {} is missing",
            data_dir.join("postmaster.pid").display()
        )
    })?;
    let postgres = Postgres { pid, port };
    net::wait_until(
        &format!("PostgreSQL to accept connections on 127.0.0.1:{port}"),
        STARTUP_TIMEOUT,
        || Ok(net::accepts(port)),
    )
    .with_context(|| format!("PostgreSQL did not come up; see {}", server_log.display()))?;
    Ok(postgres)
}

/// Stops a postmaster still running on the cluster in `layout` that the state
/// file does not know about (e.g. the state file was lost), if any.
pub fn stop_unrecorded(layout: &Layout) -> Result<()> {
    let Some(pid) = read_postmaster_pid(&layout.postgres_data_dir())? else {
        return Ok(());
    };
    if process::is_alive(pid, PROCESS_NAME) {
        eprintln!("found an unrecorded PostgreSQL (pid {pid}) on the services' data dir");
        // The port is irrelevant for stopping.
        Postgres { pid, port: 0 }.stop()?;
    }
    Ok(())
}

/// Reads the postmaster PID (first line of `postmaster.pid`), or `None` if the
/// file does not exist.
fn read_postmaster_pid(data_dir: &Path) -> Result<Option<u32>> {
    let path = data_dir.join("postmaster.pid");
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(err) => {
            return Err(err).with_context(|| format!("failed to read {}", path.display()));
        }
    };
    let first = text.lines().next().unwrap_or_default().trim();
    let pid = first
        .parse()
        .with_context(|| format!("{} starts with {first:?}, not a PID", path.display()))?;
    Ok(Some(pid))
}

/// Finds the directory holding `initdb` and `pg_ctl`: from `$PATH` first, else
/// the newest `/usr/lib/postgresql/<version>/bin`.
fn find_bin_dir() -> Result<PathBuf> {
    if let Some(initdb) = process::find_on_path("initdb") {
        // Follow symlinks such as /usr/local/bin/initdb so pg_ctl comes from
        // the same installation.
        let initdb = fs::canonicalize(&initdb)
            .with_context(|| format!("failed to resolve {}", initdb.display()))?;
        if let Some(dir) = initdb.parent()
            && dir.join("pg_ctl").is_file()
        {
            return Ok(dir.to_owned());
        }
    }
    let newest = fs::read_dir(PACKAGED_BIN_DIRS)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version: u32 = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .max_by_key(|(version, _)| *version);
    match newest {
        Some((_, bin)) => Ok(bin),
        None => bail!(
            "PostgreSQL server binaries (initdb, pg_ctl) are not on PATH or in \
             {PACKAGED_BIN_DIRS}/*/bin; install PostgreSQL 15 \
             (e.g. `apt-get install postgresql`)"
        ),
    }
}

/// Which user PostgreSQL commands run as.
#[derive(Debug, Clone, PartialEq, Eq)]
enum RunAs {
    /// The current (non-root) user.
    CurrentUser,
    /// The `postgres` user, via `runuser` (at this path), because we are root.
    PostgresUser {
        /// The `runuser` program.
        runuser: PathBuf,
    },
}

impl RunAs {
    /// Picks the `postgres` user when running as root, checking it exists.
    fn detect() -> Result<Self> {
        if !process::is_root()? {
            return Ok(Self::CurrentUser);
        }
        let runuser = runuser_path().context(
            "running as root, PostgreSQL must run as another user, but `runuser` \
             (util-linux) is neither on PATH nor in /usr/sbin or /sbin",
        )?;
        if !process::succeeds(Command::new("id").args(["-u", PG_USER])) {
            bail!(
                "running as root, PostgreSQL must run as the `{PG_USER}` user, which does \
                 not exist; create it (e.g. `useradd --system --user-group {PG_USER}`)"
            );
        }
        Ok(Self::PostgresUser { runuser })
    }

    /// A command running `program` as this user.
    fn command(&self, program: impl AsRef<OsStr>) -> Command {
        match self {
            Self::CurrentUser => Command::new(program),
            Self::PostgresUser { runuser } => {
                let mut cmd = Command::new(runuser);
                cmd.args(["-u", PG_USER, "--"]).arg(program);
                cmd
            }
        }
    }

    /// Makes `dir` (recursively) owned by this user.
    fn give(&self, dir: &Path) -> Result<()> {
        if *self == Self::CurrentUser {
            return Ok(());
        }
        let mut chown = Command::new("chown");
        chown.args(["-R", &format!("{PG_USER}:")]).arg(dir);
        process::echo(&chown);
        process::output(&mut chown)
            .with_context(|| format!("failed to chown {} to {PG_USER}", dir.display()))?;
        Ok(())
    }
}

/// Finds `runuser`, which root's `$PATH` may lack in non-login shells.
fn runuser_path() -> Option<PathBuf> {
    process::find_on_path("runuser").or_else(|| {
        ["/usr/sbin/runuser", "/sbin/runuser"]
            .into_iter()
            .map(PathBuf::from)
            .find(|path| path.is_file())
    })
}
