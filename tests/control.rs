//! The admin socket and `switchyard ctl` against the real binary: where the socket is made
//! (mode 0660, a relative path from the config's directory, removed at shutdown, a stale one
//! replaced, a live one left to its owner), and every way ctl can fail to ask (no daemon, no
//! permission, a bad SERVICE/BACKEND, a config with errors), read from exit codes and the JSON
//! replies on the socket.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use switchyard::control::{Reply, Request};
use testkit::config_toml::{ServiceToml, admin_table};
use testkit::harness::{CtlOutput, Switchyard, free_addr, run_ctl};

/// The binary under test.
const BIN: &str = env!("CARGO_BIN_EXE_switchyard");

/// One service on a fresh loopback port, no health checks, one backend nobody serves (no
/// session is made here); `extra` goes before it (an `[admin]` table).
fn config(extra: &str) -> String {
    let service = ServiceToml::new("mx", &[free_addr()])
        .health("kind = \"none\"")
        .backend("mta1", free_addr());
    format!("shutdown_timeout = \"1s\"\n{extra}{service}")
}

/// `switchyard ctl ARGS...` (the caller names the socket or config).
fn ctl(args: &[&str]) -> CtlOutput {
    let mut command = Command::new(BIN);
    run_ctl(command.arg("ctl").args(args))
}

/// Whether a daemon answers on `socket` with a reply of the protocol (whatever it says).
fn answers(socket: &Path) -> bool {
    switchyard::ctl::ask(socket, &Request::Check).is_ok()
}

fn assert_failed_naming(out: &CtlOutput, fragments: &[&str]) {
    assert_eq!(out.code, Some(1), "{out:?}");
    for fragment in fragments {
        assert!(
            out.stderr.contains(fragment),
            "{fragment:?} missing: {out:?}"
        );
    }
}

/// Runs `switchyard run` with `config_toml` until it exits by itself (a refusal to start):
/// its exit code and stderr. Still running after 20 s fails the test.
fn run_to_exit(config_toml: &str) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("switchyard.toml");
    std::fs::write(&path, config_toml).expect("write config");
    let mut child = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn switchyard");
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "switchyard did not refuse to start; stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("output");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn ctl_without_a_daemon_names_the_socket_it_tried() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("admin.sock");
    let missing_text = missing.display().to_string();
    let out = ctl(&["--socket", &missing_text, "show"]);
    assert_failed_naming(&out, &[&missing_text, "no switchyard is serving"]);

    // A socket file nobody serves (its daemon was killed): refused, told the same way.
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).expect("bind"));
    let stale_text = stale.display().to_string();
    let out = ctl(&["--socket", &stale_text, "reload"]);
    assert_failed_naming(&out, &[&stale_text, "no switchyard is serving"]);
}

#[test]
fn socket_is_made_0660_and_removed_at_shutdown() {
    let mut sy = Switchyard::start(BIN, &config(""));
    let socket = sy.admin_socket().to_path_buf();
    let metadata = std::fs::metadata(&socket).expect("the admin socket exists once ready");
    assert!(metadata.file_type().is_socket(), "{}", socket.display());
    assert_eq!(metadata.permissions().mode() & 0o777, 0o660);
    assert!(answers(&socket));
    assert!(sy.terminate().success());
    assert!(
        !socket.exists(),
        "{} left behind; stderr:\n{}",
        socket.display(),
        sy.stderr_text()
    );
}

#[test]
fn unprivileged_ctl_is_told_permission_is_denied() {
    // The directory is open to everyone, so only the socket's own mode stands in the way.
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let socket = dir.path().join("admin.sock");
    let _sy = Switchyard::start(BIN, &config(&admin_table(&socket)));
    let socket_text = socket.display().to_string();
    let mut command = Command::new(BIN);
    command
        .uid(65534)
        .gid(65534)
        .current_dir("/")
        .args(["ctl", "--socket", &socket_text, "show"]);
    let out = run_ctl(&mut command);
    assert_failed_naming(&out, &["permission denied", &socket_text, "group"]);
    // Root still gets through.
    assert!(answers(&socket));
}

#[test]
fn stale_socket_of_a_killed_daemon_is_replaced_at_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("admin.sock");
    let mut killed = Switchyard::start(BIN, &config(&admin_table(&socket)));
    killed.signal(Signal::SIGKILL);
    killed
        .wait_timeout(Duration::from_secs(10))
        .expect("killed");
    assert!(socket.exists(), "SIGKILL leaves the socket file behind");
    assert!(!answers(&socket));

    let _next = Switchyard::start(BIN, &config(&admin_table(&socket)));
    assert!(answers(&socket), "the new daemon serves the socket");
}

