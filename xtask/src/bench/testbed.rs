//! The kernel path's benchmark testbed: the test kit's benchmark network
//! (`testkit::topology::Plan::benchmark`) with a sink MTA in each of its three backends, in
//! which plain IP routing, switchyard's userspace proxy and switchyard's XDP path (dsr and nat)
//! take turns in front of the same sinks, so their figures compare like for like.
//!
//! The network is one L2 segment: client 198.18.0.1, balancer 198.18.0.2, backends
//! 198.18.0.11-13, each holding the VIP 198.18.0.100 on its loopback (as LVS-DR real servers);
//! the client reaches the VIP through the balancer. What the balancer does with the VIP depends
//! on the active [`Mode`]:
//! - `routing`: no balancer at all, an ECMP route (layer-4 hash) to the three backends, which
//!   answer the client directly: the physical limit of this network;
//! - `proxy`: switchyard's userspace proxy on the balancer's own address (not the VIP: the
//!   proxy's TIME_WAIT sockets would otherwise hold VIP tuples, and the kernel drops a packet
//!   it should forward when early demux matches it to a local socket, so the next routing run
//!   would lose connections);
//! - `dsr`: switchyard's XDP program rewrites the destination MAC and transmits (XDP_TX); the
//!   backends answer the client directly, as in `routing`;
//! - `nat`: switchyard's XDP program rewrites to the backend's address and redirects; the
//!   backends route their replies to the client back through the balancer.
//!
//! A second network beside it, the plain one (`Plan::plain_benchmark`: bridge and veths with
//! default offloads, nothing on the peers, as a user's containers are wired), has its own three
//! sinks and runs, with `mode = "auto"` (generic mode on veth):
//! - `plain direct`: the client straight to one sink, no balancer: what one MTA takes;
//! - `plain dsr` and `plain nat`: switchyard's XDP path as above, in the mode auto picks
//!   (target: dsr >= 0.9x plain direct). nat needs forwarding on in the balancer, which is
//!   set once, as switchyard's refusal tells a user to.
//!
//! `Drop` stops the processes inside the namespaces before the networks go.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use testkit::topology::{BALANCER, CLIENT, Plan, SMTP_PORT, Topology, VIP};

use super::cpu::CpuSample;
use crate::workspace;
use testkit::config_toml::admin_table;
use testkit::supervise::{self, Supervised};

/// What stands between the client and the backends during a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Routing,
    Proxy,
    Dsr,
    Nat,
    PlainDirect,
    PlainDsr,
    PlainNat,
    /// Reference: the plain network's balancer forwarding by kernel routing (ECMP to the
    /// sinks, no program): what the extra hop through the balancer costs by itself.
    PlainRouting,
    /// `Dsr` with [`SYNFLOOD_LIMITS`]: the SYN-flood measurement's balancer (`bench::synflood`),
    /// not one of the side-by-side contenders.
    DsrLimits,
}

/// The `[service.limits]` of [`Mode::DsrLimits`]. The load generator is one source (the
/// client's address) opening thousands of sessions a second with 50 open at once, so the
/// limits sit above what it needs and far below what a one-source flood sends: the flood's
/// first SYNs open flows that never complete (no TCP stack holds its address), and once it has
/// `per_source_connections` of them every further SYN is dropped in the kernel.
pub const SYNFLOOD_LIMITS: &str = "\n[service.limits]\nper_source_connections = 1000\nper_source_rate = 50000\nper_source_burst = 50000\n";

impl Mode {
    pub const ALL: [Mode; 8] = [
        Mode::Routing,
        Mode::Proxy,
        Mode::Dsr,
        Mode::Nat,
        Mode::PlainDirect,
        Mode::PlainDsr,
        Mode::PlainNat,
        Mode::PlainRouting,
    ];

