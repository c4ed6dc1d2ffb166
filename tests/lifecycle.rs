//! The process's life as systemd sees it: the test plays the service manager (its
//! `NOTIFY_SOCKET` is the harness's datagram socket) and reads `READY=1`, `RELOADING=1` with
//! `MONOTONIC_USEC`, `READY=1` again and `STOPPING=1`, in that order and each at the right
//! moment; and the process runs as before without a notify socket, or with one nobody reads.

use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::time::{ClockId, clock_gettime};

use testkit::config_toml::ServiceToml;
use testkit::harness::{Launch, Notification, Switchyard, free_addr};
use testkit::smtp_client::{SessionOptions, smtp_session_blocking};
use testkit::smtp_server::{Behaviour, SmtpServer};

/// The binary under test.
const BIN: &str = env!("CARGO_BIN_EXE_switchyard");

/// How long a notification may take after the signal that causes it.
const NOTIFY_LIMIT: Duration = Duration::from_secs(10);

/// The lines that mark a state change (a `STATUS=` text may come between them).
const STATE_LINES: [&str; 3] = ["READY=1", "RELOADING=1", "STOPPING=1"];

/// The service "mx" on `listen` in front of `backend`, no health checks.
fn config(listen: SocketAddr, backend: &SmtpServer) -> String {
    let service = ServiceToml::new("mx", &[listen])
        .health("kind = \"none\"")
        .servers(&[backend]);
    format!("shutdown_timeout = \"5s\"\n{service}")
}

/// CLOCK_MONOTONIC now, in microseconds: the clock systemd reads `MONOTONIC_USEC` on.
fn monotonic_usec() -> u64 {
    let now = clock_gettime(ClockId::CLOCK_MONOTONIC).expect("CLOCK_MONOTONIC");
    now.tv_sec() as u64 * 1_000_000 + now.tv_nsec() as u64 / 1_000
}

/// The state-change lines of every notification, in the order they arrived.
fn state_changes(notifications: &[Notification]) -> Vec<&str> {
    notifications
        .iter()
        .flat_map(|n| n.text.lines())
        .filter(|line| STATE_LINES.contains(line))
        .collect()
}

/// Connects to `listen` every millisecond from the moment it is started until a connect
/// succeeds (at most `limit`): the start time of every refused attempt.
struct ConnectProbe {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<Instant>>,
}

impl ConnectProbe {
    fn start(listen: SocketAddr, limit: Duration) -> ConnectProbe {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let deadline = Instant::now() + limit;
            let mut refused = Vec::new();
            while !stopped.load(Ordering::Relaxed) && Instant::now() < deadline {
                let attempt = Instant::now();
                if TcpStream::connect(listen).is_ok() {
                    break; // closed at once with nothing sent: the proxy counts no session
                }
                refused.push(attempt);
                std::thread::sleep(Duration::from_millis(1));
            }
            refused
        });
        ConnectProbe { stop, thread }
    }

    fn refused(self) -> Vec<Instant> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("connect probe")
    }
}

#[test]
fn systemd_notify_says_ready_reloading_ready_stopping_in_order() {
    let mta1 = SmtpServer::start("mta1", Behaviour::default());
    let listen = free_addr();
    let toml = config(listen, &mta1);

    // Ready means accepting: no connect that started after READY=1 arrived was refused.
    let probe = ConnectProbe::start(listen, Duration::from_secs(20));
    let mut sy = Launch::new(BIN).start(&toml);
    let started = sy.notifications();
    TcpStream::connect(listen).expect("a connect right after READY=1");
    let refused = probe.refused();
    let ready_at = started[0].at;
    assert!(started[0].has("READY=1"), "first notification: {started:?}");
    let late = refused
        .iter()
        .filter(|&&attempt| attempt > ready_at)
        .count();
    assert_eq!(
        late,
        0,
        "{late} connects refused after READY=1 arrived; stderr:\n{}",
        sy.stderr_text()
    );

    // A reload: RELOADING=1 stamped with the monotonic time it began, then READY=1 again.
    let before_reload = monotonic_usec();
    sy.signal(Signal::SIGHUP);
    let reloaded = sy.wait_notifications(3, NOTIFY_LIMIT);
    let after_reload = monotonic_usec();
    let reloading = reloaded
        .iter()
        .find(|n| n.has("RELOADING=1"))
        .unwrap_or_else(|| panic!("no RELOADING=1 after SIGHUP: {reloaded:?}"));
    let stamp: u64 = reloading
        .value("MONOTONIC_USEC")
        .unwrap_or_else(|| panic!("RELOADING=1 without MONOTONIC_USEC: {reloading:?}"))
        .parse()
        .unwrap_or_else(|e| panic!("MONOTONIC_USEC is not a number ({e}): {reloading:?}"));
    assert!(
        (before_reload..=after_reload).contains(&stamp),
        "MONOTONIC_USEC={stamp} outside the reload ({before_reload}..={after_reload} µs)"
    );
    smtp_session_blocking(listen, &SessionOptions::default()).expect("a session after reload");

    // Shutdown: STOPPING=1 before the exit.
    let status = sy.terminate();
    assert!(
        status.success(),
        "exit {status}; stderr:\n{}",
        sy.stderr_text()
    );
    let all = sy.wait_notifications(4, NOTIFY_LIMIT);
    assert_eq!(
        state_changes(&all),
        ["READY=1", "RELOADING=1", "READY=1", "STOPPING=1"],
        "notifications: {all:?}"
    );
    assert!(
        all.windows(2).all(|pair| pair[0].at <= pair[1].at),
        "{all:?}"
    );
}

/// Starts `launch` on a config in front of one backend, serves one session through it, stops
/// it with SIGTERM (exit 0 expected) and returns the stopped process.
fn serve_one_session_and_stop(launch: Launch) -> Switchyard {
    let mta1 = SmtpServer::start("mta1", Behaviour::default());
    let listen = free_addr();
    let mut sy = launch.start(&config(listen, &mta1));
    let greeted_by = smtp_session_blocking(listen, &SessionOptions::default())
        .unwrap_or_else(|e| panic!("a session through the proxy: {e}; {}", sy.stderr_text()));
    assert_eq!(greeted_by, "mta1");
    let status = sy.terminate();
    assert!(
        status.success(),
        "exit {status}; stderr:\n{}",
        sy.stderr_text()
    );
    assert_eq!(
        sy.totals().backend("mx", "mta1").map(|b| b.assigned),
        Some(1)
    );
    sy
}

#[test]
fn without_a_notify_socket_the_process_runs_and_stops_as_before() {
    let sy = serve_one_session_and_stop(Launch::new(BIN).without_notify_socket());
    assert!(sy.notifications().is_empty());
    let log = sy.stderr_text();
    assert!(!log.contains("NOTIFY_SOCKET"), "{log}");
}

#[test]
fn a_notify_socket_nobody_reads_is_warned_about_once_and_is_not_fatal() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let nobody = dir.path().join("nobody.sock");
    let nobody = nobody.to_str().expect("a UTF-8 temporary path");
    // READY=1 and STOPPING=1 both fail to send: one warning for the two.
    let sy = serve_one_session_and_stop(
        Launch::new(BIN)
            .without_notify_socket()
            .env("NOTIFY_SOCKET", nobody),
    );
    let log = sy.stderr_text();
    let warnings = log
        .lines()
        .filter(|line| line.contains("WARN") && line.contains("NOTIFY_SOCKET"))
        .count();
    assert_eq!(warnings, 1, "{log}");
}
