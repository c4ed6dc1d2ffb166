//! Active health checks (tcp, smtp) per backend, feeding each backend's `HealthState`, and
//! for `kind = "none"` the end of a hold-down (see `HealthState` for what brings a backend
//! back under each kind). A check's outcome counts only under the state it started in.
//!
//! A `tcp` check connects only, except while live traffic keeps the backend down for want of a
//! positive greeting: a connect proves nothing then, so the check also reads the greeting (and
//! says QUIT), until the backend is back.
//!
//! The SMTP check behaves as a well-mannered client, because real MTAs log every rude one:
//! it waits for the greeting before speaking, sends one command at a time, and always ends
//! with QUIT. When the service sends PROXY headers the check sends one too (LOCAL / UNKNOWN),
//! so an MTA that requires the header does not reject or log the check as broken.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout_at};
use tokio_util::sync::CancellationToken;

use crate::config::{HealthConfig, HealthKind, ProxyProtocol};
use crate::events;
use crate::limits::{self, Site};
use crate::loops;
use crate::proxy_protocol;
use crate::smtp;
use crate::state::{Backend, CheckRecord, Service};

/// Spawns one check loop per backend of `service` on the current runtime (for
/// `kind = "none"`, one loop that ends hold-downs and never connects); loops end when `stop` is
/// cancelled.
pub fn spawn_checks(service: Arc<Service>, stop: CancellationToken) {
    if service.config.health.kind == HealthKind::None {
        for backend in &service.backends {
            tokio::spawn(hold_down_loop(
                service.clone(),
                backend.clone(),
                stop.clone(),
            ));
        }
        return;
    }
    let count = service.backends.len() as u32;
    let interval = service.config.health.interval;
    let now = Instant::now();
    for (index, backend) in service.backends.iter().enumerate() {
        // A disabled backend is not checked (`ctl disable`); `enable` starts its checks again.
        if backend.runtime.disabled {
            continue;
        }
        // Staggered by index so that checks of one service do not hit the pool all at once;
        // after a reload, each backend keeps the rhythm its last check set.
        let offset = interval / count.max(1) * index as u32;
        let first = match &*backend.live.last_check.lock() {
            Some(last) => Instant::from_std(last.started + interval).max(now),
            None => now + offset,
        };
        tokio::spawn(check_loop(
            service.clone(),
            backend.clone(),
            first,
            stop.clone(),
        ));
    }
}

async fn check_loop(
    service: Arc<Service>,
    backend: Arc<Backend>,
    first: Instant,
    stop: CancellationToken,
) {
    let health = &service.config.health;
    let proxy = service.config.proxy_protocol;
    let mut next = first;
    // Our own streak, for the log line; HealthState decides the state.
    let mut streak = 0u32;
    let mut last_ok: Option<bool> = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep_until(next) => {}
        }
        next += health.interval;
        let (generation, read_greeting) = backend.live.health.begin_check();
        let kind = match (health.kind, read_greeting) {
            (HealthKind::Tcp, true) => CheckKind::Greeting,
            (HealthKind::Tcp, false) => CheckKind::Connect,
            _ => CheckKind::Smtp,
        };
        let started = std::time::Instant::now();
        let result = tokio::select! {
            _ = stop.cancelled() => return,
            result = check(health, kind, proxy, backend.config.address) => result,
        };
        // Could not even open the check's connection: says nothing about the backend.
        let result = match result {
            Err(CheckFailed::Local(error)) => {
                limits::OWN_EXHAUSTION.record(Site::HealthCheck, &error);
                continue;
            }
            Err(CheckFailed::Backend(reason)) => Err(reason),
            Ok(latency) => Ok(latency),
        };
        let ok = result.is_ok();
        // Counted as checks, never as sessions (`/metrics` keeps the two apart).
        backend.live.checks.record(started.elapsed());
        if !ok {
            backend
                .live
                .checks_failed
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        *backend.live.last_check.lock() = Some(CheckRecord {
            ok,
            started,
            ended: std::time::SystemTime::now(),
            detail: match &result {
                Ok(latency) => format!("passed in {} ms", latency.as_millis()),
                Err(reason) => reason.clone(),
            },
        });
        if last_ok != Some(ok) {
            streak = 0;
        }
        streak += 1;
        last_ok = Some(ok);
        match &result {
            Ok(latency) => {
                backend.record_response(u32::try_from(latency.as_micros()).unwrap_or(u32::MAX))
            }
            Err(reason) => tracing::debug!(
                "health check of backend {} of service {} failed: {reason}",
                backend.config.name,
                service.config.name
            ),
        }
        let (service_name, backend_name) = (&service.config.name, &backend.config.name);
        match (backend.live.health.record_check(generation, ok), result) {
            (Some(true), _) => events::backend_up(
                service_name,
                backend_name,
                format!("{streak} consecutive successful {} checks", kind.name()),
            ),
            (Some(false), Err(reason)) => events::backend_down(
                service_name,
                backend_name,
                format!("{reason} ({streak} consecutive failures)"),
            ),
            _ => {}
        }
        // A check that ran long (timeouts) must not cause a burst of catch-up checks.
        let now = Instant::now();
        if next < now {
            next = now + health.interval;
        }
    }
}

