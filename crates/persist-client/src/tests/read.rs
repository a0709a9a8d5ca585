//! The read side: seed 001's tests against our API.

use std::str::FromStr;
use std::sync::Arc;

use futures::StreamExt;
use persist::mem::{MemBlob, MemConsensus};
use persist::unreliable::{UnreliableConsensus, UnreliableHandle};
use persist_types::{ShardId, StringSchema};
use serde::{Deserialize, Serialize};

use super::*;
use crate::{LeasedReaderId, ListenEvent, PersistClient, PersistConfig};

/// A subscribe dropped while it still holds snapshot parts does not panic
/// or leak its reader.
#[tokio::test]
async fn drop_unused_subscribe() {
    let data = updates(3);
    let client = PersistClient::new_for_tests().await;
    let (mut write, read) = expect_open::<String, String, u64, i64>(&client, ShardId::new()).await;
    expect_compare_and_append(&mut write, &data[0..1], 0, 1).await;
    expect_compare_and_append(&mut write, &data[1..2], 1, 2).await;
    expect_compare_and_append(&mut write, &data[2..3], 2, 3).await;
    let subscribe = read.subscribe(f(2)).await.unwrap();
    assert!(
        !subscribe.snapshot_parts().unwrap().is_empty(),
        "the test needs snapshot parts"
    );
    drop(subscribe);
}

/// Identical updates within a part are summed, and those that cancel out
/// are dropped.
#[tokio::test]
async fn streaming_consolidate() {
    let kv = |k: &str| (k.to_owned(), "v".to_owned());
    let data = vec![
        (kv("k"), 0u64, 1i64),
        (kv("k"), 1, 1),
        (kv("k"), 2, 1),
        (kv("k2"), 0, 1),
        (kv("k2"), 1, -1),
    ];
    let client = PersistClient::new_for_tests().await;
    // One part for the whole batch.
    client.cfg().update(|c| c.blob_target_size = 1000);
    let (mut write, read) = expect_open::<String, String, u64, i64>(&client, ShardId::new()).await;
    expect_compare_and_append(&mut write, &data, 0, 5).await;
    let mut subscribe = read.subscribe(f(4)).await.unwrap();
    let mut got = vec![];
    'outer: loop {
        for event in subscribe.fetch_next().await.unwrap() {
            match event {
                ListenEvent::Progress(t) if !t.less_than(&4) => break 'outer,
                ListenEvent::Progress(_) => {}
                ListenEvent::Updates(updates) => got.extend(updates),
            }
        }
    }
    assert_eq!(got, vec![((Ok("k".to_owned()), Ok("v".to_owned())), 4, 3)]);
}

#[tokio::test]
async fn snapshot_and_stream() {
    let mut data = vec![
        (("k1".to_owned(), "v1".to_owned()), 0u64, 1i64),
        (("k2".to_owned(), "v2".to_owned()), 1, 1),
        (("k3".to_owned(), "v3".to_owned()), 2, 1),
        (("k4".to_owned(), "v4".to_owned()), 2, 1),
        (("k5".to_owned(), "v5".to_owned()), 3, 1),
    ];
    let client = PersistClient::new_for_tests().await;
    // Every update in a part of its own.
    client.cfg().update(|c| c.blob_target_size = 0);
    let (mut write, mut read) =
        expect_open::<String, String, u64, i64>(&client, ShardId::new()).await;
    expect_compare_and_append(&mut write, &data[0..2], 0, 2).await;
    expect_compare_and_append(&mut write, &data[2..4], 2, 3).await;
    expect_compare_and_append(&mut write, &data[4..], 3, 4).await;
    let parts = read.snapshot_parts_stats(f(3)).await.unwrap();
    assert_eq!(parts.parts.len(), 5);

    let mut stream = std::pin::pin!(read.snapshot_and_stream(f(3)).await.unwrap());
    let mut rows = vec![];
    while let Some(update) = stream.next().await {
        let ((k, v), t, d) = update.unwrap();
        rows.push(((k.unwrap(), v.unwrap()), t, d));
    }
    for (_, t, _) in data.iter_mut() {
        *t = (*t).max(3);
    }
    assert_eq!(rows, data);
}

