//! The second chance between balancers, control side: the ring of `[announce] peers` this
//! host hands on packets it cannot place in (`SECOND_CHANCE`, the other balancers' MACs in
//! `PEER_MACS`), and the proxy services' VIPs the kernel must know to look at their packets
//! (`SERVICES`/`SERVICES6` entries with `forwarding::LOCAL`).
//!
//! The ring: the peers sorted by address; this host (the peer whose address it has on
//! `interface`) hands on to its first successor, wrapping, whose MAC the neighbour table knows
//! (`neighbours`, as for dsr backends) and whose switchyard answers the heartbeat
//! (`heartbeat`: a host whose switchyard stopped still answers ARP/ND, and its stack would
//! reset what it is handed). Every peer is nudged and probed at each sync, so a peer that
//! stops answering either drops out of the ring. Recomputed at every sync, so a reload that
//! changes `peers` or `peer_port` takes effect within one period.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use aya::Ebpf;
use aya::maps::{Array, HashMap, MapData};
use switchyard_common::maps::{
    PeerMac, SecondChanceRing, ServiceValue, forwarding, names, second_chance, service_flags,
};
use tracing::info;

use super::heartbeat::{Prober, Responder};
use super::neighbours;
use super::netdev::ifindex;
use super::tables::{VipKey, admit_vips};
use crate::config::{Dataplane, SecondChance};
use crate::state::{Service, Snapshot};

/// `ServiceValue::flags` the second chance adds to `service`'s entries: announced services
/// take part when `peers` is set.
pub fn service_flags(snapshot: &Snapshot, service: &Service) -> u32 {
    if snapshot.second_chance.is_some() && service.config.announce.is_some() {
        service_flags::SECOND_CHANCE
    } else {
        0
    }
}

/// What the sync last wrote, so only changes touch the maps.
#[derive(Default)]
pub(super) struct ChanceSync {
    /// The proxy services' VIPs written as local entries.
    local: Vec<(VipKey, ServiceValue)>,
    /// The ring and the peers' MACs as written.
    ring: Option<(SecondChanceRing, BTreeSet<[u8; 6]>)>,
    /// The heartbeat while `peers` is set.
    heartbeat: Option<Heartbeat>,
}

/// This host's side of the heartbeat: the responder (stopped when this is dropped) on its peer
/// address, and the prober of the other peers.
struct Heartbeat {
    address: SocketAddr,
    prober: Prober,
    _responder: Responder,
}

impl Heartbeat {
    /// Answers on `address` and probes from its IP address.
    fn start(address: SocketAddr) -> anyhow::Result<Heartbeat> {
        Ok(Heartbeat {
            address,
            _responder: Responder::start(address)?,
            prober: Prober::new(address.ip())?,
        })
    }
}

impl ChanceSync {
    /// Brings the proxy services' local entries and the ring up to date with `snapshot`.
    pub(super) fn run(&mut self, bpf: &mut Ebpf, snapshot: &Snapshot) -> anyhow::Result<()> {
        self.sync_local(bpf, snapshot)?;
        let wanted = match &snapshot.second_chance {
            // The first ring waits for the peers' MACs and answers: it is written before the
            // start completes, and so before this host announces anything.
            Some(chance) => {
                let place = Place::of(chance)?;
                let first = self.ring.is_none();
                let prober = self.heartbeat_on(place.own_address(chance.peer_port))?;
                Some(ring_now(chance, &place, first, prober)?)
            }
            None => {
                self.heartbeat = None;
                None
            }
        };
        if wanted != self.ring {
            write_ring(bpf, wanted.as_ref(), self.ring.as_ref())?;
            log_ring(snapshot.second_chance.as_ref(), wanted.as_ref());
            self.ring = wanted;
        }
        Ok(())
    }

    /// The heartbeat on `address`, (re)started when it is not running there yet.
    fn heartbeat_on(&mut self, address: SocketAddr) -> anyhow::Result<&mut Prober> {
        if self.heartbeat.as_ref().is_none_or(|h| h.address != address) {
            // The old responder stops first: a changed peer_port on the same address.
            self.heartbeat = None;
            self.heartbeat = Some(Heartbeat::start(address)?);
        }
        let heartbeat = self.heartbeat.as_mut().context("heartbeat just started")?;
        Ok(&mut heartbeat.prober)
    }

