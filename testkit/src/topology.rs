//! The kernel path's test network, one builder for the tests and the benchmark: a client, a
//! balancer and backends in network namespaces, joined by veth pairs and a bridge (in a switch
//! namespace of its own), with their addresses, routes, sysctls and the pass programs the
//! balancer's XDP_TX/redirected frames need. It builds the network only: what runs in it (SMTP
//! servers, sinks, balancers) is the caller's.
//!
//! Prepared plans ([`Plan::tests`], [`Plan::benchmark`]) make the veths carry XDP_TX and
//! redirected frames in native mode (pass programs on the receiving ends, complete checksums
//! from the hosts, forwarding on in the nat balancer). [`Plan::plain`] is the network a user
//! has: a bridge and veths with default offloads, nothing on any peer, no sysctl set beyond
//! the layout's addresses and routes (a nat test turns on forwarding itself, as a user would
//! after switchyard refuses without it).
//!
//! Two layouts ([`Layout`]): `dsr`, one L2 segment where backends hold the VIP on loopback (as
//! LVS-DR real servers), and `nat`, client and backends on two subnets with the balancer
//! routing between them. Addresses: client 198.18.0.1, balancer 198.18.0.2 (and 198.18.1.1 in
//! nat), backend `i` 198.18.0.(11+i) in dsr and 198.18.1.(11+i) in nat, VIP 198.18.0.100.
//! Every host has the same layout in IPv6 too (dual stack, addresses added with `nodad` so they
//! work at once): 2001:2::1, 2001:2::2 (and 2001:2:1::1), backend `i` 2001:2::(11+i) in dsr and
//! 2001:2:1::(11+i) in nat, VIP 2001:2:ff::100. The IPv6 VIP sits in a prefix of its own,
//! routed through the balancer as a real VIP is, not on the client's link: a SYN the balancer
//! hands to its stack (a removed service's port) would otherwise make that stack send the
//! client an ICMPv6 redirect saying the VIP is on-link, and the client's next connections to
//! the VIP, to any port, would go looking for a neighbour nobody is.
//!
//! Safety rules (DEVELOPERS.md): before anything is created the root namespace gets
//! `ip route replace blackhole 198.18.0.0/15` and `ip -6 route replace blackhole 2001:2::/48`,
//! so nothing addressed to a test host can leave the machine. Namespaces are named `sy-<tag>-<pid>-<n>-<role>`; `Drop` deletes them (also on
//! panic), and a build deletes those of its tag whose pid no longer runs (a killed run's).

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Context, Result};

use crate::netns::{Netns, PassProgram, run};

/// The VIP every topology balances.
pub const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const BALANCER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// Balancer's address towards the backends in the nat layout.
pub const BALANCER_INSIDE: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
pub const SMTP_PORT: u16 = 25;
/// The IPv6 VIP, and the hosts' IPv6 addresses (the same roles as the IPv4 ones).
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0xff, 0, 0, 0, 0, 0x100);
pub const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 1);
pub const BALANCER6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 2);
pub const BALANCER_INSIDE6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 1, 0, 0, 0, 0, 1);

/// Which forwarding layout to build.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// One L2 segment (a bridge): client, balancer and backends; backends hold the VIP on lo
    /// and answer no ARP for it.
    Dsr,
    /// Client ↔ balancer on 198.18.0.0/24, balancer ↔ backends on 198.18.1.0/24; backends
    /// route through the balancer.
    Nat,
}

/// Which veth ends run the pass-everything XDP program. A veth delivers the frames its peer's
/// XDP program transmits (XDP_TX) or redirects promptly only when the receiving end runs an
/// XDP program itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Passes {
    /// None at all: the plain topology.
    None,
    /// Every bridge port, and in nat the client's end (which receives the replies redirected
    /// from the backend side).
    EveryReceiver,
    /// Only the bridge port facing the balancer, where its transmitted and redirected frames
    /// enter the bridge.
    BalancerPort,
}

/// Kernel settings beyond what the layout itself needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tuning {
    None,
    /// The balancer can route the VIP itself (forwarding on, multipath by layer-4 hash, no
    /// redirects sent, and the client takes none), and client and balancer have ports enough
    /// for tens of thousands of short sessions per run (the whole port range, TIME_WAIT reuse).
    RoutingUnderLoad,
    /// Only the client's ports (the whole range, TIME_WAIT reuse): the load generator's own
    /// need for tens of thousands of short sessions, nothing on the path.
    LoadGeneratorPorts,
}

