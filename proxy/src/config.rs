//! The TOML configuration: its schema, defaults, and validation into the types the rest of
//! the program uses. Every error names the file, line and key; a config with errors changes
//! nothing (`check` exits 1, `run` refuses to start).
//!
//! Parsing happens in two steps. serde reads the file into the `raw` structs, which keep every
//! value's byte span (`toml::Spanned`) and reject unknown keys; a structural problem (TOML
//! syntax, an unknown key, a value of the wrong type) stops there, as serde stops at the first
//! one. Validation then checks every value and collects *all* remaining problems, each located
//! through its span.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A whole, validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub source: PathBuf,
    /// How long active sessions may run on after SIGTERM/SIGINT (top-level `shutdown_timeout`).
    pub shutdown_timeout: Duration,
    /// Worker threads for the userspace proxy (top-level `workers`); `None` = automatic.
    pub workers: Option<u32>,
    pub services: Vec<ServiceConfig>,
}

#[derive(Clone, Debug)]
pub struct ServiceConfig {
    pub name: String,
    pub listen: Vec<SocketAddr>,
    pub algorithm: Algorithm,
    pub proxy_protocol: ProxyProtocol,
    /// 0 = unlimited.
    pub max_connections: u32,
    pub connect_timeout: Duration,
    /// How long to wait for a backend's 220 greeting before trying another backend.
    pub greeting_timeout: Duration,
    pub idle_timeout: Duration,
    pub retries: u32,
    pub health: HealthConfig,
    pub backends: Vec<BackendConfig>,
    /// Which data plane carries this service's traffic.
    pub dataplane: Dataplane,
    /// Present exactly when `dataplane` is [`Dataplane::Xdp`]; then `listen` is one IPv4
    /// VIP:port and every backend address is IPv4.
    pub xdp: Option<XdpConfig>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algorithm {
    RoundRobin,
    WeightedRoundRobin,
    LeastConn,
    IpHash,
    LeastTime,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyProtocol {
    None,
    V1,
    V2,
}

#[derive(Clone, Debug)]
pub struct HealthConfig {
    pub kind: HealthKind,
    pub interval: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
    pub ehlo: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HealthKind {
    None,
    Tcp,
    Smtp,
}

#[derive(Clone, Debug)]
pub struct BackendConfig {
    pub name: String,
    pub address: SocketAddr,
    /// 1..=1000.
    pub weight: u32,
    /// 0 = unlimited.
    pub max_connections: u32,
    /// Operator drain: keeps the sessions and flows it has, takes no new ones (both planes).
    pub drain: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dataplane {
    /// The userspace proxy: accepts TCP and relays bytes; needs no privileges.
    Proxy,
    /// The XDP kernel fast path: steers packets of each flow to its backend.
    Xdp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Forwarding {
    /// Direct server return: rewrite the destination MAC; backends hold the VIP and answer
    /// clients directly.
    Dsr,
    /// Destination NAT to the backend; replies are rewritten back to the VIP on the
    /// backend-facing interface.
    Nat,
}

/// The `[service.xdp]` table.
#[derive(Clone, Debug)]
pub struct XdpConfig {
    /// Where client packets arrive.
    pub interface: String,
    pub forwarding: Forwarding,
    /// Where backends are reached (nat); defaults to `interface`.
    pub backend_interface: String,
    /// Entries of the LRU flow table.
    pub flow_table_size: u32,
    /// A flow with no packets for this long (and no FIN/RST seen) is expired and uncounted.
    pub flow_idle_timeout: Duration,
    /// Pin the program's maps and links in bpffs: shutdown leaves the program steering
    /// established flows, and the next start takes them over. The same for every xdp service
    /// (they share one program).
    pub pin: bool,
}

/// All problems found in one config file, one per line, each naming file, line and key.
#[derive(Debug)]
pub struct ConfigErrors {
    pub errors: Vec<String>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for e in &self.errors {
            writeln!(f, "error: {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Reads and validates the configuration at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigErrors {
        errors: vec![format!(
            "{}: cannot read the configuration: {e}",
            path.display()
        )],
    })?;
    parse(path, &text)
}

/// Validates `text` as the contents of the file `path` (used in messages and `Config::source`).
pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigErrors> {
    let raw: raw::Config = toml::from_str(text).map_err(|e| ConfigErrors {
        errors: vec![structural_error(path, text, e)],
    })?;
    let mut report = Report {
        file: path.display().to_string(),
        text,
        errors: Vec::new(),
    };
    let config = validate(path, raw, &mut report);
    if report.errors.is_empty() {
        Ok(config)
    } else {
        // Stable: problems found on one line keep the order they were checked in.
        report.errors.sort_by_key(|(line, _)| *line);
        Err(ConfigErrors {
            errors: report.errors.into_iter().map(|(_, text)| text).collect(),
        })
    }
}

// Defaults (the annotated config/switchyard.toml and the README repeat them; keep in step).
const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_ALGORITHM: Algorithm = Algorithm::LeastConn;
const DEFAULT_MAX_CONNECTIONS: u32 = 10_000;
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Postfix's postscreen holds its greeting for about 6 s (`postscreen_greet_wait`); stay above.
const DEFAULT_GREETING_TIMEOUT: Duration = Duration::from_secs(10);
/// RFC 5321 §4.5.3.2.7 asks servers to wait at least 5 minutes for a command.
const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(600);
const DEFAULT_RETRIES: u32 = 2;
const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_secs(2);
const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(1);
const DEFAULT_RISE: u32 = 2;
const DEFAULT_FALL: u32 = 2;
const DEFAULT_EHLO: &str = "switchyard.invalid";
const DEFAULT_WEIGHT: u32 = 1;
const DEFAULT_FLOW_TABLE_SIZE: u32 = 1 << 20;
const DEFAULT_FLOW_IDLE_TIMEOUT: Duration = Duration::from_secs(600);

/// Anything longer is surely a typo ("10d" for "10m"), and huge values overflow deadlines.
const MAX_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);
const MAX_WEIGHT: i64 = 1000;
const WORKERS_RANGE: (i64, i64) = (1, 1024);
const MAX_RETRIES: i64 = 100;
const MAX_RISE_FALL: i64 = 100;
const FLOW_TABLE_RANGE: (i64, i64) = (1024, 1 << 26);
/// Linux interface names are at most IFNAMSIZ - 1 bytes.
const MAX_IFNAME: usize = 15;
const MAX_NAME: usize = 64;

const ALGORITHMS: &[(&str, Algorithm)] = &[
    ("round_robin", Algorithm::RoundRobin),
    ("weighted_round_robin", Algorithm::WeightedRoundRobin),
    ("least_conn", Algorithm::LeastConn),
    ("ip_hash", Algorithm::IpHash),
    ("least_time", Algorithm::LeastTime),
];
const PROXY_PROTOCOLS: &[(&str, ProxyProtocol)] = &[
    ("none", ProxyProtocol::None),
    ("v1", ProxyProtocol::V1),
    ("v2", ProxyProtocol::V2),
];
const HEALTH_KINDS: &[(&str, HealthKind)] = &[
    ("none", HealthKind::None),
    ("tcp", HealthKind::Tcp),
    ("smtp", HealthKind::Smtp),
];
const DATAPLANES: &[(&str, Dataplane)] = &[("proxy", Dataplane::Proxy), ("xdp", Dataplane::Xdp)];
const FORWARDINGS: &[(&str, Forwarding)] = &[("dsr", Forwarding::Dsr), ("nat", Forwarding::Nat)];

fn name_of<T: PartialEq + Copy>(table: &[(&'static str, T)], value: T) -> &'static str {
    table
        .iter()
        .find(|(_, v)| *v == value)
        .map_or("?", |(name, _)| name)
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(name_of(ALGORITHMS, *self))
    }
}

impl fmt::Display for ProxyProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(name_of(PROXY_PROTOCOLS, *self))
    }
}

impl fmt::Display for HealthKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(name_of(HEALTH_KINDS, *self))
    }
}

impl fmt::Display for Dataplane {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(name_of(DATAPLANES, *self))
    }
}

impl fmt::Display for Forwarding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(name_of(FORWARDINGS, *self))
    }
}

