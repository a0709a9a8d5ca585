//! `persist_sink` writing shards that `shard_source` (and the client) read
//! back.

mod common;

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::*;
use differential_dataflow::AsCollection;
use persist::mem::{MemBlob, MemConsensus};
use persist::{Blob, BlobMetadata, ExternalError};
use persist_client::{Diagnostics, PersistClient, PersistConfig};
use persist_operators::{
    PersistSinkArgs, Record, RecordSchema, ShardSourceArgs, SinkToken, persist_sink, shard_source,
};
use persist_types::ShardId;
use timely::container::CapacityContainerBuilder;
use timely::dataflow::operators::probe::Handle as ProbeHandle;
use timely::dataflow::operators::vec::Input;
use timely::dataflow::operators::{Inspect, Probe};
use timely::dataflow::{InputHandle, Scope};
use timely::progress::Antichain;
use tokio::sync::watch;

type Row = Record<String, String, String>;
type Sink = PersistSinkArgs<String, String, String>;

/// A sink of the updates sent to the returned input, ok rows only.
fn sink_of<'scope>(
    scope: Scope<'scope, u64>,
    args: Sink,
) -> (
    InputHandle<u64, CapacityContainerBuilder<Vec<Update>>>,
    SinkToken,
) {
    let (input, ok) = scope.new_input::<Update>();
    let (_errs_input, errs) = scope.new_input::<(String, u64, i64)>();
    let token = persist_sink(ok.as_collection(), errs.as_collection(), args);
    (input, token)
}

/// Reads the sink's shard back from time 0, collecting rows and errors as
/// updates of `(key, val)` (errors as `("error", message)`).
fn read_back<'scope>(
    scope: Scope<'scope, u64>,
    name: &str,
    client: &PersistClient,
    shard: ShardId,
    rt: &tokio::runtime::Handle,
    collected: Rc<RefCell<Vec<Update>>>,
) -> (ProbeHandle<u64>, persist_operators::SourceToken) {
    let args = ShardSourceArgs::<Row, (), u64>::new(name, client.clone(), shard, rt.clone())
        .as_of(Antichain::from_elem(0));
    let out = shard_source::<Row, (), u64, i64, _>(scope, args, |_, _| true);
    let (probe, _) = out
        .ok
        .inner
        .inspect(move |((row, ()), t, r)| {
            let kv = match row {
                Record::Data(k, v) => (k.clone(), v.clone()),
                Record::Error(e) => ("error".to_owned(), e.clone()),
            };
            collected.borrow_mut().push((kv, *t, *r));
        })
        .probe();
    (probe, out.token)
}

/// Every worker's generated updates for times `0..times`.
fn expected(workers: usize, times: u64) -> Vec<Update> {
    (0..workers)
        .flat_map(|w| (0..times).flat_map(move |t| generated(w, t)))
        .collect()
}

/// Reads the shard's contents at `time` with the client.
fn snapshot(
    rt: &tokio::runtime::Runtime,
    client: &PersistClient,
    shard: ShardId,
    time: u64,
) -> Vec<Update> {
    rt.block_on(async {
        let mut reader = client
            .open_leased_reader::<Row, (), u64, i64>(
                shard,
                Arc::new(RecordSchema::default()),
                Arc::new(Default::default()),
                Diagnostics::for_tests(),
            )
            .await
            .expect("valid usage");
        let updates = reader
            .snapshot_and_fetch(Antichain::from_elem(time))
            .await
            .expect("snapshot");
        reader.expire().await;
        updates
            .into_iter()
            .map(|((k, _), t, r)| match k.expect("decodable") {
                Record::Data(k, v) => ((k, v), t, r),
                Record::Error(e) => (("error".to_owned(), e), t, r),
            })
            .collect()
    })
}

const TIMES: u64 = 12;

/// A reader holding the shard's since at 0, so the tests can read every
/// time back (the sinks' own readers let the since follow the upper).
fn hold_since(
    rt: &tokio::runtime::Runtime,
    client: &PersistClient,
    shard: ShardId,
) -> persist_client::ReadHandle<Row, (), u64, i64> {
    rt.block_on(client.open_leased_reader::<Row, (), u64, i64>(
        shard,
        Arc::new(RecordSchema::default()),
        Arc::new(Default::default()),
        Diagnostics::for_tests(),
    ))
    .expect("valid usage")
}