#[test]
fn second_daemon_on_the_same_socket_refuses_to_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("admin.sock");
    let _first = Switchyard::start(BIN, &config(&admin_table(&socket)));
    let (code, stderr) = run_to_exit(&config(&admin_table(&socket)));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(&socket.display().to_string())
            && stderr.contains("another switchyard is serving"),
        "{stderr}"
    );
    assert!(answers(&socket), "the first daemon keeps its socket");
}

#[test]
fn something_else_at_the_socket_path_is_left_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("admin.sock");
    std::fs::write(&socket, "not a socket").expect("write");
    let (code, stderr) = run_to_exit(&config(&admin_table(&socket)));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("not a socket"), "{stderr}");
    assert_eq!(
        std::fs::read_to_string(&socket).expect("still there"),
        "not a socket"
    );
}

#[test]
fn ctl_config_finds_a_relative_socket_from_the_config_directory() {
    // A relative socket in a directory that does not exist yet: made at start.
    let sy = Switchyard::start(BIN, &config("[admin]\nsocket = \"run/admin.sock\"\n"));
    let socket = sy.config_dir().join("run").join("admin.sock");
    assert_eq!(sy.admin_socket(), socket);
    assert!(socket.exists(), "{}", socket.display());
    let config_file = sy.config_dir().join("switchyard.toml");
    // From another directory, so only the config's own directory can resolve the path.
    let mut command = Command::new(BIN);
    command
        .current_dir("/")
        .arg("ctl")
        .arg("--config")
        .arg(&config_file)
        .args(["--json", "check"]);
    let out = run_ctl(&mut command);
    let reply: Result<Reply, _> = serde_json::from_str(&out.stdout);
    assert!(reply.is_ok(), "no reply from the daemon: {out:?}");
}

#[test]
fn ctl_config_with_errors_says_so() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "[admin]\nsocket = \"\"\n").expect("write");
    let file_text = file.display().to_string();
    let out = ctl(&["--config", &file_text, "show"]);
    assert_failed_naming(
        &out,
        &[&file_text, "has errors", "admin.socket", "--socket"],
    );
}

#[test]
fn bad_targets_and_weights_are_refused_before_asking() {
    // No daemon serves this path: the command line is refused before any connect.
    let nowhere = "/nonexistent/switchyard-admin.sock";
    for args in [
        vec!["drain", "mx"],
        vec!["undrain", "mx/"],
        vec!["disable", "/mta1"],
        vec!["enable", "mx/mta1/extra"],
        vec!["weight", "mta1", "3"],
    ] {
        let mut all = vec!["--socket", nowhere];
        all.extend(&args);
        let out = ctl(&all);
        assert_failed_naming(&out, &["is not SERVICE/BACKEND", "mx/mta1"]);
        assert!(!out.stderr.contains(nowhere), "{args:?}: {out:?}");
    }
    let out = ctl(&["--socket", nowhere, "weight", "mx/mta1", "heavy"]);
    assert_failed_naming(&out, &["weight \"heavy\" is not a whole number"]);
}

/// One line to the socket, one reply line back.
fn exchange(stream: &mut UnixStream, reader: &mut BufReader<UnixStream>, line: &[u8]) -> Reply {
    stream.write_all(line).expect("write");
    let mut reply = String::new();
    reader.read_line(&mut reply).expect("read reply");
    serde_json::from_str(&reply).unwrap_or_else(|e| panic!("not a Reply ({e}): {reply:?}"))
}

#[test]
fn malformed_request_lines_get_refused_replies() {
    let sy = Switchyard::start(BIN, &config(""));
    let mut stream = UnixStream::connect(sy.admin_socket()).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));

    let reply = exchange(&mut stream, &mut reader, b"show\n");
    assert!(
        !reply.ok && reply.text.contains("malformed request"),
        "{reply:?}"
    );
    // The connection stays usable after a malformed line.
    let reply = exchange(&mut stream, &mut reader, b"{\"command\":\"explode\"}\n");
    assert!(!reply.ok && reply.text.contains("explode"), "{reply:?}");
    let reply = exchange(&mut stream, &mut reader, b"\n");
    assert!(
        !reply.ok && reply.text.contains("empty request"),
        "{reply:?}"
    );

    // A line past the limit is refused and ends the connection.
    let mut long = vec![b' '; switchyard::admin::MAX_REQUEST_LINE + 10];
    long.push(b'\n');
    let reply = exchange(&mut stream, &mut reader, &long);
    assert!(!reply.ok && reply.text.contains("longer than"), "{reply:?}");
    let mut rest = String::new();
    assert_eq!(reader.read_line(&mut rest).expect("end of stream"), 0);
}

