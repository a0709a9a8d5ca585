//! Fault injection: [`Blob`] and [`Consensus`] wrappers that fail and stall
//! on purpose, driven by a seeded random number generator so that a failing
//! test can be replayed.
//!
//! Each operation first sleeps for a random latency up to the configured
//! maximum. Then, with probability `1 - should_happen`, it does not reach
//! the wrapped backend, and fails with an
//! [`Indeterminate`](crate::Indeterminate) error with probability
//! `should_timeout` (a request lost on its way) or a
//! [`Determinate`](crate::Determinate) one otherwise. Otherwise it runs on
//! the wrapped backend and, with probability `should_timeout`, still reports
//! an indeterminate error although it took effect (a response lost on its
//! way back): the case that makes retries need idempotency.

use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::ExternalError;
use crate::location::{Blob, BlobMetadata, CaSResult, Consensus, SeqNo, VersionedData};

/// Counts of what an [`UnreliableHandle`] injected.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultStats {
    /// Operations passed through unharmed.
    pub passed: u64,
    /// Operations failed determinately without running.
    pub determinate: u64,
    /// Operations failed indeterminately without running.
    pub lost_requests: u64,
    /// Operations that ran and were then reported indeterminate.
    pub indeterminate: u64,
}

#[derive(Debug)]
struct Faults {
    rng: StdRng,
    should_happen: f64,
    should_timeout: f64,
    max_latency: Duration,
    stats: FaultStats,
}

/// The shared control of a set of unreliable wrappers: how often they fail,
/// how slow they are, and what they did. Clones control the same wrappers.
#[derive(Clone, Debug)]
pub struct UnreliableHandle {
    faults: Arc<Mutex<Faults>>,
}

/// What to do with one operation.
struct Decision {
    latency: Duration,
    happen: bool,
    timeout: bool,
}

