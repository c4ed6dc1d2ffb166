//! The TOML configuration: the validated types the rest of the program uses, and the two
//! entry points that produce them (`load` a file, `parse` its text). Every error names the
//! file, line and key; a config with errors changes nothing (`check` exits 1, `run` refuses to
//! start).
//!
//! Parsing happens in two steps. serde reads the file into the structs of `schema.rs`, which keep
//! every value's byte span (`toml::Spanned`) and reject unknown keys; a structural problem
//! (TOML syntax, an unknown key, a value of the wrong type) stops there, as serde stops at the
//! first one. `validate.rs` (with `values.rs` for single values) then checks every value and
//! collects *all* remaining problems, each located through its span by `errors.rs`;
//! `summary.rs` renders a valid config for `switchyard check`.

mod announce;
mod errors;
mod limits;
mod schema;
mod summary;
mod validate;
mod values;

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use errors::ConfigErrors;
pub use limits::MAX_PREFIXES;
pub use schema::DEFAULT_ADMIN_SOCKET;

/// A whole, validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub source: PathBuf,
    /// How long active sessions may run on after SIGTERM/SIGINT (top-level `shutdown_timeout`).
    pub shutdown_timeout: Duration,
    /// Worker threads for the userspace proxy (top-level `workers`); `None` = automatic.
    pub workers: Option<u32>,
    /// The Unix socket `switchyard ctl` talks to (`[admin] socket`), a relative one already
    /// resolved against the config file's directory.
    pub admin_socket: PathBuf,
    /// Where the HTTP admin listener serves `/metrics` and the dashboard (`[admin] listen`);
    /// none when unset.
    pub admin_listen: Option<SocketAddr>,
    /// The local BIRD's control socket (`[announce] bird_socket`, a relative one resolved
    /// against the config file's directory); none without an `[announce]` table.
    pub bird_socket: Option<PathBuf>,
    /// The second chance between balancers (`[announce] peers` and `interface`); none
    /// without `peers`.
    pub second_chance: Option<SecondChance>,
    pub services: Vec<ServiceConfig>,
}

/// `[announce] peers` and `interface`: every balancer serving the announced VIPs (this host
/// included), and the interface the routers' traffic arrives on, where a packet this host
/// cannot place is handed to the next balancer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecondChance {
    /// As written (at least two, no duplicates).
    pub peers: Vec<std::net::IpAddr>,
    pub interface: String,
    /// `[announce] peer_port`: the UDP port of the heartbeat between the peers' switchyards.
    pub peer_port: u16,
}

#[derive(Clone, Debug)]
pub struct ServiceConfig {
    pub name: String,
    pub listen: Vec<SocketAddr>,
    /// Where each of `listen` is written (same order), for errors only `run` meets (a port in
    /// use, an address not on this host).
    pub listen_origins: Vec<Origin>,
    pub algorithm: Algorithm,
    pub proxy_protocol: ProxyProtocol,
    /// 0 = unlimited.
    pub max_connections: u32,
    pub connect_timeout: Duration,
    /// How long to wait for a backend's 220 greeting before trying another backend.
    pub greeting_timeout: Duration,
    pub idle_timeout: Duration,
    pub retries: u32,
    pub health: HealthConfig,
    /// Per-source limits and allow/deny lists (`[service.limits]`).
    pub limits: LimitsConfig,
    pub backends: Vec<BackendConfig>,
    /// Which data plane carries this service's traffic.
    pub dataplane: Dataplane,
    /// Present exactly when `dataplane` is [`Dataplane::Xdp`]; then `listen` is one IPv4
    /// VIP:port and every backend address is IPv4.
    pub xdp: Option<XdpConfig>,
    /// With `announce = true`: the BIRD protocol switchyard enables while the service can
    /// take sessions and disables otherwise (`announce_protocol`, or `vip_` + the name).
    pub announce: Option<String>,
}

/// Where a value is written in the config file: `file:line: context: key`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    pub file: PathBuf,
    pub line: usize,
    /// What the value belongs to, as config errors name it (`service "mx"`).
    pub context: String,
    pub key: &'static str,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (file, line, context, key) = (self.file.display(), self.line, &self.context, self.key);
        write!(f, "{file}:{line}: {context}: {key}")
    }
}

