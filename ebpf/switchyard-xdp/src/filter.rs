//! The cheap answers that spare a packet hash-map lookups: whether an address may be a VIP or
//! a backend at all (`ADDRESS_FILTER`), and an existing flow's service by its index
//! (`SERVICE_ROUTES`) instead of by its key (`SERVICES`). Both are arrays, whose lookups the
//! verifier turns into a bounds check and an address computation.

use switchyard_common::maps::{FlowValue, ServiceKey, ServiceRoute, address_filter};

use crate::maps::{ADDRESS_FILTER, SERVICE_ROUTES};

/// Whether `addr`:`port` may be in `half` of the filter (false: it certainly is not).
#[inline(always)]
pub fn may_be(half: u32, addr: u32, port: u16) -> bool {
    let (word, bit) = address_filter::bit(half, addr, port);
    ADDRESS_FILTER.get(word).is_some_and(|w| *w & bit != 0)
}

/// The service of `flow` when it is the one `SERVICES` has under `key`; `None` when that takes
/// the `SERVICES` lookup to tell.
#[inline(always)]
pub fn route_of(flow: *mut FlowValue, key: &ServiceKey) -> Option<ServiceRoute> {
    let route = SERVICE_ROUTES.get(unsafe { (*flow).service })?;
    (route.vip == *key).then_some(*route)
}
