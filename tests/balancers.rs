//! Several balancers behind a BIRD router with ECMP (`testkit::balancers`): the router learns
//! the VIP from every balancer and spreads new sessions over them; a drained balancer, or one
//! that lost every backend, is withdrawn within the BGP timers and gets no new session; a killed
//! one is routed around; a joining one fails no session. The proxy and the XDP `dsr` path (on
//! the plain network, `mode = "auto"`).
//!
//! Root, BIRD 2 and (for the XDP tests) a binary with the XDP object; without them a loud
//! SKIP, a failure in CI (`CI=true` or `SWITCHYARD_REQUIRE_XDP=1`).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use testkit::balancers::{Balancers, Dataplane, Outcome, SERVICE, Setup, percent};
use testkit::bird::bird_available;
use testkit::smtp_client::HeldSession;

const BIN: &str = env!("CARGO_BIN_EXE_switchyard");
/// The BGP hold time of the testbed's BIRDs: any route change must be done within it.
const HOLD_TIME: Duration = Duration::from_secs(3);

/// The testbed, or `None` after a loud SKIP where it cannot run.
fn testbed(dataplane: Dataplane, algorithm: &'static str, count: usize) -> Option<Balancers> {
    if !bird_available() {
        return None;
    }
    if dataplane == Dataplane::XdpDsr && !testkit::netns::require_xdp(cfg!(switchyard_xdp)) {
        return None;
    }
    let setup = Setup {
        dataplane,
        algorithm,
    };
    Some(Balancers::start(BIN, setup, count).expect("the balancers' testbed"))
}

/// Sessions each balancer gave its backends, summed over the backends.
fn per_balancer(net: &Balancers) -> Vec<u64> {
    net.balancers
        .iter()
        .filter(|b| b.switchyard.is_some())
        .map(|b| b.sessions_per_backend().iter().sum())
        .collect()
}

/// Per running balancer, packets to the VIP its XDP program handed to the stack: what a
/// mid-stream packet of a flow that ECMP moved there, without an entry, becomes unless the
/// program adopts it.
fn passed_to_stack(net: &Balancers) -> Vec<f64> {
    net.balancers
        .iter()
        .filter(|b| b.switchyard.is_some())
        .map(|b| b.xdp_passed())
        .collect()
}

fn failures(outcomes: &[Outcome]) -> Vec<&Outcome> {
    outcomes.iter().filter(|o| o.result.is_err()).collect()
}

fn new_sessions_spread_over_both(dataplane: Dataplane) {
    let Some(net) = testbed(dataplane, "least_conn", 2) else {
        return;
    };
    let outcomes = net.sessions(200, 10);
    let failed = failures(&outcomes);
    assert!(failed.is_empty(), "failed sessions: {failed:?}");

    let shares = per_balancer(&net);
    let total: u64 = shares.iter().sum();
    assert_eq!(total, 200, "sessions counted by the balancers: {shares:?}");
    for (index, share) in shares.iter().enumerate() {
        let pct = percent(*share, total);
        assert!(
            (30.0..=70.0).contains(&pct),
            "balancer {} took {pct:.0} % of the sessions ({shares:?})",
            index + 1
        );
    }
    // Per backend, what the balancers assigned is what the MTAs received.
    let mut assigned = vec![0u64; net.mtas.len()];
    for balancer in &net.balancers {
        for (index, count) in balancer.sessions_per_backend().iter().enumerate() {
            assigned[index] += count;
        }
    }
    assert_eq!(
        assigned,
        net.mta_messages(),
        "balancers' counts vs the MTAs'"
    );
    eprintln!("{dataplane:?}: sessions per balancer {shares:?}, per MTA {assigned:?}");
}

#[test]
fn proxy_router_learns_the_vip_from_both_and_sessions_spread() {
    new_sessions_spread_over_both(Dataplane::Proxy);
}

#[test]
fn xdp_dsr_router_learns_the_vip_from_both_and_sessions_spread() {
    new_sessions_spread_over_both(Dataplane::XdpDsr);
}

