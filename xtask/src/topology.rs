//! The kernel path's benchmark network: one set of network namespaces (`sy-bench-<pid>-…`) in
//! which plain IP routing, switchyard's userspace proxy and switchyard's XDP path (dsr and nat)
//! take turns in front of the same three sink MTAs, so their figures compare like for like.
//!
//! Layout: one L2 segment (a bridge in its own namespace) joins the client (198.18.0.1), the
//! balancer (198.18.0.2) and three backends (198.18.0.11-13). The client reaches the VIP
//! 198.18.0.100 through the balancer. Every backend holds the VIP on its loopback and answers
//! no ARP for it (as LVS-DR real servers), and runs a sink on port 25. What the balancer does
//! with the VIP depends on the active [`Mode`]:
//! - `routing`: no balancer at all, an ECMP route (layer-4 hash) to the three backends, which
//!   answer the client directly: the physical limit of this network;
//! - `proxy`: switchyard's userspace proxy on the balancer's own address (not the VIP: the
//!   proxy's TIME_WAIT sockets would otherwise hold VIP tuples, and the kernel drops a packet
//!   it should forward when early demux matches it to a local socket, so the next routing run
//!   would lose connections);
//! - `dsr`: switchyard's XDP program rewrites the destination MAC and transmits (XDP_TX); the
//!   backends answer the client directly, as in `routing`;
//! - `nat`: switchyard's XDP program rewrites to the backend's address and redirects; the
//!   backends route their replies to the client back through the balancer.
//!
//! Safety (DEVELOPERS.md): the root namespace gets `ip route replace blackhole 198.18.0.0/15`
//! before anything is built; everything lives in namespaces this module creates, which `Drop`
//! deletes after stopping the processes inside them. Namespaces left by a killed run (whose pid
//! no longer exists) are deleted at the next start.

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::workspace;
use testkit::supervise::{self as children, Supervised};

pub const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const BALANCER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
pub const SMTP_PORT: u16 = 25;
const BACKENDS: usize = 3;
const PREFIX: &str = "sy-bench-";

/// What stands between the client and the backends during a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Routing,
    Proxy,
    Dsr,
    Nat,
}

impl Mode {
    pub const ALL: [Mode; 4] = [Mode::Routing, Mode::Proxy, Mode::Dsr, Mode::Nat];

    /// The contender's name in the benchmark's table.
    pub fn contender(self) -> &'static str {
        match self {
            Mode::Routing => "kernel routing (no balancer)",
            Mode::Proxy => "switchyard proxy (netns)",
            Mode::Dsr => "switchyard xdp dsr",
            Mode::Nat => "switchyard xdp nat",
        }
    }

    fn word(self) -> &'static str {
        match self {
            Mode::Routing => "routing",
            Mode::Proxy => "proxy",
            Mode::Dsr => "dsr",
            Mode::Nat => "nat",
        }
    }
}

fn backend_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 0, 11 + i as u8)
}

/// The network, its sinks, and the balancer of the active mode.
pub struct Topology {
    dir: PathBuf,
    switchyard: PathBuf,
    pub client: String,
    pub balancer: String,
    switch: String,
    backends: Vec<String>,
    /// "smtp-sink" (Postfix) or "xtask sink".
    pub sinks_kind: &'static str,
    sinks: Vec<Supervised>,
    active: Option<(Mode, Option<Supervised>)>,
    /// The pass program's link on the balancer's bridge port; closing it detaches.
    pass_link: Option<OwnedFd>,
}

impl Topology {
    /// Builds the namespaces and starts a sink in each backend. Fails (after tearing down what
    /// it built) if any step fails.
    pub fn build(dir: &Path, switchyard: &Path) -> Result<Topology> {
        ip(&["route", "replace", "blackhole", "198.18.0.0/15"])?;
        remove_stale_namespaces();
        let tag = format!("{PREFIX}{}", std::process::id());
        let mut topo = Topology {
            client: format!("{tag}-client"),
            balancer: format!("{tag}-lb"),
            switch: format!("{tag}-switch"),
            backends: (1..=BACKENDS).map(|i| format!("{tag}-mta{i}")).collect(),
            dir: dir.to_path_buf(),
            switchyard: switchyard.to_path_buf(),
            sinks_kind: "",
            sinks: Vec::new(),
            active: None,
            pass_link: None,
        };
        topo.wire()
            .context("building the benchmark's network namespaces")?;
        topo.start_sinks()
            .context("starting the sinks in the backend namespaces")?;
        Ok(topo)
    }

