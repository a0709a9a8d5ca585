//! `cargo xtask test|bench|ci`: cargo invocations, with the services up where
//! they need them.

use std::ffi::OsString;
use std::process::{Command, ExitCode, ExitStatus};

use anyhow::{Context, Result};

use crate::process;
use crate::services::{self, Layout};

/// `cargo xtask test [-- ARGS]`: `cargo test --workspace ARGS` with the
/// services' environment; exits with cargo's status.
pub fn test(layout: &Layout, args: &[String]) -> Result<ExitCode> {
    with_services(layout, |env| {
        let mut cmd = cargo(layout);
        cmd.args(["test", "--workspace"]).args(args).envs(env);
        process::run(&mut cmd)
    })
}

/// `cargo xtask bench [-- ARGS]`: `cargo bench -p persist ARGS` with the
/// services' environment; exits with cargo's status.
pub fn bench(layout: &Layout, args: &[String]) -> Result<ExitCode> {
    with_services(layout, |env| {
        let mut cmd = cargo(layout);
        cmd.args(["bench", "-p", "persist"]).args(args).envs(env);
        process::run(&mut cmd)
    })
}

/// `cargo xtask ci`: fmt, clippy, cargo-deny (skipped if not installed), then
/// the tests, stopping at the first failure and exiting with its status.
pub fn ci(layout: &Layout) -> Result<ExitCode> {
    const STEPS: usize = 4;
    let checks: [&[&str]; 2] = [
        &["fmt", "--all", "--", "--check"],
        &[
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ],
    ];
    for (i, args) in checks.iter().enumerate() {
        let mut cmd = cargo(layout);
        cmd.args(*args);
        header(i + 1, STEPS, &process::display(&cmd));
        let status = process::run(&mut cmd)?;
        if !status.success() {
            return Ok(failed(&cmd, status));
        }
    }

    let mut deny = cargo(layout);
    deny.args(["deny", "check", "bans", "licenses", "sources"]);
    if process::succeeds(cargo(layout).args(["deny", "--version"])) {
        header(3, STEPS, &process::display(&deny));
        let status = process::run(&mut deny)?;
        if !status.success() {
            return Ok(failed(&deny, status));
        }
    } else {
        header(
            3,
            STEPS,
            "cargo deny: skipped (cargo-deny is not installed; \
             `cargo install --locked cargo-deny` to run it)",
        );
    }

    header(4, STEPS, "cargo test --workspace (with services)");
    let code = test(layout, &[])?;
    if code == ExitCode::SUCCESS {
        eprintln!("\n==> xtask ci: all checks passed");
    } else {
        eprintln!("\n==> xtask ci: tests failed");
    }
    Ok(code)
}

/// Runs `f` with the services up and their environment, starting them first
/// if needed and stopping them afterwards (even if `f` fails) if this call
/// started them. Exits with the status `f` returns.
fn with_services(
    layout: &Layout,
    f: impl FnOnce(Vec<(&'static str, String)>) -> Result<ExitStatus>,
) -> Result<ExitCode> {
    let running = services::ensure_up(layout)?;
    if running.started {
        // Ctrl-C (or a SIGTERM) reaches cargo and its tests too; stop what we
        // started before leaving, or the servers would outlive the run.
        let on_signal = layout.clone();
        ctrlc::set_handler(move || {
            eprintln!("\ninterrupted: stopping the services this run started");
            if let Err(err) = services::down(&on_signal) {
                eprintln!("failed to stop the services: {err:#}");
            }
            std::process::exit(130);
        })
        .context("install the interrupt handler")?;
    }
    eprintln!("with the environment in {}", layout.env_file().display());
    let result = f(running.state.env_vars());
    let stopped = if running.started {
        services::down(layout).context("failed to stop the services this run started")
    } else {
        eprintln!("leaving the services running (they were up before this run)");
        Ok(())
    };
    let status = result?;
    stopped?;
    Ok(exit_code(status))
}

/// A `cargo` command (the cargo running xtask, if known) in the workspace root.
fn cargo(layout: &Layout) -> Command {
    let program = std::env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    let mut cmd = Command::new(program);
    cmd.current_dir(&layout.workspace);
    cmd
}

/// Prints the banner before CI step `step` of `total`.
fn header(step: usize, total: usize, what: &str) {
    eprintln!("\n==> [{step}/{total}] {what}");
}

/// Reports a failed CI step and returns the exit code to leave with.
fn failed(cmd: &Command, status: ExitStatus) -> ExitCode {
    eprintln!(
        "\n==> xtask ci: `{}` failed ({status})",
        process::display(cmd)
    );
    exit_code(status)
}

/// The exit code mirroring a child's status (1 if it was killed by a signal).
fn exit_code(status: ExitStatus) -> ExitCode {
    match status.code() {
        Some(0) => ExitCode::SUCCESS,
        Some(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        None => ExitCode::FAILURE,
    }
}
