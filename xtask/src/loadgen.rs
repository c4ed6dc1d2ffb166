//! The SMTP load generator: concurrent workers running complete one-message SMTP sessions
//! (greeting, EHLO, MAIL, RCPT, DATA, message, QUIT) against one address, checking every reply
//! code, and the report they add up to (rates, HDR latency percentiles, errors by kind).
//!
//! Each worker owns its buffers and histograms and merges them once at the end, so the hot loop
//! shares nothing but two atomics (the session budget and the progress count).

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// When the load stops.
#[derive(Clone, Copy, Debug)]
pub enum Budget {
    /// Exactly this many sessions in total, shared by all workers.
    Sessions(u64),
    /// Workers start no new session after this long.
    Duration(Duration),
}

#[derive(Clone, Debug)]
pub struct LoadSpec {
    pub target: SocketAddr,
    /// Concurrent sessions (workers).
    pub concurrency: usize,
    pub budget: Budget,
    /// Message size in bytes, headers included, before dot-stuffing.
    pub size: usize,
    pub recipients: usize,
    /// Send MAIL, RCPT and DATA in one write when the server advertises PIPELINING.
    pub pipelining: bool,
    /// Show a progress bar (callers pass "stdout is a terminal").
    pub progress: bool,
    /// Longest a whole session may take before it counts as a timeout.
    pub session_timeout: Duration,
    /// Set from outside to stop starting sessions (Ctrl-C, a demo ending early).
    pub cancel: Option<Arc<AtomicBool>>,
    /// Runtime threads for [`run_blocking`]: 1 is a current-thread runtime.
    pub threads: usize,
}

impl LoadSpec {
    pub fn new(target: SocketAddr, concurrency: usize, budget: Budget) -> Self {
        Self {
            target,
            concurrency,
            budget,
            size: 2048,
            recipients: 1,
            pipelining: false,
            progress: false,
            session_timeout: Duration::from_secs(30),
            cancel: None,
            threads: 1,
        }
    }
}

/// Latency percentiles in milliseconds.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Percentiles {
    pub count: u64,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Latencies {
    /// From starting the connect to the connection being established.
    pub connect: Percentiles,
    /// From starting the connect to the whole 220 greeting being read.
    pub greeting: Percentiles,
    /// From starting the connect to the 221 reply to QUIT.
    pub session: Percentiles,
}

/// Everything one load run measured (`--json` writes it as is).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct LoadReport {
    pub target: String,
    pub concurrency: usize,
    pub size: usize,
    pub recipients: usize,
    pub pipelining: bool,
    pub elapsed_s: f64,
    /// Sessions that completed every step with the expected reply codes.
    pub sessions_ok: u64,
    pub sessions_failed: u64,
    /// Messages the server accepted (250 after the final ".").
    pub messages: u64,
    /// Message bytes written, as sent on the wire (dot-stuffed, with the final ".").
    pub bytes: u64,
    pub sessions_per_s: f64,
    pub messages_per_s: f64,
    pub mb_per_s: f64,
    pub latency_ms: Latencies,
    /// Failed sessions by kind, e.g. "unexpected code 550 at RCPT".
    pub errors: BTreeMap<String, u64>,
}

impl LoadReport {
    pub fn print(&self) {
        println!(
            "target {}  concurrency {}  size {} B  recipients {}{}",
            self.target,
            self.concurrency,
            self.size,
            self.recipients,
            if self.pipelining { "  pipelining" } else { "" }
        );
        println!(
            "sessions ok {}  failed {}  messages {}  in {:.2} s",
            self.sessions_ok, self.sessions_failed, self.messages, self.elapsed_s
        );
        println!(
            "rate {:.0} sessions/s  {:.0} messages/s  {:.2} MB/s",
            self.sessions_per_s, self.messages_per_s, self.mb_per_s
        );
        println!("latency (ms)      p50      p90      p99    p99.9      max");
        for (name, p) in [
            ("connect", &self.latency_ms.connect),
            ("greeting", &self.latency_ms.greeting),
            ("session", &self.latency_ms.session),
        ] {
            println!(
                "  {name:<10} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>8.3}",
                p.p50, p.p90, p.p99, p.p999, p.max
            );
        }
        if self.errors.is_empty() {
            println!("errors: none");
        } else {
            println!("errors:");
            for (kind, n) in &self.errors {
                println!("  {n:>8}  {kind}");
            }
        }
    }
}

