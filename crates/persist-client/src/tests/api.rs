//! The client and write side: seed 002's tests against our API.

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use persist_types::{PersistLocation, ShardId, StringSchema, VecU8Schema};
use timely::PartialOrder;
use timely::progress::Antichain;

use super::*;
use crate::{
    ClientError, CodecMismatch, Codecs, Diagnostics, InvalidUsage, ListenEvent, PersistClient,
    PersistClientCache, PersistConfig, UpperMismatch,
};

fn data3() -> Vec<Update> {
    vec![
        (("1".to_owned(), "one".to_owned()), 1, 1),
        (("2".to_owned(), "two".to_owned()), 2, 1),
        (("3".to_owned(), "three".to_owned()), 3, 1),
    ]
}

fn data5() -> Vec<Update> {
    vec![
        (("1".to_owned(), "one".to_owned()), 1, 1),
        (("2".to_owned(), "two".to_owned()), 2, 1),
        (("3".to_owned(), "three".to_owned()), 3, 1),
        (("4".to_owned(), "vier".to_owned()), 4, 1),
        (("5".to_owned(), "cinque".to_owned()), 5, 1),
    ]
}

#[tokio::test]
async fn sanity_check() {
    let data = data3();
    let client = PersistClient::new_for_tests().await;
    let (mut write, mut read) =
        expect_open::<String, String, u64, i64>(&client, ShardId::new()).await;
    assert_eq!(write.upper(), &f(0));
    assert_eq!(read.since(), &f(0));

    expect_append(&mut write, &data[..2], 0, 3).await;
    assert_eq!(write.upper(), &f(3));
    assert_eq!(
        expect_snapshot_and_fetch(&mut read, 1).await,
        all_ok(&data[..1], 1)
    );

    let mut listen = expect_listen(&read, 1).await;
    expect_append(&mut write, &data[2..], 3, 4).await;
    assert_eq!(write.upper(), &f(4));
    // The listen sees the update at 2 (beyond its as_of) and the new one.
    assert_eq!(listen.read_until(&4).await, (all_ok(&data[1..], 1), f(4)));

    read.downgrade_since(&f(2)).await.unwrap();
    assert_eq!(read.since(), &f(2));
}

#[tokio::test]
async fn open_reader_writer() {
    let data = data3();
    let shard = ShardId::new();
    let client = PersistClient::new_for_tests().await;
    let schemas = || (Arc::new(StringSchema::new()), Arc::new(StringSchema::new()));
    let (k, v) = schemas();
    let mut write1 = client
        .open_writer::<String, String, u64, i64>(shard, k, v, Diagnostics::for_tests())
        .await
        .unwrap();
    let (k, v) = schemas();
    let mut read1 = client
        .open_leased_reader::<String, String, u64, i64>(shard, k, v, Diagnostics::for_tests())
        .await
        .unwrap();
    let (k, v) = schemas();
    let mut read2 = client
        .open_leased_reader::<String, String, u64, i64>(shard, k, v, Diagnostics::for_tests())
        .await
        .unwrap();
    let (k, v) = schemas();
    let mut write2 = client
        .open_writer::<String, String, u64, i64>(shard, k, v, Diagnostics::for_tests())
        .await
        .unwrap();

    expect_compare_and_append(&mut write2, &data[..1], 0, 2).await;
    assert_eq!(
        expect_snapshot_and_fetch(&mut read2, 1).await,
        all_ok(&data[..1], 1)
    );
    expect_compare_and_append(&mut write1, &data[1..], 2, 4).await;
    assert_eq!(
        expect_snapshot_and_fetch(&mut read1, 3).await,
        all_ok(&data, 3)
    );
}

fn codecs(k: &str, v: &str, t: &str, d: &str) -> Codecs {
    Codecs {
        key: k.to_owned(),
        val: v.to_owned(),
        ts: t.to_owned(),
        diff: d.to_owned(),
    }
}

