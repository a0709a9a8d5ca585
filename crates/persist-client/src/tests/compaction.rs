//! Compaction, incremental state, rollups and garbage collection, checked
//! against a model of the shard and against what blob and consensus hold.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use persist::mem::{MemBlob, MemConsensus};
use persist::unreliable::{UnreliableBlob, UnreliableConsensus, UnreliableHandle};
use persist::{Blob, Consensus, SeqNo};
use persist_types::{ShardId, SimpleSchema};
use proptest::prelude::*;
use timely::PartialOrder;
use timely::progress::Antichain;

use super::{Update, expect_open, f};
use crate::internal::encoding::{Entry, decode_entry, decode_state};
use crate::internal::machine::{apply_entry, rollup_key};
use crate::{Diagnostics, PersistClient, PersistConfig, ReadHandle, WriteHandle};

type Writer = WriteHandle<String, String, u64, i64>;
type Reader = ReadHandle<String, String, u64, i64>;

/// A client on `blob` and `consensus` with its own state cache: another
/// "process" of the same location.
fn process(blob: &Arc<dyn Blob>, consensus: &Arc<dyn Consensus>) -> PersistClient {
    PersistClient::new(
        PersistConfig::new_for_tests(),
        Arc::clone(blob),
        Arc::clone(consensus),
    )
}

fn mem() -> (Arc<dyn Blob>, Arc<dyn Consensus>) {
    (Arc::new(MemBlob::new()), Arc::new(MemConsensus::new()))
}

/// Updates at time `t` over a small key space, retracting what an earlier
/// time inserted so that consolidation has work to do.
fn updates_at(t: u64) -> Vec<Update> {
    let key = (t % 7).to_string();
    let mut out = vec![((key.clone(), format!("v{t}")), t, 1)];
    if t >= 7 {
        out.push(((key, format!("v{}", t - 7)), t, -1));
    }
    out
}

/// The model: every update, consolidated as a read at `as_of` sees them.
fn model_at(updates: &[Update], as_of: u64) -> Vec<Update> {
    let mut out: Vec<Update> = updates
        .iter()
        .filter(|(_, t, _)| *t <= as_of)
        .map(|((k, v), _, d)| ((k.clone(), v.clone()), as_of, *d))
        .collect();
    differential_dataflow::consolidation::consolidate_updates(&mut out);
    out
}

async fn snapshot(read: &mut Reader, as_of: u64) -> Vec<Update> {
    let mut out: Vec<Update> = read
        .snapshot_and_fetch(f(as_of))
        .await
        .expect("readable as_of")
        .into_iter()
        .map(|((k, v), t, d)| ((k.expect("key"), v.expect("val")), t, d))
        .collect();
    differential_dataflow::consolidation::consolidate_updates(&mut out);
    out
}

/// The blob keys every state still in the log references (parts and the
/// rollup of the oldest entry), read straight from consensus and blob.
async fn live_references(
    blob: &Arc<dyn Blob>,
    consensus: &Arc<dyn Consensus>,
    shard: ShardId,
) -> (BTreeSet<String>, usize) {
    let entries = consensus
        .scan(&shard.to_string(), SeqNo(0), usize::MAX)
        .await
        .unwrap();
    let first = &entries[0];
    let mut refs = BTreeSet::new();
    let mut state = match decode_entry::<u64>(shard, &first.data).unwrap() {
        Entry::Full(state) => state,
        Entry::Diff(_) => {
            let key = rollup_key(shard, first.seqno);
            let bytes = blob.get(&key).await.unwrap().expect("oldest rollup");
            refs.insert(key);
            decode_state::<u64>(shard, &bytes).unwrap()
        }
    };
    refs.extend(state.part_keys());
    refs.extend(state.rollups.values().cloned());
    for entry in &entries[1..] {
        apply_entry(shard, &mut state, entry).unwrap();
        refs.extend(state.part_keys());
        refs.extend(state.rollups.values().cloned());
    }
    (refs, entries.len())
}

async fn blob_keys(blob: &Arc<dyn Blob>, shard: ShardId) -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    blob.list_keys_and_metadata(&format!("{shard}/"), &mut |m| {
        keys.insert(m.key);
    })
    .await
    .unwrap();
    keys
}

