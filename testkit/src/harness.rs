//! The real `switchyard run` process under a test's config: started (optionally with another
//! RUST_LOG, a lower open-files limit, inside a network namespace with a private bpffs, extra
//! environment), waited on until ready, signalled and stopped, with its stderr for failure
//! messages and its shutdown totals read from the file `run --totals FILE` writes; and
//! `switchyard ctl` against its admin socket (one per test, in its temporary directory).
//!
//! Readiness is what systemd would see: the harness plays the service manager, with a Unix
//! datagram socket of its own as the process's `NOTIFY_SOCKET` (a path, so it reaches a process
//! in another network namespace too), and the process is ready once it sent `READY=1`. Every
//! notification is kept, in order and with its arrival time, for the tests to read.
//!
//! Tests pass `env!("CARGO_BIN_EXE_switchyard")` as the binary.

use std::fs::File;
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use switchyard::totals::Totals;

use crate::config_toml::admin_table;
use crate::netns::{Netns, PrivateBpffs};

/// How long startup may take before the harness gives up.
const READY_LIMIT: Duration = Duration::from_secs(10);
/// How long a SIGTERM'd process may take to exit.
const TERMINATE_LIMIT: Duration = Duration::from_secs(60);
/// How long the harness waits before it looks again whether the process is ready or gone.
const POLL_PAUSE: Duration = Duration::from_millis(20);
/// How long after the process's exit its last notifications may take to be read.
const EXITED_GRACE: Duration = Duration::from_millis(500);

/// When a started process counts as ready.
#[derive(Clone, Debug)]
enum Ready {
    /// It sent `READY=1` to the harness's `NOTIFY_SOCKET`.
    Notified,
    /// Started without a `NOTIFY_SOCKET` of the harness's: it logged "listening on ADDR" for
    /// every userspace `listen` address of its config.
    Listening,
}

/// How to start the binary; [`Launch::start`] starts it.
#[derive(Clone, Debug)]
pub struct Launch {
    binary: PathBuf,
    rust_log: String,
    open_files: Option<u32>,
    env: Vec<(String, String)>,
    ready: Ready,
    /// Also wait until this text is logged.
    logged: Option<String>,
}

impl Launch {
    pub fn new(binary: impl Into<PathBuf>) -> Launch {
        Launch {
            binary: binary.into(),
            rust_log: "info".into(),
            open_files: None,
            env: Vec::new(),
            ready: Ready::Notified,
            logged: None,
        }
    }

    /// Another `RUST_LOG` filter (default "info").
    pub fn rust_log(mut self, filter: &str) -> Launch {
        self.rust_log = filter.to_string();
        self
    }

    /// Lowers the open-files limit (`ulimit -n`).
    pub fn open_files(mut self, limit: u32) -> Launch {
        self.open_files = Some(limit);
        self
    }

