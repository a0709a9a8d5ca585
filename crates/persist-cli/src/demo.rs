//! `persistcli demo`: writes generated updates to a shard, reads them back
//! by snapshot and by listen, and checks both against what was written.

use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail, ensure};
use differential_dataflow::consolidation::consolidate_updates;
use indicatif::{HumanBytes, ProgressBar, ProgressStyle};
use persist_client::{FetchedUpdate, ListenEvent, PersistClient};
use persist_types::{PersistLocation, ShardId};
use timely::progress::Antichain;

use crate::types::{self, Diff, Key, Time, Update, Val};

/// How many distinct keys the generated updates use: fewer than updates,
/// so keys repeat with different values.
const KEY_SPACE: u64 = 10_000;

/// In every batch but the first, every `RETRACT_EVERY`th update retracts
/// an update of the batch before.
const RETRACT_EVERY: u64 = 10;

/// Options of `persistcli demo`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The shard to write. Default: a new shard. An existing shard must hold
    /// String keys and values, u64 times and i64 diffs; the demo appends at
    /// its upper and checks its own updates along with the earlier ones.
    #[arg(long)]
    shard: Option<ShardId>,
    /// How many batches to append, one per time.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..))]
    batches: u64,
    /// How many updates each batch holds.
    #[arg(long, default_value_t = 5000)]
    batch_size: u64,
    /// Print the client's Prometheus metrics at the end.
    #[arg(long)]
    metrics: bool,
}

/// What the demo appended.
#[derive(Debug)]
struct Written {
    /// The time of the first batch.
    first: Time,
    /// The shard's upper after the last batch.
    upper: Time,
    /// The shard's contents before the demo, at time `first - 1`.
    earlier: Vec<Update>,
    /// Every update appended, in order.
    updates: Vec<Update>,
    /// The bytes of the updates' keys and values, plus 16 for each time
    /// and diff.
    bytes: u64,
}

/// Runs the demo against `client`, printing a summary; fails if the shard
/// cannot be written or read, or if what is read back differs from what
/// was written.
pub async fn run(location: &PersistLocation, client: &PersistClient, args: &Args) -> Result<()> {
    // The default shard id is a new, random one.
    let shard = args.shard.unwrap_or_default();
    let (mut write, mut read) = types::open(client, shard, "persistcli demo").await?;
    let start = Instant::now();
    let written = append(&mut write, &mut read, args).await;
    write.expire().await;
    let written = match written {
        Ok(written) => written,
        Err(err) => {
            read.expire().await;
            return Err(err);
        }
    };
    let elapsed = start.elapsed();

    let last = written.upper - 1;
    let snapshot = read
        .snapshot_and_fetch(Antichain::from_elem(last))
        .await
        .map_err(|err| types::explain(shard, err))
        .context("snapshot")
        .and_then(decode);
    let snapshot = match snapshot {
        Ok(snapshot) => snapshot,
        Err(err) => {
            read.expire().await;
            return Err(err);
        }
    };
    // A listen yields the updates at times not at or before its as_of:
    // from `first - 1`, exactly the demo's.
    let mut listen = read
        .listen(Antichain::from_elem(written.first - 1))
        .await
        .map_err(|err| types::explain(shard, err))
        .context("listen")?;
    let listened = listen_until(&mut listen, written.upper).await;
    listen.expire().await;
    let listened = listened.map_err(|err| types::explain(shard, err))?;
    let listened = decode(listened)?;

    let mut blob_bytes = 0;
    let mut blob_count = 0;
    client
        .blob()
        .list_keys_and_metadata(&format!("{shard}/"), &mut |m| {
            blob_bytes += m.size_in_bytes;
            blob_count += 1;
        })
        .await
        .context("list the shard's blobs")?;

    let mut expected_snapshot: Vec<Update> = written
        .earlier
        .iter()
        .chain(&written.updates)
        .map(|(kv, _, d)| (kv.clone(), last, *d))
        .collect();
    consolidate_updates(&mut expected_snapshot);
    compare("the snapshot", expected_snapshot, &snapshot)?;
    compare("the listen", written.updates.clone(), &listened)?;

    let per_sec = written.updates.len() as f64 / elapsed.as_secs_f64().max(1e-9);
    println!("location   {location}");
    println!("shard id: {shard}");
    println!(
        "wrote      {} updates in {} batches at times {}..={} ({}, {} bytes of keys, values, times and diffs) in {:.2} s, {per_sec:.0} updates/s",
        written.updates.len(),
        args.batches,
        written.first,
        last,
        HumanBytes(written.bytes),
        written.bytes,
        elapsed.as_secs_f64(),
    );
    println!(
        "stored     {} in {blob_count} blobs ({blob_bytes} bytes)",
        HumanBytes(blob_bytes),
    );
    println!(
        "snapshot   at time {last}: {} updates after consolidation",
        snapshot.len()
    );
    println!(
        "listen     from time {}: {} updates",
        written.first - 1,
        listened.len()
    );
    println!("verified: snapshot and listen match the written data");
    if args.metrics {
        print!("{}", client.metrics().render());
    }
    Ok(())
}

