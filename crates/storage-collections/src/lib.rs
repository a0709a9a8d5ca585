//! The storage controller's view of collections: which shard holds each
//! collection, how far back each can still be read (sinces, held by read
//! policies and read holds), and finalization of the shards of dropped
//! collections.
//!
//! A collection's **since** is the meet of its read capabilities: the one
//! its [`ReadPolicy`] implies from its write frontier, every [`ReadHold`],
//! and the holds of collections that depend on it. The controller keeps each
//! shard's critical since (a persist `SinceHandle`, fenced by the
//! controller's epoch) at that since. Collection ids, shards and the shards
//! awaiting finalization are durable (see [`durable`]), so a restarted
//! controller resumes where the last one stopped.

#![warn(missing_docs, missing_debug_implementations)]

mod controller;
pub mod durable;
mod ids;
mod policy;
mod types;

use std::collections::{BTreeMap, BTreeSet};

use async_trait::async_trait;
use persist_client::{FetchedUpdate, SnapshotStats};
use persist_types::ShardId;
use timely::progress::Antichain;

pub use controller::{
    ControllerConfig, ReadHold, Row, SnapshotCursor, StorageCollectionsImpl, Update,
};
pub use ids::{GlobalId, GlobalIdParseError};
pub use policy::ReadPolicy;
pub use types::{
    CollectionDescription, CollectionFrontiers, CollectionMetadata, DataSource, StorageError,
    Timestamp,
};

/// What a storage controller offers its clients (compute, a SQL layer).
///
/// Every call fails with [`StorageError::Fenced`] once a controller with a
/// newer epoch took over.
#[async_trait]
pub trait StorageCollections: Send + Sync {
    /// Reconciles durable metadata with the collections the caller knows.
    async fn initialize_state(&self, init_ids: &BTreeSet<GlobalId>) -> Result<(), StorageError>;

    /// Adds, registers and drops collections' durable metadata atomically.
    async fn prepare_state(
        &self,
        ids_to_add: &BTreeSet<GlobalId>,
        ids_to_drop: &BTreeSet<GlobalId>,
        ids_to_register: &BTreeMap<GlobalId, ShardId>,
    ) -> Result<(), StorageError>;

    /// Creates or re-opens collections (dependencies first).
    async fn create_collections_for_bootstrap(
        &self,
        collections: Vec<(GlobalId, CollectionDescription)>,
    ) -> Result<(), StorageError>;

    /// Drops collections; their shards are finalized once released.
    async fn drop_collections_unvalidated(
        &self,
        ids: &BTreeSet<GlobalId>,
    ) -> Result<(), StorageError>;

    /// Sets read policies.
    fn set_read_policies(&self, policies: Vec<(GlobalId, ReadPolicy)>) -> Result<(), StorageError>;

    /// Acquires read holds at the collections' sinces.
    fn acquire_read_holds(&self, ids: Vec<GlobalId>) -> Result<Vec<ReadHold>, StorageError>;

    /// Where a collection's data lives.
    fn collection_metadata(&self, id: GlobalId) -> Result<CollectionMetadata, StorageError>;

    /// A collection's frontiers.
    fn collection_frontiers(&self, id: GlobalId) -> Result<CollectionFrontiers, StorageError>;

    /// The frontiers of every live collection.
    fn active_collection_frontiers(&self) -> Vec<CollectionFrontiers>;

    /// Whether a collection exists.
    fn check_exists(&self, id: GlobalId) -> Result<(), StorageError>;

    /// A collection's contents at `as_of`.
    async fn snapshot(
        &self,
        id: GlobalId,
        as_of: Antichain<Timestamp>,
    ) -> Result<Vec<FetchedUpdate<Row, (), Timestamp, i64>>, StorageError>;

    /// A collection's latest contents.
    async fn snapshot_latest(
        &self,
        id: GlobalId,
    ) -> Result<Vec<FetchedUpdate<Row, (), Timestamp, i64>>, StorageError>;

    /// Statistics of a snapshot, from state alone.
    async fn snapshot_stats(
        &self,
        id: GlobalId,
        as_of: Antichain<Timestamp>,
    ) -> Result<SnapshotStats, StorageError>;

    /// Everything tracked, as JSON.
    async fn dump(&self) -> serde_json::Value;
}

#[async_trait]
impl StorageCollections for StorageCollectionsImpl {
    async fn initialize_state(&self, init_ids: &BTreeSet<GlobalId>) -> Result<(), StorageError> {
        StorageCollectionsImpl::initialize_state(self, init_ids).await
    }

    async fn prepare_state(
        &self,
        ids_to_add: &BTreeSet<GlobalId>,
        ids_to_drop: &BTreeSet<GlobalId>,
        ids_to_register: &BTreeMap<GlobalId, ShardId>,
    ) -> Result<(), StorageError> {
        StorageCollectionsImpl::prepare_state(self, ids_to_add, ids_to_drop, ids_to_register).await
    }

    async fn create_collections_for_bootstrap(
        &self,
        collections: Vec<(GlobalId, CollectionDescription)>,
    ) -> Result<(), StorageError> {
        StorageCollectionsImpl::create_collections_for_bootstrap(self, collections).await
    }

    async fn drop_collections_unvalidated(
        &self,
        ids: &BTreeSet<GlobalId>,
    ) -> Result<(), StorageError> {
        StorageCollectionsImpl::drop_collections_unvalidated(self, ids).await
    }

    fn set_read_policies(&self, policies: Vec<(GlobalId, ReadPolicy)>) -> Result<(), StorageError> {
        StorageCollectionsImpl::set_read_policies(self, policies)
    }

    fn acquire_read_holds(&self, ids: Vec<GlobalId>) -> Result<Vec<ReadHold>, StorageError> {
        StorageCollectionsImpl::acquire_read_holds(self, ids)
    }

    fn collection_metadata(&self, id: GlobalId) -> Result<CollectionMetadata, StorageError> {
        StorageCollectionsImpl::collection_metadata(self, id)
    }

    fn collection_frontiers(&self, id: GlobalId) -> Result<CollectionFrontiers, StorageError> {
        StorageCollectionsImpl::collection_frontiers(self, id)
    }

    fn active_collection_frontiers(&self) -> Vec<CollectionFrontiers> {
        StorageCollectionsImpl::active_collection_frontiers(self)
    }

    fn check_exists(&self, id: GlobalId) -> Result<(), StorageError> {
        StorageCollectionsImpl::check_exists(self, id)
    }

    async fn snapshot(
        &self,
        id: GlobalId,
        as_of: Antichain<Timestamp>,
    ) -> Result<Vec<FetchedUpdate<Row, (), Timestamp, i64>>, StorageError> {
        StorageCollectionsImpl::snapshot(self, id, as_of).await
    }

    async fn snapshot_latest(
        &self,
        id: GlobalId,
    ) -> Result<Vec<FetchedUpdate<Row, (), Timestamp, i64>>, StorageError> {
        StorageCollectionsImpl::snapshot_latest(self, id).await
    }

    async fn snapshot_stats(
        &self,
        id: GlobalId,
        as_of: Antichain<Timestamp>,
    ) -> Result<SnapshotStats, StorageError> {
        StorageCollectionsImpl::snapshot_stats(self, id, as_of).await
    }

    async fn dump(&self) -> serde_json::Value {
        StorageCollectionsImpl::dump(self).await
    }
}