/// The file as serde sees it: every value optional (defaults and "missing" errors come from
/// validation, which knows the line), every value spanned, unknown keys rejected.
mod raw {
    use serde::Deserialize;
    use toml::Spanned;

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Config {
        pub shutdown_timeout: Option<Spanned<toml::Value>>,
        pub workers: Option<Spanned<i64>>,
        #[serde(default)]
        pub service: Vec<Spanned<Service>>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Service {
        pub name: Option<Spanned<String>>,
        pub listen: Option<Spanned<Listen>>,
        pub dataplane: Option<Spanned<String>>,
        pub algorithm: Option<Spanned<String>>,
        pub proxy_protocol: Option<Spanned<String>>,
        pub max_connections: Option<Spanned<i64>>,
        pub connect_timeout: Option<Spanned<toml::Value>>,
        pub greeting_timeout: Option<Spanned<toml::Value>>,
        pub idle_timeout: Option<Spanned<toml::Value>>,
        pub retries: Option<Spanned<i64>>,
        pub health: Option<Spanned<Health>>,
        pub xdp: Option<Spanned<Xdp>>,
        #[serde(default)]
        pub backend: Vec<Spanned<Backend>>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Health {
        pub kind: Option<Spanned<String>>,
        pub interval: Option<Spanned<toml::Value>>,
        pub timeout: Option<Spanned<toml::Value>>,
        pub rise: Option<Spanned<i64>>,
        pub fall: Option<Spanned<i64>>,
        pub ehlo: Option<Spanned<String>>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Xdp {
        pub interface: Option<Spanned<String>>,
        pub forwarding: Option<Spanned<String>>,
        pub backend_interface: Option<Spanned<String>>,
        pub flow_table_size: Option<Spanned<i64>>,
        pub flow_idle_timeout: Option<Spanned<toml::Value>>,
        pub pin: Option<Spanned<bool>>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Backend {
        pub name: Option<Spanned<String>>,
        pub address: Option<Spanned<String>>,
        pub weight: Option<Spanned<i64>>,
        pub max_connections: Option<Spanned<i64>>,
        pub drain: Option<Spanned<bool>>,
    }

    /// `listen = "addr"` or `listen = ["addr", ...]`, each list element with its own span.
    pub enum Listen {
        One(String),
        Many(Vec<Spanned<String>>),
    }

    impl<'de> Deserialize<'de> for Listen {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct Visitor;
            impl<'de> serde::de::Visitor<'de> for Visitor {
                type Value = Listen;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("an address string such as \"127.0.0.1:25\" or a list of them")
                }
                fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Listen, E> {
                    Ok(Listen::One(s.to_owned()))
                }
                fn visit_seq<A: serde::de::SeqAccess<'de>>(
                    self,
                    mut seq: A,
                ) -> Result<Listen, A::Error> {
                    let mut all = Vec::new();
                    while let Some(item) = seq.next_element()? {
                        all.push(item);
                    }
                    Ok(Listen::Many(all))
                }
            }
            d.deserialize_any(Visitor)
        }
    }
}

/// Formats serde's first error as `file:line:column: message (in key.path)`.
fn structural_error(path: &Path, text: &str, error: toml::de::Error) -> String {
    // toml only names the key path in its Display when it has no source text to quote.
    let mut keyless = error.clone();
    keyless.set_input(None);
    let rendered = keyless.to_string();
    let keys = rendered
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("in `").and_then(|l| l.strip_suffix('`')));
    let mut message = error.message().trim_end().to_owned();
    if keys.is_some_and(|k| k.ends_with("service") || k.ends_with("backend"))
        && message.contains("expected a sequence")
    {
        message.push_str("; write [[service]] and [[service.backend]] with double brackets (one table per entry)");
    }
    let location = match error.span() {
        Some(span) => {
            let (line, column) = line_column(text, span.start);
            format!("{}:{line}:{column}", path.display())
        }
        None => path.display().to_string(),
    };
    match keys {
        Some(keys) if !keys.is_empty() => format!("{location}: {keys}: {message}"),
        _ => format!("{location}: {message}"),
    }
}

