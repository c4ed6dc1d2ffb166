//! `[service.limits]` of xdp services in the kernel's maps: each service's limits
//! (`SOURCE_LIMITS`, by kernel index), its deny and allow lists (`SOURCE_LISTS` and
//! `SOURCE_LISTS6`, one trie per address family holding every service's lists under a scope
//! word), the per-source table's size (`SOURCES`), the units of open flows the control plane
//! deletes, and how many sources each service has in the table.
//!
//! A change reaches the kernel at the next sync, in an order that never refuses a client
//! neither the old nor the new lists would refuse: added list entries first, then the limits
//! (whose flags switch a list on or off), then removed entries are deleted.
//!
//! `SOURCES` is one LRU table for every xdp service, sized at load to the sum of
//! `tracked_sources` over the xdp services that limit sources (at least `DEFAULT_SOURCES`):
//! the least recently seen source goes first, whichever service it belongs to. A reload that
//! asks for more keeps the size the table was made with (a warning says so).

use std::collections::{HashMap as StdHashMap, HashSet};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use anyhow::Context;
use aya::Ebpf;
use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, HashMap, MapData};
use parking_lot::Mutex;
use switchyard_common::maps::{
    DEFAULT_SOURCES, ListAddr4, ListAddr6, SourceKey, SourceLimits, SourceValue, names,
    source_limits, source_list,
};
use tracing::warn;

use super::tables::words;
use crate::config::{Dataplane, LimitsConfig, Prefix, ServiceConfig};
use crate::throttle::Rate;

/// A flow's client, as the flow tables hold it (network byte order).
#[derive(Clone, Copy, Debug)]
pub(super) enum Client {
    V4(u32),
    V6([u32; 4]),
}

/// Entries of `SOURCES`: the sum of `tracked_sources` over the xdp services that limit
/// sources, at least `DEFAULT_SOURCES`.
pub(super) fn table_capacity<'a>(services: impl IntoIterator<Item = &'a ServiceConfig>) -> u32 {
    services
        .into_iter()
        .filter(|s| s.dataplane == Dataplane::Xdp && s.limits.limits_sources())
        .map(|s| s.limits.tracked_sources)
        .fold(0u32, u32::saturating_add)
        .max(DEFAULT_SOURCES)
}

/// What the sync last wrote for one service's limits.
#[derive(Clone, Debug)]
pub(super) struct ProgrammedLimits {
    config: LimitsConfig,
    v4: HashSet<(u32, ListAddr4)>,
    v6: HashSet<(u32, ListAddr6)>,
}

impl ProgrammedLimits {
    /// Whether `limits` is what was written.
    pub(super) fn is(&self, limits: &LimitsConfig) -> bool {
        &self.config == limits
    }
}

/// Writes the limits and lists of the service at `index`, deleting the list entries written
/// before (`previous`) that are no longer in them.
pub(super) fn program_limits(
    bpf: &mut Ebpf,
    index: u32,
    limits: &LimitsConfig,
    previous: Option<&ProgrammedLimits>,
) -> anyhow::Result<ProgrammedLimits> {
    let (v4, v6) = list_entries(index, limits);
    let old_v4 = previous.map(|p| p.v4.clone()).unwrap_or_default();
    let old_v6 = previous.map(|p| p.v6.clone()).unwrap_or_default();
    {
        let mut trie = trie::<ListAddr4>(bpf, names::SOURCE_LISTS)?;
        for (length, data) in v4.difference(&old_v4) {
            trie.insert(&Key::new(*length, *data), 1, 0)
                .context("writing an IPv4 network of [service.limits] into SOURCE_LISTS")?;
        }
    }
    {
        let mut trie = trie::<ListAddr6>(bpf, names::SOURCE_LISTS6)?;
        for (length, data) in v6.difference(&old_v6) {
            trie.insert(&Key::new(*length, *data), 1, 0)
                .context("writing an IPv6 network of [service.limits] into SOURCE_LISTS6")?;
        }
    }
    let mut array: Array<&mut MapData, SourceLimits> = Array::try_from(
        bpf.map_mut(names::SOURCE_LIMITS)
            .context("map SOURCE_LIMITS missing")?,
    )?;
    array
        .set(index, limits_value(limits), 0)
        .context("writing the service's limits into SOURCE_LIMITS")?;
    // Removed entries last; one already gone is fine.
    {
        let mut trie = trie::<ListAddr4>(bpf, names::SOURCE_LISTS)?;
        for (length, data) in old_v4.difference(&v4) {
            let _ = trie.remove(&Key::new(*length, *data));
        }
    }
    let mut trie = trie::<ListAddr6>(bpf, names::SOURCE_LISTS6)?;
    for (length, data) in old_v6.difference(&v6) {
        let _ = trie.remove(&Key::new(*length, *data));
    }
    Ok(ProgrammedLimits {
        config: limits.clone(),
        v4,
        v6,
    })
}

