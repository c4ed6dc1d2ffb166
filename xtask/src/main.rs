//! `cargo xtask`: setup, test, demo, the SMTP load generator and the benchmark.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use testkit::smtp_server::RejectAt;
use xtask::loadgen::{self, Budget, LoadSpec};
use xtask::sink::{self, Reject, SinkConfig};
use xtask::{bench, demo, setup, suite, workspace};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Switchyard's project tasks")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what building and testing need: rust-src, bpf-linker (cached under target/tools,
    /// keyed on `rustc -V`) and, as root, the Debian packages. A second run does nothing.
    Setup,
    /// Setup, then the whole test suite (kernel-path tests included), a quick benchmark and a
    /// short demo; a summary at the end. `.ci/run` calls exactly this.
    Test,
    /// Three local sinks behind switchyard (config/demo.toml) under load for a while; one sink
    /// stops halfway to show failover. Exits non-zero if any session failed.
    Demo {
        /// How long to drive load.
        #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
        duration: Duration,
    },
    /// SMTP load generator: one-message sessions from concurrent workers, every reply checked.
    Loadgen(LoadgenArgs),
    /// Side-by-side benchmark: direct, switchyard (each algorithm), HAProxy, nginx; writes
    /// target/bench/results.json and target/bench/chart.png.
    Bench {
        /// One short round (CI): small session counts.
        #[arg(long)]
        quick: bool,
        /// Rounds over all contenders (default 3, quick 1).
        #[arg(long)]
        rounds: Option<usize>,
        /// Sessions per run (default 20000, quick 1000).
        #[arg(long)]
        messages: Option<u64>,
        /// Only the kernel path (root): plain routing, switchyard's proxy and its XDP path in
        /// one namespace topology; writes target/bench/kernel-results.json.
        #[arg(long)]
        kernel_only: bool,
        /// Drive the loopback contenders with Postfix's smtp-source (`-s 50 -m N -l 2048`)
        /// instead of the built-in load generator: the workload the proxy's goal against HAProxy is stated in.
        #[arg(long, conflicts_with = "kernel_only")]
        smtp_source: bool,
        /// Only the XDP program's cost per packet (root, BPF_PROG_TEST_RUN; seconds, no
        /// network, no release build, no results file): prints the figures.
        #[arg(long, conflicts_with_all = ["kernel_only", "smtp_source", "rounds", "messages"])]
        xdp_cost_only: bool,
        /// Only what a reload costs: 1000 backends in 10 services, 5000 open sessions (quick:
        /// 1000), six reloads through the admin socket with a connect loop running.
        #[arg(long, conflicts_with_all = ["kernel_only", "smtp_source", "xdp_cost_only"])]
        reload_only: bool,
        /// Only what a Prometheus scraper costs: sessions/s with /metrics scraped every second
        /// against no admin listener, alternating (5 rounds each; quick: 3 short ones).
        #[arg(long, conflicts_with_all = ["kernel_only", "smtp_source", "xdp_cost_only", "reload_only"])]
        metrics_only: bool,
        /// Only what a one-source SYN flood costs legitimate sessions on the xdp path (root):
        /// xdp dsr with [service.limits] in the namespace testbed, sessions/s with and without
        /// a flood of crafted SYNs from one spoofed address, alternating (5 rounds each of
        /// 20000 sessions; quick: 3 of 3000); writes target/bench/synflood.json.
        #[arg(long, conflicts_with_all = ["kernel_only", "smtp_source", "xdp_cost_only", "reload_only", "metrics_only", "rounds", "messages"])]
        synflood_only: bool,
        /// Only the several-balancers figures (root, BIRD 2): a router namespace running BIRD
        /// with ECMP in front of two balancers (proxy); the time from `ctl node drain` and from
        /// the last backend disabled to the router's route change, and sessions/s through one
        /// balancer host against two; writes target/bench/balancers.json.
        #[arg(long, conflicts_with_all = ["kernel_only", "smtp_source", "xdp_cost_only", "reload_only", "metrics_only", "synflood_only", "rounds", "messages"])]
        balancers_only: bool,
    },
    /// A fast SMTP sink (used where Postfix's smtp-sink is missing).
    Sink {
        /// Addresses to listen on.
        #[arg(long, required = true, num_args = 1..)]
        listen: Vec<SocketAddr>,
        /// Reject at this stage: greeting, mail, rcpt or data.
        #[arg(long)]
        reject_at: Option<String>,
        /// Code of the rejection.
        #[arg(long, default_value_t = 550)]
        reject_code: u16,
    },
}

