//! Per-backend totals: what each backend was assigned and holds, and (for xdp services) the
//! kernel path's traffic counters, collected from the running state into one structured value.
//!
//! This is the machine-readable interface to a run's outcome. At shutdown switchyard logs it
//! as one line, `totals {json}` (target `switchyard::totals`), and writes the same object to the
//! file given with `run --totals FILE`. Tests and the benchmark deserialize it with this very
//! type, never by scraping the human lines [`Totals::log`] also writes.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};
use tracing::info;

use crate::config::Dataplane;
use crate::state::Snapshot;
use crate::{limits, loops};

/// Every service's totals, in config order, and the balancer's own trouble.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    pub services: Vec<ServiceTotals>,
    /// Absent from files written before it existed: read as zeros.
    #[serde(default)]
    pub balancer: BalancerTotals,
    /// How the kernel path's program is attached, per interface; empty without xdp services.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub xdp_attachments: Vec<XdpAttachment>,
}

/// One interface the XDP program is attached to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct XdpAttachment {
    pub interface: String,
    /// `"native"` or `"generic"`.
    pub mode: String,
    /// Why this mode (what `[service.xdp] mode` asked, what was found).
    pub reason: String,
}

/// What went wrong on the balancer's side over the whole run, never counted against a backend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalancerTotals {
    /// Out of descriptors, memory or local ports while accepting a client.
    pub exhausted_accept: u64,
    /// ... while opening a session's connection to a backend (the client got 421).
    pub exhausted_connect: u64,
    /// ... while opening a health check's connection (the check was skipped).
    pub exhausted_health_check: u64,
    /// Clients answered 421 through the spare descriptor while the table was full.
    pub clients_refused: u64,
    /// Connections refused because they were our own backend connections come back (a loop).
    pub loops_refused: u64,
}

impl BalancerTotals {
    /// This process's counts now.
    pub fn collect() -> BalancerTotals {
        let own = limits::OWN_EXHAUSTION.counts();
        BalancerTotals {
            exhausted_accept: own.accept,
            exhausted_connect: own.connect,
            exhausted_health_check: own.health_check,
            clients_refused: own.clients_refused,
            loops_refused: loops::refused(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceTotals {
    pub name: String,
    /// `"proxy"` or `"xdp"`.
    pub dataplane: String,
    pub backends: Vec<BackendTotals>,
    /// The kernel path's per-service packet counters; only for xdp services.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<KernelServiceTotals>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendTotals {
    pub name: String,
    pub address: SocketAddr,
    /// The shared active count (both planes) when collected; 0 at a clean shutdown.
    pub active: u64,
    /// Sessions the userspace proxy assigned to this backend over the whole run.
    pub assigned: u64,
    /// The kernel path's counters for this backend's address; only for xdp services.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<KernelBackendTotals>,
}

/// Summed over CPUs. A backend address shared by several services shares these counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelBackendTotals {
    pub new_flows: u64,
    pub packets: u64,
    pub bytes: u64,
}

/// Packets, summed over CPUs; `no_backend` counts SYNs that found no backend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelServiceTotals {
    pub forwarded: u64,
    pub passed: u64,
    pub dropped: u64,
    pub no_backend: u64,
    /// Mid-stream packets of flows without an entry here (another balancer's, moved by ECMP,
    /// or expired) that no shared table placed: passed to the stack, or handed on by the
    /// second chance.
    #[serde(default)]
    pub unknown_flow: u64,
    /// Such flows adopted by following the Maglev table (ip_hash).
    #[serde(default)]
    pub adopted: u64,
    /// SYNs `[service.limits]` dropped, and the sources tracked.
    #[serde(default)]
    pub sources: KernelSourceTotals,
    /// The second chance between balancers (`[announce] peers`).
    #[serde(default)]
    pub second_chance: SecondChanceTotals,
}

/// Packets of the second chance between balancers, by outcome (summed over CPUs): the same
/// numbers as `ctl show`'s `second_chance` and `switchyard_second_chance_packets_total`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecondChanceTotals {
    /// Packets this host could not place, sent on to the next balancer.
    pub forwarded: u64,
    /// Packets from a peer that this host placed (the host that owns the connection).
    pub delivered: u64,
    /// Packets from a peer with no hop left that this host could not place: passed to the
    /// stack.
    pub unclaimed: u64,
}

/// SYNs the kernel path dropped by `[service.limits]`, by reason (summed over CPUs), and the
/// service's entries in the per-source table at the last count.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelSourceTotals {
    /// In the deny list.
    pub denied: u64,
    /// Not in the allow list.
    pub not_allowed: u64,
    /// At `per_source_connections`.
    pub too_many: u64,
    /// Over `per_source_rate`.
    pub too_fast: u64,
    /// Sources in the per-source table (counted every few seconds).
    pub tracked: u64,
}

/// The kernel's flow tables as the last expiry pass found them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowTableTotals {
    /// Entries in the IPv4 and the IPv6 flow table (open, closing and ended flows).
    pub entries_ipv4: u64,
    pub entries_ipv6: u64,
    /// Entries each table holds at most.
    pub capacity: u64,
    /// Units of active count corrected since start (drift: open flows evicted from a full
    /// table, flows that ended unseen).
    pub corrected: u64,
}

