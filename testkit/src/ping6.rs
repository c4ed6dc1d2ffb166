//! ICMPv6 echo (ping) from the calling thread's namespace, without an external `ping`: one echo
//! request on a raw ICMPv6 socket (the kernel fills in the checksum, and fragments a request
//! larger than the path MTU), and its reply awaited.

use std::io::Read;
use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use socket2::{Domain, Protocol, Socket, Type};

const ECHO_REQUEST: u8 = 128;
const ECHO_REPLY: u8 = 129;

/// Sends one echo request with `payload` bytes to `target` and waits up to `limit` for its
/// reply, whole (a reassembled one, when it travelled in fragments).
pub fn ping6(target: Ipv6Addr, payload: usize, limit: Duration) -> Result<()> {
    let socket = Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6))
        .context("a raw ICMPv6 socket (needs CAP_NET_RAW)")?;
    let id = (std::process::id() as u16).to_be_bytes();
    let sequence = [0x5e, 0x71];
    let mut request = vec![
        ECHO_REQUEST,
        0,
        0,
        0,
        id[0],
        id[1],
        sequence[0],
        sequence[1],
    ];
    request.extend((0..payload).map(|i| i as u8));
    let to = SocketAddr::V6(SocketAddrV6::new(target, 0, 0, 0));
    socket
        .send_to(&request, &to.into())
        .with_context(|| format!("sending an echo request to {target}"))?;
    let deadline = Instant::now() + limit;
    let mut buffer = vec![0u8; request.len() + 64];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("no echo reply from {target} within {limit:?} ({payload} bytes)");
        }
        socket.set_read_timeout(Some(left))?;
        let n = match (&socket).read(&mut buffer) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e).context("reading ICMPv6"),
        };
        // The socket sees every ICMPv6 message (neighbour discovery too): only ours counts.
        let reply = &buffer[..n];
        if reply.len() == request.len() && reply[0] == ECHO_REPLY && reply[4..] == request[4..] {
            return Ok(());
        }
    }
}
