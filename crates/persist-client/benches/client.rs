//! Client benchmark: `cargo bench -p persist-client` (with `cargo xtask
//! services up` done, the S3 + PostgreSQL location runs too).
//!
//! Every figure is printed next to a baseline measured in the same run, in
//! alternating rounds, and as a ratio to it, because absolute times drift on
//! shared machines:
//!
//! - `compare_and_append` of 64 KiB and 1 MiB batches (16-byte `String` keys,
//!   100-byte `Vec<u8>` values, `u64` times, `i64` diffs; sizes count the
//!   encoded key and value bytes) on file + SQLite and on S3 + PostgreSQL:
//!   latency p50/p99, MiB/s of update bytes and appends/s, vs the I/O an
//!   append cannot avoid, done raw on the same backends: one `Blob::set` of
//!   the very part bytes the client wrote, then one
//!   `Consensus::compare_and_set` of an entry the size of the state the
//!   client wrote at the same step. To show where the time goes, a third
//!   side appends through `batch` + `compare_and_append_batch`, timing each,
//!   and the client's CPU work before its I/O is redone phase by phase with
//!   public APIs (key/value encode, consolidation, part encode);
//! - `snapshot_and_fetch` of 1,000,000 updates (8-byte `Vec<u8>` keys, `()`
//!   values, in 10 batches whose keys interleave) on file + SQLite and on
//!   S3 + PostgreSQL: updates/s and MiB/s of part bytes, vs `Blob::get` of
//!   the same parts. The read is also done the simple way, phase by phase,
//!   with public APIs (get, part decode, copy, sort, key/value decode), to
//!   show what each step costs.
//!
//! Set `PERSIST_BENCH_ROUNDS` to change the number of rounds (default 5).
//! Arguments pick benchmarks by name (`cargo bench -p persist-client --
//! snapshot` runs only `snapshot file+sqlite`); without any, all run.

#![allow(clippy::print_stdout, clippy::unwrap_used)]

use std::error::Error;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use differential_dataflow::consolidation::consolidate_updates;
use persist::part::{PartCodecs, decode_part, encode_part};
use persist::testing;
use persist::testing::bench::{self, Latencies, MIB, mib_per_sec, ms};
use persist::{Blob, CaSResult, Consensus, SeqNo, VersionedData, open_blob, open_consensus};
use persist_client::{Diagnostics, PersistClient, PersistConfig, ShardId};
use persist_types::{Codec, Codec64, SimpleSchema};
use timely::progress::Antichain;
use uuid::Uuid;

/// The allocator a production binary would use. glibc's malloc gives the
/// result of a large read (64 MB here) back to the OS when it is freed, so
/// every read faults its pages in again, and that dominates the read; an
/// allocator that keeps freed memory for reuse, as servers built on
/// persist do, measures the client instead. Both sides of every
/// comparison run on it.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

type Result<T> = std::result::Result<T, Box<dyn Error>>;

const KIB: usize = 1 << 10;
/// Batch sizes (encoded key and value bytes) and appends per round.
const APPENDS: [(usize, usize); 2] = [(64 * KIB, 40), (MIB, 20)];
/// The size of each value of the append batches.
const VAL_BYTES: usize = 100;
/// The updates the snapshot reads, and the batches they are appended in.
const SNAPSHOT_UPDATES: u64 = 1_000_000;
const SNAPSHOT_BATCHES: u64 = 10;

fn rounds() -> usize {
    bench::rounds(5)
}

fn size_label(bytes: usize) -> String {
    if bytes >= MIB {
        format!("{} MiB", bytes / MIB)
    } else {
        format!("{} KiB", bytes / KIB)
    }
}

/// Times consecutive phases of some work.
struct Laps<const N: usize> {
    times: [Duration; N],
    last: Instant,
}

impl<const N: usize> Laps<N> {
    fn start() -> Self {
        Laps {
            times: [Duration::ZERO; N],
            last: Instant::now(),
        }
    }

    /// Ends phase `phase`, which started when the previous one ended.
    fn lap(&mut self, phase: usize) {
        let now = Instant::now();
        self.times[phase] += now - self.last;
        self.last = now;
    }
}

/// A blob and a consensus, shared by the client and its baseline.
struct Location {
    name: &'static str,
    blob: Arc<dyn Blob>,
    consensus: Arc<dyn Consensus>,
}

