//! Reading a shard: snapshots, listens, subscribes.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Debug;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use differential_dataflow::difference::Semigroup;
use differential_dataflow::lattice::Lattice;
use differential_dataflow::trace::Description;
use futures::{Stream, StreamExt, TryStreamExt};
use persist::SeqNo;
use persist::part::{DecodedPart, PartStats};
use persist_types::{Codec, Codec64, ShardId};
use timely::PartialOrder;
use timely::progress::{Antichain, Timestamp};

use crate::error::{ClientError, ShardError, Since};
use crate::fetch::{
    FetchFilter, FetchedPart, FetchedUpdate, LeasedBatchPart, PartReader, SerdeLeasedBatchPart,
    consolidate_parts, part_stats,
};
use crate::ids::LeasedReaderId;
use crate::internal::heartbeat::{self, ExpireOnDrop, HeartbeatTask, Holder};
use crate::internal::machine::{Machine, Transition};

use crate::internal::state::{HollowBatch, State};
use crate::write::duration_ms;

/// What happened in a shard, as a subscription sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenEvent<T, D> {
    /// The shard is complete before this frontier: no later event carries
    /// an update at a time not at or beyond it.
    Progress(Antichain<T>),
    /// Updates of the shard.
    Updates(Vec<D>),
}

/// An item of [`Listen::into_stream`].
pub type ListenStreamItem<K, V, T, D> =
    Result<ListenEvent<T, FetchedUpdate<K, V, T, D>>, ClientError<T>>;

/// The SeqNos a reader has leased parts at, with the number of parts
/// outstanding for each. Shared with cursors and subscriptions, which
/// return their parts' leases as they finish with them.
#[derive(Debug, Clone, Default)]
pub(crate) struct Leases(Arc<Mutex<BTreeMap<SeqNo, usize>>>);

impl Leases {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<SeqNo, usize>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lease(&self, seqno: SeqNo) {
        *self.lock().entry(seqno).or_default() += 1;
    }

    fn release(&self, seqno: SeqNo) {
        let mut leases = self.lock();
        if let Some(count) = leases.get_mut(&seqno) {
            *count -= 1;
            if *count == 0 {
                leases.remove(&seqno);
            }
        }
    }

    fn oldest(&self) -> Option<SeqNo> {
        self.lock().keys().next().copied()
    }

    /// Whether a part leased at `seqno` is still outstanding.
    #[cfg(test)]
    pub(crate) fn is_leased(&self, seqno: SeqNo) -> bool {
        self.lock().contains_key(&seqno)
    }
}

/// Statistics of the parts a snapshot would read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotPartsStats {
    /// The shard.
    pub shard_id: ShardId,
    /// One entry per part.
    pub parts: Vec<PartStats>,
}

/// Reads one shard, holding back its since (the times it can still
/// distinguish) with a lease that a background task keeps alive.
///
/// A leased reader that stops heartbeating for longer than its lease is
/// expired by a later state change, and its hold is released; operations on
/// it then fail with [`ShardError::Expired`]. `expire` releases the hold at
/// once; dropping the handle does so best effort.
pub struct ReadHandle<K: Codec, V: Codec, T, D> {
    pub(crate) machine: Machine<T>,
    pub(crate) reader: PartReader,
    pub(crate) reader_id: LeasedReaderId,
    pub(crate) key_schema: Arc<K::Schema>,
    pub(crate) val_schema: Arc<V::Schema>,
    pub(crate) since: Antichain<T>,
    pub(crate) leases: Leases,
    pub(crate) last_downgrade: Instant,
    pub(crate) heartbeat: Option<HeartbeatTask>,
    pub(crate) expired: bool,
    pub(crate) expire_on_drop: Option<ExpireOnDrop>,
    pub(crate) _phantom: PhantomData<fn() -> D>,
}

impl<K: Codec, V: Codec, T: Debug, D> Debug for ReadHandle<K, V, T, D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadHandle")
            .field("shard_id", &self.machine.shard_id())
            .field("reader_id", &self.reader_id)
            .field("since", &self.since)
            .finish_non_exhaustive()
    }
}