/// Writes a collection through the sink, reads it back through a source,
/// and compares at every time. Closing the input seals the shard.
#[test]
fn roundtrip_equals_the_input_at_every_time() {
    for workers in [1, 4] {
        let rt = runtime();
        let client = rt.block_on(PersistClient::new_for_tests());
        let shard = ShardId::new();
        let _hold = hold_since(&rt, &client, shard);
        let handle = rt.handle().clone();
        let c = client.clone();
        let results = on_workers(workers, move |worker| {
            let collected = Rc::new(RefCell::new(Vec::new()));
            let args = Sink::new("roundtrip", c.clone(), shard, handle.clone());
            let (mut input, token) = worker.dataflow(|scope| sink_of(scope, args));
            let sink_collected = Rc::clone(&collected);
            let (probe, _source) = worker
                .dataflow(|scope| read_back(scope, "reader", &c, shard, &handle, sink_collected));
            let me = worker.index();
            for t in 0..TIMES {
                for u in generated(me, t) {
                    input.send(u);
                }
                input.advance_to(t + 1);
                if t % 4 == 3 {
                    step_until(worker, "the sink", || !token.less_equal(&t));
                }
            }
            drop(input);
            step_until(worker, "the read back", || probe.done());
            // The sink reads its own shard back: it sees the seal too.
            step_until(worker, "the sink to see the seal", || {
                token.persisted_frontier().is_empty()
            });
            collected.borrow().clone()
        });
        let actual: Vec<Update> = results.into_iter().flatten().collect();
        let expected = expected(workers, TIMES);
        assert_equal_at(&actual, &expected, 0..TIMES + 2);
        assert_eq!(snapshot_sorted(&rt, &client, shard), at(&expected, TIMES));
    }
}

fn snapshot_sorted(
    rt: &tokio::runtime::Runtime,
    client: &PersistClient,
    shard: ShardId,
) -> Vec<((String, String), i64)> {
    // A sealed shard can be read at any time; read at the last one.
    at(&snapshot(rt, client, shard, TIMES), TIMES)
}

/// Two sinks (replicas) with the same desired collection write one shard;
/// one sees the input in one batch per time, the other late and in bigger
/// steps. Whoever wins each append, the shard ends up right at every time.
#[test]
fn two_replicas_converge() {
    for workers in [1, 4] {
        let rt = runtime();
        let client = rt.block_on(PersistClient::new_for_tests());
        let shard = ShardId::new();
        let _hold = hold_since(&rt, &client, shard);
        let handle = rt.handle().clone();
        let c = client.clone();
        let results = on_workers(workers, move |worker| {
            let collected = Rc::new(RefCell::new(Vec::new()));
            let a = Sink::new("replica-a", c.clone(), shard, handle.clone());
            let b = Sink::new("replica-b", c.clone(), shard, handle.clone());
            let (mut input_a, token_a) = worker.dataflow(|scope| sink_of(scope, a));
            let (mut input_b, token_b) = worker.dataflow(|scope| sink_of(scope, b));
            let sink_collected = Rc::clone(&collected);
            let (probe, _source) = worker
                .dataflow(|scope| read_back(scope, "reader", &c, shard, &handle, sink_collected));
            let me = worker.index();
            for t in 0..TIMES {
                for u in generated(me, t) {
                    input_a.send(u);
                }
                input_a.advance_to(t + 1);
                if t % 3 == 2 {
                    // Replica b catches up three times at once, in reverse.
                    for s in (t - 2..=t).rev() {
                        for u in generated(me, s).into_iter().rev() {
                            input_b.send(u);
                        }
                    }
                    input_b.advance_to(t + 1);
                }
                worker.step();
            }
            step_until(worker, "both replicas", || {
                !token_a.less_equal(&(TIMES - 1)) && !token_b.less_equal(&(TIMES - 1))
            });
            drop(input_a);
            drop(input_b);
            step_until(worker, "the read back", || probe.done());
            collected.borrow().clone()
        });
        let actual: Vec<Update> = results.into_iter().flatten().collect();
        let expected = expected(workers, TIMES);
        assert_equal_at(&actual, &expected, 0..TIMES + 2);
    }
}

