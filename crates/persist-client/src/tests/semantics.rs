//! Semantics the issue adds beyond the seed tests: fencing, leases,
//! finalization, read bounds, faults, corruption, partial orders and
//! batch hand-off.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use persist::mem::{MemBlob, MemConsensus};
use persist::unreliable::{UnreliableBlob, UnreliableConsensus, UnreliableHandle};
use persist::{Blob, BlobMetadata};
use persist_types::{ShardId, StringSchema};
use proptest::prelude::*;
use timely::order::Product;
use timely::progress::Antichain;

use super::*;
use crate::{
    CONTROLLER_CRITICAL_SINCE, ClientError, Diagnostics, InvalidUsage, ListenEvent, PersistClient,
    PersistConfig, ShardError, Since,
};

fn client_with(cfg: PersistConfig) -> PersistClient {
    PersistClient::new(cfg, Arc::new(MemBlob::new()), Arc::new(MemConsensus::new()))
}

async fn blob_keys(blob: &Arc<dyn Blob>, prefix: &str) -> Vec<String> {
    let mut keys = Vec::new();
    blob.list_keys_and_metadata(prefix, &mut |m: BlobMetadata| keys.push(m.key))
        .await
        .unwrap();
    keys.sort();
    keys
}

/// A critical since moves only with the current token; a stale token gets
/// the current one back and changes nothing.
#[tokio::test]
async fn critical_since_is_fenced_by_its_opaque_token() {
    let client = PersistClient::new_for_tests().await;
    let shard = ShardId::new();
    let (mut write, read) = expect_open::<String, String, u64, i64>(&client, shard).await;
    expect_compare_and_append(&mut write, &updates(5), 0, 5).await;
    read.expire().await;
    let open = || {
        client.open_critical_since::<String, String, u64, i64, u64>(
            shard,
            CONTROLLER_CRITICAL_SINCE,
            Diagnostics::for_tests(),
        )
    };
    let mut epoch1 = open().await.unwrap();
    assert_eq!((epoch1.opaque(), epoch1.since()), (&0, &f(0)));
    // Epoch 1 takes over from the initial token and holds the since at 2.
    assert_eq!(
        epoch1
            .compare_and_downgrade_since(&0, (&1, &f(2)))
            .await
            .unwrap(),
        Ok(f(2))
    );
    // Epoch 2 (another controller) fences epoch 1 out.
    let mut epoch2 = open().await.unwrap();
    assert_eq!((epoch2.opaque(), epoch2.since()), (&1, &f(2)));
    assert_eq!(
        epoch2
            .compare_and_downgrade_since(&1, (&2, &f(3)))
            .await
            .unwrap(),
        Ok(f(3))
    );
    assert_eq!(
        epoch1
            .compare_and_downgrade_since(&1, (&1, &f(4)))
            .await
            .unwrap(),
        Err(2),
        "a stale token is refused with the current one"
    );
    assert_eq!(epoch1.opaque(), &2);
    // The refused call changed nothing: the since is epoch 2's.
    let mut reader = client
        .open_leased_reader::<String, String, u64, i64>(
            shard,
            Arc::new(StringSchema::new()),
            Arc::new(StringSchema::new()),
            Diagnostics::for_tests(),
        )
        .await
        .unwrap();
    assert_eq!(reader.since(), &f(3));
    assert_eq!(
        reader.snapshot_and_fetch(f(2)).await.unwrap_err(),
        ClientError::Since(Since(f(3)))
    );
    // Rate limiting never delays the final downgrade.
    client
        .cfg()
        .update(|c| c.since_downgrade_interval = Duration::from_secs(3600));
    assert!(
        epoch2
            .maybe_compare_and_downgrade_since(&2, (&2, &f(4)))
            .await
            .is_none()
    );
    assert_eq!(
        epoch2
            .maybe_compare_and_downgrade_since(&2, (&2, &Antichain::new()))
            .await
            .unwrap()
            .unwrap(),
        Ok(Antichain::new())
    );
    // A since handle with another token type is a usage error.
    let err = client
        .open_critical_since::<String, String, u64, i64, i64>(
            shard,
            CONTROLLER_CRITICAL_SINCE,
            Diagnostics::for_tests(),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::InvalidUsage(InvalidUsage::OpaqueCodecMismatch { .. })
        ),
        "{err:?}"
    );
}

