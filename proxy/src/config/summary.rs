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