/// A shard holding wrong contents (a previous writer's garbage) is
/// corrected by the sink: from its first append on, it equals the desired
/// collection.
#[test]
fn restarted_sink_corrects_wrong_contents() {
    for workers in [1, 4] {
        let rt = runtime();
        let client = rt.block_on(PersistClient::new_for_tests());
        let shard = ShardId::new();
        let _hold = hold_since(&rt, &client, shard);
        // The "previous incarnation" wrote garbage and half the truth up to 3.
        rt.block_on(async {
            let mut writer = client
                .open_writer::<Row, (), u64, i64>(
                    shard,
                    Arc::new(RecordSchema::default()),
                    Arc::new(Default::default()),
                    Diagnostics::for_tests(),
                )
                .await
                .expect("valid usage");
            let mut garbage = vec![
                ((Row::Data("garbage".into(), "x".into()), ()), 0u64, 1i64),
                ((Row::Data("garbage".into(), "y".into()), ()), 1, 3),
                ((Row::Error("stale error".into()), ()), 2, 1),
            ];
            garbage.extend(
                generated(0, 0)
                    .into_iter()
                    .map(|((k, v), t, r)| ((Row::Data(k, v), ()), t, 2 * r)),
            );
            writer
                .compare_and_append(&garbage, Antichain::from_elem(0), Antichain::from_elem(3))
                .await
                .expect("valid usage")
                .expect("upper matches");
            writer.expire().await;
        });
        let handle = rt.handle().clone();
        let c = client.clone();
        let results = on_workers(workers, move |worker| {
            let collected = Rc::new(RefCell::new(Vec::new()));
            let args = Sink::new("restarted", c.clone(), shard, handle.clone());
            let (mut input, token) = worker.dataflow(|scope| sink_of(scope, args));
            let sink_collected = Rc::clone(&collected);
            let (probe, _source) = worker
                .dataflow(|scope| read_back(scope, "reader", &c, shard, &handle, sink_collected));
            let me = worker.index();
            for t in 0..TIMES {
                for u in generated(me, t) {
                    input.send(u);
                }
                input.advance_to(t + 1);
            }
            step_until(worker, "the sink", || !token.less_equal(&(TIMES - 1)));
            drop(input);
            step_until(worker, "the read back", || probe.done());
            collected.borrow().clone()
        });
        let actual: Vec<Update> = results.into_iter().flatten().collect();
        let expected = expected(workers, TIMES);
        // Times before the old upper cannot be rewritten; from there on the
        // shard is right.
        assert_ne!(at(&actual, 0), at(&expected, 0));
        assert_equal_at(&actual, &expected, 3..TIMES + 2);
    }
}

/// A read-only sink writes nothing (not even its upper) while a writable
/// one beside it, fed the same input, gets everything written; switched to
/// writable, it catches up.
#[test]
fn read_only_writes_nothing_until_switched() {
    for workers in [1, 4] {
        let rt = runtime();
        let client = rt.block_on(PersistClient::new_for_tests());
        let (control, quiet) = (ShardId::new(), ShardId::new());
        let _holds = [
            hold_since(&rt, &client, control),
            hold_since(&rt, &client, quiet),
        ];
        let handle = rt.handle().clone();
        let c = client.clone();
        let results = on_workers(workers, move |worker| {
            let (tx, rx) = watch::channel(true);
            let (mut input, control_token, quiet_token) = worker.dataflow(|scope| {
                let (input, ok) = scope.new_input::<Update>();
                let (_e, errs) = scope.new_input::<(String, u64, i64)>();
                let ok = ok.as_collection();
                let errs = errs.as_collection();
                let writable = Sink::new("control", c.clone(), control, handle.clone());
                let control_token = persist_sink(ok.clone(), errs.clone(), writable);
                let read_only = Sink::new("quiet", c.clone(), quiet, handle.clone()).read_only(rx);
                let quiet_token = persist_sink(ok, errs, read_only);
                (input, control_token, quiet_token)
            });
            let me = worker.index();
            for t in 0..6 {
                for u in generated(me, t) {
                    input.send(u);
                }
                input.advance_to(t + 1);
            }
            step_until(worker, "the writable sink", || {
                !control_token.less_equal(&5)
            });
            let upper_before = handle
                .block_on(c.fetch_recent_upper::<Row, (), u64, i64>(quiet))
                .expect("upper");
            assert!(
                quiet_token.less_equal(&0),
                "nothing persisted by the read-only sink"
            );
            tx.send(false).expect("sink alive");
            step_until(worker, "the switched sink", || !quiet_token.less_equal(&5));
            drop(input);
            upper_before
        });
        for upper in results {
            assert_eq!(upper, Antichain::from_elem(0), "read-only wrote nothing");
        }
        let expected = expected(workers, 6);
        for shard in [control, quiet] {
            let contents = at(&snapshot(&rt, &client, shard, 5), 5);
            assert_eq!(contents, at(&expected, 5));
        }
    }
}

