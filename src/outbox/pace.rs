//! The outbox's pacing: a generic cell rate algorithm ([`Gcra`]) under the channel's
//! throughput ([`ChannelPace`], on tokio's monotonic clock, with its back-off on `130429`)
//! and each recipient's pair limit
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

/// At most one cut of the channel's rate per this long, however many `130429`s arrive in it.
pub(super) const CUT_WINDOW: Duration = Duration::from_secs(1);
/// A cut keeps this share of the rate.
pub(super) const CUT_TO: f64 = 0.75;
/// Additive increase: the share of `throughput_mps` won back per second of accepted sends,
/// so a cut is undone in about a second and the floor climbs back to full in four.
pub(super) const RECOVERY_PER_SECOND: f64 = 0.25;

/// What a `130429` did to the channel's pace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Backoff {
    /// The retry exponent for the refused message: rate-limit rounds before this one since
    /// the last accepted message (refusals of one round share it).
    pub(super) level: u32,
    /// Whether this refusal cut the rate (the first of its window).
    pub(super) cut: bool,
}

/// The channel's pace: `throughput_mps`, cut to [`CUT_TO`] by a `130429` at most once per
/// [`CUT_WINDOW`], won back by [`RECOVERY_PER_SECOND`] (additive increase), and held while
/// WhatsApp's `Retry-After` runs. Refusals of one round (requests sent before the last
/// reaction began) are one event: a burst of concurrent `130429`s cuts once and raises the
/// retry exponent once. On tokio's monotonic clock, taken as a value by every method: it
/// decides how long a task sleeps.
#[derive(Debug)]
pub(super) struct ChannelPace {
    origin: Instant,
    configured: f64,
    factor: f64,
    /// Rate-limit rounds since the last accepted message: the exponent of the retry delay.
    level: u32,
    /// When the last round began: refusals of requests sent before it belong to it.
    round_at: Option<Instant>,
    /// When the rate was last cut.
    cut_at: Option<Instant>,
    /// Where the additive increase counts from.
    recovered_at: Instant,
    /// No message leaves before this (WhatsApp's `Retry-After`).
    hold_until: Option<Instant>,
    gcra: Gcra,
}

impl ChannelPace {
    pub(super) fn new(throughput_mps: u32, now: Instant) -> Self {
        let mut pace = Self {
            origin: now,
            configured: f64::from(throughput_mps.max(1)),
            factor: 1.0,
            level: 0,
            round_at: None,
            cut_at: None,
            recovered_at: now,
            hold_until: None,
            gcra: Gcra::new(Duration::from_secs(1), 1),
        };
        pace.apply();
        pace
    }

    /// Messages per second now; never below one.
    pub(super) fn rate(&self) -> f64 {
        (self.configured * self.factor).max(1.0)
    }

    fn apply(&mut self) {
        let rate = self.rate();
        self.gcra.interval = Duration::from_secs_f64(1.0 / rate);
        // A tenth of a second's worth at once.
        self.gcra.burst = ((rate / 10.0).ceil() as u32).max(1);
    }

    /// When the next message may go: its token, and not before a `Retry-After` ran out.
    pub(super) fn reserve(&mut self, now: Instant) -> Instant {
        let since = now.saturating_duration_since(self.origin);
        let at = self.origin + self.gcra.reserve(since);
        match self.hold_until {
            Some(hold) if hold > at => hold,
            _ => at,
        }
    }

    /// A `130429` for a request sent at `sent_at`, handled at `now`; `retry_after` is
    /// WhatsApp's `Retry-After`, which holds the whole channel.
    pub(super) fn rate_limited(
        &mut self,
        sent_at: Instant,
        now: Instant,
        retry_after: Option<Duration>,
    ) -> Backoff {
        if let Some(wait) = retry_after {
            let until = now + wait;
            self.hold_until = Some(self.hold_until.map_or(until, |h| h.max(until)));
        }
        // A request that left before the last round began had not seen its reaction.
        if self.round_at.is_some_and(|round| sent_at < round) {
            return Backoff {
                level: self.level.saturating_sub(1),
                cut: false,
            };
        }
        let level = self.level;
        self.level = self.level.saturating_add(1);
        self.round_at = Some(now);
        let cut = self.cut_at.is_none_or(|at| now >= at + CUT_WINDOW);
        if cut {
            self.factor = (self.factor * CUT_TO).max(1.0 / self.configured);
            self.cut_at = Some(now);
            self.recovered_at = now;
            self.apply();
        }
        Backoff { level, cut }
    }

