//! Simulated sensor readings: values on a bounded random walk, one reading per telemetry message.

use rand::Rng;
use serde::Serialize;

/// One reading, the `data` of a telemetry message.
#[derive(Debug, Serialize, PartialEq)]
pub struct Reading {
    pub temp: f64,
    pub humidity: f64,
    pub battery: f64,
    pub counter: u64,
    pub state: &'static str,
}

/// Sensor values that drift a little with every reading.
#[derive(Debug)]
pub struct Sensor {
    temp: f64,
    humidity: f64,
    battery: f64,
    counter: u64,
}

impl Sensor {
    /// A sensor starting at plausible indoor values.
    pub fn new(rng: &mut impl Rng) -> Sensor {
        Sensor {
            temp: rng.gen_range(18.0..24.0),
            humidity: rng.gen_range(35.0..55.0),
            battery: rng.gen_range(60.0..100.0),
            counter: 0,
        }
    }

    /// The next reading; `counter` counts readings from 0.
    pub fn step(&mut self, rng: &mut impl Rng) -> Reading {
        self.temp = (self.temp + rng.gen_range(-0.2..=0.2)).clamp(-20.0, 50.0);
        self.humidity = (self.humidity + rng.gen_range(-0.5..=0.5)).clamp(0.0, 100.0);
        self.battery = (self.battery - rng.gen_range(0.0..0.01)).max(0.0);
        let reading = Reading {
            temp: round2(self.temp),
            humidity: round2(self.humidity),
            battery: round2(self.battery),
            counter: self.counter,
            state: "ok",
        };
        self.counter += 1;
        reading
    }
}

fn round2(value: f64) -> f64 {
    (value * 100.0).round() / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readings_drift_within_physical_bounds() {
        let mut rng = rand::thread_rng();
        let mut sensor = Sensor::new(&mut rng);
        let mut previous = sensor.step(&mut rng);
        assert_eq!(previous.counter, 0);
        for n in 1..20_000 {
            let reading = sensor.step(&mut rng);
            assert_eq!(reading.counter, n);
            assert!((-20.0..=50.0).contains(&reading.temp));
            assert!((0.0..=100.0).contains(&reading.humidity));
            assert!((0.0..=100.0).contains(&reading.battery));
            assert!((reading.temp - previous.temp).abs() <= 0.21);
            assert!(reading.battery <= previous.battery);
            previous = reading;
        }
    }
}