/// Errors of the desired error collection are written as error rows and
/// corrected like data.
#[test]
fn errors_roundtrip_as_error_rows() {
    let rt = runtime();
    let client = rt.block_on(PersistClient::new_for_tests());
    let shard = ShardId::new();
    let _hold = hold_since(&rt, &client, shard);
    let handle = rt.handle().clone();
    let c = client.clone();
    on_workers(2, move |worker| {
        let (mut oks, mut errs, token) = worker.dataflow(|scope| {
            let (oks, ok) = scope.new_input::<Update>();
            let (errs, err) = scope.new_input::<(String, u64, i64)>();
            let args = Sink::new("errors", c.clone(), shard, handle.clone());
            let token = persist_sink(ok.as_collection(), err.as_collection(), args);
            (oks, errs, token)
        });
        if worker.index() == 0 {
            oks.send((("k".into(), "v".into()), 0, 1));
            errs.send(("division by zero".into(), 1, 1));
            errs.send(("division by zero".into(), 3, -1));
        }
        oks.advance_to(5);
        errs.advance_to(5);
        step_until(worker, "the sink", || !token.less_equal(&4));
    });
    let err = ("error".to_owned(), "division by zero".to_owned());
    let kv = ("k".to_owned(), "v".to_owned());
    assert_eq!(
        at(&snapshot(&rt, &client, shard, 2), 2),
        vec![(err, 1), (kv.clone(), 1)]
    );
    assert_eq!(at(&snapshot(&rt, &client, shard, 4), 4), vec![(kv, 1)]);
}

/// A blob that counts the parts fetched from it (keys whose last segment
/// is a part id, `p...`).
#[derive(Debug)]
struct CountingBlob {
    inner: MemBlob,
    part_gets: Arc<AtomicUsize>,
}

#[async_trait::async_trait]
impl Blob for CountingBlob {
    async fn get(&self, key: &str) -> Result<Option<bytes::Bytes>, ExternalError> {
        if key
            .rsplit('/')
            .next()
            .is_some_and(|last| last.starts_with('p'))
        {
            self.part_gets.fetch_add(1, Ordering::SeqCst);
        }
        self.inner.get(key).await
    }

    async fn list_keys_and_metadata(
        &self,
        key_prefix: &str,
        f: &mut (dyn FnMut(BlobMetadata) + Send),
    ) -> Result<(), ExternalError> {
        self.inner.list_keys_and_metadata(key_prefix, f).await
    }

    async fn set(&self, key: &str, value: bytes::Bytes) -> Result<(), ExternalError> {
        self.inner.set(key, value).await
    }

    async fn delete(&self, key: &str) -> Result<Option<usize>, ExternalError> {
        self.inner.delete(key).await
    }
}

