//! The operator CLI (`gateway devices|commands|telemetry|events`): a client of the HTTP API.
//!
//! It talks to the gateway only over the operator API, like any other script would:
//! [`client`] is the HTTP side (URL, key, CA, errors, paging, Server-Sent Events),
//! [`output`] renders tables, `key: value` views and JSON, and each resource has its
//! own file. Every failure becomes one line on stderr and an exit code from
//! [`EXIT_CODES`].

pub mod certs;
mod client;
mod commands;
mod devices;
mod events;
mod output;
mod telemetry;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::Value;

use client::Client;

/// The exit codes, as `--help` and the README state them.
pub const EXIT_CODES: &str = "\
Exit codes of the client commands (devices, commands, telemetry, events):
  0  success
  1  the API answered with an error (stderr: `gateway: <status> <error code>: <message>`)
  2  usage error (bad flags or arguments, no API key)
  3  the API could not be reached (connection refused, TLS failure, timeout)
  4  commands send --wait: the command ended in a final status other than `succeeded`
  5  commands send --wait: the wait ran out before the command was final
Every failure prints a single line on stderr.";

/// The client subcommands; `main` flattens them next to `serve`.
#[derive(Debug, Subcommand)]
pub enum ClientCommand {
    /// Manage devices: create, list, show, disable, enable, delete, rotate-token.
    #[command(after_long_help = EXIT_CODES)]
    Devices(devices::DevicesArgs),
    /// Send commands to devices, list, show and cancel them.
    #[command(after_long_help = EXIT_CODES)]
    Commands(commands::CommandsArgs),
    /// Show a device's telemetry, oldest first; --follow streams new points.
    #[command(after_long_help = EXIT_CODES)]
    Telemetry(telemetry::TelemetryArgs),
    /// Stream live events (telemetry, connects, disconnects, command updates) until Ctrl-C.
    #[command(after_long_help = EXIT_CODES)]
    Events(events::EventsArgs),
}

/// How to reach the API; accepted by every client subcommand, before or after its action.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Connection and output")]
pub struct Connection {
    /// Operator API URL, as the gateway prints it after `api=` (with or without `/v1`).
    #[arg(
        long,
        env = "GATEWAY_API_URL",
        value_name = "URL",
        default_value = "http://127.0.0.1:8080/v1",
        global = true
    )]
    api_url: String,
    /// Operator API key [default: the file data/api-key, where a default gateway keeps it].
    #[arg(
        long,
        env = "GATEWAY_API_KEY",
        value_name = "KEY",
        hide_env_values = true,
        global = true
    )]
    api_key: Option<String>,
    /// CA certificate (PEM) to trust for an https:// API [default: certs/ca.pem if it exists].
    #[arg(long, env = "GATEWAY_CA", value_name = "FILE", global = true)]
    ca: Option<PathBuf>,
    /// Print the API's JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
}

/// Why a client command failed; each kind has its exit code.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The API answered with an error status.
    #[error("{status} {code}: {message}")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
    /// The API answered, but not with what the contract says.
    #[error("unexpected answer from the API: {0}")]
    BadResponse(String),
    /// Something the user has to fix in how the command was called.
    #[error("{0}")]
    Usage(String),
    /// No answer: connection refused, TLS failure, timeout, connection lost.
    #[error("cannot reach the API at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    /// `commands send --wait`: the command ended, but not in `succeeded`.
    #[error("{0}")]
    CommandNotSucceeded(String),
    /// `commands send --wait`: the wait ran out first.
    #[error("{0}")]
    StillPending(String),
    /// stdout could not be written.
    #[error("cannot write to stdout: {0}")]
    Stdout(std::io::Error),
}

impl CliError {
    /// The process exit code for this failure.
    fn exit_code(&self) -> u8 {
        match self {
            CliError::Api { .. } | CliError::BadResponse(_) | CliError::Stdout(_) => 1,
            CliError::Usage(_) => 2,
            CliError::Unreachable { .. } => 3,
            CliError::CommandNotSucceeded(_) => 4,
            CliError::StillPending(_) => 5,
        }
    }
}

/// Runs one client command and turns its outcome into an exit code (printing the error line).
pub fn run(command: ClientCommand) -> ExitCode {
    // Scripts read stderr as one line: even a bug says so on one line, without a backtrace.
    std::panic::set_hook(Box::new(|info| {
        eprintln!("gateway: internal error: {}", one_line(&info.to_string()));
    }));
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("gateway: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(command)) {
        Ok(()) => ExitCode::SUCCESS,
        // A reader that went away (`gateway events | head -1`) is not a failure.
        Err(CliError::Stdout(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gateway: {}", one_line(&e.to_string()));
            ExitCode::from(e.exit_code())
        }
    }
}

async fn dispatch(command: ClientCommand) -> Result<(), CliError> {
    match command {
        ClientCommand::Devices(args) => {
            let client = Client::connect(&args.conn)?;
            devices::run(&client, args.conn.json, args.action).await
        }
        ClientCommand::Commands(args) => {
            let client = Client::connect(&args.conn)?;
            commands::run(&client, args.conn.json, args.action).await
        }
        ClientCommand::Telemetry(args) => {
            let client = Client::connect(&args.conn)?;
            telemetry::run(&client, args.conn.json, &args).await
        }
        ClientCommand::Events(args) => {
            let client = Client::connect(&args.conn)?;
            events::run(&client, args.conn.json, &args).await
        }
    }
}

/// Collapses whitespace runs (newlines included) so an error stays on one line.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// clap parser for `500ms`, `30s`, `2m`, `1h` or plain seconds (the gateway's own syntax).
fn parse_duration(text: &str) -> Result<Duration, String> {
    gateway::config::parse_duration(text)
}

/// A duration as the API's whole seconds, rounded up so that `500ms` still waits.
fn whole_seconds(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// clap parser for a JSON argument (`--params`).
fn parse_json(text: &str) -> Result<Value, String> {
    serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))
}

/// clap parser for a JSON object argument (`--metadata`).
fn parse_json_object(text: &str) -> Result<Value, String> {
    match parse_json(text)? {
        v @ Value::Object(_) => Ok(v),
        _ => Err("must be a JSON object, e.g. '{\"site\":\"north\"}'".to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_become_whole_seconds_rounded_up() {
        let secs = |s: &str| whole_seconds(parse_duration(s).unwrap());
        assert_eq!(secs("10s"), 10);
        assert_eq!(secs("10"), 10);
        assert_eq!(secs("500ms"), 1);
        assert_eq!(secs("2m"), 120);
        assert_eq!(secs("1h"), 3600);
        assert_eq!(secs("0"), 0);
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn json_arguments() {
        assert_eq!(
            parse_json(r#"{"delay_s":5}"#).unwrap()["delay_s"],
            Value::from(5)
        );
        assert!(parse_json("{nope").is_err());
        assert!(parse_json_object("[1]").is_err());
        assert!(parse_json_object(r#"{"a":1}"#).is_ok());
    }

    #[test]
    fn errors_stay_on_one_line() {
        assert_eq!(one_line("a\n  b\tc \n"), "a b c");
        let e = CliError::Api {
            status: 404,
            code: "not_found".into(),
            message: "no device `x`".into(),
        };
        assert_eq!(e.to_string(), "404 not_found: no device `x`");
        assert_eq!(e.exit_code(), 1);
    }
}
