//! End-to-end test fixtures: the real `gateway` binary, real TLS, real WebSockets, a real SQLite file.
//!
//! # Layout
//! - [`gateway`]: build the binary once per test run, start it on free ports in a
//!   fresh directory, kill or terminate it, restart it on the same data.
//! - [`api`]: a small client for the operator HTTP API.
//! - [`browser`]: a real headless Chromium over WebDriver (chromedriver), for the web console.
//! - [`cli`]: the `gateway` binary run as the operator CLI, one-shot or streaming.
//! - [`device`]: a WebSocket device client over rustls that trusts the gateway's
//!   development CA, and sees handshake refusals as status + JSON body.
//! - [`db`]: the gateway's SQLite file opened directly (integrity check).
//! - [`checks`]: assertions shared by the tests (error bodies, time formats, polling).
//! - [`commands`]: create, read and wait on commands; receive and answer them as a device.
//! - [`sse`]: a Server-Sent Events client for the live event stream.
//! - [`raw`]: hand-made WebSocket frames (malformed ones too) on a raw connection, a TLS
//!   client's first flight as bytes, a stream that trickles what it writes.
//! - [`sim`]: the `device-sim` binary as a process, a relay that keeps the device address
//!   across gateway restarts, and checks of the series a simulated fleet stored.

pub mod api;
pub mod browser;
pub mod checks;
pub mod cli;
pub mod commands;
pub mod db;
pub mod device;
pub mod gateway;
pub mod raw;
pub mod sim;
pub mod sse;

pub use api::{Api, Resp};
pub use checks::{
    assert_api_error, assert_close_to_now, assert_error_body, assert_rfc3339_ms, eventually,
    fmt_ms, random_token, time_field, unique_id,
};
pub use cli::{Cli, CliOutput, CliProcess};
pub use device::{ConnectRequest, Device, Event, Handshake, RawConn, Refusal};
pub use gateway::{Gateway, Options, Stopped};
pub use raw::{Frame, RawEvent};
pub use serde_json::{json, Value};
