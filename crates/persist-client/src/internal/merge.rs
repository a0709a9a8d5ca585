//! Merging sorted runs of encoded updates without materializing them.
//!
//! Every part is a run sorted by `(key, val, time)` (writers consolidate
//! before writing, compaction writes merged runs). Reads that span several
//! parts must consolidate across them. Sorting the concatenation would move
//! every update a few times through a freshly allocated buffer; a k-way
//! merge over the parts visits each update once, in order, and hands out
//! each distinct `(key, val)` with all its times.

use std::cmp::Ordering;
use std::ops::Range;

use differential_dataflow::difference::Semigroup;

/// One stored update: encoded key and value, time and diff bytes.
pub(crate) type Row<'a> = (&'a [u8], &'a [u8], [u8; 8], [u8; 8]);

/// A run was not sorted by `(key, val)`: the merge stopped partway, and
/// the caller must consolidate another way (having discarded what it was
/// handed so far).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Unsorted;

/// The next update of one run: the run, the update's index in it, and its
/// key's first 8 bytes.
///
/// Small and `Copy`, so that the heap moves little; the key and value are
/// looked up only when two prefixes tie.
#[derive(Debug, Clone, Copy)]
struct Head {
    /// The key's first 8 bytes, zero-padded, as a big-endian integer: when
    /// two heads' prefixes differ, they order the keys as the keys do (a
    /// shorter key pads with zeros, and sorts before any longer key it
    /// begins). Comparing them first spares most `memcmp` calls.
    prefix: u64,
    run: usize,
    at: usize,
}

/// The [`Head::prefix`] of `key`.
fn prefix_of(key: &[u8]) -> u64 {
    let mut prefix = [0u8; 8];
    let n = key.len().min(8);
    prefix[..n].copy_from_slice(&key[..n]);
    u64::from_be_bytes(prefix)
}

/// A binary min-heap of heads ordered by `(key, val)` and then by run (so
/// that equal updates leave it in run order), with `row` to look updates
/// up by run and index.
struct Heads<R> {
    heads: Vec<Head>,
    row: R,
}

impl<'a, R: Fn(usize, usize) -> Row<'a>> Heads<R> {
    /// Whether `a` comes before `b`.
    fn less(&self, a: &Head, b: &Head) -> bool {
        match a.prefix.cmp(&b.prefix) {
            Ordering::Equal => {
                let (x, y) = ((self.row)(a.run, a.at), (self.row)(b.run, b.at));
                match (x.0, x.1).cmp(&(y.0, y.1)) {
                    Ordering::Equal => a.run < b.run,
                    order => order == Ordering::Less,
                }
            }
            order => order == Ordering::Less,
        }
    }

    /// Restores the heap order below `i`, given that it holds elsewhere.
    fn sift_down(&mut self, mut i: usize) {
        let n = self.heads.len();
        loop {
            let left = 2 * i + 1;
            if left >= n {
                return;
            }
            let right = left + 1;
            let child = if right < n && self.less(&self.heads[right], &self.heads[left]) {
                right
            } else {
                left
            };
            if !self.less(&self.heads[child], &self.heads[i]) {
                return;
            }
            self.heads.swap(i, child);
            i = child;
        }
    }
}

