//! Network-namespace topologies for the kernel fast path's tests: a client, a balancer and
//! three backends running real SMTP servers, joined by veth pairs (and a bridge for the shared
//! L2 segment), all in 198.18.0.0/15 and all named `sy-…-<suffix>`.
//!
//! Safety rules (DEVELOPERS.md): before anything is created the root namespace gets
//! `ip route replace blackhole 198.18.0.0/15`, so nothing addressed to a test host can leave
//! the machine; every namespace, and with it every veth, is deleted by `Drop`, also when the
//! test panics. Work inside a namespace runs on a thread that entered it with `setns` (threads
//! it spawns inherit it); processes enter it before `exec`.
#![allow(dead_code)]

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

pub use testkit::netns::*;
use testkit::smtp_server::{Behaviour, SmtpServer};

/// The VIP every topology balances.
pub const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const BALANCER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// Balancer's address towards the backends in the nat topology.
pub const BALANCER_INSIDE: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
pub const SMTP_PORT: u16 = 25;

/// Which forwarding layout to build.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// One L2 segment (a bridge): client, balancer and backends; backends hold the VIP on lo.
    Dsr,
    /// Client ↔ balancer on 198.18.0.0/24, balancer ↔ backends on 198.18.1.0/24; backends
    /// route through the balancer.
    Nat,
}

/// The whole test network. Field order is drop order: servers stop before namespaces go.
pub struct Topology {
    /// Pass programs on the veth ends that receive XDP_TX/redirected frames.
    passes: Vec<PassProgram>,
    pub layout: Layout,
    pub suffix: String,
    pub backends: Vec<SmtpServer>,
    pub client: Netns,
    pub balancer: Netns,
    pub backend_ns: Vec<Netns>,
    pub switch: Netns,
    /// Balancer interface facing clients (and backends in dsr).
    pub lb_interface: &'static str,
    /// Balancer interface facing backends (nat).
    pub lb_backend_interface: &'static str,
}

impl Topology {
    pub fn new(layout: Layout, backends: usize) -> Topology {
        must("ip", &["route", "replace", "blackhole", "198.18.0.0/15"]);
        let suffix = suffix();
        let client = Netns::new(format!("sy-c-{suffix}"));
        let balancer = Netns::new(format!("sy-lb-{suffix}"));
        let switch = Netns::new(format!("sy-sw-{suffix}"));
        let backend_ns: Vec<Netns> = (0..backends)
            .map(|i| Netns::new(format!("sy-b{i}-{suffix}")))
            .collect();
        switch.ip(&["link", "add", "br0", "type", "bridge"]);
        switch.ip(&["link", "set", "br0", "up"]);
        let mut topo = Topology {
            passes: Vec::new(),
            layout,
            suffix,
            backends: Vec::new(),
            client,
            balancer,
            backend_ns,
            switch,
            lb_interface: "eth0",
            lb_backend_interface: "eth1",
        };
        match layout {
            Layout::Dsr => topo.build_dsr(),
            Layout::Nat => topo.build_nat(),
        }
        topo
    }

    /// A veth from `ns` (named `inner`) to the switch's bridge (named `port` there). The
    /// switch end runs the pass program so XDP_TX/redirected frames into it are delivered;
    /// the host end sends complete checksums.
    fn plug(switch: &Netns, ns: &Netns, inner: &str, port: &str, address: &str) -> PassProgram {
        must(
            "ip",
            &[
                "link",
                "add",
                inner,
                "netns",
                &ns.name,
                "type",
                "veth",
                "peer",
                "name",
                port,
                "netns",
                &switch.name,
            ],
        );
        switch.ip(&["link", "set", port, "master", "br0"]);
        switch.ip(&["link", "set", port, "up"]);
        ns.ip(&["addr", "add", address, "dev", inner]);
        ns.ip(&["link", "set", inner, "up"]);
        ns.disable_tx_checksum(inner);
        switch.attach_pass(port)
    }

