//! The flow table from userspace: expiring flows that ended without a FIN the kernel saw
//! (client vanished, RST lost, entry idle), reconciling the shared counts with it (open flows
//! evicted from a full table take their unit with them), and rebuilding the active counts
//! from it after a restart, so the shared counts never drift. IPv4 flows (`FLOWS`) and IPv6
//! flows (`FLOWS6`) count in the same slots: every pass reads both tables.
//!
//! A flow holds one unit of its backend's count while `COUNTED` is set and `CLOSED` is not
//! (the kernel sets `CLOSED` once, on the client's FIN or RST or the backend's RST), and with
//! `SOURCE_COUNTED` one unit of its source's in `SOURCES` too, which an expired open flow
//! gives back as well. Ended
//! flows are deleted once they lingered as long as the kernel still matches them.
//! Expiry deletes the entry first and gives the count back only if the deletion succeeded, so
//! the kernel and this task cannot both give it back (apart from a FIN arriving in the same
//! microsecond as the expiry of a flow idle for `flow_idle_timeout`).

use std::collections::HashMap as StdHashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use aya::Ebpf;
use aya::maps::{HashMap, MapData};
use switchyard_common::maps::{
    ENDED_LINGER_NS, FlowKey, FlowKey6, FlowValue, NatReply, NatReply6, flow_ended, flow_flags,
    names,
};
use tracing::warn;

use crate::counters::CounterTable;
use crate::state::Snapshot;

use super::limits::{self, Client};
use super::stats::FlowGauges;

/// A flow key's client (its source), whose `[service.limits]` unit an expired open flow gives
/// back.
trait ClientOf {
    fn client(&self) -> Client;
}

impl ClientOf for FlowKey {
    fn client(&self) -> Client {
        Client::V4(self.src_addr)
    }
}

impl ClientOf for FlowKey6 {
    fn client(&self) -> Client {
        Client::V6(self.src_addr)
    }
}

/// Closed flows that have not ended (the client's FIN seen, the backend's not: always so in
/// dsr, whose replies bypass the balancer) stay this long after their last packet, for a
/// backend still sending (capped by the service's idle timeout). A SYN never follows them.
const CLOSED_LINGER: Duration = Duration::from_secs(30);

/// Ended flows (RST, or FINs both ways) go as soon as the kernel stops matching them.
const ENDED_LINGER: Duration = Duration::from_nanos(ENDED_LINGER_NS);

