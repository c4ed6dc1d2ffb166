//! Per service and per backend: sessions by plane, active counts, health and state, weight,
//! least_time's average, failures by reason, connect + greeting latency, bytes each way, health
//! checks (kept apart from sessions) and transitions; per service accepted sessions and `421`s
//! by reason. State, weight and active come from `ctl show`'s report of the same snapshot, so
//! `/metrics` and `ctl show --json` say the same.

use std::sync::atomic::Ordering;

use super::{Family, Labels, Value};
use crate::config::Dataplane;
use crate::control::{BackendReport, ServiceReport};
use crate::show;
use crate::state::{Backend, Service, Snapshot};
use crate::tallies::{FailureReason, Refusal};
use crate::totals::KernelCounters;

/// Every state `switchyard_backend_state` has a series for.
const STATES: [&str; 4] = ["up", "down", "drain", "disabled"];

/// The families of every service and backend of `snapshot`.
pub(super) fn families(snapshot: &Snapshot, kernel: Option<&dyn KernelCounters>) -> Vec<Family> {
    let mut set = BackendFamilies::new();
    let mut services = ServiceFamilies::new();
    // The whole snapshot, so it cannot name an unknown service.
    let Ok(report) = show::report(snapshot, None, kernel) else {
        return Vec::new();
    };
    for (service, shown) in snapshot.services.iter().zip(&report.services) {
        services.add(service, shown);
        let xdp = service.config.dataplane == Dataplane::Xdp;
        for (backend, shown) in service.backends.iter().zip(&shown.backends) {
            let labels = vec![
                ("service", service.config.name.clone()),
                ("backend", backend.config.name.clone()),
            ];
            // The kernel path's new flows are its sessions.
            let flows = kernel
                .filter(|_| xdp)
                .and_then(|k| k.backend(backend.active.slot()))
                .map(|k| k.new_flows);
            set.add(&labels, backend, shown, flows);
        }
    }
    let mut all = set.into_vec();
    all.extend(services.into_vec());
    all
}

struct BackendFamilies {
    sessions: Family,
    active: Family,
    up: Family,
    state: Family,
    weight: Family,
    response: Family,
    failures: Family,
    setup: Family,
    bytes: Family,
    checks: Family,
    check_duration: Family,
    transitions: Family,
    throttled: Family,
}

impl BackendFamilies {
    fn new() -> Self {
        Self {
            sessions: Family::counter(
                "backend_sessions",
                "Sessions assigned to the backend: plane=\"proxy\" sessions the proxy relayed (health checks not included), plane=\"xdp\" new flows of the kernel path",
            ),
            active: Family::gauge(
                "backend_active_sessions",
                "Sessions and flows open on the backend now (the count both planes share)",
            ),
            up: Family::gauge(
                "backend_up",
                "1 when the backend may take new sessions (healthy, not drained, not disabled), else 0",
            ),
            state: Family::gauge(
                "backend_state",
                "1 for the state the backend is in (up, down, drain, disabled), 0 for the others",
            ),
            weight: Family::gauge("backend_weight", "The weight in use (the file's, or ctl's)"),
            response: Family::gauge(
                "backend_response_average_seconds",
                "least_time's moving average of connect + greeting (live sessions and checks); 0 = unknown",
            ),
            failures: Family::counter(
                "backend_failures",
                "Failed attempts on live traffic by reason (connect_error, connect_timeout, greeting_timeout, greeting_error, greeting_refused)",
            ),
            setup: Family::histogram(
                "backend_setup_duration_seconds",
                "Connect + greeting time of the sessions the backend took",
            ),
            bytes: Family::counter(
                "backend_relayed_bytes",
                "Bytes relayed by the proxy, counted when a session ends: direction=\"to_backend\" from clients, \"to_client\" from the backend (its greeting included)",
            ),
            checks: Family::counter(
                "backend_health_checks",
                "Active health checks by result (passed, failed); never counted as sessions",
            ),
            check_duration: Family::histogram(
                "backend_health_check_duration_seconds",
                "How long active health checks took",
            ),
            transitions: Family::counter(
                "backend_health_transitions",
                "Health changes by the state entered (to=\"up\", to=\"down\")",
            ),
            throttled: Family::counter(
                "backend_throttled",
                "Times the backend was passed over for being at its max_session_rate",
            ),
        }
    }