impl<K, V, T, D> ReadHandle<K, V, T, D>
where
    K: Codec,
    V: Codec,
    T: Timestamp + Lattice + Codec64 + Sync,
    D: Semigroup + Codec64 + Send + Sync,
{
    /// The shard this handle reads.
    pub fn shard_id(&self) -> ShardId {
        self.machine.shard_id()
    }

    /// This reader's id.
    pub fn reader_id(&self) -> LeasedReaderId {
        self.reader_id
    }

    /// This reader's since: reads at or beyond it are served correctly as
    /// long as the reader lives.
    pub fn since(&self) -> &Antichain<T> {
        &self.since
    }

    /// Moves this reader's since forward to `new_since` (joined with the
    /// current one: a since never moves back), letting the shard compact
    /// times before it. Also renews the lease and reports the oldest state
    /// this reader still holds parts of.
    ///
    /// Fails with [`ShardError::Expired`] if the reader's lease lapsed.
    pub async fn downgrade_since(
        &mut self,
        new_since: &Antichain<T>,
    ) -> Result<(), ClientError<T>> {
        let id = self.reader_id;
        let leases = self.leases.clone();
        let new_since = new_since.clone();
        let (_, since) = self
            .machine
            .apply(|state, now| {
                // Held parts pin the state they were leased at; with none
                // held, only the state this transition writes is needed.
                let outstanding = leases.oldest().unwrap_or(state.seqno);
                state.expire_lapsed(now);
                match state.downgrade_since(id, outstanding, &new_since, now) {
                    Some(since) => Transition::Write(Some(since)),
                    None => Transition::Refuse(None),
                }
            })
            .await?;
        self.last_downgrade = Instant::now();
        match since {
            Some(since) => {
                self.since = since;
                Ok(())
            }
            None => Err(self.expired_error()),
        }
    }

    fn expired_error(&self) -> ClientError<T> {
        ShardError::Expired {
            shard: self.machine.shard_id(),
            handle: self.reader_id.to_string(),
        }
        .into()
    }

    /// Like [`ReadHandle::downgrade_since`], but rate limited: skipped if
    /// the last downgrade was less than the configured interval ago, unless
    /// `new_since` is empty (closing the reader's hold is never delayed).
    pub async fn maybe_downgrade_since(
        &mut self,
        new_since: &Antichain<T>,
    ) -> Result<(), ClientError<T>> {
        let interval = self.machine.cfg().since_downgrade_interval;
        if new_since.is_empty() || self.last_downgrade.elapsed() >= interval {
            self.downgrade_since(new_since).await
        } else {
            Ok(())
        }
    }

    /// The parts holding every update at a time not beyond `as_of`, leased
    /// to this reader. Waits (asynchronously) until the shard's upper is
    /// beyond `as_of`. Fails with [`Since`] if `as_of` is not at or beyond
    /// this reader's since.
    ///
    /// Fetch the parts (here or, after exchanging them, on other workers
    /// with a [`BatchFetcher`](crate::BatchFetcher)) and return each with
    /// [`ReadHandle::process_returned_leased_part`].
    pub async fn snapshot(
        &mut self,
        as_of: Antichain<T>,
    ) -> Result<Vec<LeasedBatchPart<T>>, ClientError<T>> {
        let (state, batches) = self.snapshot_batches(&as_of).await?;
        let filter = FetchFilter::Snapshot { as_of };
        Ok(self.lease_parts(&state, &batches, &filter))
    }

    async fn snapshot_batches(
        &self,
        as_of: &Antichain<T>,
    ) -> Result<(Arc<State<T>>, Vec<HollowBatch<T>>), ClientError<T>> {
        if !PartialOrder::less_equal(&self.since, as_of) {
            return Err(Since(self.since.clone()).into());
        }
        Ok(self.machine.snapshot(as_of).await?.map_err(Since)?)
    }

    /// Leases the parts of `batches` that `filter` may keep anything of.
    fn lease_parts(
        &self,
        state: &State<T>,
        batches: &[HollowBatch<T>],
        filter: &FetchFilter<T>,
    ) -> Vec<LeasedBatchPart<T>> {
        let lease = Some((self.reader_id, state.seqno));
        let parts = parts_of(self.machine.shard_id(), batches, filter, lease);
        for _ in &parts {
            self.leases.lease(state.seqno);
        }
        parts
    }

    /// Returns a part leased by this reader, releasing its lease.
    pub fn process_returned_leased_part(&mut self, part: LeasedBatchPart<T>) {
        self.release(&part);
    }

    fn release(&self, part: &LeasedBatchPart<T>) {
        if part.reader_id != Some(self.reader_id) {
            tracing::warn!(
                shard = %self.machine.shard_id(),
                "part leased by {:?} returned to {}", part.reader_id, self.reader_id
            );
            return;
        }
        if let Some(seqno) = part.leased_seqno {
            self.leases.release(seqno);
        }
    }

    /// Turns a part received from another worker back into a
    /// [`LeasedBatchPart`], to return it to this reader.
    pub fn leased_part_from_exchangeable(&self, part: SerdeLeasedBatchPart) -> LeasedBatchPart<T> {
        LeasedBatchPart::from_exchangeable(part)
    }

    /// Every update at a time not beyond `as_of`, with times advanced to
    /// `as_of`, consolidated (updates equal in encoded key, value and time
    /// are summed; those summing to zero are dropped), sorted by encoded
    /// key, value and time. Waits until the shard's upper is beyond `as_of`.
    pub async fn snapshot_and_fetch(
        &mut self,
        as_of: Antichain<T>,
    ) -> Result<Vec<FetchedUpdate<K, V, T, D>>, ClientError<T>> {
        let parts = self.snapshot(as_of).await?;
        // Every part was leased at one state: return the leases when done,
        // or if this future is dropped while fetching.
        let _unlease = Unlease {
            leases: self.leases.clone(),
            seqno: parts
                .first()
                .and_then(|p| p.leased_seqno)
                .unwrap_or(SeqNo(0)),
            count: parts.len(),
        };
        fetch_consolidated(&self.reader, &parts, &self.key_schema, &self.val_schema).await
    }

    /// A cursor over the snapshot at `as_of`, fetching one part at a time
    /// (memory stays bounded by the largest part) and skipping parts whose
    /// statistics `should_fetch_part` rejects. A sample of the skipped parts
    /// is audited (`PersistConfig::stats_audit_percent`): fetched, and kept
    /// if their statistics turn out wrong.
    pub async fn snapshot_cursor(
        &mut self,
        as_of: Antichain<T>,
        should_fetch_part: impl Fn(&PartStats) -> bool,
    ) -> Result<Cursor<K, V, T, D>, ClientError<T>> {
        let parts = self.snapshot(as_of).await?;
        let audit_percent = self.machine.cfg().stats_audit_percent;
        let mut kept = VecDeque::new();
        for part in parts {
            if should_fetch_part(&part.stats()) || !self.audit_skip(&part, audit_percent).await? {
                kept.push_back(part);
            } else {
                self.release(&part);
            }
        }
        Ok(Cursor {
            reader: self.reader.clone(),
            leases: self.leases.clone(),
            key_schema: Arc::clone(&self.key_schema),
            val_schema: Arc::clone(&self.val_schema),
            parts: kept,
            _phantom: PhantomData,
        })
    }

    /// Whether skipping `part` on the strength of its statistics is safe.
    ///
    /// For a sample of the skipped parts (`audit_percent` of them, picked
    /// by a hash of the part's key, so the same parts every time) this
    /// fetches the part and checks its statistics against its contents. A
    /// part whose statistics lie is reported (an error log and the
    /// `persist_stats_audits_total{outcome="wrong"}` metric) and read after
    /// all, so a wrong filter never drops data it audited.
    async fn audit_skip(
        &self,
        part: &LeasedBatchPart<T>,
        audit_percent: u32,
    ) -> Result<bool, ClientError<T>> {
        if crc32fast::hash(part.part.key.as_bytes()) % 100 >= audit_percent {
            return Ok(true);
        }
        let stats = part.stats();
        let decoded = self.reader.fetch_decoded(&part.part).await?;
        let truthful = decoded.len() as u64 == stats.len
            && decoded
                .iter()
                .all(|(k, ..)| stats.may_contain_key_range(k, k));
        let metrics = self.machine.metrics();
        let outcome = if truthful { "right" } else { "wrong" };
        if let Some(metrics) = &metrics {
            metrics.stats_audits.with_label_values(&[outcome]).inc();
        }
        if !truthful {
            tracing::error!(
                shard = %self.machine.shard_id(),
                key = %part.part.key,
                "part statistics do not match its contents; reading it after all"
            );
        }
        Ok(truthful)
    }

    /// The snapshot at `as_of` as a stream of updates, fetched one part at
    /// a time; updates are consolidated within each part (not across
    /// parts). A part that cannot be read ends the stream with an error.
    pub async fn snapshot_and_stream(
        &mut self,
        as_of: Antichain<T>,
    ) -> Result<
        impl Stream<Item = Result<FetchedUpdate<K, V, T, D>, ClientError<T>>> + use<K, V, T, D>,
        ClientError<T>,
    > {
        let cursor = self.snapshot_cursor(as_of, |_| true).await?;
        let stream = futures::stream::unfold(
            (cursor, VecDeque::new(), false),
            |(mut cursor, mut pending, mut done)| async move {
                loop {
                    if let Some(update) = pending.pop_front() {
                        return Some((Ok(update), (cursor, pending, done)));
                    }
                    if done {
                        return None;
                    }
                    match cursor.next().await {
                        Some(Ok(updates)) => pending.extend(updates),
                        Some(Err(err)) => {
                            done = true;
                            return Some((Err(err), (cursor, pending, done)));
                        }
                        None => return None,
                    }
                }
            },
        );
        Ok(stream)
    }

    /// Statistics of the parts a snapshot at `as_of` would read. Waits
    /// until the shard's upper is beyond `as_of`.
    pub async fn snapshot_parts_stats(
        &mut self,
        as_of: Antichain<T>,
    ) -> Result<SnapshotPartsStats, ClientError<T>> {
        let (_, batches) = self.snapshot_batches(&as_of).await?;
        Ok(SnapshotPartsStats {
            shard_id: self.machine.shard_id(),
            parts: batches
                .iter()
                .flat_map(|b| b.parts.iter().map(part_stats))
                .collect(),
        })
    }

    /// Listens to the shard from `as_of`: every update at a time not at or
    /// before `as_of`, in the order batches were appended, with progress.
    /// Fails with [`Since`] if `as_of` is not at or beyond this reader's
    /// since.
    pub async fn listen(self, as_of: Antichain<T>) -> Result<Listen<K, V, T, D>, ClientError<T>> {
        if !PartialOrder::less_equal(&self.since, &as_of) {
            return Err(Since(self.since.clone()).into());
        }
        Listen::new(self, as_of).await
    }

    /// A snapshot at `as_of` followed by a listen from `as_of`: together
    /// every update of the shard exactly once (times in the snapshot
    /// advanced to `as_of`).
    pub async fn subscribe(
        mut self,
        as_of: Antichain<T>,
    ) -> Result<Subscribe<K, V, T, D>, ClientError<T>> {
        let snapshot = self.snapshot(as_of.clone()).await?;
        let listen = self.listen(as_of).await?;
        Ok(Subscribe {
            snapshot: Some(snapshot),
            listen,
        })
    }

    /// A new reader of the same shard holding this reader's since.
    pub async fn clone(&self, purpose: &str) -> Result<ReadHandle<K, V, T, D>, ClientError<T>> {
        let mut reader = open_reader(
            &self.machine,
            self.reader.clone(),
            LeasedReaderId::new(),
            purpose,
            Arc::clone(&self.key_schema),
            Arc::clone(&self.val_schema),
        )
        .await?;
        reader.downgrade_since(&self.since).await?;
        Ok(reader)
    }

    /// A handle that returns this reader's leased parts from elsewhere (for
    /// example from another operator on the same worker while this reader is
    /// busy in [`Listen::next`]). See [`LeaseReturner`].
    pub fn lease_returner(&self) -> LeaseReturner {
        LeaseReturner {
            shard_id: self.machine.shard_id(),
            reader_id: self.reader_id,
            leases: self.leases.clone(),
        }
    }

    /// Releases this reader's since hold and lease.
    pub async fn expire(mut self) {
        self.expire_now().await;
    }

    async fn expire_now(&mut self) {
        self.expired = true;
        self.heartbeat = None;
        heartbeat::expire(&self.machine, Holder::Reader(self.reader_id)).await;
    }

    /// Stops heartbeats without expiring, as a hung process would (tests).
    #[cfg(test)]
    pub(crate) fn stop_heartbeats(&mut self) {
        self.heartbeat = None;
    }

    /// Whether the heartbeat task still runs (tests).
    #[cfg(test)]
    pub(crate) fn heartbeat_running(&self) -> bool {
        self.heartbeat.as_ref().is_some_and(|h| !h.is_finished())
    }
}