/// Where the kernel path's counters come from (the loaded program's per-CPU maps). Passed in,
/// so collecting totals needs no reach into the kernel path's internals.
pub trait KernelCounters {
    /// Counters of a backend slot (one per distinct backend address).
    fn backend(&self, slot: usize) -> Option<KernelBackendTotals>;
    /// Counters of the service at `index` in the snapshot.
    fn service(&self, index: usize) -> Option<KernelServiceTotals>;
    /// Where the program is attached, and in which mode.
    fn attachments(&self) -> Vec<XdpAttachment>;
    /// The flow tables' fill and the count corrections.
    fn flow_table(&self) -> FlowTableTotals {
        FlowTableTotals::default()
    }
}

impl Totals {
    /// Reads the counts of `snapshot` now. `kernel` fills the xdp services' kernel fields;
    /// `xdp_only` leaves the proxy services out (the kernel path's periodic report).
    pub fn collect(
        snapshot: &Snapshot,
        kernel: Option<&dyn KernelCounters>,
        xdp_only: bool,
    ) -> Totals {
        let mut services = Vec::new();
        for service in &snapshot.services {
            let xdp = service.config.dataplane == Dataplane::Xdp;
            if xdp_only && !xdp {
                continue;
            }
            let kernel = kernel.filter(|_| xdp);
            let backends = service
                .backends
                .iter()
                .map(|backend| BackendTotals {
                    name: backend.config.name.clone(),
                    address: backend.config.address,
                    active: u64::from(backend.active.get()),
                    assigned: backend.live.assigned_total(),
                    kernel: kernel.and_then(|k| k.backend(backend.active.slot())),
                })
                .collect();
            services.push(ServiceTotals {
                name: service.config.name.clone(),
                dataplane: if xdp { "xdp" } else { "proxy" }.to_string(),
                backends,
                kernel: kernel.and_then(|k| k.service(service.kernel_index as usize)),
            });
        }
        Totals {
            services,
            balancer: BalancerTotals::collect(),
            xdp_attachments: kernel.map(|k| k.attachments()).unwrap_or_default(),
        }
    }

    /// The totals of one backend, by service and backend name.
    pub fn backend(&self, service: &str, backend: &str) -> Option<&BackendTotals> {
        self.services
            .iter()
            .find(|s| s.name == service)?
            .backends
            .iter()
            .find(|b| b.name == backend)
    }

    /// Every backend of every service, with its service's name.
    pub fn backends(&self) -> impl Iterator<Item = (&str, &BackendTotals)> {
        self.services
            .iter()
            .flat_map(|s| s.backends.iter().map(move |b| (s.name.as_str(), b)))
    }

    /// One line per backend and one per xdp service, for people reading the log.
    pub fn log(&self) {
        let own = &self.balancer;
        if *own != BalancerTotals::default() {
            info!(
                "balancer out of resources: accept {} backend-connect {} health-check {}; \
                 clients refused {}; loop connections refused {}",
                own.exhausted_accept,
                own.exhausted_connect,
                own.exhausted_health_check,
                own.clients_refused,
                own.loops_refused
            );
        }
        for service in &self.services {
            for backend in &service.backends {
                let kernel = backend.kernel.map_or_else(String::new, |k| {
                    format!(
                        " xdp_new_flows={} xdp_packets={} xdp_bytes={}",
                        k.new_flows, k.packets, k.bytes
                    )
                });
                info!(
                    "service {} backend {} active={} assigned={}{kernel}",
                    service.name, backend.name, backend.active, backend.assigned
                );
            }
            if let Some(k) = service.kernel {
                info!(
                    "service {} xdp forwarded={} passed={} dropped={} no_backend={} adopted={} unknown_flow={}",
                    service.name,
                    k.forwarded,
                    k.passed,
                    k.dropped,
                    k.no_backend,
                    k.adopted,
                    k.unknown_flow
                );
            }
        }
    }

    /// The whole value as one line of JSON.
    pub fn to_json(&self) -> String {
        // Plain data with string keys: serialization cannot fail.
        serde_json::to_string(self).unwrap_or_else(|error| format!("{{\"error\":\"{error}\"}}"))
    }

    pub fn from_json(text: &str) -> Result<Totals, serde_json::Error> {
        serde_json::from_str(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trips_and_leaves_absent_kernel_fields_out() {
        let totals = Totals {
            services: vec![ServiceTotals {
                name: "mx".into(),
                dataplane: "proxy".into(),
                backends: vec![BackendTotals {
                    name: "mta1".into(),
                    address: "127.0.0.1:2601".parse().expect("address"),
                    active: 0,
                    assigned: 12,
                    kernel: None,
                }],
                kernel: None,
            }],
            balancer: BalancerTotals::default(),
            xdp_attachments: Vec::new(),
        };
        let json = totals.to_json();
        assert!(!json.contains("kernel"), "{json}");
        assert!(!json.contains("xdp_attachments"), "{json}");
        assert_eq!(Totals::from_json(&json).expect("parse"), totals);
        assert_eq!(totals.backend("mx", "mta1").map(|b| b.assigned), Some(12));
        assert!(totals.backend("mx", "mta2").is_none());
    }

    #[test]
    fn a_file_without_balancer_totals_reads_as_zeros() {
        let totals = Totals::from_json(r#"{"services":[]}"#).expect("parse");
        assert_eq!(totals.balancer, BalancerTotals::default());
    }
}
