//! Reconnect delays: exponential backoff with full jitter, so a fleet that lost its gateway
//! does not come back in lockstep; after the gateway closed for a restart, a lower cap for a
//! while, so the fleet is back within seconds of its return.

use std::time::{Duration, Instant};

use rand::Rng;

/// The cap of the attempts that follow a restart's close (1001, the gateway shutting down).
pub const RESTART_CAP: Duration = Duration::from_secs(2);
/// How many attempts keep [`RESTART_CAP`]: about half a minute of retrying (the mean delay is
/// a second), after which a gateway that has not come back gets the usual growing delays.
pub const RESTART_ATTEMPTS: u32 = 30;
/// How long after arming the short delays a 1001 close may arm them again: a gateway that
/// accepts and closes with 1001 over and over gets them once a minute, not for ever.
pub const RESTART_REARM: Duration = Duration::from_secs(60);

/// Delay before the next connection attempt: uniform in `[0, min(cap, base * 2^attempt))`.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
    /// Attempts left with the cap lowered to [`RESTART_CAP`].
    restart_attempts: u32,
    /// When [`Backoff::gateway_restarting`] last armed them.
    restart_armed_at: Option<Instant>,
}

impl Backoff {
    /// A backoff starting at `base` and never waiting longer than `cap`.
    pub fn new(base: Duration, cap: Duration) -> Self {
        Backoff {
            base,
            cap,
            attempt: 0,
            restart_attempts: 0,
            restart_armed_at: None,
        }
    }

    /// The usual device policy: 500 ms doubling up to 30 s.
    pub fn device() -> Self {
        Backoff::new(Duration::from_millis(500), Duration::from_secs(30))
    }

    /// The upper bound of the next delay (before jitter).
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        let ceiling = self.base.saturating_mul(factor).min(self.cap);
        if self.restart_attempts > 0 {
            ceiling.min(RESTART_CAP)
        } else {
            ceiling
        }
    }

    /// Draws the next delay and makes the one after it (up to the cap) twice as long.
    pub fn next_delay(&mut self, rng: &mut impl Rng) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        self.restart_attempts = self.restart_attempts.saturating_sub(1);
        ceiling.mul_f64(rng.gen::<f64>())
    }

    /// Starts over after a connection that held.
    pub fn reset(&mut self) {
        self.attempt = 0;
        self.restart_attempts = 0;
    }

    /// Starts over after the gateway closed the connection because it is shutting down
    /// (1001): it is most likely restarting, so the next [`RESTART_ATTEMPTS`] delays are at
    /// most [`RESTART_CAP`]. The usual cap (30 s for a device) keeps a fleet from hammering a
    /// gateway that is down for longer; against a restart it would leave devices asleep for
    /// up to that long after the gateway is back. Armed at most once per [`RESTART_REARM`];
    /// false (nothing changed) when it was armed more recently.
    pub fn gateway_restarting(&mut self, now: Instant) -> bool {
        if self
            .restart_armed_at
            .is_some_and(|at| now.saturating_duration_since(at) < RESTART_REARM)
        {
            return false;
        }
        self.restart_armed_at = Some(now);
        self.attempt = 0;
        self.restart_attempts = RESTART_ATTEMPTS;
        true
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

    #[test]
    fn after_a_restart_close_delays_stay_short_for_a_while_then_grow_again() {
        let mut backoff = Backoff::device();
        let mut rng = rand::thread_rng();
        for _ in 0..8 {
            backoff.next_delay(&mut rng);
        }
        assert_eq!(backoff.ceiling(), Duration::from_secs(30));
        assert!(backoff.gateway_restarting(Instant::now()));
        let mut ceilings = Vec::new();
        for _ in 0..RESTART_ATTEMPTS + 3 {
            let ceiling = backoff.ceiling();
            ceilings.push(ceiling.as_millis());
            assert!(backoff.next_delay(&mut rng) < ceiling);
        }
        assert_eq!(ceilings[..4], [500, 1000, 2000, 2000]);
        assert!(ceilings[3..RESTART_ATTEMPTS as usize]
            .iter()
            .all(|c| *c == 2000));
        assert_eq!(ceilings[RESTART_ATTEMPTS as usize..], [30000, 30000, 30000]);
    }

    #[test]
    fn a_connection_that_held_ends_the_short_delays() {
        let mut backoff = Backoff::device();
        let mut rng = rand::thread_rng();
        assert!(backoff.gateway_restarting(Instant::now()));
        backoff.reset();
        for _ in 0..5 {
            backoff.next_delay(&mut rng);
        }
        assert_eq!(backoff.ceiling(), Duration::from_secs(16));
    }

    #[test]
    fn repeated_restart_closes_arm_the_short_delays_once_a_minute() {
        let mut backoff = Backoff::device();
        let mut rng = rand::thread_rng();
        let start = Instant::now();
        assert!(backoff.gateway_restarting(start));
        for _ in 0..RESTART_ATTEMPTS {
            backoff.next_delay(&mut rng);
        }
        assert_eq!(backoff.ceiling(), Duration::from_secs(30));
        // A gateway that keeps accepting and closing with 1001 does not get them again...
        assert!(!backoff.gateway_restarting(start + Duration::from_secs(59)));
        assert_eq!(backoff.ceiling(), Duration::from_secs(30));
        // ... until a minute has passed.
        assert!(backoff.gateway_restarting(start + RESTART_REARM));
        assert_eq!(backoff.ceiling(), Duration::from_millis(500));
    }
}
