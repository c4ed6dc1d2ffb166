//! The running state: services and backends built from a validated config (with the runtime
//! overrides `switchyard ctl` set), and what must survive a reload.
//!
//! Sessions hold an `Arc` of the [`Service`] they started under; a reload or a runtime change
//! builds a new [`Snapshot`] and swaps it in atomically (no lock on the accept path), so no
//! session loses the state it depends on. What must carry over from one snapshot to the next
//! lives behind `Arc`s that the next snapshot shares: a backend's health, response-time
//! average and totals ([`BackendLive`], by service and backend name and address), its active
//! count (a slot of the shared counter table, by address), a service's session counts and its
//! selector's rotation position.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Instant, SystemTime};

use anyhow::bail;
use arc_swap::ArcSwap;
use parking_lot::Mutex;

use crate::balance::Selector;
use crate::config::{BackendConfig, Config, HealthKind, ServiceConfig};
use crate::counters::{ActiveCount, CounterTable};
pub use crate::health_state::{Generation, HealthState, Observation};
use crate::sources::Sources;
use crate::tallies::{FailureCounts, LatencyHistogram, RefusalCounts, Transferred};
use crate::throttle::{Gcra, Rate};

/// The whole running state, swappable as one unit (not a tokio runtime: the services and
/// backends sessions are served from).
pub struct LiveState {
    current: ArcSwap<Snapshot>,
}

impl LiveState {
    pub fn new(snapshot: Snapshot) -> Self {
        Self {
            current: ArcSwap::from_pointee(snapshot),
        }
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Makes `next` the state new sessions see; sessions already running keep theirs.
    pub fn swap(&self, next: Snapshot) -> Arc<Snapshot> {
        self.current.swap(Arc::new(next))
    }
}

pub struct Snapshot {
    pub services: Vec<Arc<Service>>,
    /// Counter slots by backend address, and the table they are in (shared by every
    /// snapshot of a run).
    slots: Arc<SlotBook>,
    /// Kernel-path service indexes by service name (stable for a run; see [`Service`]).
    indexes: Arc<IndexBook>,
    /// `[announce] peers` and `interface`, for the kernel path's second chance.
    pub second_chance: Option<crate::config::SecondChance>,
}

/// The runtime state of one backend that `switchyard ctl` changes and reloads keep.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Override {
    /// `ctl drain` (true) or `ctl undrain` (false), until the file changes that backend's
    /// `drain`.
    pub drain: Option<bool>,
    /// `ctl weight`, until the file changes that backend's `weight`.
    pub weight: Option<u32>,
    /// `ctl disable`, until `ctl enable`.
    pub disabled: bool,
    /// Who set the override last (the uid `SO_PEERCRED` gave), for `ctl show`.
    pub by_uid: Option<u32>,
}

/// Runtime overrides by (service, backend) name.
pub type Overrides = HashMap<(String, String), Override>;

impl Snapshot {
    /// Builds fresh state for `config`, with one counter slot per backend address in
    /// `counters`: services that share an MTA share its count, so least_conn in any service
    /// (and in the kernel path) sees that MTA's whole load.
    pub fn build(config: &Config, counters: &Arc<CounterTable>) -> anyhow::Result<Self> {
        let first = Snapshot {
            services: Vec::new(),
            slots: Arc::new(SlotBook::new(counters.clone())),
            indexes: Arc::new(IndexBook::new(Self::service_capacity(config))),
            second_chance: None,
        };
        first.next(config, &Overrides::new())
    }

    /// The state for `config` with `overrides` applied, carrying over from `self` every
    /// service and backend that keeps its name (backends also their address): health, counts,
    /// averages, totals, rotation positions. Fails (and nothing changes) when the counter table
    /// or the kernel's service table has no room left for new addresses or services.
    pub fn next(&self, config: &Config, overrides: &Overrides) -> anyhow::Result<Snapshot> {
        let mut services = Vec::with_capacity(config.services.len());
        for service in &config.services {
            let old = self.service(&service.name);
            services.push(Arc::new(Service::carry(
                service,
                old.map(|s| &**s),
                overrides,
                &self.slots,
                &self.indexes,
            )?));
        }
        Ok(Snapshot {
            services,
            slots: self.slots.clone(),
            indexes: self.indexes.clone(),
            second_chance: config.second_chance.clone(),
        })
    }

