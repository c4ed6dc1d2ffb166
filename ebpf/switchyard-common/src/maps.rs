//! The layout of every BPF map the XDP program and the control plane share.
//!
//! One definition for both sides (no hand-synced headers): `#[repr(C)]` structs of plain
//! integers with explicit padding, so the kernel and userspace agree byte for byte and no
//! uninitialised padding ever reaches a map. Addresses and ports are kept in network byte order
//! (as they sit in the packet) so the fast path never swaps bytes.

/// One cell of `ACTIVE`, the shared active count of a backend slot: a 64-bit word because
/// Rust's BPF target offers atomics on 64-bit words only. Userspace maps the array and uses
/// `AtomicU64` on the same cells.
pub type ActiveCell = u64;

/// Map names, as the XDP object declares them and the loader looks them up.
pub mod names {
    pub const SERVICES: &str = "SERVICES";
    /// The IPv6 VIPs: the same services (`ServiceValue`, index and all) by IPv6 key.
    pub const SERVICES6: &str = "SERVICES6";
    pub const BACKENDS: &str = "BACKENDS";
    pub const SERVICE_BACKENDS: &str = "SERVICE_BACKENDS";
    pub const ACTIVE: &str = "ACTIVE";
    pub const BACKEND_STATS: &str = "BACKEND_STATS";
    pub const BACKEND_RATES: &str = "BACKEND_RATES";
    pub const SERVICE_STATS: &str = "SERVICE_STATS";
    pub const FLOWS: &str = "FLOWS";
    /// IPv6 flows: `FlowKey6` to the same `FlowValue` as `FLOWS` (a table of its own, so the
    /// IPv4 key stays 16 bytes).
    pub const FLOWS6: &str = "FLOWS6";
    pub const NAT_REPLIES: &str = "NAT_REPLIES";
    /// IPv6 backends' addresses (`BackendEntry6`), by the same slot as `BACKENDS`: nat
    /// rewrites IPv6 packets to them.
    pub const BACKENDS6: &str = "BACKENDS6";
    /// nat replies of IPv6 flows: `FlowKey6` (backend → client) to `NatReply6`.
    pub const NAT_REPLIES6: &str = "NAT_REPLIES6";
    pub const MAGLEV: &str = "MAGLEV";
    pub const WEIGHTED: &str = "WEIGHTED";
    pub const RR_CURSOR: &str = "RR_CURSOR";
    pub const ADDRESS_FILTER: &str = "ADDRESS_FILTER";
    pub const SERVICE_ROUTES: &str = "SERVICE_ROUTES";
    pub const CLOCK_CACHE: &str = "CLOCK_CACHE";
    /// `[service.limits]` deny and allow lists of IPv4 networks (`ListAddr4` tries).
    pub const SOURCE_LISTS: &str = "SOURCE_LISTS";
    /// The same lists' IPv6 networks (`ListAddr6` tries).
    pub const SOURCE_LISTS6: &str = "SOURCE_LISTS6";
    /// Per service index, its `[service.limits]` (`SourceLimits`).
    pub const SOURCE_LIMITS: &str = "SOURCE_LIMITS";
    /// The per-source table: `SourceKey` to `SourceValue`, an LRU bounded by `tracked_sources`.
    pub const SOURCES: &str = "SOURCES";
    /// Per-CPU, per service index: SYNs dropped by `[service.limits]`, by reason (`SourceStats`).
    pub const SOURCE_STATS: &str = "SOURCE_STATS";
    /// The second chance's ring (`SecondChanceRing`, one entry).
    pub const SECOND_CHANCE: &str = "SECOND_CHANCE";
    /// The other balancers' MACs on the second chance's interface (`PeerMac` to 1).
    pub const PEER_MACS: &str = "PEER_MACS";
}

/// Program names in the object.
pub mod programs {
    /// Balances new flows and forwards established ones; in `nat` mode also rewrites the
    /// backends' replies (attached to the client- and the backend-facing interface).
    pub const BALANCE: &str = "switchyard_balance";
    /// Passes everything: attached to a veth peer so that redirected frames are accepted.
    pub const PASS: &str = "switchyard_pass";
}

