//! One behavioural suite for every backend.
//!
//! A backend's test module calls [`blob_conformance_tests!`] and/or
//! [`consensus_conformance_tests!`] with an async expression that opens a
//! fresh, empty instance (or `None` when its server is not configured and
//! the run is not under CI; see [`crate::testing`]). Each case becomes its
//! own test, named `<backend>::tests::{blob,consensus}_conformance::<case>`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use bytes::Bytes;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

use crate::location::{Blob, BlobMetadata, CaSResult, Consensus, SeqNo, VersionedData};
use crate::{open_blob, open_consensus};

/// Expands to one `#[tokio::test]` per blob conformance case.
macro_rules! blob_conformance_tests {
    ($open:expr) => {
        mod blob_conformance {
            #[allow(unused_imports)]
            use super::*;

            async fn open() -> Option<std::sync::Arc<dyn $crate::Blob>> {
                $open.await
            }

            $crate::conformance::conformance_cases!(
                blob,
                open,
                get_set_delete,
                unusual_keys,
                overwrite,
                empty_and_large_values,
                prefix_listing,
                concurrent_writers,
                matches_model
            );
        }
    };
}
pub(crate) use blob_conformance_tests;

/// Expands to one `#[tokio::test]` per consensus conformance case.
macro_rules! consensus_conformance_tests {
    ($open:expr) => {
        mod consensus_conformance {
            #[allow(unused_imports)]
            use super::*;

            async fn open() -> Option<std::sync::Arc<dyn $crate::Consensus>> {
                $open.await
            }

            $crate::conformance::conformance_cases!(
                consensus,
                open,
                cas_from_empty,
                stale_expectation_returns_head,
                scan_order_and_limits,
                truncate_semantics,
                invalid_compare_and_set,
                list_keys,
                cas_race,
                truncate_races_with_cas,
                matches_model
            );
        }
    };
}
pub(crate) use consensus_conformance_tests;

macro_rules! conformance_cases {
    ($kind:ident, $open:ident, $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $case() {
                if let Some(backend) = $open().await {
                    $crate::conformance::$kind::$case(backend).await;
                }
            }
        )*
    };
}
pub(crate) use conformance_cases;

fn bytes(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

fn entry(seqno: u64, data: &str) -> VersionedData {
    VersionedData {
        seqno: SeqNo(seqno),
        data: bytes(data),
    }
}

async fn list(blob: &dyn Blob, prefix: &str) -> Vec<BlobMetadata> {
    let mut found = Vec::new();
    blob.list_keys_and_metadata(prefix, &mut |m| found.push(m))
        .await
        .unwrap();
    found.sort_by(|a, b| a.key.cmp(&b.key));
    found
}

fn meta(key: &str, size: u64) -> BlobMetadata {
    BlobMetadata {
        key: key.to_owned(),
        size_in_bytes: size,
    }
}

/// Runs a proptest inside an async test (which must use the multi-threaded
/// runtime), checking each generated case with `check`.
fn run_model_test<S, F, Fut>(cases: u32, strategy: S, check: F)
where
    S: Strategy,
    S::Value: Clone,
    F: Fn(S::Value) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let handle = tokio::runtime::Handle::current();
    tokio::task::block_in_place(|| {
        let config = Config {
            cases,
            failure_persistence: None,
            ..Config::default()
        };
        let mut runner = TestRunner::new(config);
        let result = runner.run(&strategy, |value| {
            handle.block_on(check(value));
            Ok(())
        });
        if let Err(err) = result {
            panic!("{err}");
        }
    });
}

pub(crate) mod blob {
    use super::*;

