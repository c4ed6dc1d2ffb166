//! The second chance in the kernel, on crafted frames with BPF_PROG_TEST_RUN over maps the
//! sync wrote (an announced xdp dsr service, an announced proxy service with a real listener
//! and connection) and a ring written as the sync writes it: an unplaceable non-SYN from the
//! routers goes to the next peer's MAC with TTL 200 + (listed peers − 2) and a correct IPv4
//! checksum; a peer's with TTL 201 goes on with 200; with 200 it passes (unclaimed); a packet
//! of a known flow or local socket is untouched (delivered when from a peer); IPv6 alike; with
//! the ring off (no `peers`) everything passes as before.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use aya::Ebpf;
use aya::TestRunOptions;
use aya::maps::{HashMap, PerCpuArray};
use aya::programs::{TestRun, Xdp};
use switchyard_common::maps::{
    FlowKey, FlowValue, PROTO_TCP, PeerMac, SecondChanceRing, ServiceKey, ServiceStats,
    ServiceValue, flow_flags, forwarding, names, programs, service_flags,
};

use super::XdpPlane;
use super::heartbeat::{ALIVE_FOR, Responder};
use super::loader::KernelSync;
use super::peers::write_ring;
use super::tests::{config, own_network_namespace_with_forwarding, require};
use crate::state::Snapshot;

const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const ROUTER: [u8; 6] = [2, 0, 0, 0, 0, 0x01];
const OWN: [u8; 6] = [2, 0, 0, 0, 0, 0x21];
const NEXT: [u8; 6] = [2, 0, 0, 0, 0, 0x22];
const OTHER: [u8; 6] = [2, 0, 0, 0, 0, 0x23];
const PROXY_PORT: u16 = 2525;

fn chance_config() -> String {
    format!(
        "[announce]\nbird_socket = \"/run/bird/bird.ctl\"\n\
         peers = [\"127.0.0.1\", \"127.0.0.2\", \"127.0.0.3\"]\ninterface = \"lo\"\n\
         [[service]]\nname = \"sy-chance-xdp\"\nlisten = [\"198.18.0.100:25\", \"[fd00::100]:25\"]\n\
         dataplane = \"xdp\"\nalgorithm = \"least_conn\"\nannounce = true\n\
         [service.xdp]\ninterface = \"lo\"\nforwarding = \"dsr\"\nflow_table_size = 4096\n\
         [[service.backend]]\nname = \"a\"\naddress = \"198.18.1.11:25\"\n\
         [[service]]\nname = \"sy-chance-proxy\"\nlisten = [\"127.0.0.1:{PROXY_PORT}\", \"[::1]:{PROXY_PORT}\"]\nannounce = true\n\
         [[service.backend]]\nname = \"m\"\naddress = \"198.18.1.12:25\"\n"
    )
}

/// An Ethernet frame from `mac` with a bare TCP segment (`flags`, an ACK number) from
/// `client` to `server`, TTL / hop limit `ttl`; the IPv4 header checksum is correct.
fn frame(mac: [u8; 6], client: SocketAddr, server: SocketAddr, flags: u8, ttl: u8) -> Vec<u8> {
    let mut f = Vec::with_capacity(74);
    f.extend_from_slice(&OWN);
    f.extend_from_slice(&mac);
    match (client.ip(), server.ip()) {
        (IpAddr::V4(c), IpAddr::V4(s)) => {
            f.extend_from_slice(&0x0800u16.to_be_bytes());
            let mut ip = [0u8; 20];
            ip[0] = 0x45;
            ip[2..4].copy_from_slice(&40u16.to_be_bytes());
            ip[8] = ttl;
            ip[9] = PROTO_TCP;
            ip[12..16].copy_from_slice(&c.octets());
            ip[16..20].copy_from_slice(&s.octets());
            let check = !ones_sum(&ip);
            ip[10..12].copy_from_slice(&check.to_be_bytes());
            f.extend_from_slice(&ip);
        }
        (IpAddr::V6(c), IpAddr::V6(s)) => {
            f.extend_from_slice(&0x86ddu16.to_be_bytes());
            f.extend_from_slice(&[0x60, 0, 0, 0]);
            f.extend_from_slice(&20u16.to_be_bytes());
            f.extend_from_slice(&[PROTO_TCP, ttl]);
            f.extend_from_slice(&c.octets());
            f.extend_from_slice(&s.octets());
        }
        _ => panic!("one family per frame"),
    }
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&client.port().to_be_bytes());
    tcp[2..4].copy_from_slice(&server.port().to_be_bytes());
    tcp[8..12].copy_from_slice(&0x1234_5678u32.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = flags;
    tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
    f.extend_from_slice(&tcp);
    f
}