/// Registers a leased reader and returns its handle, heartbeating.
pub(crate) async fn open_reader<K, V, T, D>(
    machine: &Machine<T>,
    reader: PartReader,
    reader_id: LeasedReaderId,
    purpose: &str,
    key_schema: Arc<K::Schema>,
    val_schema: Arc<V::Schema>,
) -> Result<ReadHandle<K, V, T, D>, ClientError<T>>
where
    K: Codec,
    V: Codec,
    T: Timestamp + Lattice + Codec64 + Sync,
{
    let lease_ms = duration_ms(machine.cfg().reader_lease_duration);
    let (_, since) = machine
        .apply(|state, now| {
            if state.is_finalized() {
                return Transition::Refuse(None);
            }
            state.expire_lapsed(now);
            Transition::Write(Some(
                state.register_leased_reader(reader_id, purpose, now, lease_ms),
            ))
        })
        .await?;
    let since = since.ok_or(ShardError::Finalized {
        shard: machine.shard_id(),
    })?;
    let heartbeat = heartbeat::spawn(machine.clone(), Holder::Reader(reader_id));
    Ok(ReadHandle {
        machine: machine.clone(),
        reader,
        reader_id,
        key_schema,
        val_schema,
        since,
        leases: Leases::default(),
        last_downgrade: Instant::now(),
        heartbeat: Some(heartbeat),
        expired: false,
        expire_on_drop: Some(heartbeat::expire_on_drop(
            machine,
            Holder::Reader(reader_id),
        )),
        _phantom: PhantomData,
    })
}

