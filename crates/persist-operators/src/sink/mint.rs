//! The sink's `mint` operator: one worker decides batch bounds.

use timely::PartialOrder;
use timely::dataflow::StreamVec;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::Capability;
use timely::progress::Antichain;
use tracing::{debug, error};

use super::{BatchDescription, PersistSinkArgs, SinkData, advance, meet, open_writer};
use crate::builder::{AsyncInput, AsyncOperatorBuilder, AsyncOutput, Event, ShutdownButton};

/// The streams `mint` produces.
pub(super) struct Minted<'scope, K, V, E> {
    /// The desired ok collection, passed through untouched.
    pub desired_ok: StreamVec<'scope, u64, ((K, V), u64, i64)>,
    /// The desired err collection, passed through untouched.
    pub desired_err: StreamVec<'scope, u64, (E, u64, i64)>,
    /// Batch descriptions, on the minting worker only, each at its lower.
    pub descs: StreamVec<'scope, u64, BatchDescription>,
    pub button: ShutdownButton,
}

/// What the minting worker knows.
#[derive(Debug)]
struct MintState {
    desired_ok: Antichain<u64>,
    desired_err: Antichain<u64>,
    /// The shard's upper, but never before the sink's as_of.
    persist: Antichain<u64>,
    /// The lower of the last description minted.
    last_lower: Option<Antichain<u64>>,
    read_only: bool,
}

impl MintState {
    /// The next description, if one is due: writable, desired ahead of the
    /// shard, and the shard moved since the last one.
    fn mint(&mut self) -> Option<BatchDescription> {
        let desired = meet(&self.desired_ok, &self.desired_err);
        let moved = self
            .last_lower
            .as_ref()
            .is_none_or(|last| PartialOrder::less_than(last, &self.persist));
        if self.read_only || !moved || !PartialOrder::less_than(&self.persist, &desired) {
            return None;
        }
        let desc = BatchDescription {
            lower: self.persist.clone(),
            upper: desired,
        };
        self.last_lower = Some(desc.lower.clone());
        Some(desc)
    }
}

/// Sends a data event's records on, with the capability it came with.
fn pass_through<D: Clone + 'static>(
    event: Event<u64, D>,
    out: &mut AsyncOutput<u64, D>,
) -> Option<Antichain<u64>> {
    match event {
        Event::Data { caps, mut data, .. } => {
            if let Some(cap) = caps.first() {
                out.give_container(cap, &mut data);
            }
            None
        }
        Event::Progress(frontier) => Some(frontier),
    }
}

async fn next_or_done<D>(input: &mut AsyncInput<u64, D>, done: bool) -> Option<Event<u64, D>> {
    if done {
        std::future::pending().await
    } else {
        input.next().await
    }
}

