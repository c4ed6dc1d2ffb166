//! The flow tables (`FLOWS`, and `FLOWS6` for IPv6): a SYN's new flow (backend chosen, count taken, nat reply entry
//! recorded), later packets following their entry in both directions, and the flow's end: the
//! count is given back exactly once by compare-and-swap on the flow's flags, and an entry that
//! closed or ended stops matching new connections (see `switchyard_common::maps::flow_flags`).

use core::intrinsics::{AtomicOrdering, atomic_cxchg, atomic_or, atomic_xadd, atomic_xsub};

use switchyard_common::hash;
use switchyard_common::maps::{
    ENDED_LINGER_NS, FlowKey, FlowKey6, FlowValue, NatReply, NatReply6, PROTO_TCP, ServiceValue,
    algorithm, flow_ended, flow_flags, forwarding, service_flags,
};

use crate::limits::{self, Admission, Client};
use crate::maps::{ACTIVE, BACKENDS, BACKENDS6, FLOWS, FLOWS6, NAT_REPLIES, NAT_REPLIES6};
use crate::parse::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};
use crate::select::select;
use crate::stats::{count_new_flow, count_service};

/// The `FLOWS`/`NAT_REPLIES` key of a TCP packet from `src_addr`:`src_port` to
/// `dst_addr`:`dst_port` (network byte order). Built as its four 32-bit words: written field by
/// field, the three padding bytes cost a call of `memset` on every packet.
#[inline(always)]
pub fn tcp_flow_key(src_addr: u32, dst_addr: u32, src_port: u16, dst_port: u16) -> FlowKey {
    // The ports share the third word and the protocol the fourth, low bytes first.
    const _: () = assert!(cfg!(target_endian = "little"));
    let words: [u32; 4] = [
        src_addr,
        dst_addr,
        src_port as u32 | (dst_port as u32) << 16,
        PROTO_TCP as u32,
    ];
    // SAFETY: FlowKey is #[repr(C)], 16 bytes of integers, 4-aligned, any bits valid.
    unsafe { core::mem::transmute::<[u32; 4], FlowKey>(words) }
}

/// The flow's flags, read once, volatile, since other CPUs set flags too.
///
/// # Safety
/// `flow` points at a live `FLOWS` value (as `get_ptr_mut` returns it).
#[inline(always)]
unsafe fn flags_of(flow: *mut FlowValue) -> u64 {
    unsafe { core::ptr::read_volatile(&raw const (*flow).flags) }
}

/// Sets `flag` on the flow unless it is set already (the common case costs no atomic).
#[inline(always)]
fn mark(flow: *mut FlowValue, flag: u64) {
    if unsafe { flags_of(flow) } & flag == 0 {
        unsafe { atomic_or::<u64, u64, { AtomicOrdering::SeqCst }>(&raw mut (*flow).flags, flag) };
    }
}

/// Stamps the flow with `now`, writing only when the (tick-resolution) stamp moves: most
/// packets of a busy flow leave its cache line clean for the other CPUs.
#[inline(always)]
fn refresh(flow: *mut FlowValue, now: u64) {
    stamp(unsafe { &raw mut (*flow).last_seen_ns }, now);
}

/// Sets a last-seen stamp to `now` only when it differs (once per clock tick), so a busy
/// entry's cache line is not dirtied on every packet for other CPUs.
#[inline(always)]
pub fn stamp(last_seen_ns: *mut u64, now: u64) {
    unsafe {
        if *last_seen_ns != now {
            *last_seen_ns = now;
        }
    }
}

/// Whether the flow's entry no longer belongs to the packet at `now`: `opens` (a SYN from the
/// client, a SYN-ACK from the backend) starts a new connection, which a closed flow must not
/// capture; any packet finds an ended flow stale once it lingered `ENDED_LINGER_NS`.
#[inline(always)]
pub fn is_stale(flow: *mut FlowValue, opens: bool, now: u64) -> bool {
    let flags = unsafe { flags_of(flow) };
    if opens && flags & flow_flags::CLOSED != 0 {
        return true;
    }
    let last = unsafe { (*flow).last_seen_ns };
    flow_ended(flags) && now.saturating_sub(last) > ENDED_LINGER_NS
}

/// A packet of `client` on a known flow with TCP `flags`, seen at `now`: refreshes and counts
/// the entry, marks the handshake done, records the client's FIN or RST and gives the counts
/// back on it. Returns the flow's backend slot.
#[inline(always)]
pub fn follow(flow: *mut FlowValue, flags: u8, now: u64, client: Client) -> u32 {
    refresh(flow, now);
    // The line was just read for the stamp; a plain add (see `FlowValue::packets`).
    unsafe { (*flow).packets = (*flow).packets.wrapping_add(1) };
    // The client acknowledged: the handshake got through. Flows that never get here
    // (SYNs to nowhere, floods) are expired early by the control plane.
    if flags & TCP_ACK != 0 {
        mark(flow, flow_flags::ESTABLISHED);
    }
    if flags & (TCP_FIN | TCP_RST) != 0 {
        let seen = if flags & TCP_RST != 0 {
            flow_flags::RESET
        } else {
            flow_flags::CLIENT_FIN
        };
        mark(flow, seen);
        close_flow(flow, client);
    }
    unsafe { (*flow).backend }
}