    pub(crate) async fn get_set_delete(blob: Arc<dyn Blob>) {
        assert_eq!(blob.get("k").await.unwrap(), None);
        assert_eq!(
            blob.delete("k").await.unwrap(),
            None,
            "deleting a missing key succeeds"
        );
        blob.set("k", bytes("value")).await.unwrap();
        assert_eq!(blob.get("k").await.unwrap(), Some(bytes("value")));
        assert_eq!(list(&*blob, "").await, vec![meta("k", 5)]);
        assert_eq!(blob.delete("k").await.unwrap(), Some(5));
        assert_eq!(blob.get("k").await.unwrap(), None);
        assert_eq!(
            blob.delete("k").await.unwrap(),
            None,
            "delete is idempotent"
        );
        assert_eq!(list(&*blob, "").await, vec![]);
    }

    pub(crate) async fn unusual_keys(blob: Arc<dyn Blob>) {
        let keys = [
            "a b",
            "100%",
            "ü/ñ/語",
            "..",
            "a/../b",
            ".hidden",
            "trailing/",
            "x".repeat(200).leak() as &str,
        ];
        for key in keys {
            blob.set(key, bytes(key)).await.unwrap();
        }
        for key in keys {
            assert_eq!(blob.get(key).await.unwrap(), Some(bytes(key)), "{key}");
        }
        let mut listed: Vec<String> = list(&*blob, "").await.into_iter().map(|m| m.key).collect();
        let mut expected: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
        expected.sort();
        listed.sort();
        assert_eq!(listed, expected);
        let err = blob.set("", bytes("x")).await.unwrap_err();
        assert!(err.is_determinate(), "{err}");
        assert!(blob.get("").await.is_err());
        for key in keys {
            assert_eq!(blob.delete(key).await.unwrap(), Some(key.len()), "{key}");
        }
    }

    pub(crate) async fn overwrite(blob: Arc<dyn Blob>) {
        blob.set("k", bytes("first, and longer")).await.unwrap();
        blob.set("k", bytes("second")).await.unwrap();
        assert_eq!(blob.get("k").await.unwrap(), Some(bytes("second")));
        assert_eq!(list(&*blob, "k").await, vec![meta("k", 6)]);
    }

    pub(crate) async fn empty_and_large_values(blob: Arc<dyn Blob>) {
        blob.set("empty", Bytes::new()).await.unwrap();
        assert_eq!(blob.get("empty").await.unwrap(), Some(Bytes::new()));
        assert_eq!(blob.delete("empty").await.unwrap(), Some(0));

        let large: Bytes = (0..32u32 << 20)
            .map(|i| (i % 251) as u8)
            .collect::<Vec<u8>>()
            .into();
        blob.set("large", large.clone()).await.unwrap();
        let read = blob
            .get("large")
            .await
            .unwrap()
            .expect("large value present");
        assert_eq!(read.len(), large.len());
        assert!(read == large, "large value corrupted");
        assert_eq!(list(&*blob, "large").await, vec![meta("large", 32 << 20)]);
        assert_eq!(blob.delete("large").await.unwrap(), Some(32 << 20));
    }

    pub(crate) async fn prefix_listing(blob: Arc<dyn Blob>) {
        for key in [
            "s1/w1/p1",
            "s1/w1/p2",
            "s1/w2/p1",
            "s1/v3/rollup",
            "s10/w1/p1",
            "s2/w1/p1",
        ] {
            blob.set(key, bytes(key)).await.unwrap();
        }
        let keys = |m: Vec<BlobMetadata>| m.into_iter().map(|m| m.key).collect::<Vec<_>>();
        assert_eq!(
            keys(list(&*blob, "s1/").await),
            vec!["s1/v3/rollup", "s1/w1/p1", "s1/w1/p2", "s1/w2/p1"]
        );
        assert_eq!(
            keys(list(&*blob, "s1/w1").await),
            vec!["s1/w1/p1", "s1/w1/p2"]
        );
        assert_eq!(
            keys(list(&*blob, "s1").await).len(),
            5,
            "a prefix need not end at a separator"
        );
        assert_eq!(keys(list(&*blob, "s3").await), Vec::<String>::new());
        assert_eq!(list(&*blob, "").await.len(), 6);
        assert_eq!(list(&*blob, "s1/w2/p1").await, vec![meta("s1/w2/p1", 8)]);
    }

