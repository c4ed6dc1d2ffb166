//! `GET /metrics` from the real binary under real SMTP sessions, read over a plain TCP socket
//! the way a scraper reads it: the exposition passes Prometheus' own linter, each backend's
//! session count is what its sink counted (health checks kept apart), active counts return to
//! zero, a stopped backend goes down within fall × interval, `421`s are counted by reason,
//! reloads are counted, and `ctl show --json` says the same as `/metrics`.

use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use switchyard::control::ShowReport;
use testkit::config_toml::{ServiceToml, admin_table_listening};
use testkit::harness::{Switchyard, free_addr};
use testkit::metrics_text::{Exposition, get, scrape};
use testkit::smtp_client::{HeldSession, read_greeting, smtp_session};
use testkit::smtp_server::{Behaviour, SmtpServer};

/// The binary under test.
const BIN: &str = env!("CARGO_BIN_EXE_switchyard");

/// Health checks of these tests: smtp (a whole conversation, so each one is a connection the
/// sink sees), every 200 ms, down after 2 failures.
const INTERVAL: Duration = Duration::from_millis(200);
const FALL: u32 = 2;
const HEALTH: &str =
    "kind = \"smtp\"\ninterval = \"200ms\"\ntimeout = \"200ms\"\nrise = 1\nfall = 2";

/// A running switchyard with its HTTP admin listener.
struct Scraped {
    sy: Switchyard,
    web: SocketAddr,
}

impl Scraped {
    /// Starts `services` with `[admin] listen` on a free loopback port.
    fn start(services: &[ServiceToml]) -> Scraped {
        let web = free_addr();
        let admin = admin_table_listening("admin.sock".as_ref(), web);
        let services: String = services.iter().map(ToString::to_string).collect();
        let sy = Switchyard::start(
            BIN,
            &format!("shutdown_timeout = \"1s\"\n{admin}{services}"),
        );
        Scraped { sy, web }
    }

    fn scrape(&self) -> Exposition {
        Exposition::scrape(self.web).unwrap_or_else(|e| panic!("scrape: {e:#}"))
    }

    /// Scrapes until `done` holds (at most `limit`); the last scrape and when it held.
    fn scrape_until(
        &self,
        limit: Duration,
        done: impl Fn(&Exposition) -> bool,
    ) -> (Exposition, Option<Duration>) {
        let started = Instant::now();
        loop {
            let scraped = self.scrape();
            if done(&scraped) {
                return (scraped, Some(started.elapsed()));
            }
            if started.elapsed() > limit {
                return (scraped, None);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn show(&self) -> ShowReport {
        let out = self.sy.ctl(&["--json", "show"]);
        assert_eq!(out.code, Some(0), "{out:?}");
        serde_json::from_str(&out.stdout).expect("show --json")
    }
}

fn labels<'a>(service: &'a str, backend: &'a str) -> [(&'a str, &'a str); 2] {
    [("service", service), ("backend", backend)]
}

fn with<'a>(
    service: &'a str,
    backend: &'a str,
    key: &'a str,
    value: &'a str,
) -> [(&'a str, &'a str); 3] {
    [("service", service), ("backend", backend), (key, value)]
}

/// `promtool check metrics` on `text`: its complaints, if any.
fn promtool(text: &str) -> Result<(), String> {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|error| {
            panic!(
                "promtool (Debian package prometheus) cannot be run ({error}): run `cargo xtask setup`"
            )
        });
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("feed promtool");
    let out = child.wait_with_output().expect("promtool");
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

#[tokio::test]
async fn the_exposition_passes_promtool() {
    let mta1 = SmtpServer::start("mta1", Behaviour::default());
    let listen = free_addr();
    let sy = Scraped::start(&[ServiceToml::new("mx", &[listen])
        .health(HEALTH)
        .servers(&[&mta1])]);
    smtp_session(listen).await.expect("a session");
    let (text, content_type) = scrape(sy.web).expect("scrape");
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    if let Err(complaints) = promtool(&text) {
        panic!("promtool check metrics:\n{complaints}\nexposition:\n{text}");
    }
    for name in [
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "switchyard_build_info",
        "switchyard_uptime_seconds",
        "switchyard_backend_setup_duration_seconds_bucket",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(name)),
            "{name} missing:\n{text}"
        );
    }
    // A scraper that asks for OpenMetrics gets it.
    let (open, content_type) = get(
        sy.web,
        "/metrics",
        &["Accept: application/openmetrics-text; version=1.0.0"],
    )
    .expect("scrape");
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    assert!(open.ends_with("# EOF\n"), "{open}");
}

