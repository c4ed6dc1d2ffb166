//! The kernel fast path's control plane: loads the XDP program, sizes and programs its maps
//! from the running state, attaches it, keeps backend state in step with health checks, and
//! expires idle flows so the shared active counts never drift.
//!
//! Lifecycle, as `server` drives it:
//! 1. [`XdpPlane::load`] before the state is built: loads the object through the verifier and
//!    maps the shared active-count array; [`XdpPlane::counters`] is then the [`CounterTable`]
//!    the whole process counts in (kernel flows and proxy sessions alike).
//! 2. [`XdpPlane::start`] once the runtime exists: writes services, backends and tables,
//!    attaches, and spawns the sync task (health and drain → backend state, flow expiry and
//!    count reconciliation, the traffic counters in the log once a minute).
//!    A reload or runtime change swaps the state; the task follows it within one period (at
//!    once after a poke of [`XdpPlane::sync_now_handle`]): see `tables` for what it rewrites,
//!    and [`reload_refusal`] for what a reload may not ask of the kernel path.
//! 3. [`XdpPlane::shutdown`]: stops the task and detaches — unless the maps and links were
//!    pinned on purpose (`pin = true` in `[service.xdp]`), in which case the program keeps steering
//!    established flows and the next start takes them over.

#[cfg(test)]
mod agreement;
#[cfg(test)]
mod chance_run;
mod flow_dump;
mod flows;
mod forwarding;
mod heartbeat;
mod limits;
mod loader;
#[cfg(test)]
mod map_layouts;
mod mode;
mod neighbours;
mod netdev;
mod peers;
mod pins;
mod stats;
mod tables;

use std::sync::Arc;

use crate::config::{Config, Dataplane, Forwarding};
use crate::counters::CounterTable;
use crate::state::LiveState;

pub use flow_dump::FlowReader;
pub use forwarding::check_nat_forwarding;
pub use loader::XdpPlane;

/// Said when the fast path is asked for but not built in.
pub const NOT_BUILT: &str = "this switchyard was built without the XDP fast path (eBPF toolchain not found): run `cargo xtask setup`, then rebuild";

/// The compiled XDP object, when build.rs could build it.
pub fn object() -> Option<&'static [u8]> {
    #[cfg(switchyard_xdp)]
    {
        static OBJECT: &[u8] =
            aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/switchyard-xdp.o"));
        Some(OBJECT)
    }
    #[cfg(not(switchyard_xdp))]
    {
        None
    }
}

/// Whether `config` asks for the kernel path: an xdp service, or `[announce] peers` (the
/// second chance runs in the XDP program, for proxy services too).
pub fn wanted(config: &Config) -> bool {
    config.second_chance.is_some()
        || config
            .services
            .iter()
            .any(|s| s.dataplane == Dataplane::Xdp)
}

/// The one call `server` needs: `Ok(None)` when no service uses XDP (counts then live on the
/// heap), otherwise the loaded plane, whose counter table must be used to build the state.
pub fn load_if_wanted(config: &Config) -> anyhow::Result<Option<XdpPlane>> {
    if !wanted(config) {
        return Ok(None);
    }
    XdpPlane::load(config).map(Some)
}

/// What a reload from `old` to `new` may not do to the kernel path, as a message naming the
/// service: the program stays attached where it was attached at start (with the checksum
/// handling and attach mode decided then), so an added xdp service must use interfaces the
/// running xdp services use (a nat one, interfaces of running nat services) with the same
/// `mode` and `pin`; and no xdp service may have more backends than the fast path takes.
/// (Changes to a running service's `[service.xdp]` and VIPs are refused by the caller.)
pub fn reload_refusal(old: &Config, new: &Config) -> Result<(), String> {
    let file = new.source.display();
    let restart = "restart switchyard to apply it; nothing was applied";
    let running: Vec<&crate::config::XdpConfig> =
        old.services.iter().filter_map(|s| s.xdp.as_ref()).collect();
    let interfaces = |nat_only: bool| -> std::collections::BTreeSet<&str> {
        running
            .iter()
            .filter(|x| !nat_only || x.forwarding == Forwarding::Nat)
            .flat_map(|x| [x.interface.as_str(), x.backend_interface.as_str()])
            .collect()
    };
    for service in new
        .services
        .iter()
        .filter(|s| s.dataplane == Dataplane::Xdp)
    {
        if service.backends.len() > switchyard_common::MAX_BACKENDS {
            return Err(format!(
                "{file}: service {:?}: the XDP fast path takes at most {} backends ({} given): nothing was applied",
                service.name,
                switchyard_common::MAX_BACKENDS,
                service.backends.len()
            ));
        }
        let Some(xdp) = &service.xdp else { continue };
        if old.services.iter().any(|s| s.name == service.name) {
            continue;
        }
        let nat = xdp.forwarding == Forwarding::Nat;
        let attached = interfaces(nat);
        for interface in [&xdp.interface, &xdp.backend_interface] {
            if !attached.contains(interface.as_str()) {
                let what = if nat {
                    "running nat services"
                } else {
                    "running xdp services"
                };
                let names: Vec<&str> = attached.iter().copied().collect();
                return Err(format!(
                    "{file}: service {:?}: an xdp service added while running must use an interface the {what} use ({}), not {interface:?}: {restart}",
                    service.name,
                    if names.is_empty() {
                        "none".to_string()
                    } else {
                        names.join(", ")
                    }
                ));
            }
        }
        if let Some(first) = running.first()
            && (first.mode != xdp.mode || first.pin != xdp.pin)
        {
            return Err(format!(
                "{file}: service {:?}: an xdp service added while running must have the running services' mode and pin ({} and {}): {restart}",
                service.name, first.mode, first.pin
            ));
        }
    }
    Ok(())
}

