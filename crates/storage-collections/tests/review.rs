//! Regression tests for correctness bugs found in review.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::future::BoxFuture;
use persist::{CaSResult, Consensus, ExternalError, SeqNo, VersionedData};
use persist_client::{
    CONTROLLER_CRITICAL_SINCE, Diagnostics, PersistClient, PersistConfig, SinceHandle,
};
use persist_types::ShardId;
use storage_collections::{CollectionDescription, DataSource, GlobalId, ReadPolicy, StorageError};
use timely::progress::Antichain;

use common::*;

async fn shard_since(client: &PersistClient, shard: ShardId) -> Antichain<u64> {
    client
        .fetch_recent_since::<Vec<u8>, (), u64, i64>(shard)
        .await
        .unwrap()
}

async fn is_finalized(client: &PersistClient, shard: ShardId) -> bool {
    client
        .is_finalized::<Vec<u8>, (), u64, i64>(shard, Diagnostics::for_tests())
        .await
        .unwrap()
}

async fn wait_for<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..300 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

/// Re-creating an id whose dropped collection is still held in memory
/// replaced the old entry: the old hold's release was then applied to the
/// new collection (its since jumped to the empty frontier), and the old
/// shard was finalized while the hold still protected it.
#[tokio::test]
async fn recreating_a_held_dropped_id_does_not_corrupt_the_accounting() {
    let location = Location::new();
    let sc = location.controller(1).await;
    sc.create_collections_for_bootstrap(vec![(T1, CollectionDescription::table())])
        .await
        .unwrap();
    write(&sc, T1, 0, 10).await;
    let old_shard = sc.collection_metadata(T1).unwrap().data_shard;
    let old_hold = sc.acquire_read_holds(vec![T1]).unwrap();
    sc.drop_collections_unvalidated(&BTreeSet::from([T1]))
        .await
        .unwrap();
    match sc
        .create_collections_for_bootstrap(vec![(T1, CollectionDescription::table())])
        .await
    {
        Err(StorageError::CollectionIdReused(id)) => assert_eq!(id, T1),
        Err(err) => panic!("unexpected error {err:?}"),
        Ok(()) => {
            // The old shard is still held: it must not be finalized.
            tokio::time::sleep(Duration::from_millis(150)).await;
            assert!(
                !is_finalized(&location.client(), old_shard).await,
                "the held shard of the dropped collection was finalized"
            );
            drop(old_hold);
            assert_eq!(
                since(&sc, T1),
                f(0),
                "the old hold's release changed the new collection's since"
            );
            return;
        }
    }
    // Rejected: the old collection and its hold still work as before.
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(!is_finalized(&location.client(), old_shard).await);
    drop(old_hold);
    wait_for("the old shard to be finalized", || async {
        is_finalized(&location.client(), old_shard).await
    })
    .await;
}

/// The same id twice in one call installed it twice; the first copy's
/// holds on its dependencies were never released.
#[tokio::test]
async fn an_id_twice_in_one_create_does_not_leak_dependency_holds() {
    let location = Location::new();
    let sc = location.controller(1).await;
    sc.create_collections_for_bootstrap(vec![(T1, CollectionDescription::table())])
        .await
        .unwrap();
    write(&sc, T1, 0, 10).await;
    let result = sc
        .create_collections_for_bootstrap(vec![
            (D3, CollectionDescription::derived(vec![T1])),
            (D3, CollectionDescription::derived(vec![T1])),
        ])
        .await;
    match result {
        Err(StorageError::CollectionIdReused(id)) => assert_eq!(id, D3),
        Err(err) => panic!("unexpected error {err:?}"),
        Ok(()) => {
            sc.drop_collections_unvalidated(&BTreeSet::from([D3]))
                .await
                .unwrap();
        }
    }
    sc.set_read_policies(vec![(T1, ReadPolicy::ValidFrom(f(5)))])
        .unwrap();
    assert_eq!(since(&sc, T1), f(5), "a leaked hold keeps T1 back");
}

