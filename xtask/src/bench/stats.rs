//! The benchmark's statistics: medians over rounds, the paired ratio against HAProxy, the
//! kernel path's ratios, and the summary of every contender's runs into results.json's form.

use std::collections::BTreeMap;
use std::process::Command;

use anyhow::Result;

use super::BenchOptions;
use super::contenders::{Contender, DIRECT_SMTP_SOURCE, LIMITS_CONTENDER};
use super::results::{
    BenchResults, ContenderResult, CpuUse, Distribution, IdleMemory, KernelPath, KernelRatio,
    Machine, PlainPath, PlainRatio, Skipped,
};
use super::testbed::Mode;
use crate::loadgen::LoadReport;
use crate::workspace;

pub fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    match values.len() {
        0 => 0.0,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

pub fn max_over_min(assigned: &BTreeMap<String, u64>) -> Option<f64> {
    let max = *assigned.values().max()?;
    let min = *assigned.values().min()?;
    (min > 0).then(|| max as f64 / min as f64)
}

/// Every contender's runs summarized, with the ratios between them.
pub fn summarize(
    opts: &BenchOptions,
    sinks: &str,
    contenders: Vec<Contender>,
    skipped: Vec<Skipped>,
    idle_memory: Option<IdleMemory>,
    distribution: Vec<Distribution>,
) -> Result<BenchResults> {
    let mut results: Vec<ContenderResult> = contenders
        .into_iter()
        .map(|c| {
            let mut rates: Vec<f64> = c.runs.iter().map(|r| r.sessions_per_s).collect();
            let mut p99: Vec<f64> = c.runs.iter().map(|r| r.latency_ms.session.p99).collect();
            ContenderResult {
                name: c.name,
                target: c.target.to_string(),
                min_sessions_per_s: rates.iter().copied().fold(f64::INFINITY, f64::min),
                max_sessions_per_s: rates.iter().copied().fold(0.0, f64::max),
                median_sessions_per_s: median(&mut rates),
                median_p99_ms: median(&mut p99),
                ratio_vs_haproxy: None,
                paired_ratio_vs_haproxy: None,
                ratio_vs_direct: None,
                failed_sessions: c.runs.iter().map(|r| r.sessions_failed).sum(),
                runs: c.runs,
                cpu_per_session: median_cpu(&c.cpu),
            }
        })
        .collect();
    let kernel_path = kernel_path(&results);
    let find = |prefix: &str| results.iter().find(|r| r.name.starts_with(prefix));
    let median_of = |r: &ContenderResult| Some(r.median_sessions_per_s).filter(|v| *v > 0.0);
    let haproxy = find("haproxy").and_then(median_of);
    let direct = find("direct").and_then(median_of);
    let haproxy_runs: Vec<f64> = find("haproxy")
        .map(|r| r.runs.iter().map(|run| run.sessions_per_s).collect())
        .unwrap_or_default();
    let loadgen_vs_smtp_source = {
        let named = |name: &str| results.iter().find(|r| r.name == name);
        let yardstick: Vec<f64> = named(DIRECT_SMTP_SOURCE)
            .map(|r| r.runs.iter().map(|run| run.sessions_per_s).collect())
            .unwrap_or_default();
        named("direct").and_then(|direct| paired_ratio(&direct.runs, &yardstick))
    };
    let limits_vs_none = {
        let named = |name: &str| results.iter().find(|r| r.name == name);
        let plain: Vec<f64> = named("switchyard least_conn")
            .map(|r| r.runs.iter().map(|run| run.sessions_per_s).collect())
            .unwrap_or_default();
        named(LIMITS_CONTENDER).and_then(|limited| paired_ratio(&limited.runs, &plain))
    };
    for r in &mut results {
        r.ratio_vs_haproxy = haproxy.map(|h| r.median_sessions_per_s / h);
        r.paired_ratio_vs_haproxy = paired_ratio(&r.runs, &haproxy_runs);
        r.ratio_vs_direct = direct.map(|d| r.median_sessions_per_s / d);
    }
    let rustc = workspace::output(Command::new("rustc").arg("-V")).unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut command = String::from("cargo xtask bench");
    for a in std::env::args().skip(2) {
        command.push(' ');
        command.push_str(&a);
    }
    Ok(BenchResults {
        schema: 1,
        command,
        machine: Machine {
            cpus: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(0),
            kernel: format!("Linux {}", kernel.trim()),
            rustc: rustc.trim().to_string(),
        },
        quick: opts.quick,
        rounds: opts.rounds,
        sessions_per_run: opts.sessions_per_run,
        concurrency: opts.concurrency,
        message_size: opts.size,
        sinks: sinks.to_string(),
        load_generator: if opts.smtp_source {
            "smtp-source".to_string()
        } else {
            "xtask loadgen".to_string()
        },
        contenders: results,
        skipped,
        idle_memory,
        distribution,
        kernel_path,
        loadgen_vs_smtp_source,
        limits_vs_none,
        xdp_cost: None,
        reload: None,
        metrics: None,
        synflood: None,
        balancers: None,
    })
}

/// Median over rounds of `runs[i] / baseline[i]` (one run per contender per round).
fn paired_ratio(runs: &[LoadReport], baseline: &[f64]) -> Option<f64> {
    let mut ratios: Vec<f64> = runs
        .iter()
        .zip(baseline)
        .filter(|(_, b)| **b > 0.0)
        .map(|(r, b)| r.sessions_per_s / b)
        .collect();
    (!ratios.is_empty()).then(|| median(&mut ratios))
}

fn median_cpu(runs: &[CpuUse]) -> Option<CpuUse> {
    if runs.is_empty() {
        return None;
    }
    let m = |f: fn(&CpuUse) -> f64| median(&mut runs.iter().map(f).collect::<Vec<_>>());
    Some(CpuUse {
        total_us: m(|c| c.total_us),
        softirq_us: m(|c| c.softirq_us),
        steal_us: m(|c| c.steal_us),
        loadgen_us: m(|c| c.loadgen_us),
        sinks_us: m(|c| c.sinks_us),
        balancer_us: m(|c| c.balancer_us),
        other_us: m(|c| c.other_us),
    })
}

/// XDP against plain routing and against the proxy, all from the namespace topology.
fn kernel_path(results: &[ContenderResult]) -> Option<KernelPath> {
    let get = |mode: Mode| results.iter().find(|r| r.name == mode.contender());
    let routing = get(Mode::Routing)?;
    let proxy = get(Mode::Proxy)?;
    let added = |r: &ContenderResult| -> Option<f64> {
        Some(r.cpu_per_session.as_ref()?.total_us - routing.cpu_per_session.as_ref()?.total_us)
    };
    let xdp = [Mode::Dsr, Mode::Nat]
        .into_iter()
        .filter_map(get)
        .map(|r| KernelRatio {
            name: r.name.clone(),
            vs_routing: r.median_sessions_per_s
                / routing.median_sessions_per_s.max(f64::MIN_POSITIVE),
            vs_proxy: r.median_sessions_per_s / proxy.median_sessions_per_s.max(f64::MIN_POSITIVE),
            added_cpu_us: added(r),
        })
        .collect();
    Some(KernelPath {
        routing_sessions_per_s: routing.median_sessions_per_s,
        proxy_sessions_per_s: proxy.median_sessions_per_s,
        proxy_added_cpu_us: added(proxy),
        xdp,
        plain: plain_path(results),
    })
}

/// The plain network's xdp contenders against one MTA direct, paired round by round (the
/// median of the per-round ratios: a slow round slows both).
fn plain_path(results: &[ContenderResult]) -> Option<PlainPath> {
    let get = |mode: Mode| results.iter().find(|r| r.name == mode.contender());
    let direct = get(Mode::PlainDirect)?;
    let direct_rates: Vec<f64> = direct.runs.iter().map(|r| r.sessions_per_s).collect();
    let xdp = [Mode::PlainDsr, Mode::PlainNat, Mode::PlainRouting]
        .into_iter()
        .filter_map(get)
        .filter_map(|r| {
            Some(PlainRatio {
                name: r.name.clone(),
                vs_direct: paired_ratio(&r.runs, &direct_rates)?,
            })
        })
        .collect();
    Some(PlainPath {
        direct_sessions_per_s: direct.median_sessions_per_s,
        xdp,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_even_and_odd() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), 2.5);
    }

    /// Round by round: a slow round slows both contenders, and the ratio stays put.
    #[test]
    fn paired_ratio_compares_runs_of_the_same_round() {
        let run = |rate: f64| LoadReport {
            sessions_per_s: rate,
            ..Default::default()
        };
        let ours = [run(1100.0), run(550.0), run(2200.0)];
        let baseline = [1000.0, 500.0, 2000.0];
        let paired = paired_ratio(&ours, &baseline).expect("ratios");
        assert!((paired - 1.1).abs() < 1e-9, "{paired}");
        assert_eq!(paired_ratio(&ours, &[]), None);
    }

    #[test]
    fn max_over_min_of_the_assigned_sessions() {
        let assigned = BTreeMap::from([("mta1".to_string(), 334), ("mta2".to_string(), 333)]);
        assert!((max_over_min(&assigned).unwrap_or(0.0) - 334.0 / 333.0).abs() < 1e-9);
        let idle = BTreeMap::from([("mta1".to_string(), 3), ("mta2".to_string(), 0)]);
        assert_eq!(max_over_min(&idle), None);
    }
}