/// The counter table for `config`: the plane's shared one, or a heap table.
pub fn counters_for(plane: Option<&XdpPlane>, config: &Config) -> Arc<CounterTable> {
    match plane {
        Some(plane) => plane.counters(),
        None => CounterTable::new(crate::state::Snapshot::slot_capacity(config)),
    }
}

/// Starts the plane on `state` if there is one.
pub fn start_if_loaded(plane: &mut Option<XdpPlane>, state: &Arc<LiveState>) -> anyhow::Result<()> {
    match plane {
        Some(plane) => plane.start(state.clone()),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Snapshot;

    /// Root and the object are needed; CI (SWITCHYARD_REQUIRE_XDP=1) turns a skip into a failure.
    pub(super) fn skip_reason() -> Option<&'static str> {
        if object().is_none() {
            return Some("the XDP object is not built in (eBPF toolchain missing)");
        }
        if unsafe { nix::libc::geteuid() } != 0 {
            return Some("not root");
        }
        None
    }

    /// Moves the calling thread into a network namespace of its own with IPv4 forwarding on:
    /// nat refuses to start without forwarding, which a test must not switch on for the host.
    pub(super) fn own_network_namespace_with_forwarding() {
        // SAFETY: unshare affects only the calling thread (a test's own).
        if unsafe { nix::libc::unshare(nix::libc::CLONE_NEWNET) } != 0 {
            panic!("unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error());
        }
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
            .expect("IPv4 forwarding in the test's own namespace");
    }

    pub(super) fn require() -> bool {
        if let Some(reason) = skip_reason() {
            if std::env::var("SWITCHYARD_REQUIRE_XDP").is_ok_and(|v| v == "1") {
                panic!("SWITCHYARD_REQUIRE_XDP=1 but the kernel path cannot be tested: {reason}");
            }
            eprintln!("SKIP (kernel path NOT tested): {reason}");
            return false;
        }
        true
    }

    pub(super) fn config(text: &str) -> Config {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("switchyard.toml");
        std::fs::write(&path, text).expect("write config");
        crate::config::load(&path).unwrap_or_else(|e| panic!("config: {e}"))
    }

    const CONFIG: &str = r#"
[[service]]
name = "sy-verify"
listen = "198.18.0.100:25"
dataplane = "xdp"
algorithm = "least_conn"
[service.xdp]
interface = "lo"
forwarding = "dsr"
flow_table_size = 4096
[[service.backend]]
name = "a"
address = "198.18.1.11:25"
[[service.backend]]
name = "b"
address = "198.18.1.12:25"
"#;

    /// The dsr service `name` on VIP port `port` and `interface`, with `backends` backends.
    fn dsr_service(name: &str, port: u16, interface: &str, backends: usize) -> String {
        let mut text = format!(
            "[[service]]\nname = \"{name}\"\nlisten = \"198.18.0.100:{port}\"\ndataplane = \"xdp\"\n[service.xdp]\ninterface = \"{interface}\"\n"
        );
        for i in 0..backends {
            text += &format!(
                "[[service.backend]]\nname = \"b{i}\"\naddress = \"198.18.{}.{}:25\"\n",
                1 + i / 250,
                1 + i % 250
            );
        }
        text
    }

    #[test]
    fn a_reload_adds_xdp_services_only_where_the_program_is_attached() {
        let running = config(&dsr_service("a", 25, "lo", 2));
        let same = config(&(dsr_service("a", 25, "lo", 2) + &dsr_service("b", 26, "lo", 1)));
        assert_eq!(reload_refusal(&running, &same), Ok(()));
        let elsewhere =
            config(&(dsr_service("a", 25, "lo", 2) + &dsr_service("b", 26, "sy-other", 1)));
        let refused = reload_refusal(&running, &elsewhere).expect_err("another interface");
        assert!(
            refused.contains("service \"b\"") && refused.contains("\"sy-other\""),
            "{refused}"
        );
        let too_many = config(&dsr_service(
            "a",
            25,
            "lo",
            switchyard_common::MAX_BACKENDS + 1,
        ));
        let refused = reload_refusal(&running, &too_many).expect_err("too many backends");
        assert!(refused.contains("at most"), "{refused}");
    }

    #[test]
    fn program_passes_the_kernel_verifier_and_counts_are_shared() {
        if !require() {
            return;
        }
        let config = config(CONFIG);
        let plane = XdpPlane::load(&config).unwrap_or_else(|e| panic!("{e:#}"));
        let counters = plane.counters();
        assert!(counters.is_shared_with_kernel());
        assert_eq!(counters.len(), Snapshot::slot_capacity(&config));
        // The mapping is the kernel's array: a write through it reads back through the map.
        counters.add(1, 5);
        assert_eq!(plane.active_from_map(1).expect("read ACTIVE"), 5);
        counters.add(1, -5);
        assert_eq!(plane.active_from_map(1).expect("read ACTIVE"), 0);
        plane.shutdown();
    }
}
