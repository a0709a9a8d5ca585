//! Regression tests for bugs found in review.

use std::sync::Arc;
use std::time::Duration;

use persist::mem::{MemBlob, MemConsensus};
use persist::unreliable::{UnreliableConsensus, UnreliableHandle};
use persist::{Blob, BlobMetadata};
use persist_types::ShardId;
use timely::order::Product;
use timely::progress::Antichain;

use super::*;
use crate::{ClientError, InvalidUsage, ListenEvent, PersistClient, PersistConfig};

type P = Product<u32, u32>;

fn p(a: u32, b: u32) -> P {
    Product::new(a, b)
}

async fn blob_keys(blob: &Arc<dyn Blob>) -> Vec<String> {
    let mut keys = Vec::new();
    blob.list_keys_and_metadata("", &mut |m: BlobMetadata| keys.push(m.key))
        .await
        .unwrap();
    keys.sort();
    keys
}

/// With partially ordered times, the join of a part's times can be at or
/// beyond the upper although no single time is: a batch of valid updates
/// must not be refused because two of them landed in one part.
#[tokio::test]
async fn partially_ordered_updates_sharing_a_part_are_not_beyond_the_upper() {
    // Each update is 1 (key) + 0 (value) + 16 bytes: the second add flushes
    // both into one part.
    let client = PersistClient::new(
        PersistConfig {
            blob_target_size: 34,
            ..PersistConfig::new_for_tests()
        },
        Arc::new(MemBlob::new()),
        Arc::new(MemConsensus::new()),
    );
    let (mut write, mut read) = expect_open::<String, (), P, i64>(&client, ShardId::new()).await;
    let data = vec![
        (("a".to_owned(), ()), p(2, 0), 1i64),
        (("b".to_owned(), ()), p(0, 2), 1i64),
    ];
    // Neither (2,0) nor (0,2) is at or beyond (2,2), though their join is.
    let upper = Antichain::from_elem(p(2, 2));
    write
        .compare_and_append(&data, Antichain::from_elem(p(0, 0)), upper.clone())
        .await
        .expect("valid usage")
        .expect("upper matches");
    let got = read
        .snapshot_and_fetch(Antichain::from_elem(p(2, 1)))
        .await
        .unwrap();
    assert_eq!(got.len(), 1, "{got:?}");
    // An update really beyond the upper is still refused after a flush.
    let mut builder = write.builder(upper.clone());
    for (k, t) in [("c", p(3, 2)), ("d", p(9, 9))] {
        builder.add(&k.to_owned(), &(), &t, &1).await.unwrap();
    }
    let err = builder
        .finish(Antichain::from_elem(p(5, 5)))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::InvalidUsage(InvalidUsage::UpdateBeyondUpper { .. })
        ),
        "{err:?}"
    );
}

/// `append` accepts a lower behind the shard's upper only if the shard's
/// upper lies in `[lower, upper)`. A shard upper incomparable to both is a
/// gap, not "already written": the append must fail, not silently succeed
/// and delete the data.
#[tokio::test]
async fn append_over_a_gap_with_partially_ordered_times_is_a_mismatch() {
    let client = PersistClient::new_for_tests().await;
    let (mut write, _read) = expect_open::<String, (), P, i64>(&client, ShardId::new()).await;
    let shard_upper = Antichain::from_elem(p(0, 5));
    write
        .compare_and_append(
            &[(("x".to_owned(), ()), p(0, 1), 1i64)],
            Antichain::from_elem(p(0, 0)),
            shard_upper.clone(),
        )
        .await
        .unwrap()
        .unwrap();
    // [(1,0), (2,2)) starts at a time the shard has not reached: times such
    // as (0,6) lie between the shard's upper and this batch.
    let res = write
        .append(
            &[(("y".to_owned(), ()), p(1, 0), 1i64)],
            Antichain::from_elem(p(1, 0)),
            Antichain::from_elem(p(2, 2)),
        )
        .await
        .expect("valid usage");
    let mismatch = res.expect_err("a gap is an upper mismatch");
    assert_eq!(mismatch.current, shard_upper);
    assert_eq!(write.fetch_recent_upper().await.unwrap(), &shard_upper);
}