/// A reader that stops heartbeating loses its hold on the since once its
/// lease lapses and another transition runs.
#[tokio::test]
async fn lease_expiry_releases_the_since() {
    let client = client_with(PersistConfig {
        reader_lease_duration: Duration::from_millis(100),
        ..PersistConfig::new_for_tests()
    });
    let shard = ShardId::new();
    let (mut write, mut hung) = expect_open::<String, String, u64, i64>(&client, shard).await;
    let mut live = hung.clone("live").await.unwrap();
    expect_compare_and_append(&mut write, &updates(5), 0, 5).await;
    live.downgrade_since(&f(4)).await.unwrap();
    hung.stop_heartbeats();
    // The hung reader still holds the since at 0.
    assert_eq!(write.machine.cached().since, f(0));
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Any transition expires it (here the live reader's downgrade).
    live.downgrade_since(&f(4)).await.unwrap();
    assert_eq!(write.machine.cached().since, f(4));
    let err = hung.downgrade_since(&f(5)).await.unwrap_err();
    assert!(
        matches!(err, ClientError::Shard(ShardError::Expired { .. })),
        "{err:?}"
    );
}

/// Finalizing needs an empty since and upper, deletes every blob of the
/// shard, and leaves a tombstone that later opens report.
#[tokio::test]
async fn finalize_deletes_blobs_and_leaves_a_tombstone() {
    let client = PersistClient::new_for_tests().await;
    let shard = ShardId::new();
    let (mut write, mut read) = expect_open::<String, String, u64, i64>(&client, shard).await;
    expect_compare_and_append(&mut write, &updates(10), 0, 10).await;
    let prefix = format!("{shard}/");
    assert!(!blob_keys(client.blob(), &prefix).await.is_empty());

    let finalize =
        || client.finalize_shard::<String, String, u64, i64>(shard, Diagnostics::for_tests());
    let err = finalize().await.unwrap_err();
    assert_eq!(
        err,
        InvalidUsage::FinalizationError {
            since: f(0),
            upper: f(10)
        }
        .into()
    );
    let is_finalized =
        || client.is_finalized::<String, String, u64, i64>(shard, Diagnostics::for_tests());
    assert!(!is_finalized().await.unwrap());

    write.advance_upper(&Antichain::new()).await.unwrap();
    read.downgrade_since(&Antichain::new()).await.unwrap();
    // Closed but not yet finalized: still opens (there is nothing to do).
    let (closed_writer, closed_reader) =
        expect_open::<String, String, u64, i64>(&client, shard).await;
    assert!(closed_writer.upper().is_empty() && closed_reader.since().is_empty());
    drop((closed_writer, closed_reader));
    finalize().await.unwrap();
    assert!(is_finalized().await.unwrap());
    assert_eq!(
        blob_keys(client.blob(), &prefix).await,
        Vec::<String>::new()
    );
    // Idempotent.
    finalize().await.unwrap();

    // Opening again, even from a fresh client of the location, says so.
    let fresh = PersistClient::new(
        PersistConfig::new_for_tests(),
        Arc::clone(client.blob()),
        Arc::clone(client.consensus()),
    );
    for client in [&client, &fresh] {
        let err = client
            .open_writer::<String, String, u64, i64>(
                shard,
                Arc::new(StringSchema::new()),
                Arc::new(StringSchema::new()),
                Diagnostics::for_tests(),
            )
            .await
            .unwrap_err();
        assert_eq!(err, ShardError::Finalized { shard }.into());
        let err = client
            .open_leased_reader::<String, String, u64, i64>(
                shard,
                Arc::new(StringSchema::new()),
                Arc::new(StringSchema::new()),
                Diagnostics::for_tests(),
            )
            .await
            .unwrap_err();
        assert_eq!(err, ShardError::Finalized { shard }.into());
    }
    let state = client.inspect_shard::<u64>(shard).await.unwrap().unwrap();
    assert_eq!(state["finalized"], serde_json::json!(true));
    // Inspecting needs the right time type, but learning the codecs does not.
    let err = client.inspect_shard::<i64>(shard).await.unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::InvalidUsage(InvalidUsage::CodecMismatch(_))
        ),
        "{err:?}"
    );
    let codecs = client.shard_codecs(shard).await.unwrap().unwrap();
    assert_eq!((codecs.key.as_str(), codecs.ts.as_str()), ("String", "u64"));
    assert_eq!(client.shard_codecs(ShardId::new()).await.unwrap(), None);
}

