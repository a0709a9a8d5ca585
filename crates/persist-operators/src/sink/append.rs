//! The sink's `append` operator: one worker appends all workers' batches.

use persist_client::{Batch, TransmittableBatch};
use timely::PartialOrder;
use timely::dataflow::StreamVec;
use timely::dataflow::channels::pact::{Exchange, Pipeline};
use timely::progress::Antichain;
use tracing::{debug, error, trace};

use super::{BatchDescription, PersistSinkArgs, SinkData, SinkWriteHandle, advance, open_writer};
use crate::builder::{AsyncOperatorBuilder, Event, ShutdownButton};
use crate::own_appends::OwnAppends;
use crate::record::Record;

type SinkBatch<K, V, E> = Batch<Record<K, V, E>, (), u64, i64>;

/// The appending worker's view.
struct AppendState<K: SinkData, V: SinkData, E: SinkData> {
    writer: SinkWriteHandle<K, V, E>,
    /// No batch for a lower before this frontier will arrive any more.
    batches_frontier: Antichain<u64>,
    /// The greatest lower seen in a description or a batch.
    lower: Antichain<u64>,
    /// The description for `lower`, once it arrived.
    desc: Option<BatchDescription>,
    /// The batches for `lower` received so far.
    batches: Vec<SinkBatch<K, V, E>>,
    /// Where successful appends are recorded for the read-back source.
    own: OwnAppends<u64>,
}

impl<K: SinkData, V: SinkData, E: SinkData> AppendState<K, V, E> {
    /// Moves on to `lower`, deleting the batches of the old one that were
    /// not appended (they are nobody else's to append).
    async fn advance_lower(&mut self, lower: Antichain<u64>) {
        self.lower = lower;
        self.desc = None;
        for batch in self.batches.drain(..) {
            batch.delete().await;
        }
    }

    async fn absorb_desc(&mut self, desc: BatchDescription) {
        if PartialOrder::less_than(&self.lower, &desc.lower) {
            self.advance_lower(desc.lower.clone()).await;
        } else if self.lower != desc.lower {
            trace!(?desc, "outdated description");
            return;
        }
        self.desc = Some(desc);
    }

    async fn absorb_batch(&mut self, batch: TransmittableBatch) {
        let batch = self.writer.batch_from_transmittable_batch(batch);
        if PartialOrder::less_than(&self.lower, batch.lower()) {
            self.advance_lower(batch.lower().clone()).await;
        } else if &self.lower != batch.lower() {
            trace!(lower = ?batch.lower().elements(), "outdated batch");
            batch.delete().await;
            return;
        }
        self.batches.push(batch);
    }

    /// Appends the batches of the current description once every worker's
    /// batch for it has arrived.
    async fn maybe_append(&mut self) {
        if !PartialOrder::less_than(&self.lower, &self.batches_frontier) {
            return;
        }
        let Some(desc) = self.desc.take() else {
            return;
        };
        // The read-back source waits for the outcome before it decides
        // whether to fetch what this append may write.
        let pending = self.own.start(&desc.lower, &desc.upper);
        let next = loop {
            let mut batches: Vec<&mut SinkBatch<K, V, E>> = self.batches.iter_mut().collect();
            let result = self
                .writer
                .compare_and_append_batch(&mut batches, desc.lower.clone(), desc.upper.clone())
                .await;
            match result {
                Ok(Ok(())) => {
                    debug!(?desc, batches = self.batches.len(), "appended");
                    // Consumed by the append: nothing to delete.
                    self.batches.clear();
                    self.own.record(&desc.lower, &desc.upper);
                    break desc.upper.clone();
                }
                Ok(Err(mismatch)) if PartialOrder::less_than(&mismatch.current, &desc.lower) => {
                    // Behind our lower (only before the first append): close
                    // the gap with an empty batch and try again.
                    if let Err(err) = self.writer.advance_upper(&desc.lower).await {
                        error!(?desc, %err, "sink cannot advance the shard's upper");
                        break desc.lower.clone();
                    }
                }
                Ok(Err(mismatch)) => {
                    // Someone else (another replica) appended first. Our
                    // read-back will show what they wrote, and the next
                    // description corrects whatever differs.
                    debug!(?desc, current = ?mismatch.current.elements(), "lost the append race");
                    break mismatch.current;
                }
                Err(err) => {
                    error!(?desc, %err, "sink cannot append");
                    break desc.lower.clone();
                }
            }
        };
        drop(pending);
        if PartialOrder::less_than(&self.lower, &next) {
            self.advance_lower(next).await;
        } else {
            for batch in self.batches.drain(..) {
                batch.delete().await;
            }
        }
    }
}

pub(super) fn render<'scope, K: SinkData, V: SinkData, E: SinkData>(
    args: &PersistSinkArgs<K, V, E>,
    active_worker: usize,
    descs: StreamVec<'scope, u64, BatchDescription>,
    batches: StreamVec<'scope, u64, TransmittableBatch>,
    own: OwnAppends<u64>,
) -> ShutdownButton {
    let scope = descs.scope();
    let mut builder = AsyncOperatorBuilder::new(
        format!("persist_sink_append({})", args.name),
        scope,
        args.runtime.clone(),
    );
    // Descriptions exist only on the active worker already.
    let mut descs = builder.new_disconnected_input(descs, Pipeline);
    let active = active_worker as u64;
    let mut batches = builder.new_disconnected_input(batches, Exchange::new(move |_| active));
    let is_active = scope.index() == active_worker;
    let client = args.client.clone();
    let shard = args.shard_id;
    let schema = std::sync::Arc::clone(&args.schema);
    let name = args.name.clone();
    builder.build(move |caps| async move {
        drop(caps);
        if !is_active {
            return;
        }
        let purpose = format!("persist_sink_append({name})");
        let writer = match open_writer(&client, shard, &schema, &purpose).await {
            Ok(writer) => writer,
            Err(err) => {
                error!(%shard, sink = %name, %err, "sink cannot append");
                return;
            }
        };
        let mut state = AppendState::<K, V, E> {
            writer,
            batches_frontier: Antichain::from_elem(0),
            lower: Antichain::from_elem(0),
            desc: None,
            batches: Vec::new(),
            own,
        };
        loop {
            tokio::select! {
                Some(event) = descs.next() => {
                    if let Event::Data { data, .. } = event {
                        for desc in data {
                            state.absorb_desc(desc).await;
                        }
                        state.maybe_append().await;
                    }
                }
                Some(event) = batches.next() => match event {
                    Event::Data { data, .. } => {
                        for batch in data {
                            state.absorb_batch(batch).await;
                        }
                    }
                    Event::Progress(frontier) => {
                        advance(&mut state.batches_frontier, &frontier);
                        state.maybe_append().await;
                    }
                },
                else => break,
            }
        }
        for batch in state.batches.drain(..) {
            batch.delete().await;
        }
        state.writer.expire().await;
    })
}
