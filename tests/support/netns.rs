//! Network-namespace topologies for the kernel fast path's tests: a client, a balancer and
//! three backends running real SMTP servers, joined by veth pairs (and a bridge for the shared
//! L2 segment), all in 198.18.0.0/15 and all named `sy-…-<suffix>`.
//!
//! Safety rules (DEVELOPERS.md): before anything is created the root namespace gets
//! `ip route replace blackhole 198.18.0.0/15`, so nothing addressed to a test host can leave
//! the machine; every namespace, and with it every veth, is deleted by `Drop`, also when the
//! test panics. Work inside a namespace runs on a thread that entered it with `setns` (threads
//! it spawns inherit it); processes enter it before `exec`.
#![allow(dead_code)]

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use testkit::netns::*;

/// The VIP every topology balances.
pub const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const BALANCER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// Balancer's address towards the backends in the nat topology.
pub const BALANCER_INSIDE: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
pub const SMTP_PORT: u16 = 25;

/// Which forwarding layout to build.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// One L2 segment (a bridge): client, balancer and backends; backends hold the VIP on lo.
    Dsr,
    /// Client ↔ balancer on 198.18.0.0/24, balancer ↔ backends on 198.18.1.0/24; backends
    /// route through the balancer.
    Nat,
}

/// The whole test network. Field order is drop order: servers stop before namespaces go.
pub struct Topology {
    /// Pass programs on the veth ends that receive XDP_TX/redirected frames.
    passes: Vec<PassProgram>,
    pub layout: Layout,
    pub suffix: String,
    pub backends: Vec<SmtpServer>,
    pub client: Netns,
    pub balancer: Netns,
    pub backend_ns: Vec<Netns>,
    pub switch: Netns,
    /// Balancer interface facing clients (and backends in dsr).
    pub lb_interface: &'static str,
    /// Balancer interface facing backends (nat).
    pub lb_backend_interface: &'static str,
}

impl Topology {
    pub fn new(layout: Layout, backends: usize) -> Topology {
        must("ip", &["route", "replace", "blackhole", "198.18.0.0/15"]);
        let suffix = suffix();
        let client = Netns::new(format!("sy-c-{suffix}"));
        let balancer = Netns::new(format!("sy-lb-{suffix}"));
        let switch = Netns::new(format!("sy-sw-{suffix}"));
        let backend_ns: Vec<Netns> = (0..backends)
            .map(|i| Netns::new(format!("sy-b{i}-{suffix}")))
            .collect();
        switch.ip(&["link", "add", "br0", "type", "bridge"]);
        switch.ip(&["link", "set", "br0", "up"]);
        let mut topo = Topology {
            passes: Vec::new(),
            layout,
            suffix,
            backends: Vec::new(),
            client,
            balancer,
            backend_ns,
            switch,
            lb_interface: "eth0",
            lb_backend_interface: "eth1",
        };
        match layout {
            Layout::Dsr => topo.build_dsr(),
            Layout::Nat => topo.build_nat(),
        }
        topo
    }

    /// A veth from `ns` (named `inner`) to the switch's bridge (named `port` there). The
    /// switch end runs the pass program so XDP_TX/redirected frames into it are delivered;
    /// the host end sends complete checksums.
    fn plug(switch: &Netns, ns: &Netns, inner: &str, port: &str, address: &str) -> PassProgram {
        must(
            "ip",
            &[
                "link",
                "add",
                inner,
                "netns",
                &ns.name,
                "type",
                "veth",
                "peer",
                "name",
                port,
                "netns",
                &switch.name,
            ],
        );
        switch.ip(&["link", "set", port, "master", "br0"]);
        switch.ip(&["link", "set", port, "up"]);
        ns.ip(&["addr", "add", address, "dev", inner]);
        ns.ip(&["link", "set", inner, "up"]);
        ns.disable_tx_checksum(inner);
        switch.attach_pass(port)
    }