/// 1-based line and column (in characters) of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text.as_bytes()[..offset];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let line_start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    let column = String::from_utf8_lossy(&before[line_start..])
        .chars()
        .count()
        + 1;
    (line, column)
}

/// Collects validation errors, each prefixed with `file:line:`.
struct Report<'a> {
    file: String,
    text: &'a str,
    /// (line, message); reported in line order.
    errors: Vec<(usize, String)>,
}

impl Report<'_> {
    fn line(&self, span: &Range<usize>) -> usize {
        line_column(self.text, span.start).0
    }

    fn error(&mut self, span: &Range<usize>, context: &str, message: impl fmt::Display) {
        let line = self.line(span);
        let text = if context.is_empty() {
            format!("{}:{line}: {message}", self.file)
        } else {
            format!("{}:{line}: {context}: {message}", self.file)
        };
        self.errors.push((line, text));
    }

    fn choice<T: Copy>(
        &mut self,
        value: &Option<toml::Spanned<String>>,
        context: &str,
        key: &str,
        table: &[(&str, T)],
        default: T,
    ) -> T {
        let Some(value) = value else { return default };
        match table.iter().find(|(name, _)| *name == value.get_ref()) {
            Some((_, v)) => *v,
            None => {
                let valid: Vec<&str> = table.iter().map(|(name, _)| *name).collect();
                self.error(
                    &value.span(),
                    context,
                    format_args!(
                        "{key} \"{}\" is not valid; expected one of: {}",
                        value.get_ref(),
                        valid.join(", ")
                    ),
                );
                default
            }
        }
    }

    fn integer(
        &mut self,
        value: &Option<toml::Spanned<i64>>,
        context: &str,
        key: &str,
        (min, max): (i64, i64),
        default: u32,
    ) -> u32 {
        let Some(value) = value else { return default };
        let n = *value.get_ref();
        if n < min || n > max {
            self.error(
                &value.span(),
                context,
                format_args!("{key} must be between {min} and {max}, got {n}"),
            );
            return default;
        }
        u32::try_from(n).unwrap_or(default)
    }

    fn duration(
        &mut self,
        value: &Option<toml::Spanned<toml::Value>>,
        context: &str,
        key: &str,
        default: Duration,
    ) -> Duration {
        let Some(value) = value else { return default };
        let span = value.span();
        let parsed = match value.get_ref() {
            toml::Value::String(s) => humantime::parse_duration(s).map_err(|e| {
                format!("{key} \"{s}\" is not a duration ({e}); write e.g. \"3s\", \"10m\" or \"1h 30m\"")
            }),
            toml::Value::Integer(n) => Err(format!(
                "{key} = {n} needs a unit: write a string such as \"{n}s\""
            )),
            other => Err(format!(
                "{key} must be a duration string such as \"3s\", got {}",
                other.type_str()
            )),
        };
        match parsed {
            Ok(d) if d.is_zero() => {
                self.error(
                    &span,
                    context,
                    format_args!("{key} must be greater than zero"),
                );
                default
            }
            Ok(d) if d > MAX_DURATION => {
                self.error(
                    &span,
                    context,
                    format_args!(
                        "{key} must be at most 7d, got {}",
                        humantime::format_duration(d)
                    ),
                );
                default
            }
            Ok(d) => d,
            Err(message) => {
                self.error(&span, context, message);
                default
            }
        }
    }

    /// A service or backend name: it appears in logs, metrics and pinned-map paths.
    fn name(&mut self, value: &toml::Spanned<String>, context: &str) {
        let name = value.get_ref();
        let ok = !name.is_empty()
            && name.len() <= MAX_NAME
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if !ok {
            self.error(
                &value.span(),
                context,
                format_args!(
                    "name \"{}\" is not valid; use 1 to {MAX_NAME} letters, digits, '-', '_' or '.'",
                    name.escape_debug()
                ),
            );
        }
    }
}

