//! `persistcli dataflow-demo`: a timely dataflow maintains a derived
//! collection (a count per key of generated events) in a shard with
//! `persist_sink`, while a second dataflow follows the shard with
//! `shard_source`; at the end, what was read back must equal what was
//! desired, at every time.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use differential_dataflow::AsCollection;
use differential_dataflow::consolidation::consolidate_updates;
use differential_dataflow::operators::CountTotal;
use persist_client::PersistClient;
use persist_operators::{PersistSinkArgs, Record, ShardSourceArgs, persist_sink, shard_source};
use persist_types::{PersistLocation, ShardId};
use timely::dataflow::operators::vec::Input;
use timely::dataflow::operators::{Inspect, Probe};
use timely::progress::Antichain;

/// Gives up on a dataflow that stops making progress.
const STALL: Duration = Duration::from_secs(120);

/// Options of `persistcli dataflow-demo`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Timely worker threads.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=64))]
    workers: u64,
    /// How many times (rounds of events) to run.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    times: u64,
    /// Events per time, over all workers.
    #[arg(long, default_value_t = 1000)]
    events: u64,
    /// How many distinct keys the events use.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..))]
    keys: u64,
}

/// A row of the derived collection: a key and its event count, as text.
type Row = (String, String);
type Update = (Row, u64, i64);

/// The event `i` of time `t`: a key, inserted, and at odd times also the
/// retraction of an event of the previous time (so counts go down too).
fn events(t: u64, i: u64, keys: u64) -> Vec<(String, u64, i64)> {
    let key = |n: u64| format!("key-{:03}", n.wrapping_mul(2_654_435_761) % keys);
    let mut out = vec![(key(t * 7919 + i), t, 1)];
    if !t.is_multiple_of(2) && i.is_multiple_of(3) {
        out.push((key((t - 1) * 7919 + i), t, -1));
    }
    out
}

/// What the derived collection should hold: the count of every key with
/// events, at every time.
fn desired(args: &Args) -> Vec<Update> {
    let mut out = Vec::new();
    let mut counts: BTreeMap<String, i64> = BTreeMap::new();
    for t in 0..args.times {
        let before = counts.clone();
        for i in 0..args.events {
            for (key, _, diff) in events(t, i, args.keys) {
                *counts.entry(key).or_default() += diff;
            }
        }
        for (key, count) in &before {
            if counts.get(key) != Some(count) && *count != 0 {
                out.push(((key.clone(), count.to_string()), t, -1));
            }
        }
        for (key, count) in &counts {
            if before.get(key) != Some(count) && *count != 0 {
                out.push(((key.clone(), count.to_string()), t, 1));
            }
        }
    }
    out
}

/// The contents of `updates` at `time`.
fn at(updates: &[Update], time: u64) -> Vec<Update> {
    let mut out: Vec<Update> = updates
        .iter()
        .filter(|(_, t, _)| *t <= time)
        .map(|(row, _, diff)| (row.clone(), time, *diff))
        .collect();
    consolidate_updates(&mut out);
    out
}

/// Runs the demo, printing progress; fails if the dataflow fails or stalls
/// or if what was read back differs from what was desired.
pub async fn run(location: &PersistLocation, client: &PersistClient, args: &Args) -> Result<()> {
    let shard = ShardId::new();
    println!("location   {location}");
    println!("shard id: {shard}");
    let runtime = tokio::runtime::Handle::current();
    let (workers, times, events_per_time, keys) =
        (args.workers, args.times, args.events, args.keys);
    let client = client.clone();
    let start = Instant::now();
    let results = tokio::task::spawn_blocking(move || {
        let workers = usize::try_from(workers).unwrap_or(1);
        timely::execute(timely::Config::process(workers), move |worker| {
            run_worker(
                worker,
                &client,
                shard,
                &runtime,
                times,
                events_per_time,
                keys,
            )
        })
        .map_err(|err| anyhow!("start timely: {err}"))
        .map(|guards| guards.join())
    })
    .await
    .context("the dataflow thread")??;
    let elapsed = start.elapsed();
    let mut read = Vec::new();
    for result in results {
        let worker = result.map_err(|err| anyhow!("a worker panicked: {err}"))?;
        read.extend(worker.map_err(|err| anyhow!("a worker failed: {err}"))?);
    }
    let desired = desired(args);
    for t in 0..times {
        let (want, got) = (at(&desired, t), at(&read, t));
        if want != got {
            bail!(
                "at time {t} the shard holds {} rows but {} were desired (first difference: {:?})",
                got.len(),
                want.len(),
                want.iter().zip(&got).find(|(w, g)| w != g).or(None)
            );
        }
    }
    let rows = at(&desired, times - 1).len();
    println!(
        "sink -> shard -> source: {} events in {times} times, {rows} keys, {:.2} s",
        times * events_per_time,
        elapsed.as_secs_f64()
    );
    println!(
        "verified: what the source read equals the desired collection at every time 0..{times}"
    );
    Ok(())
}

