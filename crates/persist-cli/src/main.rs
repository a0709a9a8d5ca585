//! `persistcli`: command-line access to persist locations.
//!
//! With no `--blob`/`--consensus` flags it uses the embedded default: a
//! `file://` blob store and a `sqlite://` consensus log under
//! `./persist-data`, so nothing needs to be installed.

// A command-line tool reports to its user on stdout.
#![allow(clippy::print_stdout)]

mod admin;
mod bench;
mod check;
mod controller;
mod dataflow;
mod demo;
mod inspect;
mod types;

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use persist::{open_blob, open_consensus};
use persist_client::{PersistClient, PersistConfig};
use persist_types::PersistLocation;

/// Command-line access to persist: durable time-varying collections in a
/// blob store plus a consensus log.
#[derive(Debug, Parser)]
#[command(name = "persistcli", version)]
struct Cli {
    /// The blob store URI (mem://, file:///abs/dir, s3://bucket/prefix?endpoint=...).
    /// Default: file://<data-dir>/blob.
    #[arg(long, global = true, env = "PERSIST_BLOB_URI")]
    blob: Option<String>,
    /// The consensus URI (mem://, sqlite:///abs/file.db, postgres://user@host:port/db).
    /// Default: sqlite://<data-dir>/consensus.db.
    #[arg(long, global = true, env = "PERSIST_CONSENSUS_URI")]
    consensus: Option<String>,
    /// The directory of the embedded default location.
    #[arg(long, global = true, default_value = "persist-data")]
    data_dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Checks that the location's blob store and consensus log work: writes,
    /// reads back and removes a probe value, and extends a probe log,
    /// reporting each step's latency.
    Check(check::Args),
    /// Writes generated updates to a shard (a new one by default) in
    /// batches at consecutive times, reads them back by snapshot and by
    /// listen, and checks both against what was written.
    Demo(demo::Args),
    /// Appends small batches to a new shard at a target rate with writers
    /// and listening readers for a while, printing rates, latencies and the
    /// shard's health (batches in state, state size, consensus entries,
    /// blob bytes against live data, time to open) and checking them
    /// against the shard-health targets.
    Bench(bench::Args),
    /// Maintains a derived collection (a count per key of generated events)
    /// in a new shard with a timely dataflow and `persist_sink`, follows the
    /// shard with `shard_source` in a second dataflow, and checks that what
    /// was read equals what was desired at every time.
    DataflowDemo(dataflow::Args),
    /// Shows a shard's state or blobs as JSON.
    #[command(subcommand)]
    Inspect(inspect::Command),
    /// Closes or finalizes shards.
    #[command(subcommand)]
    Admin(admin::Command),
    /// Runs the storage controller (collections, read holds, finalization).
    #[command(subcommand)]
    Controller(controller::Command),
}

impl Cli {
    /// The location named by the flags, defaulting to the embedded one.
    fn location(&self) -> Result<PersistLocation> {
        let dir = std::path::absolute(&self.data_dir)
            .with_context(|| format!("resolve data directory {}", self.data_dir.display()))?;
        let embedded = PersistLocation::embedded(&dir);
        Ok(PersistLocation::new(
            self.blob.clone().unwrap_or(embedded.blob_uri),
            self.consensus.clone().unwrap_or(embedded.consensus_uri),
        ))
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let location = cli.location()?;
    match &cli.command {
        Command::Check(args) => check::run(&location, args).await,
        Command::Demo(args) => {
            let client = open_client(&location).await?;
            demo::run(&location, &client, args).await
        }
        Command::Bench(args) => bench::run(&location, args).await,
        Command::DataflowDemo(args) => {
            let client = open_client(&location).await?;
            dataflow::run(&location, &client, args).await
        }
        Command::Inspect(command) => inspect::run(&location, command).await,
        Command::Admin(command) => admin::run(&location, command).await,
        Command::Controller(command) => controller::run(&location, command).await,
    }
}

/// A client of `location`, naming the backend that could not be opened.
async fn open_client(location: &PersistLocation) -> Result<PersistClient> {
    let blob = open_blob(&location.blob_uri)
        .await
        .context("open blob store")?;
    let consensus = open_consensus(&location.consensus_uri)
        .await
        .context("open consensus")?;
    Ok(PersistClient::new(
        PersistConfig::default(),
        blob,
        consensus,
    ))
}
