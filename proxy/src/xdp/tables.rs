//! Writes services, backends and their selection tables into the XDP program's maps.
//!
//! The tables are the proxy's own: the service's `Selector` builds them over every backend of
//! the config, and the kernel walks them with the same shared selection code, skipping down
//! and drained backends as their states in `SERVICE_BACKENDS` say. So a health, drain or
//! disable change rewrites states only (in the half in use); the backend list and the tables
//! change when the config does: at the first sync of a run, and when a reload changes a
//! service's backends (names, addresses, order), weights, caps or algorithm ([`Layout`]).
//!
//! New flows must never see a half-written table: each service owns two halves of
//! `SERVICE_BACKENDS` and of the Maglev and weighted arrays; the control plane fills the half
//! that is not in use, then flips `table_version` (with the new backend count, table length
//! and algorithm) in one update of the service's `SERVICES` entry. The kernel copies that
//! entry once per packet, so a flow sees either list and table whole. Established flows follow
//! their backend slot, whose `BACKENDS` entry is never cleared: flows of a backend a reload
//! removed go on until they end, and count in its slot until then.
//!
//! A service a reload removed is retired ([`retire_service`]): new SYNs for its VIPs pass to
//! the stack, its established flows go on (IPv4 through its `SERVICE_ROUTES` entry, IPv6
//! through its `SERVICES6` entry marked retired).
//!
//! Two maps spare the kernel hash lookups and must never say less than the maps they stand
//! for: `ADDRESS_FILTER` gets a VIP's or backend's bit before its `SERVICES` key or `BACKENDS`
//! entry is written (and keeps it), and a service's `SERVICE_ROUTES` entry is written after its
//! `SERVICES` entry, with the same key and forwarding. (Both serve the IPv4 path only.)
//!
//! A service listening on an IPv4 and an IPv6 VIP has one entry per VIP (in `SERVICES` and
//! `SERVICES6`), with the same value: one index, one set of backends, tables and counts.

use std::net::{IpAddr, SocketAddr};

use anyhow::{Context, bail};
use aya::Ebpf;
use aya::maps::{Array, HashMap, MapData};
use switchyard_common::maps::{
    BackendEntry, BackendEntry6, PROTO_TCP, ServiceBackend, ServiceKey, ServiceKey6, ServiceRoute,
    ServiceValue, WEIGHTED_TABLE_SIZE, address_filter, algorithm, forwarding, maglev_index, names,
    service_backend_index, service_flags, weighted_index,
};
use switchyard_common::{MAGLEV_TABLE_SIZE, MAX_BACKENDS};

use crate::config::{Algorithm, Forwarding};
use crate::state::Service;

/// A VIP as the program looks it up: in `SERVICES` (IPv4) or `SERVICES6` (IPv6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VipKey {
    V4(ServiceKey),
    V6(ServiceKey6),
}

impl VipKey {
    pub fn of(address: SocketAddr) -> VipKey {
        let port = address.port().to_be();
        match address.ip() {
            IpAddr::V4(ip) => VipKey::V4(ServiceKey {
                addr: u32::from_ne_bytes(ip.octets()),
                port,
                proto: PROTO_TCP,
                _pad: 0,
            }),
            IpAddr::V6(ip) => VipKey::V6(ServiceKey6 {
                addr: words(ip.octets()),
                port,
                proto: PROTO_TCP,
                _pad: 0,
            }),
        }
    }

    /// The service's current entry under this VIP, if it has one.
    pub(super) fn read(&self, bpf: &Ebpf) -> anyhow::Result<Option<ServiceValue>> {
        Ok(match self {
            VipKey::V4(key) => services::<ServiceKey>(bpf, names::SERVICES)?
                .get(key, 0)
                .ok(),
            VipKey::V6(key) => services::<ServiceKey6>(bpf, names::SERVICES6)?
                .get(key, 0)
                .ok(),
        })
    }

    pub(super) fn write(&self, bpf: &mut Ebpf, value: ServiceValue) -> anyhow::Result<()> {
        match self {
            VipKey::V4(key) => {
                services_mut::<ServiceKey>(bpf, names::SERVICES)?.insert(key, value, 0)
            }
            VipKey::V6(key) => {
                services_mut::<ServiceKey6>(bpf, names::SERVICES6)?.insert(key, value, 0)
            }
        }
        .context("writing the service entry")
    }

