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
//! backends take exact turns. Both passes are [`Step`]s run by the caller's [`Walk`], bounded
//! by [`MAX_BACKENDS`].

use crate::MAX_BACKENDS;
use crate::backend::{BackendView, available_candidate, candidate_in};
use crate::walk::{Inline, NONE, Step, Walk};

/// `a` is strictly less loaded than `b`, relative to their weights (weight 0 counts as 1).
#[inline(always)]
pub fn less_loaded(a: &BackendView, b: &BackendView) -> bool {
    let (aw, bw) = (a.weight.max(1) as u64, b.weight.max(1) as u64);
    (a.active as u64) * bw < (b.active as u64) * aw
}

/// Picks among `backends` backends; `candidate(b)` gives backend `b`'s view, or `None` when
/// `b` is excluded. Only available backends are chosen; `None` when there is none. `turn`
/// rotates among equally loaded backends (pass a counter that grows by one per pick). `walk`
/// runs the loops ([`Inline`] in userspace).
#[inline(always)]
pub fn pick(
    walk: impl Walk,
    backends: usize,
    turn: usize,
    candidate: impl Fn(usize) -> Option<BackendView>,
) -> Option<usize> {
    argmin_taking_turns(walk, backends, turn, candidate, less_loaded)
}

/// The available backend minimising the order `less`, the `turn % ties`-th one among ties.
/// Views are read twice; if they changed in between (other CPUs or threads assigning) and the
/// chosen tie can no longer be found, the first pass's first minimum is returned.
#[inline(always)]
pub(crate) fn argmin_taking_turns<C, L>(
    walk: impl Walk,
    backends: usize,
    turn: usize,
    candidate: C,
    less: L,
) -> Option<usize>
where
    C: Fn(usize) -> Option<BackendView>,
    L: Fn(&BackendView, &BackendView) -> bool,
{
    let backends = backends.min(MAX_BACKENDS);
    let mut lowest = Lowest {
        ranking: Ranked { candidate, less },
        first: NONE,
        lowest: BackendView::default(),
        others_tied: 0,
    };
    walk.walk(backends, &mut lowest);
    let Lowest {
        ranking,
        first,
        lowest,
        others_tied,
    } = lowest;
    if first == NONE {
        return None;
    }
    // The first of the ties is `first`. No branch on the tie count here (not even a division's
    // zero check: the divisor cannot be zero): one would make the verifier track every count
    // separately, and its loop would never converge.
    let wanted = (turn as u64 % (others_tied as u64 + 1)) as usize;
    if wanted == 0 {
        return Some(first);
    }
    let mut tie = NthTie {
        ranking,
        lowest,
        wanted,
        found: NONE,
    };
    walk.walk(backends, &mut tie);
    Some(if tie.found == NONE { first } else { tie.found })
}

/// What both passes read: the available backends, and the order they are ranked by.
trait Ranking {
    fn available(&self, index: usize) -> Option<BackendView>;
    fn less(&self, a: &BackendView, b: &BackendView) -> bool;
}

/// A [`Ranking`] from the caller's `candidate` reader and an order.
struct Ranked<C, L> {
    candidate: C,
    less: L,
}

impl<C, L> Ranking for Ranked<C, L>
where
    C: Fn(usize) -> Option<BackendView>,
    L: Fn(&BackendView, &BackendView) -> bool,
{
    #[inline(always)]
    fn available(&self, index: usize) -> Option<BackendView> {
        available_candidate(&self.candidate, index)
    }

    #[inline(always)]
    fn less(&self, a: &BackendView, b: &BackendView) -> bool {
        (self.less)(a, b)
    }
}

/// First pass: the lowest available backend, the first index with it, and how many others
/// share it.
struct Lowest<R> {
    ranking: R,
    first: usize,
    lowest: BackendView,
    others_tied: u32,
}

impl<R: Ranking> Step for Lowest<R> {
    #[inline(always)]
    fn step(&mut self, index: usize) -> bool {
        let Some(view) = self.ranking.available(index) else {
            return false;
        };
        if self.first == NONE || self.ranking.less(&view, &self.lowest) {
            self.first = index;
            self.lowest = view;
            self.others_tied = 0;
        } else if !self.ranking.less(&self.lowest, &view) {
            self.others_tied += 1;
        }
        false
    }
}

/// Second pass: the `wanted`-th (from 0) available backend ranked equal to `lowest`.
struct NthTie<R> {
    ranking: R,
    lowest: BackendView,
    wanted: usize,
    found: usize,
}

impl<R: Ranking> Step for NthTie<R> {
    #[inline(always)]
    fn step(&mut self, index: usize) -> bool {
        let Some(view) = self.ranking.available(index) else {
            return false;
        };
        let ranking = &self.ranking;
        if ranking.less(&view, &self.lowest) || ranking.less(&self.lowest, &view) {
            return false;
        }
        if self.wanted == 0 {
            self.found = index;
            return true;
        }
        self.wanted -= 1;
        false
    }
}

/// Slice convenience for userspace.
#[inline]
pub fn pick_in(turn: usize, views: &[BackendView], exclude: &[usize]) -> Option<usize> {
    pick(Inline, views.len(), turn, |b| {
        candidate_in(views, exclude, b)
    })
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
