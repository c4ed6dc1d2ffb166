//! Per-source protection of a proxy service: the allow/deny lists, and per source (clients
//! grouped by `source_prefix_v4`/`_v6`) the concurrent sessions and the new-session rate, over
//! a table bounded by `tracked_sources`.
//!
//! The table is sharded (a lock per shard, taken once when a client is accepted and once when
//! its session ends); a shard that is full forgets its oldest source that has no session open
//! and a full bucket, so a flood of new sources cannot grow it. A source that finds every
//! entry busy is served untracked (counted): per-source limits cannot help against that many
//! distinct sources anyway, and the service's `max_connections` still holds.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwap;
use parking_lot::Mutex;

use crate::config::{LimitsConfig, mask};
use crate::throttle::{Gcra, Rate, now_ns};

const SHARDS: usize = 16;
/// Entries looked at for one eviction before giving up (all busy).
const EVICTION_TRIES: usize = 8;

/// What the limits say about a new client.
#[derive(Debug)]
pub enum Verdict {
    /// Served; the guard (when the source is tracked) gives its session back at the end.
    Admit(Option<SourceGuard>),
    /// In `deny`, or not in `allow`.
    Denied,
    /// At `per_source_connections`.
    TooMany,
    /// Over `per_source_rate`.
    TooFast,
}

/// Rejections and table pressure, for `ctl show`, the totals and metrics.
#[derive(Debug, Default)]
pub struct SourceCounts {
    pub denied: AtomicU64,
    pub too_many: AtomicU64,
    pub too_fast: AtomicU64,
    /// Clients served without tracking: the table was full of busy sources.
    pub untracked: AtomicU64,
}

/// One service's per-source state; reloads keep it and change its limits.
#[derive(Debug)]
pub struct Sources {
    /// Read once per accepted client without a lock; a reload swaps it.
    limits: ArcSwap<LimitsConfig>,
    shards: Box<[Mutex<Shard>]>,
    pub counts: SourceCounts,
}

#[derive(Debug, Default)]
struct Shard {
    entries: HashMap<IpAddr, Entry>,
    /// Sources in the order they were first seen: eviction looks at the oldest.
    order: VecDeque<IpAddr>,
}

#[derive(Debug, Default)]
struct Entry {
    active: u32,
    rate: Gcra,
}

/// One session's unit of its source's count, given back on drop.
#[derive(Debug)]
pub struct SourceGuard {
    sources: Arc<Sources>,
    key: IpAddr,
}

impl Drop for SourceGuard {
    fn drop(&mut self) {
        let mut shard = self.sources.shard(self.key).lock();
        if let Some(entry) = shard.entries.get_mut(&self.key) {
            entry.active = entry.active.saturating_sub(1);
        }
    }
}

impl Sources {
    pub fn new(limits: &LimitsConfig) -> Self {
        Self {
            limits: ArcSwap::from_pointee(limits.clone()),
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            counts: SourceCounts::default(),
        }
    }

    /// Takes a reload's limits; sources already tracked keep their counts.
    pub fn configure(&self, limits: &LimitsConfig) {
        if **self.limits.load() != *limits {
            self.limits.store(Arc::new(limits.clone()));
        }
    }

    /// Sources tracked now.
    pub fn tracked(&self) -> usize {
        self.shards.iter().map(|s| s.lock().entries.len()).sum()
    }