    fn build_dsr(&mut self) {
        let mut passes = Vec::new();
        passes.push(Self::plug(
            &self.switch,
            &self.client,
            "eth0",
            "pc",
            "198.18.0.1/24",
        ));
        passes.push(Self::plug(
            &self.switch,
            &self.balancer,
            "eth0",
            "plb",
            "198.18.0.2/24",
        ));
        // Clients reach the VIP through the balancer; it does not hold the VIP itself.
        self.client
            .ip(&["route", "add", "198.18.0.100/32", "via", "198.18.0.2"]);
        for (i, ns) in self.backend_ns.iter().enumerate() {
            passes.push(Self::plug(
                &self.switch,
                ns,
                "eth0",
                &format!("pb{i}"),
                &format!("198.18.0.{}/24", 11 + i),
            ));
            ns.ip(&["addr", "add", "198.18.0.100/32", "dev", "lo"]);
            // Like LVS-DR real servers: never answer or announce ARP for the VIP.
            ns.sysctl("net.ipv4.conf.all.arp_ignore", "1");
            ns.sysctl("net.ipv4.conf.all.arp_announce", "2");
        }
        self.passes = passes;
    }

    fn build_nat(&mut self) {
        let mut passes = Vec::new();
        must(
            "ip",
            &[
                "link",
                "add",
                "eth0",
                "netns",
                &self.client.name,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &self.balancer.name,
            ],
        );
        self.client
            .ip(&["addr", "add", "198.18.0.1/24", "dev", "eth0"]);
        self.client.ip(&["link", "set", "eth0", "up"]);
        self.client.disable_tx_checksum("eth0");
        self.balancer
            .ip(&["addr", "add", "198.18.0.2/24", "dev", "eth0"]);
        self.balancer.ip(&["link", "set", "eth0", "up"]);
        self.balancer.disable_tx_checksum("eth0");
        // Replies redirected from the backend side arrive at the client's end.
        passes.push(self.client.attach_pass("eth0"));
        // The VIP sits in the client's own /24: route it (and the backends' net) via the balancer.
        self.client
            .ip(&["route", "add", "198.18.0.100/32", "via", "198.18.0.2"]);
        self.client
            .ip(&["route", "add", "198.18.1.0/24", "via", "198.18.0.2"]);
        passes.push(Self::plug(
            &self.switch,
            &self.balancer,
            "eth1",
            "plb",
            "198.18.1.1/24",
        ));
        self.balancer.sysctl("net.ipv4.ip_forward", "1");
        for (i, ns) in self.backend_ns.iter().enumerate() {
            passes.push(Self::plug(
                &self.switch,
                ns,
                "eth0",
                &format!("pb{i}"),
                &format!("198.18.1.{}/24", 11 + i),
            ));
            ns.ip(&["route", "add", "default", "via", "198.18.1.1"]);
        }
        self.passes = passes;
    }

    /// Address of backend `i` (config order).
    pub fn backend_addr(&self, i: usize) -> Ipv4Addr {
        match self.layout {
            Layout::Dsr => Ipv4Addr::new(198, 18, 0, 11 + i as u8),
            Layout::Nat => Ipv4Addr::new(198, 18, 1, 11 + i as u8),
        }
    }

