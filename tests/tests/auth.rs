//! Device authentication during the WebSocket upgrade: header and subprotocol tokens, refusals.

use e2e::{json, random_token, Gateway, Options};

#[tokio::test]
async fn header_token_is_accepted_without_subprotocol() {
    let gw = Gateway::start(Options::new()).await;
    let token = gw.create_device("sensor-1").await;

    let dev = gw.connect_request().bearer(&token).send().await.device();
    assert_eq!(dev.welcome["type"], "welcome");
    assert_eq!(dev.welcome["device_id"], "sensor-1");
    assert_eq!(
        dev.protocol, None,
        "no subprotocol was offered, so none may be selected"
    );
}

#[tokio::test]
async fn header_token_with_offered_subprotocol_echoes_it() {
    let gw = Gateway::start(Options::new()).await;
    let token = gw.create_device("sensor-1").await;

    let dev = gw
        .connect_request()
        .bearer(&token)
        .protocols(["iot-gateway.v1"])
        .send()
        .await
        .device();
    assert_eq!(dev.protocol.as_deref(), Some("iot-gateway.v1"));
    assert_eq!(dev.welcome["device_id"], "sensor-1");
}

#[tokio::test]
async fn bearer_subprotocol_is_accepted_and_never_echoed() {
    let gw = Gateway::start(Options::new()).await;
    let token = gw.create_device("browser-1").await;
    let bearer = format!("bearer.{token}");

    for offered in [
        vec!["iot-gateway.v1".to_string(), bearer.clone()],
        vec![bearer.clone(), "iot-gateway.v1".to_string()],
    ] {
        let dev = gw
            .connect_request()
            .protocols(offered.clone())
            .send()
            .await
            .device();
        assert_eq!(
            dev.protocol.as_deref(),
            Some("iot-gateway.v1"),
            "selected subprotocol when offering {offered:?}"
        );
        assert_eq!(dev.welcome["device_id"], "browser-1");
        dev.close().await;
    }
}

#[tokio::test]
async fn tls_name_localhost_is_valid() {
    let gw = Gateway::start(Options::new()).await;
    let token = gw.create_device("sensor-1").await;
    let dev = gw
        .connect_request()
        .server_name("localhost")
        .bearer(&token)
        .send()
        .await
        .device();
    assert_eq!(dev.welcome["device_id"], "sensor-1");
}

#[tokio::test]
async fn missing_credentials_are_401() {
    let gw = Gateway::start(Options::new()).await;
    gw.create_device("sensor-1").await;

    gw.connect_request()
        .send()
        .await
        .refusal()
        .assert_error(401, "unauthorized");
    gw.connect_request()
        .protocols(["iot-gateway.v1"])
        .send()
        .await
        .refusal()
        .assert_error(401, "unauthorized");
}

#[tokio::test]
async fn wrong_tokens_are_401() {
    let gw = Gateway::start(Options::new()).await;
    let token = gw.create_device("sensor-1").await;

    let wrong = random_token(43);
    gw.connect_request()
        .bearer(&wrong)
        .send()
        .await
        .refusal()
        .assert_error(401, "unauthorized");
    // The right token with one character changed.
    let mut altered = token.clone();
    let last = altered.pop().unwrap();
    altered.push(if last == 'A' { 'B' } else { 'A' });
    gw.connect_request()
        .bearer(&altered)
        .send()
        .await
        .refusal()
        .assert_error(401, "unauthorized");
    gw.connect_request()
        .protocols(["iot-gateway.v1".to_string(), format!("bearer.{wrong}")])
        .send()
        .await
        .refusal()
        .assert_error(401, "unauthorized");
    gw.connect_request()
        .header("Authorization", &format!("Basic {token}"))
        .send()
        .await
        .refusal()
        .assert_error(401, "unauthorized");
}

#[tokio::test]
async fn disabled_device_is_403() {
    let gw = Gateway::start(Options::new()).await;
    let token = gw.create_device("sensor-1").await;
    gw.api()
        .patch("/devices/sensor-1", &json!({"enabled": false}))
        .await
        .expect(200);

    gw.connect_request()
        .bearer(&token)
        .send()
        .await
        .refusal()
        .assert_error(403, "device_disabled");
    gw.connect_request()
        .protocols(["iot-gateway.v1".to_string(), format!("bearer.{token}")])
        .send()
        .await
        .refusal()
        .assert_error(403, "device_disabled");

    gw.api()
        .patch("/devices/sensor-1", &json!({"enabled": true}))
        .await
        .expect(200);
    let dev = gw.connect(&token).await;
    assert_eq!(dev.welcome["device_id"], "sensor-1");
}

#[tokio::test]
async fn plain_get_without_upgrade_is_400() {
    let gw = Gateway::start(Options::new()).await;
    let token = gw.create_device("sensor-1").await;

    gw.connect_request()
        .bearer(&token)
        .without_upgrade()
        .send()
        .await
        .refusal()
        .assert_error(400, "bad_request");
}

#[tokio::test]
async fn token_in_query_string_is_400() {
    let gw = Gateway::start(Options::new()).await;
    let token = gw.create_device("sensor-1").await;

    for param in ["token", "access_token"] {
        let refusal = gw
            .connect_request()
            .query(&format!("{param}={token}"))
            .send()
            .await
            .refusal();
        refusal.assert_error(400, "bad_request");
        assert!(
            !refusal.raw.contains(&token),
            "the refusal echoes the token: {}",
            refusal.raw
        );
        // Even next to a valid header, a token in the URL is refused.
        gw.connect_request()
            .bearer(&token)
            .query(&format!("{param}={token}"))
            .send()
            .await
            .refusal()
            .assert_error(400, "bad_request");
    }
}

