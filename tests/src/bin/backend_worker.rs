//! A child process for the multi-process tests.
//!
//! - `backend_worker cas <consensus-uri> <key> <worker> <tasks> <wins>`:
//!   `tasks` concurrent tasks each commit `wins` compare-and-sets to `key`.
//! - `backend_worker blob <blob-uri> <key> <worker> <writes> <len>`: sets
//!   `key` to this worker's payload `writes` times, checking every read back
//!   is some writer's whole value.
//!
//! `BACKEND_WORKER_START_AT_MS` delays the start (see [`wait_for_start`]).

use std::sync::Arc;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use persist::{CaSResult, Consensus, SeqNo, VersionedData, open_blob, open_consensus};
use persist_e2e::{blob_payload, cas_payload};

fn arg<T: std::str::FromStr>(args: &[String], i: usize, name: &str) -> Result<T>
where
    T::Err: std::error::Error + Send + Sync + 'static,
{
    args.get(i)
        .with_context(|| format!("missing argument <{name}>"))?
        .parse()
        .with_context(|| format!("invalid <{name}>"))
}

async fn cas(
    consensus: Arc<dyn Consensus>,
    key: String,
    worker: usize,
    task: usize,
    wins: usize,
) -> Result<()> {
    let mut head = consensus.head(&key).await?.map(|h| h.seqno);
    let mut won = 0;
    while won < wins {
        let new = VersionedData {
            seqno: head.map_or(SeqNo(0), SeqNo::next),
            data: Bytes::from(cas_payload(worker, task, won)),
        };
        let seqno = new.seqno;
        match consensus.compare_and_set(&key, head, new).await? {
            CaSResult::Committed => {
                won += 1;
                head = Some(seqno);
            }
            CaSResult::ExpectationMismatch(current) => head = current.map(|c| c.seqno),
        }
    }
    Ok(())
}

async fn run(args: Vec<String>) -> Result<()> {
    let mode: String = arg(&args, 1, "mode")?;
    let uri: String = arg(&args, 2, "uri")?;
    let key: String = arg(&args, 3, "key")?;
    let worker: usize = arg(&args, 4, "worker")?;
    match mode.as_str() {
        "cas" => {
            let tasks: usize = arg(&args, 5, "tasks")?;
            let wins: usize = arg(&args, 6, "wins")?;
            let consensus = open_consensus(&uri).await?;
            let mut set = tokio::task::JoinSet::new();
            for task in 0..tasks {
                set.spawn(cas(Arc::clone(&consensus), key.clone(), worker, task, wins));
            }
            while let Some(joined) = set.join_next().await {
                joined??;
            }
        }
        "blob" => {
            let writes: usize = arg(&args, 5, "writes")?;
            let len: usize = arg(&args, 6, "len")?;
            let blob = open_blob(&uri).await?;
            let id = u8::try_from(worker).context("worker id must fit a byte")?;
            for _ in 0..writes {
                blob.set(&key, Bytes::from(blob_payload(id, len))).await?;
                let read = blob.get(&key).await?.context("value vanished")?;
                if read.len() != len || read.iter().any(|b| *b != read[0]) {
                    bail!(
                        "torn value: {} bytes starting with {:?}",
                        read.len(),
                        read.first()
                    );
                }
            }
        }
        other => bail!("unknown mode {other:?}"),
    }
    Ok(())
}

/// With `BACKEND_WORKER_START_AT_MS` (milliseconds since the Unix epoch)
/// set, waits until then, so that processes started one after another begin
/// their work at the same moment.
async fn wait_for_start() -> Result<()> {
    let Ok(at) = std::env::var("BACKEND_WORKER_START_AT_MS") else {
        return Ok(());
    };
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(at.parse()?);
    if let Ok(wait) = at.duration_since(std::time::SystemTime::now()) {
        tokio::time::sleep(wait).await;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    wait_for_start().await?;
    run(std::env::args().collect()).await
}
