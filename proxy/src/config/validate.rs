//! Raw to typed: every service, listen address, health check, backend and XDP table checked
//! against the others (duplicate names and backend addresses, conflicting listeners, backends
//! that are switchyard's own listeners, what the kernel path can do, one pin and one attach mode
//! for all XDP services), with defaults filled in.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};

use super::announce::{Announced, check_across};
use super::errors::{Report, shown};
use super::schema::{
    self as raw, ALGORITHMS, DATAPLANES, DEFAULT_ADMIN_SOCKET, DEFAULT_ALGORITHM,
    DEFAULT_CONNECT_TIMEOUT, DEFAULT_EHLO, DEFAULT_FALL, DEFAULT_FLOW_IDLE_TIMEOUT,
    DEFAULT_FLOW_TABLE_SIZE, DEFAULT_GREETING_TIMEOUT, DEFAULT_HEALTH_INTERVAL,
    DEFAULT_HEALTH_TIMEOUT, DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_CONNECTIONS, DEFAULT_RETRIES,
    DEFAULT_RISE, DEFAULT_SHUTDOWN_TIMEOUT, DEFAULT_WEIGHT, FORWARDINGS, HEALTH_KINDS,
    PROXY_PROTOCOLS, XDP_MODES,
};
use super::values::{
    AddressUse, FLOW_TABLE_RANGE, MAX_IFNAME, MAX_RETRIES, MAX_RISE_FALL, MAX_SOCKET_PATH,
    MAX_WEIGHT, MIN_IDLE_DURATION, MIN_SHORT_DURATION, WORKERS_RANGE, interface_ok, name_ok,
    parse_address, usable_address,
};
use super::{
    Algorithm, BackendConfig, Config, Dataplane, Forwarding, HealthConfig, HealthKind, Origin,
    ProxyProtocol, ServiceConfig, XdpConfig, XdpMode,
};