/// Parses an `ip:port` socket address, explaining what form is expected when it is not one.
fn parse_address(s: &str) -> Result<SocketAddr, String> {
    const FORM: &str =
        "write an IP address and port such as \"192.0.2.10:25\" or \"[2001:db8::10]:25\"";
    if let Ok(addr) = s.parse::<SocketAddr>() {
        if addr.port() == 0 {
            return Err(format!("\"{s}\" has port 0; give a real port"));
        }
        return Ok(addr);
    }
    if let Ok(ip) = s.parse::<IpAddr>() {
        let example = SocketAddr::new(ip, 25);
        return Err(format!("\"{s}\" has no port; write e.g. \"{example}\""));
    }
    if !s.starts_with('[')
        && let Some((host, _)) = s.rsplit_once(':')
        && let Ok(ip) = host.parse::<std::net::Ipv6Addr>()
    {
        return Err(format!(
            "\"{s}\": an IPv6 address needs brackets around it; write e.g. \"[{ip}]:25\""
        ));
    }
    match s.rsplit_once(':') {
        Some((host, port)) if host.parse::<IpAddr>().is_ok() || host.starts_with('[') => Err(
            format!("\"{s}\": port \"{port}\" is not a number between 1 and 65535"),
        ),
        Some((host, _)) if !host.is_empty() => Err(format!(
            "\"{s}\" is not an IP address (host names are not resolved); {FORM}"
        )),
        _ => Err(format!("\"{s}\" is not a socket address; {FORM}")),
    }
}

/// Two listen addresses conflict when binding both would fail: same port and family, and the
/// same IP or either one the wildcard address.
fn listen_conflict(a: &SocketAddr, b: &SocketAddr) -> bool {
    a.port() == b.port()
        && a.is_ipv4() == b.is_ipv4()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

fn interface_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_IFNAME
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_graphic() && c != '/' && c != ':')
}

