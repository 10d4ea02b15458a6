//! `device-sim bench-mqtt`: the `bench` load against an MQTT broker instead of the gateway, for
//! the benchmark's transport ceiling (Mosquitto). Each client publishes the same ~200-byte JSON
//! with QoS 1 over MQTT 3.1.1 on a TLS WebSocket, keeping `--inflight` publishes without their
//! PUBACK; a PUBACK counts as the ack. Throughput, latency, table and `--json` are `bench`'s.
//!
//! The client shares the machine with the broker being measured, so it must cost what `bench`
//! costs per message: it is `bench`'s own transport (TCP, rustls, tungstenite, opened by
//! [`conn::open`] with the subprotocol `mqtt`) and `bench`'s loop, with MQTT packets (the few
//! of [`codec`]) as binary WebSocket messages instead of JSON text.

mod codec;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Result};
use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::task::JoinSet;
use tokio::time::{sleep_until, Instant};
use tokio_tungstenite::tungstenite::{self, Message};

use crate::bench::{self, DeviceReport, Limits, Plan};
use crate::cli::{BenchMqttArgs, Common};
use crate::conn::{self, Ws};
use crate::fleet::{self, Connector, CONNECT_TIMEOUT};
use crate::proto;
use crate::stats::ErrorTally;
use crate::tokens;
use codec::{DecodeError, Packet, CONNECTION_ACCEPTED};

/// The WebSocket subprotocol of MQTT (MQTT 3.1.1, 6.0).
const SUBPROTOCOL: &str = "mqtt";
/// MQTT keep-alive: the broker must hear from an idle client this often. A loaded client is
/// never idle (it publishes until the window closes, then drains for [`bench::DRAIN`]), so it
/// sends no PINGREQ.
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
    let connector = fleet::connector(common, load.devices).await?;
    let ids = tokens::device_ids(&common.prefix, load.devices)?;
    let tally = Arc::new(ErrorTally::default());
    let started = Instant::now();
    let clients = connect_all(&connector, ids, &tally).await;
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
            id: client.id,
            boot,
            inflight: load.inflight,
            payload_bytes: load.payload_bytes,
            plan,
            tally: tally.clone(),
            report: DeviceReport::new(histogram.clone()),
        };
        running.spawn(publisher.drive(client.ws, client.inbox));
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

/// A connected client: its WebSocket, and what it received after its CONNACK.
struct Client {
    id: String,
    ws: Ws,
    inbox: Inbox,
}

