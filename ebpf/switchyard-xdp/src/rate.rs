//! GCRA on one 64-bit arrival time in a map (the proxy's `throttle.rs` in kernel form): the
//! per-source rate of `[service.limits]` and a backend's `max_session_rate`.

use core::intrinsics::{AtomicOrdering, atomic_cxchg};

/// Whether an event at `now` fits: due at the later of now and `arrival`, plus `interval`,
/// and not more than `tolerance` ahead of now.
#[inline(always)]
pub fn allows(arrival: *const u64, interval: u64, tolerance: u64, now: u64) -> bool {
    let current = unsafe { core::ptr::read_volatile(arrival) };
    let next = if current > now { current } else { now } + interval;
    next - now <= tolerance
}

/// Takes one event at `now` if it fits (a few compare-and-swap tries against other CPUs).
#[inline(always)]
pub fn take(arrival: *mut u64, interval: u64, tolerance: u64, now: u64) -> bool {
    for _ in 0..4 {
        let current = unsafe { core::ptr::read_volatile(arrival) };
        let next = if current > now { current } else { now } + interval;
        if next - now > tolerance {
            return false;
        }
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
