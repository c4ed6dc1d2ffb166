//! Several balancers behind a BIRD router with ECMP (`testkit::balancers`): the router learns
//! the VIP from every balancer and spreads new sessions over them; a drained balancer, or one
//! that lost every backend, is withdrawn within the BGP timers and gets no new session; a killed
//! one is routed around; a joining one fails no session. The proxy and the XDP `dsr` path (on
//! the plain network, `mode = "auto"`). With the second chance (`[announce] peers`), a
//! balancer that gets a packet of a connection it does not know hands it to the next one, so
//! a drained balancer's sessions and those ECMP moves when one joins finish, whatever the
//! algorithm.
//!
//! Root, BIRD 2 and (for the XDP tests and the second chance) a binary with the XDP object;
//! without them a loud SKIP, a failure in CI (`CI=true` or `SWITCHYARD_REQUIRE_XDP=1`).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use testkit::balancers::{Balancers, Dataplane, Outcome, SERVICE, SecondChance, Setup, percent};
use testkit::bird::bird_available;
use testkit::smtp_client::HeldSession;

const BIN: &str = env!("CARGO_BIN_EXE_switchyard");
/// The BGP hold time of the testbed's BIRDs: any route change must be done within it.
const HOLD_TIME: Duration = Duration::from_secs(3);

/// The testbed, or `None` after a loud SKIP where it cannot run.
fn testbed(dataplane: Dataplane, algorithm: &'static str, count: usize) -> Option<Balancers> {
    testbed_where(dataplane, algorithm, count, false)
}

/// The testbed with the second chance: every balancer lists all of them as peers.
fn testbed_with_second_chance(
    dataplane: Dataplane,
    algorithm: &'static str,
    count: usize,
) -> Option<Balancers> {
    testbed_where(dataplane, algorithm, count, true)
}

