//! Reloads and runtime changes through the real binary, under real SMTP load: nothing a client
//! started is lost, removed backends take no new sessions, added ones do, listeners come and
//! go without refusing a client on an unchanged address, health and counts carry over.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use testkit::config_toml::{ServiceToml, admin_table};
use testkit::harness::{Switchyard, free_addr};
use testkit::smtp_client::{
    HeldSession, SessionOptions, TEST_MESSAGE, run_session, smtp_session, smtp_session_from,
};
use testkit::smtp_server::{Behaviour, SmtpServer};

/// The binary under test.
const BIN: &str = env!("CARGO_BIN_EXE_switchyard");

/// The service "mx" on `listen` with `algorithm` over `backends` as (server, weight), smtp
/// checks every 200 ms.
fn mx(listen: &[SocketAddr], algorithm: &str, backends: &[(&SmtpServer, u32)]) -> ServiceToml {
    let service = ServiceToml::new("mx", listen)
        .keys(&format!("algorithm = \"{algorithm}\"\nretries = 2"))
        .health("kind = \"smtp\"\ninterval = \"200ms\"\ntimeout = \"200ms\"\nrise = 1\nfall = 2");
    backends.iter().fold(service, |service, (server, weight)| {
        service.backend_with(server.name(), server.addr(), &format!("weight = {weight}"))
    })
}

/// Writes `config` over the running switchyard's file and reloads it with `ctl reload`;
/// returns ctl's output, panicking unless the reload was applied.
fn reload(sy: &Switchyard, config: &str) -> String {
    let output = try_reload(sy, config);
    assert_eq!(
        output.code,
        Some(0),
        "ctl reload failed: {output:?}\nconfig:\n{config}"
    );
    output.stdout
}

fn try_reload(sy: &Switchyard, config: &str) -> testkit::harness::CtlOutput {
    // The same admin socket as at start: it cannot change while running.
    let text = format!("{config}{}", admin_table(sy.admin_socket()));
    std::fs::write(sy.config_dir().join("switchyard.toml"), text).expect("write config");
    sy.ctl(&["reload"])
}

async fn backends(names: &[&str]) -> Vec<SmtpServer> {
    names
        .iter()
        .map(|name| SmtpServer::start(name, Behaviour::default()))
        .collect()
}

/// 50 clients running whole SMTP sessions back to back until `stop`; counts what they sent
/// and every failure.
struct Load {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    failures: Arc<parking_lot::Mutex<Vec<String>>>,
    tasks: tokio::task::JoinSet<()>,
}

impl Load {
    fn start(target: SocketAddr, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..clients {
            let (stop, sent, failures) = (stop.clone(), sent.clone(), failures.clone());
            tasks.spawn(async move {
                let options = SessionOptions::default();
                // Bounded: a stuck test ends after a minute whatever happens.
                let deadline = Instant::now() + Duration::from_secs(60);
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    match run_session(target, &options, TEST_MESSAGE).await {
                        Ok(_) => {
                            sent.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(error) => failures.lock().push(error.to_string()),
                    }
                }
            });
        }
        Load {
            stop,
            sent,
            failures,
            tasks,
        }
    }

