//! The kernel fast path end to end: the real `switchyard` binary loads its XDP program in a
//! balancer namespace, and real SMTP sessions from a client namespace reach real SMTP servers
//! in three backend namespaces, in `dsr` and in `nat` forwarding.
//!
//! Needs root, BTF and a binary built with the eBPF toolchain. Without them each test prints a
//! loud SKIP, unless SWITCHYARD_REQUIRE_XDP=1 (CI), which turns a skip into a failure. The
//! verifier-load check itself also runs as a unit test of the binary (`xdp::tests`).

#[path = "support/netns.rs"]
mod netns;

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::process::Command;
use std::time::{Duration, Instant};

use netns::{Layout, Netns, Plan, PrivateBpffs, SMTP_PORT, SmtpServer, Topology, VIP};
use testkit::config_toml::ServiceToml;
use testkit::harness::{Launch, Switchyard};
use testkit::smtp_client::{
    HeldSession, Session, SessionOptions, TEST_MESSAGE, Trace, smtp_session_blocking,
};

/// The binary under test.
const BIN: &str = env!("CARGO_BIN_EXE_switchyard");

/// Starts switchyard in `ns` and waits until it has logged `ready`.
fn start_switchyard(ns: &Netns, config: &str, ready: &str) -> Switchyard {
    Launch::new(BIN)
        .ready_when_logged(ready)
        .start_in(ns, config)
}

/// [`start_switchyard`] with `bpffs` as its /sys/fs/bpf (for `pin = true`).
fn start_switchyard_with_bpffs(
    ns: &Netns,
    config: &str,
    bpffs: &PrivateBpffs,
    ready: &str,
) -> Switchyard {
    Launch::new(BIN)
        .ready_when_logged(ready)
        .start_in_with_bpffs(ns, bpffs, config)
}

/// One SMTP session to `target` from the calling thread's namespace, held `hold` before QUIT;
/// the backend that greeted.
fn smtp_session(target: SocketAddrV4, hold: Duration) -> anyhow::Result<String> {
    let options = SessionOptions {
        hold,
        ..SessionOptions::default()
    };
    smtp_session_blocking(target.into(), &options)
}

/// One SMTP session to `target` from local port `port` (bound with SO_REUSEADDR, so a port
/// whose connection just ended can be used again), held `hold` before QUIT; the backend that
/// greeted.
fn session_from_port(
    target: impl Into<SocketAddr>,
    port: u16,
    hold: Duration,
) -> anyhow::Result<String> {
    let options = SessionOptions {
        source_port: port,
        hold,
        ..SessionOptions::default()
    };
    smtp_session_blocking(target.into(), &options)
}

/// A session from local port `port` to `target` that the backend ends with a RST: after QUIT
/// the server closes its socket, and data sent into it then is answered with a reset. The
/// client itself never sends FIN or RST. Returns the backend that greeted.
fn session_reset_by_backend(target: SocketAddrV4, port: u16) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let options = SessionOptions {
            source_port: port,
            ..SessionOptions::default()
        };
        let mut session = Session::open(target.into(), &options).await?;
        session
            .transaction(&options, TEST_MESSAGE, &mut Trace::default())
            .await?;
        session.quit().await?;
        let limit = Duration::from_secs(5);
        let stream = session.stream();
        let mut rest = [0u8; 64];
        let n = tokio::time::timeout(limit, stream.read(&mut rest)).await??;
        anyhow::ensure!(n == 0, "the server sent more after 221");
        // Reads end at the FIN for good: the reset shows as the error of a later write, EPIPE
        // since the socket was in CLOSE_WAIT (the client never shut its side down).
        let deadline = std::time::Instant::now() + limit;
        loop {
            match stream.write_all(b"NOOP\r\n").await {
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => break,
                Err(e) => anyhow::bail!("expected the backend's reset, got {e}"),
                Ok(()) => {}
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "no reset from the backend"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(session.backend.clone())
    })
}

/// Whether the binary embeds the XDP object: build.rs sets this cfg for every target of the
/// package when it built the object.
fn object_built() -> bool {
    cfg!(switchyard_xdp)
}

fn ready_line(topo: &Topology) -> String {
    format!("XDP program attached to {}", topo.lb_interface)
}

fn vip() -> SocketAddrV4 {
    SocketAddrV4::new(VIP, SMTP_PORT)
}

/// Runs `count` sessions in parallel from the client namespace, each held `hold`; returns
/// each session's result.
fn sessions(topo: &Topology, count: usize, hold: Duration) -> Vec<anyhow::Result<String>> {
    sessions_to(topo, vip().into(), count, hold)
}

/// [`sessions`] to `target`.
fn sessions_to(
    topo: &Topology,
    target: SocketAddr,
    count: usize,
    hold: Duration,
) -> Vec<anyhow::Result<String>> {
    topo.client
        .run(move || parallel_sessions_to(target, count, hold))
}

/// Which IP version a test's sessions use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn vip(self) -> SocketAddr {
        match self {
            Family::V4 => vip().into(),
            Family::V6 => SocketAddrV6::new(netns::VIP6, SMTP_PORT, 0, 0).into(),
        }
    }

    fn client(self) -> IpAddr {
        match self {
            Family::V4 => netns::CLIENT.into(),
            Family::V6 => netns::CLIENT6.into(),
        }
    }

    /// The sysctl that turns forwarding of this IP version on for every interface.
    fn forwarding_sysctl(self) -> &'static str {
        match self {
            Family::V4 => "net.ipv4.ip_forward",
            Family::V6 => "net.ipv6.conf.all.forwarding",
        }
    }
}

/// `count` sessions to the VIP in parallel from the calling thread's namespace, each held
/// `hold`; each session's result.
fn parallel_sessions(count: usize, hold: Duration) -> Vec<anyhow::Result<String>> {
    parallel_sessions_to(vip().into(), count, hold)
}

/// [`parallel_sessions`] to `target`.
fn parallel_sessions_to(
    target: SocketAddr,
    count: usize,
    hold: Duration,
) -> Vec<anyhow::Result<String>> {
    let options = SessionOptions {
        hold,
        ..SessionOptions::default()
    };
    let workers: Vec<_> = (0..count)
        .map(|_| {
            let options = options.clone();
            std::thread::spawn(move || smtp_session_blocking(target, &options))
        })
        .collect();
    workers
        .into_iter()
        .map(|w| {
            w.join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("client panicked")))
        })
        .collect()
}

/// The XDP program's shared active counts, read from the kernel.
fn active_counts(topo: &Topology) -> Vec<u64> {
    let map = attached_map(topo, "ACTIVE");
    let array: aya::maps::Array<_, u64> = aya::maps::Array::try_from(map).expect("u64 array");
    array.iter().map(|v| v.expect("read ACTIVE")).collect()
}

