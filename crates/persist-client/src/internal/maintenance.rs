//! Background upkeep of a shard's state: rollups and garbage collection.
//!
//! Every so many SeqNos the process that committed a state writes it whole
//! to blob (a *rollup*) and records it in state. Garbage collection then
//! truncates the consensus log to the newest rollup that no reader still
//! needs, and deletes the blobs that only the truncated states referenced:
//! parts replaced by compaction and older rollups.
//!
//! Both are idempotent and safe to run from several processes at once: a
//! rollup of a SeqNo has one deterministic key and content, deletes of
//! missing blobs succeed, and truncating twice changes nothing. GC deletes
//! blobs *before* truncating, so a crash in between leaves the log intact
//! for the next run to repeat the work.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use differential_dataflow::lattice::Lattice;
use persist::SeqNo;
use persist_types::Codec64;
use timely::progress::Timestamp;

use crate::internal::encoding::encode_state;
use crate::internal::machine::{
    Backoff, Machine, MachineError, Transition, rollup_key, state_at_oldest,
};
use crate::internal::state::State;

/// Flags for background work in flight on a shard in this process.
#[derive(Debug, Default)]
pub(crate) struct Busy {
    upkeep: AtomicBool,
    compaction: AtomicBool,
}

/// Which background job a [`BusyGuard`] holds.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Job {
    /// A rollup and the garbage collection after it.
    Upkeep,
    /// A compaction.
    Compaction,
}

impl Busy {
    fn flag(&self, job: Job) -> &AtomicBool {
        match job {
            Job::Upkeep => &self.upkeep,
            Job::Compaction => &self.compaction,
        }
    }

    /// Claims `job` unless it is already running in this process.
    pub fn try_start(self: &Arc<Self>, job: Job) -> Option<BusyGuard> {
        let claimed = self
            .flag(job)
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        claimed.then(|| BusyGuard {
            busy: Arc::clone(self),
            job,
        })
    }

    /// Whether any background job is running.
    pub fn any(&self) -> bool {
        self.upkeep.load(Ordering::Acquire) || self.compaction.load(Ordering::Acquire)
    }
}

/// Releases its job's flag when dropped (also when the task panics or is
/// cancelled).
#[derive(Debug)]
pub(crate) struct BusyGuard {
    busy: Arc<Busy>,
    job: Job,
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.busy.flag(self.job).store(false, Ordering::Release);
    }
}

/// What one garbage collection did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct GcReport {
    /// The log was truncated below this SeqNo (if it was).
    pub truncated_below: Option<SeqNo>,
    /// Part blobs deleted.
    pub parts_deleted: usize,
    /// Rollup blobs deleted.
    pub rollups_deleted: usize,
}

/// Starts a rollup (and garbage collection after it) in the background if
/// `state`, just committed, is far enough past the newest rollup.
pub(crate) fn after_commit<T>(machine: &Machine<T>, state: &Arc<State<T>>)
where
    T: Timestamp + Lattice + Codec64 + Sync,
{
    let interval = machine.cfg().rollup_interval.max(1);
    let newest = state
        .rollups
        .keys()
        .next_back()
        .copied()
        .unwrap_or(SeqNo(0));
    if state.is_tombstone() || state.seqno.0.saturating_sub(newest.0) < interval {
        return;
    }
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let Some(guard) = machine.busy_arc().try_start(Job::Upkeep) else {
        return;
    };
    let machine = machine.clone();
    let state = Arc::clone(state);
    runtime.spawn(async move {
        let _guard = guard;
        if let Err(err) = upkeep(&machine, &state).await {
            tracing::warn!(shard = %machine.shard_id(), %err, "state upkeep failed");
        }
    });
}

/// Writes a rollup of `state` and then collects garbage.
async fn upkeep<T>(machine: &Machine<T>, state: &State<T>) -> Result<(), MachineError>
where
    T: Timestamp + Lattice + Codec64 + Sync,
{
    write_rollup(machine, state).await?;
    let report = gc(machine).await?;
    if let Some(metrics) = machine.metrics() {
        metrics.gc_deleted_blobs.inc_by(
            u64::try_from(report.parts_deleted + report.rollups_deleted).unwrap_or(u64::MAX),
        );
        if report.truncated_below.is_some() {
            metrics.gc_runs.inc();
        }
    }
    Ok(())
}

