//! What the kernel says about a network interface, asked without external tools: its driver
//! (ethtool's driver-info ioctl) and its XDP features (the `netdev` generic-netlink family,
//! Linux 6.3+), including whether frames sent to it with `ndo_xdp_xmit` — XDP_TX on a veth,
//! XDP_REDIRECT onto any interface — are delivered right now (`NDO_XMIT`: a veth sets it only
//! while its peer runs an XDP program; Intel drivers only while one runs on the interface).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use anyhow::{Context, bail};
use nix::libc;

/// The XDP feature bits of `enum netdev_xdp_act` (include/uapi/linux/netdev.h).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct XdpFeatures(pub u64);

impl XdpFeatures {
    /// XDP_PASS, XDP_DROP, XDP_ABORTED and XDP_TX in native mode.
    pub const BASIC: u64 = 1;
    /// XDP_REDIRECT from this interface's native program.
    pub const REDIRECT: u64 = 2;
    /// Frames handed to this interface by `ndo_xdp_xmit` are sent.
    pub const NDO_XMIT: u64 = 4;

    pub fn has(self, bit: u64) -> bool {
        self.0 & bit == bit
    }
}

/// What was learnt about one interface.
#[derive(Clone, Debug)]
pub struct Netdev {
    pub name: String,
    /// The driver's name (`veth`, `i40e`, `mlx5_core`, …), if the interface answers ethtool.
    pub driver: Option<String>,
    /// `None` on kernels without the `netdev` netlink family (before 6.3).
    pub features: Option<XdpFeatures>,
}

impl Netdev {
    /// Looks `name` up in the calling thread's network namespace.
    pub fn probe(name: &str) -> anyhow::Result<Netdev> {
        let ifindex = ifindex(name)?;
        Ok(Netdev {
            name: name.to_string(),
            driver: driver(name).ok(),
            features: xdp_features(ifindex).ok(),
        })
    }

    pub fn is_veth(&self) -> bool {
        self.driver.as_deref() == Some("veth")
    }

    /// Whether local senders can hand frames to it with only a partial checksum
    /// (CHECKSUM_PARTIAL): a veth or a tun/tap device, not a physical NIC.
    pub fn may_carry_partial_checksums(&self) -> bool {
        matches!(self.driver.as_deref(), Some("veth" | "tun"))
    }

    /// The driver as messages show it.
    pub fn driver_shown(&self) -> &str {
        self.driver.as_deref().unwrap_or("unknown")
    }
}

pub(super) fn ifindex(name: &str) -> anyhow::Result<u32> {
    let c_name = std::ffi::CString::new(name).context("interface name with a NUL byte")?;
    // SAFETY: a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
    if index == 0 {
        bail!(
            "interface {name} not found in this network namespace: {}",
            io::Error::last_os_error()
        );
    }
    Ok(index)
}

/// The driver name through SIOCETHTOOL / ETHTOOL_GDRVINFO.
fn driver(name: &str) -> anyhow::Result<String> {
    #[repr(C)]
    struct DrvInfo {
        cmd: u32,
        driver: [u8; 32],
        rest: [u8; 32 * 4 + 12 + 5 * 4],
    }
    #[repr(C)]
    struct IfReq {
        name: [u8; libc::IFNAMSIZ],
        data: *mut DrvInfo,
        _pad: [u8; 16],
    }
    const ETHTOOL_GDRVINFO: u32 = 0x3;
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    if name.len() >= libc::IFNAMSIZ {
        bail!("interface name {name} too long");
    }
    let mut info = DrvInfo {
        cmd: ETHTOOL_GDRVINFO,
        driver: [0; 32],
        rest: [0; 32 * 4 + 12 + 5 * 4],
    };
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        data: &mut info,
        _pad: [0; 16],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").context("a socket for SIOCETHTOOL")?;
    // SAFETY: req points at a live ifreq whose data points at a live, large enough drvinfo.
    if unsafe { libc::ioctl(socket.as_raw_fd(), SIOCETHTOOL as _, &mut req) } != 0 {
        bail!(
            "ethtool driver info of {name}: {}",
            io::Error::last_os_error()
        );
    }
    let end = info.driver.iter().position(|&b| b == 0).unwrap_or(32);
    Ok(String::from_utf8_lossy(&info.driver[..end]).into_owned())
}

const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
const NETDEV_CMD_DEV_GET: u8 = 1;
const NETDEV_A_DEV_IFINDEX: u16 = 1;
const NETDEV_A_DEV_XDP_FEATURES: u16 = 3;
pub(super) const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;

/// The interface's XDP features from the `netdev` generic-netlink family.
pub fn xdp_features(ifindex: u32) -> anyhow::Result<XdpFeatures> {
    let socket = Genl::open()?;
    let family = socket
        .request(
            GENL_ID_CTRL,
            CTRL_CMD_GETFAMILY,
            CTRL_ATTR_FAMILY_NAME,
            b"netdev\0",
        )
        .context("resolving the netdev netlink family (Linux 6.3+)")?;
    let family = attribute(&family, CTRL_ATTR_FAMILY_ID)
        .and_then(|v| Some(u16::from_ne_bytes(v.get(..2)?.try_into().ok()?)))
        .context("the netdev family has no id")?;
    let reply = socket.request(
        family,
        NETDEV_CMD_DEV_GET,
        NETDEV_A_DEV_IFINDEX,
        &ifindex.to_ne_bytes(),
    )?;
    let bits = attribute(&reply, NETDEV_A_DEV_XDP_FEATURES)
        .and_then(|v| Some(u64::from_ne_bytes(v.get(..8)?.try_into().ok()?)))
        .context("no xdp-features in the netdev reply")?;
    Ok(XdpFeatures(bits))
}

