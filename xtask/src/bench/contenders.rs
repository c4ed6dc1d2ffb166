//! The benchmark's contenders and their launchers: the sinks, direct to a sink, switchyard with
//! each algorithm, HAProxy, nginx on loopback, and the kernel path's modes in the namespace
//! testbed. Each launcher writes its contender's config next to its log in the bench directory.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use switchyard::totals::Totals;

use super::results::{CpuUse, Skipped};
use super::testbed::{Mode, Testbed};
use crate::loadgen::LoadReport;
use crate::workspace;
use testkit::config_toml::admin_table;
use testkit::supervise::{self, Supervised};

pub const HAPROXY_PORT: u16 = 3620;
const NGINX_PORT: u16 = 3621;

/// How the load reaches a contender.
pub enum Driver {
    /// From this process, over loopback (the built-in load generator, or smtp-source with
    /// `--smtp-source`).
    Local,
    /// Postfix's smtp-source over loopback, whatever the options: the yardstick of the load
    /// generator itself.
    SmtpSource,
    /// From inside a network namespace: the release xtask binary runs `loadgen --json` there.
    Netns(String),
}

/// One thing the benchmark measures, and the processes that make it up.
pub struct Contender {
    pub name: String,
    pub target: SocketAddr,
    pub driver: Driver,
    pub processes: Vec<Supervised>,
    /// Set for switchyard contenders: the algorithm whose distribution its totals report.
    pub algorithm: Option<String>,
    /// Where switchyard writes its totals at shutdown (`run --totals`).
    pub totals: Option<PathBuf>,
    pub runs: Vec<LoadReport>,
    /// Kernel-path contenders: the testbed's mode to activate before each run.
    pub mode: Option<Mode>,
    pub cpu: Vec<CpuUse>,
}

/// The name of the run of smtp-source straight at a sink, beside `direct` (the load generator
/// straight at the same sink).
pub const DIRECT_SMTP_SOURCE: &str = "direct (smtp-source)";

impl Contender {
    /// A contender on loopback, made of `processes` (none: the target is a sink itself).
    pub fn local(name: &str, target: SocketAddr, processes: Vec<Supervised>) -> Contender {
        Contender {
            name: name.to_string(),
            target,
            driver: Driver::Local,
            processes,
            algorithm: None,
            totals: None,
            runs: Vec::new(),
            mode: None,
            cpu: Vec::new(),
        }
    }
}

