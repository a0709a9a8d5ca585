//! The state of a shard and its pure transitions.
//!
//! A [`State`] is a value: every change is a function from one state to the
//! next, with no I/O. The machine (see `machine.rs`) applies a transition to
//! the latest state and compare-and-sets the result into consensus at the
//! next [`SeqNo`]; on a conflict it re-applies the transition to the newer
//! state. Transitions therefore must be deterministic functions of the state
//! and their arguments (the wall clock is an argument).

use std::collections::BTreeMap;
use std::fmt::Debug;

use differential_dataflow::lattice::Lattice;
use differential_dataflow::trace::Description;
use persist::SeqNo;
use persist_types::{Codec64, ShardId};
use timely::PartialOrder;
use timely::progress::{Antichain, Timestamp};

use crate::error::Codecs;
use crate::ids::{CriticalReaderId, IdempotencyToken, LeasedReaderId, WriterId};

/// One immutable blob of sorted updates, as referenced from state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HollowPart {
    /// The blob key holding the part.
    pub key: String,
    /// The number of updates in the part.
    pub len: u64,
    /// The size of the blob in bytes.
    pub encoded_size_bytes: u64,
    /// A lower bound on the encoded keys in the part (bytewise).
    pub key_lower: Vec<u8>,
    /// An upper bound on the encoded keys in the part (bytewise); `None`
    /// if unbounded.
    pub key_upper: Option<Vec<u8>>,
    /// The meet (greatest lower bound) of the part's times, in their
    /// `Codec64` form: every time in the part is at or beyond it.
    pub ts_lower: [u8; 8],
    /// The join (least upper bound) of the part's times, in their `Codec64`
    /// form: every time in the part is at or before it.
    pub ts_upper: [u8; 8],
}

/// A batch of updates whose times lie in `[desc.lower, desc.upper)`, stored
/// as parts in blob. Updates in a part outside the description are ignored
/// by readers (an `append` may move a batch's lower forward).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HollowBatch<T> {
    /// The batch's bounds and since.
    pub desc: Description<T>,
    /// The parts holding the batch's updates.
    pub parts: Vec<HollowPart>,
    /// The number of updates in all parts.
    pub len: u64,
    /// How the parts group into sorted runs: the part counts of
    /// consecutive runs, whose updates are sorted across their parts (as
    /// compaction writes them). Empty means every part is a run of its own
    /// (as writers write them).
    pub runs: Vec<usize>,
}

impl<T: Timestamp> HollowBatch<T> {
    /// An empty batch covering `[lower, upper)`.
    pub fn empty(lower: Antichain<T>, upper: Antichain<T>) -> Self {
        HollowBatch {
            desc: Description::new(lower, upper, Antichain::from_elem(T::minimum())),
            parts: Vec::new(),
            len: 0,
            runs: Vec::new(),
        }
    }

    /// The batch's parts grouped into sorted runs.
    pub fn runs(&self) -> Vec<&[HollowPart]> {
        if self.runs.is_empty() || self.runs.iter().sum::<usize>() != self.parts.len() {
            return self.parts.chunks(1).collect();
        }
        let mut rest = self.parts.as_slice();
        self.runs
            .iter()
            .map(|&n| {
                let (run, tail) = rest.split_at(n);
                rest = tail;
                run
            })
            .filter(|run| !run.is_empty())
            .collect()
    }
}

/// What state remembers about a writer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct WriterState<T> {
    /// When the writer was last heard from (ms since the epoch).
    pub last_heartbeat_ms: u64,
    /// How long after its last heartbeat the writer may be expired.
    pub lease_duration_ms: u64,
    /// The token of the writer's latest committed append.
    pub most_recent_write_token: IdempotencyToken,
    /// The upper of the writer's latest committed append.
    pub most_recent_write_upper: Antichain<T>,
    /// Why the writer was opened (for humans).
    pub purpose: String,
}

/// What state remembers about a leased reader.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LeasedReaderState<T> {
    /// The reader's hold on the shard: reads at times not beyond it may be
    /// compacted away.
    pub since: Antichain<T>,
    /// The oldest state this reader may still read parts of (a SeqNo lease):
    /// nothing that state references is deleted until the reader moves on.
    pub seqno: SeqNo,
    /// When the reader was last heard from (ms since the epoch).
    pub last_heartbeat_ms: u64,
    /// How long after its last heartbeat the reader may be expired.
    pub lease_duration_ms: u64,
    /// Why the reader was opened (for humans).
    pub purpose: String,
}

/// What state remembers about a critical reader: a since hold that never
/// expires, fenced by an opaque token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CriticalReaderState<T> {
    /// The reader's hold on the shard.
    pub since: Antichain<T>,
    /// The current fencing token, in its `Codec64` encoding.
    pub opaque: [u8; 8],
    /// The codec of the token.
    pub opaque_codec: String,
    /// Why the reader was opened (for humans).
    pub purpose: String,
}

/// Everything persist knows about a shard at one [`SeqNo`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct State<T> {
    /// The shard.
    pub shard_id: ShardId,
    /// The position of this state in the shard's consensus log.
    pub seqno: SeqNo,
    /// When this state was written (ms since the epoch).
    pub walltime_ms: u64,
    /// The codecs the shard was created with.
    pub codecs: Codecs,
    /// Reads are only correct at times at or beyond this.
    pub since: Antichain<T>,
    /// The shard holds every update at times not at or beyond this.
    pub upper: Antichain<T>,
    /// Contiguous batches: the first starts at the minimum time, each starts
    /// where the previous ends, and the last ends at `upper`.
    pub batches: Vec<HollowBatch<T>>,
    /// Registered writers.
    pub writers: BTreeMap<WriterId, WriterState<T>>,
    /// Registered leased readers.
    pub leased_readers: BTreeMap<LeasedReaderId, LeasedReaderState<T>>,
    /// Registered critical readers.
    pub critical_readers: BTreeMap<CriticalReaderId, CriticalReaderState<T>>,
    /// Rollups in blob: the SeqNo of each state written whole to blob, and
    /// its key. Consensus is only ever truncated to one of these SeqNos.
    pub rollups: BTreeMap<SeqNo, String>,
}

