//! The kernel fast path's tests in network namespaces: the network itself comes from
//! `testkit::topology` (re-exported here); this file adds real SMTP servers in its backend
//! namespaces, SMTP clients in its client namespace, and the `switchyard` binary in its
//! balancer namespace.
//!
//! Work inside a namespace runs on a thread that entered it with `setns` (threads it spawns
//! inherit it); processes enter it before `exec`.
#![allow(dead_code)]

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use testkit::netns::*;
pub use testkit::raw_syn::send_syns;
pub use testkit::topology::*;

/// Starts an SMTP server on port 25 in every backend namespace of `topo`, named mta1, mta2, …
pub fn start_servers(topo: &Topology) -> Vec<SmtpServer> {
    topo.backends
        .iter()
        .enumerate()
        .map(|(i, ns)| {
            SmtpServer::start(
                ns,
                &format!("mta{}", i + 1),
                SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, SMTP_PORT),
            )
        })
        .collect()
}

/// A real SMTP server (greeting, EHLO, MAIL, RCPT, DATA, QUIT) in a namespace: one thread per
/// connection, so sessions can be held open. Records every client address it saw.
pub struct SmtpServer {
    pub name: String,
    state: Arc<ServerState>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Default)]
struct ServerState {
    stop: AtomicBool,
    /// Accepting stopped (a "stopped backend"): new connects are refused.
    paused: AtomicBool,
    peers: Mutex<Vec<SocketAddr>>,
    sessions_completed: AtomicUsize,
    open: AtomicUsize,
}

impl SmtpServer {
    fn start(ns: &Netns, name: &str, address: SocketAddrV4) -> SmtpServer {
        let state = Arc::new(ServerState::default());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = {
            let state = state.clone();
            let name = name.to_string();
            ns.spawn(move || serve(address, name, state, ready_tx))
        };
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("SMTP server listening");
        SmtpServer {
            name: name.to_string(),
            state,
            thread: Some(thread),
        }
    }

    /// Client addresses of every connection, health checks included.
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.state.peers.lock().expect("peers lock").clone()
    }

    /// Connections from `client` (excludes the balancer's health checks).
    pub fn sessions_from(&self, client: Ipv4Addr) -> usize {
        self.peers().iter().filter(|p| p.ip() == client).count()
    }

    pub fn sessions_completed(&self) -> usize {
        self.state.sessions_completed.load(Ordering::SeqCst)
    }

    /// Connections open right now.
    pub fn open(&self) -> usize {
        self.state.open.load(Ordering::SeqCst)
    }

    /// Stops accepting (the listener closes: connects are refused) but keeps open sessions.
    pub fn pause(&self) {
        self.state.paused.store(true, Ordering::SeqCst);
    }
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn serve(
    address: SocketAddrV4,
    name: String,
    state: Arc<ServerState>,
    ready: std::sync::mpsc::Sender<()>,
) {
    let mut listener = Some(TcpListener::bind(address).expect("bind SMTP server"));
    listener.as_ref().map(|l| l.set_nonblocking(true));
    let _ = ready.send(());
    let mut workers = Vec::new();
    while !state.stop.load(Ordering::SeqCst) {
        if state.paused.load(Ordering::SeqCst) {
            listener = None;
        }
        let Some(l) = &listener else {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        };
        match l.accept() {
            Ok((stream, peer)) => {
                state.peers.lock().expect("peers lock").push(peer);
                let state = state.clone();
                let name = name.clone();
                workers.push(std::thread::spawn(move || {
                    state.open.fetch_add(1, Ordering::SeqCst);
                    let completed = smtp_dialogue(stream, &name, &state.stop).unwrap_or(false);
                    if completed {
                        state.sessions_completed.fetch_add(1, Ordering::SeqCst);
                    }
                    state.open.fetch_sub(1, Ordering::SeqCst);
                }));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
    for worker in workers {
        let _ = worker.join();
    }
}

/// Serves one session; `true` when it ended with QUIT after a message.
fn smtp_dialogue(stream: TcpStream, name: &str, stop: &AtomicBool) -> std::io::Result<bool> {
    stream.set_read_timeout(Some(Duration::from_millis(200)))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    writer.write_all(format!("220 {name} ESMTP test\r\n").as_bytes())?;
    let mut in_data = false;
    let mut messages = 0;
    let mut line = String::new();
    let idle_limit = Instant::now() + Duration::from_secs(120);
    loop {
        if stop.load(Ordering::SeqCst) || Instant::now() > idle_limit {
            return Ok(false);
        }
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) => return Ok(false),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                // read_line may have consumed a partial line into `line`; sessions here send
                // whole lines, so just wait again.
                continue;
            }
            Err(e) => return Err(e),
        }
        let command = line.trim_end().to_ascii_uppercase();
        if in_data {
            if command == "." {
                in_data = false;
                messages += 1;
                writer.write_all(b"250 2.0.0 queued\r\n")?;
            }
            continue;
        }
        let reply: &[u8] = if command.starts_with("EHLO") || command.starts_with("HELO") {
            b"250 ok\r\n"
        } else if command.starts_with("MAIL")
            || command.starts_with("RCPT")
            || command.starts_with("RSET")
            || command.starts_with("NOOP")
        {
            b"250 2.1.0 ok\r\n"
        } else if command.starts_with("DATA") {
            in_data = true;
            b"354 go ahead\r\n"
        } else if command.starts_with("QUIT") {
            writer.write_all(b"221 2.0.0 bye\r\n")?;
            let _ = writer.shutdown(Shutdown::Write);
            return Ok(messages > 0);
        } else {
            b"500 5.5.2 what\r\n"
        };
        writer.write_all(reply)?;
    }
}