/// An unleased snapshot reads what a reader would, and writes nothing.
#[tokio::test]
async fn unleased_snapshots_match_and_register_nothing() {
    let client = PersistClient::new_for_tests().await;
    let shard = ShardId::new();
    let (mut write, mut read) = expect_open::<String, String, u64, i64>(&client, shard).await;
    let data = updates(10);
    expect_compare_and_append(&mut write, &data[..6], 0, 6).await;
    let seqno =
        || async { client.inspect_shard::<u64>(shard).await.unwrap().unwrap()["seqno"].clone() };
    let before = seqno().await;
    let (k, v) = (Arc::new(StringSchema::new()), Arc::new(StringSchema::new()));
    let unleased = client
        .snapshot_unleased::<String, String, u64, i64>(shard, Arc::clone(&k), Arc::clone(&v), f(4))
        .await
        .unwrap();
    assert_eq!(before, seqno().await, "no state was written");
    assert_eq!(unleased, expect_snapshot_and_fetch(&mut read, 4).await);
    read.downgrade_since(&f(3)).await.unwrap();
    let err = client
        .snapshot_unleased::<String, String, u64, i64>(shard, k, v, f(2))
        .await
        .unwrap_err();
    assert_eq!(err, ClientError::Since(Since(f(3))));
}

/// A snapshot below the since fails with `Since`; at or beyond it, it is
/// served.
#[tokio::test]
async fn snapshot_below_the_since_fails() {
    let client = PersistClient::new_for_tests().await;
    let (mut write, mut read) =
        expect_open::<String, String, u64, i64>(&client, ShardId::new()).await;
    let data = updates(5);
    expect_compare_and_append(&mut write, &data, 0, 5).await;
    read.downgrade_since(&f(3)).await.unwrap();
    assert_eq!(
        read.snapshot_and_fetch(f(2)).await.unwrap_err(),
        ClientError::Since(Since(f(3)))
    );
    assert_eq!(
        expect_snapshot_and_fetch(&mut read, 3).await,
        all_ok(&data[..4], 3)
    );
    let err = read
        .clone("l")
        .await
        .unwrap()
        .listen(f(1))
        .await
        .unwrap_err();
    assert_eq!(err, ClientError::Since(Since(f(3))));
}

/// A part whose blob was corrupted is an error to the reader, not a panic,
/// and a missing one too.
#[tokio::test]
async fn corrupt_and_missing_parts_are_errors() {
    let client = PersistClient::new_for_tests().await;
    let shard = ShardId::new();
    let (mut write, mut read) = expect_open::<String, String, u64, i64>(&client, shard).await;
    expect_compare_and_append(&mut write, &updates(5), 0, 5).await;
    let keys = blob_keys(client.blob(), &format!("{shard}/")).await;
    assert_eq!(keys.len(), 1);
    let good = client.blob().get(&keys[0]).await.unwrap().unwrap();
    let mut bad = good.to_vec();
    let mid = bad.len() / 2;
    bad[mid] ^= 0xff;
    client.blob().set(&keys[0], Bytes::from(bad)).await.unwrap();
    let err = read.snapshot_and_fetch(f(4)).await.unwrap_err();
    assert!(
        matches!(&err, ClientError::Shard(ShardError::Part { key, .. }) if key == &keys[0]),
        "{err:?}"
    );
    let mut listen = expect_listen(&read, 0).await;
    assert!(listen.fetch_next().await.is_err());

    client.blob().delete(&keys[0]).await.unwrap();
    let err = read.snapshot_and_fetch(f(4)).await.unwrap_err();
    assert!(
        matches!(&err, ClientError::Shard(ShardError::Part { reason, .. }) if reason.contains("missing")),
        "{err:?}"
    );
    // Putting the bytes back makes it readable again: nothing was changed.
    client.blob().set(&keys[0], good).await.unwrap();
    assert_eq!(
        expect_snapshot_and_fetch(&mut read, 4).await,
        all_ok(&updates(5), 4)
    );
}