/// Expires `handle`'s reader in state without telling the handle, as a
/// later transition does once its lease lapsed (tests).
#[cfg(test)]
pub(crate) async fn tests_expire_reader<K: Codec, V: Codec, T, D>(handle: &ReadHandle<K, V, T, D>)
where
    T: Timestamp + Lattice + Codec64 + Sync,
{
    heartbeat::expire(&handle.machine, Holder::Reader(handle.reader_id)).await;
}

impl<K: Codec, V: Codec, T, D> Drop for ReadHandle<K, V, T, D> {
    fn drop(&mut self) {
        self.heartbeat = None;
        if let Some(expire) = self.expire_on_drop.take()
            && !self.expired
        {
            expire();
        }
    }
}

/// Reads a snapshot one part at a time.
pub struct Cursor<K: Codec, V: Codec, T, D> {
    reader: PartReader,
    leases: Leases,
    key_schema: Arc<K::Schema>,
    val_schema: Arc<V::Schema>,
    parts: VecDeque<LeasedBatchPart<T>>,
    _phantom: PhantomData<fn() -> D>,
}

impl<K: Codec, V: Codec, T, D> Debug for Cursor<K, V, T, D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cursor")
            .field("shard_id", &self.reader.shard_id)
            .field("parts_left", &self.parts.len())
            .finish_non_exhaustive()
    }
}

