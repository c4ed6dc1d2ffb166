//! Health-gated announcement of services' VIPs through the local BIRD: each service with
//! `announce = true` has a BIRD `static` protocol holding its VIP route, which BIRD exports over
//! BGP to the routers. Switchyard enables that protocol while it runs and the service has a
//! backend that can take sessions, and disables it (BIRD withdraws the route) when none can,
//! when the node is drained (`ctl node drain`), and first thing at shutdown.
//!
//! One task on the main thread decides every [`PERIOD`] (and at once when woken by a `ctl`
//! change or a reload) from the running snapshot, so a session costs nothing here. It tells
//! BIRD only what changed, and everything again every [`REASSERT`] (a restarted or reconfigured
//! BIRD starts with the protocol as its file says). When BIRD cannot be reached it logs once,
//! retries every period and leaves backends alone: the balancer's trouble is not theirs.

mod bird;
mod withdraw;

pub use withdraw::withdraw_all;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::events::{self, Kind};
use crate::state::{LiveState, Snapshot};
use bird::{Bird, Outcome};

/// How often the decision is re-made from health and drain state.
pub const PERIOD: Duration = Duration::from_millis(200);
/// How often every protocol's state is told to BIRD again, changed or not.
const REASSERT: Duration = Duration::from_secs(5);
/// How long shutdown (and `ctl node drain`'s reply) waits for BIRD to confirm.
pub const CONFIRM_LIMIT: Duration = Duration::from_secs(3);

/// An announced service's state, for `ctl show` and `/metrics`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Status {
    /// The BIRD protocol carrying its VIP.
    pub protocol: String,
    /// Whether BIRD last confirmed the protocol enabled (the route announced).
    pub announced: bool,
    /// Why it is (or should be) announced or withdrawn, and BIRD trouble if any.
    pub why: String,
}

/// The announcement side of the running balancer: the node's drain, the BIRD socket from the
/// config, and what the task last did per service.
pub struct Announcer {
    bird_socket: Mutex<Option<PathBuf>>,
    /// `Some(uid)` while the node is drained by `ctl node drain`.
    node_drained: Mutex<Option<u32>>,
    status: Mutex<BTreeMap<String, Status>>,
    wake: Notify,
    /// Counts the task's passes, so a caller can wait for one that saw its change.
    passes: watch::Sender<u64>,
}

