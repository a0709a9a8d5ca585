//! `cargo xtask services up|down|status`: the PostgreSQL and S3 (moto) servers
//! the tests use, on 127.0.0.1 and free ports.
//!
//! What `up` started is recorded in a state file (PIDs, ports, dirs) so `down`
//! stops exactly that, by PID. Tests find the services through
//! `.services.env` at the workspace root (see [`State::env_vars`]).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};

use crate::moto::{self, Moto};
use crate::net;
use crate::postgres::{self, Postgres};

/// Env var: PostgreSQL URL for the Consensus tests.
pub const POSTGRES_URL_VAR: &str = "PERSIST_TEST_POSTGRES_URL";
/// Env var: S3 endpoint URL for the Blob tests.
pub const S3_ENDPOINT_VAR: &str = "PERSIST_TEST_S3_ENDPOINT";
/// Credentials and region moto accepts (any value works; these are fixed).
const AWS_VARS: [(&str, &str); 3] = [
    ("AWS_ACCESS_KEY_ID", "persist-test"),
    ("AWS_SECRET_ACCESS_KEY", "persist-test"),
    ("AWS_REGION", "us-east-1"),
];

/// Where the services' files live for one workspace.
#[derive(Debug, Clone)]
pub struct Layout {
    /// The workspace root; `.services.env` is written here.
    pub workspace: PathBuf,
    /// `/tmp/persist-services-<hash of workspace path>`: state file, logs and
    /// the PostgreSQL cluster. Under `/tmp` (not the workspace) so the
    /// `postgres` user can reach it, and keyed by workspace so checkouts do not
    /// share servers.
    pub state_dir: PathBuf,
}

impl Layout {
    /// The layout for the workspace this xtask runs in.
    ///
    /// `cargo run` tells the binary its manifest directory at run time; that
    /// one wins over the directory it was compiled in, because checkouts
    /// sharing a `CARGO_TARGET_DIR` share one xtask binary, built in
    /// whichever checkout built it last.
    pub fn for_this_workspace() -> Self {
        let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR")
            .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
        let workspace = manifest_dir
            .parent()
            .expect("xtask lives in a subdirectory of the workspace root")
            .to_owned();
        let hash = fnv1a(workspace.as_os_str().as_encoded_bytes());
        let state_dir = PathBuf::from(format!("/tmp/persist-services-{hash:016x}"));
        Self {
            workspace,
            state_dir,
        }
    }

    /// The `KEY=VALUE` file tests and developers load.
    pub fn env_file(&self) -> PathBuf {
        self.workspace.join(".services.env")
    }

    /// What `up` started (see [`State`]).
    fn state_file(&self) -> PathBuf {
        self.state_dir.join("state")
    }

    /// Directory owned by the PostgreSQL user: cluster, socket and server log.
    pub fn postgres_dir(&self) -> PathBuf {
        self.state_dir.join("postgres")
    }

    /// The PostgreSQL cluster (data directory).
    pub fn postgres_data_dir(&self) -> PathBuf {
        self.postgres_dir().join("data")
    }

    /// Output of `initdb` and `pg_ctl`.
    pub fn postgres_setup_log(&self) -> PathBuf {
        self.state_dir.join("postgres-setup.log")
    }

    /// Output of `moto_server`.
    pub fn moto_log(&self) -> PathBuf {
        self.state_dir.join("moto.log")
    }
}

/// 64-bit FNV-1a: a stable (across Rust versions) hash for naming directories.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The services `up` started, as recorded in the state file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct State {
    /// The PostgreSQL server.
    pub postgres: Postgres,
    /// The moto (S3) server.
    pub moto: Moto,
}

impl State {
    /// The environment tests need, in `.services.env` order.
    pub fn env_vars(&self) -> Vec<(&'static str, String)> {
        let mut vars = vec![
            (POSTGRES_URL_VAR, self.postgres.url()),
            (S3_ENDPOINT_VAR, self.moto.endpoint()),
        ];
        vars.extend(AWS_VARS.map(|(key, value)| (key, value.to_owned())));
        vars
    }

    /// Whether both servers are alive and answering.
    fn is_healthy(&self) -> bool {
        self.postgres.is_healthy() && self.moto.is_healthy()
    }

    /// Renders the state file. Directories are recorded for humans; only PIDs
    /// and ports are read back (directories follow from the [`Layout`]).
    fn render(&self, layout: &Layout) -> String {
        format!(
            "# Written by `cargo xtask services up`; used by `down` and `status`.\n\
             postgres_pid={}\npostgres_port={}\npostgres_data_dir={}\n\
             moto_pid={}\nmoto_port={}\nmoto_log={}\n",
            self.postgres.pid,
            self.postgres.port,
            layout.postgres_data_dir().display(),
            self.moto.pid,
            self.moto.port,
            layout.moto_log().display(),
        )
    }