/// Writes `state` whole to blob and records the rollup in the shard's
/// state (unless a newer one is recorded already).
pub(crate) async fn write_rollup<T>(
    machine: &Machine<T>,
    state: &State<T>,
) -> Result<(), MachineError>
where
    T: Timestamp + Lattice + Codec64 + Sync,
{
    if machine.cached().is_tombstone() {
        // A finalized shard's blobs are deleted: do not add one.
        return Ok(());
    }
    let key = rollup_key(machine.shard_id(), state.seqno);
    let bytes = encode_state(state);
    if let Some(metrics) = machine.metrics() {
        metrics.rollups.inc();
        metrics
            .state_bytes
            .with_label_values(&[machine.shard_id().to_string().as_str()])
            .set(i64::try_from(bytes.len()).unwrap_or(i64::MAX));
    }
    let mut backoff = Backoff::new(&machine.cfg());
    while let Err(err) = machine.blob().set(&key, bytes.clone()).await {
        backoff.wait("write rollup", machine.shard_id(), &err).await;
    }
    let seqno = state.seqno;
    machine
        .apply(|state, _| {
            let newest = state.rollups.keys().next_back().copied();
            if state.is_tombstone() || newest.is_some_and(|n| n >= seqno) {
                Transition::Skip(())
            } else {
                state.rollups.insert(seqno, key.clone());
                Transition::Write(())
            }
        })
        .await?;
    Ok(())
}

/// Truncates the shard's log to the newest rollup at or before the oldest
/// state a reader may still read, and deletes the blobs only truncated
/// states referenced. Retries external failures.
pub(crate) async fn gc<T>(machine: &Machine<T>) -> Result<GcReport, MachineError>
where
    T: Timestamp + Lattice + Codec64 + Sync,
{
    let shard = machine.shard_id();
    let latest = machine.fetch_latest().await?;
    let seqno_since = latest.seqno_since();
    let Some(target) = latest
        .rollups
        .range(..=seqno_since)
        .next_back()
        .map(|(s, _)| *s)
    else {
        return Ok(GcReport::default());
    };
    let mut report = GcReport::default();
    let entries = machine.scan_from(SeqNo::minimum()).await;
    let oldest = entries.first().map(|e| e.seqno);
    if oldest.is_some_and(|oldest| oldest < target) {
        let Some(first) = entries.first() else {
            return Ok(report);
        };
        // Another process collected this range already.
        let Some(mut state) =
            state_at_oldest::<T>(&**machine.blob(), machine.dyn_cfg(), shard, first).await?
        else {
            return Ok(report);
        };
        let mut seen_parts = BTreeSet::new();
        let mut seen_rollups = BTreeSet::new();
        for entry in &entries[1..] {
            seen_parts.extend(state.part_keys());
            seen_rollups.extend(state.rollups.iter().map(|(s, k)| (*s, k.clone())));
            crate::internal::machine::apply_entry(shard, &mut state, entry)?;
            if state.seqno == target {
                break;
            }
        }
        if state.seqno != target {
            return Ok(report);
        }
        seen_rollups.insert((first.seqno, rollup_key(shard, first.seqno)));
        let live = state.part_keys();
        for key in seen_parts.difference(&live) {
            delete(machine, key).await;
            report.parts_deleted += 1;
        }
        machine.truncate(target).await;
        report.truncated_below = Some(target);
        for (seqno, key) in &seen_rollups {
            if *seqno < target {
                delete(machine, key).await;
                report.rollups_deleted += 1;
            }
        }
    }
    // Forget rollups the log no longer needs (their blobs are gone).
    let stale: Vec<(SeqNo, String)> = latest
        .rollups
        .range(..target)
        .map(|(s, k)| (*s, k.clone()))
        .collect();
    if !stale.is_empty() {
        for (_, key) in &stale {
            delete(machine, key).await;
        }
        machine
            .apply(|state, _| {
                let before = state.rollups.len();
                state.rollups.retain(|seqno, _| *seqno >= target);
                if state.rollups.len() == before {
                    Transition::Skip(())
                } else {
                    Transition::Write(())
                }
            })
            .await?;
    }
    tracing::debug!(%shard, ?report, "collected garbage");
    Ok(report)
}

/// Deletes a blob no live state references, retrying external failures.
async fn delete<T>(machine: &Machine<T>, key: &str)
where
    T: Timestamp + Lattice + Codec64 + Sync,
{
    let mut backoff = Backoff::new(&machine.cfg());
    while let Err(err) = machine.blob().delete(key).await {
        backoff.wait("delete blob", machine.shard_id(), &err).await;
    }
}
