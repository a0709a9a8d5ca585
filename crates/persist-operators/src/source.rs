//! `shard_source`: reading a shard into a timely dataflow.
//!
//! Three operators cooperate:
//!
//! ```text
//!   descs (one chosen worker) --parts--> fetch (every worker) --updates--> ok / err
//!     ^                                      |
//!     |                                      | fetched parts (their leases)
//!     +------- lease returns (chosen) <------+   over a feedback edge
//! ```
//!
//! - `descs` runs on one worker chosen by hashing the source's name. It
//!   opens a leased reader, takes a snapshot at the `as_of` (unless told not
//!   to) and then listens, emitting each part (a serializable, leased part
//!   description) at the time the listen has reached, and following the
//!   shard's upper with its output frontier.
//! - `fetch` runs on every worker: each part goes to the worker picked by
//!   hashing its blob key, which fetches and decodes it and emits its
//!   updates; then it sends the part back.
//! - `lease returns` runs on the chosen worker and gives each fetched part
//!   back to the reader, releasing the SeqNo lease that kept its blob safe
//!   from garbage collection while it was in flight.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::fmt::Debug;
use std::rc::Rc;
use std::sync::Arc;

use differential_dataflow::difference::Semigroup;
use differential_dataflow::lattice::Lattice;
use differential_dataflow::{AsCollection, Hashable, VecCollection};
use persist::part::PartStats;
use persist_client::{
    BatchFetcher, Diagnostics, LeaseReturner, LeasedBatchPart, Listen, PersistClient,
    SerdeLeasedBatchPart,
};
use persist_types::{Codec, Codec64, ShardId};
use timely::PartialOrder;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::{Capability, ConnectLoop, Feedback};
use timely::dataflow::{Scope, StreamVec};
use timely::order::TotalOrder;
use timely::progress::frontier::AntichainRef;
use timely::progress::{Antichain, Timestamp};
use tracing::{debug, error, trace};

use crate::builder::{AsyncOperatorBuilder, AsyncOutput, Event, ShutdownButton};
use crate::error::SourceError;
use crate::offload::offload;
use crate::own_appends::{Bounds, OwnAppends};

/// Whether a [`shard_source`] emits the shard's contents at its `as_of`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotMode {
    /// Emit the snapshot at the `as_of` (every update at a time not after
    /// it, advanced to it), then what is appended later.
    Include,
    /// Emit only updates at times after the `as_of`.
    Exclude,
}

/// What a [`shard_source`] reads and how.
pub struct ShardSourceArgs<K: Codec, V: Codec, T> {
    /// The source's name: names its operators and picks the worker that
    /// reads descriptions (so equal names pick equal workers everywhere).
    pub name: String,
    /// The client of the shard's location.
    pub client: PersistClient,
    /// The shard to read.
    pub shard_id: ShardId,
    /// The time to read from. `None`: the shard's since when the reader is
    /// opened. It must be at or beyond the shard's since, else the source
    /// stops with [`SourceError::Stopped`].
    pub as_of: Option<Antichain<T>>,
    /// Whether to emit the snapshot at the `as_of`.
    pub snapshot_mode: SnapshotMode,
    /// Updates at times at or after `until` are not emitted, and the source
    /// completes (its frontier becomes empty) once it has read up to it.
    /// The empty antichain means "never stop".
    pub until: Antichain<T>,
    /// The schema keys are decoded with.
    pub key_schema: Arc<K::Schema>,
    /// The schema values are decoded with.
    pub val_schema: Arc<V::Schema>,
    /// The runtime the operators' futures (and persist's tasks) run on;
    /// multi-threaded (parts are encoded and decoded on its blocking pool).
    pub runtime: tokio::runtime::Handle,
}

impl<K: Codec, V: Codec, T: Debug> Debug for ShardSourceArgs<K, V, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardSourceArgs")
            .field("name", &self.name)
            .field("shard_id", &self.shard_id)
            .field("as_of", &self.as_of)
            .field("snapshot_mode", &self.snapshot_mode)
            .field("until", &self.until)
            .finish_non_exhaustive()
    }
}

impl<K: Codec, V: Codec, T> ShardSourceArgs<K, V, T> {
    /// Reads all of `shard_id` (from its since, snapshot included, never
    /// stopping) with the default schemas.
    pub fn new(
        name: impl Into<String>,
        client: PersistClient,
        shard_id: ShardId,
        runtime: tokio::runtime::Handle,
    ) -> Self
    where
        K::Schema: Default,
        V::Schema: Default,
    {
        ShardSourceArgs {
            name: name.into(),
            client,
            shard_id,
            as_of: None,
            snapshot_mode: SnapshotMode::Include,
            until: Antichain::new(),
            key_schema: Arc::new(Default::default()),
            val_schema: Arc::new(Default::default()),
            runtime,
        }
    }

