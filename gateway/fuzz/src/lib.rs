//! The gateway's pure parsers, compiled from the gateway's own source files for fuzzing.
//!
//! `#[path]` pulls in `src/device/protocol.rs` (the device message decoder),
//! `src/device/handshake.rs` (the upgrade head parser and its credentials) and
//! `src/time.rs` (which the decoder uses as `crate::time`) exactly as the gateway
//! builds them. Depending on the `gateway` crate instead would make cargo-fuzz
//! instrument and build its whole dependency tree (sqlx, axum, rustls, ...) with
//! sanitizer flags, minutes of CI for code the targets never call.

#![forbid(unsafe_code)]

#[allow(dead_code)]
#[path = "../../src/time.rs"]
pub mod time;

#[allow(dead_code)]
#[path = "../../src/device/protocol.rs"]
pub mod protocol;

#[allow(dead_code)]
#[path = "../../src/device/handshake.rs"]
pub mod handshake;