/// With `kind = "none"` nothing checks a backend: one that live traffic took down comes back
/// when its hold-down ends (looked at once per `interval`).
async fn hold_down_loop(service: Arc<Service>, backend: Arc<Backend>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(service.config.health.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        if backend.live.health.end_hold_down(std::time::Instant::now()) == Some(true) {
            let why = format!(
                "held down {:?} after failures on live traffic; kind none runs no checks",
                backend.live.health.hold_down()
            );
            events::backend_up(&service.config.name, &backend.config.name, why);
        }
    }
}

/// What one check does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CheckKind {
    /// `smtp`: greeting, EHLO, QUIT.
    Smtp,
    /// `tcp`: the connect only.
    Connect,
    /// `tcp` while live traffic keeps the backend down for want of a greeting: greeting, QUIT.
    Greeting,
}

impl CheckKind {
    fn name(self) -> &'static str {
        match self {
            CheckKind::Smtp => "smtp",
            CheckKind::Connect => "tcp",
            CheckKind::Greeting => "tcp (greeting)",
        }
    }
}

/// Why a check did not pass.
#[derive(Debug)]
enum CheckFailed {
    /// The backend failed it; the reason is for the log.
    Backend(String),
    /// Switchyard could not open the connection (out of descriptors, memory, local ports).
    Local(std::io::Error),
}

impl std::fmt::Display for CheckFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CheckFailed::Backend(reason) => f.write_str(reason),
            CheckFailed::Local(error) => write!(f, "cannot open a connection: {error}"),
        }
    }
}

impl From<String> for CheckFailed {
    fn from(reason: String) -> Self {
        CheckFailed::Backend(reason)
    }
}

/// Runs one check, bounded by `health.timeout` as a whole; on success returns the connect +
/// greeting latency (connect only for a connect check), on failure a reason for the log.
async fn check(
    health: &HealthConfig,
    kind: CheckKind,
    proxy: ProxyProtocol,
    address: SocketAddr,
) -> Result<Duration, CheckFailed> {
    let started = Instant::now();
    let deadline = started + health.timeout;
    // Recognisable should the backend address lead back to our own listener.
    let (mut stream, _outgoing) = match timeout_at(deadline, loops::connect(address)).await {
        Err(_) => return Err(format!("connect timed out after {:?}", health.timeout).into()),
        Ok(Err(error)) if limits::is_local_exhaustion(&error) => {
            return Err(CheckFailed::Local(error));
        }
        Ok(Err(error)) => return Err(format!("connect failed: {error}").into()),
        Ok(Ok(connected)) => connected,
    };
    let _ = stream.set_nodelay(true);
    let header = check_proxy_header(proxy, &stream);
    if !header.is_empty() {
        step(deadline, "sending PROXY header", stream.write_all(&header)).await?;
    }
    match kind {
        CheckKind::Smtp => {
            Ok(smtp_conversation(&mut stream, &health.ehlo, started, deadline).await?)
        }
        CheckKind::Greeting => {
            let latency = greeting(&mut stream, started, deadline).await?;
            quit(&mut stream, deadline).await?;
            Ok(latency)
        }
        CheckKind::Connect => Ok(started.elapsed()),
    }
}

