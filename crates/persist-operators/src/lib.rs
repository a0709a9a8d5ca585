//! Timely dataflow operators over persist shards.
//!
//! - [`builder`]: an operator whose logic is a Rust future
//!   ([`AsyncOperatorBuilder`]), the base of the others.
//! - [`source`]: [`shard_source`] reads a shard into a dataflow (one
//!   worker leases parts, every worker fetches them).
//! - [`sink`]: [`persist_sink`] maintains a shard's contents equal to a
//!   differential collection (self-correcting, safe with several replicas).
//!
//! See `docs/operators.md` for the semantics and guarantees in one place.

#![warn(missing_docs, missing_debug_implementations)]

pub mod builder;

pub use builder::{AsyncInput, AsyncOperatorBuilder, AsyncOutput, Event, ShutdownButton};
pub mod error;
mod offload;
mod own_appends;
pub mod source;

pub use error::SourceError;
pub use source::{ShardSourceArgs, SnapshotMode, SourceOutput, SourceToken, shard_source};
pub mod record;
pub mod sink;

pub use record::{Record, RecordSchema};
pub use sink::{PersistSinkArgs, SinkData, SinkToken, persist_sink};
