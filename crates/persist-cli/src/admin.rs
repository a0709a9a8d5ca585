//! `persistcli admin`: compacting, closing and finalizing shards.

use anyhow::{Result, anyhow, bail};
use persist_client::{ClientError, InvalidUsage, PersistClient};
use persist_types::{PersistLocation, ShardId};
use serde_json::Value;
use timely::progress::Antichain;

use crate::types::{self, Diff, Key, Time, Val};

/// What to administer.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Closes a shard for good, so that it can be finalized: advances its
    /// upper to the empty frontier (no more writes) and its since to the
    /// empty frontier (no more reads).
    ///
    /// The shard's since is the meet of all its readers' sinces, so this
    /// works only when no other reader holds the shard: a live leased
    /// reader (until it expires or its lease lapses) or any critical reader
    /// keeps the since where it is, and the command then fails naming them.
    /// Supports shards of the demo's types (String keys and values, u64
    /// times, i64 diffs).
    Close {
        /// The shard, e.g. s0c6f4b30-5d5a-4f6e-9d9a-5e3f0b1d2c4a.
        shard: ShardId,
    },
    /// Compacts a shard now: merges its batches as the compaction policy
    /// asks (as writers do in the background), then collects garbage
    /// (truncates the state log, deletes blobs no live state needs), and
    /// prints the batch count and blob bytes before and after.
    ///
    /// Safe while other processes read and write the shard. Supports
    /// shards of the demo's types (String keys and values, u64 times, i64
    /// diffs).
    Compact {
        /// The shard, e.g. s0c6f4b30-5d5a-4f6e-9d9a-5e3f0b1d2c4a.
        shard: ShardId,
    },
    /// Finalizes a closed shard: deletes all its data and handles, leaving
    /// a small tombstone, so that it cannot be opened again.
    ///
    /// Refuses a shard whose since or upper is not yet empty (see `admin
    /// close`). Supports shards of the demo's types (String keys and
    /// values, u64 times, i64 diffs).
    Finalize {
        /// The shard, e.g. s0c6f4b30-5d5a-4f6e-9d9a-5e3f0b1d2c4a.
        shard: ShardId,
    },
}

/// Runs `admin`.
pub async fn run(location: &PersistLocation, command: &Command) -> Result<()> {
    let client = crate::open_client(location).await?;
    match command {
        Command::Compact { shard } => compact(&client, *shard).await,
        Command::Close { shard } => close(&client, *shard).await,
        Command::Finalize { shard } => finalize(&client, *shard).await,
    }
}

/// The shard's state as JSON, failing if it does not exist: opening
/// handles (even `finalize_shard`) would create it.
async fn existing_state(client: &PersistClient, shard: ShardId) -> Result<Value> {
    crate::inspect::state(client, shard, None).await
}

fn frontier(state: &Value, name: &str) -> Result<Vec<String>> {
    state
        .get(name)
        .and_then(Value::as_array)
        .map(|elements| {
            elements
                .iter()
                .map(|e| e.as_str().unwrap_or_default().to_owned())
                .collect()
        })
        .ok_or_else(|| anyhow!("the shard's state has no {name}"))
}

async fn close(client: &PersistClient, shard: ShardId) -> Result<()> {
    let state = existing_state(client, shard).await?;
    if state.get("finalized").and_then(Value::as_bool) == Some(true) {
        println!("shard {shard} is already finalized");
        return Ok(());
    }
    if frontier(&state, "since")?.is_empty() && frontier(&state, "upper")?.is_empty() {
        println!("shard {shard} is already closed (since and upper are empty)");
        return Ok(());
    }

    let (mut write, mut read) = client
        .open::<Key, Val, Time, Diff>(
            shard,
            types::schema(),
            types::schema(),
            types::diagnostics("persistcli admin close"),
        )
        .await
        .map_err(|err| types::explain(shard, err))?;
    let advanced = write.advance_upper(&Antichain::new()).await;
    write.expire().await;
    advanced.map_err(|err| types::explain(shard, err))?;
    let downgraded = read.downgrade_since(&Antichain::new()).await;
    read.expire().await;
    downgraded.map_err(|err| types::explain(shard, err))?;

    let state = existing_state(client, shard).await?;
    let since = frontier(&state, "since")?;
    if !since.is_empty() {
        bail!(
            "shard {shard}: upper is now empty, but other readers hold its since at {since:?}; \
             it can be finalized once they let go (a leased reader when it expires or its \
             lease lapses, a critical reader only by downgrading its since): {}",
            holders(&state)
        );
    }
    println!(
        "closed shard {shard}: since and upper are empty; `persistcli admin finalize {shard}` \
         can now delete its data"
    );
    Ok(())
}

/// The number of batches and the bytes of the parts state references.
fn batches_and_bytes(state: &Value) -> (usize, u64) {
    let batches = state
        .get("batches")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let bytes = batches
        .iter()
        .filter_map(|b| b.get("parts").and_then(Value::as_array))
        .flatten()
        .filter_map(|p| p.get("encoded_size_bytes").and_then(Value::as_u64))
        .sum();
    (batches.len(), bytes)
}

async fn compact(client: &PersistClient, shard: ShardId) -> Result<()> {
    let before = batches_and_bytes(&existing_state(client, shard).await?);
    let mut write = client
        .open_writer::<Key, Val, Time, Diff>(
            shard,
            types::schema(),
            types::schema(),
            types::diagnostics("persistcli admin compact"),
        )
        .await
        .map_err(|err| types::explain(shard, err))?;
    let compacted = write.compact().await;
    let collected = write.collect_garbage().await;
    write.expire().await;
    let stats = compacted.map_err(|err| types::explain(shard, err))?;
    collected.map_err(|err| types::explain(shard, err))?;
    let after = batches_and_bytes(&existing_state(client, shard).await?);
    println!(
        "compacted shard {shard}: {} merges ({} lost to concurrent compactions);          batches {} -> {}, live part bytes {} -> {}",
        stats.applied + stats.superseded,
        stats.superseded,
        before.0,
        after.0,
        before.1,
        after.1
    );
    Ok(())
}

/// The readers registered in `state`, for an error message.
fn holders(state: &Value) -> String {
    let mut named = Vec::new();
    for (kind, field) in [
        ("leased", "leased_readers"),
        ("critical", "critical_readers"),
    ] {
        if let Some(readers) = state.get(field).and_then(Value::as_object) {
            for (id, reader) in readers {
                named.push(format!(
                    "{kind} reader {id} ({}) at since {}",
                    reader.get("purpose").and_then(Value::as_str).unwrap_or("?"),
                    reader
                        .get("since")
                        .map(Value::to_string)
                        .unwrap_or_default(),
                ));
            }
        }
    }
    if named.is_empty() {
        "no reader is registered now, so retry".to_owned()
    } else {
        named.join("; ")
    }
}

async fn finalize(client: &PersistClient, shard: ShardId) -> Result<()> {
    existing_state(client, shard).await?;
    match client
        .finalize_shard::<Key, Val, Time, Diff>(shard, types::diagnostics("persistcli admin"))
        .await
    {
        Ok(()) => {
            println!("finalized shard {shard}: its data is deleted and a tombstone remains");
            Ok(())
        }
        Err(ClientError::InvalidUsage(InvalidUsage::FinalizationError { since, upper })) => {
            bail!(
                "cannot finalize shard {shard}: it is still open (since {:?}, upper {:?}; both \
                 must be empty). Close it first with `persistcli admin close {shard}`",
                since.elements(),
                upper.elements(),
            )
        }
        Err(err) => Err(types::explain(shard, err)),
    }
}
