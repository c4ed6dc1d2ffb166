//! results.json: the benchmark's schema (schema 1; fields added since have defaults, so older
//! files still read) and the check that a written file is complete and plausible.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, ensure};
use serde::{Deserialize, Serialize};

use crate::loadgen::LoadReport;

/// results.json.
#[derive(Debug, Serialize, Deserialize)]
pub struct BenchResults {
    pub schema: u32,
    pub command: String,
    pub machine: Machine,
    pub quick: bool,
    pub rounds: usize,
    pub sessions_per_run: u64,
    pub concurrency: usize,
    pub message_size: usize,
    /// "smtp-sink" (Postfix) or "xtask sink".
    pub sinks: String,
    /// What drove the loopback contenders: "xtask loadgen" or "smtp-source".
    #[serde(default)]
    pub load_generator: String,
    pub contenders: Vec<ContenderResult>,
    /// Contenders that could not run here, and why.
    pub skipped: Vec<Skipped>,
    pub idle_memory: Option<IdleMemory>,
    pub distribution: Vec<Distribution>,
    /// The kernel path's ratios, when it ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_path: Option<KernelPath>,
    /// The built-in load generator's rate over smtp-source's, both straight at the same sink,
    /// median of the per-round ratios (at least 1: the generator never limits a comparison).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loadgen_vs_smtp_source: Option<f64>,
    /// The XDP program's cost per packet (BPF_PROG_TEST_RUN), when it could be measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xdp_cost: Option<XdpCost>,
    /// switchyard least_conn with `[service.limits]` configured (never triggered) over the same
    /// without, median of the per-round ratios (target: within 3 %).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits_vs_none: Option<f64>,
    /// What a reload costs a large running config (1000 backends, thousands of sessions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reload: Option<super::reload::ReloadFigures>,
    /// Sessions/s with `/metrics` scraped every second against no admin listener, paired.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<super::metrics::MetricsFigures>,
    /// Sessions/s on the xdp path with a one-source SYN flood against without, paired (root).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub synflood: Option<super::synflood::SynfloodFigures>,
    /// Several balancers behind a BIRD router with ECMP: route withdrawal times after a drain
    /// and after the last backend went, sessions/s through one host against two (root).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balancers: Option<super::balancers::BalancerFigures>,
}

/// The XDP program's cost per packet in nanoseconds per run, from `BPF_PROG_TEST_RUN`, beside
/// a pass-everything program (the floor) in the same run (targets: established <= 3x the
/// floor, non-VIP <= 1.5x). See `bench::xdp_cost` for what each case is.
#[derive(Debug, Serialize, Deserialize)]
pub struct XdpCost {
    /// Runs per call of the repeated cases (floor, established, non-VIP).
    pub repeat: u32,
    pub floor_ns: f64,
    pub established_ns: f64,
    pub non_vip_ns: f64,
    /// Distinct SYNs of the new-flow case, one run each.
    pub new_flow_syns: u64,
    pub new_flow_ns: f64,
    /// The floor measured like the new-flow case (one run per call, same frames).
    pub floor_single_run_ns: f64,
    pub established_vs_floor: f64,
    pub non_vip_vs_floor: f64,
    /// `new_flow_ns` over `floor_single_run_ns`.
    pub new_flow_vs_floor: f64,
    /// SYNs `[service.limits]` drop, against the same floor (`floor_ns`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub syn_drops: Option<SynDropCost>,
}

/// What a SYN dropped by `[service.limits]` costs, `repeat` runs each: one from a denied
/// source (a deny-trie hit), one from a source over its rate (the allowed lookups, the
/// per-source entry, the rate check and the unit given back).
#[derive(Debug, Serialize, Deserialize)]
pub struct SynDropCost {
    pub denied_ns: f64,
    pub too_fast_ns: f64,
    pub denied_vs_floor: f64,
    pub too_fast_vs_floor: f64,
}

impl SynDropCost {
    pub fn new(floor_ns: f64, denied_ns: f64, too_fast_ns: f64) -> SynDropCost {
        SynDropCost {
            denied_ns,
            too_fast_ns,
            denied_vs_floor: denied_ns / floor_ns,
            too_fast_vs_floor: too_fast_ns / floor_ns,
        }
    }
}

