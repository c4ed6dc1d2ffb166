//! The userspace data path end to end: the real binary between real SMTP clients and real
//! SMTP backends on loopback — failover, 421s, byte-exact relay, half-close, idle timeout,
//! hostile clients, graceful shutdown, IPv6, and no leaked active count afterwards.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use testkit::config_toml::ServiceToml;
use testkit::harness::{Launch, Switchyard, free_addr};
use testkit::smtp_client::{read_greeting, read_reply, smtp_session, smtp_session_hold};
use testkit::smtp_server::{Behaviour, SmtpServer};

/// The binary under test.
const BIN: &str = env!("CARGO_BIN_EXE_switchyard");

const UNAVAILABLE: &str = "421 4.3.2 Service not available\r\n";

/// The service "mx" on `listen`: `service_keys` are extra lines of its table, `health` the
/// `kind` of its checks.
fn mx(listen: &[SocketAddr], service_keys: &str, health: &str) -> ServiceToml {
    ServiceToml::new("mx", listen)
        .keys(service_keys)
        .health(&format!(
            "kind = \"{health}\"\ninterval = \"1s\"\ntimeout = \"1s\"\nrise = 2\nfall = 2"
        ))
}

/// The whole config around `service`: a 10 s shutdown timeout.
fn config(service: ServiceToml) -> String {
    format!("shutdown_timeout = \"10s\"\n{service}")
}

/// Switchyard with the service "mx" on a fresh loopback port in front of `backends`.
fn start_in_front_of(
    backends: &[&SmtpServer],
    service_keys: &str,
    health: &str,
) -> (SocketAddr, Switchyard) {
    let listen = free_addr();
    let toml = config(mx(&[listen], service_keys, health).servers(backends));
    (listen, Switchyard::start(BIN, &toml))
}

/// Switchyard with the service "mx" on a fresh loopback port in front of one backend that is
/// not an [`SmtpServer`].
fn start_in_front_of_addr(name: &str, backend: SocketAddr) -> (SocketAddr, Switchyard) {
    let listen = free_addr();
    let toml = config(mx(&[listen], "", "none").backend(name, backend));
    (listen, Switchyard::start(BIN, &toml))
}

/// Stops the process with SIGTERM (exit 0 expected) and checks the shutdown totals: every
/// backend's active count is back to 0. Returns each backend's `assigned` total.
fn terminate_and_check_counts(sy: &mut Switchyard, names: &[&str]) -> Vec<u64> {
    let status = sy.terminate();
    let log = sy.stderr_text();
    assert!(status.success(), "exit status {status}; stderr:\n{log}");
    assert!(!log.contains("panicked"), "a panic was logged:\n{log}");
    let totals = sy.totals();
    names
        .iter()
        .map(|name| {
            let backend = totals
                .backend("mx", name)
                .unwrap_or_else(|| panic!("no shutdown totals for {name}: {totals:?}"));
            assert_eq!(
                backend.active, 0,
                "backend {name} leaked active sessions: {backend:?}"
            );
            backend.assigned
        })
        .collect()
}

/// SIGTERM and the wait for a successful exit on a blocking thread, so that this runtime's own
/// sessions keep running meanwhile; the stopped process, for its totals.
async fn terminate_off_thread(mut sy: Switchyard) -> Switchyard {
    let (status, sy) = tokio::task::spawn_blocking(move || (sy.terminate(), sy))
        .await
        .expect("terminating thread");
    assert!(
        status.success(),
        "exit status {status}; stderr:\n{}",
        sy.stderr_text()
    );
    sy
}

/// The shutdown totals' active count of backend `name` of the service "mx".
fn active_at_shutdown(sy: &Switchyard, name: &str) -> u64 {
    let totals = sy.totals();
    totals
        .backend("mx", name)
        .unwrap_or_else(|| panic!("no shutdown totals for {name}: {totals:?}"))
        .active
}