    /// Deletes the entry (gone already is fine: only the sync task writes it).
    pub(super) fn remove(&self, bpf: &mut Ebpf) -> anyhow::Result<()> {
        match self {
            VipKey::V4(key) => {
                let _ = services_mut::<ServiceKey>(bpf, names::SERVICES)?.remove(key);
            }
            VipKey::V6(key) => {
                let _ = services_mut::<ServiceKey6>(bpf, names::SERVICES6)?.remove(key);
            }
        }
        Ok(())
    }
}

/// An IPv6 address's 32-bit words as the program reads them from the packet.
pub fn words(octets: [u8; 16]) -> [u32; 4] {
    let word =
        |i: usize| u32::from_ne_bytes([octets[i], octets[i + 1], octets[i + 2], octets[i + 3]]);
    [word(0), word(4), word(8), word(12)]
}

fn services<'a, K: aya::Pod>(
    bpf: &'a Ebpf,
    name: &str,
) -> anyhow::Result<HashMap<&'a MapData, K, ServiceValue>> {
    let map = bpf
        .map(name)
        .with_context(|| format!("map {name} missing"))?;
    Ok(HashMap::try_from(map)?)
}

fn services_mut<'a, K: aya::Pod>(
    bpf: &'a mut Ebpf,
    name: &str,
) -> anyhow::Result<HashMap<&'a mut MapData, K, ServiceValue>> {
    let map = bpf
        .map_mut(name)
        .with_context(|| format!("map {name} missing"))?;
    Ok(HashMap::try_from(map)?)
}

pub fn algorithm_code(algorithm: Algorithm) -> anyhow::Result<u32> {
    Ok(match algorithm {
        Algorithm::RoundRobin => algorithm::ROUND_ROBIN,
        Algorithm::WeightedRoundRobin => algorithm::WEIGHTED_ROUND_ROBIN,
        Algorithm::LeastConn => algorithm::LEAST_CONN,
        Algorithm::IpHash => algorithm::IP_HASH,
        Algorithm::LeastTime => bail!("least_time is not available in the XDP fast path"),
    })
}

/// What the kernel may do with each backend right now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendStates {
    /// One of `backend_state::*` per backend of the service, in config order.
    pub states: Vec<u32>,
    /// Known MACs (dsr), in config order; zero when unknown or not needed.
    pub macs: Vec<[u8; 6]>,
    /// The backends' names, in config order.
    pub names: Vec<String>,
}

impl BackendStates {
    /// The state written for the backend called `name`, if it was one.
    pub fn state_of(&self, name: &str) -> Option<u32> {
        let i = self.names.iter().position(|n| n == name)?;
        self.states.get(i).copied()
    }
}

/// What the kernel's choice among a service's backends is built from: the algorithm and, per
/// backend in config order, its name (Maglev hashes it), slot, weight and cap. The selector's
/// table is a function of these, so when they are unchanged the tables are too.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    algorithm: u32,
    backends: Vec<(String, u32, u32, u32, u32)>,
}

impl Layout {
    pub fn of(service: &Service) -> anyhow::Result<Layout> {
        Ok(Layout {
            algorithm: algorithm_code(service.config.algorithm)?,
            backends: service
                .backends
                .iter()
                .map(|b| {
                    (
                        b.config.name.clone(),
                        b.active.slot() as u32,
                        b.config.weight,
                        b.config.max_connections,
                        b.config.max_session_rate,
                    )
                })
                .collect(),
        })
    }
}

/// What the sync last wrote for one service: compared with the running state at every sync.
#[derive(Clone, Debug)]
pub struct Programmed {
    pub layout: Layout,
    pub states: BackendStates,
    /// The half of `SERVICE_BACKENDS` and the tables that new flows read.
    pub version: u32,
    /// The service's entry, under each of its VIPs.
    pub value: ServiceValue,
    pub vips: Vec<VipKey>,
}

