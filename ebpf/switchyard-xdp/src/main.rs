//! The XDP fast path: steers TCP flows for a VIP:port to backends at packet level.
//!
//! `switchyard_balance` runs on the client-facing interface. A SYN for a configured VIP:port
//! without a flow entry picks a backend with the service's algorithm, records the flow in an
//! LRU table and adds one to the backend's shared active count; later packets follow the entry,
//! and the client's first FIN or RST gives the count back (exactly once, by compare-and-swap on
//! the flow's flags). Everything else passes to the kernel stack untouched.
//! In `nat` mode the same program also runs on the backend-facing interface, where it rewrites
//! the replies' source back to the VIP:port (one program, so one interface can play both roles). Map layouts live in `switchyard_common::maps`.
#![no_std]
#![no_main]
// Rust's BPF target declares no compare-and-swap, though BPF v3 has fetch-add and cmpxchg on
// 64-bit words: the intrinsics reach them (RUSTC_BOOTSTRAP=1 is already needed for build-std).
#![feature(core_intrinsics)]
#![allow(internal_features)]

use core::intrinsics::{AtomicOrdering, atomic_cxchg, atomic_or, atomic_xadd, atomic_xsub};
use core::mem::size_of;

use aya_ebpf::bindings::{bpf_fib_lookup as FibParams, xdp_action};
use aya_ebpf::helpers::{
    bpf_fib_lookup, bpf_get_prandom_u32, bpf_ktime_get_ns, bpf_loop, bpf_redirect,
};
use aya_ebpf::macros::{map, xdp};
use aya_ebpf::maps::{Array, HashMap, LruHashMap, PerCpuArray};
use aya_ebpf::programs::XdpContext;
use core::ffi::c_void;
use switchyard_common::backend::BackendView;
use switchyard_common::maps::{
    ActiveCell, BackendEntry, BackendStats, DEFAULT_BACKEND_SLOTS, DEFAULT_FLOWS, DEFAULT_SERVICES,
    FlowKey, FlowValue, NatReply, PROTO_TCP, ServiceBackend, ServiceKey, ServiceStats,
    ServiceValue, WEIGHTED_TABLE_SIZE, algorithm, backend_state, flow_flags, forwarding,
    maglev_index, service_backend_index, weighted_index,
};
use switchyard_common::{
    MAGLEV_TABLE_SIZE, MAX_BACKENDS, hash, least_conn, maglev, weighted_round_robin,
};

/// `BPF_F_MMAPABLE`: the control plane maps the active counts into its address space.
const BPF_F_MMAPABLE: u32 = 1 << 10;
const AF_INET: u8 = 2;
const BPF_FIB_LKUP_RET_SUCCESS: i64 = 0;

#[map]
static SERVICES: HashMap<ServiceKey, ServiceValue> = HashMap::with_max_entries(DEFAULT_SERVICES, 0);
#[map]
static BACKENDS: Array<BackendEntry> = Array::with_max_entries(DEFAULT_BACKEND_SLOTS, 0);
/// Per service, its backends' slots and policy (weight, cap, state), `MAX_BACKENDS` entries each.
#[map]
static SERVICE_BACKENDS: Array<ServiceBackend> =
    Array::with_max_entries(DEFAULT_SERVICES * MAX_BACKENDS as u32, 0);
/// The shared per-backend active counts (the proxy's `CounterTable` maps this array).
#[map]
static ACTIVE: Array<ActiveCell> = Array::with_max_entries(DEFAULT_BACKEND_SLOTS, BPF_F_MMAPABLE);
#[map]
static BACKEND_STATS: PerCpuArray<BackendStats> =
    PerCpuArray::with_max_entries(DEFAULT_BACKEND_SLOTS, 0);
#[map]
static SERVICE_STATS: PerCpuArray<ServiceStats> =
    PerCpuArray::with_max_entries(DEFAULT_SERVICES, 0);
