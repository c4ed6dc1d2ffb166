//! How a selection's loops run, in either plane.
//!
//! Every algorithm that looks at more than one backend or table entry is written as a [`Step`]:
//! a small state (what it has found so far, and how to read backend `i` or entry `i`) updated
//! once per index. A [`Walk`] drives the steps. In userspace that is [`Inline`], a plain bounded
//! `for` loop that the compiler inlines into the pick. The XDP program drives the very same
//! steps with the kernel's `bpf_loop` helper, one call of the step per index, so the verifier
//! checks one iteration rather than unrolling up to [`MAX_BACKENDS`](crate::MAX_BACKENDS) of
//! them (inline loops that long exceed its complexity limit). The policy — which index wins,
//! how ties rotate, where a fallback starts — lives only in the steps and the `pick` functions
//! around them, so both planes choose alike.
//!
//! A step owns its state by value, plain integers and the caller's reader closures (which in
//! the kernel capture only integers), so the kernel hands `bpf_loop` one pointer to it and
//! nothing inside points elsewhere on the stack.
//!
//! The verifier checks a `bpf_loop` callback again and again until the state it leaves behind
//! is one it has already seen, forgetting the exact values of plain counters on the way, unless
//! some branch depends on a counter's exact value: then every count is a new state and the
//! loop never converges ("too complex"). So nothing branches on a count kept across steps, not
//! even a division's zero check (see how `least_conn` uses its tie count).

/// One iteration of a selection loop.
pub trait Step {
    /// Looks at index `i` (`0..iterations` in order) and returns `true` to stop the loop.
    fn step(&mut self, i: usize) -> bool;
}

/// Drives a [`Step`] over `0..iterations`, in order, until it asks to stop.
pub trait Walk: Copy {
    fn walk<S: Step>(self, iterations: usize, state: &mut S);
}

/// The userspace driver: a plain loop, inlined into the pick.
#[derive(Clone, Copy, Debug, Default)]
pub struct Inline;

impl Walk for Inline {
    #[inline(always)]
    fn walk<S: Step>(self, iterations: usize, state: &mut S) {
        for i in 0..iterations {
            if state.step(i) {
                break;
            }
        }
    }
}

/// No index found yet (a sentinel, not an `Option`: LLVM can spill an `Option`'s
/// uninitialised payload, and the verifier rejects reading it).
pub(crate) const NONE: usize = usize::MAX;

/// `start + i` round a ring of `len` entries, for `start < len` and `i < len`, without a
/// division (whose divide-by-zero path the BPF loader rejects).
#[inline(always)]
pub(crate) fn ring(start: usize, i: usize, len: usize) -> usize {
    let position = start + i;
    if position >= len {
        position - len
    } else {
        position
    }
}

#[cfg(all(test, feature = "user"))]
mod tests {
    extern crate std;
    use core::ffi::c_void;
    use std::vec::Vec;

    use super::*;
    use crate::backend::{BackendView, candidate_in};
    use crate::hash::hash_ipv4;
    use crate::{least_conn, least_time, maglev, round_robin, weighted_round_robin};

    /// Drives steps as the kernel's `bpf_loop` does: a callback with a type-erased pointer to
    /// the state, called once per index until it returns non-zero.
    #[derive(Clone, Copy)]
    struct ByCallback;

    impl Walk for ByCallback {
        fn walk<S: Step>(self, iterations: usize, state: &mut S) {
            extern "C" fn one<S: Step>(i: u64, ctx: *mut c_void) -> i64 {
                let state = unsafe { &mut *(ctx as *mut S) };
                state.step(i as usize) as i64
            }
            let ctx = state as *mut S as *mut c_void;
            for i in 0..iterations as u64 {
                if one::<S>(i, ctx) != 0 {
                    break;
                }
            }
        }
    }

    /// Mixed loads and weights; every fifth backend down, every seventh full.
    fn views(n: usize) -> Vec<BackendView> {
        (0..n)
            .map(|i| BackendView {
                active: (i * 7 % 5) as u32,
                weight: 1 + (i % 3) as u32,
                max_connections: if i % 7 == 6 { (i * 7 % 5) as u32 } else { 0 },
                healthy: (i % 5 != 4) as u32,
                response_us: 100 + (i * 13 % 4) as u32,
            })
            .collect()
    }

    /// What each algorithm picks at `turn` (and for `client`), with backend 1 excluded.
    fn picks(
        walk: impl Walk,
        views: &[BackendView],
        weighted: &[u16],
        maglev_table: &[u16],
        turn: usize,
        client: u64,
    ) -> [Option<usize>; 5] {
        let n = views.len();
        let candidate = |b| candidate_in(views, &[1], b);
        let entry = |table: &[u16], i: usize| table.get(i).map(|&b| b as usize);
        [
            least_conn::pick(walk, n, turn, candidate),
            least_time::pick(walk, n, turn, candidate),
            round_robin::pick(walk, n, turn, candidate).map(|c| c.backend),
            weighted_round_robin::pick(
                walk,
                weighted.len(),
                turn,
                n,
                |i| entry(weighted, i),
                candidate,
            )
            .map(|c| c.backend),
            maglev::pick(
                walk,
                client,
                maglev_table.len(),
                n,
                |i| entry(maglev_table, i),
                candidate,
            ),
        ]
    }

    #[test]
    fn every_algorithm_chooses_alike_under_either_driver() {
        for n in [1, 3, 17, 130] {
            let views = views(n);
            let weights: Vec<u32> = views.iter().map(|v| v.weight).collect();
            let weighted = weighted_round_robin::build_table(&weights);
            let names: Vec<std::string::String> = (0..n).map(|i| std::format!("m{i}")).collect();
            let named: Vec<(&str, u32)> = names.iter().map(|s| s.as_str()).zip(weights).collect();
            let maglev_table = maglev::build_table(&named);
            for turn in 0..300 {
                let client = hash_ipv4((0x0a00_0000u32 + turn as u32 * 77).to_be_bytes());
                assert_eq!(
                    picks(Inline, &views, &weighted, &maglev_table, turn, client),
                    picks(ByCallback, &views, &weighted, &maglev_table, turn, client),
                    "{n} backends, turn {turn}"
                );
            }
        }
    }
}
