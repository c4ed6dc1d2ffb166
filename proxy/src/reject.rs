//! Turning a client away: the replies (a `421` the client retries later, a `554` for a source
//! that is not served at all) and a close that is polite while rejections are few and cheap
//! when they are many. A polite close lingers up to two seconds so the reply is read before
//! our FIN (never a reset that swallows it); under a flood that would hold a descriptor per
//! rejected client for seconds, so past [`MAX_LINGERING`] at once the reply is written if the
//! socket takes it at once and the connection is closed.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A source at its `per_source_connections`.
pub const TOO_MANY: &[u8] =
    b"421 4.7.0 Too many connections from your address, try again later\r\n";
/// A source over its `per_source_rate`.
pub const TOO_FAST: &[u8] = b"421 4.7.0 Too many new connections from your address, slow down\r\n";
/// A source in `deny`, or outside `allow` (RFC 5321 3.1: no SMTP service here).
pub const DENIED: &[u8] = b"554 5.7.1 No SMTP service here for your address\r\n";

/// How long a polite close may wait for the peer (to read our last words).
const LINGER: Duration = Duration::from_secs(2);
/// Rejected clients lingering at once; beyond, rejections close at once.
pub const MAX_LINGERING: usize = 256;

static LINGERING: AtomicUsize = AtomicUsize::new(0);

/// Rejections lingering right now (for tests and metrics).
pub fn lingering() -> usize {
    LINGERING.load(Ordering::Relaxed)
}

/// Tells the client `reply` and closes: gracefully (reply, FIN, discard what it still sends
/// until it closes too) while few are lingering, at once otherwise.
pub async fn reject(mut client: TcpStream, reply: &'static [u8]) {
    if LINGERING.fetch_add(1, Ordering::Relaxed) >= MAX_LINGERING {
        LINGERING.fetch_sub(1, Ordering::Relaxed);
        // A fresh socket's send buffer takes a one-line reply whole.
        let _ = client.try_write(reply);
        return;
    }
    let _ = tokio::time::timeout(LINGER, client.write_all(reply)).await;
    let _ = client.shutdown().await;
    drain(&mut client).await;
    LINGERING.fetch_sub(1, Ordering::Relaxed);
}

/// Reads and discards until EOF, an error, or `LINGER`.
pub async fn drain(stream: &mut TcpStream) {
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