/// Merges runs, each sorted by `(key, val)`, calling `each(key, val,
/// rows)` once per distinct `(key, val)` in increasing order, where `rows`
/// holds `(run index, time bytes, diff bytes)` of every update with that
/// key and val (in run order, then in each run's order).
///
/// Run `r` is the updates `row(r, i)` for `i` in `ranges[r]`.
///
/// Returns [`Unsorted`] as soon as a run turns out not to be sorted; `each`
/// has been called for some prefix then.
pub(crate) fn merge_sorted_runs<'a>(
    ranges: &[Range<usize>],
    row: impl Fn(usize, usize) -> Row<'a>,
    mut each: impl FnMut(&'a [u8], &'a [u8], &[(usize, [u8; 8], [u8; 8])]),
) -> Result<(), Unsorted> {
    let heads = ranges
        .iter()
        .enumerate()
        .filter(|(_, range)| !range.is_empty())
        .map(|(run, range)| Head {
            prefix: prefix_of(row(run, range.start).0),
            run,
            at: range.start,
        })
        .collect();
    let mut heap = Heads { heads, row };
    for i in (0..heap.heads.len() / 2).rev() {
        heap.sift_down(i);
    }
    let mut group: Vec<(usize, [u8; 8], [u8; 8])> = Vec::new();
    while let Some(&first) = heap.heads.first() {
        let (key, val, mut t, mut d) = (heap.row)(first.run, first.at);
        group.clear();
        loop {
            // The least head has this key and val, and time `t` and diff
            // `d`: take its update.
            let top = heap.heads[0];
            group.push((top.run, t, d));
            let at = top.at + 1;
            if at < ranges[top.run].end {
                let next = (heap.row)(top.run, at);
                let prefix = prefix_of(next.0);
                let order = prefix
                    .cmp(&first.prefix)
                    .then_with(|| (next.0, next.1).cmp(&(key, val)));
                if order == Ordering::Less {
                    return Err(Unsorted);
                }
                heap.heads[0] = Head { prefix, at, ..top };
            } else {
                heap.heads.swap_remove(0);
            }
            heap.sift_down(0);
            match heap.heads.first() {
                Some(h) if h.prefix == first.prefix => {
                    let (k, v, next_t, next_d) = (heap.row)(h.run, h.at);
                    if (k, v) != (key, val) {
                        break;
                    }
                    (t, d) = (next_t, next_d);
                }
                _ => break,
            }
        }
        each(key, val, &group);
    }
    Ok(())
}

/// Splits sorted runs into at most `pieces` consecutive key ranges of
/// about equal size, so that each range can be merged on its own and the
/// merged ranges concatenated in order.
///
/// `lens[r]` is the length of run `r` and `key(r, i)` the key of its `i`th
/// update. Returns one entry per range, each holding one index range per
/// run (possibly empty). All updates with one key fall in one range, and
/// every key of a range is less than every key of the next.
///
/// The splitting keys are quantiles sampled from every run. If a run turns
/// out not to be sorted around a split point (so that the ranges would not
/// be ordered), returns a single range covering every run whole: merging
/// it then reports the run as [`Unsorted`].
pub(crate) fn split_runs<'a>(
    lens: &[usize],
    key: impl Fn(usize, usize) -> &'a [u8],
    pieces: usize,
) -> Vec<Vec<Range<usize>>> {
    let whole = || vec![lens.iter().map(|len| 0..*len).collect::<Vec<_>>()];
    let nonempty = lens.iter().filter(|len| **len > 0).count();
    if pieces < 2 || nonempty == 0 {
        return whole();
    }
    // Every run's keys at its `1/pieces, 2/pieces, ...` quantiles, sorted:
    // every `nonempty`-th of them approximates the quantiles of all keys.
    let mut samples: Vec<&[u8]> = Vec::with_capacity(nonempty * (pieces - 1));
    for (run, len) in lens.iter().enumerate().filter(|(_, len)| **len > 0) {
        samples.extend((1..pieces).map(|q| key(run, len * q / pieces)));
    }
    samples.sort_unstable();
    let mut splitters: Vec<&[u8]> = (0..pieces - 1)
        .map(|q| samples[q * nonempty + nonempty / 2])
        .collect();
    splitters.dedup();

    // `bounds[s][r]`: the first update of run `r` whose key is at or past
    // splitter `s`.
    let mut bounds: Vec<Vec<usize>> = Vec::with_capacity(splitters.len());
    for splitter in &splitters {
        let mut at = Vec::with_capacity(lens.len());
        for (run, len) in lens.iter().enumerate() {
            let b = partition_point(*len, |i| key(run, i) < *splitter);
            // A binary search over an unsorted run finds some index; check
            // that the run really changes sides there, after the previous
            // split point.
            let previous = bounds.last().map_or(0, |at: &Vec<usize>| at[run]);
            let sorted_here = previous <= b
                && (b == 0 || key(run, b - 1) < *splitter)
                && (b == *len || key(run, b) >= *splitter);
            if !sorted_here {
                return whole();
            }
            at.push(b);
        }
        bounds.push(at);
    }
    let mut ranges = Vec::with_capacity(bounds.len() + 1);
    let mut starts = vec![0; lens.len()];
    for ends in bounds.iter().map(Vec::as_slice).chain([lens]) {
        ranges.push(starts.iter().zip(ends).map(|(s, e)| *s..*e).collect());
        starts.copy_from_slice(ends);
    }
    ranges
}

