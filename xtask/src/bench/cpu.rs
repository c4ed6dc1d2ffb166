//! CPU accounting from /proc: the machine's busy, softirq and steal time, and each process's
//! user and system time, sampled around a run and turned into time per session.

use super::results::CpuUse;

/// Machine-wide and per-process CPU counters at one instant.
pub struct CpuSample {
    /// Busy and softirq time of all CPUs, in clock ticks.
    busy: u64,
    softirq: u64,
    steal: u64,
    /// This process (the built-in load generator runs in it) and its reaped children (the
    /// load generator in a namespace, smtp-source), in microseconds.
    loadgen_us: u64,
    sinks: u64,
    balancer: u64,
}

impl CpuSample {
    pub fn take(sink_pids: &[u32], balancer_pids: &[u32]) -> CpuSample {
        use nix::sys::resource::{UsageWho, getrusage};
        let (busy, softirq, steal) = machine_ticks();
        let used = |who| {
            getrusage(who)
                .map(|u| {
                    let us = |t: nix::sys::time::TimeVal| {
                        t.tv_sec() as u64 * 1_000_000 + t.tv_usec() as u64
                    };
                    us(u.user_time()) + us(u.system_time())
                })
                .unwrap_or(0)
        };
        CpuSample {
            busy,
            softirq,
            steal,
            loadgen_us: used(UsageWho::RUSAGE_SELF) + used(UsageWho::RUSAGE_CHILDREN),
            sinks: sink_pids.iter().map(|p| process_ticks(*p)).sum(),
            balancer: balancer_pids.iter().map(|p| process_ticks(*p)).sum(),
        }
    }

    pub fn since(&self, before: &CpuSample, sessions: u64) -> CpuUse {
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { nix::libc::sysconf(nix::libc::_SC_CLK_TCK) }.max(1) as f64;
        let n = sessions.max(1) as f64;
        let per = |ticks: u64| ticks as f64 * 1e6 / hz / n;
        let total_us = per(self.busy.saturating_sub(before.busy));
        let loadgen_us = self.loadgen_us.saturating_sub(before.loadgen_us) as f64 / n;
        let sinks_us = per(self.sinks.saturating_sub(before.sinks));
        let balancer_us = per(self.balancer.saturating_sub(before.balancer));
        CpuUse {
            total_us,
            softirq_us: per(self.softirq.saturating_sub(before.softirq)),
            steal_us: per(self.steal.saturating_sub(before.steal)),
            loadgen_us,
            sinks_us,
            balancer_us,
            other_us: (total_us - loadgen_us - sinks_us - balancer_us).max(0.0),
        }
    }
}

/// All CPUs' busy ticks (user, nice, system, irq, softirq: the work this machine did), softirq
/// ticks, and steal ticks (time the hypervisor gave to other guests), from /proc/stat.
fn machine_ticks() -> (u64, u64, u64) {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = text.lines().find(|l| l.starts_with("cpu ")) else {
        return (0, 0, 0);
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let get = |i: usize| v.get(i).copied().unwrap_or(0);
    let busy = get(0) + get(1) + get(2) + get(5) + get(6);
    (busy, get(6), get(7))
}

/// `pids` and their child processes (nginx's workers under its master).
pub fn with_children(pids: &[u32]) -> Vec<u32> {
    let mut all = pids.to_vec();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return all;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // The parent's pid is the second field after the parenthesised command name.
        let parent = stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if parent.is_some_and(|p| pids.contains(&p)) {
            all.push(pid);
        }
    }
    all
}

/// utime + stime of a process (all its threads), in clock ticks; 0 if it is gone.
pub fn process_ticks(pid: u32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
        return 0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let get = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    get(11) + get(12)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_tree_includes_its_children() {
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .expect("spawn sleep");
        let tree = with_children(&[std::process::id()]);
        let _ = child.kill();
        let _ = child.wait();
        assert!(tree.contains(&std::process::id()));
        assert!(tree.contains(&child.id()), "{tree:?}");
    }
}