/// Two listen addresses conflict when binding both would fail: same port and family, and the
/// same IP or either one the wildcard address.
fn listen_conflict(a: &SocketAddr, b: &SocketAddr) -> bool {
    a.port() == b.port()
        && a.is_ipv4() == b.is_ipv4()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// A listen address already validated, for the checks across services.
struct Listener {
    address: SocketAddr,
    /// Index of its service.
    service: usize,
    /// Its service as messages name it (`service "mx"`).
    owner: String,
    line: usize,
}

pub(super) fn validate(path: &Path, raw: raw::Config, report: &mut Report) -> Config {
    let shutdown_timeout = report.duration(
        &raw.shutdown_timeout,
        "",
        "shutdown_timeout",
        MIN_SHORT_DURATION,
        DEFAULT_SHUTDOWN_TIMEOUT,
    );
    let workers = raw
        .workers
        .as_ref()
        .map(|_| report.integer(&raw.workers, "", "workers", WORKERS_RANGE, 1));
    let admin_socket = validate_admin(path, raw.admin.as_ref(), report);
    let admin_listen = validate_admin_listen(raw.admin.as_ref(), report);
    let bird_socket = super::announce::validate_table(path, raw.announce.as_ref(), report);
    let second_chance = super::announce::validate_peers(raw.announce.as_ref(), report);

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
    // every listen address seen so far
    let mut listeners: Vec<Listener> = Vec::new();
    // the first xdp service: its name and table, which every other xdp service must agree with
    let mut first_xdp: Option<(String, XdpConfig)> = None;

    for (index, service) in raw.service.iter().enumerate() {
        let header = service.span();
        let service = service.get_ref();
        let numbered = format!("service #{}", index + 1);
        let (name, context) = match &service.name {
            Some(name) => {
                // An invalid name is shown once, in its own message, never as the context.
                let context = format!("service \"{}\"", name.get_ref());
                let context = if report.name(name, &numbered) {
                    context
                } else {
                    numbered
                };
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
                (name.get_ref().clone(), context)
            }
            None => {
                report.error(&header, &numbered, "name is missing");
                (format!("#{}", index + 1), numbered)
            }
        };
        let validated = validate_service(path, service, &header, name, &context, report);

        if let Some(listen) = &service.listen {
            for (addr, origin) in validated.listen.iter().zip(&validated.listen_origins) {
                let clash = listeners.iter().find(|l| listen_conflict(addr, &l.address));
                if let Some(other) = clash {
                    let whose = if other.service == index {
                        "this service"
                    } else {
                        &other.owner
                    };
                    report.error(
                        &listen.span(),
                        &context,
                        format_args!(
                            "listen {addr} conflicts with {} of {whose} (line {}): same port and address family",
                            other.address, other.line
                        ),
                    );
                }
                listeners.push(Listener {
                    address: *addr,
                    service: index,
                    owner: context.clone(),
                    line: origin.line,
                });
            }
        }
        check_shared_program_settings(service, &validated, &context, &mut first_xdp, report);
        services.push((context, validated));
    }
    for ((context, _), raw_service) in services.iter().zip(&raw.service) {
        check_backends_are_not_listeners(raw_service.get_ref(), context, &listeners, report);
    }
    let announced: Vec<Announced<'_>> = services
        .iter()
        .zip(&raw.service)
        .filter_map(|((context, s), raw_service)| {
            Announced::of(raw_service, s.announce.as_deref(), context)
        })
        .collect();
    check_across(
        &announced,
        bird_socket.is_some(),
        raw.announce.is_some(),
        report,
    );
    drop(announced);
    let services = services.into_iter().map(|(_, s)| s).collect();

    Config {
        source: path.to_path_buf(),
        shutdown_timeout,
        workers,
        admin_socket,
        admin_listen,
        bird_socket,
        second_chance,
        services,
    }
}

/// `[admin] listen`: where the HTTP admin listener (metrics, dashboard) serves, if anywhere.
fn validate_admin_listen(
    admin: Option<&toml::Spanned<raw::Admin>>,
    report: &mut Report,
) -> Option<SocketAddr> {
    let listen = admin.and_then(|a| a.get_ref().listen.as_ref())?;
    match parse_address(listen.get_ref()) {
        Ok(address) => Some(address),
        Err(problem) => {
            report.error(&listen.span(), "", format_args!("admin.listen {problem}"));
            None
        }
    }
}

/// `[admin] socket`: a path that can be bound as a Unix socket, a relative one taken from the
/// config file's directory (so the file means the same whatever directory `run` starts in).
fn validate_admin(
    path: &Path,
    admin: Option<&toml::Spanned<raw::Admin>>,
    report: &mut Report,
) -> PathBuf {
    let default = PathBuf::from(DEFAULT_ADMIN_SOCKET);
    let Some(socket) = admin.and_then(|a| a.get_ref().socket.as_ref()) else {
        return default;
    };
    unix_socket_path(
        path,
        socket,
        "admin.socket",
        "or leave the key out for the default",
        report,
    )
    .unwrap_or(default)
}

/// A Unix socket path as written under `key`, a relative one resolved against the config
/// file's directory; `None` (reported) when empty, holding a NUL byte, or too long to bind or
/// connect to. `instead` ends the message for an empty value (what else the user can do).
pub(super) fn unix_socket_path(
    path: &Path,
    socket: &toml::Spanned<String>,
    key: &str,
    instead: &str,
    report: &mut Report,
) -> Option<PathBuf> {
    let written = socket.get_ref();
    let problem = if written.is_empty() {
        Some(format!("{key} must not be empty; write a path, {instead}"))
    } else if written.contains('\0') {
        Some(format!("{key} {} contains a NUL byte", shown(written)))
    } else {
        None
    };
    if let Some(problem) = problem {
        report.error(&socket.span(), "", problem);
        return None;
    }
    let resolved = match path.parent() {
        Some(dir) => dir.join(written),
        None => PathBuf::from(written),
    };
    let length = resolved.as_os_str().len();
    if length > MAX_SOCKET_PATH {
        report.error(
            &socket.span(),
            "",
            format_args!(
                "{key} {} is {length} bytes long as a full path ({}); a Unix socket path can have at most {MAX_SOCKET_PATH}",
                shown(written),
                shown(&resolved.display().to_string())
            ),
        );
        return None;
    }
    Some(resolved)
}

/// A backend that is one of our own listeners would send every session (and every health
/// check) back into switchyard, which would connect to itself again until descriptors run out.
fn check_backends_are_not_listeners(
    service: &raw::Service,
    context: &str,
    listeners: &[Listener],
    report: &mut Report,
) {
    for (index, backend, span) in parsed_backend_addresses(service) {
        let own = listeners
            .iter()
            .find(|l| reaches_listener(backend, l.address));
        if let Some(own) = own {
            report.error(
                &span,
                &backend_context(service, index, context),
                format_args!(
                    "address {backend} is switchyard's own listen address {} ({}, line {}): sessions would loop back into switchyard",
                    own.address, own.owner, own.line
                ),
            );
        }
    }
}

/// How messages name backend `index` of a service: by its name when that is valid.
fn backend_context(service: &raw::Service, index: usize, context: &str) -> String {
    match service.backend[index].get_ref().name.as_ref() {
        Some(name) if name_ok(name.get_ref()) => {
            format!("{context} backend \"{}\"", name.get_ref())
        }
        _ => format!("{context} backend #{}", index + 1),
    }
}

/// Whether a connection to `backend` would arrive at a socket listening on `listen`: the same
/// port and family, and the same address or a wildcard listen and an address of this host.
fn reaches_listener(backend: SocketAddr, listen: SocketAddr) -> bool {
    backend.port() == listen.port()
        && backend.is_ipv4() == listen.is_ipv4()
        && (backend.ip() == listen.ip()
            || (listen.ip().is_unspecified() && is_local_address(backend.ip())))
}

/// Whether `ip` is one of this host's own addresses (loopback included): only those can be
/// bound without IP_FREEBIND. Where non-local binds are allowed (`ip_nonlocal_bind`), only
/// loopback addresses count, to never reject a remote backend.
fn is_local_address(ip: IpAddr) -> bool {
    if ip.is_loopback() {
        return true;
    }
    let family = if ip.is_ipv4() { "ipv4" } else { "ipv6" };
    let nonlocal = std::fs::read_to_string(format!("/proc/sys/net/{family}/ip_nonlocal_bind"))
        .is_ok_and(|v| v.trim() != "0");
    !nonlocal && std::net::UdpSocket::bind((ip, 0)).is_ok()
}

/// The backends of a raw service whose address parses: (index, address, span of the address).
/// Checked on the raw entries because the typed list leaves out backends with other errors.
fn parsed_backend_addresses(
    service: &raw::Service,
) -> impl Iterator<Item = (usize, SocketAddr, Range<usize>)> {
    service
        .backend
        .iter()
        .enumerate()
        .filter_map(|(index, backend)| {
            let address = backend.get_ref().address.as_ref()?;
            let addr = parse_address(address.get_ref()).ok()?;
            Some((index, addr, address.span()))
        })
}

/// Every xdp service runs in the one XDP program, which is pinned or not and attached in one
/// mode as a whole.
fn check_shared_program_settings(
    service: &raw::Service,
    validated: &ServiceConfig,
    context: &str,
    first_xdp: &mut Option<(String, XdpConfig)>,
    report: &mut Report,
) {
    let (Some(xdp), Some(raw_xdp)) = (&validated.xdp, &service.xdp) else {
        return;
    };
    let Some((first, first_table)) = first_xdp else {
        *first_xdp = Some((validated.name.clone(), xdp.clone()));
        return;
    };
    let raw_table = raw_xdp.get_ref();
    let mut differs = |key: &str, span: Option<Range<usize>>, ours: String, theirs: String| {
        if ours != theirs {
            report.error(
                &span.unwrap_or(raw_xdp.span()),
                context,
                format_args!(
                    "xdp.{key} = {ours} differs from service \"{first}\" ({key} = {theirs}); every xdp service shares one XDP program, so give them all the same {key}"
                ),
            );
        }
    };
    differs(
        "pin",
        raw_table.pin.as_ref().map(|p| p.span()),
        xdp.pin.to_string(),
        first_table.pin.to_string(),
    );
    differs(
        "mode",
        raw_table.mode.as_ref().map(|m| m.span()),
        format!("\"{}\"", xdp.mode),
        format!("\"{}\"", first_table.mode),
    );
}

fn validate_service(
    path: &Path,
    service: &raw::Service,
    header: &Range<usize>,
    name: String,
    context: &str,
    report: &mut Report,
) -> ServiceConfig {
    let (listen, listen_origins): (Vec<SocketAddr>, Vec<Origin>) =
        validate_listen(service, header, context, report)
            .into_iter()
            .map(|(addr, line)| {
                let origin = Origin {
                    file: path.to_path_buf(),
                    line,
                    context: context.to_owned(),
                    key: "listen",
                };
                (addr, origin)
            })
            .unzip();
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
        MIN_SHORT_DURATION,
        DEFAULT_CONNECT_TIMEOUT,
    );
    let greeting_timeout = report.duration(
        &service.greeting_timeout,
        context,
        "greeting_timeout",
        MIN_SHORT_DURATION,
        DEFAULT_GREETING_TIMEOUT,
    );
    let idle_timeout = report.duration(
        &service.idle_timeout,
        context,
        "idle_timeout",
        MIN_IDLE_DURATION,
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
    let limits = super::limits::validate_limits(service.limits.as_ref(), context, report);
    let backends = validate_backends(service, header, context, report);
    let announce = super::announce::validate_service(service, &name, context, report);
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
            (algorithm, proxy_protocol),
            xdp.as_ref().map(|x| x.forwarding),
            context,
            report,
        );
    }

    ServiceConfig {
        name,
        listen,
        listen_origins,
        algorithm,
        proxy_protocol,
        max_connections,
        connect_timeout,
        greeting_timeout,
        idle_timeout,
        retries,
        health,
        limits,
        backends,
        dataplane,
        xdp,
        announce,
    }
}

