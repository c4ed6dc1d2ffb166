//! The XDP program on crafted frames instead of an interface: the embedded object loaded
//! through the verifier, one service written straight into its maps, and
//! `BPF_PROG_TEST_RUN` (aya's `TestRun`) on Ethernet/IPv4/TCP frames built here. What the
//! program returns and what each run costs in the kernel, with no network at all: for the
//! benchmark's per-packet cost. Needs root (CAP_BPF, CAP_NET_ADMIN).

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use anyhow::{Context, Result};
use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, HashMap};
use aya::programs::{TestRun, TestRunOptions, Xdp};
use aya::{Ebpf, EbpfLoader};
use switchyard_common::maps::{
    BackendEntry, ListAddr4, PROTO_TCP, ServiceBackend, ServiceKey, ServiceRoute, ServiceValue,
    SourceLimits, address_filter, backend_state, forwarding, names, programs,
    service_backend_index, source_list,
};

use crate::raw_syn::tcp_packet;

/// The loaded object with both programs (the balancer and the pass-everything floor).
pub struct XdpRun {
    bpf: Ebpf,
}

/// One backend of [`XdpRun::add_dsr_service`]: where it is and its MAC.
pub struct TestBackend {
    pub address: SocketAddrV4,
    pub mac: [u8; 6],
}

impl XdpRun {
    /// Loads the embedded object with a flow table (and nat reply table) of `flows` entries.
    pub fn load(flows: u32) -> Result<XdpRun> {
        let object = switchyard::xdp::object()
            .context("this build has no XDP object (eBPF toolchain missing)")?;
        let mut bpf = EbpfLoader::new()
            .map_max_entries(names::FLOWS, flows)
            .map_max_entries(names::NAT_REPLIES, flows)
            .load(object)
            .context("loading the XDP object")?;
        for name in [programs::BALANCE, programs::PASS] {
            let program: &mut Xdp = bpf
                .program_mut(name)
                .with_context(|| format!("the object has no program {name}"))?
                .try_into()?;
            program
                .load()
                .with_context(|| format!("loading {name} through the verifier"))?;
        }
        Ok(XdpRun { bpf })
    }

    /// Service 0: `vip` balanced by `algorithm` (`switchyard_common::maps::algorithm`) over
    /// `backends` (slots 0..n, all up, weight 1) in dsr forwarding, with its address filter
    /// bits and route written as the control plane writes them. No Maglev or weighted table
    /// is written: use an algorithm that needs none (least_conn).
    pub fn add_dsr_service(
        &mut self,
        vip: SocketAddrV4,
        algorithm: u32,
        backends: &[TestBackend],
    ) -> Result<()> {
        let key = ServiceKey {
            addr: u32::from_ne_bytes(vip.ip().octets()),
            port: vip.port().to_be(),
            proto: PROTO_TCP,
            _pad: 0,
        };
        let [Some(filter), Some(entries)] = self
            .bpf
            .maps_disjoint_mut([names::ADDRESS_FILTER, names::BACKENDS])
        else {
            anyhow::bail!("no ADDRESS_FILTER or BACKENDS");
        };
        let mut filter: Array<_, u64> = Array::try_from(filter)?;
        let mut entries: Array<_, BackendEntry> = Array::try_from(entries)?;
        address_filter::admit(&mut filter, address_filter::VIPS, key.addr, key.port)?;
        for (slot, b) in backends.iter().enumerate() {
            let entry = BackendEntry {
                addr: u32::from_ne_bytes(b.address.ip().octets()),
                port: b.address.port().to_be(),
                mac: b.mac,
                ifindex: 0,
            };
            address_filter::admit(
                &mut filter,
                address_filter::BACKENDS,
                entry.addr,
                entry.port,
            )?;
            entries.set(slot as u32, entry, 0)?;
        }
        let mut policies: Array<_, ServiceBackend> = Array::try_from(
            self.bpf
                .map_mut(names::SERVICE_BACKENDS)
                .context("no SERVICE_BACKENDS")?,
        )?;
        for slot in 0..backends.len() as u32 {
            let policy = ServiceBackend {
                slot,
                weight: 1,
                max_connections: 0,
                state: backend_state::UP,
                ..ServiceBackend::default()
            };
            policies.set(service_backend_index(0, 0, slot), policy, 0)?;
        }
        let mut services: HashMap<_, ServiceKey, ServiceValue> =
            HashMap::try_from(self.bpf.map_mut(names::SERVICES).context("no SERVICES")?)?;
        let value = ServiceValue {
            index: 0,
            algorithm,
            forwarding: forwarding::DSR,
            backend_count: backends.len() as u32,
            ..ServiceValue::default()
        };
        services.insert(key, value, 0)?;
        let route = ServiceRoute {
            vip: key,
            forwarding: forwarding::DSR,
            _pad: 0,
        };
        self.set_route(0, route)
    }

