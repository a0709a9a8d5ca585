//! `persistcli check`: a smoke test of a location's two backends.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use persist::{CaSResult, SeqNo, VersionedData, open_blob, open_consensus};
use persist_types::PersistLocation;

/// The blob key and consensus key the check writes. The blob value is
/// deleted again; the consensus log keeps only its latest entry.
const PROBE_KEY: &str = "persistcli-check";

/// Options of `persistcli check`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The size of the probe blob, in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    blob_size: usize,
    /// How many compare-and-sets to time.
    #[arg(long, default_value_t = 20)]
    cas_count: usize,
}

fn report(step: &str, elapsed: Duration) {
    println!("  ok  {step:<44} {:>9.3} ms", elapsed.as_secs_f64() * 1e3);
}

/// Runs the check, printing each step; fails at the first step that fails,
/// naming it.
pub async fn run(location: &PersistLocation, args: &Args) -> Result<()> {
    println!("checking {location}");

    let start = Instant::now();
    let blob = open_blob(&location.blob_uri)
        .await
        .context("open blob store")?;
    report("open blob store", start.elapsed());

    let value: Bytes = (0..args.blob_size)
        .map(|i| (i % 251) as u8)
        .collect::<Vec<u8>>()
        .into();
    let start = Instant::now();
    blob.set(PROBE_KEY, value.clone())
        .await
        .context("blob set")?;
    report(
        &format!("blob set ({} bytes, durable)", value.len()),
        start.elapsed(),
    );
    let start = Instant::now();
    let read = blob.get(PROBE_KEY).await.context("blob get")?;
    ensure!(
        read.as_ref() == Some(&value),
        "blob get returned a different value than was set"
    );
    report("blob get (verified)", start.elapsed());
    let start = Instant::now();
    let deleted = blob.delete(PROBE_KEY).await.context("blob delete")?;
    ensure!(
        deleted == Some(value.len()),
        "blob delete reported {deleted:?} bytes"
    );
    report("blob delete", start.elapsed());

    let start = Instant::now();
    let consensus = open_consensus(&location.consensus_uri)
        .await
        .context("open consensus")?;
    report("open consensus", start.elapsed());
    let mut head = consensus
        .head(PROBE_KEY)
        .await
        .context("consensus head")?
        .map(|h| h.seqno);
    let mut latencies = Vec::with_capacity(args.cas_count);
    for i in 0..args.cas_count {
        let new = VersionedData {
            seqno: head.map_or(SeqNo(0), SeqNo::next),
            data: Bytes::from(format!("check {i}")),
        };
        let seqno = new.seqno;
        let start = Instant::now();
        match consensus
            .compare_and_set(PROBE_KEY, head, new)
            .await
            .context("consensus compare_and_set")?
        {
            CaSResult::Committed => head = Some(seqno),
            CaSResult::ExpectationMismatch(current) => {
                bail!(
                    "another process is running a check on this location (head moved to {current:?})"
                )
            }
        }
        latencies.push(start.elapsed());
    }
    latencies.sort();
    if let (Some(p50), Some(max)) = (latencies.get(latencies.len() / 2), latencies.last()) {
        report(
            &format!("consensus compare_and_set x{} (p50)", args.cas_count),
            *p50,
        );
        report("consensus compare_and_set (max)", *max);
    }
    if let Some(head) = head {
        let start = Instant::now();
        consensus
            .truncate(PROBE_KEY, head)
            .await
            .context("consensus truncate")?;
        report("consensus truncate to head", start.elapsed());
    }
    println!("location is healthy");
    Ok(())
}
