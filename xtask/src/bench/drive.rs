//! Driving a contender: waiting until it greets, then one run of load through it, from the
//! built-in load generator on loopback, Postfix's smtp-source, or the load generator inside
//! the kernel testbed's client namespace.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::contenders::{Contender, Driver};
use super::{BenchOptions, bench_dir};
use crate::loadgen::{self, Budget, LoadReport, LoadSpec};
use crate::workspace;
use testkit::supervise;

/// Waits until a loopback contender greets with 220 (for switchyard: its backends are up and
/// healthy); the kernel path's contenders wait when their mode is activated.
pub fn wait_ready(c: &Contender) -> Result<()> {
    match c.driver {
        Driver::Local | Driver::SmtpSource => wait_until_greeting(&c.name, c.target),
        Driver::Netns(_) => Ok(()),
    }
}

/// Waits (20 s at most) until `target`, the balancer `name`, greets with 220.
pub fn wait_until_greeting(name: &str, target: SocketAddr) -> Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let code =
            supervise::wait_for_greeting(target, Duration::from_secs(10)).with_context(|| {
                format!(
                    "{name} did not come up; see its log in {}",
                    bench_dir().display()
                )
            })?;
        if code == 220 {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            bail!("{name} still greets with {code} after 20 s");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

pub fn drive(c: &Contender, opts: &BenchOptions, dir: &Path) -> Result<LoadReport> {
    let progress = std::io::stdout().is_terminal();
    match &c.driver {
        Driver::Local if opts.smtp_source => run_smtp_source(c.target, opts),
        Driver::SmtpSource => run_smtp_source(c.target, opts),
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
        .context("smtp-source (Debian package postfix) is not installed")?;
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
