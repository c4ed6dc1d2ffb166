//! Changing the running balancer in place: a reload of the config file (SIGHUP, `ctl reload`)
//! and the runtime changes `switchyard ctl` asks for (drain, disable, weight), applied to both
//! data planes without dropping a session.
//!
//! Everything goes through one step, [`Control::apply`]: the next snapshot is built from the
//! file's config with the runtime overrides on top (carrying over what unchanged services and
//! backends have), the addresses it adds are bound, and only then is it swapped in and the
//! listeners and health checks follow. Any failure before the swap changes nothing.
//!
//! How runtime changes and the file combine: a runtime drain/undrain or weight holds until the
//! file changes that backend's `drain` or `weight` (the file's new value then applies), or the
//! backend leaves the file; `disable` holds until `enable`. So a reload of an unchanged file
//! never undoes an operator's drain.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::announce::Announcer;
use crate::config::{self, Config, Dataplane, ServiceConfig};
use crate::control::{AnnounceReport, Call, NodeReport, Reply, Request, ShowReport, Target};
use crate::dumps;
use crate::events::{self, Kind};
use crate::health;
use crate::listeners::{Closing, Listeners};
use crate::notify;
use crate::sessions;
use crate::show;
use crate::state::{LiveState, Override, Overrides};
use crate::totals::KernelCounters;
use crate::xdp::{self, XdpPlane};

/// How long a reload waits for the workers to close the listeners it removed.
const CLOSE_LIMIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Reloads of the config file (SIGHUP, `ctl reload`) since start, for `/metrics`.
pub static RELOADS: ReloadCounts = ReloadCounts {
    applied: AtomicU64::new(0),
    refused: AtomicU64::new(0),
};

pub struct ReloadCounts {
    applied: AtomicU64,
    refused: AtomicU64,
}

impl ReloadCounts {
    fn record(&self, applied: bool) {
        let count = if applied {
            &self.applied
        } else {
            &self.refused
        };
        count.fetch_add(1, Ordering::Relaxed);
    }

    /// `(applied, refused)`.
    pub fn get(&self) -> (u64, u64) {
        (
            self.applied.load(Ordering::Relaxed),
            self.refused.load(Ordering::Relaxed),
        )
    }
}

/// The running balancer as reloads and `ctl` change it (owned by the main thread).
pub struct Control {
    /// The config file's contents as last applied.
    file: Config,
    overrides: Overrides,
    state: Arc<LiveState>,
    listeners: Listeners,
    /// Parent of every health check task (shutdown).
    stop: CancellationToken,
    /// The running checks: replaced at every apply.
    checks: CancellationToken,
    /// Wakes the kernel path's sync task, so a change reaches the XDP maps at once.
    kernel_sync: Option<Arc<tokio::sync::Notify>>,
    /// The kernel path's traffic counters, for `ctl show`.
    kernel_counters: Option<Arc<dyn KernelCounters + Send + Sync>>,
    /// The kernel's flow tables, for `ctl flows`.
    flow_reader: Option<Arc<xdp::FlowReader>>,
    /// Each worker's queue for `ctl sessions` questions.
    workers: Vec<tokio::sync::mpsc::UnboundedSender<sessions::Ask>>,
    /// Announced VIPs and the node's drain (`ctl node drain`).
    announcer: Arc<Announcer>,
}

impl Control {
    pub fn new(
        file: Config,
        state: Arc<LiveState>,
        listeners: Listeners,
        stop: CancellationToken,
    ) -> Self {
        Self {
            file,
            overrides: Overrides::new(),
            state,
            listeners,
            checks: stop.child_token(),
            stop,
            kernel_sync: None,
            kernel_counters: None,
            flow_reader: None,
            workers: Vec::new(),
            announcer: Announcer::new(None),
        }
    }

    /// The announcer whose BIRD socket reloads set and whose state `ctl show` reports.
    pub fn with_announcer(mut self, announcer: Arc<Announcer>) -> Self {
        self.announcer = announcer;
        self
    }

    /// With the kernel path: every applied change wakes its sync task, and `ctl show` reads
    /// its flow counters.
    pub fn with_kernel_path(mut self, plane: Option<&XdpPlane>) -> Self {
        self.kernel_sync = plane.map(XdpPlane::sync_now_handle);
        self.kernel_counters = plane.and_then(XdpPlane::kernel_counters_handle);
        self.flow_reader = plane.map(XdpPlane::flow_reader);
        self
    }

