//! What `forwarding = "nat"` needs from the kernel before it can work: IP forwarding, of each
//! IP version a nat service serves, on the interfaces it receives on. The program routes
//! rewritten packets with `bpf_fib_lookup`, which answers "forwarding disabled" for a packet
//! that came in on an interface without it, and the packet then goes to the stack, which drops
//! it too: every session would hang. For IPv6 the stack forwards only with
//! `net.ipv6.conf.all.forwarding` on (it must, for packets whose next hop the FIB has no
//! neighbour entry for yet), so that switch is checked as well.
//!
//! Checked at start (and callable again on a reload), so a missing sysctl is a clear refusal
//! naming it, never a silent black hole.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::bail;

use crate::config::{Config, Dataplane, Forwarding, ServiceConfig};

/// Where the kernel keeps its network sysctls (`ipv4/conf/<if>/forwarding`, `ipv6/...`).
const NET_SYSCTLS: &str = "/proc/sys/net";

/// An IP version's forwarding switches and how to turn them on.
struct Version {
    /// `ipv4` or `ipv6`: the sysctl tree.
    tree: &'static str,
    name: &'static str,
    /// Switches that must be on besides the interfaces' own (`all` for IPv6).
    global: &'static [&'static str],
    /// The one setting that turns forwarding on everywhere.
    everywhere: &'static str,
    serves: fn(&SocketAddr) -> bool,
}

const IPV4: Version = Version {
    tree: "ipv4",
    name: "IPv4",
    global: &[],
    everywhere: "net.ipv4.ip_forward",
    serves: SocketAddr::is_ipv4,
};

const IPV6: Version = Version {
    tree: "ipv6",
    name: "IPv6",
    global: &["all"],
    everywhere: "net.ipv6.conf.all.forwarding",
    serves: SocketAddr::is_ipv6,
};

/// Every interface a nat service receives on (clients' side and backends' side) must forward
/// each IP version of the service's VIPs; the error names the sysctls to set.
pub fn check_nat_forwarding(config: &Config) -> anyhow::Result<()> {
    check_nat_forwarding_in(config, Path::new(NET_SYSCTLS))
}

fn check_nat_forwarding_in(config: &Config, root: &Path) -> anyhow::Result<()> {
    for version in [IPV4, IPV6] {
        check_version(config, root, &version)?;
    }
    Ok(())
}

/// The nat services with a VIP of `version`.
fn nat_services<'a>(
    config: &'a Config,
    version: &'a Version,
) -> impl Iterator<Item = &'a ServiceConfig> + 'a {
    config.services.iter().filter(move |service| {
        service.dataplane == Dataplane::Xdp
            && service
                .xdp
                .as_ref()
                .is_some_and(|xdp| xdp.forwarding == Forwarding::Nat)
            && service.listen.iter().any(version.serves)
    })
}

fn check_version(config: &Config, root: &Path, version: &Version) -> anyhow::Result<()> {
    let conf = root.join(version.tree).join("conf");
    let mut off: Vec<String> = Vec::new();
    let mut services = Vec::new();
    for service in nat_services(config, version) {
        let Some(xdp) = service.xdp.as_ref() else {
            continue;
        };
        let interfaces = version
            .global
            .iter()
            .map(|g| g.to_string())
            .chain([xdp.interface.clone(), xdp.backend_interface.clone()]);
        for interface in interfaces {
            if !off.contains(&interface) && !forwards(&conf, &interface) {
                off.push(interface);
                services.push(format!("{:?}", service.name));
            }
        }
    }
    if off.is_empty() {
        return Ok(());
    }
    services.dedup();
    let tree = version.tree;
    let sysctls: Vec<String> = off
        .iter()
        .map(|i| format!("net.{tree}.conf.{i}.forwarding"))
        .collect();
    let set: Vec<String> = sysctls.iter().map(|s| format!("{s}=1")).collect();
    let everywhere = version.everywhere;
    let alternative = if version.global.is_empty() {
        format!(", or {}", set.join(" and "))
    } else {
        String::new()
    };
    bail!(
        "service {}: xdp forwarding = \"nat\" routes the rewritten {name} packets through this network namespace's routing table, which needs {name} forwarding on the interfaces they arrive on, and {} is 0 (packets would be dropped). Set {everywhere}=1 (sysctl -w {everywhere}=1, which turns it on for every interface){alternative}, then start again",
        services.join(", "),
        sysctls.join(" and "),
        name = version.name,
    )
}

