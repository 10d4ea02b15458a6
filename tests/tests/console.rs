//! The web console in a real headless Chromium against the real gateway: sign in, the fleet
//! online and live, a device's chart and a command sent from the page, the browser device
//! speaking the device protocol, and device data that is shown as text and never run.
//!
//! Needs Debian's `chromium` and `chromium-driver`; without them these tests print
//! "skipped: …" and pass, unless `E2E_REQUIRE_BROWSER=1` (CI), where they fail.
//! The fleet and device tests take the README's screenshots: into `docs/console-*.png` with
//! `E2E_UPDATE_SCREENSHOTS=1`, else into the build's scratch directory.

use std::path::PathBuf;
use std::time::Duration;

use e2e::browser::Browser;
use e2e::commands::{answer, recv_command};
use e2e::sim::{fleet_ids, wait_all_online, Relay, Sim};
use e2e::{eventually, json, Gateway, Options, Value};

/// How long the page may take to show something the gateway already knows.
const SHOWN: Duration = Duration::from_secs(20);
/// The console's title (an injected script would like to change it).
const TITLE: &str = "IoT Gateway console";

/// Where a screenshot goes: the repository's `docs/` (the README's pictures) with
/// `E2E_UPDATE_SCREENSHOTS=1`, else the build's scratch directory, so that a test run leaves the
/// work tree as it was.
fn screenshot_path(name: &str) -> PathBuf {
    if std::env::var("E2E_UPDATE_SCREENSHOTS").as_deref() == Ok("1") {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("workspace root")
            .join("docs")
            .join(name)
    } else {
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name)
    }
}

/// Opens the console and signs in with the gateway's key; the fleet is showing after.
async fn sign_in(browser: &Browser, gw: &Gateway) {
    browser.goto(&format!("{}/", gw.root_url)).await;
    browser.type_into("#api-key", &gw.api_key).await;
    browser.click("#sign-in").await;
    browser
        .wait_text("the fleet after signing in", "#fleet-summary", SHOWN, |t| {
            t.contains("devices")
        })
        .await;
}

/// The row of `id` in the fleet table.
fn row(id: &str) -> String {
    format!("#fleet-rows tr[data-device-id=\"{id}\"]")
}

/// Asserts nothing injected ran: no marker variable, the title intact, no blocked load.
async fn assert_nothing_ran(browser: &Browser) {
    let state = browser
        .js(
            "return {pwned: window.__pwned ?? null, title: document.title, \
             violations: document.body.dataset.cspViolations ?? '0', \
             images: document.querySelectorAll('#view img').length};",
            vec![],
        )
        .await;
    assert_eq!(
        state["pwned"],
        Value::Null,
        "an injected script ran: {state}"
    );
    assert_eq!(state["title"], TITLE, "{state}");
    assert_eq!(
        state["violations"], "0",
        "the page tripped its CSP: {state}"
    );
    assert_eq!(state["images"], 0, "device data became an element: {state}");
}

