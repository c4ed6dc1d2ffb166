//! Counters the data plane adds to and `/metrics` reads at scrape time: a latency histogram of
//! fixed buckets, failed attempts by reason, bytes relayed each way, clients refused by reason.
//!
//! Each is a set of relaxed atomics touched once where the thing it counts ends (a session's
//! set-up, a failed attempt, a session's end, a refusal): nothing per relayed message, no lock,
//! no allocation. Everything derived (cumulative buckets, totals) is computed by the reader.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the latency buckets, in microseconds (the last bucket, `+Inf`, is implicit):
/// from a loopback MTA's greeting (well under a millisecond) to a greeting timeout.
pub const LATENCY_BOUNDS_US: [u64; 14] = [
    250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
    2_500_000, 5_000_000,
];

/// A histogram of durations: one count per bucket (not cumulative) and the sum. Recording is
/// one add to the bucket and one to the sum; the number of samples is the buckets' total.
#[derive(Default)]
pub struct LatencyHistogram {
    buckets: [AtomicU64; LATENCY_BOUNDS_US.len() + 1],
    sum_us: AtomicU64,
}

/// A histogram as read at one moment.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HistogramReading {
    /// Per bucket, samples at or below its bound (not cumulative); the last is `+Inf`.
    pub buckets: Vec<u64>,
    pub sum_seconds: f64,
    pub count: u64,
}

impl LatencyHistogram {
    pub fn record(&self, elapsed: Duration) {
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        let bucket = LATENCY_BOUNDS_US.partition_point(|&bound| bound < micros);
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(micros, Ordering::Relaxed);
    }

    /// Samples recorded so far.
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    pub fn read(&self) -> HistogramReading {
        let buckets: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        HistogramReading {
            count: buckets.iter().sum(),
            buckets,
            sum_seconds: self.sum_us.load(Ordering::Relaxed) as f64 / 1e6,
        }
    }
}

/// Why a backend did not take a session on live traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureReason {
    /// The connect failed (refused, unreachable, reset).
    ConnectError,
    /// The connect did not complete within `connect_timeout`.
    ConnectTimeout,
    /// Connected, but no greeting within `greeting_timeout`.
    GreetingTimeout,
    /// Connected, but the connection ended or broke before a complete greeting (or the PROXY
    /// header could not be sent).
    GreetingError,
    /// A 4xx/5xx greeting.
    GreetingRefused,
}

impl FailureReason {
    pub const ALL: [FailureReason; 5] = [
        FailureReason::ConnectError,
        FailureReason::ConnectTimeout,
        FailureReason::GreetingTimeout,
        FailureReason::GreetingError,
        FailureReason::GreetingRefused,
    ];

    /// The `reason` label.
    pub fn label(self) -> &'static str {
        match self {
            FailureReason::ConnectError => "connect_error",
            FailureReason::ConnectTimeout => "connect_timeout",
            FailureReason::GreetingTimeout => "greeting_timeout",
            FailureReason::GreetingError => "greeting_error",
            FailureReason::GreetingRefused => "greeting_refused",
        }
    }
}

/// One count per value of a reason enum `R` (with `N` values, numbered from 0).
pub struct ByReason<R, const N: usize> {
    counts: [AtomicU64; N],
    reason: std::marker::PhantomData<R>,
}

impl<R, const N: usize> Default for ByReason<R, N> {
    fn default() -> Self {
        Self {
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            reason: std::marker::PhantomData,
        }
    }
}

impl<R: Copy + Into<usize>, const N: usize> ByReason<R, N> {
    pub fn record(&self, reason: R) {
        self.counts[reason.into()].fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self, reason: R) -> u64 {
        self.counts[reason.into()].load(Ordering::Relaxed)
    }

    pub fn total(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }
}

impl From<FailureReason> for usize {
    fn from(reason: FailureReason) -> usize {
        reason as usize
    }
}

impl From<Refusal> for usize {
    fn from(why: Refusal) -> usize {
        why as usize
    }
}

/// Failed attempts by reason.
pub type FailureCounts = ByReason<FailureReason, { FailureReason::ALL.len() }>;

/// Why a client was answered `421`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// No backend greeted (all down, drained, full, or failing).
    NoBackend,
    /// The service was at its `max_connections`.
    MaxConnections,
    /// The balancer itself ran out of descriptors, memory or ports connecting to a backend.
    Exhausted,
}

impl Refusal {
    pub const ALL: [Refusal; 3] = [
        Refusal::NoBackend,
        Refusal::MaxConnections,
        Refusal::Exhausted,
    ];

    /// The `reason` label.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::NoBackend => "no_backend",
            Refusal::MaxConnections => "max_connections",
            Refusal::Exhausted => "balancer_exhausted",
        }
    }
}

/// Clients refused by reason.
pub type RefusalCounts = ByReason<Refusal, { Refusal::ALL.len() }>;

/// Bytes relayed each way, added once per session at its end.
#[derive(Default)]
pub struct Transferred {
    pub from_client: AtomicU64,
    pub from_backend: AtomicU64,
}

impl Transferred {
    pub fn add(&self, from_client: u64, from_backend: u64) {
        self.from_client.fetch_add(from_client, Ordering::Relaxed);
        self.from_backend.fetch_add(from_backend, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_land_in_the_first_bucket_whose_bound_holds_them() {
        let histogram = LatencyHistogram::default();
        histogram.record(Duration::from_micros(250));
        histogram.record(Duration::from_micros(251));
        histogram.record(Duration::from_secs(60));
        let reading = histogram.read();
        assert_eq!(reading.buckets[0], 1, "250 µs is within the 250 µs bucket");
        assert_eq!(reading.buckets[1], 1);
        assert_eq!(reading.buckets[LATENCY_BOUNDS_US.len()], 1, "+Inf");
        assert_eq!(reading.count, 3);
        assert_eq!(histogram.count(), 3);
        assert!((reading.sum_seconds - 60.000501).abs() < 1e-9);
    }
}
