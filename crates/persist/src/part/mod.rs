//! The on-blob format of a shard part: a sorted run of encoded updates
//! `((key, val), time, diff)` stored as one Parquet file.
//!
//! This module knows nothing about the types of the updates. Keys and vals
//! are opaque byte strings (the output of a `Codec`); times and diffs are
//! exactly 8 bytes (the output of a `Codec64`). The client crate encodes and
//! decodes the typed values around it.
//!
//! # Layout
//!
//! A part is a Parquet file with four required (non-null) columns, in order:
//!
//! | column | Parquet type | Arrow type | content |
//! | --- | --- | --- | --- |
//! | `k` | `BYTE_ARRAY` | `Binary` | the encoded key |
//! | `v` | `BYTE_ARRAY` | `Binary` | the encoded val |
//! | `t` | `INT64` | `Int64` | the 8 time bytes, read as a little-endian `i64` |
//! | `d` | `INT64` | `Int64` | the 8 diff bytes, read as a little-endian `i64` |
//!
//! Storing `t` and `d` as integers (rather than 8-byte binaries) lets ordinary
//! Parquet tools show them; whether the `i64` means anything depends on the
//! `Codec64` (for `u64` times and `i64` diffs it is the value itself, modulo
//! the sign bit for times past `i64::MAX`).
//!
//! The file's key-value metadata holds:
//!
//! | key | value |
//! | --- | --- |
//! | `persist.format` | the format version, currently `"2"` ([`FORMAT_VERSION`]) |
//! | `persist.key_codec`, `persist.val_codec` | the `Codec` names of keys and vals |
//! | `persist.ts_codec`, `persist.diff_codec` | the `Codec64` names of times and diffs |
//! | `persist.crc32` | the CRC-32 of the data, as 8 lowercase hex digits (see below) |
//!
//! Parquet has no end-to-end checksum: a flipped bit inside a compressed
//! value can decode into a different value without any error. So the
//! writer records a CRC-32 over the data, and [`decode_part`] recomputes it
//! and refuses a mismatch as corrupt. In version 2 the checksum covers the
//! uncompressed values of every data page, in file order (row group by row
//! group, column by column, page by page: readers require the chunks to
//! follow one another in that order); compression does not change it,
//! and both ends hash long contiguous buffers. Version 1 hashed the updates
//! row by row (for each row: the key's length as a little-endian `u64`,
//! the key, the same for the val, then the time and diff bytes).
//!
//! Writers produce one row group (parts are target-sized, a few MiB) of
//! version-1 data pages of about 1 MiB, `PLAIN`-encoded, Snappy-compressed
//! or not (the writer's choice, see [`PartBuilder::with_compression`]),
//! with no dictionary pages, no column statistics (the part's own
//! [`PartStats`] live in shard state) and no page index. Readers accept any
//! number of row groups and pages, uncompressed or Snappy chunks, and
//! nothing else: those encodings are what lets [`decode_part`] bound its
//! memory by the input's size (and read an uncompressed part's keys and
//! vals in place), so files with dictionary pages, other codecs or v2 pages
//! are refused as corrupt even if tools read them.
//!
//! # Versions
//!
//! Writers always write the newest version, [`FORMAT_VERSION`]; readers
//! read every version from 1 up to it. They refuse a version they do not
//! know (a part written by newer code) with
//! [`PartError::UnsupportedFormat`], naming the version found, rather than
//! guessing. A future version that changes the layout bumps the number and
//! keeps the reader of the old ones.
//!
//! # Untrusted input
//!
//! [`decode_part`] never trusts its input: anything that is not a well-formed
//! part of a known version is a [`PartError`], never a panic, and the memory
//! it allocates is bounded by a small multiple of the input's size. See
//! [`decode_part`] for how.

mod builder;
mod decode;
mod stats;
mod thrift;

pub use builder::{EncodedPart, PartBuilder, PartUpdate, encode_part, encode_part_into};
pub use decode::{DecodedPart, decode_part};
pub use stats::{MAX_STATS_KEY_BYTES, PartStats};