fn mismatch<T: std::fmt::Debug>(requested: Codecs, actual: Codecs) -> ClientError<T> {
    CodecMismatch { requested, actual }.into()
}

#[tokio::test]
async fn invalid_usage() {
    let data = data3();
    let shard0: ShardId = "s00000000-0000-0000-0000-000000000000".parse().unwrap();
    let client = PersistClient::new_for_tests().await;
    let (mut write0, mut read0) = expect_open::<String, String, u64, i64>(&client, shard0).await;
    expect_compare_and_append(&mut write0, &data, 0, 4).await;
    let actual = codecs("String", "String", "u64", "i64");

    // Codec mismatches from every way of opening the shard. A fresh client
    // (new state cache) of the same location reads the codecs from state.
    let fresh = PersistClient::new(
        PersistConfig::new_for_tests(),
        Arc::clone(client.blob()),
        Arc::clone(client.consensus()),
    );
    for client in [&client, &fresh] {
        let err = client
            .open::<Vec<u8>, String, u64, i64>(
                shard0,
                Arc::new(VecU8Schema::new()),
                Arc::new(StringSchema::new()),
                Diagnostics::for_tests(),
            )
            .await
            .unwrap_err();
        assert_eq!(
            err,
            mismatch(codecs("Vec<u8>", "String", "u64", "i64"), actual.clone())
        );
        let err = client
            .open::<String, Vec<u8>, u64, i64>(
                shard0,
                Arc::new(StringSchema::new()),
                Arc::new(VecU8Schema::new()),
                Diagnostics::for_tests(),
            )
            .await
            .unwrap_err();
        assert_eq!(
            err,
            mismatch(codecs("String", "Vec<u8>", "u64", "i64"), actual.clone())
        );
        let err = client
            .open::<String, String, i64, i64>(
                shard0,
                Arc::new(StringSchema::new()),
                Arc::new(StringSchema::new()),
                Diagnostics::for_tests(),
            )
            .await
            .unwrap_err();
        assert_eq!(
            err,
            mismatch(codecs("String", "String", "i64", "i64"), actual.clone())
        );
        let err = client
            .open::<String, String, u64, u64>(
                shard0,
                Arc::new(StringSchema::new()),
                Arc::new(StringSchema::new()),
                Diagnostics::for_tests(),
            )
            .await
            .unwrap_err();
        assert_eq!(
            err,
            mismatch(codecs("String", "String", "u64", "u64"), actual.clone())
        );
        let err = client
            .open_leased_reader::<Vec<u8>, String, u64, i64>(
                shard0,
                Arc::new(VecU8Schema::new()),
                Arc::new(StringSchema::new()),
                Diagnostics::for_tests(),
            )
            .await
            .unwrap_err();
        assert_eq!(
            err,
            mismatch(codecs("Vec<u8>", "String", "u64", "i64"), actual.clone())
        );
        let err = client
            .open_writer::<Vec<u8>, String, u64, i64>(
                shard0,
                Arc::new(VecU8Schema::new()),
                Arc::new(StringSchema::new()),
                Diagnostics::for_tests(),
            )
            .await
            .unwrap_err();
        assert_eq!(
            err,
            mismatch(codecs("Vec<u8>", "String", "u64", "i64"), actual.clone())
        );
    }

    // Parts of one shard fetched through another shard's fetcher.
    let parts = read0.snapshot(f(3)).await.unwrap();
    assert!(!parts.is_empty());
    let shard1: ShardId = "s11111111-1111-1111-1111-111111111111".parse().unwrap();
    let fetcher1 = client
        .create_batch_fetcher::<String, String, u64, i64>(
            shard1,
            Arc::new(StringSchema::new()),
            Arc::new(StringSchema::new()),
            Diagnostics::for_tests(),
        )
        .await
        .unwrap();
    for part in parts {
        let res = fetcher1.fetch_leased_part(&part).await;
        read0.process_returned_leased_part(part);
        assert_eq!(
            res.unwrap_err(),
            InvalidUsage::BatchNotFromThisShard {
                batch_shard: shard0,
                handle_shard: shard1,
            }
            .into()
        );
    }

    // Write side.
    let ts3 = vec![data[2].clone()];
    assert_eq!(
        write0.append(&ts3, f(4), f(5)).await.unwrap_err(),
        InvalidUsage::UpdateNotBeyondLower { ts: 3, lower: f(4) }.into(),
    );
    assert_eq!(
        write0.append(&ts3, f(2), f(3)).await.unwrap_err(),
        InvalidUsage::UpdateBeyondUpper {
            ts: 3,
            expected_upper: f(3)
        }
        .into(),
    );
    assert_eq!(
        write0.append(&data[..0], f(3), f(2)).await.unwrap_err(),
        InvalidUsage::InvalidBounds {
            lower: f(3),
            upper: f(2)
        }
        .into(),
    );
    assert_eq!(
        write0.builder(f(3)).finish(f(2)).await.unwrap_err(),
        InvalidUsage::InvalidBounds {
            lower: f(3),
            upper: f(2)
        }
        .into(),
    );
    let batch = write0.batch(&ts3, f(3), f(4)).await.unwrap();
    assert_eq!(
        write0.append_batch(batch, f(4), f(5)).await.unwrap_err(),
        InvalidUsage::InvalidBatchBounds {
            batch_lower: f(3),
            batch_upper: f(4),
            append_lower: f(4),
            append_upper: f(5),
        }
        .into(),
    );
    let batch = write0.batch(&ts3, f(3), f(4)).await.unwrap();
    assert_eq!(
        write0.append_batch(batch, f(2), f(3)).await.unwrap_err(),
        InvalidUsage::InvalidBatchBounds {
            batch_lower: f(3),
            batch_upper: f(4),
            append_lower: f(2),
            append_upper: f(3),
        }
        .into(),
    );
    let batch = write0.batch(&ts3, f(3), f(4)).await.unwrap();
    assert!(matches!(
        write0.append_batch(batch, f(3), f(3)).await.unwrap_err(),
        ClientError::InvalidUsage(InvalidUsage::InvalidEmptyTimeInterval { .. })
    ));
    // None of the refused calls changed the shard.
    assert_eq!(write0.fetch_recent_upper().await.unwrap(), &f(4));
    assert_eq!(
        expect_snapshot_and_fetch(&mut read0, 3).await,
        all_ok(&data, 3)
    );
}

