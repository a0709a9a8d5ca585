//! `persistcli bench`: an open-loop load generator on a fresh shard, and a
//! report of the shard's health (batches in state, state size, consensus
//! entries, blob bytes against live data, time to open).
//!
//! Writers append small batches on a fixed schedule; latency is measured
//! from each append's *scheduled* time, so a slow append delays the ones
//! behind it on the clock and is not hidden (no coordinated omission).
//! Every append is one batch `[t, t + 1)` at the shard's upper `t`: a
//! writer that loses the race for `t` (an `UpperMismatch`) retries at the
//! upper it was told, so the shard's times stay contiguous however many
//! writers there are.
//!
//! Only the public API of `persist-client` is used for the shard, plus the
//! location's raw [`Blob`] and [`Consensus`] for what the client does not
//! report (the size of the latest consensus entry, the entries in the log,
//! every blob under the shard's prefix).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use hdrhistogram::Histogram;
use indicatif::HumanBytes;
use persist::{Blob, Consensus, SeqNo, open_blob, open_consensus};
use persist_client::{ListenEvent, PersistClient, PersistConfig, ReadHandle, WriteHandle};
use persist_types::{PersistLocation, ShardId};
use serde_json::{Value, json};
use timely::progress::Antichain;
use tokio::sync::watch;

use crate::types::{self, Diff, Key, Time, Update, Val};

/// The targets the summary checks, as stated for the shard's health after
/// many small appends with the since following the upper.
const STATE_BYTES_LIMIT: u64 = 64 << 10;
/// Total blob bytes may be at most this many times the live data.
const BLOB_RATIO_LIMIT: f64 = 2.0;
/// Opening the shard may take at most this many times opening an empty one.
const OPEN_RATIO_LIMIT: f64 = 2.0;
/// How often the since follower downgrades its since.
const SINCE_FOLLOW_INTERVAL: Duration = Duration::from_millis(100);
/// How long readers may take to catch up with the final upper once the
/// writers are done, before the bench gives up on them.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(120);
/// How many times each periodic line opens the shard and the baseline
/// (it shows the fastest of each).
const TICK_OPEN_ROUNDS: u32 = 3;
/// The largest latency the histograms hold, in microseconds (1 hour);
/// longer ones are recorded as this.
const MAX_LATENCY_US: u64 = 3_600_000_000;

/// Options of `persistcli bench`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// How long to append for, e.g. `10s`, `500ms`, `2m` (ignored with
    /// `--appends`).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Stop after this many appends instead of after `--duration`.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    appends: Option<u64>,
    /// Target appends per second, in total over all writers; 0 means as
    /// fast as they go (latency is then each append's own time).
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// How many writers append concurrently (each with its own handle).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    writers: u64,
    /// How many readers listen from the start, counting what they receive.
    #[arg(long, default_value_t = 1)]
    readers: u64,
    /// How many updates each append holds.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    batch_size: u64,
    /// How many distinct keys (each with one value) the updates use, so
    /// that the shard's data consolidates to at most this many records.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    key_space: u64,
    /// Whether a since follower keeps the shard's since at its upper minus
    /// one, so the shard can compact. With `false`, a reader holds the
    /// since at time 0 for the whole run.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    since_follows_upper: bool,
    /// How often to print a line of rates, latencies and shard health.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    report_interval: Duration,
    /// Print the final summary as JSON on stdout (the periodic lines then
    /// go to stderr).
    #[arg(long)]
    json: bool,
    /// Exit non-zero if any of the shard-health checks fails.
    #[arg(long)]
    check: bool,
    /// Keep the shards afterwards (by default the bench closes and
    /// finalizes them and truncates their consensus logs).
    #[arg(long)]
    keep: bool,
    /// Stop appending early once the shard's latest consensus entry is
    /// larger than this many bytes: a guard against a state that grows
    /// with the appends (compaction not keeping up), which would make each
    /// append slower than the last.
    #[arg(long, default_value_t = 1 << 20)]
    max_state_bytes: u64,
    /// How many times to open the shard and the empty baseline shard, each
    /// with a fresh client, for the final open-time ratio (medians).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    open_rounds: u64,
}

/// `10s`, `250ms`, `2m`, `1.5s` or a bare number of seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (number, unit) = match s.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let number: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 10s, 500ms or 2m"))?;
    let secs = match unit {
        "ms" => number / 1e3,
        "s" => number,
        "m" => number * 60.0,
        "h" => number * 3600.0,
        _ => {
            return Err(format!(
                "unknown unit {unit:?} in {s:?} (use ms, s, m or h)"
            ));
        }
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{s:?}: {e}"))
}

/// The location's backends, the client on them, and the bench's shards.
#[derive(Debug)]
struct Ctx {
    client: PersistClient,
    cfg: PersistConfig,
    /// The raw backends the client runs on (shared, so that `mem://`
    /// locations are the same store), for what the client does not show
    /// and for fresh clients.
    blob: Arc<dyn Blob>,
    consensus: Arc<dyn Consensus>,
    /// The shard under load.
    shard: ShardId,
    /// An empty shard, opened to time a fresh open against.
    baseline: ShardId,
}

impl Ctx {
    /// A client with a state cache of its own on the same backends.
    fn fresh_client(&self) -> PersistClient {
        PersistClient::new(
            self.cfg.clone(),
            Arc::clone(&self.blob),
            Arc::clone(&self.consensus),
        )
    }
}

