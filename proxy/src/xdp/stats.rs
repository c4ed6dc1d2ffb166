//! The kernel path's traffic counters: per backend slot (new flows, packets, bytes) and per
//! service (forwarded, passed, dropped, no backend), summed over CPUs. They feed the totals
//! (`crate::totals`): once a minute from the sync task and at shutdown.
//!
//! The two per-CPU maps are taken out of the loaded object (only this module reads them).

use anyhow::Context;
use aya::Ebpf;
use aya::maps::{MapData, PerCpuArray};
use switchyard_common::maps::{BackendStats, ServiceStats, names};

use crate::totals::{KernelBackendTotals, KernelCounters, KernelServiceTotals, XdpAttachment};

pub struct Stats {
    backends: PerCpuArray<MapData, BackendStats>,
    services: PerCpuArray<MapData, ServiceStats>,
    attachments: Vec<XdpAttachment>,
}

impl Stats {
    /// Takes the counter maps out of `bpf` (the program keeps using them); `attachments` are
    /// reported with them.
    pub fn take(bpf: &mut Ebpf, attachments: Vec<XdpAttachment>) -> anyhow::Result<Stats> {
        let backends = bpf
            .take_map(names::BACKEND_STATS)
            .context("map BACKEND_STATS missing")?;
        let services = bpf
            .take_map(names::SERVICE_STATS)
            .context("map SERVICE_STATS missing")?;
        Ok(Stats {
            backends: PerCpuArray::try_from(backends)?,
            services: PerCpuArray::try_from(services)?,
            attachments,
        })
    }
}

impl KernelCounters for Stats {
    fn backend(&self, slot: usize) -> Option<KernelBackendTotals> {
        let per_cpu = self.backends.get(&u32::try_from(slot).ok()?, 0).ok()?;
        Some(
            per_cpu
                .iter()
                .fold(KernelBackendTotals::default(), |sum, cpu| {
                    KernelBackendTotals {
                        new_flows: sum.new_flows.wrapping_add(cpu.new_flows),
                        packets: sum.packets.wrapping_add(cpu.packets),
                        bytes: sum.bytes.wrapping_add(cpu.bytes),
                    }
                }),
        )
    }

    fn service(&self, index: usize) -> Option<KernelServiceTotals> {
        let per_cpu = self.services.get(&u32::try_from(index).ok()?, 0).ok()?;
        Some(
            per_cpu
                .iter()
                .fold(KernelServiceTotals::default(), |sum, cpu| {
                    KernelServiceTotals {
                        forwarded: sum.forwarded.wrapping_add(cpu.forwarded),
                        passed: sum.passed.wrapping_add(cpu.passed),
                        dropped: sum.dropped.wrapping_add(cpu.dropped),
                        no_backend: sum.no_backend.wrapping_add(cpu.no_backend),
                    }
                }),
        )
    }

    fn attachments(&self) -> Vec<XdpAttachment> {
        self.attachments.clone()
    }
}
