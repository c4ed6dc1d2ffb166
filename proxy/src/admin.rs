//! The admin socket (daemon side): a Unix stream socket, mode 0660, where `switchyard ctl`
//! sends one JSON [`Request`] per line and reads one JSON [`Reply`] per line. Each request is
//! handed to the control loop as a [`Call`] carrying the peer's uid (`SO_PEERCRED`); this module
//! owns the socket file (a stale one replaced, a live one left alone, removed at stop), the
//! framing and the limits that keep a stuck or hostile client from holding resources.

use std::io::ErrorKind;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::control::{Call, Reply, Request};

/// The longest request line read; a real request is under a few hundred bytes.
pub const MAX_REQUEST_LINE: usize = 64 << 10;
/// How long a connection may sit without completing a request line, or take to accept a reply.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; more are told so and closed.
const MAX_CONNECTIONS: usize = 32;
/// Owner and group read and write: who may connect is who is root or in the socket's group.
const SOCKET_MODE: u32 = 0o660;

/// Serves the admin socket at `path` until `stop`, handing every request to `calls`.
///
/// Creates the parent directory if missing and replaces a stale socket file (one nobody
/// answers on); refuses when another process serves `path` or when `path` is not a socket.
/// On `stop` it stops accepting and removes the socket file.
pub fn serve(
    path: &Path,
    calls: mpsc::Sender<Call>,
    stop: CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = bind(path).with_context(|| format!("admin socket {}", path.display()))?;
    let path = path.to_path_buf();
    Ok(tokio::spawn(accept_loop(listener, path, calls, stop)))
}

fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the directory {}", dir.display()))?;
    }
    remove_stale(path)?;
    let listener = UnixListener::bind(path).context("binding the Unix socket")?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE))
        .context("setting its mode to 0660")?;
    Ok(listener)
}

/// Removes a socket file left by a process that is gone; anything else at `path` is an error.
fn remove_stale(path: &Path) -> anyhow::Result<()> {
    let kind = match std::fs::symlink_metadata(path) {
        Ok(metadata) => metadata.file_type(),
        Err(error) if error.kind() == ErrorKind::NotFound => return Ok(()),
        Err(error) => return Err(error).context("reading what is at that path"),
    };
    if !kind.is_socket() {
        bail!("the path exists and is not a socket; remove it or choose another [admin] socket");
    }
    match probe(path) {
        Err(error) if error.kind() == ErrorKind::ConnectionRefused => {
            std::fs::remove_file(path).context("removing the stale socket file")
        }
        // A full backlog (WouldBlock) is a live server too.
        Ok(()) => bail!(LIVE_SERVER),
        Err(error) if error.kind() == ErrorKind::WouldBlock => bail!(LIVE_SERVER),
        Err(error) => Err(error).context("checking whether a process still serves the socket"),
    }
}

const LIVE_SERVER: &str = "another switchyard is serving this socket; stop it first, or give this one another [admin] socket";

/// A connect that never blocks: a live server whose backlog is full answers `WouldBlock`.
fn probe(path: &Path) -> std::io::Result<()> {
    use socket2::{Domain, SockAddr, Socket, Type};
    let socket = Socket::new(Domain::UNIX, Type::STREAM, None)?;
    socket.set_nonblocking(true)?;
    socket.connect(&SockAddr::unix(path)?)
}

async fn accept_loop(
    listener: UnixListener,
    path: PathBuf,
    calls: mpsc::Sender<Call>,
    stop: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // EMFILE and the like: ours, and passing; never spin on them.
                    warn!("admin socket {}: accept failed: {error}", path.display());
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        match slots.clone().try_acquire_owned() {
            Ok(slot) => {
                let calls = calls.clone();
                tokio::spawn(async move {
                    serve_connection(stream, calls).await;
                    drop(slot);
                });
            }
            Err(_) => {
                let busy = Reply::refused(format!(
                    "the admin socket serves at most {MAX_CONNECTIONS} connections at once; try again"
                ));
                tokio::spawn(async move {
                    let mut stream = stream;
                    let _ = write_reply(&mut stream, &busy).await;
                });
            }
        }
    }
    drop(listener);
    if let Err(error) = std::fs::remove_file(&path) {
        warn!("admin socket {}: cannot remove it: {error}", path.display());
    }
}

