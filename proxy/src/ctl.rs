//! `switchyard ctl`: the client of the admin socket. Finds the socket (`--socket`, the
//! `[admin] socket` of `--config`, or the default), sends one [`Request`], prints the
//! [`Reply`] (for `show`, a table per service, or JSON), and tells every way of not reaching
//! the daemon apart: none running, no permission, no answer.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Args, Subcommand};

use crate::config;
use crate::control::{
    BackendReport, CheckReport, FlowsReport, Reply, Request, ServiceReport, SessionsReport,
    ShowReport, Target,
};

/// How long the daemon may take to answer (a reload of a large file included).
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest reply read: far above a `show` of thousands of backends.
const MAX_REPLY: u64 = 64 << 20;

/// `switchyard ctl`'s options and command.
#[derive(Args, Debug)]
pub struct CtlArgs {
    /// The admin socket to talk to.
    #[arg(long, global = true, value_name = "PATH", conflicts_with = "config")]
    socket: Option<PathBuf>,
    /// Take the admin socket from this configuration's `[admin] socket`.
    #[arg(long, short, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Print the reply as JSON (for `show`: the state report).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: CtlCommand,
}

#[derive(Subcommand, Debug)]
enum CtlCommand {
    /// The state of every service, or of one: listeners, sessions, backends.
    Show { service: Option<String> },
    /// No new sessions or flows for SERVICE/BACKEND; those it has finish.
    Drain {
        #[arg(value_name = "SERVICE/BACKEND")]
        target: String,
    },
    /// End a runtime drain.
    Undrain {
        #[arg(value_name = "SERVICE/BACKEND")]
        target: String,
    },
    /// No traffic and no health checks for SERVICE/BACKEND (maintenance).
    Disable {
        #[arg(value_name = "SERVICE/BACKEND")]
        target: String,
    },
    /// End a runtime disable.
    Enable {
        #[arg(value_name = "SERVICE/BACKEND")]
        target: String,
    },
    /// Give SERVICE/BACKEND a runtime weight.
    Weight {
        #[arg(value_name = "SERVICE/BACKEND")]
        target: String,
        weight: String,
    },
    /// Re-read the configuration file and apply the difference.
    Reload,
    /// Validate the configuration file on disk without applying it.
    Check,
    /// The kernel's flow table (xdp services): client, VIP, backend, age, idle time, client
    /// packets; the least idle flows first.
    Flows {
        service: Option<String>,
        /// List at most N flows (default 1000).
        #[arg(long, value_name = "N")]
        limit: Option<u32>,
    },
    /// The proxy's open sessions: client, backend, age, bytes each way; the oldest first.
    Sessions { service: Option<String> },
    /// This balancer's place in rotation: `drain` withdraws every announced VIP from BIRD
    /// (sessions go on), `undrain` announces them again while their backends can take sessions.
    Node {
        #[command(subcommand)]
        action: NodeAction,
    },
}

#[derive(Subcommand, Debug)]
enum NodeAction {
    /// Withdraw every announced VIP; open sessions finish.
    Drain,
    /// Announce again (as health allows).
    Undrain,
}

/// Runs `switchyard ctl`: 0 when the daemon carried the request out, 1 otherwise.
pub fn main(args: CtlArgs) -> ExitCode {
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(message) => {
            eprintln!("switchyard ctl: {message}");
            ExitCode::FAILURE
        }
    }
}

/// Whether the request was carried out; `Err` when it could not be asked at all.
fn run(args: &CtlArgs) -> Result<bool, String> {
    let request = request_of(&args.command)?;
    let socket = socket_path(args.socket.as_deref(), args.config.as_deref())?;
    let reply = ask(&socket, &request)?;
    print_reply(&reply, &request, args.json)?;
    Ok(reply.ok)
}

