//! Weighted least connections: the available backend with the lowest `active / weight`.
//!
//! Ratios are compared by cross-multiplication in `u64` (`a.active * b.weight < b.active *
//! a.weight`): exact, and free of division and floating point, which BPF lacks.
//!
//! Ties must not herd: with short sessions that end before the next one arrives, "first of the
//! equal backends" would send everything to one of them. Starting the scan at a rotating offset
//! is not enough either (the backend after a busy one would inherit the busy one's turns), so the
//! scan takes two passes: the first finds the lowest load and how many backends share it, the
//! second takes the `turn % ties`-th of them in index order. With a counter for `turn`, tied
//! backends take exact turns. Both loops are bounded by [`MAX_BACKENDS`] for the verifier.

use crate::MAX_BACKENDS;
use crate::backend::{BackendView, candidate_in};

/// `a` is strictly less loaded than `b`, relative to their weights (weight 0 counts as 1).
#[inline(always)]
pub fn less_loaded(a: &BackendView, b: &BackendView) -> bool {
    let (aw, bw) = (a.weight.max(1) as u64, b.weight.max(1) as u64);
    (a.active as u64) * bw < (b.active as u64) * aw
}

/// Picks among `backends` backends; `candidate(b)` gives backend `b`'s view, or `None` when
/// `b` is excluded. Only available backends are chosen; `None` when there is none. `turn`
/// rotates among equally loaded backends (pass a counter that grows by one per pick).
#[inline(always)]
pub fn pick(
    backends: usize,
    turn: usize,
    candidate: impl Fn(usize) -> Option<BackendView>,
) -> Option<usize> {
    argmin_taking_turns(backends, turn, candidate, less_loaded)
}

/// The available backend minimising the order `less`, the `turn % ties`-th one among ties.
/// Views are read twice; if they changed in between (other CPUs or threads assigning) and the
/// chosen tie can no longer be found, the first pass's first minimum is returned.
#[inline(always)]
pub(crate) fn argmin_taking_turns(
    backends: usize,
    turn: usize,
    candidate: impl Fn(usize) -> Option<BackendView>,
    less: impl Fn(&BackendView, &BackendView) -> bool,
) -> Option<usize> {
    // Plain integers with a sentinel rather than an `Option<(usize, BackendView)>`: LLVM can
    // spill an `Option`'s uninitialised payload, and the verifier rejects reading it.
    let mut first = usize::MAX;
    let mut lowest = BackendView::default();
    let mut ties: usize = 0;
    for index in 0..MAX_BACKENDS {
        if index >= backends {
            break;
        }
        let Some(view) = candidate(index) else {
            continue;
        };
        if !view.available() {
            continue;
        }
        if first == usize::MAX || less(&view, &lowest) {
            first = index;
            lowest = view;
            ties = 1;
        } else if !less(&lowest, &view) {
            ties += 1;
        }
    }
    if first == usize::MAX {
        return None;
    }
    if ties <= 1 {
        return Some(first);
    }
    let mut wanted = turn % ties;
    for index in 0..MAX_BACKENDS {
        if index >= backends {
            break;
        }
        let Some(view) = candidate(index) else {
            continue;
        };
        if view.available() && !less(&view, &lowest) && !less(&lowest, &view) {
            if wanted == 0 {
                return Some(index);
            }
            wanted -= 1;
        }
    }
    Some(first)
}

/// Slice convenience for userspace.
#[inline]
pub fn pick_in(turn: usize, views: &[BackendView], exclude: &[usize]) -> Option<usize> {
    pick(views.len(), turn, |b| candidate_in(views, exclude, b))
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec;
    use std::vec::Vec;

    use super::*;
    use crate::backend::assert_skips_unavailable_excluded_and_full;

    fn view(active: u32, weight: u32) -> BackendView {
        BackendView {
            active,
            ..BackendView::up(weight)
        }
    }

    #[test]
    fn prefers_the_least_loaded_relative_to_weight() {
        let views = [view(4, 1), view(1, 1), view(3, 1)];
        for turn in 0..3 {
            assert_eq!(pick_in(turn, &views, &[]), Some(1));
        }
        // 6/3 = 2 beats 3/1 = 3 and 5/2 = 2.5.
        let views = [view(3, 1), view(5, 2), view(6, 3)];
        for turn in 0..3 {
            assert_eq!(pick_in(turn, &views, &[]), Some(2));
        }
    }

    #[test]
    fn ties_take_turns() {
        let views = [view(2, 1), view(2, 1), view(2, 1), view(9, 1)];
        let picks: Vec<_> = (0..4).map(|t| pick_in(t, &views, &[]).unwrap()).collect();
        assert_eq!(picks, vec![0, 1, 2, 0]);
        // Weighted ties too: 2/1 == 4/2.
        let views = [view(2, 1), view(4, 2)];
        assert_eq!(pick_in(0, &views, &[]), Some(0));
        assert_eq!(pick_in(1, &views, &[]), Some(1));
    }

    #[test]
    fn simulated_uneven_loads_converge_to_weights() {
        // Assign 600 connections one by one with a growing turn and no departures: counts
        // end in the weights' ratio 1:2:3.
        let mut views = [view(0, 1), view(0, 2), view(0, 3)];
        for turn in 0..600 {
            let chosen = pick_in(turn, &views, &[]).unwrap();
            views[chosen].active += 1;
        }
        assert_eq!(
            [views[0].active, views[1].active, views[2].active],
            [100, 200, 300]
        );
    }

    #[test]
    fn long_sessions_on_one_backend_steer_new_ones_away() {
        // Backend 0 holds 10 long sessions; 30 short ones arrive and leave one at a time.
        let views = [view(10, 1), view(0, 1), view(0, 1)];
        let mut picked = [0; 3];
        for turn in 0..30 {
            picked[pick_in(turn, &views, &[]).unwrap()] += 1;
        }
        assert_eq!(picked, [0, 15, 15]);
    }

    #[test]
    fn skips_unavailable_excluded_and_full() {
        assert_skips_unavailable_excluded_and_full(
            [view(0, 1), view(5, 1), view(7, 1)],
            |views, exclude| pick_in(0, views, exclude),
        );
    }

    #[test]
    fn none_when_nothing_is_available() {
        assert_eq!(pick_in(0, &[], &[]), None);
        assert_eq!(pick_in(3, &[BackendView::default(); 4], &[]), None);
    }

    #[test]
    fn no_overflow_at_extreme_counts() {
        let views = [view(u32::MAX, 1000), view(u32::MAX - 1, 1000)];
        assert_eq!(pick_in(0, &views, &[]), Some(1));
    }

    #[test]
    fn handles_max_backends() {
        let mut views = vec![view(5, 1); MAX_BACKENDS];
        views[1000].active = 4;
        for turn in [0, 999, 1001, 5000] {
            assert_eq!(pick_in(turn, &views, &[]), Some(1000));
        }
        views[1000].active = 5;
        let picks: Vec<_> = (1020..1028)
            .map(|t| pick_in(t, &views, &[]).unwrap())
            .collect();
        assert_eq!(picks, vec![1020, 1021, 1022, 1023, 0, 1, 2, 3]);
    }
}
