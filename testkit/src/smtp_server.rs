//! One configurable SMTP server for every test and benchmark: a well-behaved MTA by default,
//! or a slow, busy, hanging or rejecting one, with or without a PROXY header in front. It
//! serves on a listener it is given (bound anywhere, also inside a network namespace) or binds
//! 127.0.0.1:0 itself, on a runtime thread of its own so that it keeps serving while a test
//! blocks. It counts what it saw and, unless told not to, keeps one record per connection.
//!
//! Commands that arrive together are answered in one write, as a pipelining MTA does; that is
//! what keeps it fast enough to be the benchmark's and the demo's sink (`cargo xtask sink`).

use std::net::{IpAddr, SocketAddr, TcpListener as StdTcpListener};
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Longest command line (or message line) accepted before the connection is dropped.
const MAX_LINE: usize = 64 * 1024;
/// Longest PROXY v1 header (the protocol's own limit).
const MAX_PROXY_V1: usize = 108;

/// Which PROXY protocol header the server expects before it greets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ProxyExpect {
    #[default]
    None,
    V1,
    V2,
}

/// Where the server answers with a rejection instead of accepting. A rejected greeting is
/// [`Behaviour::greeting_code`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RejectAt {
    Mail,
    Rcpt,
    Data,
}

/// How a server behaves. `Default` is a prompt MTA that accepts everything.
#[derive(Clone, Debug)]
pub struct Behaviour {
    /// 220 for a normal greeting; anything else (e.g. 421, 554) greets with that code and closes.
    pub greeting_code: u16,
    pub greeting_delay: Duration,
    /// Delay before every reply after the greeting (a slow MTA).
    pub reply_delay: Duration,
    /// Delay before every read from a client (a slow reader: its receive buffer fills up).
    pub read_delay: Duration,
    /// Accept and never say anything (a hung MTA); the connection stays open until the client
    /// closes it or the server stops.
    pub hang: bool,
    /// Stage and code (4xx or 5xx) of a rejection; `None` accepts everything.
    pub reject: Option<(RejectAt, u16)>,
    pub proxy: ProxyExpect,
    /// Keep a [`Connection`] record per connection. Off for a long-running sink, whose records
    /// would grow without bound; the counters are always kept.
    pub keep_records: bool,
}

impl Default for Behaviour {
    fn default() -> Self {
        Self {
            greeting_code: 220,
            greeting_delay: Duration::ZERO,
            reply_delay: Duration::ZERO,
            read_delay: Duration::ZERO,
            hang: false,
            reject: None,
            proxy: ProxyExpect::None,
            keep_records: true,
        }
    }
}

/// The usual variations on the prompt MTA, each in one call.
impl Behaviour {
    /// Greets with `code`; anything but 220 (e.g. 421 busy) greets and closes.
    pub fn greeting_with(code: u16) -> Behaviour {
        Behaviour {
            greeting_code: code,
            ..Behaviour::default()
        }
    }

    /// Greets only after `delay`.
    pub fn slow_greeting(delay: Duration) -> Behaviour {
        Behaviour {
            greeting_delay: delay,
            ..Behaviour::default()
        }
    }

    /// Waits `delay` before every reply after the greeting.
    pub fn slow_replies(delay: Duration) -> Behaviour {
        Behaviour {
            reply_delay: delay,
            ..Behaviour::default()
        }
    }

    /// Accepts and never says anything.
    pub fn hung() -> Behaviour {
        Behaviour {
            hang: true,
            ..Behaviour::default()
        }
    }

    /// Reads a `proxy` header before it greets.
    pub fn expecting_proxy(proxy: ProxyExpect) -> Behaviour {
        Behaviour {
            proxy,
            ..Behaviour::default()
        }
    }
}

/// What the server saw on one connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Connection {
    pub peer: SocketAddr,
    /// The raw PROXY header, when one was expected and read.
    pub proxy_header: Option<Vec<u8>>,
    /// Messages accepted (250 after the final ".").
    pub messages: usize,
    /// The client sent QUIT after at least one accepted message.
    pub completed: bool,
}

#[derive(Default)]
struct Counters {
    connections: AtomicUsize,
    open: AtomicUsize,
    sessions_completed: AtomicUsize,
    messages: AtomicUsize,
    message_bytes: AtomicU64,
}

