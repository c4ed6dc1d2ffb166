//! Health-gated announcement through BIRD, end to end: a router namespace running BIRD (BGP,
//! multipath into its kernel table) and a balancer namespace running BIRD and switchyard. The
//! router's kernel routing table says whether the VIP is announced: it must follow the
//! backends' health, `ctl node drain`/`undrain`, and be gone before switchyard exits on SIGTERM,
//! while sessions through the VIP finish. Root only; BIRD 2 (`cargo xtask setup` installs
//! Debian's `bird2`).

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use testkit::bird::{self, Bird, bird_available, socket_in};
use testkit::config_toml::ServiceToml;
use testkit::harness::Launch;
use testkit::netns::{Netns, suffix};
use testkit::smtp_server::{Behaviour, SmtpServer, bind_listener};

const BIN: &str = env!("CARGO_BIN_EXE_switchyard");

const ROUTER_IP: &str = "198.18.40.1";
const BALANCER_IP: &str = "198.18.40.2";
const VIP: &str = "198.18.41.10";
const VIP_PORT: u16 = 25;
/// The admin listener (`/metrics`), inside the balancer's namespace.
const METRICS_PORT: u16 = 9101;

fn router_bird() -> String {
    bird::router_config(ip(ROUTER_IP), &[ip(BALANCER_IP)])
}

fn balancer_bird() -> String {
    bird::balancer_config(ip(BALANCER_IP), ip(ROUTER_IP), ip(VIP), "vip_mx")
}

fn ip(text: &str) -> Ipv4Addr {
    text.parse().expect("an IPv4 address")
}

/// Router and balancer on one veth; the balancer holds the VIP on `lo`. The router also has a
/// low-preference static route to the VIP (as if another balancer still announced it), so a
/// session keeps its path while the balancer's BGP route is gone.
struct Topology {
    router: Netns,
    balancer: Netns,
}

fn topology() -> Topology {
    let id = suffix();
    let router = Netns::new(format!("sy-ar{id}")).expect("router namespace");
    let balancer = Netns::new(format!("sy-ab{id}")).expect("balancer namespace");
    let (r_if, b_if) = (format!("sy-ar{id}"), format!("sy-ab{id}"));
    testkit::topology::veth(&router, &r_if, &balancer, &b_if).expect("veth");
    for (ns, address, interface) in [(&router, ROUTER_IP, &r_if), (&balancer, BALANCER_IP, &b_if)] {
        ns.ip(&["addr", "add", &format!("{address}/24"), "dev", interface])
            .expect("address");
        ns.ip(&["link", "set", interface, "up"]).expect("link up");
    }
    balancer
        .ip(&["addr", "add", &format!("{VIP}/32"), "dev", "lo"])
        .expect("VIP on lo");
    router
        .ip(&[
            "route",
            "add",
            &format!("{VIP}/32"),
            "via",
            BALANCER_IP,
            "metric",
            "4000",
        ])
        .expect("fallback route");
    Topology { router, balancer }
}

/// Whether the router's kernel table has the VIP route BIRD installed.
fn router_has_bgp_route(router: &Netns) -> bool {
    bird::nexthops(router, ip(VIP)) > 0
}

/// Waits until the route is (or is not) there; the time it took.
fn wait_route(router: &Netns, present: bool, what: &str) -> Duration {
    bird::wait_nexthops(router, ip(VIP), usize::from(present), what)
}

/// An SMTP session from the router's namespace to the VIP, greeted and held open.
struct Held {
    reader: BufReader<TcpStream>,
}

impl Held {
    fn open(router: &Netns) -> Held {
        let vip: SocketAddr = format!("{VIP}:{VIP_PORT}").parse().expect("vip");
        let stream = router
            .run(move || TcpStream::connect_timeout(&vip, Duration::from_secs(5)))
            .expect("connect to the VIP");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut held = Held {
            reader: BufReader::new(stream),
        };
        assert_eq!(held.reply(), 220, "greeting through the VIP");
        held
    }

    fn reply(&mut self) -> u16 {
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("SMTP reply");
        line.get(..3).and_then(|c| c.parse().ok()).unwrap_or(0)
    }

    /// NOOP then QUIT: the session still works to its end.
    fn finish(mut self) {
        self.reader.get_mut().write_all(b"NOOP\r\n").expect("NOOP");
        assert_eq!(self.reply(), 250, "NOOP on the held session");
        self.reader.get_mut().write_all(b"QUIT\r\n").expect("QUIT");
        assert_eq!(self.reply(), 221, "QUIT on the held session");
    }
}

/// `GET /metrics` from inside the balancer's namespace.
fn metrics(balancer: &Netns) -> String {
    balancer.run(|| {
        let mut stream =
            TcpStream::connect(("127.0.0.1", METRICS_PORT)).expect("connect to /metrics");
        stream
            .write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
            .expect("request");
        let mut text = String::new();
        std::io::Read::read_to_string(&mut stream, &mut text).expect("response");
        text
    })
}

fn backend_in(ns: &Netns, name: &str, address: SocketAddr) -> SmtpServer {
    let listener: TcpListener = ns
        .run(move || bind_listener(address))
        .expect("backend listener");
    SmtpServer::serve(name, Behaviour::default(), listener).expect("backend")
}

