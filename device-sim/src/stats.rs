//! Bookkeeping shared by a fleet: every failure counted by kind (the first of each kind shown
//! once, so thousands of devices failing alike print one line, not thousands), and latencies.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use hdrhistogram::Histogram;

/// Latencies up to a minute, in microseconds, shared by a fleet.
#[derive(Debug)]
pub struct Latency {
    histogram: Mutex<Histogram<u64>>,
}

impl Default for Latency {
    fn default() -> Self {
        let histogram =
            Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds");
        Latency {
            histogram: Mutex::new(histogram),
        }
    }
}

impl Latency {
    /// Records one latency (clamped to the histogram's range).
    pub fn record(&self, latency: Duration) {
        let micros = (latency.as_micros() as u64).clamp(1, 60_000_000);
        let mut histogram = self.histogram.lock().unwrap_or_else(|e| e.into_inner());
        histogram.saturating_record(micros);
    }

    /// Every latency recorded so far, as (microseconds, count) pairs: what another process
    /// needs to add them to its own.
    pub fn recorded(&self) -> Vec<(u64, u64)> {
        let histogram = self.histogram.lock().unwrap_or_else(|e| e.into_inner());
        histogram
            .iter_recorded()
            .map(|v| (v.value_iterated_to(), v.count_at_value()))
            .collect()
    }

    /// Adds latencies recorded elsewhere, as [`Latency::recorded`] lists them.
    pub fn add_recorded(&self, recorded: &[(u64, u64)]) {
        let mut histogram = self.histogram.lock().unwrap_or_else(|e| e.into_inner());
        for &(micros, count) in recorded {
            histogram.saturating_record_n(micros.clamp(1, 60_000_000), count);
        }
    }

    /// p50 and p99 in milliseconds, `None` before the first record.
    pub fn p50_p99_ms(&self) -> Option<(f64, f64)> {
        let histogram = self.histogram.lock().unwrap_or_else(|e| e.into_inner());
        if histogram.is_empty() {
            return None;
        }
        let ms = |q| histogram.value_at_quantile(q) as f64 / 1000.0;
        Some((ms(0.50), ms(0.99)))
    }
}

/// Failures counted by kind.
#[derive(Debug, Default)]
pub struct ErrorTally {
    counts: Mutex<BTreeMap<String, u64>>,
}

impl ErrorTally {
    /// Counts one failure; the first of its kind is printed to stderr with `detail`.
    pub fn record(&self, kind: &str, detail: impl std::fmt::Display) {
        let first = {
            let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
            let count = counts.entry(kind.to_owned()).or_insert(0);
            *count += 1;
            *count == 1
        };
        if first {
            // One string, one write: the lines of shard processes sharing stderr do not interleave.
            let line = format!(
                "device-sim: {kind}: {detail} (later ones of this kind are only counted)\n"
            );
            eprint!("{line}");
        }
    }

    /// Adds counts gathered elsewhere (another process), printing nothing.
    pub fn add(&self, counts: &BTreeMap<String, u64>) {
        let mut mine = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        for (kind, count) in counts {
            *mine.entry(kind.clone()).or_insert(0) += count;
        }
    }

    /// The total count so far.
    #[cfg(test)]
    pub fn total(&self) -> u64 {
        self.snapshot().values().sum()
    }

    /// The counts so far.
    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        self.counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// `kind=count, kind=count`, or `none`.
pub fn describe(counts: &BTreeMap<String, u64>) -> String {
    if counts.is_empty() {
        return "none".into();
    }
    counts
        .iter()
        .map(|(kind, count)| format!("{kind}={count}"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_quantiles_in_milliseconds() {
        let latency = Latency::default();
        assert_eq!(latency.p50_p99_ms(), None);
        for n in 1..=100 {
            latency.record(Duration::from_micros(n * 10));
        }
        assert_eq!(latency.p50_p99_ms(), Some((0.5, 0.99)));
    }

    #[test]
    fn recorded_latencies_add_up_elsewhere() {
        let (here, there, both) = (Latency::default(), Latency::default(), Latency::default());
        for n in 1..=50 {
            here.record(Duration::from_micros(n * 10));
            there.record(Duration::from_micros((n + 50) * 10));
        }
        both.add_recorded(&here.recorded());
        both.add_recorded(&there.recorded());
        assert_eq!(both.p50_p99_ms(), Some((0.5, 0.99)));
        assert_eq!(Latency::default().recorded(), []);
    }

    #[test]
    fn counts_by_kind() {
        let tally = ErrorTally::default();
        tally.record("connect: timeout", "x");
        tally.record("connect: timeout", "y");
        tally.record("error: rate_limited", "z");
        assert_eq!(tally.total(), 3);
        assert_eq!(
            describe(&tally.snapshot()),
            "connect: timeout=2, error: rate_limited=1"
        );
        assert_eq!(describe(&BTreeMap::new()), "none");
    }
}