/// A reader's SeqNo hold stays at the oldest state it still has parts of
/// out, and moves on as soon as those parts come back.
#[tokio::test]
async fn seqno_leases() {
    let data = updates(20);
    let shard = ShardId::new();
    let client = PersistClient::new_for_tests().await;
    let (mut write, read) = expect_open::<String, String, u64, i64>(&client, shard).await;
    for i in 0..2 {
        expect_compare_and_append(&mut write, &data[i..=i], i as u64, i as u64 + 1).await;
    }
    let fetcher = client
        .create_batch_fetcher::<String, String, u64, i64>(
            shard,
            Arc::new(StringSchema::new()),
            Arc::new(StringSchema::new()),
            crate::Diagnostics::for_tests(),
        )
        .await
        .unwrap();
    let mut subscribe = read.subscribe(f(1)).await.unwrap();
    let seqno_since = |s: &mut crate::Subscribe<String, String, u64, i64>| {
        s.listen().handle().machine.cached().seqno_since()
    };
    let original = seqno_since(&mut subscribe);

    // Collect parts while writing more; the hold does not move while they
    // are out, however often the since is downgraded.
    let mut parts = vec![];
    for i in 2..6 {
        for event in subscribe.next().await.unwrap() {
            if let ListenEvent::Updates(mut new) = event {
                parts.append(&mut new);
                let since = subscribe.listen().since().clone();
                subscribe
                    .listen()
                    .handle()
                    .downgrade_since(&since)
                    .await
                    .unwrap();
            }
        }
        expect_compare_and_append(&mut write, &data[i..=i], i as u64, i as u64 + 1).await;
        assert_eq!(seqno_since(&mut subscribe), original);
    }
    assert!(!parts.is_empty());

    // Return them one by one (fetching each, with new parts exchanged in
    // the meantime): the hold moves once no part of its SeqNo is out.
    let mut held = seqno_since(&mut subscribe);
    let mut exchanged = vec![];
    let mut last_seqno = None;
    for (n, part) in parts.into_iter().enumerate() {
        let part_seqno = part.leased_seqno.unwrap();
        assert!(last_seqno.is_none_or(|last| last <= part_seqno));
        last_seqno = Some(part_seqno);
        fetcher.fetch_leased_part(&part).await.unwrap();
        subscribe.return_leased_part(part);
        for event in subscribe.next().await.unwrap() {
            if let ListenEvent::Updates(new) = event {
                exchanged.extend(new.into_iter().map(|p| p.into_exchangeable_part()));
            }
        }
        let since = subscribe.listen().since().clone();
        subscribe
            .listen()
            .handle()
            .downgrade_since(&since)
            .await
            .unwrap();
        let i = n + 6;
        expect_compare_and_append(&mut write, &data[i..=i], i as u64, i as u64 + 1).await;
        let released = !subscribe.listen().handle().leases.is_leased(part_seqno);
        let now = seqno_since(&mut subscribe);
        if released {
            assert!(now > held, "{now:?} > {held:?}");
        } else {
            assert_eq!(now, held);
        }
        held = now;
    }
    assert!(held > original);
    for part in exchanged {
        let part = subscribe.leased_part_from_exchangeable(part);
        subscribe.return_leased_part(part);
    }
}

#[test]
fn reader_id_human_readable_serde() {
    #[derive(Debug, Serialize, Deserialize)]
    struct Container {
        reader_id: LeasedReaderId,
    }
    let id = LeasedReaderId::from_str("r00000000-1234-5678-0000-000000000000").unwrap();
    assert_eq!(
        id,
        serde_json::from_value(serde_json::to_value(id).unwrap()).unwrap()
    );
    assert_eq!(
        id,
        serde_json::from_str("\"r00000000-1234-5678-0000-000000000000\"").unwrap()
    );
    let json = serde_json::json!({ "reader_id": id });
    assert_eq!(
        json.to_string(),
        "{\"reader_id\":\"r00000000-1234-5678-0000-000000000000\"}"
    );
    let container: Container = serde_json::from_value(json).unwrap();
    assert_eq!(container.reader_id, id);
}

