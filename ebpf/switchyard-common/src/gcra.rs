//! GCRA, the rate rule both planes apply (a source's `per_source_rate`, a backend's
//! `max_session_rate`): the state is one "theoretical arrival time"; an event at `now` is due at
//! the later of now and that time plus one `interval`, and fits while that is at most
//! `tolerance` (a bucket's worth of intervals) ahead of now. Callers keep the time in an
//! atomic word and store the new one with a compare-and-swap.

/// The arrival time after an event at `now`, or `None` when the event does not fit.
#[inline(always)]
pub fn next_arrival(arrival: u64, now: u64, interval: u64, tolerance: u64) -> Option<u64> {
    let next = if arrival > now { arrival } else { now } + interval;
    (next - now <= tolerance).then_some(next)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_fits_then_one_per_interval() {
        let (interval, tolerance) = (100, 300);
        let mut arrival = 0;
        let mut fitted = 0;
        while let Some(next) = next_arrival(arrival, 1_000, interval, tolerance) {
            arrival = next;
            fitted += 1;
        }
        assert_eq!(fitted, 3);
        assert_eq!(next_arrival(arrival, 1_099, interval, tolerance), None);
        assert_eq!(
            next_arrival(arrival, 1_100, interval, tolerance),
            Some(1_400)
        );
    }
}
