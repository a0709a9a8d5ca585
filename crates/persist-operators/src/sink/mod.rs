//! `persist_sink`: keeping a shard's contents equal to a collection.
//!
//! The sink does not simply append its input. It reads its target shard
//! back (with a [`shard_source`]) and writes the *difference* between what
//! the shard should hold (`desired`) and what it holds (`persist`). So it
//! corrects a shard that holds something else (a previous incarnation's
//! partial output, another replica's writes, garbage), and several sinks
//! with equal `desired` collections may write one shard at once: whichever
//! append wins, the others see it and write only what is still missing.
//!
//! ```text
//!   desired ok/err ---> mint ---(passed through)---> write ---batches---> append
//!                        |  \                        ^  ^                   ^  |
//!                        |   `--descs (broadcast)----'  |                   |  | own appends
//!                        `---descs (same worker)--------+-------------------'  v
//!   read-back source (on append's worker) --------------'
//!     fetched data, and the bounds of own appends it did not fetch
//! ```
//!
//! - `mint` (one worker) decides the bounds `[lower, upper)` of the next
//!   batch: `lower` is the shard's upper, `upper` the desired frontier. It
//!   mints a new description only when the shard's upper moved past the
//!   previous `lower`, so lowers strictly increase and at most one
//!   description is worth appending at a time. In read-only mode it mints
//!   nothing (so nothing downstream writes).
//! - `write` (every worker) keeps `desired - persist` in a correction
//!   buffer, for the data hashed to it. Once the shard is accounted for up
//!   to `lower` and the desired collection is complete up to `upper`, it
//!   takes the buffer's updates before `upper` out, encodes them on the
//!   runtime as one batch (or, for a large share, several in parallel)
//!   without appending it, and keeps them aside until the shard shows
//!   whether the append went through.
//! - `append` (the minting worker) collects every worker's batches for the
//!   description and appends them as one logical batch with
//!   `compare_and_append_batch`. If another writer moved the upper first,
//!   it deletes them; the correction loop makes up for it later. It
//!   records each successful append for the read-back source.
//!
//! The read-back source runs its listen on the appending worker. A listen
//! step (or the first snapshot) that lies wholly inside the sink's own
//! successful appends is not fetched: the shard holds exactly the batches
//! the workers wrote there. The source sends those appends' bounds instead,
//! in order with the data it does fetch, and each `write` worker drops the
//! updates it kept aside for them. Everything else (other writers' batches,
//! a previous incarnation's data, an own batch merged with another before
//! the listen reached it) is fetched and subtracted as before; a worker
//! whose batch was not appended as written puts its updates back.
//!
//! Times are `u64`: descriptions step their capability to `lower + 1`.
//!
//! [`shard_source`]: crate::source::shard_source

mod append;
mod correction;
mod mint;
mod write;

use std::fmt::Debug;
use std::hash::Hash;
use std::sync::Arc;

use differential_dataflow::{Hashable, VecCollection};
use persist_client::{Diagnostics, PersistClient, WriteHandle};
use persist_types::{Codec, ShardId};
use serde::{Deserialize, Serialize};
use timely::dataflow::operators::core::OkErr;
use timely::dataflow::operators::probe::Handle as ProbeHandle;
use timely::dataflow::operators::{Inspect, Probe};
use timely::progress::Antichain;
use timely::{ExchangeData, PartialOrder};
use tokio::sync::watch;

use crate::builder::ShutdownButton;
use crate::own_appends::OwnAppends;
use crate::record::{Record, RecordSchema};
use crate::source::{ReadBackHooks, ShardSourceArgs, SourceToken, shard_source_with};

/// What a sink's shard holds: rows of the ok collection and of the error
/// collection, as keys, with `()` values, `u64` times and `i64` diffs.
pub type SinkWriteHandle<K, V, E> = WriteHandle<Record<K, V, E>, (), u64, i64>;

/// The types a sink writes: persist codecs that timely can exchange and
/// differential can consolidate, and that the runtime's threads can encode
/// (`Send + Sync`).
pub trait SinkData: Codec + ExchangeData + Clone + Ord + Hash + Debug + Sync {}

impl<X: Codec + ExchangeData + Clone + Ord + Hash + Debug + Sync> SinkData for X {}