/// Why [`State::compare_and_append`] did not append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CompareAndAppendBreak<T> {
    /// This writer already committed this append (a retry after an
    /// indeterminate error): nothing to do.
    AlreadyCommitted,
    /// The shard's upper is not the batch's lower.
    Upper(Antichain<T>),
    /// Some of the batch's parts were appended before, over another
    /// interval: the batch was already consumed.
    PartsAlreadyAppended,
}

/// Batches to merge into one, with times advanced to `since`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CompactionRequest<T> {
    /// Adjacent batches, oldest first.
    pub inputs: Vec<HollowBatch<T>>,
    /// The shard's since when the request was made.
    pub since: Antichain<T>,
}

/// What [`State::apply_compaction`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CompactionOutcome {
    /// The inputs were replaced by the output.
    Applied,
    /// The output is in state already (a retry of an applied compaction).
    AlreadyApplied,
    /// The inputs are gone (merged or replaced meanwhile): the output is
    /// not needed.
    Superseded,
}

/// Why [`State::snapshot`] cannot serve a read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SnapshotError<T> {
    /// The shard is not yet complete up to `as_of`: wait for the upper.
    NotYetAvailable,
    /// `as_of` is not at or beyond the since.
    SinceBeyondAsOf(Antichain<T>),
}

/// Why [`State::compare_and_downgrade_since`] did not downgrade.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CriticalSinceBreak {
    /// The reader's token is not the expected one; holds the current token.
    OpaqueMismatch([u8; 8]),
    /// No such critical reader is registered.
    UnknownReader,
}

impl<T: Timestamp + Lattice + Codec64> State<T> {
    /// The state of a shard that was just created.
    pub fn new(shard_id: ShardId, codecs: Codecs, walltime_ms: u64) -> Self {
        State {
            shard_id,
            seqno: SeqNo::minimum(),
            walltime_ms,
            codecs,
            since: Antichain::from_elem(T::minimum()),
            upper: Antichain::from_elem(T::minimum()),
            batches: Vec::new(),
            writers: BTreeMap::new(),
            leased_readers: BTreeMap::new(),
            critical_readers: BTreeMap::new(),
            rollups: BTreeMap::new(),
        }
    }

    /// Whether the shard has been closed for good: its since and upper are
    /// both empty, so it can never be written or read again.
    pub fn is_tombstone(&self) -> bool {
        self.since.is_empty() && self.upper.is_empty()
    }

    /// Whether the shard was finalized: closed for good and emptied of
    /// data and handles, so no state references any blob of it.
    pub fn is_finalized(&self) -> bool {
        self.is_tombstone()
            && self.batches.iter().all(|b| b.parts.is_empty())
            && self.writers.is_empty()
            && self.leased_readers.is_empty()
            && self.critical_readers.is_empty()
            && self.rollups.is_empty()
    }

    /// Empties a tombstone of its batches and handles. Returns whether
    /// anything changed; the caller has checked [`State::is_tombstone`].
    pub fn finalize(&mut self) -> bool {
        let changed = !self.is_finalized();
        // One empty batch keeps the batches spanning [minimum, upper).
        self.batches = vec![HollowBatch::empty(
            Antichain::from_elem(T::minimum()),
            self.upper.clone(),
        )];
        self.writers.clear();
        self.leased_readers.clear();
        self.critical_readers.clear();
        self.rollups.clear();
        changed
    }

    /// Registers (or refreshes) a writer and returns the shard's upper.
    pub fn register_writer(
        &mut self,
        id: WriterId,
        purpose: &str,
        now_ms: u64,
        lease_duration_ms: u64,
    ) -> Antichain<T> {
        let writer = self.writers.entry(id).or_insert_with(|| WriterState {
            last_heartbeat_ms: now_ms,
            lease_duration_ms,
            most_recent_write_token: IdempotencyToken([0; 16]),
            most_recent_write_upper: Antichain::from_elem(T::minimum()),
            purpose: purpose.to_owned(),
        });
        writer.last_heartbeat_ms = writer.last_heartbeat_ms.max(now_ms);
        writer.lease_duration_ms = lease_duration_ms;
        self.upper.clone()
    }

    /// Appends `batch` if the shard's upper is exactly `batch.desc.lower()`,
    /// recording `token` as `writer`'s latest append.
    ///
    /// If `writer`'s latest committed append carries `token`, the append
    /// already happened (this is a retry) and nothing changes. The caller has
    /// validated the batch's bounds (`lower <= upper`, updates inside them).
    pub fn compare_and_append(
        &mut self,
        batch: &HollowBatch<T>,
        writer: WriterId,
        token: IdempotencyToken,
        now_ms: u64,
        lease_duration_ms: u64,
    ) -> Result<(), CompareAndAppendBreak<T>> {
        if let Some(state) = self.writers.get(&writer)
            && state.most_recent_write_token == token
        {
            debug_assert_eq!(&state.most_recent_write_upper, batch.desc.upper());
            return Err(CompareAndAppendBreak::AlreadyCommitted);
        }
        // Part keys are unique, so a batch whose parts are already in state
        // was appended: a retry whose writer (and token) expired meanwhile.
        // Reporting a mismatch instead would make the caller delete blobs
        // that state references.
        if let Some(existing) = self.batch_with_any_part_of(batch) {
            // The same append (a retry) ends where this one does and has
            // no parts the first did not; parts reused for another interval
            // would be read twice, and new parts would be lost.
            let retry = existing.desc.upper() == batch.desc.upper()
                && batch
                    .parts
                    .iter()
                    .all(|new| existing.parts.iter().any(|p| p.key == new.key));
            return Err(if retry {
                CompareAndAppendBreak::AlreadyCommitted
            } else {
                CompareAndAppendBreak::PartsAlreadyAppended
            });
        }
        if &self.upper != batch.desc.lower() {
            return Err(CompareAndAppendBreak::Upper(self.upper.clone()));
        }
        // A writer that was expired (it stopped heartbeating for a while) is
        // let back in: its append is fenced by the upper, not by its lease.
        self.register_writer(writer, "re-registered on append", now_ms, lease_duration_ms);
        let state = self.writers.get_mut(&writer).expect("registered above");
        state.most_recent_write_token = token;
        state.most_recent_write_upper = batch.desc.upper().clone();

        self.upper = batch.desc.upper().clone();
        self.push_batch(batch.clone());
        Ok(())
    }