pub(super) fn render<'scope, K: SinkData, V: SinkData, E: SinkData>(
    args: &PersistSinkArgs<K, V, E>,
    active_worker: usize,
    desired_ok: StreamVec<'scope, u64, ((K, V), u64, i64)>,
    desired_err: StreamVec<'scope, u64, (E, u64, i64)>,
) -> Minted<'scope, K, V, E> {
    let scope = desired_ok.scope();
    let mut builder = AsyncOperatorBuilder::new(
        format!("persist_sink_mint({})", args.name),
        scope,
        args.runtime.clone(),
    );
    let (mut ok_out, ok_stream) = builder.new_output();
    let (mut err_out, err_stream) = builder.new_output();
    let (mut descs_out, descs) = builder.new_output::<BatchDescription>();
    let mut ok_in = builder.new_input_for(desired_ok, Pipeline, &[ok_out.index()]);
    let mut err_in = builder.new_input_for(desired_err, Pipeline, &[err_out.index()]);
    let active = scope.index() == active_worker;
    let client = args.client.clone();
    let shard = args.shard_id;
    let schema = std::sync::Arc::clone(&args.schema);
    let as_of = args.as_of.clone();
    let name = args.name.clone();
    let mut read_only_rx = args.read_only.clone();
    let button = builder.build(move |caps| async move {
        let mut desc_cap: Option<Capability<u64>> = caps.into_iter().nth(2).filter(|_| active);
        let mut writer = match &desc_cap {
            Some(_) => match open_writer(&client, shard, &schema, &format!("persist_sink_mint({name})")).await {
                Ok(writer) => Some(writer),
                Err(err) => {
                    error!(%shard, sink = %name, %err, "sink cannot mint: it will not write");
                    desc_cap = None;
                    None
                }
            },
            None => None,
        };
        let mut state = MintState {
            desired_ok: Antichain::from_elem(0),
            desired_err: Antichain::from_elem(0),
            persist: as_of.clone(),
            last_lower: None,
            read_only: *read_only_rx.borrow_and_update(),
        };
        if let Some(writer) = &writer {
            advance(&mut state.persist, writer.upper());
        }
        let mut read_only_open = true;
        let mut bumped = false;
        let (mut ok_done, mut err_done) = (false, false);
        loop {
            let inputs_done = ok_done && err_done;
            let upper_closed = writer.as_ref().is_none_or(|w| w.upper().is_empty());
            if inputs_done && (desc_cap.is_none() || upper_closed || (state.read_only && !read_only_open)) {
                break;
            }
            let wait_upper = async {
                match writer.as_mut() {
                    Some(writer) if !writer.upper().is_empty() => {
                        let seen = writer.upper().clone();
                        writer.wait_for_upper_past(&seen).await
                    }
                    _ => std::future::pending().await,
                }
            };
            tokio::select! {
                event = next_or_done(&mut ok_in, ok_done) => match event {
                    Some(event) => if let Some(f) = pass_through(event, &mut ok_out) {
                        advance(&mut state.desired_ok, &f);
                    },
                    None => ok_done = true,
                },
                event = next_or_done(&mut err_in, err_done) => match event {
                    Some(event) => if let Some(f) = pass_through(event, &mut err_out) {
                        advance(&mut state.desired_err, &f);
                    },
                    None => err_done = true,
                },
                result = wait_upper => {
                    if let Err(err) = result {
                        error!(%shard, sink = %name, %err, "sink cannot follow its shard's upper");
                    }
                }
                changed = read_only_rx.changed(), if read_only_open && state.read_only => {
                    match changed {
                        Ok(()) => state.read_only = *read_only_rx.borrow_and_update(),
                        Err(_) => read_only_open = false,
                    }
                    debug!(%shard, sink = %name, read_only = state.read_only, "sink mode");
                }
            }
            let (Some(cap), Some(writer)) = (desc_cap.as_mut(), writer.as_mut()) else {
                continue;
            };
            advance(&mut state.persist, writer.upper());
            if !state.read_only && !bumped {
                // Our first write: bring the shard's upper up to the as_of,
                // so the shard can be read back up to where we write.
                bumped = true;
                if PartialOrder::less_than(writer.upper(), &as_of) {
                    if let Err(err) = writer.advance_upper(&as_of).await {
                        error!(%shard, sink = %name, %err, "sink cannot advance the upper to its as_of");
                    }
                    advance(&mut state.persist, writer.upper());
                }
            }
            match state.mint() {
                Some(desc) => {
                    let Some(&lower) = desc.lower.as_option() else {
                        continue;
                    };
                    debug!(%shard, sink = %name, ?desc, "minted");
                    descs_out.give(&cap.delayed(&lower), desc);
                    // Lowers strictly increase: no description at `lower` again.
                    cap.downgrade(&lower.saturating_add(1).max(*cap.time()));
                }
                None => match state.persist.as_option() {
                    Some(&t) if t > *cap.time() => cap.downgrade(&t),
                    Some(_) => {}
                    None => desc_cap = None,
                },
            }
        }
    });
    Minted {
        desired_ok: ok_stream,
        desired_err: err_stream,
        descs,
        button,
    }
}
