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