impl<K, V, T, D> Cursor<K, V, T, D>
where
    K: Codec,
    V: Codec,
    T: Timestamp + Lattice + Codec64,
    D: Semigroup + Codec64,
{
    /// The updates of the next part (times advanced to the as_of,
    /// consolidated within the part), or `None` when all parts are read.
    pub async fn next(&mut self) -> Option<Result<Vec<FetchedUpdate<K, V, T, D>>, ClientError<T>>> {
        let part = self.parts.pop_front()?;
        let fetched = self
            .reader
            .fetch::<K, V, T, D>(&part, &self.key_schema, &self.val_schema)
            .await;
        if let Some(seqno) = part.leased_seqno {
            self.leases.release(seqno);
        }
        Some(fetched.map(|f| f.collect()))
    }
}

impl<K: Codec, V: Codec, T, D> Drop for Cursor<K, V, T, D> {
    fn drop(&mut self) {
        for part in self.parts.drain(..) {
            if let Some(seqno) = part.leased_seqno {
                self.leases.release(seqno);
            }
        }
    }
}

/// An ongoing read of the updates appended to a shard after an `as_of`.
///
/// Each step yields the parts of the next batch holding updates at times
/// not at or before the `as_of`, then the batch's upper as progress. For a
/// totally ordered time every update yielded is beyond the `as_of` and
/// before the progress frontier.
pub struct Listen<K: Codec, V: Codec, T, D> {
    handle: ReadHandle<K, V, T, D>,
    as_of: Antichain<T>,
    since: Antichain<T>,
    /// The frontier reported to the caller.
    frontier: Antichain<T>,
    /// The batch boundary the listen reads from next.
    walk: Antichain<T>,
}

impl<K: Codec, V: Codec, T: Debug, D> Debug for Listen<K, V, T, D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listen")
            .field("shard_id", &self.handle.machine.shard_id())
            .field("as_of", &self.as_of)
            .field("frontier", &self.frontier)
            .finish_non_exhaustive()
    }
}