#[map]
static FLOWS: LruHashMap<FlowKey, FlowValue> = LruHashMap::with_max_entries(DEFAULT_FLOWS, 0);
#[map]
static NAT_REPLIES: LruHashMap<FlowKey, NatReply> = LruHashMap::with_max_entries(DEFAULT_FLOWS, 0);
/// Two Maglev tables per service (double buffer); entries are backend indexes within the service.
#[map]
static MAGLEV: Array<u32> = Array::with_max_entries(2 * MAGLEV_TABLE_SIZE as u32, 0);
/// Two weighted round-robin tables per service (double buffer).
#[map]
static WEIGHTED: Array<u32> = Array::with_max_entries(2 * WEIGHTED_TABLE_SIZE, 0);
/// Each CPU walks the weighted table with its own cursor: no cross-CPU read-modify-write race.
#[map]
static RR_CURSOR: PerCpuArray<u32> = PerCpuArray::with_max_entries(DEFAULT_SERVICES, 0);

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

#[repr(C)]
struct EthHdr {
    dst: [u8; 6],
    src: [u8; 6],
    proto: u16,
}

#[repr(C)]
struct Ipv4Hdr {
    vihl: u8,
    tos: u8,
    tot_len: u16,
    id: u16,
    frag_off: u16,
    ttl: u8,
    proto: u8,
    check: u16,
    saddr: u32,
    daddr: u32,
}

#[repr(C)]
struct TcpHdr {
    sport: u16,
    dport: u16,
    seq: u32,
    ack: u32,
    off: u8,
    flags: u8,
    window: u16,
    check: u16,
    urg: u16,
}

/// A TCP/IPv4 packet, every header bounds-checked.
struct Packet {
    eth: *mut EthHdr,
    ip: *mut Ipv4Hdr,
    tcp: *mut TcpHdr,
    len: u64,
}

#[inline(always)]
fn header<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// `None` for anything that is not an unfragmented TCP/IPv4 packet.
#[inline(always)]
fn parse(ctx: &XdpContext) -> Option<Packet> {
    let eth: *mut EthHdr = header(ctx, 0)?;
    if unsafe { (*eth).proto } != ETH_P_IP.to_be() {
        return None;
    }
    let ip: *mut Ipv4Hdr = header(ctx, ETH_HLEN)?;
    let (vihl, proto, frag_off) = unsafe { ((*ip).vihl, (*ip).proto, (*ip).frag_off) };
    if vihl >> 4 != 4 || proto != PROTO_TCP {
        return None;
    }
    // More-fragments flag or a fragment offset: only the first fragment has the ports.
    if frag_off & 0x3fffu16.to_be() != 0 {
        return None;
    }
    let ihl = ((vihl & 0x0f) as usize) * 4;
    if ihl < 20 || ihl > 60 {
        return None;
    }
    let tcp: *mut TcpHdr = header(ctx, ETH_HLEN + ihl)?;
    Some(Packet {
        eth,
        ip,
        tcp,
        len: (ctx.data_end() - ctx.data()) as u64,
    })
}

#[xdp]
pub fn switchyard_balance(ctx: XdpContext) -> u32 {
    balance(&ctx)
}

