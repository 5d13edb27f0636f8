//! The business calendar: working hours, weekends, public holidays and make-up working days
//! (调休), so that "resolve within 2 working days" means the same thing after any restart.
//!
//! Pure arithmetic on a given [`Timestamp`]; no clock. The `time` crate is used only to parse
//! the calendar file's dates. Working segments are half-open in time but a deadline produced
//! by [`BusinessCalendar::add_working_minutes`] with `minutes > 0` lands in `(start, end]` of
//! some working segment: a case due "at the end of the morning" is due at 12:00, not 13:30.

use std::collections::BTreeSet;

use serde::Deserialize;

use crate::ids::{MINUTE_MS, Timestamp};

/// Milliseconds in a day.
const DAY_MS: i64 = 86_400_000;
/// How far ahead `add_working_minutes` looks before giving up (a bound on the loop; a valid
/// calendar always has working time within a few weeks).
pub const LOOKAHEAD_DAYS_MAX: i64 = 3_660;
/// Timestamps (Unix milliseconds) the working calendar counts in: 1900-01-01 to 9999-12-31
/// UTC. Outside it [`Calendar::add_working_minutes`] counts wall-clock time.
pub const WORKING_TIME_FROM_MS: i64 = -2_208_988_800_000;
pub const WORKING_TIME_UNTIL_MS: i64 = 253_402_300_799_000;
/// Most holidays plus make-up days one calendar file may list.
pub const CALENDAR_DATES_MAX: usize = 2_000;
/// Most working segments per day.
pub const SEGMENTS_PER_DAY_MAX: usize = 8;

/// How a limit is counted.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Clock {
    /// Only minutes inside working hours on working days count.
    Working,
    /// Every minute counts (emergencies).
    Wall,
}

/// A validated business calendar for one city.
#[derive(Clone, Debug)]
pub struct BusinessCalendar {
    utc_offset_ms: i64,
    /// Working segments as (start, end) milliseconds after local midnight, sorted, disjoint.
    segments: Vec<(i64, i64)>,
    /// Weekend days, 0 = Monday .. 6 = Sunday.
    weekend: [bool; 7],
    /// Local day numbers (days since 1970-01-01 local) that are holidays.
    holidays: BTreeSet<i64>,
    /// Local day numbers that are make-up working days (调休上班).
    makeup_workdays: BTreeSet<i64>,
}