    /// Writes the local entries of announced proxy services' VIPs and deletes those of
    /// services (or a `peers`) that left. A wildcard listen address names no VIP: skipped.
    fn sync_local(&mut self, bpf: &mut Ebpf, snapshot: &Snapshot) -> anyhow::Result<()> {
        let wanted: Vec<(VipKey, ServiceValue)> = snapshot
            .services
            .iter()
            .filter(|s| s.config.dataplane == Dataplane::Proxy)
            .filter(|s| service_flags(snapshot, s) != 0)
            .flat_map(|s| {
                let value = ServiceValue {
                    index: s.kernel_index,
                    forwarding: forwarding::LOCAL,
                    flags: service_flags::SECOND_CHANCE,
                    ..ServiceValue::default()
                };
                s.config
                    .listen
                    .iter()
                    .filter(|a| !a.ip().is_unspecified())
                    .map(move |&a| (VipKey::of(a), value))
            })
            .collect();
        for (vip, _) in self.local.iter().filter(|old| !wanted.contains(old)) {
            // A VIP an xdp service has taken over meanwhile is left to it.
            if vip
                .read(bpf)?
                .is_some_and(|v| v.forwarding == forwarding::LOCAL)
            {
                vip.remove(bpf)?;
            }
        }
        let keys: Vec<VipKey> = wanted.iter().map(|(vip, _)| *vip).collect();
        admit_vips(bpf, &keys)?;
        for (vip, value) in wanted.iter().filter(|new| !self.local.contains(new)) {
            vip.write(bpf, *value)?;
        }
        self.local = wanted;
        Ok(())
    }
}

/// How long the first ring waits for the peers' MACs and answers: a listed peer that is not
/// running has failed ARP/ND by then (three probes a second apart).
const FIRST_RING_WAIT: Duration = Duration::from_millis(3500);

/// This host's place among the peers: the peers sorted by address, and which one it is.
struct Place {
    peers: Vec<IpAddr>,
    me: usize,
}

impl Place {
    /// Finds this host among `chance`'s peers by the addresses it has on the interface.
    fn of(chance: &SecondChance) -> anyhow::Result<Place> {
        let interface = &chance.interface;
        let own = interface_addresses(interface)?;
        let mut peers = chance.peers.clone();
        peers.sort();
        match peers.iter().position(|p| own.contains(p)) {
            Some(me) => Ok(Place { peers, me }),
            None => Err(not_among_peers(interface, &peers, &own)),
        }
    }

    fn own_address(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.peers[self.me], port)
    }

    fn others(&self) -> Vec<IpAddr> {
        let me = self.me;
        let others = self.peers.iter().enumerate().filter(move |(i, _)| *i != me);
        others.map(|(_, p)| *p).collect()
    }
}

fn not_among_peers(interface: &str, peers: &[IpAddr], own: &[IpAddr]) -> anyhow::Error {
    let listed: Vec<String> = peers.iter().map(ToString::to_string).collect();
    let mine: Vec<String> = own.iter().map(ToString::to_string).collect();
    anyhow::anyhow!(
        "[announce] peers ({}) lists none of this host's addresses on {interface} ({}): list this host's address on {interface} among the peers, or set the interface the peers' addresses are on",
        listed.join(", "),
        if mine.is_empty() {
            "none".to_string()
        } else {
            mine.join(", ")
        }
    )
}