/// A sink alone on its shard writes every time without fetching a single
/// part: it accounts for its own appends from the batches it wrote instead
/// of reading them back. The shard still ends up right.
#[test]
fn sink_does_not_fetch_its_own_appends() {
    for workers in [1, 4] {
        let rt = runtime();
        let part_gets = Arc::new(AtomicUsize::new(0));
        let blob = CountingBlob {
            inner: MemBlob::new(),
            part_gets: Arc::clone(&part_gets),
        };
        let mut cfg = PersistConfig::new_for_tests();
        // Compaction reads parts too; this test is about the sink.
        cfg.compaction_enabled = false;
        let client = PersistClient::new(cfg, Arc::new(blob), Arc::new(MemConsensus::new()));
        let shard = ShardId::new();
        let _hold = hold_since(&rt, &client, shard);
        let handle = rt.handle().clone();
        let c = client.clone();
        on_workers(workers, move |worker| {
            let args = Sink::new("alone", c.clone(), shard, handle.clone());
            let (mut input, token) = worker.dataflow(|scope| sink_of(scope, args));
            let me = worker.index();
            for t in 0..TIMES {
                for u in generated(me, t) {
                    input.send(u);
                }
                input.advance_to(t + 1);
                worker.step();
            }
            step_until(worker, "the sink", || !token.less_equal(&(TIMES - 1)));
        });
        assert_eq!(
            part_gets.load(Ordering::SeqCst),
            0,
            "{workers} workers: the sink fetched parts it wrote"
        );
        let expected = expected(workers, TIMES);
        let actual = snapshot(&rt, &client, shard, TIMES - 1);
        assert_equal_at(&actual, &expected, [TIMES - 1]);
        assert!(part_gets.load(Ordering::SeqCst) > 0, "the check counts");
    }
}

/// Another writer appends wrong data between the sink's own appends (the
/// sink fetches that step, and not its own): from the next time on, the
/// sink has corrected it.
#[test]
fn sink_corrects_a_foreign_append_between_its_own() {
    for workers in [1, 4] {
        let rt = runtime();
        let client = rt.block_on(PersistClient::new_for_tests());
        let shard = ShardId::new();
        let _hold = hold_since(&rt, &client, shard);
        let handle = rt.handle().clone();
        let c = client.clone();
        const INTRUSION: u64 = 5;
        let results = on_workers(workers, move |worker| {
            let collected = Rc::new(RefCell::new(Vec::new()));
            let args = Sink::new("intruded", c.clone(), shard, handle.clone());
            let (mut input, token) = worker.dataflow(|scope| sink_of(scope, args));
            let sink_collected = Rc::clone(&collected);
            let (probe, _source) = worker
                .dataflow(|scope| read_back(scope, "reader", &c, shard, &handle, sink_collected));
            let me = worker.index();
            for t in 0..TIMES {
                if t == INTRUSION {
                    // Every worker's input is at INTRUSION, so the sink
                    // cannot append past it: the shard's upper is there.
                    step_until(worker, "the sink", || !token.less_equal(&(INTRUSION - 1)));
                    if me == 0 {
                        intrude(&handle, &c, shard, INTRUSION);
                    }
                }
                for u in generated(me, t) {
                    input.send(u);
                }
                input.advance_to(t + 1);
                worker.step();
            }
            step_until(worker, "the sink", || !token.less_equal(&(TIMES - 1)));
            drop(input);
            step_until(worker, "the read back", || probe.done());
            collected.borrow().clone()
        });
        let actual: Vec<Update> = results.into_iter().flatten().collect();
        let expected = expected(workers, TIMES);
        // Right before the intrusion, wrong at it (the sink cannot rewrite
        // a time once the upper passed it), right again after it.
        assert_equal_at(&actual, &expected, 0..INTRUSION);
        assert_ne!(at(&actual, INTRUSION), at(&expected, INTRUSION));
        assert_equal_at(&actual, &expected, INTRUSION + 1..TIMES + 2);
    }
}

/// Appends wrong rows at `time` as another writer would, if the shard's
/// upper is exactly `time`.
fn intrude(handle: &tokio::runtime::Handle, client: &PersistClient, shard: ShardId, time: u64) {
    handle.block_on(async {
        let mut writer = client
            .open_writer::<Row, (), u64, i64>(
                shard,
                Arc::new(RecordSchema::default()),
                Arc::new(Default::default()),
                Diagnostics::for_tests(),
            )
            .await
            .expect("valid usage");
        let wrong = vec![
            ((Row::Data("intruder".into(), "x".into()), ()), time, 1i64),
            ((Row::Data("w0-t0-1".into(), "v0".into()), ()), time, -1),
        ];
        writer
            .compare_and_append(
                &wrong,
                Antichain::from_elem(time),
                Antichain::from_elem(time + 1),
            )
            .await
            .expect("valid usage")
            .expect("the shard's upper is at the intrusion");
        writer.expire().await;
    });
}

