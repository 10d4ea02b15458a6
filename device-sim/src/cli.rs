//! Command-line interface: the options every subcommand shares and one struct per subcommand.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::conn::SourceIps;
use crate::shards::Sharding;
use crate::tokens::Secret;

/// Simulated IoT devices for the gateway: a demo fleet, a load generator and a connection holder.
#[derive(Debug, Parser)]
#[command(name = "device-sim", version, about)]
pub struct Cli {
    #[command(flatten)]
    pub common: Common,
    #[command(subcommand)]
    pub command: Command,
}

/// Where the gateway is and who the simulated devices are.
#[derive(Debug, Args)]
#[command(next_help_heading = "Common options")]
pub struct Common {
    /// Device endpoint of the gateway (`wss://` or `ws://`).
    #[arg(
        long,
        env = "DEVICE_SIM_URL",
        default_value = "wss://127.0.0.1:8443/v1/connect",
        global = true
    )]
    pub url: String,

    /// PEM file of the CA that signed the gateway's certificate (for `wss://`).
    #[arg(long, default_value = "certs/ca.pem", global = true)]
    pub ca: PathBuf,

    /// Base URL of the operator API (plain http).
    #[arg(
        long,
        env = "GATEWAY_API_URL",
        default_value = "http://127.0.0.1:8080/v1",
        global = true
    )]
    pub api_url: String,

    /// Operator API key (for --provision and bench-commands); prefer the environment variable.
    #[arg(long, env = "GATEWAY_API_KEY", hide_env_values = true, global = true)]
    pub api_key: Option<Secret>,

    /// Authenticate each device with a client certificate instead of its token (mutual TLS):
    /// `DIR/{id}.pem` and `DIR/{id}-key.pem`, as `gateway certs device` writes them.
    #[arg(long, value_name = "DIR", global = true)]
    pub client_certs: Option<PathBuf>,

    /// JSON file mapping device ids to their tokens.
    #[arg(long, default_value = "data/sim-tokens.json", global = true)]
    pub tokens: PathBuf,

    /// Create the devices through the operator API first (tokens already in the file are reused).
    #[arg(long, global = true)]
    pub provision: bool,

    /// Device ids are `{prefix}-{n:05}`, n counting from 1.
    #[arg(long, default_value = "sim", global = true)]
    pub prefix: String,

    /// Connection attempts (TLS + WebSocket handshakes) in progress at once.
    #[arg(long, default_value_t = 200, global = true)]
    pub connect_concurrency: usize,

    /// Local addresses to connect from, in turn: `auto` (the system's choice, or 127.0.0.1,
    /// 127.0.0.2, ... when a fleet is too big for one loopback address's ports, 16,000
    /// connections each), a list `a,b,c`, or an IPv4 range `127.0.0.1-127.0.0.8`.
    #[arg(long, default_value = "auto", global = true, value_name = "IPS")]
    pub source_ips: SourceIps,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a fleet that sends telemetry and answers commands, reconnecting as real devices do.
    /// On SIGUSR1 it prints the errors so far, by kind ("run: at 12.3s; errors by kind: ...").
    Run(RunArgs),
    /// Measure acked telemetry throughput and ack latency with a fixed number of messages in flight.
    Bench(BenchArgs),
    /// Measure command round trips through the operator API (POST with wait_s until succeeded),
    /// optionally with other devices streaming telemetry meanwhile.
    BenchCommands(BenchCommandsArgs),
    /// The `bench` load against an MQTT broker (QoS 1 publishes over a TLS WebSocket, PUBACK as
    /// the ack): the transport ceiling the benchmark compares the gateway with. --url is the
    /// broker's `wss://HOST:PORT/mqtt`; no provisioning, no tokens.
    BenchMqtt(BenchMqttArgs),
    /// Open many connections, report how long they took, and hold them open.
    Idle(IdleArgs),
    /// Only create the devices and write the tokens file.
    Provision(ProvisionArgs),
    /// Start the gateway (its binary, on its defaults, in this directory) and a fleet that it
    /// provisions, print where to look; Ctrl-C stops the fleet, then the gateway.
    /// --url and --api-url are taken from the gateway's `listening` line.
    #[cfg(unix)]
    Demo(DemoArgs),
}