/// Before a run's first sync: forgets every list entry and limit (pinned maps hold an earlier
/// run's, whose service indexes may differ); this run's are written next.
pub(super) fn prepare_first_sync(bpf: &mut Ebpf) -> anyhow::Result<()> {
    clear_trie::<ListAddr4>(bpf, names::SOURCE_LISTS)?;
    clear_trie::<ListAddr6>(bpf, names::SOURCE_LISTS6)?;
    let mut array: Array<&mut MapData, SourceLimits> = Array::try_from(
        bpf.map_mut(names::SOURCE_LIMITS)
            .context("map SOURCE_LIMITS missing")?,
    )?;
    for index in 0..array.len() {
        array
            .set(index, SourceLimits::default(), 0)
            .context("clearing SOURCE_LIMITS")?;
    }
    Ok(())
}

fn clear_trie<K: aya::Pod>(bpf: &mut Ebpf, name: &str) -> anyhow::Result<()> {
    let mut trie = trie::<K>(bpf, name)?;
    let keys: Vec<Key<K>> = trie.keys().filter_map(Result::ok).collect();
    for key in keys {
        let _ = trie.remove(&key);
    }
    Ok(())
}

fn trie<'a, K: aya::Pod>(
    bpf: &'a mut Ebpf,
    name: &str,
) -> anyhow::Result<LpmTrie<&'a mut MapData, K, u32>> {
    let map = bpf
        .map_mut(name)
        .with_context(|| format!("map {name} missing"))?;
    Ok(LpmTrie::try_from(map)?)
}

/// The kernel's form of `limits`.
pub(super) fn limits_value(limits: &LimitsConfig) -> SourceLimits {
    let mut flags = 0;
    if !limits.deny.is_empty() {
        flags |= source_limits::HAS_DENY;
    }
    if limits.allow.is_some() {
        flags |= source_limits::HAS_ALLOW;
    }
    if limits.limits_sources() {
        flags |= source_limits::TRACKS;
    }
    let rate = Rate {
        per_second: limits.per_source_rate,
        burst: limits.per_source_burst,
    };
    let limited = limits.per_source_rate != 0;
    SourceLimits {
        flags,
        per_source_connections: limits.per_source_connections,
        interval_ns: if limited { rate.interval() } else { 0 },
        tolerance_ns: if limited { rate.tolerance() } else { 0 },
        mask_v4: u32::from_ne_bytes(mask_bytes::<4>(limits.source_prefix_v4)),
        mask_v6: words(mask_bytes::<16>(limits.source_prefix_v6)),
        _pad: 0,
    }
}

/// A network mask of `length` leading one bits, as bytes in network order.
fn mask_bytes<const N: usize>(length: u8) -> [u8; N] {
    let mut bytes = [0u8; N];
    for (i, byte) in bytes.iter_mut().enumerate() {
        let ones = usize::from(length).saturating_sub(i * 8).min(8);
        *byte = !(0xffu8.checked_shr(ones as u32).unwrap_or(0));
    }
    bytes
}

type ListEntries = (HashSet<(u32, ListAddr4)>, HashSet<(u32, ListAddr6)>);

/// The trie entries (prefix length with the scope, key data) of the service's lists.
fn list_entries(index: u32, limits: &LimitsConfig) -> ListEntries {
    let mut v4 = HashSet::new();
    let mut v6 = HashSet::new();
    let lists = [
        (source_list::DENY, limits.deny.as_slice()),
        (
            source_list::ALLOW,
            limits.allow.as_deref().unwrap_or_default(),
        ),
    ];
    for (list, prefixes) in lists {
        let scope = source_list::scope(index, list);
        for Prefix { network, length } in prefixes {
            let length_bits = source_list::SCOPE_BITS + u32::from(*length);
            match network {
                IpAddr::V4(ip) => {
                    let addr = u32::from_ne_bytes(ip.octets());
                    v4.insert((length_bits, ListAddr4 { scope, addr }));
                }
                IpAddr::V6(ip) => {
                    let addr = words(ip.octets());
                    v6.insert((length_bits, ListAddr6 { scope, addr }));
                }
            }
        }
    }
    (v4, v6)
}