    pub fn service(&self, name: &str) -> Option<&Arc<Service>> {
        self.services.iter().find(|s| s.config.name == name)
    }

    /// The service called `name`, or a message for the one who asked that lists those that
    /// exist.
    pub fn named(&self, name: &str) -> Result<&Arc<Service>, String> {
        self.service(name).ok_or_else(|| {
            let names: Vec<&str> = self
                .services
                .iter()
                .map(|s| s.config.name.as_str())
                .collect();
            format!("unknown service {name:?}; services: {}", names.join(", "))
        })
    }

    /// The shared counter table every backend counts in.
    pub fn counters(&self) -> &Arc<CounterTable> {
        &self.slots.table
    }

    /// Counter slots a config needs: one per distinct backend address.
    pub fn slots_needed(config: &Config) -> usize {
        let mut addresses: Vec<SocketAddr> = config
            .services
            .iter()
            .flat_map(|s| s.backends.iter().map(|b| b.address))
            .collect();
        addresses.sort_unstable();
        addresses.dedup();
        addresses.len()
    }

    /// Counter slots to allocate at start: what the config needs and room for the backends
    /// reloads add (a slot is never reused within a run: flows may still point at it).
    pub fn slot_capacity(config: &Config) -> usize {
        let needed = Self::slots_needed(config);
        needed.saturating_mul(2).max(needed + SLOT_HEADROOM)
    }

    /// Kernel service indexes to allocate at start, with room for services reloads add.
    pub fn service_capacity(config: &Config) -> usize {
        config.services.len() + SERVICE_HEADROOM
    }
}

/// Room for backend addresses added by reloads, at least.
const SLOT_HEADROOM: usize = 256;
/// Room for services added by reloads.
const SERVICE_HEADROOM: usize = 16;

/// Which counter slot each backend address counts in. A slot, once given, stays with its
/// address for the run: sessions and kernel flows of a removed backend still count in it, and a
/// backend that comes back at the same address finds its count.
struct SlotBook {
    table: Arc<CounterTable>,
    slots: Mutex<HashMap<SocketAddr, usize>>,
}

impl SlotBook {
    fn new(table: Arc<CounterTable>) -> Self {
        Self {
            table,
            slots: Mutex::new(HashMap::new()),
        }
    }

    fn slot(&self, address: SocketAddr) -> anyhow::Result<usize> {
        let mut slots = self.slots.lock();
        if let Some(&slot) = slots.get(&address) {
            return Ok(slot);
        }
        let next = slots.len();
        if next >= self.table.len() {
            bail!(
                "no room for backend address {address}: the counter table holds {} addresses for this run (sized at start); restart switchyard to add more",
                self.table.len()
            );
        }
        slots.insert(address, next);
        Ok(next)
    }
}

/// The kernel path's index of each service, by name: flows record it, so it stays with its
/// service for the run and is never given to another.
struct IndexBook {
    capacity: usize,
    indexes: Mutex<HashMap<String, u32>>,
}

impl IndexBook {
    fn new(capacity: usize) -> Self {
        Self {
            capacity,
            indexes: Mutex::new(HashMap::new()),
        }
    }

    fn index(&self, name: &str) -> anyhow::Result<u32> {
        let mut indexes = self.indexes.lock();
        if let Some(&index) = indexes.get(name) {
            return Ok(index);
        }
        let next = indexes.len();
        if next >= self.capacity {
            bail!(
                "no room for service {name:?}: this run has room for {} services (sized at start); restart switchyard to add more",
                self.capacity
            );
        }
        indexes.insert(name.to_string(), next as u32);
        Ok(next as u32)
    }
}

pub struct Service {
    /// The service as configured, with runtime overrides applied to its backends.
    pub config: ServiceConfig,
    pub backends: Vec<Arc<Backend>>,
    pub selector: Selector,
    /// Session counts shared by every snapshot of this service.
    pub counts: Arc<ServiceCounts>,
    /// The service's index in the kernel path's maps (stable for the run).
    pub kernel_index: u32,
}