/// Default capacities; the control plane resizes maps before load from the config.
pub const DEFAULT_SERVICES: u32 = 64;
pub const DEFAULT_BACKEND_SLOTS: u32 = 4096;
pub const DEFAULT_FLOWS: u32 = 65536;
pub const DEFAULT_SOURCES: u32 = 1024;
/// Entries of the allow/deny tries (not preallocated: a bound only).
pub const DEFAULT_LIST_ENTRIES: u32 = 4096;
/// Entries reserved for one service's weighted round-robin table (one version): the longest
/// table `weighted_round_robin::build_table` can return.
pub const WEIGHTED_TABLE_SIZE: u32 =
    (crate::weighted_round_robin::WRR_TABLE_MAX + crate::MAX_BACKENDS) as u32;

/// `ServiceValue::algorithm`.
pub mod algorithm {
    pub const ROUND_ROBIN: u32 = 0;
    pub const WEIGHTED_ROUND_ROBIN: u32 = 1;
    pub const LEAST_CONN: u32 = 2;
    pub const IP_HASH: u32 = 3;
}

/// `ServiceValue::forwarding`.
pub mod forwarding {
    pub const DSR: u32 = 0;
    pub const NAT: u32 = 1;
    /// A proxy service's VIP:port, known to the kernel only for the second chance: its
    /// packets go to the local stack, unless no local socket wants them.
    pub const LOCAL: u32 = 2;
}

/// `BackendEntry::state`.
pub mod backend_state {
    /// Takes new flows.
    pub const UP: u32 = 0;
    /// Failed health checks: no new flows; existing flows go on (the backend may still answer).
    pub const DOWN: u32 = 1;
    /// Operator drain: existing flows keep their backend, no new ones.
    pub const DRAIN: u32 = 2;
    /// Disabled by `ctl disable`: no new flows; existing flows go on.
    pub const DISABLED: u32 = 3;

    /// Whether a backend in `state` may take a flow adopted mid-stream (an established session
    /// another balancer began, following the Maglev table here): only a down or disabled
    /// backend is skipped, as at SYN time. Drained still counts: the session may well predate
    /// the drain, and belongs where it is.
    #[inline(always)]
    pub fn takes_adopted(state: u32) -> bool {
        state == UP || state == DRAIN
    }
}

/// `FlowValue::flags`.
///
/// A flow's life: a SYN creates it (`COUNTED`); the client's ACK marks the handshake done
/// (`ESTABLISHED`); the client's FIN or RST, or (nat) the backend's RST, gives the count back
/// (`CLOSED`, set once by compare-and-swap, so the count is given back exactly once). It has
/// *ended* ([`flow_ended`]) after a RST from either side or FINs both ways; nat sees both ways,
/// dsr only the client's, so a dsr flow closed by a FIN counts as half-closed until it expires.
/// A closed flow never captures a new connection: a SYN on it starts a fresh flow (a new
/// backend choice), and a backend's SYN-ACK on it is not rewritten as the old flow's reply. An
/// ended flow still follows the old connection's last packets (final ACKs, retransmitted FINs)
/// for [`ENDED_LINGER_NS`] after its last packet, then stops matching at all.
pub mod flow_flags {
    /// The flow holds one unit of its backend's active count.
    pub const COUNTED: u64 = 1;
    /// The count has been given back (the client's FIN or RST, the backend's RST).
    pub const CLOSED: u64 = 2;
    /// The client sent an ACK on the flow: the handshake completed.
    pub const ESTABLISHED: u64 = 4;
    /// The client sent FIN.
    pub const CLIENT_FIN: u64 = 8;
    /// The backend sent FIN (seen in nat only: dsr replies bypass the balancer).
    pub const BACKEND_FIN: u64 = 16;
    /// Either side sent RST.
    pub const RESET: u64 = 32;
    /// The flow holds one unit of its source's count in `SOURCES` (given back with the
    /// backend's, by whoever sets `CLOSED` or deletes the open flow).
    pub const SOURCE_COUNTED: u64 = 64;
}

/// Whether a flow with `flags` has ended: a RST, or FINs both ways.
#[inline(always)]
pub fn flow_ended(flags: u64) -> bool {
    const BOTH_FINS: u64 = flow_flags::CLIENT_FIN | flow_flags::BACKEND_FIN;
    flags & flow_flags::RESET != 0 || flags & BOTH_FINS == BOTH_FINS
}

/// How long an ended flow keeps following packets after its last one: long enough for the
/// final ACK and a few retransmitted FINs (TCP's retransmission timer starts at 200 ms and
/// doubles), short enough that a stale entry is gone soon after. Then the kernel stops matching
/// it and the control plane deletes it.
pub const ENDED_LINGER_NS: u64 = 2_000_000_000;

