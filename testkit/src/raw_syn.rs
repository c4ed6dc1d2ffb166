//! Bare TCP segments: SYNs through a raw socket, which open flows in an XDP balancer without
//! any TCP stack behind them (a SYN flood in miniature, for flow-table tests, or an unpaced
//! one-source flood for the benchmark), and the
//! segments themselves for crafted-packet runs of the XDP program (`xdp_run`).

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// Sends one bare TCP SYN from `source` to `target` for each source port in `ports`, through a
/// raw socket (call it inside a namespace). With a `source` nobody holds, no RST ever answers
/// the backends' SYN-ACKs: each SYN leaves one open flow in an XDP balancer and nothing else.
/// Paced, so a veth ring never overflows.
pub fn send_syns(
    source: Ipv4Addr,
    target: SocketAddrV4,
    ports: std::ops::Range<u16>,
) -> Result<()> {
    send_syns_from(ports.map(|port| SocketAddrV4::new(source, port)), target)
}

/// Sends one bare TCP SYN to `target` from each of `sources` (any addresses: a spoofed-source
/// flood), paced like [`send_syns`].
pub fn send_syns_from(
    sources: impl IntoIterator<Item = SocketAddrV4>,
    target: SocketAddrV4,
) -> Result<()> {
    let socket = raw_socket()?;
    let destination: socket2::SockAddr = SocketAddr::V4(target).into();
    for (i, from) in sources.into_iter().enumerate() {
        let packet = tcp_packet(from, target, TCP_SYN, i as u32);
        socket
            .send_to(&packet, &destination)
            .with_context(|| format!("sending a SYN to {target}"))?;
        if i % 64 == 63 {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    Ok(())
}

/// Sends SYNs from `source` to `target` as fast as the socket takes them (a one-source SYN
/// flood), each from the next source port so that each would open a new flow, until `stop` is
/// set, `max` SYNs have gone or `deadline` has passed. A SYN the transmit queue has no room
/// for is lost (counted as not sent), as on a full link.
pub fn flood(
    source: Ipv4Addr,
    target: SocketAddrV4,
    max: u64,
    deadline: Duration,
    stop: &AtomicBool,
) -> Result<FloodReport> {
    let socket = raw_socket()?;
    let destination: socket2::SockAddr = SocketAddr::V4(target).into();
    let started = Instant::now();
    let mut sent = 0u64;
    for i in 0..max {
        if i % 1024 == 0 && (stop.load(Ordering::Relaxed) || started.elapsed() > deadline) {
            break;
        }
        let from = SocketAddrV4::new(source, 1024 + (i % 64_512) as u16);
        match socket.send_to(&tcp_packet(from, target, TCP_SYN, i as u32), &destination) {
            Ok(_) => sent += 1,
            Err(e) if e.raw_os_error() == Some(nix::libc::ENOBUFS) => std::thread::yield_now(),
            Err(e) => return Err(e).with_context(|| format!("sending a SYN to {target}")),
        }
    }
    Ok(FloodReport {
        sent,
        elapsed: started.elapsed(),
        cpu: thread_cpu_time(),
    })
}

/// What [`flood`] did.
#[derive(Clone, Copy, Debug)]
pub struct FloodReport {
    /// SYNs the socket took.
    pub sent: u64,
    /// How long the flood ran.
    pub elapsed: Duration,
    /// The CPU time the sending thread used, in the kernel's transmit path (through the veth
    /// into the receiver's XDP program) included.
    pub cpu: Duration,
}

/// The calling thread's CPU time so far.
fn thread_cpu_time() -> Duration {
    let mut now = nix::libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid timespec the call writes into.
    let ok = unsafe { nix::libc::clock_gettime(nix::libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    if ok != 0 {
        return Duration::ZERO;
    }
    Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
}

/// A raw IPv4 socket that sends whole packets, headers included (needs root).
fn raw_socket() -> Result<socket2::Socket> {
    socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::RAW,
        Some(socket2::Protocol::from(nix::libc::IPPROTO_RAW)),
    )
    .context("a raw socket (needs root)")
}

/// TCP flags of [`tcp_packet`].
pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;

/// An IPv4 + TCP segment without payload or options, with TCP `flags` and correct checksums.
pub fn tcp_packet(source: SocketAddrV4, target: SocketAddrV4, flags: u8, seq: u32) -> [u8; 40] {
    let mut p = [0u8; 40];
    p[0] = 0x45; // IPv4, 20-byte header
    p[2..4].copy_from_slice(&40u16.to_be_bytes());
    p[6] = 0x40; // don't fragment
    p[8] = 64; // TTL
    p[9] = 6; // TCP
    p[12..16].copy_from_slice(&source.ip().octets());
    p[16..20].copy_from_slice(&target.ip().octets());
    let ip_check = checksum(&p[..20], 0);
    p[10..12].copy_from_slice(&ip_check.to_be_bytes());
    p[20..22].copy_from_slice(&source.port().to_be_bytes());
    p[22..24].copy_from_slice(&target.port().to_be_bytes());
    p[24..28].copy_from_slice(&seq.wrapping_mul(2654435761).to_be_bytes());
    p[32] = 5 << 4; // data offset: 5 words
    p[33] = flags;
    p[34..36].copy_from_slice(&64240u16.to_be_bytes());
    let tcp_check = checksum(&p[20..], pseudo_header_sum(&p));
    p[36..38].copy_from_slice(&tcp_check.to_be_bytes());
    p
}

/// The TCP pseudo-header's sum: addresses, protocol and TCP length (20, no options).
fn pseudo_header_sum(p: &[u8; 40]) -> u32 {
    let addresses: u32 = p[12..20]
        .chunks(2)
        .map(|pair| u32::from(u16::from_be_bytes([pair[0], pair[1]])))
        .sum();
    addresses + 6 + 20
}

/// The Internet checksum (RFC 1071) of `bytes`, starting from `initial`.
fn checksum(bytes: &[u8], initial: u32) -> u16 {
    let mut sum = initial;
    for pair in bytes.chunks(2) {
        sum += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A header with its checksum filled in sums to zero.
    #[test]
    fn checksums_verify() {
        let target = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 100), 25);
        let source = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 250), 20000);
        let p = tcp_packet(source, target, TCP_SYN, 7);
        assert_eq!(checksum(&p[..20], 0), 0);
        assert_eq!(checksum(&p[20..], pseudo_header_sum(&p)), 0);
    }
}
