//! `shard_source` against shards written with the client.

mod common;

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

use common::*;
use persist_client::{Diagnostics, PersistClient};
use persist_operators::{ShardSourceArgs, SnapshotMode, SourceError, shard_source};
use persist_types::{Codec, CodecError, ShardId, SimpleSchema};
use timely::dataflow::operators::{Inspect, Probe};
use timely::progress::Antichain;

type Source = ShardSourceArgs<String, String, u64>;

/// Opens a reader and moves the shard's since to `since` (the upper stays
/// where it is).
async fn initialize_since(client: &PersistClient, shard: ShardId, since: u64) {
    let mut reader = client
        .open_leased_reader::<String, String, u64, i64>(
            shard,
            Arc::new(SimpleSchema::new()),
            Arc::new(SimpleSchema::new()),
            Diagnostics::for_tests(),
        )
        .await
        .expect("valid usage");
    reader
        .downgrade_since(&Antichain::from_elem(since))
        .await
        .expect("downgrade");
    reader.expire().await;
}

/// Appends `updates` as `[lower, upper)`.
async fn write(client: &PersistClient, shard: ShardId, updates: &[Update], lower: u64, upper: u64) {
    let mut writer = client
        .open_writer::<String, String, u64, i64>(
            shard,
            Arc::new(SimpleSchema::new()),
            Arc::new(SimpleSchema::new()),
            Diagnostics::for_tests(),
        )
        .await
        .expect("valid usage");
    writer
        .compare_and_append(
            updates,
            Antichain::from_elem(lower),
            Antichain::from_elem(upper),
        )
        .await
        .expect("valid usage")
        .expect("upper matches");
    writer.expire().await;
}

/// Runs a source over the shard on `workers` workers until its frontier is
/// at least `until_frontier` (or done), returning every worker's ok and err
/// records and final frontier.
fn run_source(
    workers: usize,
    client: PersistClient,
    shard: ShardId,
    rt: tokio::runtime::Handle,
    configure: impl Fn(Source) -> Source + Send + Sync + 'static,
    wait_for: Option<u64>,
) -> SourceRun {
    let barrier = Arc::new(std::sync::Barrier::new(workers));
    let results = on_workers(workers, move |worker| {
        let oks = Rc::new(RefCell::new(Vec::new()));
        let errs = Rc::new(RefCell::new(Vec::new()));
        let (ok_sink, err_sink) = (Rc::clone(&oks), Rc::clone(&errs));
        let args = configure(Source::new(
            "test_source",
            client.clone(),
            shard,
            rt.clone(),
        ));
        let (probe, _token) = worker.dataflow::<u64, _, _>(|scope| {
            let out = shard_source::<String, String, u64, i64, _>(scope, args, |_, _| true);
            out.err
                .inner
                .inspect(move |x| err_sink.borrow_mut().push(x.clone()));
            let (probe, _) = out
                .ok
                .inner
                .inspect(move |x| ok_sink.borrow_mut().push(x.clone()))
                .probe();
            (probe, out.token)
        });
        match wait_for {
            Some(t) => step_until(worker, "the source frontier", || !probe.less_than(&t)),
            None => step_until(worker, "the source to finish", || probe.done()),
        }
        let frontier = probe.with_frontier(|f| f.to_owned());
        // No worker shuts its operators down (dropping the token) before
        // every worker has seen the frontier.
        barrier.wait();
        let oks = oks.borrow().clone();
        let errs = errs.borrow().clone();
        (oks, errs, frontier)
    });
    let mut oks = Vec::new();
    let mut errs = Vec::new();
    let mut frontiers = Vec::new();
    for (o, e, f) in results {
        oks.extend(o);
        errs.extend(e);
        frontiers.push(f);
    }
    (oks, errs, frontiers)
}

/// What a source run collected over all workers: ok records, err records,
/// and each worker's final frontier.
type SourceRun = (
    Vec<Update>,
    Vec<(SourceError, u64, i64)>,
    Vec<Antichain<u64>>,
);

fn data(times: std::ops::Range<u64>) -> Vec<Update> {
    times
        .flat_map(|t| (0..3).map(move |i| ((format!("k{t}-{i}"), format!("v{i}")), t, 1)))
        .collect()
}

/// With no `as_of`, the source's frontier moves to the shard's since at
/// once, although the shard holds no data and no snapshot is available.
#[test]
fn test_shard_source_implicit_initial_as_of() {
    for workers in [1, 4] {
        let rt = runtime();
        let client = rt.block_on(PersistClient::new_for_tests());
        let shard = ShardId::new();
        rt.block_on(initialize_since(&client, shard, 42));
        let (oks, errs, frontiers) =
            run_source(workers, client, shard, rt.handle().clone(), |a| a, Some(42));
        assert!(oks.is_empty() && errs.is_empty());
        for f in frontiers {
            assert_eq!(f, Antichain::from_elem(42), "{workers} workers");
        }
    }
}