/// A service's session counts and per-source state, which reloads carry over.
pub struct ServiceCounts {
    /// Client sessions currently open on this service (for `max_connections`).
    pub sessions: AtomicU32,
    /// Client sessions accepted since start.
    pub accepted: AtomicU64,
    /// Clients answered `421` since start, by why.
    pub refused: RefusalCounts,
    /// Per-source limits and allow/deny lists (`[service.limits]`), with their rejections.
    pub sources: Arc<Sources>,
}

impl ServiceCounts {
    fn new(config: &ServiceConfig) -> Self {
        Self {
            sessions: AtomicU32::new(0),
            accepted: AtomicU64::new(0),
            refused: RefusalCounts::default(),
            sources: Arc::new(Sources::new(&config.limits)),
        }
    }
}

impl Service {
    fn carry(
        config: &ServiceConfig,
        old: Option<&Service>,
        overrides: &Overrides,
        slots: &SlotBook,
        indexes: &IndexBook,
    ) -> anyhow::Result<Service> {
        let mut config = config.clone();
        let mut backends = Vec::with_capacity(config.backends.len());
        for backend in &mut config.backends {
            let key = (config.name.clone(), backend.name.clone());
            let runtime = overrides.get(&key).cloned().unwrap_or_default();
            if let Some(drain) = runtime.drain {
                backend.drain = drain;
            }
            if let Some(weight) = runtime.weight {
                backend.weight = weight;
            }
            let slot = slots.slot(backend.address)?;
            // The same backend: same name, same address. A new address is a new backend that
            // starts fresh; the old one's sessions finish on it.
            let live = old
                .and_then(|s| s.backend(&backend.name))
                .filter(|b| b.config.address == backend.address)
                .map(|b| b.live.clone());
            let live = match live {
                Some(live) => {
                    live.health.reconfigure(&config.health);
                    live
                }
                None => Arc::new(BackendLive::new(&config.health)),
            };
            backends.push(Arc::new(Backend {
                config: backend.clone(),
                runtime,
                active: ActiveCount::new(slots.table.clone(), slot),
                live,
            }));
        }
        let selector = Selector::new(config.algorithm, &config.backends);
        if let Some(old) = old {
            selector.continue_from(&old.selector);
        }
        Ok(Service {
            kernel_index: indexes.index(&config.name)?,
            counts: match old {
                Some(old) => {
                    old.counts.sources.configure(&config.limits);
                    old.counts.clone()
                }
                None => Arc::new(ServiceCounts::new(&config)),
            },
            selector,
            backends,
            config,
        })
    }

    pub fn backend(&self, name: &str) -> Option<&Arc<Backend>> {
        self.backends.iter().find(|b| b.config.name == name)
    }

    /// An available backend for `client` whose index is not in `exclude`, by the service's
    /// algorithm over its backends' live views (see [`Selector::pick`]).
    ///
    /// Without checks (`kind = "none"`) a down verdict is only live traffic's guess, so when
    /// every backend left is down the client is not refused on that guess: they are tried
    /// as if up, and the first that greets serves it.
    pub fn pick(&self, client: IpAddr, exclude: &[usize]) -> Option<usize> {
        let backends = &self.backends;
        let count = backends.len();
        self.selector
            .pick(count, |i| backends[i].view(), client, exclude)
            .or_else(|| {
                (self.config.health.kind == HealthKind::None).then(|| {
                    self.selector
                        .pick(count, |i| backends[i].view_if(true), client, exclude)
                })?
            })
    }
}

pub struct Backend {
    /// The backend as configured, with its runtime overrides (`drain`, `weight`) applied.
    pub config: BackendConfig,
    /// The runtime overrides in force (`ctl disable`: no traffic and no checks; who set them,
    /// for `ctl show`'s why).
    pub runtime: Override,
    pub active: ActiveCount,
    pub live: Arc<BackendLive>,
}

