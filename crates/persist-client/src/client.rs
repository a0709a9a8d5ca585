//! The entry point: a client of one location (blob + consensus), opening
//! handles on its shards.

use std::collections::HashMap;
use std::fmt::Debug;
use std::marker::PhantomData;
use std::sync::Arc;

use differential_dataflow::difference::Semigroup;
use differential_dataflow::lattice::Lattice;
use persist::mem::{MemBlob, MemConsensus};
use persist::{Blob, Consensus, OpenError, VersionedData, open_blob, open_consensus};
use persist_types::{Codec, Codec64, Opaque, PersistLocation, ShardId};
use timely::progress::Timestamp;

use crate::cfg::{DynamicConfig, PersistConfig};
use crate::critical::SinceHandle;
use crate::error::{ClientError, CodecMismatch, Codecs, InvalidUsage, ShardError, Since};
use crate::fetch::{BatchFetcher, PartReader};
use crate::fetch::{FetchFilter, FetchedUpdate};
use crate::ids::{CriticalReaderId, LeasedReaderId, WriterId};
use crate::internal::cache::StateCache;
use crate::internal::encoding::{StateDecodeError, decode_codecs};
use crate::internal::heartbeat::{self, Holder};
use crate::internal::inspect::state_json;
use crate::internal::machine::{Backoff, Machine, MachineError, Transition, read_state};
use crate::internal::part::codecs_of;
use crate::metrics::{MeteredBlob, MeteredConsensus, Metrics};
use crate::read::{ReadHandle, open_reader};
use crate::read::{fetch_consolidated, parts_of};
use crate::write::{WriteHandle, duration_ms};

/// The critical reader id by convention used by the controller that owns a
/// shard's since.
pub const CONTROLLER_CRITICAL_SINCE: CriticalReaderId = CriticalReaderId([0; 16]);

/// What a handle is for, recorded in state to help operators.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostics {
    /// A human-readable name of the shard (a collection's name, say).
    pub shard_name: String,
    /// What the handle is used for.
    pub handle_purpose: String,
}

impl Diagnostics {
    /// Diagnostics naming only the handle's purpose.
    pub fn from_purpose(handle_purpose: &str) -> Self {
        Diagnostics {
            shard_name: "unknown".to_owned(),
            handle_purpose: handle_purpose.to_owned(),
        }
    }

    /// Diagnostics for tests.
    pub fn for_tests() -> Self {
        Diagnostics {
            shard_name: "test-shard".to_owned(),
            handle_purpose: "tests".to_owned(),
        }
    }

    fn purpose(&self) -> String {
        format!("{}: {}", self.shard_name, self.handle_purpose)
    }
}

/// A client of one persist location. Cheap to clone; clones share the
/// connections, the configuration and the per-process state cache, so
/// every handle of a shard opened through them sees the others' changes at
/// once.
#[derive(Clone)]
pub struct PersistClient {
    cfg: DynamicConfig,
    metrics: Arc<Metrics>,
    blob: Arc<dyn Blob>,
    consensus: Arc<dyn Consensus>,
    cache: Arc<StateCache>,
}