    fn build_dsr(&mut self) {
        let mut passes = Vec::new();
        passes.push(Self::plug(
            &self.switch,
            &self.client,
            "eth0",
            "pc",
            "198.18.0.1/24",
        ));
        passes.push(Self::plug(
            &self.switch,
            &self.balancer,
            "eth0",
            "plb",
            "198.18.0.2/24",
        ));
        // Clients reach the VIP through the balancer; it does not hold the VIP itself.
        self.client
            .ip(&["route", "add", "198.18.0.100/32", "via", "198.18.0.2"]);
        for (i, ns) in self.backend_ns.iter().enumerate() {
            passes.push(Self::plug(
                &self.switch,
                ns,
                "eth0",
                &format!("pb{i}"),
                &format!("198.18.0.{}/24", 11 + i),
            ));
            ns.ip(&["addr", "add", "198.18.0.100/32", "dev", "lo"]);
            // Like LVS-DR real servers: never answer or announce ARP for the VIP.
            ns.sysctl("net.ipv4.conf.all.arp_ignore", "1");
            ns.sysctl("net.ipv4.conf.all.arp_announce", "2");
        }
        self.passes = passes;
    }

    fn build_nat(&mut self) {
        let mut passes = Vec::new();
        must(
            "ip",
            &[
                "link",
                "add",
                "eth0",
                "netns",
                &self.client.name,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &self.balancer.name,
            ],
        );
        self.client
            .ip(&["addr", "add", "198.18.0.1/24", "dev", "eth0"]);
        self.client.ip(&["link", "set", "eth0", "up"]);
        self.client.disable_tx_checksum("eth0");
        self.balancer
            .ip(&["addr", "add", "198.18.0.2/24", "dev", "eth0"]);
        self.balancer.ip(&["link", "set", "eth0", "up"]);
        self.balancer.disable_tx_checksum("eth0");
        // Replies redirected from the backend side arrive at the client's end.
        passes.push(self.client.attach_pass("eth0"));
        // The VIP sits in the client's own /24: route it (and the backends' net) via the balancer.
        self.client
            .ip(&["route", "add", "198.18.0.100/32", "via", "198.18.0.2"]);
        self.client
            .ip(&["route", "add", "198.18.1.0/24", "via", "198.18.0.2"]);
        passes.push(Self::plug(
            &self.switch,
            &self.balancer,
            "eth1",
            "plb",
            "198.18.1.1/24",
        ));
        self.balancer.sysctl("net.ipv4.ip_forward", "1");
        for (i, ns) in self.backend_ns.iter().enumerate() {
            passes.push(Self::plug(
                &self.switch,
                ns,
                "eth0",
                &format!("pb{i}"),
                &format!("198.18.1.{}/24", 11 + i),
            ));
            ns.ip(&["route", "add", "default", "via", "198.18.1.1"]);
        }
        self.passes = passes;
    }

    /// Address of backend `i` (config order).
    pub fn backend_addr(&self, i: usize) -> Ipv4Addr {
        match self.layout {
            Layout::Dsr => Ipv4Addr::new(198, 18, 0, 11 + i as u8),
            Layout::Nat => Ipv4Addr::new(198, 18, 1, 11 + i as u8),
        }
    }

