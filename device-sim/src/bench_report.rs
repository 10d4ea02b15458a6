//! The outcome of `device-sim bench-commands`: a table for people and one JSON object for scripts.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde_json::{json, Value};

use crate::bench_commands::Measured;
use crate::stats;

/// What the background telemetry did during the measurement.
#[derive(Debug, PartialEq)]
pub struct Background {
    pub devices: usize,
    pub connected: usize,
    /// How fast each device sent, in words.
    pub pace: String,
    /// Messages acked during the measurement.
    pub acked: u64,
    pub msgs_per_sec: f64,
}

/// Everything `bench-commands` reports.
pub struct Report {
    pub devices: usize,
    pub commands: usize,
    pub concurrency: usize,
    pub warmup_commands: usize,
    pub wait_s: u64,
    /// From the first command sent to the last answer read.
    pub elapsed: Duration,
    pub measured: Measured,
    /// Commands that did not come back `201` `succeeded` (warm-up ones labelled `warm-up:`).
    pub command_errors: BTreeMap<String, u64>,
    /// Connection failures and `error` messages of the devices and the background load.
    pub device_errors: BTreeMap<String, u64>,
    pub background: Option<Background>,
    /// The gateway's own mean time for these `POST`s, from its `gateway_api_request_seconds`
    /// (read before and after the measurement); `None` from a server without that metric.
    pub gateway_api_mean_ms: Option<f64>,
}

/// p50, p90, p99 and max of a histogram of values in `unit_us` microseconds, in milliseconds
/// (zeros when empty).
fn quantiles_ms(histogram: &Histogram<u64>, unit_us: u64) -> [f64; 4] {
    if histogram.is_empty() {
        return [0.0; 4];
    }
    let ms = |value: u64| (value * unit_us) as f64 / 1000.0;
    [
        ms(histogram.value_at_quantile(0.50)),
        ms(histogram.value_at_quantile(0.90)),
        ms(histogram.value_at_quantile(0.99)),
        ms(histogram.max()),
    ]
}

fn round1(value: f64) -> f64 {
    (value * 10.0).round() / 10.0
}

impl Report {
    /// Command and device errors together.
    pub fn errors(&self) -> u64 {
        self.command_errors.values().sum::<u64>() + self.device_errors.values().sum::<u64>()
    }

    fn commands_per_sec(&self) -> f64 {
        match self.elapsed.as_secs_f64() {
            0.0 => 0.0,
            seconds => round1(self.measured.succeeded as f64 / seconds),
        }
    }

    /// One JSON object; latencies in milliseconds.
    pub fn json(&self) -> Value {
        let [p50, p90, p99, max] = quantiles_ms(&self.measured.round_trip_us, 1);
        let [gw50, gw90, gw99, gwmax] = quantiles_ms(&self.measured.gateway_ms, 1000);
        let mean = self.measured.round_trip_us.mean() / 1000.0;
        let background = self.background.as_ref().map(|b| {
            json!({"devices": b.devices, "connected": b.connected, "pace": b.pace,
                   "acked": b.acked, "msgs_per_sec": round1(b.msgs_per_sec)})
        });
        json!({
            "devices": self.devices,
            "commands": self.commands,
            "concurrency": self.concurrency,
            "warmup_commands": self.warmup_commands,
            "wait_s": self.wait_s,
            "succeeded": self.measured.succeeded,
            "elapsed_s": (self.elapsed.as_secs_f64() * 1000.0).round() / 1000.0,
            "commands_per_sec": self.commands_per_sec(),
            "p50_ms": p50, "p90_ms": p90, "p99_ms": p99, "max_ms": max,
            "mean_ms": (mean * 1000.0).round() / 1000.0,
            "gateway_api_mean_ms": self.gateway_api_mean_ms.map(|ms| (ms * 1000.0).round() / 1000.0),
            "gateway_p50_ms": gw50, "gateway_p90_ms": gw90, "gateway_p99_ms": gw99, "gateway_max_ms": gwmax,
            "errors": self.errors(),
            "command_errors": self.command_errors,
            "device_errors": self.device_errors,
            "background": background,
        })
    }