fn request_of(command: &CtlCommand) -> Result<Request, String> {
    Ok(match command {
        CtlCommand::Show { service } => Request::Show {
            service: service.clone(),
        },
        CtlCommand::Drain { target } => Request::Drain {
            target: parse_target(target)?,
        },
        CtlCommand::Undrain { target } => Request::Undrain {
            target: parse_target(target)?,
        },
        CtlCommand::Disable { target } => Request::Disable {
            target: parse_target(target)?,
        },
        CtlCommand::Enable { target } => Request::Enable {
            target: parse_target(target)?,
        },
        CtlCommand::Weight { target, weight } => Request::Weight {
            target: parse_target(target)?,
            weight: weight.parse().map_err(|_| {
                format!(
                    "weight {weight:?} is not a whole number (the config's weight is 1 to 1000)"
                )
            })?,
        },
        CtlCommand::Reload => Request::Reload,
        CtlCommand::Check => Request::Check,
        CtlCommand::Flows { service, limit } => Request::Flows {
            service: service.clone(),
            limit: *limit,
        },
        CtlCommand::Sessions { service } => Request::Sessions {
            service: service.clone(),
        },
        CtlCommand::Node {
            action: NodeAction::Drain,
        } => Request::NodeDrain,
        CtlCommand::Node {
            action: NodeAction::Undrain,
        } => Request::NodeUndrain,
    })
}

/// `SERVICE/BACKEND`, both parts non-empty, one slash.
pub fn parse_target(text: &str) -> Result<Target, String> {
    match text.split_once('/') {
        Some((service, backend))
            if !service.is_empty() && !backend.is_empty() && !backend.contains('/') =>
        {
            Ok(Target {
                service: service.to_owned(),
                backend: backend.to_owned(),
            })
        }
        _ => Err(format!(
            "{text:?} is not SERVICE/BACKEND: write the service's name, a slash and the backend's name (e.g. mx/mta1)"
        )),
    }
}

/// `--socket`, else the `[admin] socket` of `--config`, else the default.
fn socket_path(socket: Option<&Path>, config_file: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(socket) = socket {
        return Ok(socket.to_path_buf());
    }
    let Some(file) = config_file else {
        return Ok(PathBuf::from(config::DEFAULT_ADMIN_SOCKET));
    };
    config::load(file).map(|c| c.admin_socket).map_err(|errors| {
        format!(
            "{} has errors, so its [admin] socket is not read; fix them or pass --socket:\n{errors}",
            file.display()
        )
    })
}

/// Sends `request` over the socket at `path` and reads the one-line reply.
pub fn ask(path: &Path, request: &Request) -> Result<Reply, String> {
    let stream = UnixStream::connect(path).map_err(|error| unreachable_daemon(path, &error))?;
    let io_error = |error: std::io::Error| match error.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => format!(
            "no reply from the switchyard serving {} within {}s",
            path.display(),
            REPLY_TIMEOUT.as_secs()
        ),
        _ => format!(
            "talking to the switchyard serving {}: {error}",
            path.display()
        ),
    };
    stream
        .set_read_timeout(Some(REPLY_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(REPLY_TIMEOUT)))
        .map_err(io_error)?;
    let mut line = serde_json::to_vec(request).map_err(|e| e.to_string())?;
    line.push(b'\n');
    (&stream).write_all(&line).map_err(io_error)?;
    let mut reply = Vec::new();
    BufReader::new(&stream)
        .take(MAX_REPLY)
        .read_until(b'\n', &mut reply)
        .map_err(io_error)?;
    if reply.is_empty() {
        return Err(format!(
            "the switchyard serving {} closed the connection without a reply",
            path.display()
        ));
    }
    serde_json::from_slice(&reply)
        .map_err(|error| format!("unreadable reply from {}: {error}", path.display()))
}

/// Why the socket could not be connected to, for people.
fn unreachable_daemon(path: &Path, error: &std::io::Error) -> String {
    let path_text = path.display();
    match error.kind() {
        ErrorKind::NotFound | ErrorKind::ConnectionRefused => format!(
            "no switchyard is serving {path_text} ({error}); is it running, with this [admin] socket? (--socket PATH or --config FILE name another)"
        ),
        ErrorKind::PermissionDenied => format!(
            "permission denied on {path_text}: run ctl as root or as a member of {}",
            socket_group(path)
        ),
        _ => format!("cannot connect to {path_text}: {error}"),
    }
}