/// Runs the load on a fresh current-thread runtime: on two cores one thread drives 50 sessions
/// faster than two would (measured), and leaves the other core to the system under test.
pub fn run_blocking(spec: LoadSpec) -> Result<LoadReport> {
    let mut builder = if spec.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(spec.threads);
        b
    };
    builder
        .enable_all()
        .build()
        .context("building the load generator's runtime")?
        .block_on(run(spec))
}

/// Runs the load described by `spec` on the current tokio runtime.
pub async fn run(spec: LoadSpec) -> Result<LoadReport> {
    anyhow::ensure!(spec.concurrency > 0, "--sessions must be at least 1");
    anyhow::ensure!(spec.recipients > 0, "--recipients must be at least 1");
    let shared = Arc::new(Shared {
        remaining: AtomicU64::new(match spec.budget {
            Budget::Sessions(n) => n,
            Budget::Duration(_) => u64::MAX,
        }),
        done: AtomicU64::new(0),
        body: message_body(spec.size),
        spec: spec.clone(),
    });
    let started = Instant::now();
    let deadline = match spec.budget {
        Budget::Duration(d) => Some(started + d),
        Budget::Sessions(_) => None,
    };
    let progress = spec.progress.then(|| progress_bar(&spec));
    let ticker = progress.clone().map(|bar| {
        let shared = shared.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                match shared.spec.budget {
                    Budget::Sessions(_) => bar.set_position(shared.done.load(Ordering::Relaxed)),
                    Budget::Duration(_) => {
                        bar.set_position(started.elapsed().as_millis() as u64);
                        bar.set_message(format!(
                            "{} sessions",
                            shared.done.load(Ordering::Relaxed)
                        ));
                    }
                }
            }
        })
    });
    let workers: Vec<_> = (0..spec.concurrency)
        .map(|id| tokio::spawn(worker(id, shared.clone(), deadline)))
        .collect();
    let mut total = WorkerStats::new();
    for w in workers {
        total.merge(w.await.context("a load worker panicked")?);
    }
    let elapsed = started.elapsed().as_secs_f64();
    if let Some(t) = ticker {
        t.abort();
    }
    if let Some(bar) = progress {
        bar.finish_and_clear();
    }
    Ok(total.report(&spec, elapsed))
}

struct Shared {
    remaining: AtomicU64,
    done: AtomicU64,
    body: Vec<u8>,
    spec: LoadSpec,
}

impl Shared {
    fn take_session(&self, deadline: Option<Instant>) -> bool {
        if self
            .spec
            .cancel
            .as_ref()
            .is_some_and(|c| c.load(Ordering::Relaxed))
        {
            return false;
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return false;
        }
        self.remaining
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok()
    }
}

fn progress_bar(spec: &LoadSpec) -> indicatif::ProgressBar {
    let (len, template) = match spec.budget {
        Budget::Sessions(n) => (n, "{bar:40} {pos}/{len} sessions  {per_sec}  eta {eta}"),
        Budget::Duration(d) => (d.as_millis() as u64, "{bar:40} {elapsed}/{duration}  {msg}"),
    };
    let bar = indicatif::ProgressBar::new(len);
    if let Ok(style) = indicatif::ProgressStyle::with_template(template) {
        bar.set_style(style);
    }
    bar
}

/// The SMTP steps, named in error kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    Connect,
    Greeting,
    Ehlo,
    Mail,
    Rcpt,
    Data,
    Message,
    Quit,
}