/// The ring as it stands: this host's place among the peers, the MACs of those that answer the
/// heartbeat now. With `settle` (the first ring, at start), waits up to [`FIRST_RING_WAIT`]
/// for every peer's MAC and answer: a host that joins the others and announces with part of
/// the ring unknown would hand the flows the routers move to it past the very balancer that
/// holds them.
fn ring_now(
    chance: &SecondChance,
    place: &Place,
    settle: bool,
    prober: &mut Prober,
) -> anyhow::Result<(SecondChanceRing, BTreeSet<[u8; 6]>)> {
    let interface = &chance.interface;
    let others = place.others();
    let deadline = Instant::now() + FIRST_RING_WAIT;
    let macs = loop {
        for peer in &others {
            // Also the known ones: a peer that stopped answering then loses its complete entry.
            neighbours::nudge(*peer);
        }
        prober.probe(&others, chance.peer_port);
        let macs = neighbours::table(interface);
        let complete = others
            .iter()
            .all(|peer| macs.contains_key(peer) && prober.alive(peer));
        if !settle || complete || Instant::now() >= deadline {
            break macs;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let usable = |p: &IpAddr| macs.get(p).copied().filter(|_| prober.alive(p));
    let next = successors(&place.peers, place.me, usable);
    // The budget counts every listed balancer, not only those whose MAC this host knows: a
    // host that has just started may know one peer of several, and the peer it hands on to
    // may know the owner (a budget the size of the known ring would stop there).
    let first_ttl = if next.is_empty() {
        0
    } else {
        second_chance::first_ttl(place.peers.len())
    };
    let ring = SecondChanceRing {
        ifindex: ifindex(interface)?,
        first_ttl,
        own_mac: own_mac(interface)?,
        next_mac: next.first().copied().unwrap_or_default(),
    };
    Ok((ring, next.into_iter().collect()))
}

/// The MACs of the peers after `me` in `sorted` order, wrapping, skipping peers whose MAC
/// `mac_of` does not know: the first is where this host hands on.
fn successors(
    sorted: &[IpAddr],
    me: usize,
    mac_of: impl Fn(&IpAddr) -> Option<[u8; 6]>,
) -> Vec<[u8; 6]> {
    let n = sorted.len();
    (1..n)
        .filter_map(|k| mac_of(&sorted[(me + k) % n]))
        .collect()
}

/// Writes the peers' MACs, then the ring (all zero when `wanted` is `None`: off).
pub(super) fn write_ring(
    bpf: &mut Ebpf,
    wanted: Option<&(SecondChanceRing, BTreeSet<[u8; 6]>)>,
    written: Option<&(SecondChanceRing, BTreeSet<[u8; 6]>)>,
) -> anyhow::Result<()> {
    let empty = BTreeSet::new();
    let macs = wanted.map_or(&empty, |(_, macs)| macs);
    let old = written.map_or(&empty, |(_, macs)| macs);
    {
        let mut peer_macs: HashMap<&mut MapData, PeerMac, u32> = HashMap::try_from(
            bpf.map_mut(names::PEER_MACS)
                .context("map PEER_MACS missing")?,
        )?;
        for mac in macs.difference(old) {
            peer_macs
                .insert(peer_key(*mac), 1, 0)
                .context("writing PEER_MACS")?;
        }
        for mac in old.difference(macs) {
            let _ = peer_macs.remove(&peer_key(*mac));
        }
    }
    let mut ring: Array<&mut MapData, SecondChanceRing> = Array::try_from(
        bpf.map_mut(names::SECOND_CHANCE)
            .context("map SECOND_CHANCE missing")?,
    )?;
    let value = wanted.map(|(ring, _)| *ring).unwrap_or_default();
    ring.set(0, value, 0).context("writing SECOND_CHANCE")
}

fn peer_key(mac: [u8; 6]) -> PeerMac {
    PeerMac { mac, _pad: [0; 2] }
}

fn log_ring(chance: Option<&SecondChance>, ring: Option<&(SecondChanceRing, BTreeSet<[u8; 6]>)>) {
    match (chance, ring) {
        (Some(chance), Some((ring, macs))) => info!(
            interface = %chance.interface,
            "second chance: {} other balancer(s) reachable and answering of {} listed; unplaceable packets go to {} with TTL {}",
            macs.len(),
            chance.peers.len() - 1,
            mac_text(ring.next_mac),
            ring.first_ttl
        ),
        _ => info!("second chance: off"),
    }
}

fn mac_text(mac: [u8; 6]) -> String {
    let parts: Vec<String> = mac.iter().map(|b| format!("{b:02x}")).collect();
    parts.join(":")
}

/// `interface`'s own MAC (the source of the frames it hands on), asked of the kernel with
/// `SIOCGIFHWADDR` (this network namespace's, whatever `/sys` shows).
fn own_mac(interface: &str) -> anyhow::Result<[u8; 6]> {
    use nix::libc;
    let name = interface.as_bytes();
    // SAFETY: an all-zero ifreq is valid; the name fits (config: at most 15 bytes).
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.len() >= request.ifr_name.len() {
        bail!("interface name {interface:?} is too long");
    }
    for (to, &from) in request.ifr_name.iter_mut().zip(name) {
        *to = from as libc::c_char;
    }
    // SAFETY: a plain datagram socket, closed when the OwnedFd drops.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        bail!(
            "a socket to ask {interface}'s MAC: {}",
            std::io::Error::last_os_error()
        );
    }
    // SAFETY: fd is a socket this function owns.
    let socket = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let asked = std::os::fd::AsRawFd::as_raw_fd(&socket);
    // SAFETY: SIOCGIFHWADDR fills the ifreq it is given.
    if unsafe { libc::ioctl(asked, libc::SIOCGIFHWADDR, &mut request) } != 0 {
        bail!(
            "{interface}'s MAC (SIOCGIFHWADDR): {}",
            std::io::Error::last_os_error()
        );
    }
    // SAFETY: the kernel wrote ifru_hwaddr.
    let data = unsafe { request.ifr_ifru.ifru_hwaddr.sa_data };
    let mut mac = [0u8; 6];
    for (to, &from) in mac.iter_mut().zip(&data) {
        *to = from as u8;
    }
    Ok(mac)
}