    pub(crate) async fn concurrent_writers(blob: Arc<dyn Blob>) {
        let values: Vec<Bytes> = (0..8u8).map(|i| Bytes::from(vec![i; 64 << 10])).collect();
        let mut tasks = tokio::task::JoinSet::new();
        for value in values.clone() {
            let blob = Arc::clone(&blob);
            tasks.spawn(async move {
                for _ in 0..4 {
                    blob.set("contended", value.clone()).await.unwrap();
                    let read = blob
                        .get("contended")
                        .await
                        .unwrap()
                        .expect("present once set");
                    // Whole values only: never a mix of two writers.
                    assert_eq!(read.len(), 64 << 10);
                    assert!(read.iter().all(|b| *b == read[0]), "torn value");
                }
            });
        }
        while let Some(joined) = tasks.join_next().await {
            joined.unwrap();
        }
        let last = blob.get("contended").await.unwrap().unwrap();
        assert!(values.contains(&last));
        assert_eq!(list(&*blob, "").await, vec![meta("contended", 64 << 10)]);
    }

    #[derive(Clone, Debug)]
    pub(crate) enum Op {
        Get(usize),
        Set(usize, Vec<u8>),
        Delete(usize),
        List(usize),
    }

    const KEYS: [&str; 5] = ["a", "a/b", "a/c", "ab", "b"];
    const PREFIXES: [&str; 4] = ["", "a", "a/", "b"];

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0..KEYS.len()).prop_map(Op::Get),
            (0..KEYS.len(), proptest::collection::vec(any::<u8>(), 0..16))
                .prop_map(|(k, v)| Op::Set(k, v)),
            (0..KEYS.len()).prop_map(Op::Delete),
            (0..PREFIXES.len()).prop_map(Op::List),
        ]
    }

    pub(crate) async fn matches_model(blob: Arc<dyn Blob>) {
        run_model_test(24, proptest::collection::vec(op(), 1..24), |ops| {
            let blob = Arc::clone(&blob);
            async move {
                // A fresh namespace per case: the backend outlives cases.
                let ns = format!("{}/", uuid::Uuid::new_v4().simple());
                let key = |i: usize| format!("{ns}{}", KEYS[i]);
                let mut model: BTreeMap<String, Vec<u8>> = BTreeMap::new();
                for op in ops {
                    match op {
                        Op::Get(k) => {
                            let expected = model.get(&key(k)).cloned().map(Bytes::from);
                            assert_eq!(
                                blob.get(&key(k)).await.unwrap(),
                                expected,
                                "get {}",
                                key(k)
                            );
                        }
                        Op::Set(k, v) => {
                            blob.set(&key(k), Bytes::from(v.clone())).await.unwrap();
                            model.insert(key(k), v);
                        }
                        Op::Delete(k) => {
                            let expected = model.remove(&key(k)).map(|v| v.len());
                            assert_eq!(blob.delete(&key(k)).await.unwrap(), expected);
                        }
                        Op::List(p) => {
                            let prefix = format!("{ns}{}", PREFIXES[p]);
                            let expected: Vec<BlobMetadata> = model
                                .iter()
                                .filter(|(k, _)| k.starts_with(&prefix))
                                .map(|(k, v)| meta(k, v.len() as u64))
                                .collect();
                            assert_eq!(list(&*blob, &prefix).await, expected, "list {prefix}");
                        }
                    }
                }
            }
        });
    }
}

pub(crate) mod consensus {
    use super::*;

