//! Backend MAC addresses for `dsr` forwarding, from the kernel's neighbour tables.
//!
//! IPv4 from `/proc/thread-self/net/arp` (this network namespace's ARP table: stable text, no extra
//! dependency); IPv6, which has no such file, from a netlink dump of the neighbour table
//! (`RTM_GETNEIGH`, the entries neighbour discovery learnt). The kernel keeps both fresh as
//! long as we talk to the backends (health checks do). A backend without a complete entry is
//! nudged with one empty UDP datagram to its discard port, which makes the kernel resolve it
//! (ARP or neighbour discovery), and takes no new flows until its MAC is known.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};

use anyhow::bail;
use nix::libc;
use tracing::debug;

use super::netdev::{
    NLMSG_ERROR, attribute, ifindex, netlink_receive, netlink_send, netlink_socket,
};

/// `ATF_COM`: the entry is complete (has a hardware address).
const ATF_COM: u32 = 0x2;

/// Complete entries on `interface`: address (IPv4 and IPv6) → MAC.
pub fn table(interface: &str) -> HashMap<IpAddr, [u8; 6]> {
    // The calling thread's namespace (`/proc/net` is the process leader's): the same in a
    // running switchyard, not in a test that moved one thread into a namespace of its own.
    let mut entries: HashMap<IpAddr, [u8; 6]> =
        std::fs::read_to_string("/proc/thread-self/net/arp")
            .map(|text| parse(&text, interface))
            .unwrap_or_default()
            .into_iter()
            .map(|(ip, mac)| (IpAddr::V4(ip), mac))
            .collect();
    match ipv6_table(interface) {
        Ok(v6) => entries.extend(v6.into_iter().map(|(ip, mac)| (IpAddr::V6(ip), mac))),
        // Unknown MACs keep backends out of new flows and are asked for again next sync.
        Err(error) => debug!("IPv6 neighbours of {interface}: {error:#}"),
    }
    entries
}

fn parse(text: &str, interface: &str) -> HashMap<Ipv4Addr, [u8; 6]> {
    let mut entries = HashMap::new();
    // IP address  HW type  Flags  HW address  Mask  Device
    for line in text.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [ip, _, flags, mac, _, device] = fields[..] else {
            continue;
        };
        if device != interface {
            continue;
        }
        let Ok(ip) = ip.parse::<Ipv4Addr>() else {
            continue;
        };
        let Ok(flags) = u32::from_str_radix(flags.trim_start_matches("0x"), 16) else {
            continue;
        };
        if flags & ATF_COM == 0 {
            continue;
        }
        if let Some(mac) = parse_mac(mac)
            && mac != [0; 6]
        {
            entries.insert(ip, mac);
        }
    }
    entries
}

fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        *byte = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// Makes the kernel resolve `address` (best effort; errors only mean "try again later").
pub fn nudge(address: IpAddr) {
    let local = match address {
        IpAddr::V4(_) => "0.0.0.0:0",
        IpAddr::V6(_) => "[::]:0",
    };
    if let Ok(socket) = UdpSocket::bind(local) {
        let _ = socket.send_to(&[], SocketAddr::new(address, 9));
    }
}

const RTM_NEWNEIGH: u16 = 28;
const RTM_GETNEIGH: u16 = 30;
const NLMSG_DONE: u16 = 3;
const NDA_DST: u16 = 1;
const NDA_LLADDR: u16 = 2;
/// `NUD_VALID`: states whose hardware address can be used (permanent, noarp, reachable,
/// probe, stale, delay).
const NUD_VALID: u16 = 0x80 | 0x40 | 0x02 | 0x10 | 0x04 | 0x08;
/// nlmsghdr, then ndmsg.
const NLMSG_HDRLEN: usize = 16;
const NDMSG_LEN: usize = 12;

/// Valid IPv6 entries on `interface`, from one netlink dump of the neighbour table.
fn ipv6_table(interface: &str) -> anyhow::Result<HashMap<Ipv6Addr, [u8; 6]>> {
    let ifindex = ifindex(interface)?;
    let socket = netlink_socket(libc::NETLINK_ROUTE)?;
    let total = NLMSG_HDRLEN + NDMSG_LEN;
    let mut request = Vec::with_capacity(total);
    request.extend_from_slice(&(total as u32).to_ne_bytes());
    request.extend_from_slice(&RTM_GETNEIGH.to_ne_bytes());
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16;
    request.extend_from_slice(&flags.to_ne_bytes());
    request.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    request.extend_from_slice(&0u32.to_ne_bytes()); // port: the kernel
    request.push(libc::AF_INET6 as u8); // ndmsg: family, then the rest zero (all entries)
    request.resize(total, 0);
    netlink_send(&socket, &request)?;
    let mut entries = HashMap::new();
    let mut buffer = vec![0u8; 32 * 1024];
    // A dump comes in as many datagrams as it needs; bounded in case the kernel never ends it.
    for _ in 0..1024 {
        let got = netlink_receive(&socket, &mut buffer)?;
        if read_neighbours(&buffer[..got], ifindex, &mut entries)? {
            return Ok(entries);
        }
    }
    bail!("the neighbour dump did not end")
}

