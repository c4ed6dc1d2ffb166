//! What `forwarding = "nat"` needs from the kernel before it can work: IPv4 forwarding on the
//! interfaces it receives on. The program routes rewritten packets with `bpf_fib_lookup`,
//! which answers "forwarding disabled" for a packet that came in on an interface without it,
//! and the packet then goes to the stack, which drops it too: every session would hang.
//!
//! Checked at start (and callable again on a reload), so a missing sysctl is a clear refusal
//! naming it, never a silent black hole.

use std::path::Path;

use anyhow::bail;

use crate::config::{Config, Dataplane, Forwarding};

/// Where the kernel keeps the per-interface IPv4 forwarding switch.
const IPV4_CONF: &str = "/proc/sys/net/ipv4/conf";

/// Every interface a nat service receives on (clients' side and backends' side) must forward
/// IPv4; the error names the sysctls to set.
pub fn check_nat_forwarding(config: &Config) -> anyhow::Result<()> {
    check_nat_forwarding_in(config, Path::new(IPV4_CONF))
}

fn check_nat_forwarding_in(config: &Config, conf: &Path) -> anyhow::Result<()> {
    let mut off = Vec::new();
    let mut services = Vec::new();
    for service in &config.services {
        let Some(xdp) = service.xdp.as_ref() else {
            continue;
        };
        if service.dataplane != Dataplane::Xdp || xdp.forwarding != Forwarding::Nat {
            continue;
        }
        for interface in [&xdp.interface, &xdp.backend_interface] {
            if !off.contains(interface) && !forwards(conf, interface) {
                off.push(interface.clone());
                services.push(format!("{:?}", service.name));
            }
        }
    }
    if off.is_empty() {
        return Ok(());
    }
    services.dedup();
    let sysctls: Vec<String> = off
        .iter()
        .map(|i| format!("net.ipv4.conf.{i}.forwarding"))
        .collect();
    let set: Vec<String> = sysctls.iter().map(|s| format!("{s}=1")).collect();
    bail!(
        "service {}: xdp forwarding = \"nat\" routes the rewritten packets through this network namespace's routing table, which needs IPv4 forwarding on the interfaces they arrive on, and {} is 0 (packets would be dropped). Set net.ipv4.ip_forward=1 (sysctl -w net.ipv4.ip_forward=1, which turns it on for every interface), or {}, then start again",
        services.join(", "),
        sysctls.join(" and "),
        set.join(" and ")
    )
}

/// Whether `interface` forwards IPv4; an unreadable switch counts as off (the attach names a
/// missing interface more precisely).
fn forwards(conf: &Path, interface: &str) -> bool {
    std::fs::read_to_string(conf.join(interface).join("forwarding"))
        .is_ok_and(|value| value.trim() == "1")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nat_config(interface: &str, backend_interface: &str) -> Config {
        let text = format!(
            "[[service]]\nname = \"mx\"\nlisten = \"198.18.0.100:25\"\ndataplane = \"xdp\"\n[service.xdp]\ninterface = \"{interface}\"\nforwarding = \"nat\"\nbackend_interface = \"{backend_interface}\"\n[[service.backend]]\nname = \"a\"\naddress = \"198.18.1.11:25\"\n"
        );
        crate::config::parse(Path::new("switchyard.toml"), &text)
            .unwrap_or_else(|e| panic!("config: {e}"))
    }

    fn conf_dir(switches: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        for (interface, value) in switches {
            let path = dir.path().join(interface);
            std::fs::create_dir_all(&path).expect("mkdir");
            std::fs::write(path.join("forwarding"), format!("{value}\n")).expect("write");
        }
        dir
    }

    #[test]
    fn nat_without_forwarding_names_the_sysctl_of_each_interface_that_lacks_it() {
        let conf = conf_dir(&[("eth0", "1"), ("eth1", "0")]);
        let error = check_nat_forwarding_in(&nat_config("eth0", "eth1"), conf.path())
            .expect_err("eth1 does not forward");
        let text = format!("{error:#}");
        assert!(text.contains("net.ipv4.conf.eth1.forwarding=1"), "{text}");
        assert!(text.contains("net.ipv4.ip_forward=1"), "{text}");
        assert!(!text.contains("conf.eth0."), "{text}");
        assert!(text.contains("service \"mx\""), "{text}");
    }

    #[test]
    fn nat_with_forwarding_and_dsr_without_it_start() {
        let on = conf_dir(&[("eth0", "1"), ("eth1", "1")]);
        check_nat_forwarding_in(&nat_config("eth0", "eth1"), on.path()).expect("forwarding on");
        let off = conf_dir(&[("eth0", "0")]);
        let dsr = crate::config::parse(
            Path::new("switchyard.toml"),
            "[[service]]\nname = \"mx\"\nlisten = \"198.18.0.100:25\"\ndataplane = \"xdp\"\n[service.xdp]\ninterface = \"eth0\"\n[[service.backend]]\nname = \"a\"\naddress = \"198.18.0.11:25\"\n",
        )
        .unwrap_or_else(|e| panic!("config: {e}"));
        check_nat_forwarding_in(&dsr, off.path()).expect("dsr needs no forwarding");
    }
}
