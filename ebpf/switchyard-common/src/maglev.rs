//! Consistent hashing of client addresses with a weighted Maglev lookup table (Eisenbud et al.,
//! "Maglev: A Fast and Reliable Software Network Load Balancer", NSDI 2016).
//!
//! The control plane builds a table of [`MAGLEV_TABLE_SIZE`] (a prime) slots, each naming a
//! backend; a client's backend is `table[hash(client address) % size]`, so selection is O(1) and
//! identical in the proxy and the XDP program.
//!
//! Building: every backend walks its own permutation of the slots, `offset + j * skip (mod
//! size)`, with `offset` and `skip` taken from a seedless hash of its *name* (see
//! [`hash`](crate::hash)). In turns, backends claim their next preferred slot that is still
//! free, taking their turns in the order of their names, not of the file: two balancers whose
//! configs name the same backends with the same weights build the same table, slot for slot,
//! whatever order the file lists them in and whatever reloads led there (the table names each
//! backend by its index in the list given, so each host maps it to its own). Weights: each turn a backend
//! earns its weight in credit and claims one slot per `max weight` of credit, so a weight-2
//! backend claims twice as often as a weight-1 one, and claims stay finely interleaved (a large
//! weight never claims a long burst, which would skew the last, partial turn).
//!
//! Lookup with unavailable or excluded backends: the slots after the client's slot are probed
//! (at most [`MAGLEV_PROBES`]), then any available backend. Only the clients of a backend that
//! is down move, and they spread over the others in proportion to their slots. Rebuilding the
//! table without a backend moves about its share of clients too: Maglev's minimal disruption.

use crate::backend::{BackendView, candidate_in};
use crate::walk::{Inline, Walk};
use crate::weighted_round_robin::probe_then_scan;

/// Slots examined after the client's own before falling back to any available backend.
pub const MAGLEV_PROBES: usize = 64;

/// Picks the backend for a client whose address hashes to `client_hash` (see
/// [`hash_ipv4`](crate::hash::hash_ipv4) / [`hash_ipv6`](crate::hash::hash_ipv6)), from a table
/// of `table_len` slots (`entry(i)` reads slot `i`). `candidate(b)` gives backend `b`'s view,
/// or `None` when `b` is excluded; `backends` is how many exist. `None` when none is available.
/// The fallback scans from `client_hash % backends`, so clients that find nothing in their
/// probe window still spread. `walk` runs the loops ([`Inline`] in userspace).
#[inline(always)]
pub fn pick(
    walk: impl Walk,
    client_hash: u64,
    table_len: usize,
    backends: usize,
    entry: impl Fn(usize) -> Option<usize>,
    candidate: impl Fn(usize) -> Option<BackendView>,
) -> Option<usize> {
    if table_len == 0 {
        return None;
    }
    let slot = (client_hash % table_len as u64) as usize;
    probe_then_scan(
        walk,
        table_len,
        slot,
        MAGLEV_PROBES,
        backends,
        client_hash,
        entry,
        candidate,
    )
    .map(|choice| choice.backend)
}

/// Slice convenience for userspace.
#[inline]
pub fn pick_in(
    client_hash: u64,
    table: &[u16],
    views: &[BackendView],
    exclude: &[usize],
) -> Option<usize> {
    pick(
        Inline,
        client_hash,
        table.len(),
        views.len(),
        |i| table.get(i).map(|&b| b as usize),
        |b| candidate_in(views, exclude, b),
    )
}

#[cfg(feature = "user")]
pub use builder::build_table;

#[cfg(feature = "user")]
mod builder {
    use alloc::vec;
    use alloc::vec::Vec;

    use crate::hash::name_hashes;
    use crate::{MAGLEV_TABLE_SIZE, MAX_BACKENDS};

    const EMPTY: u16 = u16::MAX;

    struct Walker {
        slot: u64,
        skip: u64,
        weight: u64,
        credit: u64,
    }

