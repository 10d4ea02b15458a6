//! Crash safety under repeated `kill -9`: a fleet streams telemetry at full speed while the
//! gateway is killed at random moments and restarted on the same database, again and again.
//! At the end every acked message is stored exactly once, nothing is stored that was never
//! sent, and SQLite finds the database sound after every crash.
//!
//! The number of kills is `E2E_KILL_LOOP_KILLS` (default 5); `E2E_KILL_LOOP_SEED` replays the
//! random moments of an earlier run (each run prints its seed).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use e2e::device::client_config;
use e2e::{json, Gateway, Options, Value};
use futures_util::{SinkExt, StreamExt};
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// Devices streaming at the same time.
const DEVICES: usize = 16;
/// Messages each device keeps in flight.
const WINDOW: usize = 4;
/// Kills when `E2E_KILL_LOOP_KILLS` is not set: enough to cross every phase, quick for CI.
const DEFAULT_KILLS: usize = 5;
/// The gateway runs between 0 and this long after a restart before it is killed, so some kills
/// land in the reconnect storm (session starts, re-sends) and some in steady streaming.
const MAX_UP_MS: u64 = 1500;
/// A connected gateway that answers nothing for this long has hung.
const STALL: Duration = Duration::from_secs(20);
/// How long devices may take, once told to stop, to get their last messages acked.
const DRAIN: Duration = Duration::from_secs(30);

type Ws = WebSocketStream<TlsStream<TcpStream>>;

/// Where devices connect now; `None` while the gateway is down.
#[derive(Clone)]
struct Target {
    url: String,
    ca: PathBuf,
}

/// One device's record of what it sent and what the gateway promised.
struct Ledger {
    device: String,
    token: String,
    /// Every message id sent, with its number of points.
    sent: HashMap<String, usize>,
    acked: HashSet<String>,
    /// Sent and not acked yet, by sequence number: re-sent as is after a reconnect, as a
    /// device with a persistent outbox does.
    outbox: BTreeMap<u64, (String, String)>,
    next: u64,
    connects: usize,
    resent: usize,
    /// Anything the contract does not allow here (an error reply, a second ack, a stall).
    faults: Vec<String>,
}

impl Ledger {
    fn new(device: String, token: String) -> Ledger {
        Ledger {
            device,
            token,
            sent: HashMap::new(),
            acked: HashSet::new(),
            outbox: BTreeMap::new(),
            next: 0,
            connects: 0,
            resent: 0,
            faults: Vec::new(),
        }
    }

    /// The next new message: a single point, every fifth a batch of three.
    fn new_message(&mut self) -> (u64, String, String) {
        let n = self.next;
        self.next += 1;
        let id = format!("{}-m{n}", self.device);
        let (msg, points) = if n % 5 == 4 {
            let points: Vec<Value> = (0..3).map(|k| json!({"data": {"n": n, "k": k}})).collect();
            (json!({"type": "telemetry", "id": id, "points": points}), 3)
        } else {
            (json!({"type": "telemetry", "id": id, "data": {"n": n}}), 1)
        };
        self.sent.insert(id.clone(), points);
        (n, id, msg.to_string())
    }

    fn on_reply(&mut self, reply: &Value) {
        let id = reply["id"].as_str().unwrap_or_default();
        match reply["type"].as_str() {
            Some("ack") => {
                let n = self
                    .outbox
                    .iter()
                    .find(|(_, (m, _))| m == id)
                    .map(|(n, _)| *n);
                match n {
                    Some(n) => {
                        self.outbox.remove(&n);
                        self.acked.insert(id.to_string());
                    }
                    None if self.acked.contains(id) => {
                        self.faults.push(format!("acked twice: {id}"))
                    }
                    None => self
                        .faults
                        .push(format!("ack for a message not in flight: {reply}")),
                }
            }
            _ => {
                // Not stored (`internal`, `rate_limited`): allowed by the contract, but nothing
                // here should cause it, so it is a fault of this run. Stop waiting for an ack.
                self.outbox.retain(|_, (m, _)| m != id);
                self.faults.push(format!("unexpected reply {reply}"));
            }
        }
    }
}

