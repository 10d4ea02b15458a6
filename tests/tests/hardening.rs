//! Hostile and malformed device input against the real binary over real TLS: each bad input of
//! the contract and each malformed frame RFC 6455 names gets its exact HTTP status or close
//! code, while another device is still served and no file is left open; and a flood of
//! handshakes that never finish neither keeps a device out nor outlives the handshake timeout.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use e2e::device::client_config;
use e2e::raw::{client_hello, Trickle};
use e2e::{
    json, random_token, unique_id, ConnectRequest, Device, Frame, Gateway, Handshake, Options,
    Value,
};
use futures_util::FutureExt;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio_rustls::TlsConnector;

/// `--max-message-bytes` of the table's gateway: small, so that messages over it are quick to send.
const MAX_MESSAGE_BYTES: usize = 4096;
/// Invalid messages in a row that close a session with 1008 (PROTOCOL.md §2).
const INVALID_STREAK: usize = 10;
/// How long a row waits for each answer of the gateway.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the gateway may take to end a connection it has closed.
const END_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the files of ended connections may take to be released.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(10);

/// `--handshake-timeout` of the flood tests.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);
/// How late after the handshake timeout a stalled handshake may still be open.
const HANDSHAKE_MARGIN: Duration = Duration::from_secs(1);
/// How long an ordinary device may take to connect (TLS, upgrade, welcome) during a flood.
const CONNECT_BOUND: Duration = Duration::from_secs(1);
/// How often a trickling client sends its next byte.
const TRICKLE_PACE: Duration = Duration::from_millis(200);

/// What a row sends.
enum Input {
    /// These frames, after an accepted upgrade and the welcome.
    Frames(Vec<Frame>),
    /// This upgrade request, made with the row device's token.
    Upgrade(fn(ConnectRequest, &str) -> ConnectRequest),
}

