//! The `[service.limits]` table: per-source limits (concurrent sessions, new-session rate with
//! its burst, what counts as one source) and the allow/deny lists of networks.

use std::net::IpAddr;
use std::ops::Range;

use super::errors::{Report, shown};
use super::schema as raw;
use super::{LimitsConfig, Prefix};

const DEFAULT_PREFIX_V4: u32 = 32;
const DEFAULT_PREFIX_V6: u32 = 64;
const DEFAULT_TRACKED_SOURCES: u32 = 100_000;
const MAX_PER_SOURCE: i64 = 1_000_000;
const TRACKED_SOURCES_RANGE: (i64, i64) = (16, 10_000_000);
/// Entries of one allow or deny list: matched linearly per new client (the proxy), sizing the
/// tries (the kernel path).
pub const MAX_PREFIXES: usize = 1024;

pub(super) fn validate_limits(
    limits: Option<&toml::Spanned<raw::Limits>>,
    context: &str,
    report: &mut Report,
) -> LimitsConfig {
    let Some(limits) = limits else {
        return LimitsConfig::default();
    };
    let l = limits.get_ref();
    let count = |report: &mut Report, value, key| {
        report.integer(value, context, key, (0, MAX_PER_SOURCE), 0)
    };
    let per_source_connections = count(
        report,
        &l.per_source_connections,
        "limits.per_source_connections",
    );
    let per_source_rate = count(report, &l.per_source_rate, "limits.per_source_rate");
    let per_source_burst = report.integer(
        &l.per_source_burst,
        context,
        "limits.per_source_burst",
        (1, MAX_PER_SOURCE),
        per_source_rate.saturating_mul(2).max(1),
    );
    let source_prefix_v4 = report.integer(
        &l.source_prefix_v4,
        context,
        "limits.source_prefix_v4",
        (8, 32),
        DEFAULT_PREFIX_V4,
    ) as u8;
    let source_prefix_v6 = report.integer(
        &l.source_prefix_v6,
        context,
        "limits.source_prefix_v6",
        (16, 128),
        DEFAULT_PREFIX_V6,
    ) as u8;
    let tracked_sources = report.integer(
        &l.tracked_sources,
        context,
        "limits.tracked_sources",
        TRACKED_SOURCES_RANGE,
        DEFAULT_TRACKED_SOURCES,
    );
    let allow = l
        .allow
        .as_ref()
        .map(|list| prefixes(list, context, "limits.allow", report));
    if let (Some(list), Some(allow)) = (&l.allow, &allow)
        && allow.is_empty()
        && list.get_ref().is_empty()
    {
        report.error(
            &list.span(),
            context,
            "limits.allow is empty: nobody could connect; leave the key out to allow everyone",
        );
    }
    let deny = l.deny.as_ref().map_or_else(Vec::new, |list| {
        prefixes(list, context, "limits.deny", report)
    });
    LimitsConfig {
        per_source_connections,
        per_source_rate,
        per_source_burst,
        source_prefix_v4,
        source_prefix_v6,
        allow,
        deny,
        tracked_sources,
    }
}

fn prefixes(
    list: &toml::Spanned<Vec<toml::Spanned<String>>>,
    context: &str,
    key: &str,
    report: &mut Report,
) -> Vec<Prefix> {
    if list.get_ref().len() > MAX_PREFIXES {
        report.error(
            &list.span(),
            context,
            format_args!(
                "{key} has {} entries; at most {MAX_PREFIXES} (group them into wider networks)",
                list.get_ref().len()
            ),
        );
        return Vec::new();
    }
    let mut out = Vec::new();
    for (index, item) in list.get_ref().iter().enumerate() {
        match parse_prefix(item.get_ref()) {
            Ok(prefix) => out.push(prefix),
            Err(problem) => error_at(report, &item.span(), context, key, index, &problem),
        }
    }
    out
}

fn error_at(
    report: &mut Report,
    span: &Range<usize>,
    context: &str,
    key: &str,
    index: usize,
    problem: &str,
) {
    report.error(span, context, format_args!("{key}[{index}] {problem}"));
}

/// `ip/len` or a bare IP (a /32 or /128). Host bits set is an error: "192.0.2.1/24" is most
/// likely a typo for a /32, or meant "192.0.2.0/24"; either way it should be written so.
pub(super) fn parse_prefix(text: &str) -> Result<Prefix, String> {
    let value = shown(text);
    let (ip, length) = match text.split_once('/') {
        Some((ip, length)) => (ip, Some(length)),
        None => (text, None),
    };
    let Ok(network) = ip.parse::<IpAddr>() else {
        return Err(format!(
            "{value} is not an IP network; write e.g. \"192.0.2.0/24\" or \"2001:db8::/32\""
        ));
    };
    let max = if network.is_ipv4() { 32 } else { 128 };
    let length = match length {
        None => max,
        Some(length) => match length.parse::<u8>() {
            Ok(length) if length <= max => length,
            _ => {
                return Err(format!(
                    "{value} has prefix length {length:?}; it must be 0 to {max}"
                ));
            }
        },
    };
    let prefix = Prefix { network, length };
    let masked = prefix.masked(network);
    if masked != network {
        return Err(format!(
            "{value} has host bits set; write \"{masked}/{length}\" for the network, or \"{network}\" alone for one address"
        ));
    }
    Ok(prefix)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_parse_and_match() {
        let net = parse_prefix("192.0.2.0/24").expect("v4");
        assert!(net.contains("192.0.2.77".parse().expect("ip")));
        assert!(!net.contains("192.0.3.1".parse().expect("ip")));
        let one = parse_prefix("2001:db8::1").expect("v6 host");
        assert_eq!(one.length, 128);
        assert!(one.contains("2001:db8::1".parse().expect("ip")));
        let v6 = parse_prefix("2001:db8::/32").expect("v6");
        assert!(v6.contains("2001:db8:ffff::9".parse().expect("ip")));
        assert!(!v6.contains("192.0.2.1".parse().expect("ip")));
        let all = parse_prefix("0.0.0.0/0").expect("everything");
        assert!(all.contains("203.0.113.9".parse().expect("ip")));
        // A client on a dual-stack listener arrives as an IPv4-mapped IPv6 address.
        assert!(net.contains("::ffff:192.0.2.5".parse().expect("ip")));
        for bad in ["192.0.2.1/24", "192.0.2.0/33", "nope", "10.0.0.0/x"] {
            assert!(parse_prefix(bad).is_err(), "{bad}");
        }
    }
}
