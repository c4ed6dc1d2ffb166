//! Checks of one value at a time, each reporting through the [`Report`]: a name from a fixed
//! set, an integer in range, a duration, a service or backend name, a socket address and what
//! it may be used for, an interface name; and the bounds they are checked against.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use super::errors::{MAX_SHOWN, Report, shown};

/// Anything longer is surely a typo ("10d" for "10m"), and huge values overflow deadlines.
pub(super) const MAX_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);
/// The shortest health interval and timeout, connect, greeting and shutdown timeout: below
/// it a check or a connect fails before a healthy peer could answer, and checks run back to
/// back (busy CPU, thousands of TIME-WAIT sockets, flapping verdicts).
pub(super) const MIN_SHORT_DURATION: Duration = Duration::from_millis(100);
/// The shortest idle timeout (sessions and XDP flows): an SMTP peer may think for a second.
pub(super) const MIN_IDLE_DURATION: Duration = Duration::from_secs(1);
pub(super) const MAX_WEIGHT: i64 = 1000;
pub(super) const WORKERS_RANGE: (i64, i64) = (1, 1024);
pub(super) const MAX_RETRIES: i64 = 100;
pub(super) const MAX_RISE_FALL: i64 = 100;
pub(super) const FLOW_TABLE_RANGE: (i64, i64) = (1024, 1 << 26);
/// Linux interface names are at most IFNAMSIZ - 1 bytes.
pub(super) const MAX_IFNAME: usize = 15;
pub(super) const MAX_NAME: usize = 64;
/// A Unix socket's path fits in `sun_path` (108 bytes) with its terminating NUL.
pub(super) const MAX_SOCKET_PATH: usize = 107;

/// Single-value checks; each reports a problem and returns the default in its place.
impl Report {
    pub(super) fn choice<T: Copy>(
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
                        "{key} {} is not valid; expected one of: {}",
                        shown(value.get_ref()),
                        valid.join(", ")
                    ),
                );
                default
            }
        }
    }

    pub(super) fn integer(
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

    /// A duration between `min` and [`MAX_DURATION`].
    pub(super) fn duration(
        &mut self,
        value: &Option<toml::Spanned<toml::Value>>,
        context: &str,
        key: &str,
        min: Duration,
        default: Duration,
    ) -> Duration {
        let Some(value) = value else { return default };
        match duration_of(value.get_ref(), key, min) {
            Ok(d) => d,
            Err(message) => {
                self.error(&value.span(), context, message);
                default
            }
        }
    }

    /// A service or backend name: it appears in logs, metrics and pinned-map paths. Whether
    /// it is valid (an invalid one must not be repeated in the context of later messages).
    pub(super) fn name(&mut self, value: &toml::Spanned<String>, context: &str) -> bool {
        let name = value.get_ref();
        let ok = name_ok(name);
        if !ok {
            self.error(
                &value.span(),
                context,
                format_args!(
                    "name {} is not valid; use 1 to {MAX_NAME} letters, digits, '-', '_' or '.'",
                    shown(name)
                ),
            );
        }
        ok
    }
}

/// 1 to [`MAX_NAME`] letters, digits, '-', '_' or '.'.
pub(super) fn name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

/// A duration value as written (`"3s"`) within `min..=MAX_DURATION`, or the message naming the
/// key, the value and the bound.
fn duration_of(value: &toml::Value, key: &str, min: Duration) -> Result<Duration, String> {
    let text = match value {
        toml::Value::String(s) => s,
        toml::Value::Integer(n) => {
            return Err(format!(
                "{key} = {n} needs a unit: write a string such as \"{n}s\""
            ));
        }
        other => {
            return Err(format!(
                "{key} must be a duration string such as \"3s\", got {}",
                other.type_str()
            ));
        }
    };
    let d = humantime::parse_duration(text).map_err(|e| {
        format!(
            "{key} {} is not a duration ({e}); write e.g. \"3s\", \"10m\" or \"1h 30m\"",
            shown(text)
        )
    })?;
    let text = shown(text);
    if d < min {
        let min = humantime::format_duration(min);
        return Err(format!(
            "{key} = {text} is too short: it must be at least {min}"
        ));
    }
    if d > MAX_DURATION {
        return Err(format!("{key} = {text} is too long: it must be at most 7d"));
    }
    Ok(d)
}

