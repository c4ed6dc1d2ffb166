//! `cargo xtask demo`: switchyard with `config/demo.toml` in front of three local sinks, under
//! load, with one sink shut down halfway: the failover a mail operator wants to see, and the
//! proof that it cost no session.
//!
//! The sinks are xtask's own, one process each, because a sink stopped for the demo must stop
//! like an MTA being shut down (refuse new connections, finish the sessions in progress);
//! smtp-sink can only be killed, which cuts relayed sessions in the middle, and no layer-4
//! balancer can save those.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::loadgen::{self, Budget, LoadSpec};
use crate::workspace;
use testkit::config_toml::admin_table;
use testkit::supervise::{self, Supervised};

/// What config/demo.toml sets; the fallback config uses the same values.
const LISTEN: &str = "127.0.0.1:2525";
const BACKENDS: [(&str, &str); 3] = [
    ("sink1", "127.0.0.1:2601"),
    ("sink2", "127.0.0.1:2602"),
    ("sink3", "127.0.0.1:2603"),
];

fn fallback_config() -> String {
    let mut cfg = format!(
        "# Written by cargo xtask demo (config/demo.toml was missing).\nshutdown_timeout = \"10s\"\n\n[[service]]\n\
         name = \"demo\"\nlisten = \"{LISTEN}\"\nalgorithm = \"least_conn\"\n\n[service.health]\nkind = \"smtp\"\n\
         interval = \"1s\"\ntimeout = \"1s\"\nrise = 2\nfall = 2\n"
    );
    for (name, addr) in BACKENDS {
        cfg.push_str(&format!(
            "\n[[service.backend]]\nname = \"{name}\"\naddress = \"{addr}\"\n"
        ));
    }
    cfg
}

/// config/demo.toml (or the fallback) copied into `dir` with an admin socket of its own
/// there: the default one is the host's, where a real switchyard may be serving.
fn config_path(dir: &Path) -> Result<PathBuf> {
    let shipped = workspace::root().join("config").join("demo.toml");
    let text = if shipped.is_file() {
        std::fs::read_to_string(&shipped)
            .with_context(|| format!("reading {}", shipped.display()))?
    } else {
        fallback_config()
    };
    let path = dir.join("demo.toml");
    std::fs::write(&path, text + &admin_table(Path::new("admin.sock")))
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

fn parse_addr(s: &str) -> Result<SocketAddr> {
    s.parse().with_context(|| format!("bad address {s}"))
}

pub fn run(duration: Duration) -> Result<ExitCode> {
    supervise::stop_children_on_signal();
    workspace::raise_nofile_limit();
    let dir = workspace::target_dir().join("demo");
    std::fs::create_dir_all(&dir)?;
    let config = config_path(&dir)?;
    let listen = parse_addr(LISTEN)?;
    supervise::ensure_port_free(listen)?;

    println!(
        "demo: three SMTP sinks, switchyard in front of them ({}), load for {duration:?}",
        config.display()
    );
    let exe = std::env::current_exe()?;
    let mut sinks = Vec::new();
    for (name, addr) in BACKENDS {
        let addr = parse_addr(addr)?;
        supervise::ensure_port_free(addr)?;
        let mut cmd = Command::new(&exe);
        cmd.args(["sink", "--listen"]).arg(addr.to_string());
        sinks.push((
            name,
            addr,
            Supervised::start(name, &mut cmd, &dir.join(format!("{name}.log")))?,
        ));
    }
    for (_, addr, _) in &sinks {
        supervise::wait_for_greeting(*addr, Duration::from_secs(10))?;
    }
    let switchyard_log = dir.join("switchyard.log");
    let totals = dir.join("switchyard-totals.json");
    let _ = std::fs::remove_file(&totals);
    let mut cmd = Command::new(workspace::switchyard_release());
    cmd.arg("run")
        .arg("--config")
        .arg(&config)
        .arg("--totals")
        .arg(&totals)
        .env("RUST_LOG", "info");
    let mut switchyard = Supervised::start("switchyard", &mut cmd, &switchyard_log)?;
    wait_healthy(listen, &mut switchyard)?;
    println!(
        "demo: switchyard listens on {listen}; sinks on {}",
        BACKENDS.map(|b| b.1).join(", ")
    );

    let cancel = Arc::new(AtomicBool::new(false));
    let mut spec = LoadSpec::new(listen, 50, Budget::Duration(duration));
    spec.progress = std::io::stdout().is_terminal();
    spec.cancel = Some(cancel.clone());
    let started = Instant::now();
    let load = std::thread::spawn(move || loadgen::run_blocking(spec));

    std::thread::sleep(duration / 2);
    let (victim, victim_addr) = (sinks[1].0, sinks[1].1);
    let stopped_at = started.elapsed();
    sinks[1].2.stop(Duration::from_secs(15));
    let report = load
        .join()
        .map_err(|_| anyhow::anyhow!("the load generator thread panicked"))??;
    println!(
        "demo: stopped {victim} ({victim_addr}) at {:.1} s, as an MTA shutting down: refuses new connections, finishes its sessions",
        stopped_at.as_secs_f64()
    );

    switchyard.stop(Duration::from_secs(15));
    for (_, _, p) in &mut sinks {
        p.stop(Duration::from_secs(15));
    }
    let log = std::fs::read_to_string(&switchyard_log).unwrap_or_default();
    let assigned = crate::bench::assigned_from_totals(&totals).unwrap_or_else(|e| {
        println!("demo: no totals from switchyard: {e:#}");
        Default::default()
    });

    println!("\n== load");
    report.print();
    println!("\n== sessions per backend");
    println!("  backend  address           assigned by switchyard   messages at the sink");
    for (name, addr, p) in &sinks {
        let at_sink = sink_messages(&p.log).map_or("?".to_string(), |n| n.to_string());
        let by_switchyard = assigned
            .get(*name)
            .map_or("?".to_string(), |n| n.to_string());
        println!("  {name:<8} {addr:<17} {by_switchyard:>22}   {at_sink:>20}");
    }
    println!("  (switchyard's count includes the readiness probe, a session without a message)");
    println!(
        "\n== health transitions (from {})",
        switchyard_log.display()
    );
    let transitions: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" is UP") || l.contains(" is DOWN") || l.contains("marked down"))
        .collect();
    if transitions.is_empty() {
        println!("  none logged");
    }
    for t in transitions {
        println!("  {}", t.trim());
    }
    println!("\n== failed sessions: {}", report.sessions_failed);
    if report.sessions_failed > 0 || report.sessions_ok == 0 {
        println!(
            "demo: FAILED ({} failed, {} completed)",
            report.sessions_failed, report.sessions_ok
        );
        return Ok(ExitCode::FAILURE);
    }
    println!(
        "demo: OK: {} sessions, none failed, across the loss of {victim}",
        report.sessions_ok
    );
    Ok(ExitCode::SUCCESS)
}

/// Waits until switchyard greets with 220 through a healthy backend.
fn wait_healthy(listen: SocketAddr, switchyard: &mut Supervised) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        switchyard.check_running()?;
        if let Ok(220) = supervise::wait_for_greeting(listen, Duration::from_secs(1)) {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "switchyard did not greet with 220 within 20 s; its log:\n{}",
            supervise::tail(&switchyard.log, 20)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The sink's own count from its exit line ("sink ADDR stopped: sessions=N messages=M ...").
fn sink_messages(log: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(log).ok()?;
    text.lines()
        .filter(|l| l.contains("stopped:"))
        .flat_map(|l| l.split_whitespace())
        .find_map(|w| w.strip_prefix("messages=")?.parse().ok())
}