/// Options of `run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Number of devices.
    #[arg(long, default_value_t = 10)]
    pub devices: usize,
    /// Telemetry messages per second per device (0: none).
    #[arg(long, default_value_t = 1.0)]
    pub rate: f64,
    /// Stop after this long (default: run until Ctrl-C).
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Readings each device keeps while it cannot send them (the oldest are dropped, and
    /// counted, past it).
    #[arg(long, default_value_t = 10_000)]
    pub buffer: usize,
    /// Chance per second per device of dropping the connection abruptly (0 to 1).
    #[arg(long, default_value_t = 0.0, value_parser = crate::chaos::parse_probability)]
    pub chaos_disconnect_rate: f64,
    /// Chance that a telemetry message is sent twice, same id (0 to 1).
    #[arg(long, default_value_t = 0.0, value_parser = crate::chaos::parse_probability)]
    pub chaos_duplicate_rate: f64,
    /// Offset of the devices' clocks from real time (`30s`, `-2m`): telemetry timestamps and
    /// command results carry it.
    #[arg(long, default_value = "0s", value_parser = crate::chaos::parse_skew, allow_hyphen_values = true)]
    pub clock_skew: chrono::TimeDelta,
    /// Print the summary as one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub sharding: Sharding,
}

/// Options of `bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Number of devices.
    #[arg(long, default_value_t = 100)]
    pub devices: usize,
    /// Telemetry messages each device keeps in flight (sent, not yet acked).
    #[arg(long, default_value_t = 8)]
    pub inflight: usize,
    /// Length of the measurement window.
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Load before the measurement window starts.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// Approximate size of each telemetry message, in bytes of JSON.
    #[arg(long, default_value_t = 200)]
    pub payload_bytes: usize,
    /// Print the results as one JSON object on stdout (the table goes to stderr).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub sharding: Sharding,
}

/// Options of `bench-mqtt`: those of `bench` (in one process), and where to publish.
#[derive(Debug, Args)]
pub struct BenchMqttArgs {
    #[command(flatten)]
    pub load: BenchArgs,
    /// Client `{prefix}-00001` publishes to `{topic-prefix}/{prefix}-00001`.
    #[arg(long, default_value = "bench")]
    pub topic_prefix: String,
}

/// Options of `bench-commands`.
#[derive(Debug, Args)]
pub struct BenchCommandsArgs {
    /// Devices that answer the commands (ids `{prefix}-00001`...); created when missing.
    #[arg(long, default_value_t = 100)]
    pub devices: usize,
    /// Commands measured, spread round-robin over the devices.
    #[arg(long, default_value_t = 1000)]
    pub commands: usize,
    /// Operators sending at once, each waiting for its answer before its next command
    /// [default: --devices, so that no device has more than one command outstanding].
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// Commands sent first and not measured (they open the HTTP connections)
    /// [default: one per operator].
    #[arg(long)]
    pub warmup_commands: Option<usize>,
    /// The `wait_s` of each command (0..60).
    #[arg(long, default_value_t = 10)]
    pub wait_s: u64,
    /// Other devices streaming telemetry during the measurement (ids `{prefix}-bg-00001`...).
    #[arg(long, default_value_t = 0)]
    pub background_devices: usize,
    /// Telemetry messages per second per background device.
    #[arg(long, conflicts_with = "background_inflight")]
    pub background_rate: Option<f64>,
    /// Telemetry messages each background device keeps in flight (as fast as acks come).
    #[arg(long)]
    pub background_inflight: Option<usize>,
    /// How long the background load runs before the measurement starts.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub background_warmup: Duration,
    /// How long to wait for every device to be online (per the API) before giving up.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub online_timeout: Duration,
    /// Print the results as one JSON object on stdout (the table goes to stderr).
    #[arg(long)]
    pub json: bool,
}

/// Options of `idle`.
#[derive(Debug, Args)]
pub struct IdleArgs {
    /// Number of connections.
    #[arg(long, default_value_t = 5000)]
    pub devices: usize,
    /// How long to hold the connections once all are open.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub hold: Duration,
    /// Do not stop when stdin closes (for running with stdin at /dev/null).
    #[arg(long)]
    pub ignore_stdin: bool,
    #[command(flatten)]
    pub sharding: Sharding,
}

