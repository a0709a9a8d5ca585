//! Reading parts: the leases readers hand out, their exchangeable form, and
//! fetching and filtering a part's updates.

use std::fmt::Debug;
use std::marker::PhantomData;
use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use differential_dataflow::difference::Semigroup;
use differential_dataflow::lattice::Lattice;
use differential_dataflow::trace::Description;
use persist::part::{DecodedPart, PartStats, decode_part};
use persist::{Blob, SeqNo};
use persist_types::{Codec, Codec64, ShardId};
use serde::{Deserialize, Serialize};
use timely::PartialOrder;
use timely::progress::{Antichain, Timestamp};

use crate::cfg::DynamicConfig;
use crate::error::{ClientError, Codecs, InvalidUsage, ShardError};
use crate::ids::LeasedReaderId;
use crate::internal::machine::Backoff;
use crate::internal::merge::{Unsorted, consolidate_times, merge_sorted_runs, split_runs};
use crate::internal::part::check_codecs;
use crate::internal::state::HollowPart;

/// Which of a part's updates a reader keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum FetchFilter<T> {
    /// Updates at times at or before `as_of`, with times advanced to it.
    Snapshot {
        /// The snapshot's as_of.
        as_of: Antichain<T>,
    },
    /// Updates at times not at or before `as_of`, times unchanged.
    Listen {
        /// The listen's as_of.
        as_of: Antichain<T>,
    },
}

impl<T: Timestamp + Lattice> FetchFilter<T> {
    /// Whether `t` (inside the batch's description) is kept, advancing it
    /// as the filter says.
    fn keep(&self, t: &mut T) -> bool {
        match self {
            FetchFilter::Snapshot { as_of } => {
                // An empty as_of (the end of time) covers every time.
                let keep = as_of.is_empty() || not_beyond(t, as_of);
                if keep {
                    t.advance_by(as_of.borrow());
                }
                keep
            }
            FetchFilter::Listen { as_of } => !as_of.is_empty() && !not_beyond(t, as_of),
        }
    }

    /// Whether a part whose times lie between `lower` (their meet) and
    /// `upper` (their join) may hold an update this filter keeps.
    fn may_keep_part(&self, lower: &T, upper: &T) -> bool {
        match self {
            FetchFilter::Snapshot { as_of } => as_of.is_empty() || not_beyond(lower, as_of),
            FetchFilter::Listen { as_of } => !as_of.is_empty() && !not_beyond(upper, as_of),
        }
    }
}

/// Whether `t` is at or before some element of `frontier`.
pub(crate) fn not_beyond<T: PartialOrder>(t: &T, frontier: &Antichain<T>) -> bool {
    frontier.elements().iter().any(|a| t.less_equal(a))
}

/// One part of a batch, handed out by a [`ReadHandle`](crate::ReadHandle)
/// under a lease on the state it came from.
///
/// While the lease is outstanding the part stays readable (garbage
/// collection keeps the state's blobs). Give it back with
/// [`ReadHandle::process_returned_leased_part`](crate::ReadHandle::process_returned_leased_part)
/// once fetched; a part that is never returned holds the reader's SeqNo
/// lease until the reader expires.
#[derive(Debug)]
pub struct LeasedBatchPart<T> {
    pub(crate) shard_id: ShardId,
    pub(crate) reader_id: Option<LeasedReaderId>,
    /// The state version the part was leased at, if leased.
    pub leased_seqno: Option<SeqNo>,
    pub(crate) desc: Description<T>,
    pub(crate) part: HollowPart,
    pub(crate) filter: FetchFilter<T>,
}

impl<T: Timestamp + Lattice + Codec64> LeasedBatchPart<T> {
    /// The shard the part belongs to.
    pub fn shard_id(&self) -> ShardId {
        self.shard_id
    }

    /// A copy holding no lease, to carry the part's description and
    /// filter where the part itself cannot go (another thread).
    pub(crate) fn unleased_copy(&self) -> Self {
        LeasedBatchPart {
            shard_id: self.shard_id,
            reader_id: None,
            leased_seqno: None,
            desc: self.desc.clone(),
            part: self.part.clone(),
            filter: self.filter.clone(),
        }
    }

