//! The persist client: shards you can write, read, listen to and hold.
//!
//! A *shard* is a durable, definite time-varying collection of
//! `((key, val), time, diff)` updates, kept as immutable parts in a blob
//! store and a small state log in a consensus store. Open one through a
//! [`PersistClient`]:
//!
//! - a [`WriteHandle`] appends batches, fenced by the shard's upper;
//! - a [`ReadHandle`] holds back the shard's since with a lease and reads
//!   snapshots, listens and subscriptions;
//! - a [`SinceHandle`] holds the since without a lease, fenced by a token.
//!
//! The shard's *upper* is the frontier before which it is complete; its
//! *since* is the frontier at or beyond which reads are still exact.

#![warn(missing_docs, missing_debug_implementations)]

pub mod batch;
pub mod cfg;
pub mod client;
pub mod critical;
pub mod error;
pub mod fetch;
pub mod ids;
pub(crate) mod internal;
pub mod metrics;
pub mod read;
pub mod write;

#[cfg(test)]
mod tests;

/// Marks a handle's unused type parameters without owning values of them.
pub(crate) type Marker<X> = std::marker::PhantomData<fn() -> X>;

pub use batch::{Added, Batch, BatchBuilder, TransmittableBatch};
pub use cfg::{DynamicConfig, PersistConfig};
pub use client::{CONTROLLER_CRITICAL_SINCE, Diagnostics, PersistClient, PersistClientCache};
pub use critical::{SinceHandle, SnapshotStats};
pub use error::{
    ClientError, CodecMismatch, Codecs, InvalidUsage, ShardError, Since, UpperMismatch,
};
pub use fetch::{BatchFetcher, FetchedPart, FetchedUpdate, LeasedBatchPart, SerdeLeasedBatchPart};
pub use ids::{CriticalReaderId, IdParseError, IdempotencyToken, LeasedReaderId, WriterId};
pub use internal::compact::CompactionStats;
pub use metrics::Metrics;
pub use persist_types::{PersistLocation, ShardId};
pub use read::{
    Cursor, LeaseReturner, Listen, ListenEvent, ListenStreamItem, ReadHandle, SnapshotPartsStats,
    Subscribe,
};
pub use write::WriteHandle;
