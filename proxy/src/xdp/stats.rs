//! The kernel path's traffic counters: per backend slot (new flows, packets, bytes) and per
//! service (forwarded, passed, dropped, no backend), summed over CPUs. They feed the totals
//! (`crate::totals`): once a minute from the sync task and at shutdown.
//!
//! The two per-CPU maps are taken out of the loaded object (only this module reads them). The
//! flow tables' fill and the count corrections come from the expiry pass (`flows`), which
//! walks the tables anyway, through [`FlowGauges`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context;
use aya::Ebpf;
use aya::maps::{MapData, PerCpuArray};
use switchyard_common::maps::{BackendStats, ServiceStats, names};

use crate::totals::{
    FlowTableTotals, KernelBackendTotals, KernelCounters, KernelServiceTotals, XdpAttachment,
};

pub struct Stats {
    backends: PerCpuArray<MapData, BackendStats>,
    services: PerCpuArray<MapData, ServiceStats>,
    attachments: Vec<XdpAttachment>,
    flows: Arc<FlowGauges>,
}

/// What the last expiry pass found in the flow tables, and the corrections so far.
#[derive(Default)]
pub struct FlowGauges {
    pub entries_ipv4: AtomicU64,
    pub entries_ipv6: AtomicU64,
    pub capacity: AtomicU64,
    pub corrected: AtomicU64,
}

impl Stats {
    /// Takes the counter maps out of `bpf` (the program keeps using them); `attachments` and
    /// what the expiry pass writes into `flows` are reported with them.
    pub fn take(
        bpf: &mut Ebpf,
        attachments: Vec<XdpAttachment>,
        flows: Arc<FlowGauges>,
    ) -> anyhow::Result<Stats> {
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
            flows,
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

    fn flow_table(&self) -> FlowTableTotals {
        let flows = &self.flows;
        FlowTableTotals {
            entries_ipv4: flows.entries_ipv4.load(Ordering::Relaxed),
            entries_ipv6: flows.entries_ipv6.load(Ordering::Relaxed),
            capacity: flows.capacity.load(Ordering::Relaxed),
            corrected: flows.corrected.load(Ordering::Relaxed),
        }
    }
}
