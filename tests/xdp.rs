//! The kernel fast path end to end: the real `switchyard` binary loads its XDP program in a
//! balancer namespace, and real SMTP sessions from a client namespace reach real SMTP servers
//! in three backend namespaces, in `dsr` and in `nat` forwarding.
//!
//! Needs root, BTF and a binary built with the eBPF toolchain. Without them each test prints a
//! loud SKIP, unless SWITCHYARD_REQUIRE_XDP=1 (CI), which turns a skip into a failure. The
//! verifier-load check itself also runs as a unit test of the binary (`xdp::tests`).

#[path = "support/netns.rs"]
mod netns;

use std::net::{Ipv4Addr, SocketAddrV4};
use std::process::Command;
use std::time::{Duration, Instant};

use netns::{Layout, SMTP_PORT, Switchyard, Topology, VIP, smtp_session};

/// Whether the binary embeds the XDP object: build.rs sets this cfg for every target of the
/// package when it built the object.
fn object_built() -> bool {
    cfg!(switchyard_xdp)
}

fn ready_line(topo: &Topology) -> String {
    format!("XDP program attached to {}", topo.lb_interface)
}

fn vip() -> SocketAddrV4 {
    SocketAddrV4::new(VIP, SMTP_PORT)
}

/// Runs `count` sessions in parallel from the client namespace, each held `hold`; returns
/// each session's result.
fn sessions(topo: &Topology, count: usize, hold: Duration) -> Vec<Result<String, String>> {
    topo.client.run(move || {
        let workers: Vec<_> = (0..count)
            .map(|_| std::thread::spawn(move || smtp_session(vip(), hold)))
            .collect();
        workers.into_iter().map(|w| w.join().unwrap_or_else(|_| Err("client panicked".into()))).collect()
    })
}

/// The XDP program's shared active counts, read from the kernel with bpftool (the map of the
/// program attached to the balancer's interface).
fn active_counts(topo: &Topology) -> Vec<u64> {
    let out = Command::new("ip")
        .args(["-n", &topo.balancer.name, "-d", "link", "show", topo.lb_interface])
        .output()
        .expect("ip link show");
    let text = String::from_utf8_lossy(&out.stdout);
    let prog_id = text
        .split("prog/xdp id ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no XDP program on {}: {text}", topo.lb_interface))
        .to_string();
    let show = Command::new("bpftool").args(["prog", "show", "id", &prog_id]).output().expect("bpftool (Debian package bpftool) is needed");
    let show = String::from_utf8_lossy(&show.stdout);
    let ids: Vec<String> = show
        .split("map_ids ")
        .nth(1)
        .map(|rest| rest.split_whitespace().next().unwrap_or("").split(',').map(str::to_string).collect())
        .unwrap_or_default();
    for id in ids {
        let info = Command::new("bpftool").args(["map", "show", "id", &id]).output().expect("bpftool");
        if !String::from_utf8_lossy(&info.stdout).contains("name ACTIVE ") {
            continue;
        }
        let dump = Command::new("bpftool").args(["map", "dump", "id", &id]).output().expect("bpftool");
        let dump = String::from_utf8_lossy(&dump.stdout);
        return dump
            .lines()
            .filter_map(|line| line.split("value:").nth(1))
            .map(|hex| {
                let bytes: Vec<u8> = hex.split_whitespace().filter_map(|b| u8::from_str_radix(b, 16).ok()).collect();
                let mut word = [0u8; 8];
                word[..bytes.len().min(8)].copy_from_slice(&bytes[..bytes.len().min(8)]);
                u64::from_le_bytes(word)
            })
            .collect();
    }
    panic!("ACTIVE map not found among the program's maps: {show}");
}

