//! Instants as the audit and projection commands read and print them.
//!
//! WHY here and not humantime: a stored time is any i64 of milliseconds (a commit's
//! occurred-at is whatever its writer put there), and humantime's formatter
//! panics past the year 9999. An auditor's tool must print every stored value, so a time
//! RFC 3339 cannot express is printed as plain milliseconds instead. And humantime's "weak"
//! parser read a time without an offset as UTC, refused `+08:00`, and dropped the offset of a
//! time with a fraction: an audit of "November in Sanming" silently shifted by eight hours.
//! So `--since`, `--until` and `--time` take RFC 3339 with its offset, and a time without one
//! is refused rather than guessed.

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use time::macros::format_description;

/// The example every message about a time option shows.
const EXAMPLES: &str = "2026-11-01T00:00:00+08:00 or 2026-10-31T16:00:00Z";

/// Reads a time option (`--since`, `--until`, `--time`): RFC 3339 with a UTC offset (`Z`,
/// `+08:00`, ...), e.g. `2026-11-01T00:00:00+08:00`; returns UTC milliseconds since 1970
/// (a fraction below a millisecond is dropped). A clap value parser, so a bad time is refused
/// before anything connects.
pub fn parse_instant(text: &str) -> Result<i64, String> {
    let text = text.trim();
    let time = match OffsetDateTime::parse(text, &Rfc3339) {
        Ok(time) => time,
        // Tell "no offset" apart from "not a time": the fix is different.
        Err(_) if OffsetDateTime::parse(&format!("{text}Z"), &Rfc3339).is_ok() => {
            return Err(format!(
                "{text:?} has no UTC offset: add Z for UTC ({text}Z) or the local offset \
                 ({text}+08:00 in China)"
            ));
        }
        Err(error) => {
            return Err(format!(
                "{text:?} is not an RFC 3339 time with a UTC offset ({error}); e.g. {EXAMPLES}"
            ));
        }
    };
    // RFC 3339 years end at 9999, far inside i64 milliseconds.
    let ms = i64::try_from(time.unix_timestamp_nanos().div_euclid(1_000_000))
        .map_err(|_| format!("{text:?} is out of range"))?;
    if ms < 0 {
        return Err(format!(
            "{text:?} is before 1970 ({}), when nothing was stored",
            format_ms(ms)
        ));
    }
    Ok(ms)
}

/// `ms` (UTC milliseconds since 1970) as RFC 3339 with milliseconds, e.g.
/// `2026-11-22T10:03:12.007Z`; `"<ms> ms since 1970"` when the year is outside RFC 3339's
/// 0000..=9999.
pub fn format_ms(ms: i64) -> String {
    let format =
        format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .filter(|time| (0..=9999).contains(&time.year()))
        .and_then(|time| time.format(format).ok())
        .unwrap_or_else(|| format!("{ms} ms since 1970"))
}

/// `utc_offset_ms` as `+08:00` / `-05:30`.
pub fn format_offset(utc_offset_ms: i64) -> String {
    let minutes = utc_offset_ms.unsigned_abs() / 60_000;
    format!(
        "{}{:02}:{:02}",
        if utc_offset_ms < 0 { '-' } else { '+' },
        minutes / 60,
        minutes % 60
    )
}

/// `ms` at `utc_offset_ms` from UTC, RFC 3339 with milliseconds and the offset, e.g.
/// `2026-11-22T18:03:12.007+08:00`; UTC (`format_ms`) at offset 0, or when the offset is not
/// a whole number of seconds within a day, or the local year is outside 0000..=9999.
pub fn format_at(ms: i64, utc_offset_ms: i64) -> String {
    if utc_offset_ms == 0 {
        return format_ms(ms);
    }
    let format = format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3][offset_hour sign:mandatory]:[offset_minute]"
    );
    i32::try_from(utc_offset_ms / 1000)
        .ok()
        .and_then(|seconds| time::UtcOffset::from_whole_seconds(seconds).ok())
        .and_then(|offset| {
            OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
                .ok()
                .and_then(|utc| utc.checked_to_offset(offset))
        })
        .filter(|time| (0..=9999).contains(&time.year()))
        .and_then(|time| time.format(format).ok())
        .unwrap_or_else(|| format_ms(ms))
}

#[cfg(test)]
mod tests {
    use super::*;
    use expect_test::{Expect, expect};

    /// Formats each number in `ms`, or parses each text in `texts` and shows the UTC instant
    /// it names or why it is refused.
    fn check(ms: &[i64], texts: &[&str], expected: Expect) {
        let formatted = ms.iter().map(|ms| format!("{ms}: {}", format_ms(*ms)));
        let parsed = texts.iter().map(|text| match parse_instant(text) {
            Ok(ms) => format!("{text} -> {ms} = {}", format_ms(ms)),
            Err(error) => format!("{text} -> refused: {error}"),
        });
        let lines: Vec<String> = formatted.chain(parsed).collect();
        expected.assert_eq(&lines.join("\n"));
    }