#[xdp]
pub fn switchyard_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[inline(always)]
fn balance(ctx: &XdpContext) -> u32 {
    let Some(pkt) = parse(ctx) else {
        return xdp_action::XDP_PASS;
    };
    let (saddr, daddr, sport, dport, flags) = unsafe {
        (
            (*pkt.ip).saddr,
            (*pkt.ip).daddr,
            (*pkt.tcp).sport,
            (*pkt.tcp).dport,
            (*pkt.tcp).flags,
        )
    };
    let service_key = ServiceKey {
        addr: daddr,
        port: dport,
        proto: PROTO_TCP,
        _pad: 0,
    };
    let Some(service) = (unsafe { SERVICES.get(&service_key) }) else {
        // Not for a VIP: maybe a nat backend's reply (on the backend-facing interface).
        return nat_reply(ctx, &pkt);
    };
    let service = *service;
    let flow_key = FlowKey {
        src_addr: saddr,
        dst_addr: daddr,
        src_port: sport,
        dst_port: dport,
        proto: PROTO_TCP,
        _pad: [0; 3],
    };
    let now = unsafe { bpf_ktime_get_ns() };
    let is_syn = flags & (TCP_SYN | TCP_ACK) == TCP_SYN;

    let backend_slot = match FLOWS.get_ptr_mut(&flow_key) {
        // A SYN on a flow the client closed is a new connection reusing the 5-tuple.
        Some(flow) if !(is_syn && unsafe { flag_set(flow, flow_flags::CLOSED) }) => {
            unsafe { (*flow).last_seen_ns = now };
            // The client acknowledged: the handshake got through. Flows that never get here
            // (SYNs to nowhere, floods) are expired early by the control plane.
            if flags & TCP_ACK != 0 && !unsafe { flag_set(flow, flow_flags::ESTABLISHED) } {
                unsafe {
                    atomic_or::<u64, u64, { AtomicOrdering::SeqCst }>(
                        &raw mut (*flow).flags,
                        flow_flags::ESTABLISHED,
                    )
                };
            }
            if flags & (TCP_FIN | TCP_RST) != 0 {
                close_flow(flow);
            }
            unsafe { (*flow).backend }
        }
        Some(_) | None => {
            if !is_syn {
                // No state for a mid-stream packet (expired or evicted): let the stack answer.
                count_service(service.index, |s| s.passed += 1);
                return xdp_action::XDP_PASS;
            }
            match new_flow(&service, &flow_key, now) {
                Some(slot) => slot,
                None => {
                    count_service(service.index, |s| {
                        s.no_backend += 1;
                        s.dropped += 1;
                    });
                    return xdp_action::XDP_DROP;
                }
            }
        }
    };

    let Some(backend) = BACKENDS.get(backend_slot) else {
        count_service(service.index, |s| s.dropped += 1);
        return xdp_action::XDP_DROP;
    };
    let backend = *backend;
    if let Some(stats) = BACKEND_STATS.get_ptr_mut(backend_slot) {
        unsafe {
            (*stats).packets += 1;
            (*stats).bytes += pkt.len;
        }
    }
    let action = if service.forwarding == forwarding::NAT {
        forward_nat(ctx, &pkt, &backend)
    } else {
        forward_dsr(&pkt, &backend)
    };
    if action == xdp_action::XDP_DROP || action == xdp_action::XDP_ABORTED {
        count_service(service.index, |s| s.dropped += 1);
    } else {
        count_service(service.index, |s| s.forwarded += 1);
    }
    action
}

#[inline(always)]
unsafe fn flag_set(flow: *mut FlowValue, flag: u64) -> bool {
    (unsafe { core::ptr::read_volatile(&raw const (*flow).flags) } & flag) != 0
}

/// Gives the flow's count back, once: only the CPU whose compare-and-swap sets `CLOSED` does.
#[inline(always)]
fn close_flow(flow: *mut FlowValue) {
    // Other bits (ESTABLISHED) may change concurrently: retry the swap a few times.
    for _ in 0..4 {
        // A plain 64-bit load is atomic on BPF; the compare-and-swap settles any race.
        let seen = unsafe { core::ptr::read_volatile(&raw const (*flow).flags) };
        if seen & flow_flags::CLOSED != 0 {
            return;
        }
        let (_, swapped) = unsafe {
            atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(
                &raw mut (*flow).flags,
                seen,
                seen | flow_flags::CLOSED,
            )
        };
        if swapped {
            if seen & flow_flags::COUNTED != 0 {
                let backend = unsafe { (*flow).backend };
                if let Some(active) = ACTIVE.get_ptr_mut(backend) {
                    unsafe { atomic_xsub::<u64, u64, { AtomicOrdering::SeqCst }>(active, 1) };
                }
            }
            return;
        }
    }
}

/// Chooses a backend for a SYN, records the flow, and counts it. Returns the backend slot.
#[inline(always)]
fn new_flow(service: &ServiceValue, key: &FlowKey, now: u64) -> Option<u32> {
    let slot = select(service, key)?;
    let value = FlowValue {
        backend: slot,
        service: service.index,
        last_seen_ns: now,
        flags: flow_flags::COUNTED,
    };
    // BPF_ANY: replaces a closed entry for a reused 5-tuple (its count was already given back).
    if FLOWS.insert(key, &value, 0).is_err() {
        return None;
    }
    if let Some(active) = ACTIVE.get_ptr_mut(slot) {
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(active, 1) };
    }
    if let Some(stats) = BACKEND_STATS.get_ptr_mut(slot) {
        unsafe { (*stats).new_flows += 1 };
    }
    if service.forwarding == forwarding::NAT
        && let Some(backend) = BACKENDS.get(slot)
    {
        let reply_key = FlowKey {
            src_addr: backend.addr,
            dst_addr: key.src_addr,
            src_port: backend.port,
            dst_port: key.src_port,
            proto: PROTO_TCP,
            _pad: [0; 3],
        };
        let reply = NatReply {
            vip_addr: key.dst_addr,
            vip_port: key.dst_port,
            _pad: 0,
            last_seen_ns: now,
        };
        let _ = NAT_REPLIES.insert(&reply_key, &reply, 0);
    }
    Some(slot)
}