/// Writes every backend entry of `service`, and its backend list and tables: into the half in
/// use when only the backends' states changed since `previous`, otherwise (the first sync of a
/// run, a new service, a reload that changed the backends, their weights or caps, or the
/// algorithm) into the half not in use, then flips the service entry of each VIP to it in one
/// update. Returns what it wrote; errors name the map that failed.
pub fn program_service(
    bpf: &mut Ebpf,
    index: u32,
    service: &Service,
    states: &BackendStates,
    previous: Option<&Programmed>,
    flags: u32,
) -> anyhow::Result<Programmed> {
    let xdp = service
        .config
        .xdp
        .as_ref()
        .context("service has no [service.xdp] table")?;
    if service.backends.len() > MAX_BACKENDS {
        bail!("the XDP fast path takes at most {MAX_BACKENDS} backends per service");
    }
    let vips: Vec<VipKey> = service
        .config
        .listen
        .iter()
        .map(|&a| VipKey::of(a))
        .collect();
    let first_vip = vips.first().context("service has no VIP")?;
    write_backends(bpf, service, xdp.forwarding, states)?;
    let layout = Layout::of(service)?;
    let current = first_vip.read(bpf)?;
    if let Some(previous) = previous
        && previous.layout == layout
        && previous.value.flags == flags
        && current.is_some()
    {
        write_policies(bpf, index, previous.version, service, states)?;
        return Ok(Programmed {
            states: states.clone(),
            ..previous.clone()
        });
    }
    let version = current.map_or(0, |c| c.table_version ^ 1);
    write_policies(bpf, index, version, service, states)?;
    admit_vips(bpf, &vips)?;
    let weighted_len = write_tables(bpf, index, version, service)?;
    let value = ServiceValue {
        index,
        algorithm: layout.algorithm,
        forwarding: match xdp.forwarding {
            Forwarding::Dsr => forwarding::DSR,
            Forwarding::Nat => forwarding::NAT,
        },
        backend_count: service.backends.len() as u32,
        table_version: version,
        weighted_len,
        flags,
    };
    for vip in &vips {
        vip.write(bpf, value)?;
        if let VipKey::V4(key) = vip {
            write_route(bpf, index, *key, value.forwarding)?;
        }
    }
    Ok(Programmed {
        layout,
        states: states.clone(),
        version,
        value,
        vips,
    })
}

/// A service that left the config: new SYNs for its VIPs pass to the stack, its established
/// flows go on to their backends until they end (their `BACKENDS` entries stay). An IPv4 VIP's
/// `SERVICES` entry is deleted (the flows find their service through its `SERVICE_ROUTES`
/// entry, which stays: its index is never given to another service); an IPv6 VIP's entry stays,
/// marked retired (the IPv6 path finds a flow's service by its VIP). A VIP another service
/// has taken over meanwhile is left to it.
pub fn retire_service(bpf: &mut Ebpf, programmed: &Programmed) -> anyhow::Result<()> {
    for vip in &programmed.vips {
        let Some(current) = vip.read(bpf)? else {
            continue;
        };
        if current.index != programmed.value.index {
            continue;
        }
        match vip {
            VipKey::V4(key) => {
                // Gone already (a race with nothing: only this task writes it) is fine.
                let _ = services_mut::<ServiceKey>(bpf, names::SERVICES)?.remove(key);
            }
            VipKey::V6(_) => vip.write(
                bpf,
                ServiceValue {
                    flags: current.flags | service_flags::RETIRED,
                    ..current
                },
            )?,
        }
    }
    Ok(())
}

