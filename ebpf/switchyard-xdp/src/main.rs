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
//! Most packets pay one hash lookup at most: a packet whose destination is no VIP and whose
//! source is no backend passes after one read of the address filter, and a packet of a live
//! flow finds its service by the flow's index, not by the `SERVICES` hash.
//!
//! This file holds the entry points and the dispatch; the rest lives by concern: `parse`
//! (headers), `ipv6` (the IPv6 path), `filter` (address filter, service routes), `clock` (the coarse clock once per
//! tick), `flow` (flow table), `limits` (`[service.limits]` on SYNs: allow/deny tries,
//! per-source concurrency and rate), `select` (backend choice), `forward` (dsr, nat, replies),
//! `checksum`, `stats` (counters) and `maps` (the map statics; layouts in
//! `switchyard_common::maps`).
#![no_std]
#![no_main]
// Rust's BPF target declares no compare-and-swap, though BPF v3 has fetch-add and cmpxchg on
// 64-bit words: the intrinsics reach them (RUSTC_BOOTSTRAP=1 is already needed for build-std).
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod checksum;
mod clock;
mod filter;
mod flow;
mod forward;
mod ipv6;
mod limits;
mod maps;
mod parse;
mod rate;
mod second_chance;
mod select;
mod stats;

use aya_ebpf::bindings::xdp_action;
use aya_ebpf::macros::xdp;
use aya_ebpf::programs::XdpContext;
use switchyard_common::maps::{PROTO_TCP, ServiceKey, address_filter, forwarding};

use crate::clock::coarse_now;
use crate::filter::{may_be, route_of};
use crate::flow::{NoFlow, Opening, adopt, follow, is_stale, new_flow, tcp_flow_key};
use crate::forward::{forward_dsr, forward_nat, nat_reply};
use crate::limits::Client;
use crate::maps::{BACKENDS, FLOWS, SERVICES};
use crate::parse::{Packet, TCP_ACK, TCP_SYN, parse};
use crate::stats::{count_outcome, count_packet, count_service};

#[xdp]
pub fn switchyard_balance(ctx: XdpContext) -> u32 {
    balance(&ctx)
}

#[xdp]
pub fn switchyard_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// Per packet: a VIP:port's flows to their backends, a nat backend's replies to `nat_reply`,
/// anything else passes (most of it after one read of the address filter).
#[inline(always)]
fn balance(ctx: &XdpContext) -> u32 {
    let Some(pkt) = parse(ctx) else {
        return ipv6::balance(ctx);
    };
    let (saddr, daddr, sport, dport) = unsafe {
        (
            (*pkt.ip).saddr,
            (*pkt.ip).daddr,
            (*pkt.tcp).sport,
            (*pkt.tcp).dport,
        )
    };
    if may_be(address_filter::VIPS, daddr, dport)
        && let Some(verdict) = to_service(ctx, &pkt)
    {
        return match verdict {
            Verdict::Send(target) => send(ctx, &pkt, target),
            Verdict::Action(action) => action,
        };
    }
    // Not for a VIP: maybe a nat backend's reply (on the backend-facing interface).
    if may_be(address_filter::BACKENDS, saddr, sport) {
        return nat_reply(ctx, &pkt);
    }
    xdp_action::XDP_PASS
}

/// What becomes of a packet for a VIP:port.
enum Verdict {
    /// On to a backend.
    Send(Target),
    /// This XDP action, counted already.
    Action(u32),
}

/// A backend a packet is sent to, and how.
struct Target {
    /// The service's forwarding (`switchyard_common::maps::forwarding`).
    forwarding: u32,
    /// The service's index, for its counters.
    service_index: u32,
    backend_slot: u32,
}