/// Latencies in microseconds: since the last report and over the run.
#[derive(Debug)]
struct Latencies {
    interval: Histogram<u64>,
    total: Histogram<u64>,
}

impl Latencies {
    fn new() -> Result<Self> {
        let hist = || Histogram::new_with_bounds(1, MAX_LATENCY_US, 3);
        Ok(Latencies {
            interval: hist().context("latency histogram")?,
            total: hist().context("latency histogram")?,
        })
    }

    fn record(&mut self, latency: Duration) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        let us = us.clamp(1, MAX_LATENCY_US);
        self.interval.saturating_record(us);
        self.total.saturating_record(us);
    }
}

/// Milliseconds at quantile `q` of `hist` (0 when empty).
fn quantile_ms(hist: &Histogram<u64>, q: f64) -> f64 {
    if hist.is_empty() {
        0.0
    } else {
        hist.value_at_quantile(q) as f64 / 1e3
    }
}

/// What writers, readers and the reporter share.
#[derive(Debug)]
struct Shared {
    start: Instant,
    /// The next append to schedule, counting from 0.
    tickets: AtomicU64,
    /// The time between scheduled appends (`None`: unlimited rate).
    interval: Option<Duration>,
    /// Stop after this many appends.
    appends: Option<u64>,
    /// Stop scheduling appends at this time (when `appends` is `None`).
    end: Instant,
    /// Set to stop scheduling appends (an error, or the state-size guard).
    stop: AtomicBool,
    stopped_early: Mutex<Option<String>>,
    committed: AtomicU64,
    updates: AtomicU64,
    /// Appends retried because another writer took their time.
    conflicts: AtomicU64,
    /// The shard's upper after the latest committed append.
    upper: AtomicU64,
    /// When the append at each time committed, for listen delays.
    commit_times: Mutex<HashMap<Time, Instant>>,
    append_latency: Mutex<Latencies>,
    listen_delay: Mutex<Latencies>,
    /// Per reader: the sum of the diffs received, and the listen's
    /// frontier.
    received: Vec<AtomicU64>,
    frontiers: Vec<AtomicU64>,
}

impl Shared {
    /// When the `ticket`th append is due, or `None` if it is not to be
    /// made.
    fn schedule(&self, ticket: u64) -> Option<Instant> {
        if self.stop.load(Ordering::Relaxed) {
            return None;
        }
        if let Some(appends) = self.appends
            && ticket >= appends
        {
            return None;
        }
        let due = match self.interval {
            Some(interval) => self.start + interval.mul_f64(ticket as f64),
            None => Instant::now(),
        };
        if self.appends.is_none() && due >= self.end {
            return None;
        }
        Some(due)
    }

    fn stop_early(&self, reason: String) {
        let mut stopped = self.stopped_early.lock().unwrap_or_else(|p| p.into_inner());
        stopped.get_or_insert(reason);
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Runs the bench, printing a line every report interval and a summary.
pub async fn run(location: &PersistLocation, args: &Args) -> Result<()> {
    if !(args.rate >= 0.0 && args.rate.is_finite()) {
        bail!("--rate must be a number >= 0, not {}", args.rate);
    }
    if args.report_interval.is_zero() {
        bail!("--report-interval must be positive");
    }
    let blob = open_blob(&location.blob_uri)
        .await
        .context("open blob store")?;
    let consensus = open_consensus(&location.consensus_uri)
        .await
        .context("open consensus")?;
    let cfg = PersistConfig::default();
    let ctx = Arc::new(Ctx {
        client: PersistClient::new(cfg.clone(), Arc::clone(&blob), Arc::clone(&consensus)),
        cfg,
        blob,
        consensus,
        shard: ShardId::new(),
        baseline: ShardId::new(),
    });
    let result = bench(&ctx, location, args).await;
    if !args.keep {
        for shard in [ctx.shard, ctx.baseline] {
            if let Err(err) = remove(&ctx, shard).await {
                tracing::warn!(%shard, "could not remove the bench's shard: {err:#}");
            }
        }
    }
    let summary = result?;
    let failed: Vec<&str> = summary
        .checks
        .iter()
        .filter(|c| !c.pass)
        .map(|c| c.name)
        .collect();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary.json)?);
    } else {
        print!("{}", summary.text);
    }
    if args.check && !failed.is_empty() {
        bail!("shard-health checks failed: {}", failed.join(", "));
    }
    Ok(())
}

/// One shard-health check of the summary.
#[derive(Debug)]
struct Check {
    name: &'static str,
    pass: bool,
}

/// The final summary, as text and as JSON.
#[derive(Debug)]
struct Summary {
    text: String,
    json: Value,
    checks: Vec<Check>,
}