/// A listen serves what its cached state already covers without asking
/// consensus: with consensus down it still reads everything appended.
#[tokio::test]
async fn skip_consensus_fetch_optimization() {
    let data = updates(3);
    let unreliable = UnreliableHandle::new(7, 1.0, 0.0);
    unreliable.totally_available();
    let consensus = Arc::new(UnreliableConsensus::new(
        Arc::new(MemConsensus::new()),
        unreliable.clone(),
    ));
    let cfg = PersistConfig {
        // No since downgrades (which need consensus) during the test, and
        // no compaction, which may merge the batches the listen steps through.
        since_downgrade_interval: std::time::Duration::from_secs(3600),
        compaction_enabled: false,
        ..PersistConfig::new_for_tests()
    };
    let client = PersistClient::new(cfg, Arc::new(MemBlob::new()), consensus);
    let (mut write, mut read) =
        expect_open::<String, String, u64, i64>(&client, ShardId::new()).await;
    expect_compare_and_append(&mut write, &data[0..1], 0, 1).await;
    expect_compare_and_append(&mut write, &data[1..2], 1, 2).await;
    expect_compare_and_append(&mut write, &data[2..3], 2, 3).await;
    let snapshot = expect_snapshot_and_fetch(&mut read, 2).await;
    let mut listen = read.listen(f(0)).await.unwrap();
    assert_eq!(
        listen.fetch_next().await.unwrap(),
        vec![ListenEvent::Progress(f(1))]
    );
    unreliable.totally_unavailable();
    assert_eq!(snapshot, all_ok(&data, 2));
    let expected: Vec<_> = data[1..]
        .iter()
        .map(|((k, v), t, d)| ((Ok(k.clone()), Ok(v.clone())), *t, *d))
        .collect();
    assert_eq!(listen.read_until(&3).await, (expected, f(3)));
}

proptest::proptest! {
    /// `consolidate_runs` agrees with differential's consolidation.
    #[test]
    fn consolidate_runs_matches_differential(
        mut updates in proptest::collection::vec(((0u8..4, 0u8..3), 0u64..4, -2i64..3), 0..60),
    ) {
        let mut expected = updates.clone();
        differential_dataflow::consolidation::consolidate_updates(&mut expected);
        crate::read::consolidate_runs(&mut updates);
        proptest::prop_assert_eq!(updates, expected);
    }
}

/// A `LeaseReturner` releases the leases of parts its reader handed out,
/// from elsewhere (here: after the parts crossed the exchangeable form, as
/// they do between timely workers), and refuses another reader's parts.
#[tokio::test]
async fn lease_returner_releases_parts_of_its_reader_only() {
    let client = PersistClient::new_for_tests().await;
    let shard = ShardId::new();
    let (mut write, mut read) = expect_open::<String, String, u64, i64>(&client, shard).await;
    expect_compare_and_append(&mut write, &updates(3), 0, 3).await;
    let (_, mut other) = expect_open::<String, String, u64, i64>(&client, shard).await;
    let returner = read.lease_returner();
    assert_eq!(returner.reader_id(), read.reader_id());
    let parts = read.snapshot(f(2)).await.expect("snapshot");
    let seqno = parts[0].leased_seqno.expect("leased");
    assert!(read.leases.is_leased(seqno));
    // Another reader's part is refused and stays leased by that reader.
    let foreign = other.snapshot(f(2)).await.expect("snapshot");
    let foreign_seqno = foreign[0].leased_seqno.expect("leased");
    for part in foreign {
        returner.return_leased_part(part);
    }
    assert!(other.leases.is_leased(foreign_seqno));
    let sent: Vec<_> = parts
        .into_iter()
        .map(|p| p.into_exchangeable_part())
        .collect();
    let returner_elsewhere = returner.clone();
    tokio::spawn(async move {
        for part in sent {
            returner_elsewhere
                .return_leased_part(crate::LeasedBatchPart::<u64>::from_exchangeable(part));
        }
    })
    .await
    .expect("returned");
    assert!(!read.leases.is_leased(seqno), "every part came back");
}

