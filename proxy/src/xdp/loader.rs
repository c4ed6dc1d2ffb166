//! Loading, attaching and detaching the XDP program, and the sync task that keeps its maps in
//! step with the running state.

use std::collections::BTreeSet;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use aya::maps::Map;
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::xdp::XdpLink;
use aya::programs::{ProgramError, Xdp, XdpMode};
use aya::{Ebpf, EbpfLoader};
use parking_lot::Mutex;
use switchyard_common::maps::{WEIGHTED_TABLE_SIZE, backend_state, names, programs};
use switchyard_common::{MAGLEV_TABLE_SIZE, MAX_BACKENDS};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::mode::{self, Attach, Decision};
use super::netdev::Netdev;
use super::{flows, limits, neighbours, pins, stats, tables};
use crate::config::{self, Config, Dataplane, Forwarding};
use crate::counters::CounterTable;
use crate::state::{LiveState, Service, Snapshot};
use crate::totals::{KernelCounters, Totals, XdpAttachment};

/// Where `pin = true` pins the maps and links: `<base>/<first xdp service>`.
const DEFAULT_PIN_BASE: &str = "/sys/fs/bpf/switchyard";

/// Maps pinned when pinning is on, and reused after a restart while they fit (see `pins`).
const PINNED_MAPS: [&str; 23] = [
    names::BACKEND_RATES,
    names::SERVICES,
    names::SERVICES6,
    names::BACKENDS,
    names::SERVICE_BACKENDS,
    names::ACTIVE,
    names::BACKEND_STATS,
    names::SERVICE_STATS,
    names::FLOWS,
    names::FLOWS6,
    names::NAT_REPLIES,
    names::BACKENDS6,
    names::NAT_REPLIES6,
    names::MAGLEV,
    names::WEIGHTED,
    names::RR_CURSOR,
    names::ADDRESS_FILTER,
    names::SERVICE_ROUTES,
    names::SOURCE_LISTS,
    names::SOURCE_LISTS6,
    names::SOURCE_LIMITS,
    names::SOURCES,
    names::SOURCE_STATS,
];

/// The entries of every map the loader sizes for a config (the rest keep the object's).
struct Sizes {
    entries: Vec<(&'static str, u32)>,
    flows: u32,
    sources: u32,
}

impl Sizes {
    fn of(config: &Config) -> Sizes {
        let slots = Snapshot::slot_capacity(config).max(1) as u32;
        let services = Snapshot::service_capacity(config).max(1) as u32;
        let flows: u32 = config
            .services
            .iter()
            .filter_map(|s| s.xdp.as_ref().map(|x| x.flow_table_size.max(1)))
            .fold(0u32, u32::saturating_add)
            .max(1);
        let sources = limits::table_capacity(&config.services);
        let list_entries = services * 2 * config::MAX_PREFIXES as u32;
        let entries = vec![
            (names::SERVICES, services),
            (names::SERVICE_ROUTES, services),
            (names::SERVICES6, services),
            (names::BACKENDS, slots),
            (names::BACKENDS6, slots),
            (names::SERVICE_BACKENDS, services * 2 * MAX_BACKENDS as u32),
            (names::ACTIVE, slots),
            (names::BACKEND_STATS, slots),
            (names::BACKEND_RATES, slots),
            (names::SERVICE_STATS, services),
            (names::RR_CURSOR, services),
            (names::FLOWS, flows),
            (names::FLOWS6, flows),
            (names::NAT_REPLIES, flows),
            (names::NAT_REPLIES6, flows),
            (names::MAGLEV, services * 2 * MAGLEV_TABLE_SIZE as u32),
            (names::WEIGHTED, services * 2 * WEIGHTED_TABLE_SIZE),
            (names::SOURCE_LISTS, list_entries),
            (names::SOURCE_LISTS6, list_entries),
            (names::SOURCE_LIMITS, services),
            (names::SOURCE_STATS, services),
            (names::SOURCES, sources),
        ];
        Sizes {
            entries,
            flows,
            sources,
        }
    }