    pub(crate) async fn cas_from_empty(c: Arc<dyn Consensus>) {
        assert_eq!(c.head("k").await.unwrap(), None);
        assert_eq!(c.scan("k", SeqNo(0), 10).await.unwrap(), vec![]);
        assert_eq!(
            c.compare_and_set("k", None, entry(0, "zero"))
                .await
                .unwrap(),
            CaSResult::Committed
        );
        assert_eq!(c.head("k").await.unwrap(), Some(entry(0, "zero")));
        // A second creation loses and learns the head.
        assert_eq!(
            c.compare_and_set("k", None, entry(0, "other"))
                .await
                .unwrap(),
            CaSResult::ExpectationMismatch(Some(entry(0, "zero")))
        );
        assert_eq!(
            c.compare_and_set("k", Some(SeqNo(0)), entry(1, "one"))
                .await
                .unwrap(),
            CaSResult::Committed
        );
        assert_eq!(c.head("k").await.unwrap(), Some(entry(1, "one")));
        // Keys are independent; a log may start at any seqno and skip ahead.
        assert_eq!(
            c.compare_and_set("j", None, entry(5, "five"))
                .await
                .unwrap(),
            CaSResult::Committed
        );
        assert_eq!(
            c.compare_and_set("j", Some(SeqNo(5)), entry(9, "nine"))
                .await
                .unwrap(),
            CaSResult::Committed
        );
        assert_eq!(c.head("j").await.unwrap(), Some(entry(9, "nine")));
        assert_eq!(c.head("k").await.unwrap(), Some(entry(1, "one")));
        let empty = VersionedData {
            seqno: SeqNo(10),
            data: Bytes::new(),
        };
        assert_eq!(
            c.compare_and_set("j", Some(SeqNo(9)), empty.clone())
                .await
                .unwrap(),
            CaSResult::Committed
        );
        assert_eq!(c.head("j").await.unwrap(), Some(empty));
    }

    pub(crate) async fn stale_expectation_returns_head(c: Arc<dyn Consensus>) {
        c.compare_and_set("k", None, entry(0, "a")).await.unwrap();
        c.compare_and_set("k", Some(SeqNo(0)), entry(1, "b"))
            .await
            .unwrap();
        for stale in [Some(SeqNo(0)), Some(SeqNo(5)), None] {
            let new = stale.map_or(SeqNo(0), SeqNo::next);
            assert_eq!(
                c.compare_and_set(
                    "k",
                    stale,
                    VersionedData {
                        seqno: new,
                        data: bytes("x")
                    }
                )
                .await
                .unwrap(),
                CaSResult::ExpectationMismatch(Some(entry(1, "b"))),
                "expected {stale:?}"
            );
        }
        assert_eq!(
            c.compare_and_set("missing", Some(SeqNo(3)), entry(4, "x"))
                .await
                .unwrap(),
            CaSResult::ExpectationMismatch(None)
        );
        assert_eq!(c.head("missing").await.unwrap(), None);
        assert_eq!(
            c.scan("k", SeqNo(0), 10).await.unwrap(),
            vec![entry(0, "a"), entry(1, "b")]
        );
    }

    pub(crate) async fn scan_order_and_limits(c: Arc<dyn Consensus>) {
        let mut expected = None;
        for seqno in [0u64, 1, 2, 4, 7] {
            c.compare_and_set("k", expected, entry(seqno, &seqno.to_string()))
                .await
                .unwrap();
            expected = Some(SeqNo(seqno));
        }
        let seqnos = |v: Vec<VersionedData>| v.into_iter().map(|e| e.seqno.0).collect::<Vec<_>>();
        assert_eq!(
            seqnos(c.scan("k", SeqNo(0), 100).await.unwrap()),
            vec![0, 1, 2, 4, 7]
        );
        assert_eq!(seqnos(c.scan("k", SeqNo(0), 2).await.unwrap()), vec![0, 1]);
        assert_eq!(seqnos(c.scan("k", SeqNo(3), 2).await.unwrap()), vec![4, 7]);
        assert_eq!(seqnos(c.scan("k", SeqNo(7), 1).await.unwrap()), vec![7]);
        assert_eq!(
            seqnos(c.scan("k", SeqNo(8), 10).await.unwrap()),
            Vec::<u64>::new()
        );
        assert_eq!(
            seqnos(c.scan("k", SeqNo(0), 0).await.unwrap()),
            Vec::<u64>::new()
        );
        assert_eq!(
            seqnos(c.scan("k", SeqNo(0), usize::MAX).await.unwrap()).len(),
            5
        );
        assert_eq!(
            seqnos(c.scan("k", SeqNo(u64::MAX), 10).await.unwrap()),
            Vec::<u64>::new()
        );
        assert_eq!(c.scan("k", SeqNo(4), 1).await.unwrap(), vec![entry(4, "4")]);
    }

