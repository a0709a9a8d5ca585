//! In-process backends, for tests: nothing survives the process.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::ExternalError;
use crate::location::validate_blob_key;
use crate::location::{
    Blob, BlobMetadata, CaSResult, Consensus, SeqNo, VersionedData, truncate_past_head,
    validate_cas,
};

/// Locks `mutex`, recovering the data if a panicking thread poisoned it (every
/// critical section below leaves the map consistent).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A [`Blob`] held in memory. Clones share the same values.
#[derive(Clone, Debug, Default)]
pub struct MemBlob {
    values: Arc<Mutex<BTreeMap<String, Bytes>>>,
}

impl MemBlob {
    /// Returns a new, empty blob store.
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl Blob for MemBlob {
    async fn get(&self, key: &str) -> Result<Option<Bytes>, ExternalError> {
        validate_blob_key(key)?;
        Ok(lock(&self.values).get(key).cloned())
    }

    async fn list_keys_and_metadata(
        &self,
        key_prefix: &str,
        f: &mut (dyn FnMut(BlobMetadata) + Send),
    ) -> Result<(), ExternalError> {
        let matching: Vec<BlobMetadata> = lock(&self.values)
            .range(key_prefix.to_owned()..)
            .take_while(|(key, _)| key.starts_with(key_prefix))
            .map(|(key, value)| BlobMetadata {
                key: key.clone(),
                size_in_bytes: value.len() as u64,
            })
            .collect();
        matching.into_iter().for_each(f);
        Ok(())
    }

    async fn set(&self, key: &str, value: Bytes) -> Result<(), ExternalError> {
        validate_blob_key(key)?;
        lock(&self.values).insert(key.to_owned(), value);
        Ok(())
    }

    async fn delete(&self, key: &str) -> Result<Option<usize>, ExternalError> {
        validate_blob_key(key)?;
        Ok(lock(&self.values).remove(key).map(|value| value.len()))
    }
}

/// A [`Consensus`] held in memory. Clones share the same logs.
#[derive(Clone, Debug, Default)]
pub struct MemConsensus {
    logs: Arc<Mutex<BTreeMap<String, Vec<VersionedData>>>>,
}

impl MemConsensus {
    /// Returns a new consensus with no keys.
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl Consensus for MemConsensus {
    async fn head(&self, key: &str) -> Result<Option<VersionedData>, ExternalError> {
        Ok(lock(&self.logs)
            .get(key)
            .and_then(|log| log.last().cloned()))
    }

    async fn compare_and_set(
        &self,
        key: &str,
        expected: Option<SeqNo>,
        new: VersionedData,
    ) -> Result<CaSResult, ExternalError> {
        validate_cas(expected, &new)?;
        let mut logs = lock(&self.logs);
        let log = logs.entry(key.to_owned()).or_default();
        let head = log.last();
        if head.map(|h| h.seqno) != expected {
            let current = head.cloned();
            if log.is_empty() {
                logs.remove(key);
            }
            return Ok(CaSResult::ExpectationMismatch(current));
        }
        log.push(new);
        Ok(CaSResult::Committed)
    }

    async fn scan(
        &self,
        key: &str,
        from: SeqNo,
        limit: usize,
    ) -> Result<Vec<VersionedData>, ExternalError> {
        let logs = lock(&self.logs);
        let Some(log) = logs.get(key) else {
            return Ok(Vec::new());
        };
        let start = log.partition_point(|entry| entry.seqno < from);
        Ok(log[start..].iter().take(limit).cloned().collect())
    }

    async fn truncate(&self, key: &str, seqno: SeqNo) -> Result<usize, ExternalError> {
        let mut logs = lock(&self.logs);
        let head = logs.get(key).and_then(|log| log.last()).map(|h| h.seqno);
        match (logs.get_mut(key), head) {
            (Some(log), Some(head)) if seqno <= head => {
                let count = log.partition_point(|entry| entry.seqno < seqno);
                log.drain(..count);
                Ok(count)
            }
            _ => Err(truncate_past_head(key, seqno, head)),
        }
    }

    async fn list_keys(&self) -> Result<Vec<String>, ExternalError> {
        Ok(lock(&self.logs).keys().cloned().collect())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    crate::conformance::blob_conformance_tests!(async {
        Some(Arc::new(MemBlob::new()) as Arc<dyn Blob>)
    });
    crate::conformance::consensus_conformance_tests!(async {
        Some(Arc::new(MemConsensus::new()) as Arc<dyn Consensus>)
    });

    #[tokio::test]
    async fn clones_share_contents() {
        let blob = MemBlob::new();
        blob.clone()
            .set("k", Bytes::from_static(b"v"))
            .await
            .unwrap();
        assert_eq!(blob.get("k").await.unwrap(), Some(Bytes::from_static(b"v")));
    }
}
