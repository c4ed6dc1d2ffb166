//! A backend's health: up/down verdicts with rise/fall from active checks and live traffic,
//! and the generation each attempt starts under, so that an outcome counts only under the
//! state it started in.

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::config::{HealthConfig, HealthKind};

/// The state an attempt (a health check, or a live session's connect and greeting) started
/// under. Every up/down change starts a new generation, and what an attempt of an older one
/// saw is ignored: it is about a state that no longer holds (the greeting timeouts of sessions
/// that started while an MTA was silent must not take it down again once it is back).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Generation(u64);

/// What a live session saw of a backend, for passive health.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Observation {
    /// A positive (2xx) greeting.
    Greeted,
    /// The connect failed or timed out.
    Unreachable,
    /// Connected, but no positive greeting: a 4xx/5xx one, none in time, or the connection
    /// ended first.
    NoGreeting,
}

/// Up/down state with rise/fall hysteresis, fed by active checks and live traffic.
///
/// Failures of either kind count towards `fall`. What brings a backend back depends on the
/// check kind and on what took it down:
/// - `smtp`: `rise` successful checks (each reads the greeting).
/// - `tcp`: `rise` successful checks; when live traffic took the backend down for want of a
///   positive greeting (4xx/5xx, or none in time), a connect proves nothing, so until it is
///   back its checks read the greeting too ([`HealthState::begin_check`]).
/// - `none`: no checks; a backend live traffic took down is held down for `rise × interval`
///   ([`HealthState::end_hold_down`]), then live traffic judges it again.
pub struct HealthState {
    up: AtomicBool,
    generation: AtomicU64,
    /// The service's `[service.health]` values; a reload may change them in place.
    kind: AtomicU8,
    rise: AtomicU32,
    fall: AtomicU32,
    hold_down_ms: AtomicU64,
    tally: Mutex<Tally>,
    /// Changes to up and to down since start (for `/metrics`).
    went_up: AtomicU64,
    went_down: AtomicU64,
}

/// The streaks since the last change, and why the backend is down.
#[derive(Default)]
struct Tally {
    successes: u32,
    failures: u32,
    /// Some failure in the current streak was a missing or refused greeting on live traffic.
    greeting_failed: bool,
    /// Down for want of a positive greeting: only greetings bring it back.
    needs_greeting: bool,
    /// When live traffic took it down.
    down_since: Option<Instant>,
}

impl HealthState {
    /// Backends start up so a fresh start serves at once; checks take them down within `fall`.
    pub fn new(config: &HealthConfig) -> Self {
        let state = Self {
            up: AtomicBool::new(true),
            generation: AtomicU64::new(0),
            kind: AtomicU8::new(0),
            rise: AtomicU32::new(1),
            fall: AtomicU32::new(1),
            hold_down_ms: AtomicU64::new(0),
            tally: Mutex::new(Tally::default()),
            went_up: AtomicU64::new(0),
            went_down: AtomicU64::new(0),
        };
        state.reconfigure(config);
        state
    }

