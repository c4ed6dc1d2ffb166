//! The flow table (`FLOWS`): a SYN's new flow (backend chosen, count taken, nat reply entry
//! recorded), later packets following their entry, and closing a flow, which gives the
//! backend's count back exactly once by compare-and-swap on the flow's flags.

use core::intrinsics::{AtomicOrdering, atomic_cxchg, atomic_or, atomic_xadd, atomic_xsub};

use switchyard_common::maps::{
    FlowKey, FlowValue, NatReply, PROTO_TCP, ServiceValue, flow_flags, forwarding,
};

use crate::maps::{ACTIVE, BACKENDS, FLOWS, NAT_REPLIES};
use crate::parse::{TCP_ACK, TCP_FIN, TCP_RST};
use crate::select::select;
use crate::stats::count_new_flow;

/// Whether `flag` is set on the flow; read once, volatile, since other CPUs set flags too.
///
/// # Safety
/// `flow` points at a live `FLOWS` value (as `get_ptr_mut` returns it).
#[inline(always)]
pub unsafe fn flag_set(flow: *mut FlowValue, flag: u64) -> bool {
    (unsafe { core::ptr::read_volatile(&raw const (*flow).flags) } & flag) != 0
}

/// A packet of a known flow with TCP `flags`, seen at `now`: refreshes the entry, marks the
/// handshake done, closes the flow on the client's FIN or RST. Returns the flow's backend slot.
#[inline(always)]
pub fn follow(flow: *mut FlowValue, flags: u8, now: u64) -> u32 {
    unsafe { (*flow).last_seen_ns = now };
    // The client acknowledged: the handshake got through. Flows that never get here
    // (SYNs to nowhere, floods) are expired early by the control plane.
    if flags & TCP_ACK != 0 && !unsafe { flag_set(flow, flow_flags::ESTABLISHED) } {
        unsafe {
            atomic_or::<u64, u64, { AtomicOrdering::SeqCst }>(
                &raw mut (*flow).flags,
                flow_flags::ESTABLISHED,
            )
        };
    }
    if flags & (TCP_FIN | TCP_RST) != 0 {
        close_flow(flow);
    }
    unsafe { (*flow).backend }
}

/// Gives the flow's count back, once: only the CPU whose compare-and-swap sets `CLOSED` does.
#[inline(always)]
fn close_flow(flow: *mut FlowValue) {
    // Other bits (ESTABLISHED) may change concurrently: retry the swap a few times.
    for _ in 0..4 {
        // A plain 64-bit load is atomic on BPF; the compare-and-swap settles any race.
        let seen = unsafe { core::ptr::read_volatile(&raw const (*flow).flags) };
        if seen & flow_flags::CLOSED != 0 {
            return;
        }
        let (_, swapped) = unsafe {
            atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(
                &raw mut (*flow).flags,
                seen,
                seen | flow_flags::CLOSED,
            )
        };
        if swapped {
            if seen & flow_flags::COUNTED != 0 {
                let backend = unsafe { (*flow).backend };
                if let Some(active) = ACTIVE.get_ptr_mut(backend) {
                    unsafe { atomic_xsub::<u64, u64, { AtomicOrdering::SeqCst }>(active, 1) };
                }
            }
            return;
        }
    }
}

/// Chooses a backend for a SYN, records the flow, and counts it. Returns the backend slot.
#[inline(always)]
pub fn new_flow(service: &ServiceValue, key: &FlowKey, now: u64) -> Option<u32> {
    let slot = select(service, key)?;
    let value = FlowValue {
        backend: slot,
        service: service.index,
        last_seen_ns: now,
        flags: flow_flags::COUNTED,
    };
    // BPF_ANY: replaces a closed entry for a reused 5-tuple (its count was already given back).
    if FLOWS.insert(key, &value, 0).is_err() {
        return None;
    }
    if let Some(active) = ACTIVE.get_ptr_mut(slot) {
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(active, 1) };
    }
    count_new_flow(slot);
    if service.forwarding == forwarding::NAT
        && let Some(backend) = BACKENDS.get(slot)
    {
        let reply_key = FlowKey {
            src_addr: backend.addr,
            dst_addr: key.src_addr,
            src_port: backend.port,
            dst_port: key.src_port,
            proto: PROTO_TCP,
            _pad: [0; 3],
        };
        let reply = NatReply {
            vip_addr: key.dst_addr,
            vip_port: key.dst_port,
            _pad: 0,
            last_seen_ns: now,
        };
        let _ = NAT_REPLIES.insert(&reply_key, &reply, 0);
    }
    Some(slot)
}