/// `switchyard_announcements_total`: per (service, `announce`/`withdraw`), the changes BIRD
/// confirmed.
pub static CHANGES: Mutex<BTreeMap<(String, &'static str), u64>> = Mutex::new(BTreeMap::new());

impl Announcer {
    pub fn new(bird_socket: Option<PathBuf>) -> Arc<Self> {
        Arc::new(Self {
            bird_socket: Mutex::new(bird_socket),
            node_drained: Mutex::new(None),
            status: Mutex::new(BTreeMap::new()),
            wake: Notify::new(),
            passes: watch::channel(0).0,
        })
    }

    /// A reload's `[announce] bird_socket`; the task decides again at once.
    pub fn configure(&self, bird_socket: Option<PathBuf>) {
        *self.bird_socket.lock() = bird_socket;
        self.wake.notify_one();
    }

    /// `ctl node drain` (`Some(uid)`) or `undrain` (`None`); whether that changed anything.
    pub fn set_node_drained(&self, by: Option<u32>) -> bool {
        let mut drained = self.node_drained.lock();
        let changed = drained.is_some() != by.is_some();
        *drained = by;
        drop(drained);
        self.wake.notify_one();
        changed
    }

    /// `Some(uid)` while the node is drained.
    pub fn node_drained(&self) -> Option<u32> {
        *self.node_drained.lock()
    }

    /// Every announced service's status, by service name.
    pub fn status(&self) -> BTreeMap<String, Status> {
        self.status.lock().clone()
    }

    /// Waits (at most [`CONFIRM_LIMIT`]) for a pass that started after this call.
    pub async fn settled(&self) {
        let mut passes = self.passes.subscribe();
        let start = *passes.borrow_and_update();
        self.wake.notify_one();
        let _ = tokio::time::timeout(CONFIRM_LIMIT, passes.wait_for(|n| *n >= start + 2)).await;
    }

    /// Runs the decisions until `stop`, then withdraws every announced VIP (waiting up to
    /// [`CONFIRM_LIMIT`] for BIRD) and ends.
    pub fn spawn(
        self: &Arc<Self>,
        state: Arc<LiveState>,
        stop: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let announcer = self.clone();
        tokio::spawn(async move { announcer.run(state, stop).await })
    }

    async fn run(&self, state: Arc<LiveState>, stop: CancellationToken) {
        let mut link = Link::default();
        loop {
            let stopping = tokio::select! {
                _ = stop.cancelled() => true,
                _ = tokio::time::sleep(PERIOD) => false,
                _ = self.wake.notified() => false,
            };
            let socket = self.bird_socket.lock().clone();
            let wants = self.wants(&state.snapshot(), stopping);
            let statuses = if stopping {
                let pass = link.reconcile(socket.as_deref(), &wants);
                tokio::time::timeout(CONFIRM_LIMIT, pass).await.unwrap_or_else(|_| {
                    error!("BIRD did not confirm the withdrawals within {CONFIRM_LIMIT:?} at shutdown; check `birdc show protocols`");
                    Vec::new()
                })
            } else {
                link.reconcile(socket.as_deref(), &wants).await
            };
            *self.status.lock() = statuses.into_iter().collect();
            self.passes.send_modify(|n| *n += 1);
            if stopping {
                return;
            }
        }
    }

    /// What each announced service's protocol should be, and why.
    fn wants(&self, snapshot: &Snapshot, stopping: bool) -> Vec<Want> {
        let drained = self.node_drained();
        snapshot
            .services
            .iter()
            .filter_map(|service| {
                let protocol = service.config.announce.clone()?;
                let total = service.backends.len();
                let ready = service
                    .backends
                    .iter()
                    .filter(|b| b.live.health.is_up() && b.takes_new())
                    .count();
                let (announce, why) = if stopping {
                    (false, "switchyard is stopping".to_string())
                } else if let Some(uid) = drained {
                    (false, format!("node drained (ctl node drain by uid {uid})"))
                } else if ready == 0 {
                    (
                        false,
                        format!("no backend can take sessions ({total} down, drained or disabled)"),
                    )
                } else {
                    (
                        true,
                        format!("{ready} of {total} backends can take sessions"),
                    )
                };
                Some(Want {
                    service: service.config.name.clone(),
                    protocol,
                    announce,
                    why,
                })
            })
            .collect()
    }
}

/// One service's decision.
#[derive(Clone)]
struct Want {
    service: String,
    protocol: String,
    announce: bool,
    why: String,
}

/// The connection to BIRD and what it last confirmed.
#[derive(Default)]
struct Link {
    bird: Option<Bird>,
    /// Protocol -> enabled, as BIRD last confirmed it (cleared when the connection is lost).
    confirmed: HashMap<String, bool>,
    /// Protocol -> service, of protocols a reload took away: disabled once, then forgotten.
    retired: HashMap<String, String>,
    /// Protocol -> the service that last wanted it.
    owners: HashMap<String, String>,
    /// The trouble last logged (logged again only when it changes).
    trouble: Option<String>,
    /// Per protocol, BIRD's last refusal (logged once).
    refusals: HashMap<String, String>,
    last_reassert: Option<Instant>,
}

impl Link {
    /// Brings BIRD in line with `wants`; the status of each wanted service.
    async fn reconcile(&mut self, socket: Option<&Path>, wants: &[Want]) -> Vec<(String, Status)> {
        self.retire(wants);
        let reassert = self.last_reassert.is_none_or(|at| at.elapsed() >= REASSERT);
        if reassert {
            self.last_reassert = Some(Instant::now());
        }
        let mut orders = wants.to_vec();
        orders.extend(self.retired.iter().map(|(protocol, service)| Want {
            service: service.clone(),
            protocol: protocol.clone(),
            announce: false,
            why: "its service no longer announces it (reload)".to_string(),
        }));
        let pending = orders
            .iter()
            .any(|w| reassert || self.confirmed.get(&w.protocol) != Some(&w.announce));
        if pending && let Some(socket) = socket {
            self.tell(socket, &orders, reassert).await;
        }
        wants
            .iter()
            .map(|w| {
                let announced = self.confirmed.get(&w.protocol) == Some(&true);
                let mut why = w.why.clone();
                if announced != w.announce {
                    let trouble = self
                        .refusals
                        .get(&w.protocol)
                        .or(self.trouble.as_ref())
                        .map_or("not confirmed yet", String::as_str);
                    why = format!("{why}; BIRD: {trouble}");
                }
                let status = Status {
                    protocol: w.protocol.clone(),
                    announced,
                    why,
                };
                (w.service.clone(), status)
            })
            .collect()
    }

    /// Protocols no wanted service holds any more are disabled, then forgotten.
    fn retire(&mut self, wants: &[Want]) {
        let wanted: HashMap<&str, &str> = wants
            .iter()
            .map(|w| (w.protocol.as_str(), w.service.as_str()))
            .collect();
        for (protocol, service) in self.owners.drain() {
            if !wanted.contains_key(protocol.as_str()) {
                self.retired.insert(protocol, service);
            }
        }
        self.owners = wanted
            .iter()
            .map(|(p, s)| (p.to_string(), s.to_string()))
            .collect();
        self.retired
            .retain(|protocol, _| !wanted.contains_key(protocol.as_str()));
    }

    /// Sends each order that BIRD has not confirmed (all of them on `reassert`).
    async fn tell(&mut self, socket: &Path, orders: &[Want], reassert: bool) {
        if self.bird.is_none() {
            match Bird::connect(socket).await {
                Ok(bird) => {
                    if self.trouble.take().is_some() {
                        info!("BIRD at {} answers again", socket.display());
                    }
                    self.bird = Some(bird);
                }
                Err(trouble) => return self.lost(format!("{trouble:#}")),
            }
        }
        for Want {
            service,
            protocol,
            announce: on,
            why,
        } in orders
        {
            if !reassert && self.confirmed.get(protocol) == Some(on) {
                continue;
            }
            let Some(bird) = self.bird.as_mut() else {
                return;
            };
            match bird.set(protocol, *on).await {
                Ok(Ok(outcome)) => {
                    self.refusals.remove(protocol);
                    self.confirmed.insert(protocol.clone(), *on);
                    if !*on {
                        self.retired.remove(protocol);
                    }
                    if outcome == Outcome::Changed {
                        record(service, protocol, *on, why);
                    }
                }
                Ok(Err(refused)) => {
                    if self.refusals.get(protocol) != Some(&refused) {
                        error!(service = %service, "cannot {} the VIP: {refused}", verb(*on));
                    }
                    self.refusals.insert(protocol.clone(), refused);
                }
                Err(trouble) => return self.lost(format!("{trouble:#}")),
            }
        }
    }

    /// The connection is gone or never came: what BIRD has is unknown until it answers.
    fn lost(&mut self, trouble: String) {
        self.bird = None;
        self.confirmed.clear();
        if self.trouble.as_ref() != Some(&trouble) {
            error!(
                "BIRD unreachable: {trouble}; retrying every {PERIOD:?}; announcements stay as BIRD has them (backends are not blamed)"
            );
        }
        self.trouble = Some(format!("unreachable ({trouble})"));
    }
}

fn verb(on: bool) -> &'static str {
    if on { "announce" } else { "withdraw" }
}

/// Logs and counts a change BIRD confirmed, and puts it on the dashboard's timeline.
fn record(service: &str, protocol: &str, on: bool, why: &str) {
    let action = verb(on);
    let command = if on { "enable" } else { "disable" };
    if on {
        info!(service = %service, "VIP announced (BIRD: {command} {protocol}): {why}");
    } else {
        warn!(service = %service, "VIP withdrawn (BIRD: {command} {protocol}): {why}");
    }
    *CHANGES
        .lock()
        .entry((service.to_string(), action))
        .or_default() += 1;
    let kind = if on { Kind::Announce } else { Kind::Withdraw };
    events::record(kind, service, "", format!("{command} {protocol}: {why}"));
}
