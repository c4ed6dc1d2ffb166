//! One client session from accept to close: the set-up (choose a backend, send the PROXY
//! header, wait for its greeting, failing over on connect errors, timeouts and 4xx/5xx
//! greetings), then the hand-over to the byte relay (`relay`), or a polite `421` when nothing
//! can serve the client.
//!
//! The client is watched from accept until the relay starts: if it leaves while a backend is
//! being connected or greeted (failover and the PROXY header included), the set-up is dropped at
//! once, which closes the backend connection in progress and frees the client's
//! `max_connections` slot and the backend's active count. Leaving means a reset, or an end of
//! stream with nothing sent before it. Bytes a client sends early (pipelining before the
//! greeting) are only peeked at, never read, so the backend still gets them; after such bytes
//! only a reset counts as leaving, since a FIN behind a command is a client that still expects
//! the answers. Watching costs nothing while the client waits quietly: its socket's readiness
//! is already tracked by tokio, and the peek runs only when the client does something.
//! Abandoning an attempt is not a failure of the backend: passive health is not told.
//!
//! A session's task lives as long as the session, so its size is memory per idle session: the
//! set-up, which needs far more state than the relay, runs boxed and is freed once the backend
//! has greeted, and the rare paths (rejecting, cutting off at shutdown) are boxed too.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use tokio::io::{AsyncWriteExt, Interest, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::config::ProxyProtocol;
use crate::counters::ActiveGuard;
use crate::events;
use crate::limits::{self, Site};
use crate::loops;
use crate::proxy_protocol;
use crate::reject::{drain, reject};
use crate::relay::relay;
use crate::sessions;
use crate::smtp;
use crate::sources::SourceGuard;
use crate::state::{Backend, Generation, Observation, Service};
use crate::tallies::{FailureReason, Refusal};

/// What a client is told when nothing can serve it (RFC 3463: 4.3.2 "system not accepting
/// network messages"); a temporary failure, so a sending MTA queues and retries.
pub const SERVICE_UNAVAILABLE: &[u8] = b"421 4.3.2 Service not available\r\n";

/// How long a polite close may wait for the peer (to read our last words, or to answer QUIT).
const LINGER: Duration = Duration::from_secs(2);

/// Holds one unit of `service.sessions` (the per-service `max_connections` count).
pub struct SessionSlot {
    service: Arc<Service>,
    /// The client's unit of its source's count (when the service limits sources).
    _source: Option<SourceGuard>,
}

