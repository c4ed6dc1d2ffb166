//! What `switchyard check` prints for a valid configuration.

use std::fmt;

use super::{Config, HealthKind};

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
        let _ = writeln!(out, "admin socket {}", self.admin_socket.display());
        if let Some(listen) = self.admin_listen {
            let _ = writeln!(out, "admin listener http://{listen}/ (metrics at /metrics)");
        }
        if let Some(chance) = &self.second_chance {
            let peers: Vec<String> = chance.peers.iter().map(ToString::to_string).collect();
            let _ = writeln!(
                out,
                "second chance on {} between peers {}",
                chance.interface,
                peers.join(", ")
            );
        }
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
            if let Some(protocol) = &s.announce {
                let socket = self
                    .bird_socket
                    .as_ref()
                    .map_or("?".to_string(), |p| p.display().to_string());
                let _ = writeln!(
                    out,
                    "  announce: BIRD protocol {protocol} (through {socket}), while a backend can take sessions"
                );
            }
            if s.limits != super::LimitsConfig::default() {
                let _ = writeln!(out, "  limits: {}", limits_line(&s.limits));
            }
            for b in &s.backends {
                let max = match b.max_connections {
                    0 => "unlimited".to_owned(),
                    n => n.to_string(),
                };
                let rate = match b.max_session_rate {
                    0 => String::new(),
                    n => format!(" max_session_rate {n}/s"),
                };
                let _ = writeln!(
                    out,
                    "  backend \"{}\": {} weight {} max_connections {}{rate}{}",
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

/// `[service.limits]` in one line: what is limited, per what source, which networks.
fn limits_line(limits: &super::LimitsConfig) -> String {
    let mut parts = Vec::new();
    if limits.per_source_connections != 0 {
        parts.push(format!(
            "{} sessions per source",
            limits.per_source_connections
        ));
    }
    if limits.per_source_rate != 0 {
        parts.push(format!(
            "{}/s per source (burst {})",
            limits.per_source_rate, limits.per_source_burst
        ));
    }
    if limits.limits_sources() {
        parts.push(format!(
            "a source is an IPv4 /{} or IPv6 /{}, {} tracked at most",
            limits.source_prefix_v4, limits.source_prefix_v6, limits.tracked_sources
        ));
    }
    if let Some(allow) = &limits.allow {
        parts.push(format!("allow {} network(s) only", allow.len()));
    }
    if !limits.deny.is_empty() {
        parts.push(format!("deny {} network(s)", limits.deny.len()));
    }
    parts.join("; ")
}
