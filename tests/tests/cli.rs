//! The operator CLI (`gateway devices|commands|telemetry|events`) run as a process against a
//! real gateway: what it prints, what it changes through the API, and its exit codes.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use chrono::Utc;
use e2e::{fmt_ms, json, Cli, Device, Event, Gateway, Options, Value};

const CLOSE_WAIT: Duration = Duration::from_secs(5);
const LINE_WAIT: Duration = Duration::from_secs(10);

/// `key: value` lines (as `show` prints them) as a map.
fn key_values(stdout: &str) -> BTreeMap<String, String> {
    stdout
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

/// The cells of a table line: columns are at least three spaces apart.
fn cells(line: &str) -> Vec<String> {
    line.split("   ")
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(str::to_string)
        .collect()
}

/// The cells of each table row under the header, the header checked.
#[track_caller]
fn table_rows(stdout: &str, header: &[&str]) -> Vec<Vec<String>> {
    let mut lines = stdout.lines();
    assert_eq!(
        cells(lines.next().unwrap_or_default()),
        header,
        "table header in:\n{stdout}"
    );
    lines.map(cells).collect()
}

/// The token on the `token: ...` line of `devices create` or `devices rotate-token`.
#[track_caller]
fn token_line(stdout: &str) -> String {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("token: "))
        .unwrap_or_else(|| panic!("no `token: ` line in:\n{stdout}"))
        .to_string()
}

/// A directory with nothing in it: no `data/api-key`, no `certs/ca.pem`.
fn empty_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("e2e-cli-")
        .tempdir()
        .expect("temporary directory")
}

fn ids(items: &Value) -> Vec<&str> {
    items
        .as_array()
        .unwrap_or_else(|| panic!("not an array: {items}"))
        .iter()
        .map(|i| i["id"].as_str().expect("id"))
        .collect()
}

async fn wait_online(gw: &Gateway, id: &str, online: bool) {
    let api = gw.api();
    e2e::eventually(&format!("{id} online={online}"), CLOSE_WAIT, || async {
        (api.device(id).await["online"] == online).then_some(())
    })
    .await;
}

