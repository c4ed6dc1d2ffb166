//! The balancer's own resources: the open-files limit at start (raised to the hard limit and
//! compared with what the config may need), telling our own exhaustion (EMFILE, ENFILE,
//! ENOBUFS, ENOMEM, no local port left) apart from a backend's failure, counting and logging it
//! once per burst, and the spare descriptor that lets the accept loop answer clients while
//! the descriptor table is full.
//!
//! Running out of descriptors or memory is never a backend's fault: callers check
//! [`is_local_exhaustion`] before they let an error count against a backend's health.

use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::Poll;
use std::time::Duration;

use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::config::{Config, Dataplane, HealthKind};

/// How often a burst of exhaustion errors is summarised (its first error is logged at once).
pub const REPORT_EVERY: Duration = Duration::from_secs(5);

/// Errors that mean this process (or host) ran out of something, whatever peer was involved.
/// `EADDRNOTAVAIL` on a connect is the host's ephemeral ports running out.
pub fn is_local_exhaustion(error: &io::Error) -> bool {
    use nix::errno::Errno;
    error.raw_os_error().is_some_and(|code| {
        [
            Errno::EMFILE,
            Errno::ENFILE,
            Errno::ENOBUFS,
            Errno::ENOMEM,
            Errno::EADDRNOTAVAIL,
        ]
        .contains(&Errno::from_raw(code))
    })
}

/// The first local-exhaustion error in `error`'s chain of causes.
pub fn exhaustion_in(error: &anyhow::Error) -> Option<&io::Error> {
    error
        .chain()
        .filter_map(|cause| cause.downcast_ref::<io::Error>())
        .find(|io| is_local_exhaustion(io))
}

/// Where our own resources ran out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Site {
    /// Accepting a client.
    Accept,
    /// Opening a session's connection to a backend.
    Connect,
    /// Opening a health check's connection (the check is skipped, not failed).
    HealthCheck,
}

impl Site {
    fn doing(self) -> &'static str {
        match self {
            Site::Accept => "accept failed",
            Site::Connect => "connecting to a backend failed",
            Site::HealthCheck => "opening a health check failed",
        }
    }
}

/// Process-wide counts of our own exhaustion, and the state of the burst being logged. One per
/// process ([`OWN_EXHAUSTION`]), because the descriptor table it is about is per process.
#[derive(Default)]
pub struct Exhaustion {
    accept: AtomicU64,
    connect: AtomicU64,
    health_check: AtomicU64,
    /// Clients answered `421` through the spare descriptor while the table was full.
    clients_refused: AtomicU64,
    /// Errors since the last log line.
    unreported: AtomicU64,
    in_burst: AtomicBool,
}

/// This process's [`Exhaustion`].
pub static OWN_EXHAUSTION: Exhaustion = Exhaustion::new();

/// A copy of the counts, for the totals.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExhaustionCounts {
    pub accept: u64,
    pub connect: u64,
    pub health_check: u64,
    pub clients_refused: u64,
}

impl Exhaustion {
    pub const fn new() -> Self {
        Self {
            accept: AtomicU64::new(0),
            connect: AtomicU64::new(0),
            health_check: AtomicU64::new(0),
            clients_refused: AtomicU64::new(0),
            unreported: AtomicU64::new(0),
            in_burst: AtomicBool::new(false),
        }
    }

