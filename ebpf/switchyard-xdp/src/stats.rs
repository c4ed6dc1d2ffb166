//! The kernel's counters: per-CPU, per-service verdicts (`SERVICE_STATS`) and per-backend
//! traffic (`BACKEND_STATS`), which the control plane sums across CPUs into the logs and the
//! shutdown totals. Per-CPU slots need no atomics: each CPU only adds to its own.

use aya_ebpf::bindings::xdp_action;
use switchyard_common::maps::ServiceStats;

use crate::maps::{BACKEND_STATS, SERVICE_STATS};

#[inline(always)]
pub fn count_service(index: u32, update: impl FnOnce(&mut ServiceStats)) {
    if let Some(stats) = SERVICE_STATS.get_ptr_mut(index) {
        update(unsafe { &mut *stats });
    }
}

/// One packet of `len` bytes on a flow to the backend in `slot` (counted before it is sent on).
#[inline(always)]
pub fn count_packet(slot: u32, len: u64) {
    if let Some(stats) = BACKEND_STATS.get_ptr_mut(slot) {
        unsafe {
            (*stats).packets += 1;
            (*stats).bytes += len;
        }
    }
}

/// One new flow assigned to the backend in `slot`.
#[inline(always)]
pub fn count_new_flow(slot: u32) {
    if let Some(stats) = BACKEND_STATS.get_ptr_mut(slot) {
        unsafe { (*stats).new_flows += 1 };
    }
}

/// Counts the XDP `action` a packet for service `index` was sent on with (dropped or
/// forwarded), and returns it.
#[inline(always)]
pub fn count_outcome(index: u32, action: u32) -> u32 {
    if action == xdp_action::XDP_DROP || action == xdp_action::XDP_ABORTED {
        count_service(index, |s| s.dropped += 1);
    } else {
        count_service(index, |s| s.forwarded += 1);
    }
    action
}
