//! `cargo xtask setup`: the one-time toolchain and package steps a fresh machine of this kind
//! needs, each checked first so that a second run does nothing.
//!
//! bpf-linker is built against the libLLVM inside rustc's own sysroot and cached under
//! `target/tools/bpf-linker-<key>`, the key derived from `rustc -V`; its absolute path is also
//! written to `target/tools/bpf-linker.path`, which proxy/build.rs reads.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::workspace::{self, output, run};

const BPF_LINKER_VERSION: &str = "0.13.0";

/// Debian packages the tests, the benchmark and the demo use (package, what for).
const PACKAGES: &[(&str, &str)] = &[
    ("iproute2", "network namespaces for the XDP tests"),
    (
        "bird2",
        "BIRD 2: the router and balancer of the announcement tests",
    ),
    ("postfix", "smtp-sink and smtp-source"),
    ("haproxy", "benchmark peer"),
    ("nginx-light", "benchmark peer"),
    ("libnginx-mod-stream", "nginx stream module"),
    ("bpftool", "inspecting BPF programs and maps"),
    ("fonts-dejavu-core", "the font of the benchmark chart"),
    ("chromium", "the dashboard's browser test"),
    (
        "prometheus",
        "promtool, which lints the /metrics exposition in the tests",
    ),
];

/// Runs every setup step; returns the path of the bpf-linker binary.
pub fn setup() -> Result<PathBuf> {
    println!("setup: checking the toolchain and packages");
    let mut did = Vec::new();
    if ensure_rust_src()? {
        did.push("added rust-src");
    }
    let (linker, built) = ensure_bpf_linker()?;
    if built {
        did.push("built bpf-linker");
    }
    if ensure_packages()? {
        did.push("installed Debian packages");
    }
    println!("setup: bpf-linker is {}", linker.display());
    if did.is_empty() {
        println!("setup: nothing to do, everything is in place");
    } else {
        println!("setup: done ({})", did.join(", "));
    }
    Ok(linker)
}

fn ensure_rust_src() -> Result<bool> {
    let installed = output(Command::new("rustup").args(["component", "list", "--installed"]))?;
    if installed.lines().any(|l| l.trim().starts_with("rust-src")) {
        println!("  rust-src: installed");
        return Ok(false);
    }
    println!("  rust-src: missing, adding it (the eBPF build compiles core from source)");
    run(Command::new("rustup").args(["component", "add", "rust-src"]))?;
    Ok(true)
}

/// The cache key for tools tied to this exact rustc: "1.95.0-59807616e" from
/// "rustc 1.95.0 (59807616e 2026-04-14)".
pub fn rustc_key(version_line: &str) -> String {
    let cleaned: String = version_line
        .trim()
        .trim_start_matches("rustc ")
        .split(|c: char| c.is_whitespace() || c == '(' || c == ')')
        .filter(|w| !w.is_empty())
        .take(2)
        .collect::<Vec<_>>()
        .join("-")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    cleaned.trim_matches('-').to_string()
}

/// From the sysroot's lib directory listing: the library to link ("LLVM-22-rust-1.95.0-stable")
/// and the bpf-linker feature that matches it ("llvm-22").
pub fn llvm_link_name(lib_files: &[String]) -> Option<(String, String)> {
    lib_files.iter().find_map(|f| {
        let name = f.strip_prefix("lib")?.strip_suffix(".so")?;
        let major = name.strip_prefix("LLVM-")?.split('-').next()?;
        major.parse::<u32>().ok()?;
        Some((name.to_string(), format!("llvm-{major}")))
    })
}

pub fn bpf_linker_dir() -> Result<PathBuf> {
    let version = output(Command::new("rustc").arg("-V"))?;
    Ok(workspace::target_dir()
        .join("tools")
        .join(format!("bpf-linker-{}", rustc_key(&version))))
}

fn ensure_bpf_linker() -> Result<(PathBuf, bool)> {
    let dir = bpf_linker_dir()?;
    let bin = dir.join("bin").join("bpf-linker");
    let built = if bin.is_file() {
        println!(
            "  bpf-linker {BPF_LINKER_VERSION}: cached at {}",
            dir.display()
        );
        false
    } else {
        build_bpf_linker(&dir)?;
        true
    };
    let bin = bin
        .canonicalize()
        .with_context(|| format!("{} missing after install", bin.display()))?;
    write_if_changed(
        &workspace::target_dir()
            .join("tools")
            .join("bpf-linker.path"),
        &format!("{}\n", bin.display()),
    )?;
    Ok((bin, built))
}