#[tokio::test]
async fn multiple_shards() {
    let data1 = [
        (("1".to_owned(), "one".to_owned()), 1u64, 1i64),
        (("2".to_owned(), "two".to_owned()), 2, 1),
    ];
    let data2 = [
        (("1".to_owned(), ()), 1u64, 1i64),
        (("2".to_owned(), ()), 2, 1),
    ];
    let client = PersistClient::new_for_tests().await;
    let (mut write1, mut read1) =
        expect_open::<String, String, u64, i64>(&client, ShardId::new()).await;
    // Different types: the shards must be kept apart.
    let (mut write2, mut read2) =
        expect_open::<String, (), u64, i64>(&client, ShardId::new()).await;
    expect_compare_and_append(&mut write1, &data1, 0, 3).await;
    expect_compare_and_append(&mut write2, &data2, 0, 3).await;
    assert_eq!(
        expect_snapshot_and_fetch(&mut read1, 2).await,
        all_ok(&data1, 2)
    );
    assert_eq!(
        expect_snapshot_and_fetch(&mut read2, 2).await,
        all_ok(&data2, 2)
    );
}

#[tokio::test]
async fn fetch_upper() {
    let data = data3();
    let client = PersistClient::new_for_tests().await;
    let shard = ShardId::new();
    let (mut write1, _read1) = expect_open::<String, String, u64, i64>(&client, shard).await;
    let (mut write2, _read2) = expect_open::<String, String, u64, i64>(&client, shard).await;
    expect_append(&mut write1, &data[..2], 0, 3).await;
    // Another writer's append moves the shard's upper; this handle's cached
    // upper catches up when it fetches.
    assert_eq!(write2.upper(), &f(0));
    assert_eq!(write2.shared_upper(), f(3));
    assert_eq!(write2.fetch_recent_upper().await.unwrap(), &f(3));
    assert_eq!(write2.upper(), &f(3));
}

