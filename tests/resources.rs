//! The balancer's own limits against the real binary: running out of descriptors is never
//! blamed on a backend, the open-files limit is raised and checked at start, workers that
//! cannot start fail the start, and a backend address that leads back to our own listener is
//! refused on accept instead of chaining sessions until descriptors run out.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

use testkit::harness::{Launch, Switchyard, free_addr};
use testkit::netns::{self, Netns};
use testkit::smtp_client::{SessionOptions, read_greeting, smtp_session, smtp_session_blocking};
use testkit::smtp_server::{Behaviour, SmtpServer};

/// The binary under test.
const BIN: &str = env!("CARGO_BIN_EXE_switchyard");

/// One round-robin service on `listen` in front of `backends`, with `extra` lines for the
/// `[[service]]` table and smtp health checks of `interval`, `rise`, `fall`.
fn config(
    listen: &str,
    extra: &str,
    interval: &str,
    rise_fall: (u32, u32),
    backends: &[(&str, String)],
) -> String {
    let mut toml = format!(
        "shutdown_timeout = \"5s\"\n\n[[service]]\nname = \"mx\"\nlisten = \"{listen}\"\n\
         algorithm = \"round_robin\"\n{extra}\n\n[service.health]\nkind = \"smtp\"\n\
         interval = \"{interval}\"\ntimeout = \"{interval}\"\nrise = {}\nfall = {}\n",
        rise_fall.0, rise_fall.1
    );
    for (name, address) in backends {
        toml.push_str(&format!(
            "\n[[service.backend]]\nname = \"{name}\"\naddress = \"{address}\"\n"
        ));
    }
    toml
}

/// SIGTERM, a clean exit, and the totals file.
async fn stop(sy: Switchyard) -> (Switchyard, switchyard::totals::Totals) {
    tokio::task::spawn_blocking(move || {
        let mut sy = sy;
        let status = sy.terminate();
        assert!(status.success(), "{status}\n{}", sy.stderr_text());
        let totals = sy.totals();
        (sy, totals)
    })
    .await
    .expect("join")
}

/// With a tiny descriptor table filled by held sessions, clients past it get a prompt 421,
/// health checks that cannot open a socket are skipped rather than failed, and once the
/// sessions end the very next sessions are served by every backend, without waiting for the
/// backends to rise again (rise = 20 checks would take 6 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn descriptor_exhaustion_is_the_balancers_problem_not_the_backends() {
    let mta1 = SmtpServer::start("mta1", Behaviour::default());
    let mta2 = SmtpServer::start("mta2", Behaviour::default());
    let listen = free_addr();
    let toml = format!(
        "workers = 1\n{}",
        config(
            &listen.to_string(),
            "",
            "300ms",
            (20, 2),
            &[
                ("mta1", mta1.addr().to_string()),
                ("mta2", mta2.addr().to_string())
            ],
        )
    );
    let sy = Launch::new(BIN).open_files(64).start(&toml);
    // Hold idle clients until one past the table is refused: 2 descriptors per session.
    let mut held = Vec::new();
    let refused_at = Instant::now();
    loop {
        assert!(
            held.len() < 200,
            "descriptors never ran out:\n{}",
            sy.stderr_text()
        );
        let (code, _) = tokio::time::timeout(
            Duration::from_secs(5),
            read_greeting_held(listen, &mut held),
        )
        .await
        .unwrap_or_else(|_| {
            panic!(
                "a client past the limit got no reply:\n{}",
                sy.stderr_text()
            )
        });
        if code == 421 {
            break;
        }
    }
    // Long enough for `fall` failed checks of every backend, had they been failures.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (code, _) = read_greeting(listen)
        .await
        .expect("another client past the limit");
    assert_eq!(code, 421, "{:?}", refused_at.elapsed());
    drop(held);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut served = Vec::new();
    for _ in 0..4 {
        served.push(smtp_session(listen).await.unwrap_or_else(|e| {
            panic!(
                "session right after the burst failed: {e:#}\n{}",
                sy.stderr_text()
            )
        }));
    }
    served.sort();
    assert_eq!(
        served,
        ["mta1", "mta1", "mta2", "mta2"],
        "{}",
        sy.stderr_text()
    );
    let (sy, totals) = stop(sy).await;
    let own = totals.balancer;
    assert!(
        own.exhausted_accept + own.exhausted_connect > 0,
        "{own:?}\n{}",
        sy.stderr_text()
    );
    assert!(
        own.exhausted_health_check > 0,
        "{own:?}\n{}",
        sy.stderr_text()
    );
    for (_, backend) in totals.backends() {
        assert_eq!(backend.active, 0, "{backend:?}");
    }
}