/// The view the shared selection code reads of the service's backend at `entry` of
/// `SERVICE_BACKENDS`, straight from the maps; the count is that of the backend's slot.
#[inline(always)]
fn view(entry: u32) -> Option<BackendView> {
    let backend = SERVICE_BACKENDS.get(entry)?;
    let active = ACTIVE.get_ptr_mut(backend.slot)?;
    let active = unsafe { core::ptr::read_volatile(active) };
    Some(BackendView {
        active: active.min(u32::MAX as u64) as u32,
        weight: backend.weight,
        max_connections: backend.max_connections,
        healthy: (backend.state == backend_state::UP && backend.weight != 0) as u32,
        response_us: 0,
    })
}

/// The service's algorithm. Table entries name backends by their index within the service.
/// The table-driven algorithms probe forward past unavailable entries (as the shared
/// `maglev::pick` / `weighted_round_robin::pick` do, same probe counts), then fall back to
/// any available backend.
///
/// Kernel-local loops rather than the shared `pick` functions: those loop up to
/// `MAX_BACKENDS` (1024) times inline, which the verifier rejects ("sequence of 8193 jumps is
/// too complex"), and `least_conn::pick` keeps an `Option<(usize, BackendView)>` whose
/// uninitialised payload LLVM spills (the verifier rejects reading it). Here every loop runs
/// under `bpf_loop`, so the verifier checks one iteration; the ordering is the shared
/// `least_conn::less_loaded` and the hash the shared `hash::hash_ipv4`.
#[inline(always)]
fn select(service: &ServiceValue, key: &FlowKey) -> Option<u32> {
    let count = service.backend_count;
    if count == 0 || count > MAX_BACKENDS as u32 {
        return None;
    }
    let base = service_backend_index(service.index, 0);
    let version = service.table_version;
    let picked = match service.algorithm {
        algorithm::IP_HASH => {
            let client_hash = hash::hash_ipv4(key.src_addr.to_ne_bytes());
            let size = MAGLEV_TABLE_SIZE as u32;
            let slot = (client_hash % MAGLEV_TABLE_SIZE as u64) as u32;
            let first = maglev_index(service.index, version, size, 0);
            probe(
                TABLE_MAGLEV,
                first,
                size,
                slot,
                maglev::MAGLEV_PROBES as u32,
                base,
                count,
            )
            .or_else(|| {
                scan(
                    SCAN_FIRST_AVAILABLE,
                    base,
                    count,
                    (client_hash as u32).checked_rem(count).unwrap_or(0),
                )
            })
        }
        algorithm::ROUND_ROBIN | algorithm::WEIGHTED_ROUND_ROBIN
            if service.weighted_len != 0 && service.weighted_len <= WEIGHTED_TABLE_SIZE =>
        {
            let len = service.weighted_len;
            let cursor = RR_CURSOR.get_ptr_mut(service.index)?;
            let position = unsafe { *cursor }.checked_rem(len).unwrap_or(0);
            let first = weighted_index(service.index, version, WEIGHTED_TABLE_SIZE, 0);
            let probes = weighted_round_robin::WRR_PROBES as u32;
            let found = probe(TABLE_WEIGHTED, first, len, position, probes, base, count);
            // Move past the entries consumed, so a down backend's turns spread over the others.
            let advance = match found {
                Some((_, steps)) => steps,
                None => probes.min(len),
            };
            unsafe { *cursor = position.wrapping_add(advance) };
            found.or_else(|| {
                scan(
                    SCAN_FIRST_AVAILABLE,
                    base,
                    count,
                    position.checked_rem(count).unwrap_or(0),
                )
            })
        }
        _ => {
            let start = unsafe { bpf_get_prandom_u32() }
                .checked_rem(count)
                .unwrap_or(0);
            scan(SCAN_LEAST_LOADED, base, count, start)
        }
    };
    let (index, _) = picked?;
    SERVICE_BACKENDS.get(base + index).map(|b| b.slot)
}

const SCAN_LEAST_LOADED: u32 = 0;
const SCAN_FIRST_AVAILABLE: u32 = 1;
const TABLE_MAGLEV: u32 = 0;
const TABLE_WEIGHTED: u32 = 1;
const NONE: u32 = u32::MAX;

