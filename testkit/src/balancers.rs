//! Several balancers behind a BIRD router with ECMP, one testbed for the tests and the
//! benchmark: a client namespace —veth— a router namespace (BIRD with BGP to every balancer,
//! `merge paths on`, layer-4 multipath hash, forwarding on), and the router, the balancers and
//! three MTAs on one bridge segment. Each balancer runs its own BIRD and switchyard (the same
//! service config on every one), with the VIP announced health-gated; each MTA runs the test
//! kit's SMTP server. Two data planes ([`Dataplane`]): the proxy (each balancer holds the VIP
//! on lo) and the XDP `dsr` path in `mode = "auto"` on the plain network (default veth
//! offloads, nothing on any peer; the MTAs hold the VIP on lo with arp_ignore/arp_announce as
//! LVS-DR real servers, and answer clients through the router).
//!
//! With [`Balancers::start_with_second_chance`] every balancer's config also lists
//! `[announce] peers` (all [`MAX_BALANCERS`] addresses, those that join later included: the
//! same list on every host) and `[announce] interface = "eth0"`, so a balancer hands a packet
//! of a connection it does not know to the next one ([`SecondChance`] counts it).
//!
//! Balancers can join later ([`Balancers::join`]) or be killed ([`Balancers::kill`]: switchyard
//! SIGKILLed, its BIRD stopped, both by PID). The router's BIRD is configured for
//! [`MAX_BALANCERS`] neighbours from the start, so a joining balancer only has to come up.
//!
//! Addresses (all in 198.18.0.0/15, blackholed in the root namespace first): client
//! 198.18.50.1 —  router 198.18.50.2 and 198.18.51.1 on the segment; balancer `i`
//! 198.18.51.(11+i); MTA `i` 198.18.51.(21+i); VIP 198.18.52.10. Namespaces are
//! `sy-e<suffix>-<role>` and go on drop (also on panic), after every process started here.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use switchyard::control::{FlowsReport, SessionsReport, ShowReport};

use crate::bird::{self, Bird};
use crate::config_toml::ServiceToml;
use crate::harness::{CtlOutput, Launch, Switchyard};
use crate::metrics_text::Exposition;
use crate::netns::{Netns, run, suffix};
use crate::smtp_client::{SessionOptions, TEST_MESSAGE, run_session};
use crate::smtp_server::{Behaviour, SmtpServer, bind_listener};
use crate::topology::veth;

pub const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 52, 10);
pub const SMTP_PORT: u16 = 25;
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 50, 1);
const ROUTER_OUTSIDE: Ipv4Addr = Ipv4Addr::new(198, 18, 50, 2);
pub const ROUTER: Ipv4Addr = Ipv4Addr::new(198, 18, 51, 1);
/// How many balancers the router peers with (configured up front; unstarted ones stay idle).
pub const MAX_BALANCERS: usize = 3;
const MTAS: usize = 3;
/// The service every balancer runs, and the BIRD protocol that carries its VIP.
pub const SERVICE: &str = "mx";
const PROTOCOL: &str = "vip_mx";
/// Each balancer's `/metrics`, inside its namespace.
const METRICS: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9101));
/// The balancers' interface on the segment (the routers' traffic arrives there).
pub const SEGMENT_INTERFACE: &str = "eth0";
/// The second chance's counter, per service and outcome.
pub const SECOND_CHANCE_METRIC: &str = "switchyard_second_chance_packets_total";
/// A load's single step (connect, a reply): short, so a stalled session fails soon.
const LOAD_STEP: Duration = Duration::from_secs(5);

/// Balancer `index`'s address on the segment.
pub fn balancer_addr(index: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 51, 11 + index as u8)
}

/// MTA `index`'s address on the segment.
pub fn mta_addr(index: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 51, 21 + index as u8)
}

pub fn vip() -> SocketAddr {
    SocketAddrV4::new(VIP, SMTP_PORT).into()
}

