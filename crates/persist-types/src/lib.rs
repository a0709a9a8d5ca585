//! Core types shared by every layer of persist.
//!
//! - [`Codec`] and [`Codec64`]: how keys, values, times and diffs become bytes.
//! - [`Opaque`]: the fencing token of a critical reader.
//! - [`ShardId`]: the name of a durable time-varying collection.
//! - [`PersistLocation`]: where a shard's blobs and consensus log live, with
//!   secrets masked whenever it is printed.
//!
//! This crate does no I/O.

#![warn(missing_docs, missing_debug_implementations)]

mod codec;
mod location;
mod shard_id;

pub use codec::{
    Codec, Codec64, CodecError, I64Schema, Opaque, Schema, SimpleSchema, StringSchema, U64Schema,
    UnitSchema, VecU8Schema,
};
pub use location::{PersistLocation, redact_uri};
pub use shard_id::{ShardId, ShardIdParseError};
