//! The benchmark's report: the markdown tables (README material, printed at the end of a run)
//! made from results.json's form.

use super::results::{BenchResults, IdleMemory};
use super::testbed::Mode;

/// Whether a contender is one of the namespace topology's (routing, proxy, xdp dsr/nat): those
/// have a CPU table of their own.
fn on_kernel_path(name: &str) -> bool {
    Mode::ALL.iter().any(|m| m.contender() == name)
}

fn ratio(r: Option<f64>) -> String {
    r.map_or("–".to_string(), |v| format!("{v:.2}x"))
}

/// The markdown table (README material: paste as is).
pub fn markdown(res: &BenchResults) -> String {
    let mut s = format!(
        "{} rounds x {} sessions, {} parallel, {} B messages, load: {}, sinks: {}; {} CPUs, {}, {}\n\n",
        res.rounds,
        res.sessions_per_run,
        res.concurrency,
        res.message_size,
        res.load_generator,
        res.sinks,
        res.machine.cpus,
        res.machine.kernel,
        res.machine.rustc
    );
    s.push_str("| contender | sessions/s (median) | min–max | p99 session (ms) | vs HAProxy | vs HAProxy, paired | vs direct | failed |\n");
    s.push_str("|---|---:|---:|---:|---:|---:|---:|---:|\n");
    for c in &res.contenders {
        s.push_str(&format!(
            "| {} | {:.0} | {:.0}–{:.0} | {} | {} | {} | {} | {} |\n",
            c.name,
            c.median_sessions_per_s,
            c.min_sessions_per_s,
            c.max_sessions_per_s,
            // smtp-source reports no latencies.
            if c.median_p99_ms > 0.0 {
                format!("{:.2}", c.median_p99_ms)
            } else {
                "–".to_string()
            },
            ratio(c.ratio_vs_haproxy),
            ratio(c.paired_ratio_vs_haproxy),
            ratio(c.ratio_vs_direct),
            c.failed_sessions
        ));
    }
    s.push_str(
        "\n| CPU per session (us, median), loopback | all CPUs | load generator | sinks | balancer process | kernel, rest | stolen by the hypervisor |\n|---|---:|---:|---:|---:|---:|---:|\n",
    );
    for c in &res.contenders {
        if on_kernel_path(&c.name) {
            continue;
        }
        if let Some(u) = &c.cpu_per_session {
            s.push_str(&format!(
                "| {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |\n",
                c.name, u.total_us, u.loadgen_us, u.sinks_us, u.balancer_us, u.other_us, u.steal_us
            ));
        }
    }
    if !res.distribution.is_empty() {
        s.push_str("\n| algorithm | sessions per backend | max/min |\n|---|---|---:|\n");
        for d in &res.distribution {
            let per: Vec<String> = d.assigned.iter().map(|(k, v)| format!("{k}={v}")).collect();
            s.push_str(&format!(
                "| {} | {} | {} |\n",
                d.algorithm,
                if per.is_empty() {
                    "(no totals)".to_string()
                } else {
                    per.join(" ")
                },
                d.max_over_min.map_or("–".into(), |v| format!("{v:.2}"))
            ));
        }
    }
    if let Some(m) = &res.idle_memory {
        s.push_str(&idle_markdown(m));
    }
    if let Some(r) = res.loadgen_vs_smtp_source {
        s.push_str(&format!(
            "\nload generator vs Postfix smtp-source, both straight at one sink, paired: {} (target: at least 1x)\n",
            ratio(Some(r))
        ));
    }
    if let Some(r) = res.limits_vs_none {
        s.push_str(&format!(
            "\nswitchyard least_conn with [service.limits] configured (not triggered) vs without, paired: {} (target: within 3 %)\n",
            ratio(Some(r))
        ));
    }
    s.push_str(&kernel_markdown(res));
    s.push_str(&xdp_cost_markdown(res));
    if let Some(reload) = &res.reload {
        s.push_str(&format!("\n{}\n", super::reload::describe(reload)));
    }
    if let Some(metrics) = &res.metrics {
        s.push_str(&format!("\n{}\n", super::metrics::describe(metrics)));
    }
    for sk in &res.skipped {
        s.push_str(&format!("\nnot measured: {} ({})", sk.name, sk.reason));
    }
    s.push('\n');
    s
}

