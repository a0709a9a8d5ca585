//! The durable encoding of [`State`]: protobuf (prost), versioned.
//!
//! Every consensus entry starts with two fields that never change meaning:
//! the encoding version (bumped on any incompatible change) and the version
//! of the code that wrote it. A reader first decodes just those, and refuses
//! an entry written with a newer encoding or by newer code (of a later
//! major.minor release) instead of misreading it. Times, diffs and opaque
//! tokens are stored in their `Codec64` encodings as fixed 64-bit fields.
//!
//! The messages are declared with `prost`'s derive, so no code generation
//! step (and no `protoc`) is needed to build.
//!
//! An entry is either a whole state ([`ProtoState`]: the first entry of a
//! shard, a tombstone, and every rollup in blob) or the difference from the
//! previous SeqNo's state ([`ProtoDiff`]); field 30 tells them apart.
//!
//! Rule for changes: adding any field bumps [`ENCODING_VERSION`]. Older code
//! drops fields it does not know when it rewrites state, so a field it could
//! read past would be silently erased; the version bump makes it refuse
//! instead.

use bytes::Bytes;
use differential_dataflow::lattice::Lattice;
use differential_dataflow::trace::Description;
use persist::SeqNo;
use persist_types::{Codec64, ShardId};
use prost::Message;
use timely::progress::{Antichain, Timestamp};

use crate::error::Codecs;
use crate::ids::{CriticalReaderId, IdParseError, IdempotencyToken, LeasedReaderId, WriterId};
use crate::internal::diff::{MapDiff, Splice, StateDiff};
use crate::internal::state::{
    CriticalReaderState, HollowBatch, HollowPart, LeasedReaderState, State, WriterState,
};

/// The encoding this code writes. Readers accept this and older ones.
pub(crate) const ENCODING_VERSION: u32 = 3;

/// The version of the code writing state.
const BUILD_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Why a consensus entry could not be decoded into a [`State`]. Nothing was
/// changed by the attempt.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateDecodeError {
    /// The bytes are not a valid encoding (corrupt or truncated).
    #[error("corrupt shard state: {0}")]
    Corrupt(String),
    /// The entry uses an encoding newer than this code understands.
    #[error("shard state uses encoding version {found}, newer than the supported {supported}")]
    NewerEncoding {
        /// The entry's encoding version.
        found: u32,
        /// The newest version this code reads.
        supported: u32,
    },
    /// The entry was written by a newer release of this code, which may rely
    /// on semantics this one does not know.
    #[error("shard state was written by version {found}, newer than this code's {ours}")]
    NewerCode {
        /// The version that wrote the entry.
        found: String,
        /// This code's version.
        ours: String,
    },
    /// The entry belongs to another shard.
    #[error("consensus entry for shard {expected} holds state of shard {found}")]
    WrongShard {
        /// The shard whose key was read.
        expected: ShardId,
        /// The shard named inside the entry.
        found: String,
    },
    /// The shard's times use another codec than the type it was read as,
    /// so its frontiers cannot be interpreted (a caller mistake, reported
    /// as a codec mismatch).
    #[error("shard state has times of codec {}", actual.ts)]
    TimeCodecMismatch {
        /// The codecs the shard was created with.
        actual: Codecs,
    },
}

#[derive(Clone, PartialEq, Message)]
struct ProtoVersions {
    #[prost(uint32, tag = "1")]
    encoding_version: u32,
    #[prost(string, tag = "2")]
    build_version: String,
    #[prost(string, tag = "3")]
    shard_id: String,
    #[prost(message, optional, tag = "6")]
    codecs: Option<ProtoCodecs>,
    #[prost(bool, tag = "30")]
    is_diff: bool,
}

#[derive(Clone, PartialEq, Message)]
struct ProtoState {
    #[prost(uint32, tag = "1")]
    encoding_version: u32,
    #[prost(string, tag = "2")]
    build_version: String,
    #[prost(string, tag = "3")]
    shard_id: String,
    #[prost(uint64, tag = "4")]
    seqno: u64,
    #[prost(uint64, tag = "5")]
    walltime_ms: u64,
    #[prost(message, optional, tag = "6")]
    codecs: Option<ProtoCodecs>,
    #[prost(message, optional, tag = "7")]
    since: Option<ProtoAntichain>,
    #[prost(message, optional, tag = "8")]
    upper: Option<ProtoAntichain>,
    #[prost(message, repeated, tag = "9")]
    batches: Vec<ProtoBatch>,
    #[prost(message, repeated, tag = "10")]
    writers: Vec<ProtoWriter>,
    #[prost(message, repeated, tag = "11")]
    leased_readers: Vec<ProtoLeasedReader>,
    #[prost(message, repeated, tag = "12")]
    critical_readers: Vec<ProtoCriticalReader>,
    #[prost(message, repeated, tag = "13")]
    rollups: Vec<ProtoRollup>,
    #[prost(bool, tag = "30")]
    is_diff: bool,
}