pub const PROTO_TCP: u8 = 6;

/// Key of `SERVICES`: a VIP and port, network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceKey {
    pub addr: u32,
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// Key of `SERVICES6`: an IPv6 VIP (the address's four 32-bit words as they lie in the packet)
/// and port, network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceKey6 {
    pub addr: [u32; 4],
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// Value of `SERVICES` and `SERVICES6`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceValue {
    /// Index into per-service arrays (`SERVICE_STATS`, `RR_CURSOR`, `MAGLEV`, `WEIGHTED`).
    pub index: u32,
    /// One of [`algorithm`].
    pub algorithm: u32,
    /// One of [`forwarding`].
    pub forwarding: u32,
    /// The service's backends are entries
    /// `service_backend_index(index, table_version, 0 .. backend_count)` of `SERVICE_BACKENDS`.
    pub backend_count: u32,
    /// Which half (0 or 1) of the double-buffered `SERVICE_BACKENDS`, Maglev and weighted
    /// tables new flows read.
    pub table_version: u32,
    /// Used entries of the active weighted table (0 for algorithms without one).
    /// Written together with `table_version`, in the same map update.
    pub weighted_len: u32,
    /// [`service_flags`].
    pub flags: u32,
}

/// `ServiceValue::flags`.
pub mod service_flags {
    /// The service left the config: its established flows go on, a SYN without a flow passes
    /// to the stack. (The IPv6 path keeps such an entry in `SERVICES6`, since it finds a
    /// flow's service by its VIP; an IPv4 VIP's entry is deleted instead and its flows follow
    /// their `SERVICE_ROUTES` entry.)
    pub const RETIRED: u32 = 1;
    /// The service is announced and `[announce] peers` is set: a packet of it this host
    /// cannot place is handed to the next balancer (`second_chance`).
    pub const SECOND_CHANCE: u32 = 2;
}

/// Value of `SERVICE_ROUTES`, indexed by service index: what a packet of an existing flow needs
/// of its service, read by index instead of the `SERVICES` hash lookup. Written after the
/// service's `SERVICES` entry, with the same key and forwarding, so an entry whose `vip` is the
/// packet's VIP:port says what `SERVICES` would; anything else (an unused entry is all zero,
/// and no packet's key has protocol 0) sends the packet the `SERVICES` way.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceRoute {
    /// The service's `SERVICES` key.
    pub vip: ServiceKey,
    /// One of [`forwarding`], as in the service's `SERVICES` value.
    pub forwarding: u32,
    /// Reserved, zero.
    pub _pad: u32,
}

/// `ADDRESS_FILTER`: one bit per hash of an address and port, in two halves. A packet whose
/// destination has no bit in the VIP half is for no service, and one whose source has no bit
/// in the backend half is no nat backend's reply: such a packet passes after one array read,
/// with no hash-map lookup. The control plane sets a bit before it writes the `SERVICES` key or
/// the `BACKENDS` entry it stands for and never clears one, so the filter only errs towards a
/// lookup.
pub mod address_filter {
    /// 64-bit words per half (65 536 bits: a few false hits per thousand addresses).
    pub const WORDS: u32 = 1024;
    /// The half of VIP:ports (`SERVICES` keys).
    pub const VIPS: u32 = 0;
    /// The half of backend addr:ports (`BACKENDS` entries), sources of nat replies.
    pub const BACKENDS: u32 = 1;

    /// The word (index into the map) and the bit in it of `addr`:`port` (network byte order,
    /// as in the packet) in `half`.
    #[inline(always)]
    pub fn bit(half: u32, addr: u32, port: u16) -> (u32, u64) {
        // Fibonacci hashing: the top 16 bits of the product mix every input bit.
        let key = ((addr as u64) << 16) | port as u64;
        let hash = key.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 48;
        (half * WORDS + (hash >> 6) as u32, 1u64 << (hash & 63))
    }

    /// Sets the bit of `addr`:`port` in `half` of the control plane's handle on the map; call
    /// it before writing the `SERVICES` key or `BACKENDS` entry it stands for.
    #[cfg(feature = "user")]
    pub fn admit<T>(
        filter: &mut aya::maps::Array<T, u64>,
        half: u32,
        addr: u32,
        port: u16,
    ) -> Result<(), aya::maps::MapError>
    where
        T: core::borrow::BorrowMut<aya::maps::MapData>,
    {
        let (word, bit) = bit(half, addr, port);
        let current = filter.get(&word, 0)?;
        if current & bit == 0 {
            filter.set(word, current | bit, 0)?;
        }
        Ok(())
    }
}

