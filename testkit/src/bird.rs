//! BIRD 2 for the tests and benchmarks of announcement: one daemon per namespace with its own
//! config, control socket and PID file (stopped by that PID, never by name), the router's and a
//! balancer's configs, and the router's kernel route to a VIP as BIRD installed it (how many
//! nexthops it has, waiting for a count).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::netns::Netns;

/// BGP timers of both ends: a withdrawal itself is an UPDATE sent at once; these bound how long
/// a silent peer keeps its routes.
pub const BGP_TIMERS: &str =
    "hold time 3; keepalive time 1; connect retry time 1; error wait time 1, 2;";
/// Ample for BGP to come up and for any route change (a withdrawal takes milliseconds).
pub const ROUTE_LIMIT: Duration = Duration::from_secs(20);
/// The router's AS; every balancer is in [`BALANCER_AS`].
const ROUTER_AS: u32 = 65000;
const BALANCER_AS: u32 = 65001;

/// Why BIRD cannot run here, if it cannot: not root, or no `bird` binary.
pub fn missing() -> Option<&'static str> {
    if unsafe { nix::libc::geteuid() } != 0 {
        Some("not root")
    } else if Command::new("bird").arg("--version").output().is_err() {
        Some("BIRD 2 (`bird`) is not installed; run `cargo xtask setup` (Debian package bird2)")
    } else {
        None
    }
}

/// Whether BIRD and root are here; a loud skip outside CI, a failure in CI
/// (`CI=true` or `SWITCHYARD_REQUIRE_XDP=1`), so a skip never passes for a success there.
pub fn bird_available() -> bool {
    let problem = missing();
    let Some(problem) = problem else {
        return true;
    };
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
        || std::env::var("SWITCHYARD_REQUIRE_XDP").is_ok_and(|v| v == "1");
    if ci {
        panic!("announcement through BIRD cannot be tested: {problem}");
    }
    eprintln!("\n*** SKIP: announcement through BIRD NOT tested: {problem} ***\n");
    false
}

/// One BIRD daemon in a namespace, stopped by its PID on drop.
pub struct Bird {
    pid_file: PathBuf,
    socket: PathBuf,
    stopped: bool,
    _dir: tempfile::TempDir,
}

impl Bird {
    /// BIRD with `config`, in a temporary directory of its own.
    pub fn start(ns: &Netns, config: &str) -> Bird {
        Bird::start_in(ns, config, tempfile::tempdir().expect("BIRD directory"))
    }

    /// BIRD with its file, control socket ([`socket_in`]) and PID file in `dir`.
    pub fn start_in(ns: &Netns, config: &str, dir: tempfile::TempDir) -> Bird {
        let file = dir.path().join("bird.conf");
        std::fs::write(&file, config).expect("write bird.conf");
        let socket = socket_in(dir.path());
        let pid_file = dir.path().join("bird.pid");
        let output = ns
            .command("bird")
            .arg("-c")
            .arg(&file)
            .arg("-s")
            .arg(&socket)
            .arg("-P")
            .arg(&pid_file)
            .output()
            .expect("start bird");
        assert!(
            output.status.success(),
            "bird in {} failed: {}",
            ns.name,
            String::from_utf8_lossy(&output.stderr)
        );
        Bird {
            pid_file,
            socket,
            stopped: false,
            _dir: dir,
        }
    }

    /// Its control socket (switchyard's `[announce] bird_socket`).
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The daemon's PID, from its PID file (written shortly after it forked).
    pub fn pid(&self) -> Option<i32> {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            if let Some(pid) = std::fs::read_to_string(&self.pid_file)
                .ok()
                .and_then(|text| text.trim().parse().ok())
            {
                return Some(pid);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `birdc -s SOCKET ARGS`' output.
    pub fn birdc(&self, args: &[&str]) -> String {
        let output = Command::new("birdc")
            .arg("-s")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("birdc");
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Waits until BGP protocol `protocol` is Established.
    pub fn wait_established(&self, protocol: &str) {
        let start = Instant::now();
        while !self
            .birdc(&["show", "protocols", protocol])
            .contains("Established")
        {
            assert!(
                start.elapsed() < ROUTE_LIMIT,
                "BGP {protocol} did not come up"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM to its PID: BIRD closes its BGP sessions, so its peers drop its routes at once.
    pub fn stop(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        if let Some(pid) = self.pid() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
    }
}

/// The control socket of a BIRD started [`Bird::start_in`] `dir`.
pub fn socket_in(dir: &Path) -> PathBuf {
    dir.join("bird.ctl")
}

impl Drop for Bird {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The BGP protocol name the router uses for its `index`-th neighbour (`lb1`, `lb2`, …).
pub fn neighbour_protocol(index: usize) -> String {
    format!("lb{}", index + 1)
}

/// The router: BGP from each of `neighbours` (AS 65001, protocols [`neighbour_protocol`]),
/// every learnt route into the kernel with all equal paths merged (ECMP).
pub fn router_config(router: Ipv4Addr, neighbours: &[Ipv4Addr]) -> String {
    let mut text = format!(
        "router id {router};
protocol device {{ scan time 1; }}
protocol kernel {{ ipv4 {{ import none; export all; }}; merge paths on; }}
"
    );
    for (index, neighbour) in neighbours.iter().enumerate() {
        text.push_str(&format!(
            "protocol bgp {} {{
    local {router} as {ROUTER_AS}; neighbor {neighbour} as {BALANCER_AS};
    {BGP_TIMERS}
    ipv4 {{ import all; export none; }};
}}
",
            neighbour_protocol(index)
        ));
    }
    text
}

/// A balancer: the static protocol `protocol` carries `vip` and starts disabled (switchyard
/// enables it while the service can take sessions); BGP `uplink` to the router exports it.
pub fn balancer_config(own: Ipv4Addr, router: Ipv4Addr, vip: Ipv4Addr, protocol: &str) -> String {
    format!(
        "router id {own};
protocol device {{ scan time 1; }}
protocol static {protocol} {{ disabled; ipv4; route {vip}/32 unreachable; }}
protocol bgp uplink {{
    local {own} as {BALANCER_AS}; neighbor {router} as {ROUTER_AS};
    {BGP_TIMERS}
    ipv4 {{ import none; export where source = RTS_STATIC; next hop self; }};
}}
"
    )
}

/// How many nexthops the router's kernel route to `vip`/32 that BIRD installed has (0: none).
pub fn nexthops(router: &Netns, vip: Ipv4Addr) -> usize {
    let output = router
        .command("ip")
        .args(["-j", "route", "show", &format!("{vip}/32"), "proto", "bird"])
        .output()
        .expect("ip route show");
    let routes: serde_json::Value =
        serde_json::from_slice(&output.stdout).unwrap_or(serde_json::Value::Null);
    let Some(routes) = routes.as_array() else {
        return 0;
    };
    routes
        .iter()
        .map(
            |route| match route.get("nexthops").and_then(|n| n.as_array()) {
                Some(list) => list.len(),
                None => usize::from(route.get("gateway").is_some()),
            },
        )
        .sum()
}

/// Waits until the router's route to `vip` has exactly `count` nexthops; the time it took.
pub fn wait_nexthops(router: &Netns, vip: Ipv4Addr, count: usize, what: &str) -> Duration {
    let start = Instant::now();
    loop {
        let now = nexthops(router, vip);
        if now == count {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < ROUTE_LIMIT,
            "{what}: the router's route to {vip} has {now} nexthops, not {count}, after {ROUTE_LIMIT:?}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}
