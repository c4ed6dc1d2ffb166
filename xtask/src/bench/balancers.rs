//! Several balancers behind a BIRD router with ECMP (`testkit::balancers`, proxy, least_conn,
//! root and BIRD 2): how long the router takes to stop routing to a balancer after `ctl node
//! drain` and after that balancer loses its last usable backend (`ctl disable` of the last one
//! left), timed from the admin request to the router's kernel route losing the nexthop; and
//! sessions/s through one balancer host against two, alternating rounds. On a 2-core machine
//! every namespace shares the same cores, so the second figure shows the overhead of the extra
//! hop and host, not the scale-out a second machine gives.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use serde::{Deserialize, Serialize};
use switchyard::control::{Request, Target};
use testkit::balancers::{Balancer, Balancers, Dataplane, SERVICE, Setup};

const PARALLEL: usize = 20;
const BACKENDS: [&str; 3] = ["mta1", "mta2", "mta3"];

/// `cargo xtask bench --balancers-only` and results.json's `balancers`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct BalancerFigures {
    /// `ctl node drain` to the nexthop gone from the router's kernel route, each trial, ms.
    pub drain_ms: Vec<f64>,
    pub drain_median_ms: f64,
    /// The last usable backend disabled to the nexthop gone, each trial, ms.
    pub last_backend_ms: Vec<f64>,
    pub last_backend_median_ms: f64,
    pub sessions_per_run: usize,
    pub parallel: usize,
    /// Sessions/s through one balancer host (the other drained), each round.
    pub one_balancer: Vec<f64>,
    /// Sessions/s through two, each round.
    pub two_balancers: Vec<f64>,
    /// Median two over median one.
    pub ratio: f64,
    /// Sessions/s through two balancer hosts with the second chance on (`[announce] peers`:
    /// every proxy packet that is not a SYN pays a socket lookup in the XDP program), each
    /// round, on a testbed of its own started after the first.
    #[serde(default)]
    pub two_with_second_chance: Vec<f64>,
    /// Median with the second chance over median without (`two_balancers`).
    #[serde(default)]
    pub second_chance_ratio: f64,
    pub failed_sessions: usize,
    pub note: String,
}

/// Runs the measurement: `quick` is 2 trials and 1 round of 1500 sessions each arm (about
/// 15 s), otherwise 5 trials and 3 rounds of 10000. The test kit panics where a test would
/// fail (a daemon that does not start, a route that never changes): that is an error here.
pub fn measure(switchyard: &Path, quick: bool) -> Result<BalancerFigures> {
    if let Some(problem) = testkit::bird::missing() {
        anyhow::bail!("{problem}");
    }
    std::panic::catch_unwind(|| measure_on_testbed(switchyard, quick)).unwrap_or_else(|panic| {
        let why = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "a panic".into());
        Err(anyhow::anyhow!("the testbed failed: {why}"))
    })
}

fn measure_on_testbed(switchyard: &Path, quick: bool) -> Result<BalancerFigures> {
    let (trials, rounds, sessions) = if quick { (2, 1, 1500) } else { (5, 3, 10_000) };
    let setup = Setup {
        dataplane: Dataplane::Proxy,
        algorithm: "least_conn",
    };
    let binary = switchyard
        .to_str()
        .context("switchyard's path is not UTF-8")?;
    let net = Balancers::start(binary, setup.clone(), 2)?;
    let (mut drain_ms, mut last_backend_ms) = (Vec::new(), Vec::new());
    for _ in 0..trials {
        drain_ms.push(drain_trial(&net)?);
        last_backend_ms.push(last_backend_trial(&net)?);
    }
    let (mut one, mut two, mut failed_sessions) = (Vec::new(), Vec::new(), 0);
    for _ in 0..rounds {
        let (per_s, failed) = rate(&net, sessions);
        two.push(per_s);
        failed_sessions += failed;
        ask(&net.balancers[0], Request::NodeDrain)?;
        net.wait_nexthops(1, "drained for the one-balancer round");
        let (per_s, failed) = rate(&net, sessions);
        one.push(per_s);
        failed_sessions += failed;
        ask(&net.balancers[0], Request::NodeUndrain)?;
        net.wait_nexthops(2, "undrained");
    }
    let ratio = median(&two) / median(&one);
    drop(net);
    let net = Balancers::start_with_second_chance(binary, setup, 2)?;
    let mut with_chance = Vec::new();
    for _ in 0..rounds {
        let (per_s, failed) = rate(&net, sessions);
        with_chance.push(per_s);
        failed_sessions += failed;
    }
    let second_chance_ratio = median(&with_chance) / median(&two);
    Ok(BalancerFigures {
        two_with_second_chance: with_chance,
        second_chance_ratio,
        drain_median_ms: median(&drain_ms),
        drain_ms,
        last_backend_median_ms: median(&last_backend_ms),
        last_backend_ms,
        sessions_per_run: sessions,
        parallel: PARALLEL,
        one_balancer: one,
        two_balancers: two,
        ratio,
        failed_sessions,
        note: "all namespaces share this machine's cores: two balancers vs one shows the overhead, not the scale-out".into(),
    })
}

