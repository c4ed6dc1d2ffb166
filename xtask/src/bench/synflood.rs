//! What a one-source SYN flood costs legitimate sessions on the xdp path: in the kernel
//! testbed ([`Testbed`]), switchyard's xdp dsr with `[service.limits]`
//! ([`SYNFLOOD_LIMITS`]) in front of the three sinks; the load generator in the client's
//! namespace runs a fixed number of sessions per round, alternately with and without a thread
//! beside it (in the same namespace) sending crafted SYNs from one spoofed address as fast as
//! it can. The flood is bounded: it stops when its round ends, or after a fixed number of SYNs.
//! The kernel's drop counters (`ctl show` through the admin socket) are read around every round,
//! so the figures show that the flood was real and was dropped, and that the legitimate client
//! was never refused.
//!
//! Output: the figures printed, `target/bench/synflood.json`, and results.json's `synflood`.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde::{Deserialize, Serialize};
use switchyard::control::{Request, SourceRejections};
use testkit::netns::Netns;
use testkit::raw_syn;

use super::BenchOptions;
use super::contenders::{Contender, Driver};
use super::drive;
use super::stats::median;
use super::testbed::{Mode, SYNFLOOD_LIMITS, Testbed};
use crate::loadgen::LoadReport;

/// The flood's source: in the testbed's range (198.18.0.0/15), held by no namespace, so no
/// TCP stack answers the backends' SYN-ACKs to it.
pub const FLOOD_SOURCE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 250);

/// Where the sender-only reference floods (in the testbed's range, routed nowhere else).
const DISCARDED: Ipv4Addr = Ipv4Addr::new(198, 19, 255, 1);

/// A flood never runs longer than this, whatever happens to its round.
const FLOOD_DEADLINE: Duration = Duration::from_secs(120);

/// `cargo xtask bench --synflood-only` and results.json's `synflood`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SynfloodFigures {
    pub rounds: usize,
    pub sessions_per_run: u64,
    pub concurrency: usize,
    /// The service's `[service.limits]` table, as configured.
    pub limits: String,
    pub flood_source: String,
    /// The most SYNs one round's flood may send.
    pub max_syns_per_round: u64,
    /// Sessions/s per round without the flood.
    pub calm: Vec<f64>,
    /// Sessions/s per round with the flood running.
    pub flooded: Vec<f64>,
    pub calm_median: f64,
    pub flooded_median: f64,
    /// Median of the per-round ratios flooded / calm (target at least 0.9: the flood costs
    /// legitimate sessions at most 10 %).
    pub ratio: f64,
    /// SYNs the flood sent, per round.
    pub syns_sent: Vec<u64>,
    /// The flood's rate, per round (SYNs/s while it ran).
    pub syns_per_s: Vec<f64>,
    /// The share of one CPU the sending thread used while it ran, per round (its sends and the
    /// kernel's transmit path, which on a veth runs the balancer's XDP program too).
    pub sender_cpu: Vec<f64>,
    /// The kernel's drops during the flooded rounds: SYNs of the flood's source at its
    /// `per_source_connections` (`too_many`) and over its `per_source_rate` (`too_fast`).
    pub too_many: u64,
    pub too_fast: u64,
    /// The same counters during the calm rounds (0: the legitimate client is never refused).
    pub calm_drops: u64,
    /// Sessions that failed, over all rounds.
    pub sessions_failed: u64,
    /// Sessions/s per round with the same flood sent to an address that the client's own
    /// namespace discards (a veth pair whose other end drops every frame): the sender's cost
    /// alone, none of it reaching the balancer. On a machine with few CPUs most of the flood's cost is this.
    pub sender_only: Vec<f64>,
    pub sender_only_median: f64,
    /// Median of the per-round ratios sender-only / calm.
    pub sender_only_ratio: f64,
}

impl SynfloodFigures {
    /// The medians and paired ratios of the rounds recorded.
    fn summarize(&mut self) {
        self.calm_median = median(&mut self.calm.clone());
        self.flooded_median = median(&mut self.flooded.clone());
        self.sender_only_median = median(&mut self.sender_only.clone());
        self.ratio = paired_ratio(&self.flooded, &self.calm);
        self.sender_only_ratio = paired_ratio(&self.sender_only, &self.calm);
    }

    /// SYNs the flood sent over all rounds.
    pub fn syns_total(&self) -> u64 {
        self.syns_sent.iter().sum()
    }