    /// The contender's name in the benchmark's table.
    pub fn contender(self) -> &'static str {
        match self {
            Mode::Routing => "kernel routing (no balancer)",
            Mode::Proxy => "switchyard proxy (netns)",
            Mode::Dsr => "switchyard xdp dsr",
            Mode::Nat => "switchyard xdp nat",
            Mode::PlainDirect => "plain: direct to one MTA",
            Mode::PlainDsr => "plain: switchyard xdp dsr (auto)",
            Mode::PlainNat => "plain: switchyard xdp nat (auto)",
            Mode::PlainRouting => "plain: kernel routing (reference)",
            Mode::DsrLimits => "switchyard xdp dsr + limits",
        }
    }

    /// Whether it runs on the plain network.
    pub fn plain(self) -> bool {
        matches!(
            self,
            Mode::PlainDirect | Mode::PlainDsr | Mode::PlainNat | Mode::PlainRouting
        )
    }

    /// The forwarding a switchyard xdp mode configures.
    fn forwarding(self) -> Option<&'static str> {
        match self {
            Mode::Dsr | Mode::PlainDsr | Mode::DsrLimits => Some("dsr"),
            Mode::Nat | Mode::PlainNat => Some("nat"),
            _ => None,
        }
    }

    fn word(self) -> &'static str {
        match self {
            Mode::Routing => "routing",
            Mode::Proxy => "proxy",
            Mode::Dsr => "dsr",
            Mode::Nat => "nat",
            Mode::PlainDirect => "plain-direct",
            Mode::PlainDsr => "plain-dsr",
            Mode::PlainNat => "plain-nat",
            Mode::PlainRouting => "plain-routing",
            Mode::DsrLimits => "dsr-limits",
        }
    }
}

/// The network, its sinks, and the balancer of the active mode.
pub struct Testbed {
    dir: PathBuf,
    switchyard: PathBuf,
    /// "smtp-sink" (Postfix) or "xtask sink".
    pub sinks_kind: &'static str,
    sinks: Vec<Supervised>,
    plain_sinks: Vec<Supervised>,
    active: Option<(Mode, Option<Supervised>)>,
    /// Last: the namespaces go after `Drop` has stopped what runs in them.
    pub net: Topology,
    pub plain: Topology,
}

impl Testbed {
    /// Builds the network and starts a sink in each backend. Fails (after tearing down what
    /// it built) if any step fails.
    pub fn build(dir: &Path, switchyard: &Path) -> Result<Testbed> {
        let net = Topology::build(&Plan::benchmark())
            .context("building the benchmark's network namespaces")?;
        let plain = Topology::build(&Plan::plain_benchmark())
            .context("building the benchmark's plain network namespaces")?;
        // What switchyard's nat refuses to start without, as a user would set it.
        plain.balancer.sysctl("net.ipv4.ip_forward", "1")?;
        let smtp_sink = workspace::find_program("smtp-sink");
        let mut testbed = Testbed {
            dir: dir.to_path_buf(),
            switchyard: switchyard.to_path_buf(),
            sinks_kind: if smtp_sink.is_some() {
                "smtp-sink"
            } else {
                "xtask sink"
            },
            sinks: Vec::new(),
            plain_sinks: Vec::new(),
            active: None,
            net,
            plain,
        };
        testbed.sinks = start_sinks(&testbed.net, dir, smtp_sink.as_deref(), "")
            .context("starting the sinks in the backend namespaces")?;
        testbed.plain_sinks = start_sinks(&testbed.plain, dir, smtp_sink.as_deref(), "plain-")
            .context("starting the sinks in the plain network's backend namespaces")?;
        Ok(testbed)
    }

    /// The network `mode` runs on.
    fn network(&self, mode: Mode) -> &Topology {
        if mode.plain() { &self.plain } else { &self.net }
    }

    /// The namespace the load generator runs in for `mode`.
    pub fn client_namespace(&self, mode: Mode) -> String {
        self.network(mode).client.name.clone()
    }

    /// CPU counters now, with the sinks and the active balancer as the processes of interest.
    pub fn cpu_sample(&self) -> CpuSample {
        let plain = self.active.as_ref().is_some_and(|(mode, _)| mode.plain());
        let sinks = if plain {
            &self.plain_sinks
        } else {
            &self.sinks
        };
        let sinks: Vec<u32> = sinks.iter().map(|s| s.pid()).collect();
        let balancer: Vec<u32> = self
            .active
            .as_ref()
            .and_then(|(_, p)| p.as_ref())
            .map(|p| p.pid())
            .into_iter()
            .collect();
        CpuSample::take(&sinks, &balancer)
    }