/// Opens a client, keeps it in `held` and returns its first reply.
async fn read_greeting_held(addr: SocketAddr, held: &mut Vec<TcpStream>) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let reply = testkit::smtp_client::read_reply(&mut stream)
        .await
        .expect("a reply");
    held.push(stream);
    reply
}

/// `switchyard run` under `sh -c "<limit command> && exec switchyard ..."`; stderr to a file.
fn spawn_with_limit(limit: &str, toml: &str, dir: &std::path::Path) -> (Child, std::path::PathBuf) {
    let config = dir.join("switchyard.toml");
    std::fs::write(&config, toml).expect("write config");
    let stderr = dir.join("stderr.log");
    let child = Command::new("sh")
        .arg("-c")
        .arg(format!("{limit} && exec \"$0\" run --config \"$1\""))
        .arg(BIN)
        .arg(&config)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr).expect("stderr file"))
        .spawn()
        .expect("spawn switchyard");
    (child, stderr)
}

/// Polls `child` until `done(log, exited)` holds or 15 s pass (then it is killed); returns its
/// log and its exit status if it exited.
fn watch(
    child: &mut Child,
    stderr: &std::path::Path,
    done: impl Fn(&str, bool) -> bool,
) -> (String, Option<std::process::ExitStatus>) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let status = child.try_wait().expect("wait");
        let log = std::fs::read_to_string(stderr).unwrap_or_default();
        if done(&log, status.is_some()) || status.is_some() || Instant::now() > deadline {
            if status.is_none() && !done(&log, false) {
                let _ = child.kill();
                let _ = child.wait();
            }
            return (log, status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// 300 workers cannot all get a runtime with 400 descriptors: the start fails with the reason
/// and exit status 1, and nothing is ever announced as listening.
#[test]
fn workers_that_cannot_start_fail_the_start() {
    let mta = SmtpServer::start("mta1", Behaviour::default());
    let listen = free_addr();
    let toml = format!(
        "workers = 300\n{}",
        config(
            &listen.to_string(),
            "max_connections = 10",
            "1s",
            (2, 2),
            &[("mta1", mta.addr().to_string())]
        )
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut child, stderr) = spawn_with_limit("ulimit -n 400", &toml, dir.path());
    let (log, status) = watch(&mut child, &stderr, |_, exited| exited);
    let status =
        status.unwrap_or_else(|| panic!("still running with workers that could not start:\n{log}"));
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(!log.contains("listening on"), "{log}");
    assert!(log.contains("Too many open files"), "{log}");
    assert!(
        log.contains("switchyard-"),
        "the failing worker is named:\n{log}"
    );
}

/// The soft open-files limit is raised to the hard one, and a config that may need more than
/// that is started with a warning that carries the numbers.
#[test]
fn open_files_limit_is_raised_and_compared_with_the_need() {
    let mta = SmtpServer::start("mta1", Behaviour::default());
    let listen = free_addr();
    // 2 × 600 for sessions alone, over a hard limit of 1000.
    let toml = format!(
        "workers = 1\n{}",
        config(
            &listen.to_string(),
            "max_connections = 600",
            "1s",
            (2, 2),
            &[("mta1", mta.addr().to_string())]
        )
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut child, stderr) =
        spawn_with_limit("ulimit -Sn 100 && ulimit -Hn 1000", &toml, dir.path());
    let (log, exited) = watch(&mut child, &stderr, |log, _| {
        log.contains(&format!("listening on {listen}"))
    });
    assert!(
        exited.is_none() && log.contains("listening on"),
        "did not start:\n{log}"
    );
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.id())).expect("limits");
    let _ = child.kill();
    let _ = child.wait();
    let open_files: Vec<&str> = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("open files line")
        .split_whitespace()
        .collect();
    assert_eq!(
        open_files[3..5],
        ["1000", "1000"],
        "soft limit raised to hard: {limits}"
    );
    let warning = log
        .lines()
        .find(|l| l.contains("WARN") && l.contains("open-files limit 1000"))
        .unwrap_or_else(|| panic!("no warning about the limit:\n{log}"));
    assert!(warning.contains("1200"), "the sessions' need: {warning}");
}