    /// Every pinned map with the entries it gets (the object's own where not sized here).
    fn pinned(&self) -> Vec<(&'static str, Option<u32>)> {
        PINNED_MAPS
            .iter()
            .map(|&name| {
                let sized = self.entries.iter().find(|(n, _)| *n == name);
                (name, sized.map(|&(_, entries)| entries))
            })
            .collect()
    }
}

/// The loaded fast path. See the module docs of `xdp` for the call order.
pub struct XdpPlane {
    bpf: Arc<Mutex<Ebpf>>,
    counters: Arc<CounterTable>,
    pin_dir: Option<PathBuf>,
    /// Counts (and maybe flows) came from pinned maps of a previous run: rebuild the counts.
    reused: bool,
    links: Vec<(String, XdpLink)>,
    /// The traffic counter maps, once started (read by the sync task and at shutdown).
    stats: Option<Arc<stats::Stats>>,
    /// The flow tables' fill and corrections, as the sync task's expiry pass leaves them.
    flow_gauges: Arc<stats::FlowGauges>,
    /// Each service's sources in the per-source table, as the sync task's last walk found them.
    source_gauges: Arc<limits::SourceGauges>,
    stop: CancellationToken,
    /// Wakes the sync task before its period ends (after a reload or a runtime change).
    sync_now: Arc<Notify>,
    /// The flow tables for `ctl flows`, on handles of their own.
    flow_reader: Arc<super::FlowReader>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl XdpPlane {
    /// Loads the program through the verifier with maps sized for `config`, and maps the
    /// shared active counts.
    pub fn load(config: &Config) -> anyhow::Result<Self> {
        let object = super::object().ok_or_else(|| anyhow!(super::NOT_BUILT))?;
        let sizes = Sizes::of(config);
        for service in &config.services {
            if service.dataplane == Dataplane::Xdp && service.backends.len() > MAX_BACKENDS {
                bail!(
                    "service {:?}: the XDP fast path takes at most {MAX_BACKENDS} backends",
                    service.name
                );
            }
        }
        super::check_nat_forwarding(config)?;
        let pin_dir = pin_dir(config);
        let mut reused = false;
        let mut flows_kept = false;
        let mut loader = EbpfLoader::new();
        for &(name, entries) in &sizes.entries {
            loader.map_max_entries(name, entries);
        }
        if nat_sees_partial_checksums(config) {
            loader.override_global(PARTIAL_CHECKSUMS, &1u8, true);
        }
        let pin_paths: Vec<(&str, PathBuf)>;
        if let Some(dir) = &pin_dir {
            std::fs::create_dir_all(dir).with_context(|| {
                format!(
                    "creating the pin directory {} (is bpffs mounted at /sys/fs/bpf?)",
                    dir.display()
                )
            })?;
            let wanted = pins::object_layouts(object, &sizes.pinned())?;
            pins::replace_stale(dir, &wanted)?;
            flows_kept = dir.join(names::FLOWS).exists();
            // A kept ACTIVE holds the last run's counts, also for flows that were not kept:
            // rebuilt from the flow tables like after any restart (see `pins`).
            reused = flows_kept || dir.join(names::ACTIVE).exists();
            pin_paths = PINNED_MAPS
                .iter()
                .map(|name| (*name, dir.join(name)))
                .collect();
            for (name, path) in &pin_paths {
                loader.map_pin_path(name, path.as_path());
            }
        }
        let mut bpf = loader
            .load(object)
            .map_err(|e| explain(e.into(), "loading the XDP object"))?;
        {
            let program: &mut Xdp = bpf
                .program_mut(programs::BALANCE)
                .context("the XDP object has no balance program")?
                .try_into()?;
            program
                .load()
                .map_err(|e| explain(verifier(e), "loading the XDP program"))?;
        }
        let active = match bpf.map(names::ACTIVE) {
            Some(Map::Array(data)) => data
                .fd()
                .as_fd()
                .try_clone_to_owned()
                .context("duplicating the ACTIVE map fd")?,
            _ => bail!("the XDP object has no ACTIVE array"),
        };
        let counters = map_counters(active, Snapshot::slot_capacity(config))?;
        if flows_kept && let Some(dir) = &pin_dir {
            info!(
                "reusing pinned XDP maps in {}: established flows keep their backends",
                dir.display()
            );
        }
        let flow_reader = Arc::new(super::FlowReader::open(&bpf)?);
        Ok(Self {
            flow_reader,
            bpf: Arc::new(Mutex::new(bpf)),
            counters,
            pin_dir,
            reused,
            links: Vec::new(),
            stats: None,
            flow_gauges: Arc::new(stats::FlowGauges {
                capacity: u64::from(sizes.flows).into(),
                ..Default::default()
            }),
            source_gauges: Arc::new(limits::SourceGauges::new(sizes.sources)),
            stop: CancellationToken::new(),
            sync_now: Arc::new(Notify::new()),
            task: None,
        })
    }

    /// Call `notify_one()` on this after swapping in a new state: the sync task then writes
    /// the change into the maps at once instead of at the end of its period (at most 1 s).
    pub fn sync_now_handle(&self) -> Arc<Notify> {
        self.sync_now.clone()
    }

    /// The flow tables' reader, for `ctl flows`.
    pub fn flow_reader(&self) -> Arc<super::FlowReader> {
        self.flow_reader.clone()
    }

    /// The shared counter table; build the state with it.
    pub fn counters(&self) -> Arc<CounterTable> {
        self.counters.clone()
    }

    /// Programs the maps from `state`'s snapshot, attaches to every interface the XDP
    /// services name, and spawns the sync task (must run inside the tokio runtime).
    pub fn start(&mut self, state: Arc<LiveState>) -> anyhow::Result<()> {
        let snapshot = state.snapshot();
        let mut synced = KernelSync::default();
        {
            let mut bpf = self.bpf.lock();
            if self.reused {
                let rebuilt = flows::rebuild_counts(&bpf, &self.counters)?;
                info!("rebuilt active counts from {rebuilt} open flows");
            }
            synced.run(&mut bpf, &snapshot, true)?;
        }
        let attachments = self.attach_everywhere(&PlaneInterfaces::of(&snapshot)?)?;
        self.stats = Some(Arc::new(stats::Stats::take(
            &mut self.bpf.lock(),
            attachments,
            self.flow_gauges.clone(),
            self.source_gauges.clone(),
        )?));
        let period = sync_period(&snapshot);
        let bpf = self.bpf.clone();
        let counters = self.counters.clone();
        let stop = self.stop.clone();
        let sync_now = self.sync_now.clone();
        let stats = self.stats.clone();
        let flow_gauges = self.flow_gauges.clone();
        let source_gauges = self.source_gauges.clone();
        self.task = Some(tokio::spawn(async move {
            let mut expiry = flows::Expiry::reporting_to(flow_gauges);
            let mut last_stats = tokio::time::Instant::now();
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(period) => {}
                    _ = sync_now.notified() => {}
                }
                let snapshot = state.snapshot();
                let bpf = bpf.clone();
                let counters = counters.clone();
                let mut sync = std::mem::take(&mut synced);
                let mut exp = std::mem::take(&mut expiry);
                let source_gauges = source_gauges.clone();
                // Map syscalls and /proc reads block: keep them off the async workers.
                let joined = tokio::task::spawn_blocking(move || {
                    let mut bpf = bpf.lock();
                    if let Err(error) = sync.run(&mut bpf, &snapshot, false) {
                        warn!("XDP sync: {error:#}");
                    }
                    if let Err(error) = exp.run(&mut bpf, &snapshot, &counters) {
                        warn!("XDP flow expiry: {error:#}");
                    }
                    let wanted =
                        limits::table_capacity(snapshot.services.iter().map(|s| &s.config));
                    if let Err(error) = source_gauges.refresh(&bpf, wanted) {
                        warn!("XDP per-source table: {error:#}");
                    }
                    (sync, exp)
                })
                .await;
                match joined {
                    Ok((sync, exp)) => {
                        synced = sync;
                        expiry = exp;
                    }
                    Err(error) => warn!("XDP sync task failed: {error}"),
                }
                if last_stats.elapsed() >= STATS_PERIOD {
                    last_stats = tokio::time::Instant::now();
                    let snapshot = state.snapshot();
                    let stats = stats.clone();
                    // Per-CPU map reads are syscalls: off the async workers too.
                    let _ = tokio::task::spawn_blocking(move || {
                        let kernel = stats.as_deref().map(|s| s as &dyn KernelCounters);
                        Totals::collect(&snapshot, kernel, true).log()
                    })
                    .await;
                }
            }
        }));
        Ok(())
    }

