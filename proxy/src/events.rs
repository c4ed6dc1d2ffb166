//! The recent events the dashboard shows as a timeline: backends going up or down, runtime
//! changes through `ctl` (drain, disable, weight) and reloads applied or refused. One
//! process-wide ring of the last [`CAPACITY`] events. Events are rare (state changes, never
//! sessions), so a plain lock is enough and nothing here is on a session's path.

use std::collections::VecDeque;
use std::time::{SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

/// How many events are kept; older ones are dropped.
pub const CAPACITY: usize = 100;

/// What happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A backend may take sessions again (checks passed, or a hold-down ended).
    Up,
    /// A backend was taken out by failed checks or failures on live traffic.
    Down,
    Drain,
    Undrain,
    Disable,
    Enable,
    Weight,
    /// A reload of the config file applied (its text lists the changes).
    Reload,
    /// A reload refused; the running config stays (its text says why).
    ReloadRefused,
    /// A service's VIP announced to BIRD (its text says why).
    Announce,
    /// A service's VIP withdrawn from BIRD (its text says why).
    Withdraw,
    /// `ctl node drain`: every announced VIP withdrawn, sessions kept.
    NodeDrain,
    NodeUndrain,
}

/// One entry of the timeline.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// When, Unix time in milliseconds.
    pub at_unix_ms: u64,
    pub kind: Kind,
    /// Empty for what concerns the whole balancer (reloads).
    pub service: String,
    pub backend: String,
    pub text: String,
}

/// A bounded, oldest-first list of events.
pub struct EventLog {
    entries: Mutex<VecDeque<Event>>,
}

impl EventLog {
    pub const fn new() -> Self {
        Self {
            entries: Mutex::new(VecDeque::new()),
        }
    }

    /// Adds an event stamped now, dropping the oldest beyond [`CAPACITY`].
    pub fn record(&self, kind: Kind, service: &str, backend: &str, text: impl Into<String>) {
        let event = Event {
            at_unix_ms: unix_ms(SystemTime::now()),
            kind,
            service: service.to_string(),
            backend: backend.to_string(),
            text: text.into(),
        };
        let mut entries = self.entries.lock();
        if entries.len() == CAPACITY {
            entries.pop_front();
        }
        entries.push_back(event);
    }

    /// Every kept event, oldest first.
    pub fn recent(&self) -> Vec<Event> {
        self.entries.lock().iter().cloned().collect()
    }
}

impl Default for EventLog {
    fn default() -> Self {
        Self::new()
    }
}

/// The process's events.
pub static EVENTS: EventLog = EventLog::new();

/// Records `kind` for the whole process (see [`EventLog::record`]).
pub fn record(kind: Kind, service: &str, backend: &str, text: impl Into<String>) {
    EVENTS.record(kind, service, backend, text);
}

/// `time` as Unix time in milliseconds (0 before 1970).
pub fn unix_ms(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A backend may take sessions again: logged and recorded.
pub fn backend_up(service: &str, backend: &str, why: String) {
    tracing::info!("backend {backend} of service {service} is UP ({why})");
    record(Kind::Up, service, backend, why);
}

/// A backend was taken out: logged and recorded.
pub fn backend_down(service: &str, backend: &str, why: String) {
    tracing::warn!("backend {backend} of service {service} is DOWN: {why}");
    record(Kind::Down, service, backend, why);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_newest_events_up_to_capacity() {
        let log = EventLog::new();
        for i in 0..CAPACITY + 5 {
            log.record(Kind::Down, "mx", "mta1", format!("event {i}"));
        }
        let recent = log.recent();
        assert_eq!(recent.len(), CAPACITY);
        assert_eq!(recent[0].text, "event 5");
        assert_eq!(recent[CAPACITY - 1].text, format!("event {}", CAPACITY + 4));
    }

    #[test]
    fn kinds_are_written_in_snake_case() {
        let log = EventLog::new();
        log.record(Kind::ReloadRefused, "", "", "bad file");
        let json = serde_json::to_string(&log.recent()).expect("serialize");
        assert!(json.contains(r#""kind":"reload_refused""#), "{json}");
    }
}
