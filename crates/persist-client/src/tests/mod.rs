//! Tests of the client's public API: the seed tests rewritten against our
//! API (`api.rs` for the client and write side, `read.rs` for the read
//! side) and the semantics the issue adds (`semantics.rs`).

use std::sync::Arc;

use differential_dataflow::consolidation::consolidate_updates;
use differential_dataflow::difference::Semigroup;
use differential_dataflow::lattice::Lattice;
use persist_types::{Codec, Codec64, ShardId, SimpleSchema};
use timely::progress::{Antichain, Timestamp};

use crate::{Diagnostics, FetchedUpdate, Listen, PersistClient, ReadHandle, WriteHandle};

mod api;
mod compaction;
mod read;
mod review;
mod semantics;

/// An update of the string shards most tests use.
pub(crate) type Update = ((String, String), u64, i64);

/// `n` distinct updates `((i, "v{i}"), i, 1)` for `i` in `0..n`.
pub(crate) fn updates(n: u64) -> Vec<Update> {
    (0..n)
        .map(|i| ((i.to_string(), format!("v{i}")), i, 1))
        .collect()
}

/// `data` as a read at `as_of` returns it: times advanced to `as_of` (a
/// single time here), consolidated, every key and value decodable. (The
/// caller picks the updates the read covers.)
pub(crate) fn all_ok<'a, K, V, T, D>(
    data: impl IntoIterator<Item = &'a ((K, V), T, D)>,
    as_of: T,
) -> Vec<FetchedUpdate<K, V, T, D>>
where
    K: Ord + Clone + 'a,
    V: Ord + Clone + 'a,
    T: Timestamp + Lattice + 'a,
    D: Semigroup + 'a,
{
    let as_of = Antichain::from_elem(as_of);
    let mut out: Vec<((K, V), T, D)> = data
        .into_iter()
        .map(|((k, v), t, d)| {
            let mut t = t.clone();
            t.advance_by(as_of.borrow());
            ((k.clone(), v.clone()), t, d.clone())
        })
        .collect();
    consolidate_updates(&mut out);
    out.into_iter()
        .map(|((k, v), t, d)| ((Ok(k), Ok(v)), t, d))
        .collect()
}

/// A single-element frontier.
pub(crate) fn f<T: Timestamp>(t: T) -> Antichain<T> {
    Antichain::from_elem(t)
}

/// Opens a writer and reader of `shard` with the default schemas.
pub(crate) async fn expect_open<K, V, T, D>(
    client: &PersistClient,
    shard: ShardId,
) -> (WriteHandle<K, V, T, D>, ReadHandle<K, V, T, D>)
where
    K: Codec<Schema = SimpleSchema<K>>,
    V: Codec<Schema = SimpleSchema<V>>,
    T: Timestamp + Lattice + Codec64 + Sync,
    D: Semigroup + Codec64 + Send + Sync,
{
    client
        .open(
            shard,
            Arc::new(SimpleSchema::new()),
            Arc::new(SimpleSchema::new()),
            Diagnostics::for_tests(),
        )
        .await
        .expect("codecs match")
}

/// Appends `data` as `[lower, upper)` with `append`, expecting success.
pub(crate) async fn expect_append<K, V, D>(
    write: &mut WriteHandle<K, V, u64, D>,
    data: &[((K, V), u64, D)],
    lower: u64,
    upper: u64,
) where
    K: Codec + Clone,
    V: Codec + Clone,
    D: Semigroup + Codec64 + Send + Sync,
{
    write
        .append(data, f(lower), f(upper))
        .await
        .expect("valid usage")
        .expect("upper matches");
}

/// Appends `data` as `[lower, upper)` with `compare_and_append`, expecting
/// success.
pub(crate) async fn expect_compare_and_append<K, V, D>(
    write: &mut WriteHandle<K, V, u64, D>,
    data: &[((K, V), u64, D)],
    lower: u64,
    upper: u64,
) where
    K: Codec + Clone,
    V: Codec + Clone,
    D: Semigroup + Codec64 + Send + Sync,
{
    write
        .compare_and_append(data, f(lower), f(upper))
        .await
        .expect("valid usage")
        .expect("upper matches");
}

/// `snapshot_and_fetch` at `as_of`, expecting success.
pub(crate) async fn expect_snapshot_and_fetch<K, V, D>(
    read: &mut ReadHandle<K, V, u64, D>,
    as_of: u64,
) -> Vec<FetchedUpdate<K, V, u64, D>>
where
    K: Codec,
    V: Codec,
    D: Semigroup + Codec64 + Send + Sync,
{
    read.snapshot_and_fetch(f(as_of))
        .await
        .expect("snapshot at a readable as_of")
}

/// A listen at `as_of` on a clone of `read`.
pub(crate) async fn expect_listen<K, V, D>(
    read: &ReadHandle<K, V, u64, D>,
    as_of: u64,
) -> Listen<K, V, u64, D>
where
    K: Codec,
    V: Codec,
    D: Semigroup + Codec64 + Send + Sync,
{
    read.clone("listen")
        .await
        .expect("clone reader")
        .listen(f(as_of))
        .await
        .expect("listen at a readable as_of")
}