/// The socket's group as a message names it (`group "switchyard" (gid 990)`).
fn socket_group(path: &Path) -> String {
    use std::os::unix::fs::MetadataExt;
    let Ok(metadata) = std::fs::metadata(path) else {
        return "the socket's group".to_owned();
    };
    let gid = metadata.gid();
    match nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(gid)) {
        Ok(Some(group)) => format!("the socket's group \"{}\" (gid {gid})", group.name),
        _ => format!("the socket's group (gid {gid})"),
    }
}

fn print_reply(reply: &Reply, request: &Request, json: bool) -> Result<(), String> {
    if json {
        // A report asked for is printed alone; anything else (a refusal too) as the reply.
        let value = match (request, reply) {
            (
                Request::Show { .. },
                Reply {
                    ok: true,
                    show: Some(report),
                    ..
                },
            ) => serde_json::to_string_pretty(report),
            (
                Request::Flows { .. },
                Reply {
                    ok: true,
                    flows: Some(report),
                    ..
                },
            ) => serde_json::to_string_pretty(report),
            (
                Request::Sessions { .. },
                Reply {
                    ok: true,
                    sessions: Some(report),
                    ..
                },
            ) => serde_json::to_string_pretty(report),
            _ => serde_json::to_string_pretty(reply),
        };
        println!("{}", value.map_err(|e| e.to_string())?);
        return Ok(());
    }
    let text = reply.text.trim_end();
    if !reply.ok {
        eprintln!("{text}");
        return Ok(());
    }
    if !text.is_empty() {
        println!("{text}");
    }
    if let Some(report) = &reply.show {
        print!("{}", show_table(report, SystemTime::now()));
    }
    if let Some(report) = &reply.flows {
        print!("{}", flows_table(report));
    }
    if let Some(report) = &reply.sessions {
        print!("{}", sessions_table(report));
    }
    Ok(())
}

/// `ctl flows` for people: how many flows matched, then one row per flow listed.
pub fn flows_table(report: &FlowsReport) -> String {
    let mut out = format!(
        "{} flows; {} listed, least idle first\n",
        report.matched,
        report.flows.len()
    );
    if report.flows.is_empty() {
        return out;
    }
    let mut rows = vec![
        [
            "SERVICE", "CLIENT", "VIP", "BACKEND", "STATE", "AGE", "IDLE", "PACKETS",
        ]
        .map(str::to_owned)
        .to_vec(),
    ];
    rows.extend(report.flows.iter().map(|f| {
        vec![
            f.service.clone(),
            f.client.clone(),
            f.vip.clone(),
            with_address(&f.backend, &f.backend_address),
            f.state.clone(),
            short_duration(f.age_ms),
            short_duration(f.idle_ms),
            f.packets.to_string(),
        ]
    }));
    out.push_str(&aligned(&rows, ""));
    out
}

/// `ctl sessions` for people: one row per open session.
pub fn sessions_table(report: &SessionsReport) -> String {
    let mut out = format!("{} sessions\n", report.sessions.len());
    if report.sessions.is_empty() {
        return out;
    }
    let mut rows = vec![
        [
            "SERVICE",
            "CLIENT",
            "BACKEND",
            "AGE",
            "TO BACKEND",
            "TO CLIENT",
        ]
        .map(str::to_owned)
        .to_vec(),
    ];
    rows.extend(report.sessions.iter().map(|s| {
        vec![
            s.service.clone(),
            s.client.clone(),
            with_address(&s.backend, &s.backend_address),
            short_duration(s.age_ms),
            s.to_backend_bytes.to_string(),
            s.to_client_bytes.to_string(),
        ]
    }));
    out.push_str(&aligned(&rows, ""));
    out
}

/// `mta1 (192.0.2.1:25)`, or the name alone when the address is unknown.
fn with_address(name: &str, address: &str) -> String {
    if address.is_empty() {
        name.to_owned()
    } else {
        format!("{name} ({address})")
    }
}

/// `850ms`, `12s`, `3m4s`, `2h1m`: a column's width, a person's precision.
fn short_duration(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0 => format!("{ms}ms"),
        1..60 => format!("{s}s"),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        _ => format!("{}h{}m", s / 3600, (s % 3600) / 60),
    }
}

