//! The one kind of shard `persistcli` opens with handles: the demo's.
//!
//! Handles are generic over the key, value, time and diff types, and a
//! shard remembers the codecs it was created with, so a command that opens
//! handles has to pick types. `persistcli` picks these; a shard created
//! with others is refused with a [`CodecMismatch`] that names both.

use std::sync::Arc;

use anyhow::anyhow;
use persist_client::{ClientError, CodecMismatch, Codecs, InvalidUsage, PersistClient};
use persist_types::{ShardId, StringSchema};

/// The key type.
pub type Key = String;
/// The value type.
pub type Val = String;
/// The time type.
pub type Time = u64;
/// The diff type.
pub type Diff = i64;
/// One update of a shard of these types.
pub type Update = ((Key, Val), Time, Diff);

/// The schema of [`Key`] and of [`Val`].
pub fn schema() -> Arc<StringSchema> {
    Arc::new(StringSchema::default())
}

/// Opens a writer and a leased reader of `shard` (creating the shard if it
/// does not exist).
pub async fn open(
    client: &PersistClient,
    shard: ShardId,
    purpose: &str,
) -> anyhow::Result<(
    persist_client::WriteHandle<Key, Val, Time, Diff>,
    persist_client::ReadHandle<Key, Val, Time, Diff>,
)> {
    client
        .open::<Key, Val, Time, Diff>(shard, schema(), schema(), diagnostics(purpose))
        .await
        .map_err(|err| explain(shard, err))
}

/// The diagnostics `persistcli` registers its handles with.
pub fn diagnostics(purpose: &str) -> persist_client::Diagnostics {
    persist_client::Diagnostics {
        shard_name: "persistcli".to_owned(),
        handle_purpose: purpose.to_owned(),
    }
}

/// `err` as an error for the user, spelling out a codec mismatch.
pub fn explain(shard: ShardId, err: ClientError<Time>) -> anyhow::Error {
    match err {
        ClientError::InvalidUsage(InvalidUsage::CodecMismatch(mismatch)) => {
            let CodecMismatch { requested, actual } = *mismatch;
            anyhow!(
                "shard {shard} holds {} but persistcli handles only shards of {}",
                describe(&actual),
                describe(&requested),
            )
        }
        err => anyhow::Error::new(err),
    }
}

fn describe(codecs: &Codecs) -> String {
    format!(
        "(key {}, value {}, time {}, diff {})",
        codecs.key, codecs.val, codecs.ts, codecs.diff
    )
}