/// How the balancers move sessions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dataplane {
    /// switchyard's proxy listening on VIP:25 (the VIP on each balancer's lo).
    Proxy,
    /// The XDP program on the balancer's segment interface, `forwarding = "dsr"`, mode auto.
    XdpDsr,
}

/// What every balancer runs.
#[derive(Clone, Debug)]
pub struct Setup {
    pub dataplane: Dataplane,
    pub algorithm: &'static str,
}

/// One balancer host. Field order is drop order: switchyard, then BIRD, then the namespace.
pub struct Balancer {
    pub switchyard: Option<Switchyard>,
    pub bird: Bird,
    pub ns: Netns,
    pub index: usize,
}

impl Balancer {
    /// `switchyard ctl ARGS` against this balancer; panics if it was killed.
    pub fn ctl(&self, args: &[&str]) -> CtlOutput {
        self.running().ctl(args)
    }

    fn running(&self) -> &Switchyard {
        self.switchyard
            .as_ref()
            .unwrap_or_else(|| panic!("balancer {} was killed", self.index + 1))
    }

    /// `ctl ARGS` that must succeed.
    pub fn ctl_ok(&self, args: &[&str]) -> String {
        let out = self.ctl(args);
        assert_eq!(
            out.code,
            Some(0),
            "ctl {args:?} on balancer {}: {out:?}",
            self.index + 1
        );
        out.stdout
    }

    /// `ctl --json show`.
    pub fn show(&self) -> ShowReport {
        let text = self.ctl_ok(&["--json", "show"]);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("ctl show json ({e}): {text}"))
    }

    /// Sessions (proxy) or flows (xdp) each backend was given since start, in config order.
    pub fn sessions_per_backend(&self) -> Vec<u64> {
        let report = self.show();
        report
            .services
            .iter()
            .find(|s| s.name == SERVICE)
            .map(|s| s.backends.iter().map(|b| b.sessions_total).collect())
            .unwrap_or_default()
    }

    /// Its `/metrics`, parsed.
    pub fn metrics(&self) -> Exposition {
        self.ns
            .run(|| Exposition::scrape(METRICS))
            .expect("scrape /metrics")
    }

    /// Packets to the VIP the XDP program handed to the stack (a mid-stream packet of a flow
    /// it has no entry for is one).
    pub fn xdp_passed(&self) -> f64 {
        self.metrics().get(
            "switchyard_service_xdp_packets_total",
            &[("service", SERVICE), ("action", "passed")],
        )
    }

    /// Its second-chance counters for the service, from `/metrics` (0 where a series is absent).
    pub fn second_chance(&self) -> SecondChance {
        let metrics = self.metrics();
        let count = |outcome: &str| {
            metrics.sum(
                SECOND_CHANCE_METRIC,
                &[("service", SERVICE), ("outcome", outcome)],
            ) as u64
        };
        SecondChance {
            forwarded: count("forwarded"),
            delivered: count("delivered"),
            unclaimed: count("unclaimed"),
        }
    }

    /// The service's `second_chance` object in `ctl --json show`; `None` when it has none.
    pub fn second_chance_shown(&self) -> Option<SecondChance> {
        let text = self.ctl_ok(&["--json", "show"]);
        let report: serde_json::Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("ctl show json ({e}): {text}"));
        let service = report["services"]
            .as_array()?
            .iter()
            .find(|s| s["name"] == SERVICE)?;
        let object = service.get("second_chance")?;
        let field = |name: &str| {
            object[name]
                .as_u64()
                .unwrap_or_else(|| panic!("second_chance.{name} is not a u64: {object}"))
        };
        Some(SecondChance {
            forwarded: field("forwarded"),
            delivered: field("delivered"),
            unclaimed: field("unclaimed"),
        })
    }

    /// The config file it was started with.
    pub fn config_text(&self) -> String {
        let path = self.running().config_dir().join("switchyard.toml");
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
    }

    /// The client addresses (`ip:port`) of the sessions (proxy) or flows (xdp) it holds now.
    pub fn clients(&self, dataplane: Dataplane) -> Vec<String> {
        match dataplane {
            Dataplane::Proxy => {
                let text = self.ctl_ok(&["--json", "sessions"]);
                let report: SessionsReport = serde_json::from_str(&text)
                    .unwrap_or_else(|e| panic!("ctl sessions json ({e}): {text}"));
                report.sessions.into_iter().map(|s| s.client).collect()
            }
            Dataplane::XdpDsr => {
                let text = self.ctl_ok(&["--json", "flows"]);
                let report: FlowsReport = serde_json::from_str(&text)
                    .unwrap_or_else(|e| panic!("ctl flows json ({e}): {text}"));
                report.flows.into_iter().map(|f| f.client).collect()
            }
        }
    }
}