/// `ctl show` for people: one block per service, one row per backend.
pub fn show_table(report: &ShowReport, now: SystemTime) -> String {
    let mut out = String::new();
    if report.node.drained {
        let _ = writeln!(
            out,
            "node drained ({}): announced VIPs withdrawn\n",
            report.node.why
        );
    }
    for (index, service) in report.services.iter().enumerate() {
        if index > 0 {
            out.push('\n');
        }
        out.push_str(&service_line(service));
        let mut rows = vec![
            [
                "BACKEND",
                "ADDRESS",
                "STATE",
                "WEIGHT",
                "ACTIVE",
                "SESSIONS",
                "FAILURES",
                "AVG",
                "LAST CHECK",
                "WHY",
            ]
            .map(str::to_owned)
            .to_vec(),
        ];
        rows.extend(service.backends.iter().map(|b| backend_row(b, now)));
        out.push_str(&aligned(&rows, "  "));
    }
    out
}

fn service_line(service: &ServiceReport) -> String {
    let mut line = format!(
        "service \"{}\" ({}, {}): listen {}; sessions {} open, {} total; 421s {}",
        service.name,
        service.dataplane,
        service.algorithm,
        service.listeners.join(", "),
        service.sessions_active,
        service.sessions_total,
        service.refused_421
    );
    if let Some(flows) = service.flows {
        let _ = write!(line, "; flows {flows}");
    }
    if let (Some(adopted), Some(unknown)) = (service.flows_adopted, service.unknown_flow_packets) {
        let _ = write!(
            line,
            "; flows adopted {adopted}, unknown-flow packets {unknown}"
        );
    }
    if let Some(chance) = &service.second_chance {
        let _ = write!(
            line,
            "; second chance: forwarded {}, delivered {}, unclaimed {}",
            chance.forwarded, chance.delivered, chance.unclaimed
        );
    }
    if let Some(announce) = &service.announce {
        let state = if announce.announced {
            "announced"
        } else {
            "withdrawn"
        };
        let _ = write!(
            line,
            "; VIP {state} (BIRD protocol {}): {}",
            announce.protocol, announce.why
        );
    }
    let sources = &service.sources;
    if sources.denied + sources.too_many + sources.too_fast + sources.untracked > 0 {
        let _ = write!(
            line,
            "; per source: {} denied, {} at the connection limit, {} over the rate, {} untracked",
            sources.denied, sources.too_many, sources.too_fast, sources.untracked
        );
    }
    line.push('\n');
    line
}

fn backend_row(backend: &BackendReport, now: SystemTime) -> Vec<String> {
    let max = match backend.max_connections {
        0 => String::new(),
        n => format!("/{n}"),
    };
    vec![
        backend.name.clone(),
        backend.address.clone(),
        backend.state.clone(),
        backend.weight.to_string(),
        format!("{}{max}", backend.active),
        backend.sessions_total.to_string(),
        backend.failures.to_string(),
        response_time(backend.response_us),
        backend
            .last_check
            .as_ref()
            .map_or_else(|| "-".to_owned(), |check| last_check(check, now)),
        backend.why.clone(),
    ]
}

/// least_time's average: "-" while unknown.
fn response_time(us: u32) -> String {
    match us {
        0 => "-".to_owned(),
        1..=999 => format!("{us}us"),
        _ => format!("{:.1}ms", f64::from(us) / 1000.0),
    }
}

/// `ok 3s ago: greeted 220`.
fn last_check(check: &CheckReport, now: SystemTime) -> String {
    let now_ms = now
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let ago = Duration::from_secs(now_ms.saturating_sub(check.at_unix_ms) / 1000);
    let verdict = if check.ok { "ok" } else { "failed" };
    format!(
        "{verdict} {} ago: {}",
        humantime::format_duration(ago),
        check.detail
    )
}