    /// Reads from `as_of` instead of the shard's since.
    pub fn as_of(mut self, as_of: Antichain<T>) -> Self {
        self.as_of = Some(as_of);
        self
    }

    /// Emits (or not) the snapshot at the `as_of`.
    pub fn snapshot_mode(mut self, mode: SnapshotMode) -> Self {
        self.snapshot_mode = mode;
        self
    }

    /// Stops at `until` (see [`ShardSourceArgs::until`]).
    pub fn until(mut self, until: Antichain<T>) -> Self {
        self.until = until;
        self
    }
}

/// The collections a [`shard_source`] produces, and the token that keeps
/// it running.
pub struct SourceOutput<'scope, K: 'static, V: 'static, T: Timestamp, D: 'static> {
    /// The shard's updates: every update at a time not at or after `until`,
    /// with times not beyond the `as_of` advanced to it (with
    /// [`SnapshotMode::Exclude`], only updates after the `as_of`).
    pub ok: VecCollection<'scope, T, (K, V), D>,
    /// What could not be read (see [`SourceError`]), one record per
    /// undecodable update or unreadable part, with diff 1.
    pub err: VecCollection<'scope, T, SourceError, i64>,
    /// Dropping it shuts the source's operators down.
    pub token: SourceToken,
}

impl<K, V, T: Timestamp, D> Debug for SourceOutput<'_, K, V, T, D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceOutput")
            .field("token", &self.token)
            .finish_non_exhaustive()
    }
}

/// Keeps a source's operators running; dropping it shuts them down (their
/// outputs then complete, and the reader's leases are released).
#[derive(Debug)]
pub struct SourceToken {
    _buttons: Vec<ShutdownButton>,
}

/// Reads shard `args.shard_id` into the dataflow of `scope`, distributing
/// the fetching of its parts over all workers.
///
/// # Frontiers
///
/// The output frontier is first the minimum time; as soon as the reader is
/// open it is the `as_of` (even while the snapshot is not yet available),
/// and from then on it follows the shard's upper: once the frontier is `f`,
/// every update at a time not at or after `f` was emitted. Updates are
/// emitted at the frontier the listen had reached, with their own times at
/// or after it. At `until` (or if the shard's upper becomes empty) the
/// frontier becomes empty.
///
/// # Filtering
///
/// `should_fetch_part` sees each part's statistics and the current
/// frontier; a part it rejects is not fetched and its updates are not
/// emitted (the caller promises they would all be filtered out later).
///
/// # Errors
///
/// Nothing read from outside panics: undecodable keys or values and
/// unreadable parts go to `err`. If the source cannot go on (the reader
/// cannot be opened or expires, or the `as_of` is before the since) it
/// emits [`SourceError::Stopped`] and holds its frontier where it was until
/// shut down.
///
/// Requires a totally ordered time: parts are emitted at the single time the
/// listen has reached. Keys and values must be `Send`: parts are fetched
/// and decoded on the runtime's blocking pool, not on the worker's thread
/// (so the runtime must be multi-threaded).
pub fn shard_source<'scope, K, V, T, D, F>(
    scope: Scope<'scope, T>,
    args: ShardSourceArgs<K, V, T>,
    should_fetch_part: F,
) -> SourceOutput<'scope, K, V, T, D>
where
    K: Codec + Clone + Send,
    V: Codec + Clone + Send,
    T: Timestamp + Lattice + Codec64 + TotalOrder + Sync,
    D: Semigroup + Codec64 + Send + Sync,
    F: FnMut(&PartStats, AntichainRef<'_, T>) -> bool + 'static,
{
    shard_source_with(scope, args, should_fetch_part, ReadBackHooks::default()).0
}

/// What a sink reading its own shard back asks of its source beyond a
/// plain [`shard_source`].
#[derive(Debug)]
pub(crate) struct ReadBackHooks<T> {
    /// The worker that reads descriptions, instead of the one the name
    /// hashes to (it must be the worker holding `own_appends`).
    pub chosen_worker: Option<usize>,
    /// Listen steps wholly inside the sink's own appends recorded here are
    /// not fetched: their parts' leases are returned at once, and the
    /// appends are sent on the `own_appends` stream instead (at the step's
    /// lower, so before the frontier passes them).
    pub own_appends: Option<OwnAppends<T>>,
}

impl<T> Default for ReadBackHooks<T> {
    fn default() -> Self {
        ReadBackHooks {
            chosen_worker: None,
            own_appends: None,
        }
    }
}

/// A hooked source's collections, and the own appends it did not fetch.
pub(crate) type ReadBackOutput<'scope, K, V, T, D> = (
    SourceOutput<'scope, K, V, T, D>,
    StreamVec<'scope, T, Bounds<T>>,
);

