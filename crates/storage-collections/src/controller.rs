//! The implementation of [`StorageCollections`](crate::StorageCollections).
//!
//! In-memory state (frontiers, policies, read capabilities) lives under one
//! mutex and is only ever changed synchronously, so a read hold can be
//! released from `Drop`. Every change that moves a collection's since sends
//! the new since to a background task, which owns the persist handles: it
//! downgrades the shards' critical sinces (fenced by the epoch), follows the
//! shards' uppers, and finalizes the shards of dropped collections.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use differential_dataflow::lattice::Lattice;
use persist_client::{
    CONTROLLER_CRITICAL_SINCE, Cursor, Diagnostics, FetchedUpdate, PersistClient, ReadHandle,
    SinceHandle, SnapshotStats,
};
use persist_types::{Codec, Codec64, PersistLocation, ShardId, SimpleSchema};
use serde_json::json;
use timely::PartialOrder;
use timely::progress::frontier::MutableAntichain;
use timely::progress::{Antichain, ChangeBatch};
use tokio::sync::mpsc;

use crate::durable::{DurableMetadata, StorageTxn};
use crate::{
    CollectionDescription, CollectionFrontiers, CollectionMetadata, GlobalId, ReadPolicy,
    StorageError, Timestamp,
};

/// The key type of every collection's shard: an encoded row.
pub type Row = Vec<u8>;
/// An update of a collection.
pub type Update = ((Row, ()), Timestamp, i64);
type Handle = SinceHandle<Row, (), Timestamp, i64, u64>;

/// Knobs of the controller.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// How often the background task polls the shards' uppers and retries
    /// pending since downgrades and finalizations.
    pub tick: Duration,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        ControllerConfig {
            tick: Duration::from_millis(250),
        }
    }
}

/// One collection's in-memory state.
#[derive(Debug)]
struct Collection {
    description: CollectionDescription,
    metadata: CollectionMetadata,
    write_frontier: Antichain<Timestamp>,
    read_policy: ReadPolicy,
    implied_capability: Antichain<Timestamp>,
    /// Every read capability: the implied one, read holds, and the holds of
    /// collections depending on this one. Its frontier is the since.
    read_capabilities: MutableAntichain<Timestamp>,
    /// The collections this one holds back (dependencies and primary).
    holds_on: Vec<GlobalId>,
    dropped: bool,
}

impl Collection {
    fn since(&self) -> Antichain<Timestamp> {
        self.read_capabilities.frontier().to_owned()
    }
}

/// Commands to the background task.
#[derive(Debug)]
enum Command {
    /// Take over the since handles of newly registered collections.
    Register(Vec<(GlobalId, Box<Handle>)>),
    /// These collections' sinces moved.
    Sinces(BTreeMap<GlobalId, Antichain<Timestamp>>),
}

#[derive(Debug)]
pub(crate) struct Inner {
    client: PersistClient,
    location: PersistLocation,
    epoch: u64,
    read_only: bool,
    collections: Mutex<BTreeMap<GlobalId, Collection>>,
    metadata: tokio::sync::Mutex<DurableMetadata>,
    commands: mpsc::UnboundedSender<Command>,
    /// Set once a newer epoch fenced this controller.
    fenced: Mutex<Option<StorageError>>,
}

/// The controller of a set of collections' shards. Cheap to clone.
#[derive(Debug, Clone)]
pub struct StorageCollectionsImpl {
    inner: Arc<Inner>,
}