/// Postfix's smtp-sink when installed, else our own sink in a child process.
pub fn start_sinks(dir: &Path, addrs: &[SocketAddr]) -> Result<(&'static str, Vec<Supervised>)> {
    for a in addrs {
        supervise::ensure_port_free(*a)?;
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
        let code = supervise::wait_for_greeting(*a, Duration::from_secs(10))?;
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

/// switchyard on `listen` in front of `backends` with `algorithm`, writing `<stem>.toml`,
/// `<stem>.log` and, at shutdown, `<stem>-totals.json` in `dir`.
pub fn start_switchyard_process(
    dir: &Path,
    bin: &Path,
    stem: &str,
    listen: SocketAddr,
    algorithm: &str,
    backends: &[SocketAddr],
) -> Result<(Supervised, PathBuf)> {
    supervise::ensure_port_free(listen)?;
    let text = switchyard_config(listen, algorithm, backends)
        + &admin_table(Path::new(&format!("{stem}.sock")));
    start_switchyard_with(dir, bin, stem, &text)
}

/// switchyard with the config `text`, written to `<stem>.toml` in `dir`; its log is
/// `<stem>.log` and its totals at shutdown `<stem>-totals.json`.
pub fn start_switchyard_with(
    dir: &Path,
    bin: &Path,
    stem: &str,
    text: &str,
) -> Result<(Supervised, PathBuf)> {
    let cfg = dir.join(format!("{stem}.toml"));
    std::fs::write(&cfg, text).with_context(|| format!("writing {}", cfg.display()))?;
    let totals = dir.join(format!("{stem}-totals.json"));
    let _ = std::fs::remove_file(&totals);
    let mut cmd = Command::new(bin);
    cmd.arg("run")
        .arg("--config")
        .arg(&cfg)
        .arg("--totals")
        .arg(&totals)
        .env("RUST_LOG", "info");
    let p = Supervised::start(stem, &mut cmd, &dir.join(format!("{stem}.log")))?;
    Ok((p, totals))
}

pub fn start_switchyard(
    dir: &Path,
    bin: &Path,
    algorithm: &str,
    port: u16,
    backends: &[SocketAddr],
) -> Result<Contender> {
    let listen = SocketAddr::from(([127, 0, 0, 1], port));
    let stem = format!("switchyard-{algorithm}");
    let (p, totals) = start_switchyard_process(dir, bin, &stem, listen, algorithm, backends)?;
    let mut c = Contender::local(&format!("switchyard {algorithm}"), listen, vec![p]);
    c.algorithm = Some(algorithm.to_string());
    c.totals = Some(totals);
    Ok(c)
}

/// The name of the contender that runs least_conn with `[service.limits]` configured but
/// never triggered (what the limits cost a service that has them).
pub const LIMITS_CONTENDER: &str = "switchyard least_conn + limits";

/// switchyard least_conn with per-source limits and allow/deny lists set far above what the
/// load reaches: every client passes through the per-source table and the lists.
pub fn start_switchyard_with_limits(
    dir: &Path,
    bin: &Path,
    port: u16,
    backends: &[SocketAddr],
) -> Result<Contender> {
    let listen = SocketAddr::from(([127, 0, 0, 1], port));
    supervise::ensure_port_free(listen)?;
    let text = format!(
        "{}\n[service.limits]\nper_source_connections = 100000\nper_source_rate = 1000000\nper_source_burst = 1000000\ndeny = [\"192.0.2.0/24\", \"2001:db8::/32\"]\nallow = [\"127.0.0.0/8\", \"::1\"]\n",
        switchyard_config(listen, "least_conn", backends)
    );
    let (p, totals) = start_switchyard_with(dir, bin, "switchyard-limits", &text)?;
    // No distribution of its own: it would repeat least_conn's.
    let mut c = Contender::local(LIMITS_CONTENDER, listen, vec![p]);
    c.totals = Some(totals);
    Ok(c)
}

/// Sessions per backend from the totals switchyard wrote at shutdown (`run --totals FILE`).
pub fn assigned_from_totals(path: &Path) -> Result<BTreeMap<String, u64>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading switchyard's totals {}", path.display()))?;
    let totals = Totals::from_json(&text)
        .with_context(|| format!("{} is not switchyard's totals", path.display()))?;
    Ok(totals
        .backends()
        .map(|(_, b)| (b.name.clone(), b.assigned))
        .collect())
}

/// Equivalent to switchyard's bench config: least connections, SMTP health checks every 2 s.
fn haproxy_config(listen: SocketAddr, backends: &[SocketAddr]) -> String {
    let mut cfg = format!(
        "# Written by cargo xtask bench.\nglobal\n    maxconn 8000\n\ndefaults\n    mode tcp\n    timeout connect 3s\n\
         timeout client 10m\n    timeout server 10m\n\nfrontend smtp\n    bind {listen}\n    default_backend mtas\n\n\
         backend mtas\n    balance leastconn\n    option smtpchk EHLO switchyard.invalid\n"
    );
    for (i, b) in backends.iter().enumerate() {
        cfg.push_str(&format!("    server mta{} {b} check inter 2s\n", i + 1));
    }
    cfg
}

/// HAProxy on `listen` in front of `backends`, writing `<stem>.cfg` and `<stem>.log` in `dir`.
pub fn start_haproxy_process(
    dir: &Path,
    bin: &Path,
    stem: &str,
    listen: SocketAddr,
    backends: &[SocketAddr],
) -> Result<Supervised> {
    supervise::ensure_port_free(listen)?;
    let path = dir.join(format!("{stem}.cfg"));
    std::fs::write(&path, haproxy_config(listen, backends))
        .with_context(|| format!("writing {}", path.display()))?;
    let mut cmd = Command::new(bin);
    cmd.arg("-f").arg(&path).arg("-db");
    Supervised::start(stem, &mut cmd, &dir.join(format!("{stem}.log")))
}

pub fn start_haproxy(dir: &Path, bin: &Path, backends: &[SocketAddr]) -> Result<Contender> {
    let listen = SocketAddr::from(([127, 0, 0, 1], HAPROXY_PORT));
    let p = start_haproxy_process(dir, bin, "haproxy", listen, backends)?;
    Ok(Contender::local("haproxy leastconn", listen, vec![p]))
}

pub fn nginx_stream_module() -> Option<PathBuf> {
    [
        "/usr/lib/nginx/modules/ngx_stream_module.so",
        "/usr/share/nginx/modules/ngx_stream_module.so",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.is_file())
}

pub fn start_nginx(
    dir: &Path,
    bin: &Path,
    module: &Path,
    backends: &[SocketAddr],
) -> Result<Contender> {
    let listen = SocketAddr::from(([127, 0, 0, 1], NGINX_PORT));
    supervise::ensure_port_free(listen)?;
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
    Ok(Contender::local("nginx least_conn", listen, vec![p]))
}

/// The kernel path as contenders, when this machine can run it: plain routing, switchyard's
/// proxy and its XDP path (dsr, nat), taking turns in one namespace testbed with three sinks
/// of its own. As root a failure to build it is an error, not a skip (CI is root).
pub fn kernel_contenders(
    dir: &Path,
    switchyard: &Path,
) -> Result<(Option<Testbed>, Vec<Contender>, Vec<Skipped>)> {
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
    let testbed = Testbed::build(dir, switchyard)?;
    println!(
        "bench: kernel path in namespaces sy-{}-* (prepared) and sy-{}-* (plain): client, balancer, three {} sinks each; VIP {}",
        testbed.net.suffix,
        testbed.plain.suffix,
        testbed.sinks_kind,
        Testbed::target(Mode::Dsr)
    );
    let contenders = Mode::ALL
        .iter()
        .map(|mode| Contender {
            driver: Driver::Netns(testbed.client_namespace(*mode)),
            mode: Some(*mode),
            ..Contender::local(mode.contender(), Testbed::target(*mode), Vec::new())
        })
        .collect();
    Ok((Some(testbed), contenders, Vec::new()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard::totals::{BackendTotals, ServiceTotals};

    #[test]
    fn assigned_sessions_come_from_the_totals_file() {
        let backend = |name: &str, port: u16, assigned: u64| BackendTotals {
            name: name.into(),
            address: SocketAddr::from(([127, 0, 0, 1], port)),
            active: 0,
            assigned,
            kernel: None,
        };
        let totals = Totals {
            services: vec![ServiceTotals {
                name: "bench".into(),
                dataplane: "proxy".into(),
                backends: vec![backend("mta1", 3601, 334), backend("mta2", 3602, 333)],
                kernel: None,
            }],
            ..Totals::default()
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("totals.json");
        std::fs::write(&path, totals.to_json()).expect("write totals");
        let a = assigned_from_totals(&path).expect("read totals");
        assert_eq!(a.get("mta1"), Some(&334));
        assert_eq!(a.get("mta2"), Some(&333));
        assert_eq!(a.len(), 2);
        assert!(assigned_from_totals(&dir.path().join("missing.json")).is_err());
    }
}
