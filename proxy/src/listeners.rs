//! The proxy services' listening sockets, live: which addresses are open, which service each
//! serves, and handing new ones to the workers.
//!
//! Every worker accepts on every listener (one shared accept queue per address). A listener
//! holds a [`Route`] to its service, read without a lock per accepted client; a reload
//! re-points it at the service's new state, so an unchanged address keeps its socket and
//! never refuses a client. A reload binds the addresses it adds before anything changes (a
//! failure changes nothing), and closes the ones it removes.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use arc_swap::ArcSwap;
use socket2::{Domain, Socket, Type};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::{TaskTracker, task_tracker::TaskTrackerToken};
use tracing::info;

use crate::config::Dataplane;
use crate::state::{Service, Snapshot};

/// Pending connections the kernel queues per listener (capped by net.core.somaxconn).
const BACKLOG: i32 = 4096;

/// The service a listener serves now.
pub type Route = Arc<ArcSwap<Service>>;

/// One worker's handle on one listener.
pub struct Accept {
    pub address: SocketAddr,
    pub socket: std::net::TcpListener,
    pub route: Route,
    /// Cancelled when a reload removes the address (or at shutdown).
    pub stop: CancellationToken,
    /// Held by the worker's accept loop until it has closed its handle on the socket.
    pub held: TaskTrackerToken,
}

struct Open {
    route: Route,
    stop: CancellationToken,
    /// Tracks the workers' handles on the socket.
    handles: TaskTracker,
}

/// Listeners a reload removed, until every worker has closed its handle (then the address
/// refuses connects).
pub struct Closing {
    handles: Vec<TaskTracker>,
}

impl Closing {
    /// Waits until the removed addresses are closed, at most `limit`.
    pub async fn wait(self, limit: std::time::Duration) {
        let all = async {
            for handles in &self.handles {
                handles.wait().await;
            }
        };
        let _ = tokio::time::timeout(limit, all).await;
    }
}

/// The open listeners and the workers' queues for new ones.
pub struct Listeners {
    open: HashMap<SocketAddr, Open>,
    workers: Vec<mpsc::UnboundedSender<Accept>>,
    /// Parent of every listener's stop token (shutdown).
    stop: CancellationToken,
}

/// Addresses a reload opens, bound before it commits; dropping it closes them.
pub struct Opening {
    bound: Vec<(SocketAddr, std::net::TcpListener)>,
}

impl Listeners {
    pub fn new(stop: CancellationToken) -> Self {
        Self {
            open: HashMap::new(),
            workers: Vec::new(),
            stop,
        }
    }

    /// A worker's queue: every listener opened from now on is sent to it.
    pub fn add_worker(&mut self, queue: mpsc::UnboundedSender<Accept>) {
        self.workers.push(queue);
    }

    /// Binds what `snapshot` listens on and is not open yet. Errors name the service, the
    /// address and where it is written.
    pub fn bind_new(&self, snapshot: &Snapshot) -> anyhow::Result<Opening> {
        let mut bound = Vec::new();
        for (service, address) in proxy_addresses(snapshot) {
            if self.open.contains_key(&address) {
                continue;
            }
            let socket =
                bind(address).with_context(|| match service.config.listen_origin(address) {
                    Some(origin) => format!("{origin} {address}: cannot listen"),
                    None => format!(
                        "service {:?}: cannot listen on {address}",
                        service.config.name
                    ),
                })?;
            bound.push((address, socket));
        }
        Ok(Opening { bound })
    }

