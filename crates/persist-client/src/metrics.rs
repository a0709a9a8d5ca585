//! Prometheus metrics of a client: what an operator needs to see that
//! persist is healthy (operation rates and latencies, errors, bytes, the
//! size of each shard's state and its handles).
//!
//! Every [`PersistClient`](crate::PersistClient) owns a [`Metrics`] with its
//! own registry (`PersistClient::metrics`). Blob and consensus operations
//! are measured by wrappers around the backends, so every caller is
//! counted, whichever handle it goes through.

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use persist::{Blob, BlobMetadata, CaSResult, Consensus, ExternalError, SeqNo, VersionedData};
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

/// The metrics of one client.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    /// Appends by outcome: `committed`, `already_committed` (a retry found
    /// its append already applied), `upper_mismatch`.
    pub(crate) appends: IntCounterVec,
    /// Updates appended (after consolidation within parts).
    pub(crate) appended_updates: IntCounter,
    blob_seconds: HistogramVec,
    blob_errors: IntCounterVec,
    blob_bytes: IntCounterVec,
    consensus_seconds: HistogramVec,
    consensus_errors: IntCounterVec,
    /// Compare-and-sets that lost to a concurrent writer.
    pub(crate) cas_conflicts: IntCounter,
    /// The encoded size of each shard's latest state this client wrote or
    /// read, in bytes.
    pub(crate) state_bytes: IntGaugeVec,
    /// Statistics audits of filtered parts by outcome (`right`, `wrong`).
    pub(crate) stats_audits: IntCounterVec,
    /// Registered handles per shard and kind (`writer`, `leased_reader`,
    /// `critical_reader`), as of the latest state seen.
    pub(crate) handles: IntGaugeVec,
    /// The encoded size of each shard's latest consensus entry (a state
    /// diff), in bytes.
    pub(crate) state_entry_bytes: IntGaugeVec,
    /// Rollups written.
    pub(crate) rollups: IntCounter,
    /// Garbage collections that truncated the log.
    pub(crate) gc_runs: IntCounter,
    /// Blobs (parts and rollups) deleted by garbage collection.
    pub(crate) gc_deleted_blobs: IntCounter,
    /// Compactions by outcome: `applied`, `superseded` (the inputs were
    /// replaced meanwhile; the output was deleted), `failed`.
    pub(crate) compactions: IntCounterVec,
    /// Bytes compactions read (`read`) and wrote (`written`).
    pub(crate) compaction_bytes: IntCounterVec,
    /// Batches in each shard's latest state.
    pub(crate) batches: IntGaugeVec,
}

/// A well-formed metric definition cannot fail to build or register in a
/// fresh registry; this turns the impossible error into a clear panic
/// message at construction (never on external data).
fn build<M: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    metric: Result<M, prometheus::Error>,
) -> M {
    #[allow(clippy::expect_used)] // Static definitions, checked by the tests.
    let metric = metric.expect("a valid metric definition");
    #[allow(clippy::expect_used)]
    registry
        .register(Box::new(metric.clone()))
        .expect("metric names are unique in a fresh registry");
    metric
}

