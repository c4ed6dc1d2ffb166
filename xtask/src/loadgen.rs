//! The SMTP load generator: concurrent workers running complete one-message SMTP sessions
//! (greeting, EHLO, MAIL, RCPT, DATA, message, QUIT) against one address, checking every reply
//! code, and the report they add up to (rates, HDR latency percentiles, errors by kind).
//!
//! Each worker owns its buffers and histograms and merges them once at the end, so the hot loop
//! shares nothing but two atomics (the session budget and the progress count). The SMTP
//! sessions themselves are the test kit's client (`testkit::smtp_client`).

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use testkit::smtp_client::{Buffers, Failure, Session, SessionOptions, Stage, Trace, message_body};

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
        Failure::Timeout => format!("timeout at {at}"),
        Failure::Closed => format!("closed by server at {at}"),
        Failure::Code(reply) => format!("unexpected code {} at {at}", reply.code),
        Failure::Malformed(_) => format!("malformed reply at {at}"),
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
    let options = SessionOptions {
        // The whole session has one timeout (below); per-step timers would only cost.
        step_timeout: None,
        ehlo: "loadgen.switchyard.invalid".into(),
        mail_from: "loadgen@switchyard.invalid".into(),
        recipients: shared.spec.recipients,
        pipelining: shared.spec.pipelining,
        ..SessionOptions::default()
    };
    let mut buffers = Some(Buffers::default());
    let mut message = Vec::with_capacity(shared.body.len() + 128);
    let mut seq = 0u64;
    let pid = std::process::id();
    while shared.take_session(deadline) {
        let started = Instant::now();
        seq += 1;
        message.clear();
        push_message_id(&mut message, pid, id, seq);
        message.extend_from_slice(&shared.body);
        let mut trace = Trace::default();
        let outcome = tokio::time::timeout(
            shared.spec.session_timeout,
            session(&shared, &options, &mut buffers, &message, &mut trace),
        )
        .await;
        let result = match outcome {
            Ok(r) => r,
            Err(_) => Err(Failure::Io(io::Error::from(io::ErrorKind::TimedOut))),
        };
        stats.record(started, &trace, result);
        shared.done.fetch_add(1, Ordering::Relaxed);
    }
    stats
}

impl WorkerStats {
    fn record(&mut self, started: Instant, trace: &Trace, result: Result<(), Failure>) {
        if let Some(c) = trace.connected {
            let _ = self.connect.record(micros(c - started));
        }
        if let Some(g) = trace.greeted {
            let _ = self.greeting.record(micros(g - started));
        }
        if let Some(bytes) = trace.accepted_bytes {
            self.messages += 1;
            self.bytes += bytes;
        }
        match result {
            Ok(()) => {
                self.ok += 1;
                let _ = self.session.record(micros(started.elapsed()));
            }
            Err(failure) => {
                self.failed += 1;
                *self
                    .errors
                    .entry(failure_kind(trace.stage, &failure))
                    .or_default() += 1;
            }
        }
    }
}

/// One session, reusing the worker's buffers (taken out and put back, so that a session the
/// timeout cancels costs only a fresh set).
async fn session(
    shared: &Shared,
    options: &SessionOptions,
    buffers: &mut Option<Buffers>,
    message: &[u8],
    trace: &mut Trace,
) -> Result<(), Failure> {
    let reused = buffers.take().unwrap_or_default();
    let mut session = Session::open_traced(shared.spec.target, options, reused, trace)
        .await
        .map_err(|e| e.failure)?;
    let done = async {
        session.transaction(options, message, trace).await?;
        trace.stage = Stage::Quit;
        session.quit().await
    }
    .await;
    *buffers = Some(session.into_buffers());
    done.map_err(|e| e.failure)
}

fn push_message_id(out: &mut Vec<u8>, pid: u32, worker: usize, seq: u64) {
    use std::io::Write;
    // Writing into a Vec cannot fail.
    let _ = write!(
        out,
        "Message-ID: <{pid}.{worker}.{seq}@loadgen.switchyard.invalid>\r\n"
    );
}
