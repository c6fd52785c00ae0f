//! CRON triggers: a pipeline is due when its expression has ticked since the last tick it
//! was evaluated for. Remembering the tick (not the wall-clock time of the evaluation)
//! means a restart neither skips a tick nor runs one twice; ticks missed while no
//! trigger-manager ran are caught up with one evaluation.

use chrono::{DateTime, Utc};
use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};

/// Parses a standard 5-field cron expression (minute hour day-of-month month day-of-week).
pub fn parse(expression: &str) -> Result<Cron, String> {
    if expression.split_whitespace().count() != 5 {
        return Err(format!(
            "cron expression {expression:?} must have 5 fields: minute hour day-of-month month day-of-week"
        ));
    }
    let cron = CronParser::builder()
        .seconds(Seconds::Disallowed)
        .year(Year::Disallowed)
        .build()
        .parse(expression)
        .map_err(|e| format!("invalid cron expression {expression:?}: {e}"))?;
    // An expression can parse and still name no real time (`0 0 31 2 *`, 31 February):
    // its pipeline would silently never fire.
    let leap_year = DateTime::<Utc>::from_timestamp(946_684_800, 0).expect("2000-01-01");
    cron.find_next_occurrence(&leap_year, false)
        .map_err(|_| format!("cron expression {expression:?} never fires"))?;
    Ok(cron)
}

/// The tick to evaluate now, if any: the latest tick at or before `now`, when it is newer
/// than `last_tick`. A pipeline never evaluated before is due at its latest tick.
pub fn due_tick(
    cron: &Cron,
    last_tick: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    let latest = cron.find_previous_occurrence(&now, true).ok()?;
    match last_tick {
        Some(last) if latest <= last => None,
        _ => Some(latest),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn t(h: u32, m: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 28, h, m, 0).unwrap()
    }

    #[test]
    fn ticks_are_neither_skipped_nor_doubled() {
        let daily = parse("0 3 * * *").unwrap();
        // First sight: due for the latest tick.
        let first = due_tick(&daily, None, t(4, 0)).unwrap();
        assert_eq!(first, t(3, 0));
        // Same tick after a restart: not due again.
        assert_eq!(due_tick(&daily, Some(first), t(5, 0)), None);
        // Exactly at the tick: due.
        let yesterday = t(3, 0) - chrono::Duration::days(1);
        assert_eq!(due_tick(&daily, Some(yesterday), t(3, 0)), Some(t(3, 0)));
        // Several missed ticks: one evaluation, for the newest.
        let every_10 = parse("*/10 * * * *").unwrap();
        assert_eq!(due_tick(&every_10, Some(t(1, 0)), t(2, 5)), Some(t(2, 0)));
    }

    #[test]
    fn bad_expressions_are_explained() {
        assert!(parse("0 3 * *").unwrap_err().contains("5 fields"));
        assert!(parse("0 0 3 * * *").unwrap_err().contains("5 fields"));
        assert!(parse("61 3 * * *").unwrap_err().contains("invalid cron"));
        assert!(parse("a b c d e").is_err());
        assert!(parse("0 0 31 2 *").unwrap_err().contains("never fires"));
        assert!(parse("0 0 30 2 *").unwrap_err().contains("never fires"));
        // 29 February does come.
        assert!(parse("0 0 29 2 *").is_ok());
    }
}