/// The format version this code writes, and the newest one it reads.
pub const FORMAT_VERSION: u32 = 2;

/// Metadata key of the format version.
const META_FORMAT: &str = "persist.format";
/// Metadata key of the key codec name.
const META_KEY_CODEC: &str = "persist.key_codec";
/// Metadata key of the val codec name.
const META_VAL_CODEC: &str = "persist.val_codec";
/// Metadata key of the time codec name.
const META_TS_CODEC: &str = "persist.ts_codec";
/// Metadata key of the diff codec name.
const META_DIFF_CODEC: &str = "persist.diff_codec";
/// The metadata key of the updates' checksum.
const META_CRC32: &str = "persist.crc32";

/// The checksum of a part's updates (see the module docs).
///
/// CRC-32 is a stream checksum, so feeding the bytes in any split gives the
/// same value. Updates are small, and the hasher's fast (SIMD) path needs
/// long inputs, so they are gathered into a buffer first.
#[derive(Clone)]
struct Checksum {
    hasher: crc32fast::Hasher,
    buf: Vec<u8>,
}

/// How many bytes [`Checksum`] gathers before hashing them.
const CHECKSUM_CHUNK: usize = 64 << 10;

impl Checksum {
    fn new() -> Self {
        Checksum {
            hasher: crc32fast::Hasher::new(),
            buf: Vec::with_capacity(CHECKSUM_CHUNK + 64),
        }
    }

    /// Feeds one update.
    fn update(&mut self, key: &[u8], val: &[u8], time: [u8; 8], diff: [u8; 8]) {
        self.buf
            .extend_from_slice(&(key.len() as u64).to_le_bytes());
        self.buf.extend_from_slice(key);
        self.buf
            .extend_from_slice(&(val.len() as u64).to_le_bytes());
        self.buf.extend_from_slice(val);
        self.buf.extend_from_slice(&time);
        self.buf.extend_from_slice(&diff);
        if self.buf.len() >= CHECKSUM_CHUNK {
            self.hasher.update(&self.buf);
            self.buf.clear();
        }
    }

    fn finalize(mut self) -> u32 {
        self.hasher.update(&self.buf);
        self.hasher.finalize()
    }
}

/// Column names, in schema order.
const COL_KEY: &str = "k";
const COL_VAL: &str = "v";
const COL_TIME: &str = "t";
const COL_DIFF: &str = "d";

/// The names of the codecs that produced a part's keys, vals, times and
/// diffs. Stored in the part and returned unchanged by [`decode_part`], so a
/// reader can refuse a part written with different codecs.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PartCodecs {
    /// Name of the key `Codec`.
    pub key: String,
    /// Name of the val `Codec`.
    pub val: String,
    /// Name of the time `Codec64`.
    pub ts: String,
    /// Name of the diff `Codec64`.
    pub diff: String,
}

/// Why a part could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PartError {
    /// The bytes are not a well-formed part: not Parquet, truncated, a bad
    /// footer or page, a schema other than the part schema (column names,
    /// types, nullability), missing persist metadata, or data that does not
    /// decode. `reason` names the problem.
    #[error("corrupt part: {reason}")]
    Corrupt {
        /// What is wrong with the bytes.
        reason: String,
    },
    /// The part declares a format version this code does not read, usually
    /// because newer code wrote it.
    #[error(
        "unsupported part format version {found:?}: this build reads versions 1 through {supported}"
    )]
    UnsupportedFormat {
        /// The `persist.format` value found in the part, verbatim.
        found: String,
        /// The newest version this build reads ([`FORMAT_VERSION`]).
        supported: u32,
    },
    /// Writing the part failed: it is too large for the format (more than
    /// 2 GiB of keys or of vals) or the Parquet writer reported an error.
    #[error("encoding part failed: {reason}")]
    Encode {
        /// What went wrong.
        reason: String,
    },
}

impl PartError {
    fn corrupt(reason: impl Into<String>) -> Self {
        PartError::Corrupt {
            reason: reason.into(),
        }
    }
}