    /// Adds `batch`, which starts at the end of the last batch, merging it
    /// with the last batch where that needs no data rewritten, so that
    /// state does not grow with every idle tick of the upper:
    ///
    /// - an empty batch extends the last batch's upper (writers never put
    ///   updates at or beyond a batch's upper, so the last batch's parts
    ///   still hold exactly its updates);
    /// - a batch after an empty last batch takes over its lower, if no
    ///   part holds an update before the batch's lower (the part time
    ///   bounds show it), so none of them can fall into the wider interval.
    fn push_batch(&mut self, batch: HollowBatch<T>) {
        let Some(last) = self.batches.last_mut() else {
            self.batches.push(batch);
            return;
        };
        if batch.parts.is_empty() {
            last.desc = Description::new(
                last.desc.lower().clone(),
                batch.desc.upper().clone(),
                last.desc.since().clone(),
            );
            return;
        }
        let starts_at_lower = batch
            .parts
            .iter()
            .all(|p| batch.desc.lower().less_equal(&T::decode(p.ts_lower)));
        if last.parts.is_empty() && starts_at_lower {
            let lower = last.desc.lower().clone();
            *last = HollowBatch {
                desc: Description::new(
                    lower,
                    batch.desc.upper().clone(),
                    batch.desc.since().clone(),
                ),
                ..batch
            };
            return;
        }
        self.batches.push(batch);
    }

    /// The next merge the compaction policy asks for, if any: adjacent
    /// batches where each older one holds fewer than twice the updates of
    /// the next (the newest such run, as long as it goes). Merging only such pairs keeps
    /// batch sizes falling geometrically from oldest to newest (as in
    /// differential dataflow's spine), so a shard has a number of batches
    /// logarithmic in its updates, and each update is rewritten a
    /// logarithmic number of times.
    pub fn compaction_request(&self) -> Option<CompactionRequest<T>> {
        if self.is_tombstone() {
            return None;
        }
        let eligible = |i: usize| {
            let (older, newer) = (&self.batches[i - 1], &self.batches[i]);
            older.len < newer.len.saturating_mul(2)
        };
        let end = (1..self.batches.len()).rev().find(|&i| eligible(i))?;
        // Extend to the whole run of comparable batches: when compaction
        // lags behind appends, one merge catches up with all of them
        // instead of one merge per pair (each rewriting the growing result).
        let mut start = end;
        while start > 1 && eligible(start - 1) {
            start -= 1;
        }
        // The batch before the run is bigger, but if it was compacted at an
        // older since and lies wholly before the current one, merging it
        // now collapses its times (and so its records per key) too. This
        // keeps old batches from holding many versions of each key forever.
        if start > 1 {
            let before = &self.batches[start - 2];
            let stale = !PartialOrder::less_equal(&self.since, before.desc.since());
            if stale && PartialOrder::less_equal(before.desc.upper(), &self.since) {
                start -= 1;
            }
        }
        Some(CompactionRequest {
            inputs: self.batches[start - 1..=end].to_vec(),
            since: self.since.clone(),
        })
    }

    /// The merge a full compaction adds once the policy above asks for
    /// nothing: the batches that lie wholly before the since, if there are
    /// several and one was compacted at an older since, or if one is made
    /// of several runs (a merge of more runs than `compaction_max_runs`
    /// writes one run per group), or if the only one holds times beyond the
    /// older since it was compacted at. Merging them at the
    /// current since into one run collapses each key's versions into one
    /// and cancels updates retracted in a later batch, which geometric
    /// merging alone leaves in place for as long as sizes stay geometric.
    ///
    /// Not part of the background policy: with a since that follows the
    /// upper, it would ask to rewrite the oldest data after every append.
    pub fn collapse_request(&self) -> Option<CompactionRequest<T>> {
        if self.is_tombstone() {
            return None;
        }
        let behind = self
            .batches
            .iter()
            .take_while(|b| PartialOrder::less_equal(b.desc.upper(), &self.since))
            .count();
        let prefix = &self.batches[..behind];
        let stale = |b: &HollowBatch<T>| !PartialOrder::less_equal(&self.since, b.desc.since());
        // Whether some time of `b` lies beyond the since it was compacted
        // at, so that advancing to the current since may merge its records.
        let uncollapsed = |b: &HollowBatch<T>| {
            b.parts.iter().any(|p| {
                let join = T::decode(p.ts_upper);
                !b.desc.since().elements().iter().any(|s| join.less_equal(s))
            })
        };
        let useful = match prefix {
            [] => false,
            [only] => only.runs().len() > 1 || (stale(only) && uncollapsed(only)),
            several => several.iter().any(|b| stale(b) || b.runs().len() > 1),
        };
        useful.then(|| CompactionRequest {
            inputs: self.batches[..behind].to_vec(),
            since: self.since.clone(),
        })
    }