/// A balancer's second-chance packet counts for the service.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SecondChance {
    /// Sent on to the next balancer.
    pub forwarded: u64,
    /// Arrived from a peer and placed here.
    pub delivered: u64,
    /// Arrived from a peer with no hop left and not placed: passed to the stack.
    pub unclaimed: u64,
}

/// The whole testbed. Field order is drop order: balancers (switchyard, BIRD), the router's
/// BIRD and the MTAs' servers go before the namespaces.
pub struct Balancers {
    pub balancers: Vec<Balancer>,
    pub router_bird: Bird,
    pub mtas: Vec<SmtpServer>,
    pub setup: Setup,
    config_tail: String,
    /// `[announce] peers` and `interface` on every balancer.
    second_chance: bool,
    binary: std::path::PathBuf,
    pub client: Netns,
    pub router: Netns,
    pub mta_namespaces: Vec<Netns>,
    switch: Netns,
    suffix: String,
}

impl Balancers {
    /// The network, the router's BIRD, the MTAs and `count` balancers running `setup`, each
    /// announcing the VIP; returns once the router's route has `count` nexthops.
    pub fn start(binary: &str, setup: Setup, count: usize) -> Result<Balancers> {
        Balancers::launch(binary, setup, count, false)
    }

    /// [`Balancers::start`] with the second chance: every balancer lists all of them as
    /// `[announce] peers` on [`SEGMENT_INTERFACE`].
    pub fn start_with_second_chance(binary: &str, setup: Setup, count: usize) -> Result<Balancers> {
        Balancers::launch(binary, setup, count, true)
    }

    fn launch(binary: &str, setup: Setup, count: usize, second_chance: bool) -> Result<Balancers> {
        run("ip", &["route", "replace", "blackhole", "198.18.0.0/15"])
            .context("blackholing 198.18.0.0/15 in the root namespace")?;
        let suffix = suffix();
        let ns = |role: &str| Netns::new(format!("sy-e{suffix}-{role}"));
        let switch = ns("sw")?;
        switch.ip(&["link", "add", "br0", "type", "bridge"])?;
        switch.ip(&["link", "set", "br0", "up"])?;
        let client = ns("cl")?;
        let router = ns("rt")?;
        wire_router(&client, &router, &switch)?;
        let neighbours: Vec<Ipv4Addr> = (0..MAX_BALANCERS).map(balancer_addr).collect();
        let router_bird = Bird::start(&router, &bird::router_config(ROUTER, &neighbours));
        let mut mta_namespaces = Vec::new();
        let mut mtas = Vec::new();
        for index in 0..MTAS {
            let mta = ns(&format!("m{}", index + 1))?;
            plug(&switch, &mta, &format!("pm{index}"), mta_addr(index))?;
            mta.ip(&["route", "add", "default", "via", &ROUTER.to_string()])?;
            if setup.dataplane == Dataplane::XdpDsr {
                hold_vip_as_real_server(&mta)?;
            }
            let address = SocketAddr::from((Ipv4Addr::UNSPECIFIED, SMTP_PORT));
            let listener = mta.run(move || bind_listener(address))?;
            mtas.push(SmtpServer::serve(
                &format!("mta{}", index + 1),
                Behaviour::default(),
                listener,
            )?);
            mta_namespaces.push(mta);
        }
        let mut testbed = Balancers {
            balancers: Vec::new(),
            router_bird,
            mtas,
            config_tail: service_config(&setup),
            second_chance,
            setup,
            binary: binary.into(),
            client,
            router,
            mta_namespaces,
            switch,
            suffix,
        };
        for _ in 0..count {
            testbed.join()?;
        }
        bird::wait_nexthops(&testbed.router, VIP, count, "balancers up");
        Ok(testbed)
    }

