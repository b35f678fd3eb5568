//! Time, from one place.
//!
//! Every part of flowgate asks a [`Clock`] for the time, never the system directly, so the
//! virtual clock of `flowgate chat` and `flowgate test` drives the very timer code that runs
//! in production: a test's `wait: 25h` fires real durable timers.

use std::sync::{Arc, Mutex};

use chrono::{DateTime, Duration, TimeZone, Utc};

/// A source of "now".
pub trait Clock: Send + Sync + std::fmt::Debug {
    fn now(&self) -> DateTime<Utc>;
}

/// Shared handle to a clock.
pub type SharedClock = Arc<dyn Clock>;

/// The wall clock, for `serve`.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// A clock that only moves when told to: for `chat`, `test` and unit tests.
#[derive(Debug)]
pub struct VirtualClock {
    now: Mutex<DateTime<Utc>>,
}

impl VirtualClock {
    pub fn new(start: DateTime<Utc>) -> Self {
        Self {
            now: Mutex::new(start),
        }
    }

    /// The start every conversation test uses, so expected dates in tests are stable:
    /// Monday 2026-01-05 09:00 UTC.
    pub fn test_epoch() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 1, 5, 9, 0, 0).unwrap()
    }

    /// Moves the clock forward; it never moves backwards.
    pub fn advance(&self, by: Duration) {
        let mut now = self.now.lock().expect("clock lock");
        if by > Duration::zero() {
            *now += by;
        }
    }

    /// Sets the clock to `to` unless that is in the past.
    pub fn advance_to(&self, to: DateTime<Utc>) {
        let mut now = self.now.lock().expect("clock lock");
        if to > *now {
            *now = to;
        }
    }
}

impl Clock for VirtualClock {
    fn now(&self) -> DateTime<Utc> {
        *self.now.lock().expect("clock lock")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtual_clock_moves_forward_only() {
        let clock = VirtualClock::new(VirtualClock::test_epoch());
        clock.advance(Duration::hours(25));
        assert_eq!(
            clock.now(),
            VirtualClock::test_epoch() + Duration::hours(25)
        );
        clock.advance_to(VirtualClock::test_epoch());
        assert_eq!(
            clock.now(),
            VirtualClock::test_epoch() + Duration::hours(25)
        );
        clock.advance(Duration::hours(-3));
        assert_eq!(
            clock.now(),
            VirtualClock::test_epoch() + Duration::hours(25)
        );
    }
}