/// The change from the state at `seqno - 1` to the state at `seqno`.
#[derive(Clone, PartialEq, Message)]
struct ProtoDiff {
    #[prost(uint32, tag = "1")]
    encoding_version: u32,
    #[prost(string, tag = "2")]
    build_version: String,
    #[prost(string, tag = "3")]
    shard_id: String,
    #[prost(uint64, tag = "4")]
    seqno: u64,
    #[prost(uint64, tag = "5")]
    walltime_ms: u64,
    #[prost(message, optional, tag = "6")]
    codecs: Option<ProtoCodecs>,
    #[prost(message, optional, tag = "7")]
    since: Option<ProtoAntichain>,
    #[prost(message, optional, tag = "8")]
    upper: Option<ProtoAntichain>,
    #[prost(uint64, tag = "9")]
    batches_prefix: u64,
    #[prost(uint64, tag = "10")]
    batches_suffix: u64,
    #[prost(message, repeated, tag = "11")]
    batches_middle: Vec<ProtoBatch>,
    #[prost(message, repeated, tag = "12")]
    writers_upsert: Vec<ProtoWriter>,
    #[prost(string, repeated, tag = "13")]
    writers_delete: Vec<String>,
    #[prost(message, repeated, tag = "14")]
    leased_readers_upsert: Vec<ProtoLeasedReader>,
    #[prost(string, repeated, tag = "15")]
    leased_readers_delete: Vec<String>,
    #[prost(message, repeated, tag = "16")]
    critical_readers_upsert: Vec<ProtoCriticalReader>,
    #[prost(string, repeated, tag = "17")]
    critical_readers_delete: Vec<String>,
    #[prost(message, repeated, tag = "18")]
    rollups_upsert: Vec<ProtoRollup>,
    #[prost(uint64, repeated, tag = "19")]
    rollups_delete: Vec<u64>,
    #[prost(bool, tag = "30")]
    is_diff: bool,
}

#[derive(Clone, PartialEq, Message)]
struct ProtoRollup {
    #[prost(uint64, tag = "1")]
    seqno: u64,
    #[prost(string, tag = "2")]
    key: String,
}

#[derive(Clone, PartialEq, Message)]
struct ProtoCodecs {
    #[prost(string, tag = "1")]
    key: String,
    #[prost(string, tag = "2")]
    val: String,
    #[prost(string, tag = "3")]
    ts: String,
    #[prost(string, tag = "4")]
    diff: String,
}

#[derive(Clone, PartialEq, Message)]
struct ProtoAntichain {
    #[prost(fixed64, repeated, tag = "1")]
    elements: Vec<u64>,
}

#[derive(Clone, PartialEq, Message)]
struct ProtoBatch {
    #[prost(message, optional, tag = "1")]
    lower: Option<ProtoAntichain>,
    #[prost(message, optional, tag = "2")]
    upper: Option<ProtoAntichain>,
    #[prost(message, optional, tag = "3")]
    since: Option<ProtoAntichain>,
    #[prost(message, repeated, tag = "4")]
    parts: Vec<ProtoPart>,
    #[prost(uint64, tag = "5")]
    len: u64,
    #[prost(uint64, repeated, tag = "6")]
    runs: Vec<u64>,
}

#[derive(Clone, PartialEq, Message)]
struct ProtoPart {
    #[prost(string, tag = "1")]
    key: String,
    #[prost(uint64, tag = "2")]
    len: u64,
    #[prost(uint64, tag = "3")]
    encoded_size_bytes: u64,
    #[prost(bytes = "vec", tag = "4")]
    key_lower: Vec<u8>,
    #[prost(bytes = "vec", optional, tag = "5")]
    key_upper: Option<Vec<u8>>,
    #[prost(fixed64, tag = "6")]
    ts_lower: u64,
    #[prost(fixed64, tag = "7")]
    ts_upper: u64,
}