/// The folded one's-complement sum of `bytes` (16-bit words).
fn ones_sum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

const ACK: u8 = 0x10;
const SYN: u8 = 0x02;

/// The action and the frame as the program left it.
fn run(bpf: &Ebpf, frame: &[u8]) -> (u32, Vec<u8>) {
    let program: &Xdp = bpf
        .program(programs::BALANCE)
        .expect("the balance program")
        .try_into()
        .expect("an XDP program");
    let mut out = vec![0u8; frame.len() + 256];
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..TestRunOptions::default()
        })
        .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN: {e}"));
    out.truncate(result.data_size_out as usize);
    (result.return_value, out)
}

/// The TTL (IPv4) or hop limit (IPv6) of `frame`.
fn ttl(frame: &[u8]) -> u8 {
    if frame[12..14] == [0x08, 0x00] {
        frame[22]
    } else {
        frame[21]
    }
}

/// Service `index`'s second-chance counters: forwarded, delivered, unclaimed.
fn counted(bpf: &Ebpf, index: u32) -> (u64, u64, u64) {
    let stats: PerCpuArray<_, ServiceStats> =
        PerCpuArray::try_from(bpf.map(names::SERVICE_STATS).expect("SERVICE_STATS"))
            .expect("a per-CPU array");
    let per_cpu = stats.get(&index, 0).expect("the service's stats");
    per_cpu.iter().fold((0, 0, 0), |(f, d, u), s| {
        (
            f + s.chance_forwarded,
            d + s.chance_delivered,
            u + s.chance_unclaimed,
        )
    })
}

/// A ring of three balancers, all MACs known, on `lo` (BPF_PROG_TEST_RUN's ingress).
fn three_balancers() -> (SecondChanceRing, BTreeSet<[u8; 6]>) {
    let ring = SecondChanceRing {
        ifindex: 1,
        first_ttl: 201,
        own_mac: OWN,
        next_mac: NEXT,
    };
    (ring, [NEXT, OTHER].into_iter().collect())
}

fn bring_lo_up() {
    let status = std::process::Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status()
        .expect("running ip");
    assert!(status.success(), "ip link set lo up");
}

#[test]
fn an_unplaceable_packet_goes_to_the_next_balancer_with_its_hop_budget() {
    if !require() {
        return;
    }
    std::thread::spawn(second_chance)
        .join()
        .expect("the second-chance test");
}

/// In a network namespace of its own: the services of [`chance_config`] synced into the
/// maps, the ring of [`three_balancers`] written, then `body` on them.
fn with_chance(body: impl FnOnce(&mut Ebpf, &Snapshot)) {
    own_network_namespace_with_forwarding();
    bring_lo_up();
    let config = config(&chance_config());
    let plane = XdpPlane::load(&config).unwrap_or_else(|e| panic!("{e:#}"));
    let snapshot = Snapshot::build(&config, &plane.counters()).expect("snapshot");
    let mut bpf = plane.ebpf().lock();
    KernelSync::default()
        .run(&mut bpf, &snapshot, true)
        .unwrap_or_else(|e| panic!("{e:#}"));
    write_ring(&mut bpf, Some(&three_balancers()), None).expect("writing the ring");
    body(&mut bpf, &snapshot);
    drop(bpf);
    plane.shutdown();
}

fn second_chance() {
    with_chance(second_chance_on);
}

