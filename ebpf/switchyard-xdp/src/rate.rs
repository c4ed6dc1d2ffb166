//! The shared GCRA rule (`switchyard_common::gcra`) on one 64-bit arrival time in a map: the
//! per-source rate of `[service.limits]` and a backend's `max_session_rate`.

use core::intrinsics::{AtomicOrdering, atomic_cxchg};

use switchyard_common::gcra::next_arrival;

/// Whether an event at `now` fits the rate whose arrival time is at `arrival`.
#[inline(always)]
pub fn allows(arrival: *const u64, interval: u64, tolerance: u64, now: u64) -> bool {
    let current = unsafe { core::ptr::read_volatile(arrival) };
    next_arrival(current, now, interval, tolerance).is_some()
}

/// Takes one event at `now` if it fits (a few compare-and-swap tries against other CPUs).
#[inline(always)]
pub fn take(arrival: *mut u64, interval: u64, tolerance: u64, now: u64) -> bool {
    for _ in 0..4 {
        let current = unsafe { core::ptr::read_volatile(arrival) };
        let Some(next) = next_arrival(current, now, interval, tolerance) else {
            return false;
        };
        let (_, swapped) = unsafe {
            atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(
                arrival, current, next,
            )
        };
        if swapped {
            return true;
        }
    }
    false
}
