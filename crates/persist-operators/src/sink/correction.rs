//! The correction buffer of the sink's `write` operator: `desired - persist`.

use std::collections::BTreeMap;

use differential_dataflow::consolidation::consolidate;
use timely::progress::Antichain;

/// A bucket is consolidated once it holds this many updates more than
/// after its last consolidation (and twice as many): memory stays within a
/// small factor of the distinct updates held plus this slack per time, at
/// amortized `O(log n)` cost per update. Lower trades CPU for memory.
///
/// Most buckets are written out (and consolidated once, by the batch
/// builder, on encoded bytes) soon after their time is complete; a slack
/// well above a typical time's updates spares them sorting at insert.
const CONSOLIDATE_SLACK: usize = 1 << 16;

/// Updates of one time, with the size they had when last consolidated.
#[derive(Debug)]
struct Bucket<D> {
    updates: Vec<(D, i64)>,
    consolidated: usize,
}

impl<D: Ord> Bucket<D> {
    fn new() -> Self {
        Bucket {
            updates: Vec::new(),
            consolidated: 0,
        }
    }

    fn consolidate(&mut self) {
        consolidate(&mut self.updates);
        self.consolidated = self.updates.len();
    }

    fn maybe_consolidate(&mut self) {
        let limit = (2 * self.consolidated).max(self.consolidated + CONSOLIDATE_SLACK);
        if self.updates.len() > limit {
            self.consolidate();
        }
    }
}

/// A collection of updates at `u64` times, kept as the difference between
/// what should be in the shard (`desired`, inserted as is) and what is
/// (`persist`, inserted negated).
///
/// Times before the `since` are advanced to it: the sink only writes at or
/// after the shard's upper, so earlier distinctions do not matter.
#[derive(Debug)]
pub(crate) struct Correction<D> {
    buckets: BTreeMap<u64, Bucket<D>>,
    /// `None` once the since is the empty frontier (nothing more to write).
    since: Option<u64>,
}

impl<D: Ord + Clone> Correction<D> {
    pub(crate) fn new() -> Self {
        Correction {
            buckets: BTreeMap::new(),
            since: Some(0),
        }
    }

    /// Adds updates, negated if `negate`.
    pub(crate) fn insert(&mut self, updates: Vec<(D, u64, i64)>, negate: bool) {
        let Some(since) = self.since else {
            return;
        };
        let mut touched = Vec::new();
        for (data, time, diff) in updates {
            let time = time.max(since);
            let diff = if negate { -diff } else { diff };
            let bucket = self.buckets.entry(time).or_insert_with(Bucket::new);
            if touched.last() != Some(&time) {
                touched.push(time);
            }
            bucket.updates.push((data, diff));
        }
        touched.sort_unstable();
        touched.dedup();
        for time in touched {
            if let Some(bucket) = self.buckets.get_mut(&time) {
                bucket.maybe_consolidate();
                if bucket.updates.is_empty() {
                    self.buckets.remove(&time);
                }
            }
        }
    }

    /// Advances every time before `frontier` to it (the empty frontier
    /// drops everything: nothing can be written any more).
    pub(crate) fn advance_since(&mut self, frontier: &Antichain<u64>) {
        let Some(&new) = frontier.as_option() else {
            self.buckets.clear();
            self.since = None;
            return;
        };
        if self.since.is_some_and(|since| since >= new) {
            return;
        }
        self.since = Some(new);
        let later = self.buckets.split_off(&new);
        let earlier = std::mem::replace(&mut self.buckets, later);
        if earlier.is_empty() {
            return;
        }
        let bucket = self.buckets.entry(new).or_insert_with(Bucket::new);
        for (_, mut old) in earlier {
            bucket.updates.append(&mut old.updates);
        }
        bucket.consolidate();
        if bucket.updates.is_empty() {
            self.buckets.remove(&new);
        }
    }

    /// The consolidated updates at times not at or after `upper`, left in
    /// the buffer (to look at it in tests).
    #[cfg(test)]
    pub(crate) fn updates_before(&mut self, upper: &Antichain<u64>) -> Vec<(D, u64, i64)> {
        let mut out = Vec::new();
        let mut emptied = Vec::new();
        for (&time, bucket) in self.buckets.iter_mut() {
            if upper.less_equal(&time) {
                break;
            }
            bucket.consolidate();
            if bucket.updates.is_empty() {
                emptied.push(time);
            }
            out.extend(bucket.updates.iter().map(|(d, r)| (d.clone(), time, *r)));
        }
        for time in emptied {
            self.buckets.remove(&time);
        }
        out
    }