/// A share too large for one batch is written as several, encoded in
/// parallel; an insert and its retraction at the same time may land in
/// different ones. The shard still holds exactly the desired collection.
#[test]
fn large_shares_split_into_several_batches() {
    const BIG: u64 = 30_000;
    for workers in [1, 4] {
        let rt = runtime();
        let client = rt.block_on(PersistClient::new_for_tests());
        let shard = ShardId::new();
        let _hold = hold_since(&rt, &client, shard);
        let handle = rt.handle().clone();
        let c = client.clone();
        on_workers(workers, move |worker| {
            let args = Sink::new("large", c.clone(), shard, handle.clone());
            let (mut input, token) = worker.dataflow(|scope| sink_of(scope, args));
            let me = worker.index();
            for i in 0..BIG {
                input.send(((format!("w{me}-big-{i:05}"), "v".to_owned()), 0, 1));
            }
            // Cancels the first insert, from the far end of the buffer.
            input.send(((format!("w{me}-big-00000"), "v".to_owned()), 0, -1));
            input.advance_to(1);
            input.send(((format!("w{me}-big-00001"), "v".to_owned()), 1, -1));
            input.advance_to(2);
            step_until(worker, "the sink", || !token.less_equal(&1));
        });
        for (time, dropped) in [(0, 1), (1, 2)] {
            let mut expected: Vec<((String, String), i64)> = (0..workers)
                .flat_map(|w| {
                    (dropped..BIG).map(move |i| ((format!("w{w}-big-{i:05}"), "v".to_owned()), 1))
                })
                .collect();
            expected.sort();
            let actual = at(&snapshot(&rt, &client, shard, time), time);
            assert_eq!(
                actual.len(),
                expected.len(),
                "{workers} workers, time {time}"
            );
            assert!(
                actual == expected,
                "{workers} workers: contents differ at {time}"
            );
        }
    }
}

/// Two replicas fed identically race for every append: each description
/// is written by both and appended by one. The loser puts the updates it
/// kept aside back, reads the winner's batch, and they cancel. Either way
/// the shard is right at every time, and neither replica rewrites it.
#[test]
fn identical_replicas_race_for_every_append() {
    for workers in [1, 4] {
        let rt = runtime();
        let client = rt.block_on(PersistClient::new_for_tests());
        let shard = ShardId::new();
        let _hold = hold_since(&rt, &client, shard);
        let handle = rt.handle().clone();
        let c = client.clone();
        let results = on_workers(workers, move |worker| {
            let collected = Rc::new(RefCell::new(Vec::new()));
            let (mut input, token_a, token_b) = worker.dataflow(|scope| {
                let (input, ok) = scope.new_input::<Update>();
                let (_e, errs) = scope.new_input::<(String, u64, i64)>();
                let (ok, errs) = (ok.as_collection(), errs.as_collection());
                let a = Sink::new("twin-a", c.clone(), shard, handle.clone());
                let b = Sink::new("twin-b", c.clone(), shard, handle.clone());
                let token_a = persist_sink(ok.clone(), errs.clone(), a);
                let token_b = persist_sink(ok, errs, b);
                (input, token_a, token_b)
            });
            let sink_collected = Rc::clone(&collected);
            let (probe, _source) = worker
                .dataflow(|scope| read_back(scope, "reader", &c, shard, &handle, sink_collected));
            let me = worker.index();
            for t in 0..TIMES {
                for u in generated(me, t) {
                    input.send(u);
                }
                input.advance_to(t + 1);
                worker.step();
            }
            step_until(worker, "both replicas", || {
                !token_a.less_equal(&(TIMES - 1)) && !token_b.less_equal(&(TIMES - 1))
            });
            drop(input);
            step_until(worker, "the read back", || probe.done());
            collected.borrow().clone()
        });
        let actual: Vec<Update> = results.into_iter().flatten().collect();
        let expected = expected(workers, TIMES);
        assert_equal_at(&actual, &expected, 0..TIMES + 2);
        // Nothing was written twice: every update read back is expected.
        let mut read: Vec<Update> = actual.clone();
        let mut want = expected.clone();
        differential_dataflow::consolidation::consolidate_updates(&mut read);
        differential_dataflow::consolidation::consolidate_updates(&mut want);
        assert_eq!(read, want, "{workers} workers: extra updates in the shard");
    }
}
