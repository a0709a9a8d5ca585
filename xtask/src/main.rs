//! `cargo xtask`: project automation for the persist workspace.
//!
//! - `cargo xtask services up|down|status` manages the real PostgreSQL and S3
//!   (moto) servers the tests talk to, on 127.0.0.1 only, and writes
//!   `.services.env` at the workspace root.
//! - `cargo xtask test [-- ARGS]` runs `cargo test --workspace ARGS` against them.
//! - `cargo xtask bench [-- ARGS]` runs `cargo bench -p persist ARGS` against them.
//! - `cargo xtask ci` runs what CI checks: fmt, clippy, cargo-deny (if
//!   installed), then the tests.

// xtask is a command-line tool: talking on stdout and stderr is its job.
#![allow(clippy::print_stdout, clippy::print_stderr)]

mod ci;
mod moto;
mod net;
mod postgres;
mod process;
mod services;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::services::Layout;

/// Project automation for the persist workspace.
#[derive(Debug, Parser)]
#[command(name = "xtask", bin_name = "cargo xtask")]
struct Cli {
    /// What to do.
    #[command(subcommand)]
    command: Command,
}

/// The top-level `cargo xtask` subcommands.
#[derive(Debug, Subcommand)]
enum Command {
    /// Manage the local PostgreSQL and S3 (moto) servers the tests use.
    Services {
        /// What to do with the services.
        #[command(subcommand)]
        action: ServicesAction,
    },
    /// Run `cargo test --workspace` with the services up (started and stopped
    /// around the run unless they are already up).
    Test {
        /// Extra arguments for `cargo test`, after `--`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Run every CI check in order, stopping at the first failure: fmt, clippy,
    /// cargo-deny (skipped if not installed), then the tests.
    Ci,
    /// Run `cargo bench -p persist` with the services up (started and stopped
    /// around the run unless they are already up).
    Bench {
        /// Extra arguments for `cargo bench`, after `--`.
        #[arg(last = true)]
        args: Vec<String>,
    },
}

/// The `cargo xtask services` subcommands.
#[derive(Debug, Subcommand)]
enum ServicesAction {
    /// Start PostgreSQL and moto (or reuse them if already up) and write
    /// `.services.env`. Prints `export` lines on stdout, so
    /// `eval "$(cargo xtask services up)"` sets up the current shell.
    Up,
    /// Stop what `up` started and remove its state and `.services.env`.
    Down,
    /// Report whether the recorded services are running and answering.
    Status,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let layout = Layout::for_this_workspace();
    let result = match cli.command {
        Command::Services { action } => match action {
            ServicesAction::Up => services::up(&layout).map(|()| ExitCode::SUCCESS),
            ServicesAction::Down => services::down(&layout).map(|()| ExitCode::SUCCESS),
            ServicesAction::Status => services::status(&layout),
        },
        Command::Test { args } => ci::test(&layout, &args),
        Command::Ci => ci::ci(&layout),
        Command::Bench { args } => ci::bench(&layout, &args),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            // The cause chain, without the backtrace anyhow's `{:?}` would add
            // under RUST_BACKTRACE: the failing external step is what matters.
            eprintln!("error: {err}");
            for cause in err.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}