/// Reads the shard's current contents, then appends the generated batches
/// at consecutive times from its upper (from time 1 on: time 0 stays empty
/// so that a listen from 0 sees every update).
async fn append(
    write: &mut persist_client::WriteHandle<Key, Val, Time, Diff>,
    read: &mut persist_client::ReadHandle<Key, Val, Time, Diff>,
    args: &Args,
) -> Result<Written> {
    let shard = write.shard_id();
    let upper = write
        .fetch_recent_upper()
        .await
        .map_err(|err| types::explain(shard, err))?
        .clone();
    let Some(&upper) = upper.as_option() else {
        bail!("shard {shard} is closed (its upper is empty): nothing can be appended");
    };
    let first = upper.max(1);
    if upper < first {
        write
            .advance_upper(&Antichain::from_elem(first))
            .await
            .map_err(|err| types::explain(shard, err))?;
    }
    let before = first - 1;
    ensure!(
        read.since().less_equal(&before),
        "shard {shard} has since {:?}: the demo cannot read its contents at time {before}, \
         before its own updates; use a new shard",
        read.since().elements(),
    );
    let end = first
        .checked_add(args.batches)
        .ok_or_else(|| anyhow!("{} batches from time {first} overflow u64", args.batches))?;
    let earlier = read
        .snapshot_and_fetch(Antichain::from_elem(before))
        .await
        .map_err(|err| types::explain(shard, err))
        .context("read the shard's earlier contents")?;
    let earlier = decode(earlier)?;

    let total = args.batches.saturating_mul(args.batch_size);
    // indicatif draws nothing when stderr is not a terminal.
    let bar = ProgressBar::new(total).with_style(
        ProgressStyle::with_template(
            "{spinner} writing [{bar:40}] {human_pos}/{human_len} updates, {msg} ({elapsed})",
        )
        .context("progress bar template")?
        .progress_chars("=> "),
    );
    let mut updates = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
    let mut bytes = 0;
    for (batch, time) in (first..end).enumerate() {
        let batch = batch as u64;
        bar.set_message(format!("batch {}/{}", batch + 1, args.batches));
        let generated = generate(batch, time, args.batch_size);
        bytes += generated
            .iter()
            .map(|((k, v), _, _)| (k.len() + v.len() + 16) as u64)
            .sum::<u64>();
        let appended = write
            .compare_and_append(
                &generated,
                Antichain::from_elem(time),
                Antichain::from_elem(time + 1),
            )
            .await
            .map_err(|err| types::explain(shard, err))
            .with_context(|| format!("append batch {} at time {time}", batch + 1))?;
        if let Err(mismatch) = appended {
            bar.abandon();
            bail!(
                "another writer appended to shard {shard} meanwhile: expected its upper \
                 at {:?} but it is at {:?}",
                mismatch.expected.elements(),
                mismatch.current.elements(),
            );
        }
        updates.extend(generated);
        bar.inc(args.batch_size);
    }
    bar.finish_and_clear();
    Ok(Written {
        first,
        upper: end,
        earlier,
        updates,
        bytes,
    })
}

