//! Background tasks that keep a handle's lease alive.

use std::time::Duration;

use differential_dataflow::lattice::Lattice;
use persist_types::Codec64;
use timely::progress::Timestamp;
use tokio::task::JoinHandle;

use crate::internal::machine::{Machine, Transition};
use crate::internal::state::State;

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

/// Spawns a task that applies `beat` every `interval`. `beat` records the
/// heartbeat (expiring lapsed handles along the way) and returns whether the
/// handle is still registered; the task stops once it is not, or when the
/// state cannot be read.
pub(crate) fn spawn<T>(
    machine: Machine<T>,
    what: String,
    interval: Duration,
    beat: impl Fn(&mut State<T>, u64) -> bool + Send + Sync + 'static,
) -> HeartbeatTask
where
    T: Timestamp + Lattice + Codec64 + Sync,
{
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
                    if beat(state, now) {
                        Transition::Write(true)
                    } else {
                        Transition::Refuse(false)
                    }
                })
                .await;
            match result {
                Ok((_, true)) => {}
                Ok((_, false)) => {
                    tracing::info!(shard = %machine.shard_id(), %what, "heartbeats stop: handle is gone");
                    return;
                }
                Err(err) => {
                    tracing::warn!(shard = %machine.shard_id(), %what, %err, "heartbeats stop");
                    return;
                }
            }
        }
    });
    HeartbeatTask(task)
}

/// The heartbeat interval for a lease: often enough that a few missed beats
/// do not lose it.
pub(crate) fn interval_for(lease: Duration) -> Duration {
    lease / 4
}