    /// Replaces the batches a compaction merged with its `output`, if they
    /// are all still in state, unchanged but for the last one's upper
    /// (which empty appends may have extended, adding no updates).
    pub fn apply_compaction(
        &mut self,
        inputs: &[HollowBatch<T>],
        mut output: HollowBatch<T>,
    ) -> CompactionOutcome {
        if output.parts.first().is_some_and(|p| {
            self.batches
                .iter()
                .any(|b| b.parts.iter().any(|q| q.key == p.key))
        }) {
            return CompactionOutcome::AlreadyApplied;
        }
        let Some(first) = inputs.first() else {
            return CompactionOutcome::Superseded;
        };
        let Some(start) = self
            .batches
            .iter()
            .position(|b| b.desc.lower() == first.desc.lower())
        else {
            return CompactionOutcome::Superseded;
        };
        let end = start + inputs.len();
        let Some(current) = self.batches.get(start..end) else {
            return CompactionOutcome::Superseded;
        };
        let last = inputs.len() - 1;
        let unchanged = current
            .iter()
            .zip(inputs)
            .enumerate()
            .all(|(i, (cur, inp))| {
                cur.parts == inp.parts
                    && cur.desc.lower() == inp.desc.lower()
                    && (cur.desc.upper() == inp.desc.upper()
                        || (i == last
                            && PartialOrder::less_equal(inp.desc.upper(), cur.desc.upper())))
            });
        if !unchanged {
            return CompactionOutcome::Superseded;
        }
        let upper = current[last].desc.upper().clone();
        output.desc = Description::new(
            output.desc.lower().clone(),
            upper,
            output.desc.since().clone(),
        );
        let merged: Vec<HollowBatch<T>> = if output.parts.is_empty() && start > 0 {
            // Nothing survived consolidation: the previous batch absorbs the
            // interval (see `push_batch`).
            let prev = &self.batches[start - 1];
            let mut prev = prev.clone();
            prev.desc = Description::new(
                prev.desc.lower().clone(),
                output.desc.upper().clone(),
                prev.desc.since().clone(),
            );
            self.batches.splice(start - 1..end, [prev]);
            return CompactionOutcome::Applied;
        } else {
            vec![output]
        };
        self.batches.splice(start..end, merged);
        CompactionOutcome::Applied
    }

    /// The blob keys of every part state references.
    pub fn part_keys(&self) -> std::collections::BTreeSet<String> {
        self.batches
            .iter()
            .flat_map(|b| b.parts.iter().map(|p| p.key.clone()))
            .collect()
    }

    /// The smallest SeqNo a leased reader holds a lease on, or this state's
    /// SeqNo if none does: states from it on must stay readable.
    pub fn seqno_since(&self) -> SeqNo {
        self.leased_readers
            .values()
            .map(|r| r.seqno)
            .min()
            .unwrap_or(self.seqno)
            .min(self.seqno)
    }

    /// The batch in state referencing a part of `batch`, if any.
    fn batch_with_any_part_of(&self, batch: &HollowBatch<T>) -> Option<&HollowBatch<T>> {
        self.batches.iter().find(|old| {
            old.parts
                .iter()
                .any(|p| batch.parts.iter().any(|new| new.key == p.key))
        })
    }

    /// Registers (or refreshes) a leased reader holding the shard's since
    /// and a lease on this state, and returns that since.
    pub fn register_leased_reader(
        &mut self,
        id: LeasedReaderId,
        purpose: &str,
        now_ms: u64,
        lease_duration_ms: u64,
    ) -> Antichain<T> {
        let (since, seqno) = (self.since.clone(), self.seqno);
        let reader = self
            .leased_readers
            .entry(id)
            .or_insert_with(|| LeasedReaderState {
                since,
                seqno,
                last_heartbeat_ms: now_ms,
                lease_duration_ms,
                purpose: purpose.to_owned(),
            });
        reader.last_heartbeat_ms = reader.last_heartbeat_ms.max(now_ms);
        reader.since.clone()
    }

    /// Registers a critical reader with `initial` as its token, or returns
    /// the existing one's since and token. Fails with the recorded codec if
    /// the reader exists with tokens of another codec.
    pub fn register_critical_reader(
        &mut self,
        id: CriticalReaderId,
        purpose: &str,
        initial: [u8; 8],
        opaque_codec: &str,
    ) -> Result<(Antichain<T>, [u8; 8]), String> {
        let since = self.since.clone();
        let reader = self
            .critical_readers
            .entry(id)
            .or_insert_with(|| CriticalReaderState {
                since,
                opaque: initial,
                opaque_codec: opaque_codec.to_owned(),
                purpose: purpose.to_owned(),
            });
        if reader.opaque_codec != opaque_codec {
            return Err(reader.opaque_codec.clone());
        }
        Ok((reader.since.clone(), reader.opaque))
    }

    /// Moves a leased reader's since forward to `new_since` (joined with its
    /// current since: a since never regresses) and its SeqNo lease to
    /// `outstanding_seqno`, and recomputes the shard's since.
    ///
    /// Returns the reader's since afterwards, or `None` if the reader is not
    /// registered (it was expired).
    pub fn downgrade_since(
        &mut self,
        id: LeasedReaderId,
        outstanding_seqno: SeqNo,
        new_since: &Antichain<T>,
        now_ms: u64,
    ) -> Option<Antichain<T>> {
        let reader = self.leased_readers.get_mut(&id)?;
        reader.since = reader.since.join(new_since);
        reader.seqno = reader.seqno.max(outstanding_seqno);
        reader.last_heartbeat_ms = reader.last_heartbeat_ms.max(now_ms);
        let since = reader.since.clone();
        self.update_since();
        Some(since)
    }

    /// Moves a critical reader's since forward and swaps its token, if its
    /// token is `expected`.
    pub fn compare_and_downgrade_since(
        &mut self,
        id: CriticalReaderId,
        expected: [u8; 8],
        new_opaque: [u8; 8],
        new_since: &Antichain<T>,
    ) -> Result<Antichain<T>, CriticalSinceBreak> {
        let reader = self
            .critical_readers
            .get_mut(&id)
            .ok_or(CriticalSinceBreak::UnknownReader)?;
        if reader.opaque != expected {
            // A retry of this very call that already landed (its outcome was
            // unknown) finds our new token and a since at least ours: done.
            if reader.opaque == new_opaque && PartialOrder::less_equal(new_since, &reader.since) {
                return Ok(reader.since.clone());
            }
            return Err(CriticalSinceBreak::OpaqueMismatch(reader.opaque));
        }
        reader.opaque = new_opaque;
        reader.since = reader.since.join(new_since);
        let since = reader.since.clone();
        self.update_since();
        Ok(since)
    }

    /// Records that a leased reader is alive. Returns whether it is
    /// registered.
    pub fn heartbeat_leased_reader(&mut self, id: LeasedReaderId, now_ms: u64) -> bool {
        match self.leased_readers.get_mut(&id) {
            Some(reader) => {
                reader.last_heartbeat_ms = reader.last_heartbeat_ms.max(now_ms);
                true
            }
            None => false,
        }
    }