/// A device connection with `Authorization: Bearer` and `iot-gateway.v1`, up to the welcome.
/// Unlike the fixture's `Gateway::connect` it reports failure: the gateway may be dead.
async fn try_connect(target: &Target, token: &str) -> Result<Ws, String> {
    let authority = target
        .url
        .strip_prefix("wss://")
        .and_then(|rest| rest.split('/').next())
        .ok_or_else(|| format!("not a wss:// url: {}", target.url))?;
    let tcp = TcpStream::connect(authority)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    tcp.set_nodelay(true).map_err(|e| e.to_string())?;
    let name = ServerName::try_from("127.0.0.1").expect("an IP address is a server name");
    let tls = TlsConnector::from(client_config(&target.ca))
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS: {e}"))?;
    let mut request = target
        .url
        .as_str()
        .into_client_request()
        .map_err(|e| e.to_string())?;
    let headers = request.headers_mut();
    headers.insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {token}")).map_err(|e| e.to_string())?,
    );
    headers.insert(
        "sec-websocket-protocol",
        HeaderValue::from_static("iot-gateway.v1"),
    );
    let (mut ws, _) = tokio_tungstenite::client_async(request, tls)
        .await
        .map_err(|e| format!("upgrade: {e}"))?;
    match ws.next().await {
        Some(Ok(Message::Text(text))) if text.as_str().contains("\"welcome\"") => Ok(ws),
        other => Err(format!("expected a welcome, got {other:?}")),
    }
}

/// Connects whenever there is a gateway and streams until told to stop; then waits for the
/// last acks (reconnecting as often as needed) and returns the ledger.
async fn run_device(
    mut ledger: Ledger,
    mut target: watch::Receiver<Option<Target>>,
    mut stop: watch::Receiver<bool>,
) -> Ledger {
    loop {
        if *stop.borrow() && ledger.outbox.is_empty() {
            return ledger;
        }
        let current = target.borrow_and_update().clone();
        let Some(current) = current else {
            let _ = target.changed().await;
            continue;
        };
        let connected = tokio::time::timeout(
            Duration::from_secs(10),
            try_connect(&current, &ledger.token),
        )
        .await;
        match connected {
            Ok(Ok(ws)) => {
                ledger.connects += 1;
                stream(&mut ledger, ws, &mut stop).await;
            }
            // The gateway is down or going down: wait for the next one, or retry shortly.
            _ => {
                let _ = tokio::time::timeout(Duration::from_millis(50), target.changed()).await;
            }
        }
    }
}

/// One connection: re-sends the outbox, then keeps `WINDOW` messages in flight until the
/// connection ends, or, once told to stop, until everything in flight is acked.
async fn stream(ledger: &mut Ledger, mut ws: Ws, stop: &mut watch::Receiver<bool>) {
    let resend: Vec<String> = ledger.outbox.values().map(|(_, t)| t.clone()).collect();
    for text in resend {
        if ws.feed(Message::text(text)).await.is_err() {
            return;
        }
        ledger.resent += 1;
    }
    loop {
        let stopping = *stop.borrow();
        if stopping && ledger.outbox.is_empty() {
            let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
            return;
        }
        while !stopping && ledger.outbox.len() < WINDOW {
            let (n, id, text) = ledger.new_message();
            ledger.outbox.insert(n, (id, text.clone()));
            if ws.feed(Message::text(text)).await.is_err() {
                return;
            }
        }
        if ws.flush().await.is_err() {
            return;
        }
        tokio::select! {
            next = tokio::time::timeout(STALL, ws.next()) => match next {
                Ok(Some(Ok(Message::Text(text)))) => match serde_json::from_str::<Value>(text.as_str()) {
                    Ok(reply) => ledger.on_reply(&reply),
                    Err(e) => ledger.faults.push(format!("not JSON ({e}): {text}")),
                },
                Ok(Some(Ok(_))) => {}
                // Killed: the socket ends (reset, or end of stream without a close frame).
                Ok(Some(Err(_)) | None) => return,
                Err(_) => {
                    ledger.faults.push(format!("no reply within {STALL:?}"));
                    return;
                }
            },
            _ = stop.changed(), if !stopping => {}
        }
    }
}

/// A small xorshift generator: the kill moments, reproducible from the printed seed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

fn env_number(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    Some(
        value
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("{name}={value:?}: {e}")),
    )
}

async fn check_integrity(db: &Path, when: &str) {
    assert!(db.exists(), "{when}: no database at {}", db.display());
    let result = e2e::db::integrity_check(db).await;
    assert_eq!(
        result,
        ["ok"],
        "{when}: integrity_check of {}",
        db.display()
    );
}

