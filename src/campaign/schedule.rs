//! When a campaign runs, as values: the next run times of a 5-field cron or a one-off `at`
//! in a time zone (correct across daylight-saving changes), quiet hours in a recipient's
//! zone, and which scheduled runs a (re)start begins and which it records as missed.
//!
//! Pure: no I/O, and time is always an argument (the server passes its `Clock`'s now).
//!
//! # Local times that do not exist or happen twice
//!
//! A schedule names local wall-clock times. Each one becomes **the first instant at which
//! the zone's clock reads that time or later** ([`resolve_local`]):
//!
//! * a time that exists once is that instant;
//! * a time that happens twice (a fall-back day: 02:30 in Europe/Berlin, 01:30 in
//!   America/New_York) is its first occurrence, so it runs once, never twice;
//! * a time that does not exist (inside a spring-forward gap: 02:30 in Europe/Berlin) is the
//!   end of the gap (03:00 local, 01:00 UTC), so it runs once, never zero times. Several
//!   times in one gap (a job every 15 minutes) land on that same instant and run once.
//!
//! The schedule is computed on local naive times (croner on `NaiveDateTime`) and each match
//! resolved by this rule, so the rule holds whatever croner does with zoned datetimes.
//!
//! # Missed runs
//!
//! A run may start while `now < scheduled_for + ttl`; after that it is missed. When the
//! server was down while a recurrence fell due several times, [`Schedule::catch_up`] starts
//! at most one run, the latest, if it is still within its ttl; every other one is recorded
//! as missed (superseded by the later run, or past its ttl).

use chrono::{DateTime, Duration, LocalResult, NaiveDate, NaiveDateTime, NaiveTime, TimeZone, Utc};
use chrono_tz::Tz;
use croner::Cron;

/// How many matches a search steps over before it gives up: only a match that resolves to
/// an instant already passed is stepped over (inside a repeated hour), so real searches
/// take a few steps; the bound keeps a pathological pattern from spinning.
const SEARCH_STEPS: usize = 100_000;

/// At most this many missed runs are listed by one catch-up (the most recent ones): a
/// per-minute campaign on a server down for a month would otherwise list 43,200.
pub const MISSED_LISTED: usize = 100;

/// When a campaign runs: a recurrence or a one-off, in its time zone.
#[derive(Debug, Clone)]
pub struct Schedule {
    when: When,
    zone: Tz,
}

#[derive(Debug, Clone)]
enum When {
    Cron(Box<Cron>),
    At(NaiveDateTime),
}

/// Why a scheduled run was not started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MissedReason {
    /// `now` was at or past `scheduled_for + ttl`.
    PastTtl,
    /// A later run of the same recurrence was due too and started instead.
    Superseded,
}

impl MissedReason {
    /// The reason as it is recorded with the run.
    pub fn describe(self) -> &'static str {
        match self {
            MissedReason::PastTtl => "the server was not running before the run's ttl ran out",
            MissedReason::Superseded => "a later run fell due while the server was not running",
        }
    }
}

/// A scheduled run that will not start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MissedRun {
    pub scheduled_for: DateTime<Utc>,
    pub reason: MissedReason,
}

/// What to do with the runs that fell due by `now` ([`Schedule::catch_up`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatchUp {
    /// The run to start now, by its scheduled time.
    pub start: Option<DateTime<Utc>>,
    /// Runs to record as missed, oldest first (at most [`MISSED_LISTED`], the most recent).
    pub missed: Vec<MissedRun>,
    /// Older missed runs were left out of `missed`.
    pub missed_truncated: bool,
    /// The next scheduled time after `now`, to persist as the campaign's `next_run_at`.
    pub next_run_at: Option<DateTime<Utc>>,
}

impl Schedule {
    /// A recurrence: `cron` (already parsed) read as local times of `zone`.
    pub fn cron(cron: Cron, zone: Tz) -> Self {
        Schedule {
            when: When::Cron(Box::new(cron)),
            zone,
        }
    }

    /// A one-off run at a local date and time of `zone`.
    pub fn at(at: NaiveDateTime, zone: Tz) -> Self {
        Schedule {
            when: When::At(at),
            zone,
        }
    }

    /// The schedule's time zone.
    pub fn zone(&self) -> Tz {
        self.zone
    }