    /// Whether the balancers run with the second chance ([`Balancers::start_with_second_chance`]).
    pub fn has_second_chance(&self) -> bool {
        self.second_chance
    }

    /// Starts one more balancer (namespace, BIRD, switchyard); does not wait for its route.
    pub fn join(&mut self) -> Result<&Balancer> {
        let index = self.balancers.len();
        anyhow::ensure!(
            index < MAX_BALANCERS,
            "the router peers with {MAX_BALANCERS} balancers at most"
        );
        let ns = Netns::new(format!("sy-e{}-b{}", self.suffix, index + 1))?;
        plug(
            &self.switch,
            &ns,
            &format!("pb{index}"),
            balancer_addr(index),
        )?;
        ns.ip(&["route", "add", "default", "via", &ROUTER.to_string()])?;
        if self.setup.dataplane == Dataplane::Proxy {
            ns.ip(&["addr", "add", &format!("{VIP}/32"), "dev", "lo"])?;
        }
        let bird = Bird::start(
            &ns,
            &bird::balancer_config(balancer_addr(index), ROUTER, VIP, PROTOCOL),
        );
        let config = switchyard_config(bird.socket(), self.second_chance, &self.config_tail);
        let launch = Launch::new(&self.binary);
        let launch = match self.setup.dataplane {
            Dataplane::Proxy => launch,
            Dataplane::XdpDsr => launch.ready_when_logged("XDP program attached to eth0"),
        };
        let switchyard = Some(launch.start_in(&ns, &config));
        self.balancers.push(Balancer {
            switchyard,
            bird,
            ns,
            index,
        });
        Ok(&self.balancers[index])
    }

    /// Balancer `index` dies: its switchyard SIGKILLed, then its BIRD stopped (by PID).
    pub fn kill(&mut self, index: usize) {
        self.kill_switchyard(index);
        self.balancers[index].bird.stop();
    }

    /// Only balancer `index`'s switchyard dies (SIGKILL): its BIRD goes on announcing what was
    /// announced, and its host, namespace and interface stay up (answering ARP).
    pub fn kill_switchyard(&mut self, index: usize) {
        if let Some(mut sy) = self.balancers[index].switchyard.take() {
            sy.signal(nix::sys::signal::Signal::SIGKILL);
            sy.wait_timeout(Duration::from_secs(5));
        }
    }

    /// The router's route to the VIP has `count` nexthops; how long it took to get there.
    pub fn wait_nexthops(&self, count: usize, what: &str) -> Duration {
        bird::wait_nexthops(&self.router, VIP, count, what)
    }

    pub fn nexthops(&self) -> usize {
        bird::nexthops(&self.router, VIP)
    }

    /// Messages each MTA accepted (one per client session; health checks send none).
    pub fn mta_messages(&self) -> Vec<u64> {
        self.mtas.iter().map(|m| m.messages() as u64).collect()
    }

    /// `count` sessions from the client, `parallel` at a time; each one's result.
    pub fn sessions(&self, count: usize, parallel: usize) -> Vec<Outcome> {
        let stop = Arc::new(AtomicBool::new(false));
        self.client
            .run(move || run_load(count, parallel, Duration::ZERO, stop))
    }

