//! Listeners, the accept loop, and the process lifecycle (signals, graceful shutdown).
//!
//! Shutdown in three steps: on SIGTERM/SIGINT the listeners close (new connects are refused),
//! running sessions get `shutdown_timeout` to finish, then whatever is left is cut off. A
//! second signal skips the wait.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use socket2::{Domain, Socket, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::admin;
use crate::config::{Config, Dataplane};
use crate::control::{Call, Reply};
use crate::health;
use crate::limits::{self, Site, SpareDescriptor};
use crate::loops;
use crate::session::{self, SERVICE_UNAVAILABLE, SessionSlot};
use crate::state::{LiveState, Snapshot};
use crate::totals::Totals;
use crate::xdp;

/// Pending connections the kernel queues per listener (capped by net.core.somaxconn).
const BACKLOG: i32 = 4096;

/// Pause after an accept error that is about us, not the client, when no spare descriptor can
/// answer a queued client (memory short, or the spare is gone): no busy spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// What `run` is asked besides the config.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Where to write the shutdown totals as JSON (`run --totals FILE`).
    pub totals_file: Option<PathBuf>,
}

/// Runs every service of `config` until SIGTERM/SIGINT, then drains sessions and returns.
///
/// Workers (`workers`, by default one per CPU): each worker thread runs its own
/// single-threaded runtime and waits on every listener, so a session lives and dies on the
/// thread that accepted it and never pays for cross-thread wake-ups. The main thread keeps
/// signals, health checks and shutdown.
pub fn run(config: Config, options: RunOptions) -> anyhow::Result<()> {
    let control = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the control runtime")?;
    control.block_on(serve(config, options))
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

async fn serve(config: Config, options: RunOptions) -> anyhow::Result<()> {
    // Before listening, so a signal right after startup is never the default (fatal) action.
    let mut signals = Signals::install()?;
    let shutdown_timeout = config.shutdown_timeout;
    // The kernel path (if any service asks for it) goes through the verifier before anything
    // listens, and its shared count array becomes the one every session counts in.
    let mut xdp = xdp::load_if_wanted(&config)?;
    let counters = xdp::counters_for(xdp.as_ref(), &config);
    let state = Arc::new(LiveState::new(Snapshot::build(&config, &counters)));
    xdp::start_if_loaded(&mut xdp, &state)?;
    let snapshot = state.snapshot();
    let workers = config.workers.map_or_else(auto_workers, |n| n as usize);
    info!("{workers} worker thread(s)");
    limits::prepare_descriptors(&config, workers);

    // Every worker gets a handle on every listener; all binds happen before anything runs, so
    // a bad address fails the start as a whole.
    let mut per_worker: Vec<Vec<ListenerHandle>> = (0..workers).map(|_| Vec::new()).collect();
    let mut listening = Vec::new();
    for service in &snapshot.services {
        // The kernel path steers that service's packets itself; its VIP is not ours to bind.
        if service.config.dataplane == Dataplane::Xdp {
            continue;
        }
        for &address in &service.config.listen {
            let sockets = bind_for_workers(address, workers).with_context(|| {
                match service.config.listen_origin(address) {
                    Some(origin) => format!("{origin} {address}: cannot listen"),
                    None => format!(
                        "service {:?}: cannot listen on {address}",
                        service.config.name
                    ),
                }
            })?;
            for (worker, socket) in per_worker.iter_mut().zip(sockets) {
                worker.push((service.config.name.clone(), address, socket));
            }
            listening.push((service.config.name.clone(), address));
        }
    }

    let stop_accepting = CancellationToken::new();
    let cut_sessions = CancellationToken::new();
    let finished = CancellationToken::new();
    let accepting = TaskTracker::new();
    let sessions = TaskTracker::new();
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel();
    let mut threads = Vec::new();
    let mut started = Ok(());
    for (index, listeners) in per_worker.into_iter().enumerate() {
        let worker = Worker {
            listeners,
            state: state.clone(),
            stop_accepting: stop_accepting.clone(),
            cut_sessions: cut_sessions.clone(),
            finished: finished.clone(),
            accepting: accepting.clone(),
            sessions: sessions.clone(),
        };
        let ready = ready_tx.clone();
        match std::thread::Builder::new()
            .name(format!("switchyard-{index}"))
            .spawn(move || worker.run(ready))
        {
            Ok(thread) => threads.push(thread),
            Err(error) => {
                started = Err(anyhow::Error::from(error)
                    .context(format!("starting worker thread {index} of {workers}")));
                break;
            }
        }
    }
    drop(ready_tx);
    if started.is_ok() {
        started = wait_for_workers(&mut ready_rx, threads.len()).await;
    }
    let (calls_tx, calls_rx) = mpsc::channel(16);
    let admin = started
        .and_then(|()| admin::serve(&config.admin_socket, calls_tx, stop_accepting.child_token()));
    let admin = match admin {
        Ok(admin) => admin,
        Err(error) => {
            // Nothing was announced as listening: stop the workers that did start, and fail.
            stop_accepting.cancel();
            cut_sessions.cancel();
            finished.cancel();
            join_workers(threads);
            return Err(error);
        }
    };
    let mut calls: mpsc::Receiver<Call> = calls_rx;
    // LEAD: replace (the control loop answers these).
    tokio::spawn(async move {
        while let Some(call) = calls.recv().await {
            let _ = call.reply.send(Reply::refused("not implemented yet"));
        }
    });
    for (service, address) in &listening {
        info!(service = %service, "listening on {address}");
    }
    tokio::spawn(limits::report_exhaustion());
    for service in &snapshot.services {
        health::spawn_checks(service.clone(), stop_accepting.child_token());
    }
    drop(snapshot);

    let first = signals.next().await;
    info!(
        "{first} received: no longer accepting; waiting up to {shutdown_timeout:?} for {} sessions",
        sessions.len()
    );
    stop_accepting.cancel();
    accepting.close();
    accepting.wait().await;
    // The socket file is gone before anything else ends.
    let _ = admin.await;
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
    finished.cancel();
    join_workers(threads);
    let totals = Totals::collect(
        &state.snapshot(),
        xdp.as_ref().and_then(|plane| plane.kernel_counters()),
        false,
    );
    if let Some(plane) = xdp {
        plane.shutdown();
    }
    report_totals(&totals, options.totals_file.as_deref())?;
    info!("stopped");
    Ok(())
}

/// What a worker tells the main thread once it accepts, or why it cannot.
type ReadySender = mpsc::UnboundedSender<anyhow::Result<()>>;

/// Waits until `count` workers have reported; the first failure (in start order) is returned.
async fn wait_for_workers(
    ready: &mut mpsc::UnboundedReceiver<anyhow::Result<()>>,
    count: usize,
) -> anyhow::Result<()> {
    for _ in 0..count {
        match ready.recv().await {
            Some(Ok(())) => {}
            Some(Err(error)) => return Err(error),
            None => bail!("a worker thread ended before it was ready"),
        }
    }
    Ok(())
}

fn join_workers(threads: Vec<std::thread::JoinHandle<()>>) {
    for thread in threads {
        if thread.join().is_err() {
            warn!("a worker thread panicked");
        }
    }
}

/// One worker thread: its listeners, and the sessions they accept, on a runtime of its own.
/// A worker's handle on one listener, with its service's name and its address.
type ListenerHandle = (String, SocketAddr, std::net::TcpListener);

struct Worker {
    listeners: Vec<ListenerHandle>,
    state: Arc<LiveState>,
    stop_accepting: CancellationToken,
    cut_sessions: CancellationToken,
    /// Cancelled once every session is over: the runtime may then go.
    finished: CancellationToken,
    accepting: TaskTracker,
    sessions: TaskTracker,
}

impl Worker {
    /// Starts the runtime and the accept loops, reports to `ready`, and runs until `finished`.
    /// A failure to start is reported, never only logged: the main thread then fails the start.
    fn run(mut self, ready: ReadySender) {
        let name = std::thread::current()
            .name()
            .unwrap_or("worker")
            .to_string();
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime,
            Err(error) => {
                let _ = ready.send(Err(anyhow::Error::from(error)
                    .context(format!("{name}: starting the worker runtime"))));
                return;
            }
        };
        runtime.block_on(async {
            let listeners = std::mem::take(&mut self.listeners);
            match self.start_accepting(listeners) {
                Ok(()) => {
                    let _ = ready.send(Ok(()));
                }
                Err(error) => {
                    let _ = ready.send(Err(error.context(name)));
                    return;
                }
            }
            tokio::spawn(keep_timer_wake_near());
            self.finished.cancelled().await;
        });
    }

    /// Registers every listener with this runtime and spawns its accept loop.
    fn start_accepting(&self, listeners: Vec<ListenerHandle>) -> anyhow::Result<()> {
        let mut loops = Vec::new();
        for (name, address, listener) in listeners {
            let listener = TcpListener::from_std(listener).with_context(|| {
                format!("service {name:?}: registering the listener on {address}")
            })?;
            let spare = SpareDescriptor::reserve().with_context(|| {
                format!("service {name:?}: reserving a spare descriptor for {address}")
            })?;
            loops.push((listener, spare, name));
        }
        // Only once every listener is registered, so a failure leaves no loop half started.
        for (listener, spare, name) in loops {
            self.accepting.spawn(accept_loop(
                listener,
                spare,
                name,
                self.state.clone(),
                self.stop_accepting.clone(),
                self.cut_sessions.clone(),
                self.sessions.clone(),
            ));
        }
        Ok(())
    }
}