fn wait_for(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn dsr_or_nat_sessions_complete(layout: Layout) {
    if !netns::require_xdp(object_built()) {
        return;
    }
    let mut topo = Topology::new(layout, 3);
    topo.start_backends();
    let name = format!("sy-{}", topo.suffix);
    let config = topo.service_toml(&name, "least_conn");
    let mut sy = Switchyard::start(&topo.balancer, &config, &[], &ready_line(&topo));

    // Long-lived sessions: least_conn must spread them evenly (3 each).
    let results = sessions(&topo, 9, Duration::from_millis(1500));
    let failures: Vec<_> = results.iter().filter(|r| r.is_err()).collect();
    assert!(failures.is_empty(), "{layout:?}: failed sessions {failures:?}\n{}", sy.log_text());
    for backend in &topo.backends {
        // Every connection a backend got from outside came from the real client address.
        let from_client = backend.sessions_from(netns::CLIENT);
        assert_eq!(from_client, 3, "{layout:?}: {} got {from_client} of 9 long sessions: least_conn should spread 3/3/3", backend.name);
        for peer in backend.peers() {
            let ip = match peer.ip() {
                std::net::IpAddr::V4(ip) => ip,
                other => panic!("unexpected peer {other}"),
            };
            assert!(
                ip == netns::CLIENT || ip == netns::BALANCER || ip == netns::BALANCER_INSIDE,
                "{layout:?}: {} saw {ip}: not the client's own address",
                backend.name
            );
        }
        assert_eq!(backend.sessions_completed(), 3, "{layout:?}: {} completed sessions", backend.name);
    }
    // Every flow ended with the client's FIN: the shared counts are back to 0.
    wait_for("active counts back to 0", Duration::from_secs(5), || active_counts(&topo).iter().all(|&c| c == 0));
    let status = sy.terminate();
    assert!(status.success(), "switchyard exit: {status}\n{}", sy.log_text());
}

#[test]
fn dsr_sessions_complete_spread_and_keep_the_client_address() {
    dsr_or_nat_sessions_complete(Layout::Dsr);
}

#[test]
fn nat_sessions_complete_spread_and_keep_the_client_address() {
    dsr_or_nat_sessions_complete(Layout::Nat);
}

#[test]
fn a_stopped_backend_gets_no_new_flows_and_others_never_fail() {
    if !netns::require_xdp(object_built()) {
        return;
    }
    let mut topo = Topology::new(Layout::Dsr, 3);
    topo.start_backends();
    let name = format!("sy-{}", topo.suffix);
    let config = topo.service_toml(&name, "round_robin");
    let _sy = Switchyard::start(&topo.balancer, &config, &[], &ready_line(&topo));
    let before = sessions(&topo, 6, Duration::ZERO);
    assert!(before.iter().all(|r| r.is_ok()), "before: {before:?}");

    topo.backends[0].pause();
    let stopped_at = topo.backends[0].sessions_from(netns::CLIENT);
    // fall = 2 checks every 500 ms, plus one sync period: well within 2.5 s.
    std::thread::sleep(Duration::from_millis(2500));
    let after = sessions(&topo, 12, Duration::ZERO);
    let failed: Vec<_> = after.iter().filter(|r| r.is_err()).collect();
    assert!(failed.is_empty(), "sessions failed after the backend went down: {failed:?}");
    assert_eq!(topo.backends[0].sessions_from(netns::CLIENT), stopped_at, "the stopped backend got new flows");
    assert_eq!(
        topo.backends[1].sessions_from(netns::CLIENT) + topo.backends[2].sessions_from(netns::CLIENT),
        12 + 6 - stopped_at
    );
    wait_for("active counts back to 0", Duration::from_secs(5), || active_counts(&topo).iter().all(|&c| c == 0));
}

#[test]
fn non_vip_traffic_is_untouched() {
    if !netns::require_xdp(object_built()) {
        return;
    }
    let mut topo = Topology::new(Layout::Nat, 3);
    topo.start_backends();
    let name = format!("sy-{}", topo.suffix);
    let config = topo.service_toml(&name, "least_conn");
    let _sy = Switchyard::start(&topo.balancer, &config, &[], &ready_line(&topo));
    // A backend's own address, same port: routed by the balancer's kernel, not balanced.
    let direct = SocketAddrV4::new(topo.backend_addr(1), SMTP_PORT);
    for _ in 0..3 {
        let got = topo.client.run(move || smtp_session(direct, Duration::ZERO));
        assert_eq!(got.as_deref(), Ok("mta2"), "direct traffic must reach the addressed host");
    }
    // The VIP on another port is not a service: nothing answers (the balancer does not own
    // the VIP), and no backend sees it.
    let other_port = SocketAddrV4::new(VIP, 26);
    let result = topo.client.run(move || {
        std::net::TcpStream::connect_timeout(&std::net::SocketAddr::V4(other_port), Duration::from_millis(500)).map(|_| ())
    });
    assert!(result.is_err(), "VIP:26 is not balanced");
    assert_eq!(topo.backends[0].sessions_from(netns::CLIENT) + topo.backends[2].sessions_from(netns::CLIENT), 0);
    assert!(active_counts(&topo).iter().all(|&c| c == 0));
}

#[test]
fn ip_hash_is_sticky_and_remaps_about_one_in_n() {
    if !netns::require_xdp(object_built()) {
        return;
    }
    let mut topo = Topology::new(Layout::Dsr, 3);
    topo.start_backends();
    let clients: Vec<Ipv4Addr> = (0..60).map(|i| Ipv4Addr::new(198, 18, 0, 150 + i)).collect();
    for ip in &clients {
        topo.client.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
    }
    let name = format!("sy-{}", topo.suffix);
    let config = topo.service_toml(&name, "ip_hash");
    let _sy = Switchyard::start(&topo.balancer, &config, &[], &ready_line(&topo));
    let assign = |topo: &Topology, clients: &[Ipv4Addr]| -> Vec<String> {
        let clients = clients.to_vec();
        topo.client.run(move || {
            clients
                .iter()
                .map(|&ip| session_from(ip).unwrap_or_else(|e| panic!("session from {ip}: {e}")))
                .collect()
        })
    };
    let first = assign(&topo, &clients);
    let second = assign(&topo, &clients);
    assert_eq!(first, second, "ip_hash must keep every client on its backend");
    let used: std::collections::BTreeSet<_> = first.iter().collect();
    assert_eq!(used.len(), 3, "60 clients should use all 3 backends: {first:?}");

    topo.backends[2].pause();
    std::thread::sleep(Duration::from_millis(2500));
    let third = assign(&topo, &clients);
    let moved = first.iter().zip(&third).filter(|(a, b)| a != b).count();
    let on_removed = first.iter().filter(|b| *b == "mta3").count();
    // Only the removed backend's clients move (Maglev's minimal disruption): about 1/3.
    assert_eq!(moved, on_removed, "clients of surviving backends moved: {first:?} → {third:?}");
    assert!(third.iter().all(|b| b != "mta3"));
    assert!((10..=30).contains(&moved), "about 1/3 of 60 clients should move, {moved} did");
}

fn session_from(source: Ipv4Addr) -> Result<String, String> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).map_err(|e| e.to_string())?;
    socket
        .bind(&std::net::SocketAddr::V4(SocketAddrV4::new(source, 0)).into())
        .map_err(|e| format!("bind {source}: {e}"))?;
    socket
        .connect_timeout(&std::net::SocketAddr::V4(vip()).into(), Duration::from_secs(5))
        .map_err(|e| format!("connect from {source}: {e}"))?;
    let stream: std::net::TcpStream = socket.into();
    netns::smtp_session_on(stream, Duration::ZERO)
}