    /// The verdict for a client at `ip`, counting a rejection.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Verdict {
        let limits = self.limits.load();
        if !limits.admits(ip) {
            self.counts.denied.fetch_add(1, Ordering::Relaxed);
            return Verdict::Denied;
        }
        if !limits.limits_sources() {
            return Verdict::Admit(None);
        }
        let ip = ip.to_canonical();
        let key = match ip {
            IpAddr::V4(_) => mask(ip, limits.source_prefix_v4),
            IpAddr::V6(_) => mask(ip, limits.source_prefix_v6),
        };
        let capacity = (limits.tracked_sources as usize).div_ceil(SHARDS).max(1);
        let rate = Rate {
            per_second: limits.per_source_rate,
            burst: limits.per_source_burst,
        };
        let (max_active, limit_rate) = (limits.per_source_connections, limits.per_source_rate != 0);
        drop(limits);
        let now = now_ns();
        let mut shard = self.shard(key).lock();
        let known = shard.entries.contains_key(&key);
        if !known && !shard.make_room(capacity, now) {
            self.counts.untracked.fetch_add(1, Ordering::Relaxed);
            return Verdict::Admit(None);
        }
        let shard = &mut *shard;
        if !known {
            shard.order.push_back(key);
        }
        let entry = shard.entries.entry(key).or_default();
        if max_active != 0 && entry.active >= max_active {
            self.counts.too_many.fetch_add(1, Ordering::Relaxed);
            return Verdict::TooMany;
        }
        if limit_rate && !entry.rate.try_take(rate, now) {
            self.counts.too_fast.fetch_add(1, Ordering::Relaxed);
            return Verdict::TooFast;
        }
        entry.active += 1;
        Verdict::Admit(Some(SourceGuard {
            sources: self.clone(),
            key,
        }))
    }

    fn shard(&self, key: IpAddr) -> &Mutex<Shard> {
        let folded = match key {
            IpAddr::V4(v4) => u64::from(u32::from(v4)),
            IpAddr::V6(v6) => {
                let bits = u128::from(v6);
                (bits as u64) ^ ((bits >> 64) as u64)
            }
        };
        // Fibonacci hashing spreads neighbouring networks over the shards.
        let index = (folded.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 60) as usize;
        &self.shards[index % SHARDS]
    }
}

impl Shard {
    /// Whether a new source fits, forgetting the oldest idle one when full.
    fn make_room(&mut self, capacity: usize, now: u64) -> bool {
        if self.entries.len() < capacity {
            return true;
        }
        for _ in 0..EVICTION_TRIES.min(self.order.len()) {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            let idle = self
                .entries
                .get(&oldest)
                .is_none_or(|e| e.active == 0 && e.rate.is_idle(now));
            if idle {
                self.entries.remove(&oldest);
                return true;
            }
            // Busy: it stays, and goes to the back of the line.
            self.order.push_back(oldest);
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(connections: u32, rate: u32, burst: u32, tracked: u32) -> LimitsConfig {
        LimitsConfig {
            per_source_connections: connections,
            per_source_rate: rate,
            per_source_burst: burst,
            tracked_sources: tracked,
            ..LimitsConfig::default()
        }
    }

    #[test]
    fn concurrent_sessions_per_source_are_capped_and_given_back() {
        let sources = Arc::new(Sources::new(&limits(2, 0, 1, 100)));
        let ip: IpAddr = "192.0.2.1".parse().expect("ip");
        let a = sources.admit(ip);
        let b = sources.admit(ip);
        assert!(matches!(sources.admit(ip), Verdict::TooMany));
        assert!(matches!(
            sources.admit("192.0.2.2".parse().expect("ip")),
            Verdict::Admit(Some(_))
        ));
        drop(a);
        assert!(matches!(sources.admit(ip), Verdict::Admit(Some(_))));
        drop(b);
        assert_eq!(sources.counts.too_many.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn the_table_stays_within_its_bound_under_many_sources() {
        let sources = Arc::new(Sources::new(&limits(5, 0, 1, 160)));
        for i in 0..10_000u32 {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            let verdict = sources.admit(ip);
            assert!(matches!(verdict, Verdict::Admit(_)));
        }
        assert!(sources.tracked() <= 160, "{} tracked", sources.tracked());
    }

    #[test]
    fn busy_sources_are_never_forgotten() {
        let sources = Arc::new(Sources::new(&limits(1, 0, 1, 16)));
        let held: Vec<_> = (0..64u32)
            .map(|i| sources.admit(IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i))))
            .collect();
        let tracked = held
            .iter()
            .filter(|v| matches!(v, Verdict::Admit(Some(_))))
            .count();
        assert!(tracked <= 16 + SHARDS, "{tracked}");
        assert!(sources.counts.untracked.load(Ordering::Relaxed) > 0);
        // Every tracked one still holds its count: a second session from it is refused.
        let first = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000));
        assert!(matches!(sources.admit(first), Verdict::TooMany));
    }
}