/// Tokio wakes its own driver (an eventfd write and one more epoll round) whenever a timer is
/// armed earlier than the driver's next planned wake-up. Every session arms a connect timeout
/// of seconds; with an idle-ish thread that was a self-wake per session. A tick nearer than
/// any session timer keeps the planned wake-up close, so arming them costs nothing.
async fn keep_timer_wake_near() {
    let mut tick = tokio::time::interval(TIMER_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
    }
}

/// Shorter than the shortest usual session timer (connect timeout, 3 s by default).
const TIMER_TICK: Duration = Duration::from_millis(500);

/// The shutdown totals: human lines, one `totals {json}` line, and the file `--totals` names.
fn report_totals(totals: &Totals, file: Option<&std::path::Path>) -> anyhow::Result<()> {
    totals.log();
    let json = totals.to_json();
    info!(target: "switchyard::totals", "totals {json}");
    if let Some(path) = file {
        std::fs::write(path, json + "\n")
            .with_context(|| format!("writing the totals to {}", path.display()))?;
    }
    Ok(())
}

/// One worker per CPU. Fewer can be cheaper: on the 2-CPU benchmark machine (smtp-source,
/// three smtp-sinks and switchyard sharing it) one worker used 7-10% less CPU per session than
/// two, at the same sessions/s within the run-to-run noise (paired runs ranged from -3% to +4%).
/// But one thread caps the relay at one CPU, so the default does not bet on it; `workers = N`.
fn auto_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// `count` handles on one listening socket, one per worker: every worker waits on the same
/// accept queue, so whichever is free takes the next client.
fn bind_for_workers(
    address: SocketAddr,
    count: usize,
) -> anyhow::Result<Vec<std::net::TcpListener>> {
    let first = bind(address)?;
    let mut all = Vec::with_capacity(count);
    for _ in 1..count {
        all.push(first.try_clone().context("duplicating the listener")?);
    }
    all.push(first);
    Ok(all)
}

