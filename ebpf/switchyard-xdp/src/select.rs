//! In-kernel backend selection for a new flow: the service's algorithm over its backends as
//! views read straight from the maps (`SERVICE_BACKENDS`, `ACTIVE`), Maglev and weighted tables
//! probed from their double-buffered halves, and scans for the least loaded or any available
//! backend. Every loop runs under `bpf_loop`, so the verifier checks one iteration.

use core::ffi::c_void;

use aya_ebpf::helpers::{bpf_get_prandom_u32, bpf_loop};
use switchyard_common::backend::BackendView;
use switchyard_common::maps::{
    FlowKey, ServiceValue, WEIGHTED_TABLE_SIZE, algorithm, backend_state, maglev_index,
    service_backend_index, weighted_index,
};
use switchyard_common::{
    MAGLEV_TABLE_SIZE, MAX_BACKENDS, hash, least_conn, maglev, weighted_round_robin,
};

use crate::maps::{ACTIVE, MAGLEV, RR_CURSOR, SERVICE_BACKENDS, WEIGHTED};

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
pub fn select(service: &ServiceValue, key: &FlowKey) -> Option<u32> {
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

/// Runs `step` up to `iterations` times under `bpf_loop` over `state`. Returns what it found:
/// (index within the service, steps taken).
#[inline(always)]
fn run(
    mut state: LoopState,
    iterations: u32,
    step: extern "C" fn(u64, *mut c_void) -> i64,
) -> Option<(u32, u32)> {
    unsafe {
        bpf_loop(
            iterations,
            step as *mut c_void,
            &raw mut state as *mut c_void,
            0,
        );
    }
    (state.best != NONE).then_some((state.best, state.steps))
}

/// Any available backend (`SCAN_FIRST_AVAILABLE`) or the least loaded relative to its weight
/// (`SCAN_LEAST_LOADED`), from `start`. Returns (index within the service, steps taken).
#[inline(always)]
fn scan(mode: u32, base: u32, count: u32, start: u32) -> Option<(u32, u32)> {
    let state = LoopState::new(mode, 0, 0, count, start, base, count);
    run(state, count, scan_step)
}

/// The `i`th position from `start` round a ring of `len` (not zero) entries; `i < len`.
#[inline(always)]
fn wrapped(start: u32, i: u64, len: u32) -> u32 {
    // `checked_rem`: a `%` the compiler cannot prove safe links a panic path the loader rejects.
    let mut position = start.checked_rem(len).unwrap_or(0) + (i as u32);
    if position >= len {
        position -= len;
    }
    position
}

#[inline(never)]
extern "C" fn scan_step(i: u64, ctx: *mut c_void) -> i64 {
    let state = unsafe { &mut *(ctx as *mut LoopState) };
    if state.count == 0 {
        return 1;
    }
    let index = wrapped(state.start, i, state.count);
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
    let state = LoopState::new(0, table, first, len, position, base, count);
    run(state, probes.min(len), probe_step)
}

#[inline(never)]
extern "C" fn probe_step(i: u64, ctx: *mut c_void) -> i64 {
    let state = unsafe { &mut *(ctx as *mut LoopState) };
    if state.len == 0 {
        return 1;
    }
    let position = wrapped(state.start, i, state.len);
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
