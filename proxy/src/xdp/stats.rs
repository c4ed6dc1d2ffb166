//! The kernel path's traffic counters: per backend slot (new flows, packets, bytes) and per
//! service (forwarded, passed, dropped, no backend; SYNs `[service.limits]` dropped, by
//! reason), summed over CPUs. They feed the totals
//! (`crate::totals`): once a minute from the sync task and at shutdown.
//!
//! The three per-CPU maps are taken out of the loaded object (only this module reads them). The
//! flow tables' fill and the count corrections come from the expiry pass (`flows`), which
//! walks the tables anyway, through [`FlowGauges`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context;
use aya::Ebpf;
use aya::maps::{MapData, PerCpuArray};
use switchyard_common::maps::{BackendStats, ServiceStats, SourceStats, names};

use super::limits::SourceGauges;
use crate::totals::{
    FlowTableTotals, KernelBackendTotals, KernelCounters, KernelServiceTotals, KernelSourceTotals,
    SecondChanceTotals, XdpAttachment,
};

pub struct Stats {
    backends: PerCpuArray<MapData, BackendStats>,
    services: PerCpuArray<MapData, ServiceStats>,
    sources: PerCpuArray<MapData, SourceStats>,
    attachments: Vec<XdpAttachment>,
    flows: Arc<FlowGauges>,
    tracked: Arc<SourceGauges>,
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
        tracked: Arc<SourceGauges>,
    ) -> anyhow::Result<Stats> {
        let backends = bpf
            .take_map(names::BACKEND_STATS)
            .context("map BACKEND_STATS missing")?;
        let services = bpf
            .take_map(names::SERVICE_STATS)
            .context("map SERVICE_STATS missing")?;
        let sources = bpf
            .take_map(names::SOURCE_STATS)
            .context("map SOURCE_STATS missing")?;
        Ok(Stats {
            backends: PerCpuArray::try_from(backends)?,
            services: PerCpuArray::try_from(services)?,
            sources: PerCpuArray::try_from(sources)?,
            attachments,
            flows,
            tracked,
        })
    }

    /// The service's `[service.limits]` drops summed over CPUs, and its tracked sources.
    fn sources(&self, index: u32) -> KernelSourceTotals {
        let summed = self.sources.get(&index, 0).ok().map(|per_cpu| {
            per_cpu
                .iter()
                .fold(SourceStats::default(), |sum, cpu| SourceStats {
                    denied: sum.denied.wrapping_add(cpu.denied),
                    not_allowed: sum.not_allowed.wrapping_add(cpu.not_allowed),
                    too_many: sum.too_many.wrapping_add(cpu.too_many),
                    too_fast: sum.too_fast.wrapping_add(cpu.too_fast),
                })
        });
        let summed = summed.unwrap_or_default();
        KernelSourceTotals {
            denied: summed.denied,
            not_allowed: summed.not_allowed,
            too_many: summed.too_many,
            too_fast: summed.too_fast,
            tracked: self.tracked.tracked(index),
        }
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
        let index = u32::try_from(index).ok()?;
        let per_cpu = self.services.get(&index, 0).ok()?;
        let packets = per_cpu
            .iter()
            .fold(KernelServiceTotals::default(), |sum, cpu| {
                KernelServiceTotals {
                    forwarded: sum.forwarded.wrapping_add(cpu.forwarded),
                    passed: sum.passed.wrapping_add(cpu.passed),
                    dropped: sum.dropped.wrapping_add(cpu.dropped),
                    no_backend: sum.no_backend.wrapping_add(cpu.no_backend),
                    unknown_flow: sum.unknown_flow.wrapping_add(cpu.unknown_flow),
                    adopted: sum.adopted.wrapping_add(cpu.adopted),
                    sources: KernelSourceTotals::default(),
                    second_chance: SecondChanceTotals {
                        forwarded: sum
                            .second_chance
                            .forwarded
                            .wrapping_add(cpu.chance_forwarded),
                        delivered: sum
                            .second_chance
                            .delivered
                            .wrapping_add(cpu.chance_delivered),
                        unclaimed: sum
                            .second_chance
                            .unclaimed
                            .wrapping_add(cpu.chance_unclaimed),
                    },
                }
            });
        Some(KernelServiceTotals {
            sources: self.sources(index),
            ..packets
        })
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