/// Gives back one unit per open flow the control plane deleted that held its source's
/// (`SOURCE_COUNTED`): `(service index, client)`. A read and a write, not an atomic update
/// (a hash map's value cannot be mapped): a kernel update of the same source between the
/// two is lost, which at worst leaves the source one unit off until its entry is evicted.
pub(super) fn release_sources(bpf: &mut Ebpf, released: &[(u32, Client)]) -> anyhow::Result<()> {
    if released.is_empty() {
        return Ok(());
    }
    let limits: Array<&MapData, SourceLimits> = Array::try_from(
        bpf.map(names::SOURCE_LIMITS)
            .context("map SOURCE_LIMITS missing")?,
    )?;
    let keys: Vec<SourceKey> = released
        .iter()
        .filter_map(|&(service, client)| {
            let limits = limits.get(&service, 0).ok()?;
            Some(match client {
                Client::V4(addr) => limits.key_v4(service, addr),
                Client::V6(addr) => limits.key_v6(service, addr),
            })
        })
        .collect();
    let mut sources: HashMap<&mut MapData, SourceKey, SourceValue> =
        HashMap::try_from(bpf.map_mut(names::SOURCES).context("map SOURCES missing")?)?;
    for key in keys {
        let Ok(mut value) = sources.get(&key, 0) else {
            continue;
        };
        if value.active > 0 {
            value.active -= 1;
            // BPF_EXIST: an entry evicted meanwhile is not made again.
            let _ = sources.insert(key, value, 2);
        }
    }
    Ok(())
}

/// How often the per-source table is walked to count each service's sources.
const COUNT_PERIOD: Duration = Duration::from_secs(5);

/// Sources in `SOURCES` per service index, as the last walk found them.
#[derive(Default)]
pub struct SourceGauges {
    /// Entries the table was made with.
    capacity: u32,
    tracked: Mutex<StdHashMap<u32, u64>>,
    last: Mutex<Option<Instant>>,
    warned: Mutex<bool>,
}

impl SourceGauges {
    pub(super) fn new(capacity: u32) -> Self {
        Self {
            capacity,
            ..Self::default()
        }
    }

    /// Sources of the service at `index` in the table at the last walk.
    pub fn tracked(&self, index: u32) -> u64 {
        self.tracked.lock().get(&index).copied().unwrap_or(0)
    }

    /// Walks the table (at most once per `COUNT_PERIOD`, at most twice its capacity keys) and
    /// counts each service's sources; warns once when `config` asks for more sources than the
    /// table was made with.
    pub(super) fn refresh(&self, bpf: &Ebpf, config_capacity: u32) -> anyhow::Result<()> {
        {
            let mut last = self.last.lock();
            if last.is_some_and(|at| at.elapsed() < COUNT_PERIOD) {
                return Ok(());
            }
            *last = Some(Instant::now());
        }
        let sources: HashMap<&MapData, SourceKey, SourceValue> =
            HashMap::try_from(bpf.map(names::SOURCES).context("map SOURCES missing")?)?;
        let capacity = self.capacity;
        let mut warned = self.warned.lock();
        if config_capacity > capacity && !*warned {
            *warned = true;
            warn!(
                "XDP: [service.limits] tracked_sources sum to {config_capacity} over the xdp services; the kernel's per-source table was made with {capacity} entries at start and keeps that size until a restart"
            );
        }
        let mut counted: StdHashMap<u32, u64> = StdHashMap::new();
        let limit = (capacity as usize).saturating_mul(2);
        for key in sources.keys().take(limit).filter_map(Result::ok) {
            *counted.entry(key.service).or_default() += 1;
        }
        *self.tracked.lock() = counted;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_keep_the_prefix_bits_in_network_order() {
        assert_eq!(mask_bytes::<4>(24), [255, 255, 255, 0]);
        assert_eq!(mask_bytes::<4>(32), [255; 4]);
        assert_eq!(mask_bytes::<4>(8), [255, 0, 0, 0]);
        assert_eq!(mask_bytes::<4>(12), [255, 0xf0, 0, 0]);
        let v6 = mask_bytes::<16>(64);
        assert_eq!(&v6[..8], &[255; 8]);
        assert_eq!(&v6[8..], &[0; 8]);
    }
}
