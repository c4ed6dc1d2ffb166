//! `cargo xtask test`: setup, the workspace's tests (debug build: the tests need no release
//! build, and it keeps CI short on two cores), then `bench --quick` (its results.json
//! validated) and a short `demo`; a summary of every step at the end. `.ci/run` calls this.

use std::io::{BufRead, BufReader};
use std::process::{Command, ExitCode, Stdio};
use std::time::Instant;

use anyhow::{Context, Result};

use crate::{bench, setup, workspace};

struct Step {
    name: &'static str,
    ok: bool,
    seconds: f64,
    detail: String,
}

#[derive(Default, Debug, PartialEq)]
pub struct TestCounts {
    pub passed: u64,
    pub failed: u64,
    pub ignored: u64,
}

/// Adds up cargo test's "test result: ok. 12 passed; 0 failed; 1 ignored; ..." lines.
pub fn count_line(line: &str, counts: &mut TestCounts) {
    let Some(rest) = line.trim().strip_prefix("test result: ") else {
        return;
    };
    for part in rest.split(';') {
        let words: Vec<&str> = part.split_whitespace().collect();
        let (n, what) = match words.as_slice() {
            [.., n, what] => (
                n.trim_start_matches("ok.").trim_start_matches("FAILED."),
                *what,
            ),
            _ => continue,
        };
        let Ok(n) = n.parse::<u64>() else { continue };
        match what {
            "passed" => counts.passed += n,
            "failed" => counts.failed += n,
            "ignored" => counts.ignored += n,
            _ => {}
        }
    }
}

pub fn run() -> Result<ExitCode> {
    let root = workspace::root();
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    let mut steps = Vec::new();

    let t = Instant::now();
    let linker = setup::setup().context("setup failed; nothing else was run")?;
    steps.push(Step {
        name: "setup",
        ok: true,
        seconds: t.elapsed().as_secs_f64(),
        detail: format!("bpf-linker {}", linker.display()),
    });

    // cargo test --workspace (every test binary runs even after a failure, so the count is whole),
    // its output passed through and its result lines counted.
    let t = Instant::now();
    let mut cmd = Command::new(workspace::cargo());
    cmd.current_dir(&root)
        .args(["test", "--workspace", "--no-fail-fast"])
        .stdout(Stdio::piped());
    if ci {
        // In CI a kernel-path or Postfix test that cannot run is a failure, not a skip.
        cmd.env("SWITCHYARD_REQUIRE_XDP", "1")
            .env("SWITCHYARD_REQUIRE_POSTFIX", "1");
    }
    println!(
        "$ {}{}",
        workspace::display(&cmd),
        if ci {
            "  (CI: SWITCHYARD_REQUIRE_XDP=1 SWITCHYARD_REQUIRE_POSTFIX=1)"
        } else {
            ""
        }
    );
    let mut child = cmd.spawn().context("starting cargo test")?;
    let mut counts = TestCounts::default();
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            println!("{line}");
            count_line(&line, &mut counts);
        }
    }
    let status = child.wait()?;
    steps.push(Step {
        name: "cargo test --workspace",
        ok: status.success() && counts.failed == 0,
        seconds: t.elapsed().as_secs_f64(),
        detail: format!(
            "{} passed, {} failed, {} ignored ({status})",
            counts.passed, counts.failed, counts.ignored
        ),
    });

    // The benchmark and the demo in release builds, as a user runs them.
    let xtask = |args: &[&str]| {
        let mut c = Command::new(workspace::cargo());
        c.current_dir(&root)
            .args(["run", "--quiet", "--package", "xtask", "--"])
            .args(args);
        c
    };
    let t = Instant::now();
    let bench_ok = workspace::run(&mut xtask(&["bench", "--quick"]))
        .and_then(|_| bench::validate(&bench::bench_dir().join("results.json")));
    steps.push(Step {
        name: "cargo xtask bench --quick",
        ok: bench_ok.is_ok(),
        seconds: t.elapsed().as_secs_f64(),
        detail: match &bench_ok {
            Ok(r) => format!(
                "results.json valid: {} contenders, {} skipped",
                r.contenders.len(),
                r.skipped.len()
            ),
            Err(e) => format!("{e:#}"),
        },
    });
    let t = Instant::now();
    let demo = workspace::run(xtask(&["demo", "--duration", "6s"]).env("XTASK_SETUP_DONE", "1"));
    steps.push(Step {
        name: "cargo xtask demo --duration 6s",
        ok: demo.is_ok(),
        seconds: t.elapsed().as_secs_f64(),
        detail: match &demo {
            Ok(()) => "zero failed sessions".into(),
            Err(e) => format!("{e:#}"),
        },
    });

    println!("\n== cargo xtask test summary");
    for s in &steps {
        println!(
            "  {}  {:<32} {:>6.0} s  {}",
            if s.ok { "PASS" } else { "FAIL" },
            s.name,
            s.seconds,
            s.detail
        );
    }
    let failed_steps = steps.iter().filter(|s| !s.ok).count() as u64;
    // bench and demo count as one test each, next to cargo's own counts.
    let extra_passed = steps[2..].iter().filter(|s| s.ok).count() as u64;
    // A cargo test step that failed without a failed test (a build error) counts as one failure.
    let test_step_failure = u64::from(!steps[1].ok && counts.failed == 0);
    let other_failures = steps[2..].iter().filter(|s| !s.ok).count() as u64;
    let failed = counts.failed + test_step_failure + other_failures;
    println!(
        "tests: {} passed, {} failed",
        counts.passed + extra_passed,
        failed
    );
    Ok(if failed_steps == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_cargo_result_lines() {
        let mut c = TestCounts::default();
        count_line(
            "test result: ok. 12 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s",
            &mut c,
        );
        count_line(
            "test result: FAILED. 3 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out",
            &mut c,
        );
        count_line("running 5 tests", &mut c);
        assert_eq!(
            c,
            TestCounts {
                passed: 15,
                failed: 2,
                ignored: 1
            }
        );
    }
}
