//! The storage controller against real persist shards (in memory).

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::time::Duration;

use persist_client::Diagnostics;
use persist_types::ShardId;
use storage_collections::{
    CollectionDescription, GlobalId, ReadPolicy, StorageCollections, StorageCollectionsImpl,
    StorageError,
};
use timely::progress::Antichain;

use common::*;

async fn eventually<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    for _ in 0..500 {
        if let Some(value) = check() {
            return value;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

/// The critical since the controller holds in persist for a shard.
async fn persisted_since(sc: &StorageCollectionsImpl, id: GlobalId) -> Antichain<u64> {
    let shard = sc.collection_metadata(id).unwrap().data_shard;
    sc.client()
        .fetch_recent_since::<Vec<u8>, (), u64, i64>(shard)
        .await
        .unwrap()
}

#[tokio::test]
async fn snapshot_stats_count_updates_up_to_the_as_of() {
    let location = Location::new();
    let sc = location.controller(1).await;
    sc.create_collections_for_bootstrap(vec![(T1, CollectionDescription::table())])
        .await
        .unwrap();
    write(&sc, T1, 0, 1).await;
    write(&sc, T1, 1, 3).await;
    // Stats at a time the shard has not reached wait for it.
    let pending = {
        let sc = sc.clone();
        tokio::spawn(async move { sc.snapshot_stats(T1, f(3)).await })
    };
    assert_eq!(sc.snapshot_stats(T1, f(0)).await.unwrap().num_updates, 1);
    assert_eq!(sc.snapshot_stats(T1, f(2)).await.unwrap().num_updates, 3);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!pending.is_finished());
    write(&sc, T1, 3, 4).await;
    assert_eq!(pending.await.unwrap().unwrap().num_updates, 4);
    // And the contents agree.
    let rows = sc.snapshot(T1, f(3)).await.unwrap();
    assert_eq!(rows.len(), 4);
    assert_eq!(sc.snapshot_latest(T1).await.unwrap(), rows);
    let mut cursor = sc.snapshot_cursor(T1, f(3)).await.unwrap();
    let mut parts = Vec::new();
    while let Some(part) = cursor.next().await {
        parts.extend(part.unwrap());
    }
    cursor.finish().await;
    parts.sort();
    assert_eq!(parts, rows);
    let streamed: Vec<_> =
        futures::StreamExt::collect(sc.snapshot_and_stream(T1, f(3)).await.unwrap()).await;
    assert_eq!(streamed, rows);
}

#[tokio::test]
async fn read_holds_keep_the_since_back_until_dropped() {
    let location = Location::new();
    let sc = location.controller(1).await;
    sc.create_collections_for_bootstrap(vec![(T1, CollectionDescription::table())])
        .await
        .unwrap();
    write(&sc, T1, 0, 10).await;
    let mut holds = sc.acquire_read_holds(vec![T1]).unwrap();
    let mut hold = holds.pop().unwrap();
    assert_eq!(hold.since(), &f(0));
    sc.set_read_policies(vec![(T1, ReadPolicy::ValidFrom(f(8)))])
        .unwrap();
    assert_eq!(since(&sc, T1), f(0), "the hold keeps the since back");
    hold.downgrade(&f(5));
    assert_eq!(since(&sc, T1), f(5));
    let copy = hold.clone();
    drop(hold);
    assert_eq!(since(&sc, T1), f(5), "a clone is a hold of its own");
    drop(copy);
    assert_eq!(since(&sc, T1), f(8));
    // The persisted critical since follows.
    for _ in 0..100 {
        if persisted_since(&sc, T1).await == f(8) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "the shard's since did not follow: {:?}",
        persisted_since(&sc, T1).await
    );
}

#[tokio::test]
async fn a_lagging_policy_keeps_the_since_behind_the_upper() {
    let location = Location::new();
    let sc = location.controller(1).await;
    sc.create_collections_for_bootstrap(vec![(T1, CollectionDescription::table())])
        .await
        .unwrap();
    sc.set_read_policies(vec![(
        T1,
        ReadPolicy::LagWriteFrontier {
            lag: 10,
            granularity: 5,
        },
    )])
    .unwrap();
    write(&sc, T1, 0, 100).await;
    // Upper 100: last complete time 99, minus 10 is 89, rounded down to 85.
    eventually("the since to follow the upper", || {
        (since(&sc, T1) == f(85)).then_some(())
    })
    .await;
    let frontiers = sc.collection_frontiers(T1).unwrap();
    assert_eq!(frontiers.write_frontier, f(100));
    assert_eq!(frontiers.implied_capability, f(85));
    write(&sc, T1, 100, 103).await;
    // 102 - 10 = 92 rounds down to 90.
    eventually("the since to move in steps", || {
        (since(&sc, T1) == f(90)).then_some(())
    })
    .await;
    assert!(sc.snapshot(T1, f(89)).await.is_err(), "below the since");
    assert_eq!(sc.snapshot(T1, f(95)).await.unwrap().len(), 96);
}

#[tokio::test]
async fn dependencies_hold_back_what_they_depend_on() {
    let location = Location::new();
    let sc = location.controller(1).await;
    sc.create_collections_for_bootstrap(vec![
        (T1, CollectionDescription::table()),
        (T2, CollectionDescription::table()),
        (D3, CollectionDescription::derived(vec![T1, T2])),
    ])
    .await
    .unwrap();
    write(&sc, T1, 0, 20).await;
    write(&sc, T2, 0, 20).await;
    sc.set_read_policies(vec![
        (T1, ReadPolicy::ValidFrom(f(15))),
        (T2, ReadPolicy::ValidFrom(f(12))),
        (D3, ReadPolicy::ValidFrom(f(4))),
    ])
    .unwrap();
    assert_eq!(since(&sc, D3), f(4));
    assert_eq!(since(&sc, T1), f(4), "held back by the derived collection");
    assert_eq!(since(&sc, T2), f(4));
    // A hold on the derived collection holds its dependencies too.
    let hold = sc.acquire_read_holds(vec![D3]).unwrap();
    sc.set_read_policies(vec![(D3, ReadPolicy::ValidFrom(f(10)))])
        .unwrap();
    assert_eq!(since(&sc, T1), f(4));
    drop(hold);
    assert_eq!(
        (since(&sc, D3), since(&sc, T1), since(&sc, T2)),
        (f(10), f(10), f(10))
    );
    // Dropping the derived collection releases its dependencies.
    sc.drop_collections_unvalidated(&BTreeSet::from([D3]))
        .await
        .unwrap();
    assert_eq!((since(&sc, T1), since(&sc, T2)), (f(15), f(12)));
}

/// Waits until the controller's durable metadata records `shard` as
/// finalized.
async fn wait_finalized(sc: &StorageCollectionsImpl, shard: ShardId) {
    for _ in 0..500 {
        if sc.durable_metadata().await.finalized.contains(&shard) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("shard {shard} was not finalized: {}", sc.dump().await);
}

#[tokio::test]
async fn dropping_a_collection_finalizes_its_shard_once_released() {
    let location = Location::new();
    let sc = location.controller(1).await;
    sc.create_collections_for_bootstrap(vec![(T1, CollectionDescription::table())])
        .await
        .unwrap();
    write(&sc, T1, 0, 5).await;
    let shard = sc.collection_metadata(T1).unwrap().data_shard;
    let hold = sc.acquire_read_holds(vec![T1]).unwrap();
    sc.drop_collections_unvalidated(&BTreeSet::from([T1]))
        .await
        .unwrap();
    // Dropped: gone from the durable mapping, awaiting finalization, and
    // no new holds.
    let durable = sc.durable_metadata().await;
    assert!(!durable.collections.contains_key(&T1));
    assert!(durable.unfinalized.contains(&shard));
    assert_eq!(
        sc.acquire_read_holds(vec![T1]).unwrap_err(),
        StorageError::CollectionDropped(T1)
    );
    // The outstanding hold still protects the data.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!sc.durable_metadata().await.finalized.contains(&shard));
    let client = location.client();
    assert!(
        !client
            .is_finalized::<Vec<u8>, (), u64, i64>(shard, Diagnostics::for_tests())
            .await
            .unwrap()
    );
    drop(hold);
    wait_finalized(&sc, shard).await;
    assert!(
        client
            .is_finalized::<Vec<u8>, (), u64, i64>(shard, Diagnostics::for_tests())
            .await
            .unwrap()
    );
    assert!(!sc.durable_metadata().await.unfinalized.contains(&shard));
    assert_eq!(
        sc.check_exists(T1).unwrap_err(),
        StorageError::CollectionMissing(T1)
    );
}

#[tokio::test]
async fn a_restarted_controller_resumes_from_durable_metadata() {
    let location = Location::new();
    let (shard1, shard2) = {
        let sc = location.controller(1).await;
        sc.create_collections_for_bootstrap(vec![
            (T1, CollectionDescription::table()),
            (T2, CollectionDescription::table()),
        ])
        .await
        .unwrap();
        write(&sc, T1, 0, 3).await;
        let shards = (
            sc.collection_metadata(T1).unwrap().data_shard,
            sc.collection_metadata(T2).unwrap().data_shard,
        );
        // A hold that dies with the process: T2 is dropped but cannot be
        // finalized before the "crash".
        let hold = sc.acquire_read_holds(vec![T2]).unwrap();
        sc.drop_collections_unvalidated(&BTreeSet::from([T2]))
            .await
            .unwrap();
        std::mem::forget(hold);
        shards
    };
    // The next controller (a new process: new client, new epoch).
    let sc = location.controller(2).await;
    let durable = sc.durable_metadata().await;
    assert_eq!(durable.collections, BTreeMap::from([(T1, shard1)]));
    assert!(durable.unfinalized.contains(&shard2));
    sc.initialize_state(&BTreeSet::from([T1])).await.unwrap();
    sc.create_collections_for_bootstrap(vec![(T1, CollectionDescription::table())])
        .await
        .unwrap();
    assert_eq!(
        sc.collection_metadata(T1).unwrap().data_shard,
        shard1,
        "same shard"
    );
    assert_eq!(sc.snapshot(T1, f(2)).await.unwrap().len(), 3, "same data");
    // The pending finalization resumes.
    wait_finalized(&sc, shard2).await;
    // Reusing an id is an error.
    let err = sc
        .create_collections_for_bootstrap(vec![(T1, CollectionDescription::table())])
        .await
        .unwrap_err();
    assert_eq!(err, StorageError::CollectionIdReused(T1));
}

#[tokio::test]
async fn a_newer_epoch_fences_the_older_controller() {
    let location = Location::new();
    let old = location.controller(1).await;
    old.create_collections_for_bootstrap(vec![(T1, CollectionDescription::table())])
        .await
        .unwrap();
    write(&old, T1, 0, 10).await;
    old.set_read_policies(vec![(T1, ReadPolicy::ValidFrom(f(2)))])
        .unwrap();
    for _ in 0..100 {
        if persisted_since(&old, T1).await == f(2) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(persisted_since(&old, T1).await, f(2));

    let new = location.controller(2).await;
    new.create_collections_for_bootstrap(vec![(T1, CollectionDescription::table())])
        .await
        .unwrap();
    // The old controller tries to move the since: it finds out it was
    // fenced and stops; the since does not move under its epoch.
    old.set_read_policies(vec![(T1, ReadPolicy::ValidFrom(f(6)))])
        .unwrap();
    for _ in 0..200 {
        if matches!(old.check_exists(T1), Ok(()))
            && matches!(
                old.set_read_policies(vec![]),
                Err(StorageError::Fenced { .. })
            )
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        old.set_read_policies(vec![]).unwrap_err(),
        StorageError::Fenced {
            ours: 1,
            current: 2
        }
    );
    assert_eq!(persisted_since(&new, T1).await, f(2));
    // Its durable writes are refused too.
    let err = old
        .drop_collections_unvalidated(&BTreeSet::from([T1]))
        .await
        .unwrap_err();
    assert!(matches!(err, StorageError::Fenced { .. }), "{err:?}");
    assert!(new.durable_metadata().await.collections.contains_key(&T1));
    // And an older epoch cannot start at all.
    let err = location
        .controller_with(location.client(), 1, false)
        .await
        .unwrap_err();
    assert_eq!(
        err,
        StorageError::Fenced {
            ours: 1,
            current: 2
        }
    );
}

#[tokio::test]
async fn read_only_mode_writes_nothing() {
    let location = Location::new();
    let writable = location.controller(1).await;
    writable
        .create_collections_for_bootstrap(vec![
            (T1, CollectionDescription::table()),
            (D3, CollectionDescription::derived(vec![T1])),
        ])
        .await
        .unwrap();
    write(&writable, T1, 0, 10).await;

    let (client, writes) = counting_client(&location);
    let read_only = location.controller_with(client, 2, true).await.unwrap();
    read_only
        .initialize_state(&BTreeSet::from([T1]))
        .await
        .unwrap();
    read_only
        .create_collections_for_bootstrap(vec![
            (T1, CollectionDescription::table()),
            (D3, CollectionDescription::derived(vec![T1])),
        ])
        .await
        .unwrap();
    read_only
        .set_read_policies(vec![(
            T1,
            ReadPolicy::LagWriteFrontier {
                lag: 2,
                granularity: 1,
            },
        )])
        .unwrap();
    let holds = read_only.acquire_read_holds(vec![T1, D3]).unwrap();
    drop(holds);
    eventually("the read-only controller to follow the upper", || {
        (read_only.collection_frontiers(T1).unwrap().write_frontier == f(10)).then_some(())
    })
    .await;
    assert_eq!(
        read_only
            .drop_collections_unvalidated(&BTreeSet::from([D3]))
            .await
            .unwrap_err(),
        StorageError::ReadOnly("drop_collections")
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        writes.load(Ordering::SeqCst),
        0,
        "read-only mode wrote to consensus"
    );
    // It did not fence the writable controller either.
    writable
        .set_read_policies(vec![(T1, ReadPolicy::ValidFrom(f(1)))])
        .unwrap();
}

#[tokio::test]
async fn invalid_calls_are_errors() {
    let location = Location::new();
    let sc = location.controller(1).await;
    let unknown = GlobalId::User(99);
    // Through the trait, as a client holding `dyn StorageCollections` would.
    let dyn_sc: &dyn StorageCollections = &sc;
    assert_eq!(
        dyn_sc.check_exists(unknown).unwrap_err(),
        StorageError::CollectionMissing(unknown)
    );
    assert!(dyn_sc.active_collection_frontiers().is_empty());
    assert_eq!(
        sc.acquire_read_holds(vec![unknown]).unwrap_err(),
        StorageError::CollectionMissing(unknown)
    );
    assert_eq!(
        sc.set_read_policies(vec![(unknown, ReadPolicy::hold_all())])
            .unwrap_err(),
        StorageError::CollectionMissing(unknown)
    );
    assert!(sc.collection_frontiers(unknown).is_err());
    assert!(matches!(
        sc.snapshot(unknown, f(0)).await.unwrap_err(),
        StorageError::CollectionMissing(_)
    ));
    // A dependency must exist first.
    let err = sc
        .create_collections_for_bootstrap(vec![(D3, CollectionDescription::derived(vec![unknown]))])
        .await
        .unwrap_err();
    assert_eq!(err, StorageError::CollectionMissing(unknown));
    sc.create_collections_for_bootstrap(vec![(T1, CollectionDescription::table())])
        .await
        .unwrap();
    assert_eq!(
        sc.prepare_state(&BTreeSet::from([T1]), &BTreeSet::new(), &BTreeMap::new())
            .await
            .unwrap_err(),
        StorageError::CollectionIdReused(T1)
    );
    sc.drop_collections_unvalidated(&BTreeSet::from([T1]))
        .await
        .unwrap();
    assert_eq!(
        sc.set_read_policies(vec![(T1, ReadPolicy::hold_all())])
            .unwrap_err(),
        StorageError::CollectionDropped(T1)
    );
    let json = sc.dump().await;
    assert_eq!(json["epoch"], 1);
}