/// A write handle keeps its batch buffers, the encoded part's allocation
/// included once the blob is done with it, and reuses them: later batches
/// encode into the same memory and read back the same.
#[tokio::test]
async fn write_handles_reuse_their_part_buffers() {
    let dir = tempfile::tempdir().unwrap();
    let blob = persist::file::FileBlob::open(dir.path()).await.unwrap();
    let client = PersistClient::new(
        PersistConfig::new_for_tests(),
        Arc::new(blob),
        Arc::new(MemConsensus::default()),
    );
    let (mut write, mut read) =
        expect_open::<String, String, u64, i64>(&client, ShardId::new()).await;
    let at = |t: u64, data: &[Update]| -> Vec<Update> {
        data.iter().map(|(kv, _, d)| (kv.clone(), t, *d)).collect()
    };
    let data = updates(25);
    let first = at(0, &data[..25]);
    expect_compare_and_append(&mut write, &first, 0, 1).await;
    let output = write.spare_buffers.output.as_ptr();
    assert!(
        write.spare_buffers.output.capacity() > 0,
        "the part's buffer came back"
    );
    let arena = write.spare_buffers.buffer.bytes.capacity();
    assert!(arena > 0);
    // The same keys again, so the part is no larger than the first.
    let second = at(1, &data[..25]);
    expect_compare_and_append(&mut write, &second, 1, 2).await;
    assert_eq!(
        write.spare_buffers.output.as_ptr(),
        output,
        "the same allocation"
    );
    assert_eq!(write.spare_buffers.buffer.bytes.capacity(), arena);
    let mut written = first;
    written.extend(second);
    let mut got = expect_snapshot_and_fetch(&mut read, 1).await;
    got.sort();
    assert_eq!(got, all_ok(&written, 1));
}

/// Writes two batches whose keys interleave, large enough for the read to
/// merge on several threads, and checks that a snapshot returns every
/// update in order.
async fn read_a_large_snapshot() {
    const PER_BATCH: u64 = 70_000;
    let client = PersistClient::new_for_tests().await;
    let (mut write, mut read) = expect_open::<Vec<u8>, (), u64, i64>(&client, ShardId::new()).await;
    for b in 0..2u64 {
        let data: Vec<_> = (0..PER_BATCH)
            .map(|i| (((2 * i + b).to_be_bytes().to_vec(), ()), b, 1))
            .collect();
        expect_compare_and_append(&mut write, &data, b, b + 1).await;
    }
    let got = expect_snapshot_and_fetch(&mut read, 1).await;
    assert_eq!(got.len() as u64, 2 * PER_BATCH);
    for (i, ((k, v), t, d)) in got.into_iter().enumerate() {
        assert_eq!(k, Ok((i as u64).to_be_bytes().to_vec()));
        assert_eq!((v, t, d), (Ok(()), 1, 1));
    }
}

/// A read large enough to merge on several threads works wherever a
/// future can run: on either kind of runtime, in a spawned task, and in a
/// `LocalSet` (where a worker may not block).
#[test]
fn large_snapshots_merge_on_any_runtime() {
    let multi = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let current = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    multi.block_on(read_a_large_snapshot());
    multi
        .block_on(multi.spawn(read_a_large_snapshot()))
        .unwrap();
    multi.block_on(tokio::task::LocalSet::new().run_until(read_a_large_snapshot()));
    current.block_on(read_a_large_snapshot());
    current.block_on(tokio::task::LocalSet::new().run_until(read_a_large_snapshot()));
}