/// With an explicit `as_of`, the frontier moves to it at once, although no
/// snapshot is available yet.
#[test]
fn test_shard_source_explicit_initial_as_of() {
    for workers in [1, 4] {
        let rt = runtime();
        let client = rt.block_on(PersistClient::new_for_tests());
        let shard = ShardId::new();
        rt.block_on(initialize_since(&client, shard, 42));
        let (oks, errs, frontiers) = run_source(
            workers,
            client,
            shard,
            rt.handle().clone(),
            |a| a.as_of(Antichain::from_elem(42)),
            Some(42),
        );
        assert!(oks.is_empty() && errs.is_empty());
        for f in frontiers {
            assert_eq!(f, Antichain::from_elem(42), "{workers} workers");
        }
    }
}

/// The snapshot at the as_of (advanced to it) plus everything after, spread
/// over the workers, each update exactly once; `until` ends the source.
#[test]
fn snapshot_then_listen_until() {
    for workers in [1, 4] {
        let rt = runtime();
        let client = rt.block_on(PersistClient::new_for_tests());
        let shard = ShardId::new();
        let all = data(0..10);
        for t in 0..10 {
            let batch: Vec<_> = all.iter().filter(|u| u.1 == t).cloned().collect();
            rt.block_on(write(&client, shard, &batch, t, t + 1));
        }
        let (mut oks, errs, frontiers) = run_source(
            workers,
            client,
            shard,
            rt.handle().clone(),
            |a| {
                a.as_of(Antichain::from_elem(4))
                    .until(Antichain::from_elem(8))
            },
            None,
        );
        assert!(errs.is_empty());
        assert!(
            frontiers.iter().all(|f| f.is_empty()),
            "until completes the source"
        );
        oks.sort();
        let mut expected: Vec<Update> = all
            .iter()
            .filter(|u| u.1 < 8)
            .map(|(d, t, r)| (d.clone(), (*t).max(4), *r))
            .collect();
        expected.sort();
        assert_eq!(oks, expected, "{workers} workers");
    }
}

/// `SnapshotMode::Exclude` emits only what comes after the as_of; data
/// appended while the source runs arrives too.
#[test]
fn snapshot_excluded_and_live_appends() {
    for workers in [1, 4] {
        let rt = runtime();
        let client = rt.block_on(PersistClient::new_for_tests());
        let shard = ShardId::new();
        let all = data(0..12);
        let first: Vec<_> = all.iter().filter(|u| u.1 < 6).cloned().collect();
        rt.block_on(write(&client, shard, &first, 0, 6));
        let writer_client = client.clone();
        let later: Vec<_> = all.iter().filter(|u| u.1 >= 6).cloned().collect();
        let handle = rt.handle().clone();
        let appender = std::thread::spawn(move || {
            handle.block_on(write(&writer_client, shard, &later, 6, 12));
        });
        let (mut oks, errs, _) = run_source(
            workers,
            client,
            shard,
            rt.handle().clone(),
            |a| {
                a.as_of(Antichain::from_elem(3))
                    .snapshot_mode(SnapshotMode::Exclude)
                    .until(Antichain::from_elem(12))
            },
            None,
        );
        appender.join().expect("appender");
        assert!(errs.is_empty());
        oks.sort();
        let mut expected: Vec<Update> = all.into_iter().filter(|u| u.1 > 3).collect();
        expected.sort();
        assert_eq!(oks, expected, "{workers} workers");
    }
}

/// A key type whose codec claims to be `String`'s but writes invalid UTF-8
/// for keys starting with "bad".
#[derive(Debug, Clone)]
struct Sneaky(String);

impl Codec for Sneaky {
    type Schema = SimpleSchema<Sneaky>;
    fn codec_name() -> String {
        String::codec_name()
    }
    fn encode<B: bytes::BufMut>(&self, buf: &mut B) {
        if self.0.starts_with("bad") {
            buf.put_slice(&[0xff, 0xfe]);
        } else {
            self.0.encode(buf);
        }
    }
    fn decode(buf: &[u8], _: &Self::Schema) -> Result<Self, CodecError> {
        String::decode(buf, &SimpleSchema::new()).map(Sneaky)
    }
}

