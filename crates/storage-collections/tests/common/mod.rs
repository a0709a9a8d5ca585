//! Fixtures shared by the controller's integration tests.

// Each test binary uses some of these.
#![allow(dead_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use persist::mem::{MemBlob, MemConsensus};
use persist::{Blob, CaSResult, Consensus, ExternalError, SeqNo, VersionedData};
use persist_client::{Diagnostics, PersistClient, PersistConfig};
use persist_types::{PersistLocation, ShardId, SimpleSchema};
use storage_collections::{
    ControllerConfig, GlobalId, StorageCollectionsImpl, StorageError, Update,
};
use timely::progress::Antichain;

/// A single-element frontier.
pub fn f(t: u64) -> Antichain<u64> {
    Antichain::from_elem(t)
}

pub const T1: GlobalId = GlobalId::User(1);
pub const T2: GlobalId = GlobalId::User(2);
pub const D3: GlobalId = GlobalId::User(3);

/// A location shared by every controller of a test: in-memory blob and
/// consensus, one metadata shard.
pub struct Location {
    pub blob: Arc<dyn Blob>,
    pub consensus: Arc<dyn Consensus>,
    pub metadata_shard: ShardId,
}

impl Location {
    pub fn new() -> Self {
        Location {
            blob: Arc::new(MemBlob::new()),
            consensus: Arc::new(MemConsensus::new()),
            metadata_shard: ShardId::new(),
        }
    }

    pub fn client(&self) -> PersistClient {
        PersistClient::new(
            PersistConfig::new_for_tests(),
            Arc::clone(&self.blob),
            Arc::clone(&self.consensus),
        )
    }

    pub async fn controller(&self, epoch: u64) -> StorageCollectionsImpl {
        self.controller_with(self.client(), epoch, false)
            .await
            .unwrap()
    }

    pub async fn controller_with(
        &self,
        client: PersistClient,
        epoch: u64,
        read_only: bool,
    ) -> Result<StorageCollectionsImpl, StorageError> {
        StorageCollectionsImpl::open(
            client,
            PersistLocation::new_in_mem(),
            self.metadata_shard,
            epoch,
            read_only,
            ControllerConfig {
                tick: Duration::from_millis(10),
            },
        )
        .await
    }
}

/// Appends one row per time in `[lower, upper)` to `shard`.
pub async fn write_shard(client: &PersistClient, shard: ShardId, lower: u64, upper: u64) {
    let mut writer = client
        .open_writer::<Vec<u8>, (), u64, i64>(
            shard,
            Arc::new(SimpleSchema::new()),
            Arc::new(SimpleSchema::new()),
            Diagnostics::for_tests(),
        )
        .await
        .unwrap();
    let updates: Vec<Update> = (lower..upper)
        .map(|t| ((t.to_be_bytes().to_vec(), ()), t, 1))
        .collect();
    writer
        .compare_and_append(&updates, f(lower), f(upper))
        .await
        .unwrap()
        .unwrap();
    writer.expire().await;
}

/// Appends one row per time in `[lower, upper)` to a collection.
pub async fn write(sc: &StorageCollectionsImpl, id: GlobalId, lower: u64, upper: u64) {
    let shard = sc.collection_metadata(id).unwrap().data_shard;
    write_shard(sc.client(), shard, lower, upper).await;
}

/// A collection's since as the controller tracks it.
pub fn since(sc: &StorageCollectionsImpl, id: GlobalId) -> Antichain<u64> {
    sc.collection_frontiers(id).unwrap().read_capabilities
}

/// Counts the writes that reach consensus.
#[derive(Debug)]
pub struct CountingConsensus {
    pub inner: Arc<dyn Consensus>,
    pub writes: Arc<AtomicUsize>,
}

#[async_trait]
impl Consensus for CountingConsensus {
    async fn head(&self, key: &str) -> Result<Option<VersionedData>, ExternalError> {
        self.inner.head(key).await
    }

    async fn compare_and_set(
        &self,
        key: &str,
        expected: Option<SeqNo>,
        new: VersionedData,
    ) -> Result<CaSResult, ExternalError> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        self.inner.compare_and_set(key, expected, new).await
    }

    async fn scan(
        &self,
        key: &str,
        from: SeqNo,
        limit: usize,
    ) -> Result<Vec<VersionedData>, ExternalError> {
        self.inner.scan(key, from, limit).await
    }

    async fn truncate(&self, key: &str, seqno: SeqNo) -> Result<usize, ExternalError> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        self.inner.truncate(key, seqno).await
    }

    async fn list_keys(&self) -> Result<Vec<String>, ExternalError> {
        self.inner.list_keys().await
    }
}

pub fn counting_client(location: &Location) -> (PersistClient, Arc<AtomicUsize>) {
    let writes = Arc::new(AtomicUsize::new(0));
    let consensus: Arc<dyn Consensus> = Arc::new(CountingConsensus {
        inner: Arc::clone(&location.consensus),
        writes: Arc::clone(&writes),
    });
    let client = PersistClient::new(
        PersistConfig::new_for_tests(),
        Arc::clone(&location.blob),
        consensus,
    );
    (client, writes)
}
