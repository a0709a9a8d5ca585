//! Writing to a shard.

use std::borrow::Borrow;
use std::fmt::Debug;
use std::marker::PhantomData;
use std::sync::Arc;

use differential_dataflow::difference::Semigroup;
use differential_dataflow::lattice::Lattice;
use differential_dataflow::trace::Description;
use persist::Blob;
use persist_types::{Codec, Codec64, ShardId};
use timely::PartialOrder;
use timely::progress::{Antichain, Timestamp};

use crate::batch::{Batch, BatchBuilder, BuilderBuffers, PartWriter, TransmittableBatch};
use crate::error::{ClientError, InvalidUsage, UpperMismatch};
use crate::fetch::PartReader;
use crate::ids::{IdempotencyToken, WriterId};
use crate::internal::compact::{self, CompactionStats};
use crate::internal::heartbeat::{self, ExpireOnDrop, HeartbeatTask, Holder};
use crate::internal::machine::{Machine, Transition};
use crate::internal::maintenance;
use crate::internal::state::{CompareAndAppendBreak, HollowBatch};

/// Appends to one shard.
///
/// Every append is fenced by the shard's upper: it lands only if the shard
/// is complete exactly up to the append's lower, so several writers (say,
/// replicas computing the same data) can race safely and exactly one wins
/// each interval of time. Appends are idempotent: a retry after a failure
/// whose outcome was unknown never applies a batch twice.
///
/// The handle keeps its lease alive in a background task; `expire` (or,
/// best effort, dropping the handle) releases it.
pub struct WriteHandle<K: Codec, V: Codec, T, D> {
    pub(crate) machine: Machine<T>,
    pub(crate) blob: Arc<dyn Blob>,
    pub(crate) writer_id: WriterId,
    pub(crate) key_schema: Arc<K::Schema>,
    pub(crate) val_schema: Arc<V::Schema>,
    pub(crate) upper: Antichain<T>,
    pub(crate) heartbeat: Option<HeartbeatTask>,
    pub(crate) expired: bool,
    pub(crate) expire_on_drop: Option<ExpireOnDrop>,
    /// The buffers of the last batch built by [`WriteHandle::batch`], for
    /// the next one.
    pub(crate) spare_buffers: BuilderBuffers<T, D>,
    pub(crate) _phantom: PhantomData<fn() -> D>,
}

impl<K: Codec, V: Codec, T: Debug, D> Debug for WriteHandle<K, V, T, D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteHandle")
            .field("shard_id", &self.machine.shard_id())
            .field("writer_id", &self.writer_id)
            .field("upper", &self.upper)
            .finish_non_exhaustive()
    }
}