/// An xdp service's VIPs: concrete addresses, at most one IPv4 and one IPv6, and in nat
/// only one.
fn check_xdp_vips(
    listen_value: &toml::Spanned<raw::Listen>,
    listen: &[SocketAddr],
    nat: bool,
    context: &str,
    report: &mut Report,
) {
    let span = listen_value.span();
    let count = match listen_value.get_ref() {
        raw::Listen::One(_) => 1,
        raw::Listen::Many(all) => all.len(),
    };
    let ipv4 = listen.iter().filter(|a| a.is_ipv4()).count();
    let ipv6 = listen.len() - ipv4;
    if count == 0 || count > 2 || ipv4 > 1 || ipv6 > 1 {
        report.error(
            &span,
            context,
            "with dataplane = \"xdp\", listen must be one VIP address:port, or one IPv4 and one IPv6 VIP",
        );
    } else if let Some(vip) = listen.iter().find(|a| a.ip().is_unspecified()) {
        report.error(
            &span,
            context,
            format_args!(
                "with dataplane = \"xdp\", listen must be a concrete IP address (the VIP), not {vip}"
            ),
        );
    } else if nat && ipv4 == 1 && ipv6 == 1 {
        report.error(
            &span,
            context,
            "xdp forwarding = \"nat\" serves one VIP, IPv4 or IPv6: it rewrites packets to the backends' addresses, and a backend has one address, of one IP version (give each VIP a service of its own, or use \"dsr\")",
        );
    }
}

