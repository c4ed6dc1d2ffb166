//! The keys of health-gated announcement: the `[announce]` table (how to reach the local BIRD)
//! and a service's `announce` / `announce_protocol` (which BIRD protocol carries its VIP), with
//! the checks across services (one protocol per service, a socket for any announced service).

use std::collections::HashMap;
use std::net::IpAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};

use toml::Spanned;

use super::SecondChance;
use super::errors::{Report, shown};
use super::schema as raw;
use super::validate::unix_socket_path;
use super::values::{MAX_IFNAME, interface_ok};

/// BIRD's symbols are at most 64 characters (`SYM_MAX_LEN`).
const MAX_PROTOCOL_NAME: usize = 64;
/// The hop budget in the TTL starts at 215 at most: a ring of at most 17 balancers.
const MAX_PEERS: usize = 17;
/// `[announce] peer_port` unless set: the UDP port of the switchyards' heartbeat.
const DEFAULT_PEER_PORT: u16 = 9027;

/// `[announce] bird_socket`, if the table is there.
pub(super) fn validate_table(
    path: &Path,
    table: Option<&Spanned<raw::Announce>>,
    report: &mut Report,
) -> Option<PathBuf> {
    let table = table?;
    let Some(socket) = &table.get_ref().bird_socket else {
        report.error(
            &table.span(),
            "",
            "[announce] needs bird_socket: the path of the local BIRD's control socket (bird -s, by default /run/bird/bird.ctl)",
        );
        return None;
    };
    unix_socket_path(
        path,
        socket,
        "announce.bird_socket",
        "or remove the [announce] table",
        report,
    )
}

/// `[announce] peers` and `interface`: the second chance between balancers, if `peers` is set.
pub(super) fn validate_peers(
    table: Option<&Spanned<raw::Announce>>,
    report: &mut Report,
) -> Option<SecondChance> {
    let table = table?.get_ref();
    let interface = table.interface.as_ref().and_then(|written| {
        let name = written.get_ref();
        if interface_ok(name) {
            return Some(name.clone());
        }
        report.error(
            &written.span(),
            "",
            format_args!(
                "announce.interface {} is not a network interface name (1 to {MAX_IFNAME} characters, no '/', ':' or spaces)",
                shown(name)
            ),
        );
        None
    });
    let Some(peers) = &table.peers else {
        if let Some(written) = &table.interface {
            report.error(
                &written.span(),
                "",
                format_args!(
                    "announce.interface {} is set but announce.peers is not; list every balancer's address in peers, or remove interface",
                    shown(written.get_ref())
                ),
            );
        }
        if let Some(written) = &table.peer_port {
            report.error(
                &written.span(),
                "",
                format_args!(
                    "announce.peer_port {} is set but announce.peers is not; list every balancer's address in peers, or remove peer_port",
                    written.get_ref()
                ),
            );
        }
        return None;
    };
    let peer_port = report.integer(
        &table.peer_port,
        "",
        "announce.peer_port",
        (1, i64::from(u16::MAX)),
        u32::from(DEFAULT_PEER_PORT),
    );
    let peers = peer_addresses(peers, report)?;
    let Some(interface) = interface else {
        if table.interface.is_none() {
            report.error(
                &table.peers.as_ref().map_or(0..0, |p| p.span()),
                "",
                "announce.peers needs announce.interface: the interface the routers' traffic arrives on, where the balancers hand each other packets",
            );
        }
        return None;
    };
    Some(SecondChance {
        peers,
        interface,
        peer_port: u16::try_from(peer_port).unwrap_or(DEFAULT_PEER_PORT),
    })
}