/// [`shard_source`] with the read-back hooks of a sink; also returns the
/// own appends it skipped (on the chosen worker only).
pub(crate) fn shard_source_with<'scope, K, V, T, D, F>(
    scope: Scope<'scope, T>,
    args: ShardSourceArgs<K, V, T>,
    should_fetch_part: F,
    hooks: ReadBackHooks<T>,
) -> ReadBackOutput<'scope, K, V, T, D>
where
    K: Codec + Clone + Send,
    V: Codec + Clone + Send,
    T: Timestamp + Lattice + Codec64 + TotalOrder + Sync,
    D: Semigroup + Codec64 + Send + Sync,
    F: FnMut(&PartStats, AntichainRef<'_, T>) -> bool + 'static,
{
    let chosen_worker = match hooks.chosen_worker {
        Some(worker) => worker,
        None => usize::try_from(args.name.as_str().hashed() % scope.peers() as u64)
            .expect("a worker index fits in usize"),
    };
    // The lease returns flow back against the dataflow's direction; the
    // edge adds no time (nothing the returns feed reaches the parts again).
    let (returns_handle, returns) = scope.feedback::<Vec<SerdeLeasedBatchPart>>(Default::default());
    let shared = Rc::new(RefCell::new(ChosenState::default()));

    let (descs, descs_err, own_appends, descs_button) = render_descs::<K, V, T, D, F>(
        scope,
        &args,
        chosen_worker,
        Rc::clone(&shared),
        should_fetch_part,
        hooks.own_appends,
    );
    let returns_button = render_returns::<K, V, T, D>(scope, &args, chosen_worker, returns, shared);
    let (ok, fetch_err, fetched, fetch_button) = render_fetch::<K, V, T, D>(descs, &args);
    fetched.connect_loop(returns_handle);

    let err = timely::dataflow::operators::Concat::concat(descs_err, fetch_err);
    let output = SourceOutput {
        ok: ok.as_collection(),
        err: err.as_collection(),
        token: SourceToken {
            _buttons: vec![descs_button, fetch_button, returns_button],
        },
    };
    (output, own_appends)
}

/// What the chosen worker's `descs` operator hands its `lease returns`
/// operator.
struct ChosenState<K: Codec, V: Codec, T, D> {
    /// Returns parts to the reader; set before the first part is emitted.
    returner: Option<LeaseReturner>,
    /// The listen, once `descs` is done with it: kept open until every
    /// part it leased came back (its blobs must outlive the fetches).
    finished_listen: Option<Listen<K, V, T, D>>,
}

impl<K: Codec, V: Codec, T, D> Default for ChosenState<K, V, T, D> {
    fn default() -> Self {
        ChosenState {
            returner: None,
            finished_listen: None,
        }
    }
}

/// Downgrades every capability to the single element of `frontier`, or
/// drops them all if it is empty.
fn downgrade_all<T: Timestamp + TotalOrder>(
    caps: &mut Vec<Capability<T>>,
    frontier: &Antichain<T>,
) {
    match frontier.as_option() {
        Some(t) => {
            for cap in caps.iter_mut() {
                if cap.time().less_than(t) {
                    cap.downgrade(t);
                }
            }
        }
        None => caps.clear(),
    }
}

type DescsOutputs<'scope, T> = (
    StreamVec<'scope, T, (u64, SerdeLeasedBatchPart)>,
    StreamVec<'scope, T, (SourceError, T, i64)>,
    StreamVec<'scope, T, Bounds<T>>,
    ShutdownButton,
);

