//! placeholder
pub fn run(_d: std::time::Duration) -> anyhow::Result<std::process::ExitCode> { todo!() }