async fn bench(ctx: &Arc<Ctx>, location: &PersistLocation, args: &Args) -> Result<Summary> {
    let shard = ctx.shard;
    // Time 0 stays empty so that a listen from 0 sees every update; the
    // baseline shard is created (empty) now, to be opened later.
    let mut setup = open_writer(ctx, shard, "persistcli bench setup").await?;
    setup
        .advance_upper(&Antichain::from_elem(1))
        .await
        .map_err(|err| types::explain(shard, err))?;
    setup.expire().await;
    ctx.client
        .fetch_recent_upper::<Key, Val, Time, Diff>(ctx.baseline)
        .await
        .map_err(|err| types::explain(ctx.baseline, err))?;

    let readers = usize::try_from(args.readers).context("--readers")?;
    let start = Instant::now();
    let shared = Arc::new(Shared {
        start,
        tickets: AtomicU64::new(0),
        interval: (args.rate > 0.0).then(|| Duration::from_secs_f64(1.0 / args.rate)),
        appends: args.appends,
        end: start + args.duration,
        stop: AtomicBool::new(false),
        stopped_early: Mutex::new(None),
        committed: AtomicU64::new(0),
        updates: AtomicU64::new(0),
        conflicts: AtomicU64::new(0),
        upper: AtomicU64::new(1),
        commit_times: Mutex::new(HashMap::new()),
        append_latency: Mutex::new(Latencies::new()?),
        listen_delay: Mutex::new(Latencies::new()?),
        received: (0..readers).map(|_| AtomicU64::new(0)).collect(),
        frontiers: (0..readers).map(|_| AtomicU64::new(0)).collect(),
    });

    // The final upper, once the writers are done: readers stop there.
    let (final_tx, final_rx) = watch::channel(None::<Time>);
    let mut reader_tasks = Vec::new();
    for i in 0..readers {
        let read = open_reader(ctx, shard, &format!("persistcli bench reader {i}")).await?;
        let listen = read
            .listen(Antichain::from_elem(0))
            .await
            .map_err(|err| types::explain(shard, err))?;
        reader_tasks.push(tokio::spawn(listen_task(
            listen,
            i,
            Arc::clone(&shared),
            final_rx.clone(),
        )));
    }
    let (since_stop_tx, since_stop_rx) = watch::channel(false);
    let since_read = open_reader(ctx, shard, "persistcli bench since").await?;
    let since_task = tokio::spawn(since_task(
        since_read,
        args.since_follows_upper,
        Arc::clone(&shared),
        since_stop_rx,
    ));
    let mut writer_tasks = Vec::new();
    for i in 0..args.writers {
        let write = open_writer(ctx, shard, &format!("persistcli bench writer {i}")).await?;
        writer_tasks.push(tokio::spawn(write_task(
            write,
            Arc::clone(&shared),
            args.batch_size,
            args.key_space,
        )));
    }
    let (report_stop_tx, report_stop_rx) = watch::channel(false);
    let reporter = tokio::spawn(report_task(
        Arc::clone(ctx),
        Arc::clone(&shared),
        args.report_interval,
        args.max_state_bytes,
        args.json,
        report_stop_rx,
    ));

    let mut counts = vec![0i64; usize::try_from(args.key_space).context("--key-space")?];
    let mut error = None;
    for task in writer_tasks {
        match task.await.context("writer task")? {
            Ok(written) => {
                for (total, n) in counts.iter_mut().zip(written) {
                    *total += n;
                }
            }
            Err(err) => {
                shared.stop.store(true, Ordering::Relaxed);
                error.get_or_insert(err);
            }
        }
    }
    let elapsed = start.elapsed();
    let upper = shared.upper.load(Ordering::Relaxed);
    final_tx.send_replace(Some(upper));
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        for task in reader_tasks {
            match task.await.context("reader task")? {
                Ok(()) => {}
                Err(err) => return Err(err),
            }
        }
        Ok(())
    })
    .await;
    let listen_drain = start.elapsed() - elapsed;
    let drained = match drained {
        Ok(Ok(())) => true,
        Ok(Err(err)) => {
            error.get_or_insert(err);
            false
        }
        Err(_) => false,
    };
    since_stop_tx.send_replace(true);
    if let Err(err) = since_task.await.context("since task")? {
        error.get_or_insert(err);
    }
    report_stop_tx.send_replace(true);
    if let Err(err) = reporter.await.context("report task")? {
        error.get_or_insert(err);
    }
    if let Some(err) = error {
        return Err(err);
    }

    // What the shard looks like the moment the load stops, and after the
    // maintenance the writers' background work would finish next (merges
    // and garbage collection), done here at once.
    let at_end = health(ctx).await?;
    maintain(ctx).await?;
    let health = health(ctx).await?;
    let (open_ms, baseline_ms) = open_times(ctx, args.open_rounds).await?;
    let consolidated = consolidated_bytes(ctx, &counts).await?;
    Ok(summarize(
        location,
        ctx,
        args,
        &shared,
        Finished {
            elapsed,
            upper,
            drained,
            listen_drain,
            health,
            at_end,
            open_ms,
            baseline_ms,
            consolidated,
            live_records: counts.iter().filter(|c| **c != 0).count() as u64,
        },
    ))
}

async fn open_writer(
    ctx: &Ctx,
    shard: ShardId,
    purpose: &str,
) -> Result<WriteHandle<Key, Val, Time, Diff>> {
    ctx.client
        .open_writer(
            shard,
            types::schema(),
            types::schema(),
            types::diagnostics(purpose),
        )
        .await
        .map_err(|err| types::explain(shard, err))
}

async fn open_reader(
    ctx: &Ctx,
    shard: ShardId,
    purpose: &str,
) -> Result<ReadHandle<Key, Val, Time, Diff>> {
    ctx.client
        .open_leased_reader(
            shard,
            types::schema(),
            types::schema(),
            types::diagnostics(purpose),
        )
        .await
        .map_err(|err| types::explain(shard, err))
}