fn render_descs<'scope, K, V, T, D, F>(
    scope: Scope<'scope, T>,
    args: &ShardSourceArgs<K, V, T>,
    chosen_worker: usize,
    shared: Rc<RefCell<ChosenState<K, V, T, D>>>,
    mut should_fetch_part: F,
    own_appends: Option<OwnAppends<T>>,
) -> DescsOutputs<'scope, T>
where
    K: Codec,
    V: Codec,
    T: Timestamp + Lattice + Codec64 + TotalOrder + Sync,
    D: Semigroup + Codec64 + Send + Sync,
    F: FnMut(&PartStats, AntichainRef<'_, T>) -> bool + 'static,
{
    let name = args.name.clone();
    let mut builder = AsyncOperatorBuilder::new(
        format!("shard_source_descs({name})"),
        scope,
        args.runtime.clone(),
    );
    let (mut parts_out, parts) = builder.new_output::<(u64, SerdeLeasedBatchPart)>();
    let (mut err_out, errs) = builder.new_output::<(SourceError, T, i64)>();
    let (mut own_out, own_stream) = builder.new_output::<Bounds<T>>();
    let worker = scope.index();
    let peers = scope.peers() as u64;
    let client = args.client.clone();
    let shard = args.shard_id;
    let as_of = args.as_of.clone();
    let until = args.until.clone();
    let mode = args.snapshot_mode;
    let (key_schema, val_schema) = (Arc::clone(&args.key_schema), Arc::clone(&args.val_schema));
    let button = builder.build(move |mut caps| async move {
        if worker != chosen_worker {
            return;
        }
        let stopped =
            |reason: String, caps: &Vec<Capability<T>>, err_out: &mut AsyncOutput<T, _>| {
                error!(%shard, source = %name, %reason, "shard_source stopped");
                let cap = &caps[1];
                err_out.give(
                    cap,
                    (
                        SourceError::Stopped { shard, reason },
                        cap.time().clone(),
                        1,
                    ),
                );
            };
        let diagnostics = Diagnostics::from_purpose(&format!("shard_source({name})"));
        let reader = client
            .open_leased_reader::<K, V, T, D>(shard, key_schema, val_schema, diagnostics)
            .await;
        let mut reader = match reader {
            Ok(reader) => reader,
            Err(err) => {
                stopped(format!("cannot open a reader: {err}"), &caps, &mut err_out);
                return std::future::pending().await;
            }
        };
        let as_of = as_of.unwrap_or_else(|| reader.since().clone());
        // Claim the as_of at once: the snapshot below may wait for the
        // shard's upper to pass it, and downstream (a sink reading its own
        // shard back, say) needs to know no earlier times will come.
        downgrade_all(&mut caps, &as_of);
        if caps.is_empty() {
            return;
        }
        let mut frontier = as_of.clone();
        let snapshot = match mode {
            SnapshotMode::Include => match reader.snapshot(as_of.clone()).await {
                Ok(parts) => parts,
                Err(err) => {
                    stopped(
                        format!("cannot snapshot at {as_of:?}: {err}"),
                        &caps,
                        &mut err_out,
                    );
                    return std::future::pending().await;
                }
            },
            SnapshotMode::Exclude => Vec::new(),
        };
        let returner = reader.lease_returner();
        shared.borrow_mut().returner = Some(returner.clone());
        let mut emit =
            |parts: Vec<LeasedBatchPart<T>>,
             frontier: &Antichain<T>,
             cap: &Capability<T>,
             out: &mut AsyncOutput<T, (u64, SerdeLeasedBatchPart)>| {
                let mut batch = Vec::with_capacity(parts.len());
                for part in parts {
                    if !should_fetch_part(&part.stats(), frontier.borrow()) {
                        trace!(%shard, "part skipped by its statistics");
                        returner.return_leased_part(part);
                        continue;
                    }
                    let part = part.into_exchangeable_part();
                    let target = part.key().hashed() % peers;
                    batch.push((target, part));
                }
                out.give_container(cap, &mut batch);
            };
        if PartialOrder::less_equal(&until, &frontier) {
            return;
        }
        let own = match (&own_appends, mode) {
            (Some(own), SnapshotMode::Include) => {
                own.covering_through(&Antichain::from_elem(T::minimum()), &as_of)
                    .await
            }
            _ => None,
        };
        match own {
            Some(mut appends) => {
                trace!(%shard, source = %name, "own appends in the snapshot not fetched");
                for part in snapshot {
                    returner.return_leased_part(part);
                }
                own_out.give_container(&caps[2], &mut appends);
            }
            None => emit(snapshot, &frontier, &caps[0], &mut parts_out),
        }
        let mut listen = match reader.listen(as_of.clone()).await {
            Ok(listen) => listen,
            Err(err) => {
                stopped(
                    format!("cannot listen from {as_of:?}: {err}"),
                    &caps,
                    &mut err_out,
                );
                return std::future::pending().await;
            }
        };
        while !PartialOrder::less_equal(&until, &frontier) {
            let (parts, progress) = match listen.next().await {
                Ok(next) => next,
                Err(err) => {
                    stopped(
                        format!("listen failed at {frontier:?}: {err}"),
                        &caps,
                        &mut err_out,
                    );
                    return std::future::pending().await;
                }
            };
            let own = match &own_appends {
                Some(own) => own.covering(&frontier, &progress).await,
                None => None,
            };
            match own {
                Some(mut appends) => {
                    // The sink wrote these itself: it learns them from
                    // its appends' bounds, without fetching.
                    trace!(%shard, source = %name, ?progress, "own append not fetched");
                    for part in parts {
                        returner.return_leased_part(part);
                    }
                    own_out.give_container(&caps[2], &mut appends);
                }
                None => emit(parts, &frontier, &caps[0], &mut parts_out),
            }
            debug!(%shard, source = %name, ?progress, "shard_source progress");
            frontier = progress;
            downgrade_all(&mut caps, &frontier);
        }
        shared.borrow_mut().finished_listen = Some(listen);
    });
    (parts, errs, own_stream, button)
}

fn render_returns<'scope, K, V, T, D>(
    scope: Scope<'scope, T>,
    args: &ShardSourceArgs<K, V, T>,
    chosen_worker: usize,
    returns: StreamVec<'scope, T, SerdeLeasedBatchPart>,
    shared: Rc<RefCell<ChosenState<K, V, T, D>>>,
) -> ShutdownButton
where
    K: Codec,
    V: Codec,
    T: Timestamp + Lattice + Codec64 + Sync,
    D: Semigroup + Codec64 + Send + Sync,
{
    let mut builder = AsyncOperatorBuilder::new(
        format!("shard_source_lease_returns({})", args.name),
        scope,
        args.runtime.clone(),
    );
    let chosen = chosen_worker as u64;
    let mut input = builder.new_disconnected_input(returns, Exchange::new(move |_| chosen));
    let shard = args.shard_id;
    builder.build(move |caps| async move {
        drop(caps);
        while let Some(event) = input.next().await {
            let Event::Data { data, .. } = event else {
                continue;
            };
            let state = shared.borrow();
            for part in data {
                let part = LeasedBatchPart::<T>::from_exchangeable(part);
                match &state.returner {
                    Some(returner) => returner.return_leased_part(part),
                    None => tracing::warn!(%shard, "a part came back before any was leased"),
                }
            }
        }
        // Every part is back: the reader may go.
        let listen = shared.borrow_mut().finished_listen.take();
        if let Some(listen) = listen {
            listen.expire().await;
        }
    })
}

