//! Settings: built-in defaults, a TOML file, environment variables and flags, merged in one place.
//!
//! Precedence, lowest first: defaults, `--config FILE`, `GATEWAY_*` environment
//! variables, command-line flags. clap reads the environment and the flags (a
//! flag beats its variable); the TOML file fills whatever neither set.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use clap::builder::BoolishValueParser;
use serde::Deserialize;

/// A setting that cannot be used; the message names the setting and says why.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Toml { path: PathBuf, message: String },
    #[error("setting {setting}: {message}")]
    Invalid {
        setting: &'static str,
        message: String,
    },
}

/// How hard SQLite works to make a commit durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Synchronous {
    /// fsync on every commit: an ack survives power loss (the default).
    Full,
    /// WAL mode NORMAL: an ack survives a crash of the process, not of the machine.
    Normal,
}

impl Synchronous {
    /// The PRAGMA value.
    pub fn as_pragma(self) -> &'static str {
        match self {
            Synchronous::Full => "FULL",
            Synchronous::Normal => "NORMAL",
        }
    }
}

impl FromStr for Synchronous {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "full" => Ok(Synchronous::Full),
            "normal" => Ok(Synchronous::Normal),
            _ => Err(format!("expected `full` or `normal`, got `{s}`")),
        }
    }
}

/// Log line format on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

impl FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err(format!("expected `text` or `json`, got `{s}`")),
        }
    }
}