    /// The first run time strictly after `t`; `None` if there is none (a one-off that has
    /// passed, a pattern that never matches).
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match &self.when {
            When::At(at) => Some(resolve_local(self.zone, *at)).filter(|&r| r > t),
            When::Cron(cron) => {
                let mut cursor = t.with_timezone(&self.zone).naive_local();
                for _ in 0..SEARCH_STEPS {
                    let local = cron.find_next_occurrence(&cursor, false).ok()?;
                    let at = resolve_local(self.zone, local);
                    if at > t {
                        return Some(at);
                    }
                    cursor = local;
                }
                None
            }
        }
    }

    /// The latest run time at or before `t`.
    pub fn latest_at_or_before(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match &self.when {
            When::At(at) => Some(resolve_local(self.zone, *at)).filter(|&r| r <= t),
            When::Cron(cron) => {
                let mut cursor = highest_reading_by(self.zone, t);
                let mut inclusive = true;
                for _ in 0..SEARCH_STEPS {
                    let local = cron.find_previous_occurrence(&cursor, inclusive).ok()?;
                    let at = resolve_local(self.zone, local);
                    if at <= t {
                        return Some(at);
                    }
                    cursor = local;
                    inclusive = false;
                }
                None
            }
        }
    }

    /// The next `n` run times after `after`, in order (fewer if the schedule ends).
    pub fn upcoming(&self, after: DateTime<Utc>, n: usize) -> Vec<DateTime<Utc>> {
        let mut out = Vec::with_capacity(n.min(64));
        let mut t = after;
        while out.len() < n {
            let Some(next) = self.next_after(t) else {
                break;
            };
            out.push(next);
            t = next;
        }
        out
    }

    /// The runs that fell due by `now`, counting from `due` (the persisted `next_run_at`,
    /// itself due): the latest of them starts if `now < latest + ttl`; every other one is
    /// missed. One rule for a server that was up (one run due) and one back from a stop
    /// (several).
    pub fn catch_up(&self, due: DateTime<Utc>, now: DateTime<Utc>, ttl: Duration) -> CatchUp {
        let next_run_at = self.next_after(now);
        if due > now {
            return CatchUp {
                start: None,
                missed: Vec::new(),
                missed_truncated: false,
                next_run_at: Some(due),
            };
        }
        let latest = self
            .latest_at_or_before(now)
            .map_or(due, |latest| latest.max(due));
        let start = within_ttl(latest, now, ttl).then_some(latest);
        let (missed, missed_truncated) = self.missed_between(due, latest, start.is_none());
        // A missed run still within its ttl has a later one within it too: the one started.
        let reason_of = |at: DateTime<Utc>| {
            if within_ttl(at, now, ttl) {
                MissedReason::Superseded
            } else {
                MissedReason::PastTtl
            }
        };
        CatchUp {
            start,
            missed: missed
                .into_iter()
                .map(|at| MissedRun {
                    scheduled_for: at,
                    reason: reason_of(at),
                })
                .collect(),
            missed_truncated,
            next_run_at,
        }
    }

    /// Scheduled times in `[due, latest)` (and `latest` itself if `with_latest`), oldest
    /// first, at most [`MISSED_LISTED`] of the most recent; and whether older ones were cut.
    fn missed_between(
        &self,
        due: DateTime<Utc>,
        latest: DateTime<Utc>,
        with_latest: bool,
    ) -> (Vec<DateTime<Utc>>, bool) {
        let mut out = Vec::new();
        if with_latest {
            out.push(latest);
        }
        let mut cursor = latest;
        loop {
            let previous = self
                .latest_at_or_before(cursor - Duration::milliseconds(1))
                .filter(|&p| p > due);
            let at = previous.unwrap_or(due);
            if at >= cursor {
                break;
            }
            if out.len() == MISSED_LISTED {
                out.reverse();
                return (out, true);
            }
            out.push(at);
            if previous.is_none() {
                break;
            }
            cursor = at;
        }
        out.reverse();
        (out, false)
    }
}

/// Whether a run scheduled for `scheduled_for` may still start at `now`: before its ttl ran
/// out (`now < scheduled_for + ttl`). A run whose ttl ran out is missed.
pub fn within_ttl(scheduled_for: DateTime<Utc>, now: DateTime<Utc>, ttl: Duration) -> bool {
    now < scheduled_for + ttl
}