    /// Attaches to every interface of the plane in the mode [`mode::decide`] picks, falling
    /// back to generic mode under `auto` when a native attach fails or shows, once made, that
    /// it cannot forward. Logs the mode and why, per interface.
    fn attach_everywhere(&mut self, plane: &PlaneInterfaces) -> anyhow::Result<Vec<XdpAttachment>> {
        let devs = plane
            .names
            .iter()
            .map(|name| Netdev::probe(name))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let problems: Vec<mode::Problem> = devs
            .iter()
            .flat_map(|dev| mode::problems(dev, plane.nat))
            .collect();
        let (mut attach, mut reason, mut warn) = match mode::decide(plane.mode, &problems) {
            Decision::Refuse(why) => bail!(why),
            Decision::Attach { mode, reason, warn } => (mode, reason, warn),
        };
        if attach == Attach::Native {
            let after_attach = self
                .attach_each(&plane.names, Attach::Native)
                .and_then(|()| native_forwarding_problems(&devs, plane.nat));
            if let Err(native) = after_attach {
                self.detach_all();
                if plane.mode == config::XdpMode::Native {
                    return Err(native.context("mode = \"native\""));
                }
                attach = Attach::Generic;
                reason = format!(
                    "mode = \"auto\" fell back to generic (skb) mode: native mode failed: {native:#}"
                );
                warn = true;
            }
        }
        if attach == Attach::Generic {
            self.attach_each(&plane.names, Attach::Generic)?;
        }
        let shown = match attach {
            Attach::Native => "native mode",
            Attach::Generic => "generic (skb) mode",
        };
        for interface in &plane.names {
            if warn {
                warn!("XDP program attached to {interface} in {shown}");
            } else {
                info!("XDP program attached to {interface} in {shown}");
            }
        }
        if warn {
            warn!("XDP attach mode: {reason}");
        } else {
            info!("XDP attach mode: {reason}");
        }
        Ok(plane
            .names
            .iter()
            .map(|interface| XdpAttachment {
                interface: interface.clone(),
                mode: attach.to_string(),
                reason: reason.clone(),
            })
            .collect())
    }