/// The commands against a running balancer in front of three real SMTP servers: what `show`
/// says and where new sessions go follow each change at once, a runtime drain holds across a
/// reload of an unchanged file, a file that changes that key ends it, and unknown names are
/// refused with the names that exist.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_changes_what_show_says_and_where_sessions_go() {
    use testkit::smtp_client::smtp_session;
    use testkit::smtp_server::{Behaviour, SmtpServer};
    let servers: Vec<SmtpServer> = ["a", "b", "c"]
        .iter()
        .map(|name| SmtpServer::start(name, Behaviour::default()))
        .collect();
    let listen = free_addr();
    let file = |c_weight: u32| {
        ServiceToml::new("mx", &[listen])
            .keys("algorithm = \"round_robin\"")
            .health(
                "kind = \"smtp\"\ninterval = \"200ms\"\ntimeout = \"200ms\"\nrise = 1\nfall = 1",
            )
            .backend(servers[0].name(), servers[0].addr())
            .backend(servers[1].name(), servers[1].addr())
            .backend_with(
                servers[2].name(),
                servers[2].addr(),
                &format!("weight = {c_weight}"),
            )
            .to_string()
    };
    let sy = Switchyard::start(BIN, &file(1));
    let write = |text: &str| {
        let text = format!("{text}{}", admin_table(sy.admin_socket()));
        std::fs::write(sy.config_dir().join("switchyard.toml"), text).expect("write config");
    };
    let ctl = |args: &[&str]| block(|| sy.ctl(args));
    let ok = |args: &[&str]| {
        let out = ctl(args);
        assert_eq!(out.code, Some(0), "ctl {args:?}: {out:?}");
        out.stdout
    };
    let backend = |name: &str| {
        let report: switchyard::control::ShowReport =
            serde_json::from_str(&ok(&["--json", "show", "mx"])).expect("show --json");
        report.services[0]
            .backends
            .iter()
            .find(|b| b.name == name)
            .cloned()
            .expect("backend in show")
    };
    async fn served(listen: std::net::SocketAddr, sessions: usize) -> Vec<String> {
        let mut names = Vec::new();
        for _ in 0..sessions {
            names.push(smtp_session(listen).await.expect("session"));
        }
        names
    }

    let table = ok(&["show"]);
    for name in ["mx", "a", "b", "c", "up"] {
        assert!(table.contains(name), "{name} missing from:\n{table}");
    }
    assert_eq!(backend("a").state, "up");

    ok(&["drain", "mx/a"]);
    let a = backend("a");
    assert_eq!(a.state, "drain");
    assert!(a.why.contains("ctl drain by uid 0"), "{a:?}");
    assert!(!served(listen, 6).await.contains(&"a".to_string()));
    // A reload of the unchanged file keeps the operator's drain.
    write(&file(1));
    ok(&["reload"]);
    assert_eq!(backend("a").state, "drain");
    ok(&["undrain", "mx/a"]);
    assert_eq!(backend("a").state, "up");
    assert!(served(listen, 6).await.contains(&"a".to_string()));

    ok(&["disable", "mx/b"]);
    let b = backend("b");
    assert_eq!(b.state, "disabled");
    assert!(!served(listen, 6).await.contains(&"b".to_string()));
    // No checks while disabled: the last check does not move.
    let checked = b.last_check.as_ref().map(|c| c.at_unix_ms);
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(backend("b").last_check.map(|c| c.at_unix_ms), checked);
    ok(&["enable", "mx/b"]);
    assert_eq!(backend("b").state, "up");
    assert!(served(listen, 6).await.contains(&"b".to_string()));

    ok(&["weight", "mx/c", "3"]);
    assert_eq!(backend("c").weight, 3);
    write(&file(1));
    ok(&["reload"]);
    assert_eq!(
        backend("c").weight,
        3,
        "an unchanged file keeps the runtime weight"
    );
    write(&file(2));
    let reloaded = ok(&["reload"]);
    assert!(reloaded.contains("runtime weight ended"), "{reloaded}");
    assert_eq!(
        backend("c").weight,
        2,
        "the file changed weight: its value applies"
    );

    // check: the file on disk, valid or not, is only looked at.
    let checked = ok(&["check"]);
    assert!(checked.contains("valid"), "{checked}");
    write("[[service]]\nname = 1\n");
    let out = ctl(&["check"]);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        out.stdout.contains("switchyard.toml:") || out.stderr.contains("switchyard.toml:"),
        "{out:?}"
    );
    let out = ctl(&["reload"]);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert_eq!(
        served(listen, 3).await.len(),
        3,
        "the old config keeps serving"
    );

    // Unknown names: refused, listing what exists.
    for (args, names) in [
        (vec!["drain", "mx/zz"], vec!["a", "b", "c"]),
        (vec!["weight", "nope/a", "2"], vec!["mx"]),
        (vec!["show", "nope"], vec!["mx"]),
    ] {
        let out = ctl(&args);
        assert_eq!(out.code, Some(1), "{args:?}: {out:?}");
        let said = format!("{}{}", out.stdout, out.stderr);
        for name in names {
            assert!(said.contains(name), "{args:?} does not list {name}: {said}");
        }
    }
    let out = ctl(&["weight", "mx/a", "5000"]);
    assert_eq!(out.code, Some(1), "{out:?}");
}