impl Metrics {
    /// Metrics in a fresh registry.
    pub fn new() -> Self {
        let registry = Registry::new();
        let latency_buckets = prometheus::exponential_buckets(0.000_1, 2.0, 18).unwrap_or_default();
        let r = &registry;
        Metrics {
            appends: build(
                r,
                IntCounterVec::new(
                    Opts::new("persist_appends_total", "appends by outcome"),
                    &["outcome"],
                ),
            ),
            appended_updates: build(
                r,
                IntCounter::new("persist_appended_updates_total", "updates appended"),
            ),
            blob_seconds: build(
                r,
                HistogramVec::new(
                    HistogramOpts::new("persist_blob_seconds", "blob operation latency")
                        .buckets(latency_buckets.clone()),
                    &["op"],
                ),
            ),
            blob_errors: build(
                r,
                IntCounterVec::new(
                    Opts::new("persist_blob_errors_total", "failed blob operations"),
                    &["op", "class"],
                ),
            ),
            blob_bytes: build(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "persist_blob_bytes_total",
                        "bytes written to and read from blob",
                    ),
                    &["op"],
                ),
            ),
            consensus_seconds: build(
                r,
                HistogramVec::new(
                    HistogramOpts::new("persist_consensus_seconds", "consensus operation latency")
                        .buckets(latency_buckets),
                    &["op"],
                ),
            ),
            consensus_errors: build(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "persist_consensus_errors_total",
                        "failed consensus operations",
                    ),
                    &["op", "class"],
                ),
            ),
            cas_conflicts: build(
                r,
                IntCounter::new(
                    "persist_cas_conflicts_total",
                    "state compare-and-sets that lost to another writer",
                ),
            ),
            state_bytes: build(
                r,
                IntGaugeVec::new(
                    Opts::new(
                        "persist_state_bytes",
                        "encoded size of a shard's latest state",
                    ),
                    &["shard"],
                ),
            ),
            stats_audits: build(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "persist_stats_audits_total",
                        "audits of parts a statistics filter skipped, by outcome",
                    ),
                    &["outcome"],
                ),
            ),
            handles: build(
                r,
                IntGaugeVec::new(
                    Opts::new("persist_handles", "registered handles of a shard by kind"),
                    &["shard", "kind"],
                ),
            ),
            state_entry_bytes: build(
                r,
                IntGaugeVec::new(
                    Opts::new(
                        "persist_state_entry_bytes",
                        "encoded size of a shard's latest consensus entry (a state diff)",
                    ),
                    &["shard"],
                ),
            ),
            rollups: build(
                r,
                IntCounter::new("persist_rollups_total", "whole states written to blob"),
            ),
            gc_runs: build(
                r,
                IntCounter::new(
                    "persist_gc_runs_total",
                    "garbage collections that truncated a shard's log",
                ),
            ),
            gc_deleted_blobs: build(
                r,
                IntCounter::new(
                    "persist_gc_deleted_blobs_total",
                    "parts and rollups deleted by garbage collection",
                ),
            ),
            compactions: build(
                r,
                IntCounterVec::new(
                    Opts::new("persist_compactions_total", "compactions by outcome"),
                    &["outcome"],
                ),
            ),
            compaction_bytes: build(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "persist_compaction_bytes_total",
                        "bytes read and written by compaction",
                    ),
                    &["op"],
                ),
            ),
            batches: build(
                r,
                IntGaugeVec::new(
                    Opts::new("persist_batches", "batches in a shard's latest state"),
                    &["shard"],
                ),
            ),
            registry,
        }
    }

    /// The registry holding every metric, to expose or merge elsewhere.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The metrics in Prometheus's text exposition format.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding gathered metrics into a Vec cannot fail.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8_lossy(&out).into_owned()
    }

    fn error(counter: &IntCounterVec, op: &str, err: &ExternalError) {
        let class = if err.is_determinate() {
            "determinate"
        } else {
            "indeterminate"
        };
        counter.with_label_values(&[op, class]).inc();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// A [`Blob`] that records latencies, errors and bytes.
#[derive(Debug)]
pub(crate) struct MeteredBlob {
    pub inner: Arc<dyn Blob>,
    pub metrics: Arc<Metrics>,
}

impl MeteredBlob {
    fn observe<T>(&self, op: &str, start: Instant, result: &Result<T, ExternalError>) {
        self.metrics
            .blob_seconds
            .with_label_values(&[op])
            .observe(start.elapsed().as_secs_f64());
        if let Err(err) = result {
            Metrics::error(&self.metrics.blob_errors, op, err);
        }
    }
}

#[async_trait]
impl Blob for MeteredBlob {
    async fn get(&self, key: &str) -> Result<Option<Bytes>, ExternalError> {
        let start = Instant::now();
        let result = self.inner.get(key).await;
        self.observe("get", start, &result);
        if let Ok(Some(bytes)) = &result {
            self.metrics
                .blob_bytes
                .with_label_values(&["get"])
                .inc_by(bytes.len() as u64);
        }
        result
    }

    async fn list_keys_and_metadata(
        &self,
        key_prefix: &str,
        f: &mut (dyn FnMut(BlobMetadata) + Send),
    ) -> Result<(), ExternalError> {
        let start = Instant::now();
        let result = self.inner.list_keys_and_metadata(key_prefix, f).await;
        self.observe("list", start, &result);
        result
    }

    async fn set(&self, key: &str, value: Bytes) -> Result<(), ExternalError> {
        let len = value.len() as u64;
        let start = Instant::now();
        let result = self.inner.set(key, value).await;
        self.observe("set", start, &result);
        if result.is_ok() {
            self.metrics
                .blob_bytes
                .with_label_values(&["set"])
                .inc_by(len);
        }
        result
    }

    async fn delete(&self, key: &str) -> Result<Option<usize>, ExternalError> {
        let start = Instant::now();
        let result = self.inner.delete(key).await;
        self.observe("delete", start, &result);
        result
    }
}

/// A [`Consensus`] that records latencies and errors.
#[derive(Debug)]
pub(crate) struct MeteredConsensus {
    pub inner: Arc<dyn Consensus>,
    pub metrics: Arc<Metrics>,
}

impl MeteredConsensus {
    fn observe<T>(&self, op: &str, start: Instant, result: &Result<T, ExternalError>) {
        self.metrics
            .consensus_seconds
            .with_label_values(&[op])
            .observe(start.elapsed().as_secs_f64());
        if let Err(err) = result {
            Metrics::error(&self.metrics.consensus_errors, op, err);
        }
    }
}

#[async_trait]
impl Consensus for MeteredConsensus {
    async fn head(&self, key: &str) -> Result<Option<VersionedData>, ExternalError> {
        let start = Instant::now();
        let result = self.inner.head(key).await;
        self.observe("head", start, &result);
        result
    }

    async fn compare_and_set(
        &self,
        key: &str,
        expected: Option<SeqNo>,
        new: VersionedData,
    ) -> Result<CaSResult, ExternalError> {
        let start = Instant::now();
        let result = self.inner.compare_and_set(key, expected, new).await;
        self.observe("compare_and_set", start, &result);
        if let Ok(CaSResult::ExpectationMismatch(_)) = &result {
            self.metrics.cas_conflicts.inc();
        }
        result
    }

    async fn scan(
        &self,
        key: &str,
        from: SeqNo,
        limit: usize,
    ) -> Result<Vec<VersionedData>, ExternalError> {
        let start = Instant::now();
        let result = self.inner.scan(key, from, limit).await;
        self.observe("scan", start, &result);
        result
    }

    async fn truncate(&self, key: &str, seqno: SeqNo) -> Result<usize, ExternalError> {
        let start = Instant::now();
        let result = self.inner.truncate(key, seqno).await;
        self.observe("truncate", start, &result);
        result
    }

    async fn list_keys(&self) -> Result<Vec<String>, ExternalError> {
        let start = Instant::now();
        let result = self.inner.list_keys().await;
        self.observe("list_keys", start, &result);
        result
    }
}
