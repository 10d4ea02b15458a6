//! The device side: accept loop, upgrade handshake and authentication, one session task per device.

#[cfg(feature = "conformance")]
mod conformance;
pub mod handshake;
mod held_write;
pub mod limits;
pub mod listener;
pub mod protocol;
pub mod session;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::commands::Commands;
use crate::config::Settings;
use crate::events::Events;
use crate::hub::Hub;
use crate::store::writer::Writer;
use crate::store::Store;

/// What every device connection needs, shared.
#[derive(Debug)]
pub struct DeviceContext {
    pub settings: Arc<Settings>,
    pub store: Store,
    pub hub: Arc<Hub>,
    pub writer: Writer,
    pub commands: Arc<Commands>,
    pub events: Arc<Events>,
    pub limits: Arc<limits::Limits>,
    /// Cancelled on shutdown once the listener is closed: sessions close and handshakes in
    /// progress are refused.
    pub shutdown: CancellationToken,
}