    /// A few lines for people.
    pub fn table(&self) -> String {
        let [p50, p90, p99, max] = quantiles_ms(&self.measured.round_trip_us, 1);
        let [gw50, gw90, gw99, gwmax] = quantiles_ms(&self.measured.gateway_ms, 1000);
        let mut out = format!(
            "bench-commands: {} ping commands over {} devices, {} operators, wait_s {} (after {} warm-up commands)\n",
            self.commands, self.devices, self.concurrency, self.wait_s, self.warmup_commands
        );
        out += &format!(
            "round trip   p50 {p50:.3} ms  p90 {p90:.3} ms  p99 {p99:.3} ms  max {max:.3} ms  (POST sent -> answer read)\n"
        );
        out += &format!(
            "gateway      p50 {gw50:.3} ms  p90 {gw90:.3} ms  p99 {gw99:.3} ms  max {gwmax:.3} ms  (created_at -> completed_at)\n"
        );
        if let Some(api) = self.gateway_api_mean_ms {
            out += &format!(
                "mean         {:.3} ms round trip, {api:.3} ms in the gateway's API (request -> response head)\n",
                self.measured.round_trip_us.mean() / 1000.0
            );
        }
        out += &format!(
            "throughput   {} succeeded in {:.3} s: {:.1} commands/s\n",
            self.measured.succeeded,
            self.elapsed.as_secs_f64(),
            self.commands_per_sec()
        );
        match &self.background {
            Some(b) => {
                out += &format!(
                "background   {}/{} devices, {}: {} acked, {:.1} msgs/s during the measurement\n",
                b.connected, b.devices, b.pace, b.acked, b.msgs_per_sec
            )
            }
            None => out += "background   none\n",
        }
        out += &format!(
            "errors       {} (commands: {}; devices: {})\n",
            self.errors(),
            stats::describe(&self.command_errors),
            stats::describe(&self.device_errors)
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> Report {
        let mut round_trip_us = Histogram::new_with_bounds(1, 60_000_000, 3).unwrap();
        let mut gateway_ms = Histogram::new_with_bounds(1, 60_000, 3).unwrap();
        // Below 2048 µs the histogram is exact to the microsecond.
        for n in 1..=100 {
            round_trip_us.record(n * 10).unwrap();
            gateway_ms.record(n / 4).unwrap();
        }
        Report {
            devices: 10,
            commands: 100,
            concurrency: 10,
            warmup_commands: 10,
            wait_s: 10,
            elapsed: Duration::from_millis(250),
            measured: Measured {
                round_trip_us,
                gateway_ms,
                succeeded: 100,
            },
            command_errors: BTreeMap::new(),
            device_errors: BTreeMap::new(),
            background: None,
            gateway_api_mean_ms: None,
        }
    }

    #[test]
    fn json_has_the_quantiles_and_the_rate() {
        let json = report().json();
        assert_eq!(json["succeeded"], 100);
        assert_eq!(json["commands_per_sec"], 400.0);
        assert_eq!(json["p50_ms"], 0.5);
        assert_eq!(json["p90_ms"], 0.9);
        assert_eq!(json["p99_ms"], 0.99);
        assert_eq!(json["max_ms"], 1.0);
        assert_eq!(json["gateway_p50_ms"], 12.0);
        assert_eq!(json["gateway_max_ms"], 25.0);
        assert_eq!(json["errors"], 0);
        assert_eq!(json["background"], Value::Null);
        assert_eq!(json["mean_ms"], 0.505);
        assert_eq!(json["gateway_api_mean_ms"], Value::Null);
        let mut report = report();
        report.gateway_api_mean_ms = Some(0.4214);
        assert_eq!(report.json()["gateway_api_mean_ms"], 0.421);
        let table = report.table();
        assert!(
            table.contains("mean         0.505 ms round trip, 0.421 ms in the gateway's API"),
            "{table}"
        );
    }

    #[test]
    fn errors_of_both_kinds_count_and_show() {
        let mut report = report();
        report.command_errors.insert("HTTP 202 sent".into(), 2);
        report.device_errors.insert("connection lost".into(), 1);
        report.background = Some(Background {
            devices: 5,
            connected: 5,
            pace: "8 in flight each".into(),
            acked: 1000,
            msgs_per_sec: 4000.04,
        });
        assert_eq!(report.errors(), 3);
        let table = report.table();
        assert!(
            table
                .contains("errors       3 (commands: HTTP 202 sent=2; devices: connection lost=1)"),
            "{table}"
        );
        assert!(
            table.contains("background   5/5 devices, 8 in flight each: 1000 acked, 4000.0 msgs/s"),
            "{table}"
        );
        assert_eq!(report.json()["background"]["msgs_per_sec"], 4000.0);
    }

    #[test]
    fn an_empty_run_reports_zeros_not_a_panic() {
        let mut report = report();
        report.measured.round_trip_us.reset();
        report.measured.succeeded = 0;
        report.elapsed = Duration::ZERO;
        assert_eq!(report.json()["p99_ms"], 0.0);
        assert_eq!(report.json()["commands_per_sec"], 0.0);
    }
}