/// Why a calendar file was refused.
#[derive(Debug, thiserror::Error)]
pub enum CalendarError {
    #[error("calendar file is not valid TOML for the expected shape: {0}")]
    Parse(#[from] toml::de::Error),
    #[error("utc_offset {0:?} must look like +08:00 or -05:30")]
    Offset(String),
    #[error("working-hours segment {0:?} must look like \"09:00-12:00\" with start < end")]
    Segment(String),
    #[error("working-hours segments overlap or are not in order: {0:?}")]
    SegmentsOverlap(Vec<String>),
    #[error("between 1 and {SEGMENTS_PER_DAY_MAX} working-hours segments are required")]
    SegmentCount,
    #[error("weekday {0:?} is not one of mon, tue, wed, thu, fri, sat, sun")]
    Weekday(String),
    #[error("every day of the week is a weekend day")]
    NoWorkingDay,
    #[error("date {0:?} must look like 2026-10-01")]
    Date(String),
    #[error("date {0} is listed both as a holiday and as a make-up working day")]
    Conflict(String),
    #[error("the calendar lists {0} dates, more than CALENDAR_DATES_MAX = {CALENDAR_DATES_MAX}")]
    TooManyDates(usize),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    utc_offset: String,
    working_hours: Vec<String>,
    weekend: Vec<String>,
    #[serde(default)]
    holidays: Vec<String>,
    #[serde(default)]
    makeup_workdays: Vec<String>,
}

fn parse_hhmm(s: &str) -> Option<i64> {
    let (h, m) = s.trim().split_once(':')?;
    let (h, m) = (h.parse::<i64>().ok()?, m.parse::<i64>().ok()?);
    ((0..=24).contains(&h) && (0..60).contains(&m) && h * 60 + m <= 24 * 60)
        .then_some((h * 60 + m) * MINUTE_MS)
}

fn parse_day(s: &str) -> Result<i64, CalendarError> {
    let format = time::macros::format_description!("[year]-[month]-[day]");
    let date =
        time::Date::parse(s.trim(), format).map_err(|_| CalendarError::Date(s.to_owned()))?;
    Ok(i64::from(date.to_julian_day()) - i64::from(UNIX_EPOCH_JULIAN_DAY))
}

/// Julian day number of 1970-01-01.
const UNIX_EPOCH_JULIAN_DAY: i32 = 2_440_588;

impl BusinessCalendar {
    /// Parses and validates a calendar file's text.
    pub fn parse(text: &str) -> Result<BusinessCalendar, CalendarError> {
        let file: File = toml::from_str(text)?;
        let offset = file.utc_offset.trim();
        let sign = match offset.as_bytes().first() {
            Some(b'+') => 1,
            Some(b'-') => -1,
            _ => return Err(CalendarError::Offset(file.utc_offset.clone())),
        };
        let offset_ms = parse_hhmm(&offset[1..])
            .filter(|ms| *ms <= 14 * 60 * MINUTE_MS)
            .ok_or_else(|| CalendarError::Offset(file.utc_offset.clone()))?;
        if file.working_hours.is_empty() || file.working_hours.len() > SEGMENTS_PER_DAY_MAX {
            return Err(CalendarError::SegmentCount);
        }
        let mut segments = Vec::new();
        for s in &file.working_hours {
            let (a, b) = s
                .split_once('-')
                .ok_or_else(|| CalendarError::Segment(s.clone()))?;
            let (a, b) = (parse_hhmm(a), parse_hhmm(b));
            match (a, b) {
                (Some(a), Some(b)) if a < b => segments.push((a, b)),
                _ => return Err(CalendarError::Segment(s.clone())),
            }
        }
        if segments.windows(2).any(|w| w[0].1 > w[1].0) {
            return Err(CalendarError::SegmentsOverlap(file.working_hours.clone()));
        }
        let mut weekend = [false; 7];
        for d in &file.weekend {
            let i = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
                .iter()
                .position(|w| w.eq_ignore_ascii_case(d.trim()))
                .ok_or_else(|| CalendarError::Weekday(d.clone()))?;
            weekend[i] = true;
        }
        if weekend.iter().all(|w| *w) {
            return Err(CalendarError::NoWorkingDay);
        }
        let dates = file.holidays.len() + file.makeup_workdays.len();
        if dates > CALENDAR_DATES_MAX {
            return Err(CalendarError::TooManyDates(dates));
        }
        let holidays = file
            .holidays
            .iter()
            .map(|s| parse_day(s))
            .collect::<Result<BTreeSet<_>, _>>()?;
        let mut makeup_workdays = BTreeSet::new();
        for s in &file.makeup_workdays {
            let day = parse_day(s)?;
            if holidays.contains(&day) {
                return Err(CalendarError::Conflict(s.clone()));
            }
            makeup_workdays.insert(day);
        }
        Ok(BusinessCalendar {
            utc_offset_ms: sign * offset_ms,
            segments,
            weekend,
            holidays,
            makeup_workdays,
        })
    }

    /// The city's offset from UTC, in milliseconds (`utc_offset` of the calendar file).
    pub fn utc_offset_ms(&self) -> i64 {
        self.utc_offset_ms
    }

    /// The last year the calendar lists a holiday or make-up working day for (`None`: it
    /// lists none). After that year the calendar knows only weekends: each year's holidays
    /// come from that year's State Council notice, so a city must add them to its file.
    pub fn listed_through_year(&self) -> Option<i32> {
        let last = self
            .holidays
            .last()
            .into_iter()
            .chain(self.makeup_workdays.last())
            .max()?;
        let julian = i32::try_from(last + i64::from(UNIX_EPOCH_JULIAN_DAY)).ok()?;
        time::Date::from_julian_day(julian)
            .ok()
            .map(|date| date.year())
    }

    /// Whether the local day `day` (days since 1970-01-01, local) is a working day.
    fn is_working_day(&self, day: i64) -> bool {
        if self.makeup_workdays.contains(&day) {
            return true;
        }
        if self.holidays.contains(&day) {
            return false;
        }
        // 1970-01-01 was a Thursday (index 3 with Monday = 0).
        let weekday = (day + 3).rem_euclid(7) as usize;
        !self.weekend[weekday]
    }

    /// Whether `t` lies inside working time (segment start inclusive, end inclusive).
    pub fn is_working_time(&self, t: Timestamp) -> bool {
        let local = t.0.saturating_add(self.utc_offset_ms);
        let (day, ms) = (local.div_euclid(DAY_MS), local.rem_euclid(DAY_MS));
        self.is_working_day(day) && self.segments.iter().any(|(s, e)| (*s..=*e).contains(&ms))
    }