/// A nonblocking listening socket: address reuse so a restart is not blocked by TIME_WAIT,
/// IPv6 sockets IPv6-only so `[::]` and `0.0.0.0` can be listed side by side.
fn bind(address: SocketAddr) -> anyhow::Result<std::net::TcpListener> {
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

async fn accept_loop(
    listener: TcpListener,
    mut spare: SpareDescriptor,
    service_name: String,
    state: Arc<LiveState>,
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
            Err(error) if limits::is_local_exhaustion(&error) => {
                limits::OWN_EXHAUSTION.record(Site::Accept, &error);
                if !spare.refuse_one(&listener, SERVICE_UNAVAILABLE).await {
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                }
                continue;
            }
            Err(error) => {
                warn!(service = %service_name, "accept failed: {error}; pausing");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                continue;
            }
        };
        spare.restore();
        if loops::is_own_connection(&client, client_addr) {
            // Closed at once, it fails that attempt (or check) like a dead backend, before it
            // could open a connection of its own and grow a chain.
            loops::report_refused(&service_name, client_addr);
            continue;
        }
        if let Err(error) = start_session(
            &state,
            &service_name,
            client,
            client_addr,
            &cut_sessions,
            &sessions,
        ) {
            warn!(service = %service_name, client = %client_addr, "{error:#}");
        }
    }
}

/// Accept errors that concern one connection only (the client gave up in the queue).
fn is_per_connection(error: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        error.kind(),
        ConnectionAborted | ConnectionReset | Interrupted | WouldBlock
    )
}

fn start_session(
    state: &LiveState,
    service_name: &str,
    client: TcpStream,
    client_addr: SocketAddr,
    cut_sessions: &CancellationToken,
    sessions: &TaskTracker,
) -> anyhow::Result<()> {
    // The snapshot current at accept time; the session keeps its service for its whole life.
    let snapshot = state.snapshot();
    let Some(service) = snapshot
        .services
        .iter()
        .find(|s| s.config.name == service_name)
        .cloned()
    else {
        bail!("service no longer configured; closing");
    };
    match SessionSlot::try_acquire(&service) {
        Some(slot) => {
            sessions.spawn(session::run(
                service,
                slot,
                client,
                client_addr,
                cut_sessions.clone(),
            ));
        }
        None => {
            tracing::debug!(service = %service_name, client = %client_addr, "max_connections reached: 421");
            sessions.spawn(session::reject(client));
        }
    }
    Ok(())
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