    /// The part's statistics: update count, size, key bounds.
    pub fn stats(&self) -> PartStats {
        part_stats(&self.part)
    }

    /// The size of the part in blob, in bytes.
    pub fn encoded_size_bytes(&self) -> u64 {
        self.part.encoded_size_bytes
    }

    /// Whether an update of this part at `t` is kept (inside the batch's
    /// description and passing the reader's filter), advancing `t` as the
    /// filter says.
    pub(crate) fn keeps(&self, t: &mut T) -> bool {
        in_description(t, &self.desc) && self.filter.keep(t)
    }

    /// The time every update of the part reads as, if the part's time
    /// bounds show they all do: a snapshot at a single-element `as_of`
    /// advances every time at or before it to the `as_of` itself, so a part
    /// wholly inside its batch and at or before the `as_of` needs no
    /// per-update filtering.
    pub(crate) fn uniform_time(&self) -> Option<T> {
        let FetchFilter::Snapshot { as_of } = &self.filter else {
            return None;
        };
        let [a] = as_of.elements() else { return None };
        let (lower, upper) = (T::decode(self.part.ts_lower), T::decode(self.part.ts_upper));
        let inside = self.desc.lower().less_equal(&lower);
        (inside && upper.less_equal(a)).then(|| a.clone())
    }

    /// Whether fetching the part may yield any update (its time bounds say
    /// whether any time passes the reader's filter).
    pub(crate) fn may_have_updates(&self) -> bool {
        let upper = T::decode(self.part.ts_upper);
        // Every time is at or before `upper`: none is at or beyond the
        // lower unless `upper` is.
        self.desc.lower().less_equal(&upper)
            && self
                .filter
                .may_keep_part(&T::decode(self.part.ts_lower), &upper)
    }

    /// The serializable form, to send the part to another worker or
    /// process. The lease travels with it: the receiver fetches it and the
    /// part must come back to the reader that leased it (through
    /// [`LeasedBatchPart::from_exchangeable`]) to release the lease.
    pub fn into_exchangeable_part(self) -> SerdeLeasedBatchPart {
        let (as_of, listen) = match &self.filter {
            FetchFilter::Snapshot { as_of } => (as_of, false),
            FetchFilter::Listen { as_of } => (as_of, true),
        };
        SerdeLeasedBatchPart {
            shard_id: self.shard_id,
            reader_id: self.reader_id,
            leased_seqno: self.leased_seqno.map(|s| s.0),
            lower: encode_frontier(self.desc.lower()),
            upper: encode_frontier(self.desc.upper()),
            since: encode_frontier(self.desc.since()),
            key: self.part.key.clone(),
            len: self.part.len,
            encoded_size_bytes: self.part.encoded_size_bytes,
            key_lower: self.part.key_lower.clone(),
            key_upper: self.part.key_upper.clone(),
            ts_lower: self.part.ts_lower,
            ts_upper: self.part.ts_upper,
            as_of: encode_frontier(as_of),
            listen,
        }
    }

    /// Rebuilds a part from its exchangeable form.
    pub fn from_exchangeable(x: SerdeLeasedBatchPart) -> Self {
        let as_of = decode_frontier(&x.as_of);
        LeasedBatchPart {
            shard_id: x.shard_id,
            reader_id: x.reader_id,
            leased_seqno: x.leased_seqno.map(SeqNo),
            desc: Description::new(
                decode_frontier(&x.lower),
                decode_frontier(&x.upper),
                decode_frontier(&x.since),
            ),
            part: HollowPart {
                key: x.key,
                len: x.len,
                encoded_size_bytes: x.encoded_size_bytes,
                key_lower: x.key_lower,
                key_upper: x.key_upper,
                ts_lower: x.ts_lower,
                ts_upper: x.ts_upper,
            },
            filter: if x.listen {
                FetchFilter::Listen { as_of }
            } else {
                FetchFilter::Snapshot { as_of }
            },
        }
    }
}