fn second_chance_on(bpf: &mut Ebpf, snapshot: &Snapshot) {
    let xdp_index = snapshot.services[0].kernel_index;
    let proxy_index = snapshot.services[1].kernel_index;

    let vip: SocketAddr = "198.18.0.100:25".parse().expect("vip");
    let client: SocketAddr = "198.51.100.7:40000".parse().expect("client");
    // An xdp flow this host does not know, from the routers: on to the next balancer.
    let (action, out) = run(bpf, &frame(ROUTER, client, vip, ACK, 61));
    assert_eq!(action, XDP_TX, "unplaceable from the routers");
    assert_eq!(&out[0..6], &NEXT, "to the next balancer");
    assert_eq!(&out[6..12], &OWN, "from this interface");
    assert_eq!(ttl(&out), 201, "200 + listed peers - 2");
    assert_eq!(
        ones_sum(&out[14..34]),
        0xffff,
        "a correct IPv4 header checksum"
    );
    // From a peer with hops left: one less; with none: to the stack, unclaimed.
    let (action, out) = run(bpf, &frame(OTHER, client, vip, ACK, 201));
    assert_eq!((action, ttl(&out), &out[0..6]), (XDP_TX, 200, &NEXT[..]));
    assert_eq!(ones_sum(&out[14..34]), 0xffff);
    let last_hop = frame(OTHER, client, vip, ACK, 200);
    assert_eq!(run(bpf, &last_hop), (XDP_PASS, last_hop.clone()));
    assert_eq!(counted(bpf, xdp_index), (2, 0, 1));

    // A flow this host knows: followed as ever, TTL untouched, delivered when from a peer.
    let known: SocketAddr = "198.51.100.8:40001".parse().expect("client");
    add_flow(
        bpf,
        known,
        vip,
        snapshot.services[0].backends[0].active.slot() as u32,
        xdp_index,
    );
    let (_, out) = run(bpf, &frame(OTHER, known, vip, ACK, 201));
    assert_eq!(ttl(&out), 201, "a placed packet keeps its TTL");
    assert_ne!(&out[0..6], &NEXT, "not handed on");
    assert_eq!(counted(bpf, xdp_index), (2, 1, 1));

    // IPv6: the hop limit carries the budget.
    let vip6: SocketAddr = "[fd00::100]:25".parse().expect("vip");
    let client6: SocketAddr = "[2001:db8::7]:40000".parse().expect("client");
    let (action, out) = run(bpf, &frame(ROUTER, client6, vip6, ACK, 64));
    assert_eq!((action, ttl(&out), &out[0..6]), (XDP_TX, 201, &NEXT[..]));
    let (action, out) = run(bpf, &frame(OTHER, client6, vip6, ACK, 201));
    assert_eq!((action, ttl(&out)), (XDP_TX, 200));

    // A proxy VIP: a SYN and a packet of a local connection are the stack's; a packet of no
    // local connection (the listener's cookie check fails) goes on.
    let listener = TcpListener::bind(("127.0.0.1", PROXY_PORT)).expect("the proxy's listener");
    let connected = TcpStream::connect(("127.0.0.1", PROXY_PORT)).expect("a connection");
    let local = connected.local_addr().expect("its address");
    let proxy_vip: SocketAddr = (Ipv4Addr::LOCALHOST, PROXY_PORT).into();
    for packet in [
        frame(ROUTER, client, proxy_vip, SYN, 64),
        frame(ROUTER, local, proxy_vip, ACK, 64),
        frame(OTHER, local, proxy_vip, ACK, 201),
    ] {
        assert_eq!(run(bpf, &packet), (XDP_PASS, packet.clone()), "the stack's");
    }
    let (action, out) = run(bpf, &frame(ROUTER, client, proxy_vip, ACK, 64));
    assert_eq!((action, ttl(&out), &out[0..6]), (XDP_TX, 201, &NEXT[..]));
    assert_eq!(counted(bpf, proxy_index), (1, 1, 0));
    drop((listener, connected));

    // A proxy VIP over IPv6 alike.
    let listener = TcpListener::bind(("::1", PROXY_PORT)).expect("the proxy's IPv6 listener");
    let connected = TcpStream::connect(("::1", PROXY_PORT)).expect("an IPv6 connection");
    let local6 = connected.local_addr().expect("its address");
    let proxy_vip6: SocketAddr = (std::net::Ipv6Addr::LOCALHOST, PROXY_PORT).into();
    let packet = frame(OTHER, local6, proxy_vip6, ACK, 201);
    assert_eq!(run(bpf, &packet), (XDP_PASS, packet.clone()), "the stack's");
    let (action, out) = run(bpf, &frame(ROUTER, client6, proxy_vip6, ACK, 64));
    assert_eq!((action, ttl(&out), &out[0..6]), (XDP_TX, 201, &NEXT[..]));
    assert_eq!(counted(bpf, proxy_index), (2, 2, 0));
    drop((listener, connected));

    // A TTL that is a budget stays one whoever sent the frame: a peer this host does not know
    // yet (its MAC not resolved) gets no fresh budget, so no packet can go round in circles.
    let unknown_peer = [2, 0, 0, 0, 0, 0x77];
    let (action, out) = run(bpf, &frame(unknown_peer, client, vip, ACK, 201));
    assert_eq!(
        (action, ttl(&out)),
        (XDP_TX, 200),
        "one hop less, not a fresh budget"
    );
    let spent = frame(unknown_peer, client, vip, ACK, 200);
    assert_eq!(run(bpf, &spent), (XDP_PASS, spent.clone()), "no hop left");
    // A budget above this host's own (201 in a ring of three) is cut to it: a packet that
    // arrives with TTL 215 cannot go round the ring fifteen times.
    let (action, out) = run(bpf, &frame(ROUTER, client, vip, ACK, 215));
    assert_eq!(
        (action, ttl(&out)),
        (XDP_TX, 200),
        "at most this host's budget"
    );

    // No peers: the ring off, everything as before the second chance.
    write_ring(bpf, None, Some(&three_balancers())).expect("clearing the ring");
    for packet in [
        frame(ROUTER, client, vip, ACK, 61),
        frame(OTHER, client, vip, ACK, 201),
        frame(ROUTER, client6, vip6, ACK, 64),
        frame(ROUTER, client, proxy_vip, ACK, 64),
    ] {
        assert_eq!(run(bpf, &packet), (XDP_PASS, packet.clone()));
    }
}