impl<K, V, T, D> Listen<K, V, T, D>
where
    K: Codec,
    V: Codec,
    T: Timestamp + Lattice + Codec64 + Sync,
    D: Semigroup + Codec64 + Send + Sync,
{
    async fn new(
        mut handle: ReadHandle<K, V, T, D>,
        as_of: Antichain<T>,
    ) -> Result<Self, ClientError<T>> {
        // The listen never needs times before its as_of again.
        handle.downgrade_since(&as_of).await?;
        Ok(Listen {
            handle,
            since: as_of.clone(),
            frontier: as_of.clone(),
            as_of,
            walk: Antichain::from_elem(T::minimum()),
        })
    }

    /// The listen's progress: it has yielded every update at a time not
    /// at or beyond this frontier (initially the `as_of`).
    pub fn frontier(&self) -> &Antichain<T> {
        &self.frontier
    }

    /// Waits for the next batch with updates for this listen and returns
    /// its parts, leased, and the progress frontier after them.
    pub async fn next(
        &mut self,
    ) -> Result<(Vec<LeasedBatchPart<T>>, Antichain<T>), ClientError<T>> {
        let filter = FetchFilter::Listen {
            as_of: self.as_of.clone(),
        };
        let mut state = self.handle.machine.cached();
        loop {
            if let Some(start) = state.next_listen_batch(&self.walk) {
                for batch in &state.batches[start..] {
                    self.check_since(batch)?;
                    // The listen may be inside the batch (it was merged
                    // after the listen passed some of its boundaries): what
                    // is before the walk was read already.
                    let unread = HollowBatch {
                        desc: Description::new(
                            batch.desc.lower().join(&self.walk),
                            batch.desc.upper().clone(),
                            batch.desc.since().clone(),
                        ),
                        parts: batch.parts.clone(),
                        len: batch.len,
                        runs: batch.runs.clone(),
                    };
                    let parts =
                        self.handle
                            .lease_parts(&state, std::slice::from_ref(&unread), &filter);
                    if parts.is_empty() && PartialOrder::less_equal(batch.desc.upper(), &self.as_of)
                    {
                        // Entirely at or before the as_of: nothing to report.
                        self.walk = batch.desc.upper().clone();
                        continue;
                    }
                    // Move on only once the batch is handed out: if the
                    // downgrade below fails or this future is dropped, the
                    // next call reads the batch again (and the leases taken
                    // here are returned).
                    let mut unlease = Unlease {
                        leases: self.handle.leases.clone(),
                        seqno: state.seqno,
                        count: parts.len(),
                    };
                    self.advance(batch.desc.upper().clone()).await?;
                    unlease.count = 0;
                    self.walk = batch.desc.upper().clone();
                    return Ok((parts, self.frontier.clone()));
                }
            }
            state = self.handle.machine.wait_for_newer(state.seqno).await?;
        }
    }

    /// Checks that `batch`'s times were not advanced so far that the listen
    /// can no longer tell what it has yielded from what it has not. The
    /// listen's own since hold keeps every batch it reads that way, so a
    /// failure means the shard's state is wrong.
    fn check_since(&self, batch: &HollowBatch<T>) -> Result<(), ShardError> {
        let since = batch.desc.since();
        // Times at the frontier must stay apart from those just before it;
        // on the first batch the as_of is exclusive, so equality is fine.
        let ok = PartialOrder::less_than(since, &self.frontier)
            || (self.frontier == self.as_of && PartialOrder::less_equal(since, &self.frontier))
            || PartialOrder::less_equal(batch.desc.upper(), &self.walk);
        if ok {
            return Ok(());
        }
        Err(ShardError::State {
            shard: self.handle.machine.shard_id(),
            reason: format!(
                "listen at {:?} found batch [{:?}, {:?}) compacted to since {:?}",
                self.frontier,
                batch.desc.lower(),
                batch.desc.upper(),
                since
            ),
        })
    }

    /// Moves the since after the reported frontier, then the frontier to
    /// `upper` (neither moves if the downgrade fails or is cancelled).
    async fn advance(&mut self, upper: Antichain<T>) -> Result<(), ClientError<T>> {
        // The since may follow the frontier only where the previous
        // frontier is strictly before the new one: the next batch must
        // still tell times at the frontier from those just before it.
        let mut since = self.since.clone();
        for t in self.frontier.elements() {
            if upper.elements().iter().any(|u| t.less_than(u)) {
                since.join_assign(&Antichain::from_elem(t.clone()));
            }
        }
        self.handle.maybe_downgrade_since(&since).await?;
        self.since = since;
        self.frontier = upper;
        Ok(())
    }

    /// Like [`Listen::next`], but fetches the parts: the events of the next
    /// batch, ending with its progress.
    pub async fn fetch_next(
        &mut self,
    ) -> Result<Vec<ListenEvent<T, FetchedUpdate<K, V, T, D>>>, ClientError<T>> {
        let (parts, progress) = self.next().await?;
        let mut events = self.fetch_parts(parts).await?;
        events.push(ListenEvent::Progress(progress));
        Ok(events)
    }

    async fn fetch_parts(
        &mut self,
        parts: Vec<LeasedBatchPart<T>>,
    ) -> Result<Vec<ListenEvent<T, FetchedUpdate<K, V, T, D>>>, ClientError<T>> {
        let mut events = Vec::with_capacity(parts.len() + 1);
        let mut failed = None;
        for part in parts {
            if failed.is_none() {
                let fetched: Result<FetchedPart<K, V, T, D>, _> = self
                    .handle
                    .reader
                    .fetch(&part, &self.handle.key_schema, &self.handle.val_schema)
                    .await;
                match fetched {
                    Ok(fetched) => {
                        let updates: Vec<_> = fetched.collect();
                        if !updates.is_empty() {
                            events.push(ListenEvent::Updates(updates));
                        }
                    }
                    Err(err) => failed = Some(err),
                }
            }
            self.handle.release(&part);
        }
        match failed {
            Some(err) => Err(err),
            None => Ok(events),
        }
    }

    /// The listen as an endless stream of events. A part that cannot be
    /// read yields an error and ends the stream.
    pub fn into_stream(self) -> impl Stream<Item = ListenStreamItem<K, V, T, D>> {
        futures::stream::unfold(
            (self, VecDeque::new(), false),
            |(mut listen, mut pending, done)| async move {
                if done {
                    return None;
                }
                loop {
                    if let Some(event) = pending.pop_front() {
                        return Some((Ok(event), (listen, pending, false)));
                    }
                    match listen.fetch_next().await {
                        Ok(events) => pending.extend(events),
                        Err(err) => return Some((Err(err), (listen, pending, true))),
                    }
                }
            },
        )
    }

    /// Reads until the frontier is beyond `ts`; returns the updates and the
    /// last progress (tests).
    #[cfg(test)]
    pub(crate) async fn read_until(
        &mut self,
        ts: &T,
    ) -> (Vec<FetchedUpdate<K, V, T, D>>, Antichain<T>) {
        let mut updates = Vec::new();
        let mut frontier = Antichain::from_elem(T::minimum());
        while self.frontier.less_than(ts) {
            for event in self.fetch_next().await.expect("listen failed") {
                match event {
                    ListenEvent::Updates(mut x) => updates.append(&mut x),
                    ListenEvent::Progress(x) => frontier = x,
                }
            }
        }
        (updates, frontier)
    }

    /// Returns a part this listen handed out, releasing its lease.
    pub fn return_leased_part(&mut self, part: LeasedBatchPart<T>) {
        self.handle.process_returned_leased_part(part);
    }

    /// A handle that returns this listen's leased parts without borrowing
    /// the listen (see [`LeaseReturner`]).
    pub fn lease_returner(&self) -> LeaseReturner {
        self.handle.lease_returner()
    }

    /// Releases the listen's reader.
    pub async fn expire(self) {
        self.handle.expire().await;
    }

    #[cfg(test)]
    pub(crate) fn handle(&mut self) -> &mut ReadHandle<K, V, T, D> {
        &mut self.handle
    }

    #[cfg(test)]
    pub(crate) fn since(&self) -> &Antichain<T> {
        &self.since
    }
}