/// A create that failed part way dropped the since handles of the
/// collections it had already installed: they stayed in memory, but their
/// shards' sinces never followed again.
#[tokio::test]
async fn a_partly_failed_create_still_downgrades_the_installed_collections() {
    let location = Location::new();
    let sc = location.controller(1).await;
    let err = sc
        .create_collections_for_bootstrap(vec![
            (T1, CollectionDescription::table()),
            (D3, CollectionDescription::derived(vec![GlobalId::User(99)])),
        ])
        .await
        .unwrap_err();
    assert_eq!(err, StorageError::CollectionMissing(GlobalId::User(99)));
    // T1 was installed and is usable.
    write(&sc, T1, 0, 10).await;
    sc.set_read_policies(vec![(T1, ReadPolicy::ValidFrom(f(5)))])
        .unwrap();
    assert_eq!(since(&sc, T1), f(5));
    let shard = sc.collection_metadata(T1).unwrap().data_shard;
    wait_for("the shard's since to follow", || async {
        shard_since(sc.client(), shard).await == f(5)
    })
    .await;
}

/// A controller told by its durable metadata that a newer epoch took over
/// went on as if nothing happened: its calls succeeded and its background
/// task kept moving sinces.
#[tokio::test]
async fn a_fenced_metadata_write_stops_the_controller() {
    let location = Location::new();
    let old = location.controller(1).await;
    old.create_collections_for_bootstrap(vec![
        (T1, CollectionDescription::table()),
        (T2, CollectionDescription::table()),
    ])
    .await
    .unwrap();
    write(&old, T1, 0, 10).await;
    let shard = old.collection_metadata(T1).unwrap().data_shard;
    // A newer controller starts (it has not opened T1 yet).
    let _new = location.controller(2).await;
    let err = old
        .drop_collections_unvalidated(&BTreeSet::from([T2]))
        .await
        .unwrap_err();
    assert_eq!(
        err,
        StorageError::Fenced {
            ours: 1,
            current: 2
        }
    );
    // The old controller must now stop: no call succeeds, no since moves.
    let result = old.set_read_policies(vec![(T1, ReadPolicy::ValidFrom(f(5)))]);
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(
        shard_since(&location.client(), shard).await,
        f(0),
        "a fenced controller moved a since"
    );
    assert!(
        matches!(result, Err(StorageError::Fenced { .. })),
        "{result:?}"
    );
}

/// Something another process does, run from inside a consensus call.
type Interference = Box<dyn FnOnce() -> BoxFuture<'static, ()> + Send>;

/// Forwards to a consensus, but runs `interference` just before the first
/// compare-and-set on `key` (as another process racing it would).
struct Interfering {
    inner: Arc<dyn Consensus>,
    key: String,
    armed: AtomicBool,
    interference: Mutex<Option<Interference>>,
}

impl std::fmt::Debug for Interfering {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Interfering").finish_non_exhaustive()
    }
}

#[async_trait]
impl Consensus for Interfering {
    async fn head(&self, key: &str) -> Result<Option<VersionedData>, ExternalError> {
        self.inner.head(key).await
    }

    async fn compare_and_set(
        &self,
        key: &str,
        expected: Option<SeqNo>,
        new: VersionedData,
    ) -> Result<CaSResult, ExternalError> {
        if key == self.key && self.armed.swap(false, Ordering::SeqCst) {
            let interference = self.interference.lock().unwrap().take();
            if let Some(interference) = interference {
                interference().await;
            }
        }
        self.inner.compare_and_set(key, expected, new).await
    }

    async fn scan(
        &self,
        key: &str,
        from: SeqNo,
        limit: usize,
    ) -> Result<Vec<VersionedData>, ExternalError> {
        self.inner.scan(key, from, limit).await
    }

    async fn truncate(&self, key: &str, seqno: SeqNo) -> Result<usize, ExternalError> {
        self.inner.truncate(key, seqno).await
    }

    async fn list_keys(&self) -> Result<Vec<String>, ExternalError> {
        self.inner.list_keys().await
    }
}

