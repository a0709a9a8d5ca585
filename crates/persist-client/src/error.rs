//! The errors callers of the client act on.

use std::fmt::Debug;

use persist_types::ShardId;
use timely::progress::Antichain;

/// The codecs a shard was created with, or that a caller asked for: key,
/// value, time and diff codec names.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Codecs {
    /// The key codec's name.
    pub key: String,
    /// The value codec's name.
    pub val: String,
    /// The time codec's name.
    pub ts: String,
    /// The diff codec's name.
    pub diff: String,
}

/// A shard was opened with codecs different from the ones it was created
/// with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("codec mismatch: requested {requested:?} but the shard uses {actual:?}")]
pub struct CodecMismatch {
    /// The codecs the caller asked for.
    pub requested: Codecs,
    /// The codecs the shard was created with.
    pub actual: Codecs,
}

/// A mistake in how the client was called. Nothing durable was changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidUsage<T: Debug> {
    /// An update's time is not at or beyond the batch's lower bound.
    #[error("update time {ts:?} is not at or beyond the lower {lower:?}")]
    UpdateNotBeyondLower {
        /// The update's time.
        ts: T,
        /// The batch's lower bound.
        lower: Antichain<T>,
    },
    /// An update's time is at or beyond the batch's upper bound.
    #[error("update time {ts:?} is at or beyond the upper {expected_upper:?}")]
    UpdateBeyondUpper {
        /// The update's time.
        ts: T,
        /// The batch's upper bound.
        expected_upper: Antichain<T>,
    },
    /// The lower bound is not less than or equal to the upper bound.
    #[error("invalid bounds: lower {lower:?} is not <= upper {upper:?}")]
    InvalidBounds {
        /// The lower bound.
        lower: Antichain<T>,
        /// The upper bound.
        upper: Antichain<T>,
    },
    /// A batch was appended with bounds other than the ones it was built with.
    #[error(
        "batch bounds [{batch_lower:?}, {batch_upper:?}) do not match the append's \
         [{append_lower:?}, {append_upper:?})"
    )]
    InvalidBatchBounds {
        /// The lower bound the batch was built with.
        batch_lower: Antichain<T>,
        /// The upper bound the batch was built with.
        batch_upper: Antichain<T>,
        /// The lower bound of the append.
        append_lower: Antichain<T>,
        /// The upper bound of the append.
        append_upper: Antichain<T>,
    },
    /// A batch with updates was appended over an empty time interval
    /// (`lower == upper`).
    #[error("batch with updates appended over the empty interval [{lower:?}, {upper:?})")]
    InvalidEmptyTimeInterval {
        /// The lower bound.
        lower: Antichain<T>,
        /// The upper bound.
        upper: Antichain<T>,
        /// The blob keys of the batch's parts.
        keys: Vec<String>,
    },
    /// A batch or part of one shard was used with a handle of another.
    #[error("batch of shard {batch_shard} used with a handle of shard {handle_shard}")]
    BatchNotFromThisShard {
        /// The shard the batch belongs to.
        batch_shard: ShardId,
        /// The shard of the handle it was used with.
        handle_shard: ShardId,
    },
    /// The shard was opened with different codecs than it was created with.
    #[error(transparent)]
    CodecMismatch(Box<CodecMismatch>),
    /// A batch was appended again over a different interval than the one
    /// it was first appended with (batches are consumed once).
    #[error("batch with parts {keys:?} was already appended over another interval")]
    BatchAlreadyAppended {
        /// The blob keys of the batch's parts.
        keys: Vec<String>,
    },
    /// A critical reader was opened with an opaque token type other than
    /// the one it was registered with.
    #[error("critical reader uses opaque codec {actual:?}, not {requested:?}")]
    OpaqueCodecMismatch {
        /// The codec the caller asked for.
        requested: String,
        /// The codec the reader was registered with.
        actual: String,
    },
    /// A shard can be finalized only once its since and upper are both the
    /// empty frontier.
    #[error("cannot finalize a shard with since {since:?} and upper {upper:?}: both must be empty")]
    FinalizationError {
        /// The shard's since.
        since: Antichain<T>,
        /// The shard's upper.
        upper: Antichain<T>,
    },
}

/// The shard's upper was not the expected one, so nothing was appended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("expected upper {expected:?} but the shard's upper is {current:?}")]
pub struct UpperMismatch<T> {
    /// The upper the caller expected.
    pub expected: Antichain<T>,
    /// The shard's upper when the append was attempted.
    pub current: Antichain<T>,
}

/// A read at times the shard can no longer distinguish: `as_of` is not at or
/// beyond the shard's since.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("as_of is not at or beyond the since {0:?}")]
pub struct Since<T>(pub Antichain<T>);

/// The shard's durable data cannot be used: its state or one of its parts
/// is unreadable, or the shard is gone. Nothing durable was changed by the
/// call that reports it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShardError {
    /// The shard's state cannot be interpreted: it was written by a newer
    /// version, is corrupt, or contradicts what this process saw before.
    #[error("shard {shard}: {reason}")]
    State {
        /// The shard.
        shard: ShardId,
        /// What is wrong.
        reason: String,
    },
    /// A part the state references is missing from blob, corrupt, or not
    /// a part of this shard's codecs.
    #[error("shard {shard}: part {key}: {reason}")]
    Part {
        /// The shard.
        shard: ShardId,
        /// The part's blob key.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// The handle's lease lapsed (it did not heartbeat in time) and a later
    /// state change expired it; its since hold is gone. Open a new handle.
    #[error("shard {shard}: {handle} was expired")]
    Expired {
        /// The shard.
        shard: ShardId,
        /// The expired reader or writer.
        handle: String,
    },
    /// The shard was finalized: it can no longer be read or written.
    #[error("shard {shard} is finalized")]
    Finalized {
        /// The shard.
        shard: ShardId,
    },
}

/// Everything a handle operation can fail with, apart from the outcomes it
/// returns as values (such as [`UpperMismatch`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError<T: Debug> {
    /// The caller used the API wrongly.
    #[error(transparent)]
    InvalidUsage(#[from] InvalidUsage<T>),
    /// A read at an `as_of` the shard can no longer serve.
    #[error(transparent)]
    Since(#[from] Since<T>),
    /// The shard's durable data cannot be used.
    #[error(transparent)]
    Shard(#[from] ShardError),
}

impl<T: Debug> From<CodecMismatch> for ClientError<T> {
    fn from(mismatch: CodecMismatch) -> Self {
        ClientError::InvalidUsage(InvalidUsage::CodecMismatch(Box::new(mismatch)))
    }
}