fn encode_frontier<T: Codec64>(frontier: &Antichain<T>) -> Vec<[u8; 8]> {
    frontier.elements().iter().map(Codec64::encode).collect()
}

fn decode_frontier<T: Timestamp + Codec64>(elements: &[[u8; 8]]) -> Antichain<T> {
    Antichain::from_iter(elements.iter().map(|e| T::decode(*e)))
}

pub(crate) fn part_stats(part: &HollowPart) -> PartStats {
    PartStats {
        len: part.len,
        encoded_size_bytes: part.encoded_size_bytes,
        key_lower: part.key_lower.clone(),
        key_upper: part.key_upper.clone(),
    }
}

/// The serializable form of a [`LeasedBatchPart`] (times in their
/// `Codec64` bytes), for exchanging parts between workers and processes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerdeLeasedBatchPart {
    shard_id: ShardId,
    reader_id: Option<LeasedReaderId>,
    leased_seqno: Option<u64>,
    #[serde(deserialize_with = "deserialize_lower")]
    lower: Vec<[u8; 8]>,
    upper: Vec<[u8; 8]>,
    since: Vec<[u8; 8]>,
    key: String,
    len: u64,
    encoded_size_bytes: u64,
    key_lower: Vec<u8>,
    key_upper: Option<Vec<u8>>,
    ts_lower: [u8; 8],
    ts_upper: [u8; 8],
    as_of: Vec<[u8; 8]>,
    listen: bool,
}

/// A batch's lower is never the empty frontier (and `Description` panics
/// on one): refuse it where the bytes from another process are decoded.
fn deserialize_lower<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<[u8; 8]>, D::Error> {
    let lower = Vec::<[u8; 8]>::deserialize(d)?;
    if lower.is_empty() {
        return Err(serde::de::Error::custom(
            "a part's lower is the empty frontier",
        ));
    }
    Ok(lower)
}

impl SerdeLeasedBatchPart {
    /// The encoded size of the part in blob, in bytes (useful to balance
    /// parts across workers without decoding them).
    pub fn encoded_size_bytes(&self) -> u64 {
        self.encoded_size_bytes
    }

    /// The part's blob key, unique within its shard: a stable way to pick
    /// the worker that fetches it.
    pub fn key(&self) -> &str {
        &self.key
    }
}

/// One update as readers receive it: key and value decoding may fail (the
/// bytes came from outside the process), so each carries its own result.
pub type FetchedUpdate<K, V, T, D> = ((Result<K, String>, Result<V, String>), T, D);

/// The updates of one fetched part, filtered and advanced for the reader
/// that leased it, in the part's order (by key, then value, then time).
#[derive(Debug)]
pub struct FetchedPart<K, V, T, D> {
    updates: std::vec::IntoIter<FetchedUpdate<K, V, T, D>>,
}

impl<K, V, T, D> Iterator for FetchedPart<K, V, T, D> {
    type Item = FetchedUpdate<K, V, T, D>;

    fn next(&mut self) -> Option<Self::Item> {
        self.updates.next()
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.updates.size_hint()
    }
}

/// Reads parts of one shard, such as parts another worker leased and sent
/// over; it holds no lease and no since of its own.
pub struct BatchFetcher<K: Codec, V: Codec, T, D> {
    pub(crate) reader: PartReader,
    pub(crate) key_schema: Arc<K::Schema>,
    pub(crate) val_schema: Arc<V::Schema>,
    pub(crate) _phantom: PhantomData<fn() -> (T, D)>,
}

impl<K: Codec, V: Codec, T, D> Debug for BatchFetcher<K, V, T, D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchFetcher")
            .field("shard_id", &self.reader.shard_id)
            .finish_non_exhaustive()
    }
}