/// One SMTP transaction to `target` from the calling thread (call it inside the client
/// namespace); holds the session `hold` before QUIT. Returns the backend's name.
pub fn smtp_session(target: SocketAddrV4, hold: Duration) -> Result<String, String> {
    let stream = TcpStream::connect_timeout(&SocketAddr::V4(target), Duration::from_secs(5))
        .map_err(|e| format!("connect {target}: {e}"))?;
    smtp_session_on(stream, hold)
}

/// The same transaction on an already connected stream.
pub fn smtp_session_on(stream: TcpStream, hold: Duration) -> Result<String, String> {
    let mut session = Dialogue::greet(stream)?;
    session.transaction()?;
    std::thread::sleep(hold);
    session.step("QUIT\r\n", 221)?;
    Ok(session.backend)
}

/// A client's side of an SMTP session, step by step.
struct Dialogue {
    writer: TcpStream,
    reader: BufReader<TcpStream>,
    /// The name in the greeting: which backend answered.
    backend: String,
}

impl Dialogue {
    fn greet(stream: TcpStream) -> Result<Dialogue, String> {
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| e.to_string())?;
        let writer = stream.try_clone().map_err(|e| e.to_string())?;
        let mut reader = BufReader::new(stream);
        let greeting = expect(&mut reader, 220)?;
        let backend = greeting
            .split_whitespace()
            .nth(1)
            .unwrap_or_default()
            .to_string();
        Ok(Dialogue {
            writer,
            reader,
            backend,
        })
    }

    fn step(&mut self, send: &str, code: u16) -> Result<String, String> {
        self.writer
            .write_all(send.as_bytes())
            .map_err(|e| format!("send {send:?}: {e}"))?;
        expect(&mut self.reader, code)
    }

    /// EHLO and one message.
    fn transaction(&mut self) -> Result<(), String> {
        self.step("EHLO client.test\r\n", 250)?;
        self.step("MAIL FROM:<a@client.test>\r\n", 250)?;
        self.step("RCPT TO:<b@backend.test>\r\n", 250)?;
        self.step("DATA\r\n", 354)?;
        self.step("Subject: xdp\r\n\r\nthrough the fast path\r\n.\r\n", 250)?;
        Ok(())
    }
}

/// An SMTP session held open from a namespace, with a NOOP every 300 ms so that its flow never
/// idles, until [`HeldSession::finish`] sends a message and QUIT.
pub struct HeldSession {
    /// The backend that greeted.
    pub backend: String,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Result<(), String>>>,
}

