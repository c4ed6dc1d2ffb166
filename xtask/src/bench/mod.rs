//! `cargo xtask bench`: the side-by-side benchmark. Three sink MTAs, then the load generator
//! against every contender (direct to one sink, switchyard with each algorithm, HAProxy, nginx,
//! the XDP path where available), alternately over several rounds, so that every ratio compares
//! runs made minutes apart on the same machine. Also memory per idle session (switchyard and
//! HAProxy side by side) and switchyard's distribution of sessions over the backends.
//!
//! As root, the kernel path too: plain routing, switchyard's proxy and its XDP path (dsr, nat)
//! take turns in one network-namespace testbed in front of the same three sinks
//! ([`testbed`]); each of those runs also records the CPU time every part used; and the XDP
//! program's own cost per packet, in the kernel, without a network ([`xdp_cost`]).
//!
//! This module holds the options and the orchestration; [`contenders`] starts what is measured,
//! [`drive`] runs load through it, [`cpu`] accounts CPU time, [`idle`] measures idle memory,
//! [`stats`] summarizes, [`results`] is results.json's schema and [`report`] its tables;
//! [`reload`] and [`metrics`] measure what a reload and a Prometheus scraper cost, [`synflood`]
//! what a one-source SYN flood costs legitimate sessions on the xdp path (root), [`balancers`]
//! how fast a BIRD router stops routing to a drained balancer and sessions/s through one
//! balancer host against two (root, BIRD 2).
//!
//! Outputs: a markdown table on stdout, `target/bench/results.json`, `target/bench/chart.png`.

pub mod balancers;
mod contenders;
mod cpu;
mod drive;
mod idle;
pub mod metrics;
pub mod reload;
mod report;
pub mod results;
mod stats;
pub mod synflood;
mod testbed;
mod xdp_cost;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::workspace;
use contenders::{Contender, DIRECT_SMTP_SOURCE, Driver};
use cpu::{CpuSample, with_children};
use results::{Distribution, Skipped};
use testbed::Testbed;
use testkit::supervise;

pub use contenders::assigned_from_totals;
pub use report::markdown;
pub use results::{BenchResults, validate};

pub const ALGORITHMS: [&str; 5] = [
    "round_robin",
    "weighted_round_robin",
    "least_conn",
    "ip_hash",
    "least_time",
];

const SINK_PORTS: [u16; 3] = [3601, 3602, 3603];
const SWITCHYARD_BASE_PORT: u16 = 3611;

#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub quick: bool,
    pub rounds: usize,
    pub sessions_per_run: u64,
    pub concurrency: usize,
    pub size: usize,
    pub idle_sessions: usize,
    /// Only the kernel path's contenders (routing, proxy, xdp dsr, xdp nat in namespaces).
    pub kernel_only: bool,
    /// Drive the loopback contenders with Postfix's smtp-source instead of the built-in load
    /// generator (the workload the proxy's goal against HAProxy is stated in: `smtp-source -s 50 -m N -l 2048`).
    pub smtp_source: bool,
}

impl BenchOptions {
    pub fn new(quick: bool, rounds: Option<usize>, messages: Option<u64>) -> Self {
        Self {
            quick,
            rounds: rounds.unwrap_or(if quick { 1 } else { 3 }).max(1),
            sessions_per_run: messages.unwrap_or(if quick { 1000 } else { 20_000 }),
            concurrency: 50,
            size: 2048,
            idle_sessions: if quick { 1000 } else { 5000 },
            kernel_only: false,
            smtp_source: false,
        }
    }
}

pub fn bench_dir() -> PathBuf {
    workspace::target_dir().join("bench")
}

/// `--xdp-cost-only`: the XDP program's cost per packet alone, printed (`xdp_cost::measure`),
/// or an error saying why it cannot be measured here.
pub fn xdp_cost_only(quick: bool) -> Result<results::XdpCost> {
    let mut skipped = Vec::new();
    match xdp_cost::measure_or_skip(quick, &mut skipped) {
        Some(cost) => Ok(cost),
        None => {
            let why: Vec<String> = skipped.iter().map(|s| s.reason.clone()).collect();
            anyhow::bail!("cannot measure the XDP program's cost: {}", why.join("; "))
        }
    }
}

