//! Incremental state: the difference between consecutive states.
//!
//! Consensus holds one [`StateDiff`] per SeqNo rather than a whole state, so
//! an entry costs what the transition changed (a heartbeat, one appended
//! batch), not what the shard holds. Applying the diff of SeqNo `n` to the
//! state at `n - 1` yields the state at `n` exactly.
//!
//! Maps (writers, readers, rollups) are diffed by key. Batches, a sequence,
//! are diffed as one splice: the longest common prefix and suffix are kept
//! and the middle replaced. That describes an append (new batches after the
//! old ones), a compaction (a run of batches replaced by one) and a merge of
//! trailing empty batches in a few entries.

use std::collections::BTreeMap;

use persist::SeqNo;
use timely::progress::Antichain;

use crate::ids::{CriticalReaderId, LeasedReaderId, WriterId};
use crate::internal::state::{
    CriticalReaderState, HollowBatch, LeasedReaderState, State, WriterState,
};

/// What changed between the state at `seqno - 1` and the state at `seqno`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StateDiff<T> {
    /// The SeqNo of the state the diff produces.
    pub seqno: SeqNo,
    /// The wall clock of the state the diff produces.
    pub walltime_ms: u64,
    /// The new since, if it changed.
    pub since: Option<Antichain<T>>,
    /// The new upper, if it changed.
    pub upper: Option<Antichain<T>>,
    /// How the batches changed.
    pub batches: Splice<HollowBatch<T>>,
    /// Writers added, changed or removed.
    pub writers: MapDiff<WriterId, WriterState<T>>,
    /// Leased readers added, changed or removed.
    pub leased_readers: MapDiff<LeasedReaderId, LeasedReaderState<T>>,
    /// Critical readers added, changed or removed.
    pub critical_readers: MapDiff<CriticalReaderId, CriticalReaderState<T>>,
    /// Rollups added or removed.
    pub rollups: MapDiff<SeqNo, String>,
}

/// A sequence edit: keep the first `prefix` and the last `suffix` elements,
/// and put `middle` between them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Splice<X> {
    /// How many leading elements are kept.
    pub prefix: usize,
    /// How many trailing elements are kept.
    pub suffix: usize,
    /// What replaces everything else.
    pub middle: Vec<X>,
}

/// A map edit: entries inserted or replaced, and keys removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MapDiff<K, V> {
    /// Entries that are new or whose value changed.
    pub upserts: Vec<(K, V)>,
    /// Keys that are gone.
    pub deletes: Vec<K>,
}

impl<K, V> Default for MapDiff<K, V> {
    fn default() -> Self {
        MapDiff {
            upserts: Vec::new(),
            deletes: Vec::new(),
        }
    }
}

impl<K: Ord + Clone, V: Clone + PartialEq> MapDiff<K, V> {
    fn between(old: &BTreeMap<K, V>, new: &BTreeMap<K, V>) -> Self {
        let upserts = new
            .iter()
            .filter(|(k, v)| old.get(k) != Some(v))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let deletes = old
            .keys()
            .filter(|k| !new.contains_key(k))
            .cloned()
            .collect();
        MapDiff { upserts, deletes }
    }

    fn apply(self, map: &mut BTreeMap<K, V>, what: &str) -> Result<(), String> {
        for key in self.deletes {
            if map.remove(&key).is_none() {
                return Err(format!("diff removes a {what} that is not in state"));
            }
        }
        map.extend(self.upserts);
        Ok(())
    }
}

impl<X: Clone + PartialEq> Splice<X> {
    fn between(old: &[X], new: &[X]) -> Self {
        let prefix = old.iter().zip(new).take_while(|(a, b)| a == b).count();
        let (old_rest, new_rest) = (&old[prefix..], &new[prefix..]);
        let suffix = old_rest
            .iter()
            .rev()
            .zip(new_rest.iter().rev())
            .take_while(|(a, b)| a == b)
            .count();
        Splice {
            prefix,
            suffix,
            middle: new_rest[..new_rest.len() - suffix].to_vec(),
        }
    }

