//! The IPv6 path: packets that are not TCP/IPv4 come here from the dispatch. Only TCP right
//! after the IPv6 header is ever considered (`parse::parse_v6`); everything else, IPv4 that is
//! not TCP included, passes to the stack untouched.
//!
//! A TCP segment to an IPv6 VIP:port (`SERVICES6`, the same services as `SERVICES`) takes the
//! IPv4 path's steps on its own flow table, `FLOWS6`: a SYN without a flow picks a backend
//! with the service's algorithm and counts it in the shared `ACTIVE` array, later segments
//! follow their flow, the client's FIN or RST gives the count back once. A service that left
//! the config keeps its entry here, marked retired: its flows go on, new SYNs pass. In `dsr`
//! only the Ethernet header changes; in `nat` the destination becomes the backend's IPv6
//! address (`BACKENDS6`) and the FIB routes the packet, and a TCP segment to no VIP may be a nat
//! backend's reply (`NAT_REPLIES6`, checked against its flow like IPv4's), rewritten to come
//! from the VIP.

use aya_ebpf::bindings::xdp_action;
use aya_ebpf::programs::XdpContext;
use switchyard_common::maps::{
    FlowKey6, PROTO_TCP, ServiceKey6, ServiceValue, forwarding, service_flags,
};

use crate::clock::coarse_now;
use crate::flow::{NoFlow, Opening, adopt, follow, is_stale, new_flow6};
use crate::forward::{dsr_frame, forward_nat6, nat_reply6};
use crate::limits::Client;
use crate::maps::{BACKENDS, BACKENDS6, FLOWS6, SERVICES6};
use crate::parse::{Packet6, TCP_ACK, TCP_SYN, parse_v6};
use crate::second_chance;
use crate::stats::{count_outcome, count_packet, count_service};

/// Per packet that the IPv4 path did not take.
#[inline(always)]
pub fn balance(ctx: &XdpContext) -> u32 {
    let Some(pkt) = parse_v6(ctx) else {
        return xdp_action::XDP_PASS;
    };
    let (service_key, flow_key, flags) = keys(&pkt);
    let Some(service) = (unsafe { SERVICES6.get(&service_key) }) else {
        // Not for a VIP: maybe a nat backend's reply (on the backend-facing interface).
        return nat_reply6(ctx, &pkt, &flow_key, flags);
    };
    let service = *service;
    let is_syn = flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    if service.forwarding == forwarding::LOCAL {
        return second_chance::local6(ctx, &pkt, &service, is_syn);
    }
    match flow_slot(ctx, &pkt, &service, &flow_key, flags) {
        Ok(slot) => send(ctx, &service, &pkt, slot),
        Err(action) => action,
    }
}

/// The packet's service key (its destination), flow key and TCP flags.
#[inline(always)]
fn keys(pkt: &Packet6) -> (ServiceKey6, FlowKey6, u8) {
    let (ip, tcp) = (pkt.ip, pkt.tcp);
    let flow = unsafe {
        FlowKey6 {
            src_addr: (*ip).saddr,
            dst_addr: (*ip).daddr,
            src_port: (*tcp).sport,
            dst_port: (*tcp).dport,
            proto: PROTO_TCP,
            _pad: [0; 3],
        }
    };
    let service = ServiceKey6 {
        addr: flow.dst_addr,
        port: flow.dst_port,
        proto: PROTO_TCP,
        _pad: 0,
    };
    (service, flow, unsafe { (*tcp).flags })
}

/// The backend slot of the packet's flow: its entry's, a new flow's for a SYN, an adopted
/// one's for a mid-stream packet without state (ip_hash, `flow::adopt`); otherwise the action
/// to take (counted): pass a mid-stream packet without state that is not adopted or a SYN for a service
/// that left the config (retired: only its established flows go on), drop a SYN that no
/// backend can take or that `[service.limits]` refuse.
#[inline(always)]
fn flow_slot(
    ctx: &XdpContext,
    pkt: &Packet6,
    service: &ServiceValue,
    key: &FlowKey6,
    flags: u8,
) -> Result<u32, u32> {
    let now = coarse_now();
    let is_syn = flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    let entry = FLOWS6.get_ptr_mut(key);
    if let Some(flow) = entry
        && !is_stale(flow, is_syn, now)
    {
        let hop_limit = unsafe { (*pkt.ip).hop_limit };
        second_chance::delivered(ctx, pkt.eth, hop_limit, || Some(*service));
        return Ok(follow(flow, flags, now, Client::V6(key.src_addr)));
    }
    if !is_syn {
        // Another balancer's flow that ECMP moved here, or an expired or evicted one.
        let open = |opening| new_flow6(service, key, now, opening);
        return match adopt(service, flags, entry.is_some(), open) {
            Some(slot) => Ok(slot),
            None if entry.is_some() => Err(xdp_action::XDP_PASS),
            None => Err(second_chance::unplaceable6(ctx, pkt, service)),
        };
    }
    if service.flags & service_flags::RETIRED != 0 {
        count_service(service.index, |s| s.passed += 1);
        return Err(xdp_action::XDP_PASS);
    }
    new_flow6(service, key, now, Opening::Syn).map_err(|why| {
        // A refused SYN is counted by reason in `limits`; dropped, the client's TCP retries.
        if let NoFlow::NoBackend = why {
            count_service(service.index, |s| {
                s.no_backend += 1;
                s.dropped += 1;
            });
        }
        xdp_action::XDP_DROP
    })
}

/// Sends the packet to backend `slot` (dsr: by its MAC; nat: to its IPv6 address), counted
/// for the backend and the service.
#[inline(always)]
fn send(ctx: &XdpContext, service: &ServiceValue, pkt: &Packet6, slot: u32) -> u32 {
    let action = if service.forwarding == forwarding::NAT {
        match BACKENDS6.get(slot) {
            Some(backend) => {
                count_packet(slot, pkt.len);
                forward_nat6(ctx, pkt, backend)
            }
            None => xdp_action::XDP_DROP,
        }
    } else {
        match BACKENDS.get(slot) {
            Some(backend) => {
                count_packet(slot, pkt.len);
                dsr_frame(pkt.eth, backend)
            }
            None => xdp_action::XDP_DROP,
        }
    };
    count_outcome(service.index, action)
}