/// Returns parts leased by one reader (a [`ReadHandle`] or the [`Listen`]
/// made from it) without borrowing that reader: cheap to clone, `Send`.
///
/// Returning a part through it is exactly
/// [`ReadHandle::process_returned_leased_part`]: the part's SeqNo lease is
/// released (garbage collection may then delete the blobs of that state).
/// A part leased by another reader is refused with a warning and left
/// leased. Returning parts after the reader expired is harmless (its
/// leases went with it). The returner does not keep the reader alive:
/// parts still being fetched need the reader itself to stay open.
#[derive(Debug, Clone)]
pub struct LeaseReturner {
    shard_id: ShardId,
    reader_id: LeasedReaderId,
    leases: Leases,
}

impl LeaseReturner {
    /// The reader whose leases this returns.
    pub fn reader_id(&self) -> LeasedReaderId {
        self.reader_id
    }

    /// Returns a part leased by this returner's reader, releasing its lease.
    pub fn return_leased_part<T>(&self, part: LeasedBatchPart<T>) {
        if part.reader_id != Some(self.reader_id) {
            tracing::warn!(
                shard = %self.shard_id,
                "part leased by {:?} returned to {}", part.reader_id, self.reader_id
            );
            return;
        }
        if let Some(seqno) = part.leased_seqno {
            self.leases.release(seqno);
        }
    }
}

/// Returns `count` leases at `seqno` when dropped.
struct Unlease {
    leases: Leases,
    seqno: SeqNo,
    count: usize,
}

impl Drop for Unlease {
    fn drop(&mut self) {
        for _ in 0..self.count {
            self.leases.release(self.seqno);
        }
    }
}

/// The parts of `batches` that `filter` may keep anything of, leased to
/// `lease` (a reader and the SeqNo of the state they come from) if given.
pub(crate) fn parts_of<T: Timestamp + Lattice + Codec64>(
    shard_id: ShardId,
    batches: &[HollowBatch<T>],
    filter: &FetchFilter<T>,
    lease: Option<(LeasedReaderId, SeqNo)>,
) -> Vec<LeasedBatchPart<T>> {
    batches
        .iter()
        .flat_map(|batch| {
            batch.parts.iter().map(move |part| LeasedBatchPart {
                shard_id,
                reader_id: lease.map(|(reader, _)| reader),
                leased_seqno: lease.map(|(_, seqno)| seqno),
                desc: batch.desc.clone(),
                part: part.clone(),
                filter: filter.clone(),
            })
        })
        .filter(LeasedBatchPart::may_have_updates)
        .collect()
}

