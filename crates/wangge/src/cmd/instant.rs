//! Instants as the audit and projection commands print them.
//!
//! WHY here and not humantime: a stored time is any i64 of milliseconds (a commit's
//! `Wangge-Occurred-At` header is whatever its writer put there), and humantime's formatter
//! panics past the year 9999. An auditor's tool must print every stored value, so a time
//! RFC 3339 cannot express is printed as plain milliseconds instead.

use time::OffsetDateTime;
use time::macros::format_description;

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

#[cfg(test)]
mod tests {
    use super::*;
    use expect_test::{Expect, expect};

    fn check(ms: &[i64], expected: Expect) {
        let lines: Vec<String> = ms
            .iter()
            .map(|ms| format!("{ms}: {}", format_ms(*ms)))
            .collect();
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
}