/// State of one `bpf_loop` over a service's backends or one of its tables (plain integers: it
/// lives on the BPF stack and the verifier must see every byte initialised).
#[repr(C)]
struct LoopState {
    mode: u32,
    table: u32,
    /// First entry of the table half in its flat array.
    first: u32,
    /// Table length, or backend count for scans.
    len: u32,
    start: u32,
    base: u32,
    count: u32,
    best: u32,
    best_active: u32,
    best_weight: u32,
    steps: u32,
    _pad: u32,
}

impl LoopState {
    #[inline(always)]
    fn new(mode: u32, table: u32, first: u32, len: u32, start: u32, base: u32, count: u32) -> Self {
        Self {
            mode,
            table,
            first,
            len,
            start,
            base,
            count,
            best: NONE,
            best_active: 0,
            best_weight: 1,
            steps: 0,
            _pad: 0,
        }
    }
}

/// Any available backend (`SCAN_FIRST_AVAILABLE`) or the least loaded relative to its weight
/// (`SCAN_LEAST_LOADED`), from `start`. Returns (index within the service, steps taken).
#[inline(always)]
fn scan(mode: u32, base: u32, count: u32, start: u32) -> Option<(u32, u32)> {
    let mut state = LoopState::new(mode, 0, 0, count, start, base, count);
    unsafe {
        bpf_loop(
            count,
            scan_step as *mut c_void,
            &raw mut state as *mut c_void,
            0,
        );
    }
    (state.best != NONE).then_some((state.best, state.steps))
}

#[inline(never)]
extern "C" fn scan_step(i: u64, ctx: *mut c_void) -> i64 {
    let state = unsafe { &mut *(ctx as *mut LoopState) };
    if state.count == 0 {
        return 1;
    }
    // `checked_rem`: a `%` the compiler cannot prove safe links a panic path the loader rejects.
    let mut index = state.start.checked_rem(state.count).unwrap_or(0) + (i as u32);
    if index >= state.count {
        index -= state.count;
    }
    let Some(view) = view(state.base + index) else {
        return 0;
    };
    if !view.available() {
        return 0;
    }
    if state.mode == SCAN_FIRST_AVAILABLE {
        state.best = index;
        state.steps = i as u32 + 1;
        return 1;
    }
    let best = BackendView {
        active: state.best_active,
        weight: state.best_weight,
        max_connections: 0,
        healthy: 1,
        response_us: 0,
    };
    if state.best == NONE || least_conn::less_loaded(&view, &best) {
        state.best = index;
        state.best_active = view.active;
        state.best_weight = view.weight;
    }
    0
}

/// The first available backend named by the table from `position`, probing at most `probes`
/// entries. Returns (index within the service, entries consumed).
#[inline(always)]
fn probe(
    table: u32,
    first: u32,
    len: u32,
    position: u32,
    probes: u32,
    base: u32,
    count: u32,
) -> Option<(u32, u32)> {
    let mut state = LoopState::new(0, table, first, len, position, base, count);
    unsafe {
        bpf_loop(
            probes.min(len),
            probe_step as *mut c_void,
            &raw mut state as *mut c_void,
            0,
        );
    }
    (state.best != NONE).then_some((state.best, state.steps))
}

#[inline(never)]
extern "C" fn probe_step(i: u64, ctx: *mut c_void) -> i64 {
    let state = unsafe { &mut *(ctx as *mut LoopState) };
    if state.len == 0 {
        return 1;
    }
    let mut position = state.start.checked_rem(state.len).unwrap_or(0) + (i as u32);
    if position >= state.len {
        position -= state.len;
    }
    let entry = if state.table == TABLE_MAGLEV {
        MAGLEV.get(state.first + position).copied()
    } else {
        WEIGHTED.get(state.first + position).copied()
    };
    let Some(index) = entry else {
        return 0;
    };
    if index >= state.count {
        return 0;
    }
    match view(state.base + index) {
        Some(view) if view.available() => {
            state.best = index;
            state.steps = i as u32 + 1;
            1
        }
        _ => 0,
    }
}

#[inline(always)]
fn forward_dsr(pkt: &Packet, backend: &BackendEntry) -> u32 {
    // The frame came to this interface's MAC: that becomes the source towards the backend.
    unsafe {
        (*pkt.eth).src = (*pkt.eth).dst;
        (*pkt.eth).dst = backend.mac;
    }
    xdp_action::XDP_TX
}