/// A nat backend's reply (`reply_key`: backend → client, TCP `flags`) to the VIP `vip`:`vport`,
/// checked against the flow it answers: true, with the flow refreshed and the backend's FIN or
/// RST recorded (a RST gives the count back), while the reply entry is that flow's; false when
/// it is stale (the flow is gone, chose another backend since, ended and lingered, or closed
/// and this is a SYN-ACK of a new connection on the same 4-tuple, e.g. a direct one).
#[inline(always)]
pub fn follow_reply(reply_key: &FlowKey, vip: u32, vport: u16, flags: u8, now: u64) -> bool {
    let flow_key = tcp_flow_key(reply_key.dst_addr, vip, reply_key.dst_port, vport);
    let Some(flow) = FLOWS.get_ptr_mut(&flow_key) else {
        return false;
    };
    let Some(backend) = BACKENDS.get(unsafe { (*flow).backend }) else {
        return false;
    };
    if backend.addr != reply_key.src_addr || backend.port != reply_key.src_port {
        return false;
    }
    reply_seen(flow, flags, now, Client::V4(reply_key.dst_addr))
}

/// [`follow_reply`] for an IPv6 reply: its flow in `FLOWS6`, its backend's address in
/// `BACKENDS6`.
#[inline(always)]
pub fn follow_reply6(
    reply_key: &FlowKey6,
    vip: &[u32; 4],
    vport: u16,
    flags: u8,
    now: u64,
) -> bool {
    let flow_key = FlowKey6 {
        src_addr: reply_key.dst_addr,
        dst_addr: *vip,
        src_port: reply_key.dst_port,
        dst_port: vport,
        proto: PROTO_TCP,
        _pad: [0; 3],
    };
    let Some(flow) = FLOWS6.get_ptr_mut(&flow_key) else {
        return false;
    };
    let Some(backend) = BACKENDS6.get(unsafe { (*flow).backend }) else {
        return false;
    };
    if backend.addr != reply_key.src_addr || backend.port != reply_key.src_port {
        return false;
    }
    reply_seen(flow, flags, now, Client::V6(reply_key.dst_addr))
}

/// A reply (TCP `flags`) from the backend of `flow`: false when the flow is stale for it;
/// otherwise the flow is refreshed and the backend's FIN or RST recorded (a RST gives the
/// count back).
#[inline(always)]
fn reply_seen(flow: *mut FlowValue, flags: u8, now: u64, client: Client) -> bool {
    if is_stale(flow, flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK, now) {
        return false;
    }
    refresh(flow, now);
    if flags & TCP_RST != 0 {
        mark(flow, flow_flags::RESET);
        close_flow(flow, client);
    } else if flags & TCP_FIN != 0 {
        mark(flow, flow_flags::BACKEND_FIN);
    }
    true
}

/// Gives the flow's counts back (its backend's, and its source's when it holds one), once:
/// only the CPU whose compare-and-swap sets `CLOSED` does. `client` is the flow's client.
#[inline(always)]
fn close_flow(flow: *mut FlowValue, client: Client) {
    // Other bits (ESTABLISHED) may change concurrently: retry the swap a few times.
    for _ in 0..4 {
        // A plain 64-bit load is atomic on BPF; the compare-and-swap settles any race.
        let seen = unsafe { flags_of(flow) };
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
            if seen & flow_flags::SOURCE_COUNTED != 0 {
                limits::release(unsafe { (*flow).service }, client);
            }
            return;
        }
    }
}

/// Why a SYN opened no flow.
pub enum NoFlow {
    /// `[service.limits]` refused it (counted by reason).
    Refused,
    /// No backend could take it (or the flow could not be recorded).
    NoBackend,
}

/// What opens a flow entry here.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Opening {
    /// A client's SYN: the service's limits and the backends' caps and rates apply.
    Syn,
    /// A mid-stream packet of an ip_hash flow without an entry here (another balancer began
    /// it, and ECMP moved it): it follows the Maglev table as its SYN did, recorded
    /// established, without limits, caps or rates (see `select`).
    Adopt,
    /// [`Opening::Adopt`] for a packet with FIN or RST: sent where the table says, not recorded.
    AdoptEnding,
}

/// A mid-stream packet (TCP `flags`) for `service` that no live flow entry here matches: an
/// ip_hash service still in the config adopts it (`open` with the [`Opening`]), every other
/// passes it to the stack, counted apart (`unknown_flow`: no shared table says where it
/// belongs) and left to the second chance. A late packet of a flow that `ended` here passes
/// (counted): adopting it would count a session that is over. Returns the backend slot, or
/// `None` (`ended`: pass; otherwise: `second_chance::unplaceable`).
#[inline(always)]
pub fn adopt(
    service: &ServiceValue,
    flags: u8,
    ended: bool,
    open: impl FnOnce(Opening) -> Result<u32, NoFlow>,
) -> Option<u32> {
    if ended {
        count_service(service.index, |s| s.passed += 1);
        return None;
    }
    let follows_table =
        service.algorithm == algorithm::IP_HASH && service.flags & service_flags::RETIRED == 0;
    let opening = if flags & (TCP_FIN | TCP_RST) != 0 {
        Opening::AdoptEnding
    } else {
        Opening::Adopt
    };
    let slot = if follows_table {
        open(opening).ok()
    } else {
        None
    };
    if slot.is_none() {
        // Passed or handed on by the caller (`second_chance::unplaceable`), counted there.
        count_service(service.index, |s| s.unknown_flow += 1);
    }
    slot
}

