//! Failure bookkeeping shared by a fleet: every failure is counted by kind, and the first of each
//! kind is shown once, so thousands of devices failing alike print one line, not thousands.

use std::collections::BTreeMap;
use std::sync::Mutex;

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
            eprintln!("device-sim: {kind}: {detail} (later ones of this kind are only counted)");
        }
    }

    /// The counts so far.
    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        self.counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The total count so far.
    pub fn total(&self) -> u64 {
        self.snapshot().values().sum()
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