/// `Listen::next` is cancel-safe: dropping it while it waits on consensus
/// (here, to downgrade the since) does not skip the batch it was reading.
#[tokio::test]
async fn a_cancelled_listen_next_skips_no_batch() {
    let faults = UnreliableHandle::new(7, 1.0, 0.0);
    let client = PersistClient::new(
        PersistConfig::new_for_tests(),
        Arc::new(MemBlob::new()),
        Arc::new(UnreliableConsensus::new(
            Arc::new(MemConsensus::new()),
            faults.clone(),
        )),
    );
    let (mut write, read) = expect_open::<String, String, u64, i64>(&client, ShardId::new()).await;
    let data = updates(3);
    expect_compare_and_append(&mut write, &data, 0, 3).await;
    let mut listen = read.listen(f(0)).await.unwrap();
    faults.totally_unavailable();
    let cancelled = tokio::time::timeout(Duration::from_millis(100), listen.next()).await;
    assert!(cancelled.is_err(), "consensus is down: next cannot finish");
    faults.totally_available();
    let events = tokio::time::timeout(Duration::from_secs(5), listen.fetch_next())
        .await
        .expect("the batch is still there to read")
        .unwrap();
    let mut got = Vec::new();
    for event in events {
        match event {
            ListenEvent::Updates(updates) => got.extend(updates),
            ListenEvent::Progress(progress) => assert_eq!(progress, f(3)),
        }
    }
    let expected: Vec<FetchedUpdate<String, String, u64, i64>> = data[1..]
        .iter()
        .map(|((k, v), t, d)| ((Ok(k.clone()), Ok(v.clone())), *t, *d))
        .collect();
    got.sort();
    assert_eq!(got, expected);
}

/// Two copies of one batch in a single append would be read twice.
#[tokio::test]
async fn two_copies_of_a_batch_in_one_append_are_refused() {
    let client = PersistClient::new_for_tests().await;
    let (mut write, mut read) =
        expect_open::<String, String, u64, i64>(&client, ShardId::new()).await;
    let data = updates(3);
    let batch = write.batch(&data, f(0), f(3)).await.unwrap();
    let sent = batch.into_transmittable_batch();
    let mut one = write.batch_from_transmittable_batch(sent.clone());
    let mut two = write.batch_from_transmittable_batch(sent.clone());
    let res = write
        .compare_and_append_batch(&mut [&mut one, &mut two], f(0), f(3))
        .await;
    assert!(
        matches!(
            res,
            Err(ClientError::InvalidUsage(
                InvalidUsage::BatchAlreadyAppended { .. }
            ))
        ),
        "{res:?}"
    );
    one.into_transmittable_batch();
    two.into_transmittable_batch();
    // The batch once is fine.
    let mut once = write.batch_from_transmittable_batch(sent);
    write
        .compare_and_append_batch(&mut [&mut once], f(0), f(3))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        expect_snapshot_and_fetch(&mut read, 2).await,
        all_ok(&data, 2)
    );
}

/// An append of an already appended batch together with a new one is not
/// a retry of the first append: reporting success would lose the new one.
#[tokio::test]
async fn an_appended_batch_does_not_carry_a_new_one_through() {
    let client = PersistClient::new_for_tests().await;
    let blob = Arc::clone(client.blob());
    let (mut write, mut read) =
        expect_open::<String, String, u64, i64>(&client, ShardId::new()).await;
    let data = updates(3);
    let sent = write
        .batch(&data, f(0), f(3))
        .await
        .unwrap()
        .into_transmittable_batch();
    let mut first = write.batch_from_transmittable_batch(sent.clone());
    write
        .compare_and_append_batch(&mut [&mut first], f(0), f(3))
        .await
        .unwrap()
        .unwrap();
    let mut copy = write.batch_from_transmittable_batch(sent);
    let fresh: Vec<Update> = (0..3)
        .map(|i| ((format!("new{i}"), String::new()), i, 1))
        .collect();
    let mut new = write.batch(&fresh, f(0), f(3)).await.unwrap();
    let new_keys = new.part_keys();
    let res = write
        .compare_and_append_batch(&mut [&mut copy, &mut new], f(0), f(3))
        .await;
    assert!(
        !matches!(res, Ok(Ok(()))),
        "the new batch is not in the shard, yet the append reported success"
    );
    copy.into_transmittable_batch();
    new.delete().await;
    let keys = blob_keys(&blob).await;
    assert!(new_keys.iter().all(|k| !keys.contains(k)));
    assert_eq!(
        expect_snapshot_and_fetch(&mut read, 2).await,
        all_ok(&data, 2)
    );
}

