//! Builds the XDP program (ebpf/switchyard-xdp) and hands the object to `src/xdp` through
//! OUT_DIR, so that `cargo build` embeds the kernel fast path without manual steps once
//! `cargo xtask setup` has installed the eBPF toolchain (rust-src and bpf-linker).
//!
//! Without that toolchain the build still succeeds: it warns, and the binary is proxy-only (it
//! refuses `dataplane = "xdp"` with the same advice). A compile error in the eBPF crate fails
//! the build. The eBPF crate builds with its own target directory (target/ebpf), since it
//! targets `bpfel-unknown-none` and must not wait on the outer build's lock.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const CFG: &str = "switchyard_xdp";

fn main() {
    println!("cargo::rustc-check-cfg=cfg({CFG})");
    println!("cargo::rerun-if-env-changed=SWITCHYARD_SKIP_EBPF");
    let manifest =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let workspace = manifest
        .parent()
        .expect("proxy/ sits in the workspace")
        .to_path_buf();
    let xdp_crate = workspace.join("ebpf/switchyard-xdp");
    for watched in [
        "ebpf/switchyard-xdp/src",
        "ebpf/switchyard-xdp/Cargo.toml",
        "ebpf/switchyard-xdp/.cargo/config.toml",
        "ebpf/switchyard-common/src",
        "ebpf/switchyard-common/Cargo.toml",
        "target/tools/bpf-linker.path",
    ] {
        println!(
            "cargo::rerun-if-changed={}",
            workspace.join(watched).display()
        );
    }
    if env::var_os("SWITCHYARD_SKIP_EBPF").is_some_and(|v| v == "1") {
        println!(
            "cargo::warning=SWITCHYARD_SKIP_EBPF=1: building a proxy-only switchyard (no XDP fast path)"
        );
        return;
    }

    let Some(linker) = find_linker(&workspace) else {
        missing_toolchain("bpf-linker not found");
        return;
    };
    if !has_rust_src() {
        missing_toolchain("the rust-src component is not installed");
        return;
    }

    let target_dir = workspace.join("target/ebpf");
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let linker_dir = linker.parent().expect("a file has a parent").to_path_buf();
    let path = env::join_paths(
        std::iter::once(linker_dir)
            .chain(env::split_paths(&env::var_os("PATH").unwrap_or_default())),
    )
    .expect("PATH entries are joinable");
    let mut command = Command::new(cargo);
    command
        .current_dir(&xdp_crate)
        .args(["build", "--release", "--target-dir"])
        .arg(&target_dir)
        // The outer build's variables (rustflags, target, profile, wrappers) must not leak in:
        // the eBPF crate's own .cargo/config.toml decides.
        .env_clear()
        .env("PATH", path)
        .env("RUSTC_BOOTSTRAP", "1");
    for keep in [
        "HOME",
        "CARGO_HOME",
        "RUSTUP_HOME",
        "RUSTUP_TOOLCHAIN",
        "CARGO_NET_OFFLINE",
        "TMPDIR",
    ] {
        if let Some(value) = env::var_os(keep) {
            command.env(keep, value);
        }
    }
    let output = match command.output() {
        Ok(output) => output,
        Err(error) => panic!("cannot run cargo to build the XDP program: {error}"),
    };
    if !output.status.success() {
        panic!(
            "building the XDP program (ebpf/switchyard-xdp) failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let object = target_dir.join("bpfel-unknown-none/release/switchyard-xdp");
    let out =
        PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("switchyard-xdp.o");
    if let Err(error) = fs::copy(&object, &out) {
        panic!("cannot copy the XDP object {}: {error}", object.display());
    }
    println!("cargo::rustc-cfg={CFG}");
}

fn missing_toolchain(why: &str) {
    println!(
        "cargo::warning=eBPF toolchain not found ({why}): run `cargo xtask setup`; building a proxy-only switchyard"
    );
}

/// target/tools/bpf-linker.path (written by `cargo xtask setup`), else target/tools/*/bin,
/// else PATH.
fn find_linker(workspace: &Path) -> Option<PathBuf> {
    let recorded = workspace.join("target/tools/bpf-linker.path");
    if let Ok(text) = fs::read_to_string(&recorded) {
        let path = PathBuf::from(text.trim());
        if path.is_file() {
            return Some(path);
        }
    }
    if let Ok(entries) = fs::read_dir(workspace.join("target/tools")) {
        let mut found: Vec<PathBuf> = entries
            .flatten()
            .map(|entry| entry.path().join("bin/bpf-linker"))
            .filter(|path| path.is_file())
            .collect();
        found.sort();
        if let Some(path) = found.pop() {
            return Some(path);
        }
    }
    env::split_paths(&env::var_os("PATH").unwrap_or_default())
        .map(|dir| dir.join("bpf-linker"))
        .find(|path| path.is_file())
}

fn has_rust_src() -> bool {
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let Ok(output) = Command::new(rustc).args(["--print", "sysroot"]).output() else {
        return false;
    };
    let sysroot = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    sysroot
        .join("lib/rustlib/src/rust/library/core/Cargo.toml")
        .is_file()
}