/// What a backend keeps across reloads: health, the response-time average, totals, the last
/// check.
pub struct BackendLive {
    pub health: HealthState,
    /// Exponential moving average of connect + greeting latency in microseconds; 0 = unknown.
    pub response_us: AtomicU32,
    /// Connect + greeting time of every session it took: its count is the sessions ever
    /// assigned ([`BackendLive::assigned_total`]), so a set-up costs no separate count.
    pub setup: LatencyHistogram,
    /// Failed attempts on live traffic (connect failures, no positive greeting), by reason;
    /// their sum is the backend's failure count.
    pub failure_reasons: FailureCounts,
    /// Bytes its sessions relayed each way, added at each session's end.
    pub bytes: Transferred,
    /// Duration of every active check that reached a verdict; health-check connections are
    /// counted here only, never as sessions.
    pub checks: LatencyHistogram,
    /// Of those, the failed ones.
    pub checks_failed: AtomicU64,
    /// The last active check's result.
    pub last_check: Mutex<Option<CheckRecord>>,
    /// `max_session_rate`'s state.
    pub session_rate: Gcra,
    /// Times it was passed over for being at its `max_session_rate`.
    pub throttled: AtomicU64,
}

/// One active check's result, for `ctl show` and for the next check's schedule after a reload.
#[derive(Clone, Debug)]
pub struct CheckRecord {
    pub ok: bool,
    pub started: Instant,
    pub ended: SystemTime,
    pub detail: String,
}

impl BackendLive {
    fn new(health: &crate::config::HealthConfig) -> Self {
        Self {
            health: HealthState::new(health),
            response_us: AtomicU32::new(0),
            setup: LatencyHistogram::default(),
            failure_reasons: FailureCounts::default(),
            bytes: Transferred::default(),
            checks: LatencyHistogram::default(),
            checks_failed: AtomicU64::new(0),
            last_check: Mutex::new(None),
            session_rate: Gcra::default(),
            throttled: AtomicU64::new(0),
        }
    }

    /// Sessions ever assigned (logs, `ctl show`, `/metrics`, benchmarks' distribution figures).
    pub fn assigned_total(&self) -> u64 {
        self.setup.count()
    }
}

impl Backend {
    /// Folds one latency sample into the moving average (weight 1/8 per sample, like TCP's SRTT).
    pub fn record_response(&self, micros: u32) {
        let micros = micros.max(1);
        let _ = self
            .live
            .response_us
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
                Some(if old == 0 {
                    micros
                } else {
                    old - old / 8 + micros / 8
                })
            });
    }

    /// Whether new sessions and flows may go to it (health aside): not drained, not disabled.
    pub fn takes_new(&self) -> bool {
        !self.config.drain && !self.runtime.disabled
    }

    /// Its `max_session_rate` as a rate (a tenth of a second's worth of burst), if it has one;
    /// the kernel path gets the same parameters.
    pub fn session_rate(&self) -> Option<Rate> {
        let per_second = self.config.max_session_rate;
        (per_second != 0).then(|| Rate {
            per_second,
            burst: (per_second / 10).max(1),
        })
    }

    /// Takes one new session from its `max_session_rate` (always granted without one).
    pub fn take_session_rate(&self) -> bool {
        let Some(rate) = self.session_rate() else {
            return true;
        };
        let taken = self
            .live
            .session_rate
            .try_take(rate, crate::throttle::now_ns());
        if !taken {
            self.live.throttled.fetch_add(1, Ordering::Relaxed);
        }
        taken
    }

    /// Whether its `max_session_rate` would let a session through now.
    fn under_session_rate(&self) -> bool {
        self.session_rate().is_none_or(|rate| {
            self.live
                .session_rate
                .would_allow(rate, crate::throttle::now_ns())
        })
    }

    /// The view the selection algorithms read.
    pub fn view(&self) -> switchyard_common::backend::BackendView {
        self.view_if(self.live.health.is_up())
    }

    /// The view with health taken as `up`.
    fn view_if(&self, up: bool) -> switchyard_common::backend::BackendView {
        switchyard_common::backend::BackendView {
            active: self.active.get(),
            weight: self.config.weight,
            max_connections: self.config.max_connections,
            // A drained backend keeps what it has; for choosing, it is as good as down.
            healthy: (up && self.takes_new() && self.under_session_rate()) as u32,
            response_us: self.live.response_us.load(Ordering::Relaxed),
        }
    }
}