    /// Records that a writer is alive. Returns whether it is registered.
    pub fn heartbeat_writer(&mut self, id: WriterId, now_ms: u64) -> bool {
        match self.writers.get_mut(&id) {
            Some(writer) => {
                writer.last_heartbeat_ms = writer.last_heartbeat_ms.max(now_ms);
                true
            }
            None => false,
        }
    }

    /// Removes a leased reader, releasing its since hold. Returns whether it
    /// was registered.
    pub fn expire_leased_reader(&mut self, id: LeasedReaderId) -> bool {
        let existed = self.leased_readers.remove(&id).is_some();
        self.update_since();
        existed
    }

    /// Removes a writer. Returns whether it was registered.
    pub fn expire_writer(&mut self, id: WriterId) -> bool {
        self.writers.remove(&id).is_some()
    }

    /// Expires every leased reader and writer not heard from within its
    /// lease as of `now_ms`; returns how many were expired.
    pub fn expire_lapsed(&mut self, now_ms: u64) -> usize {
        let lapsed = |last: u64, lease: u64| last.saturating_add(lease) < now_ms;
        let readers = self.leased_readers.len();
        self.leased_readers
            .retain(|_, r| !lapsed(r.last_heartbeat_ms, r.lease_duration_ms));
        let writers = self.writers.len();
        self.writers
            .retain(|_, w| !lapsed(w.last_heartbeat_ms, w.lease_duration_ms));
        let expired = (readers - self.leased_readers.len()) + (writers - self.writers.len());
        if expired > 0 {
            self.update_since();
        }
        expired
    }

    /// Sets the shard's since to the meet of its readers' sinces, never
    /// moving it backward. With no readers it stays where it is.
    fn update_since(&mut self) {
        let mut sinces = self
            .leased_readers
            .values()
            .map(|r| &r.since)
            .chain(self.critical_readers.values().map(|r| &r.since));
        let Some(first) = sinces.next() else { return };
        let meet = sinces.fold(first.clone(), |acc, since| acc.meet(since));
        self.since = self.since.join(&meet);
    }

    /// The batches a read at `as_of` needs: every batch holding updates at
    /// times not beyond `as_of`.
    pub fn snapshot(&self, as_of: &Antichain<T>) -> Result<Vec<HollowBatch<T>>, SnapshotError<T>> {
        if !PartialOrder::less_equal(&self.since, as_of) {
            return Err(SnapshotError::SinceBeyondAsOf(self.since.clone()));
        }
        if !self.is_complete_at(as_of) {
            return Err(SnapshotError::NotYetAvailable);
        }
        Ok(self
            .batches
            .iter()
            .filter(|b| !b.parts.is_empty() && covers_times_not_beyond(b.desc.lower(), as_of))
            .cloned()
            .collect())
    }

    /// Whether the shard holds every update at times not beyond `as_of`:
    /// no element of `as_of` is at or beyond the upper. (An empty `as_of`
    /// covers all times, so it needs an empty upper.)
    pub fn is_complete_at(&self, as_of: &Antichain<T>) -> bool {
        if as_of.is_empty() {
            return self.upper.is_empty();
        }
        as_of.elements().iter().all(|t| !self.upper.less_equal(t))
    }

    /// The index of the batch a listener at `frontier` reads next: the one
    /// whose `[lower, upper)` contains `frontier`, or `None` if the shard's
    /// upper is not yet beyond it.
    ///
    /// A listener moves from batch boundary to batch boundary, starting at
    /// the minimum time and keeping the updates not at or before its
    /// `as_of`: with partially ordered times an `as_of` need not lie in any
    /// one batch. (Containment rather than equality of the lower, because
    /// consecutive empty batches are merged after a listener may have
    /// passed their first boundary.)
    pub fn next_listen_batch(&self, frontier: &Antichain<T>) -> Option<usize> {
        self.batches.iter().position(|b| {
            PartialOrder::less_equal(b.desc.lower(), frontier)
                && PartialOrder::less_than(frontier, b.desc.upper())
        })
    }
}

/// Whether some time at or beyond `lower` may also be not beyond `as_of`:
/// some element of `lower` is at or before some element of `as_of`. The
/// empty `as_of` (the end of time) covers every time.
fn covers_times_not_beyond<T: Timestamp>(lower: &Antichain<T>, as_of: &Antichain<T>) -> bool {
    as_of.is_empty()
        || as_of
            .elements()
            .iter()
            .any(|t| lower.elements().iter().any(|l| l.less_equal(t)))
}

#[cfg(test)]
pub(crate) mod tests {
    use timely::order::Product;

    use super::*;

    /// The codecs the internal tests' shards use.
    pub(crate) fn codecs() -> Codecs {
        Codecs {
            key: "String".into(),
            val: "()".into(),
            ts: "u64".into(),
            diff: "i64".into(),
        }
    }

    fn frontier(t: u64) -> Antichain<u64> {
        Antichain::from_elem(t)
    }

    fn batch(lower: u64, upper: u64, parts: usize) -> HollowBatch<u64> {
        let mut batch = HollowBatch::empty(frontier(lower), frontier(upper));
        batch.parts = (0..parts)
            .map(|i| HollowPart {
                key: format!("p{lower}-{i}-{}", uuid::Uuid::new_v4().simple()),
                len: 1,
                encoded_size_bytes: 10,
                key_lower: vec![],
                key_upper: Some(vec![0xff]),
                ts_lower: lower.to_le_bytes(),
                ts_upper: lower.to_le_bytes(),
            })
            .collect();
        batch.len = parts as u64;
        batch
    }

    fn state() -> State<u64> {
        State::new(ShardId::new(), codecs(), 0)
    }