/// Appends on schedule until the run ends; returns how many times it
/// appended each key (its contribution to the consolidated data).
async fn write_task(
    mut write: WriteHandle<Key, Val, Time, Diff>,
    shared: Arc<Shared>,
    batch_size: u64,
    key_space: u64,
) -> Result<Vec<i64>> {
    let result = write_loop(&mut write, &shared, batch_size, key_space).await;
    if result.is_err() {
        shared.stop.store(true, Ordering::Relaxed);
    }
    write.expire().await;
    result
}

async fn write_loop(
    write: &mut WriteHandle<Key, Val, Time, Diff>,
    shared: &Shared,
    batch_size: u64,
    key_space: u64,
) -> Result<Vec<i64>> {
    let shard = write.shard_id();
    let mut counts = vec![0i64; usize::try_from(key_space).context("--key-space")?];
    loop {
        let ticket = shared.tickets.fetch_add(1, Ordering::Relaxed);
        let Some(due) = shared.schedule(ticket) else {
            return Ok(counts);
        };
        tokio::time::sleep_until(due.into()).await;
        // Other writers' appends through this process are in the shared
        // state at once: start from the newest upper seen.
        let mut time = upper_of(&write.shared_upper())
            .max(upper_of(write.upper()))
            .ok_or_else(|| anyhow!("shard {shard} was closed during the bench"))?;
        loop {
            let updates = generate(ticket, time, batch_size, key_space);
            let appended = write
                .compare_and_append(
                    &updates,
                    Antichain::from_elem(time),
                    Antichain::from_elem(time + 1),
                )
                .await
                .map_err(|err| types::explain(shard, err))
                .with_context(|| format!("append at time {time}"))?;
            match appended {
                Ok(()) => break,
                Err(mismatch) => {
                    shared.conflicts.fetch_add(1, Ordering::Relaxed);
                    time = upper_of(&mismatch.current)
                        .ok_or_else(|| anyhow!("shard {shard} was closed during the bench"))?;
                }
            }
        }
        let done = Instant::now();
        shared
            .commit_times
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(time, done);
        shared
            .append_latency
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .record(done.saturating_duration_since(due));
        shared.upper.fetch_max(time + 1, Ordering::Relaxed);
        shared.committed.fetch_add(1, Ordering::Relaxed);
        shared.updates.fetch_add(batch_size, Ordering::Relaxed);
        for i in 0..batch_size {
            let k = key_index(ticket * batch_size + i, key_space);
            if let Some(count) = counts.get_mut(usize::try_from(k).unwrap_or(usize::MAX)) {
                *count += 1;
            }
        }
    }
}

/// The single time of a `u64` frontier (`None` if it is empty).
fn upper_of(frontier: &Antichain<Time>) -> Option<Time> {
    frontier.as_option().copied()
}

/// The key index of the `n`th update: scattered over the key space.
fn key_index(n: u64, key_space: u64) -> u64 {
    crate::demo::mix(n) % key_space
}

/// The updates of the `ticket`th append, all at `time`: inserts of the
/// (one) value of scattered keys.
fn generate(ticket: u64, time: Time, batch_size: u64, key_space: u64) -> Vec<Update> {
    (0..batch_size)
        .map(|i| record(key_index(ticket * batch_size + i, key_space), time, 1))
        .collect()
}

/// The update of key `k`: its key and value depend only on `k`, so equal
/// keys consolidate.
fn record(k: u64, time: Time, diff: Diff) -> Update {
    ((format!("key-{k:08}"), format!("value-{k:08}")), time, diff)
}

/// Listens until the frontier reaches the final upper, counting the diffs
/// received and timing each batch from its commit.
async fn listen_task(
    mut listen: persist_client::Listen<Key, Val, Time, Diff>,
    reader: usize,
    shared: Arc<Shared>,
    mut final_rx: watch::Receiver<Option<Time>>,
) -> Result<()> {
    let shard_done = |frontier: Time, final_rx: &watch::Receiver<Option<Time>>| {
        final_rx.borrow().is_some_and(|upper| frontier >= upper)
    };
    let mut frontier = 0;
    let result = async {
        loop {
            if shard_done(frontier, &final_rx) {
                return Ok(());
            }
            let events = {
                let fetch = listen.fetch_next();
                tokio::pin!(fetch);
                let mut final_known = false;
                loop {
                    tokio::select! {
                        events = &mut fetch => break Some(events),
                        changed = final_rx.changed(), if !final_known => {
                            final_known = changed.is_err() || final_rx.borrow().is_some();
                            // At the final upper no batch can follow, so the
                            // fetch is only waiting and may be dropped.
                            if shard_done(frontier, &final_rx) {
                                break None;
                            }
                        }
                    }
                }
            };
            let Some(events) = events else {
                return Ok(());
            };
            let events = events.context("listen")?;
            let mut diffs = 0i64;
            for event in events {
                match event {
                    ListenEvent::Updates(updates) => {
                        diffs += updates.iter().map(|(_, _, d)| d).sum::<i64>();
                    }
                    ListenEvent::Progress(progress) => {
                        frontier = upper_of(&progress).unwrap_or(Time::MAX);
                    }
                }
            }
            let now = Instant::now();
            let committed = shared
                .commit_times
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&frontier.saturating_sub(1))
                .copied();
            // A listen can see a commit before its writer notes the time.
            let delay = committed.map_or(Duration::ZERO, |c| now.saturating_duration_since(c));
            shared
                .listen_delay
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .record(delay);
            if let (Some(received), Ok(diffs)) = (shared.received.get(reader), u64::try_from(diffs))
            {
                received.fetch_add(diffs, Ordering::Relaxed);
            }
            if let Some(f) = shared.frontiers.get(reader) {
                f.store(frontier, Ordering::Relaxed);
            }
        }
    }
    .await;
    listen.expire().await;
    result
}