impl Location {
    async fn open(name: &'static str, blob_uri: &str, consensus_uri: &str) -> Result<Self> {
        Ok(Location {
            name,
            blob: open_blob(blob_uri).await?,
            consensus: open_consensus(consensus_uri).await?,
        })
    }

    fn client(&self) -> PersistClient {
        // Background compaction is off: it would merge these throwaway
        // shards' batches on the same two cores while appends are timed,
        // and the baseline has nothing like it. `persistcli bench` measures
        // appends with compaction on.
        let cfg = PersistConfig {
            compaction_enabled: false,
            ..PersistConfig::default()
        };
        PersistClient::new(cfg, Arc::clone(&self.blob), Arc::clone(&self.consensus))
    }

    /// The keys and sizes of every blob starting with `prefix`.
    async fn list(&self, prefix: &str) -> Result<Vec<(String, usize)>> {
        let mut keys = Vec::new();
        self.blob
            .list_keys_and_metadata(prefix, &mut |m| {
                keys.push((m.key, m.size_in_bytes as usize));
            })
            .await?;
        keys.sort();
        Ok(keys)
    }
}

type Update = ((String, Vec<u8>), u64, i64);
/// An update with its key and value encoded, as the client holds it.
type EncodedUpdate = ((Vec<u8>, Vec<u8>), u64, i64);
/// An update borrowing its encoded key and value from a decoded part.
type BorrowedUpdate<'a> = ((&'a [u8], &'a [u8]), u64, i64);

/// Distinct updates whose keys and values encode to at least `target`
/// bytes, and that number of bytes. Values are pseudo-random, so Snappy
/// does not shrink the part below the update bytes.
fn batch_updates(target: usize) -> (Vec<Update>, usize) {
    let mut rng = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next_byte = || {
        // xorshift64
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng as u8
    };
    let (mut updates, mut bytes) = (Vec::new(), 0);
    while bytes < target {
        let key = format!("key-{:012}", updates.len());
        let val: Vec<u8> = (0..VAL_BYTES).map(|_| next_byte()).collect();
        bytes += key.len() + val.len();
        updates.push(((key, val), 0, 1));
    }
    (updates, bytes)
}

/// What the client wrote in the warm-up round, for the baseline to write
/// again: the bytes of one part and the size of the state after each append.
struct Writes {
    part: Bytes,
    state_sizes: Vec<usize>,
}

/// How [`client_round`] appends.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// `compare_and_append`, untimed, learning what it writes.
    Learn,
    /// `compare_and_append`, timed.
    Whole,
    /// `batch` (encode, write the part) then `compare_and_append_batch`
    /// (state transition, CAS), each timed.
    Split,
}

/// What a [`client_round`] measured.
#[derive(Default)]
struct ClientRound {
    /// Each append, whole.
    whole: Latencies,
    /// With [`Mode::Split`], each append's `batch` and
    /// `compare_and_append_batch`.
    batch: Latencies,
    append_batch: Latencies,
    /// With [`Mode::Learn`], what the appends wrote.
    writes: Option<Writes>,
}

/// `ops` appends of `updates` (at times 0, 1, ...) to a fresh shard.
async fn client_round(
    loc: &Location,
    client: &PersistClient,
    updates: &mut [Update],
    ops: usize,
    mode: Mode,
) -> Result<ClientRound> {
    let shard = ShardId::new();
    let (mut write, read) = client
        .open::<String, Vec<u8>, u64, i64>(
            shard,
            Arc::new(SimpleSchema::new()),
            Arc::new(SimpleSchema::new()),
            Diagnostics::from_purpose("bench"),
        )
        .await?;
    let mut measured = ClientRound::default();
    let mut state_sizes = Vec::new();
    for t in 0..ops as u64 {
        for update in updates.iter_mut() {
            update.1 = t;
        }
        let (lower, upper) = (Antichain::from_elem(t), Antichain::from_elem(t + 1));
        let start = Instant::now();
        if mode == Mode::Split {
            let mut batch = write
                .batch(updates.iter(), lower.clone(), upper.clone())
                .await?;
            let written = start.elapsed();
            write
                .compare_and_append_batch(&mut [&mut batch], lower, upper)
                .await??;
            let elapsed = start.elapsed();
            measured.batch.push(written);
            measured.append_batch.push(elapsed - written);
        } else {
            write
                .compare_and_append(updates.iter(), lower, upper)
                .await??;
        }
        measured.whole.push(start.elapsed());
        if mode == Mode::Learn {
            let head = loc.consensus.head(&shard.to_string()).await?;
            state_sizes.push(head.ok_or("the shard has no state")?.data.len());
        }
    }
    if mode == Mode::Learn {
        let parts = loc.list(&format!("{shard}/")).await?;
        // The baseline's one `set` per append stands for the client's.
        assert_eq!(parts.len(), ops, "expected one part per append");
        let part = loc.blob.get(&parts[0].0).await?.ok_or("part vanished")?;
        measured.writes = Some(Writes { part, state_sizes });
    }
    write.expire().await;
    read.expire().await;
    Ok(measured)
}