/// What to build.
#[derive(Clone, Debug)]
pub struct Plan {
    pub layout: Layout,
    pub backends: usize,
    /// The `<tag>` of the namespace names: whose namespaces they are (for stale-run cleanup).
    pub tag: &'static str,
    pub passes: Passes,
    pub tuning: Tuning,
    /// Hosts send complete TCP checksums (transmit checksum offload off on their veths).
    pub complete_checksums: bool,
    /// The nat balancer forwards IPv4 and IPv6 (`net.ipv4.ip_forward = 1`,
    /// `net.ipv6.conf.all.forwarding = 1`) from the start.
    pub nat_forwarding: bool,
}

impl Plan {
    /// The integration tests' network: pass programs on every receiving end, no tuning.
    pub fn tests(layout: Layout, backends: usize) -> Plan {
        Plan {
            layout,
            backends,
            tag: "test",
            passes: Passes::EveryReceiver,
            tuning: Tuning::None,
            complete_checksums: true,
            nat_forwarding: true,
        }
    }

    /// The network a user has: bridge and veths with default offloads, no program and no
    /// ethtool change on any peer, no forwarding turned on.
    pub fn plain(layout: Layout, backends: usize) -> Plan {
        Plan {
            layout,
            backends,
            tag: "plain",
            passes: Passes::None,
            tuning: Tuning::None,
            complete_checksums: false,
            nat_forwarding: false,
        }
    }

    /// The benchmark's plain network: [`Plan::plain`] in the dsr layout with three backends,
    /// and ports enough on the client for the load generator.
    pub fn plain_benchmark() -> Plan {
        Plan {
            tag: "bplain",
            tuning: Tuning::LoadGeneratorPorts,
            ..Plan::plain(Layout::Dsr, 3)
        }
    }

    /// The benchmark's network: dsr, three backends, a pass program on the balancer's port,
    /// tuned for plain routing as a contender and for many short sessions.
    pub fn benchmark() -> Plan {
        Plan {
            layout: Layout::Dsr,
            backends: 3,
            tag: "bench",
            passes: Passes::BalancerPort,
            tuning: Tuning::RoutingUnderLoad,
            complete_checksums: true,
            nat_forwarding: true,
        }
    }
}

/// The built network. Field order is drop order: the pass programs detach before the
/// namespaces (and with them every veth) go.
pub struct Topology {
    passes: Vec<PassProgram>,
    pub layout: Layout,
    /// `<tag>-<pid>-<n>`: unique to this topology on the machine.
    pub suffix: String,
    pub client: Netns,
    pub balancer: Netns,
    /// One namespace per backend, in config order.
    pub backends: Vec<Netns>,
    pub switch: Netns,
    /// Balancer interface facing clients (and backends in dsr).
    pub lb_interface: &'static str,
    /// Balancer interface facing backends (nat).
    pub lb_backend_interface: &'static str,
    complete_checksums: bool,
}