fn build_bpf_linker(root: &Path) -> Result<()> {
    let sysroot = output(Command::new("rustc").args(["--print", "sysroot"]))?;
    let lib = PathBuf::from(sysroot.trim()).join("lib");
    let files: Vec<String> = std::fs::read_dir(&lib)
        .with_context(|| format!("listing {}", lib.display()))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    let Some((link_name, feature)) = llvm_link_name(&files) else {
        bail!(
            "no libLLVM-<major>-*.so in {}: this rustc does not ship its LLVM as a shared library, \
             so bpf-linker cannot be built against it",
            lib.display()
        );
    };
    println!(
        "  bpf-linker {BPF_LINKER_VERSION}: building against rustc's {link_name} (about a minute on 2 cores)"
    );
    let rustflags = format!(
        "-L native={lib} -l dylib={link_name} -C link-arg=-Wl,-rpath,{lib}",
        lib = lib.display()
    );
    run(Command::new(workspace::cargo())
        .args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--locked",
        ])
        .args(["--no-default-features", "--features"])
        .arg(format!("{feature},no-llvm-linking"))
        .arg("--root")
        .arg(root)
        .env("RUSTFLAGS", rustflags)
        // Our own workspace's settings must not leak into that build.
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("RUSTC_WRAPPER"))
}

fn write_if_changed(path: &Path, content: &str) -> Result<()> {
    if std::fs::read_to_string(path).ok().as_deref() == Some(content) {
        return Ok(());
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, content).with_context(|| format!("writing {}", path.display()))
}

fn is_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn ensure_packages() -> Result<bool> {
    if workspace::find_program("dpkg-query").is_none() {
        println!(
            "  Debian packages: not a Debian system, skipping (install Postfix, HAProxy, nginx yourself)"
        );
        return Ok(false);
    }
    let missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(p, _)| !is_installed(p))
        .map(|(p, _)| *p)
        .collect();
    if missing.is_empty() {
        println!(
            "  Debian packages: all installed ({})",
            PACKAGES
                .iter()
                .map(|(p, _)| *p)
                .collect::<Vec<_>>()
                .join(", ")
        );
        return Ok(false);
    }
    for (p, why) in PACKAGES.iter().filter(|(p, _)| missing.contains(p)) {
        println!("  Debian package {p} missing ({why})");
    }
    if !workspace::is_root() {
        println!(
            "  not root: install them with\n    sudo apt-get install -y {}\n  (tests and benchmarks that need them say so or skip)",
            missing.join(" ")
        );
        return Ok(false);
    }
    if missing.contains(&"postfix") {
        // Debconf would otherwise ask how to configure a mail system; we want only the tools.
        let mut child = Command::new("debconf-set-selections")
            .stdin(std::process::Stdio::piped())
            .spawn()
            .context("starting debconf-set-selections")?;
        if let Some(stdin) = child.stdin.as_mut() {
            use std::io::Write;
            stdin.write_all(b"postfix postfix/main_mailer_type select No configuration\n")?;
        }
        child.wait()?;
    }
    run(Command::new("apt-get")
        .args(["update", "-q"])
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_comes_from_rustc_version() {
        assert_eq!(
            rustc_key("rustc 1.95.0 (59807616e 2026-04-14)\n"),
            "1.95.0-59807616e"
        );
        assert_eq!(
            rustc_key("rustc 1.96.0-nightly (abc 2026-05-01)"),
            "1.96.0-nightly-abc"
        );
    }

    #[test]
    fn llvm_library_and_feature_come_from_the_sysroot_listing() {
        let files = [
            "librustc_driver-6108105cd7e839cf.so",
            "libLLVM.so.22.1-rust-1.95.0-stable",
            "libLLVM-22-rust-1.95.0-stable.so",
            "rustlib",
        ]
        .map(String::from);
        assert_eq!(
            llvm_link_name(&files),
            Some(("LLVM-22-rust-1.95.0-stable".into(), "llvm-22".into()))
        );
        assert_eq!(llvm_link_name(&["libfoo.so".to_string()]), None);
    }
}
