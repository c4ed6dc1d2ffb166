//! The XDP program's own cost per packet, measured in the kernel with `BPF_PROG_TEST_RUN` on
//! crafted frames (`testkit::xdp_run`), beside `switchyard_pass` (returns XDP_PASS at once) as
//! the floor, in the same run: no network, no driver, only the program.
//!
//! What is measured, on one dsr least_conn service with three backends:
//! - established: the client's ACK of a flow that exists, run `REPEAT` times in a row (the
//!   follow path: flow lookup, refresh, backend entry, counters, MAC rewrite, XDP_TX);
//! - non-VIP: an ACK to a backend's own address (service lookup and nat-reply lookup miss,
//!   XDP_PASS), `REPEAT` times;
//! - new flow: a SYN that creates a flow (selection, flow insert, count). Repeating one SYN
//!   would create a flow only on its first run, so this is `new_flow_syns` distinct SYNs (other
//!   client addresses and ports, a flow table with room for all), one run each; one run per
//!   call includes the kernel's per-call timing overhead, so its floor is measured the same way
//!   (`floor_single_run_ns`: the pass program over the same frames, one run per call).
//!
//! - dropped SYNs (`[service.limits]`, written after the cases above): a SYN from a denied
//!   source (deny-trie hit, XDP_DROP) and a SYN from a source over its rate (per-source entry,
//!   rate check, unit given back, XDP_DROP), `REPEAT` times each: a dropped SYN makes no flow,
//!   so the same frame takes the same path every run. Against the repeated floor.
//!
//! Every repeated figure is the median of [`BATCHES`] calls of `REPEAT` runs.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use anyhow::{Result, ensure};
use switchyard_common::maps::{SourceLimits, algorithm, programs, source_limits};
use testkit::raw_syn::{TCP_ACK, TCP_SYN};
use testkit::xdp_run::{TestBackend, XdpRun, tcp_frame};

use super::results::{Skipped, SynDropCost, XdpCost};

/// Runs per `BPF_PROG_TEST_RUN` call of the repeated cases.
pub const REPEAT: u32 = 1_000_000;
const BATCHES: usize = 5;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const XDP_DROP: u32 = 1;
const VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 100), 25);
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);

/// The measurement, or why it could not be made here (listed as skipped).
pub fn measure_or_skip(quick: bool, skipped: &mut Vec<Skipped>) -> Option<XdpCost> {
    let name = "xdp program cost (BPF_PROG_TEST_RUN)".to_string();
    if !crate::workspace::is_root() {
        skipped.push(Skipped {
            name,
            reason: "needs root (BPF_PROG_TEST_RUN)".into(),
        });
        return None;
    }
    if switchyard::xdp::object().is_none() {
        skipped.push(Skipped {
            name,
            reason: "switchyard built without the XDP object (run cargo xtask setup)".into(),
        });
        return None;
    }
    match measure(if quick { 200_000 } else { 1_000_000 }) {
        Ok(cost) => Some(cost),
        Err(e) => {
            skipped.push(Skipped {
                name,
                reason: format!("{e:#}"),
            });
            None
        }
    }
}

/// Measures every case; `syns` distinct SYNs for the new-flow case.
pub fn measure(syns: u32) -> Result<XdpCost> {
    println!("bench: XDP program cost per packet (BPF_PROG_TEST_RUN, {REPEAT} runs per case)");
    let mut run = XdpRun::load(syns.next_power_of_two().max(1024))?;
    let backends: Vec<TestBackend> = (0..3)
        .map(|i| TestBackend {
            address: SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 11 + i), 25),
            mac: [0x02, 0, 0, 0, 1, 11 + i],
        })
        .collect();
    run.add_dsr_service(VIP, algorithm::LEAST_CONN, &backends)?;

    let client = SocketAddrV4::new(CLIENT, 40000);
    let established = tcp_frame(client, VIP, TCP_ACK);
    let (action, _) = run.run(programs::BALANCE, &tcp_frame(client, VIP, TCP_SYN), 1)?;
    ensure!(
        action == XDP_TX,
        "the first SYN got action {action}, not XDP_TX"
    );
    let non_vip = tcp_frame(
        SocketAddrV4::new(CLIENT, 40001),
        backends[0].address,
        TCP_ACK,
    );

    let floor_ns = repeated(&run, programs::PASS, &established, XDP_PASS)?;
    let established_ns = repeated(&run, programs::BALANCE, &established, XDP_TX)?;
    let non_vip_ns = repeated(&run, programs::BALANCE, &non_vip, XDP_PASS)?;
    let new_flow_ns = one_run_each(&run, programs::BALANCE, syns, XDP_TX)?;
    let floor_single_run_ns = one_run_each(&run, programs::PASS, syns, XDP_PASS)?;
    let mut cost = XdpCost::new(
        REPEAT,
        floor_ns,
        established_ns,
        non_vip_ns,
        u64::from(syns),
        new_flow_ns,
        floor_single_run_ns,
    );
    let drops = syn_drops(&mut run, floor_ns)?;
    println!(
        "  floor {floor_ns:.1} ns, established {established_ns:.1} ns ({:.2}x), non-VIP {non_vip_ns:.1} ns ({:.2}x), new flow {new_flow_ns:.1} ns over a one-run floor of {floor_single_run_ns:.1} ns ({:.2}x)",
        cost.established_vs_floor, cost.non_vip_vs_floor, cost.new_flow_vs_floor
    );
    println!(
        "  dropped SYN: denied {:.1} ns ({:.2}x), over the rate {:.1} ns ({:.2}x)",
        drops.denied_ns, drops.denied_vs_floor, drops.too_fast_ns, drops.too_fast_vs_floor
    );
    cost.syn_drops = Some(drops);
    Ok(cost)
}