pub fn run(opts: BenchOptions) -> Result<BenchResults> {
    supervise::stop_children_on_signal();
    workspace::raise_nofile_limit();
    let dir = bench_dir();
    std::fs::create_dir_all(&dir)?;
    let switchyard = workspace::switchyard_release();
    anyhow::ensure!(
        switchyard.is_file(),
        "{} missing: build it with cargo build --release -p switchyard",
        switchyard.display()
    );
    println!(
        "bench: {} round(s) x {} sessions, {} parallel, {} B messages{}",
        opts.rounds,
        opts.sessions_per_run,
        opts.concurrency,
        opts.size,
        if opts.quick { " (quick)" } else { "" }
    );

    let (mut testbed, kernel, kernel_skipped) = contenders::kernel_contenders(&dir, &switchyard)?;
    if opts.kernel_only {
        anyhow::ensure!(
            testbed.is_some(),
            "--kernel-only needs root (network namespaces and XDP)"
        );
        let sinks_kind = testbed.as_ref().map_or("", |t| t.sinks_kind);
        return run_contenders(
            &opts,
            &dir,
            &switchyard,
            sinks_kind,
            &[],
            &[],
            kernel,
            kernel_skipped,
            testbed,
        );
    }
    let sink_addrs: Vec<SocketAddr> = SINK_PORTS
        .iter()
        .map(|p| SocketAddr::from(([127, 0, 0, 1], *p)))
        .collect();
    let (sinks_kind, sinks) = contenders::start_sinks(&dir, &sink_addrs)?;
    let sink_pids: Vec<u32> = sinks.iter().map(|s| s.pid()).collect();
    println!("bench: sinks ({sinks_kind}) on {}", list(&sink_addrs));
    if let Some(testbed) = &testbed {
        anyhow::ensure!(
            testbed.sinks_kind == sinks_kind,
            "the namespace sinks ({}) differ from the loopback ones ({sinks_kind})",
            testbed.sinks_kind
        );
    }

    let mut skipped = Vec::new();
    let mut contenders = vec![Contender::local("direct", sink_addrs[0], Vec::new())];
    // The load generator must never be what limits a comparison: smtp-source straight at the
    // same sink, in the same rounds, shows whether it keeps up.
    if !opts.smtp_source {
        match workspace::find_program("smtp-source") {
            Some(_) => {
                let mut yardstick = Contender::local(DIRECT_SMTP_SOURCE, sink_addrs[0], Vec::new());
                yardstick.driver = Driver::SmtpSource;
                contenders.push(yardstick);
            }
            None => skipped.push(Skipped {
                name: DIRECT_SMTP_SOURCE.into(),
                reason: "smtp-source (Debian package postfix) not installed".into(),
            }),
        }
    }
    for (i, alg) in ALGORITHMS.iter().enumerate() {
        contenders.push(contenders::start_switchyard(
            &dir,
            &switchyard,
            alg,
            SWITCHYARD_BASE_PORT + i as u16,
            &sink_addrs,
        )?);
    }
    contenders.push(contenders::start_switchyard_with_limits(
        &dir,
        &switchyard,
        SWITCHYARD_BASE_PORT + ALGORITHMS.len() as u16,
        &sink_addrs,
    )?);
    match workspace::find_program("haproxy") {
        Some(bin) => contenders.push(contenders::start_haproxy(&dir, &bin, &sink_addrs)?),
        None => skipped.push(Skipped {
            name: "haproxy".into(),
            reason: "haproxy not installed".into(),
        }),
    }
    match (
        workspace::find_program("nginx"),
        contenders::nginx_stream_module(),
    ) {
        (Some(bin), Some(module)) => {
            contenders.push(contenders::start_nginx(&dir, &bin, &module, &sink_addrs)?)
        }
        _ => skipped.push(Skipped {
            name: "nginx".into(),
            reason: "nginx or its stream module not installed".into(),
        }),
    }
    contenders.extend(kernel);
    skipped.extend(kernel_skipped);
    run_contenders(
        &opts,
        &dir,
        &switchyard,
        sinks_kind,
        &sink_pids,
        &sink_addrs,
        contenders,
        skipped,
        testbed.take(),
    )
}