    /// Starts an SMTP server on port 25 in every backend namespace.
    pub fn start_backends(&mut self) {
        for (i, ns) in self.backend_ns.iter().enumerate() {
            let server = SmtpServer::start(
                ns,
                &format!("mta{}", i + 1),
                SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, SMTP_PORT),
            );
            self.backends.push(server);
        }
    }

    /// The `[[service]]` table for this topology (health checks every 500 ms, fall 2).
    pub fn service_toml(&self, name: &str, algorithm: &str) -> String {
        let forwarding = match self.layout {
            Layout::Dsr => "dsr",
            Layout::Nat => "nat",
        };
        let mut text = format!(
            "shutdown_timeout = \"2s\"\n\n[[service]]\nname = \"{name}\"\nlisten = \"{VIP}:{SMTP_PORT}\"\ndataplane = \"xdp\"\nalgorithm = \"{algorithm}\"\n\n[service.health]\nkind = \"smtp\"\ninterval = \"500ms\"\ntimeout = \"400ms\"\nrise = 2\nfall = 2\n\n[service.xdp]\ninterface = \"{}\"\nforwarding = \"{forwarding}\"\nbackend_interface = \"{}\"\nflow_table_size = 65536\nflow_idle_timeout = \"5m\"\n",
            self.lb_interface,
            match self.layout {
                Layout::Dsr => self.lb_interface,
                Layout::Nat => self.lb_backend_interface,
            },
        );
        for i in 0..self.backend_ns.len() {
            text.push_str(&format!(
                "\n[[service.backend]]\nname = \"mta{}\"\naddress = \"{}:{SMTP_PORT}\"\n",
                i + 1,
                self.backend_addr(i)
            ));
        }
        text
    }
}

/// A real SMTP server (greeting, EHLO, MAIL, RCPT, DATA, QUIT) in a namespace: one thread per
/// connection, so sessions can be held open. Records every client address it saw.
pub struct SmtpServer {
    pub name: String,
    state: Arc<ServerState>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Default)]
struct ServerState {
    stop: AtomicBool,
    /// Accepting stopped (a "stopped backend"): new connects are refused.
    paused: AtomicBool,
    peers: Mutex<Vec<SocketAddr>>,
    sessions_completed: AtomicUsize,
    open: AtomicUsize,
}

impl SmtpServer {
    fn start(ns: &Netns, name: &str, address: SocketAddrV4) -> SmtpServer {
        let state = Arc::new(ServerState::default());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = {
            let state = state.clone();
            let name = name.to_string();
            ns.spawn(move || serve(address, name, state, ready_tx))
        };
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("SMTP server listening");
        SmtpServer {
            name: name.to_string(),
            state,
            thread: Some(thread),
        }
    }

    /// Client addresses of every connection, health checks included.
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.state.peers.lock().expect("peers lock").clone()
    }

    /// Connections from `client` (excludes the balancer's health checks).
    pub fn sessions_from(&self, client: Ipv4Addr) -> usize {
        self.peers().iter().filter(|p| p.ip() == client).count()
    }

    pub fn sessions_completed(&self) -> usize {
        self.state.sessions_completed.load(Ordering::SeqCst)
    }

    /// Connections open right now.
    pub fn open(&self) -> usize {
        self.state.open.load(Ordering::SeqCst)
    }

    /// Stops accepting (the listener closes: connects are refused) but keeps open sessions.
    pub fn pause(&self) {
        self.state.paused.store(true, Ordering::SeqCst);
    }
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn serve(
    address: SocketAddrV4,
    name: String,
    state: Arc<ServerState>,
    ready: std::sync::mpsc::Sender<()>,
) {
    let mut listener = Some(TcpListener::bind(address).expect("bind SMTP server"));
    listener.as_ref().map(|l| l.set_nonblocking(true));
    let _ = ready.send(());
    let mut workers = Vec::new();
    while !state.stop.load(Ordering::SeqCst) {
        if state.paused.load(Ordering::SeqCst) {
            listener = None;
        }
        let Some(l) = &listener else {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        };
        match l.accept() {
            Ok((stream, peer)) => {
                state.peers.lock().expect("peers lock").push(peer);
                let state = state.clone();
                let name = name.clone();
                workers.push(std::thread::spawn(move || {
                    state.open.fetch_add(1, Ordering::SeqCst);
                    let completed = smtp_dialogue(stream, &name, &state.stop).unwrap_or(false);
                    if completed {
                        state.sessions_completed.fetch_add(1, Ordering::SeqCst);
                    }
                    state.open.fetch_sub(1, Ordering::SeqCst);
                }));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
    for worker in workers {
        let _ = worker.join();
    }
}

/// Serves one session; `true` when it ended with QUIT after a message.
fn smtp_dialogue(stream: TcpStream, name: &str, stop: &AtomicBool) -> std::io::Result<bool> {
    stream.set_read_timeout(Some(Duration::from_millis(200)))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    writer.write_all(format!("220 {name} ESMTP test\r\n").as_bytes())?;
    let mut in_data = false;
    let mut messages = 0;
    let mut line = String::new();
    let idle_limit = Instant::now() + Duration::from_secs(120);
    loop {
        if stop.load(Ordering::SeqCst) || Instant::now() > idle_limit {
            return Ok(false);
        }
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) => return Ok(false),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                // read_line may have consumed a partial line into `line`; sessions here send
                // whole lines, so just wait again.
                continue;
            }
            Err(e) => return Err(e),
        }
        let command = line.trim_end().to_ascii_uppercase();
        if in_data {
            if command == "." {
                in_data = false;
                messages += 1;
                writer.write_all(b"250 2.0.0 queued\r\n")?;
            }
            continue;
        }
        let reply: &[u8] = if command.starts_with("EHLO") || command.starts_with("HELO") {
            b"250 ok\r\n"
        } else if command.starts_with("MAIL")
            || command.starts_with("RCPT")
            || command.starts_with("RSET")
            || command.starts_with("NOOP")
        {
            b"250 2.1.0 ok\r\n"
        } else if command.starts_with("DATA") {
            in_data = true;
            b"354 go ahead\r\n"
        } else if command.starts_with("QUIT") {
            writer.write_all(b"221 2.0.0 bye\r\n")?;
            let _ = writer.shutdown(Shutdown::Write);
            return Ok(messages > 0);
        } else {
            b"500 5.5.2 what\r\n"
        };
        writer.write_all(reply)?;
    }
}

