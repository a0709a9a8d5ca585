//! The controller's durable metadata, kept in a persist shard of its own:
//! which shard holds each collection, which shards await finalization and
//! which are finalized, and the epoch of the controller in charge.
//!
//! The metadata shard holds one record per fact (JSON strings as keys, unit
//! values, diff +1). A transaction commits its changes as one
//! `compare_and_append` at the next time, so transactions are serializable:
//! a controller whose view is stale fails to commit, reloads, and finds out
//! whether a newer epoch fenced it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use persist_client::{Diagnostics, PersistClient, WriteHandle};
use persist_types::{ShardId, StringSchema, UnitSchema};
use serde::{Deserialize, Serialize};
use timely::progress::Antichain;

use crate::{GlobalId, StorageError};

/// One fact of the metadata.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Record {
    /// `id`'s data lives in `shard`.
    Collection { id: GlobalId, shard: ShardId },
    /// `shard` belonged to a dropped collection and awaits finalization.
    Unfinalized { shard: ShardId },
    /// `shard` was finalized.
    Finalized { shard: ShardId },
    /// The epoch of the controller in charge.
    Epoch { epoch: u64 },
}

/// The metadata at one point, as a value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Metadata {
    /// Each collection's data shard.
    pub collections: BTreeMap<GlobalId, ShardId>,
    /// Shards of dropped collections not yet finalized.
    pub unfinalized: BTreeSet<ShardId>,
    /// Shards finalized.
    pub finalized: BTreeSet<ShardId>,
    /// The epoch of the controller in charge (0 before any).
    pub epoch: u64,
}

impl Metadata {
    fn records(&self) -> BTreeSet<Record> {
        let mut records: BTreeSet<Record> = self
            .collections
            .iter()
            .map(|(id, shard)| Record::Collection {
                id: *id,
                shard: *shard,
            })
            .collect();
        records.extend(
            self.unfinalized
                .iter()
                .map(|s| Record::Unfinalized { shard: *s }),
        );
        records.extend(
            self.finalized
                .iter()
                .map(|s| Record::Finalized { shard: *s }),
        );
        if self.epoch > 0 {
            records.insert(Record::Epoch { epoch: self.epoch });
        }
        records
    }

    fn from_records(records: impl IntoIterator<Item = Record>) -> Result<Self, StorageError> {
        let mut metadata = Metadata::default();
        for record in records {
            match record {
                Record::Collection { id, shard } => {
                    if metadata.collections.insert(id, shard).is_some() {
                        return Err(StorageError::Metadata(format!(
                            "collection {id} recorded twice"
                        )));
                    }
                }
                Record::Unfinalized { shard } => {
                    metadata.unfinalized.insert(shard);
                }
                Record::Finalized { shard } => {
                    metadata.finalized.insert(shard);
                }
                Record::Epoch { epoch } => metadata.epoch = metadata.epoch.max(epoch),
            }
        }
        Ok(metadata)
    }
}

/// Changes to the durable metadata, applied atomically by
/// [`DurableMetadata::commit`].
pub trait StorageTxn {
    /// Each collection's data shard.
    fn collection_metadata(&self) -> BTreeMap<GlobalId, ShardId>;
    /// Records that `id`'s data lives in `shard`. Fails if `id` is taken.
    fn insert_collection_metadata(
        &mut self,
        id: GlobalId,
        shard: ShardId,
    ) -> Result<(), StorageError>;
    /// Forgets `ids`, returning the shards they had.
    fn delete_collection_metadata(&mut self, ids: &BTreeSet<GlobalId>) -> Vec<(GlobalId, ShardId)>;
    /// Shards awaiting finalization.
    fn unfinalized_shards(&self) -> BTreeSet<ShardId>;
    /// Records shards to finalize.
    fn insert_unfinalized_shards(&mut self, shards: BTreeSet<ShardId>);
    /// Moves shards from awaiting finalization to finalized.
    fn mark_shards_as_finalized(&mut self, shards: BTreeSet<ShardId>);
    /// Shards finalized.
    fn finalized_shards(&self) -> BTreeSet<ShardId>;
}

/// A transaction on the metadata: a copy to change, committed as a whole.
#[derive(Debug, Clone)]
pub struct MetadataTxn {
    base: Metadata,
    next: Metadata,
}

impl StorageTxn for MetadataTxn {
    fn collection_metadata(&self) -> BTreeMap<GlobalId, ShardId> {
        self.next.collections.clone()
    }

    fn insert_collection_metadata(
        &mut self,
        id: GlobalId,
        shard: ShardId,
    ) -> Result<(), StorageError> {
        if self.next.collections.contains_key(&id) {
            return Err(StorageError::CollectionIdReused(id));
        }
        self.next.collections.insert(id, shard);
        Ok(())
    }

    fn delete_collection_metadata(&mut self, ids: &BTreeSet<GlobalId>) -> Vec<(GlobalId, ShardId)> {
        ids.iter()
            .filter_map(|id| self.next.collections.remove(id).map(|s| (*id, s)))
            .collect()
    }

    fn unfinalized_shards(&self) -> BTreeSet<ShardId> {
        self.next.unfinalized.clone()
    }

    fn insert_unfinalized_shards(&mut self, shards: BTreeSet<ShardId>) {
        self.next.unfinalized.extend(shards);
    }

    fn mark_shards_as_finalized(&mut self, shards: BTreeSet<ShardId>) {
        for shard in shards {
            self.next.unfinalized.remove(&shard);
            self.next.finalized.insert(shard);
        }
    }

    fn finalized_shards(&self) -> BTreeSet<ShardId> {
        self.next.finalized.clone()
    }
}

type Key = String;

