//! The second chance between balancers: a TCP packet for an announced service that this host
//! cannot place (no flow entry for an xdp service that does not follow the Maglev table; no
//! local socket for a proxy service's VIP) may belong to a connection another balancer holds,
//! moved here by the routers' ECMP. It goes on, unchanged but for its Ethernet addresses and
//! its hop budget, to the next balancer of the ring (`SECOND_CHANCE`, written by the control
//! plane), with XDP_TX on the interface it came in on.
//!
//! The hop budget lives in the IPv4 TTL / IPv6 hop limit (`switchyard_common::maps::
//! second_chance`): a packet whose TTL is no budget (from the routers) leaves with
//! `200 + listed balancers − 2`; one whose TTL is a budget above 200 leaves with one less; one
//! with 200 passes to the stack as it would have without the second chance (counted
//! `chance_unclaimed` when its source MAC is a peer's, `PEER_MACS`). The budget only ever
//! shrinks once given, so no packet can circle. No tunnel and no extra header: the
//! frame's size never changes. A packet this host places is handled as ever, whatever its TTL
//! (counted `chance_delivered` when it came from a peer).

use core::mem::size_of;
use core::ptr::addr_of_mut;

use aya_ebpf::bindings::{
    BPF_F_CURRENT_NETNS, BPF_TCP_LISTEN, bpf_sock, bpf_sock_tuple, tcphdr, xdp_action,
};
use aya_ebpf::helpers::{bpf_sk_release, bpf_skc_lookup_tcp, bpf_tcp_check_syncookie};
use aya_ebpf::EbpfContext;
use aya_ebpf::programs::XdpContext;
use switchyard_common::maps::{
    PeerMac, SecondChanceRing, ServiceValue, forwarding, second_chance, service_flags,
};

use crate::checksum::csum_replace2;
use crate::maps::{PEER_MACS, SECOND_CHANCE};
use crate::parse::{EthHdr, IPV6_HLEN, Ipv4Hdr, Packet, Packet6, TcpHdr};
use crate::stats::count_service;

/// A packet of `service` this host cannot place (IPv4): sent on to the next balancer, or
/// passed to the stack; either counted.
#[inline(always)]
pub fn unplaceable(ctx: &XdpContext, pkt: &Packet, service: &ServiceValue) -> u32 {
    let ttl = unsafe { (*pkt.ip).ttl };
    let Some((next_ttl, ring)) = next_hop(ctx, pkt.eth, ttl, service) else {
        return passed(service);
    };
    unsafe {
        // The TTL shares its 16-bit header word with the protocol.
        let word = addr_of_mut!((*pkt.ip).ttl) as *mut u16;
        let old = word.read_unaligned();
        (*pkt.ip).ttl = next_ttl;
        (*pkt.ip).check = csum_replace2((*pkt.ip).check, old, word.read_unaligned());
    }
    hand_on(pkt.eth, &ring, service)
}

/// [`unplaceable`] for IPv6: the hop limit carries the budget (no header checksum).
#[inline(always)]
pub fn unplaceable6(ctx: &XdpContext, pkt: &Packet6, service: &ServiceValue) -> u32 {
    let hop_limit = unsafe { (*pkt.ip).hop_limit };
    let Some((next, ring)) = next_hop(ctx, pkt.eth, hop_limit, service) else {
        return passed(service);
    };
    unsafe { (*pkt.ip).hop_limit = next };
    hand_on(pkt.eth, &ring, service)
}

/// A proxy service's packet (IPv4): the stack's if a local socket wants it or it is a SYN,
/// else [`unplaceable`].
#[inline(always)]
pub fn local(ctx: &XdpContext, pkt: &Packet, service: &ServiceValue, is_syn: bool) -> u32 {
    if is_syn || service.flags & service_flags::SECOND_CHANCE == 0 {
        return xdp_action::XDP_PASS;
    }
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    unsafe {
        let v4 = &mut tuple.__bindgen_anon_1.ipv4;
        v4.saddr = (*pkt.ip).saddr;
        v4.daddr = (*pkt.ip).daddr;
        v4.sport = (*pkt.tcp).sport;
        v4.dport = (*pkt.tcp).dport;
    }
    let tuple_size = size_of::<[u32; 2]>() + size_of::<[u16; 2]>();
    if socket_wants(ctx, &mut tuple, tuple_size, pkt.ip as *mut _, size_of::<Ipv4Hdr>(), pkt.tcp) {
        delivered(ctx, pkt.eth, unsafe { (*pkt.ip).ttl }, || Some(*service));
        return xdp_action::XDP_PASS;
    }
    unplaceable(ctx, pkt, service)
}

/// [`local`] for IPv6.
#[inline(always)]
pub fn local6(ctx: &XdpContext, pkt: &Packet6, service: &ServiceValue, is_syn: bool) -> u32 {
    if is_syn || service.flags & service_flags::SECOND_CHANCE == 0 {
        return xdp_action::XDP_PASS;
    }
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    unsafe {
        let v6 = &mut tuple.__bindgen_anon_1.ipv6;
        v6.saddr = (*pkt.ip).saddr;
        v6.daddr = (*pkt.ip).daddr;
        v6.sport = (*pkt.tcp).sport;
        v6.dport = (*pkt.tcp).dport;
    }
    let tuple_size = size_of::<[u32; 8]>() + size_of::<[u16; 2]>();
    let ip_len = IPV6_HLEN as usize;
    if socket_wants(ctx, &mut tuple, tuple_size, pkt.ip as *mut _, ip_len, pkt.tcp) {
        delivered(ctx, pkt.eth, unsafe { (*pkt.ip).hop_limit }, || Some(*service));
        return xdp_action::XDP_PASS;
    }
    unplaceable6(ctx, pkt, service)
}

