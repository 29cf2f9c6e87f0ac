//! SUBMIT_JOB_SCHED's cron-like fields, resolved to the next matching minute (UTC).

/// minute, hour, day of month, month, day of week; `None` matches any value.
pub type CronFields = [Option<u32>; 5];

const RANGES: [(u32, u32); 5] = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 6)];

/// Parses the five fields; an empty field matches anything.
pub fn parse_cron_fields(fields: &[&[u8]]) -> Option<CronFields> {
    let mut out = [None; 5];
    for (i, raw) in fields.iter().enumerate().take(5) {
        let text = std::str::from_utf8(raw).ok()?.trim();
        if text.is_empty() || text == "*" {
            continue;
        }
        let v: u32 = text.parse().ok()?;
        let (lo, hi) = RANGES[i];
        if v < lo || v > hi {
            return None;
        }
        out[i] = Some(v);
    }
    Some(out)
}

/// The first whole minute strictly after `now` (ms since the epoch) that matches, within about
/// four years; `None` if nothing does (e.g. 31 February).
pub fn next_cron_match(fields: &CronFields, now: u64) -> Option<u64> {
    let mut minute = now / 60_000 + 1;
    let limit = minute + 4 * 366 * 24 * 60;
    while minute < limit {
        let days = (minute / 1440) as i64;
        let (_, month, day) = civil_from_days(days);
        let weekday = ((days + 4).rem_euclid(7)) as u32; // 1970-01-01 was a Thursday
        let day_ok = fields[2].is_none_or(|d| d == day)
            && fields[3].is_none_or(|m| m == month)
            && fields[4].is_none_or(|w| w == weekday);
        if !day_ok {
            minute = (minute / 1440 + 1) * 1440;
            continue;
        }
        let hour = ((minute % 1440) / 60) as u32;
        if fields[1].is_some_and(|h| h != hour) {
            minute = (minute / 60 + 1) * 60;
            continue;
        }
        let min = (minute % 60) as u32;
        if fields[0].is_none_or(|m| m == min) {
            return minute.checked_mul(60_000);
        }
        minute += 1;
    }
    None
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
    }

    #[test]
    fn next_match() {
        // 2024-01-01 00:00:30 UTC, a Monday.
        let now = 19_723 * 86_400_000 + 30_000;
        let any = [None; 5];
        assert_eq!(
            next_cron_match(&any, now),
            Some(19_723 * 86_400_000 + 60_000)
        );
        let at_1230 = [Some(30), Some(12), None, None, None];
        assert_eq!(
            next_cron_match(&at_1230, now),
            Some(19_723 * 86_400_000 + (12 * 60 + 30) * 60_000)
        );
        let tuesday = [Some(0), Some(0), None, None, Some(2)];
        assert_eq!(next_cron_match(&tuesday, now), Some(19_724 * 86_400_000));
        let feb31 = [None, None, Some(31), Some(2), None];
        assert_eq!(next_cron_match(&feb31, now), None);
        assert!(parse_cron_fields(&[b"61", b"", b"", b"", b""]).is_none());
    }
}
