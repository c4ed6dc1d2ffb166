//! The runtime-control protocol between `switchyard ctl` and a running balancer: what can be
//! asked (`Request`), what comes back (`Reply`), and the state report `ctl show` prints. One
//! JSON object per line each way over the admin socket (`admin.rs` serves it, `ctl.rs` asks).
//!
//! The types are plain serde values so the client, the daemon and the tests share one schema.

use serde::{Deserialize, Serialize};

/// One request as the admin socket hands it to the control loop: who asked (the peer's uid
/// from `SO_PEERCRED`) and where the answer goes.
pub struct Call {
    pub request: Request,
    pub uid: u32,
    pub reply: tokio::sync::oneshot::Sender<Reply>,
}

/// One backend of one service, as `ctl` names it: `SERVICE/BACKEND`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    pub service: String,
    pub backend: String,
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.service, self.backend)
    }
}

/// What `ctl` asks the daemon.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Request {
    /// The state of every service, or of one.
    Show {
        service: Option<String>,
    },
    /// No new sessions or flows for the backend; those it has finish.
    Drain {
        target: Target,
    },
    /// Ends a runtime drain (the file's `drain` applies again).
    Undrain {
        target: Target,
    },
    /// No traffic and no health checks (HAProxy's maintenance mode).
    Disable {
        target: Target,
    },
    Enable {
        target: Target,
    },
    /// A runtime weight, until the file changes that backend's `weight`.
    Weight {
        target: Target,
        weight: u32,
    },
    /// Re-read the config file `run` was given and apply the difference.
    Reload,
    /// Validate the config file on disk without applying it.
    Check,
    /// The kernel's flow table: of every xdp service, or of one; at most `limit` flows (the
    /// least idle; [`DEFAULT_FLOW_LIMIT`] when `None`).
    Flows {
        service: Option<String>,
        limit: Option<u32>,
    },
    /// The proxy's open sessions: of every proxy service, or of one.
    Sessions {
        service: Option<String>,
    },
    /// Take this balancer out of rotation: withdraw every announced VIP from BIRD; sessions
    /// (and whatever still arrives while routers converge) are served as before.
    NodeDrain,
    /// Back in rotation: announced VIPs follow their backends' health again.
    NodeUndrain,
}

/// How many flows `ctl flows` lists unless told (`--limit`).
pub const DEFAULT_FLOW_LIMIT: u32 = 1000;

/// The daemon's answer to one request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    /// Whether the request was carried out (`ctl` exits 0) or refused (`ctl` exits 1).
    pub ok: bool,
    /// What happened, for people: the changes a reload applied ("no change" when none), the
    /// config errors exactly as `check` prints them, or why a request was refused.
    pub text: String,
    /// For `show`: the state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show: Option<ShowReport>,
    /// For `flows`: the kernel's flows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flows: Option<FlowsReport>,
    /// For `sessions`: the proxy's open sessions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sessions: Option<SessionsReport>,
}

impl Reply {
    pub fn ok(text: impl Into<String>) -> Self {
        Self {
            ok: true,
            text: text.into(),
            show: None,
            flows: None,
            sessions: None,
        }
    }

    pub fn refused(text: impl Into<String>) -> Self {
        Self {
            ok: false,
            text: text.into(),
            show: None,
            flows: None,
            sessions: None,
        }
    }
}

/// `ctl show`: every service (or the one asked for) with its backends.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ShowReport {
    pub services: Vec<ServiceReport>,
    /// This balancer's place in rotation (`ctl node drain`).
    #[serde(default)]
    pub node: NodeReport,
}

/// Whether this balancer is drained (`ctl node drain`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeReport {
    pub drained: bool,
    /// Who drained it (`ctl node drain by uid 0`); empty when not drained.
    #[serde(default)]
    pub why: String,
}

