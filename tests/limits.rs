//! Per-source protection and per-backend throttles through the real binary, with clients on
//! distinct loopback sources (127.0.0.x, ::1): concurrent and rate limits per source, deny and
//! allow lists, prefix grouping, a connection flood that leaves others served, a backend's
//! `max_session_rate`, and limits changed by a reload.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use testkit::config_toml::{ServiceToml, admin_table};
use testkit::harness::{Switchyard, free_addr, free_addr_v6};
use testkit::smtp_client::{SessionOptions, TEST_MESSAGE, greeting_from, run_session};
use testkit::smtp_server::{Behaviour, SmtpServer};

/// The binary under test.
const BIN: &str = env!("CARGO_BIN_EXE_switchyard");

fn source(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

/// The service "mx" on `listen` over `servers`, no health checks, `limits` as its
/// `[service.limits]` table body.
fn config(listen: &[SocketAddr], servers: &[&SmtpServer], limits: &str) -> String {
    let service = ServiceToml::new("mx", listen)
        .health("kind = \"none\"")
        .servers(servers)
        .to_string();
    format!("{service}\n[service.limits]\n{limits}\n")
}

/// The code of the first reply a client from `from` gets.
async fn greeting_code(listen: SocketAddr, from: IpAddr) -> u16 {
    greeting_from(listen, Some(from))
        .await
        .map(|(code, _, _)| code)
        .unwrap_or(0)
}

async fn session_from(listen: SocketAddr, from: IpAddr) -> anyhow::Result<String> {
    let options = SessionOptions {
        source: Some(from),
        ..SessionOptions::default()
    };
    Ok(run_session(listen, &options, TEST_MESSAGE).await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_at_its_connection_limit_gets_421_while_others_are_served() {
    let sink = SmtpServer::start("mta1", Behaviour::default());
    let listen = free_addr();
    let sy = Switchyard::start(
        BIN,
        &config(&[listen], &[&sink], "per_source_connections = 3"),
    );
    let mut held = Vec::new();
    for _ in 0..3 {
        let (code, _, session) = greeting_from(listen, Some(source(21))).await.expect("held");
        assert_eq!(code, 220);
        held.push(session);
    }
    let (code, text, _) = greeting_from(listen, Some(source(21)))
        .await
        .expect("fourth");
    assert_eq!(code, 421, "{text}");
    assert!(text.starts_with("421 4.7.0"), "{text}");
    // Another source is not affected.
    for _ in 0..5 {
        session_from(listen, source(22))
            .await
            .expect("another source");
    }
    // Closing one lets the first source in again.
    // Counted where operators look.
    let shown = sy.ctl(&["--json", "show", "mx"]);
    let report: switchyard::control::ShowReport =
        serde_json::from_str(&shown.stdout).expect("show --json");
    assert_eq!(
        report.services[0].sources.too_many, 1,
        "{:?}",
        report.services[0]
    );
    drop(held.pop());
    let deadline = Instant::now() + Duration::from_secs(5);
    while greeting_code(listen, source(21)).await != 220 {
        assert!(
            Instant::now() < deadline,
            "the source stayed blocked after closing one"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_limit_admits_rate_times_seconds_plus_burst() {
    let sink = SmtpServer::start("mta1", Behaviour::default());
    let listen = free_addr();
    let _sy = Switchyard::start(
        BIN,
        &config(
            &[listen],
            &[&sink],
            "per_source_rate = 20\nper_source_burst = 10",
        ),
    );
    let started = Instant::now();
    let mut admitted = 0u32;
    let mut refused = 0u32;
    // 3 s of attempts as fast as one client goes (bounded by the clock).
    while started.elapsed() < Duration::from_secs(3) {
        match greeting_from(listen, Some(source(31))).await {
            Ok((220, _, _)) => admitted += 1,
            Ok((421, text, _)) => {
                assert!(text.contains("4.7.0"), "{text}");
                refused += 1
            }
            other => panic!("unexpected: {:?}", other.map(|(c, t, _)| (c, t))),
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let expected = 20.0 * seconds + 10.0;
    let ratio = f64::from(admitted) / expected;
    assert!(
        (0.85..=1.15).contains(&ratio),
        "admitted {admitted} in {seconds:.2} s, expected about {expected:.0} (refused {refused})"
    );
    assert!(refused > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deny_allow_and_prefix_grouping() {
    let sink = SmtpServer::start("mta1", Behaviour::default());
    let listen = free_addr();
    let listen6 = free_addr_v6();
    let sy = Switchyard::start(
        BIN,
        &config(
            &[listen, listen6],
            &[&sink],
            "deny = [\"127.0.0.66\"]\nallow = [\"127.0.0.0/26\", \"::1\"]\nper_source_connections = 2\nsource_prefix_v4 = 30",
        ),
    );
    // Denied (checked first, though inside allow): 554.
    let (code, text, _) = greeting_from(listen, Some(source(66)))
        .await
        .expect("denied");
    assert_eq!(code, 554, "{text}");
    assert!(text.starts_with("554 5.7.1"), "{text}");
    // Outside allow: 554; inside: served; IPv6 ::1 is allowed.
    assert_eq!(greeting_code(listen, source(100)).await, 554);
    session_from(listen, source(9)).await.expect("allowed");
    session_from(listen6, "::1".parse().expect("ip"))
        .await
        .expect("allowed IPv6");
    // 127.0.0.8/30 is one source: two from .8 and .9 fill it, .10 is refused, .12 is another.
    let (_, _, a) = greeting_from(listen, Some(source(8))).await.expect(".8");
    let (_, _, b) = greeting_from(listen, Some(source(9))).await.expect(".9");
    assert_eq!(
        greeting_code(listen, source(10)).await,
        421,
        "the /30 is one source"
    );
    assert_eq!(
        greeting_code(listen, source(12)).await,
        220,
        "the next /30 is another"
    );
    drop((a, b));
    // A reload lifts the deny: .66 is served (limits change live).
    let lifted = config(
        &[listen, listen6],
        &[&sink],
        "allow = [\"127.0.0.0/24\", \"::1\"]\nper_source_connections = 2\nsource_prefix_v4 = 30",
    );
    std::fs::write(
        sy.config_dir().join("switchyard.toml"),
        format!("{lifted}{}", admin_table(sy.admin_socket())),
    )
    .expect("rewrite");
    let reloaded = sy.ctl(&["reload"]);
    assert_eq!(reloaded.code, Some(0), "{reloaded:?}");
    session_from(listen, source(66))
        .await
        .expect("served after the reload");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_flood_from_one_source_leaves_another_served_and_us_bounded() {
    let sink = SmtpServer::start("mta1", Behaviour::default());
    let listen = free_addr();
    let sy = Switchyard::start(
        BIN,
        &config(
            &[listen],
            &[&sink],
            "per_source_connections = 10\nper_source_rate = 50",
        ),
    );
    let pid = sy.pid();
    // The flood: connects from 127.0.0.41 as fast as 200 tasks go, for 6 s, each task keeping
    // its last 20 connections open without reading (a rejected client that never leaves would
    // make every polite rejection linger).
    let flood_until = Instant::now() + Duration::from_secs(6);
    let mut flood = tokio::task::JoinSet::new();
    for _ in 0..200 {
        flood.spawn(async move {
            let mut made = 0u64;
            let mut open = std::collections::VecDeque::new();
            while Instant::now() < flood_until {
                let socket = tokio::net::TcpSocket::new_v4().expect("socket");
                if socket.bind(SocketAddr::new(source(41), 0)).is_ok()
                    && let Ok(Ok(stream)) =
                        tokio::time::timeout(Duration::from_secs(1), socket.connect(listen)).await
                {
                    made += 1;
                    open.push_back(stream);
                    if open.len() > 20 {
                        open.pop_front();
                    }
                }
            }
            made
        });
    }
    // Meanwhile 60 sessions from another source, and the balancer's descriptors sampled.
    let mut peak_fds = 0usize;
    let mut failures = Vec::new();
    for _ in 0..60 {
        if let Err(error) = session_from(listen, source(42)).await {
            failures.push(error.to_string());
        }
        peak_fds = peak_fds.max(open_fds(pid));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut connects = 0;
    while let Some(made) = flood.join_next().await {
        connects += made.expect("flood task");
    }
    assert!(failures.is_empty(), "{failures:?}");
    assert!(connects > 1000, "only {connects} flood connects");
    // Rejections linger at most a bounded number at once: the descriptors stay bounded.
    assert!(
        peak_fds < 700,
        "switchyard held {peak_fds} descriptors during the flood"
    );
    let rss = rss_kib(pid);
    assert!(rss < 200 * 1024, "RSS {rss} KiB after the flood");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_at_its_max_session_rate_is_skipped_for_the_others() {
    let slow = SmtpServer::start("slow", Behaviour::default());
    let other = SmtpServer::start("other", Behaviour::default());
    let listen = free_addr();
    let service = ServiceToml::new("mx", &[listen])
        .keys("algorithm = \"round_robin\"")
        .health("kind = \"none\"")
        .backend_with(slow.name(), slow.addr(), "max_session_rate = 10")
        .backend(other.name(), other.addr())
        .to_string();
    let _sy = Switchyard::start(BIN, &service);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..8 {
        tasks.spawn(async move {
            let mut failures = 0;
            while started.elapsed() < Duration::from_secs(3) {
                if session_from(listen, source(51)).await.is_err() {
                    failures += 1;
                }
            }
            failures
        });
    }
    let mut failures = 0;
    while let Some(f) = tasks.join_next().await {
        failures += f.expect("task");
    }
    let seconds = started.elapsed().as_secs_f64();
    assert_eq!(failures, 0);
    let allowed = 10.0 * seconds * 1.1 + 1.0;
    assert!(
        (slow.connections() as f64) <= allowed,
        "slow got {} in {seconds:.2} s (at most {allowed:.0})",
        slow.connections()
    );
    assert!(
        slow.connections() >= 10,
        "slow got only {}",
        slow.connections()
    );
    assert!(
        other.connections() > slow.connections(),
        "other took the rest: {} vs {}",
        other.connections(),
        slow.connections()
    );
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}
