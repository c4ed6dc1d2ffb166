//! Types and backend-selection code shared by both data planes.
//!
//! This crate is `no_std` so that the XDP program (built for `bpfel-unknown-none`) and the
//! userspace proxy run the very same selection logic. Every algorithm is a pure function over
//! a snapshot of backend state, in its own module (as HAProxy's `lb_*.c`), that reads backends
//! and table entries through the caller's closures and runs its loops through a [`walk::Walk`]:
//! a plain loop in the proxy, `bpf_loop` in the XDP program. Loops are bounded by
//! [`MAX_BACKENDS`] (or a table's length) so the kernel verifier accepts them. Code that
//! allocates (table builders) lives behind the `user` feature.
#![no_std]

#[cfg(feature = "user")]
extern crate alloc;

pub mod backend;
pub mod gcra;
pub mod hash;
pub mod least_conn;
pub mod least_time;
pub mod maglev;
pub mod maps;
pub mod round_robin;
pub mod walk;
pub mod weighted_round_robin;

/// Upper bound on backends per service, in both data planes (sizes kernel arrays, bounds loops).
pub const MAX_BACKENDS: usize = 1024;

/// Maglev lookup-table size: a prime well above 100 x typical backend counts (Katran uses the same).
pub const MAGLEV_TABLE_SIZE: usize = 65537;