    /// Writes the `SERVICE_ROUTES` entry of service `index` (after its `SERVICES` entry, as
    /// the control plane does; or a wrong one, to see the kernel take the `SERVICES` way).
    pub fn set_route(&mut self, index: u32, route: ServiceRoute) -> Result<()> {
        let mut routes: Array<_, ServiceRoute> = Array::try_from(
            self.bpf
                .map_mut(names::SERVICE_ROUTES)
                .context("no SERVICE_ROUTES")?,
        )?;
        routes
            .set(index, route, 0)
            .context("writing SERVICE_ROUTES")?;
        Ok(())
    }

    /// Writes the `[service.limits]` of service `index` as the control plane does: the IPv4
    /// networks of `deny` (address, prefix length) into its deny list first, then `limits`.
    pub fn set_limits(
        &mut self,
        index: u32,
        limits: SourceLimits,
        deny: &[(Ipv4Addr, u8)],
    ) -> Result<()> {
        let mut lists: LpmTrie<_, ListAddr4, u32> = LpmTrie::try_from(
            self.bpf
                .map_mut(names::SOURCE_LISTS)
                .context("no SOURCE_LISTS")?,
        )?;
        for &(network, length) in deny {
            let data = ListAddr4 {
                scope: source_list::scope(index, source_list::DENY),
                addr: u32::from_ne_bytes(network.octets()),
            };
            let key = Key::new(source_list::SCOPE_BITS + u32::from(length), data);
            lists.insert(&key, 1, 0).context("writing SOURCE_LISTS")?;
        }
        let mut array: Array<_, SourceLimits> = Array::try_from(
            self.bpf
                .map_mut(names::SOURCE_LIMITS)
                .context("no SOURCE_LIMITS")?,
        )?;
        array
            .set(index, limits, 0)
            .context("writing SOURCE_LIMITS")?;
        Ok(())
    }

    /// Runs `program` (`switchyard_common::maps::programs::*`) on `frame` `repeat` times in a
    /// row, in the kernel: the XDP action of the last run and the mean time per run. The
    /// frame is not restored between runs (a rewrite stays for the next run).
    pub fn run(&self, program: &str, frame: &[u8], repeat: u32) -> Result<(u32, Duration)> {
        let xdp: &Xdp = self
            .bpf
            .program(program)
            .with_context(|| format!("no program {program}"))?
            .try_into()?;
        let mut out = vec![0u8; frame.len() + 256];
        let result = xdp
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                repeat,
                ..TestRunOptions::default()
            })
            .with_context(|| format!("BPF_PROG_TEST_RUN of {program}"))?;
        Ok((result.return_value, result.duration))
    }
}

/// An Ethernet frame carrying a bare TCP segment from `source` to `target` with TCP `flags`.
pub fn tcp_frame(source: SocketAddrV4, target: SocketAddrV4, flags: u8) -> Vec<u8> {
    const ETH_P_IP: u16 = 0x0800;
    let mut frame = Vec::with_capacity(54);
    frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02]); // to the balancer
    frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]); // from the client
    frame.extend_from_slice(&ETH_P_IP.to_be_bytes());
    frame.extend_from_slice(&tcp_packet(source, target, flags, 1));
    frame
}
