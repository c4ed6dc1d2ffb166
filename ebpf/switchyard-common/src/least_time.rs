//! Least response time: the available backend with the lowest `(active + 1) * response_us`.
//!
//! `response_us` is the moving average of connect + greeting latency that the proxy measures on
//! live sessions and health checks. A backend not measured yet (`response_us == 0`) scores 0 and
//! so is preferred until it has a measurement: new backends get measured instead of starved. The
//! score is computed in `u64` (`(2^32) * (2^32 - 1)` fits), without division. Ties take turns
//! exactly as in [`least_conn`](crate::least_conn).
//!
//! Weights are not part of the score: the response time already reflects a backend's capacity.
//!
//! Only the userspace proxy uses this algorithm: the XDP program has no greeting to time, so a
//! service with `dataplane = "xdp"` may not use `least_time` (`check` refuses it). The code is `no_std` all
//! the same, so that one crate holds all five algorithms.

use crate::backend::{BackendView, candidate_in};
use crate::least_conn::argmin_taking_turns;
use crate::walk::{Inline, Walk};

/// The quantity least_time minimises.
#[inline(always)]
pub fn score(view: &BackendView) -> u64 {
    (view.active as u64 + 1) * view.response_us as u64
}

/// Picks among `backends` backends; `candidate(b)` gives backend `b`'s view, or `None` when `b`
/// is excluded. Only available backends are chosen; `None` when there is none. `turn` rotates
/// among equal scores. `walk` runs the loops ([`Inline`] in userspace).
#[inline(always)]
pub fn pick(
    walk: impl Walk,
    backends: usize,
    turn: usize,
    candidate: impl Fn(usize) -> Option<BackendView>,
) -> Option<usize> {
    argmin_taking_turns(walk, backends, turn, candidate, |a, b| score(a) < score(b))
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
    use crate::MAX_BACKENDS;
    use crate::backend::assert_skips_unavailable_excluded_and_full;

    fn view(active: u32, response_us: u32) -> BackendView {
        BackendView {
            active,
            response_us,
            ..BackendView::up(1)
        }
    }

    #[test]
    fn prefers_the_fast_backend() {
        let views = [view(0, 5000), view(0, 400), view(0, 9000)];
        for turn in 0..5 {
            assert_eq!(pick_in(turn, &views, &[]), Some(1));
        }
    }

    #[test]
    fn load_counts_against_speed() {
        // 4 * 400 = 1600 > 1 * 1000: the slower but idle backend wins.
        let views = [view(0, 1000), view(3, 400)];
        assert_eq!(pick_in(0, &views, &[]), Some(0));
        // 2 * 400 = 800 < 1000.
        let views = [view(0, 1000), view(1, 400)];
        assert_eq!(pick_in(0, &views, &[]), Some(1));
    }

    #[test]
    fn unmeasured_backends_come_first_and_take_turns() {
        let views = [view(0, 300), view(2, 0), view(0, 0)];
        let picks: Vec<_> = (0..4).map(|t| pick_in(t, &views, &[]).unwrap()).collect();
        assert_eq!(picks, vec![1, 2, 1, 2]);
    }

    #[test]
    fn equal_scores_take_turns() {
        let views = [view(1, 500), view(0, 1000), view(0, 2000)];
        let picks: Vec<_> = (0..4).map(|t| pick_in(t, &views, &[]).unwrap()).collect();
        assert_eq!(picks, vec![0, 1, 0, 1]);
    }

    #[test]
    fn skips_unavailable_and_excluded() {
        assert_skips_unavailable_excluded_and_full(
            [view(0, 100), view(0, 200), view(0, 300)],
            |views, exclude| pick_in(0, views, exclude),
        );
        assert_eq!(pick_in(0, &[], &[]), None);
    }

    #[test]
    fn no_overflow_at_extremes() {
        let views = [view(u32::MAX, u32::MAX), view(u32::MAX, u32::MAX - 1)];
        assert_eq!(pick_in(0, &views, &[]), Some(1));
    }

    #[test]
    fn handles_max_backends() {
        let mut views: Vec<_> = (0..MAX_BACKENDS as u32)
            .map(|i| view(1, 1000 + i))
            .collect();
        assert_eq!(pick_in(0, &views, &[]), Some(0));
        views[1023].response_us = 10;
        assert_eq!(pick_in(0, &views, &[]), Some(1023));
        let all_same = vec![view(0, 50); MAX_BACKENDS];
        assert_eq!(pick_in(1025, &all_same, &[]), Some(1));
    }
}