#[inline(always)]
fn forward_nat(ctx: &XdpContext, pkt: &Packet, backend: &BackendEntry) -> u32 {
    unsafe {
        let old_addr = (*pkt.ip).daddr;
        let old_port = (*pkt.tcp).dport;
        (*pkt.ip).daddr = backend.addr;
        (*pkt.tcp).dport = backend.port;
        (*pkt.ip).check = csum_replace4((*pkt.ip).check, old_addr, backend.addr);
        let check = csum_replace4((*pkt.tcp).check, old_addr, backend.addr);
        (*pkt.tcp).check = csum_replace2(check, old_port, backend.port);
    }
    route(ctx, pkt)
}

/// Sends a rewritten packet where the FIB says; hands it to the stack when the FIB cannot
/// (no neighbour entry yet: the kernel resolves it and forwards this packet itself).
#[inline(always)]
fn route(ctx: &XdpContext, pkt: &Packet) -> u32 {
    let mut params: FibParams = unsafe { core::mem::zeroed() };
    unsafe {
        params.family = AF_INET;
        params.l4_protocol = PROTO_TCP;
        params.sport = (*pkt.tcp).sport;
        params.dport = (*pkt.tcp).dport;
        params.__bindgen_anon_1.tot_len = u16::from_be((*pkt.ip).tot_len);
        params.ifindex = ctx.ingress_ifindex() as u32;
        params.__bindgen_anon_3.ipv4_src = (*pkt.ip).saddr;
        params.__bindgen_anon_4.ipv4_dst = (*pkt.ip).daddr;
    }
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.ctx as *mut _,
            &mut params,
            size_of::<FibParams>() as i32,
            0,
        )
    };
    if rc != BPF_FIB_LKUP_RET_SUCCESS {
        return xdp_action::XDP_PASS;
    }
    unsafe {
        (*pkt.eth).dst = params.dmac;
        (*pkt.eth).src = params.smac;
        bpf_redirect(params.ifindex, 0) as u32
    }
}

/// Rewrites a nat backend's reply to come from the VIP:port; passes anything else untouched.
#[inline(always)]
fn nat_reply(ctx: &XdpContext, pkt: &Packet) -> u32 {
    let key = unsafe {
        FlowKey {
            src_addr: (*pkt.ip).saddr,
            dst_addr: (*pkt.ip).daddr,
            src_port: (*pkt.tcp).sport,
            dst_port: (*pkt.tcp).dport,
            proto: PROTO_TCP,
            _pad: [0; 3],
        }
    };
    let Some(reply) = NAT_REPLIES.get_ptr_mut(&key) else {
        return xdp_action::XDP_PASS;
    };
    unsafe {
        (*reply).last_seen_ns = bpf_ktime_get_ns();
        let (vip, vport) = ((*reply).vip_addr, (*reply).vip_port);
        let old_addr = (*pkt.ip).saddr;
        let old_port = (*pkt.tcp).sport;
        (*pkt.ip).saddr = vip;
        (*pkt.tcp).sport = vport;
        (*pkt.ip).check = csum_replace4((*pkt.ip).check, old_addr, vip);
        let check = csum_replace4((*pkt.tcp).check, old_addr, vip);
        (*pkt.tcp).check = csum_replace2(check, old_port, vport);
    }
    route(ctx, pkt)
}

#[inline(always)]
fn count_service(index: u32, update: impl FnOnce(&mut ServiceStats)) {
    if let Some(stats) = SERVICE_STATS.get_ptr_mut(index) {
        update(unsafe { &mut *stats });
    }
}

/// RFC 1624 incremental update, on 16-bit words exactly as they lie in the packet (one's
/// complement sums do not care about byte order as long as every word is taken alike).
#[inline(always)]
fn csum_replace2(check: u16, old: u16, new: u16) -> u16 {
    let mut sum = (!check as u32) + (!old as u32) + new as u32;
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

#[inline(always)]
fn csum_replace4(check: u16, old: u32, new: u32) -> u16 {
    let check = csum_replace2(check, old as u16, new as u16);
    csum_replace2(check, (old >> 16) as u16, (new >> 16) as u16)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(no_mangle)]
#[unsafe(link_section = "license")]
pub static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
