//! Mutual TLS for devices and the Origin allowlist: `gateway certs` makes a device CA and
//! client certificates; with `--device-ca` a certificate whose CN names a registered, enabled
//! device is its credential; no, expired and foreign-CA certificates are refused; token devices
//! keep working on the same listener; device-sim connects with certificates; browser upgrades
//! from an Origin not allowed get 403.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use e2e::gateway::gateway_bin;
use e2e::sim::{fleet_ids, wait_all_online, Sim};
use e2e::{json, Gateway, Options};

/// `gateway certs ARGS...` in `dir`; its stdout, asserting exit 0.
fn certs(dir: &Path, args: &[&str]) -> String {
    let out = Command::new(gateway_bin())
        .arg("certs")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run gateway certs");
    assert!(
        out.status.success(),
        "gateway certs {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 stdout")
}

/// A device CA in `dir/ca` and certificates for `ids` in `dir/ca/devices`.
fn device_ca(dir: &Path, ids: &[&str]) -> PathBuf {
    let ca = certs(dir, &["ca", "--dir", "ca"]);
    assert_eq!(ca.trim(), "ca/device-ca.pem");
    let issued = certs(dir, &[&["device", "--dir", "ca"], ids].concat());
    let expected: Vec<String> = ids
        .iter()
        .map(|id| format!("ca/devices/{id}.pem"))
        .collect();
    assert_eq!(issued.lines().collect::<Vec<_>>(), expected);
    dir.join("ca")
}

fn cert_of(ca: &Path, id: &str) -> (PathBuf, PathBuf) {
    let devices = ca.join("devices");
    (
        devices.join(format!("{id}.pem")),
        devices.join(format!("{id}-key.pem")),
    )
}