/// A packet that may be for a VIP:port: its flow's backend, or a new flow's for a SYN; `None`
/// when the destination is no service.
#[inline(always)]
fn to_service(ctx: &XdpContext, pkt: &Packet) -> Option<Verdict> {
    let (saddr, daddr, sport, dport, flags, ttl) = unsafe {
        (
            (*pkt.ip).saddr,
            (*pkt.ip).daddr,
            (*pkt.tcp).sport,
            (*pkt.tcp).dport,
            (*pkt.tcp).flags,
            (*pkt.ip).ttl,
        )
    };
    let service_key = ServiceKey {
        addr: daddr,
        port: dport,
        proto: PROTO_TCP,
        _pad: 0,
    };
    let flow_key = tcp_flow_key(saddr, daddr, sport, dport);
    // The coarse clock (CLOCK_MONOTONIC at tick resolution): idle timeouts and lingers are
    // seconds, and the fine clock costs tens of ns per packet under a hypervisor.
    let now = coarse_now();
    let is_syn = flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    let entry = FLOWS.get_ptr_mut(&flow_key);
    // A SYN on a closed flow is a new connection reusing the 4-tuple: a fresh flow.
    let flow = entry.filter(|&flow| !is_stale(flow, is_syn, now));

    // The common case: a packet of a live flow, whose service its route names.
    if let Some(flow) = flow
        && let Some(route) = route_of(flow, &service_key)
    {
        second_chance::delivered(ctx, pkt.eth, ttl, || {
            unsafe { SERVICES.get(&service_key) }.copied()
        });
        return Some(Verdict::Send(Target {
            forwarding: route.forwarding,
            service_index: unsafe { (*flow).service },
            backend_slot: follow(flow, flags, now, Client::V4(saddr)),
        }));
    }

    let service = *unsafe { SERVICES.get(&service_key) }?;
    if service.forwarding == forwarding::LOCAL {
        let action = second_chance::local(ctx, pkt, &service, is_syn);
        return Some(Verdict::Action(action));
    }
    let backend_slot = match flow {
        Some(flow) => {
            second_chance::delivered(ctx, pkt.eth, ttl, || Some(service));
            follow(flow, flags, now, Client::V4(saddr))
        }
        // No state for a mid-stream packet: another balancer's flow that ECMP moved here, or
        // an expired or evicted one.
        None if !is_syn => {
            let open = |opening| new_flow(&service, &flow_key, now, opening);
            match adopt(&service, flags, entry.is_some(), open) {
                Some(slot) => slot,
                None if entry.is_some() => return Some(Verdict::Action(xdp_action::XDP_PASS)),
                None => {
                    let action = second_chance::unplaceable(ctx, pkt, &service);
                    return Some(Verdict::Action(action));
                }
            }
        }
        None => match new_flow(&service, &flow_key, now, Opening::Syn) {
            Ok(slot) => slot,
            // Dropped: the client's TCP retries; counted by reason in `limits`.
            Err(NoFlow::Refused) => return Some(Verdict::Action(xdp_action::XDP_DROP)),
            Err(NoFlow::NoBackend) => {
                count_service(service.index, |s| {
                    s.no_backend += 1;
                    s.dropped += 1;
                });
                return Some(Verdict::Action(xdp_action::XDP_DROP));
            }
        },
    };
    Some(Verdict::Send(Target {
        forwarding: service.forwarding,
        service_index: service.index,
        backend_slot,
    }))
}

/// Sends the packet on to `target`, counted for the backend and for the service.
#[inline(always)]
fn send(ctx: &XdpContext, pkt: &Packet, target: Target) -> u32 {
    let Target {
        forwarding: forwarding_mode,
        service_index,
        backend_slot,
    } = target;
    let Some(backend) = BACKENDS.get(backend_slot) else {
        count_service(service_index, |s| s.dropped += 1);
        return xdp_action::XDP_DROP;
    };
    let backend = *backend;
    count_packet(backend_slot, pkt.len);
    let action = if forwarding_mode == forwarding::NAT {
        forward_nat(ctx, pkt, &backend)
    } else {
        forward_dsr(pkt, &backend)
    };
    count_outcome(service_index, action)
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