#[tokio::test]
async fn devices_create_prints_a_token_that_lets_the_device_connect() {
    let gw = Gateway::start(Options::new()).await;
    let out = gw
        .cli()
        .args(["devices", "create", "sensor-1", "--name", "Boiler room"])
        .args(["--metadata", r#"{"site":"north"}"#])
        .run()
        .await;
    let stdout = out.success();
    assert!(
        stdout.contains("only this once"),
        "no warning that the token is shown once:\n{stdout}"
    );
    let token = token_line(stdout);
    let mut dev = gw.connect(&token).await;
    dev.send_acked(&json!({"type": "telemetry", "id": "m-1", "data": {"temp": 21.5}}))
        .await;
    let device = gw.api().device("sensor-1").await;
    assert_eq!(device["name"], "Boiler room");
    assert_eq!(device["metadata"], json!({"site": "north"}));

    let created = gw
        .cli()
        .args(["devices", "create", "sensor-2", "--json"])
        .run()
        .await
        .json();
    assert_eq!(created["id"], "sensor-2");
    gw.connect(created["token"].as_str().expect("token in --json"))
        .await;

    let again = gw.cli().args(["devices", "create", "sensor-2"]).run().await;
    let line = again.error_line(1);
    assert!(line.starts_with("gateway: 409 conflict: "), "{line}");
    assert!(again.stdout.is_empty(), "stdout: {}", again.stdout);
}

#[tokio::test]
async fn devices_list_and_show_as_tables_and_json() {
    let gw = Gateway::start(Options::new()).await;
    let api = gw.api();
    api.create_device("a-1").await;
    let token = api.create_device("b-2").await;
    api.create_device("c-3").await;
    let _dev = gw.connect(&token).await;
    wait_online(&gw, "b-2", true).await;

    let out = gw.cli().args(["devices", "list"]).run().await;
    let rows = table_rows(
        out.success(),
        &[
            "ID",
            "NAME",
            "ENABLED",
            "ONLINE",
            "LAST SEEN",
            "LAST DISCONNECT",
        ],
    );
    let listed: Vec<[&str; 4]> = rows
        .iter()
        .map(|r| [&r[0], &r[1], &r[2], &r[3]].map(String::as_str))
        .collect();
    assert_eq!(
        listed,
        [
            ["a-1", "test a-1", "true", "false"],
            ["b-2", "test b-2", "true", "true"],
            ["c-3", "test c-3", "true", "false"],
        ],
        "ID, NAME, ENABLED, ONLINE:\n{}",
        out.stdout
    );
    assert!(
        rows[1][4].ends_with(" ago"),
        "LAST SEEN of b-2:\n{}",
        out.stdout
    );
    assert_eq!(rows[0][4], "-", "LAST SEEN of a device never seen");

    let out = gw.cli().args(["devices", "list", "--online"]).run().await;
    let rows = table_rows(
        out.success(),
        &[
            "ID",
            "NAME",
            "ENABLED",
            "ONLINE",
            "LAST SEEN",
            "LAST DISCONNECT",
        ],
    );
    assert_eq!(rows.len(), 1, "{}", out.stdout);
    assert_eq!(rows[0][0], "b-2");

    let all = gw
        .cli()
        .args(["devices", "list", "--json"])
        .run()
        .await
        .json();
    assert_eq!(ids(&all), ["a-1", "b-2", "c-3"]);
    let from_api = api.get("/devices").await.expect(200);
    for (cli, api) in all
        .as_array()
        .unwrap()
        .iter()
        .zip(from_api["items"].as_array().unwrap())
    {
        for field in ["id", "name", "metadata", "enabled", "online", "created_at"] {
            assert_eq!(cli[field], api[field], "{field} of {}", api["id"]);
        }
    }
    let two = gw
        .cli()
        .args(["devices", "list", "--limit", "2", "--json"])
        .run()
        .await
        .json();
    assert_eq!(ids(&two), ["a-1", "b-2"]);

    let out = gw.cli().args(["devices", "show", "b-2"]).run().await;
    let shown = key_values(out.success());
    assert_eq!(shown["id"], "b-2");
    assert_eq!(shown["name"], "test b-2");
    assert_eq!(shown["online"], "true");
    assert_eq!(shown["last_disconnected_at"], "-");
    let json = gw
        .cli()
        .args(["devices", "show", "b-2", "--json"])
        .run()
        .await
        .json();
    assert_eq!(json["id"], "b-2");
    assert_eq!(json["online"], true);
    assert_eq!(json["created_at"], from_api["items"][1]["created_at"]);

    let missing = gw.cli().args(["devices", "show", "nope"]).run().await;
    let line = missing.error_line(1);
    assert!(line.starts_with("gateway: 404 not_found: "), "{line}");
}

#[tokio::test]
async fn devices_disable_enable_rotate_token_and_delete_take_effect() {
    let gw = Gateway::start(Options::new()).await;
    let api = gw.api();
    let token = api.create_device("sensor-1").await;
    let mut dev = gw.connect(&token).await;

    let out = gw
        .cli()
        .args(["devices", "disable", "sensor-1"])
        .run()
        .await;
    assert!(out.success().contains("disabled"), "{}", out.stdout);
    assert_eq!(dev.expect_close(CLOSE_WAIT).await.0, 4003);
    assert_eq!(api.device("sensor-1").await["enabled"], false);
    gw.connect_request()
        .bearer(&token)
        .send()
        .await
        .refusal()
        .assert_error(403, "device_disabled");

    let enabled = gw
        .cli()
        .args(["devices", "enable", "sensor-1", "--json"])
        .run()
        .await
        .json();
    assert_eq!(enabled["enabled"], true);
    assert_eq!(api.device("sensor-1").await["enabled"], true);
    let mut dev = gw.connect(&token).await;

    let out = gw
        .cli()
        .args(["devices", "rotate-token", "sensor-1"])
        .run()
        .await;
    let new_token = token_line(out.success());
    assert_ne!(new_token, token);
    assert_eq!(dev.expect_close(CLOSE_WAIT).await.0, 4003);
    gw.connect_request()
        .bearer(&token)
        .send()
        .await
        .refusal()
        .assert_error(401, "unauthorized");
    gw.connect(&new_token).await.close().await;

    let rotated = gw
        .cli()
        .args(["devices", "rotate-token", "sensor-1", "--json"])
        .run()
        .await
        .json();
    let newest = rotated["token"].as_str().expect("token in --json");
    gw.connect(newest).await.close().await;

    let out = gw.cli().args(["devices", "delete", "sensor-1"]).run().await;
    assert!(out.success().contains("deleted"), "{}", out.stdout);
    let gone = api.get("/devices/sensor-1").await;
    assert_eq!(gone.status, 404, "{}", gone.raw);

    let again = gw.cli().args(["devices", "delete", "sensor-1"]).run().await;
    let line = again.error_line(1);
    assert!(line.starts_with("gateway: 404 not_found: "), "{line}");
}

#[tokio::test]
async fn usage_errors_exit_2_and_change_nothing() {
    let gw = Gateway::start(Options::new()).await;
    for args in [
        vec!["devices"],
        vec!["devices", "create"],
        vec!["devices", "frobnicate"],
        vec!["devices", "list", "--limit", "many"],
        vec!["devices", "create", "x-1", "--metadata", "[1]"],
        vec!["devices", "create", "x-2", "--metadata", "{nope"],
        vec!["commands", "send", "x-3", "reboot", "--params", "{nope"],
        vec!["commands", "send", "x-3", "reboot", "--wait", "soon"],
        vec!["telemetry", "x-4", "--since", "yesterday"],
    ] {
        let out = gw.cli().args(args.iter().copied()).run().await;
        assert_eq!(
            out.code,
            Some(2),
            "gateway {args:?}: stdout {} stderr {}",
            out.stdout,
            out.stderr
        );
        assert!(
            out.stdout.is_empty(),
            "gateway {args:?} printed {}",
            out.stdout
        );
        assert!(!out.stderr.trim().is_empty(), "gateway {args:?}: no error");
    }
    let listed = gw.api().get("/devices").await.expect(200);
    assert_eq!(
        listed["items"],
        json!([]),
        "a usage error created something"
    );

    let bad_url = Cli::new(gw.dir())
        .args(["devices", "list", "--api-url", "ftp://127.0.0.1/v1"])
        .args(["--api-key", &gw.api_key])
        .run()
        .await;
    bad_url.error_line(2);

    // No --api-key, no GATEWAY_API_KEY and no data/api-key where it runs.
    let dir = empty_dir();
    let out = Cli::new(dir.path())
        .args(["devices", "list", "--api-url", &gw.api_url])
        .run()
        .await;
    let line = out.error_line(2);
    assert!(
        line.contains("--api-key") && line.contains("GATEWAY_API_KEY"),
        "the error should say how to pass the key: {line}"
    );
}

#[tokio::test]
async fn wrong_api_key_exits_1_with_one_line_that_hides_the_key() {
    let gw = Gateway::start(Options::new()).await;
    let wrong = format!("wrong-{}", e2e::random_token(24));
    let dir = empty_dir();
    for cli in [
        Cli::new(dir.path()).tail(["--api-url", &gw.api_url, "--api-key", &wrong]),
        Cli::new(dir.path())
            .env("GATEWAY_API_URL", &gw.api_url)
            .env("GATEWAY_API_KEY", &wrong),
    ] {
        let out = cli.args(["devices", "list"]).run().await;
        let line = out.error_line(1);
        assert!(line.starts_with("gateway: 401 unauthorized: "), "{line}");
        assert!(out.stdout.is_empty(), "stdout: {}", out.stdout);
        assert!(
            !out.stderr.contains(&wrong),
            "the key was printed: {}",
            out.stderr
        );
    }
}

#[tokio::test]
async fn unreachable_api_exits_3_with_one_line() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr").port()
    };
    let dir = empty_dir();
    let started = Instant::now();
    let out = Cli::new(dir.path())
        .args(["devices", "list"])
        .args(["--api-url", &format!("http://127.0.0.1:{port}/v1")])
        .args(["--api-key", "k"])
        .run()
        .await;
    let line = out.error_line(3);
    assert!(line.contains("cannot reach the API"), "{line}");
    assert!(out.stdout.is_empty());
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn api_url_as_printed_or_without_v1_and_key_from_environment_or_data_dir() {
    let gw = Gateway::start(Options::new().generated_api_key()).await;
    gw.api().create_device("sensor-1").await;
    let root = gw.api_url.strip_suffix("/v1").expect("api url ends in /v1");

    // In the gateway's directory, data/api-key is found without being named.
    for url in [
        gw.api_url.clone(),
        format!("{}/", gw.api_url),
        root.to_string(),
    ] {
        let out = Cli::new(gw.dir())
            .args(["devices", "list", "--json", "--api-url", &url])
            .run()
            .await;
        assert_eq!(ids(&out.json()), ["sensor-1"], "--api-url {url}");
    }

    let dir = empty_dir();
    let out = Cli::new(dir.path())
        .env("GATEWAY_API_URL", &format!("{root}/"))
        .env("GATEWAY_API_KEY", &gw.api_key)
        .args(["devices", "show", "sensor-1", "--json"])
        .run()
        .await;
    assert_eq!(out.json()["id"], "sensor-1");
}

#[tokio::test]
async fn https_api_is_trusted_through_the_development_ca() {
    let gw = Gateway::start(Options::new().args(["--api-tls"])).await;
    assert!(gw.api_url.starts_with("https://"), "{}", gw.api_url);

    // The gateway's directory has certs/ca.pem, used by default.
    gw.cli()
        .args(["devices", "create", "sensor-1"])
        .run()
        .await
        .success();
    let out = gw.cli().args(["devices", "list", "--json"]).run().await;
    assert_eq!(ids(&out.json()), ["sensor-1"]);

    let dir = empty_dir();
    let ca = gw.ca_pem_path.to_str().expect("utf-8 path");
    let conn = ["--api-url", &gw.api_url, "--api-key", &gw.api_key];
    let out = Cli::new(dir.path())
        .args(["devices", "list", "--json", "--ca", ca])
        .args(conn)
        .run()
        .await;
    assert_eq!(ids(&out.json()), ["sensor-1"]);
    let out = Cli::new(dir.path())
        .env("GATEWAY_CA", ca)
        .args(["devices", "list", "--json"])
        .args(conn)
        .run()
        .await;
    assert_eq!(ids(&out.json()), ["sensor-1"]);

    // Elsewhere, without --ca, the development certificate is not trusted: a TLS failure.
    let out = Cli::new(dir.path())
        .args(["devices", "list"])
        .args(conn)
        .run()
        .await;
    let line = out.error_line(3);
    assert!(line.contains("certificate"), "{line}");
}

#[tokio::test]
async fn telemetry_shows_stored_points_oldest_first() {
    let gw = Gateway::start(Options::new()).await;
    let token = gw.create_device("sensor-1").await;
    let mut dev = gw.connect(&token).await;
    let now = Utc::now();
    let at = |ago_s: i64| fmt_ms(now - chrono::Duration::seconds(ago_s));
    dev.send_acked(
        &json!({"type": "telemetry", "id": "old", "ts": at(7200), "data": {"temp": 9.5}}),
    )
    .await;
    dev.send_acked(&json!({"type": "telemetry", "id": "m-1", "ts": at(180),
                          "data": {"temp": 20.5, "door": "open"}}))
        .await;
    dev.send_acked(&json!({"type": "telemetry", "id": "m-2", "points": [
        {"ts": at(120), "data": {"temp": 21.0}},
        {"ts": at(60), "data": {"temp": 21.5, "door": "shut"}},
        {"ts": at(30), "data": {"temp": 22.0}},
    ]}))
    .await;

    let out = gw.cli().args(["telemetry", "sensor-1"]).run().await;
    let rows = table_rows(out.success(), &["TS", "ID", "SEQ", "DATA"]);
    let shown: Vec<(String, String, String)> = rows
        .iter()
        .map(|r| (r[0].clone(), r[1].clone(), r[2].clone()))
        .collect();
    let expected = [
        (at(180), "m-1", "0"),
        (at(120), "m-2", "0"),
        (at(60), "m-2", "1"),
        (at(30), "m-2", "2"),
    ]
    .map(|(ts, id, seq)| (ts, id.to_string(), seq.to_string()));
    assert_eq!(
        shown, expected,
        "the last hour, oldest first:\n{}",
        out.stdout
    );
    assert!(
        out.stdout.contains(r#"{"temp":21.5,"door":"shut"}"#),
        "DATA column:\n{}",
        out.stdout
    );

    let out = gw
        .cli()
        .args(["telemetry", "sensor-1", "--since", "3h", "--json"])
        .run()
        .await;
    let items = out.json();
    assert_eq!(ids(&items), ["old", "m-1", "m-2", "m-2", "m-2"]);
    assert_eq!(items[1]["data"], json!({"temp": 20.5, "door": "open"}));

    let newest = gw
        .cli()
        .args([
            "telemetry",
            "sensor-1",
            "--limit",
            "2",
            "--keys",
            "door",
            "--json",
        ])
        .run()
        .await
        .json();
    let data: Vec<&Value> = newest
        .as_array()
        .unwrap()
        .iter()
        .map(|i| &i["data"])
        .collect();
    assert_eq!(data, [&json!({"door": "shut"}), &json!({})], "{newest}");
    assert_eq!(newest[0]["seq"], 1);

    let unknown = gw.cli().args(["telemetry", "nope"]).run().await;
    let line = unknown.error_line(1);
    assert!(line.starts_with("gateway: 404 not_found: "), "{line}");
}

#[tokio::test]
async fn telemetry_limit_0_follows_cursors_past_one_page() {
    let gw = Gateway::start(Options::new()).await;
    let token = gw.create_device("sensor-1").await;
    let mut dev = gw.connect(&token).await;
    let points: Vec<Value> = (0..1000).map(|i| json!({"data": {"n": i}})).collect();
    dev.send_acked(&json!({"type": "telemetry", "id": "batch", "points": points}))
        .await;
    for i in 0..5 {
        dev.send_acked(&json!({"type": "telemetry", "id": format!("m-{i}"), "data": {"n": i}}))
            .await;
    }
    let all = gw
        .cli()
        .args(["telemetry", "sensor-1", "--limit", "0", "--json"])
        .run()
        .await
        .json();
    assert_eq!(all.as_array().unwrap().len(), 1005);
    let default = gw
        .cli()
        .args(["telemetry", "sensor-1", "--json"])
        .run()
        .await
        .json();
    assert_eq!(
        default.as_array().unwrap().len(),
        100,
        "the default --limit"
    );
}

/// Answers every command the device receives with `status` (and an error unless it succeeded).
fn answer_commands(mut dev: Device, status: &'static str) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            match dev.next_event(Duration::from_secs(60)).await {
                Event::Json(msg) if msg["type"] == "command" => {
                    let extra = if status == "succeeded" {
                        json!({"result": {"echo": msg["params"]}})
                    } else {
                        json!({"error": "disk full"})
                    };
                    let id = msg["id"].as_str().expect("command id");
                    e2e::commands::answer(&mut dev, id, status, extra).await;
                }
                Event::Json(_) => continue,
                _ => return,
            }
        }
    })
}