/// Two writers append through a consensus and a blob that fail often, some
/// failures after the operation took effect: every update lands exactly
/// once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_under_unreliable_storage_apply_exactly_once() {
    const BATCHES: u64 = 40;
    let unreliable = UnreliableHandle::new(42, 0.7, 0.15);
    let blob = Arc::new(UnreliableBlob::new(
        Arc::new(MemBlob::new()),
        unreliable.clone(),
    ));
    let consensus = Arc::new(UnreliableConsensus::new(
        Arc::new(MemConsensus::new()),
        unreliable.clone(),
    ));
    let client = PersistClient::new(PersistConfig::new_for_tests(), blob, consensus);
    let shard = ShardId::new();
    let data = updates(BATCHES * 3);
    let mut tasks = Vec::new();
    for _ in 0..2 {
        let (client, data) = (client.clone(), data.clone());
        tasks.push(tokio::spawn(async move {
            let (mut write, _) = expect_open::<String, String, u64, i64>(&client, shard).await;
            for b in 0..BATCHES {
                let (lower, upper) = (b * 3, b * 3 + 3);
                let chunk = &data[lower as usize..upper as usize];
                // Both writers append every batch; `append` lets the loser
                // see it is already there.
                write
                    .append(chunk, f(lower), f(upper))
                    .await
                    .unwrap()
                    .unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let stats = unreliable.stats();
    assert!(
        stats.indeterminate > 0,
        "the test must inject failures after effect: {stats:?}"
    );
    unreliable.totally_available();
    let (_, mut read) = expect_open::<String, String, u64, i64>(&client, shard).await;
    let max = BATCHES * 3 - 1;
    assert_eq!(
        expect_snapshot_and_fetch(&mut read, max).await,
        all_ok(&data, max)
    );
}

/// A batch moved to another "process" in its transmittable form and
/// appended there; appending a second copy of it loses nothing and deletes
/// nothing that state references.
#[tokio::test]
async fn a_second_copy_of_an_appended_batch_loses_nothing() {
    let client = PersistClient::new_for_tests().await;
    let shard = ShardId::new();
    let (mut write, mut read) = expect_open::<String, String, u64, i64>(&client, shard).await;
    let data = updates(6);
    let batch = write.batch(&data[..3], f(0), f(3)).await.unwrap();
    let sent = serde_json::to_string(&batch.into_transmittable_batch()).unwrap();
    let copy = || write_handle_batch(&sent);
    let (mut other, _) = expect_open::<String, String, u64, i64>(&client, shard).await;
    let mut first = other.batch_from_transmittable_batch(copy());
    other
        .compare_and_append_batch(&mut [&mut first], f(0), f(3))
        .await
        .unwrap()
        .unwrap();
    // The same batch again: its parts are in state, so it is recognised as
    // appended (a no-op), not applied twice.
    let mut second = write.batch_from_transmittable_batch(copy());
    let res = write
        .compare_and_append_batch(&mut [&mut second], f(0), f(3))
        .await
        .unwrap();
    assert_eq!(res, Ok(()));
    // Another copy appended over a later interval would be read twice:
    // refused, and nothing changes.
    let mut later = write.batch_from_transmittable_batch(copy());
    later.upper = f(4);
    let err = write
        .compare_and_append_batch(&mut [&mut later], f(3), f(4))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::InvalidUsage(InvalidUsage::BatchAlreadyAppended { .. })
        ),
        "{err:?}"
    );
    assert_eq!(write.fetch_recent_upper().await.unwrap(), &f(3));
    later.into_transmittable_batch();
    // Deleting a copy keeps the parts that state references.
    write.batch_from_transmittable_batch(copy()).delete().await;
    // And through `append_batch`, which treats it as already written.
    let third = write.batch_from_transmittable_batch(copy());
    write
        .append_batch(third, f(0), f(3))
        .await
        .unwrap()
        .unwrap();
    expect_compare_and_append(&mut write, &data[3..], 3, 6).await;
    assert_eq!(
        expect_snapshot_and_fetch(&mut read, 5).await,
        all_ok(&data, 5)
    );
    // A batch of another shard is refused.
    let (mut elsewhere, _) = expect_open::<String, String, u64, i64>(&client, ShardId::new()).await;
    let mut foreign = elsewhere.batch_from_transmittable_batch(copy());
    let err = elsewhere
        .compare_and_append_batch(&mut [&mut foreign], f(0), f(3))
        .await
        .unwrap_err();
    assert!(matches!(
        err,
        ClientError::InvalidUsage(InvalidUsage::BatchNotFromThisShard { .. })
    ));
    foreign.into_transmittable_batch();
}

fn write_handle_batch(json: &str) -> crate::TransmittableBatch {
    serde_json::from_str(json).unwrap()
}

type P = Product<u32, u32>;

/// With a partially ordered time, a snapshot at `as_of` plus a listen from
/// `as_of` hold every update exactly once, including updates at times
/// incomparable to `as_of`.
#[tokio::test]
async fn partially_ordered_snapshot_plus_listen_is_exact() {
    let client = PersistClient::new_for_tests().await;
    let shard = ShardId::new();
    let (mut write, read) = expect_open::<String, (), P, i64>(&client, shard).await;
    let p = |a, b| Product::new(a, b);
    // Batches [min, {(2,0),(0,2)}) and [{(2,0),(0,2)}, {(4,4)}).
    let mid = Antichain::from_iter([p(2, 0), p(0, 2)]);
    let end = Antichain::from_elem(p(4, 4));
    let first = vec![
        (("a".to_owned(), ()), p(0, 0), 1),
        (("b".to_owned(), ()), p(1, 1), 1),
    ];
    let second = vec![
        (("c".to_owned(), ()), p(2, 1), 1),
        (("d".to_owned(), ()), p(0, 3), 1),
        (("e".to_owned(), ()), p(3, 3), 1),
    ];
    write
        .compare_and_append(&first, Antichain::from_elem(p(0, 0)), mid.clone())
        .await
        .unwrap()
        .unwrap();
    write
        .compare_and_append(&second, mid.clone(), end.clone())
        .await
        .unwrap()
        .unwrap();
    // An as_of with one element: (1, 3). Times at or before it go to the
    // snapshot: (0,0), (1,1), (0,3). The rest, including (2,1) which is
    // incomparable to it, go to the listen.
    let as_of = Antichain::from_elem(p(1, 3));
    let mut snapshot_reader = read.clone("snapshot").await.unwrap();
    let snapshot = snapshot_reader
        .snapshot_and_fetch(as_of.clone())
        .await
        .unwrap();
    let mut keys: Vec<String> = snapshot
        .iter()
        .map(|((k, _), _, _)| k.clone().unwrap())
        .collect();
    assert!(snapshot.iter().all(|(_, t, _)| *t == p(1, 3)));
    let mut listen = read.listen(as_of.clone()).await.unwrap();
    let mut listened = Vec::new();
    while listen.frontier() != &end {
        for event in listen.fetch_next().await.unwrap() {
            if let ListenEvent::Updates(updates) = event {
                listened.extend(updates);
            }
        }
    }
    for ((k, _), t, _) in &listened {
        assert!(
            !timely::PartialOrder::less_equal(t, &p(1, 3)),
            "{t:?} belongs to the snapshot"
        );
        keys.push(k.clone().unwrap());
    }
    keys.sort();
    assert_eq!(keys, ["a", "b", "c", "d", "e"]);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Random appends: a listen never yields an update at a time at or
    /// before its as_of, and snapshot plus listen equal the data.
    #[test]
    fn listen_yields_only_times_beyond_its_as_of(
        batches in proptest::collection::vec(
            (1u64..4, proptest::collection::vec((0u8..6, 0u64..4, -2i64..3), 0..6)),
            1..6,
        ),
        as_of_pick in 0u64..20,
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let client = PersistClient::new_for_tests().await;
            let (mut write, read) = expect_open::<String, String, u64, i64>(&client, ShardId::new()).await;
            let mut all = Vec::new();
            let mut lower = 0;
            for (width, updates) in batches {
                let upper = lower + width;
                let chunk: Vec<Update> = updates
                    .into_iter()
                    .map(|(k, dt, d)| ((k.to_string(), String::new()), lower + dt % width, d))
                    .collect();
                expect_compare_and_append(&mut write, &chunk, lower, upper).await;
                all.extend(chunk);
                lower = upper;
            }
            let as_of = as_of_pick % lower;
            let mut reader = read.clone("snapshot").await.unwrap();
            let snapshot = expect_snapshot_and_fetch(&mut reader, as_of).await;
            let mut listen = read.listen(f(as_of)).await.unwrap();
            let mut seen: BTreeMap<(String, u64), i64> = BTreeMap::new();
            for ((k, _), t, d) in snapshot {
                *seen.entry((k.unwrap(), t)).or_default() += d;
            }
            while listen.frontier().less_than(&lower) {
                for event in listen.fetch_next().await.unwrap() {
                    if let ListenEvent::Updates(updates) = event {
                        for ((k, _), t, d) in updates {
                            assert!(t > as_of, "listen at {as_of} yielded time {t}");
                            *seen.entry((k.unwrap(), t)).or_default() += d;
                        }
                    }
                }
            }
            let mut expected: BTreeMap<(String, u64), i64> = BTreeMap::new();
            for ((k, _), t, d) in all {
                *expected.entry((k, t.max(as_of))).or_default() += d;
            }
            seen.retain(|_, d| *d != 0);
            expected.retain(|_, d| *d != 0);
            assert_eq!(seen, expected);
        });
    }
}