/// `ctl node drain` on balancer 1 until the router dropped its nexthop, in ms; then undrained.
fn drain_trial(net: &Balancers) -> Result<f64> {
    let started = Instant::now();
    ask(&net.balancers[0], Request::NodeDrain)?;
    net.wait_nexthops(1, "ctl node drain");
    let took = started.elapsed();
    ask(&net.balancers[0], Request::NodeUndrain)?;
    net.wait_nexthops(2, "ctl node undrain");
    Ok(ms(took))
}

/// Every backend of balancer 1 disabled, the last one timed until the router dropped its
/// nexthop, in ms; then enabled again.
fn last_backend_trial(net: &Balancers) -> Result<f64> {
    let balancer = &net.balancers[0];
    let (last, others) = BACKENDS.split_last().context("no backends")?;
    for backend in others {
        ask(
            balancer,
            Request::Disable {
                target: target(backend),
            },
        )?;
    }
    // Let the others' change settle: only the last one may withdraw the route.
    std::thread::sleep(Duration::from_millis(200));
    ensure!(net.nexthops() == 2, "withdrawn with {last} still usable");
    let started = Instant::now();
    ask(
        balancer,
        Request::Disable {
            target: target(last),
        },
    )?;
    net.wait_nexthops(1, "last backend disabled");
    let took = started.elapsed();
    for backend in BACKENDS {
        ask(
            balancer,
            Request::Enable {
                target: target(backend),
            },
        )?;
    }
    net.wait_nexthops(2, "backends enabled");
    Ok(ms(took))
}

fn target(backend: &str) -> Target {
    Target {
        service: SERVICE.into(),
        backend: backend.into(),
    }
}

/// One admin request to `balancer`, which must be carried out.
fn ask(balancer: &Balancer, request: Request) -> Result<()> {
    let switchyard = balancer
        .switchyard
        .as_ref()
        .context("the balancer is not running")?;
    let reply = switchyard::ctl::ask(switchyard.admin_socket(), &request)
        .map_err(|e| anyhow::anyhow!("{request:?}: {e}"))?;
    ensure!(reply.ok, "{request:?} refused: {}", reply.text);
    Ok(())
}

/// `sessions` sessions from the client: sessions/s and how many failed.
fn rate(net: &Balancers, sessions: usize) -> (f64, usize) {
    let started = Instant::now();
    let outcomes = net.sessions(sessions, PARALLEL);
    let elapsed = started.elapsed().as_secs_f64();
    let failed = outcomes.iter().filter(|o| o.result.is_err()).count();
    ((outcomes.len() - failed) as f64 / elapsed, failed)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn median(values: &[f64]) -> f64 {
    super::stats::median(&mut values.to_vec())
}

/// One line per figure, for the bench's output.
pub fn describe(f: &BalancerFigures) -> String {
    format!(
        "several balancers (BIRD router, ECMP, proxy): ctl node drain -> route withdrawn median {:.1} ms {:?}; last backend disabled -> route withdrawn median {:.1} ms {:?}; sessions/s through two balancer hosts {:?} vs one {:?} (ratio {:.2}), two with the second chance {:?} (ratio to two without {:.2}); {} sessions x {} parallel, {} failed; {}",
        f.drain_median_ms,
        rounded(&f.drain_ms),
        f.last_backend_median_ms,
        rounded(&f.last_backend_ms),
        rounded(&f.two_balancers),
        rounded(&f.one_balancer),
        f.ratio,
        rounded(&f.two_with_second_chance),
        f.second_chance_ratio,
        f.sessions_per_run,
        f.parallel,
        f.failed_sessions,
        f.note
    )
}

fn rounded(values: &[f64]) -> Vec<f64> {
    values.iter().map(|v| (v * 10.0).round() / 10.0).collect()
}

/// The figures are figures: every trial and round measured, positive, a ratio that is one.
pub fn check(f: &BalancerFigures) -> Result<()> {
    for (name, values) in [
        ("drain_ms", &f.drain_ms),
        ("last_backend_ms", &f.last_backend_ms),
        ("one_balancer", &f.one_balancer),
        ("two_balancers", &f.two_balancers),
        ("two_with_second_chance", &f.two_with_second_chance),
    ] {
        ensure!(
            !values.is_empty() && values.iter().all(|v| v.is_finite() && *v > 0.0),
            "balancers.{name} has {values:?}, expected positive figures"
        );
    }
    for (name, ratio) in [
        ("ratio", f.ratio),
        ("second_chance_ratio", f.second_chance_ratio),
    ] {
        ensure!(
            ratio.is_finite() && ratio > 0.0,
            "balancers.{name} is {ratio}"
        );
    }
    Ok(())
}