/// The newest controller read a shard's token, an older controller (not
/// yet aware it was fenced) claimed the shard, and the newest one then took
/// the older token for a newer one and fenced itself.
#[tokio::test]
async fn an_older_claim_racing_a_newer_one_does_not_fence_the_newer() {
    let location = Location::new();
    let old = location.controller(1).await;
    old.prepare_state(&BTreeSet::from([T1]), &BTreeSet::new(), &BTreeMap::new())
        .await
        .unwrap();
    let shard = old.durable_metadata().await.collections[&T1];
    // The shard exists with an unclaimed controller since handle.
    let _: SinceHandle<Vec<u8>, (), u64, i64, u64> = location
        .client()
        .open_critical_since(shard, CONTROLLER_CRITICAL_SINCE, Diagnostics::for_tests())
        .await
        .unwrap();

    let old_client = location.client();
    let interference: Interference = Box::new(move || {
        Box::pin(async move {
            // The epoch 1 controller claims the shard.
            let mut handle: SinceHandle<Vec<u8>, (), u64, i64, u64> = old_client
                .open_critical_since(shard, CONTROLLER_CRITICAL_SINCE, Diagnostics::for_tests())
                .await
                .unwrap();
            handle
                .compare_and_downgrade_since(&0, (&1, &f(0)))
                .await
                .unwrap()
                .unwrap();
        })
    });
    let consensus: Arc<dyn Consensus> = Arc::new(Interfering {
        inner: Arc::clone(&location.consensus),
        key: shard.to_string(),
        armed: AtomicBool::new(true),
        interference: Mutex::new(Some(interference)),
    });
    let client = PersistClient::new(
        PersistConfig::new_for_tests(),
        Arc::clone(&location.blob),
        consensus,
    );
    let new = location.controller_with(client, 2, false).await.unwrap();
    new.create_collections_for_bootstrap(vec![(T1, CollectionDescription::table())])
        .await
        .unwrap();
    new.set_read_policies(vec![]).unwrap();
}

fn secondary_of(primary: GlobalId) -> CollectionDescription {
    CollectionDescription {
        data_source: DataSource::Table,
        since: None,
        primary: Some(primary),
        dependencies: Vec::new(),
    }
}

