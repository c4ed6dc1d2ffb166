//! One SMTP client for every test and for the load generator: a session step by step
//! ([`Session`]: connect and greeting, EHLO and one message, NOOP, QUIT), whole sessions with
//! options ([`SessionOptions`]: source address, hold time, message size, timeouts), a
//! greeting-only probe, and a session held open from another thread ([`HeldSession`]).
//!
//! Replies are read with the proxy's own parser, `switchyard::smtp::ReplyParser`, from a
//! buffer the client owns, so pipelined replies that arrive in one segment cost one read.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use switchyard::smtp::{Reply, ReplyParser};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::netns::Netns;

/// How long a test's single step may take before the client gives up (tests never hang).
pub const STEP_TIMEOUT: Duration = Duration::from_secs(15);
/// The message the tests send when no size is asked for.
pub const TEST_MESSAGE: &[u8] =
    b"Subject: switchyard test\r\n\r\nHello through the proxy.\r\n.\r\n";

/// The SMTP steps, named in errors and in the load generator's error kinds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Stage {
    #[default]
    Connect,
    Greeting,
    Ehlo,
    Mail,
    Rcpt,
    Data,
    Message,
    Noop,
    Quit,
}

impl Stage {
    pub fn name(self) -> &'static str {
        match self {
            Stage::Connect => "CONNECT",
            Stage::Greeting => "GREETING",
            Stage::Ehlo => "EHLO",
            Stage::Mail => "MAIL",
            Stage::Rcpt => "RCPT",
            Stage::Data => "DATA",
            Stage::Message => "END-OF-DATA",
            Stage::Noop => "NOOP",
            Stage::Quit => "QUIT",
        }
    }
}

/// Why a step failed.
#[derive(Debug)]
pub enum Failure {
    Io(io::Error),
    /// The server closed the connection where a reply was due.
    Closed,
    /// A complete reply with another code than the step expects.
    Code(Reply),
    /// Bytes that are no SMTP reply (the parser's message).
    Malformed(String),
    /// A step took longer than the step timeout.
    Timeout,
}

impl From<io::Error> for Failure {
    fn from(e: io::Error) -> Self {
        Failure::Io(e)
    }
}

/// A failed session: the step and why.
#[derive(Debug)]
pub struct SessionError {
    pub stage: Stage,
    pub failure: Failure,
}

impl std::fmt::Display for SessionError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let at = self.stage.name();
        match &self.failure {
            Failure::Io(e) => write!(f, "at {at}: {e}"),
            Failure::Closed => write!(f, "at {at}: connection closed by the server"),
            Failure::Code(reply) => write!(
                f,
                "at {at}: unexpected reply {:?}",
                String::from_utf8_lossy(&reply.raw)
            ),
            Failure::Malformed(why) => write!(f, "at {at}: {why}"),
            Failure::Timeout => write!(f, "at {at}: timed out"),
        }
    }
}

impl std::error::Error for SessionError {}

/// What a whole session sends and how long it may take.
#[derive(Clone, Debug)]
pub struct SessionOptions {
    /// Local address to connect from (any 127.x.y.z works on loopback).
    pub source: Option<IpAddr>,
    /// Local port to connect from, bound with SO_REUSEADDR (so an ended connection's port can
    /// be used again at once); 0 lets the kernel choose.
    pub source_port: u16,
    /// Wait this long after the message, before QUIT (a long session).
    pub hold: Duration,
    /// Limit on each connect, read and write; `None` leaves timing to the caller.
    pub step_timeout: Option<Duration>,
    pub ehlo: String,
    pub mail_from: String,
    pub recipients: usize,
    /// Send MAIL, RCPT and DATA in one write when the server advertises PIPELINING.
    pub pipelining: bool,
}

impl SessionOptions {
    /// The local address to bind before connecting to `target`, if any was asked for.
    fn local_addr(&self, target: SocketAddr) -> Option<SocketAddr> {
        let any = match target {
            SocketAddr::V4(_) => IpAddr::from(std::net::Ipv4Addr::UNSPECIFIED),
            SocketAddr::V6(_) => IpAddr::from(std::net::Ipv6Addr::UNSPECIFIED),
        };
        match (self.source, self.source_port) {
            (None, 0) => None,
            (ip, port) => Some(SocketAddr::new(ip.unwrap_or(any), port)),
        }
    }
}

