//! Writes services, backends and their selection tables into the XDP program's maps.
//!
//! The tables are the proxy's own: the service's `Selector` builds them over every backend of
//! the config, and the kernel walks them with the same shared selection code, skipping down
//! and drained backends as their states in `SERVICE_BACKENDS` say. So a health change rewrites
//! states only; tables change with the config, at the first sync of a run.
//!
//! New flows must never see a half-written table: each service owns two halves of the Maglev
//! and weighted arrays, the control plane fills the half that is not in use, then flips
//! `table_version` (with the new table length) in one update of the service's `SERVICES`
//! entry. The kernel copies that entry once per packet, so a flow sees either table whole.
//!
//! A service listening on an IPv4 and an IPv6 VIP has one entry per VIP (in `SERVICES` and
//! `SERVICES6`), with the same value: one index, one set of backends, tables and counts.

use std::net::{IpAddr, SocketAddr};

use anyhow::{Context, bail};
use aya::Ebpf;
use aya::maps::{Array, HashMap, MapData};
use switchyard_common::MAGLEV_TABLE_SIZE;
use switchyard_common::maps::{
    BackendEntry, PROTO_TCP, ServiceBackend, ServiceKey, ServiceKey6, ServiceValue,
    WEIGHTED_TABLE_SIZE, algorithm, forwarding, maglev_index, names, service_backend_index,
    weighted_index,
};

use crate::config::{Algorithm, Forwarding};
use crate::state::Service;

/// A VIP as the program looks it up: in `SERVICES` (IPv4) or `SERVICES6` (IPv6).
#[derive(Clone, Copy, Debug)]
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
    fn read(&self, bpf: &Ebpf) -> anyhow::Result<Option<ServiceValue>> {
        Ok(match self {
            VipKey::V4(key) => services::<ServiceKey>(bpf, names::SERVICES)?
                .get(key, 0)
                .ok(),
            VipKey::V6(key) => services::<ServiceKey6>(bpf, names::SERVICES6)?
                .get(key, 0)
                .ok(),
        })
    }

    fn write(&self, bpf: &mut Ebpf, value: ServiceValue) -> anyhow::Result<()> {
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
}

/// Writes every backend entry of `service` and, at the first sync of a run (no `previous`
/// states) or when the service has no entry yet, its tables and service entry. Errors name the
/// map that failed.
pub fn program_service(
    bpf: &mut Ebpf,
    index: u32,
    service: &Service,
    states: &BackendStates,
    previous: Option<&BackendStates>,
) -> anyhow::Result<()> {
    let xdp = service
        .config
        .xdp
        .as_ref()
        .context("service has no [service.xdp] table")?;
    let vips: Vec<VipKey> = service
        .config
        .listen
        .iter()
        .map(|&a| VipKey::of(a))
        .collect();
    let first_vip = vips.first().context("service has no VIP")?;
    {
        let mut backends: Array<&mut MapData, BackendEntry> = Array::try_from(
            bpf.map_mut(names::BACKENDS)
                .context("map BACKENDS missing")?,
        )?;
        for (i, backend) in service.backends.iter().enumerate() {
            // dsr needs the MAC: while it is unknown the backend takes no new flows, and the
            // entry keeps the MAC it had (a pinned run's, or an earlier lookup's), so that
            // established flows go on.
            if xdp.forwarding == Forwarding::Dsr && states.macs[i] == [0; 6] {
                continue;
            }
            let slot = backend.active.slot() as u32;
            let address = backend.config.address;
            let entry = BackendEntry {
                // nat rewrites to it (IPv4 only); dsr needs the MAC alone, so an IPv6
                // backend's entry carries no address.
                addr: match address.ip() {
                    IpAddr::V4(ip) => u32::from_ne_bytes(ip.octets()),
                    IpAddr::V6(_) => 0,
                },
                port: address.port().to_be(),
                mac: states.macs[i],
                ifindex: 0,
            };
            backends.set(slot, entry, 0).with_context(|| {
                format!("writing backend {:?} (slot {slot})", backend.config.name)
            })?;
        }
    }
    {
        let mut policies: Array<&mut MapData, ServiceBackend> = Array::try_from(
            bpf.map_mut(names::SERVICE_BACKENDS)
                .context("map SERVICE_BACKENDS missing")?,
        )?;
        for (i, backend) in service.backends.iter().enumerate() {
            let entry = ServiceBackend {
                slot: backend.active.slot() as u32,
                weight: backend.config.weight,
                max_connections: backend.config.max_connections,
                state: states.states[i],
            };
            policies
                .set(service_backend_index(index, i as u32), entry, 0)
                .with_context(|| {
                    format!("writing backend {:?} of the service", backend.config.name)
                })?;
        }
    }

    let current = first_vip.read(bpf)?;
    if previous.is_some() && current.is_some() {
        return Ok(());
    }
    let version = current.map_or(0, |c| c.table_version ^ 1);
    let weighted_len = write_tables(bpf, index, version, service)?;
    let value = ServiceValue {
        index,
        algorithm: algorithm_code(service.config.algorithm)?,
        forwarding: match xdp.forwarding {
            Forwarding::Dsr => forwarding::DSR,
            Forwarding::Nat => forwarding::NAT,
        },
        backend_count: service.backends.len() as u32,
        table_version: version,
        weighted_len,
        flags: 0,
    };
    for vip in &vips {
        vip.write(bpf, value)?;
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
