//! Smooth weighted round robin: a prebuilt table of backend indices walked by a cursor.
//!
//! The control plane builds the table once per config with nginx's smooth weighted round robin
//! (each step every backend gains its weight, the richest is chosen and pays the total), so a
//! weight-5 backend among weight-1 ones is interleaved with them rather than picked five times
//! in a row, and over one pass of the table every backend appears exactly as often as its
//! weight (after dividing all weights by their GCD). Selection is then O(1): `table[cursor %
//! len]`, which the XDP program can do with a per-CPU cursor and the proxy with one atomic.
//!
//! Table size: weights are first reduced by their GCD. If their sum still exceeds
//! [`WRR_TABLE_MAX`], each weight is scaled to `max(1, w * WRR_TABLE_MAX / sum)` (ratios then hold
//! to within one entry per backend), so the table never exceeds `WRR_TABLE_MAX + MAX_BACKENDS`
//! entries. Entries are `u16` because [`MAX_BACKENDS`] is 1024.
//!
//! Unavailable or excluded entries are skipped by probing forward at most [`WRR_PROBES`]
//! positions; the [`Choice`] says how many positions were consumed so the caller can move its
//! cursor past them (then a down backend's turns go to the backends after it in the table, in
//! proportion to their weights, instead of all to its neighbour). If every probe fails, a
//! bounded scan over all backends, from the cursor's table position, finds any available one.
//! The choice depends on the cursor only through `cursor % table_len`, so the proxy may keep an
//! ever-growing cursor and the XDP program one reduced to the table ([`cursor_after`]).

use crate::MAX_BACKENDS;
use crate::backend::{BackendView, available_candidate, candidate_in};
use crate::walk::{Inline, NONE, Step, Walk, ring};

/// Upper bound on the weighted table's length before scaling (see the module docs).
pub const WRR_TABLE_MAX: usize = 65536;

/// Table positions examined before falling back to a scan of all backends.
pub const WRR_PROBES: usize = 64;

/// A cursor-based selection: the chosen backend and how many table positions it consumed
/// (1 when the entry under the cursor was taken; more when entries were skipped).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Choice {
    pub backend: usize,
    pub advance: usize,
}

/// Picks from a weighted table of `table_len` entries (`entry(i)` reads entry `i`) starting at
/// `cursor`. `candidate(b)` gives backend `b`'s view, or `None` when `b` is excluded or does not
/// exist; only [`BackendView::available`] candidates are chosen. `backends` is how many
/// backends exist (for the fallback scan). Returns `None` when no backend may be chosen. `walk`
/// runs the loops ([`Inline`] in userspace).
#[inline(always)]
pub fn pick(
    walk: impl Walk,
    table_len: usize,
    cursor: usize,
    backends: usize,
    entry: impl Fn(usize) -> Option<usize>,
    candidate: impl Fn(usize) -> Option<BackendView>,
) -> Option<Choice> {
    if table_len == 0 {
        return None;
    }
    let position = cursor % table_len;
    probe_then_scan(
        walk,
        table_len,
        position,
        WRR_PROBES,
        backends,
        position as u64,
        entry,
        candidate,
    )
}

/// The cursor after a pick from `cursor` on a table of `table_len` entries, reduced to the
/// table: `advance` positions on, or one when nothing was chosen. (The proxy's selector moves
/// its shared cursor by the same amounts in two atomic adds without reducing it.)
#[inline(always)]
pub fn cursor_after(cursor: usize, table_len: usize, choice: Option<Choice>) -> usize {
    if table_len == 0 {
        return 0;
    }
    // A choice never advances past the table's length: `ring` needs no division.
    let moved = choice.map_or(1, |choice| choice.advance.min(table_len));
    ring(cursor % table_len, moved, table_len)
}

/// Slice convenience for userspace: `table` from [`build_table`], `views` indexed by backend,
/// `exclude` the backends already tried.
#[inline]
pub fn pick_in(
    table: &[u16],
    cursor: usize,
    views: &[BackendView],
    exclude: &[usize],
) -> Option<Choice> {
    pick(
        Inline,
        table.len(),
        cursor,
        views.len(),
        |i| table.get(i).map(|&b| b as usize),
        |b| candidate_in(views, exclude, b),
    )
}