    #[test]
    fn stored_times_print_in_utc_or_as_milliseconds() {
        check(
            &[
                1_795_341_792_007,
                0,
                -1,
                // The last millisecond of 9999, the first of 10000 (humantime panicked here).
                253_402_300_799_999,
                253_402_300_800_000,
                i64::MAX,
                i64::MIN,
            ],
            &[],
            expect![[r#"
                1795341792007: 2026-11-22T10:03:12.007Z
                0: 1970-01-01T00:00:00.000Z
                -1: 1969-12-31T23:59:59.999Z
                253402300799999: 9999-12-31T23:59:59.999Z
                253402300800000: 253402300800000 ms since 1970
                9223372036854775807: 9223372036854775807 ms since 1970
                -9223372036854775808: -9223372036854775808 ms since 1970"#]],
        );
    }

    #[test]
    fn stored_times_print_at_the_city_offset() {
        let eight_hours_ms = 8 * 3_600_000;
        assert_eq!(format_offset(eight_hours_ms), "+08:00");
        assert_eq!(format_offset(-(5 * 3_600_000 + 30 * 60_000)), "-05:30");
        let lines: Vec<String> = [
            (1_795_341_792_007, eight_hours_ms),
            (1_795_341_792_007, -(5 * 3_600_000 + 30 * 60_000)),
            (1_795_341_792_007, 0),
            // Local 10000-01-01: UTC instead.
            (253_402_300_799_999, eight_hours_ms),
            // Not a real offset: UTC instead.
            (0, 30 * 3_600_000),
        ]
        .iter()
        .map(|(ms, offset)| format!("{ms} at {offset}: {}", format_at(*ms, *offset)))
        .collect();
        expect![[r#"
            1795341792007 at 28800000: 2026-11-22T18:03:12.007+08:00
            1795341792007 at -19800000: 2026-11-22T04:33:12.007-05:30
            1795341792007 at 0: 2026-11-22T10:03:12.007Z
            253402300799999 at 28800000: 9999-12-31T23:59:59.999Z
            0 at 108000000: 1970-01-01T00:00:00.000Z"#]]
        .assert_eq(&lines.join("\n"));
    }

    #[test]
    fn time_options_honour_their_offset_and_refuse_none() {
        check(
            &[],
            &[
                "2026-11-22T10:03:12Z",
                "2026-11-01T00:00:00+08:00",
                // humantime dropped the offset when a fraction came with it.
                "2026-11-01T00:00:00.5+08:00",
                "2026-11-01T00:00:00.123456789-05:30",
                "2026-11-01 00:00:00z",
                // humantime read these as UTC.
                "2026-11-01T00:00:00",
                "2026-11-01T00:00:00.5",
                "yesterday",
                "2026-11-01",
                "1969-12-31T23:59:59Z",
            ],
            expect![[r#"
                2026-11-22T10:03:12Z -> 1795341792000 = 2026-11-22T10:03:12.000Z
                2026-11-01T00:00:00+08:00 -> 1793462400000 = 2026-10-31T16:00:00.000Z
                2026-11-01T00:00:00.5+08:00 -> 1793462400500 = 2026-10-31T16:00:00.500Z
                2026-11-01T00:00:00.123456789-05:30 -> 1793511000123 = 2026-11-01T05:30:00.123Z
                2026-11-01 00:00:00z -> 1793491200000 = 2026-11-01T00:00:00.000Z
                2026-11-01T00:00:00 -> refused: "2026-11-01T00:00:00" has no UTC offset: add Z for UTC (2026-11-01T00:00:00Z) or the local offset (2026-11-01T00:00:00+08:00 in China)
                2026-11-01T00:00:00.5 -> refused: "2026-11-01T00:00:00.5" has no UTC offset: add Z for UTC (2026-11-01T00:00:00.5Z) or the local offset (2026-11-01T00:00:00.5+08:00 in China)
                yesterday -> refused: "yesterday" is not an RFC 3339 time with a UTC offset (the 'year' component could not be parsed); e.g. 2026-11-01T00:00:00+08:00 or 2026-10-31T16:00:00Z
                2026-11-01 -> refused: "2026-11-01" is not an RFC 3339 time with a UTC offset (the 'separator' component could not be parsed); e.g. 2026-11-01T00:00:00+08:00 or 2026-10-31T16:00:00Z
                1969-12-31T23:59:59Z -> refused: "1969-12-31T23:59:59Z" is before 1970 (1969-12-31T23:59:59.000Z), when nothing was stored"#]],
        );
    }
}