fn validate(path: &Path, raw: raw::Config, report: &mut Report) -> Config {
    let shutdown_timeout = report.duration(
        &raw.shutdown_timeout,
        "",
        "shutdown_timeout",
        DEFAULT_SHUTDOWN_TIMEOUT,
    );
    let workers = raw
        .workers
        .as_ref()
        .map(|_| report.integer(&raw.workers, "", "workers", WORKERS_RANGE, 1));

    if raw.service.is_empty() {
        report.error(
            &(0..0),
            "",
            "no [[service]] defined; the configuration needs at least one",
        );
    }

    let mut services = Vec::new();
    // name -> line of its first definition
    let mut names: HashMap<String, usize> = HashMap::new();
    // (address, service index, service name, line) of every listen address seen so far
    let mut listeners: Vec<(SocketAddr, usize, String, usize)> = Vec::new();
    // (pin, service name) of the first xdp service
    let mut first_pin: Option<(bool, String)> = None;

    for (index, service) in raw.service.iter().enumerate() {
        let header = service.span();
        let service = service.get_ref();
        let name = match &service.name {
            Some(name) => {
                let context = format!("service \"{}\"", name.get_ref());
                report.name(name, &context);
                let line = report.line(&name.span());
                if let Some(first) = names.get(name.get_ref()) {
                    report.error(
                        &name.span(),
                        &context,
                        format_args!("duplicate service name (first defined on line {first})"),
                    );
                } else {
                    names.insert(name.get_ref().clone(), line);
                }
                name.get_ref().clone()
            }
            None => {
                report.error(
                    &header,
                    &format!("service #{}", index + 1),
                    "name is missing",
                );
                format!("#{}", index + 1)
            }
        };
        let context = if service.name.is_some() {
            format!("service \"{name}\"")
        } else {
            format!("service {name}")
        };
        let validated = validate_service(service, &header, name, &context, report);

        if let Some(listen) = &service.listen {
            let line = report.line(&listen.span());
            for addr in &validated.listen {
                let clash = listeners
                    .iter()
                    .find(|(other, _, _, _)| listen_conflict(addr, other))
                    .map(|(other, owner, owner_name, other_line)| {
                        (*other, *owner, owner_name.clone(), *other_line)
                    });
                if let Some((other, owner, owner_name, other_line)) = clash {
                    let whose = if owner == index {
                        "this service".to_owned()
                    } else {
                        format!("service \"{owner_name}\"")
                    };
                    report.error(
                        &listen.span(),
                        &context,
                        format_args!(
                            "listen {addr} conflicts with {other} of {whose} (line {other_line}): same port and address family"
                        ),
                    );
                }
                listeners.push((*addr, index, validated.name.clone(), line));
            }
        }
        check_pin_agrees(service, &validated, &context, &mut first_pin, report);
        services.push(validated);
    }

    Config {
        source: path.to_path_buf(),
        shutdown_timeout,
        workers,
        services,
    }
}

/// Every xdp service runs in the one XDP program, which is pinned or not as a whole.
fn check_pin_agrees(
    service: &raw::Service,
    validated: &ServiceConfig,
    context: &str,
    first_pin: &mut Option<(bool, String)>,
    report: &mut Report,
) {
    let (Some(xdp), Some(raw_xdp)) = (&validated.xdp, &service.xdp) else {
        return;
    };
    match first_pin {
        None => *first_pin = Some((xdp.pin, validated.name.clone())),
        Some((pin, first)) if *pin != xdp.pin => {
            let span = raw_xdp
                .get_ref()
                .pin
                .as_ref()
                .map_or(raw_xdp.span(), |p| p.span());
            report.error(
                &span,
                context,
                format_args!(
                    "xdp.pin = {} differs from service \"{first}\" (pin = {pin}); every xdp service shares one XDP program, so give them all the same pin",
                    xdp.pin
                ),
            );
        }
        Some(_) => {}
    }
}

fn validate_service(
    service: &raw::Service,
    header: &Range<usize>,
    name: String,
    context: &str,
    report: &mut Report,
) -> ServiceConfig {
    let listen = validate_listen(service, header, context, report);
    let dataplane = report.choice(
        &service.dataplane,
        context,
        "dataplane",
        DATAPLANES,
        Dataplane::Proxy,
    );
    let algorithm = report.choice(
        &service.algorithm,
        context,
        "algorithm",
        ALGORITHMS,
        DEFAULT_ALGORITHM,
    );
    let proxy_protocol = report.choice(
        &service.proxy_protocol,
        context,
        "proxy_protocol",
        PROXY_PROTOCOLS,
        ProxyProtocol::None,
    );
    let max_connections = report.integer(
        &service.max_connections,
        context,
        "max_connections",
        (0, i64::from(u32::MAX)),
        DEFAULT_MAX_CONNECTIONS,
    );
    let connect_timeout = report.duration(
        &service.connect_timeout,
        context,
        "connect_timeout",
        DEFAULT_CONNECT_TIMEOUT,
    );
    let greeting_timeout = report.duration(
        &service.greeting_timeout,
        context,
        "greeting_timeout",
        DEFAULT_GREETING_TIMEOUT,
    );
    let idle_timeout = report.duration(
        &service.idle_timeout,
        context,
        "idle_timeout",
        DEFAULT_IDLE_TIMEOUT,
    );
    let retries = report.integer(
        &service.retries,
        context,
        "retries",
        (0, MAX_RETRIES),
        DEFAULT_RETRIES,
    );
    let health = validate_health(service.health.as_ref(), context, report);
    let backends = validate_backends(service, header, context, report);
    let xdp = match (&service.xdp, dataplane) {
        (Some(xdp), Dataplane::Xdp) => Some(validate_xdp(xdp.get_ref(), context, report)),
        (None, Dataplane::Xdp) => {
            let span = service
                .dataplane
                .as_ref()
                .map_or(header.clone(), |d| d.span());
            report.error(
                &span,
                context,
                "dataplane = \"xdp\" needs a [service.xdp] table (interface, forwarding, ...)",
            );
            None
        }
        (Some(xdp), Dataplane::Proxy) => {
            report.error(
                &xdp.span(),
                context,
                "[service.xdp] is only allowed with dataplane = \"xdp\" (this service uses the proxy data plane)",
            );
            None
        }
        (None, Dataplane::Proxy) => None,
    };

    if dataplane == Dataplane::Xdp {
        check_xdp_service(
            service,
            header,
            &listen,
            algorithm,
            proxy_protocol,
            context,
            report,
        );
    }

    ServiceConfig {
        name,
        listen,
        algorithm,
        proxy_protocol,
        max_connections,
        connect_timeout,
        greeting_timeout,
        idle_timeout,
        retries,
        health,
        backends,
        dataplane,
        xdp,
    }
}