#[tokio::test]
async fn sessions_per_backend_are_what_each_sink_counted_and_agree_with_ctl_show() {
    let sinks: Vec<SmtpServer> = ["mta1", "mta2", "mta3"]
        .iter()
        .map(|name| SmtpServer::start(name, Behaviour::default()))
        .collect();
    let listen = free_addr();
    let service = sinks.iter().zip(1..).fold(
        ServiceToml::new("mx", &[listen])
            .keys("algorithm = \"weighted_round_robin\"")
            .health(HEALTH),
        |service, (sink, weight)| {
            service.backend_with(sink.name(), sink.addr(), &format!("weight = {weight}"))
        },
    );
    let sy = Scraped::start(&[service]);
    const SESSIONS: usize = 60;
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..SESSIONS {
        clients.spawn(smtp_session(listen));
    }
    while let Some(done) = clients.join_next().await {
        done.expect("client task").expect("a whole session");
    }
    // Let checks run meanwhile: at least two more per backend, so the sinks have seen
    // connections that are not sessions.
    std::thread::sleep(INTERVAL * 3);
    // A session's count is given back when its relay ends, a moment after the client's QUIT.
    let (scraped, settled) = sy.scrape_until(Duration::from_secs(5), |m| {
        m.sum("switchyard_backend_active_sessions", &[]) == 0.0
    });
    assert!(
        settled.is_some(),
        "active counts stay at {} in all",
        scraped.sum("switchyard_backend_active_sessions", &[])
    );

    let mut total = 0.0;
    for sink in &sinks {
        let name = sink.name();
        let sessions = scraped.get(
            "switchyard_backend_sessions_total",
            &with("mx", name, "plane", "proxy"),
        );
        assert_eq!(
            sessions,
            sink.sessions_completed() as f64,
            "{name}: /metrics says {sessions}, the sink completed {} sessions",
            sink.sessions_completed()
        );
        let checks = scraped.sum(
            "switchyard_backend_health_checks_total",
            &labels("mx", name),
        );
        assert!(checks >= 2.0, "{name}: {checks} health checks counted");
        assert!(
            sink.connections() as f64 >= sessions + checks,
            "{name}: the sink saw {} connections: sessions {sessions} and checks {checks} are apart",
            sink.connections()
        );
        assert_eq!(
            scraped.get(
                "switchyard_backend_setup_duration_seconds_count",
                &labels("mx", name)
            ),
            sessions,
            "{name}: every session's set-up is in the latency histogram"
        );
        assert!(
            scraped.get(
                "switchyard_backend_relayed_bytes_total",
                &with("mx", name, "direction", "to_backend")
            ) >= sink.message_bytes() as f64,
            "{name}: bytes relayed to it"
        );
        total += sessions;
    }
    assert_eq!(total, SESSIONS as f64);
    assert_eq!(
        scraped.get("switchyard_service_sessions_total", &[("service", "mx")]),
        SESSIONS as f64
    );

    // ctl show --json reads the same counts (nothing moves now).
    let shown = sy.show();
    let scraped = sy.scrape();
    let service = &shown.services[0];
    assert_eq!(
        scraped.get("switchyard_service_sessions_total", &[("service", "mx")]),
        service.sessions_total as f64
    );
    for backend in &service.backends {
        let name = backend.name.as_str();
        assert_eq!(
            scraped.sum("switchyard_backend_sessions_total", &labels("mx", name)),
            backend.sessions_total as f64,
            "{name}: sessions"
        );
        assert_eq!(
            scraped.get("switchyard_backend_active_sessions", &labels("mx", name)),
            backend.active as f64,
            "{name}: active"
        );
        assert_eq!(
            scraped.get("switchyard_backend_weight", &labels("mx", name)),
            f64::from(backend.weight),
            "{name}: weight"
        );
        assert_eq!(
            scraped.get(
                "switchyard_backend_state",
                &with("mx", name, "state", &backend.state)
            ),
            1.0,
            "{name}: state {}",
            backend.state
        );
    }
}

