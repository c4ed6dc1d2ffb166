//! Telling the service manager where the process is in its life: the `sd_notify` protocol
//! (one datagram per call to the socket `NOTIFY_SOCKET` names) through the `sd-notify` crate.
//! `READY=1` once every listener and the XDP program are up, `RELOADING=1` (with the
//! `MONOTONIC_USEC` systemd's reload protocol asks for) while a new config is applied, and
//! `STOPPING=1` when shutdown starts.
//!
//! Without `NOTIFY_SOCKET` (not started by systemd with `Type=notify`) every call does nothing.
//! A notification that cannot be sent is never fatal: the first failure is logged at warn,
//! later ones only at debug. The variable is left in place, since a reload sends more
//! notifications later.

use std::sync::atomic::{AtomicBool, Ordering};

use sd_notify::NotifyState;
use tracing::{debug, warn};

/// Set once a failed notification has been logged at warn.
static FAILURE_LOGGED: AtomicBool = AtomicBool::new(false);

/// `READY=1`: listeners accept and the kernel path is attached (again, after a reload).
pub fn ready() {
    send("READY=1", &[NotifyState::Ready]);
}

/// `RELOADING=1` with `MONOTONIC_USEC` (now, on CLOCK_MONOTONIC) in the same datagram: a
/// reload has started; [`ready`] says when it is over, whether it applied or not.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send("RELOADING=1", &[NotifyState::Reloading, now]),
        Err(error) => {
            // Cannot happen on Linux; systemd then just cannot match the reload to its request.
            log_failure("RELOADING=1", &format!("reading CLOCK_MONOTONIC: {error}"));
            send("RELOADING=1", &[NotifyState::Reloading]);
        }
    }
}

/// `STOPPING=1`: shutdown has started (listeners close, sessions drain).
pub fn stopping() {
    send("STOPPING=1", &[NotifyState::Stopping]);
}

/// `STATUS=text`, the one-line status `systemctl status` shows (line breaks become "; ").
pub fn status(text: &str) {
    let line = one_line(text);
    send("STATUS", &[NotifyState::Status(&line)]);
}

/// The protocol is one `KEY=value` per line, so a value cannot hold a line break.
fn one_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

fn send(what: &str, states: &[NotifyState]) {
    if let Err(error) = sd_notify::notify(states) {
        log_failure(what, &error.to_string());
    }
}

fn log_failure(what: &str, error: &str) {
    let socket = std::env::var_os("NOTIFY_SOCKET").unwrap_or_default();
    let socket = socket.to_string_lossy();
    if FAILURE_LOGGED.swap(true, Ordering::Relaxed) {
        debug!("systemd notification {what} not sent to NOTIFY_SOCKET={socket}: {error}");
    } else {
        warn!(
            "systemd notification {what} not sent to NOTIFY_SOCKET={socket}: {error} \
             (running on; further failures are logged at debug level)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::one_line;

    #[test]
    fn a_status_keeps_to_one_line() {
        assert_eq!(
            one_line("reload failed:\n  a.toml:3: bad\n\nb\n"),
            "reload failed:; a.toml:3: bad; b"
        );
        assert_eq!(one_line("no change"), "no change");
    }
}