    fn attach_each(&mut self, interfaces: &[String], mode: Attach) -> anyhow::Result<()> {
        for interface in interfaces {
            let link = self.attach(interface, mode)?;
            self.links.push((interface.clone(), link));
        }
        Ok(())
    }

    /// Detaches what `attach_each` attached, unpinning the links it pinned.
    fn detach_all(&mut self) {
        for (interface, link) in std::mem::take(&mut self.links) {
            if let Some(dir) = &self.pin_dir {
                let _ = std::fs::remove_file(dir.join(format!("link-{interface}")));
            }
            drop(link);
        }
    }

    fn attach(&mut self, interface: &str, mode: Attach) -> anyhow::Result<XdpLink> {
        let pinned_link = self
            .pin_dir
            .as_ref()
            .map(|dir| dir.join(format!("link-{interface}")));
        let mut bpf = self.bpf.lock();
        let program: &mut Xdp = bpf
            .program_mut(programs::BALANCE)
            .context("the XDP object has no balance program")?
            .try_into()?;
        // A link pinned by a previous run: swap our program in atomically, so established
        // flows never see a moment without the fast path.
        if let Some(path) = &pinned_link
            && path.exists()
        {
            let pinned = PinnedLink::from_pin(path)
                .with_context(|| format!("opening the pinned XDP link {}", path.display()))?;
            let link = XdpLink::try_from(FdLink::from(pinned))
                .context("the pinned link is not an XDP link")?;
            let id = program
                .attach_to_link(link)
                .map_err(|e| explain(e.into(), &format!("replacing the program on {interface}")))?;
            info!(
                "XDP program replaced on {interface} (pinned link {})",
                path.display()
            );
            return Ok(program.take_link(id)?);
        }
        let flags = match mode {
            Attach::Native => XdpMode::Driver,
            Attach::Generic => XdpMode::Skb,
        };
        let id = program.attach(interface, flags).map_err(|e| {
            explain(
                e.into(),
                &format!("attaching the XDP program to {interface} in {mode} mode"),
            )
        })?;
        let link = program.take_link(id)?;
        let Some(path) = pinned_link else {
            return Ok(link);
        };
        let fd_link =
            FdLink::try_from(link).context("pinning needs a bpf_link based XDP attachment")?;
        let pinned = fd_link
            .pin(&path)
            .with_context(|| format!("pinning the XDP link at {}", path.display()))?;
        Ok(XdpLink::try_from(FdLink::from(pinned))?)
    }

