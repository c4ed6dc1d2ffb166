//! Switchyard between Postfix's own SMTP tools: `smtp-source` as the client population and
//! `smtp-sink` as the MTA pool. Where they are not installed the tests print a loud SKIP, and
//! fail instead when SWITCHYARD_REQUIRE_POSTFIX=1 (as CI sets it).

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use testkit::harness::{Switchyard, free_addr, free_addr_v6};

/// The binary under test.
const BIN: &str = env!("CARGO_BIN_EXE_switchyard");

const SMTP_SINK: &str = "/usr/sbin/smtp-sink";
const SMTP_SOURCE: &str = "/usr/sbin/smtp-source";

/// True when the tools are there; otherwise SKIPs loudly, or panics when they are required.
fn postfix_tools_available(tools: &[&str]) -> bool {
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|t| !Path::new(t).exists())
        .collect();
    if missing.is_empty() {
        return true;
    }
    if std::env::var("SWITCHYARD_REQUIRE_POSTFIX").as_deref() == Ok("1") {
        panic!(
            "SWITCHYARD_REQUIRE_POSTFIX=1 but {missing:?} are missing (install package postfix)"
        );
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
            _process: Reaped {
                child,
                what: format!("smtp-sink {addr}"),
            },
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "{} did not start listening",
                sink._process.what
            );
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
        toml.push_str(&format!(
            "\n[[service.backend]]\nname = \"sink{i}\"\naddress = \"{}\"\n",
            sink.addr
        ));
    }
    let sy = Switchyard::start(BIN, &toml);

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
    let mut source = Reaped {
        child,
        what: "smtp-source".into(),
    };
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
    assert!(
        err.trim().is_empty(),
        "smtp-source reported problems:\n{err}"
    );

    // The sinks print their counters as sessions end; give the last ones a moment.
    let deadline = Instant::now() + Duration::from_secs(10);
    let counts = loop {
        let counts: Vec<u64> = sinks
            .iter()
            .zip(&baseline)
            .map(|(s, b)| s.messages() - b)
            .collect();
        if counts.iter().sum::<u64>() >= SESSIONS || Instant::now() > deadline {
            break counts;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        counts.iter().sum::<u64>(),
        SESSIONS,
        "messages per sink: {counts:?}"
    );
    let fair = SESSIONS / 3;
    for (i, count) in counts.iter().enumerate() {
        assert!(
            *count >= fair * 6 / 10,
            "sink{i} got {count} of {SESSIONS} messages, far below a fair share: {counts:?}"
        );
    }
    assert_eq!(
        sy.stderr_text().matches("is DOWN").count(),
        0,
        "{}",
        sy.stderr_text()
    );
    eprintln!("messages per sink: {counts:?}");
}

// ---------------------------------------------------------------------------------------------
// A real Postfix smtpd behind switchyard, reading our PROXY headers
// ---------------------------------------------------------------------------------------------

const POSTFIX: &str = "/usr/sbin/postfix";

/// A private Postfix instance (own config, queue and log under a temporary directory) whose
/// only listener is `smtpd` with `smtpd_upstream_proxy_protocol = haproxy` on a loopback
/// port. The master runs in the foreground as our child; dropping this stops it, waits for it,
/// and removes every file.
struct PrivatePostfix {
    addr: SocketAddr,
    config_dir: PathBuf,
    maillog: PathBuf,
    master_pid_file: PathBuf,
    master: Option<Reaped>,
    _dir: tempfile::TempDir,
}

