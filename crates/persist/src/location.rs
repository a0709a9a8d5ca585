//! The storage abstractions: [`Blob`] and [`Consensus`].

use std::fmt;

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::error::ExternalError;

/// A position in a [`Consensus`] key's log.
///
/// Sequence numbers of one key strictly increase. Backends that store them
/// as signed 64-bit integers support values up to [`SeqNo::MAX`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SeqNo(pub u64);

impl SeqNo {
    /// The first sequence number.
    pub const fn minimum() -> Self {
        SeqNo(0)
    }

    /// The largest sequence number every backend can store.
    pub const MAX: SeqNo = SeqNo(i64::MAX as u64);

    /// The sequence number after this one.
    pub const fn next(self) -> Self {
        SeqNo(self.0 + 1)
    }
}

impl fmt::Display for SeqNo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "v{}", self.0)
    }
}

/// One entry of a [`Consensus`] key's log: opaque bytes at a sequence number.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VersionedData {
    /// The entry's position in the log.
    pub seqno: SeqNo,
    /// The entry's contents.
    pub data: Bytes,
}

/// The outcome of a [`Consensus::compare_and_set`] that reached the backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CaSResult {
    /// The new entry was appended and is now the head.
    Committed,
    /// The head did not match the expectation, so nothing was written. Holds
    /// the head as of the failed attempt (or later): `None` if the key has
    /// no entries.
    ExpectationMismatch(Option<VersionedData>),
}

/// A linearizable log of [`VersionedData`] per key (a shard id).
///
/// The log of a key only grows at its head, through
/// [`Consensus::compare_and_set`], and only shrinks at its tail, through
/// [`Consensus::truncate`]. Every method may be called concurrently from many
/// tasks and processes.
///
/// Dropping an unfinished future is like an indeterminate error: the
/// operation may or may not take effect.
#[async_trait]
pub trait Consensus: fmt::Debug + Send + Sync {
    /// Returns the latest entry of `key`, or `None` if it has none.
    async fn head(&self, key: &str) -> Result<Option<VersionedData>, ExternalError>;

    /// Appends `new` to `key`'s log if and only if its head is at `expected`
    /// (`None`: the key has no entries).
    ///
    /// Exactly one of any number of concurrent calls with the same
    /// expectation commits. On a mismatch nothing is written and the current
    /// head is returned. `new.seqno` must be greater than `expected` and at
    /// most [`SeqNo::MAX`]; otherwise a determinate error is returned.
    ///
    /// After an indeterminate error the entry may or may not have been
    /// appended; callers find out by reading the head.
    async fn compare_and_set(
        &self,
        key: &str,
        expected: Option<SeqNo>,
        new: VersionedData,
    ) -> Result<CaSResult, ExternalError>;

    /// Returns up to `limit` entries of `key` with sequence numbers `>= from`,
    /// in increasing order. Entries below `from` that were truncated are
    /// simply absent.
    async fn scan(
        &self,
        key: &str,
        from: SeqNo,
        limit: usize,
    ) -> Result<Vec<VersionedData>, ExternalError>;

    /// Deletes the entries of `key` with sequence numbers `< seqno` and
    /// returns how many were deleted.
    ///
    /// The head is never deleted: it is a determinate error to truncate a key
    /// with no entries or past its head (`seqno > head`).
    async fn truncate(&self, key: &str, seqno: SeqNo) -> Result<usize, ExternalError>;

    /// Returns every key that has entries, in lexicographic order.
    async fn list_keys(&self) -> Result<Vec<String>, ExternalError>;
}

/// A key of a [`Blob`] and the size of its value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlobMetadata {
    /// The full key.
    pub key: String,
    /// The length of the value in bytes.
    pub size_in_bytes: u64,
}

/// A durable key-value store of byte values, written whole.
///
/// Values are written and read atomically: a reader sees either a whole value
/// written by one `set` or none. There is no ordering between keys. Every
/// method may be called concurrently from many tasks and processes.
///
/// Keys are non-empty strings; an empty key is rejected with a determinate
/// error. Backends may limit key length (see each backend).
///
/// Dropping an unfinished future is like an indeterminate error: the
/// operation may or may not take effect (blocking work already handed to a
/// thread runs to completion).
#[async_trait]
pub trait Blob: fmt::Debug + Send + Sync {
    /// Returns the value of `key`, or `None` if it has none.
    async fn get(&self, key: &str) -> Result<Option<Bytes>, ExternalError>;

    /// Calls `f` once for every key starting with `key_prefix`, in no
    /// particular order, with the size of its value.
    ///
    /// Keys set or deleted concurrently may or may not be reported.
    async fn list_keys_and_metadata(
        &self,
        key_prefix: &str,
        f: &mut (dyn FnMut(BlobMetadata) + Send),
    ) -> Result<(), ExternalError>;

    /// Sets the value of `key` to `value`, replacing any previous value.
    ///
    /// The write is atomic and durable before this returns `Ok`. After an
    /// error, `key` holds either its previous value or `value`.
    async fn set(&self, key: &str, value: Bytes) -> Result<(), ExternalError>;

    /// Deletes `key`, returning the size of the value it had, or `None` if it
    /// had none. Idempotent: deleting a missing key succeeds.
    async fn delete(&self, key: &str) -> Result<Option<usize>, ExternalError>;
}

/// Rejects the keys no [`Blob`] accepts.
pub(crate) fn validate_blob_key(key: &str) -> Result<(), ExternalError> {
    if key.is_empty() {
        return Err(ExternalError::determinate(
            "invalid blob key: keys must not be empty",
        ));
    }
    Ok(())
}

/// Checks the arguments of a [`Consensus::compare_and_set`] that every
/// backend must reject before touching storage.
pub(crate) fn validate_cas(
    expected: Option<SeqNo>,
    new: &VersionedData,
) -> Result<(), ExternalError> {
    if let Some(expected) = expected
        && new.seqno <= expected
    {
        return Err(ExternalError::determinate(format!(
            "invalid compare_and_set: new seqno {} must be greater than expected {expected}",
            new.seqno
        )));
    }
    if new.seqno > SeqNo::MAX {
        return Err(ExternalError::determinate(format!(
            "invalid compare_and_set: seqno {} exceeds the maximum {}",
            new.seqno,
            SeqNo::MAX
        )));
    }
    Ok(())
}

/// The error for a [`Consensus::truncate`] past the head (or of an empty key).
pub(crate) fn truncate_past_head(key: &str, seqno: SeqNo, head: Option<SeqNo>) -> ExternalError {
    match head {
        Some(head) => ExternalError::determinate(format!(
            "cannot truncate {key} to {seqno}: past its head {head}"
        )),
        None => ExternalError::determinate(format!(
            "cannot truncate {key} to {seqno}: it has no entries"
        )),
    }
}

/// Converts a sequence number read from a backend that stores signed 64-bit
/// integers, rejecting values no writer could have stored.
pub(crate) fn seqno_from_i64(key: &str, value: i64) -> Result<SeqNo, ExternalError> {
    u64::try_from(value).map(SeqNo).map_err(|_| {
        ExternalError::determinate(format!(
            "corrupt consensus entry for {key}: negative seqno {value}"
        ))
    })
}

/// Converts a sequence number for a backend that stores signed 64-bit
/// integers; [`validate_cas`] has already rejected larger ones for writes.
pub(crate) fn seqno_to_i64(seqno: SeqNo) -> i64 {
    i64::try_from(seqno.0).unwrap_or(i64::MAX)
}