    /// `start` plus `minutes` of working time. With `minutes == 0` the result is `start` if it
    /// is inside working time, else the start of the next working segment. Saturates at
    /// [`LOOKAHEAD_DAYS_MAX`] days after `start` (unreachable for a validated calendar).
    pub fn add_working_minutes(&self, start: Timestamp, minutes: u32) -> Timestamp {
        // Day arithmetic below multiplies and adds whole days of milliseconds: far from any
        // real date (a corrupt or saturated timestamp) it would overflow. There the working
        // calendar means nothing either; count wall-clock time, which saturates.
        if !(WORKING_TIME_FROM_MS..=WORKING_TIME_UNTIL_MS).contains(&start.0) {
            return start.plus_minutes(minutes);
        }
        let mut remaining = i64::from(minutes) * MINUTE_MS;
        let local_start = start.0.saturating_add(self.utc_offset_ms);
        let first_day = local_start.div_euclid(DAY_MS);
        for day in first_day..first_day + LOOKAHEAD_DAYS_MAX {
            if !self.is_working_day(day) {
                continue;
            }
            let midnight = day * DAY_MS;
            for (s, e) in &self.segments {
                let (seg_start, seg_end) = (midnight + s, midnight + e);
                if remaining == 0 {
                    if seg_end >= local_start {
                        return Timestamp(seg_start.max(local_start) - self.utc_offset_ms);
                    }
                    continue;
                }
                if seg_end <= local_start {
                    continue;
                }
                let cursor = seg_start.max(local_start);
                let available = seg_end - cursor;
                if remaining <= available {
                    return Timestamp(cursor + remaining - self.utc_offset_ms);
                }
                remaining -= available;
            }
        }
        Timestamp(local_start + LOOKAHEAD_DAYS_MAX * DAY_MS - self.utc_offset_ms)
    }

    /// `start` plus `minutes` of wall-clock time.
    pub fn add_wall_minutes(&self, start: Timestamp, minutes: u32) -> Timestamp {
        start.plus_minutes(minutes)
    }

    /// `start` plus `minutes` counted on `clock`.
    pub fn add(&self, start: Timestamp, minutes: u32, clock: Clock) -> Timestamp {
        match clock {
            Clock::Working => self.add_working_minutes(start, minutes),
            Clock::Wall => self.add_wall_minutes(start, minutes),
        }
    }

    /// Working minutes per ordinary working day (for reports and sanity checks).
    pub fn working_minutes_per_day(&self) -> i64 {
        self.segments.iter().map(|(s, e)| (e - s) / MINUTE_MS).sum()
    }
}

#[cfg(test)]
mod tests {
    use expect_test::{Expect, expect};
    use proptest::prelude::*;

    use super::*;

    fn sanming() -> BusinessCalendar {
        BusinessCalendar::parse(
            crate::policy::city_file("sanming", crate::policy::CityFile::Calendar).unwrap(),
        )
        .unwrap()
    }

    /// Parses a local (UTC+8) `YYYY-MM-DD HH:MM` into a timestamp.
    fn at(s: &str) -> Timestamp {
        let (d, hm) = s.split_once(' ').unwrap();
        let day = parse_day(d).unwrap();
        Timestamp(day * DAY_MS + parse_hhmm(hm).unwrap() - 8 * 60 * MINUTE_MS)
    }

    fn local(t: Timestamp) -> String {
        let t = time::OffsetDateTime::from_unix_timestamp(t.0.div_euclid(1000))
            .unwrap()
            .to_offset(time::macros::offset!(+8));
        format!(
            "{} {:?} {:02}:{:02}",
            t.date(),
            t.weekday(),
            t.hour(),
            t.minute()
        )
    }

    fn check(start: &str, minutes: u32, expect: Expect) {
        let c = sanming();
        expect.assert_eq(&local(c.add_working_minutes(at(start), minutes)));
    }

    #[test]
    fn timestamps_far_from_any_date_count_wall_time_without_overflow() {
        let c = sanming();
        for start in [
            i64::MIN,
            i64::MIN + 1,
            -9_000_000_000_000_000,
            9_000_000_000_000_000,
            i64::MAX,
        ] {
            let due = c.add_working_minutes(Timestamp(start), 840);
            assert_eq!(due, Timestamp(start).plus_minutes(840), "{start}");
        }
        let last = Timestamp(WORKING_TIME_UNTIL_MS);
        assert!(c.add_working_minutes(last, 840) > last);
    }