impl Stage {
    fn name(self) -> &'static str {
        match self {
            Stage::Connect => "CONNECT",
            Stage::Greeting => "GREETING",
            Stage::Ehlo => "EHLO",
            Stage::Mail => "MAIL",
            Stage::Rcpt => "RCPT",
            Stage::Data => "DATA",
            Stage::Message => "END-OF-DATA",
            Stage::Quit => "QUIT",
        }
    }
}

/// Why a session failed; rendered as the key of `errors`.
#[derive(Debug)]
enum Failure {
    Io(io::Error),
    Closed,
    Code(u16),
    Malformed,
}

fn failure_kind(stage: Stage, failure: &Failure) -> String {
    let at = stage.name();
    match failure {
        Failure::Io(e) => match e.kind() {
            io::ErrorKind::ConnectionRefused => "connect refused".to_string(),
            io::ErrorKind::ConnectionReset => format!("reset at {at}"),
            io::ErrorKind::BrokenPipe => format!("broken pipe at {at}"),
            io::ErrorKind::AddrNotAvailable => {
                "no local address (ephemeral ports exhausted)".to_string()
            }
            io::ErrorKind::TimedOut => format!("timeout at {at}"),
            kind => format!("{kind} at {at}"),
        },
        Failure::Closed => format!("closed by server at {at}"),
        Failure::Code(code) => format!("unexpected code {code} at {at}"),
        Failure::Malformed => format!("malformed reply at {at}"),
    }
}

impl From<io::Error> for Failure {
    fn from(e: io::Error) -> Self {
        Failure::Io(e)
    }
}

struct WorkerStats {
    ok: u64,
    failed: u64,
    messages: u64,
    bytes: u64,
    connect: Histogram<u64>,
    greeting: Histogram<u64>,
    session: Histogram<u64>,
    errors: BTreeMap<String, u64>,
}

fn histogram() -> Histogram<u64> {
    // Microseconds, 1 us .. 10 min, 3 significant digits.
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("static histogram bounds are valid")
}

impl WorkerStats {
    fn new() -> Self {
        Self {
            ok: 0,
            failed: 0,
            messages: 0,
            bytes: 0,
            connect: histogram(),
            greeting: histogram(),
            session: histogram(),
            errors: BTreeMap::new(),
        }
    }

    fn merge(&mut self, other: WorkerStats) {
        self.ok += other.ok;
        self.failed += other.failed;
        self.messages += other.messages;
        self.bytes += other.bytes;
        // Same bounds on both sides: adding cannot fail.
        let _ = self.connect.add(&other.connect);
        let _ = self.greeting.add(&other.greeting);
        let _ = self.session.add(&other.session);
        for (k, v) in other.errors {
            *self.errors.entry(k).or_default() += v;
        }
    }

    fn report(&self, spec: &LoadSpec, elapsed: f64) -> LoadReport {
        let per_s = |n: u64| {
            if elapsed > 0.0 {
                n as f64 / elapsed
            } else {
                0.0
            }
        };
        LoadReport {
            target: spec.target.to_string(),
            concurrency: spec.concurrency,
            size: spec.size,
            recipients: spec.recipients,
            pipelining: spec.pipelining,
            elapsed_s: elapsed,
            sessions_ok: self.ok,
            sessions_failed: self.failed,
            messages: self.messages,
            bytes: self.bytes,
            sessions_per_s: per_s(self.ok),
            messages_per_s: per_s(self.messages),
            mb_per_s: per_s(self.bytes) / 1e6,
            latency_ms: Latencies {
                connect: percentiles(&self.connect),
                greeting: percentiles(&self.greeting),
                session: percentiles(&self.session),
            },
            errors: self.errors.clone(),
        }
    }
}

fn percentiles(h: &Histogram<u64>) -> Percentiles {
    let ms = |us: u64| us as f64 / 1000.0;
    if h.is_empty() {
        return Percentiles::default();
    }
    Percentiles {
        count: h.len(),
        mean: h.mean() / 1000.0,
        p50: ms(h.value_at_quantile(0.50)),
        p90: ms(h.value_at_quantile(0.90)),
        p99: ms(h.value_at_quantile(0.99)),
        p999: ms(h.value_at_quantile(0.999)),
        max: ms(h.max()),
    }
}

