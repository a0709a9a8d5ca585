//! Compaction: merging adjacent batches into one, with times advanced to
//! the shard's since and updates consolidated.
//!
//! The state's policy ([`State::compaction_request`]) picks the batches; this
//! module does the work and offers the result back to state, which takes it
//! only if the inputs are all still there. A compaction that lost a race
//! (another process merged the same batches first) deletes its output.
//!
//! Memory stays bounded whatever the batches' sizes: the merge streams
//! sorted runs part by part (holding one decoded part per run, and at most
//! `compaction_max_runs` runs at once) and writes output parts as they
//! fill up to the blob target size. A request with more runs than that is
//! merged in groups, each becoming one run of the output.

use std::marker::PhantomData;

use differential_dataflow::difference::Semigroup;
use differential_dataflow::lattice::Lattice;
use differential_dataflow::trace::Description;
use persist::part::DecodedPart;
use persist_types::Codec64;
use timely::progress::{Antichain, Timestamp};

use crate::batch::{PartWriter, UpdateArena};
use crate::error::{ClientError, ShardError};
use crate::fetch::PartReader;
use crate::internal::machine::{Machine, Transition};
use crate::internal::maintenance::Job;
use crate::internal::merge::{Row, consolidate_times};
use crate::internal::state::{CompactionOutcome, CompactionRequest, HollowBatch, HollowPart};

/// What [`compact_until_done`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CompactionStats {
    /// Merges whose output replaced their inputs in state.
    pub applied: usize,
    /// Merges whose inputs were replaced meanwhile (output deleted).
    pub superseded: usize,
}

/// Merges what the shard's compaction policy asks for, again and again,
/// until it asks for nothing (or `max_merges` merges were done). With
/// `full`, it then also collapses the batches behind the since (see
/// [`State::collapse_request`](crate::internal::state::State::collapse_request)),
/// a few times at most: each collapse merges groups of
/// `compaction_max_runs` runs into one, so a few rounds bring a batch down
/// to one run, and the bound keeps a since that moves under load from
/// asking forever.
pub(crate) async fn compact_until_done<T, D>(
    machine: &Machine<T>,
    reader: &PartReader,
    writer: &PartWriter<T>,
    max_merges: usize,
    full: bool,
) -> Result<CompactionStats, ShardError>
where
    T: Timestamp + Lattice + Codec64 + Sync,
    D: Semigroup + Codec64,
{
    let mut stats = CompactionStats::default();
    let mut collapses = if full { MAX_COLLAPSES } else { 0 };
    for _ in 0..max_merges {
        let state = machine.fetch_latest().await.map_err(|e| {
            let e: ClientError<T> = e.into();
            match e {
                ClientError::Shard(e) => e,
                other => ShardError::State {
                    shard: machine.shard_id(),
                    reason: other.to_string(),
                },
            }
        })?;
        let request = match state.compaction_request() {
            Some(request) => request,
            None if collapses > 0 => {
                collapses -= 1;
                match state.collapse_request() {
                    Some(request) => request,
                    None => break,
                }
            }
            None => break,
        };
        match compact_one::<T, D>(machine, reader, writer, &request).await? {
            CompactionOutcome::Applied | CompactionOutcome::AlreadyApplied => stats.applied += 1,
            CompactionOutcome::Superseded => stats.superseded += 1,
        }
    }
    Ok(stats)
}

/// How many collapses one full compaction does at most: each merges
/// groups of `compaction_max_runs` runs (at least 2) into one, so 8 rounds
/// bring at least `2^8` runs down to one; a batch with more keeps a few
/// runs until the next call.
const MAX_COLLAPSES: usize = 8;

/// Starts compacting in the background if the policy asks for a merge and
/// no compaction of the shard is running in this process.
pub(crate) fn spawn_if_needed<T, D>(
    machine: &Machine<T>,
    reader: &PartReader,
    writer: &PartWriter<T>,
) where
    T: Timestamp + Lattice + Codec64 + Sync,
    D: Semigroup + Codec64 + Send + Sync + 'static,
{
    if !machine.cfg().compaction_enabled || machine.cached().compaction_request().is_none() {
        return;
    }
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let Some(guard) = machine.busy_arc().try_start(Job::Compaction) else {
        return;
    };
    let (machine, reader, writer) = (machine.clone(), reader.clone(), writer.clone());
    runtime.spawn(async move {
        let _guard = guard;
        if let Err(err) = compact_until_done::<T, D>(&machine, &reader, &writer, 64, false).await {
            tracing::warn!(shard = %machine.shard_id(), %err, "background compaction failed");
        }
    });
}