    pub(crate) async fn truncate_semantics(c: Arc<dyn Consensus>) {
        let err = c.truncate("k", SeqNo(0)).await.unwrap_err();
        assert!(err.is_determinate(), "{err}");
        assert!(err.to_string().contains("no entries"), "{err}");

        for seqno in 0..5u64 {
            c.compare_and_set("k", seqno.checked_sub(1).map(SeqNo), entry(seqno, "x"))
                .await
                .unwrap();
        }
        assert_eq!(c.truncate("k", SeqNo(0)).await.unwrap(), 0);
        assert_eq!(c.truncate("k", SeqNo(2)).await.unwrap(), 2);
        assert_eq!(
            c.truncate("k", SeqNo(2)).await.unwrap(),
            0,
            "truncate is idempotent"
        );
        assert_eq!(
            c.truncate("k", SeqNo(1)).await.unwrap(),
            0,
            "truncating below the tail is a no-op"
        );
        let err = c.truncate("k", SeqNo(5)).await.unwrap_err();
        assert!(err.is_determinate(), "{err}");
        assert!(err.to_string().contains("past its head v4"), "{err}");
        assert_eq!(
            c.scan("k", SeqNo(0), 10).await.unwrap().len(),
            3,
            "a refused truncate deletes nothing"
        );
        // Truncating up to the head keeps the head.
        assert_eq!(c.truncate("k", SeqNo(4)).await.unwrap(), 2);
        assert_eq!(
            c.scan("k", SeqNo(0), 10).await.unwrap(),
            vec![entry(4, "x")]
        );
        assert_eq!(c.head("k").await.unwrap(), Some(entry(4, "x")));
        // The log continues after truncation.
        assert_eq!(
            c.compare_and_set("k", Some(SeqNo(4)), entry(5, "y"))
                .await
                .unwrap(),
            CaSResult::Committed
        );
    }

    pub(crate) async fn invalid_compare_and_set(c: Arc<dyn Consensus>) {
        c.compare_and_set("k", None, entry(3, "a")).await.unwrap();
        for (expected, new) in [(3, 3), (3, 2)] {
            let err = c
                .compare_and_set("k", Some(SeqNo(expected)), entry(new, "b"))
                .await
                .unwrap_err();
            assert!(err.is_determinate(), "{err}");
            assert!(err.to_string().contains("must be greater"), "{err}");
        }
        let err = c
            .compare_and_set(
                "k",
                Some(SeqNo(3)),
                VersionedData {
                    seqno: SeqNo(u64::MAX),
                    data: bytes("c"),
                },
            )
            .await
            .unwrap_err();
        assert!(err.to_string().contains("exceeds the maximum"), "{err}");
        assert_eq!(
            c.head("k").await.unwrap(),
            Some(entry(3, "a")),
            "nothing written"
        );
        let max = VersionedData {
            seqno: SeqNo::MAX,
            data: bytes("max"),
        };
        assert_eq!(
            c.compare_and_set("k", Some(SeqNo(3)), max.clone())
                .await
                .unwrap(),
            CaSResult::Committed
        );
        assert_eq!(c.head("k").await.unwrap(), Some(max));
    }

