//! Shared integration-test support: a real SMTP backend (`TestBackend`), real SMTP clients
//! (`smtp_session*`, `read_greeting`), and the real `switchyard` binary under a config
//! (`Switchyard`). Every test file includes it with `mod support;`.
#![allow(dead_code)]

use std::fs::File;
use std::io::Read;
use std::net::{IpAddr, SocketAddr, TcpListener as StdTcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use parking_lot::Mutex;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_util::sync::CancellationToken;

/// How long any single client step may take before the helper gives up (tests never hang).
const STEP_TIMEOUT: Duration = Duration::from_secs(15);
/// Longest line the test backend accepts (SMTP allows 1000 with CRLF; be generous).
const MAX_LINE: usize = 8192;

// ---------------------------------------------------------------------------------------------
// The backend
// ---------------------------------------------------------------------------------------------

/// Which PROXY protocol header a `TestBackend` expects before it greets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyExpect {
    None,
    V1,
    V2,
}

/// How a `TestBackend` behaves.
#[derive(Clone, Debug)]
pub struct Behaviour {
    /// 220 for a normal greeting; anything else (e.g. 421) greets with that code and closes.
    pub greeting_code: u16,
    pub greeting_delay: Duration,
    /// Delay before every reply after the greeting (a slow MTA).
    pub reply_delay: Duration,
    pub proxy: ProxyExpect,
}

impl Default for Behaviour {
    fn default() -> Self {
        Self {
            greeting_code: 220,
            greeting_delay: Duration::ZERO,
            reply_delay: Duration::ZERO,
            proxy: ProxyExpect::None,
        }
    }
}

struct BackendShared {
    name: String,
    behaviour: Behaviour,
    greeting_code: AtomicU16,
    connections: AtomicUsize,
    sessions_completed: AtomicUsize,
    messages: AtomicUsize,
    proxy_headers: Mutex<Vec<Vec<u8>>>,
    /// Listener and connection tasks still alive (so `stop` can wait for them to be gone).
    live_tasks: AtomicUsize,
}

/// A real SMTP server on 127.0.0.1 with its own small tokio runtime, so that it keeps serving
/// while a test blocks its own thread (e.g. in `Switchyard::terminate`).
pub struct TestBackend {
    shared: Arc<BackendShared>,
    addr: SocketAddr,
    runtime: Option<tokio::runtime::Runtime>,
    /// Cancels the current listener and all its connections; `None` while stopped.
    running: Mutex<Option<CancellationToken>>,
}