/// Parses `500ms`, `30s`, `2m`, `1h` or a plain number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (use 500ms, 30s, 2m or seconds)"))?;
    let seconds = match unit.trim() {
        "" | "s" => value,
        "ms" => value / 1000.0,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => return Err(format!("`{s}` has an unknown unit (use ms, s, m or h)")),
    };
    if !seconds.is_finite() || !(0.0..=1.0e9).contains(&seconds) {
        return Err(format!("`{s}` is out of range"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// Everything `gateway serve` accepts on the command line (and, through `env`, from the environment).
#[derive(Debug, Default, Clone, clap::Args)]
pub struct ServeArgs {
    /// TOML file with settings (keys named like the flags, with underscores).
    #[arg(long, env = "GATEWAY_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Device listener address [default: 0.0.0.0:8443].
    #[arg(long, env = "GATEWAY_DEVICE_ADDR", value_name = "ADDR")]
    pub device_addr: Option<SocketAddr>,
    /// Operator API listener address [default: 127.0.0.1:8080].
    #[arg(long, env = "GATEWAY_API_ADDR", value_name = "ADDR")]
    pub api_addr: Option<SocketAddr>,
    /// SQLite database URL [default: sqlite://data/gateway.db].
    #[arg(long, env = "GATEWAY_DATABASE_URL", value_name = "URL")]
    pub database_url: Option<String>,
    /// TLS certificate chain (PEM) [default: a generated development certificate].
    #[arg(long, env = "GATEWAY_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, env = "GATEWAY_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// Where the development CA and server certificate are generated [default: certs].
    #[arg(long, env = "GATEWAY_CERTS_DIR", value_name = "DIR")]
    pub certs_dir: Option<PathBuf>,
    /// CA (PEM) whose client certificates authenticate devices: mutual TLS, the device id in
    /// the subject's CN [default: none, client certificates not requested].
    #[arg(long, env = "GATEWAY_DEVICE_CA", value_name = "FILE")]
    pub device_ca: Option<PathBuf>,
    /// Origins browser devices may connect from, comma-separated (`https://app.example.com`);
    /// an upgrade with another `Origin` gets 403 [default: none, any origin].
    #[arg(
        long,
        env = "GATEWAY_ALLOWED_ORIGINS",
        value_name = "ORIGINS",
        value_delimiter = ','
    )]
    pub allowed_origins: Option<Vec<String>>,
    /// Operator API key [default: generated, kept in `api-key` beside the database].
    #[arg(
        long,
        env = "GATEWAY_API_KEY",
        value_name = "KEY",
        hide_env_values = true
    )]
    pub api_key: Option<String>,
    /// Serve the operator API over HTTPS with the device certificate.
    #[arg(long, env = "GATEWAY_API_TLS", num_args = 0..=1, default_missing_value = "true", value_parser = BoolishValueParser::new())]
    pub api_tls: Option<bool>,
    /// Plain ws:// for devices (only behind a TLS-terminating proxy).
    #[arg(long, env = "GATEWAY_NO_TLS", num_args = 0..=1, default_missing_value = "true", value_parser = BoolishValueParser::new())]
    pub no_tls: Option<bool>,
    /// SQLite durability: full (fsync per commit) or normal [default: full].
    #[arg(long, env = "GATEWAY_SYNCHRONOUS", value_name = "MODE")]
    pub synchronous: Option<Synchronous>,
    /// Largest device message in bytes [default: 65536].
    #[arg(long, env = "GATEWAY_MAX_MESSAGE_BYTES", value_name = "BYTES")]
    pub max_message_bytes: Option<usize>,
    /// Telemetry messages per second per device [default: 100].
    #[arg(long, env = "GATEWAY_TELEMETRY_RATE", value_name = "N")]
    pub telemetry_rate: Option<u32>,
    /// Telemetry burst per device [default: 200].
    #[arg(long, env = "GATEWAY_TELEMETRY_BURST", value_name = "N")]
    pub telemetry_burst: Option<u32>,
    /// Max connected devices [default: 100000].
    #[arg(long, env = "GATEWAY_MAX_CONNECTIONS", value_name = "N")]
    pub max_connections: Option<usize>,
    /// Max connections per client IP, 0 = no limit [default: 0].
    #[arg(long, env = "GATEWAY_MAX_CONNECTIONS_PER_IP", value_name = "N")]
    pub max_connections_per_ip: Option<usize>,
    /// Connections accepted but not yet through their TLS and upgrade handshakes, at most;
    /// past it new connections wait in the listen backlog [default: 1024].
    #[arg(long, env = "GATEWAY_MAX_HANDSHAKES", value_name = "N")]
    pub max_handshakes: Option<usize>,
    /// Connects per device per minute before 429 [default: 15].
    #[arg(long, env = "GATEWAY_DEVICE_CONNECTS_PER_MIN", value_name = "N")]
    pub device_connects_per_min: Option<u32>,
    /// TLS + upgrade handshake timeout [default: 10s].
    #[arg(long, env = "GATEWAY_HANDSHAKE_TIMEOUT", value_parser = parse_duration, value_name = "DURATION")]
    pub handshake_timeout: Option<Duration>,
    /// Server ping interval [default: 30s].
    #[arg(long, env = "GATEWAY_PING_INTERVAL", value_parser = parse_duration, value_name = "DURATION")]
    pub ping_interval: Option<Duration>,
    /// Close a connection silent for this long with 4008 [default: 90s].
    #[arg(long, env = "GATEWAY_IDLE_TIMEOUT", value_parser = parse_duration, value_name = "DURATION")]
    pub idle_timeout: Option<Duration>,
    /// Commands in flight per device [default: 8].
    #[arg(long, env = "GATEWAY_COMMAND_WINDOW", value_name = "N")]
    pub command_window: Option<u32>,
    /// Commands not yet final a device may have queued before creating more gets 429 [default: 1000].
    #[arg(long, env = "GATEWAY_COMMAND_QUEUE", value_name = "N")]
    pub command_queue: Option<u32>,
    /// Live events kept for `Last-Event-ID` resume [default: 10000].
    #[arg(long, env = "GATEWAY_EVENT_BUFFER", value_name = "N")]
    pub event_buffer: Option<usize>,
    /// Most telemetry rows one database transaction commits [default: 4000].
    #[arg(long, env = "GATEWAY_BATCH_MAX_ROWS", value_name = "N")]
    pub batch_max_rows: Option<usize>,
    /// How long the writer waits to fill a batch after its first row [default: 0ms].
    #[arg(long, env = "GATEWAY_BATCH_MAX_DELAY", value_parser = parse_duration, value_name = "DURATION")]
    pub batch_max_delay: Option<Duration>,
    /// Write jobs queued for the writer before sessions stop reading [default: 4096].
    #[arg(long, env = "GATEWAY_WRITER_QUEUE", value_name = "N")]
    pub writer_queue: Option<usize>,
    /// Size the SQLite WAL file is kept under, in bytes; checkpoints start at half of it [default: 67108864].
    #[arg(long, env = "GATEWAY_WAL_MAX_BYTES", value_name = "BYTES")]
    pub wal_max_bytes: Option<u64>,
    /// Time allowed for a graceful shutdown [default: 10s].
    #[arg(long, env = "GATEWAY_SHUTDOWN_GRACE", value_parser = parse_duration, value_name = "DURATION")]
    pub shutdown_grace: Option<Duration>,
    /// Log format on stderr: text or json [default: text].
    #[arg(long, env = "GATEWAY_LOG_FORMAT", value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,
    /// Conformance testing only: no device authentication, every message echoed back.
    #[cfg(feature = "conformance")]
    #[arg(long)]
    pub conformance_echo: bool,
}

