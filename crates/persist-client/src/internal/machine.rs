//! The read-modify-CAS loop that applies state transitions through
//! consensus.

use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use differential_dataflow::lattice::Lattice;
use persist::{Blob, CaSResult, Consensus, ExternalError, SeqNo, VersionedData};
use persist_types::{Codec64, ShardId};
use timely::progress::{Antichain, Timestamp};
use tokio::sync::watch;

use crate::cfg::{DynamicConfig, PersistConfig};
use crate::error::{CodecMismatch, Codecs};
use crate::internal::cache::{Cached, StateCache};
use crate::internal::diff::StateDiff;
use crate::internal::encoding::{
    Entry, StateDecodeError, decode_entry, decode_state, encode_diff, encode_state, validate_state,
};
use crate::internal::state::{HollowBatch, SnapshotError, State};
use crate::metrics::Metrics;

/// What a transition decided.
pub(crate) enum Transition<R> {
    /// Write the changed state and return `R` once it is committed.
    Write(R),
    /// Return `R` without writing: the transition changed nothing.
    Skip(R),
    /// Return `R` without writing: the transition refused to proceed (an
    /// upper or token mismatch, say). A refusal decided on a stale cached
    /// state is re-checked against the latest state first.
    Refuse(R),
}

/// Why the machine could not open or advance a shard's state.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum MachineError {
    /// The shard's durable state cannot be interpreted.
    #[error("shard {shard}: {source}")]
    Decode {
        /// The shard.
        shard: ShardId,
        /// What is wrong with its state.
        source: StateDecodeError,
    },
    /// The shard exists with other codecs.
    #[error(transparent)]
    CodecMismatch(#[from] Box<CodecMismatch>),
    /// Consensus contradicts what this process saw of the shard (its log
    /// vanished or went backward): the machine was opened on another
    /// location's state, or the consensus backend lost data.
    #[error("shard {shard}: consensus contradicts the state this process saw: {reason}")]
    Inconsistent {
        /// The shard.
        shard: ShardId,
        /// What was contradicted.
        reason: String,
    },
}

impl<T: std::fmt::Debug> From<MachineError> for crate::error::ClientError<T> {
    fn from(err: MachineError) -> Self {
        match err {
            MachineError::CodecMismatch(mismatch) => {
                crate::error::InvalidUsage::CodecMismatch(mismatch).into()
            }
            MachineError::Decode { shard, source } => crate::error::ShardError::State {
                shard,
                reason: source.to_string(),
            }
            .into(),
            MachineError::Inconsistent { shard, reason } => {
                crate::error::ShardError::State { shard, reason }.into()
            }
        }
    }
}

/// The latest known state of a shard, shared by every handle that opened it
/// through the same machine, with a watch that fires whenever it advances.
#[derive(Debug)]
struct SharedState<T> {
    state: RwLock<Arc<State<T>>>,
    seqno: watch::Sender<SeqNo>,
    /// Background work in flight for the shard, so that a burst of writes
    /// starts one rollup (or compaction) rather than one per write.
    busy: Arc<crate::internal::maintenance::Busy>,
}

/// Applies transitions to one shard's state. Clones share the cached state.
#[derive(Debug)]
pub(crate) struct Machine<T> {
    shard_id: ShardId,
    consensus: Arc<dyn Consensus>,
    blob: Arc<dyn Blob>,
    cfg: DynamicConfig,
    shared: Arc<SharedState<T>>,
    metrics: Option<Arc<Metrics>>,
}

impl<T> Clone for Machine<T> {
    fn clone(&self) -> Self {
        Machine {
            shard_id: self.shard_id,
            consensus: Arc::clone(&self.consensus),
            blob: Arc::clone(&self.blob),
            cfg: self.cfg.clone(),
            shared: Arc::clone(&self.shared),
            metrics: self.metrics.clone(),
        }
    }
}

impl<T> Machine<T> {
    /// The shard this machine applies transitions to.
    pub fn shard_id(&self) -> ShardId {
        self.shard_id
    }

    /// The blob store holding the shard's parts and rollups.
    pub fn blob(&self) -> &Arc<dyn Blob> {
        &self.blob
    }

    /// Background work in flight for the shard in this process.
    pub(crate) fn busy_arc(&self) -> &Arc<crate::internal::maintenance::Busy> {
        &self.shared.busy
    }
}

/// The blob key of the rollup of a shard's state at `seqno`. Deterministic:
/// two processes rolling up the same state write the same bytes to the same
/// key, and opening a shard finds the rollup of its oldest entry by SeqNo.
pub(crate) fn rollup_key(shard_id: ShardId, seqno: SeqNo) -> String {
    format!("{shard_id}/rollup/{:020}", seqno.0)
}

/// How many consensus entries one scan asks for.
const SCAN_PAGE: usize = 4096;