impl XdpCost {
    pub fn new(
        repeat: u32,
        floor_ns: f64,
        established_ns: f64,
        non_vip_ns: f64,
        new_flow_syns: u64,
        new_flow_ns: f64,
        floor_single_run_ns: f64,
    ) -> XdpCost {
        XdpCost {
            repeat,
            floor_ns,
            established_ns,
            non_vip_ns,
            new_flow_syns,
            new_flow_ns,
            floor_single_run_ns,
            established_vs_floor: established_ns / floor_ns,
            non_vip_vs_floor: non_vip_ns / floor_ns,
            new_flow_vs_floor: new_flow_ns / floor_single_run_ns,
            syn_drops: None,
        }
    }
}

/// The kernel path's ratios (targets: XDP >= 0.9x plain routing, >= 2x the proxy).
#[derive(Debug, Serialize, Deserialize)]
pub struct KernelPath {
    pub routing_sessions_per_s: f64,
    pub proxy_sessions_per_s: f64,
    /// CPU time per session the proxy adds over plain routing (all CPUs, median runs).
    pub proxy_added_cpu_us: Option<f64>,
    pub xdp: Vec<KernelRatio>,
    /// The plain network's figures (XDP in the mode `auto` picks against one MTA direct).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plain: Option<PlainPath>,
}

