//! One client session: choose a backend, wait for its greeting (failing over on connect errors,
//! timeouts and 4xx/5xx greetings), then relay bytes both ways until close or idle timeout.
//!
//! Memory per session is kept small on purpose: the relay owns no buffer while idle. It waits
//! for readiness, reads into its thread's copy buffer inside a plain (non-async) function, and
//! only when the destination cannot take everything does it keep the rest in a heap buffer of
//! its own until written (about 2.8 KiB of RSS per idle session, measured with 5000).

use std::cell::RefCell;
use std::io::{self, ErrorKind, Read};
use std::net::{IpAddr, Shutdown, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use socket2::SockRef;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, Interest};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::config::ProxyProtocol;
use crate::counters::ActiveGuard;
use crate::proxy_protocol;
use crate::smtp;
use crate::state::{Backend, Service};

/// What a client is told when nothing can serve it (RFC 3463: 4.3.2 "system not accepting
/// network messages"); a temporary failure, so a sending MTA queues and retries.
pub const SERVICE_UNAVAILABLE: &[u8] = b"421 4.3.2 Service not available\r\n";

/// Bytes moved per read.
const COPY_CHUNK: usize = 16 * 1024;

/// How long a polite close may wait for the peer (to read our last words, or to answer QUIT).
const LINGER: Duration = Duration::from_secs(2);

/// Holds one unit of `service.sessions` (the per-service `max_connections` count).
pub struct SessionSlot {
    service: Arc<Service>,
}