/// Every entry of `key` from `from` on, retrying external failures.
async fn scan_from(
    consensus: &dyn Consensus,
    cfg: &DynamicConfig,
    shard_id: ShardId,
    from: SeqNo,
) -> Vec<VersionedData> {
    let key = shard_id.to_string();
    let mut backoff = Backoff::new(&cfg.get());
    let mut entries: Vec<VersionedData> = Vec::new();
    let mut next = from;
    loop {
        match consensus.scan(&key, next, SCAN_PAGE).await {
            Ok(page) => {
                let full = page.len() == SCAN_PAGE;
                if let Some(last) = page.last() {
                    next = last.seqno.next();
                }
                entries.extend(page);
                if !full {
                    return entries;
                }
            }
            Err(err) => backoff.wait("read state log", shard_id, &err).await,
        }
    }
}

/// Applies the consensus entry `entry` to `state`, its predecessor.
pub(crate) fn apply_entry<T: Timestamp + Lattice + Codec64>(
    shard_id: ShardId,
    state: &mut State<T>,
    entry: &VersionedData,
) -> Result<(), MachineError> {
    let corrupt = |reason: String| MachineError::Decode {
        shard: shard_id,
        source: StateDecodeError::Corrupt(reason),
    };
    match decode_entry::<T>(shard_id, &entry.data).map_err(|source| MachineError::Decode {
        shard: shard_id,
        source,
    })? {
        Entry::Full(whole) => *state = whole,
        Entry::Diff(diff) => diff
            .apply(state)
            .map_err(|reason| corrupt(format!("entry {}: {reason}", entry.seqno)))?,
    }
    if state.seqno != entry.seqno {
        return Err(corrupt(format!(
            "entry at {} holds state {}",
            entry.seqno, state.seqno
        )));
    }
    validate_state(state).map_err(|source| MachineError::Decode {
        shard: shard_id,
        source,
    })
}

/// Reads the latest state of a shard from the newest rollup in blob and
/// the diffs after it, so that opening costs one rollup and fewer than
/// `rollup_interval` diffs however far garbage collection lags behind.
/// `None` if there is no rollup or the log no longer follows on from it
/// (the caller then reads the log from its oldest entry).
async fn read_from_newest_rollup<T: Timestamp + Lattice + Codec64>(
    consensus: &dyn Consensus,
    blob: &dyn Blob,
    cfg: &DynamicConfig,
    shard_id: ShardId,
) -> Result<Option<State<T>>, MachineError> {
    let prefix = format!("{shard_id}/rollup/");
    let mut backoff = Backoff::new(&cfg.get());
    let mut newest: Option<SeqNo> = None;
    loop {
        let mut found = None;
        let listed = blob
            .list_keys_and_metadata(&prefix, &mut |m| {
                let seqno = m.key.strip_prefix(&prefix).and_then(|s| s.parse().ok());
                found = found.max(seqno.map(SeqNo));
            })
            .await;
        match listed {
            Ok(()) => {
                newest = newest.max(found);
                break;
            }
            Err(err) => backoff.wait("list rollups", shard_id, &err).await,
        }
    }
    let Some(seqno) = newest else {
        return Ok(None);
    };
    // Collected meanwhile: read the log instead.
    let Some(mut state) = fetch_rollup::<T>(blob, cfg, shard_id, seqno).await? else {
        return Ok(None);
    };
    let entries = scan_from(consensus, cfg, shard_id, seqno.next()).await;
    if entries.first().is_some_and(|e| e.seqno != seqno.next()) {
        return Ok(None);
    }
    for entry in &entries {
        apply_entry(shard_id, &mut state, entry)?;
    }
    Ok(Some(state))
}

/// The state of the rollup of `seqno`, or `None` if it is not in blob
/// (garbage collection deleted it). Retries external failures.
pub(crate) async fn fetch_rollup<T: Timestamp + Lattice + Codec64>(
    blob: &dyn Blob,
    cfg: &DynamicConfig,
    shard_id: ShardId,
    seqno: SeqNo,
) -> Result<Option<State<T>>, MachineError> {
    let mut backoff = Backoff::new(&cfg.get());
    let bytes = loop {
        match blob.get(&rollup_key(shard_id, seqno)).await {
            Ok(bytes) => break bytes,
            Err(err) => backoff.wait("read rollup", shard_id, &err).await,
        }
    };
    let Some(bytes) = bytes else { return Ok(None) };
    let decode_err = |source| MachineError::Decode {
        shard: shard_id,
        source,
    };
    let state = decode_state::<T>(shard_id, &bytes).map_err(decode_err)?;
    if state.seqno != seqno {
        return Err(decode_err(StateDecodeError::Corrupt(format!(
            "rollup {seqno} holds state {}",
            state.seqno
        ))));
    }
    Ok(Some(state))
}