/// The same settings as read from a TOML file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSettings {
    device_addr: Option<String>,
    api_addr: Option<String>,
    database_url: Option<String>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    certs_dir: Option<PathBuf>,
    device_ca: Option<PathBuf>,
    allowed_origins: Option<Vec<String>>,
    api_key: Option<String>,
    api_tls: Option<bool>,
    no_tls: Option<bool>,
    synchronous: Option<String>,
    max_message_bytes: Option<usize>,
    telemetry_rate: Option<u32>,
    telemetry_burst: Option<u32>,
    max_connections: Option<usize>,
    max_connections_per_ip: Option<usize>,
    max_handshakes: Option<usize>,
    device_connects_per_min: Option<u32>,
    handshake_timeout: Option<TomlDuration>,
    ping_interval: Option<TomlDuration>,
    idle_timeout: Option<TomlDuration>,
    command_window: Option<u32>,
    command_queue: Option<u32>,
    event_buffer: Option<usize>,
    batch_max_rows: Option<usize>,
    batch_max_delay: Option<TomlDuration>,
    writer_queue: Option<usize>,
    wal_max_bytes: Option<u64>,
    shutdown_grace: Option<TomlDuration>,
    log_format: Option<String>,
}

/// A duration in TOML: `"30s"` or a number of seconds.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum TomlDuration {
    Seconds(f64),
    Text(String),
}

/// The validated settings the gateway runs with.
#[derive(Debug, Clone)]
pub struct Settings {
    pub device_addr: SocketAddr,
    pub api_addr: SocketAddr,
    pub database_url: String,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub certs_dir: PathBuf,
    pub device_ca: Option<PathBuf>,
    /// Empty: any origin.
    pub allowed_origins: Vec<String>,
    pub api_key: Option<String>,
    pub api_tls: bool,
    pub no_tls: bool,
    pub synchronous: Synchronous,
    pub max_message_bytes: usize,
    pub telemetry_rate: u32,
    pub telemetry_burst: u32,
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    pub max_handshakes: usize,
    pub device_connects_per_min: u32,
    pub handshake_timeout: Duration,
    pub ping_interval: Duration,
    pub idle_timeout: Duration,
    pub command_window: u32,
    pub command_queue: u32,
    pub event_buffer: usize,
    pub batch_max_rows: usize,
    pub batch_max_delay: Duration,
    pub writer_queue: usize,
    pub wal_max_bytes: u64,
    pub shutdown_grace: Duration,
    pub log_format: LogFormat,
    /// Echo mode for the Autobahn suite (feature `conformance` only).
    #[cfg(feature = "conformance")]
    pub conformance_echo: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            device_addr: SocketAddr::from(([0, 0, 0, 0], 8443)),
            api_addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            database_url: "sqlite://data/gateway.db".into(),
            tls_cert: None,
            tls_key: None,
            certs_dir: PathBuf::from("certs"),
            device_ca: None,
            allowed_origins: Vec::new(),
            api_key: None,
            api_tls: false,
            no_tls: false,
            synchronous: Synchronous::Full,
            max_message_bytes: 65536,
            telemetry_rate: 100,
            telemetry_burst: 200,
            max_connections: 100_000,
            max_connections_per_ip: 0,
            max_handshakes: 1024,
            device_connects_per_min: 15,
            handshake_timeout: Duration::from_secs(10),
            ping_interval: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(90),
            command_window: 8,
            command_queue: 1000,
            event_buffer: 10_000,
            batch_max_rows: 4000,
            batch_max_delay: Duration::ZERO,
            writer_queue: 4096,
            wal_max_bytes: crate::store::DEFAULT_WAL_MAX_BYTES,
            shutdown_grace: Duration::from_secs(10),
            log_format: LogFormat::Text,
            #[cfg(feature = "conformance")]
            conformance_echo: false,
        }
    }
}