/// Listens until the listen's frontier reaches `upper`, returning every
/// update it yielded.
async fn listen_until(
    listen: &mut persist_client::Listen<Key, Val, Time, Diff>,
    upper: Time,
) -> Result<Vec<FetchedUpdate<Key, Val, Time, Diff>>, persist_client::ClientError<Time>> {
    let mut updates = Vec::new();
    while listen.frontier().less_than(&upper) {
        for event in listen.fetch_next().await? {
            match event {
                ListenEvent::Updates(mut batch) => updates.append(&mut batch),
                ListenEvent::Progress(_) => {}
            }
        }
    }
    Ok(updates)
}

/// The updates with their keys and values decoded; fails at the first one
/// that could not be.
fn decode(updates: Vec<FetchedUpdate<Key, Val, Time, Diff>>) -> Result<Vec<Update>> {
    updates
        .into_iter()
        .map(|((k, v), t, d)| {
            let k = k.map_err(|err| anyhow!("undecodable key at time {t}: {err}"))?;
            let v = v.map_err(|err| anyhow!("undecodable value at time {t}: {err}"))?;
            Ok(((k, v), t, d))
        })
        .collect()
}

/// Fails unless `actual` and `expected` are the same collection (equal
/// after consolidation), naming a few differences.
fn compare(what: &str, expected: Vec<Update>, actual: &[Update]) -> Result<()> {
    let mut difference = expected;
    difference.extend(actual.iter().map(|(kv, t, d)| (kv.clone(), *t, -d)));
    consolidate_updates(&mut difference);
    if difference.is_empty() {
        return Ok(());
    }
    let (missing, extra): (Vec<_>, Vec<_>) = difference.iter().partition(|(_, _, d)| *d > 0);
    let show = |updates: &[&Update]| {
        updates
            .iter()
            .take(3)
            .map(|((k, v), t, d)| format!("(({k:?}, {v:?}), {t}, {d})"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    bail!(
        "{what} does not match the written data: {} updates missing (e.g. {}), {} unexpected \
         (e.g. {})",
        missing.len(),
        show(&missing),
        extra.len(),
        show(&extra),
    )
}

/// The updates of batch `batch` (counting from 0), all at `time`: mostly
/// inserts of fresh values under repeating keys, and in every batch but
/// the first, every [`RETRACT_EVERY`]th update retracts an insert of the
/// batch before.
fn generate(batch: u64, time: Time, batch_size: u64) -> Vec<Update> {
    (0..batch_size)
        .map(|i| {
            let n = batch * batch_size + i;
            if batch > 0 && i % RETRACT_EVERY == RETRACT_EVERY - 1 {
                // Update `i - 1` of the batch before was an insert.
                let earlier = n - batch_size - 1;
                ((key(earlier), value(earlier)), time, -1)
            } else {
                ((key(n), value(n)), time, 1)
            }
        })
        .collect()
}

/// The key of the `n`th generated update: scattered over [`KEY_SPACE`].
fn key(n: u64) -> String {
    format!("key-{:05}", mix(n) % KEY_SPACE)
}

/// The value of the `n`th generated update: unique to it.
fn value(n: u64) -> String {
    format!("value-{n:010}")
}

/// The splitmix64 finalizer: a cheap bijection that scatters `n`.
pub(crate) fn mix(n: u64) -> u64 {
    let mut z = n.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_retractions_cancel_earlier_inserts() {
        let mut all: Vec<Update> = (0..4u64)
            .flat_map(|b| generate(b, 100 + b, 50))
            .map(|(kv, _, d)| (kv, 0, d))
            .collect();
        assert_eq!(all.len(), 200);
        let retractions = all.iter().filter(|(_, _, d)| *d < 0).count();
        assert_eq!(retractions, 3 * 5);
        consolidate_updates(&mut all);
        assert_eq!(all.len(), 200 - 2 * retractions);
        assert!(all.iter().all(|(_, _, d)| *d == 1));
    }

    #[test]
    fn compare_names_missing_and_unexpected_updates() {
        let a = (("a".to_owned(), "1".to_owned()), 1, 1);
        let b = (("b".to_owned(), "2".to_owned()), 1, 1);
        assert!(compare("x", vec![a.clone(), b.clone()], &[b.clone(), a.clone()]).is_ok());
        let err = compare("the listen", vec![a.clone()], &[b]).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("the listen does not match"), "{msg}");
        assert!(msg.contains("1 updates missing"), "{msg}");
        assert!(msg.contains("\"b\""), "{msg}");
    }
}
