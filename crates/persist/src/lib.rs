//! Durable storage for persist: the [`Blob`] and [`Consensus`] abstractions
//! and their backends.
//!
//! - [`Blob`] is a key-value store of immutable byte values (shard parts and
//!   state rollups). A `set` is atomic and durable before it returns.
//! - [`Consensus`] is a linearizable log per key: a sequence of
//!   [`VersionedData`] extended only by [`Consensus::compare_and_set`], so
//!   exactly one writer wins each [`SeqNo`].
//!
//! Backends are picked by URI ([`open_blob`], [`open_consensus`]):
//!
//! | uri | blob | consensus |
//! | --- | --- | --- |
//! | `mem://` | [`mem::MemBlob`] | [`mem::MemConsensus`] |
//! | `file:///abs/dir` | [`file::FileBlob`] | |
//! | `sqlite:///abs/file.db` | | [`sqlite::SqliteConsensus`] |
//! | `postgres://user@host:port/db` | | [`postgres::PostgresConsensus`] |
//! | `s3://bucket/prefix?endpoint=...&region=...` | [`s3::S3Blob`] | |
//!
//! [`unreliable`] wraps any backend to inject failures and latency in tests.
//!
//! [`part`] is the on-blob format of a shard part (Parquet) and its stats.
//!
//! Every fallible call returns an [`ExternalError`], which says whether the
//! operation certainly did not happen ([`Determinate`]) or may have happened
//! ([`Indeterminate`]); retry logic above depends on that distinction.

#![warn(missing_docs, missing_debug_implementations)]

mod cfg;
mod error;
pub mod file;
mod location;
pub mod mem;
pub mod part;
pub mod postgres;
pub mod s3;
pub mod sqlite;
pub mod unreliable;

#[cfg(test)]
mod conformance;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use cfg::{OpenError, open_blob, open_consensus};
pub use error::{Determinate, ExternalError, Indeterminate};
pub use location::{Blob, BlobMetadata, CaSResult, Consensus, SeqNo, VersionedData};
