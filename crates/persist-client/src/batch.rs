//! Batches: updates written to blob as parts, not yet (or not necessarily)
//! appended to a shard.

use std::fmt::Debug;
use std::marker::PhantomData;
use std::sync::Arc;

use differential_dataflow::difference::Semigroup;
use differential_dataflow::lattice::Lattice;
use persist::Blob;
use persist_types::{Codec, Codec64, ShardId};
use serde::{Deserialize, Serialize};
use timely::PartialOrder;
use timely::progress::{Antichain, Timestamp};
use uuid::Uuid;

use crate::Marker;
use crate::cfg::DynamicConfig;
use crate::error::{ClientError, Codecs, InvalidUsage, ShardError};
use crate::fetch::BorrowedUpdate;
use crate::ids::WriterId;
use crate::internal::machine::{Backoff, Machine};
use crate::internal::part::part_codecs;
use crate::internal::state::HollowPart;
use crate::read::consolidate_runs;

/// Updates of one shard in `[lower, upper)`, written to blob as parts.
///
/// A batch is consumed once: appended by
/// [`WriteHandle::append_batch`](crate::WriteHandle::append_batch) or
/// [`compare_and_append_batch`](crate::WriteHandle::compare_and_append_batch),
/// turned into its [transmittable](Batch::into_transmittable_batch) form, or
/// [deleted](Batch::delete). A batch dropped otherwise leaks its parts
/// (logged), since only its owner knows they are unreferenced.
#[must_use = "a batch must be appended, transmitted or deleted"]
pub struct Batch<K, V, T, D> {
    pub(crate) shard_id: ShardId,
    pub(crate) lower: Antichain<T>,
    pub(crate) upper: Antichain<T>,
    pub(crate) parts: Vec<HollowPart>,
    pub(crate) len: u64,
    pub(crate) blob: Arc<dyn Blob>,
    pub(crate) machine: Machine<T>,
    /// Whether the parts are accounted for (appended, transmitted, deleted).
    pub(crate) consumed: bool,
    pub(crate) _phantom: Marker<(K, V, D)>,
}

impl<K, V, T: Debug, D> Debug for Batch<K, V, T, D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batch")
            .field("shard_id", &self.shard_id)
            .field("lower", &self.lower)
            .field("upper", &self.upper)
            .field("parts", &self.parts.len())
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

impl<K, V, T, D> Batch<K, V, T, D>
where
    T: Timestamp + Lattice + Codec64 + Sync,
{
    /// The shard the batch belongs to.
    pub fn shard_id(&self) -> ShardId {
        self.shard_id
    }

    /// The batch's lower bound: every update is at or beyond it.
    pub fn lower(&self) -> &Antichain<T> {
        &self.lower
    }

    /// The batch's upper bound: no update is at or beyond it.
    pub fn upper(&self) -> &Antichain<T> {
        &self.upper
    }

    /// The number of updates in the batch (after consolidation within each
    /// part).
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the batch holds no updates.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The blob keys of the batch's parts.
    pub fn part_keys(&self) -> Vec<String> {
        self.parts.iter().map(|p| p.key.clone()).collect()
    }

    /// Deletes the batch's parts from blob. Parts that the shard's latest
    /// state references (another copy of this batch was appended) are kept.
    ///
    /// Call it only on a batch no one else may still append: the check
    /// above cannot see an append racing with the delete.
    pub async fn delete(mut self) {
        self.consumed = true;
        let referenced = match self.machine.fetch_latest().await {
            Ok(state) => state.part_keys(),
            Err(err) => {
                tracing::warn!(shard = %self.shard_id, %err, "not deleting batch: state unreadable");
                return;
            }
        };
        let cfg = self.machine.cfg();
        for part in self.parts.iter().filter(|p| !referenced.contains(&p.key)) {
            let mut backoff = Backoff::new(&cfg);
            loop {
                match self.blob.delete(&part.key).await {
                    Ok(_) => break,
                    Err(err) => backoff.wait("delete part", self.shard_id, &err).await,
                }
            }
        }
    }

    /// The batch in a serializable form, to move it to another process
    /// (which turns it back with
    /// [`WriteHandle::batch_from_transmittable_batch`](crate::WriteHandle::batch_from_transmittable_batch)).
    /// Responsibility for the parts moves with it.
    pub fn into_transmittable_batch(mut self) -> TransmittableBatch {
        self.consumed = true;
        TransmittableBatch {
            shard_id: self.shard_id,
            lower: self.lower.elements().iter().map(Codec64::encode).collect(),
            upper: self.upper.elements().iter().map(Codec64::encode).collect(),
            parts: self
                .parts
                .iter()
                .map(|p| TransmittablePart {
                    key: p.key.clone(),
                    len: p.len,
                    encoded_size_bytes: p.encoded_size_bytes,
                    key_lower: p.key_lower.clone(),
                    key_upper: p.key_upper.clone(),
                    ts_lower: p.ts_lower,
                    ts_upper: p.ts_upper,
                })
                .collect(),
            len: self.len,
        }
    }
}