/// Parses an `ip:port` socket address, explaining what form is expected when it is not one.
/// Messages start with the value (cut when long), so the caller prefixes the key.
pub(super) fn parse_address(s: &str) -> Result<SocketAddr, String> {
    const FORM: &str =
        "write an IP address and port such as \"192.0.2.10:25\" or \"[2001:db8::10]:25\"";
    let value = shown(s);
    if s.starts_with('[') && s.contains('%') {
        // Rust parses "%1" but not "%lo"; neither is usable: see `usable_address`.
        return Err(format!(
            "{value} has an IPv6 scope id (%...); link-local addresses are not supported, give a global or unique-local IPv6 address"
        ));
    }
    if let Ok(addr) = s.parse::<SocketAddr>() {
        if addr.port() == 0 {
            return Err(format!("{value} has port 0; give a real port"));
        }
        return Ok(addr);
    }
    if let Ok(ip) = s.parse::<IpAddr>() {
        let example = SocketAddr::new(ip, 25);
        return Err(format!("{value} has no port; write e.g. \"{example}\""));
    }
    if !s.starts_with('[')
        && let Some((host, _)) = s.rsplit_once(':')
        && let Ok(ip) = host.parse::<Ipv6Addr>()
    {
        return Err(format!(
            "{value}: an IPv6 address needs brackets around it; write e.g. \"[{ip}]:25\""
        ));
    }
    match s.rsplit_once(':') {
        Some((host, port)) if host.parse::<IpAddr>().is_ok() || host.starts_with('[') => {
            // A cut value may already show part of the port: never show it twice.
            let port = if s.chars().count() > MAX_SHOWN {
                "the port".to_owned()
            } else {
                format!("port {}", shown(port))
            };
            Err(format!(
                "{value}: {port} is not a number between 1 and 65535"
            ))
        }
        Some((host, _)) if !host.is_empty() => Err(format!(
            "{value} is not an IP address (host names are not resolved); {FORM}"
        )),
        _ => Err(format!("{value} is not a socket address; {FORM}")),
    }
}

/// What an address is written for: listening accepts the wildcard, a backend does not.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum AddressUse {
    Listen,
    Backend,
}

/// Whether a parsed address can be bound (listen) or connected to (backend) as written, so
/// that `check` accepts only what `run` can use. The message starts with the address.
pub(super) fn usable_address(addr: SocketAddr, usage: AddressUse) -> Result<(), String> {
    let ip = addr.ip();
    if ip.is_unspecified() && usage == AddressUse::Backend {
        return Err(format!(
            "{addr} is the wildcard address; give the backend's own address"
        ));
    }
    if ip.is_multicast() {
        return Err(format!(
            "{addr} is a multicast address; TCP needs a unicast address"
        ));
    }
    if let IpAddr::V4(v4) = ip
        && v4.is_broadcast()
    {
        return Err(format!(
            "{addr} is the broadcast address; TCP needs a unicast address"
        ));
    }
    if let IpAddr::V6(v6) = ip {
        if let Some(v4) = v6.to_ipv4_mapped() {
            // Listeners are IPv6-only (so "[::]" and "0.0.0.0" can sit side by side), and one
            // MTA must have one address, so that its sessions are counted together.
            return Err(format!(
                "{addr} is an IPv4-mapped IPv6 address; write it as IPv4: \"{}\"",
                SocketAddr::new(v4.into(), addr.port())
            ));
        }
        if v6.is_unicast_link_local() {
            return Err(format!(
                "{addr} is link-local: it needs a scope id, which switchyard does not support; give a global or unique-local IPv6 address"
            ));
        }
    }
    Ok(())
}

pub(super) fn interface_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_IFNAME
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_graphic() && c != '/' && c != ':')
}
