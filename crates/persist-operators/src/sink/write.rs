//! The sink's `write` operator: every worker writes its share of a batch.

use std::collections::VecDeque;

use differential_dataflow::Hashable;
use persist_client::TransmittableBatch;
use timely::PartialOrder;
use timely::dataflow::StreamVec;
use timely::dataflow::channels::pact::{Exchange, Pipeline};
use timely::dataflow::operators::Capability;
use timely::dataflow::operators::vec::Broadcast;
use timely::progress::Antichain;
use tracing::{debug, error, trace};

use super::correction::Correction;
use super::{
    BatchDescription, PersistSinkArgs, SinkData, SinkWriteHandle, advance, meet, open_writer,
};
use crate::builder::{AsyncInput, AsyncOperatorBuilder, Event, ShutdownButton};
use crate::offload::offload;
use crate::own_appends::Bounds;
use crate::record::Record;

/// The stream `write` produces.
pub(super) struct Written<'scope> {
    /// Each worker's batch for a description, at the description's lower.
    pub batches: StreamVec<'scope, u64, TransmittableBatch>,
    pub button: ShutdownButton,
}

/// One worker's view: its share of `desired - persist`, the frontiers of
/// its inputs, and the description it is working on.
///
/// What the shard holds is learnt from the read-back source: the updates it
/// fetched (subtracted from the buffer), and the bounds of the sink's own
/// appends it did not fetch (the shard holds exactly the batch this worker
/// wrote for them, whose updates it had taken out of the buffer).
struct WriteState<K, V, E> {
    ok: Correction<(K, V)>,
    err: Correction<E>,
    desired_ok: Antichain<u64>,
    desired_err: Antichain<u64>,
    persist_ok: Antichain<u64>,
    persist_err: Antichain<u64>,
    /// The frontier of the read-back source's own-appends stream.
    own_frontier: Antichain<u64>,
    /// Own appends received but not yet taken in, in order.
    own_pending: VecDeque<BatchDescription>,
    /// How far the shard's contents are accounted for in the buffer (see
    /// [`WriteState::persist`]).
    known: Antichain<u64>,
    /// The latest valid description and a capability at its lower.
    desc: Option<(BatchDescription, Capability<u64>)>,
    /// The description this worker last wrote its whole share of
    /// `desired - persist` for, until the shard shows whether it was
    /// appended.
    in_flight: Option<InFlight<K, V, E>>,
}

/// A description this worker wrote its share for, with the updates it
/// took out of the buffer for it: they go back in if the shard moves past
/// the description's lower without the sink's own append of it.
struct InFlight<K, V, E> {
    desc: BatchDescription,
    oks: Vec<((K, V), u64, i64)>,
    errs: Vec<(E, u64, i64)>,
}

impl<K: SinkData, V: SinkData, E: SinkData> WriteState<K, V, E> {
    /// The frontier up to which the shard's contents are accounted for:
    /// every update at a time not at or after it is in the buffer (negated)
    /// or cancelled there by an own append.
    fn persist(&self) -> Antichain<u64> {
        self.known.clone()
    }

    /// Moves the known frontier as far as the read-back inputs allow,
    /// taking in own appends in order on the way. Then the buffer's times
    /// before it no longer matter, and a description whose lower it passed
    /// can no longer be appended.
    fn read_back_advanced(&mut self) {
        // Both kinds of read-back input are complete before this: fetched
        // data and own appends (an own append comes at its step's lower).
        let mut known = meet(
            &meet(&self.persist_ok, &self.persist_err),
            &self.own_frontier,
        );
        if PartialOrder::less_than(&known, &self.known) {
            known.clone_from(&self.known);
        }
        while let Some(desc) = self.own_pending.pop_front() {
            if !PartialOrder::less_equal(&desc.lower, &known) {
                self.own_pending.push_front(desc);
                break;
            }
            if self.in_flight.as_ref().is_some_and(|f| f.desc == desc) {
                // The shard holds this worker's batch as written: before its
                // upper, desired and persist are now equal (whatever was
                // read back of it meanwhile included). Its updates are
                // freed on the runtime, off the worker thread.
                if let Some(f) = self.in_flight.take() {
                    drop(tokio::spawn(async move { drop(f) }));
                }
                self.ok.clear_before(&desc.upper);
                self.err.clear_before(&desc.upper);
            }
            trace!(?desc, "own append accounted for");
            if PartialOrder::less_than(&known, &desc.upper) {
                known = desc.upper;
            }
        }
        if let Some(f) = &self.in_flight
            && PartialOrder::less_than(&f.desc.lower, &known)
        {
            // The shard moved past the lower without this worker's batch
            // (another writer won, or the append failed), or it was read
            // back like anyone's: the updates are owed again.
            self.restore();
        }
        if PartialOrder::less_than(&self.known, &known) {
            self.known = known;
            self.ok.advance_since(&self.known);
            self.err.advance_since(&self.known);
            if let Some((desc, _)) = &self.desc
                && PartialOrder::less_than(&desc.lower, &self.known)
            {
                self.desc = None;
            }
        }
    }

