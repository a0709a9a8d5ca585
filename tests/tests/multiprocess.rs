//! Several processes on one shard's storage: compare-and-set races, a writer
//! killed mid-flight, and concurrent blob writers.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::process::{Child, Command};
use std::time::Duration;

use bytes::Bytes;
use persist::{CaSResult, SeqNo, VersionedData, open_blob, open_consensus, testing};
use persist_e2e::cas_payload;

const WORKER: &str = env!("CARGO_BIN_EXE_backend_worker");

fn spawn(args: &[&str]) -> Child {
    Command::new(WORKER)
        .args(args)
        .spawn()
        .expect("start backend_worker")
}

fn wait_ok(mut child: Child) {
    let status = child.wait().expect("wait for backend_worker");
    assert!(status.success(), "backend_worker failed: {status}");
}

/// Starts `workers` processes with `tasks` tasks each racing to commit `wins`
/// entries to one key, then checks the log: gapless, and every win in it
/// exactly once.
async fn cas_race_across_processes(uri: &str) {
    const WORKERS: usize = 4;
    const TASKS: usize = 2;
    const WINS: usize = 10;
    let children: Vec<Child> = (0..WORKERS)
        .map(|w| {
            spawn(&[
                "cas",
                uri,
                "race",
                &w.to_string(),
                &TASKS.to_string(),
                &WINS.to_string(),
            ])
        })
        .collect();
    children.into_iter().for_each(wait_ok);

    let consensus = open_consensus(uri).await.unwrap();
    let log = consensus.scan("race", SeqNo(0), usize::MAX).await.unwrap();
    let total = WORKERS * TASKS * WINS;
    let seqnos: Vec<u64> = log.iter().map(|e| e.seqno.0).collect();
    assert_eq!(seqnos, (0..total as u64).collect::<Vec<_>>());
    let written: BTreeSet<Bytes> = log.into_iter().map(|e| e.data).collect();
    let expected: BTreeSet<Bytes> = (0..WORKERS)
        .flat_map(|w| {
            (0..TASKS).flat_map(move |t| (0..WINS).map(move |n| Bytes::from(cas_payload(w, t, n))))
        })
        .collect();
    assert_eq!(written, expected);
}

#[tokio::test]
async fn sqlite_cas_race_across_processes() {
    let dir = tempfile::tempdir().unwrap();
    let uri = format!("sqlite://{}/consensus.db", dir.path().display());
    cas_race_across_processes(&uri).await;
}