#[tokio::test]
async fn rotated_token_replaces_the_old_one() {
    let gw = Gateway::start(Options::new()).await;
    let old = gw.create_device("sensor-1").await;

    let body = gw
        .api()
        .post("/devices/sensor-1/token", &json!({}))
        .await
        .expect(200);
    let new = body["token"].as_str().expect("token in rotate response");
    assert_ne!(new, old);

    gw.connect_request()
        .bearer(&old)
        .send()
        .await
        .refusal()
        .assert_error(401, "unauthorized");
    let dev = gw.connect(new).await;
    assert_eq!(dev.welcome["device_id"], "sensor-1");
}

#[tokio::test]
async fn issued_tokens_are_opaque_url_safe_strings() {
    let gw = Gateway::start(Options::new()).await;
    let a = gw.create_device("a").await;
    let b = gw.create_device("b").await;
    for t in [&a, &b] {
        assert!(t.len() >= 20, "token {t:?} is too short to be high-entropy");
        assert!(
            t.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'),
            "token {t:?} has characters outside [A-Za-z0-9_-]"
        );
    }
    assert_ne!(a, b);
}

#[tokio::test]
async fn connection_limit_is_503_with_retry_after() {
    let gw = Gateway::start(Options::new().args(["--max-connections", "2"])).await;
    let a = gw.create_device("a").await;
    let b = gw.create_device("b").await;
    let c = gw.create_device("c").await;

    let dev_a = gw.connect(&a).await;
    let _dev_b = gw.connect(&b).await;
    let refusal = gw.connect_request().bearer(&c).send().await.refusal();
    refusal.assert_error(503, "unavailable");
    assert!(
        refusal.header("retry-after").is_some(),
        "503 without Retry-After"
    );

    dev_a.close().await;
    let token = c.clone();
    let gw_ref = &gw;
    e2e::eventually(
        "a free connection slot",
        std::time::Duration::from_secs(5),
        || {
            let token = token.clone();
            async move {
                match gw_ref.connect_request().bearer(&token).send().await {
                    e2e::Handshake::Upgraded(d) => Some(d),
                    e2e::Handshake::Refused(_) => None,
                }
            }
        },
    )
    .await;
}

#[tokio::test]
async fn flapping_device_gets_429_with_retry_after() {
    let gw = Gateway::start(Options::new().args(["--device-connects-per-min", "3"])).await;
    let token = gw.create_device("flappy").await;
    let other = gw.create_device("steady").await;

    for _ in 0..3 {
        gw.connect(&token).await.close().await;
    }
    let refusal = gw.connect_request().bearer(&token).send().await.refusal();
    refusal.assert_error(429, "too_many_connections");
    assert!(
        refusal.header("retry-after").is_some(),
        "429 without Retry-After"
    );
    // The guard is per device: another device connects as usual.
    let dev = gw.connect(&other).await;
    assert_eq!(dev.welcome["device_id"], "steady");
}

#[tokio::test]
async fn per_ip_limit_gets_429() {
    let gw = Gateway::start(Options::new().args(["--max-connections-per-ip", "2"])).await;
    let a = gw.create_device("a").await;
    let b = gw.create_device("b").await;
    let c = gw.create_device("c").await;

    let _dev_a = gw.connect(&a).await;
    let _dev_b = gw.connect(&b).await;
    let refusal = gw.connect_request().bearer(&c).send().await.refusal();
    refusal.assert_error(429, "too_many_connections");
    assert!(
        refusal.header("retry-after").is_some(),
        "429 without Retry-After"
    );
}

#[tokio::test]
async fn silent_clients_are_cut_off_after_the_handshake_timeout_without_stalling_others() {
    use tokio::io::AsyncReadExt;

    let gw = Gateway::start(Options::new().args(["--handshake-timeout", "2s"])).await;
    let token = gw.create_device("sensor-1").await;
    let request = gw.connect_request();
    let started = std::time::Instant::now();

    // One client that never starts TLS, one that stops after TLS.
    let mut tcp = tokio::net::TcpStream::connect(request.addr())
        .await
        .expect("connect");
    let mut tls = request.tls_only().await;

    // Meanwhile an ordinary device gets in at once.
    let dev = gw.connect(&token).await;
    assert_eq!(dev.welcome["device_id"], "sensor-1");
    assert!(
        started.elapsed() < std::time::Duration::from_millis(1500),
        "an ordinary device waited {:?} behind silent clients",
        started.elapsed()
    );

    let mut buf = [0u8; 256];
    let ended = tokio::time::timeout(std::time::Duration::from_secs(8), async {
        // Anything read is the gateway's goodbye; the stream must end.
        while matches!(tcp.read(&mut buf).await, Ok(n) if n > 0) {}
        while matches!(tls.read(&mut buf).await, Ok(n) if n > 0) {}
    })
    .await;
    assert!(
        ended.is_ok(),
        "silent connections still open {:?} after start with a 2s handshake timeout",
        started.elapsed()
    );
    assert!(
        started.elapsed() >= std::time::Duration::from_millis(1500),
        "silent connections were closed after only {:?}",
        started.elapsed()
    );
}