    async fn finish(mut self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        while self.tasks.join_next().await.is_some() {}
        let failures = self.failures.lock().clone();
        (self.sent.load(Ordering::Relaxed), failures)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_under_load_lose_no_session_and_follow_the_new_backends() {
    let servers = backends(&["a", "b", "c", "d"]).await;
    let [a, b, c, d] = [&servers[0], &servers[1], &servers[2], &servers[3]];
    let listen = free_addr();
    let file =
        |algorithm: &str, list: &[(&SmtpServer, u32)]| mx(&[listen], algorithm, list).to_string();
    let sy = Switchyard::start(BIN, &file("round_robin", &[(a, 1), (b, 1)]));
    let load = Load::start(listen, 50);
    let started = Instant::now();
    // (config, backends removed by it)
    let steps: Vec<(String, Vec<&SmtpServer>)> = vec![
        (file("round_robin", &[(a, 1), (b, 1), (c, 1)]), vec![]),
        (file("round_robin", &[(b, 1), (c, 1)]), vec![a]),
        (file("weighted_round_robin", &[(b, 1), (c, 3)]), vec![]),
        (file("least_conn", &[(b, 2), (c, 1), (d, 1)]), vec![]),
        ("this is = not [ toml".to_string(), vec![]),
        (file("least_conn", &[(c, 1), (d, 1)]), vec![b]),
        (file("ip_hash", &[(c, 1), (d, 2)]), vec![]),
        (file("round_robin", &[(a, 1), (c, 1), (d, 1)]), vec![]),
        (file("round_robin", &[(a, 1), (d, 1)]), vec![c]),
        (file("least_time", &[(a, 1), (c, 1), (d, 1)]), vec![]),
        (file("round_robin", &[(a, 1), (c, 1), (d, 1)]), vec![]),
    ];
    // After a backend is removed, what it had by then (a moment later: sessions picked just
    // before the swap may still be connecting) must not grow while it stays out.
    let mut removed_at: HashMap<String, usize> = HashMap::new();
    let mut refused = 0;
    for (config, removed) in &steps {
        tokio::time::sleep(Duration::from_millis(900)).await;
        let output = tokio::task::block_in_place(|| try_reload(&sy, config));
        if output.code != Some(0) {
            assert!(
                output.stdout.contains("switchyard.toml")
                    || output.stderr.contains("switchyard.toml"),
                "an invalid file's errors name the file: {output:?}"
            );
            refused += 1;
            continue;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        // Every backend of this config is in; only those removed since are out.
        removed_at.retain(|name, _| !config.contains(&format!("name = \"{name}\"")));
        for server in removed {
            removed_at.insert(server.name().to_string(), server.connections());
        }
        for (name, count) in &removed_at {
            let server = servers.iter().find(|s| s.name() == name).expect("server");
            assert_eq!(
                server.connections(),
                *count,
                "backend {name} got new sessions after a reload removed it"
            );
        }
    }
    assert_eq!(refused, 1, "exactly the invalid file was refused");
    assert!(started.elapsed() >= Duration::from_secs(10));
    let (sent, failures) = load.finish().await;
    assert!(
        failures.is_empty(),
        "{} failed sessions: {:?}\nswitchyard's log:\n{}",
        failures.len(),
        &failures[..failures.len().min(5)],
        sy.stderr_text()
    );
    assert!(sent > 100, "only {sent} sessions in the run");
    assert!(d.connections() > 0, "the added backend d got no session");
    let received: usize = servers.iter().map(|s| s.messages()).sum();
    assert_eq!(
        received as u64, sent,
        "the sinks received exactly what the clients sent"
    );
    let mut sy = sy;
    sy.terminate();
    for (_, backend) in sy.totals().backends() {
        assert_eq!(backend.active, 0, "a count is not back to 0: {backend:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unchanged_listener_never_refuses_during_a_hundred_reloads() {
    let servers = backends(&["a", "b"]).await;
    let [a, b] = [&servers[0], &servers[1]];
    let kept = free_addr();
    let added = free_addr();
    let one = mx(&[kept], "round_robin", &[(a, 1)]).to_string();
    let two = mx(&[kept, added], "round_robin", &[(a, 1), (b, 1)]).to_string();
    let sy = Switchyard::start(BIN, &one);
    let stop = Arc::new(AtomicBool::new(false));
    let connects = {
        let stop = stop.clone();
        tokio::task::spawn_blocking(move || {
            let (mut ok, mut refused) = (0u64, Vec::new());
            let deadline = Instant::now() + Duration::from_secs(60);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                match std::net::TcpStream::connect_timeout(&kept, Duration::from_secs(2)) {
                    Ok(_) => ok += 1,
                    Err(error) => refused.push(error.to_string()),
                }
            }
            (ok, refused)
        })
    };
    for round in 0..100 {
        let config = if round % 2 == 0 { &two } else { &one };
        tokio::task::block_in_place(|| reload(&sy, config));
        let reachable =
            std::net::TcpStream::connect_timeout(&added, Duration::from_secs(1)).is_ok();
        assert_eq!(
            reachable,
            round % 2 == 0,
            "round {round}: the added address must accept after its reload and refuse after its removal"
        );
    }
    stop.store(true, Ordering::Relaxed);
    let (ok, refused) = connects.await.expect("connect loop");
    assert!(
        refused.is_empty(),
        "{} connects refused: {:?}",
        refused.len(),
        &refused[..refused.len().min(3)]
    );
    assert!(ok > 100, "only {ok} connects");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_state_and_held_counts_carry_over_a_reload() {
    let servers = backends(&["a", "b", "c"]).await;
    let [a, b, c] = [&servers[0], &servers[1], &servers[2]];
    let listen = free_addr();
    let sy = Switchyard::start(
        BIN,
        &mx(&[listen], "least_conn", &[(a, 1), (b, 1)]).to_string(),
    );
    // b goes silent: checks take it down.
    b.stop();
    wait_for(|| state_of(&sy, "b") == "down", "b down").await;
    // Two held sessions on a.
    let held: Vec<HeldSession> = (0..2)
        .map(|_| tokio::task::block_in_place(|| HeldSession::open(listen)).expect("held session"))
        .collect();
    assert!(held.iter().all(|h| h.backend == "a"));
    assert_eq!(active_of(&sy, "a"), 2);
    let reply = tokio::task::block_in_place(|| {
        reload(
            &sy,
            &mx(&[listen], "round_robin", &[(a, 2), (b, 1), (c, 1)]).to_string(),
        )
    });
    assert!(reply.contains("backend c added"), "{reply}");
    assert!(reply.contains("backend a weight 1 -> 2"), "{reply}");
    assert_eq!(
        state_of(&sy, "b"),
        "down",
        "a down backend stays down across a reload"
    );
    assert_eq!(active_of(&sy, "a"), 2, "held sessions keep their count");
    // New sessions go to a and c only (b is down).
    for _ in 0..6 {
        let backend = smtp_session(listen).await.expect("session");
        assert_ne!(backend, "b");
    }
    for session in held {
        tokio::task::block_in_place(|| session.finish()).expect("held session finishes");
    }
    assert_eq!(active_of(&sy, "a"), 0);
    // An unchanged file reloads as "no change".
    let again = tokio::task::block_in_place(|| {
        reload(
            &sy,
            &mx(&[listen], "round_robin", &[(a, 2), (b, 1), (c, 1)]).to_string(),
        )
    });
    assert_eq!(again.trim(), "no change");
}

/// `ctl --json show` for service mx.
fn show(sy: &Switchyard) -> switchyard::control::ShowReport {
    let output = sy.ctl(&["--json", "show", "mx"]);
    assert_eq!(output.code, Some(0), "{output:?}");
    serde_json::from_str(&output.stdout).expect("show --json")
}

fn backend_report(sy: &Switchyard, name: &str) -> switchyard::control::BackendReport {
    show(sy).services[0]
        .backends
        .iter()
        .find(|b| b.name == name)
        .cloned()
        .unwrap_or_else(|| panic!("no backend {name}"))
}

fn state_of(sy: &Switchyard, name: &str) -> String {
    backend_report(sy, name).state
}

fn active_of(sy: &Switchyard, name: &str) -> u64 {
    backend_report(sy, name).active
}

async fn wait_for(mut condition: impl FnMut() -> bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !tokio::task::block_in_place(&mut condition) {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Two balancers with the same file choose the same backend for the same client under
/// ip_hash, whatever reloads led each there and in whatever order its file lists the backends:
/// one starts with the final set; the other starts with two backends and reaches the same set,
/// listed in another order, through two reloads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ip_hash_chooses_alike_on_balancers_whatever_reloads_led_there() {
    let servers = backends(&["m1", "m2", "m3", "m4", "m5"]).await;
    let weighted = |order: &[usize]| -> Vec<(&SmtpServer, u32)> {
        order
            .iter()
            .map(|&i| (&servers[i], 1 + i as u32 % 3))
            .collect()
    };
    let (first, second) = (free_addr(), free_addr());
    let _fresh = Switchyard::start(
        BIN,
        &mx(&[first], "ip_hash", &weighted(&[0, 1, 2, 3, 4])).to_string(),
    );
    let reloaded = Switchyard::start(
        BIN,
        &mx(&[second], "ip_hash", &weighted(&[2, 0])).to_string(),
    );
    for order in [&[3, 1, 2][..], &[4, 3, 0, 2, 1][..]] {
        tokio::task::block_in_place(|| {
            reload(
                &reloaded,
                &mx(&[second], "ip_hash", &weighted(order)).to_string(),
            )
        });
    }
    let mut chosen = HashMap::<String, usize>::new();
    for client in 0..200u16 {
        let [high, low] = client.to_be_bytes();
        let source = std::net::IpAddr::from([127, 1, high, low]);
        let on_fresh = smtp_session_from(first, source).await.expect("session");
        let on_reloaded = smtp_session_from(second, source).await.expect("session");
        assert_eq!(on_fresh, on_reloaded, "client {source}");
        *chosen.entry(on_fresh).or_default() += 1;
    }
    // The clients spread: the agreement is not that of a single backend taking everything.
    assert!(chosen.len() >= 4, "{chosen:?}");
}