/// What the table-driven algorithms (this one and Maglev) share: the first choosable backend
/// named by the table from `position` (at most `probes` entries, wrapping round), else any
/// available backend by a scan from `scan_start % backends` (reduced in 64 bits, so that a
/// host with a narrower `usize` scans from where the kernel does). `position < table_len`; `table_len > 0`.
/// The advance is the entries consumed: up to the found one, or every probe.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(crate) fn probe_then_scan<E, C>(
    walk: impl Walk,
    table_len: usize,
    position: usize,
    probes: usize,
    backends: usize,
    scan_start: u64,
    entry: E,
    candidate: C,
) -> Option<Choice>
where
    E: Fn(usize) -> Option<usize>,
    C: Fn(usize) -> Option<BackendView>,
{
    let probes = probes.min(table_len);
    let mut probe = Probe {
        entry,
        candidate,
        position,
        table_len,
        found: NONE,
        steps: 0,
    };
    walk.walk(probes, &mut probe);
    if probe.found != NONE {
        return Some(Choice {
            backend: probe.found,
            advance: probe.steps,
        });
    }
    let backend = scan_any(walk, scan_start, backends, probe.candidate)?;
    Some(Choice {
        backend,
        advance: probes,
    })
}

/// Probing the table: the first entry from `position` naming a choosable backend.
struct Probe<E, C> {
    entry: E,
    candidate: C,
    position: usize,
    table_len: usize,
    found: usize,
    steps: usize,
}

impl<E, C> Step for Probe<E, C>
where
    E: Fn(usize) -> Option<usize>,
    C: Fn(usize) -> Option<BackendView>,
{
    #[inline(always)]
    fn step(&mut self, i: usize) -> bool {
        let position = ring(self.position, i, self.table_len);
        let Some(backend) = (self.entry)(position) else {
            return false;
        };
        if available_candidate(&self.candidate, backend).is_none() {
            return false;
        }
        self.found = backend;
        self.steps = i + 1;
        true
    }
}

/// Any available backend, scanning from `start % backends`; bounded by [`MAX_BACKENDS`].
#[inline(always)]
fn scan_any<C>(walk: impl Walk, start: u64, backends: usize, candidate: C) -> Option<usize>
where
    C: Fn(usize) -> Option<BackendView>,
{
    let backends = backends.min(MAX_BACKENDS);
    if backends == 0 {
        return None;
    }
    let mut scan = Scan {
        candidate,
        start: (start % backends as u64) as usize,
        backends,
        found: NONE,
    };
    walk.walk(backends, &mut scan);
    (scan.found != NONE).then_some(scan.found)
}

/// Scanning backends round from `start` for the first available one.
struct Scan<C> {
    candidate: C,
    start: usize,
    backends: usize,
    found: usize,
}

impl<C> Step for Scan<C>
where
    C: Fn(usize) -> Option<BackendView>,
{
    #[inline(always)]
    fn step(&mut self, i: usize) -> bool {
        let backend = ring(self.start, i, self.backends);
        if available_candidate(&self.candidate, backend).is_none() {
            return false;
        }
        self.found = backend;
        true
    }
}

#[cfg(feature = "user")]
pub use builder::build_table;

#[cfg(feature = "user")]
mod builder {
    use alloc::vec::Vec;

    use super::WRR_TABLE_MAX;
    use crate::MAX_BACKENDS;

    /// Builds the smooth weighted round-robin table for `weights` (indexed by backend; at most
    /// [`MAX_BACKENDS`] are used, weight 0 counts as 1). Deterministic.
    pub fn build_table(weights: &[u32]) -> Vec<u16> {
        let count = weights.len().min(MAX_BACKENDS);
        let mut reduced: Vec<u64> = weights[..count].iter().map(|&w| w.max(1) as u64).collect();
        reduce_by_gcd(&mut reduced);
        let total: u64 = reduced.iter().sum();
        if total > WRR_TABLE_MAX as u64 {
            for w in reduced.iter_mut() {
                *w = (*w * WRR_TABLE_MAX as u64 / total).max(1);
            }
            reduce_by_gcd(&mut reduced);
        }
        let total: u64 = reduced.iter().sum();

        // nginx's smooth weighted round robin, run for one full period (`total` steps), after
        // which every `current` is back to zero and the sequence repeats.
        let mut current: Vec<i64> = alloc::vec![0; count];
        let mut table = Vec::with_capacity(total as usize);
        for _ in 0..total {
            let mut best = 0;
            for i in 0..count {
                current[i] += reduced[i] as i64;
                if current[i] > current[best] {
                    best = i;
                }
            }
            current[best] -= total as i64;
            table.push(best as u16);
        }
        table
    }

