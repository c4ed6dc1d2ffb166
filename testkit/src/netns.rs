//! Network namespaces for tests and benchmarks of the kernel path: named namespaces deleted on
//! drop, work and processes run inside them, a private bpffs, per-interface ethtool settings,
//! and the pass-everything XDP program a veth peer needs to receive XDP_TX/redirected frames.
//!
//! Safety rules (DEVELOPERS.md): names start with `sy-`; addresses come from 198.18.0.0/15 and
//! 2001:2::/48, which get a blackhole route in the root namespace before any topology is built;
//! teardown is unconditional (`Drop`, also on panic).
//!
//! Errors: whatever can fail returns `anyhow::Result` with the step in its context (tests
//! `expect` it). Entering a namespace that a live [`Netns`] owns cannot fail short of a broken
//! kernel, so [`Netns::run`], [`Netns::spawn`] and [`Netns::command`] panic there instead.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Context, Result, bail, ensure};

/// Why the kernel-path tests cannot run here, if they cannot.
fn unavailable(object_expected: bool) -> Option<String> {
    if unsafe { nix::libc::geteuid() } != 0 {
        return Some("not root".into());
    }
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        return Some("kernel without BTF".into());
    }
    if Command::new("ip").arg("-V").output().is_err() {
        return Some("iproute2 (`ip`) not installed".into());
    }
    if !object_expected {
        return Some("switchyard was built without the XDP object (eBPF toolchain missing)".into());
    }
    None
}

/// `true` when the test may run; a loud SKIP otherwise, or a panic under
/// SWITCHYARD_REQUIRE_XDP=1 (CI) so a skip can never pass for a success there.
pub fn require_xdp(object_expected: bool) -> bool {
    match unavailable(object_expected) {
        None => true,
        Some(reason) => {
            if std::env::var("SWITCHYARD_REQUIRE_XDP").is_ok_and(|v| v == "1") {
                panic!("SWITCHYARD_REQUIRE_XDP=1 but the kernel path cannot be tested: {reason}");
            }
            eprintln!("\n*** SKIP: kernel fast path NOT tested: {reason} ***\n");
            false
        }
    }
}

/// Runs `program ARGS`; the error carries the command and its stderr.
pub fn run(program: &str, args: &[&str]) -> Result<()> {
    let output = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("starting {program}"))?;
    if !output.status.success() {
        bail!(
            "`{program} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// A unique, short suffix: interface names are limited to 15 bytes.
pub fn suffix() -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{:x}{}",
        std::process::id() % 0xffff,
        NEXT.fetch_add(1, Ordering::SeqCst)
    )
}

