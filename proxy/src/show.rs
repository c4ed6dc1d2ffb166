//! `ctl show`: the running state as a report — per service its listeners and session counts,
//! per backend its state and why, the last check, weight, counts and the response-time
//! average.

use std::sync::atomic::Ordering;
use std::time::UNIX_EPOCH;

use crate::config::{Dataplane, HealthKind};
use crate::control::{BackendReport, CheckReport, ServiceReport, ShowReport, SourceRejections};
use crate::state::{Backend, Service, Snapshot};
use crate::totals::{KernelCounters, KernelServiceTotals};

/// The report for every service, or for the one named (an unknown name lists those that
/// exist).
pub fn report(
    snapshot: &Snapshot,
    only: Option<&str>,
    kernel: Option<&dyn KernelCounters>,
) -> Result<ShowReport, String> {
    if let Some(name) = only {
        snapshot.named(name)?;
    }
    let services = snapshot
        .services
        .iter()
        .filter(|s| only.is_none_or(|name| s.config.name == name))
        .map(|s| service_report(s, kernel, snapshot.second_chance.is_some()))
        .collect();
    Ok(ShowReport {
        services,
        node: Default::default(),
    })
}

/// Kernel flows open to the service's backends: each slot's count less this process's own
/// proxy sessions in it.
fn open_flows(service: &Service) -> u64 {
    service
        .backends
        .iter()
        .map(|b| {
            let slot = b.active.slot();
            let table = b.active.table();
            table.load(slot).saturating_sub(table.sessions(slot))
        })
        .sum()
}

fn service_report(
    service: &Service,
    kernel: Option<&dyn KernelCounters>,
    second_chance: bool,
) -> ServiceReport {
    let config = &service.config;
    let xdp = config.dataplane == Dataplane::Xdp;
    // One read of the service's per-CPU kernel counters serves both, and only when wanted.
    let totals = kernel
        .filter(|_| xdp || second_chance)
        .map(|k| k.service(service.kernel_index as usize).unwrap_or_default());
    let second_chance = second_chance.then(|| totals.unwrap_or_default().second_chance);
    let packets = totals.filter(|_| xdp);
    ServiceReport {
        name: config.name.clone(),
        dataplane: config.dataplane.to_string(),
        algorithm: config.algorithm.to_string(),
        listeners: config.listen.iter().map(|a| a.to_string()).collect(),
        sessions_active: u64::from(service.counts.sessions.load(Ordering::Relaxed)),
        sessions_total: service.counts.accepted.load(Ordering::Relaxed),
        refused_421: service.counts.refused.total(),
        sources: source_rejections(service, packets),
        flows: xdp.then(|| open_flows(service)),
        flows_adopted: packets.map(|p| p.adopted),
        unknown_flow_packets: packets.map(|p| p.unknown_flow),
        announce: None,
        second_chance,
        backends: service
            .backends
            .iter()
            .map(|b| {
                let mut report = backend_report(service, b);
                // The kernel path's flows are its sessions.
                if let Some(kernel) = kernel.filter(|_| xdp)
                    && let Some(counted) = kernel.backend(b.active.slot())
                {
                    report.sessions_total += counted.new_flows;
                }
                report
            })
            .collect(),
    }
}

fn backend_report(service: &Service, backend: &Backend) -> BackendReport {
    let live = &backend.live;
    let last_check = live.last_check.lock().clone();
    let by = |uid: Option<u32>| uid.map_or(String::new(), |uid| format!(" by uid {uid}"));
    let (state, why) = if backend.runtime.disabled {
        (
            "disabled",
            format!("ctl disable{}", by(backend.runtime.by_uid)),
        )
    } else if backend.config.drain {
        let why = match backend.runtime.drain {
            Some(true) => format!("ctl drain{}", by(backend.runtime.by_uid)),
            _ => "drain = true in the config file".to_string(),
        };
        ("drain", why)
    } else if !live.health.is_up() {
        let why = match (&last_check, service.config.health.kind) {
            (_, HealthKind::None) => {
                "failures on live traffic (held down; kind none runs no checks)".to_string()
            }
            (Some(check), _) if !check.ok => format!("health check: {}", check.detail),
            _ => "failures on live traffic".to_string(),
        };
        ("down", why)
    } else {
        let why = match (&last_check, service.config.health.kind) {
            (_, HealthKind::None) => "no checks (kind none); live traffic judges it".to_string(),
            (Some(check), _) if !check.ok => format!(
                "last check failed ({}); down after {} failures in a row",
                check.detail, service.config.health.fall
            ),
            (_, kind) => format!("{kind} checks pass"),
        };
        ("up", why)
    };
    BackendReport {
        name: backend.config.name.clone(),
        address: backend.config.address.to_string(),
        state: state.to_string(),
        why,
        last_check: last_check.map(|check| CheckReport {
            ok: check.ok,
            at_unix_ms: check
                .ended
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            detail: check.detail,
        }),
        weight: backend.config.weight,
        max_connections: backend.config.max_connections,
        active: u64::from(backend.active.get()),
        sessions_total: live.assigned_total(),
        // Failed attempts on live traffic: the sum of the reasons counted.
        failures: live.failure_reasons.total(),
        response_us: live.response_us.load(Ordering::Relaxed),
        throttled: live.throttled.load(Ordering::Relaxed),
    }
}

/// The service's per-source rejections: the proxy's own counts, or for an xdp service the
/// kernel's drops (`denied` counts both lists, as the proxy's `554`s do).
fn source_rejections(service: &Service, kernel: Option<KernelServiceTotals>) -> SourceRejections {
    if let Some(kernel) = kernel {
        let counted = kernel.sources;
        return SourceRejections {
            denied: counted.denied + counted.not_allowed,
            too_many: counted.too_many,
            too_fast: counted.too_fast,
            untracked: 0,
            tracked: counted.tracked,
        };
    }
    let sources = &service.counts.sources;
    let counts = &sources.counts;
    SourceRejections {
        denied: counts.denied.load(Ordering::Relaxed),
        too_many: counts.too_many.load(Ordering::Relaxed),
        too_fast: counts.too_fast.load(Ordering::Relaxed),
        untracked: counts.untracked.load(Ordering::Relaxed),
        tracked: sources.tracked() as u64,
    }
}