/// The raw I/O of `ops` appends: per append, one `set` of the part bytes
/// under a fresh key, then one CAS of a state-sized entry on a fresh
/// consensus key. Returns the latencies of (set + CAS, set, CAS) and the
/// blob keys written.
async fn baseline_round(
    loc: &Location,
    writes: &Writes,
    ops: usize,
) -> Result<([Latencies; 3], Vec<String>)> {
    let key = format!("baseline-{}", Uuid::new_v4());
    // The client's appends all find the shard's state already there.
    let first = VersionedData {
        seqno: SeqNo(0),
        data: Bytes::from_static(b"initial"),
    };
    let created = loc.consensus.compare_and_set(&key, None, first).await?;
    assert_eq!(created, CaSResult::Committed);
    let mut head = SeqNo(0);
    let entries: Vec<Bytes> = writes.state_sizes[..ops]
        .iter()
        .map(|&len| Bytes::from(vec![0x5a; len]))
        .collect();
    let [mut total, mut set, mut cas] = [(); 3].map(|_| Latencies::default());
    let mut blob_keys = Vec::new();
    for data in entries {
        // Shaped like a part key: `{shard}/{writer}/p{uuid}`.
        let blob_key = format!("{key}/w{}/p{}", Uuid::new_v4(), Uuid::new_v4());
        let next = VersionedData {
            seqno: head.next(),
            data,
        };
        let start = Instant::now();
        loc.blob.set(&blob_key, writes.part.clone()).await?;
        let set_done = start.elapsed();
        let result = loc
            .consensus
            .compare_and_set(&key, Some(head), next)
            .await?;
        let elapsed = start.elapsed();
        assert_eq!(
            result,
            CaSResult::Committed,
            "raw CAS lost without contention"
        );
        head = head.next();
        total.push(elapsed);
        set.push(set_done);
        cas.push(elapsed - set_done);
        blob_keys.push(blob_key);
    }
    Ok(([total, set, cas], blob_keys))
}

/// Phases of the CPU work of an append before its I/O, in order.
const APPEND_PHASES: [&str; 3] = [
    "encode keys and values",
    "consolidate",
    "encode part (stats, CRC, Parquet)",
];

/// The CPU work of one `compare_and_append` of `updates` before its I/O,
/// redone phase by phase with public APIs (an approximation: it mirrors the
/// client's steps as of this writing). Returns each phase's time.
fn append_phases(updates: &[Update]) -> Result<[Duration; 3]> {
    let mut laps = Laps::<3>::start();
    let mut encoded: Vec<EncodedUpdate> = updates
        .iter()
        .map(|((k, v), t, d)| ((k.encode_to_vec(), v.encode_to_vec()), *t, *d))
        .collect();
    laps.lap(0);
    consolidate_updates(&mut encoded);
    laps.lap(1);
    let codecs = PartCodecs {
        key: <String as Codec>::codec_name(),
        val: <Vec<u8> as Codec>::codec_name(),
        ts: <u64 as Codec64>::codec_name(),
        diff: <i64 as Codec64>::codec_name(),
    };
    let part = encode_part(
        &codecs,
        PersistConfig::default().part_compression,
        encoded
            .iter()
            .map(|((k, v), t, d)| (&k[..], &v[..], t.to_le_bytes(), d.to_le_bytes())),
    )?;
    laps.lap(2);
    drop(part);
    Ok(laps.times)
}