impl SessionSlot {
    /// Takes a slot unless the service is at `max_connections` (0 = unlimited).
    pub fn try_acquire(service: &Arc<Service>, source: Option<SourceGuard>) -> Option<SessionSlot> {
        let max = service.config.max_connections;
        let previous = service.counts.sessions.fetch_add(1, Ordering::AcqRel);
        if max != 0 && previous >= max {
            service.counts.sessions.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        service.counts.accepted.fetch_add(1, Ordering::Relaxed);
        Some(SessionSlot {
            service: service.clone(),
            _source: source,
        })
    }
}

impl Drop for SessionSlot {
    fn drop(&mut self) {
        self.service.counts.sessions.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Runs one client session to its end. `stop` cuts it short (end of the shutdown grace time).
pub async fn run(
    service: Arc<Service>,
    slot: SessionSlot,
    client: TcpStream,
    client_addr: SocketAddr,
    stop: CancellationToken,
) {
    let started = Instant::now();
    // Scoped, so that none of the set-up's state stays in the task while it relays.
    let Upstream {
        backend,
        _active,
        stream: server,
        greeting,
    } = match Box::pin(set_up_unless_stopped(&service, &client, client_addr, &stop)).await {
        Ok(upstream) => upstream,
        Err(SetUpFailed::Stopped) => return,
        Err(SetUpFailed::ClientLeft) => {
            debug!(client = %client_addr, service = %service.config.name, "client left before a backend greeted");
            return;
        }
        Err(SetUpFailed::Refused(why)) => {
            debug!(client = %client_addr, service = %service.config.name, "no backend available ({}): 421", why.label());
            service.counts.refused.record(why);
            Box::pin(reject_unless_stopped(client, stop)).await;
            return;
        }
        Err(SetUpFailed::Client(error)) => {
            debug!(client = %client_addr, "{error:#}");
            return;
        }
    };
    // Checked again before anything is relayed (the accept path checked first): a loop
    // connection accepted in the instant before its originator registered it is known by now,
    // because its originator still waits for this very greeting.
    if loops::is_own_connection(&client, client_addr) {
        loops::report_refused(&service.config.name, client_addr);
        return;
    }
    let idle = service.config.idle_timeout;
    // Listed for `ctl sessions` while it relays; the entry takes the handles by move.
    let registered = sessions::Registered::new(service, backend, started, &client);
    let result = tokio::select! {
        _ = stop.cancelled() => Err(anyhow!("cut off at shutdown")),
        result = relay(&client, &server, greeting, idle, registered.tally()) => result.map_err(anyhow::Error::from),
    };
    let Some(ended) = registered.end() else {
        return;
    };
    ended
        .backend
        .live
        .bytes
        .add(ended.to_backend, ended.to_client);
    // The client's address is asked again only when debug logging wants it: keeping it for
    // the whole session would cost every idle session its bytes
    // (tracing evaluates these fields only when the event is enabled).
    let backend = &ended.backend.config.name;
    match result {
        Ok(()) => {
            debug!(client = ?client.peer_addr().ok(), %backend, elapsed = ?ended.started.elapsed(), "session closed")
        }
        Err(error) => {
            debug!(client = ?client.peer_addr().ok(), %backend, "session ended: {error:#}")
        }
    }
    drop(_active);
    drop(slot);
}

/// [`reject`], unless shutdown cuts it short.
async fn reject_unless_stopped(client: TcpStream, stop: CancellationToken) {
    tokio::select! {
        _ = stop.cancelled() => {}
        _ = reject(client, SERVICE_UNAVAILABLE) => {}
    }
}

/// [`set_up`], unless shutdown cuts it short or the client leaves. A backend that greets in
/// the same turn as the client leaves wins: the relay then passes the client's end on to it.
async fn set_up_unless_stopped(
    service: &Arc<Service>,
    client: &TcpStream,
    client_addr: SocketAddr,
    stop: &CancellationToken,
) -> Result<Upstream, SetUpFailed> {
    tokio::select! {
        biased;
        _ = stop.cancelled() => Err(SetUpFailed::Stopped),
        connected = set_up(service, client, client_addr) => connected,
        () = client_left(client) => Err(SetUpFailed::ClientLeft),
    }
}

/// Resolves once the client has left (see the module docs for what counts). Registers on the
/// socket's readiness, so nothing runs until the client sends something or closes.
async fn client_left(client: &TcpStream) {
    // By hand rather than `TcpStream::peek`: the set-up's box is smaller without its future.
    let sent_early = std::future::poll_fn(|cx| {
        let mut probe = [0u8; 1];
        let mut probe = ReadBuf::new(&mut probe);
        client
            .poll_peek(cx, &mut probe)
            .map(|peeked| matches!(peeked, Ok(1..)))
    })
    .await;
    if sent_early {
        // Early bytes stay in the socket for the backend; from now on only a reset counts.
        let _ = client.ready(Interest::ERROR).await;
    }
}

/// Why a session never reached the relay.
enum SetUpFailed {
    /// Shutdown cut it short.
    Stopped,
    /// The client closed or reset its connection before a backend greeted.
    ClientLeft,
    /// No backend greeted positively (or the balancer could not connect): the client gets
    /// `421`.
    Refused(Refusal),
    /// Something about the client's own connection.
    Client(anyhow::Error),
}

/// Everything before the relay: the PROXY header, then a backend that greeted positively.
async fn set_up(
    service: &Arc<Service>,
    client: &TcpStream,
    client_addr: SocketAddr,
) -> Result<Upstream, SetUpFailed> {
    let header = proxy_header(service, client, client_addr).map_err(SetUpFailed::Client)?;
    connect_any(service, client_addr.ip(), &header)
        .await
        .map_err(SetUpFailed::Refused)
}

/// The PROXY header this session's backends get; the local address is only asked of the
/// kernel when a header needs it.
fn proxy_header(
    service: &Service,
    client: &TcpStream,
    client_addr: SocketAddr,
) -> anyhow::Result<Vec<u8>> {
    if service.config.proxy_protocol == ProxyProtocol::None {
        return Ok(Vec::new());
    }
    let local_addr = client.local_addr().context("reading the local address")?;
    Ok(proxy_protocol::header(
        service.config.proxy_protocol,
        client_addr,
        local_addr,
    ))
}

/// A backend connection that has greeted positively, with its count held.
struct Upstream {
    backend: Arc<Backend>,
    _active: ActiveGuard,
    stream: TcpStream,
    /// The greeting and any bytes that arrived after it, to be relayed to the client first.
    greeting: Vec<u8>,
}

/// Picks backends until one greets positively, trying up to `retries` more after failures.
async fn connect_any(
    service: &Arc<Service>,
    client_ip: IpAddr,
    header: &[u8],
) -> Result<Upstream, Refusal> {
    let mut excluded: Vec<usize> = Vec::new();
    let mut failures = 0u32;
    // Each round excludes one more backend, so this ends; the bound is belt and braces.
    for _ in 0..service.backends.len() {
        let index = service
            .pick(client_ip, &excluded)
            .ok_or(Refusal::NoBackend)?;
        if excluded.contains(&index) {
            return Err(Refusal::NoBackend);
        }
        excluded.push(index);
        let backend = &service.backends[index];
        // Full since it was picked: not a failure, just look elsewhere.
        let Some(active) = backend.active.try_acquire(backend.config.max_connections) else {
            continue;
        };
        // At its `max_session_rate`: another backend takes this session.
        if !backend.take_session_rate() {
            continue;
        }
        match greet(service, backend, header).await {
            Ok((stream, greeting, took)) => {
                // Also the count of sessions assigned to it.
                backend.live.setup.record(took);
                return Ok(Upstream {
                    backend: backend.clone(),
                    _active: active,
                    stream,
                    greeting,
                });
            }
            // Our own descriptors or memory ran out: another backend would fare no better.
            Err(Failure::Local) => return Err(Refusal::Exhausted),
            Err(failure) => {
                drop(active);
                failures += 1;
                let more = failures <= service.config.retries;
                warn!(
                    service = %service.config.name,
                    backend = %backend.config.name,
                    "{failure:#}; {}",
                    if more { "trying another backend" } else { "no retries left" }
                );
                if !more {
                    return Err(Refusal::NoBackend);
                }
            }
        }
    }
    Err(Refusal::NoBackend)
}

/// Why a backend did not take a session.
#[derive(Debug)]
enum Failure {
    /// The connect failed or timed out.
    Unreachable(FailureReason, anyhow::Error),
    /// Connected, but the PROXY header could not be sent, or no greeting came in time, or the
    /// connection ended before it.
    NoGreeting(FailureReason, anyhow::Error),
    /// The backend answered, but with a 4xx/5xx greeting (e.g. a busy Postfix's 421).
    Refused(anyhow::Error),
    /// Switchyard itself ran out of descriptors or memory: no fault of the backend's.
    Local,
}

impl Failure {
    /// What passive health learns from it: nothing from the balancer's own trouble.
    fn observation(&self) -> Option<Observation> {
        match self {
            Failure::Unreachable(..) => Some(Observation::Unreachable),
            Failure::NoGreeting(..) | Failure::Refused(_) => Some(Observation::NoGreeting),
            Failure::Local => None,
        }
    }

    /// The reason `/metrics` counts it under; none for the balancer's own trouble.
    fn reason(&self) -> Option<FailureReason> {
        match self {
            Failure::Unreachable(reason, _) | Failure::NoGreeting(reason, _) => Some(*reason),
            Failure::Refused(_) => Some(FailureReason::GreetingRefused),
            Failure::Local => None,
        }
    }

    /// An error as `failure` of the backend's, unless it is the balancer's own lack of
    /// descriptors, memory or ports (counted as such).
    fn of_backend_unless_local(
        failure: fn(FailureReason, anyhow::Error) -> Failure,
        reason: FailureReason,
    ) -> impl Fn(anyhow::Error) -> Failure {
        move |error| match limits::exhaustion_in(&error) {
            Some(exhausted) => {
                limits::OWN_EXHAUSTION.record(Site::Connect, exhausted);
                Failure::Local
            }
            None => failure(reason, error),
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Unreachable(_, why) | Failure::NoGreeting(_, why) | Failure::Refused(why) => {
                write!(f, "{why:#}")
            }
            Failure::Local => f.write_str("out of local resources"),
        }
    }
}

/// Connects to `backend`, sends the PROXY header, and waits for a positive greeting; what
/// happened is passive health's to know. Gives the stream, the bytes for the client and how
/// long connect and greeting took.
async fn greet(
    service: &Service,
    backend: &Backend,
    header: &[u8],
) -> Result<(TcpStream, Vec<u8>, Duration), Failure> {
    let generation = backend.live.health.generation();
    let started = Instant::now();
    let result = reach(service, backend.config.address, header).await;
    // One clock read for both the health verdict and the response time.
    let finished = Instant::now();
    let seen = match &result {
        Ok(_) => Some(Observation::Greeted),
        Err(failure) => failure.observation(),
    };
    if let Some(seen) = seen {
        observe(service, backend, generation, seen, &result, finished);
    }
    let (stream, greeting, talked_ahead) = result?;
    let took = finished - started;
    backend.record_response(u32::try_from(took.as_micros()).unwrap_or(u32::MAX));
    let mut bytes = greeting;
    // A backend that talks ahead of the client (rare) must not lose those bytes.
    bytes.extend_from_slice(&talked_ahead);
    Ok((stream, bytes, took))
}

/// Tells passive health what an attempt that started under `generation` saw, and logs the
/// backend going down if that did it.
fn observe<T>(
    service: &Service,
    backend: &Backend,
    generation: Generation,
    seen: Observation,
    result: &Result<T, Failure>,
    now: Instant,
) {
    let health = &backend.live.health;
    if let Err(failure) = result
        && let Some(reason) = failure.reason()
    {
        backend.live.failure_reasons.record(reason);
    }
    if health.record_live(generation, seen, now) == Some(false)
        && let Err(failure) = result
    {
        let why = format!(
            "{failure:#} ({} consecutive failures, last on live traffic)",
            service.config.health.fall
        );
        events::backend_down(&service.config.name, &backend.config.name, why);
    }
}

/// The TCP connection, the PROXY header, the greeting: a backend stream with its positive
/// greeting and any bytes the backend sent after it, or why not. A refused backend is sent
/// QUIT on the way out.
async fn reach(
    service: &Service,
    address: SocketAddr,
    header: &[u8],
) -> Result<(TcpStream, Vec<u8>, Vec<u8>), Failure> {
    let timeout = service.config.connect_timeout;
    // Recognisable while it waits for the greeting, should it come back to our listener.
    let (mut stream, _outgoing) = tokio::time::timeout(timeout, loops::connect(address))
        .await
        .map_err(|_| {
            Failure::Unreachable(
                FailureReason::ConnectTimeout,
                anyhow!("connect to {address} timed out after {timeout:?}"),
            )
        })?
        .with_context(|| format!("connect to {address}"))
        .map_err(Failure::of_backend_unless_local(
            Failure::Unreachable,
            FailureReason::ConnectError,
        ))?;
    let _ = stream.set_nodelay(true);
    let timeout = service.config.greeting_timeout;
    let (greeting, talked_ahead) = tokio::time::timeout(timeout, async {
        if !header.is_empty() {
            stream
                .write_all(header)
                .await
                .context("sending PROXY header")?;
        }
        smtp::read_greeting(&stream).await
    })
    .await
    .map_err(|_| {
        Failure::NoGreeting(
            FailureReason::GreetingTimeout,
            anyhow!("no greeting from {address} within {timeout:?}"),
        )
    })?
    .with_context(|| format!("greeting from {address}"))
    .map_err(Failure::of_backend_unless_local(
        Failure::NoGreeting,
        FailureReason::GreetingError,
    ))?;
    if !greeting.is_positive() {
        // Take leave as SMTP expects, without making the client wait for it.
        tokio::spawn(quit_politely(stream));
        return Err(Failure::Refused(anyhow!(
            "{address} greeted with {}",
            greeting.code
        )));
    }
    Ok((stream, greeting.raw, talked_ahead))
}

/// Sends QUIT to a backend we are leaving, reads its answer briefly, and closes.
async fn quit_politely(mut stream: TcpStream) {
    if tokio::time::timeout(LINGER, stream.write_all(b"QUIT\r\n"))
        .await
        .is_ok()
    {
        let _ = stream.shutdown().await;
        drain(&mut stream).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    /// A connected pair over loopback: (ours, the client's end).
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (accepted.expect("accept").0, client.expect("connect"))
    }

    /// Whether `client_left` resolves within `limit`.
    async fn left_within(ours: &TcpStream, limit: Duration) -> bool {
        tokio::time::timeout(limit, client_left(ours)).await.is_ok()
    }

    fn reset(stream: TcpStream) {
        let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
        drop(stream);
    }

    #[tokio::test]
    async fn a_quiet_client_has_not_left() {
        let (ours, _client) = pair().await;
        assert!(!left_within(&ours, Duration::from_millis(100)).await);
    }

    #[tokio::test]
    async fn a_close_or_a_reset_is_leaving() {
        let (ours, client) = pair().await;
        drop(client);
        assert!(left_within(&ours, Duration::from_secs(5)).await, "FIN");
        let (ours, client) = pair().await;
        reset(client);
        assert!(left_within(&ours, Duration::from_secs(5)).await, "RST");
    }

    #[tokio::test]
    async fn early_bytes_stay_for_the_backend_and_only_a_reset_ends_them() {
        let (ours, mut client) = pair().await;
        client.write_all(b"EHLO early\r\n").await.expect("write");
        client.shutdown().await.expect("FIN after a command");
        assert!(
            !left_within(&ours, Duration::from_millis(200)).await,
            "a FIN behind a command is not leaving"
        );
        let mut got = Vec::new();
        let mut ours = ours;
        ours.read_to_end(&mut got).await.expect("read");
        assert_eq!(got, b"EHLO early\r\n", "the watch consumed client bytes");

        let (ours, mut client) = pair().await;
        client.write_all(b"EHLO early\r\n").await.expect("write");
        tokio::time::sleep(Duration::from_millis(50)).await;
        let watching =
            tokio::spawn(async move { left_within(&ours, Duration::from_secs(5)).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        reset(client);
        assert!(
            watching.await.expect("watch task"),
            "a reset after a command is leaving"
        );
    }
}