    /// Starts an SMTP server on port 25 in every backend namespace.
    pub fn start_backends(&mut self) {
        for (i, ns) in self.backend_ns.iter().enumerate() {
            let address = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, SMTP_PORT);
            let listener = ns
                .run(move || std::net::TcpListener::bind(address))
                .expect("bind the SMTP server in its namespace");
            let name = format!("mta{}", i + 1);
            let server = SmtpServer::serve(&name, Behaviour::default(), listener)
                .expect("start the SMTP server");
            self.backends.push(server);
        }
    }

    /// The `[[service]]` table for this topology (health checks every 500 ms, fall 2).
    pub fn service_toml(&self, name: &str, algorithm: &str) -> String {
        let forwarding = match self.layout {
            Layout::Dsr => "dsr",
            Layout::Nat => "nat",
        };
        let mut text = format!(
            "shutdown_timeout = \"2s\"\n\n[[service]]\nname = \"{name}\"\nlisten = \"{VIP}:{SMTP_PORT}\"\ndataplane = \"xdp\"\nalgorithm = \"{algorithm}\"\n\n[service.health]\nkind = \"smtp\"\ninterval = \"500ms\"\ntimeout = \"400ms\"\nrise = 2\nfall = 2\n\n[service.xdp]\ninterface = \"{}\"\nforwarding = \"{forwarding}\"\nbackend_interface = \"{}\"\nflow_table_size = 65536\nflow_idle_timeout = \"5m\"\n",
            self.lb_interface,
            match self.layout {
                Layout::Dsr => self.lb_interface,
                Layout::Nat => self.lb_backend_interface,
            },
        );
        for i in 0..self.backend_ns.len() {
            text.push_str(&format!(
                "\n[[service.backend]]\nname = \"mta{}\"\naddress = \"{}:{SMTP_PORT}\"\n",
                i + 1,
                self.backend_addr(i)
            ));
        }
        text
    }
}

/// Sends one bare TCP SYN from `source` to `target` for each source port in `ports`, through a
/// raw socket (call it inside a namespace). With a `source` nobody holds, no RST ever answers
/// the backends' SYN-ACKs: each SYN leaves one open flow in an XDP balancer and nothing else.
/// Paced, so a veth ring never overflows.
pub fn send_syns(source: Ipv4Addr, target: SocketAddrV4, ports: std::ops::Range<u16>) {
    let socket = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::RAW,
        Some(socket2::Protocol::from(nix::libc::IPPROTO_RAW)),
    )
    .expect("raw socket (needs root)");
    let destination: socket2::SockAddr = SocketAddr::V4(target).into();
    for (i, port) in ports.enumerate() {
        let packet = syn_packet(source, target, port, i as u32);
        socket
            .send_to(&packet, &destination)
            .unwrap_or_else(|e| panic!("send a SYN to {target}: {e}"));
        if i % 64 == 63 {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// An IPv4 + TCP SYN with correct checksums.
fn syn_packet(source: Ipv4Addr, target: SocketAddrV4, port: u16, seq: u32) -> [u8; 40] {
    let mut p = [0u8; 40];
    p[0] = 0x45; // IPv4, 20-byte header
    p[2..4].copy_from_slice(&40u16.to_be_bytes());
    p[6] = 0x40; // don't fragment
    p[8] = 64; // TTL
    p[9] = 6; // TCP
    p[12..16].copy_from_slice(&source.octets());
    p[16..20].copy_from_slice(&target.ip().octets());
    let ip_check = checksum(&p[..20], 0);
    p[10..12].copy_from_slice(&ip_check.to_be_bytes());
    p[20..22].copy_from_slice(&port.to_be_bytes());
    p[22..24].copy_from_slice(&target.port().to_be_bytes());
    p[24..28].copy_from_slice(&seq.wrapping_mul(2654435761).to_be_bytes());
    p[32] = 5 << 4; // data offset: 5 words
    p[33] = 0x02; // SYN
    p[34..36].copy_from_slice(&64240u16.to_be_bytes());
    let mut pseudo = 0u32;
    for pair in p[12..20].chunks(2) {
        pseudo += u32::from(u16::from_be_bytes([pair[0], pair[1]]));
    }
    pseudo += 6 + 20;
    let tcp_check = checksum(&p[20..], pseudo);
    p[36..38].copy_from_slice(&tcp_check.to_be_bytes());
    p
}

fn checksum(bytes: &[u8], initial: u32) -> u16 {
    let mut sum = initial;
    for pair in bytes.chunks(2) {
        sum += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}
