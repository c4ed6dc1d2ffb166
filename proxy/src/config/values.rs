//! Checks of one value at a time, each reporting through the [`Report`]: a name from a fixed
//! set, an integer in range, a duration, a service or backend name, a socket address, an
//! interface name; and the bounds they are checked against.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use super::errors::Report;

/// Anything longer is surely a typo ("10d" for "10m"), and huge values overflow deadlines.
pub(super) const MAX_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);
pub(super) const MAX_WEIGHT: i64 = 1000;
pub(super) const WORKERS_RANGE: (i64, i64) = (1, 1024);
pub(super) const MAX_RETRIES: i64 = 100;
pub(super) const MAX_RISE_FALL: i64 = 100;
pub(super) const FLOW_TABLE_RANGE: (i64, i64) = (1024, 1 << 26);
/// Linux interface names are at most IFNAMSIZ - 1 bytes.
pub(super) const MAX_IFNAME: usize = 15;
pub(super) const MAX_NAME: usize = 64;

/// Single-value checks; each reports a problem and returns the default in its place.
impl Report<'_> {
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
                        "{key} \"{}\" is not valid; expected one of: {}",
                        value.get_ref(),
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

    pub(super) fn duration(
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
    pub(super) fn name(&mut self, value: &toml::Spanned<String>, context: &str) {
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
pub(super) fn parse_address(s: &str) -> Result<SocketAddr, String> {
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

pub(super) fn interface_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_IFNAME
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_graphic() && c != '/' && c != ':')
}