    /// One run of `arm`: its sessions/s, and the flood and the kernel's drops during it.
    fn record(
        &mut self,
        arm: Arm,
        report: &LoadReport,
        flood: Option<raw_syn::FloodReport>,
        before: &SourceRejections,
        after: &SourceRejections,
    ) {
        self.sessions_failed += report.sessions_failed;
        let too_many = after.too_many - before.too_many;
        let too_fast = after.too_fast - before.too_fast;
        match (arm, flood) {
            (Arm::Flooded, Some(flood)) => {
                let seconds = flood.elapsed.as_secs_f64().max(f64::MIN_POSITIVE);
                self.flooded.push(report.sessions_per_s);
                self.syns_sent.push(flood.sent);
                self.syns_per_s.push(flood.sent as f64 / seconds);
                self.sender_cpu.push(flood.cpu.as_secs_f64() / seconds);
                self.too_many += too_many;
                self.too_fast += too_fast;
            }
            (Arm::SenderOnly, _) => {
                self.sender_only.push(report.sessions_per_s);
                self.calm_drops += too_many + too_fast;
            }
            _ => {
                self.calm.push(report.sessions_per_s);
                self.calm_drops += too_many + too_fast;
            }
        }
    }
}

/// The median of the per-round ratios `runs[i] / reference[i]`.
fn paired_ratio(runs: &[f64], reference: &[f64]) -> f64 {
    let mut ratios: Vec<f64> = runs.iter().zip(reference).map(|(r, c)| r / c).collect();
    median(&mut ratios)
}

/// What runs beside the load generator in a round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Arm {
    Calm,
    Flooded,
    /// The flood, to an address the client's namespace discards.
    SenderOnly,
}

impl Arm {
    const ALL: [Arm; 3] = [Arm::Calm, Arm::Flooded, Arm::SenderOnly];
}

/// An address, on the VIP's port, that the client's namespace sends into a veth pair of its
/// own whose other end discards every frame (addressed to a MAC address nobody has): a flood
/// there costs the sender the same transmit path and the receiving end its cheapest drop,
/// and never reaches the balancer.
fn reference_target(testbed: &Testbed, vip: SocketAddrV4) -> Result<SocketAddrV4> {
    let client = &testbed.net.client;
    let (route, neighbour) = (format!("{DISCARDED}/32"), DISCARDED.to_string());
    let steps: [&[&str]; 5] = [
        &[
            "link", "add", "discard0", "type", "veth", "peer", "name", "discard1",
        ],
        &["link", "set", "discard0", "up"],
        &["link", "set", "discard1", "up"],
        &["route", "add", &route, "dev", "discard0"],
        &[
            "neigh",
            "replace",
            &neighbour,
            "lladdr",
            "02:00:00:00:00:99",
            "dev",
            "discard0",
        ],
    ];
    for args in steps {
        client.ip(args)?;
    }
    Ok(SocketAddrV4::new(DISCARDED, vip.port()))
}

/// Rounds, sessions per round and the flood's bound: 5 x 20000 sessions and 3 million SYNs
/// (quick: 3 x 3000 and 500000, about 20 s with the testbed's setup).
pub fn plan(quick: bool) -> (usize, u64, u64) {
    if quick {
        (3, 3000, 500_000)
    } else {
        (5, 20_000, 3_000_000)
    }
}