fn micros(d: Duration) -> u64 {
    (d.as_micros() as u64).max(1)
}

async fn worker(id: usize, shared: Arc<Shared>, deadline: Option<Instant>) -> WorkerStats {
    let mut stats = WorkerStats::new();
    let mut conn = Buffers {
        input: Vec::with_capacity(4096),
        output: Vec::with_capacity(shared.body.len() + 1024),
        worker: id,
        seq: 0,
    };
    while shared.take_session(deadline) {
        let started = Instant::now();
        let mut stage = Stage::Connect;
        let mut marks = Marks::default();
        let outcome = tokio::time::timeout(
            shared.spec.session_timeout,
            session(&shared, &mut conn, &mut stage, &mut marks, started),
        )
        .await;
        let result = match outcome {
            Ok(r) => r,
            Err(_) => Err(Failure::Io(io::Error::from(io::ErrorKind::TimedOut))),
        };
        if let Some(c) = marks.connected {
            let _ = stats.connect.record(micros(c));
        }
        if let Some(g) = marks.greeted {
            let _ = stats.greeting.record(micros(g));
        }
        if marks.accepted {
            stats.messages += 1;
            stats.bytes += marks.bytes;
        }
        match result {
            Ok(()) => {
                stats.ok += 1;
                let _ = stats.session.record(micros(started.elapsed()));
            }
            Err(failure) => {
                stats.failed += 1;
                *stats
                    .errors
                    .entry(failure_kind(stage, &failure))
                    .or_default() += 1;
            }
        }
        shared.done.fetch_add(1, Ordering::Relaxed);
    }
    stats
}

#[derive(Default)]
struct Marks {
    connected: Option<Duration>,
    greeted: Option<Duration>,
    accepted: bool,
    bytes: u64,
}

/// A worker's reusable buffers: nothing is allocated per session once they have grown.
struct Buffers {
    input: Vec<u8>,
    output: Vec<u8>,
    worker: usize,
    seq: u64,
}

async fn session(
    shared: &Shared,
    buf: &mut Buffers,
    stage: &mut Stage,
    marks: &mut Marks,
    started: Instant,
) -> Result<(), Failure> {
    let spec = &shared.spec;
    buf.input.clear();
    let mut stream = TcpStream::connect(spec.target).await?;
    marks.connected = Some(started.elapsed());
    stream.set_nodelay(true)?;

    *stage = Stage::Greeting;
    expect(&mut stream, &mut buf.input, 220).await?;
    marks.greeted = Some(started.elapsed());

    *stage = Stage::Ehlo;
    stream
        .write_all(b"EHLO loadgen.switchyard.invalid\r\n")
        .await?;
    let ehlo = read_reply(&mut stream, &mut buf.input).await?;
    if ehlo.code != 250 {
        return Err(Failure::Code(ehlo.code));
    }
    let pipelining = spec.pipelining && ehlo.pipelining;

    buf.output.clear();
    buf.output
        .extend_from_slice(b"MAIL FROM:<loadgen@switchyard.invalid>\r\n");
    let envelope_end = buf.output.len();
    for r in 0..spec.recipients {
        push_fmt(
            &mut buf.output,
            format_args!("RCPT TO:<rcpt{r}@switchyard.invalid>\r\n"),
        );
    }
    buf.output.extend_from_slice(b"DATA\r\n");
    if pipelining {
        stream.write_all(&buf.output).await?;
        *stage = Stage::Mail;
        expect(&mut stream, &mut buf.input, 250).await?;
        *stage = Stage::Rcpt;
        for _ in 0..spec.recipients {
            expect(&mut stream, &mut buf.input, 250).await?;
        }
        *stage = Stage::Data;
        expect(&mut stream, &mut buf.input, 354).await?;
    } else {
        *stage = Stage::Mail;
        stream.write_all(&buf.output[..envelope_end]).await?;
        expect(&mut stream, &mut buf.input, 250).await?;
        *stage = Stage::Rcpt;
        let mut start = envelope_end;
        for _ in 0..spec.recipients {
            let end = start + line_len(&buf.output[start..]);
            stream.write_all(&buf.output[start..end]).await?;
            expect(&mut stream, &mut buf.input, 250).await?;
            start = end;
        }
        *stage = Stage::Data;
        stream.write_all(b"DATA\r\n").await?;
        expect(&mut stream, &mut buf.input, 354).await?;
    }

    *stage = Stage::Message;
    buf.output.clear();
    buf.seq += 1;
    push_fmt(
        &mut buf.output,
        format_args!(
            "Message-ID: <{}.{}.{}@loadgen.switchyard.invalid>\r\n",
            std::process::id(),
            buf.worker,
            buf.seq
        ),
    );
    buf.output.extend_from_slice(&shared.body);
    stream.write_all(&buf.output).await?;
    expect(&mut stream, &mut buf.input, 250).await?;
    marks.accepted = true;
    marks.bytes = buf.output.len() as u64;

    *stage = Stage::Quit;
    stream.write_all(b"QUIT\r\n").await?;
    expect(&mut stream, &mut buf.input, 221).await?;
    Ok(())
}