#[tokio::test]
async fn the_files_are_served_without_a_key_and_the_api_is_unchanged() {
    let gw = Gateway::start(Options::new()).await;
    let anonymous = gw.api().with_key(None);
    let page = anonymous.get_root("/").await;
    assert_eq!(page.status, 200, "{}", page.raw);
    let header = |r: &e2e::Resp, name: &str| {
        r.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    assert!(header(&page, "content-type").starts_with("text/html"));
    let csp = header(&page, "content-security-policy");
    assert!(csp.contains("script-src 'self';"), "{csp}");
    assert!(!csp.contains("unsafe"), "{csp}");
    assert_eq!(header(&page, "x-content-type-options"), "nosniff");
    let script = anonymous.get_root("/console/app.js").await;
    assert_eq!(script.status, 200);
    assert!(header(&script, "content-type").starts_with("text/javascript"));

    // The browser device learns where devices connect from the gateway itself.
    let config = anonymous.get_root("/console/config.json").await.expect(200);
    let port = gw
        .device_url
        .rsplit(':')
        .next()
        .unwrap()
        .trim_end_matches("/v1/connect");
    assert_eq!(config["device"]["port"].to_string(), port, "{config}");
    assert_eq!(config["device"]["scheme"], "wss");
    let csp_port = format!("connect-src 'self' wss://*:{port};");
    assert!(csp.contains(&csp_port), "{csp} lacks {csp_port}");

    // The API as before: the key is still needed, unknown paths are still JSON 404s.
    e2e::assert_api_error(&anonymous.get("/devices").await, 401, "unauthorized");
    e2e::assert_api_error(&anonymous.get_root("/nope").await, 404, "not_found");
    e2e::assert_api_error(
        &anonymous.get_root("/console/nope.js").await,
        404,
        "not_found",
    );
}

#[tokio::test]
async fn the_fleet_shows_simulated_devices_online_live() {
    let gw = Gateway::start(Options::new()).await;
    let Some(browser) = Browser::start().await else {
        return;
    };
    let api = gw.api();

    browser.goto(&format!("{}/", gw.root_url)).await;
    browser.type_into("#api-key", "not-the-key").await;
    browser.click("#sign-in").await;
    browser
        .wait_text("a refused key", "#sign-in-error", SHOWN, |t| {
            t.contains("refused")
        })
        .await;
    sign_in(&browser, &gw).await;
    browser
        .wait_text("an empty fleet", "#fleet-status", SHOWN, |t| {
            t.contains("No devices yet")
        })
        .await;
    // The key is kept for this tab's session only, and never put into the URL.
    let kept = browser
        .js(
            "return {session: sessionStorage.getItem('iot-gateway.api-key'), \
             local: localStorage.length, cookie: document.cookie, url: location.href};",
            vec![],
        )
        .await;
    assert_eq!(kept["session"], gw.api_key.as_str());
    assert_eq!(kept["local"], 0);
    assert_eq!(kept["cookie"], "");
    assert!(!kept["url"].as_str().unwrap().contains(&gw.api_key));

    // A device that came and went, for a row with a disconnect reason.
    let created = api
        .post(
            "/devices",
            &json!({"id": "lab-bench-01", "name": "Lab bench thermometer"}),
        )
        .await
        .expect(201);
    gw.connect(created["token"].as_str().unwrap())
        .await
        .close()
        .await;

    // Devices appear while the page is open: their connect events tell it (new ids make it
    // read the list again).
    let ids = fleet_ids("sim", 10);
    let sim = Sim::against(&gw)
        .args(["--provision", "run", "--devices", "10", "--rate", "1"])
        .spawn();
    for id in &ids {
        browser
            .wait_attr(
                &format!("{id} online"),
                &row(id),
                "data-online",
                SHOWN,
                |v| v == "true",
            )
            .await;
        let state = browser.text(&format!("{} .state", row(id))).await.unwrap();
        assert!(state.contains("online"), "{id}: {state}");
    }
    browser
        .wait_text("the summary", "#fleet-summary", SHOWN, |t| {
            t == "11 devices · 10 online"
        })
        .await;
    let bench = browser.text(&row("lab-bench-01")).await.unwrap();
    assert!(
        bench.contains("offline") && bench.contains("client_closed"),
        "{bench}"
    );
    browser
        .wait_text(
            "a live last-seen time",
            &format!("{} .last-seen", row("sim-00001")),
            SHOWN,
            |t| t == "just now" || t.ends_with("s ago"),
        )
        .await;
    assert_eq!(
        browser.attr("#stream-state", "data-state").await.as_deref(),
        Some("live")
    );
    browser
        .screenshot(&screenshot_path("console-fleet.png"))
        .await;

    // The fleet stops: every row goes offline, with the reason, without a reload.
    sim.terminate().await.success();
    for id in &ids {
        browser
            .wait_attr(
                &format!("{id} offline"),
                &row(id),
                "data-online",
                SHOWN,
                |v| v == "false",
            )
            .await;
    }
    let last = browser
        .text(&format!("{} .last-disconnect", row("sim-00003")))
        .await
        .unwrap();
    let reason = api.device("sim-00003").await["last_disconnect_reason"].clone();
    assert!(
        last.contains(reason.as_str().unwrap()),
        "page {last:?}, API {reason}"
    );
    assert_nothing_ran(&browser).await;

    browser.click("#sign-out").await;
    browser
        .wait_text("the sign-in form", "#sign-in", SHOWN, |t| t == "Sign in")
        .await;
    let key = browser
        .js(
            "return sessionStorage.getItem('iot-gateway.api-key');",
            vec![],
        )
        .await;
    assert_eq!(key, Value::Null, "signing out forgets the key");
    browser.close().await;
}

/// A climate sensor's reading at `ms` (epoch milliseconds): smooth, a little noisy, the same
/// function for the history and the live readings, so the chart joins them without a jump.
fn climate(ms: i64) -> Value {
    let t = ms as f64 / 1000.0;
    let noise = ((ms / 250) * 7919 % 101) as f64 / 101.0 - 0.5;
    let temp = 22.0 + 1.4 * (t / 45.0).sin() + 0.35 * (t / 9.0).sin() + 0.08 * noise;
    let humidity = 48.0 - 3.0 * (t / 60.0).sin() + 0.2 * noise;
    json!({
        "temp": (temp * 100.0).round() / 100.0,
        "humidity": (humidity * 10.0).round() / 10.0,
        "door": "closed",
    })
}

/// A device of the test's own, `greenhouse-7`: five minutes of stored history (one batch),
/// then a reading every 250 ms; it answers `ping` as device-sim does and rejects the rest.
/// It runs until the test's runtime ends.
async fn start_greenhouse(gw: &Gateway) {
    let created = gw
        .api()
        .post(
            "/devices",
            &json!({"id": "greenhouse-7", "name": "Greenhouse 7 climate",
                    "metadata": {"site": "north wing", "model": "TH-200"}}),
        )
        .await
        .expect(201);
    let mut device = gw.connect(created["token"].as_str().unwrap()).await;
    let now = chrono::Utc::now().timestamp_millis();
    let points: Vec<Value> = (1..=150)
        .rev()
        .map(|n| {
            let ts = now - n * 2000;
            json!({"ts": ts, "data": climate(ts)})
        })
        .collect();
    device
        .send_acked(&json!({"type": "telemetry", "id": "history", "points": points}))
        .await;
    tokio::spawn(async move {
        let mut next = tokio::time::Instant::now();
        for n in 0.. {
            if tokio::time::Instant::now() >= next {
                let data = climate(chrono::Utc::now().timestamp_millis());
                let msg = json!({"type": "telemetry", "id": format!("live-{n}"), "data": data});
                device.send_json(&msg).await;
                next += Duration::from_millis(250);
            }
            match device.next_event(Duration::from_millis(50)).await {
                e2e::Event::Json(msg) if msg["type"] == "command" => {
                    let id = msg["id"].as_str().unwrap_or_default().to_owned();
                    device.send_json(&json!({"type": "ack", "id": id})).await;
                    let outcome = match msg["name"].as_str() {
                        Some("ping") => json!({"status": "succeeded",
                            "result": {"pong": true, "ts": e2e::fmt_ms(chrono::Utc::now())}}),
                        _ => json!({"status": "rejected", "error": "unknown command"}),
                    };
                    let mut result = json!({"type": "command_result", "id": id});
                    result
                        .as_object_mut()
                        .unwrap()
                        .extend(outcome.as_object().unwrap().clone());
                    device.send_json(&result).await;
                }
                e2e::Event::Json(_) | e2e::Event::Timeout => {}
                _ => return,
            }
        }
    });
}

/// Sends `name` from the device page's form and waits for the tracker's final `status`.
async fn send_from_page(browser: &Browser, name: &str, status: &str) -> String {
    browser.type_into("#command-name", name).await;
    browser.set_value("#command-params", "{}").await;
    browser.type_into("#command-wait", "10").await;
    browser.click("#command-send").await;
    browser
        .wait_attr(
            &format!("{name} to be {status}"),
            "#command-tracker",
            "data-status",
            SHOWN,
            |s| s == status,
        )
        .await;
    browser
        .attr("#command-tracker", "data-command-id")
        .await
        .unwrap()
}

#[tokio::test]
async fn a_device_page_charts_live_points_and_sends_a_command() {
    let gw = Gateway::start(Options::new()).await;
    let Some(browser) = Browser::start().await else {
        return;
    };
    let api = gw.api();
    let _sim = Sim::against(&gw)
        .args(["--provision", "run", "--devices", "1", "--rate", "2"])
        .spawn();
    wait_all_online(&api, &fleet_ids("sim", 1), SHOWN).await;
    start_greenhouse(&gw).await;

    // A command from the form reaches a simulated device; the page follows it to the result.
    sign_in(&browser, &gw).await;
    browser
        .wait_attr(
            "sim-00001 listed",
            &row("sim-00001"),
            "data-online",
            SHOWN,
            |v| v == "true",
        )
        .await;
    browser
        .click(&format!("{} a.device-link", row("sim-00001")))
        .await;
    browser
        .wait_text("the device page", "#device-id", SHOWN, |t| t == "sim-00001")
        .await;
    let id = send_from_page(&browser, "ping", "succeeded").await;
    let result = browser.text("#command-result").await.unwrap();
    assert!(result.contains("\"pong\": true"), "{result}");
    for step in ["queued", "sent", "delivered"] {
        let class = browser
            .attr(&format!("#command-tracker [data-step=\"{step}\"]"), "class")
            .await;
        assert!(
            class.as_deref().is_some_and(|c| c.contains("step-done")),
            "{step}: {class:?}"
        );
    }
    let stored = api.get(&format!("/commands/{id}")).await.expect(200);
    assert_eq!(stored["status"], "succeeded", "{stored}");
    assert_eq!(stored["device_id"], "sim-00001");
    assert_eq!(stored["result"]["pong"], true, "{stored}");
    assert!(
        result.contains(stored["result"]["ts"].as_str().unwrap()),
        "{result} vs {stored}"
    );
    browser
        .wait_attr(
            "the command in the list",
            &format!("#command-rows tr[data-command-id=\"{id}\"]"),
            "data-status",
            SHOWN,
            |s| s == "succeeded",
        )
        .await;
    // An unknown command: the device's rejection is shown as it came.
    send_from_page(&browser, "self_destruct", "rejected").await;
    assert_eq!(
        browser.text("#command-result").await.as_deref(),
        Some("unknown command")
    );
    browser
        .wait_text("the current session", "#session-rows", SHOWN, |t| {
            t.contains("connected")
        })
        .await;

    // The chart: seeded with the stored history, then growing from `telemetry` events.
    browser
        .goto(&format!("{}/#/devices/greenhouse-7", gw.root_url))
        .await;
    browser
        .wait_text("the device page", "#device-id", SHOWN, |t| {
            t == "greenhouse-7"
        })
        .await;
    browser
        .wait_attr("the chart's key", "#chart", "data-key", SHOWN, |k| {
            k == "temp"
        })
        .await;
    let at_least = |n: u64| move |v: &str| v.parse::<u64>().is_ok_and(|v| v >= n);
    browser
        .wait_attr(
            "the history on the chart",
            "#chart",
            "data-points",
            SHOWN,
            at_least(150),
        )
        .await;
    let before: u64 = browser
        .attr("#chart", "data-points")
        .await
        .unwrap()
        .parse()
        .unwrap();
    browser
        .wait_attr(
            "live points on the chart",
            "#chart",
            "data-points",
            SHOWN,
            at_least(before + 8),
        )
        .await;
    let live: u64 = browser
        .attr("#chart", "data-live")
        .await
        .unwrap()
        .parse()
        .unwrap();
    assert!(live >= 8, "{live} points came from the event stream");
    let drawn = browser
        .js("return document.querySelector('#chart path.line').getAttribute('d').split('L').length;", vec![])
        .await;
    assert!(
        drawn.as_u64().unwrap() >= before + 8,
        "the line has {drawn} points"
    );
    let temp = browser
        .text("#latest-values tr[data-key=\"temp\"] .value")
        .await
        .unwrap();
    assert!(temp.parse::<f64>().is_ok(), "latest temp {temp:?}");

    send_from_page(&browser, "ping", "succeeded").await;
    assert_nothing_ran(&browser).await;
    browser.resize(1360, 1400).await;
    browser
        .wait_attr(
            "more live points",
            "#chart",
            "data-live",
            SHOWN,
            at_least(live + 4),
        )
        .await;
    browser
        .screenshot(&screenshot_path("console-device.png"))
        .await;
    browser.close().await;
}

#[tokio::test]
async fn the_browser_device_connects_streams_and_answers_commands() {
    let gw = Gateway::start(Options::new()).await;
    let Some(browser) = Browser::start().await else {
        return;
    };
    let api = gw.api();
    sign_in(&browser, &gw).await;
    browser.click("a[data-nav=\"browser-device\"]").await;

    // The page creates its device through the API, and finds the device listener itself.
    browser.type_into("#bd-id", "browser-e2e").await;
    browser.click("#bd-create").await;
    browser
        .wait_text("the device created", "#bd-identity-note", SHOWN, |t| {
            t.contains("Created browser-e2e")
        })
        .await;
    let url = eventually("the device URL", SHOWN, || async {
        let v = browser
            .js("return document.querySelector('#bd-url').value;", vec![])
            .await;
        v.as_str().filter(|s| !s.is_empty()).map(str::to_owned)
    })
    .await;
    assert_eq!(url, gw.device_url, "the device URL the page found");
    browser.click("#bd-connect").await;
    browser
        .wait_attr("the socket open", "#bd-state", "data-state", SHOWN, |s| {
            s == "connected"
        })
        .await;
    eventually("the browser device online", SHOWN, || async {
        (api.device("browser-e2e").await["online"] == true).then_some(())
    })
    .await;
    let sessions = api.get("/devices/browser-e2e/sessions").await.expect(200);
    assert_eq!(sessions["items"][0]["auth"], "token", "{sessions}");

    // Its telemetry is acked, hence stored.
    browser.click("#bd-send-reading").await;
    browser.click("#bd-send-reading").await;
    browser
        .wait_attr("acks", "#bd-counts", "data-acked", SHOWN, |n| {
            n.parse::<u32>().is_ok_and(|n| n >= 2)
        })
        .await;
    let stored = api.telemetry_all("browser-e2e", "order=asc").await;
    assert!(stored.len() >= 2, "{stored:?}");
    assert!(
        stored
            .iter()
            .all(|p| p["data"]["temp"].is_f64() || p["data"]["temp"].is_u64()),
        "{stored:?}"
    );
    assert!(stored
        .iter()
        .all(|p| p["id"].as_str().unwrap().starts_with("b-")));

    // Commands through the API are answered by the page.
    let command = |body: Value| {
        let api = api.clone();
        async move {
            api.post("/devices/browser-e2e/commands", &body)
                .await
                .expect(201)
        }
    };
    let ping = command(json!({"name": "ping", "wait_s": 10})).await;
    assert_eq!(ping["status"], "succeeded", "{ping}");
    assert_eq!(ping["result"]["pong"], true, "{ping}");
    let unknown = command(json!({"name": "self_destruct", "wait_s": 10})).await;
    assert_eq!(unknown["status"], "rejected", "{unknown}");
    assert_eq!(unknown["error"], "unknown command", "{unknown}");
    let faster =
        command(json!({"name": "set_interval", "params": {"interval_ms": 300}, "wait_s": 10}))
            .await;
    assert_eq!(faster["status"], "succeeded", "{faster}");
    assert_eq!(faster["result"], json!({"interval_ms": 300}));
    let log = browser.text("#bd-log").await.unwrap();
    assert!(
        log.contains(ping["id"].as_str().unwrap()),
        "the log shows the command: {log}"
    );
    // At 300 ms a reading, telemetry keeps arriving.
    let count = stored.len();
    eventually("readings at the new interval", SHOWN, || async {
        (api.telemetry_all("browser-e2e", "").await.len() >= count + 5).then_some(())
    })
    .await;

    browser.click("#bd-disconnect").await;
    let device = eventually("the browser device offline", SHOWN, || async {
        let d = api.device("browser-e2e").await;
        (d["online"] == false).then_some(d)
    })
    .await;
    assert_eq!(
        device["last_disconnect_reason"], "client_closed",
        "{device}"
    );
    assert_nothing_ran(&browser).await;
    browser.close().await;
}

#[tokio::test]
async fn device_data_is_shown_as_text_and_never_runs() {
    let gw = Gateway::start(Options::new()).await;
    let Some(browser) = Browser::start().await else {
        return;
    };
    let api = gw.api();
    let name = "<img src=x onerror=\"window.__pwned='name'\">";
    let note = "<script>window.__pwned='metadata'</script>";
    let text = "<script>window.__pwned='telemetry'; document.title='pwned'</script>";
    let result = "<script>window.__pwned='result'</script><b>bold?</b>";
    let created = api
        .post(
            "/devices",
            &json!({"id": "odd.device:1", "name": name, "metadata": {"note": note}}),
        )
        .await
        .expect(201);
    let mut device = gw.connect(created["token"].as_str().unwrap()).await;
    device
        .send_acked(&json!({"type": "telemetry", "id": "m-1", "data": {"msg": text, "temp": 1.5}}))
        .await;
    let sent = e2e::commands::create(&api, "odd.device:1", &json!({"name": "markup"})).await;
    let cmd = recv_command(&mut device).await;
    assert_eq!(cmd["id"], sent["id"]);
    answer(
        &mut device,
        cmd["id"].as_str().unwrap(),
        "succeeded",
        json!({"result": {"html": result}}),
    )
    .await;

    sign_in(&browser, &gw).await;
    let row = row("odd.device:1");
    let shown = browser
        .wait_text(
            "the device's name",
            &format!("{row} .device-name"),
            SHOWN,
            |t| !t.is_empty(),
        )
        .await;
    assert_eq!(shown, name, "the name is shown as text");
    assert_nothing_ran(&browser).await;

    browser.click(&format!("{row} a.device-link")).await;
    let msg = browser
        .wait_text(
            "the telemetry string",
            "#latest-values tr[data-key=\"msg\"] .value",
            SHOWN,
            |t| !t.is_empty(),
        )
        .await;
    assert_eq!(msg, text, "the telemetry string is shown as text");
    assert_eq!(browser.text("#device-name").await.as_deref(), Some(name));
    let metadata = browser.text("#device-metadata").await.unwrap();
    assert!(metadata.contains(note), "{metadata}");
    let outcome = browser
        .wait_text("the command result", "#command-rows .outcome", SHOWN, |t| {
            !t.is_empty()
        })
        .await;
    assert!(outcome.contains(result), "{outcome}");
    // Live data too: a second reading arrives through the event stream.
    let live = "<img src=x onerror=\"window.__pwned='live'\">";
    device
        .send_acked(&json!({"type": "telemetry", "id": "m-2", "data": {"msg": live, "temp": 2.5}}))
        .await;
    browser
        .wait_text(
            "the live string",
            "#latest-values tr[data-key=\"msg\"] .value",
            SHOWN,
            |t| t == live,
        )
        .await;
    assert_nothing_ran(&browser).await;
    browser.close().await;
}

/// Marks the DOM node of `id`'s fleet row; [`row_is_marked`] tells whether it is still the
/// same node (a reload of the list builds new rows).
async fn mark_row(browser: &Browser, id: &str) {
    browser
        .js(
            "document.querySelector(arguments[0]).dataset.marked = 'yes';",
            vec![json!(row(id))],
        )
        .await;
}

async fn row_is_marked(browser: &Browser, id: &str) -> bool {
    browser.attr(&row(id), "data-marked").await.as_deref() == Some("yes")
}

#[tokio::test]
async fn the_event_stream_resumes_after_a_drop_without_missing_events() {
    let gw = Gateway::start(Options::new()).await;
    let Some(browser) = Browser::start().await else {
        return;
    };
    let first = gw.create_device("resume-1").await;
    let second = gw.create_device("resume-2").await;
    // The console through a relay that can drop its connections, as a network would.
    let api_addr = gw.root_url.trim_start_matches("http://").parse().unwrap();
    let relay = Relay::start(Some(api_addr)).await;
    browser.goto(&format!("http://{}/", relay.addr())).await;
    browser.type_into("#api-key", &gw.api_key).await;
    browser.click("#sign-in").await;
    browser
        .wait_attr(
            "resume-1 offline",
            &row("resume-1"),
            "data-online",
            SHOWN,
            |v| v == "false",
        )
        .await;
    browser
        .wait_attr("the stream", "#stream-state", "data-state", SHOWN, |s| {
            s == "live"
        })
        .await;

    // A drop, and a device connects before the stream is back.
    let drop_while = |connect: String| {
        let (relay, gw, browser) = (&relay, &gw, &browser);
        async move {
            relay.set_backend(None);
            relay.cut();
            browser
                .wait_attr(
                    "the page to notice",
                    "#stream-state",
                    "data-state",
                    SHOWN,
                    |s| s == "reconnecting",
                )
                .await;
            let device = gw.connect(&connect).await;
            let id = device.welcome["device_id"].as_str().unwrap().to_owned();
            eventually("online in the API", SHOWN, || async {
                (gw.api().device(&id).await["online"] == true).then_some(())
            })
            .await;
            assert_eq!(
                browser.attr(&row(&id), "data-online").await.as_deref(),
                Some("false")
            );
            relay.set_backend(Some(api_addr));
            device
        }
    };

    // No event seen before the drop: nothing to resume from, so the page reads the fleet again.
    mark_row(&browser, "resume-1").await;
    let device = drop_while(first).await;
    browser
        .wait_attr(
            "resume-1 online, read again",
            &row("resume-1"),
            "data-online",
            SHOWN,
            |v| v == "true",
        )
        .await;
    assert!(
        !row_is_marked(&browser, "resume-1").await,
        "the fleet was read again"
    );
    device.close().await;
    browser
        .wait_attr(
            "resume-1 offline, live",
            &row("resume-1"),
            "data-online",
            SHOWN,
            |v| v == "false",
        )
        .await;

    // With a position (the disconnect's event id), the page resumes with Last-Event-ID and
    // the gateway replays what it missed: the same rows, changed by the replayed event.
    mark_row(&browser, "resume-2").await;
    let _device = drop_while(second).await;
    browser
        .wait_attr(
            "resume-2 online, replayed",
            &row("resume-2"),
            "data-online",
            SHOWN,
            |v| v == "true",
        )
        .await;
    browser
        .wait_attr("the stream", "#stream-state", "data-state", SHOWN, |s| {
            s == "live"
        })
        .await;
    assert!(
        row_is_marked(&browser, "resume-2").await,
        "the rows were kept, not read again"
    );
    browser.close().await;
}
