//! The kernel path's counters: per backend packets and bytes (its new flows are
//! `switchyard_backend_sessions_total{plane="xdp"}`), per service packets by what the program
//! did with them, flows adopted mid-stream and packets of unknown flows, the flow tables' fill and capacity, count corrections, and the attach mode
//! per interface. Per-CPU maps are summed at scrape time; the flow tables' fill is what the
//! last expiry pass found (walking a table of a million flows per scrape would not do).

use super::{Family, Labels};
use crate::config::Dataplane;
use crate::state::Snapshot;
use crate::totals::KernelCounters;

pub(super) fn families(snapshot: &Snapshot, kernel: &dyn KernelCounters) -> Vec<Family> {
    let mut packets = Family::counter(
        "backend_xdp_packets",
        "Packets the kernel path forwarded to the backend (summed over CPUs; shared by services with the same backend address)",
    );
    let mut bytes = Family::counter(
        "backend_xdp_bytes",
        "Bytes the kernel path forwarded to the backend",
    );
    let mut actions = Family::counter(
        "service_xdp_packets",
        "Packets to the service's VIPs by what the kernel path did: forwarded, passed (to the stack), dropped, no_backend (SYNs that found no backend)",
    );
    let mut adopted = Family::counter(
        "xdp_flows_adopted",
        "Flows without an entry on this balancer (moved here by ECMP from another, or expired) adopted mid-stream by following the Maglev table (ip_hash)",
    );
    let mut unknown_flow = Family::counter(
        "xdp_unknown_flow_packets",
        "Mid-stream packets of flows without an entry on this balancer that no shared table placed (algorithms other than ip_hash, or ip_hash with every backend down): passed to the stack, or handed on to the next balancer by the second chance",
    );
    for service in &snapshot.services {
        if service.config.dataplane != Dataplane::Xdp {
            continue;
        }
        let name = &service.config.name;
        for backend in &service.backends {
            let Some(counted) = kernel.backend(backend.active.slot()) else {
                continue;
            };
            let labels: Labels = vec![
                ("service", name.clone()),
                ("backend", backend.config.name.clone()),
            ];
            packets.count(labels.clone(), counted.packets);
            bytes.count(labels, counted.bytes);
        }
        if let Some(counted) = kernel.service(service.kernel_index as usize) {
            for (action, value) in [
                ("forwarded", counted.forwarded),
                ("passed", counted.passed),
                ("dropped", counted.dropped),
                ("no_backend", counted.no_backend),
            ] {
                actions.count(
                    vec![("service", name.clone()), ("action", action.to_string())],
                    value,
                );
            }
            adopted.count(vec![("service", name.clone())], counted.adopted);
            unknown_flow.count(vec![("service", name.clone())], counted.unknown_flow);
        }
    }
    let second_chance = second_chance(snapshot, kernel);
    let table = kernel.flow_table();
    let mut entries = Family::gauge(
        "xdp_flow_table_entries",
        "Entries in the kernel's flow table (open, closing and ended flows) at the last expiry pass",
    );
    let mut capacity = Family::gauge(
        "xdp_flow_table_capacity",
        "Entries the kernel's flow table holds at most (the least recently used go first)",
    );
    for (family, count) in [("ipv4", table.entries_ipv4), ("ipv6", table.entries_ipv6)] {
        entries.count(vec![("family", family.to_string())], count);
        capacity.count(vec![("family", family.to_string())], table.capacity);
    }
    let mut corrected = Family::counter(
        "xdp_count_corrections",
        "Units of active count corrected because they drifted from the open flows (flows evicted from a full table, or ended unseen)",
    );
    corrected.count(Vec::new(), table.corrected);
    let mut attached = Family::gauge(
        "xdp_attach_mode",
        "1 for the mode (native or generic) the XDP program is attached in, per interface",
    );
    for attachment in kernel.attachments() {
        attached.count(
            vec![
                ("interface", attachment.interface),
                ("mode", attachment.mode),
            ],
            1,
        );
    }
    vec![
        packets,
        bytes,
        actions,
        adopted,
        unknown_flow,
        second_chance,
        entries,
        capacity,
        corrected,
        attached,
    ]
}

/// `switchyard_second_chance_packets_total{service,outcome}`, for every service while
/// `[announce] peers` is set (the numbers of `ctl show`'s `second_chance`).
fn second_chance(snapshot: &Snapshot, kernel: &dyn KernelCounters) -> Family {
    let mut family = Family::counter(
        "second_chance_packets",
        "Packets of the second chance between balancers: forwarded (could not be placed here, sent on to the next balancer), delivered (from a peer, placed here), unclaimed (from a peer with no hop left, not placed: passed to the stack)",
    );
    if snapshot.second_chance.is_none() {
        return family;
    }
    for service in &snapshot.services {
        let counted = kernel
            .service(service.kernel_index as usize)
            .unwrap_or_default()
            .second_chance;
        for (outcome, value) in [
            ("forwarded", counted.forwarded),
            ("delivered", counted.delivered),
            ("unclaimed", counted.unclaimed),
        ] {
            family.count(
                vec![
                    ("service", service.config.name.clone()),
                    ("outcome", outcome.to_string()),
                ],
                value,
            );
        }
    }
    family
}