impl<K, V, T, D> Drop for Batch<K, V, T, D> {
    fn drop(&mut self) {
        if !self.consumed && !self.parts.is_empty() {
            tracing::warn!(
                shard = %self.shard_id,
                parts = self.parts.len(),
                "batch dropped without being appended or deleted: its parts leak"
            );
        }
    }
}

/// A [`Batch`] in serializable form. Times are in their `Codec64` bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransmittableBatch {
    pub(crate) shard_id: ShardId,
    pub(crate) lower: Vec<[u8; 8]>,
    pub(crate) upper: Vec<[u8; 8]>,
    pub(crate) parts: Vec<TransmittablePart>,
    pub(crate) len: u64,
}

impl TransmittableBatch {
    /// The shard the batch belongs to.
    pub fn shard_id(&self) -> ShardId {
        self.shard_id
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct TransmittablePart {
    key: String,
    len: u64,
    encoded_size_bytes: u64,
    key_lower: Vec<u8>,
    key_upper: Option<Vec<u8>>,
    ts_lower: [u8; 8],
    ts_upper: [u8; 8],
}

impl TransmittablePart {
    pub(crate) fn into_hollow(self) -> HollowPart {
        HollowPart {
            key: self.key,
            len: self.len,
            encoded_size_bytes: self.encoded_size_bytes,
            key_lower: self.key_lower,
            key_upper: self.key_upper,
            ts_lower: self.ts_lower,
            ts_upper: self.ts_upper,
        }
    }
}

/// What [`BatchBuilder::add`] did with an update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Added {
    /// The update was buffered in memory.
    Record,
    /// The update was buffered and a full part was written to blob.
    RecordAndParts,
}

/// Builds a [`Batch`] from updates added one at a time, writing a part to
/// blob whenever the buffered updates reach the target part size, so memory
/// stays bounded however large the batch.
pub struct BatchBuilder<K: Codec, V: Codec, T, D> {
    pub(crate) writer: PartWriter<T>,
    pub(crate) lower: Antichain<T>,
    /// The buffered updates, encoded, reused from part to part.
    pub(crate) buffer: UpdateArena<T, D>,
    /// The allocation the last part was encoded into, for the next one.
    pub(crate) output: Vec<u8>,
    /// The part size to aim for, read once when the builder is made.
    pub(crate) target_size: usize,
    /// The maximal times added so far: an update is at or beyond an upper
    /// iff one of these is. (The join of a part's times is not enough: with
    /// partially ordered times it can be beyond an upper none of them is.)
    pub(crate) maxima: Vec<T>,
    pub(crate) parts: Vec<HollowPart>,
    pub(crate) len: u64,
    pub(crate) _phantom: PhantomData<fn() -> (K, V)>,
}

impl<K: Codec, V: Codec, T: Debug, D> Debug for BatchBuilder<K, V, T, D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchBuilder")
            .field("shard_id", &self.writer.shard_id)
            .field("lower", &self.lower)
            .field("parts", &self.parts.len())
            .finish_non_exhaustive()
    }
}