/// The PROXY header of a check connection. v2 says LOCAL, as the specification intends for a
/// proxy's own connections. v1's `PROXY UNKNOWN` is in the specification too, but Postfix (3.7)
/// rejects it ("haproxy read: bad or missing protocol type") and answers 421, which would fail
/// every check; so a v1 check announces its own connection's addresses truthfully instead, which
/// every receiver accepts. `UNKNOWN` remains the fallback when the addresses are not available.
fn check_proxy_header(proxy: ProxyProtocol, stream: &TcpStream) -> Vec<u8> {
    match (proxy, stream.local_addr(), stream.peer_addr()) {
        (ProxyProtocol::V1, Ok(ours), Ok(theirs)) => proxy_protocol::header(proxy, ours, theirs),
        _ => proxy_protocol::health_check_header(proxy),
    }
}

/// Greeting, EHLO, QUIT — strictly in turn.
async fn smtp_conversation(
    stream: &mut TcpStream,
    ehlo: &str,
    started: Instant,
    deadline: Instant,
) -> Result<Duration, String> {
    let latency = greeting(stream, started, deadline).await?;
    let command = format!("EHLO {ehlo}\r\n");
    step(
        deadline,
        "sending EHLO",
        stream.write_all(command.as_bytes()),
    )
    .await?;
    let reply = step(
        deadline,
        "waiting for EHLO reply",
        smtp::read_tcp_reply(stream),
    )
    .await?;
    if reply.code != 250 {
        quit_politely(stream, deadline).await;
        return Err(format!("EHLO answered {} {}", reply.code, reply.text()));
    }
    quit(stream, deadline).await?;
    Ok(latency)
}

/// Waits for a `220` greeting; returns the latency since `started`. Any other greeting is a
/// failure, after a polite QUIT.
async fn greeting(
    stream: &mut TcpStream,
    started: Instant,
    deadline: Instant,
) -> Result<Duration, String> {
    let greeting = step(
        deadline,
        "waiting for greeting",
        smtp::read_tcp_reply(stream),
    )
    .await?;
    let latency = started.elapsed();
    if greeting.code != 220 {
        quit_politely(stream, deadline).await;
        return Err(format!("greeting {} {}", greeting.code, greeting.text()));
    }
    Ok(latency)
}

/// QUIT, expecting `221`.
async fn quit(stream: &mut TcpStream, deadline: Instant) -> Result<(), String> {
    step(deadline, "sending QUIT", stream.write_all(b"QUIT\r\n")).await?;
    let reply = step(
        deadline,
        "waiting for QUIT reply",
        smtp::read_tcp_reply(stream),
    )
    .await?;
    if reply.code != 221 {
        return Err(format!("QUIT answered {} {}", reply.code, reply.text()));
    }
    Ok(())
}

/// Ends a failed conversation with QUIT rather than a bare close, and gives the server the
/// chance to answer; errors are irrelevant here (a 421 server may already have hung up).
async fn quit_politely(stream: &mut TcpStream, deadline: Instant) {
    let _ = timeout_at(deadline, async {
        stream.write_all(b"QUIT\r\n").await?;
        smtp::read_tcp_reply(stream).await
    })
    .await;
}

