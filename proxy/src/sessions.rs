//! The proxy's open sessions, for `ctl sessions`: each worker thread keeps a table of the
//! sessions it relays, and answers the control loop's question about them from its own loop.
//!
//! Nothing here is shared between threads on the session's path: the table is the worker's
//! own (a thread-local slab, whose slots are reused, so a session's entry costs no allocation
//! once the table has grown to the thread's peak), the entry takes the session's service and
//! backend handles by move (no reference count touched), and the relay adds the bytes it
//! delivered with a plain add on the entry, once per wake-up. The client's address is not
//! kept: it is asked of the client's socket (`getpeername`) when a dump reads the entry, which
//! the worker does between polls of its sessions, while every listed socket is still open.
//!
//! A session is listed from the moment its backend greeted (it has a backend then) until the
//! relay ends; sessions still choosing a backend are counted by `ctl show` only.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::sync::Arc;
use std::time::Instant;

use slab::Slab;
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use crate::control::SessionReport;
use crate::state::{Backend, Service};

/// One open session of this thread.
struct Entry {
    service: Arc<Service>,
    backend: Arc<Backend>,
    started: Instant,
    /// The client's socket, open as long as the entry exists (see the module docs).
    client: RawFd,
    /// Bytes delivered to the backend.
    to_backend: u64,
    /// Bytes delivered to the client (the greeting included).
    to_client: u64,
}

thread_local! {
    static OPEN: RefCell<Slab<Entry>> = const { RefCell::new(Slab::new()) };
}

/// A worker's answer: its open sessions.
pub type Ask = oneshot::Sender<Vec<SessionReport>>;

/// A session's entry in its thread's table, removed when this is dropped. Create it on the
/// thread that runs the session (a worker's single-threaded runtime) and drop it before the
/// client's socket closes.
pub struct Registered {
    key: usize,
}

/// What the registration gives back at the end: for the session's last log line, and the
/// bytes it relayed each way (added to its backend's totals once, here).
pub struct Ended {
    pub backend: Arc<Backend>,
    pub started: Instant,
    pub to_backend: u64,
    pub to_client: u64,
}

impl Registered {
    /// Lists a session that relays between `client` and `backend` of `service` since `started`.
    pub fn new(
        service: Arc<Service>,
        backend: Arc<Backend>,
        started: Instant,
        client: &TcpStream,
    ) -> Registered {
        let entry = Entry {
            service,
            backend,
            started,
            client: client.as_raw_fd(),
            to_backend: 0,
            to_client: 0,
        };
        let key = OPEN.with(|open| open.borrow_mut().insert(entry));
        Registered { key }
    }

    /// The counter the relay adds its bytes to.
    pub fn tally(&self) -> Tally {
        Tally(self.key)
    }

    /// Removes the entry, handing back what the session's last log line needs.
    pub fn end(self) -> Option<Ended> {
        let key = self.key;
        std::mem::forget(self);
        remove(key).map(|entry| Ended {
            backend: entry.backend,
            started: entry.started,
            to_backend: entry.to_backend,
            to_client: entry.to_client,
        })
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        remove(self.key);
    }
}

fn remove(key: usize) -> Option<Entry> {
    // `try_with`: a runtime dropped while its thread ends must not panic here.
    OPEN.try_with(|open| open.borrow_mut().try_remove(key))
        .ok()
        .flatten()
}

/// Where the relay counts a session's bytes: its entry on this thread, or nowhere.
#[derive(Clone, Copy, Debug)]
pub struct Tally(usize);

impl Tally {
    /// Counts nothing (a relay outside a worker, in tests).
    pub const NONE: Tally = Tally(usize::MAX);

    /// Adds bytes delivered to the backend and to the client.
    pub fn add(self, to_backend: usize, to_client: usize) {
        if self.0 == usize::MAX {
            return;
        }
        OPEN.with(|open| {
            if let Some(entry) = open.borrow_mut().get_mut(self.0) {
                entry.to_backend += to_backend as u64;
                entry.to_client += to_client as u64;
            }
        });
    }
}

/// This thread's open sessions, as `ctl sessions` reports them. Called by the worker's own
/// loop, between polls of its sessions.
pub fn report() -> Vec<SessionReport> {
    let now = Instant::now();
    OPEN.with(|open| {
        open.borrow()
            .iter()
            .map(|(_, entry)| SessionReport {
                service: entry.service.config.name.clone(),
                client: peer_of(entry.client).map_or_else(|| "-".to_owned(), |a| a.to_string()),
                backend: entry.backend.config.name.clone(),
                backend_address: entry.backend.config.address.to_string(),
                age_ms: millis(now.saturating_duration_since(entry.started)),
                to_backend_bytes: entry.to_backend,
                to_client_bytes: entry.to_client,
            })
            .collect()
    })
}

/// Answers one question of the control loop.
pub fn answer(ask: Ask) {
    // The control loop may have given up waiting: nothing to tell then.
    let _ = ask.send(report());
}

/// The peer of socket `fd`; `None` once the client's connection is gone (a reset).
fn peer_of(fd: RawFd) -> Option<SocketAddr> {
    // SAFETY: the entry's socket stays open while the entry exists (see `Registered`), and
    // this runs on the entry's own thread between polls of its session.
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    socket2::SockRef::from(&fd).peer_addr().ok()?.as_socket()
}

fn millis(duration: std::time::Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tally_without_an_entry_counts_nowhere() {
        Tally::NONE.add(10, 20);
        Tally(12345).add(1, 1);
        assert!(report().is_empty());
    }
}
