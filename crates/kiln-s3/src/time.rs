//! The two time formats S3 answers with: ISO 8601 in listings, HTTP dates in headers.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Parses `2026-12-06T12:15:05.123Z` (the `LastModified` of listings); `None` otherwise.
pub(crate) fn parse_iso8601(s: &str) -> Option<SystemTime> {
    let s = s.trim().strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.splitn(3, '-');
    let year: i64 = d.next()?.parse().ok()?;
    let month: u32 = d.next()?.parse().ok()?;
    let day: u32 = d.next()?.parse().ok()?;
    let (hms, frac) = time.split_once('.').unwrap_or((time, ""));
    let mut t = hms.splitn(3, ':');
    let h: u64 = t.next()?.parse().ok()?;
    let m: u64 = t.next()?.parse().ok()?;
    let sec: u64 = t.next()?.parse().ok()?;
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || h > 23 || m > 59 || sec > 60 {
        return None;
    }
    let nanos = if frac.is_empty() {
        0
    } else {
        let digits: String = frac.chars().take(9).collect();
        let n: u32 = digits.parse().ok()?;
        n * 10u32.pow(9 - digits.len() as u32)
    };
    let days = days_from_civil(year, month, day);
    let secs = days.checked_mul(86_400)? + (h * 3600 + m * 60 + sec) as i64;
    let secs = u64::try_from(secs).ok()?;
    Some(UNIX_EPOCH + Duration::new(secs, nanos))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Parses an HTTP date (`Sun, 06 Dec 2026 12:15:05 GMT`, the `Last-Modified` header).
pub(crate) fn parse_http_date(s: &str) -> Option<SystemTime> {
    httpdate::parse_http_date(s.trim()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listing_times_match_http_dates() {
        let a = parse_iso8601("2026-12-06T12:15:05.250Z").unwrap();
        let b = parse_http_date("Sun, 06 Dec 2026 12:15:05 GMT").unwrap();
        assert_eq!(a.duration_since(b).unwrap(), Duration::from_millis(250));
        assert_eq!(parse_iso8601("1970-01-01T00:00:00Z"), Some(UNIX_EPOCH));
        assert_eq!(
            parse_iso8601("2000-03-01T00:00:00Z"),
            parse_http_date("Wed, 01 Mar 2000 00:00:00 GMT")
        );
        for bad in ["", "2026-13-01T00:00:00Z", "2026-12-06 12:15:05", "x"] {
            assert_eq!(parse_iso8601(bad), None, "{bad}");
        }
    }
}
