//! Five-field cron expressions (`minute hour day-of-month month day-of-week`, UTC), what a
//! Kubernetes CronJob accepts: numbers, `*`, ranges `a-b`, steps `*/n` and `a-b/n`, lists `a,b`,
//! month and weekday names (`JAN`, `MON-FRI`), and `@hourly`, `@daily`, `@weekly`, `@monthly`,
//! `@yearly`. Day-of-week 0 and 7 are Sunday. As in cron, when both day fields are restricted a
//! day matches if either does. And [`state`]: when a Precache's schedule fired and fires next.
//!
//! Written here rather than taken from a crate: the parser is ~150 lines over `jiff` (already
//! in the tree through k8s-openapi), and a bad expression must come back as a message for a
//! status condition, never a panic.

use k8s_openapi::jiff::{Timestamp, ToSpan as _, tz::TimeZone};
use larder_core::crd::Precache;

/// A parsed schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    minutes: u64,
    hours: u64,
    days_of_month: u64,
    months: u64,
    days_of_week: u64,
    dom_restricted: bool,
    dow_restricted: bool,
}

/// Why an expression is not a schedule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("schedule `{expression}`: {detail}")]
pub struct ScheduleError {
    /// The expression as given.
    pub expression: String,
    /// What is wrong with it.
    pub detail: String,
}

/// How far ahead [`Schedule::next_after`] looks: a valid expression such as `0 0 31 2 *`
/// (February 31st) never fires, and must not loop forever.
const HORIZON_DAYS: i64 = 366 * 5;

impl Schedule {
    /// Parses a five-field expression.
    pub fn parse(expression: &str) -> Result<Self, ScheduleError> {
        let fail = |detail: String| ScheduleError {
            expression: expression.to_owned(),
            detail,
        };
        let expanded = match expression.trim() {
            "@yearly" | "@annually" => "0 0 1 1 *",
            "@monthly" => "0 0 1 * *",
            "@weekly" => "0 0 * * 0",
            "@daily" | "@midnight" => "0 0 * * *",
            "@hourly" => "0 * * * *",
            other => other,
        };
        let fields: Vec<&str> = expanded.split_whitespace().collect();
        let [minute, hour, dom, month, dow] = fields[..] else {
            return Err(fail(format!(
                "expected 5 fields (minute hour day-of-month month day-of-week), found {}",
                fields.len()
            )));
        };
        let minutes = field(minute, 0, 59, &[]).map_err(|d| fail(format!("minute: {d}")))?;
        let hours = field(hour, 0, 23, &[]).map_err(|d| fail(format!("hour: {d}")))?;
        let days_of_month =
            field(dom, 1, 31, &[]).map_err(|d| fail(format!("day of month: {d}")))?;
        let months = field(month, 1, 12, &MONTHS).map_err(|d| fail(format!("month: {d}")))?;
        let mut days_of_week =
            field(dow, 0, 7, &WEEKDAYS).map_err(|d| fail(format!("day of week: {d}")))?;
        if days_of_week & (1 << 7) != 0 {
            days_of_week = (days_of_week | 1) & !(1 << 7);
        }
        Ok(Self {
            minutes,
            hours,
            days_of_month,
            months,
            days_of_week,
            dom_restricted: dom != "*",
            dow_restricted: dow != "*",
        })
    }

    /// The first minute strictly after `after` that the schedule matches, or `None` if it never
    /// fires within five years.
    pub fn next_after(&self, after: Timestamp) -> Option<Timestamp> {
        let start = after.to_zoned(TimeZone::UTC);
        // The next whole minute.
        let mut t = start
            .with()
            .second(0)
            .subsec_nanosecond(0)
            .build()
            .ok()?
            .checked_add(1.minute())
            .ok()?;
        let end = start.checked_add(HORIZON_DAYS.days()).ok()?;
        while t < end {
            let day_ok =
                self.day_matches(t.day() as u32, t.weekday().to_sunday_zero_offset() as u32);
            if !bit(self.months, t.month() as u32) || !day_ok {
                // Skip to the next day's midnight.
                t = t
                    .with()
                    .hour(0)
                    .minute(0)
                    .build()
                    .ok()?
                    .checked_add(1.day())
                    .ok()?;
                continue;
            }
            if !bit(self.hours, t.hour() as u32) {
                t = t
                    .with()
                    .minute(0)
                    .build()
                    .ok()?
                    .checked_add(1.hour())
                    .ok()?;
                continue;
            }
            if bit(self.minutes, t.minute() as u32) {
                return Some(t.timestamp());
            }
            t = t.checked_add(1.minute()).ok()?;
        }
        None
    }

    fn day_matches(&self, day_of_month: u32, day_of_week: u32) -> bool {
        let dom = bit(self.days_of_month, day_of_month);
        let dow = bit(self.days_of_week, day_of_week);
        match (self.dom_restricted, self.dow_restricted) {
            (true, true) => dom || dow,
            (true, false) => dom,
            (false, true) => dow,
            (false, false) => true,
        }
    }
}