    /// The workers to ask for their open sessions (`ctl sessions`).
    pub fn with_workers(
        mut self,
        workers: Vec<tokio::sync::mpsc::UnboundedSender<sessions::Ask>>,
    ) -> Self {
        self.workers = workers;
        self
    }

    /// The config as last applied (`shutdown_timeout` is read from it at shutdown).
    pub fn config(&self) -> &Config {
        &self.file
    }

    /// Runs the health checks of the current snapshot, ending those of the previous one (each
    /// backend keeps its schedule: see `health::spawn_checks`).
    pub fn start_checks(&mut self) {
        self.checks.cancel();
        self.checks = self.stop.child_token();
        for service in &self.state.snapshot().services {
            health::spawn_checks(service.clone(), self.checks.clone());
        }
    }

    /// Answers one `ctl` request.
    pub async fn handle(&mut self, call: Call) {
        let Call {
            request,
            uid,
            reply,
        } = call;
        let answer = match request {
            Request::Show { service } => {
                let kernel = self
                    .kernel_counters
                    .as_deref()
                    .map(|k| k as &dyn KernelCounters);
                match show::report(&self.state.snapshot(), service.as_deref(), kernel) {
                    Ok(report) => Reply {
                        show: Some(self.with_announcements(report)),
                        ..Reply::ok("")
                    },
                    Err(refused) => Reply::refused(refused),
                }
            }
            Request::Flows { service, limit } => {
                let reader = self.flow_reader.clone();
                dumps::flows(self.state.snapshot(), reader, service, limit).await
            }
            Request::Sessions { service } => {
                dumps::sessions(self.state.snapshot(), &self.workers, service).await
            }
            Request::NodeDrain => self.node_drain(Some(uid)).await,
            Request::NodeUndrain => self.node_drain(None).await,
            Request::Reload => self.reload(&format!("ctl reload by uid {uid}")).await,
            Request::Check => self.check(),
            Request::Drain { target } => {
                self.set(&target, uid, Kind::Drain, |o| o.drain = Some(true))
            }
            Request::Undrain { target } => {
                self.set(&target, uid, Kind::Undrain, |o| o.drain = Some(false))
            }
            Request::Disable { target } => {
                self.set(&target, uid, Kind::Disable, |o| o.disabled = true)
            }
            Request::Enable { target } => {
                self.set(&target, uid, Kind::Enable, |o| o.disabled = false)
            }
            Request::Weight { target, weight } => {
                if !(1..=1000).contains(&weight) {
                    Reply::refused(format!(
                        "weight {weight} for {target}: must be between 1 and 1000"
                    ))
                } else {
                    self.set(&target, uid, Kind::Weight, |o| o.weight = Some(weight))
                }
            }
        };
        // The asker may have given up (ctl's timeout): nothing to tell then.
        let _ = reply.send(answer);
    }

    /// `ctl show`'s report with the node's drain and each announced service's VIP.
    fn with_announcements(&self, mut report: ShowReport) -> ShowReport {
        if let Some(uid) = self.announcer.node_drained() {
            report.node = NodeReport {
                drained: true,
                why: format!("ctl node drain by uid {uid}"),
            };
        }
        let status = self.announcer.status();
        for service in &mut report.services {
            service.announce = status.get(&service.name).map(|s| AnnounceReport {
                protocol: s.protocol.clone(),
                announced: s.announced,
                why: s.why.clone(),
            });
        }
        report
    }

    /// `ctl node drain` (`Some(uid)`) or `undrain` (`None`); answered once BIRD has
    /// confirmed (or [`crate::announce::CONFIRM_LIMIT`] passed), with every announced VIP's state.
    async fn node_drain(&mut self, drained_by: Option<u32>) -> Reply {
        let changed = self.announcer.set_node_drained(drained_by);
        let (kind, what) = match drained_by {
            Some(uid) => (Kind::NodeDrain, format!("node drained by uid {uid}")),
            None => (Kind::NodeUndrain, "node undrained".to_string()),
        };
        let what = if changed {
            what
        } else {
            format!("{what} (no change)")
        };
        info!("ctl: {what}");
        if changed {
            events::record(kind, "", "", what.clone());
        }
        self.announcer.settled().await;
        let mut lines = vec![what];
        let status = self.announcer.status();
        if status.is_empty() {
            lines.push("no service is announced (announce = true), so BIRD was not asked".into());
        }
        for (service, s) in status {
            let state = if s.announced {
                "announced"
            } else {
                "withdrawn"
            };
            lines.push(format!(
                "service {service}: VIP {state} ({}): {}",
                s.protocol, s.why
            ));
        }
        Reply::ok(lines.join("\n"))
    }

