//! The time flows are stamped with: `bpf_ktime_get_coarse_ns` (CLOCK_MONOTONIC at tick
//! resolution), read at most once per tick on each CPU. The verifier turns `bpf_jiffies64`
//! into one load, while the coarse clock's helper call cost ~20 ns per packet here; the coarse
//! clock only moves on a tick anyway, so within one jiffy the value read at its start stands.

use aya_ebpf::helpers::{bpf_jiffies64, bpf_ktime_get_coarse_ns};

use crate::maps::CLOCK_CACHE;

/// CLOCK_MONOTONIC in ns, as of this CPU's first packet in the current tick (at most one tick
/// behind the coarse clock, whose resolution is a tick).
#[inline(always)]
pub fn coarse_now() -> u64 {
    let jiffies = unsafe { bpf_jiffies64() };
    let Some(cache) = CLOCK_CACHE.get_ptr_mut(0) else {
        return unsafe { bpf_ktime_get_coarse_ns() };
    };
    unsafe {
        if (*cache).jiffies != jiffies || (*cache).ns == 0 {
            (*cache).ns = bpf_ktime_get_coarse_ns();
            (*cache).jiffies = jiffies;
        }
        (*cache).ns
    }
}