/// Undecodable keys go to the error collection (never a panic); the rest
/// of the shard is read normally.
#[test]
fn undecodable_data_goes_to_the_error_collection() {
    let rt = runtime();
    let client = rt.block_on(PersistClient::new_for_tests());
    let shard = ShardId::new();
    rt.block_on(async {
        let mut writer = client
            .open_writer::<Sneaky, String, u64, i64>(
                shard,
                Arc::new(SimpleSchema::new()),
                Arc::new(SimpleSchema::new()),
                Diagnostics::for_tests(),
            )
            .await
            .expect("valid usage");
        let updates = [
            ((Sneaky("good".into()), "v".to_owned()), 1u64, 1i64),
            ((Sneaky("bad".into()), "v".to_owned()), 2, 1),
        ];
        writer
            .compare_and_append(&updates, Antichain::from_elem(0), Antichain::from_elem(3))
            .await
            .expect("valid usage")
            .expect("upper matches");
        writer.expire().await;
    });
    for workers in [1, 4] {
        let (oks, errs, _) = run_source(
            workers,
            client.clone(),
            shard,
            rt.handle().clone(),
            |a| {
                a.as_of(Antichain::from_elem(0))
                    .until(Antichain::from_elem(3))
            },
            None,
        );
        assert_eq!(oks, vec![(("good".to_owned(), "v".to_owned()), 1, 1)]);
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(
            matches!(errs[0].0, SourceError::UndecodableKey { .. }),
            "{errs:?}"
        );
        assert_eq!((errs[0].1, errs[0].2), (2, 1));
    }
}

/// An as_of before the since stops the source with an error; its frontier
/// stays where it was (it does not claim the data was read).
#[test]
fn as_of_before_since_is_an_error_not_a_panic() {
    let rt = runtime();
    let client = rt.block_on(PersistClient::new_for_tests());
    let shard = ShardId::new();
    rt.block_on(write(&client, shard, &data(0..5), 0, 10));
    rt.block_on(initialize_since(&client, shard, 5));
    let handle = rt.handle().clone();
    let results = on_workers(1, move |worker| {
        let errs = Rc::new(RefCell::new(Vec::new()));
        let sink = Rc::clone(&errs);
        let args = Source::new("early", client.clone(), shard, handle.clone())
            .as_of(Antichain::from_elem(2));
        let (probe, _token) = worker.dataflow::<u64, _, _>(|scope| {
            let out = shard_source::<String, String, u64, i64, _>(scope, args, |_, _| true);
            out.err
                .inner
                .inspect(move |x| sink.borrow_mut().push(x.clone()));
            let (probe, _) = out.ok.inner.probe();
            (probe, out.token)
        });
        step_until(worker, "the error and the as_of", || {
            !errs.borrow().is_empty() && !probe.less_than(&2)
        });
        let errs = errs.borrow().clone();
        (errs, probe.with_frontier(|f| f.to_owned()))
    });
    let errs: Vec<_> = results.iter().flat_map(|(e, _)| e.clone()).collect();
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(matches!(errs[0].0, SourceError::Stopped { .. }), "{errs:?}");
    // Held at the as_of: not advanced, and not complete.
    assert_eq!(results[0].1, Antichain::from_elem(2));
}

/// Parts the statistics filter rejects are not emitted; the frontier still
/// follows the shard.
#[test]
fn parts_rejected_by_statistics_are_skipped() {
    let rt = runtime();
    let client = rt.block_on(PersistClient::new_for_tests());
    let shard = ShardId::new();
    rt.block_on(write(&client, shard, &data(0..4), 0, 4));
    let handle = rt.handle().clone();
    let results = on_workers(2, move |worker| {
        let count = Rc::new(RefCell::new(0usize));
        let seen = Rc::new(RefCell::new(0usize));
        let (count2, seen2) = (Rc::clone(&count), Rc::clone(&seen));
        let args = Source::new("filtered", client.clone(), shard, handle.clone())
            .until(Antichain::from_elem(4));
        let (probe, _token) = worker.dataflow::<u64, _, _>(|scope| {
            let out = shard_source::<String, String, u64, i64, _>(scope, args, move |stats, _| {
                *seen2.borrow_mut() += 1;
                stats.len == 0
            });
            let (probe, _) = out
                .ok
                .inner
                .inspect(move |_| *count2.borrow_mut() += 1)
                .probe();
            (probe, out.token)
        });
        step_until(worker, "the source to finish", || probe.done());
        let (count, seen) = (*count.borrow(), *seen.borrow());
        (count, seen)
    });
    let emitted: usize = results.iter().map(|r| r.0).sum();
    let filtered: usize = results.iter().map(|r| r.1).sum();
    assert_eq!(emitted, 0);
    assert!(filtered >= 1, "the filter saw the parts");
}