#[tokio::test]
async fn append_with_invalid_upper() {
    let data = data3();
    let client = PersistClient::new_for_tests().await;
    let (mut write, _read) = expect_open::<String, String, u64, i64>(&client, ShardId::new()).await;
    expect_append(&mut write, &data[..2], 0, 3).await;
    let later = [
        (("5".to_owned(), "fünf".to_owned()), 5u64, 1i64),
        (("6".to_owned(), "sechs".to_owned()), 6, 1),
    ];
    let res = write.append(later.iter(), f(5), f(7)).await;
    assert_eq!(
        res,
        Ok(Err(UpperMismatch {
            expected: f(5),
            current: f(3)
        }))
    );
    // The failed append taught the handle the shard's upper.
    assert_eq!(write.upper(), &f(3));
}

/// The futures of the handles' operations can run in spawned tasks.
#[allow(dead_code)] // Compiling is the test.
fn operations_are_send(
    read: &mut ReadHandle<String, String, u64, i64>,
    write: &mut WriteHandle<String, String, u64, i64>,
    data: &[Update],
) {
    fn is_send<F: Future + Send>(_: F) {}
    is_send(read.snapshot_and_fetch(f(1)));
    is_send(read.snapshot(f(1)));
    is_send(read.downgrade_since(&f(1)));
    is_send(write.compare_and_append(data, f(0), f(1)));
    is_send(write.append(data, f(0), f(1)));
}

/// Handles must be usable from spawned tasks.
#[test]
fn handles_are_send_and_sync() {
    fn is_send_sync<T: Send + Sync>() {}
    is_send_sync::<PersistClient>();
    is_send_sync::<WriteHandle<String, String, u64, i64>>();
    is_send_sync::<ReadHandle<String, String, u64, i64>>();
    is_send_sync::<Listen<String, String, u64, i64>>();
    is_send_sync::<crate::SinceHandle<String, String, u64, i64, u64>>();
    is_send_sync::<crate::Batch<String, String, u64, i64>>();
}

#[tokio::test]
async fn compare_and_append() {
    let data = data3();
    let shard = ShardId::new();
    let client = PersistClient::new_for_tests().await;
    let (mut write1, mut read) = expect_open::<String, String, u64, i64>(&client, shard).await;
    let (mut write2, _read) = expect_open::<String, String, u64, i64>(&client, shard).await;
    assert_eq!(write1.upper(), &f(0));
    assert_eq!(write2.upper(), &f(0));
    assert_eq!(read.since(), &f(0));

    expect_compare_and_append(&mut write1, &data[..2], 0, 3).await;
    assert_eq!(write1.upper(), &f(3));
    assert_eq!(
        expect_snapshot_and_fetch(&mut read, 2).await,
        all_ok(&data[..2], 2)
    );

    // A stale expected upper is refused and teaches the handle the real one.
    let res = write2.compare_and_append(&data[..2], f(0), f(3)).await;
    assert_eq!(
        res,
        Ok(Err(UpperMismatch {
            expected: f(0),
            current: f(3)
        }))
    );
    assert_eq!(write2.upper(), &f(3));
    expect_compare_and_append(&mut write2, &data[2..], 3, 4).await;
    assert_eq!(write2.upper(), &f(4));
    assert_eq!(
        expect_snapshot_and_fetch(&mut read, 3).await,
        all_ok(&data, 3)
    );
}

