//! `cargo xtask bench`: the side-by-side benchmark. Three sink MTAs, then the load generator
//! against every contender (direct to one sink, switchyard with each algorithm, HAProxy, nginx,
//! the XDP path where available), alternately over several rounds, so that every ratio compares
//! runs made minutes apart on the same machine. Also switchyard's memory per idle session and
//! its distribution of sessions over the backends.
//!
//! As root, the kernel path too: plain routing, switchyard's proxy and its XDP path (dsr, nat)
//! take turns in one network-namespace topology in front of the same three sinks
//! ([`crate::topology`]); each of those runs also records the CPU time every part used.
//!
//! Outputs: a markdown table on stdout, `target/bench/results.json`, `target/bench/chart.png`.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::loadgen::{self, Budget, LoadReport, LoadSpec};
use crate::sink::{SinkConfig, SinkThread};
use crate::topology::{Mode, Topology};
use crate::workspace;
use testkit::supervise::{self as children, Supervised};

pub const ALGORITHMS: [&str; 5] = [
    "round_robin",
    "weighted_round_robin",
    "least_conn",
    "ip_hash",
    "least_time",
];

const SINK_PORTS: [u16; 3] = [3601, 3602, 3603];
const SWITCHYARD_BASE_PORT: u16 = 3611;
const HAPROXY_PORT: u16 = 3620;
const NGINX_PORT: u16 = 3621;
const IDLE_PORT: u16 = 3630;

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
    /// generator (issue 2's workload as written: `smtp-source -s 50 -m N -l 2048`).
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
}

