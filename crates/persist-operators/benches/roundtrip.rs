//! Round trip `persist_sink` -> shard -> `shard_source`, beside a baseline
//! measured in the same run on the same backend: one process appending with
//! `compare_and_append` while a listen reads the shard back.
//!
//! Both sides write `--times` batches of `--updates` updates (one batch per
//! time) with at most `--window` times in flight (written but not yet read
//! back), into a fresh shard on a `file://` blob and `sqlite://` consensus in
//! a temporary directory. Reported per run: updates/s end to end, and the
//! frontier lag (from time `t` being complete at the writer, i.e. the
//! baseline starting its append or the operators' input advancing past `t`,
//! to the reader's frontier passing `t`), p50 and p99.
//!
//! ```sh
//! cargo bench -p persist-operators --bench roundtrip -- [--updates 20000] [--times 40] [--window 4] [--workers 1,2]
//! ```

#![allow(clippy::print_stdout, clippy::unwrap_used)]

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use differential_dataflow::AsCollection;
use persist::{open_blob, open_consensus};
use persist_client::{Diagnostics, ListenEvent, PersistClient, PersistConfig};
use persist_operators::{PersistSinkArgs, Record, ShardSourceArgs, persist_sink, shard_source};
use persist_types::{PersistLocation, ShardId, SimpleSchema};
use timely::dataflow::operators::Probe;
use timely::dataflow::operators::vec::Input;
use timely::progress::Antichain;

#[derive(Debug, Clone)]
struct Opts {
    updates: u64,
    times: u64,
    window: u64,
    workers: Vec<usize>,
}