/// The smallest WAL limit: below it the WAL would be checkpointed every few commits.
const MIN_WAL_MAX_BYTES: u64 = 1 << 20;

fn invalid(setting: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        setting,
        message: message.into(),
    }
}

fn file_value<T: FromStr>(
    setting: &'static str,
    raw: Option<String>,
) -> Result<Option<T>, ConfigError>
where
    T::Err: std::fmt::Display,
{
    raw.map(|s| s.parse::<T>().map_err(|e| invalid(setting, e.to_string())))
        .transpose()
}

fn file_duration(
    setting: &'static str,
    raw: Option<TomlDuration>,
) -> Result<Option<Duration>, ConfigError> {
    raw.map(|d| match d {
        TomlDuration::Seconds(s) => parse_duration(&s.to_string()),
        TomlDuration::Text(t) => parse_duration(&t),
    })
    .transpose()
    .map_err(|e| invalid(setting, e))
}

fn read_file(path: &Path) -> Result<FileSettings, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Toml {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

impl Settings {
    /// Merges flags/environment over the TOML file over the defaults, then validates.
    pub fn load(args: ServeArgs) -> Result<Settings, ConfigError> {
        let file = match &args.config {
            Some(path) => read_file(path)?,
            None => FileSettings::default(),
        };
        let d = Settings::default();
        let settings = Settings {
            device_addr: args
                .device_addr
                .or(file_value("device_addr", file.device_addr)?)
                .unwrap_or(d.device_addr),
            api_addr: args
                .api_addr
                .or(file_value("api_addr", file.api_addr)?)
                .unwrap_or(d.api_addr),
            database_url: args
                .database_url
                .or(file.database_url)
                .unwrap_or(d.database_url),
            tls_cert: args.tls_cert.or(file.tls_cert),
            tls_key: args.tls_key.or(file.tls_key),
            certs_dir: args.certs_dir.or(file.certs_dir).unwrap_or(d.certs_dir),
            device_ca: args.device_ca.or(file.device_ca),
            allowed_origins: args
                .allowed_origins
                .or(file.allowed_origins)
                .unwrap_or(d.allowed_origins)
                .into_iter()
                .map(|o| o.trim().trim_end_matches('/').to_ascii_lowercase())
                .filter(|o| !o.is_empty())
                .collect(),
            api_key: args.api_key.or(file.api_key),
            api_tls: args.api_tls.or(file.api_tls).unwrap_or(d.api_tls),
            no_tls: args.no_tls.or(file.no_tls).unwrap_or(d.no_tls),
            synchronous: args
                .synchronous
                .or(file_value("synchronous", file.synchronous)?)
                .unwrap_or(d.synchronous),
            max_message_bytes: args
                .max_message_bytes
                .or(file.max_message_bytes)
                .unwrap_or(d.max_message_bytes),
            telemetry_rate: args
                .telemetry_rate
                .or(file.telemetry_rate)
                .unwrap_or(d.telemetry_rate),
            telemetry_burst: args
                .telemetry_burst
                .or(file.telemetry_burst)
                .unwrap_or(d.telemetry_burst),
            max_connections: args
                .max_connections
                .or(file.max_connections)
                .unwrap_or(d.max_connections),
            max_connections_per_ip: args
                .max_connections_per_ip
                .or(file.max_connections_per_ip)
                .unwrap_or(d.max_connections_per_ip),
            max_handshakes: args
                .max_handshakes
                .or(file.max_handshakes)
                .unwrap_or(d.max_handshakes),
            device_connects_per_min: args
                .device_connects_per_min
                .or(file.device_connects_per_min)
                .unwrap_or(d.device_connects_per_min),
            handshake_timeout: args
                .handshake_timeout
                .or(file_duration("handshake_timeout", file.handshake_timeout)?)
                .unwrap_or(d.handshake_timeout),
            ping_interval: args
                .ping_interval
                .or(file_duration("ping_interval", file.ping_interval)?)
                .unwrap_or(d.ping_interval),
            idle_timeout: args
                .idle_timeout
                .or(file_duration("idle_timeout", file.idle_timeout)?)
                .unwrap_or(d.idle_timeout),
            command_window: args
                .command_window
                .or(file.command_window)
                .unwrap_or(d.command_window),
            command_queue: args
                .command_queue
                .or(file.command_queue)
                .unwrap_or(d.command_queue),
            event_buffer: args
                .event_buffer
                .or(file.event_buffer)
                .unwrap_or(d.event_buffer),
            batch_max_rows: args
                .batch_max_rows
                .or(file.batch_max_rows)
                .unwrap_or(d.batch_max_rows),
            batch_max_delay: args
                .batch_max_delay
                .or(file_duration("batch_max_delay", file.batch_max_delay)?)
                .unwrap_or(d.batch_max_delay),
            writer_queue: args
                .writer_queue
                .or(file.writer_queue)
                .unwrap_or(d.writer_queue),
            wal_max_bytes: args
                .wal_max_bytes
                .or(file.wal_max_bytes)
                .unwrap_or(d.wal_max_bytes),
            shutdown_grace: args
                .shutdown_grace
                .or(file_duration("shutdown_grace", file.shutdown_grace)?)
                .unwrap_or(d.shutdown_grace),
            log_format: args
                .log_format
                .or(file_value("log_format", file.log_format)?)
                .unwrap_or(d.log_format),
            #[cfg(feature = "conformance")]
            conformance_echo: args.conformance_echo,
        };
        settings.validate()?;
        Ok(settings)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err(invalid(
                "tls_cert/tls_key",
                "set both the certificate chain and its key, or neither",
            ));
        }
        if self.device_ca.is_some() && self.no_tls {
            return Err(invalid(
                "device_ca",
                "mutual TLS needs TLS: drop no_tls, or drop device_ca",
            ));
        }
        if let Some(bad) = self
            .allowed_origins
            .iter()
            .find(|o| !(o.starts_with("http://") || o.starts_with("https://")) || o.contains(' '))
        {
            return Err(invalid(
                "allowed_origins",
                format!("`{bad}` is not an origin like https://app.example.com"),
            ));
        }
        if !self.database_url.starts_with("sqlite:") {
            return Err(invalid(
                "database_url",
                "only sqlite:// URLs are supported (e.g. sqlite://data/gateway.db)",
            ));
        }
        if self.database_url.contains(":memory:") || self.database_url.contains("mode=memory") {
            return Err(invalid(
                "database_url",
                "an in-memory database cannot keep the promise an ack makes; use a file",
            ));
        }
        if !(128..=16 * 1024 * 1024).contains(&self.max_message_bytes) {
            return Err(invalid(
                "max_message_bytes",
                "must be between 128 and 16777216",
            ));
        }
        if self.telemetry_rate == 0 {
            return Err(invalid("telemetry_rate", "must be at least 1"));
        }
        if self.telemetry_burst < 1 {
            return Err(invalid("telemetry_burst", "must be at least 1"));
        }
        if self.max_connections == 0 {
            return Err(invalid("max_connections", "must be at least 1"));
        }
        if self.max_handshakes == 0 {
            return Err(invalid("max_handshakes", "must be at least 1"));
        }
        if self.ping_interval.is_zero() {
            return Err(invalid("ping_interval", "must be greater than zero"));
        }
        if self.idle_timeout <= self.ping_interval {
            return Err(invalid(
                "idle_timeout",
                "must be longer than ping_interval, or healthy devices are closed between pings",
            ));
        }
        if self.handshake_timeout.is_zero() {
            return Err(invalid("handshake_timeout", "must be greater than zero"));
        }
        if self.command_window == 0 {
            return Err(invalid("command_window", "must be at least 1"));
        }
        if self.command_queue == 0 {
            return Err(invalid("command_queue", "must be at least 1"));
        }
        if self.event_buffer == 0 {
            return Err(invalid("event_buffer", "must be at least 1"));
        }
        if self.batch_max_rows == 0 {
            return Err(invalid("batch_max_rows", "must be at least 1"));
        }
        if self.writer_queue == 0 {
            return Err(invalid("writer_queue", "must be at least 1"));
        }
        if self.wal_max_bytes < MIN_WAL_MAX_BYTES {
            return Err(invalid(
                "wal_max_bytes",
                format!("must be at least {MIN_WAL_MAX_BYTES} (1 MiB)"),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_in_every_form() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration("15").unwrap(), Duration::from_secs(15));
        assert_eq!(parse_duration("1.5").unwrap(), Duration::from_millis(1500));
        assert!(parse_duration("").is_err());
        assert!(parse_duration("10 parsecs").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn defaults_match_the_contract() {
        let s = Settings::load(ServeArgs::default()).unwrap();
        assert_eq!(s.device_addr.to_string(), "0.0.0.0:8443");
        assert_eq!(s.api_addr.to_string(), "127.0.0.1:8080");
        assert_eq!(s.database_url, "sqlite://data/gateway.db");
        assert_eq!(s.synchronous, Synchronous::Full);
        assert_eq!(s.max_message_bytes, 65536);
        assert_eq!((s.telemetry_rate, s.telemetry_burst), (100, 200));
        assert_eq!(s.max_connections, 100_000);
        assert_eq!(s.device_connects_per_min, 15);
        assert_eq!(s.ping_interval, Duration::from_secs(30));
        assert_eq!(s.idle_timeout, Duration::from_secs(90));
        assert_eq!(s.command_window, 8);
        assert_eq!(s.wal_max_bytes, 64 << 20);
    }

    #[test]
    fn flags_beat_the_file_which_beats_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gateway.toml");
        std::fs::write(
            &path,
            "api_addr = \"127.0.0.1:9999\"\nmax_message_bytes = 1024\nidle_timeout = \"2m\"\nsynchronous = \"normal\"\n",
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(path),
            max_message_bytes: Some(2048),
            ..ServeArgs::default()
        };
        let s = Settings::load(args).unwrap();
        assert_eq!(s.api_addr.to_string(), "127.0.0.1:9999");
        assert_eq!(s.max_message_bytes, 2048);
        assert_eq!(s.idle_timeout, Duration::from_secs(120));
        assert_eq!(s.synchronous, Synchronous::Normal);
    }

    #[test]
    fn invalid_settings_name_the_setting() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, "synchronous = \"sometimes\"\n").unwrap();
        let err = Settings::load(ServeArgs {
            config: Some(path),
            ..ServeArgs::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("synchronous"), "{err}");

        let err = Settings::load(ServeArgs {
            ping_interval: Some(Duration::from_secs(60)),
            idle_timeout: Some(Duration::from_secs(30)),
            ..ServeArgs::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("idle_timeout"), "{err}");

        let err = Settings::load(ServeArgs {
            wal_max_bytes: Some(4096),
            ..ServeArgs::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("wal_max_bytes"), "{err}");
    }

    #[test]
    fn origins_are_normalized_and_mutual_tls_needs_tls() {
        let settings = Settings::load(ServeArgs {
            allowed_origins: Some(vec![
                "https://Console.example.com/".into(),
                " http://localhost:3000".into(),
            ]),
            ..ServeArgs::default()
        })
        .unwrap();
        assert_eq!(
            settings.allowed_origins,
            ["https://console.example.com", "http://localhost:3000"]
        );
        let err = Settings::load(ServeArgs {
            allowed_origins: Some(vec!["console.example.com".into()]),
            ..ServeArgs::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("allowed_origins"), "{err}");
        let err = Settings::load(ServeArgs {
            device_ca: Some("ca.pem".into()),
            no_tls: Some(true),
            ..ServeArgs::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("device_ca"), "{err}");
    }

    /// The conformance echo mode (no authentication) is not even a flag in a default build.
    #[cfg(not(feature = "conformance"))]
    #[test]
    fn no_conformance_echo_flag_in_a_default_build() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            serve: ServeArgs,
        }
        assert!(Cli::try_parse_from(["gateway", "--no-tls"]).is_ok());
        let err = Cli::try_parse_from(["gateway", "--conformance-echo"])
            .err()
            .expect("--conformance-echo is refused");
        assert_eq!(err.kind(), clap::error::ErrorKind::UnknownArgument);
    }
}