    /// WhatsApp accepted a message at `now`: the retry exponent resets, and the rate wins
    /// back [`RECOVERY_PER_SECOND`] of `throughput_mps` per second since the last step.
    pub(super) fn accepted(&mut self, now: Instant) {
        self.level = 0;
        if self.factor < 1.0 {
            let seconds = now
                .saturating_duration_since(self.recovered_at)
                .as_secs_f64();
            self.factor = (self.factor + RECOVERY_PER_SECOND * seconds).min(1.0);
            self.apply();
        }
        self.recovered_at = now;
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

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_burst_of_rate_limits_cuts_once_and_shares_one_retry_level() {
        let t0 = Instant::now();
        let mut p = ChannelPace::new(50_000, t0);
        assert_eq!(p.rate(), 50_000.0);
        // 100 requests in flight, all refused within 2 ms: one round, one cut.
        let first = p.rate_limited(t0, t0 + ms(1), None);
        assert_eq!(
            first,
            Backoff {
                level: 0,
                cut: true
            }
        );
        for i in 0..99 {
            let b = p.rate_limited(t0 + Duration::from_micros(i), t0 + ms(2), None);
            assert_eq!(
                b,
                Backoff {
                    level: 0,
                    cut: false
                }
            );
        }
        assert_eq!(p.rate(), 50_000.0 * CUT_TO);
        // A request sent after that reaction began is a new round: the exponent rises, but
        // the rate is cut at most once per window.
        let again = p.rate_limited(t0 + ms(5), t0 + ms(6), None);
        assert_eq!(
            again,
            Backoff {
                level: 1,
                cut: false
            }
        );
        assert_eq!(p.rate(), 50_000.0 * CUT_TO);
        let later = p.rate_limited(t0 + ms(1_100), t0 + ms(1_101), None);
        assert_eq!(
            later,
            Backoff {
                level: 2,
                cut: true
            }
        );
        assert_eq!(p.rate(), 50_000.0 * CUT_TO * CUT_TO);
    }

    #[test]
    fn the_rate_recovers_in_seconds_by_additive_increase() {
        let t0 = Instant::now();
        let mut p = ChannelPace::new(80, t0);
        p.rate_limited(t0, t0, None);
        assert_eq!(p.rate(), 60.0);
        // Half a second of accepted sends wins back an eighth of 80 mps.
        p.accepted(t0 + ms(500));
        assert_eq!(p.rate(), 70.0);
        assert_eq!(p.level, 0);
        p.accepted(t0 + ms(1_000));
        assert_eq!(p.rate(), 80.0, "never above throughput_mps");
        p.accepted(t0 + ms(5_000));
        assert_eq!(p.rate(), 80.0);
    }

    #[test]
    fn a_refusal_every_window_keeps_the_rate_near_the_configured_one() {
        // A 30 % refusal rate means a refusal in every window: one cut a second, and a
        // second of accepted sends in between.
        let t0 = Instant::now();
        let mut p = ChannelPace::new(1_000, t0);
        let mut lowest = p.rate();
        for second in 0..120u64 {
            let now = t0 + Duration::from_secs(second);
            p.rate_limited(now, now, None);
            lowest = lowest.min(p.rate());
            for tenth in 1..10 {
                p.accepted(now + ms(tenth * 100));
            }
        }
        // It settles between about 0.68 and 0.9 of the configured rate.
        assert!(lowest >= 600.0, "lowest {lowest}");
        // Refusals without any accepted send in between do go down, one cut a second.
        let mut p = ChannelPace::new(80, t0);
        for second in 0..20u64 {
            let now = t0 + Duration::from_secs(second);
            p.rate_limited(now, now, None);
        }
        assert_eq!(p.rate(), 1.0, "never below one message a second");
    }

    #[test]
    fn retry_after_holds_the_channel() {
        let t0 = Instant::now();
        let mut p = ChannelPace::new(10, t0);
        p.rate_limited(t0, t0, Some(Duration::from_secs(7)));
        assert_eq!(p.reserve(t0 + ms(10)), t0 + Duration::from_secs(7));
        // A shorter one does not shorten the hold.
        p.rate_limited(t0, t0 + ms(20), Some(Duration::from_secs(1)));
        assert_eq!(p.reserve(t0 + ms(30)), t0 + Duration::from_secs(7));
        // After it, the bucket paces again.
        let after = t0 + Duration::from_secs(8);
        assert_eq!(p.reserve(after), after);
    }

    #[test]
    fn random_fractions_vary_in_range() {
        let xs: Vec<f64> = (0..100).map(|_| random_fraction()).collect();
        assert!(xs.iter().all(|x| (0.0..1.0).contains(x)));
        assert!(xs.windows(2).any(|w| w[0] != w[1]));
    }
}