    pub(crate) async fn list_keys(c: Arc<dyn Consensus>) {
        assert_eq!(c.list_keys().await.unwrap(), Vec::<String>::new());
        for key in ["s2", "s1", "s3"] {
            c.compare_and_set(key, None, entry(0, key)).await.unwrap();
        }
        c.compare_and_set("s1", Some(SeqNo(0)), entry(1, "again"))
            .await
            .unwrap();
        // A failed creation does not make a key appear.
        c.compare_and_set("s4", Some(SeqNo(0)), entry(1, "x"))
            .await
            .unwrap();
        assert_eq!(c.list_keys().await.unwrap(), vec!["s1", "s2", "s3"]);
    }

    /// Many tasks race to extend one log. Each SeqNo has exactly one winner,
    /// the log has no gaps, and every win is in it exactly once.
    pub(crate) async fn cas_race(c: Arc<dyn Consensus>) {
        const TASKS: usize = 8;
        const WINS: usize = 8;
        let mut tasks = tokio::task::JoinSet::new();
        for task in 0..TASKS {
            let c = Arc::clone(&c);
            tasks.spawn(async move {
                let mut wins = 0;
                let mut head = c.head("race").await.unwrap().map(|h| h.seqno);
                while wins < WINS {
                    let new = head.map_or(SeqNo(0), SeqNo::next);
                    let data = bytes(&format!("{task}/{wins}"));
                    match c
                        .compare_and_set("race", head, VersionedData { seqno: new, data })
                        .await
                        .unwrap()
                    {
                        CaSResult::Committed => {
                            wins += 1;
                            head = Some(new);
                        }
                        CaSResult::ExpectationMismatch(current) => {
                            let current = current.map(|c| c.seqno);
                            assert_ne!(current, head, "a mismatch must report a different head");
                            assert!(current > head, "heads only move forward");
                            head = current;
                        }
                    }
                }
            });
        }
        while let Some(joined) = tasks.join_next().await {
            joined.unwrap();
        }
        let log = c.scan("race", SeqNo(0), usize::MAX).await.unwrap();
        let seqnos: Vec<u64> = log.iter().map(|e| e.seqno.0).collect();
        assert_eq!(seqnos, (0..(TASKS * WINS) as u64).collect::<Vec<_>>());
        let wins: BTreeSet<Bytes> = log.into_iter().map(|e| e.data).collect();
        assert_eq!(wins.len(), TASKS * WINS, "no win lost or duplicated");
    }

    /// Writers extend a log while another task truncates it to its head.
    /// Every truncate that succeeds has removed everything below its seqno,
    /// and the log stays gapless from its tail to its head.
    pub(crate) async fn truncate_races_with_cas(c: Arc<dyn Consensus>) {
        const WRITERS: usize = 4;
        const WINS: usize = 10;
        c.compare_and_set("t", None, entry(0, "start"))
            .await
            .unwrap();
        let mut writers = tokio::task::JoinSet::new();
        for task in 0..WRITERS {
            let c = Arc::clone(&c);
            writers.spawn(async move {
                let mut wins = 0;
                let mut head = c.head("t").await.unwrap().map(|h| h.seqno);
                while wins < WINS {
                    // Jump ahead by varying amounts.
                    let new = head.map_or(SeqNo(0), |h| SeqNo(h.0 + 1 + (task as u64 % 3)));
                    let data = bytes(&format!("{task}/{wins}"));
                    match c
                        .compare_and_set("t", head, VersionedData { seqno: new, data })
                        .await
                        .unwrap()
                    {
                        CaSResult::Committed => {
                            wins += 1;
                            head = Some(new);
                        }
                        CaSResult::ExpectationMismatch(current) => head = current.map(|c| c.seqno),
                    }
                }
            });
        }
        let truncator = {
            let c = Arc::clone(&c);
            tokio::spawn(async move {
                for _ in 0..30 {
                    let head = c.head("t").await.unwrap().expect("never empty").seqno;
                    c.truncate("t", head).await.unwrap();
                    let tail = c.scan("t", SeqNo(0), 1).await.unwrap();
                    assert!(
                        tail[0].seqno >= head,
                        "entries below {head} survived a truncate"
                    );
                    tokio::task::yield_now().await;
                }
            })
        };
        while let Some(joined) = writers.join_next().await {
            joined.unwrap();
        }
        truncator.await.unwrap();
        let log = c.scan("t", SeqNo(0), usize::MAX).await.unwrap();
        let head = c.head("t").await.unwrap().unwrap();
        assert_eq!(log.last(), Some(&head));
        assert!(log.windows(2).all(|w| w[0].seqno < w[1].seqno));
    }