fn switchyard_config(bird_socket: &Path, backends: &[SocketAddr]) -> String {
    let vip: SocketAddr = format!("{VIP}:{VIP_PORT}").parse().expect("vip");
    let mut service = ServiceToml::new("mx", &[vip])
        .keys("announce = true\nannounce_protocol = \"vip_mx\"")
        .health("kind = \"smtp\"\ninterval = \"200ms\"\ntimeout = \"150ms\"\nrise = 1\nfall = 1");
    for (index, address) in backends.iter().enumerate() {
        service = service.backend(&format!("mta{}", index + 1), address);
    }
    format!(
        "shutdown_timeout = \"20s\"\n[admin]\nsocket = \"admin.sock\"\nlisten = \"127.0.0.1:{METRICS_PORT}\"\n[announce]\nbird_socket = {:?}\n\n{service}",
        bird_socket.display().to_string()
    )
}

#[test]
fn vip_follows_health_node_drain_and_shutdown() {
    if !bird_available() {
        return;
    }
    let net = topology();
    let router_bird = Bird::start(&net.router, &router_bird());
    let balancer_bird = Bird::start(&net.balancer, &balancer_bird());
    let addresses: Vec<SocketAddr> = vec![
        "127.0.0.1:2601".parse().expect("address"),
        "127.0.0.1:2602".parse().expect("address"),
    ];
    let mut backends: Vec<Option<SmtpServer>> = addresses
        .iter()
        .enumerate()
        .map(|(i, a)| Some(backend_in(&net.balancer, &format!("mta{}", i + 1), *a)))
        .collect();

    // BIRD alone never announces: the static protocol starts disabled.
    balancer_bird.wait_established("uplink");
    assert!(
        !router_has_bgp_route(&net.router),
        "announced before switchyard ran:\n{}",
        router_bird.birdc(&["show", "route"])
    );

    let mut sy = Launch::new(BIN).start_in(
        &net.balancer,
        &switchyard_config(balancer_bird.socket(), &addresses),
    );
    let up = wait_route(&net.router, true, "switchyard up with healthy backends");
    eprintln!("route appeared {up:?} after switchyard was ready");

    // Every backend down: withdrawn. Timed from the last backend's listener closing (health
    // checks every 200 ms, fall 1, included).
    backends[0] = None;
    std::thread::sleep(Duration::from_millis(600));
    assert!(router_has_bgp_route(&net.router), "withdrawn with mta2 up");
    backends[1] = None;
    let all_down = wait_route(&net.router, false, "every backend down");
    eprintln!("FIGURE last backend down -> router route gone: {all_down:?}");

    // One back: announced again.
    backends[1] = Some(backend_in(&net.balancer, "mta2", addresses[1]));
    let back = wait_route(&net.router, true, "a backend recovered");
    eprintln!("backend back -> router route back: {back:?}");

    // Node drain: withdrawn while a session through the VIP goes on; undrain returns.
    let held = Held::open(&net.router);
    let drained_at = Instant::now();
    let drain = sy.ctl(&["node", "drain"]);
    assert_eq!(drain.code, Some(0), "ctl node drain: {drain:?}");
    wait_route(&net.router, false, "ctl node drain");
    let drained = drained_at.elapsed();
    eprintln!("FIGURE ctl node drain -> router route gone: {drained:?}");
    let show = sy.ctl(&["--json", "show"]);
    let report: serde_json::Value = serde_json::from_str(&show.stdout).expect("show json");
    assert_eq!(report["node"]["drained"], true, "{}", show.stdout);
    assert_eq!(
        report["services"][0]["announce"]["announced"], false,
        "{}",
        show.stdout
    );
    held.finish();
    let undrain = sy.ctl(&["node", "undrain"]);
    assert_eq!(undrain.code, Some(0), "ctl node undrain: {undrain:?}");
    wait_route(&net.router, true, "ctl node undrain");

    // Each confirmed change counted: announced at start, after the recovery and the undrain;
    // withdrawn when every backend was down and on the drain.
    let text = metrics(&net.balancer);
    for series in [
        "switchyard_announcements_total{service=\"mx\",action=\"announce\"} 3",
        "switchyard_announcements_total{service=\"mx\",action=\"withdraw\"} 2",
        "switchyard_service_announced{service=\"mx\"} 1",
    ] {
        assert!(text.contains(series), "no {series} in:\n{text}");
    }

    // SIGTERM with a session open: the route goes before switchyard exits (it waits for the
    // session), and the session still finishes.
    let held = Held::open(&net.router);
    sy.signal(nix::sys::signal::Signal::SIGTERM);
    wait_route(&net.router, false, "SIGTERM");
    assert!(
        sy.wait_timeout(Duration::from_millis(100)).is_none(),
        "switchyard exited before its session ended"
    );
    held.finish();
    let status = sy.wait_timeout(Duration::from_secs(10)).expect("exit");
    assert!(status.success(), "switchyard exit: {status:?}");
    drop(backends);
}

