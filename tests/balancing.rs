//! Every balancing algorithm's distribution through the real binary: real SMTP clients on
//! loopback, the `switchyard` process, real SMTP backends that name themselves in their
//! greeting. Exact where the algorithm is deterministic (round robin, weighted ratios, ties),
//! bounded where timing decides (uneven session lengths, response times).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use tokio::task::JoinSet;

use testkit::config_toml::ServiceToml;
use testkit::harness::{Switchyard, free_addr};
use testkit::smtp_client::{Session, SessionOptions, smtp_session, smtp_session_from};
use testkit::smtp_server::{Behaviour, SmtpServer};

/// The binary under test.
const BIN: &str = env!("CARGO_BIN_EXE_switchyard");

/// The service "mx" on `listen` with `algorithm`, checks of kind `health` every 200 ms, in
/// front of `backends` as (backend, weight).
fn config(
    listen: SocketAddr,
    algorithm: &str,
    health: &str,
    backends: &[(&SmtpServer, u32)],
) -> String {
    let service = ServiceToml::new("mx", &[listen])
        .keys(&format!("algorithm = \"{algorithm}\"\nretries = 2"))
        .health(&format!(
            "kind = \"{health}\"\ninterval = \"200ms\"\ntimeout = \"200ms\"\nrise = 1\nfall = 1"
        ));
    backends
        .iter()
        .fold(service, |service, (backend, weight)| {
            service.backend_with(
                backend.name(),
                backend.addr(),
                &format!("weight = {weight}"),
            )
        })
        .to_string()
}

/// Switchyard with the service "mx" on a fresh loopback port, without health checks.
fn start_in_front_of(algorithm: &str, backends: &[(&SmtpServer, u32)]) -> (SocketAddr, Switchyard) {
    let listen = free_addr();
    let sy = Switchyard::start(BIN, &config(listen, algorithm, "none", backends));
    (listen, sy)
}

/// [`start_in_front_of`] with every backend of weight 1.
fn start_unweighted(algorithm: &str, backends: &[SmtpServer]) -> (SocketAddr, Switchyard) {
    let list: Vec<_> = backends.iter().map(|b| (b, 1)).collect();
    start_in_front_of(algorithm, &list)
}

async fn start_backends(names: &[&str], behaviour: Behaviour) -> Vec<SmtpServer> {
    let mut out = Vec::new();
    for name in names {
        out.push(SmtpServer::start(name, behaviour.clone()));
    }
    out
}

/// Runs `total` one-message sessions, `parallel` at a time; returns sessions per backend name.
async fn run_sessions(addr: SocketAddr, total: usize, parallel: usize) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    let mut started = 0;
    let mut running = JoinSet::new();
    while started < total || !running.is_empty() {
        while started < total && running.len() < parallel {
            running.spawn(smtp_session(addr));
            started += 1;
        }
        let name = running
            .join_next()
            .await
            .expect("a running session")
            .expect("session task")
            .expect("session through switchyard");
        *counts.entry(name).or_insert(0) += 1;
    }
    counts
}