/// Options of `demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Number of devices.
    #[arg(long, default_value_t = 100)]
    pub devices: usize,
    /// Telemetry messages per second per device.
    #[arg(long, default_value_t = 1.0)]
    pub rate: f64,
    /// The gateway binary [default: `gateway` beside this program].
    #[arg(long, value_name = "FILE")]
    pub gateway_bin: Option<PathBuf>,
    /// Where the gateway's log (its stderr) goes.
    #[arg(long, value_name = "FILE", default_value = "data/gateway.log")]
    pub gateway_log: PathBuf,
}

/// Options of `provision`.
#[derive(Debug, Args)]
pub struct ProvisionArgs {
    /// Number of devices.
    #[arg(long)]
    pub devices: usize,
}

/// Parses `500ms`, `30s`, `2m`, `1h` or a plain (possibly fractional) number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration (try 500ms, 30s, 2m)"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => {
            return Err(format!(
                "unknown unit `{unit}` in `{text}` (use ms, s, m or h)"
            ))
        }
    };
    Duration::try_from_secs_f64(seconds).map_err(|_| format!("`{text}` is out of range"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_and_without_units() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("20"), Ok(Duration::from_secs(20)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
    }

    #[test]
    fn bad_durations_are_refused() {
        for bad in ["", "s", "10x", "-1s", "1.2.3s", "ms"] {
            assert!(parse_duration(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn bench_commands_takes_one_background_pace_at_most() {
        let parse = |extra: &[&str]| {
            let mut argv = vec!["device-sim", "bench-commands"];
            argv.extend_from_slice(extra);
            Cli::try_parse_from(argv)
        };
        let Command::BenchCommands(args) = parse(&[]).unwrap().command else {
            panic!("not bench-commands")
        };
        assert_eq!((args.devices, args.commands, args.wait_s), (100, 1000, 10));
        assert_eq!((args.concurrency, args.background_devices), (None, 0));
        assert!(parse(&["--background-rate", "10"]).is_ok());
        assert!(parse(&["--background-rate", "10", "--background-inflight", "8"]).is_err());
    }

    #[test]
    fn bench_mqtt_takes_the_bench_options() {
        let cli = Cli::try_parse_from([
            "device-sim",
            "--url",
            "wss://127.0.0.1:9001/mqtt",
            "bench-mqtt",
            "--devices",
            "5",
            "--inflight",
            "3",
            "--duration",
            "2s",
            "--json",
        ])
        .unwrap();
        let Command::BenchMqtt(args) = cli.command else {
            panic!("not bench-mqtt")
        };
        assert_eq!((args.load.devices, args.load.inflight), (5, 3));
        assert_eq!(args.load.duration, Duration::from_secs(2));
        assert_eq!(args.load.payload_bytes, 200);
        assert!(args.load.json);
        assert_eq!(args.topic_prefix, "bench");
        assert_eq!(cli.common.url, "wss://127.0.0.1:9001/mqtt");
    }

    #[test]
    fn run_takes_chaos_options() {
        let cli = Cli::try_parse_from([
            "device-sim",
            "run",
            "--chaos-disconnect-rate",
            "0.01",
            "--clock-skew",
            "-30s",
        ])
        .unwrap();
        let Command::Run(args) = cli.command else {
            panic!("not run")
        };
        assert_eq!(args.chaos_disconnect_rate, 0.01);
        assert_eq!(args.chaos_duplicate_rate, 0.0);
        assert_eq!(args.clock_skew, chrono::TimeDelta::seconds(-30));
        assert_eq!(args.buffer, 10_000);
        assert!(Cli::try_parse_from(["device-sim", "run", "--chaos-duplicate-rate", "2"]).is_err());
    }

    #[test]
    fn common_options_work_after_the_subcommand() {
        let cli = Cli::try_parse_from([
            "device-sim",
            "bench",
            "--devices",
            "3",
            "--url",
            "ws://127.0.0.1:1/v1/connect",
        ])
        .unwrap();
        assert_eq!(cli.common.url, "ws://127.0.0.1:1/v1/connect");
        assert!(matches!(
            cli.command,
            Command::Bench(BenchArgs { devices: 3, .. })
        ));
    }
}