    #[test]
    fn appends_must_start_at_the_upper() {
        let mut s = state();
        let w = WriterId::new();
        assert_eq!(
            s.compare_and_append(&batch(0, 3, 1), w, IdempotencyToken::new(), 1, 10),
            Ok(())
        );
        assert_eq!(s.upper, frontier(3));
        assert_eq!(
            s.compare_and_append(&batch(0, 5, 1), w, IdempotencyToken::new(), 1, 10),
            Err(CompareAndAppendBreak::Upper(frontier(3)))
        );
        assert_eq!(
            s.compare_and_append(&batch(4, 5, 1), w, IdempotencyToken::new(), 1, 10),
            Err(CompareAndAppendBreak::Upper(frontier(3)))
        );
        assert_eq!(
            s.compare_and_append(&batch(3, 5, 1), w, IdempotencyToken::new(), 1, 10),
            Ok(())
        );
        assert_eq!(s.batches.len(), 2);
        assert!(s.writers.contains_key(&w), "appending registers the writer");
    }

    #[test]
    fn a_retried_append_is_recognised_by_its_token() {
        let mut s = state();
        let w = WriterId::new();
        let token = IdempotencyToken::new();
        s.compare_and_append(&batch(0, 3, 1), w, token, 1, 10)
            .unwrap();
        let before = s.clone();
        assert_eq!(
            s.compare_and_append(&batch(0, 3, 1), w, token, 2, 10),
            Err(CompareAndAppendBreak::AlreadyCommitted)
        );
        assert_eq!(s, before, "a retry changes nothing");
        // Another writer with the same batch is not a retry.
        assert_eq!(
            s.compare_and_append(&batch(0, 3, 1), WriterId::new(), token, 2, 10),
            Err(CompareAndAppendBreak::Upper(frontier(3)))
        );
    }

    #[test]
    fn a_retry_after_the_writer_expired_is_still_recognised() {
        let mut s = state();
        let w = WriterId::new();
        let b = batch(0, 3, 2);
        s.compare_and_append(&b, w, IdempotencyToken::new(), 1, 10)
            .unwrap();
        // The writer's lease lapses before it learns its append landed.
        assert_eq!(s.expire_lapsed(100), 1);
        assert_eq!(
            s.compare_and_append(&b, w, IdempotencyToken::new(), 101, 10),
            Err(CompareAndAppendBreak::AlreadyCommitted),
            "its parts are in state: reporting a mismatch would get them deleted"
        );
        assert_eq!(s.batches.len(), 1);
    }

    #[test]
    fn empty_batches_merge_without_rewriting_data() {
        let mut s = state();
        let w = WriterId::new();
        for (lower, upper) in [(0, 1), (1, 2), (2, 5)] {
            s.compare_and_append(&batch(lower, upper, 0), w, IdempotencyToken::new(), 1, 10)
                .unwrap();
        }
        assert_eq!(s.batches.len(), 1);
        assert_eq!(s.batches[0].desc.lower(), &frontier(0));
        assert_eq!(s.batches[0].desc.upper(), &frontier(5));
        // Data whose parts start at the batch's lower takes over the empty
        // batch's interval; an empty append extends the data batch.
        s.compare_and_append(&batch(5, 6, 1), w, IdempotencyToken::new(), 1, 10)
            .unwrap();
        s.compare_and_append(&batch(6, 7, 0), w, IdempotencyToken::new(), 1, 10)
            .unwrap();
        assert_eq!(s.batches.len(), 1);
        assert_eq!(s.batches[0].desc.lower(), &frontier(0));
        assert_eq!(s.batches[0].desc.upper(), &frontier(7));
        assert_eq!(s.batches[0].parts.len(), 1);
        // Data batches are never merged by appends.
        s.compare_and_append(&batch(7, 8, 1), w, IdempotencyToken::new(), 1, 10)
            .unwrap();
        assert_eq!(s.batches.len(), 2);
        // A batch whose parts hold updates before its lower (an append
        // moved the lower forward) cannot take over an empty interval:
        // those updates would fall into it.
        s.compare_and_append(&batch(8, 9, 0), w, IdempotencyToken::new(), 1, 10)
            .unwrap();
        let mut early = batch(9, 10, 1);
        early.parts[0].ts_lower = 3u64.to_le_bytes();
        let mut s2 = state();
        s2.compare_and_append(&batch(0, 9, 0), w, IdempotencyToken::new(), 1, 10)
            .unwrap();
        s2.compare_and_append(&early, w, IdempotencyToken::new(), 1, 10)
            .unwrap();
        assert_eq!(s2.batches.len(), 2);
        assert_eq!(s2.batches[1].desc.lower(), &frontier(9));
    }

    #[test]
    fn compaction_policy_keeps_batches_geometric() {
        let mut s = state();
        let w = WriterId::new();
        // Appends of one update each, compacting whatever the policy asks
        // for after each (with a stand-in merge that keeps every update).
        for i in 0..1000u64 {
            s.compare_and_append(&batch(i, i + 1, 1), w, IdempotencyToken::new(), 1, 10)
                .unwrap();
            while let Some(req) = s.compaction_request() {
                let first = &req.inputs[0];
                let last = &req.inputs[req.inputs.len() - 1];
                let mut out = batch(0, 1, 1);
                out.desc = Description::new(
                    first.desc.lower().clone(),
                    last.desc.upper().clone(),
                    req.since.clone(),
                );
                out.len = req.inputs.iter().map(|b| b.len).sum();
                out.parts[0].ts_lower = 0u64.to_le_bytes();
                assert_eq!(
                    s.apply_compaction(&req.inputs, out.clone()),
                    CompactionOutcome::Applied
                );
                assert_eq!(
                    s.apply_compaction(&req.inputs, out),
                    CompactionOutcome::AlreadyApplied
                );
            }
            let n = i + 1;
            let bound = 2 * (64 - n.leading_zeros()) as usize;
            assert!(
                s.batches.len() <= bound,
                "{} batches after {n}",
                s.batches.len()
            );
            // Sizes fall geometrically from the oldest batch.
            for pair in s.batches.windows(2) {
                assert!(
                    pair[0].len >= 2 * pair[1].len,
                    "{:?}",
                    s.batches.iter().map(|b| b.len).collect::<Vec<_>>()
                );
            }
        }
        assert_eq!(s.batches.iter().map(|b| b.len).sum::<u64>(), 1000);
    }