/// A connected client that has read its 220 greeting.
async fn open_greeted(addr: SocketAddr) -> BufReader<TcpStream> {
    let mut conn = BufReader::new(TcpStream::connect(addr).await.expect("connect"));
    let (code, text) = read_reply(&mut conn).await.expect("greeting");
    assert_eq!(code, 220, "greeting {text:?}");
    conn
}

/// Reads until EOF (or reset) and returns what came, failing after `limit`.
async fn read_to_close(stream: &mut (impl AsyncReadExt + Unpin), limit: Duration) -> Vec<u8> {
    let mut out = Vec::new();
    let mut chunk = [0u8; 4096];
    tokio::time::timeout(limit, async {
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await
    .expect("connection not closed in time");
    out
}

#[tokio::test]
async fn backend_and_client_helpers_talk_smtp() {
    let backend = SmtpServer::start("mta1", Behaviour::default());
    let name = smtp_session(backend.addr()).await.expect("direct session");
    assert_eq!(name, "mta1");
    assert_eq!(backend.messages(), 1);
    assert_eq!(backend.sessions_completed(), 1);
    backend.stop();
    assert!(read_greeting(backend.addr()).await.is_err());
    backend.restart();
    assert_eq!(
        smtp_session(backend.addr()).await.expect("after restart"),
        "mta1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_when_a_backend_stops_mid_load() {
    let mta1 = SmtpServer::start("mta1", Behaviour::default());
    let mta2 = SmtpServer::start("mta2", Behaviour::default());
    let mta3 = SmtpServer::start("mta3", Behaviour::default());
    let (listen, mut sy) = start_in_front_of(
        &[&mta1, &mta2, &mta3],
        "algorithm = \"round_robin\"\nretries = 2\nconnect_timeout = \"1s\"",
        "smtp",
    );

    const TOTAL: usize = 300;
    const CLIENTS: usize = 40;
    let next = Arc::new(AtomicUsize::new(0));
    let stopped = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let (next, stopped) = (next.clone(), stopped.clone());
        tasks.push(tokio::spawn(async move {
            // (started after the stop, result)
            let mut results = Vec::new();
            while next.fetch_add(1, Ordering::SeqCst) < TOTAL {
                let after_stop = stopped.load(Ordering::SeqCst);
                results.push((after_stop, smtp_session(listen).await));
            }
            results
        }));
    }
    while next.load(Ordering::SeqCst) < TOTAL / 2 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    mta2.stop();
    stopped.store(true, Ordering::SeqCst);

    let mut after_ok = 0;
    let mut before_failed = Vec::new();
    let mut after_failed = Vec::new();
    let mut served_by_mta2_after = 0;
    for task in tasks {
        for (after_stop, result) in task.await.expect("client task") {
            match (after_stop, result) {
                (true, Ok(name)) => {
                    after_ok += 1;
                    if name == "mta2" {
                        served_by_mta2_after += 1;
                    }
                }
                (true, Err(e)) => after_failed.push(format!("{e:#}")),
                (false, Ok(_)) => {}
                (false, Err(e)) => before_failed.push(format!("{e:#}")),
            }
        }
    }
    assert!(
        after_failed.is_empty(),
        "sessions started after the stop failed: {after_failed:?}"
    );
    assert_eq!(served_by_mta2_after, 0);
    assert!(
        after_ok >= TOTAL / 2 - CLIENTS,
        "only {after_ok} sessions after the stop"
    );
    // Only sessions already running on mta2 when it died may fail: at most one per client.
    assert!(
        before_failed.len() <= CLIENTS,
        "{} failures before the stop: {before_failed:?}",
        before_failed.len()
    );
    let delivered = mta1.messages() + mta2.messages() + mta3.messages();
    assert!(
        delivered >= TOTAL - before_failed.len(),
        "{delivered} messages delivered"
    );

    let assigned = terminate_and_check_counts(&mut sy, &["mta1", "mta2", "mta3"]);
    assert_eq!(
        assigned.iter().sum::<u64>() as usize,
        TOTAL,
        "every session was assigned exactly once"
    );
    eprintln!(
        "failover: {} sessions failed before the stop (established on mta2), 0 after",
        before_failed.len()
    );
}

#[tokio::test]
async fn backend_greeting_421_fails_over_unseen_by_clients() {
    let busy = SmtpServer::start("busy", Behaviour::greeting_with(421));
    let mta2 = SmtpServer::start("mta2", Behaviour::default());
    let mta3 = SmtpServer::start("mta3", Behaviour::default());
    // No active checks: greeting failover protects clients from the busy backend, and its
    // refusals take it out of rotation after `fall` (2) of them, for a hold-down of
    // rise × interval (2 s).
    let (listen, mut sy) = start_in_front_of(
        &[&busy, &mta2, &mta3],
        "algorithm = \"round_robin\"\nretries = 2",
        "none",
    );
    for _ in 0..30 {
        let name = smtp_session(listen)
            .await
            .expect("session through switchyard");
        assert_ne!(name, "busy");
    }
    assert!(
        (2..=4).contains(&busy.connections()),
        "the busy backend was tried {} times",
        busy.connections()
    );
    assert_eq!(mta2.messages() + mta3.messages(), 30);
    sy.assert_logged("greeted with 421");
    let assigned = terminate_and_check_counts(&mut sy, &["busy", "mta2", "mta3"]);
    assert_eq!(assigned[0], 0, "a 421-greeting backend is never assigned");
    assert_eq!(assigned.iter().sum::<u64>(), 30);
}

#[tokio::test]
async fn backend_that_hangs_before_greeting_is_skipped() {
    // Accepts, then says nothing.
    let hang = SmtpServer::start("hang", Behaviour::hung());
    let mta2 = SmtpServer::start("mta2", Behaviour::default());
    let (listen, mut sy) = start_in_front_of(
        &[&hang, &mta2],
        "algorithm = \"round_robin\"\nretries = 1\ngreeting_timeout = \"1s\"",
        "none",
    );
    for _ in 0..4 {
        assert_eq!(smtp_session(listen).await.expect("session"), "mta2");
    }
    sy.assert_logged("no greeting from");
    terminate_and_check_counts(&mut sy, &["hang", "mta2"]);
}

#[tokio::test]
async fn no_backend_available_gives_421() {
    let mta1 = SmtpServer::start("mta1", Behaviour::default());
    let mta2 = SmtpServer::start("mta2", Behaviour::default());
    let (listen, mut sy) = start_in_front_of(
        &[&mta1, &mta2],
        "algorithm = \"least_conn\"\nretries = 2",
        "none",
    );
    assert_eq!(
        smtp_session(listen).await.expect("session while up").len(),
        4
    );

    // Every backend greets 421: the client gets our 421 4.3.2, then a clean close.
    mta1.set_greeting_code(421);
    mta2.set_greeting_code(421);
    let mut conn = TcpStream::connect(listen).await.expect("connect");
    let all = read_to_close(&mut conn, Duration::from_secs(10)).await;
    assert_eq!(String::from_utf8_lossy(&all), UNAVAILABLE);

    // Every backend gone.
    mta1.stop();
    mta2.stop();
    let (code, text) = read_greeting(listen).await.expect("a reply, not a reset");
    assert_eq!((code, text.as_str()), (421, UNAVAILABLE));

    // And back.
    mta1.set_greeting_code(220);
    mta1.restart();
    assert_eq!(
        smtp_session(listen).await.expect("session after restart"),
        "mta1"
    );
    terminate_and_check_counts(&mut sy, &["mta1", "mta2"]);
}

#[tokio::test]
async fn max_connections_gives_421_beyond_the_limit() {
    let mta1 = SmtpServer::start("mta1", Behaviour::default());
    let (listen, mut sy) = start_in_front_of(&[&mta1], "max_connections = 2", "none");
    let first = open_greeted(listen).await;
    let second = open_greeted(listen).await;
    let mut third = TcpStream::connect(listen).await.expect("connect");
    let all = read_to_close(&mut third, Duration::from_secs(10)).await;
    assert_eq!(String::from_utf8_lossy(&all), UNAVAILABLE);
    assert_eq!(
        mta1.connections(),
        2,
        "the rejected client never reached a backend"
    );

    drop(first);
    // The slot comes back once the proxy has seen the close.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match smtp_session(listen).await {
            Ok(_) => break,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("no slot freed: {e:#}"),
        }
    }
    drop(second);
    terminate_and_check_counts(&mut sy, &["mta1"]);
}