    /// Builds the lookup table for `backends` as (name, weight), indexed as given; at most
    /// [`MAX_BACKENDS`] are used and weight 0 counts as 1. Empty when there are no backends.
    /// Names should be distinct (the config guarantees it).
    pub fn build_table(backends: &[(&str, u32)]) -> Vec<u16> {
        let size = MAGLEV_TABLE_SIZE as u64;
        let backends = &backends[..backends.len().min(MAX_BACKENDS)];
        if backends.is_empty() {
            return Vec::new();
        }
        let mut walkers: Vec<Walker> = backends
            .iter()
            .map(|(name, weight)| {
                let (offset_hash, skip_hash) = name_hashes(name.as_bytes());
                Walker {
                    slot: offset_hash % size,
                    skip: skip_hash % (size - 1) + 1,
                    weight: (*weight).max(1) as u64,
                    credit: 0,
                }
            })
            .collect();
        let max_weight = walkers.iter().map(|w| w.weight).max().unwrap_or(1);
        // Who claims first wins a contested slot: by name, so the list's order cannot matter.
        let mut turns: Vec<usize> = (0..backends.len()).collect();
        turns.sort_by(|&a, &b| backends[a].0.cmp(backends[b].0));

        let mut table = vec![EMPTY; MAGLEV_TABLE_SIZE];
        let mut filled = 0;
        // The heaviest backend claims every turn, so this ends within `size` turns.
        'turns: loop {
            for &index in &turns {
                let walker = &mut walkers[index];
                walker.credit += walker.weight;
                if walker.credit < max_weight {
                    continue;
                }
                walker.credit -= max_weight;
                // `skip` is coprime with the prime `size`: the walk visits every slot, so a
                // free one is found while the table is not full.
                while table[walker.slot as usize] != EMPTY {
                    walker.slot = (walker.slot + walker.skip) % size;
                }
                table[walker.slot as usize] = index as u16;
                walker.slot = (walker.slot + walker.skip) % size;
                filled += 1;
                if filled == MAGLEV_TABLE_SIZE {
                    break 'turns;
                }
            }
        }
        table
    }
}

#[cfg(all(test, feature = "user"))]
mod tests {
    extern crate std;
    use std::format;
    use std::string::String;
    use std::vec;
    use std::vec::Vec;