/// A flow whose handshake never completed (no ACK from the client) holds its count this long
/// at most, so SYNs to nowhere or a SYN flood cannot inflate least_conn's counts for the whole
/// idle timeout (capped by the service's idle timeout).
const HANDSHAKE_LIMIT: Duration = Duration::from_secs(10);

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_coarse_ns`, which the kernel
/// stamps flows with (at tick resolution, a few ms behind at most).
pub(super) fn monotonic_ns() -> u64 {
    let mut ts = nix::libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out-pointer; CLOCK_MONOTONIC always exists on Linux.
    unsafe { nix::libc::clock_gettime(nix::libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn is_open(flow: &FlowValue) -> bool {
    flow.flags & flow_flags::COUNTED != 0 && flow.flags & flow_flags::CLOSED == 0
}

/// Sets every slot's count to the number of open flows on it (after a restart the counts in
/// the pinned array may include the old process's proxy sessions, which are gone). Returns
/// how many open flows there were.
pub fn rebuild_counts(bpf: &Ebpf, counters: &CounterTable) -> anyhow::Result<u64> {
    let mut open = vec![0u64; counters.len()];
    let total = count_open::<FlowKey>(bpf, names::FLOWS, &mut open)?
        + count_open::<FlowKey6>(bpf, names::FLOWS6, &mut open)?;
    for (slot, count) in open.into_iter().enumerate() {
        let current = counters.load(slot);
        counters.add(slot, count.wrapping_sub(current) as i64);
    }
    Ok(total)
}

/// Adds the open flows of flow table `name` to their slots in `open`; returns how many.
fn count_open<K: aya::Pod>(bpf: &Ebpf, name: &str, open: &mut [u64]) -> anyhow::Result<u64> {
    let flows: HashMap<&MapData, K, FlowValue> = HashMap::try_from(
        bpf.map(name)
            .with_context(|| format!("map {name} missing"))?,
    )?;
    let mut total = 0;
    for entry in flows.iter() {
        let Ok((_, flow)) = entry else { continue };
        if is_open(&flow)
            && let Some(count) = open.get_mut(flow.backend as usize)
        {
            *count += 1;
            total += 1;
        }
    }
    Ok(total)
}

/// What one expiry pass goes by: per service index its idle timeout (also of services reloads
/// removed), the longest of them (for flows of an earlier run's services, in pinned maps), the
/// tables' capacity (bounding each walk), now.
struct Pass {
    timeouts: StdHashMap<u32, Duration>,
    longest: Duration,
    capacity: u64,
    now: u64,
}

impl Pass {
    /// How long `flow` may stay after its last packet.
    fn limit(&self, flow: &FlowValue) -> Duration {
        let timeout = self
            .timeouts
            .get(&flow.service)
            .copied()
            .unwrap_or(self.longest);
        if flow_ended(flow.flags) {
            timeout.min(ENDED_LINGER)
        } else if !is_open(flow) {
            timeout.min(CLOSED_LINGER)
        } else if flow.flags & flow_flags::ESTABLISHED == 0 {
            timeout.min(HANDSHAKE_LIMIT)
        } else {
            timeout
        }
    }

    /// Expires the flows of table `name` that outlived their limit (giving back the count of
    /// an open one, and adding its client to `sources` when it holds a unit of its source's)
    /// and adds the open flows left to their slots in `per_slot`. Returns the entries left (as
    /// walked: a walk restarted under eviction may see some twice).
    fn expire<K: aya::Pod + Eq + std::hash::Hash + ClientOf>(
        &self,
        bpf: &mut Ebpf,
        name: &str,
        counters: &CounterTable,
        per_slot: &mut [u64],
        sources: &mut Vec<(u32, Client)>,
    ) -> anyhow::Result<u64> {
        let mut flows: HashMap<&mut MapData, K, FlowValue> = HashMap::try_from(
            bpf.map_mut(name)
                .with_context(|| format!("map {name} missing"))?,
        )?;
        // A key deleted under the iterator (eviction, a FIN's cleanup) restarts it from the
        // first key: open flows are counted once by key, and the walk is bounded.
        let mut open: StdHashMap<K, u32> = StdHashMap::new();
        let mut expired: Vec<(K, FlowValue)> = Vec::new();
        let mut entries = 0u64;
        for (key, flow) in flows
            .iter()
            .take((self.capacity as usize).saturating_mul(2).max(1024))
            .filter_map(Result::ok)
        {
            entries += 1;
            if self.now.saturating_sub(flow.last_seen_ns) > self.limit(&flow).as_nanos() as u64 {
                expired.push((key, flow));
            } else if is_open(&flow) {
                open.insert(key, flow.backend);
            }
        }
        for (key, seen) in expired {
            // Re-read: a packet (or FIN) may have come since the scan.
            let Ok(flow) = flows.get(&key, 0) else {
                continue;
            };
            if flow.last_seen_ns != seen.last_seen_ns || flow.flags != seen.flags {
                if is_open(&flow) {
                    open.insert(key, flow.backend);
                }
                continue;
            }
            if flows.remove(&key).is_err() {
                continue;
            }
            entries = entries.saturating_sub(1);
            if is_open(&flow) && (flow.backend as usize) < counters.len() {
                counters.add(flow.backend as usize, -1);
            }
            if is_open(&flow) && flow.flags & flow_flags::SOURCE_COUNTED != 0 {
                sources.push((flow.service, key.client()));
            }
        }
        for slot in open.into_values() {
            if let Some(count) = per_slot.get_mut(slot as usize) {
                *count += 1;
            }
        }
        Ok(entries)
    }
}

/// Periodic expiry and count reconciliation, both from one scan of the flow table.
///
/// A backend's true count is its open flows in the table plus this process's proxy sessions
/// on it. Any other difference is drift: an open flow evicted from a full (LRU) flow table
/// takes its unit with it, and a flow whose FIN the kernel missed may outlive its client. The
/// scan is not a snapshot (the kernel adds and closes flows meanwhile), so a difference is
/// corrected only when the very same difference is seen on two passes in a row: a transient
/// one changes from pass to pass, drift stays until corrected. The correction is an atomic add
/// of the difference, so no concurrent kernel update is lost.
#[derive(Default)]
pub struct Expiry {
    last: Option<Instant>,
    /// Per slot, the difference (count minus true count) seen on the previous pass.
    drift: Vec<i64>,
    /// Every xdp service of the run by index (also those reloads removed): its idle timeout
    /// and flow table size.
    services: StdHashMap<u32, (Duration, u64)>,
    /// Where each pass leaves the tables' fill and its corrections (for `/metrics`).
    gauges: Arc<FlowGauges>,
}

impl Expiry {
    pub fn reporting_to(gauges: Arc<FlowGauges>) -> Self {
        Self {
            gauges,
            ..Self::default()
        }
    }

    pub fn run(
        &mut self,
        bpf: &mut Ebpf,
        snapshot: &Snapshot,
        counters: &CounterTable,
    ) -> anyhow::Result<()> {
        // Services that left the config keep their idle timeout (and their share of the
        // tables' capacity) for the run: their flows finish and expire as they would have.
        for service in &snapshot.services {
            if let Some(xdp) = &service.config.xdp {
                self.services.insert(
                    service.kernel_index,
                    (xdp.flow_idle_timeout, u64::from(xdp.flow_table_size)),
                );
            }
        }
        let timeouts: StdHashMap<u32, Duration> = self
            .services
            .iter()
            .map(|(&index, &(timeout, _))| (index, timeout))
            .collect();
        let Some(&shortest) = timeouts.values().min() else {
            return Ok(());
        };
        let period = (shortest / 4).clamp(Duration::from_millis(500), Duration::from_secs(30));
        if self.last.is_some_and(|last| last.elapsed() < period) {
            return Ok(());
        }
        self.last = Some(Instant::now());
        let longest = timeouts.values().max().copied().unwrap_or(shortest);
        let capacity: u64 = self.services.values().map(|&(_, size)| size).sum();
        let now = monotonic_ns();
        let pass = Pass {
            timeouts,
            longest,
            capacity,
            now,
        };
        let mut per_slot = vec![0u64; counters.len()];
        let mut sources = Vec::new();
        let entries =
            pass.expire::<FlowKey>(bpf, names::FLOWS, counters, &mut per_slot, &mut sources)?;
        self.gauges.entries_ipv4.store(entries, Ordering::Relaxed);
        let entries =
            pass.expire::<FlowKey6>(bpf, names::FLOWS6, counters, &mut per_slot, &mut sources)?;
        self.gauges.entries_ipv6.store(entries, Ordering::Relaxed);
        limits::release_sources(bpf, &sources)?;
        self.reconcile(&per_slot, snapshot, counters);

        let limit = (capacity as usize).saturating_mul(2).max(1024);
        let idle = |last_seen_ns: u64| now.saturating_sub(last_seen_ns) > longest.as_nanos() as u64;
        forget_replies::<FlowKey, NatReply>(bpf, names::NAT_REPLIES, limit, |r| {
            idle(r.last_seen_ns)
        })?;
        forget_replies::<FlowKey6, NatReply6>(bpf, names::NAT_REPLIES6, limit, |r| {
            idle(r.last_seen_ns)
        })
    }

    /// Compares every slot's count with `open` flows plus proxy sessions and corrects the
    /// differences that held still since the previous pass; one warning per pass names them.
    fn reconcile(&mut self, open: &[u64], snapshot: &Snapshot, counters: &CounterTable) {
        self.drift.resize(counters.len(), 0);
        let mut corrected = Vec::new();
        for (slot, &flows) in open.iter().enumerate().take(counters.len()) {
            // Sessions first, the count last: whatever starts in between reads as one too
            // many for a moment, which the next pass no longer sees.
            let sessions = counters.sessions(slot);
            let count = counters.load(slot);
            let difference = count.wrapping_sub(flows.wrapping_add(sessions)) as i64;
            let previous = std::mem::replace(&mut self.drift[slot], difference);
            if difference != 0 && difference == previous {
                counters.add(slot, -difference);
                self.drift[slot] = 0;
                corrected.push((slot, difference));
            }
        }
        if corrected.is_empty() {
            return;
        }
        let names = slot_names(snapshot);
        let list: Vec<String> = corrected
            .iter()
            .map(|&(slot, difference)| {
                let name = names.get(&slot).map_or("?", String::as_str);
                format!("{name} {:+}", -difference)
            })
            .collect();
        let total: i64 = corrected.iter().map(|&(_, d)| d.abs()).sum();
        self.gauges
            .corrected
            .fetch_add(total.unsigned_abs(), Ordering::Relaxed);
        warn!(
            "XDP: corrected active counts that drifted by {total} in all: {} (open flows evicted from a full flow table, or ended unseen)",
            list.join(", ")
        );
    }
}

/// Deletes the entries of nat reply table `name` (at most `limit` looked at) that are `stale`.
fn forget_replies<K: aya::Pod, V: aya::Pod>(
    bpf: &mut Ebpf,
    name: &str,
    limit: usize,
    stale: impl Fn(&V) -> bool,
) -> anyhow::Result<()> {
    let mut replies: HashMap<&mut MapData, K, V> = HashMap::try_from(
        bpf.map_mut(name)
            .with_context(|| format!("map {name} missing"))?,
    )?;
    let stale: Vec<K> = replies
        .iter()
        .take(limit)
        .filter_map(Result::ok)
        .filter(|(_, reply)| stale(reply))
        .map(|(key, _)| key)
        .collect();
    for key in stale {
        let _ = replies.remove(&key);
    }
    Ok(())
}

/// Backend name(s) of every counter slot, for logs (a slot shared by services under different
/// names lists each name once).
fn slot_names(snapshot: &Snapshot) -> StdHashMap<usize, String> {
    let mut names: StdHashMap<usize, String> = StdHashMap::new();
    for backend in snapshot.services.iter().flat_map(|s| &s.backends) {
        let entry = names.entry(backend.active.slot()).or_default();
        if !entry.split('/').any(|n| n == backend.config.name) {
            if !entry.is_empty() {
                entry.push('/');
            }
            entry.push_str(&backend.config.name);
        }
    }
    names
}
