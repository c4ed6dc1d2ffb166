//! Forwarding loops that only show at run time: a backend address that leads back to one of
//! our own listeners (a NAT, a route through another host, a local address the config could
//! not know). Such a connection arrives with the source address of one of our own outgoing
//! connections, so every backend and health-check connection is registered here by its local
//! address while it is being set up, and the accept path refuses a client whose address is one
//! of them before it could open a connection of its own — one hop, never a chain.
//!
//! Two lock-free tables, so that the accept path costs one atomic load in the normal case and
//! never refuses a stranger. A filter indexed by local port holds the (folded) local IP and how
//! many of our connections use that port. Linux gives the same ephemeral port to connections
//! towards different destinations, so a client on this host can share its address with one of
//! our backend connections: only a client that passes the filter has its connection's own
//! address read (one `getsockname`) and its exact four-tuple looked up in a set of our
//! connections' four-tuples (fingerprints, open addressing). A loop through a NAT that rewrites
//! the destination, or through a proxy that opens a connection of its own (another balancer, a
//! port forwarder), is not visible here; `max_connections`, the descriptor limit (which never
//! counts against backends) and `greeting_timeout` bound it.

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

/// Fingerprints of our open connections' four-tuples (0: empty slot; [`REMOVED`]: a slot that
/// held one, which lookups probe past).
static FOUR_TUPLES: [AtomicU64; 1 << 16] = [const { AtomicU64::new(0) }; 1 << 16];
const REMOVED: u64 = 1;
/// How far a fingerprint may sit from its home slot. A full run means the connection is not
/// registered: a loop through it goes unseen (bounded as above), never a stranger refused.
const PROBES: usize = 64;

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
        address,
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
    /// Its slot in [`FOUR_TUPLES`], if it found one.
    slot: Option<usize>,
}

impl Outgoing {
    /// Registers the connection from `local` to `remote`.
    pub fn register(local: SocketAddr, remote: SocketAddr) -> Outgoing {
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
        Outgoing {
            port,
            slot: insert(fingerprint(local, remote)),
        }
    }
}

impl Drop for Outgoing {
    fn drop(&mut self) {
        if let Some(slot) = self.slot {
            FOUR_TUPLES[slot].store(REMOVED, Ordering::Release);
        }
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

/// A 64-bit fingerprint of a connection from `local` to `remote`, never 0 or [`REMOVED`].
fn fingerprint(local: SocketAddr, remote: SocketAddr) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    (local, remote).hash(&mut hasher);
    hasher.finish().max(REMOVED + 1)
}

/// Puts `print` in a free slot near its home; `None` when the run is full.
fn insert(print: u64) -> Option<usize> {
    (0..PROBES).map(|i| slot_of(print, i)).find(|&slot| {
        [0, REMOVED].into_iter().any(|free| {
            FOUR_TUPLES[slot]
                .compare_exchange(free, print, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        })
    })
}

fn contains(print: u64) -> bool {
    for i in 0..PROBES {
        match FOUR_TUPLES[slot_of(print, i)].load(Ordering::Acquire) {
            0 => return false,
            held if held == print => return true,
            _ => {}
        }
    }
    false
}

fn slot_of(print: u64, probe: usize) -> usize {
    (print as usize).wrapping_add(probe) & (FOUR_TUPLES.len() - 1)
}

/// Whether `client`, accepted from `peer`, is one of our own open outgoing connections come
/// back: its four-tuple is one of ours, reversed.
pub fn is_own_connection(client: &TcpStream, peer: SocketAddr) -> bool {
    passes_filter(peer)
        && client
            .local_addr()
            .is_ok_and(|ours| contains(fingerprint(peer, ours)))
}

/// Whether one of our connections may have `peer` as its local address (one atomic load).
fn passes_filter(peer: SocketAddr) -> bool {
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

    /// A connection to `remote` from a fresh local port, as the accept side sees it: (the
    /// accepted stream, its peer, the connecting stream).
    async fn accepted(remote: &tokio::net::TcpListener) -> (TcpStream, SocketAddr, TcpStream) {
        let address = remote.local_addr().expect("address");
        let (connecting, accepted) = tokio::join!(TcpStream::connect(address), remote.accept());
        let (stream, peer) = accepted.expect("accept");
        (stream, peer, connecting.expect("connect"))
    }

    #[tokio::test]
    async fn our_connection_is_known_when_it_reaches_a_listener_until_dropped() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("address");
        let (_stream, outgoing) = connect(address).await.expect("connect");
        let (accepted, peer) = listener.accept().await.expect("accept");
        assert!(is_own_connection(&accepted, peer));
        drop(outgoing);
        assert!(!is_own_connection(&accepted, peer));
    }

    /// A client that shares its local address with one of our connections to another
    /// destination (Linux reuses ephemeral ports across destinations) is a stranger.
    #[tokio::test]
    async fn a_stranger_sharing_our_local_address_is_not_refused() {
        let ours = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let backend = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let (client, peer, _connecting) = accepted(&ours).await;
        // Our backend connection from exactly the client's address, to another destination.
        let _registered = Outgoing::register(peer, backend.local_addr().expect("address"));
        assert!(!is_own_connection(&client, peer));
    }

    #[test]
    fn the_filter_passes_every_local_ip_of_a_shared_port_until_all_are_gone() {
        let a: SocketAddr = "10.9.8.1:40002".parse().expect("address");
        let b: SocketAddr = "[2001:db8::1]:40002".parse().expect("address");
        let stranger: SocketAddr = "192.0.2.1:40003".parse().expect("address");
        let remote: SocketAddr = "10.9.8.8:25".parse().expect("address");
        let (first, second) = (Outgoing::register(a, remote), Outgoing::register(b, remote));
        assert!(passes_filter(a) && passes_filter(b));
        assert!(!passes_filter(stranger));
        drop(first);
        assert!(passes_filter(b));
        drop(second);
        assert!(!passes_filter(a) && !passes_filter(b));
    }

    #[test]
    fn fingerprints_are_found_until_removed_and_slots_are_reused() {
        let local: SocketAddr = "10.9.8.7:40001".parse().expect("address");
        let remote: SocketAddr = "10.9.8.8:25".parse().expect("address");
        let other: SocketAddr = "10.9.8.9:25".parse().expect("address");
        let first = Outgoing::register(local, remote);
        assert!(contains(fingerprint(local, remote)));
        assert!(!contains(fingerprint(local, other)));
        let second = Outgoing::register(local, other);
        drop(first);
        assert!(!contains(fingerprint(local, remote)));
        assert!(
            contains(fingerprint(local, other)),
            "found past a removed slot"
        );
        drop(second);
        let again = Outgoing::register(local, remote);
        assert!(contains(fingerprint(local, remote)));
        drop(again);
    }
}
