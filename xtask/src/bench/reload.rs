//! What a reload costs a large running balancer: 1000 backends in 10 services with thousands of
//! open sessions, the config rewritten and reloaded several times through the admin socket.
//! Measures each reload's time from request to applied (the reply comes once the new state is
//! in force) and, with a connect loop running on an unchanged listener all along, the longest
//! gap between two accepted connects and any refused one.

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use serde::{Deserialize, Serialize};
use switchyard::control::Request;
use testkit::harness::free_addr;
use testkit::smtp_server::{Behaviour, SmtpServer};
use testkit::supervise::{self, Supervised};

const SERVICES: usize = 10;
const BACKENDS_PER_SERVICE: usize = 100;
const RELOADS: usize = 6;

/// The figures `cargo xtask bench` prints and writes to `target/bench/reload.json`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ReloadFigures {
    pub services: usize,
    pub backends: usize,
    pub open_sessions: usize,
    /// Each reload's time from request to applied, in milliseconds.
    pub applied_ms: Vec<f64>,
    pub applied_median_ms: f64,
    pub applied_max_ms: f64,
    /// Connects made by the loop on an unchanged listener while reloads ran.
    pub connects: u64,
    pub refused: u64,
    /// The longest time between two accepted connects, in milliseconds.
    pub longest_gap_ms: f64,
}

/// Runs the measurement with `sessions` sessions held open.
pub fn measure(dir: &Path, switchyard: &Path, sessions: usize) -> Result<ReloadFigures> {
    let sinks: Vec<SmtpServer> = (0..BACKENDS_PER_SERVICE)
        .map(|i| SmtpServer::start(&format!("mta{i}"), Behaviour::default()))
        .collect();
    let addrs: Vec<SocketAddr> = sinks.iter().map(|s| s.addr()).collect();
    let listens: Vec<SocketAddr> = (0..SERVICES).map(|_| free_addr()).collect();
    let socket = dir.join("reload-admin.sock");
    let config_path = dir.join("reload.toml");
    std::fs::write(&config_path, config(&listens, &addrs, &socket, 0))?;
    let mut process = start(dir, switchyard, &config_path)?;
    for listen in &listens {
        supervise::wait_for_greeting(*listen, Duration::from_secs(10))?;
    }
    let held = hold_sessions(&listens, sessions)?;
    let stop = Arc::new(AtomicBool::new(false));
    let looping = connect_loop(listens[0], stop.clone());
    let mut applied_ms = Vec::new();
    for round in 1..=RELOADS {
        std::fs::write(&config_path, config(&listens, &addrs, &socket, round))?;
        let started = Instant::now();
        let reply = switchyard::ctl::ask(&socket, &Request::Reload)
            .map_err(|e| anyhow::anyhow!("ctl reload: {e}"))?;
        applied_ms.push(started.elapsed().as_secs_f64() * 1000.0);
        ensure!(reply.ok, "reload {round} refused: {}", reply.text);
        std::thread::sleep(Duration::from_millis(300));
    }
    stop.store(true, Ordering::Relaxed);
    let (connects, refused, longest_gap) = looping
        .join()
        .map_err(|_| anyhow::anyhow!("the connect loop panicked"))?;
    let open_sessions = held.len();
    drop(held);
    process.stop(Duration::from_secs(10));
    let mut sorted = applied_ms.clone();
    sorted.sort_by(f64::total_cmp);
    let figures = ReloadFigures {
        services: SERVICES,
        backends: SERVICES * BACKENDS_PER_SERVICE,
        open_sessions,
        applied_median_ms: sorted[sorted.len() / 2],
        applied_max_ms: sorted.last().copied().unwrap_or_default(),
        applied_ms,
        connects,
        refused,
        longest_gap_ms: longest_gap.as_secs_f64() * 1000.0,
    };
    std::fs::write(
        dir.join("reload.json"),
        serde_json::to_string_pretty(&figures)? + "\n",
    )?;
    Ok(figures)
}

/// The printed summary.
pub fn describe(f: &ReloadFigures) -> String {
    format!(
        "reload with {} backends in {} services and {} open sessions: applied in {:.1} ms median, {:.1} ms max over {} reloads (target <= 50 ms); connect loop on an unchanged listener: {} connects, {} refused, longest gap {:.1} ms",
        f.backends,
        f.services,
        f.open_sessions,
        f.applied_median_ms,
        f.applied_max_ms,
        f.applied_ms.len(),
        f.connects,
        f.refused,
        f.longest_gap_ms
    )
}

/// Round `round` of the config: every backend's weight moves, and odd rounds add a backend
/// to every service (even rounds remove it again).
fn config(listens: &[SocketAddr], backends: &[SocketAddr], socket: &Path, round: usize) -> String {
    let mut text = format!(
        "# Written by cargo xtask bench (reload).\nshutdown_timeout = \"5s\"\n\n[admin]\nsocket = \"{}\"\n",
        socket.display()
    );
    for (s, listen) in listens.iter().enumerate() {
        text.push_str(&format!(
            "\n[[service]]\nname = \"s{s}\"\nlisten = \"{listen}\"\nalgorithm = \"weighted_round_robin\"\nmax_connections = 20000\n[service.health]\nkind = \"tcp\"\ninterval = \"5s\"\n"
        ));
        let count = if round % 2 == 1 {
            backends.len()
        } else {
            backends.len() - 1
        };
        for (b, address) in backends.iter().take(count).enumerate() {
            let weight = 1 + (b + round) % 5;
            text.push_str(&format!(
                "[[service.backend]]\nname = \"b{b}\"\naddress = \"{address}\"\nweight = {weight}\n"
            ));
        }
    }
    text
}

fn start(dir: &Path, switchyard: &Path, config: &Path) -> Result<Supervised> {
    let mut command = Command::new(switchyard);
    command
        .arg("run")
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "info");
    Supervised::start("switchyard (reload)", &mut command, &dir.join("reload.log"))
}

/// `count` sessions, greeted and left open, spread over the services.
fn hold_sessions(listens: &[SocketAddr], count: usize) -> Result<Vec<TcpStream>> {
    use std::io::Read;
    let mut held = Vec::with_capacity(count);
    for i in 0..count {
        let target = listens[i % listens.len()];
        let mut stream = TcpStream::connect_timeout(&target, Duration::from_secs(5))
            .with_context(|| format!("session {i} to {target}"))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut greeting = [0u8; 3];
        stream
            .read_exact(&mut greeting)
            .with_context(|| format!("greeting of session {i}"))?;
        ensure!(&greeting == b"220", "session {i} greeted with {greeting:?}");
        held.push(stream);
    }
    Ok(held)
}

/// Connects to `target` every millisecond until `stop` (bounded to two minutes): counts
/// connects and refusals and the longest time between two accepted connects.
fn connect_loop(
    target: SocketAddr,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<(u64, u64, Duration)> {
    std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(120);
        let (mut connects, mut refused) = (0u64, 0u64);
        let mut last = Instant::now();
        let mut longest = Duration::ZERO;
        while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
            match TcpStream::connect_timeout(&target, Duration::from_secs(1)) {
                Ok(_) => {
                    connects += 1;
                    let now = Instant::now();
                    longest = longest.max(now - last);
                    last = now;
                }
                Err(_) => refused += 1,
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        (connects, refused, longest)
    })
}