impl<K, V, T, D> BatchFetcher<K, V, T, D>
where
    K: Codec,
    V: Codec,
    T: Timestamp + Lattice + Codec64,
    D: Semigroup + Codec64,
{
    /// Fetches `part` and returns its updates, filtered and advanced as the
    /// reader that leased it asked. The lease stays with the caller, who
    /// returns the part to its reader.
    ///
    /// Fails with `BatchNotFromThisShard` for a part of another shard, and
    /// with a shard error if the part is missing or corrupt.
    pub async fn fetch_leased_part(
        &self,
        part: &LeasedBatchPart<T>,
    ) -> Result<FetchedPart<K, V, T, D>, ClientError<T>> {
        self.reader
            .fetch(part, &self.key_schema, &self.val_schema)
            .await
    }
}

/// Fetches and decodes one shard's parts, retrying blob failures.
#[derive(Debug, Clone)]
pub(crate) struct PartReader {
    pub shard_id: ShardId,
    pub blob: Arc<dyn Blob>,
    pub cfg: DynamicConfig,
    pub codecs: Codecs,
}

impl PartReader {
    /// The part's bytes, checked to be a part of this shard's codecs.
    #[tracing::instrument(level = "debug", skip_all, fields(shard = %self.shard_id, key = %part.key))]
    pub async fn fetch_decoded(&self, part: &HollowPart) -> Result<DecodedPart, ShardError> {
        let bytes = self.fetch_bytes(&part.key).await?;
        self.decode(&part.key, bytes)
    }

    /// Runs `work`, CPU work on `bytes` bytes of part `key`: inline if
    /// that is small, else on a blocking thread, so that the caller's
    /// runtime keeps running its other tasks (heartbeats, other reads)
    /// meanwhile, whatever kind of runtime or `LocalSet` it is. A panic in
    /// `work` resumes here; work cancelled because the runtime is shutting
    /// down is an error. Dropped, started work still runs to its end.
    pub async fn off_runtime<R: Send + 'static>(
        &self,
        key: &str,
        bytes: u64,
        work: impl FnOnce() -> Result<R, ShardError> + Send + 'static,
    ) -> Result<R, ShardError> {
        if bytes < BLOCKING_WORK_MIN_BYTES {
            return work();
        }
        match tokio::task::spawn_blocking(work).await {
            Ok(done) => done,
            Err(err) => match err.try_into_panic() {
                Ok(panic) => std::panic::resume_unwind(panic),
                Err(_) => Err(self.part_error(
                    key,
                    "reading it was cancelled (the runtime is shutting down)".to_owned(),
                )),
            },
        }
    }

    /// [`Self::fetch_decoded`], decoding as [`Self::off_runtime`] runs work.
    pub async fn fetch_decoded_off_runtime(
        &self,
        part: &HollowPart,
    ) -> Result<DecodedPart, ShardError> {
        let bytes = self.fetch_bytes(&part.key).await?;
        let (reader, key) = (self.clone(), part.key.clone());
        let size = bytes.len() as u64;
        self.off_runtime(&part.key, size, move || reader.decode(&key, bytes))
            .await
    }

    /// Decodes `bytes`, read from `key`, checking the part's codecs.
    fn decode(&self, key: &str, bytes: Bytes) -> Result<DecodedPart, ShardError> {
        let decoded = decode_part(bytes).map_err(|e| self.part_error(key, e.to_string()))?;
        check_codecs(&decoded, &self.codecs).map_err(|e| self.part_error(key, e.to_string()))?;
        Ok(decoded)
    }

    /// The raw bytes at `key`, retrying external failures. A missing key is
    /// an error: state references it, so it must exist.
    pub async fn fetch_bytes(&self, key: &str) -> Result<Bytes, ShardError> {
        let mut backoff = Backoff::new(&self.cfg.get());
        loop {
            match self.blob.get(key).await {
                Ok(Some(bytes)) => return Ok(bytes),
                Ok(None) => return Err(self.part_error(key, "missing from blob".to_owned())),
                Err(err) => backoff.wait("fetch part", self.shard_id, &err).await,
            }
        }
    }

    fn part_error(&self, key: &str, reason: String) -> ShardError {
        ShardError::Part {
            shard: self.shard_id,
            key: key.to_owned(),
            reason,
        }
    }

    /// Fetches `part` and decodes the updates its filter keeps, off the
    /// caller's runtime if the part is large (see [`Self::off_runtime`]).
    pub async fn fetch<K, V, T, D>(
        &self,
        part: &LeasedBatchPart<T>,
        key_schema: &Arc<K::Schema>,
        val_schema: &Arc<V::Schema>,
    ) -> Result<FetchedPart<K, V, T, D>, ClientError<T>>
    where
        K: Codec,
        V: Codec,
        T: Timestamp + Lattice + Codec64,
        D: Semigroup + Codec64,
    {
        if part.shard_id != self.shard_id {
            return Err(InvalidUsage::BatchNotFromThisShard {
                batch_shard: part.shard_id,
                handle_shard: self.shard_id,
            }
            .into());
        }
        if !part.may_have_updates() {
            return Ok(FetchedPart {
                updates: Vec::new().into_iter(),
            });
        }
        let bytes = self.fetch_bytes(&part.part.key).await?;
        let size = bytes.len() as u64;
        let (reader, copy) = (self.clone(), part.unleased_copy());
        let (k, v) = (Arc::clone(key_schema), Arc::clone(val_schema));
        let read = move || {
            let decoded = reader.decode(&copy.part.key, bytes)?;
            let parts = (std::slice::from_ref(&copy), std::slice::from_ref(&decoded));
            Ok(consolidate_parts::<K, V, T, D>(parts.0, parts.1, &*k, &*v))
        };
        let updates = self.off_runtime(&part.part.key, size, read).await?;
        Ok(FetchedPart {
            updates: updates.into_iter(),
        })
    }
}

