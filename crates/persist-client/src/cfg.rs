//! Configuration of a [`PersistClient`](crate::PersistClient).

use std::sync::{Arc, RwLock};
use std::time::Duration;

/// Knobs of the client, with defaults suited to production.
#[derive(Debug, Clone)]
pub struct PersistConfig {
    /// How long a leased reader may go without heartbeating before any later
    /// state change may expire it, releasing its since hold. Longer tolerates
    /// slower processes; shorter frees held-back compaction sooner.
    pub reader_lease_duration: Duration,
    /// How long a writer may go without heartbeating before it is expired
    /// (an expired writer that appends again is simply re-registered).
    pub writer_lease_duration: Duration,
    /// The target size of one part in blob. Larger means fewer blobs and
    /// requests; smaller means less memory per part while reading.
    pub blob_target_size: usize,
    /// Whether new parts are Snappy-compressed. Compression saves blob
    /// bytes (and transfer) when keys and values repeat, at a CPU cost on
    /// every write and read; parts of either kind are always readable.
    pub part_compression: bool,
    /// The first delay between retries of a failed external operation; it
    /// doubles up to [`PersistConfig::max_retry_backoff`].
    pub initial_retry_backoff: Duration,
    /// The longest delay between retries of a failed external operation.
    pub max_retry_backoff: Duration,
    /// The longest interval between polls of consensus by a reader or
    /// writer waiting for a shard to change (polls start at 1 ms and
    /// double). Changes made through this process are seen at once.
    pub listen_poll_max: Duration,
    /// The share (0 to 100) of parts skipped by a read's statistics filter
    /// that are fetched anyway to check their statistics (see
    /// `ReadHandle::snapshot_cursor`).
    pub stats_audit_percent: u32,
    /// The shortest interval between since downgrades by
    /// `maybe_downgrade_since` (downgrades to the empty frontier are never
    /// delayed).
    pub since_downgrade_interval: Duration,
    /// How many SeqNos a shard's state may advance past its newest rollup
    /// before the next one is written. Smaller means fewer consensus
    /// entries to read when opening a shard; larger means fewer rollups.
    pub rollup_interval: u64,
    /// Whether writers compact the shard in the background after their
    /// appends (see `WriteHandle::compact`).
    pub compaction_enabled: bool,
    /// The most input runs one compaction merges at once: its memory is
    /// about this many parts (each up to `blob_target_size`).
    pub compaction_max_runs: usize,
}

impl Default for PersistConfig {
    fn default() -> Self {
        PersistConfig {
            reader_lease_duration: Duration::from_secs(15 * 60),
            writer_lease_duration: Duration::from_secs(60 * 60),
            blob_target_size: 8 << 20,
            part_compression: false,
            initial_retry_backoff: Duration::from_millis(4),
            max_retry_backoff: Duration::from_secs(16),
            listen_poll_max: Duration::from_millis(250),
            stats_audit_percent: 1,
            since_downgrade_interval: Duration::from_secs(1),
            rollup_interval: 64,
            compaction_enabled: true,
            compaction_max_runs: 8,
        }
    }
}

/// A [`PersistConfig`] that can be changed while handles use it: every
/// clone sees updates, and each operation reads the values current when it
/// starts.
#[derive(Debug, Clone, Default)]
pub struct DynamicConfig(Arc<RwLock<PersistConfig>>);

impl DynamicConfig {
    /// A dynamic configuration starting at `cfg`.
    pub fn new(cfg: PersistConfig) -> Self {
        DynamicConfig(Arc::new(RwLock::new(cfg)))
    }

    /// The current values.
    pub fn get(&self) -> PersistConfig {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Changes the values; operations that start afterwards see the change.
    pub fn update(&self, change: impl FnOnce(&mut PersistConfig)) {
        change(&mut self.0.write().unwrap_or_else(|p| p.into_inner()));
    }
}

impl PersistConfig {
    /// Values for tests: short leases and retries, small parts.
    pub fn new_for_tests() -> Self {
        PersistConfig {
            reader_lease_duration: Duration::from_secs(60),
            writer_lease_duration: Duration::from_secs(60),
            blob_target_size: 128 << 10,
            part_compression: true,
            initial_retry_backoff: Duration::from_millis(1),
            max_retry_backoff: Duration::from_millis(50),
            listen_poll_max: Duration::from_millis(50),
            stats_audit_percent: 100,
            since_downgrade_interval: Duration::ZERO,
            rollup_interval: 8,
            compaction_enabled: true,
            compaction_max_runs: 4,
        }
    }
}