/// The addresses `interface` has (IPv4 and IPv6), from `getifaddrs`.
fn interface_addresses(interface: &str) -> anyhow::Result<Vec<IpAddr>> {
    use nix::libc;
    let mut first: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `first` with a list freed below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut first) } != 0 {
        bail!(
            "listing this host's addresses: {}",
            std::io::Error::last_os_error()
        );
    }
    let mut found = Vec::new();
    let mut entry = first;
    while !entry.is_null() {
        // SAFETY: a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*entry };
        entry = ifa.ifa_next;
        // SAFETY: ifa_name is a NUL-terminated string of the node.
        let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) };
        if ifa.ifa_addr.is_null() || name.to_bytes() != interface.as_bytes() {
            continue;
        }
        // SAFETY: ifa_addr points to a sockaddr of the family it names.
        unsafe {
            match i32::from((*ifa.ifa_addr).sa_family) {
                libc::AF_INET => {
                    let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                    found.push(IpAddr::from(
                        u32::from_be(sin.sin_addr.s_addr).to_be_bytes(),
                    ));
                }
                libc::AF_INET6 => {
                    let sin6 = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                    found.push(IpAddr::from(sin6.sin6_addr.s6_addr));
                }
                _ => {}
            }
        }
    }
    // SAFETY: the list getifaddrs returned, freed once.
    unsafe { libc::freeifaddrs(first) };
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peers(list: &[&str]) -> Vec<IpAddr> {
        let mut peers: Vec<IpAddr> = list.iter().map(|p| p.parse().expect("address")).collect();
        peers.sort();
        peers
    }

    fn mac(last: u8) -> [u8; 6] {
        [2, 0, 0, 0, 0, last]
    }

    /// The peers' MACs by their last octet, `unknown` ones missing.
    fn macs(unknown: &[u8]) -> impl Fn(&IpAddr) -> Option<[u8; 6]> + '_ {
        move |p: &IpAddr| match p {
            IpAddr::V4(v4) if !unknown.contains(&v4.octets()[3]) => Some(mac(v4.octets()[3])),
            _ => None,
        }
    }

    #[test]
    fn each_host_hands_on_to_its_successor_in_address_order_wrapping() {
        // Written out of order: the ring is by address, the same on every host.
        let sorted = peers(&["198.18.0.23", "198.18.0.21", "198.18.0.22"]);
        assert_eq!(successors(&sorted, 0, macs(&[])), [mac(22), mac(23)]);
        assert_eq!(successors(&sorted, 1, macs(&[])), [mac(23), mac(21)]);
        assert_eq!(successors(&sorted, 2, macs(&[])), [mac(21), mac(22)]);
    }

    #[test]
    fn a_peer_without_a_known_mac_is_skipped() {
        let sorted = peers(&["198.18.0.21", "198.18.0.22", "198.18.0.23"]);
        assert_eq!(successors(&sorted, 0, macs(&[22])), [mac(23)]);
        assert_eq!(
            successors(&sorted, 0, macs(&[22, 23])),
            Vec::<[u8; 6]>::new()
        );
    }

    #[test]
    fn the_first_ttl_leaves_one_hop_per_other_balancer() {
        assert_eq!(second_chance::first_ttl(1), 0);
        assert_eq!(second_chance::first_ttl(2), 200);
        assert_eq!(second_chance::first_ttl(3), 201);
        assert_eq!(second_chance::first_ttl(17), 215);
        assert_eq!(second_chance::first_ttl(40), 215);
    }

    #[test]
    fn a_host_not_among_the_peers_is_told_which_addresses_it_has() {
        let chance = SecondChance {
            peers: peers(&["198.18.0.21", "198.18.0.22"]),
            interface: "lo".to_string(),
            peer_port: 9027,
        };
        let error = Place::of(&chance).err().expect("lo has none of the peers");
        let text = format!("{error:#}");
        assert!(text.contains("198.18.0.21, 198.18.0.22"), "{text}");
        assert!(text.contains("127.0.0.1"), "{text}");
    }
}
