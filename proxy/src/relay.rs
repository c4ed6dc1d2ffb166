//! The byte relay of an established session: everything the client and its backend send is
//! copied to the other side until both have closed (half-closes passed on), an error, or
//! `idle_timeout` without a byte either way.
//!
//! Memory per idle session is what an edge host in front of thousands of open SMTP sessions
//! pays for, so the relay is one small hand-written state machine: no buffer is held while
//! idle (reads go through the thread's copy buffer; only bytes the destination cannot take yet
//! are kept, in a buffer of their own), no readiness future per direction (the sockets' own
//! wakers are used), and one idle timer that is re-armed only when it fires.

use std::cell::RefCell;
use std::future::Future;
use std::io::{self, ErrorKind, Read};
use std::net::Shutdown;
use std::pin::{Pin, pin};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use socket2::SockRef;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use crate::sessions::Tally;

/// Bytes moved per read.
const COPY_CHUNK: usize = 16 * 1024;

/// Why a relay ended other than by both sides closing.
#[derive(Debug)]
pub enum RelayError {
    /// Nothing moved either way for the idle timeout.
    Idle(Duration),
    /// A socket error on either side.
    Io(io::Error),
}

impl std::fmt::Display for RelayError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RelayError::Idle(idle) => write!(f, "idle for {idle:?}"),
            RelayError::Io(error) => write!(f, "relay: {error}"),
        }
    }
}

impl std::error::Error for RelayError {}

/// Relays between `client` and `server` until both directions ended, an error, or `idle`
/// without traffic. `greeting` (the backend's greeting and anything it sent after it) goes to
/// the client first, under the same idle timeout. The first side to end is half-closed towards
/// its peer (that direction's FIN is passed on); the other direction keeps running.
pub fn relay<'a>(
    client: &'a TcpStream,
    server: &'a TcpStream,
    greeting: Vec<u8>,
    idle: Duration,
    tally: Tally,
) -> Relay<'a> {
    Relay {
        client,
        server,
        tally,
        upstream: Direction::default(),
        downstream: Direction {
            pending: greeting,
            ended: false,
        },
        last_activity: Instant::now(),
        idle,
        timer: tokio::time::sleep(idle),
    }
}

pin_project_lite::pin_project! {
    /// The relay of one session, as a plain state machine (see the module docs for why).
    pub struct Relay<'a> {
        client: &'a TcpStream,
        server: &'a TcpStream,
        // Where the bytes delivered each way are counted (`ctl sessions`).
        tally: Tally,
        // client → server
        upstream: Direction,
        // server → client
        downstream: Direction,
        last_activity: Instant,
        idle: Duration,
        #[pin]
        timer: Sleep,
    }
}

impl Future for Relay<'_> {
    type Output = Result<(), RelayError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let (client, server) = (*this.client, *this.server);
        let mut moved = false;
        let (mut up_bytes, mut down_bytes) = (0, 0);
        let up = this
            .upstream
            .poll(cx, client, server, &mut moved, &mut up_bytes);
        let down = this
            .downstream
            .poll(cx, server, client, &mut moved, &mut down_bytes);
        if moved {
            *this.last_activity = Instant::now();
        }
        if up_bytes + down_bytes > 0 {
            this.tally.add(up_bytes, down_bytes);
        }
        for (state, dst) in [(up, server), (down, client)] {
            match state {
                Poll::Ready(Err(error)) => return Poll::Ready(Err(RelayError::Io(error))),
                Poll::Ready(Ok(Ended::Now)) => {
                    if this.upstream.ended && this.downstream.ended {
                        // Both sockets are closed right after, and close sends that FIN anyway.
                        return Poll::Ready(Ok(()));
                    }
                    half_close(dst).map_err(RelayError::Io)?;
                }
                Poll::Ready(Ok(Ended::Before)) | Poll::Pending => {}
            }
        }
        if this.upstream.ended && this.downstream.ended {
            return Poll::Ready(Ok(()));
        }
        poll_idle(cx, this.timer, *this.last_activity, *this.idle)
    }
}

/// Ready with the idle error once `idle` passed since `last_activity`. The timer is only
/// re-armed when it fires, so traffic costs a clock read, not a timer update.
fn poll_idle(
    cx: &mut Context<'_>,
    mut timer: Pin<&mut Sleep>,
    last_activity: Instant,
    idle: Duration,
) -> Poll<Result<(), RelayError>> {
    loop {
        ready!(timer.as_mut().poll(cx));
        let due = last_activity + idle;
        if due <= Instant::now() {
            return Poll::Ready(Err(RelayError::Idle(idle)));
        }
        timer.as_mut().reset(due);
    }
}

/// Passes an end of stream on: the peer of `dst` sees EOF.
fn half_close(dst: &TcpStream) -> io::Result<()> {
    match SockRef::from(dst).shutdown(Shutdown::Write) {
        Err(e) if e.kind() != ErrorKind::NotConnected => Err(e),
        _ => Ok(()),
    }
}

/// One direction of the relay.
#[derive(Default)]
struct Direction {
    /// Bytes read but not yet taken by the destination; empty (no allocation) while idle.
    pending: Vec<u8>,
    /// The source's end of stream has been passed on (or is about to be).
    ended: bool,
}

/// How a direction stands at the end of a poll that found its end.
enum Ended {
    /// It ended in this poll: its FIN is to be passed on now.
    Now,
    /// It had ended before.
    Before,
}

