//! Listeners, the accept loop, and the process lifecycle (signals, graceful shutdown).
//!
//! Shutdown in three steps: on SIGTERM/SIGINT the listeners close (new connects are refused),
//! running sessions get `shutdown_timeout` to finish, then whatever is left is cut off. A
//! second signal skips the wait.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, bail};
use socket2::{Domain, Socket, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::{Config, Dataplane};
use crate::counters::CounterTable;
use crate::health;
use crate::session::{self, SessionSlot};
use crate::state::{Runtime, Snapshot};

/// Pending connections the kernel queues per listener (capped by net.core.somaxconn).
const BACKLOG: i32 = 4096;

/// Pause after an accept error that is about us, not the client (EMFILE, ENOBUFS...), so a
/// full file table does not turn the loop into a busy spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Runs every service of `config` until SIGTERM/SIGINT, then drains sessions and returns.
pub fn run(config: Config) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("switchyard")
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(serve(config))
}

struct Signals {
    terminate: Signal,
    interrupt: Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Self> {
        Ok(Self {
            terminate: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            interrupt: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
        })
    }

    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.terminate.recv() => "SIGTERM",
            _ = self.interrupt.recv() => "SIGINT",
        }
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    // Before listening, so a signal right after startup is never the default (fatal) action.
    let mut signals = Signals::install()?;
    let shutdown_timeout = config.shutdown_timeout;
    let counters = CounterTable::new(Snapshot::slots_needed(&config));
    let state = Arc::new(Runtime::new(Snapshot::build(config, &counters)));
    let snapshot = state.snapshot();

    let mut listeners = Vec::new();
    for service in &snapshot.services {
        // The kernel path steers that service's packets itself; its VIP is not ours to bind.
        if service.config.dataplane == Dataplane::Xdp {
            continue;
        }
        for &address in &service.config.listen {
            let listener = bind(address)
                .with_context(|| format!("service {:?}: cannot listen on {address}", service.config.name))?;
            listeners.push((service.config.name.clone(), address, listener));
        }
    }

    let stop_accepting = CancellationToken::new();
    let cut_sessions = CancellationToken::new();
    let sessions = TaskTracker::new();
    for service in &snapshot.services {
        health::spawn_checks(service.clone(), stop_accepting.child_token());
    }
    let mut accept_loops = JoinSet::new();
    for (name, address, listener) in listeners {
        info!(service = %name, "listening on {address}");
        accept_loops.spawn(accept_loop(
            listener,
            name,
            state.clone(),
            stop_accepting.clone(),
            cut_sessions.clone(),
            sessions.clone(),
        ));
    }
    drop(snapshot);

    let first = signals.next().await;
    info!("{first} received: no longer accepting; waiting up to {shutdown_timeout:?} for {} sessions", sessions.len());
    stop_accepting.cancel();
    while accept_loops.join_next().await.is_some() {}
    sessions.close();
    tokio::select! {
        _ = sessions.wait() => {}
        _ = tokio::time::sleep(shutdown_timeout) => {
            warn!("shutdown timeout reached: cutting off {} sessions", sessions.len());
        }
        signal = signals.next() => {
            warn!("{signal} received again: cutting off {} sessions", sessions.len());
        }
    }
    cut_sessions.cancel();
    sessions.wait().await;
    log_backend_totals(&state);
    info!("stopped");
    Ok(())
}

/// One line per backend, for operators and for tests checking that no count leaked.
fn log_backend_totals(state: &Runtime) {
    for service in &state.snapshot().services {
        for backend in &service.backends {
            info!(
                "service {} backend {} active={} assigned={}",
                service.config.name,
                backend.config.name,
                backend.active.get(),
                backend.assigned_total.load(Ordering::Relaxed)
            );
        }
    }
}

/// A nonblocking listening socket: address reuse so a restart is not blocked by TIME_WAIT,
/// IPv6 sockets IPv6-only so `[::]` and `0.0.0.0` can be listed side by side.
fn bind(address: SocketAddr) -> anyhow::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(address), Type::STREAM, None).context("creating socket")?;
    socket.set_reuse_address(true).context("setting SO_REUSEADDR")?;
    if address.is_ipv6() {
        socket.set_only_v6(true).context("setting IPV6_V6ONLY")?;
    }
    socket.set_nonblocking(true).context("setting O_NONBLOCK")?;
    socket.bind(&address.into())?;
    socket.listen(BACKLOG).context("listen")?;
    TcpListener::from_std(socket.into()).context("registering the listener")
}

async fn accept_loop(
    listener: TcpListener,
    service_name: String,
    state: Arc<Runtime>,
    stop: CancellationToken,
    cut_sessions: CancellationToken,
    sessions: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let (client, client_addr) = match accepted {
            Ok(accepted) => accepted,
            Err(error) if is_per_connection(&error) => continue,
            Err(error) => {
                warn!(service = %service_name, "accept failed: {error}; pausing");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                continue;
            }
        };
        if let Err(error) = start_session(&state, &service_name, client, client_addr, &cut_sessions, &sessions) {
            warn!(service = %service_name, client = %client_addr, "{error:#}");
        }
    }
}

/// Accept errors that concern one connection only (the client gave up in the queue).
fn is_per_connection(error: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(error.kind(), ConnectionAborted | ConnectionReset | Interrupted | WouldBlock)
}

fn start_session(
    state: &Runtime,
    service_name: &str,
    client: TcpStream,
    client_addr: SocketAddr,
    cut_sessions: &CancellationToken,
    sessions: &TaskTracker,
) -> anyhow::Result<()> {
    let _ = client.set_nodelay(true);
    // The snapshot current at accept time; the session keeps its service for its whole life.
    let snapshot = state.snapshot();
    let Some(service) = snapshot.services.iter().find(|s| s.config.name == service_name).cloned() else {
        bail!("service no longer configured; closing");
    };
    let local_addr = client.local_addr().context("reading the local address")?;
    match SessionSlot::try_acquire(&service) {
        Some(slot) => {
            sessions.spawn(session::run(service, slot, client, client_addr, local_addr, cut_sessions.clone()));
        }
        None => {
            tracing::debug!(service = %service_name, client = %client_addr, "max_connections reached: 421");
            sessions.spawn(session::reject(client));
        }
    }
    Ok(())
}