/// A per-update overhead added to the encoded key and value sizes when
/// deciding that a part is full.
const UPDATE_OVERHEAD_BYTES: usize = 16;

impl<K, V, T, D> BatchBuilder<K, V, T, D>
where
    K: Codec,
    V: Codec,
    T: Timestamp + Lattice + Codec64 + Sync,
    D: Semigroup + Codec64,
{
    pub(crate) fn new(writer: PartWriter<T>, lower: Antichain<T>) -> Self {
        BatchBuilder::with_buffers(writer, lower, BuilderBuffers::default())
    }

    /// A builder that fills `buffers` (left over by an earlier builder).
    pub(crate) fn with_buffers(
        writer: PartWriter<T>,
        lower: Antichain<T>,
        buffers: BuilderBuffers<T, D>,
    ) -> Self {
        let target_size = writer.cfg.get().blob_target_size.max(1);
        let BuilderBuffers { mut buffer, output } = buffers;
        buffer.clear();
        BatchBuilder {
            writer,
            lower,
            buffer,
            output,
            target_size,
            maxima: Vec::new(),
            parts: Vec::new(),
            len: 0,
            _phantom: PhantomData,
        }
    }

    /// Adds one update. Fails with `UpdateNotBeyondLower` if `ts` is not at
    /// or beyond the builder's lower (the update is not added). May write a
    /// part to blob (retrying external failures) or fail with a shard error.
    pub async fn add(
        &mut self,
        key: &K,
        val: &V,
        ts: &T,
        diff: &D,
    ) -> Result<Added, ClientError<T>> {
        if !self.lower.less_equal(ts) {
            return Err(InvalidUsage::UpdateNotBeyondLower {
                ts: ts.clone(),
                lower: self.lower.clone(),
            }
            .into());
        }
        if !self.maxima.iter().any(|m| ts.less_equal(m)) {
            self.maxima.retain(|m| !m.less_equal(ts));
            self.maxima.push(ts.clone());
        }
        self.buffer.push_with(
            |buf| key.encode(buf),
            |buf| val.encode(buf),
            ts.clone(),
            diff.clone(),
        );
        if self.buffer.size() >= self.target_size {
            self.flush().await?;
            return Ok(Added::RecordAndParts);
        }
        Ok(Added::Record)
    }

    /// Consolidates the buffered updates and writes them as one part.
    async fn flush(&mut self) -> Result<(), ShardError> {
        let mut updates = self.buffer.borrowed();
        consolidate_runs(&mut updates);
        let written = self.writer.write_part(&updates, &mut self.output).await;
        drop(updates);
        self.buffer.clear();
        if let Some(part) = written? {
            self.len += part.len;
            self.parts.push(part);
        }
        Ok(())
    }

    /// Writes what is buffered and returns the batch `[lower, upper)`.
    ///
    /// Fails with `InvalidBounds` unless `lower <= upper`, and with
    /// `UpdateBeyondUpper` if an added update is at or beyond `upper`; the
    /// parts written so far are deleted then.
    pub async fn finish(
        mut self,
        upper: Antichain<T>,
    ) -> Result<Batch<K, V, T, D>, ClientError<T>> {
        self.finish_in_place(upper).await
    }

    /// [`BatchBuilder::finish`], leaving the builder's buffers to
    /// [`BatchBuilder::into_buffers`]. The builder must not be used
    /// otherwise afterwards.
    pub(crate) async fn finish_in_place(
        &mut self,
        upper: Antichain<T>,
    ) -> Result<Batch<K, V, T, D>, ClientError<T>> {
        if !PartialOrder::less_equal(&self.lower, &upper) {
            self.writer.delete_parts(&self.parts).await;
            return Err(InvalidUsage::InvalidBounds {
                lower: self.lower.clone(),
                upper,
            }
            .into());
        }
        let beyond = self.maxima.iter().find(|t| upper.less_equal(t)).cloned();
        if let Some(ts) = beyond {
            self.writer.delete_parts(&self.parts).await;
            return Err(InvalidUsage::UpdateBeyondUpper {
                ts,
                expected_upper: upper,
            }
            .into());
        }
        self.flush().await?;
        Ok(Batch {
            shard_id: self.writer.shard_id,
            lower: self.lower.clone(),
            upper,
            parts: std::mem::take(&mut self.parts),
            len: self.len,
            blob: Arc::clone(&self.writer.blob),
            machine: self.writer.machine.clone(),
            consumed: false,
            _phantom: PhantomData,
        })
    }
}