/// The client's metrics count what happened.
#[tokio::test]
async fn metrics_count_appends_bytes_and_handles() {
    let client = PersistClient::new_for_tests().await;
    let shard = ShardId::new();
    let (mut write, mut read) = expect_open::<String, String, u64, i64>(&client, shard).await;
    let data = updates(4);
    expect_compare_and_append(&mut write, &data, 0, 4).await;
    let stale = write
        .compare_and_append(&data[..1], f(0), f(1))
        .await
        .unwrap();
    assert!(stale.is_err());
    expect_snapshot_and_fetch(&mut read, 3).await;
    let m = client.metrics();
    assert_eq!(m.appends.with_label_values(&["committed"]).get(), 1);
    assert_eq!(m.appends.with_label_values(&["upper_mismatch"]).get(), 1);
    assert_eq!(m.appended_updates.get(), 4);
    let text = m.render();
    for name in [
        "persist_blob_bytes_total{op=\"set\"}",
        "persist_blob_bytes_total{op=\"get\"}",
        "persist_consensus_seconds_count{op=\"compare_and_set\"}",
        "persist_state_entry_bytes",
        "persist_batches",
    ] {
        assert!(text.contains(name), "{name} missing from:\n{text}");
    }
    let shard_label = shard.to_string();
    assert_eq!(
        m.handles
            .with_label_values(&[shard_label.as_str(), "writer"])
            .get(),
        1
    );
    assert!(
        m.state_entry_bytes
            .with_label_values(&[shard_label.as_str()])
            .get()
            > 0
    );
}