    /// A load running in the background until [`Load::finish`] (or `count` sessions).
    pub fn load(&self, count: usize, parallel: usize, pause: Duration) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = self
            .client
            .spawn(move || run_load(count, parallel, pause, flag));
        Load { stop, thread }
    }
}

/// One client session: when it started and ended, and the greeting backend or the error.
#[derive(Debug)]
pub struct Outcome {
    pub started: Instant,
    pub ended: Instant,
    pub result: std::result::Result<String, String>,
}

/// A background load from the client namespace.
pub struct Load {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<Outcome>>,
}

impl Load {
    /// Stops starting sessions, waits for those running; every session's outcome.
    pub fn finish(self) -> Vec<Outcome> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    }
}

/// At most `count` whole sessions to the VIP, `parallel` at a time, each worker pausing `pause`
/// between its sessions, until `stop`. Every connection gets a port of its own from the kernel,
/// so the router's layer-4 hash spreads them.
fn run_load(count: usize, parallel: usize, pause: Duration, stop: Arc<AtomicBool>) -> Vec<Outcome> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("client runtime");
    let next = Arc::new(AtomicUsize::new(0));
    runtime.block_on(async {
        let mut workers = tokio::task::JoinSet::new();
        for _ in 0..parallel.max(1) {
            let (stop, next) = (stop.clone(), next.clone());
            workers.spawn(async move {
                let options = SessionOptions {
                    step_timeout: Some(LOAD_STEP),
                    ..SessionOptions::default()
                };
                let mut outcomes = Vec::new();
                while !stop.load(Ordering::SeqCst) && next.fetch_add(1, Ordering::SeqCst) < count {
                    let started = Instant::now();
                    let result = run_session(vip(), &options, TEST_MESSAGE)
                        .await
                        .map_err(|e| e.to_string());
                    outcomes.push(Outcome {
                        started,
                        ended: Instant::now(),
                        result,
                    });
                    tokio::time::sleep(pause).await;
                }
                outcomes
            });
        }
        let mut all = Vec::new();
        while let Some(done) = workers.join_next().await {
            all.extend(done.expect("a load worker panicked"));
        }
        all
    })
}

/// A balancer's whole config: admin, announcement through its BIRD (`bird_socket`, the only
/// line that differs between balancers), with `second_chance` every balancer as a peer, then
/// `services`.
fn switchyard_config(bird_socket: &std::path::Path, second_chance: bool, services: &str) -> String {
    let mut text = format!(
        "shutdown_timeout = \"5s\"\n[admin]\nsocket = \"admin.sock\"\nlisten = \"{METRICS}\"\n[announce]\nbird_socket = {:?}\n",
        bird_socket.display().to_string()
    );
    if second_chance {
        let peers: Vec<String> = (0..MAX_BALANCERS)
            .map(|index| format!("\"{}\"", balancer_addr(index)))
            .collect();
        text.push_str(&format!(
            "peers = [{}]\ninterface = \"{SEGMENT_INTERFACE}\"\n",
            peers.join(", ")
        ));
    }
    text.push_str(services);
    text
}

/// The service every balancer runs (health checks every 200 ms, rise 1, fall 1).
fn service_config(setup: &Setup) -> String {
    let mut keys = format!(
        "algorithm = \"{}\"\nannounce = true\nannounce_protocol = \"{PROTOCOL}\"",
        setup.algorithm
    );
    if setup.dataplane == Dataplane::XdpDsr {
        keys.push_str("\ndataplane = \"xdp\"");
    }
    let mut service = ServiceToml::new(SERVICE, &[vip()])
        .keys(&keys)
        .health("kind = \"smtp\"\ninterval = \"200ms\"\ntimeout = \"150ms\"\nrise = 1\nfall = 1");
    for index in 0..MTAS {
        service = service.backend(
            &format!("mta{}", index + 1),
            SocketAddrV4::new(mta_addr(index), SMTP_PORT),
        );
    }
    let mut text = service.to_string();
    if setup.dataplane == Dataplane::XdpDsr {
        text.push_str(
            "\n[service.xdp]\ninterface = \"eth0\"\nforwarding = \"dsr\"\nmode = \"auto\"\n",
        );
    }
    text
}