impl SessionSlot {
    /// Takes a slot unless the service is at `max_connections` (0 = unlimited).
    pub fn try_acquire(service: &Arc<Service>) -> Option<SessionSlot> {
        let max = service.config.max_connections;
        let previous = service.sessions.fetch_add(1, Ordering::AcqRel);
        if max != 0 && previous >= max {
            service.sessions.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(SessionSlot {
            service: service.clone(),
        })
    }
}

impl Drop for SessionSlot {
    fn drop(&mut self) {
        self.service.sessions.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Tells the client `421 4.3.2` and closes gracefully: our reply, then FIN, then discarding
/// whatever the client still sends until it closes too, so the kernel never answers with a
/// reset that could swallow the reply.
pub async fn reject(mut client: TcpStream) {
    let _ = tokio::time::timeout(LINGER, client.write_all(SERVICE_UNAVAILABLE)).await;
    let _ = client.shutdown().await;
    drain(&mut client).await;
}

/// Reads and discards until EOF, an error, or `LINGER`.
async fn drain(stream: &mut TcpStream) {
    let mut sink = [0u8; 512];
    let _ = tokio::time::timeout(LINGER, async {
        while let Ok(n) = stream.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
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
    let header = match proxy_header(&service, &client, client_addr) {
        Ok(header) => header,
        Err(error) => {
            debug!(client = %client_addr, "{error:#}");
            return;
        }
    };
    let connected = tokio::select! {
        _ = stop.cancelled() => return,
        connected = connect_any(&service, client_addr.ip(), &header) => connected,
    };
    let Some(upstream) = connected else {
        debug!(client = %client_addr, service = %service.config.name, "no backend available: 421");
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = reject(client) => {}
        }
        return;
    };
    let backend_name = upstream.backend.config.name.clone();
    let idle = service.config.idle_timeout;
    let result = tokio::select! {
        _ = stop.cancelled() => Err(anyhow!("cut off at shutdown")),
        result = serve(client, upstream, idle) => result,
    };
    match result {
        Ok(()) => {
            debug!(client = %client_addr, backend = %backend_name, elapsed = ?started.elapsed(), "session closed")
        }
        Err(error) => {
            debug!(client = %client_addr, backend = %backend_name, "session ended: {error:#}")
        }
    }
    drop(slot);
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
async fn connect_any(service: &Arc<Service>, client_ip: IpAddr, header: &[u8]) -> Option<Upstream> {
    let mut excluded: Vec<usize> = Vec::new();
    let mut failures = 0u32;
    // Each round excludes one more backend, so this ends; the bound is belt and braces.
    for _ in 0..service.backends.len() {
        let index = service.pick(client_ip, &excluded)?;
        if excluded.contains(&index) {
            return None;
        }
        excluded.push(index);
        let backend = &service.backends[index];
        // Full since it was picked: not a failure, just look elsewhere.
        let Some(active) = backend.active.try_acquire(backend.config.max_connections) else {
            continue;
        };
        match greet(service, backend, header).await {
            Ok((stream, greeting)) => {
                backend.assigned_total.fetch_add(1, Ordering::Relaxed);
                return Some(Upstream {
                    backend: backend.clone(),
                    _active: active,
                    stream,
                    greeting,
                });
            }
            Err(failure) => {
                drop(active);
                failures += 1;
                let more = failures <= service.config.retries;
                warn!(
                    service = %service.config.name,
                    backend = %backend.config.name,
                    "{failure}; {}",
                    if more { "trying another backend" } else { "no retries left" }
                );
                if !more {
                    return None;
                }
            }
        }
    }
    None
}

/// Why a backend did not take a session.
enum Failure {
    /// Connect refused or timed out, or the backend failed before greeting: counts towards
    /// passive health.
    Unreachable(String),
    /// The backend answered, but with a 4xx/5xx greeting (e.g. a busy Postfix's 421).
    Refused(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Unreachable(why) | Failure::Refused(why) => f.write_str(why),
        }
    }
}

/// Connects to `backend`, sends the PROXY header, and waits for its greeting.
async fn greet(
    service: &Service,
    backend: &Backend,
    header: &[u8],
) -> Result<(TcpStream, Vec<u8>), Failure> {
    let address = backend.config.address;
    let started = Instant::now();
    let attempt = async {
        let stream =
            tokio::time::timeout(service.config.connect_timeout, TcpStream::connect(address))
                .await
                .map_err(|_| {
                    anyhow!(
                        "connect to {address} timed out after {:?}",
                        service.config.connect_timeout
                    )
                })?
                .with_context(|| format!("connect to {address}"))?;
        let _ = stream.set_nodelay(true);
        let mut reader = BufReader::with_capacity(1024, stream);
        let greeting = tokio::time::timeout(service.config.greeting_timeout, async {
            if !header.is_empty() {
                reader
                    .get_mut()
                    .write_all(header)
                    .await
                    .context("sending PROXY header")?;
            }
            smtp::read_reply(&mut reader).await
        })
        .await
        .map_err(|_| {
            anyhow!(
                "no greeting from {address} within {:?}",
                service.config.greeting_timeout
            )
        })?
        .with_context(|| format!("greeting from {address}"))?;
        anyhow::Ok((reader, greeting))
    };
    let (reader, greeting) = match attempt.await {
        Ok(done) => done,
        Err(error) => {
            if let Some(up) = backend.health.record_passive_failure() {
                warn!(backend = %backend.config.name, up, "backend marked down by failures on live traffic");
            }
            return Err(Failure::Unreachable(format!("{error:#}")));
        }
    };
    if !greeting.is_positive() {
        let why = format!("{address} greeted with {}", greeting.code);
        // Take leave as SMTP expects, without making the client wait for it.
        let stream = reader.into_inner();
        tokio::spawn(quit_politely(stream));
        return Err(Failure::Refused(why));
    }
    let micros = u32::try_from(started.elapsed().as_micros()).unwrap_or(u32::MAX);
    backend.record_response(micros);
    backend.health.record_passive_success();
    let mut bytes = greeting.raw;
    // A backend that talks ahead of the client (rare) must not lose those bytes.
    bytes.extend_from_slice(reader.buffer());
    Ok((reader.into_inner(), bytes))
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

/// Relays the greeting, then everything, until both sides closed, an error, or idle timeout.
async fn serve(client: TcpStream, upstream: Upstream, idle: Duration) -> anyhow::Result<()> {
    let Upstream {
        backend: _backend,
        _active,
        stream: server,
        greeting,
    } = upstream;
    let last_activity = AtomicU64::new(0);
    let epoch = Instant::now();
    let mut client = client;
    tokio::time::timeout(idle, client.write_all(&greeting))
        .await
        .context("client did not take the greeting")?
        .context("relaying the greeting")?;
    drop(greeting);
    let ended = AtomicBool::new(false);
    let relay = async {
        tokio::try_join!(
            pump(&client, &server, &last_activity, epoch, &ended),
            pump(&server, &client, &last_activity, epoch, &ended),
        )
    };
    tokio::select! {
        result = relay => {
            result.context("relay")?;
            Ok(())
        }
        _ = idle_watch(&last_activity, epoch, idle) => Err(anyhow!("idle for {idle:?}")),
    }
}

/// Milliseconds since `epoch`: a cheap, shareable activity stamp.
fn stamp(epoch: Instant) -> u64 {
    epoch.elapsed().as_millis() as u64
}

/// Completes once nothing moved either way for `idle`.
async fn idle_watch(last_activity: &AtomicU64, epoch: Instant, idle: Duration) {
    let idle_ms = idle.as_millis() as u64;
    loop {
        let last = last_activity.load(Ordering::Relaxed);
        let due = last.saturating_add(idle_ms);
        let now = stamp(epoch);
        if now >= due {
            return;
        }
        tokio::time::sleep(Duration::from_millis(due - now)).await;
    }
}

/// Copies `src` to `dst` until EOF on `src`, then half-closes `dst` for writing. `ended` is
/// shared by both directions: the second to reach EOF skips the half-close, since both
/// sockets are closed right after (and `close` sends that FIN anyway).
async fn pump(
    src: &TcpStream,
    dst: &TcpStream,
    last_activity: &AtomicU64,
    epoch: Instant,
    ended: &AtomicBool,
) -> io::Result<()> {
    let mut pending: Vec<u8> = Vec::new();
    loop {
        if !pending.is_empty() {
            dst.writable().await?;
            match dst.try_write(&pending) {
                Ok(n) => {
                    pending.drain(..n);
                    last_activity.store(stamp(epoch), Ordering::Relaxed);
                    if pending.is_empty() {
                        pending = Vec::new(); // give the memory back while idle
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            continue;
        }
        // The peer's FIN already in (RDHUP): a read that drains the socket reaches the end of
        // stream, so the last bytes go out corked with our FIN instead of one segment each
        // (a 221 and its close), and no further `recv` is needed to learn of the end.
        let closing = src.ready(Interest::READABLE).await?.is_read_closed();
        match copy_ready(src, dst, &mut pending, closing) {
            Ok(Copied::Moved) => last_activity.store(stamp(epoch), Ordering::Relaxed),
            Ok(Copied::End) => {
                if ended.swap(true, Ordering::AcqRel) {
                    return Ok(());
                }
                // Half-close: the peer of `dst` sees EOF; the other direction keeps running.
                // With bytes still pending the FIN waits for them (the loop above writes them
                // first; this branch only runs once `pending` is empty).
                match SockRef::from(dst).shutdown(Shutdown::Write) {
                    Ok(()) => return Ok(()),
                    Err(e) if e.kind() == ErrorKind::NotConnected => return Ok(()),
                    Err(e) => return Err(e),
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
}

/// What one [`copy_ready`] did.
enum Copied {
    /// Moved some bytes; the stream goes on.
    Moved,
    /// The source reached its end of stream (any last bytes were moved first).
    End,
}

/// Reads what `src` has. A short read means the socket is drained, so readiness is cleared
/// right away (as tokio's own `poll_read` does) instead of learning it from one more `recv`
/// that fails with EAGAIN: one system call less per message relayed. Data that arrives after
/// the read raises a fresh readiness event, so nothing is missed.
fn read_draining(src: &TcpStream, chunk: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    let result = src.try_io(Interest::READABLE, || {
        got = (&*SockRef::from(src)).read(chunk)?;
        if got > 0 && got < chunk.len() {
            return Err(ErrorKind::WouldBlock.into());
        }
        Ok(got)
    });
    match result {
        Err(e) if e.kind() == ErrorKind::WouldBlock && got > 0 => Ok(got),
        other => other,
    }
}

thread_local! {
    /// One copy buffer per runtime thread, shared by all its sessions: a session holds no
    /// buffer while it waits, and no read pays for zeroing a fresh one.
    static CHUNK: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; COPY_CHUNK].into_boxed_slice());
}

/// Moves what `src` has ready into `dst`, keeping what `dst` cannot take yet in `pending`.
/// `closing`: `src`'s peer has already sent its FIN. Synchronous: the thread's buffer is
/// borrowed only here.
fn copy_ready(
    src: &TcpStream,
    dst: &TcpStream,
    pending: &mut Vec<u8>,
    closing: bool,
) -> io::Result<Copied> {
    CHUNK.with(|chunk| copy_through(&mut chunk.borrow_mut(), src, dst, pending, closing))
}

fn copy_through(
    chunk: &mut [u8],
    src: &TcpStream,
    dst: &TcpStream,
    pending: &mut Vec<u8>,
    closing: bool,
) -> io::Result<Copied> {
    let n = read_draining(src, chunk)?;
    if n == 0 {
        return Ok(Copied::End);
    }
    // A short read after the FIN drained everything before it: these are the last bytes.
    let last = closing && n < chunk.len();
    let mut written = 0;
    while written < n {
        match send(dst, &chunk[written..n], last) {
            Ok(w) => written += w,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                pending.extend_from_slice(&chunk[written..n]);
                return Ok(Copied::Moved);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(if last { Copied::End } else { Copied::Moved })
}

/// `try_write`, corked (`MSG_MORE`) when the half-close follows at once: the kernel then sends
/// these bytes and the FIN in one segment.
fn send(dst: &TcpStream, bytes: &[u8], fin_follows: bool) -> io::Result<usize> {
    if !fin_follows {
        return dst.try_write(bytes);
    }
    dst.try_io(Interest::WRITABLE, || {
        SockRef::from(dst).send_with_flags(bytes, nix::libc::MSG_MORE)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// A connected pair over loopback: (ours, peer).
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (ours, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (ours.expect("connect"), accepted.expect("accept").0)
    }

    /// Waits until `stream` has its peer's FIN in (it follows the data by a moment).
    async fn fin_seen(stream: &TcpStream) -> bool {
        for _ in 0..200 {
            if stream
                .ready(Interest::READABLE)
                .await
                .expect("ready")
                .is_read_closed()
            {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        false
    }

    /// The source's last bytes and FIN are in, but the destination cannot take them all: the
    /// copy must report "more to come" (the rest waits in `pending`), never the end, or the
    /// half-close would overtake the tail.
    #[tokio::test]
    async fn the_end_waits_for_bytes_the_destination_could_not_take() {
        let (src, mut src_peer) = pair().await;
        let (dst, _dst_peer_not_reading) = pair().await;
        // Fill the destination until the kernel refuses more.
        let filler = vec![0u8; 64 * 1024];
        loop {
            match dst.try_write(&filler) {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => panic!("filling: {e}"),
            }
        }
        src_peer
            .write_all(b"221 last words\r\n")
            .await
            .expect("send");
        src_peer.shutdown().await.expect("FIN");
        let closing = fin_seen(&src).await;
        assert!(closing, "the FIN should be visible before reading");
        let mut chunk = vec![0u8; COPY_CHUNK];
        let mut pending = Vec::new();
        let copied = copy_through(&mut chunk, &src, &dst, &mut pending, closing).expect("copy");
        assert!(
            matches!(copied, Copied::Moved),
            "reported the end with bytes pending"
        );
        assert_eq!(pending, b"221 last words\r\n");
    }

    /// With room at the destination, the last bytes after a FIN end the stream at once: no
    /// further read is needed to learn of the end.
    #[tokio::test]
    async fn last_bytes_after_the_fin_end_the_stream() {
        let (src, mut src_peer) = pair().await;
        let (dst, mut dst_peer) = pair().await;
        src_peer.write_all(b"221 bye\r\n").await.expect("send");
        src_peer.shutdown().await.expect("FIN");
        let closing = fin_seen(&src).await;
        let mut chunk = vec![0u8; COPY_CHUNK];
        let mut pending = Vec::new();
        let copied = copy_through(&mut chunk, &src, &dst, &mut pending, closing).expect("copy");
        assert!(matches!(copied, Copied::End));
        assert!(pending.is_empty());
        SockRef::from(&dst)
            .shutdown(Shutdown::Write)
            .expect("half-close");
        let mut got = Vec::new();
        dst_peer.read_to_end(&mut got).await.expect("read");
        assert_eq!(got, b"221 bye\r\n");
    }
}