    /// Where the load generator connects in `mode`.
    pub fn target(mode: Mode) -> SocketAddr {
        match mode {
            // Backend 0 of the plain network.
            Mode::PlainDirect => SocketAddr::from((Ipv4Addr::new(198, 18, 0, 11), SMTP_PORT)),
            Mode::Proxy => SocketAddr::from((BALANCER, SMTP_PORT)),
            _ => SocketAddr::from((VIP, SMTP_PORT)),
        }
    }

    /// Switches the balancer to `mode` (a no-op if it is active and still running) and waits
    /// until the VIP greets the client with 220.
    pub fn activate(&mut self, mode: Mode) -> Result<()> {
        if let Some((active, process)) = &mut self.active
            && *active == mode
        {
            if let Some(p) = process {
                p.check_running()?;
            }
            return Ok(());
        }
        self.deactivate();
        let mut process = None;
        match mode {
            Mode::Routing | Mode::PlainRouting => {
                let net = self.network(mode);
                if mode == Mode::PlainRouting {
                    // As the prepared network's routing contender: no ICMP redirect may send
                    // the client around the balancer; ECMP by the layer-4 hash. (Neither
                    // touches the XDP contenders, whose packets the stack never routes.)
                    for key in ["all", "eth0"] {
                        let key = format!("net.ipv4.conf.{key}.send_redirects");
                        net.balancer.sysctl(&key, "0")?;
                    }
                    net.balancer
                        .sysctl("net.ipv4.fib_multipath_hash_policy", "1")?;
                }
                let mut args = vec!["route".to_string(), "replace".into(), format!("{VIP}/32")];
                for i in 0..net.backends.len() {
                    let via = net.backend_addr(i).to_string();
                    args.extend(["nexthop".into(), "via".into(), via]);
                }
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                net.balancer.ip(&args)?;
            }
            Mode::PlainDirect => {}
            Mode::Dsr | Mode::Proxy | Mode::PlainDsr | Mode::DsrLimits => {
                process = Some(self.start_switchyard(mode)?)
            }
            Mode::Nat | Mode::PlainNat => {
                for ns in &self.network(mode).backends {
                    let client = format!("{CLIENT}/32");
                    ns.ip(&["route", "replace", &client, "via", &BALANCER.to_string()])?;
                }
                process = Some(self.start_switchyard(mode)?);
            }
        }
        self.active = Some((mode, process));
        self.wait_ready(mode)
    }

    /// Stops the active balancer and undoes what its mode set up.
    fn deactivate(&mut self) {
        if let Some((_, Some(mut p))) = self.active.take() {
            // Graceful: switchyard detaches its XDP program on SIGTERM.
            p.stop(Duration::from_secs(10));
        }
        for net in [&self.net, &self.plain] {
            let _ = net.balancer.ip(&["route", "del", &format!("{VIP}/32")]);
        }
        for ns in self.net.backends.iter().chain(&self.plain.backends) {
            let _ = ns.ip(&["route", "del", &format!("{CLIENT}/32")]);
        }
    }

    /// The admin socket of the switchyard that `mode` runs (`switchyard ctl` talks to it).
    pub fn admin_socket(&self, mode: Mode) -> PathBuf {
        self.dir
            .join(format!("switchyard-netns-{}.sock", mode.word()))
    }

    fn start_switchyard(&self, mode: Mode) -> Result<Supervised> {
        let cfg = self
            .dir
            .join(format!("switchyard-netns-{}.toml", mode.word()));
        let text = self.switchyard_config(mode) + &admin_table(&self.admin_socket(mode));
        std::fs::write(&cfg, text).with_context(|| format!("writing {}", cfg.display()))?;
        let mut cmd = Command::new("ip");
        let balancer = &self.network(mode).balancer.name;
        cmd.args(["netns", "exec", balancer])
            .arg(&self.switchyard)
            .arg("run")
            .arg("--config")
            .arg(&cfg)
            .env("RUST_LOG", "info");
        let log = self
            .dir
            .join(format!("switchyard-netns-{}.log", mode.word()));
        Supervised::start(
            &format!("switchyard {} in {balancer}", mode.word()),
            &mut cmd,
            &log,
        )
    }

