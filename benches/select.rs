//! One backend selection per algorithm at 3, 64 and 1024 backends.
//!
//! Tables are built outside the measured closures; each iteration is one pick over a snapshot
//! of backend views with uneven loads and response times, with the cursor (or turn, or client
//! address) moving on every iteration as it does in service.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use switchyard_common::backend::BackendView;
use switchyard_common::hash::hash_ipv4;
use switchyard_common::{least_conn, least_time, maglev, round_robin, weighted_round_robin};

const SIZES: [usize; 3] = [3, 64, 1024];

/// Healthy backends with mixed weights, loads and latencies; every 16th is down.
fn views(n: usize) -> Vec<BackendView> {
    (0..n)
        .map(|i| BackendView {
            active: ((i * 7919) % 50) as u32,
            weight: 1 + (i % 4) as u32,
            max_connections: 0,
            healthy: (i % 16 != 15) as u32,
            response_us: 500 + ((i * 104_729) % 5000) as u32,
        })
        .collect()
}

fn names(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("mta{i}")).collect()
}

fn select(c: &mut Criterion) {
    let mut group = c.benchmark_group("select");
    for &n in &SIZES {
        let views = views(n);
        let weights: Vec<u32> = views.iter().map(|v| v.weight).collect();
        let weighted = weighted_round_robin::build_table(&weights);
        let names = names(n);
        let named: Vec<(&str, u32)> = names
            .iter()
            .map(|s| s.as_str())
            .zip(weights.iter().copied())
            .collect();
        let maglev_table = maglev::build_table(&named);

        group.bench_with_input(BenchmarkId::new("round_robin", n), &n, |b, _| {
            let mut cursor = 0usize;
            b.iter(|| {
                let choice = round_robin::pick_in(cursor, black_box(&views), &[]);
                cursor = cursor.wrapping_add(choice.map_or(1, |c| c.advance));
                choice
            })
        });
        group.bench_with_input(BenchmarkId::new("weighted_round_robin", n), &n, |b, _| {
            let mut cursor = 0usize;
            b.iter(|| {
                let choice =
                    weighted_round_robin::pick_in(&weighted, cursor, black_box(&views), &[]);
                cursor = cursor.wrapping_add(choice.map_or(1, |c| c.advance));
                choice
            })
        });
        group.bench_with_input(BenchmarkId::new("least_conn", n), &n, |b, _| {
            let mut turn = 0usize;
            b.iter(|| {
                turn = turn.wrapping_add(1);
                least_conn::pick_in(turn, black_box(&views), &[])
            })
        });
        group.bench_with_input(BenchmarkId::new("ip_hash", n), &n, |b, _| {
            let mut client = 0x0a00_0000u32;
            b.iter(|| {
                client = client.wrapping_add(1);
                maglev::pick_in(
                    hash_ipv4(client.to_be_bytes()),
                    &maglev_table,
                    black_box(&views),
                    &[],
                )
            })
        });
        group.bench_with_input(BenchmarkId::new("least_time", n), &n, |b, _| {
            let mut turn = 0usize;
            b.iter(|| {
                turn = turn.wrapping_add(1);
                least_time::pick_in(turn, black_box(&views), &[])
            })
        });
    }
    group.finish();
}

criterion_group!(benches, select);
criterion_main!(benches);