impl UnreliableHandle {
    /// Returns a handle whose wrappers run each operation with probability
    /// `should_happen` and report an indeterminate error after running it
    /// with probability `should_timeout`; both are clamped to `[0, 1]`.
    pub fn new(seed: u64, should_happen: f64, should_timeout: f64) -> Self {
        UnreliableHandle {
            faults: Arc::new(Mutex::new(Faults {
                rng: StdRng::seed_from_u64(seed),
                should_happen: should_happen.clamp(0.0, 1.0),
                should_timeout: should_timeout.clamp(0.0, 1.0),
                max_latency: Duration::ZERO,
                stats: FaultStats::default(),
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Faults> {
        self.faults
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// From now on, every operation runs and succeeds as the backend does.
    pub fn totally_available(&self) {
        self.partially_available(1.0, 0.0);
    }

    /// From now on, every operation fails determinately without running.
    pub fn totally_unavailable(&self) {
        self.partially_available(0.0, 0.0);
    }

    /// From now on, use these probabilities (see [`UnreliableHandle::new`]).
    pub fn partially_available(&self, should_happen: f64, should_timeout: f64) {
        let mut faults = self.lock();
        faults.should_happen = should_happen.clamp(0.0, 1.0);
        faults.should_timeout = should_timeout.clamp(0.0, 1.0);
    }

    /// From now on, delay each operation by a random duration up to `max`.
    pub fn set_max_latency(&self, max: Duration) {
        self.lock().max_latency = max;
    }

    /// What has been injected so far.
    pub fn stats(&self) -> FaultStats {
        self.lock().stats
    }

    fn decide(&self) -> Decision {
        let mut faults = self.lock();
        let max_nanos = u64::try_from(faults.max_latency.as_nanos()).unwrap_or(u64::MAX);
        let latency = match max_nanos {
            0 => Duration::ZERO,
            max => Duration::from_nanos(faults.rng.random_range(0..=max)),
        };
        let (p_happen, p_timeout) = (faults.should_happen, faults.should_timeout);
        let happen = faults.rng.random_bool(p_happen);
        let timeout = faults.rng.random_bool(p_timeout);
        match (happen, timeout) {
            (false, false) => faults.stats.determinate += 1,
            (false, true) => faults.stats.lost_requests += 1,
            (true, true) => faults.stats.indeterminate += 1,
            (true, false) => faults.stats.passed += 1,
        }
        Decision {
            latency,
            happen,
            timeout,
        }
    }

    async fn run<T, F>(&self, name: &str, op: F) -> Result<T, ExternalError>
    where
        F: Future<Output = Result<T, ExternalError>>,
    {
        let decision = self.decide();
        if !decision.latency.is_zero() {
            tokio::time::sleep(decision.latency).await;
        }
        if !decision.happen {
            return Err(if decision.timeout {
                ExternalError::indeterminate(format!("unreliable: {name} was lost before running"))
            } else {
                ExternalError::determinate(format!("unreliable: {name} did not happen"))
            });
        }
        let result = op.await;
        if decision.timeout {
            return Err(ExternalError::indeterminate(format!(
                "unreliable: {name} ran but reported a timeout"
            )));
        }
        result
    }
}

/// A [`Blob`] that fails as its [`UnreliableHandle`] says.
#[derive(Debug)]
pub struct UnreliableBlob {
    blob: Arc<dyn Blob>,
    handle: UnreliableHandle,
}

impl UnreliableBlob {
    /// Wraps `blob`.
    pub fn new(blob: Arc<dyn Blob>, handle: UnreliableHandle) -> Self {
        UnreliableBlob { blob, handle }
    }
}

#[async_trait]
impl Blob for UnreliableBlob {
    async fn get(&self, key: &str) -> Result<Option<Bytes>, ExternalError> {
        self.handle.run("get", self.blob.get(key)).await
    }

    async fn list_keys_and_metadata(
        &self,
        key_prefix: &str,
        f: &mut (dyn FnMut(BlobMetadata) + Send),
    ) -> Result<(), ExternalError> {
        self.handle
            .run(
                "list_keys_and_metadata",
                self.blob.list_keys_and_metadata(key_prefix, f),
            )
            .await
    }

    async fn set(&self, key: &str, value: Bytes) -> Result<(), ExternalError> {
        self.handle.run("set", self.blob.set(key, value)).await
    }

    async fn delete(&self, key: &str) -> Result<Option<usize>, ExternalError> {
        self.handle.run("delete", self.blob.delete(key)).await
    }
}

/// A [`Consensus`] that fails as its [`UnreliableHandle`] says.
#[derive(Debug)]
pub struct UnreliableConsensus {
    consensus: Arc<dyn Consensus>,
    handle: UnreliableHandle,
}

impl UnreliableConsensus {
    /// Wraps `consensus`.
    pub fn new(consensus: Arc<dyn Consensus>, handle: UnreliableHandle) -> Self {
        UnreliableConsensus { consensus, handle }
    }
}

#[async_trait]
impl Consensus for UnreliableConsensus {
    async fn head(&self, key: &str) -> Result<Option<VersionedData>, ExternalError> {
        self.handle.run("head", self.consensus.head(key)).await
    }

    async fn compare_and_set(
        &self,
        key: &str,
        expected: Option<SeqNo>,
        new: VersionedData,
    ) -> Result<CaSResult, ExternalError> {
        self.handle
            .run(
                "compare_and_set",
                self.consensus.compare_and_set(key, expected, new),
            )
            .await
    }

    async fn scan(
        &self,
        key: &str,
        from: SeqNo,
        limit: usize,
    ) -> Result<Vec<VersionedData>, ExternalError> {
        self.handle
            .run("scan", self.consensus.scan(key, from, limit))
            .await
    }

    async fn truncate(&self, key: &str, seqno: SeqNo) -> Result<usize, ExternalError> {
        self.handle
            .run("truncate", self.consensus.truncate(key, seqno))
            .await
    }

    async fn list_keys(&self) -> Result<Vec<String>, ExternalError> {
        self.handle
            .run("list_keys", self.consensus.list_keys())
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::{MemBlob, MemConsensus};

    fn entry(seqno: u64) -> VersionedData {
        VersionedData {
            seqno: SeqNo(seqno),
            data: Bytes::from(seqno.to_le_bytes().to_vec()),
        }
    }

    #[tokio::test]
    async fn available_wrappers_are_transparent() {
        let handle = UnreliableHandle::new(1, 1.0, 0.0);
        let blob = UnreliableBlob::new(Arc::new(MemBlob::new()), handle.clone());
        blob.set("k", Bytes::from_static(b"v")).await.unwrap();
        assert_eq!(blob.get("k").await.unwrap(), Some(Bytes::from_static(b"v")));
        assert_eq!(
            handle.stats(),
            FaultStats {
                passed: 2,
                ..FaultStats::default()
            }
        );
    }

    #[tokio::test]
    async fn determinate_failures_never_reach_the_backend() {
        let inner = MemConsensus::new();
        let handle = UnreliableHandle::new(7, 1.0, 0.0);
        handle.totally_unavailable();
        let consensus = UnreliableConsensus::new(Arc::new(inner.clone()), handle.clone());
        for _ in 0..20 {
            let err = consensus
                .compare_and_set("k", None, entry(0))
                .await
                .unwrap_err();
            assert!(err.is_determinate(), "{err}");
        }
        assert_eq!(inner.head("k").await.unwrap(), None);
        assert_eq!(handle.stats().determinate, 20);
    }

    /// A consensus with these fault probabilities, its handle, and the
    /// backend underneath (to see what really happened); then the result of
    /// one creating compare-and-set through it.
    async fn one_faulty_cas(
        seed: u64,
        should_happen: f64,
        should_timeout: f64,
    ) -> (
        MemConsensus,
        UnreliableHandle,
        UnreliableConsensus,
        ExternalError,
    ) {
        let inner = MemConsensus::new();
        let handle = UnreliableHandle::new(seed, should_happen, should_timeout);
        let consensus = UnreliableConsensus::new(Arc::new(inner.clone()), handle.clone());
        let err = consensus
            .compare_and_set("k", None, entry(0))
            .await
            .unwrap_err();
        (inner, handle, consensus, err)
    }

    #[tokio::test]
    async fn lost_requests_are_indeterminate_but_never_ran() {
        let (inner, handle, _, err) = one_faulty_cas(11, 0.0, 1.0).await;
        assert!(!err.is_determinate(), "{err}");
        assert_eq!(inner.head("k").await.unwrap(), None);
        assert_eq!(handle.stats().lost_requests, 1);
    }

    #[tokio::test]
    async fn indeterminate_failures_may_have_happened() {
        let (inner, handle, consensus, err) = one_faulty_cas(7, 1.0, 1.0).await;
        assert!(!err.is_determinate(), "{err}");
        // It did happen: the entry is there.
        assert_eq!(inner.head("k").await.unwrap(), Some(entry(0)));
        handle.totally_available();
        assert_eq!(consensus.head("k").await.unwrap(), Some(entry(0)));
    }

    async fn fault_pattern(seed: u64) -> Vec<Option<bool>> {
        let handle = UnreliableHandle::new(seed, 0.6, 0.3);
        let blob = UnreliableBlob::new(Arc::new(MemBlob::new()), handle);
        let mut pattern = Vec::new();
        for i in 0..100u32 {
            let result = blob.set(&i.to_string(), Bytes::new()).await;
            pattern.push(result.err().map(|e| e.is_determinate()));
        }
        pattern
    }

    #[tokio::test]
    async fn faults_are_reproducible_from_the_seed() {
        let a = fault_pattern(42).await;
        assert_eq!(a, fault_pattern(42).await);
        assert_ne!(a, fault_pattern(43).await);
        assert!(
            a.contains(&None) && a.contains(&Some(true)) && a.contains(&Some(false)),
            "{a:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn latency_is_injected() {
        let handle = UnreliableHandle::new(3, 1.0, 0.0);
        handle.set_max_latency(Duration::from_secs(10));
        let blob = UnreliableBlob::new(Arc::new(MemBlob::new()), handle);
        let start = tokio::time::Instant::now();
        for i in 0..10u32 {
            blob.set(&i.to_string(), Bytes::new()).await.unwrap();
        }
        assert!(
            start.elapsed() > Duration::from_secs(1),
            "{:?}",
            start.elapsed()
        );
    }
}