/// Value of `BACKENDS`, indexed by backend slot: where a backend is. A slot is the backend's
/// cell in `ACTIVE` and in the proxy's counter table, so one backend serving several services
/// (or both data planes) can share one slot and one count.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendEntry {
    pub addr: u32,
    pub port: u16,
    pub mac: [u8; 6],
    /// Reserved (nat: interface index the backend is reached through; 0 = ask the FIB).
    pub ifindex: u32,
}

/// Value of `BACKENDS6`, indexed by the same backend slot as `BACKENDS`: an IPv6 backend's
/// address and port (network byte order, the address's words as in [`ServiceKey6`]), which nat
/// rewrites IPv6 packets to. All zero for a slot whose backend is IPv4.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendEntry6 {
    pub addr: [u32; 4],
    pub port: u16,
    pub _pad: u16,
}

/// Value of `SERVICE_BACKENDS`: one backend of one service, as that service's policy sees it.
/// Entries are indexed by [`service_backend_index`]; table entries (Maglev, weighted) name
/// backends by their index within the service.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceBackend {
    /// Slot in `BACKENDS` / `ACTIVE`.
    pub slot: u32,
    /// 1..=1000; 0 marks an unused entry.
    pub weight: u32,
    /// 0 = unlimited.
    pub max_connections: u32,
    /// One of [`backend_state`].
    pub state: u32,
    /// `max_session_rate` as GCRA parameters (ns between new flows at the steady rate, and how
    /// far ahead of now the slot's arrival time in `BACKEND_RATES` may run); 0 = no limit.
    pub rate_interval_ns: u64,
    pub rate_tolerance_ns: u64,
}

/// Entry of backend `i` of service `service` in half `version` of `SERVICE_BACKENDS`
/// (double-buffered like the tables: a change of the backend list is written into the half new
/// flows do not read, then `table_version` flips).
#[inline(always)]
pub fn service_backend_index(service: u32, version: u32, i: u32) -> u32 {
    (service * 2 + (version & 1)) * crate::MAX_BACKENDS as u32 + i
}

/// Key of `FLOWS` (client → VIP direction) and `NAT_REPLIES` (backend → client direction).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src_addr: u32,
    pub dst_addr: u32,
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// Key of `FLOWS6` (client → VIP direction) and `NAT_REPLIES6` (backend → client direction),
/// addresses as in [`ServiceKey6`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey6 {
    pub src_addr: [u32; 4],
    pub dst_addr: [u32; 4],
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// Value of `FLOWS` and `FLOWS6`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowValue {
    /// Backend slot the flow is pinned to.
    pub backend: u32,
    pub service: u32,
    /// `bpf_ktime_get_coarse_ns` of the last packet (CLOCK_MONOTONIC, tick resolution).
    pub last_seen_ns: u64,
    /// [`flow_flags`]; changed only with atomic compare-and-swap. 64 bits because Rust's BPF
    /// target offers atomics on 64-bit words only.
    pub flags: u64,
    /// `bpf_ktime_get_coarse_ns` of the SYN that made the flow (its age, for `ctl flows`).
    pub created_ns: u64,
    /// The client's packets on the flow (the direction every mode sees), for `ctl flows`.
    /// A plain add, not an atomic one: a flow's client packets arrive on one receive queue, so
    /// one CPU counts them; two CPUs on one flow at the same instant may lose one.
    pub packets: u64,
}

/// Value of `NAT_REPLIES`: what a reply's source is rewritten to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatReply {
    pub vip_addr: u32,
    pub vip_port: u16,
    pub _pad: u16,
    pub last_seen_ns: u64,
}

/// Value of `NAT_REPLIES6`: what an IPv6 reply's source is rewritten to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatReply6 {
    pub vip_addr: [u32; 4],
    pub vip_port: u16,
    pub _pad: [u16; 3],
    pub last_seen_ns: u64,
}

/// Per-CPU value of `CLOCK_CACHE` (one entry, the kernel's only): the coarse clock as read at
/// the first packet of a tick, so later packets of the tick need no helper call.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClockCache {
    /// `bpf_jiffies64` when `ns` was read.
    pub jiffies: u64,
    /// `bpf_ktime_get_coarse_ns` then.
    pub ns: u64,
}

