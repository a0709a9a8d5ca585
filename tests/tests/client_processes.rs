//! The client across processes: a writer killed with SIGKILL in the middle
//! of appending, and shards written by one process and read by another
//! (durability across a restart), and compactions from several processes,
//! on file+SQLite and PostgreSQL+S3.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;

use persist::testing;
use persist_client::{Diagnostics, PersistClient, PersistConfig};
use persist_e2e::client_batch;
use persist_types::{ShardId, StringSchema};
use timely::progress::Antichain;

const WORKER: &str = env!("CARGO_BIN_EXE_client_worker");

/// A client of the location in a state a fresh process would have.
async fn fresh_client(blob_uri: &str, consensus_uri: &str) -> PersistClient {
    let blob = persist::open_blob(blob_uri).await.unwrap();
    let consensus = persist::open_consensus(consensus_uri).await.unwrap();
    PersistClient::new(PersistConfig::new_for_tests(), blob, consensus)
}

/// Reads the whole shard and checks it holds batches `0..upper` of
/// `client_batch(_, size)`, each complete, and nothing else.
async fn check_whole_batches(client: &PersistClient, shard: ShardId, size: usize) -> u64 {
    let mut read = client
        .open_leased_reader::<String, String, u64, i64>(
            shard,
            Arc::new(StringSchema::new()),
            Arc::new(StringSchema::new()),
            Diagnostics::for_tests(),
        )
        .await
        .unwrap();
    let state = client.inspect_shard::<u64>(shard).await.unwrap().unwrap();
    let upper: u64 = state["upper"][0].as_str().unwrap().parse().unwrap();
    if upper == 0 {
        return 0;
    }
    let got = read
        .snapshot_and_fetch(Antichain::from_elem(upper - 1))
        .await
        .unwrap();
    let mut per_batch: BTreeMap<u64, usize> = BTreeMap::new();
    for ((k, v), t, d) in &got {
        assert_eq!(*t, upper - 1, "times advanced to the as_of");
        assert_eq!(*d, 1, "no update applied twice");
        let k = k.as_ref().unwrap();
        v.as_ref().unwrap();
        let b: u64 = k[1..k.find('-').unwrap()].parse().unwrap();
        *per_batch.entry(b).or_default() += 1;
    }
    let expected: BTreeMap<u64, usize> = (0..upper).map(|b| (b, size)).collect();
    assert_eq!(
        per_batch, expected,
        "every batch below the upper, each whole"
    );
    read.expire().await;
    upper
}

