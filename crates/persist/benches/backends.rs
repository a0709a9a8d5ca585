//! Backend benchmark: `cargo bench -p persist` (or `cargo xtask bench`,
//! which also starts PostgreSQL and the S3 server so those backends run).
//!
//! Every figure is printed next to a baseline measured in the same run, in
//! alternating rounds, and as a ratio to it, because absolute times drift on
//! shared machines:
//!
//! - blob `set`/`get` throughput for 1 MiB and 8 MiB values vs a raw fsync'd
//!   file write / a plain file read of the same bytes in the same directory;
//! - consensus `compare_and_set` latency (p50, p99) and ops/s vs one raw CAS
//!   statement through the same driver (SQLite, PostgreSQL).
//!
//! Set `PERSIST_BENCH_ROUNDS` to change the number of rounds (default 5).

#![allow(clippy::print_stdout, clippy::unwrap_used)]

use std::error::Error;
use std::fs::{self, File};
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use persist::file::FileBlob;
use persist::mem::{MemBlob, MemConsensus};
use persist::postgres::PostgresConsensus;
use persist::s3::{S3Blob, S3BlobConfig};
use persist::sqlite::SqliteConsensus;
use persist::testing;
use persist::testing::bench::{self, Latencies, MIB, mib_per_sec, ms};
use persist::{Blob, CaSResult, Consensus, SeqNo, VersionedData};

type Result<T> = std::result::Result<T, Box<dyn Error>>;

/// The size of each consensus entry: a small shard state diff.
const CAS_PAYLOAD: usize = 512;

fn rounds() -> usize {
    bench::rounds(5)
}

/// The baseline for blob writes: create, write and fsync a file.
fn raw_write(dir: &Path, name: &str, value: &[u8]) -> Result<()> {
    let mut file = File::create(dir.join(name))?;
    file.write_all(value)?;
    file.sync_all()?;
    Ok(())
}

/// Writes then reads `ops` values of `size` bytes through `blob` and
/// through raw files, returning (raw set, blob set, raw get, blob get) times.
async fn blob_round(
    blob: &dyn Blob,
    raw_dir: &Path,
    value: &Bytes,
    ops: usize,
    blob_first: bool,
) -> Result<[Duration; 4]> {
    let size = value.len();
    let raw_name = |i: usize| format!("raw-{size}-{i}");
    let blob_key = |i: usize| format!("bench/{size}/{i}");
    let mut times = [Duration::ZERO; 4];
    // Alternate which side goes first so neither always meets the disk in
    // the state the other left it in.
    for side in if blob_first { [1, 0] } else { [0, 1] } {
        let start = Instant::now();
        for i in 0..ops {
            if side == 0 {
                raw_write(raw_dir, &raw_name(i), value)?;
            } else {
                blob.set(&blob_key(i), value.clone()).await?;
            }
        }
        times[side] = start.elapsed();
    }
    for side in if blob_first { [1, 0] } else { [0, 1] } {
        let start = Instant::now();
        for i in 0..ops {
            let read = if side == 0 {
                Bytes::from(fs::read(raw_dir.join(raw_name(i)))?)
            } else {
                blob.get(&blob_key(i)).await?.ok_or("missing value")?
            };
            assert_eq!(read.len(), size);
        }
        times[2 + side] = start.elapsed();
    }
    for i in 0..ops {
        fs::remove_file(raw_dir.join(raw_name(i)))?;
        blob.delete(&blob_key(i)).await?;
    }
    Ok(times)
}