/// `append` consumes the batch it writes: when the append cannot land
/// (the shard has not reached its lower) its parts are deleted, not leaked.
#[tokio::test]
async fn a_non_contiguous_append_leaves_no_parts_behind() {
    let client = PersistClient::new_for_tests().await;
    let blob = Arc::clone(client.blob());
    let (mut write, _read) = expect_open::<String, String, u64, i64>(&client, ShardId::new()).await;
    expect_compare_and_append(&mut write, &updates(3), 0, 3).await;
    let before = blob_keys(&blob).await;
    let data: Vec<Update> = vec![(("k".to_owned(), "v".to_owned()), 5, 1)];
    let res = write.append(&data, f(5), f(6)).await.unwrap();
    assert_eq!(res.unwrap_err().current, f(3));
    assert_eq!(blob_keys(&blob).await, before);
}

/// A `snapshot_and_fetch` dropped while it fetches returns its parts'
/// leases: otherwise they pin the state they came from for as long as the
/// reader lives.
#[tokio::test]
async fn a_cancelled_snapshot_and_fetch_returns_its_leases() {
    let faults = UnreliableHandle::new(7, 1.0, 0.0);
    let client = PersistClient::new(
        PersistConfig::new_for_tests(),
        Arc::new(persist::unreliable::UnreliableBlob::new(
            Arc::new(MemBlob::new()),
            faults.clone(),
        )),
        Arc::new(MemConsensus::new()),
    );
    let (mut write, mut read) =
        expect_open::<String, String, u64, i64>(&client, ShardId::new()).await;
    expect_compare_and_append(&mut write, &updates(3), 0, 3).await;
    let seqno = read.machine.cached().seqno;
    faults.totally_unavailable();
    let cancelled =
        tokio::time::timeout(Duration::from_millis(100), read.snapshot_and_fetch(f(2))).await;
    assert!(cancelled.is_err(), "blob is down: the fetch cannot finish");
    assert!(!read.leases.is_leased(seqno), "the leases were returned");
    faults.totally_available();
    assert_eq!(
        expect_snapshot_and_fetch(&mut read, 2).await,
        all_ok(&updates(3), 2)
    );
}

/// Opening a critical since handle reports the reader's current since and
/// token, even when this process's cached state is older than another
/// process's downgrade.
#[tokio::test]
async fn an_opened_since_handle_is_not_stale() {
    let (blob, consensus): (Arc<dyn Blob>, Arc<dyn persist::Consensus>) =
        (Arc::new(MemBlob::new()), Arc::new(MemConsensus::new()));
    // Two processes: two clients, each with its own state cache.
    let a = PersistClient::new(
        PersistConfig::new_for_tests(),
        Arc::clone(&blob),
        Arc::clone(&consensus),
    );
    let b = PersistClient::new(PersistConfig::new_for_tests(), blob, consensus);
    let shard = ShardId::new();
    let (mut write, read) = expect_open::<String, String, u64, i64>(&a, shard).await;
    expect_compare_and_append(&mut write, &updates(5), 0, 5).await;
    read.expire().await;
    let open = |client: PersistClient| async move {
        client
            .open_critical_since::<String, String, u64, i64, u64>(
                shard,
                crate::CONTROLLER_CRITICAL_SINCE,
                Diagnostics::for_tests(),
            )
            .await
            .unwrap()
    };
    let first = open(a.clone()).await;
    assert_eq!((first.opaque(), first.since()), (&0, &f(0)));
    let mut other = open(b).await;
    assert_eq!(
        other
            .compare_and_downgrade_since(&0, (&1, &f(3)))
            .await
            .unwrap(),
        Ok(f(3))
    );
    // `write` keeps a's cached state alive (and stale).
    let again = open(a).await;
    assert_eq!((again.opaque(), again.since()), (&1, &f(3)));
    assert!(!again.allows_reads_at(&f(2)));
    drop(write);
}

/// An exchanged part comes from another process: a corrupt one is refused
/// when it is decoded, not a panic when it is turned back into a part.
#[tokio::test]
async fn a_corrupt_exchanged_part_does_not_panic() {
    let client = PersistClient::new_for_tests().await;
    let (mut write, mut read) =
        expect_open::<String, String, u64, i64>(&client, ShardId::new()).await;
    expect_compare_and_append(&mut write, &updates(3), 0, 3).await;
    let mut parts = read.snapshot(f(2)).await.unwrap();
    let part = parts.pop().unwrap();
    let mut json = serde_json::to_value(part.into_exchangeable_part()).unwrap();
    json["lower"] = serde_json::json!([]);
    let decoded: Result<crate::SerdeLeasedBatchPart, _> = serde_json::from_value(json);
    assert!(decoded.is_err(), "an empty lower is refused");
}