fn opts() -> Opts {
    let mut opts = Opts {
        updates: 20_000,
        times: 40,
        window: 4,
        workers: vec![1, 2],
    };
    let args: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < args.len() {
        let value = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--updates" => opts.updates = value.parse().unwrap(),
            "--times" => opts.times = value.parse().unwrap(),
            "--window" => opts.window = value.parse().unwrap(),
            "--workers" => opts.workers = value.split(',').map(|w| w.parse().unwrap()).collect(),
            _ => {
                // `cargo bench` passes `--bench`; ignore what we do not know.
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    opts
}

fn key(time: u64, i: u64) -> String {
    format!("key-{:08}-{:06}", i, time)
}

async fn client_of(dir: &std::path::Path) -> PersistClient {
    let location = PersistLocation::embedded(dir);
    let blob = open_blob(&location.blob_uri).await.unwrap();
    let consensus = open_consensus(&location.consensus_uri).await.unwrap();
    PersistClient::new(PersistConfig::default(), blob, consensus)
}

/// What one run measured.
#[derive(Debug)]
struct Run {
    elapsed: Duration,
    lags: Vec<Duration>,
}

impl Run {
    fn rate(&self, opts: &Opts) -> f64 {
        (opts.updates * opts.times) as f64 / self.elapsed.as_secs_f64()
    }

    fn lag(&self, q: f64) -> Duration {
        let mut lags = self.lags.clone();
        lags.sort();
        let i = ((lags.len() as f64 - 1.0) * q).round() as usize;
        lags.get(i).copied().unwrap_or_default()
    }
}

/// The baseline: `compare_and_append` one batch per time while a listen in
/// another task reads (and fetches) everything back.
fn baseline(rt: &tokio::runtime::Runtime, opts: &Opts) -> Run {
    let dir = tempfile::tempdir().unwrap();
    rt.block_on(async {
        let client = client_of(dir.path()).await;
        let shard = ShardId::new();
        let (mut write, read) = client
            .open::<String, String, u64, i64>(
                shard,
                Arc::new(SimpleSchema::new()),
                Arc::new(SimpleSchema::new()),
                Diagnostics::from_purpose("bench baseline"),
            )
            .await
            .unwrap();
        let (progress_tx, mut progress_rx) = tokio::sync::watch::channel(0u64);
        let times = opts.times;
        let reader = tokio::spawn(async move {
            let mut listen = read.listen(Antichain::from_elem(0)).await.unwrap();
            let mut seen = Vec::new();
            let mut frontier = 0;
            while frontier < times {
                for event in listen.fetch_next().await.unwrap() {
                    match event {
                        ListenEvent::Updates(updates) => {
                            std::hint::black_box(updates.len());
                        }
                        ListenEvent::Progress(p) => {
                            frontier = p.as_option().copied().unwrap_or(u64::MAX);
                            seen.push((frontier, Instant::now()));
                            let _ = progress_tx.send(frontier);
                        }
                    }
                }
            }
            listen.expire().await;
            seen
        });
        let start = Instant::now();
        let mut finished = Vec::new();
        for t in 0..opts.times {
            while t >= *progress_rx.borrow() + opts.window {
                progress_rx.changed().await.unwrap();
            }
            let updates: Vec<((String, String), u64, i64)> = (0..opts.updates)
                .map(|i| ((key(t, i), format!("v{i}")), t, 1))
                .collect();
            // Time `t` is complete from here on: the same moment as the
            // operators' input advancing past it.
            finished.push(Instant::now());
            write
                .compare_and_append(
                    &updates,
                    Antichain::from_elem(t),
                    Antichain::from_elem(t + 1),
                )
                .await
                .unwrap()
                .unwrap();
        }
        let seen = reader.await.unwrap();
        let elapsed = start.elapsed();
        write.expire().await;
        Run {
            elapsed,
            lags: lags(&finished, &seen),
        }
    })
}

/// For each time `t`, the wait from `finished[t]` to the first progress
/// past `t`.
fn lags(finished: &[Instant], seen: &[(u64, Instant)]) -> Vec<Duration> {
    finished
        .iter()
        .enumerate()
        .filter_map(|(t, done)| {
            let t = t as u64;
            seen.iter()
                .find(|(f, _)| *f > t)
                .map(|(_, at)| at.saturating_duration_since(*done))
        })
        .collect()
}

/// The operators: every worker feeds its share of each time into a
/// `persist_sink`; a `shard_source` reads the shard back.
fn operators(rt: &tokio::runtime::Runtime, opts: &Opts, workers: usize) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let client = rt.block_on(client_of(dir.path()));
    let shard = ShardId::new();
    let handle = rt.handle().clone();
    let timings = Arc::new(Mutex::new(None));
    let results = Arc::clone(&timings);
    let opts = opts.clone();
    timely::execute(timely::Config::process(workers), move |worker| {
        let me = worker.index() as u64;
        let peers = worker.peers() as u64;
        let sink = PersistSinkArgs::<String, String, String>::new(
            "bench-sink",
            client.clone(),
            shard,
            handle.clone(),
        );
        let (mut input, token) = worker.dataflow(|scope| {
            let (input, ok) = scope.new_input::<((String, String), u64, i64)>();
            let (_errs, err) = scope.new_input::<(String, u64, i64)>();
            let token = persist_sink(ok.as_collection(), err.as_collection(), sink);
            (input, token)
        });
        let source = ShardSourceArgs::<Record<String, String, String>, (), u64>::new(
            "bench-reader",
            client.clone(),
            shard,
            handle.clone(),
        )
        .as_of(Antichain::from_elem(0));
        let (probe, _source) = worker.dataflow(|scope| {
            let out = shard_source::<_, _, u64, i64, _>(scope, source, |_, _| true);
            let (probe, _) = out.ok.inner.probe();
            (probe, out.token)
        });
        let seen = Rc::new(RefCell::new(Vec::new()));
        let record = |probe: &timely::dataflow::operators::probe::Handle<u64>| {
            let f = probe.with_frontier(|f| f.as_option().copied().unwrap_or(u64::MAX));
            let mut seen = seen.borrow_mut();
            if seen.last().is_none_or(|(last, _)| *last < f) {
                seen.push((f, Instant::now()));
            }
        };
        let start = Instant::now();
        let mut finished = Vec::new();
        for t in 0..opts.times {
            while probe.less_than(&(t.saturating_sub(opts.window) + 1)) && t >= opts.window {
                worker.step_or_park(Some(Duration::from_millis(1)));
                record(&probe);
            }
            for i in (me..opts.updates).step_by(peers as usize) {
                input.send(((key(t, i), format!("v{i}")), t, 1));
            }
            input.advance_to(t + 1);
            finished.push(Instant::now());
            worker.step();
            record(&probe);
        }
        while probe.less_than(&opts.times) {
            worker.step_or_park(Some(Duration::from_millis(1)));
            record(&probe);
        }
        let elapsed = start.elapsed();
        drop(input);
        drop(token);
        if me == 0 {
            let lags = lags(&finished, &seen.borrow());
            *results.lock().unwrap() = Some(Run { elapsed, lags });
        }
    })
    .unwrap()
    .join();
    timings.lock().unwrap().take().unwrap()
}

fn main() {
    let opts = opts();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!(
        "roundtrip: {} times x {} updates, window {}, file:// blob + sqlite:// consensus",
        opts.times, opts.updates, opts.window
    );
    let base = baseline(&rt, &opts);
    let row = |name: &str, run: &Run| {
        println!(
            "{name:<28} {:>12.0} updates/s  lag p50 {:>7.1} ms  p99 {:>7.1} ms  ratio {:.2}",
            run.rate(&opts),
            run.lag(0.5).as_secs_f64() * 1e3,
            run.lag(0.99).as_secs_f64() * 1e3,
            run.rate(&opts) / base.rate(&opts),
        );
    };
    row("baseline (append + listen)", &base);
    for &workers in &opts.workers {
        let run = operators(&rt, &opts, workers);
        row(&format!("sink -> source, {workers} worker(s)"), &run);
    }
}
