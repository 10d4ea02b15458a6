//! Reconnect delays: exponential backoff with full jitter, so a fleet that lost its gateway
//! does not come back in lockstep.

use std::time::Duration;

use rand::Rng;

/// Delay before the next connection attempt: uniform in `[0, min(cap, base * 2^attempt))`.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    /// A backoff starting at `base` and never waiting longer than `cap`.
    pub fn new(base: Duration, cap: Duration) -> Self {
        Backoff {
            base,
            cap,
            attempt: 0,
        }
    }

    /// The usual device policy: 500 ms doubling up to 30 s.
    pub fn device() -> Self {
        Backoff::new(Duration::from_millis(500), Duration::from_secs(30))
    }

    /// The upper bound of the next delay (before jitter).
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// Draws the next delay and makes the one after it (up to the cap) twice as long.
    pub fn next_delay(&mut self, rng: &mut impl Rng) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        ceiling.mul_f64(rng.gen::<f64>())
    }

    /// Starts over after a connection that held.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceiling_doubles_up_to_the_cap() {
        let mut backoff = Backoff::device();
        let mut rng = rand::thread_rng();
        let mut ceilings = Vec::new();
        for _ in 0..10 {
            ceilings.push(backoff.ceiling().as_millis());
            backoff.next_delay(&mut rng);
        }
        assert_eq!(
            ceilings,
            [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000, 30000]
        );
    }

    #[test]
    fn delays_stay_within_bounds_even_after_many_attempts() {
        let mut backoff = Backoff::device();
        let mut rng = rand::thread_rng();
        for attempt in 0..10_000u32 {
            let ceiling = backoff.ceiling();
            let delay = backoff.next_delay(&mut rng);
            assert!(
                delay < ceiling || ceiling.is_zero(),
                "attempt {attempt}: {delay:?}"
            );
            assert!(delay <= Duration::from_secs(30));
        }
    }

    #[test]
    fn delays_are_jittered_and_reset_starts_over() {
        let mut backoff = Backoff::device();
        let mut rng = rand::thread_rng();
        for _ in 0..5 {
            backoff.next_delay(&mut rng);
        }
        let delays: Vec<_> = (0..20).map(|_| backoff.next_delay(&mut rng)).collect();
        assert!(
            delays.iter().any(|d| *d != delays[0]),
            "full jitter varies the delay"
        );
        backoff.reset();
        assert_eq!(backoff.ceiling(), Duration::from_millis(500));
    }
}