/// One worker: feeds its share of the events, and returns the updates its
/// part of the source read.
fn run_worker(
    worker: &mut timely::worker::Worker,
    client: &PersistClient,
    shard: ShardId,
    runtime: &tokio::runtime::Handle,
    times: u64,
    events_per_time: u64,
    keys: u64,
) -> Result<Vec<Update>, String> {
    let sink_args = PersistSinkArgs::<String, String, String>::new(
        "dataflow-demo-sink",
        client.clone(),
        shard,
        runtime.clone(),
    );
    let (mut input, sink) = worker.dataflow(|scope| {
        let (input, events) = scope.new_input::<(String, u64, i64)>();
        let (_no_errors, errors) = scope.new_input::<(String, u64, i64)>();
        let counts = events
            .as_collection()
            .count_total_core::<i64>()
            .map(|(key, count)| (key, count.to_string()));
        let token = persist_sink(counts, errors.as_collection(), sink_args);
        (input, token)
    });
    let read = Rc::new(RefCell::new(Vec::new()));
    let collected = Rc::clone(&read);
    let source_args = ShardSourceArgs::<Record<String, String, String>, (), u64>::new(
        "dataflow-demo-reader",
        client.clone(),
        shard,
        runtime.clone(),
    )
    .as_of(Antichain::from_elem(0));
    let (probe, source) = worker.dataflow(|scope| {
        let out = shard_source::<_, _, u64, i64, _>(scope, source_args, |_, _| true);
        let (probe, _) = out
            .ok
            .inner
            .inspect(move |((record, ()), t, r)| {
                if let Record::Data(k, v) = record {
                    collected
                        .borrow_mut()
                        .push(((k.clone(), v.clone()), *t, *r));
                }
            })
            .probe();
        (probe, out.token)
    });
    let (me, peers) = (worker.index() as u64, worker.peers() as u64);
    let mut last_progress = Instant::now();
    let mut step_until = |worker: &mut timely::worker::Worker, target: u64| -> Result<(), String> {
        let mut seen = Antichain::from_elem(0);
        while probe.less_than(&target) {
            worker.step_or_park(Some(Duration::from_millis(5)));
            let now = probe.with_frontier(|f| f.to_owned());
            if now != seen {
                seen = now;
                last_progress = Instant::now();
            } else if last_progress.elapsed() > STALL {
                return Err(format!("no progress for {STALL:?} at {seen:?}"));
            }
        }
        Ok(())
    };
    for t in 0..times {
        for i in (me..events_per_time).step_by(peers as usize) {
            for event in events(t, i, keys) {
                input.send(event);
            }
        }
        input.advance_to(t + 1);
        // Keep at most two times in flight between the input and the reader.
        if t >= 2 {
            step_until(worker, t - 1)?;
        }
        if me == 0 {
            let persisted = sink.persisted_frontier();
            let reader = probe.with_frontier(|f| f.to_owned());
            println!(
                "time {t:>4}: input closed up to {}, shard written up to {:?}, reader at {:?}",
                t + 1,
                persisted.elements(),
                reader.elements()
            );
        }
    }
    step_until(worker, times)?;
    drop(source);
    drop(sink);
    let read = read.borrow().clone();
    Ok(read)
}
