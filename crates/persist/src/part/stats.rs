//! Per-part statistics, small enough to keep in shard state and precise
//! enough to skip parts that cannot hold a key range.

/// The most bytes [`PartStats::key_lower`] and [`PartStats::key_upper`] keep.
/// Longer bounds are shortened conservatively (see [`PartStats`]), so stats
/// stay small however large the keys are.
pub const MAX_STATS_KEY_BYTES: usize = 64;

/// Statistics of one part, computed by [`super::PartBuilder`] as updates are
/// pushed.
///
/// Key bounds compare byte-wise lexicographically (as `[u8]` does) and are
/// conservative: every key `k` of the part satisfies `key_lower <= k` and, when
/// `key_upper` is `Some(u)`, `k <= u`. Each bound is at most
/// [`MAX_STATS_KEY_BYTES`] long; when all keys are that short, the bounds are
/// exactly the smallest and largest key.
///
/// For an empty part (`len == 0`) the bounds are `[]` and `Some([])` and mean
/// nothing; [`PartStats::may_contain_key_range`] is false for it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PartStats {
    /// Number of updates in the part.
    pub len: u64,
    /// Size of the encoded part in bytes (what Blob stores).
    pub encoded_size_bytes: u64,
    /// A lower bound of the part's keys: the first [`MAX_STATS_KEY_BYTES`]
    /// bytes of the smallest key (a prefix is never greater than the key).
    pub key_lower: Vec<u8>,
    /// An upper bound of the part's keys, or `None` if no bound of at most
    /// [`MAX_STATS_KEY_BYTES`] bytes exists (the largest key is longer and
    /// starts with that many `0xFF` bytes).
    ///
    /// The largest key itself if it is short enough; otherwise its first
    /// [`MAX_STATS_KEY_BYTES`] bytes with trailing `0xFF` bytes dropped and
    /// the last remaining byte incremented, which is greater than every key
    /// with that prefix.
    pub key_upper: Option<Vec<u8>>,
}

impl PartStats {
    /// Whether the part may hold a key `k` with `lower <= k <= upper` (both
    /// bounds inclusive, byte-wise lexicographic).
    ///
    /// Never false when the part holds such a key, so a reader may skip a
    /// part for which it is false. It may be true when the part holds none
    /// (the bounds only know the smallest and largest key, shortened). False
    /// for an empty part and for an empty range (`lower > upper`).
    pub fn may_contain_key_range(&self, lower: &[u8], upper: &[u8]) -> bool {
        if self.len == 0 || lower > upper || upper < self.key_lower.as_slice() {
            return false;
        }
        match &self.key_upper {
            Some(key_upper) => lower <= key_upper.as_slice(),
            None => true,
        }
    }
}

/// Tracks the key bounds of a stream of keys in bounded space.
///
/// Keeps the minimum over keys of their [`MAX_STATS_KEY_BYTES`]-byte prefix
/// (which is the prefix of the minimum key, as taking a prefix preserves
/// order) and the maximum over keys of their one-byte-longer prefix, from
/// which [`KeyBounds::upper`] derives an upper bound.
#[derive(Debug, Default)]
pub(super) struct KeyBounds {
    /// `None` until the first key.
    lower: Option<Vec<u8>>,
    upper_prefix: Vec<u8>,
}

impl KeyBounds {
    pub(super) fn observe(&mut self, key: &[u8]) {
        let lower_prefix = &key[..key.len().min(MAX_STATS_KEY_BYTES)];
        let upper_prefix = &key[..key.len().min(MAX_STATS_KEY_BYTES + 1)];
        match &mut self.lower {
            None => {
                self.lower = Some(lower_prefix.to_vec());
                self.upper_prefix = upper_prefix.to_vec();
                return;
            }
            Some(lower) if lower_prefix < lower.as_slice() => {
                lower.clear();
                lower.extend_from_slice(lower_prefix);
            }
            Some(_) => {}
        }
        if upper_prefix > self.upper_prefix.as_slice() {
            self.upper_prefix.clear();
            self.upper_prefix.extend_from_slice(upper_prefix);
        }
    }

    pub(super) fn lower(&self) -> Vec<u8> {
        self.lower.clone().unwrap_or_default()
    }

    pub(super) fn upper(&self) -> Option<Vec<u8>> {
        upper_bound(&self.upper_prefix)
    }
}