/// Reading at least this many part bytes runs on a blocking thread;
/// less takes less time (tens of microseconds) than handing it over would.
const BLOCKING_WORK_MIN_BYTES: u64 = 256 * 1024;

/// The updates of `parts` (decoded as `decoded`, in the same order) that
/// their filters keep, advanced as the filters say, consolidated across
/// the parts and decoded into `K` and `V`.
///
/// Each part is a sorted run, so they are merged, visiting each update
/// once, and only surviving keys and values are decoded. Large reads are
/// split into key ranges merged on several threads at once (the calling
/// thread among them; see [`merge_threads`]). A part that is not sorted
/// (not written by this code) is handled by sorting everything.
pub(crate) fn consolidate_parts<K, V, T, D>(
    parts: &[LeasedBatchPart<T>],
    decoded: &[DecodedPart],
    key_schema: &K::Schema,
    val_schema: &V::Schema,
) -> Vec<FetchedUpdate<K, V, T, D>>
where
    K: Codec,
    V: Codec,
    T: Timestamp + Lattice + Codec64,
    D: Semigroup + Codec64,
{
    let len = decoded.iter().map(DecodedPart::len).sum();
    let threads = merge_threads(len);
    consolidate_parts_on(parts, decoded, key_schema, val_schema, threads)
}

