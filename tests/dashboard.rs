//! The dashboard (`GET /` of `[admin] listen`) in a real browser: headless Chromium loads it
//! from a switchyard in front of three SMTP servers while sessions run, and the test reads the
//! rendered DOM through the page's data attributes (not its wording): every backend is named,
//! the session counts rise between two reads, runtime changes, a reload and a backend going
//! down appear in its state and in the timeline, and at a phone's width nothing scrolls
//! sideways. Screenshots go to
//! `target/dashboard.png` and `target/dashboard-phone.png`.

#[path = "support/browser.rs"]
mod browser;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use browser::Browser;
use serde_json::Value;
use testkit::config_toml::ServiceToml;
use testkit::harness::{Switchyard, free_addr};
use testkit::smtp_client::{HeldSession, smtp_session};
use testkit::smtp_server::{Behaviour, SmtpServer};

const BIN: &str = env!("CARGO_BIN_EXE_switchyard");
/// The background load's bounds, whichever comes first.
const LOAD_LIMIT: Duration = Duration::from_secs(90);
const LOAD_SESSIONS: usize = 100_000;
/// Sessions in flight at once.
const LOAD_CONCURRENCY: usize = 3;

/// SMTP sessions through `target` until `stop`, or the load's bounds; counts the completed
/// ones.
fn run_load(target: SocketAddr, stop: Arc<AtomicBool>, done: Arc<AtomicUsize>) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("load runtime");
    let deadline = Instant::now() + LOAD_LIMIT;
    runtime.block_on(async {
        let mut tasks = Vec::new();
        for _ in 0..LOAD_CONCURRENCY {
            let (stop, done) = (stop.clone(), done.clone());
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed)
                    && Instant::now() < deadline
                    && done.load(Ordering::Relaxed) < LOAD_SESSIONS
                {
                    if smtp_session(target).await.is_ok() {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    // A steady trickle, not a benchmark: the machine is shared.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }));
        }
        for task in tasks {
            let _ = task.await;
        }
    });
}

/// Per backend name, its row's session total as the page rendered it.
fn backend_totals(page: &mut Browser) -> Vec<(String, u64)> {
    let rows = page.eval(
        "[...document.querySelectorAll('tr.backend[data-backend]')].map(row => \
           [row.dataset.backend, Number(row.dataset.sessionsTotal), row.textContent])",
    );
    let rows = rows.as_array().expect("backend rows").clone();
    rows.iter()
        .map(|row| {
            let name = row[0].as_str().expect("backend name").to_string();
            let text = row[2].as_str().unwrap_or_default();
            assert!(
                text.contains(&name),
                "the row of backend {name} does not show its name: {text:?}"
            );
            (name, row[1].as_u64().expect("a session total"))
        })
        .collect()
}

fn polls(page: &mut Browser) -> u64 {
    page.eval("Number(document.getElementById('dashboard').dataset.polls)")
        .as_u64()
        .unwrap_or(0)
}

/// Waits until the page has polled `more` more times than now.
fn wait_polls(page: &mut Browser, more: u64) {
    let target = polls(page) + more;
    page.wait_for(
        &format!("Number(document.getElementById('dashboard').dataset.polls) >= {target}"),
        Duration::from_secs(20),
    );
}

fn target_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target")
}