/// On the plain network (default offloads, nothing on the peers): sessions/s straight to one
/// MTA, and each xdp contender's rate against it, paired by round (target: dsr >= 0.9x).
#[derive(Debug, Serialize, Deserialize)]
pub struct PlainPath {
    pub direct_sessions_per_s: f64,
    pub xdp: Vec<PlainRatio>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct PlainRatio {
    pub name: String,
    pub vs_direct: f64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct KernelRatio {
    pub name: String,
    pub vs_routing: f64,
    pub vs_proxy: f64,
    /// CPU time per session this mode adds over plain routing: the balancer's own cost.
    pub added_cpu_us: Option<f64>,
}

/// CPU time per completed session during one run (or the median over runs), in microseconds.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct CpuUse {
    /// Busy time of all CPUs of the machine.
    pub total_us: f64,
    /// Of which in softirq (packet processing: veth, bridge, forwarding, XDP, TCP receive);
    /// the kernel charges much of it to whichever process was running, so it overlaps the
    /// per-process figures.
    pub softirq_us: f64,
    /// Time the hypervisor held the vCPUs back while they had work (steal), per session: not
    /// in `total_us`. Well above zero, the run competed with other guests and its rate is
    /// suspect.
    #[serde(default)]
    pub steal_us: f64,
    /// The load generator's process.
    pub loadgen_us: f64,
    /// The three sinks' processes.
    pub sinks_us: f64,
    /// The balancer's processes: switchyard (userspace proxy or XDP control plane), HAProxy,
    /// nginx; 0 for direct and plain routing.
    #[serde(alias = "switchyard_us")]
    pub balancer_us: f64,
    /// total - loadgen - sinks - balancer: the kernel's work outside those processes.
    pub other_us: f64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Machine {
    pub cpus: usize,
    pub kernel: String,
    pub rustc: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ContenderResult {
    pub name: String,
    pub target: String,
    pub median_sessions_per_s: f64,
    pub min_sessions_per_s: f64,
    pub max_sessions_per_s: f64,
    pub median_p99_ms: f64,
    pub ratio_vs_haproxy: Option<f64>,
    /// Median over rounds of this run's rate over HAProxy's run of the same round: the
    /// machine's drift between rounds cancels out.
    #[serde(default)]
    pub paired_ratio_vs_haproxy: Option<f64>,
    pub ratio_vs_direct: Option<f64>,
    pub failed_sessions: u64,
    pub runs: Vec<LoadReport>,
    /// Median CPU time per session over the runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_per_session: Option<CpuUse>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Skipped {
    pub name: String,
    pub reason: String,
}

/// Memory per idle proxied session: the same number of sessions through each balancer to the
/// same sinks, its RSS before and after.
#[derive(Debug, Serialize, Deserialize)]
pub struct IdleMemory {
    pub sessions: usize,
    /// switchyard's figures, at the top level where files from before HAProxy's had them.
    #[serde(flatten)]
    pub switchyard: IdleRss,
    /// HAProxy's, when it is installed and was measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub haproxy: Option<IdleRss>,
    /// switchyard's bytes per idle session over HAProxy's (target: at most 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub switchyard_over_haproxy: Option<f64>,
}

/// One balancer's resident memory around the idle sessions (all its processes).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct IdleRss {
    pub rss_before_kib: u64,
    pub rss_after_kib: u64,
    pub bytes_per_session: f64,
}

impl IdleRss {
    pub fn new(before_kib: u64, after_kib: u64, sessions: usize) -> IdleRss {
        IdleRss {
            rss_before_kib: before_kib,
            rss_after_kib: after_kib,
            bytes_per_session: (after_kib.saturating_sub(before_kib) * 1024) as f64
                / sessions.max(1) as f64,
        }
    }
}

impl IdleMemory {
    pub fn new(sessions: usize, switchyard: IdleRss, haproxy: Option<IdleRss>) -> IdleMemory {
        let switchyard_over_haproxy = haproxy
            .as_ref()
            .filter(|h| h.bytes_per_session > 0.0)
            .map(|h| switchyard.bytes_per_session / h.bytes_per_session);
        IdleMemory {
            sessions,
            switchyard,
            haproxy,
            switchyard_over_haproxy,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Distribution {
    pub algorithm: String,
    pub assigned: BTreeMap<String, u64>,
    /// Most-loaded backend's sessions over the least-loaded one's.
    pub max_over_min: Option<f64>,
}

/// The name under which an idle-memory measurement HAProxy could not make is listed as
/// skipped.
pub const HAPROXY_IDLE: &str = "haproxy idle-session memory";

/// Reads results.json back and checks that it is complete and plausible.
pub fn validate(path: &Path) -> Result<BenchResults> {
    let res: BenchResults = serde_json::from_slice(
        &std::fs::read(path).with_context(|| format!("reading {}", path.display()))?,
    )
    .with_context(|| format!("{} is not a well-formed results file", path.display()))?;
    check(&res).with_context(|| format!("{}", path.display()))?;
    Ok(res)
}

fn check(res: &BenchResults) -> Result<()> {
    ensure!(res.schema == 1, "schema {} (expected 1)", res.schema);
    ensure!(!res.contenders.is_empty(), "no contenders");
    for c in &res.contenders {
        ensure!(
            c.runs.len() == res.rounds,
            "{} has {} runs, expected {}",
            c.name,
            c.runs.len(),
            res.rounds
        );
        for r in &c.runs {
            ensure!(
                r.sessions_ok + r.sessions_failed == res.sessions_per_run,
                "a run of {} counted {} sessions, expected {}",
                c.name,
                r.sessions_ok + r.sessions_failed,
                res.sessions_per_run
            );
        }
        ensure!(
            c.median_sessions_per_s.is_finite() && c.median_sessions_per_s > 0.0,
            "{} completed no session",
            c.name
        );
    }
    if let Some(idle) = &res.idle_memory {
        check_idle(res, idle)?;
    }
    if let Some(cost) = &res.xdp_cost {
        check_xdp_cost(cost)?;
    }
    if let Some(flood) = &res.synflood {
        check_synflood(flood)?;
    }
    if let Some(balancers) = &res.balancers {
        super::balancers::check(balancers)?;
    }
    Ok(())
}

/// The SYN-flood figures: every round of every arm, a flood that was sent and dropped, and a
/// ratio that is a ratio.
fn check_synflood(f: &super::synflood::SynfloodFigures) -> Result<()> {
    for (arm, runs) in [
        ("calm", &f.calm),
        ("flooded", &f.flooded),
        ("sender_only", &f.sender_only),
    ] {
        ensure!(
            runs.len() == f.rounds && runs.iter().all(|r| r.is_finite() && *r > 0.0),
            "synflood.{arm} has {runs:?}, expected {} positive rates",
            f.rounds
        );
    }
    ensure!(
        f.syns_total() > 0 && f.too_many + f.too_fast > 0,
        "synflood: {} SYNs sent, {} dropped: the flood did not happen",
        f.syns_total(),
        f.too_many + f.too_fast
    );
    ensure!(
        f.ratio.is_finite() && f.ratio > 0.0,
        "synflood.ratio is {}",
        f.ratio
    );
    Ok(())
}

/// The XDP cost: enough runs, positive figures, ratios that match them.
pub(super) fn check_xdp_cost(cost: &XdpCost) -> Result<()> {
    ensure!(
        cost.repeat >= 1_000_000 && cost.new_flow_syns > 0,
        "xdp_cost over {} runs and {} SYNs (at least 10^6 runs per case)",
        cost.repeat,
        cost.new_flow_syns
    );
    for (name, ns) in [
        ("floor_ns", cost.floor_ns),
        ("established_ns", cost.established_ns),
        ("non_vip_ns", cost.non_vip_ns),
        ("new_flow_ns", cost.new_flow_ns),
        ("floor_single_run_ns", cost.floor_single_run_ns),
    ] {
        ensure!(ns.is_finite() && ns > 0.0, "xdp_cost.{name} is {ns}");
    }
    let expected = XdpCost::new(
        cost.repeat,
        cost.floor_ns,
        cost.established_ns,
        cost.non_vip_ns,
        cost.new_flow_syns,
        cost.new_flow_ns,
        cost.floor_single_run_ns,
    );
    let same = |a: f64, b: f64| (a - b).abs() <= 1e-9 * b.abs().max(1.0);
    ensure!(
        same(cost.established_vs_floor, expected.established_vs_floor)
            && same(cost.non_vip_vs_floor, expected.non_vip_vs_floor)
            && same(cost.new_flow_vs_floor, expected.new_flow_vs_floor),
        "xdp_cost ratios do not match its figures: {cost:?}"
    );
    if let Some(drops) = &cost.syn_drops {
        let expected = SynDropCost::new(cost.floor_ns, drops.denied_ns, drops.too_fast_ns);
        ensure!(
            [drops.denied_ns, drops.too_fast_ns]
                .iter()
                .all(|ns| ns.is_finite() && *ns > 0.0)
                && same(drops.denied_vs_floor, expected.denied_vs_floor)
                && same(drops.too_fast_vs_floor, expected.too_fast_vs_floor),
            "xdp_cost.syn_drops do not match their figures: {drops:?}"
        );
    }
    Ok(())
}

/// Idle memory: plausible figures, a ratio that matches them, and HAProxy's figures whenever
/// HAProxy ran (or the reason they are missing).
fn check_idle(res: &BenchResults, idle: &IdleMemory) -> Result<()> {
    ensure!(idle.sessions > 0, "idle memory over 0 sessions");
    for (name, rss) in std::iter::once(("switchyard", &idle.switchyard))
        .chain(idle.haproxy.iter().map(|h| ("haproxy", h)))
    {
        ensure!(
            rss.bytes_per_session.is_finite() && rss.bytes_per_session >= 0.0,
            "{name}'s idle memory is {} bytes per session",
            rss.bytes_per_session
        );
    }
    let expected = IdleMemory::new(idle.sessions, idle.switchyard.clone(), idle.haproxy.clone())
        .switchyard_over_haproxy;
    ensure!(
        match (idle.switchyard_over_haproxy, expected) {
            (Some(a), Some(b)) => (a - b).abs() <= 1e-9 * b.abs().max(1.0),
            (a, b) => a.is_none() && b.is_none(),
        },
        "idle memory ratio {:?} does not match the figures (expected {expected:?})",
        idle.switchyard_over_haproxy
    );
    let haproxy_ran = res.contenders.iter().any(|c| c.name.starts_with("haproxy"));
    let explained = res.skipped.iter().any(|s| s.name == HAPROXY_IDLE);
    ensure!(
        !haproxy_ran || idle.haproxy.is_some() || explained,
        "HAProxy ran but its idle-session memory is neither measured nor listed as skipped"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A results file from before HAProxy's idle figures still reads, as switchyard's.
    #[test]
    fn idle_memory_without_haproxy_reads_as_before() {
        let old = r#"{"sessions":1000,"rss_before_kib":4000,"rss_after_kib":6000,"bytes_per_session":2048.0}"#;
        let idle: IdleMemory = serde_json::from_str(old).expect("old idle_memory");
        assert_eq!(idle.switchyard.rss_after_kib, 6000);
        assert!(idle.haproxy.is_none() && idle.switchyard_over_haproxy.is_none());
        let again = serde_json::to_string(&idle).expect("serialize");
        assert_eq!(again, old);
    }

    #[test]
    fn idle_memory_compares_switchyard_with_haproxy() {
        let idle = IdleMemory::new(
            1000,
            IdleRss::new(4000, 6000, 1000),
            Some(IdleRss::new(3000, 4000, 1000)),
        );
        assert_eq!(idle.switchyard.bytes_per_session, 2048.0);
        assert_eq!(idle.switchyard_over_haproxy, Some(2.0));
        let json = serde_json::to_string(&idle).expect("serialize");
        let back: IdleMemory = serde_json::from_str(&json).expect("read back");
        assert_eq!(back.haproxy.map(|h| h.rss_after_kib), Some(4000));
    }
}