impl StorageCollectionsImpl {
    /// Opens the controller of epoch `epoch` for the collections of
    /// `location` (which `client` is a client of), with its durable
    /// metadata in `metadata_shard`, and starts its background task.
    ///
    /// A writable controller records its epoch, fencing out every
    /// controller of an older one; it fails with `Fenced` if a newer one is
    /// in charge. A read-only controller (`read_only`) writes nothing to
    /// persist: it tracks frontiers, policies and holds in memory only, and
    /// leaves sinces and finalization to the writable one.
    pub async fn open(
        client: PersistClient,
        location: PersistLocation,
        metadata_shard: ShardId,
        epoch: u64,
        read_only: bool,
        cfg: ControllerConfig,
    ) -> Result<Self, StorageError> {
        let metadata = DurableMetadata::open(&client, metadata_shard, epoch, !read_only).await?;
        let (commands, rx) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            client,
            location,
            epoch,
            read_only,
            collections: Mutex::new(BTreeMap::new()),
            metadata: tokio::sync::Mutex::new(metadata),
            commands,
            fenced: Mutex::new(None),
        });
        let task = BackgroundTask {
            inner: Arc::downgrade(&inner),
            handles: BTreeMap::new(),
            desired: BTreeMap::new(),
            rx,
            tick: cfg.tick,
            existing: BTreeSet::new(),
        };
        tokio::spawn(task.run());
        Ok(StorageCollectionsImpl { inner })
    }

    fn collections(&self) -> MutexGuard<'_, BTreeMap<GlobalId, Collection>> {
        self.inner.lock()
    }

    fn check_fenced(&self) -> Result<(), StorageError> {
        match &*self.inner.fenced.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(err) => Err(err.clone()),
            None => Ok(()),
        }
    }

    fn check_writable(&self, what: &'static str) -> Result<(), StorageError> {
        self.check_fenced()?;
        if self.inner.read_only {
            return Err(StorageError::ReadOnly(what));
        }
        Ok(())
    }

    /// The durable metadata as of its last load or commit.
    pub async fn durable_metadata(&self) -> crate::durable::Metadata {
        self.inner.metadata.lock().await.current().clone()
    }

    /// Reconciles the durable metadata with the collections the caller
    /// knows (`init_ids`): any other recorded collection was dropped while
    /// no controller ran, so its shard is recorded for finalization.
    pub async fn initialize_state(
        &self,
        init_ids: &BTreeSet<GlobalId>,
    ) -> Result<(), StorageError> {
        let mut metadata = self.inner.metadata.lock().await;
        metadata
            .reload()
            .await
            .map_err(|e| self.inner.observe_fenced(e))?;
        let stale: BTreeSet<GlobalId> = metadata
            .current()
            .collections
            .keys()
            .filter(|id| !init_ids.contains(id))
            .copied()
            .collect();
        if stale.is_empty() || self.inner.read_only {
            return Ok(());
        }
        self.check_writable("initialize_state")?;
        let mut txn = metadata.txn();
        let dropped = txn.delete_collection_metadata(&stale);
        txn.insert_unfinalized_shards(dropped.into_iter().map(|(_, s)| s).collect());
        metadata
            .commit(txn)
            .await
            .map_err(|e| self.inner.observe_fenced(e))
    }

    /// Changes the durable metadata: allocates shards for `ids_to_add`,
    /// maps `ids_to_register` to existing shards, and forgets
    /// `ids_to_drop`, recording their shards for finalization. Atomic.
    pub async fn prepare_state(
        &self,
        ids_to_add: &BTreeSet<GlobalId>,
        ids_to_drop: &BTreeSet<GlobalId>,
        ids_to_register: &BTreeMap<GlobalId, ShardId>,
    ) -> Result<(), StorageError> {
        self.check_writable("prepare_state")?;
        let mut metadata = self.inner.metadata.lock().await;
        let mut txn = metadata.txn();
        for id in ids_to_add.iter().filter(|id| !id.is_transient()) {
            txn.insert_collection_metadata(*id, ShardId::new())?;
        }
        for (id, shard) in ids_to_register {
            txn.insert_collection_metadata(*id, *shard)?;
        }
        let dropped = txn.delete_collection_metadata(ids_to_drop);
        txn.insert_unfinalized_shards(dropped.into_iter().map(|(_, s)| s).collect());
        metadata
            .commit(txn)
            .await
            .map_err(|e| self.inner.observe_fenced(e))
    }

    /// Creates (or, after a restart, re-opens) the collections described,
    /// in order: a dependency must come before its dependents. Ids without
    /// a shard in the durable metadata get a new one (recorded); transient
    /// ids get a shard that is never recorded.
    pub async fn create_collections_for_bootstrap(
        &self,
        collections: Vec<(GlobalId, CollectionDescription)>,
    ) -> Result<(), StorageError> {
        self.check_fenced()?;
        // A dropped collection stays in memory until released: its id is
        // still in use (its holds and shard are tracked under it).
        let mut seen = BTreeSet::new();
        for (id, _) in &collections {
            if !seen.insert(*id) || self.collections().contains_key(id) {
                return Err(StorageError::CollectionIdReused(*id));
            }
        }
        // Record new ids first, so a crash leaves no unrecorded shard.
        let recorded = self
            .inner
            .metadata
            .lock()
            .await
            .current()
            .collections
            .clone();
        let new: BTreeSet<GlobalId> = collections
            .iter()
            .map(|(id, _)| *id)
            .filter(|id| !recorded.contains_key(id) && !id.is_transient())
            .collect();
        if !new.is_empty() {
            self.prepare_state(&new, &BTreeSet::new(), &BTreeMap::new())
                .await?;
        }
        let recorded = self
            .inner
            .metadata
            .lock()
            .await
            .current()
            .collections
            .clone();
        for (id, description) in collections {
            let shard = match recorded.get(&id) {
                Some(shard) => *shard,
                None if id.is_transient() => ShardId::new(),
                None => return Err(StorageError::CollectionMissing(id)),
            };
            // A read-only controller must not create a shard by opening it.
            if self.inner.read_only && !self.inner.shard_exists(shard).await? {
                let mut since = Antichain::from_elem(Timestamp::default());
                if let Some(initial) = &description.since {
                    since = since.join(initial);
                }
                let upper = Antichain::from_elem(Timestamp::default());
                self.install(id, description, shard, since, upper, None)?;
                continue;
            }
            // A collection sharing its primary's shard leaves the shard's
            // one controller since handle to the primary, which it holds
            // back: two handles of one critical reader would hold the shard
            // at the join of their sinces, not the meet.
            let shares_primary = description.primary.is_some_and(|primary| {
                self.collections()
                    .get(&primary)
                    .is_some_and(|c| c.metadata.data_shard == shard)
            });
            let (since, handle) = if shares_primary {
                let mut since = self
                    .inner
                    .client
                    .fetch_recent_since::<Row, (), Timestamp, i64>(shard)
                    .await?;
                if let Some(initial) = &description.since {
                    since = since.join(initial);
                }
                (since, None)
            } else {
                self.open_shard(shard, description.since.as_ref()).await?
            };
            let upper = self
                .inner
                .client
                .fetch_recent_upper::<Row, (), Timestamp, i64>(shard)
                .await?;
            self.install(id, description, shard, since, upper, handle)?;
        }
        Ok(())
    }

    /// Opens the shard's critical since handle and claims it for this
    /// epoch (writable), or only reads its since (read-only).
    async fn open_shard(
        &self,
        shard: ShardId,
        initial_since: Option<&Antichain<Timestamp>>,
    ) -> Result<(Antichain<Timestamp>, Option<Handle>), StorageError> {
        if self.inner.read_only {
            let since = self
                .inner
                .client
                .fetch_recent_since::<Row, (), Timestamp, i64>(shard)
                .await?;
            return Ok((since, None));
        }
        let mut handle: Handle = self
            .inner
            .client
            .open_critical_since(
                shard,
                CONTROLLER_CRITICAL_SINCE,
                Diagnostics::from_purpose("storage controller"),
            )
            .await?;
        let current = *handle.opaque();
        if current > self.inner.epoch {
            return Err(self.fence(current));
        }
        let mut since = handle.since().clone();
        if let Some(initial) = initial_since {
            since = since.join(initial);
        }
        match claim(&mut handle, self.inner.epoch, &since).await? {
            Ok(since) => Ok((since, Some(handle))),
            Err(newer) => Err(self.fence(newer)),
        }
    }

    fn fence(&self, current: u64) -> StorageError {
        self.inner.fence(current)
    }

    /// Adds a collection to the in-memory state, holding back what it
    /// depends on, and hands its since handle (if any) to the background
    /// task.
    fn install(
        &self,
        id: GlobalId,
        description: CollectionDescription,
        shard: ShardId,
        since: Antichain<Timestamp>,
        upper: Antichain<Timestamp>,
        handle: Option<Handle>,
    ) -> Result<(), StorageError> {
        let mut collections = self.collections();
        if collections.contains_key(&id) {
            return Err(StorageError::CollectionIdReused(id));
        }
        let holds_on: Vec<GlobalId> = description
            .dependencies
            .iter()
            .chain(description.primary.iter())
            .copied()
            .collect();
        // A collection can only hold back what is still readable at its
        // since: start at the join of its own and its dependencies' sinces.
        let mut since = since;
        for dep in &holds_on {
            let dep = collections
                .get(dep)
                .filter(|c| !c.dropped)
                .ok_or(StorageError::CollectionMissing(*dep))?;
            since = since.join(&dep.since());
        }
        let mut read_capabilities = MutableAntichain::new();
        read_capabilities.update_iter(since.iter().map(|t| (*t, 1)));
        let collection = Collection {
            metadata: CollectionMetadata {
                location: self.inner.location.clone(),
                data_shard: shard,
                codecs: persist_client::Codecs {
                    key: <Row as Codec>::codec_name(),
                    val: <() as Codec>::codec_name(),
                    ts: <Timestamp as Codec64>::codec_name(),
                    diff: <i64 as Codec64>::codec_name(),
                },
            },
            description,
            write_frontier: upper,
            read_policy: ReadPolicy::ValidFrom(since.clone()),
            implied_capability: since.clone(),
            read_capabilities,
            holds_on: holds_on.clone(),
            dropped: false,
        };
        collections.insert(id, collection);
        // Registered before any since change of the collection can be sent
        // (those are made under this lock), so none finds no handle.
        if let Some(handle) = handle {
            let _ = self
                .inner
                .commands
                .send(Command::Register(vec![(id, Box::new(handle))]));
        }
        let mut changes = BTreeMap::new();
        for dep in holds_on {
            let batch: &mut ChangeBatch<Timestamp> = changes.entry(dep).or_default();
            batch.extend(since.iter().map(|t| (*t, 1)));
        }
        let mut changed = self.inner.apply(&mut collections, changes);
        changed.insert(id, since);
        self.inner.send_sinces(changed);
        drop(collections);
        Ok(())
    }

    /// Sets read policies, moving implied capabilities forward (never
    /// back).
    pub fn set_read_policies(
        &self,
        policies: Vec<(GlobalId, ReadPolicy)>,
    ) -> Result<(), StorageError> {
        self.check_fenced()?;
        let mut collections = self.collections();
        for (id, _) in &policies {
            match collections.get(id) {
                None => return Err(StorageError::CollectionMissing(*id)),
                Some(c) if c.dropped => return Err(StorageError::CollectionDropped(*id)),
                Some(_) => {}
            }
        }
        let mut changes = BTreeMap::new();
        for (id, policy) in policies {
            if let Some(collection) = collections.get_mut(&id) {
                collection.read_policy = policy;
                implied_change(collection, &mut changes, id);
            }
        }
        let changed = self.inner.apply(&mut collections, changes);
        self.inner.send_sinces(changed);
        drop(collections);
        Ok(())
    }

    /// Acquires read holds at the collections' current sinces. Each hold
    /// keeps its collection's since at or before the hold's frontier until
    /// it is dropped or downgraded.
    pub fn acquire_read_holds(&self, ids: Vec<GlobalId>) -> Result<Vec<ReadHold>, StorageError> {
        self.check_fenced()?;
        let mut collections = self.collections();
        // Every id first: a hold built and then dropped on an error would
        // release what it never added (and take this lock again).
        for id in &ids {
            match collections.get(id) {
                None => return Err(StorageError::CollectionMissing(*id)),
                Some(c) if c.dropped => return Err(StorageError::CollectionDropped(*id)),
                Some(_) => {}
            }
        }
        let mut holds = Vec::new();
        let mut changes: BTreeMap<GlobalId, ChangeBatch<Timestamp>> = BTreeMap::new();
        for id in &ids {
            let collection = match collections.get(id) {
                None => return Err(StorageError::CollectionMissing(*id)),
                Some(c) if c.dropped => return Err(StorageError::CollectionDropped(*id)),
                Some(c) => c,
            };
            let since = collection.since();
            changes
                .entry(*id)
                .or_default()
                .extend(since.iter().map(|t| (*t, 1)));
            holds.push(ReadHold {
                id: *id,
                since,
                inner: Arc::downgrade(&self.inner),
            });
        }
        let changed = self.inner.apply(&mut collections, changes);
        self.inner.send_sinces(changed);
        drop(collections);
        Ok(holds)
    }

    /// Drops collections: forgets them durably (recording their shards for
    /// finalization) and lets their sinces go. Their shards are finalized
    /// once no read hold remains.
    pub async fn drop_collections_unvalidated(
        &self,
        ids: &BTreeSet<GlobalId>,
    ) -> Result<(), StorageError> {
        self.check_writable("drop_collections")?;
        for id in ids {
            if self.collections().get(id).is_none_or(|c| c.dropped) {
                return Err(StorageError::CollectionMissing(*id));
            }
        }
        let durable: BTreeSet<GlobalId> = ids
            .iter()
            .filter(|id| !id.is_transient())
            .copied()
            .collect();
        self.prepare_state(&BTreeSet::new(), &durable, &BTreeMap::new())
            .await?;
        let mut collections = self.collections();
        let mut changes = BTreeMap::new();
        for id in ids {
            if let Some(collection) = collections.get_mut(id) {
                collection.dropped = true;
                collection.read_policy = ReadPolicy::ValidFrom(Antichain::new());
                implied_change(collection, &mut changes, *id);
            }
        }
        let changed = self.inner.apply(&mut collections, changes);
        self.inner.send_sinces(changed);
        drop(collections);
        Ok(())
    }

    /// Where a collection's data lives.
    pub fn collection_metadata(&self, id: GlobalId) -> Result<CollectionMetadata, StorageError> {
        self.collections()
            .get(&id)
            .filter(|c| !c.dropped)
            .map(|c| c.metadata.clone())
            .ok_or(StorageError::CollectionMissing(id))
    }

    /// A collection's frontiers.
    pub fn collection_frontiers(&self, id: GlobalId) -> Result<CollectionFrontiers, StorageError> {
        self.collections()
            .get(&id)
            .map(|c| frontiers(id, c))
            .ok_or(StorageError::CollectionMissing(id))
    }

    /// The frontiers of every collection not dropped.
    pub fn active_collection_frontiers(&self) -> Vec<CollectionFrontiers> {
        self.collections()
            .iter()
            .filter(|(_, c)| !c.dropped)
            .map(|(id, c)| frontiers(*id, c))
            .collect()
    }

    /// Whether `id` exists (and was not dropped).
    pub fn check_exists(&self, id: GlobalId) -> Result<(), StorageError> {
        match self.collections().get(&id) {
            Some(c) if !c.dropped => Ok(()),
            Some(_) => Err(StorageError::CollectionDropped(id)),
            None => Err(StorageError::CollectionMissing(id)),
        }
    }

    fn readable_shard(
        &self,
        id: GlobalId,
        as_of: &Antichain<Timestamp>,
    ) -> Result<ShardId, StorageError> {
        let collections = self.collections();
        let collection = collections
            .get(&id)
            .filter(|c| !c.dropped)
            .ok_or(StorageError::CollectionMissing(id))?;
        let since = collection.since();
        if !PartialOrder::less_equal(&since, as_of) {
            return Err(StorageError::ReadBeforeSince {
                id,
                as_of: as_of.clone(),
                since,
            });
        }
        Ok(collection.metadata.data_shard)
    }

    /// The collection's contents at `as_of`, consolidated. Waits until the
    /// collection is complete beyond `as_of`.
    pub async fn snapshot(
        &self,
        id: GlobalId,
        as_of: Antichain<Timestamp>,
    ) -> Result<Vec<FetchedUpdate<Row, (), Timestamp, i64>>, StorageError> {
        let shard = self.readable_shard(id, &as_of)?;
        // Hold the since while reading.
        let _hold = self.acquire_read_holds(vec![id])?;
        if self.inner.read_only {
            // A leased reader would be registered in consensus.
            return Ok(self
                .inner
                .client
                .snapshot_unleased::<Row, (), Timestamp, i64>(
                    shard,
                    Arc::new(SimpleSchema::new()),
                    Arc::new(SimpleSchema::new()),
                    as_of,
                )
                .await?);
        }
        let mut read = self
            .inner
            .client
            .open_leased_reader::<Row, (), Timestamp, i64>(
                shard,
                Arc::new(SimpleSchema::new()),
                Arc::new(SimpleSchema::new()),
                Diagnostics::from_purpose("storage controller snapshot"),
            )
            .await?;
        let result = read.snapshot_and_fetch(as_of).await;
        read.expire().await;
        Ok(result?)
    }

    /// The collection's latest contents (at its upper minus one).
    pub async fn snapshot_latest(
        &self,
        id: GlobalId,
    ) -> Result<Vec<FetchedUpdate<Row, (), Timestamp, i64>>, StorageError> {
        let shard = self.collection_metadata(id)?.data_shard;
        let upper = self
            .inner
            .client
            .fetch_recent_upper::<Row, (), Timestamp, i64>(shard)
            .await?;
        let as_of = match upper.as_option() {
            Some(0) | None => {
                return Err(StorageError::Persist(format!(
                    "collection {id} has no complete time"
                )));
            }
            Some(t) => t - 1,
        };
        self.snapshot(id, Antichain::from_elem(as_of)).await
    }

    /// The snapshot at `as_of`, read one part at a time (memory bounded by
    /// the largest part). The cursor owns a leased reader, which keeps the
    /// data readable until the cursor is finished or dropped.
    pub async fn snapshot_cursor(
        &self,
        id: GlobalId,
        as_of: Antichain<Timestamp>,
    ) -> Result<SnapshotCursor, StorageError> {
        let shard = self.readable_shard(id, &as_of)?;
        let mut read = self
            .inner
            .client
            .open_leased_reader::<Row, (), Timestamp, i64>(
                shard,
                Arc::new(SimpleSchema::new()),
                Arc::new(SimpleSchema::new()),
                Diagnostics::from_purpose("storage controller cursor"),
            )
            .await?;
        let cursor = read.snapshot_cursor(as_of, |_| true).await?;
        Ok(SnapshotCursor { cursor, read })
    }

    /// The snapshot at `as_of` as a stream of updates (consolidated within
    /// each part).
    pub async fn snapshot_and_stream(
        &self,
        id: GlobalId,
        as_of: Antichain<Timestamp>,
    ) -> Result<
        impl futures::Stream<Item = FetchedUpdate<Row, (), Timestamp, i64>> + use<>,
        StorageError,
    > {
        let updates = self.snapshot(id, as_of).await?;
        Ok(futures::stream::iter(updates))
    }

    /// Statistics of the snapshot at `as_of`, from the shard's state alone.
    pub async fn snapshot_stats(
        &self,
        id: GlobalId,
        as_of: Antichain<Timestamp>,
    ) -> Result<SnapshotStats, StorageError> {
        let shard = self.readable_shard(id, &as_of)?;
        let handle: Handle = self
            .inner
            .client
            .open_critical_since(
                shard,
                CONTROLLER_CRITICAL_SINCE,
                Diagnostics::from_purpose("storage controller stats"),
            )
            .await?;
        Ok(handle.snapshot_stats(as_of).await?)
    }

    /// Everything the controller tracks, as JSON, for debugging.
    pub async fn dump(&self) -> serde_json::Value {
        let durable = self.durable_metadata().await;
        let collections: serde_json::Map<String, serde_json::Value> = self
            .collections()
            .iter()
            .map(|(id, c)| {
                let value = json!({
                    "shard": c.metadata.data_shard.to_string(),
                    "description": c.description,
                    "write_frontier": c.write_frontier,
                    "implied_capability": c.implied_capability,
                    "since": c.since(),
                    "read_policy": c.read_policy,
                    "holds_on": c.holds_on,
                    "dropped": c.dropped,
                });
                (id.to_string(), value)
            })
            .collect();
        json!({
            "epoch": self.inner.epoch,
            "read_only": self.inner.read_only,
            "fenced": self.check_fenced().err().map(|e| e.to_string()),
            "collections": collections,
            "durable": {
                "collections": durable.collections.iter().map(|(id, s)| (id.to_string(), s.to_string())).collect::<BTreeMap<_, _>>(),
                "unfinalized": durable.unfinalized.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "finalized": durable.finalized.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "epoch": durable.epoch,
            },
        })
    }

    /// The persist client the controller uses.
    pub fn client(&self) -> &PersistClient {
        &self.inner.client
    }
}