    /// Every namespace this topology created.
    fn namespaces(&self) -> Vec<&String> {
        let mut all = vec![&self.client, &self.balancer, &self.switch];
        all.extend(self.backends.iter());
        all
    }

    fn wire(&mut self) -> Result<()> {
        for ns in self.namespaces() {
            let _ = ip(&["netns", "del", ns]);
            ip(&["netns", "add", ns])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        let sw = self.switch.clone();
        ip(&["-n", &sw, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &sw, "link", "set", "br0", "up"])?;
        self.plug(&self.client, "pc", &format!("{CLIENT}/24"))?;
        self.plug(&self.balancer, "plb", &format!("{BALANCER}/24"))?;
        // The balancer's XDP program transmits (dsr) and redirects (nat) into this port.
        self.pass_link = Some(in_netns(&sw, || attach_pass("plb"))??);
        for (i, ns) in self.backends.iter().enumerate() {
            self.plug(
                ns,
                &format!("pb{}", i + 1),
                &format!("{}/24", backend_addr(i)),
            )?;
            ip(&["-n", ns, "addr", "add", &format!("{VIP}/32"), "dev", "lo"])?;
            sysctl(ns, "net.ipv4.conf.all.arp_ignore", "1")?;
            sysctl(ns, "net.ipv4.conf.all.arp_announce", "2")?;
        }
        // The client reaches the VIP through the balancer, takes no redirect to a backend, and
        // has ports enough for tens of thousands of short sessions per run.
        let client = &self.client;
        ip(&[
            "-n",
            client,
            "route",
            "add",
            &format!("{VIP}/32"),
            "via",
            &BALANCER.to_string(),
        ])?;
        sysctl(client, "net.ipv4.conf.all.accept_redirects", "0")?;
        sysctl(client, "net.ipv4.conf.eth0.accept_redirects", "0")?;
        let lb = &self.balancer;
        // Forwarding: the routing mode's whole job, and bpf_fib_lookup (nat) wants it too.
        sysctl(lb, "net.ipv4.ip_forward", "1")?;
        sysctl(lb, "net.ipv4.conf.all.send_redirects", "0")?;
        sysctl(lb, "net.ipv4.conf.eth0.send_redirects", "0")?;
        sysctl(lb, "net.ipv4.fib_multipath_hash_policy", "1")?;
        for ns in [client, lb] {
            sysctl(ns, "net.ipv4.ip_local_port_range", "1024 65535")?;
            sysctl(ns, "net.ipv4.tcp_tw_reuse", "1")?;
        }
        Ok(())
    }

    /// A veth from `ns` (eth0 there) to the bridge (`port` there). The host end sends complete
    /// checksums: a veth otherwise hands on TCP segments with only the pseudo-header sum, which
    /// XDP forwards as is (a physical NIC delivers complete checksums).
    fn plug(&self, ns: &str, port: &str, address: &str) -> Result<()> {
        ip(&[
            "link",
            "add",
            "eth0",
            "netns",
            ns,
            "type",
            "veth",
            "peer",
            "name",
            port,
            "netns",
            &self.switch,
        ])?;
        ip(&["-n", &self.switch, "link", "set", port, "master", "br0"])?;
        ip(&["-n", &self.switch, "link", "set", port, "up"])?;
        ip(&["-n", ns, "addr", "add", address, "dev", "eth0"])?;
        ip(&["-n", ns, "link", "set", "eth0", "up"])?;
        ethtool_set(ns, "eth0", ETHTOOL_STXCSUM, 0)?;
        Ok(())
    }

    fn start_sinks(&mut self) -> Result<()> {
        let listen = SocketAddr::from(([0, 0, 0, 0], SMTP_PORT)).to_string();
        let smtp_sink = workspace::find_program("smtp-sink");
        self.sinks_kind = if smtp_sink.is_some() {
            "smtp-sink"
        } else {
            "xtask sink"
        };
        for (i, ns) in self.backends.iter().enumerate() {
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", ns]);
            match &smtp_sink {
                Some(bin) => {
                    cmd.arg(bin).args(["-u", "nobody"]).arg(&listen).arg("1024");
                }
                None => {
                    cmd.arg(std::env::current_exe()?)
                        .args(["sink", "--listen"])
                        .arg(&listen);
                }
            }
            let log = self.dir.join(format!("netns-sink{}.log", i + 1));
            self.sinks
                .push(Supervised::start(&format!("sink in {ns}"), &mut cmd, &log)?);
        }
        for (i, ns) in self.backends.iter().enumerate() {
            let addr = SocketAddr::from((backend_addr(i), SMTP_PORT));
            let code = in_netns(ns, move || {
                children::wait_for_greeting(addr, Duration::from_secs(10))
            })??;
            anyhow::ensure!(code == 220, "sink {addr} in {ns} greeted with {code}");
        }
        Ok(())
    }

    /// Process IDs of the sinks (for their CPU time).
    pub fn sink_pids(&self) -> Vec<u32> {
        self.sinks.iter().map(|s| s.pid()).collect()
    }

    /// The running switchyard of the active mode, if any.
    pub fn balancer_pid(&self) -> Option<u32> {
        self.active
            .as_ref()
            .and_then(|(_, p)| p.as_ref())
            .map(|p| p.pid())
    }

    /// Where the load generator connects in `mode`.
    pub fn target(mode: Mode) -> SocketAddr {
        match mode {
            Mode::Proxy => SocketAddr::from((BALANCER, SMTP_PORT)),
            _ => SocketAddr::from((VIP, SMTP_PORT)),
        }
    }

    /// Switches the balancer to `mode` (a no-op if it is active and still running) and waits
    /// until the VIP greets the client with 220.
    pub fn activate(&mut self, mode: Mode) -> Result<()> {
        if let Some((active, process)) = &mut self.active
            && *active == mode
        {
            if let Some(p) = process {
                p.check_running()?;
            }
            return Ok(());
        }
        self.deactivate();
        let lb = self.balancer.clone();
        let vip = format!("{VIP}/32");
        let mut process = None;
        match mode {
            Mode::Routing => {
                let mut args = vec![
                    "-n".to_string(),
                    lb.clone(),
                    "route".into(),
                    "replace".into(),
                    vip.clone(),
                ];
                for i in 0..BACKENDS {
                    args.extend(["nexthop".into(), "via".into(), backend_addr(i).to_string()]);
                }
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                ip(&args)?;
            }
            Mode::Dsr | Mode::Proxy => process = Some(self.start_switchyard(mode)?),
            Mode::Nat => {
                for ns in &self.backends {
                    ip(&[
                        "-n",
                        ns,
                        "route",
                        "replace",
                        &format!("{CLIENT}/32"),
                        "via",
                        &BALANCER.to_string(),
                    ])?;
                }
                process = Some(self.start_switchyard(mode)?);
            }
        }
        self.active = Some((mode, process));
        self.wait_ready(mode)
    }

    /// Stops the active balancer and undoes what its mode set up.
    fn deactivate(&mut self) {
        if let Some((_, Some(mut p))) = self.active.take() {
            // Graceful: switchyard detaches its XDP program on SIGTERM.
            p.stop(Duration::from_secs(10));
        }
        let lb = &self.balancer;
        let vip = format!("{VIP}/32");
        let _ = ip(&["-n", lb, "route", "del", &vip]);
        for ns in &self.backends {
            let _ = ip(&["-n", ns, "route", "del", &format!("{CLIENT}/32")]);
        }
    }

    fn start_switchyard(&self, mode: Mode) -> Result<Supervised> {
        let cfg = self
            .dir
            .join(format!("switchyard-netns-{}.toml", mode.word()));
        std::fs::write(&cfg, switchyard_config(mode))
            .with_context(|| format!("writing {}", cfg.display()))?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.balancer])
            .arg(&self.switchyard)
            .arg("run")
            .arg("--config")
            .arg(&cfg)
            .env("RUST_LOG", "info");
        let log = self
            .dir
            .join(format!("switchyard-netns-{}.log", mode.word()));
        Supervised::start(
            &format!("switchyard {} in {}", mode.word(), self.balancer),
            &mut cmd,
            &log,
        )
    }

    /// Until the target greets with 220 from the client's namespace (for switchyard: its
    /// program or listener is up and a backend passed its health checks).
    fn wait_ready(&mut self, mode: Mode) -> Result<()> {
        let target = Self::target(mode);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some((_, Some(p))) = &mut self.active {
                p.check_running()?;
            }
            let code = in_netns(&self.client, move || {
                children::wait_for_greeting(target, Duration::from_secs(2))
            })?;
            if let Ok(220) = code {
                return Ok(());
            }
            if Instant::now() > deadline {
                let log = self
                    .dir
                    .join(format!("switchyard-netns-{}.log", mode.word()));
                bail!(
                    "{target} did not greet with 220 within 30 s in mode {} (last: {code:?}); switchyard's log {}:\n{}",
                    mode.word(),
                    log.display(),
                    children::tail(&log, 20)
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        self.deactivate();
        self.pass_link = None;
        for mut s in self.sinks.drain(..) {
            s.stop(Duration::from_secs(5));
        }
        for ns in self.namespaces() {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}

/// The switchyard config of a mode: least_conn over the three sinks, on the VIP.
pub fn switchyard_config(mode: Mode) -> String {
    let (dataplane, xdp) = match mode {
        Mode::Dsr | Mode::Nat => (
            "xdp",
            format!(
                "\n[service.xdp]\ninterface = \"eth0\"\nforwarding = \"{}\"\nbackend_interface = \"eth0\"\n\
                 flow_table_size = 262144\nflow_idle_timeout = \"2m\"\n",
                mode.word()
            ),
        ),
        _ => ("proxy", String::new()),
    };
    let listen = Topology::target(mode);
    let mut cfg = format!(
        "# Written by cargo xtask bench (kernel path, mode {}).\nshutdown_timeout = \"5s\"\n\n[[service]]\n\
         name = \"bench\"\nlisten = \"{listen}\"\ndataplane = \"{dataplane}\"\nalgorithm = \"least_conn\"\n\
         max_connections = 10000\n\n[service.health]\nkind = \"smtp\"\ninterval = \"500ms\"\ntimeout = \"400ms\"\n{xdp}",
        mode.word()
    );
    for i in 0..BACKENDS {
        cfg.push_str(&format!(
            "\n[[service.backend]]\nname = \"mta{}\"\naddress = \"{}\"\n",
            i + 1,
            SocketAddrV4::new(backend_addr(i), SMTP_PORT)
        ));
    }
    cfg
}

/// `ip ARGS`, failing with ip's message.
fn ip(args: &[&str]) -> Result<()> {
    workspace::output(Command::new("ip").args(args)).map(|_| ())
}

fn sysctl(ns: &str, key: &str, value: &str) -> Result<()> {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    let value = value.to_string();
    in_netns(ns, move || {
        std::fs::write(&path, &value).with_context(|| format!("sysctl: writing {value} to {path}"))
    })?
}

/// Deletes `sy-bench-<pid>-…` namespaces whose pid is no longer running (a killed run's).
fn remove_stale_namespaces() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('-').next())
        else {
            continue;
        };
        let Ok(pid) = pid.parse::<u32>() else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = ip(&["netns", "del", &name]);
        }
    }
}

