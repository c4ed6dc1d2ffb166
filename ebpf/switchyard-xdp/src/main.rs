//! The XDP fast path: steers TCP flows for a VIP:port to backends at packet level.
//!
//! `switchyard_balance` runs on the client-facing interface. A SYN for a configured VIP:port
//! without a flow entry picks a backend with the service's algorithm, records the flow in an
//! LRU table and adds one to the backend's shared active count; later packets follow the entry,
//! and the client's first FIN or RST (or, in nat, the backend's RST) gives the count back
//! (exactly once, by compare-and-swap on the flow's flags). A closed flow never captures a new
//! connection on its 4-tuple, and an ended one stops matching after a short linger (`flow`).
//! Everything else passes to the kernel stack untouched. IPv6 takes its own path (`ipv6`).
//! In `nat` mode the same program also runs on the backend-facing interface, where it rewrites
//! the replies' source back to the VIP:port (one program, so one interface can play both roles).
//!
//! This file holds the entry points and the dispatch; the rest lives by concern: `parse`
//! (headers), `ipv6` (the IPv6 path), `flow` (flow table), `select` (backend choice), `forward` (dsr, nat, replies),
//! `checksum`, `stats` (counters) and `maps` (the map statics; layouts in
//! `switchyard_common::maps`).
#![no_std]
#![no_main]
// Rust's BPF target declares no compare-and-swap, though BPF v3 has fetch-add and cmpxchg on
// 64-bit words: the intrinsics reach them (RUSTC_BOOTSTRAP=1 is already needed for build-std).
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod checksum;
mod flow;
mod forward;
mod ipv6;
mod maps;
mod parse;
mod select;
mod stats;

use aya_ebpf::bindings::xdp_action;
use aya_ebpf::helpers::bpf_ktime_get_coarse_ns;
use aya_ebpf::macros::xdp;
use aya_ebpf::programs::XdpContext;
use switchyard_common::maps::{FlowKey, PROTO_TCP, ServiceKey, forwarding};

use crate::flow::{follow, is_stale, new_flow};
use crate::forward::{forward_dsr, forward_nat, nat_reply};
use crate::maps::{BACKENDS, FLOWS, SERVICES};
use crate::parse::{TCP_ACK, TCP_SYN, parse};
use crate::stats::{count_packet, count_service};

#[xdp]
pub fn switchyard_balance(ctx: XdpContext) -> u32 {
    balance(&ctx)
}

#[xdp]
pub fn switchyard_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// Per packet: a VIP:port's flows to their backends, anything else to `nat_reply` (which passes
/// what is not a nat reply either).
#[inline(always)]
fn balance(ctx: &XdpContext) -> u32 {
    let Some(pkt) = parse(ctx) else {
        return ipv6::balance(ctx);
    };
    let (saddr, daddr, sport, dport, flags) = unsafe {
        (
            (*pkt.ip).saddr,
            (*pkt.ip).daddr,
            (*pkt.tcp).sport,
            (*pkt.tcp).dport,
            (*pkt.tcp).flags,
        )
    };
    let service_key = ServiceKey {
        addr: daddr,
        port: dport,
        proto: PROTO_TCP,
        _pad: 0,
    };
    let Some(service) = (unsafe { SERVICES.get(&service_key) }) else {
        // Not for a VIP: maybe a nat backend's reply (on the backend-facing interface).
        return nat_reply(ctx, &pkt);
    };
    let service = *service;
    let flow_key = FlowKey {
        src_addr: saddr,
        dst_addr: daddr,
        src_port: sport,
        dst_port: dport,
        proto: PROTO_TCP,
        _pad: [0; 3],
    };
    // The coarse clock (CLOCK_MONOTONIC at tick resolution): idle timeouts and lingers are
    // seconds, and the fine clock costs tens of ns per packet under a hypervisor.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let is_syn = flags & (TCP_SYN | TCP_ACK) == TCP_SYN;

    let backend_slot = match FLOWS.get_ptr_mut(&flow_key) {
        // A SYN on a closed flow is a new connection reusing the 4-tuple: a fresh flow.
        Some(flow) if !is_stale(flow, is_syn, now) => follow(flow, flags, now),
        Some(_) | None => {
            if !is_syn {
                // No state for a mid-stream packet (expired or evicted): let the stack answer.
                count_service(service.index, |s| s.passed += 1);
                return xdp_action::XDP_PASS;
            }
            match new_flow(&service, &flow_key, now) {
                Some(slot) => slot,
                None => {
                    count_service(service.index, |s| {
                        s.no_backend += 1;
                        s.dropped += 1;
                    });
                    return xdp_action::XDP_DROP;
                }
            }
        }
    };

    let Some(backend) = BACKENDS.get(backend_slot) else {
        count_service(service.index, |s| s.dropped += 1);
        return xdp_action::XDP_DROP;
    };
    let backend = *backend;
    count_packet(backend_slot, pkt.len);
    let action = if service.forwarding == forwarding::NAT {
        forward_nat(ctx, &pkt, &backend)
    } else {
        forward_dsr(&pkt, &backend)
    };
    if action == xdp_action::XDP_DROP || action == xdp_action::XDP_ABORTED {
        count_service(service.index, |s| s.dropped += 1);
    } else {
        count_service(service.index, |s| s.forwarded += 1);
    }
    action
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

// GPL-compatible because the kernel allows GPL-only helpers (bpf_fib_lookup) only to such
// programs: hence this crate's `MIT OR GPL-2.0`, unlike the workspace's Apache-2.0.
#[unsafe(no_mangle)]
#[unsafe(link_section = "license")]
pub static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
