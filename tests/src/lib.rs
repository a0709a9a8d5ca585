//! End-to-end tests of the persist workspace that cross crate or process
//! boundaries. The tests live in `tests/`; `src/bin/backend_worker.rs` and
//! `src/bin/client_worker.rs` are the child processes they start.

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

/// The updates of batch `b` a client worker appends at time `b`: `size`
/// updates with keys `b{b}-{i}`, so a checker can tell whole batches apart.
pub fn client_batch(b: u64, size: usize) -> Vec<((String, String), u64, i64)> {
    (0..size)
        .map(|i| {
            (
                (format!("b{b}-{i}"), format!("value {i} of batch {b}")),
                b,
                1,
            )
        })
        .collect()
}