/// A backend that greets with a multi-line reply and then echoes every byte back.
async fn echo_backend(greeting: &'static [u8]) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                stream.write_all(greeting).await?;
                let (mut r, mut w) = stream.split();
                tokio::io::copy(&mut r, &mut w).await?;
                w.shutdown().await?;
                std::io::Result::Ok(())
            });
        }
    });
    addr
}

#[tokio::test]
async fn greeting_and_data_relayed_byte_for_byte() {
    const GREETING: &[u8] =
        b"220-mx.example.test ESMTP first line\r\n220-second line \xc3\xa9\r\n220 last line\r\n";
    let echo = echo_backend(GREETING).await;
    let (listen, mut sy) = start_in_front_of_addr("echo", echo);

    let mut conn = TcpStream::connect(listen).await.expect("connect");
    let mut greeting = vec![0u8; GREETING.len()];
    tokio::time::timeout(Duration::from_secs(5), conn.read_exact(&mut greeting))
        .await
        .expect("greeting in time")
        .expect("greeting");
    assert_eq!(greeting, GREETING);

    // 4 MiB of every byte value, far more than any socket buffer, so the relay must wait
    // for the slow side; sent while reading so neither side deadlocks.
    let payload: Arc<Vec<u8>> = Arc::new(
        (0..4 * 1024 * 1024u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect(),
    );
    let (mut r, mut w) = conn.into_split();
    let sent = payload.clone();
    let writer = tokio::spawn(async move {
        for chunk in sent.chunks(7919) {
            w.write_all(chunk).await.expect("send");
        }
        w.shutdown().await.expect("half-close");
    });
    let echoed = read_to_close(&mut r, Duration::from_secs(30)).await;
    writer.await.expect("writer");
    assert_eq!(echoed.len(), payload.len());
    assert!(echoed == *payload, "echoed bytes differ");
    terminate_and_check_counts(&mut sy, &["echo"]);
}

/// The relay sends a source's last bytes corked together with its FIN when the FIN is already
/// in; with a slow client those last bytes outgrow the socket buffers, so the tail waits in
/// the relay and the FIN must still come after every byte of it.
#[tokio::test]
async fn backend_closing_right_after_a_large_reply_loses_nothing() {
    const REPLY_LEN: usize = 3 * 1024 * 1024;
    let reply: Arc<Vec<u8>> = Arc::new(
        (0..REPLY_LEN as u32)
            .map(|i| (i.wrapping_mul(2246822519) >> 11) as u8)
            .collect(),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let backend = listener.local_addr().expect("addr");
    let served = reply.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let served = served.clone();
            tokio::spawn(async move {
                let mut stream = BufReader::new(stream);
                stream.get_mut().write_all(b"220 bulk ready\r\n").await?;
                let mut line = String::new();
                stream.read_line(&mut line).await?;
                stream.get_mut().write_all(&served).await?;
                // Dropped right away: the FIN follows the last byte at once.
                std::io::Result::Ok(())
            });
        }
    });
    let (listen, mut sy) = start_in_front_of_addr("bulk", backend);
    let mut conn = open_greeted(listen).await;
    conn.get_mut().write_all(b"GO\r\n").await.expect("send");
    // Let the backend finish and close while nobody reads on the client side.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let received = read_to_close(&mut conn, Duration::from_secs(30)).await;
    assert_eq!(received.len(), REPLY_LEN);
    assert!(received == *reply, "relayed bytes differ");
    terminate_and_check_counts(&mut sy, &["bulk"]);
}

