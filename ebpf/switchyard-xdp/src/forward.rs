//! Sending a packet on: dsr (MAC rewrite, back out of the same interface), nat (destination
//! rewritten to the backend, routed by the FIB; IPv4 and IPv6 alike), and nat replies (a backend's reply rewritten to
//! come from the VIP:port, found in `NAT_REPLIES` and checked against its flow, so a reply
//! entry outliving its flow never rewrites another connection).
//!
//! nat's TCP checksum update knows partial checksums (see `checksum`) where the control plane
//! says they can arrive (`PARTIAL_CHECKSUMS`: a nat interface is a veth, whose local senders
//! hand them over; in generic mode the socket buffer keeps the partial state, so the seed must
//! stay right for whoever completes it). Elsewhere (a physical NIC) every checksum is complete
//! and no packet pays for the test, nor risks its 1-in-65536 misreading.

use core::mem::size_of;

use aya_ebpf::bindings::{bpf_fib_lookup as FibParams, xdp_action};
use aya_ebpf::helpers::{bpf_fib_lookup, bpf_redirect};
use aya_ebpf::programs::XdpContext;
use switchyard_common::maps::{BackendEntry, BackendEntry6, FlowKey6, PROTO_TCP};

use crate::checksum::{
    csum_replace2, csum_replace4, csum_replace16, is_partial_seed, is_partial_seed6,
    seed_replace4, seed_replace16,
};
use crate::clock::coarse_now;
use crate::flow::{follow_reply, follow_reply6, stamp, tcp_flow_key};
use crate::maps::{NAT_REPLIES, NAT_REPLIES6};
use crate::parse::{EthHdr, IPV6_HLEN, Packet, Packet6};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// Set to 1 by the control plane at load when a nat interface can receive partial checksums.
#[unsafe(no_mangle)]
static PARTIAL_CHECKSUMS: u8 = 0;
const BPF_FIB_LKUP_RET_SUCCESS: i64 = 0;

/// dsr: the backend owns the VIP too, so only the MACs change and the frame goes back out.
#[inline(always)]
pub fn forward_dsr(pkt: &Packet, backend: &BackendEntry) -> u32 {
    dsr_frame(pkt.eth, backend)
}

/// dsr for a frame of either IP version: only its Ethernet header is touched.
#[inline(always)]
pub fn dsr_frame(eth: *mut EthHdr, backend: &BackendEntry) -> u32 {
    // The frame came to this interface's MAC: that becomes the source towards the backend.
    unsafe {
        (*eth).src = (*eth).dst;
        (*eth).dst = backend.mac;
    }
    xdp_action::XDP_TX
}

/// nat: the destination becomes the backend's address and port, checksums updated in place.
#[inline(always)]
pub fn forward_nat(ctx: &XdpContext, pkt: &Packet, backend: &BackendEntry) -> u32 {
    unsafe {
        let old_addr = (*pkt.ip).daddr;
        let old_port = (*pkt.tcp).dport;
        rewrite_tcp_checksum(pkt, old_addr, backend.addr, old_port, backend.port);
        (*pkt.ip).daddr = backend.addr;
        (*pkt.tcp).dport = backend.port;
        (*pkt.ip).check = csum_replace4((*pkt.ip).check, old_addr, backend.addr);
    }
    route(ctx, pkt)
}

/// Sends a rewritten packet where the FIB says; hands it to the stack when the FIB cannot
/// (no neighbour entry yet: the kernel resolves it and forwards this packet itself).
#[inline(always)]
fn route(ctx: &XdpContext, pkt: &Packet) -> u32 {
    let mut params: FibParams = unsafe { core::mem::zeroed() };
    unsafe {
        params.family = AF_INET;
        params.l4_protocol = PROTO_TCP;
        params.sport = (*pkt.tcp).sport;
        params.dport = (*pkt.tcp).dport;
        params.__bindgen_anon_1.tot_len = u16::from_be((*pkt.ip).tot_len);
        params.ifindex = ctx.ingress_ifindex() as u32;
        params.__bindgen_anon_3.ipv4_src = (*pkt.ip).saddr;
        params.__bindgen_anon_4.ipv4_dst = (*pkt.ip).daddr;
    }
    redirect(ctx, pkt.eth, &mut params)
}