#[derive(Clone, PartialEq, Message)]
struct ProtoWriter {
    #[prost(string, tag = "1")]
    id: String,
    #[prost(uint64, tag = "2")]
    last_heartbeat_ms: u64,
    #[prost(uint64, tag = "3")]
    lease_duration_ms: u64,
    #[prost(string, tag = "4")]
    most_recent_write_token: String,
    #[prost(message, optional, tag = "5")]
    most_recent_write_upper: Option<ProtoAntichain>,
    #[prost(string, tag = "6")]
    purpose: String,
}

#[derive(Clone, PartialEq, Message)]
struct ProtoLeasedReader {
    #[prost(string, tag = "1")]
    id: String,
    #[prost(message, optional, tag = "2")]
    since: Option<ProtoAntichain>,
    #[prost(uint64, tag = "3")]
    seqno: u64,
    #[prost(uint64, tag = "4")]
    last_heartbeat_ms: u64,
    #[prost(uint64, tag = "5")]
    lease_duration_ms: u64,
    #[prost(string, tag = "6")]
    purpose: String,
}

#[derive(Clone, PartialEq, Message)]
struct ProtoCriticalReader {
    #[prost(string, tag = "1")]
    id: String,
    #[prost(message, optional, tag = "2")]
    since: Option<ProtoAntichain>,
    #[prost(fixed64, tag = "3")]
    opaque: u64,
    #[prost(string, tag = "4")]
    opaque_codec: String,
    #[prost(string, tag = "5")]
    purpose: String,
}

fn encode_antichain<T: Codec64>(frontier: &Antichain<T>) -> Option<ProtoAntichain> {
    Some(ProtoAntichain {
        elements: frontier
            .elements()
            .iter()
            .map(|t| u64::from_le_bytes(t.encode()))
            .collect(),
    })
}

fn decode_antichain<T: Timestamp + Codec64>(
    proto: Option<ProtoAntichain>,
    field: &str,
) -> Result<Antichain<T>, StateDecodeError> {
    let proto = proto.ok_or_else(|| StateDecodeError::Corrupt(format!("missing {field}")))?;
    let count = proto.elements.len();
    let frontier: Antichain<T> = proto
        .elements
        .into_iter()
        .map(|e| T::decode(e.to_le_bytes()))
        .collect();
    // Collecting drops duplicate and dominated elements; we never write any.
    if frontier.len() != count {
        return Err(StateDecodeError::Corrupt(format!(
            "{field} is not an antichain"
        )));
    }
    Ok(frontier)
}

/// Checks what every state this code writes satisfies, so that a corrupt
/// entry is refused here rather than misread later: batches are contiguous
/// from the minimum time to the upper, and each has `lower <= upper`.
fn validate<T: Timestamp>(state: &State<T>) -> Result<(), StateDecodeError> {
    let corrupt = |reason: &str| Err(StateDecodeError::Corrupt(reason.to_owned()));
    if state.seqno > SeqNo::MAX {
        return corrupt("seqno out of range");
    }
    let mut expected_lower = Antichain::from_elem(T::minimum());
    for batch in &state.batches {
        if batch.desc.lower() != &expected_lower {
            return corrupt("batches are not contiguous");
        }
        if !timely::PartialOrder::less_equal(batch.desc.lower(), batch.desc.upper()) {
            return corrupt("a batch's lower is not <= its upper");
        }
        expected_lower = batch.desc.upper().clone();
    }
    if expected_lower != state.upper {
        return corrupt("the batches do not end at the upper");
    }
    Ok(())
}

fn decode_id<I>(s: &str) -> Result<I, StateDecodeError>
where
    I: std::str::FromStr<Err = IdParseError>,
{
    s.parse()
        .map_err(|e: IdParseError| StateDecodeError::Corrupt(e.to_string()))
}

fn codecs_to_proto(codecs: &Codecs) -> Option<ProtoCodecs> {
    Some(ProtoCodecs {
        key: codecs.key.clone(),
        val: codecs.val.clone(),
        ts: codecs.ts.clone(),
        diff: codecs.diff.clone(),
    })
}