/// The first instant at which `zone`'s clock reads `local` or later: the instant itself for
/// a time that exists once, the first occurrence of a time that happens twice, and the end
/// of the gap for a time skipped by a spring-forward change.
pub fn resolve_local(zone: Tz, local: NaiveDateTime) -> DateTime<Utc> {
    match zone.from_local_datetime(&local) {
        LocalResult::Single(at) => at.with_timezone(&Utc),
        LocalResult::Ambiguous(first, second) => first.min(second).with_timezone(&Utc),
        LocalResult::None => gap_end(zone, local),
    }
}

/// The first instant (to the millisecond) whose local reading is at or after `local`, which
/// lies in a gap. Zone offsets are under a day, so the answer lies within a day of `local`
/// read as UTC; the reading only moves forward across a gap, so a binary search finds it.
fn gap_end(zone: Tz, local: NaiveDateTime) -> DateTime<Utc> {
    let reads_at_least = |ms: i64| {
        DateTime::from_timestamp_millis(ms)
            .is_some_and(|at| at.with_timezone(&zone).naive_local() >= local)
    };
    let day = Duration::days(1).num_milliseconds();
    let base = local.and_utc().timestamp_millis();
    let (mut lo, mut hi) = (base - day, base + day);
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if reads_at_least(mid) {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    DateTime::from_timestamp_millis(hi).unwrap_or(local.and_utc())
}

/// The highest local reading `zone`'s clock showed at or before `t`: `t`'s own reading,
/// unless `t` lies in the second pass of a repeated hour, whose first pass read up to the
/// hour's end.
fn highest_reading_by(zone: Tz, t: DateTime<Utc>) -> NaiveDateTime {
    let reading = t.with_timezone(&zone).naive_local();
    match zone.from_local_datetime(&reading) {
        LocalResult::Ambiguous(first, second) if t > first.min(second) => {
            let repeated = (first.max(second) - first.min(second)).abs();
            reading + repeated
        }
        _ => reading,
    }
}

/// Quiet hours: a daily span of local time in which marketing is not sent, `from` inclusive
/// to `to` exclusive. `from > to` spans midnight (21:00-09:00); `from == to` is none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuietHours {
    pub from: NaiveTime,
    pub to: NaiveTime,
}

impl QuietHours {
    pub fn new(from: NaiveTime, to: NaiveTime) -> Self {
        QuietHours { from, to }
    }

    /// Whether `at` falls in quiet hours by `zone`'s clock.
    pub fn contains(&self, at: DateTime<Utc>, zone: Tz) -> bool {
        let time = at.with_timezone(&zone).time();
        if self.from <= self.to {
            self.from <= time && time < self.to
        } else {
            time >= self.from || time < self.to
        }
    }

    /// When the quiet hours that hold `at` end (the deferral target): the first instant
    /// after `at` at which `zone`'s clock reads `to` (or, if `to` is skipped that day, the
    /// end of the gap). `None` when `at` is not in quiet hours.
    pub fn end_after(&self, at: DateTime<Utc>, zone: Tz) -> Option<DateTime<Utc>> {
        if !self.contains(at, zone) {
            return None;
        }
        let local = at.with_timezone(&zone).naive_local();
        let day: NaiveDate = if local.time() < self.to {
            local.date()
        } else {
            local.date().succ_opt()?
        };
        let end = day.and_time(self.to);
        Some(match zone.from_local_datetime(&end) {
            LocalResult::Single(end) => end.with_timezone(&Utc),
            // `at` may be in the second pass of the repeated hour, after the first `to`.
            LocalResult::Ambiguous(first, second) => {
                let (first, second) = (first.min(second), first.max(second));
                if first > at { first } else { second }.with_timezone(&Utc)
            }
            LocalResult::None => gap_end(zone, end),
        })
    }

    /// When a message planned for `at` may go: `at` itself outside quiet hours, else their
    /// end.
    pub fn defer(&self, at: DateTime<Utc>, zone: Tz) -> DateTime<Utc> {
        self.end_after(at, zone).unwrap_or(at)
    }
}

