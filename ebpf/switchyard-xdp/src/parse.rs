//! Packet parsing: the Ethernet, IPv4 and TCP headers as they lie in the frame, and the one
//! bounds-checked way to reach them that the verifier accepts (every header checked against
//! `data_end` before it is touched).

use core::mem::size_of;

use aya_ebpf::programs::XdpContext;
use switchyard_common::maps::PROTO_TCP;

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
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