/// Connects every client first (`--connect-concurrency` at a time), so connection setup does
/// not blur the measurement.
async fn connect_all(
    connector: &Arc<Connector>,
    ids: Vec<String>,
    tally: &Arc<ErrorTally>,
) -> Vec<Client> {
    let mut connecting = JoinSet::new();
    for id in ids {
        let (connector, tally) = (connector.clone(), tally.clone());
        connecting.spawn(async move {
            let _permit = connector.permit().await;
            let connected = tokio::time::timeout(CONNECT_TIMEOUT, connect(&connector, &id))
                .await
                .unwrap_or(Err(ConnectError::Transport(conn::ConnectError::Timeout)));
            match connected {
                Ok((ws, inbox)) => Some(Client { id, ws, inbox }),
                Err(e) => {
                    tally.record(&e.kind(), format!("{id}: {e}"));
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

/// Opens the WebSocket, sends CONNECT (clean session) and waits for an accepting CONNACK.
async fn connect(connector: &Connector, id: &str) -> Result<(Ws, Inbox), ConnectError> {
    let mut ws = conn::open(connector.target(), id, None, SUBPROTOCOL)
        .await
        .map_err(ConnectError::Transport)?;
    let connect = Packet::Connect {
        client_id: id,
        keep_alive: KEEP_ALIVE.as_secs() as u16,
        clean_session: true,
    };
    ws.send(Message::binary(connect.to_vec()))
        .await
        .map_err(|e| ConnectError::Mqtt(format!("sending CONNECT: {e}")))?;
    let mut inbox = Inbox::default();
    loop {
        let frame = match ws.next().await {
            Some(Ok(Message::Binary(frame))) => frame,
            Some(Ok(Message::Close(frame))) => {
                let code = conn::close_code_of(&frame).unwrap_or(1005);
                return Err(ConnectError::Mqtt(format!(
                    "closed before the CONNACK (close code {code})"
                )));
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(ConnectError::Mqtt(format!("before the CONNACK: {e}"))),
            None => return Err(ConnectError::Mqtt("closed before the CONNACK".into())),
        };
        let mut answer = None;
        inbox
            .feed(&frame, |packet| {
                answer.get_or_insert(match packet {
                    Packet::ConnAck { code, .. } if code == CONNECTION_ACCEPTED => Ok(()),
                    Packet::ConnAck { code, .. } => Err(ConnectError::Refused(code)),
                    other => Err(ConnectError::Mqtt(format!(
                        "expected a CONNACK, got {other:?}"
                    ))),
                });
            })
            .map_err(|e| ConnectError::Mqtt(e.to_string()))?;
        if let Some(answer) = answer {
            return answer.map(|()| (ws, inbox));
        }
    }
}

/// Why a client could not connect.
#[derive(Debug, thiserror::Error)]
enum ConnectError {
    /// TCP, TLS or the WebSocket upgrade; a timeout of the whole connection too.
    #[error("{0}")]
    Transport(conn::ConnectError),
    #[error("CONNACK refused with return code {0}")]
    Refused(u8),
    #[error("{0}")]
    Mqtt(String),
}

impl ConnectError {
    /// A short label for counting failures by kind.
    fn kind(&self) -> String {
        match self {
            ConnectError::Transport(e) => e.kind(),
            ConnectError::Refused(_) => "connect: refused".into(),
            ConnectError::Mqtt(_) => "connect: mqtt".into(),
        }
    }
}

/// The bytes of a packet that straddles WebSocket messages (MQTT over WebSocket does not
/// promise one packet per message).
#[derive(Default)]
struct Inbox {
    partial: Vec<u8>,
}

impl Inbox {
    /// Hands `each` the packets `frame` completes, keeping a trailing partial packet.
    fn feed(&mut self, frame: &[u8], mut each: impl FnMut(Packet<'_>)) -> Result<(), DecodeError> {
        if self.partial.is_empty() {
            let used = each_packet(frame, &mut each)?;
            self.partial.extend_from_slice(&frame[used..]);
        } else {
            self.partial.extend_from_slice(frame);
            let used = each_packet(&self.partial, &mut each)?;
            self.partial.drain(..used);
        }
        Ok(())
    }
}

/// Decodes the whole packets at the start of `bytes`; how many bytes they took.
fn each_packet(bytes: &[u8], each: &mut impl FnMut(Packet<'_>)) -> Result<usize, DecodeError> {
    let mut used = 0;
    while let Some((packet, len)) = codec::decode(&bytes[used..])? {
        each(packet);
        used += len;
    }
    Ok(used)
}

/// Packet ids in turn (1, 2, ... 65535, 1, ...), skipping those still in flight.
struct PacketIds {
    next: u16,
}

impl Default for PacketIds {
    fn default() -> Self {
        PacketIds { next: 1 }
    }
}

impl PacketIds {
    /// The next id for which `in_flight` is false (there is one: at most half are in flight).
    fn take(&mut self, in_flight: impl Fn(u16) -> bool) -> u16 {
        loop {
            let id = self.next;
            self.next = self.next.checked_add(1).unwrap_or(1);
            if !in_flight(id) {
                return id;
            }
        }
    }
}

/// One client under load.
struct Publisher {
    id: String,
    topic: String,
    boot: u64,
    inflight: usize,
    payload_bytes: usize,
    plan: Plan,
    tally: Arc<ErrorTally>,
    report: DeviceReport,
}

impl Publisher {
    /// Keeps `inflight` publishes without PUBACK until the window closes, then collects the rest.
    async fn drive(mut self, mut ws: Ws, mut inbox: Inbox) -> DeviceReport {
        // Packet id and send time of each publish in flight.
        let mut pending: Vec<(u16, Instant)> = Vec::with_capacity(self.inflight);
        let mut ids = PacketIds::default();
        let mut next_seq = 0;
        let mut sending = true;
        let window_end = sleep_until(self.plan.measure_until);
        let drain_end = sleep_until(self.plan.drain_until);
        tokio::pin!(window_end, drain_end);

        sleep_until(self.plan.start).await;
        let mut healthy = true;
        'run: loop {
            if sending {
                let filled = self
                    .fill(&mut ws, &mut pending, &mut ids, &mut next_seq)
                    .await;
                if let Err(e) = filled {
                    self.tally
                        .record("connection lost", format!("{}: {e}", self.id));
                    healthy = false;
                    break;
                }
            }
            if !sending && pending.is_empty() {
                break;
            }
            tokio::select! {
                frame = ws.next() => {
                    // Frames that arrived together (a batch of PUBACKs) are all taken before
                    // the next fill, so the publishes they make room for go out in one write.
                    let mut frame = Some(frame);
                    while let Some(this) = frame {
                        if self.on_frame(this, &mut inbox, &mut pending, Instant::now()) {
                            healthy = false;
                            break 'run;
                        }
                        frame = ws.next().now_or_never();
                    }
                }
                _ = &mut window_end, if sending => sending = false,
                _ = &mut drain_end => {
                    self.tally.record("unacked at the end", format!("{}: {} publishes had no PUBACK {:?} after the window closed", self.id, pending.len(), bench::DRAIN));
                    break;
                }
            }
        }
        self.report.unacked += pending.len() as u64;
        if healthy {
            // Best effort: a DISCONNECT, then the WebSocket's close handshake.
            if ws
                .send(Message::binary(Packet::Disconnect.to_vec()))
                .await
                .is_ok()
            {
                conn::close(&mut ws).await;
            }
        }
        self.report
    }

    /// Publishes until `inflight` are without PUBACK.
    async fn fill(
        &mut self,
        ws: &mut Ws,
        pending: &mut Vec<(u16, Instant)>,
        ids: &mut PacketIds,
        next_seq: &mut u64,
    ) -> Result<(), tungstenite::Error> {
        if pending.len() >= self.inflight {
            return Ok(());
        }
        while pending.len() < self.inflight {
            let seq = *next_seq;
            *next_seq += 1;
            let message_id = proto::message_id(&self.id, self.boot, seq);
            let text =
                bench::bench_message(&message_id, &proto::now_rfc3339(), seq, self.payload_bytes);
            let pkid = ids.take(|id| pending.iter().any(|(p, _)| *p == id));
            let publish = Packet::Publish {
                topic: &self.topic,
                pkid: Some(pkid),
                payload: text.as_bytes(),
            };
            let sent_at = Instant::now();
            ws.feed(Message::binary(publish.to_vec())).await?;
            pending.push((pkid, sent_at));
            self.report.sent += 1;
        }
        // One write for all of them.
        ws.flush().await
    }

    /// Handles what the socket gave (a frame, an error or its end); true when the session ended.
    fn on_frame(
        &mut self,
        frame: Option<Result<Message, tungstenite::Error>>,
        inbox: &mut Inbox,
        pending: &mut Vec<(u16, Instant)>,
        now: Instant,
    ) -> bool {
        match frame {
            Some(Ok(Message::Binary(frame))) => {
                let mut closed = false;
                let fed = inbox.feed(&frame, |packet| {
                    closed |= self.on_packet(packet, pending, now);
                });
                match fed {
                    Err(e) => {
                        self.tally.record(
                            "malformed packet from the broker",
                            format!("{}: {e}", self.id),
                        );
                        true
                    }
                    Ok(()) => closed,
                }
            }
            Some(Ok(Message::Close(frame))) => {
                let code = conn::close_code_of(&frame).unwrap_or(1005);
                self.tally.record(
                    "closed by the broker",
                    format!("{} closed mid-benchmark (close code {code})", self.id),
                );
                true
            }
            Some(Ok(_)) => false,
            Some(Err(e)) => {
                self.tally
                    .record("connection lost", format!("{}: {e}", self.id));
                true
            }
            None => {
                self.tally.record(
                    "connection lost",
                    format!("{}: closed without a close frame", self.id),
                );
                true
            }
        }
    }

    /// Handles one packet from the broker; true when the broker ended the session.
    fn on_packet(
        &mut self,
        packet: Packet<'_>,
        pending: &mut Vec<(u16, Instant)>,
        now: Instant,
    ) -> bool {
        match packet {
            Packet::PubAck { pkid } => match take(pending, pkid) {
                Some(sent_at) if self.plan.in_window(now) => {
                    self.report.acked_in_window += 1;
                    let micros = (now - sent_at)
                        .as_micros()
                        .min(u128::from(bench::MAX_LATENCY_US))
                        as u64;
                    self.report.latency_us.saturating_record(micros.max(1));
                }
                Some(_) => {}
                None => self.tally.record(
                    "unexpected puback",
                    format!("{}: PUBACK for packet {pkid}, not in flight", self.id),
                ),
            },
            Packet::Disconnect => {
                self.tally
                    .record("closed by the broker", format!("{}: DISCONNECT", self.id));
                return true;
            }
            _ => {}
        }
        false
    }
}

/// Takes the publish `pkid` out of `pending`: its send time.
fn take(pending: &mut Vec<(u16, Instant)>, pkid: u16) -> Option<Instant> {
    let index = pending.iter().position(|(p, _)| *p == pkid)?;
    Some(pending.swap_remove(index).1)
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
    use std::sync::Mutex;

    use tokio::net::TcpListener;
    use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
    use tokio_tungstenite::tungstenite::http::HeaderValue;

    use crate::cli::BenchArgs;
    use crate::mock;

    /// What the tiny broker saw.
    #[derive(Default)]
    struct Seen {
        client_ids: Mutex<Vec<String>>,
        topics: Mutex<Vec<String>>,
        publishes: AtomicU64,
        disconnects: AtomicU64,
    }

    /// Just enough of a broker: MQTT over WebSocket (subprotocol `mqtt`), a CONNACK with
    /// `code`, and a PUBACK for each QoS 1 publish, those of one message acked in one message.
    async fn tiny_broker(code: u8) -> (String, Arc<Seen>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("ws://{}/mqtt", listener.local_addr().unwrap());
        let seen = Arc::new(Seen::default());
        let shared = seen.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                tokio::spawn(serve(tcp, code, shared.clone()));
            }
        });
        (url, seen)
    }

    async fn serve(tcp: tokio::net::TcpStream, code: u8, seen: Arc<Seen>) {
        #[allow(clippy::result_large_err)]
        let mqtt = |request: &Request, mut response: Response| {
            assert_eq!(request.headers()["sec-websocket-protocol"], "mqtt");
            let protocol = HeaderValue::from_static("mqtt");
            response
                .headers_mut()
                .insert("sec-websocket-protocol", protocol);
            Ok(response)
        };
        let mut ws = tokio_tungstenite::accept_hdr_async(tcp, mqtt)
            .await
            .unwrap();
        let mut inbox = Inbox::default();
        while let Some(Ok(Message::Binary(frame))) = ws.next().await {
            let mut answer = Vec::new();
            inbox
                .feed(&frame, |packet| match packet {
                    Packet::Connect { client_id, .. } => {
                        seen.client_ids.lock().unwrap().push(client_id.into());
                        let connack = Packet::ConnAck {
                            session_present: false,
                            code,
                        };
                        connack.encode(&mut answer);
                    }
                    Packet::Publish {
                        topic,
                        pkid: Some(pkid),
                        payload,
                    } => {
                        assert!(serde_json::from_slice::<serde_json::Value>(payload).is_ok());
                        seen.topics.lock().unwrap().push(topic.into());
                        seen.publishes.fetch_add(1, SeqCst);
                        Packet::PubAck { pkid }.encode(&mut answer);
                    }
                    Packet::Disconnect => {
                        seen.disconnects.fetch_add(1, SeqCst);
                    }
                    other => panic!("unexpected {other:?}"),
                })
                .unwrap();
            if !answer.is_empty() && ws.send(Message::binary(answer)).await.is_err() {
                return;
            }
        }
    }

    fn args(devices: usize) -> BenchMqttArgs {
        BenchMqttArgs {
            load: BenchArgs {
                devices,
                inflight: 4,
                duration: Duration::from_millis(300),
                warmup: Duration::from_millis(100),
                payload_bytes: 200,
                json: true,
                sharding: crate::shards::Sharding {
                    processes: None,
                    shard: None,
                },
            },
            topic_prefix: "bench".into(),
        }
    }

    #[tokio::test]
    async fn the_whole_subcommand_runs_against_a_broker() {
        let (url, seen) = tiny_broker(CONNECTION_ACCEPTED).await;
        let dir = tempfile::tempdir().unwrap();
        let common = mock::fleet(dir.path(), url, 3);
        assert!(bench_mqtt(&common, &args(3)).await.unwrap(), "a clean run");
        let mut ids = seen.client_ids.lock().unwrap().clone();
        ids.sort();
        assert_eq!(ids, ["sim-00001", "sim-00002", "sim-00003"]);
        assert!(seen.publishes.load(SeqCst) > 30);
        assert!(seen
            .topics
            .lock()
            .unwrap()
            .iter()
            .all(|t| t.starts_with("bench/sim-0000")));
        assert_eq!(seen.disconnects.load(SeqCst), 3, "each client says goodbye");
    }

    #[tokio::test]
    async fn a_refusing_broker_is_an_error() {
        // 3.2.2.3: 5 is "not authorized".
        let (url, _seen) = tiny_broker(5).await;
        let dir = tempfile::tempdir().unwrap();
        let common = mock::fleet(dir.path(), url, 2);
        let error = bench_mqtt(&common, &args(2)).await.err().unwrap();
        assert!(
            error.to_string().contains("no client could connect"),
            "{error}"
        );
    }

    #[test]
    fn publishes_leave_on_their_puback_in_any_order() {
        let (a, b) = (Instant::now(), Instant::now() + Duration::from_millis(5));
        let mut pending = vec![(7, a), (8, b)];
        assert_eq!(take(&mut pending, 8), Some(b));
        assert_eq!(take(&mut pending, 8), None, "a PUBACK counts once");
        assert_eq!(take(&mut pending, 7), Some(a));
        assert!(pending.is_empty());
    }

    #[test]
    fn packet_ids_cycle_past_zero_and_skip_those_in_flight() {
        let mut ids = PacketIds::default();
        assert_eq!(ids.take(|_| false), 1);
        assert_eq!(ids.take(|id| id == 2 || id == 3), 4);
        ids.next = u16::MAX;
        assert_eq!(ids.take(|_| false), u16::MAX);
        assert_eq!(ids.take(|_| false), 1, "0 is not a packet id");
        ids.next = u16::MAX;
        assert_eq!(ids.take(|id| id == u16::MAX || id == 1), 2);
    }

    #[test]
    fn packets_may_straddle_websocket_messages() {
        let mut bytes = Packet::PubAck { pkid: 1 }.to_vec();
        Packet::PubAck { pkid: 2 }.encode(&mut bytes);
        Packet::PubAck { pkid: 3 }.encode(&mut bytes);
        let mut inbox = Inbox::default();
        let mut seen = Vec::new();
        for part in [&bytes[..5], &bytes[5..7], &bytes[7..]] {
            inbox
                .feed(part, |packet| seen.push(packet.to_vec()))
                .unwrap();
        }
        assert_eq!(seen.concat(), bytes);
        assert!(inbox.partial.is_empty());
        assert!(inbox.feed(&[0x82, 0x00], |_| {}).is_err());
    }
}