/// The `BACKENDS` (and `BACKENDS6`) entries of the service's backends, each after its address
/// filter bit. Entries are never cleared: flows of a backend that left the config still follow
/// its entry until they end.
fn write_backends(
    bpf: &mut Ebpf,
    service: &Service,
    forwarding_mode: Forwarding,
    states: &BackendStates,
) -> anyhow::Result<()> {
    let [Some(filter), Some(backends), Some(backends6)] =
        bpf.maps_disjoint_mut([names::ADDRESS_FILTER, names::BACKENDS, names::BACKENDS6])
    else {
        bail!("map ADDRESS_FILTER, BACKENDS or BACKENDS6 missing");
    };
    let mut filter: Array<&mut MapData, u64> = Array::try_from(filter)?;
    let mut backends: Array<&mut MapData, BackendEntry> = Array::try_from(backends)?;
    let mut backends6: Array<&mut MapData, BackendEntry6> = Array::try_from(backends6)?;
    for (i, backend) in service.backends.iter().enumerate() {
        // dsr needs the MAC: while it is unknown the backend takes no new flows, and the
        // entry keeps the MAC it had (a pinned run's, or an earlier lookup's), so that
        // established flows go on.
        if forwarding_mode == Forwarding::Dsr && states.macs[i] == [0; 6] {
            continue;
        }
        let slot = backend.active.slot() as u32;
        let address = backend.config.address;
        let entry = BackendEntry {
            // nat rewrites IPv4 flows to it; an IPv6 backend's address is in
            // `BACKENDS6` (dsr needs the MAC alone).
            addr: match address.ip() {
                IpAddr::V4(ip) => u32::from_ne_bytes(ip.octets()),
                IpAddr::V6(_) => 0,
            },
            port: address.port().to_be(),
            mac: states.macs[i],
            ifindex: 0,
        };
        address_filter::admit(
            &mut filter,
            address_filter::BACKENDS,
            entry.addr,
            entry.port,
        )
        .context("writing the address filter")?;
        let context = || format!("writing backend {:?} (slot {slot})", backend.config.name);
        if let IpAddr::V6(ip) = address.ip() {
            // Before `BACKENDS`: by then nat can rewrite IPv6 flows to the slot.
            let entry6 = BackendEntry6 {
                addr: words(ip.octets()),
                port: entry.port,
                _pad: 0,
            };
            backends6.set(slot, entry6, 0).with_context(context)?;
        }
        backends.set(slot, entry, 0).with_context(context)?;
    }
    Ok(())
}

/// The service's backend list (slot, weight, cap, state) in half `version` of
/// `SERVICE_BACKENDS`.
fn write_policies(
    bpf: &mut Ebpf,
    index: u32,
    version: u32,
    service: &Service,
    states: &BackendStates,
) -> anyhow::Result<()> {
    let mut policies: Array<&mut MapData, ServiceBackend> = Array::try_from(
        bpf.map_mut(names::SERVICE_BACKENDS)
            .context("map SERVICE_BACKENDS missing")?,
    )?;
    for (i, backend) in service.backends.iter().enumerate() {
        let (rate_interval_ns, rate_tolerance_ns) = backend
            .session_rate()
            .map_or((0, 0), |rate| (rate.interval(), rate.tolerance()));
        let entry = ServiceBackend {
            slot: backend.active.slot() as u32,
            weight: backend.config.weight,
            max_connections: backend.config.max_connections,
            state: states.states[i],
            rate_interval_ns,
            rate_tolerance_ns,
        };
        policies
            .set(service_backend_index(index, version, i as u32), entry, 0)
            .with_context(|| format!("writing backend {:?} of the service", backend.config.name))?;
    }
    Ok(())
}

/// The filter bits of a service's IPv4 VIPs, set before their `SERVICES` entries are written.
pub(super) fn admit_vips(bpf: &mut Ebpf, vips: &[VipKey]) -> anyhow::Result<()> {
    let mut filter: Array<&mut MapData, u64> = Array::try_from(
        bpf.map_mut(names::ADDRESS_FILTER)
            .context("map ADDRESS_FILTER missing")?,
    )?;
    for vip in vips {
        if let VipKey::V4(key) = vip {
            address_filter::admit(&mut filter, address_filter::VIPS, key.addr, key.port)
                .context("writing the address filter")?;
        }
    }
    Ok(())
}

/// The route of the service at `index` (its IPv4 VIP and forwarding), written after its
/// `SERVICES` entry.
fn write_route(bpf: &mut Ebpf, index: u32, key: ServiceKey, forwarding: u32) -> anyhow::Result<()> {
    let mut routes: Array<&mut MapData, ServiceRoute> = Array::try_from(
        bpf.map_mut(names::SERVICE_ROUTES)
            .context("map SERVICE_ROUTES missing")?,
    )?;
    let route = ServiceRoute {
        vip: key,
        forwarding,
        _pad: 0,
    };
    routes
        .set(index, route, 0)
        .context("writing the service route")
}