    #[test]
    fn working_minutes() {
        // Inside the morning segment.
        check("2026-03-10 09:30", 60, expect!["2026-03-10 Tuesday 10:30"]);
        // Exactly to the end of the morning: due at 12:00, not 13:30.
        check("2026-03-10 09:00", 180, expect!["2026-03-10 Tuesday 12:00"]);
        // Across lunch.
        check("2026-03-10 11:30", 60, expect!["2026-03-10 Tuesday 14:00"]);
        // Reported at night: the clock starts next morning.
        check(
            "2026-03-10 22:00",
            30,
            expect!["2026-03-11 Wednesday 09:30"],
        );
        // Friday evening to Monday.
        check("2026-03-13 17:00", 60, expect!["2026-03-16 Monday 09:30"]);
        // Zero minutes outside working time moves to the next working start.
        check("2026-03-14 10:00", 0, expect!["2026-03-16 Monday 09:00"]);
        check("2026-03-16 10:00", 0, expect!["2026-03-16 Monday 10:00"]);
        // National Day 2026 (Oct 1-7 off), 10 Oct (Saturday) is a make-up working day.
        check("2026-09-30 17:00", 60, expect!["2026-10-08 Thursday 09:30"]);
        check("2026-10-09 17:00", 60, expect!["2026-10-10 Saturday 09:30"]);
        // Spring Festival 2026: 15-23 Feb off, Saturday 14 Feb worked.
        check(
            "2026-02-13 17:00",
            420,
            expect!["2026-02-14 Saturday 17:00"],
        );
        check("2026-02-14 17:00", 60, expect!["2026-02-24 Tuesday 09:30"]);
    }

    #[test]
    fn a_calendar_says_the_last_year_it_lists_holidays_for() {
        assert_eq!(sanming().listed_through_year(), Some(2027));
        let weekends_only = BusinessCalendar::parse(
            "utc_offset = \"+08:00\"\nworking_hours = [\"09:00-17:00\"]\nweekend = [\"sat\", \"sun\"]",
        )
        .unwrap();
        assert_eq!(weekends_only.listed_through_year(), None);
    }

    #[test]
    fn calendar_validation() {
        let base = "utc_offset = \"+08:00\"\nweekend = [\"sat\", \"sun\"]\n";
        let check = |extra: &str, expect: Expect| {
            let r = BusinessCalendar::parse(&format!("{base}{extra}"));
            expect.assert_eq(&match r {
                Ok(c) => format!("ok: {} working minutes a day", c.working_minutes_per_day()),
                Err(e) => format!("error: {e}"),
            });
        };
        check(
            "working_hours = [\"09:00-12:00\", \"13:30-17:30\"]",
            expect!["ok: 420 working minutes a day"],
        );
        check(
            "working_hours = [\"12:00-09:00\"]",
            expect![[
                r#"error: working-hours segment "12:00-09:00" must look like "09:00-12:00" with start < end"#
            ]],
        );
        check(
            "working_hours = [\"09:00-12:00\", \"11:00-17:30\"]",
            expect![[
                r#"error: working-hours segments overlap or are not in order: ["09:00-12:00", "11:00-17:30"]"#
            ]],
        );
        check(
            "working_hours = []",
            expect!["error: between 1 and 8 working-hours segments are required"],
        );
        check(
            "working_hours = [\"09:00-12:00\"]\nholidays = [\"2026-10-01\"]\nmakeup_workdays = [\"2026-10-01\"]",
            expect![
                "error: date 2026-10-01 is listed both as a holiday and as a make-up working day"
            ],
        );
        check(
            "working_hours = [\"09:00-12:00\"]\nholidays = [\"2026-13-01\"]",
            expect![[r#"error: date "2026-13-01" must look like 2026-10-01"#]],
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, .. ProptestConfig::default() })]

        /// Deadlines land inside working time, never before the start, and are monotone both
        /// in the start and in the number of minutes.
        #[test]
        fn deadlines_land_in_working_time_and_are_monotone(
            start in 1_767_196_800_000i64..1_830_268_800_000i64, // 2026-01-01 .. 2028-01-01
            delta in 0i64..(5 * DAY_MS),
            minutes in 1u32..20_000,
            more in 0u32..5_000,
        ) {
            let c = sanming();
            let a = c.add_working_minutes(Timestamp(start), minutes);
            prop_assert!(c.is_working_time(a), "{} + {minutes} = {} is outside working time", local(Timestamp(start)), local(a));
            prop_assert!(a > Timestamp(start));
            let b = c.add_working_minutes(Timestamp(start + delta), minutes);
            prop_assert!(b >= a);
            let longer = c.add_working_minutes(Timestamp(start), minutes + more);
            prop_assert!(longer >= a);
            let zero = c.add_working_minutes(Timestamp(start), 0);
            prop_assert!(c.is_working_time(zero) && zero >= Timestamp(start) && zero <= a);
        }
    }
}