/// Per-CPU value of `BACKEND_STATS`, indexed by backend slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendStats {
    pub new_flows: u64,
    pub packets: u64,
    pub bytes: u64,
}

/// Per-CPU value of `SERVICE_STATS`, indexed by service index.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceStats {
    /// Packets forwarded to a backend.
    pub forwarded: u64,
    /// Packets for the VIP handed to the kernel stack (no flow, not a SYN).
    pub passed: u64,
    /// Packets dropped: no available backend, or a forwarding failure.
    pub dropped: u64,
    /// SYNs that found no available backend.
    pub no_backend: u64,
    /// Mid-stream packets of a flow without an entry here (a flow another balancer began,
    /// or one whose entry expired) that no shared table placed (algorithms other than ip_hash,
    /// or ip_hash with every backend down): passed to the stack, or handed on to the next
    /// balancer by the second chance.
    pub unknown_flow: u64,
    /// Flows without an entry here adopted mid-stream by following the Maglev table (ip_hash).
    pub adopted: u64,
    /// Second chance: packets this host could not place, sent on to the next balancer.
    pub chance_forwarded: u64,
    /// Second chance: packets from a peer that this host placed (its flow or socket).
    pub chance_delivered: u64,
    /// Second chance: packets from a peer with no hop left (or a hop budget out of range)
    /// that this host could not place either: passed to the stack.
    pub chance_unclaimed: u64,
}

/// The second chance's hop budget, carried in the IPv4 TTL / IPv6 hop limit of a packet one
/// balancer hands another: a packet from the routers leaves with `LAST_HOP + ring size - 2`,
/// each balancer that cannot place it takes one off, and one with `LAST_HOP` goes no further.
pub mod second_chance {
    /// The TTL of a packet on its ring's last hop.
    pub const LAST_HOP: u8 = 200;
    /// The largest TTL a peer's packet may carry: a ring of at most 17 balancers.
    pub const MAX_TTL: u8 = 215;

    /// Whether `ttl` is a hop budget at all (a packet from the routers may have any TTL).
    #[inline(always)]
    pub fn is_budget(ttl: u8) -> bool {
        (LAST_HOP..=MAX_TTL).contains(&ttl)
    }

    /// The TTL a packet from the routers leaves with, in a ring of `size` listed balancers
    /// (this host included); 0 for a ring of one.
    pub fn first_ttl(size: usize) -> u32 {
        match size {
            0 | 1 => 0,
            n => (LAST_HOP as usize + n - 2).min(MAX_TTL as usize) as u32,
        }
    }
}

/// Value of `SECOND_CHANCE` (one entry): where this host hands on a packet it cannot place.
/// All zero (unwritten, or `[announce] peers` unset) turns the second chance off.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SecondChanceRing {
    /// The interface it runs on (`[announce] interface`); 0 = off.
    pub ifindex: u32,
    /// The TTL a packet from the routers is sent on with ([`second_chance::first_ttl`]);
    /// 0 = no other balancer's MAC known: nothing is sent on.
    pub first_ttl: u32,
    /// The interface's own MAC (the frame's new source).
    pub own_mac: [u8; 6],
    /// The next balancer's MAC in the ring (the frame's new destination).
    pub next_mac: [u8; 6],
}

/// Key of `PEER_MACS`: a balancer's MAC, padded to eight bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PeerMac {
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
}

/// Entries of `PEER_MACS`: more than a ring can use.
pub const MAX_PEER_MACS: u32 = 64;

/// `SourceLimits::flags`.
pub mod source_limits {
    /// The service has a deny list: its entries are in the tries under `ListScope(index, DENY)`.
    pub const HAS_DENY: u32 = 1;
    /// The service has an allow list: a source must match it.
    pub const HAS_ALLOW: u32 = 2;
    /// The service limits sources (`per_source_connections` or `per_source_rate`): its SYNs
    /// are counted in `SOURCES`.
    pub const TRACKS: u32 = 4;
}

/// Which list of which service an entry of `SOURCE_LISTS`/`SOURCE_LISTS6` belongs to: the
/// first 32 bits of the trie's key data, in network byte order (an LPM trie matches bits from
/// the first byte), always matched whole. One trie per address family holds every service's
/// lists, so no map has to be made per service; deny and allow of one service are apart (two
/// scopes), because a longest-prefix match returns one entry and deny must win over a longer
/// allow.
pub mod source_list {
    pub const DENY: u32 = 0;
    pub const ALLOW: u32 = 1;
    /// Bits of the key data before the address.
    pub const SCOPE_BITS: u32 = 32;