/// Map `name` of the program attached to the balancer's interface (found through
/// `ip -d link`).
fn attached_map(topo: &Topology, name: &str) -> aya::maps::Map {
    let out = Command::new("ip")
        .args([
            "-n",
            &topo.balancer.name,
            "-d",
            "link",
            "show",
            topo.lb_interface,
        ])
        .output()
        .expect("ip link show");
    let text = String::from_utf8_lossy(&out.stdout);
    let prog_id: u32 = text
        .split("prog/xdp id ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|id| id.parse().ok())
        .unwrap_or_else(|| panic!("no XDP program on {}: {text}", topo.lb_interface));
    let program = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .find(|p| p.id() == prog_id)
        .unwrap_or_else(|| panic!("program {prog_id} not loaded"));
    let map_ids = program.map_ids().expect("map ids").unwrap_or_default();
    for id in map_ids {
        let Ok(info) = aya::maps::MapInfo::from_id(id) else {
            continue;
        };
        if info.name_as_str() != Some(name) {
            continue;
        }
        let data = aya::maps::MapData::from_id(id).unwrap_or_else(|e| panic!("open {name}: {e}"));
        return aya::maps::Map::from_map_data(data).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    panic!("{name} map not found among program {prog_id}'s maps");
}

/// The test network with an SMTP server in every backend namespace. Field order is drop order:
/// the servers stop before the namespaces go.
struct Network {
    servers: Vec<SmtpServer>,
    topo: Topology,
    /// The `[service.xdp] mode` its configs ask for (`None`: the default, auto).
    mode: Option<&'static str>,
}

impl std::ops::Deref for Network {
    type Target = Topology;

    fn deref(&self) -> &Topology {
        &self.topo
    }
}

impl Network {
    /// Switchyard in the balancer namespace, ready once its program is attached.
    fn start(&self, config: &str) -> Switchyard {
        start_switchyard(&self.balancer, config, &ready_line(self))
    }

    /// [`Network::service_toml`] listening on the IPv6 VIP (dsr: too; nat, which serves one
    /// VIP: instead), with the backends at their IPv6 addresses (health checks, and dsr's MACs,
    /// over IPv6).
    fn ipv6_service_toml(&self, name: &str, algorithm: &str) -> String {
        let vip6 = format!("\"[{}]:{SMTP_PORT}\"", netns::VIP6);
        let listen = match self.layout {
            Layout::Dsr => format!("[\"{VIP}:{SMTP_PORT}\", {vip6}]"),
            Layout::Nat => vip6,
        };
        let mut text = self.service_toml(name, algorithm).replace(
            &format!("listen = \"{VIP}:{SMTP_PORT}\""),
            &format!("listen = {listen}"),
        );
        for i in 0..self.backends.len() {
            text = text.replace(
                &format!("address = \"{}:{SMTP_PORT}\"", self.backend_addr(i)),
                &format!("address = \"[{}]:{SMTP_PORT}\"", self.backend_addr6(i)),
            );
        }
        text
    }

    /// A least_conn service through the VIP of `family`.
    fn family_service_toml(&self, name: &str, family: Family) -> String {
        match family {
            Family::V4 => self.service_toml(name, "least_conn"),
            Family::V6 => self.ipv6_service_toml(name, "least_conn"),
        }
    }

    /// The `[[service]]` table for this network (health checks every 500 ms, fall 2).
    fn service_toml(&self, name: &str, algorithm: &str) -> String {
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
        if let Some(mode) = self.mode {
            text.push_str(&format!("mode = \"{mode}\"\n"));
        }
        for i in 0..self.backends.len() {
            text.push_str(&format!(
                "\n[[service.backend]]\nname = \"mta{}\"\naddress = \"{}:{SMTP_PORT}\"\n",
                i + 1,
                self.backend_addr(i)
            ));
        }
        text
    }
}

/// The prepared network of `layout` (pass programs on the peers, complete checksums), whose
/// configs ask for native mode so that the native path stays tested; see [`running`].
fn running_topology(layout: Layout) -> Option<(Network, String)> {
    running(&Plan::tests(layout, 3), Some("native"))
}

/// Which network a test runs on: the prepared one (native mode), or the one a user has.
#[derive(Clone, Copy, Debug)]
enum Net {
    Prepared,
    /// Default veth offloads, nothing on any peer, `mode = "auto"` (generic on veth). nat
    /// gets IPv4 and IPv6 forwarding on the balancer, as its refusal tells an operator to do.
    Plain,
}

fn running_on(net: Net, layout: Layout) -> Option<(Network, String)> {
    match net {
        Net::Prepared => running_topology(layout),
        Net::Plain => {
            let running = running(&Plan::plain(layout, 3), None)?;
            if layout == Layout::Nat {
                for family in [Family::V4, Family::V6] {
                    running
                        .0
                        .balancer
                        .sysctl(family.forwarding_sysctl(), "1")
                        .expect("forwarding on");
                }
            }
            Some(running)
        }
    }
}

/// The network of `plan` with its three SMTP backends running, configs asking for `mode`, and
/// a service name unique to it; `None` (after a loud SKIP) where the kernel path cannot be
/// tested.
fn running(plan: &Plan, mode: Option<&'static str>) -> Option<(Network, String)> {
    if !netns::require_xdp(object_built()) {
        return None;
    }
    let topo = Topology::build(plan).expect("the test network");
    let servers = netns::start_servers(&topo);
    let name = format!("sy-{}", topo.suffix);
    Some((
        Network {
            servers,
            topo,
            mode,
        },
        name,
    ))
}

/// Runs switchyard with `config` in `ns` until it exits by itself (a refusal to start): its
/// exit status and stderr. One that is still running after 20 s is killed and fails the test.
fn run_to_exit(ns: &Netns, config: &str) -> (std::process::ExitStatus, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("switchyard.toml");
    std::fs::write(&path, config).expect("write config");
    let stderr_path = dir.path().join("stderr.log");
    let stderr = std::fs::File::create(&stderr_path).expect("stderr file");
    let mut child = ns
        .command(BIN)
        .arg("run")
        .arg("--config")
        .arg(&path)
        .stdout(std::process::Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("spawn switchyard");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "switchyard did not refuse to start: {}",
                std::fs::read_to_string(&stderr_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (
        status,
        std::fs::read_to_string(&stderr_path).expect("read stderr"),
    )
}

/// `config` with `pin = true` in its `[service.xdp]` table.
fn pinned(config: String) -> String {
    config.replace(
        "flow_idle_timeout = \"5m\"\n",
        "flow_idle_timeout = \"5m\"\npin = true\n",
    )
}

/// Switchyard with the least_conn service `name` pinning its maps (`pin = true`) in a private
/// bpffs as its /sys/fs/bpf (parallel tests must not share one): the bpffs and the config for
/// the restarts, and the first process.
fn start_pinned(topo: &Network, name: &str) -> (PrivateBpffs, String, Switchyard) {
    let bpffs = netns::PrivateBpffs::new().expect("a private bpffs");
    let config = pinned(topo.service_toml(name, "least_conn"));
    assert!(config.contains("pin = true"));
    let first = start_switchyard_with_bpffs(&topo.balancer, &config, &bpffs, &ready_line(topo));
    (bpffs, config, first)
}

/// Opens a session from the client namespace to `target`, reads its 220 greeting, and hands
/// the open connection back so the test decides when (and whether) it ends.
fn hold_session(topo: &Topology, target: SocketAddrV4) -> std::net::TcpStream {
    hold_greeted_session(topo, target).0
}

/// [`hold_session`], with the name of the backend that greeted (the greeting's second word).
fn hold_greeted_session(topo: &Topology, target: SocketAddrV4) -> (std::net::TcpStream, String) {
    topo.client.run(move || {
        let stream = std::net::TcpStream::connect_timeout(
            &std::net::SocketAddr::V4(target),
            Duration::from_secs(5),
        )
        .expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut greeting = [0u8; 64];
        let n = std::io::Read::read(&mut &stream, &mut greeting).expect("greeting");
        assert!(
            greeting[..n].starts_with(b"220 "),
            "greeting {:?}",
            String::from_utf8_lossy(&greeting[..n])
        );
        let backend = String::from_utf8_lossy(&greeting[..n])
            .split_whitespace()
            .nth(1)
            .unwrap_or_default()
            .to_owned();
        (stream, backend)
    })
}

fn wait_for(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether the first slots hold `expected` and the rest (room for backends reloads add) 0.
fn counts_are(topo: &Topology, expected: &[u64]) -> bool {
    let counts = active_counts(topo);
    counts.len() >= expected.len()
        && counts[..expected.len()] == *expected
        && counts[expected.len()..].iter().all(|&c| c == 0)
}

/// Every flow has ended: the kernel's shared active counts are back to 0.
fn wait_for_counts_back_to_zero(topo: &Topology) {
    wait_for("active counts back to 0", Duration::from_secs(5), || {
        active_counts(topo).iter().all(|&c| c == 0)
    });
}

/// dsr learns the backends' MACs first: until then (logged per backend) they take no flows.
fn wait_for_every_backend_to_take_flows(sy: &Switchyard) {
    wait_for(
        "every backend to take flows",
        Duration::from_secs(5),
        || sy.stderr_text().matches("backend takes new flows").count() == 3,
    );
}

/// Sessions through the VIP of `topo` complete, keep the client address and spread; the
/// program ran in `expected_mode` on every interface (from the totals).
fn sessions_complete_spread_and_keep_the_client_address(
    topo: &Network,
    name: &str,
    expected_mode: &str,
) {
    sessions_complete_spread_and_keep_the_client_address_over(
        topo,
        name,
        expected_mode,
        Family::V4,
    );
}

/// [`sessions_complete_spread_and_keep_the_client_address`] through the VIP of `family`; for
/// IPv6 the service listens on the IPv6 VIP (dsr: on both) and knows its backends by their
/// IPv6 addresses.
fn sessions_complete_spread_and_keep_the_client_address_over(
    topo: &Network,
    name: &str,
    expected_mode: &str,
    family: Family,
) {
    let layout = topo.layout;
    let config = topo.family_service_toml(name, family);
    let mut sy = topo.start(&config);
    if layout == Layout::Dsr {
        // dsr learns the backends' MACs first (SYNs before that are dropped, and retried).
        wait_for_every_backend_to_take_flows(&sy);
    }

    // Long-lived sessions: least_conn must spread them evenly (3 each).
    let results = sessions_to(topo, family.vip(), 9, Duration::from_millis(1500));
    let failures: Vec<_> = results.iter().filter(|r| r.is_err()).collect();
    assert!(
        failures.is_empty(),
        "{layout:?} {family:?}: failed sessions {failures:?}\n{}",
        sy.stderr_text()
    );
    let own: [IpAddr; 6] = [
        netns::CLIENT.into(),
        netns::BALANCER.into(),
        netns::BALANCER_INSIDE.into(),
        netns::CLIENT6.into(),
        netns::BALANCER6.into(),
        netns::BALANCER_INSIDE6.into(),
    ];
    for backend in &topo.servers {
        // Every connection a backend got from outside came from the real client address.
        let from_client = backend.sessions_from(family.client());
        assert_eq!(
            from_client,
            3,
            "{layout:?} {family:?}: {} got {from_client} of 9 long sessions: least_conn should spread 3/3/3",
            backend.name()
        );
        for peer in backend.peers() {
            assert!(
                own.contains(&peer.ip()),
                "{layout:?} {family:?}: {} saw {peer}: not the client's own address",
                backend.name()
            );
        }
        // The server counts a session after its 221 is sent: allow it a moment.
        wait_for(
            &format!("{layout:?}: 3 sessions completed at {}", backend.name()),
            Duration::from_secs(3),
            || backend.sessions_completed() == 3,
        );
    }
    // Every flow ended with the client's FIN: the shared counts are back to 0.
    wait_for_counts_back_to_zero(topo);
    let status = sy.terminate();
    assert!(
        status.success(),
        "switchyard exit: {status}\n{}",
        sy.stderr_text()
    );
    // The kernel's traffic counters in the shutdown totals: 3 new flows per backend, with
    // their packets and bytes, and the service's forwarded packets.
    let totals = sy.totals();
    let mut interfaces = vec![topo.lb_interface];
    if layout == Layout::Nat {
        interfaces.push(topo.lb_backend_interface);
    }
    let attached: Vec<(&str, &str)> = totals
        .xdp_attachments
        .iter()
        .map(|a| (a.interface.as_str(), a.mode.as_str()))
        .collect();
    let expected: Vec<(&str, &str)> = interfaces.iter().map(|i| (*i, expected_mode)).collect();
    assert_eq!(attached, expected, "{:?}", totals.xdp_attachments);
    for backend in &topo.servers {
        let counted = totals
            .backend(name, backend.name())
            .unwrap_or_else(|| panic!("{layout:?}: no totals for {}: {totals:?}", backend.name()));
        assert_eq!((counted.active, counted.assigned), (0, 0), "{counted:?}");
        let kernel = counted
            .kernel
            .unwrap_or_else(|| panic!("{layout:?}: no kernel counters: {counted:?}"));
        assert_eq!(kernel.new_flows, 3, "{counted:?}");
        // At least SYN, ACK, 6 commands with the message, FIN: client to VIP, per session.
        assert!(kernel.packets >= 3 * 8, "{counted:?}");
        assert!(kernel.bytes > kernel.packets * 54, "{counted:?}");
    }
    let service = totals
        .services
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("{layout:?}: no service totals: {totals:?}"));
    let kernel = service
        .kernel
        .unwrap_or_else(|| panic!("{layout:?}: no kernel service counters: {service:?}"));
    assert_eq!((kernel.dropped, kernel.no_backend), (0, 0), "{kernel:?}");
}

#[test]
fn dsr_sessions_complete_spread_and_keep_the_client_address() {
    if let Some((topo, name)) = running_topology(Layout::Dsr) {
        sessions_complete_spread_and_keep_the_client_address(&topo, &name, "native");
    }
}

/// [`sessions_complete_spread_and_keep_the_client_address_over`] IPv6 on `network` (from
/// [`running`]), the program expected in `expected_mode`.
fn ipv6_sessions_complete(network: Option<(Network, String)>, expected_mode: &str) {
    if let Some((topo, name)) = network {
        sessions_complete_spread_and_keep_the_client_address_over(
            &topo,
            &name,
            expected_mode,
            Family::V6,
        );
    }
}

#[test]
fn dsr_ipv6_sessions_complete_spread_and_keep_the_client_address() {
    ipv6_sessions_complete(running_topology(Layout::Dsr), "native");
}

#[test]
fn plain_topology_dsr_ipv6_in_auto_mode_runs_generic_and_sessions_complete() {
    ipv6_sessions_complete(running(&Plan::plain(Layout::Dsr, 3), None), "generic");
}

#[test]
fn nat_sessions_complete_spread_and_keep_the_client_address() {
    if let Some((topo, name)) = running_topology(Layout::Nat) {
        sessions_complete_spread_and_keep_the_client_address(&topo, &name, "native");
    }
}

#[test]
fn nat_ipv6_sessions_complete_spread_and_keep_the_client_address() {
    ipv6_sessions_complete(running_topology(Layout::Nat), "native");
}

#[test]
fn plain_topology_nat_ipv6_refuses_without_forwarding_then_sessions_complete_in_auto_mode() {
    nat_refuses_without_forwarding_then_sessions_complete(
        Family::V6,
        &[
            "net.ipv6.conf.all.forwarding",
            "net.ipv6.conf.eth0.forwarding",
            "net.ipv6.conf.eth1.forwarding",
            "net.ipv6.conf.all.forwarding=1",
        ],
    );
}

#[test]
fn plain_topology_dsr_in_auto_mode_runs_generic_and_sessions_complete() {
    if let Some((topo, name)) = running(&Plan::plain(Layout::Dsr, 3), None) {
        sessions_complete_spread_and_keep_the_client_address(&topo, &name, "generic");
    }
}

#[test]
fn plain_topology_nat_refuses_without_forwarding_then_sessions_complete_in_auto_mode() {
    nat_refuses_without_forwarding_then_sessions_complete(
        Family::V4,
        &[
            "net.ipv4.conf.eth0.forwarding",
            "net.ipv4.conf.eth1.forwarding",
            "net.ipv4.ip_forward=1",
        ],
    );
}

/// nat of `family` on the plain topology: without forwarding the clear refusal, naming each
/// of `sysctls` (and none of the other IP version's), nothing attached; then, with what it
/// says to set, sessions complete in generic mode.
fn nat_refuses_without_forwarding_then_sessions_complete(family: Family, sysctls: &[&str]) {
    let Some((topo, name)) = running(&Plan::plain(Layout::Nat, 3), None) else {
        return;
    };
    let (status, stderr) = run_to_exit(&topo.balancer, &topo.family_service_toml(&name, family));
    assert_eq!(status.code(), Some(1), "must refuse: {stderr}");
    for sysctl in sysctls {
        assert!(
            stderr.contains(sysctl),
            "the refusal names {sysctl}: {stderr}"
        );
    }
    let other = match family {
        Family::V4 => "net.ipv6",
        Family::V6 => "net.ipv4",
    };
    assert!(
        !stderr.contains(other),
        "{family:?} nat needs no {other} forwarding: {stderr}"
    );
    assert!(
        !stderr.contains("XDP program attached"),
        "nothing attached: {stderr}"
    );
    // What the refusal says to do.
    topo.balancer
        .sysctl(family.forwarding_sysctl(), "1")
        .expect("forwarding on");
    sessions_complete_spread_and_keep_the_client_address_over(&topo, &name, "generic", family);
}

/// Local senders on veths leave only a partial checksum (the pseudo-header seed) in the frames;
/// nat rewrites the destination, so the seed must move with it for whoever completes the
/// checksum later. Here the bridge's ports to the backends have no checksum offload, so the
/// bridge completes them in software, as a physical NIC would in hardware: a wrong seed would
/// make every segment arrive with a bad checksum, and no session would complete.
#[test]
fn nat_keeps_partial_checksums_right_for_a_device_that_completes_them() {
    partial_checksums_stay_right_for_a_device_that_completes_them(Family::V4);
}

/// The same over IPv6, whose pseudo-header sums the 128-bit addresses.
#[test]
fn nat_ipv6_keeps_partial_checksums_right_for_a_device_that_completes_them() {
    partial_checksums_stay_right_for_a_device_that_completes_them(Family::V6);
}

fn partial_checksums_stay_right_for_a_device_that_completes_them(family: Family) {
    let Some((topo, name)) = running(&Plan::plain(Layout::Nat, 3), None) else {
        return;
    };
    topo.balancer
        .sysctl(family.forwarding_sysctl(), "1")
        .expect("forwarding on");
    for i in 0..topo.backends.len() {
        topo.switch
            .disable_tx_checksum(&format!("pb{i}"))
            .expect("no checksum offload on the backend's bridge port");
    }
    sessions_complete_spread_and_keep_the_client_address_over(&topo, &name, "generic", family);
}

#[test]
fn native_mode_on_a_plain_veth_refuses_and_says_what_native_needs() {
    let Some((topo, name)) = running(&Plan::plain(Layout::Dsr, 1), Some("native")) else {
        return;
    };
    let (status, stderr) = run_to_exit(&topo.balancer, &topo.service_toml(&name, "least_conn"));
    assert_eq!(status.code(), Some(1), "must refuse: {stderr}");
    assert!(
        stderr.contains("mode = \"native\" cannot forward here")
            && stderr.contains("peer runs no XDP program")
            && stderr.contains("mode = \"auto\""),
        "the refusal explains native mode's needs and the way out: {stderr}"
    );
    let link = Command::new("ip")
        .args(["-n", &topo.balancer.name, "-d", "link", "show", "eth0"])
        .output()
        .expect("ip");
    assert!(
        !String::from_utf8_lossy(&link.stdout).contains("prog/xdp"),
        "nothing left attached"
    );
}

/// After a nat session from client port P to backend B has ended, B's answers to a new,
/// direct connection from P are not taken for the old flow's replies (and rewritten to come
/// from the VIP, which the client would never accept).
#[test]
fn nat_a_direct_connection_from_an_ended_flows_client_port_completes() {
    a_direct_connection_from_an_ended_nat_flows_client_port_completes(Family::V4, 20025);
}

/// The same over IPv6: the ended flow's entry in `NAT_REPLIES6` must not rewrite the direct
/// connection's replies.
#[test]
fn nat_ipv6_a_direct_connection_from_an_ended_flows_client_port_completes() {
    a_direct_connection_from_an_ended_nat_flows_client_port_completes(Family::V6, 20027);
}

fn a_direct_connection_from_an_ended_nat_flows_client_port_completes(family: Family, port: u16) {
    let Some((topo, name)) = running_topology(Layout::Nat) else {
        return;
    };
    let sy = topo.start(&topo.family_service_toml(&name, family));
    let vip = family.vip();
    let via_vip = topo
        .client
        .run(move || session_from_port(vip, port, Duration::ZERO))
        .expect("a session through the VIP");
    wait_for_counts_back_to_zero(&topo);
    let index = backend_index(&via_vip);
    let direct: SocketAddr = match family {
        Family::V4 => SocketAddrV4::new(topo.backend_addr(index), SMTP_PORT).into(),
        Family::V6 => SocketAddrV6::new(topo.backend_addr6(index), SMTP_PORT, 0, 0).into(),
    };
    let got = topo
        .client
        .run(move || session_from_port(direct, port, Duration::ZERO).map_err(|e| format!("{e:#}")));
    assert_eq!(
        got.as_deref(),
        Ok(via_vip.as_str()),
        "a direct session from port {port} to {direct}, where the VIP's session from that port went\n{}",
        sy.stderr_text()
    );
    assert_eq!(
        topo.servers[index].sessions_from(family.client()),
        2,
        "both sessions came from the client's own address"
    );
    assert!(active_counts(&topo).iter().all(|&c| c == 0));
}

/// A nat flow the backend ends with a RST gives its count back, and a new session through the
/// VIP from the same client port is a fresh flow (a new choice, counted once), not the old
/// entry followed.
#[test]
fn nat_a_flow_reset_by_its_backend_ends_and_its_port_starts_a_fresh_flow() {
    let Some((topo, name)) = running_topology(Layout::Nat) else {
        return;
    };
    let mut sy = topo.start(&topo.service_toml(&name, "least_conn"));
    const PORT: u16 = 20026;
    topo.client
        .run(|| session_reset_by_backend(vip(), PORT))
        .expect("a session through the VIP, reset by its backend");
    // The backend's RST ended the flow: its count is back (not held until the idle timeout).
    wait_for_counts_back_to_zero(&topo);

    let second = topo
        .client
        .spawn(|| session_from_port(vip(), PORT, Duration::from_millis(1500)));
    wait_for(
        "the new session to be counted",
        Duration::from_secs(5),
        || active_counts(&topo).iter().sum::<u64>() == 1,
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        active_counts(&topo).iter().sum::<u64>(),
        1,
        "the new session counts once"
    );
    second
        .join()
        .expect("client thread")
        .expect("a new session through the VIP from the same port");
    wait_for_counts_back_to_zero(&topo);
    assert!(sy.terminate().success(), "{}", sy.stderr_text());
    let totals = sy.totals();
    let new_flows: u64 = topo
        .servers
        .iter()
        .filter_map(|b| totals.backend(&name, b.name()))
        .filter_map(|b| b.kernel)
        .map(|k| k.new_flows)
        .sum();
    assert_eq!(new_flows, 2, "two sessions, two flows: {totals:?}");
}

#[test]
fn a_stopped_backend_gets_no_new_flows_and_others_never_fail() {
    let Some((topo, name)) = running_topology(Layout::Dsr) else {
        return;
    };
    let _sy = topo.start(&topo.service_toml(&name, "round_robin"));
    let before = sessions(&topo, 6, Duration::ZERO);
    assert!(before.iter().all(|r| r.is_ok()), "before: {before:?}");

    topo.servers[0].pause();
    let stopped_at = topo.servers[0].sessions_from(netns::CLIENT);
    // fall = 2 checks every 500 ms, plus one sync period: well within 2.5 s.
    std::thread::sleep(Duration::from_millis(2500));
    let after = sessions(&topo, 12, Duration::ZERO);
    let failed: Vec<_> = after.iter().filter(|r| r.is_err()).collect();
    assert!(
        failed.is_empty(),
        "sessions failed after the backend went down: {failed:?}"
    );
    assert_eq!(
        topo.servers[0].sessions_from(netns::CLIENT),
        stopped_at,
        "the stopped backend got new flows"
    );
    assert_eq!(
        topo.servers[1].sessions_from(netns::CLIENT) + topo.servers[2].sessions_from(netns::CLIENT),
        12 + 6 - stopped_at
    );
    wait_for_counts_back_to_zero(&topo);
}

#[test]
fn non_vip_traffic_is_untouched() {
    let Some((topo, name)) = running_topology(Layout::Nat) else {
        return;
    };
    let _sy = topo.start(&topo.service_toml(&name, "least_conn"));
    // A backend's own address, same port: routed by the balancer's kernel, not balanced.
    let direct = SocketAddrV4::new(topo.backend_addr(1), SMTP_PORT);
    for _ in 0..3 {
        let got = topo
            .client
            .run(move || smtp_session(direct, Duration::ZERO).map_err(|e| format!("{e:#}")));
        assert_eq!(
            got.as_deref(),
            Ok("mta2"),
            "direct traffic must reach the addressed host"
        );
    }
    // The VIP on another port is not a service: nothing answers (the balancer does not own
    // the VIP), and no backend sees it.
    let other_port = SocketAddrV4::new(VIP, 26);
    let result = topo.client.run(move || {
        std::net::TcpStream::connect_timeout(
            &std::net::SocketAddr::V4(other_port),
            Duration::from_millis(500),
        )
        .map(|_| ())
    });
    assert!(result.is_err(), "VIP:26 is not balanced");
    assert_eq!(
        topo.servers[0].sessions_from(netns::CLIENT) + topo.servers[2].sessions_from(netns::CLIENT),
        0
    );
    assert!(active_counts(&topo).iter().all(|&c| c == 0));
}

/// IPv6 that is not for a VIP through the balancer's interfaces while the program runs (in
/// dsr with an IPv6 VIP served): ICMPv6 (neighbour discovery
/// before it), whole and in fragments, to the balancer; in nat, routed through it to a
/// backend, and TCP to a backend's IPv6 address, which must reach that host from the client's
/// own address.
fn ipv6_traffic_is_untouched(layout: Layout) {
    let Some((topo, name)) = running_topology(layout) else {
        return;
    };
    // dsr serves an IPv6 VIP too: the IPv6 path runs on every IPv6 packet.
    let config = match layout {
        Layout::Dsr => topo.ipv6_service_toml(&name, "least_conn"),
        Layout::Nat => topo.service_toml(&name, "least_conn"),
    };
    let _sy = topo.start(&config);
    let mut targets = vec![netns::BALANCER6];
    if layout == Layout::Nat {
        targets.push(topo.backend_addr6(1));
    }
    for target in targets {
        for payload in [56, 3000] {
            topo.client
                .run(move || netns::ping6(target, payload, Duration::from_secs(3)))
                .unwrap_or_else(|e| {
                    panic!("{layout:?}: ping {target} with {payload} bytes: {e:#}")
                });
        }
    }
    if layout == Layout::Nat {
        let direct = SocketAddrV6::new(topo.backend_addr6(1), SMTP_PORT, 0, 0);
        for _ in 0..3 {
            let got = topo.client.run(move || {
                smtp_session_blocking(direct.into(), &SessionOptions::default())
                    .map_err(|e| format!("{e:#}"))
            });
            assert_eq!(got.as_deref(), Ok("mta2"), "TCP over IPv6 to {direct}");
        }
        assert_eq!(topo.servers[1].sessions_from(netns::CLIENT6), 3);
    }
    assert!(active_counts(&topo).iter().all(|&c| c == 0));
}

#[test]
fn dsr_ipv6_traffic_is_untouched() {
    ipv6_traffic_is_untouched(Layout::Dsr);
}

#[test]
fn nat_ipv6_traffic_is_untouched() {
    ipv6_traffic_is_untouched(Layout::Nat);
}

#[test]
fn ip_hash_is_sticky_and_remaps_about_one_in_n() {
    let Some((topo, name)) = running_topology(Layout::Dsr) else {
        return;
    };
    let clients: Vec<Ipv4Addr> = (0..60)
        .map(|i| Ipv4Addr::new(198, 18, 0, 150 + i))
        .collect();
    for ip in &clients {
        topo.client
            .ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"])
            .expect("a client address");
    }
    let sy = topo.start(&topo.service_toml(&name, "ip_hash"));
    // Until dsr has learned a backend's MAC, Maglev skips it like a down backend: the first
    // round must start after every backend takes flows, or it is not the sticky assignment.
    wait_for_every_backend_to_take_flows(&sy);
    let assign = |topo: &Topology, clients: &[Ipv4Addr]| -> Vec<String> {
        let clients = clients.to_vec();
        topo.client.run(move || {
            clients
                .iter()
                .map(|&ip| session_from(ip).unwrap_or_else(|e| panic!("session from {ip}: {e}")))
                .collect()
        })
    };
    let first = assign(&topo, &clients);
    let second = assign(&topo, &clients);
    assert_eq!(
        first, second,
        "ip_hash must keep every client on its backend"
    );
    let used: std::collections::BTreeSet<_> = first.iter().collect();
    assert_eq!(
        used.len(),
        3,
        "60 clients should use all 3 backends: {first:?}"
    );

    topo.servers[2].pause();
    std::thread::sleep(Duration::from_millis(2500));
    let third = assign(&topo, &clients);
    let moved = first.iter().zip(&third).filter(|(a, b)| a != b).count();
    let on_removed = first.iter().filter(|b| *b == "mta3").count();
    // Only the removed backend's clients move (Maglev's minimal disruption): about 1/3.
    assert_eq!(
        moved, on_removed,
        "clients of surviving backends moved: {first:?} → {third:?}"
    );
    assert!(third.iter().all(|b| b != "mta3"));
    assert!(
        (10..=30).contains(&moved),
        "about 1/3 of 60 clients should move, {moved} did"
    );
}

/// One SMTP session to the VIP from `source` (an address of the calling thread's namespace).
fn session_from(source: Ipv4Addr) -> anyhow::Result<String> {
    let options = SessionOptions {
        source: Some(source.into()),
        ..SessionOptions::default()
    };
    smtp_session_blocking(vip().into(), &options)
}

#[test]
fn restart_keeps_established_sessions() {
    let Some((topo, name)) = running_topology(Layout::Dsr) else {
        return;
    };
    let (bpffs, config, mut first) = start_pinned(&topo, &name);
    assert!(
        bpffs
            .path()
            .join("switchyard")
            .join(&name)
            .join("FLOWS")
            .exists(),
        "the flow table is pinned under /sys/fs/bpf/switchyard/{name}"
    );

    // Sessions that stay open across the restart.
    let held = topo
        .client
        .spawn(|| parallel_sessions(3, Duration::from_secs(4)));
    std::thread::sleep(Duration::from_millis(1000));
    assert!(first.terminate().success());
    first.assert_logged("XDP program left attached to eth0");
    let second = restart_under_held_sessions(&topo, &config, &bpffs, held);
    // Same release, same config: every pinned map fits and is reused.
    let log = second.stderr_text();
    assert!(!log.contains("pinned XDP map "), "{log}");
    wait_for_counts_back_to_zero(&topo);
}

/// Starts switchyard again on the pinned maps in `bpffs` while the 3 `held` sessions (started
/// before the last one stopped) are open: they all complete, their flows counted again.
fn restart_under_held_sessions(
    topo: &Network,
    config: &str,
    bpffs: &PrivateBpffs,
    held: std::thread::JoinHandle<Vec<anyhow::Result<String>>>,
) -> Switchyard {
    let next =
        start_switchyard_with_bpffs(&topo.balancer, config, bpffs, "XDP program replaced on");
    let results = held.join().expect("client thread");
    assert!(
        results.iter().all(|r| r.is_ok()),
        "sessions across the restart: {results:?}\n{}",
        next.stderr_text()
    );
    next.assert_logged("rebuilt active counts from 3 open flows");
    next
}

/// The layout of the map pinned at `path` as the kernel reports it (bpftool's JSON): type,
/// key size, value size, entries, flags.
fn pinned_map_layout(path: &std::path::Path) -> (String, u64, u64, u64, u64) {
    let output = Command::new("bpftool")
        .args(["-j", "map", "show", "pinned"])
        .arg(path)
        .output()
        .expect("bpftool");
    assert!(
        output.status.success(),
        "bpftool map show pinned {}: {}",
        path.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    let shown: serde_json::Value = serde_json::from_slice(&output.stdout).expect("bpftool JSON");
    let number = |key: &str| {
        shown[key]
            .as_u64()
            .unwrap_or_else(|| panic!("{key} in {shown}"))
    };
    (
        shown["type"].as_str().expect("type").to_owned(),
        number("bytes_key"),
        number("bytes_value"),
        number("max_entries"),
        number("flags"),
    )
}

#[test]
fn restart_replaces_a_pinned_map_of_an_old_layout_and_keeps_the_flows() {
    let Some((topo, name)) = running_topology(Layout::Dsr) else {
        return;
    };
    let (bpffs, config, mut first) = start_pinned(&topo, &name);
    let pins = bpffs.path().join("switchyard").join(&name);
    let stats_pin = pins.join("SERVICE_STATS");
    let current = pinned_map_layout(&stats_pin);
    let held = topo
        .client
        .spawn(|| parallel_sessions(3, Duration::from_secs(4)));
    std::thread::sleep(Duration::from_millis(1000));
    assert!(first.terminate().success());

    // What an earlier release left: SERVICE_STATS with 32-byte values.
    std::fs::remove_file(&stats_pin).expect("unpin SERVICE_STATS");
    let created = Command::new("bpftool")
        .args(["map", "create"])
        .arg(&stats_pin)
        .args(["type", "percpu_array", "key", "4", "value", "32", "entries"])
        .arg(current.3.to_string())
        .args(["name", "SERVICE_STATS"])
        .output()
        .expect("bpftool");
    assert!(
        created.status.success(),
        "bpftool map create: {}",
        String::from_utf8_lossy(&created.stderr)
    );
    assert_eq!(pinned_map_layout(&stats_pin).2, 32);

    // The flow table is kept: its flows are counted again and finish through it.
    let mut second = restart_under_held_sessions(&topo, &config, &bpffs, held);
    assert_eq!(
        pinned_map_layout(&stats_pin),
        current,
        "SERVICE_STATS pinned again with this release's layout"
    );
    let fresh = sessions(&topo, 3, Duration::ZERO);
    assert!(fresh.iter().all(|r| r.is_ok()), "new sessions: {fresh:?}");
    wait_for_counts_back_to_zero(&topo);
    assert!(second.terminate().success());
    let totals = second.totals();
    let service = totals
        .services
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no service totals: {totals:?}"));
    let kernel = service.kernel.expect("kernel service counters");
    assert!(
        kernel.forwarded >= 3 * 8,
        "the fresh SERVICE_STATS counts: {kernel:?}"
    );
    // For the operator: the map, both layouts, the cost; and no other map replaced.
    let log = second.stderr_text();
    second.assert_logged("pinned XDP map SERVICE_STATS");
    second.assert_logged("value 32 B");
    second.assert_logged("counters start again");
    assert_eq!(log.matches("pinned XDP map ").count(), 1, "{log}");
}

#[test]
fn restart_with_a_new_flow_table_size_replaces_the_flow_tables() {
    let Some((topo, name)) = running_topology(Layout::Dsr) else {
        return;
    };
    let (bpffs, config, mut first) = start_pinned(&topo, &name);
    let pins = bpffs.path().join("switchyard").join(&name);
    let sources = pinned_map_layout(&pins.join("SOURCES"));
    assert!(first.terminate().success());

    let resized = config.replace("flow_table_size = 65536", "flow_table_size = 4096");
    let second =
        start_switchyard_with_bpffs(&topo.balancer, &resized, &bpffs, "XDP program replaced on");
    for table in ["FLOWS", "FLOWS6", "NAT_REPLIES", "NAT_REPLIES6"] {
        assert_eq!(
            pinned_map_layout(&pins.join(table)).3,
            4096,
            "{table} pinned again with the configured size"
        );
    }
    // Replaced with the flow tables (a fresh map of the same layout), see `xdp::pins`.
    assert_eq!(pinned_map_layout(&pins.join("SOURCES")).0, sources.0);
    let results = sessions(&topo, 3, Duration::ZERO);
    assert!(results.iter().all(|r| r.is_ok()), "sessions: {results:?}");
    wait_for_counts_back_to_zero(&topo);
    second.assert_logged("pinned XDP map FLOWS ");
    second.assert_logged("pinned XDP map SOURCES ");
    second.assert_logged("established flows lose their entries");
    let log = second.stderr_text();
    assert!(!log.contains("pinned XDP map ACTIVE"), "{log}");
    assert!(
        !log.contains("established flows keep their backends"),
        "{log}"
    );
}

#[test]
fn idle_flows_without_fin_expire_and_give_their_count_back() {
    let Some((topo, name)) = running_topology(Layout::Dsr) else {
        return;
    };
    let config = topo
        .service_toml(&name, "least_conn")
        .replace("flow_idle_timeout = \"5m\"", "flow_idle_timeout = \"2s\"");
    let _sy = topo.start(&config);
    // A client that connects, reads the greeting, then vanishes without FIN or RST.
    let held = hold_session(&topo, vip());
    assert_eq!(
        active_counts(&topo).iter().sum::<u64>(),
        1,
        "the open session counts once"
    );
    topo.client
        .ip(&["link", "set", "eth0", "down"])
        .expect("the client's link down");
    // 2 s idle plus at most one expiry period (500 ms) and one sync period.
    wait_for("the idle flow to expire", Duration::from_secs(8), || {
        active_counts(&topo).iter().all(|&c| c == 0)
    });
    drop(held);
}

#[test]
fn falls_back_to_generic_mode_with_a_warning() {
    if !netns::require_xdp(object_built()) {
        return;
    }
    let ns = netns::Netns::new(format!("sy-g-{}", netns::suffix())).expect("a namespace");
    // Loopback has no native XDP support (its own namespace's `lo`).
    let config = format!(
        "[[service]]\nname = \"{}\"\nlisten = \"198.18.2.100:25\"\ndataplane = \"xdp\"\n[service.health]\nkind = \"none\"\n[service.xdp]\ninterface = \"lo\"\n[[service.backend]]\nname = \"a\"\naddress = \"198.18.2.11:25\"\n",
        ns.name
    );
    let mut sy = start_switchyard(
        &ns,
        &config,
        "XDP program attached to lo in generic (skb) mode",
    );
    assert!(
        sy.stderr_text().contains("WARN"),
        "the fallback is a warning:\n{}",
        sy.stderr_text()
    );
    assert!(sy.terminate().success());
    sy.assert_logged("XDP program detached from lo");
    let link = Command::new("ip")
        .args(["-n", &ns.name, "-d", "link", "show", "lo"])
        .output()
        .expect("ip");
    assert!(
        !String::from_utf8_lossy(&link.stdout).contains("prog/xdp"),
        "detached on shutdown"
    );
}

#[test]
fn without_capabilities_the_error_names_them() {
    if !netns::require_xdp(object_built()) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let path = dir.path().join("switchyard.toml");
    std::fs::write(
        &path,
        "[[service]]\nname = \"sy-caps\"\nlisten = \"198.18.0.100:25\"\ndataplane = \"xdp\"\n[service.health]\nkind = \"none\"\n[service.xdp]\ninterface = \"lo\"\n[[service.backend]]\nname = \"a\"\naddress = \"198.18.1.11:25\"\n",
    )
    .expect("write");
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o644))
        .expect("chmod");
    // As an unprivileged user: no CAP_BPF, no CAP_NET_ADMIN.
    let output = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(env!("CARGO_BIN_EXE_switchyard"))
        .arg("run")
        .arg("--config")
        .arg(&path)
        .output()
        .expect("setpriv (util-linux)");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(1),
        "must refuse to run: {stderr}"
    );
    assert!(
        stderr.contains("CAP_BPF") && stderr.contains("CAP_NET_ADMIN"),
        "the error names the capabilities: {stderr}"
    );
}

#[test]
fn proxy_sessions_count_in_the_kernels_shared_array() {
    let Some((topo, name)) = running_topology(Layout::Dsr) else {
        return;
    };
    let mut config = topo.service_toml(&name, "least_conn");
    // The same backends behind the userspace proxy on the balancer's own address, with the
    // default health checks.
    add_proxy_service(&topo, &mut config, &name, None);
    let _sy = start_switchyard(
        &topo.balancer,
        &config,
        &format!("listening on {}:2525", netns::BALANCER),
    );
    let proxied = SocketAddrV4::new(netns::BALANCER, 2525);
    let held = hold_session(&topo, proxied);
    // The proxy's session is counted in the very array the XDP program reads, and in the
    // same slot as the kernel's flows to that MTA: both services share one slot per backend.
    // Slots are given in order of first appearance: the xdp service's three backends take
    // 0..3, and the proxy service's (the same addresses) must reuse them; the rest of the
    // array is room for backends reloads add.
    let counts = active_counts(&topo);
    assert!(
        counts.len() >= 3 && counts[3..].iter().all(|&c| c == 0),
        "one slot per distinct backend address: {counts:?}"
    );
    assert_eq!(
        counts[..3].iter().sum::<u64>(),
        1,
        "the proxied session in the kernel's array: {counts:?}"
    );
    drop(held);
    // The proxied session is given back.
    wait_for_counts_back_to_zero(&topo);
}

/// Adds a userspace-proxy service on the balancer's own address (port 2525) in front of the
/// same backends, so both data planes count in the same slots; `health` is the body of its
/// `[service.health]` table (`None`: the default checks).
fn add_proxy_service(topo: &Topology, config: &mut String, name: &str, health: Option<&str>) {
    let listen = SocketAddr::from((netns::BALANCER, 2525));
    let mut service =
        ServiceToml::new(&format!("{name}-proxy"), &[listen]).keys("algorithm = \"least_conn\"");
    if let Some(health) = health {
        service = service.health(health);
    }
    for i in 0..topo.backends.len() {
        let address = SocketAddrV4::new(topo.backend_addr(i), SMTP_PORT);
        service = service.backend(&format!("mta{}", i + 1), address);
    }
    config.push_str(&service.to_string());
}

/// Index (config order, which is also the counter slot here) of the backend named `name`.
fn backend_index(name: &str) -> usize {
    name.strip_prefix("mta")
        .and_then(|n| n.parse::<usize>().ok())
        .and_then(|n| n.checked_sub(1))
        .unwrap_or_else(|| panic!("unexpected backend name {name:?}"))
}

#[test]
fn counts_leaked_by_a_full_flow_table_are_reconciled_to_exact_values() {
    let Some((topo, name)) = running_topology(Layout::Dsr) else {
        return;
    };
    // The smallest flow table, and a short idle timeout so that the flood's flows expire (and
    // the expiry/reconciliation pass runs every 500 ms).
    let mut config = topo
        .service_toml(&name, "least_conn")
        .replace("flow_table_size = 65536", "flow_table_size = 1024")
        .replace("flow_idle_timeout = \"5m\"", "flow_idle_timeout = \"2s\"");
    add_proxy_service(&topo, &mut config, &name, Some("kind = \"none\""));
    let mut sy = start_switchyard(
        &topo.balancer,
        &config,
        &format!("listening on {}:2525", netns::BALANCER),
    );
    assert!(
        active_counts(&topo).len() >= 3,
        "a slot for each backend address"
    );
    // dsr learns the backends' MACs first: until then they take no flows.
    wait_for_every_backend_to_take_flows(&sy);

    // 2000 flows into a table of 1024: the LRU evicts open flows, and their units leak.
    const FLOOD: u64 = 2000;
    let spoofed = Ipv4Addr::new(198, 18, 0, 250);
    topo.client
        .run(move || netns::send_syns(spoofed, vip(), 20000..20000 + FLOOD as u16))
        .expect("the SYN flood");
    wait_for(
        "the flood's flows to be counted beyond the table's size",
        Duration::from_secs(5),
        || active_counts(&topo).iter().sum::<u64>() > 1500,
    );

    // Live sessions in both planes while the counts are corrected: they must stay counted.
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(HeldSession::open_in(&topo.client, vip().into()).expect("session via the VIP"));
    }
    let proxied = SocketAddrV4::new(netns::BALANCER, 2525);
    held.push(HeldSession::open_in(&topo.client, proxied.into()).expect("session via the proxy"));
    let mut expected = vec![0u64; 3];
    for session in &held {
        expected[backend_index(&session.backend)] += 1;
    }
    wait_for(
        &format!("counts {expected:?} (held sessions only)"),
        Duration::from_secs(10),
        || counts_are(&topo, &expected),
    );
    assert!(
        sy.stderr_text()
            .contains("corrected active counts that drifted"),
        "the correction is logged:\n{}",
        sy.stderr_text()
    );
    // Several more passes: nothing is taken from live sessions.
    std::thread::sleep(Duration::from_millis(1600));
    assert!(
        counts_are(&topo, &expected),
        "{:?} != {expected:?}: {}",
        active_counts(&topo),
        sy.stderr_text()
    );

    for session in held {
        session.finish().expect("held session completes");
    }
    wait_for_counts_back_to_zero(&topo);
    assert!(sy.terminate().success(), "{}", sy.stderr_text());
}

#[test]
fn a_drained_backend_keeps_its_flows_across_a_restart_and_takes_no_new_ones() {
    let Some((topo, name)) = running_topology(Layout::Dsr) else {
        return;
    };
    let (bpffs, config, mut first) = start_pinned(&topo, &name);
    wait_for_every_backend_to_take_flows(&first);
    // One long session on each backend (least_conn).
    let held: Vec<_> = (0..3)
        .map(|_| HeldSession::open_in(&topo.client, vip().into()).expect("held session"))
        .collect();
    let mut on: Vec<&str> = held.iter().map(|h| h.backend.as_str()).collect();
    on.sort();
    assert_eq!(on, ["mta1", "mta2", "mta3"], "least_conn spreads 1/1/1");
    assert!(first.terminate().success(), "{}", first.stderr_text());

    // The operator drains mta1 and restarts: the pinned flows go on.
    let drained = config.replace("name = \"mta1\"\n", "name = \"mta1\"\ndrain = true\n");
    assert!(drained.contains("drain = true"));
    let mut second =
        start_switchyard_with_bpffs(&topo.balancer, &drained, &bpffs, "XDP program replaced on");
    wait_for("mta1 drained", Duration::from_secs(5), || {
        second.stderr_text().contains("XDP: backend is drained")
    });
    let before = topo.servers[0].sessions_from(netns::CLIENT);
    let results = sessions(&topo, 9, Duration::from_millis(300));
    assert!(
        results.iter().all(|r| r.is_ok()),
        "new sessions with mta1 drained: {results:?}\n{}",
        second.stderr_text()
    );
    assert_eq!(
        topo.servers[0].sessions_from(netns::CLIENT),
        before,
        "the drained backend got a new flow"
    );
    // Established flows, the drained backend's included, complete.
    for session in held {
        let backend = session.backend.clone();
        session
            .finish()
            .unwrap_or_else(|e| panic!("held session on {backend}: {e}\n{}", second.stderr_text()));
    }
    wait_for_counts_back_to_zero(&topo);
    assert!(second.terminate().success(), "{}", second.stderr_text());
}

/// Writes `config` over the running switchyard's config file and reloads it (`ctl reload`).
fn reload_with(sy: &Switchyard, config: &str) {
    // The admin socket the harness gave it at start cannot change while running.
    let text = format!(
        "{config}{}",
        testkit::config_toml::admin_table(sy.admin_socket())
    );
    std::fs::write(sy.config_dir().join("switchyard.toml"), text).expect("rewrite the config");
    let reloaded = sy.ctl(&["reload"]);
    assert_eq!(reloaded.code, Some(0), "ctl reload: {reloaded:?}");
}

/// `config` without backend `mta{number}`.
fn without_backend(topo: &Topology, config: &str, number: usize) -> String {
    let block = format!(
        "\n[[service.backend]]\nname = \"mta{number}\"\naddress = \"{}:{SMTP_PORT}\"\n",
        topo.backend_addr(number - 1)
    );
    assert!(config.contains(&block), "no mta{number} in {config}");
    config.replace(&block, "")
}

/// `config` with `keys` (lines) added to backend `mta{number}`.
fn with_backend_keys(config: &str, number: usize, keys: &str) -> String {
    let name = format!("name = \"mta{number}\"\n");
    assert!(config.contains(&name), "no mta{number} in {config}");
    config.replace(&name, &format!("{name}{keys}"))
}

/// One session from the client namespace to `target`: the backend that greeted, or why it
/// failed.
fn one_session(topo: &Topology, target: impl Into<SocketAddr>) -> anyhow::Result<String> {
    session_with(topo, target.into(), SessionOptions::default())
}

/// [`one_session`] where a failure is expected: each step gets 1 s.
fn quick_session(topo: &Topology, target: impl Into<SocketAddr>) -> anyhow::Result<String> {
    let options = SessionOptions {
        step_timeout: Some(Duration::from_secs(1)),
        ..SessionOptions::default()
    };
    session_with(topo, target.into(), options)
}

fn session_with(
    topo: &Topology,
    target: SocketAddr,
    options: SessionOptions,
) -> anyhow::Result<String> {
    topo.client
        .run(move || smtp_session_blocking(target, &options))
}

/// Per backend (mta1, mta2, mta3), how many sessions the client namespace has had (from its
/// IPv4 and its IPv6 address).
fn sessions_per_backend(topo: &Network) -> Vec<usize> {
    topo.servers
        .iter()
        .map(|s| s.sessions_from(netns::CLIENT) + s.sessions_from(netns::CLIENT6))
        .collect()
}

/// Stops switchyard and checks its shutdown totals: every backend's active count is 0.
fn assert_stopped_idle(mut sy: Switchyard) {
    assert!(sy.terminate().success(), "{}", sy.stderr_text());
    let totals = sy.totals();
    for (service, backend) in totals.backends() {
        assert_eq!(
            backend.active, 0,
            "{service}/{}: active at shutdown",
            backend.name
        );
    }
}

/// A reload removes mta1 and adds mta3: sessions held on mta1 across it complete (QUIT, 221),
/// new sessions never reach mta1 once the new table is in and do reach mta3, and every count
/// is 0 at the end.
#[test]
fn reload_removed_backends_flows_complete_and_new_flows_follow_the_new_table() {
    reload_removed_backends_flows_complete_and_new_flows_follow_the_new_table_on(Net::Prepared);
}

/// The same on the network a user has (default offloads, nothing on the peers, generic mode).
#[test]
fn plain_topology_reload_removed_backends_flows_complete_and_new_flows_follow_the_new_table() {
    reload_removed_backends_flows_complete_and_new_flows_follow_the_new_table_on(Net::Plain);
}

fn reload_removed_backends_flows_complete_and_new_flows_follow_the_new_table_on(net: Net) {
    let Some((topo, name)) = running_on(net, Layout::Nat) else {
        return;
    };
    let all = topo.service_toml(&name, "round_robin");
    let sy = topo.start(&without_backend(&topo, &all, 3));
    let held = topo
        .client
        .spawn(|| parallel_sessions(4, Duration::from_secs(8)));
    wait_for("held sessions on mta1", Duration::from_secs(5), || {
        sessions_per_backend(&topo)[0] >= 1
            && sessions_per_backend(&topo).iter().sum::<usize>() == 4
    });

    reload_with(&sy, &without_backend(&topo, &all, 1));
    // The new table is in once a new session reaches the added backend.
    wait_for("a new session on mta3", Duration::from_secs(10), || {
        one_session(&topo, vip()).is_ok() && sessions_per_backend(&topo)[2] > 0
    });
    let before = sessions_per_backend(&topo);
    let after: Vec<_> = (0..8).map(|_| one_session(&topo, vip())).collect();
    assert!(
        after.iter().all(|r| r.is_ok()),
        "sessions after the reload: {after:?}\n{}",
        sy.stderr_text()
    );
    let now = sessions_per_backend(&topo);
    assert_eq!(now[0], before[0], "the removed mta1 got new flows");
    assert!(now[2] > before[2], "the added mta3 got none of 8: {now:?}");

    let held = held.join().expect("client thread");
    assert!(
        held.iter().all(|r| r.is_ok()),
        "sessions held across the reload: {held:?}\n{}",
        sy.stderr_text()
    );
    assert!(held.iter().flatten().any(|b| b == "mta1"), "{held:?}");
    wait_for_counts_back_to_zero(&topo);
    assert_stopped_idle(sy);
}

/// A reload that changes the algorithm (round_robin to weighted_round_robin), the weights and
/// drains mta1 reaches the kernel: mta1 gets no new flows, mta3 (weight 100 against mta2's
/// 1) nearly all.
#[test]
fn reload_algorithm_weight_and_drain_reach_the_kernel() {
    let Some((topo, name)) = running_topology(Layout::Nat) else {
        return;
    };
    let config = topo.service_toml(&name, "round_robin");
    let sy = topo.start(&config);
    let before: Vec<_> = (0..6).map(|_| one_session(&topo, vip())).collect();
    assert!(before.iter().all(|r| r.is_ok()), "{before:?}");

    let weighted = config.replace(
        "algorithm = \"round_robin\"",
        "algorithm = \"weighted_round_robin\"",
    );
    let weighted = with_backend_keys(&weighted, 1, "drain = true\n");
    let weighted = with_backend_keys(&weighted, 3, "weight = 100\n");
    reload_with(&sy, &weighted);
    // Round robin never sends five sessions in a row to one of three backends (a cursor per
    // CPU, two CPUs): five on mta3 say the weighted table is in.
    let mut streak = 0;
    wait_for(
        "five sessions in a row on mta3",
        Duration::from_secs(10),
        || {
            match one_session(&topo, vip()) {
                Ok(backend) if backend == "mta3" => streak += 1,
                _ => streak = 0,
            }
            streak >= 5
        },
    );
    let drained_at = sessions_per_backend(&topo)[0];
    let after: Vec<_> = (0..20).map(|_| one_session(&topo, vip())).collect();
    assert!(after.iter().all(|r| r.is_ok()), "{after:?}");
    assert_eq!(
        sessions_per_backend(&topo)[0],
        drained_at,
        "the drained mta1 got new flows"
    );
    let on_mta3 = after.iter().flatten().filter(|b| *b == "mta3").count();
    // At most one pick of mta2 per CPU's pass through the 101-entry table.
    assert!(on_mta3 >= 18, "mta3 got {on_mta3} of 20: {after:?}");
    wait_for_counts_back_to_zero(&topo);
    // `ctl show` reads the kernel path: the drain and weights in force, every flow counted.
    let shown = sy.ctl(&["--json", "show"]);
    assert_eq!(shown.code, Some(0), "{shown:?}");
    let report: switchyard::control::ShowReport =
        serde_json::from_str(&shown.stdout).expect("show --json");
    let service = &report.services[0];
    assert_eq!(service.dataplane, "xdp");
    assert_eq!(service.flows, Some(0), "every flow ended");
    let states: Vec<(&str, u32)> = service
        .backends
        .iter()
        .map(|b| (b.state.as_str(), b.weight))
        .collect();
    assert_eq!(states, [("drain", 1), ("up", 1), ("up", 100)]);
    let flows: u64 = service.backends.iter().map(|b| b.sessions_total).sum();
    assert!(flows >= 26 + 5, "{} flows counted: {service:?}", flows);
    assert_stopped_idle(sy);
}

/// A reload removes one of two xdp services: its VIP no longer steers new connections (they
/// pass to the balancer's stack, which does not serve the VIP), its established session
/// completes, the other service goes on, and every count is 0 at the end.
#[test]
fn reload_removed_services_vip_takes_no_new_flows_and_its_flows_complete() {
    removed_services_vip_takes_no_new_flows_and_its_flows_complete(Net::Prepared, Family::V4);
}

/// The same on the network a user has, IPv4 and IPv6.
#[test]
fn plain_topology_reload_removed_services_vip_takes_no_new_flows_and_its_flows_complete() {
    for family in [Family::V4, Family::V6] {
        removed_services_vip_takes_no_new_flows_and_its_flows_complete(Net::Plain, family);
    }
}

/// [`reload_removed_services_vip_takes_no_new_flows_and_its_flows_complete`] on IPv6 VIPs,
/// whose retired entries the program keeps for the established flows.
#[test]
fn reload_removed_ipv6_services_vip_takes_no_new_flows_and_its_flows_complete() {
    removed_services_vip_takes_no_new_flows_and_its_flows_complete(Net::Prepared, Family::V6);
}

fn removed_services_vip_takes_no_new_flows_and_its_flows_complete(net: Net, family: Family) {
    let Some((topo, name)) = running_on(net, Layout::Nat) else {
        return;
    };
    let service = |name: &str| match family {
        Family::V4 => topo.service_toml(name, "round_robin"),
        Family::V6 => topo.ipv6_service_toml(name, "round_robin"),
    };
    let removed_vip = family.vip();
    let mut other_vip = removed_vip;
    other_vip.set_port(2525);
    let other = service(&format!("{name}-b"))
        .replace("shutdown_timeout = \"2s\"\n", "")
        .replace(
            &format!("listen = \"{removed_vip}\""),
            &format!("listen = \"{other_vip}\""),
        );
    assert!(other.contains(&other_vip.to_string()), "{other}");
    let sy = topo.start(&format!("{}\n{other}", service(&name)));
    let first = one_session(&topo, other_vip);
    assert!(first.is_ok(), "{first:?}\n{}", sy.stderr_text());
    let held = topo
        .client
        .spawn(move || parallel_sessions_to(removed_vip, 1, Duration::from_secs(6)));
    wait_for("the held session", Duration::from_secs(5), || {
        sessions_per_backend(&topo).iter().sum::<usize>() == 2
    });

    reload_with(&sy, &format!("shutdown_timeout = \"2s\"\n{other}"));
    wait_for(
        "new connections to the removed VIP to fail",
        Duration::from_secs(10),
        || quick_session(&topo, removed_vip).is_err(),
    );
    let at_removal = sessions_per_backend(&topo);
    for _ in 0..2 {
        assert!(quick_session(&topo, removed_vip).is_err());
    }
    assert_eq!(
        sessions_per_backend(&topo),
        at_removal,
        "a connection to the removed VIP reached a backend"
    );
    let kept: Vec<_> = (0..3).map(|_| one_session(&topo, other_vip)).collect();
    assert!(kept.iter().all(|r| r.is_ok()), "the kept service: {kept:?}");
    let held = held.join().expect("client thread");
    assert!(
        held.iter().all(|r| r.is_ok()),
        "the removed service's held session: {held:?}\n{}",
        sy.stderr_text()
    );
    wait_for_counts_back_to_zero(&topo);
    assert_stopped_idle(sy);
}

/// `/metrics` reads the kernel path: after a number of sessions through the VIP, each
/// backend's `switchyard_backend_sessions_total{plane="xdp"}` is the flows the test made to it
/// (its SMTP server's sessions from the client; health checks come from the balancer), each
/// flow's packets are counted, and the flow table's size and the attach mode are there.
#[test]
fn metrics_count_the_kernel_paths_flows_and_packets() {
    use testkit::metrics_text::Exposition;
    let Some((topo, name)) = running_topology(Layout::Nat) else {
        return;
    };
    // Served inside the balancer's namespace, on its loopback.
    let web: SocketAddr = "127.0.0.1:9025".parse().expect("address");
    let admin = testkit::config_toml::admin_table_listening("admin.sock".as_ref(), web);
    let sy = topo.start(&format!(
        "{}{admin}",
        topo.service_toml(&name, "round_robin")
    ));
    let scrape = |topo: &Topology| {
        topo.balancer
            .run(move || Exposition::scrape(web))
            .unwrap_or_else(|e| panic!("scrape: {e:#}"))
    };
    const SESSIONS: usize = 9;
    for _ in 0..SESSIONS {
        let session = one_session(&topo, vip());
        assert!(session.is_ok(), "{session:?}\n{}", sy.stderr_text());
    }
    wait_for_counts_back_to_zero(&topo);
    let made = sessions_per_backend(&topo);
    assert_eq!(made.iter().sum::<usize>(), SESSIONS);
    let scraped = scrape(&topo);
    let backend = |i: usize| format!("mta{}", i + 1);
    for (i, &flows) in made.iter().enumerate() {
        let mta = backend(i);
        let labels = [("service", name.as_str()), ("backend", mta.as_str())];
        let mut with_plane = labels.to_vec();
        with_plane.push(("plane", "xdp"));
        assert_eq!(
            scraped.get("switchyard_backend_sessions_total", &with_plane),
            flows as f64,
            "{mta}: new flows against the sessions its server saw"
        );
        let packets = scraped.get("switchyard_backend_xdp_packets_total", &labels);
        // A whole SMTP session is far more than five packets from the client.
        assert!(
            packets >= 5.0 * flows as f64 && (flows > 0 || packets == 0.0),
            "{mta}: {packets} packets for {flows} flows"
        );
        assert!(scraped.get("switchyard_backend_xdp_bytes_total", &labels) > 0.0 || flows == 0);
        assert_eq!(
            scraped.get("switchyard_backend_active_sessions", &labels),
            0.0
        );
    }
    let forwarded = scraped.get(
        "switchyard_service_xdp_packets_total",
        &[("service", name.as_str()), ("action", "forwarded")],
    );
    assert!(
        forwarded >= scraped.sum("switchyard_backend_xdp_packets_total", &[]),
        "forwarded {forwarded}"
    );
    assert_eq!(
        scraped.get(
            "switchyard_service_xdp_packets_total",
            &[("service", name.as_str()), ("action", "no_backend")],
        ),
        0.0
    );
    assert_eq!(
        scraped.get("switchyard_xdp_flow_table_capacity", &[("family", "ipv4")]),
        65536.0
    );
    assert_eq!(
        scraped.get(
            "switchyard_xdp_attach_mode",
            &[("interface", topo.lb_interface)]
        ),
        1.0
    );
    // ctl show counts the same flows.
    let shown = sy.ctl(&["--json", "show"]);
    let report: switchyard::control::ShowReport =
        serde_json::from_str(&shown.stdout).expect("show --json");
    for (i, shown) in report.services[0].backends.iter().enumerate() {
        assert_eq!(shown.sessions_total, made[i] as u64, "{}", shown.name);
    }
    assert_stopped_idle(sy);
}

/// `ctl flows` reads the kernel's flow table: exactly the flows the test holds, each by its
/// client address and port, on the backend that greeted it, established, with client packets
/// that grow as the client talks; `--limit` cuts the list but not the count; `--json` parses;
/// an unknown service is refused with the names there are.
#[test]
fn ctl_flows_lists_the_held_flows_with_their_backends_and_packets() {
    use std::io::{Read, Write};
    use switchyard::control::{FlowReport, FlowsReport};
    let Some((topo, name)) = running_topology(Layout::Nat) else {
        return;
    };
    let sy = topo.start(&topo.service_toml(&name, "round_robin"));
    let held: Vec<(std::net::TcpStream, String)> =
        (0..3).map(|_| hold_greeted_session(&topo, vip())).collect();
    let flows = |args: &[&str]| -> FlowsReport {
        let out = sy.ctl(args);
        assert_eq!(out.code, Some(0), "ctl {args:?}: {out:?}");
        serde_json::from_str(&out.stdout).expect("flows --json")
    };
    let of = |report: &FlowsReport, stream: &std::net::TcpStream| -> FlowReport {
        let client = stream.local_addr().expect("local address").to_string();
        report
            .flows
            .iter()
            .find(|f| f.client == client)
            .cloned()
            .unwrap_or_else(|| panic!("no flow from {client}: {report:?}"))
    };
    let before = flows(&["--json", "flows"]);
    assert_eq!(before.matched, 3, "{before:?}");
    assert_eq!(before.flows.len(), 3, "{before:?}");
    for (stream, backend) in &held {
        let flow = of(&before, stream);
        assert_eq!(&flow.backend, backend, "{flow:?}");
        assert_eq!(flow.service, name);
        assert_eq!(flow.vip, vip().to_string());
        assert_eq!(flow.state, "established", "{flow:?}");
        assert!(flow.packets >= 2, "SYN and ACK at least: {flow:?}");
    }

    let mut talking = &held[0].0;
    for _ in 0..3 {
        talking.write_all(b"NOOP\r\n").expect("NOOP");
        let mut reply = [0u8; 128];
        let n = talking.read(&mut reply).expect("NOOP reply");
        assert!(reply[..n].starts_with(b"250"), "{:?}", &reply[..n]);
    }
    let after = of(&flows(&["--json", "flows", &name]), &held[0].0);
    let was = of(&before, &held[0].0);
    assert!(after.packets >= was.packets + 3, "{was:?} -> {after:?}");
    assert!(after.age_ms >= was.age_ms, "{was:?} -> {after:?}");

    let cut = flows(&["--json", "flows", "--limit", "2"]);
    assert_eq!((cut.matched, cut.flows.len()), (3, 2), "{cut:?}");
    // Least idle first: the flow that just talked leads.
    assert_eq!(cut.flows[0].client, after.client, "{cut:?}");

    let table = sy.ctl(&["flows"]);
    assert_eq!(table.code, Some(0), "{table:?}");
    for (stream, backend) in &held {
        let port = stream.local_addr().expect("local address").port();
        assert!(table.stdout.contains(&format!(":{port}")), "{table:?}");
        assert!(table.stdout.contains(backend.as_str()), "{table:?}");
    }
    let unknown = sy.ctl(&["flows", "nope"]);
    assert_eq!(unknown.code, Some(1), "{unknown:?}");
    assert!(
        unknown.stderr.contains("nope") && unknown.stderr.contains(&name),
        "{unknown:?}"
    );

    drop(held);
    wait_for_counts_back_to_zero(&topo);
    assert_stopped_idle(sy);
}

/// `config` with a `[service.limits]` table of `keys` (lines) in its (first) service.
fn with_limits(config: &str, keys: &str) -> String {
    let first_backend = "\n[[service.backend]]\n";
    assert!(config.contains(first_backend), "no backend in {config}");
    config.replacen(
        first_backend,
        &format!("\n[service.limits]\n{keys}\n{first_backend}"),
        1,
    )
}

/// `ctl show`'s per-source rejections of the first service.
fn shown_sources(sy: &Switchyard) -> switchyard::control::SourceRejections {
    let shown = sy.ctl(&["--json", "show"]);
    let report: switchyard::control::ShowReport =
        serde_json::from_str(&shown.stdout).expect("show --json");
    report.services[0].sources.clone()
}

/// The kernel's `[service.limits]` drops of the first service in the shutdown totals.
fn kernel_drops(sy: &Switchyard) -> switchyard::totals::KernelSourceTotals {
    let totals = sy.totals();
    totals.services[0]
        .kernel
        .expect("the xdp service's kernel counters")
        .sources
}

/// Adds `ips` to the client namespace's interface (sources of their own for sessions).
fn add_client_addresses(topo: &Topology, ips: &[Ipv4Addr]) {
    for ip in ips {
        topo.client
            .ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"])
            .expect("a client address");
    }
}

/// A session from `source` (an address of the client namespace) where a failure may be
/// expected: each step gets 1 s.
fn quick_session_from(topo: &Topology, source: Ipv4Addr) -> anyhow::Result<String> {
    let options = SessionOptions {
        source: Some(source.into()),
        step_timeout: Some(Duration::from_secs(1)),
        ..SessionOptions::default()
    };
    session_with(topo, vip().into(), options)
}

/// Denied SYNs and SYNs over a source's rate are dropped in the kernel and counted by reason,
/// exactly (crafted SYNs, one per source port), while another client's sessions complete; a
/// denied client's real connection gets nowhere; `/metrics` and `ctl show` say the same.
#[test]
fn limits_drop_denied_and_too_fast_syns_while_other_clients_complete() {
    limits_drop_denied_and_too_fast_syns_while_other_clients_complete_on(Net::Prepared);
}

/// The same on the network a user has (default offloads, nothing on the peers, generic mode).
#[test]
fn plain_topology_limits_drop_denied_and_too_fast_syns_while_other_clients_complete() {
    limits_drop_denied_and_too_fast_syns_while_other_clients_complete_on(Net::Plain);
}

fn limits_drop_denied_and_too_fast_syns_while_other_clients_complete_on(net: Net) {
    use testkit::metrics_text::Exposition;
    let Some((topo, name)) = running_on(net, Layout::Dsr) else {
        return;
    };
    let denied = Ipv4Addr::new(198, 18, 0, 161);
    add_client_addresses(&topo, &[denied]);
    let web: SocketAddr = "127.0.0.1:9025".parse().expect("address");
    let admin = testkit::config_toml::admin_table_listening("admin.sock".as_ref(), web);
    let config = with_limits(
        &topo.service_toml(&name, "round_robin"),
        "deny = [\"198.18.0.160/28\"]\nper_source_rate = 1\nper_source_burst = 5\n",
    );
    let mut sy = topo.start(&format!("{config}{admin}"));
    wait_for_every_backend_to_take_flows(&sy);

    // Crafted SYNs: 7 from a denied source, 12 from a source over its rate (5 in the burst).
    let flooder = Ipv4Addr::new(198, 18, 0, 190);
    topo.client
        .run(move || {
            netns::send_syns(Ipv4Addr::new(198, 18, 0, 165), vip(), 30000..30007)?;
            netns::send_syns(flooder, vip(), 31000..31012)
        })
        .expect("crafted SYNs");
    let refused = quick_session_from(&topo, denied);
    assert!(refused.is_err(), "a denied client was served: {refused:?}");
    for _ in 0..3 {
        let served = one_session(&topo, vip());
        assert!(served.is_ok(), "{served:?}\n{}", sy.stderr_text());
    }
    let shown = shown_sources(&sy);
    // The denied client's SYN and its retransmissions count too.
    assert!(shown.denied > 7, "{shown:?}");
    assert!(
        (6..=7).contains(&shown.too_fast),
        "12 SYNs at once, 5 in the burst: {shown:?}"
    );
    assert_eq!(shown.too_many, 0, "{shown:?}");
    let scraped = topo
        .balancer
        .run(move || Exposition::scrape(web))
        .unwrap_or_else(|e| panic!("scrape: {e:#}"));
    for (reason, value) in [("denied", shown.denied), ("too_fast", shown.too_fast)] {
        let labels = [("service", name.as_str()), ("reason", reason)];
        let scraped = scraped.get("switchyard_service_source_rejections_total", &labels);
        // The denied client's SYN may be retransmitted between the two reads.
        assert!(scraped >= value as f64, "{reason}: {scraped} < {value}");
    }
    assert!(sy.terminate().success(), "{}", sy.stderr_text());
    let drops = kernel_drops(&sy);
    assert_eq!(drops.not_allowed, 0, "{drops:?}");
    assert!(
        drops.denied > 7 && drops.too_fast == shown.too_fast,
        "{drops:?}"
    );
}

/// A source at `per_source_connections` open flows has its next SYN dropped while another
/// source is served; once one of its sessions ends (the flow gives its unit back), it is
/// served again.
#[test]
fn a_source_at_its_concurrent_limit_is_dropped_while_another_is_served() {
    let Some((topo, name)) = running_topology(Layout::Dsr) else {
        return;
    };
    let other = Ipv4Addr::new(198, 18, 0, 150);
    add_client_addresses(&topo, &[other]);
    let config = with_limits(
        &topo.service_toml(&name, "least_conn"),
        "per_source_connections = 2\n",
    );
    let sy = topo.start(&config);
    wait_for_every_backend_to_take_flows(&sy);
    let mut held: Vec<HeldSession> = (0..2)
        .map(|_| HeldSession::open_in(&topo.client, vip().into()).expect("a held session"))
        .collect();
    let third = quick_session_from(&topo, netns::CLIENT);
    assert!(third.is_err(), "a third session was served: {third:?}");
    let served = quick_session_from(&topo, other);
    assert!(
        served.is_ok(),
        "another source: {served:?}\n{}",
        sy.stderr_text()
    );
    assert!(shown_sources(&sy).too_many >= 1);

    held.pop()
        .expect("held")
        .finish()
        .expect("held session completes");
    let again = one_session(&topo, vip());
    assert!(
        again.is_ok(),
        "after one ended: {again:?}\n{}",
        sy.stderr_text()
    );
    for session in held {
        session.finish().expect("held session completes");
    }
    wait_for_counts_back_to_zero(&topo);
    assert_stopped_idle(sy);
}

/// With an allow list only its networks are served (others' SYNs dropped and counted as not
/// allowed); a deny entry wins over a wider allow entry; a reload that removes the deny entry
/// (keeping another) lets that client in at once.
#[test]
fn allow_only_serves_its_networks_and_a_reload_lifts_a_deny() {
    let Some((topo, name)) = running_topology(Layout::Dsr) else {
        return;
    };
    let lifted = Ipv4Addr::new(198, 18, 0, 150);
    add_client_addresses(&topo, &[lifted]);
    let service = topo.service_toml(&name, "least_conn");
    let allow = "allow = [\"198.18.0.0/24\"]\n";
    let config = with_limits(&service, &format!("{allow}deny = [\"{lifted}/32\"]\n"));
    let mut sy = topo.start(&config);
    wait_for_every_backend_to_take_flows(&sy);
    let served = one_session(&topo, vip());
    assert!(served.is_ok(), "{served:?}\n{}", sy.stderr_text());
    let refused = quick_session_from(&topo, lifted);
    assert!(refused.is_err(), "a denied client was served: {refused:?}");
    // Outside the allow list.
    topo.client
        .run(|| netns::send_syns(Ipv4Addr::new(198, 18, 5, 5), vip(), 32000..32009))
        .expect("crafted SYNs");

    // The deny list stays (another entry): the lifted entry must leave the trie.
    reload_with(
        &sy,
        &with_limits(&service, &format!("{allow}deny = [\"198.18.0.200/32\"]\n")),
    );
    wait_for(
        "the lifted deny to reach the kernel",
        Duration::from_secs(5),
        || sy.stderr_text().contains("[service.limits] changed"),
    );
    let now_served = quick_session_from(&topo, lifted);
    assert!(
        now_served.is_ok(),
        "after the reload: {now_served:?}\n{}",
        sy.stderr_text()
    );
    assert!(sy.terminate().success(), "{}", sy.stderr_text());
    let drops = kernel_drops(&sy);
    assert_eq!(drops.not_allowed, 9, "{drops:?}");
    assert!(drops.denied >= 1, "{drops:?}");
}

/// A bounded SYN flood from 20 000 random (spoofed) sources: the per-source table stays at its
/// bound (`tracked_sources`), and a legitimate client's sessions all complete meanwhile.
#[test]
fn a_spoofed_source_syn_flood_leaves_the_source_table_at_its_bound() {
    const BOUND: usize = 2000;
    const FLOOD: u32 = 20_000;
    let Some((topo, name)) = running_topology(Layout::Dsr) else {
        return;
    };
    let config = with_limits(
        &topo.service_toml(&name, "least_conn"),
        &format!("per_source_rate = 50\ntracked_sources = {BOUND}\n"),
    );
    let sy = topo.start(&config);
    wait_for_every_backend_to_take_flows(&sy);
    // Sources in 198.19.0.0/16 (test addresses), a different one for nearly every SYN.
    let flood = topo.client.spawn(|| {
        let mut state = 0x2545_f491u32;
        let sources = (0..FLOOD).map(move |_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            let [_, _, c, d] = state.to_be_bytes();
            SocketAddrV4::new(Ipv4Addr::new(198, 19, c, d), 40000 + (state % 20000) as u16)
        });
        netns::send_syns_from(sources, vip())
    });
    let during = sessions(&topo, 10, Duration::ZERO);
    flood.join().expect("flood thread").expect("the SYN flood");
    let after = sessions(&topo, 10, Duration::ZERO);
    for result in during.iter().chain(&after) {
        assert!(result.is_ok(), "{result:?}\n{}", sy.stderr_text());
    }
    let map = attached_map(&topo, "SOURCES");
    let table: aya::maps::HashMap<_, [u8; 20], [u8; 16]> =
        aya::maps::HashMap::try_from(map).expect("SOURCES is a hash map");
    let entries = table.keys().filter_map(Result::ok).count();
    assert!(
        (BOUND / 2..=BOUND).contains(&entries),
        "{entries} sources tracked, bound {BOUND}"
    );
    wait_for(
        "ctl show to count the table",
        Duration::from_secs(12),
        || {
            let tracked = shown_sources(&sy).tracked as usize;
            tracked > 0 && tracked <= BOUND
        },
    );
}