    /// An extra environment variable.
    pub fn env(mut self, key: &str, value: &str) -> Launch {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// Ready once `text` is logged as well (a particular start-up path, such as pinned maps
    /// reused).
    pub fn ready_when_logged(mut self, text: &str) -> Launch {
        self.logged = Some(text.to_string());
        self
    }

    /// No `NOTIFY_SOCKET` of the harness's (and none inherited): the process runs as it would
    /// outside systemd, and is ready once it logged "listening on" for every `listen` address.
    /// An explicit [`Launch::env`] `NOTIFY_SOCKET` still applies.
    pub fn without_notify_socket(mut self) -> Launch {
        self.ready = Ready::Listening;
        self
    }

    /// Starts it here and waits until ready; panics with its stderr otherwise.
    pub fn start(self, config_toml: &str) -> Switchyard {
        let command = self.command(|program| Command::new(program));
        self.spawn(command, config_toml)
    }

    /// Starts it inside `ns` and waits until ready.
    pub fn start_in(self, ns: &Netns, config_toml: &str) -> Switchyard {
        let command = self.command(|program| ns.command(program));
        self.spawn(command, config_toml)
    }

    /// Starts it inside `ns` with `bpffs` as its /sys/fs/bpf (for `pin = true`).
    pub fn start_in_with_bpffs(
        self,
        ns: &Netns,
        bpffs: &PrivateBpffs,
        config_toml: &str,
    ) -> Switchyard {
        let command = self.command(|program| ns.command_with_bpffs(program, bpffs.path()));
        self.spawn(command, config_toml)
    }

    /// The binary, or a shell that lowers the open-files limit and `exec`s it (keeping the
    /// PID, so signals still reach switchyard itself).
    fn command(&self, new: impl FnOnce(&std::ffi::OsStr) -> Command) -> Command {
        match self.open_files {
            None => new(self.binary.as_os_str()),
            Some(limit) => {
                let mut sh = new("sh".as_ref());
                sh.arg("-c")
                    .arg(format!("ulimit -n {limit} && exec \"$0\" \"$@\""))
                    .arg(&self.binary);
                sh
            }
        }
    }

    fn spawn(self, mut command: Command, config_toml: &str) -> Switchyard {
        let dir = tempfile::tempdir().expect("temporary directory");
        let config_path = dir.path().join("switchyard.toml");
        let (config_toml, admin_socket) = with_admin_socket(config_toml, dir.path());
        std::fs::write(&config_path, &config_toml).expect("write config");
        let stderr_path = dir.path().join("stderr.log");
        let totals_path = dir.path().join("totals.json");
        let stderr = File::create(&stderr_path).expect("create stderr log");
        let notifications = match self.ready {
            Ready::Notified => {
                let socket_path = dir.path().join("notify.sock");
                command.env("NOTIFY_SOCKET", &socket_path);
                Some(Notifications::listen(&socket_path))
            }
            Ready::Listening => {
                command.env_remove("NOTIFY_SOCKET");
                None
            }
        };
        command
            .arg("run")
            .arg("--config")
            .arg(&config_path)
            .arg("--totals")
            .arg(&totals_path)
            .env("RUST_LOG", &self.rust_log)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        let child = command.spawn().expect("spawn switchyard");
        let mut sy = Switchyard {
            child,
            binary: self.binary.clone(),
            dir,
            stderr_path,
            totals_path,
            admin_socket,
            listen: listen_addresses(&config_toml),
            notifications,
            status: None,
        };
        sy.wait_ready(&self.ready, self.logged.as_deref());
        sy
    }
}

/// A running (or exited) `switchyard run`; dropping it kills a process still running.
pub struct Switchyard {
    child: Child,
    binary: PathBuf,
    dir: tempfile::TempDir,
    stderr_path: PathBuf,
    totals_path: PathBuf,
    admin_socket: PathBuf,
    listen: Vec<SocketAddr>,
    notifications: Option<Arc<Notifications>>,
    status: Option<ExitStatus>,
}

impl Switchyard {
    /// `Launch::new(binary).start(config_toml)`: ready once it sent `READY=1` (not from a
    /// probe connection, so no backend counts a phantom session).
    pub fn start(binary: impl Into<PathBuf>, config_toml: &str) -> Switchyard {
        Launch::new(binary).start(config_toml)
    }

    fn wait_ready(&mut self, ready: &Ready, logged: Option<&str>) {
        let deadline = Instant::now() + READY_LIMIT;
        loop {
            let text = self.stderr_text();
            let received = self.notifications();
            let is_ready = match ready {
                Ready::Notified => received.iter().any(|n| n.has("READY=1")),
                Ready::Listening => self
                    .listen
                    .iter()
                    .all(|a| text.contains(&format!("listening on {a}"))),
            };
            if is_ready && logged.is_none_or(|needle| text.contains(needle)) {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                self.status = Some(status);
                panic!("switchyard exited during startup ({status}); stderr:\n{text}");
            }
            if Instant::now() > deadline {
                panic!(
                    "switchyard not ready ({ready:?}, logged {logged:?}) within {READY_LIMIT:?}; \
                     notifications: {received:?}; stderr:\n{text}"
                );
            }
            self.await_more(received.len(), POLL_PAUSE);
        }
    }

    /// Every notification received so far, oldest first (none when started
    /// [`Launch::without_notify_socket`]).
    pub fn notifications(&self) -> Vec<Notification> {
        self.notifications
            .as_ref()
            .map(|n| n.received())
            .unwrap_or_default()
    }

    /// Waits (at most `limit`, and not much past the process's exit) until `count`
    /// notifications have arrived and returns them all; panics, with what did arrive and the
    /// stderr, otherwise.
    pub fn wait_notifications(&mut self, count: usize, limit: Duration) -> Vec<Notification> {
        let mut deadline = Instant::now() + limit;
        let mut exited = None;
        loop {
            let received = self.notifications();
            if received.len() >= count {
                return received;
            }
            let now = Instant::now();
            if now >= deadline {
                let end = exited.map_or(format!("none within {limit:?}"), |s| format!("{s}"));
                panic!(
                    "{count} notifications expected, got {received:?} (exit: {end}); \
                     stderr:\n{}",
                    self.stderr_text()
                );
            }
            if exited.is_none() {
                exited = self.wait_timeout(Duration::ZERO);
                if exited.is_some() {
                    // Datagrams sent just before the exit may still be on their way to the list.
                    deadline = deadline.min(now + EXITED_GRACE);
                }
            }
            // Woken by a notification at once; otherwise back soon to look for an exit.
            let pause = deadline.saturating_duration_since(now).min(POLL_PAUSE);
            self.await_more(received.len(), pause);
        }
    }