    #[derive(Clone, Debug)]
    pub(crate) enum Op {
        Head(usize),
        /// Compare-and-set against the model's head, advancing by the delta.
        CasAtHead(usize, u64, u8),
        /// Compare-and-set with an arbitrary (usually wrong) expectation.
        CasAt(usize, Option<u64>, u64, u8),
        Scan(usize, u64, usize),
        Truncate(usize, u64),
        ListKeys,
    }

    const KEYS: usize = 2;

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            1 => (0..KEYS).prop_map(Op::Head),
            3 => (0..KEYS, 1..3u64, any::<u8>()).prop_map(|(k, d, v)| Op::CasAtHead(k, d, v)),
            1 => (0..KEYS, proptest::option::of(0..8u64), 0..3u64, any::<u8>())
                .prop_map(|(k, e, d, v)| Op::CasAt(k, e, d, v)),
            1 => (0..KEYS, 0..10u64, 0..4usize).prop_map(|(k, f, l)| Op::Scan(k, f, l)),
            1 => (0..KEYS, 0..10u64).prop_map(|(k, s)| Op::Truncate(k, s)),
            1 => Just(Op::ListKeys),
        ]
    }

    /// The reference: what each operation must return.
    #[derive(Default)]
    struct Model {
        logs: BTreeMap<String, Vec<VersionedData>>,
    }

    impl Model {
        fn head(&self, key: &str) -> Option<VersionedData> {
            self.logs.get(key).and_then(|log| log.last().cloned())
        }

        /// `None` for a call that must fail.
        fn cas(
            &mut self,
            key: &str,
            expected: Option<SeqNo>,
            new: VersionedData,
        ) -> Option<CaSResult> {
            if expected.is_some_and(|e| new.seqno <= e) {
                return None;
            }
            let head = self.head(key);
            if head.as_ref().map(|h| h.seqno) != expected {
                return Some(CaSResult::ExpectationMismatch(head));
            }
            self.logs.entry(key.to_owned()).or_default().push(new);
            Some(CaSResult::Committed)
        }

        fn truncate(&mut self, key: &str, seqno: SeqNo) -> Option<usize> {
            let log = self.logs.get_mut(key)?;
            if log.last().is_none_or(|h| seqno > h.seqno) {
                return None;
            }
            let count = log.iter().take_while(|e| e.seqno < seqno).count();
            log.drain(..count);
            Some(count)
        }
    }

    pub(crate) async fn matches_model(c: Arc<dyn Consensus>) {
        run_model_test(24, proptest::collection::vec(op(), 1..32), |ops| {
            let c = Arc::clone(&c);
            async move {
                let ns = uuid::Uuid::new_v4().simple().to_string();
                let key = |i: usize| format!("{ns}-{i}");
                let mut model = Model::default();
                for op in ops {
                    match op {
                        Op::Head(k) => {
                            assert_eq!(c.head(&key(k)).await.unwrap(), model.head(&key(k)))
                        }
                        Op::CasAtHead(k, delta, v) => {
                            let expected = model.head(&key(k)).map(|h| h.seqno);
                            let new = VersionedData {
                                seqno: SeqNo(expected.map_or(0, |e| e.0 + delta)),
                                data: Bytes::from(vec![v]),
                            };
                            let want = model.cas(&key(k), expected, new.clone());
                            assert_eq!(c.compare_and_set(&key(k), expected, new).await.ok(), want);
                        }
                        Op::CasAt(k, expected, delta, v) => {
                            let expected = expected.map(SeqNo);
                            let new = VersionedData {
                                seqno: SeqNo(expected.map_or(delta, |e| e.0 + delta)),
                                data: Bytes::from(vec![v]),
                            };
                            let want = model.cas(&key(k), expected, new.clone());
                            let got = c.compare_and_set(&key(k), expected, new).await;
                            assert_eq!(got.as_ref().ok(), want.as_ref(), "{got:?}");
                        }
                        Op::Scan(k, from, limit) => {
                            let want: Vec<VersionedData> = model
                                .logs
                                .get(&key(k))
                                .into_iter()
                                .flatten()
                                .filter(|e| e.seqno.0 >= from)
                                .take(limit)
                                .cloned()
                                .collect();
                            assert_eq!(c.scan(&key(k), SeqNo(from), limit).await.unwrap(), want);
                        }
                        Op::Truncate(k, seqno) => {
                            let want = model.truncate(&key(k), SeqNo(seqno));
                            let got = c.truncate(&key(k), SeqNo(seqno)).await;
                            assert_eq!(got.as_ref().ok(), want.as_ref(), "{got:?}");
                        }
                        Op::ListKeys => {
                            let got: Vec<String> = c
                                .list_keys()
                                .await
                                .unwrap()
                                .into_iter()
                                .filter(|k| k.starts_with(&ns))
                                .collect();
                            let want: Vec<String> = model.logs.keys().cloned().collect();
                            assert_eq!(got, want);
                        }
                    }
                }
            }
        });
    }
}