    /// Parses a state file written by [`State::render`].
    fn parse(text: &str) -> Result<Self> {
        let fields: BTreeMap<&str, &str> = text
            .lines()
            .map(str::trim)
            .filter(|line| !line.is_empty() && !line.starts_with('#'))
            .filter_map(|line| line.split_once('='))
            .collect();
        let field = |key: &str| -> Result<&str> {
            fields
                .get(key)
                .copied()
                .with_context(|| format!("missing `{key}`"))
        };
        let pid = |key: &str| -> Result<u32> {
            let value = field(key)?;
            value
                .parse()
                .with_context(|| format!("`{key}={value}` is not a PID"))
        };
        let port = |key: &str| -> Result<u16> {
            let value = field(key)?;
            value
                .parse()
                .with_context(|| format!("`{key}={value}` is not a port"))
        };
        Ok(Self {
            postgres: Postgres {
                pid: pid("postgres_pid")?,
                port: port("postgres_port")?,
            },
            moto: Moto {
                pid: pid("moto_pid")?,
                port: port("moto_port")?,
            },
        })
    }
}

/// Services that are up, and whether this call started them.
#[derive(Debug, Clone, Copy)]
pub struct Running {
    /// What is running.
    pub state: State,
    /// True if this call started the services (so its caller should stop
    /// them); false if they were already up and are being reused.
    pub started: bool,
}

/// `services up`: [`ensure_up`], then prints the environment as `export` lines
/// on stdout (everything else goes to stderr), so
/// `eval "$(cargo xtask services up)"` configures a shell.
pub fn up(layout: &Layout) -> Result<()> {
    let running = ensure_up(layout)?;
    for (key, value) in running.state.env_vars() {
        println!("export {key}={value}");
    }
    Ok(())
}

/// Makes sure both services are up and `.services.env` describes them.
///
/// Reuses the recorded services if both are alive and answering. Otherwise
/// stops whatever is left of them and starts fresh ones on new free ports:
/// a new PostgreSQL cluster and a new moto server (empty).
pub fn ensure_up(layout: &Layout) -> Result<Running> {
    match read_state(layout) {
        Ok(Some(state)) if state.is_healthy() => {
            write_env_file(layout, &state)?;
            eprintln!("services already up; reusing them");
            print_summary(layout, &state);
            return Ok(Running {
                state,
                started: false,
            });
        }
        Ok(Some(state)) => {
            eprintln!("recorded services are not all healthy; restarting them");
            stop_recorded(&state)?;
        }
        Ok(None) => {}
        Err(err) => eprintln!("warning: ignoring unreadable state: {err:#}"),
    }
    postgres::stop_unrecorded(layout)?;
    // Fail before spending time on PostgreSQL if moto is not installed.
    let moto_program = moto::find_program()?;
    prepare_state_dir(layout)?;

    let [postgres_port, moto_port] = net::free_ports()?;
    let postgres = postgres::start(layout, postgres_port)?;
    let moto = match moto::start(layout, &moto_program, moto_port) {
        Ok(moto) => moto,
        Err(err) => {
            // Best effort: do not leave PostgreSQL running unrecorded.
            if let Err(stop_err) = postgres.stop() {
                eprintln!("warning: {stop_err:#}");
            }
            return Err(err);
        }
    };
    let state = State { postgres, moto };
    let state_file = layout.state_file();
    fs::write(&state_file, state.render(layout))
        .with_context(|| format!("failed to write {}", state_file.display()))?;
    write_env_file(layout, &state)?;
    eprintln!("services started");
    print_summary(layout, &state);
    Ok(Running {
        state,
        started: true,
    })
}

/// `services down`: stops what `up` recorded (by PID) and removes the state
/// directory and `.services.env`. Succeeds if nothing is running.
///
/// If a server cannot be stopped, the state is kept so a later `down` can try
/// again.
pub fn down(layout: &Layout) -> Result<()> {
    match read_state(layout) {
        Ok(Some(state)) => stop_recorded(&state)?,
        Ok(None) => eprintln!("no services recorded in {}", layout.state_dir.display()),
        Err(err) => eprintln!("warning: ignoring unreadable state: {err:#}"),
    }
    postgres::stop_unrecorded(layout)?;
    if layout.state_dir.exists() {
        fs::remove_dir_all(&layout.state_dir)
            .with_context(|| format!("failed to remove {}", layout.state_dir.display()))?;
    }
    let env_file = layout.env_file();
    if env_file.exists() {
        fs::remove_file(&env_file)
            .with_context(|| format!("failed to remove {}", env_file.display()))?;
    }
    eprintln!("services down");
    Ok(())
}

