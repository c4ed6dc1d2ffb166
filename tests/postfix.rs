//! Switchyard between Postfix's own SMTP tools: `smtp-source` as the client population and
//! `smtp-sink` as the MTA pool. Where they are not installed the tests print a loud SKIP, and
//! fail instead when SWITCHYARD_REQUIRE_POSTFIX=1 (as CI sets it).

mod support;

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

const SMTP_SINK: &str = "/usr/sbin/smtp-sink";
const SMTP_SOURCE: &str = "/usr/sbin/smtp-source";

/// True when the tools are there; otherwise SKIPs loudly, or panics when they are required.
fn postfix_tools_available(tools: &[&str]) -> bool {
    let missing: Vec<&str> = tools.iter().copied().filter(|t| !Path::new(t).exists()).collect();
    if missing.is_empty() {
        return true;
    }
    if std::env::var("SWITCHYARD_REQUIRE_POSTFIX").as_deref() == Ok("1") {
        panic!("SWITCHYARD_REQUIRE_POSTFIX=1 but {missing:?} are missing (install package postfix)");
    }
    eprintln!("\n*** SKIP: Postfix tools {missing:?} not installed; this test did NOT run ***\n");
    false
}

/// A child process killed (by its own PID) and reaped when dropped, also on panic.
struct Reaped {
    child: Child,
    what: String,
}

impl Drop for Reaped {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// One `smtp-sink` with its counter output (`-c`) going to a file.
struct Sink {
    addr: SocketAddr,
    output: PathBuf,
    _process: Reaped,
}

impl Sink {
    fn start(dir: &Path, index: usize) -> Sink {
        let addr = free_addr();
        let output = dir.join(format!("sink{index}.out"));
        let child = Command::new(SMTP_SINK)
            .args(["-c", "-u", "nobody", &addr.to_string(), "256"])
            .stdin(Stdio::null())
            .stdout(File::create(&output).expect("sink output file"))
            .stderr(File::create(dir.join(format!("sink{index}.err"))).expect("sink error file"))
            .spawn()
            .expect("spawn smtp-sink");
        let sink = Sink {
            addr,
            output,
            _process: Reaped { child, what: format!("smtp-sink {addr}") },
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "{} did not start listening", sink._process.what);
            std::thread::sleep(Duration::from_millis(20));
        }
        sink
    }

    /// Messages received so far, from the last `sess=N quit=N mesg=N` record `-c` printed.
    fn messages(&self) -> u64 {
        let text = std::fs::read_to_string(&self.output).unwrap_or_default();
        text.rsplit("mesg=")
            .next()
            .filter(|_| text.contains("mesg="))
            .and_then(|rest| {
                let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
                digits.parse().ok()
            })
            .unwrap_or(0)
    }
}

#[test]
fn smtp_source_through_switchyard_to_three_smtp_sinks() {
    if !postfix_tools_available(&[SMTP_SINK, SMTP_SOURCE]) {
        return;
    }
    const SESSIONS: u64 = 2000;
    let dir = tempfile::tempdir().expect("temporary directory");
    let sinks: Vec<Sink> = (0..3).map(|i| Sink::start(dir.path(), i)).collect();
    let baseline: Vec<u64> = sinks.iter().map(Sink::messages).collect();

    let listen = free_addr();
    let mut toml = format!(
        "[[service]]\nname = \"mx\"\nlisten = \"{listen}\"\nalgorithm = \"least_conn\"\n\
         connect_timeout = \"2s\"\nretries = 2\n\n[service.health]\nkind = \"smtp\"\n\
         interval = \"1s\"\ntimeout = \"1s\"\n"
    );
    for (i, sink) in sinks.iter().enumerate() {
        toml.push_str(&format!("\n[[service.backend]]\nname = \"sink{i}\"\naddress = \"{}\"\n", sink.addr));
    }
    let sy = Switchyard::start(&toml);

    let source_out = dir.path().join("source.out");
    let source_err = dir.path().join("source.err");
    let child = Command::new(SMTP_SOURCE)
        .args(["-s", "20", "-m", &SESSIONS.to_string(), "-l", "2048"])
        .args(["-f", "a@x.test", "-t", "b@x.test", &listen.to_string()])
        .stdin(Stdio::null())
        .stdout(File::create(&source_out).expect("source output file"))
        .stderr(File::create(&source_err).expect("source error file"))
        .spawn()
        .expect("spawn smtp-source");
    let mut source = Reaped { child, what: "smtp-source".into() };
    let deadline = Instant::now() + Duration::from_secs(180);
    let status = loop {
        if let Ok(Some(status)) = source.child.try_wait() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "smtp-source did not finish in 180 s; switchyard stderr:\n{}",
            sy.stderr_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = std::fs::read_to_string(&source_out).unwrap_or_default();
    let err = std::fs::read_to_string(&source_err).unwrap_or_default();
    assert!(
        status.success(),
        "smtp-source failed ({status}): {out}{err}\nswitchyard stderr:\n{}",
        sy.stderr_text()
    );
    assert!(err.trim().is_empty(), "smtp-source reported problems:\n{err}");

    // The sinks print their counters as sessions end; give the last ones a moment.
    let deadline = Instant::now() + Duration::from_secs(10);
    let counts = loop {
        let counts: Vec<u64> = sinks.iter().zip(&baseline).map(|(s, b)| s.messages() - b).collect();
        if counts.iter().sum::<u64>() >= SESSIONS || Instant::now() > deadline {
            break counts;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(counts.iter().sum::<u64>(), SESSIONS, "messages per sink: {counts:?}");
    let fair = SESSIONS / 3;
    for (i, count) in counts.iter().enumerate() {
        assert!(
            *count >= fair * 6 / 10,
            "sink{i} got {count} of {SESSIONS} messages, far below a fair share: {counts:?}"
        );
    }
    assert_eq!(sy.stderr_text().matches("is DOWN").count(), 0, "{}", sy.stderr_text());
    eprintln!("messages per sink: {counts:?}");
}
