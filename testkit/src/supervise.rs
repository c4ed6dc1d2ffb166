//! Child processes that xtask and the benchmark topologies start (sinks, balancers): started
//! with their output in a log file, stopped by PID with SIGTERM then SIGKILL, and stopped on
//! Ctrl-C or SIGTERM too; and the checks around them (a port is free, a server greets).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::smtp_client::read_greeting;

/// PIDs of every child still running, for the signal handler.
static LIVE: Mutex<Vec<u32>> = Mutex::new(Vec::new());

/// A running child process; dropping it stops it.
pub struct Supervised {
    pub name: String,
    pub log: PathBuf,
    child: Child,
}

impl Supervised {
    /// Starts `cmd` with stdin closed and stdout and stderr appended to `log`.
    pub fn start(name: &str, cmd: &mut Command, log: &Path) -> Result<Self> {
        if let Some(dir) = log.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name}: `{}`", display(cmd)))?;
        if let Ok(mut live) = LIVE.lock() {
            live.push(child.id());
        }
        Ok(Self {
            name: name.to_string(),
            log: log.to_path_buf(),
            child,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails if the process has already exited (with the tail of its log).
    pub fn check_running(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited ({status}); its log {}:\n{}",
                self.name,
                self.log.display(),
                tail(&self.log, 20)
            );
        }
        Ok(())
    }

    /// SIGTERM, up to `grace` to exit, then SIGKILL. Returns whether it exited on SIGTERM.
    pub fn stop(&mut self, grace: Duration) -> bool {
        let pid = Pid::from_raw(self.child.id() as i32);
        let mut graceful = false;
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = kill(pid, Signal::SIGTERM);
            let deadline = Instant::now() + grace;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    graceful = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            if !graceful {
                let _ = self.child.kill();
            }
        }
        let _ = self.child.wait();
        if let Ok(mut live) = LIVE.lock() {
            live.retain(|p| *p != self.child.id());
        }
        graceful
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(5));
    }
}

/// A command as one would type it, for messages.
pub fn display(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// The last `lines` lines of a log file.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// On SIGINT or SIGTERM: stop every child by PID, then exit 130. Destructors do not run on a
/// signal, so this is what keeps an interrupted demo or benchmark from leaving servers behind.
pub fn stop_children_on_signal() {
    let _ = std::thread::Builder::new()
        .name("signals".into())
        .spawn(|| {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                use tokio::signal::unix::{SignalKind, signal};
                let (Ok(mut int), Ok(mut term)) = (
                    signal(SignalKind::interrupt()),
                    signal(SignalKind::terminate()),
                ) else {
                    return;
                };
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
            });
            eprintln!("\ninterrupted: stopping child processes");
            let pids: Vec<u32> = LIVE.lock().map(|l| l.clone()).unwrap_or_default();
            for pid in &pids {
                let _ = kill(Pid::from_raw(*pid as i32), Signal::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            for pid in &pids {
                while Instant::now() < deadline
                    && kill(Pid::from_raw(*pid as i32), None).is_ok()
                    && !reaped(*pid)
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                let _ = kill(Pid::from_raw(*pid as i32), Signal::SIGKILL);
            }
            std::process::exit(130);
        });
}

/// Reaps `pid` if it has exited (a zombie still answers signal 0).
fn reaped(pid: u32) -> bool {
    use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
    !matches!(
        waitpid(Pid::from_raw(pid as i32), Some(WaitPidFlag::WNOHANG)),
        Ok(WaitStatus::StillAlive)
    )
}

/// Waits until `addr` greets with an SMTP reply code (returns it), or `timeout` passes.
pub fn wait_for_greeting(addr: std::net::SocketAddr, timeout: Duration) -> Result<u16> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("runtime for the greeting probe")?;
    let deadline = Instant::now() + timeout;
    loop {
        let probe =
            async { tokio::time::timeout(Duration::from_secs(2), read_greeting(addr)).await };
        if let Ok(Ok((code, _))) = runtime.block_on(probe) {
            return Ok(code);
        }
        if Instant::now() >= deadline {
            bail!("nothing greeted on {addr} within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Fails if something already listens on `addr` (another engineer's server, a leftover).
pub fn ensure_port_free(addr: std::net::SocketAddr) -> Result<()> {
    match std::net::TcpListener::bind(addr) {
        Ok(_) => Ok(()),
        Err(e) => bail!("{addr} is in use ({e}); stop whatever listens there and retry"),
    }
}