/// Merges one request's batches and offers the result to state.
#[tracing::instrument(level = "debug", skip_all, fields(shard = %machine.shard_id(), batches = request.inputs.len()))]
async fn compact_one<T, D>(
    machine: &Machine<T>,
    reader: &PartReader,
    writer: &PartWriter<T>,
    request: &CompactionRequest<T>,
) -> Result<CompactionOutcome, ShardError>
where
    T: Timestamp + Lattice + Codec64 + Sync,
    D: Semigroup + Codec64,
{
    let metrics = machine.metrics();
    let output =
        match merge::<T, D>(request, reader, writer, machine.cfg().compaction_max_runs).await {
            Ok(output) => output,
            Err(err) => {
                if let Some(m) = &metrics {
                    m.compactions.with_label_values(&["failed"]).inc();
                }
                return Err(err);
            }
        };
    let applied = machine
        .apply(
            |state, _| match state.apply_compaction(&request.inputs, output.clone()) {
                CompactionOutcome::Applied => Transition::Write(CompactionOutcome::Applied),
                CompactionOutcome::AlreadyApplied => {
                    Transition::Skip(CompactionOutcome::AlreadyApplied)
                }
                CompactionOutcome::Superseded => Transition::Refuse(CompactionOutcome::Superseded),
            },
        )
        .await;
    let outcome = match applied {
        Ok((_, outcome)) => outcome,
        Err(err) => {
            // Whether the output made it into state is unknown: leave it
            // (a leak at worst, never a dangling reference).
            let err: ClientError<T> = err.into();
            return Err(ShardError::State {
                shard: machine.shard_id(),
                reason: err.to_string(),
            });
        }
    };
    if outcome == CompactionOutcome::Superseded {
        writer.delete_parts(&output.parts).await;
    }
    if let Some(m) = &metrics {
        let label = match outcome {
            CompactionOutcome::Superseded => "superseded",
            _ => "applied",
        };
        m.compactions.with_label_values(&[label]).inc();
        let read: u64 = request
            .inputs
            .iter()
            .flat_map(|b| &b.parts)
            .map(|p| p.encoded_size_bytes)
            .sum();
        let written: u64 = output.parts.iter().map(|p| p.encoded_size_bytes).sum();
        m.compaction_bytes.with_label_values(&["read"]).inc_by(read);
        m.compaction_bytes
            .with_label_values(&["written"])
            .inc_by(written);
    }
    tracing::debug!(shard = %machine.shard_id(), ?outcome, parts = output.parts.len(), "compacted");
    Ok(outcome)
}

/// Merges the request's batches into one batch spanning them, written to
/// blob. On failure, the parts written so far are deleted.
pub(crate) async fn merge<T, D>(
    request: &CompactionRequest<T>,
    reader: &PartReader,
    writer: &PartWriter<T>,
    max_runs: usize,
) -> Result<HollowBatch<T>, ShardError>
where
    T: Timestamp + Lattice + Codec64 + Sync,
    D: Semigroup + Codec64,
{
    let (Some(first), Some(last)) = (request.inputs.first(), request.inputs.last()) else {
        return Err(ShardError::State {
            shard: reader.shard_id,
            reason: "a compaction without inputs".to_owned(),
        });
    };
    let runs: Vec<(&[HollowPart], &Antichain<T>)> = request
        .inputs
        .iter()
        .flat_map(|b| b.runs().into_iter().map(move |run| (run, b.desc.lower())))
        .collect();
    let mut parts = Vec::new();
    let mut run_lens = Vec::new();
    for group in runs.chunks(max_runs.max(2)) {
        match merge_runs::<T, D>(group, &request.since, reader, writer).await {
            Ok(run) => {
                if !run.is_empty() {
                    run_lens.push(run.len());
                    parts.extend(run);
                }
            }
            Err(err) => {
                writer.delete_parts(&parts).await;
                return Err(err);
            }
        }
    }
    let len = parts.iter().map(|p| p.len).sum();
    Ok(HollowBatch {
        desc: Description::new(
            first.desc.lower().clone(),
            last.desc.upper().clone(),
            request.since.clone(),
        ),
        parts,
        len,
        runs: run_lens,
    })
}

