//! Round robin: weighted round robin with every weight 1.
//!
//! The smooth weighted table for equal weights is the identity `0, 1, .., n-1`, so the proxy
//! does not need to store it: the cursor indexes backends directly, in both planes (the
//! equal-weight table [`build_table`] builds gives the same order). Skipping of unavailable or excluded backends, and the cursor advance
//! that keeps the spread even when one is down, are those of
//! [`weighted_round_robin`](crate::weighted_round_robin).

use crate::backend::{BackendView, candidate_in};
use crate::walk::{Inline, Walk};
use crate::weighted_round_robin::{self, Choice};

/// Picks the backend under `cursor` among `backends` backends, probing forward past those
/// that `candidate` reports excluded (`None`) or unavailable. `None` when none may be chosen.
/// `walk` runs the loops ([`Inline`] in userspace).
#[inline(always)]
pub fn pick(
    walk: impl Walk,
    backends: usize,
    cursor: usize,
    candidate: impl Fn(usize) -> Option<BackendView>,
) -> Option<Choice> {
    weighted_round_robin::pick(walk, backends, cursor, backends, Some, candidate)
}

/// Slice convenience for userspace.
#[inline]
pub fn pick_in(cursor: usize, views: &[BackendView], exclude: &[usize]) -> Option<Choice> {
    pick(Inline, views.len(), cursor, |b| {
        candidate_in(views, exclude, b)
    })
}

/// The weighted table for `backends` equal-weight backends (for the kernel's shared table).
#[cfg(feature = "user")]
pub fn build_table(backends: usize) -> alloc::vec::Vec<u16> {
    weighted_round_robin::build_table(&alloc::vec![1; backends])
}

#[cfg(all(test, feature = "user"))]
mod tests {
    extern crate std;
    use std::vec;
    use std::vec::Vec;

    use super::*;
    use crate::MAX_BACKENDS;

    #[test]
    fn equal_weight_table_is_the_identity() {
        assert_eq!(build_table(5), vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn takes_turns_evenly() {
        let views = [BackendView::up(1); 3];
        let mut cursor = 0;
        let mut order = Vec::new();
        for _ in 0..9 {
            let choice = pick_in(cursor, &views, &[]).unwrap();
            order.push(choice.backend);
            cursor += choice.advance;
        }
        assert_eq!(order, vec![0, 1, 2, 0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn a_down_backend_does_not_double_its_neighbours_share() {
        let mut views = [BackendView::up(1); 4];
        views[1].healthy = 0;
        let mut cursor = 0;
        let mut picked = [0usize; 4];
        for _ in 0..300 {
            let choice = pick_in(cursor, &views, &[]).unwrap();
            picked[choice.backend] += 1;
            cursor += choice.advance;
        }
        assert_eq!(picked, [100, 0, 100, 100]);
    }

    #[test]
    fn excluded_and_full_backends_are_skipped() {
        let mut views = [BackendView::up(1); 3];
        views[2].max_connections = 1;
        views[2].active = 1;
        assert_eq!(pick_in(0, &views, &[0]).map(|c| c.backend), Some(1));
        assert_eq!(pick_in(2, &views, &[]).map(|c| c.backend), Some(0));
        assert_eq!(pick_in(2, &views, &[0, 1]), None);
    }

    #[test]
    fn none_for_no_backends_or_none_healthy() {
        assert_eq!(pick_in(7, &[], &[]), None);
        let views = [BackendView::default(); 3];
        assert_eq!(pick_in(7, &views, &[]), None);
    }

    #[test]
    fn handles_max_backends_with_most_down() {
        let mut views = vec![BackendView::up(1); MAX_BACKENDS];
        for (i, v) in views.iter_mut().enumerate() {
            if i % 100 != 0 {
                v.healthy = 0;
            }
        }
        let mut cursor = 0;
        let mut picked = vec![0usize; MAX_BACKENDS];
        for _ in 0..1100 {
            let choice = pick_in(cursor, &views, &[]).unwrap();
            assert_eq!(choice.backend % 100, 0);
            picked[choice.backend] += 1;
            cursor += choice.advance;
        }
        // Eleven available backends; the fallback scan keeps them all in use.
        assert!(picked.iter().filter(|&&c| c > 0).count() == 11);
    }
}