fn codecs_from_proto(proto: Option<ProtoCodecs>) -> Result<Codecs, StateDecodeError> {
    let codecs = proto.ok_or_else(|| StateDecodeError::Corrupt("missing codecs".to_owned()))?;
    Ok(Codecs {
        key: codecs.key,
        val: codecs.val,
        ts: codecs.ts,
        diff: codecs.diff,
    })
}

fn batch_to_proto<T: Codec64>(b: &HollowBatch<T>) -> ProtoBatch {
    ProtoBatch {
        lower: encode_antichain(b.desc.lower()),
        upper: encode_antichain(b.desc.upper()),
        since: encode_antichain(b.desc.since()),
        parts: b
            .parts
            .iter()
            .map(|p| ProtoPart {
                key: p.key.clone(),
                len: p.len,
                encoded_size_bytes: p.encoded_size_bytes,
                key_lower: p.key_lower.clone(),
                key_upper: p.key_upper.clone(),
                ts_lower: u64::from_le_bytes(p.ts_lower),
                ts_upper: u64::from_le_bytes(p.ts_upper),
            })
            .collect(),
        len: b.len,
        runs: b.runs.iter().map(|&n| n as u64).collect(),
    }
}

fn batch_from_proto<T: Timestamp + Codec64>(
    b: ProtoBatch,
) -> Result<HollowBatch<T>, StateDecodeError> {
    let lower = decode_antichain(b.lower, "batch lower")?;
    if lower.is_empty() {
        // Nothing can follow the end of time (and `Description` insists).
        return Err(StateDecodeError::Corrupt(
            "a batch starts at the empty frontier".to_owned(),
        ));
    }
    let desc = Description::new(
        lower,
        decode_antichain(b.upper, "batch upper")?,
        decode_antichain(b.since, "batch since")?,
    );
    let parts = b
        .parts
        .into_iter()
        .map(|p| HollowPart {
            key: p.key,
            len: p.len,
            encoded_size_bytes: p.encoded_size_bytes,
            key_lower: p.key_lower,
            key_upper: p.key_upper,
            ts_lower: p.ts_lower.to_le_bytes(),
            ts_upper: p.ts_upper.to_le_bytes(),
        })
        .collect();
    let runs = b
        .runs
        .into_iter()
        .map(usize::try_from)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| StateDecodeError::Corrupt("run length out of range".to_owned()))?;
    Ok(HollowBatch {
        desc,
        parts,
        len: b.len,
        runs,
    })
}

fn writer_to_proto<T: Codec64>(id: &WriterId, w: &WriterState<T>) -> ProtoWriter {
    ProtoWriter {
        id: id.to_string(),
        last_heartbeat_ms: w.last_heartbeat_ms,
        lease_duration_ms: w.lease_duration_ms,
        most_recent_write_token: w.most_recent_write_token.to_string(),
        most_recent_write_upper: encode_antichain(&w.most_recent_write_upper),
        purpose: w.purpose.clone(),
    }
}

fn writer_from_proto<T: Timestamp + Codec64>(
    w: ProtoWriter,
) -> Result<(WriterId, WriterState<T>), StateDecodeError> {
    let state = WriterState {
        last_heartbeat_ms: w.last_heartbeat_ms,
        lease_duration_ms: w.lease_duration_ms,
        most_recent_write_token: decode_id::<IdempotencyToken>(&w.most_recent_write_token)?,
        most_recent_write_upper: decode_antichain(w.most_recent_write_upper, "writer upper")?,
        purpose: w.purpose,
    };
    Ok((decode_id::<WriterId>(&w.id)?, state))
}

fn leased_to_proto<T: Codec64>(id: &LeasedReaderId, r: &LeasedReaderState<T>) -> ProtoLeasedReader {
    ProtoLeasedReader {
        id: id.to_string(),
        since: encode_antichain(&r.since),
        seqno: r.seqno.0,
        last_heartbeat_ms: r.last_heartbeat_ms,
        lease_duration_ms: r.lease_duration_ms,
        purpose: r.purpose.clone(),
    }
}

fn leased_from_proto<T: Timestamp + Codec64>(
    r: ProtoLeasedReader,
) -> Result<(LeasedReaderId, LeasedReaderState<T>), StateDecodeError> {
    let state = LeasedReaderState {
        since: decode_antichain(r.since, "reader since")?,
        seqno: SeqNo(r.seqno),
        last_heartbeat_ms: r.last_heartbeat_ms,
        lease_duration_ms: r.lease_duration_ms,
        purpose: r.purpose,
    };
    Ok((decode_id::<LeasedReaderId>(&r.id)?, state))
}

