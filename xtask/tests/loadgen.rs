//! The load generator against real SMTP servers: xtask's own sink and Postfix's smtp-sink. It
//! must count exactly what it sent, and its reply checks must catch a server that rejects.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use testkit::harness::free_addr;
use testkit::smtp_server::RejectAt;
use xtask::loadgen::{self, Budget, LoadSpec};
use xtask::sink::{Reject, SinkConfig, SinkThread};

fn any_port() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// xtask's sink on a loopback port, accepting everything.
fn prompt_sink() -> SinkThread {
    SinkThread::start(&[any_port()], SinkConfig::default()).expect("sink starts")
}

/// Every one of `sessions` sessions succeeded with one message each.
fn assert_all_delivered(report: &loadgen::LoadReport, sessions: u64) {
    assert_eq!(
        (report.sessions_ok, report.sessions_failed, report.messages),
        (sessions, 0, sessions),
        "{:?}",
        report.errors
    );
}

fn spec(target: SocketAddr, concurrency: usize, sessions: u64) -> LoadSpec {
    LoadSpec::new(target, concurrency, Budget::Sessions(sessions))
}

#[test]
fn counts_exactly_the_sessions_and_messages_the_sink_saw() {
    let sink = prompt_sink();
    let report = loadgen::run_blocking(spec(sink.addrs[0], 20, 500)).expect("load runs");
    assert_eq!(report.sessions_ok, 500);
    assert_eq!(report.sessions_failed, 0, "errors: {:?}", report.errors);
    assert_eq!(report.messages, 500);
    assert_eq!(sink.servers[0].connections(), 500);
    assert_eq!(sink.servers[0].messages(), 500);
    assert_eq!(report.latency_ms.session.count, 500);
    assert_eq!(report.latency_ms.connect.count, 500);
    assert!(
        report.latency_ms.session.p50 > 0.0
            && report.latency_ms.session.p50 <= report.latency_ms.session.p99
    );
    // What the sink read between DATA and "." is the stuffed message without the final dot.
    let per_message = report.bytes / 500;
    assert_eq!(sink.servers[0].message_bytes(), report.bytes - 500 * 3);
    assert!(
        (2000..2200).contains(&per_message),
        "message of {per_message} bytes for --size 2048"
    );
}

#[test]
fn pipelining_with_several_recipients_delivers_one_message_per_session() {
    let sink = prompt_sink();
    let mut s = spec(sink.addrs[0], 8, 120);
    s.pipelining = true;
    s.recipients = 3;
    let report = loadgen::run_blocking(s).expect("load runs");
    assert_all_delivered(&report, 120);
    assert_eq!(sink.servers[0].messages(), 120);
}

#[test]
fn stops_exactly_at_the_budget_even_with_more_workers_than_sessions() {
    let sink = prompt_sink();
    let report = loadgen::run_blocking(spec(sink.addrs[0], 50, 7)).expect("load runs");
    assert_eq!(report.sessions_ok, 7);
    assert_eq!(sink.servers[0].connections(), 7);
}

#[test]
fn duration_budget_stops_by_itself() {
    let sink = prompt_sink();
    let s = LoadSpec::new(
        sink.addrs[0],
        4,
        Budget::Duration(Duration::from_millis(400)),
    );
    let report = loadgen::run_blocking(s).expect("load runs");
    assert!(
        report.elapsed_s >= 0.4 && report.elapsed_s < 5.0,
        "ran {} s",
        report.elapsed_s
    );
    assert!(report.sessions_ok > 0);
    assert_eq!(report.sessions_failed, 0);
    assert_eq!(sink.servers[0].messages() as u64, report.messages);
}

fn rejecting(reject: Reject) -> loadgen::LoadReport {
    let sink = SinkThread::start(
        &[any_port()],
        SinkConfig {
            reject: Some(reject),
        },
    )
    .expect("sink starts");
    let report = loadgen::run_blocking(spec(sink.addrs[0], 5, 40)).expect("load runs");
    assert_eq!(sink.servers[0].messages(), 0);
    report
}

#[test]
fn rejections_are_counted_by_code_and_stage() {
    for (reject, kind) in [
        (
            Reject::At(RejectAt::Rcpt, 550),
            "unexpected code 550 at RCPT",
        ),
        (
            Reject::At(RejectAt::Mail, 451),
            "unexpected code 451 at MAIL",
        ),
        (
            Reject::At(RejectAt::Data, 554),
            "unexpected code 554 at DATA",
        ),
        (Reject::Greeting(421), "unexpected code 421 at GREETING"),
    ] {
        let report = rejecting(reject);
        assert_eq!(report.sessions_ok, 0, "{kind}");
        assert_eq!(report.sessions_failed, 40, "{kind}");
        assert_eq!(report.messages, 0, "{kind}");
        assert_eq!(
            report.errors.get(kind),
            Some(&40),
            "{kind}: got {:?}",
            report.errors
        );
        assert_eq!(report.errors.len(), 1, "{kind}: got {:?}", report.errors);
    }
}

#[test]
fn refused_connections_are_an_error_kind() {
    let addr = free_addr();
    let report = loadgen::run_blocking(spec(addr, 3, 10)).expect("load runs");
    assert_eq!(report.sessions_failed, 10);
    assert_eq!(
        report.errors.get("connect refused"),
        Some(&10),
        "{:?}",
        report.errors
    );
}

/// smtp-sink as a child we stop by PID, dumping every message it accepted into `dir`.
struct SmtpSink(Child);

impl Drop for SmtpSink {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn smtp_sink_path() -> Option<std::path::PathBuf> {
    let found = ["/usr/sbin/smtp-sink", "/usr/bin/smtp-sink"]
        .into_iter()
        .map(std::path::PathBuf::from)
        .find(|p| p.is_file());
    if found.is_none() && std::env::var("SWITCHYARD_REQUIRE_POSTFIX").is_ok_and(|v| v == "1") {
        panic!(
            "smtp-sink is not installed but SWITCHYARD_REQUIRE_POSTFIX=1 (run cargo xtask setup as root)"
        );
    }
    found
}

#[test]
fn counts_exactly_what_postfix_smtp_sink_received() {
    let Some(bin) = smtp_sink_path() else {
        eprintln!(
            "SKIPPED: smtp-sink not installed (set SWITCHYARD_REQUIRE_POSTFIX=1 to make this a failure)"
        );
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    // smtp-sink drops to `nobody` as root and must still write its dumps.
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .expect("chmod");
    let addr = free_addr();
    let mut cmd = Command::new(bin);
    if nix_is_root() {
        cmd.args(["-u", "nobody"]);
    }
    cmd.arg("-d")
        .arg(dir.path().join("msg."))
        .arg(addr.to_string())
        .arg("256");
    let _sink = SmtpSink(cmd.stdin(Stdio::null()).spawn().expect("smtp-sink starts"));
    testkit::supervise::wait_for_greeting(addr, Duration::from_secs(10)).expect("smtp-sink greets");

    let mut s = spec(addr, 10, 300);
    s.pipelining = true;
    let report = loadgen::run_blocking(s).expect("load runs");
    assert_all_delivered(&report, 300);
    // One dump file per message smtp-sink accepted.
    let dumped = std::fs::read_dir(dir.path()).expect("dump dir").count();
    assert_eq!(dumped, 300);
}

fn nix_is_root() -> bool {
    // The effective uid is the third field of the Uid: line.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}