/// One SMTP transaction to `target` from the calling thread (call it inside the client
/// namespace); holds the session `hold` before QUIT. Returns the backend's name.
pub fn smtp_session(target: SocketAddrV4, hold: Duration) -> Result<String, String> {
    let stream = TcpStream::connect_timeout(&SocketAddr::V4(target), Duration::from_secs(5))
        .map_err(|e| format!("connect {target}: {e}"))?;
    smtp_session_on(stream, hold)
}

/// The same transaction on an already connected stream.
pub fn smtp_session_on(stream: TcpStream, hold: Duration) -> Result<String, String> {
    let mut session = Dialogue::greet(stream)?;
    session.transaction()?;
    std::thread::sleep(hold);
    session.step("QUIT\r\n", 221)?;
    Ok(session.backend)
}

/// A client's side of an SMTP session, step by step.
struct Dialogue {
    writer: TcpStream,
    reader: BufReader<TcpStream>,
    /// The name in the greeting: which backend answered.
    backend: String,
}

impl Dialogue {
    fn greet(stream: TcpStream) -> Result<Dialogue, String> {
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| e.to_string())?;
        let writer = stream.try_clone().map_err(|e| e.to_string())?;
        let mut reader = BufReader::new(stream);
        let greeting = expect(&mut reader, 220)?;
        let backend = greeting
            .split_whitespace()
            .nth(1)
            .unwrap_or_default()
            .to_string();
        Ok(Dialogue {
            writer,
            reader,
            backend,
        })
    }

    fn step(&mut self, send: &str, code: u16) -> Result<String, String> {
        self.writer
            .write_all(send.as_bytes())
            .map_err(|e| format!("send {send:?}: {e}"))?;
        expect(&mut self.reader, code)
    }

    /// EHLO and one message.
    fn transaction(&mut self) -> Result<(), String> {
        self.step("EHLO client.test\r\n", 250)?;
        self.step("MAIL FROM:<a@client.test>\r\n", 250)?;
        self.step("RCPT TO:<b@backend.test>\r\n", 250)?;
        self.step("DATA\r\n", 354)?;
        self.step("Subject: xdp\r\n\r\nthrough the fast path\r\n.\r\n", 250)?;
        Ok(())
    }
}