fn validate_listen(
    service: &raw::Service,
    header: &Range<usize>,
    context: &str,
    report: &mut Report,
) -> Vec<SocketAddr> {
    let Some(listen) = &service.listen else {
        report.error(
            header,
            context,
            "listen is missing; write e.g. listen = \"127.0.0.1:2525\"",
        );
        return Vec::new();
    };
    let items: Vec<(String, Range<usize>)> = match listen.get_ref() {
        raw::Listen::One(s) => vec![(s.clone(), listen.span())],
        raw::Listen::Many(all) => all
            .iter()
            .map(|s| (s.get_ref().clone(), s.span()))
            .collect(),
    };
    if items.is_empty() {
        report.error(
            &listen.span(),
            context,
            "listen is an empty list; give at least one address",
        );
    }
    let mut addresses: Vec<SocketAddr> = Vec::new();
    for (text, span) in items {
        match parse_address(&text) {
            Ok(addr) if addresses.contains(&addr) => {
                report.error(&span, context, format_args!("listen {addr} is given twice"));
            }
            Ok(addr) => addresses.push(addr),
            Err(message) => report.error(&span, context, format_args!("listen {message}")),
        }
    }
    addresses
}

fn validate_health(
    health: Option<&toml::Spanned<raw::Health>>,
    context: &str,
    report: &mut Report,
) -> HealthConfig {
    let Some(health) = health else {
        return HealthConfig {
            kind: HealthKind::Smtp,
            interval: DEFAULT_HEALTH_INTERVAL,
            timeout: DEFAULT_HEALTH_TIMEOUT,
            rise: DEFAULT_RISE,
            fall: DEFAULT_FALL,
            ehlo: DEFAULT_EHLO.to_owned(),
        };
    };
    let h = health.get_ref();
    let kind = report.choice(
        &h.kind,
        context,
        "health.kind",
        HEALTH_KINDS,
        HealthKind::Smtp,
    );
    let interval = report.duration(
        &h.interval,
        context,
        "health.interval",
        DEFAULT_HEALTH_INTERVAL,
    );
    let timeout = report.duration(
        &h.timeout,
        context,
        "health.timeout",
        DEFAULT_HEALTH_TIMEOUT,
    );
    let rise = report.integer(
        &h.rise,
        context,
        "health.rise",
        (1, MAX_RISE_FALL),
        DEFAULT_RISE,
    );
    let fall = report.integer(
        &h.fall,
        context,
        "health.fall",
        (1, MAX_RISE_FALL),
        DEFAULT_FALL,
    );
    if timeout > interval {
        // A check that may outlast its interval would overlap the next one.
        let span = h
            .timeout
            .as_ref()
            .or(h.interval.as_ref())
            .map_or(health.span(), |v| v.span());
        report.error(
            &span,
            context,
            format_args!(
                "health.timeout ({}) must not exceed health.interval ({})",
                humantime::format_duration(timeout),
                humantime::format_duration(interval)
            ),
        );
    }
    let ehlo = match &h.ehlo {
        Some(ehlo) => {
            let name = ehlo.get_ref();
            // It is sent verbatim in "EHLO <name>\r\n": no spaces or control characters.
            if name.is_empty() || name.len() > 255 || !name.chars().all(|c| c.is_ascii_graphic()) {
                report.error(
                    &ehlo.span(),
                    context,
                    format_args!(
                        "health.ehlo \"{}\" is not a valid EHLO name; use a host name such as \"lb1.example.net\"",
                        name.escape_debug()
                    ),
                );
            }
            name.clone()
        }
        None => DEFAULT_EHLO.to_owned(),
    };
    HealthConfig {
        kind,
        interval,
        timeout,
        rise,
        fall,
        ehlo,
    }
}