impl Default for SessionOptions {
    fn default() -> Self {
        Self {
            source: None,
            source_port: 0,
            hold: Duration::ZERO,
            step_timeout: Some(STEP_TIMEOUT),
            ehlo: "client.test".into(),
            mail_from: "sender@example.test".into(),
            recipients: 1,
            pipelining: false,
        }
    }
}

/// Where a session got to, kept up to date as it runs, so a caller that cancels it (a whole
/// session timeout) still knows the step and the times.
#[derive(Clone, Copy, Debug, Default)]
pub struct Trace {
    pub stage: Stage,
    pub connected: Option<Instant>,
    pub greeted: Option<Instant>,
    /// Bytes of the message the server accepted (as written, dot-stuffed, final "." included).
    pub accepted_bytes: Option<u64>,
}

/// A connection with the client's input buffer; reuse it (through [`Session::into_buffers`])
/// to allocate nothing per session.
#[derive(Default)]
pub struct Buffers {
    input: Vec<u8>,
    output: Vec<u8>,
}

/// The client's side of one SMTP session.
pub struct Session {
    stream: TcpStream,
    buffers: Buffers,
    step_timeout: Option<Duration>,
    /// The greeting's first word after the code: which backend answered.
    pub backend: String,
    /// The server advertised PIPELINING in its EHLO reply.
    pub pipelining: bool,
}

impl Session {
    /// Connects and reads the greeting, which must be a 220.
    pub async fn open(addr: SocketAddr, options: &SessionOptions) -> Result<Session, SessionError> {
        Self::open_traced(addr, options, Buffers::default(), &mut Trace::default()).await
    }

    /// [`Session::open`] with reused buffers, recording progress in `trace`.
    pub async fn open_traced(
        addr: SocketAddr,
        options: &SessionOptions,
        buffers: Buffers,
        trace: &mut Trace,
    ) -> Result<Session, SessionError> {
        trace.stage = Stage::Connect;
        let stream = step(
            options.step_timeout,
            connect(addr, options.local_addr(addr)),
        )
        .await
        .map_err(|failure| SessionError {
            stage: Stage::Connect,
            failure,
        })?;
        trace.connected = Some(Instant::now());
        let mut session = Session::on(stream, buffers, options.step_timeout);
        trace.stage = Stage::Greeting;
        let greeting = session.expect(Stage::Greeting, 220).await?;
        trace.greeted = Some(Instant::now());
        session.backend = greeting_name(&greeting);
        Ok(session)
    }

    /// A session on a connected stream whose greeting is still to be read.
    pub fn on(stream: TcpStream, mut buffers: Buffers, step_timeout: Option<Duration>) -> Session {
        buffers.input.clear();
        Session {
            stream,
            buffers,
            step_timeout,
            backend: String::new(),
            pipelining: false,
        }
    }

    /// The buffers, for the next session.
    pub fn into_buffers(self) -> Buffers {
        self.buffers
    }

    /// Reads one reply (multi-line replies whole); bytes of later replies stay buffered.
    pub async fn read_reply(&mut self) -> Result<Reply, Failure> {
        let mut parser = ReplyParser::default();
        loop {
            if !self.buffers.input.is_empty() {
                let (used, reply) = parser
                    .push(&self.buffers.input)
                    .map_err(|e| Failure::Malformed(format!("{e:#}")))?;
                self.buffers.input.drain(..used);
                if let Some(reply) = reply {
                    return Ok(reply);
                }
            }
            let (stream, input) = (&mut self.stream, &mut self.buffers.input);
            let n = step(self.step_timeout, async {
                input.reserve(4096);
                stream.read_buf(input).await.map_err(Failure::Io)
            })
            .await?;
            if n == 0 {
                return Err(Failure::Closed);
            }
        }
    }

    /// Reads one reply and checks its code.
    pub async fn expect(&mut self, stage: Stage, code: u16) -> Result<Reply, SessionError> {
        let failed = |failure| SessionError { stage, failure };
        let reply = self.read_reply().await.map_err(failed)?;
        if reply.code != code {
            return Err(failed(Failure::Code(reply)));
        }
        Ok(reply)
    }

    /// Writes `bytes` whole.
    pub async fn send(&mut self, stage: Stage, bytes: &[u8]) -> Result<(), SessionError> {
        let stream = &mut self.stream;
        step(self.step_timeout, async {
            stream.write_all(bytes).await.map_err(Failure::Io)
        })
        .await
        .map_err(|failure| SessionError { stage, failure })
    }

    /// Sends one command line and checks the reply's code.
    pub async fn command(
        &mut self,
        stage: Stage,
        line: &[u8],
        code: u16,
    ) -> Result<Reply, SessionError> {
        self.send(stage, line).await?;
        self.expect(stage, code).await
    }

