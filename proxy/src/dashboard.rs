//! `GET /` and `GET /api/state`: the live dashboard, one self-contained page embedded in the
//! binary, and the JSON it polls.

use crate::http::Context;
use crate::show;

/// The page (HTML, CSS and JS in one file; nothing fetched from elsewhere).
pub const PAGE: &str = include_str!("dashboard/index.html");

/// The state the page polls: `ctl show`'s report.
pub fn state_json(context: &Context) -> String {
    let kernel = context
        .kernel
        .as_deref()
        .map(|k| k as &dyn crate::totals::KernelCounters);
    match show::report(&context.state.snapshot(), None, kernel) {
        Ok(report) => serde_json::to_string(&report).unwrap_or_else(|_| "{}".to_string()),
        Err(_) => "{}".to_string(),
    }
}
