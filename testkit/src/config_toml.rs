//! The configuration a test writes for `switchyard run`: one `[[service]]` table with its
//! `[service.health]` table and one `[[service.backend]]` table per backend, spelled the same
//! way by every test. Keys outside the service (`shutdown_timeout`, `workers`) and further
//! services are plain text the test puts around it; [`admin_table`] is the `[admin]` table.

use std::fmt::{self, Display};
use std::net::SocketAddr;
use std::path::Path;

use crate::smtp_server::SmtpServer;

/// The `[admin]` table naming `socket` (relative: to the config file's directory). Every
/// switchyard a test or xtask starts gets one of its own: the default socket is shared by the
/// whole host, and a second switchyard on it refuses to start.
pub fn admin_table(socket: &Path) -> String {
    format!("\n[admin]\nsocket = {:?}\n", socket.display().to_string())
}

/// The `[admin]` table with `socket` and the HTTP admin listener on `listen` (`/metrics`).
pub fn admin_table_listening(socket: &Path, listen: SocketAddr) -> String {
    format!("{}listen = \"{listen}\"\n", admin_table(socket))
}

/// One `[[service]]` table; [`Display`] writes it as TOML.
#[derive(Clone, Debug)]
pub struct ServiceToml {
    name: String,
    listen: Vec<SocketAddr>,
    keys: String,
    health: Option<String>,
    backends: String,
}

impl ServiceToml {
    /// The service `name` listening on `listen` (one address or several), with no further
    /// keys, no `[service.health]` table (the defaults) and no backends yet.
    pub fn new(name: &str, listen: &[SocketAddr]) -> ServiceToml {
        ServiceToml {
            name: name.to_string(),
            listen: listen.to_vec(),
            keys: String::new(),
            health: None,
            backends: String::new(),
        }
    }

    /// More lines of the `[[service]]` table itself (algorithm, retries, timeouts, …).
    pub fn keys(mut self, lines: &str) -> ServiceToml {
        self.keys.push_str(lines);
        self.keys.push('\n');
        self
    }

    /// `body` as the `[service.health]` table.
    pub fn health(mut self, body: &str) -> ServiceToml {
        self.health = Some(body.to_string());
        self
    }

    /// A backend with only a name and an address.
    pub fn backend(self, name: &str, address: impl Display) -> ServiceToml {
        self.backend_with(name, address, "")
    }

    /// A backend with more lines of its table (`weight`, `drain`, …).
    pub fn backend_with(mut self, name: &str, address: impl Display, keys: &str) -> ServiceToml {
        self.backends.push_str(&format!(
            "\n[[service.backend]]\nname = \"{name}\"\naddress = \"{address}\"\n{keys}"
        ));
        if !keys.is_empty() && !keys.ends_with('\n') {
            self.backends.push('\n');
        }
        self
    }

    /// Every server of `servers` as a backend, under its own name and address.
    pub fn servers(self, servers: &[&SmtpServer]) -> ServiceToml {
        servers.iter().fold(self, |toml, server| {
            toml.backend(server.name(), server.addr())
        })
    }
}

impl Display for ServiceToml {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let listen: Vec<String> = self.listen.iter().map(|a| format!("\"{a}\"")).collect();
        write!(
            f,
            "\n[[service]]\nname = \"{}\"\nlisten = [{}]\n{}",
            self.name,
            listen.join(", "),
            self.keys
        )?;
        if let Some(health) = &self.health {
            write!(f, "\n[service.health]\n{health}\n")?;
        }
        f.write_str(&self.backends)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_a_service_its_health_and_its_backends() {
        let listen: SocketAddr = "127.0.0.1:2525".parse().expect("an address");
        let toml = ServiceToml::new("mx", &[listen])
            .keys("algorithm = \"least_conn\"")
            .health("kind = \"none\"")
            .backend("a", "127.0.0.1:25")
            .backend_with("b", "127.0.0.2:25", "weight = 2")
            .to_string();
        let parsed: toml::Table = toml.parse().expect("valid TOML");
        let service = &parsed["service"][0];
        assert_eq!(service["listen"][0].as_str(), Some("127.0.0.1:2525"));
        assert_eq!(service["algorithm"].as_str(), Some("least_conn"));
        assert_eq!(service["health"]["kind"].as_str(), Some("none"));
        assert_eq!(service["backend"][1]["weight"].as_integer(), Some(2));
        assert_eq!(
            service["backend"][1]["address"].as_str(),
            Some("127.0.0.2:25")
        );
    }
}
