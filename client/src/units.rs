//! Durations and sizes as people write them in flags and job files:
//! `90s`, `15m`, `2h`, `1d`; `512m`, `2g`.

use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("{0:?} is not a duration like 90s, 15m, 2h, 1d")]
    NotADuration(String),
    #[error("{input:?}: unknown unit {unit:?} (ms, s, m, h, d)")]
    DurationUnit { input: String, unit: String },
    #[error("{0:?} is too long")]
    TooLong(String),
    #[error("{0:?} is not a size like 512m or 2g")]
    NotASize(String),
    #[error("{input:?}: unknown unit {unit:?} (k, m, g)")]
    SizeUnit { input: String, unit: String },
    #[error("{0:?} is too large")]
    TooLarge(String),
}

/// `90`, `90s`, `15m`, `2h`, `1d`, `250ms`.
pub fn parse_duration(s: &str) -> Result<Duration, Error> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| Error::NotADuration(s.to_string()))?;
    let per_unit = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        "ms" => return Ok(Duration::from_millis(n)),
        _ => {
            return Err(Error::DurationUnit {
                input: s.to_string(),
                unit: unit.to_string(),
            })
        }
    };
    let secs = n
        .checked_mul(per_unit)
        .ok_or_else(|| Error::TooLong(s.to_string()))?;
    Ok(Duration::from_secs(secs))
}

/// `1048576`, `512k`, `512m`, `2g` (powers of 1024; a trailing `b` and an
/// `i` are allowed: `512MiB`).
pub fn parse_size(s: &str) -> Result<u64, Error> {
    let t = s.trim().to_ascii_lowercase();
    let t = t.strip_suffix('b').unwrap_or(&t);
    let (num, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()));
    let n: u64 = num.parse().map_err(|_| Error::NotASize(s.to_string()))?;
    let mult: u64 = match unit {
        "" => 1,
        "k" | "ki" => 1 << 10,
        "m" | "mi" => 1 << 20,
        "g" | "gi" => 1 << 30,
        _ => {
            return Err(Error::SizeUnit {
                input: s.to_string(),
                unit: unit.to_string(),
            })
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| Error::TooLarge(s.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_sizes() {
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("15m").unwrap(), Duration::from_secs(900));
        assert_eq!(parse_duration("1d").unwrap(), Duration::from_secs(86400));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5y").is_err());
        assert_eq!(
            parse_duration("99999999999999999d").unwrap_err(),
            Error::TooLong("99999999999999999d".into())
        );
        assert_eq!(parse_size("512m").unwrap(), 512 << 20);
        assert_eq!(parse_size("2G").unwrap(), 2 << 30);
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("100").unwrap(), 100);
        assert!(parse_size("lots").is_err());
        assert!(parse_size("99999999999999g").is_err());
    }

    #[test]
    fn messages_say_what_is_expected() {
        assert_eq!(
            parse_duration(" soon ").unwrap_err().to_string(),
            "\"soon\" is not a duration like 90s, 15m, 2h, 1d"
        );
        assert_eq!(
            parse_duration("5y").unwrap_err().to_string(),
            "\"5y\": unknown unit \"y\" (ms, s, m, h, d)"
        );
        assert_eq!(
            parse_size("2t").unwrap_err().to_string(),
            "\"2t\": unknown unit \"t\" (k, m, g)"
        );
    }
}