/// Where and how a [`persist_sink`] writes.
pub struct PersistSinkArgs<K: Codec, V: Codec, E: Codec> {
    /// The sink's name: names its operators and picks the worker that mints
    /// and appends (equal names pick equal workers everywhere).
    pub name: String,
    /// The client of the shard's location.
    pub client: PersistClient,
    /// The shard to maintain (created if it does not exist).
    pub shard_id: ShardId,
    /// The desired collection is only defined at times at or after `as_of`:
    /// the sink writes nothing before it, and first moves the shard's upper
    /// up to it if it is behind.
    pub as_of: Antichain<u64>,
    /// The schema of the shard's keys.
    pub schema: Arc<RecordSchema<K, V, E>>,
    /// `true` while the sink must not write: it follows the shard and its
    /// input but mints nothing until the value becomes `false`. A dropped
    /// sender leaves the last value in force.
    pub read_only: watch::Receiver<bool>,
    /// The runtime the operators' futures (and persist's tasks) run on;
    /// multi-threaded (parts are encoded and decoded on its blocking pool).
    pub runtime: tokio::runtime::Handle,
}

impl<K: Codec, V: Codec, E: Codec> Debug for PersistSinkArgs<K, V, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PersistSinkArgs")
            .field("name", &self.name)
            .field("shard_id", &self.shard_id)
            .field("as_of", &self.as_of)
            .field("read_only", &*self.read_only.borrow())
            .finish_non_exhaustive()
    }
}

impl<K: Codec, V: Codec, E: Codec> PersistSinkArgs<K, V, E> {
    /// A writable sink of `shard_id` from time 0, with the default schemas.
    pub fn new(
        name: impl Into<String>,
        client: PersistClient,
        shard_id: ShardId,
        runtime: tokio::runtime::Handle,
    ) -> Self
    where
        K::Schema: Default,
        V::Schema: Default,
        E::Schema: Default,
    {
        PersistSinkArgs {
            name: name.into(),
            client,
            shard_id,
            as_of: Antichain::from_elem(0),
            schema: Arc::new(RecordSchema::default()),
            read_only: watch::channel(false).1,
            runtime,
        }
    }

    /// Sets the `as_of`.
    pub fn as_of(mut self, as_of: Antichain<u64>) -> Self {
        self.as_of = as_of;
        self
    }

    /// Starts in the mode `read_only` says, following its changes.
    pub fn read_only(mut self, read_only: watch::Receiver<bool>) -> Self {
        self.read_only = read_only;
        self
    }
}

/// Keeps a sink running; dropping it shuts its operators down. Also reports
/// how far the sink's shard is known to be written.
#[derive(Debug)]
pub struct SinkToken {
    _source: SourceToken,
    _buttons: Vec<ShutdownButton>,
    persisted: ProbeHandle<u64>,
}

impl SinkToken {
    /// The frontier this worker has read the sink's shard back to: the
    /// shard's contents at every time not at or after it are final (as far
    /// as this sink is concerned, equal to the desired collection once the
    /// sink has caught up).
    pub fn persisted_frontier(&self) -> Antichain<u64> {
        let mut frontier = Antichain::new();
        self.persisted
            .with_frontier(|f| frontier.extend(f.iter().copied()));
        frontier
    }

    /// Whether the shard may still change at `time` (the persisted frontier
    /// is not yet past it).
    pub fn less_equal(&self, time: &u64) -> bool {
        self.persisted.less_equal(time)
    }
}

/// The bounds of a batch every worker writes its share of and the appending
/// worker appends as one: `[lower, upper)`, `lower < upper`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct BatchDescription {
    pub lower: Antichain<u64>,
    pub upper: Antichain<u64>,
}

impl Debug for BatchDescription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "[{:?}, {:?})",
            self.lower.elements(),
            self.upper.elements()
        )
    }
}

/// Moves `frontier` to `new` if that is strictly later; returns whether it
/// moved.
pub(crate) fn advance(frontier: &mut Antichain<u64>, new: &Antichain<u64>) -> bool {
    if PartialOrder::less_than(frontier, new) {
        frontier.clone_from(new);
        true
    } else {
        false
    }
}

/// The earlier of an ok and an err frontier.
pub(crate) fn meet(ok: &Antichain<u64>, err: &Antichain<u64>) -> Antichain<u64> {
    if PartialOrder::less_equal(ok, err) {
        ok.clone()
    } else {
        err.clone()
    }
}

