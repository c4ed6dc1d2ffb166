//! The two data planes choose alike: the XDP program, run on crafted SYNs with
//! BPF_PROG_TEST_RUN over maps the control plane wrote (`KernelSync`, `tables`), picks the
//! backend the proxy's `Service::pick` picks over the same state, for every algorithm the
//! kernel runs, with down, drained and full backends, unequal weights and counts among them.
//!
//! What is compared, pick by pick: before each SYN the proxy's selector picks for the SYN's
//! client; the kernel's choice is read from the SYN it rewrote (nat: the destination becomes
//! the backend's address). Both read the same shared active counts, which the kernel raises by
//! one per new flow, so a whole sequence of least_conn picks (ties taking turns) is compared,
//! not one. The kernel keeps its cursors and turns per CPU where the selector keeps one per
//! service: the test pins itself to one CPU, so both start at zero and move alike. (On a busy
//! host each CPU rotates on its own; the choice as a function of cursor or turn is the same.)
//! The proxy's cursor grows without bound while the kernel's is kept reduced to the table: a
//! pick depends on it only modulo the table's length. Not compared: least_time (not in the
//! kernel) and retries after a failed connect (the proxy's `exclude`; the kernel has none).

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use aya::programs::{TestRun, Xdp};
use aya::{Ebpf, TestRunOptions};
use switchyard_common::maps::programs;

use super::XdpPlane;
use super::loader::KernelSync;
use super::tests::{config, own_network_namespace_with_forwarding, require};
use crate::state::{Service, Snapshot};

/// The mixed services' backends: weight, initial active count, and what is special about it.
/// By `active / weight`, 0, 2 and 3 tie at 2 (ties take turns); 1 (drained), 4 (down) and 5
/// (full) would each beat them if they were not skipped.
const MIXED: [(u32, i64, &str); 6] = [
    (1, 2, ""),
    (3, 0, "drain = true\n"),
    (2, 4, ""),
    (5, 10, ""),
    (1, 0, ""),
    (4, 3, "max_connections = 3\n"),
];
const DOWN: usize = 4;
const FULL: usize = 5;

/// The sparse services: this many backends, all drained but two with few table entries, so
/// probes often find nothing and the fallback scan decides (where it starts matters).
const SPARSE: usize = 100;
const SPARSE_UP: [usize; 2] = [10, 60];

const ALGORITHMS: [&str; 4] = [
    "round_robin",
    "weighted_round_robin",
    "least_conn",
    "ip_hash",
];

fn service_toml(index: usize, algorithm: &str, backends: &[(u32, &str)]) -> String {
    let mut text = format!(
        "[[service]]\nname = \"sy-agree-{index}\"\nlisten = \"198.18.0.100:{}\"\n\
         dataplane = \"xdp\"\nalgorithm = \"{algorithm}\"\n\
         [service.health]\nkind = \"tcp\"\nfall = 1\n\
         [service.xdp]\ninterface = \"lo\"\nforwarding = \"nat\"\nflow_table_size = 4096\n",
        2500 + index
    );
    for (i, (weight, extra)) in backends.iter().enumerate() {
        text += &format!(
            "[[service.backend]]\nname = \"b{i}\"\naddress = \"198.18.{}.{}:25\"\nweight = {weight}\n{extra}",
            10 + index,
            1 + i
        );
    }
    text
}

/// Services 0..4: the mixed set per algorithm; 4..8: the sparse set per algorithm.
fn agreement_config() -> String {
    let mixed: Vec<(u32, &str)> = MIXED.iter().map(|&(w, _, extra)| (w, extra)).collect();
    // Heavy drained backends leave the two light ones far apart in the tables.
    let sparse: Vec<(u32, &str)> = (0..SPARSE)
        .map(|i| match SPARSE_UP.iter().position(|&up| up == i) {
            Some(k) => (1 + k as u32, ""),
            None => (5, "drain = true\n"),
        })
        .collect();
    let mut text = String::new();
    for (k, algorithm) in ALGORITHMS.iter().enumerate() {
        text += &service_toml(k, algorithm, &mixed);
    }
    for (k, algorithm) in ALGORITHMS.iter().enumerate() {
        text += &service_toml(ALGORITHMS.len() + k, algorithm, &sparse);
    }
    text
}

/// An Ethernet + IPv4 + TCP SYN from `client` to `vip` (checksums are not the point here).
fn syn_frame(client: SocketAddrV4, vip: SocketAddrV4) -> [u8; 54] {
    let mut f = [0u8; 54];
    f[0..6].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
    f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    f[14] = 0x45;
    f[16..18].copy_from_slice(&40u16.to_be_bytes());
    f[22] = 64;
    f[23] = 6;
    f[26..30].copy_from_slice(&client.ip().octets());
    f[30..34].copy_from_slice(&vip.ip().octets());
    f[34..36].copy_from_slice(&client.port().to_be_bytes());
    f[36..38].copy_from_slice(&vip.port().to_be_bytes());
    f[46] = 5 << 4;
    f[47] = 0x02;
    f[48..50].copy_from_slice(&64240u16.to_be_bytes());
    f
}