/// Awaits one step of a check before the deadline, naming the step in the failure reason.
async fn step<T, E: std::fmt::Display>(
    deadline: Instant,
    what: &str,
    fut: impl Future<Output = Result<T, E>>,
) -> Result<T, String> {
    match timeout_at(deadline, fut).await {
        Err(_) => Err(format!("timed out {what}")),
        Ok(Err(e)) => Err(format!("{what}: {e:#}")),
        Ok(Ok(v)) => Ok(v),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
    use tokio::net::TcpListener;

    fn cfg(kind: HealthKind) -> HealthConfig {
        HealthConfig {
            kind,
            interval: Duration::from_millis(100),
            timeout: Duration::from_millis(500),
            rise: 2,
            fall: 2,
            ehlo: "switchyard.invalid".into(),
        }
    }

    /// One check of `kind` without a PROXY header.
    async fn check_plain(kind: CheckKind, addr: SocketAddr) -> Result<Duration, CheckFailed> {
        let health = match kind {
            CheckKind::Connect => HealthKind::Tcp,
            CheckKind::Smtp | CheckKind::Greeting => HealthKind::Smtp,
        };
        check(&cfg(health), kind, ProxyProtocol::None, addr).await
    }

    /// One SMTP conversation on a real socket; returns everything the client sent, line by
    /// line, with a flag saying whether the client spoke before our greeting.
    async fn serve_one(
        listener: &TcpListener,
        greeting: &'static str,
        proxy_len: usize,
    ) -> (Vec<u8>, Vec<String>) {
        let (stream, _) = listener.accept().await.unwrap();
        let mut reader = BufReader::new(stream);
        let mut header = vec![0u8; proxy_len];
        reader.read_exact(&mut header).await.unwrap();
        // Nothing else may arrive before the greeting.
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(
            reader.buffer().is_empty(),
            "client spoke before the greeting"
        );
        let early = tokio::time::timeout(Duration::from_millis(1), reader.fill_buf()).await;
        assert!(early.is_err(), "client spoke before the greeting");
        reader
            .get_mut()
            .write_all(greeting.as_bytes())
            .await
            .unwrap();
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).await.unwrap() == 0 {
                break;
            }
            // One command at a time: nothing must be queued behind this one.
            assert!(
                reader.buffer().is_empty(),
                "client pipelined after {line:?}"
            );
            let answer: &[u8] = if line.starts_with("EHLO") {
                b"250-mx.test\r\n250 PIPELINING\r\n"
            } else if line.starts_with("QUIT") {
                b"221 bye\r\n"
            } else {
                b"500 what\r\n"
            };
            lines.push(line);
            reader.get_mut().write_all(answer).await.unwrap();
        }
        (header, lines)
    }

    #[tokio::test]
    async fn smtp_check_conversation() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move { serve_one(&listener, "220 ready\r\n", 0).await });
        let latency = check_plain(CheckKind::Smtp, addr).await.unwrap();
        assert!(latency >= Duration::from_millis(30));
        let (_, lines) = server.await.unwrap();
        assert_eq!(lines, ["EHLO switchyard.invalid\r\n", "QUIT\r\n"]);
    }

    #[tokio::test]
    async fn smtp_check_sends_proxy_header_first() {
        for version in [ProxyProtocol::V1, ProxyProtocol::V2] {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            // v1: "PROXY TCP4 127.0.0.1 127.0.0.1 " + 5-digit-or-shorter ports; read up to LF.
            let len = match version {
                ProxyProtocol::V2 => 16,
                _ => 0,
            };
            let server = tokio::spawn(async move {
                if len == 0 {
                    let (stream, peer) = listener.accept().await.unwrap();
                    let mut reader = BufReader::new(stream);
                    let mut line = String::new();
                    reader.read_line(&mut line).await.unwrap();
                    let want = format!(
                        "PROXY TCP4 127.0.0.1 127.0.0.1 {} {}\r\n",
                        peer.port(),
                        addr.port()
                    );
                    assert_eq!(line, want);
                    reader.get_mut().write_all(b"421 nope\r\n").await.unwrap();
                    return None;
                }
                Some(serve_one(&listener, "220 ready\r\n", len).await)
            });
            let result = check(&cfg(HealthKind::Smtp), CheckKind::Smtp, version, addr).await;
            match server.await.unwrap() {
                Some((header, lines)) => {
                    result.unwrap();
                    assert_eq!(header, proxy_protocol::health_check_header(version));
                    assert_eq!(lines, ["EHLO switchyard.invalid\r\n", "QUIT\r\n"]);
                }
                None => assert_eq!(result.unwrap_err().to_string(), "greeting 421 nope"),
            }
        }
    }

    #[tokio::test]
    async fn bad_greeting_fails_but_still_quits() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server =
            tokio::spawn(async move { serve_one(&listener, "421 4.3.2 busy\r\n", 0).await });
        let err = check_plain(CheckKind::Smtp, addr).await.unwrap_err();
        assert_eq!(err.to_string(), "greeting 421 4.3.2 busy");
        let (_, lines) = server.await.unwrap();
        assert_eq!(lines, ["QUIT\r\n"]);
    }

    #[tokio::test]
    async fn silent_server_times_out_and_refused_fails() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let started = Instant::now();
        let err = check_plain(CheckKind::Smtp, addr).await.unwrap_err();
        assert_eq!(err.to_string(), "timed out waiting for greeting");
        assert!(started.elapsed() < Duration::from_secs(2));
        // The tcp check only needs the connect.
        check_plain(CheckKind::Connect, addr).await.unwrap();
        drop(listener);
        let err = check_plain(CheckKind::Connect, addr).await.unwrap_err();
        assert!(err.to_string().starts_with("connect failed"), "{err}");
    }
}
