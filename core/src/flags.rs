//! Value parsers shared by the roles' command-line flags.

use std::time::Duration;

/// A duration (`90s`, `10m`, `1h 30m`) longer than zero: for periods, where zero would make a
/// busy loop (and `tokio::time::interval` panics on it).
pub fn positive_duration(text: &str) -> Result<Duration, String> {
    match humantime::parse_duration(text) {
        Ok(d) if d.is_zero() => Err("must be longer than 0s".into()),
        Ok(d) => Ok(d),
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn periods_parse_and_zero_is_refused() {
        assert_eq!(positive_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(positive_duration("1h 30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(
            positive_duration("0s").unwrap_err(),
            "must be longer than 0s"
        );
        assert!(positive_duration("soon").is_err());
    }
}