/// Processes that open a fresh SQLite database at the same moment all get
/// it: switching to WAL and creating the schema race for the write lock,
/// which SQLite refuses at once (not after the busy timeout) to all but one.
#[test]
fn sqlite_first_open_from_many_processes() {
    const ROUNDS: usize = 20;
    const WORKERS: usize = 8;
    for round in 0..ROUNDS {
        let dir = tempfile::tempdir().unwrap();
        let uri = format!("sqlite://{}/consensus.db", dir.path().display());
        let start = std::time::SystemTime::now() + Duration::from_millis(200);
        let start = start.duration_since(std::time::UNIX_EPOCH).unwrap();
        let children: Vec<Child> = (0..WORKERS)
            .map(|w| {
                Command::new(WORKER)
                    .args(["cas", &uri, "first", &w.to_string(), "1", "1"])
                    .env("BACKEND_WORKER_START_AT_MS", start.as_millis().to_string())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for child in children {
            let mut child = child;
            let status = child.wait().unwrap();
            assert!(status.success(), "round {round}: a worker failed: {status}");
        }
    }
}

#[tokio::test]
async fn postgres_cas_race_across_processes() {
    let Some(uri) = testing::postgres_database().await else {
        return;
    };
    cas_race_across_processes(&uri).await;
}

/// A process killed (SIGKILL) while committing leaves a log that is whole:
/// gapless, every entry one of its writes, and open to the next writer.
async fn killed_writer_leaves_a_whole_log(uri: &str) {
    let consensus = open_consensus(uri).await.unwrap();
    let count = |prefix: &'static [u8]| {
        let consensus = std::sync::Arc::clone(&consensus);
        async move {
            let log = consensus
                .scan("killed", SeqNo(0), usize::MAX)
                .await
                .unwrap();
            log.iter().filter(|e| e.data.starts_with(prefix)).count()
        }
    };
    let mut victim = spawn(&["cas", uri, "killed", "0", "2", "1000000"]);
    let survivor = spawn(&["cas", uri, "killed", "1", "1", "50"]);
    // Kill the victim mid-stream, once both writers are demonstrably racing.
    for _ in 0..400 {
        if count(b"w0/").await >= 10 && count(b"w1/").await >= 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(
        victim.try_wait().unwrap().is_none(),
        "the victim must still be writing"
    );
    victim.kill().unwrap();
    victim.wait().unwrap();
    wait_ok(survivor);

    let log = consensus
        .scan("killed", SeqNo(0), usize::MAX)
        .await
        .unwrap();
    for (i, entry) in log.iter().enumerate() {
        assert_eq!(entry.seqno, SeqNo(i as u64), "gapless");
        let payload = std::str::from_utf8(&entry.data).unwrap();
        assert!(
            payload.starts_with("w0/") || payload.starts_with("w1/"),
            "{payload:?}"
        );
    }
    assert!(
        count(b"w0/").await >= 10,
        "the victim wrote before it was killed"
    );
    assert_eq!(count(b"w1/").await, 50, "the survivor finished");
    let head = log.last().unwrap().seqno;
    let next = VersionedData {
        seqno: head.next(),
        data: Bytes::from_static(b"after"),
    };
    assert_eq!(
        consensus
            .compare_and_set("killed", Some(head), next)
            .await
            .unwrap(),
        CaSResult::Committed
    );
}

#[tokio::test]
async fn sqlite_killed_writer_leaves_a_whole_log() {
    let dir = tempfile::tempdir().unwrap();
    let uri = format!("sqlite://{}/consensus.db", dir.path().display());
    killed_writer_leaves_a_whole_log(&uri).await;
}

#[tokio::test]
async fn postgres_killed_writer_leaves_a_whole_log() {
    let Some(uri) = testing::postgres_database().await else {
        return;
    };
    killed_writer_leaves_a_whole_log(&uri).await;
}

/// Processes overwriting one key see only whole values, and so does a
/// reader in another process.
async fn blob_writers_across_processes(uri: &str) {
    const LEN: usize = 256 << 10;
    let children: Vec<Child> = (1..=3u8)
        .map(|w| {
            spawn(&[
                "blob",
                uri,
                "shared",
                &w.to_string(),
                "20",
                &LEN.to_string(),
            ])
        })
        .collect();
    let blob = open_blob(uri).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut reads = 0;
    while reads < 50 {
        assert!(
            std::time::Instant::now() < deadline,
            "writers never produced a value"
        );
        if let Some(value) = blob.get("shared").await.unwrap() {
            assert_eq!(value.len(), LEN);
            assert!(
                value.iter().all(|b| *b == value[0]) && (1..=3).contains(&value[0]),
                "torn value"
            );
            reads += 1;
        }
        tokio::task::yield_now().await;
    }
    children.into_iter().for_each(wait_ok);
    let last = blob.get("shared").await.unwrap().unwrap();
    assert!((1..=3).contains(&last[0]));
}

#[tokio::test]
async fn file_blob_writers_across_processes() {
    let dir = tempfile::tempdir().unwrap();
    blob_writers_across_processes(&format!("file://{}/blob", dir.path().display())).await;
}

#[tokio::test]
async fn s3_blob_writers_across_processes() {
    let Some(uri) = testing::s3_prefix().await else {
        return;
    };
    blob_writers_across_processes(&uri).await;
}