    /// Puts the updates of the description in flight back in the buffer.
    fn restore(&mut self) {
        if let Some(f) = self.in_flight.take() {
            trace!(desc = ?f.desc, "own batch not appended as written");
            if !f.oks.is_empty() {
                self.ok.insert(f.oks, false);
            }
            if !f.errs.is_empty() {
                self.err.insert(f.errs, false);
            }
        }
    }

    /// Read-back updates, to subtract. Those at times before the known
    /// frontier are dropped: data arrives before its input's frontier
    /// passes it, so they can only come from the sink's own appends,
    /// already accounted for.
    fn persisted<D: Ord + Clone>(
        known: &Antichain<u64>,
        correction: &mut Correction<D>,
        mut updates: Vec<(D, u64, i64)>,
    ) {
        updates.retain(|(_, t, _)| known.less_equal(t));
        if !updates.is_empty() {
            correction.insert(updates, true);
        }
    }

    fn absorb(&mut self, desc: BatchDescription, cap: Capability<u64>) {
        let current = match &self.desc {
            Some((current, _)) => current.lower.clone(),
            None => self.persist(),
        };
        if PartialOrder::less_than(&desc.lower, &current) {
            trace!(?desc, "outdated description");
            return;
        }
        self.desc = Some((desc, cap));
    }

    /// Writes the batch of the current description if both the shard (up
    /// to its lower) and the desired collection (up to its upper) are known.
    /// An empty share writes nothing but still releases the description.
    ///
    /// The updates are taken out of the buffer and encoded on the runtime's
    /// blocking pool, off the worker thread; they are kept aside until the
    /// shard shows whether the batch was appended.
    async fn maybe_write(
        &mut self,
        writer: &mut SinkWriteHandle<K, V, E>,
    ) -> Option<(Vec<TransmittableBatch>, Capability<u64>)> {
        let (desc, _) = self.desc.as_ref()?;
        let desired = meet(&self.desired_ok, &self.desired_err);
        if desc.lower != self.persist() || !PartialOrder::less_equal(&desc.upper, &desired) {
            return None;
        }
        let (desc, cap) = self.desc.take()?;
        // Resolved before the known frontier reached this lower; never in
        // flight here, but owed again if it were.
        self.restore();
        let oks = self.ok.take_before(&desc.upper);
        let errs = self.err.take_before(&desc.upper);
        if oks.is_empty() && errs.is_empty() {
            self.in_flight = Some(InFlight { desc, oks, errs });
            return None;
        }
        // A large share is split into batches encoded in parallel (append
        // appends all of a description's batches as one).
        let count = oks.len() + errs.len();
        let runtime = tokio::runtime::Handle::current();
        let chunks = (count / MIN_SPLIT_UPDATES)
            .min(runtime.metrics().num_workers())
            .max(1);
        let chunk_len = oks.len().div_ceil(chunks).max(1);
        let mut oks = oks.into_iter();
        let mut errs = Some(errs);
        let tasks: Vec<_> = (0..chunks)
            .map(|_| {
                let chunk: Vec<_> = oks.by_ref().take(chunk_len).collect();
                let errs = errs.take().unwrap_or_default();
                let builder = writer.builder(desc.lower.clone());
                let upper = desc.upper.clone();
                offload(&runtime, write_batch(builder, chunk, errs, upper))
            })
            .collect();
        let mut in_flight = InFlight {
            desc,
            oks: Vec::with_capacity(count),
            errs: Vec::new(),
        };
        let mut batches = Vec::with_capacity(chunks);
        let mut failed = None;
        for task in tasks {
            let written = match task.await {
                Ok(written) => written,
                Err(err) if err.is_panic() => std::panic::resume_unwind(err.into_panic()),
                Err(err) => {
                    // The runtime is shutting down, with this worker's
                    // updates in the task: hold the description so that no
                    // incomplete set of batches is appended for it.
                    error!(desc = ?in_flight.desc, %err, "sink's batch writing was cancelled");
                    return std::future::pending().await;
                }
            };
            in_flight.oks.extend(written.oks);
            in_flight.errs.extend(written.errs);
            match written.batch {
                Ok(Some(batch)) => batches.push(batch),
                Ok(None) => {}
                Err(err) => failed = Some(err),
            }
        }
        if let Some(err) = failed {
            // Back in the buffer: a later batch writes them.
            error!(desc = ?in_flight.desc, %err, "sink cannot write a batch");
            for batch in batches {
                batch.delete().await;
            }
            self.in_flight = Some(in_flight);
            self.restore();
            return None;
        }
        let buffered = self.ok.len() + self.err.len();
        debug!(desc = ?in_flight.desc, count, batches = batches.len(), buffered, "wrote batches");
        self.in_flight = Some(in_flight);
        if batches.is_empty() {
            return None;
        }
        let batches = batches
            .into_iter()
            .map(|batch| batch.into_transmittable_batch())
            .collect();
        Some((batches, cap))
    }
}