#[test]
fn restart_keeps_established_sessions() {
    if !netns::require_xdp(object_built()) {
        return;
    }
    let mut topo = Topology::new(Layout::Dsr, 3);
    topo.start_backends();
    // A private bpffs for the pins (parallel tests must not share one).
    let pins = tempfile::tempdir().expect("tempdir");
    let pin_path = pins.path().to_str().expect("utf-8 path").to_string();
    assert!(Command::new("mount").args(["-t", "bpf", "bpf", &pin_path]).status().expect("mount").success());
    struct Unmount(String);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(pin_path.clone());
    let name = format!("sy-{}", topo.suffix);
    let config = topo.service_toml(&name, "least_conn");
    let env = [("SWITCHYARD_XDP_PIN", pin_path.as_str())];
    let mut first = Switchyard::start(&topo.balancer, &config, &env, &ready_line(&topo));

    // Sessions that stay open across the restart.
    let held = topo.client.spawn(|| {
        let workers: Vec<_> = (0..3)
            .map(|_| std::thread::spawn(|| smtp_session(vip(), Duration::from_secs(4))))
            .collect();
        workers.into_iter().map(|w| w.join().unwrap_or_else(|_| Err("panicked".into()))).collect::<Vec<_>>()
    });
    std::thread::sleep(Duration::from_millis(1000));
    assert!(first.terminate().success());
    let second = Switchyard::start(&topo.balancer, &config, &env, "XDP program replaced on");
    let results = held.join().expect("client thread");
    assert!(results.iter().all(|r| r.is_ok()), "sessions across the restart: {results:?}\n{}", second.log_text());
    assert!(second.log_text().contains("rebuilt active counts from 3 open flows"), "{}", second.log_text());
    wait_for("active counts back to 0", Duration::from_secs(5), || active_counts(&topo).iter().all(|&c| c == 0));
}
