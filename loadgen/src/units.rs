//! Parsing and printing of the quantities on the command line and in reports: durations
//! (`500ms`, `5s`, `1m`) and counts with thousands separators.

use std::time::Duration;

/// Longest duration any flag accepts: a day.
const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);

/// Parses a duration written as a number and a unit: `250us`, `500ms`, `5s`, `1.5s`, `1m`.
///
/// A unit is required (a bare `5` is refused rather than guessed), and the value must be at
/// most a day.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    if number.is_empty() {
        return Err(format!(
            "invalid duration {text:?}: expected a number and a unit, e.g. 500ms, 5s or 1m"
        ));
    }
    let value: f64 = number
        .parse()
        .map_err(|_| format!("invalid duration {text:?}: {number:?} is not a number"))?;
    let seconds_per_unit = match unit.trim() {
        "us" | "µs" => 1e-6,
        "ms" => 1e-3,
        "s" => 1.0,
        "m" | "min" => 60.0,
        "" => {
            return Err(format!(
                "invalid duration {text:?}: add a unit (us, ms, s or m), e.g. {number}s"
            ))
        }
        other => {
            return Err(format!(
                "invalid duration {text:?}: unknown unit {other:?} (use us, ms, s or m)"
            ))
        }
    };
    let seconds = value * seconds_per_unit;
    if !seconds.is_finite() || seconds > MAX_DURATION.as_secs_f64() {
        return Err(format!("invalid duration {text:?}: at most 24h (1440m)"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// Prints a duration the way [`parse_duration`] reads it, in the largest unit that keeps it
/// whole: `2s`, `500ms`, `1.667s` for fractions of seconds above one second.
pub fn format_duration(d: Duration) -> String {
    let micros = d.as_micros();
    if micros == 0 {
        "0s".to_owned()
    } else if micros % 60_000_000 == 0 {
        format!("{}m", micros / 60_000_000)
    } else if micros % 1_000_000 == 0 {
        format!("{}s", micros / 1_000_000)
    } else if micros >= 1_000_000 {
        format!("{:.3}s", d.as_secs_f64())
    } else if micros % 1000 == 0 {
        format!("{}ms", micros / 1000)
    } else {
        format!("{micros}us")
    }
}

/// An integer with `,` between groups of three digits: `1,234,567`.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_with_units_parse() {
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("250us"), Ok(Duration::from_micros(250)));
        assert_eq!(parse_duration(" 2s "), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert!(parse_duration("24h").is_err());
    }

    #[test]
    fn bad_durations_say_why() {
        let missing_unit = parse_duration("5").unwrap_err();
        assert!(missing_unit.contains("add a unit"), "{missing_unit}");
        let unknown = parse_duration("5h").unwrap_err();
        assert!(unknown.contains("unknown unit"), "{unknown}");
        assert!(parse_duration("").is_err());
        assert!(parse_duration("ms").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("1.2.3s").is_err());
        assert!(parse_duration("2000m").unwrap_err().contains("at most"));
    }

    #[test]
    fn durations_print_as_they_parse() {
        for text in ["2s", "500ms", "1m", "250us", "0s"] {
            assert_eq!(format_duration(parse_duration(text).unwrap()), text);
        }
        assert_eq!(format_duration(Duration::from_millis(1667)), "1.667s");
    }

    #[test]
    fn thousands_are_grouped() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }
}