/// Mean ns per run of `frame`, over `repeat` runs in one call.
fn cost(bpf: &Ebpf, program: &str, frame: &[u8], repeat: u32) -> f64 {
    let program: &Xdp = bpf
        .program(program)
        .expect("the program")
        .try_into()
        .expect("an XDP program");
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(frame),
            repeat,
            ..TestRunOptions::default()
        })
        .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN: {e}"));
    result.duration.as_nanos() as f64
}

/// What a proxy VIP's non-SYN costs in the kernel with `peers` set (the socket lookup),
/// beside the pass-everything floor and a packet for no VIP; printed, not asserted (a
/// shared machine's timings are no test). Median of 5 calls of 10^5 runs each.
#[test]
#[ignore = "a measurement: cargo test -p switchyard --lib proxy_vip_packet_cost -- --ignored --nocapture"]
fn proxy_vip_packet_cost() {
    if !require() {
        return;
    }
    std::thread::spawn(|| with_chance(print_costs))
        .join()
        .expect("the measurement");
}

fn print_costs(bpf: &mut Ebpf, _: &Snapshot) {
    let pass: &mut Xdp = bpf
        .program_mut(programs::PASS)
        .expect("the pass program")
        .try_into()
        .expect("an XDP program");
    pass.load().expect("loading the pass program");
    let _listener = TcpListener::bind(("127.0.0.1", PROXY_PORT)).expect("the proxy's listener");
    let connected = TcpStream::connect(("127.0.0.1", PROXY_PORT)).expect("a connection");
    let local = connected.local_addr().expect("its address");
    let proxy_vip: SocketAddr = (Ipv4Addr::LOCALHOST, PROXY_PORT).into();
    let client: SocketAddr = "198.51.100.7:40000".parse().expect("client");
    let not_vip: SocketAddr = "198.18.9.9:25".parse().expect("address");
    let cases = [
        (
            "floor: XDP_PASS at once",
            programs::PASS,
            frame(ROUTER, client, not_vip, ACK, 64),
        ),
        (
            "not for a VIP",
            programs::BALANCE,
            frame(ROUTER, client, not_vip, ACK, 64),
        ),
        (
            "proxy VIP, SYN",
            programs::BALANCE,
            frame(ROUTER, client, proxy_vip, SYN, 64),
        ),
        (
            "proxy VIP, ACK of a local connection",
            programs::BALANCE,
            frame(ROUTER, local, proxy_vip, ACK, 64),
        ),
        (
            "proxy VIP, ACK of no local connection (handed on)",
            programs::BALANCE,
            frame(ROUTER, client, proxy_vip, ACK, 64),
        ),
    ];
    for (what, program, packet) in cases {
        let mut runs: Vec<f64> = (0..5)
            .map(|_| cost(bpf, program, &packet, 100_000))
            .collect();
        runs.sort_by(f64::total_cmp);
        println!("{what}: {:.0} ns", runs[2]);
    }
}