/// One named network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: String) -> Result<Netns> {
        ensure!(
            name.starts_with("sy-"),
            "namespace {name}: test namespaces are prefixed sy-"
        );
        let _ = run("ip", &["netns", "del", &name]); // a leftover of a killed run
        run("ip", &["netns", "add", &name])?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `ip -n <ns> ARGS`, failing with ip's message.
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// Runs `f` on a fresh thread inside this namespace and returns its result.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = self.path();
        std::thread::spawn(move || {
            enter(&path);
            f()
        })
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    }

    /// Starts `f` on a thread inside this namespace.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = self.path();
        std::thread::spawn(move || {
            enter(&path);
            f()
        })
    }

    /// Writes a sysctl of this namespace (`net.ipv4.ip_forward` → /proc/sys/net/ipv4/ip_forward).
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        let file = format!("/proc/sys/{}", key.replace('.', "/"));
        let value = value.to_string();
        let name = self.name.clone();
        self.run(move || {
            std::fs::write(&file, &value)
                .with_context(|| format!("sysctl in {name}: writing {value} to {file}"))
        })
    }

    /// Turns transmit checksum offload off: a veth otherwise hands on TCP segments with only
    /// the pseudo-header sum (CHECKSUM_PARTIAL), which XDP cannot see and forwards as is. A
    /// physical NIC delivers complete checksums, so only the test network needs this.
    pub fn disable_tx_checksum(&self, interface: &str) -> Result<()> {
        let interface = interface.to_string();
        self.run(move || ethtool_set(&interface, ETHTOOL_STXCSUM, 0))
    }

    /// Attaches switchyard's pass-everything XDP program to `interface`: a veth delivers
    /// frames that its peer's XDP program transmits (XDP_TX) or redirects only when the
    /// receiving end runs an XDP program itself. Kept attached for the life of the returned
    /// object.
    pub fn attach_pass(&self, interface: &str) -> Result<PassProgram> {
        let interface = interface.to_string();
        let name = self.name.clone();
        let attached = self
            .run(move || attach_pass(&interface))
            .with_context(|| format!("the pass program in {name}"))?;
        Ok(PassProgram {
            _attached: attached,
        })
    }

    /// Builds a command that runs inside this namespace (it enters before `exec`).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let file = File::open(self.path()).unwrap_or_else(|e| panic!("open {}: {e}", self.name));
        let mut command = Command::new(program);
        // SAFETY: setns is async-signal-safe; the fd stays open in the parent until spawn returns
        // because the closure owns it.
        unsafe {
            command.pre_exec(move || {
                if nix::libc::setns(file.as_raw_fd(), nix::libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        command
    }

    /// Like [`Netns::command`], and the process also gets a mount namespace of its own in
    /// which `bpffs` (a bpffs mount of the test's) is `/sys/fs/bpf`: what it pins there stays
    /// private to the test, and the host's /sys/fs/bpf is never touched.
    pub fn command_with_bpffs(
        &self,
        program: impl AsRef<std::ffi::OsStr>,
        bpffs: &Path,
    ) -> Command {
        use std::os::unix::ffi::OsStrExt;
        let mut command = self.command(program);
        let source =
            std::ffi::CString::new(bpffs.as_os_str().as_bytes()).expect("path without NUL");
        // SAFETY: only raw syscalls on memory prepared before fork.
        unsafe {
            command.pre_exec(move || {
                let target = c"/sys/fs/bpf";
                if nix::libc::unshare(nix::libc::CLONE_NEWNS) != 0
                    || nix::libc::mount(
                        std::ptr::null(),
                        c"/".as_ptr(),
                        std::ptr::null(),
                        nix::libc::MS_REC | nix::libc::MS_PRIVATE,
                        std::ptr::null(),
                    ) != 0
                    || nix::libc::mount(
                        source.as_ptr(),
                        target.as_ptr(),
                        std::ptr::null(),
                        nix::libc::MS_BIND,
                        std::ptr::null(),
                    ) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        command
    }
}

/// A bpffs instance of the test's own, mounted on a temporary directory; unmounted on drop.
pub struct PrivateBpffs {
    dir: tempfile::TempDir,
}

impl PrivateBpffs {
    pub fn new() -> Result<PrivateBpffs> {
        let dir = tempfile::tempdir().context("a directory for a private bpffs")?;
        let path = dir
            .path()
            .to_str()
            .context("temporary directory path is not UTF-8")?;
        run("mount", &["-t", "bpf", "bpf", path])?;
        Ok(PrivateBpffs { dir })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for PrivateBpffs {
    fn drop(&mut self) {
        let _ = run("umount", &[self.dir.path().to_str().unwrap_or_default()]);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run("ip", &["netns", "del", &self.name]);
    }
}

fn enter(path: &Path) {
    let file = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    if unsafe { nix::libc::setns(file.as_raw_fd(), nix::libc::CLONE_NEWNET) } != 0 {
        panic!(
            "setns {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
}

const ETHTOOL_STXCSUM: u32 = 0x17;

/// The object the binary embeds.
fn xdp_object() -> Result<&'static [u8]> {
    switchyard::xdp::object().context("switchyard was built without the XDP object")
}

/// A loaded pass program; dropping it detaches.
pub struct PassProgram {
    _attached: aya::Ebpf,
}

fn attach_pass(interface: &str) -> Result<aya::Ebpf> {
    let mut bpf = aya::EbpfLoader::new()
        // Unused by the pass program; kept small.
        .map_max_entries("MAGLEV", 1)
        .map_max_entries("WEIGHTED", 1)
        .map_max_entries("FLOWS", 1)
        .map_max_entries("NAT_REPLIES", 1)
        .load(xdp_object()?)
        .context("loading the XDP object")?;
    let program: &mut aya::programs::Xdp = bpf
        .program_mut("switchyard_pass")
        .context("the object has no switchyard_pass program")?
        .try_into()
        .context("switchyard_pass is not an XDP program")?;
    program.load().context("loading the pass program")?;
    program
        .attach(interface, aya::programs::XdpMode::Driver)
        .with_context(|| format!("attaching the pass program to {interface}"))?;
    Ok(bpf)
}

/// A legacy ethtool "set value" command through SIOCETHTOOL (no ethtool binary needed).
fn ethtool_set(interface: &str, cmd: u32, data: u32) -> Result<()> {
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
    ensure!(interface.len() < 16, "interface name {interface} too long");
    let mut value = EthtoolValue { cmd, data };
    let mut req = IfReq {
        name: [0; 16],
        data: &mut value,
        _pad: [0; 16],
    };
    req.name[..interface.len()].copy_from_slice(interface.as_bytes());
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").context("a socket for SIOCETHTOOL")?;
    // SAFETY: req points at a live ifreq whose data points at a live ethtool_value.
    let rc = unsafe { nix::libc::ioctl(socket.as_raw_fd(), SIOCETHTOOL as _, &mut req) };
    if rc != 0 {
        bail!(
            "ethtool command {cmd:#x} on {interface}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}
