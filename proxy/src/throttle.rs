//! Rate limits as a generic cell rate algorithm (GCRA, the token bucket kept as one "theoretical
//! arrival time"; the rule itself is `switchyard_common::gcra`, which the XDP program applies
//! too): one atomic word per limited thing, taken with one compare-and-swap, no lock and no
//! timer. Used for a backend's `max_session_rate` and a source's `per_source_rate`.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use switchyard_common::gcra::next_arrival;

/// Nanoseconds on a monotonic clock private to the process.
pub fn now_ns() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    let base = BASE.get_or_init(Instant::now);
    u64::try_from(base.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// `rate` events per second with bursts of `burst`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    pub per_second: u32,
    pub burst: u32,
}

impl Rate {
    /// Nanoseconds between two events at the steady rate.
    pub fn interval(self) -> u64 {
        1_000_000_000 / u64::from(self.per_second.max(1))
    }

    /// How far ahead of now the arrival time may run: a full bucket of `burst` events.
    pub fn tolerance(self) -> u64 {
        self.interval() * u64::from(self.burst.max(1))
    }
}

/// One limited thing's state: when the next event would be due at the steady rate.
#[derive(Debug, Default)]
pub struct Gcra {
    arrival_ns: AtomicU64,
}

impl Gcra {
    /// Takes one event at `now` if `rate` allows it.
    pub fn try_take(&self, rate: Rate, now: u64) -> bool {
        let (interval, tolerance) = (rate.interval(), rate.tolerance());
        let mut current = self.arrival_ns.load(Ordering::Relaxed);
        loop {
            let Some(next) = next_arrival(current, now, interval, tolerance) else {
                return false;
            };
            match self.arrival_ns.compare_exchange_weak(
                current,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(seen) => current = seen,
            }
        }
    }

    /// Whether an event at `now` would be allowed (nothing is taken).
    pub fn would_allow(&self, rate: Rate, now: u64) -> bool {
        let current = self.arrival_ns.load(Ordering::Relaxed);
        next_arrival(current, now, rate.interval(), rate.tolerance()).is_some()
    }

    /// Whether the bucket is full again at `now` (the state says nothing any more: it can be
    /// forgotten).
    pub fn is_idle(&self, now: u64) -> bool {
        self.arrival_ns.load(Ordering::Relaxed) <= now
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: u64 = 1_000_000_000;

    #[test]
    fn admits_the_burst_then_the_rate() {
        let rate = Rate {
            per_second: 10,
            burst: 5,
        };
        let cell = Gcra::default();
        let start = 7 * SECOND;
        let burst = (0..20).filter(|_| cell.try_take(rate, start)).count();
        assert_eq!(burst, 5);
        // Over the next 2 s, one every 100 ms.
        let mut admitted = 0;
        for ms in (0..2000).step_by(10) {
            if cell.try_take(rate, start + ms * 1_000_000) {
                admitted += 1;
            }
        }
        // The burst used the first 100 ms of credit: 19 more in 2 s.
        assert_eq!(admitted, 19);
        assert!(!cell.is_idle(start + 2 * SECOND));
        assert!(cell.is_idle(start + 3 * SECOND));
        assert!(cell.would_allow(rate, start + 3 * SECOND));
    }
}