/// A flow that goes idle without FIN gives its source's unit back when the control plane
/// expires it: a crafted SYN from an address nobody holds leaves an open flow for its /24
/// (`source_prefix_v4 = 24`, `per_source_connections = 1`), so the real client in that /24 is
/// dropped; once the flow expired, the client is served.
#[test]
fn an_expired_idle_flow_gives_its_sources_unit_back() {
    let Some((topo, name)) = running_topology(Layout::Dsr) else {
        return;
    };
    let config = with_limits(
        &topo
            .service_toml(&name, "least_conn")
            .replace("flow_idle_timeout = \"5m\"", "flow_idle_timeout = \"2s\""),
        "per_source_connections = 1\nsource_prefix_v4 = 24\n",
    );
    let sy = topo.start(&config);
    wait_for_every_backend_to_take_flows(&sy);
    topo.client
        .run(|| netns::send_syns(Ipv4Addr::new(198, 18, 0, 240), vip(), 33000..33001))
        .expect("a crafted SYN");
    let refused = quick_session(&topo, vip());
    assert!(refused.is_err(), "the /24 is at its limit: {refused:?}");
    assert!(shown_sources(&sy).too_many >= 1);
    // 2 s idle plus at most one expiry period (500 ms) and one sync period.
    wait_for("the idle flow to expire", Duration::from_secs(8), || {
        active_counts(&topo).iter().all(|&c| c == 0)
    });
    let again = one_session(&topo, vip());
    assert!(
        again.is_ok(),
        "after the expiry: {again:?}\n{}",
        sy.stderr_text()
    );
}