    /// Counts one error; the first of a burst is logged at once, the rest by [`Self::report`].
    pub fn record(&self, site: Site, error: &io::Error) {
        let counter = match site {
            Site::Accept => &self.accept,
            Site::Connect => &self.connect,
            Site::HealthCheck => &self.health_check,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if self.in_burst.swap(true, Ordering::AcqRel) {
            self.unreported.fetch_add(1, Ordering::Relaxed);
            return;
        }
        warn!(
            "{}: {error}: switchyard itself is out of resources (not a backend's fault; backends \
             keep their health); clients beyond this get 421 until resources free up. Raise the \
             open-files limit (LimitNOFILE) or lower max_connections",
            site.doing()
        );
    }

    pub fn record_client_refused(&self) {
        self.clients_refused.fetch_add(1, Ordering::Relaxed);
    }

    /// Summarises the errors since the last line, or ends the burst when there were none.
    pub fn report(&self) {
        let unreported = self.unreported.swap(0, Ordering::Relaxed);
        if unreported > 0 {
            let total = self.counts();
            warn!(
                "still out of resources: {unreported} more error(s) in the last {REPORT_EVERY:?} \
                 (so far: accept {}, backend connect {}, health check {}; clients refused {})",
                total.accept, total.connect, total.health_check, total.clients_refused
            );
        } else if self.in_burst.swap(false, Ordering::AcqRel) {
            info!("resources available again");
        }
    }

    pub fn counts(&self) -> ExhaustionCounts {
        ExhaustionCounts {
            accept: self.accept.load(Ordering::Relaxed),
            connect: self.connect.load(Ordering::Relaxed),
            health_check: self.health_check.load(Ordering::Relaxed),
            clients_refused: self.clients_refused.load(Ordering::Relaxed),
        }
    }
}

/// Logs [`OWN_EXHAUSTION`]'s bursts every [`REPORT_EVERY`] until the process ends.
pub async fn report_exhaustion() {
    let mut tick = tokio::time::interval(REPORT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        OWN_EXHAUSTION.report();
    }
}

/// One descriptor held in reserve by an accept loop. When the table is full, giving it up lets
/// the loop accept one queued client and tell it `421` at once (as a full `max_connections`
/// does) instead of leaving it waiting without a greeting; then it is taken back.
pub struct SpareDescriptor(Option<File>);

impl SpareDescriptor {
    pub fn reserve() -> io::Result<Self> {
        Ok(Self(Some(open_spare()?)))
    }

    /// Answers one queued client with `reply` and closes it, through the spare descriptor.
    /// False when there was no spare to give (the caller then pauses instead).
    pub async fn refuse_one(&mut self, listener: &TcpListener, reply: &[u8]) -> bool {
        if self.0.take().is_none() {
            self.restore();
            return false;
        }
        // One poll, no wait: Pending means the queue is empty (the readiness is re-armed).
        let polled = std::future::poll_fn(|cx| Poll::Ready(listener.poll_accept(cx))).await;
        if let Poll::Ready(Ok((client, _))) = polled {
            // A fresh socket's send buffer always takes a one-line reply; the client has
            // said nothing yet, so closing sends our reply and a FIN, not a reset.
            let _ = client.try_write(reply);
            drop(client);
            OWN_EXHAUSTION.record_client_refused();
        }
        self.restore();
        true
    }

    /// Takes the spare back if it was given up and a descriptor is free again.
    pub fn restore(&mut self) {
        if self.0.is_none() {
            self.0 = open_spare().ok();
        }
    }
}

fn open_spare() -> io::Result<File> {
    File::open("/dev/null")
}

/// Descriptors a config may need at once, as far as it can be known before running.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DescriptorNeed {
    /// Two per session (client and backend) up to each userspace service's `max_connections`.
    pub sessions: u64,
    /// Everything else (see [`overhead`]).
    pub overhead: u64,
    /// Userspace services with `max_connections = 0`, whose sessions only the limit bounds.
    pub unlimited: Vec<String>,
}

impl DescriptorNeed {
    pub fn total(&self) -> u64 {
        self.sessions + self.overhead
    }
}

/// Fixed: standard streams, the control runtime (epoll, waker, signal pipe), the log and the
/// totals file, and slack for the short-lived (a polite QUIT to a refusing backend).
const BASE_OVERHEAD: u64 = 32;
/// Each worker's runtime: its epoll, its waker and its copy of the signal pipe.
const PER_WORKER: u64 = 3;
/// The kernel path: program, link, maps, BTF, the shared counter mapping.
const XDP_OVERHEAD: u64 = 32;

/// What `config` may need with `workers` worker threads.
pub fn descriptor_need(config: &Config, workers: usize) -> DescriptorNeed {
    let workers = workers as u64;
    let userspace: Vec<_> = config
        .services
        .iter()
        .filter(|s| s.dataplane == Dataplane::Proxy)
        .collect();
    let sessions = userspace
        .iter()
        .map(|s| 2 * u64::from(s.max_connections))
        .sum();
    let unlimited = userspace
        .iter()
        .filter(|s| s.max_connections == 0)
        .map(|s| s.name.clone())
        .collect();
    let listeners: u64 = userspace.iter().map(|s| s.listen.len() as u64).sum();
    let health_checks: u64 = config
        .services
        .iter()
        .filter(|s| s.health.kind != HealthKind::None)
        .map(|s| s.backends.len() as u64)
        .sum();
    let xdp = config
        .services
        .iter()
        .any(|s| s.dataplane == Dataplane::Xdp);
    // Each worker holds a copy of every listener and one spare descriptor per listener.
    let overhead = BASE_OVERHEAD
        + workers * (PER_WORKER + 2 * listeners)
        + health_checks
        + if xdp { XDP_OVERHEAD } else { 0 };
    DescriptorNeed {
        sessions,
        overhead,
        unlimited,
    }
}