/// Before a run's first sync: forgets the routes (pinned ones are an earlier run's, whose
/// service indexes may differ: the kernel takes the `SERVICES` way until this run writes its
/// own) and sets the filter bits of every `SERVICES` key and `BACKENDS` entry already there
/// (pinned maps of an earlier run may hold entries this run does not write, and the kernel
/// still follows them).
pub fn prepare_first_sync(bpf: &mut Ebpf) -> anyhow::Result<()> {
    let mut routes: Array<&mut MapData, ServiceRoute> = Array::try_from(
        bpf.map_mut(names::SERVICE_ROUTES)
            .context("map SERVICE_ROUTES missing")?,
    )?;
    for index in 0..routes.len() {
        routes
            .set(index, ServiceRoute::default(), 0)
            .context("clearing the service routes")?;
    }
    admit_existing(bpf)
}

fn admit_existing(bpf: &mut Ebpf) -> anyhow::Result<()> {
    let mut addresses = Vec::new();
    let services: HashMap<&MapData, ServiceKey, ServiceValue> =
        HashMap::try_from(bpf.map(names::SERVICES).context("map SERVICES missing")?)?;
    for key in services.keys() {
        let key = key.context("reading the SERVICES keys")?;
        addresses.push((address_filter::VIPS, key.addr, key.port));
    }
    let backends: Array<&MapData, BackendEntry> =
        Array::try_from(bpf.map(names::BACKENDS).context("map BACKENDS missing")?)?;
    for entry in backends.iter() {
        let entry = entry.context("reading BACKENDS")?;
        if entry != BackendEntry::default() {
            addresses.push((address_filter::BACKENDS, entry.addr, entry.port));
        }
    }
    let mut filter: Array<&mut MapData, u64> = Array::try_from(
        bpf.map_mut(names::ADDRESS_FILTER)
            .context("map ADDRESS_FILTER missing")?,
    )?;
    for (half, addr, port) in addresses {
        address_filter::admit(&mut filter, half, addr, port)
            .context("writing the address filter")?;
    }
    Ok(())
}

