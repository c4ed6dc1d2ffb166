//! `GET /` and `GET /api/state`: the live dashboard, one self-contained page embedded in the
//! binary (HTML, CSS and JS in one file, nothing fetched from elsewhere), and the JSON it polls
//! every second: `ctl show`'s report, the kernel path's counters and the recent events. Rates
//! and sparklines are the page's own arithmetic over successive totals, so the daemon keeps no
//! history beyond the event ring.

use std::time::SystemTime;

use serde::Serialize;

use crate::control::ServiceReport;
use crate::events::{self, Event};
use crate::http::Context;
use crate::show;
use crate::totals::{KernelCounters, ServiceTotals, Totals, XdpAttachment};

/// The page.
pub const PAGE: &str = include_str!("dashboard/index.html");

/// What `/api/state` answers (documented in README, "Dashboard").
#[derive(Serialize)]
pub struct State {
    /// The daemon's clock when read: the page divides count differences by its differences.
    pub now_unix_ms: u64,
    pub uptime_s: u64,
    /// `ctl show --json`'s services.
    pub services: Vec<ServiceReport>,
    /// The kernel path's counters; `null` when no xdp service runs.
    pub kernel: Option<KernelState>,
    /// The last [`events::CAPACITY`] events, oldest first.
    pub events: Vec<Event>,
}

/// The kernel path's counters: per xdp service packets forwarded, passed, dropped and SYNs
/// with no backend; per backend new flows, packets and bytes; where the program is attached.
#[derive(Serialize)]
pub struct KernelState {
    pub attachments: Vec<XdpAttachment>,
    pub services: Vec<ServiceTotals>,
}

/// The state now, as JSON.
pub fn state_json(context: &Context) -> String {
    let state = collect(context);
    // Plain data with string keys: serialization cannot fail.
    serde_json::to_string(&state).unwrap_or_else(|error| format!("{{\"error\":\"{error}\"}}"))
}

/// The state now.
pub fn collect(context: &Context) -> State {
    let snapshot = context.state.snapshot();
    let kernel = context.kernel.as_deref().map(|k| k as &dyn KernelCounters);
    // Every service: naming none cannot be refused.
    let services = show::report(&snapshot, None, kernel)
        .map(|report| report.services)
        .unwrap_or_default();
    let kernel = kernel.map(|k| Totals::collect(&snapshot, Some(k), true));
    State {
        now_unix_ms: events::unix_ms(SystemTime::now()),
        uptime_s: context.started.elapsed().as_secs(),
        services,
        kernel: kernel
            .filter(|totals| !totals.services.is_empty())
            .map(|totals| KernelState {
                attachments: totals.xdp_attachments,
                services: totals.services,
            }),
        events: events::EVENTS.recent(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Self-contained: nothing the browser would fetch from another place.
    #[test]
    fn page_loads_nothing_from_elsewhere() {
        for outside in [
            "http://", "https://", "//cdn", "@import", "url(", "<link", " src=",
        ] {
            assert!(
                !PAGE.contains(outside),
                "the dashboard page refers to {outside:?}: it must be self-contained"
            );
        }
        assert!(PAGE.contains("/api/state"), "the page polls /api/state");
    }
}
