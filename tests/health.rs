//! Active health checks and PROXY protocol, end to end: the real binary checking real SMTP
//! servers on loopback, and the exact header bytes real backends receive.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use testkit::config_toml::ServiceToml;
use testkit::harness::{Switchyard, free_addr, free_addr_v6};
use testkit::smtp_client::smtp_session;
use testkit::smtp_server::{Behaviour, ProxyExpect, SmtpServer};

/// The binary under test.
const BIN: &str = env!("CARGO_BIN_EXE_switchyard");

const SIGNATURE: [u8; 12] = [
    0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A,
];

/// The PROXY v2 LOCAL header (no addresses) health checks send.
fn local_v2_header() -> Vec<u8> {
    let mut local = SIGNATURE.to_vec();
    local.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
    local
}

/// The round-robin service `name` on `listen` with PROXY headers `proxy` ("none", "v1",
/// "v2"); `health` is the body of `[service.health]`.
fn service(name: &str, listen: &[SocketAddr], proxy: &str, health: &str) -> ServiceToml {
    ServiceToml::new(name, listen)
        .keys(&format!(
            "algorithm = \"round_robin\"\nproxy_protocol = \"{proxy}\"\n\
             connect_timeout = \"1s\"\nretries = 2"
        ))
        .health(health)
}

/// Switchyard with the service "mx" on a fresh loopback port in front of `backends`.
fn start_in_front_of(
    backends: &[&SmtpServer],
    proxy: &str,
    health: &str,
) -> (SocketAddr, Switchyard) {
    let listen = free_addr();
    let toml = service("mx", &[listen], proxy, health).servers(backends);
    (listen, Switchyard::start(BIN, &toml.to_string()))
}

fn smtp_health(interval_ms: u64, rise: u32, fall: u32) -> String {
    format!(
        "kind = \"smtp\"\ninterval = \"{interval_ms}ms\"\ntimeout = \"{interval_ms}ms\"\n\
         rise = {rise}\nfall = {fall}\nehlo = \"checker.test\""
    )
}