/// Two collections sharing a shard (a new version of a table) each held
/// the shard's one controller since handle: the shard's since became the
/// join of theirs, beyond what the primary still promises to read.
#[tokio::test]
async fn collections_sharing_a_shard_keep_it_at_the_meet_of_their_sinces() {
    let location = Location::new();
    let sc = location.controller(1).await;
    sc.create_collections_for_bootstrap(vec![(T1, CollectionDescription::table())])
        .await
        .unwrap();
    write(&sc, T1, 0, 20).await;
    let shard = sc.collection_metadata(T1).unwrap().data_shard;
    sc.prepare_state(
        &BTreeSet::new(),
        &BTreeSet::new(),
        &BTreeMap::from([(T2, shard)]),
    )
    .await
    .unwrap();
    sc.create_collections_for_bootstrap(vec![(T2, secondary_of(T1))])
        .await
        .unwrap();
    assert_eq!(sc.collection_metadata(T2).unwrap().data_shard, shard);
    sc.set_read_policies(vec![
        (T1, ReadPolicy::ValidFrom(f(2))),
        (T2, ReadPolicy::ValidFrom(f(10))),
    ])
    .unwrap();
    assert_eq!((since(&sc, T1), since(&sc, T2)), (f(2), f(10)));
    wait_for("the shard's since to move", || async {
        shard_since(sc.client(), shard).await != f(0)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        shard_since(sc.client(), shard).await,
        f(2),
        "the shard's since went past the primary's"
    );
    assert_eq!(sc.snapshot(T1, f(2)).await.unwrap().len(), 3);
}

/// Dropping the primary of a shard another collection still uses recorded
/// the shard for finalization; the next controller finalized it at once,
/// under the live collection.
#[tokio::test]
async fn a_shard_still_used_by_a_live_collection_is_not_finalized() {
    let location = Location::new();
    let shard = {
        let sc = location.controller(1).await;
        sc.create_collections_for_bootstrap(vec![(T1, CollectionDescription::table())])
            .await
            .unwrap();
        write(&sc, T1, 0, 5).await;
        let shard = sc.collection_metadata(T1).unwrap().data_shard;
        sc.prepare_state(
            &BTreeSet::new(),
            &BTreeSet::new(),
            &BTreeMap::from([(T2, shard)]),
        )
        .await
        .unwrap();
        sc.create_collections_for_bootstrap(vec![(T2, secondary_of(T1))])
            .await
            .unwrap();
        sc.drop_collections_unvalidated(&BTreeSet::from([T1]))
            .await
            .unwrap();
        shard
    };
    let sc = location.controller(2).await;
    assert_eq!(sc.durable_metadata().await.collections[&T2], shard);
    sc.initialize_state(&BTreeSet::from([T2])).await.unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(
        !is_finalized(&location.client(), shard).await,
        "the shard of live collection {T2} was finalized"
    );
    sc.create_collections_for_bootstrap(vec![(T2, CollectionDescription::table())])
        .await
        .unwrap();
    assert_eq!(sc.snapshot(T2, f(4)).await.unwrap().len(), 5);
}

/// A read-only controller started before any writable one created the
/// metadata shard (and shards not created yet, like a transient
/// collection's): opening them created them in consensus.
#[tokio::test]
async fn read_only_mode_creates_no_shard() {
    let location = Location::new();
    let (client, writes) = counting_client(&location);
    let read_only = location.controller_with(client, 1, true).await.unwrap();
    read_only.initialize_state(&BTreeSet::new()).await.unwrap();
    let transient = GlobalId::Transient(1);
    read_only
        .create_collections_for_bootstrap(vec![(transient, CollectionDescription::table())])
        .await
        .unwrap();
    read_only.check_exists(transient).unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        writes.load(Ordering::SeqCst),
        0,
        "read-only mode wrote to consensus"
    );
    // A writable controller starts normally afterwards.
    let writable = location.controller(2).await;
    writable
        .create_collections_for_bootstrap(vec![(T1, CollectionDescription::table())])
        .await
        .unwrap();
}

/// A snapshot through a read-only controller registered (and expired) a
/// leased reader: two writes to consensus.
#[tokio::test]
async fn read_only_snapshots_write_nothing() {
    let location = Location::new();
    let writable = location.controller(1).await;
    writable
        .create_collections_for_bootstrap(vec![(T1, CollectionDescription::table())])
        .await
        .unwrap();
    write(&writable, T1, 0, 10).await;
    let (client, writes) = counting_client(&location);
    let read_only = location.controller_with(client, 2, true).await.unwrap();
    read_only
        .create_collections_for_bootstrap(vec![(T1, CollectionDescription::table())])
        .await
        .unwrap();
    assert_eq!(read_only.snapshot(T1, f(9)).await.unwrap().len(), 10);
    assert_eq!(
        writes.load(Ordering::SeqCst),
        0,
        "read-only mode wrote to consensus"
    );
}

/// `acquire_read_holds` built the holds of the ids before a missing one,
/// then returned the error: the holds were dropped while the collections
/// lock was still held (their `Drop` takes it again: a deadlock), and each
/// released a capability it had never added.
#[test]
fn a_failed_acquire_neither_deadlocks_nor_releases_what_it_never_held() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let location = Location::new();
    let sc = runtime.block_on(async {
        let sc = location.controller(1).await;
        sc.create_collections_for_bootstrap(vec![(T1, CollectionDescription::table())])
            .await
            .unwrap();
        sc
    });
    let unknown = GlobalId::User(99);
    let (tx, rx) = std::sync::mpsc::channel();
    let acquiring = sc.clone();
    std::thread::spawn(move || {
        let result = acquiring.acquire_read_holds(vec![T1, unknown]).map(drop);
        tx.send(result).unwrap();
    });
    let result = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("acquire_read_holds deadlocked");
    assert_eq!(result, Err(StorageError::CollectionMissing(unknown)));
    assert_eq!(since(&sc, T1), f(0), "T1's since moved without any change");
}