/// Fills half `version` of the service's tables with the selector's table; returns the
/// weighted table's length (0 for other algorithms).
fn write_tables(
    bpf: &mut Ebpf,
    index: u32,
    version: u32,
    service: &Service,
) -> anyhow::Result<u32> {
    let table = service.selector.table();
    match service.config.algorithm {
        Algorithm::IpHash => {
            let mut map: Array<&mut MapData, u32> =
                Array::try_from(bpf.map_mut(names::MAGLEV).context("map MAGLEV missing")?)?;
            for slot in 0..MAGLEV_TABLE_SIZE as u32 {
                // An empty table (no backends) points nowhere valid: nothing is chosen.
                let backend = table.get(slot as usize).map_or(u32::MAX, |&b| u32::from(b));
                map.set(
                    maglev_index(index, version, MAGLEV_TABLE_SIZE as u32, slot),
                    backend,
                    0,
                )
                .context("writing the Maglev table")?;
            }
            Ok(0)
        }
        Algorithm::WeightedRoundRobin => {
            let len = (table.len() as u32).min(WEIGHTED_TABLE_SIZE);
            let mut map: Array<&mut MapData, u32> = Array::try_from(
                bpf.map_mut(names::WEIGHTED)
                    .context("map WEIGHTED missing")?,
            )?;
            for position in 0..len {
                map.set(
                    weighted_index(index, version, WEIGHTED_TABLE_SIZE, position),
                    u32::from(table[position as usize]),
                    0,
                )
                .context("writing the weighted table")?;
            }
            Ok(len)
        }
        Algorithm::RoundRobin | Algorithm::LeastConn | Algorithm::LeastTime => Ok(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Snapshot;
    use crate::xdp::XdpPlane;
    use crate::xdp::loader::KernelSync;
    use crate::xdp::tests::{config, own_network_namespace_with_forwarding, require};

    /// Two nat services (backends are written without a MAC) and a proxy-only one, whose index
    /// has a `SERVICE_ROUTES` entry that no sync writes.
    const CONFIG: &str = r#"
[[service]]
name = "sy-routes-a"
listen = "198.18.0.100:25"
dataplane = "xdp"
[service.xdp]
interface = "lo"
forwarding = "nat"
flow_table_size = 1024
[[service.backend]]
name = "a1"
address = "198.18.1.11:25"
[[service.backend]]
name = "a2"
address = "198.18.1.12:2525"

[[service]]
name = "sy-routes-b"
listen = "198.18.0.101:587"
dataplane = "xdp"
[service.xdp]
interface = "lo"
forwarding = "nat"
flow_table_size = 1024
[[service.backend]]
name = "b1"
address = "198.18.1.21:587"

[[service]]
name = "sy-routes-proxy"
listen = "127.0.0.1:2599"
[[service.backend]]
name = "p1"
address = "127.0.0.1:2598"
"#;

    /// The `SERVICES` key of an IPv4 VIP (or a backend's address in the same form).
    fn service_key(address: SocketAddr) -> anyhow::Result<ServiceKey> {
        match VipKey::of(address) {
            VipKey::V4(key) => Ok(key),
            VipKey::V6(_) => bail!("{address} is an IPv6 address: its key is in SERVICES6"),
        }
    }

    fn filter_has(bpf: &Ebpf, half: u32, addr: u32, port: u16) -> bool {
        let filter: Array<&MapData, u64> =
            Array::try_from(bpf.map(names::ADDRESS_FILTER).expect("ADDRESS_FILTER")).unwrap();
        let (word, bit) = address_filter::bit(half, addr, port);
        filter.get(&word, 0).expect("filter word") & bit != 0
    }

    /// The kernel skips hash lookups on what these maps say, so they must say at least what
    /// `SERVICES` and `BACKENDS` say: every VIP and backend has its bit (also entries an
    /// earlier run left in pinned maps), and each route is its service's key and forwarding;
    /// a route an earlier run left at an index this run does not write is gone.
    #[test]
    fn the_filter_and_the_routes_say_what_services_and_backends_say() {
        if !require() {
            return;
        }
        own_network_namespace_with_forwarding();
        let config = config(CONFIG);
        let plane = XdpPlane::load(&config).unwrap_or_else(|e| panic!("{e:#}"));
        let snapshot = Snapshot::build(&config, &plane.counters()).expect("snapshot");
        let mut bpf = plane.ebpf().lock();
        let earlier = service_key("198.18.0.200:25".parse().unwrap()).unwrap();
        {
            let mut services: HashMap<&mut MapData, ServiceKey, ServiceValue> =
                HashMap::try_from(bpf.map_mut(names::SERVICES).unwrap()).unwrap();
            services
                .insert(earlier, ServiceValue::default(), 0)
                .unwrap();
            let mut routes: Array<&mut MapData, ServiceRoute> =
                Array::try_from(bpf.map_mut(names::SERVICE_ROUTES).unwrap()).unwrap();
            let stale = ServiceRoute {
                vip: earlier,
                forwarding: forwarding::NAT,
                _pad: 0,
            };
            routes.set(2, stale, 0).unwrap();
        }
        KernelSync::default()
            .run(&mut bpf, &snapshot, true)
            .unwrap_or_else(|e| panic!("{e:#}"));

        assert!(filter_has(
            &bpf,
            address_filter::VIPS,
            earlier.addr,
            earlier.port
        ));
        let routes: Array<&MapData, ServiceRoute> =
            Array::try_from(bpf.map(names::SERVICE_ROUTES).unwrap()).unwrap();
        for (index, service) in snapshot.services.iter().enumerate().take(2) {
            let key = service_key(service.config.listen[0]).unwrap();
            assert!(filter_has(&bpf, address_filter::VIPS, key.addr, key.port));
            let route = routes.get(&(index as u32), 0).unwrap();
            assert_eq!((route.vip, route.forwarding), (key, forwarding::NAT));
            for backend in &service.backends {
                let entry = service_key(backend.config.address).unwrap();
                assert!(
                    filter_has(&bpf, address_filter::BACKENDS, entry.addr, entry.port),
                    "{}",
                    backend.config.address
                );
            }
        }
        assert_eq!(routes.get(&2, 0).unwrap(), ServiceRoute::default());
        drop(bpf);
        plane.shutdown();
    }
}
