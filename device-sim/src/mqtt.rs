//! `device-sim bench-mqtt`: the `bench` load against an MQTT broker instead of the gateway, for
//! the benchmark's transport ceiling (Mosquitto). Each client publishes the same ~200-byte JSON
//! with QoS 1 over MQTT 3.1.1 on a TLS WebSocket, keeping `--inflight` publishes without their
//! PUBACK; a PUBACK counts as the ack. Throughput, latency, table and `--json` are `bench`'s.
//!
//! The MQTT client is `rumqttc`. Its event loop is not cancel-safe, so it is never raced against
//! a timer: each client's task publishes through the (never full) request channel, polls the
//! event loop itself, and looks at the clock after every event; only the last deadline (no
//! PUBACK within the drain time) drops a poll, and the connection with it. Polling in the same
//! task keeps the client's CPU per message near `bench`'s, which shares the machine with the
//! server being measured.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS,
    TlsConfiguration, Transport,
};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::{sleep_until, timeout_at, Instant};

use crate::bench::{self, DeviceReport, Limits, Plan};
use crate::cli::{BenchMqttArgs, Common};
use crate::proto;
use crate::stats::ErrorTally;
use crate::tls;
use crate::tokens;

/// How long one client may take to get its CONNACK.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);
/// MQTT keep-alive: the broker must hear from an idle client this often.
const KEEP_ALIVE: Duration = Duration::from_secs(60);

/// Runs the benchmark; `Ok(false)` means it ran but saw errors.
pub async fn bench_mqtt(common: &Common, args: &BenchMqttArgs) -> Result<bool> {
    let load = &args.load;
    if load.inflight == 0 || load.duration.is_zero() {
        bail!("--inflight and --duration must be positive");
    }
    if load.inflight > usize::from(u16::MAX / 2) {
        bail!("--inflight must be at most {}", u16::MAX / 2);
    }
    if load.sharding.processes.is_some_and(|n| n > 1) || load.sharding.shard.is_some() {
        bail!("bench-mqtt runs in one process (--processes is not supported)");
    }
    let broker = Broker::new(common, load.inflight, load.payload_bytes)?;
    let ids = tokens::device_ids(&common.prefix, load.devices)?;
    let tally = Arc::new(ErrorTally::default());
    let started = Instant::now();
    let clients = connect_all(&broker, ids, common.connect_concurrency, &tally).await;
    if clients.is_empty() {
        bail!("no client could connect to {}", common.url);
    }
    eprintln!(
        "bench-mqtt: {}/{} clients connected to {} in {:.2}s",
        clients.len(),
        load.devices,
        common.url,
        started.elapsed().as_secs_f64()
    );
    let connected = clients.len();
    let plan = Plan::starting_at(
        Instant::now() + Duration::from_millis(100),
        load.warmup,
        load.duration,
    );
    let histogram = bench::latency_histogram()?;
    let boot = bench::unix_ms();
    let mut running = JoinSet::new();
    for client in clients {
        let publisher = Publisher {
            topic: format!("{}/{}", args.topic_prefix, client.id),
            boot,
            inflight: load.inflight,
            payload_bytes: load.payload_bytes,
            plan,
            tally: tally.clone(),
            report: DeviceReport::new(histogram.clone()),
        };
        running.spawn(publisher.drive(client));
    }
    let mut total = DeviceReport::new(histogram);
    while let Some(joined) = running.join_next().await {
        match joined {
            Ok(report) => total.merge(&report)?,
            Err(e) => tally.record("internal: client task failed", e),
        }
    }
    bench::finish(load, connected, &total, &tally, Limits::default())
}

/// Where the clients connect and how.
struct Broker {
    url: String,
    port: u16,
    transport: Transport,
    inflight: u16,
    max_packet: usize,
}

impl Broker {
    /// From `--url` (`wss://` or `ws://`, any path) and `--ca`.
    fn new(common: &Common, inflight: usize, payload_bytes: usize) -> Result<Broker> {
        let uri: tokio_tungstenite::tungstenite::http::Uri = common
            .url
            .parse()
            .with_context(|| format!("--url `{}` is not a URL", common.url))?;
        let transport = match uri.scheme_str() {
            Some("wss") => {
                let roots = Arc::new(tls::roots(&common.ca)?);
                let config = tls::client_config(roots, None)?;
                Transport::wss_with_config(TlsConfiguration::Rustls(Arc::new(config)))
            }
            Some("ws") => Transport::Ws,
            _ => bail!("--url `{}` must start with wss:// or ws://", common.url),
        };
        let port = uri.port_u16().context("--url needs an explicit port")?;
        Ok(Broker {
            url: common.url.clone(),
            port,
            transport,
            inflight: rumqttc_inflight(inflight),
            max_packet: payload_bytes + 1024,
        })
    }