/// A certificate for `id` signed by the device CA in `ca` that expired in 2021.
fn expired_cert(ca: &Path, id: &str, out: &Path) -> (PathBuf, PathBuf) {
    let ca_pem = std::fs::read_to_string(ca.join("device-ca.pem")).unwrap();
    let ca_key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(ca.join("device-ca-key.pem")).unwrap())
            .unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_pem, ca_key).unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, id);
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let (cert_path, key_path) = (out.join("expired.pem"), out.join("expired-key.pem"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    (cert_path, key_path)
}

#[tokio::test]
async fn a_client_certificate_is_a_device_credential_and_bad_ones_fail_the_handshake() {
    let dir = tempfile::tempdir().unwrap();
    let ca = device_ca(dir.path(), &["sensor-1", "ghost", "off-1", "other-1"]);
    let gw = Gateway::start(
        Options::new().args(["--device-ca", ca.join("device-ca.pem").to_str().unwrap()]),
    )
    .await;
    let api = gw.api();
    gw.create_device("sensor-1").await;
    gw.create_device("off-1").await;
    let other_token = gw.create_device("other-1").await;
    api.patch("/devices/off-1", &json!({"enabled": false}))
        .await
        .expect(200);

    // The certificate alone: welcomed as the device its CN names, telemetry acked.
    let (cert, key) = cert_of(&ca, "sensor-1");
    let mut dev = gw
        .connect_request()
        .client_cert(&cert, &key)
        .send()
        .await
        .device();
    assert_eq!(dev.welcome["device_id"], "sensor-1");
    let ack = dev
        .request(&json!({"type": "telemetry", "id": "m-1", "data": {"temp": 21.5}}))
        .await;
    assert_eq!(ack, json!({"type": "ack", "id": "m-1"}));
    let sessions = api.get("/devices/sensor-1/sessions").await.expect(200);
    assert_eq!(sessions["items"][0]["auth"], "certificate", "{sessions}");

    // A registered name is needed, and an enabled device.
    let (cert, key) = cert_of(&ca, "ghost");
    gw.connect_request()
        .client_cert(&cert, &key)
        .send()
        .await
        .refusal()
        .assert_error(401, "unauthorized");
    let (cert, key) = cert_of(&ca, "off-1");
    gw.connect_request()
        .client_cert(&cert, &key)
        .send()
        .await
        .refusal()
        .assert_error(403, "device_disabled");
    // A token of another device next to the certificate is not a way in.
    let (cert, key) = cert_of(&ca, "sensor-1");
    gw.connect_request()
        .client_cert(&cert, &key)
        .bearer(&other_token)
        .send()
        .await
        .refusal()
        .assert_error(401, "unauthorized");

    // Neither a certificate nor a token: 401; a token device still connects by token.
    gw.connect_request()
        .send()
        .await
        .refusal()
        .assert_error(401, "unauthorized");
    let token_dev = gw
        .connect_request()
        .bearer(&other_token)
        .send()
        .await
        .device();
    assert_eq!(token_dev.welcome["device_id"], "other-1");
    let sessions = api.get("/devices/other-1/sessions").await.expect(200);
    assert_eq!(sessions["items"][0]["auth"], "token", "{sessions}");

    // Expired, or signed by another CA: the TLS handshake itself fails, no HTTP answer.
    let (cert, key) = expired_cert(&ca, "sensor-1", dir.path());
    let expired = gw
        .connect_request()
        .client_cert(&cert, &key)
        .try_exchange()
        .await;
    assert!(
        matches!(&expired, Err(e) if e.contains("CertificateExpired") || e.contains("alert")),
        "an expired certificate: {expired:?}"
    );
    let foreign_dir = tempfile::tempdir().unwrap();
    let foreign = device_ca(foreign_dir.path(), &["sensor-1"]);
    let (cert, key) = cert_of(&foreign, "sensor-1");
    let foreign = gw
        .connect_request()
        .client_cert(&cert, &key)
        .try_exchange()
        .await;
    assert!(
        matches!(&foreign, Err(e) if e.contains("UnknownCA") || e.contains("alert")),
        "a certificate of another CA: {foreign:?}"
    );

    // None of that disturbed the device that is in.
    let ack = dev
        .request(&json!({"type": "telemetry", "id": "m-2", "data": {"temp": 21.6}}))
        .await;
    assert_eq!(ack, json!({"type": "ack", "id": "m-2"}));
}

#[tokio::test]
async fn device_sim_connects_its_fleet_with_client_certificates() {
    let certs_dir = tempfile::tempdir().unwrap();
    let ids = fleet_ids("sim", 3);
    let id_refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let ca = device_ca(certs_dir.path(), &id_refs);
    let gw = Gateway::start(
        Options::new().args(["--device-ca", ca.join("device-ca.pem").to_str().unwrap()]),
    )
    .await;
    let api = gw.api();
    let sim = Sim::against(&gw)
        .args(["--client-certs", ca.join("devices").to_str().unwrap()])
        .args(["--provision", "run", "--devices", "3", "--rate", "5"])
        .spawn();
    wait_all_online(&api, &ids, Duration::from_secs(30)).await;
    for id in &ids {
        let sessions = api
            .get(&format!("/devices/{id}/sessions"))
            .await
            .expect(200);
        assert_eq!(
            sessions["items"][0]["auth"], "certificate",
            "{id}: {sessions}"
        );
    }
    e2e::eventually("readings stored", Duration::from_secs(30), || async {
        let latest = api.get("/devices/sim-00002/telemetry/latest").await;
        (latest.status == 200).then_some(())
    })
    .await;
    let out = sim.terminate().await;
    out.success();
    assert!(
        out.stdout.join("\n").contains(" errors=0 "),
        "{:?}",
        out.stdout
    );
}

#[tokio::test]
async fn browser_upgrades_from_an_origin_not_allowed_get_403() {
    let gw = Gateway::start(Options::new().args([
        "--allowed-origins",
        "https://console.example.com,https://ops.example.com/",
    ]))
    .await;
    let token = gw.create_device("browser-1").await;
    let bearer = format!("bearer.{token}");
    for origin in ["https://console.example.com", "https://OPS.example.com"] {
        let dev = gw
            .connect_request()
            .header("Origin", origin)
            .protocols(["iot-gateway.v1", &bearer])
            .send()
            .await
            .device();
        assert_eq!(dev.welcome["device_id"], "browser-1", "{origin}");
        dev.close().await;
    }
    for origin in [
        "https://evil.example.com",
        "http://console.example.com",
        "null",
    ] {
        gw.connect_request()
            .header("Origin", origin)
            .protocols(["iot-gateway.v1", &bearer])
            .send()
            .await
            .refusal()
            .assert_error(403, "origin_not_allowed");
    }
    // Devices that are not browsers send no Origin, and are not affected.
    let dev = gw.connect_request().bearer(&token).send().await.device();
    assert_eq!(dev.welcome["device_id"], "browser-1");
}
