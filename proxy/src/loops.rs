//! Forwarding loops that only show at run time: a backend address that leads back to one of
//! our own listeners (a NAT, a route through another host, a local address the config could
//! not know). Such a connection arrives with the source address of one of our own outgoing
//! connections, so every backend and health-check connection is registered here by its local
//! address while it is being set up, and the accept path refuses a client whose address is one
//! of them before it could open a connection of its own — one hop, never a chain.
//!
//! The table is indexed by local port: one atomic word per port holds the (folded) local IP
//! and how many of our connections use that port, so a lookup on accept is one atomic load,
//! with no lock and no allocation. A loop through a proxy that opens a connection of its own
//! (another balancer, a port forwarder) is not visible here; `max_connections`, the descriptor
//! limit (which never counts against backends) and `greeting_timeout` bound it.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};

use nix::errno::Errno;
use socket2::{Domain, Socket, Type};
use tokio::net::TcpStream;

/// Clients refused because they were our own connections come back.
static LOOPS_REFUSED: AtomicU64 = AtomicU64::new(0);

/// Per local port: folded IP in the high half, number of our open connections in the low half.
static OUTGOING: [AtomicU64; 1 << 16] = [const { AtomicU64::new(0) }; 1 << 16];

/// The IP half of an entry shared by connections from different local IPs: matches any IP.
const ANY_IP: u32 = 0;

/// A 32-bit stand-in for an IP address (exact for IPv4), never [`ANY_IP`].
fn fold(ip: IpAddr) -> u32 {
    let folded = match ip {
        IpAddr::V4(v4) => u32::from(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => u32::from(v4),
            None => v6.octets().chunks_exact(4).fold(0u32, |acc, c| {
                acc.rotate_left(5) ^ u32::from_be_bytes([c[0], c[1], c[2], c[3]])
            }),
        },
    };
    folded.max(1)
}

/// Connects to `address`, registering the connection as ours as soon as the kernel has chosen
/// its local address (right after the SYN is sent, before any wait), so that it is known
/// before a looped connection can be accepted. Keep the [`Outgoing`] while the connection
/// could still turn out to be a loop (until the backend greets).
pub async fn connect(address: SocketAddr) -> io::Result<(TcpStream, Outgoing)> {
    let socket = Socket::new(Domain::for_address(address), Type::STREAM, None)?;
    socket.set_nonblocking(true)?;
    match socket.connect(&address.into()) {
        Ok(()) => {}
        Err(error) if error.raw_os_error() == Some(Errno::EINPROGRESS as i32) => {}
        Err(error) => return Err(error),
    }
    let outgoing = Outgoing::register(
        socket
            .local_addr()?
            .as_socket()
            .ok_or_else(|| io::Error::other("a TCP socket without an IP address"))?,
    );
    let stream = TcpStream::from_std(socket.into())?;
    stream.writable().await?;
    if let Some(error) = stream.take_error()? {
        return Err(error);
    }
    Ok((stream, outgoing))
}

/// One of our outgoing connections, registered while it lives (dropping it unregisters).
pub struct Outgoing {
    port: u16,
}

impl Outgoing {
    /// Registers the connection whose local address is `local`.
    pub fn register(local: SocketAddr) -> Outgoing {
        let ip = fold(local.ip());
        let port = local.port();
        let _ = OUTGOING[usize::from(port)].fetch_update(
            Ordering::AcqRel,
            Ordering::Acquire,
            |entry| {
                let (held_ip, count) = split(entry);
                let ip = if count == 0 || held_ip == ip {
                    ip
                } else {
                    ANY_IP
                };
                Some(join(ip, count.saturating_add(1)))
            },
        );
        Outgoing { port }
    }
}

impl Drop for Outgoing {
    fn drop(&mut self) {
        let _ = OUTGOING[usize::from(self.port)].fetch_update(
            Ordering::AcqRel,
            Ordering::Acquire,
            |entry| {
                let (ip, count) = split(entry);
                let count = count.saturating_sub(1);
                Some(if count == 0 { 0 } else { join(ip, count) })
            },
        );
    }
}

fn split(entry: u64) -> (u32, u32) {
    ((entry >> 32) as u32, entry as u32)
}

fn join(ip: u32, count: u32) -> u64 {
    (u64::from(ip) << 32) | u64::from(count)
}

/// Whether `peer` (an accepted client's address) is one of our own open outgoing connections.
pub fn is_own_connection(peer: SocketAddr) -> bool {
    let (ip, count) = split(OUTGOING[usize::from(peer.port())].load(Ordering::Acquire));
    count > 0 && (ip == ANY_IP || ip == fold(peer.ip()))
}

/// Counts a client refused as one of our own connections come back; the first is logged.
pub fn report_refused(service_name: &str, client: SocketAddr) {
    if LOOPS_REFUSED.fetch_add(1, Ordering::Relaxed) == 0 {
        tracing::warn!(
            service = %service_name,
            "connection from {client} is one of switchyard's own backend connections: a \
             backend address leads back to this listener (a forwarding loop); such connections \
             are refused, so that backend fails its checks"
        );
    }
}

/// Clients refused as loops so far.
pub fn refused() -> u64 {
    LOOPS_REFUSED.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registered_addresses_are_recognised_until_dropped() {
        let ours: SocketAddr = "10.9.8.7:40001".parse().expect("address");
        let stranger: SocketAddr = "192.0.2.1:40001".parse().expect("address");
        assert!(!is_own_connection(ours));
        let first = Outgoing::register(ours);
        let second = Outgoing::register(ours);
        assert!(is_own_connection(ours));
        assert!(!is_own_connection(stranger));
        drop(first);
        assert!(is_own_connection(ours));
        drop(second);
        assert!(!is_own_connection(ours));
    }

    #[tokio::test]
    async fn our_connection_is_known_when_it_reaches_a_listener() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("address");
        let (_stream, outgoing) = connect(address).await.expect("connect");
        let (_accepted, peer) = listener.accept().await.expect("accept");
        assert!(is_own_connection(peer));
        drop(outgoing);
        assert!(!is_own_connection(peer));
    }

    #[test]
    fn a_port_shared_by_two_local_ips_matches_both() {
        let a: SocketAddr = "10.9.8.1:40002".parse().expect("address");
        let b: SocketAddr = "[2001:db8::1]:40002".parse().expect("address");
        let (_a, _b) = (Outgoing::register(a), Outgoing::register(b));
        assert!(is_own_connection(a) && is_own_connection(b));
    }
}
