//! Faults a simulated device can inject on purpose (abrupt disconnects, duplicate sends) and the
//! skewed clock it can run on, for testing how the gateway copes with imperfect fleets.

use chrono::{DateTime, SecondsFormat, TimeDelta, Utc};
use rand::Rng;

use crate::cli::parse_duration;

/// Probabilities of the faults a device injects.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Chaos {
    /// Chance, each second, of dropping the connection abruptly (no close frame, no TLS close).
    pub disconnect_rate: f64,
    /// Chance that a telemetry message is sent twice (same id).
    pub duplicate_rate: f64,
}

impl Chaos {
    /// Whether a device drops its connection in this second.
    pub fn disconnect_now(&self, rng: &mut impl Rng) -> bool {
        self.disconnect_rate > 0.0 && rng.gen::<f64>() < self.disconnect_rate
    }

    /// Whether this message goes out twice.
    pub fn duplicate(&self, rng: &mut impl Rng) -> bool {
        self.duplicate_rate > 0.0 && rng.gen::<f64>() < self.duplicate_rate
    }
}

/// A device's clock: the real time plus a fixed skew.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Clock {
    pub skew: TimeDelta,
}

impl Clock {
    /// What the device believes the time is.
    pub fn now(&self) -> DateTime<Utc> {
        Utc::now() + self.skew
    }

    /// [`Clock::now`] as RFC 3339 UTC with milliseconds.
    pub fn now_rfc3339(&self) -> String {
        self.now().to_rfc3339_opts(SecondsFormat::Millis, true)
    }
}

/// Parses a probability from 0 to 1.
pub fn parse_probability(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(p) if (0.0..=1.0).contains(&p) => Ok(p),
        _ => Err(format!("`{text}` is not a probability from 0 to 1")),
    }
}

/// Parses a clock skew: a duration (`30s`, `500ms`, `2m`), ahead of real time, or behind it
/// with a leading `-`.
pub fn parse_skew(text: &str) -> Result<TimeDelta, String> {
    let text = text.trim();
    let (sign, magnitude) = match text.strip_prefix('-') {
        Some(rest) => (-1, rest),
        None => (1, text.strip_prefix('+').unwrap_or(text)),
    };
    let duration = parse_duration(magnitude)?;
    let delta = TimeDelta::from_std(duration).map_err(|_| format!("`{text}` is out of range"))?;
    Ok(delta * sign)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    #[test]
    fn faults_happen_about_as_often_as_asked() {
        let mut rng = StdRng::seed_from_u64(7);
        let chaos = Chaos {
            disconnect_rate: 0.1,
            duplicate_rate: 0.5,
        };
        let disconnects = (0..10_000)
            .filter(|_| chaos.disconnect_now(&mut rng))
            .count();
        let duplicates = (0..10_000).filter(|_| chaos.duplicate(&mut rng)).count();
        assert!((800..1200).contains(&disconnects), "{disconnects}");
        assert!((4600..5400).contains(&duplicates), "{duplicates}");
        let calm = Chaos::default();
        assert!(!(0..1000).any(|_| calm.disconnect_now(&mut rng) || calm.duplicate(&mut rng)));
    }

    #[test]
    fn skews_are_signed_durations() {
        assert_eq!(parse_skew("30s"), Ok(TimeDelta::seconds(30)));
        assert_eq!(parse_skew("+2m"), Ok(TimeDelta::minutes(2)));
        assert_eq!(parse_skew("-500ms"), Ok(TimeDelta::milliseconds(-500)));
        assert!(parse_skew("-").is_err());
        assert!(parse_skew("soon").is_err());
    }

    #[test]
    fn a_skewed_clock_is_off_by_the_skew() {
        let clock = Clock {
            skew: TimeDelta::seconds(-30),
        };
        let off = Utc::now() - clock.now();
        assert!(
            (off - TimeDelta::seconds(30)).abs() < TimeDelta::seconds(1),
            "{off}"
        );
        assert!(clock.now_rfc3339().ends_with('Z'));
    }

    #[test]
    fn probabilities_are_between_zero_and_one() {
        assert_eq!(parse_probability("0.25"), Ok(0.25));
        assert_eq!(parse_probability("0"), Ok(0.0));
        for bad in ["-0.1", "1.5", "often", "NaN"] {
            assert!(parse_probability(bad).is_err(), "{bad}");
        }
    }
}