#[tokio::test]
async fn half_close_is_propagated_and_the_other_direction_keeps_running() {
    // Reads until the client's EOF arrives, then answers with the byte count and closes.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let backend = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                stream.write_all(b"220 counter ready\r\n").await?;
                let mut all = Vec::new();
                stream.read_to_end(&mut all).await?;
                // Answer after a pause: the client side is half-closed, not gone.
                tokio::time::sleep(Duration::from_millis(200)).await;
                stream
                    .write_all(format!("250 got {} bytes\r\n", all.len()).as_bytes())
                    .await?;
                stream.shutdown().await?;
                std::io::Result::Ok(())
            });
        }
    });
    let (listen, mut sy) = start_in_front_of_addr("counter", backend);
    let mut conn = TcpStream::connect(listen).await.expect("connect");
    conn.write_all(&[b'x'; 100_000]).await.expect("send");
    conn.shutdown().await.expect("half-close");
    let all = read_to_close(&mut conn, Duration::from_secs(10)).await;
    assert_eq!(
        String::from_utf8_lossy(&all),
        "220 counter ready\r\n250 got 100000 bytes\r\n"
    );
    terminate_and_check_counts(&mut sy, &["counter"]);
}

#[tokio::test]
async fn idle_timeout_closes_a_silent_session_but_not_a_talking_one() {
    let mta1 = SmtpServer::start("mta1", Behaviour::default());
    let (listen, mut sy) = start_in_front_of(&[&mta1], "idle_timeout = \"1s\"", "none");

    let talking = tokio::spawn(async move {
        let mut conn = open_greeted(listen).await;
        for _ in 0..8 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            conn.get_mut().write_all(b"NOOP\r\n").await?;
            let (code, _) = read_reply(&mut conn).await?;
            anyhow::ensure!(code == 250, "NOOP answered {code}");
        }
        anyhow::Ok(())
    });

    let mut silent = open_greeted(listen).await;
    let started = Instant::now();
    let rest = read_to_close(&mut silent, Duration::from_secs(5)).await;
    let waited = started.elapsed();
    assert!(rest.is_empty());
    assert!(
        waited >= Duration::from_millis(800),
        "closed after {waited:?}, before the idle timeout"
    );
    talking
        .await
        .expect("task")
        .expect("a session with traffic every 300 ms outlives a 1 s idle timeout");
    terminate_and_check_counts(&mut sy, &["mta1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_vanishing_clients_do_not_hurt() {
    let slow = SmtpServer::start("slow", Behaviour::slow_greeting(Duration::from_millis(300)));
    let mta2 = SmtpServer::start("mta2", Behaviour::default());
    let (listen, mut sy) = start_in_front_of(
        &[&slow, &mta2],
        "algorithm = \"round_robin\"\nidle_timeout = \"5s\"",
        "none",
    );

    let mut tasks = Vec::new();
    for i in 0..60u32 {
        tasks.push(tokio::spawn(async move {
            let Ok(mut conn) = TcpStream::connect(listen).await else {
                return;
            };
            match i % 4 {
                // Gone before any greeting.
                0 => drop(conn),
                // Binary garbage, then gone without reading a byte.
                1 => {
                    let junk: Vec<u8> = (0..70_000u32).map(|n| (n * 31 + i) as u8).collect();
                    let _ = conn.write_all(&junk).await;
                }
                // Half a command, then a reset.
                2 => {
                    let _ = conn.write_all(b"EHLO half-a-li").await;
                    let _ = socket2::SockRef::from(&conn).set_linger(Some(Duration::ZERO));
                }
                // Reads the greeting, then vanishes mid-transaction.
                _ => {
                    let mut buf = [0u8; 64];
                    let _ = conn.read(&mut buf).await;
                    let _ = conn.write_all(b"MAIL FROM:<a@b>\r\n").await;
                }
            }
        }));
    }
    for task in tasks {
        task.await.expect("client task");
    }
    // Still serving, on both backends.
    let mut names = Vec::new();
    for _ in 0..4 {
        names.push(smtp_session(listen).await.expect("session after the abuse"));
    }
    assert!(
        names.contains(&"slow".to_string()) && names.contains(&"mta2".to_string()),
        "{names:?}"
    );
    // Let the abandoned sessions notice their clients are gone.
    tokio::time::sleep(Duration::from_millis(700)).await;
    terminate_and_check_counts(&mut sy, &["slow", "mta2"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_active_sessions_finish_and_refuses_new_ones() {
    let mta1 = SmtpServer::start("mta1", Behaviour::default());
    let (listen, mut sy) = start_in_front_of(&[&mta1], "", "none");

    let held = tokio::spawn(smtp_session_hold(listen, Duration::from_millis(1500)));
    while mta1.messages() == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    sy.signal(Signal::SIGTERM);
    // Listeners close at once.
    let deadline = Instant::now() + Duration::from_secs(5);
    while TcpStream::connect(listen).await.is_ok() {
        assert!(Instant::now() < deadline, "still accepting after SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        held.await
            .expect("task")
            .expect("the held session completes"),
        "mta1"
    );
    let status = tokio::task::spawn_blocking(move || {
        let status = sy.wait_timeout(Duration::from_secs(10));
        (status, sy)
    })
    .await
    .expect("wait");
    let (status, mut sy) = status;
    let status = status.expect("exited after its last session");
    assert!(
        status.success(),
        "exit status {status}; stderr:\n{}",
        sy.stderr_text()
    );
    assert_eq!(mta1.sessions_completed(), 1);
    terminate_and_check_counts(&mut sy, &["mta1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_timeout_cuts_off_sessions_that_outstay_it() {
    let mta1 = SmtpServer::start("mta1", Behaviour::default());
    let listen = free_addr();
    let toml = config(mx(&[listen], "", "none").servers(&[&mta1]))
        .replace("shutdown_timeout = \"10s\"", "shutdown_timeout = \"500ms\"");
    let sy = Switchyard::start(BIN, &toml);
    let held = tokio::spawn(smtp_session_hold(listen, Duration::from_secs(3)));
    while mta1.messages() == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let started = Instant::now();
    let sy = terminate_off_thread(sy).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    assert!(
        held.await.expect("task").is_err(),
        "the held session was cut off"
    );
    assert_eq!(active_at_shutdown(&sy, "mta1"), 0, "{}", sy.stderr_text());
}

/// `workers` decides how many threads accept and relay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_sets_the_number_of_relay_threads() {
    let mta = SmtpServer::start("mta1", Behaviour::default());
    let listen = free_addr();
    let toml = format!(
        "workers = 3\n{}",
        config(mx(&[listen], "", "none").servers(&[&mta]))
    );
    let mut sy = Switchyard::start(BIN, &toml);
    // The threads start right after the listeners bind.
    let deadline = Instant::now() + Duration::from_secs(5);
    while worker_threads(sy.pid()).len() < 3 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        worker_threads(sy.pid()),
        ["switchyard-0", "switchyard-1", "switchyard-2"]
    );
    let sessions: Vec<_> = (0..60)
        .map(|_| tokio::spawn(smtp_session_hold(listen, Duration::from_millis(300))))
        .collect();
    for s in sessions {
        s.await.expect("task").expect("session");
    }
    assert_eq!(mta.sessions_completed(), 60);
    sy.assert_logged("3 worker thread(s)");
    terminate_and_check_counts(&mut sy, &["mta1"]);
}

/// Names of the process's relay threads (named `switchyard-N`), sorted.
fn worker_threads(pid: u32) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("task list")
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
        .map(|n| n.trim().to_string())
        .filter(|n| n.starts_with("switchyard-"))
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn listens_on_ipv6_loopback() {
    let mta1 = SmtpServer::start("mta1", Behaviour::default());
    let v4 = free_addr();
    let v6 = {
        let l = std::net::TcpListener::bind("[::1]:0").expect("IPv6 loopback");
        l.local_addr().expect("addr")
    };
    let toml = config(mx(&[v4, v6], "proxy_protocol = \"none\"", "none").servers(&[&mta1]));
    let mut sy = Switchyard::start(BIN, &toml);
    assert_eq!(smtp_session(v6).await.expect("session over IPv6"), "mta1");
    assert_eq!(smtp_session(v4).await.expect("session over IPv4"), "mta1");
    terminate_and_check_counts(&mut sy, &["mta1"]);
}

#[tokio::test]
async fn bind_failure_names_service_and_address() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("s.toml");
    std::fs::write(
        &path,
        config(mx(&[addr], "", "none").backend("mta1", free_addr())),
    )
    .expect("write");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["run", "--config"])
        .arg(&path)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("\"mx\"") && stderr.contains(&addr.to_string()),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_out_of_file_descriptors_does_not_stop_the_accept_loop() {
    let mta1 = SmtpServer::start("mta1", Behaviour::default());
    let listen = free_addr();
    // A tiny descriptor table: two dozen sessions exhaust it.
    let sy = Launch::new(BIN)
        .open_files(48)
        .start(&config(mx(&[listen], "", "none").servers(&[&mta1])));
    let mut held = Vec::new();
    for _ in 0..60 {
        if let Ok(conn) = TcpStream::connect(listen).await {
            held.push(conn);
        }
    }
    // The first of a burst is logged at once, whichever site ran out first (accept or a
    // backend connect); the totals below say which.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sy
        .stderr_text()
        .contains("switchyard itself is out of resources")
    {
        assert!(
            Instant::now() < deadline,
            "descriptors never ran out:\n{}",
            sy.stderr_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(held);
    let served = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match smtp_session(listen).await {
                Ok(name) => return name,
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    })
    .await
    .expect("serving again once descriptors are free");
    assert_eq!(served, "mta1");
    let sy = terminate_off_thread(sy).await;
    assert_eq!(active_at_shutdown(&sy, "mta1"), 0, "{}", sy.stderr_text());
    let own = sy.totals().balancer;
    assert!(
        own.exhausted_accept > 0,
        "the accept loop never ran out: {own:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Clients that leave before a backend greeted
// ---------------------------------------------------------------------------------------------

/// Sums `open()` over `backends` until it is `want`, failing after `limit`; returns how long
/// that took.
async fn wait_open(backends: &[&SmtpServer], want: usize, limit: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let open: usize = backends.iter().map(|b| b.open()).sum();
        if open == want {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "{open} backend connections still open after {limit:?} (want {want})"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn reset(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_reset_while_a_backend_is_slow_to_greet_free_their_slots_at_once() {
    const CLIENTS: usize = 300;
    const SLOTS: usize = 20;
    let slow_greeting = Duration::from_secs(4);
    let slow = SmtpServer::start(
        "slow",
        Behaviour {
            greeting_delay: slow_greeting,
            ..Default::default()
        },
    );
    let (listen, mut sy) = start_in_front_of(
        &[&slow],
        &format!("max_connections = {SLOTS}\nretries = 0\ngreeting_timeout = \"10s\""),
        "none",
    );
    // Everyone connects; the first SLOTS wait for the slow greeting, the rest get 421.
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        clients.push(tokio::spawn(TcpStream::connect(listen)));
    }
    let mut connected = Vec::new();
    for client in clients {
        connected.push(client.await.expect("client task").expect("connect"));
    }
    wait_open(&[&slow], SLOTS, Duration::from_secs(3)).await;
    let reset_at = Instant::now();
    for stream in connected {
        reset(stream);
    }

    // The backend sees its connections closed long before it would have greeted.
    let took = wait_open(&[&slow], 0, Duration::from_secs(2)).await;
    eprintln!("backend connections closed {took:?} after the resets");
    // The slots are free: the next client is served, not refused.
    let name = smtp_session(listen)
        .await
        .expect("a client right after the resets is served");
    assert_eq!(name, "slow");
    assert!(
        reset_at.elapsed() < slow_greeting * 2,
        "served only after {:?}",
        reset_at.elapsed()
    );
    let assigned = terminate_and_check_counts(&mut sy, &["slow"]);
    assert_eq!(assigned, [1], "only the client that stayed was assigned");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_during_failover_ends_it() {
    let hung = |name| {
        SmtpServer::start(
            name,
            Behaviour {
                hang: true,
                ..Default::default()
            },
        )
    };
    let (mta1, mta2, mta3) = (hung("mta1"), hung("mta2"), hung("mta3"));
    let backends = [&mta1, &mta2, &mta3];
    let greeting_timeout = Duration::from_secs(1);
    let (listen, mut sy) = start_in_front_of(
        &backends,
        "algorithm = \"round_robin\"\nretries = 2\ngreeting_timeout = \"1s\"\nmax_connections = 1",
        "none",
    );
    let client = TcpStream::connect(listen).await.expect("connect");
    // The first backend's greeting timed out; the second is being waited for.
    tokio::time::sleep(greeting_timeout + greeting_timeout / 2).await;
    let tried = |b: &[&SmtpServer]| b.iter().map(|s| s.connections()).sum::<usize>();
    assert_eq!(tried(&backends), 2, "failing over to the second backend");
    drop(client);
    let took = wait_open(&backends, 0, Duration::from_millis(500)).await;
    eprintln!("the second backend's connection closed {took:?} after the client left");
    // Past the second greeting timeout: no third backend was tried for a client long gone.
    tokio::time::sleep(greeting_timeout).await;
    assert_eq!(
        tried(&backends),
        2,
        "the failover went on without its client"
    );
    // The slot is free: the next client reaches a backend instead of a 421.
    let mut next = TcpStream::connect(listen).await.expect("connect");
    let deadline = Instant::now() + Duration::from_secs(2);
    while tried(&backends) < 3 {
        assert!(Instant::now() < deadline, "the next client got no backend");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    next.shutdown().await.expect("close");
    wait_open(&backends, 0, Duration::from_secs(2)).await;
    terminate_and_check_counts(&mut sy, &["mta1", "mta2", "mta3"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_pipelines_before_the_greeting_and_half_closes_is_served() {
    let slow = SmtpServer::start(
        "slow",
        Behaviour {
            greeting_delay: Duration::from_millis(300),
            ..Default::default()
        },
    );
    let (listen, mut sy) = start_in_front_of(&[&slow], "retries = 0", "none");
    let mut client = TcpStream::connect(listen).await.expect("connect");
    client
        .write_all(b"EHLO early.test\r\nQUIT\r\n")
        .await
        .expect("send before the greeting");
    client.shutdown().await.expect("half-close");
    let all = read_to_close(&mut client, Duration::from_secs(10)).await;
    let text = String::from_utf8_lossy(&all);
    assert!(text.starts_with("220 slow"), "{text:?}");
    assert!(text.contains("\r\n250-slow\r\n"), "EHLO was lost: {text:?}");
    assert!(
        text.ends_with("221 2.0.0 Bye\r\n"),
        "QUIT was lost: {text:?}"
    );
    terminate_and_check_counts(&mut sy, &["slow"]);
}