    #[test]
    fn a_collapse_merges_the_batches_behind_a_newer_since() {
        let mut s = state();
        let w = WriterId::new();
        // Geometric sizes, so the background policy asks for nothing.
        for (lower, upper, len) in [(0, 1, 8), (1, 2, 3), (2, 3, 1)] {
            let mut b = batch(lower, upper, 1);
            b.len = len;
            s.compare_and_append(&b, w, IdempotencyToken::new(), 1, 10)
                .unwrap();
        }
        assert!(s.compaction_request().is_none());
        // Nothing is wholly before the since yet.
        assert!(s.collapse_request().is_none());
        let r = LeasedReaderId::new();
        s.register_leased_reader(r, "r", 0, 10);
        s.downgrade_since(r, SeqNo(0), &frontier(2), 1);
        let req = s.collapse_request().expect("two batches behind the since");
        assert_eq!(req.inputs.len(), 2);
        assert_eq!(req.inputs[1].desc.upper(), &frontier(2));
        assert_eq!(req.since, frontier(2));
        // Once merged at the current since, there is nothing to collapse.
        let mut out = batch(0, 2, 1);
        out.desc = Description::new(frontier(0), frontier(2), frontier(2));
        out.len = 9;
        assert_eq!(
            s.apply_compaction(&req.inputs, out),
            CompactionOutcome::Applied
        );
        assert!(s.collapse_request().is_none());
    }

    #[test]
    fn compaction_is_refused_once_its_inputs_changed() {
        let mut s = state();
        let w = WriterId::new();
        s.compare_and_append(&batch(0, 1, 1), w, IdempotencyToken::new(), 1, 10)
            .unwrap();
        s.compare_and_append(&batch(1, 2, 1), w, IdempotencyToken::new(), 1, 10)
            .unwrap();
        let req = s.compaction_request().unwrap();
        let mut out = batch(0, 2, 1);
        out.len = 2;
        // An empty append extends the last input: still applicable, and
        // the output covers the extension.
        s.compare_and_append(&batch(2, 3, 0), w, IdempotencyToken::new(), 1, 10)
            .unwrap();
        let mut other = s.clone();
        assert_eq!(
            s.apply_compaction(&req.inputs, out.clone()),
            CompactionOutcome::Applied
        );
        assert_eq!(s.batches.len(), 1);
        assert_eq!(s.batches[0].desc.upper(), &frontier(3));
        // A competing merge of the same inputs applied first: this one is
        // superseded and changes nothing.
        let mut competitor = batch(0, 2, 1);
        competitor.len = 2;
        assert_eq!(
            other.apply_compaction(&req.inputs, competitor),
            CompactionOutcome::Applied
        );
        let before = other.clone();
        assert_eq!(
            other.apply_compaction(&req.inputs, out),
            CompactionOutcome::Superseded
        );
        assert_eq!(other, before);
    }

    #[test]
    fn since_is_the_meet_of_reader_sinces_and_never_regresses() {
        let mut s = state();
        let (r1, r2) = (LeasedReaderId::new(), LeasedReaderId::new());
        assert_eq!(s.register_leased_reader(r1, "a", 0, 10), frontier(0));
        s.register_leased_reader(r2, "b", 0, 10);
        s.downgrade_since(r1, SeqNo(0), &frontier(5), 1);
        assert_eq!(s.since, frontier(0), "held back by r2");
        s.downgrade_since(r2, SeqNo(0), &frontier(3), 1);
        assert_eq!(s.since, frontier(3));
        // A reader cannot move its own since backward.
        assert_eq!(
            s.downgrade_since(r2, SeqNo(0), &frontier(1), 1),
            Some(frontier(3))
        );
        assert_eq!(s.since, frontier(3));
        // Releasing r2 lets the since follow r1; a new reader starts there.
        assert!(s.expire_leased_reader(r2));
        assert_eq!(s.since, frontier(5));
        assert_eq!(
            s.register_leased_reader(LeasedReaderId::new(), "c", 0, 10),
            frontier(5)
        );
        assert_eq!(
            s.downgrade_since(r2, SeqNo(0), &frontier(9), 1),
            None,
            "r2 is gone"
        );
    }

    #[test]
    fn lapsed_leases_expire() {
        let mut s = state();
        let (r1, r2, w) = (
            LeasedReaderId::new(),
            LeasedReaderId::new(),
            WriterId::new(),
        );
        s.register_leased_reader(r1, "a", 0, 100);
        s.register_leased_reader(r2, "b", 0, 100);
        s.register_writer(w, "w", 0, 100);
        s.downgrade_since(r2, SeqNo(0), &frontier(4), 0);
        assert_eq!(
            s.expire_lapsed(100),
            0,
            "exactly at the lease end is still alive"
        );
        assert!(s.heartbeat_leased_reader(r2, 150));
        assert_eq!(s.expire_lapsed(101), 2);
        assert!(!s.leased_readers.contains_key(&r1) && s.leased_readers.contains_key(&r2));
        assert!(s.writers.is_empty());
        assert_eq!(s.since, frontier(4), "r1's hold went with it");
        assert!(!s.heartbeat_writer(w, 200));
    }

