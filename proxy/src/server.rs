//! Listeners, the accept loop, and the process lifecycle (signals, graceful shutdown).
//!
//! Shutdown in four steps: on SIGTERM/SIGINT announced VIPs are withdrawn from BIRD (waiting
//! for its confirmation, a few seconds at most), the listeners close (new connects are refused),
//! running sessions get `shutdown_timeout` to finish, then whatever is left is cut off. A
//! second signal skips the wait.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::admin;
use crate::announce::Announcer;
use crate::config::Config;
use crate::control::Call;
use crate::http;
use crate::limits::{self, Site, SpareDescriptor};
use crate::listeners::{Accept, Listeners, Route};
use crate::loops;
use crate::notify;
use crate::reject;
use crate::reload::Control;
use crate::session::{self, SERVICE_UNAVAILABLE, SessionSlot};
use crate::sessions;
use crate::sources::Verdict;
use crate::state::{LiveState, Service, Snapshot};
use crate::tallies::Refusal;
use crate::totals::Totals;
use crate::xdp;

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
    /// SIGHUP: reload the config file.
    hangup: Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Self> {
        Ok(Self {
            terminate: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            interrupt: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
            hangup: signal(SignalKind::hangup()).context("installing the SIGHUP handler")?,
        })
    }

    /// The next stop signal, or `None` for a SIGHUP.
    async fn next_or_hangup(&mut self) -> Option<&'static str> {
        tokio::select! {
            _ = self.terminate.recv() => Some("SIGTERM"),
            _ = self.interrupt.recv() => Some("SIGINT"),
            _ = self.hangup.recv() => None,
        }
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
    // The kernel path (if any service asks for it) goes through the verifier before anything
    // listens, and its shared count array becomes the one every session counts in.
    let mut xdp = xdp::load_if_wanted(&config)?;
    let counters = xdp::counters_for(xdp.as_ref(), &config);
    let state = Arc::new(LiveState::new(Snapshot::build(&config, &counters)?));
    xdp::start_if_loaded(&mut xdp, &state)?;
    let snapshot = state.snapshot();
    let workers = config.workers.map_or_else(auto_workers, |n| n as usize);
    info!("{workers} worker thread(s)");
    limits::prepare_descriptors(&config, workers);

    let stop_accepting = CancellationToken::new();
    let cut_sessions = CancellationToken::new();
    let finished = CancellationToken::new();
    let accepting = TaskTracker::new();
    let sessions = TaskTracker::new();
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel();
    let mut listeners = Listeners::new(stop_accepting.clone());
    let mut queues = Vec::with_capacity(workers);
    let mut session_askers = Vec::with_capacity(workers);
    for _ in 0..workers {
        let (queue, accepts) = mpsc::unbounded_channel();
        listeners.add_worker(queue);
        let (asker, asks) = mpsc::unbounded_channel();
        session_askers.push(asker);
        queues.push((accepts, asks));
    }
    // Every worker gets a handle on every listener; all binds happen before anything runs, so
    // a bad address fails the start as a whole.
    let opening = listeners.bind_new(&snapshot)?;
    listeners.commit(&snapshot, opening)?;
    let mut threads = Vec::new();
    let mut started = Ok(());
    for (index, (accepts, asks)) in queues.into_iter().enumerate() {
        let worker = Worker {
            accepts,
            asks,
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
    let announcer = Announcer::new(config.bird_socket.clone());
    let stop_announcing = CancellationToken::new();
    let web_context = Arc::new(http::Context {
        state: state.clone(),
        kernel: xdp
            .as_ref()
            .and_then(|plane| plane.kernel_counters_handle()),
        started: std::time::Instant::now(),
        announcer: announcer.clone(),
    });
    let admin = async {
        started?;
        let socket = admin::serve(&config.admin_socket, calls_tx, stop_accepting.child_token())?;
        let web = match config.admin_listen {
            Some(address) => {
                Some(http::serve(address, web_context, stop_accepting.child_token()).await?)
            }
            None => None,
        };
        anyhow::Ok((socket, web))
    }
    .await;
    let (admin, web) = match admin {
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
    for (address, service) in listeners.addresses() {
        info!(service = %service, "listening on {address}");
    }
    notify::ready();
    tokio::spawn(limits::report_exhaustion());
    drop(snapshot);
    let announcing = announcer.spawn(state.clone(), stop_announcing.clone());
    let mut control = Control::new(config, state.clone(), listeners, stop_accepting.clone())
        .with_kernel_path(xdp.as_ref())
        .with_workers(session_askers)
        .with_announcer(announcer);
    control.start_checks();

    // The control loop: reloads (SIGHUP, `ctl reload`) and every other `ctl` request, one at
    // a time, until a stop signal.
    let first = loop {
        tokio::select! {
            signal = signals.next_or_hangup() => match signal {
                Some(signal) => break signal,
                None => {
                    control.reload("SIGHUP").await;
                }
            },
            Some(call) = calls.recv() => control.handle(call).await,
        }
    };
    notify::stopping();
    // Routers stop sending new sessions here before anything stops accepting them.
    stop_announcing.cancel();
    if announcing.await.is_err() {
        warn!("the announcement task ended abnormally; check BIRD's protocols");
    }
    let shutdown_timeout = control.config().shutdown_timeout;
    info!(
        "{first} received: no longer accepting; waiting up to {shutdown_timeout:?} for {} sessions",
        sessions.len()
    );
    stop_accepting.cancel();
    accepting.close();
    accepting.wait().await;
    // The socket file is gone before anything else ends.
    let _ = admin.await;
    if let Some(web) = web {
        let _ = web.await;
    }
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
struct Worker {
    /// Listeners to accept on: those of the start are queued before the worker runs, a
    /// reload's come later.
    accepts: mpsc::UnboundedReceiver<Accept>,
    /// `ctl sessions`: the control loop asks for this thread's open sessions.
    asks: mpsc::UnboundedReceiver<sessions::Ask>,
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
            let mut first = Vec::new();
            while let Ok(accept) = self.accepts.try_recv() {
                first.push(accept);
            }
            match self.start_accepting(first) {
                Ok(()) => {
                    let _ = ready.send(Ok(()));
                }
                Err(error) => {
                    let _ = ready.send(Err(error.context(name)));
                    return;
                }
            }
            tokio::spawn(keep_timer_wake_near());
            loop {
                tokio::select! {
                    _ = self.finished.cancelled() => break,
                    Some(accept) = self.accepts.recv() => {
                        // A reload's listener: the other workers may still serve it.
                        if let Err(error) = self.start_accepting(vec![accept]) {
                            warn!("{name}: {error:#}");
                        }
                    }
                    Some(ask) = self.asks.recv() => sessions::answer(ask),
                }
            }
        });
    }

    /// Registers every listener with this runtime and spawns its accept loop.
    fn start_accepting(&self, accepts: Vec<Accept>) -> anyhow::Result<()> {
        let mut loops = Vec::new();
        for accept in accepts {
            let address = accept.address;
            let name = accept.route.load().config.name.clone();
            let listener = TcpListener::from_std(accept.socket).with_context(|| {
                format!("service {name:?}: registering the listener on {address}")
            })?;
            let spare = SpareDescriptor::reserve().with_context(|| {
                format!("service {name:?}: reserving a spare descriptor for {address}")
            })?;
            loops.push((listener, spare, accept.route, accept.stop, accept.held));
        }
        // Only once every listener is registered, so a failure leaves no loop half started.
        for (listener, spare, route, stop, held) in loops {
            let accepting = accept_loop(
                listener,
                spare,
                route,
                stop,
                self.cut_sessions.clone(),
                self.sessions.clone(),
            );
            self.accepting.spawn(async move {
                accepting.await;
                // The listener is closed by now: a reload that removed it may answer.
                drop(held);
            });
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

async fn accept_loop(
    listener: TcpListener,
    mut spare: SpareDescriptor,
    route: Route,
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
                warn!(service = %route.load().config.name, "accept failed: {error}; pausing");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                continue;
            }
        };
        spare.restore();
        if loops::is_own_connection(&client, client_addr) {
            // Closed at once, it fails that attempt (or check) like a dead backend, before it
            // could open a connection of its own and grow a chain.
            loops::report_refused(&route.load().config.name, client_addr);
            continue;
        }
        // The service as it is now; the session keeps it for its whole life.
        start_session(
            route.load_full(),
            client,
            client_addr,
            &cut_sessions,
            &sessions,
        );
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
    service: Arc<Service>,
    client: TcpStream,
    client_addr: SocketAddr,
    cut_sessions: &CancellationToken,
    sessions: &TaskTracker,
) {
    let source = match service.counts.sources.admit(client_addr.ip()) {
        Verdict::Admit(source) => source,
        refused => {
            let reply = match refused {
                Verdict::Denied => reject::DENIED,
                Verdict::TooMany => reject::TOO_MANY,
                _ => reject::TOO_FAST,
            };
            tracing::debug!(service = %service.config.name, client = %client_addr, "{refused:?}");
            sessions.spawn(reject::reject(client, reply));
            return;
        }
    };
    match SessionSlot::try_acquire(&service, source) {
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
            tracing::debug!(service = %service.config.name, client = %client_addr, "max_connections reached: 421");
            service.counts.refused.record(Refusal::MaxConnections);
            sessions.spawn(reject::reject(client, SERVICE_UNAVAILABLE));
        }
    }
}