/// Every valid listen address with the line it is written on.
fn validate_listen(
    service: &raw::Service,
    header: &Range<usize>,
    context: &str,
    report: &mut Report,
) -> Vec<(SocketAddr, usize)> {
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
    let mut addresses: Vec<(SocketAddr, usize)> = Vec::new();
    for (text, span) in items {
        let parsed = parse_address(&text)
            .and_then(|addr| usable_address(addr, AddressUse::Listen).map(|()| addr));
        match parsed {
            Ok(addr) if addresses.iter().any(|(a, _)| *a == addr) => {
                report.error(&span, context, format_args!("listen {addr} is given twice"));
            }
            Ok(addr) => addresses.push((addr, report.line(&span))),
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
        MIN_SHORT_DURATION,
        DEFAULT_HEALTH_INTERVAL,
    );
    let timeout = report.duration(
        &h.timeout,
        context,
        "health.timeout",
        MIN_SHORT_DURATION,
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
                        "health.ehlo {} is not a valid EHLO name; use a host name such as \"lb1.example.net\"",
                        shown(name)
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
    // address -> line of the first backend with it
    let mut addresses: HashMap<SocketAddr, usize> = HashMap::new();
    let mut backends = Vec::new();
    for (index, backend) in service.backend.iter().enumerate() {
        let backend_header = backend.span();
        let b = backend.get_ref();
        let numbered = format!("{context} backend #{}", index + 1);
        let (name, backend_context) = match &b.name {
            Some(name) => {
                let backend_context = format!("{context} backend \"{}\"", name.get_ref());
                let backend_context = if report.name(name, &numbered) {
                    backend_context
                } else {
                    numbered
                };
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
                report.error(&backend_header, &numbered, "name is missing");
                (format!("#{}", index + 1), numbered)
            }
        };
        let address = match &b.address {
            Some(address) => {
                let span = address.span();
                let parsed = parse_address(address.get_ref())
                    .and_then(|addr| usable_address(addr, AddressUse::Backend).map(|()| addr));
                match parsed {
                    Ok(addr) => match addresses.get(&addr) {
                        Some(first) => {
                            report.error(
                                &span,
                                &backend_context,
                                format_args!(
                                    "address {addr} is given twice in this service (first on line {first}); one MTA is one backend (use weight for a bigger share)"
                                ),
                            );
                            None
                        }
                        None => {
                            addresses.insert(addr, report.line(&span));
                            Some(addr)
                        }
                    },
                    Err(message) => {
                        report.error(&span, &backend_context, format_args!("address {message}"));
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
        let max_session_rate = report.integer(
            &b.max_session_rate,
            &backend_context,
            "max_session_rate",
            (0, 1_000_000),
            0,
        );
        if let Some(address) = address {
            backends.push(BackendConfig {
                name,
                address,
                weight,
                max_connections,
                drain: b.drain.as_ref().is_some_and(|d| *d.get_ref()),
                max_session_rate,
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
                    "{key} {} is not a network interface name (1 to {MAX_IFNAME} characters, no '/', ':' or spaces)",
                    shown(value.get_ref())
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
        MIN_IDLE_DURATION,
        DEFAULT_FLOW_IDLE_TIMEOUT,
    );
    XdpConfig {
        backend_interface: backend_interface.unwrap_or_else(|| interface.clone()),
        interface,
        forwarding,
        flow_table_size,
        flow_idle_timeout,
        pin: xdp.pin.as_ref().is_some_and(|p| *p.get_ref()),
        mode: report.choice(&xdp.mode, context, "xdp.mode", XDP_MODES, XdpMode::Auto),
    }
}

/// "IPv4" or "IPv6".
fn ip_version(address: SocketAddr) -> &'static str {
    if address.is_ipv4() { "IPv4" } else { "IPv6" }
}

/// What the kernel path can do: one VIP per IP version (one VIP in nat, its backends of its IP
/// version), no PROXY header, no response-time metric.
fn check_xdp_service(
    service: &raw::Service,
    header: &Range<usize>,
    listen: &[SocketAddr],
    (algorithm, proxy_protocol): (Algorithm, ProxyProtocol),
    forwarding: Option<Forwarding>,
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
    let nat = forwarding == Some(Forwarding::Nat);
    if let Some(listen_value) = &service.listen {
        check_xdp_vips(listen_value, listen, nat, context, report);
    }
    // nat translates addresses, not IP versions: every backend of the VIP's.
    let Some(vip) = listen.first().filter(|_| nat && listen.len() == 1) else {
        return;
    };
    for (index, addr, span) in parsed_backend_addresses(service) {
        if addr.is_ipv4() != vip.is_ipv4() {
            report.error(
                &span,
                &backend_context(service, index, context),
                format_args!(
                    "address {addr} is {} and the VIP {vip} is {}; xdp forwarding = \"nat\" does not translate between IPv4 and IPv6: give every backend an address of the VIP's IP version (\"dsr\" takes either)",
                    ip_version(addr),
                    ip_version(*vip),
                ),
            );
        }
    }
}