struct Shared {
    name: String,
    behaviour: Behaviour,
    greeting_code: AtomicU16,
    counters: Counters,
    records: Mutex<Vec<Connection>>,
    /// Listener and connection tasks still alive (so `stop` can wait for them to be gone).
    live_tasks: AtomicUsize,
    /// Whether a listener task is alive (so `pause` can wait for the listener to close).
    listening: AtomicUsize,
}

impl Shared {
    fn records(&self) -> MutexGuard<'_, Vec<Connection>> {
        // A panicking test thread cannot leave a record half-written: use it as it is.
        self.records.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Cancellation of the current listener (pause) and of every connection (stop).
struct Running {
    listener: CancellationToken,
    sessions: CancellationToken,
}

/// A real SMTP server; dropping it closes the listener and every connection.
pub struct SmtpServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    runtime: tokio::runtime::Handle,
    running: Mutex<Option<Running>>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SmtpServer {
    /// Binds 127.0.0.1:0 and serves; the address is [`SmtpServer::addr`].
    pub fn start(name: &str, behaviour: Behaviour) -> SmtpServer {
        let listener = bind_listener(SocketAddr::from(([127, 0, 0, 1], 0)))
            .expect("bind the SMTP server on loopback");
        Self::serve(name, behaviour, listener).expect("start the SMTP server")
    }

    /// Serves on `listener`, bound by the caller anywhere (e.g. in a namespace with
    /// `Netns::run`); accepted connections belong to the listener's namespace.
    pub fn serve(name: &str, behaviour: Behaviour, listener: StdTcpListener) -> Result<SmtpServer> {
        let addr = listener
            .local_addr()
            .context("SMTP server listener address")?;
        let (runtime, shutdown, thread) = runtime_thread(name)?;
        let server = SmtpServer {
            shared: Arc::new(Shared {
                name: name.to_string(),
                greeting_code: AtomicU16::new(behaviour.greeting_code),
                behaviour,
                counters: Counters::default(),
                records: Mutex::new(Vec::new()),
                live_tasks: AtomicUsize::new(0),
                listening: AtomicUsize::new(0),
            }),
            addr,
            runtime,
            running: Mutex::new(None),
            shutdown: Some(shutdown),
            thread: Some(thread),
        };
        server.listen(listener)?;
        Ok(server)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// TCP connections accepted (health checks included).
    pub fn connections(&self) -> usize {
        self.shared.counters.connections.load(Ordering::SeqCst)
    }

    /// Connections open right now.
    pub fn open(&self) -> usize {
        self.shared.counters.open.load(Ordering::SeqCst)
    }

    /// Sessions that reached QUIT after at least one accepted message.
    pub fn sessions_completed(&self) -> usize {
        self.shared
            .counters
            .sessions_completed
            .load(Ordering::SeqCst)
    }

    pub fn messages(&self) -> usize {
        self.shared.counters.messages.load(Ordering::SeqCst)
    }

    /// Message bytes read between DATA's 354 and the final "." line (that line excluded).
    pub fn message_bytes(&self) -> u64 {
        self.shared.counters.message_bytes.load(Ordering::SeqCst)
    }

    /// Client addresses of every connection, health checks included.
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.shared.records().iter().map(|c| c.peer).collect()
    }

    /// Connections from `client` (leaves out a balancer's health checks).
    pub fn sessions_from(&self, client: impl Into<IpAddr>) -> usize {
        let client = client.into();
        self.shared
            .records()
            .iter()
            .filter(|c| c.peer.ip() == client)
            .count()
    }

    /// Every PROXY header received so far, raw, in arrival order.
    pub fn proxy_headers(&self) -> Vec<Vec<u8>> {
        self.shared
            .records()
            .iter()
            .filter_map(|c| c.proxy_header.clone())
            .collect()
    }

    /// Greeting code for connections accepted from now on.
    pub fn set_greeting_code(&self, code: u16) {
        self.shared.greeting_code.store(code, Ordering::SeqCst);
    }

    /// Closes the listener (new connects are refused when it returns) and keeps the sessions
    /// in progress, like an MTA that stops accepting.
    pub fn pause(&self) {
        if let Some(running) = self.running().as_ref() {
            running.listener.cancel();
        }
        self.wait_until("close its listener", || {
            self.shared.listening.load(Ordering::SeqCst) == 0
        });
    }

    /// Closes the listener and drops every open connection at once, like a dying MTA. When it
    /// returns, new connects are refused.
    pub fn stop(&self) {
        if let Some(running) = self.running().take() {
            running.listener.cancel();
            running.sessions.cancel();
        }
        self.wait_until("stop", || {
            self.shared.live_tasks.load(Ordering::SeqCst) == 0
        });
    }

    /// Listens again on the same address (after `stop` or `pause`), binding from the calling
    /// thread's namespace. When it returns, connects succeed.
    pub fn restart(&self) {
        let listener = bind_listener(self.addr).expect("rebind the SMTP server");
        self.restart_on(listener).expect("restart the SMTP server");
    }

    /// Serves on a new `listener` (after `stop` or `pause`); open sessions carry on.
    fn restart_on(&self, listener: StdTcpListener) -> Result<()> {
        self.pause();
        self.listen(listener)
    }

    fn running(&self) -> MutexGuard<'_, Option<Running>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wait_until(&self, what: &str, done: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !done() {
            assert!(
                Instant::now() < deadline,
                "SMTP server {} did not {what} within 5 s",
                self.shared.name
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn listen(&self, listener: StdTcpListener) -> Result<()> {
        listener
            .set_nonblocking(true)
            .context("SMTP server listener: non-blocking")?;
        let mut running = self.running();
        let sessions = match running.as_ref() {
            Some(r) if !r.sessions.is_cancelled() => r.sessions.clone(),
            _ => CancellationToken::new(),
        };
        let token = CancellationToken::new();
        *running = Some(Running {
            listener: token.clone(),
            sessions: sessions.clone(),
        });
        let shared = self.shared.clone();
        shared.live_tasks.fetch_add(1, Ordering::SeqCst);
        shared.listening.fetch_add(1, Ordering::SeqCst);
        let _guard = self.runtime.enter();
        let listener = TcpListener::from_std(listener);
        self.runtime.spawn(async move {
            if let Ok(listener) = listener {
                accept_loop(listener, &shared, token, sessions).await;
            }
            shared.listening.fetch_sub(1, Ordering::SeqCst);
            shared.live_tasks.fetch_sub(1, Ordering::SeqCst);
        });
        Ok(())
    }
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        if let Some(running) = self.running().take() {
            running.listener.cancel();
            running.sessions.cancel();
        }
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

type RuntimeThread = (
    tokio::runtime::Handle,
    tokio::sync::oneshot::Sender<()>,
    std::thread::JoinHandle<()>,
);

/// A current-thread runtime driven by a thread of its own until the sender fires; dropping
/// the runtime there drops every task (and socket) still on it.
fn runtime_thread(name: &str) -> Result<RuntimeThread> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("SMTP server runtime")?;
    let handle = runtime.handle().clone();
    let (shutdown_tx, shutdown_rx) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name(format!("smtp-{name}"))
        .spawn(move || {
            runtime.block_on(async {
                let _ = shutdown_rx.await;
            });
        })
        .context("SMTP server thread")?;
    Ok((handle, shutdown_tx, thread))
}

/// A listening socket with SO_REUSEADDR (so `restart` can rebind at once).
pub fn bind_listener(addr: SocketAddr) -> std::io::Result<StdTcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

async fn accept_loop(
    listener: TcpListener,
    shared: &Arc<Shared>,
    token: CancellationToken,
    sessions: CancellationToken,
) {
    loop {
        let (stream, peer) = tokio::select! {
            _ = token.cancelled() => return,
            _ = sessions.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(_) => {
                    // EMFILE and friends: back off instead of spinning.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                }
            },
        };
        let counters = &shared.counters;
        counters.connections.fetch_add(1, Ordering::SeqCst);
        counters.open.fetch_add(1, Ordering::SeqCst);
        shared.live_tasks.fetch_add(1, Ordering::SeqCst);
        let record = shared.behaviour.keep_records.then(|| {
            let mut records = shared.records();
            records.push(Connection {
                // A dual-stack listener sees IPv4 clients as ::ffff:a.b.c.d: record them as
                // the IPv4 addresses they are.
                peer: SocketAddr::new(peer.ip().to_canonical(), peer.port()),
                proxy_header: None,
                messages: 0,
                completed: false,
            });
            records.len() - 1
        });
        let shared = shared.clone();
        let sessions = sessions.clone();
        tokio::spawn(async move {
            let mut conversation = Conversation::new(stream, &shared, record);
            tokio::select! {
                _ = sessions.cancelled() => {}
                _ = conversation.run() => {}
            }
            shared.counters.open.fetch_sub(1, Ordering::SeqCst);
            shared.live_tasks.fetch_sub(1, Ordering::SeqCst);
        });
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Command,
    Data,
}

/// The server's side of one connection.
struct Conversation<'a> {
    stream: TcpStream,
    shared: &'a Shared,
    record: Option<usize>,
    input: Vec<u8>,
    output: Vec<u8>,
    mode: Mode,
    messages: usize,
}

impl<'a> Conversation<'a> {
    fn new(stream: TcpStream, shared: &'a Shared, record: Option<usize>) -> Self {
        Self {
            stream,
            shared,
            record,
            input: Vec::with_capacity(8192),
            output: Vec::with_capacity(512),
            mode: Mode::Command,
            messages: 0,
        }
    }

    fn behaviour(&self) -> &Behaviour {
        &self.shared.behaviour
    }

    fn update_record(&self, update: impl FnOnce(&mut Connection)) {
        if let Some(i) = self.record
            && let Some(record) = self.shared.records().get_mut(i)
        {
            update(record);
        }
    }

    /// Serves until QUIT, EOF or an error (dropping the socket).
    async fn run(&mut self) -> Result<()> {
        self.stream.set_nodelay(true)?;
        let header = match self.behaviour().proxy {
            ProxyExpect::None => None,
            ProxyExpect::V1 => Some(self.proxy_v1().await?),
            ProxyExpect::V2 => Some(self.proxy_v2().await?),
        };
        if let Some(header) = header {
            self.update_record(|r| r.proxy_header = Some(header));
        }
        if self.behaviour().hang {
            return self.hang().await;
        }
        if !self.greeting_delay_passed().await {
            return Ok(());
        }
        let name = &self.shared.name;
        let code = self.shared.greeting_code.load(Ordering::SeqCst);
        if code != 220 {
            let reply = format!("{code} {name} busy\r\n");
            self.stream.write_all(reply.as_bytes()).await?;
            self.stream.shutdown().await?;
            return Ok(());
        }
        let greeting = format!("220 {name} ESMTP test\r\n");
        self.stream.write_all(greeting.as_bytes()).await?;
        self.converse().await
    }

    /// Waits out the greeting delay; `false` when the client closed or reset meanwhile, which
    /// a real MTA notices (Postfix: "lost connection after CONNECT"). Bytes the client sends
    /// early stay unread.
    async fn greeting_delay_passed(&self) -> bool {
        let delay = self.behaviour().greeting_delay;
        if delay.is_zero() {
            return true;
        }
        let deadline = tokio::time::Instant::now() + delay;
        let mut probe = [0u8; 1];
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => return true,
            peeked = self.stream.peek(&mut probe) => {
                if !matches!(peeked, Ok(1..)) {
                    return false;
                }
            }
        }
        tokio::time::sleep_until(deadline).await;
        true
    }

    /// Reads more input; `false` at EOF.
    async fn fill(&mut self) -> Result<bool> {
        if self.input.len() > MAX_LINE {
            bail!("line longer than {MAX_LINE} bytes");
        }
        tokio::time::sleep(self.behaviour().read_delay).await;
        let len = self.input.len();
        self.input.resize(len + 8192, 0);
        let n = self.stream.read(&mut self.input[len..]).await;
        self.input.truncate(len + *n.as_ref().unwrap_or(&0));
        Ok(n? > 0)
    }

    async fn proxy_v1(&mut self) -> Result<Vec<u8>> {
        loop {
            if let Some(nl) = self.input.iter().position(|&b| b == b'\n') {
                return Ok(self.input.drain(..=nl).collect());
            }
            if self.input.len() >= MAX_PROXY_V1 || !self.fill().await? {
                bail!(
                    "no PROXY v1 header: {:?}",
                    String::from_utf8_lossy(&self.input)
                );
            }
        }
    }

    async fn proxy_v2(&mut self) -> Result<Vec<u8>> {
        loop {
            if self.input.len() >= 16 {
                let len = 16 + usize::from(u16::from_be_bytes([self.input[14], self.input[15]]));
                if self.input.len() >= len {
                    return Ok(self.input.drain(..len).collect());
                }
            }
            if !self.fill().await? {
                bail!("EOF in the PROXY v2 header");
            }
        }
    }

    async fn hang(&mut self) -> Result<()> {
        let mut scratch = [0u8; 4096];
        while self.stream.read(&mut scratch).await? > 0 {}
        Ok(())
    }

    async fn converse(&mut self) -> Result<()> {
        let mut message_bytes = 0u64;
        loop {
            let mut consumed = 0;
            let mut quit = false;
            while let Some(nl) = self.input[consumed..].iter().position(|&b| b == b'\n') {
                let line = consumed..consumed + nl + 1;
                consumed = line.end;
                if self.mode == Mode::Data {
                    let line = &self.input[line];
                    if line == b".\r\n" || line == b".\n" {
                        self.end_of_data(message_bytes).await;
                        message_bytes = 0;
                    } else {
                        message_bytes += line.len() as u64;
                    }
                    continue;
                }
                let verb = self.input[line].get(..4).map(|v| v.to_ascii_uppercase());
                quit = self.command(verb.as_deref()).await;
                if quit {
                    break;
                }
            }
            self.input.drain(..consumed);
            // Counted before the 221 goes out: a client that has read it sees the count.
            if quit && self.messages > 0 {
                self.shared
                    .counters
                    .sessions_completed
                    .fetch_add(1, Ordering::SeqCst);
                self.update_record(|r| r.completed = true);
            }
            // Answer everything that arrived together in one write, as a pipelining MTA does.
            if !self.output.is_empty() {
                self.stream.write_all(&self.output).await?;
                self.output.clear();
            }
            if quit {
                self.stream.shutdown().await?;
                return Ok(());
            }
            if !self.fill().await? {
                return Ok(());
            }
        }
    }

    async fn end_of_data(&mut self, bytes: u64) {
        self.mode = Mode::Command;
        self.messages += 1;
        let counters = &self.shared.counters;
        counters.messages.fetch_add(1, Ordering::SeqCst);
        counters.message_bytes.fetch_add(bytes, Ordering::SeqCst);
        let messages = self.messages;
        self.update_record(|r| r.messages = messages);
        self.reply(None, b"250 2.0.0 Ok: queued\r\n").await;
    }

    /// Queues the reply to one command; `true` for QUIT.
    async fn command(&mut self, verb: Option<&[u8]>) -> bool {
        let reject = |at: RejectAt| {
            self.behaviour()
                .reject
                .filter(|(stage, _)| *stage == at)
                .map(|(_, code)| code)
        };
        match verb {
            Some(b"EHLO") => {
                let ehlo = format!(
                    "250-{}\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 104857600\r\n",
                    self.shared.name
                );
                self.reply(None, ehlo.as_bytes()).await;
            }
            Some(b"HELO") => {
                let helo = format!("250 {}\r\n", self.shared.name);
                self.reply(None, helo.as_bytes()).await;
            }
            Some(b"MAIL") => {
                self.reply(reject(RejectAt::Mail), b"250 2.1.0 Ok\r\n")
                    .await
            }
            Some(b"RCPT") => {
                self.reply(reject(RejectAt::Rcpt), b"250 2.1.5 Ok\r\n")
                    .await
            }
            Some(b"DATA") => {
                let rejected = reject(RejectAt::Data);
                if rejected.is_none() {
                    self.mode = Mode::Data;
                }
                let go_ahead = b"354 End data with <CR><LF>.<CR><LF>\r\n";
                self.reply(rejected, go_ahead).await;
            }
            Some(b"RSET") | Some(b"NOOP") => self.reply(None, b"250 2.0.0 Ok\r\n").await,
            Some(b"QUIT") => {
                self.reply(None, b"221 2.0.0 Bye\r\n").await;
                return true;
            }
            _ => {
                let unknown = b"502 5.5.2 Error: command not recognized\r\n";
                self.reply(None, unknown).await;
            }
        }
        false
    }

    /// Queues `ok`, or the rejection with `code`, after the reply delay.
    async fn reply(&mut self, rejected: Option<u16>, ok: &[u8]) {
        let delay = self.behaviour().reply_delay;
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        match rejected {
            Some(code) => {
                let text = format!("{code} {}.7.1 rejected by the test server\r\n", code / 100);
                self.output.extend_from_slice(text.as_bytes());
            }
            None => self.output.extend_from_slice(ok),
        }
    }
}