/// Whether `interface` forwards (its switch under `conf`); an unreadable switch counts as off
/// (the attach names a missing interface more precisely).
fn forwards(conf: &Path, interface: &str) -> bool {
    std::fs::read_to_string(conf.join(interface).join("forwarding"))
        .is_ok_and(|value| value.trim() == "1")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nat_config_listening(listen: &str, backend: &str) -> Config {
        let text = format!(
            "[[service]]\nname = \"mx\"\nlisten = \"{listen}\"\ndataplane = \"xdp\"\n[service.xdp]\ninterface = \"eth0\"\nforwarding = \"nat\"\nbackend_interface = \"eth1\"\n[[service.backend]]\nname = \"a\"\naddress = \"{backend}\"\n"
        );
        crate::config::parse(Path::new("switchyard.toml"), &text)
            .unwrap_or_else(|e| panic!("config: {e}"))
    }

    fn nat_config() -> Config {
        nat_config_listening("198.18.0.100:25", "198.18.1.11:25")
    }

    fn nat6_config() -> Config {
        nat_config_listening("[2001:2::100]:25", "[2001:2:1::11]:25")
    }

    /// A sysctl tree with `switches` (`(tree, interface, value)`).
    fn sysctls(switches: &[(&str, &str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        for (tree, interface, value) in switches {
            let path = dir.path().join(tree).join("conf").join(interface);
            std::fs::create_dir_all(&path).expect("mkdir");
            std::fs::write(path.join("forwarding"), format!("{value}\n")).expect("write");
        }
        dir
    }

    #[test]
    fn nat_without_forwarding_names_the_sysctl_of_each_interface_that_lacks_it() {
        let conf = sysctls(&[("ipv4", "eth0", "1"), ("ipv4", "eth1", "0")]);
        let error =
            check_nat_forwarding_in(&nat_config(), conf.path()).expect_err("eth1 does not forward");
        let text = format!("{error:#}");
        assert!(text.contains("net.ipv4.conf.eth1.forwarding=1"), "{text}");
        assert!(text.contains("net.ipv4.ip_forward=1"), "{text}");
        assert!(!text.contains("conf.eth0."), "{text}");
        assert!(text.contains("service \"mx\""), "{text}");
    }

    #[test]
    fn nat_with_forwarding_and_dsr_without_it_start() {
        let on = sysctls(&[("ipv4", "eth0", "1"), ("ipv4", "eth1", "1")]);
        check_nat_forwarding_in(&nat_config(), on.path()).expect("forwarding on");
        let off = sysctls(&[("ipv4", "eth0", "0"), ("ipv6", "eth0", "0")]);
        let dsr = crate::config::parse(
            Path::new("switchyard.toml"),
            "[[service]]\nname = \"mx\"\nlisten = [\"198.18.0.100:25\", \"[2001:2::100]:25\"]\ndataplane = \"xdp\"\n[service.xdp]\ninterface = \"eth0\"\n[[service.backend]]\nname = \"a\"\naddress = \"198.18.0.11:25\"\n",
        )
        .unwrap_or_else(|e| panic!("config: {e}"));
        check_nat_forwarding_in(&dsr, off.path()).expect("dsr needs no forwarding");
    }

    /// IPv6 nat needs IPv6 forwarding on both interfaces and `all` (the stack's own switch);
    /// IPv4 forwarding does not matter to it.
    #[test]
    fn nat_ipv6_without_ipv6_forwarding_names_its_sysctls() {
        let conf = sysctls(&[
            ("ipv4", "eth0", "0"),
            ("ipv4", "eth1", "0"),
            ("ipv6", "all", "0"),
            ("ipv6", "eth0", "1"),
            ("ipv6", "eth1", "0"),
        ]);
        let error = check_nat_forwarding_in(&nat6_config(), conf.path())
            .expect_err("IPv6 forwarding is off");
        let text = format!("{error:#}");
        assert!(text.contains("net.ipv6.conf.all.forwarding=1"), "{text}");
        assert!(text.contains("net.ipv6.conf.eth1.forwarding"), "{text}");
        assert!(text.contains("IPv6 forwarding"), "{text}");
        assert!(!text.contains("conf.eth0."), "{text}");
        assert!(!text.contains("ipv4"), "{text}");
        let on = sysctls(&[
            ("ipv6", "all", "1"),
            ("ipv6", "eth0", "1"),
            ("ipv6", "eth1", "1"),
        ]);
        check_nat_forwarding_in(&nat6_config(), on.path()).expect("IPv6 forwarding on");
    }
}
