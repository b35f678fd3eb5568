//! The outbox's pacing: a generic cell rate algorithm ([`Gcra`]) under the channel's
//! throughput ([`ChannelPace`], on tokio's monotonic clock) and each recipient's pair limit
//! ([`PairState`], on the [`Clock`](crate::clock::Clock)), and the jitter for retries.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::time::Instant;

/// A clock reading as an offset from the Unix epoch, for [`Gcra`].
pub(super) fn clock_offset(at: DateTime<Utc>) -> Duration {
    Duration::from_millis(u64::try_from(at.timestamp_millis()).unwrap_or(0))
}

/// A fraction in `[0, 1)` for jitter, from the standard library's randomly keyed hasher.
pub(super) fn random_fraction() -> f64 {
    use std::hash::BuildHasher;
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let x = std::collections::hash_map::RandomState::new()
        .hash_one(SEQ.fetch_add(1, Ordering::Relaxed));
    (x >> 11) as f64 / (1u64 << 53) as f64
}

/// A token bucket as a generic cell rate algorithm: one token per `interval`, up to `burst`
/// at once. Times are offsets from any fixed origin (the caller's clock); `tat` is the
/// theoretical arrival time of the next request at the steady rate.
#[derive(Debug, Clone)]
pub(super) struct Gcra {
    interval: Duration,
    burst: u32,
    tat: Option<Duration>,
}

impl Gcra {
    pub(super) fn new(interval: Duration, burst: u32) -> Self {
        Self {
            interval,
            burst: burst.max(1),
            tat: None,
        }
    }

    /// How far ahead of `tat` a request may go: the burst.
    fn tolerance(&self) -> Duration {
        self.interval * (self.burst - 1)
    }

    /// The earliest time a request may go.
    fn allowed_at(&self, now: Duration) -> Duration {
        match self.tat.map(|t| t.saturating_sub(self.tolerance())) {
            Some(at) if at > now => at,
            _ => now,
        }
    }

    /// Takes the next token, which may be in the future: returns when to go.
    fn reserve(&mut self, now: Duration) -> Duration {
        let at = self.allowed_at(now);
        let base = self.tat.map_or(at, |t| t.max(at));
        self.tat = Some(base + self.interval);
        at
    }

    /// Takes a token if one is free now, else says how long until one is.
    pub(super) fn try_reserve(&mut self, now: Duration) -> Result<(), Duration> {
        let at = self.allowed_at(now);
        if at > now {
            return Err(at - now);
        }
        self.reserve(now);
        Ok(())
    }

    /// Whether the bucket is not full at `now` (it still remembers recent requests).
    pub(super) fn busy_at(&self, now: Duration) -> bool {
        self.tat.is_some_and(|t| t > now)
    }
}

/// The channel's pace: `throughput_mps`, halved on each `130429`, recovering 1 % per
/// accepted message. On tokio's monotonic clock: it decides how long a task sleeps.
#[derive(Debug)]
pub(super) struct ChannelPace {
    origin: Instant,
    configured: f64,
    factor: f64,
    /// `130429`s since the last accepted message: the exponent of the retry delay.
    level: u32,
    gcra: Gcra,
}

impl ChannelPace {
    pub(super) fn new(throughput_mps: u32) -> Self {
        let mut pace = Self {
            origin: Instant::now(),
            configured: f64::from(throughput_mps.max(1)),
            factor: 1.0,
            level: 0,
            gcra: Gcra::new(Duration::from_secs(1), 1),
        };
        pace.apply();
        pace
    }

    pub(super) fn rate(&self) -> f64 {
        (self.configured * self.factor).max(1.0)
    }

    fn apply(&mut self) {
        let rate = self.rate();
        self.gcra.interval = Duration::from_secs_f64(1.0 / rate);
        // A tenth of a second's worth at once.
        self.gcra.burst = ((rate / 10.0).ceil() as u32).max(1);
    }

    /// When the next message may go.
    pub(super) fn reserve(&mut self, now: Instant) -> Instant {
        let since = now.saturating_duration_since(self.origin);
        self.origin + self.gcra.reserve(since)
    }

    /// A `130429`: half the rate; returns the retry exponent.
    pub(super) fn slow_down(&mut self) -> u32 {
        let level = self.level;
        self.level = self.level.saturating_add(1);
        self.factor = (self.factor / 2.0).max(1.0 / self.configured);
        self.apply();
        level
    }

    pub(super) fn accepted(&mut self) {
        self.level = 0;
        if self.factor < 1.0 {
            self.factor = (self.factor * 1.01).min(1.0);
            self.apply();
        }
    }
}

/// One recipient's pair-limit bucket, on the [`Clock`](crate::clock::Clock) like the
/// `next_attempt_at` its waits become.
#[derive(Debug)]
pub(super) struct PairState {
    pub(super) pace: Gcra,
    /// `131056`s since the last accepted message: X in Meta's 4^X s.
    pub(super) strikes: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn gcra_allows_the_burst_then_paces() {
        let start = secs(1_000);
        let mut g = Gcra::new(secs(6), 3);
        assert_eq!(g.try_reserve(start), Ok(()));
        assert_eq!(g.try_reserve(start), Ok(()));
        assert_eq!(g.try_reserve(start), Ok(()));
        assert_eq!(g.try_reserve(start), Err(secs(6)));
        assert_eq!(g.try_reserve(start + secs(2)), Err(secs(4)));
        assert_eq!(g.try_reserve(start + secs(6)), Ok(()));
        assert!(g.try_reserve(start + secs(6)).is_err());
        assert!(g.busy_at(start + secs(6)));
        // A long pause refills the burst, no more.
        let later = start + secs(600);
        assert!(!g.busy_at(later));
        for _ in 0..3 {
            assert_eq!(g.try_reserve(later), Ok(()));
        }
        assert!(g.try_reserve(later).is_err());
    }

    #[test]
    fn gcra_reservations_queue_up() {
        let mut g = Gcra::new(Duration::from_millis(100), 1);
        let at: Vec<Duration> = (0..4).map(|_| g.reserve(Duration::ZERO)).collect();
        assert_eq!(at, [0, 100, 200, 300].map(Duration::from_millis).to_vec());
        // Time passing does not bank tokens beyond the burst.
        assert_eq!(g.reserve(secs(10)), secs(10));
        assert_eq!(g.reserve(secs(10)), secs(10) + Duration::from_millis(100));
    }

    #[test]
    fn rate_limits_halve_the_pace_and_recover() {
        let mut p = ChannelPace::new(80);
        assert_eq!(p.rate(), 80.0);
        assert_eq!(p.gcra.burst, 8);
        assert_eq!(p.slow_down(), 0);
        assert_eq!(p.slow_down(), 1);
        assert_eq!(p.rate(), 20.0);
        for _ in 0..1000 {
            p.accepted();
        }
        assert_eq!(p.rate(), 80.0);
        assert_eq!(p.level, 0);
        for _ in 0..20 {
            p.slow_down();
        }
        assert_eq!(p.rate(), 1.0, "never below one message a second");
    }

    #[test]
    fn random_fractions_vary_in_range() {
        let xs: Vec<f64> = (0..100).map(|_| random_fraction()).collect();
        assert!(xs.iter().all(|x| (0.0..1.0).contains(x)));
        assert!(xs.windows(2).any(|w| w[0] != w[1]));
    }
}