/// Opens sessions until at least one goes through each of the running balancers (bounded);
/// returns them with the index of the balancer each went through.
fn held_through_each(net: &Balancers) -> Vec<(HeldSession, usize)> {
    let mut held: Vec<(HeldSession, usize)> = Vec::new();
    for _ in 0..24 {
        let session = HeldSession::open_in(&net.client, testkit::balancers::vip())
            .expect("a held session through the VIP");
        let client = session.local.to_string();
        let through = net
            .balancers
            .iter()
            .position(|b| {
                b.switchyard.is_some() && b.clients(net.setup.dataplane).contains(&client)
            })
            .unwrap_or_else(|| panic!("no balancer holds the session from {client}"));
        held.push((session, through));
        let seen: HashSet<usize> = held.iter().map(|(_, b)| *b).collect();
        if seen.len() == net.balancers.len() && held.len() >= 4 {
            break;
        }
    }
    held
}

/// Finishes every held session; the balancer indexes of those that failed, with the error.
fn finish_all(held: Vec<(HeldSession, usize)>) -> Vec<(usize, String)> {
    held.into_iter()
        .filter_map(|(session, through)| {
            session.finish().err().map(|e| (through, format!("{e:#}")))
        })
        .collect()
}

/// 40 sessions must all succeed and none may reach balancer `index`.
fn new_sessions_avoid(net: &Balancers, index: usize, why: &str) {
    let before = per_balancer(net);
    let outcomes = net.sessions(40, 4);
    let failed = failures(&outcomes);
    assert!(failed.is_empty(), "{why}: failed sessions {failed:?}");
    let after = per_balancer(net);
    assert_eq!(
        after[index],
        before[index],
        "{why}: balancer {} took new sessions ({before:?} -> {after:?})",
        index + 1
    );
}

/// XDP dsr with ip_hash: once the drained balancer's nexthop is gone the router sends its
/// held flows to the other balancer, which has no entry for them and carries them on to the
/// same backend through the Maglev table every balancer shares.
#[test]
fn node_drain_and_no_usable_backend_withdraw_one_balancer_and_held_sessions_finish() {
    let Some(net) = testbed(Dataplane::XdpDsr, "ip_hash", 2) else {
        return;
    };
    let drained = &net.balancers[0];

    let held = held_through_each(&net);
    drained.ctl_ok(&["node", "drain"]);
    let took = net.wait_nexthops(1, "ctl node drain");
    eprintln!("ctl node drain -> nexthop withdrawn in {took:?}");
    assert!(took < HOLD_TIME, "withdrawn after {took:?}");
    new_sessions_avoid(&net, 0, "drained");
    let failed = finish_all(held);
    assert!(
        failed.is_empty(),
        "held sessions failed (balancer index, error): {failed:?}; packets passed to the stack per balancer: {:?}",
        passed_to_stack(&net)
    );
    drained.ctl_ok(&["node", "undrain"]);
    net.wait_nexthops(2, "ctl node undrain");

    // Every backend disabled there: the last one takes the route with it.
    let held = held_through_each(&net);
    let started = Instant::now();
    for mta in ["mta1", "mta2", "mta3"] {
        drained.ctl_ok(&["disable", &format!("{SERVICE}/{mta}")]);
    }
    let took = net.wait_nexthops(1, "every backend disabled");
    eprintln!("last backend disabled -> nexthop withdrawn in {took:?}");
    assert!(started.elapsed() < HOLD_TIME, "withdrawn after {took:?}");
    new_sessions_avoid(&net, 0, "every backend disabled");
    let failed = finish_all(held);
    assert!(
        failed.is_empty(),
        "held sessions failed (balancer index, error): {failed:?}; packets passed to the stack per balancer: {:?}",
        passed_to_stack(&net)
    );
}