    fn reduce_by_gcd(weights: &mut [u64]) {
        let divisor = weights.iter().fold(0, |acc, &w| gcd(acc, w));
        if divisor > 1 {
            for w in weights.iter_mut() {
                *w /= divisor;
            }
        }
    }

    fn gcd(mut a: u64, mut b: u64) -> u64 {
        while b != 0 {
            (a, b) = (b, a % b);
        }
        a
    }
}

#[cfg(all(test, feature = "user"))]
mod tests {
    extern crate std;
    use std::vec;
    use std::vec::Vec;

    use super::*;

    fn counts(table: &[u16], n: usize) -> Vec<usize> {
        let mut counts = vec![0; n];
        for &b in table {
            counts[b as usize] += 1;
        }
        counts
    }

    /// Longest run of one backend over the table walked cyclically twice.
    fn longest_run(table: &[u16]) -> usize {
        let (mut longest, mut run, mut last) = (0, 0, u16::MAX);
        for &b in table.iter().chain(table.iter()) {
            run = if b == last { run + 1 } else { 1 };
            last = b;
            longest = longest.max(run);
        }
        longest
    }

    #[test]
    fn nginx_smooth_order_for_5_1_1() {
        let table = build_table(&[5, 1, 1]);
        // The sequence nginx documents for weights {5, 1, 1}: a a b a c a a.
        assert_eq!(table, vec![0, 0, 1, 0, 2, 0, 0]);
        assert!(
            longest_run(&table) < 5,
            "weight-5 backend picked 5 times in a row"
        );
    }

    #[test]
    fn ratios_are_exact_over_one_period_and_gcd_reduced() {
        let table = build_table(&[100, 200, 300]);
        assert_eq!(table.len(), 6);
        assert_eq!(counts(&table, 3), vec![1, 2, 3]);

        let weights = [7, 3, 11, 1, 5];
        let table = build_table(&weights);
        assert_eq!(table.len(), 27);
        assert_eq!(counts(&table, 5), vec![7, 3, 11, 1, 5]);
    }

    #[test]
    fn smooth_spreads_a_heavy_backend() {
        // Ten of fifteen turns: within one period no more than two in a row; across the wrap
        // nginx's sequence joins its last two with its first two.
        let table = build_table(&[10, 1, 1, 1, 1, 1]);
        let within = table
            .windows(3)
            .filter(|w| w.iter().all(|&b| b == 0))
            .count();
        assert_eq!(within, 0, "{table:?}");
        assert!(longest_run(&table) <= 4, "{table:?}");
    }

    #[test]
    fn oversized_weight_sums_are_scaled_with_bounded_error() {
        let weights: Vec<u32> = (0..MAX_BACKENDS as u32).map(|i| 1000 - (i % 997)).collect();
        let total: u64 = weights.iter().map(|&w| w as u64).sum();
        assert!(total > WRR_TABLE_MAX as u64);
        let table = build_table(&weights);
        assert!(table.len() <= WRR_TABLE_MAX + MAX_BACKENDS);
        let counts = counts(&table, weights.len());
        for (i, &w) in weights.iter().enumerate() {
            let ideal = w as u64 * WRR_TABLE_MAX as u64 / total;
            assert!(
                counts[i] as u64 >= ideal.max(1) && counts[i] as u64 <= ideal + 1,
                "backend {i}"
            );
        }
    }

    #[test]
    fn cursor_walk_follows_the_table() {
        let table = build_table(&[2, 1]);
        let views = [BackendView::up(2), BackendView::up(1)];
        let picks: Vec<usize> = (0..6)
            .map(|c| pick_in(&table, c, &views, &[]).unwrap().backend)
            .collect();
        assert_eq!(picks, vec![0, 1, 0, 0, 1, 0]);
    }