/// Runs blocking work (a `ctl` process) from an async test.
fn block<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// `ctl sessions`: exactly the sessions the test holds, by the client ports its sockets use,
/// each on the backend that greeted it, with bytes that grow as the client talks; a session
/// that ends leaves the list. Unknown services are refused listing the names, and `ctl flows`
/// without an xdp service says there is no kernel flow table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_lists_the_held_sessions_with_their_bytes() {
    use switchyard::control::{SessionReport, SessionsReport};
    use testkit::smtp_client::{Session, SessionOptions};
    use testkit::smtp_server::{Behaviour, SmtpServer};
    let servers: Vec<SmtpServer> = ["a", "b"]
        .iter()
        .map(|name| SmtpServer::start(name, Behaviour::default()))
        .collect();
    let listen = free_addr();
    let service = ServiceToml::new("mx", &[listen])
        .keys("algorithm = \"round_robin\"")
        .health("kind = \"none\"")
        .backend(servers[0].name(), servers[0].addr())
        .backend(servers[1].name(), servers[1].addr());
    let sy = Switchyard::start(BIN, &service.to_string());
    let listed = |args: &[&str]| -> Vec<SessionReport> {
        let out = block(|| sy.ctl(args));
        assert_eq!(out.code, Some(0), "ctl {args:?}: {out:?}");
        let report: SessionsReport = serde_json::from_str(&out.stdout).expect("sessions --json");
        report.sessions
    };
    let options = SessionOptions::default();
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut session = Session::open(listen, &options).await.expect("session");
        let port = session.stream().local_addr().expect("local address").port();
        held.push((port, session));
    }
    let by_port = |sessions: &[SessionReport], port: u16| {
        sessions
            .iter()
            .find(|s| s.client == format!("127.0.0.1:{port}"))
            .cloned()
            .unwrap_or_else(|| panic!("no session from port {port}: {sessions:?}"))
    };
    let before = listed(&["--json", "sessions"]);
    assert_eq!(before.len(), 3, "{before:?}");
    for (port, session) in &held {
        let listed = by_port(&before, *port);
        assert_eq!(listed.service, "mx");
        assert_eq!(listed.backend, session.backend, "{listed:?}");
        assert!(
            listed.to_client_bytes > 0,
            "the greeting counts: {listed:?}"
        );
        assert_eq!(listed.to_backend_bytes, 0, "{listed:?}");
    }

    let (port, session) = &mut held[0];
    let port = *port;
    session.noop().await.expect("NOOP");
    session.noop().await.expect("NOOP");
    let after = by_port(&listed(&["--json", "sessions", "mx"]), port);
    let was = by_port(&before, port);
    assert_eq!(
        after.to_backend_bytes,
        2 * "NOOP\r\n".len() as u64,
        "{after:?}"
    );
    assert!(after.to_client_bytes > was.to_client_bytes, "{after:?}");
    assert!(after.age_ms >= was.age_ms, "{after:?} {was:?}");

    // The table for people names every client port.
    let table = block(|| sy.ctl(&["sessions"]));
    assert_eq!(table.code, Some(0), "{table:?}");
    for (port, _) in &held {
        assert!(table.stdout.contains(&format!(":{port}")), "{table:?}");
    }

    let (ended, mut session) = held.remove(0);
    session.quit().await.expect("QUIT");
    drop(session);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = listed(&["--json", "sessions"]);
        if now.len() == 2 {
            assert!(
                now.iter()
                    .all(|s| !s.client.ends_with(&format!(":{ended}")))
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the ended session stays: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let out = block(|| sy.ctl(&["sessions", "nope"]));
    assert_failed_naming(&out, &["nope", "mx"]);
    let out = block(|| sy.ctl(&["flows"]));
    assert_failed_naming(&out, &["no xdp service"]);
    let out = block(|| sy.ctl(&["flows", "mx"]));
    assert_failed_naming(&out, &["ctl sessions"]);
    for (_, mut session) in held {
        session.quit().await.expect("QUIT");
    }
}