#[test]
fn bird_unreachable_is_retried_and_never_blames_backends() {
    if !bird_available() {
        return;
    }
    let net = topology();
    let _router_bird = Bird::start(&net.router, &router_bird());
    let address: SocketAddr = "127.0.0.1:2601".parse().expect("address");
    let _backend = backend_in(&net.balancer, "mta1", address);
    // The socket BIRD will serve later: nothing listens there yet.
    let dir = tempfile::tempdir().expect("directory");
    let socket = socket_in(dir.path());
    let sy = Launch::new(BIN).start_in(&net.balancer, &switchyard_config(&socket, &[address]));

    // Sessions are served, the backend stays up, and `show` says what is wrong.
    std::thread::sleep(Duration::from_secs(1));
    Held::open(&net.router).finish();
    let show = sy.ctl(&["--json", "show"]);
    let report: serde_json::Value = serde_json::from_str(&show.stdout).expect("show json");
    let service = &report["services"][0];
    assert_eq!(service["backends"][0]["state"], "up", "{}", show.stdout);
    assert_eq!(service["announce"]["announced"], false, "{}", show.stdout);
    let why = service["announce"]["why"].as_str().unwrap_or("");
    assert!(why.contains("unreachable"), "{}", show.stdout);

    // BIRD starts on that socket: switchyard's retries find it and announce.
    let _late_bird = Bird::start_in(&net.balancer, &balancer_bird(), dir);
    wait_route(&net.router, true, "BIRD reachable again");
}

/// The shipped example is a configuration BIRD accepts.
#[test]
fn shipped_bird_conf_parses() {
    if !bird_available() {
        return;
    }
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/bird.conf");
    let output = Command::new("bird")
        .arg("-p")
        .arg("-c")
        .arg(&file)
        .output()
        .expect("bird -p");
    assert!(
        output.status.success(),
        "{}: {}",
        file.display(),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Both BIRDs, one backend and a switchyard announcing service mx, its route at the router.
struct Announcing {
    // Dropped in this order: switchyard withdraws through a BIRD still running.
    switchyard: testkit::harness::Switchyard,
    _backend: SmtpServer,
    _birds: [Bird; 2],
}

impl Announcing {
    fn start(net: &Topology) -> Announcing {
        let router = Bird::start(&net.router, &router_bird());
        let balancer = Bird::start(&net.balancer, &balancer_bird());
        let address: SocketAddr = "127.0.0.1:2601".parse().expect("address");
        let backend = backend_in(&net.balancer, "mta1", address);
        let config = switchyard_config(balancer.socket(), &[address]);
        let switchyard = Launch::new(BIN).start_in(&net.balancer, &config);
        wait_route(&net.router, true, "switchyard up with a healthy backend");
        Announcing {
            switchyard,
            _backend: backend,
            _birds: [router, balancer],
        }
    }
}

/// A reload that stops announcing a service withdraws its VIP (the protocol is not left on).
#[test]
fn reload_that_stops_announcing_withdraws() {
    if !bird_available() {
        return;
    }
    let net = topology();
    let announcing = Announcing::start(&net);
    let sy = &announcing.switchyard;

    let file = sy.config_dir().join("switchyard.toml");
    let written = std::fs::read_to_string(&file).expect("config");
    let without = written.replace("announce = true\nannounce_protocol = \"vip_mx\"\n", "");
    assert_ne!(written, without, "the test's config changed shape");
    std::fs::write(&file, without).expect("rewrite config");
    let reload = sy.ctl(&["reload"]);
    assert_eq!(reload.code, Some(0), "ctl reload: {reload:?}");
    wait_route(&net.router, false, "reload without announce");
}

/// A switchyard killed with SIGKILL cannot withdraw its VIP, and BIRD goes on announcing it:
/// `switchyard withdraw` (what the systemd unit runs as ExecStopPost) withdraws it with no
/// switchyard running, and says what it did; a second run finds nothing left to do.
#[test]
fn withdraw_after_a_kill_takes_the_route_away() {
    if !bird_available() {
        return;
    }
    let net = topology();
    let mut announcing = Announcing::start(&net);
    let sy = &mut announcing.switchyard;
    let config_file = sy.config_dir().join("switchyard.toml");

    sy.signal(nix::sys::signal::Signal::SIGKILL);
    assert!(
        sy.wait_timeout(Duration::from_secs(5)).is_some(),
        "not killed"
    );
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        router_has_bgp_route(&net.router),
        "the route went without anyone withdrawing it"
    );

    let withdraw = |expect: &str| {
        let output = net
            .balancer
            .command(BIN)
            .args(["withdraw", "--config"])
            .arg(&config_file)
            .output()
            .expect("run switchyard withdraw");
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(output.status.success(), "withdraw: {output:?}");
        assert!(stdout.contains(expect), "withdraw said: {stdout}");
    };
    withdraw("service mx: withdrawn (vip_mx disabled)");
    let gone = wait_route(&net.router, false, "switchyard withdraw");
    eprintln!("FIGURE switchyard withdraw -> router route gone: {gone:?}");
    withdraw("service mx: not announced (vip_mx was disabled already)");
}
