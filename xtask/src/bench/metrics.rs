//! What a Prometheus scraper costs the proxy: sessions/s through one switchyard whose HTTP
//! admin listener is scraped every second, against an identical switchyard with no admin
//! listener, taking turns in one run (A B, then B A, ...) in front of the same sinks, so drift
//! over the run falls on both. Reported as the ratio of the medians (target: within 2 %).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use serde::{Deserialize, Serialize};
use testkit::config_toml::{admin_table, admin_table_listening};
use testkit::harness::free_addr;
use testkit::metrics_text::Exposition;

use super::contenders::{start_switchyard_with, switchyard_config};
use super::drive::wait_until_greeting;
use super::stats::median;
use crate::loadgen::{self, Budget, LoadSpec};

/// How often the scraper asks, as Prometheus would at its fastest common setting.
const SCRAPE_EVERY: Duration = Duration::from_secs(1);

/// The figures printed and written to `target/bench/metrics.json` (and results.json).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct MetricsFigures {
    pub rounds: usize,
    pub sessions_per_run: u64,
    pub concurrency: usize,
    /// Sessions/s per round, scraped every second.
    pub scraped: Vec<f64>,
    /// Sessions/s per round, no admin listener.
    pub unscraped: Vec<f64>,
    pub scraped_median: f64,
    pub unscraped_median: f64,
    /// scraped_median / unscraped_median.
    pub ratio: f64,
    /// Scrapes made during the scraped runs, and the slowest one.
    pub scrapes: u64,
    pub slowest_scrape_ms: f64,
}

/// Runs `rounds` pairs of `sessions` sessions each through the two switchyards, in front of
/// `sinks`.
pub fn measure(
    dir: &Path,
    switchyard: &Path,
    sinks: &[SocketAddr],
    rounds: usize,
    sessions: u64,
    concurrency: usize,
) -> Result<MetricsFigures> {
    let (scraped_at, unscraped_at, web) = (free_addr(), free_addr(), free_addr());
    let config = |listen, admin: String| switchyard_config(listen, "least_conn", sinks) + &admin;
    let (_scraped_process, _) = start_switchyard_with(
        dir,
        switchyard,
        "metrics-scraped",
        &config(
            scraped_at,
            admin_table_listening(Path::new("metrics-scraped.sock"), web),
        ),
    )?;
    let (_unscraped_process, _) = start_switchyard_with(
        dir,
        switchyard,
        "metrics-unscraped",
        &config(
            unscraped_at,
            admin_table(Path::new("metrics-unscraped.sock")),
        ),
    )?;
    wait_until_greeting("switchyard (scraped)", scraped_at)?;
    wait_until_greeting("switchyard (no admin listener)", unscraped_at)?;
    Exposition::scrape(web)?;
    let run = |target| -> Result<f64> {
        let report = loadgen::run_blocking(LoadSpec::new(
            target,
            concurrency,
            Budget::Sessions(sessions),
        ))?;
        ensure!(
            report.sessions_failed == 0,
            "{} sessions failed through {target}",
            report.sessions_failed
        );
        Ok(report.sessions_per_s)
    };
    let (mut scraped, mut unscraped) = (Vec::new(), Vec::new());
    let (mut scrapes, mut slowest) = (0u64, Duration::ZERO);
    for round in 0..rounds {
        // A B, then B A: neither always runs first.
        for scraped_turn in [round % 2 == 0, round % 2 == 1] {
            if scraped_turn {
                let scraper = Scraper::start(web);
                let rate = run(scraped_at)?;
                let (count, longest) = scraper.stop()?;
                scrapes += count;
                slowest = slowest.max(longest);
                scraped.push(rate);
            } else {
                unscraped.push(run(unscraped_at)?);
            }
        }
        println!(
            "  metrics round {}/{rounds}: scraped {:.0} sessions/s, no admin listener {:.0} sessions/s",
            round + 1,
            scraped[round],
            unscraped[round]
        );
    }
    let scraped_median = median(&mut scraped.clone());
    let unscraped_median = median(&mut unscraped.clone());
    let figures = MetricsFigures {
        rounds,
        sessions_per_run: sessions,
        concurrency,
        scraped,
        unscraped,
        scraped_median,
        unscraped_median,
        ratio: scraped_median / unscraped_median,
        scrapes,
        slowest_scrape_ms: slowest.as_secs_f64() * 1000.0,
    };
    std::fs::write(
        dir.join("metrics.json"),
        serde_json::to_string_pretty(&figures)? + "\n",
    )?;
    Ok(figures)
}

/// The printed summary.
pub fn describe(f: &MetricsFigures) -> String {
    format!(
        "/metrics scraped every second: {:.0} sessions/s vs {:.0} without an admin listener (median of {} rounds each, {} sessions x {} parallel): ratio {:.3} ({:+.1} %, target within 2 %); {} scrapes, slowest {:.1} ms",
        f.scraped_median,
        f.unscraped_median,
        f.rounds,
        f.sessions_per_run,
        f.concurrency,
        f.ratio,
        (f.ratio - 1.0) * 100.0,
        f.scrapes,
        f.slowest_scrape_ms
    )
}

/// A thread scraping `/metrics` every second until stopped (bounded to ten minutes).
struct Scraper {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Result<Duration>>,
    count: Arc<AtomicU64>,
}

impl Scraper {
    fn start(web: SocketAddr) -> Scraper {
        let stop = Arc::new(AtomicBool::new(false));
        let count = Arc::new(AtomicU64::new(0));
        let thread = {
            let (stop, count) = (stop.clone(), count.clone());
            std::thread::spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(600);
                let mut longest = Duration::ZERO;
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    let started = Instant::now();
                    let scraped = Exposition::scrape(web)?;
                    ensure!(!scraped.samples.is_empty(), "an empty scrape");
                    longest = longest.max(started.elapsed());
                    count.fetch_add(1, Ordering::Relaxed);
                    // Sleep in small steps so a stop is seen at once.
                    let next = started + SCRAPE_EVERY;
                    while Instant::now() < next && !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
                Ok(longest)
            })
        };
        Scraper {
            stop,
            thread,
            count,
        }
    }

    /// Scrapes made and the slowest.
    fn stop(self) -> Result<(u64, Duration)> {
        self.stop.store(true, Ordering::Relaxed);
        let longest = self
            .thread
            .join()
            .map_err(|_| anyhow::anyhow!("the scraper panicked"))??;
        Ok((self.count.load(Ordering::Relaxed), longest))
    }
}
