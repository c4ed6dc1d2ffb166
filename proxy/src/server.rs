//! Listeners, the accept loop, and the process lifecycle (signals, graceful shutdown).
//!
//! SKELETON: implemented by the data-path work.

use crate::config::Config;

/// Runs every service of `config` until SIGTERM/SIGINT, then drains sessions and returns.
pub fn run(config: Config) -> anyhow::Result<()> {
    let _ = config;
    todo!("data-path work")
}