/// Follows the upper with the since (or holds it at 0) until stopped.
async fn since_task(
    mut read: ReadHandle<Key, Val, Time, Diff>,
    follow: bool,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) -> Result<()> {
    let shard = read.shard_id();
    let mut result = Ok(());
    while !*stop.borrow() {
        if follow {
            // The last complete time: every read at the latest upper needs
            // only it.
            let since = shared.upper.load(Ordering::Relaxed).saturating_sub(1);
            if upper_of(read.since()).is_some_and(|s| s < since)
                && let Err(err) = read.downgrade_since(&Antichain::from_elem(since)).await
            {
                result = Err(types::explain(shard, err)).context("since follower");
                break;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(SINCE_FOLLOW_INTERVAL) => {}
            _ = stop.changed() => {}
        }
    }
    read.expire().await;
    result
}

/// The shard's health at one moment.
#[derive(Debug, Clone)]
struct Health {
    upper: Option<Time>,
    since: Option<Time>,
    batches: u64,
    /// The encoded size of the latest state in consensus.
    state_bytes: u64,
    /// The entries in the shard's consensus log, counted as the span of
    /// sequence numbers from the oldest to the latest (each state's is its
    /// predecessor's plus one, and truncation removes a prefix).
    consensus_entries: u64,
    /// The encoded size of the whole state, as of its newest rollup (the
    /// latest entry if there is none yet).
    whole_state_bytes: u64,
    blob_bytes: u64,
    blob_count: u64,
    /// The bytes of the parts the latest state references.
    referenced_bytes: u64,
    /// How long taking this sample took.
    took: Duration,
}

async fn health(ctx: &Ctx) -> Result<Health> {
    let start = Instant::now();
    let shard = ctx.shard;
    let key = shard.to_string();
    let head = ctx
        .consensus
        .head(&key)
        .await
        .context("read the shard's latest consensus entry")?
        .ok_or_else(|| anyhow!("shard {shard} has no consensus entries"))?;
    let oldest = ctx
        .consensus
        .scan(&key, SeqNo(0), 1)
        .await
        .context("read the shard's oldest consensus entry")?
        .first()
        .map_or(head.seqno, |e| e.seqno);
    let state = ctx
        .client
        .inspect_shard::<Time>(shard)
        .await
        .map_err(|err| types::explain(shard, err))?
        .ok_or_else(|| anyhow!("shard {shard} does not exist"))?;
    let batches = state
        .get("batches")
        .and_then(Value::as_array)
        .ok_or_else(|| anyhow!("the state of shard {shard} lists no batches"))?;
    let referenced_bytes = batches
        .iter()
        .filter_map(|b| b.get("parts").and_then(Value::as_array))
        .flatten()
        .filter_map(|p| p.get("encoded_size_bytes").and_then(Value::as_u64))
        .sum();
    let mut blob_bytes = 0;
    let mut blob_count = 0;
    let rollups = format!("{shard}/rollup/");
    let mut newest_rollup: Option<(String, u64)> = None;
    ctx.blob
        .list_keys_and_metadata(&format!("{shard}/"), &mut |m| {
            blob_bytes += m.size_in_bytes;
            blob_count += 1;
            if m.key.starts_with(&rollups) && newest_rollup.as_ref().is_none_or(|(k, _)| *k < m.key)
            {
                newest_rollup = Some((m.key.clone(), m.size_in_bytes));
            }
        })
        .await
        .context("list the shard's blobs")?;
    let time = |name: &str| {
        state
            .get(name)
            .and_then(Value::as_array)
            .and_then(|f| f.first())
            .and_then(Value::as_str)
            .and_then(|t| t.parse().ok())
    };
    Ok(Health {
        upper: time("upper"),
        since: time("since"),
        batches: batches.len() as u64,
        state_bytes: head.data.len() as u64,
        whole_state_bytes: newest_rollup.map_or(head.data.len() as u64, |(_, size)| size),
        consensus_entries: head.seqno.0.saturating_sub(oldest.0) + 1,
        blob_bytes,
        blob_count,
        referenced_bytes,
        took: start.elapsed(),
    })
}

/// Compacts the shard and collects its garbage, as its writers do in the
/// background.
async fn maintain(ctx: &Ctx) -> Result<()> {
    let shard = ctx.shard;
    let mut write = ctx
        .client
        .open_writer::<Key, Val, Time, Diff>(
            shard,
            types::schema(),
            types::schema(),
            types::diagnostics("persistcli bench maintenance"),
        )
        .await
        .map_err(|err| types::explain(shard, err))?;
    let compacted = write.compact().await;
    let collected = write.collect_garbage().await;
    write.expire().await;
    compacted.map_err(|err| types::explain(shard, err))?;
    collected.map_err(|err| types::explain(shard, err))?;
    Ok(())
}

/// How long a fresh client (its own state cache) takes to open `shard`
/// and read its upper.
async fn open_time(ctx: &Ctx, shard: ShardId) -> Result<Duration> {
    let client = ctx.fresh_client();
    let start = Instant::now();
    client
        .fetch_recent_upper::<Key, Val, Time, Diff>(shard)
        .await
        .map_err(|err| types::explain(shard, err))?;
    Ok(start.elapsed())
}

/// The median times, in ms, to open the bench's shard and the empty
/// baseline shard, over `rounds` alternating rounds.
async fn open_times(ctx: &Ctx, rounds: u64) -> Result<(f64, f64)> {
    let mut shard = Vec::new();
    let mut baseline = Vec::new();
    for round in 0..rounds {
        // Take turns going first.
        if round % 2 == 0 {
            shard.push(open_time(ctx, ctx.shard).await?);
            baseline.push(open_time(ctx, ctx.baseline).await?);
        } else {
            baseline.push(open_time(ctx, ctx.baseline).await?);
            shard.push(open_time(ctx, ctx.shard).await?);
        }
    }
    Ok((median_ms(shard), median_ms(baseline)))
}

fn median_ms(mut times: Vec<Duration>) -> f64 {
    times.sort();
    times
        .get(times.len() / 2)
        .map_or(0.0, |d| d.as_secs_f64() * 1e3)
}

/// The bytes the shard's live data takes when written consolidated: every
/// key with its total count, as one batch of the baseline shard (written
/// to blob, measured and deleted, never appended).
async fn consolidated_bytes(ctx: &Ctx, counts: &[i64]) -> Result<u64> {
    let updates: Vec<Update> = counts
        .iter()
        .enumerate()
        .filter(|(_, n)| **n != 0)
        .map(|(k, n)| record(k as u64, 0, *n))
        .collect();
    let shard = ctx.baseline;
    let mut write = open_writer(ctx, shard, "persistcli bench live size").await?;
    let batch = write
        .batch(&updates, Antichain::from_elem(0), Antichain::from_elem(1))
        .await
        .map_err(|err| types::explain(shard, err));
    write.expire().await;
    let batch = batch?;
    let keys = batch.part_keys();
    let mut bytes = 0;
    ctx.blob
        .list_keys_and_metadata(&format!("{shard}/"), &mut |m| {
            if keys.contains(&m.key) {
                bytes += m.size_in_bytes;
            }
        })
        .await
        .context("list the consolidated batch's parts")?;
    batch.delete().await;
    Ok(bytes)
}

/// Prints a line of rates, latencies and shard health every `interval`
/// until stopped; stops the appends early if the state grows past
/// `max_state_bytes`.
async fn report_task(
    ctx: Arc<Ctx>,
    shared: Arc<Shared>,
    interval: Duration,
    max_state_bytes: u64,
    to_stderr: bool,
    mut stop: watch::Receiver<bool>,
) -> Result<()> {
    let mut ticks = tokio::time::interval_at((shared.start + interval).into(), interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut last = (shared.start, 0u64, 0u64);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stop.changed() => return Ok(()),
        }
        let now = Instant::now();
        let committed = shared.committed.load(Ordering::Relaxed);
        let updates = shared.updates.load(Ordering::Relaxed);
        let secs = now.duration_since(last.0).as_secs_f64().max(1e-9);
        let appends_per_sec = (committed - last.1) as f64 / secs;
        let updates_per_sec = (updates - last.2) as f64 / secs;
        last = (now, committed, updates);
        let (p50, p99) = take_interval(&shared.append_latency);
        let (_, delay_p99) = take_interval(&shared.listen_delay);
        let upper = shared.upper.load(Ordering::Relaxed);
        let lag = shared
            .frontiers
            .iter()
            .map(|f| upper.saturating_sub(f.load(Ordering::Relaxed)))
            .max();
        let health = health(&ctx).await?;
        if health.state_bytes > max_state_bytes {
            shared.stop_early(format!(
                "the state reached {} bytes (--max-state-bytes {max_state_bytes}) after {committed} appends",
                health.state_bytes
            ));
        }
        // The fastest of a few opens: one is too noisy on a busy machine.
        let mut open = Duration::MAX;
        let mut base = Duration::MAX;
        for _ in 0..TICK_OPEN_ROUNDS {
            open = open.min(open_time(&ctx, ctx.shard).await?);
            base = base.min(open_time(&ctx, ctx.baseline).await?);
        }
        let mut line = format!(
            "{:>7.1}s  {appends_per_sec:>6.0} appends/s {updates_per_sec:>8.0} updates/s  \
             p50 {p50:>7.2} ms p99 {p99:>7.2} ms",
            now.duration_since(shared.start).as_secs_f64(),
        );
        if let Some(lag) = lag {
            let _ = write!(line, "  listen lag {lag} (p99 {delay_p99:.2} ms)");
        }
        let _ = write!(
            line,
            " | batches {} state {} entries {} blob {} (referenced {}) open x{:.2} (sampled in {:.0} ms)",
            health.batches,
            HumanBytes(health.state_bytes),
            health.consensus_entries,
            HumanBytes(health.blob_bytes),
            HumanBytes(health.referenced_bytes),
            open.as_secs_f64() / base.as_secs_f64().max(1e-9),
            health.took.as_secs_f64() * 1e3,
        );
        emit(to_stderr, &line);
    }
}