/// Fetches `parts` (a few at a time, so blob latency overlaps, each
/// decoded on a blocking thread as it arrives) and consolidates them, keys
/// and values copied once, into the decoded `K` and `V`.
///
/// The merge, tens of milliseconds of CPU for a large read, runs off the
/// caller's runtime (see [`PartReader::off_runtime`]), as does each
/// large part's decoding. A failed fetch fails the read at once.
/// Dropping the future stops the fetches; a merge already started runs to
/// its end.
pub(crate) async fn fetch_consolidated<K, V, T, D>(
    reader: &PartReader,
    parts: &[LeasedBatchPart<T>],
    key_schema: &Arc<K::Schema>,
    val_schema: &Arc<V::Schema>,
) -> Result<Vec<FetchedUpdate<K, V, T, D>>, ClientError<T>>
where
    K: Codec,
    V: Codec,
    T: Timestamp + Lattice + Codec64 + Sync,
    D: Semigroup + Codec64,
{
    // Collected first: a stream over a closure borrowing the parts would
    // make this future `Send` only for one lifetime, not for all. A part
    // holds its slot until decoded, so at most that many decode at once.
    let fetches: Vec<_> = parts
        .iter()
        .map(|part| reader.fetch_decoded_off_runtime(&part.part))
        .collect();
    let decoded: Vec<DecodedPart> = futures::stream::iter(fetches)
        .buffered(SNAPSHOT_FETCH_CONCURRENCY)
        .try_collect()
        .await?;
    let copies: Vec<_> = parts.iter().map(LeasedBatchPart::unleased_copy).collect();
    let (k, v) = (Arc::clone(key_schema), Arc::clone(val_schema));
    let size = parts.iter().map(|p| p.part.encoded_size_bytes).sum();
    let first = parts.first().map_or("", |p| p.part.key.as_str());
    let merge = move || Ok(consolidate_parts::<K, V, T, D>(&copies, &decoded, &*k, &*v));
    Ok(reader.off_runtime(first, size, merge).await?)
}

/// How many parts `snapshot_and_fetch` fetches at once.
const SNAPSHOT_FETCH_CONCURRENCY: usize = 4;

/// Sorts `updates` by data and time and sums the diffs of equal ones,
/// dropping zeros. (Equal updates are summed, so the sort need not be
/// stable; the unstable one is faster on unordered input and still linear
/// on sorted input.)
pub(crate) fn consolidate_runs<X: Ord, T: Ord, D: Semigroup>(updates: &mut Vec<(X, T, D)>) {
    updates.sort_unstable_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
    let mut kept = 0;
    for i in 0..updates.len() {
        if kept > 0 && updates[kept - 1].0 == updates[i].0 && updates[kept - 1].1 == updates[i].1 {
            let (done, rest) = updates.split_at_mut(i);
            done[kept - 1].2.plus_equals(&rest[0].2);
        } else {
            updates.swap(kept, i);
            kept += 1;
        }
    }
    updates.truncate(kept);
    updates.retain(|(_, _, d)| !d.is_zero());
}

/// A snapshot followed by a listen, as one sequence of events.
pub struct Subscribe<K: Codec, V: Codec, T, D> {
    snapshot: Option<Vec<LeasedBatchPart<T>>>,
    listen: Listen<K, V, T, D>,
}

impl<K: Codec, V: Codec, T: Debug, D> Debug for Subscribe<K, V, T, D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscribe")
            .field("snapshot_parts", &self.snapshot.as_ref().map(Vec::len))
            .field("listen", &self.listen)
            .finish()
    }
}

impl<K, V, T, D> Subscribe<K, V, T, D>
where
    K: Codec,
    V: Codec,
    T: Timestamp + Lattice + Codec64 + Sync,
    D: Semigroup + Codec64 + Send + Sync,
{
    /// The next parts: first the snapshot's (with no progress), then each
    /// listened batch's followed by its progress.
    pub async fn next(
        &mut self,
    ) -> Result<Vec<ListenEvent<T, LeasedBatchPart<T>>>, ClientError<T>> {
        if let Some(parts) = self.snapshot.take() {
            return Ok(vec![ListenEvent::Updates(parts)]);
        }
        let (parts, progress) = self.listen.next().await?;
        Ok(vec![
            ListenEvent::Updates(parts),
            ListenEvent::Progress(progress),
        ])
    }

    /// Like [`Subscribe::next`], but fetches the parts.
    pub async fn fetch_next(
        &mut self,
    ) -> Result<Vec<ListenEvent<T, FetchedUpdate<K, V, T, D>>>, ClientError<T>> {
        if let Some(parts) = self.snapshot.take() {
            return self.listen.fetch_parts(parts).await;
        }
        self.listen.fetch_next().await
    }

    /// Returns a part this subscription handed out, releasing its lease.
    pub fn return_leased_part(&mut self, part: LeasedBatchPart<T>) {
        self.listen.return_leased_part(part);
    }

    /// Turns an exchanged part back into a [`LeasedBatchPart`].
    pub fn leased_part_from_exchangeable(&self, part: SerdeLeasedBatchPart) -> LeasedBatchPart<T> {
        LeasedBatchPart::from_exchangeable(part)
    }

    /// Releases the subscription's reader.
    pub async fn expire(mut self) {
        if let Some(parts) = self.snapshot.take() {
            for part in parts {
                self.listen.return_leased_part(part);
            }
        }
        self.listen.expire().await;
    }

    #[cfg(test)]
    pub(crate) fn listen(&mut self) -> &mut Listen<K, V, T, D> {
        &mut self.listen
    }

    #[cfg(test)]
    pub(crate) fn snapshot_parts(&self) -> Option<&Vec<LeasedBatchPart<T>>> {
        self.snapshot.as_ref()
    }
}