    /// Until the target greets with 220 from the client's namespace (for switchyard: its
    /// program or listener is up and a backend passed its health checks).
    fn wait_ready(&mut self, mode: Mode) -> Result<()> {
        let target = Self::target(mode);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some((_, Some(p))) = &mut self.active {
                p.check_running()?;
            }
            let code = self
                .network(mode)
                .client
                .run(move || supervise::wait_for_greeting(target, Duration::from_secs(2)));
            if let Ok(220) = code {
                return Ok(());
            }
            if Instant::now() > deadline {
                let log = self
                    .dir
                    .join(format!("switchyard-netns-{}.log", mode.word()));
                bail!(
                    "{target} did not greet with 220 within 30 s in mode {} (last: {code:?}); switchyard's log {}:\n{}",
                    mode.word(),
                    log.display(),
                    supervise::tail(&log, 20)
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The switchyard config of a mode: least_conn over the three sinks, on the VIP; the xdp
    /// modes of the prepared network in native mode, which it carries (`auto` would choose
    /// generic mode on any veth), those of the plain network in `auto`.
    fn switchyard_config(&self, mode: Mode) -> String {
        let attach = if mode.plain() { "auto" } else { "native" };
        let (dataplane, xdp) = match mode.forwarding() {
            Some(forwarding) => (
                "xdp",
                format!(
                    "\n[service.xdp]\ninterface = \"eth0\"\nforwarding = \"{forwarding}\"\nbackend_interface = \"eth0\"\nmode = \"{attach}\"\n\
                     flow_table_size = 262144\nflow_idle_timeout = \"2m\"\n"
                ),
            ),
            None => ("proxy", String::new()),
        };
        let listen = Self::target(mode);
        let mut cfg = format!(
            "# Written by cargo xtask bench (kernel path, mode {}).\nshutdown_timeout = \"5s\"\n\n[[service]]\n\
             name = \"bench\"\nlisten = \"{listen}\"\ndataplane = \"{dataplane}\"\nalgorithm = \"least_conn\"\n\
             max_connections = 10000\n\n[service.health]\nkind = \"smtp\"\ninterval = \"500ms\"\ntimeout = \"400ms\"\n{xdp}",
            mode.word()
        );
        if mode == Mode::DsrLimits {
            cfg.push_str(SYNFLOOD_LIMITS);
        }
        let net = self.network(mode);
        for i in 0..net.backends.len() {
            cfg.push_str(&format!(
                "\n[[service.backend]]\nname = \"mta{}\"\naddress = \"{}\"\n",
                i + 1,
                SocketAddrV4::new(net.backend_addr(i), SMTP_PORT)
            ));
        }
        cfg
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        self.deactivate();
        for mut s in self.sinks.drain(..).chain(self.plain_sinks.drain(..)) {
            s.stop(Duration::from_secs(5));
        }
    }
}

/// A sink in every backend namespace of `net` (smtp-sink when installed, else xtask's own),
/// each answering 220 before this returns; logs named `netns-<prefix>sink<i>.log`.
fn start_sinks(
    net: &Topology,
    dir: &Path,
    smtp_sink: Option<&Path>,
    prefix: &str,
) -> Result<Vec<Supervised>> {
    let listen = SocketAddr::from(([0, 0, 0, 0], SMTP_PORT)).to_string();
    let mut sinks = Vec::new();
    for (i, ns) in net.backends.iter().enumerate() {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &ns.name]);
        match smtp_sink {
            Some(bin) => {
                cmd.arg(bin).args(["-u", "nobody"]).arg(&listen).arg("1024");
            }
            None => {
                cmd.arg(std::env::current_exe()?)
                    .args(["sink", "--listen"])
                    .arg(&listen);
            }
        }
        let log = dir.join(format!("netns-{prefix}sink{}.log", i + 1));
        let name = format!("sink in {}", ns.name);
        sinks.push(Supervised::start(&name, &mut cmd, &log)?);
    }
    for (i, ns) in net.backends.iter().enumerate() {
        let addr = SocketAddr::from((net.backend_addr(i), SMTP_PORT));
        let code = ns.run(move || supervise::wait_for_greeting(addr, Duration::from_secs(10)))?;
        anyhow::ensure!(
            code == 220,
            "sink {addr} in {} greeted with {code}",
            ns.name
        );
    }
    Ok(sinks)
}