    /// Re-reads the config file and applies the difference; `who` says who asked (for the
    /// log). An invalid file, or one that changes what cannot change live, changes nothing.
    pub async fn reload(&mut self, who: &str) -> Reply {
        notify::reloading();
        let reply = self.reload_file(who).await;
        let kind = if reply.ok {
            Kind::Reload
        } else {
            Kind::ReloadRefused
        };
        events::record(kind, "", "", format!("{who}: {}", reply.text));
        RELOADS.record(reply.ok);
        notify::status(&reply.text);
        notify::ready();
        reply
    }

    async fn reload_file(&mut self, who: &str) -> Reply {
        let started = std::time::Instant::now();
        let (file, mut changes) = match self.read_file() {
            Ok(read) => read,
            Err(refused) => {
                error!("reload ({who}) refused, the running config stays:\n{refused}");
                return Reply::refused(refused);
            }
        };
        let overrides = carry_overrides(&self.file, &file, &self.overrides, &mut changes);
        match self.apply(file, overrides) {
            Ok((mut applied, closing)) => {
                // Answered once removed addresses refuse: what `ctl reload` says is in force.
                closing.wait(CLOSE_LIMIT).await;
                changes.append(&mut applied);
                let text = if changes.is_empty() {
                    "no change".to_string()
                } else {
                    changes.join("\n")
                };
                info!(
                    "reload ({who}) applied in {:?}: {}",
                    started.elapsed(),
                    text.replace('\n', "; ")
                );
                Reply::ok(text)
            }
            Err(error) => {
                error!("reload ({who}) refused, the running config stays: {error:#}");
                Reply::refused(format!("{error:#}"))
            }
        }
    }

    /// Validates the file on disk as a reload would, without applying it.
    fn check(&self) -> Reply {
        match self.read_file() {
            Err(refused) => Reply::refused(refused),
            Ok((_, changes)) => {
                let pending = if changes.is_empty() {
                    "no change from the running config".to_string()
                } else {
                    format!("a reload would apply:\n{}", changes.join("\n"))
                };
                Reply::ok(format!("{}: valid; {pending}", self.file.source.display()))
            }
        }
    }

    /// The file on disk, if a reload could apply it, with what it would change; else why not
    /// (the errors as `check` prints them, or the key that cannot change live).
    fn read_file(&self) -> Result<(Config, Vec<String>), String> {
        let file = config::load(&self.file.source).map_err(|errors| format!("{errors}"))?;
        fixed_keys_unchanged(&self.file, &file)?;
        let changes = describe(&self.file, &file);
        Ok((file, changes))
    }

    /// Changes one backend's runtime override and applies it; `kind` is what the timeline
    /// calls it.
    fn set(
        &mut self,
        target: &Target,
        uid: u32,
        kind: Kind,
        change: impl FnOnce(&mut Override),
    ) -> Reply {
        if let Err(unknown) = self.find(target) {
            return Reply::refused(unknown);
        }
        let key = (target.service.clone(), target.backend.clone());
        let mut overrides = self.overrides.clone();
        let entry = overrides.entry(key.clone()).or_default();
        let before = entry.clone();
        change(entry);
        entry.by_uid = Some(uid);
        normalize(entry, self.file_backend(target));
        if *entry == Override::default() {
            overrides.remove(&key);
        }
        let after = overrides.get(&key).cloned().unwrap_or_default();
        let what = describe_override(&before, &after);
        match self.apply(self.file.clone(), overrides) {
            Ok(_) => {
                info!("ctl by uid {uid}: {target}: {what}");
                if before != after {
                    let text = format!("{what} (ctl by uid {uid})");
                    events::record(kind, &target.service, &target.backend, text);
                }
                Reply::ok(format!("{target}: {what}"))
            }
            Err(error) => {
                warn!("ctl by uid {uid}: {target}: refused: {error:#}");
                Reply::refused(format!("{target}: {error:#}"))
            }
        }
    }