/// A position in one sorted run: the decoded part being read and the
/// parts after it.
struct RunCursor<'a, T> {
    parts: &'a [HollowPart],
    /// Updates of the run's batch before this lower are not the batch's.
    lower: &'a Antichain<T>,
    next_part: usize,
    current: Option<DecodedPart>,
    row: usize,
}

impl<T> RunCursor<'_, T> {
    /// Moves to the next part once the current one is used up.
    async fn fill(&mut self, reader: &PartReader) -> Result<(), ShardError> {
        loop {
            if self.current.as_ref().is_some_and(|p| self.row < p.len()) {
                return Ok(());
            }
            self.current = None;
            self.row = 0;
            let Some(part) = self.parts.get(self.next_part) else {
                return Ok(());
            };
            self.next_part += 1;
            self.current = Some(reader.fetch_decoded(part).await?);
        }
    }

    /// The update at the cursor, if the run is not used up.
    fn peek(&self) -> Option<Row<'_>> {
        self.current.as_ref().map(|p| p.get(self.row))
    }
}

/// Merges sorted runs into one sorted, consolidated run of parts.
async fn merge_runs<T, D>(
    runs: &[(&[HollowPart], &Antichain<T>)],
    since: &Antichain<T>,
    reader: &PartReader,
    writer: &PartWriter<T>,
) -> Result<Vec<HollowPart>, ShardError>
where
    T: Timestamp + Lattice + Codec64 + Sync,
    D: Semigroup + Codec64,
{
    let mut cursors: Vec<RunCursor<'_, T>> = runs
        .iter()
        .map(|(parts, lower)| RunCursor {
            parts,
            lower,
            next_part: 0,
            current: None,
            row: 0,
        })
        .collect();
    for cursor in &mut cursors {
        cursor.fill(reader).await?;
    }
    let mut out = RunWriter::<T, D>::new(writer);
    let mut group: Vec<(T, D)> = Vec::new();
    // The current key and val, copied out of the cursors (which move on
    // while the group is gathered) into buffers reused from group to group.
    let (mut key, mut val) = (Vec::new(), Vec::new());
    let result: Result<(), ShardError> = async {
        loop {
            let smallest = cursors
                .iter()
                .filter_map(|c| c.peek().map(|(k, v, _, _)| (k, v)))
                .min();
            let Some((k, v)) = smallest else { break };
            key.clear();
            key.extend_from_slice(k);
            val.clear();
            val.extend_from_slice(v);
            group.clear();
            for cursor in &mut cursors {
                while let Some((k, v, t, d)) = cursor.peek() {
                    if k != key.as_slice() || v != val.as_slice() {
                        break;
                    }
                    let mut t = T::decode(t);
                    if cursor.lower.less_equal(&t) {
                        t.advance_by(since.borrow());
                        group.push((t, D::decode(d)));
                    }
                    cursor.row += 1;
                    cursor.fill(reader).await?;
                }
            }
            consolidate_times(&mut group);
            for (t, d) in group.drain(..) {
                out.push(&key, &val, t, d).await?;
            }
        }
        out.flush().await
    }
    .await;
    match result {
        Ok(()) => Ok(out.parts),
        Err(err) => {
            writer.delete_parts(&out.parts).await;
            Err(err)
        }
    }
}

/// Writes a sorted stream of updates as parts of about the blob target
/// size.
struct RunWriter<'a, T, D> {
    writer: &'a PartWriter<T>,
    target_size: usize,
    buffer: UpdateArena<T, D>,
    /// The allocation the last part was encoded into, for the next one.
    output: Vec<u8>,
    parts: Vec<HollowPart>,
    _phantom: PhantomData<D>,
}

impl<'a, T, D> RunWriter<'a, T, D>
where
    T: Timestamp + Lattice + Codec64 + Sync,
    D: Semigroup + Codec64,
{
    fn new(writer: &'a PartWriter<T>) -> Self {
        RunWriter {
            writer,
            target_size: writer.cfg.get().blob_target_size.max(1),
            buffer: UpdateArena::default(),
            output: Vec::new(),
            parts: Vec::new(),
            _phantom: PhantomData,
        }
    }

    async fn push(&mut self, key: &[u8], val: &[u8], t: T, d: D) -> Result<(), ShardError> {
        self.buffer.push(key, val, t, d);
        if self.buffer.size() >= self.target_size {
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), ShardError> {
        let updates = self.buffer.borrowed();
        let written = self.writer.write_part(&updates, &mut self.output).await?;
        drop(updates);
        self.buffer.clear();
        self.parts.extend(written);
        Ok(())
    }
}