/// Every acked message is stored whole exactly once; a stored message was sent, and is whole
/// (all its points, each once: a commit is all or nothing) with the data that was sent.
/// Returns the number of messages stored.
async fn assert_ledger_stored(gw: &Gateway, ledger: &Ledger) -> usize {
    let items = gw.api().telemetry_all(&ledger.device, "order=asc").await;
    let mut stored: HashMap<String, Vec<u64>> = HashMap::new();
    for item in &items {
        let id = item["id"].as_str().expect("item id").to_string();
        let seq = item["seq"].as_u64().expect("seq");
        let n: u64 = id
            .rsplit_once("-m")
            .and_then(|(_, n)| n.parse().ok())
            .unwrap_or_else(|| panic!("{}: stored {id} was never sent", ledger.device));
        assert_eq!(
            item["data"]["n"], n,
            "{}: data of {id}: {item}",
            ledger.device
        );
        stored.entry(id).or_default().push(seq);
    }
    for (id, seqs) in &mut stored {
        let points = ledger
            .sent
            .get(id)
            .unwrap_or_else(|| panic!("{}: stored {id} was never sent", ledger.device));
        seqs.sort_unstable();
        let whole: Vec<u64> = (0..*points as u64).collect();
        assert_eq!(
            *seqs, whole,
            "{}: {id} ({points} points) stored as seqs {seqs:?}",
            ledger.device
        );
    }
    for id in &ledger.acked {
        assert!(
            stored.contains_key(id),
            "{}: acked message {id} was lost",
            ledger.device
        );
    }
    stored.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acked_telemetry_survives_repeated_kill_9_under_load() {
    let kills = env_number("E2E_KILL_LOOP_KILLS").unwrap_or(DEFAULT_KILLS as u64) as usize;
    let seed = env_number("E2E_KILL_LOOP_SEED").unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    }) | 1;
    eprintln!("kill loop: {kills} kills, E2E_KILL_LOOP_SEED={seed}");
    let mut rng = Rng(seed);
    let started = std::time::Instant::now();

    let opts = Options::new().args(["--telemetry-rate", "100000", "--telemetry-burst", "100000"]);
    let mut gw = Gateway::start(opts).await;
    let db = gw.dir().join("data").join("gateway.db");
    let (target_tx, target_rx) = watch::channel(Some(Target {
        url: gw.device_url.clone(),
        ca: gw.ca_pem_path.clone(),
    }));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut devices = Vec::new();
    for i in 0..DEVICES {
        let id = format!("loop-{i:02}");
        let token = gw.create_device(&id).await;
        devices.push(tokio::spawn(run_device(
            Ledger::new(id, token),
            target_rx.clone(),
            stop_rx.clone(),
        )));
    }

    for kill in 1..=kills {
        tokio::time::sleep(Duration::from_millis(rng.below(MAX_UP_MS + 1))).await;
        target_tx.send_replace(None);
        let stopped = gw.kill9().await;
        check_integrity(&db, &format!("after kill {kill}")).await;
        gw = stopped.start().await;
        target_tx.send_replace(Some(Target {
            url: gw.device_url.clone(),
            ca: gw.ca_pem_path.clone(),
        }));
    }

    // The last gateway lives on: devices reconnect, re-send what was in flight at the last
    // kill, stream a little more and then wait until everything they sent is acked.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop_tx.send_replace(true);
    let mut ledgers = Vec::new();
    for device in devices {
        let ledger = tokio::time::timeout(DRAIN, device)
            .await
            .expect("a device did not get its last messages acked in time")
            .expect("device task panicked");
        ledgers.push(ledger);
    }

    let mut stored = 0;
    for ledger in &ledgers {
        assert!(
            ledger.faults.is_empty(),
            "{}: {:?}",
            ledger.device,
            ledger.faults
        );
        assert!(
            ledger.outbox.is_empty(),
            "{}: unacked at the end",
            ledger.device
        );
        stored += assert_ledger_stored(&gw, ledger).await;
    }
    let stopped = gw.terminate().await;
    assert!(
        stopped.status.success(),
        "exit after SIGTERM: {}",
        stopped.status
    );
    check_integrity(&db, "after the final SIGTERM").await;

    let sent: usize = ledgers.iter().map(|l| l.sent.len()).sum();
    let acked: usize = ledgers.iter().map(|l| l.acked.len()).sum();
    let resent: usize = ledgers.iter().map(|l| l.resent).sum();
    let connects: usize = ledgers.iter().map(|l| l.connects).sum();
    eprintln!(
        "kill loop: {kills} kills, {DEVICES} devices, {sent} messages sent, {acked} acked, \
         {stored} stored, {resent} re-sent after reconnects, {connects} connections, \
         integrity_check ok after every kill, {:.1} s",
        started.elapsed().as_secs_f64()
    );
    // Devices re-send until acked, so in the end everything sent is acked, and so stored.
    assert_eq!(acked, sent, "every message sent was acked in the end");
    assert_eq!(stored, sent, "every message sent is stored");
    assert!(
        acked >= 100 * (kills + 1),
        "only {acked} acks over {kills} kills"
    );
}