/// Opens the sink's writer of its shard.
pub(crate) async fn open_writer<K: SinkData, V: SinkData, E: SinkData>(
    client: &PersistClient,
    shard_id: ShardId,
    schema: &Arc<RecordSchema<K, V, E>>,
    purpose: &str,
) -> Result<SinkWriteHandle<K, V, E>, String> {
    client
        .open_writer(
            shard_id,
            Arc::clone(schema),
            Arc::new(Default::default()),
            Diagnostics::from_purpose(purpose),
        )
        .await
        .map_err(|err| format!("cannot open a writer of {shard_id}: {err}"))
}

/// Maintains shard `args.shard_id` equal to the collection `desired_ok`
/// (as [`Record::Data`] rows) plus `desired_err` (as [`Record::Error`]
/// rows), at every time from `args.as_of` on.
///
/// # Guarantees
///
/// - Once the shard's upper is past a time `t` and the sink has caught up
///   (the persisted frontier of the returned token is past `t` after the
///   desired frontier passed it), the shard's contents at `t` equal the
///   desired collection's, whatever they were before and whoever else wrote
///   (other sinks with the same desired collection converge with it).
/// - Nothing is written before `as_of`; the shard's upper is moved up to
///   `as_of` (with an empty batch) before the first write if it is behind.
/// - In read-only mode nothing is written, not even that upper bump; the
///   sink keeps its correction buffer up to date and catches up as soon as
///   it is made writable.
/// - When the desired frontier becomes empty (the input is complete), the
///   sink seals the shard: its upper becomes the empty frontier.
///
/// # Errors
///
/// A writer that cannot be opened (e.g. the shard exists with other
/// codecs) or an append refused for a reason other than a moved upper is
/// logged (`tracing::error!`) and the sink stops writing; it never panics on
/// external data. Data read back that cannot be decoded is logged and
/// ignored (the sink cannot retract what it cannot decode).
///
/// Every worker of the dataflow must call this with equal arguments.
pub fn persist_sink<'scope, K, V, E>(
    desired_ok: VecCollection<'scope, u64, (K, V), i64>,
    desired_err: VecCollection<'scope, u64, E, i64>,
    args: PersistSinkArgs<K, V, E>,
) -> SinkToken
where
    K: SinkData,
    V: SinkData,
    E: SinkData,
{
    let scope = desired_ok.inner.scope();
    let active_worker = usize::try_from(args.name.as_str().hashed() % scope.peers() as u64)
        .expect("a worker index fits in usize");

    // Read the shard back from its since: the sink only writes at or after
    // the shard's upper, so any as_of up to there would do, and the since
    // is always readable.
    let source_args = ShardSourceArgs::<Record<K, V, E>, (), u64> {
        name: format!("{}::persist", args.name),
        client: args.client.clone(),
        shard_id: args.shard_id,
        as_of: None,
        snapshot_mode: crate::SnapshotMode::Include,
        until: Antichain::new(),
        key_schema: Arc::clone(&args.schema),
        val_schema: Arc::new(Default::default()),
        runtime: args.runtime.clone(),
    };
    // The appending worker records its successful appends; the read-back
    // source, on the same worker, does not fetch what they wrote but tells
    // `write` about them, which accounts for them from its own batches.
    let own = OwnAppends::new();
    let hooks = ReadBackHooks {
        chosen_worker: Some(active_worker),
        own_appends: Some(own.clone()),
    };
    let (persist, own_appends) =
        shard_source_with::<_, _, u64, i64, _>(scope, source_args, |_, _| true, hooks);
    let shard = args.shard_id;
    let sink_name = args.name.clone();
    persist.err.inner.inspect(move |(err, time, _)| {
        tracing::error!(%shard, sink = %sink_name, %err, time, "sink cannot read back its shard");
    });
    let (persist_ok, persist_err) = persist.ok.inner.ok_err::<Vec<_>, _, Vec<_>, _, _>(
        |((record, ()), time, diff)| match record {
            Record::Data(key, val) => Ok(((key, val), time, diff)),
            Record::Error(err) => Err((err, time, diff)),
        },
    );
    let (persisted, persist_ok) = persist_ok.probe();

    let mint = mint::render(&args, active_worker, desired_ok.inner, desired_err.inner);
    let write = write::render(
        &args,
        mint.desired_ok,
        mint.desired_err,
        persist_ok,
        persist_err,
        own_appends,
        mint.descs.clone(),
    );
    let append = append::render(&args, active_worker, mint.descs, write.batches, own);
    SinkToken {
        _source: persist.token,
        _buttons: vec![mint.button, write.button, append],
        persisted,
    }
}