/// How many parts one worker's `fetch` operator fetches and decodes at once
/// (each on a thread of the runtime's blocking pool).
const MAX_FETCHES_IN_FLIGHT: usize = 4;

/// A fetched part's updates and the errors met decoding it.
type Fetched<K, V, T, D> = (Vec<((K, V), T, D)>, Vec<(SourceError, T, i64)>);

/// Fetches `part` (blob key `key`) and decodes its updates not at or
/// after `until`; what cannot be fetched or decoded becomes errors (an
/// unreadable part's at `err_time`).
async fn fetch_part<K, V, T, D>(
    fetcher: Result<Arc<BatchFetcher<K, V, T, D>>, String>,
    part: &LeasedBatchPart<T>,
    key: String,
    until: &Antichain<T>,
    shard: ShardId,
    err_time: T,
) -> Fetched<K, V, T, D>
where
    K: Codec,
    V: Codec,
    T: Timestamp + Lattice + Codec64 + Sync,
    D: Semigroup + Codec64 + Send + Sync,
{
    let fetched = match &fetcher {
        Ok(fetcher) => fetcher
            .fetch_leased_part(part)
            .await
            .map_err(|e| e.to_string()),
        Err(err) => Err(err.clone()),
    };
    let mut oks = Vec::new();
    let mut errs = Vec::new();
    match fetched {
        Ok(updates) => {
            oks.reserve(updates.size_hint().0);
            for ((key, val), t, d) in updates {
                if until.less_equal(&t) {
                    continue;
                }
                match (key, val) {
                    (Ok(key), Ok(val)) => oks.push(((key, val), t, d)),
                    (Err(reason), _) => {
                        errs.push((SourceError::UndecodableKey { shard, reason }, t, 1))
                    }
                    (_, Err(reason)) => {
                        errs.push((SourceError::UndecodableVal { shard, reason }, t, 1))
                    }
                }
            }
        }
        Err(reason) => {
            error!(%shard, part = %key, %reason, "part unreadable");
            let error = SourceError::UnreadablePart {
                shard,
                part: key,
                reason,
            };
            errs.push((error, err_time, 1));
        }
    }
    (oks, errs)
}

