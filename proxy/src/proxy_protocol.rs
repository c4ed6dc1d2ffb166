//! PROXY protocol v1 and v2 headers (haproxy.org/download/2.9/doc/proxy-protocol.txt) sent to
//! backends so that an MTA logs the real client address.
//!
//! A dual-stack listener reports IPv4 peers as IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`);
//! those are announced as plain IPv4, since that is what the client really used and what an
//! MTA's access lists and DNSBL lookups expect.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use crate::config::ProxyProtocol;

/// The 12-byte signature that opens every v2 header.
const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Version 2, command PROXY.
const V2_PROXY: u8 = 0x21;
/// Version 2, command LOCAL (a connection of the proxy's own, e.g. a health check).
const V2_LOCAL: u8 = 0x20;
const V2_TCP4: u8 = 0x11;
const V2_TCP6: u8 = 0x21;
const V2_UNSPEC: u8 = 0x00;

/// The header announcing a proxied connection from `client` to `local` (the address the client
/// connected to). Empty for `ProxyProtocol::None`. Mixed families are mapped as the
/// specification says (v1 UNKNOWN / v2 IPv4-mapped handling).
pub fn header(version: ProxyProtocol, client: SocketAddr, local: SocketAddr) -> Vec<u8> {
    let (client, local) = (unmap(client), unmap(local));
    match version {
        ProxyProtocol::None => Vec::new(),
        ProxyProtocol::V1 => v1(client, local),
        ProxyProtocol::V2 => v2(client, local),
    }
}

/// The header a health check sends: v2 LOCAL, or v1 `PROXY UNKNOWN`; empty for `None`.
pub fn health_check_header(version: ProxyProtocol) -> Vec<u8> {
    match version {
        ProxyProtocol::None => Vec::new(),
        ProxyProtocol::V1 => b"PROXY UNKNOWN\r\n".to_vec(),
        ProxyProtocol::V2 => {
            let mut out = V2_SIGNATURE.to_vec();
            out.extend_from_slice(&[V2_LOCAL, V2_UNSPEC, 0, 0]);
            out
        }
    }
}

/// An IPv4-mapped IPv6 address as the IPv4 address it stands for.
fn unmap(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => addr,
        },
        SocketAddr::V4(_) => addr,
    }
}

fn v1(client: SocketAddr, local: SocketAddr) -> Vec<u8> {
    let family = match (client, local) {
        (SocketAddr::V4(_), SocketAddr::V4(_)) => "TCP4",
        (SocketAddr::V6(_), SocketAddr::V6(_)) => "TCP6",
        // v1 has no way to say "IPv4 source, IPv6 destination".
        _ => return b"PROXY UNKNOWN\r\n".to_vec(),
    };
    format!(
        "PROXY {family} {} {} {} {}\r\n",
        client.ip(),
        local.ip(),
        client.port(),
        local.port()
    )
    .into_bytes()
}

fn v2(client: SocketAddr, local: SocketAddr) -> Vec<u8> {
    let mut out = V2_SIGNATURE.to_vec();
    match (client, local) {
        (SocketAddr::V4(c), SocketAddr::V4(l)) => {
            out.extend_from_slice(&[V2_PROXY, V2_TCP4]);
            out.extend_from_slice(&12u16.to_be_bytes());
            out.extend_from_slice(&c.ip().octets());
            out.extend_from_slice(&l.ip().octets());
        }
        // Both IPv6, or mixed: IPv6 with the IPv4 side mapped, which the receiver can still
        // unmap.
        _ => {
            out.extend_from_slice(&[V2_PROXY, V2_TCP6]);
            out.extend_from_slice(&36u16.to_be_bytes());
            out.extend_from_slice(&as_v6(client.ip()).octets());
            out.extend_from_slice(&as_v6(local.ip()).octets());
        }
    }
    out.extend_from_slice(&client.port().to_be_bytes());
    out.extend_from_slice(&local.port().to_be_bytes());
    out
}