fn line_len(bytes: &[u8]) -> usize {
    bytes
        .iter()
        .position(|&b| b == b'\n')
        .map_or(bytes.len(), |i| i + 1)
}

fn push_fmt(out: &mut Vec<u8>, args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    // Writing into a Vec cannot fail.
    let _ = out.write_fmt(args);
}

struct Reply {
    code: u16,
    pipelining: bool,
}

async fn expect(stream: &mut TcpStream, input: &mut Vec<u8>, code: u16) -> Result<(), Failure> {
    let reply = read_reply(stream, input).await?;
    if reply.code == code {
        Ok(())
    } else {
        Err(Failure::Code(reply.code))
    }
}

/// Reads one (possibly multi-line) reply; bytes of later replies stay in `input` for the next
/// call, which is what lets pipelined replies arrive in one segment.
async fn read_reply(stream: &mut TcpStream, input: &mut Vec<u8>) -> Result<Reply, Failure> {
    let mut scanned = 0;
    let mut pipelining = false;
    loop {
        while let Some(nl) = input[scanned..].iter().position(|&b| b == b'\n') {
            let line = &input[scanned..scanned + nl + 1];
            if line.len() < 5 || !line[..3].iter().all(u8::is_ascii_digit) {
                return Err(Failure::Malformed);
            }
            let text = &line[4..];
            if text.len() >= 10 && text[..10].eq_ignore_ascii_case(b"PIPELINING") {
                pipelining = true;
            }
            scanned += nl + 1;
            match line[3] {
                b'-' => continue,
                b' ' | b'\r' => {
                    let code = (line[0] - b'0') as u16 * 100
                        + (line[1] - b'0') as u16 * 10
                        + (line[2] - b'0') as u16;
                    input.drain(..scanned);
                    return Ok(Reply { code, pipelining });
                }
                _ => return Err(Failure::Malformed),
            }
        }
        if input.len() > 64 * 1024 {
            return Err(Failure::Malformed);
        }
        let len = input.len();
        input.resize(len + 4096, 0);
        let n = stream.read(&mut input[len..]).await;
        let n = match n {
            Ok(n) => n,
            Err(e) => {
                input.truncate(len);
                return Err(e.into());
            }
        };
        input.truncate(len + n);
        if n == 0 {
            return Err(Failure::Closed);
        }
    }
}

/// The message after its Message-ID: RFC 5322 headers and a body of 76-column lines padded to
/// `size` bytes in total, dot-stuffed, CRLF, ending with the lone ".". One body line starts with
/// a dot so that every run exercises dot-stuffing.
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
    // The Message-ID line the session prepends is about 60 bytes.
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
