//! The project's task runner as a library, so that its integration tests drive the same load
//! generator and sink that `cargo xtask` runs.

pub mod bench;
pub mod chart;
pub mod demo;
pub mod loadgen;
pub mod setup;
pub mod sink;
pub mod suite;
pub mod workspace;