/// Memory per idle session: switchyard's, and HAProxy's beside it with the ratio.
fn idle_markdown(m: &IdleMemory) -> String {
    let sy = &m.switchyard;
    let mut s = format!(
        "\nswitchyard memory: {:.0} bytes per idle session ({} sessions; RSS {} KiB before, {} KiB after)\n",
        sy.bytes_per_session, m.sessions, sy.rss_before_kib, sy.rss_after_kib
    );
    if let Some(h) = &m.haproxy {
        s.push_str(&format!(
            "HAProxy memory: {:.0} bytes per idle session (the same sessions and sinks; RSS {} KiB before, {} KiB after); switchyard/HAProxy: {} (target: at most 1x)\n",
            h.bytes_per_session,
            h.rss_before_kib,
            h.rss_after_kib,
            ratio(m.switchyard_over_haproxy)
        ));
    }
    s
}

/// The kernel path's section: ratios against its targets and CPU time per session.
fn kernel_markdown(res: &BenchResults) -> String {
    let Some(k) = &res.kernel_path else {
        return String::new();
    };
    let mut s = String::from(
        "\nKernel path (network namespaces, one veth/bridge segment, three sinks of its own, least_conn):\n\n\
         | contender | sessions/s | vs routing (target >= 0.9x) | vs proxy (target >= 2x) |\n|---|---:|---:|---:|\n",
    );
    for x in &k.xdp {
        let rate = res
            .contenders
            .iter()
            .find(|c| c.name == x.name)
            .map_or(0.0, |c| c.median_sessions_per_s);
        s.push_str(&format!(
            "| {} | {rate:.0} | {:.2}x | {:.2}x |\n",
            x.name, x.vs_routing, x.vs_proxy
        ));
    }
    if let Some(plain) = &k.plain {
        s.push_str(&format!(
            "\nPlain network (bridge and veths with default offloads, nothing on the peers; switchyard with mode = \"auto\", generic mode on veth): one MTA direct {:.0} sessions/s.\n\n\
             | contender | vs one MTA direct, paired by round (target for dsr >= 0.9x) |\n|---|---:|\n",
            plain.direct_sessions_per_s
        ));
        for x in &plain.xdp {
            s.push_str(&format!("| {} | {:.2}x |\n", x.name, x.vs_direct));
        }
    }
    s.push_str(
        "\n| CPU per session (us, median) | all CPUs | of which softirq | loadgen | sinks | switchyard process | kernel, rest | added over routing |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for c in &res.contenders {
        let Some(u) = &c.cpu_per_session else {
            continue;
        };
        if !on_kernel_path(&c.name) {
            continue;
        }
        let added = if c.name == Mode::Proxy.contender() {
            k.proxy_added_cpu_us
        } else if c.name == Mode::Routing.contender() {
            Some(0.0)
        } else {
            k.xdp
                .iter()
                .find(|x| x.name == c.name)
                .and_then(|x| x.added_cpu_us)
        };
        s.push_str(&format!(
            "| {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {} |\n",
            c.name,
            u.total_us,
            u.softirq_us,
            u.loadgen_us,
            u.sinks_us,
            u.balancer_us,
            u.other_us,
            added.map_or("–".into(), |a| format!("{a:+.0}"))
        ));
    }
    s
}

/// The XDP program's cost per packet against the pass-everything floor.
fn xdp_cost_markdown(res: &BenchResults) -> String {
    let Some(x) = &res.xdp_cost else {
        return String::new();
    };
    let drops = x.syn_drops.as_ref().map_or(String::new(), |d| {
        format!(
            "| SYN dropped, denied by the deny trie ({} runs) | {:.1} | {:.2}x | |\n\
             | SYN dropped, source over per_source_rate ({} runs) | {:.1} | {:.2}x | |\n",
            x.repeat, d.denied_ns, d.denied_vs_floor, x.repeat, d.too_fast_ns, d.too_fast_vs_floor
        )
    });
    let table = format!(
        "\nXDP program cost per packet (BPF_PROG_TEST_RUN, in the kernel, no network; dsr, least_conn, 3 backends):\n\n\
         | packet | ns per run | vs floor | target |\n|---|---:|---:|---:|\n\
         | floor: XDP_PASS at once ({} runs) | {:.1} | 1.00x | |\n\
         | established flow, client ACK ({} runs) | {:.1} | {:.2}x | <= 3x |\n\
         | not for a VIP ({} runs) | {:.1} | {:.2}x | <= 1.5x |\n\
         | SYN creating a flow ({} distinct SYNs, one run each; floor measured alike: {:.1} ns) | {:.1} | {:.2}x | |\n",
        x.repeat,
        x.floor_ns,
        x.repeat,
        x.established_ns,
        x.established_vs_floor,
        x.repeat,
        x.non_vip_ns,
        x.non_vip_vs_floor,
        x.new_flow_syns,
        x.floor_single_run_ns,
        x.new_flow_ns,
        x.new_flow_vs_floor
    );
    table + &drops
}

pub fn print_table(res: &BenchResults) {
    println!("\n{}", markdown(res));
}