fn bit(set: u64, n: u32) -> bool {
    n < 64 && set & (1 << n) != 0
}

/// Month names, from 1.
const MONTHS: [&str; 12] = [
    "JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC",
];
/// Weekday names, from 0 (Sunday).
const WEEKDAYS: [&str; 7] = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"];

/// One field as a bit set over `min..=max`; `names[i]` stands for `min + i`.
fn field(text: &str, min: u32, max: u32, names: &[&str]) -> Result<u64, String> {
    let mut set = 0u64;
    for part in text.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((range, step)) => {
                let step: u32 = step
                    .parse()
                    .map_err(|_| format!("step `{step}` is not a number"))?;
                if step == 0 {
                    return Err("a step of 0".into());
                }
                (range, step)
            }
            None => (part, 1),
        };
        let (low, high) = if range == "*" {
            (min, max)
        } else if let Some((a, b)) = range.split_once('-') {
            (number(a, min, max, names)?, number(b, min, max, names)?)
        } else {
            let n = number(range, min, max, names)?;
            // `5/15` means from 5 to the end, every 15.
            (n, if part.contains('/') { max } else { n })
        };
        if low > high {
            return Err(format!("range {low}-{high} runs backwards"));
        }
        let mut n = low;
        while n <= high {
            set |= 1 << n;
            n += step;
        }
    }
    Ok(set)
}

fn number(text: &str, min: u32, max: u32, names: &[&str]) -> Result<u32, String> {
    let named = names
        .iter()
        .zip(min..)
        .find(|(name, _)| name.eq_ignore_ascii_case(text))
        .map(|(_, n)| n);
    let n: u32 = match named {
        Some(n) => n,
        None => text
            .parse()
            .map_err(|_| format!("`{text}` is not a number"))?,
    };
    if n < min || n > max {
        return Err(format!("{n} is outside {min}-{max}"));
    }
    Ok(n)
}

/// When a Precache's schedule fired last and fires next, and whether it fires now.
#[derive(Debug, Clone, PartialEq)]
pub struct State {
    /// `status.lastScheduleTime` after this pass.
    pub last: Option<Timestamp>,
    /// `status.nextScheduleTime` after this pass (none for a schedule that never fires).
    pub next: Option<Timestamp>,
    /// The schedule fires in this pass.
    pub fired: bool,
    /// Why the expression is unusable (for the `ScheduleValid` condition).
    pub error: Option<String>,
}