impl ServiceConfig {
    /// Where the listen address `address` is written, if it is one of this service's.
    pub fn listen_origin(&self, address: SocketAddr) -> Option<&Origin> {
        let index = self.listen.iter().position(|a| *a == address)?;
        self.listen_origins.get(index)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algorithm {
    RoundRobin,
    WeightedRoundRobin,
    LeastConn,
    IpHash,
    LeastTime,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyProtocol {
    None,
    V1,
    V2,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthConfig {
    pub kind: HealthKind,
    pub interval: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
    pub ehlo: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HealthKind {
    None,
    Tcp,
    Smtp,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendConfig {
    pub name: String,
    pub address: SocketAddr,
    /// 1..=1000.
    pub weight: u32,
    /// 0 = unlimited.
    pub max_connections: u32,
    /// Operator drain: keeps the sessions and flows it has, takes no new ones (both planes).
    pub drain: bool,
    /// New sessions per second this MTA takes at most (0 = no limit); beyond it the backend
    /// is skipped and another takes the session.
    pub max_session_rate: u32,
}

/// The `[service.limits]` table; the default limits nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LimitsConfig {
    /// Concurrent sessions per source (0 = no limit).
    pub per_source_connections: u32,
    /// New sessions per second per source (0 = no limit).
    pub per_source_rate: u32,
    /// Token-bucket depth for `per_source_rate`.
    pub per_source_burst: u32,
    /// What counts as one source: clients in one IPv4 /n (or IPv6 /n) share their limits.
    pub source_prefix_v4: u8,
    pub source_prefix_v6: u8,
    /// When present, only these networks may connect.
    pub allow: Option<Vec<Prefix>>,
    /// Never these (checked before `allow`).
    pub deny: Vec<Prefix>,
    /// Sources tracked at once (the per-source table's bound).
    pub tracked_sources: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            per_source_connections: 0,
            per_source_rate: 0,
            per_source_burst: 1,
            source_prefix_v4: 32,
            source_prefix_v6: 64,
            allow: None,
            deny: Vec::new(),
            tracked_sources: 100_000,
        }
    }
}

impl LimitsConfig {
    /// Whether any per-source limit is set (the table is needed).
    pub fn limits_sources(&self) -> bool {
        self.per_source_connections != 0 || self.per_source_rate != 0
    }

    /// Whether a client at `ip` may connect at all (deny first, then allow if given).
    pub fn admits(&self, ip: IpAddr) -> bool {
        if self.deny.iter().any(|p| p.contains(ip)) {
            return false;
        }
        self.allow
            .as_ref()
            .is_none_or(|allow| allow.iter().any(|p| p.contains(ip)))
    }
}

/// An IP network (`192.0.2.0/24`), as written in `allow` and `deny`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Prefix {
    pub network: IpAddr,
    pub length: u8,
}

impl Prefix {
    /// `ip` with the bits past this prefix's length cleared (when of the same family).
    pub fn masked(&self, ip: IpAddr) -> IpAddr {
        mask(ip, self.length)
    }

    /// Whether `ip` is in this network; an IPv4-mapped IPv6 client (a dual-stack listener)
    /// counts as its IPv4 address.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        ip.is_ipv4() == self.network.is_ipv4() && mask(ip, self.length) == self.network
    }
}

/// `ip` with all but its first `length` bits cleared.
pub fn mask(ip: IpAddr, length: u8) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let bits = u32::from(v4);
            let kept = if length == 0 {
                0
            } else {
                bits & (u32::MAX << (32 - length.min(32)))
            };
            IpAddr::from(std::net::Ipv4Addr::from(kept))
        }
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let kept = if length == 0 {
                0
            } else {
                bits & (u128::MAX << (128 - length.min(128)))
            };
            IpAddr::from(std::net::Ipv6Addr::from(kept))
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dataplane {
    /// The userspace proxy: accepts TCP and relays bytes; needs no privileges.
    Proxy,
    /// The XDP kernel fast path: steers packets of each flow to its backend.
    Xdp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Forwarding {
    /// Direct server return: rewrite the destination MAC; backends hold the VIP and answer
    /// clients directly.
    Dsr,
    /// Destination NAT to the backend; replies are rewritten back to the VIP on the
    /// backend-facing interface.
    Nat,
}

/// How the XDP program is attached (`[service.xdp] mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpMode {
    /// Native (driver) mode where the interfaces forward correctly in it, generic (skb) mode
    /// elsewhere; the log says which and why.
    Auto,
    /// Native mode, or refuse to start where it cannot forward.
    Native,
    /// Generic (skb) mode: works on every interface, slower.
    Generic,
}