    /// Makes the open listeners those of `snapshot`: kept addresses now serve their service's
    /// new state, `opening`'s are handed to every worker, the others close. Returns what
    /// changed, for the reload's report ("listener 127.0.0.1:25 added").
    pub fn commit(
        &mut self,
        snapshot: &Snapshot,
        opening: Opening,
    ) -> anyhow::Result<(Vec<String>, Closing)> {
        let mut changes = Vec::new();
        let mut closing = Closing {
            handles: Vec::new(),
        };
        let wanted: HashMap<SocketAddr, &Arc<Service>> = proxy_addresses(snapshot)
            .map(|(service, address)| (address, service))
            .collect();
        self.open.retain(|address, open| {
            let keep = wanted.contains_key(address);
            if !keep {
                open.stop.cancel();
                open.handles.close();
                closing.handles.push(open.handles.clone());
                info!("listener {address} closed");
                changes.push(format!("listener {address} removed"));
            }
            keep
        });
        for (address, open) in &self.open {
            if let Some(service) = wanted.get(address) {
                open.route.store((*service).clone());
            }
        }
        for (address, socket) in opening.bound {
            let Some(service) = wanted.get(&address) else {
                continue;
            };
            let route: Route = Arc::new(ArcSwap::new((*service).clone()));
            let stop = self.stop.child_token();
            let handles = TaskTracker::new();
            for worker in &self.workers {
                let socket = socket
                    .try_clone()
                    .with_context(|| format!("duplicating the listener on {address}"))?;
                // A worker that is gone is shutting down: nothing to accept for.
                let _ = worker.send(Accept {
                    address,
                    socket,
                    route: route.clone(),
                    stop: stop.clone(),
                    held: handles.token(),
                });
            }
            self.open.insert(
                address,
                Open {
                    route,
                    stop,
                    handles,
                },
            );
            changes.push(format!(
                "listener {address} added (service {})",
                service.config.name
            ));
        }
        Ok((changes, closing))
    }

    /// The open addresses with the service each serves, in address order.
    pub fn addresses(&self) -> Vec<(SocketAddr, String)> {
        let mut all: Vec<_> = self
            .open
            .iter()
            .map(|(address, open)| (*address, open.route.load().config.name.clone()))
            .collect();
        all.sort();
        all
    }
}

/// Every address a proxy service listens on (the kernel path steers xdp services' VIPs
/// itself; they are not ours to bind).
fn proxy_addresses(snapshot: &Snapshot) -> impl Iterator<Item = (&Arc<Service>, SocketAddr)> {
    snapshot
        .services
        .iter()
        .filter(|s| s.config.dataplane == Dataplane::Proxy)
        .flat_map(|s| s.config.listen.iter().map(move |&a| (s, a)))
}

/// A nonblocking listening socket: address reuse so a restart is not blocked by TIME_WAIT,
/// IPv6 sockets IPv6-only so `[::]` and `0.0.0.0` can be listed side by side.
pub fn bind(address: SocketAddr) -> anyhow::Result<std::net::TcpListener> {
    let socket =
        Socket::new(Domain::for_address(address), Type::STREAM, None).context("creating socket")?;
    socket
        .set_reuse_address(true)
        .context("setting SO_REUSEADDR")?;
    if address.is_ipv6() {
        socket.set_only_v6(true).context("setting IPV6_V6ONLY")?;
    }
    socket.set_nonblocking(true).context("setting O_NONBLOCK")?;
    // Accepted sockets inherit it: no setsockopt per client.
    socket
        .set_tcp_nodelay(true)
        .context("setting TCP_NODELAY")?;
    socket.bind(&address.into())?;
    socket.listen(BACKLOG).context("listen")?;
    Ok(socket.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use socket2::SockRef;

    /// The listener's TCP_NODELAY is what every client socket relies on (no per-client
    /// setsockopt): if a kernel stopped copying it on accept, small SMTP replies would wait
    /// for Nagle.
    #[test]
    fn accepted_sockets_inherit_nodelay() {
        let listener = bind(SocketAddr::from(([127, 0, 0, 1], 0))).expect("bind");
        let address = listener.local_addr().expect("local address");
        let _client = std::net::TcpStream::connect(address).expect("connect");
        listener.set_nonblocking(false).expect("blocking accept");
        let (accepted, _) = listener.accept().expect("accept");
        assert!(SockRef::from(&accepted).tcp_nodelay().expect("getsockopt"));
    }
}