/// Counts a packet this host placed as delivered when it came from a peer on its second
/// chance. A packet whose `ttl` is no budget pays one compare: `service` (a lookup on the
/// flow fast path) is asked for only when it is.
#[inline(always)]
pub fn delivered(
    ctx: &XdpContext,
    eth: *mut EthHdr,
    ttl: u8,
    service: impl FnOnce() -> Option<ServiceValue>,
) {
    if !second_chance::is_budget(ttl) {
        return;
    }
    let Some(service) = service() else {
        return;
    };
    if service.flags & service_flags::SECOND_CHANCE != 0 && ring(ctx).is_some() && from_peer(eth)
    {
        count_service(service.index, |s| s.chance_delivered += 1);
    }
}

/// Whether a local socket owns the packet's connection: an established, time-wait or request
/// socket does; a listener only when the packet is the ACK of one of its SYN cookies.
#[inline(always)]
fn socket_wants(
    ctx: &XdpContext,
    tuple: &mut bpf_sock_tuple,
    tuple_size: usize,
    ip: *mut core::ffi::c_void,
    ip_len: usize,
    tcp: *mut TcpHdr,
) -> bool {
    let netns = BPF_F_CURRENT_NETNS as i64 as u64;
    let sk: *mut bpf_sock =
        unsafe { bpf_skc_lookup_tcp(ctx.as_ptr(), tuple, tuple_size as u32, netns, 0) };
    if sk.is_null() {
        return false;
    }
    let wants = if unsafe { (*sk).state } == BPF_TCP_LISTEN {
        let tcp_len = size_of::<TcpHdr>() as u32;
        let cookie = unsafe {
            bpf_tcp_check_syncookie(sk as *mut _, ip, ip_len as u32, tcp as *mut tcphdr, tcp_len)
        };
        cookie == 0
    } else {
        true
    };
    unsafe { bpf_sk_release(sk as *mut _) };
    wants
}

/// The ring when the second chance runs on the interface the packet came in on.
#[inline(always)]
fn ring(ctx: &XdpContext) -> Option<SecondChanceRing> {
    let ring = *SECOND_CHANCE.get(0)?;
    (ring.ifindex != 0 && ctx.ingress_ifindex() as u32 == ring.ifindex).then_some(ring)
}

/// The TTL the packet goes on with and the ring it goes on in, or `None` to pass it
/// (counted `chance_unclaimed` when it came from a peer).
#[inline(always)]
fn next_hop(
    ctx: &XdpContext,
    eth: *mut EthHdr,
    ttl: u8,
    service: &ServiceValue,
) -> Option<(u8, SecondChanceRing)> {
    if service.flags & service_flags::SECOND_CHANCE == 0 {
        return None;
    }
    let ring = ring(ctx)?;
    // A TTL within the budget's range is a budget, whoever sent the frame: only a TTL outside
    // it ever gets a fresh budget. Were the sender's MAC the test, a peer this host does not
    // know yet (just started, its MAC not resolved) would have its packets budgeted afresh
    // here, and two hosts that know each other only one way round could pass a packet in a
    // circle. A budget is never more than this host's own first one (a packet from the routers
    // that happens to carry a TTL in the range, 40 or more hops from a sender starting at 255,
    // would otherwise go round a small ring many times): it gets at most the hops a packet
    // from the routers gets here.
    if !second_chance::is_budget(ttl) {
        return (ring.first_ttl != 0).then_some((ring.first_ttl as u8, ring));
    }
    let budget = ttl.min(ring.first_ttl as u8);
    if budget > second_chance::LAST_HOP {
        return Some((budget - 1, ring));
    }
    if from_peer(eth) {
        count_service(service.index, |s| s.chance_unclaimed += 1);
    }
    None
}

#[inline(always)]
fn from_peer(eth: *mut EthHdr) -> bool {
    let key = PeerMac {
        mac: unsafe { (*eth).src },
        _pad: [0; 2],
    };
    unsafe { PEER_MACS.get(&key) }.is_some()
}

/// Readdresses the frame to the next balancer and sends it back out.
#[inline(always)]
fn hand_on(eth: *mut EthHdr, ring: &SecondChanceRing, service: &ServiceValue) -> u32 {
    unsafe {
        (*eth).src = ring.own_mac;
        (*eth).dst = ring.next_mac;
    }
    count_service(service.index, |s| s.chance_forwarded += 1);
    xdp_action::XDP_TX
}

/// Passed to the stack, as without the second chance (counted for an xdp service: a proxy
/// service's packets are the stack's anyway).
#[inline(always)]
fn passed(service: &ServiceValue) -> u32 {
    if service.forwarding != forwarding::LOCAL {
        count_service(service.index, |s| s.passed += 1);
    }
    xdp_action::XDP_PASS
}