#[tokio::test]
async fn overlapping_append() {
    let data = data5();
    let shard = ShardId::new();
    let client = PersistClient::new_for_tests().await;
    let (mut write1, read) = expect_open::<String, String, u64, i64>(&client, shard).await;
    let (mut write2, _read) = expect_open::<String, String, u64, i64>(&client, shard).await;
    let mut listen = expect_listen(&read, 0).await;
    let mut read = read;

    expect_append(&mut write1, &data[..2], 0, 3).await;
    assert_eq!(write1.upper(), &f(3));
    // [0, 5) from a writer that has not seen [0, 3): only [3, 5) is new.
    expect_append(&mut write2, &data[..4], 0, 5).await;
    assert_eq!(write2.upper(), &f(5));
    // [3, 6) from the first writer: only [5, 6) is new.
    expect_append(&mut write1, &data[2..5], 3, 6).await;
    assert_eq!(write1.upper(), &f(6));

    assert_eq!(
        expect_snapshot_and_fetch(&mut read, 5).await,
        all_ok(&data, 5)
    );
    let (mut updates, progress) = listen.read_until(&6).await;
    updates.sort();
    let mut expected: Vec<_> = data
        .iter()
        .map(|((k, v), t, d)| ((Ok(k.clone()), Ok(v.clone())), *t, *d))
        .collect();
    expected.sort();
    assert_eq!((updates, progress), (expected, f(6)));
}

#[tokio::test]
async fn contiguous_append() {
    let data = data5();
    let client = PersistClient::new_for_tests().await;
    let (mut write, mut read) =
        expect_open::<String, String, u64, i64>(&client, ShardId::new()).await;
    expect_append(&mut write, &data[..2], 0, 3).await;
    assert_eq!(write.upper(), &f(3));
    // A gap is refused.
    let result = write.append(&data[4..5], f(5), f(6)).await;
    assert_eq!(
        result,
        Ok(Err(UpperMismatch {
            expected: f(5),
            current: f(3)
        }))
    );
    expect_append(&mut write, &data[2..5], 3, 6).await;
    assert_eq!(write.upper(), &f(6));
    assert_eq!(
        expect_snapshot_and_fetch(&mut read, 5).await,
        all_ok(&data, 5)
    );
}

#[tokio::test]
async fn noncontiguous_append_per_writer() {
    let data = data5();
    let shard = ShardId::new();
    let client = PersistClient::new_for_tests().await;
    let (mut write1, mut read) = expect_open::<String, String, u64, i64>(&client, shard).await;
    let (mut write2, _read) = expect_open::<String, String, u64, i64>(&client, shard).await;
    expect_append(&mut write1, &data[..2], 0, 3).await;
    assert_eq!(write1.upper(), &f(3));
    expect_append(&mut write2, &data[2..4], 3, 5).await;
    assert_eq!(write2.upper(), &f(5));
    expect_append(&mut write1, &data[4..5], 5, 6).await;
    assert_eq!(write1.upper(), &f(6));
    assert_eq!(
        expect_snapshot_and_fetch(&mut read, 5).await,
        all_ok(&data, 5)
    );
}

#[tokio::test]
async fn contiguous_compare_and_append() {
    let data = data5();
    let client = PersistClient::new_for_tests().await;
    let (mut write, mut read) =
        expect_open::<String, String, u64, i64>(&client, ShardId::new()).await;
    expect_compare_and_append(&mut write, &data[..2], 0, 3).await;
    assert_eq!(write.upper(), &f(3));
    let result = write.compare_and_append(&data[4..5], f(5), f(6)).await;
    assert_eq!(
        result,
        Ok(Err(UpperMismatch {
            expected: f(5),
            current: f(3)
        }))
    );
    expect_compare_and_append(&mut write, &data[2..5], 3, 6).await;
    assert_eq!(write.upper(), &f(6));
    assert_eq!(
        expect_snapshot_and_fetch(&mut read, 5).await,
        all_ok(&data, 5)
    );
}