/// A worker's share of a description is split into parallel batches of at
/// least this many updates each (at most one per runtime thread).
const MIN_SPLIT_UPDATES: usize = 8192;

type SinkBatch<K, V, E> = persist_client::Batch<Record<K, V, E>, (), u64, i64>;
type SinkBatchBuilder<K, V, E> = persist_client::BatchBuilder<Record<K, V, E>, (), u64, i64>;

/// What [`write_batch`] did: the batch (none if there were no updates) and
/// the updates, handed back.
struct WrittenBatch<K, V, E> {
    batch: Result<Option<SinkBatch<K, V, E>>, String>,
    oks: Vec<((K, V), u64, i64)>,
    errs: Vec<(E, u64, i64)>,
}

/// Writes `oks` and `errs` with `builder` as a batch ending at `upper`.
///
/// They need not be consolidated: the builder consolidates their encoded
/// forms (cheaper than comparing decoded keys), and updates that cancel
/// across parts of a large batch are still a correct batch.
async fn write_batch<K: SinkData, V: SinkData, E: SinkData>(
    mut builder: SinkBatchBuilder<K, V, E>,
    oks: Vec<((K, V), u64, i64)>,
    errs: Vec<(E, u64, i64)>,
    upper: Antichain<u64>,
) -> WrittenBatch<K, V, E> {
    if oks.is_empty() && errs.is_empty() {
        return WrittenBatch {
            batch: Ok(None),
            oks,
            errs,
        };
    }
    let mut failed = None;
    // Records own their fields: wrap each update to encode it, then unwrap
    // it again, so nothing is cloned.
    let mut kept_oks = Vec::with_capacity(oks.len());
    for ((k, v), t, r) in oks {
        let record = Record::Data(k, v);
        if failed.is_none()
            && let Err(err) = builder.add(&record, &(), &t, &r).await
        {
            failed = Some(err.to_string());
        }
        if let Record::Data(k, v) = record {
            kept_oks.push(((k, v), t, r));
        }
    }
    let mut kept_errs = Vec::with_capacity(errs.len());
    for (e, t, r) in errs {
        let record = Record::Error(e);
        if failed.is_none()
            && let Err(err) = builder.add(&record, &(), &t, &r).await
        {
            failed = Some(err.to_string());
        }
        if let Record::Error(e) = record {
            kept_errs.push((e, t, r));
        }
    }
    let batch = match failed {
        // The parts written so far are never referenced; they stay behind
        // in blob until the shard is finalized.
        Some(err) => Err(err),
        None => builder
            .finish(upper)
            .await
            .map(Some)
            .map_err(|err| err.to_string()),
    };
    WrittenBatch {
        batch,
        oks: kept_oks,
        errs: kept_errs,
    }
}

async fn next_or_done<D>(input: &mut AsyncInput<u64, D>) -> Option<Event<u64, D>> {
    if input.is_closed() {
        std::future::pending().await
    } else {
        input.next().await
    }
}