impl Topology {
    /// Builds `plan`. On failure, what was built is torn down (the namespaces' `Drop`).
    pub fn build(plan: &Plan) -> Result<Topology> {
        run("ip", &["route", "replace", "blackhole", "198.18.0.0/15"])
            .context("blackholing 198.18.0.0/15 in the root namespace")?;
        run(
            "ip",
            &["-6", "route", "replace", "blackhole", "2001:2::/48"],
        )
        .context("blackholing 2001:2::/48 in the root namespace")?;
        remove_stale_namespaces(plan.tag);
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let suffix = format!(
            "{}-{}-{}",
            plan.tag,
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        let ns = |role: &str| Netns::new(format!("sy-{suffix}-{role}"));
        let mut topo = Topology {
            passes: Vec::new(),
            layout: plan.layout,
            client: ns("client")?,
            balancer: ns("lb")?,
            switch: ns("switch")?,
            backends: (1..=plan.backends)
                .map(|i| ns(&format!("mta{i}")))
                .collect::<Result<_>>()?,
            suffix,
            lb_interface: "eth0",
            lb_backend_interface: "eth1",
            complete_checksums: plan.complete_checksums,
        };
        topo.switch.ip(&["link", "add", "br0", "type", "bridge"])?;
        topo.switch.ip(&["link", "set", "br0", "up"])?;
        match plan.layout {
            Layout::Dsr => topo.wire_dsr(),
            Layout::Nat => topo.wire_nat(plan.nat_forwarding),
        }
        .with_context(|| format!("wiring the {:?} layout", plan.layout))?;
        topo.attach_passes(plan.passes)?;
        match plan.tuning {
            Tuning::None => {}
            Tuning::RoutingUnderLoad => topo.tune_for_routing_under_load()?,
            Tuning::LoadGeneratorPorts => topo.give_the_client_ports()?,
        }
        Ok(topo)
    }

    /// Address of backend `i` (config order).
    pub fn backend_addr(&self, i: usize) -> Ipv4Addr {
        match self.layout {
            Layout::Dsr => Ipv4Addr::new(198, 18, 0, 11 + i as u8),
            Layout::Nat => Ipv4Addr::new(198, 18, 1, 11 + i as u8),
        }
    }

    /// IPv6 address of backend `i` (config order).
    pub fn backend_addr6(&self, i: usize) -> Ipv6Addr {
        let subnet = match self.layout {
            Layout::Dsr => 0,
            Layout::Nat => 1,
        };
        Ipv6Addr::new(0x2001, 2, subnet, 0, 0, 0, 0, 11 + i as u16)
    }

    /// Every namespace of this topology.
    pub fn namespaces(&self) -> impl Iterator<Item = &Netns> {
        [&self.client, &self.balancer, &self.switch]
            .into_iter()
            .chain(&self.backends)
    }

    /// A veth from `ns` (named `inner` there) to the switch's bridge (named `port` there).
    /// The host end gets `address` (IPv4) and `address6` (IPv6, a /64).
    fn plug(
        &self,
        ns: &Netns,
        inner: &str,
        port: &str,
        address: &str,
        address6: Ipv6Addr,
    ) -> Result<()> {
        veth(ns, inner, &self.switch, port)?;
        self.switch.ip(&["link", "set", port, "master", "br0"])?;
        self.switch.ip(&["link", "set", port, "up"])?;
        ns.ip(&["addr", "add", address, "dev", inner])?;
        add_address6(ns, inner, &format!("{address6}/64"))?;
        ns.ip(&["link", "set", inner, "up"])?;
        self.prepare_checksums(ns, inner)
    }

    /// In a prepared plan, the host end sends complete checksums: a veth otherwise hands on TCP
    /// segments with only the pseudo-header sum (CHECKSUM_PARTIAL), which native XDP forwards
    /// without that state, so the receiver drops them (a physical NIC delivers complete
    /// checksums; generic XDP keeps the state).
    fn prepare_checksums(&self, ns: &Netns, interface: &str) -> Result<()> {
        if self.complete_checksums {
            ns.disable_tx_checksum(interface)?;
        }
        Ok(())
    }

    fn wire_dsr(&self) -> Result<()> {
        self.plug(&self.client, "eth0", "pc", &format!("{CLIENT}/24"), CLIENT6)?;
        self.plug(
            &self.balancer,
            "eth0",
            "plb",
            &format!("{BALANCER}/24"),
            BALANCER6,
        )?;
        // Clients reach the VIP through the balancer; it does not hold the VIP itself.
        self.client.ip(&[
            "route",
            "add",
            &format!("{VIP}/32"),
            "via",
            &BALANCER.to_string(),
        ])?;
        self.client.ip(&[
            "-6",
            "route",
            "add",
            &format!("{VIP6}/128"),
            "via",
            &BALANCER6.to_string(),
        ])?;
        for (i, ns) in self.backends.iter().enumerate() {
            let address = format!("{}/24", self.backend_addr(i));
            self.plug(ns, "eth0", &bridge_port(i), &address, self.backend_addr6(i))?;
            ns.ip(&["addr", "add", &format!("{VIP}/32"), "dev", "lo"])?;
            // On lo the VIP is never announced or answered for in neighbour discovery.
            add_address6(ns, "lo", &format!("{VIP6}/128"))?;
            // Like LVS-DR real servers: never answer or announce ARP for the VIP.
            ns.sysctl("net.ipv4.conf.all.arp_ignore", "1")?;
            ns.sysctl("net.ipv4.conf.all.arp_announce", "2")?;
        }
        Ok(())
    }

    fn wire_nat(&self, forwarding: bool) -> Result<()> {
        let (client, lb) = (&self.client, &self.balancer);
        veth(client, "eth0", lb, "eth0")?;
        client.ip(&["addr", "add", &format!("{CLIENT}/24"), "dev", "eth0"])?;
        add_address6(client, "eth0", &format!("{CLIENT6}/64"))?;
        client.ip(&["link", "set", "eth0", "up"])?;
        self.prepare_checksums(client, "eth0")?;
        lb.ip(&["addr", "add", &format!("{BALANCER}/24"), "dev", "eth0"])?;
        add_address6(lb, "eth0", &format!("{BALANCER6}/64"))?;
        lb.ip(&["link", "set", "eth0", "up"])?;
        self.prepare_checksums(lb, "eth0")?;
        // The VIP sits in the client's own /24: route it (and the backends' net) via the balancer.
        let via = BALANCER.to_string();
        client.ip(&["route", "add", &format!("{VIP}/32"), "via", &via])?;
        client.ip(&["route", "add", "198.18.1.0/24", "via", &via])?;
        let via6 = BALANCER6.to_string();
        client.ip(&["-6", "route", "add", &format!("{VIP6}/128"), "via", &via6])?;
        client.ip(&["-6", "route", "add", "2001:2:1::/64", "via", &via6])?;
        self.plug(
            lb,
            "eth1",
            "plb",
            &format!("{BALANCER_INSIDE}/24"),
            BALANCER_INSIDE6,
        )?;
        if forwarding {
            lb.sysctl("net.ipv4.ip_forward", "1")?;
            lb.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        }
        for (i, ns) in self.backends.iter().enumerate() {
            let address = format!("{}/24", self.backend_addr(i));
            self.plug(ns, "eth0", &bridge_port(i), &address, self.backend_addr6(i))?;
            ns.ip(&[
                "route",
                "add",
                "default",
                "via",
                &BALANCER_INSIDE.to_string(),
            ])?;
            ns.ip(&[
                "-6",
                "route",
                "add",
                "default",
                "via",
                &BALANCER_INSIDE6.to_string(),
            ])?;
        }
        Ok(())
    }

    fn attach_passes(&mut self, passes: Passes) -> Result<()> {
        if passes == Passes::None {
            return Ok(());
        }
        let mut ports = vec!["plb".to_string()];
        if passes == Passes::EveryReceiver {
            if self.layout == Layout::Dsr {
                ports.push("pc".into());
            } else {
                self.passes.push(self.client.attach_pass("eth0")?);
            }
            ports.extend((0..self.backends.len()).map(bridge_port));
        }
        for port in ports {
            self.passes.push(self.switch.attach_pass(&port)?);
        }
        Ok(())
    }

    fn tune_for_routing_under_load(&self) -> Result<()> {
        let (client, lb) = (&self.client, &self.balancer);
        client.sysctl("net.ipv4.conf.all.accept_redirects", "0")?;
        client.sysctl("net.ipv4.conf.eth0.accept_redirects", "0")?;
        // Forwarding: plain routing's whole job, and bpf_fib_lookup (nat) wants it too.
        lb.sysctl("net.ipv4.ip_forward", "1")?;
        lb.sysctl("net.ipv4.conf.all.send_redirects", "0")?;
        lb.sysctl("net.ipv4.conf.eth0.send_redirects", "0")?;
        lb.sysctl("net.ipv4.fib_multipath_hash_policy", "1")?;
        for ns in [client, lb] {
            give_ports(ns)?;
        }
        Ok(())
    }

    fn give_the_client_ports(&self) -> Result<()> {
        give_ports(&self.client)
    }
}

/// The whole port range and TIME_WAIT reuse: ports for tens of thousands of short sessions.
fn give_ports(ns: &Netns) -> Result<()> {
    ns.sysctl("net.ipv4.ip_local_port_range", "1024 65535")?;
    ns.sysctl("net.ipv4.tcp_tw_reuse", "1")
}

/// An IPv6 address usable at once: `nodad` skips duplicate address detection (nothing else
/// on these private links could hold it), so tests need not wait for it.
fn add_address6(ns: &Netns, interface: &str, address: &str) -> Result<()> {
    ns.ip(&["-6", "addr", "add", address, "dev", interface, "nodad"])
}

/// The bridge port of backend `i`.
fn bridge_port(i: usize) -> String {
    format!("pb{i}")
}

/// A veth pair: `a_end` in `a`, `b_end` in `b`.
pub fn veth(a: &Netns, a_end: &str, b: &Netns, b_end: &str) -> Result<()> {
    run(
        "ip",
        &[
            "link", "add", a_end, "netns", &a.name, "type", "veth", "peer", "name", b_end, "netns",
            &b.name,
        ],
    )
}

/// Deletes `sy-<tag>-<pid>-…` namespaces whose pid no longer runs (a killed run's).
fn remove_stale_namespaces(tag: &str) {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    let prefix = format!("sy-{tag}-");
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(&prefix)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = run("ip", &["netns", "del", &name]);
        }
    }
}