#[tokio::test]
async fn a_stopped_backend_is_down_within_fall_times_interval() {
    let mta1 = SmtpServer::start("mta1", Behaviour::default());
    let mta2 = SmtpServer::start("mta2", Behaviour::default());
    let listen = free_addr();
    let sy = Scraped::start(&[ServiceToml::new("mx", &[listen])
        .health(HEALTH)
        .servers(&[&mta1, &mta2])]);
    let up = |m: &Exposition| m.get("switchyard_backend_up", &labels("mx", "mta2"));
    assert_eq!(up(&sy.scrape()), 1.0);
    mta2.stop();
    let stopped = Instant::now();
    // Refused connects fail at once: fall checks, one interval apart, plus the wait for the
    // next check, plus slack for a loaded machine.
    let limit = INTERVAL * (FALL + 1) + Duration::from_secs(1);
    let (scraped, when) = sy.scrape_until(Duration::from_secs(10), |m| up(m) == 0.0);
    let when = when.unwrap_or_else(|| panic!("mta2 still up 10 s after it stopped"));
    assert!(
        stopped.elapsed() >= when && when <= limit,
        "mta2 went down {when:?} after it stopped (limit {limit:?})"
    );
    for (state, value) in [
        ("down", 1.0),
        ("up", 0.0),
        ("drain", 0.0),
        ("disabled", 0.0),
    ] {
        assert_eq!(
            scraped.get(
                "switchyard_backend_state",
                &with("mx", "mta2", "state", state)
            ),
            value,
            "state {state}"
        );
    }
    assert_eq!(
        scraped.get(
            "switchyard_backend_health_transitions_total",
            &with("mx", "mta2", "to", "down")
        ),
        1.0
    );
    assert!(
        scraped.get(
            "switchyard_backend_health_checks_total",
            &with("mx", "mta2", "result", "failed")
        ) >= f64::from(FALL)
    );
    assert_eq!(up(&scraped), 0.0);
    assert_eq!(
        scraped.get("switchyard_backend_up", &labels("mx", "mta1")),
        1.0
    );
}

#[tokio::test]
async fn refusals_are_counted_by_reason() {
    let mta1 = SmtpServer::start("mta1", Behaviour::default());
    let full = free_addr();
    let dead = free_addr();
    let nobody = free_addr();
    let sy = Scraped::start(&[
        ServiceToml::new("full", &[full])
            .keys("max_connections = 1")
            .health(HEALTH)
            .servers(&[&mta1]),
        // No checks: the dead backend is tried on live traffic, fails, and the client gets 421.
        ServiceToml::new("dead", &[dead])
            .keys("retries = 0")
            .health("kind = \"none\"")
            .backend("gone", nobody),
    ]);
    let refused = |m: &Exposition, service: &str, reason: &str| {
        m.get(
            "switchyard_service_refused_total",
            &[("service", service), ("reason", reason)],
        )
    };
    let before = sy.scrape();
    assert_eq!(refused(&before, "full", "max_connections"), 0.0);

    let held = tokio::task::spawn_blocking(move || HeldSession::open(full))
        .await
        .expect("task")
        .expect("the one session max_connections allows");
    for _ in 0..3 {
        let (code, _) = read_greeting(full).await.expect("a reply");
        assert_eq!(code, 421, "max_connections = 1 is taken");
    }
    let (code, _) = read_greeting(dead).await.expect("a reply");
    assert_eq!(code, 421, "no backend greets");
    let scraped = sy.scrape();
    assert_eq!(refused(&scraped, "full", "max_connections"), 3.0);
    assert_eq!(refused(&scraped, "full", "no_backend"), 0.0);
    assert_eq!(refused(&scraped, "dead", "no_backend"), 1.0);
    assert_eq!(refused(&scraped, "dead", "balancer_exhausted"), 0.0);
    assert_eq!(
        scraped.get(
            "switchyard_backend_failures_total",
            &with("dead", "gone", "reason", "connect_error")
        ),
        1.0
    );
    let shown = sy.show();
    for service in &shown.services {
        assert_eq!(
            scraped.sum(
                "switchyard_service_refused_total",
                &[("service", service.name.as_str())]
            ),
            service.refused_421 as f64,
            "{}: 421s",
            service.name
        );
    }
    tokio::task::spawn_blocking(move || held.finish())
        .await
        .expect("task")
        .expect("the held session ends well");
}

#[test]
fn reloads_are_counted_applied_and_refused() {
    let listen = free_addr();
    let sy = Scraped::start(&[ServiceToml::new("mx", &[listen])
        .health("kind = \"none\"")
        .backend("mta1", free_addr())]);
    let reloads = |result: &str| {
        sy.scrape()
            .get("switchyard_reloads_total", &[("result", result)])
    };
    assert_eq!(reloads("applied"), 0.0);
    let out = sy.sy.ctl(&["reload"]);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(reloads("applied"), 1.0);
    let path = sy.sy.config_dir().join("switchyard.toml");
    let good = std::fs::read_to_string(&path).expect("config");
    std::fs::write(&path, format!("{good}\nunknown_key = 1\n")).expect("write config");
    let out = sy.sy.ctl(&["reload"]);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert_eq!(reloads("refused"), 1.0);
    assert_eq!(reloads("applied"), 1.0);
}