/// Client —veth— router, and the router on the segment; the router forwards with a layer-4
/// multipath hash.
fn wire_router(client: &Netns, router: &Netns, switch: &Netns) -> Result<()> {
    veth(client, "eth0", router, "eth1")?;
    client.ip(&["addr", "add", &format!("{CLIENT}/24"), "dev", "eth0"])?;
    client.ip(&["link", "set", "eth0", "up"])?;
    client.ip(&[
        "route",
        "add",
        "default",
        "via",
        &ROUTER_OUTSIDE.to_string(),
    ])?;
    router.ip(&[
        "addr",
        "add",
        &format!("{ROUTER_OUTSIDE}/24"),
        "dev",
        "eth1",
    ])?;
    router.ip(&["link", "set", "eth1", "up"])?;
    plug(switch, router, "pr", ROUTER)?;
    router.sysctl("net.ipv4.ip_forward", "1")?;
    router.sysctl("net.ipv4.fib_multipath_hash_policy", "1")?;
    Ok(())
}

/// A veth from `ns` (eth0, with `address`/24) to the bridge (port `port`).
fn plug(switch: &Netns, ns: &Netns, port: &str, address: Ipv4Addr) -> Result<()> {
    veth(ns, "eth0", switch, port)
        .with_context(|| format!("a veth from {} to the bridge", ns.name))?;
    switch.ip(&["link", "set", port, "master", "br0"])?;
    switch.ip(&["link", "set", port, "up"])?;
    ns.ip(&["addr", "add", &format!("{address}/24"), "dev", "eth0"])?;
    ns.ip(&["link", "set", "eth0", "up"])
}

/// The VIP on lo, never answered or announced in ARP (an LVS-DR real server).
fn hold_vip_as_real_server(ns: &Netns) -> Result<()> {
    ns.ip(&["addr", "add", &format!("{VIP}/32"), "dev", "lo"])?;
    ns.sysctl("net.ipv4.conf.all.arp_ignore", "1")?;
    ns.sysctl("net.ipv4.conf.all.arp_announce", "2")
}

/// The share of `part` in `total`, in percent.
pub fn percent(part: u64, total: u64) -> f64 {
    if total == 0 {
        0.0
    } else {
        part as f64 * 100.0 / total as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn announce(second_chance: bool) -> toml::Table {
        let setup = Setup {
            dataplane: Dataplane::Proxy,
            algorithm: "round_robin",
        };
        let text = switchyard_config(
            std::path::Path::new("/tmp/b1/bird.ctl"),
            second_chance,
            &service_config(&setup),
        );
        println!("{text}");
        let config: toml::Table = text.parse().expect("the balancer's config is TOML");
        config["announce"].as_table().expect("[announce]").clone()
    }

    #[test]
    fn second_chance_lists_every_balancer_as_a_peer_on_the_segment_interface() {
        let announce = announce(true);
        let peers: Vec<&str> = announce["peers"]
            .as_array()
            .expect("peers")
            .iter()
            .map(|p| p.as_str().expect("a peer address"))
            .collect();
        assert_eq!(peers, ["198.18.51.11", "198.18.51.12", "198.18.51.13"]);
        assert_eq!(announce["interface"].as_str(), Some(SEGMENT_INTERFACE));
        assert_eq!(announce["bird_socket"].as_str(), Some("/tmp/b1/bird.ctl"));
    }

    #[test]
    fn without_second_chance_announce_has_only_the_bird_socket() {
        let announce = announce(false);
        let keys: Vec<&String> = announce.keys().collect();
        assert_eq!(keys, ["bird_socket"]);
    }
}