    /// The target's backend in the running state, or a message listing what exists.
    fn find(&self, target: &Target) -> Result<(), String> {
        let snapshot = self.state.snapshot();
        let service = snapshot.named(&target.service)?;
        if service.backend(&target.backend).is_none() {
            let names: Vec<&str> = service
                .backends
                .iter()
                .map(|b| b.config.name.as_str())
                .collect();
            return Err(format!(
                "service {:?} has no backend {:?}; backends: {}",
                target.service,
                target.backend,
                names.join(", ")
            ));
        }
        Ok(())
    }

    fn file_backend(&self, target: &Target) -> Option<&config::BackendConfig> {
        self.file
            .services
            .iter()
            .find(|s| s.name == target.service)?
            .backends
            .iter()
            .find(|b| b.name == target.backend)
    }

    /// Makes `file` with `overrides` the running state: builds the next snapshot, binds the
    /// addresses it adds, then swaps it in and moves listeners and checks over. Returns the
    /// listener changes and the removed listeners to wait for. Fails, changing nothing, before
    /// the swap.
    fn apply(
        &mut self,
        file: Config,
        overrides: Overrides,
    ) -> anyhow::Result<(Vec<String>, Closing)> {
        if xdp::wanted(&file) {
            xdp::check_nat_forwarding(&file)?;
        }
        let next = self.state.snapshot().next(&file, &overrides)?;
        let opening = self.listeners.bind_new(&next)?;
        self.state.swap(next);
        if let Some(sync) = &self.kernel_sync {
            sync.notify_one();
        }
        let (changes, closing) = self.listeners.commit(&self.state.snapshot(), opening)?;
        self.announcer.configure(file.bird_socket.clone());
        self.file = file;
        self.overrides = overrides;
        self.start_checks();
        Ok((changes, closing))
    }
}

/// Drops what the file now decides: an override of a backend that left the file, a drain or
/// weight whose key the file changed. Says what it dropped in `changes`.
fn carry_overrides(
    old: &Config,
    new: &Config,
    overrides: &Overrides,
    changes: &mut Vec<String>,
) -> Overrides {
    let backend = |config: &Config, (service, name): &(String, String)| {
        config
            .services
            .iter()
            .find(|s| &s.name == service)
            .and_then(|s| s.backends.iter().find(|b| &b.name == name))
            .cloned()
    };
    let mut kept = Overrides::new();
    for (key, runtime) in overrides {
        let (Some(before), Some(after)) = (backend(old, key), backend(new, key)) else {
            changes.push(format!(
                "service {}: backend {}: runtime state forgotten (removed from the file)",
                key.0, key.1
            ));
            continue;
        };
        let mut runtime = runtime.clone();
        if runtime.drain.is_some() && before.drain != after.drain {
            runtime.drain = None;
            changes.push(format!(
                "service {}: backend {}: runtime drain/undrain ended (the file changed drain)",
                key.0, key.1
            ));
        }
        if runtime.weight.is_some() && before.weight != after.weight {
            runtime.weight = None;
            changes.push(format!(
                "service {}: backend {}: runtime weight ended (the file changed weight)",
                key.0, key.1
            ));
        }
        normalize(&mut runtime, Some(&after));
        if runtime != Override::default() {
            kept.insert(key.clone(), runtime);
        }
    }
    kept
}

/// An override that says what the file says is no override.
fn normalize(runtime: &mut Override, file: Option<&config::BackendConfig>) {
    if let Some(file) = file {
        if runtime.drain == Some(file.drain) {
            runtime.drain = None;
        }
        if runtime.weight == Some(file.weight) {
            runtime.weight = None;
        }
    }
    if runtime.drain.is_none() && runtime.weight.is_none() && !runtime.disabled {
        runtime.by_uid = None;
    }
}

fn describe_override(before: &Override, after: &Override) -> String {
    let mut said = Vec::new();
    if before.disabled != after.disabled {
        said.push(if after.disabled {
            "disabled (no traffic, no checks)"
        } else {
            "enabled"
        });
    }
    if before.drain != after.drain {
        said.push(match after.drain {
            Some(true) => "drained (keeps its sessions, takes no new ones)",
            Some(false) => "undrained (takes new sessions)",
            None => "runtime drain ended (the file's drain applies)",
        });
    }
    let weight;
    if before.weight != after.weight {
        weight = match after.weight {
            Some(w) => format!("weight {w}"),
            None => "runtime weight ended (the file's weight applies)".to_string(),
        };
        said.push(&weight);
    }
    if said.is_empty() {
        "no change".to_string()
    } else {
        said.join(", ")
    }
}