async fn bench_appends(loc: &Location) -> Result<()> {
    let client = loc.client();
    for (target, ops) in APPENDS {
        let (mut updates, update_bytes) = batch_updates(target);
        // Warm-up (untimed): learns what an append writes.
        let learned = client_round(loc, &client, &mut updates, ops, Mode::Learn).await?;
        let writes = learned.writes.expect("a learning round returns its writes");
        let mut ours = Latencies::default();
        let (mut batch, mut append_batch) = (Latencies::default(), Latencies::default());
        let [mut raw, mut raw_set, mut raw_cas] = [(); 3].map(|_| Latencies::default());
        let mut blob_keys = Vec::new();
        let mut phases = [(); APPEND_PHASES.len()].map(|_| Latencies::default());
        for round in 0..rounds() {
            // Rotate which side goes first, so none always meets the
            // backends in the state another left them in.
            let sides = [Some(Mode::Whole), None, Some(Mode::Split)];
            for side in (0..3).map(|i| sides[(i + round) % 3]) {
                match side {
                    Some(mode) => {
                        let measured = client_round(loc, &client, &mut updates, ops, mode).await?;
                        if mode == Mode::Whole {
                            ours.0.extend(measured.whole.0);
                        }
                        batch.0.extend(measured.batch.0);
                        append_batch.0.extend(measured.append_batch.0);
                    }
                    None => {
                        let ([total, set, cas], keys) = baseline_round(loc, &writes, ops).await?;
                        raw.0.extend(total.0);
                        raw_set.0.extend(set.0);
                        raw_cas.0.extend(cas.0);
                        blob_keys.extend(keys);
                    }
                }
            }
            for _ in 0..ops {
                for (phase, time) in phases.iter_mut().zip(append_phases(&updates)?) {
                    phase.push(time);
                }
            }
        }
        for key in blob_keys {
            loc.blob.delete(&key).await?;
        }

        let sizes = &writes.state_sizes;
        println!(
            "append {} {}: {} updates, {update_bytes} update bytes, part {} bytes, \
             state {}..{} bytes, {} appends",
            loc.name,
            size_label(target),
            updates.len(),
            writes.part.len(),
            sizes.iter().min().unwrap(),
            sizes.iter().max().unwrap(),
            ours.0.len(),
        );
        let throughput = |l: &Latencies| mib_per_sec(update_bytes * l.0.len(), l.total());
        let (p50, p99) = (ours.percentile(0.5), ours.percentile(0.99));
        let (b50, b99) = (raw.percentile(0.5), raw.percentile(0.99));
        println!(
            "  client compare_and_append p50 {} p99 {} {:>8.1} MiB/s {:>6.0} appends/s",
            ms(p50),
            ms(p99),
            throughput(&ours),
            ours.ops_per_sec(),
        );
        println!(
            "  raw set + CAS (baseline)  p50 {} p99 {} {:>8.1} MiB/s {:>6.0} appends/s",
            ms(b50),
            ms(b99),
            throughput(&raw),
            raw.ops_per_sec(),
        );
        println!(
            "  ratio client / baseline   p50 {:.2} p99 {:.2} (latency; target <= 1.5), \
             throughput {:.2}",
            p50.as_secs_f64() / b50.as_secs_f64(),
            p99.as_secs_f64() / b99.as_secs_f64(),
            throughput(&ours) / throughput(&raw),
        );
        println!(
            "  client split in two calls  batch (encode, set) p50 {} vs raw set p50 {}; \
             compare_and_append_batch (state, CAS) p50 {} vs raw CAS p50 {}",
            ms(batch.percentile(0.5)),
            ms(raw_set.percentile(0.5)),
            ms(append_batch.percentile(0.5)),
            ms(raw_cas.percentile(0.5)),
        );
        let phases: Vec<String> = APPEND_PHASES
            .iter()
            .zip(&mut phases)
            .map(|(name, phase)| format!("{name} {}", ms(phase.percentile(0.5))))
            .collect();
        println!(
            "  its CPU work before I/O, redone (p50): {}",
            phases.join(", ")
        );
    }
    Ok(())
}

type SmallUpdate = ((Vec<u8>, ()), u64, i64);

/// Phases of a snapshot read done the simple way, in order.
const READ_PHASES: [&str; 5] = [
    "blob get",
    "decode_part (validate, pages, CRC)",
    "filter and advance (borrowed slices)",
    "consolidate (sort)",
    "decode keys and values",
];

