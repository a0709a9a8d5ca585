//! The per-process cache of shard states.
//!
//! Every handle on a shard opened through one client shares a single copy
//! of the shard's latest state: a write by one handle is seen by the others
//! without reading consensus, and the state is decoded once, not once per
//! handle. Entries are weak: a shard's state is dropped with its last handle.

use std::any::Any;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use persist_types::ShardId;

use crate::error::Codecs;

/// Shared shard states, keyed by shard, of any timestamp type. One cache
/// serves one location (one blob and consensus pair): a `PersistClient` owns
/// its own.
#[derive(Debug, Default)]
pub(crate) struct StateCache {
    shards: Mutex<HashMap<ShardId, Entry>>,
}

#[derive(Debug)]
struct Entry {
    /// The codecs the shard was opened with (the same for every entry of
    /// the shard: opening checks them against the durable state).
    codecs: Codecs,
    shared: Weak<dyn Any + Send + Sync>,
}

/// What the cache holds for a shard.
#[derive(Debug)]
pub(crate) enum Cached<S> {
    /// The live shared state.
    Live(Arc<S>),
    /// The shard is open in this process with a different timestamp type
    /// (and so different codecs): these are its codecs.
    OtherType(Codecs),
    /// Nothing live is cached.
    Missing,
}

impl StateCache {
    fn lock(&self) -> MutexGuard<'_, HashMap<ShardId, Entry>> {
        self.shards
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The live shared state of `shard`, if any.
    pub fn get<S: Any + Send + Sync>(&self, shard: ShardId) -> Cached<S> {
        let mut shards = self.lock();
        let Some(entry) = shards.get(&shard) else {
            return Cached::Missing;
        };
        let Some(shared) = entry.shared.upgrade() else {
            shards.remove(&shard);
            return Cached::Missing;
        };
        match shared.downcast::<S>() {
            Ok(shared) => Cached::Live(shared),
            Err(_) => Cached::OtherType(entry.codecs.clone()),
        }
    }

    /// Caches `fresh` for `shard` unless a live state is already cached (a
    /// concurrent open won), and returns what is cached afterwards.
    pub fn insert_or_get<S: Any + Send + Sync>(
        &self,
        shard: ShardId,
        codecs: &Codecs,
        fresh: Arc<S>,
    ) -> Cached<S> {
        let mut shards = self.lock();
        if let Some(existing) = shards.get(&shard).and_then(|e| e.shared.upgrade()) {
            let codecs = shards
                .get(&shard)
                .map(|e| e.codecs.clone())
                .unwrap_or_else(|| codecs.clone());
            return match existing.downcast::<S>() {
                Ok(existing) => Cached::Live(existing),
                Err(_) => Cached::OtherType(codecs),
            };
        }
        let erased: Arc<dyn Any + Send + Sync> = fresh.clone();
        // Forget shards whose last handle is gone, so the map does not grow
        // with every shard ever opened.
        shards.retain(|_, e| e.shared.strong_count() > 0);
        shards.insert(
            shard,
            Entry {
                codecs: codecs.clone(),
                shared: Arc::downgrade(&erased),
            },
        );
        Cached::Live(fresh)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn codecs(ts: &str) -> Codecs {
        Codecs {
            key: "k".into(),
            val: "v".into(),
            ts: ts.into(),
            diff: "d".into(),
        }
    }

    #[test]
    fn entries_are_shared_typed_and_weak() {
        let cache = StateCache::default();
        let shard = ShardId::new();
        assert!(matches!(cache.get::<u64>(shard), Cached::Missing));
        let first = Arc::new(7u64);
        let Cached::Live(cached) = cache.insert_or_get(shard, &codecs("u64"), Arc::clone(&first))
        else {
            panic!("fresh entry not cached")
        };
        assert!(Arc::ptr_eq(&cached, &first));
        // A concurrent open that lost the race gets the first one's state.
        let Cached::Live(again) = cache.insert_or_get(shard, &codecs("u64"), Arc::new(8u64)) else {
            panic!("live entry not returned")
        };
        assert!(Arc::ptr_eq(&again, &first));
        // Another timestamp type learns the codecs in use.
        match cache.get::<i64>(shard) {
            Cached::OtherType(c) => assert_eq!(c, codecs("u64")),
            other => panic!("expected another type, got {other:?}"),
        }
        // Once every handle is gone, the state goes too.
        drop((first, cached, again));
        assert!(matches!(cache.get::<u64>(shard), Cached::Missing));
        assert!(cache.lock().is_empty());
    }
}
