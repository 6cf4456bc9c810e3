//! Durations as people write them ("30s", "7d") in declarations and flags.
//!
//! Every duration ends up as signed milliseconds next to a Unix timestamp
//! (`now - ttl`, bucket arithmetic, schedule periods). One far beyond any
//! real use, such as `ttl = "1000000000y"`, would wrap when converted and
//! turn a retention into "delete everything", so anything longer than
//! [`LONGEST`] is refused where it is parsed, with the reason.

use std::time::Duration;

/// A century: longer than any retention, bucket or period a fleet needs,
/// and small enough that `now ± LONGEST` in milliseconds never overflows.
pub const LONGEST: Duration = Duration::from_secs(100 * 31_557_600); // humantime's year is 365.25 days

/// Parses a human duration and refuses one longer than [`LONGEST`].
/// The error says what was wrong, not where: callers add the field name.
pub fn parse(text: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if duration > LONGEST {
        return Err(format!(
            "{text:?} is longer than the longest supported duration, 100 years"
        ));
    }
    Ok(duration)
}

/// Milliseconds of a duration from [`parse`]; saturates rather than wraps
/// for a duration that did not come through it.
pub fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_century_is_accepted_and_longer_is_refused() {
        assert_eq!(parse("100y").unwrap(), LONGEST);
        assert_eq!(parse("30d").unwrap(), Duration::from_secs(30 * 86_400));
        let error = parse("1000000000y").unwrap_err();
        assert!(
            error.contains("longer than the longest supported duration"),
            "{error}"
        );
        assert!(parse("101y").is_err());
    }

    #[test]
    fn millis_never_wraps_negative() {
        assert_eq!(millis(Duration::MAX), i64::MAX);
        assert_eq!(millis(LONGEST), 100 * 31_557_600 * 1000);
    }
}