/// Limits on service 0 (a deny list, one new flow per hour per source with a burst of 1, so
/// no token comes back during the runs), then the two dropped SYNs: one from the denied
/// network, one from a source whose one token a first SYN took.
fn syn_drops(run: &mut XdpRun, floor_ns: f64) -> Result<SynDropCost> {
    let denied = Ipv4Addr::new(198, 18, 9, 0);
    let limits = SourceLimits {
        flags: source_limits::HAS_DENY | source_limits::TRACKS,
        interval_ns: 3_600_000_000_000,
        tolerance_ns: 3_600_000_000_000,
        mask_v4: u32::MAX,
        mask_v6: [u32::MAX; 4],
        ..SourceLimits::default()
    };
    run.set_limits(0, limits, &[(denied, 24)])?;
    let denied_syn = tcp_frame(
        SocketAddrV4::new(Ipv4Addr::new(198, 18, 9, 7), 40000),
        VIP,
        TCP_SYN,
    );
    let denied_ns = repeated(run, programs::BALANCE, &denied_syn, XDP_DROP)?;
    let fast = Ipv4Addr::new(198, 18, 8, 1);
    let (action, _) = run.run(
        programs::BALANCE,
        &tcp_frame(SocketAddrV4::new(fast, 40000), VIP, TCP_SYN),
        1,
    )?;
    ensure!(
        action == XDP_TX,
        "the source's first SYN got action {action}, not XDP_TX"
    );
    let too_fast_syn = tcp_frame(SocketAddrV4::new(fast, 40001), VIP, TCP_SYN);
    let too_fast_ns = repeated(run, programs::BALANCE, &too_fast_syn, XDP_DROP)?;
    Ok(SynDropCost::new(floor_ns, denied_ns, too_fast_ns))
}

/// Median over [`BATCHES`] calls of `REPEAT` runs of `program` on `frame`, in ns per run.
fn repeated(run: &XdpRun, program: &str, frame: &[u8], expected: u32) -> Result<f64> {
    let mut per_run = Vec::with_capacity(BATCHES);
    for _ in 0..BATCHES {
        let (action, mean) = run.run(program, frame, REPEAT)?;
        ensure!(
            action == expected,
            "{program} returned {action}, expected {expected}"
        );
        per_run.push(nanos(mean));
    }
    per_run.sort_by(f64::total_cmp);
    Ok(per_run[BATCHES / 2])
}

/// Mean over `count` distinct SYNs (a new client address every 50 000 ports) of one run each
/// of `program`, in ns per run.
fn one_run_each(run: &XdpRun, program: &str, count: u32, expected: u32) -> Result<f64> {
    let mut total = Duration::ZERO;
    for i in 0..count {
        let host = 2 + i / 50_000;
        let source = SocketAddrV4::new(
            Ipv4Addr::new(198, 18, (host >> 8) as u8 + 2, host as u8),
            1024 + (i % 50_000) as u16,
        );
        let (action, took) = run.run(program, &tcp_frame(source, VIP, TCP_SYN), 1)?;
        ensure!(
            action == expected,
            "{program} on SYN {i} returned {action}, expected {expected}"
        );
        total += took;
    }
    Ok(nanos(total) / f64::from(count.max(1)))
}

fn nanos(d: Duration) -> f64 {
    d.as_nanos() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The measurement runs, every case takes the path it is meant to (checked by action
    /// inside), and the figures pass results.json's validation.
    #[test]
    fn measures_every_case() {
        if !crate::workspace::is_root() || switchyard::xdp::object().is_none() {
            eprintln!("SKIP: needs root and the XDP object");
            return;
        }
        let cost = measure(20_000).unwrap_or_else(|e| panic!("{e:#}"));
        super::super::results::check_xdp_cost(&cost).unwrap_or_else(|e| panic!("{e:#}"));
    }

    /// The shortcut of an established packet (its service by the flow's index) is taken only
    /// when the route names the packet's VIP: a route naming another VIP, or none, and the
    /// packet takes the `SERVICES` way and still follows its flow.
    #[test]
    fn a_flow_whose_route_names_another_vip_still_follows_its_flow() {
        use switchyard_common::maps::{ServiceKey, ServiceRoute, forwarding};
        if !crate::workspace::is_root() || switchyard::xdp::object().is_none() {
            eprintln!("SKIP: needs root and the XDP object");
            return;
        }
        let mut run = XdpRun::load(1024).unwrap_or_else(|e| panic!("{e:#}"));
        let backend = TestBackend {
            address: SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 11), 25),
            mac: [0x02, 0, 0, 0, 1, 11],
        };
        run.add_dsr_service(VIP, algorithm::LEAST_CONN, &[backend])
            .unwrap_or_else(|e| panic!("{e:#}"));
        let client = SocketAddrV4::new(CLIENT, 40000);
        let action = |run: &XdpRun, flags| {
            run.run(programs::BALANCE, &tcp_frame(client, VIP, flags), 1)
                .unwrap_or_else(|e| panic!("{e:#}"))
                .0
        };
        assert_eq!(action(&run, TCP_SYN), XDP_TX);
        assert_eq!(action(&run, TCP_ACK), XDP_TX);
        let other_vip = ServiceRoute {
            vip: ServiceKey {
                addr: u32::from_ne_bytes([198, 18, 0, 200]),
                ..ServiceKey::default()
            },
            forwarding: forwarding::DSR,
            _pad: 0,
        };
        for route in [other_vip, ServiceRoute::default()] {
            run.set_route(0, route).unwrap_or_else(|e| panic!("{e:#}"));
            assert_eq!(action(&run, TCP_ACK), XDP_TX, "with route {route:?}");
        }
    }
}