/// [`consolidate_parts`] on at most `threads` threads.
fn consolidate_parts_on<K, V, T, D>(
    parts: &[LeasedBatchPart<T>],
    decoded: &[DecodedPart],
    key_schema: &K::Schema,
    val_schema: &V::Schema,
    threads: usize,
) -> Vec<FetchedUpdate<K, V, T, D>>
where
    K: Codec,
    V: Codec,
    T: Timestamp + Lattice + Codec64,
    D: Semigroup + Codec64,
{
    let lens: Vec<usize> = decoded.iter().map(DecodedPart::len).collect();
    let len = lens.iter().sum();
    let pieces = split_runs(&lens, |r, i| decoded[r].get(i).0, threads);
    let uniform: Vec<Option<T>> = parts.iter().map(LeasedBatchPart::uniform_time).collect();
    let merge = |piece: &[Range<usize>], out: Vec<_>| {
        merge_piece(parts, decoded, piece, &uniform, key_schema, val_schema, out)
    };
    let merged = match pieces.as_slice() {
        [] => Ok(Vec::new()),
        [whole] => merge(whole, Vec::with_capacity(len)),
        [first, rest @ ..] => std::thread::scope(|scope| {
            // The first piece is merged here, into a vector with room for
            // everything, to which the others are then appended.
            let merge = &merge;
            let others: Vec<_> = rest
                .iter()
                .map(|piece| {
                    let spawned = std::thread::Builder::new()
                        .name("persist-merge".into())
                        .spawn_scoped(scope, move || merge(piece, Vec::new()));
                    // Without a thread, merge the piece here instead.
                    spawned.map_err(|_| piece)
                })
                .collect();
            let mut out = merge(first, Vec::with_capacity(len))?;
            for other in others {
                let merged = match other {
                    Ok(handle) => handle
                        .join()
                        .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
                    Err(piece) => merge(piece, Vec::new()),
                };
                out.extend(merged?);
            }
            Ok(out)
        }),
    };
    if let Ok(out) = merged {
        return out;
    }
    tracing::warn!("a part is not a sorted run; consolidating by sorting");
    let decode = |k: &[u8], v: &[u8]| decode_kv::<K, V>(k, v, key_schema, val_schema);
    let mut updates: Vec<BorrowedUpdate<'_, T, D>> = Vec::with_capacity(len);
    for (part, data) in parts.iter().zip(decoded) {
        for (k, v, t, d) in data.iter() {
            let mut t = T::decode(t);
            if part.keeps(&mut t) {
                updates.push(((k, v), t, D::decode(d)));
            }
        }
    }
    crate::read::consolidate_runs(&mut updates);
    updates
        .into_iter()
        .map(|((k, v), t, d)| (decode(k, v), t, d))
        .collect()
}

/// Decodes a key and a value, each into its own result (one undecodable
/// half does not hide the other).
fn decode_kv<K: Codec, V: Codec>(
    k: &[u8],
    v: &[u8],
    key_schema: &K::Schema,
    val_schema: &V::Schema,
) -> (Result<K, String>, Result<V, String>) {
    (
        K::decode(k, key_schema).map_err(|e| e.to_string()),
        V::decode(v, val_schema).map_err(|e| e.to_string()),
    )
}

/// Reads with fewer updates than this per thread are merged on one thread:
/// below it, starting a thread costs about as much as it saves.
const MIN_UPDATES_PER_MERGE_THREAD: usize = 1 << 16;

/// Merging never uses more threads than this, however many cores there are.
const MAX_MERGE_THREADS: usize = 8;

/// How many threads merge a read of `len` updates: one per
/// [`MIN_UPDATES_PER_MERGE_THREAD`] updates, at most one per core and at
/// most [`MAX_MERGE_THREADS`].
pub(crate) fn merge_threads(len: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (len / MIN_UPDATES_PER_MERGE_THREAD).clamp(1, cores.min(MAX_MERGE_THREADS))
}

/// Merges one key range of the parts (`piece[r]` the range of part `r`)
/// onto the end of `out`: the `consolidate_parts` of that range. Fails if
/// a part is not sorted there.
fn merge_piece<K, V, T, D>(
    parts: &[LeasedBatchPart<T>],
    decoded: &[DecodedPart],
    piece: &[Range<usize>],
    uniform: &[Option<T>],
    key_schema: &K::Schema,
    val_schema: &V::Schema,
    mut out: Vec<FetchedUpdate<K, V, T, D>>,
) -> Result<Vec<FetchedUpdate<K, V, T, D>>, Unsorted>
where
    K: Codec,
    V: Codec,
    T: Timestamp + Lattice + Codec64,
    D: Semigroup + Codec64,
{
    let decode = |k: &[u8], v: &[u8]| decode_kv::<K, V>(k, v, key_schema, val_schema);
    out.reserve(piece.iter().map(ExactSizeIterator::len).sum());
    let mut times: Vec<(T, D)> = Vec::new();
    // The time an update of part `run` stored at `t` is read at, if kept.
    let kept = |run: usize, t: [u8; 8]| match &uniform[run] {
        Some(t) => Some(t.clone()),
        None => {
            let mut t = T::decode(t);
            parts[run].keeps(&mut t).then_some(t)
        }
    };
    merge_sorted_runs(
        piece,
        |run, i| decoded[run].get(i),
        |k, v, rows| {
            // Most keys have one update: no times to consolidate.
            if let [(run, t, d)] = rows {
                let d = D::decode(*d);
                if let Some(t) = kept(*run, *t).filter(|_| !d.is_zero()) {
                    out.push((decode(k, v), t, d));
                }
                return;
            }
            times.clear();
            times.extend(
                rows.iter()
                    .filter_map(|(run, t, d)| Some((kept(*run, *t)?, D::decode(*d)))),
            );
            consolidate_times(&mut times);
            out.extend(times.drain(..).map(|(t, d)| (decode(k, v), t, d)));
        },
    )?;
    Ok(out)
}

