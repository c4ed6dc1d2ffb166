//! Packet parsing: the Ethernet, IPv4, IPv6 and TCP headers as they lie in the frame, and the
//! one bounds-checked way to reach them that the verifier accepts (every header checked against
//! `data_end` before it is touched).
//!
//! IPv6 is parsed only where TCP follows the fixed header directly. Extension headers (hop-by-hop,
//! routing, destination options, fragments, ...) and ICMPv6 (neighbour discovery among it) are
//! not walked: such packets are no TCP packet to this program and pass to the stack untouched,
//! never dropped and never taken for something they are not.

use core::mem::size_of;

use aya_ebpf::programs::XdpContext;
use switchyard_common::maps::PROTO_TCP;

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
/// The fixed IPv6 header; extension headers would follow it.
pub const IPV6_HLEN: u16 = 40;
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

#[repr(C)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub proto: u16,
}

#[repr(C)]
pub struct Ipv4Hdr {
    pub vihl: u8,
    pub tos: u8,
    pub tot_len: u16,
    pub id: u16,
    pub frag_off: u16,
    pub ttl: u8,
    pub proto: u8,
    pub check: u16,
    pub saddr: u32,
    pub daddr: u32,
}

#[repr(C)]
pub struct Ipv6Hdr {
    /// Version (high nibble) and the traffic class's high nibble.
    pub version_class: u8,
    pub class_flow: [u8; 3],
    pub payload_len: u16,
    pub next_header: u8,
    pub hop_limit: u8,
    pub saddr: [u32; 4],
    pub daddr: [u32; 4],
}

#[repr(C)]
pub struct TcpHdr {
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
    pub ack: u32,
    pub off: u8,
    pub flags: u8,
    pub window: u16,
    pub check: u16,
    pub urg: u16,
}

/// A TCP/IPv4 packet, every header bounds-checked.
pub struct Packet {
    pub eth: *mut EthHdr,
    pub ip: *mut Ipv4Hdr,
    pub tcp: *mut TcpHdr,
    pub len: u64,
}

/// A TCP/IPv6 packet without extension headers, every header bounds-checked.
pub struct Packet6 {
    pub eth: *mut EthHdr,
    pub ip: *mut Ipv6Hdr,
    pub tcp: *mut TcpHdr,
    pub len: u64,
}

#[inline(always)]
fn header<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// `None` for anything that is not an unfragmented TCP/IPv4 packet.
#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Option<Packet> {
    // One check covers both headers: a TCP/IPv4 frame has them whole anyway.
    let ip: *mut Ipv4Hdr = header(ctx, ETH_HLEN)?;
    let eth = ctx.data() as *mut EthHdr;
    if unsafe { (*eth).proto } != ETH_P_IP.to_be() {
        return None;
    }
    let (vihl, proto, frag_off) = unsafe { ((*ip).vihl, (*ip).proto, (*ip).frag_off) };
    if vihl >> 4 != 4 || proto != PROTO_TCP {
        return None;
    }
    // More-fragments flag or a fragment offset: only the first fragment has the ports.
    if frag_off & 0x3fffu16.to_be() != 0 {
        return None;
    }
    let ihl = ((vihl & 0x0f) as usize) * 4;
    if ihl < 20 || ihl > 60 {
        return None;
    }
    let tcp: *mut TcpHdr = header(ctx, ETH_HLEN + ihl)?;
    Some(Packet {
        eth,
        ip,
        tcp,
        len: (ctx.data_end() - ctx.data()) as u64,
    })
}

/// `None` for anything that is not TCP directly after an IPv6 header (see the module docs).
#[inline(always)]
pub fn parse_v6(ctx: &XdpContext) -> Option<Packet6> {
    let eth: *mut EthHdr = header(ctx, 0)?;
    if unsafe { (*eth).proto } != ETH_P_IPV6.to_be() {
        return None;
    }
    let ip: *mut Ipv6Hdr = header(ctx, ETH_HLEN)?;
    let (version, next_header) = unsafe { ((*ip).version_class >> 4, (*ip).next_header) };
    if version != 6 || next_header != PROTO_TCP {
        return None;
    }
    let tcp: *mut TcpHdr = header(ctx, ETH_HLEN + IPV6_HLEN as usize)?;
    Some(Packet6 {
        eth,
        ip,
        tcp,
        len: (ctx.data_end() - ctx.data()) as u64,
    })
}
