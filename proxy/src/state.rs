//! The running state: services and backends built from a validated config, their health, and
//! their shared active counts.
//!
//! Sessions hold an `Arc` of the [`Snapshot`] they started under; a reload builds a new
//! snapshot and swaps it in atomically, so no session loses the state it depends on. Counts and
//! health live in per-backend objects that a reload can carry over by (service, backend) name.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use parking_lot::{Mutex, RwLock};

use crate::balance::Selector;
use crate::config::{BackendConfig, Config, HealthKind, ServiceConfig};
use crate::counters::{ActiveCount, CounterTable};

/// The whole running state, swappable as one unit (not a tokio runtime: the services and
/// backends sessions are served from).
pub struct LiveState {
    current: RwLock<Arc<Snapshot>>,
}

impl LiveState {
    pub fn new(snapshot: Snapshot) -> Self {
        Self {
            current: RwLock::new(Arc::new(snapshot)),
        }
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.read().clone()
    }

    /// Makes `next` the state new sessions see; sessions already running keep theirs.
    pub fn swap(&self, next: Snapshot) -> Arc<Snapshot> {
        std::mem::replace(&mut *self.current.write(), Arc::new(next))
    }
}

pub struct Snapshot {
    pub services: Vec<Arc<Service>>,
}

impl Snapshot {
    /// Builds fresh state for `config`, with one counter slot per backend address in
    /// `counters`: services that share an MTA share its count, so least_conn in any service
    /// (and in the kernel path) sees that MTA's whole load.
    pub fn build(config: &Config, counters: &Arc<CounterTable>) -> Self {
        let slots = backend_slots(config);
        let services = config
            .services
            .iter()
            .map(|service| {
                let backends = service
                    .backends
                    .iter()
                    .map(|backend| {
                        let slot = slots[&backend.address];
                        Arc::new(Backend::new(
                            backend.clone(),
                            service,
                            ActiveCount::new(counters.clone(), slot),
                        ))
                    })
                    .collect();
                Arc::new(Service {
                    selector: Selector::new(service.algorithm, &service.backends),
                    config: service.clone(),
                    backends,
                    sessions: AtomicU32::new(0),
                })
            })
            .collect();
        Self { services }
    }

    /// Backend slots a config needs in the counter table: one per distinct backend address.
    pub fn slots_needed(config: &Config) -> usize {
        backend_slots(config).len()
    }
}

/// Counter slot of every distinct backend address, numbered in order of first appearance.
fn backend_slots(config: &Config) -> HashMap<SocketAddr, usize> {
    let mut slots = HashMap::new();
    for backend in config.services.iter().flat_map(|s| &s.backends) {
        let next = slots.len();
        slots.entry(backend.address).or_insert(next);
    }
    slots
}

pub struct Service {
    pub config: ServiceConfig,
    pub backends: Vec<Arc<Backend>>,
    pub selector: Selector,
    /// Client sessions currently open on this service (for `max_connections`).
    pub sessions: AtomicU32,
}

impl Service {
    /// An available backend for `client` whose index is not in `exclude`, by the service's
    /// algorithm over its backends' live views (see [`Selector::pick`]).
    pub fn pick(&self, client: IpAddr, exclude: &[usize]) -> Option<usize> {
        let backends = &self.backends;
        self.selector
            .pick(backends.len(), |i| backends[i].view(), client, exclude)
    }
}

pub struct Backend {
    pub config: BackendConfig,
    pub active: ActiveCount,
    pub health: HealthState,
    /// Exponential moving average of connect + greeting latency in microseconds; 0 = unknown.
    pub response_us: AtomicU32,
    /// Sessions ever assigned (for logs and benchmarks' distribution figures).
    pub assigned_total: AtomicU64,
}

impl Backend {
    pub fn new(config: BackendConfig, service: &ServiceConfig, active: ActiveCount) -> Self {
        Self {
            config,
            active,
            health: HealthState::new(
                service.health.kind,
                service.health.rise,
                service.health.fall,
            ),
            response_us: AtomicU32::new(0),
            assigned_total: AtomicU64::new(0),
        }
    }

    /// Folds one latency sample into the moving average (weight 1/8 per sample, like TCP's SRTT).
    pub fn record_response(&self, micros: u32) {
        let micros = micros.max(1);
        let _ = self
            .response_us
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
                Some(if old == 0 {
                    micros
                } else {
                    old - old / 8 + micros / 8
                })
            });
    }

    /// The view the selection algorithms read.
    pub fn view(&self) -> switchyard_common::backend::BackendView {
        switchyard_common::backend::BackendView {
            active: self.active.get(),
            weight: self.config.weight,
            max_connections: self.config.max_connections,
            // A drained backend keeps what it has; for choosing, it is as good as down.
            healthy: (self.health.is_up() && !self.config.drain) as u32,
            response_us: self.response_us.load(Ordering::Relaxed),
        }
    }
}

/// Up/down state with rise/fall hysteresis. Active checks move it both ways; passive
/// observations of live traffic can only push it down (as HAProxy's `observe layer4`).
pub struct HealthState {
    up: AtomicBool,
    /// Without active checks nothing could bring a backend back, so passive failures are ignored.
    passive: bool,
    rise: u32,
    fall: u32,
    streak: Mutex<Streak>,
}

#[derive(Default)]
struct Streak {
    successes: u32,
    failures: u32,
}

impl HealthState {
    /// Backends start up so a fresh start serves at once; checks take them down within `fall`.
    pub fn new(kind: HealthKind, rise: u32, fall: u32) -> Self {
        Self {
            up: AtomicBool::new(true),
            passive: kind != HealthKind::None,
            rise: rise.max(1),
            fall: fall.max(1),
            streak: Mutex::new(Streak::default()),
        }
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// Records an active check result; returns the new state when it changed.
    pub fn record_check(&self, ok: bool) -> Option<bool> {
        let mut streak = self.streak.lock();
        if ok {
            streak.failures = 0;
            streak.successes = streak.successes.saturating_add(1);
            if !self.is_up() && streak.successes >= self.rise {
                self.up.store(true, Ordering::Release);
                return Some(true);
            }
        } else {
            streak.successes = 0;
            streak.failures = streak.failures.saturating_add(1);
            if self.is_up() && streak.failures >= self.fall {
                self.up.store(false, Ordering::Release);
                return Some(false);
            }
        }
        None
    }

    /// A connect failure or greeting timeout on live traffic; returns `Some(false)` when it
    /// took the backend down.
    pub fn record_passive_failure(&self) -> Option<bool> {
        if !self.passive {
            return None;
        }
        self.record_check(false)
    }

    /// A live session got its greeting: clears the failure streak without raising a down backend.
    pub fn record_passive_success(&self) {
        self.streak.lock().failures = 0;
    }
}