/// Nothing a live state references is missing from blob, and (but for
/// rollups, which are cheap and collected on the next round) blob holds
/// no part that no live state references.
/// Waits until no background compaction or rollup of `writers`' shard
/// runs in their processes (their output would show up as a leak).
async fn settle(writers: &[&Writer]) {
    for w in writers {
        while w.machine.busy_arc().any() {
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
    }
}

async fn assert_no_dangling_and_no_leaks(
    blob: &Arc<dyn Blob>,
    consensus: &Arc<dyn Consensus>,
    shard: ShardId,
) {
    let (refs, _) = live_references(blob, consensus, shard).await;
    let keys = blob_keys(blob, shard).await;
    for r in &refs {
        if !r.contains("/rollup/") {
            assert!(keys.contains(r), "referenced part {r} was deleted");
        }
    }
    for k in &keys {
        assert!(
            refs.contains(k) || k.contains("/rollup/"),
            "blob {k} is referenced by no live state"
        );
    }
}

async fn append_at(write: &mut Writer, t: u64) {
    write
        .compare_and_append(&updates_at(t), f(t), f(t + 1))
        .await
        .expect("usage")
        .expect("upper");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_stays_small_under_many_appends() {
    let (blob, consensus) = mem();
    let client = process(&blob, &consensus);
    let shard = ShardId::new();
    let (mut write, mut read) = expect_open::<String, String, u64, i64>(&client, shard).await;
    let mut all = Vec::new();
    let appends = 300u64;
    for t in 0..appends {
        append_at(&mut write, t).await;
        all.extend(updates_at(t));
        // The since follows the upper.
        read.downgrade_since(&f(t)).await.unwrap();
        if t % 50 == 49 {
            assert_eq!(snapshot(&mut read, t).await, model_at(&all, t), "at {t}");
        }
    }
    settle(&[&write]).await;
    write.compact().await.unwrap();
    // An explicit compaction also collapses what lies behind the since:
    // one run, one record per live key.
    let state = write.machine.fetch_latest().await.unwrap();
    let behind: Vec<_> = state
        .batches
        .iter()
        .filter(|b| PartialOrder::less_equal(b.desc.upper(), &state.since))
        .collect();
    assert!(
        behind.len() <= 1,
        "{} batches behind the since",
        behind.len()
    );
    for b in behind {
        assert_eq!(b.runs().len(), 1, "runs {:?}", b.runs);
        assert!(b.len <= 7, "{} records for 7 live keys", b.len);
    }
    // The reader moves on (as a listener does), releasing old states.
    read.downgrade_since(&f(appends - 1)).await.unwrap();
    settle(&[&write]).await;
    write.collect_garbage().await.unwrap();
    let state = write.machine.fetch_latest().await.unwrap();
    let bound = 2 * (64 - appends.leading_zeros()) as usize;
    assert!(
        state.batches.len() <= bound,
        "{} batches",
        state.batches.len()
    );
    assert!(!state.rollups.is_empty(), "rollups are written");
    // The log holds a bounded number of entries, not one per append.
    let (_, entries) = live_references(&blob, &consensus, shard).await;
    assert!(entries < 64, "{entries} live consensus entries");
    assert_eq!(
        snapshot(&mut read, appends - 1).await,
        model_at(&all, appends - 1)
    );
    assert_no_dangling_and_no_leaks(&blob, &consensus, shard).await;

    // Another process opens the shard from a rollup and the diffs after it.
    let other = process(&blob, &consensus);
    let (w2, mut r2) = expect_open::<String, String, u64, i64>(&other, shard).await;
    assert_eq!(w2.upper(), &f(appends));
    assert_eq!(
        snapshot(&mut r2, appends - 1).await,
        model_at(&all, appends - 1)
    );
    let oldest = consensus
        .scan(&shard.to_string(), SeqNo(0), 1)
        .await
        .unwrap();
    assert!(oldest[0].seqno > SeqNo(0), "the log was truncated");
    // The metrics saw it all.
    let m = client.metrics();
    assert!(m.compactions.with_label_values(&["applied"]).get() > 0);
    assert!(m.rollups.get() > 0);
    assert!(m.gc_deleted_blobs.get() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listeners_see_every_update_once_while_batches_merge() {
    let (blob, consensus) = mem();
    let client = process(&blob, &consensus);
    let shard = ShardId::new();
    let (mut write, read) = expect_open::<String, String, u64, i64>(&client, shard).await;
    let mut listen = read.listen(f(0)).await.unwrap();
    let mut all = Vec::new();
    let mut heard: Vec<Update> = Vec::new();
    for t in 0..120u64 {
        append_at(&mut write, t).await;
        all.extend(updates_at(t));
        // Listen only now and then, so that compaction merges batches the
        // listener is in the middle of.
        if t % 9 == 0 {
            write.compact().await.unwrap();
            while listen.frontier().less_than(&(t + 1)) {
                for event in listen.fetch_next().await.unwrap() {
                    if let crate::ListenEvent::Updates(updates) = event {
                        heard.extend(
                            updates
                                .into_iter()
                                .map(|((k, v), t, d)| ((k.unwrap(), v.unwrap()), t, d)),
                        );
                    }
                }
            }
        }
    }
    let upper = listen.frontier().as_option().copied().unwrap();
    let mut expected: Vec<Update> = all
        .iter()
        .filter(|(_, t, _)| *t > 0 && *t < upper)
        .cloned()
        .collect();
    differential_dataflow::consolidation::consolidate_updates(&mut expected);
    differential_dataflow::consolidation::consolidate_updates(&mut heard);
    assert_eq!(heard, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_compactions_from_two_processes() {
    let (blob, consensus) = mem();
    let shard = ShardId::new();
    let (a, b) = (process(&blob, &consensus), process(&blob, &consensus));
    let (mut wa, mut read) = expect_open::<String, String, u64, i64>(&a, shard).await;
    let (mut wb, _rb) = expect_open::<String, String, u64, i64>(&b, shard).await;
    let mut all = Vec::new();
    for t in 0..80u64 {
        let writer = if t % 2 == 0 { &mut wa } else { &mut wb };
        writer.fetch_recent_upper().await.unwrap();
        append_at(writer, t).await;
        all.extend(updates_at(t));
        read.downgrade_since(&f(t / 2)).await.unwrap();
        if t % 10 == 9 {
            // Both processes merge the same batches at once: one wins
            // each merge, the other deletes its output.
            let (ra, rb) = tokio::join!(wa.compact(), wb.compact());
            ra.unwrap();
            rb.unwrap();
        }
    }
    settle(&[&wa, &wb]).await;
    let (ra, rb) = tokio::join!(wa.collect_garbage(), wb.collect_garbage());
    ra.unwrap();
    rb.unwrap();
    assert_eq!(snapshot(&mut read, 79).await, model_at(&all, 79));
    assert_no_dangling_and_no_leaks(&blob, &consensus, shard).await;
    let superseded = a
        .metrics()
        .compactions
        .with_label_values(&["superseded"])
        .get()
        + b.metrics()
            .compactions
            .with_label_values(&["superseded"])
            .get();
    let applied = a
        .metrics()
        .compactions
        .with_label_values(&["applied"])
        .get()
        + b.metrics()
            .compactions
            .with_label_values(&["applied"])
            .get();
    assert!(applied > 0, "applied {applied}, superseded {superseded}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_keeps_parts_a_reader_holds_until_it_returns_them() {
    let (blob, consensus) = mem();
    let client = process(&blob, &consensus);
    let shard = ShardId::new();
    let (mut write, mut holder) = expect_open::<String, String, u64, i64>(&client, shard).await;
    let mut all = Vec::new();
    for t in 0..10u64 {
        append_at(&mut write, t).await;
        all.extend(updates_at(t));
    }
    // The holder leases the parts of a snapshot and keeps them.
    let held = holder.snapshot(f(9)).await.unwrap();
    let held_keys: Vec<String> = held.iter().map(|p| p.part.key.clone()).collect();
    // Meanwhile the shard moves on: the since advances past the snapshot,
    // batches merge, rollups are written and garbage is collected.
    let mut follower = client
        .open_leased_reader::<String, String, u64, i64>(
            shard,
            Arc::new(SimpleSchema::new()),
            Arc::new(SimpleSchema::new()),
            Diagnostics::for_tests(),
        )
        .await
        .unwrap();
    holder.downgrade_since(&f(9)).await.unwrap();
    for t in 10..60u64 {
        append_at(&mut write, t).await;
        all.extend(updates_at(t));
        follower.downgrade_since(&f(t)).await.unwrap();
        holder.maybe_downgrade_since(&f(t)).await.unwrap();
    }
    write.compact().await.unwrap();
    write.collect_garbage().await.unwrap();
    let replaced: Vec<&String> = {
        let live = write.machine.fetch_latest().await.unwrap().part_keys();
        held_keys.iter().filter(|k| !live.contains(*k)).collect()
    };
    assert!(!replaced.is_empty(), "compaction replaced the held parts");
    // Every held part is still readable, and reads what it did.
    let fetcher = client
        .create_batch_fetcher::<String, String, u64, i64>(
            shard,
            Arc::new(SimpleSchema::new()),
            Arc::new(SimpleSchema::new()),
            Diagnostics::for_tests(),
        )
        .await
        .unwrap();
    let mut got: Vec<Update> = Vec::new();
    for part in &held {
        let fetched = fetcher.fetch_leased_part(part).await.expect("held part");
        got.extend(fetched.map(|((k, v), t, d)| ((k.unwrap(), v.unwrap()), t, d)));
    }
    differential_dataflow::consolidation::consolidate_updates(&mut got);
    assert_eq!(got, model_at(&all[..], 9));
    // Once returned (and the holder moves on), GC deletes them.
    for part in held {
        holder.process_returned_leased_part(part);
    }
    holder.downgrade_since(&f(59)).await.unwrap();
    for t in 60..90u64 {
        append_at(&mut write, t).await;
        follower.downgrade_since(&f(t)).await.unwrap();
        holder.downgrade_since(&f(t)).await.unwrap();
    }
    settle(&[&write]).await;
    write.collect_garbage().await.unwrap();
    for key in replaced {
        assert_eq!(blob.get(key).await.unwrap(), None, "{key} was collected");
    }
    assert_no_dangling_and_no_leaks(&blob, &consensus, shard).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finalize_deletes_every_blob_after_compaction_and_rollups() {
    let (blob, consensus) = mem();
    let client = process(&blob, &consensus);
    let shard = ShardId::new();
    let (mut write, mut read) = expect_open::<String, String, u64, i64>(&client, shard).await;
    for t in 0..40u64 {
        append_at(&mut write, t).await;
        read.downgrade_since(&f(t)).await.unwrap();
    }
    write.compact().await.unwrap();
    assert!(!blob_keys(&blob, shard).await.is_empty());
    write
        .append(std::iter::empty::<&Update>(), f(40), Antichain::new())
        .await
        .unwrap()
        .unwrap();
    read.downgrade_since(&Antichain::new()).await.unwrap();
    write.expire().await;
    read.expire().await;
    client
        .finalize_shard::<String, String, u64, i64>(shard, Diagnostics::for_tests())
        .await
        .unwrap();
    assert_eq!(blob_keys(&blob, shard).await, BTreeSet::new());
    // A fresh process reads the tombstone without any rollup.
    let other = process(&blob, &consensus);
    assert!(
        other
            .is_finalized::<String, String, u64, i64>(shard, Diagnostics::for_tests())
            .await
            .unwrap()
    );
}

/// One step of the model-based test.
#[derive(Debug, Clone)]
enum Op {
    /// Append the next time's updates through writer 0 or 1.
    Append(usize),
    /// Move the since forward by this much (up to the upper).
    Since(u64),
    /// Compact through writer 0 or 1.
    Compact(usize),
    /// Collect garbage.
    Gc,
    /// Check a snapshot at the since plus this much (if readable).
    Check(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..2usize).prop_map(Op::Append),
        2 => (0..4u64).prop_map(Op::Since),
        1 => (0..2usize).prop_map(Op::Compact),
        1 => Just(Op::Gc),
        2 => (0..6u64).prop_map(Op::Check),
    ]
}

/// Runs `ops` on a shard whose blob and consensus fail (determinately and
/// indeterminately) at random, checking every snapshot against the model,
/// then checks the shard holds nothing dangling or leaked.
async fn run_model(seed: u64, ops: Vec<Op>) {
    let (inner_blob, inner_consensus) = mem();
    let handle = UnreliableHandle::new(seed, 0.9, 0.1);
    let blob: Arc<dyn Blob> =
        Arc::new(UnreliableBlob::new(Arc::clone(&inner_blob), handle.clone()));
    let consensus: Arc<dyn Consensus> = Arc::new(UnreliableConsensus::new(
        Arc::clone(&inner_consensus),
        handle.clone(),
    ));
    let shard = ShardId::new();
    let (p0, p1) = (process(&blob, &consensus), process(&blob, &consensus));
    let (w0, mut read) = expect_open::<String, String, u64, i64>(&p0, shard).await;
    let (w1, _r1) = expect_open::<String, String, u64, i64>(&p1, shard).await;
    let mut writers = [w0, w1];
    let mut all: Vec<Update> = Vec::new();
    let (mut upper, mut since) = (0u64, 0u64);
    let mut checked = BTreeMap::new();
    for op in ops {
        match op {
            Op::Append(i) => {
                let w = &mut writers[i];
                w.fetch_recent_upper().await.unwrap();
                append_at(w, upper).await;
                all.extend(updates_at(upper));
                upper += 1;
            }
            Op::Since(by) => {
                since = (since + by).min(upper.saturating_sub(1));
                read.downgrade_since(&f(since)).await.unwrap();
            }
            Op::Compact(i) => {
                writers[i].compact().await.unwrap();
            }
            Op::Gc => writers[0].collect_garbage().await.unwrap(),
            Op::Check(by) => {
                let as_of = since + by;
                if as_of < upper {
                    let got = snapshot(&mut read, as_of).await;
                    assert_eq!(got, model_at(&all, as_of), "snapshot at {as_of}");
                    *checked.entry(as_of).or_insert(0) += 1;
                }
            }
        }
    }
    handle.totally_available();
    settle(&[&writers[0], &writers[1]]).await;
    writers[0].collect_garbage().await.unwrap();
    if upper > 0 {
        assert_eq!(
            snapshot(&mut read, upper - 1).await,
            model_at(&all, upper - 1)
        );
    }
    assert_no_dangling_and_no_leaks(&inner_blob, &inner_consensus, shard).await;
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    #[test]
    fn shards_match_a_model_under_faults(
        seed in any::<u64>(),
        ops in proptest::collection::vec(op(), 1..80),
    ) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(run_model(seed, ops));
    }
}