/// Runs every contender alternately over the rounds, then writes and checks the results.
#[allow(clippy::too_many_arguments)]
fn run_contenders(
    opts: &BenchOptions,
    dir: &Path,
    switchyard: &Path,
    sinks_kind: &str,
    sink_pids: &[u32],
    sink_addrs: &[SocketAddr],
    mut contenders: Vec<Contender>,
    mut skipped: Vec<Skipped>,
    mut testbed: Option<Testbed>,
) -> Result<BenchResults> {
    // Not load: the program alone, before any contender runs.
    let xdp_cost = xdp_cost::measure_or_skip(opts.quick, &mut skipped);
    for s in &skipped {
        println!("bench: skipping {}: {}", s.name, s.reason);
    }
    for c in &contenders {
        drive::wait_ready(c)?;
    }
    for round in 0..opts.rounds {
        println!("bench: round {}/{}", round + 1, opts.rounds);
        // Rotate the order so that no contender always runs first or right after another.
        let n = contenders.len();
        for k in 0..n {
            let c = &mut contenders[(k + round) % n];
            run_once(c, opts, dir, sink_pids, testbed.as_mut())?;
        }
    }
    // Stops the balancer and the sinks in the namespaces, then deletes them.
    drop(testbed);

    let distribution = stop_and_collect_distributions(&mut contenders);
    let idle_memory = if opts.kernel_only {
        None
    } else {
        idle_memory(opts, dir, switchyard, &mut skipped)
    };
    let mut results = stats::summarize(
        opts,
        sinks_kind,
        contenders,
        skipped,
        idle_memory,
        distribution,
    )?;
    results.xdp_cost = xdp_cost;
    if !opts.kernel_only {
        results.reload = reload_figures(opts, dir, switchyard, &mut results.skipped);
        results.metrics = metrics_figures(opts.quick, dir, switchyard, sink_addrs)
            .map_err(|error| {
                println!("bench: /metrics measurement failed: {error:#}");
                results.skipped.push(Skipped {
                    name: "metrics".into(),
                    reason: format!("{error:#}"),
                });
            })
            .ok();
        results.synflood = synflood_figures(opts.quick, dir, switchyard, &mut results.skipped);
        results.balancers = balancer_figures(opts.quick, switchyard, &mut results.skipped);
    }
    report::print_table(&results);
    // A kernel-only run does not replace the full benchmark's results.
    let stem = if opts.kernel_only { "kernel-" } else { "" };
    let json = dir.join(format!("{stem}results.json"));
    std::fs::write(&json, serde_json::to_vec_pretty(&results)?)
        .with_context(|| format!("writing {}", json.display()))?;
    let validated = validate(&json)?;
    let chart = dir.join(format!("{stem}chart.png"));
    crate::chart::draw(&validated, &chart)?;
    println!("\nbench: wrote {} and {}", json.display(), chart.display());
    Ok(validated)
}

/// The reload measurement ([`reload`]), or a skipped entry saying why it could not run.
fn reload_figures(
    opts: &BenchOptions,
    dir: &Path,
    switchyard: &Path,
    skipped: &mut Vec<Skipped>,
) -> Option<reload::ReloadFigures> {
    let sessions = if opts.quick { 1000 } else { 5000 };
    let measured = reload::measure(dir, switchyard, sessions);
    printed_or_skipped("reload", measured, reload::describe, skipped)
}