#[test]
fn dashboard_shows_live_backends_in_a_real_browser() {
    let chromium = match browser::chromium() {
        Ok(path) => path,
        Err(missing) => panic!("{missing}"),
    };
    let servers: Vec<SmtpServer> = ["mta1", "mta2", "mta3"]
        .iter()
        .map(|name| SmtpServer::start(name, Behaviour::default()))
        .collect();
    let listen = free_addr();
    let web = free_addr();
    let service = ServiceToml::new("mx", &[listen])
        .health("kind = \"smtp\"\ninterval = \"1s\"\ntimeout = \"1s\"")
        .servers(&servers.iter().collect::<Vec<_>>());
    let config = format!(
        "shutdown_timeout = \"1s\"\n\n[admin]\nlisten = \"{web}\"\nsocket = \"admin.sock\"\n\n{service}"
    );
    let sy = Switchyard::start(BIN, &config);

    // Open sessions for the page to count, then a steady load in the background.
    let held: Vec<HeldSession> = (0..3)
        .map(|_| HeldSession::open(listen).expect("held session"))
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let load = {
        let (stop, done) = (stop.clone(), done.clone());
        std::thread::spawn(move || run_load(listen, stop, done))
    };
    // Events for the timeline: a runtime change and a reload.
    let weight = sy.ctl(&["weight", "mx/mta1", "2"]);
    assert_eq!(weight.code, Some(0), "{weight:?}");
    let reload = sy.ctl(&["reload"]);
    assert_eq!(reload.code, Some(0), "{reload:?}");

    let mut page = Browser::launch(&chromium);
    page.open(&format!("http://{web}/"));
    page.viewport(1280, 900, false);
    wait_polls(&mut page, 2);
    let first = backend_totals(&mut page);
    let mut names: Vec<&str> = first.iter().map(|(name, _)| name.as_str()).collect();
    names.sort_unstable();
    assert_eq!(names, ["mta1", "mta2", "mta3"], "backends on the page");

    // A few seconds of load later, the same page shows more sessions for every backend.
    std::thread::sleep(Duration::from_secs(3));
    wait_polls(&mut page, 2);
    let second = backend_totals(&mut page);
    for (name, before) in &first {
        let after = second
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, total)| *total)
            .unwrap_or_else(|| panic!("backend {name} is gone from the page"));
        assert!(
            after > *before,
            "backend {name}: sessions did not rise between two reads ({before} -> {after}); \
             {} sessions completed meanwhile",
            done.load(Ordering::Relaxed)
        );
    }
    let kinds = page
        .eval("[...document.querySelectorAll('#timeline [data-kind]')].map(e => e.dataset.kind)");
    let kinds: Vec<&str> = kinds
        .as_array()
        .expect("timeline")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        kinds.contains(&"weight") && kinds.contains(&"reload"),
        "the timeline lacks the weight change or the reload: {kinds:?}"
    );
    let active =
        page.eval("document.querySelector('.service [data-field=active] .value').textContent");
    assert_ne!(
        active,
        Value::from("0"),
        "the three held sessions are not shown"
    );

    // A drained backend and one that went down show as such, the fall in the timeline.
    let drain = sy.ctl(&["drain", "mx/mta2"]);
    assert_eq!(drain.code, Some(0), "{drain:?}");
    servers[2].stop();
    page.wait_for(
        "document.querySelector('tr.backend[data-backend=mta2]').dataset.state === 'drain' && \
         document.querySelector('tr.backend[data-backend=mta3]').dataset.state === 'down' && \
         document.querySelector('#timeline [data-kind=down]') !== null",
        Duration::from_secs(20),
    );
    // Long enough a history for the sparklines to say something.
    wait_polls(&mut page, 5);
    page.screenshot(&target_dir().join("dashboard.png"));

    // A phone: everything fits the width, nothing scrolls sideways.
    page.viewport(390, 844, true);
    wait_polls(&mut page, 1);
    let (wide, view) = (
        page.eval("document.documentElement.scrollWidth"),
        page.eval("window.innerWidth"),
    );
    assert!(
        wide.as_u64() <= view.as_u64() && view.as_u64() == Some(390),
        "at phone width the page is {wide} px wide in a {view} px viewport"
    );
    assert_eq!(
        backend_totals(&mut page).len(),
        3,
        "backends at phone width"
    );
    let height = page
        .eval("document.documentElement.scrollHeight")
        .as_u64()
        .unwrap_or(844)
        .min(2400);
    page.viewport(390, u32::try_from(height).unwrap_or(844), true);
    wait_polls(&mut page, 1);
    page.screenshot(&target_dir().join("dashboard-phone.png"));
    drop(page);

    stop.store(true, Ordering::Relaxed);
    load.join().expect("load thread");
    // The stopped server cut its own; the others end normally, either way bounded.
    for session in held {
        let _ = session.finish();
    }
}
