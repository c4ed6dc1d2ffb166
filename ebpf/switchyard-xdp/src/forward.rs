//! Sending a packet on: dsr (MAC rewrite, back out of the same interface), nat (destination
//! rewritten to the backend, routed by the FIB), and nat replies (a backend's reply rewritten to
//! come from the VIP:port, found in `NAT_REPLIES` and checked against its flow, so a reply
//! entry outliving its flow never rewrites another connection).

use core::mem::size_of;

use aya_ebpf::bindings::{bpf_fib_lookup as FibParams, xdp_action};
use aya_ebpf::helpers::{bpf_fib_lookup, bpf_ktime_get_coarse_ns, bpf_redirect};
use aya_ebpf::programs::XdpContext;
use switchyard_common::maps::{BackendEntry, FlowKey, PROTO_TCP};

use crate::checksum::{csum_replace2, csum_replace4};
use crate::flow::follow_reply;
use crate::maps::NAT_REPLIES;
use crate::parse::Packet;

const AF_INET: u8 = 2;
const BPF_FIB_LKUP_RET_SUCCESS: i64 = 0;

/// dsr: the backend owns the VIP too, so only the MACs change and the frame goes back out.
#[inline(always)]
pub fn forward_dsr(pkt: &Packet, backend: &BackendEntry) -> u32 {
    // The frame came to this interface's MAC: that becomes the source towards the backend.
    unsafe {
        (*pkt.eth).src = (*pkt.eth).dst;
        (*pkt.eth).dst = backend.mac;
    }
    xdp_action::XDP_TX
}

/// nat: the destination becomes the backend's address and port, checksums updated in place.
#[inline(always)]
pub fn forward_nat(ctx: &XdpContext, pkt: &Packet, backend: &BackendEntry) -> u32 {
    unsafe {
        let old_addr = (*pkt.ip).daddr;
        let old_port = (*pkt.tcp).dport;
        (*pkt.ip).daddr = backend.addr;
        (*pkt.tcp).dport = backend.port;
        (*pkt.ip).check = csum_replace4((*pkt.ip).check, old_addr, backend.addr);
        let check = csum_replace4((*pkt.tcp).check, old_addr, backend.addr);
        (*pkt.tcp).check = csum_replace2(check, old_port, backend.port);
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
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.ctx as *mut _,
            &mut params,
            size_of::<FibParams>() as i32,
            0,
        )
    };
    if rc != BPF_FIB_LKUP_RET_SUCCESS {
        return xdp_action::XDP_PASS;
    }
    unsafe {
        (*pkt.eth).dst = params.dmac;
        (*pkt.eth).src = params.smac;
        bpf_redirect(params.ifindex, 0) as u32
    }
}

/// Rewrites a nat backend's reply to come from the VIP:port; passes anything else untouched,
/// and forgets a reply entry found stale.
#[inline(always)]
pub fn nat_reply(ctx: &XdpContext, pkt: &Packet) -> u32 {
    let key = unsafe {
        FlowKey {
            src_addr: (*pkt.ip).saddr,
            dst_addr: (*pkt.ip).daddr,
            src_port: (*pkt.tcp).sport,
            dst_port: (*pkt.tcp).dport,
            proto: PROTO_TCP,
            _pad: [0; 3],
        }
    };
    let Some(reply) = NAT_REPLIES.get_ptr_mut(&key) else {
        return xdp_action::XDP_PASS;
    };
    let (vip, vport) = unsafe { ((*reply).vip_addr, (*reply).vip_port) };
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    if !follow_reply(&key, vip, vport, unsafe { (*pkt.tcp).flags }, now) {
        // Stale: not this flow's reply (any more). The stack gets it as it is, e.g. a direct
        // connection from the same client port to this backend.
        let _ = NAT_REPLIES.remove(&key);
        return xdp_action::XDP_PASS;
    }
    unsafe {
        (*reply).last_seen_ns = now;
        let old_addr = (*pkt.ip).saddr;
        let old_port = (*pkt.tcp).sport;
        (*pkt.ip).saddr = vip;
        (*pkt.tcp).sport = vport;
        (*pkt.ip).check = csum_replace4((*pkt.ip).check, old_addr, vip);
        let check = csum_replace4((*pkt.tcp).check, old_addr, vip);
        (*pkt.tcp).check = csum_replace2(check, old_port, vport);
    }
    route(ctx, pkt)
}