/// The interval's p50 and p99 in ms, resetting the interval.
fn take_interval(latencies: &Mutex<Latencies>) -> (f64, f64) {
    let mut latencies = latencies.lock().unwrap_or_else(|p| p.into_inner());
    let quantiles = (
        quantile_ms(&latencies.interval, 0.5),
        quantile_ms(&latencies.interval, 0.99),
    );
    latencies.interval.reset();
    quantiles
}

#[allow(clippy::print_stderr)] // The periodic lines make way for --json.
fn emit(to_stderr: bool, line: &str) {
    if to_stderr {
        eprintln!("{line}");
    } else {
        println!("{line}");
    }
}

/// What the run measured at its end.
#[derive(Debug)]
struct Finished {
    elapsed: Duration,
    upper: Time,
    drained: bool,
    listen_drain: Duration,
    /// After the final maintenance pass.
    health: Health,
    /// When the load stopped.
    at_end: Health,
    open_ms: f64,
    baseline_ms: f64,
    consolidated: u64,
    live_records: u64,
}

fn summarize(
    location: &PersistLocation,
    ctx: &Ctx,
    args: &Args,
    shared: &Shared,
    end: Finished,
) -> Summary {
    let appends = shared.committed.load(Ordering::Relaxed);
    let updates = shared.updates.load(Ordering::Relaxed);
    let conflicts = shared.conflicts.load(Ordering::Relaxed);
    let secs = end.elapsed.as_secs_f64().max(1e-9);
    let (p50, p99, max) = {
        let l = shared
            .append_latency
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        (
            quantile_ms(&l.total, 0.5),
            quantile_ms(&l.total, 0.99),
            l.total.max() as f64 / 1e3,
        )
    };
    let (delay_p50, delay_p99) = {
        let l = shared
            .listen_delay
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        (quantile_ms(&l.total, 0.5), quantile_ms(&l.total, 0.99))
    };
    let received: Vec<u64> = shared
        .received
        .iter()
        .map(|r| r.load(Ordering::Relaxed))
        .collect();
    let all_received = end.drained && received.iter().all(|r| *r == updates);
    let h = &end.health;
    let batches_limit = 2.0 * (appends.max(1) as f64).log2();
    let blob_ratio = h.blob_bytes as f64 / (end.consolidated.max(1) as f64);
    let open_ratio = end.open_ms / end.baseline_ms.max(1e-9);
    let stopped_early = shared
        .stopped_early
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();

    let checks = [
        (
            "batches",
            h.batches as f64 <= batches_limit,
            format!(
                "batches in state {} <= 2*log2(appends) = {batches_limit:.1}",
                h.batches
            ),
        ),
        (
            "blob_bytes",
            blob_ratio <= BLOB_RATIO_LIMIT,
            format!(
                "blob bytes {} <= {BLOB_RATIO_LIMIT}x live consolidated data {} (ratio {blob_ratio:.1})",
                h.blob_bytes, end.consolidated
            ),
        ),
        (
            "state_bytes",
            h.whole_state_bytes.max(h.state_bytes) < STATE_BYTES_LIMIT,
            format!(
                "state {} bytes whole (latest consensus entry {} bytes) < {STATE_BYTES_LIMIT} bytes",
                h.whole_state_bytes, h.state_bytes
            ),
        ),
        (
            "open_time",
            open_ratio < OPEN_RATIO_LIMIT,
            format!(
                "open {:.3} ms < {OPEN_RATIO_LIMIT}x open of an empty shard {:.3} ms (ratio {open_ratio:.2})",
                end.open_ms, end.baseline_ms
            ),
        ),
    ];

    let mut text = String::new();
    let mut line = |s: String| {
        text.push_str(&s);
        text.push('\n');
    };
    line(format!("location   {location}"));
    line(format!(
        "shard id:  {} (baseline {}){}",
        ctx.shard,
        ctx.baseline,
        if args.keep { "" } else { ", removed" }
    ));
    if let Some(reason) = &stopped_early {
        line(format!("stopped early: {reason}"));
    }
    line(format!(
        "appends    {appends} ({updates} updates) in {secs:.2} s: {:.0} appends/s, {:.0} updates/s, {conflicts} retried after a lost race",
        appends as f64 / secs,
        updates as f64 / secs,
    ));
    line(format!(
        "latency    p50 {p50:.3} ms, p99 {p99:.3} ms, max {max:.3} ms (from the scheduled time)"
    ));
    line(format!(
        "listen     {} readers received {:?} of {updates} updates{}; delay from commit p50 {delay_p50:.3} ms, p99 {delay_p99:.3} ms; caught up {:.2} s after the last append",
        received.len(),
        received,
        if all_received {
            " (all)"
        } else {
            " (MISSING some)"
        },
        end.listen_drain.as_secs_f64(),
    ));
    line(format!(
        "shard      upper {:?}, since {:?}, {} batches in state (2*log2(appends) = {batches_limit:.1}), state {} bytes, {} consensus entries",
        h.upper, h.since, h.batches, h.state_bytes, h.consensus_entries,
    ));
    line(format!(
        "blob       {} bytes in {} blobs; referenced by state {} bytes; live consolidated data {} bytes ({} records); blob/live {blob_ratio:.1}",
        h.blob_bytes, h.blob_count, h.referenced_bytes, end.consolidated, end.live_records,
    ));
    let e = &end.at_end;
    line(format!(
        "at stop    (before the final compaction and GC pass, whose results are above) {} batches, {} consensus entries, blob {} bytes in {} blobs, whole state {} bytes",
        e.batches, e.consensus_entries, e.blob_bytes, e.blob_count, e.whole_state_bytes,
    ));
    line(format!(
        "open       {:.3} ms vs {:.3} ms for an empty shard (ratio {open_ratio:.2}, medians of {} rounds)",
        end.open_ms, end.baseline_ms, args.open_rounds,
    ));
    for (_, pass, what) in &checks {
        line(format!("{}  {what}", if *pass { "PASS" } else { "FAIL" }));
    }

    let json = json!({
        "location": location.to_string(),
        "shard_id": ctx.shard.to_string(),
        "baseline_shard_id": ctx.baseline.to_string(),
        "kept": args.keep,
        "config": {
            "writers": args.writers,
            "readers": args.readers,
            "rate": args.rate,
            "batch_size": args.batch_size,
            "key_space": args.key_space,
            "since_follows_upper": args.since_follows_upper,
            "duration_s": args.appends.is_none().then_some(args.duration.as_secs_f64()),
            "appends": args.appends,
        },
        "stopped_early": stopped_early,
        "appends": appends,
        "updates": updates,
        "conflicts": conflicts,
        "elapsed_s": secs,
        "appends_per_sec": appends as f64 / secs,
        "updates_per_sec": updates as f64 / secs,
        "append_latency_ms": { "p50": p50, "p99": p99, "max": max },
        "listen": {
            "readers": received.len(),
            "updates_received": received,
            "all_received": all_received,
            "caught_up_s": end.listen_drain.as_secs_f64(),
            "delay_ms": { "p50": delay_p50, "p99": delay_p99 },
        },
        "shard": {
            "upper": h.upper,
            "since": h.since,
            "expected_upper": end.upper,
            "batches": h.batches,
            "batches_limit": batches_limit,
            "state_bytes": h.state_bytes,
            "whole_state_bytes": h.whole_state_bytes,
            "at_stop": {
                "batches": end.at_end.batches,
                "consensus_entries": end.at_end.consensus_entries,
                "blob_bytes": end.at_end.blob_bytes,
                "blob_count": end.at_end.blob_count,
                "whole_state_bytes": end.at_end.whole_state_bytes,
            },
            "consensus_entries": h.consensus_entries,
            "blob_bytes": h.blob_bytes,
            "blob_count": h.blob_count,
            "referenced_bytes": h.referenced_bytes,
            "consolidated_bytes": end.consolidated,
            "live_records": end.live_records,
            "blob_to_live_ratio": blob_ratio,
            "open_ms": end.open_ms,
            "baseline_open_ms": end.baseline_ms,
            "open_ratio": open_ratio,
        },
        "checks": checks
            .iter()
            .map(|(name, pass, what)| (name.to_string(), json!({ "pass": pass, "what": what })))
            .collect::<serde_json::Map<_, _>>(),
    });
    Summary {
        text,
        json,
        checks: checks
            .iter()
            .map(|(name, pass, _)| Check { name, pass: *pass })
            .collect(),
    }
}