/// Adds the valid IPv6 entries on `ifindex` in one datagram of a neighbour dump to `entries`;
/// true once the dump's end is in it.
fn read_neighbours(
    mut datagram: &[u8],
    ifindex: u32,
    entries: &mut HashMap<Ipv6Addr, [u8; 6]>,
) -> anyhow::Result<bool> {
    while datagram.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes([datagram[0], datagram[1], datagram[2], datagram[3]]) as usize;
        let kind = u16::from_ne_bytes([datagram[4], datagram[5]]);
        if len < NLMSG_HDRLEN || len > datagram.len() {
            bail!("malformed netlink message ({len} bytes)");
        }
        let message = &datagram[NLMSG_HDRLEN..len];
        match kind {
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR => {
                let errno = message
                    .get(..4)
                    .map_or(0, |b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
                bail!("netlink: {}", io::Error::from_raw_os_error(-errno));
            }
            RTM_NEWNEIGH if message.len() >= NDMSG_LEN => {
                if let Some((ip, mac)) = neighbour(message, ifindex) {
                    entries.insert(ip, mac);
                }
            }
            _ => {}
        }
        datagram = &datagram[((len + 3) & !3).min(datagram.len())..];
    }
    Ok(false)
}

/// One neighbour entry (ndmsg and its attributes): its address and MAC when it is an IPv6
/// entry on `ifindex` in a valid state with a non-zero MAC.
fn neighbour(message: &[u8], ifindex: u32) -> Option<(Ipv6Addr, [u8; 6])> {
    let family = message[0];
    let index = u32::from_ne_bytes([message[4], message[5], message[6], message[7]]);
    let state = u16::from_ne_bytes([message[8], message[9]]);
    if family != libc::AF_INET6 as u8 || index != ifindex || state & NUD_VALID == 0 {
        return None;
    }
    let attributes = &message[NDMSG_LEN..];
    let dst: [u8; 16] = attribute(attributes, NDA_DST)?.try_into().ok()?;
    let mac: [u8; 6] = attribute(attributes, NDA_LLADDR)?.try_into().ok()?;
    (mac != [0; 6]).then_some((Ipv6Addr::from(dst), mac))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_valid_ipv6_entries_of_one_device() {
        // One RTM_NEWNEIGH (reachable, on ifindex 7, 2001:2::11 at 0a:..:34), then NLMSG_DONE.
        let mut message = vec![libc::AF_INET6 as u8, 0, 0, 0];
        message.extend_from_slice(&7u32.to_ne_bytes());
        message.extend_from_slice(&0x02u16.to_ne_bytes());
        message.extend_from_slice(&[0, 0]);
        let ip: Ipv6Addr = "2001:2::11".parse().expect("address");
        message.extend_from_slice(&20u16.to_ne_bytes());
        message.extend_from_slice(&NDA_DST.to_ne_bytes());
        message.extend_from_slice(&ip.octets());
        let mac = [0x0a, 0xbc, 0xde, 0xf0, 0x12, 0x34];
        message.extend_from_slice(&10u16.to_ne_bytes());
        message.extend_from_slice(&NDA_LLADDR.to_ne_bytes());
        message.extend_from_slice(&mac);
        message.extend_from_slice(&[0, 0]);
        let mut datagram = Vec::new();
        for (kind, body) in [(RTM_NEWNEIGH, &message[..]), (NLMSG_DONE, &[0u8; 4][..])] {
            datagram.extend_from_slice(&((NLMSG_HDRLEN + body.len()) as u32).to_ne_bytes());
            datagram.extend_from_slice(&kind.to_ne_bytes());
            datagram.extend_from_slice(&[0; 10]);
            datagram.extend_from_slice(body);
        }
        let mut entries = HashMap::new();
        assert!(read_neighbours(&datagram, 7, &mut entries).expect("parses"));
        assert_eq!(entries.get(&ip), Some(&mac));
        let mut elsewhere = HashMap::new();
        read_neighbours(&datagram, 8, &mut elsewhere).expect("parses");
        assert!(elsewhere.is_empty());
    }

    #[test]
    fn reads_complete_entries_of_one_device() {
        let text = "IP address       HW type     Flags       HW address            Mask     Device\n\
                    198.18.1.11      0x1         0x2         0a:bc:de:f0:12:34     *        sy-b0\n\
                    198.18.1.12      0x1         0x0         00:00:00:00:00:00     *        sy-b0\n\
                    198.18.1.13      0x1         0x2         0a:bc:de:f0:12:35     *        eth0\n";
        let table = parse(text, "sy-b0");
        assert_eq!(table.len(), 1);
        assert_eq!(
            table[&Ipv4Addr::new(198, 18, 1, 11)],
            [0x0a, 0xbc, 0xde, 0xf0, 0x12, 0x34]
        );
    }
}