/// The state at the log's oldest live entry `first`: the entry itself if
/// it is whole, else the rollup of its SeqNo (`None` if that is gone).
pub(crate) async fn state_at_oldest<T: Timestamp + Lattice + Codec64>(
    blob: &dyn Blob,
    cfg: &DynamicConfig,
    shard_id: ShardId,
    first: &VersionedData,
) -> Result<Option<State<T>>, MachineError> {
    let decode_err = |source| MachineError::Decode {
        shard: shard_id,
        source,
    };
    let state = match decode_entry::<T>(shard_id, &first.data).map_err(decode_err)? {
        Entry::Full(state) => state,
        Entry::Diff(_) => return fetch_rollup(blob, cfg, shard_id, first.seqno).await,
    };
    if state.seqno != first.seqno {
        return Err(decode_err(StateDecodeError::Corrupt(format!(
            "entry at {} holds state {}",
            first.seqno, state.seqno
        ))));
    }
    Ok(Some(state))
}

/// How often opening a shard re-reads its log when the rollup its oldest
/// entry needs has vanished (garbage collection moved on meanwhile).
const OPEN_ATTEMPTS: usize = 8;

/// Reads the latest state of a shard from its log: the oldest live entry
/// (whole, or a diff whose state is rolled up in blob) and every diff after
/// it. `None` if the shard does not exist. Retries external failures.
pub(crate) async fn read_state<T: Timestamp + Lattice + Codec64>(
    consensus: &dyn Consensus,
    blob: &dyn Blob,
    cfg: &DynamicConfig,
    shard_id: ShardId,
) -> Result<Option<State<T>>, MachineError> {
    if let Some(state) = read_from_newest_rollup::<T>(consensus, blob, cfg, shard_id).await? {
        return Ok(Some(state));
    }
    for _ in 0..OPEN_ATTEMPTS {
        let entries = scan_from(consensus, cfg, shard_id, SeqNo::minimum()).await;
        let Some(first) = entries.first() else {
            return Ok(None);
        };
        // Truncated meanwhile (the rollup is gone): read the log again.
        let Some(mut state) = state_at_oldest::<T>(blob, cfg, shard_id, first).await? else {
            continue;
        };
        for entry in &entries[1..] {
            apply_entry(shard_id, &mut state, entry)?;
        }
        return Ok(Some(state));
    }
    Err(MachineError::Inconsistent {
        shard: shard_id,
        reason: "the rollup of the oldest state in consensus is missing from blob".to_owned(),
    })
}

/// Milliseconds since the Unix epoch by the wall clock.
pub(crate) fn now_ms() -> u64 {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    u64::try_from(since_epoch.as_millis()).unwrap_or(u64::MAX)
}

impl<T: Timestamp + Lattice + Codec64 + Sync> Machine<T> {
    /// Opens the shard, creating it with `codecs` if it does not exist, and
    /// checks that it was created with `codecs`. Shares the cached state of
    /// the shard if this process has it open already. Retries external
    /// failures.
    pub async fn open(
        cfg: DynamicConfig,
        consensus: Arc<dyn Consensus>,
        blob: Arc<dyn Blob>,
        cache: &StateCache,
        shard_id: ShardId,
        codecs: Codecs,
    ) -> Result<Self, MachineError> {
        let mismatch = |actual: Codecs| {
            MachineError::CodecMismatch(Box::new(CodecMismatch {
                requested: codecs.clone(),
                actual,
            }))
        };
        let machine = |shared| Machine {
            shard_id,
            consensus: Arc::clone(&consensus),
            blob: Arc::clone(&blob),
            cfg: cfg.clone(),
            shared,
            metrics: None,
        };
        match cache.get::<SharedState<T>>(shard_id) {
            Cached::Live(shared) => {
                let actual = shared
                    .state
                    .read()
                    .unwrap_or_else(|p| p.into_inner())
                    .codecs
                    .clone();
                return if actual == codecs {
                    Ok(machine(shared))
                } else {
                    Err(mismatch(actual))
                };
            }
            Cached::OtherType(actual) => return Err(mismatch(actual)),
            Cached::Missing => {}
        }
        let key = shard_id.to_string();
        let mut backoff = Backoff::new(&cfg.get());
        let state = loop {
            let existing = read_state::<T>(&*consensus, &*blob, &cfg, shard_id)
                .await
                .map_err(|err| match err {
                    MachineError::Decode {
                        source: StateDecodeError::TimeCodecMismatch { actual },
                        ..
                    } => mismatch(actual),
                    other => other,
                })?;
            if let Some(state) = existing {
                break state;
            }
            let initial = State::new(shard_id, codecs.clone(), now_ms());
            let entry = VersionedData {
                seqno: initial.seqno,
                data: encode_state(&initial),
            };
            match consensus.compare_and_set(&key, None, entry).await {
                Ok(CaSResult::Committed) => break initial,
                // Someone else created it first (or our create landed after
                // an indeterminate error): read what is there.
                Ok(CaSResult::ExpectationMismatch(_)) => continue,
                Err(err) => backoff.wait("create shard", shard_id, &err).await,
            }
        };
        if state.codecs != codecs {
            return Err(mismatch(state.codecs));
        }
        let (seqno, _) = watch::channel(state.seqno);
        let fresh = Arc::new(SharedState {
            state: RwLock::new(Arc::new(state)),
            seqno,
            busy: Default::default(),
        });
        match cache.insert_or_get(shard_id, &codecs, fresh) {
            Cached::Live(shared) => Ok(machine(shared)),
            Cached::OtherType(actual) => Err(mismatch(actual)),
            Cached::Missing => unreachable!("insert_or_get always caches"),
        }
    }