/// The zone quiet hours are read in: the recipient's own when the contact has one flowgate
/// knows, else the campaign's.
pub fn recipient_zone(contact_zone: Option<&str>, campaign_zone: Tz) -> Tz {
    contact_zone
        .and_then(|name| name.trim().parse::<Tz>().ok())
        .unwrap_or(campaign_zone)
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use chrono::{Datelike, Timelike};
    use chrono_tz::America::New_York;
    use chrono_tz::Europe::Berlin;
    use proptest::prelude::*;

    use super::*;

    fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, 0).unwrap()
    }

    fn local(y: i32, mo: u32, d: u32, h: u32, mi: u32) -> NaiveDateTime {
        NaiveDate::from_ymd_opt(y, mo, d)
            .unwrap()
            .and_hms_opt(h, mi, 0)
            .unwrap()
    }

    fn hm(h: u32, m: u32) -> NaiveTime {
        NaiveTime::from_hms_opt(h, m, 0).unwrap()
    }

    fn cron(pattern: &str, zone: Tz) -> Schedule {
        Schedule::cron(Cron::from_str(pattern).unwrap(), zone)
    }

    // 2026's changes: Europe/Berlin springs forward on 29 March (02:00 CET -> 03:00 CEST, at
    // 01:00 UTC) and falls back on 25 October (03:00 CEST -> 02:00 CET, at 01:00 UTC);
    // America/New_York on 8 March (02:00 EST -> 03:00 EDT, at 07:00 UTC) and 1 November
    // (02:00 EDT -> 01:00 EST, at 06:00 UTC).

    #[test]
    fn a_0930_job_runs_once_on_both_change_days_in_both_zones() {
        let berlin = cron("30 9 * * *", Berlin);
        assert_eq!(
            berlin.upcoming(utc(2026, 3, 28, 0, 0), 3),
            [
                utc(2026, 3, 28, 8, 30),
                utc(2026, 3, 29, 7, 30),
                utc(2026, 3, 30, 7, 30)
            ]
        );
        assert_eq!(
            berlin.upcoming(utc(2026, 10, 24, 0, 0), 3),
            [
                utc(2026, 10, 24, 7, 30),
                utc(2026, 10, 25, 8, 30),
                utc(2026, 10, 26, 8, 30)
            ]
        );
        let new_york = cron("30 9 * * *", New_York);
        assert_eq!(
            new_york.upcoming(utc(2026, 3, 7, 0, 0), 3),
            [
                utc(2026, 3, 7, 14, 30),
                utc(2026, 3, 8, 13, 30),
                utc(2026, 3, 9, 13, 30)
            ]
        );
        assert_eq!(
            new_york.upcoming(utc(2026, 10, 31, 0, 0), 3),
            [
                utc(2026, 10, 31, 13, 30),
                utc(2026, 11, 1, 14, 30),
                utc(2026, 11, 2, 14, 30)
            ]
        );
    }

    #[test]
    fn a_0230_job_on_the_spring_forward_day_runs_once_at_the_end_of_the_gap() {
        assert_eq!(
            cron("30 2 * * *", Berlin).upcoming(utc(2026, 3, 28, 0, 0), 3),
            [
                utc(2026, 3, 28, 1, 30),
                utc(2026, 3, 29, 1, 0), // 03:00 CEST
                utc(2026, 3, 30, 0, 30)
            ]
        );
        assert_eq!(
            cron("30 2 * * *", New_York).upcoming(utc(2026, 3, 7, 0, 0), 3),
            [
                utc(2026, 3, 7, 7, 30),
                utc(2026, 3, 8, 7, 0), // 03:00 EDT
                utc(2026, 3, 9, 6, 30)
            ]
        );
    }

    #[test]
    fn a_time_that_happens_twice_runs_once_at_its_first_occurrence() {
        assert_eq!(
            cron("30 2 * * *", Berlin).upcoming(utc(2026, 10, 24, 0, 0), 3),
            [
                utc(2026, 10, 24, 0, 30),
                utc(2026, 10, 25, 0, 30), // 02:30 CEST, not 02:30 CET as well
                utc(2026, 10, 26, 1, 30)
            ]
        );
        assert_eq!(
            cron("30 1 * * *", New_York).upcoming(utc(2026, 10, 31, 0, 0), 3),
            [
                utc(2026, 10, 31, 5, 30),
                utc(2026, 11, 1, 5, 30), // 01:30 EDT, not 01:30 EST as well
                utc(2026, 11, 2, 6, 30)
            ]
        );
        // Asked from inside the second pass (02:15 CET), the repeated 02:30 is not run again.
        assert_eq!(
            cron("30 2 * * *", Berlin).next_after(utc(2026, 10, 25, 1, 15)),
            Some(utc(2026, 10, 26, 1, 30))
        );
    }

    #[test]
    fn every_local_time_runs_once_in_a_gap_and_in_a_repeated_hour() {
        // 02:00, 02:15, 02:30, 02:45 do not exist and 03:00 is where they land: one run.
        assert_eq!(
            cron("*/15 * * * *", Berlin).upcoming(utc(2026, 3, 29, 0, 40), 4),
            [
                utc(2026, 3, 29, 0, 45),
                utc(2026, 3, 29, 1, 0),
                utc(2026, 3, 29, 1, 15),
                utc(2026, 3, 29, 1, 30)
            ]
        );
        // 02:00 and 02:30 run in the first pass only (croner alone would run them twice).
        assert_eq!(
            cron("*/30 * * * *", Berlin).upcoming(utc(2026, 10, 24, 23, 45), 4),
            [
                utc(2026, 10, 25, 0, 0),
                utc(2026, 10, 25, 0, 30),
                utc(2026, 10, 25, 2, 0), // 03:00 CET
                utc(2026, 10, 25, 2, 30)
            ]
        );
    }

    #[test]
    fn latest_at_or_before_sees_the_first_pass_from_the_second() {
        let daily = cron("30 2 * * *", Berlin);
        // 02:15 CET (second pass): 02:30 CEST already ran.
        assert_eq!(
            daily.latest_at_or_before(utc(2026, 10, 25, 1, 15)),
            Some(utc(2026, 10, 25, 0, 30))
        );
        // 02:20 CEST (first pass): 02:30 is still ahead.
        assert_eq!(
            daily.latest_at_or_before(utc(2026, 10, 25, 0, 20)),
            Some(utc(2026, 10, 24, 0, 30))
        );
        assert_eq!(
            daily.latest_at_or_before(utc(2026, 3, 29, 1, 0)),
            Some(utc(2026, 3, 29, 1, 0))
        );
    }

    #[test]
    fn a_one_off_follows_the_same_rule_and_runs_once() {
        let gap = Schedule::at(local(2026, 3, 29, 2, 30), Berlin);
        assert_eq!(
            gap.next_after(utc(2026, 1, 1, 0, 0)),
            Some(utc(2026, 3, 29, 1, 0))
        );
        assert_eq!(gap.next_after(utc(2026, 3, 29, 1, 0)), None);
        assert_eq!(gap.upcoming(utc(2026, 1, 1, 0, 0), 5).len(), 1);
        let fold = Schedule::at(local(2026, 11, 1, 1, 30), New_York);
        assert_eq!(
            fold.next_after(utc(2026, 1, 1, 0, 0)),
            Some(utc(2026, 11, 1, 5, 30))
        );
        assert_eq!(
            fold.latest_at_or_before(utc(2026, 12, 1, 0, 0)),
            Some(utc(2026, 11, 1, 5, 30))
        );
        assert_eq!(fold.latest_at_or_before(utc(2026, 11, 1, 5, 29)), None);
    }

    #[test]
    fn a_pattern_that_never_matches_has_no_next_run() {
        let never = cron("0 0 30 2 *", Berlin);
        assert_eq!(never.next_after(utc(2026, 1, 1, 0, 0)), None);
        assert!(never.upcoming(utc(2026, 1, 1, 0, 0), 5).is_empty());
    }

    #[test]
    fn quiet_hours_across_midnight_in_the_recipients_zone() {
        let quiet = QuietHours::new(hm(21, 0), hm(9, 0));
        // 20:00 UTC on a January Monday: 21:00 in Berlin, 15:00 in New York.
        let at = utc(2026, 1, 5, 20, 0);
        let ny = recipient_zone(Some("America/New_York"), Berlin);
        assert_eq!(ny, New_York);
        assert!(!quiet.contains(at, ny));
        assert_eq!(quiet.defer(at, ny), at);
        let unknown = recipient_zone(None, Berlin);
        assert!(quiet.contains(at, unknown));
        assert_eq!(quiet.end_after(at, unknown), Some(utc(2026, 1, 6, 8, 0)));
        assert_eq!(recipient_zone(Some("Mars/Olympus"), Berlin), Berlin);
        // After midnight, the same night's quiet hours end the same morning.
        assert_eq!(
            quiet.end_after(utc(2026, 1, 6, 2, 0), Berlin),
            Some(utc(2026, 1, 6, 8, 0))
        );
        assert!(!quiet.contains(utc(2026, 1, 6, 8, 0), Berlin));
        assert!(quiet.contains(utc(2026, 1, 6, 7, 59), Berlin));
    }

    #[test]
    fn quiet_hours_end_by_the_local_clock_across_dst() {
        let quiet = QuietHours::new(hm(21, 0), hm(9, 0));
        // 23:00 EST on 7 March: the night is an hour shorter, quiet ends 09:00 EDT.
        let at = utc(2026, 3, 8, 4, 0);
        assert!(quiet.contains(at, New_York));
        assert_eq!(quiet.end_after(at, New_York), Some(utc(2026, 3, 8, 13, 0)));
        // ...and an hour longer in the autumn: 09:00 EST.
        assert_eq!(
            quiet.end_after(utc(2026, 11, 1, 4, 0), New_York),
            Some(utc(2026, 11, 1, 14, 0))
        );
        // Quiet hours ending at a time the spring change skips end at the end of the gap.
        let to_gap = QuietHours::new(hm(21, 0), hm(2, 30));
        assert_eq!(
            to_gap.end_after(utc(2026, 3, 28, 23, 0), Berlin),
            Some(utc(2026, 3, 29, 1, 0))
        );
        // Ending at a repeated time: the first 02:30, or the second from the second pass.
        assert_eq!(
            to_gap.end_after(utc(2026, 10, 25, 0, 15), Berlin),
            Some(utc(2026, 10, 25, 0, 30))
        );
        assert_eq!(
            to_gap.end_after(utc(2026, 10, 25, 1, 15), Berlin),
            Some(utc(2026, 10, 25, 1, 30))
        );
    }

    #[test]
    fn quiet_hours_within_a_day_and_none() {
        let lunch = QuietHours::new(hm(12, 0), hm(14, 0));
        // Berlin in January is UTC+1.
        assert!(!lunch.contains(utc(2026, 1, 5, 10, 59), Berlin));
        assert!(lunch.contains(utc(2026, 1, 5, 11, 0), Berlin));
        assert!(lunch.contains(utc(2026, 1, 5, 12, 59), Berlin));
        assert!(!lunch.contains(utc(2026, 1, 5, 13, 0), Berlin));
        assert_eq!(
            lunch.end_after(utc(2026, 1, 5, 11, 30), Berlin),
            Some(utc(2026, 1, 5, 13, 0))
        );
        assert_eq!(lunch.end_after(utc(2026, 1, 5, 14, 0), Berlin), None);
        let none = QuietHours::new(hm(9, 0), hm(9, 0));
        for hour in 0..24 {
            assert!(!none.contains(utc(2026, 1, 5, hour, 0), Berlin));
        }
    }

    #[test]
    fn a_run_starts_within_its_ttl_and_is_missed_after() {
        let daily = cron("0 10 * * *", Berlin);
        let due = utc(2026, 1, 5, 9, 0); // 10:00 CET
        let ttl = Duration::hours(2);
        let inside = daily.catch_up(due, utc(2026, 1, 5, 10, 59), ttl);
        assert_eq!(inside.start, Some(due));
        assert!(inside.missed.is_empty());
        assert_eq!(inside.next_run_at, Some(utc(2026, 1, 6, 9, 0)));

        let outside = daily.catch_up(due, utc(2026, 1, 5, 11, 0), ttl);
        assert_eq!(outside.start, None);
        assert_eq!(
            outside.missed,
            [MissedRun {
                scheduled_for: due,
                reason: MissedReason::PastTtl
            }]
        );
        assert_eq!(outside.next_run_at, Some(utc(2026, 1, 6, 9, 0)));

        let early = daily.catch_up(due, utc(2026, 1, 5, 8, 0), ttl);
        assert_eq!((early.start, early.next_run_at), (None, Some(due)));
        assert!(early.missed.is_empty());
        assert!(!within_ttl(due, due + ttl, ttl));
        assert!(within_ttl(due, due + ttl - Duration::milliseconds(1), ttl));
    }

    #[test]
    fn a_server_down_for_days_starts_only_the_latest_run_within_ttl() {
        let daily = cron("0 10 * * *", Berlin);
        let due = utc(2026, 1, 5, 9, 0);
        let now = utc(2026, 1, 8, 10, 0);
        let short = daily.catch_up(due, now, Duration::hours(2));
        assert_eq!(short.start, Some(utc(2026, 1, 8, 9, 0)));
        let missed = |runs: &[MissedRun]| {
            runs.iter()
                .map(|m| (m.scheduled_for.day(), m.reason))
                .collect::<Vec<_>>()
        };
        use MissedReason::{PastTtl, Superseded};
        assert_eq!(
            missed(&short.missed),
            [(5, PastTtl), (6, PastTtl), (7, PastTtl)]
        );
        let long = daily.catch_up(due, now, Duration::days(3));
        assert_eq!(long.start, Some(utc(2026, 1, 8, 9, 0)));
        assert_eq!(
            missed(&long.missed),
            [(5, PastTtl), (6, Superseded), (7, Superseded)]
        );
        // The latest is past its ttl too: nothing starts, all are missed.
        let late = daily.catch_up(due, utc(2026, 1, 8, 12, 0), Duration::hours(2));
        assert_eq!(late.start, None);
        assert_eq!(
            missed(&late.missed),
            [(5, PastTtl), (6, PastTtl), (7, PastTtl), (8, PastTtl)]
        );
        assert_eq!(late.next_run_at, Some(utc(2026, 1, 9, 9, 0)));
    }

    #[test]
    fn a_long_outage_lists_only_the_most_recent_missed_runs() {
        let minutely = cron("* * * * *", Berlin);
        let due = utc(2026, 1, 5, 0, 0);
        let now = utc(2026, 1, 6, 0, 0);
        let caught = minutely.catch_up(due, now, Duration::minutes(5));
        assert_eq!(caught.start, Some(now));
        assert_eq!(caught.missed.len(), MISSED_LISTED);
        assert!(caught.missed_truncated);
        assert_eq!(
            caught.missed.last().unwrap().scheduled_for,
            now - Duration::minutes(1)
        );
        assert!(
            caught
                .missed
                .windows(2)
                .all(|w| w[0].scheduled_for < w[1].scheduled_for)
        );
        let short = minutely.catch_up(due, due + Duration::minutes(3), Duration::minutes(5));
        assert_eq!(short.missed.len(), 3);
        assert!(!short.missed_truncated);
    }

    const ZONES: &[Tz] = &[
        Berlin,
        New_York,
        chrono_tz::Australia::Sydney,
        chrono_tz::Australia::Lord_Howe, // a 30-minute change
        chrono_tz::America::Santiago,    // changes at midnight
        chrono_tz::Asia::Kolkata,
        chrono_tz::UTC,
    ];

    const PATTERNS: &[&str] = &[
        "30 9 * * *",
        "30 2 * * *",
        "0 0 * * *",
        "*/15 * * * *",
        "0 10 * * MON",
        "45 1 1 * *",
        "0 */3 * * 1-5",
    ];

    proptest! {
        #[test]
        fn the_next_run_is_strictly_after_t(
            zone in proptest::sample::select(ZONES),
            pattern in proptest::sample::select(PATTERNS),
            ms in 1_577_836_800_000i64..2_051_222_400_000, // 2020-2035
        ) {
            let t = DateTime::from_timestamp_millis(ms).unwrap();
            let schedule = cron(pattern, zone);
            let next = schedule.next_after(t).unwrap();
            prop_assert!(next > t);
            let latest = schedule.latest_at_or_before(next).unwrap();
            prop_assert_eq!(latest, next);
            prop_assert!(schedule.latest_at_or_before(t).unwrap() <= t);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn a_daily_job_fires_once_per_local_day_for_a_year(
            zone in proptest::sample::select(ZONES),
            hour in 0u32..24,
            minute in 0u32..60,
            year in 2024i32..2030,
        ) {
            let schedule = cron(&format!("{minute} {hour} * * *"), zone);
            let first = NaiveDate::from_ymd_opt(year, 1, 1).unwrap();
            let start = resolve_local(zone, first.and_hms_opt(0, 0, 0).unwrap())
                - Duration::milliseconds(1);
            let runs = schedule.upcoming(start, 366);
            let dates: Vec<NaiveDate> = runs
                .iter()
                .map(|r| r.with_timezone(&zone).date_naive())
                .collect();
            let expected: Vec<NaiveDate> = first.iter_days().take(366).collect();
            prop_assert_eq!(dates, expected);
            for run in &runs {
                let reading = run.with_timezone(&zone).time();
                // On time, or at the end of a gap that swallowed the time.
                prop_assert!(
                    reading == hm(hour, minute)
                        || zone.from_local_datetime(
                            &run.with_timezone(&zone).date_naive().and_time(hm(hour, minute))
                        ) == LocalResult::None,
                    "{} ran at {}", run, reading
                );
                prop_assert_eq!(run.second(), 0);
            }
        }
    }
}