/// The kernel path's ratios (issue 3's targets: XDP >= 0.9x routing, >= 2x the proxy).
#[derive(Debug, Serialize, Deserialize)]
pub struct KernelPath {
    pub routing_sessions_per_s: f64,
    pub proxy_sessions_per_s: f64,
    /// CPU time per session the proxy adds over plain routing (all CPUs, median runs).
    pub proxy_added_cpu_us: Option<f64>,
    pub xdp: Vec<KernelRatio>,
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

#[derive(Debug, Serialize, Deserialize)]
pub struct IdleMemory {
    pub sessions: usize,
    pub rss_before_kib: u64,
    pub rss_after_kib: u64,
    pub bytes_per_session: f64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Distribution {
    pub algorithm: String,
    pub assigned: BTreeMap<String, u64>,
    /// Most-loaded backend's sessions over the least-loaded one's.
    pub max_over_min: Option<f64>,
}

/// How the load reaches a contender.
enum Driver {
    /// From this process, over loopback.
    Local,
    /// From inside a network namespace: the release xtask binary runs `loadgen --json` there.
    Netns(String),
}

/// One thing the benchmark measures, and the processes that make it up.
struct Contender {
    name: String,
    target: SocketAddr,
    driver: Driver,
    processes: Vec<Supervised>,
    /// Set for switchyard contenders: the algorithm whose distribution its log reports.
    algorithm: Option<String>,
    runs: Vec<LoadReport>,
    /// Kernel-path contenders: the topology's mode to activate before each run.
    mode: Option<Mode>,
    cpu: Vec<CpuUse>,
}

pub fn bench_dir() -> PathBuf {
    workspace::target_dir().join("bench")
}

pub fn run(opts: BenchOptions) -> Result<BenchResults> {
    children::stop_children_on_signal();
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

    let (mut topology, kernel, kernel_skipped) = kernel_contenders(&dir, &switchyard)?;
    if opts.kernel_only {
        anyhow::ensure!(
            topology.is_some(),
            "--kernel-only needs root (network namespaces and XDP)"
        );
        let sinks_kind = topology.as_ref().map_or("", |t| t.sinks_kind);
        return run_contenders(
            &opts,
            &dir,
            &switchyard,
            sinks_kind,
            &[],
            kernel,
            kernel_skipped,
            topology,
        );
    }
    let sink_addrs: Vec<SocketAddr> = SINK_PORTS
        .iter()
        .map(|p| SocketAddr::from(([127, 0, 0, 1], *p)))
        .collect();
    let (sinks_kind, sinks) = start_sinks(&dir, &sink_addrs)?;
    let sink_pids: Vec<u32> = sinks.iter().map(|s| s.pid()).collect();
    println!("bench: sinks ({sinks_kind}) on {}", list(&sink_addrs));
    if let Some(topo) = &topology {
        anyhow::ensure!(
            topo.sinks_kind == sinks_kind,
            "the namespace sinks ({}) differ from the loopback ones ({sinks_kind})",
            topo.sinks_kind
        );
    }

    let mut skipped = Vec::new();
    let mut contenders = vec![Contender {
        name: "direct".into(),
        target: sink_addrs[0],
        driver: Driver::Local,
        processes: Vec::new(),
        algorithm: None,
        runs: Vec::new(),
        mode: None,
        cpu: Vec::new(),
    }];
    for (i, alg) in ALGORITHMS.iter().enumerate() {
        contenders.push(start_switchyard(
            &dir,
            &switchyard,
            alg,
            SWITCHYARD_BASE_PORT + i as u16,
            &sink_addrs,
        )?);
    }
    match workspace::find_program("haproxy") {
        Some(bin) => contenders.push(start_haproxy(&dir, &bin, &sink_addrs)?),
        None => skipped.push(Skipped {
            name: "haproxy".into(),
            reason: "haproxy not installed".into(),
        }),
    }
    match (workspace::find_program("nginx"), nginx_stream_module()) {
        (Some(bin), Some(module)) => {
            contenders.push(start_nginx(&dir, &bin, &module, &sink_addrs)?)
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
        contenders,
        skipped,
        topology.take(),
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
    mut contenders: Vec<Contender>,
    skipped: Vec<Skipped>,
    mut topology: Option<Topology>,
) -> Result<BenchResults> {
    for s in &skipped {
        println!("bench: skipping {}: {}", s.name, s.reason);
    }

    for c in &contenders {
        wait_ready(c)?;
    }
    for round in 0..opts.rounds {
        println!("bench: round {}/{}", round + 1, opts.rounds);
        // Rotate the order so that no contender always runs first or right after another.
        let n = contenders.len();
        for k in 0..n {
            let c = &mut contenders[(k + round) % n];
            for p in &mut c.processes {
                p.check_running()?;
            }
            let (report, used) = match (c.mode, topology.as_mut()) {
                (Some(mode), Some(topo)) => {
                    topo.activate(mode)?;
                    let before = CpuSample::of_topology(topo);
                    let report = drive(c, opts, dir)?;
                    let used = CpuSample::of_topology(topo).since(&before, report.sessions_ok);
                    (report, used)
                }
                _ => {
                    let balancer =
                        with_children(&c.processes.iter().map(|p| p.pid()).collect::<Vec<_>>());
                    let before = CpuSample::take(sink_pids, &balancer);
                    let report = drive(c, opts, dir)?;
                    let used =
                        CpuSample::take(sink_pids, &balancer).since(&before, report.sessions_ok);
                    (report, used)
                }
            };
            println!(
                "  {:<32} {:>7.0} sessions/s  p99 {:>7.2} ms  failed {}",
                c.name,
                report.sessions_per_s,
                report.latency_ms.session.p99,
                report.sessions_failed
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
        }
    }
    // Stops the balancer and the sinks in the namespaces, then deletes them.
    drop(topology);

    let mut distribution = Vec::new();
    for c in &mut contenders {
        for p in &mut c.processes {
            p.stop(Duration::from_secs(10));
        }
        if let (Some(alg), Some(p)) = (&c.algorithm, c.processes.first()) {
            let assigned = parse_assigned(&std::fs::read_to_string(&p.log).unwrap_or_default());
            let max_over_min = max_over_min(&assigned);
            distribution.push(Distribution {
                algorithm: alg.clone(),
                assigned,
                max_over_min,
            });
        }
    }

    let idle_memory = if opts.kernel_only {
        None
    } else {
        match measure_idle_rss(dir, switchyard, opts.idle_sessions) {
            Ok(m) => Some(m),
            Err(e) => {
                println!("bench: idle-session memory not measured: {e:#}");
                None
            }
        }
    };

    let results = summarize(
        opts,
        sinks_kind,
        contenders,
        skipped,
        idle_memory,
        distribution,
    )?;
    print_table(&results);
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

fn list(addrs: &[SocketAddr]) -> String {
    addrs
        .iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Postfix's smtp-sink when installed, else our own sink in a child process.
fn start_sinks(dir: &Path, addrs: &[SocketAddr]) -> Result<(&'static str, Vec<Supervised>)> {
    for a in addrs {
        children::ensure_port_free(*a)?;
    }
    let mut procs = Vec::new();
    let kind = if let Some(bin) = workspace::find_program("smtp-sink") {
        for (i, a) in addrs.iter().enumerate() {
            let mut cmd = Command::new(&bin);
            if workspace::is_root() {
                cmd.args(["-u", "nobody"]);
            }
            cmd.arg(a.to_string()).arg("1024");
            procs.push(Supervised::start(
                &format!("smtp-sink {a}"),
                &mut cmd,
                &dir.join(format!("sink{}.log", i + 1)),
            )?);
        }
        "smtp-sink"
    } else {
        let exe = std::env::current_exe()?;
        let mut cmd = Command::new(exe);
        cmd.arg("sink")
            .arg("--listen")
            .args(addrs.iter().map(|a| a.to_string()));
        procs.push(Supervised::start(
            "xtask sink",
            &mut cmd,
            &dir.join("sink.log"),
        )?);
        "xtask sink"
    };
    for a in addrs {
        let code = children::wait_for_greeting(*a, Duration::from_secs(10))?;
        anyhow::ensure!(code == 220, "sink {a} greeted with {code}");
    }
    Ok((kind, procs))
}

pub fn switchyard_config(listen: SocketAddr, algorithm: &str, backends: &[SocketAddr]) -> String {
    let mut cfg = format!(
        "# Written by cargo xtask bench.\nshutdown_timeout = \"5s\"\n\n[[service]]\nname = \"bench\"\nlisten = \"{listen}\"\n\
         algorithm = \"{algorithm}\"\nmax_connections = 10000\n\n[service.health]\nkind = \"smtp\"\ninterval = \"2s\"\n"
    );
    for (i, b) in backends.iter().enumerate() {
        cfg.push_str(&format!(
            "\n[[service.backend]]\nname = \"mta{}\"\naddress = \"{b}\"\n",
            i + 1
        ));
    }
    cfg
}

fn start_switchyard(
    dir: &Path,
    bin: &Path,
    algorithm: &str,
    port: u16,
    backends: &[SocketAddr],
) -> Result<Contender> {
    let listen = SocketAddr::from(([127, 0, 0, 1], port));
    children::ensure_port_free(listen)?;
    let cfg = dir.join(format!("switchyard-{algorithm}.toml"));
    std::fs::write(&cfg, switchyard_config(listen, algorithm, backends))?;
    let mut cmd = Command::new(bin);
    cmd.arg("run")
        .arg("--config")
        .arg(&cfg)
        .env("RUST_LOG", "info");
    let p = Supervised::start(
        &format!("switchyard {algorithm}"),
        &mut cmd,
        &dir.join(format!("switchyard-{algorithm}.log")),
    )?;
    Ok(Contender {
        name: format!("switchyard {algorithm}"),
        target: listen,
        driver: Driver::Local,
        processes: vec![p],
        algorithm: Some(algorithm.to_string()),
        runs: Vec::new(),
        mode: None,
        cpu: Vec::new(),
    })
}

fn start_haproxy(dir: &Path, bin: &Path, backends: &[SocketAddr]) -> Result<Contender> {
    let listen = SocketAddr::from(([127, 0, 0, 1], HAPROXY_PORT));
    children::ensure_port_free(listen)?;
    // Equivalent to switchyard's bench config: least connections, SMTP health checks every 2 s.
    let mut cfg = format!(
        "# Written by cargo xtask bench.\nglobal\n    maxconn 8000\n\ndefaults\n    mode tcp\n    timeout connect 3s\n\
         timeout client 10m\n    timeout server 10m\n\nfrontend smtp\n    bind {listen}\n    default_backend mtas\n\n\
         backend mtas\n    balance leastconn\n    option smtpchk EHLO switchyard.invalid\n"
    );
    for (i, b) in backends.iter().enumerate() {
        cfg.push_str(&format!("    server mta{} {b} check inter 2s\n", i + 1));
    }
    let path = dir.join("haproxy.cfg");
    std::fs::write(&path, cfg)?;
    let mut cmd = Command::new(bin);
    cmd.arg("-f").arg(&path).arg("-db");
    let p = Supervised::start("haproxy", &mut cmd, &dir.join("haproxy.log"))?;
    Ok(Contender {
        name: "haproxy leastconn".into(),
        target: listen,
        driver: Driver::Local,
        processes: vec![p],
        algorithm: None,
        runs: Vec::new(),
        mode: None,
        cpu: Vec::new(),
    })
}

fn nginx_stream_module() -> Option<PathBuf> {
    [
        "/usr/lib/nginx/modules/ngx_stream_module.so",
        "/usr/share/nginx/modules/ngx_stream_module.so",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.is_file())
}

fn start_nginx(
    dir: &Path,
    bin: &Path,
    module: &Path,
    backends: &[SocketAddr],
) -> Result<Contender> {
    let listen = SocketAddr::from(([127, 0, 0, 1], NGINX_PORT));
    children::ensure_port_free(listen)?;
    let prefix = dir.join("nginx");
    std::fs::create_dir_all(prefix.join("logs"))?;
    let mut cfg = format!(
        "# Written by cargo xtask bench.\nload_module {};\nworker_processes auto;\npid {}/nginx.pid;\n\
         error_log {}/logs/error.log warn;\n\nevents {{\n    worker_connections 8000;\n}}\n\n\
         stream {{\n    upstream mtas {{\n        least_conn;\n",
        module.display(),
        prefix.display(),
        prefix.display()
    );
    for b in backends {
        cfg.push_str(&format!("        server {b};\n"));
    }
    cfg.push_str(&format!(
        "    }}\n    server {{\n        listen {listen};\n        proxy_pass mtas;\n        proxy_connect_timeout 3s;\n        proxy_timeout 10m;\n    }}\n}}\n"
    ));
    let path = prefix.join("nginx.conf");
    std::fs::write(&path, cfg)?;
    let mut cmd = Command::new(bin);
    cmd.arg("-p")
        .arg(&prefix)
        .arg("-c")
        .arg(&path)
        .args(["-g", "daemon off;"]);
    let p = Supervised::start("nginx", &mut cmd, &dir.join("nginx.log"))?;
    Ok(Contender {
        name: "nginx least_conn".into(),
        target: listen,
        driver: Driver::Local,
        processes: vec![p],
        algorithm: None,
        runs: Vec::new(),
        mode: None,
        cpu: Vec::new(),
    })
}

/// The kernel path as contenders, when this machine can run it: plain routing, switchyard's
/// proxy and its XDP path (dsr, nat), taking turns in one namespace topology with three sinks
/// of its own. As root a failure to build it is an error, not a skip (CI is root).
fn kernel_contenders(
    dir: &Path,
    switchyard: &Path,
) -> Result<(Option<Topology>, Vec<Contender>, Vec<Skipped>)> {
    if !workspace::is_root() {
        let skipped = Mode::ALL
            .iter()
            .map(|m| Skipped {
                name: m.contender().into(),
                reason: "needs root (network namespaces and XDP)".into(),
            })
            .collect();
        return Ok((None, Vec::new(), skipped));
    }
    let topo = Topology::build(dir, switchyard)?;
    println!(
        "bench: kernel path in namespaces {}-*: client, balancer, three {} sinks; VIP {}",
        topo.balancer.trim_end_matches("-lb"),
        topo.sinks_kind,
        Topology::target(Mode::Dsr)
    );
    let contenders = Mode::ALL
        .iter()
        .map(|mode| Contender {
            name: mode.contender().to_string(),
            target: Topology::target(*mode),
            driver: Driver::Netns(topo.client.clone()),
            processes: Vec::new(),
            algorithm: None,
            runs: Vec::new(),
            mode: Some(*mode),
            cpu: Vec::new(),
        })
        .collect();
    Ok((Some(topo), contenders, Vec::new()))
}

/// Machine-wide and per-process CPU counters at one instant.
struct CpuSample {
    /// Busy and softirq time of all CPUs, in clock ticks.
    busy: u64,
    softirq: u64,
    steal: u64,
    /// This process (the built-in load generator runs in it) and its reaped children (the
    /// load generator in a namespace, smtp-source), in microseconds.
    loadgen_us: u64,
    sinks: u64,
    balancer: u64,
}

impl CpuSample {
    fn take(sink_pids: &[u32], balancer_pids: &[u32]) -> CpuSample {
        use nix::sys::resource::{UsageWho, getrusage};
        let (busy, softirq, steal) = machine_ticks();
        let used = |who| {
            getrusage(who)
                .map(|u| {
                    let us = |t: nix::sys::time::TimeVal| {
                        t.tv_sec() as u64 * 1_000_000 + t.tv_usec() as u64
                    };
                    us(u.user_time()) + us(u.system_time())
                })
                .unwrap_or(0)
        };
        CpuSample {
            busy,
            softirq,
            steal,
            loadgen_us: used(UsageWho::RUSAGE_SELF) + used(UsageWho::RUSAGE_CHILDREN),
            sinks: sink_pids.iter().map(|p| process_ticks(*p)).sum(),
            balancer: balancer_pids.iter().map(|p| process_ticks(*p)).sum(),
        }
    }

    /// For a run in the namespace topology: its sinks and its active balancer.
    fn of_topology(topo: &Topology) -> CpuSample {
        let balancer: Vec<u32> = topo.balancer_pid().into_iter().collect();
        CpuSample::take(&topo.sink_pids(), &balancer)
    }

    fn since(&self, before: &CpuSample, sessions: u64) -> CpuUse {
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { nix::libc::sysconf(nix::libc::_SC_CLK_TCK) }.max(1) as f64;
        let n = sessions.max(1) as f64;
        let per = |ticks: u64| ticks as f64 * 1e6 / hz / n;
        let total_us = per(self.busy.saturating_sub(before.busy));
        let loadgen_us = self.loadgen_us.saturating_sub(before.loadgen_us) as f64 / n;
        let sinks_us = per(self.sinks.saturating_sub(before.sinks));
        let balancer_us = per(self.balancer.saturating_sub(before.balancer));
        CpuUse {
            total_us,
            softirq_us: per(self.softirq.saturating_sub(before.softirq)),
            steal_us: per(self.steal.saturating_sub(before.steal)),
            loadgen_us,
            sinks_us,
            balancer_us,
            other_us: (total_us - loadgen_us - sinks_us - balancer_us).max(0.0),
        }
    }
}

/// All CPUs' busy ticks (user, nice, system, irq, softirq: the work this machine did), softirq
/// ticks, and steal ticks (time the hypervisor gave to other guests), from /proc/stat.
fn machine_ticks() -> (u64, u64, u64) {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = text.lines().find(|l| l.starts_with("cpu ")) else {
        return (0, 0, 0);
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let get = |i: usize| v.get(i).copied().unwrap_or(0);
    let busy = get(0) + get(1) + get(2) + get(5) + get(6);
    (busy, get(6), get(7))
}

/// `pids` and their child processes (nginx's workers under its master).
fn with_children(pids: &[u32]) -> Vec<u32> {
    let mut all = pids.to_vec();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return all;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // The parent's pid is the second field after the parenthesised command name.
        let parent = stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if parent.is_some_and(|p| pids.contains(&p)) {
            all.push(pid);
        }
    }
    all
}

/// utime + stime of a process (all its threads), in clock ticks; 0 if it is gone.
fn process_ticks(pid: u32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
        return 0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let get = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    get(11) + get(12)
}

/// Waits until the contender greets with 220 (for switchyard: its backends are up and healthy).
fn wait_ready(c: &Contender) -> Result<()> {
    if let Driver::Netns(_) = c.driver {
        return Ok(());
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let code =
            children::wait_for_greeting(c.target, Duration::from_secs(10)).with_context(|| {
                format!(
                    "{} did not come up; see its log in {}",
                    c.name,
                    bench_dir().display()
                )
            })?;
        if code == 220 {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            bail!("{} still greets with {code} after 20 s", c.name);
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn drive(c: &Contender, opts: &BenchOptions, dir: &Path) -> Result<LoadReport> {
    let progress = std::io::stdout().is_terminal();
    match &c.driver {
        Driver::Local if opts.smtp_source => run_smtp_source(c.target, opts),
        Driver::Local => {
            let mut spec = LoadSpec::new(
                c.target,
                opts.concurrency,
                Budget::Sessions(opts.sessions_per_run),
            );
            spec.size = opts.size;
            spec.progress = progress;
            loadgen::run_blocking(spec)
        }
        Driver::Netns(ns) => {
            let json = dir.join("netns-run.json");
            let _ = std::fs::remove_file(&json);
            let exe = std::env::current_exe()?;
            let status = Command::new("ip")
                .args(["netns", "exec", ns])
                .arg(exe)
                .arg("loadgen")
                .arg("--target")
                .arg(c.target.to_string())
                .arg("--sessions")
                .arg(opts.concurrency.to_string())
                .arg("--messages")
                .arg(opts.sessions_per_run.to_string())
                .arg("--size")
                .arg(opts.size.to_string())
                .arg("--json")
                .arg(&json)
                .stdout(std::process::Stdio::null())
                .status()?;
            let report: LoadReport = serde_json::from_slice(
                &std::fs::read(&json)
                    .with_context(|| format!("loadgen in {ns} wrote no result ({status})"))?,
            )?;
            Ok(report)
        }
    }
}

/// One run of Postfix's smtp-source against `target`: `-s` parallel sessions, `-m` one-message
/// sessions of `-l` bytes. It reports no counts: a clean exit with nothing on stderr means every
/// session completed; each line it writes there is counted as one failed session.
fn run_smtp_source(target: SocketAddr, opts: &BenchOptions) -> Result<LoadReport> {
    let bin = workspace::find_program("smtp-source")
        .context("--smtp-source: smtp-source (Debian package postfix) is not installed")?;
    let started = std::time::Instant::now();
    let output = Command::new(bin)
        .args([
            "-s".to_string(),
            opts.concurrency.to_string(),
            "-m".to_string(),
            opts.sessions_per_run.to_string(),
            "-l".to_string(),
            opts.size.to_string(),
            target.to_string(),
        ])
        .output()
        .context("running smtp-source")?;
    let elapsed_s = started.elapsed().as_secs_f64();
    let stderr = String::from_utf8_lossy(&output.stderr);
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    for line in stderr.lines().filter(|l| !l.trim().is_empty()) {
        *errors
            .entry(format!("smtp-source: {}", line.trim()))
            .or_default() += 1;
    }
    if !output.status.success() {
        *errors
            .entry(format!("smtp-source exited with {}", output.status))
            .or_default() += 1;
    }
    let failed = errors.values().sum::<u64>().min(opts.sessions_per_run);
    let ok = opts.sessions_per_run - failed;
    Ok(LoadReport {
        target: target.to_string(),
        concurrency: opts.concurrency,
        size: opts.size,
        recipients: 1,
        pipelining: false,
        elapsed_s,
        sessions_ok: ok,
        sessions_failed: failed,
        messages: ok,
        bytes: ok * opts.size as u64,
        sessions_per_s: ok as f64 / elapsed_s.max(f64::MIN_POSITIVE),
        messages_per_s: ok as f64 / elapsed_s.max(f64::MIN_POSITIVE),
        mb_per_s: (ok * opts.size as u64) as f64 / 1e6 / elapsed_s.max(f64::MIN_POSITIVE),
        latency_ms: Default::default(),
        errors,
    })
}

/// Per-backend `assigned=` totals from switchyard's shutdown log lines
/// ("... backend mta1 active=0 assigned=123").
pub fn parse_assigned(log: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for line in log.lines() {
        let Some(value) = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("assigned="))
        else {
            continue;
        };
        let Ok(n) = value
            .trim_matches(|c: char| !c.is_ascii_digit())
            .parse::<u64>()
        else {
            continue;
        };
        let words: Vec<&str> = line.split_whitespace().collect();
        let name = words
            .iter()
            .position(|w| *w == "backend")
            .and_then(|i| words.get(i + 1))
            .map(|s| s.trim_matches(|c| c == '"' || c == ':').to_string())
            .or_else(|| {
                words.iter().find_map(|w| {
                    w.strip_prefix("backend=")
                        .map(|s| s.trim_matches('"').to_string())
                })
            });
        if let Some(name) = name {
            out.insert(name, n);
        }
    }
    out
}

fn max_over_min(assigned: &BTreeMap<String, u64>) -> Option<f64> {
    let max = *assigned.values().max()?;
    let min = *assigned.values().min()?;
    (min > 0).then(|| max as f64 / min as f64)
}

fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS in /proc/PID/status")
}

/// Opens `n` sessions through a fresh switchyard to sinks that hold them, and compares its RSS
/// before and after. Both ends of each session are file descriptors: this process holds 2n
/// (client and sink side), switchyard 2n, both under the 20000 limit for n = 5000.
fn measure_idle_rss(dir: &Path, bin: &Path, n: usize) -> Result<IdleMemory> {
    let sinks = SinkThread::start(
        &[SocketAddr::from(([127, 0, 0, 1], 0)); 3],
        SinkConfig::default(),
    )?;
    let listen = SocketAddr::from(([127, 0, 0, 1], IDLE_PORT));
    children::ensure_port_free(listen)?;
    let cfg = dir.join("switchyard-idle.toml");
    std::fs::write(&cfg, switchyard_config(listen, "least_conn", &sinks.addrs))?;
    let mut cmd = Command::new(bin);
    cmd.arg("run").arg("--config").arg(&cfg);
    let mut proc = Supervised::start(
        "switchyard (idle sessions)",
        &mut cmd,
        &dir.join("switchyard-idle.log"),
    )?;
    let c = Contender {
        name: "switchyard idle".into(),
        target: listen,
        driver: Driver::Local,
        processes: Vec::new(),
        algorithm: None,
        runs: Vec::new(),
        mode: None,
        cpu: Vec::new(),
    };
    wait_ready(&c)?;
    // Warm up allocator arenas and buffers with a few complete sessions first.
    let mut warm = LoadSpec::new(listen, 20, Budget::Sessions(200));
    warm.progress = false;
    loadgen::run_blocking(warm)?;
    std::thread::sleep(Duration::from_millis(300));
    let before = rss_kib(proc.pid())?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let held = rt.block_on(open_idle(listen, n))?;
    std::thread::sleep(Duration::from_millis(500));
    let after = rss_kib(proc.pid())?;
    let at_sinks: u64 = sinks.servers.iter().map(|s| s.open() as u64).sum();
    proc.check_running()?;
    drop(held);
    proc.stop(Duration::from_secs(10));
    anyhow::ensure!(
        at_sinks as usize >= n,
        "only {at_sinks} of {n} idle sessions reached the sinks"
    );
    let m = IdleMemory {
        sessions: n,
        rss_before_kib: before,
        rss_after_kib: after,
        bytes_per_session: (after.saturating_sub(before) * 1024) as f64 / n as f64,
    };
    println!(
        "bench: switchyard RSS {} KiB idle, {} KiB with {} idle sessions: {:.0} bytes per session",
        m.rss_before_kib, m.rss_after_kib, m.sessions, m.bytes_per_session
    );
    Ok(m)
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

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    match values.len() {
        0 => 0.0,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

fn summarize(
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
    })
}

/// Whether a contender is one of the namespace topology's (routing, proxy, xdp dsr/nat): those
/// have a CPU table of their own.
fn on_kernel_path(name: &str) -> bool {
    Mode::ALL.iter().any(|m| m.contender() == name)
}

fn ratio(r: Option<f64>) -> String {
    r.map_or("–".to_string(), |v| format!("{v:.2}x"))
}

/// The markdown table (README material: paste as is).
pub fn markdown(res: &BenchResults) -> String {
    let mut s = format!(
        "{} rounds x {} sessions, {} parallel, {} B messages, load: {}, sinks: {}; {} CPUs, {}, {}\n\n",
        res.rounds,
        res.sessions_per_run,
        res.concurrency,
        res.message_size,
        res.load_generator,
        res.sinks,
        res.machine.cpus,
        res.machine.kernel,
        res.machine.rustc
    );
    s.push_str("| contender | sessions/s (median) | min–max | p99 session (ms) | vs HAProxy | vs HAProxy, paired | vs direct | failed |\n");
    s.push_str("|---|---:|---:|---:|---:|---:|---:|---:|\n");
    for c in &res.contenders {
        s.push_str(&format!(
            "| {} | {:.0} | {:.0}–{:.0} | {} | {} | {} | {} | {} |\n",
            c.name,
            c.median_sessions_per_s,
            c.min_sessions_per_s,
            c.max_sessions_per_s,
            // smtp-source reports no latencies.
            if c.median_p99_ms > 0.0 {
                format!("{:.2}", c.median_p99_ms)
            } else {
                "–".to_string()
            },
            ratio(c.ratio_vs_haproxy),
            ratio(c.paired_ratio_vs_haproxy),
            ratio(c.ratio_vs_direct),
            c.failed_sessions
        ));
    }
    s.push_str(
        "\n| CPU per session (us, median), loopback | all CPUs | load generator | sinks | balancer process | kernel, rest | stolen by the hypervisor |\n|---|---:|---:|---:|---:|---:|---:|\n",
    );
    for c in &res.contenders {
        if on_kernel_path(&c.name) {
            continue;
        }
        if let Some(u) = &c.cpu_per_session {
            s.push_str(&format!(
                "| {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |\n",
                c.name, u.total_us, u.loadgen_us, u.sinks_us, u.balancer_us, u.other_us, u.steal_us
            ));
        }
    }
    if !res.distribution.is_empty() {
        s.push_str("\n| algorithm | sessions per backend | max/min |\n|---|---|---:|\n");
        for d in &res.distribution {
            let per: Vec<String> = d.assigned.iter().map(|(k, v)| format!("{k}={v}")).collect();
            s.push_str(&format!(
                "| {} | {} | {} |\n",
                d.algorithm,
                if per.is_empty() {
                    "(not in log)".to_string()
                } else {
                    per.join(" ")
                },
                d.max_over_min.map_or("–".into(), |v| format!("{v:.2}"))
            ));
        }
    }
    if let Some(m) = &res.idle_memory {
        s.push_str(&format!(
            "\nswitchyard memory: {:.0} bytes per idle session ({} sessions; RSS {} KiB before, {} KiB after)\n",
            m.bytes_per_session, m.sessions, m.rss_before_kib, m.rss_after_kib
        ));
    }
    s.push_str(&kernel_markdown(res));
    for sk in &res.skipped {
        s.push_str(&format!("\nnot measured: {} ({})", sk.name, sk.reason));
    }
    s.push('\n');
    s
}

/// The kernel path's section: ratios against its targets and CPU time per session.
fn kernel_markdown(res: &BenchResults) -> String {
    let Some(k) = &res.kernel_path else {
        return String::new();
    };
    let mut s = String::from(
        "\nKernel path (network namespaces, one veth/bridge segment, three sinks of its own, least_conn):\n\n\
         | contender | sessions/s | vs routing (target >= 0.9x) | vs proxy (target >= 2x) |\n|---|---:|---:|---:|\n",
    );
    for x in &k.xdp {
        let rate = res
            .contenders
            .iter()
            .find(|c| c.name == x.name)
            .map_or(0.0, |c| c.median_sessions_per_s);
        s.push_str(&format!(
            "| {} | {rate:.0} | {:.2}x | {:.2}x |\n",
            x.name, x.vs_routing, x.vs_proxy
        ));
    }
    s.push_str(
        "\n| CPU per session (us, median) | all CPUs | of which softirq | loadgen | sinks | switchyard process | kernel, rest | added over routing |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for c in &res.contenders {
        let Some(u) = &c.cpu_per_session else {
            continue;
        };
        if !on_kernel_path(&c.name) {
            continue;
        }
        let added = if c.name == Mode::Proxy.contender() {
            k.proxy_added_cpu_us
        } else if c.name == Mode::Routing.contender() {
            Some(0.0)
        } else {
            k.xdp
                .iter()
                .find(|x| x.name == c.name)
                .and_then(|x| x.added_cpu_us)
        };
        s.push_str(&format!(
            "| {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {} |\n",
            c.name,
            u.total_us,
            u.softirq_us,
            u.loadgen_us,
            u.sinks_us,
            u.balancer_us,
            u.other_us,
            added.map_or("–".into(), |a| format!("{a:+.0}"))
        ));
    }
    s
}

fn print_table(res: &BenchResults) {
    println!("\n{}", markdown(res));
}

/// Reads results.json back and checks that it is complete and plausible.
pub fn validate(path: &Path) -> Result<BenchResults> {
    let res: BenchResults = serde_json::from_slice(
        &std::fs::read(path).with_context(|| format!("reading {}", path.display()))?,
    )
    .with_context(|| format!("{} is not a well-formed results file", path.display()))?;
    anyhow::ensure!(
        res.schema == 1,
        "{}: schema {} (expected 1)",
        path.display(),
        res.schema
    );
    anyhow::ensure!(
        !res.contenders.is_empty(),
        "{}: no contenders",
        path.display()
    );
    for c in &res.contenders {
        anyhow::ensure!(
            c.runs.len() == res.rounds,
            "{}: {} has {} runs, expected {}",
            path.display(),
            c.name,
            c.runs.len(),
            res.rounds
        );
        for r in &c.runs {
            anyhow::ensure!(
                r.sessions_ok + r.sessions_failed == res.sessions_per_run,
                "{}: a run of {} counted {} sessions, expected {}",
                path.display(),
                c.name,
                r.sessions_ok + r.sessions_failed,
                res.sessions_per_run
            );
        }
        anyhow::ensure!(
            c.median_sessions_per_s.is_finite() && c.median_sessions_per_s > 0.0,
            "{}: {} completed no session",
            path.display(),
            c.name
        );
    }
    Ok(res)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assigned_totals_come_from_the_shutdown_log() {
        let log = "2026-01-01T00:00:00Z  INFO switchyard::server: service bench backend mta1 active=0 assigned=334\n\
                   2026-01-01T00:00:00Z  INFO switchyard::server: service bench backend mta2 active=0 assigned=333\n\
                   unrelated line\n";
        let a = parse_assigned(log);
        assert_eq!(a.get("mta1"), Some(&334));
        assert_eq!(a.get("mta2"), Some(&333));
        assert_eq!(a.len(), 2);
        assert!((max_over_min(&a).unwrap_or(0.0) - 334.0 / 333.0).abs() < 1e-9);
    }

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
    fn a_process_tree_includes_its_children() {
        let mut child = Command::new("sleep").arg("5").spawn().expect("spawn sleep");
        let tree = with_children(&[std::process::id()]);
        let _ = child.kill();
        let _ = child.wait();
        assert!(tree.contains(&std::process::id()));
        assert!(tree.contains(&child.id()), "{tree:?}");
    }
}