/// Runs `f` on a fresh thread that has entered network namespace `ns` (a namespace switch
/// affects only the calling thread, so the rest of the process stays where it is).
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    let path = PathBuf::from("/run/netns").join(ns);
    let file = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    std::thread::spawn(move || {
        // SAFETY: setns on a valid namespace fd; it changes only this thread's namespace.
        if unsafe { nix::libc::setns(file.as_raw_fd(), nix::libc::CLONE_NEWNET) } != 0 {
            return Err(anyhow::Error::from(std::io::Error::last_os_error())
                .context(format!("setns {}", path.display())));
        }
        Ok(f())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("a thread inside {ns} panicked"))?
}

const ETHTOOL_STXCSUM: u32 = 0x17;

/// Attaches an XDP program that passes every frame to `interface` (of the calling thread's
/// namespace) and returns its link. A veth delivers the frames its peer's XDP program transmits
/// (XDP_TX) promptly only when it runs an XDP program itself: without one they wait in its
/// ring until some other packet wakes it. The program is two instructions (`r0 = XDP_PASS;
/// exit`), loaded with the bpf syscall, so xtask needs neither aya nor switchyard's object.
fn attach_pass(interface: &str) -> Result<OwnedFd> {
    const BPF_PROG_LOAD: nix::libc::c_long = 5;
    const BPF_LINK_CREATE: nix::libc::c_long = 28;
    const BPF_PROG_TYPE_XDP: u32 = 6;
    const BPF_XDP: u32 = 37;
    const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;
    // mov64 r0, 2 (XDP_PASS); exit
    let insns: [u64; 2] = [
        u64::from_le_bytes([0xb7, 0, 0, 0, 2, 0, 0, 0]),
        u64::from_le_bytes([0x95, 0, 0, 0, 0, 0, 0, 0]),
    ];
    let license = c"GPL";
    let bpf = |cmd: nix::libc::c_long, attr: &mut [u64; 18], what: &str| -> Result<OwnedFd> {
        // SAFETY: attr is a zero-padded union bpf_attr of the size passed; the pointers in it
        // (instructions, license) outlive the call.
        let fd = unsafe {
            nix::libc::syscall(
                nix::libc::SYS_bpf,
                cmd,
                attr.as_mut_ptr(),
                std::mem::size_of_val(attr) as u32,
            )
        };
        if fd < 0 {
            bail!(
                "{what} for {interface}: {}",
                std::io::Error::last_os_error()
            );
        }
        // SAFETY: the syscall returned a new file descriptor that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
    };
    let mut attr = [0u64; 18];
    // prog_type, insn_cnt, insns, license (the first 24 bytes of the PROG_LOAD attributes).
    attr[0] = BPF_PROG_TYPE_XDP as u64 | (insns.len() as u64) << 32;
    attr[1] = insns.as_ptr() as u64;
    attr[2] = license.as_ptr() as u64;
    let prog = bpf(BPF_PROG_LOAD, &mut attr, "loading the XDP pass program")?;
    let name = std::ffi::CString::new(interface).context("interface name with a NUL byte")?;
    // SAFETY: name is a NUL-terminated string.
    let index = unsafe { nix::libc::if_nametoindex(name.as_ptr()) };
    anyhow::ensure!(
        index != 0,
        "no interface {interface}: {}",
        std::io::Error::last_os_error()
    );
    let mut attr = [0u64; 18];
    // prog_fd, target_ifindex, attach_type, flags.
    attr[0] = prog.as_raw_fd() as u64 | (index as u64) << 32;
    attr[1] = BPF_XDP as u64 | (XDP_FLAGS_DRV_MODE as u64) << 32;
    bpf(BPF_LINK_CREATE, &mut attr, "attaching the XDP pass program")
}

/// A legacy ethtool "set value" command through SIOCETHTOOL, inside `ns` (no ethtool binary
/// needed).
fn ethtool_set(ns: &str, interface: &str, cmd: u32, data: u32) -> Result<()> {
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        data: *mut EthtoolValue,
        _pad: [u8; 16],
    }
    const SIOCETHTOOL: u64 = 0x8946;
    anyhow::ensure!(interface.len() < 16, "interface name {interface} too long");
    let name = interface.to_string();
    in_netns(ns, move || -> Result<()> {
        let mut value = EthtoolValue { cmd, data };
        let mut req = IfReq {
            name: [0; 16],
            data: &mut value,
            _pad: [0; 16],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        let socket = std::net::UdpSocket::bind("0.0.0.0:0").context("a socket for SIOCETHTOOL")?;
        // SAFETY: req points at a live ifreq whose data points at a live ethtool_value.
        let rc = unsafe { nix::libc::ioctl(socket.as_raw_fd(), SIOCETHTOOL as _, &mut req) };
        if rc != 0 {
            bail!(
                "ethtool command {cmd:#x} on {name}: {}",
                std::io::Error::last_os_error()
            );
        }
        Ok(())
    })?
}