/// The `[service.xdp]` table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XdpConfig {
    /// Where client packets arrive.
    pub interface: String,
    pub forwarding: Forwarding,
    /// Where backends are reached (nat); defaults to `interface`.
    pub backend_interface: String,
    /// Entries of the LRU flow table.
    pub flow_table_size: u32,
    /// A flow with no packets for this long (and no FIN/RST seen) is expired and uncounted.
    pub flow_idle_timeout: Duration,
    /// Pin the program's maps and links in bpffs: shutdown leaves the program steering
    /// established flows, and the next start takes them over. The same for every xdp service
    /// (they share one program).
    pub pin: bool,
    /// How the program is attached. The same for every xdp service (they share one program).
    pub mode: XdpMode,
}

/// The largest config file read: far above any real one, and a bound on what a wrong path
/// (a log file, a device) can make us read.
pub const MAX_FILE_SIZE: u64 = 16 << 20;

/// Reads and validates the configuration at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let text = read_file(path).map_err(|e| ConfigErrors {
        errors: vec![format!(
            "{}: cannot read the configuration: {e}",
            path.display()
        )],
    })?;
    parse(path, &text)
}

/// The text of `path`, which must be a regular file of at most [`MAX_FILE_SIZE`] bytes. The
/// type is checked before opening: opening a FIFO blocks until a writer comes, and a device
/// such as /dev/zero never ends.
fn read_file(path: &Path) -> Result<String, String> {
    use std::io::Read;
    let kind = std::fs::metadata(path)
        .map_err(|e| e.to_string())?
        .file_type();
    if !kind.is_file() {
        return Err(format!("it is {}, not a regular file", file_kind(kind)));
    }
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut bytes = Vec::new();
    // One byte more than allowed tells a file at the limit from a longer one.
    file.take(MAX_FILE_SIZE + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| e.to_string())?;
    if bytes.len() as u64 > MAX_FILE_SIZE {
        return Err(format!(
            "it is larger than {} MiB; is this the configuration file?",
            MAX_FILE_SIZE >> 20
        ));
    }
    String::from_utf8(bytes).map_err(|e| {
        format!(
            "it is not UTF-8 text (invalid byte at offset {})",
            e.utf8_error().valid_up_to()
        )
    })
}

fn file_kind(kind: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if kind.is_dir() {
        "a directory"
    } else if kind.is_fifo() {
        "a FIFO (named pipe)"
    } else if kind.is_char_device() {
        "a character device"
    } else if kind.is_block_device() {
        "a block device"
    } else if kind.is_socket() {
        "a socket"
    } else {
        "a special file"
    }
}

/// Validates `text` as the contents of the file `path` (used in messages and `Config::source`).
pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigErrors> {
    let raw: schema::Config = toml::from_str(text).map_err(|e| ConfigErrors {
        errors: vec![errors::structural_error(path, text, e)],
    })?;
    let mut report = errors::Report::new(path, text);
    let config = validate::validate(path, raw, &mut report);
    report.finish().map(|()| config)
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(schema::name_of(schema::ALGORITHMS, *self))
    }
}

impl fmt::Display for ProxyProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(schema::name_of(schema::PROXY_PROTOCOLS, *self))
    }
}

impl fmt::Display for HealthKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(schema::name_of(schema::HEALTH_KINDS, *self))
    }
}

impl fmt::Display for Dataplane {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(schema::name_of(schema::DATAPLANES, *self))
    }
}

impl fmt::Display for XdpMode {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(schema::name_of(schema::XDP_MODES, *self))
    }
}

impl fmt::Display for Forwarding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(schema::name_of(schema::FORWARDINGS, *self))
    }
}