/// Closes and finalizes `shard` (deleting its blobs), then truncates its
/// consensus log to the tombstone. Every handle of the bench is expired
/// by now.
async fn remove(ctx: &Ctx, shard: ShardId) -> Result<()> {
    let mut write = open_writer(ctx, shard, "persistcli bench cleanup").await?;
    let closed = write.advance_upper(&Antichain::new()).await;
    write.expire().await;
    closed.map_err(|err| types::explain(shard, err))?;
    let mut read = open_reader(ctx, shard, "persistcli bench cleanup").await?;
    let released = read.downgrade_since(&Antichain::new()).await;
    read.expire().await;
    released.map_err(|err| types::explain(shard, err))?;
    ctx.client
        .finalize_shard::<Key, Val, Time, Diff>(shard, types::diagnostics("persistcli bench"))
        .await
        .map_err(|err| types::explain(shard, err))?;
    let key = shard.to_string();
    if let Some(head) = ctx.consensus.head(&key).await.context("consensus head")? {
        ctx.consensus
            .truncate(&key, head.seqno)
            .await
            .context("truncate the shard's consensus log")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units_or_as_seconds() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("3 fortnights").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn equal_keys_get_equal_values_so_they_consolidate() {
        let mut updates = generate(0, 5, 500, 7);
        updates.extend(generate(1, 6, 500, 7));
        let mut advanced: Vec<Update> = updates.into_iter().map(|(kv, _, d)| (kv, 6, d)).collect();
        differential_dataflow::consolidation::consolidate_updates(&mut advanced);
        assert_eq!(advanced.len(), 7);
        assert_eq!(advanced.iter().map(|(_, _, d)| d).sum::<i64>(), 1000);
    }

    #[test]
    fn schedule_spaces_appends_and_ends_at_the_count() {
        let start = Instant::now();
        let shared = Shared {
            start,
            tickets: AtomicU64::new(0),
            interval: Some(Duration::from_millis(10)),
            appends: Some(3),
            end: start,
            stop: AtomicBool::new(false),
            stopped_early: Mutex::new(None),
            committed: AtomicU64::new(0),
            updates: AtomicU64::new(0),
            conflicts: AtomicU64::new(0),
            upper: AtomicU64::new(1),
            commit_times: Mutex::new(HashMap::new()),
            append_latency: Mutex::new(Latencies::new().expect("valid bounds")),
            listen_delay: Mutex::new(Latencies::new().expect("valid bounds")),
            received: Vec::new(),
            frontiers: Vec::new(),
        };
        assert_eq!(shared.schedule(0), Some(start));
        assert_eq!(shared.schedule(2), Some(start + Duration::from_millis(20)));
        assert_eq!(shared.schedule(3), None);
        shared.stop_early("test".to_owned());
        assert_eq!(shared.schedule(1), None);
    }
}