impl HeldSession {
    /// Connects from `ns` to `target` and waits for the greeting.
    pub fn open(ns: &Netns, target: SocketAddrV4) -> Result<HeldSession, String> {
        let stop = Arc::new(AtomicBool::new(false));
        let (greeted_tx, greeted_rx) = std::sync::mpsc::channel();
        let thread = {
            let stop = stop.clone();
            ns.spawn(move || {
                let stream =
                    TcpStream::connect_timeout(&SocketAddr::V4(target), Duration::from_secs(5))
                        .map_err(|e| format!("connect {target}: {e}"));
                let mut session = match stream.and_then(Dialogue::greet) {
                    Ok(session) => session,
                    Err(e) => {
                        let _ = greeted_tx.send(Err(e.clone()));
                        return Err(e);
                    }
                };
                let _ = greeted_tx.send(Ok(session.backend.clone()));
                // Bounded: a forgotten session ends by itself after two minutes.
                let deadline = Instant::now() + Duration::from_secs(120);
                while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(300));
                    session.step("NOOP\r\n", 250)?;
                }
                session.transaction()?;
                session.step("QUIT\r\n", 221)?;
                Ok(())
            })
        };
        let backend = greeted_rx
            .recv_timeout(Duration::from_secs(10))
            .map_err(|e| format!("no greeting from {target}: {e}"))??;
        Ok(HeldSession {
            backend,
            stop,
            thread: Some(thread),
        })
    }

    /// Sends a message and QUIT; the session's result.
    pub fn finish(mut self) -> Result<(), String> {
        self.stop.store(true, Ordering::SeqCst);
        match self.thread.take() {
            Some(thread) => thread
                .join()
                .unwrap_or_else(|_| Err("the session thread panicked".into())),
            None => Ok(()),
        }
    }
}

impl Drop for HeldSession {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn expect(reader: &mut BufReader<TcpStream>, code: u16) -> Result<String, String> {
    let mut line = String::new();
    loop {
        line.clear();
        let n = reader
            .read_line(&mut line)
            .map_err(|e| format!("waiting for {code}: {e}"))?;
        if n == 0 {
            return Err(format!("connection closed waiting for {code}"));
        }
        if line.len() >= 4 && &line[3..4] == "-" {
            continue;
        }
        if !line.starts_with(&code.to_string()) {
            return Err(format!("expected {code}, got {:?}", line.trim_end()));
        }
        return Ok(line.trim_end().to_string());
    }
}

/// The real `switchyard run` inside the balancer namespace.
pub struct Switchyard {
    child: Child,
    dir: tempfile::TempDir,
    log: PathBuf,
    status: Option<ExitStatus>,
}

impl Switchyard {
    /// Starts it and waits (10 s at most) for `ready` in its log.
    pub fn start(ns: &Netns, config: &str, env: &[(&str, &str)], ready: &str) -> Switchyard {
        Self::launch(
            ns.command(env!("CARGO_BIN_EXE_switchyard")),
            config,
            env,
            ready,
        )
    }

    /// Starts it with `bpffs` as its /sys/fs/bpf (for `pin = true`), as [`Switchyard::start`].
    pub fn start_with_bpffs(
        ns: &Netns,
        config: &str,
        bpffs: &PrivateBpffs,
        ready: &str,
    ) -> Switchyard {
        let command = ns.command_with_bpffs(env!("CARGO_BIN_EXE_switchyard"), bpffs.path());
        Self::launch(command, config, &[], ready)
    }

    fn launch(mut command: Command, config: &str, env: &[(&str, &str)], ready: &str) -> Switchyard {
        let dir = tempfile::tempdir().expect("temporary directory");
        let config_path = dir.path().join("switchyard.toml");
        std::fs::write(&config_path, config).expect("write config");
        let log = dir.path().join("stderr.log");
        let stderr = File::create(&log).expect("log file");
        command
            .arg("run")
            .arg("--config")
            .arg(&config_path)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        for (key, value) in env {
            command.env(key, value);
        }
        let child = command.spawn().expect("spawn switchyard");
        let mut sy = Switchyard {
            child,
            dir,
            log,
            status: None,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = sy.log_text();
            if text.contains(ready) {
                break;
            }
            if let Ok(Some(status)) = sy.child.try_wait() {
                sy.status = Some(status);
                panic!("switchyard exited during startup ({status}):\n{text}");
            }
            if Instant::now() > deadline {
                panic!("switchyard did not log {ready:?} within 10 s:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        sy
    }

    pub fn log_text(&self) -> String {
        let mut text = String::new();
        if let Ok(mut f) = File::open(&self.log) {
            let _ = f.read_to_string(&mut text);
        }
        text
    }

    /// SIGTERM and wait (20 s at most).
    pub fn terminate(&mut self) -> ExitStatus {
        if let Some(status) = self.status {
            return status;
        }
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                self.status = Some(status);
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "switchyard did not exit within 20 s of SIGTERM:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
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