    /// The scope word of `list` of the service at `index`.
    #[inline(always)]
    pub fn scope(index: u32, list: u32) -> u32 {
        (index * 2 + list).to_be()
    }
}

/// Key data of `SOURCE_LISTS` (behind the trie's `prefix_len`): a list's scope
/// ([`source_list::scope`]) and an IPv4 network, network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ListAddr4 {
    pub scope: u32,
    pub addr: u32,
}

/// Key data of `SOURCE_LISTS6`: a scope and an IPv6 network (words as in [`ServiceKey6`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ListAddr6 {
    pub scope: u32,
    pub addr: [u32; 4],
}

/// Value of `SOURCE_LIMITS`, by service index: the service's `[service.limits]` as the kernel
/// applies them to SYNs. All zero (an unwritten entry) limits nothing. An array by index
/// rather than fields of `ServiceValue`: the kernel copies that value on every SYN and a
/// flow's end needs the masks by the flow's service index, and limits change on reload
/// without touching the double-buffered tables.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SourceLimits {
    /// [`source_limits`].
    pub flags: u32,
    /// Concurrent flows per source (0 = no limit).
    pub per_source_connections: u32,
    /// Nanoseconds between new flows at `per_source_rate` (0 = no rate limit).
    pub interval_ns: u64,
    /// How far ahead of now a source's arrival time may run: `per_source_burst` intervals.
    pub tolerance_ns: u64,
    /// `source_prefix_v4` as a mask over the address, network byte order.
    pub mask_v4: u32,
    /// `source_prefix_v6` as a mask over the address's words.
    pub mask_v6: [u32; 4],
    pub _pad: u32,
}

impl SourceLimits {
    /// The `SOURCES` key of IPv4 client `addr` of the service at `service`.
    #[inline(always)]
    pub fn key_v4(&self, service: u32, addr: u32) -> SourceKey {
        SourceKey::v4(service, addr & self.mask_v4)
    }

    /// The `SOURCES` key of IPv6 client `addr` of the service at `service`.
    #[inline(always)]
    pub fn key_v6(&self, service: u32, addr: [u32; 4]) -> SourceKey {
        let mask = self.mask_v6;
        SourceKey {
            service,
            addr: [
                addr[0] & mask[0],
                addr[1] & mask[1],
                addr[2] & mask[2],
                addr[3] & mask[3],
            ],
        }
    }
}

/// Key of `SOURCES`: a service index and a source (the client's address masked by the
/// service's `source_prefix_v4`/`_v6`). IPv4 sources are written as IPv4-mapped IPv6
/// addresses (`::ffff:a.b.c.d`), so both families share one table and one bound.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SourceKey {
    pub service: u32,
    pub addr: [u32; 4],
}

impl SourceKey {
    /// The key of IPv4 source `addr` (already masked) of the service at `service`.
    #[inline(always)]
    pub fn v4(service: u32, addr: u32) -> SourceKey {
        SourceKey {
            service,
            addr: [0, 0, 0xffffu32.to_be(), addr],
        }
    }
}

/// Value of `SOURCES`: what one source of one service holds. Both words are changed only with
/// atomics (Rust's BPF target has them on 64-bit words only).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SourceValue {
    /// Open flows of the source (flows with `SOURCE_COUNTED` not yet closed).
    pub active: u64,
    /// GCRA's theoretical arrival time of the next new flow (coarse clock, ns).
    pub arrival_ns: u64,
}

/// Per-CPU value of `SOURCE_STATS`, by service index: SYNs dropped by `[service.limits]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SourceStats {
    /// In the deny list.
    pub denied: u64,
    /// Not in the allow list.
    pub not_allowed: u64,
    /// At `per_source_connections`.
    pub too_many: u64,
    /// Over `per_source_rate`.
    pub too_fast: u64,
}

/// Index of a service's Maglev entry `slot` in the flat `MAGLEV` array.
#[inline(always)]
pub fn maglev_index(service: u32, version: u32, size: u32, slot: u32) -> u32 {
    (service * 2 + (version & 1)) * size + slot
}

