//! In-kernel backend selection for a new flow: the service's algorithm, run by the shared
//! selection code of `switchyard_common` (the same `pick` functions the proxy's `Selector`
//! calls). This file only adapts the maps into their inputs: a backend's view from the half of
//! `SERVICE_BACKENDS` that the service's `table_version` names and from `ACTIVE`, table entries
//! from the same half of the double-buffered `MAGLEV` and `WEIGHTED` arrays, the turn or
//! cursor from the per-CPU `RR_CURSOR`, and `bpf_loop` as the driver of the shared loops (so
//! the verifier checks one iteration of each).

use core::ffi::c_void;

use aya_ebpf::helpers::bpf_loop;
use switchyard_common::backend::BackendView;
use switchyard_common::maps::{
    ServiceBackend, ServiceValue, WEIGHTED_TABLE_SIZE, algorithm, backend_state, maglev_index,
    service_backend_index, weighted_index,
};
use switchyard_common::walk::{Step, Walk};
use switchyard_common::{
    MAGLEV_TABLE_SIZE, MAX_BACKENDS, least_conn, maglev, round_robin, weighted_round_robin,
};

use crate::clock::coarse_now;
use crate::maps::{ACTIVE, BACKEND_RATES, MAGLEV, RR_CURSOR, SERVICE_BACKENDS, WEIGHTED};
use crate::rate;

/// Runs the shared selection loops under `bpf_loop`: one call of the step per index.
#[derive(Clone, Copy)]
struct BpfLoop;

impl Walk for BpfLoop {
    #[inline(always)]
    fn walk<S: Step>(self, iterations: usize, state: &mut S) {
        unsafe {
            bpf_loop(
                iterations as u32,
                one_step::<S> as *mut c_void,
                state as *mut S as *mut c_void,
                0,
            );
        }
    }
}

/// The `bpf_loop` callback: step `i` of the state behind `ctx`; non-zero stops the loop.
#[inline(never)]
extern "C" fn one_step<S: Step>(i: u64, ctx: *mut c_void) -> i64 {
    let state = unsafe { &mut *(ctx as *mut S) };
    state.step(i as usize) as i64
}

/// The view the shared selection code reads of the service's backend at `entry` of
/// `SERVICE_BACKENDS`, straight from the maps; the count is that of the backend's slot. For a
/// SYN only an `UP` backend under its `max_session_rate` is healthy (down and drained ones take
/// no new flows). For a flow adopted mid-stream (`adopt`) the session exists already: a
/// drained backend still counts and its cap and rate do not apply (they are this host's
/// counts, not the flow's); only a down or disabled one is skipped. An entry of weight 0 is
/// unused, not a backend.
#[inline(always)]
fn view(entry: u32, adopt: bool) -> Option<BackendView> {
    let backend = SERVICE_BACKENDS.get(entry)?;
    if backend.weight == 0 {
        return None;
    }
    let active = ACTIVE.get_ptr_mut(backend.slot)?;
    let active = unsafe { core::ptr::read_volatile(active) };
    let (healthy, max_connections) = if adopt {
        (backend_state::takes_adopted(backend.state), 0)
    } else {
        (
            backend.state == backend_state::UP && under_rate(backend),
            backend.max_connections,
        )
    };
    Some(BackendView {
        active: active.min(u32::MAX as u64) as u32,
        weight: backend.weight,
        max_connections,
        healthy: healthy as u32,
        response_us: 0,
    })
}

/// Whether the backend's `max_session_rate` lets one more new flow through now (always, for
/// a backend without one).
#[inline(always)]
fn under_rate(backend: &ServiceBackend) -> bool {
    if backend.rate_interval_ns == 0 {
        return true;
    }
    let Some(arrival) = BACKEND_RATES.get_ptr(backend.slot) else {
        return true;
    };
    rate::allows(
        arrival,
        backend.rate_interval_ns,
        backend.rate_tolerance_ns,
        coarse_now(),
    )
}

/// Takes the new flow from the chosen backend's `max_session_rate`. A CPU that lost the race
/// for the last unit still sends its flow: at most one per CPU over the rate, never a refused
/// client.
#[inline(always)]
fn take_rate(backend: &ServiceBackend) {
    if backend.rate_interval_ns == 0 {
        return;
    }
    if let Some(arrival) = BACKEND_RATES.get_ptr_mut(backend.slot) {
        rate::take(
            arrival,
            backend.rate_interval_ns,
            backend.rate_tolerance_ns,
            coarse_now(),
        );
    }
}

/// The backend slot the service's algorithm picks for a new flow from a client whose address
/// hashes to `client_hash()` (asked by ip_hash only), or `None` when no backend may take it.
/// Table entries and picks name backends by their index within the service. `adopt`: the flow
/// is an established one adopted mid-stream (see [`view`]); it takes no unit of the rate.
#[inline(always)]
pub fn select(
    service: &ServiceValue,
    client_hash: impl FnOnce() -> u64,
    adopt: bool,
) -> Option<u32> {
    let count = service.backend_count as usize;
    if count == 0 || count > MAX_BACKENDS {
        return None;
    }
    let base = service_backend_index(service.index, service.table_version, 0);
    let candidate = move |b: usize| {
        if b < count {
            view(base + b as u32, adopt)
        } else {
            None
        }
    };
    let index = match service.algorithm {
        algorithm::IP_HASH => {
            let first = maglev_index(
                service.index,
                service.table_version,
                MAGLEV_TABLE_SIZE as u32,
                0,
            );
            let entry = move |slot: usize| MAGLEV.get(first + slot as u32).map(|&b| b as usize);
            maglev::pick(
                BpfLoop,
                client_hash(),
                MAGLEV_TABLE_SIZE,
                count,
                entry,
                candidate,
            )
        }
        algorithm::ROUND_ROBIN => with_cursor(service.index, count, |cursor| {
            round_robin::pick(BpfLoop, count, cursor, candidate)
        }),
        algorithm::WEIGHTED_ROUND_ROBIN => {
            let len = service.weighted_len as usize;
            if len > WEIGHTED_TABLE_SIZE as usize {
                return None;
            }
            let first =
                weighted_index(service.index, service.table_version, WEIGHTED_TABLE_SIZE, 0);
            let entry = move |i: usize| WEIGHTED.get(first + i as u32).map(|&b| b as usize);
            with_cursor(service.index, len, |cursor| {
                weighted_round_robin::pick(BpfLoop, len, cursor, count, entry, candidate)
            })
        }
        _ => {
            // The turn among equally loaded backends: this CPU's count of picks.
            let turn = RR_CURSOR.get_ptr_mut(service.index)?;
            let this = unsafe { *turn };
            unsafe { *turn = this.wrapping_add(1) };
            least_conn::pick(BpfLoop, count, this as usize, candidate)
        }
    }?;
    let chosen = SERVICE_BACKENDS.get(base + index as u32)?;
    if !adopt {
        take_rate(chosen);
    }
    Some(chosen.slot)
}

/// A cursor pick on a table (or ring) of `len` entries with this CPU's cursor of the service,
/// which then moves past the entries the pick consumed (kept reduced to the table).
#[inline(always)]
fn with_cursor(
    service: u32,
    len: usize,
    pick: impl FnOnce(usize) -> Option<weighted_round_robin::Choice>,
) -> Option<usize> {
    let cursor = RR_CURSOR.get_ptr_mut(service)?;
    let at = unsafe { *cursor } as usize;
    let choice = pick(at);
    unsafe { *cursor = weighted_round_robin::cursor_after(at, len, choice) as u32 };
    choice.map(|c| c.backend)
}