/// [`route`] for an IPv6 packet. Like the IPv4 path with the TTL, it leaves the hop limit as it
/// is: the balancer stands in for the VIP's host, it is not a hop of its own.
#[inline(always)]
fn route6(ctx: &XdpContext, pkt: &Packet6) -> u32 {
    let mut params: FibParams = unsafe { core::mem::zeroed() };
    unsafe {
        params.family = AF_INET6;
        params.l4_protocol = PROTO_TCP;
        params.sport = (*pkt.tcp).sport;
        params.dport = (*pkt.tcp).dport;
        params.__bindgen_anon_1.tot_len =
            u16::from_be((*pkt.ip).payload_len).saturating_add(IPV6_HLEN);
        params.ifindex = ctx.ingress_ifindex() as u32;
        params.__bindgen_anon_3.ipv6_src = (*pkt.ip).saddr;
        params.__bindgen_anon_4.ipv6_dst = (*pkt.ip).daddr;
    }
    redirect(ctx, pkt.eth, &mut params)
}

/// Asks the FIB with `params` (filled for the packet) and redirects the frame to the next hop
/// it names; passes it to the stack on any other answer.
#[inline(always)]
fn redirect(ctx: &XdpContext, eth: *mut EthHdr, params: &mut FibParams) -> u32 {
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.ctx as *mut _,
            params,
            size_of::<FibParams>() as i32,
            0,
        )
    };
    if rc != BPF_FIB_LKUP_RET_SUCCESS {
        return xdp_action::XDP_PASS;
    }
    unsafe {
        (*eth).dst = params.dmac;
        (*eth).src = params.smac;
        bpf_redirect(params.ifindex, 0) as u32
    }
}

/// Rewrites a nat backend's reply to come from the VIP:port; passes anything else untouched,
/// and forgets a reply entry found stale.
#[inline(always)]
pub fn nat_reply(ctx: &XdpContext, pkt: &Packet) -> u32 {
    let key = unsafe {
        tcp_flow_key(
            (*pkt.ip).saddr,
            (*pkt.ip).daddr,
            (*pkt.tcp).sport,
            (*pkt.tcp).dport,
        )
    };
    let Some(reply) = NAT_REPLIES.get_ptr_mut(&key) else {
        return xdp_action::XDP_PASS;
    };
    let (vip, vport) = unsafe { ((*reply).vip_addr, (*reply).vip_port) };
    let now = coarse_now();
    if !follow_reply(&key, vip, vport, unsafe { (*pkt.tcp).flags }, now) {
        // Stale: not this flow's reply (any more). The stack gets it as it is, e.g. a direct
        // connection from the same client port to this backend.
        let _ = NAT_REPLIES.remove(&key);
        return xdp_action::XDP_PASS;
    }
    unsafe {
        stamp(&raw mut (*reply).last_seen_ns, now);
        let old_addr = (*pkt.ip).saddr;
        let old_port = (*pkt.tcp).sport;
        rewrite_tcp_checksum(pkt, old_addr, vip, old_port, vport);
        (*pkt.ip).saddr = vip;
        (*pkt.tcp).sport = vport;
        (*pkt.ip).check = csum_replace4((*pkt.ip).check, old_addr, vip);
    }
    route(ctx, pkt)
}