    #[test]
    fn critical_since_is_fenced_by_its_token() {
        let mut s = state();
        let c = CriticalReaderId::new();
        let epoch = |e: u64| e.to_le_bytes();
        assert_eq!(
            s.register_critical_reader(c, "ctl", epoch(0), "u64"),
            Ok((frontier(0), epoch(0)))
        );
        assert_eq!(
            s.compare_and_downgrade_since(c, epoch(0), epoch(1), &frontier(2)),
            Ok(frontier(2))
        );
        // Re-applying the same downgrade (a retry whose first attempt landed)
        // succeeds without changing anything.
        let before = s.clone();
        assert_eq!(
            s.compare_and_downgrade_since(c, epoch(0), epoch(1), &frontier(2)),
            Ok(frontier(2))
        );
        assert_eq!(s, before);
        assert_eq!(
            s.compare_and_downgrade_since(c, epoch(0), epoch(0), &frontier(9)),
            Err(CriticalSinceBreak::OpaqueMismatch(epoch(1)))
        );
        assert_eq!(
            s.compare_and_downgrade_since(c, epoch(0), epoch(1), &frontier(9)),
            Err(CriticalSinceBreak::OpaqueMismatch(epoch(1))),
            "a stale epoch cannot move the since by naming the current token"
        );
        assert_eq!(s.since, frontier(2));
        // Registering again returns the existing hold, not a fresh one.
        assert_eq!(
            s.register_critical_reader(c, "ctl", epoch(0), "u64"),
            Ok((frontier(2), epoch(1)))
        );
        assert_eq!(
            s.register_critical_reader(c, "ctl", epoch(0), "i64"),
            Err("u64".to_owned()),
            "tokens are read with the codec they were written with"
        );
        // Critical and leased holds combine.
        let r = LeasedReaderId::new();
        s.register_leased_reader(r, "r", 0, 10);
        s.downgrade_since(r, SeqNo(0), &frontier(7), 0);
        s.compare_and_downgrade_since(c, epoch(1), epoch(1), &frontier(5))
            .unwrap();
        assert_eq!(s.since, frontier(5));
        assert_eq!(
            s.compare_and_downgrade_since(
                CriticalReaderId::new(),
                epoch(1),
                epoch(1),
                &frontier(9)
            ),
            Err(CriticalSinceBreak::UnknownReader)
        );
    }

    #[test]
    fn snapshot_needs_since_at_or_before_and_upper_beyond_as_of() {
        let mut s = state();
        let w = WriterId::new();
        for (lower, upper, parts) in [(0, 2, 1), (2, 4, 0), (4, 6, 2)] {
            s.compare_and_append(
                &batch(lower, upper, parts),
                w,
                IdempotencyToken::new(),
                0,
                10,
            )
            .unwrap();
        }
        let keys = |bs: Vec<HollowBatch<u64>>| {
            bs.iter()
                .map(|b| b.desc.lower().clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(keys(s.snapshot(&frontier(1)).unwrap()), vec![frontier(0)]);
        assert_eq!(
            keys(s.snapshot(&frontier(4)).unwrap()),
            vec![frontier(0), frontier(4)]
        );
        assert_eq!(
            s.snapshot(&frontier(6)),
            Err(SnapshotError::NotYetAvailable)
        );
        let r = LeasedReaderId::new();
        s.register_leased_reader(r, "r", 0, 10);
        s.downgrade_since(r, SeqNo(0), &frontier(3), 0);
        assert_eq!(
            s.snapshot(&frontier(2)),
            Err(SnapshotError::SinceBeyondAsOf(frontier(3)))
        );
        assert!(s.snapshot(&frontier(3)).is_ok());
    }

    #[test]
    fn listen_batches_are_found_by_frontier() {
        let mut s = state();
        let w = WriterId::new();
        for (lower, upper) in [(0, 2), (2, 4)] {
            s.compare_and_append(&batch(lower, upper, 1), w, IdempotencyToken::new(), 0, 10)
                .unwrap();
        }
        let upper = |f: u64| {
            s.next_listen_batch(&frontier(f))
                .map(|i| s.batches[i].desc.upper().clone())
        };
        assert_eq!(upper(0), Some(frontier(2)));
        assert_eq!(upper(2), Some(frontier(4)));
        assert_eq!(
            upper(1),
            Some(frontier(2)),
            "the batch containing the frontier"
        );
        assert_eq!(upper(4), None, "not yet written");
    }

    #[test]
    fn snapshots_with_partially_ordered_times() {
        type T = Product<u32, u32>;
        let f = |a, b| Antichain::from_elem(Product::new(a, b));
        let mut s: State<T> = State::new(ShardId::new(), codecs(), 0);
        let w = WriterId::new();
        let mut b1 = HollowBatch::empty(Antichain::from_elem(T::minimum()), f(2, 2));
        b1.parts.push(batch(0, 1, 1).parts[0].clone());
        s.compare_and_append(&b1, w, IdempotencyToken::new(), 0, 10)
            .unwrap();
        let mut upper = Antichain::new();
        upper.insert(Product::new(3, 2));
        upper.insert(Product::new(2, 3));
        let mut b2 = HollowBatch::empty(f(2, 2), upper.clone());
        b2.parts.push(batch(1, 2, 1).parts[0].clone());
        s.compare_and_append(&b2, w, IdempotencyToken::new(), 0, 10)
            .unwrap();
        // Every time <= (1, 5) is below the upper {(3,2),(2,3)}: readable,
        // from the first batch only.
        assert_eq!(s.snapshot(&f(1, 5)).unwrap().len(), 1);
        // (2, 3) is itself at the upper: not yet complete.
        assert_eq!(s.snapshot(&f(2, 3)), Err(SnapshotError::NotYetAvailable));
        // Every element of the as_of must be complete, not just one.
        let mut both = f(1, 5);
        both.insert(Product::new(3, 2));
        assert_eq!(s.snapshot(&both), Err(SnapshotError::NotYetAvailable));
        assert_eq!(
            s.snapshot(&Antichain::new()),
            Err(SnapshotError::NotYetAvailable)
        );
        // A listener walks the batch boundaries from the start, whatever its
        // as_of: (1, 6) and (3, 0), in the first batch, are beyond (1, 5).
        let first = s
            .next_listen_batch(&Antichain::from_elem(T::minimum()))
            .unwrap();
        assert_eq!(s.batches[first].desc.upper(), &f(2, 2));
        let second = s.next_listen_batch(&f(2, 2)).unwrap();
        assert_eq!(s.batches[second].desc.upper(), &upper);
        assert_eq!(s.next_listen_batch(&upper), None);
        // (1, 1) only needs the first batch; (2, 2) needs both.
        assert_eq!(s.snapshot(&f(1, 1)).unwrap().len(), 1);
        assert_eq!(s.snapshot(&f(2, 2)).unwrap().len(), 2);
        assert_eq!(s.upper, upper);
    }
}
