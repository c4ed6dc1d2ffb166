//! Backend MAC addresses for `dsr` forwarding, from the kernel's neighbour table.
//!
//! Choice: read `/proc/net/arp` (this network namespace's IPv4 neighbour table) rather than
//! speak netlink: it is stable, needs no extra dependency, and the kernel keeps it fresh as
//! long as we talk to the backends (health checks do). A backend without a complete entry is
//! nudged with one empty UDP datagram to its discard port, which makes the kernel resolve it,
//! and takes no new flows until its MAC is known.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};

/// `ATF_COM`: the entry is complete (has a hardware address).
const ATF_COM: u32 = 0x2;

/// Complete entries on `interface`: IPv4 address → MAC.
pub fn table(interface: &str) -> HashMap<Ipv4Addr, [u8; 6]> {
    std::fs::read_to_string("/proc/net/arp")
        .map(|text| parse(&text, interface))
        .unwrap_or_default()
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
pub fn nudge(address: Ipv4Addr) {
    if let Ok(socket) = UdpSocket::bind("0.0.0.0:0") {
        let _ = socket.send_to(&[], SocketAddrV4::new(address, 9));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
