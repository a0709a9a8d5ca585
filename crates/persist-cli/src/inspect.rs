//! `persistcli inspect`: a shard's state and its blobs, as JSON.

use anyhow::{Context, Result, bail};
use differential_dataflow::lattice::Lattice;
use persist_client::PersistClient;
use persist_types::{Codec64, PersistLocation, ShardId};
use serde_json::{Value, json};
use timely::order::Product;
use timely::progress::Timestamp;

/// What to inspect.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Prints a shard's latest state as JSON: its since and upper, its
    /// batches with their parts, its readers and writers. Fails if the
    /// shard does not exist (and does not create it).
    State {
        /// The shard, e.g. s0c6f4b30-5d5a-4f6e-9d9a-5e3f0b1d2c4a.
        shard: ShardId,
        /// The shard's time type, to render times with. Default: the one
        /// its state records; a different one is refused.
        #[arg(long, value_enum)]
        ts: Option<TimeCodec>,
    },
    /// Lists a shard's blobs (parts and rollups) with their sizes, as JSON.
    /// A shard with no blobs (say, a finalized one) lists none.
    Blob {
        /// The shard, e.g. s0c6f4b30-5d5a-4f6e-9d9a-5e3f0b1d2c4a.
        shard: ShardId,
    },
}

/// The time types `inspect state` can render.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TimeCodec {
    /// `u64` times.
    #[value(name = "u64")]
    U64,
    /// `i64` times.
    #[value(name = "i64")]
    I64,
    /// `Product<u32,u32>` times (nested scopes).
    #[value(name = "product")]
    Product,
}

impl TimeCodec {
    /// The codec name a shard's state records for this time type.
    fn codec_name(self) -> String {
        match self {
            TimeCodec::U64 => <u64 as Codec64>::codec_name(),
            TimeCodec::I64 => <i64 as Codec64>::codec_name(),
            TimeCodec::Product => <Product<u32, u32> as Codec64>::codec_name(),
        }
    }
}

/// Runs `inspect`, printing pretty JSON to stdout.
pub async fn run(location: &PersistLocation, command: &Command) -> Result<()> {
    let json = match command {
        Command::State { shard, ts } => {
            let client = crate::open_client(location).await?;
            state(&client, *shard, *ts).await?
        }
        Command::Blob { shard } => {
            let blob = persist::open_blob(&location.blob_uri)
                .await
                .context("open blob store")?;
            blobs(blob.as_ref(), *shard).await?
        }
    };
    println!("{}", serde_json::to_string_pretty(&json)?);
    Ok(())
}

/// The shard's state as JSON, with times rendered as the time type its
/// state records; fails if that is not `ts` (when given).
pub async fn state(client: &PersistClient, shard: ShardId, ts: Option<TimeCodec>) -> Result<Value> {
    let codecs = client
        .shard_codecs(shard)
        .await
        .with_context(|| format!("read the state of shard {shard}"))?
        .with_context(|| format!("shard {shard} does not exist in this location"))?;
    let known = [TimeCodec::U64, TimeCodec::I64, TimeCodec::Product];
    let Some(codec) = known.into_iter().find(|c| c.codec_name() == codecs.ts) else {
        bail!(
            "shard {shard} has {} times; inspect knows u64, i64 and Product<u32,u32>",
            codecs.ts
        );
    };
    if let Some(ts) = ts
        && ts != codec
    {
        bail!(
            "shard {shard} has {} times, not {}",
            codecs.ts,
            ts.codec_name()
        );
    }
    let json = match codec {
        TimeCodec::U64 => state_as::<u64>(client, shard).await?,
        TimeCodec::I64 => state_as::<i64>(client, shard).await?,
        TimeCodec::Product => state_as::<Product<u32, u32>>(client, shard).await?,
    };
    json.with_context(|| format!("shard {shard} does not exist in this location"))
}

async fn state_as<T>(client: &PersistClient, shard: ShardId) -> Result<Option<Value>>
where
    T: Timestamp + Lattice + Codec64 + Sync,
{
    client
        .inspect_shard::<T>(shard)
        .await
        .with_context(|| format!("read the state of shard {shard}"))
}

/// The shard's blobs as JSON: each key with its size, sorted by key, and
/// the totals.
pub async fn blobs(blob: &dyn persist::Blob, shard: ShardId) -> Result<Value> {
    let mut found = Vec::new();
    blob.list_keys_and_metadata(&format!("{shard}/"), &mut |m| {
        found.push((m.key, m.size_in_bytes));
    })
    .await
    .with_context(|| format!("list the blobs of shard {shard}"))?;
    found.sort();
    let total: u64 = found.iter().map(|(_, size)| size).sum();
    Ok(json!({
        "shard_id": shard.to_string(),
        "count": found.len(),
        "total_bytes": total,
        "blobs": found
            .iter()
            .map(|(key, size)| json!({ "key": key, "size_bytes": size }))
            .collect::<Vec<_>>(),
    }))
}