    #[test]
    fn skips_unavailable_and_excluded_and_reports_advance() {
        let table = build_table(&[1, 1, 1]);
        let mut views = [BackendView::up(1), BackendView::up(1), BackendView::up(1)];
        views[1].healthy = 0;
        assert_eq!(
            pick_in(&table, 1, &views, &[]),
            Some(Choice {
                backend: 2,
                advance: 2
            })
        );
        assert_eq!(
            pick_in(&table, 1, &views, &[2]),
            Some(Choice {
                backend: 0,
                advance: 3
            })
        );
        views[0].max_connections = 3;
        views[0].active = 3;
        assert_eq!(
            pick_in(&table, 0, &views, &[]),
            Some(Choice {
                backend: 2,
                advance: 3
            })
        );
        assert_eq!(pick_in(&table, 0, &views, &[2]), None);
    }

    #[test]
    fn advancing_past_skips_keeps_weights_among_the_rest() {
        // Backend 1 is down: its turns must be shared in the 5:1 ratio of the others.
        let table = build_table(&[5, 1, 1]);
        let mut views = [BackendView::up(5), BackendView::up(1), BackendView::up(1)];
        views[1].healthy = 0;
        let mut cursor = 0;
        let mut picked = [0usize; 3];
        for _ in 0..600 {
            let choice = pick_in(&table, cursor, &views, &[]).unwrap();
            picked[choice.backend] += 1;
            cursor += choice.advance;
        }
        assert_eq!(picked, [500, 0, 100]);
    }

    #[test]
    fn falls_back_to_a_scan_when_probes_run_out() {
        // 100 backends, only the last available: the probe window cannot reach it from 0.
        let table = build_table(&[1; 100]);
        let mut views = [BackendView::up(1); 100];
        for v in views.iter_mut().take(99) {
            v.healthy = 0;
        }
        let choice = pick_in(&table, 0, &views, &[]).unwrap();
        assert_eq!(choice.backend, 99);
        assert_eq!(choice.advance, WRR_PROBES);
    }

    #[test]
    fn a_cursor_kept_reduced_to_the_table_picks_as_an_unbounded_one() {
        // The proxy's cursor grows; the kernel's stays within the table (`cursor_after`).
        // Picks, fallback scans included, must not tell them apart.
        let mut weights = vec![5u32; 40];
        weights[3] = 1;
        weights[30] = 2;
        let table = build_table(&weights);
        let mut views: Vec<BackendView> = weights.iter().map(|&w| BackendView::up(w)).collect();
        for (i, v) in views.iter_mut().enumerate() {
            v.healthy = (i == 3 || i == 30) as u32;
        }
        let (mut unbounded, mut reduced) = (0usize, 0usize);
        let mut fallbacks = 0;
        for _ in 0..500 {
            let a = pick_in(&table, unbounded, &views, &[]);
            let b = pick_in(&table, reduced, &views, &[]);
            assert_eq!(a, b, "cursor {unbounded} vs {reduced}");
            fallbacks += usize::from(a.is_some_and(|c| c.advance == WRR_PROBES));
            unbounded += a.map_or(1, |c| c.advance);
            reduced = cursor_after(reduced, table.len(), b);
            assert!(reduced < table.len());
        }
        assert!(
            fallbacks > 50,
            "the fallback scan must be exercised: {fallbacks}"
        );
    }

    #[test]
    fn none_when_nothing_is_available() {
        let table = build_table(&[1, 2]);
        let views = [BackendView {
            weight: 1,
            ..Default::default()
        }; 2];
        assert_eq!(pick_in(&table, 0, &views, &[]), None);
        assert_eq!(pick_in(&[], 0, &[], &[]), None);
    }

    #[test]
    fn handles_max_backends() {
        let weights: Vec<u32> = (0..MAX_BACKENDS as u32).map(|i| 1 + i % 3).collect();
        let table = build_table(&weights);
        assert_eq!(table.len(), weights.iter().sum::<u32>() as usize);
        let views: Vec<BackendView> = weights.iter().map(|&w| BackendView::up(w)).collect();
        let mut cursor = 0;
        let mut picked = vec![0usize; MAX_BACKENDS];
        for _ in 0..table.len() {
            let choice = pick_in(&table, cursor, &views, &[]).unwrap();
            picked[choice.backend] += 1;
            cursor += choice.advance;
        }
        assert_eq!(
            picked,
            weights.iter().map(|&w| w as usize).collect::<Vec<_>>()
        );
    }
}