async fn bench_blob(name: &str, blob: Arc<dyn Blob>, raw_dir: &Path) -> Result<()> {
    for (size, ops) in [(MIB, 16), (8 * MIB, 4)] {
        let value = Bytes::from((0..size).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
        let mut total = [Duration::ZERO; 4];
        for round in 0..rounds() {
            let times = blob_round(&*blob, raw_dir, &value, ops, round % 2 == 1).await?;
            for (total, time) in total.iter_mut().zip(times) {
                *total += time;
            }
        }
        let bytes = size * ops * rounds();
        let [raw_set, set, raw_get, get] = total.map(|t| mib_per_sec(bytes, t));
        let label = format!("{} MiB", size / MIB);
        println!(
            "blob {name:<5} set {label:>5}: {set:>8.1} MiB/s | raw fsync'd write {raw_set:>8.1} MiB/s | ratio {:.2}",
            set / raw_set
        );
        println!(
            "blob {name:<5} get {label:>5}: {get:>8.1} MiB/s | raw file read     {raw_get:>8.1} MiB/s | ratio {:.2}",
            get / raw_get
        );
    }
    Ok(())
}

/// One raw compare-and-set statement through a backend's own driver.
trait RawCas {
    fn cas(
        &mut self,
        key: &str,
        expected: Option<i64>,
        new: i64,
        data: &[u8],
    ) -> impl Future<Output = Result<bool>>;
}

struct RawSqlite(rusqlite::Connection);

impl RawCas for RawSqlite {
    async fn cas(
        &mut self,
        key: &str,
        expected: Option<i64>,
        new: i64,
        data: &[u8],
    ) -> Result<bool> {
        let mut stmt = self.0.prepare_cached(
            "INSERT INTO raw_cas (shard, seqno, data) SELECT ?1, ?2, ?3 \
             WHERE (SELECT max(seqno) FROM raw_cas WHERE shard = ?1) IS ?4",
        )?;
        Ok(stmt.execute(rusqlite::params![key, new, data, expected])? == 1)
    }
}

/// A connection and its prepared raw CAS statement.
struct RawPostgres(tokio_postgres::Client, tokio_postgres::Statement);

impl RawPostgres {
    async fn new(client: tokio_postgres::Client) -> Result<Self> {
        let stmt = client
            .prepare(
                "INSERT INTO raw_cas (shard, seqno, data) SELECT $1, $2, $3 \
                 WHERE (SELECT max(seqno) FROM raw_cas WHERE shard = $1) IS NOT DISTINCT FROM $4",
            )
            .await?;
        Ok(RawPostgres(client, stmt))
    }
}

impl RawCas for RawPostgres {
    async fn cas(
        &mut self,
        key: &str,
        expected: Option<i64>,
        new: i64,
        data: &[u8],
    ) -> Result<bool> {
        Ok(self
            .0
            .execute(&self.1, &[&key, &new, &data, &expected])
            .await?
            == 1)
    }
}

/// No baseline: the in-memory backend has no driver underneath.
struct NoBaseline;

impl RawCas for NoBaseline {
    async fn cas(&mut self, _: &str, _: Option<i64>, _: i64, _: &[u8]) -> Result<bool> {
        Ok(true)
    }
}

async fn bench_consensus(
    name: &str,
    consensus: Arc<dyn Consensus>,
    mut raw: impl RawCas,
    has_raw: bool,
) -> Result<()> {
    let data = Bytes::from(vec![7u8; CAS_PAYLOAD]);
    let ops = 100;
    let (mut ours, mut baseline) = (Latencies::default(), Latencies::default());
    let mut head: Option<SeqNo> = None;
    let mut raw_head: Option<i64> = None;
    for _ in 0..rounds() {
        for _ in 0..ops {
            let new = raw_head.map_or(0, |h| h + 1);
            let start = Instant::now();
            let won = raw.cas("bench", raw_head, new, &data).await?;
            baseline.push(start.elapsed());
            assert!(won, "raw CAS lost without contention");
            raw_head = Some(new);
        }
        for _ in 0..ops {
            let new = VersionedData {
                seqno: head.map_or(SeqNo(0), SeqNo::next),
                data: data.clone(),
            };
            let seqno = new.seqno;
            let start = Instant::now();
            let result = consensus.compare_and_set("bench", head, new).await?;
            ours.push(start.elapsed());
            assert_eq!(result, CaSResult::Committed);
            head = Some(seqno);
        }
    }
    let (p50, p99) = (ours.percentile(0.5), ours.percentile(0.99));
    if has_raw {
        let (b50, b99) = (baseline.percentile(0.5), baseline.percentile(0.99));
        println!(
            "consensus {name:<8} CAS: p50 {} p99 {} {:>7.0} ops/s | raw CAS statement p50 {} p99 {} {:>7.0} ops/s | \
             ratio p50 {:.2} p99 {:.2}",
            ms(p50),
            ms(p99),
            ours.ops_per_sec(),
            ms(b50),
            ms(b99),
            baseline.ops_per_sec(),
            p50.as_secs_f64() / b50.as_secs_f64(),
            p99.as_secs_f64() / b99.as_secs_f64(),
        );
    } else {
        println!(
            "consensus {name:<8} CAS: p50 {} p99 {} {:>7.0} ops/s | (no driver underneath: no baseline)",
            ms(p50),
            ms(p99),
            ours.ops_per_sec()
        );
    }
    Ok(())
}

async fn run() -> Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("persist-bench")
        .tempdir_in(std::env::current_dir()?)?;
    let raw_dir = dir.path().join("raw");
    fs::create_dir_all(&raw_dir)?;
    println!(
        "# persist backend benchmark ({} rounds, baselines in {})",
        rounds(),
        dir.path().display()
    );

    bench_blob("mem", Arc::new(MemBlob::new()), &raw_dir).await?;
    bench_blob(
        "file",
        Arc::new(FileBlob::open(dir.path().join("blob")).await?),
        &raw_dir,
    )
    .await?;
    // The test servers' helpers skip (or, under CI=true, fail) without them.
    match testing::s3_prefix().await {
        Some(uri) => {
            let blob = S3Blob::open(S3BlobConfig::from_uri(&uri)?).await?;
            bench_blob("s3", Arc::new(blob), &raw_dir).await?;
        }
        None => println!("blob s3: skipped (no S3 server; use `cargo xtask bench`)"),
    }

    bench_consensus("mem", Arc::new(MemConsensus::new()), NoBaseline, false).await?;

    let sqlite = SqliteConsensus::open(dir.path().join("consensus.db")).await?;
    let raw = rusqlite::Connection::open(dir.path().join("raw.db"))?;
    raw.query_row("PRAGMA journal_mode = WAL", [], |_| Ok(()))?;
    raw.pragma_update(None, "synchronous", "FULL")?;
    raw.execute_batch("CREATE TABLE raw_cas (shard TEXT, seqno INTEGER, data BLOB, PRIMARY KEY (shard, seqno)) WITHOUT ROWID")?;
    bench_consensus("sqlite", Arc::new(sqlite), RawSqlite(raw), true).await?;

    match testing::postgres_database().await {
        Some(uri) => {
            let consensus = PostgresConsensus::open(&uri).await?;
            let (client, connection) = tokio_postgres::connect(&uri, tokio_postgres::NoTls).await?;
            tokio::spawn(connection);
            client
                .batch_execute("CREATE TABLE raw_cas (shard text, seqno bigint, data bytea, PRIMARY KEY (shard, seqno))")
                .await?;
            bench_consensus(
                "postgres",
                Arc::new(consensus),
                RawPostgres::new(client).await?,
                true,
            )
            .await?;
        }
        None => {
            println!("consensus postgres: skipped (no PostgreSQL server; use `cargo xtask bench`)")
        }
    }
    Ok(())
}

fn main() -> Result<()> {
    // Arguments cargo passes to every bench target (e.g. `--bench`) are
    // ignored; this binary has no filters.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run())
}