pub(super) fn render<'scope, K: SinkData, V: SinkData, E: SinkData>(
    args: &PersistSinkArgs<K, V, E>,
    desired_ok: StreamVec<'scope, u64, ((K, V), u64, i64)>,
    desired_err: StreamVec<'scope, u64, (E, u64, i64)>,
    persist_ok: StreamVec<'scope, u64, ((K, V), u64, i64)>,
    persist_err: StreamVec<'scope, u64, (E, u64, i64)>,
    own_appends: StreamVec<'scope, u64, Bounds<u64>>,
    descs: StreamVec<'scope, u64, BatchDescription>,
) -> Written<'scope> {
    let scope = desired_ok.scope();
    let mut builder = AsyncOperatorBuilder::new(
        format!("persist_sink_write({})", args.name),
        scope,
        args.runtime.clone(),
    );
    let (mut batches_out, batches) = builder.new_output::<TransmittableBatch>();
    // Desired and persist must meet on the same worker to cancel out.
    let by_ok = |(kv, _, _): &((K, V), u64, i64)| kv.hashed();
    let by_err = |(e, _, _): &(E, u64, i64)| e.hashed();
    let mut desired_ok = builder.new_disconnected_input(desired_ok, Exchange::new(by_ok));
    let mut desired_err = builder.new_disconnected_input(desired_err, Exchange::new(by_err));
    let mut persist_ok = builder.new_disconnected_input(persist_ok, Exchange::new(by_ok));
    let mut persist_err = builder.new_disconnected_input(persist_err, Exchange::new(by_err));
    let mut descs = builder.new_input_for(descs.broadcast(), Pipeline, &[batches_out.index()]);
    let mut own_appends = builder.new_disconnected_input(own_appends.broadcast(), Pipeline);
    let client = args.client.clone();
    let shard = args.shard_id;
    let schema = std::sync::Arc::clone(&args.schema);
    let name = args.name.clone();
    let worker = scope.index();
    let button = builder.build(move |caps| async move {
        drop(caps);
        let purpose = format!("persist_sink_write({name}) worker {worker}");
        let mut writer = match open_writer(&client, shard, &schema, &purpose).await {
            Ok(writer) => writer,
            Err(err) => {
                error!(%shard, sink = %name, %err, "sink cannot write");
                return;
            }
        };
        let mut state = WriteState::<K, V, E> {
            ok: Correction::new(),
            err: Correction::new(),
            desired_ok: Antichain::from_elem(0),
            desired_err: Antichain::from_elem(0),
            persist_ok: Antichain::from_elem(0),
            persist_err: Antichain::from_elem(0),
            own_frontier: Antichain::from_elem(0),
            own_pending: VecDeque::new(),
            known: Antichain::from_elem(0),
            desc: None,
            in_flight: None,
        };
        loop {
            if desired_ok.is_closed()
                && desired_err.is_closed()
                && persist_ok.is_closed()
                && persist_err.is_closed()
                && descs.is_closed()
                && own_appends.is_closed()
            {
                break;
            }
            tokio::select! {
                Some(event) = next_or_done(&mut desired_ok) => match event {
                    Event::Data { data, .. } => state.ok.insert(data, false),
                    Event::Progress(f) => { advance(&mut state.desired_ok, &f); }
                },
                Some(event) = next_or_done(&mut desired_err) => match event {
                    Event::Data { data, .. } => state.err.insert(data, false),
                    Event::Progress(f) => { advance(&mut state.desired_err, &f); }
                },
                Some(event) = next_or_done(&mut persist_ok) => match event {
                    Event::Data { data, .. } => {
                        WriteState::<K, V, E>::persisted(&state.known, &mut state.ok, data);
                    }
                    Event::Progress(f) => if advance(&mut state.persist_ok, &f) {
                        state.read_back_advanced();
                    },
                },
                Some(event) = next_or_done(&mut persist_err) => match event {
                    Event::Data { data, .. } => {
                        WriteState::<K, V, E>::persisted(&state.known, &mut state.err, data);
                    }
                    Event::Progress(f) => if advance(&mut state.persist_err, &f) {
                        state.read_back_advanced();
                    },
                },
                Some(event) = next_or_done(&mut own_appends) => match event {
                    Event::Data { data, .. } => {
                        state.own_pending.extend(data.into_iter().map(|(lower, upper)| {
                            BatchDescription { lower, upper }
                        }));
                        state.read_back_advanced();
                    }
                    Event::Progress(f) => if advance(&mut state.own_frontier, &f) {
                        state.read_back_advanced();
                    },
                },
                Some(event) = next_or_done(&mut descs) => {
                    if let Event::Data { caps, data, .. } = event
                        && let Some(cap) = caps.into_iter().next()
                    {
                        for desc in data {
                            state.absorb(desc, cap.clone());
                        }
                    }
                },
                else => {}
            }
            if let Some((mut batches, cap)) = state.maybe_write(&mut writer).await {
                batches_out.give_container(&cap, &mut batches);
            }
        }
        writer.expire().await;
    });
    Written { batches, button }
}