    /// Removes and returns the updates at times not at or after `upper`,
    /// not consolidated (whoever takes them consolidates once).
    pub(crate) fn take_before(&mut self, upper: &Antichain<u64>) -> Vec<(D, u64, i64)> {
        let earlier = match upper.as_option() {
            Some(&upper) => {
                let later = self.buckets.split_off(&upper);
                std::mem::replace(&mut self.buckets, later)
            }
            None => std::mem::take(&mut self.buckets),
        };
        let mut out = Vec::with_capacity(earlier.values().map(|b| b.updates.len()).sum());
        for (time, bucket) in earlier {
            out.extend(bucket.updates.into_iter().map(|(d, r)| (d, time, r)));
        }
        out
    }

    /// Forgets every update at a time not at or after `upper`: the shard
    /// now holds them (the sink's own append wrote exactly these).
    pub(crate) fn clear_before(&mut self, upper: &Antichain<u64>) {
        match upper.as_option() {
            Some(&upper) => self.buckets = self.buckets.split_off(&upper),
            None => self.buckets.clear(),
        }
    }

    /// How many updates the buffer holds (not necessarily consolidated).
    pub(crate) fn len(&self) -> usize {
        self.buckets.values().map(|b| b.updates.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upto(t: u64) -> Antichain<u64> {
        Antichain::from_elem(t)
    }

    #[test]
    fn desired_minus_persist_cancels() {
        let mut c = Correction::new();
        c.insert(vec![("a", 1, 1), ("b", 2, 1), ("c", 3, 1)], false);
        c.insert(vec![("a", 1, 1), ("b", 2, 1)], true);
        assert_eq!(c.updates_before(&upto(10)), vec![("c", 3, 1)]);
        // Nothing was removed by reading.
        assert_eq!(c.updates_before(&upto(4)), vec![("c", 3, 1)]);
        assert_eq!(c.updates_before(&upto(3)), vec![]);
    }

    #[test]
    fn advancing_the_since_merges_times() {
        let mut c = Correction::new();
        c.insert(
            vec![("a", 1, 1), ("a", 2, -1), ("b", 2, 1), ("c", 7, 1)],
            false,
        );
        c.advance_since(&upto(5));
        assert_eq!(c.updates_before(&upto(6)), vec![("b", 5, 1)]);
        // Later inserts before the since land at it.
        c.insert(vec![("b", 0, 1)], true);
        assert_eq!(c.updates_before(&upto(8)), vec![("c", 7, 1)]);
        c.advance_since(&Antichain::new());
        assert_eq!(c.len(), 0);
        c.insert(vec![("z", 9, 1)], false);
        assert_eq!(c.len(), 0);
    }

    #[test]
    fn taking_removes_earlier_times() {
        let mut c = Correction::new();
        c.insert(
            vec![("a", 1, 1), ("b", 3, 1), ("a", 1, 1), ("c", 4, -1)],
            false,
        );
        let mut taken = c.take_before(&upto(4));
        taken.sort();
        assert_eq!(taken, vec![("a", 1, 1), ("a", 1, 1), ("b", 3, 1)]);
        assert_eq!(c.updates_before(&upto(10)), vec![("c", 4, -1)]);
        // Put back, they count again.
        c.insert(taken, false);
        assert_eq!(
            c.updates_before(&upto(10)),
            vec![("a", 1, 2), ("b", 3, 1), ("c", 4, -1)]
        );
        assert_eq!(c.take_before(&Antichain::new()).len(), 3);
        assert_eq!(c.len(), 0);
    }

    #[test]
    fn clearing_forgets_only_earlier_times() {
        let mut c = Correction::new();
        c.insert(vec![("a", 1, 1), ("b", 3, 1), ("c", 4, -1)], false);
        c.clear_before(&upto(4));
        assert_eq!(c.updates_before(&upto(10)), vec![("c", 4, -1)]);
        c.clear_before(&Antichain::new());
        assert_eq!(c.len(), 0);
    }

    #[test]
    fn memory_stays_near_the_distinct_updates() {
        let mut c = Correction::new();
        for round in 0..1000u64 {
            let adds: Vec<_> = (0..1000u64).map(|k| (k, 3, 1)).collect();
            c.insert(adds, false);
            let subs: Vec<_> = (0..1000u64).map(|k| (k, 3, 1)).collect();
            c.insert(subs, true);
            assert!(
                c.len() <= 2 * 2000 + CONSOLIDATE_SLACK,
                "round {round}: {}",
                c.len()
            );
        }
        assert!(c.updates_before(&upto(4)).is_empty());
    }
}