impl Direction {
    /// Moves whatever is ready from `src` to `dst` until one of them would block (Pending,
    /// with both sockets' wakers registered as needed) or the source's end of stream.
    /// `moved` is set when any byte went through; `delivered` grows by the bytes `dst` took.
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        src: &TcpStream,
        dst: &TcpStream,
        moved: &mut bool,
        delivered: &mut usize,
    ) -> Poll<io::Result<Ended>> {
        if self.ended {
            return Poll::Ready(Ok(Ended::Before));
        }
        loop {
            if !self.pending.is_empty() {
                ready!(dst.poll_write_ready(cx))?;
                match dst.try_write(&self.pending) {
                    Ok(n) => {
                        self.pending.drain(..n);
                        *moved = true;
                        *delivered += n;
                        if self.pending.is_empty() {
                            self.pending = Vec::new(); // give the memory back while idle
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(e) => return Poll::Ready(Err(e)),
                }
                continue;
            }
            ready!(src.poll_read_ready(cx))?;
            let closing = read_closed(cx, src);
            match copy_ready(src, dst, &mut self.pending, closing, delivered) {
                Ok(Copied::Moved) => *moved = true,
                Ok(Copied::End) => {
                    self.ended = true;
                    return Poll::Ready(Ok(Ended::Now));
                }
                // Readiness was cleared: the next turn registers the waker.
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

/// Whether `src`'s peer has already sent its FIN (RDHUP), asked right after the socket was
/// found readable: the readiness is set, so this answers at once and registers nothing.
fn read_closed(cx: &mut Context<'_>, src: &TcpStream) -> bool {
    match pin!(src.ready(Interest::READABLE)).poll(cx) {
        Poll::Ready(Ok(ready)) => ready.is_read_closed(),
        _ => false,
    }
}

/// What one [`copy_ready`] did.
#[derive(Debug)]
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
/// `closing`: `src`'s peer has already sent its FIN, so a read that drains the socket reaches
/// the end of stream: the last bytes go out corked with our FIN instead of one segment each
/// (a 221 and its close), and no further `recv` is needed to learn of the end. Synchronous:
/// the thread's buffer is borrowed only here.
fn copy_ready(
    src: &TcpStream,
    dst: &TcpStream,
    pending: &mut Vec<u8>,
    closing: bool,
    delivered: &mut usize,
) -> io::Result<Copied> {
    CHUNK.with(|chunk| {
        copy_through(
            &mut chunk.borrow_mut(),
            src,
            dst,
            pending,
            closing,
            delivered,
        )
    })
}

/// [`copy_ready`] through `chunk`; `delivered` grows by the bytes `dst` took.
fn copy_through(
    chunk: &mut [u8],
    src: &TcpStream,
    dst: &TcpStream,
    pending: &mut Vec<u8>,
    closing: bool,
    delivered: &mut usize,
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
            Ok(w) => {
                written += w;
                *delivered += w;
            }
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
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
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
        let copied =
            copy_through(&mut chunk, &src, &dst, &mut pending, closing, &mut 0).expect("copy");
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
        let copied =
            copy_through(&mut chunk, &src, &dst, &mut pending, closing, &mut 0).expect("copy");
        assert!(matches!(copied, Copied::End));
        assert!(pending.is_empty());
        half_close(&dst).expect("half-close");
        let mut got = Vec::new();
        dst_peer.read_to_end(&mut got).await.expect("read");
        assert_eq!(got, b"221 bye\r\n");
    }

    /// The whole relay: a slow reader on one side, a half-close from the other, and the idle
    /// timeout only after traffic stopped.
    #[tokio::test]
    async fn relays_both_ways_passes_half_closes_and_times_out_only_when_idle() {
        let (client, mut client_peer) = pair().await;
        let (server, mut server_peer) = pair().await;
        let big = vec![7u8; 3 << 20];
        let expected = big.clone();
        let relay_task = tokio::spawn(async move {
            relay(
                &client,
                &server,
                b"220 hi\r\n".to_vec(),
                Duration::from_millis(400),
                Tally::NONE,
            )
            .await
        });
        // Server → client: 3 MiB the client reads slowly at first, then the server's FIN.
        let sender = tokio::spawn(async move {
            server_peer.write_all(&big).await.expect("server send");
            server_peer.shutdown().await.expect("server FIN");
            let mut from_client = Vec::new();
            server_peer
                .read_to_end(&mut from_client)
                .await
                .expect("server read");
            from_client
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut got = Vec::new();
        client_peer
            .read_to_end(&mut got)
            .await
            .expect("client read");
        assert_eq!(
            got.get(..8),
            Some(&b"220 hi\r\n"[..]),
            "the greeting comes first"
        );
        assert!(got[8..] == expected[..], "the relayed bytes differ");
        // The other direction still runs after the server's half-close.
        client_peer
            .write_all(b"QUIT\r\n")
            .await
            .expect("client send");
        client_peer.shutdown().await.expect("client FIN");
        assert_eq!(sender.await.expect("sender"), b"QUIT\r\n");
        relay_task
            .await
            .expect("relay task")
            .expect("relay ends cleanly");

        let (client, _client_peer) = pair().await;
        let (server, _server_peer) = pair().await;
        let started = std::time::Instant::now();
        let ended = relay(
            &client,
            &server,
            Vec::new(),
            Duration::from_millis(200),
            Tally::NONE,
        )
        .await;
        assert!(matches!(ended, Err(RelayError::Idle(_))), "{ended:?}");
        assert!(started.elapsed() >= Duration::from_millis(200));
    }
}