/// What the contract says the gateway does.
#[derive(Debug)]
enum Expect {
    /// Closes the WebSocket with `code`, after exactly `errors` `invalid_message` errors.
    Close { code: u16, errors: usize },
    /// Acks the message `id`, after exactly `errors` `invalid_message` errors, and stays open.
    Acked { id: &'static str, errors: usize },
    /// Refuses the upgrade with this HTTP status and `error` code.
    Refused(u16, &'static str),
}

/// One bad input and the gateway's answer to it.
struct Row {
    name: &'static str,
    /// The row's device is disabled before the rows run.
    disabled: bool,
    input: Input,
    expect: Expect,
}

fn frames(name: &'static str, frames: Vec<Frame>, expect: Expect) -> Row {
    Row {
        name,
        disabled: false,
        input: Input::Frames(frames),
        expect,
    }
}

fn upgrade(
    name: &'static str,
    build: fn(ConnectRequest, &str) -> ConnectRequest,
    expect: Expect,
) -> Row {
    Row {
        name,
        disabled: false,
        input: Input::Upgrade(build),
        expect,
    }
}

fn close(code: u16) -> Expect {
    Expect::Close { code, errors: 0 }
}

/// A telemetry message of exactly `len` bytes (padded inside `data`).
fn telemetry_of_len(id: &str, len: usize) -> Vec<u8> {
    let head = format!(r#"{{"type":"telemetry","id":"{id}","data":{{"pad":""#);
    let tail = r#""}}"#;
    let pad = len
        .checked_sub(head.len() + tail.len())
        .unwrap_or_else(|| panic!("{len} bytes cannot hold a telemetry message"));
    format!("{head}{}{tail}", "x".repeat(pad)).into_bytes()
}

/// A small valid telemetry message.
fn telemetry(id: &str) -> Vec<u8> {
    json!({"type": "telemetry", "id": id, "data": {"temp": 21.5}})
        .to_string()
        .into_bytes()
}

/// `n` text frames that are not JSON.
fn not_json(n: usize) -> Vec<Frame> {
    (0..n)
        .map(|i| Frame::text(format!("not json {i} {{")))
        .collect()
}

fn rows() -> Vec<Row> {
    let over = MAX_MESSAGE_BYTES + 1;
    let mut nine_then_valid = not_json(INVALID_STREAK - 1);
    nine_then_valid.push(Frame::text(telemetry("after-nine")));
    vec![
        // Sizes: the limit is on the message, however it is cut into frames.
        frames(
            "a message of exactly max_message_bytes in one frame is acked",
            vec![Frame::text(telemetry_of_len("at-limit", MAX_MESSAGE_BYTES))],
            Expect::Acked {
                id: "at-limit",
                errors: 0,
            },
        ),
        frames(
            "a message over max_message_bytes in one frame",
            vec![Frame::text(telemetry_of_len("over", over))],
            close(1009),
        ),
        frames(
            "fragments adding up to exactly max_message_bytes are acked",
            Frame::fragments(
                &telemetry_of_len("at-limit-fragmented", MAX_MESSAGE_BYTES),
                1000,
            ),
            Expect::Acked {
                id: "at-limit-fragmented",
                errors: 0,
            },
        ),
        frames(
            "small fragments adding up to over max_message_bytes",
            Frame::fragments(&telemetry_of_len("over-fragmented", over), 1000),
            close(1009),
        ),
        // Content.
        frames(
            "a binary frame",
            vec![Frame::binary(telemetry("binary"))],
            close(1003),
        ),
        frames(
            "invalid UTF-8 in a text frame",
            vec![Frame::text(
                &b"{\"type\":\"telemetry\",\"id\":\"\xc3\x28\",\"data\":{}}"[..],
            )],
            close(1007),
        ),
        frames(
            "invalid UTF-8 split across fragments",
            vec![
                Frame::text(&b"{\"type\":\"telemetry\",\"id\":\"\xe2\x82"[..]).fin(false),
                Frame::continuation(&b"\x28\",\"data\":{}}"[..]),
            ],
            close(1007),
        ),
        frames(
            "one invalid message short of the limit, then a valid one, is acked",
            nine_then_valid,
            Expect::Acked {
                id: "after-nine",
                errors: INVALID_STREAK - 1,
            },
        ),
        frames(
            "invalid messages in a row up to the limit",
            not_json(INVALID_STREAK),
            Expect::Close {
                code: 1008,
                errors: INVALID_STREAK,
            },
        ),
        // Framing (RFC 6455 §5): each fails the connection with 1002.
        frames(
            "an unmasked client frame",
            vec![Frame::text(telemetry("unmasked")).unmasked()],
            close(1002),
        ),
        frames(
            "RSV1 set without an extension",
            vec![Frame::text(telemetry("rsv1")).rsv(0b100)],
            close(1002),
        ),
        frames(
            "RSV2 set",
            vec![Frame::text(telemetry("rsv2")).rsv(0b010)],
            close(1002),
        ),
        frames(
            "RSV3 set",
            vec![Frame::text(telemetry("rsv3")).rsv(0b001)],
            close(1002),
        ),
        frames(
            "reserved data opcode 0x3",
            vec![Frame::new(0x3, telemetry("op3"))],
            close(1002),
        ),
        frames(
            "reserved control opcode 0xB",
            vec![Frame::new(0xB, "")],
            close(1002),
        ),
        frames(
            "a control frame with a 126-byte payload",
            vec![Frame::ping(vec![b'p'; 126])],
            close(1002),
        ),
        frames(
            "a fragmented control frame (ping with FIN=0)",
            vec![Frame::ping("half").fin(false)],
            close(1002),
        ),
        frames(
            "a continuation frame with no message started",
            vec![Frame::continuation(telemetry("stray"))],
            close(1002),
        ),
        frames(
            "a new text frame while a fragmented message is open",
            vec![
                Frame::text(&br#"{"type":"telemetry","#[..]).fin(false),
                Frame::text(telemetry("interleaved")),
            ],
            close(1002),
        ),
        frames(
            "a close frame with code 1005, which must never be sent",
            vec![Frame::close(1005, "")],
            close(1002),
        ),
        frames(
            "a close frame with code 999, below the defined range",
            vec![Frame::close(999, "")],
            close(1002),
        ),
        frames(
            "a close frame with a 1-byte payload",
            vec![Frame::new(e2e::raw::opcode::CLOSE, vec![0x03])],
            close(1002),
        ),
        // The HTTP upgrade (PROTOCOL.md §1).
        upgrade(
            "a token in the query string",
            |r, t| r.query(&format!("token={t}")),
            Expect::Refused(400, "bad_request"),
        ),
        upgrade(
            "an access_token in the query string next to a valid header",
            |r, t| r.bearer(t).query(&format!("access_token={t}")),
            Expect::Refused(400, "bad_request"),
        ),
        upgrade(
            "no credentials",
            |r, _| r.protocols(["iot-gateway.v1"]),
            Expect::Refused(401, "unauthorized"),
        ),
        upgrade(
            "a wrong token",
            |r, _| r.bearer(&random_token(43)),
            Expect::Refused(401, "unauthorized"),
        ),
        Row {
            disabled: true,
            ..upgrade(
                "the token of a disabled device",
                |r, t| r.bearer(t),
                Expect::Refused(403, "device_disabled"),
            )
        },
        upgrade(
            "a plain GET, not a WebSocket upgrade",
            |r, t| r.bearer(t).without_upgrade(),
            Expect::Refused(400, "bad_request"),
        ),
    ]
}

#[tokio::test]
async fn every_bad_input_gets_its_status_or_close_code_and_harms_no_one_else() {
    let gw = Gateway::start(
        Options::new().args(["--max-message-bytes", &MAX_MESSAGE_BYTES.to_string()]),
    )
    .await;
    let rows = rows();
    let api = gw.api();
    let mut tokens = Vec::new();
    for (i, row) in rows.iter().enumerate() {
        let id = format!("row-{i:02}");
        tokens.push(gw.create_device(&id).await);
        if row.disabled {
            api.patch(&format!("/devices/{id}"), &json!({"enabled": false}))
                .await
                .expect(200);
        }
    }
    drop(api);
    let bystander_token = gw.create_device("bystander").await;
    let mut bystander = gw.connect(&bystander_token).await;
    assert_eq!(
        bystander.welcome["limits"]["max_message_bytes"], MAX_MESSAGE_BYTES,
        "the table is written for this limit"
    );
    bystander_is_served(&mut bystander).await;
    let baseline = baseline_files(&gw).await;

    let mut failures = Vec::new();
    for (row, token) in rows.iter().zip(&tokens) {
        let checked = AssertUnwindSafe(async {
            run_row(&gw, row, token).await;
            bystander_is_served(&mut bystander).await;
            files_back_to(&gw, &baseline).await
        })
        .catch_unwind()
        .await;
        let failure = match checked {
            Ok(Ok(())) => continue,
            Ok(Err(leak)) => leak,
            Err(panic) => panic_text(&panic),
        };
        failures.push(format!(
            "- {} (expected {:?}): {failure}",
            row.name, row.expect
        ));
    }
    assert!(
        failures.is_empty(),
        "{} of {} rows failed:\n{}",
        failures.len(),
        rows.len(),
        failures.join("\n")
    );
}

/// Sends the row's input and checks the gateway's answer, up to the end of the connection.
async fn run_row(gw: &Gateway, row: &Row, token: &str) {
    let frames = match (&row.input, &row.expect) {
        (Input::Upgrade(build), Expect::Refused(status, code)) => {
            match build(gw.connect_request(), token).send().await {
                Handshake::Refused(refusal) => refusal.assert_error(*status, code),
                Handshake::Upgraded(dev) => {
                    panic!("upgraded instead of refused (welcome {})", dev.welcome)
                }
            }
            return;
        }
        (Input::Frames(frames), _) => frames,
        (Input::Upgrade(_), expect) => panic!("an upgrade row cannot expect {expect:?}"),
    };
    let mut conn = gw.connect_request().bearer(token).send_raw().await;
    let welcome = conn.recv_json(ANSWER_TIMEOUT).await;
    assert_eq!(welcome["type"], "welcome", "first message {welcome}");
    for frame in frames {
        // The gateway may close before it has read everything; its answer is what counts.
        if conn.send_frame(frame).await.is_err() {
            break;
        }
    }
    match row.expect {
        Expect::Close { code, errors } => {
            let (got, before) = conn.expect_close(ANSWER_TIMEOUT).await;
            assert_eq!(got, code, "close code (messages before it: {before:?})");
            assert_invalid_message_errors(&before, errors);
            conn.answer_close(got, END_TIMEOUT)
                .await
                .unwrap_or_else(|e| panic!("after closing with {got}: {e}"));
        }
        Expect::Acked { id, errors } => {
            let mut before = Vec::new();
            let reply = loop {
                let msg = conn.recv_json(ANSWER_TIMEOUT).await;
                if msg["type"] != "error" {
                    break msg;
                }
                before.push(msg);
            };
            assert_invalid_message_errors(&before, errors);
            assert_eq!(reply, json!({"type": "ack", "id": id}), "answer to {id}");
            // Still open: an ordinary close is answered with 1000.
            conn.send_frame(&Frame::close(1000, ""))
                .await
                .expect("send a close");
            let (got, after) = conn.expect_close(ANSWER_TIMEOUT).await;
            assert_eq!((got, after), (1000, vec![]), "answer to an ordinary close");
            conn.expect_end(END_TIMEOUT)
                .await
                .unwrap_or_else(|e| panic!("after an ordinary close: {e}"));
        }
        Expect::Refused(..) => panic!("a frames row cannot expect a refusal"),
    }
}

#[track_caller]
fn assert_invalid_message_errors(messages: &[Value], n: usize) {
    assert_eq!(messages.len(), n, "errors before the answer: {messages:?}");
    for m in messages {
        assert!(
            m["type"] == "error" && m["code"] == "invalid_message",
            "expected an invalid_message error, got {m}"
        );
    }
}

/// The device connected before the row sends telemetry and gets its ack.
async fn bystander_is_served(bystander: &mut Device) {
    let id = unique_id("bystander");
    bystander
        .send_acked(&json!({"type": "telemetry", "id": id, "data": {"temp": 20.5}}))
        .await;
}

/// The gateway's open files once connections made so far have ended and its database pool is
/// at full size (a pool connection opened later would look like a leak).
async fn baseline_files(gw: &Gateway) -> Vec<String> {
    let api = gw.api();
    for _ in 0..5 {
        futures_util::future::join_all((0..32).map(|_| api.get("/devices?limit=1"))).await;
    }
    drop(api);
    let deadline = Instant::now() + RELEASE_TIMEOUT;
    let mut last = gw.open_files();
    let mut same = 0;
    while same < 5 {
        assert!(
            Instant::now() < deadline,
            "the gateway's open files did not settle: {last:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = gw.open_files();
        same = if now.len() == last.len() { same + 1 } else { 0 };
        last = now;
    }
    last
}

/// Waits until the gateway has no more files open than `baseline`; `Err` lists the extra ones.
async fn files_back_to(gw: &Gateway, baseline: &[String]) -> Result<(), String> {
    let deadline = Instant::now() + RELEASE_TIMEOUT;
    loop {
        let now = gw.open_files();
        if now.len() <= baseline.len() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            let extra: Vec<&String> = now.iter().filter(|f| !baseline.contains(f)).collect();
            return Err(format!(
                "the gateway still has {} files open {RELEASE_TIMEOUT:?} later, {} at the baseline; new: {extra:?}",
                now.len(),
                baseline.len()
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panicked".into())
}

/// How a flood connection stalls its handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stall {
    /// TCP only, nothing sent.
    Silent,
    /// A ClientHello, one byte every [`TRICKLE_PACE`].
    Hello,
    /// TLS done, then the HTTP upgrade head one byte every [`TRICKLE_PACE`].
    Head,
}

/// How long a flood connection stayed open, from its TCP connect to the gateway ending it.
struct Held {
    stall: Stall,
    /// When its TLS handshake was done, for [`Stall::Head`].
    tls_done: Option<Duration>,
    /// `None`: still open when the client gave up.
    open_for: Option<Duration>,
}

const FLOOD: [(Stall, usize); 3] = [(Stall::Head, 60), (Stall::Silent, 120), (Stall::Hello, 120)];

#[tokio::test]
async fn a_flood_of_stalled_handshakes_neither_keeps_a_device_out_nor_outlives_the_timeout() {
    let gw = Gateway::start(Options::new().args(["--handshake-timeout", "2s"])).await;
    let token = gw.create_device("sensor-1").await;
    let baseline = baseline_files(&gw).await;
    let request = gw.connect_request();
    let hello = client_hello(&gw.ca_pem_path);
    let head = upgrade_head(&request);
    let tls_config = client_config(&gw.ca_pem_path);
    let total: usize = FLOOD.iter().map(|(_, n)| n).sum();

    // Connections that finish TLS first (TLS takes the longest), then the others; each task
    // reports once its connection stalls, then watches for the gateway to end it.
    let flood_started = Instant::now();
    let closed = Arc::new(AtomicUsize::new(0));
    let (opened_tx, mut opened_rx) = tokio::sync::mpsc::channel::<()>(total);
    let mut flood = JoinSet::new();
    for (stall, n) in FLOOD {
        for _ in 0..n {
            let (request, hello, head) = (request.clone(), hello.clone(), head.clone());
            let (closed, opened_tx) = (closed.clone(), opened_tx.clone());
            let tls_config = tls_config.clone();
            flood.spawn(async move {
                let tcp = TcpStream::connect(request.addr()).await.expect("connect");
                let opened = Instant::now();
                let mut tls_done = None;
                let open_for = match stall {
                    Stall::Silent => {
                        let _ = opened_tx.send(()).await;
                        trickle(tcp, &[], opened).await
                    }
                    Stall::Hello => {
                        let _ = opened_tx.send(()).await;
                        trickle(tcp, &hello, opened).await
                    }
                    Stall::Head => {
                        let tls = TlsConnector::from(tls_config)
                            .connect(server_name(), tcp)
                            .await
                            .expect("TLS handshake of a flood connection");
                        tls_done = Some(opened.elapsed());
                        let _ = opened_tx.send(()).await;
                        trickle(tls, &head, opened).await
                    }
                };
                if open_for.is_some() {
                    closed.fetch_add(1, Ordering::SeqCst);
                }
                Held {
                    stall,
                    tls_done,
                    open_for,
                }
            });
        }
        // The next group only once this one is established, so that the whole flood is
        // open while the device connects.
        let deadline = tokio::time::Instant::now() + HANDSHAKE_TIMEOUT;
        for _ in 0..n {
            tokio::time::timeout_at(deadline, opened_rx.recv())
                .await
                .unwrap_or_else(|_| panic!("{stall:?} flood connections not open in time"))
                .expect("flood tasks alive");
        }
    }
    assert_eq!(
        closed.load(Ordering::SeqCst),
        0,
        "flood connections were ended before the device connected; the flood took too long to open"
    );
    eprintln!("the flood took {:?} to open", flood_started.elapsed());
    // Connected is not yet accepted: wait for the gateway to hold every flood connection.
    let accepted = Instant::now() + HANDSHAKE_TIMEOUT / 2;
    while gw.open_files().len() < baseline.len() + total {
        assert!(
            Instant::now() < accepted,
            "the gateway holds {} files, {} before the flood of {total}",
            gw.open_files().len(),
            baseline.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let started = Instant::now();
    let mut dev = gw.connect(&token).await;
    let took = started.elapsed();
    let still_open = total - closed.load(Ordering::SeqCst);
    assert!(
        took <= CONNECT_BOUND,
        "a device took {took:?} to connect beside {still_open} stalled handshakes (bound {CONNECT_BOUND:?})"
    );
    assert_eq!(
        still_open, total,
        "the flood was not fully open while the device connected"
    );
    dev.send_acked(&json!({"type": "telemetry", "id": "during-flood", "data": {"x": 1}}))
        .await;

    let bound = HANDSHAKE_TIMEOUT + HANDSHAKE_MARGIN;
    let mut late = Vec::new();
    let mut longest = [Duration::ZERO; FLOOD.len()];
    while let Some(held) = flood.join_next().await {
        let held = held.expect("flood task");
        let group = FLOOD
            .iter()
            .position(|(s, _)| *s == held.stall)
            .expect("a flood group");
        match held.open_for {
            Some(d) if d <= bound => longest[group] = longest[group].max(d),
            open_for => late.push(format!(
                "{:?} open for {open_for:?} (TLS done after {:?})",
                held.stall, held.tls_done
            )),
        }
    }
    assert!(
        late.is_empty(),
        "{} of {total} stalled handshakes were not ended within {bound:?} of their connect \
         (None: still open):\n{}",
        late.len(),
        late.join("\n")
    );
    let longest: Vec<String> = FLOOD
        .iter()
        .zip(longest)
        .map(|((stall, _), d)| format!("{stall:?} {d:?}"))
        .collect();
    eprintln!(
        "a device connected in {took:?} beside {total} stalled handshakes, \
         which were ended after at most: {}",
        longest.join(", ")
    );
    dev.send_acked(&json!({"type": "telemetry", "id": "after-flood", "data": {"x": 2}}))
        .await;
    dev.close().await;
    files_back_to(&gw, &baseline)
        .await
        .unwrap_or_else(|e| panic!("after the flood: {e}"));
}

#[tokio::test]
async fn the_handshake_timeout_bounds_tls_and_upgrade_together() {
    let gw = Gateway::start(Options::new().args(["--handshake-timeout", "2s"])).await;
    let request = gw.connect_request();
    let hello = client_hello(&gw.ca_pem_path);

    // A ClientHello spread over ~1.2 s (well within the timeout), then the upgrade head
    // trickled: the gateway must end it HANDSHAKE_TIMEOUT after the connect, not after TLS.
    let tcp = TcpStream::connect(request.addr()).await.expect("connect");
    let opened = Instant::now();
    let slow = Trickle::new(
        tcp,
        hello.len(),
        hello.len().div_ceil(13),
        Duration::from_millis(100),
    );
    let tls = TlsConnector::from(client_config(&gw.ca_pem_path))
        .connect(server_name(), slow)
        .await
        .expect("a slow TLS handshake within the timeout");
    let tls_took = opened.elapsed();
    let open_for = trickle(tls, &upgrade_head(&request), opened).await;

    let bound = HANDSHAKE_TIMEOUT + HANDSHAKE_MARGIN;
    assert!(
        open_for.is_some_and(|d| d <= bound),
        "a handshake whose TLS took {tls_took:?} was open for {open_for:?} (None: still open), \
         with a {HANDSHAKE_TIMEOUT:?} handshake timeout (bound {bound:?})"
    );
}

/// Writes `bytes` one at a time every [`TRICKLE_PACE`] (nothing if empty) while reading;
/// returns how long after `opened` the gateway ended the connection, `None` if it had not
/// after twice the bound.
async fn trickle<S>(stream: S, bytes: &[u8], opened: Instant) -> Option<Duration>
where
    S: AsyncRead + AsyncWrite,
{
    let give_up = opened + 2 * (HANDSHAKE_TIMEOUT + HANDSHAKE_MARGIN);
    let (mut rd, mut wr) = tokio::io::split(stream);
    let mut next = bytes.iter();
    let mut pace = tokio::time::interval(TRICKLE_PACE);
    let mut buf = [0u8; 1024];
    loop {
        tokio::select! {
            read = rd.read(&mut buf) => match read {
                Ok(0) | Err(_) => return Some(opened.elapsed()),
                // A goodbye (a TLS alert, say); the end is what counts.
                Ok(_) => continue,
            },
            _ = pace.tick() => {
                if let Some(b) = next.next() {
                    if wr.write_all(&[*b]).await.is_err() || wr.flush().await.is_err() {
                        return Some(opened.elapsed());
                    }
                }
            }
            _ = tokio::time::sleep_until(give_up.into()) => return None,
        }
    }
}

/// The name the gateway's development certificate is valid for.
fn server_name() -> ServerName<'static> {
    ServerName::try_from("127.0.0.1").expect("an IP address is a server name")
}

/// A complete upgrade head with a token nobody has; trickled, it never completes in time.
fn upgrade_head(request: &ConnectRequest) -> Vec<u8> {
    format!(
        "GET /v1/connect HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Authorization: Bearer {}\r\n\r\n",
        request.addr(),
        random_token(43)
    )
    .into_bytes()
}

#[tokio::test]
async fn handshakes_in_progress_are_bounded_and_wait_in_the_backlog_past_the_bound() {
    let gw =
        Gateway::start(Options::new().args(["--max-handshakes", "4", "--handshake-timeout", "5s"]))
            .await;
    let token = gw.create_device("sensor-1").await;
    let baseline = baseline_files(&gw).await;
    let addr = gw.connect_request().addr();

    // 40 connections that never start TLS: the kernel completes them all (backlog), the
    // gateway takes only 4 of them on at a time.
    let mut stalled = Vec::new();
    for _ in 0..40 {
        stalled.push(
            TcpStream::connect(addr)
                .await
                .expect("connect to the device port"),
        );
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let open = gw.open_files();
    let sockets = open.iter().filter(|f| f.starts_with("socket:")).count()
        - baseline.iter().filter(|f| f.starts_with("socket:")).count();
    assert_eq!(
        sockets, 4,
        "sockets the gateway opened for the stalled connections"
    );

    // Once they go away, the backlog drains and a device gets in at once.
    drop(stalled);
    let started = Instant::now();
    let dev = gw.connect_request().bearer(&token).send().await.device();
    assert_eq!(dev.welcome["device_id"], "sensor-1");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "the device waited {:?}",
        started.elapsed()
    );
    dev.close().await;
    files_back_to(&gw, &baseline).await.unwrap();
}
