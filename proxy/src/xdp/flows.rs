//! The flow table from userspace: expiring flows that ended without a FIN the kernel saw
//! (client vanished, RST lost, entry idle), and rebuilding the active counts from it after a
//! restart, so the shared counts never drift.
//!
//! A flow holds one unit of its backend's count while `COUNTED` is set and `CLOSED` is not.
//! Expiry deletes the entry first and gives the count back only if the deletion succeeded, so
//! the kernel and this task cannot both give it back (apart from a FIN arriving in the same
//! microsecond as the expiry of a flow idle for `flow_idle_timeout`).

use std::collections::HashMap as StdHashMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use aya::Ebpf;
use aya::maps::{HashMap, MapData};
use switchyard_common::maps::{FlowKey, FlowValue, NatReply, flow_flags, names};

use crate::counters::CounterTable;
use crate::state::Snapshot;

/// Closed flows stay this long after their last packet, for the final ACKs (capped by the
/// service's idle timeout).
const CLOSED_LINGER: Duration = Duration::from_secs(30);

/// A flow whose handshake never completed (no ACK from the client) holds its count this long
/// at most, so SYNs to nowhere or a SYN flood cannot inflate least_conn's counts for the whole
/// idle timeout (capped by the service's idle timeout).
const HANDSHAKE_LIMIT: Duration = Duration::from_secs(10);

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns`.
fn monotonic_ns() -> u64 {
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
    let flows: HashMap<&MapData, FlowKey, FlowValue> =
        HashMap::try_from(bpf.map(names::FLOWS).context("map FLOWS missing")?)?;
    let mut open = vec![0u64; counters.len()];
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
    for (slot, count) in open.into_iter().enumerate() {
        let current = counters.load(slot);
        counters.add(slot, count.wrapping_sub(current) as i64);
    }
    Ok(total)
}

/// Periodic expiry; keeps when it last ran.
#[derive(Default)]
pub struct Expiry {
    last: Option<Instant>,
}

impl Expiry {
    pub fn run(
        &mut self,
        bpf: &mut Ebpf,
        snapshot: &Snapshot,
        counters: &CounterTable,
    ) -> anyhow::Result<()> {
        let timeouts: StdHashMap<u32, Duration> = snapshot
            .services
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                s.config
                    .xdp
                    .as_ref()
                    .map(|x| (i as u32, x.flow_idle_timeout))
            })
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
        let now = monotonic_ns();

        let mut flows: HashMap<&mut MapData, FlowKey, FlowValue> =
            HashMap::try_from(bpf.map_mut(names::FLOWS).context("map FLOWS missing")?)?;
        let expired: Vec<(FlowKey, FlowValue)> = flows
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, flow)| {
                let timeout = timeouts.get(&flow.service).copied().unwrap_or(longest);
                let limit = if !is_open(flow) {
                    timeout.min(CLOSED_LINGER)
                } else if flow.flags & flow_flags::ESTABLISHED == 0 {
                    timeout.min(HANDSHAKE_LIMIT)
                } else {
                    timeout
                };
                now.saturating_sub(flow.last_seen_ns) > limit.as_nanos() as u64
            })
            .collect();
        for (key, seen) in expired {
            // Re-read: a packet (or FIN) may have come since the scan.
            let Ok(flow) = flows.get(&key, 0) else {
                continue;
            };
            if flow.last_seen_ns != seen.last_seen_ns || flow.flags != seen.flags {
                continue;
            }
            if flows.remove(&key).is_ok()
                && is_open(&flow)
                && (flow.backend as usize) < counters.len()
            {
                counters.add(flow.backend as usize, -1);
            }
        }

        let mut replies: HashMap<&mut MapData, FlowKey, NatReply> = HashMap::try_from(
            bpf.map_mut(names::NAT_REPLIES)
                .context("map NAT_REPLIES missing")?,
        )?;
        let stale: Vec<FlowKey> = replies
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, reply)| now.saturating_sub(reply.last_seen_ns) > longest.as_nanos() as u64)
            .map(|(key, _)| key)
            .collect();
        for key in stale {
            let _ = replies.remove(&key);
        }
        Ok(())
    }
}