    /// EHLO, then one message: MAIL, RCPT per recipient, DATA and `message` (dot-stuffed and
    /// ending with the lone "."), pipelined when asked for and advertised.
    pub async fn transaction(
        &mut self,
        options: &SessionOptions,
        message: &[u8],
        trace: &mut Trace,
    ) -> Result<(), SessionError> {
        trace.stage = Stage::Ehlo;
        let ehlo = format!("EHLO {}\r\n", options.ehlo);
        let reply = self.command(Stage::Ehlo, ehlo.as_bytes(), 250).await?;
        self.pipelining = advertises_pipelining(&reply);
        let mut envelope = std::mem::take(&mut self.buffers.output);
        envelope.clear();
        push_fmt(
            &mut envelope,
            format_args!("MAIL FROM:<{}>\r\n", options.mail_from),
        );
        for r in 0..options.recipients {
            push_fmt(
                &mut envelope,
                format_args!("RCPT TO:<rcpt{r}@example.test>\r\n"),
            );
        }
        envelope.extend_from_slice(b"DATA\r\n");
        let sent = self.envelope(&envelope, options, trace).await;
        self.buffers.output = envelope;
        sent?;
        trace.stage = Stage::Message;
        self.command(Stage::Message, message, 250).await?;
        trace.accepted_bytes = Some(message.len() as u64);
        Ok(())
    }

    /// MAIL, RCPTs and DATA up to the 354, as one write when pipelining.
    async fn envelope(
        &mut self,
        envelope: &[u8],
        options: &SessionOptions,
        trace: &mut Trace,
    ) -> Result<(), SessionError> {
        let pipelined = options.pipelining && self.pipelining;
        let mut lines = envelope.split_inclusive(|&b| b == b'\n');
        let stages = std::iter::once(Stage::Mail)
            .chain(std::iter::repeat_n(Stage::Rcpt, options.recipients))
            .chain(std::iter::once(Stage::Data));
        if pipelined {
            self.send(Stage::Mail, envelope).await?;
        }
        for stage in stages {
            trace.stage = stage;
            if !pipelined {
                let line = lines.next().unwrap_or_default();
                self.send(stage, line).await?;
            }
            let code = if stage == Stage::Data { 354 } else { 250 };
            self.expect(stage, code).await?;
        }
        Ok(())
    }

    /// NOOP, expecting 250.
    pub async fn noop(&mut self) -> Result<(), SessionError> {
        self.command(Stage::Noop, b"NOOP\r\n", 250).await.map(drop)
    }

    /// QUIT, expecting 221.
    pub async fn quit(&mut self) -> Result<(), SessionError> {
        self.command(Stage::Quit, b"QUIT\r\n", 221).await.map(drop)
    }

    /// The connection itself, for tests that go off script.
    pub fn stream(&mut self) -> &mut TcpStream {
        &mut self.stream
    }
}

/// A complete session with `options` and `message`; returns the backend name of the greeting.
pub async fn run_session(
    addr: SocketAddr,
    options: &SessionOptions,
    message: &[u8],
) -> Result<String, SessionError> {
    let mut trace = Trace::default();
    let mut session = Session::open_traced(addr, options, Buffers::default(), &mut trace).await?;
    session.transaction(options, message, &mut trace).await?;
    tokio::time::sleep(options.hold).await;
    session.quit().await?;
    Ok(session.backend)
}

/// One full SMTP transaction; returns the backend name from the greeting.
pub async fn smtp_session(addr: SocketAddr) -> anyhow::Result<String> {
    Ok(run_session(addr, &SessionOptions::default(), TEST_MESSAGE).await?)
}

/// Like [`smtp_session`], from a given local source address.
pub async fn smtp_session_from(addr: SocketAddr, source: IpAddr) -> anyhow::Result<String> {
    let options = SessionOptions {
        source: Some(source),
        ..SessionOptions::default()
    };
    Ok(run_session(addr, &options, TEST_MESSAGE).await?)
}

/// Like [`smtp_session`], but waits `hold` after the message before QUIT (a long session).
pub async fn smtp_session_hold(addr: SocketAddr, hold: Duration) -> anyhow::Result<String> {
    let options = SessionOptions {
        hold,
        ..SessionOptions::default()
    };
    Ok(run_session(addr, &options, TEST_MESSAGE).await?)
}

