//! The persist client: shards you can write, read, listen to and hold.
//!
//! Work in progress: the shard state and its transitions, ids and errors are
//! here; the handles arrive next.

#![warn(missing_docs, missing_debug_implementations)]

pub mod cfg;
pub mod error;
pub mod ids;
#[allow(dead_code)] // Used by the handles, which arrive next.
pub(crate) mod internal;

pub use cfg::PersistConfig;
pub use error::{CodecMismatch, Codecs, InvalidUsage, Since, UpperMismatch};
pub use ids::{CriticalReaderId, IdParseError, IdempotencyToken, LeasedReaderId, WriterId};
