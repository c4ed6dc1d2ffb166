//! The process: build info, uptime, reloads, the balancer's own trouble (never blamed on a
//! backend), and the standard `process_*` metrics every Prometheus client library exports,
//! read from `/proc/self` (prometheus-client has no process collector).

use std::time::Instant;

use super::Family;
use crate::reload::RELOADS;
use crate::totals::BalancerTotals;

/// `switchyard_*` families about the process as a balancer.
pub(super) fn balancer_families(started: Instant) -> Vec<Family> {
    let mut build = Family::gauge("build_info", "1, labelled with the version running");
    build.count(vec![("version", env!("CARGO_PKG_VERSION").to_string())], 1);
    let mut uptime = Family::gauge("uptime_seconds", "Seconds since this switchyard started");
    uptime.float(Vec::new(), started.elapsed().as_secs_f64());
    let (applied, refused) = RELOADS.get();
    let mut reloads = Family::counter(
        "reloads",
        "Reloads of the config file (SIGHUP, ctl reload) by result: applied, refused (the running config stayed)",
    );
    reloads.count(vec![("result", "applied".to_string())], applied);
    reloads.count(vec![("result", "refused".to_string())], refused);
    let own = BalancerTotals::collect();
    let mut exhausted = Family::counter(
        "balancer_exhausted",
        "Times the balancer itself ran out of descriptors, memory or local ports, by where: accept, connect (a session's backend connection), health_check",
    );
    for (site, count) in [
        ("accept", own.exhausted_accept),
        ("connect", own.exhausted_connect),
        ("health_check", own.exhausted_health_check),
    ] {
        exhausted.count(vec![("site", site.to_string())], count);
    }
    let mut spare = Family::counter(
        "balancer_clients_refused",
        "Clients answered 421 through the spare descriptor while the descriptor table was full",
    );
    spare.count(Vec::new(), own.clients_refused);
    let mut loops = Family::counter(
        "loop_connections_refused",
        "Connections refused because they were the balancer's own backend connections come back",
    );
    loops.count(Vec::new(), own.loops_refused);
    vec![build, uptime, reloads, exhausted, spare, loops]
}

/// The standard `process_*` families (no prefix); those `/proc` cannot give are left out.
pub(super) fn standard_families() -> Vec<Family> {
    let mut families = Vec::new();
    if let Some(stat) = ProcessStat::read() {
        let mut cpu = Family::counter(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds",
        );
        cpu.float(Vec::new(), stat.cpu_seconds);
        let mut resident = Family::gauge(
            "process_resident_memory_bytes",
            "Resident memory size in bytes",
        );
        resident.count(Vec::new(), stat.resident_bytes);
        let mut virtual_memory = Family::gauge(
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes",
        );
        virtual_memory.count(Vec::new(), stat.virtual_bytes);
        families.extend([cpu, resident, virtual_memory]);
        if let Some(start) = stat.start_time_seconds {
            let mut started = Family::gauge(
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds",
            );
            started.float(Vec::new(), start);
            families.push(started);
        }
    }
    if let Ok(entries) = std::fs::read_dir("/proc/self/fd") {
        let mut open = Family::gauge("process_open_fds", "Number of open file descriptors");
        // The directory handle being read is one of them.
        open.count(Vec::new(), entries.count().saturating_sub(1) as u64);
        families.push(open);
    }
    if let Ok((soft, _)) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
    {
        let mut max = Family::gauge("process_max_fds", "Maximum number of open file descriptors");
        max.count(Vec::new(), soft);
        families.push(max);
    }
    families
}

/// What `/proc/self/stat` says, in units Prometheus expects.
#[derive(Debug, PartialEq)]
struct ProcessStat {
    cpu_seconds: f64,
    virtual_bytes: u64,
    resident_bytes: u64,
    start_time_seconds: Option<f64>,
}

impl ProcessStat {
    fn read() -> Option<ProcessStat> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        let boot = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|text| boot_time(&text));
        let ticks = sysconf(nix::unistd::SysconfVar::CLK_TCK)?;
        let page = sysconf(nix::unistd::SysconfVar::PAGE_SIZE)?;
        Self::parse(&stat, boot, ticks, page)
    }

    /// Fields of proc_pid_stat(5) after the command (which may hold spaces and parentheses):
    /// utime, stime (ticks), starttime (ticks after boot), vsize (bytes), rss (pages).
    fn parse(stat: &str, boot: Option<u64>, ticks: u64, page: u64) -> Option<ProcessStat> {
        let after_command = &stat[stat.rfind(')')? + 1..];
        let fields: Vec<&str> = after_command.split_whitespace().collect();
        // Field N of the manual is fields[N - 3]: the state (field 3) comes first.
        let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
        let ticks_f = ticks.max(1) as f64;
        Some(ProcessStat {
            cpu_seconds: (field(14)? + field(15)?) as f64 / ticks_f,
            virtual_bytes: field(23)?,
            resident_bytes: field(24)?.saturating_mul(page),
            start_time_seconds: boot
                .map(|boot| boot as f64 + field(22).unwrap_or(0) as f64 / ticks_f),
        })
    }
}

/// `btime` of `/proc/stat`: the boot time in seconds since the epoch.
fn boot_time(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix("btime "))
        .and_then(|value| value.trim().parse().ok())
}

fn sysconf(variable: nix::unistd::SysconfVar) -> Option<u64> {
    let value = nix::unistd::sysconf(variable).ok().flatten()?;
    u64::try_from(value).ok().filter(|&v| v > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_read_after_the_command_whatever_it_holds() {
        let stat = "4242 (sw itch) yard)) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 5 0 1000 123456789 300 18446744073709551615";
        let read = ProcessStat::parse(stat, Some(1_700_000_000), 100, 4096).expect("parse");
        assert_eq!(
            read,
            ProcessStat {
                cpu_seconds: 3.0,
                virtual_bytes: 123_456_789,
                resident_bytes: 300 * 4096,
                start_time_seconds: Some(1_700_000_010.0),
            }
        );
        assert_eq!(
            boot_time("cpu 1 2 3\nbtime 1700000000\nprocesses 9\n"),
            Some(1_700_000_000)
        );
    }

    #[test]
    fn this_process_reads_as_running() {
        let families = standard_families();
        let names: Vec<&str> = families.iter().map(|f| f.name).collect();
        for name in [
            "process_cpu_seconds",
            "process_resident_memory_bytes",
            "process_virtual_memory_bytes",
            "process_start_time_seconds",
            "process_open_fds",
            "process_max_fds",
        ] {
            assert!(names.contains(&name), "{name} missing from {names:?}");
        }
    }
}