/// The peers' addresses: IP addresses, at least two, at most [`MAX_PEERS`], no duplicates.
fn peer_addresses(
    written: &Spanned<Vec<Spanned<String>>>,
    report: &mut Report,
) -> Option<Vec<IpAddr>> {
    let mut peers: Vec<IpAddr> = Vec::new();
    let mut ok = true;
    for peer in written.get_ref() {
        let Ok(addr) = peer.get_ref().parse::<IpAddr>() else {
            report.error(
                &peer.span(),
                "",
                format_args!(
                    "announce.peers entry {} is not an IP address; write each balancer's IPv4 or IPv6 address on the announce interface, without a port",
                    shown(peer.get_ref())
                ),
            );
            ok = false;
            continue;
        };
        if peers.contains(&addr) {
            report.error(
                &peer.span(),
                "",
                format_args!("announce.peers lists {addr} twice; list each balancer once"),
            );
            ok = false;
            continue;
        }
        peers.push(addr);
    }
    if ok && peers.len() < 2 {
        report.error(
            &written.span(),
            "",
            format_args!(
                "announce.peers has {} address(es); it needs at least 2: every balancer serving these VIPs, this host included",
                peers.len()
            ),
        );
        ok = false;
    }
    if peers.len() > MAX_PEERS {
        report.error(
            &written.span(),
            "",
            format_args!(
                "announce.peers has {} addresses; a second chance ring has at most {MAX_PEERS} balancers (the hop budget in the TTL runs from 215 down to 200)",
                peers.len()
            ),
        );
        ok = false;
    }
    ok.then_some(peers)
}

/// The BIRD protocol a service is announced through, if it is (`announce = true`).
pub(super) fn validate_service(
    service: &raw::Service,
    name: &str,
    context: &str,
    report: &mut Report,
) -> Option<String> {
    let announced = service.announce.as_ref().is_some_and(|a| *a.get_ref());
    let Some(protocol) = &service.announce_protocol else {
        return announced.then(|| derived_protocol(name));
    };
    let written = protocol.get_ref();
    if !announced {
        report.error(
            &protocol.span(),
            context,
            format_args!(
                "announce_protocol {} is set but announce is not true; add announce = true, or remove announce_protocol",
                shown(written)
            ),
        );
        return None;
    }
    if !protocol_name_ok(written) {
        report.error(
            &protocol.span(),
            context,
            format_args!(
                "announce_protocol {} is not a BIRD protocol name; use a letter or '_', then letters, digits or '_' (at most {MAX_PROTOCOL_NAME} characters)",
                shown(written)
            ),
        );
        return None;
    }
    Some(written.clone())
}

/// `vip_` + the service's name, its '-' and '.' written as '_' (BIRD symbols allow neither).
pub fn derived_protocol(service: &str) -> String {
    let tail: String = service
        .chars()
        .map(|c| if c == '-' || c == '.' { '_' } else { c })
        .collect();
    format!("vip_{tail}")
}

fn protocol_name_ok(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && name.len() <= MAX_PROTOCOL_NAME
}

/// One announced service as the checks across services see it.
pub(super) struct Announced<'a> {
    pub(super) protocol: &'a str,
    pub(super) context: &'a str,
    /// Where the service says it is announced (its `announce` key, else its header).
    pub(super) span: Range<usize>,
}

impl<'a> Announced<'a> {
    pub(super) fn of(
        service: &Spanned<raw::Service>,
        protocol: Option<&'a str>,
        context: &'a str,
    ) -> Option<Self> {
        let raw = service.get_ref();
        let span = match (&raw.announce_protocol, &raw.announce) {
            (Some(key), _) => key.span(),
            (None, Some(key)) => key.span(),
            (None, None) => service.span(),
        };
        Some(Self {
            protocol: protocol?,
            context,
            span,
        })
    }
}

/// Every announced service needs `[announce] bird_socket`, and a protocol of its own (two
/// services switching one protocol would undo each other's withdrawals).
pub(super) fn check_across(
    announced: &[Announced<'_>],
    has_socket: bool,
    table_present: bool,
    report: &mut Report,
) {
    let mut seen: HashMap<&str, (usize, &str)> = HashMap::new();
    for service in announced {
        if !has_socket && !table_present {
            report.error(
                &service.span,
                service.context,
                "announce = true needs an [announce] table with bird_socket (the local BIRD's control socket)",
            );
        }
        let line = report.line(&service.span);
        match seen.get(service.protocol) {
            Some((first, owner)) => report.error(
                &service.span,
                service.context,
                format_args!(
                    "BIRD protocol {} is already announced by {owner} (line {first}); each announced service needs a protocol of its own (announce_protocol)",
                    shown(service.protocol)
                ),
            ),
            None => {
                seen.insert(service.protocol, (line, service.context));
            }
        }
    }
}