/// An update with its key and value still encoded, borrowed from a
/// decoded part.
pub(crate) type BorrowedUpdate<'a, T, D> = ((&'a [u8], &'a [u8]), T, D);

/// Whether an update stored at `t` belongs to the batch `desc` describes.
///
/// Only the lower is checked. A batch's parts may hold updates before its
/// lower (an `append` moves a batch's lower forward, and a listener reads
/// the rest of a batch it is inside of), but never at or beyond its upper:
/// writers check every update against the upper. Compaction advances times
/// to the since, which may be beyond the upper; such times must be kept.
fn in_description<T: Timestamp>(t: &T, desc: &Description<T>) -> bool {
    desc.lower().less_equal(t)
}

#[cfg(test)]
mod tests {
    use differential_dataflow::consolidation::consolidate_updates;
    use persist::part::{PartCodecs, encode_part};
    use persist_types::SimpleSchema;
    use proptest::prelude::*;

    use super::*;

    type Owned = ((Vec<u8>, Vec<u8>), u64, i64);

    /// A snapshot part at `as_of` of a batch `[0, 100)` holding `run`
    /// (whose time bounds it records), and the run decoded.
    fn snapshot_part(run: &[Owned], as_of: u64) -> (LeasedBatchPart<u64>, DecodedPart) {
        let codecs = PartCodecs {
            key: "bytes".into(),
            val: "bytes".into(),
            ts: "u64".into(),
            diff: "i64".into(),
        };
        let rows = run
            .iter()
            .map(|((k, v), t, d)| (&k[..], &v[..], t.to_le_bytes(), d.to_le_bytes()));
        let encoded = encode_part(&codecs, false, rows).unwrap();
        let times = run.iter().map(|(_, t, _)| *t);
        let part = LeasedBatchPart {
            shard_id: ShardId::new(),
            reader_id: None,
            leased_seqno: None,
            desc: Description::new(
                Antichain::from_elem(0),
                Antichain::from_elem(100),
                Antichain::from_elem(0),
            ),
            part: HollowPart {
                key: "k".into(),
                len: run.len() as u64,
                encoded_size_bytes: encoded.bytes.len() as u64,
                key_lower: vec![],
                key_upper: None,
                ts_lower: Codec64::encode(&times.clone().min().unwrap_or(0)),
                ts_upper: Codec64::encode(&times.max().unwrap_or(0)),
            },
            filter: FetchFilter::Snapshot {
                as_of: Antichain::from_elem(as_of),
            },
        };
        (part, decode_part(encoded.bytes).unwrap())
    }

    fn sorted_run() -> impl Strategy<Value = Vec<Owned>> {
        prop::collection::vec(
            (
                (
                    prop::collection::vec(0u8..6, 0..3),
                    prop::collection::vec(0u8..2, 0..2),
                ),
                0u64..8,
                -2i64..3,
            ),
            0..40,
        )
        .prop_map(|mut run| {
            run.sort();
            run
        })
    }