    /// Sleeps at most `limit`, waking as soon as there are more than `seen` notifications.
    fn await_more(&self, seen: usize, limit: Duration) {
        match &self.notifications {
            Some(notifications) => notifications.await_more(seen, limit),
            None => std::thread::sleep(limit),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The temporary directory holding the config, the stderr log and the totals file.
    pub fn config_dir(&self) -> &Path {
        self.dir.path()
    }

    /// The admin socket it serves: the config's `[admin] socket`, or one in
    /// [`Switchyard::config_dir`] that the harness added (never the shared default, so tests
    /// running in parallel do not collide).
    pub fn admin_socket(&self) -> &Path {
        &self.admin_socket
    }

    /// `switchyard ctl --socket <its admin socket> ARGS...`, run to the end.
    pub fn ctl(&self, args: &[&str]) -> CtlOutput {
        let mut command = Command::new(&self.binary);
        command.arg("ctl").arg("--socket").arg(&self.admin_socket);
        run_ctl(command.args(args))
    }

    /// Everything the process logged so far.
    pub fn stderr_text(&self) -> String {
        std::fs::read(&self.stderr_path)
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default()
    }

    /// Panics, with everything logged, unless `text` has been logged.
    pub fn assert_logged(&self, text: &str) {
        let log = self.stderr_text();
        assert!(log.contains(text), "{text:?} not logged; stderr:\n{log}");
    }

    /// Sends a signal without waiting.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        if self.status.is_some() {
            return; // reaped: the PID may belong to someone else by now
        }
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, signal);
    }