    fn options(&self, id: &str) -> MqttOptions {
        let mut options = MqttOptions::new(id, &self.url, self.port);
        options
            .set_transport(self.transport.clone())
            .set_keep_alive(KEEP_ALIVE)
            .set_clean_session(true)
            .set_inflight(self.inflight)
            .set_max_packet_size(self.max_packet, self.max_packet)
            // Never the limit: the publisher keeps at most `inflight` requests outstanding.
            .set_request_channel_capacity(usize::from(self.inflight) + 16);
        options
    }
}

/// rumqttc's own in-flight limit, above ours: packet ids cycle through 1..=limit, and a broker
/// acking out of order must not make a new publish collide with one still in flight.
fn rumqttc_inflight(ours: usize) -> u16 {
    u16::try_from(ours.saturating_mul(2).max(10)).unwrap_or(u16::MAX)
}

/// A connected client: its handle and its event loop.
struct Client {
    id: String,
    client: AsyncClient,
    event_loop: EventLoop,
}

/// Connects every client first (bounded), so connection setup does not blur the measurement.
async fn connect_all(
    broker: &Broker,
    ids: Vec<String>,
    concurrency: usize,
    tally: &Arc<ErrorTally>,
) -> Vec<Client> {
    let permits = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut connecting = JoinSet::new();
    for id in ids {
        let options = broker.options(&id);
        let (permits, tally) = (permits.clone(), tally.clone());
        let channel = usize::from(broker.inflight) + 16;
        connecting.spawn(async move {
            let _permit = permits.acquire_owned().await.ok()?;
            match connect(id.clone(), options, channel).await {
                Ok(client) => Some(client),
                Err(e) => {
                    tally.record(
                        &format!("connect: {}", error_kind(&e)),
                        format!("{id}: {e}"),
                    );
                    None
                }
            }
        });
    }
    let mut clients = Vec::new();
    while let Some(joined) = connecting.join_next().await {
        match joined {
            Ok(Some(client)) => clients.push(client),
            Ok(None) => {}
            Err(e) => tally.record("internal: connect task failed", e),
        }
    }
    clients
}

/// Opens one client: its event loop is polled until the CONNACK.
async fn connect(id: String, options: MqttOptions, channel: usize) -> Result<Client, ConnectError> {
    let (client, mut event_loop) = AsyncClient::new(options, channel);
    let mut network = rumqttc::NetworkOptions::new();
    network.set_tcp_nodelay(true);
    network.set_connection_timeout(CONNECT_TIMEOUT.as_secs());
    event_loop.set_network_options(network);
    let connack = tokio::time::timeout(CONNECT_TIMEOUT, async {
        loop {
            match event_loop.poll().await? {
                Event::Incoming(Packet::ConnAck(ack)) => return Ok(ack),
                _ => continue,
            }
        }
    })
    .await
    .map_err(|_| ConnectError::Timeout)?
    .map_err(ConnectError::Mqtt)?;
    if connack.code != rumqttc::ConnectReturnCode::Success {
        return Err(ConnectError::Refused(format!("{:?}", connack.code)));
    }
    Ok(Client {
        id,
        client,
        event_loop,
    })
}

/// Why a client could not connect.
#[derive(Debug, thiserror::Error)]
enum ConnectError {
    #[error("timed out")]
    Timeout,
    #[error("CONNACK refused: {0}")]
    Refused(String),
    #[error("{0}")]
    Mqtt(ConnectionError),
}

/// A short label for counting failures by kind.
fn error_kind(error: &ConnectError) -> &'static str {
    match error {
        ConnectError::Timeout => "timeout",
        ConnectError::Refused(_) | ConnectError::Mqtt(ConnectionError::ConnectionRefused(_)) => {
            "refused"
        }
        ConnectError::Mqtt(ConnectionError::Io(_)) => "tcp",
        ConnectError::Mqtt(ConnectionError::Tls(_)) => "tls",
        ConnectError::Mqtt(ConnectionError::Websocket(_)) => "websocket",
        ConnectError::Mqtt(_) => "mqtt",
    }
}

/// One client under load.
struct Publisher {
    topic: String,
    boot: u64,
    inflight: usize,
    payload_bytes: usize,
    plan: Plan,
    tally: Arc<ErrorTally>,
    report: DeviceReport,
}

/// Publishes waiting for their packet id (in order), and those in flight by packet id.
#[derive(Default)]
struct InFlight {
    unnumbered: VecDeque<Instant>,
    numbered: HashMap<u16, Instant>,
}

impl InFlight {
    fn len(&self) -> usize {
        self.unnumbered.len() + self.numbered.len()
    }

    /// The event loop wrote the oldest unnumbered publish with `pkid`; false if there was none.
    fn numbered(&mut self, pkid: u16) -> bool {
        match self.unnumbered.pop_front() {
            Some(sent_at) => {
                self.numbered.insert(pkid, sent_at);
                true
            }
            None => false,
        }
    }

    /// The send time of the publish `pkid` acknowledges.
    fn acked(&mut self, pkid: u16) -> Option<Instant> {
        self.numbered.remove(&pkid)
    }
}

