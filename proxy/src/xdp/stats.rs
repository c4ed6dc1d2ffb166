//! The kernel path's traffic counters: per backend slot (new flows, packets, bytes) and per
//! service (forwarded, passed, dropped, no backend), summed over CPUs, for the logs: once a
//! minute while running and in the shutdown totals (both written by `server::log_totals`).
//!
//! The two per-CPU maps are taken out of the loaded object (only this module reads them) and
//! installed process-wide, so `server`'s shutdown totals can read them without the plane.

use anyhow::Context;
use aya::Ebpf;
use aya::maps::{MapData, PerCpuArray};
use parking_lot::Mutex;
use switchyard_common::maps::{BackendStats, ServiceStats, names};

static INSTALLED: Mutex<Option<Stats>> = Mutex::new(None);

pub struct Stats {
    backends: PerCpuArray<MapData, BackendStats>,
    services: PerCpuArray<MapData, ServiceStats>,
}

impl Stats {
    /// Takes the counter maps out of `bpf` (the program keeps using them).
    pub fn take(bpf: &mut Ebpf) -> anyhow::Result<Stats> {
        let backends = bpf
            .take_map(names::BACKEND_STATS)
            .context("map BACKEND_STATS missing")?;
        let services = bpf
            .take_map(names::SERVICE_STATS)
            .context("map SERVICE_STATS missing")?;
        Ok(Stats {
            backends: PerCpuArray::try_from(backends)?,
            services: PerCpuArray::try_from(services)?,
        })
    }

    fn backend(&self, slot: u32) -> Option<BackendStats> {
        let per_cpu = self.backends.get(&slot, 0).ok()?;
        Some(
            per_cpu
                .iter()
                .fold(BackendStats::default(), |sum, cpu| BackendStats {
                    new_flows: sum.new_flows.wrapping_add(cpu.new_flows),
                    packets: sum.packets.wrapping_add(cpu.packets),
                    bytes: sum.bytes.wrapping_add(cpu.bytes),
                }),
        )
    }

    fn service(&self, index: u32) -> Option<ServiceStats> {
        let per_cpu = self.services.get(&index, 0).ok()?;
        Some(
            per_cpu
                .iter()
                .fold(ServiceStats::default(), |sum, cpu| ServiceStats {
                    forwarded: sum.forwarded.wrapping_add(cpu.forwarded),
                    passed: sum.passed.wrapping_add(cpu.passed),
                    dropped: sum.dropped.wrapping_add(cpu.dropped),
                    no_backend: sum.no_backend.wrapping_add(cpu.no_backend),
                }),
        )
    }
}

/// Makes `stats` the process's (replacing any earlier).
pub fn install(stats: Stats) {
    *INSTALLED.lock() = Some(stats);
}

pub fn uninstall() {
    INSTALLED.lock().take();
}

/// ` xdp_new_flows=N xdp_packets=N xdp_bytes=N` for a backend slot (a slot is a backend
/// address: shared by every service that lists it); empty without the kernel path.
pub fn backend_fields(slot: usize) -> String {
    let installed = INSTALLED.lock();
    let Some(stats) = installed.as_ref().and_then(|s| s.backend(slot as u32)) else {
        return String::new();
    };
    format!(
        " xdp_new_flows={} xdp_packets={} xdp_bytes={}",
        stats.new_flows, stats.packets, stats.bytes
    )
}

/// ` forwarded=N passed=N dropped=N no_backend=N` (packets; `no_backend` counts SYNs) for the
/// service at `index` of the snapshot; empty without the kernel path.
pub fn service_fields(index: usize) -> String {
    let installed = INSTALLED.lock();
    let Some(stats) = installed.as_ref().and_then(|s| s.service(index as u32)) else {
        return String::new();
    };
    format!(
        " forwarded={} passed={} dropped={} no_backend={}",
        stats.forwarded, stats.passed, stats.dropped, stats.no_backend
    )
}