/// An SMTP session held open from a namespace, with a NOOP every 300 ms so that its flow never
/// idles, until [`HeldSession::finish`] sends a message and QUIT.
pub struct HeldSession {
    /// The backend that greeted.
    pub backend: String,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Result<(), String>>>,
}

impl HeldSession {
    /// Connects from `ns` to `target` and waits for the greeting.
    pub fn open(ns: &Netns, target: SocketAddrV4) -> Result<HeldSession, String> {
        let stop = Arc::new(AtomicBool::new(false));
        let (greeted_tx, greeted_rx) = std::sync::mpsc::channel();
        let thread = {
            let stop = stop.clone();
            ns.spawn(move || {
                let stream =
                    TcpStream::connect_timeout(&SocketAddr::V4(target), Duration::from_secs(5))
                        .map_err(|e| format!("connect {target}: {e}"));
                let mut session = match stream.and_then(Dialogue::greet) {
                    Ok(session) => session,
                    Err(e) => {
                        let _ = greeted_tx.send(Err(e.clone()));
                        return Err(e);
                    }
                };
                let _ = greeted_tx.send(Ok(session.backend.clone()));
                // Bounded: a forgotten session ends by itself after two minutes.
                let deadline = Instant::now() + Duration::from_secs(120);
                while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(300));
                    session.step("NOOP\r\n", 250)?;
                }
                session.transaction()?;
                session.step("QUIT\r\n", 221)?;
                Ok(())
            })
        };
        let backend = greeted_rx
            .recv_timeout(Duration::from_secs(10))
            .map_err(|e| format!("no greeting from {target}: {e}"))??;
        Ok(HeldSession {
            backend,
            stop,
            thread: Some(thread),
        })
    }

    /// Sends a message and QUIT; the session's result.
    pub fn finish(mut self) -> Result<(), String> {
        self.stop.store(true, Ordering::SeqCst);
        match self.thread.take() {
            Some(thread) => thread
                .join()
                .unwrap_or_else(|_| Err("the session thread panicked".into())),
            None => Ok(()),
        }
    }
}

