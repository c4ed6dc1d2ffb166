//! The real `switchyard run` process under a test's config: started (optionally with another
//! RUST_LOG, a lower open-files limit, inside a network namespace with a private bpffs, extra
//! environment), waited on until ready, signalled and stopped, with its stderr for failure
//! messages and its shutdown totals read from the file `run --totals FILE` writes; and
//! `switchyard ctl` against its admin socket (one per test, in its temporary directory).
//!
//! Tests pass `env!("CARGO_BIN_EXE_switchyard")` as the binary.

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use switchyard::totals::Totals;

use crate::config_toml::admin_table;
use crate::netns::{Netns, PrivateBpffs};

/// How long startup may take before the harness gives up.
const READY_LIMIT: Duration = Duration::from_secs(10);
/// How long a SIGTERM'd process may take to exit.
const TERMINATE_LIMIT: Duration = Duration::from_secs(60);

/// When a started process counts as ready.
#[derive(Clone, Debug)]
enum Ready {
    /// It logged "listening on ADDR" for every userspace `listen` address of its config.
    Listening,
    /// It logged this text.
    Logged(String),
}

/// How to start the binary; [`Launch::start`] starts it.
#[derive(Clone, Debug)]
pub struct Launch {
    binary: PathBuf,
    rust_log: String,
    open_files: Option<u32>,
    env: Vec<(String, String)>,
    ready: Ready,
}

impl Launch {
    pub fn new(binary: impl Into<PathBuf>) -> Launch {
        Launch {
            binary: binary.into(),
            rust_log: "info".into(),
            open_files: None,
            env: Vec::new(),
            ready: Ready::Listening,
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

    /// Ready once `text` is logged, instead of once every `listen` address is bound (the
    /// kernel path does not listen on its VIP).
    pub fn ready_when_logged(mut self, text: &str) -> Launch {
        self.ready = Ready::Logged(text.to_string());
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
            status: None,
        };
        sy.wait_ready(&self.ready);
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
    status: Option<ExitStatus>,
}

impl Switchyard {
    /// `Launch::new(binary).start(config_toml)`: ready once every `listen` address is bound
    /// (from its log, not a probe connection, so no backend counts a phantom session).
    pub fn start(binary: impl Into<PathBuf>, config_toml: &str) -> Switchyard {
        Launch::new(binary).start(config_toml)
    }

    fn wait_ready(&mut self, ready: &Ready) {
        let deadline = Instant::now() + READY_LIMIT;
        loop {
            let text = self.stderr_text();
            let done = match ready {
                Ready::Listening => self
                    .listen
                    .iter()
                    .all(|a| text.contains(&format!("listening on {a}"))),
                Ready::Logged(needle) => text.contains(needle.as_str()),
            };
            if done {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                self.status = Some(status);
                panic!("switchyard exited during startup ({status}); stderr:\n{text}");
            }
            if Instant::now() > deadline {
                panic!("switchyard not ready ({ready:?}) within {READY_LIMIT:?}; stderr:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(20));
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
