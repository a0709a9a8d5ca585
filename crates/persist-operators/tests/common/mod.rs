//! Helpers shared by the operator tests: runtimes, timely workers, and
//! comparing collections at every time.

#![allow(dead_code)]

use std::time::{Duration, Instant};

use differential_dataflow::consolidation::consolidate_updates;
use timely::worker::Worker;

/// Fails a test that stops making progress instead of hanging it. Never
/// used to decide an outcome.
pub const GUARD: Duration = Duration::from_secs(120);

/// A string update as the tests write them.
pub type Update = ((String, String), u64, i64);

/// A runtime for persist's I/O and the operators' futures.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime")
}

/// Runs `func` on `workers` timely workers of this process.
pub fn on_workers<R: Send + 'static>(
    workers: usize,
    func: impl Fn(&mut Worker) -> R + Send + Sync + 'static,
) -> Vec<R> {
    timely::execute(timely::Config::process(workers), move |w| func(w))
        .expect("timely starts")
        .join()
        .into_iter()
        .map(|r| r.expect("worker succeeds"))
        .collect()
}

/// Steps `worker` until `done` holds, failing after [`GUARD`].
pub fn step_until(worker: &mut Worker, what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < GUARD, "timed out waiting for {what}");
        worker.step_or_park(Some(Duration::from_millis(10)));
    }
}

/// The contents of `updates` at `time`: every update at a time not after
/// it, consolidated, with the time dropped.
pub fn at<D: Ord + Clone>(updates: &[(D, u64, i64)], time: u64) -> Vec<(D, i64)> {
    let mut out: Vec<(D, u64, i64)> = updates
        .iter()
        .filter(|(_, t, _)| *t <= time)
        .map(|(d, _, r)| (d.clone(), 0, *r))
        .collect();
    consolidate_updates(&mut out);
    out.into_iter().map(|(d, _, r)| (d, r)).collect()
}

/// Asserts `actual` and `expected` hold the same contents at every time in
/// `times`.
pub fn assert_equal_at<D: Ord + Clone + std::fmt::Debug>(
    actual: &[(D, u64, i64)],
    expected: &[(D, u64, i64)],
    times: impl IntoIterator<Item = u64>,
) {
    for t in times {
        assert_eq!(
            at(actual, t),
            at(expected, t),
            "contents differ at time {t}"
        );
    }
}

/// The updates worker `worker` contributes at `time`: inserts of fresh
/// keys, and a retraction of one of its keys of two times before.
pub fn generated(worker: usize, time: u64) -> Vec<Update> {
    let mut out = Vec::new();
    for i in 0..5u64 {
        out.push((
            (format!("w{worker}-t{time}-{i}"), format!("v{}", time * i)),
            time,
            1,
        ));
    }
    if time >= 2 {
        let old = time - 2;
        out.push(((format!("w{worker}-t{old}-0"), "v0".to_owned()), time, -1));
    }
    out
}