    /// The kernel's traffic counters, once started: for the shutdown totals.
    pub fn kernel_counters(&self) -> Option<&dyn KernelCounters> {
        self.stats.as_deref().map(|s| s as &dyn KernelCounters)
    }

    /// The same counters as a shared handle, for `ctl show` while running.
    pub fn kernel_counters_handle(&self) -> Option<Arc<dyn KernelCounters + Send + Sync>> {
        self.stats
            .clone()
            .map(|s| s as Arc<dyn KernelCounters + Send + Sync>)
    }

    /// One slot of the ACTIVE array read through the map (not the mapping): for tests and
    /// diagnostics.
    #[cfg(test)]
    pub fn active_from_map(&self, slot: u32) -> anyhow::Result<u64> {
        let bpf = self.bpf.lock();
        let map: aya::maps::Array<&aya::maps::MapData, u64> =
            aya::maps::Array::try_from(bpf.map(names::ACTIVE).context("map ACTIVE missing")?)?;
        Ok(map.get(&slot, 0)?)
    }

    /// The loaded object: for tests that program its maps and run it (BPF_PROG_TEST_RUN).
    #[cfg(test)]
    pub(super) fn ebpf(&self) -> &Arc<Mutex<Ebpf>> {
        &self.bpf
    }

    /// Stops the sync task and detaches. With pinning on, the pinned links and maps stay:
    /// the program keeps forwarding established flows until the next start takes over.
    pub fn shutdown(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            task.abort();
        }
        let links = std::mem::take(&mut self.links);
        for (interface, link) in links {
            drop(link);
            match &self.pin_dir {
                Some(dir) => info!(
                    "XDP program left attached to {interface} (pinned in {})",
                    dir.display()
                ),
                None => info!("XDP program detached from {interface}"),
            }
        }
    }
}

/// The interfaces the plane attaches to, whether any service uses nat, and the attach mode
/// the services ask for (validation makes them agree).
struct PlaneInterfaces {
    names: Vec<String>,
    nat: bool,
    mode: config::XdpMode,
}

impl PlaneInterfaces {
    fn of(snapshot: &Snapshot) -> anyhow::Result<PlaneInterfaces> {
        let mut names = BTreeSet::new();
        let mut nat = false;
        let mut mode = config::XdpMode::Auto;
        for service in xdp_services(snapshot) {
            let xdp = service
                .config
                .xdp
                .as_ref()
                .context("xdp service without [service.xdp]")?;
            names.insert(xdp.interface.clone());
            mode = xdp.mode;
            if xdp.forwarding == Forwarding::Nat {
                nat = true;
                names.insert(xdp.backend_interface.clone());
            }
        }
        // The second chance runs where the routers' traffic arrives, xdp services or not.
        if let Some(chance) = &snapshot.second_chance {
            names.insert(chance.interface.clone());
        }
        Ok(PlaneInterfaces {
            names: names.into_iter().collect(),
            nat,
            mode,
        })
    }
}

/// With the native program attached everywhere: for nat, whether every interface now accepts
/// redirected frames.
fn native_forwarding_problems(devs: &[Netdev], nat: bool) -> anyhow::Result<()> {
    if !nat {
        return Ok(());
    }
    let found: Vec<String> = devs
        .iter()
        .filter_map(|dev| Netdev::probe(&dev.name).ok())
        .filter_map(|dev| mode::problems_after_native_attach(&dev))
        .map(|problem| problem.text)
        .collect();
    if found.is_empty() {
        Ok(())
    } else {
        Err(anyhow!(found.join("; ")))
    }
}

/// The program's switch for nat's partial-checksum handling (see its `checksum` module).
const PARTIAL_CHECKSUMS: &str = "PARTIAL_CHECKSUMS";

/// Whether a nat service receives on an interface where local senders can hand over partial
/// checksums (a veth): then nat's checksum update tells them from complete ones.
fn nat_sees_partial_checksums(config: &Config) -> bool {
    config
        .services
        .iter()
        .filter(|s| s.dataplane == Dataplane::Xdp)
        .filter_map(|s| s.xdp.as_ref())
        .filter(|x| x.forwarding == Forwarding::Nat)
        .flat_map(|x| [&x.interface, &x.backend_interface])
        .any(|name| Netdev::probe(name).is_ok_and(|dev| dev.may_carry_partial_checksums()))
}