/// An announced service's VIP as BIRD has it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AnnounceReport {
    /// The BIRD protocol carrying the VIP route.
    pub protocol: String,
    /// Whether BIRD confirmed the protocol enabled (the route announced).
    pub announced: bool,
    /// Why it is announced or withdrawn (and BIRD trouble, if any).
    pub why: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ServiceReport {
    pub name: String,
    /// `proxy` or `xdp`.
    pub dataplane: String,
    pub algorithm: String,
    /// Listen addresses (proxy) or VIPs (xdp).
    pub listeners: Vec<String>,
    /// Client sessions open now (proxy).
    pub sessions_active: u64,
    /// Client sessions accepted since start (proxy).
    pub sessions_total: u64,
    /// Clients answered `421` (no backend, or `max_connections` reached) since start.
    pub refused_421: u64,
    /// Per-source rejections since start (`[service.limits]`): denied (`554`), at
    /// `per_source_connections`, over `per_source_rate` (`421 4.7.0`).
    #[serde(default)]
    pub sources: SourceRejections,
    /// Open flows in the kernel's flow table (xdp services).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flows: Option<u64>,
    /// Flows without an entry here adopted mid-stream by following the Maglev table (xdp
    /// services; ip_hash).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flows_adopted: Option<u64>,
    /// Mid-stream packets of flows without an entry here passed to the stack (xdp services;
    /// algorithms other than ip_hash).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unknown_flow_packets: Option<u64>,
    /// With `announce = true`: the VIP's announcement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub announce: Option<AnnounceReport>,
    /// With `[announce] peers`: the second chance's packets by outcome.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub second_chance: Option<crate::totals::SecondChanceTotals>,
    pub backends: Vec<BackendReport>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BackendReport {
    pub name: String,
    pub address: String,
    /// `up`, `down`, `drain` or `disabled`.
    pub state: String,
    /// Why it is in that state (`health checks`, `drain = true in the file`, `ctl drain by uid
    /// 0`, ...).
    pub why: String,
    /// The last active check, if any ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_check: Option<CheckReport>,
    /// The weight in use (the file's, or a runtime one).
    pub weight: u32,
    /// 0 = unlimited.
    pub max_connections: u32,
    /// Sessions and flows open now (both data planes).
    pub active: u64,
    /// Sessions (and flows) ever assigned since start.
    pub sessions_total: u64,
    /// Failed attempts (connect failures, missing or refused greetings) seen on live traffic.
    pub failures: u64,
    /// least_time's moving average of connect + greeting, in microseconds (0 = unknown).
    pub response_us: u32,
    /// Times it was passed over for being at its `max_session_rate`.
    #[serde(default)]
    pub throttled: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SourceRejections {
    pub denied: u64,
    pub too_many: u64,
    pub too_fast: u64,
    /// Clients served without per-source tracking (the table was full of busy sources).
    pub untracked: u64,
    /// Sources tracked now.
    pub tracked: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CheckReport {
    pub ok: bool,
    /// When it ended, Unix time in milliseconds.
    pub at_unix_ms: u64,
    /// What it saw (`greeted 220`, `connect refused`, `timeout`, ...).
    pub detail: String,
}

/// `ctl flows`: the least idle flows, least idle first.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FlowsReport {
    /// Flows of the services asked for in the tables (the list may be cut by the limit).
    pub matched: u64,
    pub flows: Vec<FlowReport>,
}

/// One entry of the kernel's flow table.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FlowReport {
    /// `-` for a flow of a service no longer in the config (or of an earlier run's pinned maps).
    pub service: String,
    /// The client's address and port.
    pub client: String,
    /// The VIP and port it connected to.
    pub vip: String,
    /// The backend's name (`slot N` when no running service names it).
    pub backend: String,
    pub backend_address: String,
    /// `handshake`, `established`, `closing` (the client's FIN or a RST seen, lingering for
    /// the last packets) or `ended`.
    pub state: String,
    /// Since the flow's SYN.
    pub age_ms: u64,
    /// Since its last packet (the kernel's coarse clock: a few milliseconds' resolution).
    pub idle_ms: u64,
    /// Packets from the client.
    pub packets: u64,
}

/// `ctl sessions`: the proxy's open sessions.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SessionsReport {
    /// Oldest first.
    pub sessions: Vec<SessionReport>,
}

/// One relayed session of the userspace proxy (listed once its backend greeted).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SessionReport {
    pub service: String,
    /// The client's address and port (`-` once its connection is gone).
    pub client: String,
    pub backend: String,
    pub backend_address: String,
    /// Since the client was accepted.
    pub age_ms: u64,
    /// Bytes delivered to the backend.
    pub to_backend_bytes: u64,
    /// Bytes delivered to the client, the backend's greeting included.
    pub to_client_bytes: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_read_as_ctl_writes_them() {
        let drain = Request::Drain {
            target: Target {
                service: "mx".into(),
                backend: "mta2".into(),
            },
        };
        let line = serde_json::to_string(&drain).expect("serialize");
        assert_eq!(
            line,
            r#"{"command":"drain","target":{"service":"mx","backend":"mta2"}}"#
        );
        assert_eq!(
            serde_json::from_str::<Request>(&line).expect("parse"),
            drain
        );
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"command":"reload"}"#).expect("parse"),
            Request::Reload
        );
        assert_eq!(
            serde_json::to_string(&Request::NodeDrain).expect("serialize"),
            r#"{"command":"node_drain"}"#
        );
    }
}