fn validate_backends(
    service: &raw::Service,
    header: &Range<usize>,
    context: &str,
    report: &mut Report,
) -> Vec<BackendConfig> {
    if service.backend.is_empty() {
        report.error(
            header,
            context,
            "no backends; add at least one [[service.backend]] with a name and an address",
        );
    }
    let mut names: HashMap<String, usize> = HashMap::new();
    let mut backends = Vec::new();
    for (index, backend) in service.backend.iter().enumerate() {
        let backend_header = backend.span();
        let b = backend.get_ref();
        let (name, backend_context) = match &b.name {
            Some(name) => {
                let backend_context = format!("{context} backend \"{}\"", name.get_ref());
                report.name(name, &backend_context);
                let line = report.line(&name.span());
                match names.get(name.get_ref()) {
                    Some(first) => report.error(
                        &name.span(),
                        &backend_context,
                        format_args!(
                            "duplicate backend name in this service (first defined on line {first})"
                        ),
                    ),
                    None => {
                        names.insert(name.get_ref().clone(), line);
                    }
                }
                (name.get_ref().clone(), backend_context)
            }
            None => {
                let backend_context = format!("{context} backend #{}", index + 1);
                report.error(&backend_header, &backend_context, "name is missing");
                (format!("#{}", index + 1), backend_context)
            }
        };
        let address = match &b.address {
            Some(address) => {
                match parse_address(address.get_ref()) {
                    Ok(addr) if addr.ip().is_unspecified() => {
                        report.error(
                        &address.span(),
                        &backend_context,
                        format_args!("address {addr} is the wildcard address; give the backend's own address"),
                    );
                        None
                    }
                    Ok(addr) => Some(addr),
                    Err(message) => {
                        report.error(
                            &address.span(),
                            &backend_context,
                            format_args!("address {message}"),
                        );
                        None
                    }
                }
            }
            None => {
                report.error(
                    &backend_header,
                    &backend_context,
                    "address is missing; write e.g. address = \"127.0.0.1:2601\"",
                );
                None
            }
        };
        let weight = report.integer(
            &b.weight,
            &backend_context,
            "weight",
            (1, MAX_WEIGHT),
            DEFAULT_WEIGHT,
        );
        let max_connections = report.integer(
            &b.max_connections,
            &backend_context,
            "max_connections",
            (0, i64::from(u32::MAX)),
            0,
        );
        if let Some(address) = address {
            backends.push(BackendConfig {
                name,
                address,
                weight,
                max_connections,
                drain: b.drain.as_ref().is_some_and(|d| *d.get_ref()),
            });
        }
    }
    backends
}

fn validate_xdp(xdp: &raw::Xdp, context: &str, report: &mut Report) -> XdpConfig {
    let mut interface_name = |value: &Option<toml::Spanned<String>>, key: &str| -> Option<String> {
        let value = value.as_ref()?;
        if !interface_ok(value.get_ref()) {
            report.error(
                &value.span(),
                context,
                format_args!(
                    "{key} \"{}\" is not a network interface name (1 to {MAX_IFNAME} characters, no '/', ':' or spaces)",
                    value.get_ref().escape_debug()
                ),
            );
        }
        Some(value.get_ref().clone())
    };
    let interface = interface_name(&xdp.interface, "xdp.interface");
    let backend_interface = interface_name(&xdp.backend_interface, "xdp.backend_interface");
    let interface = match interface {
        Some(interface) => interface,
        None => {
            // The [service.xdp] header line is the best place to point at.
            let span = xdp
                .forwarding
                .as_ref()
                .map(|f| f.span())
                .or(xdp.backend_interface.as_ref().map(|f| f.span()))
                .or(xdp.flow_table_size.as_ref().map(|f| f.span()))
                .or(xdp.flow_idle_timeout.as_ref().map(|f| f.span()))
                .unwrap_or(0..0);
            report.error(
                &span,
                context,
                "xdp.interface is missing; name the interface where client packets arrive, e.g. interface = \"eth0\"",
            );
            String::new()
        }
    };
    let forwarding = report.choice(
        &xdp.forwarding,
        context,
        "xdp.forwarding",
        FORWARDINGS,
        Forwarding::Dsr,
    );
    let flow_table_size = report.integer(
        &xdp.flow_table_size,
        context,
        "xdp.flow_table_size",
        FLOW_TABLE_RANGE,
        DEFAULT_FLOW_TABLE_SIZE,
    );
    let flow_idle_timeout = report.duration(
        &xdp.flow_idle_timeout,
        context,
        "xdp.flow_idle_timeout",
        DEFAULT_FLOW_IDLE_TIMEOUT,
    );
    XdpConfig {
        backend_interface: backend_interface.unwrap_or_else(|| interface.clone()),
        interface,
        forwarding,
        flow_table_size,
        flow_idle_timeout,
        pin: xdp.pin.as_ref().is_some_and(|p| *p.get_ref()),
    }
}