/// An established flow of `client` to `vip` on backend `slot` of service `index`.
fn add_flow(bpf: &mut Ebpf, client: SocketAddr, vip: SocketAddr, slot: u32, index: u32) {
    let (SocketAddr::V4(c), SocketAddr::V4(v)) = (client, vip) else {
        panic!("IPv4 flows only here");
    };
    let key = FlowKey {
        src_addr: u32::from_ne_bytes(c.ip().octets()),
        dst_addr: u32::from_ne_bytes(v.ip().octets()),
        src_port: c.port().to_be(),
        dst_port: v.port().to_be(),
        proto: PROTO_TCP,
        _pad: [0; 3],
    };
    let mut now = nix::libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { nix::libc::clock_gettime(nix::libc::CLOCK_MONOTONIC_COARSE, &mut now) };
    let now = now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64;
    let value = FlowValue {
        backend: slot,
        service: index,
        last_seen_ns: now,
        flags: flow_flags::COUNTED | flow_flags::ESTABLISHED,
        created_ns: now,
        packets: 0,
    };
    let mut flows: HashMap<_, FlowKey, FlowValue> =
        HashMap::try_from(bpf.map_mut(names::FLOWS).expect("FLOWS")).expect("a hash map");
    flows.insert(key, value, 0).expect("writing the flow");
}

fn ip(args: &[&str]) {
    let status = std::process::Command::new("ip")
        .args(args)
        .status()
        .expect("running ip");
    assert!(status.success(), "ip {}", args.join(" "));
}

/// A proxy-only balancer's config with `peers` on `sy-ring0`.
fn ring_config(peers: &[&str]) -> String {
    let peers: Vec<String> = peers.iter().map(|p| format!("\"{p}\"")).collect();
    let table = if peers.is_empty() {
        String::new()
    } else {
        format!("peers = [{}]\ninterface = \"sy-ring0\"\n", peers.join(", "))
    };
    format!(
        "[announce]\nbird_socket = \"/run/bird/bird.ctl\"\n{table}\
         [[service]]\nname = \"sy-ring\"\nlisten = \"10.9.0.2:2525\"\nannounce = true\n\
         [[service.backend]]\nname = \"m\"\naddress = \"198.18.1.12:25\"\n"
    )
}

fn written_ring(bpf: &Ebpf) -> (SecondChanceRing, BTreeSet<[u8; 6]>) {
    let ring: aya::maps::Array<_, SecondChanceRing> =
        aya::maps::Array::try_from(bpf.map(names::SECOND_CHANCE).expect("SECOND_CHANCE"))
            .expect("an array");
    let macs: HashMap<_, PeerMac, u32> =
        HashMap::try_from(bpf.map(names::PEER_MACS).expect("PEER_MACS")).expect("a hash map");
    let macs = macs.keys().map(|k| k.expect("a key").mac).collect();
    (ring.get(&0, 0).expect("the ring"), macs)
}

fn local_entry(bpf: &Ebpf) -> Option<ServiceValue> {
    let services: HashMap<_, ServiceKey, ServiceValue> =
        HashMap::try_from(bpf.map(names::SERVICES).expect("SERVICES")).expect("a hash map");
    let key = ServiceKey {
        addr: u32::from_ne_bytes([10, 9, 0, 2]),
        port: 2525u16.to_be(),
        proto: PROTO_TCP,
        _pad: 0,
    };
    services.get(&key, 0).ok()
}

#[test]
fn the_ring_is_written_from_the_peers_and_the_neighbour_table() {
    if !require() {
        return;
    }
    std::thread::spawn(ring_on_a_veth)
        .join()
        .expect("the ring test");
}

