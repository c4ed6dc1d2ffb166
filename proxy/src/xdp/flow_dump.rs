//! `ctl flows`: the kernel's flow tables (`FLOWS`, `FLOWS6`) read from userspace, each flow
//! named by the running state (service, backend) and timed against the clock the kernel stamps
//! flows with.
//!
//! The reader has handles of its own on the two maps (duplicated descriptors), so a dump takes
//! no lock the sync task holds; it walks each table once (bounded, like expiry's walk) and
//! keeps only the `limit` least idle flows, so its memory is bounded by the limit, not by the
//! table. Map reads are system calls: call it off the async runtime (`spawn_blocking`).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsFd;

use anyhow::Context;
use aya::Ebpf;
use aya::maps::{HashMap, Map, MapData};
use switchyard_common::maps::{FlowKey, FlowKey6, FlowValue, flow_ended, flow_flags, names};

use super::flows::monotonic_ns;
use crate::control::{FlowReport, FlowsReport};
use crate::state::{Service, Snapshot};

/// Handles on the two flow tables, for dumps.
pub struct FlowReader {
    v4: HashMap<MapData, FlowKey, FlowValue>,
    v6: HashMap<MapData, FlowKey6, FlowValue>,
    /// Bounds each walk (a key deleted under the iterator restarts it).
    walk_limit: usize,
}

impl FlowReader {
    /// Opens the flow tables of the loaded object through duplicates of their descriptors.
    pub fn open(bpf: &Ebpf) -> anyhow::Result<FlowReader> {
        let (v4, capacity) = duplicate(bpf, names::FLOWS)?;
        let (v6, _) = duplicate(bpf, names::FLOWS6)?;
        Ok(FlowReader {
            v4: HashMap::try_from(v4)?,
            v6: HashMap::try_from(v6)?,
            walk_limit: (capacity as usize).saturating_mul(2).max(1024),
        })
    }

    /// The `limit` least idle flows of `service` (every service when `None`), least idle
    /// first, named from `snapshot`, with the number of flows that matched.
    pub fn dump(&self, snapshot: &Snapshot, service: Option<u32>, limit: usize) -> FlowsReport {
        let now = monotonic_ns();
        let mut kept = Kept::new(limit);
        let wanted = |flow: &FlowValue| service.is_none_or(|index| flow.service == index);
        for (key, flow) in self.v4.iter().take(self.walk_limit).filter_map(Result::ok) {
            if wanted(&flow) {
                kept.offer(now, flow, Client::V4(key));
            }
        }
        for (key, flow) in self.v6.iter().take(self.walk_limit).filter_map(Result::ok) {
            if wanted(&flow) {
                kept.offer(now, flow, Client::V6(key));
            }
        }
        let matched = kept.matched;
        let mut flows: Vec<_> = kept.heap.into_vec();
        flows.sort_unstable_by_key(|k| k.idle_ns);
        FlowsReport {
            matched,
            flows: flows
                .into_iter()
                .map(|k| report(snapshot, now, &k.flow, &k.client))
                .collect(),
        }
    }
}

/// A new handle on map `name` of `bpf`, and the map's capacity.
fn duplicate(bpf: &Ebpf, name: &str) -> anyhow::Result<(Map, u32)> {
    let map = bpf
        .map(name)
        .with_context(|| format!("map {name} missing"))?;
    let data = match map {
        Map::LruHashMap(data) | Map::HashMap(data) => data,
        _ => anyhow::bail!("map {name} is not a hash map"),
    };
    let fd = data
        .fd()
        .as_fd()
        .try_clone_to_owned()
        .with_context(|| format!("duplicating the {name} map fd"))?;
    let capacity = data
        .info()
        .with_context(|| format!("reading the {name} map's size"))?
        .max_entries();
    Ok((Map::LruHashMap(MapData::from_fd(fd)?), capacity))
}

/// A flow's key in either table.
enum Client {
    V4(FlowKey),
    V6(FlowKey6),
}

impl Client {
    /// (client, VIP) as socket addresses.
    fn addresses(&self) -> (SocketAddr, SocketAddr) {
        match self {
            Client::V4(key) => (
                v4(key.src_addr, key.src_port),
                v4(key.dst_addr, key.dst_port),
            ),
            Client::V6(key) => (
                v6(key.src_addr, key.src_port),
                v6(key.dst_addr, key.dst_port),
            ),
        }
    }
}

/// Addresses and ports lie in the maps in network byte order, as in the packet.
fn v4(addr: u32, port: u16) -> SocketAddr {
    SocketAddr::new(
        IpAddr::V4(Ipv4Addr::from(addr.to_ne_bytes())),
        u16::from_be(port),
    )
}