#[tokio::test]
async fn noncontiguous_compare_and_append_per_writer() {
    let data = data5();
    let shard = ShardId::new();
    let client = PersistClient::new_for_tests().await;
    let (mut write1, mut read) = expect_open::<String, String, u64, i64>(&client, shard).await;
    let (mut write2, _read) = expect_open::<String, String, u64, i64>(&client, shard).await;
    expect_compare_and_append(&mut write1, &data[..2], 0, 3).await;
    expect_compare_and_append(&mut write2, &data[2..4], 3, 5).await;
    expect_compare_and_append(&mut write1, &data[4..5], 5, 6).await;
    assert_eq!(write1.upper(), &f(6));
    assert_eq!(
        expect_snapshot_and_fetch(&mut read, 5).await,
        all_ok(&data, 5)
    );
}

/// Two writers race to append the same batches (as replicas would), each
/// building batches in one task and appending them in another; the shard
/// ends up with every update exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency() {
    const WRITERS: usize = 2;
    const BATCHES: u64 = 20;
    const PER_BATCH: u64 = 50;
    let shard = ShardId::new();
    let client = PersistClient::new_for_tests().await;
    let record = |i: u64| {
        (
            (i.to_le_bytes().to_vec(), format!("v{i}").into_bytes()),
            i,
            1i64,
        )
    };
    let mut tasks = Vec::new();
    for _ in 0..WRITERS {
        let (batch_tx, mut batch_rx) = tokio::sync::mpsc::channel(1);
        let client1 = client.clone();
        tasks.push(tokio::spawn(async move {
            let (mut write, _) = expect_open::<Vec<u8>, Vec<u8>, u64, i64>(&client1, shard).await;
            for b in 0..BATCHES {
                let (lower, upper) = (b * PER_BATCH, (b + 1) * PER_BATCH);
                // Skip batches another writer has already appended.
                if PartialOrder::less_equal(&f(upper), write.upper()) {
                    continue;
                }
                let mut builder = write.builder(f(lower));
                for i in lower..upper {
                    let ((k, v), t, d) = record(i);
                    builder.add(&k, &v, &t, &d).await.unwrap();
                }
                batch_tx
                    .send(builder.finish(f(upper)).await.unwrap())
                    .await
                    .unwrap();
            }
        }));
        let client2 = client.clone();
        tasks.push(tokio::spawn(async move {
            let (mut write, _) = expect_open::<Vec<u8>, Vec<u8>, u64, i64>(&client2, shard).await;
            while let Some(batch) = batch_rx.recv().await {
                let (lower, upper) = (batch.lower().clone(), batch.upper().clone());
                write
                    .append_batch(batch, lower, upper)
                    .await
                    .unwrap()
                    .unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let expected: Vec<_> = (0..BATCHES * PER_BATCH).map(record).collect();
    let max = BATCHES * PER_BATCH - 1;
    let (_, mut read) = expect_open::<Vec<u8>, Vec<u8>, u64, i64>(&client, shard).await;
    assert_eq!(
        expect_snapshot_and_fetch(&mut read, max).await,
        all_ok(&expected, max)
    );
}

fn noop_context() -> Context<'static> {
    Context::from_waker(Waker::noop())
}

/// A snapshot or listen at a time the shard has not reached waits for it
/// rather than returning what is there.
#[tokio::test]
async fn regression_blocking_reads() {
    let data = data3();
    let client = PersistClient::new_for_tests().await;
    let (mut write, mut read) =
        expect_open::<String, String, u64, i64>(&client, ShardId::new()).await;
    let mut cx = noop_context();

    let mut listen = expect_listen(&read, 1).await;
    {
        let mut next = pin!(listen.fetch_next());
        for _ in 0..100 {
            assert!(
                next.as_mut().poll(&mut cx).is_pending(),
                "listen ready too early"
            );
        }
        expect_compare_and_append(&mut write, &data[..2], 0, 3).await;
        // Not 1: the listen's as_of is 1 and listens are strictly beyond it.
        assert_eq!(
            next.await.unwrap(),
            vec![
                ListenEvent::Updates(vec![((Ok("2".to_owned()), Ok("two".to_owned())), 2, 1)]),
                ListenEvent::Progress(f(3)),
            ]
        );
    }

    let mut read2 = read.clone("blocking snapshot").await.unwrap();
    {
        let mut snap = pin!(read2.snapshot_and_fetch(f(3)));
        for _ in 0..100 {
            assert!(
                snap.as_mut().poll(&mut cx).is_pending(),
                "snapshot ready too early"
            );
        }
        expect_compare_and_append(&mut write, &data[2..], 3, 4).await;
        let snap = loop {
            if let Poll::Ready(out) = snap.as_mut().poll(&mut cx) {
                break out;
            }
            tokio::task::yield_now().await;
        };
        assert_eq!(snap.unwrap(), all_ok(&data, 3));
    }
    assert_eq!(
        expect_snapshot_and_fetch(&mut read, 3).await,
        all_ok(&data, 3)
    );
}

fn short_leases() -> PersistConfig {
    PersistConfig {
        reader_lease_duration: Duration::from_millis(40),
        writer_lease_duration: Duration::from_millis(40),
        ..PersistConfig::new_for_tests()
    }
}

async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..500 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

/// Heartbeat tasks stop by themselves once their handle is no longer
/// registered, and dropping or expiring a handle stops them.
#[tokio::test]
async fn heartbeat_task_shutdown() {
    let cache = PersistClientCache::new(short_leases());
    let client = cache.open(PersistLocation::new_in_mem()).await.unwrap();
    let (write, read) = expect_open::<(), (), u64, i64>(&client, ShardId::new()).await;
    assert!(read.heartbeat_running() && write.heartbeat_running());
    // Someone else expires both (as a later transition does once a lease
    // lapses): the tasks notice and stop.
    crate::read::tests_expire_reader(&read).await;
    crate::write::tests_expire_writer(&write).await;
    eventually("heartbeats to stop", || {
        !read.heartbeat_running() && !write.heartbeat_running()
    })
    .await;
    // An append lets the expired writer back in, heartbeating again.
    let mut write = write;
    let empty: &[(((), ()), u64, i64)] = &[];
    write
        .compare_and_append(empty, f(0), f(1))
        .await
        .unwrap()
        .unwrap();
    assert!(write.heartbeat_running());
    // A reader's later operations report its expiry.
    let mut read = read;
    let err = read.downgrade_since(&f(1)).await.unwrap_err();
    assert!(
        matches!(err, ClientError::Shard(crate::ShardError::Expired { .. })),
        "{err:?}"
    );
}

/// Heartbeats on a shard whose since and upper are both empty (a
/// tombstone) neither fail nor panic: they stop.
#[tokio::test]
async fn regression_16743_heartbeat_tombstone() {
    let client = PersistClient::new(
        short_leases(),
        Arc::new(persist::mem::MemBlob::new()),
        Arc::new(persist::mem::MemConsensus::new()),
    );
    let (mut write, mut read) = expect_open::<(), (), u64, i64>(&client, ShardId::new()).await;
    read.downgrade_since(&Antichain::new()).await.unwrap();
    let empty: &[(((), ()), u64, i64)] = &[];
    write
        .compare_and_append(empty, f(0), Antichain::new())
        .await
        .unwrap()
        .unwrap();
    eventually("heartbeats to stop on the tombstone", || {
        !read.heartbeat_running() && !write.heartbeat_running()
    })
    .await;
}

#[test]
fn shard_ids_roundtrip_through_strings_and_serde() {
    use proptest::prelude::*;
    proptest!(|(shard in any::<[u8; 16]>())| {
        let id: ShardId = format!("s{}", uuid::Uuid::from_bytes(shard)).parse().unwrap();
        prop_assert_eq!(id.to_string().parse::<ShardId>().unwrap(), id);
        let json = serde_json::to_string(&id).unwrap();
        prop_assert_eq!(serde_json::from_str::<ShardId>(&json).unwrap(), id);
    });
}