/// Builds the kernel testbed and measures (root only).
pub fn measure(dir: &Path, switchyard: &Path, quick: bool) -> Result<SynfloodFigures> {
    ensure!(
        crate::workspace::is_root(),
        "the SYN-flood measurement needs root (network namespaces and XDP)"
    );
    let (rounds, sessions, max_syns) = plan(quick);
    let mut testbed = Testbed::build(dir, switchyard)?;
    testbed.activate(Mode::DsrLimits)?;
    let opts = BenchOptions::new(quick, Some(rounds), Some(sessions));
    let target = Testbed::target(Mode::DsrLimits);
    let client = Contender {
        driver: Driver::Netns(testbed.client_namespace(Mode::DsrLimits)),
        mode: Some(Mode::DsrLimits),
        ..Contender::local(Mode::DsrLimits.contender(), target, Vec::new())
    };
    let socket = testbed.admin_socket(Mode::DsrLimits);
    let SocketAddr::V4(vip) = target else {
        anyhow::bail!("the testbed's VIP {target} is not IPv4");
    };
    println!(
        "synflood: {rounds} round(s) of each arm (calm, flooded, sender only) x {sessions} sessions, {} parallel, to {target}; flood from {FLOOD_SOURCE} (at most {max_syns} SYNs a round){}",
        opts.concurrency,
        SYNFLOOD_LIMITS.replace('\n', " ")
    );
    let mut figures = SynfloodFigures {
        rounds,
        sessions_per_run: sessions,
        concurrency: opts.concurrency,
        limits: SYNFLOOD_LIMITS.trim().to_string(),
        flood_source: FLOOD_SOURCE.to_string(),
        max_syns_per_round: max_syns,
        ..SynfloodFigures::default()
    };
    let reference = reference_target(&testbed, vip)?;
    for round in 0..rounds {
        // Each arm in turn, starting one further each round: none always runs first.
        for k in 0..Arm::ALL.len() {
            let arm = Arm::ALL[(k + round) % Arm::ALL.len()];
            let flood_target = match arm {
                Arm::Calm => None,
                Arm::Flooded => Some(vip),
                Arm::SenderOnly => Some(reference),
            };
            testbed.activate(Mode::DsrLimits)?;
            let before = drops(&socket)?;
            let flood = flood_target.map(|t| Flood::start(&testbed.net.client, t, max_syns));
            let report = drive::drive(&client, &opts, dir);
            let flood = flood.map(Flood::stop).transpose()?;
            let report = report?;
            let after = drops(&socket)?;
            figures.record(arm, &report, flood, &before, &after);
        }
        println!(
            "  synflood round {}/{rounds}: calm {:.0} sessions/s, flooded {:.0} sessions/s ({} SYNs at {:.0}/s, sender {:.0} % of a CPU), sender only {:.0} sessions/s",
            round + 1,
            figures.calm[round],
            figures.flooded[round],
            figures.syns_sent[round],
            figures.syns_per_s[round],
            figures.sender_cpu[round] * 100.0,
            figures.sender_only[round]
        );
    }
    drop(testbed);
    figures.summarize();
    std::fs::write(
        dir.join("synflood.json"),
        serde_json::to_string_pretty(&figures)? + "\n",
    )?;
    Ok(figures)
}

/// The printed summary.
pub fn describe(f: &SynfloodFigures) -> String {
    format!(
        "one-source SYN flood on xdp dsr with [service.limits]: {:.0} sessions/s flooded vs {:.0} calm (median of {} rounds each, {} sessions x {} parallel): paired ratio {:.3} ({:+.1} %, target at least 0.9); {} SYNs sent (median {:.0}/s, the sender using {:.0} % of one of the machine's {} CPUs), dropped in the kernel: {} at per_source_connections, {} over per_source_rate; {} drops in calm rounds, {} sessions failed; the same flood sent nowhere (sender only): {:.0} sessions/s, ratio {:.3}",
        f.flooded_median,
        f.calm_median,
        f.rounds,
        f.sessions_per_run,
        f.concurrency,
        f.ratio,
        (f.ratio - 1.0) * 100.0,
        f.syns_total(),
        median(&mut f.syns_per_s.clone()),
        median(&mut f.sender_cpu.clone()) * 100.0,
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        f.too_many,
        f.too_fast,
        f.calm_drops,
        f.sessions_failed,
        f.sender_only_median,
        f.sender_only_ratio
    )
}

/// The service's per-source drop counters now, from `ctl show`.
fn drops(socket: &Path) -> Result<SourceRejections> {
    let reply = switchyard::ctl::ask(socket, &Request::Show { service: None })
        .map_err(|e| anyhow::anyhow!("ctl show: {e}"))?;
    let show = reply
        .show
        .with_context(|| format!("ctl show through {} returned no state", socket.display()))?;
    let service = show
        .services
        .into_iter()
        .next()
        .context("ctl show lists no service")?;
    Ok(service.sources)
}

/// A thread in the client's namespace sending SYNs from [`FLOOD_SOURCE`] to the VIP, each
/// from the next source port (a new flow each, not a retransmission), unpaced, until stopped
/// or after `max` SYNs.
struct Flood {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Result<raw_syn::FloodReport>>,
}

impl Flood {
    fn start(client: &Netns, target: SocketAddrV4, max: u64) -> Flood {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            client.spawn(move || raw_syn::flood(FLOOD_SOURCE, target, max, FLOOD_DEADLINE, &stop))
        };
        Flood { stop, thread }
    }

    /// What the flood did.
    fn stop(self) -> Result<raw_syn::FloodReport> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("the SYN flood's thread panicked"))?
    }
}