#[derive(clap::Args)]
struct LoadgenArgs {
    /// Address of the SMTP server.
    #[arg(long)]
    target: SocketAddr,
    /// Concurrent sessions.
    #[arg(long, default_value_t = 50)]
    sessions: usize,
    /// Total sessions (one message each); the default when --duration is absent is 20000.
    #[arg(long, conflicts_with = "duration")]
    messages: Option<u64>,
    /// Run for this long instead of a fixed number of sessions.
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Message size in bytes.
    #[arg(long, default_value_t = 2048)]
    size: usize,
    /// Recipients per message.
    #[arg(long, default_value_t = 1)]
    recipients: usize,
    /// Send MAIL, RCPT and DATA in one write when the server advertises PIPELINING.
    #[arg(long)]
    pipelining: bool,
    /// Runtime threads (1: one thread drives all sessions, the fastest on 2 cores).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Write the full result as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// Set once setup has run in this invocation (so the release re-execution skips it).
const SETUP_DONE: &str = "XTASK_SETUP_DONE";

fn main() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(cmd: Cmd) -> Result<ExitCode> {
    match cmd {
        Cmd::Setup => setup::setup().map(|_| ExitCode::SUCCESS),
        Cmd::Test => suite::run(),
        Cmd::Demo { duration } => {
            // Setup first (it may install what the release build needs), once.
            if std::env::var_os(SETUP_DONE).is_none() {
                setup::setup()?;
                // SAFETY: single-threaded here; the variable only tells the re-executed process.
                unsafe { std::env::set_var(SETUP_DONE, "1") };
            }
            reexec_release(&["xtask", "switchyard"])?;
            demo::run(duration)
        }
        Cmd::Bench {
            quick,
            rounds,
            messages,
            kernel_only,
            smtp_source,
            xdp_cost_only,
            reload_only,
            metrics_only,
            synflood_only,
            balancers_only,
        } => {
            if xdp_cost_only {
                // The program runs in the kernel: this build's speed does not matter.
                return bench::xdp_cost_only(quick).map(|_| ExitCode::SUCCESS);
            }
            reexec_release(&["xtask", "switchyard"])?;
            if reload_only {
                return bench::reload_only(quick).map(|_| ExitCode::SUCCESS);
            }
            if metrics_only {
                return bench::metrics_only(quick).map(|_| ExitCode::SUCCESS);
            }
            if synflood_only {
                return bench::synflood_only(quick).map(|_| ExitCode::SUCCESS);
            }
            if balancers_only {
                return bench::balancers_only(quick).map(|_| ExitCode::SUCCESS);
            }
            let mut opts = bench::BenchOptions::new(quick, rounds, messages);
            opts.kernel_only = kernel_only;
            opts.smtp_source = smtp_source;
            bench::run(opts).map(|_| ExitCode::SUCCESS)
        }
        Cmd::Loadgen(args) => {
            reexec_release(&["xtask"])?;
            loadgen_command(args)
        }
        Cmd::Sink {
            listen,
            reject_at,
            reject_code,
        } => {
            let reject = match reject_at.as_deref() {
                None => None,
                Some("greeting") => Some(Reject::Greeting(reject_code)),
                Some("mail") => Some(Reject::At(RejectAt::Mail, reject_code)),
                Some("rcpt") => Some(Reject::At(RejectAt::Rcpt, reject_code)),
                Some("data") => Some(Reject::At(RejectAt::Data, reject_code)),
                Some(other) => {
                    anyhow::bail!("--reject-at {other}: expected greeting, mail, rcpt or data")
                }
            };
            workspace::raise_nofile_limit();
            sink::run_process(&listen, SinkConfig { reject }).map(|_| ExitCode::SUCCESS)
        }
    }
}

/// The load generator, the benchmark and the demo measure performance: a debug build would make
/// the generator the bottleneck. `cargo xtask` builds debug, so these commands rebuild xtask in
/// release and replace the process with it.
fn reexec_release(packages: &[&str]) -> Result<()> {
    if !cfg!(debug_assertions) {
        return Ok(());
    }
    workspace::build_release(packages)?;
    let exe = workspace::target_dir().join("release").join("xtask");
    use std::os::unix::process::CommandExt;
    let err = std::process::Command::new(&exe)
        .args(std::env::args_os().skip(1))
        .exec();
    Err(err).with_context(|| format!("executing {}", exe.display()))
}

fn loadgen_command(args: LoadgenArgs) -> Result<ExitCode> {
    workspace::raise_nofile_limit();
    let budget = match args.duration {
        Some(d) => Budget::Duration(d),
        None => Budget::Sessions(args.messages.unwrap_or(20_000)),
    };
    let mut spec = LoadSpec::new(args.target, args.sessions, budget);
    spec.size = args.size;
    spec.recipients = args.recipients;
    spec.pipelining = args.pipelining;
    spec.threads = args.threads;
    spec.progress = std::io::stdout().is_terminal();
    let report = loadgen::run_blocking(spec)?;
    report.print();
    if let Some(path) = args.json {
        std::fs::write(&path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(if report.sessions_failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