fn testbed_where(
    dataplane: Dataplane,
    algorithm: &'static str,
    count: usize,
    second_chance: bool,
) -> Option<Balancers> {
    if !bird_available() {
        return None;
    }
    // The second chance runs in the XDP program whatever the data plane.
    let needs_xdp = dataplane == Dataplane::XdpDsr || second_chance;
    if needs_xdp && !testkit::netns::require_xdp(cfg!(switchyard_xdp)) {
        return None;
    }
    let setup = Setup {
        dataplane,
        algorithm,
    };
    let started = if second_chance {
        Balancers::start_with_second_chance(BIN, setup, count)
    } else {
        Balancers::start(BIN, setup, count)
    };
    Some(started.expect("the balancers' testbed"))
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

/// Per running balancer, its second-chance counters from `/metrics`.
fn second_chances(net: &Balancers) -> Vec<SecondChance> {
    net.balancers
        .iter()
        .filter(|b| b.switchyard.is_some())
        .map(|b| b.second_chance())
        .collect()
}

/// Opens at least `least` sessions, and until one goes through each of the running balancers
/// (bounded); returns them with the index of the balancer each went through.
fn held_through_each(net: &Balancers, least: usize) -> Vec<(HeldSession, usize)> {
    let mut held: Vec<(HeldSession, usize)> = Vec::new();
    for _ in 0..least.max(24) {
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
        if seen.len() == net.balancers.len() && held.len() >= least {
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

/// Holds sessions through each balancer, then drains balancer 1: its route goes within the BGP
/// timers and new sessions avoid it. The held sessions, not finished yet.
fn drain_first_while_held(net: &Balancers) -> Vec<(HeldSession, usize)> {
    let held = held_through_each(net, 4);
    net.balancers[0].ctl_ok(&["node", "drain"]);
    let took = net.wait_nexthops(1, "ctl node drain");
    eprintln!("ctl node drain -> nexthop withdrawn in {took:?}");
    assert!(took < HOLD_TIME, "withdrawn after {took:?}");
    new_sessions_avoid(net, 0, "drained");
    held
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

    let held = drain_first_while_held(&net);
    let failed = finish_all(held);
    assert!(
        failed.is_empty(),
        "held sessions failed (balancer index, error): {failed:?}; packets passed to the stack per balancer: {:?}",
        passed_to_stack(&net)
    );
    drained.ctl_ok(&["node", "undrain"]);
    net.wait_nexthops(2, "ctl node undrain");

    // Every backend disabled there: the last one takes the route with it.
    let held = held_through_each(&net, 4);
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

/// The proxy without `[announce] peers`: a drained balancer is withdrawn within the BGP timers
/// and gets no new session. Its held sessions are not asserted: once its nexthop is gone the
/// router sends their packets to the other balancer, whose kernel has no socket for them and
/// resets them (a proxy's sessions live on the host that accepted them; without the second
/// chance only the XDP path with ip_hash carries such a flow on from another host, see the test
/// above; with it, see `proxy_second_chance_node_drain_held_sessions_finish_and_new_ones_avoid_it`).
#[test]
fn proxy_node_drain_withdraws_one_balancer_and_new_sessions_avoid_it() {
    let Some(net) = testbed(Dataplane::Proxy, "least_conn", 2) else {
        return;
    };
    let held = drain_first_while_held(&net);
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
    let held = held_through_each(&net, 4);
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

/// A third balancer joins under load while sessions are held through the first two. The
/// router's hash-threshold multipath moves about half of the flows in progress (to the new
/// balancer and between the old ones): each must be carried on by a balancer without its
/// entry or socket. No session fails and the third takes sessions.
fn a_third_balancer_joins_mid_load(net: &mut Balancers) {
    // A dozen held sessions: that none of them moves is a chance of 1 in 4096.
    let held = held_through_each(net, 12);
    let load = net.load(4000, 4, Duration::from_millis(10));
    std::thread::sleep(Duration::from_millis(500));
    net.join().expect("a third balancer");
    net.wait_nexthops(3, "a third balancer joined");
    std::thread::sleep(Duration::from_secs(1));
    let outcomes = load.finish();
    let failed = failures(&outcomes);
    let held_failed = finish_all(held);
    let shares = per_balancer(net);
    let mut packets = match net.setup.dataplane {
        Dataplane::XdpDsr => format!(
            "passed to the stack per balancer {:?}",
            passed_to_stack(net)
        ),
        Dataplane::Proxy => String::new(),
    };
    if net.has_second_chance() {
        packets.push_str(&format!(
            "; second chance per balancer {:?}",
            second_chances(net)
        ));
    }
    eprintln!(
        "join {:?} {}: {} sessions, {} failed; held sessions failed: {held_failed:?}; per balancer {shares:?}; {packets}",
        net.setup.dataplane,
        net.setup.algorithm,
        outcomes.len(),
        failed.len(),
    );
    assert!(
        shares[2] > 0,
        "the third balancer took no session: {shares:?}"
    );
    assert!(failed.is_empty(), "failed sessions: {failed:?}; {packets}");
    assert!(
        held_failed.is_empty(),
        "held sessions failed (balancer index, error): {held_failed:?}; {packets}"
    );
}

#[test]
fn xdp_dsr_ip_hash_a_third_balancer_joins_mid_load_without_a_failed_session() {
    let Some(mut net) = testbed(Dataplane::XdpDsr, "ip_hash", 2) else {
        return;
    };
    a_third_balancer_joins_mid_load(&mut net);
}

/// On every running balancer `ctl --json show` has the service's `second_chance` with the
/// numbers of its `/metrics`, read between two scrapes that agree (a late packet may move the
/// counters meanwhile).
fn second_chance_shown_as_in_metrics(net: &Balancers) {
    for balancer in net.balancers.iter().filter(|b| b.switchyard.is_some()) {
        let which = balancer.index + 1;
        let mut tries = 0;
        loop {
            let before = balancer.second_chance();
            let shown = balancer.second_chance_shown().unwrap_or_else(|| {
                panic!("balancer {which}: no second_chance for {SERVICE} in ctl --json show")
            });
            if balancer.second_chance() == before {
                assert_eq!(
                    shown, before,
                    "balancer {which}: ctl --json show vs /metrics"
                );
                break;
            }
            tries += 1;
            assert!(tries < 20, "balancer {which}: the counters never settled");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Balancer 1 drained with the second chance: once its nexthop is gone the router sends its
/// held sessions' packets to balancer 2, which has no socket (proxy) or flow entry (xdp, an
/// algorithm other than ip_hash) for them and hands them back to balancer 1 over the segment;
/// every held session finishes. Without the second chance balancer 2 resets them.
fn drained_balancers_sessions_finish_through_the_second_chance(
    dataplane: Dataplane,
    algorithm: &'static str,
) {
    let Some(net) = testbed_with_second_chance(dataplane, algorithm, 2) else {
        return;
    };
    let held = drain_first_while_held(&net);
    let through_drained = held.iter().filter(|(_, through)| *through == 0).count();
    assert!(
        through_drained > 0,
        "no held session went through balancer 1"
    );
    let failed = finish_all(held);
    let counts = second_chances(&net);
    eprintln!(
        "{dataplane:?} {algorithm} drain: {through_drained} held sessions through the drained balancer; failed {failed:?}; second chance per balancer {counts:?}"
    );
    assert!(
        failed.is_empty(),
        "held sessions failed (balancer index, error): {failed:?}; second chance per balancer {counts:?}"
    );
    assert!(
        counts[1].forwarded > 0,
        "balancer 2 forwarded no packet of the drained balancer's sessions: {counts:?}"
    );
    assert!(
        counts[0].delivered > 0,
        "the drained balancer had no packet delivered from its peer: {counts:?}"
    );
    second_chance_shown_as_in_metrics(&net);
}

#[test]
fn proxy_second_chance_node_drain_held_sessions_finish_and_new_ones_avoid_it() {
    drained_balancers_sessions_finish_through_the_second_chance(Dataplane::Proxy, "least_conn");
}

#[test]
fn xdp_dsr_round_robin_second_chance_node_drain_held_flows_finish_and_new_ones_avoid_it() {
    drained_balancers_sessions_finish_through_the_second_chance(Dataplane::XdpDsr, "round_robin");
}

/// A third balancer joins mid-load with the second chance and an algorithm other than
/// ip_hash: the moved sessions are handed to their owner, none fails.
fn joins_mid_load_through_the_second_chance(dataplane: Dataplane, algorithm: &'static str) {
    let Some(mut net) = testbed_with_second_chance(dataplane, algorithm, 2) else {
        return;
    };
    a_third_balancer_joins_mid_load(&mut net);
    let counts = second_chances(&net);
    eprintln!("{dataplane:?} {algorithm} join: second chance per balancer {counts:?}");
    let forwarded: u64 = counts.iter().map(|c| c.forwarded).sum();
    assert!(
        forwarded > 0,
        "no balancer forwarded a moved packet: {counts:?}"
    );
    // Only the two balancers that were there before the join own moved sessions.
    let delivered: u64 = counts[..2].iter().map(|c| c.delivered).sum();
    assert!(
        delivered > 0,
        "no moved packet was delivered to its owner: {counts:?}"
    );
    second_chance_shown_as_in_metrics(&net);
}

#[test]
fn proxy_second_chance_a_third_balancer_joins_mid_load_without_a_failed_session() {
    joins_mid_load_through_the_second_chance(Dataplane::Proxy, "round_robin");
}

#[test]
fn xdp_dsr_round_robin_second_chance_a_third_balancer_joins_mid_load_without_a_failed_session() {
    joins_mid_load_through_the_second_chance(Dataplane::XdpDsr, "round_robin");
}

/// How long after a switchyard dies its peers keep it in their rings at most: 3 s after its
/// last answer to the heartbeat, at the next sync (1 s), plus a probe's wait, with a margin.
const PEER_DEATH_NOTICED: Duration = Duration::from_secs(6);

/// Three balancers with the second chance; balancer 1's switchyard is SIGKILLed while its host
/// stays up and keeps answering ARP; once its peers have had time to notice, its BIRD stops
/// and the router withdraws it. The router's hash-threshold multipath then moves part of
/// balancer 2's sessions to balancer 3, whose next peer in the ring is balancer 1: unless
/// balancer 1 left the ring, 3 hands them to 1's stack, which resets them. Every held session
/// through the survivors (each sends a NOOP every 300 ms) finishes, and new sessions succeed.
#[test]
fn proxy_second_chance_a_killed_switchyard_leaves_the_ring_and_the_survivors_sessions_finish() {
    let Some(mut net) = testbed_with_second_chance(Dataplane::Proxy, "least_conn", 3) else {
        return;
    };
    let held = held_through_each(&net, 36);
    let through_survivors = held.iter().filter(|(_, b)| *b != 0).count();
    net.kill_switchyard(0);
    std::thread::sleep(PEER_DEATH_NOTICED);
    net.balancers[0].bird.stop();
    net.wait_nexthops(2, "balancer 1's BIRD stopped");
    // The held sessions' NOOPs go on through the new paths for a while.
    std::thread::sleep(Duration::from_secs(2));
    let failed = finish_all(held);
    let survivors_failed: Vec<_> = failed.iter().filter(|(b, _)| *b != 0).collect();
    let counts = second_chances(&net);
    eprintln!(
        "killed switchyard: {through_survivors} held sessions through the survivors; failed {failed:?}; second chance per survivor {counts:?}"
    );
    assert!(
        survivors_failed.is_empty(),
        "held sessions through the survivors failed (balancer index, error): {survivors_failed:?}; second chance per survivor {counts:?}"
    );
    let outcomes = net.sessions(40, 4);
    let failed = failures(&outcomes);
    assert!(failed.is_empty(), "new sessions failed: {failed:?}");
}