/// How often the traffic counters are logged while running.
const STATS_PERIOD: Duration = Duration::from_secs(60);

/// Per-run memory of what was written, by service index, so only changes touch the maps.
#[derive(Default)]
pub(super) struct KernelSync {
    written: std::collections::HashMap<u32, (String, tables::Programmed)>,
    limits: std::collections::HashMap<u32, limits::ProgrammedLimits>,
    chance: super::peers::ChanceSync,
}

impl KernelSync {
    /// Brings backend states (health, drain, MACs), backend lists and tables up to date for
    /// every XDP service of `snapshot`, and retires the services that left it.
    pub(super) fn run(
        &mut self,
        bpf: &mut Ebpf,
        snapshot: &Snapshot,
        first: bool,
    ) -> anyhow::Result<()> {
        if first {
            tables::prepare_first_sync(bpf)?;
            limits::prepare_first_sync(bpf)?;
        }
        // The ring first: at a start, a host that is not among the peers refuses to run.
        let mut result = self.chance.run(bpf, snapshot);
        if first {
            result.as_ref().map_err(|e| anyhow!("{e:#}"))?;
        }
        for service in xdp_services(snapshot) {
            // One service's failure (logged by the caller) does not hold back the others.
            let synced = self
                .sync_service(bpf, service, snapshot, first)
                .and_then(|()| self.sync_limits(bpf, service));
            if let Err(error) = synced {
                result = Err(error.context(format!("service {:?}", service.config.name)));
            }
        }
        let running: BTreeSet<u32> = xdp_services(snapshot).map(|s| s.kernel_index).collect();
        let gone: Vec<u32> = self
            .written
            .keys()
            .copied()
            .filter(|index| !running.contains(index))
            .collect();
        for index in gone {
            let Some((name, programmed)) = self.written.remove(&index) else {
                continue;
            };
            match tables::retire_service(bpf, &programmed) {
                Ok(()) => info!(
                    service = %name,
                    "XDP: service removed: new flows to its VIPs pass to the stack, its established flows finish"
                ),
                Err(error) => {
                    // Try again at the next sync.
                    result = Err(error.context(format!("removing service {name:?}")));
                    self.written.insert(index, (name, programmed));
                }
            }
        }
        result
    }

    /// Writes the service's `[service.limits]` when they differ from what was written.
    fn sync_limits(&mut self, bpf: &mut Ebpf, service: &Service) -> anyhow::Result<()> {
        let index = service.kernel_index;
        let previous = self.limits.get(&index);
        if previous.is_some_and(|p| p.is(&service.config.limits)) {
            return Ok(());
        }
        let programmed = limits::program_limits(bpf, index, &service.config.limits, previous)?;
        if previous.is_some() {
            info!(service = %service.config.name, "XDP: [service.limits] changed: new SYNs follow them");
        }
        self.limits.insert(index, programmed);
        Ok(())
    }

    fn sync_service(
        &mut self,
        bpf: &mut Ebpf,
        service: &Service,
        snapshot: &Snapshot,
        first: bool,
    ) -> anyhow::Result<()> {
        let states = backend_states(service);
        let flags = super::peers::service_flags(snapshot, service);
        let previous = self
            .written
            .get(&service.kernel_index)
            .map(|(_, programmed)| programmed);
        if !first
            && let Some(previous) = previous
            && previous.states == states
            && previous.value.flags == flags
            && previous.layout == tables::Layout::of(service)?
        {
            return Ok(());
        }
        let programmed =
            tables::program_service(bpf, service.kernel_index, service, &states, previous, flags)?;
        if let Some(previous) = previous
            && previous.version != programmed.version
        {
            info!(
                service = %service.config.name,
                "XDP: backends and tables changed: new flows follow the new table, established flows keep their backends"
            );
        }
        let previous_states = previous.map(|p| &p.states);
        log_state_changes(service, previous_states, &states);
        self.written.insert(
            service.kernel_index,
            (service.config.name.clone(), programmed),
        );
        Ok(())
    }
}