/// The backend (index within `service`) the kernel sent `client`'s SYN to, if any.
fn kernel_pick(program: &Xdp, service: &Service, client: SocketAddrV4) -> Option<usize> {
    let SocketAddr::V4(vip) = service.config.listen[0] else {
        panic!("the test's VIPs are IPv4");
    };
    let frame = syn_frame(client, vip);
    let mut out = [0u8; 256];
    let run = program
        .test_run(TestRunOptions {
            data_in: Some(&frame),
            data_out: Some(&mut out),
            ..TestRunOptions::default()
        })
        .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN: {e}"));
    assert!(run.data_size_out as usize >= frame.len());
    let destination = SocketAddrV4::new(
        Ipv4Addr::new(out[30], out[31], out[32], out[33]),
        u16::from_be_bytes([out[36], out[37]]),
    );
    if destination == vip {
        return None;
    }
    let chosen = service
        .backends
        .iter()
        .position(|b| b.config.address == SocketAddr::V4(destination));
    assert!(
        chosen.is_some(),
        "rewritten to {destination}, not a backend"
    );
    chosen
}

/// `picks` SYNs from distinct clients (address and port) through every service: the kernel's
/// choice must be the proxy's.
fn compare(bpf: &Ebpf, snapshot: &Snapshot, round: u16, picks: u16) {
    let program: &Xdp = bpf
        .program(programs::BALANCE)
        .expect("the balance program")
        .try_into()
        .expect("an XDP program");
    for service in &snapshot.services {
        for n in 0..picks {
            let client = SocketAddrV4::new(
                Ipv4Addr::from(0xc612_8000 + u32::from(round) * 4096 + u32::from(n) * 7),
                10_000 + round * 1000 + n,
            );
            let expected = service.pick((*client.ip()).into(), &[]);
            let chosen = kernel_pick(program, service, client);
            assert_eq!(
                chosen, expected,
                "{} ({}), round {round}, pick {n} from {client}: the kernel chose {chosen:?}, the proxy {expected:?}",
                service.config.name, service.config.algorithm,
            );
        }
    }
}

/// Binds this thread to the CPU it runs on, so the kernel's per-CPU cursors are one cursor.
fn pin_to_this_cpu() {
    // SAFETY: plain libc calls on a zeroed cpu_set_t of this thread.
    unsafe {
        let cpu = nix::libc::sched_getcpu();
        assert!(cpu >= 0, "sched_getcpu failed");
        let mut set: nix::libc::cpu_set_t = std::mem::zeroed();
        nix::libc::CPU_SET(cpu as usize, &mut set);
        let rc = nix::libc::sched_setaffinity(0, size_of::<nix::libc::cpu_set_t>(), &set);
        assert_eq!(rc, 0, "sched_setaffinity failed");
    }
}

#[test]
fn the_kernel_chooses_what_the_proxy_chooses_for_every_algorithm() {
    if !require() {
        return;
    }
    // A thread of its own: the pinning must not outlive the test.
    std::thread::spawn(agree)
        .join()
        .expect("the agreement test");
}

fn agree() {
    own_network_namespace_with_forwarding();
    let config = config(&agreement_config());
    let plane = XdpPlane::load(&config).unwrap_or_else(|e| panic!("{e:#}"));
    let counters = plane.counters();
    let snapshot = Snapshot::build(&config, &counters).expect("snapshot");
    for service in &snapshot.services[..ALGORITHMS.len()] {
        let backends = &service.backends;
        let (generation, _) = backends[DOWN].live.health.begin_check();
        assert_eq!(
            backends[DOWN].live.health.record_check(generation, false),
            Some(false)
        );
        for (backend, &(_, active, _)) in backends.iter().zip(&MIXED) {
            counters.add(backend.active.slot(), active);
        }
    }
    let mut bpf = plane.ebpf().lock();
    let mut sync = KernelSync::default();
    sync.run(&mut bpf, &snapshot, true)
        .unwrap_or_else(|e| panic!("{e:#}"));
    pin_to_this_cpu();
    compare(&bpf, &snapshot, 0, 120);

    // States change: a tied backend goes down, the full one has room for one more. The sync
    // rewrites states only; both planes go on from where they are.
    for service in &snapshot.services[..ALGORITHMS.len()] {
        let backends = &service.backends;
        let (generation, _) = backends[0].live.health.begin_check();
        backends[0].live.health.record_check(generation, false);
        counters.add(backends[FULL].active.slot(), -1);
    }
    sync.run(&mut bpf, &snapshot, false)
        .unwrap_or_else(|e| panic!("{e:#}"));
    compare(&bpf, &snapshot, 1, 120);
    drop(bpf);
    plane.shutdown();
}