fn critical_to_proto<T: Codec64>(
    id: &CriticalReaderId,
    r: &CriticalReaderState<T>,
) -> ProtoCriticalReader {
    ProtoCriticalReader {
        id: id.to_string(),
        since: encode_antichain(&r.since),
        opaque: u64::from_le_bytes(r.opaque),
        opaque_codec: r.opaque_codec.clone(),
        purpose: r.purpose.clone(),
    }
}

fn critical_from_proto<T: Timestamp + Codec64>(
    r: ProtoCriticalReader,
) -> Result<(CriticalReaderId, CriticalReaderState<T>), StateDecodeError> {
    let state = CriticalReaderState {
        since: decode_antichain(r.since, "critical reader since")?,
        opaque: r.opaque.to_le_bytes(),
        opaque_codec: r.opaque_codec,
        purpose: r.purpose,
    };
    Ok((decode_id::<CriticalReaderId>(&r.id)?, state))
}

fn rollup_to_proto((seqno, key): (&SeqNo, &String)) -> ProtoRollup {
    ProtoRollup {
        seqno: seqno.0,
        key: key.clone(),
    }
}

/// Encodes `state` whole (the first entry of a shard, a tombstone, or a
/// rollup).
pub(crate) fn encode_state<T: Timestamp + Codec64>(state: &State<T>) -> Bytes {
    let proto = ProtoState {
        encoding_version: ENCODING_VERSION,
        build_version: BUILD_VERSION.to_owned(),
        shard_id: state.shard_id.to_string(),
        seqno: state.seqno.0,
        walltime_ms: state.walltime_ms,
        codecs: codecs_to_proto(&state.codecs),
        since: encode_antichain(&state.since),
        upper: encode_antichain(&state.upper),
        batches: state.batches.iter().map(batch_to_proto).collect(),
        writers: state
            .writers
            .iter()
            .map(|(id, w)| writer_to_proto(id, w))
            .collect(),
        leased_readers: state
            .leased_readers
            .iter()
            .map(|(id, r)| leased_to_proto(id, r))
            .collect(),
        critical_readers: state
            .critical_readers
            .iter()
            .map(|(id, r)| critical_to_proto(id, r))
            .collect(),
        rollups: state.rollups.iter().map(rollup_to_proto).collect(),
        is_diff: false,
    };
    Bytes::from(proto.encode_to_vec())
}

/// Encodes the diff to `diff.seqno` of a shard with `codecs` for a
/// consensus entry.
pub(crate) fn encode_diff<T: Timestamp + Codec64>(
    shard_id: ShardId,
    codecs: &Codecs,
    diff: &StateDiff<T>,
) -> Bytes {
    let proto = ProtoDiff {
        encoding_version: ENCODING_VERSION,
        build_version: BUILD_VERSION.to_owned(),
        shard_id: shard_id.to_string(),
        seqno: diff.seqno.0,
        walltime_ms: diff.walltime_ms,
        codecs: codecs_to_proto(codecs),
        since: diff.since.as_ref().and_then(encode_antichain),
        upper: diff.upper.as_ref().and_then(encode_antichain),
        batches_prefix: diff.batches.prefix as u64,
        batches_suffix: diff.batches.suffix as u64,
        batches_middle: diff.batches.middle.iter().map(batch_to_proto).collect(),
        writers_upsert: diff
            .writers
            .upserts
            .iter()
            .map(|(id, w)| writer_to_proto(id, w))
            .collect(),
        writers_delete: diff
            .writers
            .deletes
            .iter()
            .map(|id| id.to_string())
            .collect(),
        leased_readers_upsert: diff
            .leased_readers
            .upserts
            .iter()
            .map(|(id, r)| leased_to_proto(id, r))
            .collect(),
        leased_readers_delete: diff
            .leased_readers
            .deletes
            .iter()
            .map(|id| id.to_string())
            .collect(),
        critical_readers_upsert: diff
            .critical_readers
            .upserts
            .iter()
            .map(|(id, r)| critical_to_proto(id, r))
            .collect(),
        critical_readers_delete: diff
            .critical_readers
            .deletes
            .iter()
            .map(|id| id.to_string())
            .collect(),
        rollups_upsert: diff
            .rollups
            .upserts
            .iter()
            .map(|(seqno, key)| rollup_to_proto((seqno, key)))
            .collect(),
        rollups_delete: diff.rollups.deletes.iter().map(|s| s.0).collect(),
        is_diff: true,
    };
    Bytes::from(proto.encode_to_vec())
}

