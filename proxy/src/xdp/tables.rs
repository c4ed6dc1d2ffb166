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

use std::net::{IpAddr, SocketAddr};

use anyhow::{Context, bail};
use aya::Ebpf;
use aya::maps::{Array, HashMap, MapData};
use switchyard_common::MAGLEV_TABLE_SIZE;
use switchyard_common::maps::{
    BackendEntry, PROTO_TCP, ServiceBackend, ServiceKey, ServiceValue, WEIGHTED_TABLE_SIZE,
    algorithm, forwarding, maglev_index, names, service_backend_index, weighted_index,
};

use crate::config::{Algorithm, Forwarding};
use crate::state::Service;

/// The `SERVICES` key of a VIP.
pub fn service_key(address: SocketAddr) -> anyhow::Result<ServiceKey> {
    let IpAddr::V4(ip) = address.ip() else {
        bail!("the XDP fast path serves IPv4 VIPs only, not {address}");
    };
    Ok(ServiceKey {
        addr: u32::from_ne_bytes(ip.octets()),
        port: address.port().to_be(),
        proto: PROTO_TCP,
        _pad: 0,
    })
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
    let vip = *service
        .config
        .listen
        .first()
        .context("service has no VIP")?;
    let key = service_key(vip)?;
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
            let SocketAddr::V4(address) = backend.config.address else {
                bail!(
                    "backend {:?}: the XDP fast path needs an IPv4 address",
                    backend.config.name
                );
            };
            let entry = BackendEntry {
                addr: u32::from_ne_bytes(address.ip().octets()),
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

    let services: HashMap<&mut MapData, ServiceKey, ServiceValue> = HashMap::try_from(
        bpf.map_mut(names::SERVICES)
            .context("map SERVICES missing")?,
    )?;
    let current = services.get(&key, 0).ok();
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
    let mut services: HashMap<&mut MapData, ServiceKey, ServiceValue> = HashMap::try_from(
        bpf.map_mut(names::SERVICES)
            .context("map SERVICES missing")?,
    )?;
    services
        .insert(key, value, 0)
        .context("writing the service entry")?;
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