/// Parts a statistics filter skips are audited: one whose statistics lie
/// about its contents is reported and read after all.
#[tokio::test]
async fn stats_audits_catch_parts_whose_statistics_lie() {
    let client = PersistClient::new_for_tests().await; // Audits every skipped part.
    let (shard, other) = (ShardId::new(), ShardId::new());
    let row = |k: &str| ((k.to_owned(), "v".to_owned()), 0u64, 1i64);
    let (mut write, mut read) = expect_open::<String, String, u64, i64>(&client, shard).await;
    expect_compare_and_append(&mut write, &[row("a"), row("b")], 0, 1).await;
    let (mut write2, _) = expect_open::<String, String, u64, i64>(&client, other).await;
    expect_compare_and_append(&mut write2, &[row("z")], 0, 1).await;
    let wants_x_to_z = |stats: &persist::part::PartStats| stats.may_contain_key_range(b"x", b"zz");

    // Truthful statistics: the audit agrees and the part is skipped.
    let mut cursor = read.snapshot_cursor(f(0), wants_x_to_z).await.unwrap();
    assert!(cursor.next().await.is_none());
    let audits = |outcome: &str| {
        client
            .metrics()
            .stats_audits
            .with_label_values(&[outcome])
            .get()
    };
    assert_eq!((audits("right"), audits("wrong")), (1, 0));

    // Make the part hold "z" while its statistics still say "a" to "b".
    let ours = blob_keys(client.blob(), &format!("{shard}/"))
        .await
        .remove(0);
    let theirs = blob_keys(client.blob(), &format!("{other}/"))
        .await
        .remove(0);
    let bytes = client.blob().get(&theirs).await.unwrap().unwrap();
    client.blob().set(&ours, bytes).await.unwrap();
    let mut cursor = read.snapshot_cursor(f(0), wants_x_to_z).await.unwrap();
    let got = cursor.next().await.unwrap().unwrap();
    assert_eq!(got, vec![((Ok("z".to_owned()), Ok("v".to_owned())), 0, 1)]);
    assert_eq!((audits("right"), audits("wrong")), (1, 1));
}