/// Parses `major.minor` of a version string, if it has one.
fn major_minor(version: &str) -> Option<(u64, u64)> {
    let mut parts = version.split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// Decodes the header every entry starts with, refusing entries this code
/// must not interpret (see the module docs) and entries of other shards.
fn decode_header(shard_id: ShardId, bytes: &[u8]) -> Result<ProtoVersions, StateDecodeError> {
    let corrupt = |e: prost::DecodeError| StateDecodeError::Corrupt(e.to_string());
    let versions = ProtoVersions::decode(bytes).map_err(corrupt)?;
    if versions.encoding_version == 0 {
        return Err(StateDecodeError::Corrupt(
            "missing encoding version".to_owned(),
        ));
    }
    if versions.encoding_version > ENCODING_VERSION {
        return Err(StateDecodeError::NewerEncoding {
            found: versions.encoding_version,
            supported: ENCODING_VERSION,
        });
    }
    match (
        major_minor(&versions.build_version),
        major_minor(BUILD_VERSION),
    ) {
        (Some(found), Some(ours)) if found <= ours => {}
        _ => {
            return Err(StateDecodeError::NewerCode {
                found: versions.build_version,
                ours: BUILD_VERSION.to_owned(),
            });
        }
    }
    if versions.shard_id != shard_id.to_string() {
        return Err(StateDecodeError::WrongShard {
            expected: shard_id,
            found: versions.shard_id,
        });
    }
    Ok(versions)
}

/// The codecs recorded in an entry (whole or diff), whatever its time type.
pub(crate) fn decode_codecs(shard_id: ShardId, bytes: &[u8]) -> Result<Codecs, StateDecodeError> {
    codecs_from_proto(decode_header(shard_id, bytes)?.codecs)
}

/// A decoded consensus entry.
#[derive(Debug)]
pub(crate) enum Entry<T> {
    /// A whole state.
    Full(State<T>),
    /// The change from the previous SeqNo's state.
    Diff(StateDiff<T>),
}

/// Decodes a consensus entry of shard `shard_id` with times of type `T`.
pub(crate) fn decode_entry<T: Timestamp + Lattice + Codec64>(
    shard_id: ShardId,
    bytes: &[u8],
) -> Result<Entry<T>, StateDecodeError> {
    let header = decode_header(shard_id, bytes)?;
    let codecs = codecs_from_proto(header.codecs)?;
    if codecs.ts != T::codec_name() {
        return Err(StateDecodeError::TimeCodecMismatch { actual: codecs });
    }
    if !header.is_diff {
        return decode_full(shard_id, codecs, bytes).map(Entry::Full);
    }
    let corrupt = |e: prost::DecodeError| StateDecodeError::Corrupt(e.to_string());
    let proto = ProtoDiff::decode(bytes).map_err(corrupt)?;
    let count = |n: u64| {
        usize::try_from(n).map_err(|_| StateDecodeError::Corrupt("batch count".to_owned()))
    };
    let diff = StateDiff {
        seqno: SeqNo(proto.seqno),
        walltime_ms: proto.walltime_ms,
        since: proto
            .since
            .map(|s| decode_antichain(Some(s), "since"))
            .transpose()?,
        upper: proto
            .upper
            .map(|u| decode_antichain(Some(u), "upper"))
            .transpose()?,
        batches: Splice {
            prefix: count(proto.batches_prefix)?,
            suffix: count(proto.batches_suffix)?,
            middle: proto
                .batches_middle
                .into_iter()
                .map(batch_from_proto)
                .collect::<Result<_, _>>()?,
        },
        writers: MapDiff {
            upserts: proto
                .writers_upsert
                .into_iter()
                .map(writer_from_proto)
                .collect::<Result<_, _>>()?,
            deletes: proto
                .writers_delete
                .iter()
                .map(|id| decode_id(id))
                .collect::<Result<_, _>>()?,
        },
        leased_readers: MapDiff {
            upserts: proto
                .leased_readers_upsert
                .into_iter()
                .map(leased_from_proto)
                .collect::<Result<_, _>>()?,
            deletes: proto
                .leased_readers_delete
                .iter()
                .map(|id| decode_id(id))
                .collect::<Result<_, _>>()?,
        },
        critical_readers: MapDiff {
            upserts: proto
                .critical_readers_upsert
                .into_iter()
                .map(critical_from_proto)
                .collect::<Result<_, _>>()?,
            deletes: proto
                .critical_readers_delete
                .iter()
                .map(|id| decode_id(id))
                .collect::<Result<_, _>>()?,
        },
        rollups: MapDiff {
            upserts: proto
                .rollups_upsert
                .into_iter()
                .map(|r| (SeqNo(r.seqno), r.key))
                .collect(),
            deletes: proto.rollups_delete.into_iter().map(SeqNo).collect(),
        },
    };
    Ok(Entry::Diff(diff))
}

/// Decodes a whole state (a rollup, or an entry known to be whole).
pub(crate) fn decode_state<T: Timestamp + Lattice + Codec64>(
    shard_id: ShardId,
    bytes: &[u8],
) -> Result<State<T>, StateDecodeError> {
    match decode_entry(shard_id, bytes)? {
        Entry::Full(state) => Ok(state),
        Entry::Diff(_) => Err(StateDecodeError::Corrupt(
            "expected a whole state, found a diff".to_owned(),
        )),
    }
}

fn decode_full<T: Timestamp + Lattice + Codec64>(
    shard_id: ShardId,
    codecs: Codecs,
    bytes: &[u8],
) -> Result<State<T>, StateDecodeError> {
    let corrupt = |e: prost::DecodeError| StateDecodeError::Corrupt(e.to_string());
    let proto = ProtoState::decode(bytes).map_err(corrupt)?;
    let state = State {
        shard_id,
        seqno: SeqNo(proto.seqno),
        walltime_ms: proto.walltime_ms,
        codecs,
        since: decode_antichain(proto.since, "since")?,
        upper: decode_antichain(proto.upper, "upper")?,
        batches: proto
            .batches
            .into_iter()
            .map(batch_from_proto)
            .collect::<Result<_, _>>()?,
        writers: proto
            .writers
            .into_iter()
            .map(writer_from_proto)
            .collect::<Result<_, _>>()?,
        leased_readers: proto
            .leased_readers
            .into_iter()
            .map(leased_from_proto)
            .collect::<Result<_, _>>()?,
        critical_readers: proto
            .critical_readers
            .into_iter()
            .map(critical_from_proto)
            .collect::<Result<_, _>>()?,
        rollups: proto
            .rollups
            .into_iter()
            .map(|r| (SeqNo(r.seqno), r.key))
            .collect(),
    };
    validate(&state)?;
    Ok(state)
}

/// Checks a state built by applying diffs the way a decoded whole state is
/// checked.
pub(crate) fn validate_state<T: Timestamp>(state: &State<T>) -> Result<(), StateDecodeError> {
    validate(state)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::internal::state::CompareAndAppendBreak;

    fn sample_state() -> State<u64> {
        let codecs = Codecs {
            key: "String".into(),
            val: "String".into(),
            ts: "u64".into(),
            diff: "i64".into(),
        };
        let mut state = State::new(ShardId::new(), codecs, 42);
        let writer = WriterId::new();
        let mut batch = HollowBatch::empty(Antichain::from_elem(0), Antichain::from_elem(3));
        batch.parts.push(HollowPart {
            key: "s/w/p".into(),
            len: 2,
            encoded_size_bytes: 100,
            key_lower: b"a".to_vec(),
            key_upper: Some(b"z".to_vec()),
            ts_lower: Codec64::encode(&1u64),
            ts_upper: Codec64::encode(&2u64),
        });
        batch.len = 2;
        let appended = state.compare_and_append(&batch, writer, IdempotencyToken::new(), 5, 1000);
        assert_ne!(appended, Err(CompareAndAppendBreak::AlreadyCommitted));
        let reader = LeasedReaderId::new();
        state.register_leased_reader(reader, "test", 6, 1000);
        state.downgrade_since(reader, SeqNo(1), &Antichain::from_elem(2), 7);
        state
            .register_critical_reader(CriticalReaderId::new(), "ctl", 9u64.to_le_bytes(), "u64")
            .unwrap();
        state.seqno = SeqNo(7);
        state
    }

    #[test]
    fn state_roundtrips() {
        let state = sample_state();
        let bytes = encode_state(&state);
        assert_eq!(decode_state::<u64>(state.shard_id, &bytes).unwrap(), state);
        // The empty frontier (a tombstone's) survives too.
        let mut closed = state.clone();
        let last = HollowBatch::empty(Antichain::from_elem(3), Antichain::new());
        closed
            .compare_and_append(&last, WriterId::new(), IdempotencyToken::new(), 8, 1000)
            .unwrap();
        closed.since = Antichain::new();
        assert!(closed.is_tombstone());
        assert_eq!(
            decode_state::<u64>(state.shard_id, &encode_state(&closed)).unwrap(),
            closed
        );
    }

    #[test]
    fn newer_encodings_and_code_are_refused() {
        let state = sample_state();
        let mut proto = ProtoState::decode(&encode_state(&state)[..]).unwrap();
        proto.encoding_version = ENCODING_VERSION + 1;
        let err = decode_state::<u64>(state.shard_id, &proto.encode_to_vec()).unwrap_err();
        assert_eq!(
            err,
            StateDecodeError::NewerEncoding {
                found: ENCODING_VERSION + 1,
                supported: ENCODING_VERSION
            }
        );

        proto.encoding_version = ENCODING_VERSION;
        proto.build_version = "999.0.0".into();
        let err = decode_state::<u64>(state.shard_id, &proto.encode_to_vec()).unwrap_err();
        assert!(
            matches!(err, StateDecodeError::NewerCode { ref found, .. } if found == "999.0.0"),
            "{err}"
        );
        assert!(err.to_string().contains("999.0.0"));

        proto.build_version = "0.0.1".into();
        assert!(
            decode_state::<u64>(state.shard_id, &proto.encode_to_vec()).is_ok(),
            "older code's state reads"
        );
    }

    #[test]
    fn another_shards_state_is_refused() {
        let state = sample_state();
        let other = ShardId::new();
        let err = decode_state::<u64>(other, &encode_state(&state)).unwrap_err();
        assert!(matches!(err, StateDecodeError::WrongShard { expected, .. } if expected == other));
    }

    #[test]
    fn states_no_writer_produces_are_refused() {
        let state = sample_state();
        let proto = ProtoState::decode(&encode_state(&state)[..]).unwrap();
        let refuse = |edit: &dyn Fn(&mut ProtoState), why: &str| {
            let mut bad = proto.clone();
            edit(&mut bad);
            let err = decode_state::<u64>(state.shard_id, &bad.encode_to_vec()).unwrap_err();
            assert!(err.to_string().contains(why), "{why}: {err}");
        };
        refuse(
            &|p| p.batches[0].lower = Some(ProtoAntichain { elements: vec![] }),
            "empty frontier",
        );
        refuse(
            &|p| {
                p.upper = Some(ProtoAntichain {
                    elements: vec![3, 3],
                })
            },
            "not an antichain",
        );
        refuse(
            &|p| p.upper = Some(ProtoAntichain { elements: vec![9] }),
            "end at the upper",
        );
        refuse(
            &|p| p.batches[0].lower = Some(ProtoAntichain { elements: vec![1] }),
            "not contiguous",
        );
        refuse(
            &|p| p.batches[0].upper = Some(ProtoAntichain { elements: vec![] }),
            "end at the upper",
        );
        refuse(&|p| p.seqno = u64::MAX, "seqno out of range");
    }

    #[test]
    fn corrupt_ids_are_errors() {
        let state = sample_state();
        let mut proto = ProtoState::decode(&encode_state(&state)[..]).unwrap();
        proto.writers[0].id = "not-an-id".into();
        let err = decode_state::<u64>(state.shard_id, &proto.encode_to_vec()).unwrap_err();
        assert!(err.to_string().contains("not-an-id"), "{err}");
    }

    proptest! {
        #[test]
        fn truncated_or_garbled_state_never_panics(cut in 0usize..400, flip in 0usize..400, bit in 0u8..8) {
            let state = sample_state();
            let bytes = encode_state(&state);
            let _ = decode_state::<u64>(state.shard_id, &bytes[..cut.min(bytes.len())]);
            let mut garbled = bytes.to_vec();
            if let Some(byte) = garbled.get_mut(flip) {
                *byte ^= 1 << bit;
            }
            let _ = decode_state::<u64>(state.shard_id, &garbled);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_state::<u64>(ShardId::new(), &bytes);
        }
    }
}