/// The TCP checksum of `pkt` (addresses still the old ones) updated for one address and one
/// port changing: a complete checksum for both, a partial checksum's seed for the address only.
#[inline(always)]
unsafe fn rewrite_tcp_checksum(pkt: &Packet, old_addr: u32, new_addr: u32, old_port: u16, new_port: u16) {
    unsafe {
        let check = (*pkt.tcp).check;
        let partial_possible = core::ptr::read_volatile(&PARTIAL_CHECKSUMS) != 0;
        if partial_possible && is_partial_seed(check, (*pkt.ip).saddr, (*pkt.ip).daddr, tcp_len(pkt)) {
            (*pkt.tcp).check = seed_replace4(check, old_addr, new_addr);
        } else {
            let check = csum_replace4(check, old_addr, new_addr);
            (*pkt.tcp).check = csum_replace2(check, old_port, new_port);
        }
    }
}

/// The TCP segment's length from the IPv4 header (what the pseudo-header sums).
#[inline(always)]
unsafe fn tcp_len(pkt: &Packet) -> u16 {
    unsafe {
        let ihl = (((*pkt.ip).vihl & 0x0f) as u16) * 4;
        u16::from_be((*pkt.ip).tot_len).wrapping_sub(ihl)
    }
}

/// nat for IPv6: the destination becomes the backend's IPv6 address and port (IPv6 has no
/// header checksum; the TCP checksum covers the addresses through the pseudo-header).
#[inline(always)]
pub fn forward_nat6(ctx: &XdpContext, pkt: &Packet6, backend: &BackendEntry6) -> u32 {
    unsafe {
        let old_addr = (*pkt.ip).daddr;
        let old_port = (*pkt.tcp).dport;
        rewrite_tcp_checksum6(pkt, &old_addr, &backend.addr, old_port, backend.port);
        (*pkt.ip).daddr = backend.addr;
        (*pkt.tcp).dport = backend.port;
    }
    route6(ctx, pkt)
}

/// [`nat_reply`] for IPv6: a backend's reply (`key`: the packet's own 4-tuple) found in
/// `NAT_REPLIES6` and checked against its flow in `FLOWS6` is rewritten to come from the IPv6
/// VIP:port; anything else passes, and a stale reply entry is forgotten.
#[inline(always)]
pub fn nat_reply6(ctx: &XdpContext, pkt: &Packet6, key: &FlowKey6, flags: u8) -> u32 {
    let Some(reply) = NAT_REPLIES6.get_ptr_mut(key) else {
        return xdp_action::XDP_PASS;
    };
    let (vip, vport) = unsafe { ((*reply).vip_addr, (*reply).vip_port) };
    let now = coarse_now();
    if !follow_reply6(key, &vip, vport, flags, now) {
        let _ = NAT_REPLIES6.remove(key);
        return xdp_action::XDP_PASS;
    }
    unsafe {
        stamp(&raw mut (*reply).last_seen_ns, now);
        let old_port = (*pkt.tcp).sport;
        rewrite_tcp_checksum6(pkt, &key.src_addr, &vip, old_port, vport);
        (*pkt.ip).saddr = vip;
        (*pkt.tcp).sport = vport;
    }
    route6(ctx, pkt)
}

/// [`rewrite_tcp_checksum`] for an IPv6 packet, whose 128-bit addresses the pseudo-header sums.
#[inline(always)]
unsafe fn rewrite_tcp_checksum6(
    pkt: &Packet6,
    old_addr: &[u32; 4],
    new_addr: &[u32; 4],
    old_port: u16,
    new_port: u16,
) {
    unsafe {
        let check = (*pkt.tcp).check;
        let partial_possible = core::ptr::read_volatile(&PARTIAL_CHECKSUMS) != 0;
        // Without extension headers (`parse_v6`) the payload is the TCP segment.
        let tcp_len = u16::from_be((*pkt.ip).payload_len);
        if partial_possible && is_partial_seed6(check, &(*pkt.ip).saddr, &(*pkt.ip).daddr, tcp_len)
        {
            (*pkt.tcp).check = seed_replace16(check, old_addr, new_addr);
        } else {
            let check = csum_replace16(check, old_addr, new_addr);
            (*pkt.tcp).check = csum_replace2(check, old_port, new_port);
        }
    }
}