/// Waits until `done` (at most `limit`, else fails with `what` and the log); returns how long
/// that took.
async fn wait_until(
    sy: &Switchyard,
    what: &str,
    limit: Duration,
    done: impl Fn() -> bool,
) -> Duration {
    let started = Instant::now();
    while !done() {
        assert!(
            started.elapsed() < limit,
            "{what} not within {limit:?}; stderr:\n{}",
            sy.stderr_text()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    started.elapsed()
}

/// Waits until `needle` has been logged `count` times; returns how long that took.
async fn wait_for_log(sy: &Switchyard, needle: &str, count: usize, limit: Duration) -> Duration {
    let what = format!("{needle:?} logged {count} time(s)");
    wait_until(sy, &what, limit, || log_count(sy, needle) >= count).await
}

/// Waits (at most 10 s) until backend `backend` of the service "mx" has been logged `state`
/// ("DOWN" or "UP") for the `times`th time; how long that took, and the first such line.
async fn wait_for_state(
    sy: &Switchyard,
    backend: &str,
    state: &str,
    times: usize,
) -> (Duration, String) {
    let needle = format!("backend {backend} of service mx is {state}");
    let took = wait_for_log(sy, &needle, times, Duration::from_secs(10)).await;
    let line = sy
        .stderr_text()
        .lines()
        .find(|l| l.contains(&needle))
        .unwrap_or_default()
        .to_string();
    (took, line)
}

/// A change of state `took` must have needed `checks` checks `interval_ms` apart (the first
/// runs at once).
fn assert_not_before_checks(took: Duration, state: &str, checks: u32, interval_ms: u64) {
    let at_least = Duration::from_millis(interval_ms * u64::from(checks - 1) - 50);
    assert!(
        took >= at_least,
        "{state} after {took:?}, before {checks} checks could decide"
    );
}

fn log_count(sy: &Switchyard, needle: &str) -> usize {
    sy.stderr_text().matches(needle).count()
}

/// `needle` has been logged exactly `count` times.
fn assert_log_count(sy: &Switchyard, needle: &str, count: usize) {
    assert_eq!(log_count(sy, needle), count, "{}", sy.stderr_text());
}

async fn sessions(addr: SocketAddr, n: usize) -> Vec<String> {
    let mut names = Vec::new();
    for _ in 0..n {
        names.push(
            smtp_session(addr)
                .await
                .expect("client session through switchyard"),
        );
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_falls_after_fall_checks_and_rises_after_rise_checks() {
    let (interval, rise, fall) = (200u64, 3u32, 3u32);
    let mta1 = SmtpServer::start("mta1", Behaviour::default());
    let mta2 = SmtpServer::start("mta2", Behaviour::default());
    let mta3 = SmtpServer::start("mta3", Behaviour::default());
    let (listen, sy) = start_in_front_of(
        &[&mta1, &mta2, &mta3],
        "none",
        &smtp_health(interval, rise, fall),
    );
    tokio::time::sleep(Duration::from_millis(interval * 2)).await;
    assert_log_count(&sy, "is DOWN", 0);
    assert!(mta2.connections() >= 1, "the first check runs at once");

    mta2.stop();
    let (took, line) = wait_for_state(&sy, "mta2", "DOWN", 1).await;
    assert_not_before_checks(took, "DOWN", fall, interval);
    assert!(line.contains("WARN"), "{line}");
    assert!(line.contains("connect failed"), "reason missing: {line}");
    assert!(
        line.contains(&format!("({fall} consecutive failures)")),
        "{line}"
    );

    let names = sessions(listen, 12).await;
    assert!(
        !names.iter().any(|n| n == "mta2"),
        "a DOWN backend got sessions: {names:?}"
    );

    mta2.restart();
    let (took, line) = wait_for_state(&sy, "mta2", "UP", 1).await;
    assert_not_before_checks(took, "UP", rise, interval);
    assert!(line.contains("INFO"), "{line}");

    let names = sessions(listen, 12).await;
    let on_mta2 = names.iter().filter(|n| *n == "mta2").count();
    assert!(
        on_mta2 >= 3,
        "an UP backend gets its share again: {names:?}"
    );

    // Many more checks later, each change is still logged exactly once.
    tokio::time::sleep(Duration::from_millis(interval * 5)).await;
    assert_log_count(&sy, "backend mta2 of service mx is DOWN", 1);
    assert_log_count(&sy, "backend mta2 of service mx is UP", 1);
    for other in ["mta1", "mta3"] {
        assert_log_count(&sy, &format!("backend {other} of service"), 0);
    }

    // And a second outage is a second (single) line.
    mta2.stop();
    wait_for_state(&sy, "mta2", "DOWN", 2).await;
    tokio::time::sleep(Duration::from_millis(interval * 4)).await;
    assert_log_count(&sy, "backend mta2 of service mx is DOWN", 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtp_check_marks_a_421_backend_down_and_tcp_check_does_not() {
    let interval = 200u64;
    let mta1 = SmtpServer::start("mta1", Behaviour::default());
    let mta2 = SmtpServer::start("mta2", Behaviour::greeting_with(421));
    let smtp_listen = free_addr();
    let tcp_listen = free_addr();
    let tcp_health = format!(
        "kind = \"tcp\"\ninterval = \"{interval}ms\"\ntimeout = \"{interval}ms\"\nrise = 2\nfall = 2"
    );
    let toml = format!(
        "{}{}",
        service("mx", &[smtp_listen], "none", &smtp_health(interval, 2, 2))
            .servers(&[&mta1, &mta2]),
        service("mx-tcp", &[tcp_listen], "none", &tcp_health).servers(&[&mta1, &mta2]),
    );
    let sy = Switchyard::start(BIN, &toml);

    let (_, line) = wait_for_state(&sy, "mta2", "DOWN", 1).await;
    assert!(
        line.contains("greeting 421 mta2 busy"),
        "reason missing: {line}"
    );

    // Down means not chosen: only the checks still touch it.
    let before = mta2.connections();
    let started = Instant::now();
    let names = sessions(smtp_listen, 6).await;
    let checks = started.elapsed().as_millis() as usize / interval as usize + 2;
    assert!(names.iter().all(|n| n == "mta1"), "{names:?}");
    assert!(
        mta2.connections() - before <= checks,
        "a DOWN backend was offered sessions ({} connections in {:?})",
        mta2.connections() - before,
        started.elapsed()
    );

    // The tcp check only connects, so it keeps the 421 backend up.
    tokio::time::sleep(Duration::from_millis(interval * 3)).await;
    assert_log_count(&sy, "of service mx-tcp is DOWN", 0);

    mta2.set_greeting_code(220);
    wait_for_state(&sy, "mta2", "UP", 1).await;
    let names = sessions(smtp_listen, 6).await;
    assert!(names.iter().any(|n| n == "mta2"), "{names:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kind_none_runs_no_checks() {
    let mta1 = SmtpServer::start("mta1", Behaviour::default());
    let (_, sy) = start_in_front_of(
        &[&mta1],
        "none",
        "kind = \"none\"\ninterval = \"100ms\"\ntimeout = \"100ms\"",
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        mta1.connections(),
        0,
        "no check may connect; stderr:\n{}",
        sy.stderr_text()
    );
    mta1.stop();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_log_count(&sy, "is DOWN", 0);
}

// ---------------------------------------------------------------------------------------------
// The check's conversation, as a strict SMTP server sees it
// ---------------------------------------------------------------------------------------------

/// What a checker did on one connection.
#[derive(Debug, Default, Clone)]
struct Conversation {
    /// Bytes received before the greeting was sent (only a PROXY header is allowed).
    before_greeting: Vec<u8>,
    /// Commands in order, each with whether more bytes had arrived before its reply was sent.
    commands: Vec<(String, bool)>,
    /// The client closed the connection after our 221.
    closed_after_quit: bool,
    /// The checker's address and ours, as the connection showed them.
    peer: Option<SocketAddr>,
    local: Option<SocketAddr>,
}

const GREETING_DELAY: Duration = Duration::from_millis(300);
const REPLY_DELAY: Duration = Duration::from_millis(100);

/// A strict SMTP server that greets late and answers slowly, so a checker that speaks before
/// the greeting or pipelines commands is caught in the act.
async fn recording_server() -> (SocketAddr, Arc<Mutex<Vec<Conversation>>>) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind recorder");
    let addr = listener.local_addr().expect("recorder address");
    let log = Arc::new(Mutex::new(Vec::new()));
    let shared = log.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let shared = shared.clone();
            tokio::spawn(async move {
                let conversation = record(stream).await;
                shared.lock().push(conversation);
            });
        }
    });
    (addr, log)
}

/// Everything readable right now, without waiting.
fn drain(stream: &TcpStream, into: &mut Vec<u8>) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        match stream.try_read(&mut buf) {
            Ok(0) => return false,
            Ok(n) => into.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
            Err(_) => return false,
        }
    }
}

async fn record(mut stream: TcpStream) -> Conversation {
    let mut conv = Conversation {
        peer: stream.peer_addr().ok(),
        local: stream.local_addr().ok(),
        ..Conversation::default()
    };
    tokio::time::sleep(GREETING_DELAY).await;
    drain(&stream, &mut conv.before_greeting);
    if stream.write_all(b"220 recorder ESMTP\r\n").await.is_err() {
        return conv;
    }
    let mut pending = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        while !pending.contains(&b'\n') {
            match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => pending.extend_from_slice(&buf[..n]),
                _ => return conv,
            }
        }
        let end = pending
            .iter()
            .position(|&b| b == b'\n')
            .map_or(0, |p| p + 1);
        let line: Vec<u8> = pending.drain(..end).collect();
        let line = String::from_utf8_lossy(&line).into_owned();
        tokio::time::sleep(REPLY_DELAY).await;
        drain(&stream, &mut pending);
        conv.commands.push((line.clone(), !pending.is_empty()));
        let reply: &[u8] = match line
            .get(..4)
            .unwrap_or_default()
            .to_ascii_uppercase()
            .as_str()
        {
            "EHLO" => b"250-recorder\r\n250-PIPELINING\r\n250 8BITMIME\r\n",
            "QUIT" => b"221 2.0.0 Bye\r\n",
            _ => b"502 5.5.2 Error: command not recognized\r\n",
        };
        if stream.write_all(reply).await.is_err() {
            return conv;
        }
        if line.starts_with("QUIT") {
            let closed = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buf)).await;
            conv.closed_after_quit = matches!(closed, Ok(Ok(0)));
            return conv;
        }
    }
}