fn as_v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    const SIG: [u8; 12] = [
        0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A,
    ];

    #[test]
    fn none_is_empty() {
        assert!(header(ProxyProtocol::None, sa("1.2.3.4:5"), sa("5.6.7.8:25")).is_empty());
        assert!(health_check_header(ProxyProtocol::None).is_empty());
    }

    #[test]
    fn v1_tcp4() {
        let h = header(
            ProxyProtocol::V1,
            sa("192.168.0.1:56324"),
            sa("192.168.0.11:25"),
        );
        assert_eq!(h, b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 25\r\n");
    }

    #[test]
    fn v1_tcp6() {
        let h = header(
            ProxyProtocol::V1,
            sa("[2001:db8::1]:40000"),
            sa("[2001:db8:0:0:0:0:0:25]:25"),
        );
        assert_eq!(h, b"PROXY TCP6 2001:db8::1 2001:db8::25 40000 25\r\n");
        let h = header(ProxyProtocol::V1, sa("[::1]:65535"), sa("[::1]:2525"));
        assert_eq!(h, b"PROXY TCP6 ::1 ::1 65535 2525\r\n");
    }

    #[test]
    fn v1_mapped_both_sides_is_tcp4() {
        let h = header(
            ProxyProtocol::V1,
            sa("[::ffff:10.0.0.7]:1234"),
            sa("[::ffff:10.0.0.1]:25"),
        );
        assert_eq!(h, b"PROXY TCP4 10.0.0.7 10.0.0.1 1234 25\r\n");
    }

    #[test]
    fn v1_mixed_is_unknown() {
        let h = header(
            ProxyProtocol::V1,
            sa("10.0.0.7:1234"),
            sa("[2001:db8::25]:25"),
        );
        assert_eq!(h, b"PROXY UNKNOWN\r\n");
        let h = header(
            ProxyProtocol::V1,
            sa("[::ffff:10.0.0.7]:1234"),
            sa("[2001:db8::25]:25"),
        );
        assert_eq!(h, b"PROXY UNKNOWN\r\n");
    }

    #[test]
    fn v1_longest_header_fits_the_spec_limit() {
        let h = header(
            ProxyProtocol::V1,
            sa("[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535"),
            sa("[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535"),
        );
        assert_eq!(h.len(), 104, "the specification's worst case is 107 bytes");
    }

    #[test]
    fn v2_tcp4_exact_bytes() {
        let h = header(
            ProxyProtocol::V2,
            sa("192.168.0.1:56324"),
            sa("192.168.0.11:25"),
        );
        let mut want = SIG.to_vec();
        want.extend_from_slice(&[0x21, 0x11, 0x00, 0x0C]);
        want.extend_from_slice(&[192, 168, 0, 1, 192, 168, 0, 11]);
        want.extend_from_slice(&[0xDC, 0x04, 0x00, 0x19]); // 56324, 25
        assert_eq!(h, want);
        assert_eq!(h.len(), 16 + 12);
    }

    #[test]
    fn v2_tcp6_exact_bytes() {
        let h = header(
            ProxyProtocol::V2,
            sa("[2001:db8::1]:40000"),
            sa("[::1]:2525"),
        );
        let mut want = SIG.to_vec();
        want.extend_from_slice(&[0x21, 0x21, 0x00, 0x24]);
        want.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        want.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        want.extend_from_slice(&[0x9C, 0x40, 0x09, 0xDD]); // 40000, 2525
        assert_eq!(h, want);
        assert_eq!(h.len(), 16 + 36);
    }

    #[test]
    fn v2_mapped_both_sides_is_tcp4() {
        let h = header(
            ProxyProtocol::V2,
            sa("[::ffff:10.0.0.7]:1234"),
            sa("[::ffff:10.0.0.1]:25"),
        );
        assert_eq!(
            h,
            header(ProxyProtocol::V2, sa("10.0.0.7:1234"), sa("10.0.0.1:25"))
        );
        assert_eq!(&h[12..16], &[0x21, 0x11, 0x00, 0x0C]);
    }

    #[test]
    fn v2_mixed_is_tcp6_with_mapped_address() {
        let h = header(
            ProxyProtocol::V2,
            sa("10.0.0.7:1234"),
            sa("[2001:db8::25]:25"),
        );
        let mut want = SIG.to_vec();
        want.extend_from_slice(&[0x21, 0x21, 0x00, 0x24]);
        want.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 0, 7]);
        want.extend_from_slice(&[
            0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x25,
        ]);
        want.extend_from_slice(&[0x04, 0xD2, 0x00, 0x19]);
        assert_eq!(h, want);
    }

    #[test]
    fn health_check_headers() {
        assert_eq!(health_check_header(ProxyProtocol::V1), b"PROXY UNKNOWN\r\n");
        let mut want = SIG.to_vec();
        want.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
        assert_eq!(health_check_header(ProxyProtocol::V2), want);
    }
}