/// Writes through one instance opened from `uri`, drops it, and checks that
/// a second instance opened from the same URI sees exactly what was written.
///
/// This checks that state lives in the backend, not in the handle; it does
/// not simulate power loss. The fsync discipline that survives a power loss
/// is in each backend's write path (file: temp file, `fdatasync`, rename,
/// directory fsync; SQLite: WAL with `synchronous=FULL`), and killed
/// processes are covered by `tests/tests/multiprocess.rs`.
pub(crate) async fn blob_durable_across_reopen(uri: &str) {
    let blob = open_blob(uri).await.unwrap();
    blob.set("durable/kept", bytes("kept")).await.unwrap();
    blob.set("durable/replaced", bytes("old")).await.unwrap();
    blob.set("durable/replaced", bytes("new")).await.unwrap();
    blob.set("durable/deleted", bytes("gone")).await.unwrap();
    blob.delete("durable/deleted").await.unwrap();
    drop(blob);

    let blob = open_blob(uri).await.unwrap();
    assert_eq!(blob.get("durable/kept").await.unwrap(), Some(bytes("kept")));
    assert_eq!(
        blob.get("durable/replaced").await.unwrap(),
        Some(bytes("new"))
    );
    assert_eq!(blob.get("durable/deleted").await.unwrap(), None);
    assert_eq!(
        list(&*blob, "durable/").await,
        vec![meta("durable/kept", 4), meta("durable/replaced", 3)]
    );
}

/// Like [`blob_durable_across_reopen`], for a consensus log.
pub(crate) async fn consensus_durable_across_reopen(uri: &str) {
    let c = open_consensus(uri).await.unwrap();
    for seqno in 0..4u64 {
        c.compare_and_set(
            "durable",
            seqno.checked_sub(1).map(SeqNo),
            entry(seqno, &format!("v{seqno}")),
        )
        .await
        .unwrap();
    }
    c.truncate("durable", SeqNo(2)).await.unwrap();
    drop(c);

    let c = open_consensus(uri).await.unwrap();
    assert_eq!(
        c.scan("durable", SeqNo(0), 10).await.unwrap(),
        vec![entry(2, "v2"), entry(3, "v3")]
    );
    assert_eq!(c.list_keys().await.unwrap(), vec!["durable"]);
    assert_eq!(
        c.compare_and_set("durable", Some(SeqNo(3)), entry(4, "v4"))
            .await
            .unwrap(),
        CaSResult::Committed
    );
}