/// A generic-netlink socket for one request at a time.
struct Genl(OwnedFd);

impl Genl {
    fn open() -> anyhow::Result<Genl> {
        Ok(Genl(netlink_socket(libc::NETLINK_GENERIC)?))
    }

    /// Sends `cmd` with one attribute to `family` and returns the reply's attributes.
    fn request(&self, family: u16, cmd: u8, attr: u16, value: &[u8]) -> anyhow::Result<Vec<u8>> {
        let attr_len = 4 + value.len();
        let total = 16 + 4 + align(attr_len);
        let mut message = Vec::with_capacity(total);
        message.extend_from_slice(&(total as u32).to_ne_bytes());
        message.extend_from_slice(&family.to_ne_bytes());
        message.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
        message.extend_from_slice(&1u32.to_ne_bytes()); // sequence
        message.extend_from_slice(&0u32.to_ne_bytes()); // port: the kernel
        message.extend_from_slice(&[cmd, 1, 0, 0]); // genlmsghdr: cmd, version
        message.extend_from_slice(&(attr_len as u16).to_ne_bytes());
        message.extend_from_slice(&attr.to_ne_bytes());
        message.extend_from_slice(value);
        message.resize(total, 0);
        netlink_send(&self.0, &message)?;
        let mut reply = vec![0u8; 8192];
        let got = netlink_receive(&self.0, &mut reply)?;
        reply.truncate(got);
        if reply.len() < 20 {
            bail!("netlink reply too short ({} bytes)", reply.len());
        }
        let kind = u16::from_ne_bytes([reply[4], reply[5]]);
        if kind == NLMSG_ERROR {
            let errno = i32::from_ne_bytes([reply[16], reply[17], reply[18], reply[19]]);
            bail!("netlink: {}", io::Error::from_raw_os_error(-errno));
        }
        let length = (u32::from_ne_bytes([reply[0], reply[1], reply[2], reply[3]]) as usize)
            .min(reply.len());
        Ok(reply[20.min(length)..length].to_vec())
    }
}

/// A netlink socket of `protocol` (`NETLINK_GENERIC`, `NETLINK_ROUTE`).
pub(super) fn netlink_socket(protocol: i32) -> anyhow::Result<OwnedFd> {
    // SAFETY: plain socket(2); the fd is owned at once.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            protocol,
        )
    };
    if fd < 0 {
        bail!("netlink socket: {}", io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sends one request to the kernel (the default destination).
pub(super) fn netlink_send(socket: &OwnedFd, message: &[u8]) -> anyhow::Result<()> {
    // SAFETY: the buffer is live for the call.
    let sent = unsafe {
        libc::send(
            socket.as_raw_fd(),
            message.as_ptr().cast(),
            message.len(),
            0,
        )
    };
    if sent < 0 {
        bail!("netlink send: {}", io::Error::last_os_error());
    }
    Ok(())
}

/// Receives one datagram into `buffer`; its length.
pub(super) fn netlink_receive(socket: &OwnedFd, buffer: &mut [u8]) -> anyhow::Result<usize> {
    // SAFETY: the buffer is live and as long as said.
    let got = unsafe {
        libc::recv(
            socket.as_raw_fd(),
            buffer.as_mut_ptr().cast(),
            buffer.len(),
            0,
        )
    };
    if got < 0 {
        bail!("netlink receive: {}", io::Error::last_os_error());
    }
    Ok(got as usize)
}

fn align(len: usize) -> usize {
    (len + 3) & !3
}

/// The payload of attribute `kind` in a flat attribute list.
pub(super) fn attribute(attributes: &[u8], kind: u16) -> Option<&[u8]> {
    let mut rest = attributes;
    while rest.len() >= 4 {
        let len = u16::from_ne_bytes([rest[0], rest[1]]) as usize;
        let this = u16::from_ne_bytes([rest[2], rest[3]]) & 0x3fff;
        if len < 4 || len > rest.len() {
            return None;
        }
        if this == kind {
            return Some(&rest[4..len]);
        }
        rest = &rest[align(len).min(rest.len())..];
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_are_found_past_padding() {
        // "ab" padded to 4, then a u32.
        let list = [6, 0, 2, 0, b'a', b'b', 0, 0, 8, 0, 1, 0, 7, 0, 0, 0];
        assert_eq!(attribute(&list, 2), Some(&b"ab"[..]));
        assert_eq!(attribute(&list, 1), Some(&[7, 0, 0, 0][..]));
        assert_eq!(attribute(&list, 3), None);
        // A length running past the end is not trusted.
        assert_eq!(attribute(&[200, 0, 1, 0, 0, 0], 1), None);
    }

    #[test]
    fn loopback_is_probed_and_has_no_native_xdp() {
        let lo = Netdev::probe("lo").expect("lo exists");
        assert!(!lo.may_carry_partial_checksums());
        if let Some(features) = lo.features {
            assert!(!features.has(XdpFeatures::BASIC), "{features:?}");
        }
    }
}