impl<K, V, T, D> WriteHandle<K, V, T, D>
where
    K: Codec,
    V: Codec,
    T: Timestamp + Lattice + Codec64 + Sync,
    D: Semigroup + Codec64 + Send + Sync + 'static,
{
    /// The shard this handle writes.
    pub fn shard_id(&self) -> ShardId {
        self.machine.shard_id()
    }

    /// This writer's id.
    pub fn writer_id(&self) -> WriterId {
        self.writer_id
    }

    /// The key schema the handle decodes keys with.
    pub fn key_schema(&self) -> &Arc<K::Schema> {
        &self.key_schema
    }

    /// The value schema the handle decodes values with.
    pub fn val_schema(&self) -> &Arc<V::Schema> {
        &self.val_schema
    }

    /// The shard's upper as of this handle's last append or fetch: possibly
    /// behind the real one (other writers), never ahead of it.
    pub fn upper(&self) -> &Antichain<T> {
        &self.upper
    }

    /// The shard's upper as of the newest state this process has seen
    /// through any handle (no I/O): at or beyond [`WriteHandle::upper`].
    pub fn shared_upper(&self) -> Antichain<T> {
        self.machine.cached().upper.clone()
    }

    /// Reads the shard's current upper from consensus, caches it as this
    /// handle's upper, and returns it.
    pub async fn fetch_recent_upper(&mut self) -> Result<&Antichain<T>, ClientError<T>> {
        let state = self.machine.fetch_latest().await?;
        self.upper.clone_from(&state.upper);
        Ok(&self.upper)
    }

    /// Waits until the shard's upper is strictly beyond `frontier`
    /// (`frontier < upper` in the antichain order), then caches it.
    /// Cancel-safe.
    pub async fn wait_for_upper_past(
        &mut self,
        frontier: &Antichain<T>,
    ) -> Result<(), ClientError<T>> {
        let mut state = self.machine.cached();
        loop {
            if PartialOrder::less_than(frontier, &state.upper) {
                self.upper.clone_from(&state.upper);
                return Ok(());
            }
            state = self.machine.wait_for_newer(state.seqno).await?;
        }
    }

    /// Writes `updates` as a batch `[lower, upper)` and appends it.
    ///
    /// Permissive about overlap: if the shard's upper is already past
    /// `lower` but not past `upper`, only the updates at or beyond the
    /// shard's upper are appended (the rest are already covered); if it is
    /// at or past `upper`, nothing is appended and the call succeeds. Fails
    /// with [`UpperMismatch`] only if the shard's upper is not yet at
    /// `lower` (appends must be contiguous).
    ///
    /// Usage errors: `InvalidBounds` (`lower` not `<= upper`),
    /// `UpdateNotBeyondLower`, `UpdateBeyondUpper`.
    pub async fn append<SB, I>(
        &mut self,
        updates: I,
        lower: Antichain<T>,
        upper: Antichain<T>,
    ) -> Result<Result<(), UpperMismatch<T>>, ClientError<T>>
    where
        SB: Borrow<((K, V), T, D)>,
        I: IntoIterator<Item = SB>,
    {
        let batch = self.batch(updates, lower.clone(), upper.clone()).await?;
        self.append_batch(batch, lower, upper).await
    }

    /// Writes `updates` as a batch `[expected_upper, new_upper)` and appends
    /// it if the shard's upper is exactly `expected_upper`. On a mismatch
    /// the batch's parts are deleted, the handle's upper becomes the shard's
    /// and [`UpperMismatch`] names both.
    pub async fn compare_and_append<SB, I>(
        &mut self,
        updates: I,
        expected_upper: Antichain<T>,
        new_upper: Antichain<T>,
    ) -> Result<Result<(), UpperMismatch<T>>, ClientError<T>>
    where
        SB: Borrow<((K, V), T, D)>,
        I: IntoIterator<Item = SB>,
    {
        let mut batch = self
            .batch(updates, expected_upper.clone(), new_upper.clone())
            .await?;
        let result = self
            .compare_and_append_batch(&mut [&mut batch], expected_upper, new_upper)
            .await;
        match result {
            Ok(Ok(())) => Ok(Ok(())),
            other => {
                batch.delete().await;
                other
            }
        }
    }

    /// Writes `updates` to blob as a batch `[lower, upper)` without
    /// appending it.
    pub async fn batch<SB, I>(
        &mut self,
        updates: I,
        lower: Antichain<T>,
        upper: Antichain<T>,
    ) -> Result<Batch<K, V, T, D>, ClientError<T>>
    where
        SB: Borrow<((K, V), T, D)>,
        I: IntoIterator<Item = SB>,
    {
        if !PartialOrder::less_equal(&lower, &upper) {
            return Err(InvalidUsage::InvalidBounds { lower, upper }.into());
        }
        let buffers = std::mem::take(&mut self.spare_buffers);
        let mut builder = BatchBuilder::with_buffers(self.part_writer(), lower, buffers);
        for update in updates {
            let ((k, v), t, d) = update.borrow();
            if upper.less_equal(t) {
                builder.writer.delete_parts(&builder.parts).await;
                return Err(InvalidUsage::UpdateBeyondUpper {
                    ts: t.clone(),
                    expected_upper: upper,
                }
                .into());
            }
            if let Err(err) = builder.add(k, v, t, d).await {
                builder.writer.delete_parts(&builder.parts).await;
                return Err(err);
            }
        }
        let batch = builder.finish_in_place(upper).await;
        self.spare_buffers = builder.into_buffers().unwrap_or_default();
        batch
    }

    /// A builder of a batch starting at `lower`, for updates added one at a
    /// time (memory stays bounded: full parts are written as it goes).
    pub fn builder(&mut self, lower: Antichain<T>) -> BatchBuilder<K, V, T, D> {
        BatchBuilder::new(self.part_writer(), lower)
    }

    /// Compacts the shard now: merges batches as the compaction policy
    /// asks (the same work writers do in the background after appends)
    /// until it asks for nothing more, and also merges the batches that
    /// lie wholly before the since into one run if some were compacted at
    /// an older since or consist of several runs (collapsing each key's
    /// versions, which the background policy leaves for later; a since that
    /// keeps moving meanwhile gets a few such merges, not endless ones).
    /// Concurrent compactions by other
    /// handles or processes are safe: each merge replaces its inputs only
    /// if they are all still in state. Retries external failures; fails
    /// with a shard error if a part is missing or corrupt.
    pub async fn compact(&mut self) -> Result<CompactionStats, ClientError<T>> {
        let stats = compact::compact_until_done::<T, D>(
            &self.machine,
            &self.part_reader(),
            &self.part_writer(),
            usize::MAX,
            true,
        )
        .await?;
        Ok(stats)
    }

    /// Collects garbage now: writes a rollup of the latest state, then
    /// truncates the shard's state log below the oldest state a reader may
    /// still read and deletes the blobs only older states referenced. Writers do this in the background as the
    /// state advances; this is for tools and tests. Retries external
    /// failures.
    pub async fn collect_garbage(&mut self) -> Result<(), ClientError<T>> {
        // A rollup of the latest state first, so that the log can be
        // truncated as far as the readers allow, not only to the newest
        // rollup the background work happened to write.
        let latest = self.machine.fetch_latest().await?;
        maintenance::write_rollup(&self.machine, &latest).await?;
        maintenance::gc(&self.machine).await?;
        Ok(())
    }

    fn part_reader(&self) -> PartReader {
        PartReader {
            shard_id: self.machine.shard_id(),
            blob: Arc::clone(&self.blob),
            cfg: self.machine.dyn_cfg().clone(),
            codecs: self.machine.cached().codecs.clone(),
        }
    }

    fn part_writer(&self) -> PartWriter<T> {
        let cached = self.machine.cached();
        PartWriter {
            shard_id: self.machine.shard_id(),
            writer_id: self.writer_id,
            blob: Arc::clone(&self.blob),
            machine: self.machine.clone(),
            cfg: self.machine.dyn_cfg().clone(),
            codecs: cached.codecs.clone(),
        }
    }

    /// Appends `batch` as `[lower, upper)`, with the overlap rules of
    /// [`WriteHandle::append`]. `lower` may be beyond the batch's own lower
    /// (updates before it are then ignored by readers); `upper` must be the
    /// batch's upper.
    pub async fn append_batch(
        &mut self,
        mut batch: Batch<K, V, T, D>,
        mut lower: Antichain<T>,
        upper: Antichain<T>,
    ) -> Result<Result<(), UpperMismatch<T>>, ClientError<T>> {
        loop {
            let result = self
                .compare_and_append_batch(&mut [&mut batch], lower.clone(), upper.clone())
                .await?;
            let Err(mismatch) = result else {
                return Ok(Ok(()));
            };
            if PartialOrder::less_equal(&upper, &mismatch.current) {
                // Everything up to `upper` is already written.
                batch.delete().await;
                return Ok(Ok(()));
            }
            if PartialOrder::less_equal(&lower, &mismatch.current)
                && PartialOrder::less_than(&mismatch.current, &upper)
            {
                // Part of the interval is already written: append the rest.
                lower = mismatch.current;
                continue;
            }
            // Not contiguous (with partially ordered times the shard's
            // upper may also be incomparable to the interval): the caller
            // must wait or fill the gap. The batch is consumed either way.
            batch.delete().await;
            return Ok(Err(mismatch));
        }
    }

    /// Appends `batches`, as one logical batch `[expected_upper,
    /// new_upper)`, if the shard's upper is exactly `expected_upper`.
    ///
    /// Each batch must belong to this shard (`BatchNotFromThisShard`), start
    /// at or before `expected_upper` and end at `new_upper`
    /// (`InvalidBatchBounds`); updates before `expected_upper` are ignored
    /// by readers. An empty interval takes no updates
    /// (`InvalidEmptyTimeInterval`).
    ///
    /// On success the batches are consumed. On [`UpperMismatch`] they are
    /// left to the caller (to retry, or delete), and the handle's upper
    /// becomes the shard's.
    #[tracing::instrument(level = "debug", skip_all, fields(shard = %self.machine.shard_id()))]
    pub async fn compare_and_append_batch(
        &mut self,
        batches: &mut [&mut Batch<K, V, T, D>],
        expected_upper: Antichain<T>,
        new_upper: Antichain<T>,
    ) -> Result<Result<(), UpperMismatch<T>>, ClientError<T>> {
        let shard_id = self.machine.shard_id();
        for batch in batches.iter() {
            if batch.shard_id != shard_id {
                return Err(InvalidUsage::BatchNotFromThisShard {
                    batch_shard: batch.shard_id,
                    handle_shard: shard_id,
                }
                .into());
            }
        }
        // Two copies of one batch would be read twice.
        let mut keys = std::collections::BTreeSet::new();
        let repeated: Vec<String> = batches
            .iter()
            .flat_map(|b| b.parts.iter())
            .filter(|p| !keys.insert(p.key.as_str()))
            .map(|p| p.key.clone())
            .collect();
        if !repeated.is_empty() {
            return Err(InvalidUsage::BatchAlreadyAppended { keys: repeated }.into());
        }
        if !PartialOrder::less_equal(&expected_upper, &new_upper) {
            return Err(InvalidUsage::InvalidBounds {
                lower: expected_upper,
                upper: new_upper,
            }
            .into());
        }
        if expected_upper == new_upper && batches.iter().any(|b| !b.parts.is_empty()) {
            return Err(InvalidUsage::InvalidEmptyTimeInterval {
                lower: expected_upper,
                upper: new_upper,
                keys: batches.iter().flat_map(|b| b.part_keys()).collect(),
            }
            .into());
        }
        for batch in batches.iter() {
            if !PartialOrder::less_equal(&batch.lower, &expected_upper) || batch.upper != new_upper
            {
                return Err(InvalidUsage::InvalidBatchBounds {
                    batch_lower: batch.lower.clone(),
                    batch_upper: batch.upper.clone(),
                    append_lower: expected_upper,
                    append_upper: new_upper,
                }
                .into());
            }
        }
        if expected_upper == new_upper {
            // Nothing to append: only the fence to check.
            let current = self.fetch_recent_upper().await?.clone();
            for batch in batches.iter_mut() {
                batch.consumed = true;
            }
            return Ok(if current == expected_upper {
                Ok(())
            } else {
                Err(UpperMismatch {
                    expected: expected_upper,
                    current,
                })
            });
        }
        let hollow = HollowBatch {
            desc: Description::new(
                expected_upper.clone(),
                new_upper.clone(),
                Antichain::from_elem(T::minimum()),
            ),
            parts: batches
                .iter()
                .flat_map(|b| b.parts.iter().cloned())
                .collect(),
            len: batches.iter().map(|b| b.len).sum(),
            runs: Vec::new(),
        };
        let token = IdempotencyToken::new();
        let writer = self.writer_id;
        let lease_ms = duration_ms(self.machine.cfg().writer_lease_duration);
        let (_, (applied, result)) = self
            .machine
            .apply(|state, now| {
                state.expire_lapsed(now);
                match state.compare_and_append(&hollow, writer, token, now, lease_ms) {
                    Ok(()) => Transition::Write((true, Ok(()))),
                    Err(CompareAndAppendBreak::AlreadyCommitted) => {
                        Transition::Skip((false, Ok(())))
                    }
                    Err(CompareAndAppendBreak::Upper(current)) => {
                        Transition::Refuse((false, Err(Some(current))))
                    }
                    Err(CompareAndAppendBreak::PartsAlreadyAppended) => {
                        Transition::Refuse((false, Err(None)))
                    }
                }
            })
            .await?;
        let outcome = match &result {
            Ok(()) if applied => "committed",
            Ok(()) => "already_committed",
            Err(None) => "refused",
            Err(Some(_)) => "upper_mismatch",
        };
        let metrics = self.machine.metrics();
        if let Some(metrics) = &metrics {
            metrics.appends.with_label_values(&[outcome]).inc();
            if applied {
                metrics.appended_updates.inc_by(hollow.len);
            }
        }
        match result {
            Ok(()) => {
                for batch in batches.iter_mut() {
                    batch.consumed = true;
                }
                self.upper = new_upper;
                // An append re-registers a writer whose lease had lapsed;
                // its heartbeats, which stopped then, start again.
                if self
                    .heartbeat
                    .as_ref()
                    .is_none_or(HeartbeatTask::is_finished)
                {
                    self.heartbeat = Some(heartbeat::spawn(
                        self.machine.clone(),
                        Holder::Writer(self.writer_id),
                    ));
                }
                if applied {
                    compact::spawn_if_needed::<T, D>(
                        &self.machine,
                        &self.part_reader(),
                        &self.part_writer(),
                    );
                }
                Ok(Ok(()))
            }
            Err(None) => Err(InvalidUsage::BatchAlreadyAppended {
                keys: hollow.parts.iter().map(|p| p.key.clone()).collect(),
            }
            .into()),
            Err(Some(current)) => {
                self.upper.clone_from(&current);
                Ok(Err(UpperMismatch {
                    expected: expected_upper,
                    current,
                }))
            }
        }
    }

    /// Turns a batch received from another process back into a [`Batch`].
    /// Its shard is checked when it is appended.
    pub fn batch_from_transmittable_batch(&self, batch: TransmittableBatch) -> Batch<K, V, T, D> {
        Batch {
            shard_id: batch.shard_id,
            lower: Antichain::from_iter(batch.lower.iter().map(|t| T::decode(*t))),
            upper: Antichain::from_iter(batch.upper.iter().map(|t| T::decode(*t))),
            parts: batch.parts.into_iter().map(|p| p.into_hollow()).collect(),
            len: batch.len,
            blob: Arc::clone(&self.blob),
            machine: self.machine.clone(),
            consumed: false,
            _phantom: PhantomData,
        }
    }

    /// Advances the shard's upper to at least `target` by appending empty
    /// batches (a no-op if it is already there).
    pub async fn advance_upper(&mut self, target: &Antichain<T>) -> Result<(), ClientError<T>> {
        let mut lower = self.machine.cached().upper.clone();
        loop {
            if PartialOrder::less_equal(target, &lower) {
                self.upper = lower;
                return Ok(());
            }
            let mut empty = self.builder(lower.clone()).finish(target.clone()).await?;
            match self
                .compare_and_append_batch(&mut [&mut empty], lower.clone(), target.clone())
                .await?
            {
                Ok(()) => return Ok(()),
                Err(mismatch) => lower = mismatch.current,
            }
        }
    }

    /// Releases this writer's registration. Its appends stay.
    pub async fn expire(mut self) {
        self.expire_now().await;
    }

    async fn expire_now(&mut self) {
        self.expired = true;
        self.heartbeat = None;
        heartbeat::expire(&self.machine, Holder::Writer(self.writer_id)).await;
    }

    /// Whether the heartbeat task still runs (tests).
    #[cfg(test)]
    pub(crate) fn heartbeat_running(&self) -> bool {
        self.heartbeat.as_ref().is_some_and(|h| !h.is_finished())
    }
}

/// Expires `handle`'s writer in state without telling the handle (tests).
#[cfg(test)]
pub(crate) async fn tests_expire_writer<K: Codec, V: Codec, T, D>(handle: &WriteHandle<K, V, T, D>)
where
    T: Timestamp + Lattice + Codec64 + Sync,
{
    heartbeat::expire(&handle.machine, Holder::Writer(handle.writer_id)).await;
}

impl<K: Codec, V: Codec, T, D> Drop for WriteHandle<K, V, T, D> {
    fn drop(&mut self) {
        self.heartbeat = None;
        if let Some(expire) = self.expire_on_drop.take()
            && !self.expired
        {
            expire();
        }
    }
}

/// A duration in whole milliseconds, saturating.
pub(crate) fn duration_ms(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