    /// The configuration the machine was opened with.
    pub fn cfg(&self) -> PersistConfig {
        self.cfg.get()
    }

    /// The live configuration the machine reads its knobs from.
    pub fn dyn_cfg(&self) -> &DynamicConfig {
        &self.cfg
    }

    /// The latest state this process has seen (possibly stale).
    pub fn cached(&self) -> Arc<State<T>> {
        Arc::clone(&self.shared.state.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// A receiver that changes whenever this process sees a newer state.
    pub fn watch(&self) -> watch::Receiver<SeqNo> {
        self.shared.seqno.subscribe()
    }

    /// Caches `state` if it is newer than what is cached.
    /// The metrics this machine reports to, if any.
    pub fn metrics(&self) -> Option<Arc<Metrics>> {
        self.metrics.clone()
    }

    /// Reports this machine's states to `metrics` (state size, handles).
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Records a state whose consensus entry has `size` bytes in the
    /// metrics.
    fn observe(&self, state: &State<T>, size: usize) {
        let Some(metrics) = &self.metrics else { return };
        let shard = self.shard_id.to_string();
        metrics
            .state_entry_bytes
            .with_label_values(&[shard.as_str()])
            .set(i64::try_from(size).unwrap_or(i64::MAX));
        metrics
            .batches
            .with_label_values(&[shard.as_str()])
            .set(i64::try_from(state.batches.len()).unwrap_or(i64::MAX));
        for (kind, count) in [
            ("writer", state.writers.len()),
            ("leased_reader", state.leased_readers.len()),
            ("critical_reader", state.critical_readers.len()),
        ] {
            metrics
                .handles
                .with_label_values(&[shard.as_str(), kind])
                .set(i64::try_from(count).unwrap_or(i64::MAX));
        }
    }

    fn cache(&self, state: State<T>) {
        let mut cached = self.shared.state.write().unwrap_or_else(|p| p.into_inner());
        if state.seqno > cached.seqno {
            let seqno = state.seqno;
            *cached = Arc::new(state);
            self.shared.seqno.send_replace(seqno);
        }
    }

    /// Reads the states after the cached one from consensus (retrying
    /// external failures), caches the latest, and returns it.
    #[tracing::instrument(level = "trace", skip_all, fields(shard = %self.shard_id))]
    pub async fn fetch_latest(&self) -> Result<Arc<State<T>>, MachineError> {
        let cached = self.cached();
        let entries = scan_from(
            &*self.consensus,
            &self.cfg,
            self.shard_id,
            cached.seqno.next(),
        )
        .await;
        let Some(first) = entries.first() else {
            // Nothing newer. (Shards are never removed from consensus.)
            return Ok(cached);
        };
        let state = if first.seqno == cached.seqno.next() {
            let mut state = State::clone(&cached);
            for entry in &entries {
                apply_entry(self.shard_id, &mut state, entry)?;
            }
            state
        } else {
            // The log was truncated past the cached state: start over from
            // the oldest live entry.
            read_state::<T>(&*self.consensus, &*self.blob, &self.cfg, self.shard_id)
                .await?
                .ok_or_else(|| MachineError::Inconsistent {
                    shard: self.shard_id,
                    reason: "the shard's log vanished".to_owned(),
                })?
        };
        if let Some(last) = entries.last() {
            self.observe(&state, last.data.len());
        }
        self.cache(state);
        Ok(self.cached())
    }

    /// Caches the state at `head`, the latest entry: by applying it to the
    /// cached state when it is the very next one (no read needed), by
    /// reading the entries in between otherwise.
    async fn catch_up(&self, head: &VersionedData) -> Result<(), MachineError> {
        let cached = self.cached();
        if head.seqno == cached.seqno.next() {
            let mut state = State::clone(&cached);
            apply_entry(self.shard_id, &mut state, head)?;
            self.observe(&state, head.data.len());
            self.cache(state);
            return Ok(());
        }
        self.fetch_latest().await.map(|_| ())
    }

    /// Waits until this process sees a state newer than `seen`: written by
    /// a handle in this process (noticed at once) or found by polling
    /// consensus, at intervals from `poll` doubling up to the configured
    /// maximum. Cancel-safe: dropping the future only stops waiting.
    pub async fn wait_for_newer(&self, seen: SeqNo) -> Result<Arc<State<T>>, MachineError> {
        let mut watch = self.watch();
        let mut poll = Duration::from_millis(1);
        loop {
            let latest = self.cached();
            if latest.seqno > seen {
                return Ok(latest);
            }
            tokio::select! {
                _ = watch.changed() => {}
                _ = tokio::time::sleep(poll) => {
                    poll = (poll * 2).min(self.cfg.get().listen_poll_max);
                    self.fetch_latest().await?;
                }
            }
        }
    }

    /// The batches a read at `as_of` needs, with the state they come from.
    /// Waits (cancel-safely) until the shard's upper is beyond `as_of`;
    /// fails with the since if `as_of` is not at or beyond it.
    pub async fn snapshot(
        &self,
        as_of: &Antichain<T>,
    ) -> Result<Result<(Arc<State<T>>, Vec<HollowBatch<T>>), Antichain<T>>, MachineError> {
        let mut state = self.cached();
        loop {
            match state.snapshot(as_of) {
                Ok(batches) => return Ok(Ok((state, batches))),
                Err(SnapshotError::SinceBeyondAsOf(since)) => return Ok(Err(since)),
                Err(SnapshotError::NotYetAvailable) => {
                    state = self.wait_for_newer(state.seqno).await?;
                }
            }
        }
    }

    /// Applies `transition` to the latest state and commits the result as
    /// the next state, re-applying it to newer states after conflicts, and
    /// retrying external failures with backoff.
    ///
    /// `transition` receives a copy of the latest state and the wall clock,
    /// and may be called several times: it must be deterministic in its
    /// inputs and safe to re-apply to a state that already contains its own
    /// effect (an indeterminate write may have committed).
    #[tracing::instrument(level = "debug", skip_all, fields(shard = %self.shard_id))]
    pub async fn apply<R>(
        &self,
        mut transition: impl FnMut(&mut State<T>, u64) -> Transition<R>,
    ) -> Result<(SeqNo, R), MachineError> {
        let key = self.shard_id.to_string();
        let mut backoff = Backoff::new(&self.cfg.get());
        let mut refreshed = false;
        loop {
            let current = self.cached();
            let now = now_ms();
            let mut next = State::clone(&current);
            next.seqno = current.seqno.next();
            next.walltime_ms = now;
            let result = match transition(&mut next, now) {
                Transition::Skip(result) => return Ok((current.seqno, result)),
                Transition::Refuse(result) => {
                    if refreshed || self.fetch_latest().await?.seqno == current.seqno {
                        return Ok((current.seqno, result));
                    }
                    // The refusal may have been decided on stale state.
                    refreshed = true;
                    continue;
                }
                Transition::Write(result) => result,
            };
            let data = encode_diff(
                self.shard_id,
                &next.codecs,
                &StateDiff::between(&current, &next),
            );
            match self
                .write_entry(&key, current.seqno, next.seqno, data.clone(), &mut backoff)
                .await?
            {
                Written::Committed => {
                    let seqno = next.seqno;
                    self.observe(&next, data.len());
                    self.committed(next);
                    return Ok((seqno, result));
                }
                Written::Mismatch(Some(head)) if head.seqno > current.seqno => {
                    self.catch_up(&head).await?;
                }
                Written::Mismatch(head) => {
                    // Heads never move backward or vanish: retrying would
                    // spin forever.
                    let reason = format!(
                        "expected head {} but consensus has {:?}",
                        current.seqno,
                        head.map(|h| h.seqno)
                    );
                    return Err(MachineError::Inconsistent {
                        shard: self.shard_id,
                        reason,
                    });
                }
                Written::Failed => {
                    self.fetch_latest().await?;
                }
            }
        }
    }

    /// Writes `data` as entry `seqno` of the log at `key` if the head is
    /// `expected`. After an external failure (waited out with `backoff`),
    /// an indeterminate one is resolved by reading the log: the write
    /// either landed (`Committed`) or did not (`Failed`, to retry from a
    /// fresh state).
    async fn write_entry(
        &self,
        key: &str,
        expected: SeqNo,
        seqno: SeqNo,
        data: Bytes,
        backoff: &mut Backoff,
    ) -> Result<Written, MachineError> {
        let entry = VersionedData {
            seqno,
            data: data.clone(),
        };
        match self
            .consensus
            .compare_and_set(key, Some(expected), entry)
            .await
        {
            Ok(CaSResult::Committed) => Ok(Written::Committed),
            Ok(CaSResult::ExpectationMismatch(head)) => Ok(Written::Mismatch(head)),
            Err(err) => {
                backoff.wait("write state", self.shard_id, &err).await;
                if !err.is_determinate() && self.head_is(key, &seqno, &data).await? {
                    Ok(Written::Committed)
                } else {
                    Ok(Written::Failed)
                }
            }
        }
    }

    /// Caches a state this machine committed and starts the background
    /// work it calls for (a rollup, then garbage collection).
    fn committed(&self, state: State<T>) {
        let state = Arc::new(state);
        {
            let mut cached = self.shared.state.write().unwrap_or_else(|p| p.into_inner());
            if state.seqno > cached.seqno {
                *cached = Arc::clone(&state);
                self.shared.seqno.send_replace(state.seqno);
            }
        }
        crate::internal::maintenance::after_commit(self, &state);
    }

    /// Writes the current state whole as the next entry and truncates the
    /// log below it, so that reading the shard needs no rollup (a finalized
    /// shard's blobs, rollups included, are all deleted). Retries external
    /// failures.
    pub async fn checkpoint(&self) -> Result<SeqNo, MachineError> {
        let key = self.shard_id.to_string();
        let mut backoff = Backoff::new(&self.cfg.get());
        let seqno = loop {
            let current = self.fetch_latest().await?;
            let mut next = State::clone(&current);
            next.seqno = current.seqno.next();
            next.walltime_ms = now_ms();
            let data = encode_state(&next);
            match self
                .write_entry(&key, current.seqno, next.seqno, data, &mut backoff)
                .await?
            {
                Written::Committed => {
                    let seqno = next.seqno;
                    self.cache(next);
                    break seqno;
                }
                Written::Mismatch(_) | Written::Failed => continue,
            }
        };
        self.truncate(seqno).await;
        Ok(seqno)
    }

    /// Removes the log's entries below `seqno` (retrying external failures;
    /// entries already gone are fine).
    pub async fn truncate(&self, seqno: SeqNo) {
        let key = self.shard_id.to_string();
        let mut backoff = Backoff::new(&self.cfg.get());
        loop {
            match self.consensus.truncate(&key, seqno).await {
                Ok(_) => return,
                Err(err) => {
                    backoff
                        .wait("truncate state log", self.shard_id, &err)
                        .await
                }
            }
        }
    }

    /// Every entry of the log from `from` on.
    pub async fn scan_from(&self, from: SeqNo) -> Vec<VersionedData> {
        scan_from(&*self.consensus, &self.cfg, self.shard_id, from).await
    }

    /// Whether consensus holds exactly `data` at `seqno` (retrying external
    /// failures).
    async fn head_is(&self, key: &str, seqno: &SeqNo, data: &[u8]) -> Result<bool, MachineError> {
        let mut backoff = Backoff::new(&self.cfg.get());
        loop {
            match self.consensus.scan(key, *seqno, 1).await {
                Ok(entries) => {
                    return Ok(entries
                        .first()
                        .is_some_and(|e| e.seqno == *seqno && e.data == data));
                }
                Err(err) => backoff.wait("read state", self.shard_id, &err).await,
            }
        }
    }
}

/// How [`Machine::write_entry`] ended.
enum Written {
    /// The entry is in the log.
    Committed,
    /// The head was not the expected one; it is this.
    Mismatch(Option<VersionedData>),
    /// An external failure, and the entry was not in the log when checked
    /// (an indeterminate write may still land later; transitions are safe
    /// to apply twice).
    Failed,
}

/// Exponential backoff between retries of external failures.
#[derive(Debug)]
pub(crate) struct Backoff {
    next: Duration,
    max: Duration,
    attempts: u64,
}

impl Backoff {
    pub fn new(cfg: &PersistConfig) -> Self {
        Backoff {
            next: cfg.initial_retry_backoff,
            max: cfg.max_retry_backoff,
            attempts: 0,
        }
    }

    /// Logs `err` and sleeps before the next attempt.
    pub async fn wait(&mut self, what: &str, shard: ShardId, err: &ExternalError) {
        self.attempts += 1;
        if self.attempts >= 3 {
            tracing::warn!(%shard, attempts = self.attempts, error = %err, "{what} failed; retrying");
        } else {
            tracing::debug!(%shard, attempts = self.attempts, error = %err, "{what} failed; retrying");
        }
        tokio::time::sleep(self.next).await;
        self.next = (self.next * 2).min(self.max);
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use persist::mem::MemConsensus;
    use persist::unreliable::{UnreliableConsensus, UnreliableHandle};
    use timely::progress::Antichain;

    use super::*;
    use crate::ids::{IdempotencyToken, LeasedReaderId, WriterId};
    use crate::internal::state::tests::codecs;
    use crate::internal::state::{CompareAndAppendBreak, HollowBatch};

    fn mem_blob() -> Arc<dyn Blob> {
        Arc::new(persist::mem::MemBlob::new())
    }

    fn cfg() -> DynamicConfig {
        DynamicConfig::new(PersistConfig {
            initial_retry_backoff: Duration::from_millis(1),
            // Short, so that a machine retrying failures does not fall so
            // far behind a busy writer that catching up dominates the test.
            max_retry_backoff: Duration::from_millis(4),
            ..PersistConfig::default()
        })
    }

    /// Opens `shard` as a new process would (with its own state cache).
    async fn open(consensus: &Arc<dyn Consensus>, shard: ShardId) -> Machine<u64> {
        Machine::open(
            cfg(),
            Arc::clone(consensus),
            mem_blob(),
            &StateCache::default(),
            shard,
            codecs(),
        )
        .await
        .unwrap()
    }

    /// Appends `[lower, upper)` with `token`, as a writer handle will.
    async fn append(
        m: &Machine<u64>,
        writer: WriterId,
        token: IdempotencyToken,
        lower: u64,
        upper: u64,
    ) -> Result<(), CompareAndAppendBreak<u64>> {
        let batch = HollowBatch::empty(Antichain::from_elem(lower), Antichain::from_elem(upper));
        let (_, result) = m
            .apply(
                |state, now| match state.compare_and_append(&batch, writer, token, now, 1000) {
                    Ok(()) => Transition::Write(Ok(())),
                    Err(CompareAndAppendBreak::AlreadyCommitted) => Transition::Skip(Ok(())),
                    Err(other) => Transition::Refuse(Err(other)),
                },
            )
            .await
            .unwrap();
        result
    }

    #[tokio::test]
    async fn open_creates_once_and_checks_codecs() {
        let consensus: Arc<dyn Consensus> = Arc::new(MemConsensus::new());
        let shard = ShardId::new();
        let a = open(&consensus, shard).await;
        let b = open(&consensus, shard).await;
        assert_eq!(
            a.cached(),
            b.cached(),
            "the second open finds the first's shard"
        );
        assert_eq!(
            consensus
                .scan(&shard.to_string(), SeqNo(0), 10)
                .await
                .unwrap()
                .len(),
            1
        );

        let mut wrong = codecs();
        wrong.key = "Vec<u8>".into();
        let cache = StateCache::default();
        let err = Machine::<u64>::open(
            cfg(),
            Arc::clone(&consensus),
            mem_blob(),
            &cache,
            shard,
            wrong.clone(),
        )
        .await
        .unwrap_err();
        match err {
            MachineError::CodecMismatch(m) => {
                assert_eq!(m.requested, wrong);
                assert_eq!(m.actual, codecs());
            }
            other => panic!("expected a codec mismatch, got {other}"),
        }
    }

    #[tokio::test]
    async fn handles_in_one_process_share_state() {
        let consensus: Arc<dyn Consensus> = Arc::new(MemConsensus::new());
        let cache = StateCache::default();
        let shard = ShardId::new();
        let a = Machine::<u64>::open(
            cfg(),
            Arc::clone(&consensus),
            mem_blob(),
            &cache,
            shard,
            codecs(),
        )
        .await
        .unwrap();
        let b = Machine::<u64>::open(
            cfg(),
            Arc::clone(&consensus),
            mem_blob(),
            &cache,
            shard,
            codecs(),
        )
        .await
        .unwrap();
        let reader = LeasedReaderId::new();
        a.apply(|s, now| Transition::Write(s.register_leased_reader(reader, "a", now, 1000)))
            .await
            .unwrap();
        // b sees a's write without reading consensus.
        assert!(b.cached().leased_readers.contains_key(&reader));
        // The same shard with another time type is a codec mismatch.
        let err = Machine::<i64>::open(
            cfg(),
            Arc::clone(&consensus),
            mem_blob(),
            &cache,
            shard,
            codecs(),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, MachineError::CodecMismatch(_)), "{err}");
    }

    #[tokio::test]
    async fn refusals_are_rechecked_against_the_latest_state() {
        let consensus: Arc<dyn Consensus> = Arc::new(MemConsensus::new());
        let shard = ShardId::new();
        let (p1, p2) = (open(&consensus, shard).await, open(&consensus, shard).await);
        append(&p2, WriterId::new(), IdempotencyToken::new(), 0, 3)
            .await
            .unwrap();
        // p1's cache still says upper 0: its append at 3 is refused by the
        // cached state, re-checked, and then goes through.
        assert_eq!(p1.cached().upper, Antichain::from_elem(0));
        append(&p1, WriterId::new(), IdempotencyToken::new(), 3, 5)
            .await
            .unwrap();
        assert_eq!(p1.cached().upper, Antichain::from_elem(5));
        // A refusal that still holds on the latest state is returned.
        let result = append(&p1, WriterId::new(), IdempotencyToken::new(), 9, 10).await;
        assert_eq!(
            result,
            Err(CompareAndAppendBreak::Upper(Antichain::from_elem(5)))
        );
    }

    #[tokio::test]
    async fn a_head_that_goes_backward_is_an_error_not_a_spin() {
        let (a, b): (Arc<dyn Consensus>, Arc<dyn Consensus>) =
            (Arc::new(MemConsensus::new()), Arc::new(MemConsensus::new()));
        let cache = StateCache::default();
        let shard = ShardId::new();
        let on_a = Machine::<u64>::open(cfg(), a, mem_blob(), &cache, shard, codecs())
            .await
            .unwrap();
        on_a.apply(|s, now| Transition::Write(s.register_writer(WriterId::new(), "w", now, 1)))
            .await
            .unwrap();
        // A cache shared with another location hands b's machine a's state.
        let on_b = Machine::<u64>::open(cfg(), b, mem_blob(), &cache, shard, codecs())
            .await
            .unwrap();
        let err = on_b
            .apply(|s, now| Transition::Write(s.register_writer(WriterId::new(), "w", now, 1)))
            .await
            .unwrap_err();
        assert!(matches!(err, MachineError::Inconsistent { .. }), "{err}");
    }

    #[tokio::test]
    async fn conflicting_transitions_are_reapplied_to_newer_state() {
        let consensus: Arc<dyn Consensus> = Arc::new(MemConsensus::new());
        let shard = ShardId::new();
        // Two "processes": separate machines with separate caches.
        let (a, b) = (open(&consensus, shard).await, open(&consensus, shard).await);
        let (ra, rb) = (LeasedReaderId::new(), LeasedReaderId::new());
        a.apply(|s, now| Transition::Write(s.register_leased_reader(ra, "a", now, 1000)))
            .await
            .unwrap();
        // b's cache is stale: its first attempt conflicts, then it re-applies.
        let (seqno, _) = b
            .apply(|s, now| Transition::Write(s.register_leased_reader(rb, "b", now, 1000)))
            .await
            .unwrap();
        assert_eq!(seqno, SeqNo(2));
        let latest = a.fetch_latest().await.unwrap();
        assert!(latest.leased_readers.contains_key(&ra) && latest.leased_readers.contains_key(&rb));
        assert_eq!(
            *a.watch().borrow(),
            SeqNo(2),
            "the watch follows what this process sees"
        );
    }

    #[tokio::test]
    async fn appends_under_indeterminate_failures_apply_exactly_once() {
        let inner = MemConsensus::new();
        let handle = UnreliableHandle::new(5, 0.7, 0.4);
        let consensus: Arc<dyn Consensus> = Arc::new(UnreliableConsensus::new(
            Arc::new(inner.clone()),
            handle.clone(),
        ));
        let shard = ShardId::new();
        let m = open(&consensus, shard).await;
        // Another process keeps changing the state, so that after a write
        // whose outcome is unknown the head is usually someone else's and
        // only the idempotency token can tell that the append landed.
        let reliable: Arc<dyn Consensus> = Arc::new(inner.clone());
        let other = open(&reliable, shard).await;
        let busy = tokio::spawn(async move {
            let reader = LeasedReaderId::new();
            loop {
                other
                    .apply(|s, now| {
                        Transition::Write(s.register_leased_reader(reader, "busy", now, 1000))
                    })
                    .await
                    .unwrap();
                tokio::task::yield_now().await;
            }
        });
        let writer = WriterId::new();
        for i in 0..150u64 {
            // The machine retries each failed write with the same token; an
            // upper mismatch here would mean an append was applied twice
            // (the upper moved past `i`) or lost.
            let result = append(&m, writer, IdempotencyToken::new(), i, i + 1).await;
            assert_eq!(result, Ok(()), "append {i}");
        }
        busy.abort();
        let stats = handle.stats();
        assert!(
            stats.indeterminate > 0 && stats.lost_requests > 0 && stats.determinate > 0,
            "{stats:?}"
        );
        handle.totally_available();
        let latest = m.fetch_latest().await.unwrap();
        assert_eq!(latest.upper, Antichain::from_elem(150));
        // Every committed entry decodes and the log has no gaps.
        let log = inner
            .scan(&shard.to_string(), SeqNo(0), usize::MAX)
            .await
            .unwrap();
        for (i, entry) in log.iter().enumerate() {
            assert_eq!(entry.seqno, SeqNo(i as u64));
            decode_entry::<u64>(shard, &entry.data).unwrap();
        }
    }

    #[tokio::test]
    async fn corrupt_state_is_an_error_not_a_panic() {
        let consensus: Arc<dyn Consensus> = Arc::new(MemConsensus::new());
        let shard = ShardId::new();
        let garbage = VersionedData {
            seqno: SeqNo(0),
            data: Bytes::from_static(b"\xff\xff\xff not state"),
        };
        consensus
            .compare_and_set(&shard.to_string(), None, garbage)
            .await
            .unwrap();
        let err = Machine::<u64>::open(
            cfg(),
            consensus,
            mem_blob(),
            &StateCache::default(),
            shard,
            codecs(),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, MachineError::Decode { .. }), "{err}");
        assert!(err.to_string().contains(&shard.to_string()), "{err}");
    }
}
