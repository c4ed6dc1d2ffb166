//! `[service.limits]` on the kernel path, applied to a SYN that would open a new flow: the
//! deny list, then the allow list (LPM tries `SOURCE_LISTS`/`SOURCE_LISTS6`, every service's
//! lists in one trie per address family), then the source's concurrent flows and its rate of
//! new flows (`SOURCES`, an LRU keyed by service and masked source). A SYN over a limit is
//! dropped and counted by reason (`SOURCE_STATS`): the client's TCP retries it, and no socket,
//! skb or reply is spent on it. A flow opened under a tracked source carries `SOURCE_COUNTED`
//! and gives its unit back where the backend's is given back (`flow::close_flow`, or the
//! control plane's expiry of an open flow).
//!
//! Counts are exact within the table: a source's unit is taken by atomic add before the
//! check, so SYNs of one source on several CPUs cannot overshoot, and given back by
//! compare-and-swap that never goes below zero. The table is an LRU: a flood of spoofed
//! sources evicts the least recently seen entries; a source evicted while it has open flows
//! starts again from zero (counted low, never high, so no client is refused by it).

use core::intrinsics::{AtomicOrdering, atomic_cxchg, atomic_xadd, atomic_xsub};

use aya_ebpf::maps::lpm_trie::Key;
use switchyard_common::maps::{
    ListAddr4, ListAddr6, SourceKey, SourceLimits, SourceStats, SourceValue, source_limits,
    source_list,
};

use crate::maps::{SOURCE_LISTS, SOURCE_LISTS6, SOURCE_LIMITS, SOURCE_STATS, SOURCES};

/// `BPF_NOEXIST`: a source's entry is made once; a racing CPU's entry is kept.
const BPF_NOEXIST: u64 = 1;

/// A client's address as the packet has it (network byte order).
#[derive(Clone, Copy)]
pub enum Client {
    V4(u32),
    V6([u32; 4]),
}

/// What `[service.limits]` make of a SYN.
pub enum Admission {
    /// It may open a flow; with the source's entry when its unit was taken (the flow then
    /// carries `SOURCE_COUNTED`, or the unit goes back through [`release`] if no flow is made).
    Open(Option<*mut SourceValue>),
    /// Dropped (counted).
    Refused,
}

/// Applies the limits of the service at `index` to a SYN from `client` at `now`.
#[inline(always)]
pub fn admit(index: u32, client: Client, now: u64) -> Admission {
    let Some(limits) = SOURCE_LIMITS.get(index) else {
        return Admission::Open(None);
    };
    let flags = limits.flags;
    if flags == 0 {
        return Admission::Open(None);
    }
    if flags & source_limits::HAS_DENY != 0 && listed(index, source_list::DENY, client) {
        count(index, |s| s.denied += 1);
        return Admission::Refused;
    }
    if flags & source_limits::HAS_ALLOW != 0 && !listed(index, source_list::ALLOW, client) {
        count(index, |s| s.not_allowed += 1);
        return Admission::Refused;
    }
    if flags & source_limits::TRACKS == 0 {
        return Admission::Open(None);
    }
    let Some(entry) = entry_of(&source_key(index, client, limits)) else {
        // No entry could be made (cannot happen with an LRU): served untracked.
        return Admission::Open(None);
    };
    let active = unsafe { &raw mut (*entry).active };
    let before = unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(active, 1) };
    let cap = limits.per_source_connections as u64;
    if cap != 0 && before >= cap {
        give_back(entry);
        count(index, |s| s.too_many += 1);
        return Admission::Refused;
    }
    if limits.interval_ns != 0 && !take_token(entry, limits, now) {
        give_back(entry);
        count(index, |s| s.too_fast += 1);
        return Admission::Refused;
    }
    Admission::Open(Some(entry))
}

/// A flow from `client` of the service at `index` that held a unit of its source's count
/// ended (or was never made): the unit goes back. Under a limit changed by a reload (another
/// prefix) the source may be another entry, or gone: nothing then goes below zero.
#[inline(always)]
pub fn release(index: u32, client: Client) {
    let Some(limits) = SOURCE_LIMITS.get(index) else {
        return;
    };
    if let Some(entry) = SOURCES.get_ptr_mut(&source_key(index, client, limits)) {
        give_back(entry);
    }
}

/// Takes one unit back from the source's count: by compare-and-swap, never below zero; under
/// heavy contention a plain subtract (below).
#[inline(always)]
pub fn give_back(entry: *mut SourceValue) {
    let active = unsafe { &raw mut (*entry).active };
    for _ in 0..4 {
        let seen = unsafe { core::ptr::read_volatile(active) };
        if seen == 0 {
            return;
        }
        let (_, swapped) = unsafe {
            atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(
                active,
                seen,
                seen - 1,
            )
        };
        if swapped {
            return;
        }
    }
    // Heavy contention on one source: a plain subtract of a count known to be above zero a
    // moment ago (the CPUs that won the swaps each took one unit off too).
    unsafe { atomic_xsub::<u64, u64, { AtomicOrdering::SeqCst }>(active, 1) };
}

/// GCRA: the new flow is due at the later of now and the source's arrival time, plus one
/// interval; beyond a bucket's worth (`tolerance_ns`) ahead of now it is too fast.
#[inline(always)]
fn take_token(entry: *mut SourceValue, limits: &SourceLimits, now: u64) -> bool {
    let arrival = unsafe { &raw mut (*entry).arrival_ns };
    crate::rate::take(arrival, limits.interval_ns, limits.tolerance_ns, now)
}

/// The source's entry, made (zero) if it has none.
#[inline(always)]
fn entry_of(key: &SourceKey) -> Option<*mut SourceValue> {
    if let Some(entry) = SOURCES.get_ptr_mut(key) {
        return Some(entry);
    }
    let _ = SOURCES.insert(key, &SourceValue::default(), BPF_NOEXIST);
    SOURCES.get_ptr_mut(key)
}

/// The `SOURCES` key of `client` for the service at `index`: its address masked by the
/// service's source prefix.
#[inline(always)]
fn source_key(index: u32, client: Client, limits: &SourceLimits) -> SourceKey {
    match client {
        Client::V4(addr) => limits.key_v4(index, addr),
        Client::V6(addr) => limits.key_v6(index, addr),
    }
}

/// Whether `client` is in `list` of the service at `index`.
#[inline(always)]
fn listed(index: u32, list: u32, client: Client) -> bool {
    let scope = source_list::scope(index, list);
    match client {
        Client::V4(addr) => {
            let key = Key::new(source_list::SCOPE_BITS + 32, ListAddr4 { scope, addr });
            SOURCE_LISTS.get(&key).is_some()
        }
        Client::V6(addr) => {
            let key = Key::new(source_list::SCOPE_BITS + 128, ListAddr6 { scope, addr });
            SOURCE_LISTS6.get(&key).is_some()
        }
    }
}

#[inline(always)]
fn count(index: u32, update: impl FnOnce(&mut SourceStats)) {
    if let Some(stats) = SOURCE_STATS.get_ptr_mut(index) {
        update(unsafe { &mut *stats });
    }
}
