//! Critical since handles: since holds that never expire and are fenced by
//! an opaque token.

use std::fmt::Debug;
use std::time::Instant;

use differential_dataflow::lattice::Lattice;
use persist_types::{Codec64, Opaque, ShardId};
use timely::PartialOrder;
use timely::progress::{Antichain, Timestamp};

use crate::error::{ClientError, ShardError};
use crate::ids::CriticalReaderId;
use crate::internal::machine::{Machine, Transition};
use crate::internal::state::CriticalSinceBreak;

/// Statistics of a snapshot, computed from state alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotStats {
    /// The shard.
    pub shard_id: ShardId,
    /// An upper bound on the number of updates a snapshot would return
    /// (before consolidation).
    pub num_updates: u64,
}

/// Holds a shard's since on behalf of a process that must not lose it to a
/// missed heartbeat (a controller): the hold lasts until it is downgraded,
/// and every downgrade is fenced by an opaque token, so a newer owner (a
/// controller with a higher epoch, say) can shut out older ones.
pub struct SinceHandle<K, V, T, D, O> {
    pub(crate) machine: Machine<T>,
    pub(crate) reader_id: CriticalReaderId,
    pub(crate) since: Antichain<T>,
    pub(crate) opaque: O,
    pub(crate) last_downgrade: Option<Instant>,
    pub(crate) _phantom: crate::Marker<(K, V, D)>,
}

impl<K, V, T: Debug, D, O: Debug> Debug for SinceHandle<K, V, T, D, O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SinceHandle")
            .field("shard_id", &self.machine.shard_id())
            .field("reader_id", &self.reader_id)
            .field("since", &self.since)
            .field("opaque", &self.opaque)
            .finish_non_exhaustive()
    }
}

impl<K, V, T, D, O> SinceHandle<K, V, T, D, O>
where
    T: Timestamp + Lattice + Codec64 + Sync,
    O: Opaque + Codec64,
{
    /// The shard this handle holds.
    pub fn shard_id(&self) -> ShardId {
        self.machine.shard_id()
    }

    /// This handle's id.
    pub fn reader_id(&self) -> CriticalReaderId {
        self.reader_id
    }

    /// The since this handle holds, as of its last operation.
    pub fn since(&self) -> &Antichain<T> {
        &self.since
    }

    /// The token this handle last saw, as of its last operation.
    pub fn opaque(&self) -> &O {
        &self.opaque
    }

    /// Moves the since forward to `new_since` (joined with the current
    /// since) and sets the token to `new_opaque`, if the token is
    /// `expected`. Otherwise nothing changes and the current token is
    /// returned in `Err` (and cached in the handle).
    ///
    /// Idempotent: retrying a call whose outcome was unknown succeeds.
    pub async fn compare_and_downgrade_since(
        &mut self,
        expected: &O,
        (new_opaque, new_since): (&O, &Antichain<T>),
    ) -> Result<Result<Antichain<T>, O>, ClientError<T>> {
        let id = self.reader_id;
        let (expected, new_opaque) = (expected.encode(), new_opaque.encode());
        let (_, result) = self
            .machine
            .apply(|state, now| {
                state.expire_lapsed(now);
                match state.compare_and_downgrade_since(id, expected, new_opaque, new_since) {
                    Ok(since) => Transition::Write(Ok(since)),
                    Err(err) => Transition::Refuse(Err(err)),
                }
            })
            .await?;
        self.last_downgrade = Some(Instant::now());
        match result {
            Ok(since) => {
                self.since = since;
                self.opaque = O::decode(new_opaque);
                Ok(Ok(self.since.clone()))
            }
            Err(CriticalSinceBreak::OpaqueMismatch(current)) => {
                self.opaque = O::decode(current);
                Ok(Err(self.opaque.clone()))
            }
            Err(CriticalSinceBreak::UnknownReader) => Err(ShardError::Expired {
                shard: self.machine.shard_id(),
                handle: id.to_string(),
            }
            .into()),
        }
    }

    /// Like [`SinceHandle::compare_and_downgrade_since`], but rate limited:
    /// returns `None` without doing anything if the last downgrade was less
    /// than the configured interval ago, unless `new_since` is empty (the
    /// final downgrade is never delayed).
    pub async fn maybe_compare_and_downgrade_since(
        &mut self,
        expected: &O,
        new: (&O, &Antichain<T>),
    ) -> Option<Result<Result<Antichain<T>, O>, ClientError<T>>> {
        let interval = self.machine.cfg().since_downgrade_interval;
        let due = self
            .last_downgrade
            .is_none_or(|last| last.elapsed() >= interval);
        if new.1.is_empty() || due {
            Some(self.compare_and_downgrade_since(expected, new).await)
        } else {
            None
        }
    }

    /// The number of updates a snapshot at `as_of` would read, from state
    /// alone. Waits until the shard's upper is beyond `as_of`; fails with
    /// `Since` if `as_of` is not at or beyond the shard's since.
    pub async fn snapshot_stats(
        &self,
        as_of: Antichain<T>,
    ) -> Result<SnapshotStats, ClientError<T>> {
        let (_, batches) = self
            .machine
            .snapshot(&as_of)
            .await?
            .map_err(crate::error::Since)?;
        Ok(SnapshotStats {
            shard_id: self.machine.shard_id(),
            num_updates: batches.iter().map(|b| b.len).sum(),
        })
    }

    /// Re-reads this handle's since and token from the latest state.
    pub async fn refresh(&mut self) -> Result<(), ClientError<T>> {
        let state = self.machine.fetch_latest().await?;
        match state.critical_readers.get(&self.reader_id) {
            Some(reader) => {
                self.since.clone_from(&reader.since);
                self.opaque = O::decode(reader.opaque);
                Ok(())
            }
            None => Err(ShardError::Expired {
                shard: self.machine.shard_id(),
                handle: self.reader_id.to_string(),
            }
            .into()),
        }
    }

    /// Whether `frontier` is at or beyond this handle's since.
    pub fn allows_reads_at(&self, frontier: &Antichain<T>) -> bool {
        PartialOrder::less_equal(&self.since, frontier)
    }
}
