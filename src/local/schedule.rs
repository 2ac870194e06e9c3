//! NCRONTAB timer schedules, evaluated as the Functions timer extension does.
//!
//! NCRONTAB has six fields `{second} {minute} {hour} {day} {month} {day-of-week}` with day of week
//! 0–6 and 0 = Sunday; the extension also accepts five fields without seconds. `croner`'s default
//! (POSIX) weekday numbering is the same (0 = Sunday, 7 also Sunday). NCrontab matches a day only
//! when both the day-of-month and the day-of-week fields match, so the parser is told to AND them
//! (Vixie cron ORs them when both are restricted).

use chrono::{DateTime, Utc};
use croner::parser::{CronParser, Seconds, Year};
use croner::Cron;

#[derive(Debug, Clone)]
pub struct Schedule {
    expression: String,
    cron: Cron,
}

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("invalid NCRONTAB schedule {expression:?}: {reason}")]
pub struct ScheduleError {
    pub expression: String,
    pub reason: String,
}

impl Schedule {
    pub fn parse(expression: &str) -> Result<Self, ScheduleError> {
        let error = |reason: String| ScheduleError {
            expression: expression.to_string(),
            reason,
        };
        let fields = expression.split_whitespace().count();
        if fields != 5 && fields != 6 {
            return Err(error(format!(
                "expected 6 fields (second minute hour day month day-of-week), found {fields}"
            )));
        }
        let cron = CronParser::builder()
            .seconds(Seconds::Optional)
            .year(Year::Disallowed)
            .dom_and_dow(true)
            .build()
            .parse(expression)
            .map_err(|e| error(e.to_string()))?;
        Ok(Schedule {
            expression: expression.to_string(),
            cron,
        })
    }

    pub fn expression(&self) -> &str {
        &self.expression
    }

    /// The first occurrence strictly after `after`.
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron.find_next_occurrence(&after, false).ok()
    }

    /// The last occurrence strictly before `before`.
    pub fn previous_before(&self, before: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron.find_previous_occurrence(&before, false).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{Datelike, TimeZone, Timelike, Weekday};

    #[test]
    fn weekday_schedule_fires_monday_to_friday_only() {
        let schedule = Schedule::parse("0 30 9 * * 1-5").unwrap();
        // 2026-11-28 is a Saturday.
        let mut at = Utc.with_ymd_and_hms(2026, 11, 28, 0, 0, 0).unwrap();
        let mut seen = Vec::new();
        for _ in 0..5 {
            at = schedule.next_after(at).unwrap();
            assert_eq!((at.hour(), at.minute(), at.second()), (9, 30, 0));
            seen.push(at.weekday());
        }
        assert_eq!(
            seen,
            vec![
                Weekday::Mon,
                Weekday::Tue,
                Weekday::Wed,
                Weekday::Thu,
                Weekday::Fri
            ]
        );
        // The next one after Friday is Monday again.
        let next = schedule.next_after(at).unwrap();
        assert_eq!(next.weekday(), Weekday::Mon);
        assert_eq!(next.day(), 7);
    }

    #[test]
    fn zero_is_sunday_and_seconds_field_is_honoured() {
        let sunday = Schedule::parse("0 0 12 * * 0").unwrap();
        let from = Utc.with_ymd_and_hms(2026, 11, 28, 0, 0, 0).unwrap();
        assert_eq!(sunday.next_after(from).unwrap().weekday(), Weekday::Sun);

        let every_ten_seconds = Schedule::parse("*/10 * * * * *").unwrap();
        let t = Utc.with_ymd_and_hms(2026, 11, 28, 10, 0, 3).unwrap();
        assert_eq!(
            every_ten_seconds.next_after(t).unwrap(),
            Utc.with_ymd_and_hms(2026, 11, 28, 10, 0, 10).unwrap()
        );
        assert_eq!(
            every_ten_seconds.previous_before(t).unwrap(),
            Utc.with_ymd_and_hms(2026, 11, 28, 10, 0, 0).unwrap()
        );
    }

    #[test]
    fn day_of_month_and_day_of_week_must_both_match() {
        // The 13th that is a Friday: 2026-11-13.
        let schedule = Schedule::parse("0 0 0 13 * 5").unwrap();
        let from = Utc.with_ymd_and_hms(2026, 10, 1, 0, 0, 0).unwrap();
        let next = schedule.next_after(from).unwrap();
        assert_eq!((next.month(), next.day()), (11, 13));
        assert_eq!(next.weekday(), Weekday::Fri);
    }

    #[test]
    fn bad_expressions_are_rejected_with_the_expression_named() {
        let err = Schedule::parse("0 30 9 * *  * 2026").unwrap_err();
        assert!(err.to_string().contains("0 30 9 * *  * 2026"));
        assert!(Schedule::parse("0 61 9 * * *").is_err());
        assert!(Schedule::parse("").is_err());
    }
}