/// The first index in `0..len` for which `below` is false, given that it
/// is true for a prefix of the indices and false after.
fn partition_point(len: usize, below: impl Fn(usize) -> bool) -> usize {
    let (mut lo, mut hi) = (0, len);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if below(mid) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    lo
}

/// Sorts `(time, diff)` pairs by time, sums the diffs of equal times and
/// drops zeros.
pub(crate) fn consolidate_times<T: Ord, D: Semigroup>(updates: &mut Vec<(T, D)>) {
    if updates.len() > 1 {
        updates.sort_by(|a, b| a.0.cmp(&b.0));
    }
    let mut kept = 0;
    for i in 0..updates.len() {
        if kept > 0 && updates[kept - 1].0 == updates[i].0 {
            let (done, rest) = updates.split_at_mut(i);
            done[kept - 1].1.plus_equals(&rest[0].1);
        } else {
            updates.swap(kept, i);
            kept += 1;
        }
    }
    updates.truncate(kept);
    updates.retain(|(_, d)| !d.is_zero());
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    type Owned = (Vec<u8>, Vec<u8>, u64, i64);
    type Update = ((Vec<u8>, Vec<u8>), u64, i64);

    fn row(runs: &[Vec<Owned>], run: usize, i: usize) -> Row<'_> {
        let (k, v, t, d) = &runs[run][i];
        (&k[..], &v[..], t.to_le_bytes(), d.to_le_bytes())
    }

    /// What merging must produce: every update, consolidated, in order.
    fn expected(runs: &[Vec<Owned>]) -> Vec<Owned> {
        let mut all: Vec<Update> = runs
            .iter()
            .flatten()
            .map(|(k, v, t, d)| ((k.clone(), v.clone()), *t, *d))
            .collect();
        differential_dataflow::consolidation::consolidate_updates(&mut all);
        all.into_iter().map(|((k, v), t, d)| (k, v, t, d)).collect()
    }

    fn merged(runs: &[Vec<Owned>]) -> Result<Vec<Owned>, Unsorted> {
        let mut out = Vec::new();
        let mut times = Vec::new();
        let ranges: Vec<_> = runs.iter().map(|r| 0..r.len()).collect();
        let row = |run, i| row(runs, run, i);
        merge_sorted_runs(&ranges, row, |k, v, group| {
            times.clear();
            times.extend(
                group
                    .iter()
                    .map(|(_, t, d)| (u64::from_le_bytes(*t), i64::from_le_bytes(*d))),
            );
            consolidate_times(&mut times);
            out.extend(times.iter().map(|(t, d)| (k.to_vec(), v.to_vec(), *t, *d)));
        })?;
        Ok(out)
    }

    fn sorted_run() -> impl Strategy<Value = Vec<Owned>> {
        prop::collection::vec(
            (
                prop::collection::vec(0u8..4, 0..3),
                prop::collection::vec(0u8..3, 0..2),
                0u64..4,
                -2i64..3,
            ),
            0..30,
        )
        .prop_map(|mut run| {
            run.sort();
            run
        })
    }

    proptest! {
        #[test]
        fn merging_sorted_runs_consolidates_them(
            runs in prop::collection::vec(sorted_run(), 0..6),
        ) {
            prop_assert_eq!(merged(&runs), Ok(expected(&runs)));
        }
    }

    /// Merges `runs` as `split_runs` splits them into `pieces`, one range
    /// after another, checking that the ranges cover every run in order.
    fn merged_in_pieces(runs: &[Vec<Owned>], pieces: usize) -> Result<Vec<Owned>, Unsorted> {
        let lens: Vec<usize> = runs.iter().map(Vec::len).collect();
        let split = split_runs(&lens, |r, i| &runs[r][i].0[..], pieces);
        assert!(!split.is_empty() && split.len() <= pieces.max(1));
        for (run, len) in lens.iter().enumerate() {
            let mut next = 0;
            for piece in &split {
                assert_eq!(
                    piece[run].start, next,
                    "ranges of run {run} must be contiguous"
                );
                assert!(piece[run].start <= piece[run].end);
                next = piece[run].end;
            }
            assert_eq!(next, *len, "ranges must cover run {run}");
        }
        let mut out = Vec::new();
        for piece in &split {
            let runs: Vec<Vec<Owned>> = runs
                .iter()
                .zip(piece)
                .map(|(run, range)| run[range.clone()].to_vec())
                .collect();
            out.extend(merged(&runs)?);
        }
        Ok(out)
    }

    fn any_run() -> impl Strategy<Value = Vec<Owned>> {
        prop::collection::vec(
            (
                prop::collection::vec(0u8..4, 0..3),
                prop::collection::vec(0u8..3, 0..2),
                0u64..4,
                -2i64..3,
            ),
            0..30,
        )
    }

    proptest! {
        #[test]
        fn merging_split_runs_piece_by_piece_consolidates_them(
            runs in prop::collection::vec(sorted_run(), 0..6),
            pieces in 1usize..6,
        ) {
            prop_assert_eq!(merged_in_pieces(&runs, pieces), Ok(expected(&runs)));
        }

        /// Unsorted runs split into ranges that still cover them, and a
        /// split never hides the disorder: the merge either reports it or
        /// (when the disorder lies only in time order) is right.
        #[test]
        fn splitting_unsorted_runs_never_loses_or_misorders_updates(
            runs in prop::collection::vec(any_run(), 0..6),
            pieces in 1usize..6,
        ) {
            if let Ok(out) = merged_in_pieces(&runs, pieces) {
                prop_assert_eq!(out, expected(&runs));
            }
        }
    }

    #[test]
    fn split_runs_balances_interleaved_runs() {
        // Ten runs whose keys interleave, as ten batches appended in turn.
        let runs: Vec<Vec<Owned>> = (0..10u64)
            .map(|b| {
                (0..1000u64)
                    .map(|i| ((i * 10 + b).to_be_bytes().to_vec(), vec![], 0, 1))
                    .collect()
            })
            .collect();
        let lens: Vec<usize> = runs.iter().map(Vec::len).collect();
        let split = split_runs(&lens, |r, i| &runs[r][i].0[..], 4);
        assert_eq!(split.len(), 4);
        for piece in &split {
            let size: usize = piece.iter().map(ExactSizeIterator::len).sum();
            assert!((2000..3000).contains(&size), "unbalanced piece of {size}");
        }
    }

    #[test]
    fn an_unsorted_run_is_reported() {
        let sorted = vec![(b"a".to_vec(), vec![], 0, 1), (b"c".to_vec(), vec![], 0, 1)];
        let unsorted = vec![(b"b".to_vec(), vec![], 0, 1), (b"a".to_vec(), vec![], 0, 1)];
        assert_eq!(merged(&[sorted.clone(), unsorted]), Err(Unsorted));
        // Equal keys with times out of order are sorted: times are grouped.
        let times = vec![(b"a".to_vec(), vec![], 5, 1), (b"a".to_vec(), vec![], 2, 1)];
        assert_eq!(merged(&[times.clone(), sorted]).map(|o| o.len()), Ok(4));
    }
}