/// Raises the soft open-files limit to the hard one, then warns (with the numbers) when the
/// config may need more. It warns rather than refuses: `max_connections` is a ceiling, not
/// the usual load, and past the limit clients get a `421` (a queueing MTA retries) while the
/// backends keep their health — a mail service that does not start loses more mail.
pub fn prepare_descriptors(config: &Config, workers: usize) {
    let limit = match raise_open_files_limit() {
        Ok(limit) => limit,
        Err(error) => {
            warn!("cannot read or raise the open-files limit: {error}");
            return;
        }
    };
    let need = descriptor_need(config, workers);
    for message in limit_messages(&need, limit) {
        warn!("{message}");
    }
    info!(
        "open-files limit {limit} (need up to {}: {} for sessions + {} overhead)",
        need.total(),
        need.sessions,
        need.overhead
    );
}

/// What to warn about when `need` meets `limit`.
fn limit_messages(need: &DescriptorNeed, limit: u64) -> Vec<String> {
    let mut messages = Vec::new();
    if need.total() > limit {
        messages.push(format!(
            "open-files limit {limit} is below what the config may need: {} ({} for sessions: \
             2 per session up to max_connections, + {} overhead for listeners, workers and \
             health checks); sessions beyond about {} get 421. Raise the hard limit \
             (LimitNOFILE=) or lower max_connections",
            need.total(),
            need.sessions,
            need.overhead,
            limit.saturating_sub(need.overhead) / 2
        ));
    }
    if !need.unlimited.is_empty() {
        messages.push(format!(
            "service(s) {} have max_connections = 0 (unlimited): the open-files limit {limit} \
             bounds them instead, at about {} sessions in all",
            need.unlimited.join(", "),
            limit.saturating_sub(need.overhead) / 2
        ));
    }
    messages
}

/// Sets the soft `RLIMIT_NOFILE` to the hard limit; returns the new soft limit.
fn raise_open_files_limit() -> nix::Result<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok(hard.max(soft))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exhaustion_errors_are_ours_and_others_are_not() {
        for code in [24, 23, 105, 12, 99] {
            assert!(is_local_exhaustion(&io::Error::from_raw_os_error(code)));
        }
        for code in [111, 110, 104, 113] {
            assert!(!is_local_exhaustion(&io::Error::from_raw_os_error(code)));
        }
        let wrapped = anyhow::Error::from(io::Error::from_raw_os_error(24)).context("connect");
        assert!(exhaustion_in(&wrapped).is_some());
        let refused = anyhow::Error::from(io::Error::from_raw_os_error(111)).context("connect");
        assert!(exhaustion_in(&refused).is_none());
    }

    #[test]
    fn a_burst_is_counted_by_site_and_ends_after_a_quiet_report() {
        let own = Exhaustion::new();
        let error = io::Error::from_raw_os_error(24);
        own.record(Site::Accept, &error);
        own.record(Site::Accept, &error);
        own.record(Site::HealthCheck, &error);
        own.record_client_refused();
        assert_eq!(
            own.counts(),
            ExhaustionCounts {
                accept: 2,
                connect: 0,
                health_check: 1,
                clients_refused: 1
            }
        );
        assert_eq!(own.unreported.load(Ordering::Relaxed), 2);
        own.report();
        assert!(own.in_burst.load(Ordering::Relaxed));
        own.report();
        assert!(!own.in_burst.load(Ordering::Relaxed));
    }

    #[test]
    fn the_limit_warning_carries_the_numbers() {
        let need = DescriptorNeed {
            sessions: 20_000,
            overhead: 60,
            unlimited: Vec::new(),
        };
        let messages = limit_messages(&need, 1024);
        assert_eq!(messages.len(), 1);
        for number in ["1024", "20060", "20000", "60", "482"] {
            assert!(messages[0].contains(number), "{number}: {}", messages[0]);
        }
        assert!(limit_messages(&need, 20_060).is_empty());
    }
}