/// `services status`: reports each recorded service. Exits 0 only if both are
/// up and answering.
pub fn status(layout: &Layout) -> Result<ExitCode> {
    let Some(state) = read_state(layout)? else {
        println!(
            "services: not running (no state in {})",
            layout.state_dir.display()
        );
        return Ok(ExitCode::FAILURE);
    };
    let describe = |healthy: bool| if healthy { "up" } else { "DOWN" };
    let postgres_ok = state.postgres.is_healthy();
    let moto_ok = state.moto.is_healthy();
    println!(
        "postgres: {} (pid {}, {})",
        describe(postgres_ok),
        state.postgres.pid,
        state.postgres.url()
    );
    println!(
        "moto:     {} (pid {}, {})",
        describe(moto_ok),
        state.moto.pid,
        state.moto.endpoint()
    );
    println!("state:    {}", layout.state_dir.display());
    println!("env file: {}", layout.env_file().display());
    Ok(if postgres_ok && moto_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Reads the state file, or `None` if there is none.
fn read_state(layout: &Layout) -> Result<Option<State>> {
    let path = layout.state_file();
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(err).with_context(|| format!("failed to read {}", path.display())),
    };
    State::parse(&text)
        .map(Some)
        .with_context(|| format!("corrupt state file {}", path.display()))
}

/// Stops both recorded servers, attempting both even if one fails.
fn stop_recorded(state: &State) -> Result<()> {
    let moto = state.moto.stop();
    let postgres = state.postgres.stop();
    moto.and(postgres)
}

/// Recreates an empty state directory, traversable by the `postgres` user.
fn prepare_state_dir(layout: &Layout) -> Result<()> {
    let dir = &layout.state_dir;
    if dir.exists() {
        fs::remove_dir_all(dir).with_context(|| format!("failed to remove {}", dir.display()))?;
    }
    fs::create_dir_all(dir).with_context(|| format!("failed to create {}", dir.display()))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755))
        .with_context(|| format!("failed to chmod 0755 {}", dir.display()))?;
    Ok(())
}

/// Writes `.services.env` (`KEY=VALUE` lines) for `state`.
fn write_env_file(layout: &Layout, state: &State) -> Result<()> {
    let mut text = String::from("# Written by `cargo xtask services up`.\n");
    for (key, value) in state.env_vars() {
        writeln!(text, "{key}={value}").expect("writing to a String cannot fail");
    }
    let path = layout.env_file();
    fs::write(&path, text).with_context(|| format!("failed to write {}", path.display()))
}

/// One line on what is running, plus how to load the environment.
fn print_summary(layout: &Layout, state: &State) {
    eprintln!(
        "postgres pid {} on 127.0.0.1:{}, moto pid {} on 127.0.0.1:{}; env in {}",
        state.postgres.pid,
        state.postgres.port,
        state.moto.pid,
        state.moto.port,
        layout.env_file().display()
    );
    eprintln!(
        "load it with `set -a; . {}; set +a` or `eval \"$(cargo xtask services up)\"`",
        layout.env_file().display()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_file_round_trips() {
        let layout = Layout::for_this_workspace();
        let state = State {
            postgres: Postgres {
                pid: 10,
                port: 5432,
            },
            moto: Moto {
                pid: 11,
                port: 5000,
            },
        };
        assert_eq!(State::parse(&state.render(&layout)).unwrap(), state);
    }

    #[test]
    fn state_file_missing_field_is_an_error() {
        assert!(State::parse("postgres_pid=1\npostgres_port=2\nmoto_pid=3\n").is_err());
    }

    #[test]
    fn env_vars_name_the_services() {
        let state = State {
            postgres: Postgres {
                pid: 1,
                port: 15432,
            },
            moto: Moto {
                pid: 2,
                port: 15000,
            },
        };
        let vars: BTreeMap<_, _> = state.env_vars().into_iter().collect();
        assert_eq!(
            vars[POSTGRES_URL_VAR],
            "postgres://postgres@127.0.0.1:15432/postgres"
        );
        assert_eq!(vars[S3_ENDPOINT_VAR], "http://127.0.0.1:15000");
        assert_eq!(vars["AWS_REGION"], "us-east-1");
    }
}