impl PrivatePostfix {
    fn start() -> PrivatePostfix {
        let dir = tempfile::tempdir().expect("temporary directory");
        let base = dir.path().to_path_buf();
        // Postfix's daemons run as user postfix and must traverse to their queue.
        set_mode(&base, 0o755);
        let (config_dir, spool, data) = (base.join("etc"), base.join("spool"), base.join("data"));
        for d in [&config_dir, &spool, &data] {
            std::fs::create_dir(d).expect("create Postfix directory");
        }
        chown_postfix(&data);
        let addr = free_addr();
        let maillog = base.join("maillog");
        let main_cf = format!(
            "compatibility_level = 3.6\n\
             queue_directory = {spool}\n\
             data_directory = {data}\n\
             maillog_file = {maillog}\n\
             maillog_file_prefixes = {base}\n\
             syslog_name = switchyard-test-postfix\n\
             myhostname = pf.switchyard.test\n\
             mydomain = switchyard.test\n\
             inet_interfaces = loopback-only\n\
             inet_protocols = all\n\
             mydestination =\n\
             mynetworks = 127.0.0.0/8 [::1]/128\n\
             alias_maps =\n\
             alias_database =\n\
             local_recipient_maps =\n\
             smtpd_upstream_proxy_protocol = haproxy\n\
             smtpd_upstream_proxy_timeout = 5s\n\
             smtpd_peername_lookup = no\n\
             smtpd_client_port_logging = yes\n",
            spool = spool.display(),
            data = data.display(),
            maillog = maillog.display(),
            base = base.display(),
        );
        std::fs::write(config_dir.join("main.cf"), main_cf).expect("write main.cf");
        let master_cf = format!(
            "{addr} inet n - n - - smtpd\n\
             pickup unix n - n 60 1 pickup\n\
             cleanup unix n - n - 0 cleanup\n\
             qmgr unix n - n 300 1 qmgr\n\
             rewrite unix - - n - - trivial-rewrite\n\
             bounce unix - - n - 0 bounce\n\
             defer unix - - n - 0 bounce\n\
             trace unix - - n - 0 bounce\n\
             verify unix - - n - 1 verify\n\
             proxymap unix - - n - - proxymap\n\
             error unix - - n - - error\n\
             retry unix - - n - - error\n\
             discard unix - - n - - discard\n\
             anvil unix - - n - 1 anvil\n\
             scache unix - - n - 1 scache\n\
             postlog unix-dgram n - n - 1 postlogd\n"
        );
        std::fs::write(config_dir.join("master.cf"), master_cf).expect("write master.cf");
        let child = Command::new(POSTFIX)
            .arg("-c")
            .arg(&config_dir)
            .arg("start-fg")
            .stdin(Stdio::null())
            .stdout(File::create(base.join("postfix.out")).expect("postfix output file"))
            .stderr(File::create(base.join("postfix.err")).expect("postfix error file"))
            .spawn()
            .expect("spawn postfix start-fg");
        let pf = PrivatePostfix {
            addr,
            master_pid_file: spool.join("pid/master.pid"),
            config_dir,
            maillog,
            master: Some(Reaped {
                child,
                what: "postfix master".into(),
            }),
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        // Not a probe connection: smtpd would log it as a broken PROXY handshake.
        while !is_listening(addr) {
            assert!(
                Instant::now() < deadline,
                "private Postfix did not listen on {addr}; its log:\n{}",
                pf.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        pf
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.maillog).unwrap_or_default()
    }

    /// Waits until the log contains `needle`.
    fn wait_for_log(&self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.log().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "Postfix never logged {needle:?}; its log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for PrivatePostfix {
    fn drop(&mut self) {
        let _ = Command::new(POSTFIX)
            .arg("-c")
            .arg(&self.config_dir)
            .arg("stop")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if let Some(mut master) = self.master.take() {
            let deadline = Instant::now() + Duration::from_secs(15);
            while matches!(master.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            // Still running: end the master we started, by the PID it recorded.
            if matches!(master.child.try_wait(), Ok(None)) {
                let pid = std::fs::read_to_string(&self.master_pid_file).unwrap_or_default();
                if let Ok(pid) = pid.trim().parse::<i32>() {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
            drop(master);
        }
    }
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

fn chown_postfix(path: &Path) {
    let status = Command::new("chown")
        .arg("postfix")
        .arg(path)
        .status()
        .expect("run chown");
    assert!(status.success(), "chown postfix {}", path.display());
}

/// Greeting, EHLO, QUIT from `source` to `target`; returns the client's own address.
async fn ehlo_quit_from(source: std::net::IpAddr, target: SocketAddr) -> SocketAddr {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let socket = if target.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .expect("client socket");
    socket
        .bind(SocketAddr::new(source, 0))
        .expect("bind client source");
    let stream = socket.connect(target).await.expect("connect to switchyard");
    let me = stream.local_addr().expect("client address");
    let mut conn = BufReader::new(stream);
    async fn expect(conn: &mut BufReader<tokio::net::TcpStream>, code: &str) {
        loop {
            let mut line = String::new();
            let n = tokio::time::timeout(Duration::from_secs(10), conn.read_line(&mut line))
                .await
                .expect("reply in time")
                .expect("read reply");
            assert!(
                n > 0 && line.starts_with(code),
                "expected {code}, got {line:?}"
            );
            if line.as_bytes().get(3) != Some(&b'-') {
                return;
            }
        }
    }
    expect(&mut conn, "220").await;
    conn.get_mut()
        .write_all(b"EHLO client.switchyard.test\r\n")
        .await
        .expect("send EHLO");
    expect(&mut conn, "250").await;
    conn.get_mut()
        .write_all(b"QUIT\r\n")
        .await
        .expect("send QUIT");
    expect(&mut conn, "221").await;
    me
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postfix_smtpd_logs_the_real_client_address_through_proxy_v1_and_v2() {
    if !postfix_tools_available(&[POSTFIX]) {
        return;
    }
    if !running_as_root() {
        if std::env::var("SWITCHYARD_REQUIRE_POSTFIX").as_deref() == Ok("1") {
            panic!("SWITCHYARD_REQUIRE_POSTFIX=1 but a private Postfix instance needs root");
        }
        eprintln!("\n*** SKIP: a private Postfix instance needs root; this test did NOT run ***\n");
        return;
    }
    let pf = tokio::task::spawn_blocking(PrivatePostfix::start)
        .await
        .expect("start Postfix");
    let v1 = (free_addr(), free_addr_v6());
    let v2 = (free_addr(), free_addr_v6());
    let service = |name: &str, proxy: &str, listen: (SocketAddr, SocketAddr)| {
        format!(
            "[[service]]\nname = \"{name}\"\nlisten = [\"{}\", \"{}\"]\nproxy_protocol = \"{proxy}\"\n\n\
             [service.health]\nkind = \"smtp\"\ninterval = \"300ms\"\ntimeout = \"300ms\"\n\
             rise = 1\nfall = 1\n\n[[service.backend]]\nname = \"postfix\"\naddress = \"{}\"\n\n",
            listen.0, listen.1, pf.addr
        )
    };
    let toml = service("pf-v1", "v1", v1) + &service("pf-v2", "v2", v2);
    let sy = Switchyard::start(BIN, &toml);
    let source_v4: std::net::IpAddr = "127.0.0.2".parse().expect("literal");
    let source_v6: std::net::IpAddr = "::1".parse().expect("literal");

    for (listen_v4, listen_v6) in [v1, v2] {
        // switchyard itself reaches Postfix from 127.0.0.1, so 127.0.0.2 and ::1 in Postfix's
        // log can only have come from the PROXY header.
        let client = ehlo_quit_from(source_v4, listen_v4).await;
        pf.wait_for_log(&format!(
            "connect from unknown[127.0.0.2]:{}",
            client.port()
        ));
        pf.wait_for_log(&format!(
            "disconnect from unknown[127.0.0.2]:{} ehlo=1 quit=1 commands=2",
            client.port()
        ));
        let client = ehlo_quit_from(source_v6, listen_v6).await;
        pf.wait_for_log(&format!("connect from unknown[::1]:{}", client.port()));
    }

    // Several rounds of checks with both header versions have passed through Postfix: none
    // made it complain, none failed.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let log = pf.log();
    assert!(
        log.contains("connect from unknown[127.0.0.1]"),
        "checks never reached Postfix:\n{log}"
    );
    for bad in ["haproxy", "warning", "error", "lost connection"] {
        assert!(!log.contains(bad), "Postfix logged {bad:?}:\n{log}");
    }
    assert_eq!(
        sy.stderr_text().matches("is DOWN").count(),
        0,
        "{}",
        sy.stderr_text()
    );
    drop(sy);
    tokio::task::spawn_blocking(move || drop(pf))
        .await
        .expect("stop Postfix");
}

/// Effective uid 0, from /proc (the test's nix features do not include the user module).
fn running_as_root() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        == Some("0")
}

/// Whether an IPv4 TCP socket is listening on `addr`, from /proc/net/tcp.
fn is_listening(addr: SocketAddr) -> bool {
    let SocketAddr::V4(v4) = addr else {
        return false;
    };
    let local = format!(
        "{:08X}:{:04X}",
        u32::from_le_bytes(v4.ip().octets()),
        v4.port()
    );
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.get(1) == Some(&local.as_str()) && fields.get(3) == Some(&"0A")
    })
}