/// A measurement's figures, printed; or, when it failed, `None` and a skipped entry `name`
/// saying why.
fn printed_or_skipped<T>(
    name: &str,
    measured: Result<T>,
    describe: fn(&T) -> String,
    skipped: &mut Vec<Skipped>,
) -> Option<T> {
    match measured {
        Ok(figures) => {
            println!("bench: {}", describe(&figures));
            Some(figures)
        }
        Err(error) => {
            println!("bench: {name} measurement not made: {error:#}");
            skipped.push(Skipped {
                name: name.into(),
                reason: format!("{error:#}"),
            });
            None
        }
    }
}

/// `--reload-only`: the reload measurement alone, printed.
pub fn reload_only(quick: bool) -> Result<reload::ReloadFigures> {
    supervise::stop_children_on_signal();
    workspace::raise_nofile_limit();
    let dir = bench_dir();
    std::fs::create_dir_all(&dir)?;
    let figures = reload::measure(
        &dir,
        &workspace::switchyard_release(),
        if quick { 1000 } else { 5000 },
    )?;
    println!("{}", reload::describe(&figures));
    Ok(figures)
}

/// The paired `/metrics` measurement ([`metrics`]) in front of `sinks`: 5 rounds of 20000
/// sessions each way (quick: 3 of 2000).
fn metrics_figures(
    quick: bool,
    dir: &Path,
    switchyard: &Path,
    sinks: &[SocketAddr],
) -> Result<metrics::MetricsFigures> {
    let (rounds, sessions) = if quick { (3, 2000) } else { (5, 20_000) };
    let figures = metrics::measure(dir, switchyard, sinks, rounds, sessions, 50)?;
    println!("bench: {}", metrics::describe(&figures));
    Ok(figures)
}

/// `--metrics-only`: the `/metrics` measurement alone, in front of sinks of its own, printed.
pub fn metrics_only(quick: bool) -> Result<metrics::MetricsFigures> {
    supervise::stop_children_on_signal();
    workspace::raise_nofile_limit();
    let dir = bench_dir();
    std::fs::create_dir_all(&dir)?;
    let sink_addrs: Vec<SocketAddr> = SINK_PORTS
        .iter()
        .map(|p| SocketAddr::from(([127, 0, 0, 1], *p)))
        .collect();
    let (_, _sinks) = contenders::start_sinks(&dir, &sink_addrs)?;
    metrics_figures(quick, &dir, &workspace::switchyard_release(), &sink_addrs)
}

/// The SYN-flood measurement ([`synflood`]) as root, or a skipped entry saying why not.
fn synflood_figures(
    quick: bool,
    dir: &Path,
    switchyard: &Path,
    skipped: &mut Vec<Skipped>,
) -> Option<synflood::SynfloodFigures> {
    let measured = if workspace::is_root() {
        synflood::measure(dir, switchyard, quick)
    } else {
        Err(anyhow::anyhow!("needs root (network namespaces and XDP)"))
    };
    printed_or_skipped("synflood", measured, synflood::describe, skipped)
}

/// `--synflood-only`: the SYN-flood measurement alone (root), printed.
pub fn synflood_only(quick: bool) -> Result<synflood::SynfloodFigures> {
    supervise::stop_children_on_signal();
    workspace::raise_nofile_limit();
    let dir = bench_dir();
    std::fs::create_dir_all(&dir)?;
    let figures = synflood::measure(&dir, &workspace::switchyard_release(), quick)?;
    println!("{}", synflood::describe(&figures));
    Ok(figures)
}

/// The several-balancers measurement ([`balancers`]) as root, or a skipped entry saying why
/// not.
fn balancer_figures(
    quick: bool,
    switchyard: &Path,
    skipped: &mut Vec<Skipped>,
) -> Option<balancers::BalancerFigures> {
    let measured = if workspace::is_root() {
        balancers::measure(switchyard, quick)
    } else {
        Err(anyhow::anyhow!("needs root (network namespaces and BIRD)"))
    };
    printed_or_skipped("balancers", measured, balancers::describe, skipped)
}