impl Publisher {
    /// Keeps `inflight` publishes without PUBACK until the window closes, then collects the rest.
    async fn drive(mut self, mut client: Client) -> DeviceReport {
        let id = client.id.clone();
        let mut in_flight = InFlight::default();
        sleep_until(self.plan.start).await;
        let ended = timeout_at(
            self.plan.drain_until,
            self.load(&id, &mut client, &mut in_flight),
        )
        .await;
        let healthy = match ended {
            Ok(healthy) => healthy,
            Err(_) => {
                self.tally.record(
                    "unacked at the end",
                    format!(
                        "{id}: {} publishes had no PUBACK {:?} after the window closed",
                        in_flight.len(),
                        bench::DRAIN
                    ),
                );
                false
            }
        };
        self.report.unacked += in_flight.len() as u64;
        if healthy {
            // Best effort: a DISCONNECT, and a moment for it to leave.
            if client.client.try_disconnect().is_ok() {
                let _ = tokio::time::timeout(Duration::from_secs(1), async {
                    while client.event_loop.poll().await.is_ok() {}
                })
                .await;
            }
        }
        self.report
    }

    /// Publishes until the window closes and every PUBACK is in; false when the connection failed.
    async fn load(&mut self, id: &str, client: &mut Client, in_flight: &mut InFlight) -> bool {
        let mut next_seq = 0;
        let mut sending = true;
        loop {
            while sending && in_flight.len() < self.inflight {
                let text = self.message(id, next_seq);
                next_seq += 1;
                let sent_at = Instant::now();
                // The channel holds more than `inflight` requests: this never waits.
                let published =
                    client
                        .client
                        .try_publish(&self.topic, QoS::AtLeastOnce, false, text);
                if let Err(e) = published {
                    self.tally.record("connection lost", format!("{id}: {e}"));
                    return false;
                }
                in_flight.unnumbered.push_back(sent_at);
                self.report.sent += 1;
            }
            if !sending && in_flight.len() == 0 {
                return true;
            }
            let event = client.event_loop.poll().await;
            let at = Instant::now();
            match event {
                Ok(event) => self.on_event(id, event, at, in_flight),
                Err(e) => {
                    self.tally.record("connection lost", format!("{id}: {e}"));
                    return false;
                }
            }
            if at >= self.plan.measure_until {
                sending = false;
            }
        }
    }

    /// The payload: the same telemetry JSON `bench` sends the gateway.
    fn message(&self, client: &str, seq: u64) -> String {
        let id = proto::message_id(client, self.boot, seq);
        bench::bench_message(&id, &proto::now_rfc3339(), seq, self.payload_bytes)
    }

    fn on_event(&mut self, id: &str, event: Event, at: Instant, in_flight: &mut InFlight) {
        match event {
            Event::Outgoing(Outgoing::Publish(pkid)) => {
                let expected = in_flight.numbered(pkid);
                if !expected {
                    self.tally.record(
                        "internal: unexpected publish",
                        format!("{id}: packet {pkid}"),
                    );
                }
            }
            Event::Incoming(Packet::PubAck(ack)) => match in_flight.acked(ack.pkid) {
                Some(sent_at) if self.plan.in_window(at) => {
                    self.report.acked_in_window += 1;
                    let micros = (at - sent_at)
                        .as_micros()
                        .min(u128::from(bench::MAX_LATENCY_US))
                        as u64;
                    self.report.latency_us.saturating_record(micros.max(1));
                }
                Some(_) => {}
                None => self.tally.record(
                    "unexpected puback",
                    format!("{id}: PUBACK for packet {}, not in flight", ack.pkid),
                ),
            },
            Event::Incoming(Packet::Disconnect) => {
                self.tally
                    .record("closed by the broker", format!("{id}: DISCONNECT"));
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publishes_get_their_packet_ids_in_order_and_leave_on_their_puback() {
        let mut in_flight = InFlight::default();
        let (a, b) = (Instant::now(), Instant::now() + Duration::from_millis(5));
        in_flight.unnumbered.extend([a, b]);
        assert!(in_flight.numbered(7));
        assert!(in_flight.numbered(8));
        assert!(
            !in_flight.numbered(9),
            "no publish was waiting for a packet id"
        );
        assert_eq!(in_flight.len(), 2);
        assert_eq!(in_flight.acked(8), Some(b));
        assert_eq!(in_flight.acked(8), None, "a PUBACK counts once");
        assert_eq!(in_flight.acked(7), Some(a));
        assert_eq!(in_flight.len(), 0);
    }

    #[test]
    fn the_clients_own_limit_leaves_room_for_out_of_order_acks() {
        assert_eq!(rumqttc_inflight(8), 16);
        assert_eq!(rumqttc_inflight(1), 10);
        assert_eq!(rumqttc_inflight(40_000), u16::MAX);
    }
}
