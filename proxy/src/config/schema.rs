//! The file as serde sees it: every value optional (defaults and "missing" errors come from
//! validation, which knows the line), every value spanned, unknown keys rejected; with the
//! defaults of the keys left out and the spelling of every enumerated value.

use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::{Algorithm, Dataplane, Forwarding, HealthKind, ProxyProtocol, XdpMode};

// Defaults (the annotated config/switchyard.toml and the README repeat them; keep in step).
pub(super) const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);
pub(super) const DEFAULT_ALGORITHM: Algorithm = Algorithm::LeastConn;
pub(super) const DEFAULT_MAX_CONNECTIONS: u32 = 10_000;
pub(super) const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Postfix's postscreen holds its greeting for about 6 s (`postscreen_greet_wait`); stay above.
pub(super) const DEFAULT_GREETING_TIMEOUT: Duration = Duration::from_secs(10);
/// RFC 5321 §4.5.3.2.7 asks servers to wait at least 5 minutes for a command.
pub(super) const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(600);
pub(super) const DEFAULT_RETRIES: u32 = 2;
pub(super) const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_secs(2);
pub(super) const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(1);
pub(super) const DEFAULT_RISE: u32 = 2;
pub(super) const DEFAULT_FALL: u32 = 2;
pub(super) const DEFAULT_EHLO: &str = "switchyard.invalid";
pub(super) const DEFAULT_WEIGHT: u32 = 1;
pub(super) const DEFAULT_FLOW_TABLE_SIZE: u32 = 1 << 20;
pub(super) const DEFAULT_FLOW_IDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// Where `run` serves and `ctl` finds the admin socket when `[admin] socket` is not set
/// (systemd's `RuntimeDirectory=switchyard` creates the directory).
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/switchyard/admin.sock";

pub(super) const ALGORITHMS: &[(&str, Algorithm)] = &[
    ("round_robin", Algorithm::RoundRobin),
    ("weighted_round_robin", Algorithm::WeightedRoundRobin),
    ("least_conn", Algorithm::LeastConn),
    ("ip_hash", Algorithm::IpHash),
    ("least_time", Algorithm::LeastTime),
];
pub(super) const PROXY_PROTOCOLS: &[(&str, ProxyProtocol)] = &[
    ("none", ProxyProtocol::None),
    ("v1", ProxyProtocol::V1),
    ("v2", ProxyProtocol::V2),
];
pub(super) const HEALTH_KINDS: &[(&str, HealthKind)] = &[
    ("none", HealthKind::None),
    ("tcp", HealthKind::Tcp),
    ("smtp", HealthKind::Smtp),
];
pub(super) const DATAPLANES: &[(&str, Dataplane)] =
    &[("proxy", Dataplane::Proxy), ("xdp", Dataplane::Xdp)];
pub(super) const FORWARDINGS: &[(&str, Forwarding)] =
    &[("dsr", Forwarding::Dsr), ("nat", Forwarding::Nat)];
pub(super) const XDP_MODES: &[(&str, XdpMode)] = &[
    ("auto", XdpMode::Auto),
    ("native", XdpMode::Native),
    ("generic", XdpMode::Generic),
];

pub(super) fn name_of<T: PartialEq + Copy>(table: &[(&'static str, T)], value: T) -> &'static str {
    table
        .iter()
        .find(|(_, v)| *v == value)
        .map_or("?", |(name, _)| name)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Config {
    pub(super) shutdown_timeout: Option<Spanned<toml::Value>>,
    pub(super) workers: Option<Spanned<i64>>,
    pub(super) admin: Option<Spanned<Admin>>,
    pub(super) announce: Option<Spanned<Announce>>,
    #[serde(default)]
    pub(super) service: Vec<Spanned<Service>>,
}

/// The `[admin]` table: the runtime-control socket and the HTTP admin listener.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Admin {
    pub(super) socket: Option<Spanned<String>>,
    pub(super) listen: Option<Spanned<String>>,
}

/// The `[announce]` table: how to reach the local BIRD that announces services' VIPs.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Announce {
    pub(super) bird_socket: Option<Spanned<String>>,
    pub(super) peers: Option<Spanned<Vec<Spanned<String>>>>,
    pub(super) interface: Option<Spanned<String>>,
    pub(super) peer_port: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Service {
    pub(super) name: Option<Spanned<String>>,
    pub(super) listen: Option<Spanned<Listen>>,
    pub(super) dataplane: Option<Spanned<String>>,
    pub(super) algorithm: Option<Spanned<String>>,
    pub(super) proxy_protocol: Option<Spanned<String>>,
    pub(super) max_connections: Option<Spanned<i64>>,
    pub(super) connect_timeout: Option<Spanned<toml::Value>>,
    pub(super) greeting_timeout: Option<Spanned<toml::Value>>,
    pub(super) idle_timeout: Option<Spanned<toml::Value>>,
    pub(super) retries: Option<Spanned<i64>>,
    pub(super) health: Option<Spanned<Health>>,
    pub(super) limits: Option<Spanned<Limits>>,
    pub(super) xdp: Option<Spanned<Xdp>>,
    pub(super) announce: Option<Spanned<bool>>,
    pub(super) announce_protocol: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) backend: Vec<Spanned<Backend>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Health {
    pub(super) kind: Option<Spanned<String>>,
    pub(super) interval: Option<Spanned<toml::Value>>,
    pub(super) timeout: Option<Spanned<toml::Value>>,
    pub(super) rise: Option<Spanned<i64>>,
    pub(super) fall: Option<Spanned<i64>>,
    pub(super) ehlo: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Limits {
    pub(super) per_source_connections: Option<Spanned<i64>>,
    pub(super) per_source_rate: Option<Spanned<i64>>,
    pub(super) per_source_burst: Option<Spanned<i64>>,
    pub(super) source_prefix_v4: Option<Spanned<i64>>,
    pub(super) source_prefix_v6: Option<Spanned<i64>>,
    pub(super) allow: Option<Spanned<Vec<Spanned<String>>>>,
    pub(super) deny: Option<Spanned<Vec<Spanned<String>>>>,
    pub(super) tracked_sources: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Xdp {
    pub(super) interface: Option<Spanned<String>>,
    pub(super) forwarding: Option<Spanned<String>>,
    pub(super) backend_interface: Option<Spanned<String>>,
    pub(super) flow_table_size: Option<Spanned<i64>>,
    pub(super) flow_idle_timeout: Option<Spanned<toml::Value>>,
    pub(super) pin: Option<Spanned<bool>>,
    pub(super) mode: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Backend {
    pub(super) name: Option<Spanned<String>>,
    pub(super) address: Option<Spanned<String>>,
    pub(super) weight: Option<Spanned<i64>>,
    pub(super) max_connections: Option<Spanned<i64>>,
    pub(super) drain: Option<Spanned<bool>>,
    pub(super) max_session_rate: Option<Spanned<i64>>,
}

/// `listen = "addr"` or `listen = ["addr", ...]`, each list element with its own span.
pub(super) enum Listen {
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