/// Requests of one connection, one per line, answered in order, until the client closes, a
/// line is too long, or it is silent for [`IO_TIMEOUT`].
async fn serve_connection(stream: UnixStream, calls: mpsc::Sender<Call>) {
    let uid = match stream.peer_cred() {
        Ok(cred) => cred.uid(),
        Err(error) => {
            warn!("admin socket: cannot read the peer's credentials: {error}");
            return;
        }
    };
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let mut line = Vec::new();
    loop {
        line.clear();
        let request = match read_request(&mut reader, &mut line).await {
            Ok(Some(request)) => request,
            Ok(None) => return,
            Err(refusal) => {
                let closing = refusal.closes;
                if write_reply(&mut write, &refusal.reply).await.is_err() || closing {
                    return;
                }
                continue;
            }
        };
        debug!(uid, ?request, "admin request");
        let reply = ask(&calls, request, uid).await;
        if write_reply(&mut write, &reply).await.is_err() {
            return;
        }
    }
}

/// Why a line is not a request: the reply that says so, and whether the connection ends.
struct Refusal {
    reply: Reply,
    closes: bool,
}

impl Refusal {
    fn new(text: String, closes: bool) -> Self {
        Self {
            reply: Reply::refused(text),
            closes,
        }
    }
}

/// The next request; `None` at a clean end (the client closed, or went silent).
async fn read_request<R: tokio::io::AsyncRead + Unpin>(
    reader: &mut BufReader<R>,
    line: &mut Vec<u8>,
) -> Result<Option<Request>, Refusal> {
    // One byte more than allowed tells a line at the limit from a longer one.
    let limit = (MAX_REQUEST_LINE + 1) as u64;
    let mut bounded = (&mut *reader).take(limit);
    let read = bounded.read_until(b'\n', line);
    let n = match tokio::time::timeout(IO_TIMEOUT, read).await {
        Err(_) => {
            return Err(Refusal::new(
                format!(
                    "no complete request line within {}s; closing",
                    IO_TIMEOUT.as_secs()
                ),
                true,
            ));
        }
        Ok(Err(error)) => {
            debug!("admin socket: read failed: {error}");
            return Ok(None);
        }
        Ok(Ok(n)) => n,
    };
    if n == 0 {
        return Ok(None);
    }
    if line.len() > MAX_REQUEST_LINE {
        return Err(Refusal::new(
            format!("request line longer than {MAX_REQUEST_LINE} bytes; closing"),
            true,
        ));
    }
    parse_request(line)
        .map(Some)
        .map_err(|text| Refusal::new(text, false))
}

/// One line as a request, or what is wrong with it.
fn parse_request(line: &[u8]) -> Result<Request, String> {
    let text = line.strip_suffix(b"\n").unwrap_or(line);
    if text.iter().all(u8::is_ascii_whitespace) {
        return Err(
            "empty request line; send one JSON object such as {\"command\":\"show\"}".into(),
        );
    }
    serde_json::from_slice(text).map_err(|error| {
        format!(
            "malformed request: {error}; send one JSON object per line such as {{\"command\":\"show\"}}"
        )
    })
}

/// Hands `request` to the control loop and waits for its answer.
async fn ask(calls: &mpsc::Sender<Call>, request: Request, uid: u32) -> Reply {
    let (reply, answer) = oneshot::channel();
    let call = Call {
        request,
        uid,
        reply,
    };
    if calls.send(call).await.is_err() {
        return Reply::refused("switchyard is shutting down");
    }
    answer
        .await
        .unwrap_or_else(|_| Reply::refused("switchyard dropped the request (shutting down?)"))
}

async fn write_reply<W: tokio::io::AsyncWrite + Unpin>(
    write: &mut W,
    reply: &Reply,
) -> std::io::Result<()> {
    let mut bytes = serde_json::to_vec(reply).map_err(std::io::Error::other)?;
    bytes.push(b'\n');
    match tokio::time::timeout(IO_TIMEOUT, write.write_all(&bytes)).await {
        Ok(result) => result,
        Err(_) => Err(std::io::Error::new(
            ErrorKind::TimedOut,
            "the client does not read its reply",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_lines_are_named() {
        let error = parse_request(b"{\"command\":\"explode\"}\n").expect_err("unknown command");
        assert!(error.contains("explode"), "{error}");
        let error = parse_request(b"show\n").expect_err("not JSON");
        assert!(error.starts_with("malformed request"), "{error}");
        let error = parse_request(b"  \n").expect_err("empty");
        assert!(error.contains("empty request line"), "{error}");
        assert_eq!(
            parse_request(b"{\"command\":\"reload\"}\n"),
            Ok(Request::Reload)
        );
    }
}