/// `--balancers-only`: the several-balancers measurement alone (root, BIRD 2), printed and
/// written to `target/bench/balancers.json`.
pub fn balancers_only(quick: bool) -> Result<balancers::BalancerFigures> {
    supervise::stop_children_on_signal();
    workspace::raise_nofile_limit();
    let dir = bench_dir();
    std::fs::create_dir_all(&dir)?;
    let figures = balancers::measure(&workspace::switchyard_release(), quick)?;
    balancers::check(&figures)?;
    println!("{}", balancers::describe(&figures));
    let json = dir.join("balancers.json");
    std::fs::write(&json, serde_json::to_vec_pretty(&figures)?)
        .with_context(|| format!("writing {}", json.display()))?;
    println!("bench: wrote {}", json.display());
    Ok(figures)
}

/// One run of load through `c`, with the CPU time every part used; printed and recorded.
fn run_once(
    c: &mut Contender,
    opts: &BenchOptions,
    dir: &Path,
    sink_pids: &[u32],
    testbed: Option<&mut Testbed>,
) -> Result<()> {
    for p in &mut c.processes {
        p.check_running()?;
    }
    let (report, used) = match (c.mode, testbed) {
        (Some(mode), Some(testbed)) => {
            testbed.activate(mode)?;
            let before = testbed.cpu_sample();
            let report = drive::drive(c, opts, dir)?;
            let used = testbed.cpu_sample().since(&before, report.sessions_ok);
            (report, used)
        }
        _ => {
            let balancer = with_children(&c.processes.iter().map(|p| p.pid()).collect::<Vec<_>>());
            let before = CpuSample::take(sink_pids, &balancer);
            let report = drive::drive(c, opts, dir)?;
            let used = CpuSample::take(sink_pids, &balancer).since(&before, report.sessions_ok);
            (report, used)
        }
    };
    println!(
        "  {:<32} {:>7.0} sessions/s  p99 {:>7.2} ms  failed {}",
        c.name, report.sessions_per_s, report.latency_ms.session.p99, report.sessions_failed
    );
    println!(
        "  {:<32} CPU us/session: {:.0} in all ({:.0} softirq); loadgen {:.0}, sinks {:.0}, balancer {:.0}, other {:.0}; stolen by the hypervisor {:.0}",
        "",
        used.total_us,
        used.softirq_us,
        used.loadgen_us,
        used.sinks_us,
        used.balancer_us,
        used.other_us,
        used.steal_us
    );
    c.cpu.push(used);
    c.runs.push(report);
    Ok(())
}

/// Stops every contender's processes and reads each switchyard's sessions per backend from
/// the totals it wrote at shutdown.
fn stop_and_collect_distributions(contenders: &mut [Contender]) -> Vec<Distribution> {
    let mut distribution = Vec::new();
    for c in contenders {
        for p in &mut c.processes {
            p.stop(Duration::from_secs(10));
        }
        let (Some(algorithm), Some(totals)) = (&c.algorithm, &c.totals) else {
            continue;
        };
        let assigned = assigned_from_totals(totals).unwrap_or_else(|e| {
            println!("bench: no distribution for {}: {e:#}", c.name);
            Default::default()
        });
        distribution.push(Distribution {
            algorithm: algorithm.clone(),
            max_over_min: stats::max_over_min(&assigned),
            assigned,
        });
    }
    distribution
}

/// switchyard's memory per idle session, and HAProxy's beside it when installed (a failure of
/// HAProxy's alone is listed in `skipped`).
fn idle_memory(
    opts: &BenchOptions,
    dir: &Path,
    switchyard: &Path,
    skipped: &mut Vec<Skipped>,
) -> Option<results::IdleMemory> {
    let haproxy = workspace::find_program("haproxy");
    match idle::measure(dir, switchyard, haproxy.as_deref(), opts.idle_sessions) {
        Ok((memory, haproxy_skipped)) => {
            skipped.extend(haproxy_skipped);
            Some(memory)
        }
        Err(e) => {
            println!("bench: idle-session memory not measured: {e:#}");
            None
        }
    }
}

fn list(addrs: &[SocketAddr]) -> String {
    addrs
        .iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}