fn count(counts: &HashMap<String, usize>, name: &str) -> usize {
    counts.get(name).copied().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_spreads_evenly() {
    let backends = start_backends(&["rr-a", "rr-b", "rr-c"], Behaviour::default()).await;
    let (listen, _sy) = start_unweighted("round_robin", &backends);

    // One at a time, every pick takes the next turn: exactly even.
    let counts = run_sessions(listen, 300, 1).await;
    for b in &backends {
        assert_eq!(count(&counts, b.name()), 100, "{counts:?}");
    }
    // Concurrent sessions share one atomic cursor: still exactly even.
    let counts = run_sessions(listen, 300, 10).await;
    for b in &backends {
        assert_eq!(count(&counts, b.name()), 100, "{counts:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_round_robin_follows_weights() {
    let backends = start_backends(&["wrr-1", "wrr-2", "wrr-3"], Behaviour::default()).await;
    let list: Vec<_> = backends.iter().zip([1, 2, 3]).collect();
    let (listen, _sy) = start_in_front_of("weighted_round_robin", &list);

    let counts = run_sessions(listen, 600, 8).await;
    assert_eq!(count(&counts, "wrr-1"), 100, "{counts:?}");
    assert_eq!(count(&counts, "wrr-2"), 200, "{counts:?}");
    assert_eq!(count(&counts, "wrr-3"), 300, "{counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_conn_sends_new_sessions_around_long_ones() {
    let backends = start_backends(&["lc-a", "lc-b", "lc-c"], Behaviour::default()).await;
    let (listen, _sy) = start_unweighted("least_conn", &backends);

    // Seven long sessions opened one after another: least connections spreads them 3/2/2.
    let mut held = Vec::new();
    for _ in 0..7 {
        held.push(
            Session::open(listen, &SessionOptions::default())
                .await
                .expect("a greeted session through switchyard"),
        );
    }
    let mut load: HashMap<String, usize> = HashMap::new();
    for h in &held {
        *load.entry(h.backend.clone()).or_insert(0) += 1;
    }
    let mut loads: Vec<usize> = load.values().copied().collect();
    loads.sort();
    assert_eq!(loads, vec![2, 2, 3], "long sessions per backend: {load:?}");
    let busiest = load
        .iter()
        .find(|(_, n)| **n == 3)
        .map(|(name, _)| name.clone())
        .expect("a busiest");

    // Short sessions never go to the busiest backend, and the two tied ones take turns
    // (no herding onto one of them).
    let counts = run_sessions(listen, 40, 1).await;
    assert_eq!(
        count(&counts, &busiest),
        0,
        "short sessions went to the busiest backend: {counts:?}"
    );
    for b in &backends {
        if b.name() != busiest {
            assert_eq!(count(&counts, b.name()), 20, "{counts:?}");
        }
    }
    for mut h in held {
        h.quit().await.expect("QUIT answered with 221");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_conn_gives_a_slow_backend_fewer_sessions() {
    // lc-slow delays every reply by 50 ms, so its sessions last ~300 ms while the others'
    // take a millisecond or two: with 6 clients in parallel it carries more open sessions and
    // must get far fewer new ones than the third round robin would give it.
    let slow = SmtpServer::start(
        "lc-slow",
        Behaviour::slow_replies(Duration::from_millis(50)),
    );
    let fast = start_backends(&["lc-fast1", "lc-fast2"], Behaviour::default()).await;
    let list = [(&slow, 1), (&fast[0], 1), (&fast[1], 1)];
    let (listen, _sy) = start_in_front_of("least_conn", &list);

    let counts = run_sessions(listen, 300, 6).await;
    eprintln!("least_conn with a slow backend: {counts:?}");
    let slow_share = count(&counts, "lc-slow") as f64 / 300.0;
    assert!(
        slow_share < 0.15,
        "slow backend got {slow_share:.2} of sessions: {counts:?}"
    );
    assert!(
        count(&counts, "lc-slow") > 0,
        "the slow backend is healthy and must get some: {counts:?}"
    );
    let (f1, f2) = (count(&counts, "lc-fast1"), count(&counts, "lc-fast2"));
    assert!(
        f1.abs_diff(f2) <= 30,
        "fast backends unevenly loaded: {counts:?}"
    );
}

/// Client source addresses 127.0.1.1 ..= 127.0.1.200 (all of 127/8 is local on Linux).
fn client_addrs() -> Vec<IpAddr> {
    (1..=200u8)
        .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 1, i)))
        .collect()
}

/// Each client's backend, 20 clients at a time.
async fn backend_per_client(addr: SocketAddr, clients: &[IpAddr]) -> Vec<String> {
    let mut out = vec![String::new(); clients.len()];
    for (chunk_index, chunk) in clients.chunks(20).enumerate() {
        let mut running = JoinSet::new();
        for (i, &ip) in chunk.iter().enumerate() {
            running.spawn(async move { (i, smtp_session_from(addr, ip).await) });
        }
        while let Some(done) = running.join_next().await {
            let (i, result) = done.expect("session task");
            let name = result.unwrap_or_else(|e| panic!("session from {}: {e:#}", chunk[i]));
            out[chunk_index * 20 + i] = name;
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ip_hash_is_sticky_and_remaps_about_one_nth() {
    let backends = start_backends(&["ih-a", "ih-b", "ih-c", "ih-d"], Behaviour::default()).await;
    let listen = free_addr();
    let list: Vec<_> = backends.iter().map(|b| (b, 1)).collect();
    let _sy = Switchyard::start(BIN, &config(listen, "ip_hash", "tcp", &list));
    let clients = client_addrs();

    let first = backend_per_client(listen, &clients).await;
    let second = backend_per_client(listen, &clients).await;
    assert_eq!(first, second, "ip_hash is not sticky");
    for b in &backends {
        let share = first.iter().filter(|n| *n == b.name()).count();
        assert!(share >= 20, "{} got only {share} of 200 clients", b.name());
    }

    // Take one of four backends out: only its clients move, and they are about a quarter.
    backends[2].stop();
    tokio::time::sleep(Duration::from_millis(800)).await; // health checks mark it down
    let after = backend_per_client(listen, &clients).await;
    let mut moved = 0;
    for ((client, before), now) in clients.iter().zip(&first).zip(&after) {
        assert_ne!(
            now, "ih-c",
            "client {client} still sent to the stopped backend"
        );
        if before != now {
            assert_eq!(
                before, "ih-c",
                "client {client} of a running backend moved ({before} -> {now})"
            );
            moved += 1;
        }
    }
    let fraction = moved as f64 / clients.len() as f64;
    eprintln!(
        "ip_hash: {moved} of {} clients moved when one of 4 backends stopped",
        clients.len()
    );
    assert!(
        (0.12..=0.40).contains(&fraction),
        "moved fraction {fraction}"
    );
    // Its clients spread over the others rather than all onto one.
    let receivers: std::collections::HashSet<_> = first
        .iter()
        .zip(&after)
        .filter(|(b, a)| b != a)
        .map(|(_, a)| a.clone())
        .collect();
    assert!(
        receivers.len() >= 2,
        "all moved clients went to {receivers:?}"
    );

    // And they come back when it returns.
    backends[2].restart();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let back = backend_per_client(listen, &clients).await;
    assert_eq!(back, first, "clients did not return to their backend");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_time_prefers_the_fast_backend() {
    let slow = SmtpServer::start(
        "lt-slow",
        Behaviour::slow_greeting(Duration::from_millis(40)),
    );
    let fast = SmtpServer::start("lt-fast", Behaviour::default());
    let (listen, _sy) = start_in_front_of("least_time", &[(&slow, 1), (&fast, 1)]);

    // Unmeasured backends come first (so each is measured), then the fast one wins.
    let counts = run_sessions(listen, 60, 1).await;
    assert!(
        count(&counts, "lt-slow") >= 1,
        "the slow backend was never measured: {counts:?}"
    );
    assert!(count(&counts, "lt-fast") >= 57, "{counts:?}");

    // Under parallel load the fast backend still takes the bulk: (active + 1) x time.
    let counts = run_sessions(listen, 120, 4).await;
    eprintln!("least_time, 4 in parallel: {counts:?}");
    assert!(count(&counts, "lt-fast") >= 108, "{counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_backend_takes_no_new_sessions_under_any_algorithm() {
    let backends = start_backends(&["dr-a", "dr-b", "dr-c"], Behaviour::default()).await;
    for algorithm in [
        "round_robin",
        "weighted_round_robin",
        "least_conn",
        "ip_hash",
        "least_time",
    ] {
        let listen = free_addr();
        let list: Vec<_> = backends.iter().map(|b| (b, 1)).collect();
        // Healthy by its checks (smtp, every 200 ms), drained by the operator.
        let toml = config(listen, algorithm, "smtp", &list)
            .replace("name = \"dr-b\"\n", "name = \"dr-b\"\ndrain = true\n");
        assert!(toml.contains("drain = true"));
        let _sy = Switchyard::start(BIN, &toml);
        let counts = run_sessions(listen, 30, 3).await;
        assert_eq!(
            count(&counts, "dr-b"),
            0,
            "{algorithm}: the drained backend got sessions: {counts:?}"
        );
        assert_eq!(
            count(&counts, "dr-a") + count(&counts, "dr-c"),
            30,
            "{algorithm}: {counts:?}"
        );
        if algorithm == "round_robin" {
            // The drained backend's turns are spread, not all handed to its neighbour (which
            // would be 10/20). Sessions run 3 at a time, so two concurrent picks can both skip
            // past it: exact halves are not promised, near halves are.
            let a = count(&counts, "dr-a");
            assert!((13..=17).contains(&a), "{algorithm}: {counts:?}");
        }
    }
}