    use super::*;
    use crate::hash::hash_ipv4;
    use crate::{MAGLEV_TABLE_SIZE, MAX_BACKENDS};

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("mta{i}")).collect()
    }

    fn config<'a>(names: &'a [String], weights: &[u32]) -> Vec<(&'a str, u32)> {
        names
            .iter()
            .zip(weights)
            .map(|(n, &w)| (n.as_str(), w))
            .collect()
    }

    fn slot_counts(table: &[u16], n: usize) -> Vec<usize> {
        let mut counts = vec![0; n];
        for &b in table {
            counts[b as usize] += 1;
        }
        counts
    }

    /// 10000 distinct client addresses, 10.0.0.0 upwards.
    fn clients() -> impl Iterator<Item = u64> {
        (0..10_000u32).map(|i| hash_ipv4((0x0a00_0000 + i * 7).to_be_bytes()))
    }

    #[test]
    fn builds_are_deterministic_and_full() {
        let names = names(5);
        let backends = config(&names, &[1, 1, 2, 1, 3]);
        let a = build_table(&backends);
        let b = build_table(&backends);
        assert_eq!(a.len(), MAGLEV_TABLE_SIZE);
        assert_eq!(a, b);
        assert!(a.iter().all(|&e| (e as usize) < 5));
    }

    #[test]
    fn the_order_of_the_list_does_not_change_which_backend_a_slot_names() {
        let names = names(7);
        let weights = [1, 3, 1, 2, 1, 5, 1];
        let listed = config(&names, &weights);
        let by_name = |table: &[u16], list: &[(&str, u32)]| -> Vec<String> {
            table.iter().map(|&i| list[i as usize].0.into()).collect()
        };
        let reference = by_name(&build_table(&listed), &listed);
        let mut reordered = listed.clone();
        for shift in 1..listed.len() {
            reordered.rotate_left(1);
            if shift % 2 == 0 {
                reordered.swap(0, listed.len() - 1);
            }
            let table = build_table(&reordered);
            assert!(
                by_name(&table, &reordered) == reference,
                "order {reordered:?}"
            );
        }
    }

    #[test]
    fn equal_weights_share_evenly() {
        let names = names(5);
        let table = build_table(&config(&names, &[1; 5]));
        let ideal = MAGLEV_TABLE_SIZE as f64 / 5.0;
        for count in slot_counts(&table, 5) {
            assert!(
                (count as f64 - ideal).abs() / ideal < 0.02,
                "{count} slots vs {ideal}"
            );
        }
    }

    #[test]
    fn slots_follow_weights_within_a_few_percent() {
        let names = names(4);
        let weights = [1, 2, 3, 4];
        let table = build_table(&config(&names, &weights));
        let counts = slot_counts(&table, 4);
        for (count, w) in counts.iter().zip(weights) {
            let ideal = MAGLEV_TABLE_SIZE as f64 * w as f64 / 10.0;
            assert!((*count as f64 - ideal).abs() / ideal < 0.03, "{counts:?}");
        }
        // A heavy backend among many light ones.
        let names = self::names(20);
        let mut weights = vec![1u32; 20];
        weights[7] = 1000;
        let counts = slot_counts(&build_table(&config(&names, &weights)), 20);
        let ideal = MAGLEV_TABLE_SIZE as f64 * 1000.0 / 1019.0;
        assert!(
            (counts[7] as f64 - ideal).abs() / ideal < 0.01,
            "{counts:?}"
        );
        assert!(counts.iter().all(|&c| c > 0));
    }

    #[test]
    fn the_same_client_always_gets_the_same_backend() {
        let names = names(5);
        let table = build_table(&config(&names, &[1; 5]));
        let views = [BackendView::up(1); 5];
        for client in clients().take(200) {
            let first = pick_in(client, &table, &views, &[]);
            assert!(first.is_some());
            for _ in 0..3 {
                assert_eq!(pick_in(client, &table, &views, &[]), first);
            }
        }
    }

    #[test]
    fn a_down_backend_moves_only_its_own_clients() {
        let names = names(5);
        let table = build_table(&config(&names, &[1; 5]));
        let mut views = [BackendView::up(1); 5];
        let before: Vec<_> = clients()
            .map(|c| pick_in(c, &table, &views, &[]).unwrap())
            .collect();
        views[2].healthy = 0;
        let after: Vec<_> = clients()
            .map(|c| pick_in(c, &table, &views, &[]).unwrap())
            .collect();
        let mut moved = 0;
        let mut moved_to = [0usize; 5];
        for (b, a) in before.iter().zip(&after) {
            assert_ne!(*a, 2);
            if b != a {
                assert_eq!(*b, 2, "a client of a healthy backend moved");
                moved += 1;
                moved_to[*a] += 1;
            }
        }
        let fraction = moved as f64 / 10_000.0;
        assert!((0.15..=0.25).contains(&fraction), "moved {fraction}");
        // They spread over the others rather than all landing on one.
        for (i, &count) in moved_to.iter().enumerate() {
            if i != 2 {
                assert!(count as f64 > moved as f64 * 0.15, "{moved_to:?}");
            }
        }
        // Excluding (a failed connect) behaves the same way as down.
        views[2].healthy = 1;
        let excluded: Vec<_> = clients()
            .map(|c| pick_in(c, &table, &views, &[2]).unwrap())
            .collect();
        assert_eq!(excluded, after);
    }

    #[test]
    fn rebuilding_without_a_backend_moves_about_its_share() {
        let all = names(5);
        let table = build_table(&config(&all, &[1; 5]));
        let rest: Vec<String> = all.iter().filter(|n| *n != "mta3").cloned().collect();
        let smaller = build_table(&config(&rest, &[1; 4]));
        let views = [BackendView::up(1); 5];
        let mut moved = 0;
        for client in clients() {
            let before = &all[pick_in(client, &table, &views, &[]).unwrap()];
            let after = &rest[pick_in(client, &smaller, &views[..4], &[]).unwrap()];
            if before != after {
                moved += 1;
            }
        }
        let fraction = moved as f64 / 10_000.0;
        assert!((0.15..=0.25).contains(&fraction), "moved {fraction}");
    }

    #[test]
    fn none_when_nothing_is_available() {
        let names = names(3);
        let table = build_table(&config(&names, &[1; 3]));
        let views = [BackendView {
            weight: 1,
            ..Default::default()
        }; 3];
        assert_eq!(pick_in(42, &table, &views, &[]), None);
        assert_eq!(
            pick_in(42, &table, &[BackendView::up(1); 3], &[0, 1, 2]),
            None
        );
        assert!(build_table(&[]).is_empty());
        assert_eq!(pick_in(42, &[], &[], &[]), None);
    }

    #[test]
    fn falls_back_when_probes_find_nothing() {
        // One available backend owning few slots: most clients' 64-slot windows miss it.
        let names = names(100);
        let table = build_table(&config(&names, &[1; 100]));
        let mut views = [BackendView::up(1); 100];
        for v in views.iter_mut().take(99) {
            v.healthy = 0;
        }
        for client in clients().take(500) {
            assert_eq!(pick_in(client, &table, &views, &[]), Some(99));
        }
    }

    #[test]
    fn handles_max_backends() {
        let names = names(MAX_BACKENDS);
        let weights: Vec<u32> = (0..MAX_BACKENDS as u32).map(|i| 1 + i % 2).collect();
        let table = build_table(&config(&names, &weights));
        let counts = slot_counts(&table, MAX_BACKENDS);
        // 65537 slots over 1536 weight units: ~42.7 per unit.
        for (count, w) in counts.iter().zip(&weights) {
            let ideal = 65537.0 * *w as f64 / 1536.0;
            assert!((*count as f64 - ideal).abs() <= 2.0, "{count} vs {ideal}");
        }
        let views: Vec<_> = weights.iter().map(|&w| BackendView::up(w)).collect();
        for client in clients().take(100) {
            assert!(pick_in(client, &table, &views, &[]).is_some());
        }
    }
}