fn v6(words: [u32; 4], port: u16) -> SocketAddr {
    let mut bytes = [0u8; 16];
    for (chunk, word) in bytes.chunks_exact_mut(4).zip(words) {
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    SocketAddr::new(IpAddr::V6(Ipv6Addr::from(bytes)), u16::from_be(port))
}

/// One flow kept for the report, ordered by idle time (the heap drops the idlest).
struct KeptFlow {
    idle_ns: u64,
    flow: FlowValue,
    client: Client,
}

impl PartialEq for KeptFlow {
    fn eq(&self, other: &Self) -> bool {
        self.idle_ns == other.idle_ns
    }
}
impl Eq for KeptFlow {}
impl PartialOrd for KeptFlow {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for KeptFlow {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.idle_ns.cmp(&other.idle_ns)
    }
}

/// The `limit` least idle flows seen so far (a max-heap by idle time), and how many were seen.
struct Kept {
    heap: BinaryHeap<KeptFlow>,
    limit: usize,
    matched: u64,
}

impl Kept {
    fn new(limit: usize) -> Kept {
        Kept {
            heap: BinaryHeap::with_capacity(limit.min(4096)),
            limit,
            matched: 0,
        }
    }

    fn offer(&mut self, now: u64, flow: FlowValue, client: Client) {
        self.matched += 1;
        let candidate = KeptFlow {
            idle_ns: now.saturating_sub(flow.last_seen_ns),
            flow,
            client,
        };
        if self.heap.len() < self.limit {
            self.heap.push(candidate);
        } else if let Some(mut idlest) = self.heap.peek_mut()
            && Reverse(candidate.idle_ns) > Reverse(idlest.idle_ns)
        {
            *idlest = candidate;
        }
    }
}

fn report(snapshot: &Snapshot, now: u64, flow: &FlowValue, client: &Client) -> FlowReport {
    let (client, vip) = client.addresses();
    let service = snapshot
        .services
        .iter()
        .find(|s| s.config.xdp.is_some() && s.kernel_index == flow.service);
    let backend = service.and_then(|s| backend_on_slot(s, flow.backend as usize));
    FlowReport {
        service: service.map_or_else(|| "-".to_owned(), |s| s.config.name.clone()),
        client: client.to_string(),
        vip: vip.to_string(),
        backend: backend.map_or_else(
            || format!("slot {}", flow.backend),
            |b| b.config.name.clone(),
        ),
        backend_address: backend.map_or_else(String::new, |b| b.config.address.to_string()),
        state: state(flow.flags).to_owned(),
        age_ms: now.saturating_sub(flow.created_ns) / 1_000_000,
        idle_ms: now.saturating_sub(flow.last_seen_ns) / 1_000_000,
        packets: flow.packets,
    }
}

fn backend_on_slot(service: &Service, slot: usize) -> Option<&crate::state::Backend> {
    service
        .backends
        .iter()
        .find(|b| b.active.slot() == slot)
        .map(|b| b.as_ref())
}

/// A flow's stage, from its flags (see `flow_flags`).
fn state(flags: u64) -> &'static str {
    if flow_ended(flags) {
        "ended"
    } else if flags & flow_flags::CLOSED != 0 {
        "closing"
    } else if flags & flow_flags::ESTABLISHED != 0 {
        "established"
    } else {
        "handshake"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(last_seen_ns: u64) -> FlowValue {
        FlowValue {
            last_seen_ns,
            ..FlowValue::default()
        }
    }

    #[test]
    fn keeps_the_least_idle_flows_up_to_the_limit_and_counts_all() {
        let mut kept = Kept::new(2);
        for last_seen in [10, 50, 30, 40, 20] {
            kept.offer(100, flow(last_seen), Client::V4(FlowKey::default()));
        }
        assert_eq!(kept.matched, 5);
        let mut idle: Vec<u64> = kept.heap.into_iter().map(|k| k.idle_ns).collect();
        idle.sort_unstable();
        assert_eq!(idle, [50, 60]);
    }

    #[test]
    fn addresses_read_in_network_byte_order() {
        let key = FlowKey {
            src_addr: u32::from_ne_bytes([198, 18, 0, 1]),
            dst_addr: u32::from_ne_bytes([198, 18, 0, 100]),
            src_port: 40000u16.to_be(),
            dst_port: 25u16.to_be(),
            ..FlowKey::default()
        };
        let (client, vip) = Client::V4(key).addresses();
        assert_eq!(client.to_string(), "198.18.0.1:40000");
        assert_eq!(vip.to_string(), "198.18.0.100:25");
        let mut words = [0u32; 4];
        words[0] = u32::from_ne_bytes([0x20, 0x01, 0, 2]);
        words[3] = u32::from_ne_bytes([0, 0, 0, 0x11]);
        assert_eq!(v6(words, 25u16.to_be()).to_string(), "[2001:2::11]:25");
    }

    #[test]
    fn states_follow_the_flags() {
        use flow_flags::*;
        assert_eq!(state(COUNTED), "handshake");
        assert_eq!(state(COUNTED | ESTABLISHED), "established");
        assert_eq!(
            state(COUNTED | ESTABLISHED | CLIENT_FIN | CLOSED),
            "closing"
        );
        assert_eq!(state(COUNTED | CLOSED | RESET), "ended");
    }
}