/// A whole session from a thread without a runtime (e.g. inside a namespace with
/// `Netns::run`), on a runtime of its own.
pub fn smtp_session_blocking(addr: SocketAddr, options: &SessionOptions) -> anyhow::Result<String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("SMTP client runtime")?;
    Ok(runtime.block_on(run_session(addr, options, TEST_MESSAGE))?)
}

/// Connects and reads only the first reply: its code and full text (e.g. to check for a 421).
pub async fn read_greeting(addr: SocketAddr) -> anyhow::Result<(u16, String)> {
    let (code, text, _) = greeting_from(addr, None).await?;
    Ok((code, text))
}

/// Connects from `source` (any local address if `None`) and reads the first reply: its code,
/// its full text, and the connection, still open, for the caller to hold or close.
pub async fn greeting_from(
    addr: SocketAddr,
    source: Option<IpAddr>,
) -> anyhow::Result<(u16, String, Session)> {
    let local = source.map(|ip| SocketAddr::new(ip, 0));
    let stream = step(Some(STEP_TIMEOUT), connect(addr, local))
        .await
        .map_err(|failure| SessionError {
            stage: Stage::Connect,
            failure,
        })?;
    let mut session = Session::on(stream, Buffers::default(), Some(STEP_TIMEOUT));
    let reply = session.read_reply().await.map_err(|failure| SessionError {
        stage: Stage::Greeting,
        failure,
    })?;
    Ok((
        reply.code,
        String::from_utf8_lossy(&reply.raw).into_owned(),
        session,
    ))
}

/// Reads one reply from any reader (a test's own connection) with the proxy's parser, within
/// [`STEP_TIMEOUT`]: its code and full text, CRLFs included.
pub async fn read_reply<R: AsyncRead + Unpin>(reader: &mut R) -> anyhow::Result<(u16, String)> {
    let reply = tokio::time::timeout(STEP_TIMEOUT, switchyard::smtp::read_reply(reader))
        .await
        .context("timed out waiting for a reply")??;
    Ok((reply.code, String::from_utf8_lossy(&reply.raw).into_owned()))
}

/// A session held open on a thread of its own, with a NOOP every 300 ms so that it never
/// idles, until [`HeldSession::finish`] sends a message and QUIT. Bounded: a forgotten session
/// ends by itself after two minutes.
pub struct HeldSession {
    /// The backend that greeted.
    pub backend: String,
    /// The client's end of the connection (which balancer's flow or session it is).
    pub local: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
}

impl HeldSession {
    /// Connects from the calling thread's namespace and waits for the greeting.
    pub fn open(target: SocketAddr) -> anyhow::Result<HeldSession> {
        Self::start(target, std::thread::spawn)
    }

    /// Connects from inside `ns` and waits for the greeting.
    pub fn open_in(ns: &Netns, target: SocketAddr) -> anyhow::Result<HeldSession> {
        Self::start(target, |f| ns.spawn(f))
    }

    fn start(
        target: SocketAddr,
        spawn: impl FnOnce(
            Box<dyn FnOnce() -> anyhow::Result<()> + Send>,
        ) -> std::thread::JoinHandle<anyhow::Result<()>>,
    ) -> anyhow::Result<HeldSession> {
        let stop = Arc::new(AtomicBool::new(false));
        let (greeted_tx, greeted_rx) = std::sync::mpsc::channel();
        let held = {
            let stop = stop.clone();
            move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .context("SMTP client runtime")?;
                runtime.block_on(hold(target, stop, greeted_tx))
            }
        };
        let thread = spawn(Box::new(held));
        let (backend, local) = greeted_rx
            .recv_timeout(STEP_TIMEOUT)
            .with_context(|| format!("no greeting from {target}"))?
            .with_context(|| format!("held session to {target}"))?;
        Ok(HeldSession {
            backend,
            local,
            stop,
            thread: Some(thread),
        })
    }

    /// Sends a message and QUIT; the session's result.
    pub fn finish(mut self) -> anyhow::Result<()> {
        self.stop.store(true, Ordering::SeqCst);
        match self.thread.take() {
            Some(thread) => thread
                .join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("the session thread panicked"))),
            None => Ok(()),
        }
    }
}