async fn check_conversation(
    proxy: &str,
    expected_header: impl Fn(SocketAddr, SocketAddr) -> Vec<u8>,
) {
    let (backend, conversations) = recording_server().await;
    let listen = free_addr();
    let health = "kind = \"smtp\"\ninterval = \"1s\"\ntimeout = \"1s\"\nrise = 1\nfall = 1\n\
                  ehlo = \"checker.test\"";
    let toml = service("mx", &[listen], proxy, health).backend("rec", backend);
    let sy = Switchyard::start(BIN, &toml.to_string());
    wait_until(&sy, "two checks", Duration::from_secs(10), || {
        conversations.lock().len() >= 2
    })
    .await;
    for conv in conversations.lock().iter() {
        let (peer, local) = (
            conv.peer.expect("peer address"),
            conv.local.expect("local address"),
        );
        assert_eq!(
            conv.before_greeting,
            expected_header(peer, local),
            "the check sent {:?} before the greeting",
            String::from_utf8_lossy(&conv.before_greeting)
        );
        assert_eq!(
            conv.commands,
            [
                ("EHLO checker.test\r\n".to_string(), false),
                ("QUIT\r\n".to_string(), false)
            ],
            "EHLO then QUIT, one at a time"
        );
        assert!(conv.closed_after_quit, "the check closes after 221");
    }
    assert_log_count(&sy, "is DOWN", 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtp_check_waits_for_greeting_then_ehlo_then_quit() {
    check_conversation("none", |_, _| Vec::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtp_check_sends_proxy_v1_first() {
    // Not "PROXY UNKNOWN": Postfix rejects that (see tests/postfix.rs); the check announces its
    // own connection instead.
    check_conversation("v1", |peer, local| {
        format!(
            "PROXY TCP4 {} {} {} {}\r\n",
            peer.ip(),
            local.ip(),
            peer.port(),
            local.port()
        )
        .into_bytes()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtp_check_sends_proxy_v2_local_first() {
    check_conversation("v2", |_, _| local_v2_header()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtp_check_passes_through_a_backend_requiring_proxy_v2() {
    let mta1 = SmtpServer::start("mta1", Behaviour::expecting_proxy(ProxyExpect::V2));
    let (_, sy) = start_in_front_of(&[&mta1], "v2", &smtp_health(100, 1, 1));
    wait_until(&sy, "three checks", Duration::from_secs(10), || {
        mta1.proxy_headers().len() >= 3
    })
    .await;
    assert!(
        mta1.proxy_headers().iter().all(|h| *h == local_v2_header()),
        "{:?}",
        mta1.proxy_headers()
    );
    assert_log_count(&sy, "is DOWN", 0);
}

// ---------------------------------------------------------------------------------------------
// PROXY headers of real client sessions
// ---------------------------------------------------------------------------------------------

/// A minimal client: greeting, QUIT. Returns its own address (what the header must announce).
async fn greet_and_quit(addr: SocketAddr) -> SocketAddr {
    let mut stream = TcpStream::connect(addr)
        .await
        .expect("connect to switchyard");
    let me = stream.local_addr().expect("client address");
    let mut buf = Vec::new();
    let mut chunk = [0u8; 512];
    while !buf.ends_with(b"\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk))
            .await
            .expect("greeting in time")
            .expect("read greeting");
        assert!(n > 0, "closed before the greeting");
        buf.extend_from_slice(&chunk[..n]);
    }
    assert!(
        buf.starts_with(b"220 mta1"),
        "{:?}",
        String::from_utf8_lossy(&buf)
    );
    stream.write_all(b"QUIT\r\n").await.expect("send QUIT");
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut rest))
        .await
        .expect("221 in time")
        .expect("read 221");
    assert!(
        rest.starts_with(b"221"),
        "{:?}",
        String::from_utf8_lossy(&rest)
    );
    me
}

fn expected_v1(client: SocketAddr, local: SocketAddr) -> Vec<u8> {
    let family = if client.is_ipv4() { "TCP4" } else { "TCP6" };
    format!(
        "PROXY {family} {} {} {} {}\r\n",
        client.ip(),
        local.ip(),
        client.port(),
        local.port()
    )
    .into_bytes()
}

fn expected_v2(client: SocketAddr, local: SocketAddr) -> Vec<u8> {
    let mut out = SIGNATURE.to_vec();
    match (client.ip(), local.ip()) {
        (IpAddr::V4(c), IpAddr::V4(l)) => {
            out.extend_from_slice(&[0x21, 0x11, 0x00, 12]);
            out.extend_from_slice(&c.octets());
            out.extend_from_slice(&l.octets());
        }
        (IpAddr::V6(c), IpAddr::V6(l)) => {
            out.extend_from_slice(&[0x21, 0x21, 0x00, 36]);
            out.extend_from_slice(&c.octets());
            out.extend_from_slice(&l.octets());
        }
        _ => panic!("mixed families are not expected on loopback"),
    }
    out.extend_from_slice(&client.port().to_be_bytes());
    out.extend_from_slice(&local.port().to_be_bytes());
    out
}

async fn client_headers(proxy: ProxyExpect, version: &str) {
    let mta1 = SmtpServer::start("mta1", Behaviour::expecting_proxy(proxy));
    let (v4, v6) = (free_addr(), free_addr_v6());
    let toml = service("mx", &[v4, v6], version, "kind = \"none\"").servers(&[&mta1]);
    let sy = Switchyard::start(BIN, &toml.to_string());
    for listen in [v4, v6] {
        let client = greet_and_quit(listen).await;
        assert_eq!(client.ip(), listen.ip());
        let headers = mta1.proxy_headers();
        let got = headers.last().expect("a header per session");
        let want = match proxy {
            ProxyExpect::V1 => expected_v1(client, listen),
            _ => expected_v2(client, listen),
        };
        assert_eq!(
            *got,
            want,
            "header for {client} -> {listen}: got {:?}; stderr:\n{}",
            String::from_utf8_lossy(got),
            sy.stderr_text()
        );
    }
    assert_eq!(mta1.proxy_headers().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_v1_header_of_client_sessions_ipv4_and_ipv6() {
    client_headers(ProxyExpect::V1, "v1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_v2_header_of_client_sessions_ipv4_and_ipv6() {
    client_headers(ProxyExpect::V2, "v2").await;
}

#[test]
fn expected_headers_match_the_specification_examples() {
    // Guards the test's own encoders against the spec's worked layout.
    let c = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 168, 0, 1)), 56324);
    let l = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 168, 0, 11)), 443);
    assert_eq!(
        expected_v1(c, l),
        b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
    );
    let v2 = expected_v2(c, l);
    assert_eq!(v2.len(), 28);
    assert_eq!(
        &v2[12..],
        &[
            0x21, 0x11, 0, 12, 192, 168, 0, 1, 192, 168, 0, 11, 0xDC, 0x04, 0x01, 0xBB
        ]
    );
    let c6 = SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 1);
    assert_eq!(expected_v1(c6, c6), b"PROXY TCP6 ::1 ::1 1 1\r\n");
    assert_eq!(expected_v2(c6, c6).len(), 16 + 36);
}

// ---------------------------------------------------------------------------------------------
// Live traffic's verdicts: refused greetings, and outcomes that arrive after a change
// ---------------------------------------------------------------------------------------------

/// Live sessions a backend expecting PROXY v2 received: headers saying PROXY (0x21), not the
/// checks' LOCAL (0x20).
fn live_sessions(server: &SmtpServer) -> usize {
    server
        .proxy_headers()
        .iter()
        .filter(|h| h.get(12) == Some(&0x21))
        .count()
}

/// Switchyard with health `kind` in front of "busy" (greets 421) and "mta1", in that order,
/// round robin. Both expect PROXY v2, so that live sessions and checks can be told apart at
/// the backend.
fn busy_and_mta1(
    kind: &str,
    interval_ms: u64,
    rise: u64,
    fall: usize,
) -> (Vec<SmtpServer>, SocketAddr, Switchyard) {
    let servers: Vec<SmtpServer> = [("busy", 421), ("mta1", 220)]
        .into_iter()
        .map(|(name, code)| {
            SmtpServer::start(
                name,
                Behaviour {
                    greeting_code: code,
                    proxy: ProxyExpect::V2,
                    ..Behaviour::default()
                },
            )
        })
        .collect();
    let listen = free_addr();
    let health = format!(
        "kind = \"{kind}\"\ninterval = \"{interval_ms}ms\"\ntimeout = \"{interval_ms}ms\"\n\
         rise = {rise}\nfall = {fall}"
    );
    let backends: Vec<&SmtpServer> = servers.iter().collect();
    let toml = service("mx", &[listen], "v2", &health).servers(&backends);
    let sy = Switchyard::start(BIN, &toml.to_string());
    (servers, listen, sy)
}

/// Sessions one after the other, `pause` apart; all must be served.
async fn paced_sessions(addr: SocketAddr, n: usize, pause: Duration) -> Vec<String> {
    let mut names = Vec::new();
    for _ in 0..n {
        names.extend(sessions(addr, 1).await);
        tokio::time::sleep(pause).await;
    }
    names
}

/// Runs sessions until one is served by `name`, failing after `limit`.
async fn until_served_by(addr: SocketAddr, name: &str, limit: Duration) {
    let started = Instant::now();
    while !sessions(addr, 1).await.iter().any(|n| n == name) {
        assert!(
            started.elapsed() < limit,
            "{name} got no session within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_421_backend_leaves_rotation_after_fall_sessions_with_tcp_checks() {
    let (interval, fall) = (200u64, 3usize);
    let (servers, listen, sy) = busy_and_mta1("tcp", interval, 2, fall);
    let busy = &servers[0];
    // Spread over many check intervals: a verdict that flapped back with every passing tcp
    // check would show as more sessions on the busy backend.
    let names = paced_sessions(listen, 30, Duration::from_millis(interval / 4)).await;
    assert!(names.iter().all(|n| n == "mta1"), "{names:?}");
    assert_eq!(
        live_sessions(busy),
        fall,
        "sessions the 421 backend got; stderr:\n{}",
        sy.stderr_text()
    );
    let text = sy.stderr_text();
    let line = text
        .lines()
        .find(|l| l.contains("backend busy of service mx is DOWN"))
        .unwrap_or_default();
    assert!(line.contains("greeted with 421"), "{line}");

    // Ready again: the checks, reading the greeting now, bring it back through rise.
    busy.set_greeting_code(220);
    until_served_by(listen, "busy", Duration::from_secs(10)).await;
    assert_eq!(log_count(&sy, "backend busy of service mx is UP"), 1);
    assert_eq!(log_count(&sy, "backend busy of service mx is DOWN"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_kind_none_a_421_backend_is_held_down_then_tried_again() {
    let (interval, rise, fall) = (300u64, 2u64, 2usize);
    let (servers, listen, sy) = busy_and_mta1("none", interval, rise, fall);
    let (busy, mta1) = (&servers[0], &servers[1]);
    let started = Instant::now();
    let names = sessions(listen, 10).await;
    let hold_down = Duration::from_millis(interval * rise);
    assert!(
        started.elapsed() < hold_down,
        "too slow to test the hold-down"
    );
    assert!(names.iter().all(|n| n == "mta1"), "{names:?}");
    assert_eq!(live_sessions(busy), fall, "{}", sy.stderr_text());
    assert_eq!(
        mta1.connections(),
        10,
        "kind none never connects on its own"
    );

    // After the hold-down live traffic tries it again, and `fall` more refusals take it out.
    wait_for_log(&sy, "backend busy of service mx is UP", 1, hold_down * 3).await;
    sessions(listen, 10).await;
    assert_eq!(live_sessions(busy), 2 * fall, "{}", sy.stderr_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greeting_timeouts_of_sessions_from_before_a_recovery_do_not_take_it_down_again() {
    let (interval, rise) = (300u64, 3u32);
    let greeting_timeout = Duration::from_secs(5);
    let mta1 = SmtpServer::start("mta1", Behaviour::default());
    // mta2 is silent at first: it accepts and never greets.
    let silent = SmtpServer::start(
        "mta2",
        Behaviour {
            hang: true,
            ..Behaviour::default()
        },
    );
    let mta2_addr = silent.addr();
    let listen = free_addr();
    let toml = service("mx", &[listen], "none", &smtp_health(interval, rise, 2))
        .backend("mta1", mta1.addr())
        .backend("mta2", mta2_addr)
        .to_string()
        .replace("retries = 2", "retries = 1\ngreeting_timeout = \"5s\"");
    let sy = Switchyard::start(BIN, &toml);

    // Sessions that start while mta2 is silent and still up: half of them wait for its
    // greeting (and fail over to mta1 when it does not come).
    let early: Vec<_> = (0..4).map(|_| tokio::spawn(sessions(listen, 1))).collect();
    let early_started = Instant::now();
    wait_for_log(
        &sy,
        "backend mta2 of service mx is DOWN",
        1,
        Duration::from_secs(5),
    )
    .await;
    assert!(silent.open() >= 1, "no early session waited on mta2");

    // mta2 comes back (the silent one keeps its hung connections) and is marked up.
    silent.pause();
    let listener = testkit::smtp_server::bind_listener(mta2_addr).expect("rebind mta2");
    let back = SmtpServer::serve("mta2", Behaviour::default(), listener).expect("mta2 back");
    wait_for_log(
        &sy,
        "backend mta2 of service mx is UP",
        1,
        Duration::from_secs(5),
    )
    .await;
    assert!(
        early_started.elapsed() < greeting_timeout,
        "mta2 came back too late to test stale verdicts"
    );

    // The early sessions' greeting timeouts arrive now, about a state long gone.
    for session in early {
        session.await.expect("early client task");
    }
    let names = sessions(listen, 4).await;
    assert!(
        names.iter().filter(|n| *n == "mta2").count() >= 2,
        "mta2 was taken down by stale timeouts: {names:?}; stderr:\n{}",
        sy.stderr_text()
    );
    assert_eq!(
        log_count(&sy, "backend mta2 of service mx is DOWN"),
        1,
        "{}",
        sy.stderr_text()
    );
    assert!(back.connections() >= 2);
}