    fn apply(self, seq: &mut Vec<X>) -> Result<(), String> {
        let kept = self.prefix.checked_add(self.suffix);
        if kept.is_none_or(|kept| kept > seq.len()) {
            return Err(format!(
                "diff keeps {} + {} of {} batches",
                self.prefix,
                self.suffix,
                seq.len()
            ));
        }
        let end = seq.len() - self.suffix;
        seq.splice(self.prefix..end, self.middle);
        Ok(())
    }
}

impl<T: timely::progress::Timestamp> StateDiff<T> {
    /// The diff that turns `old` into `new` (its successor).
    pub fn between(old: &State<T>, new: &State<T>) -> Self {
        StateDiff {
            seqno: new.seqno,
            walltime_ms: new.walltime_ms,
            since: (old.since != new.since).then(|| new.since.clone()),
            upper: (old.upper != new.upper).then(|| new.upper.clone()),
            batches: Splice::between(&old.batches, &new.batches),
            writers: MapDiff::between(&old.writers, &new.writers),
            leased_readers: MapDiff::between(&old.leased_readers, &new.leased_readers),
            critical_readers: MapDiff::between(&old.critical_readers, &new.critical_readers),
            rollups: MapDiff::between(&old.rollups, &new.rollups),
        }
    }

    /// Turns `state` (at `self.seqno - 1`) into its successor. Fails,
    /// leaving `state` unusable, if the diff does not apply to it: the
    /// caller discards `state` then.
    pub fn apply(self, state: &mut State<T>) -> Result<(), String> {
        if state.seqno.next() != self.seqno {
            return Err(format!(
                "diff to {} does not follow state {}",
                self.seqno, state.seqno
            ));
        }
        state.seqno = self.seqno;
        state.walltime_ms = self.walltime_ms;
        if let Some(since) = self.since {
            state.since = since;
        }
        if let Some(upper) = self.upper {
            state.upper = upper;
        }
        self.batches.apply(&mut state.batches)?;
        self.writers.apply(&mut state.writers, "writer")?;
        self.leased_readers
            .apply(&mut state.leased_readers, "leased reader")?;
        self.critical_readers
            .apply(&mut state.critical_readers, "critical reader")?;
        self.rollups.apply(&mut state.rollups, "rollup")?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// A splice computed between any two sequences rebuilds the second
        /// from the first.
        #[test]
        fn splices_rebuild_the_new_sequence(
            old in proptest::collection::vec(0u8..4, 0..12),
            new in proptest::collection::vec(0u8..4, 0..12),
        ) {
            let splice = Splice::between(&old, &new);
            prop_assert!(splice.prefix + splice.suffix <= old.len());
            let mut rebuilt = old.clone();
            splice.apply(&mut rebuilt).unwrap();
            prop_assert_eq!(rebuilt, new);
        }

        /// Likewise for maps.
        #[test]
        fn map_diffs_rebuild_the_new_map(
            old in proptest::collection::btree_map(0u8..8, 0u8..3, 0..8),
            new in proptest::collection::btree_map(0u8..8, 0u8..3, 0..8),
        ) {
            let mut rebuilt = old.clone();
            MapDiff::between(&old, &new).apply(&mut rebuilt, "x").unwrap();
            prop_assert_eq!(rebuilt, new);
        }
    }

    #[test]
    fn a_splice_that_does_not_fit_is_an_error() {
        let splice = Splice {
            prefix: 2,
            suffix: 2,
            middle: vec![9],
        };
        assert!(splice.apply(&mut vec![1, 2, 3]).is_err());
        let gone = MapDiff::<u8, u8> {
            upserts: vec![],
            deletes: vec![7],
        };
        assert!(gone.apply(&mut BTreeMap::new(), "x").is_err());
    }
}
