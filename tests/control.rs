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
