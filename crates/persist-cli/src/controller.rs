//! `persistcli controller`: the storage controller (`storage-collections`)
//! at work on a location.
//!
//! `controller demo` walks through a controller's life on new shards: it
//! creates two tables and a collection derived from both, writes to them,
//! shows read policies and a read hold keeping sinces back, reads a
//! snapshot, and drops collections until a shard is finalized.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail, ensure};
use persist_client::{Diagnostics, PersistClient};
use persist_types::{PersistLocation, ShardId, SimpleSchema};
use storage_collections::durable::DurableMetadata;
use storage_collections::{
    CollectionDescription, ControllerConfig, GlobalId, ReadPolicy, Row, StorageCollectionsImpl,
    Timestamp, Update,
};
use timely::progress::Antichain;

/// The demo's metadata shard: one well-known id, so every run on a
/// location finds the controller state of the runs before it.
const METADATA_SHARD: ShardId = ShardId::from_bytes(*b"persistcli-demo!");

const U1: GlobalId = GlobalId::User(1);
const U2: GlobalId = GlobalId::User(2);
const U3: GlobalId = GlobalId::User(3);

/// The demo writes at times `0..TIMES`, so the tables' uppers end at `TIMES`.
const TIMES: Timestamp = 5;
/// Rows written to u1 and to u2 at each time.
const U1_ROWS: usize = 3;
const U2_ROWS: usize = 2;
/// u1's read policy keeps its since this far behind its last complete time.
const U1_LAG: Timestamp = 2;

/// What to do with the controller.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Walks through the storage controller on new shards, printing each
    /// step: opens a controller with a new epoch, creates tables u1 and u2
    /// and a collection u3 derived from both, writes to them, shows a read
    /// hold on u3 holding back u1 and u2, snapshots u1, then drops u3 and
    /// u2 and waits until u2's shard is finalized.
    Demo(DemoArgs),
}

/// Options of `persistcli controller demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// How long to wait for the controller's background task (following
    /// uppers, finalizing shards) before failing, in seconds.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    timeout_secs: u64,
}

/// Runs `controller`.
pub async fn run(location: &PersistLocation, command: &Command) -> Result<()> {
    let client = crate::open_client(location).await?;
    match command {
        Command::Demo(args) => demo(location, client, args).await,
    }
}

async fn demo(location: &PersistLocation, client: PersistClient, args: &DemoArgs) -> Result<()> {
    let timeout = Duration::from_secs(args.timeout_secs);
    println!("location   {location}");

    println!("1. open a controller and create collections");
    // An observer that records nothing: no epoch is newer than the largest,
    // so it cannot be fenced out, and it can read the epoch in charge.
    let observer = DurableMetadata::open(&client, METADATA_SHARD, u64::MAX, false)
        .await
        .context("read the controller's durable metadata")?;
    let last_epoch = observer.current().epoch;
    let epoch = last_epoch
        .checked_add(1)
        .ok_or_else(|| anyhow!("the durable epoch {last_epoch} cannot be exceeded"))?;
    let sc = StorageCollectionsImpl::open(
        client.clone(),
        location.clone(),
        METADATA_SHARD,
        epoch,
        false,
        ControllerConfig {
            tick: Duration::from_millis(50),
        },
    )
    .await
    .with_context(|| format!("open the controller of epoch {epoch}"))?;
    println!("   opened the controller of epoch {epoch} (metadata shard {METADATA_SHARD})");
    // Collections an earlier run left behind are dropped: each run uses new
    // shards, and the old ones are finalized in the background.
    let left = sc.durable_metadata().await.collections;
    sc.initialize_state(&BTreeSet::new())
        .await
        .context("retire the collections of earlier runs")?;
    for (id, shard) in &left {
        println!("   retired {id} of an earlier run: shard {shard} will be finalized");
    }
    sc.create_collections_for_bootstrap(vec![
        (U1, CollectionDescription::table()),
        (U2, CollectionDescription::table()),
        (U3, CollectionDescription::derived(vec![U1, U2])),
    ])
    .await
    .context("create u1, u2 and u3")?;
    for (id, what) in [(U1, "table"), (U2, "table"), (U3, "derived from u1 and u2")] {
        println!("   created {id} ({what}): shard {}", shard(&sc, id)?);
    }

    println!("2. write");
    for t in 0..TIMES {
        let u1 = rows(U1, U1_ROWS, t);
        let u2 = rows(U2, U2_ROWS, t);
        // u3 is what a dataflow would compute: here, the union of both.
        let u3 = u1.iter().chain(&u2).cloned().collect();
        for (id, updates) in [(U1, u1), (U2, u2), (U3, u3)] {
            write(&sc, id, updates, t).await?;
        }
    }
    println!(
        "   wrote {U1_ROWS} rows to u1, {U2_ROWS} to u2 and their union to u3 at each time 0..={}",
        TIMES - 1
    );
    wait_until(
        timeout,
        "the controller to see the new uppers",
        async || {
            Ok([U1, U2, U3].into_iter().all(|id| {
                sc.collection_frontiers(id)
                    .is_ok_and(|f| f.write_frontier == Antichain::from_elem(TIMES))
            }))
        },
    )
    .await?;

    println!("3. read policies and a read hold");
    let hold = sc
        .acquire_read_holds(vec![U3])
        .context("acquire a read hold on u3")?
        .pop()
        .ok_or_else(|| anyhow!("no read hold returned for u3"))?;
    let held = hold.since().clone();
    println!("   acquired a read hold on u3 at {}", show(&held));
    let lag = |lag| ReadPolicy::LagWriteFrontier {
        lag,
        granularity: 1,
    };
    sc.set_read_policies(vec![(U1, lag(U1_LAG)), (U2, lag(0)), (U3, lag(0))])
        .context("set read policies")?;
    println!("   set read policies: u1 lags its last complete time by {U1_LAG}, u2 and u3 by 0");
    print_frontiers(&sc)?;
    for id in [U1, U2] {
        ensure!(
            since(&sc, id)? == held,
            "{id} should be held at {} by the hold on u3",
            show(&held)
        );
    }
    println!(
        "   u1 and u2 stay at {}: u3 depends on both, and the hold on u3 holds them too",
        show(&held)
    );
    hold.release();
    println!("   released the hold on u3");
    print_frontiers(&sc)?;
    for id in [U1, U2, U3] {
        let implied = sc.collection_frontiers(id)?.implied_capability;
        ensure!(
            since(&sc, id)? == implied,
            "{id}'s since should follow its read policy to {} once released",
            show(&implied)
        );
    }
    println!("   the sinces moved to what the read policies allow");
    // The controller downgrades the shard's critical since in persist in
    // the background, at most once per `since_downgrade_interval`.
    let u1_since = since(&sc, U1)?;
    let u1_shard = shard(&sc, U1)?;
    wait_until(timeout, "u1's since in persist to follow", async || {
        let persisted = client
            .fetch_recent_since::<Row, (), Timestamp, i64>(u1_shard)
            .await
            .with_context(|| format!("read the since of shard {u1_shard}"))?;
        Ok(persisted == u1_since)
    })
    .await?;
    println!(
        "   u1's shard in persist now has since {} too",
        show(&u1_since)
    );

    println!("4. snapshot");
    let as_of = TIMES - 1;
    let snapshot = sc
        .snapshot(U1, Antichain::from_elem(as_of))
        .await
        .context("snapshot u1")?;
    let count: i64 = snapshot.iter().map(|(_, _, diff)| diff).sum();
    let expected = TIMES * U1_ROWS as u64;
    ensure!(
        u64::try_from(count) == Ok(expected),
        "the snapshot of u1 at time {as_of} has {count} rows, expected {expected}"
    );
    println!("   snapshot of u1 at time {as_of}: {count} rows");

    println!("5. drop and finalize");
    let u2_shard = shard(&sc, U2)?;
    // u3 holds u2 back, so it goes first.
    for id in [U3, U2] {
        sc.drop_collections_unvalidated(&BTreeSet::from([id]))
            .await
            .with_context(|| format!("drop {id}"))?;
        println!("   dropped {id}");
    }
    println!("   waiting for the controller to finalize shard {u2_shard}");
    let finalized = wait_until(timeout, "u2's shard to be finalized", async || {
        Ok(sc.durable_metadata().await.finalized.contains(&u2_shard))
    })
    .await;
    if let Err(err) = finalized {
        return Err(err.context(format!("the controller's state: {}", sc.dump().await)));
    }
    let is_finalized = client
        .is_finalized::<Row, (), Timestamp, i64>(
            u2_shard,
            Diagnostics::from_purpose("persistcli controller demo"),
        )
        .await
        .with_context(|| format!("read the state of shard {u2_shard}"))?;
    ensure!(
        is_finalized,
        "the controller recorded shard {u2_shard} as finalized, but the shard is not"
    );
    println!("finalized shard {u2_shard} of dropped collection u2");
    Ok(())
}