/// What cannot change while running; the first difference found refuses the whole reload
/// (a half-applied file would run a config nobody wrote).
fn fixed_keys_unchanged(old: &Config, new: &Config) -> Result<(), String> {
    let file = new.source.display();
    let restart = "restart switchyard to change it; nothing was applied";
    if old.workers != new.workers {
        return Err(format!(
            "{file}: workers cannot change while running ({} -> {}): {restart}",
            shown(old.workers),
            shown(new.workers)
        ));
    }
    if old.admin_socket != new.admin_socket {
        return Err(format!(
            "{file}: admin.socket cannot change while running ({} -> {}): {restart}",
            old.admin_socket.display(),
            new.admin_socket.display()
        ));
    }
    if let Some(chance) = &new.second_chance
        && !attached_at_start(old).contains(&chance.interface.as_str())
    {
        let was = old
            .second_chance
            .as_ref()
            .map_or("unset", |c| c.interface.as_str());
        return Err(format!(
            "{file}: announce.interface cannot change while running ({was} -> {}): the XDP program is attached where it was at start: {restart}",
            chance.interface
        ));
    }
    if xdp::wanted(new) && !xdp::wanted(old) {
        return Err(format!(
            "{file}: the first xdp service cannot be added while running (the XDP program is loaded at start): {restart}"
        ));
    }
    xdp::reload_refusal(old, new)?;
    for service in &new.services {
        let Some(before) = old.services.iter().find(|s| s.name == service.name) else {
            continue;
        };
        if before.dataplane != service.dataplane {
            return Err(format!(
                "{file}: service {:?}: dataplane cannot change while running ({} -> {}): {restart}",
                service.name, before.dataplane, service.dataplane
            ));
        }
        if let (Some(was), Some(now)) = (&before.xdp, &service.xdp)
            && was != now
        {
            return Err(format!(
                "{file}: service {:?}: [service.xdp] cannot change while running: {restart}",
                service.name
            ));
        }
        if service.dataplane == Dataplane::Xdp && before.listen != service.listen {
            return Err(format!(
                "{file}: service {:?}: an xdp service's listen (its VIPs) cannot change while running: {restart}",
                service.name
            ));
        }
    }
    Ok(())
}

/// The interfaces the XDP program was attached to at start (by `old`, the running config):
/// the xdp services' and the second chance's.
fn attached_at_start(old: &Config) -> Vec<&str> {
    let mut names: Vec<&str> = old
        .services
        .iter()
        .filter_map(|s| s.xdp.as_ref())
        .map(|x| x.interface.as_str())
        .collect();
    names.extend(old.second_chance.as_ref().map(|c| c.interface.as_str()));
    names
}

fn shown(workers: Option<u32>) -> String {
    workers.map_or("automatic".to_string(), |n| n.to_string())
}

/// What a reload from `old` to `new` changes, a line per service
/// (`service mx: backend mta4 added; backend mta2 weight 1 -> 3`).
pub fn describe(old: &Config, new: &Config) -> Vec<String> {
    let mut lines = Vec::new();
    for service in &old.services {
        if !new.services.iter().any(|s| s.name == service.name) {
            lines.push(format!(
                "service {}: removed (its sessions and flows finish)",
                service.name
            ));
        }
    }
    for service in &new.services {
        match old.services.iter().find(|s| s.name == service.name) {
            None => lines.push(format!(
                "service {}: added ({} backends)",
                service.name,
                service.backends.len()
            )),
            Some(before) => {
                let changes = service_changes(before, service);
                if !changes.is_empty() {
                    lines.push(format!("service {}: {}", service.name, changes.join("; ")));
                }
            }
        }
    }
    if old.bird_socket != new.bird_socket {
        let shown = |socket: &Option<std::path::PathBuf>| {
            socket
                .as_ref()
                .map_or("none".to_string(), |p| p.display().to_string())
        };
        lines.push(format!(
            "announce.bird_socket {} -> {}",
            shown(&old.bird_socket),
            shown(&new.bird_socket)
        ));
    }
    if old.shutdown_timeout != new.shutdown_timeout {
        lines.push(format!(
            "shutdown_timeout {:?} -> {:?}",
            old.shutdown_timeout, new.shutdown_timeout
        ));
    }
    lines
}