impl Drop for HeldSession {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Sends one bare TCP SYN from `source` to `target` for each source port in `ports`, through a
/// raw socket (call it inside a namespace). With a `source` nobody holds, no RST ever answers
/// the backends' SYN-ACKs: each SYN leaves one open flow in an XDP balancer and nothing else.
/// Paced, so a veth ring never overflows.
pub fn send_syns(source: Ipv4Addr, target: SocketAddrV4, ports: std::ops::Range<u16>) {
    let socket = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::RAW,
        Some(socket2::Protocol::from(nix::libc::IPPROTO_RAW)),
    )
    .expect("raw socket (needs root)");
    let destination: socket2::SockAddr = SocketAddr::V4(target).into();
    for (i, port) in ports.enumerate() {
        let packet = syn_packet(source, target, port, i as u32);
        socket
            .send_to(&packet, &destination)
            .unwrap_or_else(|e| panic!("send a SYN to {target}: {e}"));
        if i % 64 == 63 {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// An IPv4 + TCP SYN with correct checksums.
fn syn_packet(source: Ipv4Addr, target: SocketAddrV4, port: u16, seq: u32) -> [u8; 40] {
    let mut p = [0u8; 40];
    p[0] = 0x45; // IPv4, 20-byte header
    p[2..4].copy_from_slice(&40u16.to_be_bytes());
    p[6] = 0x40; // don't fragment
    p[8] = 64; // TTL
    p[9] = 6; // TCP
    p[12..16].copy_from_slice(&source.octets());
    p[16..20].copy_from_slice(&target.ip().octets());
    let ip_check = checksum(&p[..20], 0);
    p[10..12].copy_from_slice(&ip_check.to_be_bytes());
    p[20..22].copy_from_slice(&port.to_be_bytes());
    p[22..24].copy_from_slice(&target.port().to_be_bytes());
    p[24..28].copy_from_slice(&seq.wrapping_mul(2654435761).to_be_bytes());
    p[32] = 5 << 4; // data offset: 5 words
    p[33] = 0x02; // SYN
    p[34..36].copy_from_slice(&64240u16.to_be_bytes());
    let mut pseudo = 0u32;
    for pair in p[12..20].chunks(2) {
        pseudo += u32::from(u16::from_be_bytes([pair[0], pair[1]]));
    }
    pseudo += 6 + 20;
    let tcp_check = checksum(&p[20..], pseudo);
    p[36..38].copy_from_slice(&tcp_check.to_be_bytes());
    p
}

fn checksum(bytes: &[u8], initial: u32) -> u16 {
    let mut sum = initial;
    for pair in bytes.chunks(2) {
        sum += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn expect(reader: &mut BufReader<TcpStream>, code: u16) -> Result<String, String> {
    let mut line = String::new();
    loop {
        line.clear();
        let n = reader
            .read_line(&mut line)
            .map_err(|e| format!("waiting for {code}: {e}"))?;
        if n == 0 {
            return Err(format!("connection closed waiting for {code}"));
        }
        if line.len() >= 4 && &line[3..4] == "-" {
            continue;
        }
        if !line.starts_with(&code.to_string()) {
            return Err(format!("expected {code}, got {:?}", line.trim_end()));
        }
        return Ok(line.trim_end().to_string());
    }
}

/// The real `switchyard run` inside the balancer namespace.
pub struct Switchyard {
    child: Child,
    dir: tempfile::TempDir,
    log: PathBuf,
    status: Option<ExitStatus>,
}

impl Switchyard {
    /// Starts it and waits (10 s at most) for `ready` in its log.
    pub fn start(ns: &Netns, config: &str, env: &[(&str, &str)], ready: &str) -> Switchyard {
        Self::launch(
            ns.command(env!("CARGO_BIN_EXE_switchyard")),
            config,
            env,
            ready,
        )
    }

    /// Starts it with `bpffs` as its /sys/fs/bpf (for `pin = true`), as [`Switchyard::start`].
    pub fn start_with_bpffs(
        ns: &Netns,
        config: &str,
        bpffs: &PrivateBpffs,
        ready: &str,
    ) -> Switchyard {
        let command = ns.command_with_bpffs(env!("CARGO_BIN_EXE_switchyard"), bpffs.path());
        Self::launch(command, config, &[], ready)
    }

    fn launch(mut command: Command, config: &str, env: &[(&str, &str)], ready: &str) -> Switchyard {
        let dir = tempfile::tempdir().expect("temporary directory");
        let config_path = dir.path().join("switchyard.toml");
        std::fs::write(&config_path, config).expect("write config");
        let log = dir.path().join("stderr.log");
        let stderr = File::create(&log).expect("log file");
        command
            .arg("run")
            .arg("--config")
            .arg(&config_path)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        for (key, value) in env {
            command.env(key, value);
        }
        let child = command.spawn().expect("spawn switchyard");
        let mut sy = Switchyard {
            child,
            dir,
            log,
            status: None,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = sy.log_text();
            if text.contains(ready) {
                break;
            }
            if let Ok(Some(status)) = sy.child.try_wait() {
                sy.status = Some(status);
                panic!("switchyard exited during startup ({status}):\n{text}");
            }
            if Instant::now() > deadline {
                panic!("switchyard did not log {ready:?} within 10 s:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        sy
    }

    pub fn log_text(&self) -> String {
        let mut text = String::new();
        if let Ok(mut f) = File::open(&self.log) {
            let _ = f.read_to_string(&mut text);
        }
        text
    }

    /// SIGTERM and wait (20 s at most).
    pub fn terminate(&mut self) -> ExitStatus {
        if let Some(status) = self.status {
            return status;
        }
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                self.status = Some(status);
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "switchyard did not exit within 20 s of SIGTERM:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Switchyard {
    fn drop(&mut self) {
        if self.status.is_none() && matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
