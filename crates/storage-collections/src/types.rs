//! What the controller knows about a collection, and its errors.

use persist_client::{ClientError, Codecs};
use persist_types::{PersistLocation, ShardId};
use serde::Serialize;
use timely::progress::Antichain;

use crate::GlobalId;

/// The time of every collection: milliseconds, totally ordered.
pub type Timestamp = u64;

/// Where a collection's data comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum DataSource {
    /// Written by the controller's clients through `compare_and_append`.
    Table,
    /// Written by an ingestion dataflow.
    Ingestion,
    /// Written by a dataflow maintaining a derived collection.
    Other,
}

/// How to create a collection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CollectionDescription {
    /// Where its data comes from.
    pub data_source: DataSource,
    /// A since to start at (the shard's since is advanced to it), if any.
    pub since: Option<Antichain<Timestamp>>,
    /// A collection whose shard this one shares (a new version of a table,
    /// say). The primary is held back by this collection.
    pub primary: Option<GlobalId>,
    /// Collections this one is computed from: each is held back to this
    /// collection's since.
    pub dependencies: Vec<GlobalId>,
}

impl CollectionDescription {
    /// A table with no initial since, primary or dependencies.
    pub fn table() -> Self {
        CollectionDescription {
            data_source: DataSource::Table,
            since: None,
            primary: None,
            dependencies: Vec::new(),
        }
    }

    /// A derived collection computed from `dependencies`.
    pub fn derived(dependencies: Vec<GlobalId>) -> Self {
        CollectionDescription {
            data_source: DataSource::Other,
            since: None,
            primary: None,
            dependencies,
        }
    }
}

/// Where a collection's data lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CollectionMetadata {
    /// The persist location of its shard.
    pub location: PersistLocation,
    /// Its data shard.
    pub data_shard: ShardId,
    /// The codecs of its shard: `Vec<u8>` keys (encoded rows), `()` values,
    /// `u64` times, `i64` diffs.
    pub codecs: Codecs,
}

/// A collection's frontiers as the controller tracks them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CollectionFrontiers {
    /// The collection.
    pub id: GlobalId,
    /// The shard's upper, as last seen.
    pub write_frontier: Antichain<Timestamp>,
    /// The capability the read policy implies from the write frontier.
    pub implied_capability: Antichain<Timestamp>,
    /// The meet of every read capability (the implied one, read holds,
    /// dependents' holds): the since the shard is held at.
    pub read_capabilities: Antichain<Timestamp>,
}

/// Why a controller call failed. Nothing durable was changed unless the
/// variant says otherwise.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StorageError {
    /// No such collection (or it was dropped).
    #[error("collection {0} does not exist")]
    CollectionMissing(GlobalId),
    /// The id is already in use.
    #[error("collection {0} already exists")]
    CollectionIdReused(GlobalId),
    /// The collection was dropped; it cannot be read or held any more.
    #[error("collection {0} was dropped")]
    CollectionDropped(GlobalId),
    /// A read at an `as_of` before the collection's since.
    #[error("collection {id}: as_of {as_of:?} is before the since {since:?}")]
    ReadBeforeSince {
        /// The collection.
        id: GlobalId,
        /// The requested as_of.
        as_of: Antichain<Timestamp>,
        /// The collection's since.
        since: Antichain<Timestamp>,
    },
    /// A controller with a newer epoch took over: this one must stop.
    #[error("fenced: a controller with epoch {current} took over from epoch {ours}")]
    Fenced {
        /// This controller's epoch.
        ours: u64,
        /// The epoch that fenced it.
        current: u64,
    },
    /// The call needs a writable controller.
    #[error("the controller is read-only: {0}")]
    ReadOnly(&'static str),
    /// The collection's shard or persist itself failed.
    #[error("persist: {0}")]
    Persist(String),
    /// Another change to the durable metadata came first: nothing was
    /// written; rebuild the change on the fresh metadata and retry.
    #[error("the durable metadata changed concurrently; retry")]
    MetadataConflict,
    /// The durable metadata cannot be interpreted.
    #[error("durable metadata: {0}")]
    Metadata(String),
}

impl<T: std::fmt::Debug> From<ClientError<T>> for StorageError {
    fn from(err: ClientError<T>) -> Self {
        StorageError::Persist(err.to_string())
    }
}