/// Index of a service's weighted entry `slot` in the flat `WEIGHTED` array.
#[inline(always)]
pub fn weighted_index(service: u32, version: u32, size: u32, slot: u32) -> u32 {
    (service * 2 + (version & 1)) * size + slot
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are #[repr(C)], Copy, made of integers with explicit padding fields,
    // so every bit pattern is valid and none has implicit padding.
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for ServiceRoute {}
    unsafe impl aya::Pod for BackendEntry {}
    unsafe impl aya::Pod for ServiceBackend {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for ServiceKey6 {}
    unsafe impl aya::Pod for FlowKey6 {}
    unsafe impl aya::Pod for FlowValue {}
    unsafe impl aya::Pod for NatReply {}
    unsafe impl aya::Pod for BackendEntry6 {}
    unsafe impl aya::Pod for NatReply6 {}
    unsafe impl aya::Pod for BackendStats {}
    unsafe impl aya::Pod for ServiceStats {}
    unsafe impl aya::Pod for ListAddr4 {}
    unsafe impl aya::Pod for ListAddr6 {}
    unsafe impl aya::Pod for SourceLimits {}
    unsafe impl aya::Pod for SourceKey {}
    unsafe impl aya::Pod for SourceValue {}
    unsafe impl aya::Pod for SourceStats {}
    unsafe impl aya::Pod for SecondChanceRing {}
    unsafe impl aya::Pod for PeerMac {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<ServiceKey>(), 8);
        assert_eq!(size_of::<ServiceValue>(), 28);
        assert_eq!(size_of::<ServiceRoute>(), 16);
        assert_eq!(size_of::<ClockCache>(), 16);
        assert_eq!(size_of::<BackendEntry>(), 16);
        assert_eq!(size_of::<ServiceBackend>(), 32);
        assert_eq!(size_of::<FlowKey>(), 16);
        assert_eq!(size_of::<ServiceKey6>(), 20);
        assert_eq!(size_of::<FlowKey6>(), 40);
        assert_eq!(size_of::<FlowValue>(), 40);
        assert_eq!(size_of::<NatReply>(), 16);
        assert_eq!(size_of::<BackendEntry6>(), 20);
        assert_eq!(size_of::<NatReply6>(), 32);
        assert_eq!(size_of::<BackendStats>(), 24);
        assert_eq!(size_of::<ServiceStats>(), 72);
        assert_eq!(size_of::<SecondChanceRing>(), 20);
        assert_eq!(size_of::<PeerMac>(), 8);
        assert_eq!(size_of::<ListAddr4>(), 8);
        assert_eq!(size_of::<ListAddr6>(), 20);
        assert_eq!(size_of::<SourceLimits>(), 48);
        assert_eq!(size_of::<SourceKey>(), 20);
        assert_eq!(size_of::<SourceValue>(), 16);
        assert_eq!(size_of::<SourceStats>(), 32);
    }

    #[test]
    fn address_filter_bits_stay_in_their_half() {
        use address_filter::{BACKENDS, VIPS, WORDS, bit};
        for (addr, port) in [(0, 0), (u32::MAX, u16::MAX), (0x6400_12c6, 25u16.to_be())] {
            assert!(bit(VIPS, addr, port).0 < WORDS);
            assert!((WORDS..2 * WORDS).contains(&bit(BACKENDS, addr, port).0));
            assert_eq!(bit(VIPS, addr, port).1.count_ones(), 1);
        }
        // Neighbouring ports of one address spread over words.
        let mut words = [0u32; 64];
        for (p, word) in words.iter_mut().enumerate() {
            *word = bit(VIPS, 0x6400_12c6, p as u16).0;
        }
        words.sort_unstable();
        let distinct = 1 + words.windows(2).filter(|w| w[0] != w[1]).count();
        assert!(distinct > 32, "{words:?}");
    }

    #[test]
    fn table_halves_do_not_overlap() {
        assert_eq!(maglev_index(0, 1, 7, 0), 7);
        let max = crate::MAX_BACKENDS as u32;
        assert_eq!(
            service_backend_index(0, 0, max - 1) + 1,
            service_backend_index(0, 1, 0)
        );
        assert_eq!(
            service_backend_index(0, 1, max - 1) + 1,
            service_backend_index(1, 0, 0)
        );
        assert_eq!(maglev_index(1, 0, 7, 0), 14);
        assert_eq!(maglev_index(0, 0, 7, 6) + 1, maglev_index(0, 1, 7, 0));
    }
}
