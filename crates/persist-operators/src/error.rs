//! What the operators report instead of panicking.

use persist_types::ShardId;
use serde::{Deserialize, Serialize};

/// Why some of a shard's data did not reach a [`shard_source`]'s ok
/// collection. Errors flow as records of the source's error collection
/// (with the time of the data they stand for), never as panics.
///
/// [`shard_source`]: crate::source::shard_source
#[derive(
    Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, thiserror::Error,
)]
pub enum SourceError {
    /// An update's key could not be decoded with the source's key codec.
    #[error("shard {shard}: undecodable key: {reason}")]
    UndecodableKey {
        /// The shard read.
        shard: ShardId,
        /// What the codec reported.
        reason: String,
    },
    /// An update's value could not be decoded with the source's value codec.
    #[error("shard {shard}: undecodable value: {reason}")]
    UndecodableVal {
        /// The shard read.
        shard: ShardId,
        /// What the codec reported.
        reason: String,
    },
    /// A whole part could not be fetched or decoded (missing or corrupt
    /// blob); its updates are missing from the ok collection.
    #[error("shard {shard}: part {part} unreadable: {reason}")]
    UnreadablePart {
        /// The shard read.
        shard: ShardId,
        /// The part's blob key.
        part: String,
        /// What the client reported.
        reason: String,
    },
    /// The source stopped reading (the reader could not be opened, the
    /// `as_of` is before the shard's since, the reader expired, ...). The
    /// source's frontier stays where it was: it never claims completeness
    /// for times it did not read.
    #[error("shard {shard}: reading stopped: {reason}")]
    Stopped {
        /// The shard read.
        shard: ShardId,
        /// What the client reported.
        reason: String,
    },
}