/// Moves a collection's implied capability to what its policy says now,
/// never backward, recording the capability change.
fn implied_change(
    collection: &mut Collection,
    changes: &mut BTreeMap<GlobalId, ChangeBatch<Timestamp>>,
    id: GlobalId,
) {
    let new = collection
        .read_policy
        .frontier(&collection.write_frontier)
        .join(&collection.implied_capability);
    if new != collection.implied_capability {
        let batch = changes.entry(id).or_default();
        batch.extend(new.iter().map(|t| (*t, 1)));
        batch.extend(collection.implied_capability.iter().map(|t| (*t, -1)));
        collection.implied_capability = new;
    }
}

fn frontiers(id: GlobalId, c: &Collection) -> CollectionFrontiers {
    CollectionFrontiers {
        id,
        write_frontier: c.write_frontier.clone(),
        implied_capability: c.implied_capability.clone(),
        read_capabilities: c.since(),
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<GlobalId, Collection>> {
        self.collections.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn is_fenced(&self) -> bool {
        self.fenced
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// Records a `Fenced` error (from the durable metadata, say), so the
    /// controller stops.
    fn observe_fenced(&self, err: StorageError) -> StorageError {
        match err {
            StorageError::Fenced { current, .. } => self.fence(current),
            err => err,
        }
    }

    /// Whether `shard` exists (without creating it, as opening it would).
    async fn shard_exists(&self, shard: ShardId) -> Result<bool, StorageError> {
        Ok(self
            .client
            .shard_codecs(shard)
            .await
            .map_err(|e| StorageError::Persist(e.to_string()))?
            .is_some())
    }

    fn fence(&self, current: u64) -> StorageError {
        let err = StorageError::Fenced {
            ours: self.epoch,
            current,
        };
        tracing::error!(
            epoch = self.epoch,
            current,
            "fenced out by a newer controller"
        );
        *self.fenced.lock().unwrap_or_else(|p| p.into_inner()) = Some(err.clone());
        err
    }

    /// Applies read capability changes, cascading since changes to the
    /// collections each one holds back. Returns the new sinces.
    fn apply(
        &self,
        collections: &mut BTreeMap<GlobalId, Collection>,
        mut changes: BTreeMap<GlobalId, ChangeBatch<Timestamp>>,
    ) -> BTreeMap<GlobalId, Antichain<Timestamp>> {
        let mut changed = BTreeMap::new();
        while let Some((id, mut batch)) = changes.pop_first() {
            let Some(collection) = collections.get_mut(&id) else {
                continue;
            };
            let before = collection.since();
            collection.read_capabilities.update_iter(batch.drain());
            let after = collection.since();
            if before == after {
                continue;
            }
            for dep in &collection.holds_on {
                let batch = changes.entry(*dep).or_default();
                batch.extend(after.iter().map(|t| (*t, 1)));
                batch.extend(before.iter().map(|t| (*t, -1)));
            }
            changed.insert(id, after);
        }
        changed
    }

    /// Sends the new sinces to the background task. Called with the
    /// collections lock held, so that sinces reach the task in the order
    /// they were made: an older since sent late would replace a newer one
    /// (the final empty one of a dropped collection, say).
    fn send_sinces(&self, changed: BTreeMap<GlobalId, Antichain<Timestamp>>) {
        if !changed.is_empty() && !self.read_only {
            let _ = self.commands.send(Command::Sinces(changed));
        }
    }

    /// Applies newly observed uppers and the capabilities they imply.
    fn update_write_frontiers(&self, uppers: Vec<(GlobalId, Antichain<Timestamp>)>) {
        let mut collections = self.lock();
        let mut changes = BTreeMap::new();
        for (id, upper) in uppers {
            if let Some(collection) = collections.get_mut(&id)
                && PartialOrder::less_than(&collection.write_frontier, &upper)
            {
                collection.write_frontier = upper;
                implied_change(collection, &mut changes, id);
            }
        }
        let changed = self.apply(&mut collections, changes);
        self.send_sinces(changed);
        drop(collections);
    }
}

/// A snapshot being read part by part; see
/// [`StorageCollectionsImpl::snapshot_cursor`].
#[derive(Debug)]
pub struct SnapshotCursor {
    cursor: Cursor<Row, (), Timestamp, i64>,
    read: ReadHandle<Row, (), Timestamp, i64>,
}

impl SnapshotCursor {
    /// The updates of the next part (times advanced to the as_of), or
    /// `None` when every part was read.
    pub async fn next(
        &mut self,
    ) -> Option<Result<Vec<FetchedUpdate<Row, (), Timestamp, i64>>, StorageError>> {
        self.cursor
            .next()
            .await
            .map(|r| r.map_err(StorageError::from))
    }

    /// Releases the reader now (dropping the cursor does so in the
    /// background).
    pub async fn finish(self) {
        self.read.expire().await;
    }
}

/// A hold on a collection's since: while it lives, the since stays at or
/// before the hold's frontier. Released on drop.
#[derive(Debug)]
pub struct ReadHold {
    id: GlobalId,
    since: Antichain<Timestamp>,
    inner: Weak<Inner>,
}

impl ReadHold {
    /// The collection held.
    pub fn id(&self) -> GlobalId {
        self.id
    }

    /// The frontier the hold keeps the since at or before.
    pub fn since(&self) -> &Antichain<Timestamp> {
        &self.since
    }

    /// Moves the hold forward to `frontier` (joined with its current one: a
    /// hold never moves back).
    pub fn downgrade(&mut self, frontier: &Antichain<Timestamp>) {
        let new = self.since.join(frontier);
        self.change(&new);
    }

    /// Releases the hold now.
    pub fn release(mut self) {
        self.change(&Antichain::new());
    }

    fn change(&mut self, new: &Antichain<Timestamp>) {
        if *new == self.since {
            return;
        }
        if let Some(inner) = self.inner.upgrade() {
            let mut batch = ChangeBatch::new();
            batch.extend(new.iter().map(|t| (*t, 1)));
            batch.extend(self.since.iter().map(|t| (*t, -1)));
            let mut collections = inner.lock();
            let changed = inner.apply(&mut collections, BTreeMap::from([(self.id, batch)]));
            inner.send_sinces(changed);
            drop(collections);
        }
        self.since = new.clone();
    }
}

impl Clone for ReadHold {
    fn clone(&self) -> Self {
        if let Some(inner) = self.inner.upgrade() {
            let mut batch = ChangeBatch::new();
            batch.extend(self.since.iter().map(|t| (*t, 1)));
            let mut collections = inner.lock();
            let changed = inner.apply(&mut collections, BTreeMap::from([(self.id, batch)]));
            inner.send_sinces(changed);
            drop(collections);
        }
        ReadHold {
            id: self.id,
            since: self.since.clone(),
            inner: self.inner.clone(),
        }
    }
}

impl Drop for ReadHold {
    fn drop(&mut self) {
        self.change(&Antichain::new());
    }
}

/// The background task: owns the since handles, downgrades sinces, follows
/// uppers, removes fully released dropped collections, finalizes shards.
struct BackgroundTask {
    inner: Weak<Inner>,
    handles: BTreeMap<GlobalId, Box<Handle>>,
    /// The since each collection should be at.
    desired: BTreeMap<GlobalId, Antichain<Timestamp>>,
    rx: mpsc::UnboundedReceiver<Command>,
    tick: Duration,
    /// Shards a read-only controller found to exist (they never stop).
    existing: BTreeSet<ShardId>,
}

impl BackgroundTask {
    async fn run(mut self) {
        let mut tick = tokio::time::interval(self.tick);
        loop {
            tokio::select! {
                command = self.rx.recv() => match command {
                    Some(Command::Register(handles)) => self.handles.extend(handles),
                    Some(Command::Sinces(sinces)) => self.desired.extend(sinces),
                    None => return,
                },
                _ = tick.tick() => {
                    let Some(inner) = self.inner.upgrade() else { return };
                    if inner.is_fenced() {
                        return;
                    }
                    self.follow_uppers(&inner).await;
                    self.finalize(&inner).await;
                }
            }
            let Some(inner) = self.inner.upgrade() else {
                return;
            };
            if inner.is_fenced() {
                return;
            }
            self.downgrade_sinces(&inner).await;
        }
    }

    async fn follow_uppers(&mut self, inner: &Arc<Inner>) {
        let shards: Vec<(GlobalId, ShardId)> = inner
            .lock()
            .iter()
            .filter(|(_, c)| !c.dropped)
            .map(|(id, c)| (*id, c.metadata.data_shard))
            .collect();
        let mut uppers = Vec::new();
        for (id, shard) in shards {
            // A read-only controller must not create a shard by opening it.
            if inner.read_only && !self.existing.contains(&shard) {
                match inner.shard_exists(shard).await {
                    Ok(true) => {
                        self.existing.insert(shard);
                    }
                    Ok(false) => continue,
                    Err(err) => {
                        tracing::warn!(%id, %err, "cannot read the shard");
                        continue;
                    }
                }
            }
            match inner
                .client
                .fetch_recent_upper::<Row, (), Timestamp, i64>(shard)
                .await
            {
                Ok(upper) => uppers.push((id, upper)),
                Err(err) => tracing::warn!(%id, %err, "cannot read the upper"),
            }
        }
        inner.update_write_frontiers(uppers);
    }

    /// Downgrades every handle whose since should move, rate limited except
    /// for the final downgrade to the empty frontier.
    async fn downgrade_sinces(&mut self, inner: &Arc<Inner>) {
        let epoch = inner.epoch;
        let mut done = Vec::new();
        for (id, since) in &self.desired {
            let Some(handle) = self.handles.get_mut(id) else {
                done.push(*id);
                continue;
            };
            if handle.since() == since {
                done.push(*id);
                continue;
            }
            let result = if since.is_empty() {
                Some(
                    handle
                        .compare_and_downgrade_since(&epoch, (&epoch, since))
                        .await,
                )
            } else {
                handle
                    .maybe_compare_and_downgrade_since(&epoch, (&epoch, since))
                    .await
            };
            match result {
                None => {} // Rate limited: retried on a later tick.
                Some(Ok(Ok(_))) => done.push(*id),
                Some(Ok(Err(current))) => {
                    inner.fence(current);
                    return;
                }
                Some(Err(err)) => tracing::warn!(%id, %err, "cannot downgrade the since"),
            }
        }
        for id in done {
            self.desired.remove(&id);
        }
        // Dropped collections whose since reached the end are done here.
        let released: Vec<GlobalId> = inner
            .lock()
            .iter()
            .filter(|(id, c)| {
                c.dropped
                    && c.since().is_empty()
                    && self.handles.get(*id).is_none_or(|h| h.since().is_empty())
            })
            .map(|(id, _)| *id)
            .collect();
        let mut collections = inner.lock();
        for id in released {
            collections.remove(&id);
            self.handles.remove(&id);
        }
    }

    /// Finalizes the shards recorded for finalization whose collections
    /// are gone from memory; failures are retried on the next tick.
    async fn finalize(&mut self, inner: &Arc<Inner>) {
        if inner.read_only {
            return;
        }
        let in_memory: BTreeSet<ShardId> = inner
            .lock()
            .values()
            .map(|c| c.metadata.data_shard)
            .collect();
        // A shard still mapped to a collection (sharing it) stays.
        let pending: BTreeSet<ShardId> = {
            let metadata = inner.metadata.lock().await;
            let current = metadata.current();
            let live: BTreeSet<ShardId> = current.collections.values().copied().collect();
            current.unfinalized.difference(&live).copied().collect()
        };
        let mut finalized = BTreeSet::new();
        let to_finalize: Vec<ShardId> = pending.difference(&in_memory).copied().collect();
        for shard in to_finalize {
            if inner.is_fenced() {
                return;
            }
            match finalize_shard(inner, shard).await {
                Ok(()) => {
                    finalized.insert(shard);
                }
                Err(StorageError::Fenced { current, .. }) => {
                    inner.fence(current);
                    return;
                }
                Err(err) => tracing::info!(%shard, %err, "finalization postponed"),
            }
        }
        if finalized.is_empty() {
            return;
        }
        let mut metadata = inner.metadata.lock().await;
        let mut txn = metadata.txn();
        txn.mark_shards_as_finalized(finalized);
        if let Err(err) = metadata.commit(txn).await {
            if let StorageError::Fenced { current, .. } = err {
                inner.fence(current);
            }
            tracing::warn!(%err, "cannot record finalized shards; retrying");
        }
    }
}

/// Closes and finalizes one shard: upper and critical since to the empty
/// frontier, then `finalize_shard`. Idempotent.
async fn finalize_shard(inner: &Inner, shard: ShardId) -> Result<(), StorageError> {
    let client = &inner.client;
    let diagnostics = || Diagnostics::from_purpose("storage controller finalization");
    if client
        .is_finalized::<Row, (), Timestamp, i64>(shard, diagnostics())
        .await?
    {
        return Ok(());
    }
    let mut write = client
        .open_writer::<Row, (), Timestamp, i64>(
            shard,
            Arc::new(SimpleSchema::new()),
            Arc::new(SimpleSchema::new()),
            diagnostics(),
        )
        .await?;
    let advanced = write.advance_upper(&Antichain::new()).await;
    write.expire().await;
    advanced?;
    let mut handle: Handle = client
        .open_critical_since(shard, CONTROLLER_CRITICAL_SINCE, diagnostics())
        .await?;
    if let Err(newer) = claim(&mut handle, inner.epoch, &Antichain::new()).await? {
        return Err(StorageError::Fenced {
            ours: inner.epoch,
            current: newer,
        });
    }
    client
        .finalize_shard::<Row, (), Timestamp, i64>(shard, diagnostics())
        .await?;
    Ok(())
}

/// Sets the handle's token to `epoch` and moves its since to `since`,
/// unless a newer epoch holds it (`Ok(Err(newer))`). A token that changed
/// to an epoch not newer than ours since the handle read it (an older
/// controller, not yet aware it was fenced, claimed the shard meanwhile) is
/// taken over, not taken for a newer controller's.
async fn claim(
    handle: &mut Handle,
    epoch: u64,
    since: &Antichain<Timestamp>,
) -> Result<Result<Antichain<Timestamp>, u64>, StorageError> {
    let mut expected = *handle.opaque();
    loop {
        if expected > epoch {
            return Ok(Err(expected));
        }
        match handle
            .compare_and_downgrade_since(&expected, (&epoch, since))
            .await?
        {
            Ok(since) => return Ok(Ok(since)),
            // Tokens only grow, so this ends.
            Err(current) => expected = current,
        }
    }
}