/// The schedule decision for one Precache at `now`; `None` without a schedule.
///
/// Slots are counted from the last run, or from creation: a new Precache is cached at once
/// anyway, the schedule is for re-caching. A controller that was down over several slots fires
/// once when it is back, not once per missed slot.
pub fn state(pc: &Precache, now: Timestamp) -> Option<State> {
    let expression = pc.spec.schedule.as_deref()?;
    let previous = pc
        .status
        .as_ref()
        .and_then(|s| s.last_schedule_time.as_ref())
        .map(|t| t.0);
    let schedule = match Schedule::parse(expression) {
        Ok(s) => s,
        Err(e) => {
            return Some(State {
                last: previous,
                next: None,
                fired: false,
                error: Some(e.to_string()),
            });
        }
    };
    let since = previous
        .or_else(|| pc.metadata.creation_timestamp.as_ref().map(|t| t.0))
        .unwrap_or(now);
    let fired = schedule.next_after(since).is_some_and(|due| due <= now);
    Some(State {
        last: if fired { Some(now) } else { previous },
        next: schedule.next_after(if fired { now } else { since }),
        fired,
        error: None,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn next(expr: &str, after: &str) -> Option<String> {
        Schedule::parse(expr)
            .unwrap()
            .next_after(at(after))
            .map(|t| t.to_string())
    }

    #[test]
    fn common_expressions_fire_when_cron_would() {
        assert_eq!(
            next("0 3 * * *", "2026-11-22T12:40:10Z").as_deref(),
            Some("2026-11-23T03:00:00Z")
        );
        assert_eq!(
            next("*/15 * * * *", "2026-11-22T12:40:10Z").as_deref(),
            Some("2026-11-22T12:45:00Z")
        );
        // Strictly after: a schedule due now fires next time, not again.
        assert_eq!(
            next("0 3 * * *", "2026-11-23T03:00:00Z").as_deref(),
            Some("2026-11-24T03:00:00Z")
        );
        // Sunday 23:30, with 7 meaning Sunday too; 2026-11-22 is a Sunday.
        assert_eq!(
            next("30 23 * * 7", "2026-11-22T00:00:00Z").as_deref(),
            Some("2026-11-22T23:30:00Z")
        );
        assert_eq!(
            next("0 0 1 1 *", "2026-11-22T00:00:00Z").as_deref(),
            Some("2027-01-01T00:00:00Z")
        );
        // Both day fields restricted: the 1st of the month OR a Monday.
        assert_eq!(
            next("0 12 1 * 1", "2026-11-22T13:00:00Z").as_deref(),
            Some("2026-11-23T12:00:00Z")
        );
        assert_eq!(
            next("5-10/5,30 8 * * 1-5", "2026-11-23T08:06:00Z").as_deref(),
            Some("2026-11-23T08:10:00Z")
        );
        assert_eq!(
            next("0 0 29 2 *", "2026-03-01T00:00:00Z").as_deref(),
            Some("2028-02-29T00:00:00Z")
        );
    }

    #[test]
    fn names_and_macros_mean_what_cronjob_means() {
        // Weekdays by name; 2026-11-22 is a Sunday, so the next Monday is the 23rd.
        assert_eq!(
            next("0 9 * * mon-fri", "2026-11-22T00:00:00Z").as_deref(),
            Some("2026-11-23T09:00:00Z")
        );
        assert_eq!(
            next("0 0 1 JAN,Jul *", "2026-11-22T00:00:00Z").as_deref(),
            Some("2027-01-01T00:00:00Z")
        );
        assert_eq!(
            next("30 2 * * SUN", "2026-11-23T00:00:00Z"),
            next("30 2 * * 0", "2026-11-23T00:00:00Z")
        );
        for (macro_, plain) in [
            ("@hourly", "0 * * * *"),
            ("@daily", "0 0 * * *"),
            ("@midnight", "0 0 * * *"),
            ("@weekly", "0 0 * * 0"),
            ("@monthly", "0 0 1 * *"),
            ("@yearly", "0 0 1 1 *"),
            ("@annually", "0 0 1 1 *"),
        ] {
            assert_eq!(
                Schedule::parse(macro_).unwrap(),
                Schedule::parse(plain).unwrap(),
                "{macro_}"
            );
        }
    }

    fn scheduled(expr: &str, created: &str) -> Precache {
        let mut pc = crate::precache::plan::tests::precache("p", &["nginx"], None);
        pc.spec.schedule = Some(expr.into());
        pc.metadata.creation_timestamp = Some(Time(at(created)));
        pc
    }

    #[test]
    fn a_schedule_fires_once_per_slot_and_a_bad_one_says_why() {
        let mut pc = scheduled("0 3 * * *", "2026-11-22T01:00:00Z");
        let s = state(&pc, at("2026-11-22T02:59:00Z")).unwrap();
        assert!(!s.fired && s.last.is_none() && s.error.is_none());
        assert_eq!(s.next, Some(at("2026-11-22T03:00:00Z")));
        let after = at("2026-11-22T03:00:30Z");
        let s = state(&pc, after).unwrap();
        assert!(s.fired);
        assert_eq!(s.last, Some(after));
        assert_eq!(s.next, Some(at("2026-11-23T03:00:00Z")));
        // Recorded: the same slot does not fire again, and the next one is still known.
        pc.status = Some(larder_core::crd::PrecacheStatus {
            last_schedule_time: s.last.map(Time),
            ..Default::default()
        });
        let again = state(&pc, at("2026-11-22T12:00:00Z")).unwrap();
        assert!(!again.fired);
        assert_eq!(again.last, Some(after));
        assert_eq!(again.next, Some(at("2026-11-23T03:00:00Z")));
        // Down over three slots: fires once on return.
        let back = at("2026-11-25T12:00:00Z");
        let s = state(&pc, back).unwrap();
        assert!(s.fired);
        assert_eq!(s.next, Some(at("2026-11-26T03:00:00Z")));
        // No schedule: no state; a bad one keeps the last run and says why.
        pc.spec.schedule = None;
        assert_eq!(state(&pc, back), None);
        pc.spec.schedule = Some("every day".into());
        let s = state(&pc, back).unwrap();
        assert!(!s.fired && s.next.is_none());
        assert_eq!(s.last, Some(after));
        assert!(s.error.unwrap().contains("expected 5 fields"));
        // A schedule that never comes neither fires nor has a next time.
        let never = scheduled("0 0 31 2 *", "2026-11-22T01:00:00Z");
        let s = state(&never, back).unwrap();
        assert!(!s.fired && s.next.is_none() && s.error.is_none());
    }

    #[test]
    fn a_date_that_never_comes_is_none_not_a_hang() {
        assert_eq!(next("0 0 31 2 *", "2026-01-01T00:00:00Z"), None);
    }

    #[test]
    fn bad_expressions_say_what_is_wrong() {
        for (expr, says) in [
            ("* * * *", "expected 5 fields"),
            ("60 * * * *", "minute: 60 is outside 0-59"),
            ("* 24 * * *", "hour"),
            ("* * 0 * *", "day of month"),
            ("* * * 13 *", "month"),
            ("* * * * 8", "day of week"),
            ("*/0 * * * *", "a step of 0"),
            ("10-5 * * * *", "runs backwards"),
            ("a * * * *", "`a` is not a number"),
            ("* * * JANUARY *", "month: `JANUARY` is not a number"),
            ("* * * * MON-FOO", "day of week"),
            ("@reboot", "expected 5 fields"),
        ] {
            let err = Schedule::parse(expr).unwrap_err();
            assert!(err.to_string().contains(says), "{expr}: {err}");
            assert_eq!(err.expression, expr);
        }
    }
}