/// Logs drained backends at a start, and later every backend whose state changed (a backend is
/// known by name: after a reload its position may differ).
fn log_state_changes(
    service: &Service,
    previous: Option<&tables::BackendStates>,
    states: &tables::BackendStates,
) {
    for (i, backend) in service.backends.iter().enumerate() {
        let was = previous.map(|p| p.state_of(&backend.config.name));
        let now = states.states[i];
        if was == Some(Some(now)) || (was.is_none() && now != backend_state::DRAIN) {
            continue;
        }
        let what = match now {
            backend_state::UP => "takes new flows",
            backend_state::DRAIN => "is drained: keeps its flows, gets no new ones",
            backend_state::DISABLED => "is disabled: keeps its flows, gets no new ones",
            _ => "gets no new flows",
        };
        info!(service = %service.config.name, backend = %backend.config.name, "XDP: backend {what}");
    }
}

fn backend_states(service: &Service) -> tables::BackendStates {
    let xdp = service.config.xdp.as_ref();
    let dsr = xdp.is_some_and(|x| x.forwarding == Forwarding::Dsr);
    let neighbours = match (dsr, xdp) {
        (true, Some(x)) => neighbours::table(&x.interface),
        _ => Default::default(),
    };
    let mut states = Vec::new();
    let mut macs = Vec::new();
    let mut names = Vec::new();
    for backend in &service.backends {
        names.push(backend.config.name.clone());
        let ip = backend.config.address.ip();
        let mac = if dsr {
            neighbours.get(&ip).copied()
        } else {
            Some([0; 6])
        };
        if mac.is_none() {
            neighbours::nudge(ip);
        }
        // Disabled before down before drained: a flow adopted mid-stream may still go to a
        // drained backend, never to a disabled or down one.
        let state = if backend.runtime.disabled {
            backend_state::DISABLED
        } else if !backend.live.health.is_up() || mac.is_none() {
            backend_state::DOWN
        } else if !backend.takes_new() {
            backend_state::DRAIN
        } else {
            backend_state::UP
        };
        states.push(state);
        macs.push(mac.unwrap_or([0; 6]));
    }
    tables::BackendStates {
        states,
        macs,
        names,
    }
}

fn xdp_services(snapshot: &Snapshot) -> impl Iterator<Item = &Arc<Service>> {
    snapshot
        .services
        .iter()
        .filter(|s| s.config.dataplane == Dataplane::Xdp)
}

/// A quarter of the shortest health interval (so a down backend stops taking new flows within
/// one interval), between 100 ms and 1 s.
fn sync_period(snapshot: &Snapshot) -> Duration {
    xdp_services(snapshot)
        .map(|s| s.config.health.interval / 4)
        .min()
        .unwrap_or(Duration::from_secs(1))
        .clamp(Duration::from_millis(100), Duration::from_secs(1))
}

fn pin_dir(config: &Config) -> Option<PathBuf> {
    // Validation makes every xdp service agree on `pin`.
    let first = config
        .services
        .iter()
        .find(|s| s.xdp.as_ref().is_some_and(|x| x.pin))?;
    Some(PathBuf::from(DEFAULT_PIN_BASE).join(sanitize(&first.name)))
}

fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn map_counters(fd: OwnedFd, slots: usize) -> anyhow::Result<Arc<CounterTable>> {
    CounterTable::mapped(fd, slots)
        .context("mapping the shared active counts (BPF_F_MMAPABLE array)")
}

fn verifier(error: ProgramError) -> anyhow::Error {
    match error {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            let log = verifier_log.to_string();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            anyhow!(io_error).context(format!(
                "the kernel verifier rejected the program:\n{}",
                tail.join("\n")
            ))
        }
        other => other.into(),
    }
}

/// Names the missing capabilities when the kernel says EPERM.
fn explain(error: anyhow::Error, what: &str) -> anyhow::Error {
    let denied = error.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.raw_os_error() == Some(nix::libc::EPERM))
    }) || format!("{error:#}").contains("Operation not permitted");
    if denied {
        error.context(format!(
            "{what}: permission denied: the XDP fast path needs CAP_BPF and CAP_NET_ADMIN (and CAP_PERFMON for some kernels): run as root or grant them (systemd: AmbientCapabilities=CAP_BPF CAP_NET_ADMIN CAP_PERFMON)"
        ))
    } else {
        error.context(what.to_string())
    }
}
