//! `switchyard withdraw`: withdraws every VIP a config announces, with no switchyard running.
//!
//! A switchyard that is killed (SIGKILL, a crash, the OOM killer) cannot withdraw its VIPs
//! itself, and BIRD would go on announcing routes to a host that no longer balances: that
//! host's share of new sessions would be lost until someone noticed. systemd runs this command
//! after the service stops, however it stopped (`ExecStopPost=` in config/switchyard.service),
//! and a restarted switchyard announces again once a backend can take sessions.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context as _;

use super::bird::{Bird, Outcome};
use crate::config::Config;

/// Disables the BIRD protocol of each announced service of `config`. Returns one line per
/// service saying what BIRD did, or the error when any protocol could not be disabled (those
/// that could are disabled all the same).
pub fn withdraw_all(config: &Config) -> Result<String, String> {
    let Some(socket) = &config.bird_socket else {
        return Ok("no [announce] table: nothing is announced\n".into());
    };
    let protocols: Vec<(&str, &str)> = config
        .services
        .iter()
        .filter_map(|s| Some((s.name.as_str(), s.announce.as_deref()?)))
        .collect();
    if protocols.is_empty() {
        return Ok("no service has announce = true: nothing is announced\n".into());
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("starting a runtime: {e}"))?;
    runtime.block_on(disable(socket, &protocols))
}

async fn disable(socket: &Path, protocols: &[(&str, &str)]) -> Result<String, String> {
    let mut bird = Bird::connect(socket)
        .await
        .context("nothing withdrawn")
        .map_err(|e| format!("{e:#}\n"))?;
    let (mut report, mut failed) = (String::new(), false);
    for (service, protocol) in protocols {
        let line = match bird.set(protocol, false).await {
            Ok(Ok(Outcome::Changed)) => {
                format!("service {service}: withdrawn ({protocol} disabled)")
            }
            Ok(Ok(Outcome::Already)) => {
                format!("service {service}: not announced ({protocol} was disabled already)")
            }
            Ok(Err(refused)) => {
                failed = true;
                format!("service {service}: NOT withdrawn: {refused}")
            }
            Err(error) => {
                failed = true;
                format!("service {service}: NOT withdrawn: {error:#}")
            }
        };
        let _ = writeln!(report, "{line}");
    }
    if failed { Err(report) } else { Ok(report) }
}