impl<K: Codec, V: Codec, T, D> BatchBuilder<K, V, T, D> {
    /// The builder's buffers, emptied, for a later builder to reuse; `None`
    /// once they outgrew twice the target part size (a huge update), so
    /// that one outlier does not stay allocated.
    pub(crate) fn into_buffers(mut self) -> Option<BuilderBuffers<T, D>> {
        let limit = self.target_size.saturating_mul(2);
        if self.buffer.bytes.capacity() > limit || self.output.capacity() > limit {
            return None;
        }
        self.buffer.clear();
        Some(BuilderBuffers {
            buffer: std::mem::take(&mut self.buffer),
            output: std::mem::take(&mut self.output),
        })
    }
}

/// The buffers a [`BatchBuilder`] fills. A [`WriteHandle`](crate::WriteHandle)
/// keeps them between batches, so that a steady stream of appends reuses
/// memory that is already allocated (and faulted in) instead of growing
/// fresh buffers for every batch. Each is bounded by the target part size.
pub(crate) struct BuilderBuffers<T, D> {
    pub(crate) buffer: UpdateArena<T, D>,
    pub(crate) output: Vec<u8>,
}

impl<T, D> Default for BuilderBuffers<T, D> {
    fn default() -> Self {
        BuilderBuffers {
            buffer: UpdateArena::default(),
            output: Vec::new(),
        }
    }
}

/// Updates buffered for a part, their keys and values encoded back to back
/// in one allocation (reused once cleared) rather than in two `Vec`s each.
pub(crate) struct UpdateArena<T, D> {
    /// The encoded keys and values.
    pub(crate) bytes: Vec<u8>,
    /// Per update: where its key ends (and its value starts) and where its
    /// value ends in `bytes`, its time and its diff.
    index: Vec<(usize, usize, T, D)>,
}

impl<T, D> Default for UpdateArena<T, D> {
    fn default() -> Self {
        UpdateArena {
            bytes: Vec::new(),
            index: Vec::new(),
        }
    }
}

impl<T, D> UpdateArena<T, D> {
    /// Forgets the buffered updates, keeping the allocations.
    pub(crate) fn clear(&mut self) {
        self.bytes.clear();
        self.index.clear();
    }
}

impl<T: Clone, D: Clone> UpdateArena<T, D> {
    /// Buffers an update whose key and value `encode_key` and `encode_val`
    /// append to the buffer they are given.
    pub(crate) fn push_with(
        &mut self,
        encode_key: impl FnOnce(&mut Vec<u8>),
        encode_val: impl FnOnce(&mut Vec<u8>),
        t: T,
        d: D,
    ) {
        encode_key(&mut self.bytes);
        let key_end = self.bytes.len();
        encode_val(&mut self.bytes);
        self.index.push((key_end, self.bytes.len(), t, d));
    }

    /// Buffers an update whose key and value are already encoded.
    pub(crate) fn push(&mut self, key: &[u8], val: &[u8], t: T, d: D) {
        self.push_with(
            |b| b.extend_from_slice(key),
            |b| b.extend_from_slice(val),
            t,
            d,
        );
    }

    /// The bytes the buffered updates count for when deciding that a part
    /// is full: their keys and values, plus a fixed overhead each.
    pub(crate) fn size(&self) -> usize {
        self.bytes.len() + self.index.len() * UPDATE_OVERHEAD_BYTES
    }

