//! Memory per idle proxied session, side by side: the same number of sessions, opened through
//! a fresh switchyard and then a fresh HAProxy to the same three sinks (which hold them), and
//! each balancer's RSS before and after.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::contenders::{start_haproxy_process, start_switchyard_process};
use super::cpu::with_children;
use super::drive::wait_until_greeting;
use super::results::{HAPROXY_IDLE, IdleMemory, IdleRss, Skipped};
use crate::loadgen::{self, Budget, LoadSpec};
use crate::sink::{SinkConfig, SinkThread};
use testkit::supervise::Supervised;

const SWITCHYARD_IDLE_PORT: u16 = 3630;
const HAPROXY_IDLE_PORT: u16 = 3631;

/// Measures switchyard and, when `haproxy` is given, HAProxy with `n` idle sessions each. A
/// failed HAProxy measurement is returned as skipped, with its reason. Both ends of each
/// session are file descriptors: this process holds 2n (client and sink side), the balancer
/// 2n, both under the 20000 limit for n = 5000.
pub fn measure(
    dir: &Path,
    switchyard: &Path,
    haproxy: Option<&Path>,
    n: usize,
) -> Result<(IdleMemory, Option<Skipped>)> {
    let sinks = SinkThread::start(
        &[SocketAddr::from(([127, 0, 0, 1], 0)); 3],
        SinkConfig::default(),
    )?;
    let listen = SocketAddr::from(([127, 0, 0, 1], SWITCHYARD_IDLE_PORT));
    let (process, _) = start_switchyard_process(
        dir,
        switchyard,
        "switchyard-idle",
        listen,
        "least_conn",
        &sinks.addrs,
    )?;
    let ours = measure_one("switchyard", process, listen, &sinks, n)?;
    let mut skipped = None;
    let theirs = haproxy.and_then(|bin| {
        let listen = SocketAddr::from(([127, 0, 0, 1], HAPROXY_IDLE_PORT));
        let measured = start_haproxy_process(dir, bin, "haproxy-idle", listen, &sinks.addrs)
            .and_then(|process| measure_one("haproxy", process, listen, &sinks, n));
        match measured {
            Ok(rss) => Some(rss),
            Err(e) => {
                skipped = Some(Skipped {
                    name: HAPROXY_IDLE.into(),
                    reason: format!("{e:#}"),
                });
                None
            }
        }
    });
    Ok((IdleMemory::new(n, ours, theirs), skipped))
}

/// Warms `process` up, opens `n` idle sessions through it and reads its RSS around them; then
/// closes them and stops it.
fn measure_one(
    name: &str,
    mut process: Supervised,
    listen: SocketAddr,
    sinks: &SinkThread,
    n: usize,
) -> Result<IdleRss> {
    // The previous balancer's sessions must be gone from the sinks before they count ours.
    wait_for_idle_sinks(sinks)?;
    wait_until_greeting(name, listen)?;
    // Warm up allocator arenas and buffers with a few complete sessions first.
    let mut warm = LoadSpec::new(listen, 20, Budget::Sessions(200));
    warm.progress = false;
    loadgen::run_blocking(warm)?;
    std::thread::sleep(Duration::from_millis(300));
    let before = tree_rss_kib(process.pid())?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let held = rt.block_on(open_idle(listen, n))?;
    std::thread::sleep(Duration::from_millis(500));
    let after = tree_rss_kib(process.pid())?;
    let at_sinks: u64 = sinks.servers.iter().map(|s| s.open() as u64).sum();
    process.check_running()?;
    drop(held);
    process.stop(Duration::from_secs(10));
    anyhow::ensure!(
        at_sinks as usize >= n,
        "{name}: only {at_sinks} of {n} idle sessions reached the sinks"
    );
    let rss = IdleRss::new(before, after, n);
    println!(
        "bench: {name} RSS {before} KiB idle, {after} KiB with {n} idle sessions: {:.0} bytes per session",
        rss.bytes_per_session
    );
    Ok(rss)
}

/// Until the sinks hold no session (10 s at most).
fn wait_for_idle_sinks(sinks: &SinkThread) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let active: u64 = sinks.servers.iter().map(|s| s.open() as u64).sum();
        if active == 0 {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the sinks still hold {active} sessions of the previous balancer after 10 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Resident memory of `pid` and its child processes (a balancer's workers).
fn tree_rss_kib(pid: u32) -> Result<u64> {
    with_children(&[pid]).into_iter().map(rss_kib).sum()
}

fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no VmRSS in /proc/{pid}/status"))
}

/// Connects `n` clients and reads each greeting (so each session is relayed to a backend);
/// returns the open connections.
async fn open_idle(addr: SocketAddr, n: usize) -> Result<Vec<tokio::net::TcpStream>> {
    use tokio::io::AsyncReadExt;
    let mut held = Vec::with_capacity(n);
    let mut remaining = n;
    while remaining > 0 {
        let batch = remaining.min(200);
        let mut tasks = Vec::with_capacity(batch);
        for _ in 0..batch {
            tasks.push(tokio::spawn(async move {
                let mut s = tokio::net::TcpStream::connect(addr).await?;
                let mut buf = [0u8; 256];
                let got = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await??;
                anyhow::ensure!(
                    got >= 3 && &buf[..3] == b"220",
                    "idle session got no 220 greeting"
                );
                anyhow::Ok(s)
            }));
        }
        for t in tasks {
            held.push(t.await??);
        }
        remaining -= batch;
    }
    Ok(held)
}