/// Rows as indented columns padded to their widest cell; the last column is not padded.
fn aligned(rows: &[Vec<String>], indent: &str) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|cell| cell.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        out.push_str(indent);
        for (c, cell) in row.iter().enumerate() {
            if c + 1 == row.len() {
                out.push_str(cell);
            } else {
                let _ = write!(out, "{cell:<width$}  ", width = widths[c]);
            }
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_need_a_service_a_slash_and_a_backend() {
        assert_eq!(
            parse_target("mx/mta1"),
            Ok(Target {
                service: "mx".into(),
                backend: "mta1".into()
            })
        );
        for bad in ["mx", "/mta1", "mx/", "mx/mta1/x", ""] {
            let error = parse_target(bad).expect_err(bad);
            assert!(error.contains("SERVICE/BACKEND"), "{error}");
        }
    }

    #[test]
    fn dump_tables_say_how_many_and_keep_durations_short() {
        assert_eq!(short_duration(850), "850ms");
        assert_eq!(short_duration(12_400), "12s");
        assert_eq!(short_duration(184_000), "3m4s");
        assert_eq!(short_duration(7_260_000), "2h1m");
        let flows = FlowsReport {
            matched: 5,
            flows: vec![crate::control::FlowReport {
                service: "mx".into(),
                client: "198.18.0.1:40000".into(),
                vip: "198.18.0.100:25".into(),
                backend: "mta1".into(),
                backend_address: "198.18.1.11:25".into(),
                state: "established".into(),
                age_ms: 61_000,
                idle_ms: 20,
                packets: 14,
            }],
        };
        let table = flows_table(&flows);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines[0], "5 flows; 1 listed, least idle first");
        assert!(lines[1].starts_with("SERVICE"), "{table}");
        for cell in [
            "198.18.0.1:40000",
            "mta1 (198.18.1.11:25)",
            "1m1s",
            "20ms",
            "14",
        ] {
            assert!(lines[2].contains(cell), "{cell} missing: {table}");
        }
        let none = sessions_table(&SessionsReport::default());
        assert_eq!(none, "0 sessions\n");
    }

    #[test]
    fn show_table_has_one_row_per_backend_in_aligned_columns() {
        let report = ShowReport {
            services: vec![ServiceReport {
                name: "mx".into(),
                dataplane: "proxy".into(),
                algorithm: "least_time".into(),
                listeners: vec!["127.0.0.1:2525".into()],
                sessions_active: 2,
                sessions_total: 40,
                refused_421: 1,
                flows: None,
                flows_adopted: None,
                unknown_flow_packets: None,
                announce: None,
                second_chance: None,
                sources: Default::default(),
                backends: vec![
                    BackendReport {
                        name: "mta1".into(),
                        address: "127.0.0.1:2601".into(),
                        state: "up".into(),
                        why: "health checks".into(),
                        last_check: Some(CheckReport {
                            ok: true,
                            at_unix_ms: 10_000,
                            detail: "greeted 220".into(),
                        }),
                        weight: 3,
                        max_connections: 50,
                        active: 2,
                        sessions_total: 30,
                        failures: 0,
                        response_us: 1500,
                        throttled: 0,
                    },
                    BackendReport {
                        name: "mta-long-name".into(),
                        state: "drain".into(),
                        why: "ctl drain by uid 0".into(),
                        ..BackendReport::default()
                    },
                ],
            }],
            node: Default::default(),
        };
        let table = show_table(&report, UNIX_EPOCH + Duration::from_secs(13));
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(
            lines[0],
            "service \"mx\" (proxy, least_time): listen 127.0.0.1:2525; sessions 2 open, 40 total; 421s 1"
        );
        assert!(lines[2].contains("ok 3s ago: greeted 220"), "{table}");
        assert!(
            lines[2].contains("1.5ms") && lines[2].contains("2/50"),
            "{table}"
        );
        assert!(lines[3].ends_with("ctl drain by uid 0"), "{table}");
        // Columns line up: every row's STATE cell starts where the header's does.
        let state_at = lines[1].find("STATE").expect("header");
        assert_eq!(lines[2].find("up"), Some(state_at), "{table}");
        assert_eq!(lines[3].find("drain"), Some(state_at), "{table}");
    }
}