/// The metadata shard, opened by one controller.
///
/// Reads register no reader (see `PersistClient::snapshot_unleased`), so a
/// read-only controller, which opens no writer, writes nothing at all.
#[derive(Debug)]
pub struct DurableMetadata {
    shard: ShardId,
    client: PersistClient,
    /// `None` for a read-only controller.
    write: Option<WriteHandle<Key, (), u64, i64>>,
    current: Metadata,
    /// The metadata shard's upper as of `current`.
    upper: u64,
    epoch: u64,
}

impl DurableMetadata {
    /// Opens the metadata in `shard` as the controller of `epoch`, and (if
    /// `claim`) records `epoch` as the one in charge. Fails with
    /// [`StorageError::Fenced`] if a newer epoch is already in charge.
    pub async fn open(
        client: &PersistClient,
        shard: ShardId,
        epoch: u64,
        claim: bool,
    ) -> Result<Self, StorageError> {
        let write = if claim {
            let write = client
                .open_writer::<Key, (), u64, i64>(
                    shard,
                    Arc::new(StringSchema::new()),
                    Arc::new(UnitSchema::new()),
                    Diagnostics::from_purpose("storage-collections metadata"),
                )
                .await?;
            Some(write)
        } else {
            None
        };
        let mut metadata = DurableMetadata {
            shard,
            client: client.clone(),
            write,
            current: Metadata::default(),
            upper: 0,
            epoch,
        };
        metadata.reload().await?;
        // Another controller's commit may land between our read and our
        // claim; `commit` then reloads (failing if that one was newer), and
        // the claim is retried on the fresh metadata.
        while claim && metadata.current.epoch < epoch {
            let mut txn = metadata.txn();
            txn.next.epoch = epoch;
            match metadata.commit(txn).await {
                Ok(()) => break,
                Err(StorageError::MetadataConflict) => continue,
                Err(err) => return Err(err),
            }
        }
        Ok(metadata)
    }

    /// The metadata shard.
    pub fn shard(&self) -> ShardId {
        self.shard
    }

    /// The metadata as of the last load or commit.
    pub fn current(&self) -> &Metadata {
        &self.current
    }

    /// Reads the latest metadata, and fails with `Fenced` if a newer epoch
    /// is in charge.
    pub async fn reload(&mut self) -> Result<(), StorageError> {
        // Opening a shard that does not exist creates it: a read-only
        // controller (no writer) must not, so it sees no metadata yet.
        if self.write.is_none()
            && self
                .client
                .shard_codecs(self.shard)
                .await
                .map_err(|e| StorageError::Persist(e.to_string()))?
                .is_none()
        {
            self.upper = 0;
            self.current = Metadata::default();
            return Ok(());
        }
        let upper = self
            .client
            .fetch_recent_upper::<Key, (), u64, i64>(self.shard)
            .await?;
        let Some(&upper) = upper.as_option() else {
            return Err(StorageError::Metadata(
                "the metadata shard was closed".to_owned(),
            ));
        };
        let metadata = if upper == 0 {
            Metadata::default()
        } else {
            let updates = self
                .client
                .snapshot_unleased::<Key, (), u64, i64>(
                    self.shard,
                    Arc::new(StringSchema::new()),
                    Arc::new(UnitSchema::new()),
                    Antichain::from_elem(upper - 1),
                )
                .await?;
            let mut records = Vec::new();
            for ((key, _), _, diff) in updates {
                let key = key.map_err(StorageError::Metadata)?;
                if diff != 1 {
                    return Err(StorageError::Metadata(format!(
                        "record {key} has count {diff}"
                    )));
                }
                let record = serde_json::from_str(&key)
                    .map_err(|e| StorageError::Metadata(format!("bad record {key:?}: {e}")))?;
                records.push(record);
            }
            Metadata::from_records(records)?
        };
        self.upper = upper;
        self.current = metadata;
        self.check_epoch()
    }

    fn check_epoch(&self) -> Result<(), StorageError> {
        if self.current.epoch > self.epoch {
            return Err(StorageError::Fenced {
                ours: self.epoch,
                current: self.current.epoch,
            });
        }
        Ok(())
    }

    /// A transaction starting from the current metadata.
    pub fn txn(&self) -> MetadataTxn {
        MetadataTxn {
            base: self.current.clone(),
            next: self.current.clone(),
        }
    }

    /// Commits `txn` if nothing changed since it started. Fails with
    /// `Fenced` if a newer epoch took over, and with `Metadata` if another
    /// change came first (reload, rebuild the transaction, retry).
    pub async fn commit(&mut self, txn: MetadataTxn) -> Result<(), StorageError> {
        self.check_epoch()?;
        if txn.base != self.current {
            // Another commit through this handle came first.
            return Err(StorageError::MetadataConflict);
        }
        let (before, after) = (txn.base.records(), txn.next.records());
        let mut updates = Vec::new();
        for record in before.difference(&after) {
            updates.push(((encode(record)?, ()), self.upper, -1i64));
        }
        for record in after.difference(&before) {
            updates.push(((encode(record)?, ()), self.upper, 1i64));
        }
        if updates.is_empty() {
            return Ok(());
        }
        let Some(write) = self.write.as_mut() else {
            return Err(StorageError::ReadOnly("commit metadata"));
        };
        let result = write
            .compare_and_append(
                &updates,
                Antichain::from_elem(self.upper),
                Antichain::from_elem(self.upper + 1),
            )
            .await?;
        match result {
            Ok(()) => {
                self.upper += 1;
                self.current = txn.next;
                Ok(())
            }
            Err(_) => {
                self.reload().await?;
                Err(StorageError::MetadataConflict)
            }
        }
    }
}

fn encode(record: &Record) -> Result<String, StorageError> {
    serde_json::to_string(record).map_err(|e| StorageError::Metadata(e.to_string()))
}