impl Drop for HeldSession {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

async fn hold(
    target: SocketAddr,
    stop: Arc<AtomicBool>,
    greeted: std::sync::mpsc::Sender<anyhow::Result<(String, SocketAddr)>>,
) -> anyhow::Result<()> {
    let options = SessionOptions::default();
    let opened = match Session::open(target, &options).await {
        Ok(session) => session
            .stream
            .local_addr()
            .map(|local| (session, local))
            .context("the held session's local address"),
        Err(e) => Err(e.into()),
    };
    let (mut session, local) = match opened {
        Ok(opened) => opened,
        Err(e) => {
            let message = format!("{e:#}");
            let _ = greeted.send(Err(e));
            anyhow::bail!(message);
        }
    };
    let _ = greeted.send(Ok((session.backend.clone(), local)));
    let deadline = Instant::now() + Duration::from_secs(120);
    while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(300)).await;
        session.noop().await?;
    }
    session
        .transaction(&options, TEST_MESSAGE, &mut Trace::default())
        .await?;
    session.quit().await?;
    Ok(())
}

async fn step<T>(
    limit: Option<Duration>,
    work: impl Future<Output = Result<T, Failure>>,
) -> Result<T, Failure> {
    match limit {
        None => work.await,
        Some(limit) => tokio::time::timeout(limit, work)
            .await
            .unwrap_or(Err(Failure::Timeout)),
    }
}

async fn connect(addr: SocketAddr, source: Option<SocketAddr>) -> Result<TcpStream, Failure> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(local) = source {
        if local.port() != 0 {
            socket.set_reuseaddr(true)?;
        }
        socket.bind(local)?;
    }
    let stream = socket.connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// The first word after the code: the name a test server greets with.
fn greeting_name(greeting: &Reply) -> String {
    String::from_utf8_lossy(&greeting.raw)
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_string()
}

fn advertises_pipelining(ehlo: &Reply) -> bool {
    ehlo.raw
        .split(|&b| b == b'\n')
        .filter_map(|line| line.get(4..))
        .any(|text| text.len() >= 10 && text[..10].eq_ignore_ascii_case(b"PIPELINING"))
}

fn push_fmt(out: &mut Vec<u8>, args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    // Writing into a Vec cannot fail.
    let _ = out.write_fmt(args);
}

/// A message of about `size` bytes after a Message-ID line: RFC 5322 headers and a body of
/// 76-column lines, dot-stuffed, CRLF, ending with the lone ".". One body line starts with a
/// dot so that every run exercises dot-stuffing.
pub fn message_body(size: usize) -> Vec<u8> {
    let mut msg = Vec::with_capacity(size + 256);
    msg.extend_from_slice(
        b"Date: Thu, 01 Jan 2026 00:00:00 +0000\r\n\
          From: Load Generator <loadgen@switchyard.invalid>\r\n\
          To: Sink <rcpt0@switchyard.invalid>\r\n\
          Subject: switchyard load test\r\n\
          MIME-Version: 1.0\r\n\
          Content-Type: text/plain; charset=us-ascii\r\n\
          \r\n",
    );
    // The Message-ID line the load generator prepends is about 60 bytes.
    let header_len = msg.len() + 60;
    let mut body_len = size.saturating_sub(header_len);
    let text = b"The quick brown fox jumps over the lazy dog while the mail queue drains. ";
    let mut line_no = 0usize;
    while body_len > 0 {
        let want = body_len.min(78).saturating_sub(2).max(1);
        let mut line = Vec::with_capacity(want + 3);
        if line_no == 1 {
            line.push(b'.');
        }
        while line.len() < want {
            line.push(text[(line.len() + line_no) % text.len()]);
        }
        line.truncate(want);
        body_len = body_len.saturating_sub(want + 2);
        if line[0] == b'.' {
            msg.push(b'.');
        }
        msg.extend_from_slice(&line);
        msg.extend_from_slice(b"\r\n");
        line_no += 1;
    }
    msg.extend_from_slice(b".\r\n");
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_is_dot_stuffed_crlf_and_about_the_requested_size() {
        let body = message_body(2048);
        assert!(body.ends_with(b"\r\n.\r\n"));
        let lines: Vec<&[u8]> = body.split(|&b| b == b'\n').collect();
        for line in &lines[..lines.len() - 1] {
            assert!(
                line.ends_with(b"\r"),
                "bare LF in {:?}",
                String::from_utf8_lossy(line)
            );
            assert!(line.len() <= 1000);
        }
        // Only the final "." line is a lone dot; the stuffed line starts with "..".
        let lone_dots = lines.iter().filter(|l| *l == b".\r").count();
        assert_eq!(lone_dots, 1);
        assert!(lines.iter().any(|l| l.starts_with(b"..")));
        let total = body.len() + 60;
        assert!((2000..2100).contains(&total), "size {total}");
    }
}