    fn add(
        &mut self,
        labels: &Labels,
        backend: &Backend,
        shown: &BackendReport,
        flows: Option<u64>,
    ) {
        let live = &backend.live;
        let with = |name: &'static str, value: &str| {
            let mut labels = labels.clone();
            labels.push((name, value.to_string()));
            labels
        };
        self.sessions
            .count(with("plane", "proxy"), live.assigned_total());
        if let Some(flows) = flows {
            self.sessions.count(with("plane", "xdp"), flows);
        }
        self.active.count(labels.clone(), shown.active);
        self.up
            .count(labels.clone(), u64::from(shown.state == "up"));
        for state in STATES {
            self.state
                .count(with("state", state), u64::from(shown.state == state));
        }
        self.weight.count(labels.clone(), u64::from(shown.weight));
        self.response
            .float(labels.clone(), f64::from(shown.response_us) / 1e6);
        for reason in FailureReason::ALL {
            self.failures.count(
                with("reason", reason.label()),
                live.failure_reasons.get(reason),
            );
        }
        self.setup
            .add(labels.clone(), Value::Histogram(live.setup.read()));
        let bytes = &live.bytes;
        self.bytes.count(
            with("direction", "to_backend"),
            bytes.from_client.load(Ordering::Relaxed),
        );
        self.bytes.count(
            with("direction", "to_client"),
            bytes.from_backend.load(Ordering::Relaxed),
        );
        let checks = live.checks.read();
        let failed = live.checks_failed.load(Ordering::Relaxed);
        self.checks.count(
            with("result", "passed"),
            checks.count.saturating_sub(failed),
        );
        self.checks.count(with("result", "failed"), failed);
        self.check_duration
            .add(labels.clone(), Value::Histogram(checks));
        let (went_up, went_down) = live.health.transitions();
        self.transitions.count(with("to", "up"), went_up);
        self.transitions.count(with("to", "down"), went_down);
        self.throttled
            .count(labels.clone(), live.throttled.load(Ordering::Relaxed));
    }

    fn into_vec(self) -> Vec<Family> {
        vec![
            self.sessions,
            self.active,
            self.up,
            self.state,
            self.weight,
            self.response,
            self.failures,
            self.setup,
            self.bytes,
            self.checks,
            self.check_duration,
            self.transitions,
            self.throttled,
        ]
    }
}

struct ServiceFamilies {
    accepted: Family,
    active: Family,
    refused: Family,
    sources: Family,
    tracked: Family,
}

impl ServiceFamilies {
    fn new() -> Self {
        Self {
            accepted: Family::counter(
                "service_sessions",
                "Client connections the proxy accepted for the service (within max_connections)",
            ),
            active: Family::gauge(
                "service_active_sessions",
                "Client sessions of the proxy open on the service now",
            ),
            refused: Family::counter(
                "service_refused",
                "Clients answered 421 by reason: no_backend, max_connections, balancer_exhausted (the balancer's own descriptors, memory or ports)",
            ),
            sources: Family::counter(
                "service_source_rejections",
                "Clients turned away by [service.limits], by reason: denied (554; on the xdp path a dropped SYN, deny or allow list), too_many (per_source_connections), too_fast (per_source_rate); untracked counts clients served without per-source tracking (the table was full of busy sources)",
            ),
            tracked: Family::gauge(
                "service_tracked_sources",
                "Sources in the service's per-source table now (at most tracked_sources; the xdp path counts its table every 5 s)",
            ),
        }
    }

    fn add(&mut self, service: &Service, shown: &ServiceReport) {
        let labels: Labels = vec![("service", service.config.name.clone())];
        let counts = &service.counts;
        self.accepted
            .count(labels.clone(), counts.accepted.load(Ordering::Relaxed));
        self.active.count(
            labels.clone(),
            u64::from(counts.sessions.load(Ordering::Relaxed)),
        );
        for why in Refusal::ALL {
            let mut labels = labels.clone();
            labels.push(("reason", why.label().to_string()));
            self.refused.count(labels, counts.refused.get(why));
        }
        // As `ctl show` has them: the proxy's counts, or an xdp service's kernel drops.
        let sources = &shown.sources;
        for (why, value) in [
            ("denied", sources.denied),
            ("too_many", sources.too_many),
            ("too_fast", sources.too_fast),
            ("untracked", sources.untracked),
        ] {
            let mut labels = labels.clone();
            labels.push(("reason", why.to_string()));
            self.sources.count(labels, value);
        }
        self.tracked.count(labels, sources.tracked);
    }

    fn into_vec(self) -> Vec<Family> {
        vec![
            self.accepted,
            self.active,
            self.refused,
            self.sources,
            self.tracked,
        ]
    }
}