/// A writer killed with SIGKILL mid-stream leaves a shard that is readable
/// and holds each of its batches whole or not at all; another writer
/// carries on from where it stopped.
async fn killed_writer_leaves_whole_batches(blob_uri: &str, consensus_uri: &str) {
    const SIZE: usize = 2000;
    let shard = ShardId::new();
    let mut child = Command::new(WORKER)
        .args([
            blob_uri,
            consensus_uri,
            &shard.to_string(),
            "0",
            "1000",
            &SIZE.to_string(),
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    for _ in 0..3 {
        let line = lines.next().unwrap().unwrap();
        assert!(line.starts_with("appended "), "{line}");
    }
    // Kill it in the middle of writing parts or committing state.
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert!(!status.success());

    let client = fresh_client(blob_uri, consensus_uri).await;
    let upper = check_whole_batches(&client, shard, SIZE).await;
    assert!(
        upper >= 3,
        "the reported appends are durable: upper {upper}"
    );

    // A new writer continues from the shard's upper.
    let status = Command::new(WORKER)
        .args([
            blob_uri,
            consensus_uri,
            &shard.to_string(),
            &upper.to_string(),
            "2",
            "10",
        ])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let state = client.inspect_shard::<u64>(shard).await.unwrap().unwrap();
    assert_eq!(state["upper"][0].as_str().unwrap(), (upper + 2).to_string());
}

/// What one process appended, a later process reads, exactly.
async fn durable_across_processes(blob_uri: &str, consensus_uri: &str) {
    const SIZE: usize = 300;
    let shard = ShardId::new();
    let status = Command::new(WORKER)
        .args([
            blob_uri,
            consensus_uri,
            &shard.to_string(),
            "0",
            "5",
            &SIZE.to_string(),
        ])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let client = fresh_client(blob_uri, consensus_uri).await;
    assert_eq!(check_whole_batches(&client, shard, SIZE).await, 5);
    // And the data is the data, not just the right count.
    let mut read = client
        .open_leased_reader::<String, String, u64, i64>(
            shard,
            Arc::new(StringSchema::new()),
            Arc::new(StringSchema::new()),
            Diagnostics::for_tests(),
        )
        .await
        .unwrap();
    let got = read
        .snapshot_and_fetch(Antichain::from_elem(4))
        .await
        .unwrap();
    let mut expected: Vec<_> = (0..5)
        .flat_map(|b| client_batch(b, SIZE))
        .map(|((k, v), _, d)| ((Ok(k), Ok(v)), 4u64, d))
        .collect();
    expected.sort();
    assert_eq!(got, expected);
}

/// Two processes compact (and collect garbage) while this one appends and
/// a reader follows the upper with its since: the shard still holds every
/// batch whole, once.
async fn concurrent_compactions_across_processes(blob_uri: &str, consensus_uri: &str) {
    const SIZE: usize = 20;
    let shard = ShardId::new();
    let client = fresh_client(blob_uri, consensus_uri).await;
    let (mut write, mut read) = client
        .open::<String, String, u64, i64>(
            shard,
            Arc::new(StringSchema::new()),
            Arc::new(StringSchema::new()),
            Diagnostics::for_tests(),
        )
        .await
        .unwrap();
    let compactors: Vec<_> = (0..2)
        .map(|_| {
            Command::new(WORKER)
                .args([blob_uri, consensus_uri, &shard.to_string(), "compact", "30"])
                .stdout(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    for b in 0..60u64 {
        write
            .compare_and_append(
                &client_batch(b, SIZE),
                Antichain::from_elem(b),
                Antichain::from_elem(b + 1),
            )
            .await
            .unwrap()
            .unwrap();
        read.downgrade_since(&Antichain::from_elem(b))
            .await
            .unwrap();
    }
    for mut child in compactors {
        assert!(child.wait().unwrap().success());
    }
    assert_eq!(check_whole_batches(&client, shard, SIZE).await, 60);
    let state = client.inspect_shard::<u64>(shard).await.unwrap().unwrap();
    let batches = state["batches"].as_array().unwrap().len();
    assert!(batches <= 12, "{batches} batches after 60 appends");
}

fn embedded(dir: &std::path::Path) -> (String, String) {
    let location = persist_types::PersistLocation::embedded(dir);
    (location.blob_uri, location.consensus_uri)
}

#[tokio::test]
async fn file_sqlite_killed_writer_leaves_whole_batches() {
    let dir = tempfile::tempdir().unwrap();
    let (blob, consensus) = embedded(dir.path());
    killed_writer_leaves_whole_batches(&blob, &consensus).await;
}

#[tokio::test]
async fn file_sqlite_durable_across_processes() {
    let dir = tempfile::tempdir().unwrap();
    let (blob, consensus) = embedded(dir.path());
    durable_across_processes(&blob, &consensus).await;
}

#[tokio::test]
async fn postgres_s3_killed_writer_leaves_whole_batches() {
    let (Some(consensus), Some(blob)) = (
        testing::postgres_database().await,
        testing::s3_prefix().await,
    ) else {
        return;
    };
    killed_writer_leaves_whole_batches(&blob, &consensus).await;
}

#[tokio::test]
async fn postgres_s3_durable_across_processes() {
    let (Some(consensus), Some(blob)) = (
        testing::postgres_database().await,
        testing::s3_prefix().await,
    ) else {
        return;
    };
    durable_across_processes(&blob, &consensus).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_sqlite_concurrent_compactions_across_processes() {
    let dir = tempfile::tempdir().unwrap();
    let (blob, consensus) = embedded(dir.path());
    concurrent_compactions_across_processes(&blob, &consensus).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_s3_concurrent_compactions_across_processes() {
    let (Some(consensus), Some(blob)) = (
        testing::postgres_database().await,
        testing::s3_prefix().await,
    ) else {
        return;
    };
    concurrent_compactions_across_processes(&blob, &consensus).await;
}
