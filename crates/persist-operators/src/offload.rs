//! Running CPU-heavy work (encoding and decoding parts) off the timely
//! worker thread.

use std::future::Future;

use tokio::runtime::Handle;
use tokio::task::JoinHandle;

/// Runs `future` to completion on a thread of `runtime`'s blocking pool.
///
/// Encoding or decoding a part takes milliseconds of CPU between awaits.
/// On the runtime's worker threads such a task would queue behind other
/// long-running tasks (persist's background compaction is one); on the
/// blocking pool the OS shares the cores between them. Its I/O still goes
/// through `runtime`'s drivers, so the runtime must be multi-threaded (as
/// the operators' own futures already require).
///
/// Callers bound how many they start at once: each holds a thread.
pub(crate) fn offload<F>(runtime: &Handle, future: F) -> JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handle = runtime.clone();
    runtime.spawn_blocking(move || handle.block_on(future))
}