/// An upper bound of at most [`MAX_STATS_KEY_BYTES`] bytes for every key
/// whose `MAX_STATS_KEY_BYTES + 1`-byte prefix is `<= prefix`.
///
/// If `prefix` is short enough it is a whole key and bounds itself. Otherwise
/// the bound is the shortest string greater than every string starting with
/// `prefix[..MAX_STATS_KEY_BYTES]`: drop trailing `0xFF` bytes and increment
/// the last byte. `None` if every byte is `0xFF` (no such string exists).
fn upper_bound(prefix: &[u8]) -> Option<Vec<u8>> {
    if prefix.len() <= MAX_STATS_KEY_BYTES {
        return Some(prefix.to_vec());
    }
    let mut bound = prefix[..MAX_STATS_KEY_BYTES].to_vec();
    while let Some(last) = bound.pop() {
        if last != 0xFF {
            bound.push(last + 1);
            return Some(bound);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn stats_of(keys: &[Vec<u8>]) -> PartStats {
        let mut bounds = KeyBounds::default();
        for k in keys {
            bounds.observe(k);
        }
        PartStats {
            len: keys.len() as u64,
            encoded_size_bytes: 0,
            key_lower: bounds.lower(),
            key_upper: bounds.upper(),
        }
    }

    /// Keys drawn from a small alphabet including 0x00 and 0xFF, with lengths
    /// around the truncation limit, so prefixes collide and bounds truncate.
    fn key() -> impl Strategy<Value = Vec<u8>> {
        let byte = prop_oneof![
            Just(0u8),
            Just(1u8),
            Just(0xFEu8),
            Just(0xFFu8),
            any::<u8>()
        ];
        prop_oneof![
            proptest::collection::vec(byte.clone(), 0..8),
            proptest::collection::vec(byte, MAX_STATS_KEY_BYTES - 2..MAX_STATS_KEY_BYTES + 4),
            (0..4usize, 0..6usize).prop_map(|(ff, tail)| {
                let mut k = vec![0xFF; MAX_STATS_KEY_BYTES - 1 + ff];
                k.extend(std::iter::repeat_n(7, tail));
                k
            }),
        ]
    }

    proptest! {
        #[test]
        fn bounds_hold_every_key(keys in proptest::collection::vec(key(), 1..20)) {
            let stats = stats_of(&keys);
            prop_assert!(stats.key_lower.len() <= MAX_STATS_KEY_BYTES);
            if let Some(upper) = &stats.key_upper {
                prop_assert!(upper.len() <= MAX_STATS_KEY_BYTES);
            }
            for k in &keys {
                prop_assert!(stats.key_lower.as_slice() <= k.as_slice());
                if let Some(upper) = &stats.key_upper {
                    prop_assert!(k.as_slice() <= upper.as_slice(), "{k:?} > {upper:?}");
                }
            }
            // Exact when no key needs shortening.
            if keys.iter().all(|k| k.len() <= MAX_STATS_KEY_BYTES) {
                prop_assert_eq!(&stats.key_lower, keys.iter().min().unwrap());
                prop_assert_eq!(stats.key_upper.as_ref(), keys.iter().max());
            }
        }

        #[test]
        fn may_contain_key_range_agrees_with_brute_force(
            keys in proptest::collection::vec(key(), 0..20),
            a in key(),
            b in key(),
        ) {
            let stats = stats_of(&keys);
            let (lower, upper) = (a.as_slice(), b.as_slice());
            let truth = keys.iter().any(|k| lower <= k.as_slice() && k.as_slice() <= upper);
            let answer = stats.may_contain_key_range(lower, upper);
            // Sound: never rules out a part that holds a key in range.
            prop_assert!(!truth || answer);
            // Exact at the level of [min, max] when nothing was shortened.
            if keys.iter().all(|k| k.len() <= MAX_STATS_KEY_BYTES) {
                let overlaps = match (keys.iter().min(), keys.iter().max()) {
                    (Some(min), Some(max)) => {
                        lower <= upper && lower <= max.as_slice() && min.as_slice() <= upper
                    }
                    _ => false,
                };
                prop_assert_eq!(answer, overlaps);
            }
        }
    }

    #[test]
    fn upper_bound_truncates_and_increments() {
        let n = MAX_STATS_KEY_BYTES;
        assert_eq!(upper_bound(b"abc"), Some(b"abc".to_vec()));
        let mut long = vec![b'a'; n + 1];
        assert_eq!(upper_bound(&long), {
            let mut u = vec![b'a'; n];
            u[n - 1] = b'b';
            Some(u)
        });
        long[n - 2] = 0xFF;
        long[n - 1] = 0xFF;
        let mut expected = vec![b'a'; n - 2];
        expected[n - 3] = b'b';
        assert_eq!(upper_bound(&long), Some(expected));
        assert_eq!(upper_bound(&vec![0xFF; n + 1]), None);
        assert_eq!(upper_bound(&vec![0xFF; n]), Some(vec![0xFF; n]));
    }

    #[test]
    fn empty_part_contains_nothing() {
        let stats = stats_of(&[]);
        assert_eq!(stats.key_lower, Vec::<u8>::new());
        assert_eq!(stats.key_upper, Some(vec![]));
        assert!(!stats.may_contain_key_range(b"", b"\xff\xff"));
    }
}