fn service_changes(old: &ServiceConfig, new: &ServiceConfig) -> Vec<String> {
    let mut changes = Vec::new();
    let mut field = |name: &str, before: String, after: String| {
        if before != after {
            changes.push(format!("{name} {before} -> {after}"));
        }
    };
    field("listen", list(&old.listen), list(&new.listen));
    field(
        "algorithm",
        old.algorithm.to_string(),
        new.algorithm.to_string(),
    );
    field(
        "proxy_protocol",
        old.proxy_protocol.to_string(),
        new.proxy_protocol.to_string(),
    );
    field(
        "max_connections",
        old.max_connections.to_string(),
        new.max_connections.to_string(),
    );
    field(
        "connect_timeout",
        format!("{:?}", old.connect_timeout),
        format!("{:?}", new.connect_timeout),
    );
    field(
        "greeting_timeout",
        format!("{:?}", old.greeting_timeout),
        format!("{:?}", new.greeting_timeout),
    );
    field(
        "idle_timeout",
        format!("{:?}", old.idle_timeout),
        format!("{:?}", new.idle_timeout),
    );
    field("retries", old.retries.to_string(), new.retries.to_string());
    field(
        "announce",
        old.announce.as_deref().unwrap_or("off").to_string(),
        new.announce.as_deref().unwrap_or("off").to_string(),
    );
    field(
        "health",
        format!("{:?}", old.health),
        format!("{:?}", new.health),
    );
    for backend in &old.backends {
        if !new.backends.iter().any(|b| b.name == backend.name) {
            changes.push(format!(
                "backend {} removed (its sessions finish)",
                backend.name
            ));
        }
    }
    for backend in &new.backends {
        let Some(before) = old.backends.iter().find(|b| b.name == backend.name) else {
            changes.push(format!("backend {} added", backend.name));
            continue;
        };
        let name = &backend.name;
        if before.address != backend.address {
            changes.push(format!(
                "backend {name} address {} -> {} (a new backend: fresh health and count; the old address's sessions finish)",
                before.address, backend.address
            ));
        }
        if before.weight != backend.weight {
            changes.push(format!(
                "backend {name} weight {} -> {}",
                before.weight, backend.weight
            ));
        }
        if before.max_connections != backend.max_connections {
            changes.push(format!(
                "backend {name} max_connections {} -> {}",
                before.max_connections, backend.max_connections
            ));
        }
        if before.drain != backend.drain {
            changes.push(format!(
                "backend {name} drain {} -> {}",
                before.drain, backend.drain
            ));
        }
    }
    changes
}

fn list(addresses: &[std::net::SocketAddr]) -> String {
    let shown: Vec<String> = addresses.iter().map(|a| a.to_string()).collect();
    shown.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A proxy service's config, with `announce` lines for the `[announce]` table.
    fn config(announce: &str) -> Config {
        let text = format!(
            "[announce]\nbird_socket = \"/run/bird/bird.ctl\"\n{announce}\
             [[service]]\nname = \"mx\"\nlisten = \"127.0.0.1:2525\"\nannounce = true\n\
             [[service.backend]]\nname = \"m\"\naddress = \"127.0.0.1:2601\"\n"
        );
        config::parse(
            std::path::Path::new("/etc/switchyard/switchyard.toml"),
            &text,
        )
        .unwrap_or_else(|e| panic!("{e}"))
    }

    const PEERS: &str = "peers = [\"198.18.0.21\", \"198.18.0.22\"]\n";

    #[test]
    fn peers_may_change_but_not_their_interface() {
        let running = config(&format!("{PEERS}interface = \"eth0\"\n"));
        let more = config(
            "peers = [\"198.18.0.21\", \"198.18.0.22\", \"198.18.0.23\"]\ninterface = \"eth0\"\n",
        );
        assert_eq!(fixed_keys_unchanged(&running, &more), Ok(()));
        assert_eq!(fixed_keys_unchanged(&running, &config("")), Ok(()));
        let moved = config(&format!("{PEERS}interface = \"eth1\"\n"));
        let refused = fixed_keys_unchanged(&running, &moved).expect_err("another interface");
        assert!(
            refused.contains("announce.interface cannot change while running (eth0 -> eth1)"),
            "{refused}"
        );
    }

    #[test]
    fn peers_on_a_balancer_without_the_xdp_program_need_a_restart() {
        let refused = fixed_keys_unchanged(
            &config(""),
            &config(&format!("{PEERS}interface = \"eth0\"\n")),
        )
        .expect_err("no program to run the second chance");
        assert!(refused.contains("announce.interface"), "{refused}");
        assert!(refused.contains("restart switchyard"), "{refused}");
    }
}