impl Debug for PersistClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PersistClient")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl PersistClient {
    /// A client of `blob` and `consensus`, which must be one location's
    /// (the blob holding the parts the consensus state references).
    ///
    /// Every blob and consensus operation of the client is measured in its
    /// [`Metrics`].
    pub fn new(cfg: PersistConfig, blob: Arc<dyn Blob>, consensus: Arc<dyn Consensus>) -> Self {
        let metrics = Arc::new(Metrics::new());
        let blob = Arc::new(MeteredBlob {
            inner: blob,
            metrics: Arc::clone(&metrics),
        });
        let consensus = Arc::new(MeteredConsensus {
            inner: consensus,
            metrics: Arc::clone(&metrics),
        });
        PersistClient {
            cfg: DynamicConfig::new(cfg),
            metrics,
            blob,
            consensus,
            cache: Arc::new(StateCache::default()),
        }
    }

    /// A client of a fresh in-memory location with test settings.
    pub async fn new_for_tests() -> Self {
        PersistClient::new(
            PersistConfig::new_for_tests(),
            Arc::new(MemBlob::new()),
            Arc::new(MemConsensus::new()),
        )
    }

    /// The live configuration: changes apply to operations that start
    /// afterwards, on every handle of this client.
    pub fn cfg(&self) -> &DynamicConfig {
        &self.cfg
    }

    /// The client's metrics (a Prometheus registry of its own).
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The blob store of this client's location.
    pub fn blob(&self) -> &Arc<dyn Blob> {
        &self.blob
    }

    /// The consensus store of this client's location.
    pub fn consensus(&self) -> &Arc<dyn Consensus> {
        &self.consensus
    }

    async fn machine<K: Codec, V: Codec, T, D: Codec64>(
        &self,
        shard_id: ShardId,
    ) -> Result<Machine<T>, ClientError<T>>
    where
        T: Timestamp + Lattice + Codec64 + Sync,
    {
        let codecs = codecs_of::<K, V, T, D>();
        Ok(Machine::open(
            self.cfg.clone(),
            Arc::clone(&self.consensus),
            Arc::clone(&self.blob),
            &self.cache,
            shard_id,
            codecs,
        )
        .await?
        .with_metrics(Arc::clone(&self.metrics)))
    }

    fn part_reader<T: Timestamp + Lattice + Codec64 + Sync>(
        &self,
        machine: &Machine<T>,
    ) -> PartReader {
        PartReader {
            shard_id: machine.shard_id(),
            blob: Arc::clone(&self.blob),
            cfg: self.cfg.clone(),
            codecs: machine.cached().codecs.clone(),
        }
    }

    /// Opens a writer and a leased reader of `shard_id`, creating the shard
    /// (with these codecs) if it does not exist.
    ///
    /// Fails with `CodecMismatch` if the shard exists with other codecs,
    /// with [`ShardError::Finalized`] if it was finalized, and with a shard
    /// error if its state cannot be read.
    pub async fn open<K, V, T, D>(
        &self,
        shard_id: ShardId,
        key_schema: Arc<K::Schema>,
        val_schema: Arc<V::Schema>,
        diagnostics: Diagnostics,
    ) -> Result<(WriteHandle<K, V, T, D>, ReadHandle<K, V, T, D>), ClientError<T>>
    where
        K: Codec,
        V: Codec,
        T: Timestamp + Lattice + Codec64 + Sync,
        D: Semigroup + Codec64 + Send + Sync,
    {
        let writer = self
            .open_writer(
                shard_id,
                Arc::clone(&key_schema),
                Arc::clone(&val_schema),
                diagnostics.clone(),
            )
            .await?;
        let reader = self
            .open_leased_reader(shard_id, key_schema, val_schema, diagnostics)
            .await?;
        Ok((writer, reader))
    }

    /// Opens a leased reader of `shard_id` holding the shard's current since
    /// (creating the shard if needed; errors as for [`PersistClient::open`]).
    pub async fn open_leased_reader<K, V, T, D>(
        &self,
        shard_id: ShardId,
        key_schema: Arc<K::Schema>,
        val_schema: Arc<V::Schema>,
        diagnostics: Diagnostics,
    ) -> Result<ReadHandle<K, V, T, D>, ClientError<T>>
    where
        K: Codec,
        V: Codec,
        T: Timestamp + Lattice + Codec64 + Sync,
        D: Semigroup + Codec64 + Send + Sync,
    {
        let machine = self.machine::<K, V, T, D>(shard_id).await?;
        let reader = self.part_reader(&machine);
        open_reader(
            &machine,
            reader,
            LeasedReaderId::new(),
            &diagnostics.purpose(),
            key_schema,
            val_schema,
        )
        .await
    }

    /// Opens a writer of `shard_id` (creating the shard if needed; errors
    /// as for [`PersistClient::open`]).
    pub async fn open_writer<K, V, T, D>(
        &self,
        shard_id: ShardId,
        key_schema: Arc<K::Schema>,
        val_schema: Arc<V::Schema>,
        diagnostics: Diagnostics,
    ) -> Result<WriteHandle<K, V, T, D>, ClientError<T>>
    where
        K: Codec,
        V: Codec,
        T: Timestamp + Lattice + Codec64 + Sync,
        D: Semigroup + Codec64 + Send + Sync,
    {
        let machine = self.machine::<K, V, T, D>(shard_id).await?;
        let writer_id = WriterId::new();
        let lease_ms = duration_ms(self.cfg.get().writer_lease_duration);
        let purpose = diagnostics.purpose();
        let (_, upper) = machine
            .apply(|state, now| {
                if state.is_finalized() {
                    return Transition::Refuse(None);
                }
                state.expire_lapsed(now);
                Transition::Write(Some(
                    state.register_writer(writer_id, &purpose, now, lease_ms),
                ))
            })
            .await?;
        let upper = upper.ok_or(ShardError::Finalized { shard: shard_id })?;
        let heartbeat = heartbeat::spawn(machine.clone(), Holder::Writer(writer_id));
        let expire_on_drop = heartbeat::expire_on_drop(&machine, Holder::Writer(writer_id));
        Ok(WriteHandle {
            machine,
            blob: Arc::clone(&self.blob),
            writer_id,
            key_schema,
            val_schema,
            upper,
            heartbeat: Some(heartbeat),
            expired: false,
            expire_on_drop: Some(expire_on_drop),
            spare_buffers: Default::default(),
            _phantom: PhantomData,
        })
    }

    /// Opens the critical since handle `reader_id` of `shard_id`,
    /// registering it (at the shard's since, with [`Opaque::initial`] as
    /// its token) if it does not exist.
    ///
    /// Fails with `OpaqueCodecMismatch` if the reader exists with another
    /// token type, besides the errors of [`PersistClient::open`].
    pub async fn open_critical_since<K, V, T, D, O>(
        &self,
        shard_id: ShardId,
        reader_id: CriticalReaderId,
        diagnostics: Diagnostics,
    ) -> Result<SinceHandle<K, V, T, D, O>, ClientError<T>>
    where
        K: Codec,
        V: Codec,
        T: Timestamp + Lattice + Codec64 + Sync,
        D: Semigroup + Codec64 + Send + Sync,
        O: Opaque + Codec64,
    {
        let machine = self.machine::<K, V, T, D>(shard_id).await?;
        let purpose = diagnostics.purpose();
        let initial = O::initial().encode();
        let codec = O::codec_name();
        // An existing reader is returned as the cache has it: make that the
        // latest state, not one from before another process's downgrade.
        machine.fetch_latest().await?;
        let (_, registered) = machine
            .apply(|state, _| {
                if state.is_finalized() {
                    return Transition::Refuse(Err(None));
                }
                let known = state.critical_readers.contains_key(&reader_id);
                match state.register_critical_reader(reader_id, &purpose, initial, &codec) {
                    Ok(registered) if known => Transition::Skip(Ok(registered)),
                    Ok(registered) => Transition::Write(Ok(registered)),
                    Err(actual) => Transition::Refuse(Err(Some(actual))),
                }
            })
            .await?;
        match registered {
            Ok((since, opaque)) => Ok(SinceHandle {
                machine,
                reader_id,
                since,
                opaque: O::decode(opaque),
                last_downgrade: None,
                _phantom: PhantomData,
            }),
            Err(Some(actual)) => Err(InvalidUsage::OpaqueCodecMismatch {
                requested: codec,
                actual,
            }
            .into()),
            Err(None) => Err(ShardError::Finalized { shard: shard_id }.into()),
        }
    }

    /// A fetcher of `shard_id`'s parts, for workers that receive parts
    /// leased by a reader elsewhere. Holds no since and no lease.
    pub async fn create_batch_fetcher<K, V, T, D>(
        &self,
        shard_id: ShardId,
        key_schema: Arc<K::Schema>,
        val_schema: Arc<V::Schema>,
        _diagnostics: Diagnostics,
    ) -> Result<BatchFetcher<K, V, T, D>, ClientError<T>>
    where
        K: Codec,
        V: Codec,
        T: Timestamp + Lattice + Codec64 + Sync,
        D: Semigroup + Codec64 + Send + Sync,
    {
        let machine = self.machine::<K, V, T, D>(shard_id).await?;
        Ok(BatchFetcher {
            reader: self.part_reader(&machine),
            key_schema,
            val_schema,
            _phantom: PhantomData,
        })
    }

    /// The shard's current upper, read from consensus without registering
    /// any handle (so without writing anything, for an existing shard).
    pub async fn fetch_recent_upper<K, V, T, D>(
        &self,
        shard_id: ShardId,
    ) -> Result<timely::progress::Antichain<T>, ClientError<T>>
    where
        K: Codec,
        V: Codec,
        T: Timestamp + Lattice + Codec64 + Sync,
        D: Semigroup + Codec64 + Send + Sync,
    {
        let machine = self.machine::<K, V, T, D>(shard_id).await?;
        Ok(machine.fetch_latest().await?.upper.clone())
    }

    /// The shard's current since, read from consensus without registering
    /// any handle.
    pub async fn fetch_recent_since<K, V, T, D>(
        &self,
        shard_id: ShardId,
    ) -> Result<timely::progress::Antichain<T>, ClientError<T>>
    where
        K: Codec,
        V: Codec,
        T: Timestamp + Lattice + Codec64 + Sync,
        D: Semigroup + Codec64 + Send + Sync,
    {
        let machine = self.machine::<K, V, T, D>(shard_id).await?;
        Ok(machine.fetch_latest().await?.since.clone())
    }

    /// The shard's contents at `as_of`, consolidated as
    /// [`ReadHandle::snapshot_and_fetch`] returns them, read without
    /// registering a reader: nothing is written, so observers that must not
    /// write (a read-only controller) can read. Waits until the shard's
    /// upper is beyond `as_of`; fails with `Since` below the since.
    ///
    /// Without a reader, nothing holds the since or leases the parts:
    /// compaction may make `as_of` unreadable, or delete a part, while the
    /// read runs. The read then fails (`Since`, or a missing part) and can
    /// be retried at a later `as_of`.
    pub async fn snapshot_unleased<K, V, T, D>(
        &self,
        shard_id: ShardId,
        key_schema: Arc<K::Schema>,
        val_schema: Arc<V::Schema>,
        as_of: timely::progress::Antichain<T>,
    ) -> Result<Vec<FetchedUpdate<K, V, T, D>>, ClientError<T>>
    where
        K: Codec,
        V: Codec,
        T: Timestamp + Lattice + Codec64 + Sync,
        D: Semigroup + Codec64 + Send + Sync,
    {
        let machine = self.machine::<K, V, T, D>(shard_id).await?;
        // Start from the latest state: this process may hold none yet.
        machine.fetch_latest().await?;
        let mut attempts = 0;
        loop {
            let (state, batches) = machine.snapshot(&as_of).await?.map_err(Since)?;
            let filter = FetchFilter::Snapshot {
                as_of: as_of.clone(),
            };
            let parts = parts_of(shard_id, &batches, &filter, None);
            let reader = self.part_reader(&machine);
            match fetch_consolidated(&reader, &parts, &key_schema, &val_schema).await {
                // Holding no lease, the read may lose a part to compaction
                // and garbage collection: a newer state has the same data
                // in other parts.
                Err(ClientError::Shard(ShardError::Part { .. }))
                    if attempts < 5 && machine.fetch_latest().await?.seqno > state.seqno =>
                {
                    attempts += 1;
                }
                result => return result,
            }
        }
    }

    /// Whether `shard_id` was finalized by [`PersistClient::finalize_shard`].
    pub async fn is_finalized<K, V, T, D>(
        &self,
        shard_id: ShardId,
        _diagnostics: Diagnostics,
    ) -> Result<bool, ClientError<T>>
    where
        K: Codec,
        V: Codec,
        T: Timestamp + Lattice + Codec64 + Sync,
        D: Semigroup + Codec64 + Send + Sync,
    {
        let machine = self.machine::<K, V, T, D>(shard_id).await?;
        Ok(machine.fetch_latest().await?.is_finalized())
    }

    /// Finalizes `shard_id`: removes every handle and batch from its state
    /// (leaving a small tombstone, so opening it again reports it as
    /// finalized) and deletes all its blobs. Allowed only once the shard's
    /// since and upper are both empty (`FinalizationError` otherwise), so
    /// no one can read or write it any more. Idempotent: a retry after a
    /// failure finishes the job.
    #[tracing::instrument(level = "debug", skip_all, fields(shard = %shard_id))]
    pub async fn finalize_shard<K, V, T, D>(
        &self,
        shard_id: ShardId,
        _diagnostics: Diagnostics,
    ) -> Result<(), ClientError<T>>
    where
        K: Codec,
        V: Codec,
        T: Timestamp + Lattice + Codec64 + Sync,
        D: Semigroup + Codec64 + Send + Sync,
    {
        let machine = self.machine::<K, V, T, D>(shard_id).await?;
        let (_, result) = machine
            .apply(|state, _| {
                if !state.is_tombstone() {
                    return Transition::Refuse(Err((state.since.clone(), state.upper.clone())));
                }
                if state.finalize() {
                    Transition::Write(Ok(()))
                } else {
                    Transition::Skip(Ok(()))
                }
            })
            .await?;
        if let Err((since, upper)) = result {
            return Err(InvalidUsage::FinalizationError { since, upper }.into());
        }
        // Let this process's background work on the shard (a rollup being
        // written, a compaction) finish, so it cannot add a blob after the
        // deletes below. Such work checks for a tombstone before writing.
        while machine.busy_arc().any() {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        // The tombstone is written whole and the log truncated to it, so
        // reading the shard needs no rollup: no state references the
        // shard's blobs any more.
        machine.checkpoint().await?;
        let prefix = format!("{shard_id}/");
        let mut backoff = Backoff::new(&self.cfg.get());
        let keys = loop {
            let mut keys = Vec::new();
            match self
                .blob
                .list_keys_and_metadata(&prefix, &mut |m| keys.push(m.key))
                .await
            {
                Ok(()) => break keys,
                Err(err) => backoff.wait("list blobs", shard_id, &err).await,
            }
        };
        for key in keys {
            let mut backoff = Backoff::new(&self.cfg.get());
            while let Err(err) = self.blob.delete(&key).await {
                backoff.wait("delete blob", shard_id, &err).await;
            }
        }
        Ok(())
    }

    /// The latest consensus entry of a shard, retrying external failures.
    async fn head(&self, shard_id: ShardId) -> Option<VersionedData> {
        let mut backoff = Backoff::new(&self.cfg.get());
        loop {
            match self.consensus.head(&shard_id.to_string()).await {
                Ok(head) => return head,
                Err(err) => backoff.wait("read state", shard_id, &err).await,
            }
        }
    }

    /// The codecs `shard_id` was created with, whatever its types, or
    /// `None` if it does not exist (it is not created).
    pub async fn shard_codecs(&self, shard_id: ShardId) -> Result<Option<Codecs>, ShardError> {
        let Some(head) = self.head(shard_id).await else {
            return Ok(None);
        };
        decode_codecs(shard_id, &head.data)
            .map(Some)
            .map_err(|e| ShardError::State {
                shard: shard_id,
                reason: e.to_string(),
            })
    }

    /// The shard's latest state as JSON (frontiers, batches with their
    /// parts, readers, writers), for debugging and `persistcli inspect`.
    /// Does not create the shard: a missing shard is `Ok(None)`. Fails with
    /// `CodecMismatch` if the shard's times are not of type `T`.
    pub async fn inspect_shard<T>(
        &self,
        shard_id: ShardId,
    ) -> Result<Option<serde_json::Value>, ClientError<T>>
    where
        T: Timestamp + Lattice + Codec64 + Sync,
    {
        let state = read_state::<T>(&*self.consensus, &*self.blob, &self.cfg, shard_id)
            .await
            .map_err(|e| match e {
                MachineError::Decode {
                    source: StateDecodeError::TimeCodecMismatch { actual },
                    ..
                } => ClientError::from(CodecMismatch {
                    requested: Codecs {
                        ts: T::codec_name(),
                        ..actual.clone()
                    },
                    actual,
                }),
                other => other.into(),
            })?;
        Ok(state.map(|state| state_json(&state)))
    }
}

/// One [`PersistClient`] per location for the whole process, so that all
/// handles of a shard share one state cache and one set of connections.
#[derive(Debug, Default)]
pub struct PersistClientCache {
    cfg: PersistConfig,
    clients: tokio::sync::Mutex<HashMap<PersistLocation, PersistClient>>,
}

impl PersistClientCache {
    /// A cache whose clients start with `cfg`.
    pub fn new(cfg: PersistConfig) -> Self {
        PersistClientCache {
            cfg,
            clients: tokio::sync::Mutex::new(HashMap::new()),
        }
    }

    /// The client of `location`, connecting on first use. Fails with the
    /// backend's [`OpenError`] (bad URI, unreachable server, missing
    /// bucket); nothing is cached then.
    pub async fn open(&self, location: PersistLocation) -> Result<PersistClient, OpenError> {
        let mut clients = self.clients.lock().await;
        if let Some(client) = clients.get(&location) {
            return Ok(client.clone());
        }
        let blob = open_blob(&location.blob_uri).await?;
        let consensus = open_consensus(&location.consensus_uri).await?;
        let client = PersistClient::new(self.cfg.clone(), blob, consensus);
        clients.insert(location, client.clone());
        Ok(client)
    }
}