/// Opens the flow of `key`'s packet (`opening`): applies the service's limits to a SYN,
/// chooses a backend, records the flow, and counts it. Returns the backend slot.
#[inline(always)]
pub fn new_flow(
    service: &ServiceValue,
    key: &FlowKey,
    now: u64,
    opening: Opening,
) -> Result<u32, NoFlow> {
    let client_hash = || hash::hash_ipv4(key.src_addr.to_ne_bytes());
    let client = Client::V4(key.src_addr);
    // BPF_ANY: replaces a closed entry for a reused 5-tuple (its count was already given back).
    let slot = take_flow(service, client, client_hash, now, opening, |value| {
        FLOWS.insert(key, value, 0).is_ok()
    })?;
    if opening != Opening::AdoptEnding
        && service.forwarding == forwarding::NAT
        && let Some(backend) = BACKENDS.get(slot)
    {
        let reply_key = tcp_flow_key(backend.addr, key.src_addr, backend.port, key.src_port);
        let reply = NatReply {
            vip_addr: key.dst_addr,
            vip_port: key.dst_port,
            _pad: 0,
            last_seen_ns: now,
        };
        let _ = NAT_REPLIES.insert(&reply_key, &reply, 0);
    }
    Ok(slot)
}

/// [`new_flow`] for an IPv6 client: the flow in `FLOWS6`, a nat flow's reply entry in
/// `NAT_REPLIES6`.
#[inline(always)]
pub fn new_flow6(
    service: &ServiceValue,
    key: &FlowKey6,
    now: u64,
    opening: Opening,
) -> Result<u32, NoFlow> {
    let client_hash = || hash::hash_ipv6(unsafe { core::mem::transmute(key.src_addr) });
    let client = Client::V6(key.src_addr);
    let slot = take_flow(service, client, client_hash, now, opening, |value| {
        FLOWS6.insert(key, value, 0).is_ok()
    })?;
    if opening != Opening::AdoptEnding
        && service.forwarding == forwarding::NAT
        && let Some(backend) = BACKENDS6.get(slot)
    {
        let reply_key = FlowKey6 {
            src_addr: backend.addr,
            dst_addr: key.src_addr,
            src_port: backend.port,
            dst_port: key.src_port,
            proto: PROTO_TCP,
            _pad: [0; 3],
        };
        let reply = NatReply6 {
            vip_addr: key.dst_addr,
            vip_port: key.dst_port,
            _pad: [0; 3],
            last_seen_ns: now,
        };
        let _ = NAT_REPLIES6.insert(&reply_key, &reply, 0);
    }
    Ok(slot)
}

/// Admits a SYN from `client` under the service's limits (taking a unit of its source's count
/// when the source is tracked), chooses a backend for the new flow, has `record` store the
/// flow's value, and on success takes one unit of the backend's count. Returns the backend
/// slot; a source unit taken for a flow that was not made goes back. An adopted flow
/// (`opening`) skips the limits, is recorded established and counted as adopted, not as a new
/// flow of its backend; one ending (`AdoptEnding`) is only chosen for.
#[inline(always)]
fn take_flow(
    service: &ServiceValue,
    client: Client,
    client_hash: impl FnOnce() -> u64,
    now: u64,
    opening: Opening,
    record: impl FnOnce(&FlowValue) -> bool,
) -> Result<u32, NoFlow> {
    let adopt = opening != Opening::Syn;
    let source = if adopt {
        None
    } else {
        match limits::admit(service.index, client, now) {
            Admission::Refused => return Err(NoFlow::Refused),
            Admission::Open(source) => source,
        }
    };
    let no_backend = || {
        if let Some(entry) = source {
            limits::give_back(entry);
        }
        NoFlow::NoBackend
    };
    let Some(slot) = select(service, client_hash, adopt) else {
        return Err(no_backend());
    };
    if opening == Opening::AdoptEnding {
        return Ok(slot);
    }
    let mut flags = match source {
        Some(_) => flow_flags::COUNTED | flow_flags::SOURCE_COUNTED,
        None => flow_flags::COUNTED,
    };
    if adopt {
        flags |= flow_flags::ESTABLISHED;
    }
    let value = FlowValue {
        backend: slot,
        service: service.index,
        last_seen_ns: now,
        flags,
        created_ns: now,
        packets: 1,
    };
    if !record(&value) {
        return Err(no_backend());
    }
    if let Some(active) = ACTIVE.get_ptr_mut(slot) {
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(active, 1) };
    }
    if adopt {
        count_service(service.index, |s| s.adopted += 1);
    } else {
        count_new_flow(slot);
    }
    Ok(slot)
}