#[tokio::test]
async fn commands_send_wait_shows_succeeded_for_a_device_that_answers() {
    let gw = Gateway::start(Options::new()).await;
    let token = gw.create_device("sensor-1").await;
    let responder = answer_commands(gw.connect(&token).await, "succeeded");

    let out = gw
        .cli()
        .args([
            "commands",
            "send",
            "sensor-1",
            "reboot",
            "--params",
            r#"{"delay_s":1}"#,
        ])
        .args(["--wait", "5s"])
        .run()
        .await;
    let shown = key_values(out.success());
    assert_eq!(shown["status"], "succeeded", "{}", out.stdout);
    assert_eq!(shown["result"], r#"{"echo":{"delay_s":1}}"#);
    let id = shown["id"].clone();

    let sent = gw
        .cli()
        .args([
            "commands", "send", "sensor-1", "ping", "--wait", "5s", "--json",
        ])
        .run()
        .await
        .json();
    assert_eq!(sent["status"], "succeeded");
    assert_eq!(sent["name"], "ping");

    let shown = gw
        .cli()
        .args(["commands", "show", &id, "--json"])
        .run()
        .await
        .json();
    assert_eq!(shown["status"], "succeeded");
    assert_eq!(shown["device_id"], "sensor-1");

    let out = gw.cli().args(["commands", "list", "sensor-1"]).run().await;
    let rows = table_rows(
        out.success(),
        &[
            "ID",
            "NAME",
            "STATUS",
            "CREATED",
            "COMPLETED",
            "RESULT/ERROR",
        ],
    );
    let listed: Vec<(&str, &str)> = rows
        .iter()
        .map(|r| (r[1].as_str(), r[2].as_str()))
        .collect();
    assert_eq!(
        listed,
        [("ping", "succeeded"), ("reboot", "succeeded")],
        "newest first"
    );
    let listed = gw
        .cli()
        .args([
            "commands",
            "list",
            "sensor-1",
            "--status",
            "succeeded",
            "--json",
        ])
        .run()
        .await
        .json();
    assert_eq!(ids(&listed), [sent["id"].as_str().unwrap(), id.as_str()]);
    let none = gw
        .cli()
        .args([
            "commands", "list", "sensor-1", "--status", "failed", "--json",
        ])
        .run()
        .await
        .json();
    assert_eq!(none, json!([]));
    responder.abort();
}

#[tokio::test]
async fn commands_send_wait_exits_4_when_the_command_fails() {
    let gw = Gateway::start(Options::new()).await;
    let token = gw.create_device("sensor-1").await;
    let responder = answer_commands(gw.connect(&token).await, "failed");

    let out = gw
        .cli()
        .args([
            "commands",
            "send",
            "sensor-1",
            "format-disk",
            "--wait",
            "5s",
        ])
        .run()
        .await;
    let line = out.error_line(4);
    assert!(
        line.contains("failed") && line.contains("disk full"),
        "{line}"
    );
    assert_eq!(
        key_values(&out.stdout)["status"],
        "failed",
        "{}",
        out.stdout
    );
    responder.abort();
}

#[tokio::test]
async fn commands_send_wait_to_an_offline_device_exits_5_and_cancel_cancels() {
    let gw = Gateway::start(Options::new()).await;
    gw.create_device("sensor-1").await;

    let started = Instant::now();
    let out = gw
        .cli()
        .args([
            "commands", "send", "sensor-1", "reboot", "--wait", "1s", "--ttl", "10m",
        ])
        .run()
        .await;
    let line = out.error_line(5);
    assert!(line.contains("still queued"), "{line}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    let id = key_values(&out.stdout)["id"].clone();

    let out = gw.cli().args(["commands", "cancel", &id]).run().await;
    assert!(out.success().contains("canceled"), "{}", out.stdout);
    let shown = key_values(
        gw.cli()
            .args(["commands", "show", &id])
            .run()
            .await
            .success(),
    );
    assert_eq!(shown["status"], "canceled");

    let again = gw.cli().args(["commands", "cancel", &id]).run().await;
    let line = again.error_line(1);
    assert!(line.starts_with("gateway: 409 conflict: "), "{line}");

    // Without --wait the command is queued and the exit code is 0.
    let queued = gw
        .cli()
        .args(["commands", "send", "sensor-1", "reboot", "--json"])
        .run()
        .await
        .json();
    assert_eq!(queued["status"], "queued");

    let unknown = gw
        .cli()
        .args(["commands", "send", "nope", "reboot"])
        .run()
        .await;
    let line = unknown.error_line(1);
    assert!(line.starts_with("gateway: 404 not_found: "), "{line}");
}

#[tokio::test]
async fn events_prints_a_line_when_the_device_connects() {
    let gw = Gateway::start(Options::new()).await;
    let token = gw.create_device("sensor-1").await;
    let other = gw.create_device("other").await;

    let mut events = gw.cli().args(["events", "--device", "sensor-1"]).spawn();
    // The header comes once the stream is open.
    events
        .line_where(LINE_WAIT, |l| l.starts_with("TIME"))
        .await;
    let _other = gw.connect(&other).await;
    let dev = gw.connect(&token).await;
    let line = events
        .line_where(LINE_WAIT, |l| l.contains("device.connected"))
        .await;
    assert!(line.contains("sensor-1"), "{line}");
    assert!(line.contains(dev.session_id()), "{line}");
    dev.close().await;
    let line = events
        .line_where(LINE_WAIT, |l| l.contains("device.disconnected"))
        .await;
    assert!(
        line.contains("sensor-1") && line.contains("client_closed"),
        "{line}"
    );
    // --device keeps the other device's connect out.
    assert!(
        events.seen[1..].iter().all(|l| l.contains("sensor-1")),
        "lines for another device:\n{}",
        events.seen.join("\n")
    );
    events.kill().await;
}

#[tokio::test]
async fn events_json_is_one_object_per_line() {
    let gw = Gateway::start(Options::new()).await;
    let token = gw.create_device("sensor-1").await;
    let mut dev = gw.connect(&token).await;
    let mut events = gw
        .cli()
        .args(["events", "--device", "sensor-1", "--json"])
        .spawn();
    // No header in JSON: send until the stream (opened at some point) shows a point.
    let deadline = Instant::now() + LINE_WAIT;
    let line = loop {
        assert!(Instant::now() < deadline, "no telemetry event printed");
        let id = e2e::unique_id("m");
        dev.send_acked(&json!({"type": "telemetry", "id": id, "data": {"temp": 21.5}}))
            .await;
        if let Some(line) = events.next_line(Duration::from_millis(300)).await {
            break line;
        }
    };
    let event: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
    assert_eq!(event["event"], "telemetry", "{event}");
    assert!(event["id"].is_string(), "{event}");
    assert_eq!(event["data"]["device_id"], "sensor-1");
    assert_eq!(event["data"]["data"], json!({"temp": 21.5}));
    events.kill().await;
}

#[tokio::test]
async fn telemetry_follow_prints_history_then_new_points() {
    let gw = Gateway::start(Options::new()).await;
    let token = gw.create_device("sensor-1").await;
    let mut dev = gw.connect(&token).await;
    dev.send_acked(&json!({"type": "telemetry", "id": "before", "data": {"temp": 20.0}}))
        .await;

    let mut follow = gw.cli().args(["telemetry", "sensor-1", "--follow"]).spawn();
    follow.line_where(LINE_WAIT, |l| l.starts_with("TS")).await;
    follow.line_where(LINE_WAIT, |l| l.contains("before")).await;
    // The history is printed after the stream was opened, so the next point is streamed.
    dev.send_acked(&json!({"type": "telemetry", "id": "after", "data": {"temp": 23.0}}))
        .await;
    let line = follow.line_where(LINE_WAIT, |l| l.contains("after")).await;
    assert!(
        line.contains(r#"{"temp":23.0}"#) || line.contains(r#"{"temp":23}"#),
        "{line}"
    );
    follow.kill().await;
}