/// `n` rows of `id` for time `t`.
fn rows(id: GlobalId, n: usize, t: Timestamp) -> Vec<Update> {
    (0..n)
        .map(|i| ((format!("{id} row {i} at {t}").into_bytes(), ()), t, 1))
        .collect()
}

/// Appends `updates` to `id` as the batch `[t, t + 1)`.
async fn write(
    sc: &StorageCollectionsImpl,
    id: GlobalId,
    updates: Vec<Update>,
    t: Timestamp,
) -> Result<()> {
    let shard = shard(sc, id)?;
    let mut writer = sc
        .client()
        .open_writer::<Row, (), Timestamp, i64>(
            shard,
            Arc::new(SimpleSchema::new()),
            Arc::new(SimpleSchema::new()),
            Diagnostics::from_purpose("persistcli controller demo"),
        )
        .await
        .with_context(|| format!("open a writer of {id}"))?;
    let appended = writer
        .compare_and_append(
            &updates,
            Antichain::from_elem(t),
            Antichain::from_elem(t + 1),
        )
        .await;
    writer.expire().await;
    if let Err(mismatch) = appended.with_context(|| format!("write {id} at time {t}"))? {
        bail!(
            "write {id} at time {t}: its upper is {}, not {}",
            show(&mismatch.current),
            show(&mismatch.expected)
        );
    }
    Ok(())
}

fn shard(sc: &StorageCollectionsImpl, id: GlobalId) -> Result<ShardId> {
    Ok(sc.collection_metadata(id)?.data_shard)
}

fn since(sc: &StorageCollectionsImpl, id: GlobalId) -> Result<Antichain<Timestamp>> {
    Ok(sc.collection_frontiers(id)?.read_capabilities)
}

fn print_frontiers(sc: &StorageCollectionsImpl) -> Result<()> {
    for id in [U1, U2, U3] {
        let f = sc.collection_frontiers(id)?;
        println!(
            "     {id}: upper {:<4} policy allows {:<4} since {}",
            show(&f.write_frontier),
            show(&f.implied_capability),
            show(&f.read_capabilities)
        );
    }
    Ok(())
}

/// A frontier as its elements, `[5]` or `[]`.
fn show(frontier: &Antichain<Timestamp>) -> String {
    format!("{:?}", frontier.elements())
}

/// Polls `done` until it holds, failing after `timeout`.
async fn wait_until(
    timeout: Duration,
    what: &str,
    mut done: impl AsyncFnMut() -> Result<bool>,
) -> Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    while !done().await? {
        if tokio::time::Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}
