//! Transport modes: plain `ws://` behind a TLS-terminating proxy, HTTPS for the operator API.

use std::time::Duration;

use e2e::device::client_config;
use e2e::{json, Gateway, Options, Value};
use futures_util::{SinkExt, StreamExt};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

async fn next_json<S>(ws: &mut S) -> Value
where
    S: StreamExt<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("a message within 5 s")
            .expect("the socket stays open")
            .expect("a valid frame");
        if let Message::Text(text) = msg {
            return serde_json::from_str(text.as_str()).expect("JSON text");
        }
    }
}

#[tokio::test]
async fn no_tls_serves_plain_websockets() {
    let gw = Gateway::start(Options::new().args(["--no-tls"])).await;
    assert!(
        gw.device_url.starts_with("ws://"),
        "listening line must say ws:// with --no-tls: {}",
        gw.device_url
    );
    let token = gw.create_device("plain-1").await;
    let addr = gw.device_url["ws://".len()..]
        .split('/')
        .next()
        .expect("host:port")
        .to_string();
    let tcp = TcpStream::connect(&addr).await.expect("connect");
    let mut request = gw
        .device_url
        .as_str()
        .into_client_request()
        .expect("request");
    request.headers_mut().insert(
        "Authorization",
        format!("Bearer {token}").parse().expect("header value"),
    );
    let (mut ws, _) = tokio_tungstenite::client_async(request, tcp)
        .await
        .expect("plain upgrade");
    assert_eq!(next_json(&mut ws).await["type"], "welcome");
    ws.send(Message::text(
        json!({"type": "telemetry", "id": "p-1", "data": {"v": 1}}).to_string(),
    ))
    .await
    .expect("send");
    assert_eq!(
        next_json(&mut ws).await,
        json!({"type": "ack", "id": "p-1"})
    );
    let stored = gw.api().get("/devices/plain-1/telemetry").await;
    assert_eq!(stored.body["items"][0]["id"], "p-1", "{}", stored.raw);
}

/// One HTTP/1.1 request over TLS trusting the gateway's CA; returns the whole response text.
async fn https_get(gw: &Gateway, path: &str, key: Option<&str>) -> String {
    let host = gw.api_url["https://".len()..]
        .split('/')
        .next()
        .expect("host:port")
        .to_string();
    let tcp = TcpStream::connect(&host).await.expect("connect");
    let name = ServerName::try_from("127.0.0.1").expect("server name");
    let mut tls = TlsConnector::from(client_config(&gw.ca_pem_path))
        .connect(name, tcp)
        .await
        .expect("the API's TLS handshake with the gateway's certificate");
    let auth = key.map_or(String::new(), |k| format!("Authorization: Bearer {k}\r\n"));
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n{auth}Connection: close\r\n\r\n");
    tls.write_all(request.as_bytes()).await.expect("write");
    let mut response = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut response)).await;
    String::from_utf8_lossy(&response).into_owned()
}

#[tokio::test]
async fn api_tls_serves_the_operator_api_over_https() {
    let gw = Gateway::start(Options::new().args(["--api-tls"])).await;
    assert!(
        gw.api_url.starts_with("https://"),
        "listening line must say https:// with --api-tls: {}",
        gw.api_url
    );
    let health = https_get(&gw, "/healthz", None).await;
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    let list = https_get(&gw, "/v1/devices", Some(&gw.api_key)).await;
    assert!(list.starts_with("HTTP/1.1 200"), "{list}");
    assert!(list.contains("\"items\""), "{list}");
    let refused = https_get(&gw, "/v1/devices", None).await;
    assert!(refused.starts_with("HTTP/1.1 401"), "{refused}");
}

#[tokio::test]
async fn by_default_devices_get_tls_and_the_api_plain_http_on_loopback() {
    let gw = Gateway::start(Options::new()).await;
    assert!(gw.device_url.starts_with("wss://"), "{}", gw.device_url);
    assert!(gw.api_url.starts_with("http://"), "{}", gw.api_url);
}