fn ring_on_a_veth() {
    own_network_namespace_with_forwarding();
    ip(&[
        "link", "add", "sy-ring0", "type", "veth", "peer", "name", "sy-ring1",
    ]);
    ip(&["link", "set", "sy-ring0", "address", "02:00:00:00:00:21"]);
    ip(&["link", "set", "sy-ring0", "up"]);
    ip(&["link", "set", "sy-ring1", "up"]);
    ip(&["addr", "add", "10.9.0.2/24", "dev", "sy-ring0"]);
    for (peer, mac) in [
        ("10.9.0.3", "02:00:00:00:00:23"),
        ("10.9.0.4", "02:00:00:00:00:24"),
    ] {
        ip(&[
            "neigh",
            "replace",
            peer,
            "lladdr",
            mac,
            "dev",
            "sy-ring0",
            "nud",
            "permanent",
        ]);
    }
    // The other peers' switchyards answer the heartbeat (their addresses local here, on the
    // veth's other end); 10.9.0.1 has no switchyard either.
    ip(&["link", "set", "lo", "up"]);
    let mut responders = Vec::new();
    for peer in ["10.9.0.3", "10.9.0.4"] {
        ip(&["addr", "add", &format!("{peer}/32"), "dev", "sy-ring1"]);
        let address = SocketAddr::new(peer.parse().expect("address"), 9027);
        responders.push(Responder::start(address).expect("a peer's heartbeat"));
    }
    let ifindex = super::netdev::ifindex("sy-ring0").expect("its index");
    // Written out of order; 10.9.0.1 never answers ARP (nothing has it).
    let all = config(&ring_config(&[
        "10.9.0.4", "10.9.0.1", "10.9.0.2", "10.9.0.3",
    ]));
    let plane = XdpPlane::load(&all).unwrap_or_else(|e| panic!("{e:#}"));
    let mut bpf = plane.ebpf().lock();
    let mut sync = KernelSync::default();
    let mut sync_to = |bpf: &mut Ebpf, text: &str, first: bool| {
        let snapshot = Snapshot::build(&config(text), &plane.counters()).expect("snapshot");
        sync.run(bpf, &snapshot, first)
            .unwrap_or_else(|e| panic!("{e:#}"));
    };
    sync_to(
        &mut bpf,
        &ring_config(&["10.9.0.4", "10.9.0.1", "10.9.0.2", "10.9.0.3"]),
        true,
    );
    let (ring, macs) = written_ring(&bpf);
    let expected = SecondChanceRing {
        ifindex,
        // Four listed, 10.9.0.1 among them: the budget counts it (see `ring_now`).
        first_ttl: 202,
        own_mac: OWN,
        next_mac: [2, 0, 0, 0, 0, 0x23],
    };
    assert_eq!(
        ring, expected,
        "after 10.9.0.2 comes 10.9.0.3; 10.9.0.1 is skipped"
    );
    assert_eq!(macs, [[2, 0, 0, 0, 0, 0x23], [2, 0, 0, 0, 0, 0x24]].into());
    let local = local_entry(&bpf).expect("the proxy VIP known to the kernel");
    assert_eq!(
        (local.forwarding, local.flags),
        (forwarding::LOCAL, service_flags::SECOND_CHANCE)
    );

    // A reload takes 10.9.0.3 out: the next is 10.9.0.4, three balancers listed.
    sync_to(
        &mut bpf,
        &ring_config(&["10.9.0.4", "10.9.0.1", "10.9.0.2"]),
        false,
    );
    let (ring, macs) = written_ring(&bpf);
    assert_eq!(
        (ring.next_mac, ring.first_ttl),
        ([2, 0, 0, 0, 0, 0x24], 201)
    );
    assert_eq!(macs, [[2, 0, 0, 0, 0, 0x24]].into());

    // 10.9.0.4's switchyard stops; its MAC stays known: once its answers are older than
    // ALIVE_FOR it is out of the ring, and nothing is left to hand on to.
    responders.clear();
    let stopped = std::time::Instant::now();
    let three = ring_config(&["10.9.0.4", "10.9.0.1", "10.9.0.2"]);
    while written_ring(&bpf).0.first_ttl != 0 {
        assert!(
            stopped.elapsed() < ALIVE_FOR + Duration::from_secs(2),
            "a silent peer stayed in the ring"
        );
        std::thread::sleep(Duration::from_millis(200));
        sync_to(&mut bpf, &three, false);
    }
    assert!(stopped.elapsed() >= ALIVE_FOR - Duration::from_millis(300));
    assert_eq!(written_ring(&bpf).1.len(), 0);

    // And one without peers turns it off.
    sync_to(&mut bpf, &ring_config(&[]), false);
    let (ring, macs) = written_ring(&bpf);
    assert_eq!((ring, macs.len()), (SecondChanceRing::default(), 0));
    assert_eq!(local_entry(&bpf), None, "the proxy VIP's entry removed");
    drop(bpf);
    plane.shutdown();
}