/// What the kernel path can do: IPv4 only, one VIP, no PROXY header, no response-time metric.
fn check_xdp_service(
    service: &raw::Service,
    header: &Range<usize>,
    listen: &[SocketAddr],
    algorithm: Algorithm,
    proxy_protocol: ProxyProtocol,
    context: &str,
    report: &mut Report,
) {
    if algorithm == Algorithm::LeastTime {
        let span = service
            .algorithm
            .as_ref()
            .map_or(header.clone(), |a| a.span());
        report.error(
            &span,
            context,
            "algorithm \"least_time\" is not available with dataplane = \"xdp\" (the kernel does not see greeting latency); use least_conn, ip_hash, round_robin or weighted_round_robin",
        );
    }
    if proxy_protocol != ProxyProtocol::None {
        let span = service
            .proxy_protocol
            .as_ref()
            .map_or(header.clone(), |p| p.span());
        report.error(
            &span,
            context,
            "proxy_protocol must be \"none\" with dataplane = \"xdp\": packets are forwarded unchanged and backends see the client address directly",
        );
    }
    if let Some(listen_value) = &service.listen {
        let span = listen_value.span();
        let count = match listen_value.get_ref() {
            raw::Listen::One(_) => 1,
            raw::Listen::Many(all) => all.len(),
        };
        if count != 1 {
            report.error(
                &span,
                context,
                "with dataplane = \"xdp\", listen must be exactly one IPv4 address:port (the VIP)",
            );
        } else if let Some(vip) = listen.first()
            && (!vip.is_ipv4() || vip.ip().is_unspecified())
        {
            report.error(
                &span,
                context,
                format_args!(
                    "with dataplane = \"xdp\", listen must be a concrete IPv4 address (the VIP), not {vip}"
                ),
            );
        }
    }
    // Checked on the raw entries: `backends` leaves out those whose address did not parse.
    for raw_backend in &service.backend {
        let raw_backend = raw_backend.get_ref();
        let Some(address) = &raw_backend.address else {
            continue;
        };
        let Ok(addr) = parse_address(address.get_ref()) else {
            continue;
        };
        if addr.is_ipv6() {
            let name = raw_backend
                .name
                .as_ref()
                .map_or("?", |n| n.get_ref().as_str());
            report.error(
                &address.span(),
                &format!("{context} backend \"{name}\""),
                format_args!("address {addr} is IPv6; dataplane = \"xdp\" forwards IPv4 only"),
            );
        }
    }
}

impl Config {
    /// The short human summary `switchyard check` prints.
    pub fn summary(&self) -> String {
        use fmt::Write;
        let mut out = String::new();
        let backends: usize = self.services.iter().map(|s| s.backends.len()).sum();
        let _ = writeln!(
            out,
            "{}: {} service(s), {} backend(s), shutdown_timeout {}, workers {}",
            self.source.display(),
            self.services.len(),
            backends,
            humantime::format_duration(self.shutdown_timeout),
            self.workers
                .map_or_else(|| "auto".to_string(), |n| n.to_string())
        );
        for s in &self.services {
            let listen: Vec<String> = s.listen.iter().map(ToString::to_string).collect();
            let dataplane = match &s.xdp {
                Some(xdp) if xdp.backend_interface != xdp.interface => format!(
                    "xdp ({} on {} -> {})",
                    xdp.forwarding, xdp.interface, xdp.backend_interface
                ),
                Some(xdp) => format!("xdp ({} on {})", xdp.forwarding, xdp.interface),
                None => s.dataplane.to_string(),
            };
            let health = match s.health.kind {
                HealthKind::None => "none".to_owned(),
                kind => format!(
                    "{kind} every {} (timeout {}, rise {}, fall {})",
                    humantime::format_duration(s.health.interval),
                    humantime::format_duration(s.health.timeout),
                    s.health.rise,
                    s.health.fall
                ),
            };
            let _ = writeln!(
                out,
                "service \"{}\": listen {}; algorithm {}; dataplane {}; proxy_protocol {}; health {}",
                s.name,
                listen.join(", "),
                s.algorithm,
                dataplane,
                s.proxy_protocol,
                health
            );
            for b in &s.backends {
                let max = match b.max_connections {
                    0 => "unlimited".to_owned(),
                    n => n.to_string(),
                };
                let _ = writeln!(
                    out,
                    "  backend \"{}\": {} weight {} max_connections {}{}",
                    b.name,
                    b.address,
                    b.weight,
                    max,
                    if b.drain {
                        " (drain: no new sessions)"
                    } else {
                        ""
                    }
                );
            }
        }
        out.push_str("configuration OK\n");
        out
    }
}
