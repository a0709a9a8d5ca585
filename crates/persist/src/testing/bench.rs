//! Measuring helpers shared by the benchmarks of `persist` and
//! `persist-client`, which print every figure beside a baseline measured in
//! the same run (see `docs/benchmarks.md`).

use std::time::Duration;

/// One mebibyte.
pub const MIB: usize = 1 << 20;

/// The number of measured rounds: `PERSIST_BENCH_ROUNDS` if it is set to a
/// number, `default` otherwise.
pub fn rounds(default: usize) -> usize {
    std::env::var("PERSIST_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(default)
}

/// Throughput of `bytes` moved in `elapsed`, in MiB/s.
pub fn mib_per_sec(bytes: usize, elapsed: Duration) -> f64 {
    bytes as f64 / MIB as f64 / elapsed.as_secs_f64()
}

/// A duration in milliseconds, for printing (`"0.123 ms"`).
pub fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

/// The latencies of one series of operations.
#[derive(Debug, Clone, Default)]
pub struct Latencies(pub Vec<Duration>);

impl Latencies {
    /// Records one operation's latency.
    pub fn push(&mut self, latency: Duration) {
        self.0.push(latency);
    }

    /// The `p` quantile (`0.5` for the median), by nearest rank; zero for no
    /// operations.
    pub fn percentile(&mut self, p: f64) -> Duration {
        if self.0.is_empty() {
            return Duration::ZERO;
        }
        self.0.sort();
        let idx = ((self.0.len() as f64 - 1.0) * p).round() as usize;
        self.0[idx]
    }

    /// The time all operations took, one after the other.
    pub fn total(&self) -> Duration {
        self.0.iter().sum()
    }

    /// Operations per second, run one after the other.
    pub fn ops_per_sec(&self) -> f64 {
        self.0.len() as f64 / self.total().as_secs_f64()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_the_nearest_rank() {
        let mut l = Latencies((1..=100).rev().map(Duration::from_millis).collect());
        assert_eq!(l.percentile(0.5), Duration::from_millis(51));
        assert_eq!(l.percentile(0.99), Duration::from_millis(99));
        assert_eq!(l.percentile(1.0), Duration::from_millis(100));
        assert_eq!(Latencies::default().percentile(0.5), Duration::ZERO);
    }
}