/// A `snapshot_and_fetch` of the parts at `keys` done the simple way with
/// public APIs, phase by phase: gather every update, sort, decode. The
/// client does the same work but merges the parts (sorted runs) with a
/// heap and decodes while merging, so its last three phases are fused and
/// cheaper than these; the first two are the same. Returns each phase's
/// time and the updates read.
async fn read_phases(
    blob: &dyn Blob,
    keys: &[(String, usize)],
    as_of: u64,
) -> Result<([Duration; 5], usize)> {
    let mut laps = Laps::<5>::start();
    let mut bytes = Vec::new();
    for (key, _) in keys {
        bytes.push(blob.get(key).await?.ok_or("part vanished")?);
    }
    laps.lap(0);
    let parts = bytes
        .into_iter()
        .map(decode_part)
        .collect::<std::result::Result<Vec<_>, _>>()?;
    laps.lap(1);
    let mut all: Vec<BorrowedUpdate<'_>> = Vec::new();
    for part in &parts {
        // Snapshot times advance to the as_of (a join, for u64).
        all.extend(part.iter().map(|(k, v, t, d)| {
            (
                (k, v),
                u64::from_le_bytes(t).max(as_of),
                i64::from_le_bytes(d),
            )
        }));
    }
    laps.lap(2);
    // As the client does: a stable sort takes each part's run in linear
    // time, then equal updates are summed.
    all.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
    consolidate_updates(&mut all);
    laps.lap(3);
    let (key_schema, val_schema) = (SimpleSchema::new(), SimpleSchema::new());
    let decoded: Vec<_> = all
        .into_iter()
        .map(|((k, v), t, d)| {
            let k = Vec::<u8>::decode(k, &key_schema).map_err(|e| e.to_string());
            let v = <()>::decode(v, &val_schema).map_err(|e| e.to_string());
            ((k, v), t, d)
        })
        .collect();
    laps.lap(4);
    Ok((laps.times, decoded.len()))
}

async fn bench_snapshot(loc: &Location) -> Result<()> {
    let client = loc.client();
    let shard = ShardId::new();
    let (mut write, mut read) = client
        .open::<Vec<u8>, (), u64, i64>(
            shard,
            Arc::new(SimpleSchema::new()),
            Arc::new(SimpleSchema::new()),
            Diagnostics::from_purpose("bench"),
        )
        .await?;
    let per_batch = SNAPSHOT_UPDATES / SNAPSHOT_BATCHES;
    let start = Instant::now();
    for b in 0..SNAPSHOT_BATCHES {
        // Batch `b` holds every SNAPSHOT_BATCHES-th key from `b`, so the
        // parts interleave and the read has to merge them.
        let updates: Vec<SmallUpdate> = (0..per_batch)
            .map(|i| {
                (
                    ((i * SNAPSHOT_BATCHES + b).to_be_bytes().to_vec(), ()),
                    b,
                    1,
                )
            })
            .collect();
        let (lower, upper) = (Antichain::from_elem(b), Antichain::from_elem(b + 1));
        write.compare_and_append(&updates, lower, upper).await??;
    }
    let wrote = start.elapsed();
    let as_of = SNAPSHOT_BATCHES - 1;
    let keys = loc.list(&format!("{shard}/")).await?;
    let part_bytes: usize = keys.iter().map(|(_, len)| len).sum();
    let updates = SNAPSHOT_UPDATES as usize;
    println!(
        "snapshot {}: {updates} updates (8-byte keys, unit values) in {} parts, {part_bytes} part bytes \
         (appending them took {:.2} s)",
        loc.name,
        keys.len(),
        wrote.as_secs_f64(),
    );

    let (mut ours, mut raw) = (Duration::ZERO, Duration::ZERO);
    let mut phases = [Duration::ZERO; 6];
    // Round 0 warms up (page cache, allocator) and is not counted.
    for round in 0..=rounds() {
        let client_first = round % 2 == 0;
        for client_side in [client_first, !client_first] {
            if client_side {
                let start = Instant::now();
                let fetched = read.snapshot_and_fetch(Antichain::from_elem(as_of)).await?;
                let elapsed = start.elapsed();
                assert_eq!(fetched.len(), updates);
                drop(fetched);
                if round > 0 {
                    ours += elapsed;
                }
            } else {
                // As many gets in flight as the client has (4).
                let start = Instant::now();
                let gets: Vec<_> = keys.iter().map(|(key, _)| loc.blob.get(key)).collect();
                let mut read_bytes = 0;
                let gets = futures::StreamExt::buffered(futures::stream::iter(gets), 4);
                for got in futures::StreamExt::collect::<Vec<_>>(gets).await {
                    read_bytes += got?.ok_or("part vanished")?.len();
                }
                let elapsed = start.elapsed();
                assert_eq!(read_bytes, part_bytes);
                if round > 0 {
                    raw += elapsed;
                }
            }
        }
        let (times, len) = read_phases(&*loc.blob, &keys, as_of).await?;
        assert_eq!(len, updates);
        if round > 0 {
            for (total, time) in phases.iter_mut().zip(times) {
                *total += time;
            }
        }
    }

    let n = rounds() as u32;
    let per_sec = |total: Duration| (updates * rounds()) as f64 / total.as_secs_f64();
    println!(
        "  client snapshot_and_fetch {:>6.1} ms/read {:>12.0} updates/s {:>8.1} MiB/s",
        (ours / n).as_secs_f64() * 1e3,
        per_sec(ours),
        mib_per_sec(part_bytes * rounds(), ours),
    );
    println!(
        "  raw blob get (baseline)   {:>6.1} ms/read {:>12.0} updates/s {:>8.1} MiB/s",
        (raw / n).as_secs_f64() * 1e3,
        per_sec(raw),
        mib_per_sec(part_bytes * rounds(), raw),
    );
    println!(
        "  ratio client / baseline   {:.3} (throughput; target >= 0.5)",
        per_sec(ours) / per_sec(raw),
    );
    let phase_total: Duration = phases.iter().sum();
    println!(
        "  the read done the simple way, in phases ({:.1} ms/read):",
        (phase_total / n).as_secs_f64() * 1e3
    );
    for (name, time) in READ_PHASES.iter().zip(phases) {
        println!(
            "    {name:<38} {:>6.1} ms {:>5.1}%",
            (time / n).as_secs_f64() * 1e3,
            100.0 * time.as_secs_f64() / phase_total.as_secs_f64(),
        );
    }
    write.expire().await;
    read.expire().await;
    Ok(())
}

