//! End-to-end tests of the persist workspace that cross crate or process
//! boundaries. The tests live in `tests/`; `src/bin/backend_worker.rs` is the
//! child process the multi-process tests start.

#![warn(missing_docs, missing_debug_implementations)]

/// The payload written by a worker for its `n`th win in task `task`, so a
/// checker can tell every write apart.
pub fn cas_payload(worker: usize, task: usize, n: usize) -> String {
    format!("w{worker}/t{task}/{n}")
}

/// The value a blob worker writes: `len` copies of its id byte, so a torn
/// value (a mix of two writers) is detectable.
pub fn blob_payload(worker: u8, len: usize) -> Vec<u8> {
    vec![worker; len]
}
