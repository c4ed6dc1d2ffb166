//! The program's maps, one static each; their key and value layouts live in
//! `switchyard_common::maps`, shared with the control plane that sizes, fills and reads them.
//! The static's name is the map's name the loader looks up.

use aya_ebpf::macros::map;
use aya_ebpf::maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray};
use switchyard_common::MAGLEV_TABLE_SIZE;
use switchyard_common::MAX_BACKENDS;
use switchyard_common::maps::{
    ActiveCell, BackendEntry, BackendEntry6, BackendStats, ClockCache, DEFAULT_BACKEND_SLOTS, DEFAULT_FLOWS,
    DEFAULT_LIST_ENTRIES, DEFAULT_SERVICES, DEFAULT_SOURCES, FlowKey, FlowKey6, FlowValue, ListAddr4,
    ListAddr6, MAX_PEER_MACS, NatReply, NatReply6, PeerMac, SecondChanceRing, ServiceBackend, ServiceKey, ServiceKey6, ServiceRoute,
    ServiceStats, ServiceValue, SourceKey, SourceLimits, SourceStats, SourceValue,
    WEIGHTED_TABLE_SIZE, address_filter,
};

/// `BPF_F_MMAPABLE`: the control plane maps the active counts into its address space.
const BPF_F_MMAPABLE: u32 = 1 << 10;

#[map]
pub static SERVICES: HashMap<ServiceKey, ServiceValue> =
    HashMap::with_max_entries(DEFAULT_SERVICES, 0);
/// Per service index, its VIP and forwarding: a flow's packets find their service here.
#[map]
pub static SERVICE_ROUTES: Array<ServiceRoute> = Array::with_max_entries(DEFAULT_SERVICES, 0);
/// This CPU's coarse clock as of its tick (`clock`).
#[map]
pub static CLOCK_CACHE: PerCpuArray<ClockCache> = PerCpuArray::with_max_entries(1, 0);
/// Which addresses may be a VIP or a backend (`switchyard_common::maps::address_filter`).
#[map]
pub static ADDRESS_FILTER: Array<u64> = Array::with_max_entries(2 * address_filter::WORDS, 0);
#[map]
pub static SERVICES6: HashMap<ServiceKey6, ServiceValue> =
    HashMap::with_max_entries(DEFAULT_SERVICES, 0);
#[map]
pub static BACKENDS: Array<BackendEntry> = Array::with_max_entries(DEFAULT_BACKEND_SLOTS, 0);
/// IPv6 backends' addresses by slot (nat's rewrite target for IPv6 flows).
#[map]
pub static BACKENDS6: Array<BackendEntry6> = Array::with_max_entries(DEFAULT_BACKEND_SLOTS, 0);
/// Per service, its backends' slots and policy (weight, cap, state), two halves of
/// `MAX_BACKENDS` entries each (see `service_backend_index`).
#[map]
pub static SERVICE_BACKENDS: Array<ServiceBackend> =
    Array::with_max_entries(DEFAULT_SERVICES * 2 * MAX_BACKENDS as u32, 0);
/// The shared per-backend active counts (the proxy's `CounterTable` maps this array).
#[map]
pub static ACTIVE: Array<ActiveCell> =
    Array::with_max_entries(DEFAULT_BACKEND_SLOTS, BPF_F_MMAPABLE);
/// Per backend slot, GCRA's arrival time of the next new flow under its `max_session_rate`
/// (coarse clock, ns); read and taken only on SYNs to a rate-limited backend.
#[map]
pub static BACKEND_RATES: Array<u64> = Array::with_max_entries(DEFAULT_BACKEND_SLOTS, 0);
#[map]
pub static BACKEND_STATS: PerCpuArray<BackendStats> =
    PerCpuArray::with_max_entries(DEFAULT_BACKEND_SLOTS, 0);
#[map]
pub static SERVICE_STATS: PerCpuArray<ServiceStats> =
    PerCpuArray::with_max_entries(DEFAULT_SERVICES, 0);
#[map]
pub static FLOWS: LruHashMap<FlowKey, FlowValue> = LruHashMap::with_max_entries(DEFAULT_FLOWS, 0);
#[map]
pub static FLOWS6: LruHashMap<FlowKey6, FlowValue> = LruHashMap::with_max_entries(DEFAULT_FLOWS, 0);
#[map]
pub static NAT_REPLIES: LruHashMap<FlowKey, NatReply> =
    LruHashMap::with_max_entries(DEFAULT_FLOWS, 0);
#[map]
pub static NAT_REPLIES6: LruHashMap<FlowKey6, NatReply6> =
    LruHashMap::with_max_entries(DEFAULT_FLOWS, 0);
/// Two Maglev tables per service (double buffer); entries are backend indexes within the service.
#[map]
pub static MAGLEV: Array<u32> = Array::with_max_entries(2 * MAGLEV_TABLE_SIZE as u32, 0);
/// Two weighted round-robin tables per service (double buffer).
#[map]
pub static WEIGHTED: Array<u32> = Array::with_max_entries(2 * WEIGHTED_TABLE_SIZE, 0);
/// Each CPU walks the weighted table with its own cursor: no cross-CPU read-modify-write race.
#[map]
pub static RR_CURSOR: PerCpuArray<u32> = PerCpuArray::with_max_entries(DEFAULT_SERVICES, 0);
/// Every service's deny and allow lists of IPv4 networks (`switchyard_common::maps::source_list`).
#[map]
pub static SOURCE_LISTS: LpmTrie<ListAddr4, u32> = LpmTrie::with_max_entries(DEFAULT_LIST_ENTRIES, 0);
/// The same lists' IPv6 networks.
#[map]
pub static SOURCE_LISTS6: LpmTrie<ListAddr6, u32> = LpmTrie::with_max_entries(DEFAULT_LIST_ENTRIES, 0);
/// Per service index, its `[service.limits]`.
#[map]
pub static SOURCE_LIMITS: Array<SourceLimits> = Array::with_max_entries(DEFAULT_SERVICES, 0);
/// Per source of a service: open flows and the rate limit's state; an LRU, so a flood of
/// spoofed sources evicts the least recently seen instead of growing it.
#[map]
pub static SOURCES: LruHashMap<SourceKey, SourceValue> =
    LruHashMap::with_max_entries(DEFAULT_SOURCES, 0);
/// SYNs dropped by `[service.limits]`, by reason.
#[map]
pub static SOURCE_STATS: PerCpuArray<SourceStats> =
    PerCpuArray::with_max_entries(DEFAULT_SERVICES, 0);
/// Where this host hands on a packet it cannot place (`second_chance`); one entry.
#[map]
pub static SECOND_CHANCE: Array<SecondChanceRing> = Array::with_max_entries(1, 0);
/// The other balancers' MACs: a packet from one of them is on its second chance.
#[map]
pub static PEER_MACS: HashMap<PeerMac, u32> = HashMap::with_max_entries(MAX_PEER_MACS, 0);