/// The benchmarks named on the command line: those whose name contains an
/// argument, or all without arguments. Flags cargo passes to every bench
/// target (such as `--bench`) are ignored.
struct Filter(Vec<String>);

impl Filter {
    fn from_args() -> Self {
        Filter(
            std::env::args()
                .skip(1)
                .filter(|a| !a.starts_with("--"))
                .collect(),
        )
    }

    fn wants(&self, name: &str) -> bool {
        self.0.is_empty() || self.0.iter().any(|a| name.contains(a.as_str()))
    }
}

async fn run() -> Result<()> {
    let filter = Filter::from_args();
    let dir = tempfile::Builder::new()
        .prefix("persist-bench")
        .tempdir_in(std::env::current_dir()?)?;
    println!(
        "# persist client benchmark ({} rounds, file and SQLite in {})",
        rounds(),
        dir.path().display()
    );
    let local = Location::open(
        "file+sqlite",
        &format!("file://{}", dir.path().join("blob").display()),
        &format!("sqlite://{}", dir.path().join("consensus.db").display()),
    )
    .await?;
    if filter.wants("append file+sqlite") {
        bench_appends(&local).await?;
    }
    if filter.wants("append s3+postgres") {
        // The test servers' helpers skip (or, under CI=true, fail) without
        // them.
        match (
            testing::s3_prefix().await,
            testing::postgres_database().await,
        ) {
            (Some(s3), Some(postgres)) => {
                let remote = Location::open("s3+postgres", &s3, &postgres).await?;
                bench_appends(&remote).await?;
            }
            _ => println!(
                "append s3+postgres: skipped (no S3 or PostgreSQL server; \
                 run `cargo xtask services up` first)"
            ),
        }
    }
    if filter.wants("snapshot file+sqlite") {
        bench_snapshot(&local).await?;
    }
    if filter.wants("snapshot s3+postgres") {
        match (
            testing::s3_prefix().await,
            testing::postgres_database().await,
        ) {
            (Some(s3), Some(postgres)) => {
                let remote = Location::open("s3+postgres", &s3, &postgres).await?;
                bench_snapshot(&remote).await?;
            }
            _ => println!("snapshot s3+postgres: skipped (no S3 or PostgreSQL server)"),
        }
    }
    Ok(())
}

fn main() -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run())
}