    proptest! {
        /// However many threads merge, a read returns the parts' updates
        /// at or before the as_of, advanced to it and consolidated, in order.
        #[test]
        fn consolidating_on_any_number_of_threads_agrees_with_the_model(
            runs in prop::collection::vec(sorted_run(), 0..6),
            as_of in 0u64..8,
            threads in 1usize..5,
        ) {
            let (parts, decoded): (Vec<_>, Vec<_>) =
                runs.iter().map(|run| snapshot_part(run, as_of)).unzip();
            let schema = SimpleSchema::<Vec<u8>>::new();
            let got: Vec<FetchedUpdate<Vec<u8>, Vec<u8>, u64, i64>> =
                consolidate_parts_on(&parts, &decoded, &schema, &schema, threads);
            let mut expected: Vec<Owned> = runs
                .iter()
                .flatten()
                .filter(|(_, t, _)| *t <= as_of)
                .map(|(data, _, d)| (data.clone(), as_of, *d))
                .collect();
            consolidate_updates(&mut expected);
            let got: Vec<Owned> = got
                .into_iter()
                .map(|((k, v), t, d)| ((k.unwrap(), v.unwrap()), t, d))
                .collect();
            prop_assert_eq!(got, expected);
        }
    }

    #[test]
    fn large_reads_merge_on_several_threads() {
        assert_eq!(merge_threads(0), 1);
        assert_eq!(merge_threads(MIN_UPDATES_PER_MERGE_THREAD - 1), 1);
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(merge_threads(usize::MAX), cores.min(MAX_MERGE_THREADS));
    }

    proptest::proptest! {
        /// When a part reads as one uniform time, every one of its times
        /// passes the filter and advances to exactly that time.
        #[test]
        fn uniform_times_agree_with_the_per_update_filter(
            times in proptest::collection::vec(0u64..20, 1..8),
            (lower, upper, as_of) in (0u64..20, 0u64..25, 0u64..25),
        ) {
            let (min, max) = (*times.iter().min().unwrap(), *times.iter().max().unwrap());
            let part = LeasedBatchPart {
                shard_id: ShardId::new(),
                reader_id: None,
                leased_seqno: None,
                desc: Description::new(
                    Antichain::from_elem(lower),
                    Antichain::from_elem(upper.max(lower)),
                    Antichain::from_elem(0),
                ),
                part: HollowPart {
                    key: "k".into(),
                    len: times.len() as u64,
                    encoded_size_bytes: 0,
                    key_lower: vec![],
                    key_upper: None,
                    ts_lower: Codec64::encode(&min),
                    ts_upper: Codec64::encode(&max),
                },
                filter: FetchFilter::Snapshot { as_of: Antichain::from_elem(as_of) },
            };
            if let Some(uniform) = part.uniform_time() {
                for t in &times {
                    let mut t = *t;
                    proptest::prop_assert!(part.keeps(&mut t));
                    proptest::prop_assert_eq!(t, uniform);
                }
            }
        }
    }

    #[test]
    fn snapshot_and_listen_filters_split_every_time_exactly_once() {
        use timely::order::Product;
        type P = Product<u64, u64>;
        let as_of = Antichain::from_iter([Product::new(2, 0), Product::new(0, 2)]);
        let snapshot = FetchFilter::Snapshot {
            as_of: as_of.clone(),
        };
        let listen = FetchFilter::Listen {
            as_of: as_of.clone(),
        };
        for a in 0..4 {
            for b in 0..4 {
                let t: P = Product::new(a, b);
                let (mut s, mut l) = (t, t);
                let kept = [snapshot.keep(&mut s), listen.keep(&mut l)];
                assert_eq!(kept.iter().filter(|k| **k).count(), 1, "{t:?}");
                assert_eq!(l, t, "listens do not advance times");
                // Advancing keeps how the time compares to every time at or
                // beyond the as_of.
                for u in (0..6).flat_map(|a| (0..6).map(move |b| Product::new(a, b))) {
                    if kept[0] && as_of.less_equal(&u) {
                        assert_eq!(
                            s.less_equal(&u),
                            t.less_equal(&u),
                            "{t:?} -> {s:?} vs {u:?}"
                        );
                    }
                }
                // Part-level pruning never drops a time the filter keeps.
                assert!(!kept[0] || snapshot.may_keep_part(&t, &t));
                assert!(!kept[1] || listen.may_keep_part(&t, &t));
            }
        }
    }
}