/// A backend address that is one of the host's own addresses, on the port switchyard listens
/// on (so it leads back to switchyard, which config checks cannot know): its health checks and
/// sessions come back as clients, are recognised as our own connections and refused at once,
/// so no chain of sessions grows and no descriptor runs out; clients are served by the real
/// backend.
#[test]
fn a_backend_that_leads_back_to_our_listener_is_refused_not_chained() {
    // Namespaces need root; CI (SWITCHYARD_REQUIRE_XDP=1) turns a skip into a failure.
    if !netns::require_xdp(true) {
        return;
    }
    let ns = Netns::new(format!("sy-loop{}", netns::suffix())).expect("namespace");
    let mta_listener = ns
        .run(|| std::net::TcpListener::bind("127.0.0.1:2525"))
        .expect("bind the MTA");
    let mta = SmtpServer::serve("mta", Behaviour::default(), mta_listener).expect("MTA");
    let toml = format!(
        "workers = 2\n{}",
        config(
            "0.0.0.0:2500",
            "retries = 1",
            "200ms",
            (2, 1),
            &[
                ("loop", "198.18.200.1:2500".into()),
                ("mta", mta.addr().to_string())
            ],
        )
    );
    let mut sy = Launch::new(BIN).open_files(256).start_in(&ns, &toml);
    // Only now does the loop backend's address become one of this host's: `check` rejects a
    // backend that is visibly our own listener, and this is the loop it cannot see.
    ns.ip(&["addr", "add", "198.18.200.1/32", "dev", "lo"])
        .expect("address on lo");
    let target: SocketAddr = "127.0.0.1:2500".parse().expect("address");
    for _ in 0..10 {
        let served = ns.run(move || smtp_session_blocking(target, &SessionOptions::default()));
        assert_eq!(
            served.unwrap_or_else(|e| panic!("{e:#}\n{}", sy.stderr_text())),
            "mta"
        );
    }
    // Several rounds of health checks of the loop backend.
    std::thread::sleep(Duration::from_secs(1));
    let status = sy.terminate();
    assert!(status.success(), "{status}\n{}", sy.stderr_text());
    let totals = sy.totals();
    let own = totals.balancer;
    assert!(own.loops_refused > 0, "{own:?}\n{}", sy.stderr_text());
    assert_eq!(
        own.exhausted_accept + own.exhausted_connect + own.exhausted_health_check,
        0,
        "{own:?}"
    );
    let looped = totals.backend("mx", "loop").expect("loop backend totals");
    assert_eq!(looped.assigned, 0, "{looped:?}");
    // A hop accepted in the instant before its originator registered its connection reaches
    // the MTA and is refused once greeted, before relaying: more than 10 is possible.
    let mta_assigned = totals.backend("mx", "mta").map_or(0, |b| b.assigned);
    assert!(mta_assigned >= 10, "{totals:?}");
}