impl TestBackend {
    pub async fn start(name: &str, behaviour: Behaviour) -> TestBackend {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name(format!("backend-{name}"))
            .enable_all()
            .build()
            .expect("test backend runtime");
        let listener = bind_listener("127.0.0.1:0".parse().expect("literal address"))
            .expect("test backend bind");
        let addr = listener.local_addr().expect("test backend address");
        let backend = TestBackend {
            shared: Arc::new(BackendShared {
                name: name.to_string(),
                greeting_code: AtomicU16::new(behaviour.greeting_code),
                behaviour,
                connections: AtomicUsize::new(0),
                sessions_completed: AtomicUsize::new(0),
                messages: AtomicUsize::new(0),
                proxy_headers: Mutex::new(Vec::new()),
                live_tasks: AtomicUsize::new(0),
            }),
            addr,
            runtime: Some(runtime),
            running: Mutex::new(None),
        };
        backend.serve(listener);
        backend
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// TCP connections accepted (including health checks).
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Sessions that reached QUIT after at least one accepted message.
    pub fn sessions_completed(&self) -> usize {
        self.shared.sessions_completed.load(Ordering::SeqCst)
    }

    pub fn messages(&self) -> usize {
        self.shared.messages.load(Ordering::SeqCst)
    }

    /// Every PROXY header received so far, raw, in arrival order.
    pub fn proxy_headers(&self) -> Vec<Vec<u8>> {
        self.shared.proxy_headers.lock().clone()
    }

    /// Greeting code for connections accepted from now on.
    pub fn set_greeting_code(&self, code: u16) {
        self.shared.greeting_code.store(code, Ordering::SeqCst);
    }

    /// Closes the listener and drops every open connection at once, like a dying MTA. When it
    /// returns, new connects are refused.
    pub fn stop(&self) {
        if let Some(token) = self.running.lock().take() {
            token.cancel();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.shared.live_tasks.load(Ordering::SeqCst) > 0 {
            assert!(
                Instant::now() < deadline,
                "test backend {} did not stop",
                self.shared.name
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Listens again on the same address (after `stop`). When it returns, connects succeed.
    pub fn restart(&self) {
        if self.running.lock().is_some() {
            return;
        }
        let listener = bind_listener(self.addr).expect("test backend rebind");
        self.serve(listener);
    }

    fn serve(&self, listener: StdTcpListener) {
        let token = CancellationToken::new();
        *self.running.lock() = Some(token.clone());
        let shared = self.shared.clone();
        shared.live_tasks.fetch_add(1, Ordering::SeqCst);
        let runtime = self
            .runtime
            .as_ref()
            .expect("runtime lives as long as the backend");
        runtime.spawn(async move {
            if let Ok(listener) = TcpListener::from_std(listener) {
                accept_loop(listener, shared.clone(), token).await;
            }
            shared.live_tasks.fetch_sub(1, Ordering::SeqCst);
        });
    }
}

impl Drop for TestBackend {
    fn drop(&mut self) {
        if let Some(token) = self.running.lock().take() {
            token.cancel();
        }
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

fn bind_listener(addr: SocketAddr) -> std::io::Result<StdTcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

async fn accept_loop(listener: TcpListener, shared: Arc<BackendShared>, token: CancellationToken) {
    loop {
        let stream = tokio::select! {
            _ = token.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                }
            },
        };
        shared.connections.fetch_add(1, Ordering::SeqCst);
        shared.live_tasks.fetch_add(1, Ordering::SeqCst);
        let shared = shared.clone();
        let token = token.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = token.cancelled() => {}
                _ = serve_smtp(stream, &shared) => {}
            }
            shared.live_tasks.fetch_sub(1, Ordering::SeqCst);
        });
    }
}

/// One SMTP conversation; returns (dropping the socket) on QUIT, EOF, or any error.
async fn serve_smtp(stream: TcpStream, shared: &BackendShared) -> anyhow::Result<()> {
    let _ = stream.set_nodelay(true);
    let mut stream = BufReader::new(stream);
    let behaviour = &shared.behaviour;
    match behaviour.proxy {
        ProxyExpect::None => {}
        ProxyExpect::V1 => {
            let header = read_line(&mut stream, 108)
                .await?
                .context("EOF before PROXY v1 header")?;
            shared.proxy_headers.lock().push(header);
        }
        ProxyExpect::V2 => {
            let mut header = vec![0u8; 16];
            stream.read_exact(&mut header).await?;
            let len = u16::from_be_bytes([header[14], header[15]]) as usize;
            header.resize(16 + len, 0);
            stream.read_exact(&mut header[16..]).await?;
            shared.proxy_headers.lock().push(header);
        }
    }
    tokio::time::sleep(behaviour.greeting_delay).await;
    let name = &shared.name;
    let code = shared.greeting_code.load(Ordering::SeqCst);
    if code != 220 {
        let reply = format!("{code} {name} busy\r\n");
        stream.get_mut().write_all(reply.as_bytes()).await?;
        stream.get_mut().shutdown().await?;
        return Ok(());
    }
    stream
        .get_mut()
        .write_all(format!("220 {name} ESMTP test\r\n").as_bytes())
        .await?;
    let mut accepted_here = 0usize;
    while let Some(line) = read_line(&mut stream, MAX_LINE).await? {
        let text = String::from_utf8_lossy(&line).to_ascii_uppercase();
        let verb = text.split_whitespace().next().unwrap_or("").to_string();
        tokio::time::sleep(behaviour.reply_delay).await;
        let reply = match verb.as_str() {
            "EHLO" => format!("250-{name}\r\n250-PIPELINING\r\n250 8BITMIME\r\n"),
            "HELO" => format!("250 {name}\r\n"),
            "MAIL" => "250 2.1.0 Ok\r\n".to_string(),
            "RCPT" => "250 2.1.5 Ok\r\n".to_string(),
            "RSET" | "NOOP" => "250 2.0.0 Ok\r\n".to_string(),
            "DATA" => {
                stream
                    .get_mut()
                    .write_all(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                    .await?;
                loop {
                    let line = read_line(&mut stream, MAX_LINE)
                        .await?
                        .context("EOF in DATA")?;
                    if line == b".\r\n" {
                        break;
                    }
                }
                shared.messages.fetch_add(1, Ordering::SeqCst);
                accepted_here += 1;
                "250 2.0.0 Ok: queued\r\n".to_string()
            }
            "QUIT" => {
                if accepted_here > 0 {
                    shared.sessions_completed.fetch_add(1, Ordering::SeqCst);
                }
                stream.get_mut().write_all(b"221 2.0.0 Bye\r\n").await?;
                stream.get_mut().shutdown().await?;
                return Ok(());
            }
            _ => "500 5.5.2 Error: command not recognized\r\n".to_string(),
        };
        stream.get_mut().write_all(reply.as_bytes()).await?;
    }
    Ok(())
}

/// One line including its LF; `None` at a clean EOF; an error beyond `max` bytes.
async fn read_line<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    max: usize,
) -> anyhow::Result<Option<Vec<u8>>> {
    let mut line = Vec::new();
    let n = (&mut *reader)
        .take(max as u64)
        .read_until(b'\n', &mut line)
        .await?;
    if n == 0 {
        return Ok(None);
    }
    if !line.ends_with(b"\n") {
        bail!(
            "line too long or cut off: {:?}",
            String::from_utf8_lossy(&line)
        );
    }
    Ok(Some(line))
}

// ---------------------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------------------

/// Reads one (possibly multi-line) SMTP reply: its code and its full text, CRLFs included.
pub async fn read_reply<R: AsyncBufRead + Unpin>(reader: &mut R) -> anyhow::Result<(u16, String)> {
    let mut text = String::new();
    loop {
        let line = tokio::time::timeout(STEP_TIMEOUT, read_line(reader, MAX_LINE))
            .await
            .context("timed out waiting for a reply")??
            .with_context(|| format!("connection closed mid-reply (got {text:?})"))?;
        let line = String::from_utf8(line).context("reply is not UTF-8")?;
        if line.len() < 4 {
            bail!("malformed reply line {line:?}");
        }
        let code: u16 = line[..3]
            .parse()
            .with_context(|| format!("malformed reply line {line:?}"))?;
        let last = line.as_bytes()[3] == b' ' || line.as_bytes()[3] == b'\r';
        text.push_str(&line);
        if last {
            return Ok((code, text));
        }
    }
}

async fn expect(
    reader: &mut BufReader<TcpStream>,
    step: &str,
    want: u16,
) -> anyhow::Result<String> {
    let (code, text) = read_reply(reader)
        .await
        .with_context(|| format!("after {step}"))?;
    if code != want {
        bail!("after {step}: expected {want}, got {text:?}");
    }
    Ok(text)
}

async fn send(reader: &mut BufReader<TcpStream>, line: &str) -> anyhow::Result<()> {
    tokio::time::timeout(STEP_TIMEOUT, reader.get_mut().write_all(line.as_bytes()))
        .await
        .context("timed out sending")?
        .with_context(|| format!("sending {line:?}"))
}

async fn connect(addr: SocketAddr, source: Option<IpAddr>) -> anyhow::Result<TcpStream> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(ip) = source {
        socket
            .bind(SocketAddr::new(ip, 0))
            .with_context(|| format!("binding to {ip}"))?;
    }
    let stream = tokio::time::timeout(STEP_TIMEOUT, socket.connect(addr))
        .await
        .with_context(|| format!("timed out connecting to {addr}"))?
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

async fn session(
    addr: SocketAddr,
    source: Option<IpAddr>,
    hold: Duration,
) -> anyhow::Result<String> {
    let mut conn = BufReader::new(connect(addr, source).await?);
    let greeting = expect(&mut conn, "connect", 220).await?;
    let name = greeting
        .split_whitespace()
        .nth(1)
        .with_context(|| format!("greeting without a name: {greeting:?}"))?
        .to_string();
    send(&mut conn, "EHLO client.test\r\n").await?;
    expect(&mut conn, "EHLO", 250).await?;
    send(&mut conn, "MAIL FROM:<sender@example.test>\r\n").await?;
    expect(&mut conn, "MAIL", 250).await?;
    send(&mut conn, "RCPT TO:<rcpt@example.test>\r\n").await?;
    expect(&mut conn, "RCPT", 250).await?;
    send(&mut conn, "DATA\r\n").await?;
    expect(&mut conn, "DATA", 354).await?;
    send(
        &mut conn,
        "Subject: switchyard test\r\n\r\nHello through the proxy.\r\n.\r\n",
    )
    .await?;
    expect(&mut conn, "end of data", 250).await?;
    tokio::time::sleep(hold).await;
    send(&mut conn, "QUIT\r\n").await?;
    expect(&mut conn, "QUIT", 221).await?;
    Ok(name)
}

/// One full SMTP transaction; returns the backend name from the greeting.
pub async fn smtp_session(addr: SocketAddr) -> anyhow::Result<String> {
    session(addr, None, Duration::ZERO).await
}

/// Like `smtp_session`, from a given local source address (any 127.x.y.z works on loopback).
pub async fn smtp_session_from(addr: SocketAddr, source_ip: IpAddr) -> anyhow::Result<String> {
    session(addr, Some(source_ip), Duration::ZERO).await
}

/// Like `smtp_session`, but waits `hold` after the message before QUIT (a long session).
pub async fn smtp_session_hold(addr: SocketAddr, hold: Duration) -> anyhow::Result<String> {
    session(addr, None, hold).await
}

/// Connects and reads the first reply: its code and full text (e.g. to check for a 421).
pub async fn read_greeting(addr: SocketAddr) -> anyhow::Result<(u16, String)> {
    let mut conn = BufReader::new(connect(addr, None).await?);
    read_reply(&mut conn).await
}

/// A loopback address with a port that was free a moment ago (for `listen`).
pub fn free_addr() -> SocketAddr {
    let listener = StdTcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local address")
}

// ---------------------------------------------------------------------------------------------
// The binary
// ---------------------------------------------------------------------------------------------

/// The real `switchyard run` process under a config written to a temporary directory.
pub struct Switchyard {
    child: Child,
    dir: tempfile::TempDir,
    stderr_path: PathBuf,
    listen: Vec<SocketAddr>,
    status: Option<ExitStatus>,
}

impl Switchyard {
    /// Starts the binary and waits (at most 10 s) until it has bound every `listen` address
    /// (it logs "listening on ADDR" right after `listen(2)`); panics with its stderr otherwise.
    /// Readiness comes from the log, not from a probe connection, so that no test's backend
    /// counts see a phantom session.
    pub fn start(config_toml: &str) -> Switchyard {
        Self::start_with_log(config_toml, "info")
    }

    /// Like `start`, with another `RUST_LOG` filter (e.g. "debug").
    pub fn start_with_log(config_toml: &str, rust_log: &str) -> Switchyard {
        Self::spawn(config_toml, rust_log, None)
    }

    /// Like `start`, with the open-files limit lowered to `open_files` (`ulimit -n`).
    pub fn start_with_fd_limit(config_toml: &str, open_files: u32) -> Switchyard {
        Self::spawn(config_toml, "info", Some(open_files))
    }

    fn spawn(config_toml: &str, rust_log: &str, open_files: Option<u32>) -> Switchyard {
        let listen = listen_addresses(config_toml);
        let dir = tempfile::tempdir().expect("temporary directory");
        let config_path = dir.path().join("switchyard.toml");
        std::fs::write(&config_path, config_toml).expect("write config");
        let stderr_path = dir.path().join("stderr.log");
        let stderr = File::create(&stderr_path).expect("create stderr log");
        let mut command = match open_files {
            None => Command::new(env!("CARGO_BIN_EXE_switchyard")),
            Some(limit) => {
                // `exec` keeps the PID, so signals still reach switchyard itself.
                let mut sh = Command::new("sh");
                sh.arg("-c")
                    .arg(format!("ulimit -n {limit} && exec \"$0\" \"$@\""));
                sh.arg(env!("CARGO_BIN_EXE_switchyard"));
                sh
            }
        };
        let child = command
            .arg("run")
            .arg("--config")
            .arg(&config_path)
            .env("RUST_LOG", rust_log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn switchyard");
        let mut sy = Switchyard {
            child,
            dir,
            stderr_path,
            listen,
            status: None,
        };
        sy.wait_ready(Duration::from_secs(10));
        sy
    }

    fn wait_ready(&mut self, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let text = self.stderr_text();
            if self
                .listen
                .iter()
                .all(|a| text.contains(&format!("listening on {a}")))
            {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                self.status = Some(status);
                panic!("switchyard exited during startup ({status}); stderr:\n{text}");
            }
            if Instant::now() > deadline {
                panic!(
                    "switchyard not listening on {:?} within {limit:?}; stderr:\n{text}",
                    self.listen
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The `listen` addresses of the config, in order.
    pub fn listen_addrs(&self) -> &[SocketAddr] {
        &self.listen
    }

    pub fn config_dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Everything the process logged so far.
    pub fn stderr_text(&self) -> String {
        let mut text = String::new();
        if let Ok(mut f) = File::open(&self.stderr_path) {
            let mut bytes = Vec::new();
            let _ = f.read_to_end(&mut bytes);
            text = String::from_utf8_lossy(&bytes).into_owned();
        }
        text
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
        match self.wait_timeout(Duration::from_secs(60)) {
            Some(status) => status,
            None => panic!(
                "switchyard did not exit within 60 s of SIGTERM; stderr:\n{}",
                self.stderr_text()
            ),
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

/// Every `listen` address of every userspace `[[service]]` in a config (a string or a list).
fn listen_addresses(config_toml: &str) -> Vec<SocketAddr> {
    let Ok(doc) = config_toml.parse::<toml::Table>() else {
        return Vec::new(); // an invalid config: the process will say why and exit
    };
    let mut out = Vec::new();
    let services = doc
        .get("service")
        .and_then(|s| s.as_array())
        .cloned()
        .unwrap_or_default();
    for service in services {
        // The kernel path does not listen on its VIP; its tests wait for it their own way.
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