/// A backend's `max_session_rate` holds in the kernel path too: with round robin over three
/// backends and mta1 limited to 5 new flows a second, mta1 gets at most its rate (+10 %, and
/// the burst) while mta2 and mta3 take the rest, and no session fails.
#[test]
fn a_backend_at_its_max_session_rate_gets_no_more_new_flows_in_the_kernel() {
    a_backend_at_its_max_session_rate_gets_no_more_new_flows_in_the_kernel_on(Net::Prepared);
}

/// The same on the network a user has (default offloads, nothing on the peers, generic mode).
#[test]
fn plain_topology_a_backend_at_its_max_session_rate_gets_no_more_new_flows_in_the_kernel() {
    a_backend_at_its_max_session_rate_gets_no_more_new_flows_in_the_kernel_on(Net::Plain);
}

fn a_backend_at_its_max_session_rate_gets_no_more_new_flows_in_the_kernel_on(net: Net) {
    let Some((topo, name)) = running_on(net, Layout::Nat) else {
        return;
    };
    let config = with_backend_keys(
        &topo.service_toml(&name, "round_robin"),
        1,
        "max_session_rate = 5\n",
    );
    let sy = topo.start(&config);
    let started = Instant::now();
    let mut failures = Vec::new();
    let mut sessions = 0;
    while started.elapsed() < Duration::from_secs(3) {
        match one_session(&topo, vip()) {
            Ok(_) => sessions += 1,
            Err(error) => failures.push(error.to_string()),
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    assert!(failures.is_empty(), "{failures:?}\n{}", sy.stderr_text());
    let per_backend = sessions_per_backend(&topo);
    let allowed = (5.0 * seconds * 1.1).ceil() as usize + 2;
    assert!(
        per_backend[0] <= allowed && per_backend[0] >= 5,
        "mta1 got {} of {sessions} in {seconds:.2} s (at most {allowed}): {per_backend:?}",
        per_backend[0]
    );
    assert!(
        per_backend[1] + per_backend[2] > 3 * per_backend[0],
        "the others took the rest: {per_backend:?}"
    );
    wait_for_counts_back_to_zero(&topo);
    assert_stopped_idle(sy);
}

/// Opens a session from the client namespace to `target` and reads its 220 greeting; the open
/// connection is handed back (no packet is sent until the test writes).
fn hold_quiet_session(topo: &Topology, target: SocketAddr) -> std::net::TcpStream {
    topo.client.run(move || {
        let stream =
            std::net::TcpStream::connect_timeout(&target, Duration::from_secs(5)).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut greeting = [0u8; 64];
        let n = std::io::Read::read(&mut &stream, &mut greeting).expect("greeting");
        assert!(greeting[..n].starts_with(b"220 "), "greeting");
        stream
    })
}

/// Sends `line` on `stream` and reads the reply (all its lines): an error unless it has `code`.
fn exchange(
    stream: &std::net::TcpStream,
    reader: &mut impl std::io::BufRead,
    line: &str,
    code: &str,
) -> anyhow::Result<()> {
    std::io::Write::write_all(&mut &*stream, line.as_bytes())?;
    loop {
        let mut reply = String::new();
        anyhow::ensure!(reader.read_line(&mut reply)? > 0, "closed after {line:?}");
        anyhow::ensure!(reply.starts_with(code), "{line:?} answered {reply:?}");
        if reply.as_bytes().get(3) == Some(&b' ') {
            return Ok(());
        }
    }
}

/// Goes on with a session held by [`hold_quiet_session`]: EHLO, one message, QUIT.
fn finish_quiet_session(stream: &std::net::TcpStream) -> anyhow::Result<()> {
    let mut reader = std::io::BufReader::new(stream.try_clone()?);
    for (line, code) in [
        ("EHLO client.test\r\n", "250"),
        ("MAIL FROM:<sender@client.test>\r\n", "250"),
        ("RCPT TO:<rcpt@example.test>\r\n", "250"),
        ("DATA\r\n", "354"),
        (
            "Subject: moved\r\n\r\nA session another balancer began.\r\n.\r\n",
            "250",
        ),
        ("QUIT\r\n", "221"),
    ] {
        exchange(stream, &mut reader, line, code)?;
    }
    Ok(())
}

/// The balancer's /metrics (served on its loopback) as text, checked by `promtool check
/// metrics`.
fn scrape_checked(topo: &Topology, web: SocketAddr) -> testkit::metrics_text::Exposition {
    let (text, _) = topo
        .balancer
        .run(move || testkit::metrics_text::scrape(web))
        .unwrap_or_else(|e| panic!("scrape: {e:#}"));
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (cargo xtask setup installs it)");
    let mut stdin = promtool.stdin.take().expect("promtool's stdin");
    std::io::Write::write_all(&mut stdin, text.as_bytes()).expect("feed promtool");
    drop(stdin);
    let checked = promtool.wait_with_output().expect("promtool");
    assert!(
        checked.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    testkit::metrics_text::Exposition::parse(&text).expect("exposition")
}

/// A flow that this balancer has no entry for, as when ECMP moves a flow another balancer
/// began: a dsr session of `algorithm` through the VIP of `family` is held open (greeted, then
/// silent) while switchyard restarts without pinned maps, so the new program has never seen
/// it. The network, the second switchyard (serving /metrics on the balancer's loopback at the
/// returned address), and the held connection.
fn a_flow_without_an_entry(
    net: Net,
    family: Family,
    algorithm: &str,
) -> Option<(Network, Switchyard, std::net::TcpStream, SocketAddr)> {
    let (topo, name) = running_on(net, Layout::Dsr)?;
    let web: SocketAddr = "127.0.0.1:9025".parse().expect("address");
    let admin = testkit::config_toml::admin_table_listening("admin.sock".as_ref(), web);
    let service = match family {
        Family::V4 => topo.service_toml(&name, algorithm),
        Family::V6 => topo.ipv6_service_toml(&name, algorithm),
    };
    let config = format!("{service}{admin}");
    let mut first = topo.start(&config);
    // Until dsr knows every backend's MAC, ip_hash's SYN would skip the unknown ones.
    wait_for_every_backend_to_take_flows(&first);
    let held = hold_quiet_session(&topo, family.vip());
    assert!(first.terminate().success());
    // The balancer's neighbour table kept the MACs: every backend takes flows from the start.
    let second = topo.start(&config);
    Some((topo, second, held, web))
}

/// The first service as `ctl show --json` reports it.
fn shown_service(sy: &Switchyard) -> switchyard::control::ServiceReport {
    let shown = sy.ctl(&["--json", "show"]);
    let report: switchyard::control::ShowReport =
        serde_json::from_str(&shown.stdout).expect("show --json");
    report.services[0].clone()
}

/// An ip_hash flow this balancer has no entry for is adopted: its next packet walks the Maglev
/// table as its SYN did elsewhere and finds the same backend, the session completes, the flow
/// counts once while open and gives its count back at its end; /metrics and `ctl show` say
/// one flow adopted.
fn an_ip_hash_flow_without_an_entry_is_adopted_and_completes_on(net: Net, family: Family) {
    let Some((topo, sy, held, web)) = a_flow_without_an_entry(net, family, "ip_hash") else {
        return;
    };
    let finished = finish_quiet_session(&held);
    assert!(finished.is_ok(), "{finished:?}\n{}", sy.stderr_text());
    assert_eq!(
        active_counts(&topo).iter().sum::<u64>(),
        1,
        "the adopted flow counts"
    );
    drop(held);
    wait_for_counts_back_to_zero(&topo);
    let shown = shown_service(&sy);
    assert_eq!(shown.flows_adopted, Some(1));
    assert_eq!(shown.unknown_flow_packets, Some(0));
    let scraped = scrape_checked(&topo, web);
    let service = [("service", shown.name.as_str())];
    assert_eq!(
        scraped.get("switchyard_xdp_flows_adopted_total", &service),
        1.0
    );
    assert_eq!(
        scraped.get("switchyard_xdp_unknown_flow_packets_total", &service),
        0.0
    );
    assert_stopped_idle(sy);
}

#[test]
fn an_ip_hash_flow_without_an_entry_is_adopted_and_completes() {
    an_ip_hash_flow_without_an_entry_is_adopted_and_completes_on(Net::Prepared, Family::V4);
}

#[test]
fn an_ip_hash_ipv6_flow_without_an_entry_is_adopted_and_completes() {
    an_ip_hash_flow_without_an_entry_is_adopted_and_completes_on(Net::Prepared, Family::V6);
}

#[test]
fn plain_topology_an_ip_hash_flow_without_an_entry_is_adopted_and_completes() {
    an_ip_hash_flow_without_an_entry_is_adopted_and_completes_on(Net::Plain, Family::V4);
}

/// A round_robin flow this balancer has no entry for has no shared table to follow: its
/// packets pass to the stack, counted as unknown-flow packets (the same in /metrics and `ctl
/// show`), and no backend gets any of them.
#[test]
fn a_round_robin_flow_without_an_entry_is_counted_and_reaches_no_backend() {
    let Some((topo, sy, held, web)) =
        a_flow_without_an_entry(Net::Prepared, Family::V4, "round_robin")
    else {
        return;
    };
    std::io::Write::write_all(&mut &held, b"EHLO client.test\r\n").expect("write");
    let unknown = || shown_service(&sy).unknown_flow_packets.unwrap_or(0);
    wait_for("an unknown-flow packet", Duration::from_secs(5), || {
        unknown() >= 1
    });
    let shown = shown_service(&sy);
    let scraped = scrape_checked(&topo, web);
    let service = [("service", shown.name.as_str())];
    assert_eq!(shown.flows_adopted, Some(0));
    assert_eq!(
        scraped.get("switchyard_xdp_flows_adopted_total", &service),
        0.0
    );
    // Later retransmissions may have been counted since ctl show answered.
    let scraped_unknown = scraped.get("switchyard_xdp_unknown_flow_packets_total", &service);
    assert!(scraped_unknown >= shown.unknown_flow_packets.unwrap_or(0) as f64);
    let forwarded = [("service", shown.name.as_str()), ("action", "forwarded")];
    assert_eq!(
        scraped.get("switchyard_service_xdp_packets_total", &forwarded),
        0.0
    );
    assert_eq!(
        scraped.sum("switchyard_backend_xdp_packets_total", &[]),
        0.0
    );
    assert!(active_counts(&topo).iter().all(|&c| c == 0));
    drop(held);
}
