//! The lease lifecycle of readers and writers: background heartbeats that
//! keep a lease alive, and expiry (explicit, or in the background when a
//! handle is dropped).

use std::time::Duration;

use differential_dataflow::lattice::Lattice;
use persist_types::Codec64;
use timely::progress::Timestamp;
use tokio::task::JoinHandle;

use crate::ids::{LeasedReaderId, WriterId};
use crate::internal::machine::{Machine, Transition};
use crate::internal::state::State;

/// A handle that holds a lease on a shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Holder {
    /// A leased reader.
    Reader(LeasedReaderId),
    /// A writer.
    Writer(WriterId),
}

impl Holder {
    /// Records a heartbeat; returns whether the holder is registered.
    fn heartbeat<T: Timestamp + Lattice + Codec64>(
        self,
        state: &mut State<T>,
        now_ms: u64,
    ) -> bool {
        match self {
            Holder::Reader(id) => state.heartbeat_leased_reader(id, now_ms),
            Holder::Writer(id) => state.heartbeat_writer(id, now_ms),
        }
    }

    /// Removes the holder; returns whether it was registered.
    fn remove<T: Timestamp + Lattice + Codec64>(self, state: &mut State<T>) -> bool {
        match self {
            Holder::Reader(id) => state.expire_leased_reader(id),
            Holder::Writer(id) => state.expire_writer(id),
        }
    }

    /// How long the holder's lease lasts.
    fn lease<T: Timestamp + Lattice + Codec64 + Sync>(self, machine: &Machine<T>) -> Duration {
        let cfg = machine.cfg();
        match self {
            Holder::Reader(_) => cfg.reader_lease_duration,
            Holder::Writer(_) => cfg.writer_lease_duration,
        }
    }
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Holder::Reader(id) => id.fmt(f),
            Holder::Writer(id) => id.fmt(f),
        }
    }
}

/// Removes `holder` from the shard's state, releasing its holds. A failure
/// is logged: the lease then lapses on its own.
pub(crate) async fn expire<T>(machine: &Machine<T>, holder: Holder)
where
    T: Timestamp + Lattice + Codec64 + Sync,
{
    let result = machine
        .apply(|state, _| {
            if holder.remove(state) {
                Transition::Write(())
            } else {
                Transition::Skip(())
            }
        })
        .await;
    if let Err(err) = result {
        tracing::warn!(shard = %machine.shard_id(), %err, "could not expire {holder}");
    }
}

/// What a handle runs when dropped unexpired.
pub(crate) type ExpireOnDrop = Box<dyn FnOnce() + Send + Sync>;

/// Expires `holder` in the background when its handle is dropped (best
/// effort: without a tokio runtime the lease simply lapses).
pub(crate) fn expire_on_drop<T>(machine: &Machine<T>, holder: Holder) -> ExpireOnDrop
where
    T: Timestamp + Lattice + Codec64 + Sync,
{
    let machine = machine.clone();
    Box::new(move || {
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move { expire(&machine, holder).await });
        }
    })
}

/// A running heartbeat task; dropping it stops the task.
#[derive(Debug)]
pub(crate) struct HeartbeatTask(JoinHandle<()>);

impl HeartbeatTask {
    /// Whether the task has stopped (its handle was expired or the shard
    /// finalized).
    pub fn is_finished(&self) -> bool {
        self.0.is_finished()
    }
}

impl Drop for HeartbeatTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Spawns a task that records `holder`'s heartbeat every quarter of its
/// lease (expiring lapsed handles along the way). The task stops once the
/// holder is no longer registered, the shard is a tombstone, or the state
/// cannot be read.
pub(crate) fn spawn<T>(machine: Machine<T>, holder: Holder) -> HeartbeatTask
where
    T: Timestamp + Lattice + Codec64 + Sync,
{
    let interval = holder.lease(&machine) / 4;
    let task = tokio::spawn(async move {
        let interval = interval.max(Duration::from_millis(1));
        loop {
            tokio::time::sleep(interval).await;
            let result = machine
                .apply(|state, now| {
                    if state.is_tombstone() {
                        return Transition::Skip(false);
                    }
                    state.expire_lapsed(now);
                    if holder.heartbeat(state, now) {
                        Transition::Write(true)
                    } else {
                        Transition::Refuse(false)
                    }
                })
                .await;
            match result {
                Ok((_, true)) => {}
                Ok((_, false)) => {
                    tracing::info!(shard = %machine.shard_id(), %holder, "heartbeats stop: handle is gone");
                    return;
                }
                Err(err) => {
                    tracing::warn!(shard = %machine.shard_id(), %holder, %err, "heartbeats stop");
                    return;
                }
            }
        }
    });
    HeartbeatTask(task)
}