type FetchOutputs<'scope, K, V, T, D> = (
    StreamVec<'scope, T, ((K, V), T, D)>,
    StreamVec<'scope, T, (SourceError, T, i64)>,
    StreamVec<'scope, T, SerdeLeasedBatchPart>,
    ShutdownButton,
);

fn render_fetch<'scope, K, V, T, D>(
    descs: StreamVec<'scope, T, (u64, SerdeLeasedBatchPart)>,
    args: &ShardSourceArgs<K, V, T>,
) -> FetchOutputs<'scope, K, V, T, D>
where
    K: Codec + Clone + Send,
    V: Codec + Clone + Send,
    T: Timestamp + Lattice + Codec64 + Sync,
    D: Semigroup + Codec64 + Send + Sync,
{
    let mut builder = AsyncOperatorBuilder::new(
        format!("shard_source_fetch({})", args.name),
        descs.scope(),
        args.runtime.clone(),
    );
    let (mut ok_out, ok) = builder.new_output::<((K, V), T, D)>();
    let (mut err_out, errs) = builder.new_output::<(SourceError, T, i64)>();
    let (mut done_out, done) = builder.new_output::<SerdeLeasedBatchPart>();
    let mut input = builder.new_input_for(
        descs,
        Exchange::new(|(target, _): &(u64, SerdeLeasedBatchPart)| *target),
        &[ok_out.index(), err_out.index(), done_out.index()],
    );
    let client = args.client.clone();
    let shard = args.shard_id;
    let until = args.until.clone();
    let name = args.name.clone();
    let runtime = args.runtime.clone();
    let (key_schema, val_schema) = (Arc::clone(&args.key_schema), Arc::clone(&args.val_schema));
    let button = builder.build(move |caps| async move {
        drop(caps);
        let diagnostics = Diagnostics::from_purpose(&format!("shard_source_fetch({name})"));
        let fetcher = client
            .create_batch_fetcher::<K, V, T, D>(shard, key_schema, val_schema, diagnostics)
            .await
            .map(Arc::new)
            .map_err(|err| err.to_string());
        while let Some(event) = input.next().await {
            let Event::Data { caps, data, .. } = event else {
                continue;
            };
            let [ok_cap, err_cap, done_cap] = <[_; 3]>::try_from(caps)
                .unwrap_or_else(|_| unreachable!("the input is connected to three outputs"));
            // Fetch and decode on the runtime's blocking pool, a few parts
            // at a time, emitting in order: the worker thread stays free for
            // the rest of the dataflow.
            let mut fetches = VecDeque::with_capacity(MAX_FETCHES_IN_FLIGHT);
            let mut done = Vec::with_capacity(data.len());
            let mut parts = data.into_iter();
            loop {
                while fetches.len() < MAX_FETCHES_IN_FLIGHT
                    && let Some((_, part)) = parts.next()
                {
                    let fetcher = fetcher.clone();
                    let until = until.clone();
                    let err_time = err_cap.time().clone();
                    fetches.push_back(offload(&runtime, async move {
                        let key = part.key().to_owned();
                        let part = LeasedBatchPart::<T>::from_exchangeable(part);
                        let decoded =
                            fetch_part(fetcher, &part, key, &until, shard, err_time).await;
                        (decoded, part.into_exchangeable_part())
                    }));
                }
                let Some(fetch) = fetches.pop_front() else {
                    break;
                };
                match fetch.await {
                    Ok(((mut oks, mut errs), part)) => {
                        ok_out.give_container(&ok_cap, &mut oks);
                        err_out.give_container(&err_cap, &mut errs);
                        done.push(part);
                    }
                    Err(err) if err.is_panic() => std::panic::resume_unwind(err.into_panic()),
                    Err(err) => {
                        // The runtime is shutting down: hold the frontier
                        // rather than claim the part's updates were
                        // emitted.
                        error!(%shard, %err, "fetching a part was cancelled");
                        return std::future::pending().await;
                    }
                }
            }
            done_out.give_container(&done_cap, &mut done);
        }
    });
    (ok, errs, done, button)
}