    /// The buffered updates, in the order they were pushed, borrowing their
    /// keys and values.
    pub(crate) fn borrowed(&self) -> Vec<BorrowedUpdate<'_, T, D>> {
        let mut start = 0;
        self.index
            .iter()
            .map(|(key_end, val_end, t, d)| {
                let kv = (
                    &self.bytes[start..*key_end],
                    &self.bytes[*key_end..*val_end],
                );
                start = *val_end;
                (kv, t.clone(), d.clone())
            })
            .collect()
    }
}

/// Writes parts of one shard to blob under the writer's prefix.
#[derive(Debug, Clone)]
pub(crate) struct PartWriter<T> {
    pub shard_id: ShardId,
    pub writer_id: WriterId,
    pub blob: Arc<dyn Blob>,
    pub machine: Machine<T>,
    pub cfg: DynamicConfig,
    pub codecs: Codecs,
}

impl<T: Timestamp + Lattice + Codec64 + Sync> PartWriter<T> {
    /// Encodes consolidated `updates` as one part and writes it to a fresh
    /// key, retrying external failures. Returns `None` for no updates.
    #[tracing::instrument(level = "debug", skip_all, fields(shard = %self.shard_id, updates = updates.len()))]
    ///
    /// The part is encoded into `scratch`'s allocation, which is handed back
    /// in `scratch` once the part is stored if the blob kept no reference to
    /// it (so a stream of parts reuses one buffer).
    pub async fn write_part<D: Semigroup + Codec64>(
        &self,
        updates: &[BorrowedUpdate<'_, T, D>],
        scratch: &mut Vec<u8>,
    ) -> Result<Option<HollowPart>, ShardError> {
        let Some((_, first, _)) = updates.first() else {
            return Ok(None);
        };
        let mut ts_lower = first.clone();
        let mut ts_upper = first.clone();
        for (_, t, _) in updates {
            ts_lower = ts_lower.meet(t);
            ts_upper = ts_upper.join(t);
        }
        // Encoded straight from the caller's (arena-backed) slices.
        let encoded = persist::part::encode_part_into(
            std::mem::take(scratch),
            &part_codecs(&self.codecs),
            self.cfg.get().part_compression,
            updates
                .iter()
                .map(|((k, v), t, d)| (*k, *v, t.encode(), d.encode())),
        )
        .map_err(|e| ShardError::Part {
            shard: self.shard_id,
            key: String::new(),
            reason: format!("encode part: {e}"),
        })?;
        let key = format!("{}/{}/p{}", self.shard_id, self.writer_id, Uuid::new_v4());
        let mut backoff = Backoff::new(&self.cfg.get());
        loop {
            match self.blob.set(&key, encoded.bytes.clone()).await {
                Ok(()) => break,
                // Setting the same bytes again is harmless, whatever the
                // failed attempt did.
                Err(err) => backoff.wait("write part", self.shard_id, &err).await,
            }
        }
        let stats = encoded.stats;
        if let Ok(unique) = encoded.bytes.try_into_mut() {
            *scratch = Vec::from(unique);
        }
        Ok(Some(HollowPart {
            key,
            len: stats.len,
            encoded_size_bytes: stats.encoded_size_bytes,
            key_lower: stats.key_lower,
            key_upper: stats.key_upper,
            ts_lower: ts_lower.encode(),
            ts_upper: ts_upper.encode(),
        }))
    }

    /// Deletes parts this writer wrote and no state references, retrying
    /// a few failures of each delete (deletes are idempotent). Best effort:
    /// a part still failing after that is left behind (logged), to be
    /// removed with the shard when it is finalized.
    pub async fn delete_parts(&self, parts: &[HollowPart]) {
        const ATTEMPTS: usize = 6;
        for part in parts {
            let mut backoff = Backoff::new(&self.cfg.get());
            for attempt in 1..=ATTEMPTS {
                match self.blob.delete(&part.key).await {
                    Ok(_) => break,
                    Err(err) if attempt == ATTEMPTS => {
                        tracing::warn!(shard = %self.shard_id, key = %part.key, %err, "could not delete part; leaving it");
                    }
                    Err(err) => backoff.wait("delete part", self.shard_id, &err).await,
                }
            }
        }
    }
}
