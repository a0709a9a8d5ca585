//! A child process for the client's multi-process tests.
//!
//! `client_worker <blob-uri> <consensus-uri> <shard> <first-batch> <batches>
//! <batch-size>` appends batches `first..first + batches` of
//! [`persist_e2e::client_batch`], batch `b` as the interval `[b, b + 1)`,
//! printing `appended <b>` after each one commits.
//!
//! `client_worker <blob-uri> <consensus-uri> <shard> compact <rounds>`
//! instead compacts the shard and collects its garbage `rounds` times,
//! printing `compacted <merges>` after each round.

use std::io::Write;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use persist_client::{Diagnostics, PersistClient, PersistConfig};
use persist_e2e::client_batch;
use persist_types::{ShardId, StringSchema};
use timely::progress::Antichain;

fn arg<T: std::str::FromStr>(args: &[String], i: usize, name: &str) -> Result<T>
where
    T::Err: std::error::Error + Send + Sync + 'static,
{
    args.get(i)
        .with_context(|| format!("missing argument <{name}>"))?
        .parse()
        .with_context(|| format!("invalid <{name}>"))
}

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let blob_uri: String = arg(&args, 1, "blob-uri")?;
    let consensus_uri: String = arg(&args, 2, "consensus-uri")?;
    let shard: ShardId = arg(&args, 3, "shard")?;
    if args.get(4).map(String::as_str) == Some("compact") {
        let rounds: u64 = arg(&args, 5, "rounds")?;
        return compact(&blob_uri, &consensus_uri, shard, rounds).await;
    }
    let first: u64 = arg(&args, 4, "first-batch")?;
    let batches: u64 = arg(&args, 5, "batches")?;
    let size: usize = arg(&args, 6, "batch-size")?;

    let blob = persist::open_blob(&blob_uri).await?;
    let consensus = persist::open_consensus(&consensus_uri).await?;
    let client = PersistClient::new(PersistConfig::default(), blob, consensus);
    let mut write = client
        .open_writer::<String, String, u64, i64>(
            shard,
            Arc::new(StringSchema::new()),
            Arc::new(StringSchema::new()),
            Diagnostics::from_purpose("client_worker"),
        )
        .await?;
    let mut stdout = std::io::stdout();
    for b in first..first + batches {
        let updates = client_batch(b, size);
        let result = write
            .compare_and_append(
                &updates,
                Antichain::from_elem(b),
                Antichain::from_elem(b + 1),
            )
            .await?;
        if let Err(mismatch) = result {
            bail!("batch {b}: {mismatch}");
        }
        writeln!(stdout, "appended {b}")?;
        stdout.flush()?;
    }
    write.expire().await;
    Ok(())
}

/// Compacts `shard` and collects its garbage `rounds` times.
async fn compact(blob_uri: &str, consensus_uri: &str, shard: ShardId, rounds: u64) -> Result<()> {
    let blob = persist::open_blob(blob_uri).await?;
    let consensus = persist::open_consensus(consensus_uri).await?;
    let client = PersistClient::new(PersistConfig::default(), blob, consensus);
    let mut write = client
        .open_writer::<String, String, u64, i64>(
            shard,
            Arc::new(StringSchema::new()),
            Arc::new(StringSchema::new()),
            Diagnostics::from_purpose("client_worker compact"),
        )
        .await?;
    let mut stdout = std::io::stdout();
    for _ in 0..rounds {
        let stats = write.compact().await?;
        write.collect_garbage().await?;
        writeln!(stdout, "compacted {}", stats.applied + stats.superseded)?;
        stdout.flush()?;
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    write.expire().await;
    Ok(())
}
