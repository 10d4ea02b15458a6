//! Admission limits: connection count, per-IP connections, per-device connect rate, telemetry rate.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// A token bucket: `rate` tokens per second, holding at most `burst`.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    updated: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate: u32, burst: u32) -> TokenBucket {
        TokenBucket {
            rate: f64::from(rate),
            burst: f64::from(burst.max(1)),
            tokens: f64::from(burst.max(1)),
            updated: Instant::now(),
        }
    }

    /// Takes one token if there is one.
    pub fn try_take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.updated = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Why a connection is not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// At `max_connections` (503).
    Full,
    /// At `max_connections_per_ip` (429).
    PerIp,
    /// The device connected too often this minute (429), retry after this many seconds.
    Flapping { retry_after: u64 },
}

/// Held for the life of a connection; releases its slots when dropped.
#[derive(Debug)]
pub struct Admission {
    _permit: OwnedSemaphorePermit,
    ip: Option<(Arc<Limits>, IpAddr)>,
}

impl Drop for Admission {
    fn drop(&mut self) {
        if let Some((limits, ip)) = self.ip.take() {
            let mut per_ip = limits.per_ip.lock().expect("limits lock");
            if let Some(n) = per_ip.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    per_ip.remove(&ip);
                }
            }
        }
    }
}

/// Shared admission state of the device listener.
#[derive(Debug)]
pub struct Limits {
    connections: Arc<Semaphore>,
    max_per_ip: usize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    connects_per_min: u32,
    /// device pk -> (minute number, connects in that minute)
    connects: Mutex<HashMap<i64, (u64, u32)>>,
    epoch: Instant,
}

impl Limits {
    /// Limits from the settings; 0 for `max_per_ip` or `connects_per_min` means none.
    pub fn new(max_connections: usize, max_per_ip: usize, connects_per_min: u32) -> Arc<Limits> {
        Arc::new(Limits {
            connections: Arc::new(Semaphore::new(max_connections)),
            max_per_ip,
            per_ip: Mutex::new(HashMap::new()),
            connects_per_min,
            connects: Mutex::new(HashMap::new()),
            epoch: Instant::now(),
        })
    }

    /// Takes a connection slot (and a per-IP slot when that limit is on).
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Admission, Refused> {
        let permit = self
            .connections
            .clone()
            .try_acquire_owned()
            .map_err(|_| Refused::Full)?;
        if self.max_per_ip == 0 {
            return Ok(Admission {
                _permit: permit,
                ip: None,
            });
        }
        let mut per_ip = self.per_ip.lock().expect("limits lock");
        let n = per_ip.entry(ip).or_insert(0);
        if *n >= self.max_per_ip {
            return Err(Refused::PerIp);
        }
        *n += 1;
        Ok(Admission {
            _permit: permit,
            ip: Some((self.clone(), ip)),
        })
    }

    /// Counts a connect of a device against its per-minute allowance.
    pub fn device_connect(&self, device_pk: i64, now: Instant) -> Result<(), Refused> {
        if self.connects_per_min == 0 {
            return Ok(());
        }
        let since = now.saturating_duration_since(self.epoch).as_secs();
        let minute = since / 60;
        let mut connects = self.connects.lock().expect("limits lock");
        if connects.len() > 100_000 {
            connects.retain(|_, (m, _)| *m == minute);
        }
        let entry = connects.entry(device_pk).or_insert((minute, 0));
        if entry.0 != minute {
            *entry = (minute, 0);
        }
        if entry.1 >= self.connects_per_min {
            return Err(Refused::Flapping {
                retry_after: 60 - since % 60,
            });
        }
        entry.1 += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn bucket_allows_burst_then_rate() {
        let start = Instant::now();
        let mut b = TokenBucket::new(2, 3);
        assert!((0..3).all(|_| b.try_take(start)));
        assert!(!b.try_take(start));
        assert!(b.try_take(start + Duration::from_millis(500)));
        assert!(!b.try_take(start + Duration::from_millis(500)));
        assert!(b.try_take(start + Duration::from_secs(10)));
    }

    #[test]
    fn connection_and_ip_slots_come_back() {
        let limits = Limits::new(2, 1, 0);
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let other: IpAddr = "127.0.0.2".parse().unwrap();
        let a = limits.admit(ip).unwrap();
        assert_eq!(limits.admit(ip).unwrap_err(), Refused::PerIp);
        let b = limits.admit(other).unwrap();
        assert_eq!(
            limits.admit("127.0.0.3".parse().unwrap()).unwrap_err(),
            Refused::Full
        );
        drop(a);
        drop(b);
        assert!(limits.admit(ip).is_ok());
    }

    #[test]
    fn flapping_device_waits_for_the_next_minute() {
        let limits = Limits::new(10, 0, 2);
        let now = limits.epoch + Duration::from_secs(30);
        assert!(limits.device_connect(1, now).is_ok());
        assert!(limits.device_connect(1, now).is_ok());
        assert_eq!(
            limits.device_connect(1, now),
            Err(Refused::Flapping { retry_after: 30 })
        );
        assert!(
            limits.device_connect(2, now).is_ok(),
            "other devices unaffected"
        );
        assert!(limits
            .device_connect(1, now + Duration::from_secs(30))
            .is_ok());
    }
}