    /// Takes new rise/fall/kind/interval values (a reload): the state and streaks stay.
    pub fn reconfigure(&self, config: &HealthConfig) {
        let rise = config.rise.max(1);
        let kind = match config.kind {
            HealthKind::None => 0,
            HealthKind::Tcp => 1,
            HealthKind::Smtp => 2,
        };
        self.kind.store(kind, Ordering::Relaxed);
        self.rise.store(rise, Ordering::Relaxed);
        self.fall.store(config.fall.max(1), Ordering::Relaxed);
        let hold_down = config.interval.saturating_mul(rise);
        self.hold_down_ms.store(
            u64::try_from(hold_down.as_millis()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    fn kind(&self) -> HealthKind {
        match self.kind.load(Ordering::Relaxed) {
            0 => HealthKind::None,
            1 => HealthKind::Tcp,
            _ => HealthKind::Smtp,
        }
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// The generation an attempt starting now runs under.
    pub fn generation(&self) -> Generation {
        Generation(self.generation.load(Ordering::Acquire))
    }

    /// What a check starting now runs under, and whether it must read the greeting even when
    /// its kind is `tcp` (the backend is down for want of a positive greeting).
    pub fn begin_check(&self) -> (Generation, bool) {
        let tally = self.tally.lock();
        (self.generation(), tally.needs_greeting)
    }

    /// Records an active check that started under `started`; returns the new state when it
    /// changed.
    pub fn record_check(&self, started: Generation, ok: bool) -> Option<bool> {
        let mut tally = self.tally.lock();
        if started != self.generation() {
            return None;
        }
        if ok {
            self.succeeded(&mut tally)
        } else {
            self.failed(&mut tally, None)
        }
    }

    /// Records what a live session that started under `started` saw; returns `Some(false)`
    /// when it took the backend down. A positive greeting clears the failure streak but does
    /// not raise a down backend (checks do, or the hold-down's end).
    pub fn record_live(
        &self,
        started: Generation,
        seen: Observation,
        now: Instant,
    ) -> Option<bool> {
        let mut tally = self.tally.lock();
        if started != self.generation() {
            return None;
        }
        match seen {
            Observation::Greeted => {
                tally.failures = 0;
                tally.greeting_failed = false;
                None
            }
            Observation::Unreachable => self.failed(&mut tally, Some(now)),
            Observation::NoGreeting => {
                tally.greeting_failed = true;
                self.failed(&mut tally, Some(now))
            }
        }
    }

    /// With `kind = "none"`, brings a backend that live traffic took down back once it has
    /// been down for the hold-down; returns `Some(true)` when it did.
    pub fn end_hold_down(&self, now: Instant) -> Option<bool> {
        // Checked without the lock first: an up backend, nearly always, has nothing to end,
        // and the lock is the one every session's outcome takes.
        if self.kind() != HealthKind::None || self.is_up() {
            return None;
        }
        let mut tally = self.tally.lock();
        let since = tally.down_since?;
        if self.kind() != HealthKind::None
            || self.is_up()
            || now.saturating_duration_since(since) < self.hold_down()
        {
            return None;
        }
        Some(self.change(&mut tally, true))
    }

    /// The hold-down of a backend that live traffic took down, with `kind = "none"`.
    pub fn hold_down(&self) -> Duration {
        Duration::from_millis(self.hold_down_ms.load(Ordering::Relaxed))
    }

    fn succeeded(&self, tally: &mut Tally) -> Option<bool> {
        // A connect-only check says nothing about greetings: refused ones keep counting.
        let greeted = self.kind() == HealthKind::Smtp || tally.needs_greeting;
        if greeted || !tally.greeting_failed {
            tally.failures = 0;
            tally.greeting_failed = false;
        }
        tally.successes = tally.successes.saturating_add(1);
        if self.is_up() || tally.successes < self.rise.load(Ordering::Relaxed) {
            return None;
        }
        Some(self.change(tally, true))
    }

    /// One more failure; `live` is when live traffic saw it (None: a check).
    fn failed(&self, tally: &mut Tally, live: Option<Instant>) -> Option<bool> {
        tally.successes = 0;
        tally.failures = tally.failures.saturating_add(1);
        if !self.is_up() || tally.failures < self.fall.load(Ordering::Relaxed) {
            return None;
        }
        let needs_greeting = tally.greeting_failed;
        self.change(tally, false);
        tally.needs_greeting = needs_greeting;
        tally.down_since = live;
        Some(false)
    }

    /// Moves to `up`, starting a new generation with fresh streaks.
    fn change(&self, tally: &mut Tally, up: bool) -> bool {
        *tally = Tally::default();
        self.up.store(up, Ordering::Release);
        self.generation.fetch_add(1, Ordering::AcqRel);
        let count = if up { &self.went_up } else { &self.went_down };
        count.fetch_add(1, Ordering::Relaxed);
        up
    }

    /// How often it went up and down since start: `(up, down)`.
    pub fn transitions(&self) -> (u64, u64) {
        (
            self.went_up.load(Ordering::Relaxed),
            self.went_down.load(Ordering::Relaxed),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health(kind: HealthKind, rise: u32, fall: u32) -> HealthState {
        HealthState::new(&HealthConfig {
            kind,
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            rise,
            fall,
            ehlo: "switchyard.invalid".into(),
        })
    }

    /// `n` checks with result `ok`, each started under the generation current at its start.
    fn checks(state: &HealthState, ok: bool, n: u32) -> Vec<Option<bool>> {
        (0..n)
            .map(|_| state.record_check(state.generation(), ok))
            .collect()
    }

    #[test]
    fn every_change_starts_a_new_generation() {
        let state = health(HealthKind::Smtp, 2, 2);
        let first = state.generation();
        assert_eq!(checks(&state, false, 2), [None, Some(false)]);
        let down = state.generation();
        assert_ne!(down, first);
        assert_eq!(checks(&state, true, 2), [None, Some(true)]);
        assert_ne!(state.generation(), down);
        assert_ne!(state.generation(), first);
        // A result without a change keeps the generation.
        let up = state.generation();
        checks(&state, true, 3);
        checks(&state, false, 1);
        assert_eq!(state.generation(), up);
    }

    #[test]
    fn outcomes_of_attempts_older_than_the_last_change_are_ignored() {
        let state = health(HealthKind::Smtp, 2, 2);
        // Sessions start while the MTA is silent; checks take it down, then bring it back.
        let silent = state.generation();
        checks(&state, false, 2);
        checks(&state, true, 2);
        assert!(state.is_up());
        let now = Instant::now();
        for _ in 0..5 {
            assert_eq!(
                state.record_live(silent, Observation::NoGreeting, now),
                None
            );
            assert_eq!(state.record_check(silent, false), None);
        }
        assert!(state.is_up(), "stale failures took it down");
        // Failures of the current generation still count from zero.
        let current = state.generation();
        assert_eq!(
            state.record_live(current, Observation::NoGreeting, now),
            None
        );
        assert_eq!(
            state.record_live(current, Observation::Unreachable, now),
            Some(false)
        );
    }

    #[test]
    fn a_stale_success_does_not_count_towards_rise() {
        let state = health(HealthKind::Tcp, 2, 1);
        let before = state.generation();
        assert_eq!(checks(&state, false, 1), [Some(false)]);
        assert_eq!(state.record_check(before, true), None);
        assert_eq!(checks(&state, true, 1), [None]);
        assert!(
            !state.is_up(),
            "a check that began while up counted towards rise"
        );
        assert_eq!(checks(&state, true, 1), [Some(true)]);
    }

    #[test]
    fn refused_greetings_count_towards_fall_for_every_kind() {
        for kind in [HealthKind::None, HealthKind::Tcp, HealthKind::Smtp] {
            let state = health(kind, 2, 3);
            let now = Instant::now();
            let seen: Vec<_> = (0..3)
                .map(|_| state.record_live(state.generation(), Observation::NoGreeting, now))
                .collect();
            assert_eq!(seen, [None, None, Some(false)], "{kind:?}");
        }
    }

    #[test]
    fn a_greeting_clears_the_failure_streak() {
        let state = health(HealthKind::Tcp, 2, 2);
        let now = Instant::now();
        let g = state.generation();
        state.record_live(g, Observation::NoGreeting, now);
        state.record_live(g, Observation::Greeted, now);
        assert_eq!(state.record_live(g, Observation::NoGreeting, now), None);
        assert!(state.is_up());
        // A live greeting clears any failure, a connect failure included.
        state.record_live(g, Observation::Greeted, now);
        state.record_live(g, Observation::Unreachable, now);
        state.record_live(g, Observation::Greeted, now);
        assert_eq!(state.record_live(g, Observation::Unreachable, now), None);
        assert!(state.is_up());
    }

    #[test]
    fn a_connect_only_check_does_not_clear_refused_greetings() {
        let now = Instant::now();
        let tcp = health(HealthKind::Tcp, 2, 2);
        let g = tcp.generation();
        tcp.record_live(g, Observation::NoGreeting, now);
        assert_eq!(tcp.record_check(g, true), None);
        assert_eq!(
            tcp.record_live(g, Observation::NoGreeting, now),
            Some(false)
        );
        // It clears connect failures, and an smtp check (which reads the greeting) clears both.
        for (kind, seen) in [
            (HealthKind::Tcp, Observation::Unreachable),
            (HealthKind::Smtp, Observation::NoGreeting),
        ] {
            let state = health(kind, 2, 2);
            let g = state.generation();
            state.record_live(g, seen, now);
            assert_eq!(state.record_check(g, true), None);
            assert_eq!(state.record_live(g, seen, now), None, "{kind:?}");
        }
    }

    #[test]
    fn tcp_checks_read_the_greeting_only_while_refused_greetings_keep_it_down() {
        let state = health(HealthKind::Tcp, 2, 2);
        let now = Instant::now();
        assert!(!state.begin_check().1);
        // Down by connect failures: a connect is evidence enough.
        for _ in 0..2 {
            state.record_live(state.generation(), Observation::Unreachable, now);
        }
        assert!(!state.is_up());
        assert!(!state.begin_check().1);
        checks(&state, true, 2);
        assert!(state.is_up());
        // Down by refused greetings (a connect failure in the streak does not change that).
        state.record_live(state.generation(), Observation::Unreachable, now);
        state.record_live(state.generation(), Observation::NoGreeting, now);
        assert!(!state.is_up());
        let (generation, read_greeting) = state.begin_check();
        assert!(read_greeting);
        assert_eq!(state.record_check(generation, true), None);
        assert!(state.begin_check().1, "still down: still reading greetings");
        assert_eq!(checks(&state, true, 1), [Some(true)]);
        assert!(!state.begin_check().1, "back up: connect-only checks again");
    }

    #[test]
    fn kind_none_holds_a_backend_down_for_rise_intervals() {
        let state = health(HealthKind::None, 2, 2);
        assert_eq!(state.hold_down(), Duration::from_secs(4));
        let t0 = Instant::now();
        assert_eq!(state.end_hold_down(t0), None, "up: nothing to end");
        for _ in 0..2 {
            state.record_live(state.generation(), Observation::NoGreeting, t0);
        }
        assert!(!state.is_up());
        let down = state.generation();
        assert_eq!(state.end_hold_down(t0 + Duration::from_secs(3)), None);
        assert!(!state.is_up());
        assert_eq!(state.end_hold_down(t0 + Duration::from_secs(4)), Some(true));
        assert!(state.is_up());
        assert_ne!(state.generation(), down);
        assert_eq!(state.end_hold_down(t0 + Duration::from_secs(9)), None);
    }

    #[test]
    fn hold_downs_are_for_kind_none_only() {
        let state = health(HealthKind::Tcp, 2, 1);
        let t0 = Instant::now();
        state.record_live(state.generation(), Observation::NoGreeting, t0);
        assert!(!state.is_up());
        assert_eq!(state.end_hold_down(t0 + Duration::from_secs(3600)), None);
        assert!(!state.is_up(), "with checks, only checks bring it back");
    }
}
