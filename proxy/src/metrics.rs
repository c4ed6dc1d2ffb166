//! `GET /metrics`: the Prometheus exposition, made at scrape time from the atomics the data
//! planes already keep and the kernel path's maps (nothing is counted for it per session).

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::http::Context;

/// The exposition for one scrape.
pub fn render(context: &Context) -> String {
    let mut registry = Registry::with_prefix("switchyard");
    let uptime = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
    uptime.set(context.started.elapsed().as_secs_f64());
    registry.register(
        "uptime_seconds",
        "Seconds since this switchyard started",
        uptime,
    );
    let mut text = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut text, &registry);
    text
}
