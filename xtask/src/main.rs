//! SKELETON: `cargo xtask` entry point.
fn main() {}