    /// Waits at most `limit` for the process to exit.
    pub fn wait_timeout(&mut self, limit: Duration) -> Option<ExitStatus> {
        if let Some(status) = self.status {
            return Some(status);
        }
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                self.status = Some(status);
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM, then waits (at most 60 s) for the exit. Blocks the calling thread: in a
    /// current-thread tokio test with sessions of its own still running, call it through
    /// `spawn_blocking` (or use a multi-thread test runtime).
    pub fn terminate(&mut self) -> ExitStatus {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        match self.wait_timeout(TERMINATE_LIMIT) {
            Some(status) => status,
            None => panic!(
                "switchyard did not exit within {TERMINATE_LIMIT:?} of SIGTERM; stderr:\n{}",
                self.stderr_text()
            ),
        }
    }

    /// The shutdown totals `run --totals` wrote; panics (with stderr) if there are none yet.
    pub fn totals(&self) -> Totals {
        let text = std::fs::read_to_string(&self.totals_path).unwrap_or_else(|e| {
            panic!(
                "no totals file {} ({e}); stderr:\n{}",
                self.totals_path.display(),
                self.stderr_text()
            )
        });
        Totals::from_json(&text).unwrap_or_else(|e| {
            panic!(
                "totals file {} is not a Totals object ({e}): {text}",
                self.totals_path.display()
            )
        })
    }
}

impl Drop for Switchyard {
    fn drop(&mut self) {
        if self.status.is_none() && matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One datagram the process sent to its `NOTIFY_SOCKET`: `KEY=value` lines (`READY=1`, or
/// `RELOADING=1` and `MONOTONIC_USEC=…` together).
#[derive(Clone, Debug)]
pub struct Notification {
    /// When the harness received it.
    pub at: Instant,
    /// The datagram as sent.
    pub text: String,
}

impl Notification {
    /// Whether one of its lines is exactly `line` (e.g. "READY=1").
    pub fn has(&self, line: &str) -> bool {
        self.text.lines().any(|l| l == line)
    }

    /// The value of its `key=` line, if it has one.
    pub fn value(&self, key: &str) -> Option<&str> {
        self.text
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
    }
}

/// The harness's end of `NOTIFY_SOCKET`: a reader thread that keeps every datagram until the
/// [`Switchyard`] holding it is dropped.
struct Notifications {
    received: Mutex<Vec<Notification>>,
    arrived: Condvar,
}

impl Notifications {
    /// How often the reader looks whether anyone still holds the list.
    const POLL: Duration = Duration::from_millis(200);

    fn listen(path: &Path) -> Arc<Notifications> {
        let socket = UnixDatagram::bind(path)
            .unwrap_or_else(|e| panic!("binding the notify socket {}: {e}", path.display()));
        socket
            .set_read_timeout(Some(Self::POLL))
            .expect("a read timeout on the notify socket");
        let notifications = Arc::new(Notifications {
            received: Mutex::new(Vec::new()),
            arrived: Condvar::new(),
        });
        let weak = Arc::downgrade(&notifications);
        std::thread::Builder::new()
            .name("notify-socket".into())
            .spawn(move || Self::read(&socket, &weak))
            .expect("starting the notify socket's reader");
        notifications
    }

    fn read(socket: &UnixDatagram, notifications: &Weak<Notifications>) {
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            let received = socket.recv(&mut buffer);
            let Some(notifications) = notifications.upgrade() else {
                return;
            };
            match received {
                Ok(len) => notifications.push(Notification {
                    at: Instant::now(),
                    text: String::from_utf8_lossy(&buffer[..len]).into_owned(),
                }),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => panic!("reading the notify socket: {e}"),
            }
        }
    }

    fn push(&self, notification: Notification) {
        self.lock().push(notification);
        self.arrived.notify_all();
    }

    fn received(&self) -> Vec<Notification> {
        self.lock().clone()
    }

    fn await_more(&self, seen: usize, limit: Duration) {
        let guard = self.lock();
        let _ = self
            .arrived
            .wait_timeout_while(guard, limit, |received| received.len() <= seen);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Notification>> {
        // A panicking reader leaves the list as it was: still worth reading.
        self.received.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// `config_toml` with an `[admin] socket` in `dir` added when it sets none, and the socket
/// it names (a relative one resolved against `dir`, where the config file is written).
fn with_admin_socket(config_toml: &str, dir: &Path) -> (String, PathBuf) {
    let written = config_toml
        .parse::<toml::Table>()
        .ok()
        .and_then(|doc| doc.get("admin")?.get("socket")?.as_str().map(PathBuf::from));
    match written {
        Some(socket) => (config_toml.to_string(), dir.join(socket)),
        None => {
            let socket = dir.join("admin.sock");
            // A table header at the end belongs to no other table, whatever came before.
            let text = format!("{config_toml}{}", admin_table(&socket));
            (text, socket)
        }
    }
}

/// What `switchyard ctl` did: its exit code (`None` when killed by a signal) and its output.
#[derive(Debug)]
pub struct CtlOutput {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Runs a `switchyard ctl` command (built by the caller: another user, another socket) to
/// its end.
pub fn run_ctl(command: &mut Command) -> CtlOutput {
    let output = command
        .stdin(Stdio::null())
        .output()
        .expect("spawn switchyard ctl");
    CtlOutput {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// Every `listen` address of every userspace `[[service]]` in a config (a string or a list).
fn listen_addresses(config_toml: &str) -> Vec<SocketAddr> {
    let Ok(doc) = config_toml.parse::<toml::Table>() else {
        return Vec::new(); // an invalid config: the process will say why and exit
    };
    let services = doc
        .get("service")
        .and_then(|s| s.as_array())
        .cloned()
        .unwrap_or_default();
    let mut out = Vec::new();
    for service in services {
        // The kernel path does not listen on its VIP; wait for it with `ready_when_logged`.
        if service.get("dataplane").and_then(|d| d.as_str()) == Some("xdp") {
            continue;
        }
        let values = match service.get("listen") {
            Some(toml::Value::String(s)) => vec![s.clone()],
            Some(toml::Value::Array(list)) => list
                .iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect(),
            _ => Vec::new(),
        };
        out.extend(values.iter().filter_map(|s| s.parse::<SocketAddr>().ok()));
    }
    out
}

/// A loopback address with a port that was free a moment ago (for a `listen` address).
pub fn free_addr() -> SocketAddr {
    free_addr_on("127.0.0.1:0")
}

/// [`free_addr`] on `[::1]`.
pub fn free_addr_v6() -> SocketAddr {
    free_addr_on("[::1]:0")
}

fn free_addr_on(any_port: &str) -> SocketAddr {
    let listener = std::net::TcpListener::bind(any_port).expect("bind an ephemeral port");
    listener.local_addr().expect("local address")
}