/// The proxy: a drained balancer is withdrawn within the BGP timers and gets no new session.
/// Its held sessions are not asserted: once its nexthop is gone the router sends their packets
/// to the other balancer, whose kernel has no socket for them and resets them (a proxy's
/// sessions live on the host that accepted them; only the XDP path with ip_hash can carry
/// such a flow on from another host, see the test above).
#[test]
fn proxy_node_drain_withdraws_one_balancer_and_new_sessions_avoid_it() {
    let Some(net) = testbed(Dataplane::Proxy, "least_conn", 2) else {
        return;
    };
    let held = held_through_each(&net);
    net.balancers[0].ctl_ok(&["node", "drain"]);
    let took = net.wait_nexthops(1, "ctl node drain");
    assert!(took < HOLD_TIME, "withdrawn after {took:?}");
    new_sessions_avoid(&net, 0, "drained");
    let failed = finish_all(held);
    eprintln!(
        "proxy: held sessions that failed after the drain (balancer index, error): {failed:?}"
    );
    assert!(
        failed.iter().all(|(through, _)| *through == 0),
        "held sessions through the balancer still in rotation failed: {failed:?}"
    );
}

/// Balancer 1 killed under load: sessions started once the router dropped it all succeed;
/// held sessions through the survivor finish when `survivors_keep_going`.
fn killed_balancer_is_routed_around(dataplane: Dataplane, algorithm: &'static str) {
    let Some(mut net) = testbed(dataplane, algorithm, 2) else {
        return;
    };
    let held = held_through_each(&net);
    let load = net.load(4000, 4, Duration::from_millis(10));
    std::thread::sleep(Duration::from_millis(500));
    net.kill(0);
    net.wait_nexthops(1, "balancer 1 killed");
    let converged = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    let outcomes = load.finish();
    let late: Vec<&Outcome> = outcomes.iter().filter(|o| o.started >= converged).collect();
    assert!(!late.is_empty(), "no session started after convergence");
    let late_failed: Vec<_> = late.iter().filter(|o| o.result.is_err()).collect();
    let early_failed = failures(&outcomes).len() - late_failed.len();
    eprintln!(
        "{dataplane:?} {algorithm}: {} sessions, {early_failed} failed before the router converged, {} after",
        outcomes.len(),
        late_failed.len()
    );
    assert!(
        late_failed.is_empty(),
        "sessions after convergence failed: {late_failed:?}"
    );
    let failed = finish_all(held);
    eprintln!("held sessions that failed (balancer index, error): {failed:?}");
    if dataplane == Dataplane::XdpDsr {
        eprintln!(
            "packets passed to the stack by the survivor: {:?}",
            passed_to_stack(&net)
        );
        let survivors: Vec<_> = failed.iter().filter(|(b, _)| *b == 1).collect();
        assert!(
            survivors.is_empty(),
            "held sessions through the survivor failed: {survivors:?}"
        );
    }
}

#[test]
fn proxy_a_killed_balancer_is_routed_around() {
    killed_balancer_is_routed_around(Dataplane::Proxy, "least_conn");
}

#[test]
fn xdp_dsr_ip_hash_a_killed_balancer_is_routed_around_and_the_survivors_sessions_go_on() {
    killed_balancer_is_routed_around(Dataplane::XdpDsr, "ip_hash");
}

/// The router's hash-threshold multipath moves some flows of the two running balancers to the
/// new one (and between them): each must be carried on by a balancer without its entry.
#[test]
fn xdp_dsr_ip_hash_a_third_balancer_joins_mid_load_without_a_failed_session() {
    let Some(mut net) = testbed(Dataplane::XdpDsr, "ip_hash", 2) else {
        return;
    };
    let held = held_through_each(&net);
    let load = net.load(4000, 4, Duration::from_millis(10));
    std::thread::sleep(Duration::from_millis(500));
    net.join().expect("a third balancer");
    net.wait_nexthops(3, "a third balancer joined");
    std::thread::sleep(Duration::from_secs(1));
    let outcomes = load.finish();
    let failed = failures(&outcomes);
    let held_failed = finish_all(held);
    let shares = per_balancer(&net);
    eprintln!(
        "join: {} sessions, {} failed; held sessions failed: {held_failed:?}; per balancer {shares:?}; packets passed to the stack per balancer {:?}",
        outcomes.len(),
        failed.len(),
        passed_to_stack(&net)
    );
    assert!(
        shares[2] > 0,
        "the third balancer took no session: {shares:?}"
    );
    assert!(failed.is_empty(), "failed sessions: {failed:?}");
    assert!(
        held_failed.is_empty(),
        "held sessions failed (balancer index, error): {held_failed:?}"
    );
}
